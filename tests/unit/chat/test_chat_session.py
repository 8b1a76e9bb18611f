"""The sans-IO chat session protocol: framing, the state machine, limits, malformed input."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmsg.chat.envelope import MAX_ACK_IDS, MAX_ENVELOPE_SIZE, EnvelopeSealer
from p2pmsg.chat.events import AckReceived, EnvelopeReceived, HelloReceived, SessionClosed
from p2pmsg.chat.protocol import (
    CHAT_PROTOCOL,
    FRAME_SCHEMA,
    MAX_HELLO_SIZE,
    MAX_SESSION_FRAME_SIZE,
    ChatConnection,
    SessionProtocolError,
    SessionState,
)
from p2pmsg.errors import LocalProtocolError, RemoteProtocolError
from p2pmsg.identity import Identity

ALICE = Identity.from_seed(bytes(range(32)))
BOB = Identity.from_seed(bytes(range(1, 33)))


def _frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


HELLO = _frame({"v": 1, "proto": CHAT_PROTOCOL})


def _open_receiver() -> ChatConnection:
    conn = ChatConnection()
    assert conn.receive_data(HELLO) == [HelloReceived(proto=CHAT_PROTOCOL)]
    return conn


def test_full_exchange_in_one_write_and_byte_by_byte() -> None:
    sealer = EnvelopeSealer(ALICE)
    envelopes = [sealer.seal(BOB.peer_id, f"m{i}", ts=i) for i in range(3)]
    sender = ChatConnection()
    wire = sender.send_hello() + sender.send_messages(envelopes) + sender.send_ack([b"a" * 16, b"b" * 16])
    assert sender.our_state is SessionState.OPEN

    expected = [
        HelloReceived(proto=CHAT_PROTOCOL),
        *(EnvelopeReceived(envelope=e) for e in envelopes),
        AckReceived(ids=(b"a" * 16, b"b" * 16)),
    ]
    assert ChatConnection().receive_data(wire) == expected

    slow = ChatConnection()
    events = []
    for i in range(len(wire)):
        events += slow.receive_data(wire[i : i + 1])
    assert events == expected
    assert slow.their_state is SessionState.OPEN
    assert slow.receive_data(None) == [SessionClosed()]
    assert slow.their_state is SessionState.CLOSED
    assert slow.receive_data(b"") == []


def test_received_envelope_opens() -> None:
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "through the session", ts=7)
    sender = ChatConnection()
    [_, event] = ChatConnection().receive_data(sender.send_hello() + sender.send_messages([sealed.raw]))
    assert isinstance(event, EnvelopeReceived)
    assert event.envelope.raw == sealed.raw
    assert EnvelopeSealer(BOB).open(event.envelope).text == "through the session"


def test_acks_are_split_into_frames_of_at_most_max_ids() -> None:
    ids = [i.to_bytes(16, "big") for i in range(2 * MAX_ACK_IDS + 5)]
    sender = ChatConnection()
    events = _open_receiver().receive_data(sender.send_hello()[len(HELLO) :] + sender.send_ack(ids))
    assert [len(e.ids) for e in events if isinstance(e, AckReceived)] == [MAX_ACK_IDS, MAX_ACK_IDS, 5]
    assert [i for e in events if isinstance(e, AckReceived) for i in e.ids] == ids
    assert sender.send_ack([]) == b"" and sender.send_messages([]) == b""


def test_sending_before_hello_or_after_eof_is_a_local_error() -> None:
    conn = ChatConnection()
    with pytest.raises(LocalProtocolError):
        conn.send_messages([b"x"])
    with pytest.raises(LocalProtocolError):
        conn.send_ack([bytes(16)])
    conn.send_hello()
    with pytest.raises(LocalProtocolError):
        conn.send_hello()
    conn.send_eof()
    with pytest.raises(LocalProtocolError):
        conn.send_ack([bytes(16)])


def _refused(conn: ChatConnection, data: bytes | None) -> SessionProtocolError:
    with pytest.raises(SessionProtocolError) as info:
        conn.receive_data(data)
    assert isinstance(info.value, RemoteProtocolError)
    # The connection stays failed: every later call raises the same error.
    with pytest.raises(SessionProtocolError):
        conn.receive_data(HELLO)
    assert conn.their_state is SessionState.CLOSED
    return info.value


def test_message_before_hello_is_refused() -> None:
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "x", ts=1)
    error = _refused(ChatConnection(), _frame({"v": 1, "t": "msg", "env": sealed.raw}))
    assert error.field.startswith("hello")


def test_second_hello_is_refused() -> None:
    error = _refused(_open_receiver(), HELLO)
    assert error.field.startswith("frame")


@pytest.mark.parametrize(
    "hello",
    [
        {"v": 1, "proto": "p2pmsg/chat/2"},
        {"v": 2, "proto": CHAT_PROTOCOL},
        {"proto": CHAT_PROTOCOL},
        [1, CHAT_PROTOCOL],
        {"v": 1, "proto": CHAT_PROTOCOL, "run": b"\x01" * 15},
        {"v": 1, "proto": CHAT_PROTOCOL, "run": "x" * 16},
    ],
)
def test_bad_hello_is_refused(hello: object) -> None:
    error = _refused(ChatConnection(), _frame(hello))
    assert error.field.startswith("hello")


def test_a_hello_may_name_the_run_of_its_node() -> None:
    run = bytes(range(16))
    wire = ChatConnection().send_hello(run)
    assert wire == _frame({"v": 1, "proto": CHAT_PROTOCOL, "run": run})
    assert wire.hex() == "0000002e83a17601a570726f746fad7032706d73672f636861742f31a372756ec410" + run.hex()  # 6.3
    assert ChatConnection().receive_data(wire) == [HelloReceived(proto=CHAT_PROTOCOL, run=run)]
    assert ChatConnection().receive_data(ChatConnection().send_hello()) == [HelloReceived(proto=CHAT_PROTOCOL)]


def test_unknown_hello_fields_are_ignored() -> None:
    conn = ChatConnection()
    assert conn.receive_data(_frame({"v": 1, "proto": CHAT_PROTOCOL, "caps": ["later"]})) == [
        HelloReceived(proto=CHAT_PROTOCOL)
    ]


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"v": 1, "t": "msg"}, "frame.env"),
        ({"v": 1, "t": "ack"}, "frame.ids"),
        ({"v": 1, "t": "ack", "ids": []}, "frame.ids"),
        ({"v": 1, "t": "ack", "ids": [bytes(16)], "env": b"x"}, "frame.ids"),
        ({"v": 1, "t": "nack", "ids": [bytes(16)]}, "frame.t"),
        ({"v": 1, "t": "ack", "ids": [bytes(16)], "more": 1}, "frame.more"),
        ({"v": 1, "t": "msg", "env": b"\x80"}, "msg.env.envelope.v"),
        ({"v": 1, "t": "msg", "env": b"\xc1"}, "msg.env.envelope"),
    ],
)
def test_malformed_frames_are_refused_naming_the_field(frame: object, field: str) -> None:
    error = _refused(_open_receiver(), _frame(frame))
    assert error.field == field


def test_oversize_length_prefix_is_refused_before_the_body_arrives() -> None:
    conn = _open_receiver()
    _refused(conn, struct.pack(">I", MAX_SESSION_FRAME_SIZE + 1))
    # Before the hello the limit is much smaller.
    _refused(ChatConnection(), struct.pack(">I", MAX_HELLO_SIZE + 1))
    _refused(_open_receiver(), struct.pack(">I", 0))


def test_largest_frame_is_accepted() -> None:
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "x" * 65536, ts=1)
    sender = ChatConnection()
    sender.send_hello()
    wire = sender.send_messages([sealed])
    assert len(wire) - 4 <= MAX_SESSION_FRAME_SIZE
    [event] = _open_receiver().receive_data(wire)
    assert isinstance(event, EnvelopeReceived)


def test_eof_in_the_middle_of_a_frame_is_refused() -> None:
    conn = _open_receiver()
    assert conn.receive_data(struct.pack(">I", 10) + b"abc") == []
    error = _refused(conn, b"")
    assert error.field == "stream"


def test_data_after_eof_is_refused() -> None:
    conn = _open_receiver()
    conn.receive_data(None)
    _refused(conn, b"\x00")


def test_custom_frame_limit() -> None:
    conn = ChatConnection(max_frame_size=MAX_HELLO_SIZE)
    conn.receive_data(HELLO)
    _refused(conn, struct.pack(">I", MAX_HELLO_SIZE + 1))
    with pytest.raises(LocalProtocolError):
        ChatConnection(max_frame_size=MAX_SESSION_FRAME_SIZE + 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_arbitrary_bytes_raise_only_session_errors(data: bytes, chunk: int) -> None:
    conn = _open_receiver()
    try:
        for i in range(0, len(data), chunk):
            conn.receive_data(data[i : i + chunk])
        conn.receive_data(None)
    except SessionProtocolError:
        pass


@pytest.mark.parametrize("size", [1, 255, 256, 1268, 65535, 65536, MAX_ENVELOPE_SIZE])
def test_msg_frames_from_the_constant_prefix_match_the_schema(size: int) -> None:
    raw = bytes(range(256)) * (size // 256) + bytes(size % 256)
    body = FRAME_SCHEMA.encode({"v": 1, "t": "msg", "env": raw}, max_size=MAX_SESSION_FRAME_SIZE)
    conn = ChatConnection()
    conn.send_hello()
    assert conn.send_messages([raw]) == len(body).to_bytes(4, "big") + body


def test_msg_frame_refuses_an_envelope_of_a_wrong_size() -> None:
    conn = ChatConnection()
    conn.send_hello()
    for size in (0, MAX_ENVELOPE_SIZE + 1):
        with pytest.raises(LocalProtocolError, match=r"msg\.env"):
            conn.send_messages([bytes(size)])


def test_msg_frames_laid_out_otherwise_still_parse_through_the_schema() -> None:
    """The receiver reads a frame written by send_messages at fixed offsets; a frame with the same content in
    another valid layout (bin32 header, other key order) gives the same envelope through the schema."""
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "layout", ts=3)
    sender = ChatConnection()
    sender.send_hello()
    canonical = sender.send_messages([sealed])
    other_bodies = [
        msgpack.packb({"v": 1, "t": "msg", "env": sealed.raw}, use_bin_type=True)[: -len(sealed.raw) - 3]
        + b"\xc6"
        + len(sealed.raw).to_bytes(4, "big")
        + sealed.raw,
        msgpack.packb({"env": sealed.raw, "t": "msg", "v": 1}, use_bin_type=True),
    ]
    assert 256 <= len(sealed.raw) < 65536  # so the first body above replaced a bin16 header
    for data in [canonical] + [struct.pack(">I", len(b)) + b for b in other_bodies]:
        (event,) = _open_receiver().receive_data(data)
        assert isinstance(event, EnvelopeReceived)
        assert event.envelope == sealed
    # A canonical prefix whose bin length does not run to the end of the frame is refused by the schema.
    body = canonical[4:] + b"\x00"
    with pytest.raises(SessionProtocolError):
        _open_receiver().receive_data(struct.pack(">I", len(body)) + body)

"""Conformance of a real node's chat side with docs/protocol.md sections 1.1, 3 and 6, checked by clean-room code.

The worked examples need no node. The other tests share one node (module scope); each test talks to it as its own
fresh clean-room peer, added as a contact, so tests do not see each other's messages.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from cleanroom.chat import (
    CLIENT_RUN,
    MAX_HELLO_SIZE,
    MAX_SESSION_FRAME_SIZE,
    ChatSession,
    ack_frame,
    hello_frame,
    msg_frame,
    now_ms,
    open_envelope,
    open_session,
    pack,
    seal,
    session_frame,
    shared_key,
)
from cleanroom.encoding import CleanroomError, b58decode
from cleanroom.identity import Identity, parse_peer_id, peer_id_cid
from cleanroom.invite import make_invite
from cleanroom.nodes import Node, wait_until
from cleanroom.noise import (
    ChannelClosed,
    RecordingSocket,
    aead_encrypt,
    handshake_initiator,
    handshake_responder,
    make_payload,
)

# ---------------------------------------------------------------- worked examples (no node)

ALICE_6_7 = Identity(bytes(range(32)))
BOB_6_7 = Identity(bytes(range(1, 33)))
ID_6_7 = bytes(range(0x10, 0x20))
NONCE_6_7 = bytes(range(0x40, 0x58))
TS_6_7 = 1_700_000_000_000
BOX_6_7 = (
    "d5a65ccfd33857501e277e340c1591c431a6d37ed7ac018d8aed3b2c45033a429821f552ef33524e59c8d4642c8e2ad2799ef3db21f5355270"
    "cbd347ed08b585bfbcb664beadd51b3a8112216953e48524096485a7317dfd12700deb58c7f7b609926179a9cf36dc699392cb84efa5b8a59d"
    "ecb5c0a69fa87ce9a9aab70af21aae0ffd6fb4505f78ce2dd6d22fb7d065f4811fe83b306e78816418fde6ee0f"
)


def _seal_6_7() -> bytes:
    return seal(ALICE_6_7, BOB_6_7.peer_id, "hi", TS_6_7, mid=ID_6_7, nonce=NONCE_6_7)[1]


def test_peer_id_worked_example_1_1() -> None:
    ident = Identity(bytes.fromhex("7e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"))
    assert ident.pk.hex() == "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
    assert ident.peer_id.hex() == "0024080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
    assert ident.peer_id_text == "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"
    cid = "bafzaajaiaejcahwr5d5ofrfbis4l5d6uwr57hu5tjodrypfm6yaq6dsc2r2pzyt6"
    assert peer_id_cid(ident.pk) == cid
    assert parse_peer_id(cid) == parse_peer_id(ident.peer_id_text) == b58decode(ident.peer_id_text) == ident.peer_id


def test_noise_worked_example_3_9() -> None:
    """Both sides of section 3.9 over a socketpair, with the injected keys; every frame compared byte for byte."""
    alice, bob = Identity(b"\xa1" * 32), Identity(b"\xb0" * 32)
    assert alice.peer_id_text == "12D3KooWNW98jY6oC8EEaFFbYCc24HPRaNAJaEY7eiAvspiAgFak"
    assert bob.peer_id_text == "12D3KooWHP2Ve7tpkRQMJACbU4xmq9aDwL6gphLRHLJ3xB6nU5KA"
    bob_payload = make_payload(bob, bytes.fromhex("7d34a4815fa6b982535e60af3bd9b49556816080f1641ff81d2b7c8ae8268a44"))
    assert bob_payload.hex() == (
        "0a2408011220705fbac01f5519899f437bc42e40255ae9ab54bff00de3433af7d687d9e71ad5"
        "124013f84c49d404c1c2c89d56ba34be623be172abcdf959afeb6aaf3bc674b7e0a6"
        "81d4808f7049c47758832252f19fa75a63ff5303625fc2ac8237aa3522c0e904"
    )
    a_raw, b_raw = socket.socketpair()
    a_sock, b_sock = RecordingSocket(a_raw), RecordingSocket(b_raw)
    a_raw.settimeout(10)
    b_raw.settimeout(10)
    result: dict[str, Any] = {}

    def responder() -> None:
        try:
            result["bob"] = handshake_responder(b_sock, bob, static_priv=b"\x21" * 32, ephemeral_priv=b"\x22" * 32)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=responder)
    thread.start()
    try:
        a_ch = handshake_initiator(a_sock, alice, bob.peer_id, static_priv=b"\x11" * 32, ephemeral_priv=b"\x12" * 32)
    finally:
        thread.join(10)
    assert "error" not in result, result
    b_ch = result["bob"]
    frame1 = "0020052a50773ac8d91773f2dc9662e12f0defe915e415b8a1c8e20a5a3d6ab2b843"
    frame3 = (
        "00a8e86c81a880398a8d9bc21b322d8f524134ef9c0456a63ec2de76574116541dcab70430d763bea7539ecc46a8febbce36"
        "27e4f597132215014ebae3b4f309c32ba35df072280f751db19bebb16912dfb7acf10eb709ddd7aa109cb515a3e825d03926b76a0926621e"
        "6d19bc786dc7a0bedfe2ad324f0a39b574f5eb840497544545c81a213a785e45ea54d845bbe7655b52e8bfcdafd72f2646d1c1d5f59c1077"
        "54761254f9766ce8"
    )
    frame2 = (
        "00c80faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20"
        "a7ed3a6a454f03d7bb49831f99155a0f5b30d08f206300ad054574e2c183e32473fc04f9ec728bfb00430cf36aed63af"
        "19b2fb5876facec13cd5831cfb3ad981fe1fbd273722c54d50a9b680325f252b05991920f61e661fd4c510ddf2174688c450e50ac6e35beb"
        "9baf2e20dc264957250ac5ac27db1e5df940790626a37a174a7fdbbf36757f72cd1e9f8cca9c38428bbb775b328f66052bf672b2491dbb05"
        "967e95787b3e49e4"
    )
    assert a_sock.sent.hex() == frame1 + frame3
    assert b_sock.sent.hex() == frame2
    hh = "b29d326f2e8b2dfb65ec1b3b90d2dac1c396eba7dc2e3bd78b13fb4b69d3ba71"
    assert a_ch.handshake_hash.hex() == b_ch.handshake_hash.hex() == hh
    assert (
        a_ch.send_key.hex() == b_ch.recv_key.hex() == "0fe0098213134667862fb8218f776a53bcb48d85dc9434132714807c77147efc"
    )
    assert (
        a_ch.recv_key.hex() == b_ch.send_key.hex() == "9c5a84aabbc19454b741f25f57f3f4a89b18e4e2306c71183cdc4433cf29321e"
    )
    assert a_ch.remote_peer_id == bob.peer_id and b_ch.remote_peer_id == alice.peer_id
    assert a_ch.encrypt_frame(b"hello").hex() == "0015aa95c32df597c589e3fe61f3cbede5197bb35b7cf3"
    assert b_ch.encrypt_frame(b"hi").hex() == "0012de17c87406f65c303e695e274a3ae3c9eb92"
    a_raw.close()
    b_raw.close()


def test_keys_worked_example_6_7() -> None:
    assert ALICE_6_7.peer_id_text == "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"
    assert ALICE_6_7.peer_id.hex() == "00240801122003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    assert ALICE_6_7.x_pk.hex() == "4701d08488451f545a409fb58ae3e58581ca40ac3f7f114698cd71deac73ca01"
    assert BOB_6_7.peer_id_text == "12D3KooWJ1TsijH7H5F74hfAD5XishQz3sxrmAtVY37GtNd9CqYf"
    assert BOB_6_7.peer_id.hex() == "00240801122079b5562e8fe654f94078b112e8a98ba7901f853ae695bed7e0e3910bad049664"
    assert BOB_6_7.x_pk.hex() == "4a3807d064d077181cc070989e76891d20dca5559548dc2c77c1a50273882b38"
    key = "c19a5d2a5d91fa6b96bec69fea29aec2ebbf79381b71f52b63e09e8273bd04f3"
    assert shared_key(ALICE_6_7, BOB_6_7.peer_id).hex() == shared_key(BOB_6_7, ALICE_6_7.peer_id).hex() == key


def test_envelope_worked_example_6_7() -> None:
    env = _seal_6_7()
    assert len(env) == 310
    expected = (
        "86a17601a26964c410" + ID_6_7.hex() + "a466726f6dc426" + ALICE_6_7.peer_id.hex() + "a2746fc426"
        "" + BOB_6_7.peer_id.hex() + "a56e6f6e6365c418" + NONCE_6_7.hex() + "a3626f78c49f" + BOX_6_7
    )
    assert env.hex() == expected
    msg = open_envelope(BOB_6_7, env)
    assert msg == {"v": 2, "id": ID_6_7, "from": ALICE_6_7.peer_id, "to": BOB_6_7.peer_id, "ts": TS_6_7} | {
        "kind": "text",
        "text": "hi",
    }


def test_session_frames_worked_example_6_7() -> None:
    hello = session_frame(hello_frame())
    assert hello.hex() == "0000001882a17601a570726f746fad7032706d73672f636861742f31"
    msg = session_frame(msg_frame(_seal_6_7()))
    assert len(msg) == 331
    assert msg[:21].hex() == "0000014783a17601a174a36d7367a3656e76c50136"
    assert msg[21:] == _seal_6_7()
    ack = session_frame(ack_frame([ID_6_7]))
    assert ack.hex() == "0000002183a17601a174a361636ba369647391c410" + ID_6_7.hex()


def test_reflected_envelope_refused_worked_example_6_7() -> None:
    env = msgpack.unpackb(_seal_6_7())
    env["from"], env["to"] = env["to"], env["from"]
    with pytest.raises(CleanroomError, match=r"message\.from"):
        open_envelope(ALICE_6_7, pack(env))


# ---------------------------------------------------------------- the node and one fresh peer per test


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node("node", tmp_path_factory.mktemp("chat"))
    try:
        n.init()
        n.start()
        yield n
    finally:
        n.stop()


_names = itertools.count(1)


@dataclass
class Peer:
    """A clean-room peer that the node has as a contact. Its port is reserved (bound, not listening)."""

    ident: Identity
    name: str
    listener: socket.socket
    node: Node

    def session(self, hello: bool = True) -> ChatSession:
        return open_session(self.node.port, self.ident, self.node.peer_id, hello=hello)

    def seal(self, text: str, **kw: Any) -> tuple[bytes, bytes]:
        return seal(self.ident, self.node.peer_id, text, **kw)


@pytest.fixture
def peer(node: Node) -> Iterator[Peer]:
    ident = Identity.generate()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    name = f"peer{next(_names)}"
    link = make_invite(ident.peer_id_text, [f"/ip4/127.0.0.1/tcp/{listener.getsockname()[1]}"])
    try:
        node.call("contacts.add", {"target": link, "name": name})
        yield Peer(ident, name, listener, node)
    finally:
        listener.close()


def _wait_connected(node: Node, peer: Peer) -> None:
    wait_until(
        lambda: any(p["peer_id"] == peer.ident.peer_id_text for p in node.call("peers")), 10, "session listed in peers"
    )


def _wait_counter(node: Node, reason: str, before: int) -> int:
    """Wait (bounded) until status.dropped[reason] moved past `before`; return the increase."""
    try:
        return wait_until(lambda: node.dropped(reason) - before, 5, f"dropped.{reason} counted")
    except TimeoutError:
        return 0


def _accept(listener: socket.socket, timeout: float = 15.0) -> socket.socket:
    listener.listen(4)
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    conn.settimeout(10)
    return conn


# ---------------------------------------------------------------- messages both ways


def test_message_to_node_is_acked_and_stored_once(node: Node, peer: Peer) -> None:
    session = peer.session()
    ts = now_ms()
    text = f"hello from the clean room {ts}"
    mid, env = peer.seal(text, ts=ts)
    session.send_msg(env)
    session.wait_ack(mid)
    assert session.peer_hello is not None and session.peer_hello["proto"] == "p2pmsg/chat/1"
    row = node.find_message(peer.name, text)
    assert row is not None, "acknowledged message not in history"
    assert (row["id"], row["from"], row["ts"], row["direction"], row["status"]) == (
        mid.hex(),
        peer.ident.peer_id_text,
        ts,
        "in",
        "received",
    )
    _, again = peer.seal(text, ts=ts, mid=mid)  # the same id under a fresh nonce: acknowledged again, stored once
    session.send_msg(again)
    session.wait_ack(mid)
    assert [m["text"] for m in node.history(peer.name)].count(text) == 1
    session.close()


def test_node_sends_on_open_session(node: Node, peer: Peer) -> None:
    session = peer.session()
    _wait_connected(node, peer)
    text = f"hi from the node {time.time()}"
    sent = node.call("send", {"name": peer.name, "text": text})
    msg = session.recv_message(text)
    assert msg["id"].hex() == sent["id"]
    assert (msg["from"], msg["to"]) == (node.peer_id, peer.ident.peer_id)
    assert abs(msg["ts"] - now_ms()) < 60_000
    assert msg["id"][:4] == ((msg["ts"] // 60000) % 2**32).to_bytes(4, "big"), "6.1: id starts with the minute"
    session.send_ack([msg["id"]])
    node.wait_status(peer.name, text, "delivered")
    session.close()


def test_node_sends_while_we_are_offline_then_we_dial(node: Node, peer: Peer) -> None:
    text = f"while you were away {time.time()}"
    node.call("send", {"name": peer.name, "text": text})
    session = peer.session()
    msg = session.recv_message(text, timeout=20)
    session.send_ack([msg["id"]])
    node.wait_status(peer.name, text, "delivered")
    session.close()


def test_node_dials_our_listener(node: Node, peer: Peer) -> None:
    text = f"the node dials you {time.time()}"
    peer.listener.listen(4)
    node.call("send", {"name": peer.name, "text": text})
    rec = RecordingSocket(_accept(peer.listener))
    channel = handshake_responder(rec, peer.ident)
    assert channel.remote_peer_id == node.peer_id
    assert len(rec.received) == 2 + 32 + 2 + 48 + 104 + 16, "3.4: the node's payload is always 104 bytes"
    session = ChatSession(channel, peer.ident)
    session.send_hello(CLIENT_RUN)
    msg = session.recv_message(text, timeout=20)
    session.send_ack([msg["id"]])
    node.wait_status(peer.name, text, "delivered")
    session.close()


def test_node_hello_and_message_2_layout(node: Node, peer: Peer) -> None:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    rec = RecordingSocket(sock)
    channel = handshake_initiator(rec, peer.ident, node.peer_id)
    assert len(rec.received) == 2 + 32 + 48 + 104 + 16, "3.4: message 2 carries the 104-byte payload"
    assert rec.received[:2] == struct.pack(">H", 200)
    session = ChatSession(channel, peer.ident)
    session.send_hello(CLIENT_RUN)
    header = channel.read_exact(4)
    assert header is not None
    body = channel.read_exact(struct.unpack(">I", header)[0])
    assert body is not None
    wire = header + body
    # 6.3: a p2pmsg node always sends `run`; the 50-byte hello with its 16 random bytes at the end
    assert wire[:-16].hex() == "0000002e83a17601a570726f746fad7032706d73672f636861742f31a372756ec410"
    assert len(wire) == 50
    channel.close()


def test_resend_keeps_id_and_ts_with_fresh_nonce(node: Node, peer: Peer) -> None:
    first = peer.session()
    _wait_connected(node, peer)
    text = f"first attempt {time.time()}"
    node.call("send", {"name": peer.name, "text": text})
    m1 = first.recv_message(text)
    first.close()  # no ack: the node sends it again on the next session
    second = peer.session()
    m2 = second.recv_message(text, timeout=20)
    e1, e2 = msgpack.unpackb(m1["env"]), msgpack.unpackb(m2["env"])
    assert e1["id"] == e2["id"] and m1["ts"] == m2["ts"]
    assert e1["nonce"] != e2["nonce"] and e1["box"] != e2["box"]
    second.send_ack([e2["id"]])
    node.wait_status(peer.name, text, "delivered")
    second.close()


def test_ack_on_another_session_does_not_count(node: Node, peer: Peer) -> None:
    """6.2: a receipt counts only on the session the message was written to; others count as chat_ack_unknown."""
    a = peer.session()
    _wait_connected(node, peer)
    text = f"ack me elsewhere {time.time()}"
    node.call("send", {"name": peer.name, "text": text})
    mid = a.recv_message(text)["id"]
    a.close()
    before = node.dropped("chat_ack_unknown")
    b = peer.session(hello=False)
    b.send_raw(session_frame(hello_frame(CLIENT_RUN)) + session_frame(ack_frame([mid])))
    assert b.recv_message(text, timeout=20)["id"] == mid, "the node must write the message again"
    assert _wait_counter(node, "chat_ack_unknown", before) == 1
    time.sleep(0.5)
    assert node.find_message(peer.name, text)["status"] == "sent"  # type: ignore[index]
    b.send_ack([mid])
    node.wait_status(peer.name, text, "delivered")
    b.close()


def test_stranger_message_is_acked_and_becomes_a_request(node: Node) -> None:
    stranger = Identity.generate()
    session = open_session(node.port, stranger, node.peer_id)
    text = f"hello, I am a stranger {time.time()}"
    mid, env = seal(stranger, node.peer_id, text)
    session.send_msg(env)
    session.wait_ack(mid)
    session.close()
    requests = {r["peer_id"]: r for r in node.call("requests.list")}
    assert stranger.peer_id_text in requests
    assert (requests[stranger.peer_id_text]["count"], requests[stranger.peer_id_text]["last_text"]) == (1, text)


def test_node_aborts_handshake_with_wrong_identity(node: Node, peer: Peer) -> None:
    """3.4: the initiator checks the responder's peer id before message 3, so it never sends it to an impostor."""
    text = f"to an impostor? {time.time()}"
    peer.listener.listen(4)
    node.call("send", {"name": peer.name, "text": text})
    conn = _accept(peer.listener)
    with pytest.raises(ChannelClosed, match="after 0/2 bytes"):
        handshake_responder(conn, Identity.generate())
    conn.close()
    peer.listener.close()
    session = peer.session()  # the message is still queued for the real peer
    msg = session.recv_message(text, timeout=20)
    session.send_ack([msg["id"]])
    node.wait_status(peer.name, text, "delivered")
    session.close()


def test_reflected_envelope_is_refused(node: Node, peer: Peer) -> None:
    session = peer.session()
    _wait_connected(node, peer)
    text = f"to be reflected {time.time()}"
    node.call("send", {"name": peer.name, "text": text})
    msg = session.recv_message(text)
    session.send_ack([msg["id"]])
    env = msgpack.unpackb(msg["env"])
    env["from"], env["to"] = env["to"], env["from"]
    before = node.dropped("chat_invalid_message")
    session.send_msg(pack(env))
    assert not session.acked_before_sentinel(env["id"], node.peer_id)
    assert _wait_counter(node, "chat_invalid_message", before) == 1
    session.close()


# ---------------------------------------------------------------- envelopes dropped, session kept (6.1, 6.3)

_OTHER = Identity.generate()


def _with_altered_box(mid: bytes, env: bytes) -> tuple[bytes, bytes]:
    e = msgpack.unpackb(env)
    e["box"] = e["box"][:-1] + bytes([e["box"][-1] ^ 1])
    return mid, pack(e)


# name -> (builder(peer) -> (message id, envelope), the status.dropped counter it must land in)
DROPPED: dict[str, tuple[Callable[[Peer], tuple[bytes, bytes]], str]] = {
    "inner_to_mismatch": (
        lambda p: p.seal("bad inner to", inner_overrides={"to": p.ident.peer_id}),
        "chat_invalid_message",
    ),
    "inner_from_mismatch": (
        lambda p: p.seal("bad inner from", inner_overrides={"from": _OTHER.peer_id}),
        "chat_invalid_message",
    ),
    "inner_id_mismatch": (
        lambda p: p.seal("bad inner id", inner_overrides={"id": os.urandom(16)}),
        "chat_invalid_message",
    ),
    "inner_message_v1": (lambda p: p.seal("inner v1", inner_overrides={"v": 1}), "chat_invalid_message"),
    "inner_unknown_field": (lambda p: p.seal("inner extra", inner_overrides={"x": 1}), "chat_invalid_message"),
    "inner_kind_not_text": (lambda p: p.seal("inner kind", inner_overrides={"kind": "file"}), "chat_invalid_message"),
    "text_65537_bytes": (lambda p: p.seal("a" * 65537), "chat_invalid_message"),
    "outer_to_someone_else": (lambda p: seal(p.ident, _OTHER.peer_id, "for someone else"), "chat_wrong_recipient"),
    "box_altered": (
        lambda p: _with_altered_box(*p.seal("altered")),
        "chat_undecryptable",
    ),
    "relayed_from_another_peer": (lambda p: seal(_OTHER, p.node.peer_id, "relayed"), "chat_relayed_envelope"),
}


@pytest.mark.parametrize("case", list(DROPPED))
def test_envelope_dropped_not_acked_session_stays(node: Node, peer: Peer, case: str) -> None:
    build, counter = DROPPED[case]
    session = peer.session()
    before = node.dropped(counter)
    mid, env = build(peer)
    session.send_msg(env)
    assert not session.acked_before_sentinel(mid, node.peer_id), "a refused envelope must not be acknowledged"
    assert _wait_counter(node, counter, before) == 1
    assert all(m["id"] != mid.hex() for m in node.history(peer.name)), "a refused envelope must not be stored"
    session.close()


# ---------------------------------------------------------------- accepted edge cases (6.1, 6.3, 3.6)


def test_empty_text_is_stored_and_acked(node: Node, peer: Peer) -> None:
    session = peer.session()
    mid, env = peer.seal("")
    session.send_msg(env)
    session.wait_ack(mid)
    assert any(m["id"] == mid.hex() and m["text"] == "" for m in node.history(peer.name))
    session.close()


def test_longest_text_is_stored_and_acked(node: Node, peer: Peer) -> None:
    mid, env = peer.seal("a" * 65536, ts=2**63 - 1)
    assert len(env) == 65851, "6.1: the longest envelope p2pmsg writes"
    session = peer.session()
    session.send_msg(env)
    session.wait_ack(mid)
    session.close()


def test_hello_of_1024_bytes_without_run_with_unknown_field(node: Node, peer: Peer) -> None:
    session = peer.session(hello=False)
    base: dict[str, Any] = {"v": 1, "proto": "p2pmsg/chat/1", "pad": ""}
    base["pad"] = "x" * (MAX_HELLO_SIZE - len(pack(base)) - 2)  # the str 16 header grows by 2
    body = pack(base)
    assert len(body) == MAX_HELLO_SIZE
    session.send_raw(struct.pack(">I", len(body)) + body)
    mid, env = peer.seal("after a 1024-byte hello without run")
    session.send_msg(env)
    session.wait_ack(mid)
    session.close()


def test_timestamp_from_the_future_is_lowered(node: Node, peer: Peer) -> None:
    """6.3/7.4: a received message's ts is at most 10 minutes after the receiving node's clock."""
    session = peer.session()
    before = now_ms()
    text = f"from the future {before}"
    mid, env = peer.seal(text, ts=before + 3_600_000)
    session.send_msg(env)
    session.wait_ack(mid)
    after = now_ms()
    row = node.find_message(peer.name, text)
    assert row is not None
    assert before + 600_000 - 2000 <= row["ts"] <= after + 600_000 + 2000, row["ts"] - before
    session.close()


def test_ack_for_unknown_ids_is_ignored(node: Node, peer: Peer) -> None:
    session = peer.session()
    before = node.dropped("chat_ack_unknown")
    session.send_ack([os.urandom(16)])
    mid, env = peer.seal("after an unknown ack")
    session.send_msg(env)
    session.wait_ack(mid)
    assert _wait_counter(node, "chat_ack_unknown", before) == 1
    session.close()


def test_eight_empty_noise_frames_are_accepted(node: Node, peer: Peer) -> None:
    session = peer.session()
    session.ch.write_empty_frames(8)
    mid, env = peer.seal("after 8 empty noise frames")
    session.send_msg(env)
    session.wait_ack(mid)
    session.close()


# ---------------------------------------------------------------- violations that close the session (6.3)

_NOW = now_ms()


def _env(p: Peer, **kw: Any) -> bytes:
    return p.seal("k", ts=_NOW, **kw)[1]


# name -> (send our hello first?, frames: dicts are encoded, bytes are sent raw)
CLOSING: dict[str, tuple[bool, Callable[[Peer], list[Any]]]] = {
    "second_hello": (True, lambda p: [hello_frame()]),
    "zero_length_frame": (True, lambda p: [struct.pack(">I", 0)]),
    "frame_over_limit": (True, lambda p: [struct.pack(">I", MAX_SESSION_FRAME_SIZE + 1) + b"\x80" * 16]),
    "first_frame_over_hello_limit": (False, lambda p: [struct.pack(">I", MAX_HELLO_SIZE + 1)]),
    "msg_before_hello": (False, lambda p: [msg_frame(_env(p))]),
    "ack_before_hello": (False, lambda p: [ack_frame([os.urandom(16)])]),
    "hello_other_proto": (False, lambda p: [{"v": 1, "proto": "p2pmsg/chat/2"}]),
    "hello_proto_upper_case": (False, lambda p: [{"v": 1, "proto": "P2PMSG/chat/1"}]),
    "hello_proto_empty": (False, lambda p: [{"v": 1, "proto": ""}]),
    "hello_proto_bin": (False, lambda p: [{"v": 1, "proto": b"p2pmsg/chat/1"}]),
    "hello_v2": (False, lambda p: [{"v": 2, "proto": "p2pmsg/chat/1"}]),
    "hello_run_15_bytes": (False, lambda p: [{"v": 1, "proto": "p2pmsg/chat/1", "run": b"x" * 15}]),
    "msg_extra_key": (True, lambda p: [msg_frame(_env(p)) | {"x": 1}]),
    "ack_empty_ids": (True, lambda p: [ack_frame([])]),
    "ack_id_15_bytes": (True, lambda p: [ack_frame([b"x" * 15])]),
    "unknown_t": (True, lambda p: [{"v": 1, "t": "ping"}]),
    "envelope_unknown_field": (True, lambda p: [msg_frame(_env(p, outer_overrides={"x": None}))]),
    "envelope_bad_from": (
        True,
        lambda p: [msg_frame(_env(p, outer_overrides={"from": b"\x00\x24\x08\x02" + os.urandom(34)}))],
    ),
    "envelope_v2": (True, lambda p: [msg_frame(_env(p, outer_overrides={"v": 2}))]),
    "envelope_nonce_23_bytes": (True, lambda p: [msg_frame(_env(p, outer_overrides={"nonce": os.urandom(23)}))]),
    "end_of_stream_inside_a_frame": (True, lambda p: [struct.pack(">I", 100) + b"\x80"]),
}


@pytest.mark.parametrize("case", list(CLOSING))
def test_session_violation_closes_the_session(node: Node, peer: Peer, case: str) -> None:
    hello, frames = CLOSING[case]
    before = node.dropped("chat_protocol_error")
    session = peer.session(hello=hello)
    for f in frames(peer):
        session.send_raw(f if isinstance(f, bytes) else session_frame(f))
    if case == "end_of_stream_inside_a_frame":
        session.ch.end_stream()
    assert session.expect_closed(5), "the node must close the session"
    session.close()
    assert _wait_counter(node, "chat_protocol_error", before) == 1
    assert all(m["text"] != "k" for m in node.history(peer.name)), "nothing from a closed session is stored"


def test_oversized_frame_header_closes_before_the_body(node: Node, peer: Peer) -> None:
    """6.3: the length is checked as soon as its 4 bytes are there, before any of the body."""
    session = peer.session()
    t0 = time.monotonic()
    session.send_raw(struct.pack(">I", 10_000_000))
    assert session.expect_closed(5)
    assert time.monotonic() - t0 < 2.0
    session.close()


# ---------------------------------------------------------------- the secure channel (3.6, 3.7)

CHANNEL: dict[str, Callable[[ChatSession], None]] = {
    "frame_fails_authentication": lambda s: s.ch.write_raw_frame(os.urandom(40)),
    "frame_shorter_than_a_tag": lambda s: s.ch.write_raw_frame(b"\x00" * 5),
    "nine_empty_frames_in_a_row": lambda s: s.ch.write_empty_frames(9),
    "replayed_frame_number": lambda s: s.ch.write_raw_frame(aead_encrypt(s.ch.send_key, 0, b"", b"\0\0\0\1\x80")),
}


@pytest.mark.parametrize("case", list(CHANNEL))
def test_channel_violation_closes_the_connection(node: Node, peer: Peer, case: str) -> None:
    before = node.dropped("chat_channel_error")
    session = peer.session()
    CHANNEL[case](session)
    assert session.expect_closed(5)
    session.close()
    assert _wait_counter(node, "chat_channel_error", before) == 1


def _handshake_failures(node: Node) -> int:
    return int(node.call("status")["listener"]["handshake_failures"])


def test_handshake_message_1_too_long_is_closed_without_answer(node: Node) -> None:
    before = _handshake_failures(node)
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        s.sendall(struct.pack(">H", 33) + os.urandom(33))
        assert s.recv(10) == b""
    assert wait_until(lambda: _handshake_failures(node) > before, 5, "handshake_failures counted")


def test_handshake_header_over_limit_is_closed_at_once(node: Node) -> None:
    """3.7: the limit is checked on the frame header: no wait for a body that is never sent."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(b"\x00\x21")
        assert s.recv(10) == b""
        assert time.monotonic() - t0 < 2.0

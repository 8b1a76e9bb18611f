"""Attacks on the secure channel over memory streams: tampering, replay, reordering, impostors, stalls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from p2pmsg.crypto.libp2p_noise import (
    PROTOCOL_NAME,
    FrameDecoder,
    HandshakeError,
    InvalidHandshakePayloadError,
    NoiseHandshake,
    PeerIdMismatchError,
    encode_frame,
    encode_handshake_payload,
    parse_handshake_payload,
)
from p2pmsg.crypto.noise import HandshakeState
from p2pmsg.errors import RemoteProtocolError
from p2pmsg.identity import Identity
from p2pmsg.net.channel import (
    MAX_EMPTY_FRAMES,
    ChannelCutError,
    ChannelError,
    SecureChannel,
    secure_inbound,
    secure_outbound,
)

ALICE = Identity.from_seed(bytes([0xA1]) * 32)
BOB = Identity.from_seed(bytes([0xB0]) * 32)
MALLORY = Identity.from_seed(bytes([0x3A]) * 32)

Tamper = Callable[[int, bytes], bytes]


def _untouched(index: int, frame: bytes) -> bytes:
    return frame


def _flip(target: int, position: int) -> Tamper:
    def tamper(index: int, frame: bytes) -> bytes:
        if index != target:
            return frame
        position_in_frame = position % len(frame)
        return frame[:position_in_frame] + bytes([frame[position_in_frame] ^ 0x04]) + frame[position_in_frame + 1 :]

    return tamper


async def _read_frame(stream: trio.abc.Stream, decoder: FrameDecoder) -> bytes:
    while (frame := decoder.next_frame()) is None:
        data = await stream.receive_some()
        if not data:
            raise EOFError
        decoder.feed(data)
    return frame


class Relay:
    """A man in the middle that forwards whole frames, passing each through a tamper function."""

    def __init__(self) -> None:
        self.frames = {"c2s": 0, "s2c": 0}

    async def run(self, src: trio.abc.Stream, dst: trio.abc.Stream, direction: str, tamper: Tamper) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                frame = await _read_frame(src, decoder)
                await dst.send_all(tamper(self.frames[direction], encode_frame(frame)))
                self.frames[direction] += 1
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:  # like a TCP proxy: when one side goes, both go
            await trio.aclose_forcefully(dst)
            await trio.aclose_forcefully(src)


@asynccontextmanager
async def _handshake_through(
    c2s: Tamper = _untouched, s2c: Tamper = _untouched, *, server: Identity = BOB
) -> AsyncIterator[tuple[SecureChannel | BaseException, SecureChannel | BaseException, trio.abc.Stream, Relay]]:
    """Handshake Alice -> relay -> ``server``; the relay keeps running while the block runs."""
    client_end, proxy_client = trio.testing.memory_stream_pair()
    proxy_server, server_end = trio.testing.memory_stream_pair()
    relay = Relay()
    outcome: dict[str, SecureChannel | BaseException] = {}

    async def run_client() -> None:
        try:
            outcome["client"] = await secure_outbound(client_end, ALICE, BOB.peer_id)
        except RemoteProtocolError as exc:
            outcome["client"] = exc

    async def run_server() -> None:
        try:
            outcome["server"] = await secure_inbound(server_end, server)
        except RemoteProtocolError as exc:
            outcome["server"] = exc

    async with trio.open_nursery() as outer:
        outer.start_soon(relay.run, proxy_client, proxy_server, "c2s", c2s)
        outer.start_soon(relay.run, proxy_server, proxy_client, "s2c", s2c)
        async with trio.open_nursery() as inner:
            inner.start_soon(run_client)
            inner.start_soon(run_server)
        yield outcome["client"], outcome["server"], client_end, relay
        outer.cancel_scope.cancel()


async def _assert_closed(stream: trio.abc.Stream) -> None:
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


# ------------------------------------------------------------------------------------------------- handshake


async def test_relay_that_changes_nothing_is_harmless(autojump_clock: trio.testing.MockClock) -> None:
    async with _handshake_through() as (client, server, _, relay):
        assert isinstance(client, SecureChannel) and isinstance(server, SecureChannel)
        assert relay.frames == {"c2s": 2, "s2c": 1}
        await client.send_all(b"through the relay")
        assert await server.receive_some() == b"through the relay"
        await server.send_all(b"and back")
        assert await client.receive_some() == b"and back"


@pytest.mark.parametrize(
    ("direction", "frame", "position"),
    [
        ("c2s", 0, 0),  # message 1 length, high byte
        ("c2s", 0, 1),  # message 1 length, low byte
        ("c2s", 0, 2),  # message 1 ephemeral key
        ("c2s", 0, 33),
        ("s2c", 0, 1),  # message 2 length
        ("s2c", 0, 5),  # message 2 ephemeral key
        ("s2c", 0, 50),  # message 2 encrypted static key
        ("s2c", 0, 150),  # message 2 payload
        ("s2c", 0, -1),  # message 2 tag
        ("c2s", 1, 0),  # message 3 length
        ("c2s", 1, 10),  # message 3 encrypted static key
        ("c2s", 1, 100),  # message 3 payload
        ("c2s", 1, -1),  # message 3 tag
    ],
)
async def test_flipped_bit_in_a_handshake_frame_fails_both_sides(
    autojump_clock: trio.testing.MockClock, direction: str, frame: int, position: int
) -> None:
    tamper = _flip(frame, position)
    async with _handshake_through(
        c2s=tamper if direction == "c2s" else _untouched, s2c=tamper if direction == "s2c" else _untouched
    ) as (client, server, client_end, _):
        # Whichever side notices first closes its stream; the other then fails too (peer gone or timeout).
        assert isinstance(server, HandshakeError), server
        if (direction, frame) == ("c2s", 1):
            # Alice is done once she has sent message 3, as XX allows; Bob rejected it and hung up, so her
            # channel only ever sees the end of the stream and never any data.
            assert isinstance(client, SecureChannel), client
            assert await client.receive_some() == b""
        else:
            assert isinstance(client, HandshakeError), client
            await _assert_closed(client_end)


async def test_wrong_peer_answering_is_rejected_before_message_3(autojump_clock: trio.testing.MockClock) -> None:
    async with _handshake_through(server=MALLORY) as (client, server, client_end, relay):
        assert isinstance(client, PeerIdMismatchError)
        assert client.expected == BOB.peer_id and client.actual == MALLORY.peer_id
        assert str(MALLORY.peer_id) in str(client) and str(BOB.peer_id) in str(client)
        assert isinstance(server, HandshakeError) and "before handshake message 3" in str(server)
        assert relay.frames["c2s"] == 1, "Alice must never send message 3 (her identity) to the wrong peer"
        await _assert_closed(client_end)


@pytest.mark.parametrize("substitute", ["static key", "identity key"])
async def test_active_mitm_substituting_keys_fails(autojump_clock: trio.testing.MockClock, substitute: str) -> None:
    """Mallory runs her own Noise handshakes with both sides and forwards Bob's credentials to Alice."""
    alice_end, mallory_alice = trio.testing.memory_stream_pair()
    mallory_bob, bob_end = trio.testing.memory_stream_pair()
    outcome: dict[str, BaseException | SecureChannel] = {}

    async def mallory() -> None:
        to_alice = HandshakeState(initiator=False, protocol_name=PROTOCOL_NAME)
        to_bob = HandshakeState(initiator=True, protocol_name=PROTOCOL_NAME)
        alice_frames, bob_frames = FrameDecoder(), FrameDecoder()
        to_alice.read_message(await _read_frame(mallory_alice, alice_frames))
        await mallory_bob.send_all(encode_frame(to_bob.write_message(b"")))
        bob_payload = to_bob.read_message(await _read_frame(mallory_bob, bob_frames))
        if substitute == "static key":  # Bob's identity and signature, Mallory's static key
            forged = bob_payload
        else:  # Bob's identity key, Mallory's signature over her static key
            sig = parse_handshake_payload(encode_handshake_payload(MALLORY, to_alice.static_public)).identity_sig
            forged = bytes.fromhex("0a24080112 20".replace(" ", "")) + BOB.public_key + b"\x12\x40" + sig
        await mallory_alice.send_all(encode_frame(to_alice.write_message(forged)))
        with trio.move_on_after(60):
            await trio.sleep_forever()

    async def alice() -> None:
        try:
            outcome["alice"] = await secure_outbound(alice_end, ALICE, BOB.peer_id)
        except HandshakeError as exc:
            outcome["alice"] = exc

    async def bob() -> None:
        try:
            outcome["bob"] = await secure_inbound(bob_end, BOB)
        except HandshakeError as exc:
            outcome["bob"] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mallory)
        nursery.start_soon(alice)
        nursery.start_soon(bob)
    assert isinstance(outcome["alice"], InvalidHandshakePayloadError)
    assert "does not sign this Noise static key" in str(outcome["alice"])
    assert isinstance(outcome["bob"], HandshakeError) and "timed out" in str(outcome["bob"])
    await _assert_closed(alice_end)
    await _assert_closed(bob_end)


async def test_dialer_replaying_alices_message_3_payload_is_rejected(autojump_clock: trio.testing.MockClock) -> None:
    """Alice dials Mallory (as she may); Mallory then dials Bob with Alice's payload and her own static key."""
    alice_end, mallory_listener = trio.testing.memory_stream_pair()
    mallory_dialer, bob_end = trio.testing.memory_stream_pair()
    captured: dict[str, bytes] = {}

    async def mallory_answers_alice() -> None:
        noise = HandshakeState(initiator=False, protocol_name=PROTOCOL_NAME)
        decoder = FrameDecoder()
        noise.read_message(await _read_frame(mallory_listener, decoder))
        payload = encode_handshake_payload(MALLORY, noise.static_public)
        await mallory_listener.send_all(encode_frame(noise.write_message(payload)))
        captured["alice"] = noise.read_message(await _read_frame(mallory_listener, decoder))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mallory_answers_alice)
        alice_channel = await secure_outbound(alice_end, ALICE, MALLORY.peer_id)
    assert alice_channel.remote_peer == MALLORY.peer_id
    assert parse_handshake_payload(captured["alice"]).peer_id == ALICE.peer_id

    async def mallory_dials_bob_as_alice() -> None:
        noise = HandshakeState(initiator=True, protocol_name=PROTOCOL_NAME)  # a static key of her own
        decoder = FrameDecoder()
        await mallory_dialer.send_all(encode_frame(noise.write_message(b"")))
        noise.read_message(await _read_frame(mallory_dialer, decoder))
        await mallory_dialer.send_all(encode_frame(noise.write_message(captured["alice"])))
        assert await mallory_dialer.receive_some() == b"", "Bob must close the connection"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mallory_dials_bob_as_alice)
        start = trio.current_time()
        with pytest.raises(HandshakeError) as info:
            await secure_inbound(bob_end, BOB)
        assert trio.current_time() == start, "refused at once, not by the timeout"
    assert isinstance(info.value, InvalidHandshakePayloadError)
    assert f"identity_sig of {ALICE.peer_id} does not sign this Noise static key" in str(info.value)
    await _assert_closed(bob_end)


async def test_silent_responder_times_out_and_closes(autojump_clock: trio.testing.MockClock) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()

    async def silent_server() -> None:
        await _read_frame(server_end, FrameDecoder())  # message 1, then nothing
        assert await server_end.receive_some() == b"", "the dialer must close the stream after its timeout"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent_server)
        start = trio.current_time()
        with pytest.raises(HandshakeError, match=r"timed out after 10 s \(at message 2\)"):
            await secure_outbound(client_end, ALICE, BOB.peer_id)
        assert trio.current_time() - start == pytest.approx(10)
    await _assert_closed(client_end)


async def test_silent_initiator_times_out(autojump_clock: trio.testing.MockClock) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    with pytest.raises(HandshakeError, match=r"timed out after 2.5 s \(at message 1\)"):
        await secure_inbound(server_end, BOB, timeout=2.5)
    await _assert_closed(server_end)
    assert await client_end.receive_some() == b""


async def test_truncated_message_2_times_out(autojump_clock: trio.testing.MockClock) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()

    async def half_server() -> None:
        message1 = await _read_frame(server_end, FrameDecoder())
        responder = NoiseHandshake(BOB, initiator=False)
        responder.read_message(message1)
        frame = encode_frame(responder.write_message())
        await server_end.send_all(frame[: len(frame) // 2])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(half_server)
        with pytest.raises(HandshakeError, match="timed out"):
            await secure_outbound(client_end, ALICE, BOB.peer_id)
    await _assert_closed(client_end)


@pytest.mark.parametrize("announced", [33, 0xFFFF])
async def test_impossible_handshake_frame_length_is_refused_at_once(
    autojump_clock: trio.testing.MockClock, announced: int
) -> None:
    """A header announcing more than message 1 can hold is refused without waiting for the body (or the timeout)."""
    client_end, server_end = trio.testing.memory_stream_pair()
    await client_end.send_all(announced.to_bytes(2, "big") + bytes(40))
    with pytest.raises(HandshakeError, match=f"message 1: the frame announces {announced} bytes, at most 32"):
        await secure_inbound(server_end, BOB, timeout=30)
    assert trio.current_time() == 0
    await _assert_closed(server_end)
    assert await client_end.receive_some() == b""


async def test_peer_closing_mid_handshake(autojump_clock: trio.testing.MockClock) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()

    async def quitter() -> None:
        await _read_frame(server_end, FrameDecoder())
        await server_end.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(quitter)
        with pytest.raises(HandshakeError, match="peer closed the connection before handshake message 2"):
            await secure_outbound(client_end, ALICE, BOB.peer_id)
    assert trio.current_time() < 10, "a closed connection must fail at once, not at the timeout"
    await _assert_closed(client_end)


async def test_broken_stream_during_handshake(autojump_clock: trio.testing.MockClock) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    await server_end.aclose()
    with pytest.raises(HandshakeError, match="broke during handshake message 1"):
        await secure_outbound(client_end, ALICE, BOB.peer_id)
    await _assert_closed(client_end)


async def test_cancelled_handshake_closes_the_stream(autojump_clock: trio.testing.MockClock) -> None:
    client_end, _server_end = trio.testing.memory_stream_pair()
    with trio.move_on_after(1) as scope:
        await secure_outbound(client_end, ALICE, BOB.peer_id)
    assert scope.cancelled_caught
    await _assert_closed(client_end)


async def test_bad_timeout_is_refused() -> None:
    client_end, _ = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="timeout"):
        await secure_outbound(client_end, ALICE, BOB.peer_id, timeout=0)


# ------------------------------------------------------------------------------------------------- transport


async def _established() -> tuple[SecureChannel, SecureChannel]:
    client_end, server_end = trio.testing.memory_stream_pair()
    out: dict[str, SecureChannel] = {}

    async def client() -> None:
        out["client"] = await secure_outbound(client_end, ALICE, BOB.peer_id)

    async def server() -> None:
        out["server"] = await secure_inbound(server_end, BOB)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        nursery.start_soon(server)
    return out["client"], out["server"]


async def _captured(client: SecureChannel, server: SecureChannel, *messages: bytes) -> list[bytes]:
    """Alice sends each message; the attacker takes the encoded frames off the wire before Bob reads them."""
    frames = []
    decoder = FrameDecoder()
    for message in messages:
        await client.send_all(message)
        frames.append(encode_frame(await _read_frame(server.transport_stream, decoder)))
    return frames


async def _inject(client: SecureChannel, data: bytes) -> None:
    await client.transport_stream.send_all(data)


async def _expect_channel_error(server: SecureChannel, match: str, *, cut: bool | None = False) -> None:
    """``server`` closes with a ChannelError matching ``match``: a ChannelCutError (a cut write, no bad input) only
    with ``cut`` (either with ``None``)."""
    with pytest.raises(ChannelError, match=match) as info:
        while True:
            await server.receive_some()
    assert isinstance(info.value, RemoteProtocolError)
    if cut is not None:
        assert isinstance(info.value, ChannelCutError) is cut
    assert str(ALICE.peer_id) in str(info.value), "the error names the peer"
    with pytest.raises(trio.ClosedResourceError, match="closed after an error"):
        await server.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"reply")


@pytest.mark.parametrize("position", [2, 3, 10, -17, -1])
async def test_flipped_bit_in_a_transport_frame_closes_the_channel(position: int) -> None:
    client, server = await _established()
    (frame,) = await _captured(client, server, b"attack at dawn")
    tampered = bytearray(frame)
    tampered[position] ^= 0x80
    await _inject(client, bytes(tampered))
    await _expect_channel_error(server, "bad frame .*authentication failed at nonce 0")
    # Bob closed the connection: Alice sees the end of the stream and cannot write for long.
    assert await client.receive_some() == b""
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await client.send_all(b"x" * 1000)


@pytest.mark.parametrize("position", [0, 1])
async def test_flipped_bit_in_a_frame_length_closes_the_channel(position: int) -> None:
    client, server = await _established()
    (frame,) = await _captured(client, server, b"attack at dawn")
    tampered = bytearray(frame)
    tampered[position] ^= 0x01
    await _inject(client, bytes(tampered))
    await client.transport_stream.aclose()
    await _expect_channel_error(server, "bad frame|ended inside a frame", cut=None)


async def test_replayed_frame_is_rejected() -> None:
    client, server = await _established()
    first, second = await _captured(client, server, b"pay 10", b"pay 20")
    await _inject(client, first + second + second)
    assert await server.receive_some() == b"pay 10"
    assert await server.receive_some() == b"pay 20"
    await _expect_channel_error(server, "authentication failed at nonce 2")


async def test_replay_of_the_previous_frame_is_rejected() -> None:
    client, server = await _established()
    (first,) = await _captured(client, server, b"pay 10")
    await _inject(client, first + first)
    assert await server.receive_some() == b"pay 10"
    await _expect_channel_error(server, "nonce 1")


async def test_reordered_frames_are_rejected() -> None:
    client, server = await _established()
    first, second = await _captured(client, server, b"one", b"two")
    await _inject(client, second + first)
    await _expect_channel_error(server, "authentication failed at nonce 0")


async def test_dropped_frame_is_detected() -> None:
    client, server = await _established()
    _, second = await _captured(client, server, b"one", b"two")
    await _inject(client, second)
    await _expect_channel_error(server, "nonce 0")


async def test_reflected_frame_is_rejected() -> None:
    """Bob's own frame sent back to him: the two directions use different keys."""
    client, server = await _established()
    await server.send_all(b"from bob")
    reflected = encode_frame(await _read_frame(client.transport_stream, FrameDecoder()))
    await _inject(client, reflected)
    await _expect_channel_error(server, "authentication failed")


async def test_frame_from_another_session_is_rejected() -> None:
    client, server = await _established()
    other_client, other_server = await _established()
    (spliced,) = await _captured(other_client, other_server, b"from another session")
    await _inject(client, spliced)
    await _expect_channel_error(server, "authentication failed")


async def test_stream_ending_inside_a_frame() -> None:
    client, server = await _established()
    (frame,) = await _captured(client, server, b"cut short")
    await _inject(client, frame[:10])
    await client.transport_stream.aclose()
    await _expect_channel_error(server, r"ended inside a frame \(8 of 25 bytes\)", cut=True)


async def test_frame_shorter_than_a_tag() -> None:
    client, server = await _established()
    await _inject(client, encode_frame(b"short"))
    await _expect_channel_error(server, "shorter than the 16-byte tag")


async def test_empty_frames_are_skipped_but_not_without_end() -> None:
    """An empty frame is valid and carries nothing; a peer sending them on and on (each costs a decryption) breaks
    the channel once more than MAX_EMPTY_FRAMES come in a row."""
    client, server = await _established()
    empty = [encode_frame(client._encrypt(b"", b"")) for _ in range(MAX_EMPTY_FRAMES)]
    await _inject(client, b"".join(empty) + encode_frame(client._encrypt(b"", b"data")))
    assert await server.receive_some() == b"data"  # a few in a row: skipped
    await _inject(client, b"".join(encode_frame(client._encrypt(b"", b"")) for _ in range(MAX_EMPTY_FRAMES + 1)))
    await _expect_channel_error(server, "empty frames in a row")


async def test_work_done_counts_transport_reads_and_decryptions() -> None:
    """A frame trickled in byte by byte costs one transport read per byte: work_done says so, so that a caller can
    pace a peer by the work it causes rather than by what it delivers."""
    client, server = await _established()
    frame = encode_frame(client._encrypt(b"", b"slow"))
    before = server.work_done
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _receive_into(server, got))
        for index in range(len(frame)):
            await trio.testing.wait_all_tasks_blocked()
            await _inject(client, frame[index : index + 1])
    assert got == [b"slow"]
    assert server.work_done - before == len(frame) + 1  # a read per byte, and one decryption


async def _receive_into(channel: SecureChannel, out: list[bytes]) -> None:
    out.append(await channel.receive_some())

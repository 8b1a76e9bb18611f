"""SecureChannel as a trio Stream: the generic stream checks, batching, buffering, limits."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmsg.crypto.libp2p_noise import FrameDecoder, NoiseHandshake, encode_frame
from p2pmsg.crypto.noise import MAX_NONCE, MAX_PLAINTEXT_LEN, NoiseTransport
from p2pmsg.identity import Identity
from p2pmsg.net.channel import (
    SEND_BATCH_BYTES,
    ChannelError,
    SecureChannel,
    secure_inbound,
    secure_outbound,
)

ALICE = Identity.from_seed(bytes([0xA1]) * 32)
BOB = Identity.from_seed(bytes([0xB0]) * 32)


async def secure_pair(
    client_stream: trio.abc.Stream, server_stream: trio.abc.Stream
) -> tuple[SecureChannel, SecureChannel]:
    """Run both handshakes concurrently and return (Alice's channel to Bob, Bob's channel to Alice)."""
    channels: dict[str, SecureChannel] = {}

    async def outbound() -> None:
        channels["client"] = await secure_outbound(client_stream, ALICE, BOB.peer_id)

    async def inbound() -> None:
        channels["server"] = await secure_inbound(server_stream, BOB)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbound)
        nursery.start_soon(inbound)
    return channels["client"], channels["server"]


async def memory_secure_pair() -> tuple[SecureChannel, SecureChannel]:
    return await secure_pair(*trio.testing.memory_stream_pair())


async def lockstep_secure_pair() -> tuple[SecureChannel, SecureChannel]:
    return await secure_pair(*trio.testing.lockstep_stream_pair())


class RecordingStream(trio.abc.Stream):
    """A real pass-through stream that records the size of every underlying send_all."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _raw_pair() -> tuple[NoiseTransport, SecureChannel, trio.abc.SendStream, NoiseTransport]:
    """A sans-IO handshake, then Bob's SecureChannel over a memory stream whose far end the test writes raw frames to.

    Returns (Alice's transport, Bob's channel, the raw stream into Bob, Bob's transport).
    """
    alice = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    bob = NoiseHandshake(BOB, initiator=False)
    bob.read_message(alice.write_message())
    alice.read_message(bob.write_message())
    bob.read_message(alice.write_message())
    raw, bob_stream = trio.testing.memory_stream_pair()
    bob_result = bob.result()
    channel = SecureChannel(bob_stream, bob_result, local_peer=BOB.peer_id)
    return alice.result().transport, channel, raw, bob_result.transport


# --------------------------------------------------------------------------------------------- generic checks


async def test_check_two_way_stream_memory_and_lockstep() -> None:
    await trio.testing.check_two_way_stream(memory_secure_pair, lockstep_secure_pair)


async def test_handshake_results_on_both_ends() -> None:
    client, server = await memory_secure_pair()
    assert client.remote_peer == BOB.peer_id and client.local_peer == ALICE.peer_id
    assert server.remote_peer == ALICE.peer_id and server.local_peer == BOB.peer_id
    assert client.handshake_hash == server.handshake_hash and len(client.handshake_hash) == 32
    assert str(BOB.peer_id) in repr(client)
    await client.aclose()
    await server.aclose()


# ------------------------------------------------------------------------------------------ framing, batching


async def test_64k_write_is_one_underlying_send_of_maximal_frames() -> None:
    a, b = trio.testing.memory_stream_pair()
    recorder = RecordingStream(a)
    client, server = await secure_pair(recorder, b)
    recorder.writes.clear()
    data = bytes(range(256)) * 256  # 64 KiB
    await client.send_all(data)
    assert len(recorder.writes) == 1, "one send_all of 64 KiB must be one underlying write"
    decoder = FrameDecoder()
    decoder.feed(recorder.writes[0])
    sizes = []
    while (frame := decoder.next_frame()) is not None:
        sizes.append(len(frame))
    assert sizes == [65535, len(data) - MAX_PLAINTEXT_LEN + 16], "frames must be maximal"
    got = bytearray()
    while len(got) < len(data):
        got += await server.receive_some()
    assert got == data
    await client.aclose()
    await server.aclose()


async def test_huge_write_is_batched_in_bounded_underlying_writes() -> None:
    a, b = trio.testing.memory_stream_pair()
    recorder = RecordingStream(a)
    client, server = await secure_pair(recorder, b)
    recorder.writes.clear()
    data = bytes(2 * SEND_BATCH_BYTES + 5)

    async def receive_all() -> bytes:
        got = bytearray()
        while len(got) < len(data):
            got += await server.receive_some()
        return bytes(got)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, memoryview(data))
        assert await receive_all() == data
    assert len(recorder.writes) == 3
    assert all(len(w) <= 16 * 65537 for w in recorder.writes)


async def test_receive_some_respects_max_bytes_and_buffers_the_rest() -> None:
    client, server = await memory_secure_pair()
    data = bytes(i % 251 for i in range(100_000))
    await client.send_all(bytearray(data))
    got = bytearray()
    while len(got) < len(data):
        chunk = await server.receive_some(777)
        assert 0 < len(chunk) <= 777
        got += chunk
    assert got == data
    await client.aclose()
    assert await server.receive_some(10) == b""
    assert await server.receive_some(10) == b"", "end of stream stays end of stream"
    await server.aclose()


async def test_identical_plaintexts_give_different_frames() -> None:
    a, b = trio.testing.memory_stream_pair()
    recorder = RecordingStream(a)
    client, server = await secure_pair(recorder, b)
    recorder.writes.clear()
    await client.send_all(b"same")
    await client.send_all(b"same")
    assert recorder.writes[0] != recorder.writes[1]
    assert b"same" not in b"".join(recorder.writes)
    assert await server.receive_some() == b"same"
    assert await server.receive_some() == b"same"


async def test_frames_buffered_after_the_handshake_are_not_lost() -> None:
    """Alice may write right after message 3; Bob can receive message 3 and data in one read."""
    a, b = trio.testing.memory_stream_pair()
    channels: dict[str, SecureChannel] = {}

    async def outbound() -> None:
        channels["client"] = chan = await secure_outbound(a, ALICE, BOB.peer_id)
        await chan.send_all(b"early bird")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbound)
        await trio.testing.wait_all_tasks_blocked()
        channels["server"] = await secure_inbound(b, BOB)
    assert await channels["server"].receive_some() == b"early bird"


async def test_empty_frames_are_skipped() -> None:
    alice, channel, raw, _ = _raw_pair()
    await raw.send_all(encode_frame(alice.encrypt(b"")) + encode_frame(alice.encrypt(b"x")))
    assert await channel.receive_some() == b"x"


async def test_concurrent_senders_and_receivers_are_refused() -> None:
    client, server = await lockstep_secure_pair()
    errors: list[BaseException] = []

    async def send() -> None:
        try:
            await client.send_all(b"one")
        except trio.BusyResourceError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        assert len(errors) == 1 and "already sending" in str(errors[0])
        assert await server.receive_some() == b"one"
    await client.aclose()
    await server.aclose()


def _channel_over_lockstep() -> tuple[SecureChannel, trio.abc.Stream, NoiseTransport]:
    """Alice's channel over a lockstep stream (every send_all blocks until the far end has read all of it).

    Returns (Alice's channel, the raw far end, Bob's transport).
    """
    alice = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    bob = NoiseHandshake(BOB, initiator=False)
    bob.read_message(alice.write_message())
    alice.read_message(bob.write_message())
    bob.read_message(alice.write_message())
    alice_stream, raw = trio.testing.lockstep_stream_pair()
    return SecureChannel(alice_stream, alice.result(), local_peer=ALICE.peer_id), raw, bob.result().transport


async def test_send_cancelled_mid_write_refuses_further_sends(autojump_clock: trio.testing.MockClock) -> None:
    channel, raw, _ = _channel_over_lockstep()
    received = bytearray()

    async def read_a_little() -> None:
        received.extend(await raw.receive_some(1000))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_a_little)
        with trio.move_on_after(5) as scope:
            await channel.send_all(b"x" * 100_000)  # the far end reads 1000 bytes, then stops: the write blocks
    assert scope.cancelled_caught, "the write must have been blocked, then cancelled"
    assert 0 < len(received) < 100_000, "the write was cut part-way: the peer holds part of a frame"
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError, match=r"did not complete.*gap"):
        await channel.send_all(b"more")
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await channel.send_all(b"and more")


async def test_send_cancelled_before_writing_leaves_the_channel_usable() -> None:
    channel, raw, bob = _channel_over_lockstep()
    with trio.CancelScope() as scope:
        scope.cancel()
        await channel.send_all(b"never sent")
    assert scope.cancelled_caught
    decoder = FrameDecoder()

    async def read_one_frame() -> None:
        while (frame := decoder.next_frame()) is None:
            decoder.feed(await raw.receive_some())
        assert bob.decrypt(frame) == b"still fine", "nothing was encrypted by the cancelled send (nonce 0 unused)"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_one_frame)
        await channel.send_all(b"still fine")


async def test_send_nonce_exhaustion_closes_the_channel() -> None:
    alice_hs = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    bob_hs = NoiseHandshake(BOB, initiator=False)
    bob_hs.read_message(alice_hs.write_message())
    alice_hs.read_message(bob_hs.write_message())
    bob_hs.read_message(alice_hs.write_message())
    a_result, b_result = alice_hs.result(), bob_hs.result()
    a_result.transport.send_cipher.set_nonce(MAX_NONCE - 1)
    b_result.transport.recv_cipher.set_nonce(MAX_NONCE - 1)
    a, b = trio.testing.memory_stream_pair()
    client = SecureChannel(a, a_result, local_peer=ALICE.peer_id)
    server = SecureChannel(b, b_result, local_peer=BOB.peer_id)
    await client.send_all(b"the last message")
    assert await server.receive_some() == b"the last message"
    try:
        await client.send_all(b"one too many")
    except ChannelError as exc:
        assert "send nonce exhausted" in str(exc)
    else:
        raise AssertionError("sending past the nonce limit must fail")
    try:
        await client.send_all(b"again")
    except trio.ClosedResourceError as exc:
        assert "nonce exhausted" in str(exc)
    else:
        raise AssertionError("the channel must stay closed")
    assert await server.receive_some() == b"", "the peer sees the connection end"


async def test_receive_nonce_exhaustion_closes_the_channel() -> None:
    alice, channel, raw, bob = _raw_pair()
    alice.send_cipher.set_nonce(MAX_NONCE - 1)
    bob.recv_cipher.set_nonce(MAX_NONCE - 1)
    await raw.send_all(encode_frame(alice.encrypt(b"last")) + encode_frame(b"\x00" * 20))
    assert await channel.receive_some() == b"last"
    try:
        await channel.receive_some()
    except ChannelError as exc:
        assert "receive nonce exhausted" in str(exc)
    else:
        raise AssertionError("receiving past the nonce limit must fail")


@settings(max_examples=25, deadline=None)
@given(
    writes=st.lists(st.integers(min_value=0, max_value=150_000), min_size=1, max_size=5),
    read_size=st.one_of(st.none(), st.integers(min_value=1, max_value=70_000)),
)
def test_any_write_and_read_sizes_roundtrip(writes: list[int], read_size: int | None) -> None:
    async def main() -> None:
        client, server = await memory_secure_pair()
        payload = [bytes([n % 256]) * n for n in writes]
        expected = b"".join(payload)

        async def sender() -> None:
            for chunk in payload:
                await client.send_all(chunk)
            await client.aclose()

        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while chunk := await server.receive_some(read_size):
                assert read_size is None or len(chunk) <= read_size
                got += chunk
        assert got == expected
        await server.aclose()

    trio.run(main)

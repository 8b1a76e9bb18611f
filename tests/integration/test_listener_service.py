"""Listener over real loopback TCP and WebSocket: hand-off, counters, limits, handler errors, shutdown."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

import pytest
import trio

from p2pmsg.errors import LocalProtocolError
from p2pmsg.identity import Identity
from p2pmsg.net.channel import SecureChannel
from p2pmsg.net.dialer import DialError, dial
from p2pmsg.net.listener import Listener, ListenerConfig, ListenerStats
from p2pmsg.net.transport import TransportError, open_stream
from p2pmsg.net.websocket import WS_SMALL_FRAME_BURST, WebSocketStream
from p2pmsg.wire.multiaddr import Multiaddr

ALICE = Identity.from_seed(bytes([0xA1]) * 32)
BOB = Identity.from_seed(bytes([0xB0]) * 32)
LOCAL_TCP = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")
LOCAL_WS = Multiaddr.parse("/ip4/127.0.0.1/tcp/0/ws")


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def wait_for(predicate: object, what: str) -> None:
    """Poll a condition (bounded: at most 5 s)."""
    assert callable(predicate)
    with trio.fail_after(5):
        while not predicate():
            await trio.sleep(0.005)


async def read_exactly(channel: trio.abc.Stream, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = await channel.receive_some()
        assert chunk, "unexpected end of stream"
        got += chunk
    return got


class Recorder:
    """A handler that echoes and records who connected from where."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Multiaddr | None]] = []
        self.release = trio.Event()

    async def echo(self, channel: SecureChannel, remote: Multiaddr | None) -> None:
        self.seen.append((str(channel.remote_peer), remote))
        while data := await channel.receive_some():
            await channel.send_all(data)

    async def hold(self, channel: SecureChannel, remote: Multiaddr | None) -> None:
        self.seen.append((str(channel.remote_peer), remote))
        await self.release.wait()


async def test_tcp_and_ws_hand_off_channels_and_count(nursery: trio.Nursery) -> None:
    recorder = Recorder()
    listener = Listener(BOB, recorder.echo, ListenerConfig(handshake_timeout=5))
    tcp_addr, ws_addr = await nursery.start(listener.run, [LOCAL_TCP, LOCAL_WS])
    assert listener.listen_addrs == (tcp_addr, ws_addr)
    assert str(ws_addr).endswith("/ws")
    for addr in (tcp_addr, ws_addr):
        channel = await dial(ALICE, BOB.peer_id, [addr], timeout=5, nursery=nursery)
        await channel.send_all(b"ping " + str(addr).encode())
        assert await read_exactly(channel, 5 + len(str(addr))) == b"ping " + str(addr).encode()
        await channel.aclose()
    await wait_for(lambda: listener.stats.active == 0, "connections closed")
    stats = listener.stats
    assert (stats.accepted, stats.authenticated, stats.handshaking) == (2, 2, 0)
    assert stats.handshake_failures == stats.handshake_timeouts == stats.handler_errors == 0
    assert [peer for peer, _ in recorder.seen] == [str(ALICE.peer_id)] * 2
    tcp_remote, ws_remote = (remote for _, remote in recorder.seen)
    assert tcp_remote is not None and tcp_remote.transport()[:2] == ("tcp", "127.0.0.1")
    assert ws_remote is not None and ws_remote.transport()[:2] == ("ws", "127.0.0.1")
    assert stats.as_dict()["authenticated"] == 2
    # stats is a snapshot: mutating it does not touch the listener.
    stats.accepted = 99
    assert listener.stats.accepted == 2


async def test_a_handler_that_returns_ends_the_stream_cleanly_on_tcp_and_websocket(nursery: trio.Nursery) -> None:
    """The dialer reads what the handler wrote, then a clean end of stream: over WebSocket the listener sends its
    Close frame (1000) while the connection's reader still runs, so the dialer does not see an abnormal 1006."""

    async def say_bye(channel: SecureChannel, remote: Multiaddr | None) -> None:
        await channel.send_all(b"bye")

    listener = Listener(BOB, say_bye, ListenerConfig(handshake_timeout=5))
    for addr in await nursery.start(listener.run, [LOCAL_TCP, LOCAL_WS]):
        channel = await dial(ALICE, BOB.peer_id, [addr], timeout=5, nursery=nursery)
        with trio.fail_after(5):
            assert await read_exactly(channel, 3) == b"bye"
            assert await channel.receive_some() == b"", f"no clean end of stream over {addr}"
        await channel.aclose()


async def test_handler_error_is_logged_counted_and_closes_only_that_channel(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def flaky(channel: SecureChannel, remote: Multiaddr | None) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        await Recorder().echo(channel, remote)

    listener = Listener(BOB, flaky, ListenerConfig(handshake_timeout=5))
    (addr,) = await nursery.start(listener.run, [LOCAL_TCP])
    first = await dial(ALICE, BOB.peer_id, [addr], timeout=5)
    with trio.fail_after(5):
        assert await first.receive_some() == b""  # the listener closed it after the handler failed
    await first.aclose()
    second = await dial(ALICE, BOB.peer_id, [addr], timeout=5)
    await second.send_all(b"still serving")
    assert await read_exactly(second, 13) == b"still serving"
    await second.aclose()
    await wait_for(lambda: listener.stats.active == 0, "connections closed")
    assert listener.stats.handler_errors == 1
    assert any("handler bug" in (r.exc_text or "") or r.exc_info for r in caplog.records if r.levelno >= logging.ERROR)


async def test_max_connections_closes_extra_connections_at_once(nursery: trio.Nursery) -> None:
    recorder = Recorder()
    listener = Listener(BOB, recorder.hold, ListenerConfig(handshake_timeout=5, max_connections=1))
    (addr,) = await nursery.start(listener.run, [LOCAL_TCP])
    held = await dial(ALICE, BOB.peer_id, [addr], timeout=5)
    with pytest.raises(DialError) as info:
        await dial(ALICE, BOB.peer_id, [addr], timeout=5)
    assert "HandshakeError" in info.value.failures[0].reason
    assert listener.stats.rejected_overload == 1
    recorder.release.set()
    with trio.fail_after(5):
        assert await held.receive_some() == b""
    await held.aclose()
    await wait_for(lambda: listener.stats.active == 0, "connections closed")
    # Capacity is back.
    again = await dial(ALICE, BOB.peer_id, [addr], timeout=5)
    await again.aclose()


async def test_handshake_slots_bound_concurrency_but_waiters_get_through(nursery: trio.Nursery) -> None:
    """One handshake slot, held by a silent connection: a good client waits, then succeeds once it is dropped."""
    recorder = Recorder()
    config = ListenerConfig(handshake_timeout=1.0, max_concurrent_handshakes=1)
    listener = Listener(BOB, recorder.echo, config)
    (addr,) = await nursery.start(listener.run, [LOCAL_TCP])
    silent = await open_stream(addr, timeout=5)
    await wait_for(lambda: listener.stats.handshaking == 1, "the silent connection holds the slot")
    # The good client's own deadline runs from its accept: give it some margin past the silent one's (it is counted
    # at accept now, before its task even starts, so without this the two deadlines could fall together).
    await trio.sleep(0.3)
    results: list[SecureChannel] = []

    async def good_client() -> None:
        results.append(await dial(ALICE, BOB.peer_id, [addr], timeout=5))

    nursery.start_soon(good_client)
    await wait_for(lambda: listener.stats.handshaking == 2, "the good client is waiting")
    assert not results  # it cannot run its handshake while the slot is taken
    await wait_for(lambda: bool(results), "the good client got through after the silent one timed out")
    assert listener.stats.handshake_timeouts == 1
    assert listener.stats.authenticated == 1
    await results[0].aclose()
    await silent.aclose()


async def test_stop_closes_everything_and_frees_the_ports(nursery: trio.Nursery) -> None:
    recorder = Recorder()
    listener = Listener(BOB, recorder.hold, ListenerConfig(handshake_timeout=30))
    with trio.fail_after(5):
        async with trio.open_nursery() as owner:  # exits only once run() has returned
            tcp_addr, ws_addr = await owner.start(listener.run, [LOCAL_TCP, LOCAL_WS])
            established = await dial(ALICE, BOB.peer_id, [ws_addr], timeout=5, nursery=nursery)
            await wait_for(lambda: len(recorder.seen) == 1, "handler running")
            half_open = await open_stream(tcp_addr, timeout=5)  # sits in its handshake
            await wait_for(lambda: listener.stats.handshaking == 1, "handshake pending")
            assert listener.stats.active == 2
            listener.stop()
    stats = listener.stats
    assert (stats.active, stats.handshaking) == (0, 0)
    assert listener.listen_addrs == ()
    with trio.fail_after(5):
        # The handler's channel was closed under it: the client learns it as EOF or as a broken stream.
        with contextlib.suppress(trio.BrokenResourceError):
            assert await established.receive_some() == b""
        assert await half_open.receive_some() == b""
    await established.aclose()
    await half_open.aclose()
    for addr in (tcp_addr, ws_addr):
        with pytest.raises(TransportError):
            await open_stream(addr, timeout=5, nursery=nursery)
    listener.stop()  # stopping a stopped listener is harmless


async def test_cancelling_the_owner_nursery_closes_connections() -> None:
    recorder = Recorder()
    listener = Listener(BOB, recorder.hold, ListenerConfig(handshake_timeout=30))
    async with trio.open_nursery() as outer:
        (addr,) = await outer.start(listener.run, [LOCAL_TCP])
        channel = await dial(ALICE, BOB.peer_id, [addr], timeout=5)
        await wait_for(lambda: len(recorder.seen) == 1, "handler running")
        outer.cancel_scope.cancel()
    assert listener.stats.active == 0
    with trio.fail_after(5):
        with contextlib.suppress(trio.BrokenResourceError):
            assert await channel.receive_some() == b""
    await channel.aclose()
    with pytest.raises(TransportError):
        await open_stream(addr, timeout=5)


async def test_bad_configuration_and_addresses(nursery: trio.Nursery) -> None:
    with pytest.raises(LocalProtocolError, match="handshake_timeout"):
        ListenerConfig(handshake_timeout=0)
    with pytest.raises(LocalProtocolError, match="max_concurrent_handshakes"):
        ListenerConfig(max_concurrent_handshakes=0)
    with pytest.raises(LocalProtocolError, match="max_connections"):
        ListenerConfig(max_connections=0)
    listener = Listener(BOB, Recorder().echo)
    with pytest.raises(TransportError, match="needs an ip4 or ip6"):
        await nursery.start(listener.run, [Multiaddr.parse("/dns4/localhost/tcp/0")])
    with pytest.raises(LocalProtocolError, match="at least one"):
        await listener.run([])
    assert isinstance(listener.stats, ListenerStats)


async def test_one_ip_address_cannot_take_every_connection_slot(nursery: trio.Nursery) -> None:
    """Connections from one address beyond max_connections_per_ip are closed at once; the others' slots stay free."""
    recorder = Recorder()
    listener = Listener(BOB, recorder.hold, ListenerConfig(handshake_timeout=5, max_connections_per_ip=3))
    [addr] = await nursery.start(listener.run, [LOCAL_TCP])
    _, host, port = addr.transport()
    stalled = [await trio.open_tcp_stream(host, port) for _ in range(5)]  # never start a handshake
    await wait_for(lambda: listener.stats.accepted == 5, "five accepted")
    assert listener.stats.rejected_overload == 2 and listener.stats.active == 3
    for stream in stalled:  # the two refused ones were closed by the listener at once
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()
    await wait_for(lambda: listener.stats.active == 0, "the stalled ones closed")
    channel = await dial(ALICE, BOB.peer_id, [addr], timeout=5, nursery=nursery)  # room again
    await wait_for(lambda: len(recorder.seen) == 1, "a handshake after the others left")
    await channel.aclose()
    recorder.release.set()


async def test_one_source_cannot_start_handshakes_faster_than_its_bucket(nursery: trio.Nursery) -> None:
    """A source that starts more connections than handshake_burst_per_ip gets the rest closed at once, before any
    handshake work, and counted as rejected_rate; the bucket refills at handshake_rate_per_ip."""
    recorder = Recorder()
    config = ListenerConfig(
        handshake_timeout=5, handshake_burst_per_ip=3, handshake_rate_per_ip=0.5, limit_loopback=True
    )
    listener = Listener(BOB, recorder.echo, config)
    [addr] = await nursery.start(listener.run, [LOCAL_TCP])
    _, host, port = addr.transport()
    opened = [await trio.open_tcp_stream(host, port) for _ in range(5)]  # never start a handshake
    await wait_for(lambda: listener.stats.accepted == 5, "five accepted")
    assert listener.stats.rejected_rate == 2 and listener.stats.active == 3
    with trio.fail_after(5):  # a refused one was closed by the listener: end of stream, not a stall
        assert await opened[-1].receive_some() == b""
    for stream in opened:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()
    await wait_for(lambda: listener.stats.active == 0, "the opened ones closed")
    with pytest.raises(DialError):  # the bucket is still empty: no handshake, even for a good client
        await dial(ALICE, BOB.peer_id, [addr], timeout=5, nursery=nursery)
    assert listener.stats.rejected_rate == 3 and listener.stats.authenticated == 0
    await trio.sleep(2.2)  # 0.5 a second: one token back
    channel = await dial(ALICE, BOB.peer_id, [addr], timeout=5, nursery=nursery)
    await channel.send_all(b"ping")
    assert await read_exactly(channel, 4) == b"ping"
    await channel.aclose()


def test_handshake_bucket_parameters_are_checked() -> None:
    with pytest.raises(LocalProtocolError):
        ListenerConfig(handshake_rate_per_ip=0)
    with pytest.raises(LocalProtocolError):
        ListenerConfig(handshake_rate_per_ip=float("inf"))
    with pytest.raises(LocalProtocolError):
        ListenerConfig(handshake_burst_per_ip=0)


async def test_loopback_sources_are_not_charged_unless_asked(nursery: trio.Nursery) -> None:
    """Nodes of one machine talk over loopback: by default it is not rate limited (the connection cap still holds)."""
    recorder = Recorder()
    config = ListenerConfig(handshake_timeout=5, handshake_burst_per_ip=2, handshake_rate_per_ip=0.01)
    listener = Listener(BOB, recorder.echo, config)
    [addr] = await nursery.start(listener.run, [LOCAL_TCP])
    for _ in range(4):
        channel = await dial(ALICE, BOB.peer_id, [addr], timeout=5, nursery=nursery)
        await channel.aclose()
    assert listener.stats.rejected_rate == 0 and listener.stats.authenticated == 4


async def test_a_websocket_frame_flood_is_cut_off_and_the_budget_is_the_sources(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Empty WebSocket messages beyond the source's small-frame budget break the connection before trio-websocket
    parses them.  The budget is the source's, shared by its connections: two floods that each fit a budget of
    their own (5,000 frames against a burst of 8,192) cannot both pass."""
    caplog.set_level(logging.INFO, logger="p2pmsg.net.listener")
    listener = Listener(BOB, Recorder().echo, ListenerConfig(handshake_timeout=5, limit_loopback=True))
    [addr] = await nursery.start(listener.run, [LOCAL_WS])
    _, host, port = addr.transport()
    upgrade = (
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    flood = b"\x82\x80\x01\x02\x03\x04" * 5000  # masked empty messages (the stream skips them): 30 KB
    streams = []
    with trio.fail_after(5):
        for _ in range(2):
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(upgrade)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some()
            assert answer.startswith(b"HTTP/1.1 101")
            streams.append(stream)
        for stream in streams:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(flood)
    await wait_for(
        lambda: any("small WebSocket frames" in record.getMessage() for record in caplog.records), "one dropped"
    )
    assert listener.stats.rejected_frames == 1 and listener.stats.handshake_failures == 0  # counted as what it was
    assert sum("small WebSocket frames" in record.getMessage() for record in caplog.records) == 1
    for stream in streams:
        await stream.aclose()


async def test_a_frame_flood_after_the_handshake_is_counted_as_rejected_frames(nursery: trio.Nursery) -> None:
    """An authenticated peer that floods empty WebSocket messages (our stream skips them, so the Noise stream
    stays intact) loses its connection, counted as rejected_frames."""
    recorder = Recorder()
    listener = Listener(BOB, recorder.echo, ListenerConfig(handshake_timeout=5, limit_loopback=True))
    [addr] = await nursery.start(listener.run, [LOCAL_WS])
    with trio.fail_after(10):
        channel = await dial(ALICE, BOB.peer_id, [addr], timeout=5, nursery=nursery)
        await channel.send_all(b"ping")
        assert await read_exactly(channel, 4) == b"ping"
        ws = channel.transport_stream
        assert isinstance(ws, WebSocketStream)
        with contextlib.suppress(trio.BrokenResourceError):  # masked empty messages, written under the WebSocket
            await ws.transport_stream.send_all(b"\x82\x80\x01\x02\x03\x04" * (2 * WS_SMALL_FRAME_BURST))
    await wait_for(lambda: listener.stats.rejected_frames == 1, "the flood dropped")
    assert listener.stats.authenticated == 1 and listener.stats.handshake_failures == 0
    await channel.aclose()


async def _three_from_each_of_eight(port: int) -> list[trio.SocketStream]:
    """Three connections from each of eight addresses of one /24 and /16 (127.0.0.2-9: loopback on Linux)."""
    return [
        await trio.open_tcp_stream("127.0.0.1", port, local_address=f"127.0.0.{host}")
        for host in range(2, 10)
        for _ in range(3)
    ]


@pytest.mark.parametrize(
    ("config", "admitted"),
    [
        (ListenerConfig(handshake_burst_per_ip=2, handshake_rate_per_ip=0.01, limit_loopback=True), 8),
        (ListenerConfig(handshake_burst_total=3, handshake_rate_total=0.01, limit_loopback=True), 3 + 1),
    ],
    ids=["per-24", "everyone"],
)
async def test_many_sources_are_held_by_the_wider_buckets(
    nursery: trio.Nursery, config: ListenerConfig, admitted: int
) -> None:
    """Eight addresses of one /24 (127.0.0.2-9, all loopback on Linux), three connections each: a source's own
    bucket admits two of them, but the /24's (four times a source's) admits eight in all; and a bucket for everyone
    together holds any number of sources (after its three, one more from the reserve for quiet networks: their /16
    had started only three connections so far)."""
    listener = Listener(BOB, Recorder().hold, dataclasses.replace(config, handshake_timeout=5))
    [addr] = await nursery.start(listener.run, [LOCAL_TCP])
    port = addr.transport()[2]
    opened = await _three_from_each_of_eight(port)
    await wait_for(lambda: listener.stats.accepted == 24, "24 accepted")
    assert listener.stats.active == admitted and listener.stats.rejected_rate == 24 - admitted
    # Refused by a wider bucket, a source kept its own tokens (nothing is taken unless every bucket can pay).
    assert listener._handshake_rate.would_allow("127.0.0.9/32", trio.current_time(), cost=2.0)
    for stream in opened:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()


async def test_a_familiar_address_gets_past_the_drained_wider_buckets(nursery: trio.Nursery) -> None:
    """A flood drains the bucket of everyone together; an address a contact recently connected from still gets a
    handshake (charged to its own bucket only), so contacts are not locked out with the flood."""
    config = ListenerConfig(
        handshake_burst_total=2, handshake_rate_total=0.01, limit_loopback=True, handshake_timeout=5
    )
    recorder = Recorder()
    listener = Listener(BOB, recorder.echo, config, familiar=lambda ip: ip == "127.0.0.20")
    [addr] = await nursery.start(listener.run, [LOCAL_TCP])
    port = addr.transport()[2]
    flood = [await trio.open_tcp_stream("127.0.0.1", port, local_address=f"127.0.0.{h}") for h in range(2, 14)]
    await wait_for(lambda: listener.stats.accepted == 12, "the flood accepted")
    # Two from everyone's bucket, one from the reserve; then their /16 is no longer quiet.
    assert listener.stats.rejected_rate == 9
    familiar = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.20")
    stranger = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.21")
    await wait_for(lambda: listener.stats.accepted == 14, "both accepted")
    assert listener.stats.rejected_rate == 10 and listener.stats.active == 4  # the familiar one got through
    for stream in [*flood, familiar, stranger]:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()


async def test_a_quiet_network_gets_past_a_flood_from_another_through_the_reserve(nursery: trio.Nursery) -> None:
    """A flood from one /16 empties everyone's bucket and, as every connection counts, its own network's quiet
    bucket: it gets nothing from the reserve.  Sources in other /16s (127.1.0.2, ...: loopback on Linux) that had
    been quiet draw from the reserve (a quarter of everyone's burst: two here) until it too is spent."""
    config = ListenerConfig(
        handshake_burst_total=8, handshake_rate_total=0.01, limit_loopback=True, handshake_timeout=5
    )
    listener = Listener(BOB, Recorder().hold, config)
    [addr] = await nursery.start(listener.run, [LOCAL_TCP])
    port = addr.transport()[2]
    opened = await _three_from_each_of_eight(port)
    await wait_for(lambda: listener.stats.accepted == 24, "the flood accepted")
    assert listener.stats.active == 8 and listener.stats.rejected_rate == 16
    for network in (1, 2, 3):
        opened.append(await trio.open_tcp_stream("127.0.0.1", port, local_address=f"127.{network}.0.2"))
    await wait_for(lambda: listener.stats.accepted == 27, "the quiet ones accepted")
    assert listener.stats.active == 8 + 2 and listener.stats.rejected_rate == 16 + 1
    for stream in opened:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()

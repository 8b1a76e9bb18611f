"""dial(): racing candidate addresses against real loopback listeners; promptness checked with a frozen MockClock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from p2pmsg.errors import LocalProtocolError
from p2pmsg.identity import Identity
from p2pmsg.net.channel import PeerIdMismatchError, SecureChannel
from p2pmsg.net.dialer import MAX_DIAL_ADDRESSES, DialError, dial
from p2pmsg.net.listener import Listener, ListenerConfig
from p2pmsg.net.transport import TransportError, open_listeners
from p2pmsg.wire.multiaddr import Multiaddr

ALICE = Identity.from_seed(bytes([0xA1]) * 32)
BOB = Identity.from_seed(bytes([0xB0]) * 32)
MALLORY = Identity.from_seed(bytes([0x3A]) * 32)
LOCAL_TCP = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")
LOCAL_WS = Multiaddr.parse("/ip4/127.0.0.1/tcp/0/ws")


async def echo(channel: SecureChannel, remote: Multiaddr | None) -> None:
    while data := await channel.receive_some():
        await channel.send_all(data)


async def start_listener(
    nursery: trio.Nursery, identity: Identity, addrs: list[Multiaddr], timeout: float = 5.0
) -> tuple[Listener, tuple[Multiaddr, ...]]:
    listener = Listener(identity, echo, ListenerConfig(handshake_timeout=timeout))
    bound: tuple[Multiaddr, ...] = await nursery.start(listener.run, addrs)
    return listener, bound


@dataclass
class StallServer:
    """Accepts TCP connections and never says a word; records them so tests can see them closed."""

    addr: Multiaddr
    accepted: list[trio.SocketStream] = field(default_factory=list)
    ended: list[bytes] = field(default_factory=list)  # what each connection sent before it ended

    async def serve(self, listener: trio.SocketListener) -> None:
        async with listener, trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                self.accepted.append(stream)
                nursery.start_soon(self._drain, stream)

    async def _drain(self, stream: trio.SocketStream) -> None:
        received = b""
        async with stream:
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass
        self.ended.append(received)


async def start_stall_server(nursery: trio.Nursery, ws: bool = False) -> StallServer:
    (bound,) = await open_listeners([LOCAL_WS if ws else LOCAL_TCP])
    server = StallServer(bound.addr)
    nursery.start_soon(server.serve, bound.listener)
    return server


async def dead_address() -> Multiaddr:
    (bound,) = await open_listeners([LOCAL_TCP])
    await bound.listener.aclose()
    return bound.addr


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def roundtrip(channel: SecureChannel, data: bytes) -> None:
    await channel.send_all(data)
    got = b""
    while len(got) < len(data):
        got += await channel.receive_some()
    assert got == data


async def test_one_good_address_among_dead_wrong_and_stalling(nursery: trio.Nursery) -> None:
    _, (bob_addr,) = await start_listener(nursery, BOB, [LOCAL_TCP])
    _, (mallory_addr,) = await start_listener(nursery, MALLORY, [LOCAL_TCP])
    stall = await start_stall_server(nursery)
    dead = await dead_address()
    addrs = [dead, mallory_addr, stall.addr, bob_addr]
    with trio.fail_after(10):
        channel = await dial(ALICE, BOB.peer_id, addrs, timeout=5)
    async with channel:
        assert channel.remote_peer == BOB.peer_id
        await roundtrip(channel, b"hello bob")
        # The losing attempt against the silent server was cancelled and its connection closed.
        with trio.fail_after(5):
            while not stall.ended:
                await trio.sleep(0.01)
        assert len(stall.accepted) == 1
        assert stall.ended[0].startswith(b"\x00\x20")  # it had sent handshake message 1, then gave up


async def test_success_first_returns_without_any_timer_firing(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """Frozen clock: if dial waited for a stagger or timeout after the success, time would have to move."""
    mock_clock.autojump_threshold = 1.0  # only a genuinely stuck test (real seconds) lets time move
    _, (bob_addr,) = await start_listener(nursery, BOB, [LOCAL_TCP])
    stall = await start_stall_server(nursery)
    start = trio.current_time()
    channel = await dial(ALICE, BOB.peer_id, [bob_addr, stall.addr], timeout=5)
    assert trio.current_time() == start
    assert stall.accepted == []  # the second attempt never started
    await roundtrip(channel, b"x")
    await channel.aclose()


async def test_failure_starts_the_next_attempt_at_once(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 1.0
    _, (bob_addr,) = await start_listener(nursery, BOB, [LOCAL_TCP])
    _, (mallory_addr,) = await start_listener(nursery, MALLORY, [LOCAL_TCP])
    dead = await dead_address()
    start = trio.current_time()
    channel = await dial(ALICE, BOB.peer_id, [dead, mallory_addr, bob_addr], timeout=5)
    assert trio.current_time() == start  # no stagger was waited: each failure started the next attempt
    assert channel.remote_peer == BOB.peer_id
    await channel.aclose()


async def test_stalled_first_attempt_costs_exactly_one_stagger(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0.5
    _, (bob_addr,) = await start_listener(nursery, BOB, [LOCAL_TCP])
    stall = await start_stall_server(nursery)
    start = trio.current_time()
    channel = await dial(ALICE, BOB.peer_id, [stall.addr, bob_addr], timeout=5, stagger=0.25)
    assert trio.current_time() - start == pytest.approx(0.25)
    await roundtrip(channel, b"late but fine")
    await channel.aclose()
    with trio.fail_after(5):
        while not stall.ended:
            await trio.sleep(0.01)  # the stalled attempt was cancelled and closed


async def test_all_fail_lists_every_address_with_its_reason(nursery: trio.Nursery) -> None:
    _, (mallory_addr,) = await start_listener(nursery, MALLORY, [LOCAL_TCP])
    dead = await dead_address()
    other = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/9/p2p/{MALLORY.peer_id}")
    udp = Multiaddr.parse("/ip4/127.0.0.1/udp/9")
    named = (await dead_address()).with_peer_id(BOB.peer_id)
    with trio.fail_after(10), pytest.raises(DialError) as info:
        await dial(ALICE, BOB.peer_id, [dead, mallory_addr, other, udp, named], timeout=5)
    error = info.value
    assert error.peer_id == BOB.peer_id
    reasons = {str(failure.addr): failure for failure in error.failures}
    assert set(reasons) == {str(dead), str(mallory_addr), str(other), str(udp), str(named)}
    assert isinstance(reasons[str(dead)].error, TransportError)
    assert isinstance(reasons[str(mallory_addr)].error, PeerIdMismatchError)
    assert "PeerIdMismatchError" in reasons[str(mallory_addr)].reason
    assert "names another peer" in reasons[str(other)].reason
    assert "only /tcp" in reasons[str(udp)].reason
    for addr in (dead, mallory_addr, other, udp, named):  # the peer's own /p2p/<id> is left out: named once, up front
        shown = addr.without_peer_id() if addr.peer_id == BOB.peer_id else addr
        assert f"{shown}: " in str(error)
    assert f"/p2p/{BOB.peer_id}" not in str(error)


async def test_a_bare_peer_id_address_is_a_dial_error() -> None:
    bare = Multiaddr.parse(f"/p2p/{BOB.peer_id}")  # no transport: refused, and named in a DialError
    with trio.fail_after(5), pytest.raises(DialError, match="could not reach"):
        await dial(ALICE, BOB.peer_id, [bare], timeout=1)


async def test_timeout_reports_stalled_and_untried_addresses(nursery: trio.Nursery) -> None:
    stall_1 = await start_stall_server(nursery)
    stall_2 = await start_stall_server(nursery)
    with trio.fail_after(10), pytest.raises(DialError) as info:
        await dial(ALICE, BOB.peer_id, [stall_1.addr, stall_2.addr], timeout=0.2, stagger=1.0)
    first, second = info.value.failures
    assert first.addr == stall_1.addr
    assert "timed out" in first.reason
    assert second.addr == stall_2.addr
    assert "not tried" in second.reason
    with trio.fail_after(5):
        while not stall_1.ended:
            await trio.sleep(0.01)
    assert stall_2.accepted == []


async def test_websocket_address(nursery: trio.Nursery) -> None:
    _, (bob_ws,) = await start_listener(nursery, BOB, [LOCAL_WS])
    with trio.fail_after(10):
        channel = await dial(ALICE, BOB.peer_id, [bob_ws.with_peer_id(BOB.peer_id)], timeout=5, nursery=nursery)
    await roundtrip(channel, b"via websocket" * 1000)
    await channel.aclose()


async def test_websocket_without_nursery_is_reported() -> None:
    with pytest.raises(DialError) as info:
        await dial(ALICE, BOB.peer_id, [Multiaddr.parse("/ip4/127.0.0.1/tcp/9/ws")], timeout=1)
    assert isinstance(info.value.failures[0].error, LocalProtocolError)


async def test_duplicates_are_tried_once_and_excess_addresses_are_not_tried() -> None:
    dead = await dead_address()
    addrs = [dead, dead.with_peer_id(BOB.peer_id)] + [dead] * MAX_DIAL_ADDRESSES
    with pytest.raises(DialError) as info:
        await dial(ALICE, BOB.peer_id, addrs, timeout=5)
    failures = info.value.failures
    assert sum(1 for f in failures if "not tried: only" in f.reason) == 2
    assert len(failures) == 3


async def test_no_addresses_and_bad_arguments() -> None:
    with pytest.raises(DialError, match="no addresses"):
        await dial(ALICE, BOB.peer_id, [], timeout=1)
    with pytest.raises(LocalProtocolError, match="timeout"):
        await dial(ALICE, BOB.peer_id, [], timeout=float("inf"))
    with pytest.raises(LocalProtocolError, match="stagger"):
        await dial(ALICE, BOB.peer_id, [], stagger=-1)


async def test_caller_cancellation_leaves_nothing_open(nursery: trio.Nursery) -> None:
    stall = await start_stall_server(nursery)
    with trio.move_on_after(0.2) as scope:
        await dial(ALICE, BOB.peer_id, [stall.addr], timeout=5)
    assert scope.cancelled_caught
    with trio.fail_after(5):
        while not stall.ended:
            await trio.sleep(0.01)

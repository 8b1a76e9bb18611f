"""The trio UDP service, on real sockets on 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from p2pmsg.dht.core.contact import distance
from p2pmsg.dht.core.engine import DhtConfig
from p2pmsg.dht.core.errors import DhtUsageError
from p2pmsg.dht.service import DhtNode, open_dht_node
from p2pmsg.identity import Identity

FAST = DhtConfig(rpc_timeout=0.5, stall_timeout=0.2)


def ident(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"service-%d" % n).digest())


@asynccontextmanager
async def network(count: int, config: DhtConfig = FAST) -> AsyncIterator[list[DhtNode]]:
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(open_dht_node(ident(i), config=config)) for i in range(count)]
        for i, node in enumerate(nodes[1:], start=1):
            await node.bootstrap([nodes[j].address for j in range(max(0, i - 3), i)])
        for node in nodes:
            await node.find_node(node.node_id)
        yield nodes


async def test_two_nodes_find_and_verify_each_other() -> None:
    async with open_dht_node(ident(1), config=FAST) as a, open_dht_node(ident(2), config=FAST) as b:
        assert await a.ping(b.address) == b.node_id
        assert await b.bootstrap([a.address, b.address]) == 1  # its own address is skipped, not pinged
        assert b.stats["timeouts"] == 0 and b.stats["malformed"] == 0
        with trio.fail_after(5):
            while not (
                any(a.is_verified(c) for c in a.routing_table_snapshot())
                and any(b.is_verified(c) for c in b.routing_table_snapshot())
            ):
                await trio.sleep(0.01)
        assert [c.node_id for c in a.routing_table_snapshot()] == [b.node_id]
        assert a.engine.verified_peer(b.node_id) == b.peer_id
        assert b.engine.verified_peer(a.node_id) == a.peer_id


async def test_set_get_find_node_and_peer_records_over_udp() -> None:
    async with network(10) as nodes:
        stored = await nodes[2].set("greeting", "hello")
        assert stored == 9  # every other node answered true
        for node in nodes:
            assert await node.get("greeting") == "hello"
        assert await nodes[5].get("absent") is None
        target = hashlib.sha1(b"somewhere").digest()
        found = await nodes[7].find_node(target)
        expected = sorted((n.node_id for n in nodes if n is not nodes[7]), key=lambda i: distance(i, target))
        assert [c.node_id for c in found] == expected
        published = await nodes[3].publish_peer_record(["/ip4/127.0.0.1/tcp/4001"], seq=5)
        assert published >= 9
        record = await nodes[8].find_peer(nodes[3].peer_id)
        assert record is not None and record.seq == 5 and record.addrs == ("/ip4/127.0.0.1/tcp/4001",)
        assert await nodes[8].find_peer(ident(99).peer_id) is None
        await nodes[3].publish_peer_record(["/ip4/127.0.0.1/tcp/4002"])  # seq: now, far above 5
        record = await nodes[1].find_peer(nodes[3].peer_id)
        assert record is not None and record.addrs == ("/ip4/127.0.0.1/tcp/4002",)


async def test_a_silent_peer_costs_one_timeout_and_set_counts_only_real_stores() -> None:
    async with network(4) as nodes:
        silent = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with silent:
            await silent.bind(("127.0.0.1", 0))
            start = trio.current_time()
            assert await nodes[0].ping(silent.getsockname()) is None
            assert trio.current_time() - start >= FAST.rpc_timeout
            # The other nodes are still reachable, and a set reports how many STOREs succeeded.
            assert await nodes[0].set("k", 1) == 3


async def test_garbage_datagrams_do_not_hurt_the_node() -> None:
    async with open_dht_node(ident(1), config=FAST) as node, open_dht_node(ident(2), config=FAST) as other:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            for junk in (b"", b"\x00", b"\x00" * 21 + b"\xc1", b"\x01" + bytes(20) + b"\x90", b"\xff" * 3000):
                await sock.sendto(junk, node.address)
        with trio.fail_after(5):
            while node.stats["malformed"] + node.stats["unexpected_response"] < 4:
                await trio.sleep(0.01)
        assert await other.ping(node.address) == node.node_id


async def test_cancelled_operations_leave_nothing_behind() -> None:
    async with network(3) as nodes:
        silent = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with silent:
            await silent.bind(("127.0.0.1", 0))
            with trio.move_on_after(0.05):
                await nodes[0].ping(silent.getsockname())
        assert nodes[0]._waiters == {}
        assert await nodes[0].get("nothing") is None


async def test_operations_need_a_running_node() -> None:
    node = DhtNode(ident(1))
    with pytest.raises(DhtUsageError, match="not running"):
        await node.get("x")
    with pytest.raises(DhtUsageError, match="not running"):
        _ = node.address
    async with open_dht_node(ident(2)) as running:
        with pytest.raises(DhtUsageError, match="IP literals"):
            await running.ping(("localhost", 1))
        with pytest.raises(DhtUsageError, match="values must be"):
            await running.set("k", [1, 2])  # type: ignore[arg-type]


async def test_a_taken_port_is_named_in_the_error() -> None:
    """A node binds TCP, WebSocket and this UDP socket: "Address already in use" alone did not say which."""
    async with open_dht_node(ident(1)) as first:
        port = first.address[1]
        taken = pytest.RaisesExc(
            OSError,
            match=rf"cannot listen for the DHT on UDP 127\.0\.0\.1:{port}: ",
            check=lambda exc: exc.errno == errno.EADDRINUSE,
        )
        with pytest.RaisesGroup(taken, flatten_subgroups=True):
            async with open_dht_node(ident(2), port=port):
                pass


async def test_stopping_the_node_wakes_waiting_callers() -> None:
    node = DhtNode(ident(1), config=DhtConfig(rpc_timeout=30.0, stall_timeout=1.0))
    node_scope = trio.CancelScope()
    result: list[BaseException] = []

    async def run_node(task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        with node_scope:
            await node.run(task_status=task_status)

    silent = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with silent:
        await silent.bind(("127.0.0.1", 0))

        async def pinger() -> None:
            try:
                await node.ping(silent.getsockname())
            except DhtUsageError as exc:
                result.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(run_node)
                nursery.start_soon(pinger)
                await trio.sleep(0.05)
                node_scope.cancel()
    assert len(result) == 1 and "stopped" in str(result[0])


SLOW_PINGS = DhtConfig(rpc_timeout=20.0, stall_timeout=0.2)


async def test_bootstrap_does_not_wait_for_saved_nodes_that_died() -> None:
    """A restarted node pings the nodes of its saved routing table; each one that died since used to hold the join
    (and the first record publish after it) for the full rpc_timeout."""
    async with network(2, SLOW_PINGS) as nodes, open_dht_node(ident(9), config=SLOW_PINGS) as joiner:
        dead = [trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) for _ in range(3)]
        for sock in dead:
            await sock.bind(("127.0.0.1", 0))
        try:
            with trio.fail_after(SLOW_PINGS.rpc_timeout / 2):
                size = await joiner.bootstrap(
                    [dead[0].getsockname(), nodes[0].address, *(s.getsockname() for s in dead[1:])]
                )
        finally:
            for sock in dead:
                sock.close()
        assert size == 2
        assert joiner._waiters == {}
        assert {c.node_id for c in joiner.routing_table_snapshot()} == {n.node_id for n in nodes}


async def test_a_ping_answered_after_bootstrap_returned_still_adds_its_node() -> None:
    """Pings left pending when bootstrap settles go on: a slow node's late answer enters the routing table."""
    delay = 2.0
    config = DhtConfig(rpc_timeout=10.0, stall_timeout=0.2)
    async with (
        open_dht_node(ident(1), config=config) as fast,
        open_dht_node(ident(2), config=config) as slow,
        open_dht_node(ident(3), config=config) as joiner,
    ):
        relay = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with relay:
            await relay.bind(("127.0.0.1", 0))

            async def forward_later(data: bytes, to: tuple[str, int]) -> None:
                await trio.sleep(delay)
                await relay.sendto(data, to)

            async def run_relay() -> None:  # joiner <-> relay <-> slow, each datagram toward slow held back
                client: tuple[str, int] | None = None
                while True:
                    data, sender = await relay.recvfrom(65536)
                    if sender == slow.address:
                        if client is not None:
                            await relay.sendto(data, client)
                    else:
                        client = sender
                        nursery.start_soon(forward_later, data, slow.address)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_relay)
                with trio.fail_after(delay):
                    await joiner.bootstrap([fast.address, relay.getsockname()])
                assert slow.node_id not in {c.node_id for c in joiner.routing_table_snapshot()}
                with trio.fail_after(config.rpc_timeout):
                    while slow.node_id not in {c.node_id for c in joiner.routing_table_snapshot()}:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        assert joiner._waiters == {}


async def test_bootstrap_waits_for_every_ping_when_none_answers() -> None:
    async with open_dht_node(ident(1), config=FAST) as node:
        silent = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with silent:
            await silent.bind(("127.0.0.1", 0))
            assert await node.bootstrap([silent.getsockname()]) == 0
        assert node.stats["timeouts"] >= 1
        assert node._waiters == {}

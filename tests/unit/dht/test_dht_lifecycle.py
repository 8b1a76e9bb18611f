"""Lifecycle: bucket refresh, expiry of stored values, no holder ever extending a lifetime, hand-off to newcomers.

The engine-level tests run in the deterministic simulator (virtual time); the service-level ones run real UDP on
127.0.0.1 under a ``MockClock`` that jumps only once the loop has been idle for a little real time, so no datagram is
still on its way through the kernel when hours of virtual time pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import trio.testing
from dht_sim import SimNet, build_network, identity

from p2pmsg.dht.core.contact import Contact, distance, node_id_from_public_key
from p2pmsg.dht.core.engine import DhtConfig, DhtEngine, ValueMode
from p2pmsg.dht.core.errors import DhtUsageError
from p2pmsg.dht.core.events import LookupDone, StoreDone
from p2pmsg.dht.core.records import PeerRecord, peer_record_key, seal_peer_record
from p2pmsg.dht.core.storage import StorageLimits
from p2pmsg.dht.service import DhtNode, open_dht_node
from p2pmsg.identity import Identity

WALL0 = 1_700_000_000.0
#: Real seconds of idleness before the mock clock jumps to the next deadline.
IDLE = 0.02


def record_for(engine: DhtEngine, wall: float, ttl: int, seq: int = 1) -> bytes:
    peer = engine.identity.peer_id
    record = PeerRecord(peer_id=peer, addrs=("/ip4/192.0.2.1/tcp/1",), seq=seq, expires_at=int(wall) + ttl)
    return seal_peer_record(engine.identity, record)


def contact_of(net: SimNet, engine: DhtEngine) -> Contact:
    host, port = net.address_of(engine)
    return Contact(node_id=engine.node_id, host=host, port=port)


def advance(net: SimNet, until: float) -> None:
    """Run the simulated network until virtual time ``until``, even if it goes quiet earlier."""
    net.run(until=until)
    net.now = max(net.now, until)


def store_on_closest(net: SimNet, engine: DhtEngine, key: bytes, value: object) -> int:
    done = net.wait(engine, engine.lookup_nodes(key, net.now))
    assert isinstance(done, LookupDone)
    results = [net.wait(engine, engine.store(c, key, value, net.now)) for c in done.closest]
    return sum(1 for r in results if isinstance(r, StoreDone) and r.stored)


# -- expiry, and holders never extending it (simulated network, virtual time) ----------------------------------------


def test_stored_values_expire_on_their_own() -> None:
    net = SimNet()
    engine = net.add(1, config=DhtConfig(storage=StorageLimits(plain_ttl=500.0)))
    key = peer_record_key(engine.identity.peer_id)
    assert engine.store_local(key, record_for(engine, net.wall(), ttl=100), net.now)
    assert engine.store_local(b"\x01" * 20, "plain", net.now)
    assert engine.next_expiry() == pytest.approx(100.0)
    assert engine.next_deadline() is None  # no request or lookup runs: expiry is a deadline of its own
    engine.tick(99.0)
    assert len(engine.storage) == 2
    engine.tick(100.0)
    assert len(engine.storage) == 1 and engine.stats["records_expired"] == 1
    assert engine.next_expiry() == pytest.approx(500.0)
    engine.tick(500.0)
    assert len(engine.storage) == 0 and engine.stats["records_expired"] == 2
    assert engine.next_expiry() is None


def test_a_holder_storing_a_value_again_never_extends_its_lifetime() -> None:
    config = DhtConfig(storage=StorageLimits(plain_ttl=100.0))
    net = SimNet()
    holder, other = net.add(1, config=config), net.add(2, config=config)
    net.wait(other, other.ping(net.address_of(holder), net.now))
    net.run()
    signed_key = peer_record_key(other.identity.peer_id)
    record = record_for(other, net.wall(), ttl=100)
    start = net.now

    def store(key: bytes, value: object) -> bool:
        event = net.wait(other, other.store(contact_of(net, holder), key, value, net.now))
        assert isinstance(event, StoreDone)
        return event.stored

    assert store(signed_key, record) and store(b"\x05" * 20, "same") and store(b"\x06" * 20, "first")
    advance(net, start + 90)
    # 90 s later the same values arrive again (as a stock holder's hourly republish would), and a new value.
    assert store(signed_key, record) and store(b"\x05" * 20, "same") and store(b"\x06" * 20, "second")
    advance(net, start + 100.5)
    holder.tick(net.now)
    assert holder.storage.get(signed_key, net.now) is None  # the owner's signed expiry holds
    assert holder.storage.get(b"\x05" * 20, net.now) is None  # the first arrival's lifetime holds
    changed = holder.storage.get(b"\x06" * 20, net.now)  # a different value is a new write, with a new lifetime
    assert changed is not None and changed.value == "second"
    assert holder.stats["records_expired"] == 2


# -- hand-off to newcomers (simulated network) -----------------------------------------------------------------------


def _closest_newcomer(key: bytes, engines: list[DhtEngine]) -> int:
    """The index of a test identity whose node id is closer to ``key`` than every engine's."""
    best = min(distance(e.node_id, key) for e in engines)
    for n in range(1000, 3000):
        if distance(node_id_from_public_key(identity(n).public_key), key) < best:
            return n
    raise AssertionError("no identity close enough")


def _handoff_run(config: DhtConfig) -> tuple[DhtEngine, list[DhtEngine], bytes, bytes, bytes]:
    net, engines = build_network(12, config=config)
    owner = engines[3]
    key = peer_record_key(owner.identity.peer_id)
    record = record_for(owner, net.wall(), ttl=3600)
    assert store_on_closest(net, owner, key, record) == 11
    plain_key = key[:-1] + bytes([key[-1] ^ 1])  # next to the record's key: the same nodes are closest to it
    assert store_on_closest(net, owner, plain_key, "plain") == 11
    n = _closest_newcomer(key, engines)
    newcomer = net.add(n, config=config)
    net.wait(newcomer, newcomer.ping(net.address_of(engines[0]), net.now))
    net.wait(newcomer, newcomer.lookup_nodes(newcomer.node_id, net.now))
    net.run()
    return newcomer, engines, key, plain_key, record


def test_a_closer_newcomer_is_handed_the_signed_record_once_with_its_expiry() -> None:
    newcomer, engines, key, plain_key, record = _handoff_run(DhtConfig())
    held = newcomer.storage.get(key, 0.0)
    assert held is not None and held.value == record
    before = engines[0].storage.get(key, 0.0)
    assert before is not None and held.expires_at == pytest.approx(before.expires_at)  # not one second longer
    sent = sum(e.stats["handoffs_sent"] for e in engines)
    assert 1 <= sent <= 2  # the holder closest to the key hands it off, not every holder (stock: all of them)
    assert sum(e.stats["handoffs_stored"] for e in engines) == sent
    assert newcomer.storage.get(plain_key, 0.0) is None  # plain values are never handed off


def test_no_hand_off_when_disabled() -> None:
    newcomer, engines, key, _, _ = _handoff_run(DhtConfig(handoff=False))
    assert newcomer.storage.get(key, 0.0) is None
    assert sum(e.stats["handoffs_sent"] for e in engines) == 0


def test_handoff_config_is_checked() -> None:
    with pytest.raises(DhtUsageError, match="refresh_interval"):
        DhtConfig(refresh_interval=0)
    with pytest.raises(DhtUsageError, match="handoff"):
        DhtConfig(handoff_rate=0)


# -- hops and queries reported by lookups ----------------------------------------------------------------------------


# -- liveness checks (simulated network, virtual time) ---------------------------------------------------------------


def run_liveness_checks(net: SimNet, engines: list[DhtEngine], until: float, step: float = 5.0) -> None:
    """Drive the engines as the service does: run every due liveness check, let the network carry the pings."""
    while net.now < until:
        for engine in engines:
            if net.address_of(engine) not in net.dead:
                engine.check_liveness(net.now)
        advance(net, net.now + step)


def test_a_contact_that_died_leaves_every_table_after_its_liveness_checks_fail() -> None:
    config = DhtConfig(liveness_interval=300.0, liveness_retry=20.0, max_failures=3)
    net, engines = build_network(6, config=config)
    dead = engines[3]
    survivors = [e for e in engines if e is not dead]
    assert all(dead.node_id in e.table for e in survivors)
    start = net.now
    net.dead.add(net.address_of(dead))
    run_liveness_checks(net, engines, start + 250.0)
    assert all(dead.node_id in e.table for e in survivors)  # nobody asked yet: nothing is quiet for long enough
    assert sum(e.stats["liveness_checks"] for e in survivors) == 0
    run_liveness_checks(net, engines, start + 300.0 + 3 * 20.0 + 10.0)
    assert not any(dead.node_id in e.table for e in survivors)
    assert all(e.stats["liveness_evicted"] == 1 for e in survivors)
    assert all(len(e.table) == len(survivors) - 1 for e in survivors)  # the live contacts all answered and stay
    # The checks go on at a bounded rate: a contact that answers is asked about once per liveness_interval.
    checks = sum(e.stats["liveness_checks"] for e in survivors)
    run_liveness_checks(net, engines, net.now + 600.0)
    contacts = sum(len(e.table) for e in survivors)
    assert 0 < sum(e.stats["liveness_checks"] for e in survivors) - checks <= contacts * (600 // 300 + 1)
    assert all(len(e.table) == len(survivors) - 1 for e in survivors)


def test_a_liveness_check_answered_by_another_node_replaces_the_contact() -> None:
    config = DhtConfig(liveness_interval=300.0, liveness_retry=20.0)
    net, engines = build_network(4, config=config)
    gone = engines[2]
    address = net.address_of(gone)
    newcomer = net.add(250 + 2, config=config, port=address[1])  # same host and port as the one gone
    assert net.address_of(newcomer) == address and net.nodes[address] is newcomer
    watcher = engines[0]
    assert gone.node_id in watcher.table
    run_liveness_checks(net, [e for e in engines if e is not gone], net.now + 300.0 + 4 * 20.0)
    assert gone.node_id not in watcher.table
    assert watcher.table.get(newcomer.node_id) == Contact(node_id=newcomer.node_id, host=address[0], port=address[1])
    assert watcher.stats["liveness_evicted"] == 1


def test_liveness_config_is_checked() -> None:
    with pytest.raises(DhtUsageError, match="liveness"):
        DhtConfig(liveness_interval=0.0)
    with pytest.raises(DhtUsageError, match="liveness"):
        DhtConfig(rpc_timeout=2.0, liveness_retry=1.0)  # a check would go out while the last is unanswered


def test_lookups_report_hops_and_can_skip_the_local_store() -> None:
    net, engines = build_network(30)
    reader = engines[5]
    key = hashlib.sha1(b"hops").digest()
    assert store_on_closest(net, engines[9], key, "v") == 20
    assert reader.store_local(key, "v", net.now)
    local = net.wait(reader, reader.lookup_value(key, net.now))
    assert isinstance(local, LookupDone) and local.found and local.hops == 0 and local.queries == 0
    remote = net.wait(reader, reader.lookup_value(key, net.now, use_local=False))
    assert isinstance(remote, LookupDone) and remote.found and remote.value == "v"
    assert 1 <= remote.hops <= 3 and remote.queries >= remote.hops
    nodes = net.wait(reader, reader.lookup_nodes(key, net.now))
    assert isinstance(nodes, LookupDone) and 1 <= nodes.hops <= remote.queries + nodes.queries
    signed = net.wait(reader, reader.lookup_value(key, net.now, mode=ValueMode.SIGNED, use_local=False))
    assert isinstance(signed, LookupDone) and signed.record is None and signed.rejected_values >= 1


# -- the service under a mock clock: refresh, expiry, nobody republishing ----------------------------------------------


def ident(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"lifecycle-%d" % n).digest())


def mock_wall() -> float:
    return WALL0 + trio.current_time()


@asynccontextmanager
async def network(count: int, config: DhtConfig) -> AsyncIterator[list[tuple[DhtNode, trio.CancelScope]]]:
    """``count`` nodes joined in a row; each with a cancel scope that stops it silently (no goodbye on the wire)."""
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        out: list[tuple[DhtNode, trio.CancelScope]] = []
        for i in range(count):
            node = DhtNode(ident(i), config=config, wall_clock=mock_wall)
            scope = trio.CancelScope()

            async def run(
                node: DhtNode = node, scope: trio.CancelScope = scope, *, task_status: trio.TaskStatus[object]
            ) -> None:
                with scope:
                    await node.run(task_status=task_status)

            await nursery.start(run)
            out.append((node, scope))
        for i, (node, _) in enumerate(out[1:], start=1):
            await node.bootstrap([out[j][0].address for j in range(max(0, i - 2), i)])
        for node, _ in out:
            await node.find_node(node.node_id)
        try:
            yield out
        finally:
            nursery.cancel_scope.cancel()


def bucket_times(node: DhtNode) -> list[float]:
    return [b.last_touched for b in node.engine.table.buckets()]


async def test_buckets_are_refreshed_once_the_interval_passes(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = IDLE
    config = DhtConfig(rpc_timeout=0.5, stall_timeout=0.2, refresh_interval=600.0)
    async with network(5, config) as nodes:
        start = trio.current_time()
        await trio.sleep_until(start + 590)
        assert all(node.refresh_lookups == 0 for node, _ in nodes)
        await trio.sleep_until(start + 620)
        for node, _ in nodes:
            assert node.refresh_lookups >= 1
            assert min(bucket_times(node)) >= start + 590  # every bucket was looked up again
        counts = [node.refresh_lookups for node, _ in nodes]
        await trio.sleep_until(start + 1000)  # nothing is due again before the next interval
        assert [node.refresh_lookups for node, _ in nodes] == counts


async def test_refresh_evicts_a_peer_that_died_silently(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = IDLE
    config = DhtConfig(rpc_timeout=0.5, stall_timeout=0.2, refresh_interval=3600.0)  # the default interval
    async with network(5, config) as nodes:
        dead, dead_scope = nodes[2]
        dead_scope.cancel()
        await trio.sleep(1)
        survivors = [node for node, _ in nodes if node is not dead]
        assert all(dead.node_id in node.engine.table for node in survivors)  # nothing noticed: no traffic
        await trio.sleep(5 * 3600)
        assert not any(dead.node_id in node.engine.table for node in survivors)
        assert all(len(node.engine.table) == 3 for node in survivors)  # the live ones stay


async def test_liveness_checks_evict_a_peer_that_died_silently_within_minutes(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = IDLE
    config = DhtConfig(rpc_timeout=0.5, stall_timeout=0.2)  # the default liveness interval and retry
    async with network(5, config) as nodes:
        start = trio.current_time()
        dead, dead_scope = nodes[2]
        dead_scope.cancel()
        survivors = [node for node, _ in nodes if node is not dead]
        await trio.sleep_until(start + config.liveness_interval - 10)
        assert all(dead.node_id in node.engine.table for node in survivors)
        await trio.sleep_until(start + config.liveness_interval + config.max_failures * config.liveness_retry + 10)
        assert not any(dead.node_id in node.engine.table for node in survivors)
        assert all(len(node.engine.table) == 3 for node in survivors)  # the live ones answered and stay
        assert all(node.stats["liveness_evicted"] == 1 for node in survivors)
        assert all(node.refresh_lookups == 0 for node in survivors)  # the checks did it, not an hourly refresh


async def test_records_expire_everywhere_when_the_owner_stops_republishing(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = IDLE
    # No liveness checks: their pings would count as traffic through the buckets and keep refreshes from running.
    config = DhtConfig(rpc_timeout=0.5, stall_timeout=0.2, refresh_interval=3600.0, liveness_interval=1e9)
    async with network(5, config) as nodes:
        owner, owner_scope = nodes[0]
        assert await owner.publish_peer_record(["/ip4/127.0.0.1/tcp/4001"], ttl=1800) == 4
        others = [node for node, _ in nodes[1:]]
        accepted = [node.stats["stores_accepted"] for node in others]
        owner_scope.cancel()  # the owner goes away and never republishes
        record = await others[0].find_peer(owner.peer_id)
        assert record is not None
        await trio.sleep(1790)
        assert all(len(node.engine.storage) == 1 for node in others)
        await trio.sleep(3 * 3600)  # three refresh rounds later
        assert [node.stats["stores_accepted"] for node in others] == accepted  # nobody re-stored anything
        assert all(len(node.engine.storage) == 0 and node.stats["records_expired"] == 1 for node in others)
        assert sum(node.stats["handoffs_sent"] for node in others) == 0
        assert sum(node.refresh_lookups for node in others) >= 3 * len(others)
        assert await others[1].find_peer(owner.peer_id) is None


async def test_lookup_returns_the_whole_outcome() -> None:
    config = DhtConfig(rpc_timeout=0.5, stall_timeout=0.2)
    async with open_dht_node(ident(1), config=config) as a, open_dht_node(ident(2), config=config) as b:
        await b.bootstrap([a.address])
        assert await b.set("key", "value") == 1
        key = hashlib.sha1(b"key").digest()
        local = await b.lookup(key, mode=ValueMode.PLAIN)
        assert local.found and local.hops == 0
        remote = await b.lookup(key, mode=ValueMode.PLAIN, use_local=False)
        assert remote.found and remote.value == "value" and remote.hops == 1 and remote.queries == 1
        nodes = await b.lookup(key)
        assert [c.node_id for c in nodes.closest] == [a.node_id]

"""Churn in the deterministic simulator (virtual time): the sans-IO engines alone, same scenario as the system test.

50 engines join, each publishes its signed peer record as ``DhtNode.put_signed`` does (a lookup over the 2k closest,
then STOREs to ``signed_record_targets``), then 20% of them fall silent at once.  Every record of a live node must
still be found by live nodes, and dead nodes must cost a lookup about one request timeout, not one each.
"""

from __future__ import annotations

import random

from dht_sim import SimNet, build_network

from p2pmsg.dht.core.engine import DhtConfig, DhtEngine, ValueMode
from p2pmsg.dht.core.events import LookupDone, StoreDone
from p2pmsg.dht.core.records import PeerRecord, peer_record_key, seal_peer_record

COUNT = 50
CONFIG = DhtConfig(request_rate_per_ip=1e6, request_burst_per_ip=1e6)


def publish(net: SimNet, engine: DhtEngine) -> int:
    peer = engine.identity.peer_id
    key = peer_record_key(peer)
    value = seal_peer_record(
        engine.identity, PeerRecord(peer_id=peer, addrs=(), seq=1, expires_at=int(net.wall()) + 3600)
    )
    assert engine.store_local(key, value, net.now)
    done = net.wait(engine, engine.lookup_nodes(key, net.now, count=2 * engine.config.k))
    assert isinstance(done, LookupDone)
    events = [net.wait(engine, engine.store(c, key, value, net.now)) for c in engine.signed_record_targets(done)]
    return sum(1 for e in events if isinstance(e, StoreDone) and e.stored)


def find(net: SimNet, reader: DhtEngine, owner: DhtEngine) -> tuple[bool, float]:
    start = net.now
    key = peer_record_key(owner.identity.peer_id)
    done = net.wait(reader, reader.lookup_value(key, net.now, mode=ValueMode.SIGNED, use_local=False))
    assert isinstance(done, LookupDone)
    found = done.record is not None and done.record.signer == owner.identity.peer_id
    return found, net.now - start


def test_records_of_live_nodes_survive_the_sudden_loss_of_20_percent() -> None:
    net, engines = build_network(COUNT, config=CONFIG)
    assert all(publish(net, engine) >= 20 for engine in engines)
    rng = random.Random(5)
    killed = rng.sample(engines, COUNT // 5)
    for engine in killed:
        net.dead.add(net.address_of(engine))
    live = [e for e in engines if e not in killed]
    before = sum(e.stats["timeouts"] for e in live)
    results = []
    for reader in live:
        for owner in rng.sample([e for e in live if e is not reader], 2):
            results.append(find(net, reader, owner))
    found = sum(1 for ok, _ in results if ok)
    assert found >= 0.99 * len(results)
    assert sum(e.stats["timeouts"] for e in live) > before  # the dead were really met
    # Dead peers cost a lookup one request timeout plus the 0.5 s stalls that let it go on around them, never one
    # timeout per dead peer (about 8 dead nodes sit among the 2k closest of every key: 16 s if waited for in turn).
    assert max(elapsed for _, elapsed in results) <= 2 * CONFIG.rpc_timeout
    # And once a node has seen a peer time out, its next lookups skip that peer instead of waiting for it again.
    assert sum(e.stats["silent_skipped"] for e in live) > 0


def test_a_silent_peer_is_skipped_until_heard_from_again() -> None:
    net, engines = build_network(6, config=CONFIG)
    reader, silent = engines[0], engines[3]
    silent_address = net.address_of(silent)
    net.dead.add(silent_address)
    first = net.wait(reader, reader.lookup_nodes(silent.node_id, net.now))
    assert isinstance(first, LookupDone) and silent.node_id not in [c.node_id for c in first.closest]
    assert reader.stats["timeouts"] >= 1 and reader.stats["silent_skipped"] == 0
    start = net.now
    second = net.wait(reader, reader.lookup_nodes(silent.node_id, net.now))
    assert isinstance(second, LookupDone) and reader.stats["silent_skipped"] == 1
    assert net.now - start < CONFIG.stall_timeout  # not waited for again
    net.dead.discard(silent_address)  # it comes back and speaks first: it is asked again
    net.wait(silent, silent.ping(net.address_of(reader), net.now))
    third = net.wait(reader, reader.lookup_nodes(silent.node_id, net.now))
    assert isinstance(third, LookupDone) and third.closest[0].node_id == silent.node_id
    assert reader.stats["silent_skipped"] == 1

"""Regression tests for the third security review of the DHT (one section per finding)."""

from __future__ import annotations

import hashlib

import pytest

from p2pmsg.dht.core.engine import DhtConfig, DhtEngine
from p2pmsg.dht.core.errors import StoreRefusedError
from p2pmsg.dht.core.messages import PingRequest, StoreRequest, encode_request, new_message_id
from p2pmsg.dht.core.storage import RecordStore, StorageLimits
from p2pmsg.identity import Identity


def rkey(net: int, i: int) -> bytes:
    return net.to_bytes(4, "big") + i.to_bytes(16, "big")


# -- 1. signed records from throwaway identities cannot fill the signed part of the store ---------------------------


def test_signed_budget_per_network_is_lower_than_the_general_one() -> None:
    limits = StorageLimits()
    assert limits.max_signed_values_per_source * 10 < limits.max_values
    assert limits.max_signed_bytes_per_source < limits.max_bytes_per_source
    store = RecordStore(StorageLimits(max_signed_values_per_source=3, max_signed_bytes_per_source=100))
    for i in range(3):
        store.put_signed(rkey(1, i), b"r", seq=1, expires_at=1e6, source=f"203.0.113.{i}", now=0.0)
    with pytest.raises(StoreRefusedError, match=r"203\.0\.113\.0/24 already stores 3 signed records \(limit 3\)"):
        store.put_signed(rkey(1, 9), b"r", seq=1, expires_at=1e6, source="203.0.113.99", now=0.0)
    store.put_plain(rkey(1, 10), 1, source="203.0.113.99", now=0.0)  # plain values are not charged to it
    assert store.signed_usage_of("203.0.113.7") == (3, 3 * 23)
    store.put_signed(rkey(1, 1), b"r2", seq=2, expires_at=1e6, source="203.0.113.1", now=0.0)  # a newer seq fits
    with pytest.raises(StoreRefusedError, match="bytes of signed records"):
        store.put_signed(rkey(2, 0), b"x" * 90, seq=1, expires_at=1e6, source="2001:db8::1", now=0.0)


def test_a_signed_flood_from_many_networks_does_not_lock_out_an_honest_record() -> None:
    """The reviewer's flood at scale: 12 /24s fill the store with signed records up to their network budget; an
    honest record from a new network is then stored, evicting the oldest record of the largest network."""
    store = RecordStore()
    per_net = store.limits.max_signed_values_per_source
    nets = store.limits.max_values // per_net + 2  # more networks than it takes to fill the store
    assert nets >= 12
    now = 0.0
    own = rkey(999, 0)
    store.put_signed(own, b"own", seq=1, expires_at=1e9, source="local", now=now, reserved=True)
    refused = 0
    for net in range(nets):
        for i in range(per_net + 5):  # a few beyond the network's budget too
            now += 0.001
            try:
                store.put_signed(rkey(net, i), b"flood", seq=1, expires_at=1e9, source=f"10.{net}.0.{i % 250}", now=now)
            except StoreRefusedError:
                refused += 1
    assert len(store) == store.limits.max_values  # full
    # Only over-budget records are refused (a late network that is the largest churns through its own records).
    assert 0 < refused <= nets * 5
    assert store.get(own, now) is not None  # the node's own record was never evicted
    before = {net: store.signed_usage_of(f"10.{net}.0.1")[0] for net in range(nets)}
    held_before = {(net, i) for net in range(nets) for i in range(per_net + 5) if store.get(rkey(net, i), now)}
    largest = max(before.values())
    assert store.put_signed(rkey(500, 0), b"honest", seq=1, expires_at=1e9, source="198.51.100.7", now=now + 1)
    assert store.get(rkey(500, 0), now + 1) is not None
    assert store.get(own, now + 1) is not None
    after = {net: store.signed_usage_of(f"10.{net}.0.1")[0] for net in range(nets)}
    shrunk = [net for net in range(nets) if after[net] != before[net]]
    assert len(shrunk) == 1 and before[shrunk[0]] == largest and after[shrunk[0]] == largest - 1
    assert store.evicted >= 1
    # ... and the record evicted was that network's oldest.
    held_after = {(net, i) for net in range(nets) for i in range(per_net + 5) if store.get(rkey(net, i), now + 1)}
    assert held_before - held_after == {(shrunk[0], min(i for net, i in held_before if net == shrunk[0]))}


def test_eviction_never_takes_the_nodes_own_records() -> None:
    store = RecordStore(StorageLimits(max_values=3))
    store.put_signed(rkey(0, 0), b"own0", seq=1, expires_at=1e6, source="local", now=0.0, reserved=True)
    store.put_signed(rkey(0, 1), b"own1", seq=1, expires_at=1e6, source="local", now=0.0, reserved=True)
    store.put_signed(rkey(1, 0), b"a", seq=1, expires_at=1e6, source="192.0.2.1", now=1.0)
    store.put_signed(rkey(2, 0), b"b", seq=1, expires_at=1e6, source="198.51.100.1", now=2.0)  # evicts rkey(1, 0)
    assert store.get(rkey(1, 0), 2.0) is None and store.get(rkey(2, 0), 2.0) is not None
    assert store.get(rkey(0, 0), 2.0) is not None and store.get(rkey(0, 1), 2.0) is not None
    store.put_signed(rkey(0, 2), b"own2", seq=1, expires_at=1e6, source="local", now=3.0, reserved=True)
    assert len(store) == 4  # own records are exempt from the limits
    with pytest.raises(StoreRefusedError, match=r"store is full \(3 values\)"):  # evicting cannot make room
        store.put_signed(rkey(3, 0), b"c", seq=1, expires_at=1e6, source="203.0.113.1", now=4.0)
    assert store.get(rkey(2, 0), 4.0) is not None and store.evicted == 1  # nothing evicted for a refused record


# -- 2. the STORE rate is limited per source network, not per IP -----------------------------------------------------


def send(engine: DhtEngine, request: StoreRequest | PingRequest, address: tuple[str, int], now: float) -> None:
    engine.guard.mark_proven(address, now)
    engine.datagram_received(encode_request(new_message_id(bytes(12)), request), address, now)


def answers(engine: DhtEngine) -> list[tuple[bytes, tuple[str, int]]]:
    """The responses (first byte 1) among the datagrams the engine sent (it also sends requests of its own)."""
    return [(data, address) for data, address in engine.take_datagrams() if data[0] == 1]


def test_store_rate_is_per_network_and_request_rate_stays_per_ip() -> None:
    config = DhtConfig(store_rate_per_ip=1.0, store_burst_per_ip=5.0, request_rate_per_ip=1.0, request_burst_per_ip=3.0)
    engine = DhtEngine(Identity.from_seed(hashlib.sha256(b"review3-1").digest()), config=config)
    for i in range(20):  # 20 hosts of one /24, one STORE each, within one second
        store = StoreRequest(node_id=b"\x21" * 20, key=i.to_bytes(20, "big"), value=i)
        send(engine, store, (f"203.0.113.{i + 1}", 4000), 0.5)
    assert engine.stats["stores_accepted"] == 5 and engine.stats["rate_limited"] == 15
    for i in range(5):  # a host of another /24 has its own budget, and so has a /64
        send(
            engine,
            StoreRequest(node_id=b"\x22" * 20, key=bytes([1, i]) * 10, value=i),
            (f"198.51.100.{i + 1}", 4000),
            0.5,
        )
        send(
            engine,
            StoreRequest(node_id=b"\x23" * 20, key=bytes([2, i]) * 10, value=i),
            (f"2001:db8::{i + 1}", 4000),
            0.5,
        )
    assert engine.stats["stores_accepted"] == 15 and engine.stats["rate_limited"] == 15
    send(engine, StoreRequest(node_id=b"\x23" * 20, key=bytes(20), value=0), ("2001:db8::ffff", 4000), 0.5)
    assert engine.stats["rate_limited"] == 16  # another host of that /64
    assert len(engine.storage) == 15
    engine.take_datagrams()
    # Other requests are still limited per IP: 3 pings from each of 10 hosts of a fresh /24 are all answered ...
    for i in range(10):
        for port in range(3):
            send(engine, PingRequest(node_id=bytes([i + 1]) * 20), (f"192.0.2.{i + 1}", 5000 + port), 0.6)
    assert engine.stats["rate_limited"] == 16 and len(answers(engine)) == 30
    send(engine, PingRequest(node_id=b"\x01" * 20), ("192.0.2.1", 5009), 0.6)  # ... and a 4th from one host is not
    assert engine.stats["rate_limited"] == 17 and answers(engine) == []

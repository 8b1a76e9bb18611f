"""Regression tests for the second security review of the DHT (one section per finding)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import trio

from p2pmsg.dht.core.contact import Contact
from p2pmsg.dht.core.engine import DhtConfig, DhtEngine
from p2pmsg.dht.core.errors import DhtUsageError, StoreRefusedError
from p2pmsg.dht.core.messages import FindNodeRequest, StoreRequest, encode_request, new_message_id
from p2pmsg.dht.core.records import PeerRecord, peer_record_key, seal_peer_record
from p2pmsg.dht.core.storage import RecordStore, StorageLimits, source_prefix
from p2pmsg.dht.service import open_dht_node
from p2pmsg.identity import Identity

FAST = DhtConfig(rpc_timeout=0.5, stall_timeout=0.2)


def ident(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"review2-%d" % n).digest())


# -- 1. put_signed when the local store is full --------------------------------------------------------------------


async def test_publishing_into_a_full_local_store_still_publishes_and_keeps_our_record() -> None:
    tiny = dataclasses.replace(FAST, storage=StorageLimits(max_values=4, max_bytes=4000))
    async with open_dht_node(ident(1), config=tiny) as a, open_dht_node(ident(2), config=FAST) as b:
        await a.bootstrap([b.address])
        now = trio.current_time()
        for i in range(4):  # others filled a's store to the brim
            a.engine.storage.put_plain(bytes([i]) * 20, b"x" * 900, source=f"198.51.100.{i}", now=now)
        assert a.engine.store_local(b"\x09" * 20, "more", now) is False  # really full
        stored = await a.publish_peer_record(["/ip4/127.0.0.1/tcp/4001"], seq=7)
        assert stored == 1  # no DhtUsageError: b got it
        held = a.engine.storage.get(peer_record_key(a.peer_id), trio.current_time())
        assert held is not None and held.seq == 7  # our own record always fits
        record = await b.find_peer(a.peer_id)
        assert record is not None and record.seq == 7


async def test_a_local_refusal_is_not_a_usage_error_but_a_bad_record_is() -> None:
    async with open_dht_node(ident(3), config=FAST) as a, open_dht_node(ident(4), config=FAST) as b:
        await a.bootstrap([b.address])
        assert await a.publish_peer_record(["/ip4/127.0.0.1/tcp/4001"], seq=10) == 1
        # A lower seq: our own store (and b) keep seq 10; that is a refusal, not a usage error.
        assert await a.publish_peer_record(["/ip4/127.0.0.1/tcp/4002"], seq=9) == 0
        other = ident(5)
        wall = int(a._wall())
        foreign = seal_peer_record(other, PeerRecord(peer_id=other.peer_id, addrs=(), seq=1, expires_at=wall + 60))
        with pytest.raises(DhtUsageError, match=r"does not verify: .*key"):
            await a.put_signed(peer_record_key(a.peer_id), foreign)  # signed by someone else for our key
        expired = seal_peer_record(a.identity, PeerRecord(peer_id=a.peer_id, addrs=(), seq=11, expires_at=wall - 1))
        with pytest.raises(DhtUsageError, match=r"does not verify: .*expired"):
            await a.put_signed(peer_record_key(a.peer_id), expired)


# -- 2. a full store: eviction of plain values, a plain sub-budget, per-network accounting ---------------------------


def skey(i: int) -> bytes:
    return i.to_bytes(20, "big")


def test_per_source_usage_is_per_ipv4_24_and_ipv6_64() -> None:
    assert source_prefix("203.0.113.77") == "203.0.113.0/24"
    assert source_prefix("::ffff:203.0.113.77") == "203.0.113.0/24"
    assert source_prefix("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert source_prefix("local") == "local"
    store = RecordStore(StorageLimits(max_values_per_source=2))
    store.put_plain(skey(1), 1, source="203.0.113.1", now=0.0)
    store.put_plain(skey(2), 2, source="203.0.113.2", now=0.0)
    with pytest.raises(StoreRefusedError, match=r"source 203\.0\.113\.0/24 already stores 2 values"):
        store.put_plain(skey(3), 3, source="203.0.113.3", now=0.0)  # another host of the same /24
    store.put_plain(skey(3), 3, source="203.0.114.3", now=0.0)  # the next /24 is another source
    assert store.usage_of("203.0.113.200") == store.usage_of("203.0.113.0/24") == (2, 42)
    store.put_plain(skey(4), 4, source="2001:db8::1", now=0.0)
    store.put_plain(skey(5), 5, source="2001:db8::ffff:1", now=0.0)
    with pytest.raises(StoreRefusedError, match="2001:db8::/64 already stores 2"):
        store.put_plain(skey(6), 6, source="2001:db8::abcd", now=0.0)
    store.put_plain(skey(6), 6, source="2001:db8:0:1::1", now=0.0)


def test_plain_values_have_their_own_budget_and_signed_records_evict_the_oldest() -> None:
    store = RecordStore(StorageLimits(max_values=6, max_plain_values=4, max_bytes=10_000, max_plain_bytes=5000))
    for i in range(4):
        store.put_plain(skey(i), i, source=f"198.51.{i}.1", now=float(i))
    with pytest.raises(StoreRefusedError, match=r"plain values are full \(4 values\)"):
        store.put_plain(skey(9), 9, source="198.51.9.1", now=5.0)  # a plain value never evicts anything
    store.put_signed(skey(10), b"r10", seq=1, expires_at=1e6, source="192.0.2.1", now=6.0)
    store.put_signed(skey(11), b"r11", seq=1, expires_at=1e6, source="192.0.2.1", now=6.0)
    assert len(store) == 6
    assert store.put_signed(skey(12), b"r12", seq=1, expires_at=1e6, source="192.0.3.1", now=7.0)  # full: evicts
    assert store.get(skey(0), 7.0) is None and store.evicted == 1  # the oldest plain value went
    assert all(store.get(skey(i), 7.0) is not None for i in (1, 2, 3, 10, 11, 12))
    assert store.plain_usage == (3, sum(store.get(skey(i), 7.0).size for i in (1, 2, 3)))  # type: ignore[union-attr]
    # Byte limits evict too, as many plain values as it takes.
    store = RecordStore(StorageLimits(max_bytes=300, max_plain_bytes=300, max_signed_value_size=300))
    for i in range(4):
        store.put_plain(skey(i), b"p" * 40, source=f"198.51.{i}.1", now=float(i))
    store.put_signed(skey(20), b"s" * 150, seq=1, expires_at=1e6, source="192.0.2.1", now=5.0)
    assert [store.get(skey(i), 5.0) is None for i in range(4)] == [
        True,
        True,
        False,
        False,
    ]  # 4 x 62 + 173 bytes: two must go
    assert store.total_bytes <= 300


def test_signed_records_never_evict_each_other_nor_evict_for_an_over_budget_source() -> None:
    store = RecordStore(StorageLimits(max_values=3, max_values_per_source=2))
    store.put_plain(skey(1), 1, source="198.51.100.1", now=0.0)
    store.put_signed(skey(2), b"a", seq=1, expires_at=1e6, source="192.0.2.1", now=0.0)
    store.put_signed(skey(3), b"b", seq=1, expires_at=1e6, source="192.0.2.2", now=0.0)
    with pytest.raises(StoreRefusedError, match=r"192\.0\.2\.0/24 already stores 2"):
        store.put_signed(skey(4), b"c", seq=1, expires_at=1e6, source="192.0.2.3", now=0.0)
    assert store.get(skey(1), 0.0) is not None  # nothing was evicted for a refused record
    store.put_signed(skey(4), b"c", seq=1, expires_at=1e6, source="192.0.9.3", now=0.0)  # evicts the plain value
    with pytest.raises(StoreRefusedError, match=r"store is full \(3 values\)"):
        store.put_signed(skey(5), b"d", seq=1, expires_at=1e6, source="192.0.8.3", now=0.0)


def test_a_flooded_engine_still_accepts_an_honest_signed_peer_record() -> None:
    """The reviewer's fill: 20 networks send 4,000-byte plain values at 40/s, then an honest record arrives."""
    wall = 1_700_000_000.0
    limits = StorageLimits(max_bytes=2 * 1024 * 1024, max_plain_bytes=1024 * 1024, max_bytes_per_source=128 * 1024)
    engine = DhtEngine(ident(10), config=DhtConfig(storage=limits), wall_clock=lambda: wall)
    now = 0.0
    for net in range(20):
        for i in range(40):
            address = (f"203.0.{net}.{1 + i % 3}", 4000)
            now += 0.025
            engine.guard.mark_proven(address, now)
            request = StoreRequest(node_id=bytes([net, i]) * 10, key=bytes([net, i, 1]) * 6 + b"xx", value=b"v" * 4000)
            engine.datagram_received(encode_request(new_message_id(bytes(12)), request), address, now)
    for j in range(400):  # top the store up to exactly full, as the reviewer did
        gap = limits.max_bytes - engine.storage.total_bytes
        if gap <= 25:
            break
        address = (f"203.1.{j}.1", 4000)
        engine.guard.mark_proven(address, now)
        request = StoreRequest(node_id=b"\x55" * 20, key=j.to_bytes(20, "big"), value=b"v" * min(4000, gap - 23))
        engine.datagram_received(encode_request(new_message_id(bytes(12)), request), address, now)
    engine.take_datagrams()
    assert engine.storage.plain_usage[1] <= 1024 * 1024 and engine.stats["stores_accepted"] > 0
    assert all(engine.storage.usage_of(f"203.0.{net}.9")[1] <= 128 * 1024 for net in range(20))
    honest = ident(11)
    record = seal_peer_record(
        honest,
        PeerRecord(peer_id=honest.peer_id, addrs=("/ip4/198.51.100.7/tcp/4001",), seq=1, expires_at=int(wall) + 3600),
    )
    address = ("198.51.100.7", 4001)
    engine.guard.mark_proven(address, now)
    request = StoreRequest(node_id=b"\x77" * 20, key=peer_record_key(honest.peer_id), value=record)
    engine.datagram_received(encode_request(new_message_id(bytes(12)), request), address, now)
    assert engine.storage.get(peer_record_key(honest.peer_id), now) is not None


# -- 3. address-proof pings cannot exhaust the pending-request table ------------------------------------------------


def flood_engine(config: DhtConfig, sources: list[str], ports: int) -> tuple[DhtEngine, float]:
    """An engine with 5 (silent) contacts, sent a ``find_node`` from ``ports`` new ports of every source IP within
    one request timeout, as the reviewer's probe did."""
    engine = DhtEngine(ident(20), config=config)
    for i in range(5):
        engine.guard.mark_proven((f"192.0.2.{i}", 4001), 0.0)
        engine.table.observe(Contact(node_id=bytes([i + 1]) * 20, host=f"192.0.2.{i}", port=4001), 0.0)
    now = 0.0
    for port in range(10000, 10000 + ports):
        for ip in sources:
            now += 1e-5
            request = FindNodeRequest(node_id=bytes([port % 256]) * 20, key=bytes(20))
            engine.datagram_received(encode_request(new_message_id(port.to_bytes(12, "big")), request), (ip, port), now)
    engine.take_datagrams()
    return engine, now


def test_verify_pings_are_capped_per_network_and_own_lookups_still_run() -> None:
    engine, now = flood_engine(DhtConfig(), ["198.51.100.1", "198.51.100.2", "198.51.100.3"], 1400)
    assert engine.pending_requests == 8  # one /24: 8 proving pings at most
    assert engine.stats["verify_capped"] == 3 * 1400 - 8
    op = engine.lookup_value(bytes(20), now)
    sent = engine.take_datagrams()
    assert engine.stats["pending_full"] == 0
    assert len(sent) == 3 and {a for _, a in sent} < {(f"192.0.2.{i}", 4001) for i in range(5)}  # alpha queries
    for step in range(1, 40):
        engine.tick(now + step * 0.25)
    (done,) = [e for e in engine.take_events() if getattr(e, "op", None) == op]
    assert done.queries == 5 and engine.pending_requests == 0  # every contact was asked (none answers here)


def test_verify_pings_are_capped_in_all_and_the_reserve_stays_for_own_requests() -> None:
    config = DhtConfig(max_pending=64, max_verify_pending=60, reserved_pending=16, max_verify_per_source=4)
    sources = [f"203.0.{n}.1" for n in range(40)]  # 40 networks, 4 pings each would be 160
    engine, now = flood_engine(config, sources, 10)
    assert engine.pending_requests == 48  # 64 - 16 reserved: the background share is full
    assert engine.stats["pending_full"] > 0
    op = engine.lookup_value(bytes(20), now)
    assert len(engine.take_datagrams()) == 3 and engine.pending_requests == 51
    for step in range(1, 40):
        engine.tick(now + step * 0.25)
    assert engine.pending_requests == 0 and any(getattr(e, "op", None) == op for e in engine.take_events())
    engine, _ = flood_engine(DhtConfig(max_pending=64, max_verify_pending=20), sources, 10)
    assert engine.pending_requests == 20

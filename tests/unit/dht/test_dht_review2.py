"""Regression tests for the second security review of the DHT (one section per finding)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import pytest
import trio

from p2pmsg.dht.core.contact import Address, Contact
from p2pmsg.dht.core.engine import AuthState, DhtConfig, DhtEngine
from p2pmsg.dht.core.errors import DhtUsageError, MalformedMessageError, StoreRefusedError
from p2pmsg.dht.core.messages import (
    AuthRequest,
    FindNodeRequest,
    IncomingRequest,
    IncomingResponse,
    PingRequest,
    StoreRequest,
    decode_auth_address,
    decode_datagram,
    encode_auth_address,
    encode_request,
    encode_response,
    new_message_id,
)
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


def test_signed_records_never_evict_for_an_over_budget_source() -> None:
    store = RecordStore(StorageLimits(max_values=3, max_values_per_source=2))
    store.put_plain(skey(1), 1, source="198.51.100.1", now=0.0)
    store.put_signed(skey(2), b"a", seq=1, expires_at=1e6, source="192.0.2.1", now=0.0)
    store.put_signed(skey(3), b"b", seq=1, expires_at=1e6, source="192.0.2.2", now=0.0)
    with pytest.raises(StoreRefusedError, match=r"192\.0\.2\.0/24 already stores 2"):
        store.put_signed(skey(4), b"c", seq=1, expires_at=1e6, source="192.0.2.3", now=0.0)
    assert store.get(skey(1), 0.0) is not None  # nothing was evicted for a refused record
    store.put_signed(skey(4), b"c", seq=1, expires_at=1e6, source="192.0.9.3", now=0.0)  # evicts the plain value
    assert store.get(skey(1), 0.0) is None and len(store) == 3


def test_a_flooded_engine_still_accepts_an_honest_signed_peer_record() -> None:
    """The reviewer's fill: 20 networks send 4,000-byte plain values at 40/s, then an honest record arrives."""
    wall = 1_700_000_000.0
    limits = StorageLimits(max_bytes=2 * 1024 * 1024, max_plain_bytes=1024 * 1024, max_bytes_per_source=128 * 1024)
    engine = DhtEngine(ident(10), config=DhtConfig(storage=limits), wall_clock=lambda: wall)
    now = 0.0
    for net in range(20):
        for i in range(40):
            address = (f"203.{net}.{net}.{1 + i % 3}", 4000)  # 20 providers (/16), so only the store limits bind
            now += 0.025
            engine.guard.mark_proven(address, now)
            request = StoreRequest(node_id=bytes([net, i]) * 10, key=bytes([net, i, 1]) * 6 + b"xx", value=b"v" * 4000)
            engine.datagram_received(encode_request(new_message_id(bytes(12)), request), address, now)
    for j in range(400):  # top the store up to exactly full, as the reviewer did
        gap = limits.max_bytes - engine.storage.total_bytes
        if gap <= 25:
            break
        address = (f"100.{64 + j % 60}.{j // 60}.1", 4000)
        engine.guard.mark_proven(address, now)
        request = StoreRequest(node_id=b"\x55" * 20, key=j.to_bytes(20, "big"), value=b"v" * min(4000, gap - 23))
        engine.datagram_received(encode_request(new_message_id(bytes(12)), request), address, now)
    engine.take_datagrams()
    assert engine.storage.plain_usage[1] <= 1024 * 1024 and engine.stats["stores_accepted"] > 0
    assert all(engine.storage.usage_of(f"203.{net}.{net}.9")[1] <= 128 * 1024 for net in range(20))
    assert engine.storage.plain_usage[1] > 1024 * 1024 - 4096  # the flood did fill the plain budget
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


# -- 4. p2pmsg_auth proofs are bound to the path: a relayed challenge fails ----------------------------------------


def pump(engines: dict[Address, DhtEngine], now: float, nat: dict[Address, Address] | None = None) -> None:
    """Deliver datagrams between engines until all are quiet; ``nat`` maps a private address to the public one its
    datagrams appear to come from (and answers to the public address reach the private one)."""
    nat = nat or {}
    inbound = {public: private for private, public in nat.items()}
    for _ in range(100):
        moved = False
        for address, engine in list(engines.items()):
            for data, dst in engine.take_datagrams():
                dst = inbound.get(dst, dst)
                if dst in engines:
                    engines[dst].datagram_received(data, nat.get(address, address), now)
                    moved = True
        if not moved:
            return
    raise AssertionError("the engines never went quiet")


def test_a_relayed_auth_challenge_does_not_verify_the_relay() -> None:
    """The reviewer's probe: M claims H's id to V and hands V's challenge to H; H's proof names M's address."""
    v_addr, h_addr, m_addr = ("10.0.0.1", 4001), ("10.0.0.2", 4001), ("10.0.0.66", 4001)
    v = DhtEngine(ident(30), own_address=lambda peer: v_addr)
    h = DhtEngine(ident(31), own_address=lambda peer: h_addr)

    def mid() -> bytes:
        return new_message_id(os.urandom(12))

    def to(engine: DhtEngine, datagram: bytes) -> list[object]:
        engine.datagram_received(datagram, m_addr, 1.0)
        return [decode_datagram(d) for d, _ in engine.take_datagrams()]

    out = []
    for _ in range(12):  # M claims H's id to V (a few pings, so V may spend a proving ping on M's address)
        out += to(v, encode_request(mid(), PingRequest(node_id=h.node_id)))
    (verify,) = [m for m in out if isinstance(m, IncomingRequest)]
    out = to(v, encode_response(verify.msg_id, h.node_id))  # and proves its own address
    (auth,) = [m for m in out if isinstance(m, IncomingRequest) and isinstance(m.request, AuthRequest)]
    assert isinstance(auth.request, AuthRequest) and v.auth_state(h.node_id) is AuthState.IN_PROGRESS
    out = []
    for _ in range(12):  # M makes its address known to H
        out += to(h, encode_request(mid(), PingRequest(node_id=b"\x66" * 20)))
    (h_verify,) = [m for m in out if isinstance(m, IncomingRequest)]
    to(h, encode_response(h_verify.msg_id, b"\x66" * 20))
    out = to(h, encode_request(mid(), AuthRequest(node_id=v.node_id, challenge=auth.request.challenge)))
    (proof,) = [m for m in out if isinstance(m, IncomingResponse)]  # H signs -- for M's address
    to(v, encode_response(auth.msg_id, proof.body))
    assert v.auth_state(h.node_id) is AuthState.FAILED
    assert v.verified_peer(h.node_id) is None
    assert not v.is_verified(Contact(node_id=h.node_id, host=m_addr[0], port=m_addr[1]))
    assert v.stats["auth_failed"] == 1 and v.stats["peers_verified"] == 0


def test_direct_auth_still_verifies_and_a_nat_address_is_learned_from_two_networks() -> None:
    # No NAT: V knows its address, H verifies at once.
    v_addr, h_addr = ("10.0.0.1", 4001), ("10.0.0.2", 4001)
    v = DhtEngine(ident(32), own_address=lambda peer: v_addr)
    h = DhtEngine(ident(33), own_address=lambda peer: h_addr)
    h.ping(v_addr, 0.0)
    pump({v_addr: v, h_addr: h}, 0.0)
    v.ping(h_addr, 0.0)
    pump({v_addr: v, h_addr: h}, 0.0)
    assert v.verified_peer(h.node_id) == h.identity.peer_id and h.verified_peer(v.node_id) == v.identity.peer_id
    # Behind a NAT, V does not know the address peers see; proofs from two networks that agree teach it.
    private, public = ("192.168.1.5", 4001), ("198.51.100.10", 61000)
    nat = DhtEngine(ident(34))  # no own_address: a wildcard bind behind a NAT
    p1, p2, p3 = ("10.1.0.1", 4001), ("10.2.0.1", 4001), ("10.2.0.2", 4001)
    peers = {p: DhtEngine(ident(35 + i), own_address=lambda peer, p=p: p) for i, p in enumerate((p1, p2, p3))}
    engines = {private: nat, **peers}
    peers[p1].ping(public, 0.0)
    pump(engines, 0.0, {private: public})
    nat.ping(p1, 0.0)
    pump(engines, 0.0, {private: public})
    assert nat.auth_state(peers[p1].node_id) is AuthState.FAILED  # one network's word is not enough
    peers[p2].ping(public, 0.0)
    pump(engines, 0.0, {private: public})
    nat.ping(p2, 0.0)
    pump(engines, 0.0, {private: public})
    assert nat.verified_peer(peers[p2].node_id) == peers[p2].identity.peer_id
    assert nat.own_addresses() == [public]
    peers[p3].ping(public, 0.0)
    pump(engines, 0.0, {private: public})
    nat.ping(p3, 0.0)
    pump(engines, 0.0, {private: public})
    assert nat.verified_peer(peers[p3].node_id) == peers[p3].identity.peer_id  # known now: at once


def test_a_node_with_a_public_address_learns_no_other_from_votes() -> None:
    """Votes are for NAT'd nodes only: relays in two networks cannot teach a public node a second address."""
    declared, seen_as = ("1.2.3.4", 4001), ("5.6.7.8", 4001)  # e.g. two relays forwarding through 5.6.7.8
    v = DhtEngine(ident(45), own_address=lambda peer: declared)
    p1, p2 = ("10.1.0.1", 4001), ("10.2.0.1", 4001)
    peers = {p: DhtEngine(ident(46 + i), own_address=lambda peer, p=p: p) for i, p in enumerate((p1, p2))}
    engines = {declared: v, **peers}
    for address, peer in peers.items():
        peer.ping(seen_as, 0.0)
        pump(engines, 0.0, {declared: seen_as})
        v.ping(address, 0.0)
        pump(engines, 0.0, {declared: seen_as})
        assert v.auth_state(peer.node_id) is AuthState.FAILED
    assert v.own_addresses() == [] and v.stats["auth_failed"] == 2


def test_auth_proofs_sign_the_observed_address_and_old_versions_are_not_challenged() -> None:
    assert encode_auth_address(("192.0.2.9", 40000)).hex() == "04c00002099c40"
    assert encode_auth_address(("::ffff:192.0.2.9", 40000)).hex() == "04c00002099c40"
    assert encode_auth_address(("2001:db8::1", 1)).hex() == "06" + "20010db8" + "00" * 11 + "01" + "0001"
    assert decode_auth_address(bytes.fromhex("04c00002099c40")) == ("192.0.2.9", 40000)
    with pytest.raises(MalformedMessageError):
        decode_auth_address(b"\x04\x01\x02")
    v_addr, old_addr = ("10.0.0.1", 4001), ("10.0.0.7", 4001)
    v = DhtEngine(ident(40), own_address=lambda peer: v_addr)
    old_id = b"\x42" * 20
    v.ping(old_addr, 0.0)
    ((ping, _),) = v.take_datagrams()
    v.datagram_received(encode_response(ping[1:21], old_id), old_addr, 0.0)  # the old node is in the table
    v.datagram_received(encode_request(new_message_id(bytes(12), version=1), PingRequest(node_id=old_id)), old_addr, 0)
    assert [d[0] for d, _ in v.take_datagrams()] == [1]  # just the pong
    assert old_id in v.table and v.auth_state(old_id) is AuthState.ADVERTISED
    v.tick(1.0)
    assert v.take_datagrams() == []  # a version-1 peer signs relayable proofs: it is never challenged


async def test_a_wildcard_bound_node_verifies_through_the_route_address() -> None:
    async with open_dht_node(ident(41), host="0.0.0.0", config=FAST) as a, open_dht_node(ident(42), config=FAST) as b:
        await b.ping(("127.0.0.1", a.address[1]))
        await a.ping(b.address)
        with trio.fail_after(5):
            while a.engine.verified_peer(b.node_id) is None or b.engine.verified_peer(a.node_id) is None:
                await trio.sleep(0.01)


# -- 5. the record seq survives restarts and clock steps ------------------------------------------------------------


async def test_a_restarted_node_with_a_clock_stepped_back_publishes_with_min_seq() -> None:
    base = int(time.time())  # the holders check expiry against the real clock
    clock = [float(base)]

    def wall() -> float:
        return clock[0]

    owner = ident(50)
    async with open_dht_node(ident(51), config=FAST) as b, open_dht_node(ident(52), config=FAST) as c:
        await c.bootstrap([b.address])
        saved: list[int] = []

        async def seq_store(seq: int) -> None:
            saved.append(seq)

        async with open_dht_node(owner, config=FAST, wall_clock=wall) as first:
            await first.bootstrap([b.address, c.address])
            assert await first.publish_peer_record(["/ip4/127.0.0.1/tcp/4001"], seq_store=seq_store) == 2
            assert saved == [base]
        clock[0] -= 60  # restarted, and the clock stepped back a minute
        async with open_dht_node(owner, config=FAST, wall_clock=wall) as second:
            await second.bootstrap([b.address, c.address])
            # Without the saved seq the new record (seq = the earlier time) is refused everywhere...
            assert await second.publish_peer_record(["/ip4/127.0.0.1/tcp/4002"]) == 0
            # ... with it, it supersedes the old one; and a second publish in the same second still goes higher.
            assert second.next_record_seq(min_seq=saved[-1] + 1) == base + 1
            assert await second.publish_peer_record(["/ip4/127.0.0.1/tcp/4003"], min_seq=saved[-1] + 1) == 2
            assert await second.publish_peer_record(["/ip4/127.0.0.1/tcp/4004"], seq_store=seq_store) == 2
            assert saved == [base, base + 2]
        record = await b.find_peer(owner.peer_id)
        assert record is not None and record.seq == base + 2 and record.addrs == ("/ip4/127.0.0.1/tcp/4004",)


async def test_a_failing_seq_store_aborts_the_publish() -> None:
    async with open_dht_node(ident(53), config=FAST) as a, open_dht_node(ident(54), config=FAST) as b:
        await a.bootstrap([b.address])

        async def broken(seq: int) -> None:
            raise OSError("disk full")

        with pytest.raises(OSError, match="disk full"):
            await a.publish_peer_record(["/ip4/127.0.0.1/tcp/4001"], seq_store=broken)
        assert await b.find_peer(a.peer_id) is None

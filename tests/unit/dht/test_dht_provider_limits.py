"""The provider level (IPv4 /16, IPv6 /32) of the store's accounting, eviction and STORE rate limit: an attacker
holding many /24s (or /64s) of one allocation gets a few networks' worth, not one network's worth per network."""

from __future__ import annotations

import hashlib
import random

import pytest

from p2pmsg.dht.core.engine import DhtConfig, DhtEngine
from p2pmsg.dht.core.errors import DhtUsageError, StoreRefusedError
from p2pmsg.dht.core.messages import StoreRequest, encode_request, new_message_id
from p2pmsg.dht.core.storage import RecordStore, StorageLimits, StoredValue, provider_prefix
from p2pmsg.identity import Identity


def rkey(group: int, i: int) -> bytes:
    return group.to_bytes(4, "big") + i.to_bytes(16, "big")


def test_provider_prefix() -> None:
    assert provider_prefix("203.0.113.77") == "203.0.0.0/16"
    assert provider_prefix("::ffff:203.0.113.77") == "203.0.0.0/16"
    assert provider_prefix("2001:db8:1:2:3:4:5:6") == "2001:db8::/32"
    assert provider_prefix("local") == "local"


def test_provider_budgets_are_multiples_of_the_network_budgets() -> None:
    limits = StorageLimits()
    assert limits.provider_factor == 4
    assert (limits.max_values_per_provider, limits.max_bytes_per_provider) == (4_000, 4 * 1024 * 1024)
    assert (limits.max_signed_values_per_provider, limits.max_signed_bytes_per_provider) == (1_000, 1024 * 1024)
    with pytest.raises(DhtUsageError, match="provider_factor"):
        StorageLimits(provider_factor=0)


def test_an_attacker_over_many_networks_of_one_provider_cannot_evict_honest_peers() -> None:
    """A full store: 20 honest peers in 20 other /16s hold 5 records each, an attacker in 200 /24s of one /16 holds
    the rest.  The attacker then sends one record from each of its 200 networks (and another round): the honest
    records all stay; the attacker only churns its own.  Under the old policy (the largest /24 first) every new
    attacker record evicted an honest one, since each attacker network held fewer than an honest network."""
    limits = StorageLimits(max_values=120, max_signed_values_per_source=10)  # 40 signed records per provider
    store = RecordStore(limits)
    now = 0.0
    own = rkey(999, 0)
    store.put_signed(own, b"own", seq=1, expires_at=1e9, source="local", now=now, reserved=True)
    honest = [rkey(peer, i) for peer in range(20) for i in range(5)]
    for peer in range(20):
        for i in range(5):
            now += 0.001
            store.put_signed(rkey(peer, i), b"honest", seq=1, expires_at=1e9, source=f"{100 + peer}.1.2.3", now=now)
    refused = 0
    for round_ in range(2):
        for net in range(200):
            now += 0.001
            source = f"198.18.{net}.{1 + round_}"
            try:
                store.put_signed(rkey(1000 + net, round_), b"flood", seq=1, expires_at=1e9, source=source, now=now)
            except StoreRefusedError:
                refused += 1
    assert refused == 0  # the attacker's records are taken (at the cost of its own older ones), not refused
    assert len(store) == limits.max_values  # full (the node's own record counts, but is never evicted)
    assert all(store.get(k, now) is not None for k in honest)
    assert store.get(own, now) is not None
    assert store.signed_provider_usage_of("198.18.7.7") == (19, 19 * 27)  # what is left beside the 100 + 1
    # The attacker's records that stay are its newest (each eviction took its provider's largest network, oldest).
    kept = {(n, r) for n in range(200) for r in range(2) if store.get(rkey(1000 + n, r), now) is not None}
    assert kept == {(n, 1) for n in range(181, 200)}
    # A newcomer in yet another /16 still gets in, again at the attacker's cost.
    store.put_signed(rkey(500, 0), b"newcomer", seq=1, expires_at=1e9, source="203.0.113.9", now=now + 1)
    assert store.get(rkey(500, 0), now + 1) is not None
    assert all(store.get(k, now + 1) is not None for k in honest)
    assert store.signed_provider_usage_of("198.18.0.1") == (18, 18 * 27)


def test_provider_budget_refuses_the_excess_of_many_networks() -> None:
    limits = StorageLimits(max_values_per_source=3, max_signed_values_per_source=2, provider_factor=2)
    store = RecordStore(limits)
    for net in range(4):  # 4 /24s of one /16, one signed record each: the provider's 4
        store.put_signed(rkey(1, net), b"r", seq=1, expires_at=1e6, source=f"192.0.{net}.1", now=0.0)
    with pytest.raises(
        StoreRefusedError, match=r"provider 192\.0\.0\.0/16 already stores 4 signed records \(limit 4\)"
    ):
        store.put_signed(rkey(1, 9), b"r", seq=1, expires_at=1e6, source="192.0.9.1", now=0.0)
    store.put_plain(rkey(2, 0), 1, source="192.0.9.1", now=0.0)  # 5 values of 6 for the provider
    store.put_plain(rkey(2, 1), 1, source="192.0.10.1", now=0.0)
    with pytest.raises(StoreRefusedError, match=r"provider 192\.0\.0\.0/16 already stores 6 values \(limit 6\)"):
        store.put_plain(rkey(2, 2), 1, source="192.0.11.1", now=0.0)
    store.put_signed(rkey(1, 0), b"r2", seq=2, expires_at=1e6, source="192.0.0.1", now=0.0)  # replacing needs no room
    store.put_signed(rkey(3, 0), b"r", seq=1, expires_at=1e6, source="192.1.0.1", now=0.0)  # another /16: its own
    assert store.provider_usage_of("192.0.200.200") == (6, 24 + 3 * 23 + 2 * 21)
    assert store.provider_usage_of("192.1.0.9") == (1, 23)
    store.remove(rkey(1, 3))
    assert store.signed_provider_usage_of("192.0.0.0") == (3, 24 + 2 * 23)
    store.put_signed(rkey(1, 9), b"r", seq=1, expires_at=1e6, source="192.0.9.1", now=0.0)  # room again


def test_ipv6_providers_are_slash_32_for_accounting_and_eviction() -> None:
    limits = StorageLimits(max_values=12, max_signed_values_per_source=2)  # 8 signed records per /32
    store = RecordStore(limits)
    for peer in range(2):  # two honest peers in their own /32s, 2 records each
        for i in range(2):
            store.put_signed(rkey(peer, i), b"honest", seq=1, expires_at=1e6, source=f"2001:db{peer}::{i + 1}", now=0.0)
    refused = 0
    for net in range(30):  # 30 /64s (even 30 /48s) of one /32, one record each
        try:
            store.put_signed(rkey(100, net), b"flood", seq=1, expires_at=1e6, source=f"2a00:1:{net}::1", now=net + 1)
        except StoreRefusedError:
            refused += 1
    assert refused == 22  # beyond the /32's 8 signed records
    assert store.signed_provider_usage_of("2a00:1:ffff::5") == (8, 8 * 27)
    assert store.signed_usage_of("2a00:1:0::1") == (1, 27)  # each /64 well inside its own budget
    assert len(store) == 12  # full
    # Newcomers from other /32s, one record each: the flooding /32 is evicted first, the honest peers stay.
    for other in range(4):
        store.put_signed(rkey(200, other), b"other", seq=1, expires_at=1e6, source=f"2a01:{other}::1", now=50.0)
    assert len(store) == 12
    assert store.signed_provider_usage_of("2a00:1::1") == (4, 4 * 27)
    assert all(store.get(rkey(peer, i), 50.0) is not None for peer in range(2) for i in range(2))
    assert [store.get(rkey(100, n), 50.0) is None for n in range(8)] == [True] * 4 + [False] * 4  # oldest first


def test_provider_accounting_stays_consistent_through_evictions_and_expiry() -> None:
    rng = random.Random(7)
    limits = StorageLimits(
        max_values=40,
        max_bytes=4000,
        max_values_per_source=8,
        max_signed_values_per_source=4,
        provider_factor=2,
        plain_ttl=20.0,
    )
    store = RecordStore(limits)
    now = 0.0
    seqs: dict[bytes, int] = {}
    for _ in range(1500):
        now += rng.random() * 0.2
        k = rkey(0, rng.randrange(120))
        source = rng.choice([f"10.{rng.randrange(3)}.{rng.randrange(4)}.1", f"2001:db8:{rng.randrange(3)}::1", "local"])
        action = rng.random()
        try:
            if action < 0.45:
                store.put_plain(k, rng.randbytes(rng.randrange(60)), source=source, now=now)
            elif action < 0.9:
                seqs[k] = seqs.get(k, 0) + 1
                value = rng.randbytes(rng.randrange(1, 40))
                store.put_signed(k, value, seq=seqs[k], expires_at=now + rng.random() * 30, source=source, now=now)
            else:
                store.remove(k)
        except StoreRefusedError:
            pass
        by_provider: dict[str, list[StoredValue]] = {}
        for v in store.items(now):
            by_provider.setdefault(provider_prefix(v.source), []).append(v)
        for mine in by_provider.values():
            signed = [v for v in mine if v.seq is not None]
            assert store.provider_usage_of(mine[0].source) == (len(mine), sum(v.size for v in mine))
            assert store.signed_provider_usage_of(mine[0].source) == (len(signed), sum(v.size for v in signed))
            assert len(mine) <= limits.max_values_per_provider and len(signed) <= limits.max_signed_values_per_provider
        assert len(by_provider) <= 7  # 3 IPv4 /16s, 3 IPv6 /32s, "local"
    assert store.evicted > 0


# -- the STORE rate limit per provider -------------------------------------------------------------------------------


def store_from(engine: DhtEngine, address: tuple[str, int], n: int, now: float) -> None:
    engine.guard.mark_proven(address, now)
    request = StoreRequest(node_id=b"\x31" * 20, key=hashlib.sha1(b"%d" % n).digest(), value=n)
    engine.datagram_received(encode_request(new_message_id(bytes(12)), request), address, now)


def test_store_rate_is_limited_per_provider_too() -> None:
    config = DhtConfig(store_rate_per_ip=1.0, store_burst_per_ip=2.0)  # provider: 4/s, burst 8
    engine = DhtEngine(Identity.from_seed(hashlib.sha256(b"provider-rate").digest()), config=config)
    n = 0
    for net in range(50):  # 50 /24s of one /16, 2 STOREs each (within each /24's burst), within one instant
        for host in range(2):
            n += 1
            store_from(engine, (f"198.18.{net}.{host + 1}", 4000), n, 0.5)
    assert engine.stats["stores_accepted"] == 8 and engine.stats["rate_limited"] == 92
    store_from(engine, ("203.0.113.5", 4000), 1000, 0.5)  # another /16 still goes through
    store_from(engine, ("2001:db8:1::1", 4000), 1001, 0.5)  # and so does an IPv6 source
    assert engine.stats["stores_accepted"] == 10
    for net in range(4):  # 4 more /64s of that /32 (4 /48s), 2 each: the 7 left of the /32's burst of 8 go through
        for host in range(2):
            store_from(engine, (f"2001:db8:{net + 2}::{host + 1}", 4000), 2000 + 2 * net + host, 0.5)
    assert engine.stats["stores_accepted"] == 17 and engine.stats["rate_limited"] == 93
    # A network over its own rate never drains its provider: 50 STOREs from one fresh /24 of a fresh /16 ...
    for i in range(50):
        store_from(engine, ("192.0.2.1", 4000), 3000 + i, 0.5)
    assert engine.stats["stores_accepted"] == 19
    for net in range(3):  # ... leave 6 of the provider's 8 for three other /24s of it
        for host in range(2):
            store_from(engine, (f"192.0.{net + 3}.{host + 1}", 4000), 4000 + 2 * net + host, 0.5)
    assert engine.stats["stores_accepted"] == 25
    # The provider's bucket refills at 4/s.
    store_from(engine, ("198.18.77.1", 4000), 5000, 0.75)
    store_from(engine, ("198.18.78.1", 4000), 5001, 0.75)
    assert engine.stats["stores_accepted"] == 26 and engine.stats["rate_limited"] == 94 + 48


def test_the_provider_limiter_is_bounded() -> None:
    engine = DhtEngine(Identity.from_seed(hashlib.sha256(b"provider-bound").digest()))
    for i in range(5000):  # 5,000 providers (/16s), one STORE each
        store_from(engine, (f"{11 + i // 256}.{i % 256}.0.1", 4000), i, 0.0)
    assert engine.stats["stores_accepted"] == 5000
    assert len(engine._store_provider_limiter) == 4096  # least recently used buckets forgotten


def test_store_provider_factor_must_be_positive() -> None:
    with pytest.raises(DhtUsageError, match="store_provider_factor"):
        DhtConfig(store_provider_factor=0.0)

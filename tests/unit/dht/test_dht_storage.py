"""The bounded record store: kinds, seq rules, global and per-source limits, expiry."""

from __future__ import annotations

import random

import pytest

from p2pmsg.dht.core.errors import DhtUsageError, StoreRefusedError
from p2pmsg.dht.core.storage import RecordStore, StorageLimits, ValueKind, value_size


def key(i: int) -> bytes:
    return i.to_bytes(20, "big")


def test_plain_values_last_writer_wins_and_expire() -> None:
    store = RecordStore(StorageLimits(plain_ttl=10.0))
    store.put_plain(key(1), "a", source="1.1.1.1", now=0.0)
    store.put_plain(key(1), b"b", source="2.2.2.2", now=1.0)
    stored = store.get(key(1), 5.0)
    assert stored is not None and stored.value == b"b" and stored.kind is ValueKind.PLAIN
    assert store.usage_of("1.1.1.1") == (0, 0)
    assert store.get(key(1), 11.0) is None
    assert len(store) == 0 and store.total_bytes == 0


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, None, 2**64, object()])
def test_only_plain_types_are_stored(value: object) -> None:
    with pytest.raises(StoreRefusedError, match="plain value must be"):
        RecordStore().put_plain(key(1), value, source="s", now=0.0)


def test_value_size_limits() -> None:
    store = RecordStore(StorageLimits(max_plain_value_size=100, max_signed_value_size=50))
    store.put_plain(key(1), b"x" * 98, source="s", now=0.0)  # 98 bytes + 2-byte bin header
    with pytest.raises(StoreRefusedError, match="over the 100-byte limit"):
        store.put_plain(key(2), b"x" * 99, source="s", now=0.0)
    with pytest.raises(StoreRefusedError, match="over the 50-byte limit"):
        store.put_signed(key(3), b"x" * 60, seq=1, expires_at=10.0, source="s", now=0.0)
    # A signed record's limit counts its own bytes, as verify_record_value does (not its msgpack header): one of
    # exactly the limit is stored, so a record its owner could seal can be held.
    store.put_signed(key(4), b"x" * 50, seq=1, expires_at=10.0, source="s", now=0.0)
    with pytest.raises(StoreRefusedError, match="signed record is 51 bytes, over the 50-byte limit"):
        store.put_signed(key(5), b"x" * 51, seq=1, expires_at=10.0, source="s", now=0.0)


def test_a_full_store_refuses_rather_than_evicts_until_values_expire() -> None:
    store = RecordStore(StorageLimits(max_values=3, plain_ttl=10.0))
    for i in range(3):
        store.put_plain(key(i), i, source=f"10.0.0.{i}", now=float(i))
    with pytest.raises(StoreRefusedError, match="store is full"):
        store.put_plain(key(9), 9, source="10.0.0.9", now=5.0)
    assert {store.get(key(i), 5.0).value for i in range(3)} == {0, 1, 2}  # type: ignore[union-attr]
    store.put_plain(key(0), 100, source="10.0.0.9", now=5.0)  # replacing does not need room
    store.put_plain(key(9), 9, source="10.0.0.9", now=11.5)  # key(1) expired at 11.0: room again
    assert store.get(key(9), 11.5) is not None


def test_byte_limit() -> None:
    store = RecordStore(StorageLimits(max_bytes=200))
    store.put_plain(key(1), b"x" * 150, source="a", now=0.0)
    with pytest.raises(StoreRefusedError, match="200 bytes"):
        store.put_plain(key(2), b"x" * 30, source="b", now=0.0)
    store.put_plain(key(2), b"x" * 5, source="b", now=0.0)  # 172 + 27 bytes fit


def test_per_source_limits_do_not_affect_other_sources() -> None:
    store = RecordStore(StorageLimits(max_values_per_source=2, max_bytes_per_source=100))
    store.put_plain(key(1), 1, source="attacker", now=0.0)
    store.put_plain(key(2), 2, source="attacker", now=0.0)
    with pytest.raises(StoreRefusedError, match="already stores 2 values"):
        store.put_plain(key(3), 3, source="attacker", now=0.0)
    store.put_plain(key(2), 22, source="attacker", now=0.0)  # its own key again: allowed
    store.put_plain(key(3), 3, source="honest", now=0.0)
    with pytest.raises(StoreRefusedError, match="bytes"):
        store.put_plain(key(4), b"x" * 90, source="honest", now=0.0)
    assert store.usage_of("attacker")[0] == 2


def test_signed_records_highest_seq_wins() -> None:
    store = RecordStore()
    assert store.put_signed(key(1), b"v5", seq=5, expires_at=100.0, source="s", now=0.0) is True
    with pytest.raises(StoreRefusedError, match="stale record"):
        store.put_signed(key(1), b"v4", seq=4, expires_at=100.0, source="s", now=1.0)
    assert store.put_signed(key(1), b"v5", seq=5, expires_at=100.0, source="t", now=1.0) is False  # refresh
    with pytest.raises(StoreRefusedError, match="conflicting record"):
        store.put_signed(key(1), b"v5-other", seq=5, expires_at=100.0, source="s", now=1.0)
    assert store.put_signed(key(1), b"v6", seq=6, expires_at=100.0, source="s", now=2.0) is True
    assert store.get(key(1), 3.0).value == b"v6"  # type: ignore[union-attr]
    with pytest.raises(StoreRefusedError, match="expired"):
        store.put_signed(key(2), b"v", seq=1, expires_at=5.0, source="s", now=5.0)


def test_signed_replaces_plain_but_never_the_reverse() -> None:
    store = RecordStore()
    store.put_plain(key(1), b"squatter", source="s", now=0.0)
    store.put_signed(key(1), b"record", seq=1, expires_at=50.0, source="t", now=0.0)
    with pytest.raises(StoreRefusedError, match="signed record"):
        store.put_plain(key(1), b"squatter", source="s", now=1.0)
    assert store.get(key(1), 1.0).kind is ValueKind.SIGNED  # type: ignore[union-attr]


def test_signed_expiry_is_capped() -> None:
    store = RecordStore(StorageLimits(max_signed_ttl=10.0))
    store.put_signed(key(1), b"r", seq=1, expires_at=1e9, source="s", now=0.0)
    assert store.get(key(1), 10.5) is None


def test_accounting_stays_consistent() -> None:
    rng = random.Random(3)
    store = RecordStore(StorageLimits(max_values=50, max_bytes=5000, max_values_per_source=20, plain_ttl=30.0))
    now = 0.0
    for _ in range(2000):
        now += rng.random()
        k = key(rng.randrange(80))
        source = f"10.0.{rng.randrange(5)}.{rng.randrange(3)}"  # 5 /24 networks
        try:
            if rng.random() < 0.8:
                store.put_plain(k, rng.randbytes(rng.randrange(120)), source=source, now=now)
            else:
                store.remove(k)
        except StoreRefusedError:
            pass
        live = list(store.items(now))
        assert len(live) <= 50
        assert store.total_bytes == sum(v.size for v in live) <= 5000
        for s in {v.source for v in live}:
            mine = [v for v in live if v.source.rsplit(".", 1)[0] == s.rsplit(".", 1)[0]]
            assert store.usage_of(s) == (len(mine), sum(v.size for v in mine))
            assert len(mine) <= 20


def test_value_size_counts_key_and_encoding() -> None:
    assert value_size(key(1), b"abc") == 20 + 5
    assert value_size(key(1), 1) == 21


def test_limits_must_be_positive() -> None:
    with pytest.raises(DhtUsageError, match="max_values"):
        StorageLimits(max_values=0)

"""The indexed choice of the signed record to evict: the same victims as a full scan, without the scan."""

from __future__ import annotations

import random

from p2pmsg.dht.core.errors import StoreRefusedError
from p2pmsg.dht.core.storage import RecordStore, StorageLimits, StoredValue


class _LoggingStore(RecordStore):
    """Records every key removed, in order (evictions, replacements, expiries, removals)."""

    def __init__(self, limits: StorageLimits) -> None:
        super().__init__(limits)
        self.removed: list[bytes] = []

    def _remove(self, key: bytes) -> None:
        self.removed.append(key)
        super()._remove(key)


class _ScanStore(_LoggingStore):
    """The reference: the choice as it was before the index, scanning every network for every victim."""

    def _fits_after_evictions(self, stored: StoredValue, existing: StoredValue | None) -> bool:
        count = len(self._values) + 1
        size = self._total + stored.size
        if existing is not None:
            count -= 1
            size -= existing.size
        count -= len(self._plain) + sum(len(keys) for keys in self._signed.values())
        size -= self._plain_bytes + sum(self._signed_bytes.values())
        if existing is not None and existing.key not in self._reserved:
            count += 1
            size += existing.size
        return count <= self.limits.max_values and size <= self.limits.max_bytes

    def _evict_signed_for(self, stored: StoredValue, existing: StoredValue | None) -> None:
        while self._global_reason(stored, existing) is not None:
            victim: bytes | None = None
            best: tuple[int, int, int, int] | None = None
            for prefix, keys in self._signed.items():
                provider = self._signed_provider[self._provider_of[prefix]]
                rank = (provider[0], provider[1], len(keys), self._signed_bytes.get(prefix, 0))
                if best is not None and rank <= best:
                    continue
                candidate = next((k for k in keys if k != stored.key), None)
                if candidate is not None:
                    victim, best = candidate, rank
            if victim is None:
                return
            self._remove(victim)
            self.evicted += 1


class _CountingDict(dict[str, object]):
    """A dict that counts the walks over it (``iter``, ``items``, ``values``, ``keys``)."""

    walks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        type(self).walks += 1
        return super().__iter__()

    def items(self):  # type: ignore[no-untyped-def]
        type(self).walks += 1
        return super().items()

    def values(self):  # type: ignore[no-untyped-def]
        type(self).walks += 1
        return super().values()

    def keys(self):  # type: ignore[no-untyped-def]
        type(self).walks += 1
        return super().keys()


_SOURCES = (
    [f"10.{p}.{n}.{h}" for p in range(6) for n in range(8) for h in (1, 2)]
    + [f"2001:db8:{p}:{n}::1" for p in range(2) for n in range(3)]
    + ["::ffff:10.0.0.9", "local"]
)


def _run_pair(seed: int, steps: int) -> tuple[int, int]:
    """Drive the indexed store and the scanning reference with the same random operations; returns the number of
    evictions and of replacements of a signed record by another network that happened."""
    rng = random.Random(seed)
    limits = StorageLimits(
        max_values=40, max_bytes=rng.choice((1_400, 100_000)), max_values_per_source=10, max_bytes_per_source=2_000,
        max_signed_values_per_source=4, max_signed_bytes_per_source=400, provider_factor=2,
        max_plain_values=10, max_plain_bytes=600, plain_ttl=20.0,
    )  # fmt: skip
    new, ref = _LoggingStore(limits), _ScanStore(limits)
    seqs: dict[bytes, int] = {}
    now = 0.0
    cross_replacements = 0
    fixed_size = rng.random() < 0.5  # equal sizes make ties on bytes common
    for _ in range(steps):
        now += rng.random() * 0.2
        key = bytes([rng.randrange(120)]) * 20
        source = rng.choice(_SOURCES)
        action = rng.random()
        plain_size = rng.randrange(30)
        signed_size = 20 if fixed_size else rng.randrange(1, 60)
        expires_at = now + 5 + 40 * rng.random()
        held = new.get(key, now)
        if action >= 0.15 and action < 0.85 and held is not None and held.seq is not None and held.source != source:
            cross_replacements += 1
        outcomes = []
        for store in (new, ref):
            try:
                if action < 0.15:
                    store.put_plain(key, b"p" * plain_size, source=source, now=now)
                elif action < 0.85:
                    seq = seqs.get(key, 0) + 1
                    store.put_signed(
                        key, b"s" * signed_size + bytes([seq % 256]), seq=seq, expires_at=expires_at, source=source,
                        now=now, reserved=key[0] < 2,
                    )  # fmt: skip
                elif action < 0.93:
                    store.purge(now)
                else:
                    store.remove(key)
                outcomes.append("ok")
            except StoreRefusedError as exc:
                outcomes.append(str(exc))
        if action >= 0.15 and action < 0.85 and outcomes[0] == "ok":
            seqs[key] = seqs.get(key, 0) + 1
        assert outcomes[0] == outcomes[1]
        assert new.removed == ref.removed
        assert list(new._values) == list(ref._values)
        assert new.evicted == ref.evicted
        assert new._net_entries == sum(len(heap) for heap in new._net_heaps.values())
        assert new._net_entries <= 2 * len(new._signed) + 64
        assert len(new._provider_heap) <= 2 * len(new._signed_provider) + 64
    return new.evicted, cross_replacements


def test_indexed_choice_evicts_the_same_records_as_the_full_scan() -> None:
    evicted = cross = 0
    for seed in range(20):
        e, c = _run_pair(seed, 1_000)
        evicted, cross = evicted + e, cross + c
    assert evicted > 2_000  # the runs did exercise eviction, and replacements from another network
    assert cross > 100


def test_a_network_holding_only_the_key_being_replaced_is_passed_over() -> None:
    key = b"\x01" * 20
    for store in (RecordStore(StorageLimits(max_bytes=103)), _ScanStore(StorageLimits(max_bytes=103))):
        # 10.0.0.0/24 holds only ``key``, the most bytes of all providers; the others hold one record each.
        store.put_signed(key, b"oldoldold", seq=1, expires_at=100.0, source="10.0.0.1", now=0.0)
        store.put_signed(b"\x02" * 20, b"a", seq=1, expires_at=100.0, source="10.1.0.1", now=0.0)
        store.put_signed(b"\x03" * 20, b"bb", seq=1, expires_at=100.0, source="10.2.0.1", now=0.0)
        store.put_signed(b"\x04" * 20, b"ccc", seq=1, expires_at=100.0, source="10.3.0.1", now=0.0)
        assert store.total_bytes == 103
        # a larger record under ``key`` from another network needs 3 more bytes: 10.0/16 holds nothing else, so the
        # next largest provider, 10.3/16, loses its record
        store.put_signed(key, b"newnewnewnew", seq=2, expires_at=100.0, source="10.9.0.1", now=1.0)
        assert sorted(store._values) == [key, b"\x02" * 20, b"\x03" * 20]
        assert store.evicted == 1


def test_an_evicting_store_walks_no_table_of_every_network() -> None:
    store = RecordStore()
    counting = _CountingDict()
    store._signed = counting  # type: ignore[assignment]
    n = 0
    for provider in range(40):
        for net in range(250):
            source = f"{10 + provider}.{net}.0.1"
            store.put_signed(n.to_bytes(20, "big"), b"r" * 20, seq=1, expires_at=1e9, source=source, now=0.0)
            n += 1
    assert len(store) == 10_000
    _CountingDict.walks = 0
    for i in range(300):
        source = f"{100 + i % 100}.{i // 100}.0.1"
        store.put_signed((10**6 + i).to_bytes(20, "big"), b"r" * 20, seq=1, expires_at=1e9, source=source, now=1.0)
    assert store.evicted == 300
    assert _CountingDict.walks <= 2  # the scan walked all 10,000 networks twice per evicting STORE

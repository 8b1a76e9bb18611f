"""The bounded local record store of a DHT node.

Theory of operation
-------------------
The store maps a 20-byte key to one value of one of two kinds:

* ``PLAIN`` -- what a stock ``kademlia`` node ``set``s: an int, float, bool, str or bytes, last writer wins,
  kept for ``plain_ttl`` seconds from its arrival.  Storing the same value again does not extend that (stock
  holders re-store every value they hold every hour, which would otherwise keep it alive forever);
* ``SIGNED`` -- a signed record (:mod:`p2pmsg.dht.core.records`) already verified by the caller.  The highest
  ``seq`` wins; the same ``seq`` is accepted again only with identical bytes (a refresh, which changes nothing: the
  expiry is the owner's, inside the signature, so only the owner can extend it).  A signed record replaces a
  plain value under its key, and a plain value can never replace (or be stored beside) a signed record: once a key
  is known to belong to a signed namespace, unsigned STOREs to it are refused.

Everything is bounded: the number of values and their total size (key plus msgpack-encoded value), the same two per
*source*, and the size of one value per kind.  A source is accounted at two levels: its *network* -- the /24 of an
IPv4 address, the /64 of an IPv6 address (:func:`source_prefix`) -- so one host, or one subnet's many addresses,
cannot fill the store; and its *provider* -- the /16 of an IPv4 address, the /32 of an IPv6 address
(:func:`provider_prefix`) -- so an attacker holding many networks of one allocation (all of a /16, a cloud region)
gets no more than ``provider_factor`` networks' worth.  Plain values also have their own sub-budget
(``max_plain_values``, ``max_plain_bytes``, half the store by default), so whatever plain values anyone floods in, the
rest of the store stays open to signed records.  Signed records have a further, lower budget per network
(``max_signed_values_per_source``, ``max_signed_bytes_per_source``) and per provider, so filling the store with
signed records takes many networks in many providers.

Every provider budget is ``provider_factor`` (default 4) times the matching network budget.  Why 4: a provider-sized
block of addresses (a /16 of a home ISP or a university, an IPv6 /32 of an ISP) legitimately holds honest nodes in
several networks, and four of them can use their full network budgets at once; while one provider can take at most
1,000 of the 10,000 values as signed records by default (4,000 values and 4 MiB in all), so filling the store with
signed records takes at least ten providers, where the network level alone let 40 networks of a single /16 do it.  A
larger factor lets one /16 crowd out more; a factor of 1 would let a single honest network use up its provider.

When a limit would be exceeded, expired values are purged first; then a *signed* record that is within its own
network's and provider's budgets but still does not fit the store-wide limits evicts plain values, oldest first, and
then signed records of the provider that holds the most of them, of that provider's network that holds the most
(oldest first), until it fits.  Otherwise the STORE is refused with :class:`StoreRefusedError`: a plain value never
evicts anything, so a flood of plain values cannot flush honest data, and a flood of signed records from many
throwaway networks only ever flushes its own largest providers, never a newcomer's single record -- nor honest
networks that hold a few more records each than an attacker spread thin over many networks of one provider.
Records the node itself signed (``reserved``) are exempt from the limits and never evicted.  Time is passed in
(monotonic seconds); the store never reads a clock.

Choosing the signed victim is indexed, not a scan of every network: each provider keeps a heap of its networks
keyed by ``(records, bytes, since)`` (``since`` numbers a network when it last started holding signed records, so the
lowest is the one that has held them longest without a break), and one heap holds the providers keyed by ``(records,
bytes, best network's key)``.  Every change to a network pushes a fresh entry for it and for its provider instead of
updating the old ones in place; an entry is checked against the current counts when it reaches the top and dropped if
it no longer matches, and both levels are rebuilt from the live counts once stale entries outnumber live ones, so
an eviction costs O(log n) amortised and the heaps stay within twice the live networks and providers.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator

import msgpack

from p2pmsg.dht.core.errors import DhtUsageError, StoreRefusedError
from p2pmsg.dht.core.messages import is_plain_value
from p2pmsg.ratelimit import network_of

__all__ = [
    "RecordStore",
    "StorageLimits",
    "StoredValue",
    "ValueKind",
    "provider_prefix",
    "source_prefix",
    "value_size",
]


class ValueKind(enum.Enum):
    """How a stored value is validated and replaced."""

    PLAIN = "plain"
    SIGNED = "signed"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StorageLimits:
    """Bounds of a :class:`RecordStore`."""

    max_values: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    #: Per source network (an IPv4 /24 or an IPv6 /64, see :func:`source_prefix`).
    max_values_per_source: int = 1_000
    max_bytes_per_source: int = 1024 * 1024
    #: The lower budget of signed records per source network (a full store evicts from the largest network).
    max_signed_values_per_source: int = 250
    max_signed_bytes_per_source: int = 256 * 1024
    #: Per source provider (an IPv4 /16 or an IPv6 /32, see :func:`provider_prefix`), each of the four budgets above
    #: times this factor (module docstring: why 4).
    provider_factor: int = 4
    #: The share of the store plain values may take (signed records evict plain values to get room).
    max_plain_values: int = 5_000
    max_plain_bytes: int = 8 * 1024 * 1024
    max_plain_value_size: int = 4096
    max_signed_value_size: int = 2048
    plain_ttl: float = 24 * 3600.0
    max_signed_ttl: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise DhtUsageError(f"StorageLimits.{field.name} must be positive")

    @property
    def max_values_per_provider(self) -> int:
        """Values charged to one provider at most: ``provider_factor * max_values_per_source``."""
        return self.provider_factor * self.max_values_per_source

    @property
    def max_bytes_per_provider(self) -> int:
        """Bytes charged to one provider at most: ``provider_factor * max_bytes_per_source``."""
        return self.provider_factor * self.max_bytes_per_source

    @property
    def max_signed_values_per_provider(self) -> int:
        """Signed records charged to one provider at most: ``provider_factor * max_signed_values_per_source``."""
        return self.provider_factor * self.max_signed_values_per_source

    @property
    def max_signed_bytes_per_provider(self) -> int:
        """Signed bytes charged to one provider at most: ``provider_factor * max_signed_bytes_per_source``."""
        return self.provider_factor * self.max_signed_bytes_per_source


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoredValue:
    """One value held by the store."""

    key: bytes
    value: object
    kind: ValueKind
    size: int
    source: str
    stored_at: float
    expires_at: float
    seq: int | None = None


def source_prefix(source: str) -> str:
    """The network a source is accounted to: ``"a.b.c.0/24"`` for an IPv4 address (also an IPv4-mapped IPv6 one),
    ``"x:x:x:x::/64"`` for an IPv6 address; anything that is not an IP literal (``"local"``) is its own source."""
    return network_of(source, 24, 64)


def provider_prefix(source: str) -> str:
    """The provider a source is accounted to: ``"a.b.0.0/16"`` for an IPv4 address (also an IPv4-mapped IPv6 one),
    ``"x:x::/32"`` for an IPv6 address; anything that is not an IP literal (``"local"``) is its own provider."""
    return network_of(source, 16, 32)


def value_size(key: bytes, value: object) -> int:
    """The bytes a value is charged for: its key plus its msgpack encoding."""
    return len(key) + len(msgpack.packb(value, use_bin_type=True))


def _budget_reason(
    holder: str, count: int, size: int, added: int, max_count: int, max_bytes: int, *, signed: bool = False
) -> str | None:
    """Why one more value of ``added`` bytes does not fit a budget that already holds ``count`` values and ``size``
    bytes (``None`` if it fits); ``holder`` names the network or provider in the message."""
    items = "signed records" if signed else "values"
    if count + 1 > max_count:
        return f"{holder} already stores {count} {items} (limit {max_count})"
    if size + added > max_bytes:
        return f"{holder} already stores {size} bytes{' of signed records' if signed else ''} (limit {max_bytes})"
    return None


class RecordStore:
    """Bounded key/value storage (see the module docstring)."""

    def __init__(
        self, limits: StorageLimits | None = None, *, on_new_signed: Callable[[bytes, bytes], None] | None = None
    ) -> None:
        """``on_new_signed(key, value)`` is called with each signed record :meth:`put_signed` takes in that it did not
        hold (a new key or a higher ``seq``; not a refresh), after it is stored."""
        self.limits = limits or StorageLimits()
        self._on_new_signed = on_new_signed
        self._values: dict[bytes, StoredValue] = {}
        self._total = 0
        self._per_source: dict[str, list[int]] = {}
        self._per_provider: dict[str, list[int]] = {}
        self._expiry: list[tuple[float, bytes]] = []
        #: Plain values, oldest arrival first (the eviction order), and their total size.
        self._plain: OrderedDict[bytes, None] = OrderedDict()
        self._plain_bytes = 0
        #: Signed records that are not reserved, per source network in arrival order, and their bytes per network.
        self._signed: dict[str, OrderedDict[bytes, None]] = {}
        self._signed_bytes: dict[str, int] = {}
        #: ``[records, bytes]`` of those signed records per provider, and the provider of each network in ``_signed``.
        self._signed_provider: dict[str, list[int]] = {}
        self._provider_of: dict[str, str] = {}
        #: Keys of the records this node signed itself: exempt from the limits, never evicted.
        self._reserved: set[bytes] = set()
        #: The count and bytes of every signed record that is not reserved (what evicting all of them would free).
        self._signed_count = 0
        self._signed_total = 0
        #: The eviction index (module docstring): each network's ``since`` serial, per provider a heap of
        #: ``(-records, -bytes, since, network)`` entries, and a heap of ``(-records, -bytes, *best network's entry,
        #: provider)`` entries; entries are stale once they no longer match the counts.
        self._since: dict[str, int] = {}
        self._serial = 0
        self._net_heaps: dict[str, list[tuple[int, int, int, str]]] = {}
        self._net_entries = 0
        self._provider_heap: list[tuple[int, int, int, int, int, str, str]] = []
        #: A network left out of the index while a victim is chosen (it holds only the key being stored).
        self._hidden: str | None = None
        self.evicted = 0

    # -- queries ---------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._values)

    @property
    def total_bytes(self) -> int:
        """Bytes charged for every value held."""
        return self._total

    def usage_of(self, source: str) -> tuple[int, int]:
        """``(values, bytes)`` charged to the network of ``source`` (:func:`source_prefix`)."""
        count, size = self._per_source.get(source_prefix(source), (0, 0))
        return count, size

    def signed_usage_of(self, source: str) -> tuple[int, int]:
        """``(values, bytes)`` of the signed records (not this node's own) charged to the network of ``source``."""
        prefix = source_prefix(source)
        return len(self._signed.get(prefix, ())), self._signed_bytes.get(prefix, 0)

    def provider_usage_of(self, source: str) -> tuple[int, int]:
        """``(values, bytes)`` charged to the provider of ``source`` (:func:`provider_prefix`)."""
        count, size = self._per_provider.get(provider_prefix(source), (0, 0))
        return count, size

    def signed_provider_usage_of(self, source: str) -> tuple[int, int]:
        """``(values, bytes)`` of the signed records (not this node's own) charged to the provider of ``source``."""
        count, size = self._signed_provider.get(provider_prefix(source), (0, 0))
        return count, size

    @property
    def plain_usage(self) -> tuple[int, int]:
        """``(values, bytes)`` of the plain values held."""
        return len(self._plain), self._plain_bytes

    def get(self, key: bytes, now: float) -> StoredValue | None:
        """The live value under ``key``, if any."""
        stored = self._values.get(key)
        if stored is None:
            return None
        if stored.expires_at <= now:
            self._remove(key)
            return None
        return stored

    def items(self, now: float) -> Iterator[StoredValue]:
        """Every live value (a snapshot)."""
        self.purge(now)
        return iter(list(self._values.values()))

    # -- updates ---------------------------------------------------------------------------------------------------

    def put_plain(self, key: bytes, value: object, *, source: str, now: float) -> StoredValue:
        """Store a plain value; raises :class:`StoreRefusedError` with the reason if it is refused.

        Storing the value already held under ``key`` again (same type, equal value) changes nothing: it keeps its
        first arrival time and expiry, so holders re-storing it can never keep it alive forever.
        """
        if not is_plain_value(value):
            raise StoreRefusedError(f"plain value must be int, float, bool, str or bytes, got {type(value).__name__}")
        existing = self.get(key, now)
        if existing is not None and existing.kind is ValueKind.SIGNED:
            raise StoreRefusedError("key holds a signed record: an unsigned value cannot replace it")
        if existing is not None and type(existing.value) is type(value) and existing.value == value:
            return existing  # the same value again (a holder republishing it): its lifetime is NOT extended
        size = value_size(key, value)
        if size - len(key) > self.limits.max_plain_value_size:
            raise StoreRefusedError(
                f"plain value is {size - len(key)} bytes, over the {self.limits.max_plain_value_size}-byte limit"
            )
        stored = StoredValue(
            key=key,
            value=value,
            kind=ValueKind.PLAIN,
            size=size,
            source=source,
            stored_at=now,
            expires_at=now + self.limits.plain_ttl,
        )
        self._admit(stored, existing, now)
        return stored

    def put_signed(
        self,
        key: bytes,
        value: bytes,
        *,
        seq: int,
        expires_at: float,
        source: str,
        now: float,
        reserved: bool = False,
    ) -> bool:
        """Store a verified signed record; ``False`` if it is the record already held (a refresh), else ``True``.

        Raises :class:`StoreRefusedError` for a stale ``seq``, a different record with the same ``seq``, an expired
        record, or a limit.  ``expires_at`` is on the same monotonic clock as ``now`` and is capped at
        ``now + max_signed_ttl``.  ``reserved`` marks a record of this node's own (the caller guarantees they are
        few: one per signed namespace): it is exempt from the count, byte and per-source limits, so a store filled
        by others never keeps this node from holding its own record.
        """
        if expires_at <= now:
            raise StoreRefusedError("signed record has expired")
        size = value_size(key, value)
        # The record's own bytes, as verify_record_value measures them (its msgpack header is charged to the budget
        # below, not to this limit: a record the owner could seal must be storable).
        if len(value) > self.limits.max_signed_value_size:
            raise StoreRefusedError(
                f"signed record is {len(value)} bytes, over the {self.limits.max_signed_value_size}-byte limit"
            )
        existing = self.get(key, now)
        if existing is not None and existing.kind is ValueKind.SIGNED:
            assert existing.seq is not None
            if seq < existing.seq:
                raise StoreRefusedError(f"stale record: seq {seq} is lower than the stored seq {existing.seq}")
            if seq == existing.seq:
                if existing.value == value:
                    return False
                raise StoreRefusedError(f"conflicting record: another record with seq {seq} is stored")
        stored = StoredValue(
            key=key,
            value=value,
            kind=ValueKind.SIGNED,
            size=size,
            source=source,
            stored_at=now,
            expires_at=min(expires_at, now + self.limits.max_signed_ttl),
            seq=seq,
        )
        self._admit(stored, existing, now, reserved=reserved)
        if self._on_new_signed is not None:
            self._on_new_signed(key, value)
        return True

    def remove(self, key: bytes) -> None:
        """Forget ``key`` (no error if absent)."""
        if key in self._values:
            self._remove(key)

    def next_expiry(self) -> float | None:
        """When :meth:`purge` next has something to do (a value may have been replaced meanwhile: then nothing)."""
        return self._expiry[0][0] if self._expiry else None

    def purge(self, now: float) -> int:
        """Drop every expired value; returns how many were dropped."""
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, key = heapq.heappop(self._expiry)
            stored = self._values.get(key)
            if stored is not None and stored.expires_at <= now:
                self._remove(key)
                dropped += 1
        if len(self._expiry) > 4 * len(self._values) + 64:
            self._expiry = [(v.expires_at, v.key) for v in self._values.values()]
            heapq.heapify(self._expiry)
        return dropped

    # -- internals -------------------------------------------------------------------------------------------------

    def _fits(self, stored: StoredValue, existing: StoredValue | None) -> str | None:
        return (
            self._source_reason(stored, existing)
            or self._provider_reason(stored, existing)
            or self._signed_source_reason(stored, existing)
            or self._signed_provider_reason(stored, existing)
            or self._plain_reason(stored, existing)
            or self._global_reason(stored, existing)
        )

    def _global_reason(self, stored: StoredValue, existing: StoredValue | None) -> str | None:
        limits = self.limits
        old_size = existing.size if existing is not None else 0
        old_count = 1 if existing is not None else 0
        if len(self._values) - old_count + 1 > limits.max_values:
            return f"store is full ({limits.max_values} values)"
        if self._total - old_size + stored.size > limits.max_bytes:
            return f"store is full ({limits.max_bytes} bytes)"
        return None

    def _plain_reason(self, stored: StoredValue, existing: StoredValue | None) -> str | None:
        if stored.kind is not ValueKind.PLAIN:
            return None
        limits = self.limits
        count, size = self.plain_usage
        if existing is not None and existing.kind is ValueKind.PLAIN:
            count -= 1
            size -= existing.size
        if count + 1 > limits.max_plain_values:
            return f"plain values are full ({limits.max_plain_values} values)"
        if size + stored.size > limits.max_plain_bytes:
            return f"plain values are full ({limits.max_plain_bytes} bytes)"
        return None

    def _source_reason(self, stored: StoredValue, existing: StoredValue | None) -> str | None:
        limits = self.limits
        prefix = source_prefix(stored.source)
        count, size = self.usage_of(prefix)
        if existing is not None and source_prefix(existing.source) == prefix:
            count, size = count - 1, size - existing.size
        return _budget_reason(
            f"source {prefix}", count, size, stored.size, limits.max_values_per_source, limits.max_bytes_per_source
        )

    def _provider_reason(self, stored: StoredValue, existing: StoredValue | None) -> str | None:
        limits = self.limits
        provider = provider_prefix(stored.source)
        count, size = self._per_provider.get(provider, (0, 0))
        if existing is not None and provider_prefix(existing.source) == provider:
            count, size = count - 1, size - existing.size
        return _budget_reason(
            f"provider {provider}", count, size, stored.size, limits.max_values_per_provider,
            limits.max_bytes_per_provider,
        )  # fmt: skip

    def _signed_provider_reason(self, stored: StoredValue, existing: StoredValue | None) -> str | None:
        if stored.kind is not ValueKind.SIGNED:
            return None
        limits = self.limits
        provider = provider_prefix(stored.source)
        count, size = self._signed_provider.get(provider, (0, 0))
        if (
            existing is not None
            and provider_prefix(existing.source) == provider
            and existing.key in self._signed.get(source_prefix(existing.source), ())
        ):
            count, size = count - 1, size - existing.size
        return _budget_reason(
            f"provider {provider}", count, size, stored.size, limits.max_signed_values_per_provider,
            limits.max_signed_bytes_per_provider, signed=True,
        )  # fmt: skip

    def _signed_source_reason(self, stored: StoredValue, existing: StoredValue | None) -> str | None:
        if stored.kind is not ValueKind.SIGNED:
            return None
        limits = self.limits
        prefix = source_prefix(stored.source)
        count, size = self.signed_usage_of(prefix)
        if existing is not None and existing.key in self._signed.get(prefix, ()):
            count, size = count - 1, size - existing.size
        return _budget_reason(
            f"source {prefix}", count, size, stored.size, limits.max_signed_values_per_source,
            limits.max_signed_bytes_per_source, signed=True,
        )  # fmt: skip

    def _fits_after_evictions(self, stored: StoredValue, existing: StoredValue | None) -> bool:
        """Whether evicting every plain value and every signed record that is not reserved (nor ``stored.key``)
        would make room for ``stored``: if not, nothing is evicted for a record that is refused anyway."""
        count = len(self._values) + 1
        size = self._total + stored.size
        if existing is not None:
            count -= 1
            size -= existing.size
        count -= len(self._plain) + self._signed_count
        size -= self._plain_bytes + self._signed_total
        if existing is not None and existing.key not in self._reserved:  # it goes anyway: counted once, above
            count += 1
            size += existing.size
        return count <= self.limits.max_values and size <= self.limits.max_bytes

    def _evict_signed_for(self, stored: StoredValue, existing: StoredValue | None) -> None:
        """Drop signed records of the provider holding the most, of its network holding the most (oldest first;
        never ``stored.key``, never a reserved one) until ``stored`` fits the store-wide limits."""
        while self._global_reason(stored, existing) is not None:
            victim = self._signed_victim(stored.key)
            if victim is None:
                return
            self._remove(victim)
            self.evicted += 1

    def _signed_victim(self, exclude: bytes) -> bytes | None:
        """The oldest signed record other than ``exclude`` of the network that ranks highest by ``(provider records,
        provider bytes, network records, network bytes)``, ties to the lowest ``since``; ``None`` if there is none."""
        hidden: str | None = None
        held = self._values.get(exclude)
        if held is not None and held.kind is ValueKind.SIGNED and exclude not in self._reserved:
            prefix = source_prefix(held.source)
            if len(self._signed[prefix]) == 1:  # its only record is the excluded one: it has no candidate
                hidden = prefix
                self._hidden = prefix
                self._push_provider(self._provider_of[prefix])
        try:
            heap = self._provider_heap
            while heap and not self._provider_entry_valid(heap[0]):
                heapq.heappop(heap)
            if not heap:
                return None
            return next(key for key in self._signed[heap[0][5]] if key != exclude)
        finally:
            if hidden is not None:
                self._hidden = None
                self._reindex(hidden, self._provider_of[hidden])

    def _net_entry_valid(self, entry: tuple[int, int, int, str]) -> bool:
        neg_count, neg_bytes, since, prefix = entry
        keys = self._signed.get(prefix)
        return (
            keys is not None
            and prefix != self._hidden
            and self._since[prefix] == since
            and len(keys) == -neg_count
            and self._signed_bytes[prefix] == -neg_bytes
        )

    def _best_network(self, provider: str) -> tuple[int, int, int, str] | None:
        """The live index entry of ``provider``'s highest-ranking network (dropping stale entries above it)."""
        heap = self._net_heaps.get(provider)
        if heap is None:
            return None
        while heap and not self._net_entry_valid(heap[0]):
            heapq.heappop(heap)
            self._net_entries -= 1
        return heap[0] if heap else None

    def _provider_entry_valid(self, entry: tuple[int, int, int, int, int, str, str]) -> bool:
        usage = self._signed_provider.get(entry[6])
        return (
            usage is not None
            and usage[0] == -entry[0]
            and usage[1] == -entry[1]
            and self._best_network(entry[6]) == entry[2:6]
        )

    def _push_provider(self, provider: str) -> None:
        """Index ``provider`` as it is now (or forget its network heap if it holds no signed record)."""
        usage = self._signed_provider.get(provider)
        if usage is None:
            self._net_entries -= len(self._net_heaps.pop(provider, ()))
            return
        best = self._best_network(provider)
        if best is not None:
            heapq.heappush(self._provider_heap, (-usage[0], -usage[1], *best, provider))

    def _reindex(self, prefix: str, provider: str) -> None:
        """Index network ``prefix`` of ``provider`` and the provider itself after either changed."""
        keys = self._signed.get(prefix)
        if keys is not None and prefix != self._hidden:
            entry = (-len(keys), -self._signed_bytes[prefix], self._since[prefix], prefix)
            heapq.heappush(self._net_heaps.setdefault(provider, []), entry)
            self._net_entries += 1
        self._push_provider(provider)
        if (
            self._net_entries > 2 * len(self._signed) + 64
            or len(self._provider_heap) > 2 * len(self._signed_provider) + 64
        ):
            self._rebuild_index()

    def _rebuild_index(self) -> None:
        """Rebuild both heaps from the live counts (drops every stale entry)."""
        heaps: dict[str, list[tuple[int, int, int, str]]] = {}
        for prefix, keys in self._signed.items():
            if prefix != self._hidden:
                entry = (-len(keys), -self._signed_bytes[prefix], self._since[prefix], prefix)
                heaps.setdefault(self._provider_of[prefix], []).append(entry)
        self._provider_heap = []
        self._net_entries = 0
        for provider, heap in heaps.items():
            heapq.heapify(heap)
            self._net_entries += len(heap)
            usage = self._signed_provider[provider]
            self._provider_heap.append((-usage[0], -usage[1], *heap[0], provider))
        heapq.heapify(self._provider_heap)
        self._net_heaps = heaps

    def _evict_plain_for(self, stored: StoredValue, existing: StoredValue | None) -> None:
        """Drop the oldest plain values (never ``stored.key``'s) until ``stored`` fits the store-wide limits."""
        while self._plain and self._global_reason(stored, existing) is not None:
            victim = next(iter(self._plain))
            if victim == stored.key:
                if len(self._plain) == 1:
                    return
                self._plain.move_to_end(victim)
                continue
            self._remove(victim)
            self.evicted += 1

    def _admit(self, stored: StoredValue, existing: StoredValue | None, now: float, *, reserved: bool = False) -> None:
        reason = None if reserved else self._fits(stored, existing)
        if reason is not None:
            self.purge(now)
            existing = self._values.get(stored.key)
            reason = self._fits(stored, existing)
            if (
                reason is not None
                and stored.kind is ValueKind.SIGNED
                and self._source_reason(stored, existing) is None
                and self._provider_reason(stored, existing) is None
                and self._signed_source_reason(stored, existing) is None
                and self._signed_provider_reason(stored, existing) is None
                and self._fits_after_evictions(stored, existing)
            ):
                self._evict_plain_for(stored, existing)
                self._evict_signed_for(stored, existing)
                reason = self._global_reason(stored, existing)
            if reason is not None:
                raise StoreRefusedError(reason)
        if existing is not None:
            self._remove(stored.key)
        self._values[stored.key] = stored
        self._total += stored.size
        prefix = source_prefix(stored.source)
        provider = provider_prefix(stored.source)
        for usage in (self._per_source.setdefault(prefix, [0, 0]), self._per_provider.setdefault(provider, [0, 0])):
            usage[0] += 1
            usage[1] += stored.size
        if stored.kind is ValueKind.PLAIN:
            self._plain[stored.key] = None
            self._plain_bytes += stored.size
        elif reserved:
            self._reserved.add(stored.key)
        else:
            if prefix not in self._signed:
                self._since[prefix] = self._serial
                self._serial += 1
            self._signed.setdefault(prefix, OrderedDict())[stored.key] = None
            self._signed_bytes[prefix] = self._signed_bytes.get(prefix, 0) + stored.size
            self._provider_of[prefix] = provider
            usage = self._signed_provider.setdefault(provider, [0, 0])
            usage[0] += 1
            usage[1] += stored.size
            self._signed_count += 1
            self._signed_total += stored.size
            self._reindex(prefix, provider)
        heapq.heappush(self._expiry, (stored.expires_at, stored.key))

    def _remove(self, key: bytes) -> None:
        stored = self._values.pop(key)
        self._total -= stored.size
        prefix = source_prefix(stored.source)
        provider = provider_prefix(stored.source)
        for table, name in ((self._per_source, prefix), (self._per_provider, provider)):
            usage = table[name]
            usage[0] -= 1
            usage[1] -= stored.size
            if usage[0] == 0:
                del table[name]
        if stored.kind is ValueKind.PLAIN:
            del self._plain[key]
            self._plain_bytes -= stored.size
        elif key in self._reserved:
            self._reserved.discard(key)
        else:
            keys = self._signed[prefix]
            del keys[key]
            self._signed_bytes[prefix] -= stored.size
            usage = self._signed_provider[provider]
            usage[0] -= 1
            usage[1] -= stored.size
            self._signed_count -= 1
            self._signed_total -= stored.size
            if not keys:
                del self._signed[prefix]
                del self._signed_bytes[prefix]
                del self._provider_of[prefix]
                del self._since[prefix]
            if usage[0] == 0:
                del self._signed_provider[provider]
            self._reindex(prefix, provider)

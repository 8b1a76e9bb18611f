"""The Kademlia routing table: k-buckets over the 160-bit keyspace.

Theory of operation
-------------------
The table starts as one bucket covering ``[0, 2**160)``.  A bucket holds at most ``k`` contacts ordered from least-
to most-recently seen, plus a bounded *replacement cache* of newer contacts that did not fit.  When a contact is seen
(:meth:`RoutingTable.observe`: it answered us, or sent us a request from an address we proved):

* already present: it moves to the most-recently-seen end;
* room in its bucket: it is appended;
* bucket full and splittable -- the bucket's range holds our own id, or its depth is not a multiple of ``b`` (the
  relaxation of section 4.2 of the Kademlia paper for unbalanced trees) -- the bucket splits in two halves and the
  insertion is retried;
* bucket full otherwise: the newcomer goes to the replacement cache and the table emits :class:`PingNeeded` for the
  least-recently-seen contact (one at a time per bucket).  The driver pings it and reports with
  :meth:`RoutingTable.ping_result`: alive, it moves to the recent end and the newcomer waits in the cache; dead, it is
  evicted and the most recent replacement takes its place.  A live old contact is never evicted for a newcomer.

An RPC failure (:meth:`RoutingTable.failed`) evicts a contact at once if a replacement is waiting, else after
``max_failures`` consecutive failures.  A known node id seen at a different address is *not* moved there (that
would let anyone hijack a contact); the new address only takes over once the old one has been evicted.

Node ids cost nothing, addresses do, so the table bounds what one host can hold.  An address holds one contact: a new id
from an address that already has one is ignored (not cached either), unless it is the id that address answered one of
our pings with (``observe(..., answered_ping=True)``: a round trip proved that this node lives there now), which evicts
the old contact.  (The engine pings an address whose request names another id than its contact's, so a wrong id that a
third node gave for an address cannot keep out the node that lives there.)  And one host (an IPv4 address, an IPv6 /64)
holds at most ``max_per_host`` contacts; loopback addresses are exempt (several local nodes, and nobody can send from
them over a network).  Without these, one host sending requests under ever new ids filled every bucket along our own id
(3,000 contacts from a single address) and made each id a newcomer (which costs a hand-off scan).

Nothing above notices a contact that died in a part of the keyspace this node never asks about, so the table also
remembers when it last heard from each contact, and offers a *liveness check*
(:meth:`RoutingTable.quiet_contacts`): every contact not heard from for ``quiet_for`` seconds, each at most once per
``retry_after`` seconds.  The driver pings them and reports an answer with :meth:`RoutingTable.answered` and a
timeout with :meth:`RoutingTable.failed`; a dead contact stays quiet, so it is asked again ``retry_after`` later and
leaves after ``max_failures`` checks (or at the first if a replacement waits).  So within about ``quiet_for +
max_failures * retry_after`` seconds of its last answer, a contact that stopped answering has left the table, and
a contact that answers is asked about once per ``quiet_for`` when nothing else is heard from it.

The table is pure data: it takes the current time as an argument and returns events; it never sends anything.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

from p2pmsg.dht.core.contact import KEYSPACE_BITS, NODE_ID_SIZE, Address, Contact
from p2pmsg.dht.core.errors import DhtUsageError
from p2pmsg.ratelimit import network_of

__all__ = [
    "BucketInfo",
    "ContactAdded",
    "ContactRemoved",
    "PingNeeded",
    "RoutingEvent",
    "RoutingTable",
]

_KEYSPACE: Final = 1 << KEYSPACE_BITS


@functools.lru_cache(maxsize=4096)
def host_of(host: str) -> str | None:
    """What :attr:`RoutingTable.max_per_host` counts ``host`` against: the IPv4 address or the IPv6 /64 (as CIDR
    text), or ``None`` for a loopback address or anything that is not an IP literal (not counted)."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        return None
    return network_of(host, 32, 64)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PingNeeded:
    """Ping ``contact`` (the least-recently-seen of a full bucket) and report with ``ping_result``."""

    contact: Contact


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ContactAdded:
    """``contact`` entered the table."""

    contact: Contact


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ContactRemoved:
    """``contact`` left the table (failed a ping or too many RPCs)."""

    contact: Contact


RoutingEvent = PingNeeded | ContactAdded | ContactRemoved


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BucketInfo:
    """A read-only view of one bucket (for status output and tests)."""

    low: int
    high: int
    depth: int
    contacts: tuple[Contact, ...]
    replacements: tuple[Contact, ...]
    last_touched: float
    #: When each contact and replacement was last heard from (by node id).
    last_seen: dict[bytes, float]


class _Bucket:
    __slots__ = (
        "checked",
        "contacts",
        "depth",
        "failures",
        "high",
        "last_touched",
        "low",
        "pending_ping",
        "replacements",
        "seen",
    )

    def __init__(self, low: int, high: int, depth: int, now: float) -> None:
        self.low = low
        self.high = high
        self.depth = depth
        self.contacts: OrderedDict[bytes, Contact] = OrderedDict()
        self.replacements: OrderedDict[bytes, Contact] = OrderedDict()
        self.failures: dict[bytes, int] = {}
        self.pending_ping: bytes | None = None
        self.last_touched = now
        #: When each contact and replacement was last heard from (its keys are exactly theirs).
        self.seen: dict[bytes, float] = {}
        #: When the last liveness check of a contact went out (contacts not heard from since).
        self.checked: dict[bytes, float] = {}

    def covers(self, value: int) -> bool:
        return self.low <= value < self.high

    def liveness_due(self, node_id: bytes, quiet_for: float, retry_after: float) -> float:
        """When contact ``node_id`` of this bucket is due for a liveness check."""
        return max(self.seen[node_id] + quiet_for, self.checked.get(node_id, -math.inf) + retry_after)


class RoutingTable:
    """k-buckets around ``own_id`` (see the module docstring for the rules)."""

    def __init__(
        self,
        own_id: bytes,
        *,
        k: int = 20,
        split_depth_modulus: int = 5,
        replacement_cache_size: int | None = None,
        max_failures: int = 3,
        max_per_host: int | None = None,
        now: float = 0.0,
    ) -> None:
        if len(own_id) != NODE_ID_SIZE:
            raise DhtUsageError(f"own_id must be {NODE_ID_SIZE} bytes")
        if k < 1 or split_depth_modulus < 1 or max_failures < 1:
            raise DhtUsageError("k, split_depth_modulus and max_failures must be positive")
        if max_per_host is not None and max_per_host < 1:
            raise DhtUsageError("max_per_host must be positive (or None: no bound)")
        self.own_id = own_id
        self.k = k
        self._own = int.from_bytes(own_id, "big")
        self._modulus = split_depth_modulus
        self._cache_size = k if replacement_cache_size is None else replacement_cache_size
        self._max_failures = max_failures
        self._buckets: list[_Bucket] = [_Bucket(0, _KEYSPACE, 0, now)]
        self._lows: list[int] = [0]
        #: Contacts per host (module docstring), and the contact at each address (node id); replacements excluded.
        self.max_per_host = max_per_host
        self._hosts: dict[str, int] = {}
        self._addresses: dict[Address, bytes] = {}

    # -- queries -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(b.contacts) for b in self._buckets)

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, bytes) and node_id in self._bucket_for(node_id).contacts

    def get(self, node_id: bytes) -> Contact | None:
        """The contact with this id, if it is in the table."""
        return self._bucket_for(node_id).contacts.get(node_id)

    def holder(self, address: Address) -> bytes | None:
        """The node id of the contact at ``address``, if one is in the table."""
        return self._addresses.get(address)

    def contacts(self) -> list[Contact]:
        """Every contact in the table (bucket order, least-recently seen first within a bucket)."""
        return [c for b in self._buckets for c in b.contacts.values()]

    def closest(
        self,
        target: bytes,
        count: int | None = None,
        *,
        exclude_ids: Iterable[bytes] = (),
        exclude_addresses: Iterable[Address] = (),
    ) -> list[Contact]:
        """Up to ``count`` (default k) contacts closest to ``target`` by XOR, closest first."""
        count = self.k if count is None else count
        ids = set(exclude_ids)
        addresses = set(exclude_addresses)
        key = int.from_bytes(target, "big")
        # Buckets are disjoint prefix-aligned ranges, and XOR with the target maps them onto disjoint aligned ranges
        # of distances: every id in a bucket nearer by its prefix is nearer than every id in a farther one.  So visit
        # buckets by the distance of their prefix and sort contacts only within the buckets needed.
        order = sorted(
            self._buckets, key=lambda b: (b.low ^ key) >> (KEYSPACE_BITS - b.depth) << (KEYSPACE_BITS - b.depth)
        )
        closest: list[Contact] = []
        for bucket in order:
            if len(closest) >= count:
                break
            chunk = [
                c
                for c in bucket.contacts.values()
                if c.node_id not in ids and (not addresses or (c.host, c.port) not in addresses)
            ]
            chunk.sort(key=lambda c: c.id_int ^ key)
            closest.extend(chunk)
        return closest[:count]

    def buckets(self) -> list[BucketInfo]:
        """A snapshot of every bucket, lowest range first."""
        return [
            BucketInfo(
                low=b.low,
                high=b.high,
                depth=b.depth,
                contacts=tuple(b.contacts.values()),
                replacements=tuple(b.replacements.values()),
                last_touched=b.last_touched,
                last_seen=dict(b.seen),
            )
            for b in self._buckets
        ]

    def stale_buckets(self, now: float, max_age: float) -> list[tuple[int, int]]:
        """The ``[low, high)`` ranges of buckets not touched for ``max_age`` seconds (to refresh with a lookup)."""
        return [(b.low, b.high) for b in self._buckets if now - b.last_touched >= max_age]

    def touch(self, target: bytes, now: float) -> None:
        """Record that a lookup for ``target`` ran (refreshes its bucket)."""
        self._bucket_for(target).last_touched = now

    def quiet_contacts(self, now: float, quiet_for: float, retry_after: float) -> list[Contact]:
        """The contacts to check for liveness now (module docstring): those not heard from for ``quiet_for`` seconds
        and not checked in the last ``retry_after`` (nor being pinged for a full bucket), least recently seen first
        within each bucket.  Each one returned counts as checked at ``now``."""
        due: list[Contact] = []
        for bucket in self._buckets:
            for node_id, contact in bucket.contacts.items():
                if node_id != bucket.pending_ping and bucket.liveness_due(node_id, quiet_for, retry_after) <= now:
                    bucket.checked[node_id] = now
                    due.append(contact)
        return due

    def next_liveness_check(self, quiet_for: float, retry_after: float) -> float:
        """When :meth:`quiet_contacts` next has a contact to offer (``inf``: the table is empty)."""
        return min(
            (
                b.liveness_due(node_id, quiet_for, retry_after)
                for b in self._buckets
                for node_id in b.contacts
                if node_id != b.pending_ping  # skipped by quiet_contacts: its ping is out already
            ),
            default=math.inf,
        )

    # -- updates -------------------------------------------------------------------------------------------------

    def observe(self, contact: Contact, now: float, *, answered_ping: bool = False) -> list[RoutingEvent]:
        """``contact`` proved alive (it answered us, or requested from a proven address); see the module docstring.
        ``answered_ping``: its id is the one its address answered our ping with, so it replaces whatever contact
        held that address."""
        if contact.node_id == self.own_id:
            return []
        events: list[RoutingEvent] = []
        holder = self._addresses.get(contact.address)
        if holder is not None and holder != contact.node_id:
            if not answered_ping:
                return []
            events = self.remove(holder)  # another node answers at that address now: the old one is gone
        while True:
            bucket = self._bucket_for(contact.node_id)
            known = bucket.contacts.get(contact.node_id)
            if known is not None:
                if known.address != contact.address:
                    return events
                bucket.contacts.move_to_end(contact.node_id)
                bucket.failures.pop(contact.node_id, None)
                bucket.checked.pop(contact.node_id, None)
                bucket.seen[contact.node_id] = now
                bucket.last_touched = now
                return events
            if not self._has_room(contact):
                return events
            if len(bucket.contacts) < self.k:
                self._add(bucket, contact)
                bucket.replacements.pop(contact.node_id, None)
                bucket.seen[contact.node_id] = now
                bucket.last_touched = now
                return [*events, ContactAdded(contact=contact)]
            if self._splittable(bucket):
                self._split(bucket)
                continue
            bucket.replacements.pop(contact.node_id, None)
            bucket.replacements[contact.node_id] = contact
            bucket.seen[contact.node_id] = now
            while len(bucket.replacements) > self._cache_size:
                dropped, _ = bucket.replacements.popitem(last=False)
                del bucket.seen[dropped]
            if bucket.pending_ping is None:
                oldest = next(iter(bucket.contacts.values()))
                bucket.pending_ping = oldest.node_id
                return [*events, PingNeeded(contact=oldest)]
            return events

    def ping_result(self, node_id: bytes, *, alive: bool, now: float) -> list[RoutingEvent]:
        """Report the outcome of a :class:`PingNeeded` ping."""
        bucket = self._bucket_for(node_id)
        if bucket.pending_ping == node_id:
            bucket.pending_ping = None
        if node_id not in bucket.contacts:
            return []
        if alive:
            bucket.contacts.move_to_end(node_id)
            bucket.failures.pop(node_id, None)
            bucket.checked.pop(node_id, None)
            bucket.seen[node_id] = now
            bucket.last_touched = now
            return []
        return self._evict(bucket, node_id)

    def ping_not_sent(self, node_id: bytes) -> None:
        """The :class:`PingNeeded` ping of ``node_id`` could not go out (too many requests pending): nothing was
        learnt, so the contact stays as it was (kept, and as quiet as before), and a later newcomer asks again."""
        bucket = self._bucket_for(node_id)
        if bucket.pending_ping == node_id:
            bucket.pending_ping = None

    def answered(self, node_id: bytes, now: float) -> None:
        """``node_id`` answered a liveness check: it becomes the most recently seen of its bucket.  Unlike
        :meth:`observe`, this does not count as a lookup through the bucket (no new contact was learnt there, so the
        bucket's refresh stays due)."""
        bucket = self._bucket_for(node_id)
        if node_id in bucket.contacts:
            bucket.contacts.move_to_end(node_id)
            bucket.failures.pop(node_id, None)
            bucket.checked.pop(node_id, None)
            bucket.seen[node_id] = now

    def failed(self, node_id: bytes, now: float) -> list[RoutingEvent]:
        """An RPC to ``node_id`` timed out: evict it if a replacement waits, or after ``max_failures`` in a row."""
        bucket = self._bucket_for(node_id)
        if bucket.replacements.pop(node_id, None) is not None:
            del bucket.seen[node_id]
        if node_id not in bucket.contacts:
            return []
        failures = bucket.failures.get(node_id, 0) + 1
        bucket.failures[node_id] = failures
        if bucket.replacements or failures >= self._max_failures:
            return self._evict(bucket, node_id)
        return []

    def remove(self, node_id: bytes) -> list[RoutingEvent]:
        """Drop ``node_id`` from the table (and its replacement cache) unconditionally."""
        bucket = self._bucket_for(node_id)
        if bucket.replacements.pop(node_id, None) is not None:
            del bucket.seen[node_id]
        if node_id not in bucket.contacts:
            return []
        return self._evict(bucket, node_id)

    # -- internals -----------------------------------------------------------------------------------------------

    def _has_room(self, contact: Contact) -> bool:
        """Whether ``contact`` (not in the table) may enter it, or its replacement cache: its address holds no other
        contact, and its host holds fewer than :attr:`max_per_host`."""
        if contact.address in self._addresses:
            return False
        host = host_of(contact.host)
        return host is None or self.max_per_host is None or self._hosts.get(host, 0) < self.max_per_host

    def _add(self, bucket: _Bucket, contact: Contact) -> None:
        bucket.contacts[contact.node_id] = contact
        self._addresses[contact.address] = contact.node_id
        host = host_of(contact.host)
        if host is not None:
            self._hosts[host] = self._hosts.get(host, 0) + 1

    def _bucket_for(self, node_id: bytes) -> _Bucket:
        value = int.from_bytes(node_id, "big")
        return self._buckets[bisect.bisect_right(self._lows, value) - 1]

    def _splittable(self, bucket: _Bucket) -> bool:
        if bucket.depth >= KEYSPACE_BITS:
            return False
        return bucket.covers(self._own) or bucket.depth % self._modulus != 0

    def _split(self, bucket: _Bucket) -> None:
        mid = (bucket.low + bucket.high) // 2
        lower = _Bucket(bucket.low, mid, bucket.depth + 1, bucket.last_touched)
        upper = _Bucket(mid, bucket.high, bucket.depth + 1, bucket.last_touched)
        for node_id, contact in bucket.contacts.items():
            half = lower if int.from_bytes(node_id, "big") < mid else upper
            half.contacts[node_id] = contact
            half.seen[node_id] = bucket.seen[node_id]
            if node_id in bucket.failures:
                half.failures[node_id] = bucket.failures[node_id]
            if node_id in bucket.checked:
                half.checked[node_id] = bucket.checked[node_id]
        for node_id, contact in bucket.replacements.items():
            half = lower if int.from_bytes(node_id, "big") < mid else upper
            half.replacements[node_id] = contact
            half.seen[node_id] = bucket.seen[node_id]
        index = self._buckets.index(bucket)
        self._buckets[index : index + 1] = [lower, upper]
        self._lows[index : index + 1] = [lower.low, upper.low]

    def _evict(self, bucket: _Bucket, node_id: bytes) -> list[RoutingEvent]:
        removed = bucket.contacts.pop(node_id)
        del self._addresses[removed.address]
        host = host_of(removed.host)
        if host is not None:
            left = self._hosts[host] - 1
            if left:
                self._hosts[host] = left
            else:
                del self._hosts[host]
        bucket.failures.pop(node_id, None)
        bucket.checked.pop(node_id, None)
        del bucket.seen[node_id]
        if bucket.pending_ping == node_id:
            bucket.pending_ping = None
        events: list[RoutingEvent] = [ContactRemoved(contact=removed)]
        # The most recent replacement that may enter (one that came while its address or host was free may no
        # longer: it waits on in the cache).
        newcomer = next((c for c in reversed(bucket.replacements.values()) if self._has_room(c)), None)
        if newcomer is not None:
            del bucket.replacements[newcomer.node_id]
            self._add(bucket, newcomer)
            events.append(ContactAdded(contact=newcomer))
        return events

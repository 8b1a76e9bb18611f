"""The sans-IO DHT node: every protocol decision of a p2pmsg Kademlia node, without sockets or clocks.

Theory of operation
-------------------
:class:`DhtEngine` owns the routing table, the record store, the running lookups and the table of requests awaiting
an answer.  Its driver (:mod:`p2pmsg.dht.service` over UDP, or a simulator) feeds it three things -- datagrams
(:meth:`~DhtEngine.datagram_received`), the passing of time (:meth:`~DhtEngine.tick`, at
:meth:`~DhtEngine.next_deadline`) and operations (:meth:`~DhtEngine.ping`, :meth:`~DhtEngine.store`,
:meth:`~DhtEngine.lookup_nodes`, :meth:`~DhtEngine.lookup_value`) -- and collects datagrams to send
(:meth:`~DhtEngine.take_datagrams`) and completion events (:meth:`~DhtEngine.take_events`).

**Answering requests.**  A request is dropped, unanswered, if it is malformed, if its source exceeds its rate limit
(token buckets per address and per IP, and stricter ones for STOREs per source network, IPv4 /24 or IPv6 /64, and
per source provider, IPv4 /16 or IPv6 /32),
if it names this node's own id, or if its
RPC is unknown (as ``rpcudp`` does).  Otherwise it is answered exactly like ``kademlia`` 2.2.3 would, except that:

* a STORE is validated (:mod:`~p2pmsg.dht.core.records`, :mod:`~p2pmsg.dht.core.storage`) and answered ``false``
  when refused;
* *anti-amplification*: until an address has proven itself by a round trip (it answered a request of ours, echoing
  its random message id), the bytes sent to it never exceed the bytes received from it
  (:class:`~p2pmsg.dht.core.limits.AddressGuard`).  A ``ping`` from such an address is answered at once (43 bytes
  for 50).  Any other request makes this node ping the address (50 bytes, paid from the credit the request brought)
  and *holds* the request -- at most 8 per address -- until the pong proves the address, then carries it out and
  sends the answer in full; if the ping times out the held requests are dropped.  So a request from a forged
  source address has no effect at all: a STORE is neither stored nor charged to the STORE rate limits of the network
  and provider it claims (those are charged when a STORE is carried out).  A request that can be neither answered
  within the credit nor held is dropped before it has any effect.  Proving pings in flight are capped in all and
  per source network (/24, /64), and everything this node sends because of others' requests stays out of a reserved
  share of the pending-request table, so a flood of requests from fresh ports can never starve this node's own
  lookups.
  A proven address is answered in full, up to ``answer_rate_per_address`` bytes a second: a request forged with
  its source is answered to it too.
  Requests this node starts on its own (lookup queries, publishing) are not charged: they go to contacts learnt
  from the routing table or from answers, one small request each, and larger STOREs only go to nodes that answered
  a lookup;
* the requester is not trusted on its word: it enters the routing table only from a proven address, and a
  requester whose address is unproven only after answering that ping with its node id -- never straight from a
  request, as in the stock package (whose ``welcome_if_new`` also pushes STOREs to any new sender).

**Identity binding.**  This node's id is ``sha1(PublicKey protobuf)`` of its Ed25519 key and its message ids carry
the p2pmsg mark (:func:`~p2pmsg.dht.core.messages.new_message_id`).  When a peer whose request carried the mark
(version 2 or later) has a proven address, the engine sends it ``p2pmsg_auth [own id, 32-byte challenge]``; the
answer is an envelope (:func:`~p2pmsg.crypto.envelope.seal_envelope`, domain ``"p2pmsg-dht-auth"``, payload type
``/p2pmsg/dht-auth/2``) over ``challenge || requester id || responder id || requester address as the responder saw
it``, and the peer is *verified* when the signature holds, ``sha1(PublicKey protobuf of the signer) == its node id``
and the signed address is this node's own.  The address is what defeats a relay: a node M claiming H's id that
forwards our challenge to H gets back H's signature over *M's* address, not ours.  This node's own addresses are
those the driver declares (``own_address``: the bound address, or the local address of the route to a peer) and
those that peers in ``own_address_votes`` distinct networks (/24, /64) signed for it (behind a NAT: not when
the declared address is a public one).  Extension
RPCs go to marked peers only, so a stock node never receives one; peers are tracked per node id with the explicit
:class:`AuthState` machine below.

**Lookups** (:class:`~p2pmsg.dht.core.lookup.Lookup`) query ``alpha`` nodes at a time, skipping (as failed) an
address that let a request of ours time out less than ``silent_memory`` seconds ago and was not heard from since --
after churn, other nodes keep naming the dead for a while, and each lookup would otherwise wait for them again.
Answers are validated before they count: a ``find_value`` answer holding a value that is not a plain value (a
planted list, map, ``None``...) or, for signed lookups, not a verified record for the key, counts as a failed query
and the lookup goes on.  A plain lookup stops at the first valid value.  A signed lookup returns the highest valid
``seq`` it saw; it stops once the ``k`` closest non-failed candidates have all answered and one of them held a valid
record -- a publisher puts the record on the ``k`` closest -- or else runs on over the ``2k`` closest, where the
extra verified replicas are.

**Lifecycle.**  Stored values expire on their own: the driver also calls :meth:`~DhtEngine.tick` at
:meth:`~DhtEngine.next_expiry`, which drops them, with no traffic needed.  A holder never extends a value's lifetime: a
signed record's expiry is the owner's, inside its signature, and storing the same plain value again keeps its first
expiry; this node never re-publishes what it holds (only an owner republishes its record: unlike the stock
package, whose every holder re-stores every value hourly and so keeps it alive forever).  What a holder does do is
*hand off*: when a contact enters the routing table -- which needs a round trip from its address -- and this node
is the closest it knows to the key of a signed record it holds while the newcomer is among the ``k`` closest, it
STOREs the record, byte for byte, to the newcomer (at most ``handoff_max_records`` per newcomer, and
``handoff_rate`` per second in all; the search for such records, a walk of the store and the table, runs for at
most ``handoff_rate`` newcomers a second too), so a record stays on the nodes its readers ask after closer nodes
join, until the owner's next republish.  Plain values are never handed off (a copy would start a fresh lifetime
at the newcomer).  Bucket refresh is the driver's: it looks up :meth:`~DhtEngine.refresh_targets` when
:meth:`~DhtEngine.next_refresh_at` comes.  So is the *liveness check* that keeps the table to contacts that answer
(:mod:`~p2pmsg.dht.core.routing`): at :meth:`~DhtEngine.next_liveness_check` the driver calls
:meth:`~DhtEngine.check_liveness`, which pings every contact quiet for ``liveness_interval`` seconds (each at most
once per ``liveness_retry``); an answer from that id keeps it, a timeout or a malformed answer counts as a failure
(``max_failures`` of them evict it, or one if a replacement waits), and an answer from another id means the address
changed hands: the old contact is evicted and the answering one observed.

**Time.**  ``now`` is monotonic seconds from the driver; record expiry uses ``wall_clock()`` (Unix seconds).
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from p2pmsg.crypto.envelope import EnvelopeError, open_envelope, seal_envelope
from p2pmsg.dht.core.contact import NODE_ID_SIZE, Address, Contact, node_id_for_peer, node_id_from_public_key
from p2pmsg.dht.core.errors import (
    DhtUsageError,
    MalformedMessageError,
    RecordError,
    RecordTimeError,
    StoreRefusedError,
)
from p2pmsg.dht.core.events import DhtEvent, LookupDone, PeerVerified, PingDone, StoreDone
from p2pmsg.dht.core.limits import AddressGuard, RateLimiter
from p2pmsg.dht.core.lookup import Lookup
from p2pmsg.dht.core.messages import (
    AUTH_CHALLENGE_SIZE,
    AUTH_VERSION,
    EXTENSION_VERSION,
    HEADER_SIZE,
    AuthRequest,
    FindNodeRequest,
    FindValueRequest,
    FoundValue,
    IncomingRequest,
    IncomingResponse,
    PingRequest,
    Request,
    StoreRequest,
    StunRequest,
    UnknownRequest,
    decode_auth_address,
    decode_datagram,
    encode_auth_address,
    encode_request,
    encode_response,
    fit_contacts,
    is_plain_value,
    message_id_mark,
    new_message_id,
    nodes_body,
    parse_auth_response,
    parse_find_value_response,
    parse_nodes,
    parse_ping_response,
    parse_store_response,
    value_body,
)
from p2pmsg.dht.core.records import (
    VerifiedRecord,
    is_signed_value,
    peer_record_key,
    verify_record_value,
)
from p2pmsg.dht.core.routing import ContactAdded, ContactRemoved, PingNeeded, RoutingEvent, RoutingTable
from p2pmsg.dht.core.storage import RecordStore, StorageLimits, ValueKind, provider_prefix, source_prefix
from p2pmsg.errors import RemoteProtocolError
from p2pmsg.identity import Identity, PeerId

__all__ = ["AUTH_DOMAIN", "AUTH_PAYLOAD_TYPE", "AuthState", "DhtConfig", "DhtEngine", "ValueMode"]

log = logging.getLogger(__name__)

AUTH_DOMAIN: Final = "p2pmsg-dht-auth"
AUTH_PAYLOAD_TYPE: Final = b"/p2pmsg/dht-auth/2"
MAX_AUTH_RESPONSE: Final = 512
_MAX_DEFERRED_PER_ADDRESS: Final = 8
_VERIFIED_CACHE_SIZE: Final = 128
_REVERIFY_INTERVAL: Final = 60.0
"""Seconds between pings that settle who lives at an address whose requests name another id than its contact's."""
_LIFETIME_SAMPLES: Final = 64
"""Signers whose records' remaining lifetime the engine remembers (:meth:`DhtEngine.record_lifetimes`)."""
_LIFETIME_SAMPLES_PER_SOURCE: Final = 8
"""Of those, at most this many from records that came from one source network (IPv4 /24, IPv6 /64): signers cost
nothing, so without it one host sending records signed far into the future took every sample for good (they expire
last, and the stalest go first) and made ``Node.clock_offset`` call our clock weeks behind."""
_MAX_OWN_ADDRESSES: Final = 16
_MAX_ADDRESS_VOTES: Final = 64


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DhtConfig:
    """Tunables of a DHT node (defaults suit the public network; tests shrink them)."""

    k: int = 20
    alpha: int = 3
    #: A request unanswered for this long has failed (a dead peer costs at most this).
    rpc_timeout: float = 2.0
    #: A lookup query unanswered for this long stops counting against alpha.
    stall_timeout: float = 0.5
    split_depth_modulus: int = 5
    max_failures: int = 3
    #: Routing-table contacts one host (an IPv4 address, an IPv6 /64) may hold; loopback is exempt
    #: (:class:`~p2pmsg.dht.core.routing.RoutingTable`).  ``None``: no bound.
    max_contacts_per_host: int | None = 8
    max_pending: int = 4096
    #: Requests this node sends because of what others sent (address proofs, bucket pings, identity checks,
    #: hand-offs) may take at most ``max_pending - reserved_pending`` slots (default: a quarter is kept for this
    #: node's own pings, STOREs and lookups).
    reserved_pending: int | None = None
    #: Address-proof pings in flight: at most this many in all (default ``max_pending // 4``), and at most
    #: ``max_verify_per_source`` to the addresses of one source network (an IPv4 /24 or an IPv6 /64).
    max_verify_pending: int | None = None
    max_verify_per_source: int = 8
    max_lookups: int = 256
    storage: StorageLimits = dataclasses.field(default_factory=StorageLimits)
    request_rate_per_address: float = 100.0
    request_burst_per_address: float = 200.0
    request_rate_per_ip: float = 1000.0
    request_burst_per_ip: float = 2000.0
    #: Bytes of answers per second (and burst) to one *proven* address.  A proof only shows that the address talked
    #: to us within ``proven_ttl``; a request forged with its source (a 78-byte ``find_value`` for a 2 KB record)
    #: is answered to it all the same, so without this every node it talked to reflected 23 times the forger's bytes
    #: at it (up to ``request_rate_per_address`` requests a second).  Unproven addresses have their byte credit.
    answer_rate_per_address: float = 32768.0
    answer_burst_per_address: float = 262144.0
    #: STOREs per source *network* (an IPv4 /24 or an IPv6 /64, :func:`~p2pmsg.dht.core.storage.source_prefix`),
    #: despite the names (kept for existing configurations): one /24 must not get 256 times the rate of one host.
    store_rate_per_ip: float = 50.0
    store_burst_per_ip: float = 200.0
    #: STOREs per source *provider* (an IPv4 /16 or an IPv6 /32, :func:`~p2pmsg.dht.core.storage.provider_prefix`):
    #: this factor times the network's rate and burst (default 4: four networks of one provider at their full rate,
    #: where 256 /24s of a /16 would otherwise get 256 times it).  A STORE is charged to its provider only once its
    #: network's bucket let it through, so one network over its own rate never drains its provider's.
    store_provider_factor: float = 4.0
    proven_ttl: float = 1800.0
    auth_retry_interval: float = 600.0
    #: An address that peers in this many distinct source networks signed as ours (in ``p2pmsg_auth`` proofs) is
    #: taken as one of our own addresses (how a node behind a NAT learns its public address).
    own_address_votes: int = 2
    max_peers_tracked: int = 8192
    #: Whether to mark message ids and speak the p2pmsg extension RPCs at all.
    extensions: bool = True
    #: An address whose request timed out is not asked by lookups for this long, unless heard from meanwhile (other
    #: nodes' answers keep naming a dead node until their tables evict it: each lookup would wait for it again).
    silent_memory: float = 60.0
    #: A bucket no lookup went through for this long is refreshed with a lookup of a random id in it.
    refresh_interval: float = 3600.0
    #: A contact not heard from for this long is pinged ...
    liveness_interval: float = 900.0
    #: ... at most once in this many seconds (so a dead one leaves after ``max_failures`` of these).
    liveness_retry: float = 60.0
    #: Whether to hand signed records off to closer newcomers (module docstring), and its bounds.
    handoff: bool = True
    handoff_max_records: int = 8
    handoff_rate: float = 20.0
    handoff_burst: float = 100.0

    def __post_init__(self) -> None:
        if self.k < 1 or self.alpha < 1:
            raise DhtUsageError("DhtConfig.k and alpha must be positive")
        if self.max_contacts_per_host is not None and self.max_contacts_per_host < 1:
            raise DhtUsageError("DhtConfig.max_contacts_per_host must be positive (or None: no bound)")
        if not self.refresh_interval > 0 or self.silent_memory < 0:
            raise DhtUsageError("DhtConfig.refresh_interval must be positive and silent_memory not negative")
        if not self.liveness_interval > 0 or not self.liveness_retry >= self.rpc_timeout:
            raise DhtUsageError("DhtConfig needs liveness_interval > 0 and liveness_retry >= rpc_timeout")
        if self.handoff_max_records < 0 or self.handoff_rate <= 0 or self.handoff_burst < 1:
            raise DhtUsageError("DhtConfig handoff bounds: max_records >= 0, rate > 0, burst >= 1")
        if not 0 < self.stall_timeout <= self.rpc_timeout:
            raise DhtUsageError("DhtConfig needs 0 < stall_timeout <= rpc_timeout")
        if not self.store_provider_factor > 0 or self.store_provider_factor * self.store_burst_per_ip < 1:
            raise DhtUsageError("DhtConfig.store_provider_factor must be positive, with a provider burst >= 1")
        if self.own_address_votes < 1:
            raise DhtUsageError("DhtConfig.own_address_votes must be positive")
        if self.max_pending < 1 or self.max_verify_per_source < 1:
            raise DhtUsageError("DhtConfig.max_pending and max_verify_per_source must be positive")
        if not 0 <= self.pending_reserve < self.max_pending or self.verify_limit < 1:
            raise DhtUsageError("DhtConfig needs 0 <= reserved_pending < max_pending and max_verify_pending >= 1")

    @property
    def pending_reserve(self) -> int:
        """Pending-request slots only this node's own operations may use."""
        return self.max_pending // 4 if self.reserved_pending is None else self.reserved_pending

    @property
    def verify_limit(self) -> int:
        """Address-proof pings allowed in flight at once."""
        return max(1, self.max_pending // 4) if self.max_verify_pending is None else self.max_verify_pending


class ValueMode(enum.Enum):
    """What a value lookup accepts."""

    #: The stock ``get``: the first int/float/bool/str/bytes value found wins.
    PLAIN = "plain"
    #: Only signed records that verify for the key; the highest ``seq`` wins.
    SIGNED = "signed"


class AuthState(enum.Enum):
    """Where the identity check of a peer stands."""

    UNKNOWN = "unknown"  # never saw the p2pmsg mark from it: treat as a stock node
    ADVERTISED = "advertised"  # its requests carry the mark
    IN_PROGRESS = "in-progress"  # a p2pmsg_auth challenge is out
    VERIFIED = "verified"  # it proved its key, and its node id is bound to it
    FAILED = "failed"  # the challenge failed or timed out (retried after auth_retry_interval)


_AUTH_TRANSITIONS: Final[dict[AuthState, frozenset[AuthState]]] = {
    AuthState.UNKNOWN: frozenset({AuthState.ADVERTISED}),
    AuthState.ADVERTISED: frozenset({AuthState.IN_PROGRESS}),
    AuthState.IN_PROGRESS: frozenset({AuthState.VERIFIED, AuthState.FAILED}),
    AuthState.FAILED: frozenset({AuthState.IN_PROGRESS}),
    AuthState.VERIFIED: frozenset({AuthState.IN_PROGRESS}),
}


class _Peer:
    __slots__ = ("address", "auth", "last_attempt", "peer_id", "version")

    def __init__(self) -> None:
        self.auth = AuthState.UNKNOWN
        self.version = 0
        self.peer_id: PeerId | None = None
        self.address: Address | None = None
        self.last_attempt = float("-inf")

    def move(self, new: AuthState) -> None:
        if new not in _AUTH_TRANSITIONS[self.auth]:
            raise DhtUsageError(f"peer auth: illegal transition {self.auth.name} -> {new.name}")
        self.auth = new


class _Purpose(enum.Enum):
    PING = "ping"  # DhtEngine.ping
    STORE = "store"  # DhtEngine.store
    LOOKUP = "lookup"  # a lookup query
    VERIFY = "verify"  # proving a requester's address and id
    BUCKET = "bucket"  # the routing table asked whether its oldest contact lives
    LIVENESS = "liveness"  # a liveness check of a contact quiet for liveness_interval
    AUTH = "auth"  # p2pmsg_auth challenge
    HANDOFF = "handoff"  # a signed record handed to a closer newcomer


#: Requests sent because of what others sent or to keep the table, not because this node's user asked: they may not
#: use the reserve.
_BACKGROUND: Final = frozenset({_Purpose.VERIFY, _Purpose.BUCKET, _Purpose.LIVENESS, _Purpose.AUTH, _Purpose.HANDOFF})


@dataclasses.dataclass(slots=True, kw_only=True)
class _Call:
    msg_id: bytes
    address: Address
    purpose: _Purpose
    deadline: float
    op: int | None = None
    contact: Contact | None = None
    expected_id: bytes | None = None
    challenge: bytes | None = None


@dataclasses.dataclass(slots=True, kw_only=True)
class _LookupOp:
    op: int
    lookup: Lookup
    mode: ValueMode | None
    value: object = None
    found: bool = False
    record: VerifiedRecord | None = None
    rejected: int = 0
    hops: int | None = None
    holders: set[bytes] = dataclasses.field(default_factory=set)


class DhtEngine:
    """A DHT node's protocol logic (see the module docstring)."""

    def __init__(
        self,
        identity: Identity,
        *,
        config: DhtConfig | None = None,
        now: float = 0.0,
        random_bytes: Callable[[int], bytes] = os.urandom,
        wall_clock: Callable[[], float] = time.time,
        own_address: Callable[[Address], Address | None] | None = None,
        storage: RecordStore | None = None,
    ) -> None:
        """``own_address(peer)``: this node's address as ``peer`` sees it when no NAT is in between (the bound
        address, or for a wildcard bind the local address of the route to ``peer``), ``None`` if unknown; it is
        what a ``p2pmsg_auth`` proof must sign (module docstring).  ``storage``: the record store to use (default
        a new :class:`RecordStore` with ``config.storage``), e.g. one that also notes what it takes in."""
        self.identity = identity
        self.config = config or DhtConfig()
        self.node_id = node_id_from_public_key(identity.public_key)
        self._random = random_bytes
        self._wall = wall_clock
        cfg = self.config
        self.table = RoutingTable(
            self.node_id,
            k=cfg.k,
            split_depth_modulus=cfg.split_depth_modulus,
            max_failures=cfg.max_failures,
            max_per_host=cfg.max_contacts_per_host,
            now=now,
        )
        self.storage = storage if storage is not None else RecordStore(cfg.storage)
        self.guard = AddressGuard(proven_ttl=cfg.proven_ttl, max_entries=cfg.max_peers_tracked)
        self._addr_limiter: RateLimiter[Address] = RateLimiter(
            rate=cfg.request_rate_per_address, burst=cfg.request_burst_per_address
        )
        self._ip_limiter: RateLimiter[str] = RateLimiter(rate=cfg.request_rate_per_ip, burst=cfg.request_burst_per_ip)
        self._store_limiter: RateLimiter[str] = RateLimiter(rate=cfg.store_rate_per_ip, burst=cfg.store_burst_per_ip)
        self._store_provider_limiter: RateLimiter[str] = RateLimiter(
            rate=cfg.store_provider_factor * cfg.store_rate_per_ip,
            burst=cfg.store_provider_factor * cfg.store_burst_per_ip,
        )
        self._handoff_limiter: RateLimiter[None] = RateLimiter(rate=cfg.handoff_rate, burst=cfg.handoff_burst)
        self._answer_limiter: RateLimiter[Address] = RateLimiter(
            rate=cfg.answer_rate_per_address, burst=cfg.answer_burst_per_address, max_sources=cfg.max_peers_tracked
        )
        self._handoff_scans: RateLimiter[None] = RateLimiter(rate=cfg.handoff_rate, burst=cfg.handoff_burst)
        self._pending: dict[bytes, _Call] = {}
        self._background_pending = 0
        self._verify_by_source: dict[str, int] = {}
        self._timers: list[tuple[float, int, bytes]] = []
        self._timer_seq = 0
        self._verifying: dict[Address, bytes] = {}
        self._deferred: dict[Address, list[tuple[bytes, Request]]] = {}
        self._peers: OrderedDict[bytes, _Peer] = OrderedDict()
        self._signed_keys: OrderedDict[bytes, None] = OrderedDict()
        self._own_address = own_address
        self._own_addresses: OrderedDict[Address, None] = OrderedDict()
        self._address_votes: OrderedDict[Address, set[str]] = OrderedDict()
        self._verified: OrderedDict[tuple[bytes, bytes], VerifiedRecord] = OrderedDict()
        self._lifetimes: dict[bytes, tuple[int, float, int, str]] = {}  # signer: expires_at, left, lifetime, network
        self._own_peer = identity.peer_id.to_bytes()
        self._silent: OrderedDict[Address, float] = OrderedDict()
        self._pinging: dict[Address, tuple[int, float]] = {}  # address: pings pending (:meth:`ping`), since when
        #: An address whose request names another id than its contact's is pinged to settle who lives there, at most
        #: once a minute (else one address answering under ever new ids replaced its contact at every request).
        self._reverify_limiter: RateLimiter[Address] = RateLimiter(
            rate=1 / _REVERIFY_INTERVAL, burst=1.0, max_sources=cfg.max_peers_tracked
        )
        self._lookups: dict[int, _LookupOp] = {}
        self._next_op = 1
        self._out: list[tuple[bytes, Address]] = []
        self._events: list[DhtEvent] = []
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "datagrams_in",
                "datagrams_out",
                "bytes_in",
                "bytes_out",
                "malformed",
                "rate_limited",
                "unknown_rpc",
                "unexpected_response",
                "timeouts",
                "answers_deferred",
                "amplification_truncated",
                "amplification_dropped",
                "answers_capped",
                "stores_accepted",
                "stores_refused",
                "values_rejected",
                "peers_verified",
                "auth_failed",
                "pending_full",
                "verify_capped",
                "records_expired",
                "records_out_of_time",
                "handoffs_sent",
                "handoffs_stored",
                "handoffs_skipped",
                "handoff_scans_skipped",
                "silent_skipped",
                "liveness_checks",
                "liveness_evicted",
            ),
            0,
        )
        self._reserve_signed_key(peer_record_key(identity.peer_id))

    # =================================================================================================================
    # Driver interface
    # =================================================================================================================

    def take_datagrams(self) -> list[tuple[bytes, Address]]:
        """The datagrams to send, in order (the list is handed over and cleared)."""
        out, self._out = self._out, []
        return out

    def take_events(self) -> list[DhtEvent]:
        """The events produced so far (handed over and cleared)."""
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must next be called (``None``: only when something else happens)."""
        times: list[float] = []
        while self._timers and self._timers[0][2] not in self._pending:
            heapq.heappop(self._timers)
        if self._timers:
            times.append(self._timers[0][0])
        for op in self._lookups.values():
            deadline = op.lookup.next_deadline()
            if deadline is not None:
                times.append(deadline)
        return min(times) if times else None

    def next_expiry(self) -> float | None:
        """When a stored value next expires (:meth:`tick` then drops it; lookups never return it anyway).  Kept apart
        from :meth:`next_deadline`, which is ``None`` when no request or lookup is running."""
        return self.storage.next_expiry()

    def tick(self, now: float) -> None:
        """Let time pass: fail overdue requests, let slow lookup queries stall, move lookups on, drop expired
        values."""
        self.stats["records_expired"] += self.storage.purge(now)
        while self._timers and self._timers[0][0] <= now:
            _, _, msg_id = heapq.heappop(self._timers)
            call = self._pending.get(msg_id)
            if call is not None and call.deadline <= now:
                self._forget_call(call)
                self.stats["timeouts"] += 1
                self._note_silent(call.address, now)
                self._on_failure(call, now, timed_out=True)
        for op_id in list(self._lookups):
            op = self._lookups.get(op_id)
            if op is not None:
                op.lookup.tick(now)
                self._pump(op, now)

    def datagram_received(self, data: bytes, address: Address, now: float) -> None:
        """Handle one datagram from ``address``; bad input is counted and dropped, never raised."""
        self.stats["datagrams_in"] += 1
        self.stats["bytes_in"] += len(data)
        # The answer to a request of ours from the address it went to is not charged to the sender's rate limit (a
        # node we query a lot must not lose its own requests to us, nor we its answers); anything else is, before it
        # is decoded.  Only the header is looked at here: decoding still checks every byte.
        call = self._pending.get(bytes(data[1:HEADER_SIZE])) if data[:1] == b"\x01" else None
        solicited = call is not None and call.address == address
        if not solicited and (
            not self._addr_limiter.allow(address, now) or not self._ip_limiter.allow(address[0], now)
        ):
            self.stats["rate_limited"] += 1
            return
        try:
            message = decode_datagram(data)
        except MalformedMessageError as exc:
            self.stats["malformed"] += 1
            log.debug("dropping datagram from %s: %s", address, exc)
            if solicited and call is not None:
                # It named a request of ours but is no answer: charged after all, and that request fails now, so a
                # pending id buys at most one datagram past the limits.
                self._addr_limiter.allow(address, now)
                self._ip_limiter.allow(address[0], now)
                self._forget_call(call)
                self._on_failure(call, now, timed_out=False)
            return
        if isinstance(message, IncomingRequest):
            self.guard.received(address, len(data), now)
            self._on_request(message, address, now, len(data))
        else:
            self._on_response(message, address, now)

    # =================================================================================================================
    # Operations
    # =================================================================================================================

    def ping(self, address: Address, now: float) -> int:
        """Ping ``address``; a :class:`PingDone` follows.  On an answer the node enters the routing table."""
        op = self._new_op()
        msg_id = self._send_request(address, PingRequest(node_id=self.node_id), _Purpose.PING, now, op=op)
        if msg_id is None:
            self._events.append(PingDone(op=op, address=address, node_id=None))
        return op

    def store(self, contact: Contact, key: bytes, value: object, now: float) -> int:
        """Send ``store [own id, key, value]`` to ``contact``; a :class:`StoreDone` follows."""
        self._check_key(key)
        op = self._new_op()
        request = StoreRequest(node_id=self.node_id, key=key, value=value)
        msg_id = self._send_request(contact.address, request, _Purpose.STORE, now, op=op, contact=contact)
        if msg_id is None:
            self._events.append(StoreDone(op=op, contact=contact, stored=False))
        return op

    def lookup_nodes(self, target: bytes, now: float, *, count: int | None = None) -> int:
        """Start a node lookup for ``target``; a :class:`LookupDone` with the ``count`` (default k) closest
        responders follows."""
        return self._start_lookup(target, None, now, count, use_local=False)

    def lookup_value(self, key: bytes, now: float, *, mode: ValueMode = ValueMode.PLAIN, use_local: bool = True) -> int:
        """Start a value lookup for ``key``; a :class:`LookupDone` follows.

        The local store is consulted first unless ``use_local`` is false (benchmarks measure network lookups).
        A signed lookup runs over the ``2k`` closest nodes, where :meth:`signed_record_targets` puts records.
        """
        count = 2 * self.config.k if mode is ValueMode.SIGNED else None
        return self._start_lookup(key, mode, now, count, use_local=use_local)

    def cancel(self, op: int) -> None:
        """Forget a running lookup (its late answers still feed the routing table)."""
        self._lookups.pop(op, None)

    def store_local(self, key: bytes, value: object, now: float) -> bool:
        """Keep ``value`` in this node's own store, validated like a remote STORE; whether it was accepted."""
        return self._accept_store(key, value, "local", now)

    def add_own_address(self, address: Address) -> None:
        """Declare an address peers reach this node at (``p2pmsg_auth`` proofs signed for it are accepted)."""
        own = decode_auth_address(encode_auth_address(address))
        self._own_addresses[own] = None
        self._own_addresses.move_to_end(own)
        while len(self._own_addresses) > _MAX_OWN_ADDRESSES:
            self._own_addresses.popitem(last=False)

    def own_addresses(self) -> list[Address]:
        """The addresses this node knows it is reached at (declared, or signed for it by enough networks)."""
        return list(self._own_addresses)

    def verify_record(self, key: bytes, value: object) -> VerifiedRecord:
        """Check a signed-record value for ``key`` now (every check of :func:`verify_record_value`); raises
        :class:`~p2pmsg.dht.core.errors.RecordError` naming the first failure."""
        self._check_key(key)
        return self._verify_record(key, value, self._wall(), source="local")

    def is_verified(self, contact: Contact) -> bool:
        """Whether ``contact`` proved that its node id belongs to its key, from its current address."""
        peer = self._peers.get(contact.node_id)
        return peer is not None and peer.auth is AuthState.VERIFIED and peer.address == contact.address

    def verified_peer(self, node_id: bytes) -> PeerId | None:
        """The peer id bound to ``node_id`` by a successful challenge, if any."""
        peer = self._peers.get(node_id)
        return peer.peer_id if peer is not None and peer.auth is AuthState.VERIFIED else None

    def signed_record_targets(self, done: LookupDone) -> list[Contact]:
        """Where to STORE a signed record, given a lookup of its key over ``2k`` nodes (``lookup_nodes(key, now,
        count=2 * k)``): the k closest responders, plus the closest *verified* responders among the next k, one for
        each unverified (stock) node among the k closest.  Stock nodes keep whatever anyone stores next; verified
        p2pmsg nodes keep only the highest valid record, and signed lookups read the ``2k`` closest."""
        k = self.config.k
        closest = list(done.closest[:k])
        unverified = sum(1 for c in closest if not self.is_verified(c))
        extras = [c for c in done.closest[k:] if self.is_verified(c)][:unverified]
        return closest + extras

    def auth_state(self, node_id: bytes) -> AuthState:
        """The identity-check state of ``node_id``."""
        peer = self._peers.get(node_id)
        return AuthState.UNKNOWN if peer is None else peer.auth

    def refresh_targets(self, now: float, max_age: float | None = None) -> list[bytes]:
        """A random id inside each bucket untouched for ``max_age`` (default ``refresh_interval``) seconds; looking
        them up refreshes the table."""
        max_age = self.config.refresh_interval if max_age is None else max_age
        targets = []
        for low, high in self.table.stale_buckets(now, max_age):
            offset = int.from_bytes(self._random(NODE_ID_SIZE), "big") % (high - low)
            targets.append((low + offset).to_bytes(NODE_ID_SIZE, "big"))
        return targets

    def next_refresh_at(self, max_age: float | None = None) -> float:
        """When the least recently touched bucket becomes due for a refresh (see :meth:`refresh_targets`)."""
        max_age = self.config.refresh_interval if max_age is None else max_age
        return min(b.last_touched for b in self.table.buckets()) + max_age

    def check_liveness(self, now: float) -> int:
        """Ping the contacts due for a liveness check (module docstring); returns how many pings went out."""
        cfg = self.config
        sent = 0
        for contact in self.table.quiet_contacts(now, cfg.liveness_interval, cfg.liveness_retry):
            request = PingRequest(node_id=self.node_id)
            if self._send_request(contact.address, request, _Purpose.LIVENESS, now, contact=contact) is not None:
                sent += 1
        self.stats["liveness_checks"] += sent
        return sent

    def next_liveness_check(self) -> float:
        """When :meth:`check_liveness` next has a contact to ping (``inf``: the routing table is empty)."""
        return self.table.next_liveness_check(self.config.liveness_interval, self.config.liveness_retry)

    @property
    def pending_requests(self) -> int:
        """How many requests await an answer."""
        return len(self._pending)

    # =================================================================================================================
    # Requests from the network
    # =================================================================================================================

    def _on_request(self, message: IncomingRequest, address: Address, now: float, size: int) -> None:
        self._heard_from(address, now)
        request = message.request
        if isinstance(request, UnknownRequest) or (isinstance(request, AuthRequest) and not self.config.extensions):
            self.stats["unknown_rpc"] += 1
            return
        sender = None if isinstance(request, StunRequest) else request.node_id
        if sender == self.node_id:
            self.stats["malformed"] += 1
            return
        if sender is not None and self.config.extensions:
            version = message_id_mark(message.msg_id)
            if version is not None:
                self._advertised(sender, version)
        if self.guard.is_proven(address, now):
            if isinstance(request, StoreRequest) and not self._store_allowed(address, now):
                return
            datagram = encode_response(message.msg_id, self._answer(request, address, now))
            if not self._answer_limiter.allow(address, now, len(datagram)):
                self.stats["answers_capped"] += 1
                if not isinstance(request, FindNodeRequest | FindValueRequest):
                    return
                # Over the budget, a find_* still gets an answer no larger than the request (contacts, if any fit):
                # silence would look like a timeout to an honest requester (which then drops us), and the address a
                # forger named gets no more bytes than were forged.
                fitted = fit_contacts(self._closest_for(request, address), size - HEADER_SIZE)
                datagram = encode_response(message.msg_id, nodes_body(fitted))
            self._emit(datagram, address)
            if sender is not None:
                holder = self.table.holder(address)
                if holder is None or holder == sender:
                    self._observe(Contact(node_id=sender, host=address[0], port=address[1]), now)
                elif self._reverify_limiter.allow(address, now):  # another id holds the address (maybe one a
                    self._verify_requester(sender, address, now)  # third node gave for it): its pong decides
            return
        # Unproven address.  A ping is answered at once (the answer, 43 bytes, is smaller than the ping, so this is
        # never an amplifier, and it is what lets two new nodes prove themselves to each other without deadlock).
        # Anything else first makes the address prove itself with a ping (paid from its credit) and is answered once
        # it has; a request that can be neither answered nor held is dropped before it has any effect.
        if isinstance(request, PingRequest):
            datagram = encode_response(message.msg_id, self._answer(request, address, now))
            if self.guard.try_spend(address, len(datagram), now):
                self._emit(datagram, address)
                self._verify_requester(sender, address, now)
                return
        elif self._verify_requester(sender, address, now):
            held = self._deferred.setdefault(address, [])
            if len(held) >= _MAX_DEFERRED_PER_ADDRESS:
                self.stats["amplification_dropped"] += 1
                return
            # The request itself waits, not only its answer: a STORE from an address that never proves itself (a
            # forged source) is never carried out and never charged to the network or provider it claims.
            held.append((message.msg_id, request))
            self.stats["answers_deferred"] += 1
            return
        # Not even a ping is covered: answer only what the credit covers, cutting a contact list if need be.
        if isinstance(request, FindNodeRequest | FindValueRequest):
            budget = self.guard.budget(address, now) or 0
            body = self._answer(request, address, now)
            datagram = encode_response(message.msg_id, body)
            if len(datagram) > budget:
                fitted = fit_contacts(self._closest_for(request, address), budget - HEADER_SIZE)
                datagram = encode_response(message.msg_id, nodes_body(fitted))
                self.stats["amplification_truncated"] += 1
            if self.guard.try_spend(address, len(datagram), now):
                self._emit(datagram, address)
                return
        elif not isinstance(request, StoreRequest | PingRequest):
            datagram = encode_response(message.msg_id, self._answer(request, address, now))
            if self.guard.try_spend(address, len(datagram), now):
                self._emit(datagram, address)
                return
        self.stats["amplification_dropped"] += 1

    def _store_allowed(self, address: Address, now: float) -> bool:
        """Take a token from the STORE buckets of ``address``'s network, then of its provider (a STORE refused by
        its network costs its provider nothing); count a refusal.  Only for proven addresses: a forged source cannot
        drain the buckets of the networks it claims."""
        if self._store_limiter.allow(source_prefix(address[0]), now) and self._store_provider_limiter.allow(
            provider_prefix(address[0]), now
        ):
            return True
        self.stats["rate_limited"] += 1
        return False

    def _closest_for(self, request: FindNodeRequest | FindValueRequest, address: Address) -> list[Contact]:
        return self.table.closest(
            request.key, self.config.k, exclude_ids=(request.node_id,), exclude_addresses=(address,)
        )

    def _answer(self, request: Request, address: Address, now: float) -> object:
        if isinstance(request, PingRequest):
            return self.node_id
        if isinstance(request, StunRequest):
            return [address[0], address[1]]
        if isinstance(request, StoreRequest):
            return self._accept_store(request.key, request.value, address[0], now)
        if isinstance(request, AuthRequest):
            payload = request.challenge + request.node_id + self.node_id + encode_auth_address(address)
            return seal_envelope(self.identity, domain=AUTH_DOMAIN, payload_type=AUTH_PAYLOAD_TYPE, payload=payload)
        if isinstance(request, FindValueRequest):
            stored = self.storage.get(request.key, now)
            if stored is not None:
                return value_body(stored.value)
        return nodes_body(self._closest_for(request, address))

    def _accept_store(self, key: bytes, value: object, source: str, now: float) -> bool:
        try:
            if is_signed_value(value):
                wall = self._wall()
                record = self._verify_record(key, value, wall, source=source)
                assert isinstance(value, bytes)
                self.storage.put_signed(
                    key,
                    value,
                    seq=record.seq,
                    expires_at=now + (record.expires_at - wall),
                    source=source,
                    now=now,
                    reserved=record.signer == self.identity.peer_id,  # our own record always fits
                )
                self._reserve_signed_key(key)
            else:
                if key in self._signed_keys:
                    raise StoreRefusedError("key belongs to a signed namespace: an unsigned value is refused")
                self.storage.put_plain(key, value, source=source, now=now)
        except (RecordError, StoreRefusedError) as exc:
            self.stats["stores_refused"] += 1
            if isinstance(exc, RecordTimeError):
                self.stats["records_out_of_time"] += 1
            log.debug("refusing STORE of %s from %s: %s", key.hex(), source, exc)
            return False
        self.stats["stores_accepted"] += 1
        return True

    def _verify_record(self, key: bytes, value: object, wall: float, *, source: str) -> VerifiedRecord:
        """:func:`verify_record_value`, remembering the last records that verified: a lookup meets the same bytes
        at every holder, and one Ed25519 check is worth ~80 us.  A remembered record is only re-checked for expiry
        (its other checks do not depend on time, and its lifetime bound only gets looser as time passes).
        ``source`` is the IP the value came from (``"local"``: our own store), for the clock samples."""
        if isinstance(value, bytes):
            cached = self._verified.get((key, value))
            if cached is not None:
                signer = cached.signer.to_bytes()
                self._note_lifetime(signer, cached.seq, cached.expires_at, wall, source)
                if cached.expires_at <= wall:
                    del self._verified[(key, value)]
                    raise RecordTimeError(
                        f"signed record expired at {cached.expires_at} (now {int(wall)})",
                        signer=signer,
                        seq=cached.seq,
                        expires_at=cached.expires_at,
                    )
                self._verified.move_to_end((key, value))
                return cached
        try:
            record = verify_record_value(key, value, now=wall, max_size=self.config.storage.max_signed_value_size)
        except RecordTimeError as exc:
            self._note_lifetime(exc.signer, exc.seq, exc.expires_at, wall, source)
            raise
        self._note_lifetime(record.signer.to_bytes(), record.seq, record.expires_at, wall, source)
        self._verified[(key, record.value)] = record
        while len(self._verified) > _VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return record

    def _note_lifetime(self, signer: bytes, seq: int, expires_at: int, wall: float, source: str) -> None:
        """Remember the freshest record of ``signer`` we examined: how long (s) it had left to live by our clock
        when we saw it, and its own lifetime ``expires_at - seq`` (a p2pmsg record's ``seq`` is its signer's clock
        when it signed, in seconds), with the network of the ``source`` it came from."""
        if signer == self._own_peer:
            return
        samples = self._lifetimes
        known = samples.get(signer)
        if known is not None and expires_at < known[0]:  # a stale copy served by some holder does not replace it
            return
        if known is not None and expires_at == known[0]:  # the same record again (our own check of a STORE we took,
            samples[signer] = (expires_at, expires_at - wall, expires_at - seq, known[3])  # another holder's copy)
            return  # stays with the network that brought it
        network = source_prefix(source)
        samples.pop(signer, None)
        # Drop the stalest record, not the least recently seen: a holder that hands on many records of nodes long
        # gone (stock nodes store every value again each hour) must not push out every live node's.  A network over
        # its share gives up its own stalest.
        same = [s for s, sample in samples.items() if sample[3] == network]
        if len(same) >= _LIFETIME_SAMPLES_PER_SOURCE:
            del samples[min(same, key=lambda s: samples[s][0])]
        samples[signer] = (expires_at, expires_at - wall, expires_at - seq, network)
        if len(samples) > _LIFETIME_SAMPLES:
            del samples[min(samples, key=lambda s: samples[s][0])]

    def record_lifetimes(self) -> list[tuple[float, float]]:
        """For the last :data:`_LIFETIME_SAMPLES` other signers whose records we examined (for a STORE or a read,
        also those refused for their times), ``(left, lifetime)`` of the freshest one: the time (s) it had left by
        our clock when we saw it, and ``expires_at - seq``.  See ``Node.clock_offset``, which judges our clock by
        them."""
        return [(left, lifetime) for _, left, lifetime, _ in self._lifetimes.values()]

    def _note_silent(self, address: Address, now: float) -> None:
        self._silent[address] = now
        self._silent.move_to_end(address)
        while len(self._silent) > self.config.max_peers_tracked:
            self._silent.popitem(last=False)

    def _heard_from(self, address: Address, now: float) -> None:
        """``address`` sent us something: it is not silent, and pings still pending to it have not stalled yet."""
        self._silent.pop(address, None)
        pinging = self._pinging.get(address)
        if pinging is not None:
            self._pinging[address] = (pinging[0], now)

    def _ping_stalled(self, address: Address, now: float) -> bool:
        """Whether a :meth:`ping` of ``address`` is pending and nothing came from there for ``stall_timeout``.
        Lookups skip such an address as they skip a silent one: a restarted node pings the nodes of its saved routing
        table, and others still name the ones that died since; without this, its first lookups waited for their
        timeouts (``rpc_timeout``), which its pings were about to find anyway."""
        pinging = self._pinging.get(address)
        return pinging is not None and now - pinging[1] >= self.config.stall_timeout

    def _is_silent(self, address: Address, now: float) -> bool:
        """Whether a request to ``address`` timed out less than ``silent_memory`` ago with nothing heard since."""
        since = self._silent.get(address)
        if since is None:
            return False
        if now - since >= self.config.silent_memory:
            del self._silent[address]
            return False
        return True

    def _reserve_signed_key(self, key: bytes) -> None:
        self._signed_keys[key] = None
        self._signed_keys.move_to_end(key)
        while len(self._signed_keys) > self.config.max_peers_tracked:
            self._signed_keys.popitem(last=False)

    # =================================================================================================================
    # Contacts, address proofs and identity checks
    # =================================================================================================================

    def _observe(self, contact: Contact, now: float, *, answered_ping: bool = False) -> None:
        self._routing_events(self.table.observe(contact, now, answered_ping=answered_ping), now)
        self._maybe_auth(contact, now)

    def _routing_events(self, events: list[RoutingEvent], now: float) -> None:
        for event in events:
            if isinstance(event, PingNeeded):
                request = PingRequest(node_id=self.node_id)
                msg_id = self._send_request(event.contact.address, request, _Purpose.BUCKET, now, contact=event.contact)
                if msg_id is None:
                    self.table.ping_not_sent(event.contact.node_id)
            elif isinstance(event, ContactAdded):
                self._maybe_auth(event.contact, now)
                self._handoff(event.contact, now)

    def _liveness_evict(self, events: list[RoutingEvent], now: float) -> None:
        """Apply the routing events of a failed liveness check, counting the contacts it evicted."""
        self.stats["liveness_evicted"] += sum(isinstance(event, ContactRemoved) for event in events)
        self._routing_events(events, now)

    def _handoff(self, newcomer: Contact, now: float) -> None:
        """STORE to ``newcomer`` (just added to the table, so its address made a round trip) the signed records for
        whose key this node is the closest it knows and ``newcomer`` among the k closest (module docstring)."""
        cfg = self.config
        if not cfg.handoff or cfg.handoff_max_records == 0 or not self.guard.is_proven(newcomer.address, now):
            return
        # The scan below walks the store and the table (about 3 ms with 2,400 contacts): bounded by its own bucket,
        # so newcomers made faster than that (many hosts under ever new ids) cannot eat the node's CPU.
        if not self._handoff_limiter.would_allow(None, now) or not self._handoff_scans.allow(None, now):
            self.stats["handoff_scans_skipped"] += 1
            return
        signed = [v for v in self.storage.items(now) if v.kind is ValueKind.SIGNED]
        if not signed:
            return
        own = int.from_bytes(self.node_id, "big")
        new = newcomer.id_int
        others = [c.id_int for c in self.table.contacts() if c.node_id != newcomer.node_id]
        # A contact c is closer to a key than this node iff the highest bit where c differs from this node is set in
        # (own id XOR key).  So "no contact is closer" is one AND against the set of those highest bits.
        classes = 0
        for other in others:
            classes |= 1 << ((other ^ own).bit_length() - 1)
        sent = 0
        for stored in signed:
            key = int.from_bytes(stored.key, "big")
            if classes & (own ^ key):
                continue  # another contact is closer to the key: leave the hand-off to it
            theirs = new ^ key
            if sum(1 for other in others if other ^ key < theirs) >= cfg.k:
                continue  # the newcomer is not among the k closest we know
            if sent >= cfg.handoff_max_records or not self._handoff_limiter.allow(None, now):
                self.stats["handoffs_skipped"] += 1
                continue
            request = StoreRequest(node_id=self.node_id, key=stored.key, value=stored.value)
            if self._send_request(newcomer.address, request, _Purpose.HANDOFF, now, contact=newcomer) is not None:
                self.stats["handoffs_sent"] += 1
                sent += 1

    def _verify_requester(self, claimed: bytes | None, address: Address, now: float) -> bool:
        """Make sure a ping proving ``address`` is out (charged to its credit); whether one is."""
        if address in self._verifying:
            return True
        request = PingRequest(node_id=self.node_id)
        msg_id = self._send_request(address, request, _Purpose.VERIFY, now, expected_id=claimed, charge=True)
        if msg_id is None:
            return False
        self._verifying[address] = msg_id
        return True

    def _peer(self, node_id: bytes) -> _Peer:
        peer = self._peers.get(node_id)
        if peer is None:
            peer = self._peers[node_id] = _Peer()
            while len(self._peers) > self.config.max_peers_tracked:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(node_id)
        return peer

    def _advertised(self, node_id: bytes, version: int) -> None:
        peer = self._peer(node_id)
        peer.version = version
        if peer.auth is AuthState.UNKNOWN:
            peer.move(AuthState.ADVERTISED)

    def _maybe_auth(self, contact: Contact, now: float) -> None:
        if not self.config.extensions:
            return
        peer = self._peers.get(contact.node_id)
        if peer is None or peer.auth in (AuthState.UNKNOWN, AuthState.IN_PROGRESS) or peer.version < AUTH_VERSION:
            return
        if peer.auth is AuthState.VERIFIED and peer.address == contact.address:
            return
        if peer.auth is not AuthState.ADVERTISED and now - peer.last_attempt < self.config.auth_retry_interval:
            return
        if not self.guard.is_proven(contact.address, now) or self.table.get(contact.node_id) != contact:
            return
        challenge = self._random(AUTH_CHALLENGE_SIZE)
        request = AuthRequest(node_id=self.node_id, challenge=challenge)
        msg_id = self._send_request(contact.address, request, _Purpose.AUTH, now, contact=contact, challenge=challenge)
        if msg_id is not None:
            peer.move(AuthState.IN_PROGRESS)
            peer.last_attempt = now

    def _is_own_address(self, observed: Address, responder: Address) -> bool:
        """Whether ``observed`` (signed by the responder at ``responder``) is this node's address; also counts it as
        a vote from the responder's network (:attr:`DhtConfig.own_address_votes`)."""
        if observed in self._own_addresses:
            return True
        if self._own_address is not None:
            declared = self._own_address(responder)
            if declared is not None:
                declared = decode_auth_address(encode_auth_address(declared))
                if declared == observed:
                    return True
                if ipaddress.ip_address(declared[0]).is_global:
                    return False  # a public address of our own: no NAT to learn about, so no votes either
        voters = self._address_votes.pop(observed, set())
        voters.add(source_prefix(responder[0]))
        if len(voters) >= self.config.own_address_votes:
            log.info("learned our address %s:%d from %d networks", observed[0], observed[1], len(voters))
            self.add_own_address(observed)
            return True
        self._address_votes[observed] = voters
        while len(self._address_votes) > _MAX_ADDRESS_VOTES:
            self._address_votes.popitem(last=False)
        return False

    def _auth_answered(self, call: _Call, body: object, now: float) -> None:
        contact = call.contact
        assert contact is not None and call.challenge is not None
        peer = self._peer(contact.node_id)
        if peer.auth is not AuthState.IN_PROGRESS:
            return
        try:
            proof = parse_auth_response(body, max_size=MAX_AUTH_RESPONSE)
            signer, payload = open_envelope(
                proof, domain=AUTH_DOMAIN, payload_type=AUTH_PAYLOAD_TYPE, max_size=MAX_AUTH_RESPONSE
            )
            head = call.challenge + self.node_id + contact.node_id
            if payload[: len(head)] != head:
                raise RecordError("p2pmsg_auth proof signs another challenge or other node ids")
            observed = decode_auth_address(payload[len(head) :])
            if node_id_for_peer(signer) != contact.node_id:
                raise RecordError("p2pmsg_auth signer's key does not hash to the node id")
            if not self._is_own_address(observed, contact.address):
                raise RecordError(
                    f"p2pmsg_auth proof was made for a request from {observed[0]}:{observed[1]}, not from this node"
                    " (a relayed challenge, or a public address not known yet)"
                )
        except (RemoteProtocolError, EnvelopeError) as exc:
            self.stats["auth_failed"] += 1
            log.debug("identity check of %s failed: %s", contact, exc)
            peer.move(AuthState.FAILED)
            return
        peer.move(AuthState.VERIFIED)
        peer.peer_id = signer
        peer.address = contact.address
        self.stats["peers_verified"] += 1
        self._reserve_signed_key(peer_record_key(signer))
        self._events.append(PeerVerified(contact=contact, peer_id=signer))

    # =================================================================================================================
    # Our requests and their answers
    # =================================================================================================================

    def _new_op(self) -> int:
        op = self._next_op
        self._next_op += 1
        return op

    def _new_msg_id(self) -> bytes:
        while True:
            if self.config.extensions:
                msg_id = new_message_id(self._random(12), version=EXTENSION_VERSION)
            else:
                msg_id = self._random(20)
            if msg_id not in self._pending:
                return msg_id

    def _send_request(
        self,
        address: Address,
        request: Request,
        purpose: _Purpose,
        now: float,
        *,
        op: int | None = None,
        contact: Contact | None = None,
        expected_id: bytes | None = None,
        challenge: bytes | None = None,
        charge: bool = False,
    ) -> bytes | None:
        """Queue a request; ``None`` if it cannot be sent (too many pending, or an uncovered ``charge``).

        Background requests (:data:`_BACKGROUND`) stay out of the reserved slots, and address-proof pings within
        their global and per-network caps, so requests from the network can never use up the table that this
        node's own lookups need."""
        cfg = self.config
        if len(self._pending) >= cfg.max_pending or (
            purpose in _BACKGROUND and self._background_pending >= cfg.max_pending - cfg.pending_reserve
        ):
            self.stats["pending_full"] += 1
            return None
        source = source_prefix(address[0])
        if purpose is _Purpose.VERIFY and (
            len(self._verifying) >= cfg.verify_limit
            or self._verify_by_source.get(source, 0) >= cfg.max_verify_per_source
        ):
            self.stats["verify_capped"] += 1
            return None
        msg_id = self._new_msg_id()
        datagram = encode_request(msg_id, request)
        if charge and not self.guard.try_spend(address, len(datagram), now):
            return None
        if purpose in _BACKGROUND:
            self._background_pending += 1
        if purpose is _Purpose.VERIFY:
            self._verify_by_source[source] = self._verify_by_source.get(source, 0) + 1
        deadline = now + cfg.rpc_timeout
        self._pending[msg_id] = _Call(
            msg_id=msg_id,
            address=address,
            purpose=purpose,
            deadline=deadline,
            op=op,
            contact=contact,
            expected_id=expected_id,
            challenge=challenge,
        )
        if purpose is _Purpose.PING:
            count, since = self._pinging.get(address, (0, now))
            self._pinging[address] = (count + 1, since)
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, msg_id))
        self._emit(datagram, address)
        return msg_id

    def _forget_call(self, call: _Call) -> None:
        """Take ``call`` out of the pending table (it was answered or timed out) and release its slots."""
        del self._pending[call.msg_id]
        if call.purpose in _BACKGROUND:
            self._background_pending -= 1
        if call.purpose is _Purpose.PING:
            count, since = self._pinging[call.address]
            if count > 1:
                self._pinging[call.address] = (count - 1, since)
            else:
                del self._pinging[call.address]
        if call.purpose is _Purpose.VERIFY:
            source = source_prefix(call.address[0])
            left = self._verify_by_source[source] - 1
            if left:
                self._verify_by_source[source] = left
            else:
                del self._verify_by_source[source]

    def _emit(self, datagram: bytes, address: Address) -> None:
        self.stats["datagrams_out"] += 1
        self.stats["bytes_out"] += len(datagram)
        self._out.append((datagram, address))

    def _on_response(self, message: IncomingResponse, address: Address, now: float) -> None:
        call = self._pending.get(message.msg_id)
        if call is None or call.address != address:
            self.stats["unexpected_response"] += 1
            return
        self._forget_call(call)
        self.guard.mark_proven(address, now)
        self._heard_from(address, now)
        body = message.body
        try:
            self._dispatch_answer(call, body, now)
        except RemoteProtocolError as exc:
            self.stats["malformed"] += 1
            log.debug("bad %s answer from %s: %s", call.purpose.value, address, exc)
            self._on_failure(call, now, timed_out=False)

    def _dispatch_answer(self, call: _Call, body: object, now: float) -> None:
        purpose = call.purpose
        if purpose is _Purpose.PING:
            node_id = parse_ping_response(body)
            assert call.op is not None
            self._events.append(PingDone(op=call.op, address=call.address, node_id=node_id))
            self._observe(Contact(node_id=node_id, host=call.address[0], port=call.address[1]), now, answered_ping=True)
        elif purpose is _Purpose.VERIFY:
            self._verifying.pop(call.address, None)
            for msg_id, request in self._deferred.pop(call.address, ()):
                if isinstance(request, StoreRequest) and not self._store_allowed(call.address, now):
                    continue
                self._emit(encode_response(msg_id, self._answer(request, call.address, now)), call.address)
            node_id = parse_ping_response(body)
            self._observe(Contact(node_id=node_id, host=call.address[0], port=call.address[1]), now, answered_ping=True)
        elif purpose is _Purpose.BUCKET:
            assert call.contact is not None
            node_id = parse_ping_response(body)
            alive = node_id == call.contact.node_id
            self._routing_events(self.table.ping_result(call.contact.node_id, alive=alive, now=now), now)
        elif purpose is _Purpose.LIVENESS:
            assert call.contact is not None
            node_id = parse_ping_response(body)
            if node_id == call.contact.node_id:
                self.table.answered(node_id, now)
            else:  # another node answers at that address now: the contact is gone, the answerer proved itself
                self._liveness_evict(self.table.remove(call.contact.node_id), now)
                self._observe(Contact(node_id=node_id, host=call.address[0], port=call.address[1]), now)
        elif purpose is _Purpose.STORE:
            assert call.op is not None and call.contact is not None
            stored = parse_store_response(body)
            self._events.append(StoreDone(op=call.op, contact=call.contact, stored=stored))
            self._observe(call.contact, now)
        elif purpose is _Purpose.AUTH:
            self._auth_answered(call, body, now)
        elif purpose is _Purpose.HANDOFF:
            if parse_store_response(body):
                self.stats["handoffs_stored"] += 1
        elif purpose is _Purpose.LOOKUP:
            self._lookup_answered(call, body, now)

    def _on_failure(self, call: _Call, now: float, *, timed_out: bool) -> None:
        purpose = call.purpose
        if purpose is _Purpose.PING:
            assert call.op is not None
            self._events.append(PingDone(op=call.op, address=call.address, node_id=None))
        elif purpose is _Purpose.VERIFY:
            self._verifying.pop(call.address, None)
            dropped = self._deferred.pop(call.address, [])
            self.stats["amplification_dropped"] += len(dropped)
        elif purpose is _Purpose.BUCKET:
            assert call.contact is not None
            self._routing_events(self.table.ping_result(call.contact.node_id, alive=False, now=now), now)
        elif purpose is _Purpose.LIVENESS:  # no answer, or one that is not a ping's: a failure either way
            assert call.contact is not None
            self._liveness_evict(self.table.failed(call.contact.node_id, now), now)
        elif purpose is _Purpose.STORE:
            assert call.op is not None and call.contact is not None
            self._events.append(StoreDone(op=call.op, contact=call.contact, stored=False))
            if timed_out:
                self._routing_events(self.table.failed(call.contact.node_id, now), now)
        elif purpose is _Purpose.HANDOFF:
            assert call.contact is not None
            if timed_out:
                self._routing_events(self.table.failed(call.contact.node_id, now), now)
        elif purpose is _Purpose.AUTH:
            assert call.contact is not None
            peer = self._peer(call.contact.node_id)
            if peer.auth is AuthState.IN_PROGRESS:
                self.stats["auth_failed"] += 1
                peer.move(AuthState.FAILED)
        elif purpose is _Purpose.LOOKUP:
            assert call.contact is not None
            if timed_out:
                self._routing_events(self.table.failed(call.contact.node_id, now), now)
            op = self._lookups.get(call.op) if call.op is not None else None
            if op is not None:
                op.lookup.on_failure(call.contact.node_id, now)
                self._pump(op, now)

    # =================================================================================================================
    # Lookups
    # =================================================================================================================

    def _check_key(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != NODE_ID_SIZE:
            raise DhtUsageError(f"DHT keys are {NODE_ID_SIZE} bytes")

    def _start_lookup(
        self, target: bytes, mode: ValueMode | None, now: float, count: int | None, *, use_local: bool
    ) -> int:
        self._check_key(target)
        if len(self._lookups) >= self.config.max_lookups:
            raise DhtUsageError(f"too many concurrent lookups (limit {self.config.max_lookups})")
        cfg = self.config
        op = _LookupOp(
            op=self._new_op(),
            lookup=Lookup(
                target,
                k=count or cfg.k,
                alpha=cfg.alpha,
                stall_timeout=cfg.stall_timeout,
                exclude_ids=(self.node_id,),
            ),
            mode=mode,
        )
        self.table.touch(target, now)
        if mode is not None and use_local:
            stored = self.storage.get(target, now)
            if stored is not None and self._consider_value(op, stored.value, now, source="local"):
                op.hops = 0
        self._lookups[op.op] = op
        if op.lookup.finished:
            self._complete(op)
            return op.op
        op.lookup.add_candidates(self.table.closest(target, op.lookup.k))
        self._pump(op, now)
        return op.op

    def _consider_value(self, op: _LookupOp, value: object, now: float, *, source: str) -> bool:
        """Record a value found for ``op`` (from the IP ``source``, or ``"local"``: our own store); whether it was
        acceptable."""
        if op.mode is ValueMode.PLAIN:
            # Any plain value is accepted (the stock semantics), except a value claiming to be a signed record:
            # those must verify.
            local = source == "local"
            if local or (is_plain_value(value) and (not is_signed_value(value) or self._verify(op, value, source))):
                op.value = value
                op.found = True
                op.lookup.finish()
                return True
        elif op.mode is ValueMode.SIGNED:
            record = self._verify(op, value, source)
            if record is not None:
                if op.record is None or record.seq > op.record.seq:
                    op.record = record
                return True
        op.rejected += 1
        self.stats["values_rejected"] += 1
        return False

    def _verify(self, op: _LookupOp, value: object, source: str) -> VerifiedRecord | None:
        try:
            return self._verify_record(op.lookup.target, value, self._wall(), source=source)
        except RecordError as exc:
            if isinstance(exc, RecordTimeError):
                self.stats["records_out_of_time"] += 1
            log.debug("rejecting record for %s: %s", op.lookup.target.hex(), exc)
            return None

    def _lookup_answered(self, call: _Call, body: object, now: float) -> None:
        contact = call.contact
        assert contact is not None
        self._observe(contact, now)
        op = self._lookups.get(call.op) if call.op is not None else None
        if op is None:
            return
        if op.mode is None:
            contacts, _ = parse_nodes(body)
            op.lookup.on_response(contact.node_id, contacts, now)
        else:
            answer = parse_find_value_response(body)
            if isinstance(answer, FoundValue):
                if self._consider_value(op, answer.value, now, source=contact.host):
                    op.holders.add(contact.node_id)
                    if op.hops is None:
                        op.hops = op.lookup.hop_of(contact.node_id)
                    op.lookup.on_response(contact.node_id, (), now)
                else:
                    op.lookup.on_failure(contact.node_id, now)
            else:
                op.lookup.on_response(contact.node_id, answer[0], now)
        self._pump(op, now)

    def _pump(self, op: _LookupOp, now: float) -> None:
        lookup = op.lookup
        if op.holders and lookup.settled(self.config.k, op.holders):
            lookup.finish()  # a signed lookup: the k closest all answered and one of them holds a valid record
        while not lookup.finished:
            queries = lookup.next_queries(now)
            if not queries:
                break
            for contact in queries:
                request: Request
                if op.mode is None:
                    request = FindNodeRequest(node_id=self.node_id, key=lookup.target)
                else:
                    request = FindValueRequest(node_id=self.node_id, key=lookup.target)
                if self._is_silent(contact.address, now) or self._ping_stalled(contact.address, now):
                    self.stats["silent_skipped"] += 1
                    lookup.on_failure(contact.node_id, now)
                elif (
                    self._send_request(contact.address, request, _Purpose.LOOKUP, now, op=op.op, contact=contact)
                    is None
                ):
                    lookup.on_failure(contact.node_id, now)
        if lookup.finished:
            self._complete(op)

    def _complete(self, op: _LookupOp) -> None:
        if self._lookups.pop(op.op, None) is None:
            return
        lookup = op.lookup
        self._events.append(
            LookupDone(
                op=op.op,
                target=lookup.target,
                closest=tuple(lookup.closest_responders()),
                responders=tuple(lookup.responders()),
                value=op.value,
                found=op.found,
                record=op.record,
                rejected_values=op.rejected,
                queries=lookup.queries_sent,
                hops=lookup.depth() if op.hops is None else op.hops,
            )
        )

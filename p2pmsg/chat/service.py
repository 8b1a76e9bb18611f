"""The chat service: contacts, the durable outbox, one session per peer, receipts and message requests.

Theory of operation
-------------------
**Sending.**  :meth:`ChatService.send` seals the text into an envelope (:mod:`p2pmsg.chat.envelope`) and stores the
message and its outbox row in one SQLite transaction; it returns once that transaction is committed and synced, so a
message reported ``queued`` survives a crash.  Concurrent sends share that transaction: every ``send`` that arrives
while one enqueue commits joins the next (``repo.enqueue_rows``, one sync per round), which is handed to the sessions
in send order.  Nothing else is ever needed to deliver it: the *outbox worker* repeatedly reads the entries that are
due (``repo.due_round``: by recipient, in send order) and, per recipient, seals each text again (the store keeps the
text, not the envelope: same message id and timestamp, a fresh nonce) and hands them to a live session or starts one
dial.  A session writes envelopes in batches (one ``send_all`` per batch) and marks them
``sent`` with a retry time (:attr:`ChatConfig.resend_after_ms`); the recipient's receipt marks them ``delivered``
and removes them from the outbox.  A failed dial reschedules the recipient's due entries with exponential backoff
and jitter (``repo.reschedule``, capped); entries of that recipient that fall due soon after (new sends) are
postponed (``repo.postpone_ids``) by the backoff of the recipient's failed dials in a row, at most
:attr:`ChatConfig.redial_hold`, instead of each starting a dial.
When a session with a peer opens (either direction), or its peer record changes, all of that peer's entries are made
due at once (``repo.expedite``) and the worker is woken: the backlog is flushed in send order.  Once a round has
handed a session's whole backlog over, new messages to that peer go straight to the session (no worker round, no
overtaking), and they go *while* their enqueue transaction commits: the network and the recipient's commit overlap
ours.  That is safe because the store's writer is FIFO (every write the wire
causes, such as the ``delivered`` mark, commits after the enqueue), receipts for such messages are held back until
the commit has been published, and ``send`` still returns only after the sync.  Delivery is at-least-once on the
wire and exactly once in the store.

**Reaching a peer.**  Addresses come from the peer's signed record cached in the store (verified again on every
use), the address hints of the invite it was added with, and the DHT (:class:`PeerResolver`), asked when nothing
usable is cached and again when dialling the cached addresses fails ("refresh on failure").  Dialling races the
addresses (:func:`p2pmsg.net.dialer.dial`); the Noise handshake proves the peer id, so a stale address cannot
reach somebody else.  A contact that moved is noticed before its backoff runs out in two ways, both ending in
:meth:`ChatService.peer_record_seen` (a newer ``seq`` is cached and makes the contact's entries due at once): the
node reports each newer record its own DHT store takes in, and, because we are rarely among the nodes that hold a
given record, the *record watcher* looks up, every :attr:`ChatConfig.record_watch` seconds, the records of up to
:attr:`ChatConfig.record_watch_peers` contacts whose entries all wait for a retry (no session, no dial running),
least recently watched first.  A newer record with other addresses that arrives while a dial runs cancels that
dial (without counting an attempt) and makes the entries due at once, so they go to the new addresses.

**Sessions.**  Each authenticated channel, inbound (from the listener, :meth:`ChatService.handle_inbound`) or outbound
(our dial), runs one :class:`~p2pmsg.chat.protocol.ChatConnection`: a reader (this task), a sender task and a task
that watches the transport's progress (:meth:`ChatService._watch_transport`).  A blocked
peer's channel is closed right after the handshake.  A session that already exists for a peer is reused; we only dial
when there is none.  If both sides dial at the same moment, both connections stay usable (each side sends on its newest
one, receives on all); at most :attr:`ChatConfig.max_sessions_per_peer` are kept.  Order across sessions: the peer's
hello on a newer session ends an older one (not a crossing dial) that still holds messages; a session that ends
(:meth:`ChatService._close_session`) takes the bypass from the peer's others and holds the outbox off the peer until
what it did not deliver is due again (``_release_session``, ``_settle_session``), so that goes out first.  A session on
which messages stay unacknowledged for :attr:`ChatConfig.resend_after_ms` with no sign of life (no receipt, the
peer's TCP took none of what is still queued, no bytes came in: a slow link that still moves is alive) is presumed
dead (a connection lost without FIN or RST looks alive until TCP gives up, many minutes later) and is closed; its
messages go out again over a new session after the backoff.

**Receiving.**  Envelopes are opened (the envelope's ``from`` must be the channel's peer: relaying is for a later
version), then one write transaction per batch applies the policy (:mod:`p2pmsg.chat.policy`) and stores
the messages (``repo.insert_incoming``: a duplicate id changes nothing).  Stored *and duplicate* ids are
acknowledged after the commit, so a sender whose receipt was lost gets it again.  Messages that cannot be opened,
refused ones, and anything else dropped are counted by reason (:meth:`ChatService.status`) and logged; a malformed
frame closes that peer's session only.  The session's reader hands each received chunk to a *storer* task and
goes on reading; the storer puts everything that arrived while its previous transaction committed into the next one
(bounded), so a busy disk makes larger transactions instead of a slower reader.

**Timestamps.**  A message's ``ts`` is our clock, or the conversation's floor when that is later: one more than the
latest received message's, and at least our own previous one's, but at most our clock + :data:`_CLOCK_ALLOWANCE_MS`
+ 1 ms (a hybrid logical clock: a reply sorts after what it answers even when our clock is behind the peer's).  A
received ``ts`` more than :data:`_CLOCK_ALLOWANCE_MS` after our clock is lowered to that bound.  History is ordered
by ``(ts, local seq)``.

**Events** for control API subscribers (``message``, ``receipt``, ``peer_up``, ``peer_down``, ``request``) go to
an :class:`EventSink` such as ``EventHub.publish``; it must not block.

Everything runs in the nursery of :meth:`ChatService.run`; inbound sessions run in the listener's handler task.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Final, Protocol

import msgpack
import trio

from p2pmsg.chat import events as ev
from p2pmsg.chat.envelope import (
    MAX_TEXT_BYTES,
    DecryptionError,
    EnvelopeSealer,
    OpenedText,
    SealedEnvelope,
    WrongRecipientError,
)
from p2pmsg.chat.errors import BadRequestError, NameTakenError, UnknownContactError
from p2pmsg.chat.invite import format_invite, parse_target
from p2pmsg.chat.policy import ChatPolicy, Disposition, Relation
from p2pmsg.chat.protocol import RUN_ID_SIZE, ChatConnection, SessionProtocolError
from p2pmsg.dht.core.records import PeerRecord, VerifiedRecord, peer_record_key, verify_record_value
from p2pmsg.errors import LocalProtocolError, P2PMsgError, RemoteProtocolError
from p2pmsg.identity import Identity, InvalidPeerIdError, PeerId
from p2pmsg.logthrottle import LogThrottle, span
from p2pmsg.net.channel import ChannelCutError, ChannelError, SecureChannel, close_gracefully
from p2pmsg.net.dialer import DialError
from p2pmsg.net.dialer import dial as net_dial
from p2pmsg.net.transport import remote_multiaddr, tcp_send_progress
from p2pmsg.net.websocket import WebSocketStream
from p2pmsg.ratelimit import network_of
from p2pmsg.store import errors as store_errors
from p2pmsg.store import repo
from p2pmsg.store.db import Database
from p2pmsg.store.models import (
    DEFAULT_BACKOFF,
    MAX_BATCH_ITEMS,
    MAX_QUERY_LIMIT,
    MAX_TIMESTAMP,
    Backoff,
    Contact,
    ContactState,
    HistoryCursor,
    OutboxEntry,
    StoredMessage,
)
from p2pmsg.wire.multiaddr import Multiaddr, MultiaddrError

__all__ = ["ChatConfig", "ChatService", "DialFunction", "EventSink", "PeerResolver"]

log = logging.getLogger("p2pmsg.chat")

_RECEIVE_CHUNK: Final = 65536
_INBOX_CHUNKS: Final = 16
"""Received chunks queued for the storer before the reader waits."""
_INBOX_BATCH: Final = 2048
"""Most received envelopes stored in one transaction."""
_HINTS_PREFIX: Final = "chat.hints."
_AUTO_PREFIX: Final = "chat.auto_added."
"""Settings key prefix (+ peer id hex) marking a contact auto-added by ``accept_from = "anyone"`` and not yet
vouched for by the user: its sessions stay under the stranger limits, and what it may store is bounded (see
:meth:`ChatPolicy.unvetted_admissible`).  The value is the msgpack uint of the highest ``messages.seq`` when it
was added (its messages after that count toward the bounds); an empty value (older nodes) counts all of them."""
_OVER_THE_LIMITS: Final = {
    Disposition.REQUEST: ("chat_request_overflow", "message requests over the limits"),
    Disposition.INBOX: (
        "chat_unvetted_overflow",
        "an auto-added contact's messages over the limits (rename it to vouch)",
    ),
}
"""Per disposition, the drop counter and the reason of messages over the policy's limits (see ``_hold_back``)."""
_HELD_OVER_THE_LIMITS: Final = frozenset(counter for counter, _ in _OVER_THE_LIMITS.values())
_CONTACT_CACHE_SIZE: Final = 1024
_CONTACT_READ_ATTEMPTS: Final = 20
"""Most reads of a new session's contact row that may each race a contact change (see ``_contact_treatment``)."""
_PEER_CACHE_SIZE: Final = 4096
_MAX_HINTS: Final = 16
MAX_SEND_MANY: Final = 1000
"""Most texts in one :meth:`ChatService.send_many` call."""
MAX_REPLY_TEXT: Final = 8 * 1024 * 1024
"""UTF-8 bytes of message text one :meth:`ChatService.history` or :meth:`ChatService.export` reply carries at most
(the newest messages that fit, at least one): with the other fields of 10,000 rows it stays well under the
control API's 16 MiB response limit.  Page back for the rest."""
_WATCH_CANDIDATES: Final = 1024
"""Most waiting contacts one record watcher round reads from the store (it looks up far fewer)."""
_SKEW_WARNING_INTERVAL: Final = 3600.0
"""Seconds between two such warnings (the count of those left out is logged with the next one)."""
_INBOX_BUDGET: Final = 16 * 1024 * 1024
"""Bytes received on all sessions together and not yet stored: beyond it readers wait (TCP pushes back on the
senders), so many sessions sending big envelopes at once cannot grow the node's memory without bound."""
_STRANGER_READS_PER_SESSION: Final = (200.0, 1000)
"""(a second, at once): what one stranger's session may make its reader do -- frames it sent (envelopes, acks, ...),
each read counting at least one -- before the reader waits (TCP then pushes back on that stranger)."""
_STRANGER_FRAMES_PER_READ: Final = 512
"""Frames one read from a stranger may complete: a stranger has at most 100 pending requests to send and nothing to
acknowledge, so more is a flood of tiny frames (a 64 KiB read holds 1,770 one-id acks); its session is closed, and
no single read runs ahead of the pace by more than this."""
_STRANGER_READS_TOTAL: Final = (2000.0, 5000)
"""The same for all stranger sessions together: forged envelopes, replays or made-up acks from any number of
strangers cost at most about this many decryptions and lookups a second."""
_MAX_UNKNOWN_ACKS: Final = 4096
"""Ids never written on a session that its peer may acknowledge before the session is closed: a contact's reads are
not paced, and each such id costs a lookup (an honest peer repeats one only after a lost session, rarely)."""
_MAX_CONTACT_HOSTS: Final = 1024
"""Hosts of contacts' recent sessions remembered for the listener (:meth:`ChatService.is_familiar`)."""
_STRANGER_INBOX_BUDGET: Final = 4 * 1024 * 1024
"""The part of :data:`_INBOX_BUDGET` that stranger sessions may hold together: the rest (12 MiB) stays free for
contacts however many strangers send at once."""
_CLOCK_ALLOWANCE_MS: Final = 10 * 60 * 1000
"""How far after our clock a received message's ``ts`` is kept as it is (beyond, it is lowered to our clock plus
this): clocks a few minutes apart still order a conversation by cause (a reply after what it answers, protocol
section 6.4), while a clock far ahead cannot pin its messages below everything newer for longer than this."""
_MAX_FLOORS: Final = 65536
"""Conversations whose timestamp floor :class:`ChatService` keeps in memory (see ``ChatService._raise_floor``)."""
_HELD_BACK_LINGER: Final = 10.0
"""Seconds a session that held received messages back (they could not be stored, or a stranger's request went over
the limits) stays open, storing nothing, before it is closed: long enough that the sender is not made to redial in a
loop, short enough that it resends soon."""
_PROMOTED: Final = "its peer became a contact: what it held back comes on a new session"
"""Why a session holding back a stranger's requests over the limits ends when the request is accepted."""
_CROSSING_DIAL_WINDOW: Final = 2.0
"""Seconds within which two sessions with one peer count as a crossing dial (both nodes dialled each other): the
newer one's hello does not end the older one then (each side might end a different one)."""
_SETTLE_TIMEOUT: Final = 10.0
"""Seconds the end of a session may spend putting what it did not deliver back on the schedule (a store write),
shielded from cancellation so that the node's bookkeeping of the peer (``_settling``) always comes down."""
_STORE_WARNING_INTERVAL: Final = 60.0
"""Seconds between two warnings that received messages could not be stored (a full disk fails every batch), and
between two that the outbox's bookkeeping could not be written."""
_STORE_FAILED_PAUSE: Final = 5.0
"""Seconds the outbox worker waits between rounds while its bookkeeping writes fail (a full disk): a failed write
cannot record a dial's backoff, so without the pause every round would dial again at once."""
_MAX_AWAITING_ROOM: Final = 1024
"""Peers remembered at most, whose received messages our store could not write (:meth:`ChatService.room_freed`)."""
_UNREACHABLE_LOG_INTERVAL: Final = 3600.0
"""Seconds between two INFO lines about one peer whose messages keep failing to go (an offline contact): the first
failure of a streak is logged, then one line an hour (the others at DEBUG) until a session with the peer opens.  A
QA pass with 150 offline contacts saw a line for every retry: 108 a minute, 2.3 MB of log an hour."""
_STREAK_GAP: Final = 600.0
"""Seconds without a failed attempt after which a peer's streak counts as over even though no session opened (its
contact was removed or blocked, or its messages failed for good): retries come at most 2 minutes apart."""
_STREAK_LOOKUP_INTERVAL: Final = 600.0
"""Seconds between two DHT lookups of a peer's record by its dials while its failure streak lasts, at most (each
streak draws its own interval, half to all of this); the first dial of a streak asks at once, and the record watcher
keeps looking up waiting contacts in its rounds meanwhile.  Every failed
dial asked before: a QA pass with 150 offline contacts saw 15 datagrams a second out and 6.4 KB a second in."""
_MAX_UNREACHABLE: Final = 16384
"""Peers whose failure streaks are remembered at most (the oldest streak is forgotten first; only contacts have
outbox entries, so this is beyond any personal node)."""
_LOW_SPACE_BATCH: Final = 16
"""Received messages stored per transaction while the store is short of space or its writes fail
(:attr:`Database.short_of_space`): a batch is stored all or nothing, and a QA pass saw 147 messages, about 150 KB,
fail again and again with 300 KB free, where a few smaller transactions would have stored most of them."""


class EventSink(Protocol):
    """Where service events go: ``sink("message", id=..., ...)``; must not block (e.g. ``EventHub.publish``)."""

    def __call__(self, event: str, /, **fields: Any) -> None: ...


class PeerResolver(Protocol):
    """Signed-record lookups in the DHT (:class:`p2pmsg.dht.service.DhtNode` is one)."""

    async def get_signed(self, key: bytes) -> VerifiedRecord | None:
        """The verified record with the highest ``seq`` under ``key``, or ``None`` (the chat service verifies the
        record's bytes again before it uses or caches them)."""
        ...


class DialFunction(Protocol):
    """The signature of :func:`p2pmsg.net.dialer.dial`."""

    async def __call__(
        self,
        identity: Identity,
        peer_id: PeerId,
        addrs: Sequence[Multiaddr],
        *,
        timeout: float = ...,
        nursery: trio.Nursery | None = ...,
    ) -> SecureChannel: ...


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChatConfig:
    """Tunables of the chat service (the defaults suit a personal node)."""

    policy: ChatPolicy = dataclasses.field(default_factory=ChatPolicy)
    backoff: Backoff = DEFAULT_BACKOFF
    """Retry schedule after a failed dial: 1 s, 2 s, 4 s ... capped at 2 min, with jitter."""
    resend_after_ms: int = 30_000
    """A message written to a session but not acknowledged within this time, counted from the later of its write and
    the session's last progress (a receipt, the peer's TCP taking more of a queue, bytes from the peer), is sent
    again."""
    dial_timeout: float = 10.0
    redial_hold: float = 10.0
    """After a failed dial, messages to that peer that fall due (new ones, typically) wait, instead of each starting
    a dial, for the backoff of the peer's failed dials in a row (as :attr:`backoff`: 1 s, 2 s, 4 s ...), at most
    this many seconds: a node writing to a contact that is offline dialled it once per message.  The peer's hello,
    or a newer record of it, ends the wait."""
    resolve_timeout: float = 15.0
    send_timeout: float = 30.0
    """A session whose write makes no progress for this long (the peer's TCP acknowledges nothing of it; or, where
    the socket cannot be asked, the write takes this long) is closed (its messages stay queued)."""
    max_sessions: int = 256
    max_stranger_sessions: int = 64
    """Sessions with peers that are not contacts, so strangers can never crowd contacts out.  When they are all
    taken, a new stranger session evicts the one idle longest."""
    stranger_idle_timeout: float = 120.0
    """A stranger's session that sends no complete message frame for this long is closed."""
    max_sessions_per_peer: int = 4
    batch_size: int = 256
    """Envelopes per ``send_all``."""
    due_batch: int = 2000
    """Outbox entries the worker reads per round."""
    max_session_queue: int = 4096
    """Envelopes handed to one session and not yet written; beyond it the worker leaves them in the outbox."""
    min_poll: float = 0.2
    max_poll: float = 5.0
    record_watch: float = 30.0
    """Seconds between rounds of the record watcher: while a contact's outbox entries all wait for a retry after a
    failed attempt, its peer record is looked up in the DHT once per round (a newer one makes them due at once)."""
    record_watch_peers: int = 8
    """Most contacts whose records one watcher round looks up (the least recently watched first)."""

    def __post_init__(self) -> None:
        positive = (
            "dial_timeout",
            "redial_hold",
            "resolve_timeout",
            "send_timeout",
            "min_poll",
            "max_poll",
            "stranger_idle_timeout",
            "record_watch",
        )
        for name in positive:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise LocalProtocolError(f"ChatConfig.{name} must be a positive number, got {value}")
        for name in (
            "resend_after_ms",
            "max_sessions",
            "max_stranger_sessions",
            "max_sessions_per_peer",
            "batch_size",
            "due_batch",
            "record_watch_peers",
        ):
            if getattr(self, name) < 1:
                raise LocalProtocolError(f"ChatConfig.{name} must be at least 1")
        if self.due_batch > MAX_QUERY_LIMIT:
            raise LocalProtocolError(f"ChatConfig.due_batch must be at most {MAX_QUERY_LIMIT}")
        if self.max_session_queue < self.batch_size:
            raise LocalProtocolError("ChatConfig.max_session_queue must be at least batch_size")


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _ConnectFailed(P2PMsgError):
    pass


class _SessionRefused(P2PMsgError):
    pass


@dataclasses.dataclass(eq=False, slots=True)
class _Redial:
    """A peer's dials that failed in a row, and when (wall ms) the next may start."""

    failures: int
    at: int
    length: int
    """How long (ms) the hold was when it was set."""


@dataclasses.dataclass(eq=False, slots=True)
class _Unreachable:
    """A streak of failed attempts to deliver to one peer, for the log (:meth:`ChatService._note_unreachable`)."""

    since: float
    """trio time of the streak's first failure."""
    logged_at: float
    """trio time of its latest INFO line."""
    last: float
    """trio time of its latest failure (retries come at most 2 minutes apart while the streak lasts)."""
    looked_up: float
    """trio time a dial to the peer last asked the DHT for its record (:meth:`ChatService._dht_lookup_due`)."""
    lookup_interval: float
    """This streak's share of :data:`_STREAK_LOOKUP_INTERVAL` (half to all of it): streaks that began together
    (contacts that went offline with the network) do not all look up in the same second."""
    attempts: int = 1


@dataclasses.dataclass(eq=False, slots=True)
class _Session:
    peer: PeerId
    channel: SecureChannel
    direction: str
    addr: str
    since: int
    conn: ChatConnection = dataclasses.field(default_factory=ChatConnection)
    send_lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    pending: collections.OrderedDict[bytes, bytes] = dataclasses.field(default_factory=collections.OrderedDict)
    held: set[bytes] = dataclasses.field(default_factory=set)
    written: dict[bytes, float] = dataclasses.field(default_factory=dict)
    """Message id -> when it was written (trio clock), until its receipt arrives."""
    work: trio.Event = dataclasses.field(default_factory=trio.Event)
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    closed: bool = False
    close_reason: str | None = None
    contact_name: str | None = None
    relation: Relation = Relation.STRANGER
    greeted: bool = False
    """The peer's hello arrived on this session."""
    expedited: bool = False
    """The peer's outbox entries were made due after this session registered (after its hello)."""
    in_order: bool = False
    """An outbox round after that found nothing left for the peer: new messages may bypass the outbox worker
    without overtaking older ones."""
    active_at: float = 0.0
    """When (trio clock) the session opened or last delivered a message that opened (from the peer, to us): a
    stranger's idle time counts from here, and the stranger session with the oldest one is evicted first."""
    opened_at: float = 0.0
    """When (trio clock) the session registered."""
    inbox_bytes: int = 0
    """Bytes this session took from the inbox budget and has not given back (given back when stored, or at close)."""
    unknown_acks: int = 0
    """Acknowledged ids that were never written on this session (a repeat now and then; a flood ends it)."""
    work_seen: int = 0
    """The channel's ``work_done`` after the previous read (the difference is what a read cost)."""
    pace: _Pacer | None = None
    """How fast this stranger's session may make its reader work (created when a stranger's frames first arrive)."""
    stranger_inbox_bytes: int = 0
    """The part of ``inbox_bytes`` also taken from the strangers' share (read while the peer was a stranger)."""
    settle_counted: bool = False
    """The peer is counted in ``ChatService._settling`` for this session's end (from the moment it was closed)."""
    redial: bool = False
    """Closed because the peer's newer record no longer lists the address this session was dialled at: what it
    had not delivered is due at once, over a dial to the new addresses (not after the backoff)."""
    peer_run: bytes | None = None
    """The ``run`` of the peer's hello on this session (random per start of its node), if it sent one."""
    held_back: str | None = None
    """Set (to the drop counter it counts under) once received messages were left unacknowledged, because they
    could not be stored (``chat_store_failed``) or a stranger's request, or an auto-added contact's message, went
    over the limits (``chat_request_overflow``, ``chat_unvetted_overflow``): everything after them on this session
    is dropped unacknowledged too, so what is stored stays a prefix of what was sent (the sender resends the rest,
    in order, on a new session)."""
    promoted: bool = False
    """The peer became a contact (accepted, added or vouched for) while this session was open."""
    progress_at: float = 0.0
    """When (trio clock) the session last showed it is alive: it opened, a receipt came, the peer's TCP took more of
    what we wrote while some was still queued, or bytes came in (a slow link, see
    :meth:`ChatService._watch_transport`)."""
    acked_bytes: int = 0
    """How much of what we wrote the peer's TCP had acknowledged at the last look."""
    reads_seen: int = 0
    """The channel's ``work_done`` (reads from the transport) at the last look."""
    write_scope: trio.CancelScope | None = None
    """The running write's scope: its deadline moves on while the transport makes progress."""


class _Pacer:
    """A token bucket that makes its callers wait instead of refusing them: :meth:`take` takes what it is asked for
    (running into debt) and sleeps until the debt is paid back at ``rate`` tokens a second."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = trio.current_time()

    async def take(self, count: float) -> None:
        now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate) - count
        self.updated = now
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.rate)


class _ByteBudget:
    """A count of bytes shared by tasks: :meth:`take` waits while taking would pass the limit (unless nothing is
    taken: one item larger than the limit still gets through alone); :meth:`give_back` returns bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting = trio.lowlevel.ParkingLot()

    async def take(self, size: int) -> None:
        while self.used > 0 and self.used + size > self.limit:
            await self._waiting.park()
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size
        self._waiting.unpark_all()


_InboxChunk = tuple[list[SealedEnvelope], int, int]
"""Envelopes read in one go, the bytes they took from the inbox budget, and how many of those from the strangers'
share."""


@dataclasses.dataclass(eq=False, slots=True)
class _Queued:
    """One ``send`` waiting for its enqueue transaction."""

    peer: PeerId
    contact: Contact
    mid: bytes
    """The message id."""
    raw: bytes
    """The sealed envelope, encoded."""
    text: str
    now: int
    """This node's clock when the send was called."""
    ts: int
    """The message's timestamp (:meth:`ChatService._stamp`): ``now``, or later to sort after what it answers."""
    ahead: bool = False
    """Enqueued with its resend time already set (a session was ready to take it): no ``mark_sent`` write."""
    early: bool = False
    """Handed to its session before the enqueue transaction committed (see :meth:`ChatService._enqueue`)."""


@dataclasses.dataclass(eq=False, slots=True)
class _EnqueueRound:
    """The sends that share one ``repo.enqueue_rows`` transaction (group commit at the service level)."""

    items: list[_Queued] = dataclasses.field(default_factory=list)
    closed: bool = False
    """The transaction started: no item may join or leave any more."""
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    error: BaseException | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class _Incoming:
    """What storing one received batch did, in columns (no object per message): ``outcomes[i]`` and ``sent_at[i]``
    belong to the batch's ``i``-th message; empty when the batch was refused."""

    relation: Relation
    contact_name: str | None
    disposition: Disposition
    outcomes: list[str]
    """Per message: ``"stored"``, ``"duplicate"`` (already stored) or ``"overflow"`` (a request, or an auto-added
    contact's message, over the limits)."""
    sent_at: list[int]
    """Per message: the timestamp stored (the sender's, but at most :data:`_CLOCK_ALLOWANCE_MS` after our clock)."""
    auto_added: bool = False
    """The sender was added as a contact by this transaction (``accept_from = "anyone"``)."""


def _peer_text(peer: bytes) -> str:
    try:
        return PeerId.from_bytes(peer).to_base58()
    except InvalidPeerIdError:
        return peer.hex()


_REPLY_READ_CHUNK: Final = 256
"""Messages read at a time for a history or export reply (a reply stops at its text budget: the store is asked for
little more than the reply holds, however large the ``limit``)."""


def _newest_for_reply(
    conn: sqlite3.Connection, peer: bytes, limit: int, before: HistoryCursor | None
) -> tuple[list[StoredMessage], bool]:
    """The newest messages with ``peer`` before ``before`` (all if ``None``), oldest first: at most ``limit``, and
    only as many as :data:`MAX_REPLY_TEXT` holds (at least one); and whether older ones were left out."""
    chunks: list[list[StoredMessage]] = []
    used = taken = 0
    cursor = before
    more = False
    while taken < limit:
        ask = min(_REPLY_READ_CHUNK, limit - taken)
        page = repo.history(conn, peer, limit=ask, before=cursor)
        fit, size = _newest_within(page, MAX_REPLY_TEXT - used, at_least_one=not chunks)
        chunks.append(page[len(page) - fit :])
        used += size
        taken += fit
        if fit < len(page) or (len(page) == ask and taken == limit):
            more = True  # cut by the text budget, or by the limit with maybe more behind
            break
        if len(page) < ask:
            break  # the beginning of the conversation
        cursor = page[0].cursor
    return [m for chunk in reversed(chunks) for m in chunk], more


def _newest_within(messages: Sequence[StoredMessage], budget: int, *, at_least_one: bool) -> tuple[int, int]:
    """How many of the newest of ``messages`` (oldest first) have at most ``budget`` bytes of UTF-8 text together
    (at least one if ``at_least_one``), and how many bytes those are."""
    used = count = 0
    for message in reversed(messages):
        text = message.text
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if used + size > budget and (count or not at_least_one):
            break
        used += size
        count += 1
    return count, used


def _message_dict(message: StoredMessage) -> dict[str, Any]:
    return {
        "id": message.message_id.hex(),
        "from": _peer_text(message.sender),
        "text": message.text,
        "ts": message.sent_at,
        "status": message.status.value,
        "direction": message.direction.value,
        "seq": message.seq,
    }


class ChatService:
    """The chat layer of one node (see the module docstring).  Run :meth:`run` in the node's nursery."""

    def __init__(
        self,
        identity: Identity,
        db: Database,
        *,
        resolver: PeerResolver | None = None,
        config: ChatConfig | None = None,
        events: EventSink | None = None,
        listening: Callable[[], bool] | None = None,
        dial: DialFunction = net_dial,
        clock_ms: Callable[[], int] = _wall_ms,
        rng: random.Random | None = None,
    ) -> None:
        """``resolver`` finds peer records in the DHT (``None``: only cached records and invite hints are used);
        ``events`` receives service events; ``listening()``, if given, says whether anyone would receive them now
        (for example whether the node's event hub has subscribers): while it is false the service does not even
        build its ``message``, ``request`` and ``receipt`` events (one per message, one per batch on the hot
        paths).
        ``dial``, ``clock_ms`` (wall clock, ms) and ``rng`` are for tests."""
        self.identity = identity
        self._db = db
        self._resolver = resolver
        self.config = config if config is not None else ChatConfig()
        self._events = events
        self._listening = listening
        self._dial = dial
        self._now = clock_ms
        self._rng = rng if rng is not None else random.Random()
        self._sealer = EnvelopeSealer(identity)
        self._own = identity.peer_id.to_bytes()
        self._run = os.urandom(RUN_ID_SIZE)
        """Sent in our hellos: peers tell a restart of this node (a new value) from a second session of this run."""
        self._floors: dict[bytes, int] = {}
        """Per conversation (peer bytes), the lowest ``ts`` a new outgoing message may carry (:meth:`_stamp`): what
        is known from this run, merged with the store's value once it has been read (``_floors_read``)."""
        self._floors_read: set[bytes] = set()
        self._sessions: dict[PeerId, list[_Session]] = {}
        self._dialing: set[PeerId] = set()
        self._contact_hosts: collections.OrderedDict[str, None] = collections.OrderedDict()
        """Sources (IPv4 addresses, IPv6 /64s) contacts' sessions ran over, most recent last (at most
        :data:`_MAX_CONTACT_HOSTS`)."""
        self._settling: collections.Counter[PeerId] = collections.Counter()
        self._settles = 0  # sessions settled so far (see _settle_session)
        self._settled_at: dict[PeerId, int] = {}  # peer -> the count when a session with it last settled
        """Peers whose last session ended and whose entries are not rescheduled yet (no dial for them until then)."""
        self._inflight: set[bytes] = set()
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._dropped: collections.Counter[str] = collections.Counter()
        self._drop_log = LogThrottle(log)  # a peer repeating bad input must not fill the disk with log lines
        self._inbox_budget = _ByteBudget(_INBOX_BUDGET)
        self._stranger_budget = _ByteBudget(_STRANGER_INBOX_BUDGET)
        self._stranger_pace: _Pacer | None = None  # all strangers' reads together (created on first use)
        self._store_warning = LogThrottle(
            log, burst=1, interval=_STORE_WARNING_INTERVAL
        )  # a full disk fails each batch
        self._unreachable: dict[PeerId, _Unreachable] = {}
        """Peers whose messages failed to go since their last session opened (oldest streak first)."""
        self.messages_stored_at: int | None = None
        """Wall-clock ms taken just before the latest transaction that stored messages (received ones, or ours queued
        by ``send``) and committed: ``status`` tells a store that works again (room came back) from one that still
        fails (a failure after this time, even of a transaction that started later, still counts as failing)."""
        self._skew_warning = LogThrottle(log, burst=1, interval=_SKEW_WARNING_INTERVAL)
        self._store_failed_at = -math.inf  # trio clock of the last failed bookkeeping write
        self._store_holds = 0  # redial holds in a row for our own store's failures (see _hold_redials)
        self._started_at = self._now()
        self._contacts_by_name: dict[str, Contact] = {}
        self._peer_texts: dict[PeerId, str] = {}
        self._peer_ids: dict[bytes, PeerId] = {}
        self._contact_generation = 0
        self._contact_peers: frozenset[PeerId] | None = None
        self._enqueue_open: _EnqueueRound | None = None
        self._enqueue_lock = trio.Lock()
        self._premarked: set[bytes] = set()
        """Handed to a session with the resend time written at enqueue: the sender does not mark them sent."""
        self._outboxed = 0
        """Counts sends left to the outbox worker: a round that overlapped one must not declare a session in order."""
        self._uncommitted: set[bytes] = set()
        """Handed to a session while their enqueue transaction commits: their receipts wait for that commit."""
        self._deferred_receipts: list[tuple[PeerId, bytes, str]] = []
        """``(peer, id, status)`` of receipts that arrived for uncommitted ids, in arrival order."""
        self._redials: dict[PeerId, _Redial] = {}
        """Peers whose last dials failed: how many in a row, and when the next may start (until then, entries of
        theirs that fall due are postponed to that time, :meth:`_hold_dial`)."""
        self._awaiting_room: dict[PeerId, None] = {}
        """Peers whose received messages our store could not write (a full disk), oldest first: once room comes
        back, :meth:`room_freed` dials them so that they send those messages again at once."""
        self._dial_scopes: dict[PeerId, trio.CancelScope] = {}
        """The running dial of each peer being dialled: a newer record with other addresses cancels it (it may wait
        on an address the peer left) and the entries are due at once, for a dial to the new addresses."""
        self._watched: dict[PeerId, float] = {}
        """When (trio clock) the record watcher last looked up each waiting contact."""
        self.record_lookups = 0
        """Peer-record lookups the record watcher made."""

    # ------------------------------------------------------------------------------------------------- lifecycle

    @property
    def peer_id(self) -> PeerId:
        """This node's peer id."""
        return self.identity.peer_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the outbox worker and the outbound sessions until cancelled (``await nursery.start(chat.run)``)."""
        if self._nursery is not None:
            raise LocalProtocolError("ChatService.run is already running")
        try:
            # Entries enqueued with their resend time ahead may not have reached the wire before we stopped.
            now = self._now()
            await self._db.write(lambda c: repo.expedite_unattempted(c, now=now))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._outbox_worker)
                if self._resolver is not None:
                    nursery.start_soon(self._record_watcher)
                task_status.started()
        finally:
            self._nursery = None

    def _text(self, peer: PeerId) -> str:
        """``str(peer)`` (base58btc), cached: encoding costs ~25 us and events need it for every message."""
        text = self._peer_texts.get(peer)
        if text is None:
            if len(self._peer_texts) >= _PEER_CACHE_SIZE:
                self._peer_texts.clear()
            text = self._peer_texts[peer] = peer.to_base58()
        return text

    def _peer_of(self, raw: bytes) -> PeerId:
        """``PeerId.from_bytes(raw)`` for a peer id this node stored itself, cached."""
        peer = self._peer_ids.get(raw)
        if peer is None:
            if len(self._peer_ids) >= _PEER_CACHE_SIZE:
                self._peer_ids.clear()
            peer = self._peer_ids[raw] = PeerId.from_bytes(raw)
        return peer

    def _poke(self) -> None:
        self._wake.set()

    def _drop(self, reason: str, detail: str, peer: PeerId | None = None) -> None:
        self._dropped[reason] += 1
        where = f" from {peer}" if peer is not None else ""
        self._drop_log.log(logging.INFO, reason, "chat: dropped (%s) %s%s", reason, detail, where)

    def _publish(self, event: ev.ChatServiceEvent) -> None:
        if self._events is not None:
            self._publish_fields(event.name, event.fields())

    def _publish_fields(self, name: str, fields: dict[str, Any]) -> None:
        if self._events is None:
            return
        try:
            self._events(name, **fields)
        except P2PMsgError as exc:
            self._drop("chat_event_unpublishable", f"{name} event: {exc}")
        except Exception:  # a broken sink must not cost the session that produced the event
            self._dropped["chat_event_unpublishable"] += 1
            log.exception("chat: the event sink failed on a %s event", name)

    def _listened(self) -> bool:
        """Whether the hot paths should build their events: a sink exists and (if it can tell) someone listens."""
        return self._events is not None and (self._listening is None or self._listening())

    def _publish_receipt(self, peer: PeerId, ids: Sequence[bytes], status: str) -> None:
        """One ``receipt`` event for a whole batch (nothing at all when nobody listens).

        A receipt for a message whose enqueue transaction has not committed yet (it went to the wire during the
        commit, see :meth:`_enqueue`) is held back until the ``message`` event of that commit has been published,
        so subscribers always see ``message``, then ``sent``, then ``delivered``.  They are held back even while
        nobody listens: a subscriber may arrive before that commit ends and then gets the ``message`` event."""
        if self._events is None:
            return
        uncommitted = self._uncommitted
        if uncommitted and not uncommitted.isdisjoint(ids):
            self._deferred_receipts.extend((peer, mid, status) for mid in ids if mid in uncommitted)
            ids = [mid for mid in ids if mid not in uncommitted]
            if not ids:
                return
        if not self._listened():
            return
        self._publish(ev.ReceiptEvent(ids=tuple(mid.hex() for mid in ids), peer_id=self._text(peer), status=status))

    # ------------------------------------------------------------------------------------------------- outbox

    async def _outbox_worker(self) -> None:
        while True:
            self._wake = trio.Event()
            try:
                timeout = await self._outbox_round()
            except store_errors.StoreClosedError:
                log.info("chat: the store is closed; the outbox worker stops")
                return
            except store_errors.StoreWriteError as exc:  # a full disk: keep the node up, retry after a pause
                self._bookkeeping_failed("an outbox round", exc)
                timeout = self.config.max_poll
            except Exception:  # a bug: keep the node up, retry after a pause
                self._dropped["chat_internal_error"] += 1
                log.exception("chat: outbox round failed")
                timeout = self.config.max_poll
            if trio.current_time() - self._store_failed_at < _STORE_FAILED_PAUSE:
                timeout = max(timeout, _STORE_FAILED_PAUSE)  # not woken early either: sends fail as well
                await trio.sleep(timeout)
                continue
            with trio.move_on_after(timeout):
                await self._wake.wait()

    async def _outbox_round(self) -> float:
        """Hand every due entry to a session or a dial; return how long to wait before the next round."""
        cfg = self.config
        settling = [s for v in self._sessions.values() for s in v if s.expedited and not s.in_order]
        outboxed = self._outboxed  # a send queued after the read below is not in this round: no bypass yet
        # Sessions whose backlog was due before the read: what the read found is all there is to send them.
        ready = {s for v in self._sessions.values() for s in v if s.expedited}
        settled = self._settles  # a peer whose session settles after this gets nothing from this round
        now = self._now()
        due = await self._db.read(functools.partial(repo.due_round, now=now, limit=cfg.due_batch))
        truncated = due.more  # recipients not read this round may have entries due
        left_over: set[bytes] = set(due.cut)  # these have more due than this round read
        busy = truncated or bool(left_over)
        by_peer: dict[bytes, list[OutboxEntry]] = {}
        for entry in due.entries:  # by recipient, in send order
            busy = busy or entry.message_id in self._inflight
            by_peer.setdefault(entry.recipient, []).append(entry)
        for raw_peer, items in by_peer.items():
            if not await self._dispatch(raw_peer, items, ready, settled):
                busy = True
                left_over.add(raw_peer)
        self._settled_at = {p: n for p, n in self._settled_at.items() if n > settled}  # older ones matter no more
        if self._redials:  # a peer whose last hold ended long ago starts its count again
            stale = now - cfg.backoff.cap_ms
            self._redials = {p: r for p, r in self._redials.items() if r.at > stale}
        if not truncated and outboxed == self._outboxed:
            for session in settling:
                peer = session.peer
                if (
                    not session.closed
                    and peer.to_bytes() not in left_over
                    and peer not in self._settling  # a session with the peer ended: its leftovers come first
                    and self._settled_at.get(peer, -1) <= settled
                ):
                    session.in_order = True
        if busy:
            timeout = cfg.min_poll
        else:
            earliest = await self._db.read(repo.next_attempt_at)
            wait_ms = earliest - self._now() if earliest is not None else cfg.max_poll * 1000
            timeout = min(cfg.max_poll, max(cfg.min_poll, wait_ms / 1000))
        return timeout

    async def _dispatch(self, raw_peer: bytes, items: list[OutboxEntry], ready: set[_Session], settled: int) -> bool:
        """Hand ``items`` (due, in send order, some maybe in flight already) to a session with their recipient or
        start a dial; False if busy.  ``ready``: the sessions whose peer's backlog was made due before ``items`` were
        read; ``settled``: the settle count then (a session of the peer settled since: ``items`` may miss what it
        left behind)."""
        try:
            peer = PeerId.from_bytes(raw_peer)
        except InvalidPeerIdError:  # never written by us; do not retry it forever
            now = self._now()
            await self._db.write(lambda c: [repo.mark_failed(c, e.message_id, now=now) for e in items])
            return True
        if peer in self._settling or self._settled_at.get(peer, -1) > settled:
            return False  # a session with it ended: what it left behind is not due again yet, or was not read
        session = self._best_session(peer)
        if session is not None and not session.expedited:
            # The peer's hello has not arrived, so its backlog is not due yet: whatever is due now (a new send) waits
            # for it too, or it would overtake older messages still in their backoff.  A peer that never says hello
            # is given up after resend_after_ms.
            patience = self.config.resend_after_ms / 1000
            if trio.current_time() - session.opened_at >= patience:
                self._close_session(session, f"no hello within {patience:g} s")
            return False
        if session is not None and session not in ready:
            # Its hello came while the round read: the backlog it made due is not in ``items`` (only what was due
            # before, newer messages among it), so handing these over now would let them overtake it.  Next round.
            return False
        if session is not None:
            # A receipt normally follows within milliseconds.  Entries written on this very session long ago and
            # still unacknowledged, with no sign of life since (a receipt, or a slow link still taking our bytes),
            # mean a dead connection (no FIN, no RST) or a peer that does not accept them: end the session, so the
            # entries go out again after a backoff over a fresh one.
            patience = self.config.resend_after_ms / 1000
            written = session.written
            oldest = min((written.get(e.message_id, math.inf) for e in items), default=math.inf)
            clock = trio.current_time()
            if clock - max(oldest, session.progress_at) >= patience:
                self._close_session(session, f"no receipt within {patience:g} s")
                # The peer's other sessions that showed no sign of life for as long are likely dead too (one left
                # half-open when a FIN was lost): end them now rather than write to each and wait again.
                for other in self._sessions.get(peer, ()):
                    if not other.closed and clock - other.progress_at >= patience:
                        self._close_session(other, f"no sign of life within {patience:g} s, like a newer session")
                return False
            on_their_way = [e.message_id for e in items if e.message_id in written]
            if on_their_way:
                # Still on their way over a live session (a slow link): not again on it, and not due before the
                # check above could end the session (or this would start a round after round).
                wait = max(oldest, session.progress_at) + patience - clock
                until = min(self._now() + max(1, math.ceil(wait * 1000)), MAX_TIMESTAMP)
                await self._db.write(
                    functools.partial(repo.postpone_ids, message_ids=on_their_way, until=until), durable=False
                )
            room = self.config.max_session_queue - len(session.pending)
            for entry in items:
                if entry.message_id in written:
                    continue
                if entry.message_id in self._inflight:
                    if entry.message_id in session.held:
                        continue  # on its way over this session already
                    # Held by another session (one that is ending, or stuck in a write): what comes after it waits,
                    # or it would overtake it here.  That session lets go of it when it ends.
                    return False
                if room <= 0:
                    return False
                # The outbox keeps only the text: seal a fresh envelope (same id and timestamp, new nonce).
                sealed = self._sealer.seal(peer, entry.text, ts=entry.sent_at, message_id=entry.message_id)
                self._hand_over(session, entry.message_id, sealed.raw)
                room -= 1
            return True
        if all(entry.message_id in self._inflight for entry in items):
            return False  # all on their way over a session that is ending: its end reschedules them
        if peer in self._dialing:
            return False
        redial = self._redials.get(peer)
        now = self._now()
        # A hold further ahead than it was long is from before the wall clock stepped back: it no longer holds.
        if redial is not None and now < redial.at <= now + redial.length:
            await self._hold_dial(peer, items, redial)
            return True
        self._start_dial(peer)
        return True

    def _start_dial(self, peer: PeerId) -> bool:
        """Dial ``peer`` in the background, unless a dial to it runs already or the service is not running."""
        if self._nursery is None or peer in self._dialing:
            return False
        self._dialing.add(peer)
        self._nursery.start_soon(self._dial_task, peer)
        return True

    @property
    def peers_awaiting_room(self) -> int:
        """How many peers wait for room on our disk: our store could not write messages they sent."""
        return len(self._awaiting_room)

    async def room_freed(self) -> int:
        """The node saw room come back on the store's disk: dial each contact whose messages our store could not
        write, so that our hello on the new session makes its outbox send them again at once, rather than after its
        backoff (up to :attr:`ChatConfig.backoff`'s cap, 2 minutes).  Returns how many dials started."""
        if not self._awaiting_room:
            return 0
        peers, self._awaiting_room = list(self._awaiting_room), {}
        contacts = await self.contact_peers()  # never a stranger: a dial would tell it our address
        return sum(self._start_dial(peer) for peer in peers if peer in contacts)

    def _hold_redials(self, peer: PeerId, *, store_failed: bool = False) -> None:
        """A dial to ``peer`` failed: no new dial to it for the backoff of its failures in a row (the outbox's
        :attr:`ChatConfig.backoff`), at most :attr:`ChatConfig.redial_hold` (see :meth:`_hold_dial`).

        With ``store_failed`` (our own store could not write: a full disk) the hold is ``redial_hold``, doubled for
        each such hold in a row (no failure of the store for twice the backoff cap starts again) up to the backoff
        cap: every new session would fail the same way after sending the whole backlog again, and the peer's hello
        on it resets the peer's count.  It also pauses the outbox worker (see :meth:`_bookkeeping_failed`)."""
        before = self._redials.get(peer)
        failures = 1 if before is None else before.failures + 1
        hold = round(self.config.redial_hold * 1000)
        if store_failed:
            clock = trio.current_time()
            cap = self.config.backoff.cap_ms
            self._store_holds = 1 if clock - self._store_failed_at > 2 * cap / 1000 else self._store_holds + 1
            self._store_failed_at = clock
            delay = max(hold, min(cap, hold * 2 ** min(self._store_holds - 1, 30)))
        else:
            delay = min(hold, self.config.backoff.delay_ms(failures, self._rng.random()))
        self._redials[peer] = _Redial(failures, self._now() + delay, delay)

    async def _hold_dial(self, peer: PeerId, items: list[OutboxEntry], redial: _Redial) -> None:
        """The last dial to ``peer`` failed moments ago: postpone these due ``items`` to ``redial.at`` instead of
        dialling again (no attempt counted; unsynced: if lost, they are only due sooner)."""
        ids = [entry.message_id for entry in items if entry.message_id not in self._inflight]
        with self._store_failure_logged(f"postponing the messages to {peer}"):
            await self._db.write(lambda c: repo.postpone_ids(c, ids, until=redial.at), durable=False)
            if self._redials.get(peer) is not redial:
                # Its hello or a newer record came during the write (and may have made them due before it): due again.
                now = self._now()
                await self._db.write(lambda c: repo.expedite_ids(c, ids, now=now), durable=False)

    def _hand_over(self, session: _Session, message_id: bytes, envelope: bytes) -> None:
        """Queue an outbox entry on a session's sender (it is "in flight" until marked sent or the session ends)."""
        if message_id in self._inflight:
            return
        session.pending[message_id] = envelope
        session.held.add(message_id)
        self._inflight.add(message_id)
        session.work.set()

    async def _reschedule_peer(self, peer: PeerId, error: str, written: Iterable[bytes] = ()) -> None:
        """Count a failed attempt for ``peer``'s due entries and those in ``written`` (sent on a session that was
        lost before their receipts came), and give all of the peer's entries one next try after the backoff
        (:func:`repo.reschedule_recipient`)."""
        reschedule = functools.partial(
            repo.reschedule_recipient,
            recipient=peer.to_bytes(),
            now=self._now(),
            error=error,
            lost=set(written),
            backoff=self.config.backoff,
            unit_random=self._rng.random(),
            together=self._best_session(peer) is None,  # else some may be on their way on it
        )
        # Unsynced: if a power cut loses it, the entries are due sooner (one more try), nothing else.  A node with
        # many offline contacts reschedules every 2 minutes for each, a sync apiece on an SD card otherwise.
        count = await self._db.write(reschedule, durable=False)
        if count:
            self._note_unreachable(peer, count, error)

    def _note_unreachable(self, peer: PeerId, count: int, error: str) -> None:
        """Log that ``count`` messages to ``peer`` failed to go: the first failure of a streak, and then at most one
        line in :data:`_UNREACHABLE_LOG_INTERVAL` at INFO (the rest at DEBUG); a session with the peer ends it."""
        if self._best_session(peer) is not None:  # it opened while the reschedule was written: no outage now
            return
        now = trio.current_time()
        streak = self._unreachable.get(peer)
        if streak is None or now - streak.last >= _STREAK_GAP:
            # A new streak; or an old one that ended without a session (no attempt for a while).  News either way.
            self._unreachable.pop(peer, None)
            if len(self._unreachable) >= _MAX_UNREACHABLE:
                del self._unreachable[next(iter(self._unreachable))]
            spread = _STREAK_LOOKUP_INTERVAL * (1.0 - 0.5 * self._rng.random())
            self._unreachable[peer] = _Unreachable(
                since=now, logged_at=now, last=now, looked_up=now, lookup_interval=spread
            )
            log.info("chat: %d message(s) to %s rescheduled: %s", count, peer, error)
            return
        streak.attempts += 1
        streak.last = now
        if now - streak.logged_at < _UNREACHABLE_LOG_INTERVAL:
            log.debug("chat: %d message(s) to %s rescheduled: %s", count, peer, error)
            return
        streak.logged_at = now
        log.info(
            "chat: %d message(s) to %s still wait: %d attempts failed in %s (logged once an hour); the latest: %s",
            count,
            peer,
            streak.attempts,
            span(now - streak.since),
            error,
        )

    async def _expedite(self, peer: PeerId) -> None:
        self._redials.pop(peer, None)  # before the write: a _hold_dial that overlaps it then undoes itself
        now = self._now()
        raw = peer.to_bytes()
        await self._db.write(lambda c: repo.expedite(c, raw, now=now))
        self._poke()

    # ------------------------------------------------------------------------------------------------- dialling

    async def _dial_task(self, peer: PeerId) -> None:
        handed_over = False
        try:
            contact = await self._db.read(lambda c: repo.get_contact(c, peer.to_bytes()))
            if contact is not None and contact.state is ContactState.BLOCKED:
                await self._reschedule_peer(peer, "the recipient is blocked")
                return
            connected: tuple[SecureChannel, str] | None = None
            failure = ""
            # Only the dial itself runs in the scope a newer record cancels: a store write cancelled while it ran
            # still completes, and the cancellation would then be lost with the expedite it stands for.
            with trio.CancelScope() as scope:
                self._dial_scopes[peer] = scope
                try:
                    connected = await self._connect(peer)
                except _ConnectFailed as exc:
                    failure = str(exc)
                finally:
                    if self._dial_scopes.get(peer) is scope:
                        del self._dial_scopes[peer]
            if connected is None:
                if scope.cancel_called:  # a record with other addresses arrived: dial those now, no attempt counted
                    await self._expedite(peer)
                else:
                    await self._reschedule_peer(peer, failure)
                    self._hold_redials(peer)
                return
            channel, addr = connected
            if self._nursery is None:
                await trio.aclose_forcefully(channel)
                return
            self._nursery.start_soon(self._run_session, channel, "outbound", addr, True)
            handed_over = True
        except store_errors.StoreClosedError:
            return
        except store_errors.StoreWriteError as exc:  # a full disk: the outbox keeps the messages, the dial waits
            self._hold_redials(peer, store_failed=True)
            self._bookkeeping_failed(f"dialling {peer}", exc)
        except Exception:  # a bug: this dial is lost (the outbox keeps the messages), never the node
            self._dropped["chat_internal_error"] += 1
            log.exception("chat: dialling %s failed", peer)
        finally:
            if not handed_over:
                self._dialing.discard(peer)

    async def _hints(self, peer: PeerId) -> list[Multiaddr]:
        data = await self._db.read(lambda c: repo.get_setting(c, _HINTS_PREFIX + peer.to_bytes().hex()))
        if not data:
            return []
        try:
            texts = msgpack.unpackb(data, raw=False)
            return [Multiaddr.parse(t) for t in texts[:_MAX_HINTS] if isinstance(t, str)]
        except (ValueError, TypeError, MultiaddrError, msgpack.UnpackException):
            return []

    async def contact_addresses(self, *, limit: int = 32) -> list[Multiaddr]:
        """Up to ``limit`` addresses our contacts can be reached at, from their cached peer records and invites
        (the node tries them as DHT nodes too when its routing table is small: by default a node's DHT listens on
        UDP at the port of its first TCP address)."""
        out: list[Multiaddr] = []
        for peer in sorted(await self.contact_peers(), key=str):
            record = await self._cached_record(peer)
            for addr in [*_record_addrs(record), *await self._hints(peer)]:
                if addr not in out:
                    out.append(addr)
                if len(out) >= limit:
                    return out
        return out

    def _verify_record(self, peer: PeerId, value: bytes) -> PeerRecord | None:
        try:
            verified = verify_record_value(peer_record_key(peer), value, now=self._now() / 1000)
        except RemoteProtocolError as exc:
            log.info("chat: peer record of %s refused: %s", peer, exc)
            return None
        content = verified.content
        return content if isinstance(content, PeerRecord) and content.peer_id == peer else None

    async def _cached_record(self, peer: PeerId) -> PeerRecord | None:
        cached = await self._db.read(lambda c: repo.get_peer_record(c, peer.to_bytes()))
        if cached is None or cached.is_expired(self._now()):
            return None
        return self._verify_record(peer, cached.record)

    async def _store_record(self, peer: PeerId, value: bytes) -> tuple[PeerRecord | None, bool]:
        """Verify and cache a record; return it and whether the cache changed (a newer ``seq``)."""
        record = self._verify_record(peer, value)
        if record is None:
            return None, False
        now = self._now()
        expires_ms = min(record.expires_at * 1000, MAX_TIMESTAMP)
        changed = False
        with self._store_failure_logged(f"caching the peer record of {peer}"):  # used all the same
            # Unsynced: a cache (a power cut that loses it costs a lookup), and most writes only refresh fetched_at
            # (the same seq again): QA saw a sync per lookup of 150 offline contacts' records.
            changed = await self._db.write(
                lambda c: repo.put_peer_record(
                    c, peer_id=peer.to_bytes(), record=value, seq=record.seq, expires_at=expires_ms, now=now
                ),
                durable=False,
            )
        return record, changed

    async def _lookup_record(self, peer: PeerId) -> bytes | None:
        """The bytes of ``peer``'s freshest record in the DHT (not verified yet), or ``None``."""
        if self._resolver is None:
            return None
        found: VerifiedRecord | None = None
        with trio.move_on_after(self.config.resolve_timeout):
            try:
                found = await self._resolver.get_signed(peer_record_key(peer))
            except (P2PMsgError, OSError) as exc:
                log.info("chat: DHT lookup of %s failed: %s", peer, exc)
        value = getattr(found, "value", None)
        return value if isinstance(value, bytes) else None

    async def _resolve(self, peer: PeerId) -> PeerRecord | None:
        value = await self._lookup_record(peer)
        if value is None:
            return None
        record, changed = await self._store_record(peer, value)
        if record is None or changed:
            return record
        # The store kept its cached record: never use a DHT answer older than it (a replayed, rolled-back record).
        cached = await self._db.read(lambda c: repo.get_peer_record(c, peer.to_bytes()))
        if cached is not None and cached.seq > record.seq:
            log.info(
                "chat: DHT gave %s's peer record seq %d, older than cached %d; ignored", peer, record.seq, cached.seq
            )
            return await self._cached_record(peer)
        return record

    async def peer_record_seen(self, peer_id: PeerId, value: bytes, *, contacts_only: bool = False) -> bool:
        """A peer record of ``peer_id`` was seen (e.g. by the DHT): cache it if newer, and if so (and no session
        with the peer is open) make that peer's outbox entries due at once.  If its addresses changed, sessions
        over an address it no longer lists are closed first (:meth:`_close_moved_sessions`).  Return whether it was
        newer (and cached).

        With ``contacts_only`` the record is only considered if ``peer_id`` is a contact (not blocked): the node
        passes every newer record its DHT store takes in, most of them strangers'."""
        if contacts_only and not await self._db.read(functools.partial(_is_contact, peer=peer_id.to_bytes())):
            return False
        before = await self._cached_record(peer_id)
        # What we knew of the peer's addresses: its cached record, or else the invite's (a first record).
        known = set(_record_addrs(before)) if before is not None else set(await self._hints(peer_id))
        record, changed = await self._store_record(peer_id, value)
        moved = set(_record_addrs(record)) != known
        if changed and moved and record is not None:
            self._close_moved_sessions(peer_id, record, known)
        if changed and self._best_session(peer_id) is None:  # a live session needs no new address
            log.info("chat: newer peer record of %s seen; its outbox is due now", peer_id)
            dial = self._dial_scopes.get(peer_id)
            if dial is not None and moved:
                dial.cancel()  # it may be waiting on an address the peer left: start over with the new ones
            else:
                await self._expedite(peer_id)
        return changed

    def _close_moved_sessions(self, peer: PeerId, record: PeerRecord, known: set[Multiaddr]) -> None:
        """``peer``'s newer ``record`` lists other addresses than the ``known`` ones: close our sessions with it that
        run over an address it listed before and no longer lists (an outbound one dialled at such an address, an
        inbound one from such a host).  The peer moved (a new lease, another network), and such a session is most
        likely dead without knowing it (no FIN, no RST); it would hold our messages until ``resend_after_ms`` passed
        without a receipt.  A session over an address the peer never listed (an inbound one through a NAT, one
        dialled at a name) says nothing about the move and is kept."""
        listed = {addr.transport() for addr in _record_addrs(record)}
        hosts = {host for _, host, _ in listed}
        dropped = {addr.transport() for addr in known} - listed
        dropped_hosts = {host for _, host, _ in dropped} - hosts
        for session in self._sessions.get(peer, []):
            if session.closed:
                continue
            try:
                kind, host, port = Multiaddr.parse(session.addr).transport()
            except (MultiaddrError, P2PMsgError):
                continue  # the address it runs over is not known: nothing to compare
            gone = (kind, host, port) in dropped if session.direction == "outbound" else host in dropped_hosts
            if gone:
                session.redial = True
                self._close_session(session, f"the peer's newer record no longer lists {session.addr}")

    async def _record_watcher(self) -> None:
        """Every :attr:`ChatConfig.record_watch` seconds, run one :meth:`_watch_round` (module docstring)."""
        while True:
            await trio.sleep(self.config.record_watch)
            try:
                await self._watch_round()
            except Exception as exc:  # a bug or a store failure: keep the node up, try again next round
                closed = store_errors.StoreClosedError
                if isinstance(exc, closed) or (isinstance(exc, ExceptionGroup) and exc.subgroup(closed) is not None):
                    log.info("chat: the store is closed; the record watcher stops")  # (the lookups are a nursery)
                    return
                self._dropped["chat_internal_error"] += 1
                log.exception("chat: record watch round failed")

    async def _watch_round(self) -> list[PeerId]:
        """Look up the records of the least recently watched contacts whose outbox entries all wait for a retry
        (at most :attr:`ChatConfig.record_watch_peers`, concurrently) and pass what is found to
        :meth:`peer_record_seen`.  Return the peers looked up."""
        now = self._now()
        raws = await self._db.read(functools.partial(repo.waiting_recipients, now=now, limit=_WATCH_CANDIDATES))
        waiting: list[PeerId] = []
        for raw in raws:
            try:
                peer = self._peer_of(raw)
            except InvalidPeerIdError:
                continue
            if peer not in self._dialing and self._best_session(peer) is None:
                waiting.append(peer)
        keep = set(waiting)
        self._watched = {p: t for p, t in self._watched.items() if p in keep}
        waiting.sort(key=lambda p: self._watched.get(p, -math.inf))
        chosen = waiting[: self.config.record_watch_peers]
        started = trio.current_time()

        async def watch(peer: PeerId) -> None:
            self._watched[peer] = started
            self.record_lookups += 1
            value = await self._lookup_record(peer)
            if value is not None:
                await self.peer_record_seen(peer, value)

        async with trio.open_nursery() as nursery:
            for peer in chosen:
                nursery.start_soon(watch, peer)
        return chosen

    def _dht_lookup_due(self, peer: PeerId) -> bool:
        """Whether a dial to ``peer`` may ask the DHT for its record: yes, but during a failure streak at most once
        in :data:`_STREAK_LOOKUP_INTERVAL` (a contact offline for days was looked up at every retry)."""
        streak = self._unreachable.get(peer)
        now = trio.current_time()
        if streak is None or now - streak.last >= _STREAK_GAP:
            return True
        if now - streak.looked_up < min(streak.lookup_interval, _STREAK_LOOKUP_INTERVAL):
            return False
        streak.looked_up = now
        return True

    async def _connect(self, peer: PeerId) -> tuple[SecureChannel, str]:
        hints = await self._hints(peer)
        record = await self._cached_record(peer)
        ask_dht = self._dht_lookup_due(peer)
        tried: list[Multiaddr] = []
        reasons: list[str] = []

        def failed() -> _ConnectFailed:
            return _ConnectFailed("; ".join(reasons) if reasons else f"no known address for {peer}")

        async def attempt(addrs: list[Multiaddr]) -> tuple[SecureChannel, str] | None:
            candidates = [a for a in addrs if a not in tried]
            if not candidates:
                return None
            tried.extend(candidates)
            try:
                channel = await self._dial(
                    self.identity, peer, candidates, timeout=self.config.dial_timeout, nursery=self._nursery
                )
            except DialError as exc:
                reasons.append(str(exc))
                return None
            return channel, _channel_addr(channel, candidates)

        if record is None and not ask_dht:
            result = await attempt(hints)
            if result is None:
                raise failed()
            return result
        if record is None:
            # Nothing cached: the invite's addresses and a DHT lookup at once, since either may be slow (a lookup
            # with no live peer in the table times out; an invite's address may be stale and only time out); the
            # first channel wins and the other attempt is cancelled.  The Noise handshake proves whom they reach.
            won: list[tuple[SecureChannel, str]] = []

            async def race(addrs: Callable[[], Awaitable[list[Multiaddr]]], scope: trio.CancelScope) -> None:
                result = await attempt(await addrs())
                if result is not None:
                    won.append(result)
                    scope.cancel()

            async def hinted() -> list[Multiaddr]:
                return hints

            async def looked_up() -> list[Multiaddr]:
                return _record_addrs(await self._resolve(peer))

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(race, hinted, nursery.cancel_scope)
                    nursery.start_soon(race, looked_up, nursery.cancel_scope)
            except BaseException:  # the dial itself was cancelled: no channel it won may stay open
                with trio.CancelScope(shield=True):
                    for channel, _ in won:
                        await trio.aclose_forcefully(channel)
                raise
            with trio.CancelScope(shield=True):  # closing the spare must not be cut short and lose the one kept
                for channel, _ in won[1:]:  # both got through before the cancellation: keep one
                    await trio.aclose_forcefully(channel)
            if won:
                return won[0]
            raise failed()
        result = await attempt(_record_addrs(record) + hints)
        if result is None and ask_dht:
            # The cached record may be stale: ask the DHT again and try what is new.
            result = await attempt(_record_addrs(await self._resolve(peer)))
        if result is None:
            raise failed()
        return result

    # ------------------------------------------------------------------------------------------------- sessions

    async def _contact_treatment(self, peer: PeerId) -> tuple[Contact | None, bool] | None:
        """The peer's contact row and whether it is auto-added (see :func:`_contact_and_mark`), as of now.

        A contact change (add, accept, rename, remove, block) that commits while this read is on its way looks for
        the peer's sessions, to promote or close them, before the new session is registered, and so misses it.  The
        read is therefore repeated until no change was committed meanwhile; the caller registers the session with
        no checkpoint in between, so a later change finds it.  ``None`` after :data:`_CONTACT_READ_ATTEMPTS` reads
        that all raced a change (the channel is then refused; the peer dials again)."""
        for _ in range(_CONTACT_READ_ATTEMPTS):
            generation = self._contact_generation
            result = await self._db.read(lambda c: _contact_and_mark(c, peer.to_bytes()))
            await trio.lowlevel.checkpoint_if_cancelled()  # a read completes even when cancelled meanwhile
            if generation == self._contact_generation:
                return result
        return None

    def _best_session(self, peer: PeerId) -> _Session | None:
        """The newest open session with ``peer`` whose hello arrived (its backlog was made due), else the newest open
        one."""
        newest = None
        for session in reversed(self._sessions.get(peer, [])):
            if not session.closed:
                if session.expedited:
                    return session
                newest = newest or session
        return newest

    async def handle_inbound(self, channel: SecureChannel, remote_addr: Multiaddr | None = None) -> None:
        """Serve an authenticated inbound channel until it closes (the listener's handler)."""
        await self._run_session(channel, "inbound", str(remote_addr) if remote_addr is not None else "", False)

    async def _run_session(self, channel: SecureChannel, direction: str, addr: str, dialed: bool) -> None:
        peer = channel.remote_peer
        session: _Session | None = None
        dial_done = not dialed  # this dial's mark in _dialing is cleared once (a later dial may set it again)
        unsent: list[bytes] = []
        stopping = False
        refused = False  # closed here before a session started (below): for our own dial, a failed attempt
        try:
            if peer == self.identity.peer_id:
                self._drop("chat_self_connection", "a channel to ourselves")
                refused = True
                return
            treatment = await self._contact_treatment(peer)
            if treatment is None:
                self._drop("chat_contacts_churn", "the contacts kept changing while the channel opened", peer)
                refused = True
                return
            contact, auto = treatment
            relation = _relation(contact)
            if relation is Relation.CONTACT and auto:
                relation = Relation.STRANGER  # auto-added, not vouched for: stranger limits still apply
            refused = True
            if not self.config.policy.admit_channel(relation):
                self._drop("chat_blocked_peer", "channel of a blocked peer closed", peer)
                return
            total = sum(len(v) for v in self._sessions.values())
            if total >= self.config.max_sessions:
                self._drop("chat_session_limit", f"{total} sessions already open", peer)
                return
            if relation is Relation.STRANGER and not self._stranger_slot(peer):
                return
            refused = False
            session = _Session(
                peer=peer,
                channel=channel,
                direction=direction,
                addr=addr,
                since=self._now(),
                contact_name=contact.name if contact is not None else None,
                relation=relation,
                active_at=trio.current_time(),
                opened_at=trio.current_time(),
                progress_at=trio.current_time(),
            )
            sessions = self._sessions.setdefault(peer, [])
            sessions.append(session)
            open_ = [s for s in sessions if not s.closed]  # the closed ones are on their way out
            for old in open_[: max(0, len(open_) - self.config.max_sessions_per_peer)]:
                self._close_session(old, "replaced by a newer session")
            if not dial_done:
                dial_done = True
                self._dialing.discard(peer)
            self._publish(
                ev.PeerUpEvent(peer_id=self._text(peer), contact=session.contact_name, direction=direction, addr=addr)
            )
            log.info("chat: session with %s open (%s %s)", peer, direction, addr or "?")
            self._unreachable.pop(peer, None)  # a failure after this one starts a new streak, logged again
            if relation is Relation.CONTACT:
                self._note_contact_address(addr)
            with session.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guarded, session, self._sender)
                    nursery.start_soon(self._watch_transport, session)
                    await self._guarded(session, self._reader)
                    nursery.cancel_scope.cancel()
        except store_errors.StoreClosedError:
            if session is not None:
                session.close_reason = "the store is closed"
        except Exception:  # a bug: lose this session, never the node
            self._dropped["chat_internal_error"] += 1
            log.exception("chat: session with %s failed", peer)
            if session is not None:
                session.close_reason = "internal error"
        except BaseException as exc:
            # Cancelled from outside the session (its own closes end inside it): the node, or its listener, stops.
            stopping = isinstance(exc, trio.Cancelled) or (
                isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None
            )
            raise
        finally:
            if refused and dialed and not stopping:  # our dial's channel, closed here (no slot free ...): failed
                # As after a failed dial, with the dial's mark still set: no round may dial the peer (or postpone
                # its due entries, which the reschedule would then miss) until the backoff is written.
                with (
                    trio.CancelScope(shield=True, deadline=trio.current_time() + _SETTLE_TIMEOUT),
                    self._store_failure_logged(f"rescheduling the messages to {peer}"),
                ):
                    await self._reschedule_peer(peer, "the session could not start here")
                self._hold_redials(peer)
            if not dial_done:
                self._dialing.discard(peer)
            if session is not None:
                unsent = self._release_session(session)
                if stopping:  # no attempt is counted: what was unsent is due again at the next start, the rest later
                    self._settled(peer)
                else:
                    # Settled before the channel is closed (a WebSocket close can take seconds, during which the
                    # outbox would leave the peer alone) and shielded: the count in _settling must come down; the
                    # store's own failures are logged, and the deadline bounds a stuck store.
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + _SETTLE_TIMEOUT):
                        await self._settle_session(session, unsent)
            await close_gracefully(channel)

    def _close_session(self, session: _Session, reason: str | None = None) -> None:
        """End ``session`` (its task lets go of it soon): from now on it takes nothing, the peer's other sessions lose
        their bypass, and the outbox leaves the peer alone until the session has settled (see
        :meth:`_release_session`): until then what it holds would be overtaken over another session."""
        if reason is not None and session.close_reason is None:
            session.close_reason = reason
        if not session.closed:
            session.closed = True
            for other in self._sessions.get(session.peer, ()):
                other.in_order = False
        if not session.settle_counted:
            session.settle_counted = True
            self._settling[session.peer] += 1
        session.scope.cancel()

    def _release_session(self, session: _Session) -> list[bytes]:
        """The first step at the end of a session, before any await: forget it and what it held; return the entries
        it held that were handed to it before their rows were due (their rows wait for a resend time).  Until
        :meth:`_settle_session` has put what it left behind back on the schedule, the outbox leaves the peer alone:
        with no session left it would dial it (a peer that closes every channel at once was redialled in a loop),
        with another it would hand that one newer entries first."""
        peer = session.peer
        self._close_session(session)  # if nothing closed it before: no bypass, the outbox holds off the peer
        sessions = self._sessions.get(peer, [])
        if session in sessions:
            sessions.remove(session)
        if not sessions:
            self._sessions.pop(peer, None)
        unsent = [mid for mid in session.held if mid in self._premarked]
        self._premarked.difference_update(unsent)
        self._inflight.difference_update(session.held)
        session.held.clear()
        session.pending.clear()
        if session.inbox_bytes:  # chunks read but never stored (the session ended first)
            self._give_back_inbox(session, session.inbox_bytes, session.stranger_inbox_bytes)
        self._poke()
        return unsent

    async def _settle_session(self, session: _Session, unsent: list[bytes]) -> None:
        """The last step at the end of a session (after :meth:`_release_session`): put what it did not deliver back
        on the outbox schedule, then let the outbox act on the peer again."""
        try:
            await self._session_ended(session, unsent)
        finally:
            self._settled(session.peer)

    def _settled(self, peer: PeerId) -> None:
        """A session with ``peer`` has settled: the outbox may act on the peer again (after its next read)."""
        self._settling[peer] -= 1
        if not self._settling[peer]:
            del self._settling[peer]
        # A round that read before this point must not hand the peer what it read (its leftovers were not due).
        self._settles += 1
        self._settled_at[peer] = self._settles
        self._poke()

    async def _session_ended(self, session: _Session, unsent: list[bytes]) -> None:
        """Log a closed session and put what it did not deliver back on the outbox schedule."""
        peer = session.peer
        reason = session.close_reason or "closed"
        log.info("chat: session with %s closed: %s", peer, reason)
        if self._best_session(peer) is None:
            self._publish(ev.PeerDownEvent(peer_id=self._text(peer), contact=session.contact_name, reason=reason))
            # What was written but not acknowledged, and what is due, waits for the backoff: a peer that closes
            # every session at once (it blocked us, it is overloaded) is not hammered with redials.
            with self._store_failure_logged(f"rescheduling the messages to {peer}"):
                await self._reschedule_peer(peer, f"session closed: {reason}", [*session.written, *unsent])
                if session.direction == "outbound" and not session.greeted:
                    self._hold_redials(peer)  # our dial got no hello (the peer refused it): a failed dial
                if session.redial:
                    await self._expedite(peer)
        else:
            # Another session lives: what this one did not deliver (unsent, or written without a receipt) is due at
            # once, to go out there ahead of anything newer; in backoff, or waiting for its resend time, newer
            # entries due now would overtake it.  Only those: the other session's own entries are on their way.
            leftovers = [*session.written, *unsent]
            if not leftovers:
                return
            now = self._now()
            done = False
            try:
                with self._store_failure_logged(f"flushing the messages to {peer}"):
                    await self._db.write(lambda c: repo.expedite_ids(c, leftovers, now=now))
                    done = True
            finally:
                if not done:  # the store failed, or the deadline passed: they would be overtaken; start over
                    for other in list(self._sessions.get(peer, ())):
                        self._close_session(other, "a session that ended could not put its messages back in order")
            self._poke()

    @contextlib.contextmanager
    def _store_failure_logged(self, what: str) -> Iterator[None]:
        """For bookkeeping writes after the fact (a reschedule, a flush): a store that is closing or cannot write
        (disk full) costs only that write, logged and counted; it never escapes into the service's nursery, where it
        would stop the node.  The outbox rows stay as they were, so the messages are tried again later anyway."""
        try:
            yield
        except store_errors.StoreClosedError:
            pass
        except store_errors.StoreError as exc:
            self._bookkeeping_failed(what, exc)

    def _bookkeeping_failed(self, what: str, exc: Exception) -> None:
        """Count and log (a warning at most once a minute) a failed bookkeeping write, and slow the outbox worker
        down while they fail (:data:`_STORE_FAILED_PAUSE`)."""
        self._dropped["chat_store_failed"] += 1
        self._store_failed_at = trio.current_time()
        self._store_warning.log(
            logging.WARNING, "bookkeeping", "chat: %s failed: %s (the messages stay queued)", what, exc
        )

    def _stranger_slot(self, peer: PeerId) -> bool:
        """Make room for a new stranger session: when the stranger slots are full, evict the stranger session that
        has been idle longest (no complete message frame for the longest time).  Return whether there is room."""
        strangers = [s for v in self._sessions.values() for s in v if s.relation is Relation.STRANGER and not s.closed]
        if len(strangers) < self.config.max_stranger_sessions:
            return True
        if not strangers:
            self._drop("chat_stranger_session_limit", "no stranger sessions allowed", peer)
            return False
        victim = min(strangers, key=lambda s: s.active_at)
        idle = trio.current_time() - victim.active_at
        self._close_session(victim, f"evicted for a new stranger after {idle:.1f} s idle")
        self._drop("chat_stranger_session_evicted", f"{len(strangers)} stranger sessions open", victim.peer)
        return True

    async def _guarded(self, session: _Session, body: Callable[[_Session], Awaitable[str]]) -> None:
        """Run a session task; turn the ways a session ends into its close reason, then end the whole session."""
        peer = session.peer
        try:
            reason = await body(session)
        except SessionProtocolError as exc:
            reason = f"protocol error: {exc}"
            self._drop("chat_protocol_error", str(exc), peer)
        except ChannelCutError as exc:  # the peer's write was cut short (killed, gave up on a slow link): no bad input
            reason = f"connection lost: {exc}"
        except ChannelError as exc:  # a frame that does not open, empty frames
            reason = f"secure channel error: {exc}"
            self._drop("chat_channel_error", str(exc), peer)
        except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason = f"connection lost: {type(exc).__name__}: {exc}"
        except trio.TooSlowError:
            reason = "send timed out"
            self._drop("chat_send_timeout", f"no progress for {self.config.send_timeout:g} s", peer)
        except _SessionRefused as exc:
            reason = str(exc)
        except store_errors.StoreWriteError as exc:  # disk full, I/O error: the session bookkeeping was not saved
            reason = f"the store failed: {exc}"
            self._drop("chat_store_failed", reason, peer)
            self._hold_redials(peer, store_failed=True)  # each new session would fail the same way, resending all
        self._close_session(session, reason)

    async def _write(self, session: _Session, data: bytes) -> None:
        """Write ``data`` on the session; :class:`trio.TooSlowError` once the transport made no progress for
        :attr:`ChatConfig.send_timeout` (a large write on a slow link may take longer, see :meth:`_watch_transport`)."""
        if not data:
            return
        async with session.send_lock:
            with trio.CancelScope(deadline=trio.current_time() + self.config.send_timeout) as scope:
                session.write_scope = scope
                try:
                    await session.channel.send_all(data)
                finally:
                    session.write_scope = None
            if scope.cancelled_caught:
                raise trio.TooSlowError

    async def _watch_transport(self, session: _Session) -> None:
        """Every quarter of the shorter of :attr:`ChatConfig.send_timeout` and :attr:`ChatConfig.resend_after_ms`, look
        whether the session still moves on a slow link, in either direction:

        * the peer's TCP acknowledged more of what we wrote while some of it was still queued or being written
          (:func:`~p2pmsg.net.transport.tcp_send_progress`): the running write's deadline moves on, and the session is
          not presumed dead for want of receipts (:meth:`_dispatch`) while a large message or a long batch is on its
          way.  Once nothing is queued this does not count: a peer that takes everything and acknowledges nothing is
          not alive;
        * bytes came in from the peer (the channel's ``work_done``) while its TCP had everything we wrote (or where the
          socket cannot be asked): its receipts may be queued behind a large message of its own, so the session is not
          presumed dead either (a write of ours is not helped by that).  With our bytes stuck in the queue, incoming
          ones do not count: our direction may be the broken one."""
        cfg = self.config
        period = max(0.005, min(cfg.send_timeout, cfg.resend_after_ms / 1000) / 4)
        channel = session.channel
        stream = channel.transport_stream
        ask = True
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            reads = channel.work_done
            read_more = reads > session.reads_seen
            session.reads_seen = reads
            progress = tcp_send_progress(stream) if ask else None
            if progress is None:
                ask = False  # not a socket we can ask: receipts and reads alone tell
                if read_more:
                    session.progress_at = now
                continue
            acked, queued = progress
            sent_more = acked > session.acked_bytes
            session.acked_bytes = max(acked, session.acked_bytes)
            if sent_more and (queued > 0 or session.write_scope is not None):
                session.progress_at = now
                if session.write_scope is not None:
                    session.write_scope.deadline = now + cfg.send_timeout
            elif read_more and queued == 0 and session.write_scope is None:
                session.progress_at = now

    async def _sender(self, session: _Session) -> str:
        cfg = self.config
        while True:
            await session.work.wait()
            session.work = trio.Event()
            while session.pending:
                batch: list[tuple[bytes, bytes]] = []
                while session.pending and len(batch) < cfg.batch_size:
                    batch.append(session.pending.popitem(last=False))
                ids = [mid for mid, _ in batch]
                # Recorded before the write: the receipts may come back before send_all returns.
                session.written.update(dict.fromkeys(ids, trio.current_time()))
                await self._write(session, session.conn.send_messages(raw for _, raw in batch))
                premarked = self._premarked
                if premarked:
                    # Their outbox rows got the resend time at enqueue: nothing to write.  "sent" lives in memory
                    # (session.written) until the receipt; after a crash they are due again and sent again.
                    ahead = [mid for mid in ids if mid in premarked]
                    if ahead:
                        premarked.difference_update(ahead)
                        session.held.difference_update(ahead)
                        self._inflight.difference_update(ahead)
                        written = session.written
                        self._publish_receipt(session.peer, [m for m in ahead if m in written], "sent")
                        if len(ahead) == len(ids):
                            continue
                        done = set(ahead)
                        ids = [mid for mid in ids if mid not in done]
                now = self._now()
                retry_at = min(now + cfg.resend_after_ms, MAX_TIMESTAMP)
                marked = await self._db.write(
                    functools.partial(repo.mark_sent_many, message_ids=ids, now=now, retry_at=retry_at),
                    durable=False,  # if lost, the entry is due sooner: a resend the receiver deduplicates
                )
                session.held.difference_update(ids)
                self._inflight.difference_update(ids)
                if marked == len(ids):  # otherwise some receipts overtook the mark: their "delivered" says enough
                    self._publish_receipt(session.peer, ids, "sent")

    async def _reader(self, session: _Session) -> str:
        await self._write(session, session.conn.send_hello(self._run))
        # Received envelopes go to a storer task, so reading goes on while a chunk commits; the storer takes all that
        # piled up meanwhile into its next transaction (bounded: the reader waits when _INBOX_CHUNKS are queued).
        send, receive = trio.open_memory_channel[_InboxChunk](_INBOX_CHUNKS)
        failure: list[Exception] = []
        reason = ""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._storer, session, receive, failure, nursery.cancel_scope)
            try:
                async with send:
                    reason = await self._read_loop(session, send)
            except Exception as exc:  # re-raised below, outside the nursery (no exception group)
                failure.insert(0, exc)
                nursery.cancel_scope.cancel()
        if failure:
            raise failure[0]
        return reason

    async def _storer(
        self,
        session: _Session,
        receive: trio.MemoryReceiveChannel[_InboxChunk],
        failure: list[Exception],
        scope: trio.CancelScope,
    ) -> None:
        try:
            async with receive:
                async for chunk, charged, stranger_charged in receive:
                    batch = list(chunk)
                    while len(batch) < _INBOX_BATCH:
                        try:
                            more, size, stranger_size = receive.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        batch.extend(more)
                        charged += size
                        stranger_charged += stranger_size
                    try:
                        await self._receive_envelopes(session, batch)
                    finally:
                        self._give_back_inbox(session, charged, stranger_charged)
        except Exception as exc:
            failure.append(exc)
            scope.cancel()

    async def _read_loop(self, session: _Session, inbox: trio.MemorySendChannel[_InboxChunk]) -> str:
        while True:
            # A stranger's idle time runs from its last message that opened, not its last byte: dribbling bytes
            # (or acks, or forged envelopes) cannot hold a stranger slot.
            idle = self.config.stranger_idle_timeout
            deadline = session.active_at + idle if session.relation is Relation.STRANGER else math.inf
            data = None
            with trio.move_on_at(deadline):
                data = await session.channel.receive_some(_RECEIVE_CHUNK)
            if data is None:
                if session.relation is not Relation.STRANGER:
                    continue  # became a contact meanwhile
                if trio.current_time() < session.active_at + idle:
                    continue  # the storer saw a message meanwhile (it sets active_at)
                return f"a stranger's session idle for {idle:g} s"
            events = session.conn.receive_data(data)
            # What this read cost: the frames it completed, or the transport reads and decryptions it took (a frame
            # trickled in byte by byte, or behind empty Noise frames, costs work and delivers little), at least one.
            work = session.channel.work_done
            cost = max(1, len(events), work - session.work_seen)
            session.work_seen = work
            if session.relation is Relation.STRANGER:
                if len(events) > _STRANGER_FRAMES_PER_READ:
                    self._drop("chat_stranger_flood", f"{len(events)} frames in one read", session.peer)
                    return f"the stranger sent more than {_STRANGER_FRAMES_PER_READ} frames at once"
                await self._pace_stranger(session, cost)
            envelopes: list[SealedEnvelope] = []
            acks: list[bytes] = []
            closed = hello = False
            for event in events:
                if isinstance(event, ev.EnvelopeReceived):
                    envelopes.append(event.envelope)
                elif isinstance(event, ev.AckReceived):
                    acks.extend(event.ids)
                elif isinstance(event, ev.HelloReceived):
                    hello = True
                    session.peer_run = event.run
                elif isinstance(event, ev.SessionClosed):
                    closed = True
            if hello:
                await self._peer_ready(session)
            if envelopes:
                # The envelopes' own size: what the storer holds until they are stored (the read that completed them
                # may be much shorter).
                size = sum(len(envelope.raw) for envelope in envelopes)
                stranger_size = size if session.relation is Relation.STRANGER else 0
                if stranger_size:  # the strangers' share first: a stranger never waits holding contacts' bytes
                    await self._stranger_budget.take(stranger_size)
                    session.stranger_inbox_bytes += stranger_size
                await self._inbox_budget.take(size)
                session.inbox_bytes += size
                await inbox.send((envelopes, size, stranger_size))
            if acks:
                await self._apply_acks(session, acks)
            if closed:
                return "the peer closed the session"

    def _note_clock_skew(self, peer: PeerId, name: str | None, ahead_ms: int) -> None:
        """A message stamped more than :data:`_CLOCK_ALLOWANCE_MS` after our clock says one of the two clocks is
        wrong (within it, timestamps may legitimately run ahead: see :meth:`_stamp`): its ``ts`` is lowered (so it
        cannot pin itself below newer messages), replies between the two may sort before what they answer, and a
        clock far off also makes signed peer records look expired.  Say so in the log, at most once per
        :data:`_SKEW_WARNING_INTERVAL`."""
        if ahead_ms <= _CLOCK_ALLOWANCE_MS:
            return
        self._skew_warning.log(
            logging.WARNING,
            "clock skew",
            "chat: a message from %s is stamped %s after this node's clock (%s), more than the %d minutes allowed: "
            "this node's clock or the sender's is wrong. Its time was lowered, and until the clocks agree, messages "
            "between the two may sort before the ones they answer",
            peer if name is None else f"{name} ({peer})",
            span(ahead_ms / 1000),
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self._now() / 1000)),
            _CLOCK_ALLOWANCE_MS // 60000,
        )

    async def _peer_ready(self, session: _Session) -> None:
        """The peer's hello arrived: make its outbox entries due now, whatever their backoff, and wake the outbox.

        Not when the channel merely opened: a node that refuses us (it blocked us, or has no session slot) completes
        the handshake and then closes without a hello.  Expediting then would reset the backoff on every redial, and
        the outbox would redial such a peer in a tight loop, each time counting an attempt."""
        session.greeted = True
        self._redials.pop(session.peer, None)  # before the write (see _expedite)
        now = self._now()
        raw = session.peer.to_bytes()
        await self._db.write(lambda c: repo.expedite(c, raw, now=now))
        session.expedited = True
        if session.closed:  # it ended during the write: it is not the one to take over
            self._poke()
            return
        # An older session still holding messages (on their way, or written without a receipt) is most likely dead
        # (the peer restarted, or moved): ended, it hands them to this one, ahead of anything newer.  Kept, it would
        # resend them only after its own timeout, behind newer messages sent here meanwhile.  Not one opened at
        # about the same time: both nodes dialled each other, and each might end the connection the other keeps;
        # unless the hellos tell a restart apart: of two sessions of different runs of the peer, the older is dead
        # however much older (this one, if its hello was read last: the store was busy).
        run = session.peer_run
        for other in list(self._sessions.get(session.peer, ())):
            if other is session or other.closed:
                continue
            if run is not None and other.peer_run not in (None, run):
                older = other if other.opened_at <= session.opened_at else session
                self._close_session(older, "the peer restarted (a hello of its new run on a newer session)")
                if older is session:
                    break
            elif (other.held or other.written) and session.opened_at - other.opened_at > _CROSSING_DIAL_WINDOW:
                self._close_session(other, "the peer said hello on a newer session")
        self._poke()

    async def _receive_envelopes(self, session: _Session, envelopes: list[SealedEnvelope]) -> None:
        peer = session.peer
        direct = [envelope for envelope in envelopes if envelope.sender is peer or envelope.sender == peer]
        if len(direct) != len(envelopes):
            for envelope in envelopes:
                if envelope.sender != peer:
                    self._drop("chat_relayed_envelope", f"envelope {envelope.id_hex} from {envelope.sender}", peer)
        opened, refused = self._sealer.open_many(direct)
        for _, exc in refused:
            if isinstance(exc, WrongRecipientError):
                self._drop("chat_wrong_recipient", str(exc), peer)
            elif isinstance(exc, DecryptionError):
                self._drop("chat_undecryptable", str(exc), peer)
            else:
                self._drop("chat_invalid_message", str(exc), peer)
        if not opened:
            return
        # Activity is a message that opened (from the peer, to us): a stranger sending only forged or undecryptable
        # envelopes does not keep its session slot.
        session.active_at = trio.current_time()
        if len(opened) <= _LOW_SPACE_BATCH or not self._db.short_of_space:
            batches = [opened]
        else:  # what fits is stored and acknowledged; the sender resends the rest, after it and in order
            batches = [opened[i : i + _LOW_SPACE_BATCH] for i in range(0, len(opened), _LOW_SPACE_BATCH)]
        for index, batch in enumerate(batches):
            if session.held_back is not None:
                self._dropped[session.held_back] += len(batch)
                continue
            try:
                await self._store_received(session, batch)
            except _SessionRefused:  # blocked: the batches after this one are refused too
                self._dropped["chat_blocked_peer"] += sum(map(len, batches[index + 1 :]))
                raise

    async def _store_received(self, session: _Session, opened: list[OpenedText]) -> None:
        """Store ``opened`` (from ``session``'s peer, in one transaction) and acknowledge what the policy let in;
        or, if the store failed, hold the session back (nothing of it is acknowledged)."""
        peer = session.peer
        now = self._now()
        try:
            incoming = await self._db.write(lambda c: self._store_incoming(c, peer, opened, now))
        except store_errors.StoreWriteError as exc:
            # Disk full, I/O error: nothing of the batch was stored, so nothing is acknowledged, and the sender sends
            # it again on a new session, in send order.
            self._hold_back(session, "chat_store_failed", "received messages could not be stored")
            self._dropped["chat_store_failed"] += len(opened)
            self._awaiting_room.pop(peer, None)
            self._awaiting_room[peer] = None
            if len(self._awaiting_room) > _MAX_AWAITING_ROOM:
                del self._awaiting_room[next(iter(self._awaiting_room))]
            self._store_warning.log(
                logging.WARNING,
                "cannot store",
                "chat: cannot store %d received message(s) from %s, not acknowledging them (the sender will send "
                "them again): %s",
                len(opened),
                peer,
                exc,
            )
            return
        self._note_clock_skew(peer, incoming.contact_name, max(m.ts for m in opened) - now)
        stored = [at for at, outcome in zip(incoming.sent_at, incoming.outcomes, strict=True) if outcome == "stored"]
        if stored:
            self._raise_floor(peer.to_bytes(), max(stored))
            # The time before the write, not after it: the writer may have failed a later transaction by the time
            # this task runs again, and `status` must not then say the store works.
            self.messages_stored_at = now
        if incoming.auto_added:
            self._contacts_changed()
        if incoming.relation is Relation.BLOCKED:
            self._dropped["chat_blocked_peer"] += len(opened)
            raise _SessionRefused("the peer is blocked")
        outcomes = incoming.outcomes
        if not outcomes:  # refused by the policy: nothing stored, nothing acknowledged
            return
        if "overflow" in outcomes:
            # The first message over the limits and everything after it (in this batch, and later on this session)
            # wait at the sender: a smaller one after it might fit, and would then sit before it in the history.
            ack_ids = [m.id for m, outcome in zip(opened, outcomes, strict=True) if outcome != "overflow"]
            overflow = len(outcomes) - len(ack_ids)
            counter, reason = _OVER_THE_LIMITS[incoming.disposition]
            self._hold_back(session, counter, reason)
            self._dropped[counter] += overflow
            log.info("chat: %d message(s) from %s not acknowledged: %s", overflow, peer, reason)
        else:
            ack_ids = [m.id for m, _ in zip(opened, outcomes, strict=True)]
        # The events first, with no await between them and the commit: the ack write can be cut short (the session
        # closed meanwhile), and the peer's resend of these would be a duplicate, with no event.
        if self._listened():
            text = self._text(peer)
            for message, outcome, sent_at in zip(opened, outcomes, incoming.sent_at, strict=True):
                if outcome != "stored":
                    continue
                if incoming.disposition is Disposition.REQUEST:
                    self._publish(ev.RequestEvent(id=message.id.hex(), peer_id=text, text=message.text, ts=sent_at))
                else:
                    fields = ev.message_fields(
                        message.id.hex(), text, incoming.contact_name, text, message.text, sent_at, "in"
                    )
                    self._publish_fields("message", fields)
        await self._write(session, session.conn.send_ack(ack_ids))
        if session.held_back in _HELD_OVER_THE_LIMITS and session.promoted:
            # Accepted while this batch was being stored (as requests): what it held back need not wait either.
            session.close_reason = _PROMOTED  # instead of the hold's own reason
            self._close_session(session)

    @staticmethod
    def _hold_back(session: _Session, counter: str, reason: str) -> None:
        """Acknowledge nothing more on ``session`` (what arrives is counted under ``counter``), and end it after
        :data:`_HELD_BACK_LINGER`: the sender then resends what was held back, in order, on a new session.

        Not at once: closing it made the sender redial (and resend all) many times a second.  Ended even if the
        sender does not end it (it ends only its newest session, and this one may not be): a session that stores
        nothing must not linger and swallow later messages."""
        if session.held_back is None:
            session.held_back = counter
            session.close_reason = session.close_reason or reason
            session.scope.deadline = min(session.scope.deadline, trio.current_time() + _HELD_BACK_LINGER)

    def _store_incoming(
        self, conn: sqlite3.Connection, peer: PeerId, messages: list[OpenedText], now: int
    ) -> _Incoming:
        """Runs on the store's writer thread: apply the policy and store (one transaction)."""
        policy = self.config.policy
        raw = peer.to_bytes()
        contact = repo.get_contact(conn, raw)
        relation = _relation(contact)
        name = contact.name if contact is not None else None
        auto_added = repo.count_settings(conn, _AUTO_PREFIX) if relation is Relation.STRANGER else 0
        disposition = policy.classify(relation, auto_added=auto_added)
        if disposition is Disposition.REFUSE:
            return _Incoming(relation=relation, contact_name=name, disposition=disposition, outcomes=[], sent_at=[])
        added_now = False
        mark = None  # the auto-added mark (``accept_from = "anyone"``, not vouched for): bounds on what is stored
        if disposition is Disposition.ADD_AND_INBOX:
            added = _add_stranger(conn, raw, str(peer), now)
            mark = msgpack.packb(repo.last_message_seq(conn))
            repo.set_setting(conn, _AUTO_PREFIX + raw.hex(), mark, now=now)
            repo.settle_request(conn, raw)  # one it sent before (another policy, or no room then) joins the inbox
            name = added.name
            relation = Relation.CONTACT
            disposition = Disposition.INBOX
            added_now = True
        elif disposition is Disposition.INBOX:
            mark = repo.get_setting(conn, _AUTO_PREFIX + raw.hex())
        if disposition is Disposition.INBOX and mark is None:  # the hot path: one batch insert, rows not objects
            # A clock far in the future must not pin a message below newer ones: at most a little later than ours.
            latest = now + _CLOCK_ALLOWANCE_MS
            sent = [m.ts if m.ts < latest else latest for m in messages]
            rows: list[repo.IncomingRow] = [
                (m.id, raw, None, m.text, at, False) for m, at in zip(messages, sent, strict=True)
            ]
            fresh = repo.insert_incoming_rows(conn, rows, now=now)
            return _Incoming(
                auto_added=added_now,
                relation=relation,
                contact_name=name,
                disposition=disposition,
                outcomes=["stored" if new else "duplicate" for new in fresh],
                sent_at=sent,
            )
        outcomes: list[str] = []
        sent_ats: list[int] = []
        # The byte budget: read once per transaction, then kept up to date here (each read walks the requests).
        if disposition is Disposition.REQUEST:
            pending_bytes, peer_bytes, peer_count = repo.request_bytes(conn), repo.request_bytes(conn, raw), 0
        else:  # an auto-added contact: what it stored since it was added
            pending_bytes = 0
            peer_count, peer_bytes = repo.incoming_after(conn, raw, _mark_seq(mark))
        over = False  # a message went over the limits: the ones after it wait too (they must not overtake it)
        latest = now + _CLOCK_ALLOWANCE_MS  # a clock far in the future must not pin a message below newer ones
        for message in messages:
            sent_at = min(message.ts, latest)
            size = 0
            if repo.get_message(conn, message.id) is None:
                size = len(message.text.encode("utf-8"))
                if disposition is Disposition.REQUEST:
                    pending = repo.get_request(conn, raw)
                    admissible = policy.request_admissible(
                        pending_peers=repo.count_requests(conn),
                        pending_from_peer=pending.message_count if pending is not None else 0,
                        peer_already_pending=pending is not None,
                        pending_bytes=pending_bytes,
                        pending_bytes_from_peer=peer_bytes,
                        size=size,
                    )
                else:
                    admissible = policy.unvetted_admissible(stored=peer_count, stored_bytes=peer_bytes, size=size)
                if over or not admissible:
                    over = True
                    outcomes.append("overflow")
                    sent_ats.append(sent_at)
                    continue
            stored = repo.insert_incoming(
                conn,
                message_id=message.id,
                sender=raw,
                text=message.text,
                sent_at=sent_at,
                now=now,
                is_request=disposition is Disposition.REQUEST,
            )
            if stored:
                pending_bytes += size
                peer_bytes += size
                peer_count += 1
            outcomes.append("stored" if stored else "duplicate")
            sent_ats.append(sent_at)
        return _Incoming(
            auto_added=added_now,
            relation=relation,
            contact_name=name,
            disposition=disposition,
            outcomes=outcomes,
            sent_at=sent_ats,
        )

    async def _pace_stranger(self, session: _Session, reads: int) -> None:
        """Let a stranger's reader go on only as fast as :data:`_STRANGER_READS_PER_SESSION` and, for all strangers
        together, :data:`_STRANGER_READS_TOTAL` allow: a flood of frames that cost us work and deliver nothing
        (forged envelopes, replays, acks of nothing) waits in the kernel's buffers instead of taking a core."""
        first = session.pace is None
        if session.pace is None:
            session.pace = _Pacer(*_STRANGER_READS_PER_SESSION)
        if self._stranger_pace is None:
            self._stranger_pace = _Pacer(*_STRANGER_READS_TOTAL)
        await session.pace.take(reads)
        if not first:  # a new stranger's first read (its hello and requests) never waits behind a flood's debt
            await self._stranger_pace.take(reads)

    def _note_contact_address(self, addr: str) -> None:
        """Remember the source a contact's session runs over (see :meth:`is_familiar`)."""
        try:
            host = Multiaddr.parse(addr).transport()[1]
        except (MultiaddrError, P2PMsgError):
            return
        source = network_of(host)  # an IPv6 /64: a host's privacy addresses change within it
        self._contact_hosts[source] = None
        self._contact_hosts.move_to_end(source)
        while len(self._contact_hosts) > _MAX_CONTACT_HOSTS:
            self._contact_hosts.popitem(last=False)

    def is_familiar(self, ip: str) -> bool:
        """Whether a contact's session ran over ``ip`` (or, for IPv6, its /64) recently: the listener lets such
        connections past the handshake buckets of networks and of everyone, so a flood from elsewhere cannot lock
        contacts out."""
        return network_of(ip) in self._contact_hosts

    def _give_back_inbox(self, session: _Session, size: int, stranger_size: int) -> None:
        """Return ``size`` bytes of ``session``'s inbox charge, ``stranger_size`` of them from the strangers' share."""
        session.inbox_bytes -= size
        self._inbox_budget.give_back(size)
        if stranger_size:
            session.stranger_inbox_bytes -= stranger_size
            self._stranger_budget.give_back(stranger_size)

    async def _apply_acks(self, session: _Session, ids: list[bytes]) -> None:
        # Only ids written on this session and not yet acknowledged reach the store: the peer acknowledges what it
        # received on this session, and anything else (a repeat, an id it made up) would cost the writer thread a
        # lookup each, 4,000 of them per 64 KiB frame of made-up acks.
        written = session.written
        known = [mid for mid in ids if mid in written]
        if len(known) != len(ids):
            self._dropped["chat_ack_unknown"] += len(ids) - len(known)
            session.unknown_acks += len(ids) - len(known)
            if session.unknown_acks > _MAX_UNKNOWN_ACKS:  # contacts are not paced: a flood of these ends the session
                raise SessionProtocolError("ack", f"more than {_MAX_UNKNOWN_ACKS} ids never written on this session")
            ids = known
            if not ids:
                return
        now = self._now()
        raw = session.peer.to_bytes()
        # Not synced (it survives kill -9, maybe not a power cut): losing a delivered mark only means the message
        # is sent again and the receiver, which has it, acknowledges it again without storing it twice.
        delivered = await self._db.write(
            lambda c: [
                mid
                for start in range(0, len(ids), MAX_BATCH_ITEMS)
                for mid in repo.mark_delivered_ids(c, ids[start : start + MAX_BATCH_ITEMS], recipient=raw, now=now)
            ],
            durable=False,
        )
        for mid in ids:
            session.written.pop(mid, None)
        session.progress_at = trio.current_time()
        if delivered:
            self._publish_receipt(session.peer, delivered, "delivered")

    def _close_sessions(self, peer: PeerId) -> None:
        for session in list(self._sessions.get(peer, [])):
            self._close_session(session)

    # ------------------------------------------------------------------------------------------------- contacts

    def _now_a_contact(self, peer: PeerId, name: str | None) -> None:
        """Open sessions with ``peer`` are with a contact from now on (no stranger limits).  One that holds back
        requests over the limits is closed: the sender then resends them, in order, on a new session, at once rather
        than after :data:`_HELD_BACK_LINGER` or its resend time."""
        for session in list(self._sessions.get(peer, [])):
            session.relation = Relation.CONTACT
            session.contact_name = name
            session.promoted = True
            if session.held_back in _HELD_OVER_THE_LIMITS:
                session.close_reason = _PROMOTED  # instead of the hold's own reason
                self._close_session(session)

    def _contacts_changed(self) -> None:
        """Forget the cached name lookups (called around every change of the contacts table)."""
        self._contact_generation += 1
        self._contacts_by_name.clear()
        self._contact_peers = None

    async def contact_peers(self) -> frozenset[PeerId]:
        """The peer ids of the contacts (blocked ones excluded), read once and cached until the contacts change."""
        cached = self._contact_peers
        if cached is not None:
            return cached
        generation = self._contact_generation
        rows = await self._db.read(functools.partial(repo.list_contacts, state=ContactState.CONTACT))
        peers: set[PeerId] = set()
        for row in rows:
            with contextlib.suppress(InvalidPeerIdError):
                peers.add(self._peer_of(row.peer_id))
        result = frozenset(peers)
        if generation == self._contact_generation:
            self._contact_peers = result
        return result

    def is_contact_cached(self, peer: PeerId) -> bool | None:
        """Whether ``peer`` is a contact, from the cache of :meth:`contact_peers`; ``None`` if it is not loaded."""
        cached = self._contact_peers
        return None if cached is None else peer in cached

    async def _contact_by_name(self, name: str, *, cached: bool = False) -> Contact:
        """The contact ``name`` names: a contact's name, or else a (named) contact's peer id (a client that must
        keep reaching the same contact while the user may rename it, such as ``p2pmsg chat``, gives the id)."""
        if cached and (hit := self._contacts_by_name.get(name)) is not None:
            return hit
        generation = self._contact_generation
        problem = ""
        try:
            contact = await self._db.read(lambda c: repo.find_contact(c, name))
        except store_errors.StoreArgumentError as exc:
            contact, problem = None, f" ({exc.reason})"
        if contact is None:
            contact = await self._contact_by_peer_id(name)
        if contact is None:
            raise UnknownContactError(f"no contact named {name!r}{problem}")
        if generation == self._contact_generation and len(self._contacts_by_name) < _CONTACT_CACHE_SIZE:
            self._contacts_by_name[name] = contact
        return contact

    async def _contact_by_peer_id(self, text: str) -> Contact | None:
        """The named contact (blocked or not) whose peer id ``text`` is, if any."""
        if (raw := _peer_bytes(text)) is None:
            return None
        contact = await self._db.read(lambda c: repo.get_contact(c, raw))
        return contact if contact is not None and contact.name is not None else None

    async def _peer_by_name_or_id(self, text: str) -> tuple[bytes, Contact | None]:
        """The peer ``text`` names: a peer id is that peer, whatever any contact is called; otherwise a contact name."""
        if (raw := _peer_bytes(text)) is not None:
            return raw, await self._db.read(lambda c: repo.get_contact(c, raw))
        try:
            contact = await self._db.read(lambda c: repo.find_contact(c, text))
        except store_errors.StoreArgumentError:
            contact = None
        if contact is None:
            raise UnknownContactError(f"no contact named {text!r}, and it is not a peer id")
        return contact.peer_id, contact

    async def add_contact(self, target: str, name: str) -> dict[str, Any]:
        """Add the peer of an invite link (or bare peer id) as contact ``name``; accepts its pending request.  A peer
        blocked without a name (a stranger blocked, or a blocked contact removed) becomes a contact, no longer
        blocked: the reply then says ``unblocked: true``."""
        _check_new_name(name)
        invite = parse_target(target)
        peer = invite.peer_id
        if peer == self.identity.peer_id:
            raise BadRequestError("that invite is your own")
        raw = peer.to_bytes()
        hints = msgpack.packb([str(a) for a in invite.addrs], use_bin_type=True) if invite.addrs else None
        now = self._now()

        def txn(conn: sqlite3.Connection) -> tuple[Contact, bool]:
            existing = repo.get_contact(conn, raw)
            if existing is not None and existing.name == name and existing.state is ContactState.CONTACT:
                contact = existing
            elif repo.get_request(conn, raw) is not None and (existing is None or existing.name is None):
                contact = repo.accept_request(conn, raw, name=name, now=now)
            else:
                contact = repo.add_contact(conn, peer_id=raw, name=name, now=now)
            if hints is not None:
                repo.set_setting(conn, _HINTS_PREFIX + raw.hex(), hints, now=now)
            return contact, existing is not None and existing.state is ContactState.BLOCKED

        try:
            with _user_errors():
                contact, unblocked = await self._db.write(txn)
        finally:
            self._contacts_changed()
        self._now_a_contact(peer, contact.name)
        with self._store_failure_logged(f"flushing the messages to {peer}"):  # the contact itself is stored
            await self._expedite(peer)
        return {"peer_id": str(peer), "name": contact.name} | ({"unblocked": True} if unblocked else {})

    async def list_contacts(self) -> list[dict[str, Any]]:
        """Every contact and blocked peer."""
        contacts = await self._db.read(lambda c: repo.list_contacts(c))
        return [
            {"peer_id": _peer_text(c.peer_id), "name": c.name, "state": c.state.value, "added": c.added_at}
            for c in contacts
        ]

    async def rename_contact(self, name: str, new_name: str) -> dict[str, Any]:
        """Rename a contact."""
        _check_new_name(new_name)
        contact = await self._contact_by_name(name)
        now = self._now()

        def txn(conn: sqlite3.Connection) -> Contact:
            renamed = repo.rename_contact(conn, contact.peer_id, new_name, now=now)
            repo.delete_setting(conn, _AUTO_PREFIX + contact.peer_id.hex())  # the user vouches for it
            return renamed

        try:
            with _user_errors():
                renamed = await self._db.write(txn)
        finally:
            self._contacts_changed()
        if renamed.state is ContactState.CONTACT:
            self._now_a_contact(self._peer_of(contact.peer_id), renamed.name)
        return {}

    async def remove_contact(self, name: str) -> dict[str, Any]:
        """Forget a contact: its history stays, and so do the messages queued to it (they go when it is reachable).
        A blocked contact stays blocked, without its name.  The reply says both: ``{peer_id, blocked, queued}``.
        Its open sessions end: a new one meets the limits for strangers (pace, idle time, slots)."""
        contact = await self._contact_by_name(name)

        def txn(conn: sqlite3.Connection) -> tuple[bool, int]:
            repo.remove_contact(conn, contact.peer_id)
            repo.delete_setting(conn, _AUTO_PREFIX + contact.peer_id.hex())
            return repo.is_blocked(conn, contact.peer_id), repo.outbox_depth(conn, recipient=contact.peer_id)

        try:
            blocked, queued = await self._db.write(txn)
        finally:
            self._contacts_changed()
        peer = self._peer_of(contact.peer_id)
        for session in list(self._sessions.get(peer, [])):
            self._close_session(session, "no longer a contact: a new session meets the limits for strangers")
        return {"peer_id": self._text(peer), "blocked": blocked, "queued": queued}

    async def block(self, name_or_peer: str) -> dict[str, Any]:
        """Block a contact or any peer id: its channels are closed and refused, its messages never stored."""
        raw, _ = await self._peer_by_name_or_id(name_or_peer)
        if raw == self._own:
            raise BadRequestError("you cannot block yourself")
        now = self._now()

        def txn(conn: sqlite3.Connection) -> None:
            repo.block_peer(conn, raw, now=now)
            if repo.get_setting(conn, _AUTO_PREFIX + raw.hex()) is not None:
                # Never vouched for: blocked as the stranger it is (no name), so unblocking does not vouch for it.
                repo.remove_contact(conn, raw)
                repo.delete_setting(conn, _AUTO_PREFIX + raw.hex())

        try:
            await self._db.write(txn)
        finally:
            self._contacts_changed()
        self._close_sessions(PeerId.from_bytes(raw))
        return {}

    async def unblock(self, name_or_peer: str) -> dict[str, Any]:
        """Unblock a peer (a named one becomes a contact again)."""
        raw, contact = await self._peer_by_name_or_id(name_or_peer)
        if contact is None:
            raise UnknownContactError(f"no contact or blocked peer {name_or_peer!r}")
        if contact.state is not ContactState.BLOCKED:
            raise BadRequestError(f"{name_or_peer!r} is not blocked (nothing to unblock)")
        now = self._now()
        try:
            await self._db.write(lambda c: repo.unblock_peer(c, raw, now=now))
        finally:
            self._contacts_changed()
        with self._store_failure_logged(f"flushing the messages to {name_or_peer}"):  # the unblock is stored
            await self._expedite(PeerId.from_bytes(raw))
        return {}

    # ------------------------------------------------------------------------------------------------- messages

    async def send(self, name: str, text: str) -> dict[str, Any]:
        """Queue ``text`` to contact ``name``; returns ``{id, status: "queued"}`` once it is durably stored."""
        (message_id,) = await self._send_texts(name, [text], "text")
        return {"id": message_id, "status": "queued"}

    async def send_many(self, name: str, texts: Sequence[str]) -> dict[str, Any]:
        """Queue several texts to contact ``name`` in this order, in one transaction (all or none); returns
        ``{ids, status: "queued"}`` once they are durably stored.  The throughput path for a single client."""
        if not isinstance(texts, list | tuple) or not 1 <= len(texts) <= MAX_SEND_MANY:
            raise BadRequestError(f"texts: 1 to {MAX_SEND_MANY} texts")
        ids = await self._send_texts(name, texts, "texts")
        return {"ids": ids, "status": "queued"}

    async def _send_texts(self, name: str, texts: Sequence[str], field: str) -> list[str]:
        contact = await self._contact_by_name(name, cached=True)
        if contact.state is ContactState.BLOCKED:
            raise BadRequestError(f"{name!r} is blocked; unblock it to send")
        for i, text in enumerate(texts):
            if type(text) is str and text.isascii() and 0 < len(text) <= MAX_TEXT_BYTES:
                continue  # ASCII: one byte of UTF-8 per character
            where = field if field == "text" else f"{field}[{i}]"
            if not isinstance(text, str) or not text:
                raise BadRequestError(f"{where}: must not be empty")
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise BadRequestError(f"{where}: not valid UTF-8") from None
            if size > MAX_TEXT_BYTES:
                raise BadRequestError(f"{where}: {size} bytes of UTF-8, the limit is {MAX_TEXT_BYTES}")
        peer = self._peer_of(contact.peer_id)
        if contact.peer_id not in self._floors_read:
            await self._read_floor(contact.peer_id)
        now = self._now()
        ts = self._stamp(contact.peer_id, now)
        items = [
            _Queued(peer, contact, mid, raw, text, now, ts)
            for (mid, raw), text in zip(self._sealer.seal_many(peer, texts, ts=ts), texts, strict=True)
        ]
        await self._enqueue(items)
        return [q.mid.hex() for q in items]

    def _stamp(self, peer: bytes, now: int) -> int:
        """The timestamp of a message we send to ``peer`` now: our clock, or, when that is earlier, the conversation's
        floor, so that a reply sorts after the message it answers on both sides even when our clock is behind the
        peer's (a hybrid logical clock, protocol section 6.4).  Own messages never go back in time either (a clock
        stepped back), by up to :data:`_CLOCK_ALLOWANCE_MS`.  Not one more than our own last: a burst of sends keeps
        our clock's time."""
        # At most a little after our clock: a clock that ran ahead for a while (one message stamped a day ahead)
        # must not pin every later message of the conversation there, nor can a peer's stamps push ours further.
        ts = max(now, min(self._floors.get(peer, 0), now + _CLOCK_ALLOWANCE_MS + 1))
        self._floors[peer] = ts
        return min(ts, MAX_TIMESTAMP)

    def _raise_floor(self, peer: bytes, received: int) -> None:
        """A message from ``peer`` stamped ``received`` (as stored) was stored: our next one to it sorts after it."""
        if received + 1 > self._floors.get(peer, 0):
            if len(self._floors) >= _MAX_FLOORS and peer not in self._floors:
                # Forget what the store holds already: every value here was committed before it was recorded.
                self._floors = {p: v for p, v in self._floors.items() if p in self._floors_read}
                if len(self._floors) >= _MAX_FLOORS:
                    self._floors.clear()
                    self._floors_read.clear()
            self._floors[peer] = received + 1

    async def _read_floor(self, peer: bytes) -> None:
        """Merge the store's floor of the conversation with ``peer`` (read once per run and peer)."""
        stored = await self._db.read(lambda c: repo.conversation_floor(c, peer))
        self._floors[peer] = max(self._floors.get(peer, 0), stored)
        self._floors_read.add(peer)

    async def _enqueue(self, mine: list[_Queued]) -> None:
        """Store ``item`` durably, together with every other ``send`` that arrives while the previous enqueue
        transaction commits: one ``repo.enqueue_rows`` and one sync per round, whatever the number of callers.

        The first caller of a round (its *leader*) waits for the previous round, then writes the whole round and
        hands it over in send order; the others wait for it.  Cancellation keeps ``db.write``'s contract: a caller
        cancelled before its round started is withdrawn (nothing written); once the round started, the call returns
        normally after the commit (the leader is shielded throughout, as its round carries the others' messages).
        """
        batch = self._enqueue_open
        if batch is not None and len(batch.items) + len(mine) <= MAX_BATCH_ITEMS:
            batch.items.extend(mine)
            try:
                await batch.done.wait()
            except trio.Cancelled:
                if not batch.closed:
                    withdrawn = {id(q) for q in mine}
                    batch.items[:] = [q for q in batch.items if id(q) not in withdrawn]
                    raise
                with trio.CancelScope(shield=True):
                    await batch.done.wait()
            if batch.error is not None:
                raise batch.error
            return
        batch = self._enqueue_open = _EnqueueRound(items=list(mine))
        with trio.CancelScope(shield=True):
            async with self._enqueue_lock:
                if self._enqueue_open is batch:
                    self._enqueue_open = None
                batch.closed = True
                items = batch.items
                now = max(self._now(), items[-1].now)
                retry_at = min(now + self.config.resend_after_ms, MAX_TIMESTAMP)
                ready: dict[PeerId, bool] = {}
                own = self._own
                rows: list[repo.OutgoingRow] = []
                for q in items:
                    if (ahead := ready.get(q.peer)) is None:
                        session = self._best_session(q.peer)
                        ahead = ready[q.peer] = session is not None and session.in_order
                    q.ahead = ahead
                    rows.append((q.mid, q.contact.peer_id, own, q.text, q.ts, retry_at if ahead else None))
                early = self._hand_over_early(items)
                try:
                    await self._db.write(functools.partial(repo.enqueue_rows, rows=rows, now=now))
                except BaseException as exc:
                    written = self._withdraw_early(early)
                    if isinstance(exc, store_errors.StoreError):
                        log.warning(
                            "chat: %d message(s) not queued (%d already written to a session): %s",
                            len(items),
                            written,
                            exc,
                        )
                    if written and isinstance(exc, store_errors.StoreError):
                        # Not stored, yet maybe delivered: say so, or a retry shows the recipient a second copy.
                        failure = store_errors.StoreWriteError(
                            f"{exc}; {written} of {len(items)} message(s) of this send had already been written"
                            " to the recipient's session and may still arrive"
                        )
                        batch.error = failure
                        raise failure from exc
                    batch.error = exc
                    raise
                finally:
                    batch.done.set()
            self.messages_stored_at = now  # from before the write, as in _store_received
            stranded = self._after_enqueue(items)
            if stranded:  # the session went away during the commit: make them due for the outbox worker
                # After the commit the send has succeeded: this write failing only delays them (they fall due at
                # their resend time), and an error here would make the user send them again.
                with self._store_failure_logged("making new messages due for the outbox"):
                    await self._db.write(lambda c: [repo.expedite(c, p.to_bytes(), now=now) for p in stranded])
                self._poke()

    def _hand_over_early(self, items: list[_Queued]) -> list[_Queued]:
        """Hand the round's entries whose session is ready to it *before* their enqueue transaction commits, so the
        network and the recipient's commit overlap our own (about one sync less of latency); return them.

        Safe because the store's writer is FIFO: every write caused by the wire (a ``delivered`` mark, a reschedule
        when the session dies) is submitted after the enqueue and commits after it; receipts for them are held
        back until the commit (:meth:`_publish_receipt`); the caller is still answered only after the sync.  If
        the transaction fails the caller gets the error, and an envelope already written may still reach the
        recipient (who then has a message this node did not keep)."""
        early: list[_Queued] = []
        limit = self.config.max_session_queue
        for q in items:
            if not q.ahead:
                continue
            session = self._best_session(q.peer)
            if session is None or not session.in_order or len(session.pending) >= limit:
                continue  # after the commit: stranded, made due for the outbox worker
            mid = q.mid
            self._hand_over(session, mid, q.raw)
            self._premarked.add(mid)
            self._uncommitted.add(mid)
            q.early = True
            early.append(q)
        return early

    def _withdraw_early(self, early: list[_Queued]) -> int:
        """The enqueue of ``early`` failed: take back what its sessions have not written yet, forget the rest;
        return how many were already written (they may still reach their recipient)."""
        if not early:
            return 0
        ids = {q.mid for q in early}
        written = 0
        for q in early:
            taken_back = False
            for session in self._sessions.get(q.peer, ()):
                if session.pending.pop(q.mid, None) is not None:
                    session.held.discard(q.mid)
                    taken_back = True
            written += not taken_back
        self._premarked.difference_update(ids)
        self._inflight.difference_update(ids)
        self._uncommitted.difference_update(ids)
        self._deferred_receipts = [r for r in self._deferred_receipts if r[1] not in ids]
        return written

    def _release_receipts(self) -> None:
        """Publish the receipts held back for ids that are committed now, in arrival order."""
        held: list[tuple[PeerId, bytes, str]] = []
        run: list[bytes] = []
        key: tuple[PeerId, str] | None = None
        for peer, mid, status in self._deferred_receipts:
            if mid in self._uncommitted:
                held.append((peer, mid, status))
                continue
            if key != (peer, status):
                if run and key is not None:
                    self._publish_receipt(key[0], run, key[1])
                key, run = (peer, status), []
            run.append(mid)
        if run and key is not None:
            self._publish_receipt(key[0], run, key[1])
        self._deferred_receipts = held

    def _after_enqueue(self, items: list[_Queued]) -> set[PeerId]:
        """Hand a committed round to the sessions (in send order) and publish its ``message`` events, then the
        receipts held back for it; return the peers of entries enqueued with their resend time ahead that no
        session could take after all."""
        poke = False
        stranded: set[PeerId] = set()
        limit = self.config.max_session_queue
        own = self._text(self.identity.peer_id)
        publish = self._listened()
        for q in items:
            if q.early:
                self._uncommitted.discard(q.mid)  # on the wire already, or in its session's queue
            elif (
                (session := self._best_session(q.peer)) is not None
                and session.in_order
                and len(session.pending) < limit
            ):
                self._hand_over(session, q.mid, q.raw)  # the fast path: no outbox round needed
                if q.ahead:
                    self._premarked.add(q.mid)
            elif q.ahead:
                # No room on the session: this entry waits for the outbox worker (after the expedite below), so
                # nothing queued later may bypass the worker until one of its rounds has handed the backlog over.
                for other in self._sessions.get(q.peer, ()):
                    other.in_order = False
                stranded.add(q.peer)
                self._outboxed += 1
            else:
                poke = True
                self._outboxed += 1
            if publish:
                fields = ev.message_fields(q.mid.hex(), self._text(q.peer), q.contact.name, own, q.text, q.ts, "out")
                self._publish_fields("message", fields)
        if self._deferred_receipts:
            self._release_receipts()
        if poke:
            self._poke()
        return stranded

    async def history(
        self, name: str, limit: int | None = None, before: int | None = None, before_seq: int | None = None
    ) -> list[dict[str, Any]]:
        """The conversation with ``name``, oldest first, in ``(ts, seq)`` order: the newest ``limit`` messages (default
        50, at most :data:`MAX_QUERY_LIMIT`, and only as many as :data:`MAX_REPLY_TEXT` holds); with ``before``,
        those sent before ``before`` ms; with ``before`` and ``before_seq`` too, those strictly before the position
        ``(before, before_seq)``: pass the first row's ``ts`` and ``seq`` to page back (messages sent in one
        ``send_many`` share one ``ts``)."""
        if before_seq is not None and before is None:
            raise BadRequestError("before_seq: only together with before (the ts of the same row)")
        conversation = await self._conversation(name)
        count = max(1, min(limit if limit is not None else 50, MAX_QUERY_LIMIT))
        cursor = None
        if before is not None:
            seq = min(max(before_seq, 0), MAX_TIMESTAMP) if before_seq is not None else 0
            cursor = HistoryCursor(sent_at=min(max(before, 0), MAX_TIMESTAMP), seq=seq)
        rows, _ = await self._db.read(lambda c: _newest_for_reply(c, conversation, count, cursor))
        return [_message_dict(m) for m in rows]

    async def _conversation(self, name: str) -> bytes:
        """The peer whose conversation ``name`` names: a contact (by name or peer id), or else the peer id of a
        stranger with a pending message request (read before it is accepted or blocked), of a peer blocked without a
        name (`requests block`), or of any peer whose conversation holds messages (a removed contact's history)."""
        try:
            return (await self._contact_by_name(name)).peer_id
        except UnknownContactError:
            raw = _peer_bytes(name)
            if raw is None or not await self._db.read(
                lambda c: (
                    repo.get_request(c, raw) is not None
                    or repo.get_contact(c, raw) is not None
                    or repo.has_messages(c, raw)
                )
            ):
                raise
            return raw

    async def inbox(self) -> list[dict[str, Any]]:
        """One row per conversation with a contact, most recent first."""

        def query(conn: sqlite3.Connection) -> list[tuple[Contact, StoredMessage]]:
            out = []
            for contact in repo.list_contacts(conn, state=ContactState.CONTACT):
                last = repo.history(conn, contact.peer_id, limit=1)
                if last:
                    out.append((contact, last[-1]))
            return out

        rows = await self._db.read(query)
        rows.sort(key=lambda r: (r[1].sent_at, r[1].seq), reverse=True)
        return [
            {
                "name": c.name,
                "peer_id": _peer_text(c.peer_id),
                "last_text": m.text,
                "last_ts": m.sent_at,
                "last_direction": m.direction.value,
            }
            for c, m in rows
        ]

    async def list_requests(self) -> list[dict[str, Any]]:
        """Pending message requests from strangers, most recent first."""

        def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            out = []
            for request in repo.list_requests(conn, limit=MAX_QUERY_LIMIT):
                last = repo.history(conn, request.peer_id, limit=1)
                out.append(
                    {
                        "peer_id": _peer_text(request.peer_id),
                        "count": request.message_count,
                        "last_text": last[-1].text if last else "",
                        "last_ts": last[-1].sent_at if last else request.last_at,
                    }
                )
            return out

        return await self._db.read(query)

    def _parse_peer(self, text: str) -> PeerId:
        try:
            return PeerId.from_string(text.strip())
        except InvalidPeerIdError:
            raise BadRequestError(
                f"{text.strip()!r} is not a peer id (cut short or mistyped? copy it whole from `p2pmsg requests`)"
            ) from None

    async def accept_request(self, peer_id: str, name: str) -> dict[str, Any]:
        """Accept a stranger's request: it becomes contact ``name`` and its messages move to the inbox.  Reply
        ``{peer_id, name}``: the name it has (a contact already, it keeps its name, unless it was auto-added: then
        accepting names it and vouches for it, as a rename does)."""
        _check_new_name(name)
        peer = self._parse_peer(peer_id)
        now = self._now()
        raw = peer.to_bytes()

        def txn(conn: sqlite3.Connection) -> Contact:
            contact = repo.accept_request(conn, raw, name=name, now=now)
            if repo.get_setting(conn, _AUTO_PREFIX + raw.hex()) is not None:
                repo.delete_setting(conn, _AUTO_PREFIX + raw.hex())
                if contact.name != name:
                    contact = repo.rename_contact(conn, raw, name, now=now)
            return contact

        try:
            with _user_errors():
                try:
                    contact = await self._db.write(txn)
                except store_errors.UnknownRequestError:
                    raise UnknownContactError(f"no pending message request from {peer}") from None
                except store_errors.PeerBlockedError:
                    raise BadRequestError(f"{peer} is blocked: unblock it before accepting its request") from None
        finally:
            self._contacts_changed()
        self._now_a_contact(peer, contact.name)
        return {"peer_id": str(peer), "name": contact.name}

    async def block_request(self, peer_id: str) -> dict[str, Any]:
        """Refuse a stranger's request: its messages are deleted and the peer blocked."""
        peer = self._parse_peer(peer_id)
        if peer == self.identity.peer_id:
            raise BadRequestError("you cannot block yourself")
        now = self._now()
        try:
            await self._db.write(lambda c: repo.reject_request(c, peer.to_bytes(), block=True, now=now))
        finally:
            self._contacts_changed()
        self._close_sessions(peer)
        return {}

    async def export(self, name: str) -> dict[str, Any]:
        """The contact and its conversation, oldest first: all of it if it fits in one reply (at most
        :data:`MAX_QUERY_LIMIT` messages and :data:`MAX_REPLY_TEXT` bytes of text; ``more`` false), else the newest
        messages that do (``more`` true: page back with :meth:`history` from the first one)."""
        contact = await self._contact_by_name(name)
        messages, more = await self._db.read(lambda c: _newest_for_reply(c, contact.peer_id, MAX_QUERY_LIMIT, None))
        return {
            "contact": {
                "peer_id": _peer_text(contact.peer_id),
                "name": contact.name,
                "state": contact.state.value,
                "added": contact.added_at,
                "verified": contact.verified,
            },
            "messages": [_message_dict(m) for m in messages],
            "more": more,
        }

    # ------------------------------------------------------------------------------------------------- node info

    def invite(self, addrs: Iterable[Multiaddr]) -> str:
        """Our invite link with ``addrs`` (our listening addresses) as hints."""
        return format_invite(self.identity.peer_id, list(addrs))

    async def peers(self) -> list[dict[str, Any]]:
        """The open chat sessions."""
        contacts = await self._db.read(lambda c: repo.list_contacts(c))
        names = {c.peer_id: c.name for c in contacts}
        out = []
        for peer, sessions in self._sessions.items():
            for s in sessions:
                if s.closed:
                    continue
                row: dict[str, Any] = {
                    "peer_id": str(peer),
                    "addr": s.addr,
                    "direction": s.direction,
                    "since": s.since,
                }
                name = names.get(peer.to_bytes())
                if name is not None:
                    row["name"] = name
                out.append(row)
        return out

    @property
    def connections(self) -> int:
        """Open chat sessions."""
        return sum(1 for sessions in self._sessions.values() for s in sessions if not s.closed)

    @property
    def dropped(self) -> dict[str, int]:
        """Counters of everything dropped, by reason."""
        return dict(self._dropped)

    async def status(self) -> dict[str, Any]:
        """The chat part of ``status``: ``connections``, ``outbox_depth``, ``requests`` (strangers with a pending
        message request) and ``dropped``."""
        depth, requests = await self._db.read(lambda c: (repo.outbox_depth(c), repo.count_requests(c)))
        return {"connections": self.connections, "outbox_depth": depth, "requests": requests, "dropped": self.dropped}

    def control_handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]:
        """Handlers of the chat methods of the control API (the node adds ``id``, ``status`` and ``subscribe``)."""
        return {
            "contacts.add": lambda p: self.add_contact(p["target"], p["name"]),
            "contacts.list": lambda p: self.list_contacts(),
            "contacts.rename": lambda p: self.rename_contact(p["name"], p["new_name"]),
            "contacts.remove": lambda p: self.remove_contact(p["name"]),
            "contacts.block": lambda p: self.block(p["name_or_peer"]),
            "contacts.unblock": lambda p: self.unblock(p["name_or_peer"]),
            "send": lambda p: self.send(p["name"], p["text"]),
            "send_many": lambda p: self.send_many(p["name"], p["texts"]),
            "history": lambda p: self.history(p["name"], p.get("limit"), p.get("before"), p.get("before_seq")),
            "inbox": lambda p: self.inbox(),
            "requests.list": lambda p: self.list_requests(),
            "requests.accept": lambda p: self.accept_request(p["peer_id"], p["name"]),
            "requests.block": lambda p: self.block_request(p["peer_id"]),
            "peers": lambda p: self.peers(),
            "export": lambda p: self.export(p["name"]),
        }


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the store's refusals of a user request into the chat errors the control API maps to codes."""
    try:
        yield
    except store_errors.NameTakenError as exc:
        raise NameTakenError(str(exc)) from None
    except (store_errors.UnknownContactError, store_errors.UnknownRequestError) as exc:
        raise UnknownContactError(str(exc)) from None
    except (store_errors.ContactExistsError, store_errors.PeerBlockedError, store_errors.StoreArgumentError) as exc:
        raise BadRequestError(str(exc)) from None


def _peer_bytes(text: str) -> bytes | None:
    """The peer id ``text`` spells (white space around it ignored), as bytes; ``None`` if it is not one."""
    try:
        return PeerId.from_string(text.strip()).to_bytes()
    except InvalidPeerIdError:
        return None


def _check_new_name(name: str) -> None:
    """Refuse a contact name that is itself a peer id: ``block``/``unblock`` take a name or a peer id, and such a name
    would stand for another peer than the one it spells (a peer id always means that peer)."""
    try:
        PeerId.from_string(name.strip())
    except InvalidPeerIdError:
        return
    raise BadRequestError("name: a contact name must not be a peer id (it would read as that peer's id)")


def _relation(contact: Contact | None) -> Relation:
    if contact is None:
        return Relation.STRANGER
    if contact.state is ContactState.BLOCKED:
        return Relation.BLOCKED
    return Relation.CONTACT if contact.name is not None else Relation.STRANGER


def _is_contact(conn: sqlite3.Connection, *, peer: bytes) -> bool:
    """Whether ``peer`` is a contact (not blocked)."""
    contact = repo.get_contact(conn, peer)
    return contact is not None and contact.state is ContactState.CONTACT


def _mark_seq(mark: bytes | None) -> int:
    """The ``messages.seq`` an auto-added mark holds (see :data:`_AUTO_PREFIX`); 0 for an empty or unreadable one."""
    try:
        seq = msgpack.unpackb(mark) if mark else 0
    except ValueError:  # msgpack's ExtraData, FormatError and StackError are ValueErrors
        return 0
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else 0


def _contact_and_mark(conn: sqlite3.Connection, raw: bytes) -> tuple[Contact | None, bool]:
    """The peer's contact row and whether it is an auto-added contact not yet vouched for."""
    contact = repo.get_contact(conn, raw)
    auto = contact is not None and repo.get_setting(conn, _AUTO_PREFIX + raw.hex()) is not None
    return contact, auto


def _add_stranger(conn: sqlite3.Connection, raw: bytes, base_name: str, now: int) -> Contact:
    """``accept_from = "anyone"``: add a stranger as a contact named by its peer id (suffixed if taken)."""
    for attempt in range(100):
        name = base_name if attempt == 0 else f"{base_name[:58]}-{attempt}"
        try:
            return repo.add_contact(conn, peer_id=raw, name=name, now=now)
        except store_errors.NameTakenError:
            continue
    raise store_errors.NameTakenError(f"no free name for {base_name}")


def _record_addrs(record: PeerRecord | None) -> list[Multiaddr]:
    if record is None:
        return []
    out = []
    for text in record.addrs:
        try:
            out.append(Multiaddr.parse(text).without_peer_id())
        except MultiaddrError:
            continue
    return out


def _channel_addr(channel: SecureChannel, candidates: list[Multiaddr]) -> str:
    """The address a dial reached: observed for TCP and WebSocket, else the only candidate, else unknown."""
    stream = channel.transport_stream
    if isinstance(stream, WebSocketStream):
        socket_stream = stream.socket_stream
        addr = remote_multiaddr(socket_stream, "ws") if socket_stream is not None else None
    else:
        addr = remote_multiaddr(stream, "tcp")
    if addr is not None:
        return str(addr)
    return str(candidates[0]) if len(candidates) == 1 else ""

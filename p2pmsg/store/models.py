"""Row types, enums, limits and the outbound message state machine of the store.

Theory of operation
-------------------
The repository functions (:mod:`p2pmsg.store.repo`) return the frozen dataclasses defined here, never raw SQLite
rows, and take plain Python values that are validated against the limits below before SQLite sees them (the schema
repeats the important limits as ``CHECK`` constraints, as a second line).

Conventions shared by every table:

* peer ids are the raw bytes of a libp2p peer id (``PeerId.to_bytes()``, 38 bytes for Ed25519); the store accepts
  1..64 bytes so that it does not depend on the key type;
* timestamps are integers, milliseconds since the Unix epoch (UTC), ``0 <= t < 2**63``; the caller passes ``now``
  explicitly so that tests are deterministic;
* message ids are exactly 16 bytes.

An outbound message moves through :class:`MessageStatus` as allowed by the one table
:data:`STATUS_TRANSITIONS`::

    queued --> sent --> delivered
       |   \\     |     ^   ^
       |    `----|----/   |        (a receipt may overtake the local "sent" mark)
       v         v        |
       `----> failed -----'        (a receipt for a message we gave up on still proves delivery)

``delivered`` and ``failed`` remove the outbox row (a failed message is not retried; the user sends it again as a
new message).  Since schema v3 ``delivered`` is usually not stored: a message whose stored status is ``queued`` or
``sent`` and that has no outbox row reads as ``delivered`` (see :mod:`p2pmsg.store.repo`).  Incoming messages are
always ``received``.  A transition that is not in the table is refused by the repository.
"""

from __future__ import annotations

import dataclasses
import enum
import unicodedata
from collections.abc import Mapping
from typing import Final

from p2pmsg.store.errors import StoreArgumentError

__all__ = [
    "DEFAULT_BACKOFF",
    "DHT_NODE_ID_SIZE",
    "MAX_BATCH_ITEMS",
    "MAX_DHT_NODES",
    "MAX_ENVELOPE_SIZE",
    "MAX_ERROR_CHARS",
    "MAX_HOST_CHARS",
    "MAX_NAME_CHARS",
    "MAX_PEER_ID_SIZE",
    "MAX_PEER_RECORD_SIZE",
    "MAX_QUERY_LIMIT",
    "MAX_SETTING_KEY_CHARS",
    "MAX_SETTING_VALUE_SIZE",
    "MAX_TEXT_BYTES",
    "MAX_TIMESTAMP",
    "MESSAGE_ID_SIZE",
    "STATUS_TRANSITIONS",
    "Backoff",
    "CachedPeerRecord",
    "Contact",
    "ContactState",
    "DhtNode",
    "Direction",
    "DueRound",
    "HistoryCursor",
    "IncomingMessage",
    "MessageRequest",
    "MessageStatus",
    "OutboxEntry",
    "OutgoingMessage",
    "StoredMessage",
    "can_transition",
    "name_key",
]

MESSAGE_ID_SIZE: Final = 16
"""Length of a message id in bytes."""
MAX_PEER_ID_SIZE: Final = 64
"""Largest peer id accepted (an Ed25519 libp2p peer id is 38 bytes)."""
MAX_TEXT_BYTES: Final = 65536
"""Largest message text, in bytes of UTF-8."""
MAX_ENVELOPE_SIZE: Final = 262144
"""Largest sealed envelope kept in the outbox, in bytes."""
MAX_NAME_CHARS: Final = 64
"""Longest contact name, in characters."""
MAX_SETTING_KEY_CHARS: Final = 128
"""Longest settings key, in characters."""
MAX_SETTING_VALUE_SIZE: Final = 65536
"""Largest settings value, in bytes."""
MAX_PEER_RECORD_SIZE: Final = 8192
"""Largest cached signed peer record, in bytes (the envelope limit of ``open_envelope``)."""
DHT_NODE_ID_SIZE: Final = 20
"""Length of a DHT node id (160-bit keyspace)."""
MAX_DHT_NODES: Final = 3200
"""Most routing-table entries persisted (k=20 contacts for each of the 160 buckets)."""
MAX_HOST_CHARS: Final = 255
"""Longest host (an IP address or DNS name) of a persisted DHT node."""
MAX_ERROR_CHARS: Final = 512
"""``last_error`` texts longer than this are truncated (not refused)."""
MAX_BATCH_ITEMS: Final = 10000
"""Most items accepted by one ``*_many`` repository call."""
MAX_QUERY_LIMIT: Final = 10000
"""Largest ``limit`` accepted by the listing functions."""
MAX_TIMESTAMP: Final = 2**63 - 1
"""Largest timestamp SQLite can hold (timestamps are signed 64-bit integers)."""


def name_key(name: str) -> str:
    """What two contact names must share to be the same name: Unicode's canonical caseless form (NFD, case-folded,
    then NFC), so "Jörg", "JÖRG" and a "Jörg" typed with a combining diaeresis all name one contact."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", name).casefold())


class ContactState(enum.Enum):
    """Whether a known peer is a contact or blocked."""

    CONTACT = "contact"
    BLOCKED = "blocked"


class Direction(enum.Enum):
    """Whether a message was received (``in``) or sent by this node (``out``)."""

    IN = "in"
    OUT = "out"


class MessageStatus(enum.Enum):
    """Delivery status of a message; ``received`` is the only status of an incoming message."""

    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    RECEIVED = "received"


STATUS_TRANSITIONS: Final[Mapping[MessageStatus, frozenset[MessageStatus]]] = {
    MessageStatus.QUEUED: frozenset({MessageStatus.SENT, MessageStatus.DELIVERED, MessageStatus.FAILED}),
    MessageStatus.SENT: frozenset({MessageStatus.DELIVERED, MessageStatus.FAILED}),
    MessageStatus.FAILED: frozenset({MessageStatus.DELIVERED}),
    MessageStatus.DELIVERED: frozenset(),
    MessageStatus.RECEIVED: frozenset(),
}
"""The one transition table of outbound message statuses: ``old -> {allowed new}``."""


def can_transition(old: MessageStatus, new: MessageStatus) -> bool:
    """Return whether :data:`STATUS_TRANSITIONS` allows a message to go from *old* to *new*."""
    return new in STATUS_TRANSITIONS[old]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Contact:
    """A row of ``contacts``: a named contact, or a blocked peer (``name`` is ``None`` for a blocked stranger)."""

    peer_id: bytes
    name: str | None
    state: ContactState
    verified: bool
    added_at: int
    updated_at: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, order=True)
class HistoryCursor:
    """A position in a conversation's history: messages sort by ``(sent_at, seq)``."""

    sent_at: int
    seq: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoredMessage:
    """A row of ``messages``."""

    seq: int
    """Local, strictly increasing sequence number (never reused), the tie-breaker of the history order."""
    message_id: bytes
    conversation: bytes
    """Peer id of the other side of the conversation."""
    direction: Direction
    sender: bytes
    text: str
    sent_at: int
    """The sender's timestamp (ms), as carried in the envelope."""
    stored_at: int
    """When this node stored the message (ms)."""
    status: MessageStatus
    """The derived status (schema v3): ``delivered`` for an outgoing message without an outbox row."""
    status_at: int
    """When the stored status last changed (ms); for a message delivered by deleting its outbox row, when it was
    queued or marked sent (the delivery time is not kept)."""
    is_request: bool
    """True while the message belongs to a message request from a stranger (kept out of the inbox)."""

    @property
    def cursor(self) -> HistoryCursor:
        """The history position of this message (pass it as ``before=`` to page back from it)."""
        return HistoryCursor(sent_at=self.sent_at, seq=self.seq)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OutgoingMessage:
    """One item of :func:`~p2pmsg.store.repo.enqueue_many` (the arguments of :func:`~p2pmsg.store.repo.enqueue`);
    :func:`~p2pmsg.store.repo.enqueue_rows` takes the same fields as a tuple."""

    message_id: bytes
    recipient: bytes
    sender: bytes
    text: str
    sent_at: int
    next_attempt_at: int | None = None
    """When the outbox row is first due; ``None``: at once (``now``).  A caller that hands the envelope to a live
    session itself sets its resend time here, so the write after sending (``mark_sent``) is not needed."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class IncomingMessage:
    """One item of :func:`~p2pmsg.store.repo.insert_incoming_many` (see :func:`~p2pmsg.store.repo.insert_incoming`);
    :func:`~p2pmsg.store.repo.insert_incoming_rows` takes the same fields as a tuple."""

    message_id: bytes
    sender: bytes
    text: str
    sent_at: int
    is_request: bool = False
    conversation: bytes | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OutboxEntry:
    """A row of ``outbox`` with its message's text and timestamp: a message waiting for its delivery receipt.  The
    sender seals ``text`` (with ``message_id`` and ``sent_at``) into a fresh envelope each time it sends it."""

    message_id: bytes
    seq: int
    recipient: bytes
    text: str
    sent_at: int
    attempts: int
    next_attempt_at: int
    last_error: str | None
    enqueued_at: int


@dataclasses.dataclass(frozen=True, slots=True)
class DueRound:
    """What :func:`p2pmsg.store.repo.due_round` read: ``entries``, by recipient in send order; ``cut``, the
    recipients with more due entries than their share; ``more``, whether recipients not in ``entries`` may have due
    entries too."""

    entries: list[OutboxEntry]
    cut: frozenset[bytes]
    more: bool


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MessageRequest:
    """A row of ``message_requests``: a stranger who wrote to us, with their pending messages counted."""

    peer_id: bytes
    first_at: int
    last_at: int
    message_count: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CachedPeerRecord:
    """A row of ``peer_records``: a signed peer record as fetched from the DHT (verified before it was stored)."""

    peer_id: bytes
    record: bytes
    seq: int
    expires_at: int
    fetched_at: int

    def is_expired(self, now: int) -> bool:
        """Return whether the record has expired at *now* (ms)."""
        return now >= self.expires_at


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DhtNode:
    """A row of ``dht_nodes``: a routing-table contact kept across restarts."""

    node_id: bytes
    host: str
    port: int
    last_seen: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Exponential backoff with jitter for outbox retries.

    The delay before attempt ``n + 1`` (after ``n`` failed attempts, ``n >= 1``) is
    ``min(cap_ms, base_ms * factor ** (n - 1))``, scaled by a uniformly random factor in ``[1 - jitter, 1]``.
    """

    base_ms: int = 1000
    factor: float = 2.0
    cap_ms: int = 2 * 60 * 1000
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base_ms < 1 or self.cap_ms < self.base_ms:
            raise StoreArgumentError("Backoff.base_ms", "need 1 <= base_ms <= cap_ms")
        if not self.factor >= 1.0:
            raise StoreArgumentError("Backoff.factor", "must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise StoreArgumentError("Backoff.jitter", "must be within [0, 1]")

    def delay_ms(self, attempts: int, unit_random: float) -> int:
        """The delay after *attempts* failed attempts; *unit_random* is a uniform random number in ``[0, 1)``."""
        exponent = max(0, attempts - 1)
        # Cap the exponent so that factor ** exponent cannot overflow a float.
        raw = float(self.cap_ms) if exponent > 64 else min(float(self.cap_ms), self.base_ms * self.factor**exponent)
        scaled = raw * (1.0 - self.jitter * unit_random)
        return max(1, int(scaled))


DEFAULT_BACKOFF: Final = Backoff()
"""1 s, 2 s, 4 s, ... up to 2 min, each with up to 50% jitter subtracted.

The cap bounds how long messages wait after a contact is back when nothing tells us so (it was asleep, or its network
was down, and it kept its address and record): with 15 min, a QA pass saw them wait that long; each retry costs a
TCP connect and a DHT lookup."""

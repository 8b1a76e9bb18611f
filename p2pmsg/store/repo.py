"""Typed repository functions over the schema of :mod:`p2pmsg.store.migrations`.

Theory of operation
-------------------
Every function takes an ``sqlite3.Connection`` as its first argument and is meant to run inside
``Database.write``/``Database.read``, which supply the connection and the transaction::

    msg = await db.write(lambda c: repo.enqueue(c, message_id=mid, recipient=bob, sender=me, text="hi",
                                               sent_at=now, now=now))
    page = await db.read(lambda c: repo.history(c, bob, limit=50))

Several calls in one ``fn`` share one transaction (they all commit or none does); that is how the chat layer makes a
composite step atomic, e.g. "message + outbox row" (:func:`enqueue` does that itself) or "store an incoming message
only if the stranger has fewer than N pending".  Functions that write must run under ``Database.write``; the read
connections are read-only.

Arguments are checked before SQLite sees them (:class:`StoreArgumentError` names the field); peer ids are raw bytes,
timestamps integer milliseconds passed in by the caller (see :mod:`p2pmsg.store.models`).  Results are frozen
dataclasses.  Outbound status changes follow :data:`~p2pmsg.store.models.STATUS_TRANSITIONS`; a change the table
does not allow is a no-op that returns ``False`` (receipts may be duplicated, reordered or forged, so a refused change
is not an error).

Derived delivery (schema v3): delivering a message deletes its outbox row and leaves its ``messages`` row alone, so
an outgoing row whose stored ``status`` is ``queued`` or ``sent`` and that has no outbox row *is* ``delivered``.
Every function here that returns or checks a status uses that derived value (:data:`_STATUS`, a ``LEFT JOIN
outbox`` on ``seq``); ``failed`` (and a ``delivered`` written by schema v2 or by a receipt for a failed message) is
stored as such.  For a derived-delivered message ``status_at`` stays the time of its last stored status (when it was
queued or marked sent): the delivery time is not kept.

Exactly once in the store: ``messages.message_id`` is unique.  :func:`insert_incoming` returns ``False`` for an id
already stored (the sender retried because our receipt was lost: acknowledge it again, do not show it twice).
"""

from __future__ import annotations

import random
import sqlite3
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Final

from p2pmsg.store.errors import (
    ContactExistsError,
    DuplicateMessageError,
    NameTakenError,
    PeerBlockedError,
    StoreArgumentError,
    UnknownContactError,
    UnknownRequestError,
)
from p2pmsg.store.models import (
    DEFAULT_BACKOFF,
    DHT_NODE_ID_SIZE,
    MAX_BATCH_ITEMS,
    MAX_DHT_NODES,
    MAX_ERROR_CHARS,
    MAX_HOST_CHARS,
    MAX_NAME_CHARS,
    MAX_PEER_ID_SIZE,
    MAX_PEER_RECORD_SIZE,
    MAX_QUERY_LIMIT,
    MAX_SETTING_KEY_CHARS,
    MAX_SETTING_VALUE_SIZE,
    MAX_TEXT_BYTES,
    MAX_TIMESTAMP,
    MESSAGE_ID_SIZE,
    STATUS_TRANSITIONS,
    Backoff,
    CachedPeerRecord,
    Contact,
    ContactState,
    DhtNode,
    Direction,
    DueRound,
    HistoryCursor,
    IncomingMessage,
    MessageRequest,
    MessageStatus,
    OutboxEntry,
    OutgoingMessage,
    StoredMessage,
    can_transition,
    name_key,
)

__all__ = [
    "IncomingRow",
    "OutgoingRow",
    "accept_request",
    "add_contact",
    "block_peer",
    "conversation_floor",
    "count_requests",
    "delete_peer_record",
    "delete_setting",
    "due_for",
    "due_round",
    "enqueue",
    "enqueue_many",
    "enqueue_rows",
    "expedite",
    "expedite_ids",
    "expedite_unattempted",
    "find_contact",
    "get_contact",
    "get_message",
    "get_outbox_entry",
    "get_peer_record",
    "get_request",
    "get_setting",
    "has_messages",
    "history",
    "inbox",
    "incoming_after",
    "insert_incoming",
    "insert_incoming_many",
    "insert_incoming_rows",
    "is_blocked",
    "last_message_seq",
    "list_contacts",
    "list_requests",
    "load_dht_nodes",
    "mark_delivered",
    "mark_delivered_ids",
    "mark_delivered_many",
    "mark_failed",
    "mark_sent",
    "mark_sent_many",
    "next_attempt_at",
    "outbox_depth",
    "postpone_ids",
    "prune_peer_records",
    "put_peer_record",
    "reject_request",
    "remove_contact",
    "rename_contact",
    "reschedule",
    "reschedule_recipient",
    "save_dht_nodes",
    "set_setting",
    "set_verified",
    "settle_request",
    "unblock_peer",
]

# --------------------------------------------------------------------------------------------------- validation


def _bytes(field: str, value: object, *, min_size: int, max_size: int) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise StoreArgumentError(field, f"expected bytes, got {type(value).__name__}")
    data = bytes(value)
    if not min_size <= len(data) <= max_size:
        expected = str(min_size) if min_size == max_size else f"{min_size}..{max_size}"
        raise StoreArgumentError(field, f"must be {expected} bytes long, got {len(data)}")
    return data


def _peer_id(field: str, value: object) -> bytes:
    return _bytes(field, value, min_size=1, max_size=MAX_PEER_ID_SIZE)


def _message_id(value: object) -> bytes:
    return _bytes("message_id", value, min_size=MESSAGE_ID_SIZE, max_size=MESSAGE_ID_SIZE)


def _int(field: str, value: object, *, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise StoreArgumentError(field, f"expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise StoreArgumentError(field, f"must be within {low}..{high}, got {value}")
    return value


def _timestamp(field: str, value: object) -> int:
    return _int(field, value, low=0, high=MAX_TIMESTAMP)


def _limit(value: object, *, high: int = MAX_QUERY_LIMIT) -> int:
    return _int("limit", value, low=1, high=high)


def _utf8(field: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise StoreArgumentError(field, f"expected str, got {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StoreArgumentError(field, f"not encodable as UTF-8 ({exc.reason} at index {exc.start})") from None


def _text(value: object) -> str:
    size = len(_utf8("text", value))
    if size > MAX_TEXT_BYTES:
        raise StoreArgumentError("text", f"is {size} bytes of UTF-8, the limit is {MAX_TEXT_BYTES}")
    assert isinstance(value, str)
    return value


_SHORT_TEXT_CHARS: Final = MAX_TEXT_BYTES // 4
"""A ``str`` of at most this many code points is at most :data:`MAX_TEXT_BYTES` bytes of UTF-8 (4 bytes per code
point at most), so the batch functions skip encoding it; the one thing the encoding would still catch, a lone
surrogate, SQLite's binding refuses (``UnicodeEncodeError``), which :func:`_unbindable_text` turns into the store's
error."""


def _unbindable_text(texts: Iterable[object]) -> StoreArgumentError:
    """The :class:`StoreArgumentError` of the first text that :func:`_text` refuses (SQLite's binding refused one)."""
    for text in texts:
        try:
            _text(text)
        except StoreArgumentError as exc:
            return exc
    return StoreArgumentError("text", "not encodable as UTF-8")  # pragma: no cover - the binding refused one


def _name(value: object) -> str:
    _utf8("name", value)
    assert isinstance(value, str)
    if not 1 <= len(value) <= MAX_NAME_CHARS:
        raise StoreArgumentError("name", f"must be 1..{MAX_NAME_CHARS} characters, got {len(value)}")
    if value != value.strip():
        raise StoreArgumentError("name", "must not start or end with white space")
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            raise StoreArgumentError("name", f"must not contain control or format characters (found {char!r})")
    return unicodedata.normalize("NFC", value)  # one spelling of "é" (precomposed), whichever was typed


def _error_text(value: object) -> str:
    if not isinstance(value, str):
        raise StoreArgumentError("error", f"expected str, got {type(value).__name__}")
    text = value if len(value) <= MAX_ERROR_CHARS else value[: MAX_ERROR_CHARS - 1] + "…"
    # Lone surrogates (e.g. from a decoded remote string) cannot be stored; replace them rather than fail.
    return text.encode("utf-8", "replace").decode("utf-8")


def _state(value: object) -> ContactState:
    if not isinstance(value, ContactState):
        raise StoreArgumentError("state", f"expected a ContactState, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------- settings


def _setting_key(value: object) -> str:
    _utf8("key", value)
    assert isinstance(value, str)
    if not 1 <= len(value) <= MAX_SETTING_KEY_CHARS:
        raise StoreArgumentError("key", f"must be 1..{MAX_SETTING_KEY_CHARS} characters, got {len(value)}")
    return value


def get_setting(conn: sqlite3.Connection, key: str) -> bytes | None:
    """Return the value stored under *key*, or ``None``."""
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (_setting_key(key),)).fetchone()
    return None if row is None else bytes(row[0])


def set_setting(conn: sqlite3.Connection, key: str, value: bytes, *, now: int) -> None:
    """Store *value* (at most 64 KiB) under *key*, replacing any previous value."""
    conn.execute(
        "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        (
            _setting_key(key),
            _bytes("value", value, min_size=0, max_size=MAX_SETTING_VALUE_SIZE),
            _timestamp("now", now),
        ),
    )


def delete_setting(conn: sqlite3.Connection, key: str) -> bool:
    """Delete *key*; return whether it existed."""
    return conn.execute("DELETE FROM settings WHERE key = ?", (_setting_key(key),)).rowcount > 0


def count_settings(conn: sqlite3.Connection, prefix: str) -> int:
    """Return how many keys start with *prefix* (a key range, so the primary key index answers it)."""
    start = _setting_key(prefix)
    end = start[:-1] + chr(ord(start[-1]) + 1)
    return int(conn.execute("SELECT count(*) FROM settings WHERE key >= ? AND key < ?", (start, end)).fetchone()[0])


# --------------------------------------------------------------------------------------------------- contacts

_CONTACT_COLUMNS: Final = "peer_id, name, state, verified, added_at, updated_at"


def _contact(row: Any) -> Contact:
    return Contact(
        peer_id=bytes(row[0]),
        name=row[1],
        state=ContactState(row[2]),
        verified=bool(row[3]),
        added_at=row[4],
        updated_at=row[5],
    )


def get_contact(conn: sqlite3.Connection, peer_id: bytes) -> Contact | None:
    """Return the contact (or blocked peer) with this peer id, or ``None``."""
    row = conn.execute(
        f"SELECT {_CONTACT_COLUMNS} FROM contacts WHERE peer_id = ?", (_peer_id("peer_id", peer_id),)
    ).fetchone()
    return None if row is None else _contact(row)


def find_contact(conn: sqlite3.Connection, name: str) -> Contact | None:
    """Return the contact named *name*, or ``None``.  Names compare by :func:`name_key`: case-insensitively, in any
    script, and whatever the Unicode normalisation of either spelling."""
    name = _name(name)
    row = conn.execute(f"SELECT {_CONTACT_COLUMNS} FROM contacts WHERE name = ?", (name,)).fetchone()
    if row is None:  # SQLite's NOCASE folds ASCII letters only ("STRASSE" is "Straße" too)
        row = _caseless_match(conn, name)
    return None if row is None else _contact(row)


def _caseless_match(conn: sqlite3.Connection, name: str, *, other_than: bytes | None = None) -> Any:
    """The row of a contact whose name has ``name``'s :func:`name_key` (not ``other_than``'s), or ``None``: a scan of
    the named contacts, for names SQLite's ``NOCASE`` cannot compare."""
    key = name_key(name)
    for row in conn.execute(f"SELECT {_CONTACT_COLUMNS} FROM contacts WHERE name IS NOT NULL ORDER BY name, peer_id"):
        if name_key(row[1]) == key and bytes(row[0]) != other_than:
            return row
    return None


def list_contacts(conn: sqlite3.Connection, *, state: ContactState | None = None) -> list[Contact]:
    """Return the contacts ordered by name (blocked strangers, which have no name, last); optionally one *state*."""
    order = "ORDER BY name IS NULL, name, peer_id"
    if state is None:
        rows = conn.execute(f"SELECT {_CONTACT_COLUMNS} FROM contacts {order}").fetchall()
    else:
        rows = conn.execute(
            f"SELECT {_CONTACT_COLUMNS} FROM contacts WHERE state = ? {order}", (_state(state).value,)
        ).fetchall()
    return [_contact(row) for row in rows]


def _check_name_free(conn: sqlite3.Connection, name: str, peer_id: bytes) -> None:
    row = conn.execute("SELECT peer_id, name FROM contacts WHERE name = ? AND peer_id != ?", (name, peer_id)).fetchone()
    if row is None:
        row = _caseless_match(conn, name, other_than=peer_id)
    if row is not None:
        raise NameTakenError(f"the name {name!r} is already used by another contact ({row[1]!r})")


def _require_contact(conn: sqlite3.Connection, peer_id: bytes) -> Contact:
    contact = get_contact(conn, peer_id)
    if contact is None:
        raise UnknownContactError(f"no contact with peer id {peer_id.hex()}")
    return contact


def add_contact(conn: sqlite3.Connection, *, peer_id: bytes, name: str, now: int, verified: bool = False) -> Contact:
    """Add a contact.  A blocked stranger (no name) becomes a contact; anything else already known is refused.

    Raises :class:`ContactExistsError` if the peer is already a contact (blocked or not) and
    :class:`NameTakenError` if another contact has this name.
    """
    peer = _peer_id("peer_id", peer_id)
    name = _name(name)
    now = _timestamp("now", now)
    existing = get_contact(conn, peer)
    if existing is not None and existing.name is not None:
        blocked = " (blocked)" if existing.state is ContactState.BLOCKED else ""
        raise ContactExistsError(f"this peer is already the contact {existing.name!r}{blocked}")
    _check_name_free(conn, name, peer)
    if existing is None:
        conn.execute(
            f"INSERT INTO contacts ({_CONTACT_COLUMNS}) VALUES (?, ?, 'contact', ?, ?, ?)",
            (peer, name, int(bool(verified)), now, now),
        )
    else:
        conn.execute(
            "UPDATE contacts SET name = ?, state = 'contact', verified = ?, updated_at = ? WHERE peer_id = ?",
            (name, int(bool(verified)), now, peer),
        )
    return _require_contact(conn, peer)


def rename_contact(conn: sqlite3.Connection, peer_id: bytes, name: str, *, now: int) -> Contact:
    """Rename a contact; raises :class:`UnknownContactError` or :class:`NameTakenError`."""
    peer = _peer_id("peer_id", peer_id)
    name = _name(name)
    now = _timestamp("now", now)
    _require_contact(conn, peer)
    _check_name_free(conn, name, peer)
    conn.execute("UPDATE contacts SET name = ?, updated_at = ? WHERE peer_id = ?", (name, now, peer))
    return _require_contact(conn, peer)


def remove_contact(conn: sqlite3.Connection, peer_id: bytes) -> bool:
    """Forget a contact (the message history stays); return whether there was one to forget.  A blocked one stays
    blocked and forgets only its name (a blocked peer without a name, as one blocked from a message request):
    removing a contact must not let a peer the user blocked write to them again."""
    peer = _peer_id("peer_id", peer_id)
    if conn.execute(
        "UPDATE contacts SET name = NULL WHERE peer_id = ? AND state = 'blocked' AND name IS NOT NULL", (peer,)
    ).rowcount:
        return True
    return conn.execute("DELETE FROM contacts WHERE peer_id = ? AND state != 'blocked'", (peer,)).rowcount > 0


def block_peer(conn: sqlite3.Connection, peer_id: bytes, *, now: int) -> Contact:
    """Block a peer: a contact keeps its name and history; a stranger is recorded as a blocked peer without name.

    A pending message request of the peer is dropped with its messages (as :func:`reject_request` does), so it
    neither shows in :func:`list_requests` nor counts toward the request bounds.
    """
    peer = _peer_id("peer_id", peer_id)
    now = _timestamp("now", now)
    conn.execute("DELETE FROM messages WHERE conversation = ? AND is_request = 1", (peer,))
    conn.execute("DELETE FROM message_requests WHERE peer_id = ?", (peer,))
    conn.execute(
        f"INSERT INTO contacts ({_CONTACT_COLUMNS}) VALUES (?, NULL, 'blocked', 0, ?, ?) "
        "ON CONFLICT (peer_id) DO UPDATE SET state = 'blocked', updated_at = excluded.updated_at "
        "WHERE state != 'blocked'",
        (peer, now, now),
    )
    return _require_contact(conn, peer)


def unblock_peer(conn: sqlite3.Connection, peer_id: bytes, *, now: int) -> bool:
    """Unblock a peer: a named one becomes a contact again, a nameless one is forgotten.  Return whether it was
    blocked."""
    peer = _peer_id("peer_id", peer_id)
    now = _timestamp("now", now)
    if conn.execute("DELETE FROM contacts WHERE peer_id = ? AND state = 'blocked' AND name IS NULL", (peer,)).rowcount:
        return True
    cursor = conn.execute(
        "UPDATE contacts SET state = 'contact', updated_at = ? WHERE peer_id = ? AND state = 'blocked'", (now, peer)
    )
    return cursor.rowcount > 0


def set_verified(conn: sqlite3.Connection, peer_id: bytes, verified: bool, *, now: int) -> Contact:
    """Set whether the contact's key was verified out of band; raises :class:`UnknownContactError`."""
    peer = _peer_id("peer_id", peer_id)
    now = _timestamp("now", now)
    _require_contact(conn, peer)
    conn.execute("UPDATE contacts SET verified = ?, updated_at = ? WHERE peer_id = ?", (int(bool(verified)), now, peer))
    return _require_contact(conn, peer)


def is_blocked(conn: sqlite3.Connection, peer_id: bytes) -> bool:
    """Return whether the peer is blocked (checked when a channel opens and for every incoming message)."""
    row = conn.execute(
        "SELECT 1 FROM contacts WHERE peer_id = ? AND state = 'blocked'", (_peer_id("peer_id", peer_id),)
    ).fetchone()
    return row is not None


# --------------------------------------------------------------------------------------------------- messages

_MESSAGE_COLUMNS: Final = (
    "seq, message_id, conversation, direction, sender, text, sent_at, stored_at, status, status_at, is_request"
)

_STATUS: Final = "CASE WHEN m.status IN ('queued', 'sent') AND o.seq IS NULL THEN 'delivered' ELSE m.status END"
"""The derived status of the row ``m`` of ``messages`` joined with ``LEFT JOIN outbox AS o ON o.seq = m.seq``."""

_MESSAGE_SELECT: Final = (
    "SELECT m.seq, m.message_id, m.conversation, m.direction, m.sender, m.text, m.sent_at, m.stored_at, "
    f"{_STATUS}, m.status_at, m.is_request FROM messages AS m LEFT JOIN outbox AS o ON o.seq = m.seq"
)
"""Every column of :class:`StoredMessage`, with the derived status; the conditions must name ``m.`` columns."""


def _message(row: Any) -> StoredMessage:
    return StoredMessage(
        seq=row[0],
        message_id=bytes(row[1]),
        conversation=bytes(row[2]),
        direction=Direction(row[3]),
        sender=bytes(row[4]),
        text=row[5],
        sent_at=row[6],
        stored_at=row[7],
        status=MessageStatus(row[8]),
        status_at=row[9],
        is_request=bool(row[10]),
    )


def enqueue(
    conn: sqlite3.Connection,
    *,
    message_id: bytes,
    recipient: bytes,
    sender: bytes,
    text: str,
    sent_at: int,
    now: int,
) -> StoredMessage:
    """Store an outbound message (status ``queued``) and its outbox row, due at *now*, in the caller's transaction.

    *sender* is this node's own peer id.  The text is stored once, in ``messages``: the sender seals it into an
    envelope whenever it (re)sends it (schema v2).  Raises :class:`DuplicateMessageError` if *message_id* is already
    stored.
    """
    mid = _message_id(message_id)
    peer = _peer_id("recipient", recipient)
    own = _peer_id("sender", sender)
    body = _text(text)
    sent = _timestamp("sent_at", sent_at)
    now = _timestamp("now", now)
    try:
        cursor = conn.execute(
            f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (NULL, ?, ?, 'out', ?, ?, ?, ?, 'queued', ?, 0)",
            (mid, peer, own, body, sent, now, now),
        )
    except sqlite3.IntegrityError as exc:
        if get_message(conn, mid) is not None:
            raise DuplicateMessageError(f"message id {mid.hex()} is already stored") from None
        raise StoreArgumentError("message", f"refused by the schema: {exc}") from exc
    seq = cursor.lastrowid
    assert seq is not None
    conn.execute(
        "INSERT INTO outbox (seq, recipient, attempts, next_attempt_at, last_error, enqueued_at)"
        " VALUES (?, ?, 0, ?, NULL, ?)",
        (seq, peer, now, now),
    )
    return StoredMessage(
        seq=seq,
        message_id=mid,
        conversation=peer,
        direction=Direction.OUT,
        sender=own,
        text=body,
        sent_at=sent,
        stored_at=now,
        status=MessageStatus.QUEUED,
        status_at=now,
        is_request=False,
    )


def insert_incoming(
    conn: sqlite3.Connection,
    *,
    message_id: bytes,
    sender: bytes,
    text: str,
    sent_at: int,
    now: int,
    is_request: bool = False,
    conversation: bytes | None = None,
) -> bool:
    """Store a received message; return ``False`` (and change nothing) if its id is already stored.

    *conversation* defaults to *sender* (a one-to-one chat).  With *is_request* the message belongs to a message
    request from a stranger: it is kept out of :func:`inbox` and counted in ``message_requests`` until
    :func:`accept_request` or :func:`reject_request`.  *sent_at* is the sender's claim; the caller bounds it.
    """
    mid = _message_id(message_id)
    peer = _peer_id("sender", sender)
    conv = peer if conversation is None else _peer_id("conversation", conversation)
    body = _text(text)
    sent = _timestamp("sent_at", sent_at)
    now = _timestamp("now", now)
    request = int(bool(is_request))
    cursor = conn.execute(
        f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (NULL, ?, ?, 'in', ?, ?, ?, ?, 'received', ?, ?) "
        "ON CONFLICT (message_id) DO NOTHING",
        (mid, conv, peer, body, sent, now, now, request),
    )
    if cursor.rowcount == 0:
        return False
    if request:
        _count_requests(conn, {conv: (1, len(body.encode("utf-8")))}, now)
    return True


def _count_requests(conn: sqlite3.Connection, added: dict[bytes, tuple[int, int]], now: int) -> None:
    """Add (messages, text bytes) newly stored as requests to each conversation's ``message_requests`` row."""
    for conv, (count, size) in added.items():
        conn.execute(
            "INSERT INTO message_requests (peer_id, first_at, last_at, message_count, text_bytes) "
            "VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (peer_id) DO UPDATE SET last_at = max(last_at, excluded.last_at), "
            "message_count = message_count + excluded.message_count, text_bytes = text_bytes + excluded.text_bytes",
            (conv, now, now, count, size),
        )


def _max_seq(conn: sqlite3.Connection) -> int:
    # With AUTOINCREMENT a new row gets max(largest seq ever used, largest seq present) + 1.
    row = conn.execute(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),"
        " coalesce((SELECT max(seq) FROM messages), 0))"
    ).fetchone()
    return int(row[0])


def _blob(value: bytes, cache: dict[bytes, bytearray]) -> bytearray:
    """*value* as the parameter to bind for a BLOB column on a batch path (one conversion per distinct value).

    Python's sqlite3 module binds ``bytes`` only after looking for an adapter (``need_adapt`` exempts ``int``,
    ``float``, ``str`` and ``bytearray`` but not ``bytes``), and that lookup raises and discards an AttributeError on
    every call: about 0.7 µs per parameter, measured, against 0.1 µs for the copy into a ``bytearray``, which binds
    the same BLOB."""
    blob = cache.get(value)
    if blob is None:
        blob = cache[value] = bytearray(value)
    return blob


OutgoingRow = tuple[bytes, bytes, bytes, str, int, int | None]
"""One message for :func:`enqueue_rows`: the fields of :class:`OutgoingMessage` in order, ``(message_id, recipient,
sender, text, sent_at, next_attempt_at)``."""

IncomingRow = tuple[bytes, bytes, bytes | None, str, int, bool]
"""One message for :func:`insert_incoming_rows`: ``(message_id, sender, conversation, text, sent_at, is_request)``,
the fields of :class:`IncomingMessage` in this order (``conversation`` ``None``: the sender's one-to-one chat)."""


def enqueue_many(conn: sqlite3.Connection, items: Sequence[OutgoingMessage], *, now: int) -> list[int]:
    """:func:`enqueue` for many messages at once (two ``executemany`` calls); return their ``seq`` in order.

    All or nothing: on a duplicate id (stored already or twice in *items*) or an invalid item nothing of this call is
    kept and :class:`DuplicateMessageError` (or :class:`StoreArgumentError`) is raised.  See :func:`enqueue_rows`.
    """
    rows: list[OutgoingRow] = []
    for item in items:
        if not isinstance(item, OutgoingMessage):
            raise StoreArgumentError("items", f"expected OutgoingMessage items, got {type(item).__name__}")
        rows.append((item.message_id, item.recipient, item.sender, item.text, item.sent_at, item.next_attempt_at))
    return enqueue_rows(conn, rows, now=now)


def enqueue_rows(conn: sqlite3.Connection, rows: Sequence[OutgoingRow], *, now: int) -> list[int]:
    """:func:`enqueue_many` for messages given as :data:`OutgoingRow` tuples: the throughput path for bursts of
    sends, with no object per message.  Each field is checked inline with exact type tests, and only a value that
    fails them goes through the general validators (which convert or raise)."""
    now = _timestamp("now", now)
    if len(rows) > MAX_BATCH_ITEMS:
        raise StoreArgumentError("rows", f"at most {MAX_BATCH_ITEMS} per call, got {len(rows)}")
    base = _max_seq(conn)
    messages: list[tuple[int, bytearray, bytearray, bytearray, str, int, int, int]] = []
    outbox: list[tuple[int, bytearray, int, int]] = []
    peers: dict[bytes, bytearray] = {}  # the few distinct recipients and senders of a batch, converted once each
    seq = base
    for row in rows:
        if type(row) is not tuple or len(row) != 6:
            raise StoreArgumentError("rows", f"expected 6-tuples (OutgoingRow), got {type(row).__name__}")
        mid, peer, own, text, sent, due = row
        if type(mid) is not bytes or len(mid) != MESSAGE_ID_SIZE:
            mid = _message_id(mid)
        if type(peer) is not bytes or not 0 < len(peer) <= MAX_PEER_ID_SIZE:
            peer = _peer_id("recipient", peer)
        if type(own) is not bytes or not 0 < len(own) <= MAX_PEER_ID_SIZE:
            own = _peer_id("sender", own)
        if type(text) is not str or len(text) > _SHORT_TEXT_CHARS:
            text = _text(text)
        if type(sent) is not int or not 0 <= sent <= MAX_TIMESTAMP:
            sent = _timestamp("sent_at", sent)
        if due is None:
            due = now
        elif type(due) is not int or not 0 <= due <= MAX_TIMESTAMP:
            due = _timestamp("next_attempt_at", due)
        seq += 1
        recipient = _blob(peer, peers)
        messages.append((seq, bytearray(mid), recipient, _blob(own, peers), text, sent, now, now))
        outbox.append((seq, recipient, due, now))
    try:
        conn.executemany(
            f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, 'out', ?, ?, ?, ?, 'queued', ?, 0)", messages
        )
    except (sqlite3.IntegrityError, UnicodeEncodeError) as exc:
        conn.execute("DELETE FROM messages WHERE seq > ?", (base,))  # undo the part inserted before the failure
        if isinstance(exc, UnicodeEncodeError):
            raise _unbindable_text(message[4] for message in messages) from None
        seen: set[bytes] = set()
        for message in messages:
            mid = bytes(message[1])
            if mid in seen:
                raise DuplicateMessageError(f"message id {mid.hex()} appears twice in one enqueue batch") from None
            seen.add(mid)
        raise DuplicateMessageError(f"a message id of this batch is already stored ({exc})") from None
    conn.executemany(
        "INSERT INTO outbox (seq, recipient, attempts, next_attempt_at, last_error, enqueued_at)"
        " VALUES (?, ?, 0, ?, NULL, ?)",
        outbox,
    )
    return list(range(base + 1, seq + 1))


def insert_incoming_many(conn: sqlite3.Connection, items: Sequence[IncomingMessage], *, now: int) -> list[bool]:
    """:func:`insert_incoming` for many messages at once; return, per item, whether it was new.

    An id already stored, or repeated within *items*, gives ``False`` (the first occurrence wins).  An invalid item
    raises :class:`StoreArgumentError` and nothing of this call is kept.  Fields are checked inline as in
    :func:`enqueue_many`; when every row was inserted (the usual case) the result needs no read back.
    """
    given: list[IncomingRow] = []
    for item in items:
        if not isinstance(item, IncomingMessage):
            raise StoreArgumentError("items", f"expected IncomingMessage items, got {type(item).__name__}")
        given.append((item.message_id, item.sender, item.conversation, item.text, item.sent_at, item.is_request))
    return insert_incoming_rows(conn, given, now=now)


def insert_incoming_rows(conn: sqlite3.Connection, rows: Sequence[IncomingRow], *, now: int) -> list[bool]:
    """:func:`insert_incoming_many` for messages given as :data:`IncomingRow` tuples: the throughput path for a
    received batch, with no object per message."""
    now = _timestamp("now", now)
    if len(rows) > MAX_BATCH_ITEMS:
        raise StoreArgumentError("rows", f"at most {MAX_BATCH_ITEMS} per call, got {len(rows)}")
    values: list[tuple[bytearray, bytearray, bytearray, str, int, int, int, int]] = []
    mids: list[bytes] = []
    convs: list[bytes] = []
    peers: dict[bytes, bytearray] = {}
    for item in rows:
        if type(item) is not tuple or len(item) != 6:
            raise StoreArgumentError("rows", f"expected 6-tuples (IncomingRow), got {type(item).__name__}")
        mid, peer, conv, text, sent, request = item
        if type(mid) is not bytes or len(mid) != MESSAGE_ID_SIZE:
            mid = _message_id(mid)
        if type(peer) is not bytes or not 0 < len(peer) <= MAX_PEER_ID_SIZE:
            peer = _peer_id("sender", peer)
        if conv is None:
            conv = peer
        elif type(conv) is not bytes or not 0 < len(conv) <= MAX_PEER_ID_SIZE:
            conv = _peer_id("conversation", conv)
        if type(text) is not str or len(text) > _SHORT_TEXT_CHARS:
            text = _text(text)
        if type(sent) is not int or not 0 <= sent <= MAX_TIMESTAMP:
            sent = _timestamp("sent_at", sent)
        mids.append(mid)
        convs.append(conv)
        values.append(
            (bytearray(mid), _blob(conv, peers), _blob(peer, peers), text, sent, now, now, 1 if request else 0)
        )
    base = _max_seq(conn)
    try:
        inserted = conn.executemany(
            f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES (NULL, ?, ?, 'in', ?, ?, ?, ?, 'received', ?, ?) "
            "ON CONFLICT (message_id) DO NOTHING",
            values,
        ).rowcount
    except UnicodeEncodeError:
        conn.execute("DELETE FROM messages WHERE seq > ?", (base,))  # undo the part inserted before the failure
        raise _unbindable_text(value[3] for value in values) from None
    if inserted == len(values):  # no id was stored already or repeated: every item is new
        result = [True] * len(values)
    else:
        # Single writer: the rows above base are exactly the ones this call inserted.
        fresh = {bytes(r[0]) for r in conn.execute("SELECT message_id FROM messages WHERE seq > ?", (base,))}
        result = []
        for mid in mids:
            new = mid in fresh
            if new:
                fresh.discard(mid)  # a repeat later in the batch is a duplicate
            result.append(new)
    requests: dict[bytes, tuple[int, int]] = {}
    for value, conv, new in zip(values, convs, result, strict=True):
        if new and value[7]:
            count, size = requests.get(conv, (0, 0))
            requests[conv] = (count + 1, size + len(value[3].encode("utf-8")))
    _count_requests(conn, requests, now)
    return result


def get_message(conn: sqlite3.Connection, message_id: bytes) -> StoredMessage | None:
    """Return the message with this id, or ``None``."""
    row = conn.execute(f"{_MESSAGE_SELECT} WHERE m.message_id = ?", (_message_id(message_id),)).fetchone()
    return None if row is None else _message(row)


def history(
    conn: sqlite3.Connection, conversation: bytes, *, limit: int = 50, before: HistoryCursor | None = None
) -> list[StoredMessage]:
    """Return up to *limit* messages of a conversation, oldest first, ordered by ``(sent_at, seq)``.

    Without *before* these are the newest messages; with it, the newest ones strictly before that position (pass
    ``page[0].cursor`` to page back).  The order is stable even when messages arrived out of order.
    """
    conv = _peer_id("conversation", conversation)
    count = _limit(limit)
    if before is None:
        rows = conn.execute(
            f"{_MESSAGE_SELECT} WHERE m.conversation = ? ORDER BY m.sent_at DESC, m.seq DESC LIMIT ?",
            (conv, count),
        ).fetchall()
    else:
        if not isinstance(before, HistoryCursor):
            raise StoreArgumentError("before", f"expected a HistoryCursor, got {type(before).__name__}")
        sent = _timestamp("before.sent_at", before.sent_at)
        seq = _int("before.seq", before.seq, low=0, high=MAX_TIMESTAMP)
        rows = conn.execute(
            f"{_MESSAGE_SELECT} WHERE m.conversation = ? AND (m.sent_at, m.seq) < (?, ?) "
            "ORDER BY m.sent_at DESC, m.seq DESC LIMIT ?",
            (conv, sent, seq, count),
        ).fetchall()
    rows.reverse()
    return [_message(row) for row in rows]


def conversation_floor(conn: sqlite3.Connection, conversation: bytes) -> int:
    """The lowest timestamp a new outgoing message of ``conversation`` may carry to sort after every message in it
    (the sender's hybrid logical clock, protocol section 6.4): the latest ``sent_at`` in it, plus one if a received
    message carries it; 0 for an empty conversation.  Two index probes (``messages_by_conversation``)."""
    peer = _peer_id("conversation", conversation)
    (top,) = conn.execute("SELECT max(sent_at) FROM messages WHERE conversation = ?", (peer,)).fetchone()
    if top is None:
        return 0
    received = conn.execute(
        "SELECT 1 FROM messages WHERE conversation = ? AND sent_at = ? AND direction = 'in' LIMIT 1", (peer, top)
    ).fetchone()
    return int(top) + 1 if received is not None else int(top)


def inbox(conn: sqlite3.Connection, *, limit: int = 50, before_seq: int | None = None) -> list[StoredMessage]:
    """Return up to *limit* received messages that are not message requests, newest (highest ``seq``) first.

    Pass the last result's ``seq`` as *before_seq* to page back.
    """
    count = _limit(limit)
    if before_seq is None:
        rows = conn.execute(
            f"{_MESSAGE_SELECT} WHERE m.direction = 'in' AND m.is_request = 0 ORDER BY m.seq DESC LIMIT ?",
            (count,),
        ).fetchall()
    else:
        seq = _int("before_seq", before_seq, low=0, high=MAX_TIMESTAMP)
        rows = conn.execute(
            f"{_MESSAGE_SELECT} WHERE m.direction = 'in' AND m.is_request = 0 AND m.seq < ? "
            "ORDER BY m.seq DESC LIMIT ?",
            (seq, count),
        ).fetchall()
    return [_message(row) for row in rows]


# --------------------------------------------------------------------------------------------------- requests

_REQUEST_COLUMNS: Final = "peer_id, first_at, last_at, message_count"


def _request(row: Any) -> MessageRequest:
    return MessageRequest(peer_id=bytes(row[0]), first_at=row[1], last_at=row[2], message_count=row[3])


def get_request(conn: sqlite3.Connection, peer_id: bytes) -> MessageRequest | None:
    """Return the pending message request of this peer, or ``None``."""
    row = conn.execute(
        f"SELECT {_REQUEST_COLUMNS} FROM message_requests WHERE peer_id = ?", (_peer_id("peer_id", peer_id),)
    ).fetchone()
    return None if row is None else _request(row)


def list_requests(conn: sqlite3.Connection, *, limit: int = 100) -> list[MessageRequest]:
    """Return pending message requests, most recently active first."""
    rows = conn.execute(
        f"SELECT {_REQUEST_COLUMNS} FROM message_requests ORDER BY last_at DESC, peer_id LIMIT ?", (_limit(limit),)
    ).fetchall()
    return [_request(row) for row in rows]


def count_requests(conn: sqlite3.Connection) -> int:
    """Return the number of pending message requests (for bounding them and for ``p2pmsg status``)."""
    return int(conn.execute("SELECT count(*) FROM message_requests").fetchone()[0])


def has_messages(conn: sqlite3.Connection, peer_id: bytes) -> bool:
    """Return whether the conversation with *peer_id* holds any message (a forgotten contact's history stays)."""
    row = conn.execute("SELECT 1 FROM messages WHERE conversation = ? LIMIT 1", (_peer_id("peer_id", peer_id),))
    return row.fetchone() is not None


def last_message_seq(conn: sqlite3.Connection) -> int:
    """The largest ``messages.seq`` ever used (0 for none): every message stored later has a larger one."""
    return _max_seq(conn)


def incoming_after(conn: sqlite3.Connection, peer_id: bytes, seq: int) -> tuple[int, int]:
    """Return how many messages received from *peer_id* (message requests excluded) have a ``seq`` above *seq*, and
    their text bytes (UTF-8)."""
    row = conn.execute(
        "SELECT count(*), coalesce(sum(length(CAST(text AS BLOB))), 0) FROM messages "
        "WHERE conversation = ? AND direction = 'in' AND is_request = 0 AND seq > ?",
        (_peer_id("peer_id", peer_id), seq),
    ).fetchone()
    return int(row[0]), int(row[1])


def request_bytes(conn: sqlite3.Connection, peer_id: bytes | None = None) -> int:
    """Return the text bytes (UTF-8) of pending request messages: all of them, or those of *peer_id*.

    Reads the ``text_bytes`` kept in ``message_requests`` (one row, or one per pending request), never the messages.
    """
    if peer_id is not None:
        row = conn.execute(
            "SELECT coalesce(sum(text_bytes), 0) FROM message_requests WHERE peer_id = ?",
            (_peer_id("peer_id", peer_id),),
        ).fetchone()
    else:
        row = conn.execute("SELECT coalesce(sum(text_bytes), 0) FROM message_requests").fetchone()
    return int(row[0])


def accept_request(conn: sqlite3.Connection, peer_id: bytes, *, name: str, now: int) -> Contact:
    """Accept a stranger's request: add them as contact *name* and move their messages into the inbox.

    If the peer became a contact in the meantime the existing contact is kept (and *name* ignored).  Raises
    :class:`PeerBlockedError` if the peer is blocked (accepting never unblocks), :class:`UnknownRequestError` if
    there is no pending request, :class:`NameTakenError` if the name is used.
    """
    peer = _peer_id("peer_id", peer_id)
    _name(name)
    now = _timestamp("now", now)
    existing = get_contact(conn, peer)
    if existing is not None and existing.state is ContactState.BLOCKED:
        raise PeerBlockedError(f"peer id {peer.hex()} is blocked: unblock it before accepting a request")
    if get_request(conn, peer) is None:
        raise UnknownRequestError(f"no pending message request from peer id {peer.hex()}")
    contact = (
        add_contact(conn, peer_id=peer, name=name, now=now) if existing is None or existing.name is None else existing
    )
    settle_request(conn, peer)
    return contact


def settle_request(conn: sqlite3.Connection, peer_id: bytes) -> bool:
    """The peer is a contact now: its pending request's messages become ordinary messages of the conversation and
    the request goes.  Return whether there was a request."""
    peer = _peer_id("peer_id", peer_id)
    conn.execute("UPDATE messages SET is_request = 0 WHERE conversation = ? AND is_request = 1", (peer,))
    return conn.execute("DELETE FROM message_requests WHERE peer_id = ?", (peer,)).rowcount > 0


def reject_request(conn: sqlite3.Connection, peer_id: bytes, *, block: bool, now: int) -> int:
    """Drop a stranger's request and its messages; with *block* also block the peer.  Return messages deleted."""
    peer = _peer_id("peer_id", peer_id)
    now = _timestamp("now", now)
    deleted = conn.execute("DELETE FROM messages WHERE conversation = ? AND is_request = 1", (peer,)).rowcount
    conn.execute("DELETE FROM message_requests WHERE peer_id = ?", (peer,))
    if block:
        block_peer(conn, peer, now=now)
    return int(deleted)


# --------------------------------------------------------------------------------------------------- outbox

# An outbox row joined with its message (the text and the sender's timestamp live only in ``messages``).
_OUTBOX_SELECT: Final = (
    "SELECT m.message_id, o.seq, o.recipient, m.text, m.sent_at, o.attempts, o.next_attempt_at, o.last_error,"
    " o.enqueued_at FROM outbox AS o JOIN messages AS m ON m.seq = o.seq"
)


def _outbox(row: Any) -> OutboxEntry:
    return OutboxEntry(
        message_id=bytes(row[0]),
        seq=row[1],
        recipient=bytes(row[2]),
        text=row[3],
        sent_at=row[4],
        attempts=row[5],
        next_attempt_at=row[6],
        last_error=row[7],
        enqueued_at=row[8],
    )


def _outbound_status(conn: sqlite3.Connection, mid: bytes) -> tuple[int, bytes, MessageStatus] | None:
    """``(seq, conversation, derived status)`` of the outgoing message *mid*, or ``None``."""
    row = conn.execute(
        f"SELECT m.seq, m.conversation, {_STATUS} FROM messages AS m LEFT JOIN outbox AS o ON o.seq = m.seq "
        "WHERE m.message_id = ? AND m.direction = 'out'",
        (mid,),
    ).fetchone()
    return None if row is None else (row[0], bytes(row[1]), MessageStatus(row[2]))


def _set_status(conn: sqlite3.Connection, seq: int, old: MessageStatus, new: MessageStatus, now: int) -> bool:
    """Store *new* as the status of message *seq* whose (derived) status is *old*, if the table allows it."""
    if old is new or not can_transition(old, new):
        return False
    conn.execute("UPDATE messages SET status = ?, status_at = ? WHERE seq = ?", (new.value, now, seq))
    return True


def _deliver(conn: sqlite3.Connection, seq: int, old: MessageStatus, now: int) -> bool:
    """Apply a receipt to message *seq* whose derived status is *old*; return whether it became delivered.

    ``queued``/``sent`` (the outbox row exists): delete the outbox row and nothing else, the status is derived from
    its absence.  ``failed`` (no outbox row): store ``delivered``.  Anything else: no change."""
    if old is MessageStatus.DELIVERED or not can_transition(old, MessageStatus.DELIVERED):
        return False
    if old is MessageStatus.FAILED:
        return _set_status(conn, seq, old, MessageStatus.DELIVERED, now)
    conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
    return True


def get_outbox_entry(conn: sqlite3.Connection, message_id: bytes) -> OutboxEntry | None:
    """Return the outbox row of this message, or ``None`` (delivered, failed or unknown)."""
    row = conn.execute(
        f"{_OUTBOX_SELECT} WHERE o.seq = (SELECT seq FROM messages WHERE message_id = ?)",
        (_message_id(message_id),),
    ).fetchone()
    return None if row is None else _outbox(row)


def due_round(conn: sqlite3.Connection, *, now: int, limit: int = 100) -> DueRound:
    """Read the outbox entries due at *now* (``next_attempt_at <= now``) for one round of the outbox worker.

    The recipients are those of the *limit* entries due longest (index ``outbox_due``), the one due longest first;
    each gets its due entries in send order (index ``outbox_by_recipient``), an equal share of *limit* at most.  Send
    order within a recipient, not due time: one recipient's entries fall due at different times (a backoff after a
    lost session, a new send due at once), and read by due time, a limit that cut the list made newer messages
    overtake older ones.  A caller must not treat a recipient in ``cut`` as done, nor, when ``more``, any other.
    """
    now = _timestamp("now", now)
    limit = _limit(limit)
    firsts = conn.execute(
        "SELECT recipient, min(next_attempt_at), min(seq), count(*) FROM (SELECT recipient, next_attempt_at, seq"
        " FROM outbox WHERE next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?) GROUP BY recipient"
        " ORDER BY min(next_attempt_at), min(seq)",
        (now, limit),
    ).fetchall()
    more = sum(row[3] for row in firsts) >= limit
    share = max(1, limit // len(firsts)) if firsts else 0
    entries: list[OutboxEntry] = []
    cut: set[bytes] = set()
    for recipient, *_ in firsts:
        rows = conn.execute(
            f"{_OUTBOX_SELECT} WHERE o.recipient = ? AND o.next_attempt_at <= ? ORDER BY o.seq LIMIT ?",
            (recipient, now, share + 1),
        ).fetchall()
        if len(rows) > share:
            cut.add(bytes(recipient))
        entries.extend(_outbox(row) for row in rows[:share])
    return DueRound(entries, frozenset(cut), more)


def next_attempt_at(conn: sqlite3.Connection) -> int | None:
    """The earliest ``next_attempt_at`` in the outbox (``None`` if it is empty): when the next entry falls due."""
    row = conn.execute("SELECT min(next_attempt_at) FROM outbox").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def due_for(conn: sqlite3.Connection, recipient: bytes, *, limit: int = 100) -> list[OutboxEntry]:
    """Return up to *limit* outbox entries for *recipient* in send order, whatever their schedule (to flush the
    queue when the recipient connects)."""
    rows = conn.execute(
        f"{_OUTBOX_SELECT} WHERE o.recipient = ? ORDER BY o.seq LIMIT ?",
        (_peer_id("recipient", recipient), _limit(limit)),
    ).fetchall()
    return [_outbox(row) for row in rows]


def expedite(conn: sqlite3.Connection, recipient: bytes, *, now: int) -> int:
    """Make every outbox entry of *recipient* due at *now* (it connected or its record changed); return how many."""
    cursor = conn.execute(
        "UPDATE outbox SET next_attempt_at = ? WHERE recipient = ? AND next_attempt_at > ?",
        (_timestamp("now", now), _peer_id("recipient", recipient), now),
    )
    return int(cursor.rowcount)


def expedite_ids(conn: sqlite3.Connection, message_ids: Iterable[bytes], *, now: int) -> int:
    """Make these outbox entries due at *now* if they are due later (no attempt counted); return how many changed."""
    return _move_due(conn, message_ids, _timestamp("now", now), later=False)


def postpone_ids(conn: sqlite3.Connection, message_ids: Iterable[bytes], *, until: int) -> int:
    """Make these outbox entries due no earlier than *until* (no attempt counted, nothing else changed); return how
    many changed.  The reverse of :func:`expedite_ids`."""
    return _move_due(conn, message_ids, _timestamp("until", until), later=True)


def _move_due(conn: sqlite3.Connection, message_ids: Iterable[bytes], at: int, *, later: bool) -> int:
    """Set ``next_attempt_at = at`` on these entries where that moves it later (*later*) or earlier."""
    moved = "<" if later else ">"
    cursor = conn.executemany(
        "UPDATE outbox SET next_attempt_at = ?1 WHERE seq = (SELECT seq FROM messages WHERE message_id = ?2)"
        f" AND next_attempt_at {moved} ?1",
        [(at, _message_id(mid)) for mid in message_ids],
    )
    return int(cursor.rowcount)


def expedite_unattempted(conn: sqlite3.Connection, *, now: int) -> int:
    """Make every outbox entry that was never attempted (``attempts = 0``) due at *now*; return how many.

    Run at start-up: an entry enqueued with a resend time ahead (handed straight to a session) may not have
    reached the wire before the node stopped."""
    now = _timestamp("now", now)
    cursor = conn.execute(
        "UPDATE outbox SET next_attempt_at = ? WHERE attempts = 0 AND next_attempt_at > ?", (now, now)
    )
    return int(cursor.rowcount)


def waiting_recipients(conn: sqlite3.Connection, *, now: int, limit: int = 100) -> list[bytes]:
    """Peer ids of contacts (not blocked) with outbox entries of which none is due at *now* (they all wait for a
    retry after a backoff, or for a receipt), the latest next attempt first; at most *limit*.  One pass over the
    outbox (a grouped scan; the outbox holds only undelivered messages)."""
    rows = conn.execute(
        "SELECT o.recipient FROM outbox AS o JOIN contacts AS c ON c.peer_id = o.recipient"
        " WHERE c.state = 'contact' GROUP BY o.recipient HAVING min(o.next_attempt_at) > ?"
        " ORDER BY min(o.next_attempt_at) DESC LIMIT ?",
        (_timestamp("now", now), _limit(limit)),
    ).fetchall()
    return [bytes(row[0]) for row in rows]


def outbox_depth(conn: sqlite3.Connection, *, recipient: bytes | None = None) -> int:
    """Return the number of messages waiting for a delivery receipt (to *recipient* only, if given)."""
    if recipient is None:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    peer = _peer_id("recipient", recipient)
    return int(conn.execute("SELECT count(*) FROM outbox WHERE recipient = ?", (peer,)).fetchone()[0])


def mark_sent(conn: sqlite3.Connection, message_id: bytes, *, now: int, retry_at: int) -> bool:
    """Record that the envelope was written to the recipient's channel: status ``sent``, one more attempt, and the
    next attempt at *retry_at* unless a receipt arrives first.  Return ``False`` if the message no longer waits for
    a receipt (delivered or failed meanwhile, or unknown)."""
    mid = _message_id(message_id)
    now = _timestamp("now", now)
    retry = _timestamp("retry_at", retry_at)
    found = _outbound_status(conn, mid)
    if found is None:
        return False
    seq, _, status = found
    cursor = conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = NULL WHERE seq = ?",
        (retry, seq),
    )
    if cursor.rowcount == 0:
        return False
    _set_status(conn, seq, status, MessageStatus.SENT, now)
    return True


def mark_delivered(conn: sqlite3.Connection, message_id: bytes, *, recipient: bytes, now: int) -> bool:
    """Apply a delivery receipt from *recipient*: the outbox row is removed, which makes the status ``delivered``
    (the message row is not rewritten; a ``failed`` message gets ``delivered`` stored).

    Return ``False`` (changing nothing) for a duplicate receipt, an unknown id, or a receipt from a peer that is not
    the message's recipient (a peer cannot acknowledge messages sent to someone else).
    """
    mid = _message_id(message_id)
    peer = _peer_id("recipient", recipient)
    now = _timestamp("now", now)
    found = _outbound_status(conn, mid)
    if found is None or found[1] != peer:
        return False
    seq, _, status = found
    return _deliver(conn, seq, status, now)


def _sources(new: MessageStatus) -> str:
    """The SQL list of statuses from which STATUS_TRANSITIONS allows *new* (built from the one table)."""
    olds = sorted(old.value for old, news in STATUS_TRANSITIONS.items() if new in news)
    return "(" + ", ".join(f"'{value}'" for value in olds) + ")"


def _id_list(message_ids: Sequence[bytes]) -> list[bytes]:
    if len(message_ids) > MAX_BATCH_ITEMS:
        raise StoreArgumentError("message_ids", f"at most {MAX_BATCH_ITEMS} per call, got {len(message_ids)}")
    return [_message_id(m) for m in message_ids]


def mark_sent_many(conn: sqlite3.Connection, message_ids: Sequence[bytes], *, now: int, retry_at: int) -> int:
    """:func:`mark_sent` for many messages (two ``executemany`` calls); return how many still wait for a receipt."""
    now = _timestamp("now", now)
    retry = _timestamp("retry_at", retry_at)
    ids = _id_list(message_ids)
    cursor = conn.executemany(
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = NULL "
        "WHERE seq = (SELECT seq FROM messages WHERE message_id = ? AND direction = 'out')",
        [(retry, m) for m in ids],
    )
    waiting = cursor.rowcount
    conn.executemany(
        "UPDATE messages SET status = 'sent', status_at = ? "
        f"WHERE message_id = ? AND direction = 'out' AND status IN {_sources(MessageStatus.SENT)} "
        "AND EXISTS (SELECT 1 FROM outbox WHERE outbox.seq = messages.seq)",
        [(now, m) for m in ids],
    )
    return int(waiting)


def mark_delivered_many(conn: sqlite3.Connection, message_ids: Sequence[bytes], *, recipient: bytes, now: int) -> int:
    """:func:`mark_delivered` for many receipts from *recipient*; return how many messages became delivered."""
    peer = _peer_id("recipient", recipient)
    now = _timestamp("now", now)
    ids = _id_list(message_ids)
    # Pending (derived queued/sent): deleting the outbox row is the delivery.
    pending = conn.executemany(
        "DELETE FROM outbox WHERE seq = "
        "(SELECT seq FROM messages WHERE message_id = ? AND conversation = ? AND direction = 'out')",
        [(m, peer) for m in ids],
    ).rowcount
    # Failed (stored, no outbox row): a late receipt stores 'delivered'.
    failed = conn.executemany(
        "UPDATE messages SET status = 'delivered', status_at = ? "
        "WHERE message_id = ? AND conversation = ? AND direction = 'out' AND status = 'failed'",
        [(now, m, peer) for m in ids],
    ).rowcount
    return int(pending) + int(failed)


_IN_SIZES: Final = (1, 8, 32, 128, 512)
"""``IN (...)`` list lengths used by :func:`mark_delivered_ids` (padded up, so SQLite caches five statements)."""

_DELIVER_BY_DELETE: Final = tuple(
    old.value
    for old in MessageStatus
    if old is not MessageStatus.FAILED
    and old is not MessageStatus.DELIVERED
    and can_transition(old, MessageStatus.DELIVERED)
)
"""Derived statuses a receipt turns into ``delivered`` by deleting the outbox row (``queued``, ``sent``); a
``failed`` message gets ``delivered`` stored (see :func:`_deliver`)."""

_DELIVERABLE_SQL: Final = (
    "(" + ", ".join(f"'{value}'" for value in (*_DELIVER_BY_DELETE, MessageStatus.FAILED.value)) + ")"
)


def _padded(chunk: list[Any]) -> tuple[int, list[Any]]:
    """*chunk* (at most ``_IN_SIZES[-1]`` long) padded with its last item up to the next of :data:`_IN_SIZES`."""
    size = next(n for n in _IN_SIZES if n >= len(chunk))
    return size, chunk + [chunk[-1]] * (size - len(chunk))


def _deliverable_rows(conn: sqlite3.Connection, ids: list[bytes], peer: bytes) -> dict[bytes, tuple[int, bool]]:
    """``message_id -> (seq, failed)`` of this conversation's outgoing messages among *ids* that a receipt turns
    into ``delivered`` (derived ``queued``/``sent``, or stored ``failed``)."""
    found: dict[bytes, tuple[int, bool]] = {}
    last = _IN_SIZES[-1]
    for start in range(0, len(ids), last):
        size, padded = _padded([bytearray(mid) for mid in ids[start : start + last]])  # see _blob
        padded.append(bytearray(peer))
        rows = conn.execute(
            "SELECT m.message_id, m.seq, m.status = 'failed' "
            "FROM messages AS m LEFT JOIN outbox AS o ON o.seq = m.seq "
            f"WHERE m.message_id IN ({', '.join('?' * size)}) AND +m.conversation = ? AND +m.direction = 'out' "
            f"AND {_STATUS} IN {_DELIVERABLE_SQL}",  # '+': use the id index only
            padded,
        )
        for mid, seq, failed in rows:
            found[mid] = (seq, bool(failed))
    return found


def mark_delivered_ids(
    conn: sqlite3.Connection, message_ids: Sequence[bytes], *, recipient: bytes, now: int
) -> list[bytes]:
    """:func:`mark_delivered` for many receipts from *recipient*; return the ids that became delivered, in the
    order given (an id repeated counts once).  One lookup per 512 ids, then outbox deletes by ``seq`` (and, for
    failed messages only, a status update)."""
    peer = _peer_id("recipient", recipient)
    now = _timestamp("now", now)
    if len(message_ids) > MAX_BATCH_ITEMS:
        raise StoreArgumentError("message_ids", f"at most {MAX_BATCH_ITEMS} per call, got {len(message_ids)}")
    ids = list(message_ids)
    for index, mid in enumerate(ids):
        if type(mid) is not bytes or len(mid) != MESSAGE_ID_SIZE:
            ids[index] = _message_id(mid)
    if not ids:
        return []
    found = _deliverable_rows(conn, ids, peer)
    delivered: list[bytes] = []
    pending: list[tuple[int]] = []
    failed: list[tuple[int, int]] = []
    for mid in ids:
        hit = found.pop(mid, None)
        if hit is None:
            continue
        delivered.append(mid)
        if hit[1]:
            failed.append((now, hit[0]))
        else:
            pending.append((hit[0],))
    last = _IN_SIZES[-1]
    for start in range(0, len(pending), last):
        size, padded = _padded([p[0] for p in pending[start : start + last]])
        conn.execute(f"DELETE FROM outbox WHERE seq IN ({', '.join('?' * size)})", padded)
    if failed:
        conn.executemany("UPDATE messages SET status = 'delivered', status_at = ? WHERE seq = ?", failed)
    return delivered


def reschedule(
    conn: sqlite3.Connection,
    message_id: bytes,
    *,
    now: int,
    error: str,
    backoff: Backoff = DEFAULT_BACKOFF,
    rng: random.Random | None = None,
) -> int | None:
    """Record a failed attempt (*error* says why, truncated to 512 characters) and schedule the next one after an
    exponential backoff with jitter (*rng* for tests).  Return the new ``next_attempt_at``, or ``None`` if the
    message is no longer in the outbox."""
    mid = _message_id(message_id)
    now = _timestamp("now", now)
    reason = _error_text(error)
    row = conn.execute(
        "SELECT seq, attempts FROM outbox WHERE seq = (SELECT seq FROM messages WHERE message_id = ?)", (mid,)
    ).fetchone()
    if row is None:
        return None
    seq, attempts = row[0], row[1] + 1
    unit = (rng if rng is not None else random).random()
    next_at = min(MAX_TIMESTAMP, now + backoff.delay_ms(attempts, unit))
    conn.execute(
        "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE seq = ?",
        (attempts, next_at, reason, seq),
    )
    return next_at


def reschedule_recipient(
    conn: sqlite3.Connection,
    recipient: bytes,
    *,
    now: int,
    error: str,
    lost: Collection[bytes] = (),
    backoff: Backoff = DEFAULT_BACKOFF,
    unit_random: float,
    together: bool = True,
) -> int:
    """Record a failed attempt (*error*) for *recipient*'s entries that are due (``next_attempt_at <= now``) or in
    *lost* (message ids written to a session that ended before their receipts), and schedule them, with the
    recipient's other entries if *together*, for one time: the backoff after the most attempts among the failed
    ones, scaled by *unit_random* (uniform in ``[0, 1)``).  Only the recipient's first :data:`MAX_QUERY_LIMIT` entries
    (in send order) are looked at.  Return how many attempts were recorded.  (Not *together* while a session with the
    recipient lives: the others may be on their way on it, each with its own resend time.)

    One time for all of a peer's messages keeps them together: one dial carries them all.  Scheduled one by one (each
    by its own attempt count, as :func:`reschedule` does), a message postponed while the first's dial failed drifted
    apart from it for good, and the peer was dialled for each (a QA pass: 11 of 150 offline contacts, dialled up to
    twice as often)."""
    peer = _peer_id("recipient", recipient)
    now = _timestamp("now", now)
    reason = _error_text(error)
    rows = conn.execute(
        "SELECT o.seq, m.message_id, o.attempts, o.next_attempt_at FROM outbox o JOIN messages m ON m.seq = o.seq"
        " WHERE o.recipient = ? ORDER BY o.seq LIMIT ?",
        (peer, MAX_QUERY_LIMIT),
    ).fetchall()
    failed = [(seq, attempts) for seq, mid, attempts, at in rows if at <= now or bytes(mid) in lost]
    if not failed:
        return 0
    next_at = min(MAX_TIMESTAMP, now + backoff.delay_ms(max(attempts for _, attempts in failed) + 1, unit_random))
    conn.executemany(
        "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?", [(reason, seq) for seq, _ in failed]
    )
    # All of them, sooner or later than they were: one dial carries them all.
    failed_seqs = {seq for seq, _ in failed}
    moving = rows if together else [row for row in rows if row[0] in failed_seqs]
    moved = [(next_at, seq) for seq, _, _, at in moving if at != next_at]
    conn.executemany("UPDATE outbox SET next_attempt_at = ? WHERE seq = ?", moved)
    return len(failed)


def mark_failed(conn: sqlite3.Connection, message_id: bytes, *, now: int) -> bool:
    """Give up on a message: status ``failed`` and the outbox row removed.  Return whether it was still pending."""
    mid = _message_id(message_id)
    now = _timestamp("now", now)
    found = _outbound_status(conn, mid)
    if found is None:
        return False
    seq, _, status = found
    changed = _set_status(conn, seq, status, MessageStatus.FAILED, now)
    if changed:
        conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
    return changed


# --------------------------------------------------------------------------------------------------- peer records

_RECORD_COLUMNS: Final = "peer_id, record, seq, expires_at, fetched_at"


def put_peer_record(
    conn: sqlite3.Connection, *, peer_id: bytes, record: bytes, seq: int, expires_at: int, now: int
) -> bool:
    """Cache a signed peer record the caller has verified; the highest *seq* wins.

    Return whether the cached record changed.  The same *seq* again only refreshes ``fetched_at``; a lower one is
    ignored.
    """
    peer = _peer_id("peer_id", peer_id)
    data = _bytes("record", record, min_size=1, max_size=MAX_PEER_RECORD_SIZE)
    number = _int("seq", seq, low=0, high=MAX_TIMESTAMP)
    expires = _timestamp("expires_at", expires_at)
    now = _timestamp("now", now)
    row = conn.execute("SELECT seq FROM peer_records WHERE peer_id = ?", (peer,)).fetchone()
    if row is None:
        conn.execute(
            f"INSERT INTO peer_records ({_RECORD_COLUMNS}) VALUES (?, ?, ?, ?, ?)", (peer, data, number, expires, now)
        )
        return True
    if number > row[0]:
        conn.execute(
            "UPDATE peer_records SET record = ?, seq = ?, expires_at = ?, fetched_at = ? WHERE peer_id = ?",
            (data, number, expires, now, peer),
        )
        return True
    if number == row[0]:
        conn.execute("UPDATE peer_records SET fetched_at = ? WHERE peer_id = ?", (now, peer))
    return False


def get_peer_record(conn: sqlite3.Connection, peer_id: bytes) -> CachedPeerRecord | None:
    """Return the cached record of this peer (expired or not: check :meth:`CachedPeerRecord.is_expired`)."""
    row = conn.execute(
        f"SELECT {_RECORD_COLUMNS} FROM peer_records WHERE peer_id = ?", (_peer_id("peer_id", peer_id),)
    ).fetchone()
    if row is None:
        return None
    return CachedPeerRecord(
        peer_id=bytes(row[0]), record=bytes(row[1]), seq=row[2], expires_at=row[3], fetched_at=row[4]
    )


def delete_peer_record(conn: sqlite3.Connection, peer_id: bytes) -> bool:
    """Forget a cached record (it failed: dial refused, wrong peer); return whether one was cached."""
    return conn.execute("DELETE FROM peer_records WHERE peer_id = ?", (_peer_id("peer_id", peer_id),)).rowcount > 0


def prune_peer_records(conn: sqlite3.Connection, *, now: int) -> int:
    """Delete records expired at *now*; return how many."""
    return int(conn.execute("DELETE FROM peer_records WHERE expires_at <= ?", (_timestamp("now", now),)).rowcount)


# --------------------------------------------------------------------------------------------------- DHT nodes


def _dht_node(value: object) -> tuple[bytes, str, int, int]:
    if not isinstance(value, DhtNode):
        raise StoreArgumentError("nodes", f"expected DhtNode items, got {type(value).__name__}")
    node_id = _bytes("node_id", value.node_id, min_size=DHT_NODE_ID_SIZE, max_size=DHT_NODE_ID_SIZE)
    _utf8("host", value.host)
    if not 1 <= len(value.host) <= MAX_HOST_CHARS or any(c.isspace() or not c.isprintable() for c in value.host):
        raise StoreArgumentError("host", f"must be 1..{MAX_HOST_CHARS} printable characters without spaces")
    port = _int("port", value.port, low=1, high=65535)
    return node_id, value.host, port, _timestamp("last_seen", value.last_seen)


def save_dht_nodes(conn: sqlite3.Connection, nodes: Iterable[DhtNode]) -> int:
    """Replace the saved routing table with *nodes* (the :data:`MAX_DHT_NODES` most recently seen; for a node id
    given twice the most recent wins).  Return how many were saved."""
    rows = sorted((_dht_node(node) for node in nodes), key=lambda r: r[3], reverse=True)
    conn.execute("DELETE FROM dht_nodes")
    saved = 0
    for row in rows:
        if saved >= MAX_DHT_NODES:
            break
        cursor = conn.execute(
            "INSERT INTO dht_nodes (node_id, host, port, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (node_id) DO NOTHING",
            row,
        )
        saved += cursor.rowcount
    return saved


def load_dht_nodes(conn: sqlite3.Connection, *, limit: int = MAX_DHT_NODES) -> list[DhtNode]:
    """Return the saved routing table, most recently seen first."""
    rows = conn.execute(
        "SELECT node_id, host, port, last_seen FROM dht_nodes ORDER BY last_seen DESC, node_id LIMIT ?",
        (_limit(limit, high=MAX_DHT_NODES),),
    ).fetchall()
    return [DhtNode(node_id=bytes(r[0]), host=r[1], port=r[2], last_seen=r[3]) for r in rows]

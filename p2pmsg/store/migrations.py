"""Schema migrations: an ordered list of steps driven by SQLite's ``user_version``.

Theory of operation
-------------------
The schema version of a database is ``PRAGMA user_version`` (0 for a new file).  :data:`MIGRATIONS` lists the steps
in order; step *n* turns version ``n - 1`` into version *n*.  :func:`migrate` applies the missing steps one by one,
each in its own ``BEGIN IMMEDIATE`` transaction that also sets ``user_version`` (SQLite stores it in the database
header, which is written inside the transaction), so a crash leaves the database at the previous or the next version,
never in between.  The version is re-read under the write lock, so two processes opening a new file at the same time
do not both apply a step.

Before anything is written the file is checked: ``PRAGMA application_id`` must be 0 (a new file) or
:data:`APPLICATION_ID`; a version-0 file that already has tables is someone else's database; a version above the
newest step is refused with :class:`SchemaTooNewError` and the file is left untouched (this code does not know what a
newer one changed).  Steps are only ever appended: a released step is never edited, a change to the schema is a new
step.  ``docs/protocol.md (section 8)`` documents every table of every version.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Sequence
from typing import Final

from p2pmsg.store.errors import (
    ForeignDatabaseError,
    MigrationError,
    SchemaTooNewError,
    StoreArgumentError,
    StoreError,
)

__all__ = [
    "APPLICATION_ID",
    "LATEST_VERSION",
    "MIGRATIONS",
    "Migration",
    "check_database",
    "migrate",
    "schema_version",
    "unreadable_database",
]

APPLICATION_ID: Final = 0x70326D73
"""``PRAGMA application_id`` of a p2pmsg database: the ASCII bytes ``p2ms``."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    """One schema step: *statements* (one SQL statement each), then the optional Python *apply* step."""

    version: int
    description: str
    statements: tuple[str, ...]
    apply: Callable[[sqlite3.Connection], None] | None = None


_V1_STATEMENTS: Final = (
    # Identity-independent settings (a small key/value table; values are bytes, the caller picks the encoding).
    """CREATE TABLE settings (
        key        TEXT    NOT NULL PRIMARY KEY
                           CHECK (typeof(key) = 'text' AND length(key) BETWEEN 1 AND 128),
        value      BLOB    NOT NULL CHECK (typeof(value) = 'blob' AND length(value) <= 65536),
        updated_at INTEGER NOT NULL CHECK (typeof(updated_at) = 'integer')
    ) WITHOUT ROWID""",
    # Contacts and blocked peers.  A blocked stranger has no name.
    """CREATE TABLE contacts (
        peer_id    BLOB    NOT NULL PRIMARY KEY
                           CHECK (typeof(peer_id) = 'blob' AND length(peer_id) BETWEEN 1 AND 64),
        name       TEXT    COLLATE NOCASE UNIQUE
                           CHECK (name IS NULL OR (typeof(name) = 'text' AND length(name) BETWEEN 1 AND 64)),
        state      TEXT    NOT NULL CHECK (state IN ('contact', 'blocked')),
        verified   INTEGER NOT NULL DEFAULT 0 CHECK (verified IN (0, 1)),
        added_at   INTEGER NOT NULL CHECK (typeof(added_at) = 'integer'),
        updated_at INTEGER NOT NULL CHECK (typeof(updated_at) = 'integer'),
        CHECK (state = 'blocked' OR name IS NOT NULL)
    ) WITHOUT ROWID""",
    # Strangers who wrote to us; their messages are in `messages` with is_request = 1.
    """CREATE TABLE message_requests (
        peer_id       BLOB    NOT NULL PRIMARY KEY
                              CHECK (typeof(peer_id) = 'blob' AND length(peer_id) BETWEEN 1 AND 64),
        first_at      INTEGER NOT NULL CHECK (typeof(first_at) = 'integer'),
        last_at       INTEGER NOT NULL CHECK (typeof(last_at) = 'integer'),
        message_count INTEGER NOT NULL CHECK (typeof(message_count) = 'integer' AND message_count >= 0)
    ) WITHOUT ROWID""",
    "CREATE INDEX message_requests_by_last_at ON message_requests (last_at)",
    # Every message, both directions.  seq is the rowid (AUTOINCREMENT: never reused, strictly increasing).
    """CREATE TABLE messages (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id   BLOB    NOT NULL UNIQUE CHECK (typeof(message_id) = 'blob' AND length(message_id) = 16),
        conversation BLOB    NOT NULL
                             CHECK (typeof(conversation) = 'blob' AND length(conversation) BETWEEN 1 AND 64),
        direction    TEXT    NOT NULL CHECK (direction IN ('in', 'out')),
        sender       BLOB    NOT NULL CHECK (typeof(sender) = 'blob' AND length(sender) BETWEEN 1 AND 64),
        text         TEXT    NOT NULL CHECK (typeof(text) = 'text' AND length(CAST(text AS BLOB)) <= 65536),
        sent_at      INTEGER NOT NULL CHECK (typeof(sent_at) = 'integer' AND sent_at >= 0),
        stored_at    INTEGER NOT NULL CHECK (typeof(stored_at) = 'integer'),
        status       TEXT    NOT NULL,
        status_at    INTEGER NOT NULL CHECK (typeof(status_at) = 'integer'),
        is_request   INTEGER NOT NULL DEFAULT 0 CHECK (is_request IN (0, 1)),
        CHECK ((direction = 'out' AND status IN ('queued', 'sent', 'delivered', 'failed') AND is_request = 0)
            OR (direction = 'in' AND status = 'received'))
    )""",
    # History of one conversation ordered by (sent_at, seq): the rowid seq is the implicit last index column.
    "CREATE INDEX messages_by_conversation ON messages (conversation, sent_at)",
    # The inbox: incoming messages that are not requests, newest first.
    "CREATE INDEX messages_inbox ON messages (seq) WHERE direction = 'in' AND is_request = 0",
    # Outbound envelopes awaiting a delivery receipt.  Keyed by the message's seq so inserts append.
    """CREATE TABLE outbox (
        seq             INTEGER PRIMARY KEY REFERENCES messages (seq) ON DELETE CASCADE,
        message_id      BLOB    NOT NULL CHECK (typeof(message_id) = 'blob' AND length(message_id) = 16),
        recipient       BLOB    NOT NULL
                                CHECK (typeof(recipient) = 'blob' AND length(recipient) BETWEEN 1 AND 64),
        envelope        BLOB    NOT NULL
                                CHECK (typeof(envelope) = 'blob' AND length(envelope) BETWEEN 1 AND 262144),
        attempts        INTEGER NOT NULL DEFAULT 0 CHECK (typeof(attempts) = 'integer' AND attempts >= 0),
        next_attempt_at INTEGER NOT NULL CHECK (typeof(next_attempt_at) = 'integer'),
        last_error      TEXT    CHECK (last_error IS NULL OR length(last_error) <= 512),
        enqueued_at     INTEGER NOT NULL CHECK (typeof(enqueued_at) = 'integer')
    )""",
    "CREATE INDEX outbox_due ON outbox (next_attempt_at)",
    "CREATE INDEX outbox_by_recipient ON outbox (recipient)",
    # Signed peer records fetched from the DHT (already verified by the caller).
    """CREATE TABLE peer_records (
        peer_id    BLOB    NOT NULL PRIMARY KEY
                           CHECK (typeof(peer_id) = 'blob' AND length(peer_id) BETWEEN 1 AND 64),
        record     BLOB    NOT NULL CHECK (typeof(record) = 'blob' AND length(record) BETWEEN 1 AND 8192),
        seq        INTEGER NOT NULL CHECK (typeof(seq) = 'integer' AND seq >= 0),
        expires_at INTEGER NOT NULL CHECK (typeof(expires_at) = 'integer'),
        fetched_at INTEGER NOT NULL CHECK (typeof(fetched_at) = 'integer')
    )""",
    "CREATE INDEX peer_records_by_expiry ON peer_records (expires_at)",
    # The DHT routing table, saved for restarts.
    """CREATE TABLE dht_nodes (
        node_id   BLOB    NOT NULL PRIMARY KEY CHECK (typeof(node_id) = 'blob' AND length(node_id) = 20),
        host      TEXT    NOT NULL CHECK (typeof(host) = 'text' AND length(host) BETWEEN 1 AND 255),
        port      INTEGER NOT NULL CHECK (typeof(port) = 'integer' AND port BETWEEN 1 AND 65535),
        last_seen INTEGER NOT NULL CHECK (typeof(last_seen) = 'integer')
    ) WITHOUT ROWID""",
    "CREATE INDEX dht_nodes_by_last_seen ON dht_nodes (last_seen)",
)

# v2: the outbox no longer keeps a copy of the sealed envelope (nor the message id): the text is stored once, in
# `messages`, and the sender seals a fresh envelope (same id, same timestamp, new nonce) whenever it (re)sends.  The
# outbox row shrinks from ~1.3 KB to ~60 bytes for a 1 KB text, so enqueueing writes and deleting it on delivery
# touch far fewer pages.  Pending rows keep their schedule; their old envelopes are simply dropped.
_V2_STATEMENTS: Final = (
    """CREATE TABLE outbox_v2 (
        seq             INTEGER PRIMARY KEY REFERENCES messages (seq) ON DELETE CASCADE,
        recipient       BLOB    NOT NULL
                                CHECK (typeof(recipient) = 'blob' AND length(recipient) BETWEEN 1 AND 64),
        attempts        INTEGER NOT NULL DEFAULT 0 CHECK (typeof(attempts) = 'integer' AND attempts >= 0),
        next_attempt_at INTEGER NOT NULL CHECK (typeof(next_attempt_at) = 'integer'),
        last_error      TEXT    CHECK (last_error IS NULL OR length(last_error) <= 512),
        enqueued_at     INTEGER NOT NULL CHECK (typeof(enqueued_at) = 'integer')
    )""",
    """INSERT INTO outbox_v2 (seq, recipient, attempts, next_attempt_at, last_error, enqueued_at)
        SELECT seq, recipient, attempts, next_attempt_at, last_error, enqueued_at FROM outbox ORDER BY seq""",
    "DROP TABLE outbox",
    "ALTER TABLE outbox_v2 RENAME TO outbox",
    "CREATE INDEX outbox_due ON outbox (next_attempt_at)",
    "CREATE INDEX outbox_by_recipient ON outbox (recipient)",
)

# v3: the status of an outgoing message is derived.  Delivery only deletes the outbox row; it no longer rewrites the
# message row (whose page holds the whole text) with status 'delivered'.  An outgoing row whose stored status is
# 'queued' or 'sent' and that has no outbox row reads as 'delivered'; 'failed' and a v2 'delivered' stay stored.  The
# DDL does not change: the step is a version bump, so that code knowing only v2 (which would show such a row as
# queued forever) refuses the file.  Its one statement guards the new rule: a v2 file never holds a queued or sent row
# without an outbox row (v2 deleted the row only together with writing 'delivered' or 'failed'), but if one exists it
# never got a receipt, so it becomes 'failed' (status_at unchanged) rather than suddenly reading as delivered.
_V3_STATEMENTS: Final = (
    """UPDATE messages SET status = 'failed'
        WHERE direction = 'out' AND status IN ('queued', 'sent')
        AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.seq = messages.seq)""",
)

# v4: the CHECK of `messages` names the four outgoing statuses with OR instead of `status IN (...)`.  The rows and
# their meaning do not change.  SQLite evaluates a constant IN list of more than two values by building a temporary
# b-tree, once per statement execution: every outgoing row inserted (one execution each, even in executemany) paid
# for creating, filling and dropping one, about a fifth of the sender's store work per message.  A CHECK cannot be
# changed in place, so the table is rebuilt (SQLite's documented procedure), and `outbox`, which references it, with
# it: child first, so that with foreign keys on no DROP cascades.  The AUTOINCREMENT counter is carried over, so a
# seq is still never reused.
_V4_STATEMENTS: Final = (
    """CREATE TABLE messages_v4 (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id   BLOB    NOT NULL UNIQUE CHECK (typeof(message_id) = 'blob' AND length(message_id) = 16),
        conversation BLOB    NOT NULL
                             CHECK (typeof(conversation) = 'blob' AND length(conversation) BETWEEN 1 AND 64),
        direction    TEXT    NOT NULL CHECK (direction IN ('in', 'out')),
        sender       BLOB    NOT NULL CHECK (typeof(sender) = 'blob' AND length(sender) BETWEEN 1 AND 64),
        text         TEXT    NOT NULL CHECK (typeof(text) = 'text' AND length(CAST(text AS BLOB)) <= 65536),
        sent_at      INTEGER NOT NULL CHECK (typeof(sent_at) = 'integer' AND sent_at >= 0),
        stored_at    INTEGER NOT NULL CHECK (typeof(stored_at) = 'integer'),
        status       TEXT    NOT NULL,
        status_at    INTEGER NOT NULL CHECK (typeof(status_at) = 'integer'),
        is_request   INTEGER NOT NULL DEFAULT 0 CHECK (is_request IN (0, 1)),
        CHECK ((direction = 'out' AND is_request = 0
                AND (status = 'queued' OR status = 'sent' OR status = 'delivered' OR status = 'failed'))
            OR (direction = 'in' AND status = 'received'))
    )""",
    """INSERT INTO messages_v4 (seq, message_id, conversation, direction, sender, text, sent_at, stored_at, status,
        status_at, is_request)
        SELECT seq, message_id, conversation, direction, sender, text, sent_at, stored_at, status, status_at, is_request
        FROM messages ORDER BY seq""",
    "DELETE FROM sqlite_sequence WHERE name = 'messages_v4'",
    "INSERT INTO sqlite_sequence (name, seq) SELECT 'messages_v4', seq FROM sqlite_sequence WHERE name = 'messages'",
    """CREATE TABLE outbox_v4 (
        seq             INTEGER PRIMARY KEY REFERENCES messages_v4 (seq) ON DELETE CASCADE,
        recipient       BLOB    NOT NULL
                                CHECK (typeof(recipient) = 'blob' AND length(recipient) BETWEEN 1 AND 64),
        attempts        INTEGER NOT NULL DEFAULT 0 CHECK (typeof(attempts) = 'integer' AND attempts >= 0),
        next_attempt_at INTEGER NOT NULL CHECK (typeof(next_attempt_at) = 'integer'),
        last_error      TEXT    CHECK (last_error IS NULL OR length(last_error) <= 512),
        enqueued_at     INTEGER NOT NULL CHECK (typeof(enqueued_at) = 'integer')
    )""",
    # Only rows whose message exists: p2pmsg writes with foreign keys on, so it never leaves others, but a file written
    # by another program with SQLite's default (off) can hold some; they have nothing to send and would fail the copy.
    """INSERT INTO outbox_v4 (seq, recipient, attempts, next_attempt_at, last_error, enqueued_at)
        SELECT seq, recipient, attempts, next_attempt_at, last_error, enqueued_at FROM outbox
        WHERE seq IN (SELECT seq FROM messages_v4) ORDER BY seq""",
    "DROP TABLE outbox",
    "DROP TABLE messages",
    "ALTER TABLE messages_v4 RENAME TO messages",
    "ALTER TABLE outbox_v4 RENAME TO outbox",
    "CREATE INDEX messages_by_conversation ON messages (conversation, sent_at)",
    "CREATE INDEX messages_inbox ON messages (seq) WHERE direction = 'in' AND is_request = 0",
    "CREATE INDEX outbox_due ON outbox (next_attempt_at)",
    "CREATE INDEX outbox_by_recipient ON outbox (recipient)",
)


_V5_STATEMENTS: Final = (
    # The text bytes of each pending request, kept with its row: the admission check reads one row (and the sum over
    # the requests) instead of every pending message (7.5 ms per stranger batch once the request store was full).
    """ALTER TABLE message_requests ADD COLUMN
        text_bytes INTEGER NOT NULL DEFAULT 0 CHECK (typeof(text_bytes) = 'integer' AND text_bytes >= 0)""",
)


def _count_request_bytes(conn: sqlite3.Connection) -> None:
    """Step 5's Python part: fill ``text_bytes`` from the pending request messages, in one scan of ``messages``
    without an index.  A query that used one would make the ``PRAGMA optimize`` at close run ``ANALYZE`` on every
    new database, writing statistics of empty tables into it."""
    totals = conn.execute(
        "SELECT conversation, sum(length(CAST(text AS BLOB))) FROM messages NOT INDEXED WHERE is_request = 1 "
        "GROUP BY conversation" + _TAG
    ).fetchall()
    conn.executemany("UPDATE message_requests SET text_bytes = ? WHERE peer_id = ?" + _TAG, [(b, c) for c, b in totals])


def _check_outbox_parent(conn: sqlite3.Connection) -> None:
    """Step 4's last check: the rebuilt outbox references ``messages`` (the rename carried the reference over)."""
    parents = {str(row[2]) for row in conn.execute("PRAGMA foreign_key_list(outbox)" + _TAG)}
    if parents != {"messages"}:
        raise sqlite3.DatabaseError(f"the rebuilt outbox references {sorted(parents)}, not messages")


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        version=1,
        description="settings, contacts, message requests, messages, outbox, peer record cache, DHT nodes",
        statements=_V1_STATEMENTS,
    ),
    Migration(
        version=2,
        description="outbox without the sealed envelope: the text is stored once and sealed again on each send",
        statements=_V2_STATEMENTS,
    ),
    Migration(
        version=3,
        description="derived delivery: a queued or sent message without an outbox row is delivered",
        statements=_V3_STATEMENTS,
    ),
    Migration(
        version=4,
        description="the messages CHECK without an IN list (no temporary b-tree per outgoing row)",
        statements=_V4_STATEMENTS,
        apply=_check_outbox_parent,
    ),
    Migration(
        version=5,
        description="message_requests.text_bytes: the pending text bytes of each request, kept up to date",
        statements=_V5_STATEMENTS,
        apply=_count_request_bytes,
    ),
)
"""Every schema step, oldest first; ``MIGRATIONS[i].version == i + 1``."""

LATEST_VERSION: Final = MIGRATIONS[-1].version
"""The schema version this code creates and expects."""

# Our own statements carry this comment so that a caller's identical-looking SQL never reuses a cached statement
# prepared under the store's own authority (see db.py, the authorizer).
_TAG: Final = " /* p2pmsg.store */"


def schema_version(conn: sqlite3.Connection) -> int:
    """Return ``PRAGMA user_version`` of *conn*'s main database."""
    row = conn.execute("PRAGMA user_version" + _TAG).fetchone()
    return int(row[0])


def _application_id(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA application_id" + _TAG).fetchone()
    return int(row[0])


def _has_tables(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'" + _TAG
    ).fetchone()
    return int(row[0]) > 0


def _check_list(migrations: Sequence[Migration]) -> int:
    if not migrations:
        raise StoreArgumentError("migrations", "the list of migration steps is empty")
    for index, step in enumerate(migrations):
        if step.version != index + 1:
            raise StoreArgumentError(
                "migrations", f"step {index} has version {step.version}, expected {index + 1} (no gaps, oldest first)"
            )
    return migrations[-1].version


def unreadable_database(exc: sqlite3.DatabaseError, where: str = "") -> StoreError:
    """The error for a database file SQLite could not open or read: :class:`ForeignDatabaseError` only when SQLite
    says the file is not a database or is damaged; otherwise (a full disk, an I/O error, no permission) a plain
    :class:`StoreError` that does not suggest the file is bad (a QA pass: a node on a full disk said "not a usable
    SQLite database" about a sound file, because SQLite could not size its shared-memory file)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
        return ForeignDatabaseError(f"{where}not a usable SQLite database: {exc}")
    hint = ""
    if primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN):
        hint = " (the file itself may be sound: is the disk full? free some room, then start again)"
    return StoreError(f"{where}cannot open the database: {exc}{hint}")


def check_database(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS, where: str = "") -> int:
    """Check, without writing, that *conn* is a p2pmsg database this code can open; return its schema version.

    Raises :class:`ForeignDatabaseError` for a file that is not SQLite or belongs to another application, and
    :class:`SchemaTooNewError` for a schema newer than the last of *migrations*; a file SQLite cannot read for
    another reason (a full disk) is a plain :class:`StoreError` (see :func:`unreadable_database`), its message
    starting with *where* (the file's name).
    """
    latest = _check_list(migrations)
    try:
        app_id = _application_id(conn)
        version = schema_version(conn)
        has_tables = _has_tables(conn)
    except sqlite3.DatabaseError as exc:
        raise unreadable_database(exc, where) from exc
    if app_id not in (0, APPLICATION_ID):
        raise ForeignDatabaseError(
            f"database belongs to another application (application_id {app_id:#010x}, "
            f"p2pmsg uses {APPLICATION_ID:#010x})"
        )
    if version == 0 and has_tables:
        raise ForeignDatabaseError("database has tables but no p2pmsg schema version (user_version is 0)")
    if version > latest:
        raise SchemaTooNewError(found=version, supported=latest)
    return version


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Apply the missing steps of *migrations* to *conn*, each in its own transaction; return the final version.

    *conn* must be in autocommit mode (``isolation_level=None``) and not inside a transaction.  A failing step is
    rolled back and raises :class:`MigrationError` (the version stays at the last step that succeeded).  The steps
    run with ``foreign_keys`` on and ``legacy_alter_table`` off, whatever *conn* had; both are restored after.
    """
    latest = _check_list(migrations)
    if conn.in_transaction:
        raise StoreArgumentError("conn", "migrate() needs a connection that is not inside a transaction")
    check_database(conn, migrations)
    # Step 4 renames a parent table and relies on SQLite rewriting the child's REFERENCES with it: that needs
    # foreign keys on (SQLite 3.24 and 3.25) and the modern ALTER TABLE (legacy_alter_table off, 3.26 and later).
    # Neither can change inside a transaction.  Both are given back as the caller had them (SQLite before 3.25 has
    # no legacy_alter_table: nothing to set or give back).
    foreign_keys = conn.execute("PRAGMA foreign_keys" + _TAG).fetchone()
    legacy_alter = conn.execute("PRAGMA legacy_alter_table" + _TAG).fetchone()
    conn.execute("PRAGMA foreign_keys = ON" + _TAG)
    conn.execute("PRAGMA legacy_alter_table = OFF" + _TAG)
    try:
        return _migrate_steps(conn, migrations, latest)
    finally:
        for name, before in (("foreign_keys", foreign_keys), ("legacy_alter_table", legacy_alter)):
            if before is not None and before[0]:
                conn.execute(f"PRAGMA {name} = ON" + _TAG)
            elif before is not None:
                conn.execute(f"PRAGMA {name} = OFF" + _TAG)


def _migrate_steps(conn: sqlite3.Connection, migrations: Sequence[Migration], latest: int) -> int:
    while True:
        conn.execute("BEGIN IMMEDIATE" + _TAG)
        try:
            # Re-check under the write lock: another process may have migrated in the meantime.
            version = check_database(conn, migrations)
            if version == latest:
                conn.execute("COMMIT" + _TAG)
                return version
            step = migrations[version]
            try:
                for statement in step.statements:
                    conn.execute(statement)
                if step.apply is not None:
                    step.apply(conn)
                # PRAGMA values cannot be bound parameters; both are integers from this module.
                conn.execute(f"PRAGMA user_version = {int(step.version)}" + _TAG)
                if version == 0:
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}" + _TAG)
                conn.execute("COMMIT" + _TAG)
            except sqlite3.Error as exc:
                raise MigrationError(
                    f"migration to schema version {step.version} ({step.description}) failed: {exc}"
                ) from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK" + _TAG)
            raise

"""Schema migrations: creation from empty, re-open, refusing newer or foreign files, step-by-step upgrades."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from p2pmsg.store import open_database, repo
from p2pmsg.store.errors import (
    ForeignDatabaseError,
    MigrationError,
    SchemaTooNewError,
    StoreArgumentError,
)
from p2pmsg.store.migrations import APPLICATION_ID, LATEST_VERSION, MIGRATIONS, Migration, migrate, schema_version

T0 = 1_700_000_000_000

EXPECTED_TABLES = {"settings", "contacts", "message_requests", "messages", "outbox", "peer_records", "dht_nodes"}
EXPECTED_INDEXES = {
    "message_requests_by_last_at",
    "messages_by_conversation",
    "messages_inbox",
    "outbox_due",
    "outbox_by_recipient",
    "peer_records_by_expiry",
    "dht_nodes_by_last_seen",
}


def _schema(path: Path) -> tuple[int, int, set[str], set[str]]:
    with sqlite3.connect(path) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        indexes = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        }
    conn.close()
    return version, app_id, tables - {"sqlite_sequence"}, indexes


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_creates_schema_from_empty_and_reopens_without_change(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    async with open_database(path) as db:
        assert db.schema_version == LATEST_VERSION == len(MIGRATIONS)
        await db.write(lambda c: repo.add_contact(c, peer_id=b"\x01" * 38, name="bob", now=T0))
    assert _schema(path) == (LATEST_VERSION, APPLICATION_ID, EXPECTED_TABLES, EXPECTED_INDEXES)
    async with open_database(path) as db:
        assert db.schema_version == LATEST_VERSION
        contact = await db.read(lambda c: repo.find_contact(c, "bob"))
        assert contact is not None and contact.peer_id == b"\x01" * 38
    assert _schema(path)[0] == LATEST_VERSION


async def test_refuses_a_newer_schema_and_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    async with open_database(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
        conn.execute("PRAGMA journal_mode = DELETE")  # as a newer p2pmsg might leave it
    conn.close()
    before = _digest(path)
    with pytest.raises(SchemaTooNewError) as info:
        async with open_database(path):
            pytest.fail("opened a database newer than the code")
    assert (info.value.found, info.value.supported) == (LATEST_VERSION + 1, LATEST_VERSION)
    assert "upgrade p2pmsg" in str(info.value)
    assert _digest(path) == before
    assert not Path(str(path) + "-wal").exists()


async def test_refuses_a_database_of_another_application(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA application_id = 1234")
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    before = _digest(path)
    with pytest.raises(ForeignDatabaseError, match="another application"):
        async with open_database(path):
            pass
    assert _digest(path) == before


async def test_refuses_tables_without_a_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "unversioned.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (x)")
    conn.close()
    with pytest.raises(ForeignDatabaseError, match="no p2pmsg schema version"):
        async with open_database(path):
            pass


async def test_refuses_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"definitely not an SQLite database file" * 200)
    before = _digest(path)
    with pytest.raises(ForeignDatabaseError, match="not a usable SQLite database"):
        async with open_database(path):
            pass
    assert _digest(path) == before


# --------------------------------------------------------------------------------------------------- the machinery

# The machinery is exercised with made-up steps on top of the real first one.
V1 = MIGRATIONS[:1]

V2 = Migration(
    version=2,
    description="add contacts.note",
    statements=("ALTER TABLE contacts ADD COLUMN note TEXT",),
)


def _mark_migrated(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO settings VALUES ('v3-ran', x'01', 0)")


V3 = Migration(
    version=3,
    description="a Python step",
    statements=("CREATE TABLE extra (x INTEGER)",),
    apply=_mark_migrated,
)


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_migrates_step_by_step_from_an_older_version(tmp_path: Path) -> None:
    conn = _connect(tmp_path / "old.db")
    assert migrate(conn, V1) == 1
    repo.add_contact(conn, peer_id=b"\x01" * 38, name="bob", now=T0)
    assert migrate(conn, (*V1, V2, V3)) == 3
    assert schema_version(conn) == 3
    assert conn.execute("SELECT name, note FROM contacts").fetchall() == [("bob", None)]
    assert conn.execute("SELECT value FROM settings WHERE key = 'v3-ran'").fetchone() == (b"\x01",)
    assert migrate(conn, (*V1, V2, V3)) == 3  # nothing left to do
    conn.close()


def test_failing_step_is_rolled_back_and_earlier_steps_kept(tmp_path: Path) -> None:
    broken = Migration(
        version=3,
        description="broken",
        statements=("CREATE TABLE half_done (x)", "ALTER TABLE no_such_table ADD COLUMN y"),
    )
    conn = _connect(tmp_path / "broken.db")
    with pytest.raises(MigrationError, match=r"version 3 \(broken\)"):
        migrate(conn, (*V1, V2, broken))
    assert schema_version(conn) == 2
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0
    assert not conn.in_transaction
    conn.close()


def test_python_step_exception_rolls_back(tmp_path: Path) -> None:
    def explode(conn: sqlite3.Connection) -> None:
        raise RuntimeError("data migration failed")

    conn = _connect(tmp_path / "py.db")
    with pytest.raises(RuntimeError, match="data migration failed"):
        migrate(
            conn,
            (*V1, Migration(version=2, description="x", statements=("CREATE TABLE t (x)",), apply=explode)),
        )
    assert schema_version(conn) == 1
    conn.close()


async def test_open_database_applies_given_migrations(tmp_path: Path) -> None:
    path = tmp_path / "up.db"
    async with open_database(path, migrations=V1) as db:
        assert db.schema_version == 1
    async with open_database(path, migrations=(*V1, V2)) as db:
        assert db.schema_version == 2
        assert await db.read(lambda c: [r[1] for r in c.execute("PRAGMA table_info(contacts)")][-1]) == "note"
    # The older code now refuses the file.
    with pytest.raises(SchemaTooNewError):
        async with open_database(path, migrations=V1):
            pass


@pytest.mark.parametrize(
    "steps",
    [
        (),
        (V2,),
        (*V1, V3),
        (*V1, V2, V2),
    ],
    ids=["empty", "starts-at-2", "gap", "duplicate"],
)
def test_migration_list_must_be_contiguous(tmp_path: Path, steps: tuple[Migration, ...]) -> None:
    conn = _connect(tmp_path / "x.db")
    with pytest.raises(StoreArgumentError, match="migrations"):
        migrate(conn, steps)
    assert schema_version(conn) == 0
    conn.close()


def test_schema_checks_back_the_repository_limits(tmp_path: Path) -> None:
    """The CHECK constraints refuse bad rows even when the repository is bypassed."""
    conn = _connect(tmp_path / "checks.db")
    migrate(conn)
    bad_statements = [
        "INSERT INTO messages (message_id, conversation, direction, sender, text, sent_at, stored_at, status,"
        " status_at) VALUES (x'00', x'01', 'in', x'01', 't', 1, 1, 'received', 1)",
        "INSERT INTO messages (message_id, conversation, direction, sender, text, sent_at, stored_at, status,"
        " status_at) VALUES (zeroblob(16), x'01', 'in', x'01', 't', 1, 1, 'queued', 1)",
        "INSERT INTO messages (message_id, conversation, direction, sender, text, sent_at, stored_at, status,"
        " status_at, is_request) VALUES (zeroblob(16), x'01', 'out', x'01', 't', 1, 1, 'queued', 1, 1)",
        "INSERT INTO messages (message_id, conversation, direction, sender, text, sent_at, stored_at, status,"
        " status_at) VALUES ('sixteen chars!!!', x'01', 'in', x'01', 't', 1, 1, 'received', 1)",
        "INSERT INTO contacts VALUES (x'01', NULL, 'contact', 0, 1, 1)",
        "INSERT INTO contacts VALUES (x'01', 'n', 'friend', 0, 1, 1)",
        "INSERT INTO dht_nodes VALUES (zeroblob(20), 'h', 70000, 1)",
    ]
    for statement in bad_statements:
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(statement)
    conn.close()


def _v1_database(path: Path) -> None:
    """A schema-v1 file as the previous release left it: two pending outbound messages (with their envelopes in
    the outbox, one already attempted) and one delivered."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(conn, MIGRATIONS[:1]) == 1
        bob = b"\x02" * 38
        for n, status in ((1, "sent"), (2, "queued"), (3, "delivered")):
            conn.execute(
                "INSERT INTO messages (seq, message_id, conversation, direction, sender, text, sent_at, stored_at,"
                " status, status_at, is_request) VALUES (?, ?, ?, 'out', ?, ?, ?, ?, ?, ?, 0)",
                (n, bytes([n]) * 16, bob, b"\x01" * 38, f"text {n}", T0 + n, T0 + n, status, T0 + n),
            )
            if status != "delivered":
                conn.execute(
                    "INSERT INTO outbox (seq, message_id, recipient, envelope, attempts, next_attempt_at, last_error,"
                    " enqueued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (n, bytes([n]) * 16, bob, b"\xee" * 1300, 2 - n, T0 + 100 * n, "refused" if n == 1 else None, T0),
                )
    finally:
        conn.close()


async def test_v1_to_v2_keeps_pending_messages_and_drops_the_envelope_copies(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    _v1_database(path)
    async with open_database(path, migrations=MIGRATIONS[:2]) as db:
        assert db.schema_version == 2
        due = await db.read(lambda c: repo.due_round(c, now=T0 + 1000).entries)
        columns = await db.read(lambda c: [r[1] for r in c.execute("PRAGMA table_info(outbox)")])
        delivered = await db.read(lambda c: repo.get_message(c, b"\x03" * 16))
    assert columns == ["seq", "recipient", "attempts", "next_attempt_at", "last_error", "enqueued_at"]
    assert [(e.seq, e.message_id, e.text, e.sent_at, e.attempts, e.next_attempt_at, e.last_error) for e in due] == [
        (1, b"\x01" * 16, "text 1", T0 + 1, 1, T0 + 100, "refused"),
        (2, b"\x02" * 16, "text 2", T0 + 2, 0, T0 + 200, None),
    ]
    assert delivered is not None and delivered.text == "text 3"
    assert _schema(path) == (2, APPLICATION_ID, EXPECTED_TABLES, EXPECTED_INDEXES)
    # The rebuilt outbox still belongs to its messages: deleting a message removes its row.
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("DELETE FROM messages WHERE seq = 1")
        assert [r[0] for r in conn.execute("SELECT seq FROM outbox")] == [2]
    conn.close()


def _v2_database(path: Path) -> None:
    """A schema-v2 file as the previous release left it (4096-byte pages, WAL): outgoing messages pending (queued,
    sent), delivered and failed, incoming ones (one a request), and one queued row without an outbox row (which v2
    never wrote)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA page_size = 4096")
        assert conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
        assert migrate(conn, MIGRATIONS[:2]) == 2
        bob = b"\x02" * 38
        rows = ((1, "out", "sent", 0), (2, "out", "queued", 0), (3, "out", "delivered", 0), (4, "out", "failed", 0))
        rows += ((5, "in", "received", 0), (6, "in", "received", 1), (7, "out", "queued", 0))
        for n, direction, status, request in rows:
            conn.execute(
                "INSERT INTO messages (seq, message_id, conversation, direction, sender, text, sent_at, stored_at,"
                " status, status_at, is_request) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (n, bytes([n]) * 16, bob, direction, bob if direction == "in" else b"\x01" * 38, f"text {n}",
                 T0 + n, T0 + n, status, T0 + 10 * n, request),
            )  # fmt: skip
            if n in (1, 2):
                conn.execute(
                    "INSERT INTO outbox (seq, recipient, attempts, next_attempt_at, last_error, enqueued_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (n, bob, 2 - n, T0 + 100 * n, "refused" if n == 1 else None, T0),
                )
        conn.execute("INSERT INTO message_requests VALUES (?, ?, ?, 1)", (bob, T0, T0))
    finally:
        conn.close()


async def test_v2_to_v3_keeps_every_row_status_and_page_size(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    _v2_database(path)
    with sqlite3.connect(path) as conn:
        before = conn.execute("SELECT * FROM messages ORDER BY seq").fetchall()
        outbox = conn.execute("SELECT * FROM outbox ORDER BY seq").fetchall()
    conn.close()
    async with open_database(path, migrations=MIGRATIONS[:3]) as db:
        assert db.schema_version == 3
        messages = await db.read(lambda c: [repo.get_message(c, bytes([n]) * 16) for n in range(1, 8)])
        history = await db.read(lambda c: repo.history(c, b"\x02" * 38))
        due = await db.read(lambda c: repo.due_round(c, now=T0 + 1000).entries)
        page_size = await db.read(lambda c: c.execute("PRAGMA page_size").fetchone()[0])
    assert page_size == 4096  # a WAL file keeps its page size
    statuses = ["sent", "queued", "delivered", "failed", "received", "received", "failed"]
    assert [(m.status.value, m.status_at) for m in messages if m is not None] == [
        (s, T0 + 10 * n) for n, s in enumerate(statuses, 1)
    ]
    assert [m.seq for m in history] == [1, 2, 3, 4, 5, 6, 7]
    assert [(e.seq, e.attempts, e.next_attempt_at, e.last_error) for e in due] == [
        (1, 1, T0 + 100, "refused"),
        (2, 0, T0 + 200, None),
    ]
    with sqlite3.connect(path) as conn:
        after = conn.execute("SELECT * FROM messages ORDER BY seq").fetchall()
        assert conn.execute("SELECT * FROM outbox ORDER BY seq").fetchall() == outbox
    conn.close()
    # Every row is kept unchanged except the queued one without an outbox row: it never got a receipt.
    assert after[:6] == before[:6]
    assert after[6] == (*before[6][:8], "failed", *before[6][9:])
    assert _schema(path) == (3, APPLICATION_ID, EXPECTED_TABLES, EXPECTED_INDEXES)
    # The previous release refuses the file rather than show delivered messages as queued.
    with pytest.raises(SchemaTooNewError):
        async with open_database(path, migrations=MIGRATIONS[:2]):
            pass


async def test_new_database_files_get_16_kib_pages(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    async with open_database(path) as db:
        await db.write(lambda c: repo.add_contact(c, peer_id=b"\x01" * 38, name="bob", now=T0))
        assert await db.read(lambda c: c.execute("PRAGMA page_size").fetchone()[0]) == 16384
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 16384
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert int.from_bytes(path.read_bytes()[16:18], "big") == 16384  # the header field itself


async def test_v3_to_v4_rebuilds_messages_and_outbox_keeping_rows_links_and_the_counter(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    _v2_database(path)
    async with open_database(path, migrations=MIGRATIONS[:3]) as db:
        assert db.schema_version == 3
    with sqlite3.connect(path, isolation_level=None) as conn:
        # A message that was stored and deleted again: AUTOINCREMENT must not hand its seq out a second time.
        conn.execute(
            "INSERT INTO messages (seq, message_id, conversation, direction, sender, text, sent_at, stored_at, status,"
            " status_at) VALUES (9, ?, ?, 'in', ?, 'gone', 1, 1, 'received', 1)",
            (b"\x09" * 16, b"\x02" * 38, b"\x02" * 38),
        )
        conn.execute("DELETE FROM messages WHERE seq = 9")
        messages = conn.execute("SELECT * FROM messages ORDER BY seq").fetchall()
        outbox = conn.execute("SELECT * FROM outbox ORDER BY seq").fetchall()
        assert conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone() == (9,)
    conn.close()
    async with open_database(path, migrations=MIGRATIONS[:4]) as db:
        assert db.schema_version == 4
        seqs = await db.write(
            lambda c: repo.enqueue_rows(c, [(b"\x0a" * 16, b"\x02" * 38, b"\x01" * 38, "new", T0, None)], now=T0)
        )
    assert seqs == [10]
    with sqlite3.connect(path, isolation_level=None) as conn:
        assert conn.execute("SELECT * FROM messages WHERE seq < 10 ORDER BY seq").fetchall() == messages
        assert conn.execute("SELECT * FROM outbox WHERE seq < 10 ORDER BY seq").fetchall() == outbox
        assert conn.execute("SELECT name, seq FROM sqlite_sequence").fetchall() == [("messages", 10)]
        table_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
        assert "status IN" not in table_sql and "messages_v4" not in table_sql
        assert [r[2] for r in conn.execute("PRAGMA foreign_key_list(outbox)")] == ["messages"]
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("DELETE FROM messages WHERE seq = 1")  # the outbox row goes with its message
        assert [r[0] for r in conn.execute("SELECT seq FROM outbox ORDER BY seq")] == [2, 10]
        for direction, status in (("out", "received"), ("out", "bogus"), ("in", "queued")):
            with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
                conn.execute(
                    "INSERT INTO messages (message_id, conversation, direction, sender, text, sent_at, stored_at,"
                    " status, status_at) VALUES (?, ?, ?, ?, 'x', 1, 1, ?, 1)",
                    (b"\x0b" * 16, b"\x02" * 38, direction, b"\x02" * 38, status),
                )
    conn.close()
    assert _schema(path) == (4, APPLICATION_ID, EXPECTED_TABLES, EXPECTED_INDEXES)
    with pytest.raises(SchemaTooNewError):
        async with open_database(path, migrations=MIGRATIONS[:3]):
            pass


@pytest.mark.parametrize(("foreign_keys", "legacy_alter_table"), [(0, 0), (0, 1), (1, 1), (1, 0)])
def test_step_4_keeps_the_outbox_linked_whatever_the_connection_settings(
    tmp_path: Path, foreign_keys: int, legacy_alter_table: int
) -> None:
    """Step 4 renames the parent of ``outbox``; SQLite carries the child's REFERENCES over only with foreign keys on
    (3.24, 3.25) or the modern ALTER TABLE.  migrate() runs its steps that way and gives the caller's settings back."""
    conn = sqlite3.connect(tmp_path / "v3.db", isolation_level=None)
    migrate(conn, MIGRATIONS[:3])
    conn.execute(f"PRAGMA foreign_keys = {foreign_keys}")
    conn.execute(f"PRAGMA legacy_alter_table = {legacy_alter_table}")
    assert migrate(conn) == LATEST_VERSION
    assert [r[2] for r in conn.execute("PRAGMA foreign_key_list(outbox)")] == ["messages"]
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (foreign_keys,)
    assert conn.execute("PRAGMA legacy_alter_table").fetchone() == (legacy_alter_table,)
    conn.execute("PRAGMA foreign_keys = ON")
    repo.enqueue_rows(conn, [(b"\x01" * 16, b"\x02" * 38, b"\x03" * 38, "x", T0, None)], now=T0)
    assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (1,)
    conn.close()


def test_step_4_drops_outbox_rows_without_a_message(tmp_path: Path) -> None:
    """Another program writing with foreign keys off (SQLite's default) can leave an outbox row whose message is
    gone; step 4 copies only rows with a message, instead of failing and leaving the node unable to open its file."""
    conn = sqlite3.connect(tmp_path / "v3.db", isolation_level=None)
    migrate(conn, MIGRATIONS[:3])
    conn.execute("PRAGMA foreign_keys = ON")
    repo.enqueue_rows(conn, [(b"\x01" * 16, b"\x02" * 38, b"\x03" * 38, "kept", T0, None)], now=T0)
    repo.enqueue_rows(conn, [(b"\x04" * 16, b"\x02" * 38, b"\x03" * 38, "orphaned", T0, None)], now=T0)
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("DELETE FROM messages WHERE text = 'orphaned'")
    assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (2,)
    assert migrate(conn) == LATEST_VERSION
    assert conn.execute("SELECT m.text FROM outbox JOIN messages AS m USING (seq)").fetchall() == [("kept",)]
    assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (1,)
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()


def test_step_4_refuses_to_commit_an_outbox_that_lost_its_parent(tmp_path: Path) -> None:
    """The step's own last check: if a rename ever left the rebuilt outbox pointing elsewhere, the step rolls back."""
    conn = sqlite3.connect(tmp_path / "v3.db", isolation_level=None)
    migrate(conn, MIGRATIONS[:3])
    elsewhere = (
        "CREATE TABLE other (seq INTEGER PRIMARY KEY)",
        "CREATE TABLE outbox_x (seq INTEGER PRIMARY KEY REFERENCES other (seq), recipient BLOB)",
        "DROP TABLE outbox",
        "ALTER TABLE outbox_x RENAME TO outbox",
    )
    broken = Migration(
        version=4,
        description="step 4 with the outbox pointing elsewhere at the end",
        statements=(*MIGRATIONS[3].statements, *elsewhere),
        apply=MIGRATIONS[3].apply,
    )
    with pytest.raises(MigrationError, match="references"):
        migrate(conn, (*MIGRATIONS[:3], broken))
    assert schema_version(conn) == 3
    conn.close()


async def test_v4_to_v5_counts_the_text_bytes_of_each_pending_request(tmp_path: Path) -> None:
    """Step 5 fills message_requests.text_bytes from the pending request messages (UTF-8 bytes, not characters),
    without writing statistics; afterwards the store keeps it up to date."""
    path = tmp_path / "v4.db"
    stranger, other, friend = b"\x05" * 38, b"\x06" * 38, b"\x07" * 38
    async with open_database(path, migrations=MIGRATIONS[:4]) as db:
        assert db.schema_version == 4
    with sqlite3.connect(path, isolation_level=None) as conn:  # rows as version-4 code wrote them
        for i, (peer, text, request) in enumerate(
            [(stranger, "héllo", 1), (stranger, "😀", 1), (other, "x" * 100, 1), (friend, "hi", 0)]
        ):
            conn.execute(
                "INSERT INTO messages (message_id, conversation, direction, sender, text, sent_at, stored_at, status,"
                " status_at, is_request) VALUES (?, ?, 'in', ?, ?, 1, 1, 'received', 1, ?)",
                (bytes([i + 1]) * 16, peer, peer, text, request),
            )
        conn.executemany(
            "INSERT INTO message_requests (peer_id, first_at, last_at, message_count) VALUES (?, 1, 1, ?)",
            [(stranger, 2), (other, 1)],
        )
    conn.close()
    async with open_database(path) as db:
        assert db.schema_version == 5 == LATEST_VERSION
        assert await db.read(lambda c: repo.request_bytes(c)) == 6 + 4 + 100
        assert await db.read(lambda c: repo.request_bytes(c, stranger)) == 10
        assert await db.read(lambda c: repo.request_bytes(c, friend)) == 0
    assert _schema(path) == (5, APPLICATION_ID, EXPECTED_TABLES, EXPECTED_INDEXES)  # the step wrote no sqlite_stat1
    async with open_database(path) as db:
        await db.write(
            lambda c: repo.insert_incoming(
                c, message_id=b"\x09" * 16, sender=other, text="ab", sent_at=T0, now=T0, is_request=True
            )
        )
        assert await db.read(lambda c: repo.request_bytes(c, other)) == 102
        await db.write(lambda c: repo.reject_request(c, other, block=False, now=T0))
        assert await db.read(lambda c: repo.request_bytes(c)) == 10

"""The worked example of the store section (docs/protocol.md 8.7) is what the repository functions write."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from p2pmsg.identity import Identity
from p2pmsg.store import repo
from p2pmsg.store.migrations import migrate
from p2pmsg.store.models import Backoff, MessageStatus

DOCS = Path(__file__).resolve().parents[3] / "docs"
ALICE = Identity.from_seed(bytes(range(32))).peer_id.to_bytes()
BOB = Identity.from_seed(b"\x01" * 32).peer_id.to_bytes()
MESSAGE_ID = bytes(range(16))
T = 1_700_000_000_000


def _section_8_7() -> str:
    text = (DOCS / "protocol.md").read_text()
    start = text.index("### 8.7 Worked example")
    end = text.find("\n## ", start)
    return " ".join(text[start : None if end < 0 else end].split())


def test_worked_example_8_7() -> None:
    doc = _section_8_7()
    assert ALICE.hex() in doc and BOB.hex() in doc and MESSAGE_ID.hex() in doc
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn)
    repo.enqueue(conn, message_id=MESSAGE_ID, recipient=BOB, sender=ALICE, text="hi bob", sent_at=T, now=T + 3)
    assert conn.execute("SELECT * FROM messages").fetchall() == [
        (1, MESSAGE_ID, BOB, "out", ALICE, "hi bob", T, T + 3, "queued", T + 3, 0)
    ]
    assert conn.execute("SELECT * FROM outbox").fetchall() == [(1, BOB, 0, T + 3, None, T + 3)]
    assert conn.execute("SELECT * FROM sqlite_sequence").fetchall() == [("messages", 1)]
    assert "status='queued' status_at=1700000000003" in doc

    no_jitter = Backoff(jitter=0.0)
    error = "dial 127.0.0.1:4001: connection refused"
    assert repo.reschedule(conn, MESSAGE_ID, now=T + 10, error=error, backoff=no_jitter) == T + 1010
    assert repo.reschedule(conn, MESSAGE_ID, now=T + 1010, error=error, backoff=no_jitter) == T + 3010
    assert f"last_error='{error}'" in doc and "`attempts=2`, `next_attempt_at` = 1700000003010" in doc
    assert repo.mark_sent(conn, MESSAGE_ID, now=T + 3100, retry_at=T + 33100) is True
    assert conn.execute("SELECT attempts, next_attempt_at, last_error FROM outbox").fetchall() == [(3, T + 33100, None)]
    assert "`attempts=3`, `next_attempt_at=1700000033100`, `last_error=NULL`" in doc

    # The receipt deletes the outbox row and leaves the message row as it was ("sent" at ...3100): delivered.
    assert repo.mark_delivered(conn, MESSAGE_ID, recipient=BOB, now=T + 3105) is True
    assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
    assert conn.execute("SELECT status, status_at FROM messages").fetchall() == [("sent", T + 3100)]
    message = repo.get_message(conn, MESSAGE_ID)
    assert message is not None and message.status is MessageStatus.DELIVERED
    assert "it keeps `status='sent'`, `status_at=1700000003100`), so the message reads as `delivered`" in doc
    assert repo.mark_delivered(conn, MESSAGE_ID, recipient=BOB, now=T + 3200) is False
    conn.close()

"""Schema v3: delivery deletes the outbox row only, and every read path derives ``delivered`` from its absence."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator

import pytest

from p2pmsg.store import repo
from p2pmsg.store.migrations import migrate
from p2pmsg.store.models import IncomingMessage, MessageStatus, OutgoingMessage

ME = b"\x00\x24" + bytes(range(36))
BOB = b"\x00\x24" + bytes(range(1, 37))
CAROL = b"\x00\x24" + bytes(range(2, 38))
T0 = 1_700_000_000_000

DUMP_MESSAGES = "SELECT * FROM messages ORDER BY seq"
DUMP_OUTBOX = "SELECT * FROM outbox ORDER BY seq"


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


@pytest.fixture
def conn() -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(":memory:", isolation_level=None)
    c.execute("PRAGMA foreign_keys = ON")
    migrate(c)
    yield c
    c.close()


def _one(conn: sqlite3.Connection, m: bytes, peer: bytes, now: int) -> int:
    return int(repo.mark_delivered(conn, m, recipient=peer, now=now))


def _many(conn: sqlite3.Connection, m: bytes, peer: bytes, now: int) -> int:
    return repo.mark_delivered_many(conn, [m], recipient=peer, now=now)


def _ids(conn: sqlite3.Connection, m: bytes, peer: bytes, now: int) -> int:
    return len(repo.mark_delivered_ids(conn, [m], recipient=peer, now=now))


DELIVER: dict[str, Callable[[sqlite3.Connection, bytes, bytes, int], int]] = {
    "mark_delivered": _one,
    "mark_delivered_many": _many,
    "mark_delivered_ids": _ids,
}


def _raw_status(conn: sqlite3.Connection, m: bytes) -> tuple[str, int]:
    row = conn.execute("SELECT status, status_at FROM messages WHERE message_id = ?", (m,)).fetchone()
    return row[0], row[1]


def _setup(conn: sqlite3.Connection) -> None:
    """mid(1) queued, mid(2) sent, mid(3) sent and staying pending, mid(4) incoming from Bob."""
    repo.enqueue_many(
        conn,
        [
            OutgoingMessage(message_id=mid(n), recipient=BOB, sender=ME, text=f"out {n}", sent_at=T0 + n)
            for n in (1, 2, 3)
        ],
        now=T0,
    )
    assert repo.mark_sent_many(conn, [mid(2), mid(3)], now=T0 + 10, retry_at=T0 + 30_000) == 2
    repo.insert_incoming_many(conn, [IncomingMessage(message_id=mid(4), sender=BOB, text="in", sent_at=T0 + 4)], now=T0)


@pytest.mark.parametrize("how", list(DELIVER))
def test_delivery_deletes_the_outbox_row_and_leaves_the_message_row_alone(conn: sqlite3.Connection, how: str) -> None:
    _setup(conn)
    before = conn.execute(DUMP_MESSAGES).fetchall()
    assert DELIVER[how](conn, mid(1), BOB, T0 + 20) == 1  # a receipt overtaking the "sent" mark
    assert DELIVER[how](conn, mid(2), BOB, T0 + 21) == 1
    # The message rows are byte for byte what they were: the stored statuses are still queued and sent.
    assert conn.execute(DUMP_MESSAGES).fetchall() == before
    assert _raw_status(conn, mid(1)) == ("queued", T0)
    assert _raw_status(conn, mid(2)) == ("sent", T0 + 10)
    assert [r[0] for r in conn.execute("SELECT seq FROM outbox")] == [3]
    # Every read path says delivered; status_at is the time of the last stored status.
    for n, status_at in ((1, T0), (2, T0 + 10)):
        message = repo.get_message(conn, mid(n))
        assert message is not None
        assert (message.status, message.status_at) == (MessageStatus.DELIVERED, status_at)
    expected = [MessageStatus.DELIVERED, MessageStatus.DELIVERED, MessageStatus.SENT, MessageStatus.RECEIVED]
    assert [m.status for m in repo.history(conn, BOB)] == expected
    page = repo.history(conn, BOB, limit=2)
    assert [m.status for m in repo.history(conn, BOB, before=page[0].cursor)] == expected[:2]
    assert [(m.message_id, m.status) for m in repo.inbox(conn)] == [(mid(4), MessageStatus.RECEIVED)]
    assert repo.get_message(conn, mid(3)).status is MessageStatus.SENT  # type: ignore[union-attr]
    # Nothing that works on pending messages sees a delivered one.
    assert [e.message_id for e in repo.due_round(conn, now=T0 + 10**9).entries] == [mid(3)]
    assert [e.message_id for e in repo.due_for(conn, BOB)] == [mid(3)]
    assert repo.get_outbox_entry(conn, mid(1)) is None
    assert repo.outbox_depth(conn) == 1
    assert repo.reschedule(conn, mid(2), now=T0 + 30, error="x") is None
    assert repo.mark_sent(conn, mid(1), now=T0 + 30, retry_at=T0 + 40) is False
    assert repo.mark_sent_many(conn, [mid(1), mid(2)], now=T0 + 30, retry_at=T0 + 40) == 0
    assert repo.expedite(conn, BOB, now=T0 + 5) == 1  # mid(3) only
    assert conn.execute(DUMP_MESSAGES).fetchall() == before


@pytest.mark.parametrize("how", list(DELIVER))
def test_duplicate_and_foreign_receipts_change_nothing(conn: sqlite3.Connection, how: str) -> None:
    _setup(conn)
    assert DELIVER[how](conn, mid(2), BOB, T0 + 20) == 1
    messages, outbox = conn.execute(DUMP_MESSAGES).fetchall(), conn.execute(DUMP_OUTBOX).fetchall()
    assert DELIVER[how](conn, mid(2), BOB, T0 + 30) == 0  # duplicate
    assert DELIVER[how](conn, mid(3), CAROL, T0 + 30) == 0  # not the recipient of a pending one
    assert DELIVER[how](conn, mid(2), CAROL, T0 + 30) == 0  # nor of a delivered one
    assert DELIVER[how](conn, mid(4), BOB, T0 + 30) == 0  # an incoming message
    assert DELIVER[how](conn, mid(9), BOB, T0 + 30) == 0  # unknown
    assert conn.execute(DUMP_MESSAGES).fetchall() == messages
    assert conn.execute(DUMP_OUTBOX).fetchall() == outbox


@pytest.mark.parametrize("how", list(DELIVER))
def test_mark_failed_after_delivery_is_refused(conn: sqlite3.Connection, how: str) -> None:
    _setup(conn)
    assert DELIVER[how](conn, mid(2), BOB, T0 + 20) == 1
    assert repo.mark_failed(conn, mid(2), now=T0 + 30) is False
    assert _raw_status(conn, mid(2)) == ("sent", T0 + 10)
    assert repo.get_message(conn, mid(2)).status is MessageStatus.DELIVERED  # type: ignore[union-attr]


@pytest.mark.parametrize("how", list(DELIVER))
def test_a_late_receipt_for_a_failed_message_stores_delivered(conn: sqlite3.Connection, how: str) -> None:
    _setup(conn)
    assert repo.mark_failed(conn, mid(3), now=T0 + 20) is True
    assert _raw_status(conn, mid(3)) == ("failed", T0 + 20)
    assert repo.get_message(conn, mid(3)).status is MessageStatus.FAILED  # type: ignore[union-attr]
    assert DELIVER[how](conn, mid(3), BOB, T0 + 30) == 1
    assert _raw_status(conn, mid(3)) == ("delivered", T0 + 30)
    message = repo.get_message(conn, mid(3))
    assert message is not None and (message.status, message.status_at) == (MessageStatus.DELIVERED, T0 + 30)
    assert DELIVER[how](conn, mid(3), BOB, T0 + 40) == 0
    assert repo.mark_failed(conn, mid(3), now=T0 + 40) is False


def test_a_stored_delivered_row_reads_as_delivered(conn: sqlite3.Connection) -> None:
    # What schema v2 left for a delivered message: status written, outbox row gone.
    _setup(conn)
    conn.execute("UPDATE messages SET status = 'delivered', status_at = ? WHERE message_id = ?", (T0 + 50, mid(3)))
    conn.execute("DELETE FROM outbox WHERE seq = (SELECT seq FROM messages WHERE message_id = ?)", (mid(3),))
    message = repo.get_message(conn, mid(3))
    assert message is not None and (message.status, message.status_at) == (MessageStatus.DELIVERED, T0 + 50)
    assert repo.mark_delivered_ids(conn, [mid(3)], recipient=BOB, now=T0 + 60) == []
    assert repo.mark_delivered(conn, mid(3), recipient=BOB, now=T0 + 60) is False
    assert repo.mark_delivered_many(conn, [mid(3)], recipient=BOB, now=T0 + 60) == 0
    assert repo.mark_failed(conn, mid(3), now=T0 + 60) is False
    assert _raw_status(conn, mid(3)) == ("delivered", T0 + 50)

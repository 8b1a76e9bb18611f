"""``repo.waiting_recipients``: the contacts whose whole outbox waits (for a retry or a receipt), for the chat
service's record watcher."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from p2pmsg.store import repo
from p2pmsg.store.errors import StoreArgumentError
from p2pmsg.store.migrations import migrate
from p2pmsg.store.models import OutgoingMessage

ME = b"\x00\x24" + bytes(range(36))
BOB = b"\x00\x24" + bytes(range(1, 37))
CAROL = b"\x00\x24" + bytes(range(2, 38))
DAVE = b"\x00\x24" + bytes(range(3, 39))
STRANGER = b"\x00\x24" + bytes(range(4, 40))
T0 = 1_700_000_000_000


@pytest.fixture
def conn() -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(":memory:", isolation_level=None)
    c.execute("PRAGMA foreign_keys = ON")
    migrate(c)
    yield c
    c.close()


def _queue(conn: sqlite3.Connection, n: int, to: bytes, next_attempt_at: int) -> bytes:
    message_id = n.to_bytes(16, "big")
    item = OutgoingMessage(
        message_id=message_id, recipient=to, sender=ME, text=f"m{n}", sent_at=T0, next_attempt_at=next_attempt_at
    )
    repo.enqueue_many(conn, [item], now=T0)
    return message_id


def test_only_contacts_whose_every_entry_waits_latest_first(conn: sqlite3.Connection) -> None:
    for name, peer in (("bob", BOB), ("carol", CAROL), ("dave", DAVE)):
        repo.add_contact(conn, peer_id=peer, name=name, now=T0)
    now = T0 + 1000
    _queue(conn, 1, BOB, now + 5_000)  # bob: everything waits
    _queue(conn, 2, BOB, now + 9_000)
    _queue(conn, 3, CAROL, now + 60_000)  # carol: waits longer
    _queue(conn, 4, DAVE, now + 60_000)  # dave: one entry is due now, so the outbox worker is on it
    _queue(conn, 5, DAVE, now)
    _queue(conn, 6, STRANGER, now + 5_000)  # not a contact
    assert repo.waiting_recipients(conn, now=now) == [CAROL, BOB]
    assert repo.waiting_recipients(conn, now=now, limit=1) == [CAROL]
    # Blocked contacts are not watched; a delivered message leaves the outbox.
    repo.block_peer(conn, CAROL, now=now)
    assert repo.waiting_recipients(conn, now=now) == [BOB]
    repo.mark_delivered_ids(conn, [(1).to_bytes(16, "big"), (2).to_bytes(16, "big")], recipient=BOB, now=now)
    assert repo.waiting_recipients(conn, now=now) == []


def test_arguments_are_checked(conn: sqlite3.Connection) -> None:
    with pytest.raises(StoreArgumentError):
        repo.waiting_recipients(conn, now=-1)
    with pytest.raises(StoreArgumentError):
        repo.waiting_recipients(conn, now=T0, limit=0)

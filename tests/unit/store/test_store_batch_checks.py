"""The boundary checks of the store's batch paths (enqueue_many, insert_incoming_many, mark_delivered_ids): every
field is still checked when the fast inline checks let a value through or hand it to the general validators, and
a refused item leaves nothing of the call behind."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Iterator

import pytest

from p2pmsg.store import repo
from p2pmsg.store.errors import DuplicateMessageError, StoreArgumentError
from p2pmsg.store.migrations import migrate
from p2pmsg.store.models import MAX_TEXT_BYTES, IncomingMessage, MessageStatus, OutgoingMessage

ME = b"\x00\x24" + bytes(range(36))
BOB = b"\x00\x24" + bytes(range(1, 37))
EVE = b"\x00\x24" + bytes(range(3, 39))
CAROL = b"\x00\x24" + bytes(range(2, 38))
T0 = 1_700_000_000_000

Batch = Callable[[sqlite3.Connection, list[str]], object]


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


@pytest.fixture
def conn() -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(":memory:", isolation_level=None)
    c.execute("PRAGMA foreign_keys = ON")
    migrate(c)
    yield c
    c.close()


def outgoing(n: int, text: str = "hi") -> OutgoingMessage:
    return OutgoingMessage(message_id=mid(n), recipient=BOB, sender=ME, text=text, sent_at=T0 + n)


def incoming(n: int, text: str = "hi", *, sender: bytes = BOB, is_request: bool = False) -> IncomingMessage:
    return IncomingMessage(message_id=mid(n), sender=sender, text=text, sent_at=T0 + n, is_request=is_request)


def enqueue_texts(conn: sqlite3.Connection, texts: list[str]) -> object:
    return repo.enqueue_many(conn, [outgoing(100 + i, t) for i, t in enumerate(texts)], now=T0)


def insert_texts(conn: sqlite3.Connection, texts: list[str]) -> object:
    return repo.insert_incoming_many(conn, [incoming(100 + i, t) for i, t in enumerate(texts)], now=T0)


BATCHES = pytest.mark.parametrize("batch", [enqueue_texts, insert_texts], ids=["enqueue_many", "insert_incoming_many"])


def counts(conn: sqlite3.Connection) -> tuple[int, int]:
    return (
        conn.execute("SELECT count(*) FROM messages").fetchone()[0],
        conn.execute("SELECT count(*) FROM outbox").fetchone()[0],
    )


@BATCHES
@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("x" * MAX_TEXT_BYTES, True),
        ("x" * (MAX_TEXT_BYTES + 1), False),
        ("\U0001f600" * (MAX_TEXT_BYTES // 4), True),  # the most code points that need no encoding: 4 bytes each
        ("\U0001f600" * (MAX_TEXT_BYTES // 4 + 1), False),  # one more: 65540 bytes
        ("€" * (MAX_TEXT_BYTES // 3 + 1), False),  # 21846 code points, 65538 bytes
        ("é" * (MAX_TEXT_BYTES // 2), True),
    ],
)
def test_batch_text_byte_limit(conn: sqlite3.Connection, batch: Batch, text: str, ok: bool) -> None:
    if ok:
        batch(conn, ["a", text])
        assert conn.execute("SELECT text FROM messages WHERE message_id = ?", (mid(101),)).fetchone()[0] == text
    else:
        with pytest.raises(StoreArgumentError, match="bytes of UTF-8") as info:
            batch(conn, ["a", text])
        assert info.value.field == "text"
        assert counts(conn) == (0, 0)


@BATCHES
@pytest.mark.parametrize("bad", ["lone \udc80 surrogate", "\ud800", "x" * 20_000 + "\udfff"])
def test_batch_refuses_a_surrogate_late_in_the_batch_and_keeps_nothing(
    conn: sqlite3.Connection, batch: Batch, bad: str
) -> None:
    # The short texts are not encoded by the store: SQLite's binding refuses the surrogate after earlier rows of
    # the same executemany were inserted; they must be undone and the error must be the store's.
    with pytest.raises(StoreArgumentError, match="UTF-8") as info:
        batch(conn, ["a", "b", "c", bad, "e"])
    assert info.value.field == "text"
    assert counts(conn) == (0, 0)
    batch(conn, ["a", "b"])  # the ids were not left behind
    assert counts(conn)[0] == 2


def test_insert_incoming_many_surrogate_keeps_what_was_stored_before(conn: sqlite3.Connection) -> None:
    repo.insert_incoming(conn, message_id=mid(1), sender=BOB, text="old", sent_at=T0, now=T0)
    with pytest.raises(StoreArgumentError):
        repo.insert_incoming_many(conn, [incoming(2), incoming(1), incoming(3, "\udc80")], now=T0)
    assert [m.text for m in repo.history(conn, BOB)] == ["old"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"message_id": b"short"}, "message_id"),
        ({"message_id": "not bytes" * 2}, "message_id"),
        ({"recipient": b""}, "recipient"),
        ({"recipient": b"x" * 65}, "recipient"),
        ({"recipient": "peer"}, "recipient"),
        ({"sender": b""}, "sender"),
        ({"text": b"bytes"}, "text"),
        ({"text": None}, "text"),
        ({"sent_at": -1}, "sent_at"),
        ({"sent_at": 2**63}, "sent_at"),
        ({"sent_at": True}, "sent_at"),
        ({"sent_at": 1.0}, "sent_at"),
        ({"next_attempt_at": -1}, "next_attempt_at"),
        ({"next_attempt_at": False}, "next_attempt_at"),
    ],
)
def test_enqueue_many_checks_every_field_and_keeps_nothing(
    conn: sqlite3.Connection, change: dict[str, object], field: str
) -> None:
    bad = dataclasses.replace(outgoing(3), **change)  # type: ignore[arg-type]
    with pytest.raises(StoreArgumentError) as info:
        repo.enqueue_many(conn, [outgoing(1), outgoing(2), bad, outgoing(4)], now=T0)
    assert info.value.field == field
    assert counts(conn) == (0, 0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"message_id": b"x" * 17}, "message_id"),
        ({"sender": b"x" * 65}, "sender"),
        ({"sender": None}, "sender"),
        ({"conversation": b""}, "conversation"),
        ({"text": 5}, "text"),
        ({"sent_at": 2**63}, "sent_at"),
        ({"sent_at": False}, "sent_at"),
    ],
)
def test_insert_incoming_many_checks_every_field_and_keeps_nothing(
    conn: sqlite3.Connection, change: dict[str, object], field: str
) -> None:
    bad = dataclasses.replace(incoming(3), **change)  # type: ignore[arg-type]
    with pytest.raises(StoreArgumentError) as info:
        repo.insert_incoming_many(conn, [incoming(1), incoming(2), bad], now=T0)
    assert info.value.field == field
    assert counts(conn) == (0, 0)


def test_batch_functions_accept_bytes_like_ids_and_store_bytes(conn: sqlite3.Connection) -> None:
    item = dataclasses.replace(outgoing(1), message_id=bytearray(mid(1)), recipient=memoryview(BOB))
    repo.enqueue_many(conn, [item], now=T0)
    other = dataclasses.replace(incoming(2), message_id=memoryview(mid(2)), sender=bytearray(EVE))
    assert repo.insert_incoming_many(conn, [other], now=T0) == [True]
    rows = conn.execute("SELECT typeof(message_id), typeof(conversation), typeof(sender) FROM messages").fetchall()
    assert rows == [("blob", "blob", "blob")] * 2
    assert repo.get_message(conn, mid(2)).conversation == EVE  # type: ignore[union-attr]


def test_enqueue_many_duplicate_at_the_end_of_a_large_batch_keeps_nothing(conn: sqlite3.Connection) -> None:
    repo.enqueue_many(conn, [outgoing(0)], now=T0)
    with pytest.raises(DuplicateMessageError, match="already stored"):
        repo.enqueue_many(conn, [outgoing(n) for n in range(1, 600)] + [outgoing(0)], now=T0)
    with pytest.raises(DuplicateMessageError, match="twice"):
        repo.enqueue_many(conn, [outgoing(n) for n in range(1, 600)] + [outgoing(5)], now=T0)
    assert counts(conn) == (1, 1)
    seqs = repo.enqueue_many(conn, [outgoing(n) for n in range(1, 4)], now=T0)
    assert seqs == sorted(seqs) and seqs[0] > 1
    assert [e.seq for e in repo.due_round(conn, now=T0).entries] == [1, *seqs]


def test_insert_incoming_many_counts_requests_per_peer(conn: sqlite3.Connection) -> None:
    repo.insert_incoming(conn, message_id=mid(1), sender=EVE, text="x", sent_at=T0, now=T0, is_request=True)
    items = [
        incoming(2, sender=EVE, is_request=True),
        incoming(3, sender=CAROL, is_request=True),
        incoming(4, sender=BOB),
        incoming(5, sender=EVE, is_request=True),
    ]
    assert repo.insert_incoming_many(conn, items, now=T0 + 7) == [True] * 4
    eve, carol = repo.get_request(conn, EVE), repo.get_request(conn, CAROL)
    assert eve is not None and (eve.message_count, eve.first_at, eve.last_at) == (3, T0, T0 + 7)
    assert carol is not None and (carol.message_count, carol.first_at, carol.last_at) == (1, T0 + 7, T0 + 7)
    assert repo.get_request(conn, BOB) is None
    # Duplicates are not counted again.
    assert repo.insert_incoming_many(conn, [incoming(6, sender=EVE, is_request=True), *items], now=T0 + 8) == [
        True,
        False,
        False,
        False,
        False,
    ]
    eve = repo.get_request(conn, EVE)
    assert eve is not None and (eve.message_count, eve.last_at) == (4, T0 + 8)


def test_insert_incoming_many_first_occurrence_wins_within_a_new_batch(conn: sqlite3.Connection) -> None:
    items = [incoming(1, "first"), incoming(2), incoming(1, "second"), incoming(1, "third")]
    assert repo.insert_incoming_many(conn, items, now=T0) == [True, True, False, False]
    assert repo.get_message(conn, mid(1)).text == "first"  # type: ignore[union-attr]


def test_mark_delivered_ids_checks_its_arguments(conn: sqlite3.Connection) -> None:
    repo.enqueue_many(conn, [outgoing(1)], now=T0)
    for ids, field in (([mid(1), b"short"], "message_id"), ([mid(1), "x" * 16], "message_id")):
        with pytest.raises(StoreArgumentError) as info:
            repo.mark_delivered_ids(conn, ids, recipient=BOB, now=T0)  # type: ignore[arg-type]
        assert info.value.field == field
    with pytest.raises(StoreArgumentError, match="recipient"):
        repo.mark_delivered_ids(conn, [mid(1)], recipient=b"", now=T0)
    with pytest.raises(StoreArgumentError, match="now"):
        repo.mark_delivered_ids(conn, [mid(1)], recipient=BOB, now=-1)
    assert repo.outbox_depth(conn) == 1
    assert repo.mark_delivered_ids(conn, [bytearray(mid(1))], recipient=BOB, now=T0) == [mid(1)]  # type: ignore[list-item]
    assert repo.get_message(conn, mid(1)).status is MessageStatus.DELIVERED  # type: ignore[union-attr]


def _vm_steps(conn: sqlite3.Connection, fn: Callable[[], object]) -> int:
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        fn()
    finally:
        conn.set_progress_handler(None, 0)
    return steps


def test_request_bytes_does_not_read_the_history(conn: sqlite3.Connection) -> None:
    repo.insert_incoming(conn, message_id=mid(1), sender=EVE, text="é" * 10, sent_at=T0, now=T0, is_request=True)
    small = _vm_steps(conn, lambda: repo.request_bytes(conn))
    for start in range(0, 20_000, 1000):  # a long history with contacts, no statistics (no ANALYZE)
        repo.insert_incoming_many(conn, [incoming(10 + start + n) for n in range(1000)], now=T0)
    assert repo.request_bytes(conn) == 20
    large = _vm_steps(conn, lambda: repo.request_bytes(conn))
    assert large <= small + 2, (small, large)  # independent of the number of other messages


# The row paths (enqueue_rows, insert_incoming_rows) take the same fields as tuples: the chat service's hot path.


def _outgoing_row(item: OutgoingMessage) -> repo.OutgoingRow:
    return (item.message_id, item.recipient, item.sender, item.text, item.sent_at, item.next_attempt_at)


def _incoming_row(item: IncomingMessage) -> repo.IncomingRow:
    return (item.message_id, item.sender, item.conversation, item.text, item.sent_at, item.is_request)


def test_row_paths_store_what_the_object_paths_store(conn: sqlite3.Connection) -> None:
    other = sqlite3.connect(":memory:", isolation_level=None)
    migrate(other)
    sent = [outgoing(1), dataclasses.replace(outgoing(2), next_attempt_at=T0 + 5)]
    got = [incoming(3), dataclasses.replace(incoming(4), is_request=True, conversation=CAROL), incoming(3)]
    assert repo.enqueue_rows(conn, [_outgoing_row(i) for i in sent], now=T0) == repo.enqueue_many(other, sent, now=T0)
    assert repo.insert_incoming_rows(conn, [_incoming_row(i) for i in got], now=T0) == [True, True, False]
    assert repo.insert_incoming_many(other, got, now=T0) == [True, True, False]
    for table in ("messages", "outbox", "message_requests"):
        query = f"SELECT * FROM {table} ORDER BY 1"
        assert conn.execute(query).fetchall() == other.execute(query).fetchall(), table
    other.close()


@pytest.mark.parametrize(
    ("change", "field"),
    [({"message_id": b"x" * 15}, "message_id"), ({"recipient": b""}, "recipient"), ({"sent_at": -1}, "sent_at")],
)
def test_enqueue_rows_checks_every_field_and_keeps_nothing(
    conn: sqlite3.Connection, change: dict[str, object], field: str
) -> None:
    bad = _outgoing_row(dataclasses.replace(outgoing(3), **change))  # type: ignore[arg-type]
    rows = [_outgoing_row(outgoing(1)), bad]
    with pytest.raises(StoreArgumentError) as info:
        repo.enqueue_rows(conn, rows, now=T0)
    assert info.value.field == field
    assert counts(conn) == (0, 0)


@pytest.mark.parametrize("bad", [[mid(1), BOB], "not a tuple", None])
def test_row_paths_refuse_anything_but_six_tuples(conn: sqlite3.Connection, bad: object) -> None:
    with pytest.raises(StoreArgumentError, match="6-tuples"):
        repo.enqueue_rows(conn, [_outgoing_row(outgoing(1)), bad], now=T0)  # type: ignore[list-item]
    with pytest.raises(StoreArgumentError, match="6-tuples"):
        repo.insert_incoming_rows(conn, [_incoming_row(incoming(2)), bad], now=T0)  # type: ignore[list-item]
    assert counts(conn) == (0, 0)

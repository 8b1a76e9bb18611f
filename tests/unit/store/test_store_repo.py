"""Repository functions of p2pmsg.store.repo, run on a migrated SQLite file (synchronously, one statement per
transaction; the transactional wrapper is tested in test_store_db.py)."""

from __future__ import annotations

import dataclasses
import random
import sqlite3
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmsg.cli import main as cli_main
from p2pmsg.errors import LocalProtocolError
from p2pmsg.store import repo
from p2pmsg.store.errors import (
    ContactExistsError,
    DuplicateMessageError,
    NameTakenError,
    PeerBlockedError,
    StoreArgumentError,
    UnknownContactError,
    UnknownRequestError,
)
from p2pmsg.store.migrations import migrate
from p2pmsg.store.models import (
    MAX_DHT_NODES,
    MAX_ERROR_CHARS,
    MAX_TEXT_BYTES,
    STATUS_TRANSITIONS,
    Backoff,
    ContactState,
    DhtNode,
    Direction,
    HistoryCursor,
    IncomingMessage,
    MessageStatus,
    OutgoingMessage,
    can_transition,
)

ME = b"\x00\x24" + bytes(range(36))
BOB = b"\x00\x24" + bytes(range(1, 37))
CAROL = b"\x00\x24" + bytes(range(2, 38))
EVE = b"\x00\x24" + bytes(range(3, 39))
T0 = 1_700_000_000_000


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn)
    return conn


@pytest.fixture
def conn() -> Iterator[sqlite3.Connection]:
    c = _connect(":memory:")
    yield c
    c.close()


def send(conn: sqlite3.Connection, n: int, *, to: bytes = BOB, sent_at: int = T0, text: str = "hi") -> None:
    repo.enqueue(conn, message_id=mid(n), recipient=to, sender=ME, text=text, sent_at=sent_at, now=sent_at)


def due_ids(conn: sqlite3.Connection, now: int, limit: int = 100) -> list[bytes]:
    """The ids of the entries one outbox round would read (``repo.due_round``), in its order."""
    return [e.message_id for e in repo.due_round(conn, now=now, limit=limit).entries]


# --------------------------------------------------------------------------------------------------- settings


def test_settings_roundtrip_replace_delete(conn: sqlite3.Connection) -> None:
    assert repo.get_setting(conn, "accept_from") is None
    repo.set_setting(conn, "accept_from", b"contacts", now=T0)
    repo.set_setting(conn, "accept_from", b"anyone", now=T0 + 1)
    assert repo.get_setting(conn, "accept_from") == b"anyone"
    repo.set_setting(conn, "empty", b"", now=T0)
    assert repo.get_setting(conn, "empty") == b""
    assert repo.delete_setting(conn, "accept_from") is True
    assert repo.delete_setting(conn, "accept_from") is False
    assert repo.get_setting(conn, "accept_from") is None


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [("", b"x", "key"), ("k" * 129, b"x", "key"), ("k", "text", "value"), ("k", b"x" * 65537, "value")],
)
def test_settings_refuse_bad_arguments(conn: sqlite3.Connection, key: str, value: object, field: str) -> None:
    with pytest.raises(StoreArgumentError) as info:
        repo.set_setting(conn, key, value, now=T0)  # type: ignore[arg-type]
    assert info.value.field == field
    assert isinstance(info.value, LocalProtocolError)


# --------------------------------------------------------------------------------------------------- contacts


def test_contacts_add_find_list_rename_remove(conn: sqlite3.Connection) -> None:
    bob = repo.add_contact(conn, peer_id=BOB, name="bob", now=T0)
    assert (bob.peer_id, bob.name, bob.state, bob.verified, bob.added_at) == (
        BOB,
        "bob",
        ContactState.CONTACT,
        False,
        T0,
    )
    repo.add_contact(conn, peer_id=CAROL, name="Carol", now=T0, verified=True)
    assert repo.find_contact(conn, "BOB") == bob  # ASCII case-insensitive
    assert repo.get_contact(conn, BOB) == bob
    assert [c.name for c in repo.list_contacts(conn)] == ["bob", "Carol"]
    renamed = repo.rename_contact(conn, BOB, "robert", now=T0 + 5)
    assert (renamed.name, renamed.updated_at, renamed.added_at) == ("robert", T0 + 5, T0)
    assert repo.find_contact(conn, "bob") is None
    assert repo.remove_contact(conn, BOB) is True
    assert repo.remove_contact(conn, BOB) is False
    assert repo.get_contact(conn, BOB) is None
    # A blocked contact stays blocked: only its name goes (then there is nothing more to remove).
    repo.block_peer(conn, CAROL, now=T0 + 6)
    assert repo.remove_contact(conn, CAROL) is True
    carol = repo.get_contact(conn, CAROL)
    assert carol is not None and (carol.name, carol.state) == (None, ContactState.BLOCKED)
    assert repo.is_blocked(conn, CAROL) and repo.find_contact(conn, "Carol") is None
    assert repo.remove_contact(conn, CAROL) is False


def test_contact_names_are_unique_and_peers_not_added_twice(conn: sqlite3.Connection) -> None:
    repo.add_contact(conn, peer_id=BOB, name="bob", now=T0)
    with pytest.raises(NameTakenError, match="'Bob'"):
        repo.add_contact(conn, peer_id=CAROL, name="Bob", now=T0)
    with pytest.raises(ContactExistsError, match="'bob'") as exists:
        repo.add_contact(conn, peer_id=BOB, name="bobby", now=T0)
    assert str(exists.value).startswith(cli_main._CONTACT_EXISTS)  # the CLI adds its rename/unblock hint to this
    repo.add_contact(conn, peer_id=CAROL, name="carol", now=T0)
    with pytest.raises(NameTakenError):
        repo.rename_contact(conn, CAROL, "BOB", now=T0)
    assert repo.rename_contact(conn, BOB, "Bob", now=T0).name == "Bob"  # renaming to its own name differently cased
    with pytest.raises(UnknownContactError):
        repo.rename_contact(conn, EVE, "eve", now=T0)
    with pytest.raises(UnknownContactError):
        repo.set_verified(conn, EVE, True, now=T0)


def test_contact_names_match_caselessly_in_any_script_and_normalisation(conn: sqlite3.Connection) -> None:
    """A QA pass found "send JÖRG" refused while "send BOB" worked, and two contacts both named "Jörg" (one typed
    with a combining diaeresis): SQLite's NOCASE folds ASCII letters only, and compares code points."""
    decomposed = "Jo\u0308rg"  # "Jörg" as o + U+0308
    joerg = repo.add_contact(conn, peer_id=BOB, name=decomposed, now=T0)
    assert joerg.name == "J\u00f6rg"  # stored in one spelling (NFC)
    for spelling in ("J\u00f6rg", "j\u00f6rg", "J\u00d6RG", "JO\u0308RG", decomposed):
        assert repo.find_contact(conn, spelling) == joerg, spelling
    for taken in ("J\u00f6rg", "J\u00d6RG", "jo\u0308rg"):
        with pytest.raises(NameTakenError):
            repo.add_contact(conn, peer_id=CAROL, name=taken, now=T0)
    repo.add_contact(conn, peer_id=CAROL, name="\u00c9mile", now=T0)
    with pytest.raises(NameTakenError):
        repo.rename_contact(conn, CAROL, "J\u00d6RG", now=T0)
    assert repo.rename_contact(conn, BOB, "J\u00d6RG", now=T0).name == "J\u00d6RG"  # its own name, recased
    assert repo.find_contact(conn, "\u00e9mile") is not None and repo.find_contact(conn, "emile") is None
    assert repo.find_contact(conn, "Stra\u00dfe") is None
    strasse = repo.add_contact(conn, peer_id=EVE, name="Stra\u00dfe", now=T0)
    assert repo.find_contact(conn, "STRASSE") == strasse  # an ASCII spelling of a non-ASCII name (a review)
    with pytest.raises(NameTakenError):
        repo.rename_contact(conn, CAROL, "strasse", now=T0)


@pytest.mark.parametrize("name", ["", " bob", "bob ", "a\nb", "a\u200bb", "x" * 65, "\udc80"])
def test_contact_names_are_validated(conn: sqlite3.Connection, name: str) -> None:
    with pytest.raises(StoreArgumentError) as info:
        repo.add_contact(conn, peer_id=BOB, name=name, now=T0)
    assert info.value.field == "name"


def test_block_contact_and_stranger(conn: sqlite3.Connection) -> None:
    repo.add_contact(conn, peer_id=BOB, name="bob", now=T0)
    blocked = repo.block_peer(conn, BOB, now=T0 + 1)
    assert (blocked.state, blocked.name) == (ContactState.BLOCKED, "bob")
    stranger = repo.block_peer(conn, EVE, now=T0 + 2)
    assert (stranger.state, stranger.name) == (ContactState.BLOCKED, None)
    assert repo.is_blocked(conn, BOB) and repo.is_blocked(conn, EVE) and not repo.is_blocked(conn, CAROL)
    assert [c.peer_id for c in repo.list_contacts(conn, state=ContactState.BLOCKED)] == [BOB, EVE]
    assert repo.list_contacts(conn, state=ContactState.CONTACT) == []
    # A blocked contact cannot be added again; a blocked stranger can (it becomes a contact).
    with pytest.raises(ContactExistsError, match="blocked"):
        repo.add_contact(conn, peer_id=BOB, name="bob2", now=T0)
    eve = repo.add_contact(conn, peer_id=EVE, name="eve", now=T0 + 3)
    assert (eve.state, eve.name, eve.added_at) == (ContactState.CONTACT, "eve", T0 + 2)
    # Unblocking: the named contact is restored, a nameless blocked peer is forgotten.
    repo.block_peer(conn, CAROL, now=T0)
    assert repo.unblock_peer(conn, BOB, now=T0 + 4) is True
    assert repo.get_contact(conn, BOB).state is ContactState.CONTACT  # type: ignore[union-attr]
    assert repo.unblock_peer(conn, BOB, now=T0 + 4) is False
    assert repo.unblock_peer(conn, CAROL, now=T0 + 4) is True
    assert repo.get_contact(conn, CAROL) is None


def test_set_verified(conn: sqlite3.Connection) -> None:
    repo.add_contact(conn, peer_id=BOB, name="bob", now=T0)
    assert repo.set_verified(conn, BOB, True, now=T0 + 1).verified is True
    assert repo.set_verified(conn, BOB, False, now=T0 + 2).verified is False


@pytest.mark.parametrize("peer", [b"", b"x" * 65, "peer", 12])
def test_peer_ids_are_validated(conn: sqlite3.Connection, peer: object) -> None:
    with pytest.raises(StoreArgumentError) as info:
        repo.get_contact(conn, peer)  # type: ignore[arg-type]
    assert info.value.field == "peer_id"


# --------------------------------------------------------------------------------------------------- messages


def test_incoming_is_deduplicated_by_id(conn: sqlite3.Connection) -> None:
    assert repo.insert_incoming(conn, message_id=mid(1), sender=BOB, text="hello", sent_at=T0, now=T0 + 5) is True
    # The sender retries (our receipt was lost): same id, stored once, the first copy kept.
    assert repo.insert_incoming(conn, message_id=mid(1), sender=BOB, text="changed", sent_at=T0, now=T0 + 9) is False
    rows = repo.history(conn, BOB)
    assert [(m.text, m.stored_at, m.status, m.direction) for m in rows] == [
        ("hello", T0 + 5, MessageStatus.RECEIVED, Direction.IN)
    ]
    # An id is unique across directions and conversations too.
    send(conn, 2)
    assert repo.insert_incoming(conn, message_id=mid(2), sender=CAROL, text="x", sent_at=T0, now=T0) is False
    with pytest.raises(DuplicateMessageError):
        send(conn, 1)
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 2


def test_history_orders_by_sender_timestamp_then_arrival(conn: sqlite3.Connection) -> None:
    # Arrival order differs from the sender's order; two messages share a timestamp.
    arrivals = [(3, T0 + 300), (1, T0 + 100), (4, T0 + 300), (2, T0 + 200)]
    for n, sent in arrivals:
        repo.insert_incoming(conn, message_id=mid(n), sender=BOB, text=f"m{n}", sent_at=sent, now=T0 + 1000 + n)
    send(conn, 9, sent_at=T0 + 250)  # our reply, interleaved by its timestamp
    assert [m.text for m in repo.history(conn, BOB)] == ["m1", "m2", "hi", "m3", "m4"]
    seqs = [m.seq for m in repo.history(conn, BOB)]
    assert len(set(seqs)) == 5
    # Other conversations are not mixed in.
    repo.insert_incoming(conn, message_id=mid(20), sender=CAROL, text="c", sent_at=T0, now=T0)
    assert [m.text for m in repo.history(conn, CAROL)] == ["c"]


def test_history_pages_back_with_a_cursor_across_equal_timestamps(conn: sqlite3.Connection) -> None:
    for n in range(10):
        repo.insert_incoming(conn, message_id=mid(n), sender=BOB, text=f"m{n}", sent_at=T0 + n // 4, now=T0)
    page = repo.history(conn, BOB, limit=3)
    assert [m.text for m in page] == ["m7", "m8", "m9"]
    seen = [m.text for m in page]
    while page:
        page = repo.history(conn, BOB, limit=3, before=page[0].cursor)
        seen[:0] = [m.text for m in page]
    assert seen == [f"m{n}" for n in range(10)]
    assert repo.history(conn, BOB, before=HistoryCursor(sent_at=0, seq=0)) == []


@settings(max_examples=40, deadline=None)
@given(
    timestamps=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=30),
    page=st.integers(min_value=1, max_value=7),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_history_paging_returns_every_message_once_in_order(timestamps: list[int], page: int, seed: int) -> None:
    conn = _connect(":memory:")
    order = list(range(len(timestamps)))
    random.Random(seed).shuffle(order)
    for n in order:  # arrive in a random order
        repo.insert_incoming(conn, message_id=mid(n), sender=BOB, text=str(n), sent_at=timestamps[n], now=T0)
    expected = [m.text for m in sorted(repo.history(conn, BOB, limit=100), key=lambda m: (m.sent_at, m.seq))]
    got: list[str] = []
    chunk = repo.history(conn, BOB, limit=page)
    while chunk:
        got[:0] = [m.text for m in chunk]
        chunk = repo.history(conn, BOB, limit=page, before=chunk[0].cursor)
    assert got == expected
    assert sorted(int(t) for t in got) == list(range(len(timestamps)))
    assert [timestamps[int(t)] for t in got] == sorted(timestamps)
    conn.close()


def test_conversation_floor_sorts_a_new_message_after_every_stored_one(conn: sqlite3.Connection) -> None:
    assert repo.conversation_floor(conn, BOB) == 0
    send(conn, 1, sent_at=T0 + 5)
    assert repo.conversation_floor(conn, BOB) == T0 + 5  # after our own: the same time is enough (seq orders)
    repo.insert_incoming(conn, message_id=mid(2), sender=BOB, text="x", sent_at=T0 + 5, now=T0)
    assert repo.conversation_floor(conn, BOB) == T0 + 6  # after a received one: strictly later
    repo.insert_incoming(conn, message_id=mid(3), sender=BOB, text="y", sent_at=T0 + 1, now=T0)
    send(conn, 4, sent_at=T0 + 9)
    assert repo.conversation_floor(conn, BOB) == T0 + 9
    assert repo.conversation_floor(conn, CAROL) == 0


def test_inbox_excludes_requests_and_outgoing(conn: sqlite3.Connection) -> None:
    repo.insert_incoming(conn, message_id=mid(1), sender=BOB, text="b1", sent_at=T0, now=T0)
    repo.insert_incoming(conn, message_id=mid(2), sender=EVE, text="spam", sent_at=T0, now=T0, is_request=True)
    send(conn, 3)
    repo.insert_incoming(conn, message_id=mid(4), sender=CAROL, text="c1", sent_at=T0 - 5, now=T0)
    assert [m.text for m in repo.inbox(conn)] == ["c1", "b1"]
    first = repo.inbox(conn, limit=1)
    assert [m.text for m in repo.inbox(conn, before_seq=first[0].seq)] == ["b1"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"message_id": b"short"}, "message_id"),
        ({"text": "x" * (MAX_TEXT_BYTES + 1)}, "text"),
        ({"text": "é" * (MAX_TEXT_BYTES // 2 + 1)}, "text"),  # the limit counts UTF-8 bytes
        ({"text": "bad \udc80 surrogate"}, "text"),
        ({"text": b"bytes"}, "text"),
        ({"sent_at": -1}, "sent_at"),
        ({"sent_at": 2**63}, "sent_at"),
        ({"sent_at": True}, "sent_at"),
        ({"sent_at": 1.5}, "sent_at"),
        ({"sender": b""}, "sender"),
    ],
)
def test_insert_incoming_validates_fields(conn: sqlite3.Connection, kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"message_id": mid(1), "sender": BOB, "text": "t", "sent_at": T0, "now": T0}
    args.update(kwargs)
    with pytest.raises(StoreArgumentError) as info:
        repo.insert_incoming(conn, **args)  # type: ignore[arg-type]
    assert info.value.field == field
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_text_at_the_limit_is_accepted(conn: sqlite3.Connection) -> None:
    text = "€" * (MAX_TEXT_BYTES // 3)  # three bytes each
    assert repo.insert_incoming(conn, message_id=mid(1), sender=BOB, text=text, sent_at=T0, now=T0)
    assert repo.get_message(conn, mid(1)).text == text  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------- requests


def test_request_lifecycle_accept(conn: sqlite3.Connection) -> None:
    for n in range(3):
        repo.insert_incoming(
            conn, message_id=mid(n), sender=EVE, text=f"e{n}", sent_at=T0 + n, now=T0 + 10 * n, is_request=True
        )
    repo.insert_incoming(conn, message_id=mid(0), sender=EVE, text="dup", sent_at=T0, now=T0 + 99, is_request=True)
    request = repo.get_request(conn, EVE)
    assert request is not None
    assert (request.message_count, request.first_at, request.last_at) == (3, T0, T0 + 20)
    assert repo.count_requests(conn) == 1
    assert repo.inbox(conn) == []
    assert all(m.is_request for m in repo.history(conn, EVE))
    contact = repo.accept_request(conn, EVE, name="eve", now=T0 + 50)
    assert (contact.name, contact.state) == ("eve", ContactState.CONTACT)
    assert [m.text for m in repo.inbox(conn)] == ["e2", "e1", "e0"]
    assert repo.get_request(conn, EVE) is None
    with pytest.raises(UnknownRequestError):
        repo.accept_request(conn, EVE, name="eve", now=T0)


def test_request_reject_and_block(conn: sqlite3.Connection) -> None:
    repo.insert_incoming(conn, message_id=mid(1), sender=EVE, text="spam", sent_at=T0, now=T0, is_request=True)
    repo.insert_incoming(conn, message_id=mid(2), sender=CAROL, text="hi", sent_at=T0, now=T0, is_request=True)
    assert [r.peer_id for r in repo.list_requests(conn)] == sorted([EVE, CAROL])
    assert repo.reject_request(conn, EVE, block=True, now=T0 + 1) == 1
    assert repo.is_blocked(conn, EVE)
    assert repo.history(conn, EVE) == []
    assert repo.reject_request(conn, CAROL, block=False, now=T0 + 1) == 1
    assert not repo.is_blocked(conn, CAROL)
    assert repo.count_requests(conn) == 0


def test_accepting_keeps_an_existing_contact(conn: sqlite3.Connection) -> None:
    repo.insert_incoming(conn, message_id=mid(1), sender=EVE, text="x", sent_at=T0, now=T0, is_request=True)
    repo.add_contact(conn, peer_id=EVE, name="eve", now=T0)
    assert repo.accept_request(conn, EVE, name="other", now=T0).name == "eve"
    assert not repo.history(conn, EVE)[0].is_request


# --------------------------------------------------------------------------------------------------- outbox


def test_enqueue_creates_message_and_due_outbox_row(conn: sqlite3.Connection) -> None:
    stored = repo.enqueue(conn, message_id=mid(1), recipient=BOB, sender=ME, text="hi", sent_at=T0, now=T0 + 1)
    assert (stored.status, stored.direction, stored.conversation, stored.sender) == (
        MessageStatus.QUEUED,
        Direction.OUT,
        BOB,
        ME,
    )
    assert repo.get_message(conn, mid(1)) == stored
    assert repo.due_round(conn, now=T0).entries == []
    (entry,) = repo.due_round(conn, now=T0 + 1).entries
    assert (entry.message_id, entry.recipient, entry.text, entry.sent_at, entry.attempts, entry.seq) == (
        mid(1),
        BOB,
        "hi",
        T0,
        0,
        stored.seq,
    )
    assert repo.outbox_depth(conn) == 1


def test_outbox_lifecycle_sent_then_delivered(conn: sqlite3.Connection) -> None:
    send(conn, 1)
    assert repo.mark_sent(conn, mid(1), now=T0 + 10, retry_at=T0 + 30_000) is True
    message = repo.get_message(conn, mid(1))
    assert message is not None
    assert (message.status, message.status_at) == (MessageStatus.SENT, T0 + 10)
    assert repo.due_round(conn, now=T0 + 29_999).entries == []
    (entry,) = repo.due_round(conn, now=T0 + 30_000).entries  # no receipt yet: due again for a resend
    assert entry.attempts == 1
    # A receipt from someone else is ignored.
    assert repo.mark_delivered(conn, mid(1), recipient=CAROL, now=T0 + 20) is False
    assert repo.mark_delivered(conn, mid(1), recipient=BOB, now=T0 + 20) is True
    assert repo.get_message(conn, mid(1)).status is MessageStatus.DELIVERED  # type: ignore[union-attr]
    assert repo.outbox_depth(conn) == 0
    # Duplicate receipts and late "sent" marks change nothing.
    assert repo.mark_delivered(conn, mid(1), recipient=BOB, now=T0 + 30) is False
    assert repo.mark_sent(conn, mid(1), now=T0 + 40, retry_at=T0 + 50) is False
    # Schema v3: the delivery time is not kept; status_at stays the time of the last stored status ("sent").
    assert repo.get_message(conn, mid(1)).status_at == T0 + 10  # type: ignore[union-attr]


def test_receipt_may_overtake_sent_mark(conn: sqlite3.Connection) -> None:
    send(conn, 1)
    assert repo.mark_delivered(conn, mid(1), recipient=BOB, now=T0 + 5) is True
    assert repo.mark_sent(conn, mid(1), now=T0 + 6, retry_at=T0 + 10) is False
    assert repo.get_message(conn, mid(1)).status is MessageStatus.DELIVERED  # type: ignore[union-attr]


def test_receipts_for_incoming_or_unknown_ids_are_ignored(conn: sqlite3.Connection) -> None:
    repo.insert_incoming(conn, message_id=mid(1), sender=BOB, text="x", sent_at=T0, now=T0)
    assert repo.mark_delivered(conn, mid(1), recipient=BOB, now=T0) is False
    assert repo.mark_delivered(conn, mid(2), recipient=BOB, now=T0) is False
    assert repo.mark_sent(conn, mid(2), now=T0, retry_at=T0) is False
    assert repo.mark_failed(conn, mid(1), now=T0) is False
    assert repo.reschedule(conn, mid(2), now=T0, error="x") is None
    assert repo.get_message(conn, mid(1)).status is MessageStatus.RECEIVED  # type: ignore[union-attr]


def test_a_recipient_s_entries_are_rescheduled_for_one_time(conn: sqlite3.Connection) -> None:
    """reschedule_recipient: the due entries and the lost ones count the attempt; the delay follows the most attempts
    among them; every entry of the recipient gets that time, or (a session lives) only those that failed."""
    backoff = Backoff(base_ms=1000, factor=2.0, cap_ms=60_000, jitter=0.0)
    for n in (1, 2, 3):
        send(conn, n)
    send(conn, 4, to=CAROL)
    repo.reschedule(conn, mid(1), now=T0, error="first", backoff=backoff)  # 1 attempt, due at T0 + 1000
    repo.mark_sent(conn, mid(3), now=T0, retry_at=T0 + 30_000)  # on its way, resent at T0 + 30000 unless acked

    def schedule() -> list[tuple[int, int]]:
        entries = [repo.get_outbox_entry(conn, mid(n)) for n in (1, 2, 3, 4)]
        return [(e.attempts, e.next_attempt_at) for e in entries if e is not None]

    # At T0 + 1000 entries 1 and 2 are due; 2 attempts at most -> 2 s.  Not together: 3 keeps its own time.
    failed = repo.reschedule_recipient(
        conn, BOB, now=T0 + 1000, error="x", backoff=backoff, unit_random=0.0, together=False
    )
    assert failed == 2
    assert schedule() == [(2, T0 + 3000), (1, T0 + 3000), (1, T0 + 30_000), (0, T0)]
    # Together, with 3 lost (its session ended): all three count it, and all of Bob's share one time; Carol's not.
    failed = repo.reschedule_recipient(conn, BOB, now=T0 + 3000, error="y", lost=[mid(3)], unit_random=0.5)
    delay = Backoff().delay_ms(3, 0.5)  # the default schedule
    assert failed == 3
    assert schedule() == [(3, T0 + 3000 + delay), (2, T0 + 3000 + delay), (2, T0 + 3000 + delay), (0, T0)]
    assert repo.reschedule_recipient(conn, BOB, now=T0 + 3001, error="z", unit_random=0.0) == 0  # none due


def test_reschedule_backs_off_exponentially_with_jitter(conn: sqlite3.Connection) -> None:
    send(conn, 1)
    backoff = Backoff(base_ms=1000, factor=2.0, cap_ms=5000, jitter=0.0)
    delays = []
    now = T0
    for _ in range(5):
        next_at = repo.reschedule(conn, mid(1), now=now, error="dial failed", backoff=backoff)
        assert next_at is not None
        delays.append(next_at - now)
        now = next_at
    assert delays == [1000, 2000, 4000, 5000, 5000]
    entry = repo.get_outbox_entry(conn, mid(1))
    assert entry is not None
    assert (entry.attempts, entry.last_error, entry.next_attempt_at) == (5, "dial failed", now)
    # Jitter: deterministic with an injected RNG, always within [(1 - jitter) * d, d].
    jittered = Backoff(base_ms=1000, factor=2.0, cap_ms=60_000, jitter=0.5)
    rng = random.Random(7)
    got = [jittered.delay_ms(4, rng.random()) for _ in range(200)]
    assert all(4000 <= d <= 8000 for d in got)
    assert len(set(got)) > 100
    assert jittered.delay_ms(1000, 0.0) == 60_000  # huge attempt counts do not overflow
    # Long error texts are truncated, not refused.
    repo.reschedule(conn, mid(1), now=now, error="e" * 10_000, backoff=backoff)
    assert len(repo.get_outbox_entry(conn, mid(1)).last_error or "") == MAX_ERROR_CHARS  # type: ignore[union-attr]


def test_mark_sent_clears_last_error_and_counts_attempts(conn: sqlite3.Connection) -> None:
    send(conn, 1)
    repo.reschedule(conn, mid(1), now=T0, error="refused", rng=random.Random(1))
    repo.mark_sent(conn, mid(1), now=T0 + 5, retry_at=T0 + 100)
    entry = repo.get_outbox_entry(conn, mid(1))
    assert entry is not None
    assert (entry.attempts, entry.last_error, entry.next_attempt_at) == (2, None, T0 + 100)


def test_mark_failed_removes_from_outbox_but_a_late_receipt_still_counts(conn: sqlite3.Connection) -> None:
    send(conn, 1)
    assert repo.mark_failed(conn, mid(1), now=T0 + 1) is True
    assert repo.get_message(conn, mid(1)).status is MessageStatus.FAILED  # type: ignore[union-attr]
    assert repo.outbox_depth(conn) == 0
    assert repo.mark_failed(conn, mid(1), now=T0 + 2) is False
    assert repo.mark_delivered(conn, mid(1), recipient=BOB, now=T0 + 3) is True


def test_due_order_and_flush_for_a_recipient(conn: sqlite3.Connection) -> None:
    for n in range(4):
        send(conn, n, to=BOB if n % 2 == 0 else CAROL, sent_at=T0)
    repo.reschedule(conn, mid(0), now=T0, error="offline", backoff=Backoff(jitter=0.0, base_ms=60_000, cap_ms=60_000))
    assert repo.next_attempt_at(conn) == T0
    assert due_ids(conn, now=T0) == [mid(1), mid(3), mid(2)]  # by recipient, in send order
    assert due_ids(conn, now=T0, limit=2) == [mid(1), mid(2)]  # a share of the limit each
    assert [e.message_id for e in repo.due_for(conn, BOB)] == [mid(0), mid(2)]  # whatever the schedule
    assert repo.expedite(conn, BOB, now=T0 + 1) == 1  # only mid(0) was scheduled later
    # Bob's older message first, though it became due after his newer one (by due time it was overtaken).
    assert due_ids(conn, now=T0 + 1) == [mid(0), mid(2), mid(1), mid(3)]
    round_ = repo.due_round(conn, now=T0 + 1, limit=1)  # the entry due longest is Carol's: her round, cut
    assert ([e.message_id for e in round_.entries], round_.cut, round_.more) == ([mid(1)], {CAROL}, True)


def test_expedite_ids_makes_only_those_due_and_only_if_later(conn: sqlite3.Connection) -> None:
    for n in range(3):
        send(conn, n, sent_at=T0)
    later = Backoff(jitter=0.0, base_ms=60_000, cap_ms=60_000)
    for n in range(3):
        repo.reschedule(conn, mid(n), now=T0, error="offline", backoff=later)
    assert repo.expedite_ids(conn, [mid(0), mid(2), mid(9)], now=T0 + 5) == 2  # mid(9) is not in the outbox
    assert due_ids(conn, now=T0 + 5) == [mid(0), mid(2)]
    assert repo.expedite_ids(conn, [mid(0)], now=T0 + 9) == 0  # due already: left as it is
    assert repo.get_outbox_entry(conn, mid(0)).next_attempt_at == T0 + 5  # type: ignore[union-attr]


def test_postpone_ids_delays_only_those_only_if_earlier_and_counts_no_attempt(conn: sqlite3.Connection) -> None:
    for n in range(3):
        send(conn, n, sent_at=T0)
    repo.reschedule(conn, mid(2), now=T0, error="offline", backoff=Backoff(jitter=0.0, base_ms=9000, cap_ms=9000))
    assert repo.postpone_ids(conn, [mid(0), mid(2), mid(9)], until=T0 + 5000) == 1  # mid(2) waits longer already
    assert due_ids(conn, now=T0 + 4999) == [mid(1)]
    postponed = repo.get_outbox_entry(conn, mid(0))
    assert postponed is not None and (postponed.attempts, postponed.next_attempt_at) == (0, T0 + 5000)
    assert repo.get_outbox_entry(conn, mid(2)).next_attempt_at == T0 + 9000  # type: ignore[union-attr]


def test_a_round_says_which_recipients_it_cut_and_whether_others_may_wait(conn: sqlite3.Connection) -> None:
    """The outbox worker must not take a recipient whose due entries did not all fit for done (new sends would then
    bypass the rest), nor any other when the round read only the entries due longest (a review found both)."""
    for n in range(10):
        send(conn, n, to=BOB, sent_at=T0)
    send(conn, 10, to=CAROL, sent_at=T0 - 1)  # due before Bob's
    round_ = repo.due_round(conn, now=T0, limit=4)  # Carol's entry and three of Bob's are the four due longest
    assert [e.message_id for e in round_.entries] == [mid(10), mid(0), mid(1)]  # half the limit each
    assert (round_.cut, round_.more) == ({BOB}, True)
    whole = repo.due_round(conn, now=T0, limit=100)
    assert (len(whole.entries), whole.cut, whole.more) == (11, set(), False)
    exact = repo.due_round(conn, now=T0, limit=11)  # as many as are due: it cannot tell there are no more
    assert (len(exact.entries), exact.cut, exact.more) == (1 + 5, {BOB}, True)
    assert repo.due_round(conn, now=T0 - 2).entries == [] and repo.next_attempt_at(conn) == T0 - 1
    for n in range(11):
        repo.mark_failed(conn, mid(n), now=T0 + 6)
    assert repo.due_round(conn, now=T0 + 6).entries == [] and repo.next_attempt_at(conn) is None


def test_deleting_a_message_cascades_to_its_outbox_row(conn: sqlite3.Connection) -> None:
    send(conn, 1)
    conn.execute("DELETE FROM messages WHERE message_id = ?", (mid(1),))
    assert repo.outbox_depth(conn) == 0


def test_status_transition_table() -> None:
    assert can_transition(MessageStatus.QUEUED, MessageStatus.SENT)
    assert can_transition(MessageStatus.SENT, MessageStatus.DELIVERED)
    assert can_transition(MessageStatus.FAILED, MessageStatus.DELIVERED)
    assert not can_transition(MessageStatus.DELIVERED, MessageStatus.SENT)
    assert not can_transition(MessageStatus.SENT, MessageStatus.QUEUED)
    assert not any(can_transition(MessageStatus.RECEIVED, new) for new in MessageStatus)
    assert set(STATUS_TRANSITIONS) == set(MessageStatus)


def test_backoff_parameters_are_checked() -> None:
    with pytest.raises(StoreArgumentError):
        Backoff(base_ms=0)
    with pytest.raises(StoreArgumentError):
        Backoff(factor=float("nan"))
    with pytest.raises(StoreArgumentError):
        Backoff(jitter=1.5)


# --------------------------------------------------------------------------------------------------- peer records


def test_peer_record_cache_highest_seq_wins(conn: sqlite3.Connection) -> None:
    assert repo.put_peer_record(conn, peer_id=BOB, record=b"r5", seq=5, expires_at=T0 + 100, now=T0) is True
    assert repo.put_peer_record(conn, peer_id=BOB, record=b"r4", seq=4, expires_at=T0 + 900, now=T0 + 1) is False
    assert repo.put_peer_record(conn, peer_id=BOB, record=b"r5", seq=5, expires_at=T0 + 100, now=T0 + 2) is False
    cached = repo.get_peer_record(conn, BOB)
    assert cached is not None
    assert (cached.record, cached.seq, cached.fetched_at) == (b"r5", 5, T0 + 2)
    assert repo.put_peer_record(conn, peer_id=BOB, record=b"r6", seq=6, expires_at=T0 + 200, now=T0 + 3) is True
    cached = repo.get_peer_record(conn, BOB)
    assert cached is not None
    assert (cached.record, cached.seq, cached.expires_at) == (b"r6", 6, T0 + 200)
    assert not cached.is_expired(T0 + 199) and cached.is_expired(T0 + 200)


def test_peer_record_prune_and_delete(conn: sqlite3.Connection) -> None:
    repo.put_peer_record(conn, peer_id=BOB, record=b"b", seq=1, expires_at=T0 + 10, now=T0)
    repo.put_peer_record(conn, peer_id=CAROL, record=b"c", seq=1, expires_at=T0 + 20, now=T0)
    assert repo.prune_peer_records(conn, now=T0 + 10) == 1
    assert repo.get_peer_record(conn, BOB) is None
    assert repo.delete_peer_record(conn, CAROL) is True
    assert repo.delete_peer_record(conn, CAROL) is False
    with pytest.raises(StoreArgumentError, match="record"):
        repo.put_peer_record(conn, peer_id=BOB, record=b"x" * 8193, seq=1, expires_at=T0, now=T0)


# --------------------------------------------------------------------------------------------------- DHT nodes


def _node(n: int, last_seen: int) -> DhtNode:
    return DhtNode(node_id=n.to_bytes(20, "big"), host="127.0.0.1", port=4000 + n % 1000, last_seen=last_seen)


def test_dht_nodes_save_replaces_and_load_orders_by_recency(conn: sqlite3.Connection) -> None:
    assert repo.save_dht_nodes(conn, [_node(1, T0), _node(2, T0 + 5), _node(1, T0 + 9)]) == 2
    loaded = repo.load_dht_nodes(conn)
    assert [(n.node_id[-1], n.last_seen) for n in loaded] == [(1, T0 + 9), (2, T0 + 5)]
    assert repo.save_dht_nodes(conn, [_node(3, T0)]) == 1
    assert [n.node_id[-1] for n in repo.load_dht_nodes(conn)] == [3]


def test_dht_nodes_are_bounded_keeping_the_most_recent(conn: sqlite3.Connection) -> None:
    nodes = [_node(n, T0 + n) for n in range(MAX_DHT_NODES + 50)]
    assert repo.save_dht_nodes(conn, nodes) == MAX_DHT_NODES
    loaded = repo.load_dht_nodes(conn, limit=MAX_DHT_NODES)
    assert min(n.last_seen for n in loaded) == T0 + 50


@pytest.mark.parametrize(
    "node",
    [
        DhtNode(node_id=b"x" * 19, host="h", port=1, last_seen=0),
        DhtNode(node_id=b"x" * 20, host="", port=1, last_seen=0),
        DhtNode(node_id=b"x" * 20, host="a b", port=1, last_seen=0),
        DhtNode(node_id=b"x" * 20, host="h" * 256, port=1, last_seen=0),
        DhtNode(node_id=b"x" * 20, host="h", port=0, last_seen=0),
        DhtNode(node_id=b"x" * 20, host="h", port=65536, last_seen=0),
    ],
)
def test_dht_nodes_are_validated(conn: sqlite3.Connection, node: DhtNode) -> None:
    repo.save_dht_nodes(conn, [_node(1, T0)])
    with pytest.raises(StoreArgumentError):
        repo.save_dht_nodes(conn, [node])
    assert len(repo.load_dht_nodes(conn)) == 1  # validation happens before the old table is replaced


def test_limits_are_validated(conn: sqlite3.Connection) -> None:
    for bad in (0, -1, 10_001, True):
        with pytest.raises(StoreArgumentError, match="limit"):
            repo.history(conn, BOB, limit=bad)
    with pytest.raises(StoreArgumentError, match="before"):
        repo.history(conn, BOB, before=(1, 2))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- batch variants


def outgoing(n: int, *, to: bytes = BOB) -> OutgoingMessage:
    return OutgoingMessage(message_id=mid(n), recipient=to, sender=ME, text=f"t{n}", sent_at=T0 + n)


def test_enqueue_many_stores_messages_and_outbox_rows_in_order(conn: sqlite3.Connection) -> None:
    send(conn, 100)
    conn.execute("DELETE FROM messages WHERE message_id = ?", (mid(100),))  # seq values are never reused
    seqs = repo.enqueue_many(conn, [outgoing(n) for n in range(5)], now=T0)
    assert seqs == [2, 3, 4, 5, 6]
    assert [(m.seq, m.text, m.status) for m in repo.history(conn, BOB)] == [
        (s, f"t{n}", MessageStatus.QUEUED) for n, s in enumerate(seqs)
    ]
    assert [e.seq for e in repo.due_round(conn, now=T0).entries] == seqs
    send(conn, 200)
    assert repo.get_message(conn, mid(200)).seq == 7  # type: ignore[union-attr]


def test_enqueue_many_is_all_or_nothing_on_duplicates(conn: sqlite3.Connection) -> None:
    send(conn, 3)
    with pytest.raises(DuplicateMessageError):
        repo.enqueue_many(conn, [outgoing(1), outgoing(2), outgoing(3), outgoing(4)], now=T0)
    with pytest.raises(DuplicateMessageError, match="twice"):
        repo.enqueue_many(conn, [outgoing(5), outgoing(5)], now=T0)
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    assert repo.outbox_depth(conn) == 1
    assert repo.enqueue_many(conn, [], now=T0) == []


def test_insert_incoming_many_reports_duplicates_per_item(conn: sqlite3.Connection) -> None:
    repo.insert_incoming(conn, message_id=mid(2), sender=BOB, text="old", sent_at=T0, now=T0)
    items = [
        IncomingMessage(message_id=mid(1), sender=BOB, text="a", sent_at=T0 + 1),
        IncomingMessage(message_id=mid(2), sender=BOB, text="dup of stored", sent_at=T0 + 2),
        IncomingMessage(message_id=mid(3), sender=EVE, text="req", sent_at=T0 + 3, is_request=True),
        IncomingMessage(message_id=mid(1), sender=BOB, text="dup in batch", sent_at=T0 + 4),
        IncomingMessage(message_id=mid(4), sender=EVE, text="req2", sent_at=T0 + 5, is_request=True),
    ]
    assert repo.insert_incoming_many(conn, items, now=T0 + 9) == [True, False, True, False, True]
    assert [m.text for m in repo.history(conn, BOB)] == ["old", "a"]
    request = repo.get_request(conn, EVE)
    assert request is not None and request.message_count == 2
    assert repo.insert_incoming_many(conn, items, now=T0 + 10) == [False] * 5


def test_batch_functions_refuse_oversized_batches(conn: sqlite3.Connection) -> None:
    with pytest.raises(StoreArgumentError, match="message_ids"):
        repo.mark_sent_many(conn, [mid(1)] * 10_001, now=T0, retry_at=T0)
    with pytest.raises(StoreArgumentError, match="items"):
        repo.enqueue_many(conn, [object()], now=T0)  # type: ignore[list-item]


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["sent", "delivered", "delivered-by-stranger", "failed"]),
        st.lists(st.integers(min_value=0, max_value=9), max_size=6),
    ),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_batch_status_updates_match_the_single_ones(ops: list[tuple[str, list[int]]]) -> None:
    """The same receipts applied one by one and as batches leave the same messages and outbox."""
    single, batch = _connect(":memory:"), _connect(":memory:")
    for n in range(10):
        send(single, n)
    repo.enqueue_many(batch, [outgoing(n) for n in range(10)], now=T0)
    # enqueue_many used its own texts/timestamps; align the rows that the comparison looks at.
    batch.execute("UPDATE messages SET text = 'hi', sent_at = ?, stored_at = ?, status_at = ?", (T0, T0, T0))
    single.execute("UPDATE messages SET sent_at = ?, stored_at = ?, status_at = ?", (T0, T0, T0))
    single.execute("UPDATE outbox SET next_attempt_at = ?, enqueued_at = ?", (T0, T0))
    for step, (op, numbers) in enumerate(ops):
        now = T0 + 10 * (step + 1)
        ids = [mid(n) for n in numbers]
        if op == "sent":
            expected = sum(repo.mark_sent(single, m, now=now, retry_at=now + 5) for m in ids)
            assert repo.mark_sent_many(batch, ids, now=now, retry_at=now + 5) == expected
        elif op == "failed":
            for m in ids:
                repo.mark_failed(single, m, now=now)
                repo.mark_failed(batch, m, now=now)
        else:
            peer = BOB if op == "delivered" else EVE
            expected = sum(repo.mark_delivered(single, m, recipient=peer, now=now) for m in ids)
            assert repo.mark_delivered_many(batch, ids, recipient=peer, now=now) == expected
    dump_messages = "SELECT message_id, status, status_at FROM messages ORDER BY seq"
    dump_outbox = "SELECT seq, attempts, next_attempt_at FROM outbox ORDER BY seq"
    assert single.execute(dump_messages).fetchall() == batch.execute(dump_messages).fetchall()
    assert single.execute(dump_outbox).fetchall() == batch.execute(dump_outbox).fetchall()
    single.close()
    batch.close()


def test_enqueue_many_with_a_resend_time_and_expedite_unattempted(conn: sqlite3.Connection) -> None:
    ahead = dataclasses.replace(outgoing(1), next_attempt_at=T0 + 30_000)
    repo.enqueue_many(conn, [outgoing(0), ahead], now=T0)
    assert due_ids(conn, now=T0) == [mid(0)]  # the other one waits for its resend time
    assert repo.get_outbox_entry(conn, mid(1)).next_attempt_at == T0 + 30_000  # type: ignore[union-attr]
    send(conn, 2)
    repo.reschedule(conn, mid(2), now=T0, error="dial failed")  # attempted: keeps its backoff
    assert repo.expedite_unattempted(conn, now=T0 + 5) == 1
    assert due_ids(conn, now=T0 + 5) == [mid(0), mid(1)]
    with pytest.raises(StoreArgumentError):
        repo.enqueue_many(conn, [dataclasses.replace(outgoing(3), next_attempt_at=-1)], now=T0)


@pytest.mark.parametrize("count", [1, 7, 8, 9, 29, 30, 125, 126, 509, 510, 600, 1100])  # IN-list size boundaries
def test_mark_delivered_ids_matches_mark_delivered_one_by_one(count: int) -> None:
    def scenario(conn: sqlite3.Connection) -> None:
        for n in range(count):
            send(conn, n)
        send(conn, 5000, to=CAROL)
        repo.insert_incoming(conn, message_id=mid(7000), sender=BOB, text="in", sent_at=T0, now=T0)  # not outgoing
        repo.mark_failed(conn, mid(count - 1), now=T0 + 1)  # a receipt still proves delivery of a failed one
        if count > 2:
            repo.mark_delivered(conn, mid(1), recipient=BOB, now=T0 + 1)  # already delivered

    # repeat, other peer, unknown, incoming
    ids = [mid(n) for n in reversed(range(count))] + [mid(0), mid(5000), mid(9999), mid(7000)]
    one, many = _connect(":memory:"), _connect(":memory:")
    scenario(one)
    scenario(many)
    expected = [m for m in ids if repo.mark_delivered(one, m, recipient=BOB, now=T0 + 2)]
    assert repo.mark_delivered_ids(many, ids, recipient=BOB, now=T0 + 2) == expected
    assert len(expected) == (count - 1 if count > 2 else count)
    dump = "SELECT message_id, status, status_at FROM messages ORDER BY seq"
    assert many.execute(dump).fetchall() == one.execute(dump).fetchall()
    assert repo.outbox_depth(many) == repo.outbox_depth(one) == 1  # carol's
    assert repo.mark_delivered_ids(many, [], recipient=BOB, now=T0) == []


def test_blocking_a_stranger_drops_its_pending_request(conn: sqlite3.Connection) -> None:
    for n in range(2):
        repo.insert_incoming(conn, message_id=mid(n), sender=EVE, text="spam", sent_at=T0, now=T0, is_request=True)
    repo.insert_incoming(conn, message_id=mid(9), sender=CAROL, text="hi", sent_at=T0, now=T0, is_request=True)
    repo.block_peer(conn, EVE, now=T0 + 1)
    assert [r.peer_id for r in repo.list_requests(conn)] == [CAROL]
    assert repo.count_requests(conn) == 1
    assert repo.history(conn, EVE) == []
    with pytest.raises(PeerBlockedError, match="blocked"):
        repo.accept_request(conn, EVE, name="eve", now=T0 + 2)
    assert repo.is_blocked(conn, EVE)


def test_accept_refuses_a_blocked_peer_even_with_a_request_row(conn: sqlite3.Connection) -> None:
    # A request row left behind by an older version must not let ``accept`` unblock the peer.
    repo.insert_incoming(conn, message_id=mid(1), sender=EVE, text="x", sent_at=T0, now=T0, is_request=True)
    conn.execute(
        "INSERT INTO contacts (peer_id, name, state, verified, added_at, updated_at) "
        "VALUES (?, 'eve', 'blocked', 0, ?, ?)",
        (EVE, T0, T0),
    )
    with pytest.raises(PeerBlockedError, match="blocked"):
        repo.accept_request(conn, EVE, name="eve2", now=T0 + 2)
    assert repo.is_blocked(conn, EVE)


def test_request_bytes_count_only_pending_request_texts(conn: sqlite3.Connection) -> None:
    assert repo.request_bytes(conn) == 0 and repo.request_bytes(conn, EVE) == 0
    repo.insert_incoming(conn, message_id=mid(1), sender=EVE, text="é" * 10, sent_at=T0, now=T0, is_request=True)
    repo.insert_incoming(conn, message_id=mid(2), sender=CAROL, text="abc", sent_at=T0, now=T0, is_request=True)
    repo.insert_incoming(conn, message_id=mid(3), sender=BOB, text="not a request", sent_at=T0, now=T0)
    assert repo.request_bytes(conn, EVE) == 20  # UTF-8 bytes, not characters
    assert repo.request_bytes(conn) == 23
    repo.accept_request(conn, CAROL, name="carol", now=T0)
    assert repo.request_bytes(conn) == 20 and repo.request_bytes(conn, CAROL) == 0


def test_incoming_after_counts_received_texts_above_a_seq(conn: sqlite3.Connection) -> None:
    """The bound on an auto-added contact: its received messages (not requests, not ours) stored after a mark."""
    repo.insert_incoming(conn, message_id=mid(1), sender=EVE, text="before", sent_at=T0, now=T0)
    mark = repo.last_message_seq(conn)
    assert repo.incoming_after(conn, EVE, mark) == (0, 0) and not repo.has_messages(conn, CAROL)
    repo.insert_incoming(conn, message_id=mid(2), sender=EVE, text="é" * 10, sent_at=T0, now=T0)
    repo.insert_incoming(conn, message_id=mid(3), sender=EVE, text="request", sent_at=T0, now=T0, is_request=True)
    repo.insert_incoming(conn, message_id=mid(4), sender=CAROL, text="abc", sent_at=T0, now=T0)
    assert repo.incoming_after(conn, EVE, mark) == (1, 20)  # UTF-8 bytes
    assert repo.incoming_after(conn, EVE, 0) == (2, 26)
    assert repo.last_message_seq(conn) == mark + 3 and repo.has_messages(conn, CAROL)


def test_count_settings_counts_a_key_prefix(conn: sqlite3.Connection) -> None:
    for key in ("chat.auto_added.aa", "chat.auto_added.bb", "chat.auto_adder", "chat.auto_added", "chat.hints.aa"):
        repo.set_setting(conn, key, b"", now=T0)
    assert repo.count_settings(conn, "chat.auto_added.") == 2
    assert repo.count_settings(conn, "chat.") == 5
    assert repo.count_settings(conn, "nothing.") == 0

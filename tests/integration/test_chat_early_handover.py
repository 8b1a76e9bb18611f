"""A message goes to the wire while its enqueue transaction commits (real sockets, real SQLite, two services).

The sender's SQLite writer is held busy by a write that waits on a ``threading.Event``, so the enqueue of the next
``send`` cannot commit: the recipient must still receive the message, ``send`` must not return before the commit,
and the sender's subscribers must see ``message`` before ``sent`` before ``delivered``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import p2pmsg.chat.service as chat_service
from p2pmsg.chat.service import ChatConfig, ChatService
from p2pmsg.identity import Identity
from p2pmsg.net.listener import Listener
from p2pmsg.store import repo
from p2pmsg.store.db import Database, open_database
from p2pmsg.store.errors import StoreWriteError
from p2pmsg.wire.multiaddr import Multiaddr

ALICE = Identity.from_seed(bytes([0xE1]) * 32)
BOB = Identity.from_seed(bytes([0xE2]) * 32)
LOCAL_TCP = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="p2pe-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _Events:
    """Records (event, fields) published by a service, and lets a test wait for a condition on them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.changed = trio.Event()

    def __call__(self, event: str, /, **fields: Any) -> None:
        self.seen.append((event, fields))
        self.changed.set()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(10):
            while not condition():
                self.changed = trio.Event()
                await self.changed.wait()

    def texts_in(self) -> list[str]:
        """The texts of the incoming ``message`` events, in the order they were published."""
        return [f["text"] for e, f in self.seen if e == "message" and f["direction"] == "in"]

    def statuses(self, mid: str) -> list[str]:
        """The order in which ``mid`` appeared: ``message`` then its receipt statuses."""
        out = []
        for event, fields in self.seen:
            if event == "message" and fields["id"] == mid:
                out.append("message")
            elif event == "receipt" and mid in fields["ids"]:
                out.append(fields["status"])
        return out


def _at_least(events: _Events, count: int) -> bool:
    return len(events.texts_in()) >= count


@dataclasses.dataclass
class _Pair:
    alice: ChatService
    alice_db: Database
    alice_events: _Events
    bob_events: _Events
    nursery: trio.Nursery


@contextlib.asynccontextmanager
async def _pair(home: Path, config: ChatConfig | None = None, tag: str = "") -> AsyncIterator[_Pair]:
    """Alice and Bob (real databases, a real TCP session on loopback), contacts of each other, with a session from
    Alice to Bob that is in order; everything stops when the block ends."""
    alice_events, bob_events = _Events(), _Events()
    async with (
        open_database(home / f"alice{tag}.db") as alice_db,
        open_database(home / f"bob{tag}.db") as bob_db,
        trio.open_nursery() as nursery,
    ):
        alice = ChatService(ALICE, alice_db, config=config or ChatConfig(), events=alice_events)
        bob = ChatService(BOB, bob_db, config=ChatConfig(), events=bob_events)
        bob_addrs = await nursery.start(Listener(BOB, bob.handle_inbound).run, [LOCAL_TCP])
        await nursery.start(alice.run)
        await nursery.start(bob.run)
        await alice.add_contact(bob.invite(bob_addrs), "bob")
        await bob.add_contact(str(ALICE.peer_id), "alice")
        # The first message opens the session; the second one goes the fast path (session in order).
        for text in ("hello", "again"):
            mid = (await alice.send("bob", text))["id"]
            await alice_events.wait_for(functools.partial(_has_status, alice_events, mid, "delivered"))
        yield _Pair(alice, alice_db, alice_events, bob_events, nursery)
        nursery.cancel_scope.cancel()


def _has_status(events: _Events, mid: str, status: str) -> bool:
    return status in events.statuses(mid)


async def _hold_writer(db: Database, release: threading.Event, holding: threading.Event) -> None:
    def block(_: object) -> None:
        holding.set()
        release.wait(10)

    await db.write(block)


async def _writer_held(pair: _Pair) -> threading.Event:
    """Make Alice's store writer busy with a write that waits until the returned event is set."""
    release, holding = threading.Event(), threading.Event()
    pair.nursery.start_soon(_hold_writer, pair.alice_db, release, holding)
    with trio.fail_after(10):
        while not holding.is_set():
            await trio.sleep(0.001)
    return release


async def _release_and_check_order(pair: _Pair, release: threading.Event, result: dict[str, Any]) -> str:
    """Let the held writer go, wait for the ``send`` that fills ``result`` and for its ``delivered`` receipt, check
    that Alice's subscribers saw ``message``, then ``sent``, then ``delivered``; return the message id."""
    release.set()
    with trio.fail_after(10):
        while not result:
            await trio.sleep(0.001)
    mid: str = result["id"]
    await pair.alice_events.wait_for(functools.partial(_has_status, pair.alice_events, mid, "delivered"))
    assert pair.alice_events.statuses(mid) == ["message", "sent", "delivered"]
    return mid


async def test_the_envelope_reaches_the_recipient_while_the_enqueue_commits(home: Path) -> None:
    async with _pair(home) as pair:
        alice, alice_events, bob_events = pair.alice, pair.alice_events, pair.bob_events
        release = await _writer_held(pair)
        result: dict[str, Any] = {}

        async def send() -> None:
            result.update(await alice.send("bob", "while the writer is busy"))

        before = len(alice_events.seen)
        pair.nursery.start_soon(send)
        # Bob stores it although Alice's enqueue is still queued behind the held write.
        await bob_events.wait_for(lambda: "while the writer is busy" in bob_events.texts_in())
        await trio.sleep(0.05)  # Bob's receipt comes back meanwhile: it must wait for Alice's commit
        assert result == {}, "send returned before its enqueue transaction committed"
        assert alice_events.seen[before:] == [], "an event was published before the enqueue committed"
        mid = await _release_and_check_order(pair, release, result)
        stored = await pair.alice_db.read(lambda c: repo.get_message(c, bytes.fromhex(mid)))
        assert stored is not None and stored.status.value == "delivered"


async def test_a_failed_enqueue_withdraws_what_was_not_written_and_publishes_nothing(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that fails (a full disk, here a fault injected into the enqueue function, which no test can cause
    for real on demand) answers the caller with the error, and no event or receipt of that message is published."""
    async with _pair(home) as pair:
        alice, alice_events = pair.alice, pair.alice_events

        def failing_enqueue(*_: object, **__: object) -> list[int]:
            raise StoreWriteError("database or disk is full")

        monkeypatch.setattr(chat_service.repo, "enqueue_rows", failing_enqueue)
        before = len(alice_events.seen)
        with pytest.raises(StoreWriteError):
            await alice.send("bob", "never stored")
        monkeypatch.undo()
        await trio.sleep(0.1)  # any receipt from Bob for the written envelope arrives meanwhile
        assert alice_events.seen[before:] == []
        assert not alice._uncommitted and not alice._deferred_receipts and not alice._premarked
        # The session still works and nothing is stuck in flight.
        mid = (await alice.send("bob", "after the failure"))["id"]
        await alice_events.wait_for(functools.partial(_has_status, alice_events, mid, "delivered"))
        assert not alice._inflight


async def test_entries_left_over_by_a_full_session_are_not_overtaken(home: Path) -> None:
    """A session queue of one: the first round (three texts, queued while the writer is busy) leaves entries for the
    outbox worker; a send of the next round must not go straight to the session ahead of them."""
    for trial in range(3):
        async with _pair(home, ChatConfig(batch_size=1, max_session_queue=1), tag=str(trial)) as pair:
            release = await _writer_held(pair)
            pair.nursery.start_soon(pair.alice.send_many, "bob", ["x1", "x2", "x3"])
            await trio.sleep(0.05)
            pair.nursery.start_soon(pair.alice.send, "bob", "y1")
            await trio.sleep(0.05)
            release.set()
            await pair.bob_events.wait_for(functools.partial(_at_least, pair.bob_events, 6))
            assert pair.bob_events.texts_in() == ["hello", "again", "x1", "x2", "x3", "y1"], f"trial {trial}"


async def test_a_failed_enqueue_says_when_the_message_may_still_arrive(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit fails only after the envelope went out (a slow disk that then reports an error): the recipient
    may store it, so the error says so (a user retrying would otherwise not expect a second copy)."""
    async with _pair(home) as pair:

        def slow_failing_enqueue(*_: object, **__: object) -> list[int]:
            time.sleep(0.3)  # on the writer thread: the session writes the envelope meanwhile
            raise StoreWriteError("disk I/O error")

        monkeypatch.setattr(chat_service.repo, "enqueue_rows", slow_failing_enqueue)
        with pytest.raises(StoreWriteError, match=r"1 of 1 message.*may still arrive"):
            await pair.alice.send("bob", "on the wire before the failure")
        monkeypatch.undo()
        await pair.bob_events.wait_for(lambda: "on the wire before the failure" in pair.bob_events.texts_in())
        alice = pair.alice
        assert not alice._uncommitted and not alice._deferred_receipts and not alice._inflight


async def test_a_subscriber_arriving_during_the_commit_gets_every_receipt(home: Path) -> None:
    """Nobody listens when the envelope goes out and its ``sent`` receipt happens (before the commit); a subscriber
    arrives before the commit ends: it still sees ``message``, then ``sent``, then ``delivered`` (receipts of
    uncommitted ids are held back even while nobody listens)."""
    async with _pair(home) as pair:
        alice, bob_events = pair.alice, pair.bob_events
        listening = [False]
        alice._listening = lambda: listening[0]  # what the node passes: its event hub has subscribers
        release = await _writer_held(pair)
        result: dict[str, Any] = {}

        async def send() -> None:
            result.update(await alice.send("bob", "mid-burst"))

        pair.nursery.start_soon(send)
        await bob_events.wait_for(lambda: "mid-burst" in bob_events.texts_in())
        await trio.sleep(0.05)  # the 'sent' receipt happens meanwhile, before the commit
        listening[0] = True  # a control client subscribes before the message event
        await _release_and_check_order(pair, release, result)

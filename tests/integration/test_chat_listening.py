"""``ChatService(listening=...)``: while nobody listens the hot paths build no ``message`` or ``receipt`` events at
all, and delivery is unchanged; once someone listens the events come again (real sockets, real SQLite)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pmsg.chat.service import ChatService
from p2pmsg.identity import Identity
from p2pmsg.net.listener import Listener
from p2pmsg.store import repo
from p2pmsg.store.db import Database, open_database
from p2pmsg.wire.multiaddr import Multiaddr

ALICE = Identity.from_seed(bytes([0xE5]) * 32)
BOB = Identity.from_seed(bytes([0xE6]) * 32)
LOCAL_TCP = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="p2pl-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _Sink:
    """An event sink that records what it is given and says whether it listens (``on``)."""

    def __init__(self) -> None:
        self.on = False
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, /, **fields: Any) -> None:
        self.seen.append((event, fields))

    def listening(self) -> bool:
        return self.on

    def kinds(self) -> list[str]:
        return [event for event, _ in self.seen]


async def _status(db: Database, mid: str) -> str:
    stored = await db.read(lambda c: repo.get_message(c, bytes.fromhex(mid)))
    assert stored is not None
    return stored.status.value


async def _until_delivered(db: Database, mids: list[str]) -> None:
    with trio.fail_after(10):
        while [await _status(db, mid) for mid in mids] != ["delivered"] * len(mids):
            await trio.sleep(0.01)


async def _until_stored(db: Database, mids: list[str]) -> None:
    ids = [bytes.fromhex(mid) for mid in mids]
    with trio.fail_after(10):
        while await db.read(lambda c: [repo.get_message(c, i) for i in ids].count(None)):
            await trio.sleep(0.01)


async def test_no_listener_no_hot_path_events_and_delivery_unchanged(home: Path) -> None:
    alice_sink, bob_sink = _Sink(), _Sink()
    async with (
        open_database(home / "alice.db") as alice_db,
        open_database(home / "bob.db") as bob_db,
        trio.open_nursery() as nursery,
    ):
        alice = ChatService(ALICE, alice_db, events=alice_sink, listening=alice_sink.listening)
        bob = ChatService(BOB, bob_db, events=bob_sink, listening=bob_sink.listening)
        bob_addrs = await nursery.start(Listener(BOB, bob.handle_inbound).run, [LOCAL_TCP])
        await nursery.start(alice.run)
        await nursery.start(bob.run)
        await alice.add_contact(bob.invite(bob_addrs), "bob")
        await bob.add_contact(str(ALICE.peer_id), "alice")

        quiet = (await alice.send_many("bob", ["one", "two", "three"]))["ids"]
        quiet.append((await alice.send("bob", "four"))["id"])
        await _until_delivered(alice_db, quiet)
        await _until_stored(bob_db, quiet)
        assert [k for k in alice_sink.kinds() if k in ("message", "receipt")] == []
        assert [k for k in bob_sink.kinds() if k in ("message", "request")] == []
        history = await bob.history("alice")
        assert [m["text"] for m in history] == ["one", "two", "three", "four"]

        alice_sink.on = bob_sink.on = True
        heard = (await alice.send_many("bob", ["five", "six"]))["ids"]
        await _until_delivered(alice_db, heard)
        with trio.fail_after(10):
            while len([k for k in bob_sink.kinds() if k == "message"]) < 2:
                await trio.sleep(0.01)
        assert [f["text"] for e, f in bob_sink.seen if e == "message"] == ["five", "six"]
        assert [f["id"] for e, f in alice_sink.seen if e == "message"] == heard
        delivered = [
            mid for e, f in alice_sink.seen if e == "receipt" and f["status"] == "delivered" for mid in f["ids"]
        ]
        assert delivered == heard
        nursery.cancel_scope.cancel()

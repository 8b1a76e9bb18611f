"""A control-API subscriber that keeps reading is never dropped during a burst of sends (real sockets and SQLite)."""

from __future__ import annotations

import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from p2pmsg.chat.errors import BadRequestError
from p2pmsg.chat.service import ChatConfig, ChatService
from p2pmsg.control import ControlRequestError, ControlServer, EventHub, check_params, control_socket_path
from p2pmsg.identity import Identity
from p2pmsg.net.listener import Listener
from p2pmsg.store.db import open_database
from p2pmsg.wire.multiaddr import Multiaddr

ALICE = Identity.from_seed(bytes([0xA7]) * 32)
BOB = Identity.from_seed(bytes([0xB7]) * 32)
LOCAL_TCP = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")
BURST = 2000
SENDERS = 64


@pytest.fixture
def home() -> Iterator[Path]:
    # A short path: a Unix socket path holds 107 bytes, and pytest's tmp_path can be longer than that.
    path = Path(tempfile.mkdtemp(prefix="p2pb-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _frames(buffer: bytearray) -> list[dict[str, Any]]:
    """Pop the complete control frames (4-byte big-endian length + msgpack map) off ``buffer``."""
    out = []
    while len(buffer) >= 4:
        (size,) = struct.unpack(">I", buffer[:4])
        if len(buffer) < 4 + size:
            break
        out.append(msgpack.unpackb(bytes(buffer[4 : 4 + size]), raw=False))
        del buffer[: 4 + size]
    return out


async def test_a_reading_subscriber_survives_a_burst_of_sends(home: Path) -> None:
    """5,000 sends used to publish up to 256 ``sent`` receipts at once into a 256-event queue and drop the
    subscriber (``control_slow_subscriber``).  Receipts now come one event per batch, listing the ids."""
    (home / "alice").mkdir(mode=0o700)
    (home / "bob").mkdir(mode=0o700)
    hub = EventHub()
    async with (
        open_database(home / "alice" / "p2pmsg.db") as alice_db,
        open_database(home / "bob" / "p2pmsg.db") as bob_db,
        trio.open_nursery() as nursery,
    ):
        alice = ChatService(ALICE, alice_db, config=ChatConfig(), events=hub.publish)
        bob = ChatService(BOB, bob_db, config=ChatConfig())
        bob_listener = Listener(BOB, bob.handle_inbound)
        bob_addrs = await nursery.start(bob_listener.run, [LOCAL_TCP])
        await nursery.start(alice.run)
        await nursery.start(bob.run)
        server = ControlServer(control_socket_path(home / "alice"), alice.control_handlers(), hub)
        await nursery.start(server.serve)
        await alice.add_contact(bob.invite(bob_addrs), "bob")
        await bob.add_contact(str(ALICE.peer_id), "alice")

        stream = await trio.open_unix_socket(str(control_socket_path(home / "alice")))
        body = msgpack.packb({"id": 1, "method": "subscribe", "params": {}}, use_bin_type=True)
        await stream.send_all(struct.pack(">I", len(body)) + body)
        buffer = bytearray()
        events: list[dict[str, Any]] = []
        while not events:
            buffer += await stream.receive_some()
            events.extend(_frames(buffer))
        assert events.pop(0) == {"id": 1, "result": {}}

        delivered: set[str] = set()
        ended = trio.Event()

        async def read_events() -> None:
            # A prompt reader, like `p2pmsg chat`: reads whatever arrives, as soon as it arrives.
            while data := await stream.receive_some():
                buffer.extend(data)
                for event in _frames(buffer):
                    events.append(event)
                    if event["event"] == "receipt" and event["status"] == "delivered":
                        delivered.update(event["ids"])
            ended.set()

        nursery.start_soon(read_events)
        sent: list[str] = []

        async def sender(count: int) -> None:
            for i in range(count):
                sent.append((await alice.send("bob", f"burst {i}"))["id"])

        with trio.fail_after(15):
            async with trio.open_nursery() as senders:
                for _ in range(SENDERS):
                    senders.start_soon(sender, BURST // SENDERS)
            while delivered != set(sent) and not ended.is_set():
                await trio.sleep(0.01)
        assert hub.dropped == {}, "the subscriber was disconnected as slow"
        assert not ended.is_set()
        assert delivered == set(sent)
        outgoing = [e["id"] for e in events if e["event"] == "message"]
        assert sorted(outgoing) == sorted(sent)
        receipts = [e for e in events if e["event"] == "receipt"]
        assert all(e["peer_id"] == str(BOB.peer_id) for e in receipts)
        assert len(receipts) < len(sent)  # batched, not one event per message and status
        nursery.cancel_scope.cancel()
    await stream.aclose()


async def test_concurrent_sends_share_transactions_and_a_withdrawn_send_is_not_stored(home: Path) -> None:
    """Sends that arrive while an enqueue commits are written together, in call order, exactly once; a send
    cancelled before its round started is withdrawn (never stored), like a cancelled ``db.write``."""
    async with open_database(home / "p2pmsg.db") as db, trio.open_nursery() as nursery:
        alice = ChatService(ALICE, db, config=ChatConfig())
        await alice.add_contact(str(BOB.peer_id), "bob")  # no session: everything stays queued
        first = await alice.send("bob", "first")  # also caches the contact: later sends reach the queue at once
        gate = threading.Event()
        before = db.stats.writes
        nursery.start_soon(db.write, lambda c: gate.wait(10))  # holds the writer thread
        await trio.testing.wait_all_tasks_blocked()
        results: dict[int, str] = {}

        async def send(i: int) -> None:
            results[i] = (await alice.send("bob", f"text {i}"))["id"]

        async with trio.open_nursery() as senders:
            for i in range(40):
                senders.start_soon(send, i)
                await trio.testing.wait_all_tasks_blocked()  # call order = i
            withdrawn = trio.CancelScope()

            async def cancelled_send() -> None:
                with withdrawn:
                    await alice.send("bob", "never stored")

            senders.start_soon(cancelled_send)
            await trio.testing.wait_all_tasks_blocked()
            withdrawn.cancel()
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        history = await alice.history("bob", limit=100)
        assert [m["text"] for m in history] == ["first"] + [f"text {i}" for i in range(40)]
        assert [m["id"] for m in history] == [first["id"]] + [results[i] for i in range(40)]
        # Write functions run: the gate, the first send's round, and one round for the 39 that waited behind it.
        assert db.stats.writes - before == 3
        nursery.cancel_scope.cancel()


async def test_send_many_queues_texts_in_order_in_one_write(home: Path) -> None:
    async with open_database(home / "p2pmsg.db") as db:
        alice = ChatService(ALICE, db, config=ChatConfig())
        await alice.add_contact(str(BOB.peer_id), "bob")
        before = db.stats.writes
        result = await alice.send_many("bob", [f"line {i}" for i in range(300)])
        assert db.stats.writes - before == 1
        assert result["status"] == "queued" and len(set(result["ids"])) == 300
        history = await alice.history("bob", limit=1000)
        assert [m["id"] for m in history] == result["ids"]
        assert [m["text"] for m in history] == [f"line {i}" for i in range(300)]
        with pytest.raises(BadRequestError, match=r"texts\[1\]: must not be empty"):
            await alice.send_many("bob", ["fine", ""])
        with pytest.raises(BadRequestError, match="texts: 1 to 1000"):
            await alice.send_many("bob", [])
        assert len(await alice.history("bob", limit=1000)) == 300  # nothing of a refused call was stored
        assert check_params("send_many", {"name": "bob", "texts": ["a", "b"]}) == {"name": "bob", "texts": ["a", "b"]}
        with pytest.raises(ControlRequestError, match="texts"):
            check_params("send_many", {"name": "bob", "texts": []})

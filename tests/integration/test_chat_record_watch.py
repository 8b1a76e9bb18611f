"""The chat service's record watcher: while a contact's messages wait for a retry, its peer record is looked up in
the DHT every ``record_watch`` seconds, and a newer one makes them due at once.

Real DHT nodes, chat services, listeners and SQLite stores on loopback.  Alice's retry schedule is 300 s, so within
the 20 s of a test only the watcher can make her try again.  Her DHT node is the chat service's resolver and nothing
more: no record listener is wired (that is the node's job, tests/integration/test_node_record_flush.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
from test_node_record_flush import wait_for  # polls an async predicate until DEADLINE

from p2pmsg.chat.service import ChatConfig, ChatService
from p2pmsg.dht.core.engine import DhtConfig
from p2pmsg.dht.core.records import VerifiedRecord, peer_record_key
from p2pmsg.dht.service import DhtNode, open_dht_node
from p2pmsg.identity import Identity, PeerId
from p2pmsg.net.listener import Listener
from p2pmsg.store import repo
from p2pmsg.store.db import Database, open_database
from p2pmsg.store.models import Backoff, OutboxEntry
from p2pmsg.wire.multiaddr import Multiaddr

ALICE = Identity.from_seed(bytes([0xA7]) * 32)
BOB = Identity.from_seed(bytes([0xB7]) * 32)
LOCAL_TCP = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")
DEADLINE = 20.0
SLOW = ChatConfig(
    backoff=Backoff(base_ms=300_000, cap_ms=300_000, jitter=0.0),
    dial_timeout=2.0,
    resolve_timeout=3.0,
    min_poll=0.02,
    max_poll=0.5,
    record_watch=0.3,
)
DHT = DhtConfig(rpc_timeout=0.5)


@dataclasses.dataclass
class Peer:
    db: Database
    chat: ChatService
    addrs: list[Multiaddr]


@contextlib.asynccontextmanager
async def chat_node(home: Path, identity: Identity, config: ChatConfig, resolver: Any = None) -> AsyncIterator[Peer]:
    home.mkdir(exist_ok=True)
    async with open_database(home / "p2pmsg.db") as db, trio.open_nursery() as nursery:
        chat = ChatService(identity, db, config=config, resolver=resolver)
        listener = Listener(identity, chat.handle_inbound)
        addrs = await nursery.start(listener.run, [LOCAL_TCP])
        await nursery.start(chat.run)
        yield Peer(db=db, chat=chat, addrs=list(addrs))
        nursery.cancel_scope.cancel()


class CountingResolver:
    """A real DHT node that also records which keys were looked up."""

    def __init__(self, dht: DhtNode) -> None:
        self.dht = dht
        self.keys: list[bytes] = []

    async def get_signed(self, key: bytes) -> VerifiedRecord | None:
        self.keys.append(key)
        return await self.dht.get_signed(key)


async def waiting(peer: Peer, who: PeerId) -> list[OutboxEntry]:
    """``who``'s outbox entries once all of them had a failed attempt (else nothing)."""
    entries = await peer.db.read(lambda c: repo.due_for(c, who.to_bytes(), limit=10))
    return entries if entries and all(e.attempts >= 1 for e in entries) else []


async def delivered(peer: Peer, message_id: str) -> bool:
    message = await peer.db.read(lambda c: repo.get_message(c, bytes.fromhex(message_id)))
    return message is not None and message.status.value == "delivered"


async def test_a_newer_record_found_by_the_watcher_flushes_the_outbox(tmp_path: Path) -> None:
    async with (
        open_dht_node(Identity.generate(), config=DHT) as boot,
        open_dht_node(ALICE, config=DHT) as alice_dht,
        open_dht_node(BOB, config=DHT) as bob_dht,
        chat_node(tmp_path / "alice", ALICE, SLOW, resolver=alice_dht) as alice,
    ):
        await alice_dht.bootstrap([boot.address])
        await bob_dht.bootstrap([boot.address])
        await alice.chat.add_contact(str(BOB.peer_id), "bob")  # a bare peer id: only the DHT knows Bob's address
        async with chat_node(tmp_path / "bob", BOB, SLOW) as bob:
            await bob.chat.add_contact(str(ALICE.peer_id), "alice")
            assert await bob_dht.publish_peer_record(bob.addrs, seq=1) >= 1
            first = await alice.chat.send("bob", "before the move")
            await wait_for(lambda: delivered(alice, first["id"]), "the first message")
            old_addrs = bob.addrs

        second = await alice.chat.send("bob", "after the move")
        [entry] = await wait_for(lambda: waiting(alice, BOB.peer_id), "Alice's failed attempt")
        assert entry.next_attempt_at - entry.enqueued_at >= 250_000
        # The watcher keeps finding the record Alice cached (seq 1): that changes nothing.
        lookups = alice.chat.record_lookups
        await wait_for(lambda: _true(alice.chat.record_lookups >= lookups + 2), "two watcher lookups")
        assert await waiting(alice, BOB.peer_id) == [entry]

        async with chat_node(tmp_path / "bob", BOB, SLOW) as bob:
            assert bob.addrs != old_addrs
            assert await bob_dht.publish_peer_record(bob.addrs, seq=2) >= 1
            await wait_for(lambda: delivered(alice, second["id"]), "delivery at Bob's new address")
            assert [m["text"] for m in await bob.chat.history("alice")] == ["before the move", "after the move"]
        cached = await alice.db.read(lambda c: repo.get_peer_record(c, BOB.peer_id.to_bytes()))
        assert cached is not None and cached.seq == 2


async def test_the_watcher_looks_up_only_waiting_contacts_a_few_per_round(tmp_path: Path) -> None:
    """Three contacts with waiting messages, one without; at most two lookups per round, every waiting contact in
    turn, and never the one without messages."""
    config = dataclasses.replace(SLOW, record_watch=3600.0, record_watch_peers=2)  # rounds driven by the test
    async with open_dht_node(ALICE, config=DHT) as alice_dht:
        resolver = CountingResolver(alice_dht)
        async with chat_node(tmp_path / "alice", ALICE, config, resolver=resolver) as alice:
            friends = [Identity.generate().peer_id for _ in range(4)]
            for number, friend in enumerate(friends):
                await alice.chat.add_contact(str(friend), f"friend{number}")
            for number, friend in enumerate(friends[:3]):
                await alice.chat.send(f"friend{number}", "are you there?")
                await wait_for(lambda friend=friend: waiting(alice, friend), "a failed attempt")

            resolver.keys.clear()
            first = await alice.chat._watch_round()
            second = await alice.chat._watch_round()
            assert len(first) == 2 and len(second) == 2
            assert set(first) | set(second) == set(friends[:3])
            assert second[0] not in first  # the one left out of the first round comes first
            assert len(resolver.keys) == 4 and alice.chat.record_lookups == 4
            assert friends[3] not in first + second


async def test_a_newer_record_seen_during_a_hanging_dial_cancels_it_and_is_tried_at_once(tmp_path: Path) -> None:
    """Bob's first record points at a port that accepts and then says nothing (the dial hangs until its timeout, 60 s
    here).  His newer record, with another address, arrives while that dial runs: Alice gives the hanging dial up and
    tries the new address at once, instead of waiting for the timeout and then 300 s of backoff (the watcher cannot
    help: the record it would find is already cached)."""
    accepted = trio.Event()

    async def black_hole(stream: trio.SocketStream) -> None:
        accepted.set()
        await trio.sleep_forever()

    async with (
        open_dht_node(ALICE, config=DHT) as alice_dht,
        open_dht_node(BOB, config=DHT) as bob_dht,
        chat_node(tmp_path / "alice", ALICE, dataclasses.replace(SLOW, dial_timeout=60.0), resolver=alice_dht) as alice,
        trio.open_nursery() as nursery,
    ):
        [silent] = await nursery.start(functools.partial(trio.serve_tcp, black_hole, 0, host="127.0.0.1"))
        await bob_dht.bootstrap([alice_dht.address])
        silent_addr = f"/ip4/127.0.0.1/tcp/{silent.socket.getsockname()[1]}"
        assert await bob_dht.publish_peer_record([silent_addr], seq=1) >= 1
        await alice.chat.add_contact(str(BOB.peer_id), "bob")
        sent = await alice.chat.send("bob", "through the second address")
        with trio.fail_after(5):
            await accepted.wait()  # Alice's dial (60 s timeout) now hangs in the handshake
        async with chat_node(tmp_path / "bob", BOB, SLOW) as bob:
            await bob.chat.add_contact(str(ALICE.peer_id), "alice")
            newer = await _published(bob_dht, bob.addrs, seq=2)
            assert await alice.chat.peer_record_seen(BOB.peer_id, newer)
            await wait_for(lambda: delivered(alice, sent["id"]), "delivery through the new address", timeout=10)
        nursery.cancel_scope.cancel()


async def _published(dht: DhtNode, addrs: list[Multiaddr], *, seq: int) -> bytes:
    assert await dht.publish_peer_record(addrs, seq=seq) >= 1
    record = await dht.get_signed(peer_record_key(dht.peer_id))
    assert record is not None and record.seq == seq
    return record.value


async def _true(value: bool) -> bool:
    return value

"""A contact that moved is reached as soon as its new peer record reaches our DHT store, not when the backoff ends.

Two whole nodes in one trio process over loopback.  Alice's retry schedule is 300 s and her record watcher is off
(300 s too), so within the 20 s of the test only the record her DHT store takes in can make her try again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pmsg.chat.service import ChatConfig
from p2pmsg.identity import Identity
from p2pmsg.node import Node, NodeOptions, run_node
from p2pmsg.store import repo
from p2pmsg.store.models import Backoff, OutboxEntry

LONG_BACKOFF = Backoff(base_ms=300_000, cap_ms=300_000, jitter=0.0)
DEADLINE = 20.0


@dataclasses.dataclass(frozen=True)
class Cfg:
    listen: Sequence[str]
    bootstrap: Sequence[str] = ()
    accept_from: str = "contacts"
    dht_port: int | None = None


OPTIONS = NodeOptions(
    check_interval=0.2,
    chat=ChatConfig(backoff=LONG_BACKOFF, record_watch=300.0, dial_timeout=2.0, resolve_timeout=3.0, max_poll=0.5),
)


async def start(nursery: trio.Nursery, home: Path, identity: Identity, cfg: Cfg) -> Node:
    home.mkdir(mode=0o700, exist_ok=True)

    async def run(task_status: trio.TaskStatus[Node]) -> None:
        await run_node(home, identity, cfg, options=OPTIONS, task_status=task_status)

    node: Node = await nursery.start(run)
    return node


async def wait_for(predicate: Callable[[], Awaitable[Any]], what: str, timeout: float = DEADLINE) -> Any:
    with trio.move_on_after(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


async def outbox(node: Node, peer: Identity) -> list[OutboxEntry]:
    return await node.db.read(lambda c: repo.due_for(c, peer.peer_id.to_bytes(), limit=10))


def tcp_port(node: Node) -> int:
    return node.addrs[0].transport()[2]


async def test_moved_contact_gets_the_message_when_its_new_record_reaches_our_store(tmp_path: Path) -> None:
    bob_id = Identity.generate()
    async with trio.open_nursery() as outer:
        alice = await start(outer, tmp_path / "alice", Identity.generate(), Cfg(listen=["/ip4/127.0.0.1/tcp/0"]))
        bob_cfg = Cfg(listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[f"/ip4/127.0.0.1/udp/{alice.dht.address[1]}"])
        await alice.chat.add_contact(str(bob_id.peer_id), "bob")  # a bare peer id: only the DHT knows Bob's address

        async with trio.open_nursery() as inner:
            bob = await start(inner, tmp_path / "bob", bob_id, bob_cfg)
            await bob.chat.add_contact(str(alice.identity.peer_id), "alice")
            old_port = tcp_port(bob)
            await wait_for(lambda: alice.dht.find_peer(bob_id.peer_id), "Bob's first record in the DHT")
            first = await alice.chat.send("bob", "before the move")
            await wait_for(lambda: _delivered(alice, first["id"]), "the first message")
            inner.cancel_scope.cancel()

        # Bob is gone: Alice's attempt fails and the next one is 300 s away.
        second = await alice.chat.send("bob", "after the move")
        [waiting] = await wait_for(lambda: _attempted(alice, bob_id), "Alice's failed attempt")
        assert waiting.next_attempt_at - waiting.enqueued_at >= 250_000

        async with trio.open_nursery() as inner:
            bob = await start(inner, tmp_path / "bob", bob_id, bob_cfg)  # same home and identity, a new port
            assert tcp_port(bob) != old_port
            await wait_for(lambda: _delivered(alice, second["id"]), "delivery at Bob's new address")
            assert [m["text"] for m in await bob.chat.history("alice")] == ["before the move", "after the move"]
            inner.cancel_scope.cancel()
        assert alice.chat.record_lookups == 0  # the watcher never ran: the record came to Alice's own store
        outer.cancel_scope.cancel()


async def _delivered(node: Node, message_id: str) -> bool:
    message = await node.db.read(lambda c: repo.get_message(c, bytes.fromhex(message_id)))
    return message is not None and message.status.value == "delivered"


async def _attempted(node: Node, peer: Identity) -> list[OutboxEntry]:
    entries = await outbox(node, peer)
    return entries if entries and all(e.attempts >= 1 for e in entries) else []

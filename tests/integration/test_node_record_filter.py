"""Only contacts' peer records reach the chat service from the DHT's store: a flood of other peers' valid records
cannot crowd a contact's newer record out of the node's bounded relay queue."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from test_node_record_flush import Cfg, start

from p2pmsg.dht.core.records import PeerRecord, VerifiedRecord, peer_record_key, seal_peer_record, verify_record_value
from p2pmsg.identity import Identity, PeerId
from p2pmsg.node import RECORD_QUEUE_SIZE, Node


def _record(identity: Identity, seq: int) -> VerifiedRecord:
    record = PeerRecord(
        peer_id=identity.peer_id, addrs=("/ip4/127.0.0.1/tcp/9",), seq=seq, expires_at=int(time.time()) + 3600
    )
    return verify_record_value(peer_record_key(identity.peer_id), seal_peer_record(identity, record), now=time.time())


async def test_strangers_records_are_not_queued_and_a_contacts_record_gets_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    contact = Identity.generate()
    seen: list[PeerId] = []
    async with trio.open_nursery() as nursery:
        node: Node = await start(nursery, tmp_path / "alice", Identity.generate(), Cfg(listen=["/ip4/127.0.0.1/tcp/0"]))

        async def record_seen(peer_id: PeerId, value: bytes, *, contacts_only: bool = False) -> bool:
            seen.append(peer_id)
            return False

        monkeypatch.setattr(node.chat, "peer_record_seen", record_seen)
        await node.chat.add_contact(str(contact.peer_id), "carol")
        await node.chat.contact_peers()  # what the relay task loads after a change of the contacts
        assert node.chat.is_contact_cached(contact.peer_id) is True
        # Far more strangers' records than the queue holds, all at once (the DHT's task never waits), then the
        # contact's: it is not dropped, and no stranger's record reaches the chat service.
        for _ in range(RECORD_QUEUE_SIZE * 2):
            node._record_stored(_record(Identity.generate(), 1))
        node._record_stored(_record(contact, 5))
        with trio.fail_after(10):
            while not seen:
                await trio.sleep(0.01)
        await trio.sleep(0.1)
        assert seen == [contact.peer_id]
        assert node.records_dropped == 0
        # A blocked contact is no longer one: its records are filtered too.
        await node.chat.block("carol")
        await node.chat.contact_peers()
        assert node.chat.is_contact_cached(contact.peer_id) is False
        nursery.cancel_scope.cancel()

"""``DhtNode(on_record=...)`` hears of each signed record its store takes in as new: a first record or a higher
``seq``, from a remote STORE or its own publish, and not a refresh of the record it already holds."""

from __future__ import annotations

import trio

from p2pmsg.dht.core.engine import DhtConfig
from p2pmsg.dht.core.records import PeerRecord, VerifiedRecord, peer_record_key
from p2pmsg.dht.service import open_dht_node
from p2pmsg.identity import Identity

DHT = DhtConfig(rpc_timeout=0.5)


async def test_the_listener_hears_new_records_only() -> None:
    heard: list[VerifiedRecord] = []
    holder_id, owner_id = Identity.generate(), Identity.generate()
    async with (
        open_dht_node(holder_id, config=DHT, on_record=heard.append) as holder,
        open_dht_node(owner_id, config=DHT) as owner,
    ):
        await owner.bootstrap([holder.address])
        assert await owner.publish_peer_record(["/ip4/127.0.0.1/tcp/4001"], seq=5) == 1
        assert [(r.key, r.seq) for r in heard] == [(peer_record_key(owner_id.peer_id), 5)]
        content = heard[0].content
        assert isinstance(content, PeerRecord) and content.addrs == ("/ip4/127.0.0.1/tcp/4001",)

        assert await owner.put_signed(heard[0].key, heard[0].value) == 1  # the same record again: a refresh
        assert await owner.publish_peer_record(["/ip4/127.0.0.1/tcp/4002"], seq=4) == 0  # older: refused
        assert len(heard) == 1

        assert await owner.publish_peer_record(["/ip4/127.0.0.1/tcp/4002"], seq=6) == 1
        assert [r.seq for r in heard] == [5, 6]

        await holder.publish_peer_record(["/ip4/127.0.0.1/tcp/4003"], seq=1)  # its own store takes it in too
        assert [r.signer for r in heard] == [owner_id.peer_id, owner_id.peer_id, holder_id.peer_id]


async def test_a_failing_listener_costs_the_dht_nothing() -> None:
    def broken(record: VerifiedRecord) -> None:
        raise RuntimeError("listener bug")

    async with (
        open_dht_node(Identity.generate(), config=DHT, on_record=broken) as holder,
        open_dht_node(Identity.generate(), config=DHT) as owner,
    ):
        await owner.bootstrap([holder.address])
        assert await owner.publish_peer_record(["/ip4/127.0.0.1/tcp/4001"], seq=1) == 1
        with trio.fail_after(5):
            assert await holder.ping(owner.address) == owner.node_id

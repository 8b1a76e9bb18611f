"""Regression tests for the second security review of the DHT (one section per finding)."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import trio

from p2pmsg.dht.core.engine import DhtConfig
from p2pmsg.dht.core.errors import DhtUsageError
from p2pmsg.dht.core.records import PeerRecord, peer_record_key, seal_peer_record
from p2pmsg.dht.core.storage import StorageLimits
from p2pmsg.dht.service import open_dht_node
from p2pmsg.identity import Identity

FAST = DhtConfig(rpc_timeout=0.5, stall_timeout=0.2)


def ident(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"review2-%d" % n).digest())


# -- 1. put_signed when the local store is full --------------------------------------------------------------------


async def test_publishing_into_a_full_local_store_still_publishes_and_keeps_our_record() -> None:
    tiny = dataclasses.replace(FAST, storage=StorageLimits(max_values=4, max_bytes=4000))
    async with open_dht_node(ident(1), config=tiny) as a, open_dht_node(ident(2), config=FAST) as b:
        await a.bootstrap([b.address])
        now = trio.current_time()
        for i in range(4):  # others filled a's store to the brim
            a.engine.storage.put_plain(bytes([i]) * 20, b"x" * 900, source=f"198.51.100.{i}", now=now)
        assert a.engine.store_local(b"\x09" * 20, "more", now) is False  # really full
        stored = await a.publish_peer_record(["/ip4/127.0.0.1/tcp/4001"], seq=7)
        assert stored == 1  # no DhtUsageError: b got it
        held = a.engine.storage.get(peer_record_key(a.peer_id), trio.current_time())
        assert held is not None and held.seq == 7  # our own record always fits
        record = await b.find_peer(a.peer_id)
        assert record is not None and record.seq == 7


async def test_a_local_refusal_is_not_a_usage_error_but_a_bad_record_is() -> None:
    async with open_dht_node(ident(3), config=FAST) as a, open_dht_node(ident(4), config=FAST) as b:
        await a.bootstrap([b.address])
        assert await a.publish_peer_record(["/ip4/127.0.0.1/tcp/4001"], seq=10) == 1
        # A lower seq: our own store (and b) keep seq 10; that is a refusal, not a usage error.
        assert await a.publish_peer_record(["/ip4/127.0.0.1/tcp/4002"], seq=9) == 0
        other = ident(5)
        wall = int(a._wall())
        foreign = seal_peer_record(other, PeerRecord(peer_id=other.peer_id, addrs=(), seq=1, expires_at=wall + 60))
        with pytest.raises(DhtUsageError, match=r"does not verify: .*key"):
            await a.put_signed(peer_record_key(a.peer_id), foreign)  # signed by someone else for our key
        expired = seal_peer_record(a.identity, PeerRecord(peer_id=a.peer_id, addrs=(), seq=11, expires_at=wall - 1))
        with pytest.raises(DhtUsageError, match=r"does not verify: .*expired"):
            await a.put_signed(peer_record_key(a.peer_id), expired)

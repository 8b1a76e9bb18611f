"""p2pmsg DHT nodes and stock ``kademlia`` 2.2.3 nodes (in a subprocess) in one network, on 127.0.0.1."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import umsgpack
from stock_harness import stock_cluster

from p2pmsg.dht.core.engine import DhtConfig
from p2pmsg.dht.core.records import peer_record_key
from p2pmsg.dht.service import DhtNode, open_dht_node
from p2pmsg.identity import Identity

if importlib.util.find_spec("kademlia") is None:  # checked without importing it: asyncio stays out of this process
    pytest.skip("the stock kademlia package is not installed", allow_module_level=True)

CONFIG = DhtConfig(rpc_timeout=2.0, stall_timeout=0.5)


def ident(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"interop-%d" % n).digest())


@asynccontextmanager
async def ours(count: int, config: DhtConfig = CONFIG) -> AsyncIterator[list[DhtNode]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_dht_node(ident(i), config=config)) for i in range(count)]


async def test_stock_node_bootstraps_through_a_p2pmsg_node() -> None:
    with trio.fail_after(15):
        async with stock_cluster(2) as stock, ours(1) as (node,):
            assert await stock.call("bootstrap", 0, addrs=[node.address]) == 1
            assert await stock.call("bootstrap", 1, addrs=[node.address]) >= 1
            assert await stock.call("set", 0, key="from stock", value="s-value") is True
            assert await node.get("from stock") == "s-value"
            assert await node.set("from p2pmsg", 42) >= 1
            assert await stock.call("get", 1, key="from p2pmsg") == 42
            assert await stock.call("get", 1, key="from stock") == "s-value"
            table = await stock.call("table", 0)
            assert [node.node_id.hex(), "127.0.0.1", node.address[1]] in table
            assert {c.address for c in node.routing_table_snapshot()} == {stock.address(0), stock.address(1)}


async def test_p2pmsg_node_bootstraps_through_a_stock_node() -> None:
    with trio.fail_after(15):
        async with stock_cluster(2) as stock, ours(2) as nodes:
            assert await stock.call("bootstrap", 1, addrs=[stock.address(0)]) == 1
            assert await nodes[0].bootstrap([stock.address(0)]) == 2
            assert await nodes[1].bootstrap([stock.address(1)]) >= 2
            assert await nodes[0].set("p-key", b"\x00bytes") == 3
            assert await stock.call("get", 0, key="p-key") == {"hex": b"\x00bytes".hex()}
            assert await stock.call("set", 1, key="s-key", value=1.5) is True
            assert await nodes[1].get("s-key") == 1.5
            assert await nodes[0].get("s-key") == 1.5


async def test_mixed_network_every_key_is_found_from_every_node() -> None:
    k = 5
    config = DhtConfig(k=k, rpc_timeout=2.0, stall_timeout=0.5)
    with trio.fail_after(40):
        async with stock_cluster(10, ksize=k) as stock, ours(10, config) as nodes:
            # Interleave the joins: each newcomer bootstraps through one stock and one p2pmsg node already in.
            await nodes[0].bootstrap([stock.address(0)])
            for i in range(1, 10):
                await stock.call("bootstrap", i, addrs=[stock.address(i - 1), nodes[i - 1].address])
                await nodes[i].bootstrap([nodes[i - 1].address, stock.address(i)])
            for i in range(10):  # a refresh round, as the periodic refresh would do
                await stock.call("bootstrap", i, addrs=[nodes[(i + 3) % 10].address])
                await nodes[i].find_node(nodes[i].node_id)

            keys = {f"stock-{i}": f"value-s{i}" for i in range(10)} | {f"p2pmsg-{i}": f"value-p{i}" for i in range(10)}
            for i in range(10):
                assert await stock.call("set", i, key=f"stock-{i}", value=keys[f"stock-{i}"]) is True
                assert await nodes[i].set(f"p2pmsg-{i}", keys[f"p2pmsg-{i}"]) >= 1

            missing: list[str] = []

            async def stock_get(node: int, key: str) -> None:
                if await stock.call("get", node, key=key) != keys[key]:
                    missing.append(f"stock {node}: {key}")

            async def our_get(node: DhtNode, index: int, key: str) -> None:
                if await node.get(key) != keys[key]:
                    missing.append(f"p2pmsg {index}: {key}")

            async with trio.open_nursery() as nursery:
                for key in keys:
                    for i in range(10):
                        nursery.start_soon(stock_get, i, key)
                        nursery.start_soon(our_get, nodes[i], i, key)
            assert missing == []

            # Extensions were only ever sent between p2pmsg nodes.
            stats = await stock.call("stats")
            assert "p2pmsg_auth" not in stats["requests"]
            assert stats["unknown_rpcs"] == {}
            verified = sum(node.stats["peers_verified"] for node in nodes)
            assert verified >= 10
            for node in nodes:
                for contact in node.routing_table_snapshot():
                    if contact.port in stock.ports:
                        assert not node.is_verified(contact)


async def test_signed_records_survive_junk_on_stock_nodes() -> None:
    with trio.fail_after(20):
        async with stock_cluster(4) as stock, ours(4) as nodes:
            for i in range(4):
                await stock.call("bootstrap", i, addrs=[nodes[0].address])
                await nodes[i].bootstrap([stock.address(i), nodes[0].address])
            assert await nodes[1].publish_peer_record(["/ip4/127.0.0.1/tcp/4001"], seq=10) == 7
            key = peer_record_key(nodes[1].peer_id)
            for i in range(4):  # stock nodes took the record as an opaque value...
                assert await stock.call("get_digest", i, key=key.hex()) is not None
            # ...and keep whatever anyone stores next: junk of every kind.
            junk: list[object] = [{"hex": b"P2R\x01junk".hex()}, [1, 2], "text", {"hex": (b"\x00" * 300).hex()}]
            for i in range(4):
                await stock.call("store_digest", i, key=key.hex(), value=junk[i])
            nodes[3].engine.storage.remove(key)  # make the reader ask the network
            record = await nodes[3].find_peer(nodes[1].peer_id)
            assert record is not None and record.seq == 10
            assert record.addrs == ("/ip4/127.0.0.1/tcp/4001",)
            assert nodes[3].stats["values_rejected"] >= 1


async def _replies_to_one_ping(target: tuple[str, int]) -> int:
    """Send one 50-byte ping from a fresh socket that never answers; return the bytes that come back in 1 s."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        ping = b"\x00" + os.urandom(20) + umsgpack.packb(["ping", (os.urandom(20),)])
        assert len(ping) == 50
        await sock.sendto(ping, target)
        total = 0
        with trio.move_on_after(1.0):
            while True:
                data, _ = await sock.recvfrom(65535)
                total += len(data)
        return total


async def test_a_ping_is_amplified_by_stock_nodes_but_not_by_p2pmsg_nodes() -> None:
    with trio.fail_after(15):
        async with stock_cluster(1) as stock, ours(1) as (node,):
            for i in range(40):
                await stock.call("store_local", 0, key=f"k{i}", value="v" * 20)
                assert node.engine.store_local(hashlib.sha1(f"k{i}".encode()).digest(), "v" * 20, trio.current_time())
            stock_bytes = await _replies_to_one_ping(stock.address(0))
            our_bytes = await _replies_to_one_ping(node.address)
            assert stock_bytes > 40 * 50  # the pong plus one STORE per key
            assert our_bytes <= 50  # the pong, and at most a 50-byte ping to check the address


async def test_stock_cluster_reports_errors() -> None:
    async with stock_cluster(1) as stock:
        with pytest.raises(Exception, match="unknown command"):
            await stock.call("frobnicate", 0)

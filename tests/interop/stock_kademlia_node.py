"""Run stock ``kademlia`` 2.2.3 nodes (asyncio) in a separate process, driven by JSON lines on stdin.

Started by ``stock_harness.py``; never imported by the test process (asyncio stays out of it).

    python stock_kademlia_node.py COUNT [KSIZE]

prints ``{"ports": [...]}`` once the COUNT servers listen on 127.0.0.1, then answers each request line
``{"id": n, "cmd": ..., "node": i, ...}`` with ``{"id": n, "result": ...}`` or ``{"id": n, "error": "..."}``.
Commands: ``bootstrap`` (``addrs``), ``set`` / ``get`` (``key``, ``value``), ``store_local`` (``key``, ``value``:
straight into the node's storage), ``store_digest`` / ``get_digest`` (the same with a hex 20-byte key), ``table``
(the routing table as ``[[id hex, ip, port], ...]``), ``stats``
(counts of RPCs by name the node was asked for, of unknown RPCs, and of unanswered requests), ``stop``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sys
from typing import Any

from kademlia.network import Server
from kademlia.utils import digest

UNKNOWN_RPCS: collections.Counter[str] = collections.Counter()
TIMEOUTS = [0]


class _Counter(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "has no callable method" in message:
            UNKNOWN_RPCS[message.rsplit("rpc_", 1)[-1].split(";")[0]] += 1
        elif "Did not receive reply" in message:
            TIMEOUTS[0] += 1


REQUESTS: collections.Counter[str] = collections.Counter()


def _wrap_protocol(server: Server) -> None:
    protocol = server.protocol
    original = protocol._accept_request

    async def accept(msg_id: bytes, data: Any, address: Any) -> None:
        if isinstance(data, list) and data and isinstance(data[0], str):
            REQUESTS[data[0]] += 1
        await original(msg_id, data, address)

    protocol._accept_request = accept


def _value(raw: Any) -> Any:
    if isinstance(raw, dict) and "hex" in raw:
        return bytes.fromhex(raw["hex"])
    return raw


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    return value


async def _handle(servers: list[Server], request: dict[str, Any]) -> Any:
    cmd = request["cmd"]
    if cmd == "stats":
        return {"requests": dict(REQUESTS), "unknown_rpcs": dict(UNKNOWN_RPCS), "timeouts": TIMEOUTS[0]}
    server = servers[request["node"]]
    if cmd == "bootstrap":
        found = await server.bootstrap([tuple(a) for a in request["addrs"]])
        return len(found)
    if cmd == "set":
        return bool(await server.set(request["key"], _value(request["value"])))
    if cmd == "get":
        return _json_value(await server.get(request["key"]))
    if cmd == "store_local":
        server.storage[digest(request["key"])] = _value(request["value"])
        return True
    if cmd == "store_digest":
        server.storage[bytes.fromhex(request["key"])] = _value(request["value"])
        return True
    if cmd == "get_digest":
        return _json_value(server.storage.get(bytes.fromhex(request["key"])))
    if cmd == "table":
        neighbors = server.protocol.router.find_neighbors(server.node, k=1000)
        return [[n.id.hex(), n.ip, n.port] for n in neighbors]
    raise ValueError(f"unknown command {cmd!r}")


async def main(count: int, ksize: int) -> None:
    logging.getLogger().addHandler(_Counter())
    logging.getLogger().setLevel(logging.WARNING)
    servers = [Server(ksize=ksize) for _ in range(count)]
    ports = []
    for server in servers:
        await server.listen(0, interface="127.0.0.1")
        _wrap_protocol(server)
        ports.append(server.transport.get_extra_info("sockname")[1])
    print(json.dumps({"ports": ports}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pending: set[asyncio.Task[None]] = set()

    async def serve(request: dict[str, Any]) -> None:
        try:
            reply = {"id": request["id"], "result": await _handle(servers, request)}
        except Exception as exc:  # report, never die: the test decides
            reply = {"id": request["id"], "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)

    while True:
        line = await reader.readline()
        if not line:
            break
        request = json.loads(line)
        if request["cmd"] == "stop":
            break
        task = asyncio.ensure_future(serve(request))
        pending.add(task)
        task.add_done_callback(pending.discard)
    for server in servers:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 20))

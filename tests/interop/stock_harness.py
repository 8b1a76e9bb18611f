"""Trio side of the interop tests: stock ``kademlia`` nodes in a subprocess, driven over JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

SCRIPT = Path(__file__).with_name("stock_kademlia_node.py")


class StockError(Exception):
    """A command failed inside the stock process."""


class StockCluster:
    """Handle on the subprocess: ``ports`` of its nodes, and :meth:`call` to run a command on one of them."""

    def __init__(self, process: trio.Process, ports: list[int]) -> None:
        self.process = process
        self.ports = ports
        self._next = 0
        self._waiting: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self.stderr = bytearray()
        self._send_lock = trio.Lock()

    def address(self, node: int) -> tuple[str, int]:
        return ("127.0.0.1", self.ports[node])

    async def call(self, cmd: str, node: int = 0, **args: Any) -> Any:
        self._next += 1
        request_id = self._next
        event = trio.Event()
        slot: list[dict[str, Any]] = []
        self._waiting[request_id] = (event, slot)
        line = json.dumps({"id": request_id, "cmd": cmd, "node": node, **args}) + "\n"
        assert self.process.stdin is not None
        async with self._send_lock:
            await self.process.stdin.send_all(line.encode())
        await event.wait()
        reply = slot[0]
        if "error" in reply:
            raise StockError(f"stock node {node} {cmd}: {reply['error']}")
        return reply["result"]

    async def _read_replies(self, lines: AsyncIterator[bytes]) -> None:
        async for line in lines:
            reply = json.loads(line)
            event, slot = self._waiting.pop(reply["id"])
            slot.append(reply)
            event.set()


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    buffer = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line


@asynccontextmanager
async def stock_cluster(count: int, ksize: int = 20) -> AsyncIterator[StockCluster]:
    """Start ``count`` stock nodes (k = ``ksize``) on 127.0.0.1 in a subprocess; stop it on exit."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(SCRIPT), str(count), str(ksize)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None and process.stdin is not None
    try:
        lines = _lines(process.stdout)
        with trio.fail_after(20):
            first = await lines.__anext__()
        cluster = StockCluster(process, json.loads(first)["ports"])

        async def drain_stderr() -> None:
            assert process.stderr is not None
            while chunk := await process.stderr.receive_some(65536):
                if len(cluster.stderr) < 1 << 20:
                    cluster.stderr += chunk

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cluster._read_replies, lines)
            nursery.start_soon(drain_stderr)
            try:
                yield cluster
            finally:
                with trio.move_on_after(5) as cleanup:
                    cleanup.shield = True
                    await process.stdin.send_all(b'{"id": 0, "cmd": "stop", "node": 0}\n')
                    await process.wait()
                nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()

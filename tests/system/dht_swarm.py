"""Many p2pmsg DHT nodes over several OS processes, on real UDP on 127.0.0.1, driven by JSON lines.

Imported by the scale tests, this module is the *harness* (:class:`Swarm`, plain blocking code with a deadline on
every read); run as a script it is a *worker*: one trio loop running ``COUNT`` :class:`~p2pmsg.dht.service.DhtNode`
s with the test identities ``FIRST .. FIRST+COUNT-1``::

    python dht_swarm.py FIRST COUNT CONFIG_JSON

The worker prints ``{"nodes": [[index, udp port, peer id], ...]}`` once every node listens, then answers each
command line ``{"cmd": ..., ...}`` with one line ``{"result": ...}`` or ``{"error": "..."}``, one command at a time:

* ``join`` (``seeds``: addresses, ``rounds``): every node bootstraps through the seeds, then looks itself up
  ``rounds`` more times (as bucket refresh would), at most 8 nodes at a time; result: routing table sizes;
* ``publish``: every node publishes its peer record, whose one address is ``/ip4/127.0.0.1/tcp/<its udp port>``;
  result: how many STOREs succeeded, per node;
* ``lookup`` (``queries``: ``[[local index, peer id, expected address], ...]``): ``find_peer`` for each, 16 at a
  time; result: per query ``"ok"`` or what went wrong;
* ``stats``: engine counters summed over the worker's nodes; ``stop``.

Killing a worker (SIGKILL) takes its nodes away without a goodbye on the wire, as a crash or a pulled cable would.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SCRIPT = Path(__file__).resolve()


def swarm_identity_seed(index: int) -> bytes:
    """The Ed25519 seed of swarm node ``index``."""
    return hashlib.sha256(b"dht-swarm-%d" % index).digest()


def record_address(port: int) -> str:
    """The address swarm node on UDP ``port`` puts in its peer record."""
    return f"/ip4/127.0.0.1/tcp/{port}"


# =====================================================================================================================
# Harness (the test process): blocking pipes, a deadline on every read
# =====================================================================================================================


class SwarmError(Exception):
    """A worker failed, answered with an error, or did not answer in time."""


@dataclass
class SwarmNode:
    """One node of the swarm as the harness sees it."""

    index: int
    worker: int
    port: int
    peer_id: str

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    stderr: IO[bytes]
    buffer: bytearray = field(default_factory=bytearray)
    alive: bool = True


class Swarm:
    """``workers`` processes of ``per_worker`` nodes each (see the module docstring)."""

    def __init__(self, workers: int, per_worker: int, config: dict[str, Any]) -> None:
        self.nodes: list[SwarmNode] = []
        self._workers: list[_Worker] = []
        try:
            for w in range(workers):
                stderr = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by close()
                process = subprocess.Popen(
                    [sys.executable, str(SCRIPT), str(w * per_worker), str(per_worker), json.dumps(config)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                )
                self._workers.append(_Worker(process, stderr))
            for w, worker in enumerate(self._workers):
                hello = self._read(w, worker, time.monotonic() + 30)
                for index, port, peer_id in hello["nodes"]:
                    self.nodes.append(SwarmNode(index=index, worker=w, port=port, peer_id=peer_id))
        except BaseException:
            self.close()
            raise

    def live_workers(self) -> list[int]:
        """Indexes of the workers not killed."""
        return [w for w, worker in enumerate(self._workers) if worker.alive]

    def live_nodes(self) -> list[SwarmNode]:
        """Nodes whose worker is alive."""
        live = set(self.live_workers())
        return [n for n in self.nodes if n.worker in live]

    def broadcast(self, cmds: dict[int, dict[str, Any]], timeout: float) -> dict[int, Any]:
        """Send ``cmds[worker]`` to each worker, then collect every result (they run in parallel)."""
        deadline = time.monotonic() + timeout
        for w, cmd in cmds.items():
            worker = self._workers[w]
            assert worker.process.stdin is not None and worker.alive
            worker.process.stdin.write(json.dumps(cmd).encode() + b"\n")
            worker.process.stdin.flush()
        results = {}
        for w in cmds:
            reply = self._read(w, self._workers[w], deadline)
            if "error" in reply:
                raise SwarmError(f"worker {w}: {cmds[w]['cmd']}: {reply['error']}")
            results[w] = reply["result"]
        return results

    def kill(self, w: int) -> None:
        """SIGKILL worker ``w``: its nodes vanish without a word."""
        worker = self._workers[w]
        worker.process.kill()
        worker.process.wait(timeout=10)
        worker.alive = False

    def close(self) -> None:
        """Stop every worker (politely, then by force)."""
        for worker in self._workers:
            if worker.alive and worker.process.poll() is None:
                try:
                    assert worker.process.stdin is not None
                    worker.process.stdin.write(b'{"cmd": "stop"}\n')
                    worker.process.stdin.flush()
                except OSError:
                    pass
        for worker in self._workers:
            try:
                worker.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(timeout=5)
            for stream in (worker.process.stdin, worker.process.stdout):
                if stream is not None:
                    stream.close()
            worker.stderr.close()
            worker.alive = False

    def _read(self, w: int, worker: _Worker, deadline: float) -> dict[str, Any]:
        stdout = worker.process.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"\n" not in worker.buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SwarmError(f"worker {w} did not answer in time; stderr:\n{self._stderr(worker)}")
                if selector.select(remaining):
                    chunk = os.read(stdout.fileno(), 65536)
                    if not chunk:
                        raise SwarmError(f"worker {w} exited; stderr:\n{self._stderr(worker)}")
                    worker.buffer += chunk
        line, _, rest = bytes(worker.buffer).partition(b"\n")
        worker.buffer[:] = rest
        reply: dict[str, Any] = json.loads(line)
        return reply

    @staticmethod
    def _stderr(worker: _Worker) -> str:
        worker.stderr.seek(0)
        return worker.stderr.read()[-4000:].decode(errors="replace")


# =====================================================================================================================
# Worker (a separate process): one trio loop, COUNT nodes
# =====================================================================================================================


async def _worker(first: int, count: int, config_fields: dict[str, Any]) -> None:
    import trio

    from p2pmsg.dht.core.engine import DhtConfig
    from p2pmsg.dht.service import DhtNode
    from p2pmsg.identity import Identity, PeerId

    config = DhtConfig(**config_fields)
    nodes = [DhtNode(Identity.from_seed(swarm_identity_seed(first + i)), config=config) for i in range(count)]

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def each(limit: int, items: list[Any], work: Any) -> list[Any]:
        results: list[Any] = [None] * len(items)
        limiter = trio.CapacityLimiter(limit)

        async def one(i: int, item: Any) -> None:
            async with limiter:
                results[i] = await work(item)

        async with trio.open_nursery() as nursery:
            for i, item in enumerate(items):
                nursery.start_soon(one, i, item)
        return results

    async def join(args: dict[str, Any]) -> list[int]:
        seeds = [tuple(a) for a in args["seeds"]]

        async def one(node: DhtNode) -> int:
            await node.bootstrap([s for s in seeds if s != node.address])
            for _ in range(args.get("rounds", 0)):
                await node.find_node(node.node_id)
            return len(node.routing_table_snapshot())

        return await each(8, nodes, one)

    async def publish(args: dict[str, Any]) -> list[int]:
        async def one(node: DhtNode) -> int:
            return await node.publish_peer_record([record_address(node.address[1])])

        return await each(args.get("concurrency", 8), nodes, one)

    async def lookup(args: dict[str, Any]) -> list[str]:
        async def one(query: list[Any]) -> str:
            local, peer_text, expected = query
            record = await nodes[local - first].find_peer(PeerId.from_string(peer_text))
            if record is None:
                return "not found"
            if record.addrs != (expected,):
                return f"wrong addresses {record.addrs}"
            return "ok"

        return await each(args.get("concurrency", 16), args["queries"], one)

    lag = [0.0]

    async def watch_lag() -> None:
        while True:
            before = trio.current_time()
            await trio.sleep(0.05)
            lag[0] = max(lag[0], trio.current_time() - before - 0.05)

    async def stats(args: dict[str, Any]) -> dict[str, int]:
        total: dict[str, int] = {"loop_lag_max_ms": int(lag[0] * 1000)}
        for node in nodes:
            for name, value in node.stats.items():
                total[name] = total.get(name, 0) + value
        return total

    handlers = {"join": join, "publish": publish, "lookup": lookup, "stats": stats}
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        nursery.start_soon(watch_lag)
        reply({"nodes": [[first + i, node.address[1], str(node.peer_id)] for i, node in enumerate(nodes)]})
        buffer = b""
        while True:
            while b"\n" not in buffer:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    nursery.cancel_scope.cancel()
                    return
                buffer += chunk
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            if request["cmd"] == "stop":
                nursery.cancel_scope.cancel()
                return
            try:
                with trio.fail_after(request.get("timeout", 60)):
                    result = await handlers[request["cmd"]](request)
                reply({"result": result})
            except Exception as exc:  # report, never die: the test decides
                reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    import trio

    trio.run(_worker, int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))

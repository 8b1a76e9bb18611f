#!/usr/bin/env python3
"""Benchmark: the p2pmsg DHT against the stock ``kademlia`` 2.2.3 package, N nodes each, real UDP on 127.0.0.1.

Usage: ``python scripts/bench_dht.py [--json] [--sizes 20,200,1000,2000] [--stock-max 1000] [--lookups 200]
[--seed 1]`` (the defaults take about two minutes on the 2-core project VM).

For every size N, one worker process runs N p2pmsg nodes in one trio loop, then another runs N stock nodes in one
asyncio loop (never both at once, so they do not compete for the CPU), and both follow the same *plan* drawn from
``--seed``: node i joins through the same randomly chosen earlier node, the same nodes ``set`` the same 100 keys, and
the same readers look up the same keys in the same order, one lookup at a time.

* ``join_ms``: median time of ``bootstrap([one earlier node])`` -- a ping, then a lookup of the node's own id --
  over the last tenth of the joins (at least 5), when the network is nearly N nodes.
* ``lookup_ms_p50`` / ``_p99``: latency of a network lookup of a plain value (the stock ``get``); the reader's own
  store is bypassed on both sides (p2pmsg: ``DhtNode.lookup(..., use_local=False)``; stock: the body of
  ``Server.get`` without its local-storage shortcut: a ``ValueSpiderCrawl`` from the reader's neighbours).
* ``hops_p50``: p2pmsg: the referral depth of the node that returned the value (1 = a node the reader already knew).
  The stock crawler does not track referrals; its figure is the number of crawl *rounds* until the value came back
  (each round queries alpha nodes and waits for all of them; a node learnt in round r is asked in round r + 1 at the
  earliest, so rounds >= referral depth).
* ``datagrams_per_lookup``: datagrams sent plus received by the reading node while its lookup ran (both sides
  counted at the socket: p2pmsg engine counters, stock transport/protocol wrappers); ``queries_per_lookup``: the
  ``find_value`` requests the lookup sent.  The rest is the reply to each, p2pmsg's address proofs and identity
  checks with nodes the reader had never spoken to, and the stock crawler's STORE to the nearest node without the
  value.
* ``rss_mb_per_node``: (worker RSS after everything - RSS before the first node was created) / N, MB = 2^20 bytes.
* ``found_ratio``: lookups that returned the right value.
* p2pmsg only: ``signed_*`` -- the same figures for 100 signed peer-record lookups (``find_peer`` without the local
  store) of 50 published records; ``signed_repeat_*``: the same 100 lookups once more, when the reader has already
  proven its address to, and exchanged identity proofs with, the nodes it asks (the steady state of a long-running
  node).  The stock package has no signed records.

All N nodes share the IP 127.0.0.1, so p2pmsg's per-IP rate limits (meant for one host among many) are lifted; every
other setting is the default of both packages (k = 20, alpha = 3).  Prints one JSON object
``{"N": {"p2pmsg": {...}, "kademlia": {...} | null}}`` with ``--json``; otherwise a table with the targets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

KEYS = 100
SIGNED_OWNERS = 50
SIGNED_LOOKUPS = 100
SETTLE_S = 1.0
TARGETS = {"lookup_ms_p50": 10.0, "lookup_ms_p99": 50.0, "hops_p50": 3.0}  # at N = 200
WORKER_TIMEOUT_S = 900


# =====================================================================================================================
# The plan both workers follow, and the figures they report
# =====================================================================================================================


@dataclass
class Plan:
    joins: list[int]  # joins[i - 1]: the earlier node that node i bootstraps through
    setters: list[int]  # setters[j]: the node that sets key j
    lookups: list[tuple[int, int]]  # (reader, key index), in order
    owners: list[int]  # p2pmsg only: nodes that publish a peer record
    signed: list[tuple[int, int]]  # p2pmsg only: (reader, owner), in order


def make_plan(n: int, lookups: int, seed: int) -> Plan:
    rng = random.Random(seed)
    joins = [rng.randrange(i) for i in range(1, n)]
    keys = min(n, KEYS)
    setters = [rng.randrange(n) for _ in range(keys)]
    reads = [(rng.randrange(n), rng.randrange(keys)) for _ in range(lookups)]
    owners = rng.sample(range(n), min(n, SIGNED_OWNERS))
    signed = []
    for _ in range(SIGNED_LOOKUPS):
        owner = rng.choice(owners)
        reader = rng.randrange(n)
        signed.append((reader if reader != owner else (reader + 1) % n, owner))
    return Plan(joins=joins, setters=setters, lookups=reads, owners=owners, signed=signed)


def key_text(j: int) -> str:
    return f"bench-key-{j}"


def value_text(j: int) -> str:
    return f"value-{j}"


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, int(fraction * len(ordered) + 0.999999) - 1))
    return ordered[index]


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Sample:
    seconds: float
    hops: int
    queries: int
    datagrams: int
    found: bool


def summarize(prefix: str, samples: list[Sample]) -> dict[str, float | int | None]:
    times = [s.seconds * 1000 for s in samples]
    return {
        f"{prefix}lookup_ms_p50": round(percentile(times, 0.5), 3),
        f"{prefix}lookup_ms_p99": round(percentile(times, 0.99), 3),
        f"{prefix}hops_p50": percentile([float(s.hops) for s in samples], 0.5),
        f"{prefix}datagrams_per_lookup": round(sum(s.datagrams for s in samples) / len(samples), 2),
        f"{prefix}queries_per_lookup": round(sum(s.queries for s in samples) / len(samples), 2),
        f"{prefix}found_ratio": round(sum(1 for s in samples if s.found) / len(samples), 4),
    }


def join_figure(joins: list[float]) -> float:
    tail = joins[-max(5, len(joins) // 10) :]
    return round(percentile([t * 1000 for t in tail], 0.5), 3)


# =====================================================================================================================
# Workers (one process per implementation and size)
# =====================================================================================================================


async def p2pmsg_worker(n: int, plan: Plan) -> dict[str, Any]:
    import trio

    from p2pmsg.dht.core.contact import digest
    from p2pmsg.dht.core.engine import DhtConfig, ValueMode
    from p2pmsg.dht.core.records import peer_record_key
    from p2pmsg.dht.service import DhtNode
    from p2pmsg.identity import Identity

    rss_before = rss_mb()
    config = DhtConfig(request_rate_per_ip=1e9, request_burst_per_ip=1e9, store_rate_per_ip=1e9, store_burst_per_ip=1e9)
    nodes = [DhtNode(Identity.from_seed(hashlib.sha256(b"bench-dht-%d" % i).digest()), config=config) for i in range(n)]

    def datagrams(node: DhtNode) -> int:
        return node.engine.stats["datagrams_in"] + node.engine.stats["datagrams_out"]

    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        joins = []
        for i, through in enumerate(plan.joins, start=1):
            start = time.perf_counter()
            await nodes[i].bootstrap([nodes[through].address])
            joins.append(time.perf_counter() - start)
        await trio.sleep(SETTLE_S)
        for j, setter in enumerate(plan.setters):
            await nodes[setter].set(key_text(j), value_text(j))
        await trio.sleep(SETTLE_S)
        samples = []
        for reader_index, j in plan.lookups:
            reader = nodes[reader_index]
            before = datagrams(reader)
            start = time.perf_counter()
            done = await reader.lookup(digest(key_text(j)), mode=ValueMode.PLAIN, use_local=False)
            elapsed = time.perf_counter() - start
            found = done.found and done.value == value_text(j)
            samples.append(Sample(elapsed, done.hops, done.queries, datagrams(reader) - before, found))
        for owner in plan.owners:
            await nodes[owner].publish_peer_record([f"/ip4/127.0.0.1/tcp/{nodes[owner].address[1]}"])
        await trio.sleep(SETTLE_S)
        passes: list[list[Sample]] = [[], []]
        for samples_of_pass in passes:  # the second pass repeats the first: every pair has met by then
            for reader_index, owner in plan.signed:
                reader = nodes[reader_index]
                before = datagrams(reader)
                start = time.perf_counter()
                key = peer_record_key(nodes[owner].peer_id)
                done = await reader.lookup(key, mode=ValueMode.SIGNED, use_local=False)
                elapsed = time.perf_counter() - start
                ok = done.record is not None and done.record.signer == nodes[owner].peer_id
                samples_of_pass.append(Sample(elapsed, done.hops, done.queries, datagrams(reader) - before, ok))
        rss_after = rss_mb()
        nursery.cancel_scope.cancel()
    return {
        **summarize("", samples),
        "join_ms": join_figure(joins),
        "rss_mb_per_node": round((rss_after - rss_before) / n, 4),
        **summarize("signed_", passes[0]),
        **summarize("signed_repeat_", passes[1]),
    }


async def stock_worker(n: int, plan: Plan) -> dict[str, Any]:
    import asyncio
    import logging

    from kademlia.crawling import ValueSpiderCrawl
    from kademlia.network import Server
    from kademlia.node import Node
    from kademlia.utils import digest

    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)

    class Counting:
        """Counts the datagrams a stock node's transport sends and its protocol receives."""

        def __init__(self, protocol: Any) -> None:
            self.count = 0
            inner_transport = protocol.transport
            inner_received = protocol.datagram_received
            counter = self

            class Transport:
                def sendto(self, data: bytes, address: Any = None) -> None:
                    counter.count += 1
                    inner_transport.sendto(data, address)

                def __getattr__(self, name: str) -> Any:
                    return getattr(inner_transport, name)

            def received(data: bytes, address: Any) -> None:
                counter.count += 1
                inner_received(data, address)

            protocol.transport = Transport()
            protocol.datagram_received = received

    class Rounds(ValueSpiderCrawl):  # type: ignore[misc]
        """The stock value crawler, counting its rounds."""

        rounds = 0
        queries = 0

        async def _find(self, rpcmethod: Any) -> Any:
            self.rounds += 1

            def counted(*args: Any) -> Any:
                self.queries += 1
                return rpcmethod(*args)

            return await super()._find(counted)

    rss_before = rss_mb()
    servers = [Server(ksize=20, alpha=3) for _ in range(n)]
    counters = []
    for server in servers:
        await server.listen(0, interface="127.0.0.1")
        counters.append(Counting(server.protocol))

    def address(server: Server) -> tuple[str, int]:
        return ("127.0.0.1", server.transport.get_extra_info("sockname")[1])

    joins = []
    for i, through in enumerate(plan.joins, start=1):
        start = time.perf_counter()
        await servers[i].bootstrap([address(servers[through])])
        joins.append(time.perf_counter() - start)
    await asyncio.sleep(SETTLE_S)
    for j, setter in enumerate(plan.setters):
        await servers[setter].set(key_text(j), value_text(j))
    await asyncio.sleep(SETTLE_S)
    samples = []
    for reader_index, j in plan.lookups:
        reader = servers[reader_index]
        before = counters[reader_index].count
        start = time.perf_counter()
        node = Node(digest(key_text(j)))
        nearest = reader.protocol.router.find_neighbors(node)
        crawl = Rounds(reader.protocol, node, nearest, reader.ksize, reader.alpha)
        value = await crawl.find()
        elapsed = time.perf_counter() - start
        datagrams = counters[reader_index].count - before
        samples.append(Sample(elapsed, crawl.rounds, crawl.queries, datagrams, value == value_text(j)))
    rss_after = rss_mb()
    for server in servers:
        server.stop()
    return {
        **summarize("", samples),
        "join_ms": join_figure(joins),
        "rss_mb_per_node": round((rss_after - rss_before) / n, 4),
        "hops_method": "crawler rounds until the value came back",
    }


def worker_main(kind: str, n: int, lookups: int, seed: int) -> None:
    plan = make_plan(n, lookups, seed)
    if kind == "p2pmsg":
        import trio

        result = trio.run(p2pmsg_worker, n, plan)
    else:
        import asyncio

        result = asyncio.run(stock_worker(n, plan))
    print(json.dumps(result), flush=True)


# =====================================================================================================================
# Driver
# =====================================================================================================================


def run_worker(kind: str, n: int, lookups: int, seed: int) -> dict[str, Any]:
    started = time.monotonic()
    print(f"  {kind:8} N={n} ...", end="", file=sys.stderr, flush=True)
    done = subprocess.run(
        [sys.executable, __file__, "--worker", kind, str(n), str(lookups), str(seed)],
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
        check=False,
    )
    print(f" {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker for N={n} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


ROWS = [
    ("lookup_ms_p50", "lookup p50 (ms)", "lookup_ms_p50"),
    ("lookup_ms_p99", "lookup p99 (ms)", "lookup_ms_p99"),
    ("hops_p50", "hops p50", "hops_p50"),
    ("datagrams_per_lookup", "datagrams / lookup", None),
    ("queries_per_lookup", "queries / lookup", None),
    ("found_ratio", "found", None),
    ("join_ms", "join (ms)", None),
    ("rss_mb_per_node", "RSS / node (MB)", None),
    ("signed_lookup_ms_p50", "signed lookup p50 (ms)", None),
    ("signed_lookup_ms_p99", "signed lookup p99 (ms)", None),
    ("signed_hops_p50", "signed hops p50", None),
    ("signed_datagrams_per_lookup", "signed datagrams / lookup", None),
    ("signed_queries_per_lookup", "signed queries / lookup", None),
    ("signed_found_ratio", "signed found", None),
    ("signed_repeat_lookup_ms_p50", "signed, repeated: p50 (ms)", None),
    ("signed_repeat_lookup_ms_p99", "signed, repeated: p99 (ms)", None),
    ("signed_repeat_datagrams_per_lookup", "signed, repeated: datagrams", None),
]


def print_table(results: dict[str, dict[str, dict[str, Any] | None]]) -> None:
    sizes = list(results)
    header = ["metric"] + [f"{impl} N={n}" for n in sizes for impl in ("p2pmsg", "kademlia")] + ["target (N=200)"]
    lines = [header]
    for key, label, target in ROWS:
        row = [label]
        for n in sizes:
            for impl in ("p2pmsg", "kademlia"):
                figures = results[n][impl]
                value = None if figures is None else figures.get(key)
                row.append("-" if value is None else f"{value:g}")
        row.append(f"<= {TARGETS[target]:g}" if target else "")
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)))
        if index == 0:
            print("  ".join("-" * w for w in widths))
    if "200" in results:
        ours = results["200"]["p2pmsg"]
        assert ours is not None
        missed = [k for k, limit in TARGETS.items() if ours[k] > limit]
        print("\nN=200 targets:", "all met" if not missed else "MISSED: " + ", ".join(missed))
    print("kademlia hops = crawler rounds until the value came back (the stock crawler does not track referrals);")
    print("signed lookups exist only in p2pmsg.  Machine:", platform.machine(), platform.python_version())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sizes", default="20,200,1000,2000", help="comma-separated network sizes")
    parser.add_argument("--stock-max", type=int, default=1000, help="largest N also run with stock kademlia")
    parser.add_argument("--lookups", type=int, default=200, help="plain lookups per size (default 200)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "N", "LOOKUPS", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, n, lookups, seed = args.worker
        worker_main(kind, int(n), int(lookups), int(seed))
        return
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if any(n < 2 for n in sizes):
        parser.error("every size must be at least 2")
    results: dict[str, dict[str, dict[str, Any] | None]] = {}
    for n in sizes:
        ours = run_worker("p2pmsg", n, args.lookups, args.seed)
        stock = run_worker("kademlia", n, args.lookups, args.seed) if n <= args.stock_max else None
        results[str(n)] = {"p2pmsg": ours, "kademlia": stock}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()

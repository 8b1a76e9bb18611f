"""Scale and churn: 200 p2pmsg DHT nodes in 5 OS processes, real UDP on 127.0.0.1.

Each worker process (``dht_swarm.py``) runs 40 nodes in one trio loop.  The swarm joins through one seed node, every
node publishes its signed peer record, and then:

* with all 200 nodes up, every node looks up another node's record: every lookup must succeed;
* one whole worker -- 40 nodes, 20% of the swarm -- is killed with SIGKILL, so its nodes vanish without a word, and
  every surviving node looks up the records of two other survivors at once: at least 99% must succeed.

All nodes share the IP 127.0.0.1, so the per-IP rate limits and the per-network cap on address-proof pings (meant
for one host among many) are lifted; everything else is the default configuration (k = 20, alpha = 3, 2 s request
timeout).  Every step has a deadline.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from dht_swarm import Swarm, SwarmNode, record_address

WORKERS = 5
PER_WORKER = 40
CONFIG = {
    "request_rate_per_ip": 1e6,
    "request_burst_per_ip": 1e6,
    "store_rate_per_ip": 1e6,
    "store_burst_per_ip": 1e6,
    "max_verify_per_source": 4096,
}
STEP_TIMEOUT = 40.0

pytestmark = pytest.mark.slow


def lookups(swarm: Swarm, queries: dict[int, list[list[object]]], concurrency: int) -> list[str]:
    """Run the queries (per worker) at once; every outcome (``"ok"`` or what went wrong)."""
    cmds = {w: {"cmd": "lookup", "queries": q, "concurrency": concurrency} for w, q in queries.items()}
    results = swarm.broadcast(cmds, timeout=STEP_TIMEOUT)
    return [outcome for w in sorted(results) for outcome in results[w]]


def plan(nodes: list[SwarmNode], per_node: int, rng: random.Random) -> dict[int, list[list[object]]]:
    """Each node looks up the records of ``per_node`` other nodes, picked at random among ``nodes``."""
    queries: dict[int, list[list[object]]] = {}
    for node in nodes:
        for other in rng.sample([n for n in nodes if n is not node], per_node):
            queries.setdefault(node.worker, []).append([node.index, other.peer_id, record_address(other.port)])
    return queries


def totals(swarm: Swarm) -> dict[str, int]:
    total: dict[str, int] = {}
    for stats in swarm.broadcast({w: {"cmd": "stats"} for w in swarm.live_workers()}, timeout=10).values():
        for name, value in stats.items():
            total[name] = total.get(name, 0) + value
    return total


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    swarm = Swarm(WORKERS, PER_WORKER, CONFIG)
    try:
        assert len(swarm.nodes) == WORKERS * PER_WORKER
        seed = swarm.nodes[0]
        join = {"cmd": "join", "seeds": [seed.address], "rounds": 1, "timeout": STEP_TIMEOUT}
        swarm.broadcast(dict.fromkeys(swarm.live_workers(), join), timeout=STEP_TIMEOUT)
        publish = {"cmd": "publish", "concurrency": 16, "timeout": STEP_TIMEOUT}
        stored = swarm.broadcast(dict.fromkeys(swarm.live_workers(), publish), timeout=STEP_TIMEOUT)
        counts = [count for w in sorted(stored) for count in stored[w]]
        # publish reports the STOREs that really succeeded: k = 20 closest (plus verified extras), none of them dead.
        assert len(counts) == len(swarm.nodes) and min(counts) >= 10, counts
        yield swarm
    finally:
        swarm.close()


def test_every_live_record_is_found_among_200_nodes(swarm: Swarm) -> None:
    assert swarm.live_workers() == list(range(WORKERS)), "the churn test ran first"
    outcomes = lookups(swarm, plan(swarm.nodes, 1, random.Random(1)), concurrency=16)
    assert len(outcomes) == WORKERS * PER_WORKER
    failures = [o for o in outcomes if o != "ok"]
    assert failures == []
    stats = totals(swarm)
    assert stats["malformed"] == 0 and stats["rate_limited"] == 0 and stats["values_rejected"] == 0
    assert stats["peers_verified"] >= len(swarm.nodes) * 20  # every node verified its neighbours' ids


def test_99_percent_of_lookups_succeed_after_20_percent_are_killed(swarm: Swarm) -> None:
    before = totals(swarm)["timeouts"]
    swarm.kill(WORKERS - 1)  # 40 of 200 nodes vanish, no goodbye
    live = swarm.live_nodes()
    assert len(live) == len(swarm.nodes) * 4 // 5
    outcomes = lookups(swarm, plan(live, 2, random.Random(2)), concurrency=64)
    assert len(outcomes) == 2 * len(live)
    failures = [o for o in outcomes if o != "ok"]
    assert len(failures) <= len(outcomes) // 100, failures
    assert totals(swarm)["timeouts"] > before  # the lookups really met the dead nodes

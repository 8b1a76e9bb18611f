"""The iterative lookup: alpha in flight, true k closest responders, dead and slow peers, bounds."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from p2pmsg.dht.core.contact import Contact, distance
from p2pmsg.dht.core.errors import DhtUsageError
from p2pmsg.dht.core.lookup import Lookup, QueryState
from p2pmsg.dht.core.routing import RoutingTable

RPC_TIMEOUT = 2.0
LATENCY = 0.01


def make_nodes(count: int, seed: int) -> list[Contact]:
    rng = random.Random(seed)
    return [Contact(node_id=rng.randbytes(20), host=f"10.1.{i // 250}.{i % 250 + 1}", port=4000) for i in range(count)]


@dataclass
class Run:
    """A lookup driven against a simulated network in virtual time."""

    finished_at: float = 0.0
    max_in_flight: int = 0
    sent: list[tuple[float, Contact]] = field(default_factory=list)
    starved: int = 0  # times fewer than alpha were in flight although NEW candidates sat in the window


def drive(
    lookup: Lookup,
    answer: Callable[[Contact], list[Contact]],
    *,
    dead: set[bytes] = frozenset(),  # type: ignore[assignment]
    delay: dict[bytes, float] | None = None,
) -> Run:
    delay = delay or {}
    run = Run()
    now = 0.0
    queue: list[tuple[float, int, str, Contact]] = []
    seq = 0
    for _ in range(100_000):
        for contact in lookup.next_queries(now):
            run.sent.append((now, contact))
            seq += 1
            if contact.node_id in dead:
                heapq.heappush(queue, (now + RPC_TIMEOUT, seq, "fail", contact))
            else:
                when = now + delay.get(contact.node_id, LATENCY)
                kind = "answer" if when - now < RPC_TIMEOUT else "fail"
                heapq.heappush(queue, (min(when, now + RPC_TIMEOUT), seq, kind, contact))
        states = [lookup.state_of(c.node_id) for c in lookup.outstanding()]
        run.max_in_flight = max(run.max_in_flight, states.count(QueryState.IN_FLIGHT))
        if lookup.finished:
            run.finished_at = now
            return run
        times = [t for t in (lookup.next_deadline(), queue[0][0] if queue else None) if t is not None]
        assert times, "lookup is waiting for nothing"
        now = min(times)
        lookup.tick(now)
        while queue and queue[0][0] <= now:
            _, _, kind, contact = heapq.heappop(queue)
            if kind == "answer":
                lookup.on_response(contact.node_id, answer(contact), now)
            else:
                lookup.on_failure(contact.node_id, now)
    raise AssertionError("lookup did not finish")


def perfect_answers(nodes: list[Contact], target: bytes, k: int) -> Callable[[Contact], list[Contact]]:
    def answer(asked: Contact) -> list[Contact]:
        others = [n for n in nodes if n != asked]
        return sorted(others, key=lambda n: distance(n.node_id, target))[:k]

    return answer


def table_answers(nodes: list[Contact], k: int) -> Callable[[Contact], list[Contact]]:
    """Each node answers from a real routing table filled with every node (k-buckets keep only part of them)."""
    tables = {}
    for node in nodes:
        table = RoutingTable(node.node_id, k=k)
        for other in nodes:
            table.observe(other, 0.0)
        tables[node.node_id] = table

    def answer_for(target: bytes) -> Callable[[Contact], list[Contact]]:
        return lambda asked: tables[asked.node_id].closest(target, k)

    return answer_for  # type: ignore[return-value]


def true_closest(nodes: list[Contact], target: bytes, k: int, exclude: set[bytes] = frozenset()) -> list[Contact]:  # type: ignore[assignment]
    return sorted((n for n in nodes if n.node_id not in exclude), key=lambda n: distance(n.node_id, target))[:k]


def test_finds_the_true_k_closest_through_real_routing_tables() -> None:
    nodes = make_nodes(300, seed=1)
    answers = table_answers(nodes, k=20)
    rng = random.Random(2)
    for _ in range(10):
        target = rng.randbytes(20)
        seeds = rng.sample(nodes, 3)
        lookup = Lookup(target, k=20, alpha=3)
        lookup.add_candidates(seeds)
        run = drive(lookup, answers(target))  # type: ignore[operator]
        assert lookup.closest_responders() == true_closest(nodes, target, 20)
        assert run.max_in_flight == 3
        assert lookup.queries_sent < 100


def test_alpha_queries_stay_in_flight_while_candidates_remain() -> None:
    nodes = make_nodes(100, seed=3)
    target = bytes(20)
    lookup = Lookup(target, k=20, alpha=3)
    lookup.add_candidates(nodes[:10])
    first = lookup.next_queries(0.0)
    assert len(first) == 3
    assert lookup.next_queries(0.0) == []  # the window is busy
    lookup.on_response(first[0].node_id, [], 0.01)
    assert len(lookup.next_queries(0.01)) == 1
    assert sum(lookup.state_of(c.node_id) is QueryState.IN_FLIGHT for c in nodes[:10]) == 3


def test_result_is_only_responders_and_dead_peers_are_skipped() -> None:
    nodes = make_nodes(200, seed=4)
    target = bytes(range(20))
    dead = {n.node_id for n in true_closest(nodes, target, 10)}
    lookup = Lookup(target, k=20, alpha=3)
    lookup.add_candidates(random.Random(5).sample(nodes, 20))
    # Answers name the 30 closest (dead ones included), so the 20 closest live nodes can all be heard of.
    run = drive(lookup, perfect_answers(nodes, target, 30), dead=dead)
    assert lookup.closest_responders() == true_closest(nodes, target, 20, exclude=dead)
    assert all(lookup.state_of(d) is QueryState.FAILED for d in dead)
    # Ten dead peers among the closest cost about one timeout in total, not one each.
    assert run.finished_at < 2 * RPC_TIMEOUT


def test_a_dead_peer_never_holds_up_the_lookup_while_others_remain() -> None:
    nodes = make_nodes(50, seed=6)
    target = bytes(20)
    ordered = true_closest(nodes, target, 50)
    dead = {c.node_id for c in ordered[:3]}  # the three first asked are all dead
    lookup = Lookup(target, k=5, alpha=3, stall_timeout=0.5)
    lookup.add_candidates(ordered[:10])
    run = drive(lookup, perfect_answers(nodes, target, 5), dead=dead)
    live_queries = [t for t, c in run.sent if c.node_id not in dead]
    assert live_queries and min(live_queries) == pytest.approx(0.5)  # asked at the stall, not at the timeout
    assert lookup.closest_responders() == [c for c in ordered if c.node_id not in dead][:5]


def test_a_slow_but_alive_close_peer_is_waited_for_and_counted() -> None:
    nodes = make_nodes(80, seed=7)
    target = bytes(20)
    ordered = true_closest(nodes, target, 80)
    slow = ordered[0]
    lookup = Lookup(target, k=10, alpha=3, stall_timeout=0.5)
    lookup.add_candidates(ordered[:15])
    run = drive(lookup, perfect_answers(nodes, target, 10), delay={slow.node_id: 1.5})
    assert lookup.closest_responders() == ordered[:10]
    assert run.finished_at == pytest.approx(1.5)


def test_finish_stops_everything() -> None:
    nodes = make_nodes(30, seed=8)
    lookup = Lookup(bytes(20), k=5, alpha=3)
    lookup.add_candidates(nodes)
    asked = lookup.next_queries(0.0)
    lookup.finish()
    assert lookup.finished
    assert lookup.next_queries(1.0) == []
    assert lookup.next_deadline() is None
    lookup.on_response(asked[0].node_id, nodes, 1.0)
    assert len(lookup) == 30


def test_no_seeds_finishes_at_once() -> None:
    lookup = Lookup(bytes(20))
    lookup.add_candidates([])
    assert lookup.finished
    assert lookup.closest_responders() == []


def test_everyone_dead_finishes_empty() -> None:
    nodes = make_nodes(10, seed=9)
    lookup = Lookup(bytes(20), k=5, alpha=3)
    lookup.add_candidates(nodes)
    drive(lookup, lambda c: [], dead={n.node_id for n in nodes})
    assert lookup.finished
    assert lookup.closest_responders() == []


def test_candidates_are_bounded_and_one_per_address() -> None:
    target = bytes(20)
    lookup = Lookup(target, k=4, alpha=1, max_candidates=10)
    same_address = [Contact(node_id=bytes([i]) * 20, host="10.9.9.9", port=1) for i in range(1, 30)]
    assert lookup.add_candidates(same_address) == 1
    many = make_nodes(100, seed=10)
    lookup.add_candidates(many)
    assert len(lookup) == 10
    kept = {c.node_id for c in true_closest([*many, same_address[0]], target, 10)}
    assert {c.node_id for c in many + same_address if lookup.state_of(c.node_id) is not None} == kept


def test_answers_from_strangers_and_late_answers_are_ignored() -> None:
    nodes = make_nodes(10, seed=11)
    lookup = Lookup(bytes(20), k=3, alpha=1)
    lookup.add_candidates(nodes[:5])
    (asked,) = lookup.next_queries(0.0)
    lookup.on_response(nodes[9].node_id, nodes, 0.1)  # never asked: ignored
    assert lookup.state_of(nodes[6].node_id) is None
    lookup.on_failure(asked.node_id, 2.0)
    lookup.on_response(asked.node_id, nodes, 2.5)  # too late: stays failed
    assert lookup.state_of(asked.node_id) is QueryState.FAILED
    assert lookup.state_of(nodes[6].node_id) is None


def test_excluded_ids_never_become_candidates() -> None:
    nodes = make_nodes(5, seed=12)
    lookup = Lookup(bytes(20), exclude_ids=[nodes[0].node_id])
    assert lookup.add_candidates(nodes) == 4


def test_bad_parameters() -> None:
    with pytest.raises(DhtUsageError):
        Lookup(b"short")
    with pytest.raises(DhtUsageError):
        Lookup(bytes(20), alpha=0)

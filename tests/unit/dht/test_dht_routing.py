"""The k-bucket routing table: splitting, least-recently-seen eviction only after a failed ping, bounds."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmsg.dht.core.contact import Contact, distance
from p2pmsg.dht.core.routing import ContactAdded, ContactRemoved, PingNeeded, RoutingTable

OWN = bytes(20)  # id 0: the far half (top bit 1) is a single bucket that never splits (depth 1, modulus 1)


def contact(value: int, port: int | None = None) -> Contact:
    return Contact(node_id=value.to_bytes(20, "big"), host="10.0.0.1", port=port or 1 + value % 60000)


def far(i: int) -> Contact:
    """Contacts in the far half of the keyspace (top bit set), distinct."""
    return contact((1 << 159) | (i * 7919 + 1))


def test_adds_until_k_then_splits_the_bucket_holding_own_id() -> None:
    table = RoutingTable(OWN, k=4)
    near = [contact(i) for i in range(1, 9)]  # all share the top bits of OWN
    for c in near:
        table.observe(c, 0.0)
    assert len(table) == 8
    assert len(table.buckets()) > 1
    for bucket in table.buckets():
        assert len(bucket.contacts) <= 4
        for c in bucket.contacts:
            assert bucket.low <= int.from_bytes(c.node_id, "big") < bucket.high


def test_closest_matches_brute_force() -> None:
    rng = random.Random(1)
    table = RoutingTable(rng.randbytes(20), k=20)
    contacts = [Contact(node_id=rng.randbytes(20), host="10.0.0.2", port=1000 + i) for i in range(400)]
    for c in contacts:
        table.observe(c, 0.0)
    held = table.contacts()
    for _ in range(20):
        target = rng.randbytes(20)
        expected = sorted(held, key=lambda c: distance(c.node_id, target))[:20]
        assert table.closest(target) == expected
    excluded = table.closest(held[0].node_id, 5, exclude_ids=[held[0].node_id])
    assert held[0] not in excluded


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 60), target_near_own=st.booleans())
def test_closest_is_the_brute_force_order_for_any_target_and_count(
    seed: int, count: int, target_near_own: bool
) -> None:
    """closest() visits buckets by prefix distance; it must still equal a full sort, deep buckets included."""
    rng = random.Random(seed)
    own = rng.getrandbits(160)
    table = RoutingTable(own.to_bytes(20, "big"), k=4, split_depth_modulus=2)
    for i in range(120):
        shared = rng.randrange(0, 160)  # ids sharing a prefix of every length with ours: buckets of every depth
        value = (
            (own >> (160 - shared) << (160 - shared)) | rng.getrandbits(160 - shared)
            if shared
            else rng.getrandbits(160)
        )
        table.observe(contact(value, port=1 + i), 0.0)
    target = (own ^ rng.getrandbits(rng.randrange(1, 40))) if target_near_own else rng.getrandbits(160)
    key = target.to_bytes(20, "big")
    expected = sorted(table.contacts(), key=lambda c: distance(c.node_id, key))[:count]
    assert table.closest(key, count) == expected
    assert len(table.buckets()) > 3


def test_full_unsplittable_bucket_pings_oldest_and_keeps_it_if_alive() -> None:
    table = RoutingTable(OWN, k=3, split_depth_modulus=1)
    first = [far(i) for i in range(3)]
    for c in first:
        assert table.observe(c, 0.0) == [ContactAdded(contact=c)]
    newcomer = far(10)
    events = table.observe(newcomer, 1.0)
    assert events == [PingNeeded(contact=first[0])]
    # Only one ping at a time per bucket.
    assert table.observe(far(11), 1.0) == []
    assert table.ping_result(first[0].node_id, alive=True, now=2.0) == []
    assert first[0].node_id in table
    assert newcomer.node_id not in table
    # The old contact is now the most recently seen; the next oldest is pinged next time.
    assert table.observe(far(12), 3.0) == [PingNeeded(contact=first[1])]


def test_dead_oldest_is_replaced_by_the_newest_waiting_contact() -> None:
    table = RoutingTable(OWN, k=3, split_depth_modulus=1)
    first = [far(i) for i in range(3)]
    for c in first:
        table.observe(c, 0.0)
    table.observe(far(10), 1.0)
    table.observe(far(11), 1.0)
    events = table.ping_result(first[0].node_id, alive=False, now=2.0)
    assert events == [ContactRemoved(contact=first[0]), ContactAdded(contact=far(11))]
    assert first[0].node_id not in table
    assert far(11).node_id in table
    info = next(b for b in table.buckets() if far(10) in b.replacements)
    assert far(11) not in info.replacements


def test_no_eviction_without_a_ping() -> None:
    table = RoutingTable(OWN, k=2, split_depth_modulus=1)
    a, b = far(1), far(2)
    table.observe(a, 0.0)
    table.observe(b, 0.0)
    for i in range(100):
        table.observe(far(100 + i), float(i))
    assert a.node_id in table and b.node_id in table
    assert len(next(bk for bk in table.buckets() if a in bk.contacts).replacements) == 2  # bounded cache (k)


def test_known_id_at_a_new_address_is_not_moved() -> None:
    table = RoutingTable(OWN, k=3)
    original = contact(5, port=1000)
    table.observe(original, 0.0)
    table.observe(contact(5, port=2000), 1.0)
    assert table.get(original.node_id) == original


def test_failures_evict_with_replacement_or_after_max_failures() -> None:
    table = RoutingTable(OWN, k=2, split_depth_modulus=1, max_failures=3)
    a, b = far(1), far(2)
    table.observe(a, 0.0)
    table.observe(b, 0.0)
    assert table.failed(a.node_id, 1.0) == []
    assert table.failed(a.node_id, 1.0) == []
    assert table.failed(a.node_id, 1.0) == [ContactRemoved(contact=a)]
    # With a replacement waiting, one failure is enough.
    table.observe(a, 2.0)
    waiting = far(3)
    table.observe(waiting, 2.0)
    assert table.failed(b.node_id, 3.0) == [ContactRemoved(contact=b), ContactAdded(contact=waiting)]


def test_an_answer_resets_the_failure_count() -> None:
    table = RoutingTable(OWN, k=2, split_depth_modulus=1, max_failures=2)
    a = far(1)
    table.observe(a, 0.0)
    table.failed(a.node_id, 1.0)
    table.observe(a, 2.0)
    assert table.failed(a.node_id, 3.0) == []
    assert a.node_id in table


def test_depth_relaxation_splits_far_buckets_until_a_multiple_of_b() -> None:
    own = bytes(20)
    strict = RoutingTable(own, k=2, split_depth_modulus=1)
    relaxed = RoutingTable(own, k=2, split_depth_modulus=5)
    rng = random.Random(5)
    for _ in range(200):
        c = contact((1 << 159) | rng.getrandbits(159))
        strict.observe(c, 0.0)
        relaxed.observe(c, 0.0)
    assert len(strict) == 2  # the far half never splits
    assert len(relaxed) > 2  # it splits down to depth 5 there, and no deeper
    far_depths = {b.depth for b in relaxed.buckets() if b.low >= 1 << 159}
    assert max(far_depths) == 5
    assert len(relaxed) == 2 * 16  # 16 full buckets of depth 5 cover the far half


def test_own_id_is_never_added() -> None:
    table = RoutingTable(OWN)
    assert table.observe(Contact(node_id=OWN, host="10.0.0.1", port=1), 0.0) == []
    assert len(table) == 0


def test_stale_buckets_and_touch() -> None:
    table = RoutingTable(OWN, k=2)
    for i in range(1, 6):
        table.observe(contact(i), 0.0)
    assert len(table.stale_buckets(100.0, 50.0)) == len(table.buckets())
    table.touch(contact(1).node_id, 90.0)
    assert len(table.stale_buckets(100.0, 50.0)) == len(table.buckets()) - 1


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["observe", "failed", "ping_ok", "ping_dead", "answered", "check", "remove"]),
            st.integers(0, 2**160 - 1),
        ),
        max_size=150,
    ),
    own=st.integers(0, 2**160 - 1),
)
def test_invariants_hold_under_any_sequence(ops: list[tuple[str, int]], own: int) -> None:
    k = 3
    table = RoutingTable(own.to_bytes(20, "big"), k=k)
    seen: list[int] = []
    for now, (op, value) in enumerate(ops):
        if op == "observe" or not seen:
            table.observe(contact(value), float(now))
            seen.append(value)
            continue
        target = seen[value % len(seen)].to_bytes(20, "big")
        if op == "failed":
            table.failed(target, float(now))
        elif op == "answered":
            table.answered(target, float(now))
        elif op == "check":
            table.quiet_contacts(float(now), quiet_for=float(value % 5), retry_after=1.0)
        elif op == "remove":
            table.remove(target)
        else:
            table.ping_result(target, alive=op == "ping_ok", now=float(now))
    buckets = table.buckets()
    assert buckets[0].low == 0 and buckets[-1].high == 2**160
    for left, right in itertools.pairwise(buckets):
        assert left.high == right.low
    ids = [c.node_id for c in table.contacts()]
    assert len(ids) == len(set(ids))
    for bucket in buckets:
        assert len(bucket.contacts) <= k
        assert len(bucket.replacements) <= k
        assert not {c.node_id for c in bucket.contacts} & {c.node_id for c in bucket.replacements}
        for c in bucket.contacts + bucket.replacements:
            assert bucket.low <= int.from_bytes(c.node_id, "big") < bucket.high
        # Every contact and replacement has a last-seen time, and nothing else does (no entry outlives its contact).
        assert set(bucket.last_seen) == {c.node_id for c in bucket.contacts + bucket.replacements}


def test_liveness_checks_offer_each_quiet_contact_once_per_retry() -> None:
    table = RoutingTable(OWN, k=3, split_depth_modulus=1)
    a, b = far(1), far(2)
    table.observe(a, 0.0)
    table.observe(b, 10.0)
    assert table.next_liveness_check(quiet_for=100.0, retry_after=30.0) == 100.0
    assert table.quiet_contacts(99.0, 100.0, 30.0) == []
    assert table.quiet_contacts(100.0, 100.0, 30.0) == [a]  # b has been quiet for 90 s only
    assert table.next_liveness_check(100.0, 30.0) == 110.0
    assert table.quiet_contacts(110.0, 100.0, 30.0) == [b]
    assert table.quiet_contacts(129.0, 100.0, 30.0) == []  # both were just asked: wait retry_after
    assert table.next_liveness_check(100.0, 30.0) == 130.0
    # a answers: it becomes the most recently seen and is quiet again only quiet_for later.
    last_touched = table.buckets()[-1].last_touched
    table.answered(a.node_id, 105.0)
    assert [c.node_id for c in table.buckets()[-1].contacts] == [b.node_id, a.node_id]
    assert table.buckets()[-1].last_touched == last_touched  # an answer is not a lookup: refresh stays due
    assert table.quiet_contacts(140.0, 100.0, 30.0) == [b]  # b did not answer: asked again after retry_after
    assert table.next_liveness_check(100.0, 30.0) == 170.0
    assert table.quiet_contacts(205.0, 100.0, 30.0) == [b, a]  # least recently seen first


def test_a_contact_failing_its_liveness_checks_leaves_after_max_failures() -> None:
    table = RoutingTable(OWN, k=3, split_depth_modulus=1, max_failures=3)
    dead, alive = far(1), far(2)
    table.observe(dead, 0.0)
    table.observe(alive, 0.0)
    now = 100.0
    for _ in range(3):
        assert dead in table.quiet_contacts(now, 100.0, 30.0)  # it stays quiet, so it is asked again
        events = table.failed(dead.node_id, now + 2)
        table.answered(alive.node_id, now + 1)
        now += 30.0
    assert events == [ContactRemoved(contact=dead)]
    assert dead.node_id not in table and alive.node_id in table
    assert table.quiet_contacts(now, 100.0, 30.0) == []
    # An empty table has nothing to check, ever.
    table.remove(alive.node_id)
    assert table.next_liveness_check(100.0, 30.0) == float("inf")


def test_a_liveness_check_skips_the_contact_whose_full_bucket_ping_is_out() -> None:
    table = RoutingTable(OWN, k=2, split_depth_modulus=1)
    a, b = far(1), far(2)
    table.observe(a, 0.0)
    table.observe(b, 0.0)
    assert table.observe(far(3), 1.0) == [PingNeeded(contact=a)]
    assert table.quiet_contacts(500.0, 100.0, 30.0) == [b]  # a's ping is already out
    assert table.next_liveness_check(100.0, 30.0) == 530.0  # b's retry; not a, so the driver does not wake for it
    table.ping_result(a.node_id, alive=False, now=501.0)
    assert a.node_id not in table and far(3).node_id in table


def test_last_seen_follows_contacts_through_splits_and_replacements() -> None:
    table = RoutingTable(OWN, k=2, split_depth_modulus=5)
    rng = random.Random(9)
    for t in range(60):
        table.observe(contact(rng.getrandbits(160)), float(t))
    for bucket in table.buckets():
        assert set(bucket.last_seen) == {c.node_id for c in bucket.contacts + bucket.replacements}
        order = [bucket.last_seen[c.node_id] for c in bucket.contacts]
        assert order == sorted(order)  # least recently seen first: the one a liveness check asks


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(Exception, match="20 bytes"):
        RoutingTable(b"short")
    with pytest.raises(Exception, match="positive"):
        RoutingTable(OWN, k=0)

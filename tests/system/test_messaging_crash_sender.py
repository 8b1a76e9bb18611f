"""System test: the sender's node is killed with SIGKILL in the middle of a burst of 1,000 messages.

Alice sends the burst with ``p2pmsg chat bob`` runs fed on stdin (100 lines each; a run that exits 0 has durably
queued every line).  A ``p2pmsg chat alice`` left open on Bob's side prints each message as Bob stores it, so Alice's
node is killed (``kill -9``) while messages are flowing.  After Alice restarts (on a new port) and sends the rest:

* every line reported queued is in Bob's history exactly once (ids and texts unique);
* Bob has exactly what Alice's node has in its history (nothing durably queued is lost, nothing is invented), and
  of the run cut by the kill, what survived is a prefix (the lines are sent one after the other);
* every message ends ``delivered`` at Alice, and her outbox is empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import Burst, Mesh, Watcher, alice_and_bob, texts

BURST = 1000
BATCH = 100
KILL_AT = 450
"""Alice is killed once Bob has received this many messages."""


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with alice_and_bob(tmp_path) as m:
        yield m


def test_kill_9_of_the_sender_mid_burst_loses_and_duplicates_nothing(mesh: Mesh) -> None:
    lines = [f"burst {i:04d}" for i in range(BURST)]
    watcher = Watcher(mesh, "bob", "alice", marker="alice: burst ")
    burst = Burst(mesh, "alice", "bob", lines, BATCH).start()
    try:
        seen = watcher.wait_for(KILL_AT)
        assert seen >= KILL_AT, f"bob received only {seen} messages before the kill" + mesh.tail("alice")
        mesh.kill("alice")
        burst.join()
    finally:
        burst.stop()
    assert burst.not_run, "the kill came after the whole burst was queued: not a mid-burst kill"
    reported = burst.queued
    cut = burst.failed  # the run the kill interrupted (if the kill fell between two runs there is none)
    assert len(cut) <= 1

    mesh.start("alice")
    rest = Burst(mesh, "alice", "bob", burst.not_run, BATCH).start()
    rest.join()
    assert not rest.failed, rest.failed[0].stderr
    reported += rest.queued

    alice_out = [r for r in mesh.history("alice", "bob") if r["direction"] == "out"]
    durable = texts(alice_out)
    assert len({r["id"] for r in alice_out}) == len(alice_out)
    assert len(set(durable)) == len(durable), "a line was queued twice at alice"
    missing_at_alice = set(reported) - set(durable)
    assert not missing_at_alice, f"{len(missing_at_alice)} lines reported queued are not in alice's history"

    received = mesh.wait_for_history("bob", "alice", len(alice_out), timeout=45)
    ids = [r["id"] for r in received]
    assert len(ids) == len(set(ids)), "a message id is twice in bob's history"
    got = texts(received)
    assert len(got) == len(set(got)), "a text arrived twice under different ids"
    assert set(ids) == {r["id"] for r in alice_out}, "bob's history differs from what alice's node queued"
    assert {r["id"]: r["text"] for r in received} == {r["id"]: r["text"] for r in alice_out}
    assert not set(reported) - set(got), "a line reported queued never arrived"
    assert len(got) >= len(reported) >= BURST - BATCH
    for batch in cut:
        survived = [line for line in batch.lines if line in set(got)]
        assert survived == batch.lines[: len(survived)], "the run cut by the kill did not leave a prefix"

    def all_delivered() -> bool:
        rows = mesh.history("alice", "bob")
        return all(r["status"] == "delivered" for r in rows if r["direction"] == "out")

    mesh.wait_until(all_delivered, "every message marked delivered at alice", "alice", timeout=45)
    assert mesh.status("alice")["outbox_depth"] == 0
    assert [r["id"] for r in mesh.history("bob", "alice")] == ids  # nothing arrived late, twice

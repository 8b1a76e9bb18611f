"""System test: the receiver's node is killed with SIGKILL in the middle of receiving a burst of 1,000 messages.

Alice queues the burst with ``p2pmsg chat bob`` runs fed on stdin (100 lines each, each run exits 0 only once all
its lines are durably queued); a ``p2pmsg chat alice`` open on Bob's side prints the messages as Bob stores them,
and Bob's node is killed (``kill -9``) once part of the burst is in.  Alice keeps queueing (into her outbox) while
Bob is down.  After Bob restarts (on a new port, found again through the DHT), every one of the 1,000 messages is
in his history exactly once, and every one ends ``delivered`` at Alice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import Burst, Mesh, Watcher, alice_and_bob, texts

BURST = 1000
BATCH = 100
KILL_AT = 300
"""Bob is killed once he has stored this many messages."""


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with alice_and_bob(tmp_path) as m:
        yield m


def test_kill_9_of_the_receiver_mid_burst_loses_and_duplicates_nothing(mesh: Mesh) -> None:
    lines = [f"burst {i:04d}" for i in range(BURST)]
    watcher = Watcher(mesh, "bob", "alice", marker="alice: burst ")
    burst = Burst(mesh, "alice", "bob", lines, BATCH).start()
    try:
        seen = watcher.wait_for(KILL_AT)
        assert seen >= KILL_AT, f"bob received only {seen} messages" + mesh.tail("alice") + mesh.tail("bob")
        mesh.kill("bob")
        watcher.close()
        assert seen < BURST, "bob had everything before the kill: not a mid-receive kill"
        burst.join()
    finally:
        burst.stop()
    assert not burst.failed, burst.failed[0].stderr
    assert burst.queued == lines  # alice's node never went down: every line was reported queued

    alice_out = mesh.history("alice", "bob")
    assert texts(alice_out) == lines
    assert any(r["status"] != "delivered" for r in alice_out), "nothing was left to deliver after the kill"

    mesh.start("bob")
    received = mesh.wait_for_history("bob", "alice", BURST, timeout=45)
    ids = [r["id"] for r in received]
    assert len(ids) == len(set(ids)) == BURST, "a message id is twice in bob's history"
    assert set(ids) == {r["id"] for r in alice_out}
    assert {r["id"]: r["text"] for r in received} == {r["id"]: r["text"] for r in alice_out}
    assert sorted(texts(received)) == lines

    def all_delivered() -> bool:
        return all(r["status"] == "delivered" for r in mesh.history("alice", "bob"))

    mesh.wait_until(all_delivered, "every message marked delivered at alice", "alice", timeout=45)
    assert mesh.status("alice")["outbox_depth"] == 0
    assert [r["id"] for r in mesh.history("bob", "alice")] == ids  # nothing arrived late, twice

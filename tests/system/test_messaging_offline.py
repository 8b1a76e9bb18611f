"""System test: messages written to a contact whose node is stopped arrive, exactly once and in order, when it is
back (real ``p2pmsg`` processes; bob comes back on a new port and is found again through the DHT)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import Mesh, alice_and_bob, texts

COUNT = 50


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with alice_and_bob(tmp_path) as m:
        yield m


def test_fifty_messages_to_a_stopped_node_arrive_once_in_order(mesh: Mesh) -> None:
    bob_addrs = mesh.cli_json("bob", "id")["addrs"]
    assert mesh.stop("bob") == 0  # SIGTERM: a clean shutdown
    assert not (mesh.home("bob") / "control.sock").exists()

    ids: list[str] = []
    for i in range(COUNT):
        result = json.loads(mesh.cli("alice", "send", "bob", f"offline {i:02d}", "--json").stdout)
        assert result["status"] == "queued"
        ids.append(result["id"])
    assert len(set(ids)) == COUNT
    outgoing = mesh.history("alice", "bob")
    assert [r["id"] for r in outgoing] == ids
    assert {r["status"] for r in outgoing} <= {"queued", "sent"}  # nobody to deliver to
    assert not any(r["status"] == "delivered" for r in outgoing)
    assert mesh.status("alice")["outbox_depth"] == COUNT

    mesh.start("bob")
    assert mesh.cli_json("bob", "id")["addrs"] != bob_addrs  # a new port: only the DHT knows where bob is now
    received = mesh.wait_for_history("bob", "alice", COUNT, timeout=45)
    assert [r["id"] for r in received] == ids, "every message exactly once, in the order sent"
    assert texts(received) == [f"offline {i:02d}" for i in range(COUNT)]
    assert all(r["direction"] == "in" for r in received)

    def delivered() -> bool:
        return all(r["status"] == "delivered" for r in mesh.history("alice", "bob"))

    mesh.wait_until(delivered, "every message marked delivered at alice", "alice")
    assert mesh.status("alice")["outbox_depth"] == 0
    assert [r["id"] for r in mesh.history("bob", "alice")] == ids  # and nothing arrived twice meanwhile

"""A node under a connection flood from many networks, on a LAN of network namespaces (:mod:`lan`).

The node's limits exempt loopback, so only here, with the attacker on a host of its own, do they act for real: the
handshake buckets of a source, of its /24 and of everyone, the reserve for quiet networks, contacts' familiar
addresses, and the WebSocket small-frame budget.  The attacker (:mod:`flood`, run on host ``mallory``) floods bob
from 64 addresses in eight /24s of 10.92.0.0/16, which the LAN's switch routes to it.  Meanwhile the people bob
knows, and a stranger from another network, must still get their messages to him.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lan import PORT, WS_PORT, open_lan_mesh
from procs import texts

FLOOD = Path(__file__).with_name("flood.py")
SOURCES = [f"10.92.{net}.{host}" for net in range(8) for host in range(1, 9)]


def test_contacts_and_a_stranger_from_elsewhere_reach_a_node_under_a_flood(tmp_path: Path) -> None:
    with open_lan_mesh(tmp_path, ("alice", "bob", "carol")) as (lan, mesh):
        mesh.introduce("alice", "bob")
        mesh.cli("alice", "send", "bob", "before the flood")
        mesh.wait_for_history("bob", "alice", 1)
        mesh.stop("alice")  # she comes back during the flood: a new connection, not the old session

        lan.add_host("mallory", 9)
        lan.add_network("mallory", "10.92.0.0/16", SOURCES)
        stop = tmp_path / "stop-flood"
        target = lan.addresses["bob"]
        flood = subprocess.Popen(
            [*lan.prefix("mallory"), sys.executable, str(FLOOD), target, str(PORT), str(WS_PORT), str(stop), *SOURCES],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:

            def flooded() -> bool:
                dropped = mesh.status("bob")["dropped"]
                return bool(dropped.get("net_rejected_rate", 0) > 100 and dropped.get("net_rejected_frames"))

            mesh.wait_until(flooded, "bob refusing the flood", "bob")
            mesh.start("alice")
            mesh.cli("alice", "send", "bob", "during the flood")
            mesh.cli("bob", "send", "alice", "I hear you")
            invite = mesh.cli_json("bob", "id")["invite"]
            mesh.cli("carol", "contacts", "add", invite, "--name", "bob")
            mesh.cli("carol", "send", "bob", "hello from a stranger")
            assert texts(mesh.wait_for_history("bob", "alice", 3)) == [
                "before the flood",
                "during the flood",
                "I hear you",
            ]
            assert texts(mesh.wait_for_history("alice", "bob", 3))[-1] == "I hear you"

            def requested() -> list[str]:
                return [r["last_text"] for r in mesh.cli_json("bob", "requests")]

            assert mesh.wait_until(requested, "carol's message in bob's requests", ["bob", "carol"]) == [
                "hello from a stranger"
            ]
            still_flooding = flood.poll() is None
        finally:
            stop.touch()
            try:
                out, err = flood.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # never hide the test's own failure behind this one
                flood.kill()
                out, err = flood.communicate()
        assert flood.returncode == 0, err[-2000:]
        counts = json.loads(out)
        assert still_flooding, f"the flood ended before the messages went through: {counts}"
        assert counts["websocket"].startswith("dropped"), counts

        status = mesh.status("bob")
        dropped, listener = status["dropped"], status["listener"]
        assert dropped["net_rejected_frames"] == 1 and listener["handshake_failures"] >= 3, status
        # Far more refused than served: the flood's own networks got no more than their buckets.
        assert listener["rejected_rate"] > 10 * listener["authenticated"], listener
        log = mesh.log("bob")
        assert "starts connections too fast" in log and "small WebSocket frames" in log
        assert mesh.running("bob")

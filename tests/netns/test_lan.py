"""Nodes on separate hosts of one LAN (network namespaces, :mod:`lan`): what a person running two machines sees.

Each host runs the real ``p2pmsg`` processes (``ip netns exec``); the test drives them with the CLI through their
control sockets, which live in the shared file system.  Every node listens on the wildcard address, as ``init``
does by default, so what it advertises comes from the host's own network.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from lan import PORT, SUBNET, WS_PORT, Lan, open_lan_mesh
from procs import Mesh, texts


@pytest.fixture
def lan_mesh(tmp_path: Path) -> Iterator[tuple[Lan, Mesh]]:
    """A bootstrap peer, alice and bob, each on its own host of one LAN, contacts of each other."""
    with open_lan_mesh(tmp_path, ("alice", "bob")) as (lan, mesh):
        mesh.introduce("alice", "bob")
        yield lan, mesh


def test_hosts_of_a_lan_advertise_their_lan_address_and_message_each_other(lan_mesh: tuple[Lan, Mesh]) -> None:
    lan, mesh = lan_mesh
    for name in ("alice", "bob"):
        info = mesh.cli_json(name, "id")
        host, peer = lan.addresses[name], info["peer_id"]
        assert info["addrs"] == [f"/ip4/{host}/tcp/{PORT}/p2p/{peer}", f"/ip4/{host}/tcp/{WS_PORT}/ws/p2p/{peer}"]
        assert "127.0.0.1" not in info["invite"]
    mesh.cli("alice", "send", "bob", "hello from the other machine")
    mesh.cli("bob", "send", "alice", "hello back")
    assert texts(mesh.wait_for_history("bob", "alice", 2)) == ["hello from the other machine", "hello back"]
    assert texts(mesh.wait_for_history("alice", "bob", 2)) == ["hello from the other machine", "hello back"]
    assert not mesh.status("alice")["dropped"].get("net_handshake_failures")  # nobody dialled itself


def test_a_host_that_gets_a_new_address_is_found_there(lan_mesh: tuple[Lan, Mesh]) -> None:
    """Alice's laptop gets a new lease while her node runs: she advertises the new address within seconds, and Bob,
    whose session ran over the old one, reaches her there at once: her new record, which his DHT store holds, ends
    that session (it would otherwise hold his message until 30 s passed without a receipt)."""
    lan, mesh = lan_mesh
    mesh.cli("alice", "send", "bob", "before the move")
    mesh.wait_for_history("bob", "alice", 1)
    moved = f"{SUBNET}.13"
    lan.move("alice", moved)

    def advertised() -> bool:
        return bool(mesh.cli_json("alice", "id")["addrs"][0].startswith(f"/ip4/{moved}/"))

    mesh.wait_until(advertised, "alice advertising her new address", "alice")
    mesh.cli("bob", "send", "alice", "after the move")
    mesh.cli("alice", "send", "bob", "from the new address")
    rows = mesh.wait_for_history("alice", "bob", 3, timeout=20)
    assert texts(rows) == ["before the move", "after the move", "from the new address"]
    assert texts(mesh.wait_for_history("bob", "alice", 3, timeout=20))[-1] == "from the new address"

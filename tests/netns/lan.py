"""A small LAN of network namespaces for tests that need several hosts: real interfaces, real addresses.

:func:`open_lan` creates one *switch* namespace holding a Linux bridge, and one namespace per host, each joined to
the bridge by a veth pair whose host end is ``eth0`` with ``10.91.0.<n>/24``; the switch's bridge has
``10.91.0.1`` and is every host's default route (so a host has a "primary address", as on a real LAN).  Nothing
is routed beyond the bridge, and the host's own network is never touched: only the namespaces this module created
are configured, and all of them are deleted on exit, also when the test fails.

A host can also get addresses of networks beyond the LAN (:meth:`Lan.add_network`), which the switch routes to it,
as if the host were a router with those networks behind it: a test gets sources in many /24s and /16s.

:func:`open_lan_mesh` puts real ``p2pmsg`` nodes on such hosts (:mod:`procs`): a bootstrap peer and named nodes.

Needs root and ``ip`` (iproute2); otherwise the tests skip with the reason.  Names carry the process id, so two
runs at once do not collide.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from procs import Mesh, open_mesh

SUBNET = "10.91.0"
PORT = 4001
"""The TCP port every node of :func:`open_lan_mesh` listens on (and the bootstrap peer's UDP port)."""
WS_PORT = 4002
"""... and its WebSocket port."""
_counter = itertools.count()


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def require_netns() -> None:
    """Skip the test (with the reason) where namespaces cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("network namespace tests need root (CI runs them as root)")
    if shutil.which("ip") is None:
        pytest.skip("network namespace tests need `ip` (iproute2)")


class Lan:
    """The namespaces of one test: :meth:`add_host` makes a host, :attr:`hosts` maps its name to its namespace."""

    def __init__(self) -> None:
        self.tag = f"p2n{os.getpid() % 100000}x{next(_counter)}"
        self.switch = f"{self.tag}sw"
        self.hosts: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self._made: list[str] = []

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def start(self) -> None:
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, name: str, number: int) -> str:
        """Make host ``name`` with address ``10.91.0.<number>``; return that address."""
        namespace = f"{self.tag}{name}"[:15]
        self._add_namespace(namespace)
        port = f"v{number}"
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        address = f"{SUBNET}.{number}"
        self.move(name, address, namespace=namespace)
        self.hosts[name] = namespace
        return address

    def move(self, name: str, address: str, *, namespace: str | None = None) -> None:
        """Give host ``name`` the address ``address`` instead of the one it had (a new DHCP lease, say)."""
        namespace = namespace or self.hosts[name]
        _ip("-n", namespace, "addr", "flush", "dev", "eth0")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "route", "add", "default", "via", f"{SUBNET}.1")
        self.addresses[name] = address

    def add_network(self, name: str, network: str, addresses: Sequence[str]) -> None:
        """Give host ``name`` the ``addresses`` of ``network`` (a CIDR beyond the LAN), which the switch now routes
        to it: the host's sockets can use them as source addresses, and the other hosts' answers reach them."""
        namespace = self.hosts[name]
        for address in addresses:
            _ip("-n", namespace, "addr", "add", f"{address}/32", "dev", "eth0")
        _ip("-n", self.switch, "route", "add", network, "via", self.addresses[name])
        done = subprocess.run(
            ["ip", "netns", "exec", self.switch, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cannot turn on forwarding in {self.switch}: {done.stderr.strip()}")

    def prefix(self, name: str) -> list[str]:
        """The command that runs a program on host ``name``."""
        return ["ip", "netns", "exec", self.hosts[name]]

    def close(self) -> None:
        for namespace in reversed(self._made):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _ip("netns", "del", namespace)
        self._made.clear()


@contextlib.contextmanager
def open_lan() -> Iterator[Lan]:
    """A :class:`Lan` whose namespaces are all deleted on exit."""
    require_netns()
    lan = Lan()
    try:
        try:
            lan.start()
        except RuntimeError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        yield lan
    finally:
        lan.close()


@contextlib.contextmanager
def open_lan_mesh(root: Path, names: Sequence[str]) -> Iterator[tuple[Lan, Mesh]]:
    """A bootstrap peer on host ``boot`` (10.91.0.2) and a started node for each of ``names`` on hosts 10.91.0.3,
    ... (in that order), each listening on the wildcard address (TCP :data:`PORT`, WebSocket :data:`WS_PORT`) as
    ``init`` does by default, joined through the bootstrap peer.  Everything is stopped and deleted on exit."""
    with open_lan() as lan, open_mesh(root) as mesh:
        for number, name in enumerate(("boot", *names), start=2):
            lan.add_host(name, number)
            mesh.prefix[name] = lan.prefix(name)
        boot = _start_bootstrap(mesh, lan)
        listen = ["--listen", f"/ip4/0.0.0.0/tcp/{PORT}", "--listen", f"/ip4/0.0.0.0/tcp/{WS_PORT}/ws"]
        for name in names:
            mesh.cli(name, "init", "--no-passphrase", *listen, "--bootstrap", boot)
            mesh.start(name)
        yield lan, mesh


def _start_bootstrap(mesh: Mesh, lan: Lan) -> str:
    mesh._spawn("boot", ["--home", str(mesh.home("boot")), "bootstrap", "--listen", f"/ip4/0.0.0.0/udp/{PORT}"])

    def printed() -> list[str]:
        prefix = "bootstrap node listening on "
        return [line[len(prefix) :] for line in mesh.log("boot").splitlines() if line.startswith(prefix)]

    addrs = mesh.wait_until(printed, "the bootstrap node's addresses", "boot")
    # Only the address friends can reach: not 127.0.0.1, which on their machines is their own.
    assert [a.split("/p2p/")[0] for a in addrs] == [f"/ip4/{lan.addresses['boot']}/udp/{PORT}"]
    return addrs[0]

"""A node listening on a wildcard address with no bootstrap peers (the first node of a LAN) advertises the host's
primary address too, not loopback alone, so that its invite reaches the other machines of the network."""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket

import pytest
import trio

import p2pmsg.node as node_module
from p2pmsg.identity import Identity
from p2pmsg.node import advertised_addrs, primary_address
from p2pmsg.wire.multiaddr import Multiaddr

WILDCARD_V4 = Multiaddr.parse("/ip4/0.0.0.0/tcp/4001")
WILDCARD_V6 = Multiaddr.parse("/ip6/::/tcp/4001/ws")


def _default_route_source(family: socket.AddressFamily, probe: str) -> str | None:
    """The source address of the default route, found the way an administrator would (UDP connect, no packet)."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((probe, 9))
            local = str(sock.getsockname()[0])
    except OSError:
        return None
    ip = ipaddress.ip_address(local)
    return None if ip.is_loopback or ip.is_link_local or ip.is_unspecified else local


def test_first_node_of_a_lan_advertises_the_primary_address() -> None:
    local = _default_route_source(socket.AF_INET, "192.0.2.1")
    if local is None:
        pytest.skip("this machine has no IPv4 default route with a usable source address")
    out = [str(a) for a in advertised_addrs([WILDCARD_V4], [])]
    assert out == [f"/ip4/{local}/tcp/4001"]  # not loopback: on a friend's machine that is the friend's own host
    assert primary_address(4) == local


def test_first_node_of_a_lan_advertises_the_primary_ipv6_address() -> None:
    local = _default_route_source(socket.AF_INET6, "2001:db8::1")
    if local is None:
        pytest.skip("this machine has no IPv6 default route with a usable source address")
    out = [str(a) for a in advertised_addrs([WILDCARD_V6], [])]
    assert out == [f"/ip6/{local}/tcp/4001/ws"]


def test_primary_address_comes_from_the_given_function_per_ip_version() -> None:
    def primary(version: int) -> str | None:
        return {4: "192.168.1.20", 6: None}[version]

    out = [str(a) for a in advertised_addrs([WILDCARD_V4, WILDCARD_V6], [], primary=primary)]
    assert out == ["/ip4/192.168.1.20/tcp/4001", "/ip6/::1/tcp/4001/ws"]  # loopback only where nothing else is known


def test_with_bootstrap_peers_the_route_towards_them_is_used_instead() -> None:
    def primary(version: int) -> str | None:
        raise AssertionError("not asked when bootstrap peers are known")

    out = [str(a) for a in advertised_addrs([WILDCARD_V4], [("127.0.0.1", 9)], primary=primary)]
    assert out == ["/ip4/127.0.0.1/tcp/4001"]  # a bootstrap peer on loopback: this machine's own mesh


def test_a_bootstrap_peer_on_the_network_gives_the_address_towards_it_and_no_loopback() -> None:
    local = _default_route_source(socket.AF_INET, "192.0.2.7")
    if local is None:
        pytest.skip("this machine has no IPv4 route towards 192.0.2.7 with a usable source address")
    out = [str(a) for a in advertised_addrs([WILDCARD_V4], [("192.0.2.7", 4001), ("127.0.0.1", 4001)])]
    assert out == [f"/ip4/{local}/tcp/4001", "/ip4/127.0.0.1/tcp/4001"]  # loopback only as the route to a local peer
    out = [str(a) for a in advertised_addrs([WILDCARD_V4], [("192.0.2.7", 4001)])]
    assert out == [f"/ip4/{local}/tcp/4001"]


def test_a_concrete_listen_address_is_advertised_as_it_is() -> None:
    bound = [Multiaddr.parse("/ip4/127.0.0.1/tcp/4002")]
    assert advertised_addrs(bound, [], primary=lambda version: "192.168.1.20") == bound


async def test_a_bootstrap_node_that_finds_only_loopback_says_what_to_give_friends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A host without a default route (faked: this machine has one) can only name 127.0.0.1, which is useless to
    friends: the node says which address to hand out instead, and prints its address once (not also in the log)."""
    monkeypatch.setattr(node_module, "primary_address", lambda version: None)
    caplog.set_level(logging.INFO, logger="p2pmsg.node")
    identity = Identity.generate()
    printed: list[Multiaddr] = []
    with trio.move_on_after(10):
        async with trio.open_nursery() as nursery:

            def ready(addr: Multiaddr) -> None:
                printed.append(addr)
                nursery.cancel_scope.cancel()

            nursery.start_soon(
                functools.partial(
                    node_module.run_bootstrap_node, identity, Multiaddr.parse("/ip4/0.0.0.0/udp/0"), on_ready=ready
                )
            )
    assert [a.transport()[1] for a in printed] == ["127.0.0.1"]
    messages = [r.getMessage() for r in caplog.records]
    assert not any("bootstrap node listening" in m for m in messages)
    [warning] = [m for m in messages if "no address of this host" in m]
    assert f"/udp/{printed[0].transport()[2]}/p2p/{identity.peer_id}" in warning

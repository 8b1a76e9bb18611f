"""Multiaddr text: the grammar, canonical values, the errors, and round trips under Hypothesis."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmsg.identity import Identity, PeerId
from p2pmsg.wire.multiaddr import MAX_MULTIADDR_LENGTH, PROTOCOLS, Multiaddr, MultiaddrError

PEER = Identity.from_seed(bytes(range(32))).peer_id
OTHER = Identity.from_seed(bytes(32)).peer_id
SETTINGS = settings(max_examples=300, deadline=None)


@pytest.mark.parametrize(
    ("text", "canonical", "transport"),
    [
        ("/ip4/1.2.3.4/tcp/4001", "/ip4/1.2.3.4/tcp/4001", ("tcp", "1.2.3.4", 4001)),
        ("/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/tcp/0", ("tcp", "0.0.0.0", 0)),
        ("/ip6/::1/tcp/4001/ws", "/ip6/::1/tcp/4001/ws", ("ws", "::1", 4001)),
        ("/ip6/0:0:0:0:0:0:0:1/udp/65535", "/ip6/::1/udp/65535", ("udp", "::1", 65535)),
        ("/ip6/2001:DB8:0:0:1:0:0:1/tcp/1", "/ip6/2001:db8::1:0:0:1/tcp/1", ("tcp", "2001:db8::1:0:0:1", 1)),
        ("/ip6/::FFFF:192.0.2.1/tcp/1", "/ip6/::ffff:192.0.2.1/tcp/1", ("tcp", "::ffff:192.0.2.1", 1)),
        ("/dns4/Example.ORG/tcp/443/ws", "/dns4/example.org/tcp/443/ws", ("ws", "example.org", 443)),
        ("/dns6/localhost/udp/53", "/dns6/localhost/udp/53", ("udp", "localhost", 53)),
        ("/dns4/xn--bcher-kva.example/tcp/1", "/dns4/xn--bcher-kva.example/tcp/1", ("tcp", "xn--bcher-kva.example", 1)),
    ],
)
def test_valid_addresses(text: str, canonical: str, transport: tuple[str, str, int]) -> None:
    addr = Multiaddr.parse(text)
    assert str(addr) == canonical
    assert addr.transport() == transport
    assert addr.peer_id is None
    assert Multiaddr.parse(canonical) == addr
    assert hash(Multiaddr.parse(canonical)) == hash(addr)
    assert Multiaddr.from_transport(*transport) == addr or canonical.startswith("/dns6")


def test_components_and_peer_id() -> None:
    addr = Multiaddr.parse(f"/dns4/example.org/tcp/443/ws/p2p/{PEER}")
    assert addr.components == (("dns4", "example.org"), ("tcp", "443"), ("ws", ""), ("p2p", str(PEER)))
    assert addr.peer_id == PEER
    assert addr.transport() == ("ws", "example.org", 443)
    assert repr(addr) == f"Multiaddr('/dns4/example.org/tcp/443/ws/p2p/{PEER}')"


def test_cid_peer_id_is_stored_as_base58() -> None:
    addr = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/1/p2p/{PEER.to_cid()}")
    assert str(addr) == f"/ip4/127.0.0.1/tcp/1/p2p/{PEER.to_base58()}"
    assert addr == Multiaddr.parse(f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}")


def test_bare_p2p() -> None:
    addr = Multiaddr.parse(f"/p2p/{PEER}")
    assert addr.peer_id == PEER
    with pytest.raises(MultiaddrError, match="no transport"):
        addr.transport()
    with pytest.raises(MultiaddrError, match="bare /p2p"):
        addr.without_peer_id()


def test_with_and_without_peer_id() -> None:
    base = Multiaddr.parse("/ip4/127.0.0.1/tcp/4001")
    full = base.with_peer_id(PEER)
    assert str(full) == f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"
    assert full.with_peer_id(PEER) is full
    assert full.without_peer_id() == base
    assert base.without_peer_id() is base
    with pytest.raises(MultiaddrError, match="already names peer") as info:
        full.with_peer_id(OTHER)
    assert info.value.component == "p2p"


def test_from_transport() -> None:
    assert str(Multiaddr.from_transport("ws", "::1", 80, peer_id=PEER)) == f"/ip6/::1/tcp/80/ws/p2p/{PEER}"
    assert str(Multiaddr.from_transport("udp", "example.org", 5)) == "/dns4/example.org/udp/5"
    with pytest.raises(MultiaddrError, match="transport kind"):
        Multiaddr.from_transport("quic", "::1", 80)
    with pytest.raises(MultiaddrError, match="out of range"):
        Multiaddr.from_transport("tcp", "::1", 70000)
    with pytest.raises(MultiaddrError, match="not a decimal"):
        Multiaddr.from_transport("tcp", "::1", -1)


def test_direct_construction_is_validated_and_canonicalised() -> None:
    assert Multiaddr((("ip6", "0::1"), ("tcp", "1"))) == Multiaddr.parse("/ip6/::1/tcp/1")
    with pytest.raises(MultiaddrError, match="cannot end after /ip4"):
        Multiaddr((("ip4", "1.2.3.4"),))
    with pytest.raises(MultiaddrError, match="pair of str"):
        Multiaddr((("ip4", 1),))  # type: ignore[arg-type]
    with pytest.raises(MultiaddrError, match="empty multiaddr"):
        Multiaddr(())


@pytest.mark.parametrize(
    ("text", "component", "reason"),
    [
        ("", "", "must start with '/'"),
        ("ip4/1.2.3.4/tcp/1", "", "must start with '/'"),
        ("/", "", "empty component"),
        ("/ip4/1.2.3.4/tcp/1/", "", "empty component"),
        ("/ip4//tcp/1", "ip4", "not an IPv4 address"),
        ("/ip4/1.2.3.4//tcp/1", "", "empty component"),
        ("/ip4/1.2.3.4", "ip4", "cannot end after /ip4; expected tcp or udp"),
        ("/ip4/1.2.3.4/tcp", "tcp", "needs a value"),
        ("/ip4/01.2.3.4/tcp/1", "ip4", "not an IPv4 address"),
        ("/ip4/1.2.3.256/tcp/1", "ip4", "not an IPv4 address"),
        ("/ip4/::1/tcp/1", "ip4", "not an IPv4 address"),
        ("/ip6/1.2.3.4/tcp/1", "ip6", "not an IPv6 address"),
        ("/ip6/fe80::1%eth0/tcp/1", "ip6", "zone"),
        ("/ip6/1::2::3/tcp/1", "ip6", "not an IPv6 address"),
        ("/ip4/1.2.3.4/tcp/65536", "tcp", "out of range"),
        ("/ip4/1.2.3.4/tcp/080", "tcp", "leading zeros"),
        ("/ip4/1.2.3.4/tcp/+80", "tcp", "without sign"),
        ("/ip4/1.2.3.4/tcp/-1", "tcp", "without sign"),
        ("/ip4/1.2.3.4/tcp/ 80", "tcp", "not a decimal"),
        ("/ip4/1.2.3.4/tcp/999999999999999999999", "tcp", "not a decimal"),
        ("/ip4/1.2.3.4/udp/1/ws", "ws", "cannot come after /udp; expected p2p"),
        ("/ip4/1.2.3.4/tcp/1/ws/ws", "ws", "cannot come after /ws"),
        ("/ip4/1.2.3.4/tcp/1/tcp/2", "tcp", "cannot come after /tcp"),
        ("/tcp/1", "tcp", "cannot come at the start"),
        ("/ip4/1.2.3.4/ip4/1.2.3.4/tcp/1", "ip4", "cannot come after /ip4"),
        ("/ip4/1.2.3.4/quic/1", "quic", "unknown protocol"),
        ("/ipfs/x", "ipfs", "unknown protocol"),
        ("/dns4/-bad.org/tcp/1", "dns4", "inner hyphens"),
        ("/dns4/bad-.org/tcp/1", "dns4", "inner hyphens"),
        ("/dns4/a..b/tcp/1", "dns4", "empty label"),
        ("/dns4/example.org./tcp/1", "dns4", "end with a dot"),
        ("/dns4/under_score.org/tcp/1", "dns4", "inner hyphens"),
        ("/dns4/1.2.3.4/tcp/1", "dns4", "all digits"),
        ("/dns4/" + "a" * 64 + ".org/tcp/1", "dns4", "label is 64 characters"),
        ("/dns4/" + ".".join(["a" * 60] * 5) + "/tcp/1", "dns4", "more than 253"),
        ("/ip4/1.2.3.4/tcp/1/p2p/Qmfoo", "p2p", "not a valid peer ID"),
        ("/ip4/1.2.3.4/tcp/1/p2p/", "p2p", "not a valid peer ID"),
        (f"/p2p/{PEER}/tcp/1", "tcp", "cannot come after /p2p; expected nothing"),
        (f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}/p2p/{PEER}", "p2p", "cannot come after /p2p"),
        ("/dns4/bücher.example/tcp/1", "", "printable ASCII"),
        ("/ip4/1.2.3.4/tcp/1\n", "", "printable ASCII"),
        ("/ws/" + "x" * MAX_MULTIADDR_LENGTH, "", "more than 512"),
    ],
)
def test_invalid_addresses_name_component_and_reason(text: str, component: str, reason: str) -> None:
    with pytest.raises(MultiaddrError) as info:
        Multiaddr.parse(text)
    assert info.value.component == component
    assert reason in info.value.reason
    assert reason in str(info.value)


def test_non_str_is_refused() -> None:
    bad: Any = b"/ip4/1.2.3.4/tcp/1"
    with pytest.raises(MultiaddrError, match="must be str"):
        Multiaddr.parse(bad)


# ---------------------------------------------------------------------------------------------------------------------
# Hypothesis

dns_labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
dns_names = st.lists(dns_labels, min_size=1, max_size=4).filter(lambda ls: not ls[-1].isdigit()).map(".".join)
peers = st.binary(min_size=32, max_size=32).map(lambda seed: Identity.from_seed(seed).peer_id)


@st.composite
def multiaddr_texts(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid multiaddr text, possibly in a non-canonical spelling, and what it denotes."""
    facts: dict[str, Any] = {}
    peer: PeerId | None = draw(st.none() | peers)
    if peer is not None and draw(st.booleans()):
        return f"/p2p/{draw(st.sampled_from([peer.to_base58(), peer.to_cid()]))}", {"peer": peer}
    kind = draw(st.sampled_from(["ip4", "ip6", "dns4", "dns6"]))
    if kind == "ip4":
        ip4 = ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1)))
        host_text, facts["host"] = str(ip4), str(ip4)
    elif kind == "ip6":
        ip6 = ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
        host_text = draw(st.sampled_from([ip6.exploded, ip6.compressed, ip6.exploded.upper()]))
        facts["host"] = f"::ffff:{ip6.ipv4_mapped}" if ip6.ipv4_mapped else ip6.compressed
    else:
        host_text = draw(dns_names)
        facts["host"] = host_text.lower()
    port = draw(st.integers(0, 65535))
    transport = draw(st.sampled_from(["tcp", "ws", "udp"]))
    text = f"/{kind}/{host_text}/{'udp' if transport == 'udp' else 'tcp'}/{port}" + ("/ws" if transport == "ws" else "")
    facts["transport"] = (transport, facts["host"], port)
    if peer is not None:
        text += f"/p2p/{draw(st.sampled_from([peer.to_base58(), peer.to_cid()]))}"
    facts["peer"] = peer
    return text, facts


@SETTINGS
@given(multiaddr_texts())
def test_round_trip(case: tuple[str, dict[str, Any]]) -> None:
    text, facts = case
    addr = Multiaddr.parse(text)
    assert addr.peer_id == facts["peer"]
    if "transport" in facts:
        assert addr.transport() == facts["transport"]
    canonical = str(addr)
    again = Multiaddr.parse(canonical)
    assert again == addr
    assert str(again) == canonical
    assert Multiaddr(addr.components) == addr


@SETTINGS
@given(st.text(max_size=80))
def test_garbage_text_never_crashes(text: str) -> None:
    try:
        addr = Multiaddr.parse(text)
    except MultiaddrError:
        return
    assert Multiaddr.parse(str(addr)) == addr


_pieces = st.one_of(
    st.sampled_from([*PROTOCOLS, "", "ip", "dns", "wss", "1.2.3.4", "::1", "80", "0", str(PEER), PEER.to_cid()]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=10),
)


@SETTINGS
@given(st.lists(_pieces, max_size=10), st.booleans())
def test_structured_garbage_never_crashes(pieces: list[str], leading_slash: bool) -> None:
    text = ("/" if leading_slash else "") + "/".join(pieces)
    try:
        addr = Multiaddr.parse(text)
    except MultiaddrError:
        return
    assert Multiaddr.parse(str(addr)) == addr
    if addr.components[0][0] != "p2p":
        kind, host, port = addr.transport()
        assert kind in {"tcp", "ws", "udp"} and 0 <= port <= 65535 and host

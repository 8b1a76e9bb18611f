"""Conformance of real nodes' DHT side with docs/protocol.md sections 1.3, 2.4 and 5, checked by clean-room code.

The worked examples need no node. The other tests share one bootstrap node and two chat nodes (module scope).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cleanroom.dht import (
    NS_PEER,
    RESPONSE,
    DhtPeer,
    build_auth_proof,
    build_peer_record,
    check_auth_proof,
    encode_datagram,
    mark_version,
    marked_message_id,
    record_key,
    verify_peer_record,
)
from cleanroom.encoding import CleanroomError, b58encode
from cleanroom.identity import Identity, node_id_of, pk_from_peer_id
from cleanroom.multiaddr import parse_multiaddr
from cleanroom.nodes import BootstrapNode, Node, Process, stop_all, wait_until
from cleanroom.signed_envelope import open_signed, seal_signed, signed_bytes

# ---------------------------------------------------------------- worked examples (no node)

EXAMPLE_1_1 = Identity(bytes.fromhex("7e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"))
SEED_00_1F = Identity(bytes(range(32)))  # node A of section 5
SEED_01_20 = Identity(bytes(range(1, 33)))  # node B of section 5
MID_5_3 = bytes.fromhex("70327002000102030405060708090a0b5b4fee0d")


def test_signed_envelope_worked_example_1_3() -> None:
    domain, ptype = "p2pmsg-example", b"/p2pmsg/example/1"
    assert signed_bytes(domain, ptype, b"hello").hex() == (
        "0e7032706d73672d6578616d706c65112f7032706d73672f6578616d706c652f310568656c6c6f"
    )
    env = seal_signed(EXAMPLE_1_1, domain, ptype, b"hello")
    assert len(env) == 130
    assert env.hex() == (
        "0a24080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
        "12112f7032706d73672f6578616d706c652f31"
        "1a0568656c6c6f"
        "2a409e3fe78d6a2914bcb0fdcfd17ea09c38bb846d8bbd74f8ab65aa1f6d787ff337"
        "6e1a795e800d2e6c0f612b89bfe2575011860d3f74142890f8697cdf3537690f"
    )
    assert open_signed(env, domain, ptype) == (EXAMPLE_1_1.peer_id, b"hello")
    with pytest.raises(CleanroomError, match="signature"):
        open_signed(env, "p2pmsg-other", ptype)  # the domain is not transmitted: another one fails
    with pytest.raises(CleanroomError, match="payload type"):
        open_signed(env, domain, b"/p2pmsg/other/1")


MULTIADDRS = [
    ("/ip4/1.2.3.4/tcp/4001", "/ip4/1.2.3.4/tcp/4001", ("tcp", "1.2.3.4", 4001)),
    ("/ip6/0:0:0:0:0:0:0:1/tcp/4001/ws", "/ip6/::1/tcp/4001/ws", ("ws", "::1", 4001)),
    ("/ip6/2001:DB8:0:0:1:0:0:1/udp/53", "/ip6/2001:db8::1:0:0:1/udp/53", ("udp", "2001:db8::1:0:0:1", 53)),
    (
        "/dns4/Example.ORG/tcp/443/ws/p2p/bafzaajaiaejcaa5ba677htqqxyoxbxiy45f4bglh4tldbg5fbvpr3xegmqjfkmny",
        "/dns4/example.org/tcp/443/ws/p2p/12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB",
        ("ws", "example.org", 443),
    ),
    (
        "/p2p/12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB",
        "/p2p/12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB",
        None,
    ),
]


@pytest.mark.parametrize(("text", "canonical", "transport"), MULTIADDRS)
def test_multiaddr_worked_examples_2_4(text: str, canonical: str, transport: tuple[str, str, int] | None) -> None:
    ma = parse_multiaddr(text)
    assert ma.canonical == canonical
    assert ma.transport_tuple() == transport


@pytest.mark.parametrize(
    "text",
    [
        "/ip4/1.2.3.4",
        "/ip4/1.2.3.4/tcp/080",
        "/ip4/1.2.3.4/tcp/65536",
        "/ip4/1.2.3.4/udp/1/ws",
        "/ip6/fe80::1%eth0/tcp/1",
        "/dns4/1.2.3.4/tcp/1",
        "/ip4/1.2.3.4/tcp/1/",
        "/quic/1",
    ],
)
def test_multiaddr_rejected_worked_examples_2_4(text: str) -> None:
    with pytest.raises(CleanroomError):
        parse_multiaddr(text)


def test_ids_worked_example_5_1_and_5_3() -> None:
    assert SEED_00_1F.node_id.hex() == "209e328b26b4dfcda8c9b426b152d822d3215035"
    assert SEED_01_20.node_id.hex() == "83b2c9f1d3d32ce2ee01211b872e2244f6b46b3b"
    assert hashlib.sha1(b"hello").hexdigest() == "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"
    assert marked_message_id(2, bytes(range(12))) == MID_5_3
    assert mark_version(MID_5_3) == 2
    assert mark_version(MID_5_3[:-1] + bytes([MID_5_3[-1] ^ 1])) == 0


def test_datagrams_worked_example_5_4() -> None:
    a, b = SEED_00_1F.node_id, SEED_01_20.node_id
    ping = encode_datagram(0, MID_5_3, ["ping", [a]])
    assert ping.hex() == "00" + MID_5_3.hex() + "92a470696e6791c414" + a.hex()
    assert len(ping) == 50
    assert len(encode_datagram(RESPONSE, MID_5_3, b)) == 43
    find_value = encode_datagram(0, MID_5_3, ["find_value", [a, hashlib.sha1(b"hello").digest()]])
    assert find_value.hex() == (
        "00"
        + MID_5_3.hex()
        + "92aa66696e645f76616c756592c414"
        + a.hex()
        + "c414aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"
    )
    assert len(find_value) == 78
    assert len(encode_datagram(0, MID_5_3, ["find_node", [a, hashlib.sha1(b"hello").digest()]])) == 77
    value = encode_datagram(RESPONSE, MID_5_3, {"value": "world"})
    assert value.hex() == "01" + MID_5_3.hex() + "81a576616c7565a5776f726c64"
    nodes = encode_datagram(RESPONSE, MID_5_3, [[b, "192.0.2.7", 8468]])
    assert nodes.hex() == "01" + MID_5_3.hex() + "9193c414" + b.hex() + "a93139322e302e322e37cd2114"
    stun = encode_datagram(0, MID_5_3, ["stun", []])
    assert stun.hex() == "00" + MID_5_3.hex() + "92a47374756e90" and len(stun) == 28
    answer = encode_datagram(RESPONSE, MID_5_3, ["192.0.2.9", 40000])
    assert answer.hex() == "01" + MID_5_3.hex() + "92a93139322e302e322e39cd9c40"


def test_auth_proof_worked_example_5_6() -> None:
    a, challenge = SEED_00_1F.node_id, bytes(range(32))
    request = encode_datagram(0, MID_5_3, ["p2pmsg_auth", [a, challenge]])
    assert (
        request.hex() == "00" + MID_5_3.hex() + "92ab7032706d73675f6175746892c414" + a.hex() + "c420" + challenge.hex()
    )
    assert len(request) == 91
    proof = build_auth_proof(SEED_01_20, challenge, a, ("192.0.2.9", 40000))
    assert proof.hex() == (
        "0a2408011220" + "79b5562e8fe654f94078b112e8a98ba7901f853ae695bed7e0e3910bad049664"
        "12122f7032706d73672f6468742d617574682f32"
        "1a4f" + challenge.hex() + "209e328b26b4dfcda8c9b426b152d822d321503583b2c9f1d3d32ce2ee01211b872e2244f6b46b3b"
        "04c00002099c40"
        "2a40bfa056686fc00c1658fd53d01b26e8f5d35dc8183452d6c94be101c13e85f28692102bae53a2625ff13d9829c07db0598744"
        "615eb5dadc4be8a4e1bfb964a60f"
    )
    assert len(proof) == 205
    response = encode_datagram(RESPONSE, MID_5_3, proof)
    assert response[21:23].hex() == "c4cd" and len(response) == 228
    assert check_auth_proof(proof, challenge, a, SEED_01_20.node_id) == (SEED_01_20.peer_id, ("192.0.2.9", 40000))
    with pytest.raises(CleanroomError, match="header"):
        check_auth_proof(proof, os.urandom(32), a, SEED_01_20.node_id)


def test_peer_record_worked_example_5_7() -> None:
    value = build_peer_record(SEED_00_1F, ["/ip4/192.0.2.7/tcp/4001"], 1, 1700086400)
    key = record_key(NS_PEER, SEED_00_1F.peer_id)
    assert key.hex() == "4de4e0e5181cd6625b4050a1586e25c80b8d0b9a"
    assert len(value) == 232
    assert value.hex() == (
        "50325201" + "127032706d73672d706565722d7265636f7264"
        "0a2408011220" + "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
        "12152f7032706d73672f706565722d7265636f72642f31"
        "1a50" + SEED_00_1F.peer_id.hex() + "0000000000000001" + "0000000065554280"
        "0100172f6970342f3139322e302e322e372f7463702f34303031"
        "2a4017c87e15bde0461b337e2fe6500d305c686869b0e9740b392e26af6357e8ee009d181f341e54de2c"
        "52c17c9d13754e7ee7165c728082bbf7dac2740c255ab308"
    )
    rec = verify_peer_record(value, key, now=1700000000)
    assert (rec["seq"], rec["expires_at"], rec["addrs"]) == (1, 1700086400, ["/ip4/192.0.2.7/tcp/4001"])
    with pytest.raises(CleanroomError, match="expired"):
        verify_peer_record(value, key, now=1700086400)
    with pytest.raises(CleanroomError, match="7 days"):
        verify_peer_record(value, key, now=1700086400 - 7 * 86400 - 1)
    with pytest.raises(CleanroomError, match="key"):
        verify_peer_record(value, record_key(NS_PEER, SEED_01_20.peer_id), now=1700000000)


# ---------------------------------------------------------------- real nodes


@dataclass
class Mesh:
    boot: BootstrapNode
    a: Node
    b: Node

    @property
    def dht_nodes(self) -> dict[str, tuple[str, int]]:
        return {"boot": self.boot.dht_addr, "a": self.a.dht_addr, "b": self.b.dht_addr}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("dht")
    boot, a, b = BootstrapNode(base), Node("a", base), Node("b", base)
    started: list[Process] = [boot]
    try:
        boot.start()
        for n in (a, b):
            n.init(bootstrap=boot.multiaddr)
        for n in (a, b):
            started.append(n)
            n.start()
        yield Mesh(boot, a, b)
    finally:
        stop_all(started)


@pytest.fixture
def client() -> Iterator[DhtPeer]:
    p = DhtPeer(Identity.generate())
    try:
        yield p
    finally:
        p.close()


def _expected_node_id(mesh: Mesh, name: str) -> bytes | None:
    """The node id of a chat node (5.1); None for the bootstrap node, whose peer id the test does not know."""
    node = {"a": mesh.a, "b": mesh.b}.get(name)
    return node_id_of(pk_from_peer_id(node.peer_id)) if node else None


def _node_id(node: Node) -> bytes:
    return node_id_of(pk_from_peer_id(node.peer_id))


def test_ping_answers_the_node_id(mesh: Mesh, client: DhtPeer) -> None:
    for name, addr in mesh.dht_nodes.items():
        answer = client.ping(addr)
        assert isinstance(answer, bytes) and len(answer) == 20, (name, answer)
        expected = _expected_node_id(mesh, name)
        assert expected is None or answer == expected, f"{name}: node id is sha1 of its PublicKey protobuf (5.1)"


def _prove_our_address(client: DhtPeer, addr: tuple[str, int]) -> None:
    """5.5: the node answers a find_node only once our answer to its proof ping has proven our address."""
    client.find_node(addr, client.ident.node_id)
    assert any(r[0] == addr and r[1] == "ping" for r in client.requests_in)


def test_stun_from_an_unproven_address_is_dropped(mesh: Mesh, client: DhtPeer) -> None:
    """5.5: 28 bytes received cannot pay for a 50-byte proof ping, nor for the answer: dropped before any effect."""
    before = mesh.a.call("status")["dht"]["amplification_dropped"]
    with pytest.raises(TimeoutError):
        client.stun(mesh.a.dht_addr, timeout=1.0)
    assert mesh.a.call("status")["dht"]["amplification_dropped"] == before + 1
    assert not client.requests_in, "no proof ping either"


def test_stun_answers_our_address(mesh: Mesh, client: DhtPeer) -> None:
    for addr in mesh.dht_nodes.values():
        _prove_our_address(client, addr)
        assert client.stun(addr) == [client.addr[0], client.addr[1]]


def test_find_node_lists_the_other_nodes(mesh: Mesh, client: DhtPeer) -> None:
    wanted = {_node_id(mesh.a): mesh.a.dht_port, _node_id(mesh.b): mesh.b.dht_port}

    def contacts() -> list[list[Any]] | None:
        found: list[list[Any]] = client.find_node(mesh.boot.dht_addr, client.ident.node_id)
        known = {bytes(c[0]): c[2] for c in found}
        return found if all(known.get(i) == port for i, port in wanted.items()) else None

    found = wait_until(contacts, 10, "find_node on the bootstrap lists a and b")
    assert 1 <= len(found) <= 64
    for entry in found:
        node_id, ip, port = entry
        assert isinstance(node_id, bytes) and len(node_id) == 20
        assert ip == "127.0.0.1" and isinstance(port, int) and 1 <= port <= 65535


def test_find_value_returns_a_valid_peer_record(mesh: Mesh, client: DhtPeer) -> None:
    key = record_key(NS_PEER, mesh.a.peer_id)

    def fetch() -> dict[str, Any] | None:
        for addr in mesh.dht_nodes.values():
            answer = client.find_value(addr, key)
            if isinstance(answer, dict):
                return answer
        return None

    answer = wait_until(fetch, 10, "a's peer record published")
    assert set(answer) == {"value"}
    rec = verify_peer_record(answer["value"], key)
    assert rec["peer_id"] == mesh.a.peer_id
    assert f"/ip4/127.0.0.1/tcp/{mesh.a.port}" in [a.split("/p2p/")[0] for a in rec["addrs"]]
    now = time.time()
    assert abs(rec["seq"] - now) < 120, "5.7: seq is the signer's clock in seconds"
    assert abs(rec["expires_at"] - now - 3600) < 120, "5.7: expires_at is now + 1 hour by default"


def test_p2pmsg_auth_proof_from_each_node(mesh: Mesh, client: DhtPeer) -> None:
    for name, addr in mesh.dht_nodes.items():
        node_id = client.ping(addr)
        signer, signed_addr = client.auth(addr, node_id)
        assert signed_addr == client.addr, f"{name}: 5.6: the proof signs the address the request came from"
        if name != "boot":
            assert b58encode(signer) == {"a": mesh.a, "b": mesh.b}[name].peer_id_text


def test_nodes_prove_our_address_and_challenge_us(mesh: Mesh, client: DhtPeer) -> None:
    """5.5: a request other than ping from an unproven address gets a ping first; 5.6: then a p2pmsg_auth."""
    for addr in mesh.dht_nodes.values():
        client.find_node(addr, client.ident.node_id)
    for name, addr in mesh.dht_nodes.items():
        pings = [r for r in client.requests_in if r[0] == addr and r[1] == "ping"]
        assert pings, f"{name} answered without proving our address first"
        assert all(version >= 2 for _, _, version in pings), f"{name}: requests carry the mark of version 2 (5.3)"
        wait_until(lambda: any(s[0] == addr for s in client.auth_served), 10, f"{name} challenges us")  # noqa: B023
        requester = next(s[1] for s in client.auth_served if s[0] == addr)
        assert requester == client.ping(addr)


@pytest.fixture(scope="module")
def own_record(mesh: Mesh) -> Iterator[tuple[DhtPeer, Identity, int, bytes]]:
    """Our own peer record, stored on the bootstrap node. Yields (client, identity, seq, value)."""
    ident = Identity.generate()
    p = DhtPeer(ident)
    seq = int(time.time())
    value = build_peer_record(ident, ["/ip4/127.0.0.1/tcp/9"], seq, seq + 3600)
    try:
        assert p.store(mesh.boot.dht_addr, record_key(NS_PEER, ident.peer_id), value) is True
        yield p, ident, seq, value
    finally:
        p.close()


def test_store_own_record_and_read_it_back(mesh: Mesh, client: DhtPeer) -> None:
    ident = Identity.generate()
    key = record_key(NS_PEER, ident.peer_id)
    now = int(time.time())
    value = build_peer_record(ident, ["/ip4/127.0.0.1/tcp/9"], now, now + 3600)
    writer = DhtPeer(ident)
    try:
        for name, addr in mesh.dht_nodes.items():
            assert writer.store(addr, key, value) is True, name
    finally:
        writer.close()
    for name, addr in mesh.dht_nodes.items():
        answer = client.find_value(addr, key)
        assert answer == {"value": value}, name
        assert verify_peer_record(answer["value"], key)["seq"] == now


def _flip_last(value: bytes) -> bytes:
    return value[:-1] + bytes([value[-1] ^ 1])


# name -> builder(identity, seq of the stored record, stored value) -> value the node must refuse
REFUSED_STORES: dict[str, Callable[[Identity, int, bytes], bytes]] = {
    "bad_signature": lambda ident, seq, value: _flip_last(value),
    "lower_seq": lambda ident, seq, value: build_peer_record(ident, ["/ip4/127.0.0.1/tcp/9"], seq - 1, seq + 3600),
    "same_seq_other_record": lambda ident, seq, value: build_peer_record(
        ident, ["/ip4/127.0.0.1/tcp/8"], seq, seq + 3600
    ),
    "lifetime_beyond_7_days": lambda ident, seq, value: build_peer_record(ident, [], seq + 5, seq + 8 * 86400),
    "expired": lambda ident, seq, value: build_peer_record(ident, [], seq + 6, seq - 10),
    "signed_by_another_key": lambda ident, seq, value: build_peer_record(Identity.generate(), [], seq + 7, seq + 3600),
    "plain_value_over_signed": lambda ident, seq, value: b"plain",
}


@pytest.mark.parametrize("case", list(REFUSED_STORES))
def test_store_refused(mesh: Mesh, own_record: tuple[DhtPeer, Identity, int, bytes], case: str) -> None:
    p, ident, seq, value = own_record
    key = record_key(NS_PEER, ident.peer_id)
    assert p.store(mesh.boot.dht_addr, key, REFUSED_STORES[case](ident, seq, value)) is False
    assert p.find_value(mesh.boot.dht_addr, key) == {"value": value}, "the stored record must be unchanged"


def test_store_same_record_again_is_a_refresh(mesh: Mesh, own_record: tuple[DhtPeer, Identity, int, bytes]) -> None:
    p, ident, _seq, value = own_record
    assert p.store(mesh.boot.dht_addr, record_key(NS_PEER, ident.peer_id), value) is True


def test_store_higher_seq_replaces(mesh: Mesh, client: DhtPeer) -> None:
    ident = Identity.generate()
    key = record_key(NS_PEER, ident.peer_id)
    now = int(time.time())
    writer = DhtPeer(ident)
    try:
        first = build_peer_record(ident, ["/ip4/127.0.0.1/tcp/9"], now, now + 3600)
        second = build_peer_record(ident, ["/ip4/127.0.0.1/tcp/10"], now + 1, now + 3600)
        assert writer.store(mesh.a.dht_addr, key, first) is True
        assert writer.store(mesh.a.dht_addr, key, second) is True
    finally:
        writer.close()
    assert client.find_value(mesh.a.dht_addr, key) == {"value": second}

"""DHT datagrams: byte-compatible with rpcudp/umsgpack, strict and bounded on input."""

from __future__ import annotations

import contextlib
import os

import msgpack
import pytest
import umsgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmsg.dht.core.contact import Contact
from p2pmsg.dht.core.errors import MalformedMessageError
from p2pmsg.dht.core.messages import (
    MAX_DATAGRAM_SIZE,
    AuthRequest,
    FindNodeRequest,
    FindValueRequest,
    FoundValue,
    IncomingRequest,
    IncomingResponse,
    PingRequest,
    StoreRequest,
    StunRequest,
    UnknownRequest,
    decode_datagram,
    encode_request,
    encode_response,
    fit_contacts,
    message_id_mark,
    new_message_id,
    nodes_body,
    parse_auth_response,
    parse_find_value_response,
    parse_nodes,
    parse_ping_response,
    parse_store_response,
    parse_stun_response,
    request_size,
    value_body,
)
from p2pmsg.errors import RemoteProtocolError

NID = bytes(range(20))
KEY = bytes(range(100, 120))
MID = bytes(range(200, 220))

plain_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(max_size=300),
    st.binary(max_size=300),
)


def stock_request(msg_id: bytes, name: str, args: tuple[object, ...]) -> bytes:
    """What rpcudp 5.0.1 sends: ``b"\\x00" + msg_id + umsgpack.packb([name, args])``."""
    return b"\x00" + msg_id + umsgpack.packb([name, args])


def stock_response(msg_id: bytes, response: object) -> bytes:
    return b"\x01" + msg_id + umsgpack.packb(response)


@given(value=plain_values)
def test_store_request_is_byte_identical_to_rpcudp(value: object) -> None:
    ours = encode_request(MID, StoreRequest(node_id=NID, key=KEY, value=value))
    assert ours == stock_request(MID, "store", (NID, KEY, value))
    decoded = decode_datagram(ours)
    assert isinstance(decoded, IncomingRequest)
    assert decoded.request == StoreRequest(node_id=NID, key=KEY, value=value)


@pytest.mark.parametrize(
    ("request_", "name", "args"),
    [
        (PingRequest(node_id=NID), "ping", (NID,)),
        (FindNodeRequest(node_id=NID, key=KEY), "find_node", (NID, KEY)),
        (FindValueRequest(node_id=NID, key=KEY), "find_value", (NID, KEY)),
        (StunRequest(), "stun", ()),
    ],
)
def test_requests_are_byte_identical_to_rpcudp(request_: object, name: str, args: tuple[object, ...]) -> None:
    ours = encode_request(MID, request_)  # type: ignore[arg-type]
    assert ours == stock_request(MID, name, args)
    assert request_size(request_) == len(ours)  # type: ignore[arg-type]
    decoded = decode_datagram(stock_request(MID, name, args))
    assert isinstance(decoded, IncomingRequest)
    assert decoded.request == request_
    assert decoded.msg_id == MID


def test_known_sizes_of_the_small_datagrams() -> None:
    # The figures the anti-amplification rules are built on (see docs/protocol.md (section 5)).
    assert len(encode_request(MID, PingRequest(node_id=NID))) == 50
    assert len(encode_response(MID, NID)) == 43
    assert len(encode_request(MID, FindNodeRequest(node_id=NID, key=KEY))) == 77
    assert len(encode_request(MID, StunRequest())) == 28


def test_responses_are_byte_identical_to_rpcudp() -> None:
    contacts = [Contact(node_id=bytes([i]) * 20, host="127.0.0.1", port=4000 + i) for i in range(3)]
    stock_nodes = [(c.node_id, c.host, c.port) for c in contacts]
    assert encode_response(MID, nodes_body(contacts)) == stock_response(MID, stock_nodes)
    assert encode_response(MID, value_body("v")) == stock_response(MID, {"value": "v"})
    assert encode_response(MID, NID) == stock_response(MID, NID)
    assert encode_response(MID, True) == stock_response(MID, True)
    assert encode_response(MID, ["127.0.0.1", 5]) == stock_response(MID, ("127.0.0.1", 5))


def test_stock_responses_parse() -> None:
    stock_nodes = [(bytes([i]) * 20, "10.1.2.3", 4000 + i) for i in range(20)]
    decoded = decode_datagram(stock_response(MID, stock_nodes))
    assert isinstance(decoded, IncomingResponse)
    contacts, skipped = parse_nodes(decoded.body)
    assert skipped == 0
    assert [(c.node_id, c.host, c.port) for c in contacts] == stock_nodes
    found = parse_find_value_response(decode_datagram(stock_response(MID, {"value": 1.5})).body)  # type: ignore[union-attr]
    assert found == FoundValue(value=1.5)
    assert parse_ping_response(decode_datagram(stock_response(MID, NID)).body) == NID  # type: ignore[union-attr]
    assert parse_store_response(decode_datagram(stock_response(MID, True)).body) is True  # type: ignore[union-attr]
    assert parse_stun_response(decode_datagram(stock_response(MID, ("127.0.0.1", 9))).body) == ("127.0.0.1", 9)  # type: ignore[union-attr]


def test_unknown_rpc_decodes_to_unknown_request() -> None:
    decoded = decode_datagram(stock_request(MID, "frobnicate", (1, 2)))
    assert isinstance(decoded, IncomingRequest)
    assert decoded.request == UnknownRequest(name="frobnicate")


def test_auth_request_round_trip() -> None:
    request = AuthRequest(node_id=NID, challenge=bytes(32))
    decoded = decode_datagram(encode_request(MID, request))
    assert isinstance(decoded, IncomingRequest) and decoded.request == request
    assert parse_auth_response(b"x" * 10, max_size=10) == b"x" * 10
    with pytest.raises(MalformedMessageError, match=r"p2pmsg_auth\.response"):
        parse_auth_response(b"x" * 11, max_size=10)
    with pytest.raises(MalformedMessageError, match=r"p2pmsg_auth\.challenge"):
        decode_datagram(stock_request(MID, "p2pmsg_auth", (NID, bytes(31))))


@pytest.mark.parametrize(
    ("datagram", "field"),
    [
        (b"\x00" + MID, "datagram"),
        (b"\x02" + MID + umsgpack.packb(["ping", [NID]]), "datagram.kind"),
        (b"\x00" + MID + b"\xc1", "datagram.body"),
        (b"\x00" + MID + umsgpack.packb(["ping", [NID]]) + b"\x00", "datagram.body"),
        (b"\x00" + MID + umsgpack.packb("ping"), "request"),
        (b"\x00" + MID + umsgpack.packb([1, [NID]]), "request.name"),
        (b"\x00" + MID + umsgpack.packb(["ping", NID]), "ping.args"),
        (b"\x00" + MID + umsgpack.packb(["ping", [NID, NID]]), "ping.args"),
        (b"\x00" + MID + umsgpack.packb(["ping", [NID[:19]]]), "ping.node_id"),
        (b"\x00" + MID + umsgpack.packb(["ping", ["x" * 20]]), "ping.node_id"),
        (b"\x00" + MID + umsgpack.packb(["store", [NID, KEY[:5], 1]]), "store.key"),
        (b"\x00" + MID + umsgpack.packb(["find_node", [NID]]), "find_node.args"),
        (b"\x00" + MID + umsgpack.packb(["stun", [1]]), "stun.args"),
        (b"\x00" + MID + b"\xd4\x01\x01", "datagram.body"),
        (b"\x00" + MID + b"\x91" * 40 + b"\x01", "datagram.body"),
        (b"\x01" + MID + b"\x81\x01\x02", "datagram.body"),
        (b"\x00" + MID + b"\xa2\xff\xfe", "datagram.body"),
        (b"\x00" + MID + b"\xc4" + b"\x05" + b"ab", "datagram.body"),
        (b"\x00" + MID + b"\xda\xff\xff" + b"a", "datagram.body"),
        (b"\x00" + MID + b"\xc4\x01" + b"a" * MAX_DATAGRAM_SIZE, "datagram"),
    ],
)
def test_malformed_datagrams_name_the_field(datagram: bytes, field: str) -> None:
    with pytest.raises(MalformedMessageError) as info:
        decode_datagram(datagram)
    assert info.value.field == field
    assert info.value.reason


@settings(max_examples=300)
@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedMessageError):
        decode_datagram(data)


@settings(max_examples=200)
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers(-10, 10) | st.binary(max_size=24) | st.text(max_size=12),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
        max_leaves=12,
    )
)
def test_any_response_body_parses_or_raises_remote_error(body: object) -> None:
    """Whatever a peer puts in an answer, the parsers either accept it or raise a RemoteProtocolError."""
    for parser in (
        parse_ping_response,
        parse_store_response,
        parse_nodes,
        parse_find_value_response,
        parse_stun_response,
    ):
        with contextlib.suppress(RemoteProtocolError):
            parser(body)  # type: ignore[operator]


def test_message_id_mark() -> None:
    for _ in range(50):
        marked = new_message_id(os.urandom(12))
        assert len(marked) == 20
        assert message_id_mark(marked) == 2
        assert message_id_mark(os.urandom(20)) is None
    tampered = bytearray(new_message_id(bytes(12)))
    tampered[10] ^= 1
    assert message_id_mark(bytes(tampered)) is None
    assert message_id_mark(b"p2p\x01" + bytes(16)) is None
    assert message_id_mark(new_message_id(bytes(12), version=7)) == 7


def test_parse_nodes_skips_bad_entries_and_bounds_the_list() -> None:
    good = [NID, "127.0.0.1", 4000]
    body = [
        good,
        [NID[:19], "127.0.0.1", 1],
        [KEY, "localhost", 1],
        [KEY, "0.0.0.0", 1],
        [KEY, "224.0.0.1", 1],
        [KEY, "127.0.0.1", 0],
        [KEY, "127.0.0.1", True],
        [KEY, "127.0.0.1"],
        "junk",
        good,
        [KEY, "::1", 65535],
    ]
    contacts, skipped = parse_nodes(body)
    assert [(c.node_id, c.host, c.port) for c in contacts] == [(NID, "127.0.0.1", 4000), (KEY, "::1", 65535)]
    assert skipped == 8
    with pytest.raises(MalformedMessageError, match="more than 64"):
        parse_nodes([good] * 65)
    with pytest.raises(MalformedMessageError, match="must be an array"):
        parse_nodes({"value": 1})


def test_find_value_map_must_have_only_value() -> None:
    with pytest.raises(MalformedMessageError, match="exactly the key 'value'"):
        parse_find_value_response({"value": 1, "x": 2})
    assert parse_find_value_response({"value": [1, 2]}) == FoundValue(value=[1, 2])


def test_store_response_must_be_boolean() -> None:
    assert parse_store_response(False) is False
    with pytest.raises(MalformedMessageError):
        parse_store_response(1)


def test_fit_contacts_is_the_longest_prefix_that_fits() -> None:
    contacts = [Contact(node_id=bytes([i]) * 20, host="127.0.0.1", port=40000 + i) for i in range(20)]
    for budget in (0, 1, 22, 57, 58, 100, 400, 5000):
        fitted = fit_contacts(contacts, budget)
        assert fitted == contacts[: len(fitted)]
        if fitted:
            assert len(msgpack.packb(nodes_body(fitted))) <= budget
        if len(fitted) < len(contacts):
            assert len(msgpack.packb(nodes_body(contacts[: len(fitted) + 1]))) > budget
    assert fit_contacts(contacts, 5000) == contacts


def test_documented_examples() -> None:
    """The byte strings of docs/protocol.md, section 5.4."""
    node_a = bytes.fromhex("209e328b26b4dfcda8c9b426b152d822d3215035")
    node_b = bytes.fromhex("83b2c9f1d3d32ce2ee01211b872e2244f6b46b3b")
    msg_id = new_message_id(bytes(range(12)))
    assert msg_id.hex() == "70327002000102030405060708090a0b5b4fee0d"
    head = "0070327002000102030405060708090a0b5b4fee0d"
    assert encode_request(msg_id, PingRequest(node_id=node_a)).hex() == head + "92a470696e6791c414" + node_a.hex()
    assert encode_response(msg_id, node_b).hex() == "01" + head[2:] + "c414" + node_b.hex()
    key = bytes.fromhex("aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d")
    assert encode_request(msg_id, FindValueRequest(node_id=node_a, key=key)).hex() == (
        head + "92aa66696e645f76616c756592c414" + node_a.hex() + "c414" + key.hex()
    )
    assert encode_response(msg_id, value_body("world")).hex().endswith("81a576616c7565a5776f726c64")
    contact = Contact(node_id=node_b, host="192.0.2.7", port=8468)
    assert (
        encode_response(msg_id, nodes_body([contact]))
        .hex()
        .endswith("9193c414" + node_b.hex() + "a93139322e302e322e37cd2114")
    )
    assert encode_request(msg_id, StunRequest()).hex() == head + "92a47374756e90"
    assert encode_response(msg_id, ["192.0.2.9", 40000]).hex().endswith("92a93139322e302e322e39cd9c40")

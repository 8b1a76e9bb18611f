"""Signed peer records: the documented worked example, and every check of verify_record_value."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmsg.crypto.envelope import seal_envelope
from p2pmsg.dht.core.contact import node_id_from_public_key
from p2pmsg.dht.core.errors import DhtUsageError, RecordError, RecordTimeError
from p2pmsg.dht.core.records import (
    PEER_RECORD_NAMESPACE,
    PEER_RECORD_PAYLOAD_TYPE,
    RECORD_MAGIC,
    PeerRecord,
    is_signed_value,
    peer_record_key,
    seal_peer_record,
    verify_record_value,
)
from p2pmsg.identity import Identity

ALICE = Identity.from_seed(bytes(range(32)))
MALLORY = Identity.from_seed(bytes(range(1, 33)))
NOW = 1_700_000_000
EXPIRES = 1_700_086_400

# The worked example of docs/protocol.md (section 5).
EXAMPLE_VALUE = bytes.fromhex(
    "50325201127032706d73672d706565722d7265636f72640a240801122003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d"
    "5f1ddc8664125531b812152f7032706d73672f706565722d7265636f72642f311a5000240801122003a107bff3ce10be1d70dd18"
    "e74bc09967e4d6309ba50d5f1ddc8664125531b8000000000000000100000000655542800100172f6970342f3139322e302e322e"
    "372f7463702f343030312a4017c87e15bde0461b337e2fe6500d305c686869b0e9740b392e26af6357e8ee009d181f341e54de2c"
    "52c17c9d13754e7ee7165c728082bbf7dac2740c255ab308"
)
EXAMPLE_KEY = bytes.fromhex("4de4e0e5181cd6625b4050a1586e25c80b8d0b9a")
EXAMPLE_NODE_ID = bytes.fromhex("209e328b26b4dfcda8c9b426b152d822d3215035")


def record(identity: Identity = ALICE, **changes: object) -> PeerRecord:
    fields: dict[str, object] = {
        "peer_id": identity.peer_id,
        "addrs": ("/ip4/192.0.2.7/tcp/4001",),
        "seq": 1,
        "expires_at": EXPIRES,
    }
    fields.update(changes)
    return PeerRecord(**fields)  # type: ignore[arg-type]


def raw_value(identity: Identity, payload: bytes, namespace: str = PEER_RECORD_NAMESPACE) -> bytes:
    """A signed-record value around an arbitrary payload (to build records the sealer refuses to build)."""
    envelope = seal_envelope(identity, domain=namespace, payload_type=PEER_RECORD_PAYLOAD_TYPE, payload=payload)
    name = namespace.encode()
    return RECORD_MAGIC + bytes([len(name)]) + name + envelope


def payload(identity: Identity, *, seq: int = 1, expires: int = EXPIRES, body: bytes = b"\x00") -> bytes:
    return identity.peer_id.to_bytes() + struct.pack(">QQ", seq, expires) + body


def test_worked_example_is_exact() -> None:
    assert ALICE.peer_id.to_base58() == "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"
    assert seal_peer_record(ALICE, record()) == EXAMPLE_VALUE
    assert peer_record_key(ALICE.peer_id) == EXAMPLE_KEY
    assert node_id_from_public_key(ALICE.public_key) == EXAMPLE_NODE_ID
    verified = verify_record_value(EXAMPLE_KEY, EXAMPLE_VALUE, now=NOW)
    assert verified.signer == ALICE.peer_id
    assert verified.seq == 1 and verified.expires_at == EXPIRES
    assert verified.content == record()
    assert is_signed_value(EXAMPLE_VALUE)
    assert not is_signed_value("P2R\x01")
    assert not is_signed_value(b"P2R\x02")


def test_round_trip_with_several_addresses() -> None:
    addrs = (
        "/ip4/192.0.2.7/tcp/4001",
        "/ip6/2001:db8::1/tcp/4002/ws",
        f"/dns4/example.org/tcp/443/ws/p2p/{ALICE.peer_id}",
    )
    value = seal_peer_record(ALICE, record(addrs=addrs, seq=7))
    verified = verify_record_value(peer_record_key(ALICE.peer_id), value, now=NOW)
    assert isinstance(verified.content, PeerRecord)
    assert verified.content.addrs == addrs and verified.seq == 7
    assert [str(a) for a in verified.content.multiaddrs()] == list(addrs)


def test_record_bound_to_another_key_is_refused() -> None:
    with pytest.raises(RecordError, match="not bound to this key"):
        verify_record_value(peer_record_key(MALLORY.peer_id), EXAMPLE_VALUE, now=NOW)


def test_signer_must_be_the_peer_named_inside() -> None:
    forged = raw_value(MALLORY, payload(ALICE))
    with pytest.raises(RecordError, match="another peer than its signer"):
        verify_record_value(EXAMPLE_KEY, forged, now=NOW)


def test_expiry_checks() -> None:
    with pytest.raises(RecordTimeError, match="expired"):  # (a RecordError; by its type a clock problem)
        verify_record_value(EXAMPLE_KEY, EXAMPLE_VALUE, now=EXPIRES)
    far_future = seal_peer_record(ALICE, record(expires_at=NOW + 8 * 24 * 3600))
    with pytest.raises(RecordTimeError, match="more than"):
        verify_record_value(EXAMPLE_KEY, far_future, now=NOW)


def test_size_cap() -> None:
    with pytest.raises(RecordError, match="over the 100-byte limit"):
        verify_record_value(EXAMPLE_KEY, EXAMPLE_VALUE, now=NOW, max_size=100)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("text", "must be bytes"),
        (b"P2R\x02" + EXAMPLE_VALUE[4:], "magic"),
        (RECORD_MAGIC, "truncated"),
        (RECORD_MAGIC + b"\x00", "namespace length"),
        (RECORD_MAGIC + b"\x40abc", "namespace length"),
        (RECORD_MAGIC + b"\x02\xff\xfe", "not UTF-8"),
        (raw_value(ALICE, payload(ALICE), namespace="p2pmsg-other"), "unknown"),
        (EXAMPLE_VALUE[:-1], "envelope"),
        (raw_value(ALICE, b"short"), "shorter than"),
        (raw_value(ALICE, b"\x01" * 38 + bytes(16)), "peer id"),
        (raw_value(ALICE, payload(ALICE, body=b"")), "empty"),
        (raw_value(ALICE, payload(ALICE, body=b"\x09")), "more than 8"),
        (raw_value(ALICE, payload(ALICE, body=b"\x01\x00")), "truncated"),
        (raw_value(ALICE, payload(ALICE, body=b"\x01\x00\x00")), "outside"),
        (raw_value(ALICE, payload(ALICE, body=b"\x01\x00\x05/ip4")), "declared"),
        (raw_value(ALICE, payload(ALICE, body=b"\x01\x00\x02\xff\xfe")), "not UTF-8"),
        (raw_value(ALICE, payload(ALICE, body=b"\x01\x00\x04/foo")), "address 0"),
        (raw_value(ALICE, payload(ALICE, body=b"\x00\x00")), "trailing"),
        (raw_value(ALICE, payload(ALICE, body=b"\x01\x00\x18/ip4/192.0.2.07/tcp/4001")), "address 0"),
    ],
)
def test_malformed_records_say_why(value: object, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        verify_record_value(EXAMPLE_KEY, value, now=NOW)


def test_non_canonical_and_foreign_p2p_addresses() -> None:
    text = b"/ip6/2001:DB8::1/tcp/1"
    value = raw_value(ALICE, payload(ALICE, body=b"\x01" + struct.pack(">H", len(text)) + text))
    with pytest.raises(RecordError, match="canonical"):
        verify_record_value(EXAMPLE_KEY, value, now=NOW)
    foreign = f"/ip4/192.0.2.1/tcp/1/p2p/{MALLORY.peer_id}".encode()
    value = raw_value(ALICE, payload(ALICE, body=b"\x01" + struct.pack(">H", len(foreign)) + foreign))
    with pytest.raises(RecordError, match="names another peer"):
        verify_record_value(EXAMPLE_KEY, value, now=NOW)


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, len(EXAMPLE_VALUE) - 1), flip=st.integers(1, 255))
def test_any_altered_byte_is_refused(position: int, flip: int) -> None:
    altered = bytearray(EXAMPLE_VALUE)
    altered[position] ^= flip
    with pytest.raises(RecordError):
        verify_record_value(EXAMPLE_KEY, bytes(altered), now=NOW)


def test_sealing_refuses_bad_input() -> None:
    with pytest.raises(DhtUsageError, match="own peer"):
        seal_peer_record(MALLORY, record())
    with pytest.raises(DhtUsageError, match="at most 8"):
        seal_peer_record(ALICE, record(addrs=("/ip4/192.0.2.7/tcp/4001",) * 9))
    with pytest.raises(DhtUsageError, match="unsigned 64-bit"):
        record(seq=-1)

"""Signed envelopes: round trips, the exact signed bytes, tampering, domain/type separation and strict decoding."""

from __future__ import annotations

import nacl.signing
import pytest
from conftest import load_vectors
from hypothesis import given
from hypothesis import strategies as st

from p2pmsg.crypto.envelope import (
    DEFAULT_MAX_ENVELOPE_SIZE,
    EnvelopeError,
    envelope_signing_bytes,
    open_envelope,
    seal_envelope,
)
from p2pmsg.errors import LocalProtocolError, RemoteProtocolError
from p2pmsg.identity import Identity, public_key_protobuf

ALICE = Identity.from_seed(b"\xa1" * 32)
MALLORY = Identity.from_seed(b"\x66" * 32)
DOMAIN = "p2pmsg-test-record"
TYPE = b"/p2pmsg/test/1"


def _seal(payload: bytes = b"hello", identity: Identity = ALICE) -> bytes:
    return seal_envelope(identity, domain=DOMAIN, payload_type=TYPE, payload=payload)


def _open(data: bytes, **kwargs: object) -> tuple[object, bytes]:
    options: dict[str, object] = {"domain": DOMAIN, "payload_type": TYPE, **kwargs}
    return open_envelope(data, **options)  # type: ignore[arg-type]


def _ld(number: int, value: bytes) -> bytes:
    """An independent encoding of one length-delimited protobuf field (short values only)."""
    assert len(value) < 128
    return bytes([number << 3 | 2, len(value)]) + value


def test_round_trip() -> None:
    signer, payload = open_envelope(_seal(), domain=DOMAIN, payload_type=TYPE)
    assert signer == ALICE.peer_id
    assert payload == b"hello"


def test_encoding_is_the_libp2p_envelope_protobuf() -> None:
    data = _seal()
    pk = public_key_protobuf(ALICE.public_key)
    prefix = _ld(1, pk) + _ld(2, TYPE) + _ld(3, b"hello")
    assert data.startswith(prefix)
    assert data[len(prefix) : len(prefix) + 2] == b"\x2a\x40"
    assert len(data) == len(prefix) + 2 + 64


def test_signature_covers_the_length_prefixed_concatenation() -> None:
    data = _seal()
    signature = data[-64:]
    signed = bytes([len(DOMAIN)]) + DOMAIN.encode() + bytes([len(TYPE)]) + TYPE + bytes([5]) + b"hello"
    assert envelope_signing_bytes(DOMAIN, TYPE, b"hello") == signed
    nacl.signing.VerifyKey(ALICE.public_key).verify(signed, signature)  # raises if not


def test_signing_bytes_long_fields_use_multibyte_uvarints() -> None:
    payload = b"x" * 300
    assert envelope_signing_bytes("d", b"t", payload) == b"\x01d\x01t\xac\x02" + payload


def test_length_prefixes_separate_domain_and_type() -> None:
    assert envelope_signing_bytes("ab", b"c", b"") != envelope_signing_bytes("a", b"bc", b"")
    assert envelope_signing_bytes("a", b"b", b"c") != envelope_signing_bytes("a", b"bc", b"")


def test_known_answer_with_the_libp2p_vector_key() -> None:
    v = load_vectors("libp2p-peer-id.json")["ed25519"]
    identity = Identity.from_seed(bytes.fromhex(v["private_key_protobuf_hex"])[4:36])
    data = seal_envelope(identity, domain="p2pmsg-example", payload_type=b"/p2pmsg/example/1", payload=b"hello")
    assert data.hex() == (
        "0a24080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
        "12112f7032706d73672f6578616d706c652f31"
        "1a0568656c6c6f"
        "2a409e3fe78d6a2914bcb0fdcfd17ea09c38bb846d8bbd74f8ab65aa1f6d787ff3376e1a795e800d2e6c0f612b89bfe2575011860d3f74"
        "142890f8697cdf3537690f"
    )
    signer, payload = open_envelope(data, domain="p2pmsg-example", payload_type=b"/p2pmsg/example/1")
    assert str(signer) == v["peer_id_base58btc"]
    assert payload == b"hello"


def test_empty_payload_omits_field_3() -> None:
    data = _seal(b"")
    assert data[: -2 - 64] == _ld(1, public_key_protobuf(ALICE.public_key)) + _ld(2, TYPE)
    assert _open(data) == (ALICE.peer_id, b"")


def test_large_payload_with_multibyte_lengths() -> None:
    payload = bytes(range(256)) * 20
    assert _open(_seal(payload))[1] == payload


# --- rejection ------------------------------------------------------------------------------------------------------


def test_tampered_payload() -> None:
    data = bytearray(_seal(b"pay 10 coins"))
    index = data.index(b"10")
    data[index : index + 2] = b"99"
    with pytest.raises(EnvelopeError, match="signature does not verify"):
        _open(bytes(data))


def test_wrong_domain() -> None:
    with pytest.raises(EnvelopeError, match="signature does not verify for domain 'other-domain'"):
        open_envelope(_seal(), domain="other-domain", payload_type=TYPE)


def test_wrong_type() -> None:
    with pytest.raises(EnvelopeError, match=r"payload type .* does not match"):
        open_envelope(_seal(), domain=DOMAIN, payload_type=b"/p2pmsg/other/1")


def test_substituted_key_is_detected() -> None:
    data = _seal()
    forged = data.replace(public_key_protobuf(ALICE.public_key), public_key_protobuf(MALLORY.public_key))
    assert forged != data
    with pytest.raises(EnvelopeError, match="signature does not verify"):
        _open(forged)


def test_every_single_bit_flip_is_rejected() -> None:
    data = _seal()
    for index in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[index] ^= 1 << bit
            with pytest.raises(EnvelopeError):
                _open(bytes(flipped))


def test_every_truncation_is_rejected() -> None:
    data = _seal()
    for size in range(len(data)):
        with pytest.raises(EnvelopeError):
            _open(data[:size])


def test_trailing_garbage_is_rejected() -> None:
    with pytest.raises(EnvelopeError):
        _open(_seal() + b"\x00")


def test_oversize() -> None:
    data = _seal(b"x" * 100)
    with pytest.raises(EnvelopeError, match=f"{len(data)} bytes, over the 100-byte limit"):
        _open(data, max_size=100)
    assert _open(data, max_size=len(data))[1] == b"x" * 100
    big = _seal(b"x" * DEFAULT_MAX_ENVELOPE_SIZE)
    with pytest.raises(EnvelopeError, match="over the 8192-byte limit"):
        _open(big)


PK_FIELD = _ld(1, public_key_protobuf(ALICE.public_key))
SIG_FIELD = b"\x2a\x40" + b"\x00" * 64


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", r"missing field 1 \(public_key\)"),
        (_ld(2, TYPE) + SIG_FIELD, r"missing field 1 \(public_key\)"),
        (PK_FIELD + _ld(2, TYPE), r"missing field 5 \(signature\)"),
        (PK_FIELD + PK_FIELD + SIG_FIELD, r"duplicate field 1 \(public_key\)"),
        (PK_FIELD + _ld(3, b"x") + _ld(2, TYPE) + SIG_FIELD, r"field 2 \(payload_type\) is out of order"),
        (PK_FIELD + _ld(4, b"x") + SIG_FIELD, "unknown field 4"),
        (PK_FIELD + _ld(15, b"x") + SIG_FIELD, "unknown field 15"),
        (PK_FIELD + b"\x10\x01" + SIG_FIELD, "field 2 has wire type 0"),
        (PK_FIELD + b"\x1d\x00\x00\x00\x00" + SIG_FIELD, "field 3 has wire type 5"),
        (PK_FIELD + b"\x1b" + SIG_FIELD, "field 3 has wire type 3"),
        (b"\x8a\x00" + PK_FIELD[1:] + SIG_FIELD, "not minimally encoded"),
        (PK_FIELD + b"\x1a\x80\x00" + SIG_FIELD, "not minimally encoded"),
        (PK_FIELD + b"\x1a" + b"\xff" * 9 + b"\x01", "longer than 9 bytes"),
        (PK_FIELD + b"\x1a", "varint is truncated"),
        (PK_FIELD + b"\x1a\x05abc", r"truncated: field 3 \(payload\) declares 5 bytes but 3 remain"),
        (PK_FIELD + _ld(2, TYPE) + b"\x1a\x00" + SIG_FIELD, r"field 3 \(payload\) is present but empty"),
        (PK_FIELD + _ld(2, TYPE) + _ld(5, b"\x00" * 63), r"signature\) is 63 bytes"),
        (
            _ld(1, b"\x08\x00\x12\x20" + bytes(32)) + _ld(2, TYPE) + SIG_FIELD,
            r"public_key\): public key type 0 \(RSA\)",
        ),
        (_ld(1, b"\x08\x01\x12\x1f" + bytes(31)) + _ld(2, TYPE) + SIG_FIELD, r"public_key\): Ed25519 public key must"),
        (PK_FIELD + SIG_FIELD, r"payload type b'' does not match"),
        (PK_FIELD + _ld(2, TYPE) + SIG_FIELD, "signature does not verify"),
    ],
)
def test_malformed_envelopes_are_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        _open(data)


def test_envelope_error_is_remote() -> None:
    assert issubclass(EnvelopeError, RemoteProtocolError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"domain": "", "payload_type": TYPE},
        {"domain": "x" * 257, "payload_type": TYPE},
        {"domain": DOMAIN, "payload_type": b""},
        {"domain": DOMAIN, "payload_type": b"t" * 257},
    ],
)
def test_local_misuse_is_a_local_protocol_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        seal_envelope(ALICE, payload=b"x", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        open_envelope(_seal(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("domain", ["lone \ud800 surrogate", "\udfff", "p2pmsg-\udcff-record"])
def test_domain_that_is_not_utf8_encodable_is_a_local_protocol_error(domain: str) -> None:
    with pytest.raises(LocalProtocolError, match=r"envelope domain .* UTF-8"):
        seal_envelope(ALICE, domain=domain, payload_type=TYPE, payload=b"x")
    with pytest.raises(LocalProtocolError, match=r"envelope domain .* UTF-8"):
        open_envelope(_seal(), domain=domain, payload_type=TYPE)
    with pytest.raises(LocalProtocolError, match=r"envelope domain .* UTF-8"):
        envelope_signing_bytes(domain, TYPE, b"x")


def test_accepts_bytearray_and_memoryview() -> None:
    data = _seal()
    assert _open(bytearray(data))[1] == b"hello"
    assert _open(memoryview(data))[1] == b"hello"  # type: ignore[arg-type]


# --- properties -----------------------------------------------------------------------------------------------------


@given(st.binary(max_size=2000), st.text(min_size=1, max_size=40), st.binary(min_size=1, max_size=40))
def test_round_trip_property(payload: bytes, domain: str, payload_type: bytes) -> None:
    data = seal_envelope(ALICE, domain=domain, payload_type=payload_type, payload=payload)
    assert open_envelope(data, domain=domain, payload_type=payload_type) == (ALICE.peer_id, payload)


@given(st.binary(max_size=300))
def test_garbage_only_raises_envelope_error(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        _open(data)


@given(
    st.lists(st.tuples(st.integers(min_value=0, max_value=1000), st.integers(min_value=0, max_value=255)), max_size=4)
)
def test_mutations_only_raise_envelope_error(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_seal())
    for index, value in edits:
        if index < len(data):
            data[index] = value
        else:
            data.append(value)
    try:
        signer, payload = _open(bytes(data))
    except EnvelopeError:
        return
    assert bytes(data) == _seal()
    assert (signer, payload) == (ALICE.peer_id, b"hello")

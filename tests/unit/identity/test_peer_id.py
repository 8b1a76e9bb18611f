"""PeerId and Identity: the libp2p vector, strict parsing with named reasons, and property-based round trips."""

from __future__ import annotations

import base64
import pickle

import nacl.signing
import pytest
from conftest import load_vectors
from hypothesis import given
from hypothesis import strategies as st

from p2pmsg.errors import LocalProtocolError, RemoteProtocolError
from p2pmsg.identity import (
    Identity,
    InvalidPeerIdError,
    PeerId,
    VarintError,
    base32_decode,
    base32_encode,
    base58btc_decode,
    base58btc_encode,
    encode_uvarint,
    parse_public_key_protobuf,
    public_key_protobuf,
    read_uvarint,
)

# A fixed, valid Ed25519 public key (from seed 0x01 * 32) for the malformed-input tests.
PK = bytes(nacl.signing.SigningKey(b"\x01" * 32).verify_key)
GOOD = b"\x00\x24\x08\x01\x12\x20" + PK


def _vector() -> dict[str, str]:
    vectors = load_vectors("libp2p-peer-id.json")
    ed: dict[str, str] = vectors["ed25519"]
    return ed


# --- the libp2p vector ----------------------------------------------------------------------------------------------


def test_vector_identity_from_private_key_protobuf() -> None:
    v = _vector()
    private = bytes.fromhex(v["private_key_protobuf_hex"])
    assert private[:4] == b"\x08\x01\x12\x40"
    seed, public = private[4:36], private[36:]
    identity = Identity.from_seed(seed)
    assert identity.seed == seed
    assert identity.public_key == public
    assert public_key_protobuf(identity.public_key).hex() == v["public_key_protobuf_hex"]
    assert identity.peer_id.to_base58() == v["peer_id_base58btc"]
    assert str(identity.peer_id) == v["peer_id_base58btc"]
    assert identity.peer_id.to_cid() == v["peer_id_cidv1_base32"]


def test_vector_parses_both_text_forms() -> None:
    v = _vector()
    public = bytes.fromhex(v["public_key_protobuf_hex"])[4:]
    from_b58 = PeerId.from_string(v["peer_id_base58btc"])
    from_cid = PeerId.from_string(v["peer_id_cidv1_base32"])
    assert from_b58 == from_cid == PeerId.from_public_key(public)
    assert from_b58.public_key == public
    assert from_b58.to_bytes() == b"\x00\x24" + bytes.fromhex(v["public_key_protobuf_hex"])
    assert parse_public_key_protobuf(bytes.fromhex(v["public_key_protobuf_hex"])) == public


def test_vector_cid_in_base58_multibase() -> None:
    v = _vector()
    peer = PeerId.from_string(v["peer_id_base58btc"])
    z_form = "z" + base58btc_encode(b"\x01\x72" + peer.to_bytes())
    assert PeerId.from_string(z_form) == peer


# --- PeerId behaviour -----------------------------------------------------------------------------------------------


def test_peer_id_value_semantics() -> None:
    a = Identity.from_seed(b"\x01" * 32).peer_id
    b = Identity.from_seed(b"\x02" * 32).peer_id
    assert a == PeerId.from_bytes(a.to_bytes())
    assert hash(a) == hash(PeerId.from_bytes(bytearray(a.to_bytes())))
    assert len({a, b, PeerId.from_public_key(a.public_key)}) == 2
    assert (a < b) == (a.to_bytes() < b.to_bytes())
    assert sorted([b, a]) == sorted([a, b])
    assert repr(a) == f"PeerId({str(a)!r})"
    assert pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(AttributeError):
        a._multihash = b.to_bytes()  # type: ignore[misc]


def test_direct_construction_is_validated() -> None:
    with pytest.raises(InvalidPeerIdError):
        PeerId(b"\x00" * 38)


def test_verify() -> None:
    identity = Identity.from_seed(b"\x03" * 32)
    signature = identity.sign(b"hello")
    assert len(signature) == 64
    assert identity.peer_id.verify(b"hello", signature)
    assert not identity.peer_id.verify(b"hellO", signature)
    assert not identity.peer_id.verify(b"hello", signature[:-1])
    assert not identity.peer_id.verify(b"hello", bytes([signature[0] ^ 1]) + signature[1:])
    other = Identity.from_seed(b"\x04" * 32)
    assert not other.peer_id.verify(b"hello", signature)


def test_verify_with_invalid_curve_point_is_false() -> None:
    # y = 2 is not on the curve; the peer ID still parses (libp2p does not check points) but nothing verifies.
    bogus = PeerId.from_public_key(b"\x02" + b"\x00" * 31)
    assert not bogus.verify(b"m", b"\x00" * 64)
    with pytest.raises(InvalidPeerIdError, match="curve point"):
        _ = bogus.x25519_public_key


# --- Identity -------------------------------------------------------------------------------------------------------


def test_identity_generate_is_random_and_consistent() -> None:
    a, b = Identity.generate(), Identity.generate()
    assert a != b
    assert a.peer_id != b.peer_id
    assert Identity.from_seed(a.seed) == a
    assert hash(Identity.from_seed(a.seed)) == hash(a)
    assert a.peer_id == PeerId.from_public_key(a.public_key)


def test_identity_repr_hides_the_seed() -> None:
    identity = Identity.from_seed(b"\x05" * 32)
    text = repr(identity)
    assert str(identity.peer_id) in text
    assert identity.seed.hex() not in text
    assert "05050505" not in text


def test_x25519_keys_match_both_conversions() -> None:
    identity = Identity.from_seed(b"\x06" * 32)
    assert len(identity.x25519_public_key) == 32
    assert identity.x25519_public_key == identity.peer_id.x25519_public_key
    assert identity.x25519_public_key == bytes(identity.x25519_private_key.public_key)
    assert identity.x25519_private_key is identity.x25519_private_key  # cached
    assert bytes(identity.x25519_private_key) != identity.seed


@pytest.mark.parametrize("seed", [b"", b"\x00" * 31, b"\x00" * 33, b"\x00" * 64])
def test_from_seed_rejects_wrong_length(seed: bytes) -> None:
    with pytest.raises(LocalProtocolError, match="seed must be 32 bytes") as info:
        Identity.from_seed(seed)
    assert not isinstance(info.value, (ValueError, TypeError))


# --- strict parsing with named reasons ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"\x00", "truncated"),
        (GOOD[:-1], "digest length is 36 but 35"),
        (GOOD + b"\x00", "digest length is 36 but 37"),
        (b"\x12\x20" + b"\x00" * 32, r"0x12 \(sha2-256\) is not supported"),
        (b"\x00\x22" + b"\x08\x01\x12\x1e" + PK[:30], "digest is 34 bytes"),
        (b"\x00\x24\x08\x00\x12\x20" + PK, r"type 0 \(RSA\)"),
        (b"\x00\x24\x08\x02\x12\x20" + PK, r"type 2 \(Secp256k1\)"),
        (b"\x00\x24\x08\x03\x12\x20" + PK, r"type 3 \(ECDSA\)"),
        (b"\x00\x24\x08\x07\x12\x20" + PK, r"type 7 \(unknown\)"),
        (b"\x00\x24\x10\x01\x12\x20" + PK, "tag 0x08"),
        (b"\x00\x24\x08\x01\x1a\x20" + PK, "tag 0x12"),
        (b"\x00\x24\x08\x01\x12\x21" + PK, "must be 32 bytes, got 33"),
        (b"\x80\x00\x24\x08\x01\x12\x20" + PK[:-1], "overlong"),
        (b"\x00\xa4\x00\x08\x01\x12\x20" + PK[:-1], "overlong"),
    ],
)
def test_from_bytes_rejects_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidPeerIdError, match=reason):
        PeerId.from_bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\x08\x01", "field 2 .* missing"),
        (b"\x08\x01\x12\x20" + PK[:31], "truncated: 31 of 32"),
        (b"\x08\x01\x12\x20" + PK + b"\x00", "1 trailing bytes"),
        (b"\x08\x81", "varint is truncated"),
        (b"\x08\x01\x12\x20" + PK[:16] + b"\x08\x01\x12\x20" + PK[16:], "trailing"),
    ],
)
def test_parse_public_key_protobuf_rejects_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidPeerIdError, match=reason):
        parse_public_key_protobuf(data)


def test_public_key_protobuf_rejects_wrong_key_length() -> None:
    with pytest.raises(InvalidPeerIdError, match="32 bytes, got 31"):
        public_key_protobuf(PK[:31])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("1" * 200, "longer than 128"),
        ("12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3p0", "invalid base58btc character '0' at position 51"),
        ("12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pqz", "digest length"),
        ("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", r"sha2-256"),
        ("fzaajaiaejcahwr5d5ofrfbis4l5d6uwr57hu5tjodrypfm6yaq6dsc2r2pzyt6", "multibase prefix 'f'"),
        ("Bafzaajaiaejcahwr5d5ofrfbis4l5d6uwr57hu5tjodrypfm6yaq6dsc2r2pzyt6", "multibase prefix 'B'"),
        ("bAFZaajaiaejcahwr5d5ofrfbis4l5d6uwr57hu5tjodrypfm6yaq6dsc2r2pzyt6", "invalid base32 character 'A'"),
        ("bmz", "non-zero trailing bits"),
        ("bafzaajaiaejcahwr5d5ofrfbis4l5d6uwr57hu5tjodrypfm6yaq6dsc2r2pzyt6=", "invalid base32 character '='"),
        ("b", "CID: varint is truncated"),
    ],
)
def test_from_string_rejects_with_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidPeerIdError, match=reason):
        PeerId.from_string(text)


def test_from_string_rejects_wrong_cid_version_and_codec() -> None:
    mh = GOOD
    with pytest.raises(InvalidPeerIdError, match="CID version 2"):
        PeerId.from_string("b" + base32_encode(b"\x02\x72" + mh))
    with pytest.raises(InvalidPeerIdError, match="CID version 0"):
        PeerId.from_string("b" + base32_encode(b"\x00\x72" + mh))
    with pytest.raises(InvalidPeerIdError, match=r"codec 0x70 is not libp2p-key"):
        PeerId.from_string("b" + base32_encode(b"\x01\x70" + mh))
    with pytest.raises(InvalidPeerIdError, match="CID: varint is not minimally encoded"):
        PeerId.from_string("b" + base32_encode(b"\x01\xf2\x00" + mh))
    assert PeerId.from_string("b" + base32_encode(b"\x01\x72" + mh)).to_bytes() == mh


def test_wrong_types_raise_invalid_peer_id() -> None:
    with pytest.raises(InvalidPeerIdError):
        PeerId.from_string(GOOD)  # type: ignore[arg-type]
    with pytest.raises(InvalidPeerIdError):
        PeerId.from_bytes("12D3KooW")  # type: ignore[arg-type]


def test_invalid_peer_id_is_a_remote_protocol_error() -> None:
    assert issubclass(InvalidPeerIdError, RemoteProtocolError)
    assert issubclass(VarintError, RemoteProtocolError)


# --- codecs ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"", ""),
        (b"\x00", "1"),
        (b"\x00\x00\x28\x7f\xb4\xcd", "11233QC4"),
        (b"Hello World!", "2NEpo7TZRRrLZSi2U"),
        (
            b"The quick brown fox jumps over the lazy dog.",
            "USm3fpXnKG5EUBx2ndxBDMPVciP5hGey2Jh4NDv6gmeo1LkMeiKrLJUUBk6Z",
        ),
        (b"\xff", "5Q"),
        (b"\x39", "z"),
    ],
)
def test_base58btc_known_answers(raw: bytes, text: str) -> None:
    assert base58btc_encode(raw) == text
    assert base58btc_decode(text) == raw


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"", ""),
        (b"f", "my"),
        (b"fo", "mzxq"),
        (b"foo", "mzxw6"),
        (b"foob", "mzxw6yq"),
        (b"fooba", "mzxw6ytb"),
        (b"foobar", "mzxw6ytboi"),
    ],
)
def test_base32_rfc4648_vectors(raw: bytes, text: str) -> None:
    assert base32_encode(raw) == text
    assert base32_decode(text) == raw


@pytest.mark.parametrize("text", ["a", "abc", "abcdef", "abcdefghi"])
def test_base32_rejects_impossible_lengths(text: str) -> None:
    with pytest.raises(InvalidPeerIdError, match="invalid base32 length"):
        base32_decode(text)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (2**63 - 1, b"\xff" * 8 + b"\x7f"),
    ],
)
def test_uvarint_known_answers(value: int, encoded: bytes) -> None:
    assert encode_uvarint(value) == encoded
    assert read_uvarint(encoded + b"tail") == (value, len(encoded))


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "truncated"), (b"\x80", "truncated"), (b"\x80\x00", "overlong"), (b"\xff" * 9 + b"\x01", "longer than 9")],
)
def test_read_uvarint_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(VarintError, match=reason):
        read_uvarint(data)


# --- properties -----------------------------------------------------------------------------------------------------

public_keys = st.binary(min_size=32, max_size=32)


@given(public_keys)
def test_round_trips(pk: bytes) -> None:
    peer = PeerId.from_public_key(pk)
    assert peer.public_key == pk
    assert PeerId.from_bytes(peer.to_bytes()) == peer
    assert PeerId.from_string(peer.to_base58()) == peer
    assert PeerId.from_string(peer.to_cid()) == peer
    assert peer.to_base58().startswith("12D3KooW")
    assert peer.to_cid().startswith("bafzaa")
    assert parse_public_key_protobuf(public_key_protobuf(pk)) == pk


@given(st.binary(max_size=64))
def test_codec_round_trips(data: bytes) -> None:
    assert base58btc_decode(base58btc_encode(data)) == data
    text = base32_encode(data)
    assert text == base64.b32encode(data).decode().rstrip("=").lower()
    assert base32_decode(text) == data


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_uvarint_round_trip(value: int) -> None:
    assert read_uvarint(encode_uvarint(value)) == (value, len(encode_uvarint(value)))


@given(st.text(max_size=140))
def test_arbitrary_text_only_raises_invalid_peer_id(text: str) -> None:
    try:
        peer = PeerId.from_string(text)
    except InvalidPeerIdError:
        return
    assert peer.to_base58() == text or peer.to_cid() == text or text.startswith("z")


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", max_size=70).map(lambda s: "b" + s))
def test_arbitrary_base32_text_only_raises_invalid_peer_id(text: str) -> None:
    try:
        peer = PeerId.from_string(text)
    except InvalidPeerIdError:
        return
    assert peer.to_cid() == text


@given(st.binary(max_size=80))
def test_arbitrary_bytes_only_raise_invalid_peer_id(data: bytes) -> None:
    try:
        peer = PeerId.from_bytes(data)
    except InvalidPeerIdError:
        return
    assert peer.to_bytes() == data


@given(st.binary(max_size=60))
def test_arbitrary_protobuf_only_raises_invalid_peer_id(data: bytes) -> None:
    try:
        pk = parse_public_key_protobuf(data)
    except InvalidPeerIdError:
        return
    assert public_key_protobuf(pk) == data


@given(st.binary(min_size=38, max_size=38), st.integers(min_value=0, max_value=37))
def test_prefixed_bytes_mutations(pk_like: bytes, index: int) -> None:
    data = bytearray(GOOD)
    data[index] = pk_like[index]
    try:
        peer = PeerId.from_bytes(bytes(data))
    except InvalidPeerIdError:
        assert index < 6
        return
    assert peer.to_bytes() == bytes(data)

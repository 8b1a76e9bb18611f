"""libp2p-noise: handshake payload protobuf, framing, the sans-IO handshake and men in the middle."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools

import nacl.bindings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmsg.crypto.libp2p_noise import (
    MAX_EXTENSIONS_LEN,
    MAX_HANDSHAKE_PAYLOAD_LEN,
    PROTOCOL_NAME,
    STATIC_KEY_SIGNATURE_PREFIX,
    FrameDecoder,
    FrameError,
    HandshakeError,
    HandshakePhase,
    InvalidHandshakePayloadError,
    NoiseHandshake,
    PeerIdMismatchError,
    encode_frame,
    encode_handshake_payload,
    parse_handshake_payload,
)
from p2pmsg.crypto.noise import HandshakeState, KeyPair
from p2pmsg.errors import LocalProtocolError, RemoteProtocolError
from p2pmsg.identity import Identity

ALICE = Identity.from_seed(bytes([0xA1]) * 32)
BOB = Identity.from_seed(bytes([0xB0]) * 32)
MALLORY = Identity.from_seed(bytes([0x3A]) * 32)
STATIC = KeyPair.from_private(bytes([7]) * 32)


def _field(number: int, value: bytes, wire_type: int = 2) -> bytes:
    assert len(value) < 128
    return bytes([number << 3 | wire_type, len(value)]) + value


def _payload(identity: Identity = ALICE, static_public: bytes = STATIC.public) -> bytes:
    return encode_handshake_payload(identity, static_public)


# ------------------------------------------------------------------------------------------------------- payload


def test_payload_layout_byte_by_byte() -> None:
    payload = _payload()
    assert len(payload) == 104
    assert payload[:6] == bytes.fromhex("0a24 0801 1220")
    assert payload[6:38] == ALICE.public_key
    assert payload[38:40] == bytes.fromhex("1240")
    signature = payload[40:]
    assert ALICE.peer_id.verify(b"noise-libp2p-static-key:" + STATIC.public, signature)
    assert STATIC_KEY_SIGNATURE_PREFIX == b"noise-libp2p-static-key:"
    parsed = parse_handshake_payload(payload)
    assert parsed.identity_key == ALICE.public_key and parsed.identity_sig == signature
    assert parsed.verify(STATIC.public) == ALICE.peer_id


def test_payload_signature_is_bound_to_the_static_key() -> None:
    parsed = parse_handshake_payload(_payload())
    with pytest.raises(InvalidHandshakePayloadError, match="does not sign this Noise static key"):
        parsed.verify(KeyPair.from_private(bytes([8]) * 32).public)


def test_payload_field_order_and_extensions_are_accepted() -> None:
    payload = _payload()
    key_field, sig_field = payload[:38], payload[38:]
    extensions = _field(4, _field(2, b"/yamux/1.0.0"))
    parsed = parse_handshake_payload(sig_field + extensions + key_field)
    assert parsed.peer_id == ALICE.peer_id


def _valid_fields() -> tuple[bytes, bytes]:
    payload = _payload()
    return payload[:38], payload[38:]


KEY_FIELD, SIG_FIELD = _valid_fields()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "field 1 \\(identity_key\\) is missing"),
        (KEY_FIELD, "field 2 \\(identity_sig\\) is missing"),
        (SIG_FIELD, "field 1 \\(identity_key\\) is missing"),
        (KEY_FIELD + SIG_FIELD + KEY_FIELD, "field 1 \\(identity_key\\) appears twice"),
        (KEY_FIELD + SIG_FIELD + _field(4, b"") + _field(4, b""), "field 4 \\(extensions\\) appears twice"),
        (bytes([0x08, 0x01]) + SIG_FIELD, "field 1 \\(identity_key\\) must be length-delimited"),
        (KEY_FIELD + SIG_FIELD[:-1], "field 2 \\(identity_sig\\) is truncated: 64 bytes declared, 63 present"),
        (KEY_FIELD + _field(2, bytes(63)), "field 2 \\(identity_sig\\) must be 64 bytes, got 63"),
        (_field(1, bytes.fromhex("08001220") + bytes(32)) + SIG_FIELD, "field 1 \\(identity_key\\): .*RSA"),
        (_field(1, bytes.fromhex("08011220") + bytes(31)) + SIG_FIELD, "field 1 \\(identity_key\\)"),
        (bytes([0x8A, 0x00]) + KEY_FIELD[1:] + SIG_FIELD, "bad varint"),
        (KEY_FIELD + SIG_FIELD + bytes([0x22]), "bad varint"),
        (KEY_FIELD + SIG_FIELD + bytes([0x00]), "field 0 is not a valid field number"),
        (KEY_FIELD + SIG_FIELD + bytes([0x00, 0x00]), "field 0 is not a valid field number"),
        (KEY_FIELD + SIG_FIELD + bytes([0x80, 0x80, 0x80, 0x80, 0x10, 0x00]), "field 536870912 is not a valid"),
        (KEY_FIELD + SIG_FIELD + _field(2, bytes(64)), "field 2 \\(identity_sig\\) appears twice"),
        (bytes([0x0D]) + bytes(4) + SIG_FIELD, "field 1 \\(identity_key\\) must be length-delimited"),
        (KEY_FIELD + SIG_FIELD + bytes([0x20, 0x01]), "field 4 \\(extensions\\) must be length-delimited"),
        (KEY_FIELD + SIG_FIELD + bytes([0x1B]) + bytes(8), "field 3 has wire type 3 \\(a group\\)"),
        (KEY_FIELD + SIG_FIELD + bytes([0x2C]), "field 5 has wire type 4 \\(a group\\)"),
        (KEY_FIELD + SIG_FIELD + bytes([0x2E]), "field 5 has wire type 6, which does not exist"),
        (KEY_FIELD + SIG_FIELD + _field(3, b"early data")[:-1], "field 3 is truncated: 10 bytes declared, 9"),
        (KEY_FIELD + SIG_FIELD + bytes([0x28, 0x80]), "field 5 is truncated inside its varint"),
        (KEY_FIELD + SIG_FIELD + bytes([0x28]), "field 5 is truncated inside its varint"),
        (KEY_FIELD + SIG_FIELD + bytes([0x28]) + b"\xff" * 10 + b"\x01", "field 5 has a varint longer than 10 bytes"),
        (KEY_FIELD + SIG_FIELD + bytes([0x2A, 0x80]), "bad varint"),
        (KEY_FIELD + SIG_FIELD + bytes([0x2A, 0x85, 0x00]), "bad varint"),
        (KEY_FIELD + SIG_FIELD + bytes([0x29]) + bytes(7), "field 5 is truncated: 8 bytes declared, 7"),
        (KEY_FIELD + SIG_FIELD + bytes([0x2D]) + bytes(3), "field 5 is truncated: 4 bytes declared, 3"),
        (bytes(MAX_HANDSHAKE_PAYLOAD_LEN + 1), "exceeds the 4096-byte limit"),
    ],
)
def test_payload_parse_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidHandshakePayloadError, match=reason):
        parse_handshake_payload(data)


def test_payload_extensions_are_bounded() -> None:
    big = MAX_EXTENSIONS_LEN + 1
    extensions = bytes([0x22]) + bytes([big & 0x7F | 0x80, big >> 7]) + bytes(big)
    with pytest.raises(InvalidHandshakePayloadError, match="field 4 \\(extensions\\) is 2049 bytes"):
        parse_handshake_payload(KEY_FIELD + SIG_FIELD + extensions)
    ok = bytes([0x22]) + bytes([(big - 1) & 0x7F | 0x80, (big - 1) >> 7]) + bytes(big - 1)
    assert parse_handshake_payload(KEY_FIELD + SIG_FIELD + ok).identity_key == ALICE.public_key


def test_payload_unknown_fields_are_skipped() -> None:
    """Like go-libp2p, unknown fields of any defined wire type are skipped (field 3 included), in any position."""
    unknown = b"".join(
        (
            _field(3, b"early data"),  # libp2p's deprecated `data`
            bytes([0x28, 0x96, 0x01]),  # field 5, varint 150
            bytes([0x30]) + b"\xff" * 9 + b"\x01",  # field 6, varint -1 as an int64 (10 bytes)
            bytes([0x31]) + bytes(range(8)),  # field 6, fixed64
            bytes([0x3D]) + bytes(4),  # field 7, fixed32
            bytes([0x42, 0x00]),  # field 8, empty bytes
            bytes([0x82, 0x01, 0x01, 0xAA]),  # field 16: a two-byte tag
            _field(5, b"repeated unknown fields are allowed"),
            bytes([0xFA, 0xFF, 0xFF, 0xFF, 0x0F, 0x01, 0x00]),  # field 536870911, the largest field number
        )
    )
    for data in (KEY_FIELD + SIG_FIELD + unknown, unknown + SIG_FIELD + KEY_FIELD, KEY_FIELD + unknown + SIG_FIELD):
        parsed = parse_handshake_payload(data)
        assert parsed.identity_key == ALICE.public_key and parsed.verify(STATIC.public) == ALICE.peer_id


def test_payload_unknown_fields_count_towards_the_size_cap() -> None:
    filler = MAX_HANDSHAKE_PAYLOAD_LEN - len(KEY_FIELD + SIG_FIELD) - 3
    at_limit = KEY_FIELD + SIG_FIELD + bytes([0x1A, filler & 0x7F | 0x80, filler >> 7]) + bytes(filler)
    assert len(at_limit) == MAX_HANDSHAKE_PAYLOAD_LEN
    assert parse_handshake_payload(at_limit).identity_key == ALICE.public_key
    with pytest.raises(InvalidHandshakePayloadError, match="4097 bytes exceeds the 4096-byte limit"):
        parse_handshake_payload(at_limit + b"\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_payload_parse_only_raises_its_own_error(data: bytes) -> None:
    with contextlib.suppress(InvalidHandshakePayloadError):
        parse_handshake_payload(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=103), st.integers(min_value=1, max_value=255))
def test_payload_mutations_never_verify(position: int, mask: int) -> None:
    payload = bytearray(_payload())
    payload[position] ^= mask
    try:
        parsed = parse_handshake_payload(bytes(payload))
        parsed.verify(STATIC.public)
    except InvalidHandshakePayloadError:
        return
    # A mutation may only survive if it did not change what is signed and who signed it (impossible here).
    pytest.fail(f"mutated payload (byte {position} ^ {mask:#x}) still verifies")


# ------------------------------------------------------------------------------------------------------- framing


def test_encode_frame() -> None:
    assert encode_frame(b"") == b"\x00\x00"
    assert encode_frame(b"abc") == b"\x00\x03abc"
    assert encode_frame(bytes(65535))[:2] == b"\xff\xff"
    with pytest.raises(LocalProtocolError, match="65536 bytes"):
        encode_frame(bytes(65536))


@settings(max_examples=100, deadline=None)
@given(
    frames=st.lists(st.binary(max_size=700), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=10),
)
def test_frame_decoder_reassembles_any_split(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    decoder = FrameDecoder()
    out: list[bytes] = []
    for start, end in itertools.pairwise(points):
        decoder.feed(stream[start:end])
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    assert out == frames
    assert decoder.buffered == 0
    decoder.check_eof()


def test_frame_decoder_eof_inside_a_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00")
    with pytest.raises(FrameError, match="inside a frame header"):
        decoder.check_eof()
    decoder.feed(b"\x05ab")
    assert decoder.next_frame() is None
    with pytest.raises(FrameError, match="2 of 5 bytes"):
        decoder.check_eof()


# ----------------------------------------------------------------------------------------------------- handshake


def _run(initiator: NoiseHandshake, responder: NoiseHandshake) -> None:
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    responder.read_message(initiator.write_message())


def test_handshake_success_and_phases() -> None:
    initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    responder = NoiseHandshake(BOB, initiator=False)
    assert initiator.phase is HandshakePhase.INITIATOR_SEND_1 and initiator.wants_write
    assert responder.phase is HandshakePhase.RESPONDER_AWAIT_1 and not responder.wants_write
    message1 = initiator.write_message()
    assert len(message1) == 32, "message 1 is the bare ephemeral key"
    assert initiator.phase is HandshakePhase.INITIATOR_AWAIT_2
    responder.read_message(message1)
    assert responder.phase is HandshakePhase.RESPONDER_SEND_2
    message2 = responder.write_message()
    assert len(message2) == 32 + 48 + 104 + 16
    initiator.read_message(message2)
    assert initiator.remote_peer == BOB.peer_id and initiator.phase is HandshakePhase.INITIATOR_SEND_3
    message3 = initiator.write_message()
    assert len(message3) == 48 + 104 + 16
    responder.read_message(message3)
    assert initiator.is_complete and responder.is_complete
    a, b = initiator.result(), responder.result()
    assert a.remote_peer == BOB.peer_id and b.remote_peer == ALICE.peer_id
    assert a.handshake_hash == b.handshake_hash
    assert b.transport.decrypt(a.transport.encrypt(b"hi bob")) == b"hi bob"
    assert a.transport.decrypt(b.transport.encrypt(b"hi alice")) == b"hi alice"
    # The Noise static keys are fresh per handshake, not the identity's converted X25519 key.
    assert a.remote_static != BOB.x25519_public_key


def test_static_keys_are_fresh_per_handshake() -> None:
    statics = set()
    for _ in range(3):
        initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
        responder = NoiseHandshake(BOB, initiator=False)
        _run(initiator, responder)
        statics.add(initiator.result().remote_static)
    assert len(statics) == 3


def test_handshake_misuse_is_local() -> None:
    with pytest.raises(LocalProtocolError, match="expected_peer"):
        NoiseHandshake(ALICE, initiator=True)
    initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    with pytest.raises(LocalProtocolError, match="read_message: not allowed in phase INITIATOR_SEND_1"):
        initiator.read_message(bytes(32))
    with pytest.raises(LocalProtocolError, match="not complete"):
        initiator.result()
    responder = NoiseHandshake(BOB, initiator=False)
    with pytest.raises(LocalProtocolError, match="write_message"):
        responder.write_message()


def test_wrong_peer_is_caught_before_our_identity_is_sent() -> None:
    initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    impostor = NoiseHandshake(MALLORY, initiator=False)
    impostor.read_message(initiator.write_message())
    with pytest.raises(PeerIdMismatchError, match=f"the peer is {MALLORY.peer_id}, expected {BOB.peer_id}") as info:
        initiator.read_message(impostor.write_message())
    assert info.value.expected == BOB.peer_id and info.value.actual == MALLORY.peer_id
    assert initiator.phase is HandshakePhase.FAILED
    with pytest.raises(LocalProtocolError):
        initiator.write_message()  # message 3 (with Alice's identity) can never be produced


def test_responder_may_insist_on_a_peer() -> None:
    initiator = NoiseHandshake(MALLORY, initiator=True, expected_peer=BOB.peer_id)
    responder = NoiseHandshake(BOB, initiator=False, expected_peer=ALICE.peer_id)
    with pytest.raises(PeerIdMismatchError, match="message 3"):
        _run(initiator, responder)


def test_message_1_payload_must_be_empty() -> None:
    noise = HandshakeState(initiator=True, protocol_name=PROTOCOL_NAME)
    responder = NoiseHandshake(BOB, initiator=False)
    with pytest.raises(HandshakeError, match="message 1: 37 bytes is longer than the 32 bytes it can have"):
        responder.read_message(noise.write_message(b"hello"))
    assert responder.phase is HandshakePhase.FAILED


def test_incoming_message_length_limits() -> None:
    initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    responder = NoiseHandshake(BOB, initiator=False)
    assert (initiator.max_incoming_len, responder.max_incoming_len) == (0, 32)
    responder.read_message(initiator.write_message())
    assert (initiator.max_incoming_len, responder.max_incoming_len) == (32 + 48 + 4096 + 16, 0)
    initiator.read_message(responder.write_message())
    assert (initiator.max_incoming_len, responder.max_incoming_len) == (0, 48 + 4096 + 16)
    with pytest.raises(HandshakeError, match="message 3: 4161 bytes is longer than the 4160 bytes"):
        responder.read_message(bytes(4161))
    assert responder.phase is HandshakePhase.FAILED
    other = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    other.write_message()
    with pytest.raises(HandshakeError, match="message 2: 4193 bytes"):
        other.read_message(bytes(4193))


def test_largest_valid_payload_fits_the_limits() -> None:
    """A peer payload with the largest extensions field (2048 bytes) is accepted in message 2."""
    attacker = HandshakeState(initiator=False, protocol_name=PROTOCOL_NAME)
    base = encode_handshake_payload(BOB, attacker.static_public)
    room = MAX_EXTENSIONS_LEN
    extensions = bytes([0x22, room & 0x7F | 0x80, room >> 7]) + bytes(room)
    assert len(base + extensions) <= MAX_HANDSHAKE_PAYLOAD_LEN
    initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    attacker.read_message(initiator.write_message())
    message2 = attacker.write_message(base + extensions)
    assert len(message2) <= initiator.max_incoming_len
    initiator.read_message(message2)
    assert initiator.remote_peer == BOB.peer_id


def test_low_order_ephemeral_key_fails_the_handshake() -> None:
    responder = NoiseHandshake(BOB, initiator=False)
    responder.read_message(bytes(32))
    with pytest.raises(HandshakeError, match="message 2: X25519"):
        responder.write_message()


def _mitm_message2(initiator: NoiseHandshake, payload: bytes, attacker: HandshakeState | None = None) -> None:
    """Mallory answers Alice's message 1 with a message 2 of her own making, carrying ``payload``."""
    attacker = attacker or HandshakeState(initiator=False, protocol_name=PROTOCOL_NAME)
    attacker.read_message(initiator.write_message())
    initiator.read_message(attacker.write_message(payload))


def _bob_payload_via_mallory() -> bytes:
    """What Mallory can learn from Bob: his real payload (signed over Bob's own static key)."""
    mallory = HandshakeState(initiator=True, protocol_name=PROTOCOL_NAME)
    bob = NoiseHandshake(BOB, initiator=False)
    bob.read_message(mallory.write_message())
    return mallory.read_message(bob.write_message())


def test_mitm_substituting_the_static_key_fails() -> None:
    """Mallory replays Bob's identity and signature with her own static key: the signature does not cover it."""
    bob_payload = _bob_payload_via_mallory()
    assert parse_handshake_payload(bob_payload).peer_id == BOB.peer_id
    initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    with pytest.raises(InvalidHandshakePayloadError, match=f"identity_sig of {BOB.peer_id} does not sign"):
        _mitm_message2(initiator, bob_payload)


def test_mitm_substituting_the_identity_key_fails() -> None:
    """Mallory signs her static key with her identity but claims Bob's public key: the signature fails."""
    attacker = HandshakeState(initiator=False, protocol_name=PROTOCOL_NAME)
    own = parse_handshake_payload(encode_handshake_payload(MALLORY, attacker.static_public))
    forged = _field(1, bytes.fromhex("08011220") + BOB.public_key) + _field(2, own.identity_sig)
    initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    with pytest.raises(InvalidHandshakePayloadError, match="does not sign"):
        _mitm_message2(initiator, forged, attacker)


def test_mitm_with_her_own_identity_is_a_peer_mismatch() -> None:
    attacker = HandshakeState(initiator=False, protocol_name=PROTOCOL_NAME)
    honest = encode_handshake_payload(MALLORY, attacker.static_public)
    initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    with pytest.raises(PeerIdMismatchError):
        _mitm_message2(initiator, honest, attacker)


def test_mitm_claiming_bobs_static_key_without_its_secret_fails() -> None:
    """Mallory sends Bob's static public key and Bob's payload but cannot compute the es key: decryption fails."""
    mallory = HandshakeState(initiator=True, protocol_name=PROTOCOL_NAME)
    bob = NoiseHandshake(BOB, initiator=False)
    bob.read_message(mallory.write_message())
    bob_payload = mallory.read_message(bob.write_message())
    bob_static = mallory.remote_static
    assert bob_static is not None
    attacker = HandshakeState(initiator=False, protocol_name=PROTOCOL_NAME)
    # Fault injection: a static key pair whose public half is Bob's and whose private half is a guess.
    object.__setattr__(attacker, "_s", KeyPair(private=bytes([9]) * 32, public=bob_static))
    initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
    with pytest.raises(HandshakeError, match="message 2: the payload failed authentication"):
        _mitm_message2(initiator, bob_payload, attacker)


def _alice_message3_payload() -> bytes:
    """What Mallory learns when Alice dials her: Alice's real payload, signed over Alice's own static key."""
    alice = NoiseHandshake(ALICE, initiator=True, expected_peer=MALLORY.peer_id)
    mallory = HandshakeState(initiator=False, protocol_name=PROTOCOL_NAME)
    mallory.read_message(alice.write_message())
    alice.read_message(mallory.write_message(encode_handshake_payload(MALLORY, mallory.static_public)))
    payload = mallory.read_message(alice.write_message())
    assert alice.is_complete and parse_handshake_payload(payload).peer_id == ALICE.peer_id
    return payload


def test_dialer_replaying_alices_message_3_payload_is_rejected() -> None:
    """Mallory dials Bob with her own static key and Alice's identity key and signature: Bob must refuse."""
    alice_payload = _alice_message3_payload()
    fake_dialer = HandshakeState(initiator=True, protocol_name=PROTOCOL_NAME)
    responder = NoiseHandshake(BOB, initiator=False)
    responder.read_message(fake_dialer.write_message(b""))
    fake_dialer.read_message(responder.write_message())
    message3 = fake_dialer.write_message(alice_payload)
    with pytest.raises(InvalidHandshakePayloadError, match=f"identity_sig of {ALICE.peer_id} does not sign"):
        responder.read_message(message3)
    assert responder.phase is HandshakePhase.FAILED
    assert responder.remote_peer is None and not responder.is_complete
    with pytest.raises(LocalProtocolError, match="not complete"):
        responder.result()


@pytest.mark.parametrize("message_index", [0, 1, 2])
def test_flipped_bits_fail_the_libp2p_handshake(message_index: int) -> None:
    for position in range(0, 300, 7):
        initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
        responder = NoiseHandshake(BOB, initiator=False)
        sides = [(initiator, responder), (responder, initiator), (initiator, responder)]
        with pytest.raises(RemoteProtocolError):
            for index, (sender, receiver) in enumerate(sides):
                message = bytearray(sender.write_message())
                if index == message_index:
                    message[position % len(message)] ^= 0x10
                receiver.read_message(bytes(message))
        assert not (initiator.is_complete and responder.is_complete)


# ------------------------------------------------------------------------------------------------ worked example

# The worked example of docs/protocol.md (section 3) (keep the two in step).
EXAMPLE = {
    "payload_bob": "0a2408011220705fbac01f5519899f437bc42e40255ae9ab54bff00de3433af7d687d9e71ad51240"
    "13f84c49d404c1c2c89d56ba34be623be172abcdf959afeb6aaf3bc674b7e0a6"
    "81d4808f7049c47758832252f19fa75a63ff5303625fc2ac8237aa3522c0e904",
    "payload_alice": "0a2408011220bc7cbcb5636375fa1d82434d466724d92377f53b980695dd49d26d0ce12205a51240"
    "7b134ecd496e4a013cb1a3fe2f843a20f84a340af90c55b3ba610db7334ae49b"
    "cb07b898eb611215f4c767cfba57760fb202be83622fdf8410ac7e4c2315ee07",
    "frame1": "0020052a50773ac8d91773f2dc9662e12f0defe915e415b8a1c8e20a5a3d6ab2b843",
    "frame2": "00c8"
    "0faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20"
    "a7ed3a6a454f03d7bb49831f99155a0f5b30d08f206300ad054574e2c183e324"
    "73fc04f9ec728bfb00430cf36aed63af"
    "19b2fb5876facec13cd5831cfb3ad981fe1fbd273722c54d50a9b680325f252b"
    "05991920f61e661fd4c510ddf2174688c450e50ac6e35beb9baf2e20dc264957"
    "250ac5ac27db1e5df940790626a37a174a7fdbbf36757f72cd1e9f8cca9c3842"
    "8bbb775b328f66052bf672b2491dbb05967e95787b3e49e4",
    "frame3": "00a8"
    "e86c81a880398a8d9bc21b322d8f524134ef9c0456a63ec2de76574116541dca"
    "b70430d763bea7539ecc46a8febbce36"
    "27e4f597132215014ebae3b4f309c32ba35df072280f751db19bebb16912dfb7"
    "acf10eb709ddd7aa109cb515a3e825d03926b76a0926621e6d19bc786dc7a0be"
    "dfe2ad324f0a39b574f5eb840497544545c81a213a785e45ea54d845bbe7655b"
    "52e8bfcdafd72f2646d1c1d5f59c107754761254f9766ce8",
    "handshake_hash": "b29d326f2e8b2dfb65ec1b3b90d2dac1c396eba7dc2e3bd78b13fb4b69d3ba71",
    # The state after each step (section 3.9's table), checked by following section 3.2's rules directly.
    "h_start": "f3d15e6108ed9556171207baa58f97d29a13c6be40595166066e2e0958dc002d",
    "h1": "2a0da0ae8252b5a9ec5e4884bb69e43bf5c3dc9925fc53a45825afdbe8c0014f",
    "h2": "addf6323d6cdbd658cea94e4087058390748c271d96b93d9dd566b77358d4880",
    "ck2": "0e1639b2102c623b95e5af211b1699c073b42393268e771cba2dd66d58d55fd7",
    "ck3": "a30fc60d9590de749bb35a0acb8165c5e0638e8afe60a9b1519ad111873f5993",
    "k1": "0fe0098213134667862fb8218f776a53bcb48d85dc9434132714807c77147efc",
    "k2": "9c5a84aabbc19454b741f25f57f3f4a89b18e4e2306c71183cdc4433cf29321e",
    "alice_hello": "0015aa95c32df597c589e3fe61f3cbede5197bb35b7cf3",
    "bob_hi": "0012de17c87406f65c303e695e274a3ae3c9eb92",
}


def test_worked_example_from_the_protocol_document() -> None:
    assert str(ALICE.peer_id) == "12D3KooWNW98jY6oC8EEaFFbYCc24HPRaNAJaEY7eiAvspiAgFak"
    assert str(BOB.peer_id) == "12D3KooWHP2Ve7tpkRQMJACbU4xmq9aDwL6gphLRHLJ3xB6nU5KA"
    alice_static, bob_static = bytes([0x11]) * 32, bytes([0x21]) * 32
    assert encode_handshake_payload(BOB, KeyPair.from_private(bob_static).public).hex() == EXAMPLE["payload_bob"]
    assert encode_handshake_payload(ALICE, KeyPair.from_private(alice_static).public).hex() == EXAMPLE["payload_alice"]
    alice = NoiseHandshake(
        ALICE,
        initiator=True,
        expected_peer=BOB.peer_id,
        static_private=alice_static,
        ephemeral_private=bytes([0x12]) * 32,
    )
    bob = NoiseHandshake(BOB, initiator=False, static_private=bob_static, ephemeral_private=bytes([0x22]) * 32)
    frame1 = encode_frame(alice.write_message())
    assert frame1.hex() == EXAMPLE["frame1"]
    bob.read_message(frame1[2:])
    frame2 = encode_frame(bob.write_message())
    assert frame2.hex() == EXAMPLE["frame2"]
    alice.read_message(frame2[2:])
    frame3 = encode_frame(alice.write_message())
    assert frame3.hex() == EXAMPLE["frame3"]
    bob.read_message(frame3[2:])
    a, b = alice.result(), bob.result()
    assert a.handshake_hash.hex() == b.handshake_hash.hex() == EXAMPLE["handshake_hash"]
    hello = encode_frame(a.transport.encrypt(b"hello"))
    assert hello.hex() == EXAMPLE["alice_hello"]
    assert b.transport.decrypt(hello[2:]) == b"hello"
    hi = encode_frame(b.transport.encrypt(b"hi"))
    assert hi.hex() == EXAMPLE["bob_hi"]
    assert a.transport.decrypt(hi[2:]) == b"hi"


def test_the_documented_noise_rules_reproduce_the_worked_example() -> None:
    """Section 3.2 spells out the Noise rules for implementers: followed literally (hashlib, hmac and libsodium
    here, none of our Noise code), they give section 3.9's frames, intermediate ``h``/``ck`` and transport keys."""

    def sha(data: bytes) -> bytes:
        return hashlib.sha256(data).digest()

    def hkdf(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
        t = hmac.new(ck, ikm, hashlib.sha256).digest()
        out1 = hmac.new(t, b"\x01", hashlib.sha256).digest()
        return out1, hmac.new(t, out1 + b"\x02", hashlib.sha256).digest()

    def seal(k: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
        nonce = bytes(4) + n.to_bytes(8, "little")
        return bytes(nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, nonce, k))

    def dh(private: bytes, public: bytes) -> bytes:
        return bytes(nacl.bindings.crypto_scalarmult(private, public))

    def pub(private: bytes) -> bytes:
        return bytes(nacl.bindings.crypto_scalarmult_base(private))

    a_s, a_e, b_s, b_e = bytes([0x11]) * 32, bytes([0x12]) * 32, bytes([0x21]) * 32, bytes([0x22]) * 32
    h = ck = b"Noise_XX_25519_ChaChaPoly_SHA256"
    h = sha(h)  # MixHash(empty prologue)
    assert (h.hex(), ck.hex()) == (EXAMPLE["h_start"], b"Noise_XX_25519_ChaChaPoly_SHA256".hex())
    # Message 1: e, then the empty payload (no key yet: in clear, still hashed).
    h = sha(sha(h + pub(a_e)))
    assert pub(a_e).hex() == EXAMPLE["frame1"][4:] and h.hex() == EXAMPLE["h1"]
    # Message 2: e, ee, s, es, payload.
    h = sha(h + pub(b_e))
    ck, k = hkdf(ck, dh(a_e, pub(b_e)))
    c_s = seal(k, 0, h, pub(b_s))
    h = sha(h + c_s)
    ck, k = hkdf(ck, dh(a_e, pub(b_s)))
    c_payload = seal(k, 0, h, bytes.fromhex(EXAMPLE["payload_bob"]))
    h = sha(h + c_payload)
    assert (pub(b_e) + c_s + c_payload).hex() == EXAMPLE["frame2"][4:]
    assert (h.hex(), ck.hex()) == (EXAMPLE["h2"], EXAMPLE["ck2"])
    # Message 3: s (under message 2's key, n = 1), se, payload.
    c_s = seal(k, 1, h, pub(a_s))
    h = sha(h + c_s)
    ck, k = hkdf(ck, dh(b_e, pub(a_s)))
    c_payload = seal(k, 0, h, bytes.fromhex(EXAMPLE["payload_alice"]))
    h = sha(h + c_payload)
    assert (c_s + c_payload).hex() == EXAMPLE["frame3"][4:]
    assert (h.hex(), ck.hex()) == (EXAMPLE["handshake_hash"], EXAMPLE["ck3"])
    k1, k2 = hkdf(ck, b"")
    assert (k1.hex(), k2.hex()) == (EXAMPLE["k1"], EXAMPLE["k2"])
    assert seal(k1, 0, b"", b"hello").hex() == EXAMPLE["alice_hello"][4:]

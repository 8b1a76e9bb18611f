"""Envelope v1 (inner message v2): sealing, opening, every refusal (reflection included), the key cache, receipts."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import msgpack
import nacl.bindings
import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmsg.chat.envelope import (
    ENVELOPE_SCHEMA,
    MAX_ACK_IDS,
    MAX_BOX_SIZE,
    MAX_ENVELOPE_SIZE,
    MAX_TEXT_BYTES,
    MESSAGE_SCHEMA,
    ChatEnvelopeError,
    DecryptionError,
    DirectionMismatchError,
    EnvelopeSealer,
    MessageIdMismatchError,
    WrongRecipientError,
    decode_envelope,
    decode_receipt,
    encode_receipt,
    message_id_time_prefix,
    new_message_id,
)
from p2pmsg.errors import LocalProtocolError, RemoteProtocolError
from p2pmsg.identity import Identity, PeerId

ALICE = Identity.from_seed(bytes(range(32)))
BOB = Identity.from_seed(bytes(range(1, 33)))
CAROL = Identity.from_seed(bytes(range(2, 34)))


def _counter_random() -> object:
    counter = itertools.count()

    def random(n: int) -> bytes:
        return bytes([next(counter) % 256]) * n

    return random


def _outer(env_raw: bytes) -> dict[str, object]:
    value = msgpack.unpackb(env_raw, raw=False)
    assert isinstance(value, dict)
    return value


def _repack(fields: dict[str, object]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def test_seal_open_round_trip() -> None:
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "hello, bob ✓", ts=1_700_000_000_123)
    message = EnvelopeSealer(BOB).open(sealed.raw)
    assert message.text == "hello, bob ✓"
    assert message.ts == 1_700_000_000_123
    assert message.id == sealed.id
    assert message.sender == ALICE.peer_id
    assert message.recipient == BOB.peer_id
    assert message.kind == "text"
    assert len(sealed.id_hex) == 32 and sealed.id_hex == sealed.id.hex()


def test_box_is_a_standard_crypto_box() -> None:
    """An independent opener (PyNaCl's Box with the converted keys) reads the inner message."""
    random = _counter_random()
    sealed = EnvelopeSealer(ALICE, random=random).seal(BOB.peer_id, "kat", ts=5)  # type: ignore[arg-type]
    # ts 5 is minute 0; one 36-byte draw: the id's 12 random bytes, then the nonce
    assert sealed.id == bytes(16) and sealed.nonce == bytes(24)
    box = nacl.public.Box(BOB.x25519_private_key, nacl.public.PublicKey(ALICE.x25519_public_key))
    inner = msgpack.unpackb(box.decrypt(sealed.box, sealed.nonce), raw=False)
    assert inner == {
        "v": 2,
        "id": bytes(16),
        "from": ALICE.peer_id.to_bytes(),
        "to": BOB.peer_id.to_bytes(),
        "ts": 5,
        "kind": "text",
        "text": "kat",
    }
    assert list(inner) == ["v", "id", "from", "to", "ts", "kind", "text"]
    outer = _outer(sealed.raw)
    assert list(outer) == ["v", "id", "from", "to", "nonce", "box"]
    assert outer["from"] == ALICE.peer_id.to_bytes() and outer["to"] == BOB.peer_id.to_bytes()


def test_sealing_is_deterministic_with_injected_randomness() -> None:
    a = EnvelopeSealer(ALICE, random=_counter_random()).seal(BOB.peer_id, "x", ts=1)  # type: ignore[arg-type]
    b = EnvelopeSealer(ALICE, random=_counter_random()).seal(BOB.peer_id, "x", ts=1)  # type: ignore[arg-type]
    c = EnvelopeSealer(ALICE).seal(BOB.peer_id, "x", ts=1)
    assert a.raw == b.raw
    assert c.raw != a.raw and c.id != a.id


def test_a_fresh_id_starts_with_the_minute_it_was_written() -> None:
    ts = 1_700_000_000_123  # minute 28_333_333 = 0x01b05515
    sealed = EnvelopeSealer(ALICE, random=_counter_random()).seal(BOB.peer_id, "x", ts=ts)  # type: ignore[arg-type]
    assert sealed.id == (ts // 60_000).to_bytes(4, "big") + bytes(12)
    assert sealed.nonce == bytes(24)
    assert new_message_id(ts, lambda n: b"\xab" * n) == bytes.fromhex("01b05515") + b"\xab" * 12
    # Later minutes sort after earlier ones whatever the random part; the minute wraps modulo 2^32.
    ids = [EnvelopeSealer(ALICE).seal(BOB.peer_id, "x", ts=t).id for t in (0, 59_999, 60_000, 3_600_000)]
    assert [i[:4] for i in ids] == [bytes(4), bytes(4), bytes.fromhex("00000001"), bytes.fromhex("0000003c")]
    assert message_id_time_prefix(2**32 * 60_000 + 60_000) == bytes.fromhex("00000001")
    assert message_id_time_prefix(-1) == bytes(4)  # sealing refuses such a ts itself
    # Ids of one minute still differ: 96 random bits.
    assert len({EnvelopeSealer(ALICE).seal(BOB.peer_id, "x", ts=ts).id for _ in range(50)}) == 50


def test_wrong_recipient_is_refused() -> None:
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "for bob", ts=1)
    with pytest.raises(WrongRecipientError) as info:
        EnvelopeSealer(CAROL).open(sealed)
    assert info.value.field == "envelope.to"


def test_tampered_box_is_refused() -> None:
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "intact", ts=1)
    fields = _outer(sealed.raw)
    box = bytearray(fields["box"])  # type: ignore[arg-type]
    box[-1] ^= 1
    fields["box"] = bytes(box)
    with pytest.raises(DecryptionError) as info:
        EnvelopeSealer(BOB).open(_repack(fields))
    assert info.value.field == "envelope.box"


def test_forged_sender_is_refused() -> None:
    """Carol seals to Bob but writes Alice in ``from``: Bob opens with Alice's key and the box fails."""
    forged = EnvelopeSealer(CAROL).seal(BOB.peer_id, "I am alice", ts=1)
    fields = _outer(forged.raw)
    fields["from"] = ALICE.peer_id.to_bytes()
    with pytest.raises(DecryptionError):
        EnvelopeSealer(BOB).open(_repack(fields))


def test_relabelled_id_is_refused() -> None:
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "id bound", ts=1)
    fields = _outer(sealed.raw)
    fields["id"] = bytes(16)
    with pytest.raises(MessageIdMismatchError) as info:
        EnvelopeSealer(BOB).open(_repack(fields))
    assert info.value.field == "message.id"


def test_reflected_envelope_is_refused() -> None:
    """The reflection probe: crypto_box has one key per pair, so Alice's box for Bob also opens at Alice.

    With ``from`` and ``to`` swapped, an envelope Alice sealed to Bob would open at Alice as a message "from Bob"
    carrying her own text, unless the inner message binds the direction.
    """
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "A's own words", ts=1)
    fields = _outer(sealed.raw)
    fields["from"], fields["to"] = fields["to"], fields["from"]
    reflected = decode_envelope(_repack(fields))
    assert reflected.sender == BOB.peer_id and reflected.recipient == ALICE.peer_id
    alice = EnvelopeSealer(ALICE)
    with pytest.raises(DirectionMismatchError) as info:
        alice.open(reflected)
    assert info.value.field == "message.from"
    assert isinstance(info.value, RemoteProtocolError)
    assert str(ALICE.peer_id) in info.value.reason and str(BOB.peer_id) in info.value.reason
    # The same box, not reflected, still opens at Bob: only the direction is refused.
    assert EnvelopeSealer(BOB).open(sealed.raw).text == "A's own words"


def _raw_envelope(
    inner: dict[str, object],
    *,
    sender: Identity = ALICE,
    recipient: Identity = BOB,
    nonce: bytes = bytes(24),
) -> bytes:
    """An envelope from ``sender`` to ``recipient`` around an arbitrary inner map (sealed by hand)."""
    key = nacl.bindings.crypto_box_beforenm(recipient.x25519_public_key, bytes(sender.x25519_private_key))
    box = nacl.bindings.crypto_box_afternm(msgpack.packb(inner, use_bin_type=True), nonce, key)
    outer = {
        "v": 1,
        "id": inner.get("id", bytes(16)),
        "from": sender.peer_id.to_bytes(),
        "to": recipient.peer_id.to_bytes(),
        "nonce": nonce,
        "box": box,
    }
    return _repack(outer)


A = ALICE.peer_id.to_bytes()
B = BOB.peer_id.to_bytes()
C = CAROL.peer_id.to_bytes()


def _inner(**change: object) -> dict[str, object]:
    """A valid inner message from Alice to Bob, with ``change`` applied (a value of None removes the field)."""
    inner: dict[str, object] = {"v": 2, "id": bytes(16), "from": A, "to": B, "ts": 1, "kind": "text", "text": "x"}
    inner.update(change)
    return {key: value for key, value in inner.items() if value is not None}


def test_hand_sealed_inner_message_opens() -> None:
    """The helper below makes envelopes Bob accepts: the refusals that follow are due to the change alone."""
    message = EnvelopeSealer(BOB).open(_raw_envelope(_inner(text="by hand")))
    assert (message.sender, message.recipient, message.text) == (ALICE.peer_id, BOB.peer_id, "by hand")


@pytest.mark.parametrize(
    ("inner", "field"),
    [
        (_inner(kind="file"), "message.kind"),
        (_inner(v=1), "message.v"),
        (_inner(v=3), "message.v"),
        # A version-1 inner message (no from/to), as sealed before the direction binding: refused by its version.
        ({"v": 1, "id": bytes(16), "ts": 1, "kind": "text", "text": "x"}, "message.v"),
        (_inner(ts=-1), "message.ts"),
        (_inner(text=b"x"), "message.text"),
        (_inner(text=None), "message.text"),
        (_inner(extra=1), "message.extra"),
        (_inner(**{"from": None}), "message.from"),
        (_inner(to=None), "message.to"),
        (_inner(**{"from": A[:-1]}), "message.from"),
        (_inner(to=B + b"\x00"), "message.to"),
        (_inner(to=str(BOB.peer_id)), "message.to"),
    ],
)
def test_bad_inner_message_is_refused_naming_the_field(inner: dict[str, object], field: str) -> None:
    with pytest.raises(ChatEnvelopeError) as info:
        EnvelopeSealer(BOB).open(_raw_envelope(inner))
    assert info.value.field == field
    assert isinstance(info.value, RemoteProtocolError)
    assert not isinstance(info.value, DirectionMismatchError)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"from": B, "to": A}, "message.from"),  # sealed as the reverse direction
        ({"from": C}, "message.from"),  # claims a third party sealed it
        ({"to": C}, "message.to"),  # sealed for someone else (a box Alice shares with Bob, inner says Carol)
        ({"from": A, "to": A}, "message.to"),
    ],
)
def test_inner_direction_must_match_the_envelope(change: dict[str, object], field: str) -> None:
    with pytest.raises(DirectionMismatchError) as info:
        EnvelopeSealer(BOB).open(_raw_envelope(_inner(**change)))
    assert info.value.field == field


def test_direction_is_checked_after_the_id() -> None:
    """The checks run in the documented order: a box wrong in both id and direction is refused by its id."""
    fields = _inner(**{"id": bytes([1]) * 16, "from": B, "to": A})
    raw = _outer(_raw_envelope(fields))
    raw["id"] = bytes(16)
    with pytest.raises(MessageIdMismatchError):
        EnvelopeSealer(BOB).open(_repack(raw))


def _good_outer() -> dict[str, object]:
    return _outer(EnvelopeSealer(ALICE).seal(BOB.peer_id, "x", ts=1).raw)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"v": 2}, "envelope.v"),
        ({"id": bytes(15)}, "envelope.id"),
        ({"nonce": bytes(23)}, "envelope.nonce"),
        ({"box": b""}, "envelope.box"),
        ({"from": b"\x00\x24" + bytes(36)}, "envelope.from"),
        ({"to": "12D3KooW"}, "envelope.to"),
        ({"extra": True}, "envelope.extra"),
    ],
)
def test_bad_outer_envelope_is_refused_naming_the_field(change: dict[str, object], field: str) -> None:
    fields = {**_good_outer(), **change}
    with pytest.raises(ChatEnvelopeError) as info:
        decode_envelope(_repack(fields))
    assert info.value.field == field


def test_sender_key_without_x25519_equivalent_is_refused() -> None:
    fields = _good_outer()
    fields["from"] = PeerId.from_public_key(b"\xff" * 32).to_bytes()
    with pytest.raises(ChatEnvelopeError) as info:
        EnvelopeSealer(BOB).open(_repack(fields))
    assert info.value.field == "envelope.from"
    assert not isinstance(info.value, DecryptionError)


def test_text_limits() -> None:
    sealer = EnvelopeSealer(ALICE)
    longest = sealer.seal(BOB.peer_id, "é" * (MAX_TEXT_BYTES // 2), ts=2**63 - 1)  # the longest inner map
    assert EnvelopeSealer(BOB).open(longest).text == "é" * (MAX_TEXT_BYTES // 2)
    # The largest possible envelope fits its limits, and MAX_ENVELOPE_SIZE kept the value of the session limits.
    assert len(longest.box) == MAX_TEXT_BYTES + 145 + 16 <= MAX_BOX_SIZE
    assert len(longest.raw) == len(longest.box) + 154 <= MAX_ENVELOPE_SIZE == 65872
    with pytest.raises(LocalProtocolError):
        sealer.seal(BOB.peer_id, "a" * (MAX_TEXT_BYTES + 1), ts=1)
    with pytest.raises(LocalProtocolError):
        sealer.seal(BOB.peer_id, "x", ts=-5)


def test_shared_keys_are_cached_and_bounded() -> None:
    bob = EnvelopeSealer(BOB, cache_size=2)
    for _ in range(5):
        bob.open(EnvelopeSealer(ALICE).seal(BOB.peer_id, "a", ts=1))
    assert bob.key_computations == 1
    bob.open(EnvelopeSealer(CAROL).seal(BOB.peer_id, "c", ts=1))
    assert bob.key_computations == 2
    dave = Identity.from_seed(bytes(range(3, 35)))
    bob.open(EnvelopeSealer(dave).seal(BOB.peer_id, "d", ts=1))  # evicts Alice, the least recently used
    bob.open(EnvelopeSealer(CAROL).seal(BOB.peer_id, "c", ts=1))
    assert bob.key_computations == 3
    bob.open(EnvelopeSealer(ALICE).seal(BOB.peer_id, "a", ts=1))
    assert bob.key_computations == 4
    with pytest.raises(LocalProtocolError):
        EnvelopeSealer(BOB, cache_size=0)


def test_receipt_round_trip_and_limits() -> None:
    ids = [bytes([i]) * 16 for i in range(3)]
    data = encode_receipt(ids)
    assert msgpack.unpackb(data, raw=False) == {"v": 1, "t": "ack", "ids": ids}
    assert decode_receipt(data) == tuple(ids)
    assert len(decode_receipt(encode_receipt([bytes(16)] * MAX_ACK_IDS))) == MAX_ACK_IDS
    with pytest.raises(LocalProtocolError):
        encode_receipt([])
    with pytest.raises(LocalProtocolError):
        encode_receipt([bytes(16)] * (MAX_ACK_IDS + 1))
    with pytest.raises(LocalProtocolError):
        encode_receipt([bytes(8)])
    bad = msgpack.packb({"v": 1, "t": "ack", "ids": [bytes(16), b"short"]}, use_bin_type=True)
    with pytest.raises(ChatEnvelopeError) as info:
        decode_receipt(bad)
    assert info.value.field == "ack.ids[1]"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_only_raise_envelope_errors(data: bytes) -> None:
    with pytest.raises(ChatEnvelopeError):
        decode_envelope(data)
    with pytest.raises(ChatEnvelopeError):
        EnvelopeSealer(BOB).open(data)
    with pytest.raises(ChatEnvelopeError):
        decode_receipt(data)


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)), max_size=300), st.integers(min_value=0, max_value=2**63 - 1))
def test_any_text_round_trips(text: str, ts: int) -> None:
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, text, ts=ts)
    message = EnvelopeSealer(BOB).open(decode_envelope(sealed.raw))
    assert (message.text, message.ts) == (text, ts)


# The fast paths (sealing from constant pieces, decoding and opening at fixed offsets) must agree byte for byte with
# the schemas, and anything laid out differently must still go through the schemas.

_EDGE_SIZES = (0, 1, 31, 32, 255, 256, 1024, 65535, MAX_TEXT_BYTES)
_EDGE_TS = (0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1)


@pytest.mark.parametrize(("size", "ts"), list(zip(_EDGE_SIZES, itertools.cycle(_EDGE_TS))) + [(3, t) for t in _EDGE_TS])
def test_fast_sealing_matches_the_schemas_byte_for_byte(size: int, ts: int) -> None:
    text = "y" * size
    sealed = EnvelopeSealer(ALICE, random=_counter_random()).seal(BOB.peer_id, text, ts=ts)  # type: ignore[arg-type]
    key = nacl.bindings.crypto_box_beforenm(BOB.x25519_public_key, bytes(ALICE.x25519_private_key))
    inner = nacl.bindings.crypto_box_open_afternm(sealed.box, sealed.nonce, key)
    expected_inner = {"v": 2, "id": sealed.id, "from": A, "to": B, "ts": ts, "kind": "text", "text": text}
    assert inner == MESSAGE_SCHEMA.encode(expected_inner, max_size=MAX_BOX_SIZE)
    outer = {"v": 1, "id": sealed.id, "from": A, "to": B, "nonce": sealed.nonce, "box": sealed.box}
    assert sealed.raw == ENVELOPE_SCHEMA.encode(outer, max_size=MAX_ENVELOPE_SIZE)
    assert EnvelopeSealer(BOB).open(sealed.raw).text == text


def test_fast_sealing_leaves_bad_values_to_the_schema() -> None:
    sealer = EnvelopeSealer(ALICE)
    with pytest.raises(LocalProtocolError, match="ts"):
        sealer.seal(BOB.peer_id, "x", ts=-1)
    with pytest.raises(LocalProtocolError, match="ts"):
        sealer.seal(BOB.peer_id, "x", ts=True)
    with pytest.raises(LocalProtocolError, match="surrogate"):
        sealer.seal(BOB.peer_id, "bad \ud800", ts=1)
    with pytest.raises(LocalProtocolError, match="text"):
        sealer.seal(BOB.peer_id, "é" * (MAX_TEXT_BYTES // 2 + 1), ts=1)


def _non_canonical_envelope() -> tuple[bytes, bytes]:
    """(canonical, the same envelope with its box behind a bin32 header and the keys in another order)."""
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "same", ts=5)
    fields = _outer(sealed.raw)
    reordered = {key: fields[key] for key in ("box", "nonce", "to", "from", "id", "v")}
    assert _repack(reordered) != sealed.raw
    bin32 = sealed.raw[: -len(sealed.box) - 2] + b"\xc6" + len(sealed.box).to_bytes(4, "big") + sealed.box
    assert sealed.raw[-len(sealed.box) - 2] == 0xC4
    return sealed.raw, bin32 if len(sealed.box) < 256 else _repack(reordered)


def test_fast_and_schema_decoding_agree() -> None:
    canonical, other = _non_canonical_envelope()
    fast, slow = decode_envelope(canonical), decode_envelope(other)
    assert (fast.id, fast.sender, fast.recipient, fast.nonce, fast.box) == (
        slow.id,
        slow.sender,
        slow.recipient,
        slow.nonce,
        slow.box,
    )
    assert EnvelopeSealer(BOB).open(other) == EnvelopeSealer(BOB).open(canonical)


@pytest.mark.parametrize(
    "inner_bytes",
    [
        # ts as int64 (not the shortest form) and text as str16: valid msgpack the fast path does not match
        b"\x87\xa1v\x02\xa2id\xc4\x10"
        + bytes(16)
        + b"\xa4from\xc4\x26"
        + A
        + b"\xa2to\xc4\x26"
        + B
        + b"\xa2ts\xd3"
        + (7).to_bytes(8, "big")
        + b"\xa4kind\xa4text\xa4text\xda\x00\x02ok",
        # the same fields in another order
        msgpack.packb({"text": "ok", "kind": "text", "ts": 7, "to": B, "from": A, "id": bytes(16), "v": 2}),
    ],
)
def test_non_canonical_inner_messages_open_through_the_schema(inner_bytes: bytes) -> None:
    key = nacl.bindings.crypto_box_beforenm(BOB.x25519_public_key, bytes(ALICE.x25519_private_key))
    box = nacl.bindings.crypto_box_afternm(inner_bytes, bytes(24), key)
    raw = _repack({"v": 1, "id": bytes(16), "from": A, "to": B, "nonce": bytes(24), "box": box})
    message = EnvelopeSealer(BOB).open(raw)
    assert (message.ts, message.text, message.sender) == (7, "ok", ALICE.peer_id)


def test_fast_path_refusals_name_the_same_fields() -> None:
    """A canonical layout with an invalid sender id, or a truncated box, is refused as before."""
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "x", ts=1)
    bad_from = sealed.raw.replace(A, b"\xff" * len(A), 1)
    with pytest.raises(ChatEnvelopeError) as info:
        decode_envelope(bad_from)
    assert info.value.field == "envelope.from"
    with pytest.raises(ChatEnvelopeError):
        decode_envelope(sealed.raw[:-1])
    # A canonical inner layout whose text is not UTF-8: the fast path declines, the schema names the field.
    inner = msgpack.packb(_inner(text="x"), use_bin_type=True)
    assert inner.endswith(b"\xa4text\xa1x")
    key = nacl.bindings.crypto_box_beforenm(BOB.x25519_public_key, bytes(ALICE.x25519_private_key))
    box = nacl.bindings.crypto_box_afternm(inner[:-1] + b"\xff", bytes(24), key)
    raw = _repack({"v": 1, "id": bytes(16), "from": A, "to": B, "nonce": bytes(24), "box": box})
    with pytest.raises(ChatEnvelopeError) as info:
        EnvelopeSealer(BOB).open(raw)
    assert info.value.field.startswith("message")


def _stream_random(seed: int = 7) -> Callable[[int], bytes]:
    """A deterministic random source that hands out one byte stream, however the draws are split."""
    stream = bytes((seed + 31 * i) % 256 for i in range(1 << 16))
    position = 0

    def random(n: int) -> bytes:
        nonlocal position
        position += n
        return stream[position - n : position]

    return random


def test_seal_many_is_seal_byte_for_byte_from_one_draw() -> None:
    texts = ["a", "é" * 300, "y" * 1024, "z" * MAX_TEXT_BYTES]
    ts = 1_700_000_123_456
    many = EnvelopeSealer(ALICE, random=_stream_random()).seal_many(BOB.peer_id, texts, ts=ts)
    single = EnvelopeSealer(ALICE, random=_stream_random())
    expected = [single.seal(BOB.peer_id, text, ts=ts) for text in texts]
    assert many == [(sealed.id, sealed.raw) for sealed in expected]
    opener = EnvelopeSealer(BOB)
    assert [opener.open(raw).text for _, raw in many] == texts
    assert all(mid[:4] == (ts // 60_000).to_bytes(4, "big") for mid, _ in many)
    draws: list[int] = []
    counting = _stream_random()
    EnvelopeSealer(ALICE, random=lambda n: (draws.append(n), counting(n))[1]).seal_many(BOB.peer_id, texts, ts=ts)
    assert draws == [36 * len(texts)]  # one draw of 12 id bytes + 24 nonce bytes per text


def test_seal_many_refuses_what_seal_refuses() -> None:
    sealer = EnvelopeSealer(ALICE)
    with pytest.raises(LocalProtocolError):
        sealer.seal_many(BOB.peer_id, ["fine", "x" * (MAX_TEXT_BYTES + 1)], ts=1)
    with pytest.raises(LocalProtocolError, match="ts"):
        sealer.seal_many(BOB.peer_id, ["fine"], ts=-1)
    with pytest.raises(LocalProtocolError, match="random source"):
        EnvelopeSealer(ALICE, random=lambda n: bytes(n - 1)).seal_many(BOB.peer_id, ["x"], ts=1)
    assert sealer.seal_many(BOB.peer_id, [], ts=1) == []


def test_open_many_is_open_for_each_envelope() -> None:
    """A batch mixing good envelopes from two senders with every kind of refusal: open_many gives, in order, what
    open gives (the opened fields) or raises (the same error type, field and reason)."""
    good = [EnvelopeSealer(ALICE).seal(BOB.peer_id, f"from alice {i}", ts=10 + i) for i in range(3)]
    from_carol = EnvelopeSealer(CAROL).seal(BOB.peer_id, "from carol", ts=20)
    not_for_bob = EnvelopeSealer(ALICE).seal(CAROL.peer_id, "for carol", ts=30)
    fields = _outer(good[0].raw)
    box = bytearray(fields["box"])  # type: ignore[arg-type]
    box[0] ^= 1
    fields["box"] = bytes(box)
    tampered = decode_envelope(_repack(fields))
    reflected_fields = _outer(EnvelopeSealer(BOB).seal(ALICE.peer_id, "bob's own words", ts=40).raw)
    reflected_fields["from"], reflected_fields["to"] = reflected_fields["to"], reflected_fields["from"]
    reflected = decode_envelope(_repack(reflected_fields))  # opens under the pair's key, refused by direction
    batch = [good[0], tampered, good[1], from_carol, not_for_bob, reflected, good[2]]
    bob = EnvelopeSealer(BOB)
    opened, refused = bob.open_many(batch)
    expected_opened = []
    expected_refused = []
    for sealed in batch:
        try:
            message = EnvelopeSealer(BOB).open(sealed)
        except ChatEnvelopeError as exc:
            expected_refused.append((sealed, type(exc), exc.field, exc.reason))
        else:
            expected_opened.append((message.id, message.ts, message.text))
    assert [tuple(m) for m in opened] == expected_opened
    assert [(s, type(e), e.field, e.reason) for s, e in refused] == expected_refused
    assert [m.text for m in opened] == ["from alice 0", "from alice 1", "from carol", "from alice 2"]
    assert [type(e) for _, e in refused] == [DecryptionError, WrongRecipientError, DirectionMismatchError]
    assert [s for s, _ in refused] == [tampered, not_for_bob, reflected]

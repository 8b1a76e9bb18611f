"""Envelope v1 (inner message v2): one chat message, end-to-end encrypted from sender to recipient; receipts.

Theory of operation
-------------------
A message travels as a self-contained *sealed envelope* (a msgpack map)::

    Envelope {v: 1, id: bin[16], from: bin[38], to: bin[38], nonce: bin[24], box: bin[16..]}

``id`` is unique per message: a sender makes it from the minute the message was written and 12 random bytes
(:func:`new_message_id`), so that the stores' id indexes grow at one edge; a reader takes any 16 bytes.

``from`` and ``to`` are binary peer ids; ``box`` is ``crypto_box`` (X25519 + XSalsa20-Poly1305) of the *inner*
message from the sender's X25519 key to the recipient's (both converted from the Ed25519 identity keys), under the
random 24-byte ``nonce``::

    Message {v: 2, id: bin[16], from: bin[38], to: bin[38], ts: int (ms, see below), kind: "text", text: str}

``ts`` is when the message was written, in Unix ms: the sender's clock, or a little later so that it sorts after
what it answers (see :mod:`p2pmsg.chat.service`, "Timestamps"; protocol section 6.4).

The inner map repeats the message ``id``, ``from`` and ``to``; the recipient checks that each equals the outer one.
The id binding stops anyone on the path from re-labelling a genuine box with another id (which would defeat
deduplication and receipts).  The direction binding is needed because ``crypto_box`` is symmetric per pair: Alice
and Bob share one key, so a box Alice made for Bob also opens at Alice if the outer ``from`` and ``to`` are swapped;
without the inner ``from``/``to`` such a reflected envelope would open at Alice as a message "from Bob" carrying her
own words.  ``crypto_box`` has no associated data, so the outer fields are bound by repeating them in the plaintext.
With both bindings only the sender and the recipient can open the box, only the sender could have made it for that
recipient, so the envelope needs no signature of its own and is authenticated wherever it travels -- carried
directly inside the Noise channel today, left on a mailbox peer and relayed later in a future version (nothing in it
depends on the channel that carried it).

The inner ``v`` is 2 (:data:`MESSAGE_VERSION`): version 1 had no ``from``/``to`` and is refused (``message.v``).  The
outer envelope, the receipt and the session frames keep ``v`` 1 (:data:`ENVELOPE_VERSION`): their bytes did not
change.

Opening an envelope checks, in this order: the outer schema (sizes, types, version), that ``to`` is us, that
``from`` is a valid Ed25519 peer id, the box (authentication), the inner schema, that the ids match, and that the
inner ``from`` and ``to`` match the outer ones.  Every failure raises a :class:`ChatEnvelopeError` subclass (a
:class:`~p2pmsg.errors.RemoteProtocolError`) naming the field and the reason.

Computing a ``crypto_box`` shared key costs an X25519 scalar multiplication, about ten times the cost of the
symmetric part for a 1 KB message; :class:`EnvelopeSealer` keeps the shared keys of recently used peers in a
bounded LRU cache.

A *receipt* ``{v: 1, t: "ack", ids: [bin[16], ...]}`` says "I have stored these messages" (durably, so the sender
may forget them).  It is sent inside the authenticated channel to the message's sender; the sender accepts a receipt
for a message only from that message's recipient.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import nacl.bindings
import nacl.exceptions

from p2pmsg.errors import LocalProtocolError, RemoteProtocolError
from p2pmsg.identity import PEER_ID_SIZE, Identity, InvalidPeerIdError, PeerId
from p2pmsg.wire.codec import Array, Bytes, CodecError, Int, Literal, Str, Struct

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_ACK_IDS",
    "MAX_BOX_SIZE",
    "MAX_ENVELOPE_SIZE",
    "MAX_TEXT_BYTES",
    "MESSAGE_ID_RANDOM_SIZE",
    "MESSAGE_ID_SIZE",
    "MESSAGE_ID_TIME_SIZE",
    "MESSAGE_VERSION",
    "NONCE_SIZE",
    "ChatEnvelopeError",
    "ChatMessage",
    "DecryptionError",
    "DirectionMismatchError",
    "EnvelopeSealer",
    "MessageIdMismatchError",
    "OpenedText",
    "SealedEnvelope",
    "WrongRecipientError",
    "decode_envelope",
    "decode_receipt",
    "encode_receipt",
    "message_id_time_prefix",
    "new_message_id",
]

#: Version of the outer envelope, the receipt (and the session frames of :mod:`p2pmsg.chat.protocol`).
ENVELOPE_VERSION: Final = 1
#: Version of the inner message (inside the box); 2 added ``from`` and ``to``, version 1 is refused.
MESSAGE_VERSION: Final = 2
MESSAGE_ID_SIZE: Final = 16
#: Leading bytes of a fresh message id that hold the minute it was written (see :func:`new_message_id`).
MESSAGE_ID_TIME_SIZE: Final = 4
#: Random bytes after them.
MESSAGE_ID_RANDOM_SIZE: Final = MESSAGE_ID_SIZE - MESSAGE_ID_TIME_SIZE
_MINUTE_MS: Final = 60_000
NONCE_SIZE: Final = nacl.bindings.crypto_box_NONCEBYTES  # 24
BOX_OVERHEAD: Final = 16  # the Poly1305 tag
#: Longest message text, in bytes of UTF-8 (the same limit as the control API's ``send`` and the store).
MAX_TEXT_BYTES: Final = 65536
#: Largest ``box``: the inner map (text plus at most 160 bytes of fields and headers: 145 for the longest text) plus
#: the MAC.
MAX_BOX_SIZE: Final = MAX_TEXT_BYTES + 160 + BOX_OVERHEAD
#: Largest encoded envelope: the box plus the outer fields and headers (at most 154 bytes), rounded up; the same
#: 65 872 bytes as before the inner message gained ``from`` and ``to``, so the session frame limit is unchanged.
MAX_ENVELOPE_SIZE: Final = MAX_BOX_SIZE + 160
#: Most message ids in one receipt.
MAX_ACK_IDS: Final = 1024
#: Sender timestamps are non-negative milliseconds that fit a signed 64-bit integer.
MAX_TIMESTAMP: Final = 2**63 - 1
#: Shared keys kept by default in an :class:`EnvelopeSealer`.
DEFAULT_KEY_CACHE_SIZE: Final = 1024

_MESSAGE_ID: Final = Bytes(MESSAGE_ID_SIZE, min_len=MESSAGE_ID_SIZE)
_PEER_ID_BYTES: Final = Bytes(PEER_ID_SIZE, min_len=PEER_ID_SIZE)

ENVELOPE_SCHEMA: Final = Struct(
    "envelope",
    {
        "v": Literal(ENVELOPE_VERSION),
        "id": _MESSAGE_ID,
        "from": _PEER_ID_BYTES,
        "to": _PEER_ID_BYTES,
        "nonce": Bytes(NONCE_SIZE, min_len=NONCE_SIZE),
        "box": Bytes(MAX_BOX_SIZE, min_len=BOX_OVERHEAD),
    },
)

MESSAGE_SCHEMA: Final = Struct(
    "message",
    {
        "v": Literal(MESSAGE_VERSION),
        "id": _MESSAGE_ID,
        "from": _PEER_ID_BYTES,
        "to": _PEER_ID_BYTES,
        "ts": Int(0, MAX_TIMESTAMP),
        "kind": Literal("text"),
        "text": Str(MAX_TEXT_BYTES),
    },
)

RECEIPT_SCHEMA: Final = Struct(
    "ack",
    {
        "v": Literal(ENVELOPE_VERSION),
        "t": Literal("ack"),
        "ids": Array(_MESSAGE_ID, MAX_ACK_IDS, min_items=1),
    },
)


class ChatEnvelopeError(RemoteProtocolError):
    """A sealed envelope or receipt is invalid.  ``field`` names the part at fault, ``reason`` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class WrongRecipientError(ChatEnvelopeError):
    """The envelope is addressed to another peer."""


class DecryptionError(ChatEnvelopeError):
    """The box does not open: it was not made by ``from`` for us, or it was altered on the way."""


class MessageIdMismatchError(ChatEnvelopeError):
    """The inner message id differs from the outer one (the envelope was re-labelled)."""


class DirectionMismatchError(ChatEnvelopeError):
    """The inner ``from``/``to`` differ from the outer ones (for example a reflected envelope: from and to swapped)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedEnvelope:
    """An envelope whose outer fields have been validated; the box is still closed.

    ``raw`` is the exact encoded envelope (what is stored in the outbox, sent and relayed).
    """

    id: bytes
    sender: PeerId
    recipient: PeerId
    nonce: bytes
    box: bytes
    raw: bytes

    @property
    def id_hex(self) -> str:
        """The message id as 32 lowercase hex characters (the control API's form)."""
        return self.id.hex()


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    """An opened envelope: an authenticated text message from ``sender`` to ``recipient``."""

    id: bytes
    sender: PeerId
    recipient: PeerId
    ts: int
    kind: str
    text: str


class OpenedText(NamedTuple):
    """A text message opened by :meth:`EnvelopeSealer.open_many`: the fields of :class:`ChatMessage` that the
    batch does not share (sender and recipient are the envelope's; the kind is always ``"text"``)."""

    id: bytes
    ts: int
    text: str


def message_id_time_prefix(ts: int) -> bytes:
    """The first :data:`MESSAGE_ID_TIME_SIZE` bytes of a fresh id for a message written at ``ts`` (Unix ms): the
    minute, ``ts // 60000`` modulo 2^32, big-endian.  A value outside the timestamp range gives zeros (sealing then
    refuses the timestamp itself)."""
    if type(ts) is not int or not 0 <= ts <= MAX_TIMESTAMP:
        return bytes(MESSAGE_ID_TIME_SIZE)
    return ((ts // _MINUTE_MS) & 0xFFFFFFFF).to_bytes(MESSAGE_ID_TIME_SIZE, "big")


def new_message_id(ts: int, random: Callable[[int], bytes] = os.urandom) -> bytes:
    """A fresh 16-byte id for a message written at ``ts`` (Unix ms): its minute (:func:`message_id_time_prefix`),
    then 12 random bytes.

    Ids of messages written around the same time share their first bytes, so the stores' unique index on the id
    grows at its right edge, as a sequence number would, instead of at random places: with random ids every commit of
    a burst rewrote about one index page per message once the index outgrew the cache.  96 random bits keep ids
    unique; the price is that the id tells the minute the message was written to whoever sees the envelope (the
    recipient, who reads the exact time inside anyway, and later a mailbox peer).
    """
    return message_id_time_prefix(ts) + random(MESSAGE_ID_RANDOM_SIZE)


def _codec_error(exc: CodecError) -> ChatEnvelopeError:
    return ChatEnvelopeError(exc.field, exc.reason)


_PEER_IDS: dict[bytes, PeerId] = {}
_PEER_ID_CACHE_SIZE: Final = 1024


def _peer_id(raw: bytes) -> PeerId:
    """``PeerId.from_bytes`` with a bounded cache: a session's envelopes carry the same two ids every time."""
    peer = _PEER_IDS.get(raw)
    if peer is None:
        peer = PeerId.from_bytes(raw)  # raises on bad bytes: only valid ids are cached
        if len(_PEER_IDS) >= _PEER_ID_CACHE_SIZE:
            _PEER_IDS.clear()
        _PEER_IDS[raw] = peer
    return peer


def _describe_peer(raw: bytes) -> str:
    """A peer id from inside a box, for an error message (base58 text if valid, else hex)."""
    try:
        return str(_peer_id(raw))
    except InvalidPeerIdError:
        return f"invalid peer id {raw.hex()}"


# The canonical msgpack of both maps, as the schemas encode them (fields in schema order, shortest headers): the
# fixed pieces between the variable fields.  Sealing writes these directly; decoding and opening first try to match
# them at fixed offsets (one pass, no generic decode) and fall back to the schema for anything else, so the fast
# paths accept exactly a subset of what the schemas accept and return the same values (tests/unit/chat check both).
_OUTER_HEAD: Final = b"\x86\xa1v\x01\xa2id\xc4\x10"  # {6 fields, "v": 1, "id": bin8[16] ...
_INNER_HEAD: Final = b"\x87\xa1v\x02\xa2id\xc4\x10"  # {7 fields, "v": 2, "id": bin8[16] ...
_FROM_KEY: Final = b"\xa4from\xc4\x26"  # "from": bin8[38]
_TO_KEY: Final = b"\xa2to\xc4\x26"  # "to": bin8[38]
_NONCE_KEY: Final = b"\xa5nonce\xc4\x18"  # "nonce": bin8[24]
_BOX_KEY: Final = b"\xa3box"  # "box": then a bin header
_TS_KEY: Final = b"\xa2ts"  # "ts": then a uint
_KIND_TEXT: Final = b"\xa4kind\xa4text\xa4text"  # "kind": "text", "text": then a str header
_ID_AT: Final = len(_OUTER_HEAD)
_FROM_AT: Final = _ID_AT + MESSAGE_ID_SIZE + len(_FROM_KEY)
_TO_AT: Final = _FROM_AT + PEER_ID_SIZE + len(_TO_KEY)
_NONCE_AT: Final = _TO_AT + PEER_ID_SIZE + len(_NONCE_KEY)
_BOX_HEADER_AT: Final = _NONCE_AT + NONCE_SIZE + len(_BOX_KEY)


def _uint(value: int) -> bytes:
    """The shortest msgpack encoding of 0 <= value < 2**64."""
    if value < 0x80:
        return bytes((value,))
    if value < 0x100:
        return b"\xcc" + value.to_bytes(1, "big")
    if value < 0x10000:
        return b"\xcd" + value.to_bytes(2, "big")
    if value < 0x100000000:
        return b"\xce" + value.to_bytes(4, "big")
    return b"\xcf" + value.to_bytes(8, "big")


def _str_header(size: int) -> bytes:
    if size < 32:
        return bytes((0xA0 | size,))
    if size < 0x100:
        return b"\xd9" + size.to_bytes(1, "big")
    if size < 0x10000:
        return b"\xda" + size.to_bytes(2, "big")
    return b"\xdb" + size.to_bytes(4, "big")


def _bin_header(size: int) -> bytes:
    if size < 0x100:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


_LENGTH_WIDTHS: Final = {base: {base: 1, base + 1: 2, base + 2: 4} for base in (0xC4, 0xD9)}
"""Bytes of length after the tag of msgpack's bin 8/16/32 (tags from 0xC4) and str 8/16/32 (from 0xD9) forms."""
_UINT_WIDTHS: Final = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def _read_len(data: bytes, pos: int, short: int, width8: int) -> tuple[int, int] | None:
    """Read a msgpack length header at *pos*: a fix form (``short`` = its mask base, or -1 for none) or the
    8/16/32-bit forms starting at byte *width8* (0xC4 or 0xD9); return ``(length, position after the header)`` or
    ``None``."""
    if pos >= len(data):
        return None
    tag = data[pos]
    if short >= 0 and short <= tag < short + 32:
        return tag - short, pos + 1
    width = _LENGTH_WIDTHS[width8].get(tag)
    if width is None or pos + 1 + width > len(data):
        return None
    return int.from_bytes(data[pos + 1 : pos + 1 + width], "big"), pos + 1 + width


def _read_uint(data: bytes, pos: int) -> tuple[int, int] | None:
    if pos >= len(data):
        return None
    tag = data[pos]
    if tag < 0x80:
        return tag, pos + 1
    width = _UINT_WIDTHS.get(tag)
    if width is None or pos + 1 + width > len(data):
        return None
    return int.from_bytes(data[pos + 1 : pos + 1 + width], "big"), pos + 1 + width


def _fast_envelope(raw: bytes) -> SealedEnvelope | None:
    """Decode a canonically encoded envelope at fixed offsets; ``None`` if *raw* is not laid out that way."""
    if (
        len(raw) > MAX_ENVELOPE_SIZE
        or not raw.startswith(_OUTER_HEAD)
        or not raw.startswith(_FROM_KEY, _FROM_AT - len(_FROM_KEY))
        or not raw.startswith(_TO_KEY, _TO_AT - len(_TO_KEY))
        or not raw.startswith(_NONCE_KEY, _NONCE_AT - len(_NONCE_KEY))
        or not raw.startswith(_BOX_KEY, _BOX_HEADER_AT - len(_BOX_KEY))
    ):
        return None
    found = _read_len(raw, _BOX_HEADER_AT, -1, 0xC4)
    if found is None:
        return None
    size, start = found
    if start + size != len(raw) or not BOX_OVERHEAD <= size <= MAX_BOX_SIZE:
        return None
    try:
        sender = _peer_id(raw[_FROM_AT : _FROM_AT + PEER_ID_SIZE])
    except InvalidPeerIdError as exc:
        raise ChatEnvelopeError("envelope.from", str(exc)) from None
    try:
        recipient = _peer_id(raw[_TO_AT : _TO_AT + PEER_ID_SIZE])
    except InvalidPeerIdError as exc:
        raise ChatEnvelopeError("envelope.to", str(exc)) from None
    return SealedEnvelope(
        id=raw[_ID_AT : _ID_AT + MESSAGE_ID_SIZE],
        sender=sender,
        recipient=recipient,
        nonce=raw[_NONCE_AT : _NONCE_AT + NONCE_SIZE],
        box=raw[start:],
        raw=raw,
    )


def _fast_inner(inner: bytes, head: bytes) -> tuple[int, str] | None:
    """``(ts, text)`` of a canonically encoded inner message that starts with *head* (its v, id, from, to and the
    "ts" key, all as expected); ``None`` if it is laid out any other way."""
    if not inner.startswith(head):
        return None
    found = _read_uint(inner, len(head))
    if found is None:
        return None
    ts, pos = found
    if ts > MAX_TIMESTAMP or not inner.startswith(_KIND_TEXT, pos):
        return None
    found = _read_len(inner, pos + len(_KIND_TEXT), 0xA0, 0xD9)
    if found is None:
        return None
    size, pos = found
    if pos + size != len(inner) or size > MAX_TEXT_BYTES:
        return None
    try:
        return ts, inner[pos:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def decode_envelope(data: bytes | bytearray | memoryview) -> SealedEnvelope:
    """Validate the outer fields of an encoded envelope (the box stays closed); :class:`ChatEnvelopeError` if bad."""
    raw = bytes(data)
    fast = _fast_envelope(raw)
    if fast is not None:
        return fast
    try:
        fields = ENVELOPE_SCHEMA.decode(raw, max_size=MAX_ENVELOPE_SIZE)
    except CodecError as exc:
        raise _codec_error(exc) from None
    try:
        sender = _peer_id(fields["from"])
    except InvalidPeerIdError as exc:
        raise ChatEnvelopeError("envelope.from", str(exc)) from None
    try:
        recipient = _peer_id(fields["to"])
    except InvalidPeerIdError as exc:
        raise ChatEnvelopeError("envelope.to", str(exc)) from None
    return SealedEnvelope(
        id=fields["id"], sender=sender, recipient=recipient, nonce=fields["nonce"], box=fields["box"], raw=raw
    )


def encode_receipt(ids: Iterable[bytes]) -> bytes:
    """Encode a receipt for 1..:data:`MAX_ACK_IDS` message ids (a :class:`LocalProtocolError` otherwise)."""
    return RECEIPT_SCHEMA.encode({"v": ENVELOPE_VERSION, "t": "ack", "ids": list(ids)})


def decode_receipt(data: bytes | bytearray | memoryview) -> tuple[bytes, ...]:
    """Decode a receipt and return its message ids; :class:`ChatEnvelopeError` if it is malformed."""
    try:
        fields = RECEIPT_SCHEMA.decode(data)
    except CodecError as exc:
        raise _codec_error(exc) from None
    return tuple(fields["ids"])


def _fast_seal_inner(mid: bytes, sender_raw: bytes, recipient_raw: bytes, ts: object, text: object) -> bytes | None:
    """The inner message built from the constant pieces, byte for byte what ``MESSAGE_SCHEMA.encode`` writes; ``None``
    when a value is outside the schema (the caller then lets the schema raise its precise error)."""
    if (
        type(ts) is not int
        or not 0 <= ts <= MAX_TIMESTAMP
        or type(text) is not str
        or len(mid) != MESSAGE_ID_SIZE
        or len(sender_raw) != PEER_ID_SIZE
        or len(recipient_raw) != PEER_ID_SIZE
    ):
        return None
    try:
        body = text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    if len(body) > MAX_TEXT_BYTES:
        return None
    return b"".join(
        (
            _INNER_HEAD,
            mid,
            _FROM_KEY,
            sender_raw,
            _TO_KEY,
            recipient_raw,
            _TS_KEY,
            _uint(ts),
            _KIND_TEXT,
            _str_header(len(body)),
            body,
        )
    )


def _fast_outer(mid: bytes, sender_raw: bytes, recipient_raw: bytes, box_nonce: bytes, box: bytes) -> bytes:
    """The outer envelope built from the constant pieces, byte for byte what ``ENVELOPE_SCHEMA.encode`` writes for
    fields that passed :func:`_fast_seal_inner`'s checks."""
    return b"".join(
        (
            _OUTER_HEAD,
            mid,
            _FROM_KEY,
            sender_raw,
            _TO_KEY,
            recipient_raw,
            _NONCE_KEY,
            box_nonce,
            _BOX_KEY,
            _bin_header(len(box)),
            box,
        )
    )


class EnvelopeSealer:
    """Seals and opens envelopes for one identity, caching ``crypto_box`` shared keys per peer (LRU, bounded)."""

    def __init__(
        self,
        identity: Identity,
        *,
        cache_size: int = DEFAULT_KEY_CACHE_SIZE,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """``random(n)`` supplies message ids and nonces (inject a deterministic one for known-answer tests)."""
        if cache_size < 1:
            raise LocalProtocolError(f"cache_size must be at least 1, got {cache_size}")
        self._identity = identity
        self._own_secret = bytes(identity.x25519_private_key)
        self._cache_size = cache_size
        self._random = random
        self._keys: collections.OrderedDict[PeerId, bytes] = collections.OrderedDict()
        self.key_computations = 0
        """How many shared keys were computed (cache misses); for tests and statistics."""

    @property
    def peer_id(self) -> PeerId:
        """The identity envelopes are sealed from and opened for."""
        return self._identity.peer_id

    def _shared_key(self, peer: PeerId, field: str) -> bytes:
        key = self._keys.get(peer)
        if key is not None:
            self._keys.move_to_end(peer)
            return key
        try:
            public = peer.x25519_public_key
        except InvalidPeerIdError as exc:
            raise ChatEnvelopeError(field, str(exc)) from None
        try:
            key = nacl.bindings.crypto_box_beforenm(public, self._own_secret)
        except nacl.exceptions.CryptoError as exc:  # a low-order point: the shared secret would be all zeros
            raise ChatEnvelopeError(field, f"the peer's X25519 key is unusable ({exc})") from None
        self.key_computations += 1
        self._keys[peer] = key
        if len(self._keys) > self._cache_size:
            self._keys.popitem(last=False)
        return key

    def seal(
        self,
        recipient: PeerId,
        text: str,
        *,
        ts: int,
        message_id: bytes | None = None,
        nonce: bytes | None = None,
    ) -> SealedEnvelope:
        """Seal a text message to ``recipient`` with sender timestamp ``ts`` (ms).

        ``message_id`` defaults to a fresh id (:func:`new_message_id`) and ``nonce`` to a fresh random value.  The
        chat service passes ``message_id`` when it seals a stored message again for another attempt (the store keeps
        the text, not the envelope); pass ``nonce`` only for known-answer tests (a nonce must never be reused with
        the same pair of keys).  Raises :class:`LocalProtocolError` (for example
        :class:`~p2pmsg.wire.codec.CodecEncodeError` for a text over :data:`MAX_TEXT_BYTES`).
        """
        if message_id is None and nonce is None:  # one call to the system's RNG for both
            fresh = self._random(MESSAGE_ID_RANDOM_SIZE + NONCE_SIZE)
            mid = message_id_time_prefix(ts) + fresh[:MESSAGE_ID_RANDOM_SIZE]
            box_nonce = fresh[MESSAGE_ID_RANDOM_SIZE:]
        else:
            mid = new_message_id(ts, self._random) if message_id is None else bytes(message_id)
            box_nonce = self._random(NONCE_SIZE) if nonce is None else bytes(nonce)
        if len(box_nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes, got {len(box_nonce)}")
        sender_raw = self._identity.peer_id.to_bytes()
        recipient_raw = recipient.to_bytes()
        fast = _fast_seal_inner(mid, sender_raw, recipient_raw, ts, text)
        if fast is not None:
            try:
                key = self._shared_key(recipient, "recipient")
            except ChatEnvelopeError as exc:
                raise LocalProtocolError(f"cannot seal to {recipient}: {exc}") from None
            box = nacl.bindings.crypto_box_afternm(fast, box_nonce, key)
            raw = _fast_outer(mid, sender_raw, recipient_raw, box_nonce, box)
            return SealedEnvelope(
                id=mid, sender=self._identity.peer_id, recipient=recipient, nonce=box_nonce, box=box, raw=raw
            )
        inner = MESSAGE_SCHEMA.encode(
            {
                "v": MESSAGE_VERSION,
                "id": mid,
                "from": sender_raw,
                "to": recipient_raw,
                "ts": ts,
                "kind": "text",
                "text": text,
            }
        )
        try:
            key = self._shared_key(recipient, "recipient")
        except ChatEnvelopeError as exc:
            raise LocalProtocolError(f"cannot seal to {recipient}: {exc}") from None
        box = nacl.bindings.crypto_box_afternm(inner, box_nonce, key)
        outer: dict[str, Any] = {
            "v": ENVELOPE_VERSION,
            "id": mid,
            "from": sender_raw,
            "to": recipient_raw,
            "nonce": box_nonce,
            "box": box,
        }
        raw = ENVELOPE_SCHEMA.encode(outer, max_size=MAX_ENVELOPE_SIZE)
        return SealedEnvelope(
            id=mid, sender=self._identity.peer_id, recipient=recipient, nonce=box_nonce, box=box, raw=raw
        )

    def seal_many(self, recipient: PeerId, texts: Sequence[str], *, ts: int) -> list[tuple[bytes, bytes]]:
        """Seal several texts to ``recipient``, all with timestamp ``ts``; return ``(message id, encoded envelope)``
        per text, in order: what :meth:`seal` gives as ``.id`` and ``.raw``, byte for byte, from one draw of the
        random source for all ids and nonces and without an object per message (the path of a burst of sends).
        Raises as :meth:`seal` does, for the first text that cannot be sealed."""
        count = len(texts)
        step = MESSAGE_ID_RANDOM_SIZE + NONCE_SIZE
        fresh = self._random(step * count)
        if len(fresh) != step * count:
            raise LocalProtocolError(f"the random source gave {len(fresh)} bytes, not {step * count}")
        prefix = message_id_time_prefix(ts)
        sender_raw = self._identity.peer_id.to_bytes()
        recipient_raw = recipient.to_bytes()
        key: bytes | None = None
        box_of = nacl.bindings.crypto_box_afternm
        out: list[tuple[bytes, bytes]] = []
        for index, text in enumerate(texts):
            at = index * step
            mid = prefix + fresh[at : at + MESSAGE_ID_RANDOM_SIZE]
            box_nonce = fresh[at + MESSAGE_ID_RANDOM_SIZE : at + step]
            inner = _fast_seal_inner(mid, sender_raw, recipient_raw, ts, text)
            if inner is None:  # outside the fast path's shape: seal() raises (or seals) with the schemas
                sealed = self.seal(recipient, text, ts=ts, message_id=mid, nonce=box_nonce)
                out.append((sealed.id, sealed.raw))
                continue
            if key is None:
                try:
                    key = self._shared_key(recipient, "recipient")
                except ChatEnvelopeError as exc:
                    raise LocalProtocolError(f"cannot seal to {recipient}: {exc}") from None
            out.append((mid, _fast_outer(mid, sender_raw, recipient_raw, box_nonce, box_of(inner, box_nonce, key))))
        return out

    def open(self, envelope: SealedEnvelope | bytes) -> ChatMessage:
        """Open an envelope addressed to us; raise a :class:`ChatEnvelopeError` subclass saying why it is refused."""
        sealed = decode_envelope(envelope) if isinstance(envelope, bytes | bytearray | memoryview) else envelope
        self._check_recipient(sealed)
        ts, kind, text = self._open(sealed, self._shared_key(sealed.sender, "envelope.from"))
        return ChatMessage(id=sealed.id, sender=sealed.sender, recipient=sealed.recipient, ts=ts, kind=kind, text=text)

    def open_many(
        self, envelopes: Iterable[SealedEnvelope]
    ) -> tuple[list[OpenedText], list[tuple[SealedEnvelope, ChatEnvelopeError]]]:
        """Open several envelopes: what :meth:`open` does for each, without an object per message beyond a tuple
        (the path of a received batch).  Return the messages that opened, as :class:`OpenedText`, in order, and the
        refused envelopes with the error :meth:`open` would have raised."""
        opened: list[OpenedText] = []
        refused: list[tuple[SealedEnvelope, ChatEnvelopeError]] = []
        sender: PeerId | None = None
        key = b""
        for sealed in envelopes:
            try:
                self._check_recipient(sealed)
                if sealed.sender is not sender:  # a batch comes from one peer: its key is looked up once
                    key = self._shared_key(sealed.sender, "envelope.from")
                    sender = sealed.sender
                ts, _, text = self._open(sealed, key)
            except ChatEnvelopeError as exc:
                sender = None
                refused.append((sealed, exc))
            else:
                opened.append(OpenedText(sealed.id, ts, text))
        return opened, refused

    def _check_recipient(self, sealed: SealedEnvelope) -> None:
        own = self._identity.peer_id
        if sealed.recipient is not own and sealed.recipient != own:
            raise WrongRecipientError("envelope.to", f"addressed to {sealed.recipient}, not to us")

    def _open(self, sealed: SealedEnvelope, key: bytes) -> tuple[int, str, str]:
        """``(ts, kind, text)`` of an envelope addressed to us (:meth:`_check_recipient` passed), opened with the
        shared key of its sender: the remaining checks of :meth:`open`, in its order."""
        try:
            inner = nacl.bindings.crypto_box_open_afternm(sealed.box, sealed.nonce, key)
        except nacl.exceptions.CryptoError:
            raise DecryptionError(
                "envelope.box", f"does not authenticate as a box from {sealed.sender} to us"
            ) from None
        sender_raw = sealed.sender.to_bytes()
        recipient_raw = sealed.recipient.to_bytes()
        fast = _fast_inner(
            inner, b"".join((_INNER_HEAD, sealed.id, _FROM_KEY, sender_raw, _TO_KEY, recipient_raw, _TS_KEY))
        )
        if fast is not None:  # id, from and to are the outer ones: they are part of the matched head
            return fast[0], "text", fast[1]
        try:
            fields = MESSAGE_SCHEMA.decode(inner, max_size=MAX_BOX_SIZE)
        except CodecError as exc:
            raise _codec_error(exc) from None
        if fields["id"] != sealed.id:
            raise MessageIdMismatchError(
                "message.id", f"inner id {fields['id'].hex()} differs from the envelope id {sealed.id.hex()}"
            )
        # crypto_box is symmetric per pair: a box from us to the sender opens here too when the outer from/to are
        # swapped (a reflection).  The inner from/to say which way the sender sealed it.
        if fields["from"] != sender_raw:
            raise DirectionMismatchError(
                "message.from", f"the box was sealed by {_describe_peer(fields['from'])}, not by {sealed.sender}"
            )
        if fields["to"] != recipient_raw:
            raise DirectionMismatchError(
                "message.to", f"the box was sealed for {_describe_peer(fields['to'])}, not for {sealed.recipient}"
            )
        return fields["ts"], fields["kind"], fields["text"]

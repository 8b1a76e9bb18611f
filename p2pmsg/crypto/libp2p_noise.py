"""The libp2p-noise handshake: Noise XX that authenticates libp2p peer IDs, plus its 2-byte length framing.

Theory of operation
-------------------
The handshake is ``Noise_XX_25519_ChaChaPoly_SHA256`` (:mod:`p2pmsg.crypto.noise`) with an empty prologue::

    initiator -> responder   message 1: e                      payload: empty
    responder -> initiator   message 2: e, ee, s, es           payload: responder's NoiseHandshakePayload
    initiator -> responder   message 3: s, se                  payload: initiator's NoiseHandshakePayload

Each side's Noise static key is a *fresh* X25519 key made for this handshake only (as libp2p does), not the
identity's converted key.  The payload binds it to the long-term Ed25519 identity: it is a protobuf carrying the
identity public key (field 1, libp2p ``PublicKey`` protobuf ``08 01 12 20 || pk``) and an Ed25519 signature
(field 2) over ``b"noise-libp2p-static-key:" || static X25519 public key``.  Field 4 (libp2p ``extensions``) is
size-checked and ignored; any other field is skipped, as go-libp2p and rust-libp2p do (the whole payload is capped at
4096 bytes, which bounds them).  Payloads are encrypted by Noise, so neither identity is visible to a passive
observer, and the initiator's identity is only sent after the responder proved its own: the initiator checks the
responder's peer ID against the one it dialled (:class:`PeerIdMismatchError`) *before* writing message 3.  The
responder checks message 3 the same way, so a dialer replaying someone else's payload with its own static key fails.

A man in the middle that swaps a static key breaks the signature (or the Noise transcript); one that swaps the
identity key breaks the signature too; one that signs with its own identity is caught by the peer-ID check.

:class:`NoiseHandshake` is the sans-IO state machine (:class:`HandshakePhase` + the ``_TRANSITIONS`` table): call
:meth:`~NoiseHandshake.write_message` when :attr:`~NoiseHandshake.wants_write`, feed the peer's messages to
:meth:`~NoiseHandshake.read_message`, and take the :class:`HandshakeResult` once complete.  Every remote failure is a
:class:`HandshakeError` and leaves the handshake FAILED.  Incoming messages are bounded per phase
(:attr:`~NoiseHandshake.max_incoming_len`: 32, 4192 and 4160 bytes), so a driver can refuse an oversized frame from
its header alone.

On the wire every Noise message (handshake or transport) travels in a frame: a 2-byte big-endian length followed by
that many bytes (0..65535).  :func:`encode_frame` and :class:`FrameDecoder` implement it.  See ``docs/protocol.md``
(section "Secure channel") for the bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from p2pmsg.crypto.noise import (
    DH_LEN,
    MAX_MESSAGE_LEN,
    TAG_LEN,
    HandshakeState,
    NoiseRemoteError,
    NoiseTransport,
)
from p2pmsg.errors import LocalProtocolError, RemoteProtocolError
from p2pmsg.identity import (
    Identity,
    InvalidPeerIdError,
    PeerId,
    VarintError,
    encode_uvarint,
    parse_public_key_protobuf,
    public_key_protobuf,
    read_uvarint,
)

__all__ = [
    "FRAME_HEADER_LEN",
    "MAX_EXTENSIONS_LEN",
    "MAX_FRAME_LEN",
    "MAX_HANDSHAKE_PAYLOAD_LEN",
    "PROTOCOL_NAME",
    "STATIC_KEY_SIGNATURE_PREFIX",
    "FrameDecoder",
    "FrameError",
    "HandshakeError",
    "HandshakePayload",
    "HandshakePhase",
    "HandshakeResult",
    "InvalidHandshakePayloadError",
    "NoiseHandshake",
    "PeerIdMismatchError",
    "encode_frame",
    "encode_handshake_payload",
    "parse_handshake_payload",
]

PROTOCOL_NAME: Final = "Noise_XX_25519_ChaChaPoly_SHA256"
"""The Noise protocol libp2p-noise uses."""
STATIC_KEY_SIGNATURE_PREFIX: Final = b"noise-libp2p-static-key:"
"""Domain prefix of the identity's signature over the Noise static key."""
MAX_HANDSHAKE_PAYLOAD_LEN: Final = 4096
"""Largest NoiseHandshakePayload accepted from a peer (ours is 104 bytes)."""
MAX_EXTENSIONS_LEN: Final = 2048
"""Largest ``extensions`` field (4) accepted; its content is ignored."""
FRAME_HEADER_LEN: Final = 2
"""Length prefix of a frame: unsigned 16-bit big-endian."""
MAX_FRAME_LEN: Final = MAX_MESSAGE_LEN
"""Largest frame body: one Noise message, 65535 bytes."""

_FIELD_IDENTITY_KEY: Final = 1
_FIELD_IDENTITY_SIG: Final = 2
_FIELD_EXTENSIONS: Final = 4
_FIELD_NAMES: Final = {
    _FIELD_IDENTITY_KEY: "identity_key",
    _FIELD_IDENTITY_SIG: "identity_sig",
    _FIELD_EXTENSIONS: "extensions",
}
_WIRE_TYPE_VARINT: Final = 0
_WIRE_TYPE_FIXED64: Final = 1
_WIRE_TYPE_LEN: Final = 2
_WIRE_TYPE_FIXED32: Final = 5
_FIXED_SIZES: Final = {_WIRE_TYPE_FIXED64: 8, _WIRE_TYPE_FIXED32: 4}
_GROUP_WIRE_TYPES: Final = frozenset({3, 4})
_MAX_FIELD_NUMBER: Final = (1 << 29) - 1
_MAX_PROTOBUF_VARINT_LEN: Final = 10  # a negative int64 takes 10 bytes
_SIGNATURE_LEN: Final = 64
_HEADER: Final = struct.Struct(">H")


# --------------------------------------------------------------------------------------------------------- errors


class HandshakeError(RemoteProtocolError):
    """The secure-channel handshake failed (bad or forged message, bad payload, peer gone, timeout)."""


class PeerIdMismatchError(HandshakeError):
    """The peer proved an identity other than the one we expected to reach."""

    def __init__(self, message: str, *, expected: PeerId, actual: PeerId) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class InvalidHandshakePayloadError(HandshakeError):
    """A NoiseHandshakePayload is malformed, or its signature does not match the Noise static key."""


class FrameError(RemoteProtocolError):
    """A length-prefixed frame is malformed (e.g. the stream ended inside a frame)."""


# ------------------------------------------------------------------------------------------------------- payload


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakePayload:
    """A parsed NoiseHandshakePayload (field 4, extensions, is checked for size and dropped)."""

    identity_key: bytes
    """The raw 32-byte Ed25519 public key from field 1."""
    identity_sig: bytes
    """The 64-byte Ed25519 signature from field 2."""

    @property
    def peer_id(self) -> PeerId:
        """The peer ID of :attr:`identity_key`."""
        return PeerId.from_public_key(self.identity_key)

    def verify(self, static_public: bytes) -> PeerId:
        """Check the signature over ``noise-libp2p-static-key:`` || ``static_public``; return the peer ID.

        Raises :class:`InvalidHandshakePayloadError` when the signature is not valid for that static key.
        """
        peer = self.peer_id
        if not peer.verify(STATIC_KEY_SIGNATURE_PREFIX + static_public, self.identity_sig):
            raise InvalidHandshakePayloadError(
                f"handshake payload: identity_sig of {peer} does not sign this Noise static key"
            )
        return peer


def encode_handshake_payload(identity: Identity, static_public: bytes) -> bytes:
    """Our NoiseHandshakePayload: ``0a 24 <PublicKey protobuf> 12 40 <signature>`` (104 bytes)."""
    key = public_key_protobuf(identity.public_key)
    sig = identity.sign(STATIC_KEY_SIGNATURE_PREFIX + static_public)
    return b"".join(
        (
            encode_uvarint(_FIELD_IDENTITY_KEY << 3 | _WIRE_TYPE_LEN),
            encode_uvarint(len(key)),
            key,
            encode_uvarint(_FIELD_IDENTITY_SIG << 3 | _WIRE_TYPE_LEN),
            encode_uvarint(len(sig)),
            sig,
        )
    )


def parse_handshake_payload(data: bytes) -> HandshakePayload:
    """Parse a NoiseHandshakePayload protobuf: strict on the fields it uses, tolerant of the others.

    At most :data:`MAX_HANDSHAKE_PAYLOAD_LEN` bytes in total; tags and lengths are minimal varints; fields may come in
    any order and nothing may trail the last one.  Fields 1 (identity_key) and 2 (identity_sig) must each appear
    exactly once, length-delimited; field 4 (extensions) at most once, length-delimited, at most
    :data:`MAX_EXTENSIONS_LEN` bytes, and is not interpreted.  Any other field number (1 .. 2**29 - 1) is skipped,
    as often as it appears, if its wire type is varint (0), 64-bit (1), length-delimited (2) or 32-bit (5); groups
    (wire types 3 and 4), wire types 6 and 7, field number 0 and truncated values are refused.  Every failure raises
    :class:`InvalidHandshakePayloadError` naming the field and the reason.
    """
    data = bytes(data)
    if len(data) > MAX_HANDSHAKE_PAYLOAD_LEN:
        raise InvalidHandshakePayloadError(
            f"handshake payload: {len(data)} bytes exceeds the {MAX_HANDSHAKE_PAYLOAD_LEN}-byte limit"
        )
    fields: dict[int, bytes] = {}
    pos = 0
    try:
        while pos < len(data):
            tag, pos = read_uvarint(data, pos)
            number, wire_type = tag >> 3, tag & 0x7
            if not 1 <= number <= _MAX_FIELD_NUMBER:
                raise InvalidHandshakePayloadError(
                    f"handshake payload: field {number} is not a valid field number (1 .. {_MAX_FIELD_NUMBER})"
                )
            name = _FIELD_NAMES.get(number)
            if name is None:  # unknown: skip its value
                pos = _skip_unknown_field(data, pos, number, wire_type)
                continue
            if wire_type != _WIRE_TYPE_LEN:
                raise InvalidHandshakePayloadError(
                    f"handshake payload: field {number} ({name}) must be length-delimited (wire type 2), "
                    f"got wire type {wire_type}"
                )
            if number in fields:
                raise InvalidHandshakePayloadError(f"handshake payload: field {number} ({name}) appears twice")
            length, pos = read_uvarint(data, pos)
            if length > len(data) - pos:
                raise InvalidHandshakePayloadError(
                    f"handshake payload: field {number} ({name}) is truncated: {length} bytes declared, "
                    f"{len(data) - pos} present"
                )
            fields[number] = data[pos : pos + length]
            pos += length
    except VarintError as exc:
        raise InvalidHandshakePayloadError(f"handshake payload: bad varint at byte {pos}: {exc}") from None
    for number in (_FIELD_IDENTITY_KEY, _FIELD_IDENTITY_SIG):
        if number not in fields:
            raise InvalidHandshakePayloadError(f"handshake payload: field {number} ({_FIELD_NAMES[number]}) is missing")
    extensions = fields.get(_FIELD_EXTENSIONS, b"")
    if len(extensions) > MAX_EXTENSIONS_LEN:
        raise InvalidHandshakePayloadError(
            f"handshake payload: field 4 (extensions) is {len(extensions)} bytes, the limit is {MAX_EXTENSIONS_LEN}"
        )
    try:
        identity_key = parse_public_key_protobuf(fields[_FIELD_IDENTITY_KEY])
    except InvalidPeerIdError as exc:
        raise InvalidHandshakePayloadError(f"handshake payload: field 1 (identity_key): {exc}") from None
    signature = fields[_FIELD_IDENTITY_SIG]
    if len(signature) != _SIGNATURE_LEN:
        raise InvalidHandshakePayloadError(
            f"handshake payload: field 2 (identity_sig) must be {_SIGNATURE_LEN} bytes, got {len(signature)}"
        )
    return HandshakePayload(identity_key=identity_key, identity_sig=signature)


def _skip_unknown_field(data: bytes, pos: int, number: int, wire_type: int) -> int:
    """Return the position after the value of unknown field ``number`` that starts at ``pos``.

    Raises :class:`InvalidHandshakePayloadError` for a group or undefined wire type or a truncated value, and
    :class:`VarintError` for a bad length varint.  A varint *value* is not interpreted, so it may take up to 10 bytes
    (protobuf encodes a negative int64 in 10) and need not be minimal.
    """
    if wire_type == _WIRE_TYPE_VARINT:
        for end in range(pos, min(len(data), pos + _MAX_PROTOBUF_VARINT_LEN)):
            if not data[end] & 0x80:
                return end + 1
        if len(data) - pos < _MAX_PROTOBUF_VARINT_LEN:
            raise InvalidHandshakePayloadError(f"handshake payload: field {number} is truncated inside its varint")
        raise InvalidHandshakePayloadError(
            f"handshake payload: field {number} has a varint longer than {_MAX_PROTOBUF_VARINT_LEN} bytes"
        )
    if wire_type == _WIRE_TYPE_LEN:
        size, pos = read_uvarint(data, pos)
    elif wire_type in _FIXED_SIZES:
        size = _FIXED_SIZES[wire_type]
    elif wire_type in _GROUP_WIRE_TYPES:
        raise InvalidHandshakePayloadError(
            f"handshake payload: field {number} has wire type {wire_type} (a group), which is not supported"
        )
    else:
        raise InvalidHandshakePayloadError(
            f"handshake payload: field {number} has wire type {wire_type}, which does not exist"
        )
    if size > len(data) - pos:
        raise InvalidHandshakePayloadError(
            f"handshake payload: field {number} is truncated: {size} bytes declared, {len(data) - pos} present"
        )
    return pos + size


# -------------------------------------------------------------------------------------------------------- framing


def encode_frame(message: bytes) -> bytes:
    """``u16be(len(message)) || message``; a message over 65535 bytes raises LocalProtocolError."""
    if len(message) > MAX_FRAME_LEN:
        raise LocalProtocolError(f"frame: message is {len(message)} bytes, the limit is {MAX_FRAME_LEN}")
    return _HEADER.pack(len(message)) + message


class FrameDecoder:
    """Reassemble length-prefixed frames from arbitrary chunks of a byte stream.

    Feed bytes with :meth:`feed` only when :meth:`next_frame` returned None, and the buffer stays below one frame
    plus one chunk.  The 2-byte header caps a frame at 65535 bytes, so no frame can make it grow without bound.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        self._buf += data

    def next_frame(self) -> bytes | None:
        """Remove and return the next complete frame body, or None if more bytes are needed."""
        buf = self._buf
        available = len(buf)
        if available < FRAME_HEADER_LEN:
            return None
        end = FRAME_HEADER_LEN + ((buf[0] << 8) | buf[1])
        if available < end:
            return None
        with memoryview(buf) as view:
            frame = bytes(view[FRAME_HEADER_LEN:end])
        del buf[:end]
        return frame

    def announced_length(self) -> int | None:
        """The body length announced by the next frame's header, once its 2 bytes are buffered (else None)."""
        buf = self._buf
        if len(buf) < FRAME_HEADER_LEN:
            return None
        return (buf[0] << 8) | buf[1]

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf)

    def check_eof(self) -> None:
        """At end of stream: raise :class:`FrameError` if a partial frame is pending."""
        buf = self._buf
        if not buf:
            return
        if len(buf) < FRAME_HEADER_LEN:
            raise FrameError("frame: the stream ended inside a frame header (1 of 2 bytes)")
        need = (buf[0] << 8) | buf[1]
        raise FrameError(f"frame: the stream ended inside a frame ({len(buf) - FRAME_HEADER_LEN} of {need} bytes)")


# ------------------------------------------------------------------------------------------------------ handshake


class HandshakePhase(enum.Enum):
    """Where a :class:`NoiseHandshake` stands; the name says who acts next."""

    INITIATOR_SEND_1 = "initiator: write message 1"
    INITIATOR_AWAIT_2 = "initiator: read message 2"
    INITIATOR_SEND_3 = "initiator: write message 3"
    RESPONDER_AWAIT_1 = "responder: read message 1"
    RESPONDER_SEND_2 = "responder: write message 2"
    RESPONDER_AWAIT_3 = "responder: read message 3"
    COMPLETE = "complete"
    FAILED = "failed"


class _Action(enum.Enum):
    WRITE = "write_message"
    READ = "read_message"


_TRANSITIONS: Final[dict[tuple[HandshakePhase, _Action], HandshakePhase]] = {
    (HandshakePhase.INITIATOR_SEND_1, _Action.WRITE): HandshakePhase.INITIATOR_AWAIT_2,
    (HandshakePhase.INITIATOR_AWAIT_2, _Action.READ): HandshakePhase.INITIATOR_SEND_3,
    (HandshakePhase.INITIATOR_SEND_3, _Action.WRITE): HandshakePhase.COMPLETE,
    (HandshakePhase.RESPONDER_AWAIT_1, _Action.READ): HandshakePhase.RESPONDER_SEND_2,
    (HandshakePhase.RESPONDER_SEND_2, _Action.WRITE): HandshakePhase.RESPONDER_AWAIT_3,
    (HandshakePhase.RESPONDER_AWAIT_3, _Action.READ): HandshakePhase.COMPLETE,
}
_WRITE_PHASES: Final = frozenset(phase for phase, action in _TRANSITIONS if action is _Action.WRITE)

# The longest message the peer may send in each reading phase: message 1 is a bare ephemeral key (its payload must
# be empty); messages 2 and 3 hold an encrypted static key and an encrypted payload of at most
# MAX_HANDSHAKE_PAYLOAD_LEN bytes (message 2 also the ephemeral key).
_MAX_INCOMING: Final[dict[HandshakePhase, int]] = {
    HandshakePhase.RESPONDER_AWAIT_1: DH_LEN,
    HandshakePhase.INITIATOR_AWAIT_2: DH_LEN + DH_LEN + TAG_LEN + MAX_HANDSHAKE_PAYLOAD_LEN + TAG_LEN,
    HandshakePhase.RESPONDER_AWAIT_3: DH_LEN + TAG_LEN + MAX_HANDSHAKE_PAYLOAD_LEN + TAG_LEN,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeResult:
    """The outcome of a completed handshake."""

    remote_peer: PeerId
    """The authenticated peer."""
    remote_static: bytes
    """The peer's (ephemeral-per-handshake) Noise static X25519 public key."""
    transport: NoiseTransport
    """Send and receive cipher states, nonces at zero."""
    handshake_hash: bytes
    """The final Noise handshake hash, equal on both sides (a channel binding)."""


class NoiseHandshake:
    """One side of a libp2p-noise handshake (sans-IO).

    The initiator must name ``expected_peer``; a responder may (then it is checked too) but normally accepts any
    authenticated peer.  ``static_private`` / ``ephemeral_private`` inject keys for tests; by default both are fresh.
    """

    __slots__ = ("_expected", "_identity", "_noise", "_payload", "_phase", "_remote_peer")

    def __init__(
        self,
        identity: Identity,
        *,
        initiator: bool,
        expected_peer: PeerId | None = None,
        static_private: bytes | None = None,
        ephemeral_private: bytes | None = None,
    ) -> None:
        if initiator and expected_peer is None:
            raise LocalProtocolError("expected_peer: the initiator must know whom it dials")
        self._identity = identity
        self._expected = expected_peer
        self._noise = HandshakeState(
            initiator=initiator,
            protocol_name=PROTOCOL_NAME,
            prologue=b"",
            static_private=static_private,
            ephemeral_private=ephemeral_private,
        )
        self._payload = encode_handshake_payload(identity, self._noise.static_public)
        self._phase = HandshakePhase.INITIATOR_SEND_1 if initiator else HandshakePhase.RESPONDER_AWAIT_1
        self._remote_peer: PeerId | None = None

    def __repr__(self) -> str:
        return f"NoiseHandshake({self._identity.peer_id}, phase={self._phase.name})"

    @property
    def phase(self) -> HandshakePhase:
        """The current phase."""
        return self._phase

    @property
    def wants_write(self) -> bool:
        """True when the next step is :meth:`write_message`."""
        return self._phase in _WRITE_PHASES

    @property
    def is_complete(self) -> bool:
        """True once the handshake succeeded."""
        return self._phase is HandshakePhase.COMPLETE

    @property
    def remote_peer(self) -> PeerId | None:
        """The peer's authenticated identity, once its payload is verified."""
        return self._remote_peer

    @property
    def max_incoming_len(self) -> int:
        """The longest message the peer may send next (0 when it is not the peer's turn).

        32 for message 1, 4192 for message 2, 4160 for message 3: a driver can refuse a frame header announcing more
        without waiting for the body.
        """
        return _MAX_INCOMING.get(self._phase, 0)

    def _step(self, action: _Action) -> HandshakePhase:
        following = _TRANSITIONS.get((self._phase, action))
        if following is None:
            raise LocalProtocolError(f"{action.value}: not allowed in phase {self._phase.name} ({self._phase.value})")
        return following

    def write_message(self) -> bytes:
        """Return the next handshake message (the Noise message; frame it with :func:`encode_frame`)."""
        following = self._step(_Action.WRITE)
        payload = b"" if self._phase is HandshakePhase.INITIATOR_SEND_1 else self._payload
        try:
            message = self._noise.write_message(payload)
        except NoiseRemoteError as exc:  # e.g. the peer's ephemeral key was a low-order point
            self._phase = HandshakePhase.FAILED
            raise HandshakeError(f"handshake message {self._noise.message_index + 1}: {exc}") from exc
        except BaseException:
            self._phase = HandshakePhase.FAILED
            raise
        self._phase = following
        return message

    def read_message(self, message: bytes) -> None:
        """Process the peer's next handshake message (the Noise message, without the frame header)."""
        following = self._step(_Action.READ)
        number = self._noise.message_index + 1
        try:
            limit = self.max_incoming_len
            if len(message) > limit:
                raise HandshakeError(
                    f"handshake message {number}: {len(message)} bytes is longer than the {limit} bytes it can have"
                )
            try:
                payload = self._noise.read_message(message)
            except NoiseRemoteError as exc:
                raise HandshakeError(str(exc)) from exc
            if number > 1:  # message 1 has no payload: its length limit (32) leaves no room for one
                remote_static = self._noise.remote_static
                assert remote_static is not None  # the XX pattern sends s before the payload
                peer = parse_handshake_payload(payload).verify(remote_static)
                if self._expected is not None and peer != self._expected:
                    raise PeerIdMismatchError(
                        f"handshake message {number}: the peer is {peer}, expected {self._expected}",
                        expected=self._expected,
                        actual=peer,
                    )
                self._remote_peer = peer
        except BaseException:
            self._phase = HandshakePhase.FAILED
            raise
        self._phase = following

    def result(self) -> HandshakeResult:
        """The authenticated peer and transport cipher states; only when :attr:`is_complete`."""
        if self._phase is not HandshakePhase.COMPLETE or self._remote_peer is None:
            raise LocalProtocolError(f"result: the handshake is not complete (phase {self._phase.name})")
        remote_static = self._noise.remote_static
        assert remote_static is not None
        transport = self._noise.transport()
        return HandshakeResult(
            remote_peer=self._remote_peer,
            remote_static=remote_static,
            transport=transport,
            handshake_hash=transport.handshake_hash,
        )

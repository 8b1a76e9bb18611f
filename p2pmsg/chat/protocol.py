"""The chat session protocol ``p2pmsg/chat/1``, sans-IO: bytes in, events out; calls in, bytes out.

Theory of operation
-------------------
A chat session runs over an authenticated byte stream (a Noise :class:`~p2pmsg.net.channel.SecureChannel`, which
already tells us who the peer is).  Both directions carry the same frames::

    frame = length (4 bytes, big-endian, 1..MAX_SESSION_FRAME_SIZE) || body (one msgpack map, ``length`` bytes)

Each side's first frame is its hello; after it, any number of ``msg`` and ``ack`` frames in any order::

    Hello {v: 1, proto: "p2pmsg/chat/1", run?: bin[16]} ; open: unknown fields are ignored
    Msg   {v: 1, t: "msg", env: bin[..MAX_ENVELOPE_SIZE]}  ; one sealed envelope, byte for byte
    Ack   {v: 1, t: "ack", ids: array<bin[16]>[1..1024]}   ; "I have stored these" (a receipt)

Neither side waits for the other's hello before sending: a dialer writes its hello and its queued messages in one
``send_all``.  A side that does not speak ``p2pmsg/chat/1`` makes the other close the stream.

Each direction of the session has an explicit state (:class:`SessionState`) moved only through the one table
:data:`TRANSITIONS`: ``AWAIT_HELLO --hello--> OPEN --msg|ack--> OPEN --eof--> CLOSED``.  On the receiving side an
illegal frame (a ``msg`` before the hello, a second hello, anything after EOF), a malformed frame, an oversize length
prefix (refused before buffering the body) or EOF in the middle of a frame raises :class:`SessionProtocolError` (a
:class:`~p2pmsg.errors.RemoteProtocolError`); the connection is then unusable and the caller closes the stream.  On
the sending side an illegal call raises :class:`~p2pmsg.errors.LocalProtocolError`.

The outer fields of each envelope are validated here (:func:`~p2pmsg.chat.envelope.decode_envelope`), so a
malformed envelope is a protocol error of the session; opening the box is left to the caller, which decides what
a message that fails to open costs (it is dropped and counted, the session stays up).

Sending batches: :meth:`ChatConnection.send_messages` and :meth:`ChatConnection.send_ack` return the bytes of many
frames at once, to be written with one ``send_all``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import Any, Final

from p2pmsg.chat.envelope import (
    ENVELOPE_VERSION,
    MAX_ACK_IDS,
    MAX_ENVELOPE_SIZE,
    MESSAGE_ID_SIZE,
    RECEIPT_SCHEMA,
    ChatEnvelopeError,
    SealedEnvelope,
    decode_envelope,
)
from p2pmsg.chat.events import AckReceived, EnvelopeReceived, HelloReceived, SessionClosed, SessionEvent
from p2pmsg.errors import LocalProtocolError, RemoteProtocolError
from p2pmsg.wire.codec import Array, Bytes, CodecError, Literal, Str, Struct

__all__ = [
    "CHAT_PROTOCOL",
    "MAX_SESSION_FRAME_SIZE",
    "RUN_ID_SIZE",
    "TRANSITIONS",
    "ChatConnection",
    "SessionProtocolError",
    "SessionState",
]

CHAT_PROTOCOL: Final = "p2pmsg/chat/1"
#: Largest frame body accepted or sent, in bytes: one envelope of the largest size plus the ``msg`` frame's fields.
MAX_SESSION_FRAME_SIZE: Final = MAX_ENVELOPE_SIZE + 64
#: Largest hello body (it has one short field today; later versions may add a few).
MAX_HELLO_SIZE: Final = 1024
_HEADER: Final = struct.Struct(">I")

#: Bytes of a hello's ``run``: random per start of the sending node, so that a peer can tell a restart (a new
#: ``run``) from a second connection of the same run (a crossing dial).
RUN_ID_SIZE: Final = 16
HELLO_SCHEMA: Final = Struct(
    "hello",
    {"v": Literal(ENVELOPE_VERSION), "proto": Str(64, min_len=1)},
    {"run": Bytes(RUN_ID_SIZE, min_len=RUN_ID_SIZE)},
    allow_unknown=True,
)
#: The frames after the hello, as one schema: ``t`` says which optional field must be present.
FRAME_SCHEMA: Final = Struct(
    "frame",
    {"v": Literal(ENVELOPE_VERSION), "t": Literal("msg", "ack")},
    {
        "env": Bytes(MAX_ENVELOPE_SIZE, min_len=1),
        "ids": Array(Bytes(MESSAGE_ID_SIZE, min_len=MESSAGE_ID_SIZE), MAX_ACK_IDS, min_items=1),
    },
)
_FIELD_OF_KIND: Final = {"msg": "env", "ack": "ids"}


class SessionProtocolError(RemoteProtocolError):
    """The peer broke the session protocol.  ``field`` names the part at fault, ``reason`` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"chat session: {field}: {reason}")
        self.field = field
        self.reason = reason


class SessionState(enum.Enum):
    """The state of one direction of a session."""

    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    CLOSED = "closed"


class _Input(enum.Enum):
    HELLO = "hello"
    MSG = "msg"
    ACK = "ack"
    EOF = "eof"


#: The one transition table, used for both directions: ``(state, input) -> next state``; anything else is illegal.
TRANSITIONS: Final[dict[tuple[SessionState, _Input], SessionState]] = {
    (SessionState.AWAIT_HELLO, _Input.HELLO): SessionState.OPEN,
    (SessionState.AWAIT_HELLO, _Input.EOF): SessionState.CLOSED,
    (SessionState.OPEN, _Input.MSG): SessionState.OPEN,
    (SessionState.OPEN, _Input.ACK): SessionState.OPEN,
    (SessionState.OPEN, _Input.EOF): SessionState.CLOSED,
}


def _frame(body: bytes) -> bytes:
    return _HEADER.pack(len(body)) + body


#: The msgpack of ``{v: 1, t: "msg", env: <bin>}`` up to the bin header, as ``FRAME_SCHEMA.encode`` writes it.
_MSG_PREFIX: Final = FRAME_SCHEMA.encode({"v": ENVELOPE_VERSION, "t": "msg", "env": b"x"})[:-3]


_MSG_HEAD_16: Final = _MSG_PREFIX + b"\xc5"
_HEADER_16: Final = struct.Struct(">I" + str(len(_MSG_HEAD_16)) + "sH")
"""Length prefix, constant prefix and bin 16 header of a ``msg`` frame in one pack (256..65535-byte envelopes: every
text message but the shortest)."""


def _msg_frame_head(raw: bytes) -> bytes:
    """Everything of the framed ``msg`` frame of one encoded envelope that comes before the envelope itself: the
    frame is this plus ``raw``, byte-for-byte what the schema would encode, built from a constant prefix (the envelope
    was validated when it was sealed or received; here only its size is checked)."""
    size = len(raw)
    if 0x100 <= size < 0x10000:
        return _HEADER_16.pack(len(_MSG_HEAD_16) + 2 + size, _MSG_HEAD_16, size)
    if not 1 <= size <= MAX_ENVELOPE_SIZE:
        raise LocalProtocolError(f"chat session: msg.env: {size} bytes is outside 1..{MAX_ENVELOPE_SIZE}")
    if size < 0x100:
        head = _MSG_PREFIX + b"\xc4" + size.to_bytes(1, "big")
    else:
        head = _MSG_PREFIX + b"\xc6" + size.to_bytes(4, "big")
    return _HEADER.pack(len(head) + size) + head


_BIN_WIDTHS: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _msg_envelope_at(body: bytes | bytearray, begin: int, end: int) -> int:
    """Where the envelope starts in *body* if ``body[begin:end]`` is a ``msg`` frame encoded as
    :func:`_msg_frame_head` writes it (the constant prefix, a bin header whose length runs exactly to the end,
    1..MAX_ENVELOPE_SIZE bytes); else 0, and the frame goes through the schema.  Both paths accept such a frame and
    yield the same envelope bytes."""
    at = begin + len(_MSG_PREFIX)
    if end <= at or not body.startswith(_MSG_PREFIX, begin):
        return 0
    width = _BIN_WIDTHS.get(body[at])
    if width is None:
        return 0
    start = at + 1 + width
    size = int.from_bytes(body[at + 1 : start], "big")
    if start + size != end or not 1 <= size <= MAX_ENVELOPE_SIZE:
        return 0
    return start


def _decode_msg_envelope(raw: bytes) -> SealedEnvelope:
    """The envelope of a ``msg`` frame, validated; a bad one is a protocol error of the session (``msg.env.*``)."""
    try:
        return decode_envelope(raw)
    except ChatEnvelopeError as exc:
        raise SessionProtocolError(f"msg.env.{exc.field}", exc.reason) from None


class ChatConnection:
    """One chat session, both directions.  Feed received bytes to :meth:`receive_data`; send what the ``send_*``
    methods return, in the order they return it."""

    def __init__(self, *, max_frame_size: int = MAX_SESSION_FRAME_SIZE) -> None:
        """``max_frame_size`` bounds the body of each received frame (the default fits the largest envelope)."""
        if not MAX_HELLO_SIZE <= max_frame_size <= MAX_SESSION_FRAME_SIZE:
            raise LocalProtocolError(
                f"max_frame_size must be within {MAX_HELLO_SIZE}..{MAX_SESSION_FRAME_SIZE}, got {max_frame_size}"
            )
        self._max_frame_size = max_frame_size
        self._buffer = bytearray()
        self.our_state = SessionState.AWAIT_HELLO
        """Our sending direction: ``AWAIT_HELLO`` until :meth:`send_hello`."""
        self.their_state = SessionState.AWAIT_HELLO
        """The peer's sending direction, as seen in the bytes received."""
        self._failed: SessionProtocolError | None = None

    # -- receiving ---------------------------------------------------------------------------------------------

    def _their_transition(self, what: _Input, field: str) -> None:
        new = TRANSITIONS.get((self.their_state, what))
        if new is None:
            raise SessionProtocolError(field, f"a {what.value} frame is not allowed in state {self.their_state.value}")
        self.their_state = new

    def receive_data(self, data: bytes | bytearray | memoryview | None) -> list[SessionEvent]:
        """Take bytes received from the peer (``None`` or ``b""`` at end of stream) and return the complete events.

        Raises :class:`SessionProtocolError` on any violation; after that, every call raises the same error.
        """
        if self._failed is not None:
            raise self._failed
        try:
            return self._receive(data)
        except SessionProtocolError as exc:
            self._failed = exc
            self.their_state = SessionState.CLOSED
            self._buffer.clear()
            raise

    def _receive(self, data: bytes | bytearray | memoryview | None) -> list[SessionEvent]:
        if self.their_state is SessionState.CLOSED:
            if data:
                raise SessionProtocolError("stream", "data after the end of the stream")
            return []
        events: list[SessionEvent] = []
        eof = not data
        if data:
            self._buffer += data
        buffer = self._buffer
        pos = 0
        try:
            while len(buffer) - pos >= _HEADER.size:
                (length,) = _HEADER.unpack_from(buffer, pos)
                limit = MAX_HELLO_SIZE if self.their_state is SessionState.AWAIT_HELLO else self._max_frame_size
                if length == 0 or length > limit:
                    raise SessionProtocolError("length", f"frame length {length} is outside 1..{limit}")
                end = pos + _HEADER.size + length
                if len(buffer) < end:
                    break
                envelope_at = _msg_envelope_at(buffer, pos + _HEADER.size, end)
                if envelope_at and self.their_state is SessionState.OPEN:
                    # A msg frame laid out as _msg_frame_head writes it, in the state that takes it (OPEN --msg-->
                    # OPEN): the envelope is copied out of the buffer once, without the frame around it.
                    events.append(EnvelopeReceived(envelope=_decode_msg_envelope(bytes(buffer[envelope_at:end]))))
                else:
                    events.append(self._parse(bytes(buffer[pos + _HEADER.size : end])))
                pos = end
        finally:
            if pos:
                del buffer[:pos]
        if eof:
            if buffer:
                raise SessionProtocolError("stream", f"ended in the middle of a frame ({len(buffer)} bytes pending)")
            self._their_transition(_Input.EOF, "stream")
            events.append(SessionClosed())
        return events

    def _parse(self, body: bytes) -> SessionEvent:
        if self.their_state is SessionState.AWAIT_HELLO:
            try:
                hello = HELLO_SCHEMA.decode(body, max_size=MAX_HELLO_SIZE)
            except CodecError as exc:
                raise SessionProtocolError(exc.field, exc.reason) from None
            if hello["proto"] != CHAT_PROTOCOL:
                raise SessionProtocolError("hello.proto", f"{hello['proto']!r} is not {CHAT_PROTOCOL!r}")
            self._their_transition(_Input.HELLO, "hello")
            return HelloReceived(proto=hello["proto"], run=hello.get("run"))
        # A canonical msg frame in the OPEN state never gets here: _receive decodes it from the buffer.
        try:
            frame: dict[str, Any] = FRAME_SCHEMA.decode(body, max_size=self._max_frame_size)
        except CodecError as exc:
            raise SessionProtocolError(exc.field, exc.reason) from None
        kind = frame["t"]
        wanted = _FIELD_OF_KIND[kind]
        if len(frame) != 3 or wanted not in frame:
            raise SessionProtocolError(f"frame.{wanted}", f"a {kind} frame carries exactly v, t and {wanted}")
        if kind == "msg":
            self._their_transition(_Input.MSG, "msg")
            return EnvelopeReceived(envelope=_decode_msg_envelope(frame["env"]))
        self._their_transition(_Input.ACK, "ack")
        return AckReceived(ids=tuple(frame["ids"]))

    # -- sending -----------------------------------------------------------------------------------------------

    def _our_transition(self, what: _Input) -> None:
        new = TRANSITIONS.get((self.our_state, what))
        if new is None:
            raise LocalProtocolError(f"chat session: cannot send {what.value} in state {self.our_state.value}")
        self.our_state = new

    def send_hello(self, run: bytes | None = None) -> bytes:
        """Our hello frame; it must be the first thing sent.  ``run`` (:data:`RUN_ID_SIZE` bytes, optional) names
        this start of our node."""
        self._our_transition(_Input.HELLO)
        hello: dict[str, Any] = {"v": ENVELOPE_VERSION, "proto": CHAT_PROTOCOL}
        if run is not None:
            hello["run"] = run
        return _frame(HELLO_SCHEMA.encode(hello))

    def send_messages(self, envelopes: Iterable[SealedEnvelope | bytes]) -> bytes:
        """One ``msg`` frame per envelope, concatenated (``b""`` for none)."""
        parts: list[bytes] = []
        for envelope in envelopes:
            raw = envelope.raw if isinstance(envelope, SealedEnvelope) else bytes(envelope)
            parts += (_msg_frame_head(raw), raw)
        if parts:
            self._our_transition(_Input.MSG)  # OPEN --msg--> OPEN: one check stands for the whole batch
        return b"".join(parts)

    def send_ack(self, ids: Iterable[bytes]) -> bytes:
        """``ack`` frames for these message ids (up to :data:`MAX_ACK_IDS` per frame; ``b""`` for none)."""
        pending = list(ids)
        out = bytearray()
        for start in range(0, len(pending), MAX_ACK_IDS):
            self._our_transition(_Input.ACK)
            chunk = pending[start : start + MAX_ACK_IDS]
            out += _frame(RECEIPT_SCHEMA.encode({"v": ENVELOPE_VERSION, "t": "ack", "ids": chunk}))
        return bytes(out)

    def send_eof(self) -> None:
        """Record that we are closing our direction (nothing more may be sent); no bytes: close the stream."""
        self._our_transition(_Input.EOF)

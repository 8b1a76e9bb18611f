"""Control API framing and message validation (sans-IO: no trio, no socket).

Theory of operation
-------------------
A control connection carries *frames* both ways: a 4-byte big-endian unsigned length ``N`` followed by ``N`` bytes
of msgpack holding one map.  :class:`FrameReader` splits a byte stream into frame bodies and refuses a length prefix
above its limit before reading the body (so a hostile length never makes us buffer it); a length of 0 is malformed
because an empty body is not a map.

The bodies are validated here, with the strict codec of :mod:`p2pmsg.wire.codec`, into three kinds of message:

* a **request** (client to node) ``{"id": uint >= 1, "method": str, "params": map}``  -> :class:`Request`;
* a **response** (node to client) ``{"id": uint, "result": any}`` or
  ``{"id": uint, "error": {"code": str, "message": str}}`` -> :class:`Response`; id 0 is reserved for an error about
  the connection itself (too many connections, a malformed frame) that the node sends just before closing;
* an **event** (node to a subscribed client) ``{"event": str, ...fields}`` -> :class:`Event`.

Anything else raises :class:`~p2pmsg.control.errors.ControlProtocolError` naming the field and the reason; the server
closes the connection on it, the client gives up the call.  Byte-level details: ``docs/protocol.md (section 7)``.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping
from typing import Any, Final

from p2pmsg.control.errors import ERROR_CODES, ControlProtocolError, FrameTooLargeError
from p2pmsg.errors import LocalProtocolError
from p2pmsg.wire import codec

__all__ = [
    "DEFAULT_MAX_REQUEST_SIZE",
    "DEFAULT_MAX_RESPONSE_SIZE",
    "HEADER_SIZE",
    "MAX_DEPTH",
    "MAX_METHOD_LENGTH",
    "Event",
    "FrameReader",
    "Request",
    "Response",
    "decode_body",
    "encode_error",
    "encode_event",
    "encode_frame",
    "encode_request",
    "encode_result",
    "parse_event",
    "parse_reply",
    "parse_request",
]

HEADER_SIZE: Final = 4
_HEADER: Final = struct.Struct(">I")

#: Largest frame body a node accepts from a client (requests are small: a chat message is at most a few KiB).
DEFAULT_MAX_REQUEST_SIZE: Final = 1024 * 1024
#: Largest frame body a client accepts from the node (``history`` and ``export`` answers can be long).
DEFAULT_MAX_RESPONSE_SIZE: Final = 16 * 1024 * 1024
#: Deepest nesting of maps/arrays accepted in a frame body.
MAX_DEPTH: Final = 16
#: Longest method or event name.
MAX_METHOD_LENGTH: Final = 64
#: Largest request id (an unsigned 64-bit integer).
MAX_ID: Final = 2**64 - 1
#: Longest error message kept from a response (longer ones are cut, not rejected).
MAX_ERROR_MESSAGE: Final = 4096


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """A validated request: ``id`` >= 1, a method name, and its (not yet method-checked) params map."""

    id: int
    method: str
    params: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """A validated response: either ``result`` (``error_code`` is ``None``) or an error code and message."""

    id: int
    result: Any = None
    error_code: str | None = None
    error_message: str = ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """A validated event frame: its name and the other keys of the map."""

    event: str
    fields: dict[str, Any]


class FrameReader:
    """Split a byte stream into frame bodies (sans-IO).  Feed bytes with :meth:`receive_data`, pull bodies with
    :meth:`next_frame`.
    """

    __slots__ = ("_buffer", "_max_size")

    def __init__(self, max_size: int) -> None:
        """Accept frame bodies of 1 to ``max_size`` bytes."""
        if max_size < 1:
            raise LocalProtocolError(f"max_size must be positive, got {max_size}")
        self._max_size = max_size
        self._buffer = bytearray()

    @property
    def max_size(self) -> int:
        """The largest frame body accepted."""
        return self._max_size

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (so an end of stream here is a clean close)."""
        return not self._buffer

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes read from the stream."""
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete frame body, or ``None`` when more bytes are needed.

        Raises :class:`FrameTooLargeError` as soon as a length prefix above the limit is seen, and
        :class:`ControlProtocolError` on a zero length.
        """
        if len(self._buffer) < HEADER_SIZE:
            return None
        (length,) = _HEADER.unpack_from(self._buffer)
        if length > self._max_size:
            raise FrameTooLargeError("length", f"frame of {length} bytes is larger than the limit of {self._max_size}")
        if length == 0:
            raise ControlProtocolError("length", "frame of 0 bytes (a frame holds one msgpack map)")
        end = HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER_SIZE:end])
        del self._buffer[:end]
        return body


# ---------------------------------------------------------------------------------------------------------------------
# Encoding (our own messages: a failure is a local bug, never the peer's)


def encode_frame(message: Mapping[str, Any], *, max_size: int) -> bytes:
    """Length prefix + msgpack of ``message``.

    Raises :class:`~p2pmsg.wire.codec.CodecEncodeError` (a :class:`LocalProtocolError`) if the message holds anything
    but msgpack's core types or encodes to more than ``max_size`` bytes.
    """
    body = codec.packb(dict(message), max_size=max_size, name="control frame")
    return _HEADER.pack(len(body)) + body


def encode_request(request_id: int, method: str, params: Mapping[str, Any], *, max_size: int) -> bytes:
    """The frame of a request."""
    return encode_frame({"id": request_id, "method": method, "params": dict(params)}, max_size=max_size)


def encode_result(request_id: int, result: Any, *, max_size: int) -> bytes:
    """The frame of a successful response."""
    return encode_frame({"id": request_id, "result": result}, max_size=max_size)


def encode_error(request_id: int, code: str, message: str, *, max_size: int) -> bytes:
    """The frame of an error response (``code`` must be one of :data:`ERROR_CODES`)."""
    if code not in ERROR_CODES:
        raise LocalProtocolError(f"unknown control error code {code!r}")
    return encode_frame({"id": request_id, "error": {"code": code, "message": message}}, max_size=max_size)


def encode_event(event: str, fields: Mapping[str, Any], *, max_size: int) -> bytes:
    """The frame of an event ``{"event": event, **fields}`` (``fields`` must not contain ``"event"``)."""
    if not isinstance(event, str) or not 0 < len(event) <= MAX_METHOD_LENGTH:
        raise LocalProtocolError(f"event name must be a string of 1 to {MAX_METHOD_LENGTH} characters: {event!r}")
    if "event" in fields:
        raise LocalProtocolError("event fields must not contain the key 'event'")
    return encode_frame({"event": event, **fields}, max_size=max_size)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding and validation (the other side's bytes: every failure is a ControlProtocolError)


def decode_body(body: bytes, *, max_size: int) -> dict[str, Any]:
    """Decode a frame body into a map with string keys (at any depth), bounded in size and depth."""
    try:
        value = codec.unpackb_limited(body, max_size=max_size, max_depth=MAX_DEPTH, name="body")
    except codec.CodecError as exc:
        raise ControlProtocolError(exc.field, exc.reason) from None
    if not isinstance(value, dict):
        raise ControlProtocolError("body", f"must be a msgpack map, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bytes):
        return "binary"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def _check_keys(message: Mapping[str, Any], required: frozenset[str], optional: frozenset[str] = frozenset()) -> None:
    for key in message:
        if key not in required and key not in optional:
            raise ControlProtocolError(str(key), "unknown key")
    for key in sorted(required):
        if key not in message:
            raise ControlProtocolError(key, "missing")


def _check_id(value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlProtocolError("id", f"must be an unsigned integer, got {_kind(value)}")
    if not minimum <= value <= MAX_ID:
        raise ControlProtocolError("id", f"must be from {minimum} to 2**64-1, got {value}")
    return value


def _check_name(value: object, *, field: str) -> str:
    if not isinstance(value, str):
        raise ControlProtocolError(field, f"must be a string, got {_kind(value)}")
    if not 0 < len(value) <= MAX_METHOD_LENGTH:
        raise ControlProtocolError(field, f"must be 1 to {MAX_METHOD_LENGTH} characters, got {len(value)}")
    return value


_REQUEST_KEYS: Final = frozenset({"id", "method", "params"})


def parse_request(body: bytes, *, max_size: int = DEFAULT_MAX_REQUEST_SIZE) -> Request:
    """Validate a request frame body."""
    message = decode_body(body, max_size=max_size)
    _check_keys(message, _REQUEST_KEYS)
    request_id = _check_id(message["id"], minimum=1)
    method = _check_name(message["method"], field="method")
    params = message["params"]
    if not isinstance(params, dict):
        raise ControlProtocolError("params", f"must be a map, got {_kind(params)}")
    return Request(id=request_id, method=method, params=params)


def parse_reply(body: bytes, *, max_size: int = DEFAULT_MAX_RESPONSE_SIZE) -> Response | Event:
    """Validate a frame body the node sent: a :class:`Response` or an :class:`Event`."""
    message = decode_body(body, max_size=max_size)
    if "event" in message:
        return _event(message)
    if "error" in message:
        _check_keys(message, frozenset({"id", "error"}))
        request_id = _check_id(message["id"], minimum=0)
        error = message["error"]
        if not isinstance(error, dict):
            raise ControlProtocolError("error", f"must be a map, got {_kind(error)}")
        for key in error:
            if key not in ("code", "message"):
                raise ControlProtocolError(f"error.{key}", "unknown key")
        code, text = error.get("code"), error.get("message")
        if not isinstance(code, str) or not code:
            raise ControlProtocolError("error.code", f"must be a non-empty string, got {_kind(code)}")
        if not isinstance(text, str):
            raise ControlProtocolError("error.message", f"must be a string, got {_kind(text)}")
        # An unknown code from a newer node is kept as it is: the caller shows it, it does not break the protocol.
        return Response(id=request_id, error_code=code[:MAX_METHOD_LENGTH], error_message=text[:MAX_ERROR_MESSAGE])
    _check_keys(message, frozenset({"id", "result"}))
    return Response(id=_check_id(message["id"], minimum=0), result=message["result"])


def _event(message: dict[str, Any]) -> Event:
    name = _check_name(message["event"], field="event")
    fields = {key: value for key, value in message.items() if key != "event"}
    return Event(event=name, fields=fields)


def parse_event(body: bytes, *, max_size: int = DEFAULT_MAX_RESPONSE_SIZE) -> Event:
    """Validate an event frame body."""
    message = decode_body(body, max_size=max_size)
    if "event" not in message:
        raise ControlProtocolError("event", "missing")
    return _event(message)

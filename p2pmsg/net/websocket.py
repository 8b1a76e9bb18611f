"""A trio-websocket connection presented as a plain byte :class:`trio.abc.Stream`.

Theory of operation
-------------------
The secure channel runs over any ``trio.abc.Stream``.  Over WebSocket, that byte stream is carried in *binary*
messages whose boundaries mean nothing: the sender cuts its bytes into messages of at most
:data:`WS_MAX_MESSAGE_SIZE` (65537 bytes, one Noise frame with its 2-byte length prefix) and the receiver
concatenates them.  Text messages are a protocol violation; empty binary messages are ignored.

trio-websocket needs a background *reader task* per connection, which must live in a nursery.  To keep structured
concurrency, :func:`connect_websocket_stream` and :func:`accept_websocket_stream` start one small *host task* in
the nursery the caller names.  The host task owns an inner nursery that runs the reader; it reports the finished
:class:`WebSocketStream` through ``nursery.start`` and lives exactly as long as the connection.  Closing the stream
closes the TCP connection and cancels the inner nursery, so nothing outlives :meth:`WebSocketStream.aclose`.
Errors from the reader after the upgrade (for example a peer violating the WebSocket framing) are logged and turn
into :class:`trio.BrokenResourceError` on the stream; they never reach the caller's nursery.

Bounds: trio-websocket's ``max_message_size`` is :data:`WS_MAX_MESSAGE_SIZE`.  When a peer exceeds it,
trio-websocket drops the partial message as soon as the running total passes the limit (it never assembles the
oversized message), sends a Close frame with code 1009 (Message Too Big) and stops reading; the next
``receive_some`` here raises :class:`trio.BrokenResourceError`.  Its message queue holds one message, so a peer
can make us hold at most about three messages (~200 KB) per connection.  trio-websocket does *not* close the TCP
socket after a 1009 close or after the client side of a close handshake; :meth:`WebSocketStream.aclose` always does.

Frame budget: parsing a frame costs trio-websocket the same Python work whatever it carries, so a peer sending empty
continuation frames or pings at line rate (170,000 a second over one connection) keeps a core busy while delivering
nothing. :class:`FrameMeter` walks the frame headers in the raw bytes before trio-websocket sees them (RFC 6455
section 5.2: it skips payloads, it never unmasks), starting exactly where wsproto starts parsing frames, and charges
every *small* frame -- payload under :data:`WS_SMALL_FRAME` bytes, whatever its opcode -- one token from a budget of
:data:`WS_SMALL_FRAME_RATE` a second, at most :data:`WS_SMALL_FRAME_BURST` at once. A larger frame is free: its cost
is in bytes, which the network bounds. Our own peers send one frame per message, each a whole Noise frame (an ack is
about 60 bytes), so only a peer sending thousands of tiny frames a second runs out. When the budget is spent, the
transport is reported broken before trio-websocket parses those bytes, and the stream's next ``receive_some`` raises
:class:`trio.BrokenResourceError` with the reason. The listener passes one budget per source (IPv4 address, IPv6
/64), shared by all of that source's connections; an outbound connection gets its own.

Close mapping to trio's conventions: a Close frame with code 1000 or 1001 is end of stream (``b""``); any other
close, a dropped TCP connection, or a protocol error is :class:`trio.BrokenResourceError`; any use after our own
``aclose`` is :class:`trio.ClosedResourceError`.  ``aclose`` sends a Close frame and waits at most
``close_timeout`` seconds for the peer's reply before cutting the TCP connection.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
from collections.abc import Callable
from typing import Final, cast

import trio
import trio_websocket

from p2pmsg.errors import RemoteProtocolError
from p2pmsg.net.conflict import ConflictGuard
from p2pmsg.ratelimit import RateLimiter

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "WS_MAX_FRAGMENTS",
    "WS_MAX_MESSAGE_SIZE",
    "WS_MAX_PIECES",
    "WS_PATH",
    "WS_SMALL_FRAME",
    "WS_SMALL_FRAME_BURST",
    "WS_SMALL_FRAME_RATE",
    "FrameBudget",
    "FrameMeter",
    "WebSocketStream",
    "WebSocketUpgradeError",
    "accept_websocket_stream",
    "connect_websocket_stream",
]

logger = logging.getLogger(__name__)

#: Largest binary message we send or accept: one Noise frame (2-byte length + 65535 bytes).
WS_MAX_MESSAGE_SIZE: Final = 65537
#: The only HTTP path a p2pmsg WebSocket listener accepts.
WS_PATH: Final = "/"
_MAX_REFUSAL_BODY: Final = 4096
# The end of an HTTP head as h11 finds it, and the status line of an accepted upgrade.
_BLANK_LINE: Final = re.compile(rb"\n\r?\n")
_SWITCHING: Final = re.compile(rb"HTTP/\d\.\d 101\b")
#: Frames with a payload under this many bytes are *small*: each is charged to the peer's frame budget.
WS_SMALL_FRAME: Final = 1024
#: Frames one message may be cut into (each fragment costs trio-websocket a list entry until the message ends).
WS_MAX_FRAGMENTS: Final = 128
#: Pieces one message may reach trio-websocket in: one per data frame, plus one per read that ends inside a data
#: frame's payload (wsproto hands over each part of a payload as it arrives, and trio-websocket keeps a list entry
#: of about 40 bytes for each until the message ends).  A 64 KiB message over a link with a 536-byte MSS is about
#: 125 pieces; a peer trickling one byte per TCP segment would otherwise cost us about 2.7 MB per connection.
WS_MAX_PIECES: Final = 1024
#: Small frames a second one peer may send (after its burst); beyond it the connection is closed.
WS_SMALL_FRAME_RATE: Final = 4096.0
#: Small frames one peer may send at once (the size of its token bucket).
WS_SMALL_FRAME_BURST: Final = 8192
#: Seconds :meth:`WebSocketStream.aclose` waits for the peer's Close frame before dropping the TCP connection.
DEFAULT_CLOSE_TIMEOUT: Final = 2.0

# trio-websocket's internal queue of complete messages (its default, stated so the bound above is explicit).
_MESSAGE_QUEUE_SIZE: Final = 1
# Bytes read from the socket per receive call by trio-websocket's reader.
_RECEIVE_BUFFER_SIZE: Final = 65536
# Close codes that mean an orderly end of stream.
_GRACEFUL_CLOSE_CODES: Final = frozenset({1000, 1001})
# Close code we send when the peer sends a text message.
_UNSUPPORTED_DATA: Final = 1003


class WebSocketUpgradeError(RemoteProtocolError):
    """The HTTP upgrade to WebSocket failed (rejected, wrong path, garbage, or the peer hung up)."""


FrameBudget = Callable[[int], bool]
"""``budget(count)``: take ``count`` small frames from the peer's budget; ``False`` once it cannot pay."""


def own_frame_budget() -> FrameBudget:
    """A budget of :data:`WS_SMALL_FRAME_RATE` small frames a second (burst :data:`WS_SMALL_FRAME_BURST`) for one
    connection alone."""
    limiter: RateLimiter[None] = RateLimiter(rate=WS_SMALL_FRAME_RATE, burst=WS_SMALL_FRAME_BURST, max_sources=1)
    return lambda count: limiter.allow(None, trio.current_time(), count)


class FrameMeter:
    """Counts the small WebSocket frames in the bytes a peer sends (module docstring: frame budget), and refuses
    what would let its count drift from what wsproto parses.

    Feed it every received chunk in order, from the first byte of the connection.  Frames begin:

    * on a **client**, right after the blank line that ends the server's ``101`` response (h11's rule: the first
      ``\\n\\r?\\n``), in the same chunk if more follows it; a response other than ``101`` has no frames, and
      a body of more than 4 KiB after it is a violation (trio-websocket would keep it all until our timeout);
    * on a **server**, after our answer to the request (:meth:`response_sent`).  A client must wait for that
      answer (RFC 6455 section 4.1), and wsproto may already parse as frames what arrives while the answer waits
      to be written, so any byte after the request's blank line and before the answer is a violation.

    Then it walks the frame headers (RFC 6455 section 5.2), skipping payloads.  A message cut into more than
    :data:`WS_MAX_FRAGMENTS` frames, or arriving in more than :data:`WS_MAX_PIECES` pieces (a frame's payload split
    over many reads is one piece per read), is a violation too (trio-websocket keeps a list entry per piece, and its
    size limit counts only bytes).  A header wsproto refuses (reserved bits or opcodes, a length with its top bit set)
    needs no rule here: wsproto closes the connection on it, so what the meter makes of the bytes after it never
    matters.  After a violation (:attr:`violation`) the meter counts nothing more; the caller drops the
    connection.  Sans-IO.
    """

    __slots__ = (
        "_body",
        "_client",
        "_data",
        "_final",
        "_fragments",
        "_head",
        "_header",
        "_mode",
        "_pieces",
        "_skip",
        "_tail",
        "small_frames",
        "violation",
    )

    def __init__(self, *, client: bool) -> None:
        self._client = client
        # "http" (before the frames), "answering" (server: the request is in, our answer not yet sent), "frames",
        # or "none" (a refused upgrade, or a violation: nothing more is counted)
        self._mode = "http"
        self._head = b""  # the first bytes of the HTTP head (the client checks the server's status line)
        self._tail = b""  # the last 2 bytes of the head seen so far (a blank line may span two chunks)
        self._header = bytearray()  # the frame header read so far
        self._skip = 0  # payload bytes of the current frame still to skip
        self._fragments = 0  # data frames of the message being received so far
        self._pieces = 0  # pieces of that message trio-websocket has received so far (WS_MAX_PIECES)
        self._data = False  # the frame being skipped is a data frame (not a control frame)
        self._final = False  # ... and the last frame of its message
        self._body = 0  # bytes of a refused upgrade's answer after its head (client side)
        self.small_frames = 0
        """Small frames seen so far (a frame counts once its whole header has arrived)."""
        self.violation: str | None = None
        """Why the peer's bytes cannot be what wsproto accepts as a good frame stream (then nothing more counts)."""

    def response_sent(self) -> None:
        """(Server side) our answer to the upgrade request is being written: frames begin with the next byte."""
        if not self._client and self._mode in ("http", "answering"):
            self._mode = "frames"

    def _fail(self, reason: str) -> int:
        self.violation = reason
        self._mode = "none"
        return 0

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Walk ``data``; return how many small frames began in it (see :attr:`violation` after each call)."""
        view = memoryview(data).cast("B")
        offset = 0
        if self._mode == "answering" and len(view):
            return self._fail("the client sent data before the WebSocket upgrade was answered")
        if self._mode == "http":
            if len(self._head) < 16:
                self._head += bytes(view[: 16 - len(self._head)])
            seen = self._tail + bytes(view)
            match = _BLANK_LINE.search(seen)
            if match is None:
                self._tail = seen[-2:]
                return 0
            offset = match.end() - len(self._tail)  # the blank line ends inside ``view``: the tail is 2 bytes
            self._tail = b""
            if not self._client:
                self._mode = "answering"
                if offset < len(view):
                    return self._fail("the client sent data before the WebSocket upgrade was answered")
                return 0
            self._mode = "frames" if _SWITCHING.match(self._head) else "refused"
            self._body = -offset  # the bytes of ``view`` before ``offset`` are the head
        if self._mode == "refused":  # trio-websocket keeps the body of a refusal (quadratically): keep it short
            self._body += len(view)
            if self._body > _MAX_REFUSAL_BODY:
                return self._fail(f"the server refused the upgrade with more than {_MAX_REFUSAL_BODY} bytes of body")
            return 0
        if self._mode == "none":
            return 0
        found = 0
        size = len(view)
        while offset < size:
            if self._skip:
                step = min(self._skip, size - offset)
                self._skip -= step
                offset += step
                if self._data and (reason := self._piece_violation()) is not None:
                    self.small_frames += found
                    return self._fail(reason)
                continue
            header = self._header
            header.append(view[offset])
            offset += 1
            if len(header) < 2:
                continue
            length = header[1] & 0x7F
            extended = 2 if length == 126 else 8 if length == 127 else 0
            mask = 4 if header[1] & 0x80 else 0
            if len(header) < 2 + extended + mask:
                continue
            if extended:
                length = int.from_bytes(header[2 : 2 + extended], "big")
            first = header[0]
            header.clear()
            self._data = not first & 0x08
            self._final = bool(first & 0x80)
            self._skip = length
            reason = self._fragment_violation(first)
            if reason is None and self._data and not length:
                reason = self._piece_violation()  # an empty data frame is a piece of its own
            if reason is not None:
                self.small_frames += found
                return self._fail(reason)
            if length < WS_SMALL_FRAME:
                found += 1
        self.small_frames += found
        return found

    def _piece_violation(self) -> str | None:
        """Count one piece of the current message (a data frame's payload, or part of it, in one read); why that is
        refused (``None``: it is fine).  The count starts again after the message's last piece."""
        self._pieces += 1
        if self._pieces > WS_MAX_PIECES:
            return f"a WebSocket message in more than {WS_MAX_PIECES} pieces (a frame trickled in tiny reads)"
        if self._final and not self._skip:
            self._pieces = 0
        return None

    def _fragment_violation(self, first: int) -> str | None:
        """Why a frame with first byte ``first`` is refused (``None``: it is fine): counts a message's fragments."""
        if first & 0x08:  # a control frame: it may come between the fragments of a message
            return None
        self._fragments = 0 if first & 0x80 else self._fragments + 1
        if self._fragments >= WS_MAX_FRAGMENTS:
            return f"a WebSocket message in more than {WS_MAX_FRAGMENTS} frames"
        return None


class _WatchedStream(trio.abc.Stream):
    """Pass-through stream that calls ``on_dead`` once the transport reaches EOF, breaks or is closed, and charges
    the small frames it receives to a :data:`FrameBudget`.

    trio-websocket waits forever for the upgrade response if the TCP connection ends before it arrives; the host
    task uses this hook to abort the upgrade at once instead of waiting for the caller's timeout.  When the budget
    cannot pay, ``receive_some`` says the transport broke (``over_budget`` holds the reason) before trio-websocket
    parses those bytes.
    """

    __slots__ = ("_budget", "_inner", "_meter", "on_dead", "over_budget")

    def __init__(self, inner: trio.abc.Stream, budget: FrameBudget, *, client: bool) -> None:
        self._inner = inner
        self._budget = budget
        self._meter = FrameMeter(client=client)
        self.on_dead: Callable[[], object] | None = None
        self.over_budget: str | None = None

    def _dead(self) -> None:
        callback, self.on_dead = self.on_dead, None
        if callback is not None:
            callback()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # On a server the first write is the answer to the upgrade request.  wsproto switched to frames when it
        # made these bytes, in this same step: the meter switches with it, before any await.
        self._meter.response_sent()
        try:
            await self._inner.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._dead()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.over_budget is not None:
            raise trio.BrokenResourceError(self.over_budget)
        try:
            data = await self._inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._dead()
            raise
        if not data:
            self._dead()
            return data
        small = self._meter.feed(data)
        if self._meter.violation is not None:
            self.over_budget = f"peer broke the WebSocket framing: {self._meter.violation}"
            self._dead()
            raise trio.BrokenResourceError(self.over_budget)
        if small and not self._budget(small):
            self.over_budget = (
                f"peer sent more than {WS_SMALL_FRAME_RATE:g} small WebSocket frames a second "
                f"(under {WS_SMALL_FRAME} bytes each; {self._meter.small_frames} on this connection)"
            )
            self._dead()
            raise trio.BrokenResourceError(self.over_budget)
        return data

    async def aclose(self) -> None:
        self._dead()
        await self._inner.aclose()


class WebSocketStream(trio.abc.Stream):
    """A WebSocket connection as a byte stream: ``send_all`` sends binary messages, ``receive_some`` returns bytes.

    Build it with :func:`connect_websocket_stream` or :func:`accept_websocket_stream`; they own the reader task.
    ``transport`` is the TCP stream underneath, which this object closes in :meth:`aclose`.
    """

    def __init__(
        self,
        connection: trio_websocket.WebSocketConnection,
        transport: trio.abc.Stream,
        *,
        reader_scope: trio.CancelScope | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self._connection = connection
        self._transport = transport
        self._reader_scope = reader_scope
        self._close_timeout = close_timeout
        self._buffer = b""
        self._offset = 0
        self._eof = False
        self._closed = False
        self._send_broken: str | None = None
        self._receive_broken: str | None = None
        self._close_code = 1000
        self._close_scope: trio.CancelScope | None = None
        self._reader_exited = False
        self._receive_scope: trio.CancelScope | None = None
        self._send_scope: trio.CancelScope | None = None
        self._receive_conflict = ConflictGuard("another task is already receiving on this WebSocket stream")
        self._send_conflict = ConflictGuard("another task is already sending on this WebSocket stream")

    @property
    def connection(self) -> trio_websocket.WebSocketConnection:
        """The trio-websocket connection underneath."""
        return self._connection

    @property
    def transport_stream(self) -> trio.abc.Stream:
        """The TCP stream the WebSocket runs over."""
        return self._transport

    @property
    def socket_stream(self) -> trio.SocketStream | None:
        """The TCP socket stream underneath (for the peer's observed address), or None if it is not one."""
        inner = self._transport._inner if isinstance(self._transport, _WatchedStream) else self._transport
        return inner if isinstance(inner, trio.SocketStream) else None

    @staticmethod
    def _describe_close(exc: trio_websocket.ConnectionClosed) -> str:
        reason = exc.reason
        if reason is None:
            return "WebSocket connection closed"
        text = f"WebSocket closed with code {reason.code} ({reason.name})"
        return f"{text}: {reason.reason}" if reason.reason else text

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one binary message (several if it exceeds :data:`WS_MAX_MESSAGE_SIZE`)."""
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("WebSocket stream was closed")
            if self._send_broken is not None:
                raise trio.BrokenResourceError(self._send_broken)
            view = memoryview(data).cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
                return
            with trio.CancelScope() as scope:
                self._send_scope = scope
                try:
                    for start in range(0, len(view), WS_MAX_MESSAGE_SIZE):
                        await self._connection.send_message(bytes(view[start : start + WS_MAX_MESSAGE_SIZE]))
                except trio_websocket.ConnectionClosed as exc:
                    if self._closed:
                        raise trio.ClosedResourceError("WebSocket stream was closed") from None
                    self._send_broken = self._describe_close(exc)
                    raise trio.BrokenResourceError(self._send_broken) from None
                finally:
                    self._send_scope = None
            if scope.cancelled_caught:
                raise trio.ClosedResourceError("WebSocket stream was closed while sending")

    async def wait_send_all_might_not_block(self) -> None:
        """Return at once (allowed by the trio contract): trio-websocket exposes no write readiness."""
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("WebSocket stream was closed")
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return up to ``max_bytes`` bytes of the next binary message(s); ``b""`` after an orderly close."""
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        with self._receive_conflict:
            if self._closed:
                raise trio.ClosedResourceError("WebSocket stream was closed")
            if self._offset < len(self._buffer):
                await trio.lowlevel.checkpoint()
                return self._take(max_bytes)
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b""
            if self._receive_broken is not None:
                raise trio.BrokenResourceError(self._receive_broken)
            while True:
                message: bytes | str = b""
                with trio.CancelScope() as scope:
                    self._receive_scope = scope
                    try:
                        message = await self._connection.get_message()
                    except trio_websocket.ConnectionClosed as exc:
                        if self._closed:
                            raise trio.ClosedResourceError("WebSocket stream was closed") from None
                        if exc.reason is not None and exc.reason.code in _GRACEFUL_CLOSE_CODES:
                            self._eof = True
                            await trio.lowlevel.cancel_shielded_checkpoint()
                            return b""
                        over_budget = (
                            self._transport.over_budget if isinstance(self._transport, _WatchedStream) else None
                        )
                        self._receive_broken = over_budget or self._describe_close(exc)
                        raise trio.BrokenResourceError(self._receive_broken) from None
                    finally:
                        self._receive_scope = None
                if scope.cancelled_caught:
                    raise trio.ClosedResourceError("WebSocket stream was closed while receiving")
                if isinstance(message, str):
                    self._receive_broken = "peer sent a WebSocket text message; only binary messages are allowed"
                    self._close_code = _UNSUPPORTED_DATA
                    raise trio.BrokenResourceError(self._receive_broken)
                if message:
                    self._buffer = message
                    self._offset = 0
                    return self._take(max_bytes)
                # An empty binary message carries nothing; wait for the next one (get_message is a checkpoint).

    def _on_reader_exit(self) -> None:
        """Called by the host task when trio-websocket's reader has stopped: no Close reply can arrive any more."""
        self._reader_exited = True
        if self._close_scope is not None:
            self._close_scope.cancel()

    def _take(self, max_bytes: int | None) -> bytes:
        start = self._offset
        end = len(self._buffer) if max_bytes is None else min(len(self._buffer), start + max_bytes)
        self._offset = end
        chunk = self._buffer[start:end]  # a full-range slice of bytes is the same object, no copy
        if end == len(self._buffer):
            self._buffer = b""
            self._offset = 0
        return chunk

    async def aclose(self) -> None:
        """Send a Close frame, wait up to ``close_timeout`` for the reply, then close TCP and stop the reader."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._buffer = b""
        self._offset = 0
        for scope in (self._receive_scope, self._send_scope):
            if scope is not None:
                scope.cancel()
        try:
            if not self._reader_exited:
                # Wait for the peer's Close reply, but not past close_timeout and not once the reader is gone
                # (nobody would see the reply).
                with trio.move_on_after(self._close_timeout) as scope:
                    self._close_scope = scope
                    await self._connection.aclose(self._close_code)
                self._close_scope = None
        finally:
            try:
                await trio.aclose_forcefully(self._transport)
            finally:
                if self._reader_scope is not None:
                    self._reader_scope.cancel()


async def _host_connection(
    transport: trio.abc.Stream,
    *,
    client: bool,
    host_header: str,
    path: str,
    close_timeout: float,
    frame_budget: FrameBudget | None,
    task_status: trio.TaskStatus[WebSocketStream] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one WebSocket connection's reader for as long as the connection lives (see the module docstring)."""
    budget = frame_budget if frame_budget is not None else own_frame_budget()
    watched = _WatchedStream(transport, budget, client=client)
    started = False
    stream: WebSocketStream | None = None
    try:
        async with trio.open_nursery() as inner:
            with trio.CancelScope() as upgrade_scope:
                watched.on_dead = upgrade_scope.cancel
                # trio-websocket annotates the stream as a SocketStream but only uses the trio.abc.Stream methods.
                raw = cast(trio.SocketStream, watched)
                if client:
                    connection = await trio_websocket.wrap_client_stream(
                        inner,
                        raw,
                        host_header,
                        path,
                        message_queue_size=_MESSAGE_QUEUE_SIZE,
                        max_message_size=WS_MAX_MESSAGE_SIZE,
                        receive_buffer_size=_RECEIVE_BUFFER_SIZE,
                    )
                else:
                    request = await trio_websocket.wrap_server_stream(
                        inner,
                        raw,
                        message_queue_size=_MESSAGE_QUEUE_SIZE,
                        max_message_size=WS_MAX_MESSAGE_SIZE,
                        receive_buffer_size=_RECEIVE_BUFFER_SIZE,
                    )
                    if request.path != path:
                        await request.reject(404, body=b"not found\n")
                        raise WebSocketUpgradeError(f"WebSocket path {request.path[:100]!r} is not {path!r}")
                    connection = await request.accept()
                watched.on_dead = None
            if upgrade_scope.cancelled_caught:
                raise WebSocketUpgradeError(watched.over_budget or "connection ended during the WebSocket upgrade")
            stream = WebSocketStream(connection, watched, reader_scope=inner.cancel_scope, close_timeout=close_timeout)
            started = True
            task_status.started(stream)
    except BaseExceptionGroup as group:
        cancelled, others = group.split(trio.Cancelled)
        if others is None:
            raise
        if started:
            # The reader failed after the upgrade: the stream already reports it as broken.  Log, never crash
            # the caller's nursery.
            logger.debug("WebSocket reader ended with an error", exc_info=others)
            if cancelled is not None:
                raise cancelled from None
            return
        raise _upgrade_error(others) from None
    finally:
        if stream is not None:
            stream._on_reader_exit()
        if not started:
            await trio.aclose_forcefully(transport)


def _upgrade_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Turn the failure of the upgrade into one clear exception (or re-raise something that is not ours)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if not isinstance(exc, Exception):
            return exc  # KeyboardInterrupt and friends pass through untouched
    for exc in leaves:
        if isinstance(exc, WebSocketUpgradeError):
            return exc
    for exc in leaves:
        if isinstance(exc, trio_websocket.ConnectionRejected):
            return WebSocketUpgradeError(f"WebSocket upgrade rejected with HTTP status {exc.status_code}")
    for exc in leaves:
        if isinstance(exc, trio_websocket.ConnectionClosed | trio.BrokenResourceError | trio.ClosedResourceError):
            return WebSocketUpgradeError(f"connection ended during the WebSocket upgrade ({exc})")
        if isinstance(exc, OSError):
            return WebSocketUpgradeError(f"network error during the WebSocket upgrade: {exc}")
    return group


async def connect_websocket_stream(
    nursery: trio.Nursery,
    transport: trio.abc.Stream,
    *,
    host_header: str,
    path: str = WS_PATH,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    frame_budget: FrameBudget | None = None,
) -> WebSocketStream:
    """Run the client side of the WebSocket upgrade over ``transport`` and return the stream.

    The connection's reader task is started in ``nursery`` and ends when the stream is closed.  Takes ownership
    of ``transport``: it is closed if the upgrade fails.  Apply a timeout around this call (for example
    ``trio.fail_after``); raises :class:`WebSocketUpgradeError` when the server refuses or hangs up.  The server's
    small frames are charged to ``frame_budget``, by default one of the connection's own (module docstring).
    """
    stream: WebSocketStream = await nursery.start(
        functools.partial(
            _host_connection,
            transport,
            client=True,
            host_header=host_header,
            path=path,
            close_timeout=close_timeout,
            frame_budget=frame_budget,
        )
    )
    return stream


async def accept_websocket_stream(
    nursery: trio.Nursery,
    transport: trio.abc.Stream,
    *,
    path: str = WS_PATH,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    frame_budget: FrameBudget | None = None,
) -> WebSocketStream:
    """Run the server side of the WebSocket upgrade over an accepted ``transport`` and return the stream.

    Requests for a path other than ``path`` are answered with HTTP 404 and raise :class:`WebSocketUpgradeError`.
    Same ownership and timeout rules as :func:`connect_websocket_stream`.  ``frame_budget`` pays for the small
    frames the peer sends (module docstring); by default the connection gets a budget of its own.
    """
    stream: WebSocketStream = await nursery.start(
        functools.partial(
            _host_connection,
            transport,
            client=False,
            host_header="",
            path=path,
            close_timeout=close_timeout,
            frame_budget=frame_budget,
        )
    )
    return stream

"""The node's side of the control API: a trio server on ``<home>/control.sock``.

Theory of operation
-------------------
:class:`ControlServer` owns a Unix listening socket and a nursery with one task per connection.  Starting it first
checks the socket path: a live node answering there stops us (:class:`NodeAlreadyRunningError`); a stale socket file
left by a dead node is removed.  The socket is bound, ``chmod``-ed to 0600 and only then put in listening state, so
there is no moment at which another user could connect; the home directory itself must not be open to other users.
On Linux the peer's uid is also checked (``SO_PEERCRED``) and must be ours; if it cannot be read the peer is refused.

Each connection reads frames (:mod:`p2pmsg.control.frames`) one at a time: a request is checked
(:func:`~p2pmsg.control.methods.check_params`), handed to its handler, and answered before the next one is read.  A
handler's :class:`ControlRequestError` becomes an error response with its code; any other exception becomes an
``internal`` error and is logged -- the server keeps running.  A malformed or oversize frame closes only that
connection, after a best-effort ``{"id": 0, "error": ...}`` frame saying why; the reason is logged and counted in
:attr:`ControlServer.dropped`.  Connections beyond ``max_connections`` get the same treatment.

``subscribe`` turns the connection into an event stream fed by an :class:`EventHub`.  The node calls
:meth:`EventHub.publish`, which never blocks: each subscriber has a bounded queue, and a subscriber whose queue is
full (it does not read) is disconnected and counted (``control_slow_subscriber``) rather than slowing the node.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import trio

from p2pmsg.control.errors import (
    ERROR_CODES,
    ControlProtocolError,
    ControlRequestError,
    ControlSetupError,
    NodeAlreadyRunningError,
)
from p2pmsg.control.frames import (
    DEFAULT_MAX_REQUEST_SIZE,
    DEFAULT_MAX_RESPONSE_SIZE,
    MAX_ERROR_MESSAGE,
    FrameReader,
    Request,
    encode_error,
    encode_event,
    encode_result,
    parse_request,
)
from p2pmsg.control.methods import check_params
from p2pmsg.control.socketpath import SocketState, probe_socket
from p2pmsg.errors import LocalProtocolError

__all__ = ["DEFAULT_MAX_CONNECTIONS", "DEFAULT_SUBSCRIBER_QUEUE", "ControlServer", "EventHub", "Handler"]

log = logging.getLogger("p2pmsg.control")

#: A method handler: takes the checked params map, returns a msgpack-encodable result.
Handler = Callable[[dict[str, Any]], Awaitable[Any]]

DEFAULT_MAX_CONNECTIONS: Final = 32
#: Events queued per subscriber: more than one transaction publishes at once (a send_many of 1,000 texts, a received
#: batch of 2,048 messages, one event each), so a subscriber that keeps up is never dropped for a burst; memory is
#: bounded by DEFAULT_SUBSCRIBER_BYTES.  (256 dropped `p2pmsg chat` piping 300 lines: its own send_many's events.)
DEFAULT_SUBSCRIBER_QUEUE: Final = 8192
DEFAULT_SUBSCRIBER_BYTES: Final = 8 * 1024 * 1024
#: Largest event frame (a chat message event is a few KiB at most).
DEFAULT_MAX_EVENT_SIZE: Final = 1024 * 1024
#: How long the server tries to deliver the "why I close this connection" frame.
GOODBYE_TIMEOUT: Final = 1.0
_READ_SIZE: Final = 64 * 1024
#: Most bytes of event frames the pump joins into one write.
_PUMP_BYTES: Final = 256 * 1024
_BACKLOG: Final = 16
#: accept() errors that mean "out of resources, try again shortly" rather than "the listener is broken".
_ACCEPT_RETRY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_DELAY: Final = 0.1


# ---------------------------------------------------------------------------------------------------------------------
# Events


class _Subscriber:
    __slots__ = ("cancel_scope", "queued_bytes", "receive", "send")

    def __init__(self, queue_size: int) -> None:
        self.send, self.receive = trio.open_memory_channel[bytes](queue_size)
        self.cancel_scope = trio.CancelScope()
        self.queued_bytes = 0


class EventHub:
    """Fan-out of node events to the control connections that subscribed.

    :meth:`publish` is synchronous and never blocks or fails because of a subscriber; call it from the node's trio
    thread.  A subscriber that lets more than ``queue_size`` events or ``max_queued_bytes`` bytes pile up is
    disconnected and counted in :attr:`dropped`.
    """

    def __init__(
        self,
        *,
        queue_size: int = DEFAULT_SUBSCRIBER_QUEUE,
        max_queued_bytes: int = DEFAULT_SUBSCRIBER_BYTES,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
    ) -> None:
        """Bound each subscriber's backlog to ``queue_size`` events and ``max_queued_bytes`` bytes; refuse (as a
        local error) any event whose frame is larger than ``max_event_size`` bytes."""
        if queue_size < 1 or max_queued_bytes < 1 or max_event_size < 1:
            raise LocalProtocolError("queue_size, max_queued_bytes and max_event_size must be positive")
        self._queue_size = queue_size
        self._max_queued_bytes = max_queued_bytes
        self._max_event_size = max_event_size
        self._subscribers: list[_Subscriber] = []
        self._dropped: collections.Counter[str] = collections.Counter()
        self._published = 0

    @property
    def subscribers(self) -> int:
        """How many connections are subscribed now."""
        return len(self._subscribers)

    @property
    def published(self) -> int:
        """How many events were published so far."""
        return self._published

    @property
    def dropped(self) -> dict[str, int]:
        """Subscribers dropped, by reason (``control_slow_subscriber``)."""
        return dict(self._dropped)

    def publish(self, event: str, /, **fields: Any) -> None:
        """Send ``{"event": event, **fields}`` to every subscriber.

        With no subscriber it only counts the event (nothing is encoded).  The chat service asks :attr:`subscribers`
        first and does not build its per-message and per-batch events at all while there is none, so those are not
        counted.  Raises :class:`LocalProtocolError` (the caller's bug) if the event cannot be encoded or
        is too large.
        """
        self._published += 1
        if not self._subscribers:  # the usual case: nobody listens, so encode nothing
            return
        frame = encode_event(event, fields, max_size=self._max_event_size)
        for subscriber in list(self._subscribers):
            if subscriber.queued_bytes + len(frame) > self._max_queued_bytes:
                self._drop_slow(subscriber)
                continue
            try:
                subscriber.send.send_nowait(frame)
            except trio.WouldBlock:
                self._drop_slow(subscriber)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._remove(subscriber)
            else:
                subscriber.queued_bytes += len(frame)

    def _drop_slow(self, subscriber: _Subscriber) -> None:
        self._remove(subscriber)
        subscriber.cancel_scope.cancel()
        self._dropped["control_slow_subscriber"] += 1
        log.warning(
            "control: dropped a subscriber that fell behind (%d events, %d bytes queued)",
            subscriber.send.statistics().current_buffer_used,
            subscriber.queued_bytes,
        )

    def _add(self) -> _Subscriber:
        subscriber = _Subscriber(self._queue_size)
        self._subscribers.append(subscriber)
        return subscriber

    def _remove(self, subscriber: _Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)
        subscriber.send.close()


# ---------------------------------------------------------------------------------------------------------------------
# Server


class ControlServer:
    """The control API server of one node (see the module docstring).

    Run it with ``await nursery.start(server.serve)``: it returns once the socket is listening, and the server runs
    until cancelled, removing its socket file on the way out.  Call :meth:`bind` first to get a refusal to start
    (another node running, unsafe home) as a plain exception rather than inside the nursery's exception group.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handlers: Mapping[str, Handler],
        events: EventHub | None = None,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        error_codes: Mapping[type[BaseException], str] | None = None,
    ) -> None:
        """Serve ``handlers`` (method name -> handler) on the Unix socket ``path``.

        ``events`` feeds ``subscribe`` (without it ``subscribe`` answers ``bad_request``).  ``error_codes`` maps
        exception types a handler may raise to the error code sent back (e.g. a chat layer's "no such contact" error
        to ``unknown_contact``), so handlers need not translate them; the first matching entry wins.
        """
        if max_connections < 1:
            raise LocalProtocolError(f"max_connections must be positive, got {max_connections}")
        for exc_type, code in (error_codes or {}).items():
            if code not in ERROR_CODES:
                raise LocalProtocolError(f"error_codes: {exc_type.__name__} maps to unknown code {code!r}")
        self.path = Path(path)
        self._handlers = dict(handlers)
        self._events = events
        self._max_connections = max_connections
        self._max_request_size = max_request_size
        self._max_response_size = max_response_size
        self._error_codes = dict(error_codes or {})
        self._connections = 0
        self._dropped: collections.Counter[str] = collections.Counter()
        self._socket_id: tuple[int, int] | None = None
        self._listener: trio.SocketListener | None = None

    @property
    def connections(self) -> int:
        """How many control connections are open now."""
        return self._connections

    @property
    def dropped(self) -> dict[str, int]:
        """Connections closed because of their input, and subscribers dropped, by reason."""
        counts = collections.Counter(self._dropped)
        if self._events is not None:
            counts.update(self._events.dropped)
        return dict(counts)

    def _count(self, reason: str) -> None:
        self._dropped[reason] += 1

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def _prepare_path(self) -> None:
        directory = self.path.parent
        try:
            info = directory.stat()
        except FileNotFoundError:
            raise ControlSetupError(
                f"the node's home {directory} does not exist (create it with `p2pmsg init`)"
            ) from None
        if not stat.S_ISDIR(info.st_mode):
            raise ControlSetupError(f"the node's home {directory} is not a directory")
        if info.st_mode & 0o077:
            raise ControlSetupError(
                f"the node's home {directory} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run `chmod 700 {directory}`"
            )
        if info.st_uid != os.geteuid():
            raise ControlSetupError(f"the node's home {directory} belongs to another user (uid {info.st_uid})")
        state = await trio.to_thread.run_sync(probe_socket, self.path)
        if state is SocketState.RUNNING:
            raise NodeAlreadyRunningError(
                f"another node is already running on {directory} (its control socket {self.path} answers); "
                "stop it first or use another --home"
            )
        if state is SocketState.STALE:
            log.info("control: removing stale socket %s left by a node that is gone", self.path)
            self.path.unlink(missing_ok=True)

    async def _listen(self) -> trio.SocketListener:
        await self._prepare_path()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                await sock.bind(os.fspath(self.path))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise NodeAlreadyRunningError(
                        f"another node is already running on {self.path.parent} (it created {self.path} just now)"
                    ) from None
                raise ControlSetupError(
                    f"cannot create the control socket {self.path}: {exc.strerror or exc}"
                ) from None
            # Nobody can connect before listen(), so tightening the mode here leaves no window.
            os.chmod(self.path, 0o600)
            info = self.path.lstat()
            self._socket_id = (info.st_dev, info.st_ino)
            sock.listen(_BACKLOG)
        except BaseException:
            sock.close()
            self._remove_socket_file()
            raise
        return trio.SocketListener(sock)

    def _remove_socket_file(self) -> None:
        if self._socket_id is None:
            return
        try:
            info = self.path.lstat()
            if (info.st_dev, info.st_ino) == self._socket_id:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            self._socket_id = None

    async def bind(self) -> None:
        """Create the listening socket now (``serve`` does it if this was not called).

        Raises :class:`NodeAlreadyRunningError` or :class:`ControlSetupError` directly, outside any nursery, so a
        node can check before it starts anything else.
        """
        if self._listener is None:
            self._listener = await self._listen()
            log.info("control: listening on %s", self.path)

    async def aclose(self) -> None:
        """Close a socket made by :meth:`bind` that was never served (``serve`` cleans up after itself)."""
        if self._listener is not None:
            listener, self._listener = self._listener, None
            self._remove_socket_file()
            await trio.aclose_forcefully(listener)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled (see the class docstring); removes the socket file when it ends."""
        await self.bind()
        listener = self._listener
        assert listener is not None
        self._listener = None
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self._accept_loop(listener, nursery)
        finally:
            self._remove_socket_file()
            await trio.aclose_forcefully(listener)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    log.warning("control: accept failed (%s); retrying", exc.strerror)
                    await trio.sleep(_ACCEPT_RETRY_DELAY)
                    continue
                raise
            refusal = _peer_user_refusal(stream)
            if refusal is not None:
                self._count(refusal)
                await trio.aclose_forcefully(stream)
                continue
            if self._connections >= self._max_connections:
                self._count("control_too_many_connections")
                log.warning("control: refused a connection: %d already open", self._connections)
                await self._goodbye(
                    stream, "internal", f"too many control connections (at most {self._max_connections})"
                )
                continue
            self._connections += 1
            nursery.start_soon(self._serve_connection, stream)

    # -- one connection ---------------------------------------------------------------------------------------------

    async def _goodbye(self, stream: trio.SocketStream, code: str, message: str) -> None:
        """Best effort: tell the client why, then close."""
        with trio.move_on_after(GOODBYE_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(
                    encode_error(0, code, message[:MAX_ERROR_MESSAGE], max_size=self._max_response_size)
                )
        await trio.aclose_forcefully(stream)

    async def _read_frame(self, stream: trio.SocketStream, reader: FrameReader) -> bytes | None:
        while True:
            body = reader.next_frame()
            if body is not None:
                return body
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                if reader.at_boundary:
                    return None
                raise ControlProtocolError("body", "connection closed in the middle of a frame")
            reader.receive_data(data)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        reader = FrameReader(self._max_request_size)
        try:
            while True:
                body = await self._read_frame(stream, reader)
                if body is None:
                    return
                request = parse_request(body, max_size=self._max_request_size)
                if request.method == "subscribe":
                    await self._subscription(stream, reader, request)
                    return
                await stream.send_all(await self._dispatch(request))
        except ControlProtocolError as exc:
            self._count(exc.drop_reason)
            log.warning("control: closing a connection: %s", exc)
            await self._goodbye(stream, "bad_request", str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("control: connection lost: %r", exc)
        except Exception:
            # A bug of ours: lose this connection, never the server.
            self._count("control_internal_error")
            log.exception("control: connection failed")
        finally:
            self._connections -= 1
            await trio.aclose_forcefully(stream)

    def _error_frame(self, request: Request, code: str, message: str) -> bytes:
        return encode_error(request.id, code, message[:MAX_ERROR_MESSAGE], max_size=self._max_response_size)

    def _code_for(self, exc: BaseException) -> str | None:
        for exc_type, code in self._error_codes.items():
            if isinstance(exc, exc_type):
                return code
        return None

    async def _dispatch(self, request: Request) -> bytes:
        method = request.method
        try:
            handler = self._handlers.get(method)
            if handler is None:
                raise ControlRequestError("bad_request", f"unknown method {method!r}")
            params = check_params(method, request.params)
            result = await handler(params)
        except ControlRequestError as exc:
            code = exc.code if exc.code in ERROR_CODES else "internal"
            return self._error_frame(request, code, exc.message)
        except Exception as exc:
            mapped = self._code_for(exc)
            if mapped is not None:
                return self._error_frame(request, mapped, str(exc))
            self._count("control_handler_error")
            log.exception("control: handler of %r failed", method)
            return self._error_frame(
                request, "internal", f"{method} failed: internal error ({type(exc).__name__}); see the node's log"
            )
        try:
            return encode_result(request.id, result, max_size=self._max_response_size)
        except LocalProtocolError as exc:
            self._count("control_handler_error")
            log.error("control: result of %r cannot be sent: %s", method, exc)
            return self._error_frame(request, "internal", f"{method} failed: its result cannot be sent ({exc})")

    async def _subscription(self, stream: trio.SocketStream, reader: FrameReader, request: Request) -> None:
        if self._events is None:
            await stream.send_all(self._error_frame(request, "bad_request", "this node publishes no events"))
            return
        try:
            check_params("subscribe", request.params)
        except ControlRequestError as exc:
            await stream.send_all(self._error_frame(request, exc.code, exc.message))
            return
        hub = self._events
        subscriber = hub._add()  # before the answer, so no event published after it is missed
        problem: list[ControlProtocolError] = []
        try:
            await stream.send_all(encode_result(request.id, {}, max_size=self._max_response_size))
            with subscriber.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_subscriber, stream, reader, nursery.cancel_scope, problem)
                    await _pump(stream, subscriber)
                    nursery.cancel_scope.cancel()
        finally:
            hub._remove(subscriber)
        if problem:
            raise problem[0]

    async def _watch_subscriber(
        self,
        stream: trio.SocketStream,
        reader: FrameReader,
        scope: trio.CancelScope,
        problem: list[ControlProtocolError],
    ) -> None:
        """A subscriber only listens: its end of stream ends the subscription; any frame it sends is an error."""
        try:
            body = await self._read_frame(stream, reader)
            if body is not None:
                raise ControlProtocolError("body", "a subscribed connection must not send frames")
        except ControlProtocolError as exc:
            problem.append(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def _pump(stream: trio.SocketStream, subscriber: _Subscriber) -> None:
    """Copy event frames to the subscriber until the hub closes its queue or the subscriber goes away.

    Everything queued is written with one ``send_all`` (bounded by :data:`_PUMP_BYTES`), so a burst of events costs
    one system call rather than one per event, and the queue drains as fast as the socket takes it.
    """
    try:
        async for frame in subscriber.receive:
            frames = [frame]
            size = len(frame)
            while size < _PUMP_BYTES:
                try:
                    more = subscriber.receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break  # the end of the channel, if that is why, ends the loop above next time
                frames.append(more)
                size += len(more)
            subscriber.queued_bytes -= size
            await stream.send_all(b"".join(frames) if len(frames) > 1 else frame)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _peer_user_refusal(stream: trio.SocketStream) -> str | None:
    """Why the connecting peer is refused (a ``dropped`` reason), or ``None`` if it runs as our user.

    Without ``SO_PEERCRED`` (not Linux) the socket's 0600 mode and the 0700 home are the only guard and every peer
    passes.  Where the option exists but cannot be read the peer is refused: failing open would let anyone in.
    """
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is None:
        return None
    size = struct.calcsize("3i")
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, peercred, size)
    except OSError as exc:
        log.warning("control: refused a connection: cannot read the peer's credentials (%s)", exc)
        return "control_peercred_failed"
    if not isinstance(raw, bytes) or len(raw) != size:
        log.warning("control: refused a connection: cannot read the peer's credentials (short answer)")
        return "control_peercred_failed"
    _pid, uid, _gid = struct.unpack("3i", raw)
    if uid != os.geteuid():
        log.warning("control: refused a connection from another user")
        return "control_foreign_user"
    return None

"""The client side of the control API: synchronous, plain ``socket`` (the CLI needs no trio).

Theory of operation
-------------------
:class:`ControlClient` opens ``<home>/control.sock`` on first use and keeps that one connection for its calls:
:meth:`ControlClient.call` sends ``{id, method, params}`` and blocks until the matching response arrives, returning
the result or raising :class:`ControlRequestError` with the node's error code.  :meth:`ControlClient.events` opens a
second connection, subscribes, and returns an :class:`EventStream`: an iterator of event maps that ends when the node
goes away or :meth:`EventStream.close` is called (from any thread: it shuts the socket down, which wakes a reader
blocked in ``recv``).

No socket, or a socket nobody listens on, raises :class:`NodeNotRunningError` whose message says how to start the
node.  Any transport failure or malformed answer in the middle of a call drops the connection (the next call opens
a new one) and raises :class:`ControlConnectionError` or :class:`ControlProtocolError`.  A client object is meant
for one thread at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from p2pmsg.control.errors import (
    ControlConnectionError,
    ControlProtocolError,
    ControlRequestError,
    NodeNotRunningError,
)
from p2pmsg.control.frames import (
    DEFAULT_MAX_REQUEST_SIZE,
    DEFAULT_MAX_RESPONSE_SIZE,
    Event,
    FrameReader,
    Response,
    encode_request,
    parse_reply,
)
from p2pmsg.control.socketpath import control_socket_path, start_hint

__all__ = ["DEFAULT_TIMEOUT", "ControlClient", "EventStream"]

#: Seconds to wait for a response before giving up (``None`` waits forever).
DEFAULT_TIMEOUT: Final = 30.0
_READ_SIZE: Final = 64 * 1024


def _not_running(home: Path, path: Path) -> NodeNotRunningError:
    quoted = shlex.quote(str(home))
    if not home.is_dir():
        return NodeNotRunningError(
            f"no p2pmsg node is running on {home}: that directory does not exist. "
            f"Create it with `p2pmsg --home {quoted} init`, then start the node with `{start_hint(home)}`."
        )
    return NodeNotRunningError(
        f"no p2pmsg node is running on {home} (nothing answers on {path}). "
        f"Start it with `{start_hint(home)}` (in another terminal, or as a service)."
    )


def _foreign_owner(home: Path, path: Path) -> ControlConnectionError | None:
    """The error to raise instead of a refused or reset connection when the socket belongs to another user: the
    node talks only to its own user (``SO_PEERCRED``), which a reset does not say (``sudo p2pmsg status`` on a node
    run by a service user)."""
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return None
    if uid == os.geteuid():
        return None
    try:
        import pwd  # Unix only, like the socket

        user = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        user = f"uid {uid}"
    quoted = shlex.quote(str(home))
    return ControlConnectionError(
        f"the node on {home} runs as user {user} and answers only that user: run the command as {user} "
        f"(e.g. `sudo -u {shlex.quote(user)} p2pmsg --home {quoted} ...`)"
    )


def _connect(home: Path, timeout: float | None) -> socket.socket:
    path = control_socket_path(home)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise _not_running(home, path) from None
    except PermissionError:
        sock.close()
        foreign = _foreign_owner(home, path)
        if foreign is not None:
            raise foreign from None
        raise ControlConnectionError(f"permission denied on {path}: is the node running as another user?") from None
    except TimeoutError:
        sock.close()
        raise ControlConnectionError(f"the node on {home} does not accept connections (waited {timeout} s)") from None
    except OSError as exc:
        sock.close()
        raise ControlConnectionError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return sock


def _read_reply(sock: socket.socket, reader: FrameReader, *, timeout: float | None) -> Response | Event | None:
    """The next frame from the node, validated; ``None`` at a clean end of stream."""
    while True:
        body = reader.next_frame()
        if body is not None:
            return parse_reply(body, max_size=reader.max_size)
        try:
            data = sock.recv(_READ_SIZE)
        except TimeoutError:
            raise ControlConnectionError(f"no answer from the node within {timeout} s") from None
        except OSError as exc:
            raise ControlConnectionError(f"control connection failed: {exc.strerror or exc}") from None
        if not data:
            if reader.at_boundary:
                return None
            raise ControlConnectionError("the node closed the control connection in the middle of a frame")
        reader.receive_data(data)


class ControlClient:
    """A synchronous client of the node running on ``home`` (see the module docstring)."""

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
    ) -> None:
        """Talk to the node whose home directory is ``home``; ``timeout`` bounds each connect and each call."""
        self.home = Path(home)
        self.timeout = timeout
        self._max_response_size = max_response_size
        self._max_request_size = max_request_size
        self._sock: socket.socket | None = None
        self._reader = FrameReader(max_response_size)
        self._ids = itertools.count(1)

    @property
    def path(self) -> Path:
        """The control socket's path."""
        return control_socket_path(self.home)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._reader = FrameReader(self._max_response_size)

    def call(self, method: str, /, **params: Any) -> Any:
        """Call ``method`` with ``params`` and return its result.

        Raises :class:`ControlRequestError` (the node answered with an error code), :class:`NodeNotRunningError`,
        :class:`ControlConnectionError` or :class:`ControlProtocolError`.
        """
        request_id = next(self._ids)
        frame = encode_request(request_id, method, params, max_size=self._max_request_size)
        if self._sock is None:
            self._sock = _connect(self.home, self.timeout)
        sock = self._sock
        try:
            try:
                sock.sendall(frame)
            except TimeoutError:
                raise ControlConnectionError(f"the node did not take the request within {self.timeout} s") from None
            except OSError as exc:
                raise ControlConnectionError(f"control connection failed: {exc.strerror or exc}") from None
            reply = _read_reply(sock, self._reader, timeout=self.timeout)
        except ControlConnectionError as exc:
            self._drop()
            raise _foreign_owner(self.home, self.path) or exc from None
        except BaseException:
            self._drop()
            raise
        if reply is None:
            self._drop()
            closed = ControlConnectionError("the node closed the control connection (is it shutting down?)")
            raise _foreign_owner(self.home, self.path) or closed
        if isinstance(reply, Event):
            self._drop()
            raise ControlProtocolError("event", f"event {reply.event!r} on a connection that did not subscribe")
        if reply.id == 0 and reply.error_code is not None:
            self._drop()  # an error about the connection itself; the node closes it
            raise ControlRequestError(reply.error_code, reply.error_message)
        if reply.id != request_id:
            self._drop()
            raise ControlProtocolError("id", f"response to request {reply.id}, expected {request_id}")
        if reply.error_code is not None:
            raise ControlRequestError(reply.error_code, reply.error_message)
        return reply.result

    def events(self) -> EventStream:
        """Subscribe on a new connection; iterate the returned stream for event maps (``{"event": ..., ...}``)."""
        sock = _connect(self.home, self.timeout)
        reader = FrameReader(self._max_response_size)
        try:
            sock.sendall(encode_request(1, "subscribe", {}, max_size=self._max_request_size))
            reply = _read_reply(sock, reader, timeout=self.timeout)
            if reply is None:
                raise ControlConnectionError("the node closed the control connection (is it shutting down?)")
            if isinstance(reply, Event):
                raise ControlProtocolError("event", "event before the answer to subscribe")
            if reply.error_code is not None:
                raise ControlRequestError(reply.error_code, reply.error_message)
            if reply.id != 1:
                raise ControlProtocolError("id", f"response to request {reply.id}, expected 1")
            sock.settimeout(None)  # events may be hours apart
        except OSError as exc:
            sock.close()
            raise ControlConnectionError(f"control connection failed: {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise
        return EventStream(sock, reader)

    def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        self._drop()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class EventStream:
    """An iterator of event maps from a subscribed connection; ends when the node closes it or on :meth:`close`."""

    def __init__(self, sock: socket.socket, reader: FrameReader) -> None:
        """Wrap a connection whose ``subscribe`` was already answered (use :meth:`ControlClient.events`)."""
        self._sock = sock
        self._reader = reader
        self._lock = threading.Lock()
        self._closed = False

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise StopIteration
        try:
            reply = _read_reply(self._sock, self._reader, timeout=None)
        except ControlConnectionError:
            if self._closed:  # closed from another thread while we were reading
                raise StopIteration from None
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        if reply is None:
            self.close()
            raise StopIteration
        if isinstance(reply, Response):
            self.close()
            if reply.id == 0 and reply.error_code is not None:
                raise ControlRequestError(reply.error_code, reply.error_message)
            raise ControlProtocolError("event", "a response on a subscribed connection")
        return {"event": reply.event, **reply.fields}

    def close(self) -> None:
        """Stop the stream; safe to call from another thread while one is blocked in ``next()``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

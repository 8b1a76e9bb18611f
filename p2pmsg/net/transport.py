"""Transports: from a multiaddr to a raw byte stream (TCP or WebSocket over TCP), and listening on multiaddrs.

Theory of operation
-------------------
A transport multiaddr has the shape ``/<ip4|ip6|dns4|dns6>/<host>/tcp/<port>[/ws][/p2p/<peer-id>]``.
:func:`parse_transport_address` checks that shape and returns a :class:`TransportAddress`; anything else (``/udp``,
``/quic``, ``/wss``, ``/tls``, ``/p2p-circuit`` ...) is an :class:`UnsupportedAddressError` naming the component.
The ``/p2p`` suffix is ignored here: which peer must answer is the dialer's business.

:func:`open_stream` connects with ``TCP_NODELAY`` on.  ``ip4``/``ip6`` hosts are used as they are; ``dns4``/``dns6``
names are resolved with ``getaddrinfo`` restricted to that address family, and at most
:data:`MAX_RESOLVED_ADDRESSES` results are tried in order.  For ``/ws`` it then runs the WebSocket upgrade (path
``/``, no subprotocol) via :mod:`p2pmsg.net.websocket`.  One deadline covers resolution, connect and upgrade.
Every failure is a :class:`TransportError` whose message names the address and the reason; the socket is closed.

:func:`open_listeners` binds one TCP listening socket per multiaddr (``ip4``/``ip6`` only, port 0 allowed) and
reports the address actually bound as a multiaddr (``/ws`` kept), so callers can publish it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import math
import socket as stdlib_socket
import struct
import termios
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import trio

from p2pmsg.errors import LocalProtocolError, P2PMsgError
from p2pmsg.net.websocket import WS_PATH, WebSocketStream, connect_websocket_stream
from p2pmsg.wire.multiaddr import Multiaddr

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "MAX_RESOLVED_ADDRESSES",
    "BoundListener",
    "TransportAddress",
    "TransportError",
    "TransportTimeoutError",
    "UnsupportedAddressError",
    "open_listeners",
    "open_stream",
    "parse_transport_address",
    "remote_multiaddr",
    "tcp_send_progress",
]

DEFAULT_CONNECT_TIMEOUT: Final = 10.0
"""Seconds allowed for resolution, TCP connect and (for ``/ws``) the WebSocket upgrade together."""
MAX_RESOLVED_ADDRESSES: Final = 8
"""At most this many ``getaddrinfo`` results are tried for one DNS multiaddr."""

TransportKind = Literal["tcp", "ws"]
HostFamily = Literal["ip4", "ip6", "dns4", "dns6"]

_SockAddr = tuple[Any, ...]
_HOST_FAMILIES: Final[dict[str, HostFamily]] = {
    "ip4": "ip4",
    "ip6": "ip6",
    "dns4": "dns4",
    "dns6": "dns6",
}
_MAX_HOST_LEN: Final = 253
_FAMILIES: Final[dict[str, int]] = {
    "ip4": stdlib_socket.AF_INET,
    "ip6": stdlib_socket.AF_INET6,
    "dns4": stdlib_socket.AF_INET,
    "dns6": stdlib_socket.AF_INET6,
}


class TransportError(P2PMsgError):
    """Connecting to, or listening on, a multiaddr failed; the message names the address and the reason."""


class TransportTimeoutError(TransportError):
    """Resolution, connect or WebSocket upgrade did not finish within the timeout."""


class UnsupportedAddressError(TransportError):
    """The multiaddr is not one this transport layer can use (the message names the component)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportAddress:
    """The transport part of a multiaddr."""

    kind: TransportKind
    """``"tcp"`` for a plain TCP stream, ``"ws"`` for WebSocket over TCP."""
    family: HostFamily
    """The host component's protocol name."""
    host: str
    """The IP address (``ip4``/``ip6``) or the DNS name."""
    port: int
    """The TCP port (0 only makes sense for listening)."""

    @property
    def is_ip(self) -> bool:
        """True when :attr:`host` is an IP literal (no resolution needed)."""
        return self.family in ("ip4", "ip6")

    def host_header(self) -> str:
        """The HTTP ``Host`` header for the WebSocket upgrade (IPv6 bracketed, port omitted when it is 80)."""
        host = f"[{self.host}]" if self.family == "ip6" else self.host
        return host if self.port == 80 else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class BoundListener:
    """A listening TCP socket and the multiaddr it is really bound to."""

    kind: TransportKind
    """``"tcp"`` or ``"ws"``: what accepted connections must speak first."""
    listener: trio.SocketListener
    """The trio listener (close it, or hand it to ``trio.serve_listeners`` which closes it)."""
    addr: Multiaddr
    """The bound address, with the real port when 0 was asked for."""


def parse_transport_address(maddr: Multiaddr) -> TransportAddress:
    """Return the transport part of ``maddr`` or raise :class:`UnsupportedAddressError` saying what is wrong."""
    parts = list(maddr.components)
    if parts and parts[-1][0] == "p2p":
        parts.pop()
    if len(parts) < 2:
        raise UnsupportedAddressError(f"{maddr}: needs a host and a /tcp port, e.g. /ip4/192.0.2.1/tcp/4001")
    (proto, host), (tcp, port_text) = parts[0], parts[1]
    family = _HOST_FAMILIES.get(proto)
    if family is None:
        raise UnsupportedAddressError(f"{maddr}: the first component must be ip4, ip6, dns4 or dns6, not {proto}")
    if tcp != "tcp":
        raise UnsupportedAddressError(f"{maddr}: only /tcp is supported after the host, not /{tcp}")
    rest = parts[2:]
    kind: TransportKind = "tcp"
    if rest and rest[0][0] == "ws":
        kind = "ws"
        rest = rest[1:]
    if rest:
        raise UnsupportedAddressError(f"{maddr}: unsupported component /{rest[0][0]} after /tcp/{port_text}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UnsupportedAddressError(f"{maddr}: tcp port {port_text!r} is not an integer in 0..65535")
    if not host or len(host) > _MAX_HOST_LEN:
        raise UnsupportedAddressError(f"{maddr}: host must be 1..{_MAX_HOST_LEN} characters")
    if proto in ("ip4", "ip6"):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise UnsupportedAddressError(f"{maddr}: {host!r} is not an {proto} address") from None
        if (proto == "ip4") != (ip.version == 4):
            raise UnsupportedAddressError(f"{maddr}: {host!r} is not an {proto} address")
        host = str(ip)
    return TransportAddress(kind=kind, family=family, host=host, port=int(port_text))


async def _resolve(address: TransportAddress) -> list[tuple[int, _SockAddr]]:
    """Socket addresses to try, in order: the IP itself, or the first few DNS answers of the right family."""
    if address.family == "ip4":
        return [(stdlib_socket.AF_INET, (address.host, address.port))]
    if address.family == "ip6":
        return [(stdlib_socket.AF_INET6, (address.host, address.port, 0, 0))]
    try:
        infos = await trio.socket.getaddrinfo(
            address.host,
            address.port,
            family=_FAMILIES[address.family],
            type=stdlib_socket.SOCK_STREAM,
            proto=stdlib_socket.IPPROTO_TCP,
        )
    except (OSError, UnicodeError) as exc:
        raise TransportError(f"cannot resolve {address.host!r}: {exc}") from exc
    result: list[tuple[int, _SockAddr]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (stdlib_socket.AF_INET, stdlib_socket.AF_INET6) and (family, sockaddr) not in result:
            result.append((family, sockaddr))
        if len(result) == MAX_RESOLVED_ADDRESSES:
            break
    if not result:
        raise TransportError(f"{address.host!r} has no {address.family} address")
    return result


async def _connect_tcp(family: int, sockaddr: _SockAddr) -> trio.SocketStream:
    sock = trio.socket.socket(family, stdlib_socket.SOCK_STREAM, stdlib_socket.IPPROTO_TCP)
    try:
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        await sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _open_tcp(address: TransportAddress) -> trio.SocketStream:
    errors: list[str] = []
    for family, sockaddr in await _resolve(address):
        try:
            return await _connect_tcp(family, sockaddr)
        except OSError as exc:
            errors.append(f"{sockaddr[0]} port {sockaddr[1]}: {exc.strerror or exc}")
    raise TransportError("; ".join(errors))


async def open_stream(
    maddr: Multiaddr,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    nursery: trio.Nursery | None = None,
) -> trio.abc.Stream:
    """Connect to ``maddr`` and return the raw (not yet secured) byte stream.

    ``/tcp`` gives a :class:`trio.SocketStream` with ``TCP_NODELAY`` set; ``/tcp/N/ws`` gives a
    :class:`~p2pmsg.net.websocket.WebSocketStream`, whose reader task runs in ``nursery`` (required for ``/ws``,
    otherwise unused) until the stream is closed.  Raises :class:`TransportTimeoutError` after ``timeout`` seconds,
    :class:`UnsupportedAddressError` for an address of another shape, :class:`TransportError` for any other failure.
    """
    if not (timeout > 0 and not math.isnan(timeout)):
        raise LocalProtocolError(f"open_stream: timeout must be a positive number of seconds, got {timeout}")
    address = parse_transport_address(maddr)
    if address.port == 0:
        raise UnsupportedAddressError(f"{maddr}: cannot connect to port 0")
    if address.kind == "ws" and nursery is None:
        raise LocalProtocolError(f"open_stream: {maddr} is a WebSocket address; pass nursery= for its reader task")
    stream: trio.abc.Stream | None = None
    with trio.move_on_after(timeout) as scope:
        try:
            tcp = await _open_tcp(address)
            if address.kind == "ws":
                assert nursery is not None
                stream = await connect_websocket_stream(nursery, tcp, host_header=address.host_header(), path=WS_PATH)
            else:
                stream = tcp
        except TransportError as exc:
            raise TransportError(f"{maddr}: {exc}") from exc
        except P2PMsgError as exc:  # WebSocketUpgradeError
            raise TransportError(f"{maddr}: {exc}") from exc
    if stream is None or scope.cancelled_caught:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise TransportTimeoutError(f"{maddr}: no connection within {timeout:g} s")
    return stream


async def _bind(address: TransportAddress, backlog: int) -> trio.SocketListener:
    family = _FAMILIES[address.family]
    sock = trio.socket.socket(family, stdlib_socket.SOCK_STREAM, stdlib_socket.IPPROTO_TCP)
    try:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        if family == stdlib_socket.AF_INET6:
            sock.setsockopt(stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY, 1)
        await sock.bind((address.host, address.port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _multiaddr_for(sockaddr: tuple[object, ...], kind: TransportKind) -> Multiaddr:
    return Multiaddr.from_transport(kind, str(sockaddr[0]), int(str(sockaddr[1])))


async def open_listeners(addrs: Sequence[Multiaddr], *, backlog: int = 1024) -> list[BoundListener]:
    """Bind a listening socket for each multiaddr (``/ip4|ip6/<ip>/tcp/<port>[/ws]``, port 0 allowed).

    Returns them in the same order with the really bound address.  If any bind fails, the ones already bound are
    closed and :class:`TransportError` names the address and the reason.
    """
    bound: list[BoundListener] = []
    try:
        for maddr in addrs:
            address = parse_transport_address(maddr)
            if maddr.peer_id is not None:
                raise UnsupportedAddressError(f"{maddr}: a listening address carries no /p2p component")
            if not address.is_ip:
                raise UnsupportedAddressError(f"{maddr}: listening needs an ip4 or ip6 address, not {address.family}")
            try:
                listener = await _bind(address, backlog)
            except OSError as exc:
                raise TransportError(f"cannot listen on {maddr}: {exc.strerror or exc}") from exc
            sock = listener.socket
            try:
                real = _multiaddr_for(tuple(sock.getsockname()), address.kind)
            except BaseException:
                sock.close()
                raise
            bound.append(BoundListener(kind=address.kind, listener=listener, addr=real))
    except BaseException:
        for item in bound:
            item.listener.socket.close()  # synchronous, so a pending Cancelled cannot skip any of them
        raise
    return bound


def remote_multiaddr(stream: trio.abc.Stream, kind: TransportKind) -> Multiaddr | None:
    """The peer's observed address as a multiaddr (``/ws`` appended for WebSocket), or None if it is unknown."""
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = stream.socket
    try:
        return _multiaddr_for(tuple(sock.getpeername()), kind)
    except (OSError, P2PMsgError, ValueError):
        return None


_TCP_INFO_BYTES_ACKED: Final = struct.Struct("=Q")
"""``tcpi_bytes_acked`` of Linux's ``struct tcp_info`` (since Linux 4.1): a u64 at byte offset 120."""
_TCP_INFO_BYTES_ACKED_OFFSET: Final = 120


def tcp_send_progress(stream: trio.abc.Stream) -> tuple[int, int] | None:
    """How far the peer's TCP has taken what we wrote on the socket under ``stream`` (a TCP or WebSocket stream):
    ``(acknowledged, queued)``, the bytes it has acknowledged since the connection opened (``tcpi_bytes_acked`` of
    ``TCP_INFO``) and those written to the socket and not acknowledged yet (``SIOCOUTQ``, the same request as
    ``TIOCOUTQ``); None where that cannot be told (not a TCP socket, closed, not Linux).

    A sender that sees ``acknowledged`` grow while something is still queued knows a slow connection still moves,
    whatever the peer's application makes of the bytes."""
    inner = stream.socket_stream if isinstance(stream, WebSocketStream) else stream
    if not isinstance(inner, trio.SocketStream):
        return None
    sock = inner.socket
    end = _TCP_INFO_BYTES_ACKED_OFFSET + _TCP_INFO_BYTES_ACKED.size
    try:
        info = sock.getsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_INFO, end)
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError, AttributeError):  # closed, or no TCP_INFO / TIOCOUTQ here
        return None
    if len(info) < end:  # a kernel older than 4.1
        return None
    (acknowledged,) = _TCP_INFO_BYTES_ACKED.unpack_from(info, _TCP_INFO_BYTES_ACKED_OFFSET)
    (unacknowledged,) = struct.unpack("i", queued)
    return acknowledged, max(0, unacknowledged)

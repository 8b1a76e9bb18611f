"""The inbound side: accept TCP and WebSocket connections, authenticate them, hand secure channels to a handler.

Theory of operation
-------------------
:meth:`Listener.run` binds every listen multiaddr (:func:`~p2pmsg.net.transport.open_listeners`), reports the bound
addresses through ``task_status`` and serves until cancelled (or :meth:`Listener.stop`).  All tasks live in one
nursery owned by ``run``; when it ends, every connection is closed and every task has finished.

Each listening socket has an accept loop that admits a new connection at once (step 1); each admitted connection gets
one task, which owns everything the connection needs:

1. Admission, before any work for the peer: the new connection is closed at once if
   :attr:`ListenerConfig.max_connections` connections are already open, or
   :attr:`ListenerConfig.max_connections_per_ip` from its source (counted as ``rejected_overload``), or if its
   source has used up its handshake bucket (:attr:`ListenerConfig.handshake_rate_per_ip` a second, at most
   :attr:`ListenerConfig.handshake_burst_per_ip` at once, four times that per IPv4 /24 or IPv6 /48, and
   :attr:`ListenerConfig.handshake_rate_total` for all sources together; counted as ``rejected_rate``).  A
   handshake costs us public-key operations (about 0.6 ms here), so without the buckets one host could keep a core
   busy with them; a host rotating through many addresses is held by the wider buckets.  An address a contact
   recently connected from (the ``familiar`` hook) pays only its own bucket, so a flood that drains the wider ones
   does not lock contacts out.  When the bucket of all sources together is empty, a connection from a *quiet*
   network -- an IPv4 /16 or IPv6 /32 that started at most 8 connections lately, regaining one every 30 s; every
   connection counts -- may draw from a reserve of a quarter of that bucket: a flood from many networks then still
   lets a stranger, or a contact on a new network, in from elsewhere, unless it comes from hundreds of networks.
   A *source* is an IPv4 address or an IPv6 /64 (:func:`~p2pmsg.ratelimit.network_of`): one IPv6 host commonly
   holds a whole /64.  Loopback sources are not charged (unless :attr:`ListenerConfig.limit_loopback`), here or
   for WebSocket frames: several nodes of one machine talk over loopback, and a local process can take a core
   without our help.
2. Handshake, under one deadline of :attr:`ListenerConfig.handshake_timeout` seconds that starts at accept: wait for
   one of :attr:`ListenerConfig.max_concurrent_handshakes` slots, for ``/ws`` run the WebSocket upgrade, then run
   :func:`~p2pmsg.net.channel.secure_inbound`.  Waiting for a slot counts against the same deadline, so a flood of
   stalled connections delays a good client by at most one timeout and never ties up memory beyond the caps.
3. Hand-off: the authenticated :class:`~p2pmsg.net.channel.SecureChannel` and the peer's observed multiaddr go to
   the handler, which runs in the same task.  When the handler returns (or raises), the channel is closed.

On any failure the connection is closed, the reason is logged with the remote address and counted in
:class:`ListenerStats`, which :attr:`Listener.stats` returns as a snapshot for ``p2pmsg status``.  Timeouts and
transport errors are logged at INFO; every error the WebSocket upgrade or the secure channel reports (a
:class:`~p2pmsg.errors.RemoteProtocolError`, which includes a peer hanging up mid-handshake) at WARNING; a handler
that raises at ERROR with its traceback.  A failure never affects other connections or the listener.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

import trio

from p2pmsg.errors import LocalProtocolError, P2PMsgError, RemoteProtocolError
from p2pmsg.identity import Identity
from p2pmsg.logthrottle import LogThrottle
from p2pmsg.net.channel import SecureChannel, close_gracefully, secure_inbound
from p2pmsg.net.transport import TransportKind, open_listeners, remote_multiaddr
from p2pmsg.net.websocket import (
    WS_PATH,
    WS_SMALL_FRAME_BURST,
    WS_SMALL_FRAME_RATE,
    accept_websocket_stream,
)
from p2pmsg.ratelimit import RateLimiter, network_of, parse_ip
from p2pmsg.wire.multiaddr import Multiaddr

__all__ = [
    "DEFAULT_HANDSHAKE_BURST_PER_IP",
    "DEFAULT_HANDSHAKE_BURST_TOTAL",
    "DEFAULT_HANDSHAKE_RATE_PER_IP",
    "DEFAULT_HANDSHAKE_RATE_TOTAL",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_CONCURRENT_HANDSHAKES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_IP",
    "Handler",
    "Listener",
    "ListenerConfig",
    "ListenerStats",
]

logger = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
DEFAULT_MAX_CONCURRENT_HANDSHAKES: Final = 64
DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_MAX_CONNECTIONS_PER_IP: Final = 256
"""Inbound connections from one source (IPv4 address, IPv6 /64) at once: one host cannot take every slot (a NAT'd
office still fits)."""
DEFAULT_HANDSHAKE_RATE_PER_IP: Final = 4.0
"""Inbound connections a second that one source (IPv4 address, IPv6 /64) may start, after its burst."""
DEFAULT_HANDSHAKE_BURST_PER_IP: Final = 32
"""Inbound connections one source may start at once: a NAT'd office reconnecting after an outage fits."""
DEFAULT_HANDSHAKE_RATE_TOTAL: Final = 64.0
"""Inbound connections a second all sources together may start (a handshake costs about 0.6 ms: 4 % of a core)."""
DEFAULT_HANDSHAKE_BURST_TOTAL: Final = 256
"""Inbound connections all sources together may start at once: every contact reconnecting after a restart fits."""
_WIDE_FACTOR: Final = 4
"""The bucket of an IPv4 /24 or IPv6 /48 is this many times a source's."""
_RESERVE_SHARE: Final = 4
"""The reserve for quiet networks is this fraction (1/4) of the bucket for all sources together, rate and burst."""
_QUIET_BURST: Final = 8
"""Connections an IPv4 /16 or IPv6 /32 may start, within :data:`_QUIET_RATE`, and still count as quiet."""
_QUIET_RATE: Final = 1 / 30
"""... and the rate at which it regains them (one every 30 s)."""
# secure_inbound gets this much more time than our own deadline, so that our deadline is the one that fires and
# the failure is classified as a timeout.
_CHANNEL_TIMEOUT_MARGIN: Final = 1.0

Handler = Callable[[SecureChannel, Multiaddr | None], Awaitable[object]]
"""``handler(channel, remote_addr)``: called once per authenticated connection; the channel is closed after it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    """Limits of a :class:`Listener`."""

    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    """Seconds from accept to an authenticated channel (slot wait, WebSocket upgrade and Noise handshake)."""
    max_concurrent_handshakes: int = DEFAULT_MAX_CONCURRENT_HANDSHAKES
    """Handshakes running at once; more connections wait (within their deadline) for a slot."""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Open inbound connections (handshaking or handed to the handler); beyond it new ones are closed at once."""
    max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP
    """Open inbound connections from one source (an IPv4 address, an IPv6 /64); beyond it that source's new ones are
    closed at once."""
    handshake_rate_per_ip: float = DEFAULT_HANDSHAKE_RATE_PER_IP
    """Inbound connections a second one source may start, once its burst is spent; beyond it they are closed at
    once."""
    handshake_burst_per_ip: int = DEFAULT_HANDSHAKE_BURST_PER_IP
    """Inbound connections one source may start at once (the size of its token bucket)."""
    handshake_rate_total: float = DEFAULT_HANDSHAKE_RATE_TOTAL
    """Inbound connections a second all non-loopback sources together may start, once the burst is spent."""
    handshake_burst_total: int = DEFAULT_HANDSHAKE_BURST_TOTAL
    """Inbound connections all non-loopback sources together may start at once."""
    limit_loopback: bool = False
    """Charge loopback sources (127.0.0.0/8, ::1) to the handshake and WebSocket frame buckets too."""

    def __post_init__(self) -> None:
        if not (self.handshake_timeout > 0 and math.isfinite(self.handshake_timeout)):
            raise LocalProtocolError(f"handshake_timeout must be a positive number, got {self.handshake_timeout}")
        if self.max_concurrent_handshakes < 1:
            raise LocalProtocolError(f"max_concurrent_handshakes must be >= 1, got {self.max_concurrent_handshakes}")
        if self.max_connections < 1:
            raise LocalProtocolError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.max_connections_per_ip < 1:
            raise LocalProtocolError(f"max_connections_per_ip must be >= 1, got {self.max_connections_per_ip}")
        if not (self.handshake_rate_per_ip > 0 and math.isfinite(self.handshake_rate_per_ip)):
            raise LocalProtocolError(
                f"handshake_rate_per_ip must be a positive number, got {self.handshake_rate_per_ip}"
            )
        if self.handshake_burst_per_ip < 1:
            raise LocalProtocolError(f"handshake_burst_per_ip must be >= 1, got {self.handshake_burst_per_ip}")
        if not (self.handshake_rate_total > 0 and math.isfinite(self.handshake_rate_total)):
            raise LocalProtocolError(f"handshake_rate_total must be a positive number, got {self.handshake_rate_total}")
        if self.handshake_burst_total < 1:
            raise LocalProtocolError(f"handshake_burst_total must be >= 1, got {self.handshake_burst_total}")


@dataclass(slots=True, kw_only=True)
class ListenerStats:
    """Counters of a :class:`Listener` (a snapshot; :attr:`Listener.stats` returns a fresh copy)."""

    accepted: int = 0
    """Connections accepted from the listening sockets."""
    active: int = 0
    """Connections open right now (handshaking or handed to the handler)."""
    handshaking: int = 0
    """Connections open right now that are not yet authenticated."""
    authenticated: int = 0
    """Handshakes completed (channels handed to the handler)."""
    handshake_timeouts: int = 0
    """Connections dropped because the handshake deadline passed."""
    handshake_failures: int = 0
    """Connections dropped for a protocol violation, a failed WebSocket upgrade or a hang-up during the handshake."""
    rejected_overload: int = 0
    """Connections closed at once because :attr:`ListenerConfig.max_connections` were open, or
    :attr:`ListenerConfig.max_connections_per_ip` from the same source."""
    rejected_rate: int = 0
    """Connections closed at once because their source started more than its handshake bucket allows."""
    rejected_frames: int = 0
    """WebSocket connections dropped, during the handshake or after it, because their source sent more small frames
    than its budget allows (:mod:`p2pmsg.net.websocket`: frame budget).  Not counted as handshake failures."""
    handler_errors: int = 0
    """Handler calls that raised an exception."""

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for the control API)."""
        return dataclasses.asdict(self)


class Listener:
    """Accept inbound connections on TCP and WebSocket, authenticate them, and pass channels to ``handler``."""

    def __init__(
        self,
        identity: Identity,
        handler: Handler,
        config: ListenerConfig | None = None,
        *,
        familiar: Callable[[str], bool] | None = None,
    ) -> None:
        """``familiar(ip)`` says whether an address is one a trusted peer (a contact) recently connected from: such a
        connection is charged only to its source's own bucket, not to its network's or everyone's, so a flood from
        many networks cannot lock contacts out."""
        self._identity = identity
        self._handler = handler
        self._familiar = familiar
        self._config = config if config is not None else ListenerConfig()
        self._stats = ListenerStats()
        self._slots = trio.CapacityLimiter(self._config.max_concurrent_handshakes)
        self._per_ip: collections.Counter[str] = collections.Counter()  # open inbound connections by source
        config = self._config
        self._handshake_rate: RateLimiter[str] = RateLimiter(
            rate=config.handshake_rate_per_ip, burst=config.handshake_burst_per_ip
        )
        # The same per IPv4 /24 and IPv6 /48 (a host with many /64s, a subnet of hosts), and for everyone together:
        # an evicted or new source gets a full bucket, so only these bound what rotating sources can start.
        self._handshake_rate_wide: RateLimiter[str] = RateLimiter(
            rate=config.handshake_rate_per_ip * _WIDE_FACTOR, burst=config.handshake_burst_per_ip * _WIDE_FACTOR
        )
        self._handshake_rate_all: RateLimiter[None] = RateLimiter(
            rate=config.handshake_rate_total, burst=config.handshake_burst_total, max_sources=1
        )
        # When everyone's bucket is empty, a connection from a quiet network (an IPv4 /16 or IPv6 /32 that started
        # few connections lately) may still draw from a reserve: a flood from many networks then does not lock out
        # a stranger, or a contact on a new network, from elsewhere.  Every connection a network starts is charged to
        # its quiet bucket, so the flooding networks are never quiet.
        self._handshake_reserve: RateLimiter[None] = RateLimiter(
            rate=config.handshake_rate_total / _RESERVE_SHARE,
            burst=max(1, config.handshake_burst_total // _RESERVE_SHARE),
            max_sources=1,
        )
        self._quiet: RateLimiter[str] = RateLimiter(rate=_QUIET_RATE, burst=_QUIET_BURST)
        # Small WebSocket frames by source, shared by all of its connections (p2pmsg.net.websocket: frame budget).
        self._small_frames: RateLimiter[str] = RateLimiter(rate=WS_SMALL_FRAME_RATE, burst=WS_SMALL_FRAME_BURST)
        self._log = LogThrottle(logger)  # connections a remote peer makes us drop: a few lines per minute per kind
        self._listen_addrs: tuple[Multiaddr, ...] = ()
        self._run_scope: trio.CancelScope | None = None

    @property
    def config(self) -> ListenerConfig:
        """The limits in force."""
        return self._config

    @property
    def stats(self) -> ListenerStats:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats)

    @property
    def listen_addrs(self) -> tuple[Multiaddr, ...]:
        """The bound addresses while :meth:`run` is serving (empty before and after)."""
        return self._listen_addrs

    async def run(
        self,
        addrs: Sequence[Multiaddr],
        *,
        task_status: trio.TaskStatus[tuple[Multiaddr, ...]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind ``addrs``, report the bound multiaddrs via ``task_status``, serve until cancelled or stopped.

        Use as ``bound = await nursery.start(listener.run, addrs)``.  Binding errors raise
        :class:`~p2pmsg.net.transport.TransportError` before anything is served.  On exit all connections are closed.
        """
        if self._run_scope is not None:
            raise LocalProtocolError("Listener.run is already running")
        if not addrs:
            raise LocalProtocolError("Listener.run needs at least one address")
        bound = await open_listeners(addrs)
        try:
            with trio.CancelScope() as scope:
                self._run_scope = scope
                async with trio.open_nursery() as nursery:
                    for item in bound:
                        await nursery.start(self._accept_loop, item.listener, item.kind, nursery)
                    self._listen_addrs = tuple(item.addr for item in bound)
                    for addr in self._listen_addrs:
                        logger.info("listening on %s", addr)
                    task_status.started(self._listen_addrs)
        finally:
            self._run_scope = None
            self._listen_addrs = ()
            for item in bound:  # the accept loops close them; this covers a failure before they started
                item.listener.socket.close()  # synchronous: an await here could be cut short by Cancelled

    def stop(self) -> None:
        """Make :meth:`run` close everything and return (no effect if it is not running)."""
        if self._run_scope is not None:
            self._run_scope.cancel()

    async def _accept_loop(
        self,
        listener: trio.SocketListener,
        kind: TransportKind,
        nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listener`` until cancelled; admit each one here, before any task exists for it
        (a flood of refused connections then costs an accept and a close each), and serve the admitted ones in
        tasks of ``nursery``.  When the process runs out of file descriptors or memory, wait a moment and go on."""
        async with listener:
            task_status.started()
            while True:
                try:
                    raw = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    logger.error("accept failed (%s); trying again in %g s", exc, _ACCEPT_RETRY_DELAY)
                    await trio.sleep(_ACCEPT_RETRY_DELAY)
                    continue
                admitted = self._admit(raw, kind)
                if admitted is None:
                    raw.socket.close()  # synchronous: no task, no await for a refused connection
                    continue
                nursery.start_soon(self._serve_connection, raw, kind, *admitted)

    def _admit(self, raw: trio.SocketStream, kind: TransportKind) -> tuple[str, bool] | None:
        """Count a new connection and decide whether it is served (module docstring, step 1): its source (network
        text) and whether it is charged to the buckets, with its slot taken; or ``None`` (counted, logged)."""
        stats = self._stats
        stats.accepted += 1
        address = _peer_ip(raw)
        if not address:  # it reset before we looked: nothing to serve (and no source to charge it to)
            stats.handshake_failures += 1
            return None
        ip = network_of(address)
        charged = self._config.limit_loopback or not _is_loopback(address)
        familiar = charged and self._familiar is not None and self._familiar(address)
        refusal = self._admission(address, ip, charged=charged, familiar=familiar)
        if refusal is not None:
            key, reason = refusal
            self._log.log(logging.WARNING, key, "inbound %s %s dropped: %s", kind, address, reason)
            return None
        self._per_ip[ip] += 1
        stats.active += 1
        stats.handshaking += 1
        return ip, charged

    async def _serve_connection(self, raw: trio.SocketStream, kind: TransportKind, ip: str, charged: bool) -> None:
        """Serve an admitted connection (its slot was taken by :meth:`_admit`; given back here at the end)."""
        stats = self._stats
        remote = remote_multiaddr(raw, kind)
        where = str(remote) if remote is not None else f"unknown {kind} peer"
        handshaking = True
        stream: trio.abc.Stream = raw
        try:
            async with trio.open_nursery() as connection_nursery:  # hosts the WebSocket reader, if any
                try:
                    budget = _FrameBudget(self._small_frames if charged else None, ip, stats)
                    channel = await self._authenticate(connection_nursery, raw, kind, where, budget)
                    if channel is None:
                        return
                    stream = channel
                    stats.handshaking -= 1
                    handshaking = False
                    stats.authenticated += 1
                    logger.debug("inbound %s authenticated as %s", where, channel.remote_peer)
                    try:
                        await self._handler(channel, remote)
                    except Exception:
                        stats.handler_errors += 1
                        logger.exception("handler for %s (%s) failed", channel.remote_peer, where)
                finally:
                    # Close while the connection's own tasks still run: a WebSocket's reader must be alive to see
                    # the peer's Close reply (cancelling it first meant no Close frame at all; the peer saw 1006).
                    # The close is bounded (the WebSocket waits at most its close timeout); if we are being
                    # cancelled it ends at once, and the tasks are stopped either way.
                    try:
                        await close_gracefully(stream)
                    finally:
                        connection_nursery.cancel_scope.cancel()
        finally:
            try:
                await trio.aclose_forcefully(raw)
            finally:
                if handshaking:
                    stats.handshaking -= 1
                stats.active -= 1
                self._per_ip[ip] -= 1
                if not self._per_ip[ip]:
                    del self._per_ip[ip]

    def _admission(self, address: str, source: str, *, charged: bool, familiar: bool = False) -> tuple[str, str] | None:
        """Whether a new connection from ``address`` (accounted to ``source``, its network text) may start a handshake
        (module docstring, step 1): ``None``, or the log key and reason of the refusal (counted here).  Cheap on
        purpose: a flood of connections is refused here at tens of thousands a second."""
        stats = self._stats
        config = self._config
        if stats.active >= config.max_connections:
            stats.rejected_overload += 1
            return "overload", f"{stats.active} connections open"
        if self._per_ip[source] >= config.max_connections_per_ip:
            stats.rejected_overload += 1
            return "per-ip", f"{self._per_ip[source]} connections open from {source}"
        if not charged:
            return None
        now = trio.current_time()
        if familiar:
            if self._handshake_rate.allow(source, now):
                return None
        else:
            wide = network_of(address, 24, 48)
            quiet = self._quiet.allow(network_of(address, 16, 32), now)  # every connection counts (docstring, 1.)
            # The source's and its network's buckets are checked first, so that a refusal by one costs the others
            # nothing.
            if (
                self._handshake_rate.would_allow(source, now)
                and self._handshake_rate_wide.would_allow(wide, now)
                and (self._handshake_rate_all.allow(None, now) or (quiet and self._handshake_reserve.allow(None, now)))
            ):
                self._handshake_rate.allow(source, now)
                self._handshake_rate_wide.allow(wide, now)
                return None
        stats.rejected_rate += 1
        return "rate", f"{source} (or its network, or everyone together) starts connections too fast"

    async def _authenticate(
        self, nursery: trio.Nursery, raw: trio.SocketStream, kind: TransportKind, where: str, budget: _FrameBudget
    ) -> SecureChannel | None:
        """Upgrade and authenticate ``raw`` within the handshake deadline; None (logged, counted) on failure."""
        timeout = self._config.handshake_timeout
        stats = self._stats
        with trio.move_on_after(timeout) as deadline:
            try:
                async with self._slots:
                    stream: trio.abc.Stream = raw
                    if kind == "ws":
                        stream = await accept_websocket_stream(nursery, raw, path=WS_PATH, frame_budget=budget)
                    return await secure_inbound(stream, self._identity, timeout=timeout + _CHANNEL_TIMEOUT_MARGIN)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, P2PMsgError) as exc:
                if budget.refused:  # counted as rejected_frames by the budget; the reason is the stream's
                    self._log.log(logging.WARNING, "frames", "inbound %s dropped during handshake: %s", where, exc)
                    return None
                stats.handshake_failures += 1
                if isinstance(exc, RemoteProtocolError):
                    # The kind of fault, without what the peer chose (quoted values such as a WebSocket path): the
                    # throttle's kinds must come from our code, or a peer could use them all up.
                    fault = "handshake: " + _QUOTED.sub("", str(exc).split(":", 1)[0])[:60]
                    self._log.log(logging.WARNING, fault, "inbound %s dropped during handshake: %s", where, exc)
                else:
                    self._log.log(
                        logging.INFO,
                        "hang-up",
                        "inbound %s dropped during handshake: %s: %s",
                        where,
                        type(exc).__name__,
                        exc,
                    )
                return None
        if deadline.cancelled_caught:
            stats.handshake_timeouts += 1
            self._log.log(
                logging.INFO, "timeout", "inbound %s dropped: no authenticated channel within %g s", where, timeout
            )
        return None


_ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept(2) errors that mean the process or system is out of a resource for now (trio.serve_listeners's list)."""
_ACCEPT_RETRY_DELAY: Final = 0.1
_QUOTED: Final = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")
"""Quoted values in an error message (what a remote peer sent, e.g. a path)."""


class _FrameBudget:
    """The small-frame budget (a :data:`~p2pmsg.net.websocket.FrameBudget`) of one inbound connection, drawn from
    its source's bucket in ``limiter`` (``None``: an uncharged loopback source, which always pays).  The first
    refusal is counted as ``rejected_frames``; the WebSocket stream then breaks with the reason, which the
    handshake (or, once authenticated, the handler) logs."""

    __slots__ = ("_limiter", "_source", "_stats", "refused")

    def __init__(self, limiter: RateLimiter[str] | None, source: str, stats: ListenerStats) -> None:
        self._limiter = limiter
        self._source = source
        self._stats = stats
        self.refused = False

    def __call__(self, count: int) -> bool:
        if self._limiter is None or self._limiter.allow(self._source, trio.current_time(), count):
            return True
        if not self.refused:
            self.refused = True
            self._stats.rejected_frames += 1
        return False


def _is_loopback(address: str) -> bool:
    ip = parse_ip(address)
    return ip is not None and ip.is_loopback


def _peer_ip(raw: trio.SocketStream) -> str:
    """The remote IP address of an accepted connection ("" if the socket no longer knows it)."""
    try:
        return str(raw.socket.getpeername()[0])
    except (OSError, IndexError):
        return ""

"""The composition root: one p2pmsg node, every service in one trio nursery.

Theory of operation
-------------------
:func:`run_node` opens the node's SQLite database (``<home>/p2pmsg.db``), claims the control socket first (so a
second node on the same home is refused before anything else binds), then starts, in one nursery:

* the DHT (:class:`p2pmsg.dht.service.DhtNode`) on UDP, by default the port of the first TCP listen address;
* the listener (:class:`p2pmsg.net.listener.Listener`) on the configured TCP / WebSocket multiaddrs, handing each
  authenticated channel to the chat service;
* the chat service (:class:`p2pmsg.chat.service.ChatService`): contacts, outbox, sessions, receipts;
* the *record relay*: every signed peer record our DHT store takes in with a higher ``seq`` than it held is handed
  (from the DHT's task, without waiting: a bounded queue, overflow counted as ``node_record_queue_full``) to a task
  that passes it to the chat service, which flushes that contact's outbox if messages wait for it;
* the control server (:class:`p2pmsg.control.server.ControlServer`) on ``<home>/control.sock``;
* the *maintenance* task: bootstrap the DHT (through the saved routing table, the configured bootstrap peers, DNS
  names resolved here, and our contacts' known addresses, whose nodes by default run their DHT on UDP at the port
  of their first TCP address; again every round while the routing table holds fewer than :data:`REJOIN_BELOW`
  nodes or our record found no holder), publish our signed peer record, republish it before it expires or as soon
  as our advertised addresses change (the *address watcher* works them out again every
  :data:`ADDRESS_CHECK_INTERVAL` seconds: behind a wildcard listener they follow the network the host is on), every
  round while the newest record we signed reached no holder (it still travels from our own DHT store), and when
  the host wakes from sleep (the watcher compares the clock that counts suspended time with the monotonic one: a
  newer record tells contacts we are back), and save the routing table for the next start.

SIGINT and SIGTERM cancel the nursery: every service closes its sockets, the database finishes its queued writes,
and the routing table is saved one last time; further signals until then are logged, not obeyed.  Nothing
acknowledged to a user depends on a clean shutdown: a ``send`` returns only after its SQLite transaction is synced.

:func:`run_bootstrap_node` runs the DHT alone (no chat, no database): a node fit for a public host or a Raspberry
Pi whose only job is to let others join.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import ipaddress
import logging
import math
import os
import signal
import socket as _socket
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import trio

from p2pmsg.chat.errors import ERROR_CODES as CHAT_ERROR_CODES
from p2pmsg.chat.invite import format_invite
from p2pmsg.chat.policy import ChatPolicy
from p2pmsg.chat.service import ChatConfig, ChatService
from p2pmsg.control.errors import NodeAlreadyRunningError
from p2pmsg.control.server import ControlServer, EventHub
from p2pmsg.control.socketpath import SocketState, control_socket_path, probe_socket
from p2pmsg.dht.core.records import MAX_RECORD_TTL, PeerRecord, VerifiedRecord
from p2pmsg.dht.service import DEFAULT_RECORD_TTL, DhtNode
from p2pmsg.errors import LocalProtocolError, P2PMsgError
from p2pmsg.identity import Identity, PeerId
from p2pmsg.logthrottle import LogThrottle, flush_all, span
from p2pmsg.net.listener import Listener
from p2pmsg.ratelimit import parse_ip
from p2pmsg.store import repo
from p2pmsg.store.db import DATABASE_FILENAME, Database, StoreStats, open_database
from p2pmsg.store.models import DhtNode as SavedDhtNode
from p2pmsg.wire.multiaddr import Multiaddr, MultiaddrError

log = logging.getLogger(__name__)
T = TypeVar("T")

ROUTING_TABLE_SAVE_INTERVAL: Final = 300.0
"""Seconds between saves of the DHT routing table (it is also saved at shutdown)."""
REPUBLISH_CHECK_INTERVAL: Final = 30.0
"""Seconds between maintenance rounds (republish when due, rejoin while the routing table is small)."""
MAINTENANCE_WARNING_INTERVAL: Final = 600.0
"""Seconds between two warnings that the same maintenance step failed (the rest are counted in ``status``)."""
ADDRESS_CHECK_INTERVAL: Final = 5.0
"""Seconds between checks of our own addresses (a wildcard listener's address follows the network we are on)."""
HOST_SLEPT_AFTER: Final = 30.0
"""Seconds by which the clock that counts suspended time must have run ahead of the one that does not, for the node to
say the host slept (and publish its record again when it wakes)."""
REJOIN_BELOW: Final = 8
"""A routing table smaller than this is refreshed through the bootstrap peers every maintenance round: in a small
mesh the few nodes it holds may all have moved or stopped (a node keeps a known id at its old address until that
address stops answering), and then lookups would fail while the bootstrap peer knows where everyone is."""
ROOM_FREED_BYTES: Final = 512 * 1024
"""Free space on the home's file system that grew by this much since its lowest point (or the last time it did so)
counts as room come back: peers whose messages the store could not write are dialled, to send them again at once."""
ROOM_CHECK_INTERVAL: Final = 5.0
"""Seconds between checks of the free space while peers wait for room (else once a maintenance round, 30 s)."""
LOW_DISK_BYTES: Final = 64 * 1024 * 1024
"""Free space on the home's file system below which the node warns: messages and receipts stop being stored when
it runs out (senders then resend later, nothing is lost, but nothing new arrives either)."""
CLOCK_SAMPLES: Final = 3
"""Other signers whose records must have been seen before the node judges its own clock (:meth:`Node.clock_offset`)."""
CLOCK_SLACK: Final = 600.0
"""Seconds beyond the range a record's remaining lifetime normally lies in before the node calls its clock off (the
chat's own allowance between clocks is as much: protocol section 6.4)."""
RECORD_SEQ_SETTING: Final = "dht.record_seq"
"""Settings key of the last peer-record ``seq`` this node signed (8 bytes, big-endian)."""
RECORD_QUEUE_SIZE: Final = 64
"""Peer records taken in by our DHT store and not yet passed to the chat service; beyond it they are dropped (the
chat service's record watcher finds a contact's record again)."""
PRIMARY_ADDRESS_PROBES: Final = {4: "192.0.2.1", 6: "2001:db8::1"}
"""Per IP version, a documentation address (RFC 5737, RFC 3849) that a UDP socket is connected to, sending nothing,
to learn the source address of the default route: the host's primary address on its network."""
DHT_DROP_COUNTERS: Final = (
    "malformed",
    "unknown_rpc",
    "rate_limited",
    "amplification_dropped",
    "stores_refused",
    "values_rejected",
    "auth_failed",
    "pending_full",
    "unexpected_response",
    "verify_capped",
    "values_evicted",
)
"""DHT counters of input that was dropped or refused; ``status`` reports them as ``dht_<name>``."""
LISTENER_DROP_COUNTERS: Final = (
    "handshake_timeouts",
    "handshake_failures",
    "rejected_overload",
    "rejected_rate",
    "rejected_frames",
)
"""Listener counters of dropped connections; ``status`` reports them as ``net_<name>``."""


class NodeConfig(Protocol):
    """What the node needs from the configuration (``p2pmsg.cli.config.Config`` is one)."""

    @property
    def listen(self) -> Sequence[str]: ...
    @property
    def bootstrap(self) -> Sequence[str]: ...
    @property
    def accept_from(self) -> str: ...
    @property
    def dht_port(self) -> int | None: ...


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NodeOptions:
    """Timings of the node's maintenance (tests shorten them)."""

    record_ttl: float = DEFAULT_RECORD_TTL
    """Lifetime of our published peer record; it is republished at half of it."""
    save_interval: float = ROUTING_TABLE_SAVE_INTERVAL
    check_interval: float = REPUBLISH_CHECK_INTERVAL
    """Seconds between maintenance rounds (republish if needed, rejoin when the routing table is small)."""
    address_interval: float = ADDRESS_CHECK_INTERVAL
    """Seconds between checks of our own addresses; a change is published at once."""
    room_check_interval: float = ROOM_CHECK_INTERVAL
    """Seconds between checks of the free space while peers wait for room (:data:`ROOM_CHECK_INTERVAL`)."""
    rejoin_below: int = REJOIN_BELOW
    """While the routing table holds fewer nodes than this (or our record was stored nowhere), every maintenance
    round joins again (saved nodes, bootstrap peers, contacts)."""
    chat: ChatConfig | None = None
    """Tunables of the chat service (default :class:`ChatConfig`); its ``policy`` comes from the node config's
    ``accept_from``."""
    low_disk_bytes: int = LOW_DISK_BYTES
    """Below this much free space on the home's file system the node warns (each round it is low, once)."""

    def __post_init__(self) -> None:
        for name in ("record_ttl", "save_interval", "check_interval", "address_interval", "room_check_interval"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise LocalProtocolError(f"NodeOptions.{name} must be a positive number, got {value}")
        if self.rejoin_below < 1:
            raise LocalProtocolError(f"NodeOptions.rejoin_below must be >= 1, got {self.rejoin_below}")


def host_clock_gap() -> float | None:
    """How far the host's clock that counts time suspended (Linux ``CLOCK_BOOTTIME``) is ahead of the monotonic clock,
    which stops while the host sleeps: it grows by the length of each sleep.  ``None`` where there is no such clock."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return None
    return time.clock_gettime(boottime) - time.monotonic()


def dht_endpoint(listen: Sequence[str], dht_port: int | None) -> tuple[str, int]:
    """The UDP ``(host, port)`` the DHT binds: the first listen address's host, and ``dht_port`` or else the same
    port number as that address (0 when it is 0)."""
    first = Multiaddr.parse(listen[0])
    _kind, host, port = first.transport()
    return host, (port if dht_port is None else dht_port)


async def resolve_bootstrap(addrs: Iterable[str]) -> list[tuple[str, int]]:
    """Turn bootstrap multiaddrs (``/ip4|ip6|dns4|dns6/HOST/udp|tcp/PORT[...]``) into UDP ``(ip, port)`` pairs.

    The DHT listens on UDP; a TCP multiaddr is taken to mean the same port number on UDP.  DNS names are resolved
    here; a name that does not resolve, or an address that does not parse, is logged and skipped.
    """
    out: list[tuple[str, int]] = []
    for text in addrs:
        try:
            maddr = Multiaddr.parse(text)
            _kind, host, port = maddr.transport()
        except MultiaddrError as exc:
            log.warning("bootstrap address %r skipped: %s", text, exc)
            continue
        family = _socket.AF_INET6 if maddr.components[0][0] in ("ip6", "dns6") else _socket.AF_INET
        try:
            ipaddress.ip_address(host)
            out.append((host, port))
            continue
        except ValueError:
            pass
        try:
            infos = await trio.socket.getaddrinfo(host, port, family=family, type=_socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("bootstrap address %s skipped: cannot resolve %s: %s", text, host, exc)
            continue
        for info in infos[:4]:
            sockaddr = info[4]
            out.append((str(sockaddr[0]), int(sockaddr[1])))
    return list(dict.fromkeys(out))


def advertised_addrs(
    bound: Sequence[Multiaddr],
    bootstrap: Sequence[tuple[str, int]],
    *,
    primary: Callable[[int], str | None] | None = None,
) -> list[Multiaddr]:
    """The addresses we put in our peer record and invite: the bound ones, with a wildcard host (0.0.0.0 / ::)
    replaced by the local address the OS would use to reach each bootstrap peer.

    With no bootstrap peers (the first node of a LAN), the host's primary address of that IP version is used
    instead: the source address of its default route (``primary(version)``, default :func:`primary_address`), so
    an invite made there reaches other machines of the network.  Loopback stands in only when neither gives an
    address (a bootstrap peer on loopback, a host without a route): on another machine a loopback address reaches
    that machine itself, so a record listing it sends every peer first to itself (and, where another node runs
    there, to a stranger)."""
    find_primary = primary_address if primary is None else primary
    out: list[Multiaddr] = []
    for addr in bound:
        kind, host, port = addr.transport()
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            out.append(addr)
            continue
        if not ip.is_unspecified:
            out.append(addr)
            continue
        hosts: list[str] = []
        for peer_host, peer_port in bootstrap:
            local = _local_address_towards(peer_host, peer_port, ip.version)
            if local is not None:
                hosts.append(local)
        if not bootstrap:
            local = find_primary(ip.version)
            if local is not None:
                hosts.append(local)
        if not hosts:
            hosts.append("::1" if ip.version == 6 else "127.0.0.1")
        for local in dict.fromkeys(hosts):
            out.append(_with_host(addr, kind, local, port))
    return list(dict.fromkeys(out))


def id_info(identity: Identity, addrs: Sequence[Multiaddr]) -> dict[str, Any]:
    """What ``p2pmsg id`` shows: the peer id, the advertised addresses with ``/p2p/<peer id>``, the invite link."""
    return {
        "peer_id": str(identity.peer_id),
        "addrs": [str(a.with_peer_id(identity.peer_id)) for a in addrs],
        "invite": format_invite(identity.peer_id, list(addrs)),
    }


def configured_addrs(config: NodeConfig) -> list[Multiaddr]:
    """The addresses a node started with ``config`` would advertise, as far as they are known before it runs: a
    listen address with port 0 is left out (its port is chosen when it binds) and bootstrap peers named by DNS are
    not looked up.  Raises :class:`~p2pmsg.wire.multiaddr.MultiaddrError` for a listen address that does not
    parse."""
    listen = [Multiaddr.parse(text) for text in config.listen]
    bootstrap: list[tuple[str, int]] = []
    for text in config.bootstrap:
        try:
            _, host, port = Multiaddr.parse(text).transport()
        except P2PMsgError:
            continue
        if _is_ip(host):
            bootstrap.append((host, port))
    return advertised_addrs([a for a in listen if a.transport()[2] != 0], bootstrap)


def _is_ip(host: str) -> bool:
    return parse_ip(host) is not None


def _is_wildcard(host: str) -> bool:
    ip = parse_ip(host)
    return ip is not None and ip.is_unspecified


def _is_loopback_host(host: str) -> bool:
    ip = parse_ip(host)
    return ip is not None and ip.is_loopback


def _with_host(addr: Multiaddr, kind: str, host: str, port: int) -> Multiaddr:
    return Multiaddr.from_transport(kind, host, port, peer_id=addr.peer_id)


def primary_address(version: int) -> str | None:
    """The host's primary IPv4 (``version`` 4) or IPv6 (6) address: the source address of the route to a
    documentation address (:data:`PRIMARY_ADDRESS_PROBES`), or ``None`` without such a route or when it is a
    loopback, link-local or unspecified address."""
    probe = PRIMARY_ADDRESS_PROBES.get(version)
    local = None if probe is None else _local_address_towards(probe, 9, version)
    if local is None:
        return None
    try:
        ip = ipaddress.ip_address(local.split("%", 1)[0])
    except ValueError:
        return None
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
        return None
    return str(ip)


def _local_address_towards(host: str, port: int, version: int) -> str | None:
    """The source address the OS routes from towards ``host`` (a UDP connect sends nothing)."""
    family = _socket.AF_INET6 if version == 6 else _socket.AF_INET
    try:
        with _socket.socket(family, _socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            local = probe.getsockname()[0]
    except OSError:
        return None
    return str(local) if isinstance(local, str) else None


class Node:
    """One running node: the services of the module docstring, built from a home, an identity and a config."""

    def __init__(
        self,
        home: Path,
        identity: Identity,
        config: NodeConfig,
        db: Database,
        *,
        options: NodeOptions | None = None,
    ) -> None:
        self.home = home
        self.identity = identity
        self.config = config
        self.db = db
        self.options = options if options is not None else NodeOptions()
        self.events = EventHub()
        self._records_in, self._records_out = trio.open_memory_channel[tuple[PeerId, bytes]](RECORD_QUEUE_SIZE)
        self.records_dropped = 0
        """Peer records our DHT store took in that the full relay queue could not take."""
        dht_host, dht_port = dht_endpoint(config.listen, config.dht_port)
        self.dht = DhtNode(identity, host=dht_host, port=dht_port, on_record=self._record_stored)
        policy = ChatPolicy(accept_from=config.accept_from)  # type: ignore[arg-type]
        chat_config = dataclasses.replace(self.options.chat or ChatConfig(), policy=policy)
        hub = self.events
        self.chat = ChatService(
            identity,
            db,
            resolver=self.dht,
            config=chat_config,
            events=hub.publish,
            listening=lambda: hub.subscribers > 0,  # no subscriber: the hot paths build no events at all
        )
        self.listener = Listener(identity, self.chat.handle_inbound, familiar=self.chat.is_familiar)
        handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = self.chat.control_handlers()
        handlers["id"] = self._id
        handlers["status"] = self._status
        self.control = ControlServer(control_socket_path(home), handlers, self.events, error_codes=CHAT_ERROR_CODES)
        self.addrs: list[Multiaddr] = []
        self._bound: tuple[Multiaddr, ...] = ()  # the listener's bound addresses (wildcards as bound)
        self._addrs_changed = trio.Event()  # set when _refresh_addrs finds new addresses (maintenance waits on it)
        self._clock_gap = host_clock_gap()  # how far the host's clock of suspended time ran ahead (sleep detection)
        self._woke = False  # the host slept since the last maintenance round: publish our record again
        self._bootstrap: list[tuple[str, int]] = []
        self._started = time.monotonic()
        self.maintenance_failures: collections.Counter[str] = collections.Counter()
        self._join_warned = False  # said that no bootstrap peer answered, and none has since
        self._alone_said = False  # said that there is nobody to join through
        self._disk_low = False  # warned that the home's disk is low on space, and it still is
        self._free_floor = math.inf  # the least free space seen since room last came back (ROOM_FREED_BYTES)
        self._clock_warning = LogThrottle(log, burst=1, interval=3600.0)
        self._maintenance_warning = LogThrottle(log, burst=1, interval=MAINTENANCE_WARNING_INTERVAL)
        self.database_state = "not checked"
        """The background check of the database file: "not checked", "checking", "ok" or "damaged" (in status)."""

    # -- control methods -------------------------------------------------------------------------------------------

    async def _id(self, params: dict[str, Any]) -> dict[str, Any]:
        return id_info(self.identity, self.addrs)

    async def _status(self, params: dict[str, Any]) -> dict[str, Any]:
        chat = await self.chat.status()
        dropped: collections.Counter[str] = collections.Counter(chat.pop("dropped", {}))
        dropped.update(self.control.dropped)
        dht_stats = self.dht.stats
        dropped.update({f"dht_{name}": dht_stats.get(name, 0) for name in DHT_DROP_COUNTERS})
        listener = self.listener.stats
        dropped.update({f"net_{name}": getattr(listener, name) for name in LISTENER_DROP_COUNTERS})
        dropped["node_record_queue_full"] += self.records_dropped
        return {
            "peer_id": str(self.identity.peer_id),
            "uptime_s": int(time.monotonic() - self._started),
            "addrs": [str(a) for a in self.addrs],
            "dht_size": len(self.dht.routing_table_snapshot()),
            "dht_address": f"{self.dht.address[0]}:{self.dht.address[1]}",
            "database": self.database_state,
            "store_failing": _store_failing(self.db.stats, self.chat.messages_stored_at),
            "clock_offset_s": None if (offset := self.clock_offset()) is None else round(offset),
            **chat,
            "listener": listener.as_dict(),
            "dht": dht_stats,
            "dropped": {reason: count for reason, count in sorted(dropped.items()) if count},
            "maintenance_failures": dict(self.maintenance_failures),
        }

    # -- lifecycle -------------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every service until cancelled; ``task_status.started`` once all of them are up."""
        await self.control.bind()  # refuse a second node on this home before anything else binds (idempotent)
        try:
            self._bootstrap = await resolve_bootstrap(self.config.bootstrap)
            listen = [Multiaddr.parse(a) for a in self.config.listen]
            async with trio.open_nursery() as nursery:
                await nursery.start(self.dht.run)
                self._bound = await nursery.start(self.listener.run, listen)
                self.addrs = advertised_addrs(self._bound, self._bootstrap)
                await nursery.start(self.chat.run)
                await nursery.start(self.control.serve)
                nursery.start_soon(self._maintain)
                nursery.start_soon(self._watch_addrs)
                nursery.start_soon(self._watch_room)
                nursery.start_soon(self._relay_records)
                nursery.start_soon(self._check_database)
                log.info("node %s up: %s", self.identity.peer_id, " ".join(str(a) for a in self.addrs))
                task_status.started(self)
        finally:  # a start that failed before the control server served (a port taken) leaves no socket behind
            with trio.CancelScope(shield=True):
                await self.control.aclose()

    def clock_offset(self) -> float | None:
        """How far (s) this host's clock seems ahead of the other nodes' (negative: behind), judged by the peer
        records the DHT examined, or ``None`` when it seems right or too few nodes were seen.

        For each of the last other signers, the engine keeps the freshest record's time left by our clock and its
        own lifetime (``expires_at - seq``: a p2pmsg record's ``seq`` is its signer's clock when it signed).  With
        clocks that agree, a live node's record has between 0 and its lifetime left (it is republished at half of
        it); a record of a node that left may have expired long ago (stock nodes store it again every hour).  So:

        * *ahead*: even the freshest of at least :data:`CLOCK_SAMPLES` signers' records expired more than
          :data:`CLOCK_SLACK` ago: our clock is at least that far ahead (a node that saw only departed nodes would
          think so too, which takes every live node's record to be missing);
        * *behind*: of the records that look valid and whose lifetime is one a record may have (0 to 7 days: a ``seq``
          that is not a time in seconds gives none, so it never counts), at least :data:`CLOCK_SAMPLES` have, on the
          median, more than :data:`CLOCK_SLACK` left beyond their own lifetime, which no clock that agrees can see:
          behind by about that much.

        Holders judge our record with their clocks: a clock a day behind has it refused everywhere (it looks
        expired), and one a day ahead refuses everyone else's; either way the node cannot work, and says why."""
        samples = self.dht.engine.record_lifetimes()
        if len(samples) < CLOCK_SAMPLES:
            return None
        freshest = max(left for left, _ in samples)
        if freshest < -CLOCK_SLACK:
            return -freshest
        excess = [left - lifetime for left, lifetime in samples if left > 0 and 0 < lifetime <= MAX_RECORD_TTL]
        if len(excess) >= CLOCK_SAMPLES and (median := statistics.median(excess)) > CLOCK_SLACK:
            return -median
        return None

    def _check_clock(self) -> None:
        """Warn (at most once an hour) when :meth:`clock_offset` finds this host's clock off."""
        offset = self.clock_offset()
        if offset is None:
            return
        self._clock_warning.log(
            logging.WARNING,
            "clock",
            "this host's clock (%s) seems %s %s %s the other nodes': the peer records they sign %s by it. Set it "
            "right (e.g. turn on NTP): records carry wall-clock expiry times, so until then %s, and messages between "
            "this node and its contacts may sort before the ones they answer",
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "at least" if offset > 0 else "about",
            span(abs(offset)),
            "ahead of" if offset > 0 else "behind",
            "have all expired" if offset > 0 else "expire much later than they should",
            "this node refuses their records and cannot find its contacts' addresses"
            if offset > 0
            else "other nodes may refuse this node's record, and its contacts cannot find its address",
        )

    def _check_free_space(self) -> bool:
        """Warn once when the home's file system runs low on space (again after it recovered and ran low again);
        return whether room came back (the free space grew by :data:`ROOM_FREED_BYTES` from its lowest point)."""
        try:
            stats = os.statvfs(self.home)
        except OSError as exc:
            log.debug("free space of %s unknown: %s", self.home, exc)
            return False
        free = stats.f_bavail * stats.f_frsize
        room_back = free >= self._free_floor + ROOM_FREED_BYTES
        self._free_floor = free if room_back else min(self._free_floor, free)
        low = free < self.options.low_disk_bytes
        if low and not self._disk_low:
            log.warning(
                "only %.1f MB free on the disk of %s: when it is full, received messages are not stored (their "
                "senders resend them later) and sends fail with 'not stored'",
                free / 1e6,
                self.home,
            )
        elif self._disk_low and not low:
            log.info("%.1f MB free on the disk of %s again", free / 1e6, self.home)
        self._disk_low = low
        self.db.keep_wal_small(low)  # the room left goes to messages, not to page copies in the WAL
        return room_back

    async def _check_database(self) -> None:
        """Check the whole database file once, in the background, after start: a file damaged while the node was
        stopped (a disk fault, a bad copy) is otherwise noticed only when a read hits the damaged part."""
        self.database_state = "checking"
        try:
            problems = await self.db.quick_check()
        except P2PMsgError as exc:  # the store is closing
            log.info("database check not done: %s", exc)
            return
        if not problems:
            self.database_state = "ok"
            return
        self.database_state = "damaged"
        log.error(
            "database %s is damaged (%s): messages and contacts in the damaged part may be unreadable, and writes "
            "may fail. Stop the node and keep a copy of the file (with its -wal file) before anything else",
            self.db.path,
            "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""),
        )

    def _record_stored(self, record: VerifiedRecord) -> None:
        """The DHT's record listener: queue another peer's newer record for :meth:`_relay_records` (never blocks)."""
        content = record.content
        if not isinstance(content, PeerRecord) or content.peer_id == self.identity.peer_id:
            return
        if self.chat.is_contact_cached(content.peer_id) is False:
            return  # not a contact: a flood of strangers' records must not crowd a contact's record out of the queue
        try:
            self._records_in.send_nowait((content.peer_id, record.value))
        except trio.WouldBlock:
            self.records_dropped += 1
        except trio.ClosedResourceError:  # the node stopped
            pass

    async def _relay_records(self) -> None:
        """Pass each queued peer record to the chat service (it caches a contact's newer record, closes sessions over
        addresses the record dropped, and flushes that contact's outbox)."""
        with contextlib.suppress(P2PMsgError):
            await self.chat.contact_peers()  # load the cache that _record_stored filters with
        async for peer, value in self._records_out:
            try:
                await self.chat.contact_peers()  # reloaded here after a change of the contacts
                await self.chat.peer_record_seen(peer, value, contacts_only=True)
            except P2PMsgError as exc:  # e.g. the store is closing
                log.info("record of %s not passed to the chat service: %s", peer, exc)
            except Exception:  # a bug: lose this record (the record watcher finds it again), never the node
                log.exception("record of %s not passed to the chat service", peer)

    async def _maintain(self) -> None:
        """Bootstrap, publish and republish our peer record, save the routing table (module docstring).

        A step that fails (the DHT refuses, the network is down, too many lookups at once) is logged, counted in
        ``status`` (``maintenance_failures``) and retried on the next round: maintenance never takes the node down.
        """
        try:
            await self._attempt("join", self._join())
            published_at = published_wall = -math.inf
            published_addrs: list[Multiaddr] = []
            unpublished = False  # the last publish reached no holder (or the host slept): publish until one does
            last_save = trio.current_time()
            while True:
                self._addrs_changed = trio.Event()
                self._refresh_addrs()
                now, wall = trio.current_time(), time.time()
                addrs = list(self.addrs)  # what this round publishes (the watcher may change self.addrs meanwhile)
                # A record that reached no holder still sits in our own DHT store, which hands it on once the
                # network is back (a laptop whose link dropped signed one with only 127.0.0.1; its real address, the
                # same as before, was then not published again): publish until a holder takes the newest.  After
                # the host slept too: a newer record tells our contacts (through their DHT stores or record
                # watchers) that we are back, so what they hold for us comes at once rather than at their next retry.
                unpublished, self._woke = unpublished or self._woke, False
                half_life = self.options.record_ttl / 2  # on both clocks: the monotonic one stops while the host sleeps
                stale = addrs != published_addrs or unpublished
                stale = stale or now - published_at >= half_life or wall - published_wall >= half_life
                published = stale and await self._attempt("publish", self._publish(addrs))
                if published:
                    published_at, published_wall, published_addrs, unpublished = now, wall, addrs, False
                elif stale:
                    unpublished = True
                if now - last_save >= self.options.save_interval:
                    await self._save_routing_table()
                    last_save = now
                small = len(self.dht.routing_table_snapshot()) < self.options.rejoin_below
                if small or (stale and not published):
                    await self._attempt("join", self._join())
                await self._check_room()
                self._check_clock()
                flush_all()  # the counts of log lines left out by floods that have stopped
                with trio.move_on_after(self.options.check_interval):
                    await self._addrs_changed.wait()  # a new address is published at once, not next round
        finally:
            with trio.CancelScope(shield=True):
                await self._save_routing_table()

    def _refresh_addrs(self) -> None:
        """Work out our advertised addresses again: a laptop that moved to another network, or got a new lease,
        has a new address behind its wildcard listener, and the record must say so (the loop then republishes)."""
        fresh = advertised_addrs(self._bound, self._bootstrap)
        if fresh != self.addrs:
            log.info("our addresses changed: %s (were %s)", " ".join(map(str, fresh)), " ".join(map(str, self.addrs)))
            self.addrs = fresh
            self._addrs_changed.set()

    async def _watch_addrs(self) -> None:
        """Every :data:`ADDRESS_CHECK_INTERVAL` seconds, see whether our addresses changed (a few UDP ``connect``
        calls, nothing sent), and whether the host slept meanwhile (:func:`host_clock_gap`); either wakes the
        maintenance loop, which republishes our record."""
        while True:
            await trio.sleep(self.options.address_interval)
            self._check_sleep()
            self._refresh_addrs()

    async def _watch_room(self) -> None:
        """While peers wait for room on our disk (our store could not write their messages), check the free space
        every :attr:`NodeOptions.room_check_interval` seconds rather than once a maintenance round: they are dialled
        (:meth:`ChatService.room_freed`) within seconds of room coming back."""
        while True:
            await trio.sleep(self.options.room_check_interval)
            if self.chat.peers_awaiting_room:
                await self._check_room()

    async def _check_room(self) -> None:
        """Check the free space (:meth:`_check_free_space`); if room came back, dial the peers that wait for it."""
        if self._check_free_space():
            await self._attempt("dial peers once room came back", self.chat.room_freed())

    def _check_sleep(self) -> None:
        gap = host_clock_gap()
        if gap is not None and self._clock_gap is not None and gap - self._clock_gap >= HOST_SLEPT_AFTER:
            log.info("the host slept for %.0f s; publishing our peer record again", gap - self._clock_gap)
            self._woke = True
            self._addrs_changed.set()
        self._clock_gap = gap

    async def _attempt(self, step: str, work: Awaitable[T]) -> T | None:
        """Run one maintenance step; a failure is logged and counted, and ``None`` returned."""
        try:
            return await work
        except (P2PMsgError, OSError) as exc:
            self.maintenance_failures[step] += 1
            # A step failing every round (a full disk, no DHT peer) must not write a line every 30 s for days.
            self._maintenance_warning.log(logging.WARNING, step, "maintenance: %s failed (will retry): %s", step, exc)
            return None

    async def _join(self) -> None:
        saved = await self.db.read(repo.load_dht_nodes)
        # A database call that started completes even when cancelled meanwhile; stop here rather than touch a DHT
        # node that the same cancellation may already have stopped.
        await trio.lowlevel.checkpoint_if_cancelled()
        # Our contacts' nodes too: a node whose bootstrap peers are all gone still joins (and stays in) the mesh
        # through the friends it talks to.  Their DHT port is a guess (that of their first TCP address, the default).
        contacts = [
            (host, port)
            for kind, host, port in map(Multiaddr.transport, await self.chat.contact_addresses())
            if kind == "tcp" and _is_ip(host)
        ]
        await trio.lowlevel.checkpoint_if_cancelled()
        targets = list(dict.fromkeys([(n.host, n.port) for n in saved] + self._bootstrap + contacts))
        if not targets:
            if not self._alone_said:
                self._alone_said = True
                log.info("dht: no bootstrap peers configured, none saved and no contact known; waiting for others")
            return
        before = len(self.dht.routing_table_snapshot())
        size = await self.dht.bootstrap(targets)
        if size:
            if size != before:  # a rejoin that changed nothing is not news (small meshes rejoin every round)
                log.info("dht: joined (asked %d address(es)): %d nodes in the routing table", len(targets), size)
            self._join_warned = False
        elif not self._join_warned:  # once per streak: the node retries every check_interval while alone
            self._join_warned = True
            where = ", ".join(f"{host}:{port}" for host, port in targets[:4]) + (", ..." if len(targets) > 4 else "")
            log.warning(
                "dht: no bootstrap peer answered (UDP %s); retrying every %g s. Check the addresses in config.toml "
                "(a /tcp/ bootstrap address means the same port on UDP) and that the bootstrap node runs",
                where,
                self.options.check_interval,
            )

    async def _publish(self, addrs: list[Multiaddr]) -> bool:
        if not addrs:
            return False
        last = await self.db.read(lambda conn: repo.get_setting(conn, RECORD_SEQ_SETTING))
        min_seq = int.from_bytes(last, "big") + 1 if last else 0
        stored = await self.dht.publish_peer_record(
            addrs, ttl=self.options.record_ttl, min_seq=min_seq, seq_store=self._store_record_seq
        )
        if stored:
            log.info("dht: published our peer record on %d nodes", stored)
        else:
            log.info(
                "dht: our peer record is stored nowhere yet (no DHT node answered, or each refused it: holders refuse "
                "a record that looks expired by their clock); will retry"
            )
        return stored > 0

    async def _store_record_seq(self, seq: int) -> None:
        """Persist the ``seq`` about to be signed (durably, before signing): holders refuse a record whose ``seq``
        is not higher than the one they hold, so a restart or a clock stepping back must never reuse one."""
        now = int(time.time() * 1000)
        await self.db.write(lambda conn: repo.set_setting(conn, RECORD_SEQ_SETTING, seq.to_bytes(8, "big"), now=now))

    async def _save_routing_table(self) -> None:
        now = int(time.time() * 1000)
        nodes = [
            SavedDhtNode(node_id=c.node_id, host=c.host, port=c.port, last_seen=now)
            for c in self.dht.routing_table_snapshot()
        ]
        if not nodes:
            return
        try:
            await self.db.write(lambda conn: repo.save_dht_nodes(conn, nodes))
        except Exception as exc:  # the database may already be closing at shutdown
            log.warning("dht: could not save the routing table: %s", exc)


@contextlib.asynccontextmanager
async def _shutdown_on_signals(scope: trio.CancelScope) -> AsyncIterator[None]:
    """Cancel ``scope`` on SIGINT or SIGTERM (a clean shutdown instead of KeyboardInterrupt).  The signals stay
    caught until the body has ended, the database's close included: a second one (Ctrl-C pressed twice, or
    ``timeout``, which sends its signal on twice) raised KeyboardInterrupt in the middle of the shutdown.  The
    watcher is a system task, so an error of the body comes out as it was raised, not inside an exception group."""
    watcher = trio.CancelScope()
    watcher_done = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def watch() -> None:
            try:
                with watcher:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if scope.cancel_called:
                            log.info("received %s again; still shutting down (finishing the writes queued)", name)
                            continue
                        log.info("received %s, shutting down", name)
                        scope.cancel()
            finally:
                watcher_done.set()

        trio.lowlevel.spawn_system_task(watch)
        try:
            yield
        finally:
            # The watcher must be gone before the receiver closes: closing it hands a pending signal back to the
            # process, and a watcher still reading it then failed inside trio (TrioInternalError, a review's flood
            # of SIGINTs, 2 runs in 25).
            watcher.cancel()
            with trio.CancelScope(shield=True):
                await watcher_done.wait()


async def run_node(
    home: Path,
    identity: Identity,
    config: NodeConfig,
    *,
    options: NodeOptions | None = None,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node on ``home`` until SIGINT/SIGTERM or cancellation (``p2pmsg run``).

    Raises :class:`~p2pmsg.control.errors.NodeAlreadyRunningError` (a plain exception, not inside an exception
    group) when another node serves this home.
    """
    home = Path(home)
    if probe_socket(control_socket_path(home)) is SocketState.RUNNING:  # before touching its database
        raise NodeAlreadyRunningError(f"another node is already running on {home}; stop it first or use another --home")
    path = home / DATABASE_FILENAME
    if not path.exists() or path.stat().st_size == 0:
        log.warning(
            "no database at %s (or an empty file): starting with a new one, without contacts or history. `p2pmsg "
            "init` creates it, so if this home had one, it was moved or deleted",
            path,
        )
    scope = trio.CancelScope()  # what a signal cancels: the node, not the database's close
    async with _shutdown_on_signals(scope), open_database(path) as db:
        node = Node(home, identity, config, db, options=options)
        await node.control.bind()  # the authoritative check: it owns the socket from here on
        with scope:
            await node.run(task_status=task_status)
    log.info("node stopped")


async def run_bootstrap_node(
    identity: Identity,
    listen: Multiaddr,
    *,
    bootstrap: Sequence[str] = (),
    on_ready: Callable[[Multiaddr], None] | None = None,
) -> None:
    """Run a DHT-only node on the UDP multiaddr ``listen`` until SIGINT/SIGTERM (``p2pmsg bootstrap``).

    ``on_ready`` receives our full multiaddr (with ``/p2p/<peer id>``) once the socket is bound.
    """
    kind, host, port = listen.transport()
    if kind != "udp":
        raise LocalProtocolError(f"a bootstrap node listens on UDP (…/udp/PORT), not {kind}: {listen}")
    with trio.CancelScope() as scope:
        async with _shutdown_on_signals(scope), trio.open_nursery() as nursery:
            dht = DhtNode(identity, host=host, port=port)
            bound_host, bound_port = await nursery.start(dht.run)
            peers = await resolve_bootstrap(bootstrap)
            addrs = advertised_addrs([Multiaddr.from_transport("udp", bound_host, bound_port)], peers)
            for addr in addrs:
                full = addr.with_peer_id(identity.peer_id)
                if on_ready is not None:  # the caller says it (the CLI prints it): no second line in the log
                    on_ready(full)
                else:
                    log.info("bootstrap node listening on %s", full)
            if _is_wildcard(host) and all(_is_loopback_host(a.transport()[1]) for a in addrs):
                log.warning(
                    "found no address of this host that other machines can reach (no default route): give them "
                    "/%s/<this host's LAN, VPN or public address>/udp/%d/p2p/%s",
                    "ip6" if ":" in host else "ip4",
                    bound_port,
                    identity.peer_id,
                )
            if peers:
                await dht.bootstrap(peers)
    log.info("bootstrap node stopped")


def _store_failing(stats: StoreStats, messages_stored_at_ms: int | None) -> dict[str, Any] | None:
    """``status``'s ``store_failing``: while writes failed within the last 10 minutes, since when and when last
    (whole seconds of the wall clock) and why, and when messages were last stored if that was after the latest
    failure (``stored``: the store works again, or did for a while; else ``None``); without such failures ``None``."""
    if not stats.failing or stats.failing_since is None or stats.last_failure_at is None:
        return None
    stored = None
    if messages_stored_at_ms is not None and messages_stored_at_ms / 1000 >= stats.last_failure_at:
        stored = messages_stored_at_ms // 1000
    last = int(stats.last_failure_at)
    return {"since": int(stats.failing_since), "last": last, "error": stats.last_error or "", "stored": stored}

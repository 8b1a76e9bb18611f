"""The trio UDP service that drives the sans-IO DHT engine.

Theory of operation
-------------------
:class:`DhtNode` owns one UDP socket and one :class:`~p2pmsg.dht.core.engine.DhtEngine`, and runs four tasks in
the nursery of :meth:`DhtNode.run`: a *receiver* feeding every datagram to the engine, a *timer* that sleeps
until the engine's next deadline (or until woken because a new request went out) and calls ``tick`` -- which also
drops stored values as they expire -- a *refresher* that, whenever a bucket has seen no lookup for
``DhtConfig.refresh_interval`` seconds (default one hour), looks up a random id in it, one bucket at a time, and a
*liveness checker* that runs the engine's liveness checks when they are due (a contact quiet for
``DhtConfig.liveness_interval``, default 15 minutes, is pinged, and leaves the routing table if it keeps failing to
answer).

After every engine call the node *flushes*: it sends the datagrams the engine queued and hands completion events to
the tasks awaiting them.  The engine is only touched from trio tasks of one thread and never across an ``await``, so
no lock is needed.  All the protocol decisions -- validation, limits, anti-amplification, identity checks -- live in
the engine; this module only moves bytes and wakes tasks.

What this node never does is re-publish the values it holds: only an owner republishes its record
(:meth:`DhtNode.publish_peer_record`, called by the node at half the record's lifetime and when its addresses
change), so a record whose owner is gone expires everywhere at the expiry its owner signed.

Whoever runs the node may listen to the records it takes in: ``on_record`` is called with every signed record
the store accepts that it did not hold (a new key, or a higher ``seq`` than the one held; a refresh of the same
record does not count), once the engine call that stored it has returned.  The chat layer uses it to notice that a
contact published new addresses.

The public operations are coroutines that start an engine operation, register a waiter for its id and wait for the
matching event; if the caller is cancelled, the operation is cancelled in the engine too.  Bounded by construction:
the engine caps pending requests and concurrent lookups, and every request times out after ``rpc_timeout``.

:func:`open_dht_node` is the usual entry point::

    async with open_dht_node(identity, host="127.0.0.1", port=0) as node:
        await node.bootstrap([("192.0.2.1", 8468)])
        await node.publish_peer_record(["/ip4/192.0.2.7/tcp/4001"])
        record = await node.find_peer(friend_peer_id)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import socket as _socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager

import trio

from p2pmsg.dht.core.contact import Address, Contact, PlainKey, digest, distance
from p2pmsg.dht.core.engine import DhtConfig, DhtEngine, ValueMode
from p2pmsg.dht.core.errors import DhtUsageError, RecordError
from p2pmsg.dht.core.events import DhtEvent, LookupDone, PingDone, StoreDone
from p2pmsg.dht.core.messages import PlainValue, is_plain_value
from p2pmsg.dht.core.records import PeerRecord, VerifiedRecord, peer_record_key, seal_peer_record
from p2pmsg.dht.core.storage import RecordStore
from p2pmsg.identity import Identity, PeerId
from p2pmsg.wire.multiaddr import Multiaddr

__all__ = ["DhtNode", "RecordListener", "open_dht_node"]

log = logging.getLogger(__name__)

#: Largest datagram read from the socket (anything larger than the engine accepts is dropped by it).
_RECV_SIZE = 65535
#: At most this many datagrams are handled per wake-up of the receiver before it flushes and yields.
_RECV_BATCH = 64
#: Default lifetime of a published peer record.
DEFAULT_RECORD_TTL = 3600.0
#: Bucket refresh: at most this many refresh lookups per pass, and at least this many seconds between passes.
_MAX_REFRESH_LOOKUPS = 160
_MIN_REFRESH_GAP = 1.0
#: Liveness checks run at most this often (the contacts that fall due in between are pinged together).
_MIN_LIVENESS_GAP = 5.0


RecordListener = Callable[[VerifiedRecord], None]
"""Called with a signed record the node's store just accepted as new to it; it runs in the DHT's own task, so it
must return at once (hand any work to another task) and should not raise (an exception is logged and ignored)."""


@dataclasses.dataclass(slots=True)
class _Waiter:
    event: trio.Event = dataclasses.field(default_factory=trio.Event)
    result: DhtEvent | None = None


def _check_ip_address(address: tuple[str, int]) -> Address:
    host, port = address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise DhtUsageError(f"DHT addresses must be IP literals, not names: {host!r}") from None
    if not isinstance(port, int) or not 0 < port < 65536:
        raise DhtUsageError(f"invalid UDP port {port!r}")
    return (str(ip), port)


class DhtNode:
    """A p2pmsg DHT node on one UDP socket (see the module docstring); start it with :meth:`run`."""

    def __init__(
        self,
        identity: Identity,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        config: DhtConfig | None = None,
        wall_clock: Callable[[], float] = time.time,
        on_record: RecordListener | None = None,
    ) -> None:
        """``on_record`` hears of every signed record the store takes in as new (:data:`RecordListener`)."""
        self.identity = identity
        self._host = host
        self._port = port
        self._wall = wall_clock
        try:
            now = trio.current_time()
        except RuntimeError:  # built outside trio.run
            now = 0.0
        self._on_record = on_record
        self._fresh_records: list[tuple[bytes, bytes]] = []
        storage_limits = (config or DhtConfig()).storage
        self.engine = DhtEngine(
            identity,
            config=config,
            now=now,
            wall_clock=wall_clock,
            own_address=self._own_address_toward,
            storage=None if on_record is None else RecordStore(storage_limits, on_new_signed=self._note_record),
        )
        self._sock: _socket.socket | None = None
        self._address: Address | None = None
        self._waiters: dict[int, _Waiter] = {}
        self._timer_scope: trio.CancelScope | None = None
        self._record_seq = 0
        self.send_errors = 0
        self.refresh_lookups = 0

    # -- lifecycle -------------------------------------------------------------------------------------------------

    @property
    def node_id(self) -> bytes:
        """This node's 20-byte DHT id: ``sha1(PublicKey protobuf)``."""
        return self.engine.node_id

    @property
    def peer_id(self) -> PeerId:
        """This node's peer id."""
        return self.identity.peer_id

    @property
    def address(self) -> Address:
        """The bound ``(ip, port)``; only valid while :meth:`run` runs."""
        if self._address is None:
            raise DhtUsageError("the DHT node is not running")
        return self._address

    @property
    def stats(self) -> dict[str, int]:
        """Counters (datagrams, drops by reason, stores, verifications...), for ``p2pmsg status``."""
        return {
            **self.engine.stats,
            "send_errors": self.send_errors,
            "pending": self.engine.pending_requests,
            "values_evicted": self.engine.storage.evicted,
            "refresh_lookups": self.refresh_lookups,
        }

    async def run(self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket and serve until cancelled; ``task_status.started`` gets the bound address."""
        family = _socket.AF_INET6 if ":" in self._host else _socket.AF_INET
        raw = _socket.socket(family, _socket.SOCK_DGRAM)
        sock = trio.socket.from_stdlib_socket(raw)  # non-blocking from here on; closing it closes raw
        with sock:
            try:
                await sock.bind((self._host, self._port))
            except OSError as exc:  # say which socket: the node binds several (TCP, WebSocket, this one)
                raise OSError(
                    exc.errno, f"cannot listen for the DHT on UDP {self._host}:{self._port}: {exc.strerror or exc}"
                ) from exc
            bound = sock.getsockname()
            self._address = (str(bound[0]), int(bound[1]))
            self._sock = raw
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receiver, raw)
                    nursery.start_soon(self._timer)
                    nursery.start_soon(self._refresher)
                    nursery.start_soon(self._liveness_checker)
                    task_status.started(self._address)
            finally:
                self._sock = None
                trio.lowlevel.notify_closing(raw)  # a caller's flush waiting for the socket to drain gives up
                self._address = None
                for waiter in self._waiters.values():
                    waiter.event.set()
                self._waiters.clear()

    def _own_address_toward(self, peer: Address) -> Address | None:
        """Our address as ``peer`` sees it if no NAT is in between: the bound address, or for a wildcard bind the
        local address of the route to ``peer`` (what a ``p2pmsg_auth`` proof from ``peer`` must sign)."""
        bound = self._address
        if bound is None:
            return None
        if not ipaddress.ip_address(bound[0]).is_unspecified:
            return bound
        family = _socket.AF_INET6 if ":" in peer[0] else _socket.AF_INET
        try:
            with _socket.socket(family, _socket.SOCK_DGRAM) as probe:
                probe.connect(peer)  # UDP: no packet is sent, the kernel only picks the route and source address
                return (str(probe.getsockname()[0]), bound[1])
        except OSError:
            return None

    async def _receiver(self, sock: _socket.socket) -> None:
        """Wait until the socket is readable, hand every queued datagram (at most a batch) to the engine, then flush
        once: fewer trips through the scheduler than one awaited ``recvfrom`` and ``sendto`` per datagram."""
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(_RECV_BATCH):
                try:
                    data, source = sock.recvfrom(_RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. ICMP port unreachable surfacing as ECONNREFUSED on some systems
                    log.debug("recvfrom failed: %s", exc)
                    continue
                self.engine.datagram_received(data, (str(source[0]), int(source[1])), trio.current_time())
            await self._flush()

    def _next_tick(self) -> float:
        deadlines = [t for t in (self.engine.next_deadline(), self.engine.next_expiry()) if t is not None]
        return min(deadlines, default=math.inf)

    async def _timer(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._next_tick()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            self.engine.tick(trio.current_time())
            await self._flush(wake=False)

    async def _refresher(self) -> None:
        """Look up a random id in every bucket that no lookup went through for ``refresh_interval`` seconds."""
        interval = self.engine.config.refresh_interval
        last_pass = -math.inf
        while True:
            due = max(self.engine.next_refresh_at(interval), last_pass + min(_MIN_REFRESH_GAP, interval))
            await trio.sleep_until(due)
            last_pass = trio.current_time()
            for target in self.engine.refresh_targets(last_pass, interval)[:_MAX_REFRESH_LOOKUPS]:
                try:
                    await self.find_node(target)
                    self.refresh_lookups += 1
                except DhtUsageError as exc:  # too many lookups right now: mark the bucket done, retry next round
                    log.debug("bucket refresh lookup skipped: %s", exc)
                    self.engine.table.touch(target, trio.current_time())

    async def _liveness_checker(self) -> None:
        """Ping the contacts due for a liveness check (at most every ``_MIN_LIVENESS_GAP`` seconds).  A task of its
        own: a refresh pass awaits its lookups one after another, and must not hold the checks up."""
        retry = self.engine.config.liveness_retry
        last_check = -math.inf
        while True:
            # The table changes while this task sleeps, so look again at least once per liveness_retry.
            due = min(self.engine.next_liveness_check(), trio.current_time() + retry)
            await trio.sleep_until(max(due, last_check + _MIN_LIVENESS_GAP))
            last_check = trio.current_time()
            if self.engine.check_liveness(last_check):
                await self._flush()

    async def _flush(self, *, wake: bool = True) -> None:
        """Send what the engine queued and deliver its events; with ``wake``, bring the timer's alarm forward if the
        engine now has an earlier deadline (setting a cancel scope's deadline does not even wake the task)."""
        for event in self.engine.take_events():
            waiter = self._waiters.pop(getattr(event, "op", -1), None)
            if waiter is not None:
                waiter.result = event
                waiter.event.set()
        if self._fresh_records:
            self._report_records()
        datagrams = self.engine.take_datagrams()
        scope = self._timer_scope
        if wake and scope is not None:  # an earlier deadline (a new request): move the sleeping timer's alarm
            scope.deadline = min(scope.deadline, self._next_tick())
        sock = self._sock
        if sock is None:
            return
        for data, address in datagrams:
            while True:
                try:
                    sock.sendto(data, address)
                except BlockingIOError:  # the send buffer is full: wait for room (rare for UDP)
                    try:
                        await trio.lowlevel.wait_writable(sock)
                    except trio.ClosedResourceError:
                        return
                    if self._sock is not sock:
                        return
                    continue
                except OSError as exc:
                    self.send_errors += 1
                    log.debug("sendto %s failed: %s", address, exc)
                break

    def _note_record(self, key: bytes, value: bytes) -> None:
        """The store took in a signed record: reported to ``on_record`` after the engine call (:meth:`_flush`)."""
        self._fresh_records.append((key, value))

    def _report_records(self) -> None:
        """Hand the signed records the store took in since the last flush to ``on_record``."""
        fresh = list(self._fresh_records)
        self._fresh_records.clear()
        listener = self._on_record
        if listener is None:
            return
        for key, value in fresh:
            try:
                record = self.engine.verify_record(key, value)  # verified on STORE a moment ago: a cache hit
            except RecordError:  # expired meanwhile
                continue
            try:
                listener(record)
            except Exception:  # a broken listener must not cost the DHT its receiver
                log.exception("the record listener failed on %s", key.hex())

    # -- operations ------------------------------------------------------------------------------------------------

    def _now(self) -> float:
        if self._sock is None:
            raise DhtUsageError("the DHT node is not running")
        return trio.current_time()

    async def _wait(self, ops: Sequence[int]) -> list[DhtEvent]:
        waiters = []
        for op in ops:
            waiter = _Waiter()
            self._waiters[op] = waiter
            waiters.append(waiter)
        try:
            await self._flush()
            for waiter in waiters:
                await waiter.event.wait()
        finally:
            for op in ops:
                if self._waiters.pop(op, None) is not None:
                    self.engine.cancel(op)
        results = [w.result for w in waiters]
        if any(r is None for r in results):
            raise DhtUsageError("the DHT node stopped during the operation")
        return [r for r in results if r is not None]

    async def _lookup(self, start: Callable[[float], int]) -> LookupDone:
        (event,) = await self._wait([start(self._now())])
        assert isinstance(event, LookupDone)
        return event

    async def ping(self, address: tuple[str, int]) -> bytes | None:
        """Ping ``address``; the node id it answered with, or ``None``.  A live node enters the routing table."""
        target = _check_ip_address(address)
        (event,) = await self._wait([self.engine.ping(target, self._now())])
        assert isinstance(event, PingDone)
        return event.node_id

    async def bootstrap(self, addresses: Iterable[tuple[str, int]], *, settle: float | None = None) -> int:
        """Ping every address (except our own), then look up our own id; returns the number of contacts in the
        routing table.

        The lookup starts once every ping has ended, or ``settle`` seconds (default ``DhtConfig.stall_timeout``)
        after the first answer, whichever comes first: a restarted node pings the nodes of its saved routing table,
        and each that died since would otherwise hold the join (and the node's first record publish, which waits
        for it) for the full ``rpc_timeout``.  Pings still unanswered then go on unawaited; a late answer still
        enters the routing table."""
        targets = [t for t in map(_check_ip_address, addresses) if t != self._address]  # never ourselves
        await self._ping_until_settled(targets, self.engine.config.stall_timeout if settle is None else settle)
        await self.find_node(self.node_id)
        return len(self.engine.table)

    async def _ping_until_settled(self, targets: Sequence[Address], settle: float) -> None:
        """Ping ``targets``; return when every ping has ended or ``settle`` seconds after the first answer.  Pings
        still pending on return are left to the engine (no waiter); if the caller is cancelled or the node stops,
        they are cancelled like any operation."""
        now = self._now()
        waiters = {self.engine.ping(a, now): _Waiter() for a in targets}
        self._waiters.update(waiters)
        settled = False
        try:
            await self._flush()
            pending = dict(waiters)
            with trio.CancelScope() as scope:
                while True:
                    # Take the pings that ended (a ping that cannot go out ends within the flush above), then wait
                    # for the next, with no checkpoint in between: nothing can end unseen.
                    for op, waiter in list(pending.items()):
                        if waiter.result is None and op not in self._waiters:
                            raise DhtUsageError("the DHT node stopped during the operation")
                        if waiter.result is None:
                            continue
                        del pending[op]
                        answered = isinstance(waiter.result, PingDone) and waiter.result.node_id is not None
                        if answered and scope.deadline == math.inf:
                            scope.deadline = trio.current_time() + settle
                    if not pending:
                        break
                    progress = trio.Event()  # set by whichever pending ping ends next
                    for waiter in pending.values():
                        waiter.event = progress
                    await progress.wait()
            settled = True
        finally:
            for op in waiters:
                if self._waiters.pop(op, None) is not None and not settled:
                    self.engine.cancel(op)

    async def lookup(
        self, key: bytes, *, mode: ValueMode | None = None, use_local: bool = True, count: int | None = None
    ) -> LookupDone:
        """Run one lookup of the 20-byte ``key`` and return its full outcome (closest responders, value or verified
        record, queries sent, hops): a node lookup of the ``count`` (default k) closest when ``mode`` is ``None``,
        else a value lookup (``use_local=False`` skips this node's own store, e.g. to measure the network)."""
        if mode is None:
            return await self._lookup(lambda now: self.engine.lookup_nodes(key, now, count=count))
        return await self._lookup(lambda now: self.engine.lookup_value(key, now, mode=mode, use_local=use_local))

    async def find_node(self, target: bytes) -> list[Contact]:
        """The k closest nodes to ``target`` that answered, closest first."""
        done = await self._lookup(lambda now: self.engine.lookup_nodes(target, now))
        return list(done.closest)

    async def get(self, key: PlainKey) -> PlainValue | None:
        """The value stored under ``key`` by this package or by a stock ``kademlia`` node, or ``None``."""
        return await self.get_digest(digest(key))

    async def get_digest(self, dkey: bytes) -> PlainValue | None:
        """Like :meth:`get` for an already hashed 20-byte key."""
        done = await self._lookup(lambda now: self.engine.lookup_value(dkey, now, mode=ValueMode.PLAIN))
        if not done.found or not is_plain_value(done.value):
            return None
        value: PlainValue = done.value  # type: ignore[assignment]
        return value

    async def set(self, key: PlainKey, value: PlainValue) -> int:
        """Store ``value`` under ``key`` on the k closest nodes; returns how many STOREs really succeeded."""
        return await self.set_digest(digest(key), value)

    async def set_digest(self, dkey: bytes, value: PlainValue) -> int:
        """Like :meth:`set` for an already hashed 20-byte key."""
        if not is_plain_value(value):
            raise DhtUsageError(f"DHT values must be int, float, bool, str or bytes, not {type(value).__name__}")
        done = await self._lookup(lambda now: self.engine.lookup_nodes(dkey, now))
        return await self._store_on(dkey, value, list(done.closest))

    async def _store_on(self, key: bytes, value: object, targets: list[Contact]) -> int:
        if not targets:
            return 0
        now = self._now()
        farthest = max(c.distance_to(key) for c in targets)
        if distance(self.node_id, key) < farthest or len(targets) < self.engine.config.k:
            self.engine.store_local(key, value, now)
        events = await self._wait([self.engine.store(c, key, value, now) for c in targets])
        return sum(1 for e in events if isinstance(e, StoreDone) and e.stored)

    async def put_signed(self, key: bytes, value: bytes) -> int:
        """Publish a signed-record value (see :mod:`~p2pmsg.dht.core.records`); how many STOREs succeeded.

        The record goes to the k closest nodes, and additionally to the closest *verified* p2pmsg nodes among the
        next k, one for each stock (unverified) node among the k closest
        (:meth:`~p2pmsg.dht.core.engine.DhtEngine.signed_record_targets`).

        Raises :class:`DhtUsageError` only if the record itself does not verify.  A copy is kept in this node's own
        store (a record signed by this node always fits there); if the local store still refuses it (e.g. it holds a
        higher ``seq``), that is logged and the record is published to the remote nodes all the same.
        """
        try:
            self.engine.verify_record(key, value)
        except RecordError as exc:
            raise DhtUsageError(f"the record does not verify: {exc}") from None
        if not self.engine.store_local(key, value, self._now()):
            log.info("own store refused the record for %s; publishing it to remote nodes anyway", key.hex())
        k = self.engine.config.k
        done = await self._lookup(lambda now: self.engine.lookup_nodes(key, now, count=2 * k))
        return await self._store_on(key, value, self.engine.signed_record_targets(done))

    async def get_signed(self, key: bytes) -> VerifiedRecord | None:
        """The verified record with the highest ``seq`` under ``key``, whatever other nodes return."""
        done = await self._lookup(lambda now: self.engine.lookup_value(key, now, mode=ValueMode.SIGNED))
        return done.record

    def next_record_seq(self, min_seq: int = 0) -> int:
        """The ``seq`` :meth:`publish_peer_record` would pick now: the highest of ``min_seq``, one more than the last
        record published by this object or held in our own store, and the current Unix time in seconds."""
        last = self._record_seq
        held = self.engine.storage.get(peer_record_key(self.peer_id), self._now())
        if held is not None and held.seq is not None:
            last = max(last, held.seq)
        return max(last + 1, int(self._wall()), min_seq)

    async def publish_peer_record(
        self,
        addrs: Sequence[Multiaddr | str],
        *,
        ttl: float = DEFAULT_RECORD_TTL,
        seq: int | None = None,
        min_seq: int = 0,
        seq_store: Callable[[int], Awaitable[object]] | None = None,
    ) -> int:
        """Sign and publish this node's peer record; returns how many remote STOREs succeeded.

        ``seq`` defaults to :meth:`next_record_seq` (``min_seq``): holders refuse a record whose ``seq`` is not
        higher than the one they hold, and the last ``seq`` lives only in memory here, so a node that restarts (or
        whose clock steps back, or that publishes twice within a second of a restart) must pass the last ``seq``
        it published plus one as ``min_seq``.  ``seq_store``, if given, is awaited with the chosen ``seq`` before
        the record is signed -- persist it there, so no ``seq`` is ever signed twice (an exception from it aborts
        the publish).
        """
        texts = tuple(str(a) if isinstance(a, Multiaddr) else str(Multiaddr.parse(a)) for a in addrs)
        if seq is None:
            seq = self.next_record_seq(min_seq)
        if seq_store is not None:
            await seq_store(seq)
        wall = self._wall()
        self._record_seq = max(self._record_seq, seq)
        record = PeerRecord(peer_id=self.peer_id, addrs=texts, seq=seq, expires_at=int(wall + ttl))
        value = seal_peer_record(self.identity, record)
        return await self.put_signed(peer_record_key(self.peer_id), value)

    async def find_peer(self, peer_id: PeerId) -> PeerRecord | None:
        """The freshest verified peer record of ``peer_id``, or ``None``."""
        record = await self.get_signed(peer_record_key(peer_id))
        if record is None or not isinstance(record.content, PeerRecord):
            return None
        return record.content

    def routing_table_snapshot(self) -> list[Contact]:
        """Every contact in the routing table."""
        return self.engine.table.contacts()

    def is_verified(self, contact: Contact) -> bool:
        """Whether ``contact`` proved its node id with the signed challenge."""
        return self.engine.is_verified(contact)


@asynccontextmanager
async def open_dht_node(
    identity: Identity,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    config: DhtConfig | None = None,
    wall_clock: Callable[[], float] = time.time,
    on_record: RecordListener | None = None,
) -> AsyncIterator[DhtNode]:
    """Run a :class:`DhtNode` for the duration of the ``async with`` block."""
    node = DhtNode(identity, host=host, port=port, config=config, wall_clock=wall_clock, on_record=on_record)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()

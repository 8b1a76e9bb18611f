"""A deterministic discrete-event network for driving several sans-IO DhtEngines in one test (virtual time)."""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pmsg.dht.core.contact import Address
from p2pmsg.dht.core.engine import DhtConfig, DhtEngine
from p2pmsg.dht.core.events import DhtEvent
from p2pmsg.identity import Identity

LATENCY = 0.01


def identity(n: int) -> Identity:
    """A deterministic identity for test node ``n``."""
    return Identity.from_seed(hashlib.sha256(b"dht-test-%d" % n).digest())


@dataclass
class Sent:
    """One datagram that crossed the simulated network."""

    time: float
    src: Address
    dst: Address
    data: bytes


@dataclass
class SimNet:
    """Engines keyed by address; datagrams delivered after LATENCY; time jumps to the next thing to happen."""

    now: float = 0.0
    nodes: dict[Address, DhtEngine] = field(default_factory=dict)
    dead: set[Address] = field(default_factory=set)
    sent: list[Sent] = field(default_factory=list)
    events: dict[Address, list[DhtEvent]] = field(default_factory=dict)
    wall_offset: float = 1_700_000_000.0
    #: Hook for raw listeners (a fake stock node, an attacker): address -> callback(src, data) -> list of replies.
    raw: dict[Address, Callable[[Address, bytes], list[bytes]]] = field(default_factory=dict)
    _queue: list[tuple[float, int, Address, Address, bytes]] = field(default_factory=list)
    _seq: int = 0
    _rng: random.Random = field(default_factory=lambda: random.Random(7))

    def wall(self) -> float:
        return self.wall_offset + self.now

    def add(self, n: int, *, config: DhtConfig | None = None, port: int | None = None) -> DhtEngine:
        address = (f"10.0.0.{1 + n % 250}", port or 4000 + n)
        engine = DhtEngine(
            identity(n),
            config=config,
            now=self.now,
            random_bytes=lambda size: bytes(self._rng.getrandbits(8) for _ in range(size)),
            wall_clock=self.wall,
            own_address=lambda peer: address,
        )
        self.nodes[address] = engine
        self.events[address] = []
        return engine

    def address_of(self, engine: DhtEngine) -> Address:
        return next(a for a, e in self.nodes.items() if e is engine)

    def inject(self, src: Address, dst: Address, data: bytes) -> None:
        """Put a datagram on the wire (e.g. a forged one)."""
        self._seq += 1
        heapq.heappush(self._queue, (self.now + LATENCY, self._seq, src, dst, data))

    def _collect(self) -> None:
        for address, engine in self.nodes.items():
            for data, dst in engine.take_datagrams():
                self.sent.append(Sent(self.now, address, dst, data))
                self.inject(address, dst, data)
            self.events[address].extend(engine.take_events())

    def step(self) -> bool:
        """Advance to the next delivery or deadline; False when nothing is left to happen."""
        self._collect()
        times = [e.next_deadline() for a, e in self.nodes.items() if a not in self.dead]
        candidates = [t for t in times if t is not None]
        if self._queue:
            candidates.append(self._queue[0][0])
        if not candidates:
            return False
        self.now = max(self.now, min(candidates))
        while self._queue and self._queue[0][0] <= self.now:
            _, _, src, dst, data = heapq.heappop(self._queue)
            if dst in self.dead or src in self.dead:
                continue
            if dst in self.raw:
                for reply in self.raw[dst](src, data):
                    self.inject(dst, src, reply)
                continue
            engine = self.nodes.get(dst)
            if engine is not None:
                engine.datagram_received(data, src, self.now)
        for address, engine in self.nodes.items():
            if address not in self.dead:
                engine.tick(self.now)
        self._collect()
        return True

    def run(self, until: float | None = None, max_steps: int = 200_000) -> None:
        """Run until quiet (or virtual time ``until``)."""
        for _ in range(max_steps):
            if until is not None and self.now >= until:
                return
            if not self.step():
                return
        raise AssertionError("simulation did not settle")

    def wait(self, engine: DhtEngine, op: int, max_steps: int = 200_000) -> DhtEvent:
        """Run until ``engine`` reports the completion of ``op``; return that event."""
        address = self.address_of(engine)
        for _ in range(max_steps):
            self._collect()
            for event in self.events[address]:
                if getattr(event, "op", None) == op:
                    self.events[address].remove(event)
                    return event
            if not self.step():
                break
        raise AssertionError(f"operation {op} never completed")

    def bytes_between(self, src: Address, dst: Address) -> int:
        return sum(len(s.data) for s in self.sent if s.src == src and s.dst == dst)


def build_network(
    count: int, *, config: DhtConfig | None = None, seed_links: int = 3
) -> tuple[SimNet, list[DhtEngine]]:
    """``count`` engines, each bootstrapped by pinging a few earlier ones, then a self-lookup each."""
    net = SimNet()
    engines = [net.add(i, config=config) for i in range(count)]
    for i, engine in enumerate(engines[1:], start=1):
        for j in range(max(0, i - seed_links), i):
            net.wait(engine, engine.ping(net.address_of(engines[j]), net.now))
    for engine in engines:
        net.wait(engine, engine.lookup_nodes(engine.node_id, net.now))
    net.run()
    return net, engines

"""The iterative Kademlia lookup as an explicit state machine.

Theory of operation
-------------------
A :class:`Lookup` searches for the ``k`` nodes closest to a 160-bit ``target``.  It knows a sorted set of
*candidates* (contacts, ordered by XOR distance to the target), each in one :class:`QueryState`:

``NEW`` (known, not asked) -> ``IN_FLIGHT`` (asked) -> ``RESPONDED`` | ``FAILED`` | ``STALLED``;
``STALLED`` (asked, slow: ``stall_timeout`` passed) -> ``RESPONDED`` | ``FAILED``.

The rules, applied after every input:

* **Window.**  ``W`` is the first ``k`` candidates that are neither ``FAILED`` nor ``STALLED``.  While fewer than
  ``alpha`` queries are ``IN_FLIGHT``, the closest ``NEW`` candidate in ``W`` is asked (:meth:`Lookup.next_queries`).
  A stalled query stops counting against ``alpha``, so one dead peer never holds the lookup up while other candidates
  remain; its late answer is still used, and the driver's hard timeout turns it into ``FAILED``.
* **Termination.**  ``T`` is the first ``k`` candidates that are not ``FAILED``.  The lookup finishes when every
  member of ``T`` has ``RESPONDED`` -- so the result is the true ``k`` closest *responders* among all nodes heard of
  -- or when nothing is left to ask or wait for.  A failed candidate stays ``FAILED`` however often later answers
  name it again (the ``kademlia`` package's crawler forgets a failed node but remembers it as contacted, so a dead
  node named again by another answer ends up in its result; it also waits for a whole round of alpha answers, so
  one dead peer stalls it for the full timeout).  The driver may also :meth:`~Lookup.finish` early.
* **Hops.**  Every candidate remembers its *hop*: 1 for a seed from the routing table, ``n + 1`` for a contact first
  named by the answer of a hop-``n`` candidate.  The hop of the node that held a value, or the largest hop among the
  ``k`` closest responders (:meth:`Lookup.depth`), is the number of sequential round trips the lookup needed.
* **Bounds.**  At most ``max_candidates`` candidates are kept (the farthest ``NEW`` ones are dropped first), one per
  node id and one per address (many ids pointing at one address would turn the lookup into a reflector), and at most
  ``max_queries`` queries are sent in total.

The lookup never sends anything and never reads a clock: the driver passes ``now`` and reports answers and failures.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable
from typing import Final

from p2pmsg.dht.core.contact import NODE_ID_SIZE, Address, Contact
from p2pmsg.dht.core.errors import DhtUsageError

__all__ = ["Lookup", "LookupState", "QueryState"]


class QueryState(enum.Enum):
    """Where one candidate of a lookup stands."""

    NEW = "new"
    IN_FLIGHT = "in-flight"
    STALLED = "stalled"
    RESPONDED = "responded"
    FAILED = "failed"


class LookupState(enum.Enum):
    """Whether the lookup still runs."""

    RUNNING = "running"
    FINISHED = "finished"


#: The one transition table of a candidate's query state.
_QUERY_TRANSITIONS: Final[dict[QueryState, frozenset[QueryState]]] = {
    QueryState.NEW: frozenset({QueryState.IN_FLIGHT}),
    QueryState.IN_FLIGHT: frozenset({QueryState.RESPONDED, QueryState.FAILED, QueryState.STALLED}),
    QueryState.STALLED: frozenset({QueryState.RESPONDED, QueryState.FAILED}),
    QueryState.RESPONDED: frozenset(),
    QueryState.FAILED: frozenset(),
}


class _Candidate:
    __slots__ = ("contact", "distance", "hop", "stall_at", "state")

    def __init__(self, contact: Contact, dist: int, hop: int) -> None:
        self.contact = contact
        self.distance = dist
        self.hop = hop
        self.state = QueryState.NEW
        self.stall_at = 0.0

    def move(self, new: QueryState) -> None:
        if new not in _QUERY_TRANSITIONS[self.state]:
            raise DhtUsageError(f"lookup query for {self.contact}: illegal transition {self.state.name} -> {new.name}")
        self.state = new


class Lookup:
    """One iterative lookup for ``target`` (see the module docstring)."""

    def __init__(
        self,
        target: bytes,
        *,
        k: int = 20,
        alpha: int = 3,
        stall_timeout: float = 0.5,
        exclude_ids: Iterable[bytes] = (),
        max_candidates: int | None = None,
        max_queries: int | None = None,
    ) -> None:
        if len(target) != NODE_ID_SIZE:
            raise DhtUsageError(f"lookup target must be {NODE_ID_SIZE} bytes")
        if k < 1 or alpha < 1 or stall_timeout <= 0:
            raise DhtUsageError("k and alpha must be positive and stall_timeout > 0")
        self.target = target
        self.k = k
        self.alpha = alpha
        self.stall_timeout = stall_timeout
        self.max_candidates = max_candidates if max_candidates is not None else 8 * k
        self.max_queries = max_queries if max_queries is not None else 16 * k
        self.state = LookupState.RUNNING
        self.queries_sent = 0
        self._target_int = int.from_bytes(target, "big")
        self._excluded = set(exclude_ids)
        self._by_id: dict[bytes, _Candidate] = {}
        self._addresses: set[Address] = set()
        self._order: list[tuple[int, bytes]] = []
        # The asked-but-unresolved candidates, so nothing below has to scan every candidate.
        self._in_flight: dict[bytes, _Candidate] = {}
        self._stalled: dict[bytes, _Candidate] = {}

    # -- inputs ----------------------------------------------------------------------------------------------------

    def add_candidates(self, contacts: Iterable[Contact], *, hop: int = 1) -> int:
        """Learn contacts (seeds from the routing table at ``hop`` 1, or an answer's contacts); returns how many
        were new."""
        added = 0
        for contact in contacts:
            if contact.node_id in self._by_id or contact.node_id in self._excluded:
                continue
            if contact.address in self._addresses:
                continue
            dist = contact.id_int ^ self._target_int
            self._by_id[contact.node_id] = _Candidate(contact, dist, hop)
            self._addresses.add(contact.address)
            bisect.insort(self._order, (dist, contact.node_id))
            added += 1
        self._trim()
        self._check_done()
        return added

    def next_queries(self, now: float) -> list[Contact]:
        """The contacts to ask now (each is marked ``IN_FLIGHT``); empty when the window is busy or done."""
        if self.state is LookupState.FINISHED:
            return []
        self.tick(now)
        chosen: list[Contact] = []
        window = 0
        for _, node_id in self._order:
            if len(self._in_flight) >= self.alpha or window >= self.k or self.queries_sent >= self.max_queries:
                break
            cand = self._by_id[node_id]
            if cand.state in (QueryState.FAILED, QueryState.STALLED):
                continue
            window += 1
            if cand.state is QueryState.NEW:
                cand.stall_at = now + self.stall_timeout
                self._move(cand, QueryState.IN_FLIGHT)
                self.queries_sent += 1
                chosen.append(cand.contact)
        self._check_done()
        return chosen

    def on_response(self, node_id: bytes, contacts: Iterable[Contact], now: float) -> None:
        """``node_id`` answered with ``contacts`` (ignored if it was not asked or already resolved)."""
        cand = self._by_id.get(node_id)
        if cand is None or cand.state not in (QueryState.IN_FLIGHT, QueryState.STALLED):
            return
        self._move(cand, QueryState.RESPONDED)
        if self.state is LookupState.RUNNING:
            self.add_candidates(contacts, hop=cand.hop + 1)
        self._check_done()

    def on_failure(self, node_id: bytes, now: float) -> None:
        """The query to ``node_id`` failed (timeout, malformed or invalid answer)."""
        cand = self._by_id.get(node_id)
        if cand is None or cand.state not in (QueryState.IN_FLIGHT, QueryState.STALLED):
            return
        self._move(cand, QueryState.FAILED)
        self._check_done()

    def tick(self, now: float) -> None:
        """Mark queries unanswered for ``stall_timeout`` as ``STALLED`` (they stop counting against alpha)."""
        for cand in [c for c in self._in_flight.values() if now >= c.stall_at]:
            self._move(cand, QueryState.STALLED)

    def finish(self) -> None:
        """Stop now (the driver found what it looked for, or gives up)."""
        self.state = LookupState.FINISHED

    # -- outputs ---------------------------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether the lookup is over."""
        return self.state is LookupState.FINISHED

    def next_deadline(self) -> float | None:
        """When the next in-flight query stalls (``None`` if nothing is in flight or the lookup is over)."""
        if self.finished:
            return None
        return min((c.stall_at for c in self._in_flight.values()), default=None)

    def state_of(self, node_id: bytes) -> QueryState | None:
        """The query state of a candidate, or ``None`` if it is not one."""
        cand = self._by_id.get(node_id)
        return None if cand is None else cand.state

    def settled(self, count: int, holders: set[bytes]) -> bool:
        """Whether the ``count`` closest candidates that have not failed all ``RESPONDED`` and one of them is in
        ``holders`` (the driver's early stop for signed lookups)."""
        members = 0
        held = False
        for _, node_id in self._order:
            state = self._by_id[node_id].state
            if state is QueryState.FAILED:
                continue
            if state is not QueryState.RESPONDED:
                return False
            held = held or node_id in holders
            members += 1
            if members >= count:
                break
        return held

    def hop_of(self, node_id: bytes) -> int:
        """How many referrals led to a candidate: 1 for a seed, ``n + 1`` for a contact first named by the answer
        of a hop-``n`` candidate (0 if it is not a candidate)."""
        cand = self._by_id.get(node_id)
        return 0 if cand is None else cand.hop

    def depth(self) -> int:
        """The largest hop among the ``k`` closest responders (0 if none answered): the number of sequential
        round trips the lookup needed to reach its result."""
        depth = 0
        for contact in self.closest_responders():
            depth = max(depth, self._by_id[contact.node_id].hop)
        return depth

    def outstanding(self) -> list[Contact]:
        """Candidates asked and not yet resolved (``IN_FLIGHT`` or ``STALLED``)."""
        return [c.contact for c in self._by_id.values() if c.state in (QueryState.IN_FLIGHT, QueryState.STALLED)]

    def responders(self) -> list[Contact]:
        """Every candidate that answered, closest first."""
        return [
            self._by_id[node_id].contact
            for _, node_id in self._order
            if self._by_id[node_id].state is QueryState.RESPONDED
        ]

    def closest_responders(self, count: int | None = None) -> list[Contact]:
        """The ``count`` (default k) closest candidates that answered, closest first."""
        return self.responders()[: self.k if count is None else count]

    def __len__(self) -> int:
        return len(self._by_id)

    # -- internals -------------------------------------------------------------------------------------------------

    def _move(self, cand: _Candidate, new: QueryState) -> None:
        node_id = cand.contact.node_id
        cand.move(new)
        self._in_flight.pop(node_id, None)
        self._stalled.pop(node_id, None)
        if new is QueryState.IN_FLIGHT:
            self._in_flight[node_id] = cand
        elif new is QueryState.STALLED:
            self._stalled[node_id] = cand

    def _trim(self) -> None:
        index = len(self._order) - 1
        while len(self._order) > self.max_candidates and index >= 0:
            _, node_id = self._order[index]
            cand = self._by_id[node_id]
            if cand.state is QueryState.NEW:
                del self._order[index]
                del self._by_id[node_id]
                self._addresses.discard(cand.contact.address)
            index -= 1

    def _check_done(self) -> None:
        if self.state is LookupState.FINISHED:
            return
        members = 0
        all_responded = True
        waiting = bool(self._in_flight or self._stalled)
        askable = False
        for _, node_id in self._order:  # the first k that have not failed (and stop as soon as the outcome is known)
            state = self._by_id[node_id].state
            if state is QueryState.FAILED:
                continue
            members += 1
            if state is not QueryState.RESPONDED:
                all_responded = False
                if state is QueryState.NEW:
                    askable = True
                if waiting or askable:
                    break  # neither converged nor exhausted
            if members >= self.k:
                break
        converged = members > 0 and all_responded
        exhausted = not waiting and (not askable or self.queries_sent >= self.max_queries)
        if converged or exhausted:
            self.state = LookupState.FINISHED

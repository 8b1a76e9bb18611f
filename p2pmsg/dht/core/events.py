"""Events emitted by :class:`p2pmsg.dht.core.engine.DhtEngine` when an operation started by the driver completes."""

from __future__ import annotations

import dataclasses

from p2pmsg.dht.core.contact import Address, Contact
from p2pmsg.dht.core.records import VerifiedRecord
from p2pmsg.identity import PeerId

__all__ = ["DhtEvent", "LookupDone", "PeerVerified", "PingDone", "StoreDone"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PingDone:
    """A ``ping`` started with ``DhtEngine.ping`` finished; ``node_id`` is ``None`` if it timed out or was invalid."""

    op: int
    address: Address
    node_id: bytes | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoreDone:
    """A ``store`` finished; ``stored`` is true only if the node answered ``true``."""

    op: int
    contact: Contact
    stored: bool


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LookupDone:
    """A lookup finished.

    ``closest`` holds the k closest nodes that answered (closest first) and ``responders`` every node that answered.
    For a plain value lookup ``value`` is the first valid plain value found (``None`` if none); for a signed lookup
    ``record`` is the verified record with the highest ``seq`` (``None`` if none).  ``rejected_values`` counts values
    that were found but failed validation (planted garbage, forged or expired records).  ``queries`` counts the
    requests the lookup sent and ``hops`` the sequential round trips it needed: the hop
    (:meth:`~p2pmsg.dht.core.lookup.Lookup.hop_of`) of the first node whose value was accepted (0 when the local
    store had it), or else the largest hop among the ``closest`` (:meth:`~p2pmsg.dht.core.lookup.Lookup.depth`).
    """

    op: int
    target: bytes
    closest: tuple[Contact, ...]
    responders: tuple[Contact, ...]
    value: object = None
    found: bool = False
    record: VerifiedRecord | None = None
    rejected_values: int = 0
    queries: int = 0
    hops: int = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PeerVerified:
    """A p2pmsg peer answered the signed challenge: ``contact``'s node id is bound to ``peer_id``."""

    contact: Contact
    peer_id: PeerId


DhtEvent = PingDone | StoreDone | LookupDone | PeerVerified

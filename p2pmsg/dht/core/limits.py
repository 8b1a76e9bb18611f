"""Per-source rate limits and the anti-amplification guard.

Theory of operation
-------------------
UDP source addresses can be forged, so a node must not let a small datagram make it send a lot of bytes to whatever
address the datagram claims to come from (the stock ``kademlia`` package answers a spoofed 50-byte ``ping`` with
about 2 KB of STOREs).  :class:`AddressGuard` keeps, for each address that has not yet *proven* itself, a byte
credit: every datagram received from it adds its size, every datagram sent to it in reaction spends it, and nothing
is sent that the credit cannot pay for.  An address is proven by a round trip -- it answered a request this node
sent to it, echoing the request's random 20-byte message id, which an off-path forger cannot know.  Proofs expire
after ``proven_ttl`` seconds; both tables are bounded LRU maps (forgetting an entry only makes the guard stricter).

:class:`~p2pmsg.ratelimit.RateLimiter` (shared with the listener) is a token bucket per source in a bounded LRU map;
the engine applies one per address and one per IP to every request, and to STOREs one per source network
(IPv4 /24, IPv6 /64) and then one per provider (IPv4 /16, IPv6 /32).  Time is passed in; nothing here reads a clock.
"""

from __future__ import annotations

from collections import OrderedDict

from p2pmsg.dht.core.contact import Address
from p2pmsg.dht.core.errors import DhtUsageError
from p2pmsg.ratelimit import RateLimiter

__all__ = ["AddressGuard", "RateLimiter"]


class AddressGuard:
    """Byte credit for unproven addresses, and the set of proven ones."""

    def __init__(self, *, proven_ttl: float = 1800.0, max_entries: int = 8192, max_credit: int = 65536) -> None:
        if proven_ttl <= 0 or max_entries < 1 or max_credit < 1:
            raise DhtUsageError("proven_ttl, max_entries and max_credit must be positive")
        self.proven_ttl = proven_ttl
        self.max_entries = max_entries
        self.max_credit = max_credit
        self._proven: OrderedDict[Address, float] = OrderedDict()
        self._credit: OrderedDict[Address, int] = OrderedDict()

    def is_proven(self, address: Address, now: float) -> bool:
        """Whether ``address`` completed a round trip within ``proven_ttl``."""
        since = self._proven.get(address)
        if since is None:
            return False
        if now - since > self.proven_ttl:
            del self._proven[address]
            return False
        return True

    def mark_proven(self, address: Address, now: float) -> None:
        """``address`` answered one of our requests: it is real."""
        self._proven[address] = now
        self._proven.move_to_end(address)
        self._credit.pop(address, None)
        while len(self._proven) > self.max_entries:
            self._proven.popitem(last=False)

    def received(self, address: Address, size: int, now: float) -> None:
        """A datagram of ``size`` bytes arrived from ``address``."""
        if self.is_proven(address, now):
            return
        credit = min(self.max_credit, self._credit.pop(address, 0) + size)
        self._credit[address] = credit
        while len(self._credit) > self.max_entries:
            self._credit.popitem(last=False)

    def budget(self, address: Address, now: float) -> int | None:
        """Bytes that may still be sent to ``address`` (``None``: unlimited, the address is proven)."""
        if self.is_proven(address, now):
            return None
        return self._credit.get(address, 0)

    def try_spend(self, address: Address, size: int, now: float) -> bool:
        """Account for sending ``size`` bytes to ``address``; ``False`` (nothing spent) if that is not allowed."""
        budget = self.budget(address, now)
        if budget is None:
            return True
        if size > budget:
            return False
        self._credit[address] = budget - size
        return True

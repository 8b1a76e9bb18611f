"""Token buckets per source, and the network a source address is accounted to.

Theory of operation
-------------------
A node lets strangers on the network make it do work: answer a DHT request, run a Noise handshake, parse WebSocket
frames.  Each such door charges the *source* of the work -- an IP address, or the network it belongs to -- against
a token bucket (:class:`RateLimiter`: ``rate`` tokens per second, at most ``burst``), so one source gets at most its
share however fast it asks.  The buckets live in a bounded LRU map: forgetting a source hands it a full bucket again,
which only matters to a source that spreads itself over more than ``max_sources`` addresses, and such a source has
that many buckets anyway.

:func:`network_of` names the network an address is accounted to.  An IPv6 host commonly owns a whole /64, so
counting IPv6 per address would give one host 2**64 buckets; the DHT also counts IPv4 per /24 and per /16 where a
whole subnet must share one budget.  Time is passed in; nothing here reads a clock.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from p2pmsg.errors import LocalProtocolError

__all__ = ["RateLimiter", "network_of", "parse_ip"]

S = TypeVar("S", bound=Hashable)


class RateLimiter(Generic[S]):
    """Token buckets keyed by source."""

    def __init__(self, *, rate: float, burst: float, max_sources: int = 4096) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1:
            raise LocalProtocolError("rate must be > 0, burst >= 1 and max_sources >= 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[S, list[float]] = OrderedDict()

    def allow(self, source: S, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``source``'s bucket; ``False`` (and nothing taken) if it has too few."""
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = [self.burst, now]
            self._buckets[source] = bucket
            while len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
            elapsed = max(0.0, now - bucket[1])
            bucket[0] = min(self.burst, bucket[0] + elapsed * self.rate)
            bucket[1] = now
        if bucket[0] < cost:
            return False
        bucket[0] -= cost
        return True

    def would_allow(self, source: S, now: float, cost: float = 1.0) -> bool:
        """Whether :meth:`allow` would take ``cost`` now (nothing is taken or stored): check several buckets with
        this before taking from any of them, so a refusal by one costs the others nothing."""
        bucket = self._buckets.get(source)
        if bucket is None:
            return self.burst >= cost
        return min(self.burst, bucket[0] + max(0.0, now - bucket[1]) * self.rate) >= cost

    def __len__(self) -> int:
        return len(self._buckets)


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``text`` names (an IPv6 zone suffix ``%eth0`` dropped, an IPv4-mapped IPv6 address as its IPv4
    address), or ``None`` if it is not an IP literal."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def network_of(source: str, v4_bits: int = 32, v6_bits: int = 64) -> str:
    """The network ``source`` is accounted to: its IPv4 ``/v4_bits`` (also for an IPv4-mapped IPv6 address) or its
    IPv6 ``/v6_bits``, as CIDR text (``"192.0.2.0/24"``, ``"2001:db8::/64"``).  Anything that is not an IP literal
    (``"local"``, ``""``) is its own network.  Cached (bounded): hot paths ask for the same sources again and again."""
    ip = parse_ip(source)
    if ip is None:
        return source
    prefix = v4_bits if isinstance(ip, ipaddress.IPv4Address) else v6_bits
    return str(ipaddress.ip_network((ip, prefix), strict=False))

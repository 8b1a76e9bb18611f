"""The shared token buckets and the network a source is accounted to."""

from __future__ import annotations

import pytest

from p2pmsg.errors import LocalProtocolError
from p2pmsg.ratelimit import RateLimiter, network_of


def test_network_of_an_ipv4_address_is_the_address_by_default_and_the_prefix_asked_for() -> None:
    assert network_of("192.0.2.77") == "192.0.2.77/32"
    assert network_of("192.0.2.77", 24, 64) == "192.0.2.0/24"
    assert network_of("::ffff:192.0.2.77") == "192.0.2.77/32"  # IPv4-mapped counts as the IPv4 address


def test_network_of_an_ipv6_address_is_its_64_so_one_host_gets_one_bucket() -> None:
    assert network_of("2001:db8:1:2:aaaa::1") == network_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert network_of("2001:db8:1:3::1") != network_of("2001:db8:1:2::1")
    assert network_of("fe80::1%eth0") == "fe80::/64"


def test_network_of_anything_else_is_its_own_network() -> None:
    assert network_of("local") == "local"
    assert network_of("") == ""


def test_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    limiter: RateLimiter[str] = RateLimiter(rate=2.0, burst=3.0)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0.0)  # another source has its own bucket
    assert limiter.allow("a", 0.5) and not limiter.allow("a", 0.5)  # one token back after 0.5 s
    assert [limiter.allow("a", 100.0) for _ in range(4)] == [True, True, True, False]  # never more than burst


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(LocalProtocolError):
        RateLimiter(rate=1.0, burst=0.5)


def test_would_allow_looks_without_taking() -> None:
    limiter: RateLimiter[str] = RateLimiter(rate=1.0, burst=2.0)
    assert limiter.would_allow("a", 0.0) and len(limiter) == 0  # nothing stored for a new source
    assert limiter.allow("a", 0.0) and limiter.allow("a", 0.0)
    assert not limiter.would_allow("a", 0.5) and limiter.would_allow("a", 1.0)
    assert limiter.allow("a", 1.0) and not limiter.allow("a", 1.0)

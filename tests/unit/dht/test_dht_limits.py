"""Token buckets and the anti-amplification byte credit."""

from __future__ import annotations

import pytest

from p2pmsg.dht.core.errors import DhtUsageError
from p2pmsg.dht.core.limits import AddressGuard, RateLimiter
from p2pmsg.errors import LocalProtocolError

A = ("192.0.2.1", 4000)
B = ("192.0.2.2", 4000)


def test_token_bucket_burst_then_rate() -> None:
    limiter: RateLimiter[str] = RateLimiter(rate=10.0, burst=5.0)
    assert [limiter.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("b", 0.0)  # other sources are independent
    assert not limiter.allow("a", 0.05)  # half a token
    assert limiter.allow("a", 0.1)
    assert [limiter.allow("a", 100.0) for _ in range(6)] == [True] * 5 + [False]  # capped at the burst


def test_rate_limiter_is_bounded() -> None:
    limiter: RateLimiter[int] = RateLimiter(rate=1.0, burst=1.0, max_sources=100)
    for i in range(1000):
        limiter.allow(i, 0.0)
    assert len(limiter) == 100


def test_guard_credit_and_proof() -> None:
    guard = AddressGuard(proven_ttl=60.0)
    assert guard.budget(A, 0.0) == 0
    assert not guard.try_spend(A, 1, 0.0)
    guard.received(A, 50, 0.0)
    assert guard.try_spend(A, 43, 0.0)
    assert guard.budget(A, 0.0) == 7
    assert not guard.try_spend(A, 8, 0.0)
    guard.received(A, 77, 0.0)
    assert guard.budget(A, 0.0) == 84
    guard.mark_proven(A, 1.0)
    assert guard.budget(A, 1.0) is None
    assert guard.try_spend(A, 10_000, 1.0)
    assert guard.is_proven(A, 61.0)
    assert not guard.is_proven(A, 61.5)  # the proof expired
    assert guard.budget(A, 61.5) == 0  # and the old credit is gone
    assert guard.budget(B, 0.0) == 0


def test_guard_is_bounded_and_caps_credit() -> None:
    guard = AddressGuard(max_entries=10, max_credit=1000)
    for i in range(100):
        guard.received(("192.0.2.9", i + 1), 10, 0.0)
        guard.mark_proven(("198.51.100.1", i + 1), 0.0)
    assert guard.budget(("192.0.2.9", 1), 0.0) == 0  # forgotten: stricter, never looser
    assert not guard.is_proven(("198.51.100.1", 1), 0.0)
    for _ in range(50):
        guard.received(A, 100, 0.0)
    assert guard.budget(A, 0.0) == 1000


def test_bad_parameters() -> None:
    with pytest.raises(LocalProtocolError):
        RateLimiter(rate=0.0, burst=1.0)
    with pytest.raises(DhtUsageError):
        AddressGuard(proven_ttl=0.0)

"""The outbound side: reach a known peer over the first of its addresses that works.

Theory of operation
-------------------
:func:`dial` knows whom it wants (``peer_id``) and a list of candidate multiaddrs.  It drops candidates that cannot
work (an unsupported shape, a ``/p2p`` component naming someone else, duplicates), then races the rest in order,
happy-eyeballs style: attempt *i+1* starts :data:`DEFAULT_STAGGER` seconds after attempt *i*, or at once when any
attempt fails.  An attempt is :func:`~p2pmsg.net.transport.open_stream` followed by
:func:`~p2pmsg.net.channel.secure_outbound`, which aborts unless the responder proves ``peer_id``.

The first attempt that authenticates wins: the others are cancelled at once (each closes its own connection, a
late finisher closes its channel) and :func:`dial` returns without waiting for any timer.  One deadline of
``timeout`` seconds covers the whole dial.  If nothing wins, :class:`DialError` lists every candidate with the
reason it failed, so the caller (and ``p2pmsg status``) can tell a dead address from an impostor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import trio

from p2pmsg.errors import LocalProtocolError, P2PMsgError
from p2pmsg.identity import Identity, PeerId
from p2pmsg.net.channel import SecureChannel, secure_outbound
from p2pmsg.net.transport import UnsupportedAddressError, open_stream, parse_transport_address
from p2pmsg.wire.multiaddr import Multiaddr, MultiaddrError

__all__ = [
    "DEFAULT_DIAL_TIMEOUT",
    "DEFAULT_STAGGER",
    "MAX_DIAL_ADDRESSES",
    "DialError",
    "DialFailure",
    "dial",
]

DEFAULT_DIAL_TIMEOUT: Final = 10.0
"""Seconds for the whole dial (every attempt, connect and handshake)."""
DEFAULT_STAGGER: Final = 0.25
"""Seconds between the starts of two attempts when neither has failed yet."""
MAX_DIAL_ADDRESSES: Final = 16
"""Candidates beyond this many are not tried (addresses come from the network, so they are bounded)."""

# Errors that mean "this address did not work"; anything else is a bug and propagates.
_ATTEMPT_ERRORS: Final = (P2PMsgError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True, slots=True, kw_only=True)
class DialFailure:
    """Why one candidate address did not give a channel."""

    addr: Multiaddr
    """The candidate as given."""
    reason: str
    """Human-readable reason, starting with the exception type name when there was one."""
    error: BaseException | None = None
    """The exception, when the attempt raised one (e.g. a PeerIdMismatchError)."""


class DialError(P2PMsgError):
    """No candidate address gave an authenticated channel to the peer; :attr:`failures` says why, per address."""

    def __init__(self, peer_id: PeerId, failures: Sequence[DialFailure]) -> None:
        self.peer_id = peer_id
        self.failures: tuple[DialFailure, ...] = tuple(failures)
        if self.failures:
            # An address that ends in the peer's own /p2p/<id> is shown without it: the message names the peer once.
            shown = [_without_own_id(f.addr, peer_id) for f in self.failures]
            detail = "; ".join(f"{addr}: {failure.reason}" for addr, failure in zip(shown, self.failures, strict=True))
        else:
            detail = "no addresses to try"
        super().__init__(f"could not reach {peer_id}: {detail}")


def _without_own_id(addr: Multiaddr, peer_id: PeerId) -> Multiaddr:
    """``addr`` without its trailing ``/p2p/<peer_id>`` (a bare ``/p2p/<peer_id>`` stays as it is)."""
    if addr.peer_id != peer_id:
        return addr
    try:
        return addr.without_peer_id()
    except MultiaddrError:
        return addr


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _candidates(peer_id: PeerId, addrs: Sequence[Multiaddr]) -> tuple[list[Multiaddr], list[DialFailure]]:
    """Split ``addrs`` into the ones worth trying (in order, deduplicated) and the ones that cannot work."""
    usable: list[Multiaddr] = []
    rejected: list[DialFailure] = []
    seen: set[str] = set()
    for index, addr in enumerate(addrs):
        if index >= MAX_DIAL_ADDRESSES:
            rejected.append(DialFailure(addr=addr, reason=f"not tried: only {MAX_DIAL_ADDRESSES} addresses are"))
            continue
        named = addr.peer_id
        if named is not None and named != peer_id:
            rejected.append(DialFailure(addr=addr, reason=f"not tried: the address names another peer ({named})"))
            continue
        try:
            parse_transport_address(addr)
        except UnsupportedAddressError as exc:
            rejected.append(DialFailure(addr=addr, reason=_describe(exc), error=exc))
            continue
        key = str(addr.without_peer_id())
        if key in seen:
            continue
        seen.add(key)
        usable.append(addr)
    return usable, rejected


async def dial(
    identity: Identity,
    peer_id: PeerId,
    addrs: Sequence[Multiaddr],
    *,
    timeout: float = DEFAULT_DIAL_TIMEOUT,
    stagger: float = DEFAULT_STAGGER,
    nursery: trio.Nursery | None = None,
) -> SecureChannel:
    """Return an authenticated :class:`SecureChannel` to ``peer_id`` over the first of ``addrs`` that works.

    ``nursery`` hosts the reader task of a WebSocket connection (needed only if ``addrs`` has ``/ws`` addresses;
    a ``/ws`` attempt without it fails with a LocalProtocolError listed in the DialError).  Raises
    :class:`DialError` listing every address and its reason when none works within ``timeout`` seconds.
    """
    if not (timeout > 0 and math.isfinite(timeout)):
        raise LocalProtocolError(f"dial: timeout must be a positive number of seconds, got {timeout}")
    if not (stagger >= 0 and math.isfinite(stagger)):
        raise LocalProtocolError(f"dial: stagger must be a non-negative number of seconds, got {stagger}")
    usable, rejected = _candidates(peer_id, addrs)
    if not usable:
        raise DialError(peer_id, rejected)

    deadline = trio.current_time() + timeout
    outcome: dict[int, DialFailure] = {}
    started: list[int] = []
    winner: SecureChannel | None = None
    wake = trio.Event()  # set when an attempt fails, so the next one starts at once
    unanswered_failures = 0  # failures that have not yet started their replacement attempt

    async def attempt(index: int, addr: Multiaddr, attempts: trio.Nursery) -> None:
        nonlocal winner, unanswered_failures
        try:
            remaining = max(deadline - trio.current_time(), 1e-3)
            # The transport ignores /p2p/<id>; without it, its errors do not name the peer a second time.
            stream = await open_stream(addr.without_peer_id(), timeout=remaining, nursery=nursery)
            remaining = max(deadline - trio.current_time(), 1e-3)
            channel = await secure_outbound(stream, identity, peer_id, timeout=remaining)
        except _ATTEMPT_ERRORS as exc:
            outcome[index] = DialFailure(addr=addr, reason=_describe(exc), error=exc)
            unanswered_failures += 1
            wake.set()
            return
        if winner is None:
            winner = channel
            attempts.cancel_scope.cancel()
        else:  # a second success in the same instant: keep the first
            await trio.aclose_forcefully(channel)

    try:
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as attempts:
                for index, addr in enumerate(usable):
                    started.append(index)
                    attempts.start_soon(attempt, index, addr, attempts)
                    if index == len(usable) - 1:
                        break
                    if unanswered_failures:  # each failure starts one new attempt at once
                        unanswered_failures -= 1
                        await trio.lowlevel.checkpoint()
                        continue
                    wake = trio.Event()
                    with trio.move_on_after(stagger):
                        await wake.wait()
                    if wake.is_set():
                        unanswered_failures -= 1
    except BaseException:
        if winner is not None:
            await trio.aclose_forcefully(winner)
        raise
    if winner is not None:
        return winner
    failures: list[DialFailure] = []
    for index, addr in enumerate(usable):
        if index in outcome:
            failures.append(outcome[index])
        elif index in started:
            failures.append(
                DialFailure(addr=addr, reason=f"timed out: no channel within the {timeout:g} s dial timeout")
            )
        else:
            failures.append(DialFailure(addr=addr, reason=f"not tried: the {timeout:g} s dial timeout passed first"))
    raise DialError(peer_id, failures + rejected)

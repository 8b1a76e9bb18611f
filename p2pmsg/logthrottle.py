"""Log lines that a remote peer can cause, bounded per kind so a flood cannot fill the disk with them.

Theory of operation
-------------------
Every input a node drops is counted (``p2pmsg status``) and, for the first few of a kind, logged with the reason.  A
peer that sends the same bad input a million times would otherwise write a million log lines (a session of forged
envelopes wrote 212 MB in 20 s).  :class:`LogThrottle` logs at most ``burst`` lines per key in each ``interval``;
when a later line of that key opens the next interval, it first says how many were left out.  A flood that stops
and never recurs would keep that count to itself, so :func:`flush_all` (which the node calls on every maintenance
round) says it for every throttle whose interval is over.  The counters are kept in full either way: the log is for
reading, the counters for totals.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections.abc import Callable

__all__ = ["LogThrottle", "flush_all", "span"]

_MAX_KEYS = 256


def span(seconds: float) -> str:
    """A duration for a log line: "50 minutes", "3.5 hours", "2.0 days"."""
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.0f} minutes"
    if minutes < 48 * 60:
        return f"{minutes / 60:.1f} hours"
    return f"{minutes / 1440:.1f} days"


@dataclasses.dataclass(slots=True)
class _Window:
    start: float
    level: int
    logged: int = 0
    left_out: int = 0


_LIVE: weakref.WeakSet[LogThrottle] = weakref.WeakSet()  # every throttle, for flush_all


def flush_all() -> None:
    """Say how many lines were left out, for every key of every live throttle whose interval is over."""
    for throttle in list(_LIVE):
        throttle.flush()


class LogThrottle:
    """At most ``burst`` log lines per key in each ``interval`` seconds (``clock``: monotonic seconds)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 10,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        _LIVE.add(self)

    def log(self, level: int, key: str, message: str, *args: object) -> None:
        """Log ``message % args`` at ``level`` unless ``burst`` lines of ``key`` were logged in this interval."""
        now = self._clock()
        if key not in self._windows and len(self._windows) >= _MAX_KEYS:
            self._expire(now)
            if len(self._windows) >= _MAX_KEYS:
                key = "(other kinds)"  # keys may come from remote input: their number stays bounded
        window = self._windows.get(key)
        if window is None or now - window.start >= self._interval:
            if window is not None:
                self._summarise(key, window)
            window = self._windows[key] = _Window(start=now, level=level)
        if window.logged < self._burst:
            window.logged += 1
            self._logger.log(level, message, *args)
        else:
            window.left_out += 1

    def flush(self) -> None:
        """Forget the keys whose interval is over, saying first how many lines of each were left out."""
        self._expire(self._clock())

    def _expire(self, now: float) -> None:
        for key, window in list(self._windows.items()):
            if now - window.start >= self._interval:
                self._summarise(key, window)
                del self._windows[key]

    def _summarise(self, key: str, window: _Window) -> None:
        if window.left_out:
            self._logger.log(
                window.level, "%d more of '%s' left out of the log in %g s", window.left_out, key, self._interval
            )

"""A guard that makes concurrent use of one direction of a stream an error, as trio's own streams do."""

from __future__ import annotations

from types import TracebackType

import trio


class ConflictGuard:
    """Raise :class:`trio.BusyResourceError` when two tasks use the same half of a stream at once.

    Use as ``with guard:`` around the body of ``send_all`` (or ``receive_some``); ``message`` says which stream.
    """

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._held = False

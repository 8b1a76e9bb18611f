"""The exception hierarchy shared by every layer.

Every error p2pmsg raises on purpose derives from :class:`P2PMsgError`.  The split that matters to callers:

* :class:`LocalProtocolError` -- *we* tried to do something the protocol forbids (a bug or misuse on this side).
* :class:`RemoteProtocolError` -- the *peer* sent something invalid.  The handler drops that input or closes that
  peer's connection, logs why, and carries on; it never takes the node down.
"""

from __future__ import annotations


class P2PMsgError(Exception):
    """Base class of every error raised deliberately by p2pmsg."""


class LocalProtocolError(P2PMsgError):
    """This side violated a protocol rule (programming error or misuse of an API)."""


class RemoteProtocolError(P2PMsgError):
    """The remote peer sent input that violates the protocol."""

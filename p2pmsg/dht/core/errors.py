"""Errors raised by the DHT core."""

from __future__ import annotations

from p2pmsg.errors import LocalProtocolError, P2PMsgError, RemoteProtocolError

__all__ = [
    "DhtError",
    "DhtUsageError",
    "MalformedMessageError",
    "RecordError",
    "StoreRefusedError",
]


class DhtError(P2PMsgError):
    """Base class of the DHT's own errors."""


class DhtUsageError(DhtError, LocalProtocolError):
    """This side misused the DHT API (a bad argument, an illegal state transition, a limit reached locally)."""


class MalformedMessageError(DhtError, RemoteProtocolError):
    """A datagram, or one field of it, does not match the wire format; the datagram is dropped."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class RecordError(DhtError, RemoteProtocolError):
    """A signed record is malformed, badly signed, bound to another key, expired or too large."""


class RecordTimeError(RecordError):
    """A signed record has expired, or stays valid for longer than a record may from now: its times disagree with
    our clock (the signer's clock or ours is wrong, unless it is really old).  Counted apart (``records_out_of_time``)
    so that a node whose own clock is off can say so.  ``signer`` (raw peer id bytes), ``seq`` and ``expires_at``
    (Unix s) are the record's."""

    def __init__(self, message: str, *, signer: bytes, seq: int, expires_at: int) -> None:
        super().__init__(message)
        self.signer = signer
        self.seq = seq
        self.expires_at = expires_at


class StoreRefusedError(DhtError, RemoteProtocolError):
    """A STORE was refused: invalid value for its namespace, stale ``seq``, or a storage limit reached."""

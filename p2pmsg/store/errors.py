"""Errors raised by the store.

Every error derives from :class:`StoreError` (itself a :class:`~p2pmsg.errors.P2PMsgError`).  Errors that mean "the
caller used the store wrongly" (a bad argument, a write function that tried to end the transaction) also derive from
:class:`~p2pmsg.errors.LocalProtocolError`.  Nothing in the store handles remote input directly: the chat layer
validates what a peer sent before it calls the store, and the store re-checks sizes and types as a second line.
"""

from __future__ import annotations

from p2pmsg.errors import LocalProtocolError, P2PMsgError

__all__ = [
    "ContactExistsError",
    "DuplicateMessageError",
    "ForeignDatabaseError",
    "MigrationError",
    "NameTakenError",
    "PeerBlockedError",
    "SchemaError",
    "SchemaTooNewError",
    "StoreArgumentError",
    "StoreClosedError",
    "StoreError",
    "StoreWriteError",
    "TransactionControlError",
    "UnknownContactError",
    "UnknownRequestError",
]


class StoreError(P2PMsgError):
    """Base class of every error raised by :mod:`p2pmsg.store`."""


class StoreClosedError(StoreError):
    """The database was closed (or failed to open); no more reads or writes are accepted."""


class SchemaError(StoreError):
    """The database file cannot be used with this version of p2pmsg."""


class SchemaTooNewError(SchemaError):
    """The database was written by a newer p2pmsg (its schema version is above the newest this code knows)."""

    def __init__(self, *, found: int, supported: int) -> None:
        super().__init__(
            f"database schema version {found} is newer than the newest this p2pmsg supports ({supported}); "
            "upgrade p2pmsg to open it (the file was left untouched)"
        )
        self.found = found
        self.supported = supported


class ForeignDatabaseError(SchemaError):
    """The file is an SQLite database that does not belong to p2pmsg (wrong application_id or unknown tables)."""


class MigrationError(SchemaError):
    """A migration step failed; its transaction was rolled back and the schema version is unchanged."""


class StoreWriteError(StoreError):
    """SQLite could not commit a write transaction (disk full, I/O error, database locked by another process).

    Nothing of the failed transaction was written.  The message names the SQLite error.
    """


class StoreReadError(StoreError):
    """SQLite could not read the database because of the machine (a damaged file, an I/O error).  The message names
    the SQLite error."""


class TransactionControlError(StoreError, LocalProtocolError):
    """A function passed to ``Database.write``/``Database.read`` tried to begin, commit or roll back the surrounding
    transaction, release the store's savepoint, attach a database or change a pragma.  The store owns the transaction;
    the function's own changes were rolled back."""


class StoreArgumentError(StoreError, LocalProtocolError):
    """A repository function got an argument of the wrong type, size or range; the message names the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class DuplicateMessageError(StoreError, LocalProtocolError):
    """``enqueue`` was given a message id that is already stored (ids must be fresh random values)."""


class ContactExistsError(StoreError):
    """The peer is already a contact (the message names it and says whether it is blocked)."""


class NameTakenError(StoreError):
    """Another contact already has this name (names are unique, compared case-insensitively for ASCII)."""


class UnknownContactError(StoreError):
    """No contact with this peer id or name."""


class UnknownRequestError(StoreError):
    """No pending message request from this peer."""


class PeerBlockedError(StoreError):
    """The peer is blocked: its request cannot be accepted (unblock it first)."""

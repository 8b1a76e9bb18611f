"""SQLite storage: schema migrations, one writer thread driven from trio, and typed repository functions.

``async with open_database(path) as db:`` gives a :class:`Database`; ``await db.write(fn)`` / ``await db.read(fn)``
run ``fn(conn)`` in a transaction; :mod:`p2pmsg.store.repo` holds the functions to pass (``repo.enqueue``,
``repo.history``, ...).  See ``docs/protocol.md (section 8)`` for the schema.
"""

from p2pmsg.store import repo
from p2pmsg.store.db import Database, StoreStats, open_database
from p2pmsg.store.errors import (
    ContactExistsError,
    DuplicateMessageError,
    ForeignDatabaseError,
    MigrationError,
    NameTakenError,
    SchemaError,
    SchemaTooNewError,
    StoreArgumentError,
    StoreClosedError,
    StoreError,
    StoreReadError,
    StoreWriteError,
    TransactionControlError,
    UnknownContactError,
    UnknownRequestError,
)
from p2pmsg.store.migrations import LATEST_VERSION
from p2pmsg.store.models import (
    Backoff,
    CachedPeerRecord,
    Contact,
    ContactState,
    DhtNode,
    Direction,
    HistoryCursor,
    IncomingMessage,
    MessageRequest,
    MessageStatus,
    OutboxEntry,
    OutgoingMessage,
    StoredMessage,
)

__all__ = [
    "LATEST_VERSION",
    "Backoff",
    "CachedPeerRecord",
    "Contact",
    "ContactExistsError",
    "ContactState",
    "Database",
    "DhtNode",
    "Direction",
    "DuplicateMessageError",
    "ForeignDatabaseError",
    "HistoryCursor",
    "IncomingMessage",
    "MessageRequest",
    "MessageStatus",
    "MigrationError",
    "NameTakenError",
    "OutboxEntry",
    "OutgoingMessage",
    "SchemaError",
    "SchemaTooNewError",
    "StoreArgumentError",
    "StoreClosedError",
    "StoreError",
    "StoreReadError",
    "StoreStats",
    "StoreWriteError",
    "StoredMessage",
    "TransactionControlError",
    "UnknownContactError",
    "UnknownRequestError",
    "open_database",
    "repo",
]

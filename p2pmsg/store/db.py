"""The database handle: one writer thread with group commit, and a small pool of read-only connections.

Theory of operation
-------------------
``async with open_database(path) as db:`` opens (creating it, mode 0600, with 16 KiB pages) an SQLite file in WAL
mode, checks and migrates its schema (:mod:`p2pmsg.store.migrations`), then serves two calls:

``await db.write(fn)``
    runs ``fn(conn)`` on the **writer thread**, a real ``threading.Thread`` that owns the only read-write connection
    for its whole life, inside a transaction, and returns ``fn``'s result once that transaction is **committed and
    synced** (``synchronous=FULL``).  Requests wait in a FIFO queue.  When the thread becomes free it takes every
    waiting request (up to ``max_batch``) and runs them in **one** transaction, each inside its own ``SAVEPOINT``: a
    function that raises is rolled back to its savepoint and gets its exception, the others commit together
    ("group commit": one WAL sync for the whole batch, which is what makes thousands of acknowledged writes per second
    possible).  An idle store commits a lone request at once; nothing waits for a batch to fill.

``await db.read(fn)``
    runs ``fn(conn)`` on one of ``readers`` read-only connections (``mode=ro``, ``query_only``) in a worker thread,
    inside a read transaction, so ``fn`` sees one consistent snapshot that includes every write whose ``await
    db.write`` has returned.  Reads never wait for the writer (WAL).  A cancelled read still waits for ``fn`` to
    return (reads are short: every listing function takes a bounded ``limit``).

Why a dedicated thread rather than ``trio.to_thread.run_sync`` with a ``CapacityLimiter(1)``: the limiter would
serialise the writes but every write would be its own transaction and its own sync, and the connection would hop
between pool threads.  A dedicated thread sees the whole queue, so it can batch concurrent writers into one commit,
and the connection stays on the thread that created it.  The trio side waits with
``trio.lowlevel.wait_task_rescheduled``; the thread wakes the waiting tasks with one ``run_sync_soon`` per batch.

Cancellation: a write that is cancelled while it still waits in the queue is withdrawn (``fn`` never runs, nothing
is written) and raises ``Cancelled``.  Once the thread has started ``fn`` the write is not abandoned: the await
returns only when the transaction has committed or rolled back, and returns the result normally (trio then delivers
the cancellation at the caller's next checkpoint).  So ``Cancelled`` out of ``write`` means "not written", a return
means "committed", and there is never a half transaction.

The store owns the transaction.  An authorizer on the writer connection refuses, while a caller's ``fn`` runs,
``BEGIN``/``COMMIT``/``ROLLBACK``, touching the store's savepoint, ``ATTACH``/``DETACH`` and pragmas that change
settings; the attempt raises :class:`TransactionControlError` and ``fn``'s changes are rolled back.  If SQLite itself
aborts the transaction (disk full, I/O error) every write of the batch that had not committed gets
:class:`StoreWriteError`.  ``fn`` runs on another thread: it must not touch trio, and must return plain values
(not cursors).

Durability: ``synchronous=FULL`` on the writer connection, so a write acknowledged to the user survives ``kill -9``
and power loss (WAL sync on every commit).  A batch made only of ``write(fn, durable=False)`` requests is committed
with ``synchronous=NORMAL`` (no sync; it survives ``kill -9`` but maybe not a power cut); WAL commits are ordered, so
the next synced commit makes it durable too.  It is set for the whole database rather than per table because SQLite's
sync level is a property of the connection and there is exactly one writer connection; group commit makes the cost
one sync per batch.  ``fullfsync`` is on for macOS, where plain ``fsync`` does not flush the drive cache.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import math
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import outcome
import trio

from p2pmsg.store.errors import (
    StoreArgumentError,
    StoreClosedError,
    StoreError,
    StoreReadError,
    StoreWriteError,
    TransactionControlError,
)
from p2pmsg.store.migrations import MIGRATIONS, Migration, check_database, migrate, unreadable_database

__all__ = [
    "DATABASE_FILENAME",
    "FAILING_WINDOW",
    "MIN_SQLITE_VERSION",
    "NEW_FILE_PAGE_SIZE",
    "Database",
    "StoreStats",
    "configure_writer",
    "open_database",
]

T = TypeVar("T")

MIN_SQLITE_VERSION: Final = (3, 24, 0)
"""Oldest SQLite library supported (``INSERT ... ON CONFLICT DO NOTHING`` appeared in 3.24)."""

_TAG: Final = " /* p2pmsg.store */"
_INTERRUPT_RETRY: Final = 0.01
"""Seconds between interrupts of a ``quick_check`` while the database closes (:meth:`Database._interrupt_check`)."""
_BEGIN_WRITE: Final = "BEGIN IMMEDIATE" + _TAG
_BEGIN_READ: Final = "BEGIN DEFERRED" + _TAG
_COMMIT: Final = "COMMIT" + _TAG
_ROLLBACK: Final = "ROLLBACK" + _TAG
_SAVEPOINT_NAME: Final = "p2pmsg_store_request"
_SAVEPOINT: Final = f"SAVEPOINT {_SAVEPOINT_NAME}" + _TAG
_RELEASE: Final = f"RELEASE {_SAVEPOINT_NAME}" + _TAG
_ROLLBACK_TO: Final = f"ROLLBACK TO {_SAVEPOINT_NAME}" + _TAG
_SYNC_FULL: Final = "PRAGMA synchronous = FULL" + _TAG
_SYNC_NORMAL: Final = "PRAGMA synchronous = NORMAL" + _TAG
_TRUNCATE_WAL: Final = "PRAGMA wal_checkpoint(TRUNCATE)" + _TAG
_BUSY_TIMEOUT_MS: Final = 5000
_BUSY_WAIT: Final = f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}" + _TAG
_NO_BUSY_WAIT: Final = "PRAGMA busy_timeout = 0" + _TAG
FAILING_WINDOW: Final = 600.0
"""Seconds after a failed write transaction during which the store counts as failing: writes that add nothing (a
session's bookkeeping) may commit while every one that stores messages fails for want of room, so one commit does not
end it, and senders retry at most 2 min apart.  Failures less than this apart belong to one spell
(:attr:`StoreStats.failing_since`)."""

# Pragmas a write function may run with an argument: they only read the schema.
_READ_ONLY_PRAGMAS: Final = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "foreign_key_check",
        "integrity_check",
        "quick_check",
    }
)

_WRITER_PRAGMAS: Final = (
    "PRAGMA synchronous = FULL",
    "PRAGMA fullfsync = ON",
    "PRAGMA checkpoint_fullfsync = ON",
    "PRAGMA foreign_keys = ON",
    "PRAGMA trusted_schema = OFF",
    "PRAGMA temp_store = MEMORY",
    "PRAGMA cache_size = -16384",
    "PRAGMA journal_size_limit = 67108864",
)
DATABASE_FILENAME: Final = "p2pmsg.db"
"""The database's file name in a node's home directory (``p2pmsg init`` creates it, ``p2pmsg run`` opens it)."""

NEW_FILE_PAGE_SIZE: Final = 16384
"""``PRAGMA page_size`` given to a new database file (an existing file keeps the page size it was created with).

A 1 KiB message row fills a quarter of a 4 KiB page; 16 KiB pages hold more rows per page, so a transaction of many
messages writes fewer pages (and fewer WAL frame headers)."""

_WAL_CHECKPOINT_BYTES: Final = 32 * 1024 * 1024
"""``wal_autocheckpoint`` is set to this many bytes' worth of pages (8192 pages of 4 KiB, 2048 of 16 KiB)."""

_READER_PRAGMAS: Final = (
    "PRAGMA query_only = ON",
    "PRAGMA trusted_schema = OFF",
    "PRAGMA temp_store = MEMORY",
    "PRAGMA cache_size = -8192",
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoreStats:
    """Counters of the writer thread (for ``p2pmsg status`` and benchmarks)."""

    transactions: int
    """Write transactions committed."""
    writes: int
    """Write functions committed."""
    largest_batch: int
    """Most write functions committed in one transaction."""
    failed_commits: int
    """Transactions SQLite could not commit (each failed every write of its batch)."""
    unsynced_commits: int = 0
    """Transactions committed without a sync because every write in them was ``durable=False``."""
    failing: bool = False
    """Whether a write transaction failed within the last :data:`FAILING_WINDOW` seconds (monotonic clock)."""
    failing_since: float | None = None
    """Wall-clock time (``time.time()``) of the first failed transaction of the latest spell of failures (a full
    disk, an I/O error, the file deleted; failures less than :data:`FAILING_WINDOW` apart), if any."""
    last_failure_at: float | None = None
    """Wall-clock time of the latest failed transaction, if any."""
    last_error: str | None = None
    """Why the latest failed transaction failed."""


class _RequestState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    CANCELLED = "cancelled"


class _Request:
    """One call waiting for the writer thread.  ``raw`` requests run outside any transaction (open, close)."""

    __slots__ = ("durable", "fn", "raw", "state", "task")

    def __init__(self, fn: Callable[..., Any], task: trio.lowlevel.Task, *, raw: bool, durable: bool = True) -> None:
        self.fn = fn
        self.task = task
        self.raw = raw
        self.durable = durable
        self.state = _RequestState.PENDING


_Completion = tuple[trio.lowlevel.Task, outcome.Outcome[Any]]


def _wake_all(completions: list[_Completion]) -> None:
    for task, result in completions:
        trio.lowlevel.reschedule(task, result)


_ENVIRONMENT_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    }
)
"""SQLite primary result codes that come from the machine (disk full, I/O error, a damaged file, a lock held
elsewhere), not from what the write function asked for."""


_READ_ENVIRONMENT_CODES: Final = _ENVIRONMENT_CODES - {sqlite3.SQLITE_READONLY}
"""Those of a read: on a read-only connection SQLITE_READONLY is the read function's own doing (it tried to write)."""


def _is_environment_error(error: sqlite3.Error, codes: frozenset[int] = _ENVIRONMENT_CODES) -> bool:
    """Whether SQLite's primary result code of ``error`` is one of ``codes``."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in codes


def _environment_failure(result: outcome.Error) -> outcome.Error:
    """A write function that failed because of the machine (:data:`_ENVIRONMENT_CODES`, e.g. disk full in the middle
    of an insert) fails with :class:`StoreWriteError`, as a failed commit does; any other error is kept as it is."""
    error = result.error
    if isinstance(error, sqlite3.Error) and _is_environment_error(error):
        wrapped = StoreWriteError(f"the write failed: {error}")
        wrapped.__cause__ = error
        return outcome.Error(wrapped)
    return result


def _file_uri(path: Path, mode: str) -> str:
    return f"{path.absolute().as_uri()}?mode={mode}"


def configure_writer(conn: sqlite3.Connection, path: Path | str) -> None:
    """Set up the writer's connection to the database file at ``path``: :data:`NEW_FILE_PAGE_SIZE` if the file has
    no page yet, WAL mode (:class:`StoreError` if SQLite refuses it), the writer's pragmas (``synchronous=FULL``,
    cache, ...) and the checkpoint size.  What the writer thread does on opening, before it migrates."""
    if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
        # Only a file without any page yet can take a page size; switching to WAL writes the first page.
        conn.execute(f"PRAGMA page_size = {NEW_FILE_PAGE_SIZE}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"{path}: SQLite refused WAL mode (journal_mode is {mode}); use a local disk")
    for pragma in _WRITER_PRAGMAS:
        conn.execute(pragma)
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.execute(f"PRAGMA wal_autocheckpoint = {max(1, _WAL_CHECKPOINT_BYTES // page_size)}")
    conn.execute(_BUSY_WAIT)


class _Writer:
    """The writer thread and the one read-write connection it owns."""

    def __init__(self, path: Path, *, max_batch: int, migrations: tuple[Migration, ...]) -> None:
        self.path = path
        self.max_batch = max_batch
        self.migrations = migrations
        self.token = trio.lowlevel.current_trio_token()
        self.cv = threading.Condition(threading.Lock())
        self.queue: collections.deque[_Request] = collections.deque()
        self.conn: sqlite3.Connection | None = None
        self.stopped = False  # set by the thread when it exits; protected by cv
        self.version = 0
        # Authorizer state; only touched on the writer thread.
        self.internal = True
        self.violation: str | None = None
        # Statistics; written by the writer thread only.
        self.transactions = 0
        self.writes = 0
        self.largest_batch = 0
        self.failed_commits = 0
        self.unsynced_commits = 0
        self.synchronous_full = True  # the connection's current PRAGMA synchronous; writer thread only
        self.failing_since: float | None = None  # time.time(), for display
        self.last_failure_at: float | None = None  # time.time(), for display
        self.last_failure_mono = -math.inf  # time.monotonic(): what the window is measured with
        self.last_error: str | None = None
        self.keep_wal_small = False  # set from the trio side (a plain flag): space is short, see give_wal_space_back
        self.file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened; writer thread only
        self.thread = threading.Thread(target=self._main, name=f"p2pmsg-store-writer:{path.name}", daemon=True)

    # ----------------------------------------------------------------------------------------------- trio side

    async def submit(self, fn: Callable[..., T], *, raw: bool = False, durable: bool = True) -> T:
        request = _Request(fn, trio.lowlevel.current_task(), raw=raw, durable=durable)
        with self.cv:
            if self.stopped:
                raise StoreClosedError("the database is closed")
            self.queue.append(request)
            self.cv.notify()

        def abort(_: Callable[[], object]) -> trio.lowlevel.Abort:
            with self.cv:
                if request.state is _RequestState.PENDING:
                    request.state = _RequestState.CANCELLED
                    return trio.lowlevel.Abort.SUCCEEDED
            # Already running: the transaction finishes (commit or rollback) and the result is delivered.
            return trio.lowlevel.Abort.FAILED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    # ----------------------------------------------------------------------------------------------- thread side

    def _take(self) -> list[_Request]:
        """Block until requests are queued; return one raw request or up to ``max_batch`` transactional ones."""
        with self.cv:
            while True:
                while self.queue and self.queue[0].state is _RequestState.CANCELLED:
                    self.queue.popleft()
                if self.queue:
                    break
                self.cv.wait()
            batch: list[_Request] = []
            while self.queue and len(batch) < self.max_batch:
                request = self.queue[0]
                if request.state is _RequestState.CANCELLED:
                    self.queue.popleft()
                    continue
                if request.raw and batch:
                    break
                self.queue.popleft()
                request.state = _RequestState.RUNNING
                batch.append(request)
                if request.raw:
                    break
            return batch

    def _deliver(self, completions: list[_Completion]) -> None:
        if completions:
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(_wake_all, completions)

    def _main(self) -> None:
        batch: list[_Request] = []
        try:
            while True:
                batch = self._take()
                if batch[0].raw:
                    request = batch[0]
                    result = outcome.capture(request.fn, self.conn)
                    stop = self.conn is None  # the close request (or a failed open) leaves no connection
                    if stop:
                        with self.cv:
                            self.stopped = True
                            leftover = [r for r in self.queue if r.state is _RequestState.PENDING]
                            self.queue.clear()
                        closed = outcome.Error(StoreClosedError("the database is closed"))
                        self._deliver([(request.task, result), *((r.task, closed) for r in leftover)])
                        return
                    completions = [(request.task, result)]
                else:
                    completions = self._run_batch(batch)
                batch = []  # from here on these requests are answered, even if delivering fails
                self._deliver(completions)
                if self.conn is not None and (self.keep_wal_small or self.failing_recently()):
                    self.give_wal_space_back()
        except BaseException as exc:  # pragma: no cover - a bug in this module; fail everyone rather than hang
            with self.cv:
                self.stopped = True
                leftover = [*batch, *(r for r in self.queue if r.state is _RequestState.PENDING)]
                self.queue.clear()
            error = outcome.Error(StoreError(f"the store's writer thread died: {exc!r}"))
            self._deliver([(r.task, error) for r in leftover])
            raise

    def _authorize(self, action: int, arg1: str | None, arg2: str | None, _db: str | None, _src: str | None) -> int:
        if self.internal:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_TRANSACTION:
            self.violation = f"run {arg1} (the store owns the transaction)"
        elif action == sqlite3.SQLITE_SAVEPOINT and arg2 is not None and arg2.lower() == _SAVEPOINT_NAME:
            self.violation = f"{arg1} the store's savepoint"
        elif action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            self.violation = "attach or detach a database"
        elif action == sqlite3.SQLITE_PRAGMA and arg2 is not None and (arg1 or "").lower() not in _READ_ONLY_PRAGMAS:
            self.violation = f"change PRAGMA {arg1}"
        else:
            return sqlite3.SQLITE_OK
        return sqlite3.SQLITE_DENY

    def _exec(self, sql: str) -> None:
        assert self.conn is not None
        self.conn.execute(sql)

    def _run_batch(self, batch: list[_Request]) -> list[_Completion]:
        conn = self.conn
        if conn is None:  # pragma: no cover - writes are refused before open and after close
            error = outcome.Error(StoreClosedError("the database is closed"))
            return [(r.task, error) for r in batch]
        completions: list[_Completion] = []
        uncommitted: list[_Completion] = []  # ran successfully inside the open transaction
        use_savepoints = len(batch) > 1
        durable = any(r.durable for r in batch)
        if durable != self.synchronous_full:
            # Between transactions only.  WAL commits stay ordered: the next synced commit also syncs these frames.
            try:
                self._exec(_SYNC_FULL if durable else _SYNC_NORMAL)
            except sqlite3.Error as exc:
                if durable:  # never commit a durable write unsynced
                    error = outcome.Error(StoreWriteError(f"cannot switch to synchronous=FULL: {exc}"))
                    return [(r.task, error) for r in batch]
            else:
                self.synchronous_full = durable
        in_txn = False
        for request in batch:
            if not in_txn:
                try:
                    self._exec(_BEGIN_WRITE)
                except sqlite3.Error as exc:
                    completions.append((request.task, outcome.Error(StoreWriteError(f"cannot begin a write: {exc}"))))
                    continue
                in_txn = True
            try:
                if use_savepoints:
                    self._exec(_SAVEPOINT)
                self.violation = None
                self.internal = False
                try:
                    result = outcome.capture(request.fn, conn)
                finally:
                    self.internal = True
                if isinstance(result, outcome.Error):
                    result = _environment_failure(result)
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (SQLITE_FULL, SQLITE_IOERR, ...): everything of this
                    # batch that had not committed is lost, so none of it may be reported as written.
                    cause = result.error if isinstance(result, outcome.Error) else None
                    lost = StoreWriteError(f"SQLite rolled back the write transaction: {cause or 'unknown cause'}")
                    completions.extend((task, outcome.Error(lost)) for task, _ in uncommitted)
                    uncommitted.clear()
                    completions.append((request.task, outcome.Error(lost) if cause is None else result))
                    self._failed(lost if cause is None else cause)
                    in_txn = False
                    continue
                if isinstance(result, outcome.Error):
                    if self.violation is not None:
                        violation = TransactionControlError(f"a write function tried to {self.violation}")
                        violation.__cause__ = result.error
                        result = outcome.Error(violation)
                    if use_savepoints:
                        self._exec(_ROLLBACK_TO)
                        self._exec(_RELEASE)
                    else:
                        self._exec(_ROLLBACK)
                        in_txn = False
                    completions.append((request.task, result))
                else:
                    if use_savepoints:
                        self._exec(_RELEASE)
                    uncommitted.append((request.task, result))
            except sqlite3.Error as exc:  # one of our own statements failed: abandon the transaction
                lost = StoreWriteError(f"write transaction failed: {exc}")
                completions.extend((task, outcome.Error(lost)) for task, _ in uncommitted)
                uncommitted.clear()
                completions.append((request.task, outcome.Error(lost)))
                self._rollback_quietly()
                self._failed(lost)
                in_txn = False
        if in_txn:
            try:
                if not self._same_file():
                    raise sqlite3.OperationalError(
                        f"the database file {self.path} was deleted or replaced while the node runs: what it "
                        "would store now would be lost when it stops (stop it, and restore the file if you can)"
                    )
                self._exec(_COMMIT)
            except sqlite3.Error as exc:
                lost = StoreWriteError(f"cannot commit the write transaction: {exc}")
                completions.extend((task, outcome.Error(lost)) for task, _ in uncommitted)
                self._rollback_quietly()
                self._failed(lost)
            else:
                if uncommitted:
                    self.transactions += 1
                    if not self.synchronous_full:
                        self.unsynced_commits += 1
                    self.writes += len(uncommitted)
                    self.largest_batch = max(self.largest_batch, len(uncommitted))
                completions.extend(uncommitted)
        return completions

    def _failed(self, error: BaseException) -> None:
        """Count a transaction that did not commit (every write of its batch failed) and remember when and why."""
        self.failed_commits += 1
        self.last_error = str(error)
        now, wall = time.monotonic(), time.time()
        if now - self.last_failure_mono > FAILING_WINDOW:
            self.failing_since = wall
        self.last_failure_mono = now
        self.last_failure_at = wall

    def failing_recently(self) -> bool:
        """Whether a write transaction failed within the last :data:`FAILING_WINDOW` seconds."""
        return time.monotonic() - self.last_failure_mono <= FAILING_WINDOW

    def _same_file(self) -> bool:
        """Whether the database's path still names the file the connection has open: committing into a file that
        was deleted (or replaced by another) while the node runs would acknowledge writes that vanish with it."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return self.file_id is None or (st.st_dev, st.st_ino) == self.file_id

    def give_wal_space_back(self) -> None:
        """Checkpoint the WAL into the database and truncate it to zero bytes: after every transaction while the disk
        is short of space (:meth:`Database.keep_wal_small`) or writes fail.  The WAL otherwise grows to about 32 MiB
        before a checkpoint, and with 16 KiB pages one message alone writes about 100 KiB of frames, so on a nearly
        full disk the room left would go to copies of pages rather than to messages (measured on a 4 MiB file
        system: 41 one-at-a-time messages fit without this, 400 and more with it).  Best effort: a reader holding an
        older snapshot, or no room to grow the database file, leaves the WAL as it is."""
        assert self.conn is not None
        with contextlib.suppress(sqlite3.Error):
            # Without the busy handler: the checkpoint must not wait (up to busy_timeout, 5 s) for readers.
            self.conn.execute(_NO_BUSY_WAIT)
            try:
                self.conn.execute(_TRUNCATE_WAL).fetchall()
            finally:
                self.conn.execute(_BUSY_WAIT)

    def _rollback_quietly(self) -> None:
        assert self.conn is not None
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._exec(_ROLLBACK)

    # ----------------------------------------------------------------------------------------------- raw requests

    def open(self, _: sqlite3.Connection | None) -> int:
        """Create/open the file, check it, switch to WAL, migrate.  Runs on the writer thread."""
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise StoreError(
                f"SQLite {sqlite3.sqlite_version} is too old; p2pmsg needs "
                f"{'.'.join(map(str, MIN_SQLITE_VERSION))} or newer"
            )
        # Create the file ourselves so that it (and the -wal/-shm files SQLite derives from it) is private.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        conn = sqlite3.connect(
            _file_uri(self.path, "rw"), uri=True, isolation_level=None, check_same_thread=True, cached_statements=256
        )
        try:
            check_database(conn, self.migrations, f"{self.path}: ")  # refuse foreign/newer files before writing
            configure_writer(conn, self.path)
            self.version = migrate(conn, self.migrations)
            conn.set_authorizer(self._authorize)
            st = os.stat(self.path)
            self.file_id = (st.st_dev, st.st_ino)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise unreadable_database(exc, f"{self.path}: ") from exc
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        return self.version

    def close(self, _: sqlite3.Connection | None) -> None:
        """Close the connection (SQLite checkpoints and removes the WAL when it is the last one)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA optimize")
            conn.close()


class Database:
    """An open p2pmsg database.  Create it with :func:`open_database`; see the module docstring for the model."""

    def __init__(self, path: Path, *, readers: int, max_batch: int, migrations: tuple[Migration, ...]) -> None:
        self.path = path
        self._writer = _Writer(path, max_batch=max_batch, migrations=migrations)
        self._reader_count = readers
        self._readers: list[sqlite3.Connection] = []
        self._read_limiter = trio.CapacityLimiter(readers)
        self._closed = False
        self._close_done = trio.Event()
        self._checking: set[sqlite3.Connection] = set()  # the readers running quick_check

    @property
    def schema_version(self) -> int:
        """The schema version of the open database (:data:`~p2pmsg.store.migrations.LATEST_VERSION`)."""
        return self._writer.version

    @property
    def stats(self) -> StoreStats:
        """A snapshot of the writer's counters."""
        w = self._writer
        return StoreStats(
            transactions=w.transactions,
            writes=w.writes,
            largest_batch=w.largest_batch,
            failed_commits=w.failed_commits,
            unsynced_commits=w.unsynced_commits,
            failing=w.failing_recently(),
            failing_since=w.failing_since,
            last_failure_at=w.last_failure_at,
            last_error=w.last_error,
        )

    @property
    def short_of_space(self) -> bool:
        """Whether the node said its disk is short of space (:meth:`keep_wal_small`) or a write failed within the
        last :data:`FAILING_WINDOW` seconds: callers then write in smaller transactions, which fit where a large one
        fails as a whole."""
        return self._writer.keep_wal_small or self._writer.failing_recently()

    def keep_wal_small(self, on: bool) -> None:
        """While ``on`` (the node sees its disk short of space), the writer truncates the WAL after every transaction
        instead of letting it grow to about 32 MiB before a checkpoint; it does so for :data:`FAILING_WINDOW` after a
        failed transaction too, whatever this says."""
        self._writer.keep_wal_small = on

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` has been called."""
        return self._closed

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run ``fn(conn)`` on the writer thread inside a transaction; return its result once committed and synced.

        With ``durable=False`` the result may come back once committed but **not synced** (``synchronous=NORMAL``,
        only if every write of its batch is non-durable): it survives the process being killed (``kill -9``), not a
        power cut or an OS crash, which may lose the latest such commits (never a synced one, nor half of one).  For
        writes whose loss is harmless, e.g. a delivery mark whose loss only causes a resend the receiver ignores.

        If ``fn`` raises, its changes are rolled back and the exception propagates.  Raises
        :class:`StoreWriteError` if SQLite could not commit, :class:`TransactionControlError` if ``fn`` tried to
        control the transaction, :class:`StoreClosedError` after :meth:`aclose`.  Cancellation never leaves a half
        transaction (see the module docstring).
        """
        if self._closed:
            raise StoreClosedError("the database is closed")
        return await self._writer.submit(fn, durable=durable)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on a read-only connection in a worker thread, inside one read transaction.

        The snapshot includes every write whose ``await write`` returned before this call.  Raises
        :class:`StoreClosedError` after :meth:`aclose`, and :class:`StoreReadError` for an SQLite error that comes
        from the machine (:data:`_READ_ENVIRONMENT_CODES`: a damaged file, an I/O error); other errors of ``fn`` are
        its own.
        """
        if self._closed:
            raise StoreClosedError("the database is closed")
        async with self._read_limiter:
            if self._closed:
                raise StoreClosedError("the database is closed")
            conn = self._readers.pop()
            try:
                return await trio.to_thread.run_sync(_run_read, conn, fn)
            except sqlite3.Error as exc:
                if _is_environment_error(exc, _READ_ENVIRONMENT_CODES):
                    raise StoreReadError(f"the database could not be read: {exc}") from exc
                raise
            finally:
                self._readers.append(conn)

    async def quick_check(self, *, max_problems: int = 20) -> list[str]:
        """SQLite's ``PRAGMA quick_check`` of the whole file on a read connection (writes go on meanwhile): the
        problems found (at most ``max_problems``), or ``[]`` if the file is sound.  A file too damaged to be checked
        gives SQLite's error as the one problem.  It reads every page: seconds for a large file on a slow disk."""

        def check(conn: sqlite3.Connection) -> list[str]:
            # aclose() interrupts the check (it waits for reads in flight, and this one can take long): it sets
            # _closed, then interrupts _checking; here _checking is set before _closed is looked at.
            self._checking.add(conn)
            try:
                if self._closed:
                    raise StoreClosedError("the database was closed")
                rows = conn.execute(f"PRAGMA quick_check({int(max_problems)})").fetchall()
            except sqlite3.DatabaseError as exc:
                if self._closed:
                    raise StoreClosedError("the database was closed during the check") from None
                return [str(exc)]
            finally:
                self._checking.discard(conn)
            problems = [str(row[0]) for row in rows]
            return [] if problems == ["ok"] else problems

        return await self.read(check)

    async def _open(self) -> None:
        self._writer.thread.start()
        await self._writer.submit(self._writer.open, raw=True)
        uri = _file_uri(self.path, "ro")
        for _ in range(self._reader_count):
            self._readers.append(await trio.to_thread.run_sync(_open_reader, uri))

    async def aclose(self) -> None:
        """Finish queued writes, wait for reads in flight, close every connection and stop the writer thread.

        Idempotent; shielded from cancellation (it waits only for work already started).
        """
        if self._closed:
            await self._close_done.wait()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._interrupt_check)
                    borrowers = [object() for _ in range(self._reader_count)]
                    for borrower in borrowers:
                        await self._read_limiter.acquire_on_behalf_of(borrower)
                    nursery.cancel_scope.cancel()
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
                if self._writer.thread.is_alive():
                    with contextlib.suppress(StoreClosedError):
                        await self._writer.submit(self._writer.close, raw=True)
                    await trio.to_thread.run_sync(self._writer.thread.join)
            finally:
                self._close_done.set()

    async def _interrupt_check(self) -> None:
        """Interrupt a ``quick_check`` in flight (:meth:`aclose`), again every :data:`_INTERRUPT_RETRY` seconds until it
        ends: SQLite ignores an interrupt that comes before the statement started, and the check may be between its
        look at ``_closed`` and its first step (a test saw 2 closes in 3 wait for the whole check)."""
        while self._checking:
            for conn in list(self._checking):
                conn.interrupt()  # thread-safe by SQLite's design
            await trio.sleep(_INTERRUPT_RETRY)


def _open_reader(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, cached_statements=128)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        for pragma in _READER_PRAGMAS:
            conn.execute(pragma)
    except BaseException:
        conn.close()
        raise
    return conn


def _run_read(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute(_BEGIN_READ)
    try:
        return fn(conn)
    finally:
        if conn.in_transaction:
            conn.execute(_ROLLBACK)


@contextlib.asynccontextmanager
async def open_database(
    path: str | os.PathLike[str],
    *,
    readers: int = 2,
    max_batch: int = 1000,
    migrations: tuple[Migration, ...] = MIGRATIONS,
) -> AsyncIterator[Database]:
    """Open (create, check, migrate) the p2pmsg database at *path* and close it when the block exits.

    *path* is a file on a local disk (WAL needs shared memory); its directory must exist.  *readers* read-only
    connections serve :meth:`Database.read`; *max_batch* bounds how many writes share one transaction.  *migrations*
    is for tests of the migration machinery; the default is the real schema.

    Raises :class:`~p2pmsg.store.errors.SchemaTooNewError` (file written by a newer p2pmsg; left untouched),
    :class:`~p2pmsg.store.errors.ForeignDatabaseError` (not a p2pmsg database),
    :class:`~p2pmsg.store.errors.MigrationError`, or ``OSError`` when the file cannot be created.
    """
    if not 1 <= readers <= 16:
        raise StoreArgumentError("readers", f"must be within 1..16, got {readers}")
    if not 1 <= max_batch <= 100_000:
        raise StoreArgumentError("max_batch", f"must be within 1..100000, got {max_batch}")
    db = Database(Path(os.fspath(path)), readers=readers, max_batch=max_batch, migrations=tuple(migrations))
    try:
        await db._open()
        yield db
    finally:
        await db.aclose()

#!/usr/bin/env python3
"""Benchmark: the store's per-message cost on both nodes, with and without a history, by message-id scheme.

Usage: ``python scripts/bench_store.py [--json] [--n N] [--history H] [--repeat R] [--one-at-a-time M]
[--page-size P]`` (database files go to ``$TMPDIR``, default ``/tmp``)

What a node's SQLite writer does for every message of a burst, with the product's own code
(:mod:`p2pmsg.store.repo` on a database made by :mod:`p2pmsg.store.migrations`, set up with the writer's pragmas):

* *sender*: ``enqueue_rows`` of 300 messages per transaction, committed with a sync (as ``send_many`` does), then
  ``mark_delivered_ids`` of 150 receipts per transaction, committed without one (as the receipts path does);
* *receiver*: ``insert_incoming_rows`` of 150 messages per transaction, committed with a sync.

Each is measured in a new database file, empty or already holding ``--history`` messages (default 300,000: a node
that has been in use for a while; the history's ids follow the same scheme), for two ways of making message ids:

* ``time_prefixed``: :func:`p2pmsg.chat.envelope.new_message_id`, what the product sends: 4 bytes of the minute
  the message was written, then 12 random bytes;
* ``random``: 16 random bytes, the former scheme (the peer this is compared against, in the same run).

Figures per message: ``*_cpu_us`` (CPU time of this process: it runs the SQLite calls itself, in one thread) and
``*_written_kb`` (bytes this process handed to the kernel in write calls: the WAL frames, and the checkpoints'
copies into the database file; ``wchar`` of ``/proc/self/io``).  Every message carries 1024 bytes of text.  The
median of R runs (default 3).  With ``--page-size P`` the databases get P-byte pages instead of the product's
(``NEW_FILE_PAGE_SIZE``).  Prints one JSON object with ``--json``; otherwise a table.

With ``--one-at-a-time M``, instead: M messages each in a transaction of its own, as a person sends and receives
them (``p2pmsg send``, an interactive ``p2pmsg chat``): the sender enqueues one (synced) and marks it delivered
(unsynced), the receiver stores one (synced), on a database already holding 2,000 messages, for the product's page
size (``NEW_FILE_PAGE_SIZE``, 16 KiB) and for SQLite's default of 4 KiB, or ``--page-size P`` (the peer it is
compared against): keys
``one_at_a_time_page{size}_*``.  Every transaction writes whole pages to the WAL, so here the page size sets the
bytes written per message (flash wear on a Raspberry Pi's SD card), where in bursts it hardly matters.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from p2pmsg.chat.envelope import new_message_id
from p2pmsg.identity import Identity
from p2pmsg.store import repo
from p2pmsg.store.db import NEW_FILE_PAGE_SIZE, configure_writer
from p2pmsg.store.migrations import migrate

OWN = Identity.from_seed(bytes([0x51]) * 32).peer_id.to_bytes()
PEER = Identity.from_seed(bytes([0x52]) * 32).peer_id.to_bytes()
TEXT = "x" * 1024
SEND_BATCH = 300
RECEIPT_BATCH = 150
RECEIVE_BATCH = 150
FILL_BATCH = 5000
SCHEMES: dict[str, Callable[[int], bytes]] = {
    "time_prefixed": lambda ts: new_message_id(ts),
    "random": lambda ts: os.urandom(16),
}


def open_store(path: Path, page_size: int | None = None) -> sqlite3.Connection:
    """A new database file set up as the node's writer sets it up (page size, WAL, pragmas), migrated; with
    ``page_size``, that page size instead of :data:`NEW_FILE_PAGE_SIZE`."""
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    if page_size is not None:  # set before the first page is written: configure_writer keeps a file's page size
        conn.execute(f"PRAGMA page_size = {page_size}")
        conn.execute("PRAGMA journal_mode = WAL")
    configure_writer(conn, path)
    migrate(conn)
    return conn


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any], *, synced: bool) -> Any:
    """Run ``fn`` in one write transaction, committed with or without a sync (as the store's writer does)."""
    conn.execute(f"PRAGMA synchronous = {'FULL' if synced else 'NORMAL'}")
    conn.execute("BEGIN IMMEDIATE")
    result = fn(conn)
    conn.execute("COMMIT")
    return result


def written_bytes() -> int:
    with open("/proc/self/io") as io:
        for line in io:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise SystemExit("no wchar in /proc/self/io")


def clock_ms() -> Iterator[int]:
    """Message timestamps: now, advancing 1 ms per message (a burst of 1,000 messages a second)."""
    ts = time.time_ns() // 1_000_000
    while True:
        yield ts
        ts += 1


def fill(conn: sqlite3.Connection, count: int, make_id: Callable[[int], bytes], clock: Iterator[int]) -> None:
    """``count`` messages of history, half received and half sent and delivered (no outbox row left)."""
    now = next(clock)
    for start in range(0, count, FILL_BATCH):
        size = min(FILL_BATCH, count - start)
        incoming: list[repo.IncomingRow] = [
            (make_id(ts), PEER, None, TEXT, ts, False) for ts in (next(clock) for _ in range(size // 2))
        ]
        outgoing: list[repo.OutgoingRow] = [
            (make_id(ts), PEER, OWN, TEXT, ts, None) for ts in (next(clock) for _ in range(size - size // 2))
        ]

        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        repo.insert_incoming_rows(conn, incoming, now=now)
        repo.enqueue_rows(conn, outgoing, now=now)
        repo.mark_delivered_ids(conn, [row[0] for row in outgoing], recipient=PEER, now=now)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def measure_sender(
    conn: sqlite3.Connection, n: int, make_id: Callable[[int], bytes], clock: Iterator[int]
) -> dict[str, float]:
    now = next(clock)
    pending: list[bytes] = []
    wrote = written_bytes()
    cpu = time.process_time()
    for start in range(0, n, SEND_BATCH):
        rows: list[repo.OutgoingRow] = [
            (make_id(ts), PEER, OWN, TEXT, ts, ts + 30_000)
            for ts in (next(clock) for _ in range(min(SEND_BATCH, n - start)))
        ]
        transaction(conn, functools.partial(repo.enqueue_rows, rows=rows, now=now), synced=True)
        pending.extend(row[0] for row in rows)
        while len(pending) >= RECEIPT_BATCH or (pending and start + SEND_BATCH >= n):
            batch, pending = pending[:RECEIPT_BATCH], pending[RECEIPT_BATCH:]
            deliver = functools.partial(repo.mark_delivered_ids, message_ids=batch, recipient=PEER, now=now)
            done = transaction(conn, deliver, synced=False)
            if len(done) != len(batch):
                raise SystemExit(f"sender: {len(done)} of {len(batch)} receipts applied")
    cpu = time.process_time() - cpu
    return {"sender_cpu_us": cpu / n * 1e6, "sender_written_kb": (written_bytes() - wrote) / n / 1024}


def measure_receiver(
    conn: sqlite3.Connection, n: int, make_id: Callable[[int], bytes], clock: Iterator[int]
) -> dict[str, float]:
    now = next(clock)
    wrote = written_bytes()
    cpu = time.process_time()
    for start in range(0, n, RECEIVE_BATCH):
        rows: list[repo.IncomingRow] = [
            (make_id(ts), PEER, None, TEXT, ts, False)
            for ts in (next(clock) for _ in range(min(RECEIVE_BATCH, n - start)))
        ]
        new = transaction(conn, functools.partial(repo.insert_incoming_rows, rows=rows, now=now), synced=True)
        if not all(new):
            raise SystemExit("receiver: a fresh message id was already stored")
    cpu = time.process_time() - cpu
    return {"receiver_cpu_us": cpu / n * 1e6, "receiver_written_kb": (written_bytes() - wrote) / n / 1024}


def one_run(scheme: str, history: int, n: int, page_size: int | None) -> dict[str, float]:
    make_id = SCHEMES[scheme]
    clock = clock_ms()
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="p2pmsg-bench-store-") as name:
        for side, measure in (("sender", measure_sender), ("receiver", measure_receiver)):
            conn = open_store(Path(name) / f"{side}.db", page_size)
            try:
                if history:
                    fill(conn, history, make_id, clock)
                result.update(measure(conn, n, make_id, clock))
            finally:
                conn.close()
    return result


def one_at_a_time(page_size: int, n: int) -> dict[str, float]:
    """``n`` messages, each in its own transaction on each side (see the module docstring)."""
    clock = clock_ms()
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="p2pmsg-bench-store-") as name:
        for side in ("sender", "receiver"):
            conn = open_store(Path(name) / f"{side}.db", page_size)
            try:
                fill(conn, 2000, new_message_id, clock)
                now = next(clock)
                wrote, cpu = written_bytes(), time.process_time()
                for ts in (next(clock) for _ in range(n)):
                    mid = new_message_id(ts)
                    if side == "sender":
                        outgoing: list[repo.OutgoingRow] = [(mid, PEER, OWN, TEXT, ts, ts + 30_000)]
                        transaction(conn, functools.partial(repo.enqueue_rows, rows=outgoing, now=now), synced=True)
                        deliver = functools.partial(repo.mark_delivered_ids, message_ids=[mid], recipient=PEER, now=now)
                        transaction(conn, deliver, synced=False)
                    else:
                        incoming: list[repo.IncomingRow] = [(mid, PEER, None, TEXT, ts, False)]
                        transaction(
                            conn, functools.partial(repo.insert_incoming_rows, rows=incoming, now=now), synced=True
                        )
                cpu = time.process_time() - cpu
                result[f"{side}_cpu_us"] = cpu / n * 1e6
                result[f"{side}_written_kb"] = (written_bytes() - wrote) / n / 1024
            finally:
                conn.close()
    return result


def run_one_at_a_time(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    runs: dict[int, list[dict[str, float]]] = {NEW_FILE_PAGE_SIZE: [], args.page_size or 4096: []}
    for _ in range(args.repeat):
        for page_size in runs:  # alternately, so both see the same machine load
            runs[page_size].append(one_at_a_time(page_size, args.one_at_a_time))
    for page_size, page_runs in runs.items():
        for key in page_runs[0]:
            results[f"one_at_a_time_page{page_size}_{key}"] = statistics.median(run[key] for run in page_runs)
    results.update(n=args.one_at_a_time, repeat=args.repeat, text_bytes=len(TEXT), sqlite=sqlite3.sqlite_version)
    return results


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for history in (0, args.history):
        runs: dict[str, list[dict[str, float]]] = {scheme: [] for scheme in SCHEMES}
        for _ in range(args.repeat):
            for scheme in SCHEMES:  # alternately, so both see the same machine load
                runs[scheme].append(one_run(scheme, history, args.n, args.page_size))
        for scheme, scheme_runs in runs.items():
            for key in scheme_runs[0]:
                results[f"{scheme}_history{history}_{key}"] = statistics.median(run[key] for run in scheme_runs)
    results.update(
        n=args.n,
        history=args.history,
        repeat=args.repeat,
        text_bytes=len(TEXT),
        page_size=args.page_size or NEW_FILE_PAGE_SIZE,
        sqlite=sqlite3.sqlite_version,
        python=sys.version.split()[0],
    )
    with open("/proc/loadavg") as load:
        results["loadavg_1min"] = float(load.read().split()[0])
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"store, per message ({results['n']} messages, 1 KiB text, median of {results['repeat']} runs)")
    print(f"{'history':>9} {'figure':<22} {'time_prefixed':>14} {'random':>10}")
    for history in (0, results["history"]):
        for key in ("sender_cpu_us", "sender_written_kb", "receiver_cpu_us", "receiver_written_kb"):
            row = [results[f"{scheme}_history{history}_{key}"] for scheme in SCHEMES]
            print(f"{history:>9,} {key:<22} {row[0]:>14.2f} {row[1]:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=30_000, help="messages measured per side and run")
    parser.add_argument("--history", type=int, default=300_000, help="messages already stored in the larger case")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (the median is reported)")
    parser.add_argument(
        "--one-at-a-time", type=int, default=0, metavar="M", help="measure M single-message transactions instead"
    )
    parser.add_argument(
        "--page-size",
        type=int,
        metavar="P",
        help="database page size (default the product's); with --one-at-a-time, the one compared (default 4096)",
    )
    args = parser.parse_args()
    if args.n < 1 or args.history < 1 or args.repeat < 1 or args.one_at_a_time < 0:
        parser.error("--n, --history and --repeat must be at least 1, --one-at-a-time at least 0")
    if args.page_size is not None and (
        args.page_size < 512 or args.page_size > 65536 or args.page_size & (args.page_size - 1)
    ):
        parser.error("--page-size must be a power of two from 512 to 65536")
    if args.one_at_a_time:
        results = run_one_at_a_time(args)
        if args.json:
            print(json.dumps(results, indent=2, sort_keys=True))
        else:
            for key, value in sorted(results.items()):
                print(f"{key:<42} {value:>10.2f}" if isinstance(value, float) else f"{key:<42} {value}")
        return
    results = run_all(args)
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print_table(results)


if __name__ == "__main__":
    main()

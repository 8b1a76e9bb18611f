"""Helper process for test_store_crash.py (not a test): enqueue messages until killed.

Usage: ``python store_crash_writer.py DB_PATH``.  Prints ``ready``, then the hex id of every message whose
``await db.write`` has returned, one per line, flushed at once: each printed id was acknowledged as durably queued.
Eight tasks enqueue one message per write (so the writer thread batches them); one more enqueues 50 per write.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time

import trio

from p2pmsg.store import open_database, repo

ME = b"\x00\x24" + bytes(range(36))
BOB = b"\x00\x24" + bytes(range(1, 37))
TEXT = "k" * 1000


def enqueue(conn: sqlite3.Connection, message_id: bytes, now: int) -> None:
    repo.enqueue(conn, message_id=message_id, recipient=BOB, sender=ME, text=TEXT, sent_at=now, now=now)


def acknowledge(ids: list[bytes]) -> None:
    sys.stdout.write("".join(m.hex() + "\n" for m in ids))
    sys.stdout.flush()


async def main(path: str) -> None:
    async with open_database(path) as db:
        acknowledge([])
        sys.stdout.write("ready\n")
        sys.stdout.flush()

        async def single() -> None:
            while True:
                message_id = os.urandom(16)
                now = int(time.time() * 1000)
                await db.write(lambda c, m=message_id, t=now: enqueue(c, m, t))
                acknowledge([message_id])

        async def batched() -> None:
            while True:
                ids = [os.urandom(16) for _ in range(50)]
                await db.write(lambda c, ids=ids: [enqueue(c, m, 1) for m in ids])
                acknowledge(ids)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(single)
            nursery.start_soon(batched)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])

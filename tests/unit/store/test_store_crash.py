"""kill -9 in the middle of a burst of acknowledged writes: after reopening, every acknowledged write is there.

A real process (store_crash_writer.py) enqueues messages and prints each id once ``await db.write`` returned; the test
SIGKILLs it mid-burst, reopens the database (SQLite recovers from the WAL) and checks every printed id, twice in a row
on the same file.  (Power loss cannot be caused here; ``synchronous=FULL`` is what covers it, see db.py.)
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from p2pmsg.store import open_database

HELPER = Path(__file__).with_name("store_crash_writer.py")
PROJECT_ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")


async def run_and_kill(path: Path, *, min_acked: int, log: Path) -> list[bytes]:
    """Start the writer, let it acknowledge at least *min_acked* messages, SIGKILL it; return every acknowledged id."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(HELPER), str(path)], stdout=subprocess.PIPE, stderr=stderr, env=env
        )
    assert process.stdout is not None
    buffer = b""
    lines: list[bytes] = []
    try:
        with trio.fail_after(30):  # a guard against a hung helper, not a measurement
            while len(lines) < min_acked + 1:
                chunk = await process.stdout.receive_some(65536)
                if not chunk:
                    pytest.fail(f"writer exited early: {log.read_text()}")
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                lines.extend(complete)
        process.kill()  # SIGKILL: no cleanup of any kind in the child
        with trio.fail_after(30):
            while chunk := await process.stdout.receive_some(65536):
                buffer += chunk
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == -signal.SIGKILL
    *complete, _partial = buffer.split(b"\n")  # a line cut by the kill was not acknowledged
    lines.extend(complete)
    assert lines[0] == b"ready"
    return [bytes.fromhex(line.decode()) for line in lines[1:]]


async def stored_state(path: Path) -> tuple[set[bytes], int, int, str]:
    async with open_database(path) as db:

        def inspect(conn: sqlite3.Connection) -> tuple[set[bytes], int, int, str]:
            ids = {bytes(r[0]) for r in conn.execute("SELECT message_id FROM messages")}
            outbox = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
            orphans = conn.execute(
                "SELECT count(*) FROM messages m LEFT JOIN outbox o ON o.seq = m.seq WHERE o.seq IS NULL"
            ).fetchone()[0]
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            return ids, outbox, orphans, integrity

        return await db.read(inspect)


async def test_kill_9_mid_burst_loses_no_acknowledged_message(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    all_acked: set[bytes] = set()
    for round_number in range(2):
        acked = await run_and_kill(path, min_acked=400, log=tmp_path / f"writer{round_number}.log")
        assert len(acked) >= 400
        all_acked.update(acked)
        ids, outbox, orphans, integrity = await stored_state(path)
        missing = all_acked - ids
        assert not missing, f"round {round_number}: {len(missing)} acknowledged messages lost"
        assert integrity == "ok"
        # enqueue is atomic: every stored message has its outbox row, none is half written.
        assert outbox == len(ids) and orphans == 0

"""Shared fixtures.  Test vectors are read from ``../shared/vectors`` (never copied into the project)."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VECTORS_DIR = PROJECT_ROOT.parent / "shared" / "vectors"

# The netns tests drive real processes with the system tests' harness (tests/system/procs.py).  Not a conftest of
# their own: test modules import this one as ``conftest``, and a second module of that name would shadow it.
sys.path.insert(0, str(PROJECT_ROOT / "tests" / "system"))


def load_vectors(name: str) -> Any:
    """Load ``../shared/vectors/<name>``, skipping the test with a reason when it is not there.

    With ``P2PMSG_REQUIRE_VECTORS=1`` (set by ``.ci/run``) a missing file fails the test instead: in CI the
    vectors must run, not skip.
    """
    path = VECTORS_DIR / name
    if not path.is_file():
        if os.environ.get("P2PMSG_REQUIRE_VECTORS") == "1":
            pytest.fail(f"test vectors required but missing: {path}")
        pytest.skip(f"test vectors not available: {path} is missing (clone beside ../shared to run these)")
    return json.loads(path.read_text())


def error_reading_a_named_pipe(read: Callable[[Path], object], fifo: Path) -> BaseException:
    """Make ``fifo`` a named pipe nobody writes to, call ``read(fifo)`` in a thread and return what it raised; fail
    the test if it waited (the thread is then let go by opening the pipe for writing), or raised nothing."""
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            read(fifo)
        except Exception as exc:
            outcome.append(exc)

    worker = threading.Thread(target=call, daemon=True)  # a daemon: a hang fails the test, not the whole run
    worker.start()
    worker.join(10)
    if worker.is_alive():
        with open(fifo, "wb"):
            pass
        pytest.fail(f"reading {fifo.name} waited on a named pipe")
    if not outcome:
        pytest.fail(f"reading {fifo.name} (a named pipe) raised nothing")
    return outcome[0]

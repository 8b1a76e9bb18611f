"""Real ``p2pmsg`` processes for the system tests: homes, nodes, a bootstrap node, CLI calls, clean teardown.

Every process is the installed console script (``.venv/bin/p2pmsg``) started with :mod:`subprocess`, on 127.0.0.1
only, each node with its own home under the test's temporary directory.  A node's stdout and stderr go to
``<root>/<name>.log`` (appended across restarts), so a test can assert on what the node logged.

Use :func:`open_mesh` (a context manager) so that every process is stopped, also when the test fails: SIGTERM
first, SIGKILL after a grace period.  Every wait is bounded in time (:data:`TIMEOUT`); a timeout fails the test with
the tail of the relevant log.

The test modules import this file as ``from procs import ...``: pytest (``prepend`` import mode, no
``__init__.py``) puts ``tests/system`` on ``sys.path`` when it collects them, as it does for ``tests/interop``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

_PROJECT = Path(__file__).resolve().parents[2]
BIN = next(
    (p for p in (Path(sys.executable).parent / "p2pmsg", _PROJECT / ".venv" / "bin" / "p2pmsg") if p.exists()),
    Path(sys.executable).parent / "p2pmsg",
)
"""The ``p2pmsg`` console script of the venv the tests run in."""

TIMEOUT = 30.0
"""Upper bound of every wait (a node coming up, a message arriving, a CLI call)."""
LOCAL_TCP = "/ip4/127.0.0.1/tcp/0"
LOCAL_WS = "/ip4/127.0.0.1/tcp/0/ws"

T = TypeVar("T")


class Mesh:
    """The processes of one test and the folder they live in (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        if not BIN.exists():
            pytest.skip(f"{BIN} is missing: install p2pmsg into the venv (make venv)")
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.helpers: list[subprocess.Popen[str]] = []
        """Short-lived CLI processes started with :meth:`popen` (killed at teardown if still there)."""
        self.env = {**os.environ, "P2PMSG_PASSPHRASE": ""}
        self.env.pop("P2PMSG_HOME", None)
        self.bootstrap_addr: str | None = None
        self.prefix: dict[str, list[str]] = {}
        """A command put before ``p2pmsg`` for a name's node (``ip netns exec NS`` in the netns tests)."""

    # -- paths ---------------------------------------------------------------------------------------------------

    def home(self, name: str) -> Path:
        return self.root / name

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log(self, name: str) -> str:
        """Everything ``name`` wrote to stdout/stderr so far (all its runs)."""
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self, name: str, size: int = 4000) -> str:
        return f"\n--- last lines of {name}.log ---\n{self.log(name)[-size:]}"

    # -- the command line ----------------------------------------------------------------------------------------

    def cli(
        self,
        name: str,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``p2pmsg --home <home of name> ARGS`` and return it (failing the test on a non-zero exit if
        ``check``)."""
        cmd = [str(BIN), "--home", str(self.home(name)), *args]
        done = subprocess.run(
            cmd,
            env=self.env,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            pytest.fail(
                f"`p2pmsg {' '.join(args)[:200]}` for {name} exited {done.returncode}:\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}" + (self.tail(name) if name in self.procs else "")
            )
        return done

    def cli_json(self, name: str, *args: str) -> Any:
        """A read command with ``--json``, its output decoded."""
        return json.loads(self.cli(name, *args, "--json").stdout)

    def status(self, name: str) -> dict[str, Any]:
        value: dict[str, Any] = self.cli_json(name, "status")
        return value

    def history(self, name: str, contact: str, limit: int = 5000) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.cli_json(name, "history", contact, "--limit", str(limit))
        return rows

    def wait_for_history(
        self, name: str, contact: str, count: int, *, timeout: float = TIMEOUT
    ) -> list[dict[str, Any]]:
        """Wait until ``name``'s history with ``contact`` has at least ``count`` messages; return it."""
        rows: list[dict[str, Any]] = []

        def enough() -> bool:
            nonlocal rows
            rows = self.history(name, contact)
            return len(rows) >= count

        self.wait_until(
            enough, f"{count} messages in {name}'s history with {contact}", [name, contact], timeout=timeout
        )
        return rows

    # -- processes -----------------------------------------------------------------------------------------------

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        if name in self.procs:
            raise AssertionError(f"{name} is already running")
        with self.log_path(name).open("ab") as log:
            proc = subprocess.Popen(
                [*self.prefix.get(name, []), str(BIN), *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        return proc

    def start_bootstrap(self, name: str = "boot") -> str:
        """Start a DHT-only ``p2pmsg bootstrap`` node on a free UDP port; return its multiaddr (with /p2p/)."""
        self._spawn(name, ["--home", str(self.home(name)), "bootstrap", "--listen", "/ip4/127.0.0.1/udp/0"])

        def address() -> str | None:
            for line in self.log(name).splitlines():
                if line.startswith("bootstrap node listening on "):
                    return line.split()[-1]
            return None

        addr = self.wait_until(address, "the bootstrap node's address", name)
        self.bootstrap_addr = addr
        return addr

    def init(
        self,
        name: str,
        *,
        listen: Sequence[str] = (LOCAL_TCP,),
        accept_from: str | None = None,
    ) -> None:
        """``p2pmsg init --no-passphrase`` a new home, joined through the bootstrap node if one runs."""
        args = ["init", "--no-passphrase"]
        for addr in listen:
            args += ["--listen", addr]
        if self.bootstrap_addr is not None:
            args += ["--bootstrap", self.bootstrap_addr]
        if accept_from is not None:
            args += ["--accept-from", accept_from]
        self.cli(name, *args)

    def start(self, name: str, *, log_level: str = "info") -> None:
        """``p2pmsg run`` on ``name``'s home; returns once the node answers ``status`` on its control socket."""
        proc = self._spawn(name, ["--home", str(self.home(name)), "run", "--log-level", log_level])

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"{name}'s node exited with {proc.returncode} while starting" + self.tail(name))
            done = self.cli(name, "status", "--json", check=False, timeout=10)
            return done.returncode == 0 and done.stdout.startswith("{")

        self.wait_until(ready, f"{name}'s node to answer on its control socket", name, pause=0.05)

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def stop(self, name: str, *, grace: float = 15.0) -> int:
        """SIGTERM ``name`` and wait for it (SIGKILL after ``grace`` seconds); return its exit status."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    def kill(self, name: str) -> None:
        """``kill -9`` ``name`` and reap it."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def popen(self, name: str, *args: str) -> subprocess.Popen[str]:
        """Start ``p2pmsg --home <home of name> ARGS`` with piped stdin/stdout/stderr (text), tracked for teardown."""
        proc = subprocess.Popen(
            [str(BIN), "--home", str(self.home(name)), *args],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.helpers.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.helpers:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)
        self.helpers.clear()
        for name in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(name, grace=10.0)

    # -- helpers -------------------------------------------------------------------------------------------------

    def wait_until(
        self,
        predicate: Callable[[], T | None],
        what: str,
        log_of: str | Sequence[str] = (),
        *,
        timeout: float = TIMEOUT,
        pause: float = 0.2,
    ) -> T:
        """Call ``predicate`` until it returns something truthy (returned); fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                names = [log_of] if isinstance(log_of, str) else list(log_of)
                pytest.fail(f"timed out after {timeout:g} s waiting for {what}" + "".join(self.tail(n) for n in names))
            time.sleep(pause)

    def peer_id(self, name: str) -> str:
        return str(self.cli_json(name, "id")["peer_id"])

    def introduce(self, a: str, b: str) -> None:
        """``a`` and ``b`` add each other as contacts (named ``b`` and ``a``) from their invites."""
        invite_a = self.cli_json(a, "id")["invite"]
        invite_b = self.cli_json(b, "id")["invite"]
        self.cli(a, "contacts", "add", invite_b, "--name", b)
        self.cli(b, "contacts", "add", invite_a, "--name", a)


@contextlib.contextmanager
def open_mesh(root: Path) -> Iterator[Mesh]:
    """A :class:`Mesh` in ``root`` whose processes are all stopped on exit."""
    mesh = Mesh(root)
    try:
        yield mesh
    finally:
        mesh.stop_all()


@contextlib.contextmanager
def alice_and_bob(root: Path) -> Iterator[Mesh]:
    """The usual scene: a bootstrap node, and alice and bob running, each a contact of the other."""
    with open_mesh(root) as mesh:
        mesh.start_bootstrap()
        for name in ("alice", "bob"):
            mesh.init(name)
            mesh.start(name)
        mesh.introduce("alice", "bob")
        yield mesh


def texts(rows: Sequence[dict[str, Any]], direction: str | None = None) -> list[str]:
    """The texts of history rows (of one direction if given), in history order."""
    return [str(r["text"]) for r in rows if direction is None or r["direction"] == direction]


class Watcher:
    """``p2pmsg chat CONTACT`` on ``name``'s node, left open: it prints every incoming message of that contact as
    it is stored, so a test can act while a stream of messages is being received.  Counts the lines that contain
    ``marker``."""

    def __init__(self, mesh: Mesh, name: str, contact: str, marker: str) -> None:
        self.marker = marker
        self.proc = mesh.popen(name, "chat", contact, "--limit", "1")
        self.lines: list[str] = []
        self._count = 0
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, name=f"watch-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._count += self.marker in line
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def count(self) -> int:
        return self._count

    def wait_for(self, count: int, timeout: float = TIMEOUT) -> int:
        """Wait until ``count`` marked lines were printed (or the chat ended, or ``timeout``); return the count."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.count < count and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 0.5))
            return self.count

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=10)
        self._thread.join(timeout=5)


@dataclasses.dataclass
class Batch:
    """One ``p2pmsg chat`` run of a :class:`Burst`: its lines and how it ended (``None``: not run)."""

    lines: list[str]
    returncode: int | None = None
    stderr: str = ""


class Burst:
    """Send ``lines`` from ``name`` to ``contact`` as consecutive ``p2pmsg chat CONTACT`` runs with piped stdin,
    ``batch`` lines each, in a background thread.  A run that exits 0 has queued (durably) every one of its lines;
    the first run that fails ends the burst (its node is gone); the runs after it are not attempted."""

    def __init__(self, mesh: Mesh, name: str, contact: str, lines: Sequence[str], batch: int) -> None:
        self.mesh = mesh
        self.name = name
        self.contact = contact
        self.batches = [Batch(list(lines[i : i + batch])) for i in range(0, len(lines), batch)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"burst-{name}", daemon=True)

    def start(self) -> Burst:
        self._thread.start()
        return self

    def _run(self) -> None:
        for batch in self.batches:
            if self._stop.is_set():
                return
            proc = self.mesh.popen(self.name, "chat", self.contact, "--limit", "1")
            try:
                _, err = proc.communicate("".join(line + "\n" for line in batch.lines), timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            batch.stderr = err
            batch.returncode = proc.returncode
            if proc.returncode != 0:
                return

    def join(self, timeout: float = 2 * TIMEOUT) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop.set()
            pytest.fail(f"the burst from {self.name} did not finish within {timeout:g} s")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)

    @property
    def queued(self) -> list[str]:
        """Lines reported queued: those of the runs that exited 0."""
        return [line for b in self.batches if b.returncode == 0 for line in b.lines]

    @property
    def failed(self) -> list[Batch]:
        return [b for b in self.batches if b.returncode not in (0, None)]

    @property
    def not_run(self) -> list[str]:
        return [line for b in self.batches if b.returncode is None for line in b.lines]

"""Running real p2pmsg processes for the conformance tests: init, run, bootstrap, stop.

Only the command line of docs/protocol.md section 7.9 and the control socket of section 7 are used. Imports nothing
from p2pmsg or the other test folders. The CLI is the `p2pmsg` script next to the running interpreter.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .control import ControlClient
from .encoding import b58decode

T = TypeVar("T")
CLI = Path(sys.executable).parent / "p2pmsg"
_PASSPHRASE_VARS = ("P2PMSG_PASSPHRASE", "P2PMSG_PASSPHRASE_FILE", "CREDENTIALS_DIRECTORY", "P2PMSG_HOME")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], T | None], timeout: float, what: str, step: float = 0.05) -> T:
    """Poll `pred` until it returns something truthy; raise TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(step)


class Process:
    """A p2pmsg process whose output goes to a log file; stop() always ends it."""

    def __init__(self, name: str, home: Path, passphrase: str | None = None):
        self.name, self.home, self.passphrase = name, home, passphrase
        self.log_path = home.parent / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PASSPHRASE_VARS}
        if self.passphrase is not None:
            env["P2PMSG_PASSPHRASE"] = self.passphrase
        return env

    def cli(self, *args: str, timeout: float = 30.0) -> str:
        r = subprocess.run(
            [str(CLI), "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise RuntimeError(f"p2pmsg {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def spawn(self, *args: str) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(CLI), "--home", str(self.home), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} is not running; log:\n{self.log_tail()}")

    def stop(self, wait: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `wait` seconds. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


class Node(Process):
    """A chat node (`p2pmsg init` then `p2pmsg run`) on 127.0.0.1."""

    def __init__(self, name: str, base: Path, passphrase: str | None = None):
        super().__init__(name, base / name, passphrase)
        self.port = free_port()
        self.dht_port = free_port(socket.SOCK_DGRAM)
        self.peer_id_text = ""
        self.peer_id = b""

    @property
    def dht_addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.dht_port)

    def init(self, bootstrap: str | None = None) -> None:
        args = ["init", "--listen", f"/ip4/127.0.0.1/tcp/{self.port}", "--dht-port", str(self.dht_port)]
        if bootstrap:
            args += ["--bootstrap", bootstrap]
        if self.passphrase is None:
            args.append("--no-passphrase")
        self.cli(*args)

    def start(self, timeout: float = 30.0) -> None:
        self.spawn("run", *(["--no-passphrase"] if self.passphrase is None else []))

        def ready() -> dict[str, Any] | None:
            self.check_alive()
            try:
                return self.call("id")  # type: ignore[no-any-return]
            except OSError:
                return None

        ident = wait_until(ready, timeout, f"{self.name}: control socket answering")
        self.peer_id_text = ident["peer_id"]
        self.peer_id = b58decode(self.peer_id_text)

    def control(self, timeout: float = 10.0) -> ControlClient:
        return ControlClient(self.home, timeout)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with self.control() as client:
            return client.call(method, params)

    def dropped(self, reason: str) -> int:
        return int(self.call("status")["dropped"].get(reason, 0))

    def history(self, name: str) -> list[dict[str, Any]]:
        return self.call("history", {"name": name, "limit": 1000})  # type: ignore[no-any-return]

    def find_message(self, name: str, text: str) -> dict[str, Any] | None:
        return next((m for m in self.history(name) if m["text"] == text), None)

    def wait_status(self, name: str, text: str, status: str, timeout: float = 10.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            m = self.find_message(name, text)
            return m if m and m["status"] == status else None

        return wait_until(check, timeout, f"{name}: {text!r} {status}")


class BootstrapNode(Process):
    """A DHT-only node (`p2pmsg bootstrap`)."""

    def __init__(self, base: Path, name: str = "boot"):
        super().__init__(name, base / name)
        self.dht_port = free_port(socket.SOCK_DGRAM)
        self.multiaddr = ""

    @property
    def dht_addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.dht_port)

    def start(self, timeout: float = 30.0) -> None:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.spawn("bootstrap", "--listen", f"/ip4/127.0.0.1/udp/{self.dht_port}")

        def listening() -> str | None:
            self.check_alive()
            for line in self.log_path.read_text(errors="replace").splitlines():
                if "listening on " in line:
                    return line.split("listening on ", 1)[1].split()[0]
            return None

        self.multiaddr = wait_until(listening, timeout, "bootstrap node listening")


def stop_all(processes: list[Process]) -> None:
    """Stop every process, the last started first; one failing stop does not keep the others running."""
    errors = []
    for p in reversed(processes):
        try:
            p.stop()
        except Exception as exc:
            errors.append(exc)
            if p.proc is not None and p.proc.poll() is None:
                p.proc.kill()
    if errors:
        raise errors[0]

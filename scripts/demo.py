"""`make demo`: a small local mesh of real p2pmsg processes, showing messages flowing between them.

It starts a DHT bootstrap node and two messenger nodes (alice and bob), each a separate `p2pmsg` process with its
own home in a temporary folder, all on 127.0.0.1.  Alice and Bob exchange invites and talk; then Bob goes offline,
Alice writes to him anyway (the message waits in her outbox), Bob comes back on a new port, and the message is
delivered: Alice finds Bob's new address through his signed peer record in the DHT.  Everything is stopped and the
folder removed at the end (also on Ctrl-C or failure).  Pass --keep to keep the folder and its logs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent / "p2pmsg"
TIMEOUT = 60.0


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


class Mesh:
    """The processes of the demo and the folder they live in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "P2PMSG_PASSPHRASE": ""}
        self.env.pop("P2PMSG_HOME", None)

    def home(self, name: str) -> Path:
        return self.root / name

    def cli(self, name: str, *args: str, show: bool = True, check: bool = True) -> str:
        cmd = [str(BIN), "--home", str(self.home(name)), *args]
        if show:
            print(f"$ p2pmsg --home {name} {' '.join(_quote(a) for a in args)}", flush=True)
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=TIMEOUT)
        if check and done.returncode != 0:
            raise SystemExit(f"demo: `p2pmsg {' '.join(args)}` for {name} failed:\n{done.stdout}{done.stderr}")
        if show and done.stdout.strip():
            print(_indent(done.stdout), flush=True)
        return done.stdout

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen([str(BIN), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start_node(self, name: str) -> None:
        self.start(name, "--home", str(self.home(name)), "run")
        wait_until(lambda: self.cli(name, "status", "--json", show=False, check=False).startswith("{"),
                   f"{name}'s node to answer on its control socket", self, name)  # fmt: skip

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "/-_.:=" for c in arg) else json.dumps(arg)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def wait_until(predicate: Callable[[], Any], what: str, mesh: Mesh, log_of: str | None = None) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    hint = ""
    if log_of is not None:
        hint = "\n" + (mesh.root / f"{log_of}.log").read_text(errors="replace")[-3000:]
    raise SystemExit(f"demo: timed out waiting for {what}{hint}")


def history(mesh: Mesh, name: str, contact: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(mesh.cli(name, "history", contact, "--json", show=False))
    return rows


def run_demo(mesh: Mesh) -> None:
    say("A bootstrap node: the DHT entry point that lets the others find each other")
    boot = mesh.start("bootstrap", "--home", str(mesh.home("bootstrap")), "bootstrap", "--listen",
                      "/ip4/127.0.0.1/udp/0")  # fmt: skip
    boot_log = mesh.root / "bootstrap.log"
    boot_addr = wait_until(lambda: _first_multiaddr(boot_log), "the bootstrap node's address", mesh, "bootstrap")
    print(f"    bootstrap node: {boot_addr}")
    assert boot.poll() is None

    say("Alice and Bob each create an identity (no passphrase, for the demo) and start a node")
    for name in ("alice", "bob"):
        mesh.cli(name, "init", "--no-passphrase", "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", boot_addr)
        mesh.start_node(name)

    say("They exchange invite links (in real life: a QR code, or any channel you trust)")
    alice_id = json.loads(mesh.cli("alice", "id", "--json"))
    bob_id = json.loads(mesh.cli("bob", "id", "--json"))
    mesh.cli("alice", "contacts", "add", bob_id["invite"], "--name", "bob")
    mesh.cli("bob", "contacts", "add", alice_id["invite"], "--name", "alice")

    say("A short conversation")
    mesh.cli("alice", "send", "bob", "Hi Bob! This went end-to-end encrypted, straight to your node.")
    wait_until(lambda: len(history(mesh, "bob", "alice")) >= 1, "Bob to receive Alice's message", mesh, "bob")
    mesh.cli("bob", "send", "alice", "Hi Alice, got it. No server in between!")
    wait_until(lambda: len(history(mesh, "alice", "bob")) >= 2, "Alice to receive Bob's reply", mesh, "alice")

    def all_delivered() -> bool:
        return all(m["status"] == "delivered" for m in history(mesh, "alice", "bob") if m["direction"] == "out")

    wait_until(all_delivered, "the delivery receipt", mesh, "alice")
    mesh.cli("alice", "history", "bob")

    say("Bob goes offline; Alice writes anyway: the message waits, durably, in her outbox")
    mesh.stop("bob")
    mesh.cli("alice", "send", "bob", "Are you there? (sent while you were offline)")
    mesh.cli("alice", "history", "bob")

    say("Bob comes back (on a new port: Alice finds him again through his signed record in the DHT)")
    mesh.start_node("bob")
    wait_until(lambda: len(history(mesh, "bob", "alice")) >= 3, "the offline message to reach Bob", mesh, "alice")
    wait_until(lambda: history(mesh, "alice", "bob")[-1]["status"] == "delivered", "the receipt", mesh, "alice")
    mesh.cli("bob", "history", "alice")
    mesh.cli("alice", "status")

    say("Done: 3 messages, delivered exactly once, including one to a peer that was offline")


def _first_multiaddr(log: Path) -> str | None:
    if not log.exists():
        return None
    for line in log.read_text(errors="replace").splitlines():
        for word in line.split():
            if word.startswith("/ip4/") and "/p2p/" in word:
                return word
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (homes and logs)")
    args = parser.parse_args()
    if not BIN.exists():
        raise SystemExit(f"demo: {BIN} not found; run `make demo` (it installs p2pmsg into .venv first)")
    root = Path(tempfile.mkdtemp(prefix="p2pmsg-demo-"))
    mesh = Mesh(root)
    try:
        run_demo(mesh)
    finally:
        mesh.stop_all()
        if args.keep:
            print(f"\nkept {root} (homes and logs)")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

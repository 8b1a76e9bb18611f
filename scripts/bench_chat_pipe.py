"""Messaging through the command line: lines piped into `p2pmsg chat`, against one `p2pmsg send` per message.

Two real nodes (`p2pmsg run`, separate processes and homes in a temporary folder, 127.0.0.1, no bootstrap peer:
they add each other by invite) and the real CLI.  What a person or a script gets without writing any code:

* ``pipe_msgs_per_s``: N lines of 1 KiB piped into ``p2pmsg --home alice chat bob`` (which queues them with
  ``send_many``, a batch per call, and prints ``queued <id>`` per line); wall time from starting the command to
  Alice's outbox being empty (every message acknowledged by Bob's node).  ``pipe_queued_per_s``: to the command's
  exit (every line durably queued).
* ``send_msgs_per_s``, the peer in the same run: M messages sent with one ``p2pmsg send`` process each, one after
  the other (what a shell loop does), to the same point (outbox empty).

Run from the project root after `make venv`:  .venv/bin/python scripts/bench_chat_pipe.py [--n N] [--sends M] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from demo import BIN, Mesh, wait_until  # the demo's process handling (same directory)

from p2pmsg.control.client import ControlClient

TEXT_SIZE = 1024


def _lines(count: int, tag: str) -> str:
    return "".join(f"{tag} {i:07d} ".ljust(TEXT_SIZE, "x") + "\n" for i in range(count))


def _wait_empty_outbox(client: ControlClient, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.call("status")["outbox_depth"] == 0:
            return
        time.sleep(0.01)
    raise SystemExit(f"bench: the outbox did not empty within {timeout:g} s")


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    mesh = Mesh(root)
    try:
        for name in ("alice", "bob"):
            mesh.cli(name, "init", "--no-passphrase", "--listen", "/ip4/127.0.0.1/tcp/0", show=False)
            mesh.start_node(name)
        invites = {n: json.loads(mesh.cli(n, "id", "--json", show=False))["invite"] for n in ("alice", "bob")}
        mesh.cli("alice", "contacts", "add", invites["bob"], "--name", "bob", show=False)
        mesh.cli("bob", "contacts", "add", invites["alice"], "--name", "alice", show=False)
        alice = ControlClient(mesh.home("alice"))
        mesh.cli("alice", "send", "bob", "warm-up", show=False)
        wait_until(lambda: alice.call("status")["outbox_depth"] == 0, "the warm-up message", mesh, "alice")

        text = _lines(args.n, "pipe")
        start = time.perf_counter()
        done = subprocess.run(
            [str(BIN), "--home", str(mesh.home("alice")), "chat", "bob"],
            input=text,
            env=mesh.env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        queued = time.perf_counter() - start
        if done.returncode != 0 or done.stdout.count("queued ") != args.n:
            raise SystemExit(f"bench: `p2pmsg chat` failed ({done.returncode}): {done.stderr[-2000:]}")
        _wait_empty_outbox(alice, args.timeout)
        delivered = time.perf_counter() - start

        start = time.perf_counter()
        for i in range(args.sends):
            mesh.cli("alice", "send", "bob", f"send {i:07d} ".ljust(TEXT_SIZE, "x"), show=False)
        sent = time.perf_counter() - start
        _wait_empty_outbox(alice, args.timeout)
        sends_delivered = time.perf_counter() - start
        # Alice's empty outbox means Bob acknowledged everything; check the tail of his history as well.
        latest = ControlClient(mesh.home("bob")).call("history", name="alice", limit=args.sends + 1)
        expected = [f"pipe {args.n - 1:07d}"] + [f"send {i:07d}" for i in range(args.sends)]
        if [str(row["text"])[:12] for row in latest] != expected:
            raise SystemExit("bench: bob's latest messages are not the ones sent last")
        alice.close()
    finally:
        mesh.stop_all()
    return {
        "pipe_msgs_per_s": args.n / delivered,
        "pipe_queued_per_s": args.n / queued,
        "send_msgs_per_s": args.sends / sends_delivered,
        "send_queued_per_s": args.sends / sent,
        "n": args.n,
        "sends": args.sends,
        "text_bytes": TEXT_SIZE,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=20_000, help="lines piped into `p2pmsg chat` (default 20000)")
    parser.add_argument("--sends", type=int, default=100, help="`p2pmsg send` processes (default 100)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up (default 300)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not BIN.exists():
        raise SystemExit(f"bench: {BIN} not found; run `make venv` first")
    root = Path(tempfile.mkdtemp(prefix="p2pmsg-bench-cli-"))
    try:
        results = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results))
        return
    print(f"p2pmsg through the CLI: {TEXT_SIZE} B messages, two nodes on 127.0.0.1 ({sys.platform})")
    rows = [
        (f"piped into `p2pmsg chat` ({args.n} lines)", results["pipe_msgs_per_s"], results["pipe_queued_per_s"]),
        (f"one `p2pmsg send` each ({args.sends} processes)", results["send_msgs_per_s"], results["send_queued_per_s"]),
    ]
    for label, delivered, queued in rows:
        print(f"{label:48s} {delivered:10,.0f} msg/s delivered, {queued:,.0f}/s queued")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: CPU instructions per chat message, counted with valgrind (repeatable on a busy or shared machine).

Usage: ``python scripts/bench_instructions.py [--json] [--n N] [--baseline REV]`` (needs ``valgrind``; temporary
files go to ``$TMPDIR``)

Wall-clock and CPU-time figures on this project's shared 2-vCPU VM move by 20 % and more from one minute to the next,
which hides changes of a few percent.  ``valgrind --tool=callgrind`` counts the instructions a program executes
instead: the same code with the same input gives nearly the same count whatever else the machine does.

What is counted:

* ``pair_instructions_per_msg``: two chat services (:class:`p2pmsg.chat.service.ChatService`, each with its own
  SQLite database file, a real TCP session on 127.0.0.1) in one process; after a first message that opens the
  session, N messages of 1 KiB text (default 2,000) sent by 4 tasks calling ``send_many`` with 100 texts, until
  the sender has every ``delivered`` receipt.  Everything both nodes execute (Python, SQLite, libsodium, the
  kernel interface in libc) divided by N, after subtracting a run with no message (imports, start-up, the first
  message).  Under valgrind the threads run one at a time, so batches form differently than in a native run; the
  count is a like-for-like comparison between code versions, not a prediction of the native CPU time.
* ``ceiling_instructions_per_msg``: the bare pipe of ``bench_messaging.py``'s ceiling in one process: msgpack of
  ``{"id": 16 bytes, "body": 1 KiB}``, SecretBox sealed, framed, written in batches of 256 over a local socket
  pair, read, opened and unpacked; the peer every figure is compared with.
* with ``--baseline REV``: the same pair count for the git revision REV (``git archive`` into a temporary
  directory, run with this interpreter and its installed packages), in the same run: ``baseline_*`` keys.

Prints one JSON object with ``--json``; otherwise a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEXT_SIZE = 1024
SEND_MANY = 100
PRODUCERS = 4


# ------------------------------------------------------------------------------------------------ the workloads


def run_pair(n: int) -> None:
    """The two-service workload (runs under valgrind, with PYTHONPATH naming the tree to measure)."""
    import inspect

    import trio

    from p2pmsg.chat.service import ChatService
    from p2pmsg.identity import Identity
    from p2pmsg.net.listener import Listener
    from p2pmsg.store.db import open_database
    from p2pmsg.wire.multiaddr import Multiaddr

    alice_id, bob_id = Identity.from_seed(bytes([0xA1]) * 32), Identity.from_seed(bytes([0xB1]) * 32)

    class Receipts:
        def __init__(self) -> None:
            self.delivered = 0
            self.target = 1
            self.done = trio.Event()

        def __call__(self, event: str, /, **fields: Any) -> None:
            if event == "receipt" and fields["status"] == "delivered":
                self.delivered += len(fields["ids"])
                if self.delivered >= self.target:
                    self.done.set()

    async def main() -> None:
        receipts = Receipts()
        with tempfile.TemporaryDirectory(prefix="p2pmsg-bench-instr-") as name:
            home = Path(name)
            async with (
                open_database(home / "alice.db") as alice_db,
                open_database(home / "bob.db") as bob_db,
                trio.open_nursery() as nursery,
            ):
                # The receiver has no event sink; the sender's sink counts receipts (a subscriber, for versions
                # that ask whether anyone listens).
                extra: dict[str, Any] = {}
                if "listening" in inspect.signature(ChatService).parameters:
                    extra["listening"] = lambda: True
                alice = ChatService(alice_id, alice_db, events=receipts, **extra)
                bob = ChatService(bob_id, bob_db)
                local = [Multiaddr.parse("/ip4/127.0.0.1/tcp/0")]
                addrs = await nursery.start(Listener(bob_id, bob.handle_inbound).run, local)
                await nursery.start(alice.run)
                await nursery.start(bob.run)
                await alice.add_contact(bob.invite(addrs), "bob")
                await bob.add_contact(str(alice_id.peer_id), "alice")
                await alice.send("bob", "the first message opens the session")
                await receipts.done.wait()
                receipts.done, receipts.target = trio.Event(), 1 + n
                remaining = n
                body = "x" * (TEXT_SIZE - 10)

                async def producer() -> None:
                    nonlocal remaining
                    while remaining > 0:
                        count = min(SEND_MANY, remaining)
                        remaining -= count
                        await alice.send_many("bob", [f"{body}{remaining + i:10d}" for i in range(count)])

                if n:
                    async with trio.open_nursery() as producers:
                        for _ in range(PRODUCERS):
                            producers.start_soon(producer)
                    await receipts.done.wait()
                nursery.cancel_scope.cancel()

    trio.run(main)


def run_ceiling(n: int) -> None:
    """The bare pipe: seal, frame and write in batches; read, open and unpack (one process, a socket pair)."""
    import socket
    import struct
    import threading

    import msgpack
    import nacl.secret

    box = nacl.secret.SecretBox(bytes(range(32)))
    header = struct.Struct(">I")
    left, right = socket.socketpair()
    body = b"x" * TEXT_SIZE

    def sink() -> None:
        buffer = bytearray()
        count = 0
        while count < n:
            chunk = right.recv(256 * 1024)
            if not chunk:
                raise SystemExit(f"ceiling: stream ended after {count} of {n}")
            buffer += chunk
            offset = 0
            while len(buffer) - offset >= 4:
                (length,) = header.unpack_from(buffer, offset)
                end = offset + 4 + length
                if end > len(buffer):
                    break
                message = msgpack.unpackb(box.decrypt(bytes(buffer[offset + 4 : end])), raw=False)
                if len(message["body"]) != TEXT_SIZE:
                    raise SystemExit("ceiling: bad message")
                count += 1
                offset = end
            del buffer[:offset]

    reader = threading.Thread(target=sink)
    reader.start()
    sent = 0
    while sent < n:
        frames: list[bytes] = []
        for _ in range(min(256, n - sent)):
            sealed = box.encrypt(msgpack.packb({"id": os.urandom(16), "body": body}, use_bin_type=True))
            frames += (header.pack(len(sealed)), sealed)
            sent += 1
        left.sendall(b"".join(frames))
    reader.join()
    left.close()
    right.close()


# ------------------------------------------------------------------------------------------------ counting


def count(role: str, n: int, tree: Path) -> int:
    """Instructions valgrind counted for ``role`` with ``n`` messages, the code of ``tree`` on the path."""
    with tempfile.TemporaryDirectory(prefix="p2pmsg-bench-cg-") as scratch:
        out = Path(scratch) / "callgrind.out"
        env = dict(os.environ, PYTHONPATH=str(tree))
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(Path(__file__).resolve()),
            "--role",
            role,
            "--n",
            str(n),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or found is None:
            raise SystemExit(f"valgrind run of {role} (n={n}, {tree}) failed:\n{done.stderr[-2000:]}")
        return int(found.group(1))


def per_message(role: str, n: int, tree: Path) -> float:
    return (count(role, n, tree) - count(role, 0, tree)) / n


def export(revision: str, into: Path) -> None:
    """The files of ``revision`` (as ``git archive`` gives them) in the directory ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {revision} failed: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"n": args.n, "text_bytes": TEXT_SIZE, "python": sys.version.split()[0]}
    results["pair_instructions_per_msg"] = per_message("pair", args.n, ROOT)
    results["ceiling_instructions_per_msg"] = per_message("ceiling", args.n, ROOT)
    results["pair_over_ceiling"] = results["pair_instructions_per_msg"] / results["ceiling_instructions_per_msg"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    results["revision"] = head.stdout.strip() + ("" if not _dirty() else " + uncommitted changes")
    if args.baseline:
        with tempfile.TemporaryDirectory(prefix="p2pmsg-bench-baseline-") as name:
            export(args.baseline, Path(name))
            results["baseline"] = args.baseline
            results["baseline_pair_instructions_per_msg"] = per_message("pair", args.n, Path(name))
        results["pair_vs_baseline"] = (
            results["pair_instructions_per_msg"] / results["baseline_pair_instructions_per_msg"]
        )
    return results


def _dirty() -> bool:
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "p2pmsg"], capture_output=True, text=True)
    return bool(status.stdout.strip())


def print_table(results: dict[str, Any]) -> None:
    print(f"instructions per message (valgrind callgrind, {results['n']} messages of {results['text_bytes']} B)")
    print(f"  both chat services, {results['revision']:<28} {results['pair_instructions_per_msg']:>12,.0f}")
    if "baseline" in results:
        print(
            f"  both chat services, {results['baseline']:<28} {results['baseline_pair_instructions_per_msg']:>12,.0f}"
        )
        print(f"  ratio to the baseline{'':28} {results['pair_vs_baseline']:>12.3f}")
    print(f"  bare pipe (ceiling){'':30} {results['ceiling_instructions_per_msg']:>12,.0f}")
    print(f"  pair / ceiling{'':35} {results['pair_over_ceiling']:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=2000, help="messages counted (default 2000)")
    parser.add_argument("--baseline", metavar="REV", help="also count the git revision REV, in the same run")
    parser.add_argument("--role", choices=["pair", "ceiling"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "pair":
        run_pair(args.n)
        return
    if args.role == "ceiling":
        run_ceiling(args.n)
        return
    if args.n < 1:
        parser.error("--n must be positive")
    if shutil.which("valgrind") is None:
        raise SystemExit("bench_instructions.py needs valgrind (Debian: apt-get install valgrind)")
    results = run_all(args)
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print_table(results)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: chat messaging between two real nodes (two processes, loopback, SQLite in temporary homes).

Usage: ``python scripts/bench_messaging.py [--json] [--n N] [--repeat R] [--batch B] [--concurrency C]
[--single-concurrency C1 | --no-single-send] [--idle M] [--load-seconds S] [--pipe-n P] [--floor-n F]
[--subscribed] [--breakdown | --profile DIR]`` (the homes and the durable floor's database files go to
``$TMPDIR``, default ``/tmp``)

Both nodes are :func:`p2pmsg.node.run_node` with a real database in a temporary home.  This process runs the
*sender* node and drives it in-process through :meth:`ChatService.send_many` and :meth:`ChatService.send` (the
coroutines behind the control API's methods of those names, without the Unix-socket round trip, so no third process
competes for the CPUs); the *receiver*
node is this script re-run as a child process.  Each node has the other as a contact (the hot path: no message
requests).  Every message carries 1024 bytes of text.

A message counts when the sender's node publishes its ``receipt`` event with status ``delivered``: the receiver
opened the envelope, committed it to its database (``synchronous=FULL``), acknowledged it, and the sender committed
the status ``delivered``.  Every latency below ends at that event (never at "stored at the receiver").

* ``msgs_per_s`` (the headline, *batched pipelined* mode): N messages queued by ``--concurrency`` tasks (default 4)
  each calling ``send_many`` with ``--batch`` texts (default 100) as fast as it returns (each call returns once its
  texts are durably queued, so while one call's transaction is synced the others seal theirs: the way a program
  that sends thousands of messages per second, e.g. piped ``p2pmsg chat``, sends); wall time from the first call
  until the last ``delivered`` receipt.  The median of R runs (``msgs_per_s_runs``).  ``--batch 1`` makes the
  tasks call ``send`` instead.  ``sender_cpu_us`` / ``receiver_cpu_us``: CPU time of each node process (all
  threads, from ``/proc``) per message in those runs, split into the trio thread (``*_main_*``), the SQLite writer
  thread (``*_writer_*``) and the rest; ``cpu_bound_msgs_per_s`` = 10^6 / the larger of the two: what the pair
  reaches when each node has a core to itself (independent of the machine's load); ``null`` when a run was too short
  for the kernel's CPU accounting (10 ms ticks) to see any CPU at all.  ``bulk_mode`` names the mode.
* ``msgs_per_s_single_send`` (the *single-send* mode): the same N messages, each by its own ``send`` call, from
  ``--single-concurrency`` tasks (default 64); the median of R runs (``msgs_per_s_single_send_runs``), each run
  right after a batched one so both modes see the same machine load; ``sender_cpu_us_single_send``,
  ``receiver_cpu_us_single_send``, ``sender_writer_cpu_us_single_send``, ``sender_writes_per_txn_single_send`` as
  above.  Skipped with ``--no-single-send``; when the headline mode is this very mode it is not run twice (the
  keys repeat the headline figures).
* ``latency_ms_p50`` / ``_p99``: M messages one at a time on an idle pair: ``send`` called -> ``delivered``
  receipt at the sender.  ``send_ms_p50``: the part until ``send`` returned (durably queued).
* ``latency_ms_p99_loaded``: probe messages, one every ``--probe-interval`` ms, while a saturating load runs for S
  seconds: ``--single-concurrency`` tasks calling ``send`` keep ``--window`` messages undelivered at all times.  A
  probe queues behind at most that window (the session is FIFO), so this is about "window / throughput" plus every
  stall.
* ``control_send_ms_p50``, ``control_latency_ms_p50`` / ``_p99``: M/3 more idle messages sent through the
  control API (``ControlClient.call("send")`` from a worker thread, as ``p2pmsg send`` would from its process): the
  call's round trip, and the time to the ``delivered`` receipt.
* ``sqlite_commit_ms_p50`` / ``_p99``: one 1 KiB insert committed in a bare WAL database with ``synchronous=FULL``
  in the same directory: the disk's floor for every durable step (a message needs three in a row).
* ``rss_mb_idle``: resident memory (``VmRSS``) of the receiver node process one second after it started.
* ``ceiling_msgs_per_s``: a bare pipe between this process and a child: each message a 4-byte length + nacl
  SecretBox (random nonce) of msgpack ``{"id": 16 bytes, "body": 1 KiB}``, written in batches of 256 per
  ``send_all`` (``ceiling_unbatched_msgs_per_s``: one ``send_all`` per message); the child decrypts and unpacks
  each.  No database, no receipts: what two Python processes can move at all.  Run alternately with the node runs.
* ``durable_floor_msgs_per_s`` (a *reference*, not a target): the ceiling pipe plus the durable work both nodes
  must do per message, in straight-line code with one thread per process, F messages per run (``--floor-n``,
  default half of ``--pipe-n``: 50,000).  The sender seals a batch of 256, inserts it into its own SQLite file
  (``messages(seq, id UNIQUE, body)`` row + a ``pending(seq)`` row each, one transaction, committed and synced)
  and only then writes it; the child, per batch of complete frames one read gave (at most 256), opens and unpacks
  each, inserts them (``ON CONFLICT(id) DO NOTHING``, one synced transaction) and answers an ack frame (4-byte
  length + the 16-byte ids); a second trio task of the sender deletes the acknowledged ``pending`` rows, one
  unsynced (``synchronous=NORMAL``) transaction per ack frame.  Both files are new per run, set up like a new
  node database (WAL, ``synchronous=FULL``, 16 KiB pages).  Wall time until every pending row is deleted; one run
  right after each ceiling run (``durable_floor_msgs_per_s_runs``); ``durable_floor_sender_cpu_us`` /
  ``durable_floor_receiver_cpu_us`` per message, ``durable_floor_cpu_bound_msgs_per_s`` as above.  What the
  durable part costs by itself on this machine, next to the bare ceiling.

Neither node has a control-API subscriber; the sender's tee reads every ``delivered`` receipt, so the sender builds
its events as it would for a subscriber, while the receiver builds none (``ChatService(listening=...)``).
``--subscribed`` makes the receiver build its ``message`` events too, as a node with an open ``p2pmsg chat`` would
(``receiver_subscribed`` in the JSON).

``--breakdown`` runs one bulk transfer (in the ``--batch`` / ``--concurrency`` mode), counting the store calls the
sender's writer makes (items per ``enqueue_rows``, ``mark_sent_many`` and ``mark_delivered_ids`` call), then times
each piece of the hot path alone with the product's own code (sealing, framing, events, the store's group commit on
a real file in calls of the sizes just counted, the trio <-> writer-thread hand-off) and compares the sum with the
CPU per thread measured in the bulk run.  ``--profile DIR`` runs one bulk transfer with
cProfile in both node processes (trio thread and SQLite writer thread separately), writes
``DIR/{sender,receiver}-{main,writer}.prof`` and prints the top functions.

Prints one JSON object with ``--json``; otherwise a table with the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import functools
import json
import os
import platform
import pstats
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgpack
import nacl.secret
import trio

from p2pmsg.cli.config import Config
from p2pmsg.identity import Identity
from p2pmsg.node import Node, run_node
from p2pmsg.store.db import NEW_FILE_PAGE_SIZE

SENDER = Identity.from_seed(bytes([0x5E]) * 32)
RECEIVER = Identity.from_seed(bytes([0x4E]) * 32)
TEXT_SIZE = 1024
LISTEN = ["/ip4/127.0.0.1/tcp/0"]
PIPE_KEY = bytes(range(32))
PIPE_BATCH = 256
_LEN = struct.Struct(">I")
CLK_TCK = os.sysconf("SC_CLK_TCK")
Row = tuple[str, str, float]
BULK_TIMEOUT = 180.0
"""Seconds a bulk run may take before the benchmark gives up (a stalled pipeline, not a slow one)."""

TARGETS = {
    "msgs_per_s": ">= 20,000 msg/s",
    "msgs_per_s_single_send": "",
    "ceiling_msgs_per_s": "(ceiling)",
    "ceiling_fraction": ">= 40 %",
    "durable_floor_msgs_per_s": "(reference)",
    "latency_ms_p50": "<= 2 ms",
    "latency_ms_p99": "",
    "latency_ms_p99_loaded": "",
    "sqlite_commit_ms_p50": "(floor)",
    "rss_mb_idle": "<= 60 MB",
}


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


_TEXT_TAIL = "x" * (TEXT_SIZE - len(f"bench message {0:>10} "))


def text_of(index: int) -> str:
    """1024 bytes of ASCII text, distinct per message (for indexes below 10^10)."""
    return f"bench message {index:>10} {_TEXT_TAIL}"


# ------------------------------------------------------------------------------------------------ /proc readings


def _stat_cpu(path: str) -> float:
    """utime + stime in seconds from a /proc .../stat file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sys_cpu(pid: int) -> float:
    """System (kernel) CPU seconds of process ``pid``, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[12]) / CLK_TCK


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of every thread of ``pid``, by thread id."""
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out[int(tid)] = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
    return out


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmRSS for process {pid}")


def writer_thread_id() -> int | None:
    for thread in threading.enumerate():
        if thread.name.startswith("p2pmsg-store-writer"):
            return thread.native_id
    return None


def split_cpu(before: dict[int, float], after: dict[int, float], main: int, writer: int | None) -> dict[str, float]:
    """CPU seconds between two readings: trio (main) thread, SQLite writer thread, all other threads."""
    delta = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    main_s = delta.pop(main, 0.0)
    writer_s = delta.pop(writer, 0.0) if writer is not None else 0.0
    return {"main": main_s, "writer": writer_s, "other": sum(delta.values())}


# ------------------------------------------------------------------------------------------------ profiling


class ThreadProfiles:
    """cProfile of the trio thread and of the SQLite writer thread (cProfile only sees the thread that enables it)."""

    def __init__(self, directory: Path, role: str) -> None:
        self.directory = directory
        self.role = role
        self.main = cProfile.Profile()
        self.writer: cProfile.Profile | None = None
        self.armed = False
        self._lock = threading.Lock()

    def install(self) -> None:
        """Hook the writer thread: it enables its own profiler when armed, checked at each of its requests."""
        from p2pmsg.store import db as store_db

        profiles = self
        original = store_db._Writer._run_batch

        def run_batch(writer: Any, batch: Any) -> Any:
            if profiles.armed and profiles.writer is None:
                with profiles._lock:
                    profiles.writer = cProfile.Profile()
                    profiles.writer.enable()
            elif not profiles.armed and profiles.writer is not None:
                with profiles._lock:
                    profiles.writer.disable()
                    profiles.writer.dump_stats(profiles.directory / f"{profiles.role}-writer.prof")
                    profiles.writer = None
            return original(writer, batch)

        store_db._Writer._run_batch = run_batch  # type: ignore[method-assign, assignment]

    def start(self) -> None:
        self.armed = True
        self.main.enable()

    def stop(self) -> None:
        self.main.disable()
        self.armed = False
        self.main.dump_stats(self.directory / f"{self.role}-main.prof")


# ------------------------------------------------------------------------------------------------ receiver child


class EventTee(Protocol):
    """An event sink placed in front of the chat service's own (see :func:`tee_events`)."""

    def __call__(self, event: str, /, **fields: Any) -> None: ...

    def listening(self) -> bool: ...


TeeT = TypeVar("TeeT", bound=EventTee)


def tee_events(node: Node, make: Callable[[Callable[..., None] | None], TeeT]) -> TeeT:
    """Put ``make(original sink)`` in front of the chat service's event sink (a private attribute: the only place
    that sees every event without a control-API subscriber, which a burst would disconnect).  The service builds
    its hot-path events only while ``listening()`` says someone listens: the tee's ``listening()`` answers instead
    (it asks for exactly the events the benchmark reads, as a control-API subscriber would get them all)."""
    chat: Any = node.chat
    if not hasattr(chat, "_events") or not hasattr(chat, "_listening"):
        raise SystemExit("ChatService has no _events/_listening any more: update tee_events() in this benchmark")
    tee = make(chat._events)
    chat._events = tee
    chat._listening = tee.listening
    return tee


class StoredStamps:
    """Tees the receiver node's event sink: when each incoming ``message`` event (published after the commit) came."""

    def __init__(self, inner: Callable[..., None] | None, *, subscribed: bool = False) -> None:
        self.inner = inner
        self.subscribed = subscribed
        self.stamps: dict[str, float] | None = None

    def listening(self) -> bool:
        """Message events are wanted while stamps are taken, and always with ``--subscribed`` (as if a control
        client, e.g. an open ``p2pmsg chat``, were subscribed to the receiver node)."""
        return self.subscribed or self.stamps is not None

    def __call__(self, event: str, /, **fields: Any) -> None:
        if self.stamps is not None and event == "message" and fields.get("direction") == "in":
            self.stamps[fields["id"]] = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        if self.inner is not None:
            self.inner(event, **fields)


async def run_receiver(home: Path, contact: str, profile_dir: str | None, subscribed: bool) -> None:
    """Child process: a node that has the sender as a contact; commands on stdin, one JSON answer per line."""
    profiles = ThreadProfiles(Path(profile_dir), "receiver") if profile_dir else None
    if profiles is not None:
        profiles.install()
    config = Config(listen=LISTEN, bootstrap=[], accept_from="contacts")
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(functools.partial(run_node, home, RECEIVER, config))
        await node.chat.add_contact(contact, "sender")
        stored = tee_events(node, functools.partial(StoredStamps, subscribed=subscribed))
        answer = {"invite": node.chat.invite(node.addrs), "pid": os.getpid(), "writer_tid": writer_thread_id()}
        print(json.dumps(answer), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buffer = b""
        while True:
            data = await stdin.receive_some()
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = line.decode().strip()
                if command == "stats":
                    stats = node.db.stats
                    reply: dict[str, Any] = {
                        "transactions": stats.transactions,
                        "writes": stats.writes,
                        "largest_batch": stats.largest_batch,
                        "rss_mb": rss_mb(os.getpid()),
                    }
                elif command == "stamps-on":
                    stored.stamps = {}
                    reply = {}
                elif command == "stamps-off":
                    reply = {"stamps": stored.stamps}
                    stored.stamps = None
                elif command == "profile-start" and profiles is not None:
                    profiles.start()
                    reply = {}
                elif command == "profile-stop" and profiles is not None:
                    profiles.stop()
                    await node.db.write(lambda conn: None)  # the writer thread dumps its profile at its next request
                    reply = {}
                else:
                    reply = {"error": f"unknown command {command!r}"}
                print(json.dumps(reply), flush=True)
        nursery.cancel_scope.cancel()


class Receiver:
    """The receiver node process, seen from the benchmark."""

    def __init__(self, profile_dir: str | None = None, *, subscribed: bool = False) -> None:
        self.home = tempfile.TemporaryDirectory(prefix="p2pmsg-bench-recv-")
        command = [sys.executable, os.path.abspath(__file__), "--role", "receiver", "--home", self.home.name]
        command += ["--contact", str(SENDER.peer_id)]
        if profile_dir:
            command += ["--profile", profile_dir]
        if subscribed:
            command.append("--subscribed")
        self.child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._line()
        self.invite: str = hello["invite"]
        self.pid: int = hello["pid"]
        self.writer_tid: int | None = hello["writer_tid"]

    def _line(self) -> dict[str, Any]:
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        if not line:
            self.child.kill()
            raise SystemExit(f"the receiver node exited early (status {self.child.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    async def command(self, command: str) -> dict[str, Any]:
        assert self.child.stdin is not None
        self.child.stdin.write(command + "\n")
        self.child.stdin.flush()
        return await trio.to_thread.run_sync(self._line)

    def cpu(self) -> dict[int, float]:
        return thread_cpu(self.pid)

    def close(self) -> None:
        assert self.child.stdin is not None
        self.child.stdin.close()
        _reap(self.child)
        self.home.cleanup()


# ------------------------------------------------------------------------------------------------ sender side


class Receipts:
    """Tees the sender node's event sink: records when each ``delivered`` receipt is published."""

    def __init__(self, inner: Callable[..., None] | None) -> None:
        self.inner = inner
        self.delivered: dict[str, float] = {}
        self.waiters: dict[str, trio.Event] = {}
        self.group: set[str] = set()
        self.group_hits = 0
        self.group_target = -1
        self.group_done = trio.Event()
        self.window: trio.Semaphore | None = None
        self.window_ids: set[str] = set()

    def listening(self) -> bool:
        """Always: the benchmark reads every ``delivered`` receipt, as a control-API subscriber (who gets every
        event, ``message`` events included) would."""
        return True

    def __call__(self, event: str, /, **fields: Any) -> None:
        if event == "receipt" and fields.get("status") == "delivered":
            # One event per acknowledged batch; set operations per batch keep this tee's own cost per message low
            # (it runs in the sender node's process and its CPU counts as the sender's).
            ids = fields["ids"]
            self.delivered.update(dict.fromkeys(ids, time.perf_counter()))
            if self.waiters:
                for mid in ids:
                    waiter = self.waiters.pop(mid, None)
                    if waiter is not None:
                        waiter.set()
            if self.group:
                self._hit(len(self.group.intersection(ids)))
            if self.window_ids:
                released = self.window_ids.intersection(ids)
                if released:
                    assert self.window is not None
                    self.window_ids.difference_update(released)
                    for _ in released:
                        self.window.release()
        if self.inner is not None:
            self.inner(event, **fields)

    def _hit(self, count: int = 1) -> None:
        self.group_hits += count
        if self.group_hits >= self.group_target:
            self.group_done.set()

    def new_group(self, target: int) -> None:
        self.group = set()
        self.group_hits = 0
        self.group_target = target
        self.group_done = trio.Event()

    def add_to_group(self, mid: str) -> None:
        self.group.add(mid)
        if mid in self.delivered:
            self._hit()

    def add_many_to_group(self, ids: list[str]) -> None:
        self.group.update(ids)
        already = self.delivered.keys() & ids
        if already:
            self._hit(len(already))

    def add_to_window(self, mid: str) -> None:
        assert self.window is not None
        if mid in self.delivered:
            self.window.release()
        else:
            self.window_ids.add(mid)

    async def wait_for(self, mid: str) -> float:
        """When the ``delivered`` receipt of ``mid`` was published (waits for it)."""
        if mid not in self.delivered:
            event = self.waiters[mid] = trio.Event()
            await event.wait()
        return self.delivered[mid]


class Bench:
    def __init__(self, node: Node, receiver: Receiver, args: argparse.Namespace) -> None:
        self.node = node
        self.receiver = receiver
        self.args = args
        self.counter = 0
        self.receipts = tee_events(node, Receipts)
        self.writer_tid = writer_thread_id()
        self.main_tid = threading.get_native_id()

    async def send(self) -> str:
        self.counter += 1
        result = await self.node.chat.send("receiver", text_of(self.counter))
        mid: str = result["id"]
        return mid

    async def one(self) -> tuple[str, float, float, float]:
        """(id, start, send returned, delivered receipt) of one message, ``perf_counter`` seconds."""
        start = time.perf_counter()
        mid = await self.send()
        queued = time.perf_counter()
        delivered = await self.receipts.wait_for(mid)
        return mid, start, queued, delivered

    async def idle_latency(self, count: int) -> dict[str, float]:
        """One message at a time; the receiver stamps when it published each message (after its commit)."""
        samples = []
        await self.receiver.command("stamps-on")
        for _ in range(count):
            samples.append(await self.one())
            await trio.sleep(0.002)
        stamps: dict[str, float] = (await self.receiver.command("stamps-off"))["stamps"]
        total = [(delivered - start) * 1e3 for _, start, _, delivered in samples]
        queued = [(returned - start) * 1e3 for _, start, returned, _ in samples]
        stored = [(stamps[mid] - start) * 1e3 for mid, start, _, _ in samples if mid in stamps]
        return {
            "latency_ms_p50": statistics.median(total),
            "latency_ms_p99": percentile(total, 0.99),
            "send_ms_p50": statistics.median(queued),
            "stored_ms_p50": statistics.median(stored),
            "stored_ms_p99": percentile(stored, 0.99),
        }

    async def control_latency(self, home: Path, count: int) -> dict[str, float]:
        """Like :meth:`idle_latency`, but each ``send`` goes through the control API (what ``p2pmsg send`` does,
        from a worker thread of this process instead of a new process)."""
        from p2pmsg.control.client import ControlClient

        calls: list[float] = []
        total: list[float] = []
        with ControlClient(home, timeout=30) as client:
            for _ in range(count):
                self.counter += 1
                text = text_of(self.counter)
                start = time.perf_counter()
                call = functools.partial(client.call, "send", name="receiver", text=text)
                result = await trio.to_thread.run_sync(call)
                calls.append((time.perf_counter() - start) * 1e3)
                total.append((await self.receipts.wait_for(result["id"]) - start) * 1e3)
                await trio.sleep(0.002)
        return {
            "control_send_ms_p50": statistics.median(calls),
            "control_latency_ms_p50": statistics.median(total),
            "control_latency_ms_p99": percentile(total, 0.99),
        }

    async def bulk(self, n: int, batch: int, concurrency: int) -> dict[str, float]:
        """N messages queued by ``concurrency`` tasks as fast as the calls return (``send_many`` of ``batch`` texts
        per call, or ``send`` when ``batch`` is 1); wall time until all are delivered, CPU of both sides."""
        receipts = self.receipts
        receipts.new_group(n)
        remaining = n
        queued_at = 0.0

        async def producer() -> None:
            nonlocal remaining, queued_at
            while remaining > 0:
                if batch > 1:  # ChatService.send_many, the coroutine behind the control method of that name
                    count = min(batch, remaining)
                    remaining -= count
                    texts = []
                    for _ in range(count):
                        self.counter += 1
                        texts.append(text_of(self.counter))
                    result = await self.node.chat.send_many("receiver", texts)
                    receipts.add_many_to_group(result["ids"])
                    continue
                remaining -= 1
                receipts.add_to_group(await self.send())
            queued_at = max(queued_at, time.perf_counter())

        sender_before, receiver_before = thread_cpu(os.getpid()), self.receiver.cpu()
        sys_before = sys_cpu(os.getpid()), sys_cpu(self.receiver.pid)
        db_before = self.node.db.stats
        recv_db_before = await self.receiver.command("stats")
        start = time.perf_counter()
        with trio.fail_after(BULK_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(producer)
            await receipts.group_done.wait()
        elapsed = time.perf_counter() - start
        sender = split_cpu(sender_before, thread_cpu(os.getpid()), self.main_tid, self.writer_tid)
        receiver = split_cpu(receiver_before, self.receiver.cpu(), self.receiver.pid, self.receiver.writer_tid)
        sys_after = sys_cpu(os.getpid()), sys_cpu(self.receiver.pid)
        db_after = self.node.db.stats
        recv_db_after = await self.receiver.command("stats")
        return {
            "msgs_per_s": n / elapsed,
            "queue_msgs_per_s": n / (queued_at - start),
            "sender_cpu_us": sum(sender.values()) / n * 1e6,
            "sender_main_cpu_us": sender["main"] / n * 1e6,
            "sender_writer_cpu_us": sender["writer"] / n * 1e6,
            "sender_other_cpu_us": sender["other"] / n * 1e6,
            "sender_sys_cpu_us": (sys_after[0] - sys_before[0]) / n * 1e6,
            "receiver_cpu_us": sum(receiver.values()) / n * 1e6,
            "receiver_sys_cpu_us": (sys_after[1] - sys_before[1]) / n * 1e6,
            "receiver_main_cpu_us": receiver["main"] / n * 1e6,
            "receiver_writer_cpu_us": receiver["writer"] / n * 1e6,
            "receiver_other_cpu_us": receiver["other"] / n * 1e6,
            "sender_writes_per_txn": (db_after.writes - db_before.writes)
            / max(1, db_after.transactions - db_before.transactions),
            "receiver_writes_per_txn": (recv_db_after["writes"] - recv_db_before["writes"])
            / max(1, recv_db_after["transactions"] - recv_db_before["transactions"]),
            "receiver_msgs_per_txn": n / max(1, recv_db_after["transactions"] - recv_db_before["transactions"]),
        }

    async def loaded(self, seconds: float) -> dict[str, float]:
        """Probe latency while ``single_concurrency`` tasks calling ``send`` keep ``window`` messages undelivered."""
        receipts = self.receipts
        receipts.window = trio.Semaphore(self.args.window)
        receipts.window_ids = set()
        sent = 0
        latencies: list[float] = []
        interval = self.args.probe_interval / 1e3

        async def producer() -> None:
            nonlocal sent
            assert receipts.window is not None
            while True:
                await receipts.window.acquire()
                receipts.add_to_window(await self.send())
                sent += 1

        async with trio.open_nursery() as nursery:
            for _ in range(self.args.single_concurrency):
                nursery.start_soon(producer)
            await trio.sleep(min(1.0, seconds / 4))  # let the load build up
            start = time.perf_counter()
            delivered_before = len(receipts.delivered)
            next_probe = trio.current_time()
            while time.perf_counter() - start < seconds:
                _, begun, _, delivered = await self.one()
                latencies.append((delivered - begun) * 1e3)
                next_probe += interval
                await trio.sleep_until(max(next_probe, trio.current_time()))
            elapsed = time.perf_counter() - start
            delivered = len(receipts.delivered) - delivered_before
            nursery.cancel_scope.cancel()
        # Let the window drain, so the next phase starts on an idle pair.
        with trio.fail_after(60):
            while receipts.window_ids:
                await trio.sleep(0.01)
        receipts.window = None
        return {
            "latency_ms_p99_loaded": percentile(latencies, 0.99),
            "latency_ms_p50_loaded": statistics.median(latencies),
            "loaded_probes": len(latencies),
            "loaded_msgs_per_s": delivered / elapsed,
        }


async def start_sender(home: Path, nursery: trio.Nursery) -> Node:
    config = Config(listen=LISTEN, bootstrap=[], accept_from="contacts")
    node: Node = await nursery.start(functools.partial(run_node, home, SENDER, config))
    return node


@contextlib.contextmanager
def sender_home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="p2pmsg-bench-send-") as name:
        yield Path(name)


# ------------------------------------------------------------------------------------------------ the ceiling pipe


async def _accept_one() -> trio.SocketStream:
    """A sink's one connection: listen on 127.0.0.1, print the port for the parent, accept, stop listening."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listener.socket.getsockname()[1], flush=True)
    stream = await listener.accept()
    await listener.aclose()
    return stream


async def _start_sink(role: str, *args: str) -> tuple[subprocess.Popen[str], trio.SocketStream]:
    """Run this script as a ``--role`` child and connect to the port it prints."""
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--role", role, *args], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line.strip().isdigit():
        _reap(child)
        raise SystemExit(f"{role} did not report its port (got {line!r})")
    return child, await trio.open_tcp_stream("127.0.0.1", int(line))


def _reap(child: subprocess.Popen[str]) -> None:
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


async def run_pipe_sink(total: int) -> None:
    """Child process: accept one connection, open and unpack ``total`` framed SecretBox messages, answer one byte."""
    box = nacl.secret.SecretBox(PIPE_KEY)
    stream = await _accept_one()
    buffer = bytearray()
    count = 0
    while count < total:
        chunk = await stream.receive_some(256 * 1024)
        if not chunk:
            raise SystemExit(f"pipe sink: stream ended after {count} of {total} messages")
        buffer += chunk
        offset = 0
        size = len(buffer)
        while size - offset >= 4:
            (length,) = _LEN.unpack_from(buffer, offset)
            end = offset + 4 + length
            if end > size:
                break
            message = msgpack.unpackb(box.decrypt(bytes(buffer[offset + 4 : end])), raw=False)
            if len(message["body"]) != TEXT_SIZE:
                raise SystemExit("pipe sink: bad message")
            count += 1
            offset = end
        del buffer[:offset]
    await stream.send_all(b"!")
    await stream.aclose()


async def measure_pipe(total: int, batch: int) -> tuple[float, float, float]:
    """(messages/s, sender CPU us/msg, sink CPU us/msg) for ``total`` framed SecretBox messages to a sink process."""
    child, stream = await _start_sink("pipe-sink", "--count", str(total))
    try:
        box = nacl.secret.SecretBox(PIPE_KEY)
        body = b"x" * TEXT_SIZE
        sink_before = _stat_cpu(f"/proc/{child.pid}/stat")
        cpu_start = time.process_time()
        start = time.perf_counter()
        sent = 0
        while sent < total:
            frames = []
            for _ in range(min(batch, total - sent)):
                sealed = box.encrypt(msgpack.packb({"id": os.urandom(16), "body": body}, use_bin_type=True))
                frames.append(_LEN.pack(len(sealed)))
                frames.append(sealed)
                sent += 1
            await stream.send_all(b"".join(frames))
        ack = await stream.receive_some(1)
        elapsed = time.perf_counter() - start
        sender_cpu = time.process_time() - cpu_start
        sink_cpu = _stat_cpu(f"/proc/{child.pid}/stat") - sink_before
        if ack != b"!":
            raise SystemExit(f"pipe sink did not acknowledge (got {ack!r})")
        await stream.aclose()
    finally:
        _reap(child)
    return total / elapsed, sender_cpu / total * 1e6, sink_cpu / total * 1e6


# ------------------------------------------------------------------------------------------------ the durable floor

FLOOR_SCHEMA = "CREATE TABLE messages (seq INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE, body BLOB NOT NULL)"
FLOOR_ID_SIZE = 16


def open_floor_db(path: Path, *, pending: bool) -> sqlite3.Connection:
    """A new SQLite file set up like a new node database (WAL, ``synchronous=FULL``, 16 KiB pages, the writer's cache
    and checkpoint size) with the durable floor's ``messages`` table, and ``pending`` when ``pending``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {NEW_FILE_PAGE_SIZE}")  # before the first page is written
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise SystemExit(f"durable floor: SQLite refused WAL mode for {path} (got {mode})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA cache_size = -16384")
    conn.execute(f"PRAGMA wal_autocheckpoint = {32 * 1024 * 1024 // NEW_FILE_PAGE_SIZE}")
    conn.execute(FLOOR_SCHEMA)
    if pending:
        conn.execute("CREATE TABLE pending (seq INTEGER PRIMARY KEY)")
    return conn


def _take_frames(buffer: bytearray, limit: int) -> tuple[list[bytes], int]:
    """Up to ``limit`` complete length-prefixed frames from the start of ``buffer``, and the bytes they span."""
    frames: list[bytes] = []
    offset = 0
    size = len(buffer)
    while len(frames) < limit and size - offset >= 4:
        (length,) = _LEN.unpack_from(buffer, offset)
        end = offset + 4 + length
        if end > size:
            break
        frames.append(bytes(buffer[offset + 4 : end]))
        offset = end
    return frames, offset


async def run_floor_sink(total: int, home: Path) -> None:
    """Child process of the durable floor: accept one connection; per batch of received frames (what one read gave,
    at most 256), open and unpack each, insert them into ``home/sink.db`` in one synced transaction, then answer an
    ack frame (4-byte length + the concatenated 16-byte ids).  Prints the port, and at the end the stored row count.
    One thread."""
    box = nacl.secret.SecretBox(PIPE_KEY)
    conn = open_floor_db(home / "sink.db", pending=False)
    insert = "INSERT INTO messages (id, body) VALUES (?, ?) ON CONFLICT(id) DO NOTHING"
    stream = await _accept_one()
    buffer = bytearray()
    count = 0
    while count < total:
        chunk = await stream.receive_some(256 * 1024)
        if not chunk:
            raise SystemExit(f"floor sink: stream ended after {count} of {total} messages")
        buffer += chunk
        while True:
            frames, used = _take_frames(buffer, PIPE_BATCH)
            if not frames:
                break
            del buffer[:used]
            rows = []
            for frame in frames:
                message = msgpack.unpackb(box.decrypt(frame), raw=False)
                if len(message["body"]) != TEXT_SIZE or len(message["id"]) != FLOOR_ID_SIZE:
                    raise SystemExit("floor sink: bad message")
                rows.append((message["id"], message["body"]))
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(insert, rows)
            conn.execute("COMMIT")  # synchronous=FULL: synced before the ack leaves
            ids = b"".join(mid for mid, _ in rows)
            await stream.send_all(_LEN.pack(len(ids)) + ids)
            count += len(rows)
    stored = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    conn.close()
    await stream.aclose()
    print(stored, flush=True)


async def measure_floor(total: int) -> tuple[float, float, float]:
    """(messages/s, sender CPU us/msg, sink CPU us/msg) of the durable floor: the ceiling pipe's frames, plus what
    every message must cost on disk at both ends, in one thread per process.

    The sender seals a batch of 256, inserts it into its own database (``messages`` row + ``pending`` row each, one
    synced transaction), then writes it; a second task on the same thread reads the sink's ack frames and deletes
    the acknowledged ``pending`` rows, one unsynced (``synchronous=NORMAL``) transaction per ack frame.  Wall time
    until every pending row is deleted.  Both database files live in a temporary directory next to the node homes.
    """
    with tempfile.TemporaryDirectory(prefix="p2pmsg-bench-floor-") as name:
        home = Path(name)
        child, stream = await _start_sink("floor-sink", "--count", str(total), "--home", name)
        conn = open_floor_db(home / "sender.db", pending=True)
        try:
            assert child.stdout is not None
            box = nacl.secret.SecretBox(PIPE_KEY)
            body = b"x" * TEXT_SIZE
            synchronous_full = True
            deleted = 0
            delete = "DELETE FROM pending WHERE seq = (SELECT seq FROM messages WHERE id = ?)"

            def sync(full: bool) -> None:
                nonlocal synchronous_full
                if synchronous_full != full:
                    conn.execute(f"PRAGMA synchronous = {'FULL' if full else 'NORMAL'}")
                    synchronous_full = full

            async def send() -> None:
                seq = 0
                while seq < total:
                    frames = []
                    rows = []
                    for _ in range(min(PIPE_BATCH, total - seq)):
                        seq += 1
                        mid = os.urandom(FLOOR_ID_SIZE)
                        sealed = box.encrypt(msgpack.packb({"id": mid, "body": body}, use_bin_type=True))
                        frames.append(_LEN.pack(len(sealed)))
                        frames.append(sealed)
                        rows.append((seq, mid, body))
                    sync(True)
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany("INSERT INTO messages (seq, id, body) VALUES (?, ?, ?)", rows)
                    conn.executemany("INSERT INTO pending (seq) VALUES (?)", [(row[0],) for row in rows])
                    conn.execute("COMMIT")  # synced before the batch is written
                    await stream.send_all(b"".join(frames))

            async def read_acks() -> None:
                nonlocal deleted
                buffer = bytearray()
                while deleted < total:
                    chunk = await stream.receive_some(64 * 1024)
                    if not chunk:
                        raise SystemExit(f"floor sink closed after {deleted} of {total} acknowledgements")
                    buffer += chunk
                    while True:
                        acks, used = _take_frames(buffer, 1)
                        if not acks:
                            break
                        del buffer[:used]
                        ids = acks[0]
                        sync(False)
                        conn.execute("BEGIN IMMEDIATE")
                        cursor = conn.executemany(
                            delete, [(ids[i : i + FLOOR_ID_SIZE],) for i in range(0, len(ids), FLOOR_ID_SIZE)]
                        )
                        conn.execute("COMMIT")
                        deleted += cursor.rowcount

            sink_before = _stat_cpu(f"/proc/{child.pid}/stat")
            cpu_start = time.process_time()
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_acks)
                nursery.start_soon(send)
            elapsed = time.perf_counter() - start
            sender_cpu = time.process_time() - cpu_start
            sink_cpu = _stat_cpu(f"/proc/{child.pid}/stat") - sink_before
            await stream.aclose()
            left = conn.execute("SELECT count(*) FROM pending").fetchone()[0]
            stored = child.stdout.readline().strip()
            if deleted != total or left or stored != str(total):
                raise SystemExit(f"durable floor: {deleted} acknowledged, {left} pending, sink stored {stored!r}")
        finally:
            conn.close()
            _reap(child)
    return total / elapsed, sender_cpu / total * 1e6, sink_cpu / total * 1e6


# ------------------------------------------------------------------------------------------------ the runs


def sqlite_commit_latency(directory: Path, count: int) -> list[float]:
    """Seconds per commit of one 1 KiB row in a WAL database with ``synchronous=FULL`` (the disk's floor)."""
    conn = sqlite3.connect(directory / "floor.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS t (v BLOB)")
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?)", (bytes(TEXT_SIZE),))
            conn.execute("COMMIT")
            samples.append(time.perf_counter() - start)
    finally:
        conn.close()
    return samples


async def warm_up(bench: Bench, count: int) -> None:
    """Open the session (dial, handshake, hello) and warm both processes' caches."""
    with trio.fail_after(60):
        for _ in range(count):
            await bench.one()


def bulk_mode(batch: int, concurrency: int) -> str:
    """How a bulk run queues its messages, for the table."""
    if batch == 1:
        return f"send, {concurrency} tasks"
    return f"send_many of {batch}, {concurrency} tasks"


def _per_core_rate(*cpu_us: float) -> float | None:
    """Messages a second with a core for each side: 10^6 / the larger CPU time per message (``None`` if neither
    side's CPU could be measured: a run shorter than the kernel's 10 ms accounting tick)."""
    slowest = max(cpu_us)
    return 1e6 / slowest if slowest > 0 else None


def _rate_text(rate: float | None) -> str:
    return f"{rate:,.0f} msg/s" if rate is not None else "(too short to measure)"


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    # The single-send comparison, unless the headline mode is that very mode.
    separate_single = args.single_send and not (args.batch == 1 and args.concurrency == args.single_concurrency)
    receiver = Receiver(subscribed=args.subscribed)
    try:
        await trio.sleep(1.0)
        results["rss_mb_idle"] = rss_mb(receiver.pid)
        with sender_home() as home:
            async with trio.open_nursery() as nursery:
                node = await start_sender(home, nursery)
                results["rss_mb_idle_sender_process"] = rss_mb(os.getpid())
                bench = Bench(node, receiver, args)
                await node.chat.add_contact(receiver.invite, "receiver")
                await warm_up(bench, 200)
                results.update(await bench.idle_latency(args.idle))
                results.update(await bench.control_latency(home, max(10, args.idle // 3)))
                floor = await trio.to_thread.run_sync(sqlite_commit_latency, home, 300)
                results["sqlite_commit_ms_p50"] = statistics.median(floor) * 1e3
                results["sqlite_commit_ms_p99"] = percentile(floor, 0.99) * 1e3
                bulk_runs: list[dict[str, float]] = []
                single_runs: list[dict[str, float]] = []
                pipe_runs: list[tuple[float, float, float]] = []
                floor_runs: list[tuple[float, float, float]] = []
                unbatched_runs: list[float] = []
                # Interleaved, so that every mode sees the same machine load.
                for _ in range(args.repeat):
                    bulk_runs.append(await bench.bulk(args.n, args.batch, args.concurrency))
                    pipe_runs.append(await measure_pipe(args.pipe_n, PIPE_BATCH))
                    floor_runs.append(await measure_floor(args.floor_n))
                    if separate_single:
                        single_runs.append(await bench.bulk(args.n, 1, args.single_concurrency))
                    unbatched_runs.append((await measure_pipe(args.pipe_n // 2, 1))[0])
                results.update(await bench.loaded(args.load_seconds))
                results["rss_mb_after_sender_process"] = rss_mb(os.getpid())
                results["rss_mb_after_receiver"] = (await receiver.command("stats"))["rss_mb"]
                nursery.cancel_scope.cancel()
    finally:
        receiver.close()
    speeds = [run["msgs_per_s"] for run in bulk_runs]
    results["msgs_per_s"] = statistics.median(speeds)
    results["msgs_per_s_runs"] = [round(s) for s in speeds]
    for key in bulk_runs[0]:
        if key != "msgs_per_s":
            results[key] = statistics.median(run[key] for run in bulk_runs)
    if separate_single:
        single_speeds = [run["msgs_per_s"] for run in single_runs]
        results["msgs_per_s_single_send"] = statistics.median(single_speeds)
        results["msgs_per_s_single_send_runs"] = [round(s) for s in single_speeds]
        for key in ("sender_cpu_us", "receiver_cpu_us", "sender_writer_cpu_us", "sender_writes_per_txn"):
            results[f"{key}_single_send"] = statistics.median(run[key] for run in single_runs)
    elif args.single_send:  # the headline runs are the single-send runs
        results["msgs_per_s_single_send"] = results["msgs_per_s"]
        results["msgs_per_s_single_send_runs"] = results["msgs_per_s_runs"]
        for key in ("sender_cpu_us", "receiver_cpu_us", "sender_writer_cpu_us", "sender_writes_per_txn"):
            results[f"{key}_single_send"] = results[key]
    results["ceiling_msgs_per_s"] = statistics.median(run[0] for run in pipe_runs)
    results["ceiling_msgs_per_s_runs"] = [round(run[0]) for run in pipe_runs]
    results["ceiling_sender_cpu_us"] = statistics.median(run[1] for run in pipe_runs)
    results["ceiling_receiver_cpu_us"] = statistics.median(run[2] for run in pipe_runs)
    results["ceiling_unbatched_msgs_per_s"] = statistics.median(unbatched_runs)
    results["ceiling_fraction"] = results["msgs_per_s"] / results["ceiling_msgs_per_s"]
    results["durable_floor_msgs_per_s"] = statistics.median(run[0] for run in floor_runs)
    results["durable_floor_msgs_per_s_runs"] = [round(run[0]) for run in floor_runs]
    results["durable_floor_sender_cpu_us"] = statistics.median(run[1] for run in floor_runs)
    results["durable_floor_receiver_cpu_us"] = statistics.median(run[2] for run in floor_runs)
    # What each side could sustain with a core of its own (its CPU per message): load-independent.
    results["cpu_bound_msgs_per_s"] = _per_core_rate(results["sender_cpu_us"], results["receiver_cpu_us"])
    results["ceiling_cpu_bound_msgs_per_s"] = _per_core_rate(
        results["ceiling_sender_cpu_us"], results["ceiling_receiver_cpu_us"]
    )
    results["durable_floor_cpu_bound_msgs_per_s"] = _per_core_rate(
        results["durable_floor_sender_cpu_us"], results["durable_floor_receiver_cpu_us"]
    )
    with contextlib.suppress(OSError):
        results["loadavg_1min"] = os.getloadavg()[0]
    results.update(
        n=args.n,
        repeat=args.repeat,
        concurrency=args.concurrency,
        batch=args.batch,
        bulk_mode=bulk_mode(args.batch, args.concurrency),
        receiver_subscribed=args.subscribed,
        single_send_concurrency=args.single_concurrency,
        window=args.window,
        idle_messages=args.idle,
        load_seconds=args.load_seconds,
        text_bytes=TEXT_SIZE,
        pipe_n=args.pipe_n,
        floor_n=args.floor_n,
        python=platform.python_version(),
        cpus=os.cpu_count(),
    )
    return results


async def run_profile(args: argparse.Namespace) -> dict[str, float | str]:
    """One bulk run with cProfile in both nodes' trio and writer threads; the .prof files go to ``--profile``."""
    directory = Path(args.profile).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    profiles = ThreadProfiles(directory, "sender")
    profiles.install()
    receiver = Receiver(profile_dir=str(directory), subscribed=args.subscribed)
    try:
        with sender_home() as home:
            async with trio.open_nursery() as nursery:
                node = await start_sender(home, nursery)
                bench = Bench(node, receiver, args)
                await node.chat.add_contact(receiver.invite, "receiver")
                await warm_up(bench, 200)
                await receiver.command("profile-start")
                profiles.start()
                result = await bench.bulk(args.n, args.batch, args.concurrency)
                profiles.stop()
                await node.db.write(lambda conn: None)  # the writer thread dumps its profile at its next request
                await receiver.command("profile-stop")
                nursery.cancel_scope.cancel()
    finally:
        receiver.close()
    return {**result, "profile_dir": str(directory)}


# ------------------------------------------------------------------------------------------------ breakdown


def _per_call(fn: Callable[[], object], calls: int, *, repeat: int = 5) -> float:
    """Best-of-``repeat`` CPU seconds of this thread per call of ``fn``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls)
    return best


@dataclasses.dataclass(frozen=True)
class SenderWrites:
    """How the sender's writer thread wrote a bulk run: requests per commit, and per store function the items per
    call and the share of the run's messages that went through it (counted by :class:`WriteCounts`)."""

    write_group: int
    enqueue_per_call: int
    sent_per_call: int
    sent_share: float
    delivered_per_call: int
    delivered_share: float


class WriteCounts:
    """Counts the calls of the store functions the chat service writes each message with, and their items, by
    wrapping them in :mod:`p2pmsg.store.repo` (the service looks them up there at each call) in this process."""

    NAMES = ("enqueue_rows", "mark_sent_many", "mark_delivered_ids")

    def __init__(self) -> None:
        self.calls = dict.fromkeys(self.NAMES, 0)
        self.items = dict.fromkeys(self.NAMES, 0)
        self._originals: dict[str, Callable[..., Any]] = {}

    def install(self) -> None:
        from p2pmsg.store import repo

        for name in self.NAMES:
            self._originals[name] = original = getattr(repo, name)
            setattr(repo, name, self._counting(name, original))

    def uninstall(self) -> None:
        from p2pmsg.store import repo

        for name, original in self._originals.items():
            setattr(repo, name, original)

    def _counting(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(conn: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(conn, *args, **kwargs)
            items = kwargs.get("rows", kwargs.get("message_ids", args[0] if args else ()))
            self.calls[name] += 1
            self.items[name] += len(items)
            return result

        return counted

    def shape(self, messages: int, write_group: int) -> SenderWrites:
        def per_call(name: str) -> int:
            return round(self.items[name] / self.calls[name]) if self.calls[name] else 0

        return SenderWrites(
            write_group=write_group,
            enqueue_per_call=max(1, per_call("enqueue_rows")),
            sent_per_call=per_call("mark_sent_many"),
            sent_share=self.items["mark_sent_many"] / messages,
            delivered_per_call=max(1, per_call("mark_delivered_ids")),
            delivered_share=self.items["mark_delivered_ids"] / messages,
        )


async def micro_breakdown(directory: Path, shape: SenderWrites, receive_group: int) -> list[Row]:
    """CPU per message of each piece of the hot path, measured alone: ``(side, piece, microseconds)``.

    Uses the product's own code: the envelope sealer, the session framing, the event hub, and the store's group-commit
    code (``_Writer._run_batch``, savepoints and all) on a real database file in ``directory``, run in this thread so
    that its CPU can be read.  The store pieces use the call sizes ``shape`` saw in the bulk run and the durability
    the chat service asks for (enqueue and incoming synced, ``synchronous=FULL``; the sent and delivered marks not).
    A piece whose name starts with spaces is part of the row above or a comparison, and not summed.
    """
    ack_group = shape.delivered_per_call
    write_group = shape.write_group
    import nacl.bindings

    from p2pmsg.chat import envelope as env
    from p2pmsg.chat.envelope import EnvelopeSealer, decode_envelope
    from p2pmsg.chat.protocol import ChatConnection
    from p2pmsg.control.server import EventHub
    from p2pmsg.identity import PeerId
    from p2pmsg.store import db as store_db
    from p2pmsg.store import repo
    from p2pmsg.store.migrations import MIGRATIONS

    rows: list[Row] = []

    def add(side: str, piece: str, seconds: float) -> None:
        rows.append((side, piece, seconds * 1e6))

    sealer, opener = EnvelopeSealer(SENDER), EnvelopeSealer(RECEIVER)
    to, frm = RECEIVER.peer_id, SENDER.peer_id
    text = text_of(1)
    now = int(time.time() * 1000)
    sealed = sealer.seal(to, text, ts=now)
    inner = {
        "v": env.MESSAGE_VERSION,
        "id": sealed.id,
        "from": frm.to_bytes(),
        "to": to.to_bytes(),
        "ts": now,
        "kind": "text",
        "text": text,
    }
    inner_raw = env.MESSAGE_SCHEMA.encode(inner)
    key = nacl.bindings.crypto_box_beforenm(to.x25519_public_key, bytes(SENDER.x25519_private_key))
    outer = {"v": env.ENVELOPE_VERSION, "id": sealed.id, "from": frm.to_bytes(), "to": to.to_bytes()}
    outer.update(nonce=sealed.nonce, box=sealed.box)
    raws = [sealer.seal(to, text_of(i), ts=now).raw for i in range(256)]
    ids = [os.urandom(16) for _ in range(ack_group)]

    def session() -> ChatConnection:
        conn = ChatConnection()
        conn.send_hello()
        return conn

    talker = ChatConnection()
    hello = talker.send_hello()
    msg_stream = hello + talker.send_messages(raws)
    ack_stream = hello + talker.send_ack(ids)
    per_msg_bytes = (len(msg_stream) - len(hello)) / 256
    chunk = os.urandom(65519)
    per_byte = _per_call(
        lambda: nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(chunk, None, bytes(12), bytes(32)), 500
    ) / len(chunk)
    hub = EventHub()
    mid_hex, to_text, frm_text = sealed.id.hex(), str(to), str(frm)
    frm_bytes = frm.to_bytes()

    def three_events() -> None:
        hub.publish(
            "message", id=mid_hex, peer_id=to_text, contact="r", sender=frm_text, text=text, ts=now, direction="out"
        )
        hub.publish("receipt", id=mid_hex, peer_id=to_text, status="sent")
        hub.publish("receipt", id=mid_hex, peer_id=to_text, status="delivered")

    # -- sender, trio thread
    texts = [text] * 100
    add(
        "sender trio",
        "seal (EnvelopeSealer.seal_many, 100 per call)",
        _per_call(lambda: sealer.seal_many(to, texts, ts=now), 50) / len(texts),
    )
    add("sender trio", "  for comparison: EnvelopeSealer.seal", _per_call(lambda: sealer.seal(to, text, ts=now), 5000))
    add("sender trio", "  os.urandom(36): id + nonce", _per_call(lambda: os.urandom(36), 20000))
    add("sender trio", "  inner MESSAGE_SCHEMA.encode", _per_call(lambda: env.MESSAGE_SCHEMA.encode(inner), 5000))
    add("sender trio", "    of which msgpack.packb", _per_call(lambda: msgpack.packb(inner, use_bin_type=True), 20000))
    add(
        "sender trio",
        "  Box: crypto_box_afternm",
        _per_call(lambda: nacl.bindings.crypto_box_afternm(inner_raw, sealed.nonce, key), 20000),
    )
    add(
        "sender trio",
        "  outer ENVELOPE_SCHEMA.encode",
        _per_call(lambda: env.ENVELOPE_SCHEMA.encode(outer, max_size=env.MAX_ENVELOPE_SIZE), 5000),
    )
    add(
        "sender trio",
        "msg framing (send_messages, 256/batch)",
        _per_call(lambda: session().send_messages(raws), 200) / 256,
    )
    add("sender trio", f"channel ChaCha20-Poly1305 ({per_msg_bytes:.0f} B)", per_byte * per_msg_bytes)
    add(
        "sender trio",
        f"ack parse (receive_data, {ack_group} ids/frame)",
        _per_call(lambda: ChatConnection().receive_data(ack_stream), 2000) / ack_group,
    )
    add("sender trio", "3 events published (no subscriber)", _per_call(three_events, 5000))

    # -- receiver, trio thread
    add(
        "receiver trio",
        "msg frames parsed (receive_data)",
        _per_call(lambda: ChatConnection().receive_data(msg_stream), 100) / 256,
    )
    add("receiver trio", "  of which decode_envelope", _per_call(lambda: decode_envelope(sealed.raw), 5000))
    add(
        "receiver trio",
        "    of which 2 x PeerId.from_bytes",
        2 * _per_call(lambda: PeerId.from_bytes(frm_bytes), 10000),
    )
    batch = [sealed] * 100
    add(
        "receiver trio",
        "open (EnvelopeSealer.open_many, 100 per call)",
        _per_call(lambda: opener.open_many(batch), 50) / len(batch),
    )
    add("receiver trio", "  for comparison: EnvelopeSealer.open", _per_call(lambda: opener.open(sealed), 5000))
    add(
        "receiver trio",
        "  Box: crypto_box_open_afternm",
        _per_call(lambda: nacl.bindings.crypto_box_open_afternm(sealed.box, sealed.nonce, key), 20000),
    )
    add(
        "receiver trio",
        "  inner MESSAGE_SCHEMA.decode",
        _per_call(lambda: env.MESSAGE_SCHEMA.decode(inner_raw, max_size=env.MAX_BOX_SIZE), 5000),
    )
    add("receiver trio", f"channel ChaCha20-Poly1305 ({per_msg_bytes:.0f} B)", per_byte * per_msg_bytes)
    add(
        "receiver trio",
        f"ack encode (send_ack, {ack_group} ids)",
        _per_call(lambda: session().send_ack(ids), 2000) / ack_group,
    )
    add(
        "receiver trio",
        "  for comparison: 1 event published (not built: nobody listens to the receiver)",
        _per_call(
            lambda: hub.publish(
                "message", id=mid_hex, peer_id=frm_text, contact="s", sender=frm_text, text=text, ts=now, direction="in"
            ),
            5000,
        ),
    )

    # -- SQLite: the store's group-commit code and connection, run in this thread
    writer = store_db._Writer(directory / "breakdown.db", max_batch=1000, migrations=MIGRATIONS)
    writer.open(None)
    task = trio.lowlevel.current_task()
    own, peer = frm.to_bytes(), to.to_bytes()
    counter = iter(range(1, 2**62))
    outbound: list[bytes] = []
    WriteFn = Callable[[Any], object]

    def timed(make: Callable[[], list[WriteFn]], groups: int, per_group: int, *, durable: bool = True) -> float:
        """CPU seconds per item: ``groups`` commits, each of the requests ``make()`` returns, ``per_group`` items."""
        total = 0.0
        for _ in range(groups):
            requests = [store_db._Request(fn, task, raw=False, durable=durable) for fn in make()]
            start = time.thread_time()
            completions = writer._run_batch(requests)
            total += time.thread_time() - start
            for _, result in completions:
                result.unwrap()
        return total / (groups * per_group)

    def enqueue_rows_fn(count: int) -> WriteFn:
        rows: list[repo.OutgoingRow] = []
        for _ in range(count):
            mid = next(counter).to_bytes(16, "big")
            outbound.append(mid)
            rows.append((mid, peer, own, text, now, None))
        return functools.partial(repo.enqueue_rows, rows=rows, now=now)

    def take(count: int) -> list[bytes]:
        taken = outbound[:count]
        del outbound[:count]
        return taken

    def incoming_fn() -> WriteFn:
        rows: list[repo.IncomingRow] = [
            (next(counter).to_bytes(16, "big"), own, None, text, now, False) for _ in range(receive_group)
        ]
        return functools.partial(repo.insert_incoming_rows, rows=rows, now=now)

    # The sender writer's pieces, each in calls of the size the bulk run made (``shape``, counted there), one call
    # per commit, with the durability the chat service asks for; a piece that only some messages needed is scaled
    # by that share.  Rows starting with spaces are for comparison and not summed.
    per_enqueue = shape.enqueue_per_call
    try:
        add(
            "sender writer",
            f"enqueue_rows, {per_enqueue} texts per call and commit (synced)",
            timed(lambda: [enqueue_rows_fn(per_enqueue)], max(20, 10_000 // per_enqueue), per_enqueue),
        )
        add(
            "sender writer",
            "  for comparison: enqueue_rows, 1 text per commit (a lone send)",
            timed(lambda: [enqueue_rows_fn(1)], 300, 1),
        )
        if shape.sent_per_call:
            per_sent = shape.sent_per_call
            groups = max(1, min(len(outbound) // (2 * per_sent), 5000 // per_sent))
            per_id = timed(
                lambda: [functools.partial(repo.mark_sent_many, message_ids=take(per_sent), now=now, retry_at=now + 1)],
                groups,
                per_sent,
                durable=False,
            )
            add(
                "sender writer",
                f"mark_sent_many, {per_sent} ids per call and commit (not synced), x {shape.sent_share:.2f}",
                per_id * shape.sent_share,
            )
        else:
            add("sender writer", "mark_sent_many: not called in the bulk run (resend time set at enqueue)", 0.0)
        per_delivered = shape.delivered_per_call
        groups = max(1, min(len(outbound) // per_delivered, 10_000 // per_delivered))
        per_id = timed(
            lambda: [
                functools.partial(repo.mark_delivered_ids, message_ids=take(per_delivered), recipient=peer, now=now)
            ],
            groups,
            per_delivered,
            durable=False,
        )
        add(
            "sender writer",
            f"mark_delivered_ids, {per_delivered} ids per call and commit (not synced), x {shape.delivered_share:.2f}",
            per_id * shape.delivered_share,
        )
        add(
            "receiver writer",
            f"insert_incoming_rows ({receive_group} per commit, synced)",
            timed(lambda: [incoming_fn()], 100, receive_group),
        )
        add("both writers", "an empty write transaction (BEGIN + COMMIT)", timed(lambda: [lambda c: None], 2000, 1))
    finally:
        writer.close(None)

    # -- the trio <-> writer-thread hand-off of one db.write (both threads' CPU)
    from p2pmsg.store.db import open_database

    async with open_database(directory / "handoff.db") as db:
        calls = 10000
        writer_tid = writer_thread_id()
        before = thread_cpu(os.getpid())
        for _ in range(calls):
            await db.write(lambda c: None)
        split = split_cpu(before, thread_cpu(os.getpid()), threading.get_native_id(), writer_tid)
        # Not summed below: one at a time, every call wakes the writer thread and then trio; in a bulk run the
        # requests of one commit share a wake-up, and each request carries a whole enqueue round or ack batch.
        add("hand-off", "db.write, one at a time (empty transaction): trio thread", split["main"] / calls)
        add("hand-off", "db.write, one at a time (empty transaction): writer thread", split["writer"] / calls)

        async def writes(count: int) -> None:
            for _ in range(count):
                await db.write(lambda c: None)

        if write_group > 1:  # as many requests at once as shared a commit in the bulk run
            before = thread_cpu(os.getpid())
            async with trio.open_nursery() as nursery:
                for _ in range(write_group):
                    nursery.start_soon(writes, calls // write_group)
            split = split_cpu(before, thread_cpu(os.getpid()), threading.get_native_id(), writer_tid)
            done = calls // write_group * write_group
            add("hand-off", f"db.write, {write_group} tasks at once: trio thread", split["main"] / done)
            add("hand-off", f"db.write, {write_group} tasks at once: writer thread", split["writer"] / done)

    # -- trio: waking a task that waits on an Event (what every hand-over and db.write completion costs)
    async def ping_pong(rounds: int) -> float:
        events = [trio.Event() for _ in range(2 * rounds + 1)]

        async def other() -> None:
            for i in range(1, 2 * rounds, 2):
                await events[i].wait()
                events[i + 1].set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.sleep(0)
            start = time.thread_time()
            for i in range(0, 2 * rounds, 2):
                events[i + 1].set()
                await events[i + 2].wait()
            elapsed = time.thread_time() - start
        return elapsed / (2 * rounds)

    add(
        "trio",
        "one task wake-up (Event.set -> wait returns)",
        min([await ping_pong(5000) for _ in range(3)]),
    )
    return rows


async def run_breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """One bulk run for the measured CPU per thread, then :func:`micro_breakdown` with the group sizes it saw."""
    receiver = Receiver(subscribed=args.subscribed)
    try:
        with sender_home() as home:
            async with trio.open_nursery() as nursery:
                node = await start_sender(home, nursery)
                bench = Bench(node, receiver, args)
                await node.chat.add_contact(receiver.invite, "receiver")
                await warm_up(bench, 200)
                counts = WriteCounts()
                counts.install()
                try:
                    measured = await bench.bulk(args.n, args.batch, args.concurrency)
                finally:
                    counts.uninstall()
                nursery.cancel_scope.cancel()
    finally:
        receiver.close()
    shape = counts.shape(args.n, max(1, round(measured["sender_writes_per_txn"])))
    receive_group = max(1, round(measured["receiver_msgs_per_txn"]))
    with tempfile.TemporaryDirectory(prefix="p2pmsg-bench-micro-") as name:
        rows = await micro_breakdown(Path(name), shape, receive_group)
    return {
        "measured": measured,
        "rows": rows,
        "write_group": shape.write_group,
        "receive_group": receive_group,
        "sender_writes": dataclasses.asdict(shape),
        "bulk_mode": bulk_mode(args.batch, args.concurrency),
    }


def print_breakdown(result: dict[str, Any]) -> None:
    measured = result["measured"]
    writes = result["sender_writes"]
    print(
        f"bulk run ({result['bulk_mode']}): {measured['msgs_per_s']:,.0f} msg/s; sender: "
        f"requests per transaction {result['write_group']}, enqueue_rows {writes['enqueue_per_call']} texts per call, "
        f"mark_sent_many {writes['sent_per_call']} ids per call for {writes['sent_share']:.0%} of the messages, "
        f"mark_delivered_ids {writes['delivered_per_call']} ids per call for {writes['delivered_share']:.0%}; "
        f"receiver: {result['receive_group']} messages per transaction"
    )
    print(
        "Each piece: CPU of this thread per message running the product's code alone (best of 5 for the codec and "
        "crypto pieces; the store pieces on a real database file, in calls of the bulk run's sizes above, one call "
        "per commit, synced as the chat service asks, scaled by the share of messages that needed them)."
    )
    threads = {
        "sender trio": measured["sender_main_cpu_us"],
        "sender writer": measured["sender_writer_cpu_us"],
        "receiver trio": measured["receiver_main_cpu_us"],
        "receiver writer": measured["receiver_writer_cpu_us"],
    }
    width = max(len(piece) for _, piece, _ in result["rows"]) + 2
    print(f"{'thread':<16}{'piece (CPU per message, measured alone)':<{width}}{'us':>8}")
    sums: dict[str, float] = {}
    for side, piece, micros in result["rows"]:
        print(f"{side:<16}{piece:<{width}}{micros:>8.2f}")
        if not piece.startswith(" ") and side in threads:
            sums[side] = sums.get(side, 0.0) + micros
    print()
    print(f"{'thread':<16}{'sum of pieces':>14}{'measured in the bulk run':>26}{'rest':>10}")
    for side, cpu in threads.items():
        total = sums.get(side, 0.0)
        print(f"{side:<16}{total:>14.1f}{cpu:>26.1f}{cpu - total:>10.1f}")
    print(
        "rest: what the pieces leave out (thread wake-ups and the trio <-> writer hand-off, event and session "
        "bookkeeping, switching synchronous between synced and unsynced commits)."
    )


def print_table(results: dict[str, Any]) -> None:
    print(
        f"p2pmsg messaging benchmark: {results['text_bytes']} B messages, bulk n={results['n']} x {results['repeat']} "
        f"({results['bulk_mode']}), load average {results.get('loadavg_1min', float('nan')):.2f} "
        f"on {results['cpus']} CPUs"
    )
    modes = {
        "msgs_per_s": bulk_mode(results["batch"], results["concurrency"]),
        "msgs_per_s_single_send": bulk_mode(1, results["single_send_concurrency"]),
        "latency_ms_p99_loaded": bulk_mode(1, results["single_send_concurrency"]) + ", probes by send",
        "durable_floor_msgs_per_s": f"not a target: the bare pipe + SQLite at both ends, n={results['floor_n']}",
    }
    print(f"{'metric':<26}{'measured':>14}  {'target':<18}mode")
    for key, target in TARGETS.items():
        if key not in results:
            continue
        value = results[key]
        if key == "ceiling_fraction":
            shown = f"{value * 100:.1f} %"
        elif "msgs_per_s" in key:
            shown = f"{value:,.0f} msg/s"
        elif key.startswith("rss"):
            shown = f"{value:.1f} MB"
        else:
            shown = f"{value:.2f} ms"
        print(f"{key:<26}{shown:>14}  {target:<18}{modes.get(key, '')}".rstrip())
    print(
        f"bulk runs (msg/s): {results['msgs_per_s_runs']}; ceiling runs: {results['ceiling_msgs_per_s_runs']}; "
        f"durable floor runs: {results['durable_floor_msgs_per_s_runs']}"
    )
    print(
        f"CPU per message ({results['bulk_mode']}): sender {results['sender_cpu_us']:.0f} us "
        f"(trio {results['sender_main_cpu_us']:.0f}, "
        f"SQLite writer {results['sender_writer_cpu_us']:.0f}, other {results['sender_other_cpu_us']:.0f}), "
        f"receiver {results['receiver_cpu_us']:.0f} us (trio {results['receiver_main_cpu_us']:.0f}, "
        f"SQLite writer {results['receiver_writer_cpu_us']:.0f}, other {results['receiver_other_cpu_us']:.0f})"
    )
    print(
        f"  -> {_rate_text(results['cpu_bound_msgs_per_s'])} if each node had a core to itself; the bare pipe: "
        f"{results['ceiling_sender_cpu_us']:.1f} / {results['ceiling_receiver_cpu_us']:.1f} us -> "
        f"{_rate_text(results['ceiling_cpu_bound_msgs_per_s'])}; the durable floor: "
        f"{results['durable_floor_sender_cpu_us']:.1f} / {results['durable_floor_receiver_cpu_us']:.1f} us -> "
        f"{_rate_text(results['durable_floor_cpu_bound_msgs_per_s'])}"
    )
    if "sender_cpu_us_single_send" in results:
        print(
            f"single-send runs (msg/s): {results['msgs_per_s_single_send_runs']}; CPU per message "
            f"({bulk_mode(1, results['single_send_concurrency'])}): sender "
            f"{results['sender_cpu_us_single_send']:.0f} us (SQLite writer "
            f"{results['sender_writer_cpu_us_single_send']:.0f}, {results['sender_writes_per_txn_single_send']:.1f} "
            f"writes per transaction), receiver {results['receiver_cpu_us_single_send']:.0f} us"
        )
    print(
        f"idle message: send() returned (durably queued) p50 {results['send_ms_p50']:.2f} ms, stored and published "
        f"by the receiver p50 {results['stored_ms_p50']:.2f} / p99 {results['stored_ms_p99']:.2f} ms after send()"
    )
    print(
        f"through the control API: send call p50 {results['control_send_ms_p50']:.2f} ms, to the delivered receipt "
        f"p50 {results['control_latency_ms_p50']:.2f} / p99 {results['control_latency_ms_p99']:.2f} ms"
    )
    print(
        f"bulk: queueing rate "
        f"{results['queue_msgs_per_s']:,.0f} msg/s; writes per transaction: sender "
        f"{results['sender_writes_per_txn']:.1f}, receiver {results['receiver_writes_per_txn']:.1f}"
    )
    print(
        f"loaded: window {results['window']}, {results['loaded_probes']} probes, p50 "
        f"{results['latency_ms_p50_loaded']:.1f} ms, {results['loaded_msgs_per_s']:,.0f} msg/s delivered meanwhile; "
        f"unbatched pipe {results['ceiling_unbatched_msgs_per_s']:,.0f} msg/s"
    )
    print(
        f"RSS: receiver idle {results['rss_mb_idle']:.1f} MB, after the runs {results['rss_mb_after_receiver']:.1f} MB;"
        f" sender process (node + benchmark) {results['rss_mb_idle_sender_process']:.1f} -> "
        f"{results['rss_mb_after_sender_process']:.1f} MB"
    )


def print_profile(directory: Path, top: int) -> None:
    for name in ("sender-main", "sender-writer", "receiver-main", "receiver-writer"):
        path = directory / f"{name}.prof"
        if not path.exists():
            print(f"(no {path})")
            continue
        print(f"==== {name}: top {top} by internal time")
        stats = pstats.Stats(str(path))
        stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=10_000, help="messages per bulk run (default 10000)")
    parser.add_argument("--repeat", type=int, default=3, help="bulk runs, median reported (default 3)")
    parser.add_argument(
        "--batch", type=int, default=100, help="texts per send_many call in the bulk runs (default 100; 1: send)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="tasks queueing in the bulk runs (default 4)")
    parser.add_argument(
        "--single-concurrency",
        type=int,
        default=64,
        help="tasks calling send in the single-send bulk runs and the loaded phase (default 64)",
    )
    parser.add_argument(
        "--no-single-send",
        dest="single_send",
        action="store_false",
        help="skip the single-send bulk runs (msgs_per_s_single_send)",
    )
    parser.add_argument("--idle", type=int, default=300, help="messages for the idle latency (default 300)")
    parser.add_argument("--load-seconds", type=float, default=10.0, help="duration of the loaded phase (default 10)")
    parser.add_argument("--window", type=int, default=256, help="undelivered messages under load (default 256)")
    parser.add_argument("--probe-interval", type=float, default=20.0, help="ms between probes (default 20)")
    parser.add_argument("--pipe-n", type=int, default=100_000, help="messages per ceiling run (default 100000)")
    parser.add_argument("--floor-n", type=int, help="messages per durable floor run (default half of --pipe-n, 50000)")
    parser.add_argument("--profile", metavar="DIR", help="profile one bulk run instead; .prof files go to DIR")
    parser.add_argument("--breakdown", action="store_true", help="CPU per message of each piece of the hot path")
    parser.add_argument("--top", type=int, default=40, help="rows per profile listing (default 40)")
    parser.add_argument(
        "--subscribed",
        action="store_true",
        help="the receiver node builds its message events as if a control client were subscribed (default: nobody"
        " listens to the receiver, so it builds none)",
    )
    parser.add_argument("--role", choices=["receiver", "pipe-sink", "floor-sink"], help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--contact", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "receiver":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's Ctrl-C; it closes our stdin instead
        trio.run(run_receiver, Path(args.home), args.contact, args.profile, args.subscribed)
        return
    if args.role == "pipe-sink":
        trio.run(run_pipe_sink, args.count)
        return
    if args.role == "floor-sink":
        trio.run(run_floor_sink, args.count, Path(args.home))
        return
    if args.floor_n is None:
        args.floor_n = max(1, args.pipe_n // 2)
    for name in ("n", "repeat", "concurrency", "single_concurrency", "batch", "idle", "window", "pipe_n", "floor_n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.load_seconds <= 0 or args.probe_interval <= 0:
        parser.error("--load-seconds and --probe-interval must be positive")
    if args.breakdown:
        breakdown = trio.run(run_breakdown, args)
        if args.json:
            print(json.dumps(breakdown, sort_keys=True))
        else:
            print_breakdown(breakdown)
        return
    if args.profile:
        result = trio.run(run_profile, args)
        if args.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print(json.dumps(result, indent=1, sort_keys=True))
            print_profile(Path(args.profile), args.top)
        return
    results = trio.run(run_all, args)
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        print_table(results)


if __name__ == "__main__":
    main()

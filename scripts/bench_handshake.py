#!/usr/bin/env python3
"""Benchmark: connection setup (TCP connect + Noise XX) and secure-channel throughput on loopback.

Usage: ``python scripts/bench_handshake.py [--json] [--n N] [--mib M] [--repeat R]``

* ``handshake_wall_ms_p50`` / ``_p99``: N sequential connections, each a TCP connect plus the full libp2p-noise XX
  handshake against a :class:`p2pmsg.net.listener.Listener`, both in this process; wall time until the dialer holds
  its channel.
* ``handshake_cpu_ms``: process CPU time over those N handshakes divided by N (both sides' work, one process).
* ``tcp_connect_ms_p50``: the same N connects with plain trio TCP and no handshake (the comparison floor).
* ``channel_mb_s``: M MiB written in 64 KiB ``send_all`` calls through a SecureChannel over TCP to a second process
  (this script re-run as a sink), until the sink acknowledges the last byte; the median of R transfers (each run is
  listed in ``channel_mb_s_runs``).  MB = 10^6 bytes.
* ``raw_tcp_mb_s``: the same transfers over plain trio TCP between two processes (``raw_tcp_mb_s_runs``), run
  alternately with the channel ones so both see the same machine load.

Prints one JSON object with ``--json``; otherwise a table with the targets and the py-libp2p figures measured on this
machine earlier.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import trio

from p2pmsg.identity import Identity
from p2pmsg.net.channel import SecureChannel, secure_inbound, secure_outbound
from p2pmsg.net.listener import Listener, ListenerConfig
from p2pmsg.net.transport import open_stream
from p2pmsg.wire.multiaddr import Multiaddr

DIALER = Identity.from_seed(bytes([0xA1]) * 32)
LISTENER = Identity.from_seed(bytes([0xB0]) * 32)
WRITE_SIZE = 64 * 1024
LOCAL = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")

TARGETS = {
    "handshake_wall_ms_p50": ("<= 5 ms", "251 ms per connection"),
    "handshake_wall_ms_p99": ("", ""),
    "handshake_cpu_ms": ("<= 2 ms", "16.8 ms"),
    "tcp_connect_ms_p50": ("(floor)", ""),
    "channel_mb_s": (">= 400 MB/s", "~124 MB/s"),
    "raw_tcp_mb_s": ("(ceiling)", ""),
}


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def _hold(channel: SecureChannel, remote: Multiaddr | None) -> None:
    await channel.receive_some()  # until the dialer closes


async def measure_handshakes(n: int) -> dict[str, float]:
    listener = Listener(LISTENER, _hold, ListenerConfig(handshake_timeout=10))
    async with trio.open_nursery() as nursery:
        (addr,) = await nursery.start(listener.run, [LOCAL])
        for _ in range(min(20, n)):  # warm-up: imports, caches, first-connection costs
            channel = await secure_outbound(await open_stream(addr, timeout=5), DIALER, LISTENER.peer_id)
            await channel.aclose()
        walls: list[float] = []
        cpu_start = time.process_time()
        for _ in range(n):
            start = time.perf_counter()
            stream = await open_stream(addr, timeout=5)
            channel = await secure_outbound(stream, DIALER, LISTENER.peer_id)
            walls.append(time.perf_counter() - start)
            await channel.aclose()
        cpu = time.process_time() - cpu_start
        with trio.fail_after(10):
            while listener.stats.active:
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    return {
        "handshake_wall_ms_p50": statistics.median(walls) * 1e3,
        "handshake_wall_ms_p99": percentile(walls, 0.99) * 1e3,
        "handshake_cpu_ms": cpu / n * 1e3,
    }


async def measure_tcp_connects(n: int) -> dict[str, float]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]

    async def close_at_once(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, close_at_once, [listener])
        walls: list[float] = []
        for _ in range(n):
            start = time.perf_counter()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            walls.append(time.perf_counter() - start)
            await stream.aclose()
        nursery.cancel_scope.cancel()
    return {"tcp_connect_ms_p50": statistics.median(walls) * 1e3}


# ------------------------------------------------------------------------------------------ two-process transfers


async def run_sink(mode: str, total: int) -> None:
    """Child process: accept one connection, read ``total`` bytes, acknowledge with one byte, exit."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listener.socket.getsockname()[1], flush=True)
    raw = await listener.accept()
    await listener.aclose()
    stream: trio.abc.Stream = raw
    if mode == "channel":
        stream = await secure_inbound(raw, LISTENER)
    received = 0
    cpu_start = time.process_time()
    while received < total:
        chunk = await stream.receive_some(256 * 1024)
        if not chunk:
            raise SystemExit(f"sink: stream ended after {received} of {total} bytes")
        received += len(chunk)
    cpu = time.process_time() - cpu_start
    await stream.send_all(b"!")
    await stream.aclose()
    print(cpu, flush=True)  # the receiver's CPU seconds for the transfer


def _spawn_sink(mode: str, total: int) -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--sink", mode, "--bytes", str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line.strip().isdigit():
        child.kill()
        raise SystemExit(f"sink did not report its port (got {line!r})")
    return child, int(line)


async def measure_transfer(mode: str, total: int) -> tuple[float, float, float]:
    """(MB/s, sender CPU ns/byte, receiver CPU ns/byte) for ``total`` bytes in 64 KiB writes to a sink process."""
    child, port = _spawn_sink(mode, total)
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if mode == "channel":
            stream = await secure_outbound(stream, DIALER, LISTENER.peer_id)
        block = os.urandom(WRITE_SIZE)
        writes = total // WRITE_SIZE
        start = time.perf_counter()
        cpu_start = time.process_time()
        for _ in range(writes):
            await stream.send_all(block)
        ack = await stream.receive_some(1)
        elapsed = time.perf_counter() - start
        sender_cpu = time.process_time() - cpu_start
        if ack != b"!":
            raise SystemExit(f"{mode} sink did not acknowledge (got {ack!r})")
        await stream.aclose()
        assert child.stdout is not None
        receiver_cpu = float(await trio.to_thread.run_sync(child.stdout.readline))
    finally:
        child.wait(timeout=30)
    return total / elapsed / 1e6, sender_cpu / total * 1e9, receiver_cpu / total * 1e9


async def run_all(n: int, mib: int, repeat: int) -> dict[str, Any]:
    total = mib * 1024 * 1024 // WRITE_SIZE * WRITE_SIZE
    results: dict[str, Any] = {}
    results.update(await measure_tcp_connects(n))
    results.update(await measure_handshakes(n))
    runs: dict[str, list[tuple[float, float, float]]] = {"raw": [], "channel": []}
    for _ in range(repeat):
        for mode in ("raw", "channel"):
            runs[mode].append(await measure_transfer(mode, total))
    for mode, prefix in (("raw", "raw_tcp"), ("channel", "channel")):
        speeds = [run[0] for run in runs[mode]]
        sender = statistics.median(run[1] for run in runs[mode])
        receiver = statistics.median(run[2] for run in runs[mode])
        results[f"{prefix}_mb_s"] = statistics.median(speeds)
        results[f"{prefix}_mb_s_runs"] = [round(value, 1) for value in speeds]
        results[f"{prefix}_sender_cpu_ns_per_byte"] = sender
        results[f"{prefix}_receiver_cpu_ns_per_byte"] = receiver
        # What the slower side could sustain with a core of its own: a load-independent ceiling.
        results[f"{prefix}_cpu_bound_mb_s"] = 1e3 / max(sender, receiver)
    with contextlib.suppress(OSError):
        results["loadavg_1min"] = os.getloadavg()[0]
    results["n"] = n
    results["transfer_bytes"] = total
    results["write_size"] = WRITE_SIZE
    results["python"] = platform.python_version()
    results["cpus"] = os.cpu_count()
    return results


def print_table(results: dict[str, Any]) -> None:
    print(
        f"p2pmsg handshake benchmark: n={results['n']}, transfers of {results['transfer_bytes'] / 2**20:.0f} MiB, "
        f"load average {results.get('loadavg_1min', float('nan')):.2f} on {results['cpus']} CPUs"
    )
    print(f"{'metric':<24}{'measured':>12}  {'target':<14}{'py-libp2p (here, earlier)'}")
    units = {"ms": "ms", "mb": "MB/s"}
    for key, (target, reference) in TARGETS.items():
        unit = units["mb"] if key.endswith("mb_s") else units["ms"]
        print(f"{key:<24}{results[key]:>9.2f} {unit:<4} {target:<14}{reference}")
    print(f"transfer runs (MB/s): channel {results['channel_mb_s_runs']}, raw TCP {results['raw_tcp_mb_s_runs']}")
    for prefix, name in (("channel", "channel"), ("raw_tcp", "raw TCP")):
        print(
            f"{name} CPU per byte: sender {results[prefix + '_sender_cpu_ns_per_byte']:.2f} ns, receiver "
            f"{results[prefix + '_receiver_cpu_ns_per_byte']:.2f} ns -> {results[prefix + '_cpu_bound_mb_s']:.0f} MB/s "
            "if each side had a core to itself"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=300, help="connections to time (default 300)")
    parser.add_argument("--mib", type=int, default=256, help="MiB per throughput transfer (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="transfers per mode, median reported (default 3)")
    parser.add_argument("--sink", choices=["raw", "channel"], help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        trio.run(run_sink, args.sink, args.bytes)
        return
    if args.n < 1 or args.mib < 1 or args.repeat < 1:
        parser.error("--n, --mib and --repeat must be positive")
    results = trio.run(run_all, args.n, args.mib, args.repeat)
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        print_table(results)


if __name__ == "__main__":
    main()

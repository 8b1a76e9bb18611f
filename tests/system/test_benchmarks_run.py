"""Every benchmark script runs end to end on a tiny workload and prints the figures it promises.

Tests do not time anything (speed is measured by the scripts themselves, see ``docs/benchmarks.md``); this only
keeps the scripts working as the code they drive changes (a benchmark that silently measures a function the product
no longer calls, as ``--breakdown`` once did, is worse than none).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

CASES = {
    "handshake": (
        ["bench_handshake.py", "--json", "--n", "10", "--mib", "2", "--repeat", "1"],
        ["handshake_wall_ms_p50", "channel_mb_s", "raw_tcp_mb_s"],
    ),
    "messaging": (
        [
            "bench_messaging.py",
            "--json",
            "--n",
            "300",
            "--repeat",
            "1",
            "--no-single-send",
            "--idle",
            "10",
            "--load-seconds",
            "0.5",
            "--pipe-n",
            "600",
        ],
        ["msgs_per_s", "ceiling_msgs_per_s", "durable_floor_msgs_per_s", "latency_ms_p50", "rss_mb_idle"],
    ),
    "messaging-breakdown": (
        ["bench_messaging.py", "--breakdown", "--json", "--n", "300"],
        ["rows", "measured", "sender_writes"],
    ),
    "chat-pipe": (
        ["bench_chat_pipe.py", "--json", "--n", "200", "--sends", "2"],
        ["pipe_msgs_per_s", "send_msgs_per_s"],
    ),
    "store": (
        ["bench_store.py", "--json", "--n", "300", "--history", "300", "--repeat", "1"],
        ["time_prefixed_history300_sender_cpu_us", "random_history0_receiver_written_kb"],
    ),
    "store-one-at-a-time": (
        ["bench_store.py", "--json", "--one-at-a-time", "20", "--repeat", "1"],
        ["one_at_a_time_page16384_sender_written_kb", "one_at_a_time_page4096_receiver_written_kb"],
    ),
    "store-page-size": (
        ["bench_store.py", "--json", "--one-at-a-time", "20", "--repeat", "1", "--page-size", "8192"],
        ["one_at_a_time_page16384_sender_written_kb", "one_at_a_time_page8192_receiver_written_kb"],
    ),
    "dht": (["bench_dht.py", "--json", "--sizes", "20", "--lookups", "20"], ["20"]),
}


def _run(args: list[str], timeout: float = 240) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_benchmark_script_runs_and_prints_its_figures(case: str) -> None:
    args, keys = CASES[case]
    figures = json.loads(_run(args))
    missing = [key for key in keys if key not in figures]
    assert not missing, f"{args[0]} printed no {missing}"
    for key in keys:
        value = figures[key]
        if isinstance(value, int | float):
            assert value > 0, f"{args[0]}: {key} = {value}"
    if case == "messaging-breakdown":  # every piece of the hot path was measured, none is zero by accident
        assert figures["sender_writes"]["enqueue_per_call"] > 1, "the breakdown did not see the enqueue calls"
    if case == "dht":  # on a tiny swarm (nearly) every lookup of both implementations finds its value
        size = figures["20"]
        ratios = [size["p2pmsg"][key] for key in ("found_ratio", "signed_found_ratio", "signed_repeat_found_ratio")]
        assert min([*ratios, size["kademlia"]["found_ratio"]]) > 0.5, size
        assert size["p2pmsg"]["lookup_ms_p50"] > 0 and size["kademlia"]["lookup_ms_p50"] > 0


@pytest.mark.parametrize("role", ["pair", "ceiling"])
def test_instruction_benchmark_workloads_run(role: str) -> None:
    """bench_instructions.py runs these under valgrind; here they run bare (the counting itself needs valgrind)."""
    _run(["bench_instructions.py", "--role", role, "--n", "50"])


def test_a_run_too_short_to_see_cpu_gives_no_per_core_rate() -> None:
    """The kernel accounts CPU in 10 ms ticks: a short run (as in the test above) can see none on either side, and
    the script then divided by zero (a fresh-clone `make test` failed so once)."""
    spec = importlib.util.spec_from_file_location("bench_messaging_module", SCRIPTS / "bench_messaging.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert module._per_core_rate(0.0, 0.0) is None
    assert module._per_core_rate(40.0, 50.0) == 20_000
    assert module._rate_text(None) == "(too short to measure)"

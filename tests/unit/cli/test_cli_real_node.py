"""`p2pmsg run` as a real process: the CLI finds it through its control socket, and SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from p2pmsg.cli.main import EXIT_NOT_RUNNING, cli
from p2pmsg.control import control_socket_path

BIN = Path(sys.executable).parent / "p2pmsg"


@pytest.fixture
def home() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="p2prun-"))
    try:
        yield parent / "h"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def cli_run(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--home", str(home), *args], env={"P2PMSG_PASSPHRASE": None})
    return result.exit_code, result.output


@pytest.mark.skipif(not BIN.exists(), reason=f"{BIN} is not installed (pip install -e .)")
def test_run_serves_the_cli_and_stops_on_sigterm(home: Path) -> None:
    assert cli_run(home, "init", "--no-passphrase", "--listen", "/ip4/127.0.0.1/tcp/0")[0] == 0
    env = {**os.environ, "P2PMSG_HOME": str(home)}
    env.pop("P2PMSG_PASSPHRASE", None)
    node = subprocess.Popen(
        [str(BIN), "run", "--no-passphrase", "--log-level", "warning"], env=env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 15
        code, output = cli_run(home, "status", "--json")
        while code == EXIT_NOT_RUNNING and time.monotonic() < deadline and node.poll() is None:
            time.sleep(0.1)
            code, output = cli_run(home, "status", "--json")
        assert code == 0, output
        status = json.loads(output)
        assert "dht size      0 (no DHT node answered" in cli_run(home, "status")[1]  # no bootstrap peers here
        code, output = cli_run(home, "id", "--json")
        assert code == 0 and json.loads(output)["peer_id"] == status["peer_id"]
        assert json.loads(output)["invite"].startswith(f"p2pmsg://invite/{status['peer_id']}")
        # A second node on the same home is refused, and the first one keeps running.
        second = subprocess.run(
            [str(BIN), "run", "--no-passphrase"], env=env, capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 1 and "another node is already running" in second.stderr
        assert node.poll() is None
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            _, stderr = node.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            node.kill()
            node.communicate()
            raise
    assert node.returncode == 0, stderr.decode(errors="replace")
    assert not control_socket_path(home).exists()
    assert cli_run(home, "status")[0] == EXIT_NOT_RUNNING


@pytest.mark.skipif(not BIN.exists(), reason=f"{BIN} is not installed (pip install -e .)")
def test_a_second_signal_during_the_shutdown_changes_nothing(home: Path) -> None:
    """QA: `timeout` sends its signal on twice, and Ctrl-C is often pressed twice: the second raised
    KeyboardInterrupt in the middle of the shutdown (a traceback, once TrioInternalError, exit status 1)."""
    assert cli_run(home, "init", "--no-passphrase", "--listen", "/ip4/127.0.0.1/tcp/0")[0] == 0
    env = {**os.environ, "P2PMSG_HOME": str(home)}
    env.pop("P2PMSG_PASSPHRASE", None)
    node = subprocess.Popen([str(BIN), "run", "--no-passphrase"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while cli_run(home, "status")[0] != 0 and time.monotonic() < deadline and node.poll() is None:
            time.sleep(0.1)
        assert node.poll() is None
        node.send_signal(signal.SIGINT)
        node.send_signal(signal.SIGTERM)  # at once: the shutdown has barely begun
        _, raw = node.communicate(timeout=30)
    finally:
        if node.poll() is None:
            node.kill()
            node.communicate()
    stderr = raw.decode(errors="replace")
    assert node.returncode == 0, stderr
    assert "Traceback" not in stderr
    # Either may be taken first.
    assert re.search(r"received SIG(INT|TERM), shutting down", stderr), stderr
    assert re.search(r"received SIG(INT|TERM) again; still shutting down", stderr), stderr
    assert "node stopped" in stderr
    assert not control_socket_path(home).exists()

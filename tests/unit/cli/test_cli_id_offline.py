"""`p2pmsg id` with no node running: the identity from the key file, the addresses from config.toml."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from p2pmsg.chat.invite import parse_target
from p2pmsg.cli.main import EXIT_NOT_RUNNING, cli


@pytest.fixture
def home() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="p2pid-"))
    try:
        yield parent / "home"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def run_cli(home: Path, *args: str, passphrase: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], env={"P2PMSG_PASSPHRASE": passphrase})


def test_id_without_a_node_reads_the_key_file_and_the_configured_addresses(home: Path) -> None:
    init = run_cli(home, "init", "--listen", "/ip4/127.0.0.1/tcp/4567", passphrase="correct horse")
    assert init.exit_code == 0, init.output
    result = run_cli(home, "id", "--json", passphrase="correct horse")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["running"] is False
    assert info["addrs"] == [f"/ip4/127.0.0.1/tcp/4567/p2p/{info['peer_id']}"]
    target = parse_target(info["invite"])
    assert str(target.peer_id) == info["peer_id"] and [str(a) for a in target.addrs] == ["/ip4/127.0.0.1/tcp/4567"]
    text = run_cli(home, "id", "--no-qr", passphrase="correct horse")
    assert "no node runs on" in text.stderr and f"peer id  {info['peer_id']}" in text.stdout


def test_id_without_a_node_needs_the_passphrase_and_says_when_the_port_is_not_known_yet(home: Path) -> None:
    assert run_cli(home, "init", "--listen", "/ip4/127.0.0.1/tcp/0", passphrase="correct horse").exit_code == 0
    wrong = run_cli(home, "id", passphrase="battery staple")
    assert wrong.exit_code == 1 and "wrong passphrase" in wrong.stderr
    result = run_cli(home, "id", "--no-qr", passphrase="correct horse")
    assert result.exit_code == 0, result.output
    assert "known once the node runs" in result.stdout


def test_id_without_a_node_or_an_identity_says_how_to_make_one(home: Path) -> None:
    result = run_cli(home, "id")
    assert result.exit_code == EXIT_NOT_RUNNING and "p2pmsg --home" in result.stderr and "init" in result.stderr

"""``p2pmsg init`` and ``p2pmsg run``: files and modes, refusing to overwrite, passphrases, config errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import stat
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner, Result

from p2pmsg.cli.config import CONFIG_FILENAME, Config, load_config
from p2pmsg.cli.main import IDENTITY_FILENAME, cli
from p2pmsg.control import ControlServer, control_socket_path
from p2pmsg.identity import Identity, load_identity
from p2pmsg.store.db import DATABASE_FILENAME
from p2pmsg.store.migrations import LATEST_VERSION


@pytest.fixture
def home() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="p2pinit-"))
    try:
        yield parent / "home"  # does not exist yet: init creates it
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def run_cli(home: Path, *args: str, passphrase: str | None = None, input: str | None = None) -> Result:
    env: dict[str, str | None] = {
        "P2PMSG_PASSPHRASE": passphrase
    }  # None: unset, whatever the environment running the tests has
    return CliRunner().invoke(cli, ["--home", str(home), *args], env=env, input=input)


def started_nodes(monkeypatch: pytest.MonkeyPatch) -> list[Identity]:
    """Stand in for ``p2pmsg.node``: ``run`` hands its identity to this list instead of starting a node."""
    calls: list[Identity] = []
    node = types.ModuleType("p2pmsg.node")
    node.run_node = lambda home, identity, config: calls.append(identity)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p2pmsg.node", node)
    return calls


def peer_id_in(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("peer id")]
    return line.split()[-1]


def test_init_creates_a_private_home_key_and_config(home: Path) -> None:
    result = run_cli(home, "init", "--listen", "/ip4/127.0.0.1/tcp/4100", "--bootstrap", "/ip4/192.0.2.1/tcp/4001",
                     "--accept-from", "anyone", "--dht-port", "4101", passphrase="correct horse")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    key = home / IDENTITY_FILENAME
    config = home / CONFIG_FILENAME
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    database = home / DATABASE_FILENAME  # created with its schema, so `run` can tell when it went missing
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    with contextlib.closing(sqlite3.connect(database)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (LATEST_VERSION,)
    assert load_config(config) == Config(
        listen=["/ip4/127.0.0.1/tcp/4100"], bootstrap=["/ip4/192.0.2.1/tcp/4001"], accept_from="anyone", dht_port=4101
    )
    # A fresh load with the right passphrase gives the identity init announced.
    identity = load_identity(key, "correct horse")
    assert str(identity.peer_id) == peer_id_in(result.output)
    assert f"p2pmsg --home {home} run" in result.output


def test_init_refuses_to_overwrite_an_identity(home: Path) -> None:
    assert run_cli(home, "init", "--no-passphrase").exit_code == 0
    key = home / IDENTITY_FILENAME
    before = key.read_bytes()
    again = run_cli(home, "init", "--no-passphrase")
    assert again.exit_code == 1
    assert "already has an identity" in again.output and "refusing to overwrite" in again.output
    assert key.read_bytes() == before


def test_init_without_passphrase_and_with_defaults(home: Path) -> None:
    result = run_cli(home, "init", "--no-passphrase")
    assert result.exit_code == 0
    identity = load_identity(home / IDENTITY_FILENAME, None, allow_unencrypted=True)
    assert str(identity.peer_id) == peer_id_in(result.output)
    assert load_config(home / CONFIG_FILENAME) == Config()


def test_init_keeps_an_existing_config_and_tightens_the_home(home: Path) -> None:
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    (home / CONFIG_FILENAME).write_text('accept_from = "anyone"\n')
    result = run_cli(home, "init", "--no-passphrase")
    assert result.exit_code == 0
    assert "kept the existing" in result.output
    assert load_config(home / CONFIG_FILENAME).accept_from == "anyone"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_init_refuses_a_directory_that_holds_other_files(home: Path) -> None:
    """QA: init on a shared directory (mode 1777, other files in it) made it 0700 without a word: `--home /tmp init`
    as root would lock everyone else out of /tmp."""
    home.mkdir()
    home.chmod(0o1777)
    (home / "notes.txt").write_text("someone else's")
    result = run_cli(home, "init", "--no-passphrase")
    assert result.exit_code == 1
    assert f"error: {home} already holds other files (notes.txt)" in result.output
    assert "nothing was changed" in result.output
    assert stat.S_IMODE(home.stat().st_mode) == 0o1777
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]


def test_init_accepts_a_service_user_s_home_with_its_dotfiles(home: Path) -> None:
    """The systemd unit's steps make the home with `useradd --create-home`, which copies /etc/skel into it: init
    refused it for .bashrc and .profile.  A backup of config.toml is the node's own too."""
    home.mkdir()
    home.chmod(0o755)
    for name in (".bashrc", ".profile", "config.toml~"):
        (home / name).write_text("")
    result = run_cli(home, "init", "--no-passphrase")
    assert result.exit_code == 0, result.output
    assert (home / IDENTITY_FILENAME).exists()


def test_init_refuses_hidden_files_in_a_directory_others_may_write_to(home: Path) -> None:
    home.mkdir()
    home.chmod(0o1777)
    (home / ".X11-unix").mkdir()
    result = run_cli(home, "init", "--no-passphrase", passphrase="never asked")
    assert result.exit_code == 1 and "already holds other files (.X11-unix)" in result.output
    assert stat.S_IMODE(home.stat().st_mode) == 0o1777


def test_init_says_when_it_makes_an_existing_empty_directory_private(home: Path) -> None:
    home.mkdir()
    home.chmod(0o755)
    result = run_cli(home, "init", "--no-passphrase")
    assert result.exit_code == 0
    assert f"made {home} private (mode 0700; it was 0755)" in result.output
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_an_empty_home_is_refused_not_taken_for_the_current_directory(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--home "$DIR"` with DIR unset initialised (and made private) the current directory."""
    home.mkdir()
    monkeypatch.chdir(home)
    result = CliRunner().invoke(cli, ["--home", "", "init", "--no-passphrase"])
    assert result.exit_code == 2
    assert "Invalid value for --home: is empty; name the node's directory" in result.output
    assert list(home.iterdir()) == []


def test_init_refuses_a_home_too_deep_for_the_control_socket(home: Path) -> None:
    """QA: init made such a home, and then `run`, `status` and `id` all failed on the socket path."""
    deep = home / ("d" * 100)
    result = run_cli(deep, "init", "--no-passphrase")
    assert result.exit_code == 1
    assert "longer than the 107 a Unix socket allows; use a shorter --home; nothing was created" in result.output
    assert not home.exists()


def test_init_writes_only_the_config_a_home_with_an_identity_lost(home: Path) -> None:
    """QA: `run` said "create one with `p2pmsg init`", and init then refused, as the identity exists."""
    assert run_cli(home, "init", "--no-passphrase").exit_code == 0
    key = (home / IDENTITY_FILENAME).read_bytes()
    (home / CONFIG_FILENAME).unlink()
    result = run_cli(home, "init", "--no-passphrase", "--listen", "/ip4/127.0.0.1/tcp/4100")
    assert result.exit_code == 0, result.output
    assert "kept it, and wrote the missing" in result.output
    assert (home / IDENTITY_FILENAME).read_bytes() == key
    assert load_config(home / CONFIG_FILENAME).listen == ["/ip4/127.0.0.1/tcp/4100"]
    again = run_cli(home, "init", "--no-passphrase")  # with both there: refused, as before
    assert again.exit_code == 1 and "refusing to overwrite it" in again.output


def test_init_with_a_bad_address_creates_nothing(home: Path) -> None:
    result = run_cli(home, "init", "--no-passphrase", "--listen", "/ip4/1.2.3.4/udp/1")
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "can only listen on tcp or ws" in result.output
    assert "nothing was created" in result.output and "config.toml" not in result.output  # it was never written
    assert not home.exists()


def test_init_where_a_file_is_in_the_way(home: Path) -> None:
    home.write_text("not a directory")
    result = run_cli(home, "init", "--no-passphrase")
    assert result.exit_code == 2 and "is a file" in result.output and "Traceback" not in result.output


def test_init_refuses_an_empty_passphrase(home: Path) -> None:
    """It said "use passphrase=None with allow_unencrypted=True" (the library's words) and left the home behind."""
    fresh = home / "new"
    for result in (run_cli(fresh, "init", passphrase=""), run_cli(fresh, "init", input="\n\n")):
        assert result.exit_code == 1 and result.output.startswith("error: the passphrase is empty"), result.output
        assert "init --no-passphrase" in result.output and "allow_unencrypted" not in result.output
        assert not fresh.exists()


def test_init_asks_for_the_passphrase_twice(home: Path) -> None:
    mismatch = run_cli(home, "init", input="one\ntwo\n")
    assert mismatch.exit_code == 1 and "differ" in mismatch.output
    assert not (home / IDENTITY_FILENAME).exists()
    typed = run_cli(home, "init", input="typed secret\ntyped secret\n")
    assert typed.exit_code == 0, typed.output
    assert "typed secret" not in typed.output  # no echo
    assert str(load_identity(home / IDENTITY_FILENAME, "typed secret").peer_id) == peer_id_in(typed.output)


def test_run_loads_an_unencrypted_key_only_on_request(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = started_nodes(monkeypatch)
    assert run_cli(home, "init", "--no-passphrase").exit_code == 0
    refused = run_cli(home, "run")
    assert refused.exit_code == 1 and "is not encrypted" in refused.output and "run --no-passphrase" in refused.output
    assert calls == []
    assert run_cli(home, "run", "--no-passphrase").exit_code == 0
    assert run_cli(home, "run", passphrase="").exit_code == 0  # an empty $P2PMSG_PASSPHRASE says the same
    assert len(calls) == 2 and calls[0] == calls[1] == load_identity(
        home / IDENTITY_FILENAME, None, allow_unencrypted=True
    )


def test_run_takes_the_passphrase_from_a_file(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = started_nodes(monkeypatch)
    assert run_cli(home, "init", passphrase="from a file").exit_code == 0
    secret = home.parent / "passphrase"
    secret.write_text("from a file\n")
    env: dict[str, str | None] = {"P2PMSG_PASSPHRASE": None, "P2PMSG_PASSPHRASE_FILE": str(secret)}
    result = CliRunner().invoke(cli, ["--home", str(home), "run"], env=env, input="")
    assert result.exit_code == 0, result.output
    assert calls == [load_identity(home / IDENTITY_FILENAME, "from a file")]
    secret.write_text("wrong\n")
    wrong = CliRunner().invoke(cli, ["--home", str(home), "run"], env=env, input="")
    assert wrong.exit_code == 1 and "wrong passphrase" in wrong.output
    env["P2PMSG_PASSPHRASE_FILE"] = str(home.parent / "missing")
    missing = CliRunner().invoke(cli, ["--home", str(home), "run"], env=env, input="")
    assert missing.exit_code == 1 and "P2PMSG_PASSPHRASE_FILE" in missing.output and "cannot read" in missing.output
    env["P2PMSG_PASSPHRASE_FILE"] = str(secret)
    secret.write_text("\n")
    empty = CliRunner().invoke(cli, ["--home", str(home), "run"], env=env, input="")
    # What is wrong and where the file was named, without the list of other sources (this one was given).
    assert empty.exit_code == 1
    assert empty.output == (
        f"error: passphrase file {secret} (from $P2PMSG_PASSPHRASE_FILE): empty (write the key file's passphrase "
        "into it)\n"
    )
    env["P2PMSG_PASSPHRASE_FILE"] = None
    env["CREDENTIALS_DIRECTORY"] = str(home.parent)  # systemd's LoadCredential=p2pmsg-passphrase:...
    (home.parent / "p2pmsg-passphrase").write_text("")
    credential = CliRunner().invoke(cli, ["--home", str(home), "run"], env=env, input="")
    assert credential.exit_code == 1
    assert "(from the systemd credential p2pmsg-passphrase): empty" in credential.output


def test_run_reads_a_passphrase_pipe_once(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``P2PMSG_PASSPHRASE_FILE=<(pass show p2pmsg) p2pmsg run``: the file is a pipe that can be read only once (found
    in review: the first read, for the unencrypted-key check, emptied it and the second said "empty")."""
    calls = started_nodes(monkeypatch)
    assert run_cli(home, "init", passphrase="piped").exit_code == 0
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b"piped\n")
        os.close(write_fd)
        env: dict[str, str | None] = {"P2PMSG_PASSPHRASE": None, "P2PMSG_PASSPHRASE_FILE": f"/proc/self/fd/{read_fd}"}
        result = CliRunner().invoke(cli, ["--home", str(home), "run"], env=env, input="")
    finally:
        os.close(read_fd)
    assert result.exit_code == 0, result.output
    assert calls == [load_identity(home / IDENTITY_FILENAME, "piped")]


def test_run_with_a_wrong_passphrase(home: Path) -> None:
    assert run_cli(home, "init", passphrase="right").exit_code == 0
    result = run_cli(home, "run", passphrase="wrong")
    assert result.exit_code == 1
    assert result.output == f"error: wrong passphrase for {home / IDENTITY_FILENAME}\n"


def test_run_without_identity_or_with_a_broken_config(home: Path) -> None:
    missing = run_cli(home, "run")
    assert missing.exit_code == 1 and f"p2pmsg --home {home} init" in missing.output
    assert run_cli(home, "init", "--no-passphrase").exit_code == 0
    (home / CONFIG_FILENAME).write_text("listen = [1]\n")
    broken = run_cli(home, "run")
    assert broken.exit_code == 1
    assert "config.toml: listen[0]: must be a multiaddr string" in broken.output


def test_run_with_an_encrypted_key_and_no_passphrase_source(home: Path) -> None:
    assert run_cli(home, "init", passphrase="pw").exit_code == 0
    # No $P2PMSG_PASSPHRASE and the prompt gets end of input.
    result = run_cli(home, "run", input="")
    assert result.exit_code == 1 and "P2PMSG_PASSPHRASE" in result.output


async def test_run_refuses_when_a_node_already_runs_there(home: Path) -> None:
    initialised = await trio.to_thread.run_sync(run_cli, home, "init", "--no-passphrase")  # init runs trio itself
    assert initialised.exit_code == 0
    server = ControlServer(control_socket_path(home), {})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        result = await trio.to_thread.run_sync(run_cli, home, "run")
        nursery.cancel_scope.cancel()
    assert result.exit_code == 1 and "another node is already running" in result.output


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_run_hands_home_identity_and_config_to_the_node(
    home: Path, monkeypatch: pytest.MonkeyPatch, is_async: bool
) -> None:
    # p2pmsg.node is written by someone else; a stand-in module records what `run` hands it.
    calls: list[tuple[Any, ...]] = []
    node = types.ModuleType("p2pmsg.node")
    if is_async:

        async def run_node(home: Path, identity: Identity, config: Config) -> None:
            await trio.sleep(0)
            calls.append((home, identity, config))

    else:

        def run_node(home: Path, identity: Identity, config: Config) -> None:  # type: ignore[misc]
            calls.append((home, identity, config))

    node.run_node = run_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p2pmsg.node", node)
    init = run_cli(home, "init", "--no-passphrase", "--listen", "/ip4/127.0.0.1/tcp/4100")
    result = run_cli(home, "run", "--no-passphrase")
    assert result.exit_code == 0, result.output
    ((got_home, identity, config),) = calls
    assert got_home == home
    assert str(identity.peer_id) == peer_id_in(init.output)
    assert config == Config(listen=["/ip4/127.0.0.1/tcp/4100"])


def test_bootstrap_refuses_a_non_udp_address(home: Path) -> None:
    result = run_cli(home, "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/4001")
    assert result.exit_code == 1 and "listens on UDP" in result.output
    bad_peer = run_cli(home, "bootstrap", "--bootstrap", "/ip4/1.2.3.4")
    assert bad_peer.exit_code == 1 and "not a usable multiaddr" in bad_peer.output
    assert not home.exists()


def test_bootstrap_creates_then_reuses_its_identity(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    async def run_bootstrap_node(identity: Identity, listen: Any, *, bootstrap: Any, on_ready: Any) -> None:
        calls.append((identity, str(listen), list(bootstrap)))
        on_ready(listen.with_peer_id(identity.peer_id))

    node = types.ModuleType("p2pmsg.node")
    node.run_bootstrap_node = run_bootstrap_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p2pmsg.node", node)
    peer = "/ip4/192.0.2.1/udp/4001"
    first = run_cli(home, "bootstrap", "--listen", "/ip4/127.0.0.1/udp/4999", "--bootstrap", peer)
    second = run_cli(home, "bootstrap", "--listen", "/ip4/127.0.0.1/udp/4999")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    (one, listen, peers), (two, _, no_peers) = calls
    assert one == two == load_identity(home / IDENTITY_FILENAME, None, allow_unencrypted=True)
    assert (listen, peers, no_peers) == ("/ip4/127.0.0.1/udp/4999", [peer], [])
    assert f"bootstrap node listening on /ip4/127.0.0.1/udp/4999/p2p/{one.peer_id}" in first.output
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_bootstrap_runs_on_an_encrypted_identity_with_its_passphrase(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its help says the key may be encrypted (`p2pmsg init` first): the passphrase is taken as for `run`."""
    calls: list[Identity] = []

    async def run_bootstrap_node(identity: Identity, listen: Any, *, bootstrap: Any, on_ready: Any) -> None:
        calls.append(identity)

    node = types.ModuleType("p2pmsg.node")
    node.run_bootstrap_node = run_bootstrap_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p2pmsg.node", node)
    assert run_cli(home, "init", passphrase="secret").exit_code == 0
    ok = run_cli(home, "bootstrap", "--listen", "/ip4/127.0.0.1/udp/4999", passphrase="secret")
    assert ok.exit_code == 0, ok.output
    assert calls == [load_identity(home / IDENTITY_FILENAME, "secret")]
    wrong = run_cli(home, "bootstrap", "--listen", "/ip4/127.0.0.1/udp/4999", passphrase="typo")
    assert wrong.exit_code == 1 and "wrong passphrase" in wrong.output
    empty = run_cli(home, "bootstrap", "--listen", "/ip4/127.0.0.1/udp/4999", passphrase="")
    assert empty.exit_code == 1 and "$P2PMSG_PASSPHRASE is set and empty" in empty.output
    assert len(calls) == 1


def test_run_with_no_passphrase_on_an_encrypted_key_says_so(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = started_nodes(monkeypatch)
    assert run_cli(home, "init", passphrase="secret").exit_code == 0
    refused = run_cli(home, "run", "--no-passphrase", input="secret\n")
    assert refused.exit_code == 1 and "is encrypted: start without --no-passphrase" in refused.output
    assert "Warning" not in refused.output and calls == []
    # Piped on stdin (no terminal): one line is read, without getpass's "can not control echo" warning.
    piped = run_cli(home, "run", input="secret\n")
    assert piped.exit_code == 0 and "Warning" not in piped.output
    wrong = run_cli(home, "run", input="typo\nsecret\n")  # no terminal: no second try
    assert wrong.exit_code == 1 and "wrong passphrase" in wrong.output
    ended = run_cli(home, "run", input="")
    assert ended.exit_code == 1 and "no passphrase" in ended.output
    assert calls == [load_identity(home / IDENTITY_FILENAME, "secret")]


def test_a_mistyped_passphrase_at_a_terminal_may_be_typed_again(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = started_nodes(monkeypatch)
    assert run_cli(home, "init", passphrase="secret").exit_code == 0
    typed = iter(["typo", "tpyo", "secret", "never asked"])
    monkeypatch.setattr("p2pmsg.cli.main._prompt", lambda text: next(typed))
    monkeypatch.setattr("p2pmsg.cli.main._interactive", lambda: True)
    result = run_cli(home, "run")
    assert result.exit_code == 0, result.output
    assert result.output.count("wrong passphrase, try again") == 2
    assert calls == [load_identity(home / IDENTITY_FILENAME, "secret")] and next(typed) == "never asked"

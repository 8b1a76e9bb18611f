"""config.toml: parsing, validation errors naming file/key/reason, and writing TOML that reads back equal."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from conftest import error_reading_a_named_pipe
from hypothesis import given
from hypothesis import strategies as st

from p2pmsg.cli.config import (
    DEFAULT_LISTEN,
    Config,
    ConfigError,
    dump_config,
    load_config,
    parse_config,
    toml_string,
    write_config,
)

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def test_empty_file_gives_the_defaults() -> None:
    config = parse_config("")
    assert config == Config()
    assert config.listen == list(DEFAULT_LISTEN)
    assert config.bootstrap == []
    assert config.accept_from == "contacts"
    assert config.dht_port is None


def test_full_file() -> None:
    config = parse_config(
        f"""
        listen = ["/ip4/127.0.0.1/tcp/4001", "/ip4/0.0.0.0/tcp/4002/ws"]
        bootstrap = ["/dns4/boot.example.org/tcp/4001/p2p/{PEER}", "/ip4/192.0.2.1/udp/4001"]
        accept_from = "anyone"
        dht_port = 4003
        """
    )
    assert config.listen == ["/ip4/127.0.0.1/tcp/4001", "/ip4/0.0.0.0/tcp/4002/ws"]
    assert config.bootstrap[0].endswith(PEER)
    assert config.accept_from == "anyone"
    assert config.dht_port == 4003


def test_addresses_are_stored_canonically() -> None:
    config = parse_config('listen = ["/ip6/0:0:0:0:0:0:0:1/tcp/4001"]')
    assert config.listen == ["/ip6/::1/tcp/4001"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen = [", "not valid TOML"),
        ('lisen = ["/ip4/1.2.3.4/tcp/1"]', "unknown key 'lisen'"),
        ('listen = "/ip4/1.2.3.4/tcp/1"', "listen: must be a list of multiaddr strings, got a string"),
        ("listen = []", "listen: must name at least one address"),
        ("listen = [4001]", "listen[0]: must be a multiaddr string, got an integer"),
        ('listen = ["/ip4/1.2.3.4/tcp/99999"]', "listen[0]: '/ip4/1.2.3.4/tcp/99999' is not a valid multiaddr"),
        ('listen = ["/ip4/1.2.3.4/udp/4001"]', "listen[0]: '/ip4/1.2.3.4/udp/4001': can only listen on tcp or ws"),
        (f'listen = ["/ip4/1.2.3.4/tcp/1/p2p/{PEER}"]', "must not carry a /p2p peer id"),
        (
            'bootstrap = ["/ip4/1.2.3.4/tcp/0"]',
            "bootstrap[0]: '/ip4/1.2.3.4/tcp/0': a bootstrap address needs a real port",
        ),
        (f'bootstrap = ["/p2p/{PEER}"]', "bootstrap[0]"),
        ('accept_from = "everyone"', "accept_from: must be 'contacts' or 'anyone', got 'everyone'"),
        ("accept_from = 1", "accept_from: must be"),
        ("dht_port = 70000", "dht_port: must be an integer from 0 to 65535, got 70000"),
        ("dht_port = true", "dht_port: must be an integer"),
        ('dht_port = "4001"', "dht_port: must be an integer"),
        ("bootstrap = [" + ", ".join(['"/ip4/1.2.3.4/tcp/1"'] * 65) + "]", "at most 64 addresses"),
    ],
)
def test_invalid_files_name_the_key_and_reason(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="/h/config.toml")
    message = str(info.value)
    assert message.startswith("/h/config.toml: ")
    assert expected in message


def test_config_objects_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="accept_from"):
        Config(accept_from="nobody")
    with pytest.raises(ConfigError, match="listen"):
        Config(listen=["nonsense"])


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no configuration file.*p2pmsg init"):
        load_config(tmp_path / "config.toml")
    (tmp_path / "big.toml").write_bytes(b"#" * (65 * 1024))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(tmp_path / "big.toml")
    (tmp_path / "latin1.toml").write_bytes(b'accept_from = "caf\xe9"')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "latin1.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read: a directory, not a regular file"):
        load_config(tmp_path / "dir.toml")
    with pytest.raises(ConfigError, match="cannot read: a character device, not a regular file"):
        load_config("/dev/zero")


def test_a_refused_file_leaves_no_descriptor_open(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(ConfigError, match="a directory, not a regular file"):
            load_config(tmp_path / "dir.toml")
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_byte_order_mark_at_the_start_is_ignored(tmp_path: Path) -> None:
    """QA: a file saved by an editor that writes a BOM was refused as "Invalid statement (at line 1, column 1)"."""
    path = tmp_path / "config.toml"
    path.write_bytes(b'\xef\xbb\xbfaccept_from = "anyone"\n')
    assert load_config(path).accept_from == "anyone"


def test_a_named_pipe_in_place_of_the_config_is_refused_without_waiting(tmp_path: Path) -> None:
    """QA: `run` and `id` hung with no output: opening a named pipe waits for a writer that never comes."""
    error = error_reading_a_named_pipe(load_config, tmp_path / "config.toml")
    assert isinstance(error, ConfigError) and "cannot read: a named pipe, not a regular file" in str(error)


def test_write_then_load_round_trip_with_mode_0600(tmp_path: Path) -> None:
    config = Config(
        listen=["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0/ws"],
        bootstrap=[f"/dns4/boot.example.org/tcp/4001/p2p/{PEER}"],
        accept_from="anyone",
        dht_port=5000,
    )
    path = tmp_path / "config.toml"
    write_config(path, config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_config(path) == config
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    write_config(path, Config())
    assert load_config(path) == Config()
    assert "# dht_port = 4001" in path.read_text()


def test_dump_is_commented_toml() -> None:
    text = dump_config(Config())
    assert tomllib.loads(text) == {"listen": list(DEFAULT_LISTEN), "bootstrap": [], "accept_from": "contacts"}
    assert text.count("#") >= 4


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", '"plain"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak\ttab\r", '"line\\nbreak\\ttab\\r"'),
        ("\x00\x1b\x7f", '"\\u0000\\u001B\\u007F"'),
        ("unicode é ✓", '"unicode é ✓"'),
    ],
)
def test_toml_string_escapes(value: str, expected: str) -> None:
    assert toml_string(value) == expected


def test_toml_string_refuses_lone_surrogates() -> None:
    with pytest.raises(ConfigError, match="surrogate"):
        toml_string("a\ud800b")


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"])))
def test_toml_string_round_trips_through_tomllib(value: str) -> None:
    assert tomllib.loads(f"k = {toml_string(value)}") == {"k": value}

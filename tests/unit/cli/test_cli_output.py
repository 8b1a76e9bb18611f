"""CLI text output: terminal-safe text, times, columns, JSON, the invite QR code, and human error messages."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pmsg.cli.config import ConfigError
from p2pmsg.cli.main import EXIT_NOT_RUNNING, human_error
from p2pmsg.cli.output import clean, display_width, format_duration, format_ts, render_qr, table, to_json, truncate
from p2pmsg.control import ControlRequestError, NodeAlreadyRunningError, NodeNotRunningError
from p2pmsg.identity import WrongPassphraseError


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("plain text é ✓", "plain text é ✓"),
        ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
        ("a\tb", "a b"),
        ("del\x7f c1\x9b", "del\\x7f c1\\x9b"),
        ("abc\u202edcba", "abc\\u202edcba"),
        ("line\nnext", "line\\x0anext"),
    ],
)
def test_clean_neutralises_control_characters(raw: str, expected: str) -> None:
    assert clean(raw) == expected


def test_clean_multiline_keeps_newlines_indented() -> None:
    assert clean("one\ntwo\x1b", multiline=True) == "one\n  two\\x1b"
    assert clean(42) == "42"


def test_truncate() -> None:
    assert truncate("short", 10) == "short"
    assert truncate("a  b\nc", 10) == "a b c"
    assert truncate("x" * 20, 10) == "x" * 9 + "…"
    assert truncate("日本語のテキストです", 10) == "日本語の…"  # two columns each: 8 columns + the ellipsis
    assert display_width(truncate("👋" * 30, 10)) <= 10


def test_format_ts_and_duration() -> None:
    ts = 1_700_000_000_000
    assert format_ts(ts) == datetime.datetime.fromtimestamp(ts / 1000).strftime("%Y-%m-%d %H:%M")
    for bad in (None, "x", True, 10**30):
        assert format_ts(bad) == "-"
    assert [format_duration(s) for s in (5, 65, 3725, 90061)] == ["5s", "1m 05s", "1h 02m 05s", "1d 01h 01m"]
    assert format_duration(-1) == format_duration("x") == "-"


def test_table_aligns_columns_and_cleans_cells() -> None:
    text = table(["A", "LONGER"], [["xxxx", "1"], ["y", "evil\x1b"]])
    assert text.splitlines() == ["A     LONGER", "xxxx  1", "y     evil\\x1b"]


def test_table_aligns_wide_characters_by_the_columns_they_take() -> None:
    """Emoji and CJK take two terminal columns, a combining accent none: the next column still lines up."""
    text = table(["NAME", "STATE"], [["bob", "contact"], ["👋 ann", "blocked"], ["日本", "x"], ["e\u0301ve", "y"]])
    assert text.splitlines() == ["NAME    STATE", "bob     contact", "👋 ann  blocked", "日本    x", "e\u0301ve     y"]
    assert [display_width(t) for t in ("bob", "👋 ann", "日本", "e\u0301ve")] == [3, 6, 4, 3]


def test_to_json_is_ascii_and_handles_bytes() -> None:
    text = to_json({"t": "é\x1b\x9b", "b": b"\x01\xff"})
    assert text.isascii() and "\x1b" not in text
    assert json.loads(text) == {"t": "é\x1b\x9b", "b": "01ff"}


def test_render_qr_draws_a_square_of_blocks() -> None:
    invite = "p2pmsg://invite/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
    lines = render_qr(invite).splitlines()
    widths = {len(line) for line in lines}
    assert len(widths) == 1
    width = widths.pop()
    # Compact mode: two module rows per text line.
    assert len(lines) in (width // 2, width // 2 + 1)
    assert set("".join(lines)) <= set(" █▀▄")
    assert render_qr(invite) != render_qr(invite + "x")


def test_human_errors() -> None:
    home = Path("/h")
    not_running = human_error(NodeNotRunningError("no node; start it"), home=home)
    assert not_running is not None and not_running.exit_code == EXIT_NOT_RUNNING
    grouped = human_error(ExceptionGroup("nursery", [NodeAlreadyRunningError("another node")]), home=home)
    assert grouped is not None and grouped.message == "another node" and grouped.exit_code == 1
    wrong = human_error(WrongPassphraseError("x"), home=home)
    assert wrong is not None and wrong.message == "wrong passphrase for /h/identity.key"
    request = human_error(ControlRequestError("invalid_invite", "bad\x1b"), home=home)
    assert request is not None and request.message.startswith("malformed invite: bad\\x1b")
    invite = human_error(ControlRequestError("invalid_invite", "invalid invite: scheme: got ''"), home=home)
    assert invite is not None and invite.message.startswith("malformed invite: scheme: got ''")
    unknown_code = human_error(ControlRequestError("future_code", "m"), home=home)
    assert unknown_code is not None and unknown_code.message == "future_code: m"
    config = human_error(ConfigError("/h/config.toml: listen: bad"), home=home)
    assert config is not None and "fix /h/config.toml" in config.message
    denied = human_error(PermissionError(13, "Permission denied", "/h/identity.key"), home=home)
    assert denied is not None and denied.message == "/h/identity.key: Permission denied"
    assert human_error(ValueError("a bug"), home=home) is None


def test_the_cli_starts_without_the_node_side_or_the_qr_encoder() -> None:
    """Every `p2pmsg` command pays its imports (a shell loop of `p2pmsg send` pays them per message): the control
    server (trio) and the QR encoder load only when a command needs them."""
    probe = "import sys, p2pmsg.cli.main; print(sorted(m for m in ('trio', 'segno') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`p2pmsg ... | head -1`: the reader goes away before we are done writing; no "error: Broken pipe"."""
    home = tmp_path / "home"
    init = [sys.executable, "-c", "from p2pmsg.cli.main import main; main()", "--home", str(home)]
    subprocess.run([*init, "init", "--no-passphrase"], capture_output=True, timeout=60, check=True)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        done = subprocess.run(
            [*init, "id", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env={**os.environ, "P2PMSG_PASSPHRASE": ""},
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 1
    said = done.stderr.decode()  # (the warning that the key file is not encrypted is expected)
    assert "Broken pipe" not in said and "error" not in said and "Traceback" not in said, said

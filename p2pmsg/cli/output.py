"""Text output of the command line: safe text, times, aligned columns, JSON and the invite QR code.

Everything shown comes from the node, and much of it (message texts, names chosen by other people) from remote
peers, so :func:`clean` neutralises terminal control characters before anything reaches the terminal: an escape
sequence in a message must not be able to move the cursor, rewrite earlier lines or change the window title.
"""

from __future__ import annotations

import datetime
import io
import json
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = ["clean", "format_duration", "format_ts", "render_qr", "table", "to_json", "truncate"]

#: Bidirectional-text controls: they can make a line display in an order different from its bytes.
_BIDI_CONTROLS: Final = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
)


def clean(value: object, *, multiline: bool = False, indent: str = "  ") -> str:
    """``value`` as text safe for a terminal.

    Control characters (C0, DEL, C1) and bidi overrides become visible ``\\xNN``/``\\uNNNN`` escapes; a tab becomes
    a space.  Newlines are kept (continuation lines indented by ``indent``) when ``multiline``, else escaped too.
    """
    text = value if isinstance(value, str) else str(value)
    out: list[str] = []
    for char in text:
        if char == "\n" and multiline:
            out.append("\n" + indent)
        elif char == "\t":
            out.append(" ")
        elif char in _BIDI_CONTROLS or unicodedata.category(char) in ("Cc", "Cs"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def truncate(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` terminal columns (:func:`display_width`) with an ellipsis."""
    one_line = " ".join(text.split())
    if display_width(one_line) <= width:
        return one_line
    kept = []
    used = 0
    for char in one_line:
        char_width = display_width(char)
        if used + char_width > width - 1:
            break
        kept.append(char)
        used += char_width
    return "".join(kept) + "…"


def format_ts(ts: object) -> str:
    """A timestamp in milliseconds since the epoch as local ``YYYY-MM-DD HH:MM``; anything else as ``-``."""
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return "-"
    try:
        moment = datetime.datetime.fromtimestamp(ts / 1000)
    except (OverflowError, OSError, ValueError):
        return "-"
    return moment.strftime("%Y-%m-%d %H:%M")


def format_duration(seconds: object) -> str:
    """``3725`` -> ``1h 02m 05s``; anything that is not a number as ``-``."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: 2 for a wide or full-width character (CJK, most emoji), 0 for a combining
    mark, 1 for any other (what terminals do for text that :func:`clean` let through)."""
    width = 0
    for char in text:
        if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me"):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns aligned (by :func:`display_width`) with two spaces between them; the last column is not padded.  Cells
    are :func:`clean`-ed."""
    cells = [[clean(cell) for cell in row] for row in rows]
    widths = [display_width(h) for h in headers]
    for row in cells:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], display_width(cell))
    lines = []
    for row in [list(headers), *cells]:
        padded = [cell + " " * (widths[i] - display_width(cell)) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _json_default(value: object) -> object:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(value: Any) -> str:
    """Pretty JSON for ``--json`` (bytes as hex; ASCII only, so no control character reaches the terminal raw)."""
    return json.dumps(value, indent=2, ensure_ascii=True, default=_json_default, sort_keys=False)


def render_qr(text: str) -> str:
    """``text`` as a QR code drawn with Unicode half blocks (two modules per character cell, for dark terminals)."""
    import segno  # only `p2pmsg id` draws a QR code: not imported by every command

    code = segno.make_qr(text)
    buffer = io.StringIO()
    code.terminal(out=buffer, compact=True)
    return buffer.getvalue()

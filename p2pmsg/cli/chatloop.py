"""``p2pmsg chat NAME``: history, then live messages in, lines typed (or piped) out.

Theory of operation
-------------------
The chat shows the history, subscribes to the node's events, then fetches again the newest messages and shows those the
node stored after every message the first fetch returned (``seq`` counts in storing order; that fetch reads at least
1,000 messages, more than it shows): they arrived before the subscription could report them.  No message falls between
the two, and one that the history's ``limit`` left out is never shown after newer ones (subscribing first did that, when
a backlog was being stored).  Message ids already shown are remembered and never shown twice.  A background thread reads
the event stream and prints the messages of this contact as they arrive (on a terminal also when the contact comes
online or goes away, and when a line typed in this chat has been delivered), while the main thread reads lines from
stdin and sends each non-blank one with the ``send`` method, which returns once the message is durably queued.  Piped
input is read in batches of the lines available at that moment (:func:`line_batches`), each queued with one
``send_many`` (one transaction and one disk sync per batch), and each queued line is confirmed on stdout as ``queued
<message id>`` (the same words as ``p2pmsg send``), so a script knows exactly what the node holds.  A line the node
would refuse (over 64 KiB of UTF-8, or bytes that are not UTF-8) is not sent, nor is it changed: it gets ``refused: line
N: ...`` in its place, the other lines of its batch go, and the command then exits with status 1.  At end of input the
event stream is closed (waking the thread) and the command returns: every line has been queued or refused by then.
"""

from __future__ import annotations

import codecs
import io
import os
import select
import threading
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any, Final, NamedTuple, Protocol, TextIO

from p2pmsg.chat.envelope import MAX_TEXT_BYTES
from p2pmsg.cli.output import clean
from p2pmsg.control import ControlClient, ControlRequestError
from p2pmsg.errors import P2PMsgError
from p2pmsg.store.models import name_key

__all__ = ["ChatOutcome", "line_batches", "run_chat", "text_problem"]

MAX_BATCH: Final = 1000
"""Piped lines queued per ``send_many`` call (one transaction, one disk sync for the whole batch; the node takes up
to 1,000 texts per call)."""
MAX_BATCH_BYTES: Final = 768 * 1024
"""UTF-8 bytes of text per ``send_many`` call, so a request stays under the control API's 1 MiB limit (a line over
the 64 KiB text limit is never sent: it gets a ``refused`` line in the output instead)."""
_READ_SIZE: Final = 65536
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_CATCH_UP: Final = 1000
"""Newest messages fetched right after subscribing, for those that arrived since the history was shown."""
_SNIPPET: Final = 40
"""Characters of a typed message quoted when its delivery is shown."""


def text_problem(text: str) -> str | None:
    """Why the node would refuse ``text`` as a message, phrased to follow "the message" (``None``: it is fine).
    Bytes that were not UTF-8 reach us as lone surrogates (Python's ``surrogateescape``)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8 (it holds bytes that are not text)"
    if size > MAX_TEXT_BYTES:
        return f"is {size} bytes of UTF-8; the limit is {MAX_TEXT_BYTES} (64 KiB)"
    return None


class ChatOutcome(NamedTuple):
    """What :func:`run_chat` did with the lines it read."""

    sent: int
    """Lines queued."""
    refused: int
    """Lines not sent because the node would refuse them (each said so in the output)."""


class _Formatter(Protocol):
    def __call__(self, row: dict[str, Any], *, contact: str) -> str: ...


def line_batches(stdin: TextIO, max_batch: int = MAX_BATCH, max_bytes: int = MAX_BATCH_BYTES) -> Iterator[list[str]]:
    """Yield the lines of ``stdin`` in batches: each batch holds the lines available *now* (up to ``max_batch``
    lines and ``max_bytes`` bytes of UTF-8, but at least one line), so a burst of piped lines is queued together
    while a script that writes one line and waits for its confirmation is answered at once.  Falls back to one line
    per batch when ``stdin`` has no file descriptor."""
    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        for line in stdin:
            yield [line]
        return
    # Bytes that are not UTF-8 stay recognisable (lone surrogates): such a line is refused, never sent altered.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    pending = ""
    carry: str | None = None  # a line that did not fit in the previous batch
    eof = False
    while not eof or pending or carry is not None:
        lines: list[str] = []
        size = 0
        if carry is not None:
            lines.append(carry)
            size = len(carry.encode("utf-8", "surrogateescape"))
            carry = None
        while len(lines) < max_batch:
            if "\n" in pending:
                line, pending = pending.split("\n", 1)
                line += "\n"
                line_size = len(line.encode("utf-8", "surrogateescape"))
                if lines and size + line_size > max_bytes:
                    carry = line
                    break
                lines.append(line)
                size += line_size
                continue
            if eof or (lines and not select.select([fd], [], [], 0)[0]):
                break  # nothing more right now: send what we have
            chunk = os.read(fd, _READ_SIZE)
            if chunk:
                pending += decoder.decode(chunk)
            else:
                eof = True
                pending += decoder.decode(b"", final=True)
        if eof and not lines and pending:
            lines.append(pending)
            pending = ""
        if lines:
            yield lines


def _history_rows(result: object) -> list[dict[str, Any]]:
    """The rows of a ``history`` answer (anything else in it ignored)."""
    return [row for row in result if isinstance(row, dict)] if isinstance(result, list) else []


def _find_peer(client: ControlClient, name: str) -> str:
    """The peer id of the contact ``name`` names, matched as the node matches names: the name as written (ASCII
    letters in any case) first, then by :func:`name_key`, then as a contact's peer id."""
    rows = client.call("contacts.list")
    named = [
        (row["name"], row["peer_id"])
        for row in (rows if isinstance(rows, list) else [])
        if isinstance(row, dict) and isinstance(row.get("name"), str) and isinstance(row.get("peer_id"), str)
    ]
    name = unicodedata.normalize("NFC", name)  # as the node stores names and looks them up
    folded = name.translate(_ASCII_LOWER)  # SQLite's NOCASE, as the node's first lookup compares
    for candidate, peer_id in named:
        if candidate.translate(_ASCII_LOWER) == folded:
            return str(peer_id)
    key = name_key(name)
    for candidate, peer_id in named:
        if name_key(candidate) == key:
            return str(peer_id)
    for _, peer_id in named:
        if peer_id == name.strip():
            return str(peer_id)
    raise ControlRequestError("unknown_contact", f"no contact named {name!r}")


def run_chat(
    client: ControlClient,
    name: str,
    *,
    limit: int,
    stdin: TextIO,
    echo: Callable[[str], Any],
    format_line: _Formatter,
) -> ChatOutcome:
    """Run the chat with contact ``name`` until the end of ``stdin``; say what became of the lines."""
    peer_id = _find_peer(client, name)  # the node is asked by peer id: the contact may be renamed meanwhile
    interactive = stdin.isatty()
    lock = threading.Lock()
    seen: set[str] = set()
    typed: dict[str, str] = {}
    """Lines typed in this chat and not delivered yet: message id -> what to quote of it (at most :data:`_SNIPPET`
    characters)."""
    delivered_early: set[str] = set()
    """Ids delivered while a ``send`` call was on its way (its receipt can overtake its reply); emptied after it."""
    sending = False

    def show_rows(rows: list[dict[str, Any]], *, stored_after: int = -1) -> None:
        """Show history rows not shown yet, of those the node stored after ``stored_after`` (``seq`` counts in
        storing order)."""
        with lock:
            for row in rows:
                seq = row.get("seq")
                if str(row.get("id", "")) in seen or (type(seq) is int and seq <= stored_after):
                    continue
                seen.add(str(row.get("id", "")))
                echo(format_line(row, contact=name))

    def show(text: str) -> None:
        with lock:
            echo(text)

    def delivered(ids: list[str]) -> None:
        """Say which typed lines were delivered (under ``lock``)."""
        texts = [typed.pop(message_id) for message_id in ids if message_id in typed]
        if len(texts) == 1:
            echo(f"(delivered: {clean(texts[0])})")
        elif texts:
            echo(f"(delivered: {len(texts)} messages)")

    def typed_line(message_id: str | None, text: str) -> None:
        """The ``send`` of ``text`` returned (``message_id`` None: with no id, so its delivery cannot be told)."""
        nonlocal sending
        with lock:
            sending = False
            early = message_id is not None and message_id in delivered_early
            delivered_early.clear()
            if message_id is not None:
                typed[message_id] = text if len(text) <= _SNIPPET else text[: _SNIPPET - 1] + "\u2026"
                if early:
                    delivered([message_id])

    def pump() -> None:
        try:
            for event in events:
                kind = event.get("event")
                if event.get("peer_id") != peer_id:
                    continue
                if kind == "message" and event.get("direction") != "out":
                    message_id = str(event.get("id", ""))
                    with lock:
                        if message_id and message_id in seen:
                            continue
                        seen.add(message_id)
                        echo(format_line(event, contact=name))
                elif interactive and kind == "peer_up":
                    show(f"({clean(name)} is online)")
                elif interactive and kind == "peer_down":
                    show(f"({clean(name)} went offline)")
                elif interactive and kind == "receipt" and event.get("status") == "delivered":
                    ids = [str(i) for i in event.get("ids", []) if isinstance(i, str)]
                    with lock:
                        if sending:  # perhaps the line on its way: its receipt can overtake the send reply
                            delivered_early.update(message_id for message_id in ids if message_id not in typed)
                        delivered(ids)
        except P2PMsgError as exc:
            show(f"(no more incoming messages: {exc})")
            return
        if not closing.is_set():
            show("(the node stopped; incoming messages are no longer shown)")

    closing = threading.Event()
    thread = threading.Thread(target=pump, name="p2pmsg-chat-events", daemon=True)
    sent = refused = 0
    # More than the history shown, to know what the node had stored by then: the catch-up below must not show the
    # older messages the limit leaves out (a message sent long ago that arrived late has a high seq but an old ts).
    known = _history_rows(client.call("history", name=peer_id, limit=max(limit, _CATCH_UP)))
    show_rows(known[-limit:])
    stored_before = max((row["seq"] for row in known if type(row.get("seq")) is int), default=-1)
    events = client.events()
    try:
        # What arrived before the subscription could report it (a late message with an old ts too: by seq).
        show_rows(_history_rows(client.call("history", name=peer_id, limit=_CATCH_UP)), stored_after=stored_before)
        thread.start()
        if interactive:
            show(f"-- chatting with {clean(name)}; type a message and press Enter, Ctrl-D to leave --")
        if interactive:
            for line in stdin:
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                if (problem := text_problem(text)) is not None:
                    show(f"(not sent: the message {problem})")
                    refused += 1
                    continue
                with lock:
                    sending = True
                try:
                    result = client.call("send", name=peer_id, text=text)
                except BaseException:
                    typed_line(None, text)
                    raise
                sent += 1
                has_id = isinstance(result, dict) and isinstance(result.get("id"), str)
                typed_line(result["id"] if has_id else None, text)
        else:
            number = 0  # of the input line
            for batch in line_batches(stdin):
                texts: list[tuple[int, str]] = []
                for line in batch:
                    number += 1
                    if (text := line.rstrip("\r\n")).strip():
                        texts.append((number, text))
                if not texts:
                    continue
                # A line the node would refuse must not sink the batch (send_many is all or nothing): it gets its own
                # "refused" line in the output, in its place, and the others go.
                problems = {i: p for i, (_, t) in enumerate(texts) if (p := text_problem(t)) is not None}
                good = [t for i, (_, t) in enumerate(texts) if i not in problems]
                result = client.call("send_many", name=peer_id, texts=good) if good else {}
                sent += len(good)
                refused += len(problems)
                # A script needs to know exactly what was durably queued (e.g. before a crash): say it per line.
                status = result.get("status", "queued") if isinstance(result, dict) else "queued"
                ids = iter(result.get("ids", []) if isinstance(result, dict) else [])
                show(
                    "\n".join(
                        f"refused: line {texts[i][0]}: the message {problems[i]}"
                        if i in problems
                        else f"{status} {next(ids, '?')}"
                        for i in range(len(texts))
                    )
                )
    except KeyboardInterrupt:
        if interactive:
            show("")  # end the line the terminal's "^C" was echoed on
    finally:
        closing.set()
        events.close()
        if thread.is_alive():
            thread.join(timeout=5)
    return ChatOutcome(sent, refused)

"""The control-backed commands, run with click's CliRunner against a real ControlServer on a temporary Unix socket.

The server's handlers below are the control API's other end (a small in-memory node following the contract), not a
mock of the node's internals.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
import trio
from click.testing import CliRunner, Result

from p2pmsg.cli.chatloop import line_batches, run_chat
from p2pmsg.cli.main import EXIT_NOT_RUNNING, cli, format_message
from p2pmsg.control import (
    ControlClient,
    ControlRequestError,
    ControlServer,
    EventHub,
    Handler,
    control_socket_path,
)
from p2pmsg.identity import Identity, PeerId
from p2pmsg.store.models import name_key

BOB = Identity.from_seed(b"\x01" * 32).peer_id.to_base58()
CAROL = Identity.from_seed(b"\x02" * 32).peer_id.to_base58()
STRANGER = Identity.from_seed(b"\x03" * 32).peer_id.to_base58()
ME = Identity.from_seed(b"\x04" * 32).peer_id.to_base58()
T0 = 1_700_000_000_000


class ContactNode:
    """The node's side of the control contract, in memory: contacts, conversations, requests."""

    def __init__(self, hub: EventHub) -> None:
        self.hub = hub
        self.stored_again: int | None = None  # status: store_failing.stored
        self.contacts: dict[str, dict[str, Any]] = {
            "bob": {"peer_id": BOB, "name": "bob", "state": "contact", "added": T0},
        }
        self.messages: dict[str, list[dict[str, Any]]] = {
            "bob": [
                {
                    "id": "a1" * 16,
                    "from": BOB,
                    "text": "hi there",
                    "ts": T0 + 1000,
                    "status": "received",
                    "direction": "in",
                },
                {
                    "id": "a2" * 16,
                    "from": ME,
                    "text": "hello bob",
                    "ts": T0 + 2000,
                    "status": "delivered",
                    "direction": "out",
                },
            ]
        }
        self.requests = [{"peer_id": STRANGER, "count": 2, "last_text": "let me in", "last_ts": T0 + 5000}]
        self.sent: list[tuple[str, str]] = []
        self.blocked: list[str] = []
        self.history_params: list[dict[str, Any]] = []
        self.page_size = 10_000
        """Messages one reply holds at most (the node's limit is 10,000 messages and 8 MiB of text)."""
        self.before_history: Callable[[], None] | None = None
        """Called as each ``history`` request arrives (messages stored meanwhile)."""
        self.on_send: Callable[[str], None] | None = None
        """Called with the id of each message ``send`` queues, before the reply."""

    def _rows(self, name: str) -> list[dict[str, Any]]:
        """The conversation in history order, each row with its ``seq``."""
        return [{"seq": n, **row} for n, row in enumerate(self.messages.get(name, []), start=1)]

    def _contact(self, name: str) -> dict[str, Any]:
        for contact in self.contacts.values():
            if name_key(contact["name"]) == name_key(name):  # as the node matches names
                return contact
        for contact in self.contacts.values():
            if contact["peer_id"] == name.strip():  # or else a contact's peer id
                return contact
        raise ControlRequestError("unknown_contact", f"no contact named {name!r}")

    def handlers(self) -> dict[str, Handler]:
        async def id_(p: dict[str, Any]) -> Any:
            return {"peer_id": ME, "addrs": ["/ip4/127.0.0.1/tcp/4001"], "invite": f"p2pmsg://invite/{ME}"}

        async def add(p: dict[str, Any]) -> Any:
            target = p["target"].removeprefix("p2pmsg://invite/").split("?")[0]
            try:
                peer = PeerId.from_string(target).to_base58()
            except Exception:
                raise ControlRequestError("invalid_invite", f"{p['target']!r} is not an invite or a peer id") from None
            if p["name"] in self.contacts:
                raise ControlRequestError("name_taken", f"a contact is already called {p['name']!r}")
            if peer == ME:
                raise ControlRequestError("bad_request", "that invite is your own")
            known = [c["name"] for c in self.contacts.values() if c["peer_id"] == peer]
            if known:  # as the node answers (ChatService.add_contact: ContactExistsError)
                raise ControlRequestError("bad_request", f"this peer is already the contact {known[0]!r}")
            self.contacts[p["name"]] = {"peer_id": peer, "name": p["name"], "state": "contact", "added": T0}
            return {"peer_id": peer, "name": p["name"]} | ({"unblocked": True} if peer in self.blocked else {})

        async def list_(p: dict[str, Any]) -> Any:
            return list(self.contacts.values())

        async def rename(p: dict[str, Any]) -> Any:
            contact = self.contacts.pop(self._contact(p["name"])["name"])
            contact["name"] = p["new_name"]
            self.contacts[p["new_name"]] = contact
            return {}

        async def remove(p: dict[str, Any]) -> Any:
            contact = self.contacts.pop(self._contact(p["name"])["name"])
            queued = sum(1 for name, _ in self.sent if name == contact["name"])
            return {"peer_id": contact["peer_id"], "blocked": contact["state"] == "blocked", "queued": queued}

        async def block(p: dict[str, Any]) -> Any:
            self.blocked.append(p.get("name_or_peer") or p["peer_id"])
            return {}

        async def unblock(p: dict[str, Any]) -> Any:
            self.blocked.remove(p["name_or_peer"])
            return {}

        async def send(p: dict[str, Any]) -> Any:
            name = self._contact(p["name"])["name"]
            if p["text"] == "disk full":
                raise ControlRequestError("not_stored", "the write failed: database or disk is full")
            self.sent.append((name, p["text"]))
            message_id = f"{len(self.sent):032x}"
            if self.on_send is not None:
                self.on_send(message_id)
            return {"id": message_id, "status": "queued"}

        async def send_many(p: dict[str, Any]) -> Any:
            name = self._contact(p["name"])["name"]
            ids = []
            for text in p["texts"]:
                self.sent.append((name, text))
                ids.append(f"{len(self.sent):032x}")
            return {"ids": ids, "status": "queued"}

        async def history(p: dict[str, Any]) -> Any:
            name = self._contact(p["name"])["name"]
            self.history_params.append(p)
            if self.before_history is not None:
                self.before_history()
            rows = self._rows(name)
            if "before_seq" in p:
                rows = [r for r in rows if (r["ts"], r["seq"]) < (p["before"], p["before_seq"])]
            elif "before" in p:
                rows = [r for r in rows if r["ts"] < p["before"]]
            return rows[-min(p.get("limit", 50), self.page_size) :]

        async def inbox(p: dict[str, Any]) -> Any:
            return [
                {"name": "bob", "peer_id": BOB, "last_text": "hello bob", "last_ts": T0 + 2000, "last_direction": "out"}
            ]

        async def requests_list(p: dict[str, Any]) -> Any:
            return self.requests

        async def accept(p: dict[str, Any]) -> Any:
            if p["peer_id"] not in [r["peer_id"] for r in self.requests]:
                raise ControlRequestError("unknown_contact", f"no pending message request from {p['peer_id']}")
            self.contacts[p["name"]] = {"peer_id": p["peer_id"], "name": p["name"], "state": "contact", "added": T0}
            return {"peer_id": p["peer_id"], "name": p["name"]}

        async def peers(p: dict[str, Any]) -> Any:
            return [
                {"peer_id": BOB, "name": "bob", "addr": "/ip4/10.0.0.2/tcp/4001", "direction": "outbound", "since": T0}
            ]

        async def status(p: dict[str, Any]) -> Any:
            return {
                "peer_id": ME,
                "uptime_s": 3725,
                "connections": 1,
                "dht_size": 12,
                "outbox_depth": 0,
                "requests": 1,
                "database": "damaged",
                "store_failing": {
                    "since": 1_700_000_000,
                    "last": 1_700_000_061,
                    "error": "cannot commit: database or disk is full",
                    "stored": self.stored_again,
                },
                "clock_offset_s": -86_400,
                "dropped": {"control_slow_subscriber": 2},
            }

        async def export(p: dict[str, Any]) -> Any:
            rows = self._rows(p["name"])
            return {
                "contact": self._contact(p["name"]),
                "messages": rows[-self.page_size :],
                "more": len(rows) > self.page_size,
            }

        return {
            "id": id_,
            "contacts.add": add,
            "contacts.list": list_,
            "contacts.rename": rename,
            "contacts.remove": remove,
            "contacts.block": block,
            "contacts.unblock": unblock,
            "send": send,
            "send_many": send_many,
            "history": history,
            "inbox": inbox,
            "requests.list": requests_list,
            "requests.accept": accept,
            "requests.block": block,
            "peers": peers,
            "status": status,
            "export": export,
        }


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="p2pcli-"))  # short: a Unix socket path holds 107 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def node_on(home: Path) -> AsyncIterator[ContactNode]:
    hub = EventHub()
    node = ContactNode(hub)
    server = ControlServer(control_socket_path(home), node.handlers(), hub)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield node
        nursery.cancel_scope.cancel()


async def invoke(home: Path, *args: str, input: str | bytes | None = None) -> Result:
    runner = CliRunner()
    return await trio.to_thread.run_sync(
        lambda: runner.invoke(cli, ["--home", str(home), *args], input=input, catch_exceptions=False)
    )


# -- reads ---------------------------------------------------------------------------------------------------------


async def test_id_text_and_json(home: Path) -> None:
    async with node_on(home):
        text = await invoke(home, "id")
        as_json = await invoke(home, "id", "--json")
    assert text.exit_code == 0
    assert f"peer id  {ME}" in text.output
    assert "address  /ip4/127.0.0.1/tcp/4001" in text.output
    assert f"invite   p2pmsg://invite/{ME}" in text.output
    assert "█" not in text.output and "▀" not in text.output  # no QR code when stdout is not a terminal
    assert json.loads(as_json.output) == {
        "peer_id": ME,
        "addrs": ["/ip4/127.0.0.1/tcp/4001"],
        "invite": f"p2pmsg://invite/{ME}",
        "running": True,
    }


async def test_contacts_add_list_rename_remove(home: Path) -> None:
    async with node_on(home) as node:
        added = await invoke(
            home, "contacts", "add", f"p2pmsg://invite/{CAROL}?addr=%2Fip4%2F1.2.3.4%2Ftcp%2F1", "carol"
        )
        assert added.exit_code == 0 and f"added carol ({CAROL})" in added.output
        listed = await invoke(home, "contacts", "list")
        lines = listed.output.splitlines()
        assert lines[0].split() == ["NAME", "STATE", "ADDED", "PEER", "ID"]
        assert any(line.startswith("carol ") and line.endswith(CAROL) for line in lines)
        # Columns are aligned: PEER ID starts at the same offset on every line.
        assert len({line.index("12D3") for line in lines[1:]}) == 1
        assert (await invoke(home, "contacts", "rename", "carol", "caro")).exit_code == 0
        listed_json = json.loads((await invoke(home, "contacts", "list", "--json")).output)
        assert sorted(c["name"] for c in listed_json) == ["bob", "caro"]
        assert (await invoke(home, "contacts", "remove", "caro")).output == "removed caro\n"
        assert set(node.contacts) == {"bob"}
        await invoke(home, "send", "bob", "still on its way")
        node.contacts["bob"]["state"] = "blocked"
        assert (await invoke(home, "contacts", "remove", "bob")).output == (
            "removed bob\n"
            f"it stays blocked: `p2pmsg contacts unblock {BOB}` lets it write to you again\n"
            "1 message(s) to it are still queued: they wait while it is blocked\n"
        )
        node.blocked.append(BOB)
        assert (await invoke(home, "contacts", "add", BOB, "bob")).output == (
            f"added bob ({BOB})\nit was blocked: it is no longer\n"
        )
        node.blocked.remove(BOB)
        assert (await invoke(home, "contacts", "block", "bob")).output == "blocked bob\n"
        assert (await invoke(home, "contacts", "unblock", "bob")).output == "unblocked bob\n"
        assert node.blocked == []


async def test_adding_a_peer_twice_says_how_to_rename_it(home: Path) -> None:
    """The node refuses a peer that is already a contact (``bad_request``): the person reads the reason and what to
    do instead, not protocol words such as "bad request"."""
    async with node_on(home):
        again = await invoke(home, "contacts", "add", BOB, "bobby")
        own = await invoke(home, "contacts", "add", ME, "me")
    assert own.output == "error: refused: that invite is your own\n"  # no hint about renaming
    assert again.exit_code == 1
    assert again.output == (
        "error: refused: this peer is already the contact 'bob' (see `p2pmsg contacts list`; `p2pmsg contacts rename` "
        "changes a contact's name, `contacts unblock` unblocks it)\n"
    )


async def test_contacts_add_names_the_invite_parameters_it_ignored(home: Path) -> None:
    """``adr=`` for ``addr=`` dropped the address hint without a word: the contact was added and then reached only
    through the DHT."""
    async with node_on(home):
        typo = await invoke(home, "contacts", "add", f"p2pmsg://invite/{CAROL}?adr=%2Fip4%2F1.2.3.4%2Ftcp%2F1", "carol")
        plain = await invoke(home, "contacts", "add", STRANGER, "dave")
    assert typo.exit_code == 0
    assert typo.output == (
        f"added carol ({CAROL})\nnote: the invite's parameter(s) 'adr' are unknown to this version and were ignored "
        "(mistyped? the address hints are addr=...)\n"
    )
    assert plain.output == f"added dave ({STRANGER})\n"


async def test_contacts_add_name_as_option(home: Path) -> None:
    async with node_on(home) as node:
        by_option = await invoke(home, "contacts", "add", CAROL, "--name", "carol")
        both_same = await invoke(home, "contacts", "add", STRANGER, "dave", "--name", "dave")
        both_differ = await invoke(home, "contacts", "add", ME, "x", "--name", "y")
        neither = await invoke(home, "contacts", "add", ME)
        assert set(node.contacts) == {"bob", "carol", "dave"}
    assert by_option.exit_code == 0 and both_same.exit_code == 0
    assert both_differ.exit_code == 2 and "two different names" in both_differ.output
    assert neither.exit_code == 2 and "give the contact a name" in neither.output


async def test_send_from_args_and_stdin(home: Path) -> None:
    async with node_on(home) as node:
        by_args = await invoke(home, "send", "bob", "hello", "there")
        by_stdin = await invoke(home, "send", "bob", input="from\nstdin\n")
        as_json = await invoke(home, "send", "bob", "x", "--json")
        empty = await invoke(home, "send", "bob", input="")
    assert by_args.exit_code == 0 and by_args.output == f"queued {1:032x}\n"
    assert by_stdin.exit_code == 0
    assert json.loads(as_json.output) == {"id": f"{3:032x}", "status": "queued"}
    assert node.sent == [("bob", "hello there"), ("bob", "from\nstdin"), ("bob", "x")]
    assert empty.exit_code == 2 and "nothing to send" in empty.output


class _Endless(io.RawIOBase):
    """A stdin like /dev/zero that counts what was read from it."""

    def __init__(self) -> None:
        self.taken = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = min(len(buffer), 1 << 20)
        buffer[:size] = b"x" * size
        self.taken += size
        return size


async def test_send_reads_no_more_of_stdin_than_a_message_may_hold(home: Path) -> None:
    """``send NAME < /dev/zero`` read all of stdin before the size check: 9 GB in 16 s, then killed."""
    endless = _Endless()
    limit = 65536
    async with node_on(home) as node:
        endless_run = await invoke(home, "send", "bob", input=io.BufferedReader(endless))  # type: ignore[arg-type]
        at_limit = await invoke(home, "send", "bob", input=b"y" * limit + b"\n")
        over = await invoke(home, "send", "bob", input=b"z" * (limit + 1))
    assert endless_run.exit_code == 1
    assert endless_run.output == "error: the message on stdin is longer than the limit of 65536 bytes (64 KiB)\n"
    assert endless.taken <= 2 * limit + (1 << 20)  # a buffer's worth, not the stream
    assert at_limit.exit_code == 0 and node.sent == [("bob", "y" * limit)]
    assert over.exit_code == 1 and "65537 bytes of UTF-8; the limit is 65536" in over.output


async def test_history_text_is_sanitised_and_json_is_exact(home: Path) -> None:
    async with node_on(home) as node:
        node.messages["bob"].append(
            {
                "id": "a3" * 16,
                "from": BOB,
                "text": "evil\x1b]0;pwned\x07\nsecond line",
                "ts": T0 + 3000,
                "status": "received",
                "direction": "in",
            }
        )
        node.messages["bob"].append(
            {"id": "a4" * 16, "from": ME, "text": "pending", "ts": T0 + 4000, "status": "queued", "direction": "out"}
        )
        text = await invoke(home, "history", "bob")
        as_json = await invoke(home, "history", "bob", "--limit", "2", "--json")
    assert text.exit_code == 0
    lines = text.output.splitlines()
    assert lines[0].endswith("] bob: hi there")
    assert lines[1].endswith("] me: hello bob")  # delivered: no status shown
    assert "\x1b" not in text.output and "\x07" not in text.output
    assert lines[2].endswith("] bob: evil\\x1b]0;pwned\\x07")
    assert lines[3] == "  second line"
    assert lines[4].endswith("] me: pending  (queued)")
    rows = json.loads(as_json.output)
    assert [r["id"] for r in rows] == ["a3" * 16, "a4" * 16]
    assert rows[0]["text"] == "evil\x1b]0;pwned\x07\nsecond line"


async def test_inbox_requests_peers_status(home: Path) -> None:
    async with node_on(home) as node:
        inbox = await invoke(home, "inbox")
        requests = await invoke(home, "requests")
        requests_json = await invoke(home, "requests", "--json")
        accepted = await invoke(home, "requests", "accept", STRANGER, "dave")
        blocked = await invoke(home, "requests", "block", CAROL)
        peers = await invoke(home, "peers")
        status = await invoke(home, "status")
        status_json = await invoke(home, "status", "--json")
        assert node.contacts["dave"]["peer_id"] == STRANGER
        assert node.blocked == [CAROL]
    assert inbox.output.splitlines()[0].split() == ["NAME", "LAST", "MESSAGE"]
    assert inbox.output.splitlines()[1].startswith("bob ") and inbox.output.splitlines()[1].endswith("me: hello bob")
    assert STRANGER in requests.output and "let me in" in requests.output
    assert requests.output.splitlines()[-1].startswith("read one with `p2pmsg history PEER_ID`; then")
    assert json.loads(requests_json.output)[0]["count"] == 2
    assert accepted.output == f"accepted {STRANGER} as dave\n"
    assert blocked.output == f"blocked {CAROL}\n"
    assert "/ip4/10.0.0.2/tcp/4001" in peers.output and peers.output.splitlines()[1].startswith("bob ")
    assert "uptime        1h 02m 05s" in status.output
    assert "requests      1 (see `p2pmsg requests`)" in status.output
    assert "dropped       control_slow_subscriber=2" in status.output
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_700_000_000))
    last = time.strftime("%H:%M:%S", time.localtime(1_700_000_061))
    assert (
        f"database      damaged, but writes fail since {since} (the latest at {last}): cannot commit: database or "
        "disk is full (nothing is lost: received messages wait at their senders, and sends fail)"
    ) in status.output
    assert "clock         1d 00h 00m behind the other nodes' (set it right: NTP)" in status.output
    assert json.loads(status_json.output)["dht_size"] == 12


async def test_status_says_when_the_store_works_again_after_failing(home: Path) -> None:
    """A QA pass freed room on a full disk and still read "writes fail since ..." for the failures' 10-minute window:
    once messages were stored after the latest failure, status says so instead."""
    async with node_on(home) as node:
        node.stored_again = 1_700_000_090
        status = await invoke(home, "status")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_700_000_000))
    last = time.strftime("%H:%M:%S", time.localtime(1_700_000_061))
    stored = time.strftime("%H:%M:%S", time.localtime(1_700_000_090))
    assert (
        f"database      damaged; writes failed since {since} (the latest at {last}): cannot commit: database or disk "
        f"is full; messages are stored again (the latest at {stored})\n"
    ) in status.output


async def test_history_and_export_page_through_replies_that_cannot_hold_it_all(home: Path) -> None:
    """A reply holds at most 10,000 messages and 8 MiB of text: a larger --limit, or an export of a long
    conversation, takes several calls (an export of 300 messages of 60 KB once failed on the 16 MiB frame)."""
    async with node_on(home) as node:
        node.messages["bob"] = [
            {
                "id": f"{n:032x}",
                "from": BOB,
                "text": f"m{n}",
                "ts": T0 + n // 3,
                "status": "received",
                "direction": "in",
            }
            for n in range(10)
        ]
        node.page_size = 3
        limited = await invoke(home, "history", "bob", "--limit", "7", "--json")
        everything = await invoke(home, "history", "bob", "--limit", "1000", "--json")
        exported = await invoke(home, "export", "bob")
    assert [r["text"] for r in json.loads(limited.output)] == [f"m{n}" for n in range(3, 10)]
    assert [r["text"] for r in json.loads(everything.output)] == [f"m{n}" for n in range(10)]
    record = json.loads(exported.output)
    assert [m["text"] for m in record["messages"]] == [f"m{n}" for n in range(10)] and "more" not in record


async def test_export_to_stdout_and_to_a_private_file(home: Path) -> None:
    out = home / "bob.json"
    async with node_on(home):
        printed = await invoke(home, "export", "bob")
        written = await invoke(home, "export", "bob", "-o", str(out))
        again = await invoke(home, "export", "bob", "-o", str(out))
    exported = json.loads(printed.output)
    assert exported["contact"]["peer_id"] == BOB and len(exported["messages"]) == 2
    assert written.exit_code == 0 and json.loads(out.read_text()) == exported
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert again.exit_code == 1 and "already exists" in again.output


# -- human errors --------------------------------------------------------------------------------------------------


async def test_human_errors_from_the_node(home: Path) -> None:
    async with node_on(home):
        unknown = await invoke(home, "history", "zed")
        bad_invite = await invoke(home, "contacts", "add", "p2pmsg://invite/nonsense", "x")
        taken = await invoke(home, "contacts", "add", CAROL, "bob")
        bad_limit = await invoke(home, "history", "bob", "--limit", "0")
    assert unknown.exit_code == 1
    assert unknown.output == "error: unknown contact: no contact named 'zed' (see `p2pmsg contacts list`)\n"
    assert bad_invite.exit_code == 1 and bad_invite.output.startswith("error: malformed invite: ")
    assert taken.exit_code == 1 and taken.output.startswith("error: name already taken: ")
    assert bad_limit.exit_code == 2  # click refuses it before the node is asked


def test_node_not_running(home: Path) -> None:
    result = CliRunner().invoke(cli, ["--home", str(home), "status"])
    assert result.exit_code == EXIT_NOT_RUNNING
    assert f"Start it with `p2pmsg --home {home} run`" in result.output
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(cli, ["--home", str(home / "nope"), "inbox"])
    assert missing.exit_code == EXIT_NOT_RUNNING and "init" in missing.output


def test_home_from_the_environment(home: Path) -> None:
    result = CliRunner().invoke(cli, ["peers"], env={"P2PMSG_HOME": str(home)})
    assert result.exit_code == EXIT_NOT_RUNNING and str(home) in result.output


# -- chat ----------------------------------------------------------------------------------------------------------


async def test_chat_with_piped_input_sends_each_line_and_exits(home: Path) -> None:
    async with node_on(home) as node:
        result = await invoke(home, "chat", "bob", input="first line\n\n   \nsecond line\n")
        assert node.sent == [("bob", "first line"), ("bob", "second line")]
        assert node.hub.subscribers == 0 or await _eventually(lambda: node.hub.subscribers == 0)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].endswith("] bob: hi there") and lines[1].endswith("] me: hello bob")
    # Piped: every queued line is confirmed with its id, so a script knows what the node holds.
    confirmations = [line for line in lines if line.startswith("queued ")]
    assert len(confirmations) == 2 and all(len(line.split()[1]) == 32 for line in confirmations)


async def test_piped_chat_refuses_an_overlong_line_alone(home: Path) -> None:
    """send_many is all or nothing: a line over the 64 KiB text limit must not sink the lines around it (found in
    review).  It gets its own "refused" line in the output, in its place, and the others are sent."""
    long_line = "x" * 65537
    async with node_on(home) as node:
        result = await invoke(home, "chat", "bob", input=f"before\n{long_line}\nafter\n")
        assert node.sent == [("bob", "before"), ("bob", "after")]
    assert result.exit_code == 1, result.output  # a script must not take it for a success
    replies = [line for line in result.output.splitlines() if line.startswith(("queued ", "refused"))]
    assert [line.split()[0] for line in replies] == ["queued", "refused:", "queued"]
    assert replies[1] == "refused: line 2: the message is 65537 bytes of UTF-8; the limit is 65536 (64 KiB)"
    assert "error: 1 line(s) not sent" in result.output


async def test_piped_chat_refuses_bytes_that_are_not_utf8_instead_of_sending_them_changed(home: Path) -> None:
    """Invalid UTF-8 was sent with replacement characters and a success status (a QA pass)."""
    shown: list[str] = []
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"ok\nbad \xff\xfe bytes\n\n\xc3\xa9t\xc3\xa9\n")
    os.close(write_fd)
    async with node_on(home) as node:
        with os.fdopen(read_fd, "r") as stdin:
            outcome = await trio.to_thread.run_sync(
                lambda: run_chat(
                    ControlClient(home), "bob", limit=1, stdin=stdin, echo=shown.append, format_line=format_message
                )
            )
        assert node.sent == [("bob", "ok"), ("bob", "été")]
    assert outcome == (2, 1)
    replies = "\n".join(shown).splitlines()[1:]  # after the history line
    assert [r.split()[0] for r in replies] == ["queued", "refused:", "queued"]
    assert replies[1] == "refused: line 2: the message is not valid UTF-8 (it holds bytes that are not text)"


async def test_chat_finds_the_contact_as_the_node_does_whatever_the_case(home: Path) -> None:
    """``send BOB`` worked and ``chat BOB`` said "unknown contact": chat compared names exactly."""
    async with node_on(home) as node:
        node.contacts["jörg"] = {"peer_id": CAROL, "name": "J\u00f6rg", "state": "contact", "added": T0}
        upper = await invoke(home, "chat", "BOB", input="hello\n")
        joerg = await invoke(home, "chat", "JO\u0308RG", input="hallo\n")
        by_id = await invoke(home, "chat", BOB, input="by id\n")  # as the node takes a contact's peer id too
        assert node.sent == [("bob", "hello"), ("J\u00f6rg", "hallo"), ("bob", "by id")]
    assert upper.exit_code == 0 and joerg.exit_code == 0 and by_id.exit_code == 0, (upper.output, joerg.output)


class _CtrlC(io.StringIO):
    """A terminal at which the person presses Ctrl-C."""

    def isatty(self) -> bool:
        return True

    def __iter__(self) -> _CtrlC:
        return self

    def __next__(self) -> str:
        raise KeyboardInterrupt


async def test_ctrl_c_in_an_interactive_chat_ends_the_line(home: Path) -> None:
    shown: list[str] = []
    async with node_on(home):
        outcome = await trio.to_thread.run_sync(
            lambda: run_chat(
                ControlClient(home), "bob", limit=1, stdin=_CtrlC(), echo=shown.append, format_line=format_message
            )
        )
    assert outcome == (0, 0) and shown[-1] == ""  # the shell prompt then starts on a line of its own


async def test_chat_refuses_a_line_that_is_not_utf8_from_any_stdin(home: Path) -> None:
    """Through click's stdin (no file descriptor: lines are decoded by the text wrapper), a byte that is not UTF-8
    ended the chat with a UnicodeDecodeError (a review); it is refused like any line the node would refuse."""
    async with node_on(home) as node:
        result = await invoke(home, "chat", "bob", input=b"ok\nbad \xff\nfine\n")
        assert node.sent == [("bob", "ok"), ("bob", "fine")]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "refused: line 2: the message is not valid UTF-8" in result.output


async def test_chat_with_an_unknown_contact(home: Path) -> None:
    async with node_on(home) as node:
        result = await invoke(home, "chat", "zed", input="hello\n")
        assert node.sent == []
    assert result.exit_code == 1 and "unknown contact" in result.output


async def _eventually(predicate: Any) -> bool:
    with trio.fail_after(5):
        while not predicate():
            await trio.sleep(0.01)
    return True


def _chat_with_bob(home: Path, stdin: TextIO, shown: list[str], done: threading.Event) -> Callable[[], Any]:
    """``p2pmsg chat bob`` (history limit 1) reading ``stdin``, showing into ``shown``, setting ``done`` at its end:
    to run in a thread."""

    def chat() -> Any:
        try:
            return run_chat(
                ControlClient(home), "bob", limit=1, stdin=stdin, echo=shown.append, format_line=format_message
            )
        finally:
            done.set()

    return chat


async def test_chat_shows_incoming_messages_live(home: Path) -> None:
    shown: list[str] = []
    read_fd, write_fd = os.pipe()
    async with node_on(home) as node:
        stdin = os.fdopen(read_fd, "r")
        done = threading.Event()
        chat = _chat_with_bob(home, stdin, shown, done)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, chat)
            await _eventually(lambda: node.hub.subscribers == 1 and len(shown) == 1)  # history (limit 1) shown
            node.hub.publish("message", id="b1" * 16, peer_id=CAROL, text="not for this chat", ts=T0, direction="in")
            node.hub.publish("message", id="b2" * 16, peer_id=BOB, text="live!", ts=T0 + 9000, direction="in")
            node.hub.publish("message", id="b2" * 16, peer_id=BOB, text="live!", ts=T0 + 9000, direction="in")  # dup
            node.hub.publish("message", id="b3" * 16, peer_id=BOB, text="from me", ts=T0, direction="out")
            await _eventually(lambda: any("live!" in line for line in shown))
            os.write(write_fd, b"reply\n")
            await _eventually(lambda: node.sent == [("bob", "reply")])
            os.close(write_fd)
            await _eventually(done.is_set)
        stdin.close()
    assert shown[0].endswith("] me: hello bob")
    assert [line for line in shown if "live!" in line] == [shown[1]]
    assert shown[1].endswith("] bob: live!")
    assert not any("not for this chat" in line or "from me" in line for line in shown)


class _Terminal(io.TextIOWrapper):
    """Lines typed at a terminal (a pipe that says it is one)."""

    def isatty(self) -> bool:
        return True


async def test_an_interactive_chat_says_when_a_typed_line_was_delivered(home: Path) -> None:
    """At a terminal nothing said whether a typed line reached the contact; now its delivery receipt does (once, also
    when the receipt overtakes the ``send`` reply), and receipts of other messages say nothing."""
    shown: list[str] = []
    read_fd, write_fd = os.pipe()
    async with node_on(home) as node:
        stdin = _Terminal(os.fdopen(read_fd, "rb"))
        done = threading.Event()
        chat = _chat_with_bob(home, stdin, shown, done)

        def receipt(status: str, *numbers: int, peer: str = BOB) -> None:
            node.hub.publish("receipt", ids=[f"{n:032x}" for n in numbers], peer_id=peer, status=status)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, chat)
            try:
                await _eventually(lambda: node.hub.subscribers == 1 and any(line.startswith("--") for line in shown))
                # The first line's receipt overtakes the reply to its send (the fake node numbers messages 1, 2, ...).
                node.on_send = lambda message_id: receipt("delivered", int(message_id, 16))
                os.write(write_fd, b"first\n")
                await _eventually(lambda: "(delivered: first)" in shown)
                node.on_send = None
                os.write(write_fd, b"second line that is longer than forty characters for sure\n")
                await _eventually(lambda: len(node.sent) == 2)
                receipt("sent", 2)
                receipt("delivered", 2, 99)  # 99: sent from elsewhere (another terminal): not this chat's to report
                os.write(write_fd, b"third\nfourth\nfifth\n")
                await _eventually(lambda: len(node.sent) == 5)  # so the chat knows the ids of "third" and "fourth"
                receipt("delivered", 3, peer=CAROL)  # another contact's message 3
                receipt("delivered", 3, 4)
                await _eventually(lambda: "(delivered: 2 messages)" in shown)
            finally:
                os.close(write_fd)  # ends the chat (also when a check above failed)
            await _eventually(done.is_set)
        stdin.close()
    assert [line for line in shown if line.startswith("(delivered")] == [
        "(delivered: first)",
        "(delivered: second line that is longer than forty c\u2026)",
        "(delivered: 2 messages)",
    ]


async def test_chat_never_shows_an_older_message_after_a_newer_one_at_its_start(home: Path) -> None:
    """A backlog being stored as the chat starts: two messages arrive just before its history query, which with
    --limit 1 shows only the newer.  The chat subscribed first, so it got both events and showed the older one
    after the newer (a QA pass saw 255 older messages shown after a newer one)."""
    shown: list[str] = []
    async with node_on(home) as node:

        def arrive() -> None:
            node.before_history = None
            for n, text in enumerate(("older", "newer"), start=1):
                row = {"id": f"c{n}" * 16, "from": BOB, "text": text, "ts": T0 + 5000, "status": "received"}
                node.messages["bob"].append({**row, "direction": "in"})
                node.hub.publish("message", **row, peer_id=BOB, direction="in")

        node.before_history = arrive
        outcome = await trio.to_thread.run_sync(
            lambda: run_chat(
                ControlClient(home),
                "bob",
                limit=1,
                stdin=io.StringIO(""),
                echo=shown.append,
                format_line=format_message,
            )
        )
    assert outcome == (0, 0)
    assert [line.rsplit(": ", 1)[-1] for line in shown] == ["newer"]  # "older" is history --limit left out


async def test_chat_shows_a_late_message_stored_between_its_history_and_its_subscription(home: Path) -> None:
    """A message stored after the history was read but before the subscription (a late one, with an old ts) has no
    event for the chat: the catch-up must show it, whatever its ts (a review: it was skipped as older)."""
    shown: list[str] = []
    async with node_on(home) as node:
        calls = 0

        def arrive_late() -> None:
            nonlocal calls
            calls += 1
            if calls == 2:  # the catch-up: the late message was stored just before the subscription
                row = {"id": "d1" * 16, "from": BOB, "text": "late", "ts": T0, "status": "received", "direction": "in"}
                node.messages["bob"].append(row)

        node.before_history = arrive_late
        stdin = io.StringIO("")
        outcome = await trio.to_thread.run_sync(
            lambda: run_chat(
                ControlClient(home), "bob", limit=1, stdin=stdin, echo=shown.append, format_line=format_message
            )
        )
    assert outcome == (0, 0)
    assert [line.rsplit(": ", 1)[-1] for line in shown] == ["hello bob", "late"]


async def test_chat_does_not_show_a_late_old_message_the_limit_left_out(home: Path) -> None:
    """A message written at 09:30 that arrived after mine of 10:00-10:02 has the highest seq; with --limit 3 it is
    left out of the history, and the catch-up must not show it after 10:02 either (a review found it did)."""
    shown: list[str] = []
    async with node_on(home) as node:
        late = {"id": "e1" * 16, "from": BOB, "text": "from 09:30", "ts": T0 - 1_800_000, "seq": 4, "direction": "in"}
        mine = [
            {"id": f"e{n + 2}" * 16, "from": ME, "text": f"mine {n}", "ts": T0 + n, "seq": n + 1, "direction": "out"}
            for n in range(3)
        ]
        node.messages["bob"] = [{**late, "status": "received"}, *({**m, "status": "delivered"} for m in mine)]
        stdin = io.StringIO("")
        await trio.to_thread.run_sync(
            lambda: run_chat(
                ControlClient(home), "bob", limit=3, stdin=stdin, echo=shown.append, format_line=format_message
            )
        )
    assert [line.rsplit(": ", 1)[-1] for line in shown] == ["mine 0", "mine 1", "mine 2"]


def test_piped_lines_are_batched_as_they_become_available() -> None:
    """A burst written at once is one batch; a line written alone is answered alone (no waiting for more)."""
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "r") as stdin:
        batches = line_batches(stdin, max_batch=3)
        os.write(write_fd, b"one\n")
        assert next(batches) == ["one\n"]
        os.write(write_fd, b"two\nthree\nfour\nfive\xc3\xa9\nsix")
        assert next(batches) == ["two\n", "three\n", "four\n"]
        assert next(batches) == ["five\u00e9\n"]
        os.close(write_fd)
        assert next(batches) == ["six"]
        assert list(batches) == []


def test_piped_batches_stay_under_the_request_size_limit() -> None:
    """Batches are cut by bytes too (the control API takes requests of up to 1 MiB); an oversize line goes alone."""
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "r") as stdin:
        batches = line_batches(stdin, max_batch=1000, max_bytes=10)
        os.write(write_fd, "aaaa\nbbbb\n\u00e9\u00e9\u00e9\nccccccccccccccc\nd\n".encode())
        os.close(write_fd)
        # "aaaa\n" + "bbbb\n" = 10 bytes; "\u00e9\u00e9\u00e9\n" is 7 bytes of UTF-8 (4 characters).
        assert list(batches) == [["aaaa\n", "bbbb\n"], ["\u00e9\u00e9\u00e9\n"], ["ccccccccccccccc\n"], ["d\n"]]


async def test_history_pages_back_with_before_and_before_seq(home: Path) -> None:
    async with node_on(home) as node:
        paged = await invoke(home, "history", "bob", "--limit", "2", "--before", str(T0 + 2000), "--before-seq", "7")
        alone = await invoke(home, "history", "bob", "--before-seq", "7")
    assert paged.exit_code == 0
    assert node.history_params[0] == {"name": "bob", "limit": 2, "before": T0 + 2000, "before_seq": 7}
    assert alone.exit_code == 2 and "--before-seq needs --before" in alone.output


async def test_an_unknown_request_points_to_the_requests_not_the_contacts(home: Path) -> None:
    async with node_on(home):
        unknown = await invoke(home, "requests", "accept", CAROL, "carol")
        contact = await invoke(home, "send", "nobody", "hi")
    assert unknown.exit_code == 1
    assert unknown.output == (
        f"error: unknown request: no pending message request from {CAROL} (see `p2pmsg requests`)\n"
    )
    assert contact.output.endswith("(see `p2pmsg contacts list`)\n")


async def test_names_that_are_empty_or_not_text_get_a_plain_answer(home: Path) -> None:
    """QA: an empty name said "refused: send.name: str is 0 bytes long, less than the minimum 1", and a byte that is
    not UTF-8 (a shell variable, a file) said "control frame: str holds a lone surrogate"."""
    async with node_on(home) as node:
        empty = await invoke(home, "send", "", "hi")
        bad = await invoke(home, "history", "b\udcffob")
        option = await invoke(home, "contacts", "add", CAROL, "--name", "")
        block = await invoke(home, "contacts", "block", "")
        assert node.sent == []
    assert empty.exit_code == 2 and "Invalid value for 'NAME': is empty" in empty.output
    assert bad.exit_code == 2 and "Invalid value for 'NAME': holds bytes that are not UTF-8 text" in bad.output
    assert option.exit_code == 2 and "Invalid value for '--name': is empty" in option.output
    assert block.exit_code == 2 and "Invalid value for 'NAME_OR_PEER': is empty" in block.output
    for result in (empty, bad, option, block):
        assert "control frame" not in result.output and "bytes long" not in result.output


async def test_input_the_node_would_refuse_gets_a_plain_answer_first(home: Path) -> None:
    async with node_on(home) as node:
        blank = await invoke(home, "send", "bob", "   ")
        piped_blank = await invoke(home, "send", "bob", input=" \n\t\n")
        too_long = await invoke(home, "send", "bob", input="é" * 40_000)  # 80,000 bytes of UTF-8
        not_utf8 = await invoke(home, "send", "bob", input=b"bad \xff\xfe bytes")
        at_limit = await invoke(home, "send", "bob", input="x" * 65_536)
        huge_limit = await invoke(home, "history", "bob", "--limit", "99999999999999999999")
        empty_name = await invoke(home, "contacts", "rename", "bob", "")
        assert node.sent == [("bob", "x" * 65_536)]
    assert blank.exit_code == 2 and "nothing to send" in blank.output and "white space" in blank.output
    assert piped_blank.exit_code == 2 and "nothing to send" in piped_blank.output
    assert too_long.exit_code == 1
    assert too_long.output == "error: the message on stdin is longer than the limit of 65536 bytes (64 KiB)\n"
    assert at_limit.exit_code == 0
    assert not_utf8.exit_code == 1
    assert not_utf8.output == "error: the message is not valid UTF-8 (it holds bytes that are not text)\n"
    assert huge_limit.exit_code == 2 and "2147483647" in huge_limit.output and "msgpack" not in huge_limit.output
    assert empty_name.exit_code == 2 and "Invalid value for 'NEW_NAME': is empty" in empty_name.output


async def test_a_peer_blocked_by_id_is_listed_without_a_name_and_export_takes_json(home: Path) -> None:
    async with node_on(home) as node:
        node.contacts["#blocked"] = {"peer_id": CAROL, "name": None, "state": "blocked", "added": T0}
        listed = await invoke(home, "contacts", "list")
        exported = await invoke(home, "export", "bob", "--json")
    assert listed.exit_code == 0 and "None" not in listed.output
    [row] = [line for line in listed.output.splitlines() if CAROL in line]
    assert row.split()[:2] == ["-", "blocked"]
    assert exported.exit_code == 0 and json.loads(exported.output)["contact"]["name"] == "bob"


async def test_a_send_the_node_could_not_store_says_so_and_why(home: Path) -> None:
    async with node_on(home):
        full = await invoke(home, "send", "bob", "disk full")
    assert full.exit_code == 1
    assert full.output.startswith("error: not stored: the write failed: database or disk is full (")
    assert "is its disk full, or the file gone or damaged?" in full.output


async def test_requests_accept_takes_the_name_like_contacts_add(home: Path) -> None:
    async with node_on(home) as node:
        by_option = await invoke(home, "requests", "accept", STRANGER, "--name", "dave")
        nameless = await invoke(home, "requests", "accept", STRANGER)
        assert node.contacts["dave"]["peer_id"] == STRANGER
    assert by_option.output == f"accepted {STRANGER} as dave\n"
    assert nameless.exit_code == 2 and "give the contact a name: p2pmsg requests accept PEER_ID NAME" in nameless.output

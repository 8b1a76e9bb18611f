"""System test: random bytes and malformed frames on every port of a running node (TCP, WebSocket, UDP DHT,
control socket, and a chat session after a real handshake); the node keeps serving its contacts, logs what it
dropped and counts it in ``status --json``.

Bob listens on TCP and WebSocket (both on 127.0.0.1, port 0) and runs with ``--log-level debug`` (the DHT logs
malformed datagrams at debug level only: a flood must not flood the log).  The garbage comes from
:mod:`fuzz_frames` with a fixed seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_frames import chat_garbage, control_garbage, tcp_garbage, udp_garbage, ws_garbage
from procs import LOCAL_TCP, LOCAL_WS, Mesh, open_mesh, texts

SEED = 20240607


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with open_mesh(tmp_path) as m:
        m.start_bootstrap()
        m.init("alice")
        m.start("alice")
        m.init("bob", listen=[LOCAL_TCP, LOCAL_WS])
        m.start("bob", log_level="debug")
        m.introduce("alice", "bob")
        yield m


def exchange(mesh: Mesh, text: str) -> None:
    """alice -> bob and bob -> alice, each delivered (in the other's history, ``delivered`` at the sender)."""
    for sender, receiver in (("alice", "bob"), ("bob", "alice")):
        sent = json.loads(mesh.cli(sender, "send", receiver, f"{text} from {sender}", "--json").stdout)

        def arrived(sender: str = sender, receiver: str = receiver, sent_id: str = sent["id"]) -> bool:
            return any(r["id"] == sent_id for r in mesh.history(receiver, sender)) and any(
                r["id"] == sent_id and r["status"] == "delivered" for r in mesh.history(sender, receiver)
            )

        mesh.wait_until(arrived, f"{text!r} from {sender} delivered to {receiver}", [sender, receiver])


def port_of(addr: str, proto: str) -> int:
    parts = addr.split("/")
    return int(parts[parts.index(proto) + 1])


def test_garbage_on_every_port_is_dropped_logged_and_counted(mesh: Mesh) -> None:
    exchange(mesh, "before")
    status = mesh.status("bob")
    tcp = next(a for a in status["addrs"] if "/ws" not in a)
    ws = next(a for a in status["addrs"] if a.endswith("/ws"))
    dht_host, dht_port = status["dht_address"].rsplit(":", 1)
    assert dht_host == "127.0.0.1"
    before = status["dropped"]
    rng = random.Random(SEED)

    tcp_garbage("127.0.0.1", port_of(tcp, "tcp"), rng)
    answers = ws_garbage("127.0.0.1", port_of(ws, "tcp"), rng)
    udp_garbage("127.0.0.1", int(dht_port), rng)
    control = control_garbage(mesh.home("bob") / "control.sock", rng)
    bob_id = mesh.peer_id("bob")
    chat_garbage(bob_id, tcp)

    # The WebSocket listener answered bad upgrades in HTTP and refused an oversize message with Close 1009.
    for case, status_line in (("plain GET", b"HTTP/1.1 400"), ("wrong path", b"HTTP/1.1 404")):
        answer = answers[case]
        assert isinstance(answer, bytes) and answer.startswith(status_line), (case, answer)
    assert answers["too big"] == 1009, answers
    # The control socket told every bad client why (the id-0 error frame) before closing; the one exception is
    # the client that hung up inside a frame, who is gone before the answer.
    assert sum(b"bad_request" in a for a in control) == len(control) - 1, control
    assert all(a == b"" or a.startswith(b"\x00\x00") for a in control), control

    # Still up, still serving its contacts in both directions, on both transports.
    assert mesh.running("bob")
    exchange(mesh, "after")
    assert texts(mesh.history("bob", "alice"))[-2:] == ["after from alice", "after from bob"]

    log = mesh.log("bob")
    for reason in (
        "dropped during handshake: handshake message 1: the frame announces",  # TCP, random bytes
        "dropped during handshake: handshake message 3",  # TCP, a random message 3 after a real message 2
        "dropped during handshake: the peer closed the connection before handshake message 1",  # TCP, hang-up
        "WebSocket path '/nowhere' is not '/'",
        "only binary messages are allowed",  # WebSocket text message
        "WebSocket closed with code 1009",  # WebSocket message too big
        "WebSocket closed with code 1002",  # reserved opcode, unmasked client frame
        "control: closing a connection: control frame: length: frame of 0 bytes",
        "control: closing a connection: control frame: extra: unknown key",
        "is larger than the limit of 1048576",  # control, oversize
        "a subscri",  # control, a subscriber that sent a frame
        "dropping datagram from",  # DHT (logged at debug level)
        "chat: dropped (chat_protocol_error)",  # chat session after an authenticated handshake
    ):
        assert reason in log, f"bob's log does not mention {reason!r}" + mesh.tail("bob")
    assert "Traceback" not in log, mesh.tail("bob", 8000)
    assert mesh.cli_json("bob", "requests") == []  # the stranger's nonsense never became a message

    status = mesh.status("bob")
    dht = status["dht"]
    assert dht["malformed"] + dht["rate_limited"] + dht["unknown_rpc"] + dht["unexpected_response"] > 0, dht
    assert status["listener"]["handshake_failures"] > 0, status["listener"]
    dropped = status["dropped"]
    expected = ("net_handshake_failures", "chat_protocol_error", "control_malformed_frame", "control_oversize_frame")
    missing = [c for c in expected if not dropped.get(c, 0) > before.get(c, 0)]
    if not any(k.startswith("dht_") and v > 0 for k, v in dropped.items()):
        missing.append("dht_*")
    assert not missing, f"status --json 'dropped' does not count {missing}: {dropped} (dht stats: {dht})"

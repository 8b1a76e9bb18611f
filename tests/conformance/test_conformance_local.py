"""Conformance of a real node's local formats with docs/protocol.md, checked by clean-room code: the key file (1.2),
the invite link (6.6), the control API (7) and the SQLite store (8).

The worked examples need no node. The other tests share two nodes (module scope): `a` with a passphrase, `b`
without. The store test stops `a` to read its file, so it comes last.
"""

from __future__ import annotations

import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cleanroom.control import ControlError, decode_frame_body, encode_frame
from cleanroom.encoding import CleanroomError
from cleanroom.identity import Identity, parse_peer_id
from cleanroom.invite import make_invite, parse_invite
from cleanroom.keyfile import build_encrypted, build_unencrypted, derive_key, read_key_file
from cleanroom.multiaddr import parse_multiaddr
from cleanroom.nodes import Node, Process, stop_all
from cleanroom.store import APPLICATION_ID, TABLES, read_store

# ---------------------------------------------------------------- worked examples (no node)

SEED_1_1 = bytes.fromhex("7e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d")
ALICE = Identity(bytes(range(32)))


def test_key_file_worked_example_1_encrypted() -> None:
    salt, nonce = bytes(range(16)), bytes(range(0x10, 0x28))
    passphrase = "correct horse battery staple"
    assert derive_key(passphrase, salt, 1, 8192).hex() == (
        "d17ea6341ca93da6079ea2f64dc4aa31dd1aaf9caa67fb42ac4afd0714706f26"
    )
    data = build_encrypted(SEED_1_1, passphrase, 1, 8192, salt, nonce)
    assert data.hex() == (
        "5032504d53474b46"
        + "01"
        + "01"
        + "00000001"
        + "0000000000002000"
        + salt.hex()
        + nonce.hex()
        + "8079f3d8398651db382713800092198312756b55087ab6eb1f6ed83666941ba42878263581330cdff4849fef7e854d24"
        + "140a5299f3b957cbdc7b9c9d2143a05b"
    )
    assert len(data) == 126
    assert read_key_file(data, passphrase) == SEED_1_1
    with pytest.raises(CleanroomError, match="wrong passphrase"):
        read_key_file(data, "Correct horse battery staple")


def test_key_file_worked_example_2_unencrypted() -> None:
    data = build_unencrypted(SEED_1_1)
    assert data.hex() == "5032504d53474b460100" + SEED_1_1.hex() + "35a6a491325e92babd2779e3173e830c"
    assert read_key_file(data, None, allow_unencrypted=True) == SEED_1_1
    with pytest.raises(CleanroomError, match="unencrypted"):
        read_key_file(data, "any passphrase")


INVITE_6_6 = (
    "p2pmsg://invite/12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"
    "?addr=%2Fip4%2F192.0.2.7%2Ftcp%2F4001&addr=%2Fip6%2F2001%3Adb8%3A%3A1%2Ftcp%2F443%2Fws"
)


def test_invite_worked_example_6_6() -> None:
    peer, addrs = parse_invite(INVITE_6_6)
    assert peer == ALICE.peer_id
    assert addrs == ["/ip4/192.0.2.7/tcp/4001", "/ip6/2001:db8::1/tcp/443/ws"]
    assert make_invite(ALICE.peer_id_text, addrs) == INVITE_6_6
    assert parse_invite("\n" + INVITE_6_6.replace("p2pmsg://invite", "P2PMSG://Invite") + "\n") == (peer, addrs)


def test_control_frames_worked_example_7_7() -> None:
    request = encode_frame({"id": 2, "method": "send", "params": {"name": "bob", "text": "hi"}})
    assert request.hex() == (
        "0000002a83a2696402a66d6574686f64a473656e64a6706172616d7382a46e616d65a3626f62a474657874a26869"
    )
    hex_id = "00112233445566778899aabbccddeeff"
    response = encode_frame({"id": 2, "result": {"id": hex_id, "status": "queued"}})
    assert response.hex() == (
        "0000004082a2696402a6726573756c7482a26964d920" + hex_id.encode().hex() + "a6737461747573a6717565756564"
    )
    assert decode_frame_body(response[4:]) == {"id": 2, "result": {"id": hex_id, "status": "queued"}}
    smallest = encode_frame({"id": 1, "method": "id", "params": {}})
    assert smallest.hex() == "0000001783a2696401a66d6574686f64a26964a6706172616d7380" and len(smallest) == 27
    error = encode_frame({"id": 3, "error": {"code": "unknown_contact", "message": "no contact named 'zed'"}})
    assert error.hex() == (
        "0000004082a2696403a56572726f7282a4636f6465af756e6b6e6f776e5f636f6e74616374a76d657373616765b66e6f20636f6e"
        "74616374206e616d656420277a656427"
    )
    event = encode_frame({"event": "receipt", "ids": [hex_id], "peer_id": "x", "status": "delivered"})
    assert event.hex() == (
        "0000005184a56576656e74a772656365697074a3696473"
        + "91d920"
        + hex_id.encode().hex()
        + "a7706565725f6964a178a6737461747573a964656c697665726564"
    )


# ---------------------------------------------------------------- real nodes

PASSPHRASE = "clean room passphrase ✓"


@dataclass
class Pair:
    a: Node  # with a passphrase
    b: Node  # without


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base = tmp_path_factory.mktemp("local")
    a, b = Node("a", base, passphrase=PASSPHRASE), Node("b", base)
    started: list[Process] = []
    try:
        for n in (a, b):
            n.init()
        for n in (a, b):
            started.append(n)
            n.start()
        ida, idb = a.call("id"), b.call("id")
        a.call("contacts.add", {"target": idb["invite"], "name": "b"})
        b.call("contacts.add", {"target": ida["invite"], "name": "a"})
        yield Pair(a, b)
    finally:
        stop_all(started)


def test_invite_of_id_matches_its_addresses(pair: Pair) -> None:
    ident = pair.a.call("id")
    peer, addrs = parse_invite(ident["invite"])
    assert peer == parse_peer_id(ident["peer_id"]) == pair.a.peer_id
    suffix = "/p2p/" + ident["peer_id"]
    assert ident["addrs"] and all(a.endswith(suffix) for a in ident["addrs"]), "7.4: id addrs end in /p2p/<peer id>"
    assert all(parse_multiaddr(a).canonical == a for a in ident["addrs"])
    assert addrs == [a.removesuffix(suffix) for a in ident["addrs"]]
    assert f"/ip4/127.0.0.1/tcp/{pair.a.port}" in addrs
    assert make_invite(ident["peer_id"], addrs) == ident["invite"], "6.6: the writer's exact form"
    assert pair.a.call("status")["addrs"] == addrs, "7.4: status.addrs are the invite's addresses"


@pytest.mark.parametrize("name", ["a", "b"])
def test_key_file_holds_the_node_identity(pair: Pair, name: str) -> None:
    node: Node = getattr(pair, name)
    data = (node.home / "identity.key").read_bytes()
    if node.passphrase is None:
        assert len(data) == 58 and data[9] == 0
        seed = read_key_file(data, None, allow_unencrypted=True)
    else:
        assert len(data) == 126 and data[9] == 1
        assert struct.unpack(">IQ", data[10:22]) == (3, 268435456), "1.2: the writer's default KDF parameters"
        seed = read_key_file(data, node.passphrase)
    assert Identity(seed).peer_id_text == node.peer_id_text


def test_file_modes(pair: Pair) -> None:
    """7.1, 7.8: the home 0700; the key file, config.toml and the control socket 0600."""
    home = pair.a.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("identity.key", "config.toml", "control.sock"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    assert stat.S_ISSOCK((home / "control.sock").stat().st_mode)


def test_status_and_id(pair: Pair) -> None:
    ident, status = pair.a.call("id"), pair.a.call("status")
    assert set(ident) == {"peer_id", "addrs", "invite"}
    assert status["peer_id"] == ident["peer_id"]
    assert status["database"] in ("not checked", "checking", "ok", "damaged")
    assert status["store_failing"] is None  # nil while writes work (7.4)
    for key in ("uptime_s", "dht_size", "connections", "outbox_depth", "requests"):
        assert isinstance(status[key], int) and status[key] >= 0, key
    for key in ("listener", "dht", "dropped", "maintenance_failures"):
        assert isinstance(status[key], dict), key
    host, _, port = status["dht_address"].rpartition(":")
    assert host == "127.0.0.1" and int(port) == pair.a.dht_port


def test_message_reaches_a_subscriber_and_history(pair: Pair) -> None:
    with pair.a.control() as sub:
        sub.subscribe()
        text = f"clean room {time.time()} ✓"
        sent = pair.b.call("send", {"name": "a", "text": text})
        assert sent["status"] == "queued" and len(sent["id"]) == 32 and int(sent["id"], 16) >= 0
        deadline = time.monotonic() + 20
        while True:
            sub.sock.settimeout(max(0.01, deadline - time.monotonic()))
            ev = sub.next_event()
            if ev["event"] == "message" and ev["id"] == sent["id"]:
                break
    expected = {"peer_id": pair.b.peer_id_text, "name": "b", "from": pair.b.peer_id_text, "text": text}
    assert {k: ev[k] for k in expected} == expected
    assert ev["direction"] == "in" and isinstance(ev["ts"], int)
    last = pair.a.call("history", {"name": "b", "limit": 10})[-1]
    assert (last["id"], last["text"], last["status"], last["direction"]) == (sent["id"], text, "received", "in")
    pair.b.wait_status("a", text, "delivered")


@pytest.mark.parametrize(
    ("method", "params", "code", "message"),
    [
        ("send", {"name": "zed", "text": "x"}, "unknown_contact", "no contact named 'zed'"),
        ("history", {"name": "b", "limit": "5"}, "bad_request", "history.limit: expected int, got str"),
        ("nosuch", {}, "bad_request", "unknown method 'nosuch'"),
        ("history", {"name": "b", "before_seq": 3}, "bad_request", "before_seq: "),
        ("send", {"name": "b", "text": ""}, "bad_request", "send.text"),
        ("contacts.add", {"target": "p2pmsg://invite/nonsense", "name": "n"}, "invalid_invite", ""),
        ("contacts.add", {"target": make_invite(ALICE.peer_id_text, []), "name": "B"}, "name_taken", ""),
    ],
)
def test_control_error_answers(pair: Pair, method: str, params: dict[str, Any], code: str, message: str) -> None:
    with pair.a.control() as client:
        with pytest.raises(ControlError) as err:
            client.call(method, params)
        assert err.value.code == code
        assert err.value.message.startswith(message), err.value.message
        assert client.call("id")["peer_id"] == pair.a.peer_id_text, "the connection stays usable"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            bytes.fromhex("001e8480"),
            "control frame: length: frame of 2000000 bytes is larger than the limit of 1048576",
        ),
        (b"\0\0\0\0", ""),
        (encode_frame({"id": 1, "method": "id", "params": {}, "x": 1}), ""),
        (struct.pack(">I", 1) + b"\x05", ""),  # a body that is not a map
    ],
    ids=["oversize", "zero_length", "unknown_request_key", "not_a_map"],
)
def test_malformed_control_frame_closes_the_connection(pair: Pair, data: bytes, message: str) -> None:
    """7.3, 7.6: an error with id 0 (bad_request), then the node closes that connection."""
    with pair.a.control() as client:
        client.send_raw(data)
        answer = client.recv_frame()
        assert answer["id"] == 0 and answer["error"]["code"] == "bad_request"
        assert answer["error"]["message"].startswith(message), answer
        with pytest.raises(EOFError):
            client.recv_frame()
    assert pair.a.call("id")["peer_id"] == pair.a.peer_id_text, "other connections are unaffected"


def test_store_file_matches_history(pair: Pair) -> None:
    """Section 8, read with sqlite3 after the node stopped. Stops `a`: keep this test last."""
    text = f"to b, for the store {time.time()}"
    pair.a.call("send", {"name": "b", "text": text})
    pair.a.wait_status("b", text, "delivered")
    history = pair.a.call("history", {"name": "b", "limit": 1000})
    assert pair.a.stop() == 0
    assert not (pair.a.home / "control.sock").exists(), "7.1: the node removes its socket on shutdown"
    db = read_store(pair.a.home / "p2pmsg.db", pair.b.peer_id)
    assert db["application_id"] == APPLICATION_ID
    assert db["user_version"] == 5
    assert db["page_size"] == 16384
    assert db["tables"] >= TABLES
    keys = ("id", "from", "text", "ts", "status", "direction", "seq")
    assert [{k: r[k] for k in keys} for r in db["messages"]] == [{k: h[k] for k in keys} for h in history]
    mine = next(r for r in db["messages"] if r["text"] == text)
    assert mine["stored_status"] in ("queued", "sent"), "8.4.9: delivered is derived from the missing outbox row"
    assert {"peer_id": pair.b.peer_id_text, "name": "b", "state": "contact"} in db["contacts"]

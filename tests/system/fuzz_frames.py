"""Garbage for a running node: random bytes and malformed frames on each of its ports, from plain sockets.

Every function sends a bounded number of inputs, with a timeout on every socket operation, and never needs an
answer (a node may close, reset or ignore).  ``rng`` makes the inputs reproducible.  What each function sends:

* :func:`tcp_garbage` -- the TCP listener (Noise handshake frames ``u16be length || message``): random bytes, a
  truncated frame, a frame of maximal length, an empty connection, and a well-formed message 1 followed by a
  random message 3 (fails to decrypt after the node's message 2).
* :func:`ws_garbage` -- the WebSocket listener: non-HTTP bytes, a plain GET, a wrong path, then after a valid
  upgrade a text message, a message above 65 537 bytes, a frame with reserved bits and opcode, and random binary
  messages (random Noise bytes inside a valid WebSocket).
* :func:`udp_garbage` -- the DHT socket (rpcudp datagrams ``0x00|0x01 || 20-byte id || msgpack``): random datagrams,
  bad msgpack, an unknown RPC, a response nobody asked for, one near-64 KiB datagram.
* :func:`control_garbage` -- the control socket (``u32be length || msgpack map``): random bytes, a zero length, an
  oversize length, a non-map body, a request with an unknown key, a truncated frame, and a frame from a subscriber.
* :func:`chat_garbage` -- a stranger with a real identity that completes the Noise handshake and then speaks
  nonsense in the chat session (``u32be length || msgpack``): an oversize length, a non-map frame, a message
  before the hello, a malformed envelope.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import socket
import struct
from pathlib import Path

import msgpack
import trio

from p2pmsg.identity import Identity, PeerId
from p2pmsg.net.dialer import dial
from p2pmsg.wire.multiaddr import Multiaddr

TIMEOUT = 3.0


def _send(host: str, port: int, *chunks: bytes, read: bool = False, linger: float = 0.0) -> bytes:
    """Connect, send ``chunks``, optionally read what comes back (until EOF or timeout), close."""
    got = b""
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        with contextlib.suppress(OSError):
            for chunk in chunks:
                sock.sendall(chunk)
        if read or linger:
            sock.settimeout(linger or 1.0)
            with contextlib.suppress(OSError):
                while len(got) < 1 << 20:
                    data = sock.recv(65536)
                    if not data:
                        break
                    got += data
    return got


def tcp_garbage(host: str, port: int, rng: random.Random, *, count: int = 20) -> None:
    """Throw malformed Noise handshakes at a TCP listener (see the module docstring)."""
    for _ in range(count):
        _send(host, port, rng.randbytes(rng.randint(1, 4096)))
    _send(host, port, b"\x00\x20" + rng.randbytes(10))  # a frame cut short, then EOF
    _send(host, port, b"\xff\xff" + rng.randbytes(65535))  # the largest frame, random content
    _send(host, port)  # connect and hang up
    # A well-formed message 1 (a random X25519 key is a valid ephemeral key), then random bytes as message 3.
    _send(host, port, b"\x00\x20" + rng.randbytes(32), read=False, linger=0.3)
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(b"\x00\x20" + rng.randbytes(32))
        header = _recv_exactly(sock, 2)
        if header is not None:
            _recv_exactly(sock, struct.unpack(">H", header)[0])
            with contextlib.suppress(OSError):
                sock.sendall(b"\x00\x60" + rng.randbytes(96))
                sock.settimeout(1.0)
                sock.recv(1)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    with contextlib.suppress(OSError):
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data
    return None


def _ws_frame(opcode: int, payload: bytes, rng: random.Random, *, fin: bool = True, rsv: int = 0) -> bytes:
    """One client (masked) WebSocket frame."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    size = len(payload)
    if size < 126:
        header = struct.pack(">BB", first, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack(">BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack(">BBQ", first, 0x80 | 127, size)
    mask = rng.randbytes(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def _upgrade(host: str, port: int, path: str = "/") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _ws_session(host: str, port: int, rng: random.Random, *frames: bytes) -> list[tuple[int, bytes]]:
    """Upgrade a connection, wait for the 101 answer, send ``frames`` (a client must not send frames before the
    answer: a server may drop what comes with the request), and return the server's frames (opcode, payload) up to
    its Close, EOF or 1.5 s."""
    out: list[tuple[int, bytes]] = []
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(_upgrade(host, port))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return out
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise AssertionError(f"WebSocket upgrade refused: {head[:100]!r}")
        with contextlib.suppress(OSError):
            for frame in frames:
                sock.sendall(frame)
        sock.settimeout(1.5)
        with contextlib.suppress(OSError):
            while True:
                parsed = _server_frame(data)
                if parsed is not None:
                    opcode, payload, data = parsed
                    out.append((opcode, payload))
                    if opcode == 0x8:
                        break
                    continue
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    return out


def _server_frame(data: bytes) -> tuple[int, bytes, bytes] | None:
    """The first (unmasked) server frame of ``data`` and the rest, or None if incomplete."""
    if len(data) < 2:
        return None
    opcode, size, offset = data[0] & 0x0F, data[1] & 0x7F, 2
    if size == 126:
        if len(data) < 4:
            return None
        size, offset = struct.unpack(">H", data[2:4])[0], 4
    elif size == 127:
        if len(data) < 10:
            return None
        size, offset = struct.unpack(">Q", data[2:10])[0], 10
    if len(data) < offset + size:
        return None
    return opcode, data[offset : offset + size], data[offset + size :]


def close_code(frames: list[tuple[int, bytes]]) -> int | None:
    """The status code of the Close frame among ``frames`` (None: no Close, or one without a code)."""
    for opcode, payload in frames:
        if opcode == 0x8 and len(payload) >= 2:
            return int(struct.unpack(">H", payload[:2])[0])
    return None


def ws_garbage(host: str, port: int, rng: random.Random, *, count: int = 10) -> dict[str, bytes | int | None]:
    """Throw malformed WebSocket traffic at a ``/ws`` listener; return what it answered, by case: the HTTP answer
    (bytes) to a bad upgrade, the Close status (int, or None: no Close frame) to a bad stream after the upgrade."""
    for _ in range(count):
        _send(host, port, rng.randbytes(rng.randint(1, 2048)))
    answers: dict[str, bytes | int | None] = {
        "plain GET": _send(host, port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), read=True),
        "wrong path": _send(host, port, _upgrade(host, port, "/nowhere"), read=True),
        "huge header": _send(host, port, b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", read=True),
        "text": close_code(_ws_session(host, port, rng, _ws_frame(0x1, b"hello as text", rng))),
        "too big": close_code(_ws_session(host, port, rng, _ws_frame(0x2, rng.randbytes(70000), rng))),
        "reserved": close_code(_ws_session(host, port, rng, _ws_frame(0x3, b"reserved", rng, rsv=0b111))),
        "unmasked": close_code(_ws_session(host, port, rng, b"\x82\x05hello")),
        "2**63 length": close_code(_ws_session(host, port, rng, b"\x82\xff" + b"\x7f" + b"\xff" * 7 + b"mask")),
    }
    # Random bytes as Noise handshake message 1, inside valid binary messages (some split in fragments).
    for i in range(count):
        payload = rng.randbytes(rng.randint(1, 512))
        if rng.random() < 0.5:
            frames = [_ws_frame(0x2, payload, rng)]
        else:
            frames = [_ws_frame(0x2, payload[:1], rng, fin=False), _ws_frame(0x0, payload[1:], rng)]
        answers[f"noise {i}"] = close_code(_ws_session(host, port, rng, *frames))
    return answers


def udp_garbage(host: str, port: int, rng: random.Random, *, count: int = 60) -> None:
    """Throw malformed rpcudp datagrams at the DHT socket."""
    datagrams = [rng.randbytes(rng.randint(0, 1400)) for _ in range(count)]
    datagrams += [
        b"\x00" + rng.randbytes(20) + b"\xc1\xc1\xc1",  # 0xc1 is never used in msgpack
        b"\x00" + rng.randbytes(20) + msgpack.packb(["no_such_rpc", [1, 2, 3]]),
        b"\x00" + rng.randbytes(20) + msgpack.packb({"not": "a list"}),
        b"\x00" + rng.randbytes(20) + msgpack.packb(["find_node", [b"short", "x"]]),
        b"\x01" + rng.randbytes(20) + msgpack.packb([True, b"answer to nothing"]),
        b"\x02" + rng.randbytes(40),
        b"\x00" + rng.randbytes(5),
        b"\x00" + rng.randbytes(20) + rng.randbytes(60000),
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for datagram in datagrams:
            with contextlib.suppress(OSError):
                sock.sendto(datagram, (host, port))


def _control(path: Path, *chunks: bytes) -> bytes:
    """Connect to the control socket, send ``chunks``, read until the node closes (or 1 s passes)."""
    got = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        with contextlib.suppress(OSError):
            for chunk in chunks:
                sock.sendall(chunk)
        sock.settimeout(1.0)
        with contextlib.suppress(OSError):
            while len(got) < 1 << 20:
                data = sock.recv(65536)
                if not data:
                    break
                got += data
    return got


def _frame(value: object) -> bytes:
    body: bytes = msgpack.packb(value)
    return struct.pack(">I", len(body)) + body


def control_garbage(path: Path, rng: random.Random, *, count: int = 10) -> list[bytes]:
    """Throw malformed frames at a node's control socket; return what it answered on each connection."""
    answers = [_control(path, rng.randbytes(rng.randint(1, 512))) for _ in range(count)]  # mostly oversize
    for _ in range(count):  # a plausible length, random bytes as the body
        size = rng.randint(1, 200)
        answers.append(_control(path, struct.pack(">I", size) + rng.randbytes(size)))
    answers.append(_control(path, b"\x00\x00\x00\x00"))  # zero length
    answers.append(_control(path, b"\x7f\xff\xff\xff" + rng.randbytes(100)))  # oversize
    answers.append(_control(path, _frame([1, "id", {}])))  # not a map
    answers.append(_control(path, _frame({"id": 1, "method": "id", "params": {}, "extra": True})))
    answers.append(_control(path, _frame({"id": "one", "method": "id", "params": {}})))
    answers.append(_control(path, b"\x00\x00\x00\x64" + b"\x83" + rng.randbytes(10)))  # EOF inside a frame
    answers.append(_control(path, b"\x00\x00\x00\x02\xc1\xc1"))  # bytes that are not msgpack
    subscribe = _frame({"id": 1, "method": "subscribe", "params": {}})
    answers.append(_control(path, subscribe, _frame({"id": 2, "method": "id", "params": {}})))
    return answers


async def _chat_session(identity: Identity, peer: PeerId, addr: Multiaddr, payload: bytes) -> None:
    with trio.move_on_after(TIMEOUT):
        channel = await dial(identity, peer, [addr], timeout=TIMEOUT)
        try:
            await channel.send_all(payload)
            with trio.move_on_after(1.0):
                while await channel.receive_some(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(channel)


def chat_garbage(peer_id: str, addr: str) -> None:
    """As a stranger with a fresh identity, open authenticated channels to ``peer_id`` and send malformed chat
    session frames on each."""
    identity = Identity.generate()
    peer = PeerId.from_string(peer_id)
    target = Multiaddr.parse(addr).without_peer_id()
    hello = _frame({"v": 1, "proto": "p2pmsg/chat/1"})
    payloads = [
        b"\xff\xff\xff\xff" + b"x" * 64,  # a length far above the frame limit
        _frame(["not", "a", "map"]),
        _frame({"v": 1, "t": "msg", "env": b"\x00" * 32}),  # a message before the hello
        hello + _frame({"v": 1, "t": "msg", "env": b"\x92\x01\x02"}),  # an envelope that is not an envelope
        hello + _frame({"v": 1, "t": "ack", "ids": []}),  # an ack of nothing
        hello + b"\x00\x00\x00\x10" + b"\x80",  # EOF inside a frame
    ]

    async def main() -> None:
        for payload in payloads:
            await _chat_session(identity, peer, target, payload)

    trio.run(main)

"""An attacker for tests/netns/test_flood.py: run on a host of a netns LAN, it floods one node from many addresses.

Usage: ``python flood.py TARGET TCP_PORT WS_PORT STOP_FILE SOURCE...``.  In this order, from the SOURCE addresses
(the host's own, see :meth:`lan.Lan.add_network`):

1. one WebSocket connection from the first source: the upgrade, then four times a source's small-frame burst of
   empty binary messages in one write, and it waits (at most 5 s) for the node to drop it;
2. :data:`JUNK_CONNECTIONS` connections from the first source that each send random bytes instead of a handshake
   and hang up;
3. connections opened and closed at once, round-robin over every source, at most :data:`RATE` a second (enough to
   keep the node's buckets empty without taking a core from the nodes under test), until STOP_FILE exists,
   :data:`MAX_SECONDS` passed or :data:`MAX_CONNECTIONS` were made.

Then it prints one JSON object of counts and exits.  Not a test module (no ``test_`` prefix): pytest leaves it alone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from p2pmsg.net.websocket import WS_SMALL_FRAME_BURST

RATE = 1500
MAX_SECONDS = 60.0
MAX_CONNECTIONS = 60_000
JUNK_CONNECTIONS = 3
UPGRADE = (
    "GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
EMPTY_MESSAGE = b"\x82\x80\x01\x02\x03\x04"  # FIN, binary, masked, no payload


def connect(source: str, target: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect((target, port))
    return sock


def websocket_flood(source: str, target: str, port: int) -> str:
    """The upgrade, then the flood of empty messages; how the connection ended."""
    with connect(source, target, port) as sock:
        sock.sendall(UPGRADE.format(host=target, port=port).encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                return "closed before the upgrade was answered"
            answer += chunk
        if not answer.startswith(b"HTTP/1.1 101"):
            return f"upgrade refused: {answer[:40]!r}"
        try:
            sock.sendall(EMPTY_MESSAGE * (4 * WS_SMALL_FRAME_BURST))
            while sock.recv(4096):
                pass
        except TimeoutError:
            return "not dropped within 5 s"
        except OSError as exc:
            return f"dropped ({type(exc).__name__})"
        return "dropped"


def main(argv: list[str]) -> int:
    target, tcp_port, ws_port, stop_file, *sources = argv
    counts: dict[str, object] = {"websocket": websocket_flood(sources[0], target, int(ws_port))}
    for _ in range(JUNK_CONNECTIONS):
        with connect(sources[0], target, int(tcp_port)) as sock:
            sock.sendall(os.urandom(64))
    made = failed = 0
    start = time.monotonic()
    while made + failed < MAX_CONNECTIONS and time.monotonic() - start < MAX_SECONDS:
        if os.path.exists(stop_file):  # every time: a connect to a stuck node can take its whole 5 s timeout
            break
        ahead = (made + failed) / RATE - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
        try:
            connect(sources[(made + failed) % len(sources)], target, int(tcp_port)).close()
            made += 1
        except OSError:
            failed += 1
    counts.update(connections=made, failed=failed, seconds=round(time.monotonic() - start, 1))
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Envelope v1 / Message v2, Ack and the session protocol p2pmsg/chat/1 (docs/protocol.md sections 6.1-6.3).

Written from docs/protocol.md alone; imports nothing from p2pmsg or the other test folders.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import nacl.bindings as nb

from .encoding import CleanroomError
from .identity import Identity, pk_from_peer_id
from .noise import ChannelClosed, SecureChannel, handshake_initiator

MAX_ENVELOPE_SIZE = 65872
MAX_HELLO_SIZE = 1024
MAX_SESSION_FRAME_SIZE = MAX_ENVELOPE_SIZE + 64
PROTO = "p2pmsg/chat/1"
CLIENT_RUN = os.urandom(16)  # the hello's `run`: drawn once per start of this client

ENVELOPE_KEYS = {"v", "id", "from", "to", "nonce", "box"}
MESSAGE_KEYS = {"v", "id", "from", "to", "ts", "kind", "text"}

Frame = dict[str, Any]


def now_ms() -> int:
    return int(time.time() * 1000)


def new_message_id(ts: int) -> bytes:
    return ((ts // 60000) % 2**32).to_bytes(4, "big") + os.urandom(12)


def shared_key(own: Identity, peer_id: bytes) -> bytes:
    peer_x = nb.crypto_sign_ed25519_pk_to_curve25519(pk_from_peer_id(peer_id))
    return nb.crypto_box_beforenm(peer_x, own.x_sk)


def pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def seal(
    own: Identity,
    to: bytes,
    text: str,
    ts: int | None = None,
    mid: bytes | None = None,
    nonce: bytes | None = None,
    inner_overrides: dict[str, Any] | None = None,
    outer_overrides: dict[str, Any] | None = None,
) -> tuple[bytes, bytes]:
    """Return (message id, encoded Envelope). The overrides build envelopes a node must refuse."""
    ts = now_ms() if ts is None else ts
    mid = mid or new_message_id(ts)
    nonce = nonce or os.urandom(24)
    msg: dict[str, Any] = {"v": 2, "id": mid, "from": own.peer_id, "to": to, "ts": ts, "kind": "text", "text": text}
    msg.update(inner_overrides or {})
    box = nb.crypto_box_afternm(pack(msg), nonce, shared_key(own, to))
    env: dict[str, Any] = {"v": 1, "id": mid, "from": own.peer_id, "to": to, "nonce": nonce, "box": box}
    env.update(outer_overrides or {})
    return mid, pack(env)


def open_envelope(own: Identity, env_bytes: bytes) -> dict[str, Any]:
    """Steps 1-7 of section 6.1 (the subset a client needs); raises CleanroomError naming the part."""
    if len(env_bytes) > MAX_ENVELOPE_SIZE:
        raise CleanroomError("envelope too long")
    env = msgpack.unpackb(env_bytes, raw=False)
    if not isinstance(env, dict) or set(env) != ENVELOPE_KEYS or env["v"] != 1:
        raise CleanroomError(f"bad envelope: {env!r}")
    for key, size in (("id", 16), ("from", 38), ("to", 38), ("nonce", 24)):
        if not isinstance(env[key], bytes) or len(env[key]) != size:
            raise CleanroomError(f"envelope.{key}")
    if env["to"] != own.peer_id:
        raise CleanroomError("envelope.to: wrong recipient")
    plaintext = nb.crypto_box_open_afternm(env["box"], env["nonce"], shared_key(own, env["from"]))
    msg = msgpack.unpackb(plaintext, raw=False)
    if not isinstance(msg, dict) or set(msg) != MESSAGE_KEYS or msg["v"] != 2 or msg["kind"] != "text":
        raise CleanroomError(f"bad message: {msg!r}")
    for key in ("id", "from", "to"):
        if msg[key] != env[key]:
            raise CleanroomError(f"message.{key} mismatch")
    return msg


def session_frame(obj: Frame) -> bytes:
    body = pack(obj)
    return struct.pack(">I", len(body)) + body


def hello_frame(run: bytes | None = None) -> Frame:
    hello: Frame = {"v": 1, "proto": PROTO}
    if run is not None:
        hello["run"] = run
    return hello


def msg_frame(env: bytes) -> Frame:
    return {"v": 1, "t": "msg", "env": env}


def ack_frame(ids: list[bytes]) -> Frame:
    return {"v": 1, "t": "ack", "ids": ids}


class ChatSession:
    """One p2pmsg/chat/1 session over a SecureChannel (blocking)."""

    def __init__(self, channel: SecureChannel, own: Identity):
        self.ch, self.own = channel, own
        self.peer_hello: Frame | None = None

    def send_frame(self, obj: Frame) -> None:
        self.ch.write(session_frame(obj))

    def send_raw(self, data: bytes) -> None:
        self.ch.write(data)

    def send_hello(self, run: bytes | None = None) -> None:
        self.send_frame(hello_frame(run))

    def send_msg(self, env: bytes) -> None:
        self.send_frame(msg_frame(env))

    def send_ack(self, ids: list[bytes]) -> None:
        self.send_frame(ack_frame(ids))

    def recv_frame(self) -> Frame | None:
        header = self.ch.read_exact(4)
        if header is None:
            return None
        (length,) = struct.unpack(">I", header)
        limit = MAX_HELLO_SIZE if self.peer_hello is None else MAX_SESSION_FRAME_SIZE
        if not 1 <= length <= limit:
            raise CleanroomError(f"frame length {length}")
        body = self.ch.read_exact(length)
        if body is None:
            raise CleanroomError("end of stream inside a frame")
        obj = msgpack.unpackb(body, raw=False)
        if not isinstance(obj, dict):
            raise CleanroomError("frame is not a map")
        if self.peer_hello is None:
            if obj.get("v") != 1 or obj.get("proto") != PROTO:
                raise CleanroomError(f"bad hello {obj!r}")
            self.peer_hello = obj
        return obj

    def recv_until(self, pred: Callable[[Frame], bool], timeout: float = 10.0) -> Frame:
        """Read frames until pred(frame); return that frame. Bounded by `timeout` in all."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching frame in time")
            self.ch.sock.settimeout(left)
            frame = self.recv_frame()
            if frame is None:
                raise ChannelClosed("session ended")
            if pred(frame):
                return frame

    def recv_message(self, text: str, timeout: float = 10.0) -> dict[str, Any]:
        """Read until a Msg whose opened text is `text`; return the opened Message."""
        found: dict[str, Any] = {}

        def is_it(frame: Frame) -> bool:
            if frame.get("t") != "msg":
                return False
            msg = open_envelope(self.own, frame["env"])
            if msg["text"] != text:
                return False
            found.update(msg, env=frame["env"])
            return True

        self.recv_until(is_it, timeout)
        return found

    def wait_ack(self, mid: bytes, timeout: float = 10.0) -> Frame:
        return self.recv_until(lambda f: f.get("t") == "ack" and mid in f.get("ids", []), timeout)

    def acked_before_sentinel(self, mid: bytes, to: bytes, timeout: float = 10.0) -> bool:
        """Send a sentinel message; True if `mid` is acknowledged before (or with) the sentinel.

        Acks follow the order the messages were stored, so once the sentinel is acknowledged every earlier message
        that the node stored has been acknowledged too.
        """
        s_mid, s_env = seal(self.own, to, f"sentinel {os.urandom(6).hex()}")
        self.send_msg(s_env)
        seen: set[bytes] = set()
        deadline = time.monotonic() + timeout
        while s_mid not in seen:
            frame = self.recv_until(lambda f: f.get("t") == "ack", max(0.01, deadline - time.monotonic()))
            seen.update(frame["ids"])
        return mid in seen

    def expect_closed(self, timeout: float = 5.0) -> bool:
        """True if the peer closes the connection within `timeout` (frames read meanwhile are discarded)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.ch.sock.settimeout(left)
                if self.recv_frame() is None:
                    return True
        except (ChannelClosed, ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.ch.close()


def dial(host: str, port: int, ident: Identity, expect_peer: bytes | None, timeout: float = 10.0) -> SecureChannel:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return handshake_initiator(sock, ident, expect_peer)


def open_session(port: int, ident: Identity, expect_peer: bytes, hello: bool = True) -> ChatSession:
    session = ChatSession(dial("127.0.0.1", port, ident, expect_peer), ident)
    if hello:
        session.send_hello(CLIENT_RUN)
    return session

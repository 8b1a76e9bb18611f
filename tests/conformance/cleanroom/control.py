"""Control API client over the node's Unix socket (docs/protocol.md section 7).

Written from docs/protocol.md alone; imports nothing from p2pmsg or the other test folders.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import msgpack

from .encoding import CleanroomError

MAX_RESPONSE = 16 * 1024 * 1024


class ControlError(CleanroomError):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def encode_frame(obj: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def decode_frame_body(body: bytes) -> dict[str, Any]:
    obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    if not isinstance(obj, dict):
        raise CleanroomError("frame is not a map")
    return obj


class ControlClient:
    def __init__(self, home: Path, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(home / "control.sock"))
        except OSError:
            self.sock.close()
            raise
        self.next_id = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("control socket closed")
            buf += chunk
        return bytes(buf)

    def send_frame(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(encode_frame(obj))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> dict[str, Any]:
        (n,) = struct.unpack(">I", self._recv_exact(4))
        if not 1 <= n <= MAX_RESPONSE:
            raise CleanroomError(f"bad frame length {n}")
        return decode_frame_body(self._recv_exact(n))

    def call_raw(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        rid = self.next_id
        self.next_id += 1
        self.send_frame({"id": rid, "method": method, "params": params or {}})
        resp = self.recv_frame()
        if resp.get("id") != rid:
            raise CleanroomError(f"response id {resp.get('id')} is not {rid}: {resp}")
        return resp

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        resp = self.call_raw(method, params)
        if "error" in resp:
            raise ControlError(resp["error"]["code"], resp["error"]["message"])
        return resp["result"]

    def subscribe(self) -> None:
        if self.call("subscribe") != {}:
            raise CleanroomError("subscribe did not answer {}")

    def next_event(self) -> dict[str, Any]:
        ev = self.recv_frame()
        if "event" not in ev:
            raise CleanroomError(f"expected an event, got {ev}")
        return ev

"""DHT datagrams, the p2pmsg mark, p2pmsg_auth and signed peer records (docs/protocol.md section 5).

Written from docs/protocol.md alone; imports nothing from p2pmsg or the other test folders.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import struct
import threading
import time
from typing import Any

import msgpack

from .encoding import CleanroomError, b58encode
from .identity import Identity, pk_from_peer_id
from .multiaddr import parse_multiaddr
from .signed_envelope import open_signed, seal_signed

NS_PEER = "p2pmsg-peer-record"
PT_PEER = b"/p2pmsg/peer-record/1"
RECORD_MAGIC = b"P2R\x01"
MAX_RECORD = 2048
MAX_LIFETIME = 7 * 86400
AUTH_DOMAIN = "p2pmsg-dht-auth"
AUTH_PT = b"/p2pmsg/dht-auth/2"
REQUEST, RESPONSE = 0, 1

Address = tuple[str, int]


def marked_message_id(version: int = 2, nonce: bytes | None = None) -> bytes:
    """Section 5.3: 'p2p' || version || 12-byte nonce || sha1('p2p' || version || nonce)[:4]."""
    head = b"p2p" + bytes([version]) + (nonce if nonce is not None else os.urandom(12))
    return head + hashlib.sha1(head).digest()[:4]


def mark_version(mid: bytes) -> int:
    """The extension version a message id advertises, 0 without a valid mark."""
    if len(mid) != 20 or mid[:3] != b"p2p" or mid[3] < 1:
        return 0
    return mid[3] if hashlib.sha1(mid[:16]).digest()[:4] == mid[16:] else 0


def encode_datagram(kind: int, mid: bytes, body: object) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return bytes([kind]) + mid + packed


def record_key(namespace: str, peer_id: bytes) -> bytes:
    return hashlib.sha1(namespace.encode() + peer_id).digest()


def build_peer_record(
    ident: Identity, addrs: list[str], seq: int, expires_at: int, namespace: str = NS_PEER, ptype: bytes = PT_PEER
) -> bytes:
    body = bytes([len(addrs)])
    for a in addrs:
        b = a.encode()
        body += struct.pack(">H", len(b)) + b
    payload = ident.peer_id + struct.pack(">QQ", seq, expires_at) + body
    ns = namespace.encode()
    return RECORD_MAGIC + bytes([len(ns)]) + ns + seal_signed(ident, namespace, ptype, payload)


def verify_peer_record(value: object, key: bytes, now: int | None = None) -> dict[str, Any]:
    """Every check of section 5.7, in its order. Returns the parsed fields."""
    now = int(time.time()) if now is None else now
    if not isinstance(value, bytes) or len(value) > MAX_RECORD:
        raise CleanroomError("not bytes or longer than 2048")
    if value[:4] != RECORD_MAGIC:
        raise CleanroomError("magic")
    n = value[4]
    if not 1 <= n <= 64 or len(value) < 5 + n:
        raise CleanroomError("namespace length")
    ns = value[5 : 5 + n].decode("utf-8")
    if ns != NS_PEER:
        raise CleanroomError(f"unknown namespace {ns}")
    signer, payload = open_signed(value[5 + n :], ns, PT_PEER)
    if len(payload) < 54:
        raise CleanroomError("payload shorter than 54 bytes")
    owner = payload[:38]
    pk_from_peer_id(owner)
    if owner != signer:
        raise CleanroomError("owner is not the signer")
    if key != record_key(ns, signer):
        raise CleanroomError("key mismatch")
    seq, expires_at = struct.unpack(">QQ", payload[38:54])
    if not expires_at > now:
        raise CleanroomError("expired")
    if not expires_at <= now + MAX_LIFETIME:
        raise CleanroomError("expires more than 7 days ahead")
    body = payload[54:]
    if not body or body[0] > 8:
        raise CleanroomError("address count")
    pos, addrs = 1, []
    for _ in range(body[0]):
        if pos + 2 > len(body):
            raise CleanroomError("truncated address length")
        (length,) = struct.unpack(">H", body[pos : pos + 2])
        pos += 2
        if not 1 <= length <= 256 or pos + length > len(body):
            raise CleanroomError("bad address length")
        text = body[pos : pos + length].decode("utf-8")
        pos += length
        ma = parse_multiaddr(text)
        if ma.canonical != text:
            raise CleanroomError(f"non-canonical address {text}")
        if ma.peer is not None and ma.peer != owner:
            raise CleanroomError("address names another peer")
        addrs.append(text)
    if pos != len(body):
        raise CleanroomError("trailing body bytes")
    return {"peer_id": owner, "peer_id_text": b58encode(owner), "seq": seq, "expires_at": expires_at, "addrs": addrs}


def _address_field(addr: Address) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (b"\x04" if ip.version == 4 else b"\x06") + ip.packed + struct.pack(">H", addr[1])


def build_auth_proof(ident: Identity, challenge: bytes, requester: bytes, source: Address) -> bytes:
    """The responder's side of p2pmsg_auth (section 5.6)."""
    payload = challenge + requester + ident.node_id + _address_field(source)
    return seal_signed(ident, AUTH_DOMAIN, AUTH_PT, payload)


def check_auth_proof(proof: object, challenge: bytes, own_node_id: bytes, peer_node_id: bytes) -> tuple[bytes, Address]:
    """The requester's checks of section 5.6, in order. Returns (signer peer id, the address it signed)."""
    if not isinstance(proof, bytes) or len(proof) > 512:
        raise CleanroomError("proof not bin or longer than 512")
    signer, payload = open_signed(proof, AUTH_DOMAIN, AUTH_PT)
    if payload[:72] != challenge + own_node_id + peer_node_id:
        raise CleanroomError("proof header mismatch")
    rest = payload[72:]
    if rest[:1] == b"\x04" and len(rest) == 7:
        addr = (str(ipaddress.IPv4Address(rest[1:5])), struct.unpack(">H", rest[5:7])[0])
    elif rest[:1] == b"\x06" and len(rest) == 19:
        addr = (str(ipaddress.IPv6Address(rest[1:17])), struct.unpack(">H", rest[17:19])[0])
    else:
        raise CleanroomError("bad address field")
    if hashlib.sha1(signer[2:]).digest() != peer_node_id:
        raise CleanroomError("node id is not sha1 of the signer's key")
    return signer, addr


class DhtPeer:
    """A minimal DHT participant on its own UDP socket.

    It answers ping / p2pmsg_auth / find_node / find_value / store / stun (a p2pmsg node proves our address with a
    ping before answering anything but a ping, section 5.5) and sends requests with marked ids.
    """

    def __init__(self, ident: Identity, host: str = "127.0.0.1", mark: int = 2):
        self.ident = ident
        self.mark = mark
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.addr: Address = self.sock.getsockname()
        self._pending: dict[bytes, tuple[Address, threading.Event, list[Any]]] = {}
        self._lock = threading.Lock()
        self.values: dict[bytes, object] = {}
        self.auth_served: list[tuple[Address, bytes, bytes]] = []
        self.requests_in: list[tuple[Address, str, int]] = []  # (source, RPC name, mark version of its id)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()

    def _send(self, kind: int, mid: bytes, body: object, addr: Address) -> None:
        self.sock.sendto(encode_datagram(kind, mid, body), addr)

    def _loop(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) < 22 or data[0] not in (REQUEST, RESPONSE):
                continue
            kind, mid = data[0], data[1:21]
            try:
                body = msgpack.unpackb(data[21:], raw=False, strict_map_key=True)
            except Exception:
                continue
            if kind == RESPONSE:
                with self._lock:
                    pending = self._pending.get(mid)
                if pending and pending[0] == addr:
                    pending[2].append(body)
                    pending[1].set()
            elif isinstance(body, list) and len(body) == 2:
                self.requests_in.append((addr, body[0], mark_version(mid)))
                self._serve(mid, addr, body[0], body[1])

    def _serve(self, mid: bytes, addr: Address, name: str, args: list[Any]) -> None:
        if name == "ping":
            self._send(RESPONSE, mid, self.ident.node_id, addr)
        elif name == "stun":
            self._send(RESPONSE, mid, [addr[0], addr[1]], addr)
        elif name == "store":
            self.values[args[1]] = args[2]
            self._send(RESPONSE, mid, True, addr)
        elif name in ("find_node", "find_value"):
            key = args[1]
            found = name == "find_value" and key in self.values
            self._send(RESPONSE, mid, {"value": self.values[key]} if found else [], addr)
        elif name == "p2pmsg_auth":
            requester, challenge = args
            self.auth_served.append((addr, requester, challenge))
            self._send(RESPONSE, mid, build_auth_proof(self.ident, challenge, requester, addr), addr)

    def request(self, addr: Address, name: str, args: list[Any], timeout: float = 4.0) -> Any:
        mid = marked_message_id(self.mark) if self.mark else os.urandom(20)
        event, box = threading.Event(), list[Any]()
        with self._lock:
            self._pending[mid] = (addr, event, box)
        try:
            self._send(REQUEST, mid, [name, args], addr)
            if not event.wait(timeout):
                raise TimeoutError(f"{name} to {addr}: no answer in {timeout} s")
            return box[0]
        finally:
            with self._lock:
                self._pending.pop(mid, None)

    def ping(self, addr: Address) -> Any:
        return self.request(addr, "ping", [self.ident.node_id])

    def find_node(self, addr: Address, key: bytes) -> Any:
        return self.request(addr, "find_node", [self.ident.node_id, key])

    def find_value(self, addr: Address, key: bytes) -> Any:
        return self.request(addr, "find_value", [self.ident.node_id, key])

    def store(self, addr: Address, key: bytes, value: object) -> Any:
        return self.request(addr, "store", [self.ident.node_id, key, value])

    def stun(self, addr: Address, timeout: float = 4.0) -> Any:
        return self.request(addr, "stun", [], timeout)

    def auth(self, addr: Address, peer_node_id: bytes) -> tuple[bytes, Address]:
        """Challenge a node (section 5.6) and check its proof; return (its peer id, the address it signed)."""
        challenge = os.urandom(32)
        proof = self.request(addr, "p2pmsg_auth", [self.ident.node_id, challenge])
        return check_auth_proof(proof, challenge, self.ident.node_id, peer_node_id)

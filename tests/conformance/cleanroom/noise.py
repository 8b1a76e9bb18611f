"""Noise XX as libp2p-noise uses it, framing and transport messages (docs/protocol.md section 3).

Written from docs/protocol.md alone; imports nothing from p2pmsg or the other test folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import socket
import struct
from typing import Protocol

import nacl.bindings as nb

from .encoding import CleanroomError
from .identity import PUBKEY_PREFIX, Identity, ed25519_verify, peer_id_bytes, pubkey_protobuf

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
STATIC_KEY_PREFIX = b"noise-libp2p-static-key:"
MAX_PAYLOAD = 4096
MSG1_MAX, MSG2_MAX, MSG3_MAX = 32, 32 + 48 + MAX_PAYLOAD + 16, 48 + MAX_PAYLOAD + 16
MAX_PLAINTEXT = 65519


class ChannelClosed(Exception):
    """The peer closed the connection."""


class ByteSocket(Protocol):
    def sendall(self, data: bytes, /) -> None: ...
    def recv(self, n: int, /) -> bytes: ...
    def settimeout(self, t: float | None, /) -> None: ...
    def shutdown(self, how: int, /) -> None: ...
    def close(self) -> None: ...


def hkdf2(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    t = hmac.new(ck, ikm, hashlib.sha256).digest()
    o1 = hmac.new(t, b"\x01", hashlib.sha256).digest()
    o2 = hmac.new(t, o1 + b"\x02", hashlib.sha256).digest()
    return o1, o2


def _nonce(n: int) -> bytes:
    return b"\0\0\0\0" + n.to_bytes(8, "little")


def aead_encrypt(key: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    return nb.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _nonce(n), key)


def aead_decrypt(key: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    return nb.crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _nonce(n), key)


def x25519(priv: bytes, pub: bytes) -> bytes:
    out = nb.crypto_scalarmult(priv, pub)
    if out == b"\0" * 32:
        raise CleanroomError("low-order DH result")
    return out


class SymmetricState:
    def __init__(self) -> None:
        self.h = PROTOCOL_NAME
        self.ck = PROTOCOL_NAME
        self.k: bytes | None = None
        self.n = 0
        self.mix_hash(b"")  # empty prologue

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, dh: bytes) -> None:
        self.ck, self.k = hkdf2(self.ck, dh)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self.k is None:
            c = plaintext
        else:
            c = aead_encrypt(self.k, self.n, self.h, plaintext)
            self.n += 1
        self.mix_hash(c)
        return c

    def decrypt_and_hash(self, c: bytes) -> bytes:
        if self.k is None:
            x = c
        else:
            x = aead_decrypt(self.k, self.n, self.h, c)
            self.n += 1
        self.mix_hash(c)
        return x

    def split(self) -> tuple[bytes, bytes]:
        return hkdf2(self.ck, b"")


def make_payload(ident: Identity, static_pub: bytes) -> bytes:
    """NoiseHandshakePayload: field 1 identity_key, field 2 identity_sig over the static key."""
    sig = ident.sign(STATIC_KEY_PREFIX + static_pub)
    return b"\x0a\x24" + pubkey_protobuf(ident.pk) + b"\x12\x40" + sig


def _uvarint10(buf: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    start = i
    while True:
        if i >= len(buf) or i - start >= 10:
            raise CleanroomError("bad varint")
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            if b == 0 and i - start > 1:
                raise CleanroomError("non-minimal varint")
            return v, i


def parse_payload(payload: bytes, remote_static: bytes) -> bytes:
    """Return the remote Ed25519 key after section 3.4's checks (the subset a client needs)."""
    if len(payload) > MAX_PAYLOAD:
        raise CleanroomError("payload too long")
    fields: dict[int, bytes] = {}
    i = 0
    while i < len(payload):
        tag, i = _uvarint10(payload, i)
        num, wire_type = tag >> 3, tag & 7
        if num == 0:
            raise CleanroomError("field 0")
        val = b""
        if wire_type == 2:
            length, i = _uvarint10(payload, i)
            if i + length > len(payload):
                raise CleanroomError("length past end")
            val = payload[i : i + length]
            i += length
        elif wire_type == 0:
            _, i = _uvarint10(payload, i)
        elif wire_type in (1, 5):
            i += 8 if wire_type == 1 else 4
        else:
            raise CleanroomError(f"wire type {wire_type}")
        if i > len(payload):
            raise CleanroomError("past end")
        if num in (1, 2, 4):
            if wire_type != 2 or num in fields:
                raise CleanroomError(f"field {num}")
            fields[num] = val
    if 1 not in fields or 2 not in fields:
        raise CleanroomError("missing identity field")
    key = fields[1]
    if len(key) != 36 or key[:4] != PUBKEY_PREFIX:
        raise CleanroomError("identity_key not Ed25519")
    pk = key[4:]
    sig = fields[2]
    if len(sig) != 64 or not ed25519_verify(pk, STATIC_KEY_PREFIX + remote_static, sig):
        raise CleanroomError("identity_sig does not verify")
    return pk


def recv_exact(sock: ByteSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise ChannelClosed(f"connection closed after {len(buf)}/{n} bytes")
        buf += chunk
    return bytes(buf)


def _read_handshake_frame(sock: ByteSocket, limit: int) -> bytes:
    (length,) = struct.unpack(">H", recv_exact(sock, 2))
    if length > limit:
        raise CleanroomError(f"handshake message of {length} bytes > {limit}")
    return recv_exact(sock, length)


def _frame(message: bytes) -> bytes:
    return struct.pack(">H", len(message)) + message


class SecureChannel:
    """A Noise transport channel over a blocking socket (sections 3.5, 3.6)."""

    def __init__(self, sock: ByteSocket, send_key: bytes, recv_key: bytes, remote_pk: bytes, handshake_hash: bytes):
        self.sock = sock
        self.send_key, self.recv_key = send_key, recv_key
        self.send_n = self.recv_n = 0
        self.remote_pk = remote_pk
        self.handshake_hash = handshake_hash
        self._plain = bytearray()

    @property
    def remote_peer_id(self) -> bytes:
        return peer_id_bytes(self.remote_pk)

    def encrypt_frame(self, plaintext: bytes) -> bytes:
        ct = aead_encrypt(self.send_key, self.send_n, b"", plaintext)
        self.send_n += 1
        return _frame(ct)

    def write(self, data: bytes) -> None:
        chunks = [data[off : off + MAX_PLAINTEXT] for off in range(0, len(data), MAX_PLAINTEXT)]
        self.sock.sendall(b"".join(self.encrypt_frame(c) for c in chunks))

    def write_empty_frames(self, count: int) -> None:
        self.sock.sendall(b"".join(self.encrypt_frame(b"") for _ in range(count)))

    def write_raw_frame(self, noise_message: bytes) -> None:
        self.sock.sendall(_frame(noise_message))

    def _read_frame(self) -> bytes | None:
        try:
            first = self.sock.recv(1)
        except ConnectionResetError:
            first = b""
        if not first:
            return None
        (length,) = struct.unpack(">H", first + recv_exact(self.sock, 1))
        if length < 16:
            raise CleanroomError("frame shorter than a tag")
        plaintext = aead_decrypt(self.recv_key, self.recv_n, b"", recv_exact(self.sock, length))
        self.recv_n += 1
        return plaintext

    def read_exact(self, n: int) -> bytes | None:
        """n bytes of the plaintext stream; None at a clean end of stream."""
        while len(self._plain) < n:
            plaintext = self._read_frame()
            if plaintext is None:
                if self._plain:
                    raise CleanroomError("stream ended inside a frame")
                return None
            self._plain += plaintext
        out = bytes(self._plain[:n])
        del self._plain[:n]
        return out

    def end_stream(self) -> None:
        """Close our direction (end of stream), keep reading."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def handshake_initiator(
    sock: ByteSocket,
    ident: Identity,
    expect_peer: bytes | None,
    static_priv: bytes | None = None,
    ephemeral_priv: bytes | None = None,
) -> SecureChannel:
    ss = SymmetricState()
    s_priv = static_priv or os.urandom(32)
    e_priv = ephemeral_priv or os.urandom(32)
    s_pub, e_pub = nb.crypto_scalarmult_base(s_priv), nb.crypto_scalarmult_base(e_priv)
    # message 1: -> e
    ss.mix_hash(e_pub)
    sock.sendall(_frame(e_pub + ss.encrypt_and_hash(b"")))
    # message 2: <- e, ee, s, es
    m2 = _read_handshake_frame(sock, MSG2_MAX)
    remote_e = m2[:32]
    ss.mix_hash(remote_e)
    ss.mix_key(x25519(e_priv, remote_e))
    remote_s = ss.decrypt_and_hash(m2[32:80])
    ss.mix_key(x25519(e_priv, remote_s))
    remote_pk = parse_payload(ss.decrypt_and_hash(m2[80:]), remote_s)
    if expect_peer is not None and peer_id_bytes(remote_pk) != expect_peer:
        raise CleanroomError("peer id mismatch")
    # message 3: -> s, se
    c_s = ss.encrypt_and_hash(s_pub)
    ss.mix_key(x25519(s_priv, remote_e))
    c_p = ss.encrypt_and_hash(make_payload(ident, s_pub))
    sock.sendall(_frame(c_s + c_p))
    k1, k2 = ss.split()
    return SecureChannel(sock, k1, k2, remote_pk, ss.h)


def handshake_responder(
    sock: ByteSocket, ident: Identity, static_priv: bytes | None = None, ephemeral_priv: bytes | None = None
) -> SecureChannel:
    ss = SymmetricState()
    s_priv = static_priv or os.urandom(32)
    e_priv = ephemeral_priv or os.urandom(32)
    s_pub, e_pub = nb.crypto_scalarmult_base(s_priv), nb.crypto_scalarmult_base(e_priv)
    m1 = _read_handshake_frame(sock, MSG1_MAX)
    if len(m1) != 32:
        raise CleanroomError("message 1 must be 32 bytes")
    ss.mix_hash(m1)
    ss.decrypt_and_hash(b"")
    ss.mix_hash(e_pub)
    out = e_pub
    ss.mix_key(x25519(e_priv, m1))
    out += ss.encrypt_and_hash(s_pub)
    ss.mix_key(x25519(s_priv, m1))
    out += ss.encrypt_and_hash(make_payload(ident, s_pub))
    sock.sendall(_frame(out))
    m3 = _read_handshake_frame(sock, MSG3_MAX)
    remote_s = ss.decrypt_and_hash(m3[:48])
    ss.mix_key(x25519(e_priv, remote_s))
    remote_pk = parse_payload(ss.decrypt_and_hash(m3[48:]), remote_s)
    k1, k2 = ss.split()
    return SecureChannel(sock, k2, k1, remote_pk, ss.h)


class RecordingSocket:
    """Wraps a socket and keeps every byte received and sent (to compare the exact bytes on the wire)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.received = bytearray()
        self.sent = bytearray()

    def recv(self, n: int, /) -> bytes:
        data = self.sock.recv(n)
        self.received += data
        return data

    def sendall(self, data: bytes, /) -> None:
        self.sent += data
        self.sock.sendall(data)

    def settimeout(self, t: float | None, /) -> None:
        self.sock.settimeout(t)

    def shutdown(self, how: int, /) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

"""Signed envelopes, libp2p's Envelope protobuf with a domain (docs/protocol.md section 1.3).

Written from docs/protocol.md alone; imports nothing from p2pmsg or the other test folders.
"""

from __future__ import annotations

from .encoding import CleanroomError, read_uvarint, uvarint
from .identity import PUBKEY_PREFIX, Identity, ed25519_verify, pubkey_protobuf


def signed_bytes(domain: str, payload_type: bytes, payload: bytes) -> bytes:
    d = domain.encode("utf-8")
    return uvarint(len(d)) + d + uvarint(len(payload_type)) + payload_type + uvarint(len(payload)) + payload


def _field(num: int, value: bytes) -> bytes:
    return uvarint(num << 3 | 2) + uvarint(len(value)) + value


def seal_signed(ident: Identity, domain: str, payload_type: bytes, payload: bytes) -> bytes:
    sig = ident.sign(signed_bytes(domain, payload_type, payload))
    out = _field(1, pubkey_protobuf(ident.pk)) + _field(2, payload_type)
    if payload:
        out += _field(3, payload)
    return out + _field(5, sig)


def open_signed(env: bytes, domain: str, payload_type: bytes, max_size: int = 8192) -> tuple[bytes, bytes]:
    """Return (signer's 38-byte peer id, payload) after the decoding rules of section 1.3, in their order."""
    if len(env) > max_size:
        raise CleanroomError("envelope too large")
    pos, last, fields = 0, 0, {}
    while pos < len(env):
        tag, pos = read_uvarint(env, pos)
        if tag & 7 != 2:
            raise CleanroomError("wire type not 2")
        num = tag >> 3
        if num not in (1, 2, 3, 5):
            raise CleanroomError(f"unknown field {num}")
        if num <= last:
            raise CleanroomError("fields out of order or repeated")
        last = num
        length, pos = read_uvarint(env, pos)
        if length == 0 or pos + length > len(env):
            raise CleanroomError("empty field or length past the end")
        fields[num] = env[pos : pos + length]
        pos += length
    if 1 not in fields or 5 not in fields:
        raise CleanroomError("missing public key or signature")
    key = fields[1]
    if len(key) != 36 or key[:4] != PUBKEY_PREFIX:
        raise CleanroomError("public key is not an Ed25519 PublicKey protobuf")
    if fields.get(2, b"") != payload_type:
        raise CleanroomError(f"payload type {fields.get(2)!r} is not {payload_type!r}")
    sig = fields[5]
    payload = fields.get(3, b"")
    if len(sig) != 64 or not ed25519_verify(key[4:], signed_bytes(domain, payload_type, payload), sig):
        raise CleanroomError("bad signature")
    return b"\x00\x24" + key, payload

"""Base58btc, strict base32 and minimal uvarints (docs/protocol.md sections 1 and 1.1).

Written from docs/protocol.md alone; imports nothing from p2pmsg or the other test folders.
"""

from __future__ import annotations

import base64

B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
B32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


class CleanroomError(ValueError):
    """Input that the document says a reader must refuse."""


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58_ALPHABET[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        i = B58_ALPHABET.find(ch)
        if i < 0:
            raise CleanroomError(f"bad base58 character {ch!r}")
        n = n * 58 + i
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def b32decode_strict(text: str) -> bytes:
    """Lowercase, unpadded, no length of 1, 3 or 6 mod 8, no non-zero trailing bits (section 1.1)."""
    if any(c not in B32_ALPHABET for c in text):
        raise CleanroomError("bad base32 character")
    if len(text) % 8 in (1, 3, 6):
        raise CleanroomError("bad base32 length")
    data = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    if b32encode(data) != text:
        raise CleanroomError("non-zero trailing bits")
    return data


def uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def read_uvarint(buf: bytes, pos: int, max_len: int = 9) -> tuple[int, int]:
    """Return (value, next position); refuse truncated, non-minimal or overlong varints."""
    val = 0
    for i in range(max_len):
        if pos + i >= len(buf):
            raise CleanroomError("truncated varint")
        b = buf[pos + i]
        val |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if i > 0 and b == 0:
                raise CleanroomError("non-minimal varint")
            return val, pos + i + 1
    raise CleanroomError(f"varint longer than {max_len} bytes")

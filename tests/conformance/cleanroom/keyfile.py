"""The key file, format version 1 (docs/protocol.md section 1.2).

Written from docs/protocol.md alone; imports nothing from p2pmsg or the other test folders.
"""

from __future__ import annotations

import hashlib
import struct
import unicodedata

import nacl.bindings as nb
import nacl.pwhash

from .encoding import CleanroomError

MAGIC = b"P2PMSGKF"


def checksum(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def derive_key(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    pw = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    return nacl.pwhash.argon2id.kdf(32, pw, salt, opslimit=opslimit, memlimit=memlimit)


def build_encrypted(seed: bytes, passphrase: str, opslimit: int, memlimit: int, salt: bytes, nonce: bytes) -> bytes:
    key = derive_key(passphrase, salt, opslimit, memlimit)
    head = MAGIC + b"\x01\x01" + struct.pack(">IQ", opslimit, memlimit) + salt + nonce
    body = head + nb.crypto_secretbox(seed, nonce, key)
    return body + checksum(body)


def build_unencrypted(seed: bytes) -> bytes:
    body = MAGIC + b"\x01\x00" + seed
    return body + checksum(body)


def read_key_file(data: bytes, passphrase: str | None, allow_unencrypted: bool = False) -> bytes:
    """Return the seed, after the reading steps of section 1.2 in their order."""
    if len(data) > 4096 or len(data) < 26 or data[:8] != MAGIC:
        raise CleanroomError("corrupt: bad magic or size")
    if checksum(data[:-16]) != data[-16:]:
        raise CleanroomError("corrupt: checksum")
    if data[8] != 1:
        raise CleanroomError("unsupported version")
    kdf = data[9]
    if kdf == 0:
        if len(data) != 58:
            raise CleanroomError("corrupt: length for kdf 0")
        if not allow_unencrypted:
            raise CleanroomError("unencrypted key file")
        return data[10:42]
    if kdf != 1 or len(data) != 126:
        raise CleanroomError("corrupt: kdf or length")
    opslimit, memlimit = struct.unpack(">IQ", data[10:22])
    if not (1 <= opslimit <= 4 and 8192 <= memlimit <= 268435456):
        raise CleanroomError("corrupt: KDF parameters out of bounds")
    if passphrase is None:
        raise CleanroomError("passphrase required")
    key = derive_key(passphrase, data[22:38], opslimit, memlimit)
    try:
        return nb.crypto_secretbox_open(data[62:110], data[38:62], key)
    except Exception as exc:
        raise CleanroomError("wrong passphrase") from exc

"""Identities and peer ids (docs/protocol.md section 1.1) and DHT node ids (section 5.1).

Written from docs/protocol.md alone; imports nothing from p2pmsg or the other test folders.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import nacl.bindings as nb

from .encoding import CleanroomError, b32decode_strict, b32encode, b58decode, b58encode

PUBKEY_PREFIX = b"\x08\x01\x12\x20"  # PublicKey protobuf: Type = Ed25519, Data = 32 bytes
PEER_ID_PREFIX = b"\x00\x24" + PUBKEY_PREFIX  # identity multihash of the 36-byte protobuf
CID_PREFIX = b"\x01\x72"  # CIDv1, multicodec libp2p-key


def pubkey_protobuf(pk: bytes) -> bytes:
    if len(pk) != 32:
        raise CleanroomError("an Ed25519 public key is 32 bytes")
    return PUBKEY_PREFIX + pk


def peer_id_bytes(pk: bytes) -> bytes:
    return b"\x00\x24" + pubkey_protobuf(pk)


def peer_id_text(pk: bytes) -> str:
    return b58encode(peer_id_bytes(pk))


def peer_id_cid(pk: bytes) -> str:
    return "b" + b32encode(CID_PREFIX + peer_id_bytes(pk))


def pk_from_peer_id(pid: bytes) -> bytes:
    if len(pid) != 38 or pid[:6] != PEER_ID_PREFIX:
        raise CleanroomError(f"not an Ed25519 identity peer id: {pid[:6].hex()}, {len(pid)} bytes")
    return pid[6:]


def parse_peer_id(text: str) -> bytes:
    """Peer id text (base58btc, or a CIDv1 in base32 or base58btc) -> 38-byte binary peer id."""
    if len(text) > 128:
        raise CleanroomError("peer id text too long")
    if text.startswith(("1", "Qm")):
        raw = b58decode(text)
    else:
        if text.startswith("b"):
            cid = b32decode_strict(text[1:])
        elif text.startswith("z"):
            cid = b58decode(text[1:])
        else:
            raise CleanroomError("unknown multibase")
        if cid[:2] != CID_PREFIX:
            raise CleanroomError("CID not v1 / libp2p-key")
        raw = cid[2:]
    pk_from_peer_id(raw)
    return raw


def node_id_of(pk: bytes) -> bytes:
    """DHT node id: sha1 of the PublicKey protobuf."""
    return hashlib.sha1(pubkey_protobuf(pk)).digest()


def ed25519_verify(pk: bytes, msg: bytes, sig: bytes) -> bool:
    try:
        nb.crypto_sign_open(sig + msg, pk)
    except Exception:
        return False
    return True


@dataclass
class Identity:
    """An Ed25519 identity with its X25519 conversion (for crypto_box) and its DHT node id."""

    seed: bytes
    pk: bytes = field(init=False)
    sk64: bytes = field(init=False, repr=False)
    x_sk: bytes = field(init=False, repr=False)
    x_pk: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.pk, self.sk64 = nb.crypto_sign_seed_keypair(self.seed)
        self.x_sk = nb.crypto_sign_ed25519_sk_to_curve25519(self.sk64)
        self.x_pk = nb.crypto_sign_ed25519_pk_to_curve25519(self.pk)

    @classmethod
    def generate(cls) -> Identity:
        return cls(os.urandom(32))

    @property
    def peer_id(self) -> bytes:
        return peer_id_bytes(self.pk)

    @property
    def peer_id_text(self) -> str:
        return peer_id_text(self.pk)

    @property
    def node_id(self) -> bytes:
        return node_id_of(self.pk)

    def sign(self, msg: bytes) -> bytes:
        return nb.crypto_sign(msg, self.sk64)[:64]

"""Signed DHT records: peer records and the generic signed-namespace value format.

Theory of operation
-------------------
A signed record is a DHT value that only its owner can write.  It lives under the key
``sha1(namespace || peer id bytes)`` (namespace in UTF-8, peer id the 38-byte identity multihash), and its value is::

    "P2R" 0x01 || u8 len(namespace) || namespace || envelope

``envelope`` is :func:`p2pmsg.crypto.envelope.seal_envelope` by the owner with ``domain = namespace`` and the
namespace's payload type, over a payload that starts with a common header::

    peer id (38 bytes) || seq (u64 big-endian) || expires_at (u64 big-endian, Unix seconds) || body

A node verifies a record (:func:`verify_record_value`) on every STORE and on every read: the magic and the
namespace are known, the value is at most ``max_size`` bytes, the envelope signature verifies for that domain and
payload type, the signer is the peer id in the header, the key is ``sha1(namespace || signer)``, the record has not
expired and does not claim to live more than ``max_ttl`` seconds from now, and the namespace's body parser accepts
the body (strictly: no trailing bytes).  Any failure raises :class:`RecordError` naming the check.  Among valid
records for one key the highest ``seq`` wins.

Peer records (namespace ``"p2pmsg-peer-record"``, payload type ``/p2pmsg/peer-record/1``) carry the owner's
addresses as multiaddr text: ``u8 count (<= 8)`` then per address ``u16 big-endian length (1..256) || UTF-8 text``;
each must parse as a multiaddr and be in its canonical text form, and a ``/p2p/`` component, if present, must name
the owner.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import Final

from p2pmsg.crypto.envelope import EnvelopeError, open_envelope, seal_envelope
from p2pmsg.dht.core.errors import DhtUsageError, RecordError, RecordTimeError
from p2pmsg.identity import PEER_ID_SIZE, Identity, InvalidPeerIdError, PeerId
from p2pmsg.wire.multiaddr import Multiaddr, MultiaddrError

__all__ = [
    "MAX_PEER_RECORD_ADDRS",
    "MAX_RECORD_SIZE",
    "MAX_RECORD_TTL",
    "PEER_RECORD_NAMESPACE",
    "PEER_RECORD_PAYLOAD_TYPE",
    "RECORD_MAGIC",
    "Namespace",
    "PeerRecord",
    "VerifiedRecord",
    "is_signed_value",
    "peer_record_key",
    "record_key",
    "seal_peer_record",
    "seal_record",
    "verify_record_value",
]

RECORD_MAGIC: Final = b"P2R\x01"
MAX_RECORD_SIZE: Final = 2048
MAX_RECORD_TTL: Final = 7 * 24 * 3600
MAX_NAMESPACE_SIZE: Final = 64
_HEADER: Final = struct.Struct(">QQ")
_HEADER_SIZE: Final = PEER_ID_SIZE + _HEADER.size

PEER_RECORD_NAMESPACE: Final = "p2pmsg-peer-record"
PEER_RECORD_PAYLOAD_TYPE: Final = b"/p2pmsg/peer-record/1"
MAX_PEER_RECORD_ADDRS: Final = 8
MAX_MULTIADDR_TEXT: Final = 256


def record_key(namespace: str, peer_id: PeerId) -> bytes:
    """The DHT key of ``peer_id``'s record in ``namespace``: ``sha1(namespace || peer id bytes)``."""
    return hashlib.sha1(namespace.encode("utf-8") + peer_id.to_bytes()).digest()


def peer_record_key(peer_id: PeerId) -> bytes:
    """The DHT key of ``peer_id``'s peer record."""
    return record_key(PEER_RECORD_NAMESPACE, peer_id)


def is_signed_value(value: object) -> bool:
    """Whether a DHT value claims to be a signed record (it starts with the magic); it still has to verify."""
    return isinstance(value, bytes) and value.startswith(RECORD_MAGIC)


# ---------------------------------------------------------------------------------------------------------------------
# Peer records
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PeerRecord:
    """Where a peer can be reached: multiaddr texts, a sequence number (highest wins) and an expiry (Unix seconds)."""

    peer_id: PeerId
    addrs: tuple[str, ...]
    seq: int
    expires_at: int

    def __post_init__(self) -> None:
        if not 0 <= self.seq < 2**64 or not 0 <= self.expires_at < 2**64:
            raise DhtUsageError("PeerRecord seq and expires_at must be unsigned 64-bit integers")

    def multiaddrs(self) -> list[Multiaddr]:
        """The addresses, parsed."""
        return [Multiaddr.parse(text) for text in self.addrs]

    def encode_body(self) -> bytes:
        """The namespace-specific body: ``u8 count || (u16 len || text)*``."""
        if len(self.addrs) > MAX_PEER_RECORD_ADDRS:
            raise DhtUsageError(f"a peer record carries at most {MAX_PEER_RECORD_ADDRS} addresses")
        out = bytearray([len(self.addrs)])
        for text in self.addrs:
            data = text.encode("utf-8")
            if not 1 <= len(data) <= MAX_MULTIADDR_TEXT:
                raise DhtUsageError(f"multiaddr text must be 1..{MAX_MULTIADDR_TEXT} bytes")
            out += struct.pack(">H", len(data)) + data
        return bytes(out)


def _parse_peer_record_body(body: bytes, signer: PeerId, seq: int, expires_at: int) -> PeerRecord:
    if not body:
        raise RecordError("peer record body is empty: the address count is missing")
    count = body[0]
    if count > MAX_PEER_RECORD_ADDRS:
        raise RecordError(f"peer record has {count} addresses, more than {MAX_PEER_RECORD_ADDRS}")
    pos = 1
    addrs: list[str] = []
    for index in range(count):
        if pos + 2 > len(body):
            raise RecordError(f"peer record address {index}: length is truncated")
        (length,) = struct.unpack_from(">H", body, pos)
        pos += 2
        if not 1 <= length <= MAX_MULTIADDR_TEXT:
            raise RecordError(f"peer record address {index}: length {length} is outside 1..{MAX_MULTIADDR_TEXT}")
        if pos + length > len(body):
            raise RecordError(f"peer record address {index}: {length} bytes declared, {len(body) - pos} remain")
        try:
            text = body[pos : pos + length].decode("utf-8")
            addr = Multiaddr.parse(text)
        except UnicodeDecodeError:
            raise RecordError(f"peer record address {index}: not UTF-8") from None
        except MultiaddrError as exc:
            raise RecordError(f"peer record address {index}: {exc}") from None
        if str(addr) != text:
            raise RecordError(f"peer record address {index}: not in canonical form (expected {str(addr)!r})")
        if addr.peer_id is not None and addr.peer_id != signer:
            raise RecordError(f"peer record address {index}: /p2p/ names another peer than the signer")
        addrs.append(text)
        pos += length
    if pos != len(body):
        raise RecordError(f"peer record has {len(body) - pos} trailing bytes")
    return PeerRecord(peer_id=signer, addrs=tuple(addrs), seq=seq, expires_at=expires_at)


# ---------------------------------------------------------------------------------------------------------------------
# Generic signed namespaces
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Namespace:
    """A signed namespace: its name (also the envelope domain), payload type and body parser."""

    name: str
    payload_type: bytes
    parse_body: Callable[[bytes, PeerId, int, int], object]


NAMESPACES: Final[dict[str, Namespace]] = {
    PEER_RECORD_NAMESPACE: Namespace(
        name=PEER_RECORD_NAMESPACE, payload_type=PEER_RECORD_PAYLOAD_TYPE, parse_body=_parse_peer_record_body
    ),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedRecord:
    """A signed record that passed :func:`verify_record_value`."""

    namespace: str
    key: bytes
    signer: PeerId
    seq: int
    expires_at: int
    value: bytes
    content: object


def seal_record(identity: Identity, namespace: str, *, seq: int, expires_at: int, body: bytes) -> bytes:
    """The DHT value of a signed record of ``identity`` in ``namespace`` (see the module docstring)."""
    spec = NAMESPACES.get(namespace)
    if spec is None:
        raise DhtUsageError(f"unknown signed namespace {namespace!r}")
    name = namespace.encode("utf-8")
    payload = identity.peer_id.to_bytes() + _HEADER.pack(seq, expires_at) + body
    envelope = seal_envelope(identity, domain=namespace, payload_type=spec.payload_type, payload=payload)
    value = RECORD_MAGIC + bytes([len(name)]) + name + envelope
    if len(value) > MAX_RECORD_SIZE:
        raise DhtUsageError(f"signed record is {len(value)} bytes, over the {MAX_RECORD_SIZE}-byte limit")
    return value


def seal_peer_record(identity: Identity, record: PeerRecord) -> bytes:
    """The DHT value of ``identity``'s peer record (the record must be about ``identity``)."""
    if record.peer_id != identity.peer_id:
        raise DhtUsageError("a peer record can only be sealed by its own peer")
    return seal_record(
        identity, PEER_RECORD_NAMESPACE, seq=record.seq, expires_at=record.expires_at, body=record.encode_body()
    )


def verify_record_value(
    key: bytes,
    value: object,
    *,
    now: float,
    max_size: int = MAX_RECORD_SIZE,
    max_ttl: float = MAX_RECORD_TTL,
    namespaces: Sequence[str] | None = None,
) -> VerifiedRecord:
    """Check everything about a signed record found under ``key`` (``now`` in Unix seconds); :class:`RecordError`.

    ``namespaces`` restricts which namespaces are acceptable (default: every known one).
    """
    if not isinstance(value, bytes):
        raise RecordError(f"signed record must be bytes, got {type(value).__name__}")
    if len(value) > max_size:
        raise RecordError(f"signed record is {len(value)} bytes, over the {max_size}-byte limit")
    if not value.startswith(RECORD_MAGIC):
        raise RecordError("value does not start with the signed-record magic 'P2R' 0x01")
    pos = len(RECORD_MAGIC)
    if pos >= len(value):
        raise RecordError("signed record is truncated: namespace length is missing")
    name_len = value[pos]
    pos += 1
    if not 1 <= name_len <= MAX_NAMESPACE_SIZE or pos + name_len > len(value):
        raise RecordError(f"signed record namespace length {name_len} is invalid or truncated")
    try:
        namespace = value[pos : pos + name_len].decode("utf-8")
    except UnicodeDecodeError:
        raise RecordError("signed record namespace is not UTF-8") from None
    pos += name_len
    spec = NAMESPACES.get(namespace)
    if spec is None or (namespaces is not None and namespace not in namespaces):
        raise RecordError(f"signed namespace {namespace!r} is unknown or not accepted here")
    try:
        signer, payload = open_envelope(
            value[pos:], domain=namespace, payload_type=spec.payload_type, max_size=max_size
        )
    except EnvelopeError as exc:
        raise RecordError(f"signed record envelope: {exc}") from None
    if len(payload) < _HEADER_SIZE:
        raise RecordError(f"signed record payload is {len(payload)} bytes, shorter than its {_HEADER_SIZE}-byte header")
    try:
        claimed = PeerId.from_bytes(payload[:PEER_ID_SIZE])
    except InvalidPeerIdError as exc:
        raise RecordError(f"signed record peer id: {exc}") from None
    if claimed != signer:
        raise RecordError("signed record names another peer than its signer")
    if record_key(namespace, signer) != key:
        raise RecordError("signed record is not bound to this key: key != sha1(namespace || signer peer id)")
    seq, expires_at = _HEADER.unpack_from(payload, PEER_ID_SIZE)
    if expires_at <= now:
        raise RecordTimeError(
            f"signed record expired at {expires_at} (now {int(now)})",
            signer=signer.to_bytes(),
            seq=seq,
            expires_at=expires_at,
        )
    if expires_at > now + max_ttl:
        raise RecordTimeError(
            f"signed record expires {expires_at - int(now)} s from now, more than {int(max_ttl)} s",
            signer=signer.to_bytes(),
            seq=seq,
            expires_at=expires_at,
        )
    content = spec.parse_body(payload[_HEADER_SIZE:], signer, seq, expires_at)
    return VerifiedRecord(
        namespace=namespace, key=key, signer=signer, seq=seq, expires_at=expires_at, value=value, content=content
    )

"""Node ids, XOR distance, contacts and addresses.

Theory of operation
-------------------
The keyspace is 160 bits, as in the ``kademlia`` package: a node id or a key is 20 bytes, read as a big-endian
unsigned integer, and the distance between two ids is their XOR.  A p2pmsg node's id is bound to its identity:
``sha1(PublicKey protobuf of its Ed25519 key)``, so a peer that proves it holds the key (the signed challenge of
:mod:`p2pmsg.dht.core.engine`) proves its node id too.  Keys of plain values are computed exactly as the
``kademlia`` package does (:func:`digest`), so both find each other's values.

A :class:`Contact` is a node id plus the UDP address it answered from.  Hosts are IP literals only (never names):
anything learnt from the network is parsed with :func:`parse_host` and unusable addresses (unspecified, multicast,
port 0) are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from typing import Final

from p2pmsg.dht.core.errors import DhtUsageError, MalformedMessageError
from p2pmsg.identity import PeerId, public_key_protobuf

__all__ = [
    "KEYSPACE_BITS",
    "NODE_ID_SIZE",
    "Address",
    "Contact",
    "PlainKey",
    "digest",
    "distance",
    "node_id_for_peer",
    "node_id_from_public_key",
    "parse_host",
    "parse_port",
]

NODE_ID_SIZE: Final = 20
KEYSPACE_BITS: Final = 160

#: A UDP address: ``(ip literal, port)``.
Address = tuple[str, int]

#: What the ``kademlia`` package accepts as a key for ``get``/``set`` (hashed with :func:`digest`).
PlainKey = str | bytes | int | float


def distance(a: bytes, b: bytes) -> int:
    """The XOR distance between two 20-byte ids, as an integer."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def digest(key: PlainKey) -> bytes:
    """The 20-byte DHT key of a user key, exactly as ``kademlia.utils.digest``: ``sha1(bytes or str(key) utf-8)``."""
    data = key if isinstance(key, bytes) else str(key).encode("utf-8")
    return hashlib.sha1(data).digest()


def node_id_from_public_key(ed25519_public_key: bytes) -> bytes:
    """A p2pmsg node id: ``sha1(08 01 12 20 || pk)``, the SHA-1 of the libp2p PublicKey protobuf."""
    return hashlib.sha1(public_key_protobuf(ed25519_public_key)).digest()


def node_id_for_peer(peer_id: PeerId) -> bytes:
    """The node id a p2pmsg node with this peer id uses in the DHT."""
    return node_id_from_public_key(peer_id.public_key)


#: Hosts already validated (text as received -> canonical text); cleared when full, so bounded.
_HOST_CACHE: dict[str, str] = {}
_HOST_CACHE_SIZE: Final = 4096


def parse_host(value: object, field: str = "host") -> str:
    """Validate an IP literal from the network and return its canonical text; :class:`MalformedMessageError` else."""
    if not isinstance(value, str):
        raise MalformedMessageError(field, f"must be an IP address string, got {type(value).__name__}")
    cached = _HOST_CACHE.get(value)
    if cached is not None:
        return cached
    if len(value) > 45:
        raise MalformedMessageError(field, f"is {len(value)} characters, too long for an IP address")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise MalformedMessageError(field, f"{value!r} is not an IPv4 or IPv6 address literal") from None
    if ip.is_unspecified or ip.is_multicast:
        raise MalformedMessageError(field, f"{value!r} is unspecified or multicast, not a node address")
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        raise MalformedMessageError(field, "255.255.255.255 is the broadcast address, not a node address")
    if len(_HOST_CACHE) >= _HOST_CACHE_SIZE:
        _HOST_CACHE.clear()
    _HOST_CACHE[value] = canonical = str(ip)
    return canonical


def parse_port(value: object, field: str = "port") -> int:
    """Validate a UDP port from the network (1..65535); booleans are not ports."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedMessageError(field, f"must be an integer, got {type(value).__name__}")
    if not 1 <= value <= 65535:
        raise MalformedMessageError(field, f"{value} is outside 1..65535")
    return value


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Contact:
    """A DHT node: its 20-byte id and the UDP address it is reached at."""

    node_id: bytes
    host: str
    port: int
    #: ``node_id`` as a big-endian integer (computed once; distances are XORs of these).
    id_int: int = dataclasses.field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, bytes) or len(self.node_id) != NODE_ID_SIZE:
            raise DhtUsageError(f"Contact.node_id must be {NODE_ID_SIZE} bytes")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise DhtUsageError(f"Contact.port must be in 1..65535, got {self.port!r}")
        object.__setattr__(self, "id_int", int.from_bytes(self.node_id, "big"))

    @property
    def address(self) -> Address:
        """``(host, port)``."""
        return (self.host, self.port)

    def distance_to(self, key: bytes) -> int:
        """XOR distance from this contact's id to ``key``."""
        return self.id_int ^ int.from_bytes(key, "big")

    def __str__(self) -> str:
        return f"{self.node_id.hex()[:12]}@{self.host}:{self.port}"

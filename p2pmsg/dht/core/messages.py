"""DHT datagrams, byte-compatible with ``rpcudp`` 5.0.1 / ``kademlia`` 2.2.3.

Theory of operation
-------------------
Every datagram is ``kind (1 byte) || message id (20 bytes) || msgpack body``.  ``kind`` is ``0x00`` for a request
and ``0x01`` for a response; the response echoes the request's message id and nothing else ties the two together
(responses carry no RPC name, so a response is parsed according to the request that is pending under its id).

A request body is the msgpack array ``[name, args]``: ``name`` a string, ``args`` an array whose shape is fixed per
RPC (the first argument is the sender's 20-byte node id for every RPC except ``stun``):

=============== =================================== =============================================================
name            args                                response body
=============== =================================== =============================================================
``ping``        ``[node_id]``                       ``node_id`` of the responder (bin 20)
``store``       ``[node_id, key, value]``           ``true`` (stored) or ``false`` (refused, p2pmsg nodes only)
``find_node``   ``[node_id, key]``                  ``[[id, ip, port], ...]`` (at most k contacts)
``find_value``  ``[node_id, key]``                  ``{"value": value}`` or the ``find_node`` answer
``stun``        ``[]``                              ``[ip, port]``: the address the request came from
``p2pmsg_auth`` ``[node_id, challenge(32)]``        a signed-record value (see :mod:`p2pmsg.dht.core.engine`)
=============== =================================== =============================================================

``p2pmsg_auth`` is an extension: stock nodes never answer an unknown name, so it is only ever sent to peers whose
own requests carried the p2pmsg *mark* in their message id (:func:`new_message_id`, :func:`message_id_mark`):
``"p2p" || version (1 byte) || nonce (12 bytes) || tag (4 bytes)`` with ``tag = sha1("p2p" || version || nonce)[:4]``.
A stock message id is ``sha1(random)``, so it carries a valid mark with probability 2**-64.

Everything from the network is decoded within limits (:data:`MAX_DATAGRAM_SIZE`, nesting depth, contact counts)
and validated field by field; a violation raises :class:`MalformedMessageError` naming the field.  A request whose
name is unknown decodes to :class:`UnknownRequest` and is ignored, like ``rpcudp`` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from typing import Final

import msgpack

from p2pmsg.dht.core.contact import NODE_ID_SIZE, Address, Contact, parse_host, parse_port
from p2pmsg.dht.core.errors import DhtUsageError, MalformedMessageError
from p2pmsg.wire.codec import CodecError, unpackb_limited

__all__ = [
    "AUTH_CHALLENGE_SIZE",
    "AUTH_VERSION",
    "EXTENSION_VERSION",
    "HEADER_SIZE",
    "MAX_CONTACTS_PER_RESPONSE",
    "MAX_DATAGRAM_SIZE",
    "MAX_REQUEST_BODY",
    "MESSAGE_ID_SIZE",
    "REQUEST",
    "RESPONSE",
    "AuthRequest",
    "FindNodeRequest",
    "FindValueRequest",
    "FoundValue",
    "IncomingRequest",
    "IncomingResponse",
    "PingRequest",
    "PlainValue",
    "Request",
    "StoreRequest",
    "StunRequest",
    "UnknownRequest",
    "decode_auth_address",
    "decode_datagram",
    "encode_auth_address",
    "encode_request",
    "encode_response",
    "fit_contacts",
    "is_plain_value",
    "message_id_mark",
    "new_message_id",
    "nodes_body",
    "parse_auth_response",
    "parse_find_value_response",
    "parse_nodes",
    "parse_ping_response",
    "parse_store_response",
    "parse_stun_response",
    "request_size",
    "value_body",
]

REQUEST: Final = 0x00
RESPONSE: Final = 0x01
MESSAGE_ID_SIZE: Final = 20
HEADER_SIZE: Final = 1 + MESSAGE_ID_SIZE

#: ``rpcudp`` refuses to send a request whose msgpack body exceeds 8 KiB; so do we.
MAX_REQUEST_BODY: Final = 8192
#: Largest datagram accepted from the network (a maximal request plus room for a value in a response).
MAX_DATAGRAM_SIZE: Final = HEADER_SIZE + MAX_REQUEST_BODY + 512
#: Most contacts accepted in one ``find_node``/``find_value`` answer (stock nodes send at most k = 20).
MAX_CONTACTS_PER_RESPONSE: Final = 64
#: Deepest msgpack nesting accepted (``[name, [args...]]`` is 2; values are scalars, so 8 is ample).
MAX_DEPTH: Final = 8

#: Version 2: ``p2pmsg_auth`` proofs also sign the requester's address as the responder saw it (version 1 proofs
#: could be relayed by a third party).
EXTENSION_VERSION: Final = 2
#: The lowest advertised version that gets ``p2pmsg_auth`` challenges (the version whose proofs this node accepts).
AUTH_VERSION: Final = 2
_MARK_MAGIC: Final = b"p2p"
_MARK_NONCE_SIZE: Final = 12
_MARK_TAG_SIZE: Final = 4
AUTH_CHALLENGE_SIZE: Final = 32

#: Values the ``kademlia`` package lets a user ``set`` (``check_dht_value_type``).
PlainValue = int | float | bool | str | bytes


def is_plain_value(value: object) -> bool:
    """Whether ``value`` is one of the plain types a stock node can ``set`` (int, float, bool, str, bytes).

    Integers must fit msgpack (-2**63 .. 2**64-1); lists, maps, ``None`` and extension types are not values.
    """
    if isinstance(value, bool | str | bytes | float):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Message ids and the p2pmsg mark
# ---------------------------------------------------------------------------------------------------------------------


def _mark_tag(version: int, nonce: bytes) -> bytes:
    return hashlib.sha1(_MARK_MAGIC + bytes([version]) + nonce).digest()[:_MARK_TAG_SIZE]


def new_message_id(random12: bytes, *, version: int = EXTENSION_VERSION) -> bytes:
    """A 20-byte message id carrying the p2pmsg mark, from 12 random bytes."""
    if len(random12) != _MARK_NONCE_SIZE:
        raise DhtUsageError(f"message id nonce must be {_MARK_NONCE_SIZE} bytes, got {len(random12)}")
    if not 1 <= version <= 255:
        raise DhtUsageError(f"extension version must be 1..255, got {version}")
    return _MARK_MAGIC + bytes([version]) + random12 + _mark_tag(version, random12)


def message_id_mark(msg_id: bytes) -> int | None:
    """The extension version advertised by a message id's mark, or ``None`` for an unmarked (stock) id."""
    if len(msg_id) != MESSAGE_ID_SIZE or not msg_id.startswith(_MARK_MAGIC):
        return None
    version = msg_id[3]
    nonce = msg_id[4 : 4 + _MARK_NONCE_SIZE]
    if version == 0 or msg_id[4 + _MARK_NONCE_SIZE :] != _mark_tag(version, nonce):
        return None
    return version


# ---------------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PingRequest:
    """``ping [node_id]``: answered with the responder's node id."""

    node_id: bytes
    name = "ping"

    def args(self) -> tuple[object, ...]:
        """The msgpack ``args`` array."""
        return (self.node_id,)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoreRequest:
    """``store [node_id, key, value]``: answered ``true``/``false``."""

    node_id: bytes
    key: bytes
    value: object
    name = "store"

    def args(self) -> tuple[object, ...]:
        """The msgpack ``args`` array."""
        return (self.node_id, self.key, self.value)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FindNodeRequest:
    """``find_node [node_id, key]``: answered with the responder's closest contacts to ``key``."""

    node_id: bytes
    key: bytes
    name = "find_node"

    def args(self) -> tuple[object, ...]:
        """The msgpack ``args`` array."""
        return (self.node_id, self.key)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FindValueRequest:
    """``find_value [node_id, key]``: answered ``{"value": v}`` or like ``find_node``."""

    node_id: bytes
    key: bytes
    name = "find_value"

    def args(self) -> tuple[object, ...]:
        """The msgpack ``args`` array."""
        return (self.node_id, self.key)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StunRequest:
    """``stun []``: answered with the ``[ip, port]`` the request came from."""

    name = "stun"

    def args(self) -> tuple[object, ...]:
        """The msgpack ``args`` array."""
        return ()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AuthRequest:
    """``p2pmsg_auth [node_id, challenge]`` (extension): answered with a signed proof of the responder's key."""

    node_id: bytes
    challenge: bytes
    name = "p2pmsg_auth"

    def args(self) -> tuple[object, ...]:
        """The msgpack ``args`` array."""
        return (self.node_id, self.challenge)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class UnknownRequest:
    """A well-formed request for an RPC this node does not implement (ignored, never answered)."""

    name: str


Request = PingRequest | StoreRequest | FindNodeRequest | FindValueRequest | StunRequest | AuthRequest


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class IncomingRequest:
    """A decoded request datagram."""

    msg_id: bytes
    request: Request | UnknownRequest
    size: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class IncomingResponse:
    """A decoded response datagram; ``body`` is still raw msgpack data, parsed by the pending request's kind."""

    msg_id: bytes
    body: object
    size: int


def _pack(obj: object) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def encode_request(msg_id: bytes, request: Request) -> bytes:
    """The request datagram ``00 || msg_id || msgpack([name, args])``.

    Raises :class:`DhtUsageError` if the body exceeds :data:`MAX_REQUEST_BODY` (``rpcudp``'s 8 KiB limit).
    """
    if len(msg_id) != MESSAGE_ID_SIZE:
        raise DhtUsageError(f"message id must be {MESSAGE_ID_SIZE} bytes, got {len(msg_id)}")
    body = _pack([request.name, request.args()])
    if len(body) > MAX_REQUEST_BODY:
        raise DhtUsageError(f"{request.name} request body is {len(body)} bytes, over the {MAX_REQUEST_BODY} limit")
    return bytes([REQUEST]) + msg_id + body


def request_size(request: Request) -> int:
    """The size in bytes of the datagram :func:`encode_request` would produce."""
    return HEADER_SIZE + len(_pack([request.name, request.args()]))


def encode_response(msg_id: bytes, body: object) -> bytes:
    """The response datagram ``01 || msg_id || msgpack(body)``."""
    if len(msg_id) != MESSAGE_ID_SIZE:
        raise DhtUsageError(f"message id must be {MESSAGE_ID_SIZE} bytes, got {len(msg_id)}")
    return bytes([RESPONSE]) + msg_id + _pack(body)


def nodes_body(contacts: Iterable[Contact]) -> list[tuple[bytes, str, int]]:
    """The ``find_node`` answer body: ``[(id, ip, port), ...]``."""
    return [(c.node_id, c.host, c.port) for c in contacts]


def value_body(value: object) -> dict[str, object]:
    """The ``find_value`` answer body when the value is held: ``{"value": value}``."""
    return {"value": value}


def _node_id(value: object, field: str) -> bytes:
    if not isinstance(value, bytes):
        raise MalformedMessageError(field, f"must be bin, got {type(value).__name__}")
    if len(value) != NODE_ID_SIZE:
        raise MalformedMessageError(field, f"must be {NODE_ID_SIZE} bytes, got {len(value)}")
    return value


def _args(name: str, args: list[object], count: int) -> list[object]:
    if len(args) != count:
        raise MalformedMessageError(f"{name}.args", f"must have {count} elements, got {len(args)}")
    return args


def _decode_request(body: object) -> Request | UnknownRequest:
    if not isinstance(body, list) or len(body) != 2:
        raise MalformedMessageError("request", "body must be the array [name, args]")
    name, args = body
    if not isinstance(name, str):
        raise MalformedMessageError("request.name", f"must be a string, got {type(name).__name__}")
    if not isinstance(args, list):
        raise MalformedMessageError(f"{name}.args", f"must be an array, got {type(args).__name__}")
    if name == "ping":
        (node_id,) = _args(name, args, 1)
        return PingRequest(node_id=_node_id(node_id, "ping.node_id"))
    if name == "store":
        node_id, key, value = _args(name, args, 3)
        return StoreRequest(node_id=_node_id(node_id, "store.node_id"), key=_node_id(key, "store.key"), value=value)
    if name == "find_node":
        node_id, key = _args(name, args, 2)
        return FindNodeRequest(node_id=_node_id(node_id, "find_node.node_id"), key=_node_id(key, "find_node.key"))
    if name == "find_value":
        node_id, key = _args(name, args, 2)
        return FindValueRequest(node_id=_node_id(node_id, "find_value.node_id"), key=_node_id(key, "find_value.key"))
    if name == "stun":
        _args(name, args, 0)
        return StunRequest()
    if name == "p2pmsg_auth":
        node_id, challenge = _args(name, args, 2)
        if not isinstance(challenge, bytes) or len(challenge) != AUTH_CHALLENGE_SIZE:
            raise MalformedMessageError("p2pmsg_auth.challenge", f"must be {AUTH_CHALLENGE_SIZE} bytes of bin")
        return AuthRequest(node_id=_node_id(node_id, "p2pmsg_auth.node_id"), challenge=challenge)
    if len(name) > 64:
        raise MalformedMessageError("request.name", f"is {len(name)} characters long")
    return UnknownRequest(name=name)


def decode_datagram(data: bytes) -> IncomingRequest | IncomingResponse:
    """Decode one datagram; raises :class:`MalformedMessageError` (naming the field) on anything invalid."""
    if len(data) < HEADER_SIZE + 1:
        raise MalformedMessageError("datagram", f"is {len(data)} bytes, shorter than the {HEADER_SIZE + 1} minimum")
    if len(data) > MAX_DATAGRAM_SIZE:
        raise MalformedMessageError("datagram", f"is {len(data)} bytes, over the {MAX_DATAGRAM_SIZE} limit")
    kind = data[0]
    msg_id = bytes(data[1:HEADER_SIZE])
    if kind not in (REQUEST, RESPONSE):
        raise MalformedMessageError("datagram.kind", f"0x{kind:02x} is neither request (0x00) nor response (0x01)")
    try:
        body = unpackb_limited(
            bytes(data[HEADER_SIZE:]),
            max_size=MAX_DATAGRAM_SIZE,
            max_depth=MAX_DEPTH,
            max_array_len=MAX_CONTACTS_PER_RESPONSE,
            max_map_len=4,
            name="datagram.body",
        )
    except CodecError as exc:
        raise MalformedMessageError(exc.field, exc.reason) from None
    if kind == REQUEST:
        return IncomingRequest(msg_id=msg_id, request=_decode_request(body), size=len(data))
    return IncomingResponse(msg_id=msg_id, body=body, size=len(data))


# ---------------------------------------------------------------------------------------------------------------------
# Response bodies, parsed according to the request that is pending
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FoundValue:
    """A ``find_value`` answer that carried a value (not yet validated: it may be anything)."""

    value: object


def parse_ping_response(body: object) -> bytes:
    """The responder's node id from a ``ping`` answer."""
    return _node_id(body, "ping.response")


def parse_store_response(body: object) -> bool:
    """Whether a ``store`` answer reports success: only the boolean ``true`` counts."""
    if not isinstance(body, bool):
        raise MalformedMessageError("store.response", f"must be a boolean, got {type(body).__name__}")
    return body


def _parse_contact(item: object, index: int) -> Contact:
    field = f"contacts[{index}]"
    if not isinstance(item, list) or len(item) != 3:
        raise MalformedMessageError(field, "must be the array [id, ip, port]")
    node_id, host, port = item
    return Contact(
        node_id=_node_id(node_id, f"{field}.id"),
        host=parse_host(host, f"{field}.ip"),
        port=parse_port(port, f"{field}.port"),
    )


def parse_nodes(body: object, *, max_contacts: int = MAX_CONTACTS_PER_RESPONSE) -> tuple[list[Contact], int]:
    """The contacts of a ``find_node`` answer, and how many malformed entries were skipped.

    The answer must be an array of at most ``max_contacts`` entries; individual bad entries (wrong id size, a name
    instead of an IP, port 0...) are skipped and counted rather than failing the whole answer.
    """
    if not isinstance(body, list):
        raise MalformedMessageError("contacts", f"must be an array, got {type(body).__name__}")
    if len(body) > max_contacts:
        raise MalformedMessageError("contacts", f"has {len(body)} entries, more than {max_contacts}")
    contacts: list[Contact] = []
    skipped = 0
    seen: set[bytes] = set()
    for index, item in enumerate(body):
        try:
            contact = _parse_contact(item, index)
        except MalformedMessageError:
            skipped += 1
            continue
        if contact.node_id not in seen:
            seen.add(contact.node_id)
            contacts.append(contact)
    return contacts, skipped


def parse_find_value_response(body: object) -> FoundValue | tuple[list[Contact], int]:
    """A ``find_value`` answer: :class:`FoundValue` for ``{"value": v}``, else the contacts as :func:`parse_nodes`."""
    if isinstance(body, dict):
        if set(body) != {"value"}:
            raise MalformedMessageError("find_value.response", "a map answer must have exactly the key 'value'")
        return FoundValue(value=body["value"])
    return parse_nodes(body)


def parse_stun_response(body: object) -> Address:
    """The ``(ip, port)`` a ``stun`` answer reports (a 4-element IPv6 sockaddr is accepted too)."""
    if not isinstance(body, list) or len(body) not in (2, 4):
        raise MalformedMessageError("stun.response", "must be the array [ip, port]")
    return (parse_host(body[0], "stun.response.ip"), parse_port(body[1], "stun.response.port"))


def parse_auth_response(body: object, *, max_size: int) -> bytes:
    """The signed proof of a ``p2pmsg_auth`` answer (bin, at most ``max_size`` bytes)."""
    if not isinstance(body, bytes):
        raise MalformedMessageError("p2pmsg_auth.response", f"must be bin, got {type(body).__name__}")
    if len(body) > max_size:
        raise MalformedMessageError("p2pmsg_auth.response", f"is {len(body)} bytes, over {max_size}")
    return body


def encode_auth_address(address: Address) -> bytes:
    """The address field of a ``p2pmsg_auth`` proof: ``04 || IPv4 (4) || port (u16)`` or ``06 || IPv6 (16) ||
    port (u16)``, big-endian; an IPv4-mapped IPv6 address is written as IPv4."""
    host, port = address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise DhtUsageError(f"auth address must be an IP literal, got {host!r}") from None
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise DhtUsageError(f"auth address port must be 0..65535, got {port!r}")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    tag = b"\x04" if isinstance(ip, ipaddress.IPv4Address) else b"\x06"
    return tag + ip.packed + struct.pack(">H", port)


def decode_auth_address(data: bytes) -> Address:
    """The ``(ip, port)`` of an :func:`encode_auth_address` field that makes up all of ``data``."""
    if len(data) == 7 and data[0] == 4:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(data[1:5])
    elif len(data) == 19 and data[0] == 6:
        ip = ipaddress.IPv6Address(data[1:17])
    else:
        raise MalformedMessageError("p2pmsg_auth.address", "must be 04 + 4 + 2 or 06 + 16 + 2 bytes")
    return (str(ip), struct.unpack(">H", data[-2:])[0])


def fit_contacts(contacts: Sequence[Contact], budget: int) -> list[Contact]:
    """The longest prefix of ``contacts`` whose ``find_node`` answer body fits in ``budget`` bytes (may be empty)."""
    if budget < 1:
        return []
    low, high = 0, len(contacts)
    while low < high:
        mid = (low + high + 1) // 2
        if len(_pack(nodes_body(contacts[:mid]))) <= budget:
            low = mid
        else:
            high = mid - 1
    return list(contacts[:low])

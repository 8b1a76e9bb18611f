"""Signed envelopes: a payload signed by a peer's Ed25519 key, bound to a domain and a payload type.

Theory of operation
-------------------
An envelope carries ``payload`` together with the signer's public key and an Ed25519 signature.  The wire format is
libp2p's ``Envelope`` protobuf, hand-encoded, one length-delimited field (wire type 2) each, in field order:

* field 1 ``public_key``: the signer's ``PublicKey`` protobuf (``08 01 12 20 || pk``);
* field 2 ``payload_type``: a short byte string naming the payload format (e.g. a multicodec);
* field 3 ``payload``: the payload bytes;
* field 5 ``signature``: 64-byte Ed25519 signature.

The signature covers neither the protobuf nor any re-serialised map, but the explicit concatenation::

    uvarint(len(domain)) || domain || uvarint(len(payload_type)) || payload_type || uvarint(len(payload)) || payload

The *domain* (a string such as ``"p2pmsg-peer-record"``, signed as its UTF-8 bytes, so a string with a lone surrogate
is refused with :class:`~p2pmsg.errors.LocalProtocolError`) is never transmitted: the receiver supplies the domain
it expects, so a signature made for one purpose cannot be replayed as another.

Decoding is strict and bounded, because envelopes come from the network: the whole envelope is at most ``max_size``
bytes; only wire type 2 and fields 1, 2, 3, 5 are allowed, each at most once and in increasing order; empty fields
are omitted (as proto3 does), so a present-but-empty field is rejected; varints must be minimal; truncation and
trailing garbage are rejected.  Every failure raises :class:`EnvelopeError` with the reason.  This module is sans-IO.
"""

from __future__ import annotations

from typing import Final

from p2pmsg.errors import LocalProtocolError, RemoteProtocolError
from p2pmsg.identity import (
    ED25519_SIGNATURE_SIZE,
    Identity,
    InvalidPeerIdError,
    PeerId,
    VarintError,
    encode_uvarint,
    parse_public_key_protobuf,
    public_key_protobuf,
    read_uvarint,
)

__all__ = [
    "DEFAULT_MAX_ENVELOPE_SIZE",
    "EnvelopeError",
    "envelope_signing_bytes",
    "open_envelope",
    "seal_envelope",
]

#: Default bound on an encoded envelope, in bytes.
DEFAULT_MAX_ENVELOPE_SIZE: Final = 8192
#: Bounds on what this side may seal (the receiver's domain and type come from its own code, not the network).
MAX_DOMAIN_SIZE: Final = 256
MAX_PAYLOAD_TYPE_SIZE: Final = 256

_FIELD_PUBLIC_KEY: Final = 1
_FIELD_PAYLOAD_TYPE: Final = 2
_FIELD_PAYLOAD: Final = 3
_FIELD_SIGNATURE: Final = 5
_FIELD_NAMES: Final = {
    _FIELD_PUBLIC_KEY: "public_key",
    _FIELD_PAYLOAD_TYPE: "payload_type",
    _FIELD_PAYLOAD: "payload",
    _FIELD_SIGNATURE: "signature",
}
_WIRE_TYPE_LEN: Final = 2


class EnvelopeError(RemoteProtocolError):
    """An envelope is malformed, oversized, of the wrong type, or its signature does not verify for the domain."""


def _check_domain_and_type(domain: str, payload_type: bytes) -> bytes:
    if not isinstance(domain, str) or not domain:
        raise LocalProtocolError("envelope domain must be a non-empty str")
    try:
        domain_bytes = domain.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a surrogateescape-decoded name
        raise LocalProtocolError(
            f"envelope domain {domain!r} is not encodable as UTF-8: {exc.reason} at index {exc.start}"
        ) from None
    if len(domain_bytes) > MAX_DOMAIN_SIZE:
        raise LocalProtocolError(f"envelope domain is {len(domain_bytes)} bytes, over {MAX_DOMAIN_SIZE}")
    if not isinstance(payload_type, bytes | bytearray | memoryview) or not payload_type:
        raise LocalProtocolError("envelope payload_type must be non-empty bytes")
    if len(payload_type) > MAX_PAYLOAD_TYPE_SIZE:
        raise LocalProtocolError(f"envelope payload_type is {len(payload_type)} bytes, over {MAX_PAYLOAD_TYPE_SIZE}")
    return domain_bytes


def envelope_signing_bytes(domain: str, payload_type: bytes, payload: bytes) -> bytes:
    """The bytes an envelope signature covers (see the module docstring)."""
    domain_bytes = _check_domain_and_type(domain, payload_type)
    parts = (domain_bytes, bytes(payload_type), bytes(payload))
    return b"".join(encode_uvarint(len(part)) + part for part in parts)


def _field(number: int, value: bytes) -> bytes:
    if not value:
        return b""  # proto3: empty bytes fields are omitted
    return encode_uvarint(number << 3 | _WIRE_TYPE_LEN) + encode_uvarint(len(value)) + value


def seal_envelope(identity: Identity, *, domain: str, payload_type: bytes, payload: bytes) -> bytes:
    """Sign ``payload`` for ``domain`` and ``payload_type`` and return the encoded envelope.

    Raises :class:`~p2pmsg.errors.LocalProtocolError` if ``domain`` or ``payload_type`` is empty or too long, or if
    ``domain`` is not encodable as UTF-8 (a lone surrogate).
    """
    signature = identity.sign(envelope_signing_bytes(domain, payload_type, payload))
    return b"".join(
        (
            _field(_FIELD_PUBLIC_KEY, public_key_protobuf(identity.public_key)),
            _field(_FIELD_PAYLOAD_TYPE, bytes(payload_type)),
            _field(_FIELD_PAYLOAD, bytes(payload)),
            _field(_FIELD_SIGNATURE, signature),
        )
    )


def _decode_fields(data: bytes) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    last = 0
    pos = 0
    try:
        while pos < len(data):
            tag, pos = read_uvarint(data, pos)
            number, wire_type = tag >> 3, tag & 0x7
            if wire_type != _WIRE_TYPE_LEN:
                raise EnvelopeError(
                    f"field {number} has wire type {wire_type}: only length-delimited fields (2) are allowed"
                )
            name = _FIELD_NAMES.get(number)
            if name is None:
                raise EnvelopeError(f"unknown field {number} (envelopes have fields 1, 2, 3 and 5)")
            if number in fields:
                raise EnvelopeError(f"duplicate field {number} ({name})")
            if number < last:
                raise EnvelopeError(f"field {number} ({name}) is out of order: fields must be in increasing order")
            length, pos = read_uvarint(data, pos)
            if length == 0:
                raise EnvelopeError(f"field {number} ({name}) is present but empty (empty fields must be omitted)")
            if length > len(data) - pos:
                raise EnvelopeError(
                    f"truncated: field {number} ({name}) declares {length} bytes but {len(data) - pos} remain"
                )
            fields[number] = data[pos : pos + length]
            pos += length
            last = number
    except VarintError as exc:
        raise EnvelopeError(f"truncated or malformed varint at offset {pos}: {exc}") from exc
    return fields


def open_envelope(
    data: bytes,
    *,
    domain: str,
    payload_type: bytes,
    max_size: int = DEFAULT_MAX_ENVELOPE_SIZE,
) -> tuple[PeerId, bytes]:
    """Decode an envelope, check its type and signature for ``domain``, and return ``(signer, payload)``.

    Raises :class:`EnvelopeError` if the envelope is longer than ``max_size``, malformed (see the module docstring),
    lacks its public key or signature, carries a key that is not Ed25519, has another payload type, or if the
    signature does not verify (tampered, or signed for another domain).
    """
    expected_type = bytes(payload_type)
    _check_domain_and_type(domain, expected_type)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EnvelopeError(f"envelope must be bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise EnvelopeError(f"envelope is {len(data)} bytes, over the {max_size}-byte limit")
    fields = _decode_fields(bytes(data))
    for number in (_FIELD_PUBLIC_KEY, _FIELD_SIGNATURE):
        if number not in fields:
            raise EnvelopeError(f"missing field {number} ({_FIELD_NAMES[number]})")
    try:
        signer = PeerId.from_public_key(parse_public_key_protobuf(fields[_FIELD_PUBLIC_KEY]))
    except InvalidPeerIdError as exc:
        raise EnvelopeError(f"field 1 (public_key): {exc}") from exc
    got_type = fields.get(_FIELD_PAYLOAD_TYPE, b"")
    if got_type != expected_type:
        raise EnvelopeError(f"payload type {got_type!r} does not match the expected {expected_type!r}")
    signature = fields[_FIELD_SIGNATURE]
    if len(signature) != ED25519_SIGNATURE_SIZE:
        raise EnvelopeError(f"field 5 (signature) is {len(signature)} bytes, an Ed25519 signature is 64")
    payload = fields.get(_FIELD_PAYLOAD, b"")
    if not signer.verify(envelope_signing_bytes(domain, expected_type, payload), signature):
        raise EnvelopeError(
            f"signature does not verify for domain {domain!r}: the envelope was altered or signed for another domain"
        )
    return signer, payload

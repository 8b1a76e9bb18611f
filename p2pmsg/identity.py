"""Ed25519 identity, libp2p peer IDs and the encrypted key file.

Theory of operation
-------------------
A node's identity is one Ed25519 signing key, kept as its 32-byte seed.  Everything else derives from it:

* the *public key protobuf* ``08 01 12 20 || pk`` (field 1 ``KeyType = Ed25519 (1)``, field 2 ``Data = pk``), exactly
  as libp2p encodes it;
* the *peer ID*: the identity multihash of that protobuf, ``00 24 || 08 01 12 20 || pk`` (38 bytes).  Its usual text
  form is base58btc (``12D3KooW...``); the CIDv1 form is ``"b" || base32(01 72 || multihash)`` (multibase ``b`` =
  RFC 4648 base32, lowercase, no padding; CID version 1, multicodec ``0x72`` = ``libp2p-key``);
* the X25519 key used with ``crypto_box``: the Ed25519 key converted with ``to_curve25519_private_key()``.

Only Ed25519 identity multihashes are accepted.  Parsing is strict and canonical: one byte string has one text form,
varints must be minimal, and anything else (a hashed multihash, another key type, a bad character, a wrong CID
version or codec, trailing bytes) raises :class:`InvalidPeerIdError` naming the reason.  Parsers never let
``ValueError``/``IndexError`` escape, since peer IDs arrive from the network.

The key file (see :func:`save_identity` / :func:`load_identity` and ``docs/protocol.md``) stores the seed encrypted
with ``SecretBox`` under a key derived from a passphrase with Argon2id (MODERATE limits by default, and never more
memory than MODERATE, even when a file asks for it).  The file is replaced atomically and is always mode 0600.  A key
file stored in clear is only written, and only *read*, when the caller explicitly allows it (``allow_unencrypted``):
otherwise someone able to write the data directory could plant a clear file holding a seed they know.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import getpass
import hmac
import logging
import os
import secrets
import stat
import struct
import unicodedata
from collections.abc import Callable, Mapping
from typing import Final

import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.public
import nacl.pwhash.argon2id
import nacl.secret
import nacl.signing
import nacl.utils

from p2pmsg.errors import LocalProtocolError, P2PMsgError, RemoteProtocolError

__all__ = [
    "PASSPHRASE_CREDENTIAL",
    "PASSPHRASE_ENV",
    "PASSPHRASE_FILE_ENV",
    "CorruptKeyFileError",
    "Identity",
    "InvalidPeerIdError",
    "KeyFileError",
    "PassphraseFileError",
    "PassphraseMismatchError",
    "PassphraseRequiredError",
    "PeerId",
    "UnencryptedKeyFileError",
    "UnsupportedKeyFileVersionError",
    "VarintError",
    "WrongPassphraseError",
    "base32_decode",
    "base32_encode",
    "base58btc_decode",
    "base58btc_encode",
    "decode_key_file",
    "encode_key_file",
    "encode_uvarint",
    "load_identity",
    "parse_public_key_protobuf",
    "passphrase_from_environment",
    "public_key_protobuf",
    "read_small_file",
    "read_uvarint",
    "resolve_passphrase",
    "save_identity",
]

logger = logging.getLogger(__name__)

ED25519_PUBLIC_KEY_SIZE: Final = 32
ED25519_SEED_SIZE: Final = 32
ED25519_SIGNATURE_SIZE: Final = 64

#: libp2p ``KeyType`` enum values, for error messages.
_KEY_TYPE_NAMES: Final = {0: "RSA", 1: "Ed25519", 2: "Secp256k1", 3: "ECDSA"}
_KEY_TYPE_ED25519: Final = 1

_PROTOBUF_PREFIX: Final = b"\x08\x01\x12\x20"
PUBLIC_KEY_PROTOBUF_SIZE: Final = len(_PROTOBUF_PREFIX) + ED25519_PUBLIC_KEY_SIZE  # 36

_MULTIHASH_IDENTITY: Final = 0x00
_MULTIHASH_NAMES: Final = {0x00: "identity", 0x11: "sha1", 0x12: "sha2-256", 0x13: "sha2-512", 0x1B: "keccak-256"}
_MULTIHASH_PREFIX: Final = bytes([_MULTIHASH_IDENTITY, PUBLIC_KEY_PROTOBUF_SIZE])
PEER_ID_SIZE: Final = len(_MULTIHASH_PREFIX) + PUBLIC_KEY_PROTOBUF_SIZE  # 38

_CID_VERSION: Final = 1
_CID_CODEC_LIBP2P_KEY: Final = 0x72
_CID_PREFIX: Final = bytes([_CID_VERSION, _CID_CODEC_LIBP2P_KEY])

#: Longest peer-ID text accepted before decoding (the real forms are 52 and 65 characters).
MAX_PEER_ID_TEXT: Final = 128

#: Longest unsigned varint accepted (multiformats caps varints at 9 bytes / 63 bits).
MAX_UVARINT_BYTES: Final = 9


class InvalidPeerIdError(RemoteProtocolError):
    """A peer ID or public-key protobuf is malformed or is not an Ed25519 identity multihash."""


class VarintError(RemoteProtocolError):
    """An unsigned varint is truncated, overlong (not minimal) or longer than :data:`MAX_UVARINT_BYTES`."""


# ---------------------------------------------------------------------------------------------------------------------
# Unsigned varints (LEB128, as in multiformats and protobuf)
# ---------------------------------------------------------------------------------------------------------------------


def encode_uvarint(value: int) -> bytes:
    """Encode a non-negative integer as an unsigned LEB128 varint (7 bits per byte, least significant first)."""
    if value < 0:
        raise LocalProtocolError(f"uvarint value must be non-negative, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_uvarint(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """Decode the minimal unsigned varint at ``data[pos:]``; return ``(value, position after it)``.

    Raises :class:`VarintError` if it is truncated, longer than :data:`MAX_UVARINT_BYTES` or not minimally encoded
    (a trailing ``0x00`` continuation byte).
    """
    value = 0
    shift = 0
    for i in range(MAX_UVARINT_BYTES):
        if pos + i >= len(data):
            raise VarintError("varint is truncated")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise VarintError("varint is not minimally encoded (overlong)")
            return value, pos + i + 1
        shift += 7
    raise VarintError(f"varint is longer than {MAX_UVARINT_BYTES} bytes")


# ---------------------------------------------------------------------------------------------------------------------
# base58btc and base32 (multibase)
# ---------------------------------------------------------------------------------------------------------------------

_B58_ALPHABET: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX: Final = {c: i for i, c in enumerate(_B58_ALPHABET)}
_B32_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"
_B32_INDEX: Final = {c: i for i, c in enumerate(_B32_ALPHABET)}


def base58btc_encode(data: bytes) -> str:
    """Encode bytes in base58 with the Bitcoin alphabet; each leading zero byte becomes a leading ``1``."""
    zeros = len(data) - len(data.lstrip(b"\x00"))
    number = int.from_bytes(data, "big")
    digits: list[str] = []
    while number:
        number, rem = divmod(number, 58)
        digits.append(_B58_ALPHABET[rem])
    return "1" * zeros + "".join(reversed(digits))


def base58btc_decode(text: str) -> bytes:
    """Decode base58btc text (the inverse of :func:`base58btc_encode`).

    Raises :class:`InvalidPeerIdError` naming the first character outside the alphabet.
    """
    number = 0
    for position, char in enumerate(text):
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise InvalidPeerIdError(f"invalid base58btc character {char!r} at position {position}")
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * zeros + body


def base32_encode(data: bytes) -> str:
    """Encode bytes as RFC 4648 base32, lowercase, without ``=`` padding (multibase ``b`` without the prefix)."""
    out: list[str] = []
    buffer = 0
    bits = 0
    for byte in data:
        buffer = (buffer << 8) | byte
        bits += 8
        while bits >= 5:
            bits -= 5
            out.append(_B32_ALPHABET[(buffer >> bits) & 0x1F])
    if bits:
        out.append(_B32_ALPHABET[(buffer << (5 - bits)) & 0x1F])
    return "".join(out)


def base32_decode(text: str) -> bytes:
    """Decode lowercase unpadded RFC 4648 base32, strictly (the inverse of :func:`base32_encode`).

    Raises :class:`InvalidPeerIdError` on a character outside the lowercase alphabet (including ``=`` padding), on an
    impossible length (1, 3 or 6 characters modulo 8) or on non-zero unused trailing bits (a non-canonical form).
    """
    out = bytearray()
    buffer = 0
    bits = 0
    for position, char in enumerate(text):
        value = _B32_INDEX.get(char)
        if value is None:
            raise InvalidPeerIdError(
                f"invalid base32 character {char!r} at position {position} (lowercase, no padding)"
            )
        buffer = (buffer << 5) | value
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((buffer >> bits) & 0xFF)
            buffer &= (1 << bits) - 1
    if len(text) % 8 in (1, 3, 6):
        raise InvalidPeerIdError(
            f"invalid base32 length {len(text)}: {len(text) % 8} characters modulo 8 is impossible"
        )
    if buffer:
        raise InvalidPeerIdError("base32 text has non-zero trailing bits (non-canonical encoding)")
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------------------
# Public key protobuf and PeerId
# ---------------------------------------------------------------------------------------------------------------------


def public_key_protobuf(ed25519_public_key: bytes) -> bytes:
    """Return libp2p's ``PublicKey`` protobuf for an Ed25519 key: ``08 01 12 20 || pk`` (36 bytes)."""
    if len(ed25519_public_key) != ED25519_PUBLIC_KEY_SIZE:
        raise InvalidPeerIdError(
            f"Ed25519 public key must be {ED25519_PUBLIC_KEY_SIZE} bytes, got {len(ed25519_public_key)}"
        )
    return _PROTOBUF_PREFIX + bytes(ed25519_public_key)


def parse_public_key_protobuf(data: bytes) -> bytes:
    """Parse libp2p's ``PublicKey`` protobuf and return the raw 32-byte Ed25519 public key.

    Only the canonical Ed25519 form ``08 01 12 20 || pk`` is accepted; anything else (another key type, a wrong key
    length, reordered, missing or extra fields, truncation, trailing bytes) raises :class:`InvalidPeerIdError`.
    """
    data = bytes(data)
    try:
        if not data:
            raise InvalidPeerIdError("public key protobuf is empty")
        if data[0] != 0x08:
            raise InvalidPeerIdError(
                f"public key protobuf must start with field 1 (Type, varint) tag 0x08, got 0x{data[0]:02x}"
            )
        key_type, pos = read_uvarint(data, 1)
        if key_type != _KEY_TYPE_ED25519:
            name = _KEY_TYPE_NAMES.get(key_type, "unknown")
            raise InvalidPeerIdError(f"public key type {key_type} ({name}) is not supported: only Ed25519 (1)")
        if pos >= len(data):
            raise InvalidPeerIdError("public key protobuf is truncated: field 2 (Data) is missing")
        if data[pos] != 0x12:
            raise InvalidPeerIdError(
                f"public key protobuf field 2 (Data, bytes) must have tag 0x12, got 0x{data[pos]:02x}"
            )
        key_len, pos = read_uvarint(data, pos + 1)
        if key_len != ED25519_PUBLIC_KEY_SIZE:
            raise InvalidPeerIdError(f"Ed25519 public key must be {ED25519_PUBLIC_KEY_SIZE} bytes, got {key_len}")
        remaining = len(data) - pos
        if remaining < key_len:
            raise InvalidPeerIdError(f"public key protobuf is truncated: {remaining} of {key_len} key bytes present")
        if remaining > key_len:
            raise InvalidPeerIdError(f"public key protobuf has {remaining - key_len} trailing bytes")
    except VarintError as exc:
        raise InvalidPeerIdError(f"public key protobuf: {exc}") from exc
    return data[pos:]


def _parse_multihash(data: bytes) -> bytes:
    """Validate an identity multihash of an Ed25519 public key protobuf and return it unchanged (as bytes)."""
    try:
        code, pos = read_uvarint(data, 0)
        if code != _MULTIHASH_IDENTITY:
            name = _MULTIHASH_NAMES.get(code, "unknown")
            raise InvalidPeerIdError(
                f"multihash code 0x{code:x} ({name}) is not supported: only the identity multihash (0x00) of an "
                "Ed25519 public key"
            )
        length, pos = read_uvarint(data, pos)
    except VarintError as exc:
        raise InvalidPeerIdError(f"multihash: {exc}") from exc
    present = len(data) - pos
    if length != present:
        raise InvalidPeerIdError(f"multihash digest length is {length} but {present} bytes follow")
    if length != PUBLIC_KEY_PROTOBUF_SIZE:
        raise InvalidPeerIdError(
            f"identity multihash digest is {length} bytes: an Ed25519 public key protobuf is {PUBLIC_KEY_PROTOBUF_SIZE}"
        )
    parse_public_key_protobuf(data[pos:])
    return data


@functools.lru_cache(maxsize=4096)
def _peer_id_text(multihash: bytes) -> str:
    """base58btc of a peer ID, cached: the big-integer conversion costs ~25 µs and hot paths (envelopes, logs,
    control API results) render the same few peers over and over."""
    return base58btc_encode(multihash)


@dataclasses.dataclass(frozen=True, slots=True, order=True, repr=False)
class PeerId:
    """A libp2p peer ID of an Ed25519 key: the identity multihash ``00 24 08 01 12 20 || pk``.

    Immutable and hashable; ordered by :meth:`to_bytes`.  Build one with :meth:`from_public_key`, :meth:`from_bytes`
    or :meth:`from_string`; ``str(peer_id)`` is the base58btc form.
    """

    _multihash: bytes

    def __post_init__(self) -> None:
        if not isinstance(self._multihash, bytes):
            raise InvalidPeerIdError(f"peer ID must be bytes, got {type(self._multihash).__name__}")
        _parse_multihash(self._multihash)

    @classmethod
    def from_public_key(cls, ed25519_public_key: bytes) -> PeerId:
        """The peer ID of a raw 32-byte Ed25519 public key."""
        return cls(_MULTIHASH_PREFIX + public_key_protobuf(bytes(ed25519_public_key)))

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerId:
        """Parse the binary peer ID (38 bytes: ``00 24 08 01 12 20 || pk``); :class:`InvalidPeerIdError` otherwise."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidPeerIdError(f"peer ID must be bytes, got {type(data).__name__}")
        return cls(bytes(data))

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse a peer ID in text: base58btc (``12D3KooW...``) or a CIDv1 in multibase base32 (``bafz...``).

        As in the libp2p spec, text starting with ``1`` or ``Qm`` is a bare base58btc multihash; anything else must
        be a multibase CID (prefix ``b`` = base32 lowercase, or ``z`` = base58btc) of version 1 with the
        ``libp2p-key`` codec (0x72).
        """
        if not isinstance(text, str):
            raise InvalidPeerIdError(f"peer ID text must be str, got {type(text).__name__}")
        if not text:
            raise InvalidPeerIdError("peer ID text is empty")
        if len(text) > MAX_PEER_ID_TEXT:
            raise InvalidPeerIdError(f"peer ID text is {len(text)} characters, longer than {MAX_PEER_ID_TEXT}")
        if text.startswith(("1", "Qm")):
            return cls.from_bytes(base58btc_decode(text))
        prefix, body = text[0], text[1:]
        if prefix == "b":
            cid = base32_decode(body)
        elif prefix == "z":
            cid = base58btc_decode(body)
        else:
            raise InvalidPeerIdError(
                f"unsupported peer ID text: multibase prefix {prefix!r} is not 'b' (base32) or 'z' (base58btc), "
                "and the text is not a base58btc multihash starting with '1' or 'Qm'"
            )
        try:
            version, pos = read_uvarint(cid, 0)
            if version != _CID_VERSION:
                raise InvalidPeerIdError(f"CID version {version} is not supported: only CIDv1")
            codec, pos = read_uvarint(cid, pos)
        except VarintError as exc:
            raise InvalidPeerIdError(f"CID: {exc}") from exc
        if codec != _CID_CODEC_LIBP2P_KEY:
            raise InvalidPeerIdError(f"CID codec 0x{codec:x} is not libp2p-key (0x72)")
        return cls.from_bytes(cid[pos:])

    def to_bytes(self) -> bytes:
        """The binary peer ID (the 38-byte identity multihash)."""
        return self._multihash

    def to_base58(self) -> str:
        """The base58btc text form (``12D3KooW...``), also given by ``str()``."""
        return _peer_id_text(self._multihash)

    def to_cid(self) -> str:
        """The CIDv1 text form: multibase ``b`` + base32(``01 72`` || multihash) (``bafz...``)."""
        return "b" + base32_encode(_CID_PREFIX + self._multihash)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._multihash[-ED25519_PUBLIC_KEY_SIZE:]

    @property
    def x25519_public_key(self) -> bytes:
        """The 32-byte X25519 public key converted from the Ed25519 key (for ``crypto_box`` to this peer).

        Raises :class:`InvalidPeerIdError` if the Ed25519 key is not a valid curve point.
        """
        try:
            return bytes(nacl.signing.VerifyKey(self.public_key).to_curve25519_public_key())
        except nacl.exceptions.CryptoError as exc:
            raise InvalidPeerIdError("Ed25519 public key is not a valid curve point: no X25519 equivalent") from exc

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is a valid 64-byte detached Ed25519 signature of ``message`` by this peer."""
        if len(signature) != ED25519_SIGNATURE_SIZE:
            return False
        try:
            nacl.signing.VerifyKey(self.public_key).verify(bytes(message), bytes(signature))
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return False
        return True

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.to_base58()!r})"


# ---------------------------------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------------------------------


class Identity:
    """This node's Ed25519 key pair.  The secret never appears in ``repr``; compare identities with ``==``."""

    __slots__ = ("_peer_id", "_signing_key", "_x25519_private_key")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        """Wrap a PyNaCl signing key (prefer :meth:`generate` or :meth:`from_seed`)."""
        self._signing_key = signing_key
        self._peer_id = PeerId.from_public_key(bytes(signing_key.verify_key))
        self._x25519_private_key: nacl.public.PrivateKey | None = None

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity of a 32-byte Ed25519 seed (the first half of libp2p's 64-byte private key data)."""
        if not isinstance(seed, bytes | bytearray | memoryview) or len(seed) != ED25519_SEED_SIZE:
            size = len(seed) if isinstance(seed, bytes | bytearray | memoryview) else type(seed).__name__
            raise LocalProtocolError(f"Ed25519 seed must be {ED25519_SEED_SIZE} bytes, got {size}")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    @property
    def seed(self) -> bytes:
        """The 32-byte Ed25519 seed: the secret.  Keep it in memory only or in an encrypted key file."""
        return bytes(self._signing_key)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._peer_id.public_key

    @property
    def peer_id(self) -> PeerId:
        """This identity's peer ID."""
        return self._peer_id

    def sign(self, message: bytes) -> bytes:
        """A 64-byte detached Ed25519 signature of ``message``."""
        return bytes(self._signing_key.sign(bytes(message)).signature)

    @property
    def x25519_private_key(self) -> nacl.public.PrivateKey:
        """The X25519 private key for ``crypto_box``, converted from the Ed25519 key (cached)."""
        if self._x25519_private_key is None:
            self._x25519_private_key = self._signing_key.to_curve25519_private_key()
        return self._x25519_private_key

    @property
    def x25519_public_key(self) -> bytes:
        """The 32-byte X25519 public key matching :attr:`x25519_private_key`."""
        return bytes(self.x25519_private_key.public_key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return hmac.compare_digest(self.seed, other.seed)

    def __hash__(self) -> int:
        return hash(self._peer_id)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self._peer_id.to_base58()!r})"


# ---------------------------------------------------------------------------------------------------------------------
# Key file
# ---------------------------------------------------------------------------------------------------------------------
#
# Version 1, all integers big-endian (docs/protocol.md has the full description):
#
#   encrypted (kdf 1)                          unencrypted (kdf 0, written and read only with allow_unencrypted)
#   0   8  magic "P2PMSGKF"                    0   8  magic "P2PMSGKF"
#   8   1  version = 1                         8   1  version = 1
#   9   1  kdf = 1 (Argon2id v1.3)             9   1  kdf = 0 (none)
#   10  4  opslimit (u32)                      10 32  seed
#   14  8  memlimit in bytes (u64)             42 16  checksum = BLAKE2b-128(bytes 0..41)
#   22 16  salt                                total 58 bytes
#   38 24  nonce
#   62 48  SecretBox(seed): 16-byte Poly1305 tag || 32-byte XSalsa20 ciphertext
#   110 16 checksum = BLAKE2b-128(bytes 0..109)
#   total 126 bytes
#
# The checksum is the last 16 bytes in every version, so corruption is told apart from a wrong passphrase (which fails
# the SecretBox tag) before the version is even looked at.

PASSPHRASE_ENV: Final = "P2PMSG_PASSPHRASE"
PASSPHRASE_FILE_ENV: Final = "P2PMSG_PASSPHRASE_FILE"
"""Names a file holding the passphrase (e.g. a systemd credential), so it need not sit in the node's environment."""
MAX_PASSPHRASE_FILE_SIZE: Final = 4096
PASSPHRASE_CREDENTIAL: Final = "p2pmsg-passphrase"
"""Name of the systemd credential (``LoadCredential=``) read when neither variable is set."""

KEY_FILE_MAGIC: Final = b"P2PMSGKF"
KEY_FILE_VERSION: Final = 1
KDF_NONE: Final = 0
KDF_ARGON2ID: Final = 1

#: Argon2id defaults: MODERATE (3 passes, 256 MiB).  SENSITIVE (1 GiB) would exhaust a Raspberry Pi.
DEFAULT_OPSLIMIT: Final[int] = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
DEFAULT_MEMLIMIT: Final[int] = nacl.pwhash.argon2id.MEMLIMIT_MODERATE

#: Bounds on the KDF parameters, enforced when saving and (against hostile or corrupt files) when loading, before any
#: key derivation.  At most MODERATE memory (256 MiB) and SENSITIVE passes (4): a planted or corrupt file can cost at
#: most about 1.3 times a default load, never 1 GiB of memory.
MIN_OPSLIMIT: Final[int] = nacl.pwhash.argon2id.OPSLIMIT_MIN  # 1
MAX_OPSLIMIT: Final[int] = nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE  # 4
MIN_MEMLIMIT: Final[int] = nacl.pwhash.argon2id.MEMLIMIT_MIN  # 8 KiB
MAX_MEMLIMIT: Final[int] = nacl.pwhash.argon2id.MEMLIMIT_MODERATE  # 256 MiB

_CHECKSUM_SIZE: Final = 16
_SALT_SIZE: Final[int] = nacl.pwhash.argon2id.SALTBYTES  # 16
_NONCE_SIZE: Final[int] = nacl.secret.SecretBox.NONCE_SIZE  # 24
_BOX_SIZE: Final = nacl.secret.SecretBox.MACBYTES + ED25519_SEED_SIZE  # 48
_PREAMBLE: Final = struct.Struct(">8sBB")  # magic, version, kdf
_ARGON2_PARAMS: Final = struct.Struct(">IQ")  # opslimit, memlimit
_ENCRYPTED_SIZE: Final = _PREAMBLE.size + _ARGON2_PARAMS.size + _SALT_SIZE + _NONCE_SIZE + _BOX_SIZE + _CHECKSUM_SIZE
_UNENCRYPTED_SIZE: Final = _PREAMBLE.size + ED25519_SEED_SIZE + _CHECKSUM_SIZE
_SIZE_BY_KDF: Final = {KDF_NONE: _UNENCRYPTED_SIZE, KDF_ARGON2ID: _ENCRYPTED_SIZE}
#: Larger files are refused without reading them whole.
MAX_KEY_FILE_SIZE: Final = 4096

StrPath = str | os.PathLike[str]


class KeyFileError(P2PMsgError):
    """Base class of key-file errors (also raised for invalid arguments to :func:`save_identity`)."""


class WrongPassphraseError(KeyFileError):
    """The key file is intact but the passphrase does not decrypt it."""


class CorruptKeyFileError(KeyFileError):
    """The key file is damaged or hostile: truncated, bad magic, checksum mismatch, or KDF parameters out of bounds."""


class UnsupportedKeyFileVersionError(KeyFileError):
    """The key file is intact but written in a format version this code does not know."""


class PassphraseRequiredError(KeyFileError):
    """A passphrase is needed (to load an encrypted key file, or to save one without ``allow_unencrypted``)."""


class PassphraseFileError(PassphraseRequiredError):
    """The passphrase file named by the environment (``$P2PMSG_PASSPHRASE_FILE`` or the systemd credential) cannot
    be used; the message names the file, where it was named, and why.  The file is never passed over for the
    prompt."""


class UnencryptedKeyFileError(KeyFileError):
    """The key file is intact but stores the seed in clear, and the caller did not pass ``allow_unencrypted=True``."""


class PassphraseMismatchError(KeyFileError):
    """The passphrase and its confirmation differ."""


def _checksum(data: bytes) -> bytes:
    digest: bytes = nacl.hash.blake2b(data, digest_size=_CHECKSUM_SIZE, encoder=nacl.encoding.RawEncoder)
    return digest


def _passphrase_bytes(passphrase: str) -> bytes:
    try:
        return unicodedata.normalize("NFC", passphrase).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise KeyFileError(f"passphrase is not encodable as UTF-8: {exc.reason}") from exc


def _derive_key(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    key: bytes = nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, _passphrase_bytes(passphrase), salt, opslimit=opslimit, memlimit=memlimit
    )
    return key


def _check_kdf_bounds(opslimit: int, memlimit: int) -> str | None:
    """The reason the parameters are out of bounds, or None."""
    if not MIN_OPSLIMIT <= opslimit <= MAX_OPSLIMIT:
        return f"opslimit {opslimit} is outside [{MIN_OPSLIMIT}, {MAX_OPSLIMIT}]"
    if not MIN_MEMLIMIT <= memlimit <= MAX_MEMLIMIT:
        return f"memlimit {memlimit} bytes is outside [{MIN_MEMLIMIT}, {MAX_MEMLIMIT}]"
    return None


def encode_key_file(
    identity: Identity,
    passphrase: str | None,
    *,
    allow_unencrypted: bool = False,
    opslimit: int | None = None,
    memlimit: int | None = None,
) -> bytes:
    """Serialise ``identity`` in key-file format version 1 (see :func:`save_identity` for the arguments)."""
    if passphrase is None:
        if not allow_unencrypted:
            raise PassphraseRequiredError(
                "a passphrase is required to save the identity; pass allow_unencrypted=True to store it in clear"
            )
        body = _PREAMBLE.pack(KEY_FILE_MAGIC, KEY_FILE_VERSION, KDF_NONE) + identity.seed
        return body + _checksum(body)
    if not passphrase:
        raise KeyFileError("passphrase must not be empty (use passphrase=None with allow_unencrypted=True instead)")
    ops = DEFAULT_OPSLIMIT if opslimit is None else opslimit
    mem = DEFAULT_MEMLIMIT if memlimit is None else memlimit
    reason = _check_kdf_bounds(ops, mem)
    if reason is not None:
        raise KeyFileError(f"cannot save key file: {reason}")
    salt = nacl.utils.random(_SALT_SIZE)
    nonce = nacl.utils.random(_NONCE_SIZE)
    box = nacl.secret.SecretBox(_derive_key(passphrase, salt, ops, mem))
    sealed = box.encrypt(identity.seed, nonce).ciphertext
    body = (
        _PREAMBLE.pack(KEY_FILE_MAGIC, KEY_FILE_VERSION, KDF_ARGON2ID)
        + _ARGON2_PARAMS.pack(ops, mem)
        + salt
        + nonce
        + bytes(sealed)
    )
    return body + _checksum(body)


def decode_key_file(
    data: bytes, passphrase: str | None, *, allow_unencrypted: bool = False, source: str = "key file"
) -> Identity:
    """Parse and decrypt key-file bytes (see :func:`load_identity`); ``source`` prefixes error messages."""
    size = len(data)
    if data[: len(KEY_FILE_MAGIC)] != KEY_FILE_MAGIC:
        raise CorruptKeyFileError(f"{source}: bad magic (not a p2pmsg key file)")
    if size > MAX_KEY_FILE_SIZE:
        raise CorruptKeyFileError(f"{source}: {size} bytes is larger than the {MAX_KEY_FILE_SIZE}-byte maximum")
    if size < _PREAMBLE.size + _CHECKSUM_SIZE:
        raise CorruptKeyFileError(f"{source}: truncated ({size} bytes)")
    _magic, version, kdf = _PREAMBLE.unpack_from(data)
    if not hmac.compare_digest(_checksum(data[:-_CHECKSUM_SIZE]), data[-_CHECKSUM_SIZE:]):
        expected = _SIZE_BY_KDF.get(kdf) if version == KEY_FILE_VERSION else None
        if expected is not None and size < expected:
            raise CorruptKeyFileError(f"{source}: truncated ({size} of {expected} bytes)")
        raise CorruptKeyFileError(f"{source}: checksum mismatch (the file is damaged)")
    if version != KEY_FILE_VERSION:
        raise UnsupportedKeyFileVersionError(
            f"{source}: format version {version} is not supported (this version of p2pmsg reads {KEY_FILE_VERSION})"
        )
    expected = _SIZE_BY_KDF.get(kdf)
    if expected is None:
        raise CorruptKeyFileError(f"{source}: unknown kdf id {kdf} (version 1 knows 0 = none and 1 = Argon2id)")
    if size != expected:
        raise CorruptKeyFileError(f"{source}: {size} bytes, a version-1 file with kdf {kdf} is {expected}")
    pos = _PREAMBLE.size
    if kdf == KDF_NONE:
        if not allow_unencrypted:
            raise UnencryptedKeyFileError(
                f"{source} is NOT encrypted (the seed is stored in clear): refusing to load it, because anyone who "
                "can write the data directory could have planted a key they know.  If it was created without a "
                "passphrase on purpose (init --no-passphrase), load it with allow_unencrypted=True; otherwise "
                "replace it with your encrypted key file"
            )
        logger.warning("%s is NOT encrypted: anyone who can read it can impersonate this node", source)
        return Identity.from_seed(data[pos : pos + ED25519_SEED_SIZE])
    opslimit, memlimit = _ARGON2_PARAMS.unpack_from(data, pos)
    reason = _check_kdf_bounds(opslimit, memlimit)
    if reason is not None:
        raise CorruptKeyFileError(f"{source}: refusing KDF parameters: {reason}")
    pos += _ARGON2_PARAMS.size
    salt = data[pos : pos + _SALT_SIZE]
    pos += _SALT_SIZE
    nonce = data[pos : pos + _NONCE_SIZE]
    pos += _NONCE_SIZE
    sealed = data[pos : pos + _BOX_SIZE]
    if passphrase is None:
        raise PassphraseRequiredError(f"{source} is encrypted: a passphrase is required (or set {PASSPHRASE_ENV})")
    box = nacl.secret.SecretBox(_derive_key(passphrase, salt, opslimit, memlimit))
    try:
        seed = box.decrypt(sealed, nonce)
    except nacl.exceptions.CryptoError as exc:
        raise WrongPassphraseError(f"{source}: wrong passphrase") from exc
    return Identity.from_seed(seed)


def save_identity(
    path: StrPath,
    identity: Identity,
    passphrase: str | None,
    *,
    allow_unencrypted: bool = False,
    opslimit: int | None = None,
    memlimit: int | None = None,
) -> None:
    """Write ``identity`` to the key file ``path``, atomically, with mode 0600.

    The seed is encrypted with ``SecretBox`` under a key derived from ``passphrase`` (NFC-normalised, UTF-8) by
    Argon2id with ``opslimit``/``memlimit`` (default MODERATE; bounded by :data:`MAX_OPSLIMIT` = 4 passes and
    :data:`MAX_MEMLIMIT` = 256 MiB, the same bounds :func:`load_identity` enforces).  ``passphrase=None`` writes the
    seed in clear, and only with ``allow_unencrypted=True`` (logged as a warning); otherwise it raises
    :class:`PassphraseRequiredError`.  Such a file is read back only with ``load_identity(...,
    allow_unencrypted=True)``.  An empty passphrase is refused.

    The bytes go to a new temporary file in the same directory (created 0600 with ``O_EXCL``), are fsynced, renamed
    over ``path`` with ``os.replace`` and the directory is fsynced: a crash leaves either the old file or the new one,
    never a mix, and a failure removes the temporary file.
    """
    data = encode_key_file(
        identity, passphrase, allow_unencrypted=allow_unencrypted, opslimit=opslimit, memlimit=memlimit
    )
    if passphrase is None:
        logger.warning("writing UNENCRYPTED key file %s: anyone who can read it can impersonate this node", path)
    _atomic_write(os.fspath(path), data)


def load_identity(path: StrPath, passphrase: str | None, *, allow_unencrypted: bool = False) -> Identity:
    """Read the key file ``path`` written by :func:`save_identity`.

    A file that stores the seed in clear (written with ``allow_unencrypted=True``) is only accepted when
    ``allow_unencrypted`` is True here too, whatever ``passphrase`` is; otherwise :class:`UnencryptedKeyFileError`.
    Loading it logs a warning.

    Raises :class:`PassphraseRequiredError` (encrypted, ``passphrase`` is None), :class:`WrongPassphraseError`,
    :class:`UnencryptedKeyFileError`, :class:`CorruptKeyFileError` (truncated, bad magic, checksum mismatch from bit
    flips, KDF parameters out of bounds, over :data:`MAX_KEY_FILE_SIZE`), :class:`UnsupportedKeyFileVersionError`;
    ``OSError`` (e.g. ``FileNotFoundError``) from the file system passes through.  Logs a warning if the file is
    readable by others.
    """
    name = os.fspath(path)
    data, mode = read_small_file(name, MAX_KEY_FILE_SIZE + 1)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("key file %s has mode 0o%o: it should be 0600 (chmod 600 it)", name, stat.S_IMODE(mode))
    return decode_key_file(data, passphrase, allow_unencrypted=allow_unencrypted, source=f"key file {name}")


_FILE_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_small_file(path: StrPath, limit: int) -> tuple[bytes, int]:
    """The first ``limit`` bytes of the regular file ``path`` and its ``st_mode``.  Anything else (a named pipe, a
    device, a directory) raises :class:`OSError` saying what it is, without blocking: opening a named pipe that no
    process writes to would wait forever, and a device may never end."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
            raise OSError(errno.EINVAL, f"{kind}, not a regular file", os.fspath(path))
        os.set_blocking(fd, True)
        handle = open(fd, "rb")  # noqa: SIM115 (it owns the descriptor from here on, closed below)
    except BaseException:
        os.close(fd)
        raise
    with handle:
        return handle.read(limit), mode


def passphrase_from_environment(env: Mapping[str, str] | None = None) -> str | None:
    """The passphrase the environment supplies, or ``None``.  In this order: ``$P2PMSG_PASSPHRASE`` if set (even
    empty: an empty one says "the key file is not encrypted"); the contents of the file named by
    ``$P2PMSG_PASSPHRASE_FILE``; the systemd credential ``p2pmsg-passphrase`` (the file of that name in
    ``$CREDENTIALS_DIRECTORY``, see ``scripts/systemd/p2pmsg.service``).  ``env`` defaults to ``os.environ``.

    A passphrase file holds the passphrase as UTF-8 text, at most 4 KiB; one trailing line end (``\\n`` or
    ``\\r\\n``) is removed.  Raises :class:`PassphraseRequiredError`, naming the file, when it cannot be read, is
    larger than 4 KiB, is not UTF-8, or holds nothing: an empty file is never taken to mean "no passphrase" (a file
    created but not yet filled in must not let an unencrypted key file be loaded)."""
    environment = os.environ if env is None else env
    value = environment.get(PASSPHRASE_ENV)
    if value is not None:
        return value
    path = environment.get(PASSPHRASE_FILE_ENV)
    source = f"${PASSPHRASE_FILE_ENV}"
    if path is None:
        credentials = environment.get("CREDENTIALS_DIRECTORY")
        if not credentials:
            return None
        path = os.path.join(credentials, PASSPHRASE_CREDENTIAL)
        source = f"the systemd credential {PASSPHRASE_CREDENTIAL}"
        if not os.path.exists(path):
            return None
    return _read_passphrase_file(path, source)


def _read_passphrase_file(path: str, source: str) -> str:
    """The passphrase in ``path`` (named by ``source``), or :class:`PassphraseFileError`."""

    def unusable(reason: str) -> PassphraseFileError:
        return PassphraseFileError(f"passphrase file {path} (from {source}): {reason}")

    try:
        # Opened without blocking: opening a named pipe that no process writes to would otherwise wait forever.
        # Reads block again (a pipe being written, as from ``<(pass show ...)``, is waited for); a pipe with no
        # writer reads as empty at once.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        os.set_blocking(fd, True)
        with open(fd, "rb") as handle:
            pipe = stat.S_ISFIFO(os.fstat(handle.fileno()).st_mode)
            data = handle.read(MAX_PASSPHRASE_FILE_SIZE + 1)
    except OSError as exc:
        raise unusable(f"cannot read it ({exc.strerror})") from None
    if pipe and not data:
        raise unusable("a pipe that no process writes to (nothing to read)")
    if len(data) > MAX_PASSPHRASE_FILE_SIZE:
        raise unusable(f"larger than {MAX_PASSPHRASE_FILE_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise unusable("not UTF-8 text") from None
    for ending in ("\r\n", "\n"):
        if text.endswith(ending):
            text = text[: -len(ending)]
            break
    if not text:
        raise unusable("empty (write the key file's passphrase into it)")
    return text


def resolve_passphrase(
    *,
    confirm: bool = False,
    env: Mapping[str, str] | None = None,
    prompt: Callable[[str], str] = getpass.getpass,
) -> str:
    """The key-file passphrase: from the environment (:func:`passphrase_from_environment`) if it supplies one,
    else asked with ``prompt`` (getpass).

    With ``confirm`` the prompt asks twice and :class:`PassphraseMismatchError` is raised if the answers differ.
    ``env`` defaults to ``os.environ``.  End of input at the prompt raises :class:`PassphraseRequiredError`.
    """
    value = passphrase_from_environment(env)
    if value is not None:
        return value
    try:
        first = prompt("Passphrase: ")
        if confirm and prompt("Repeat passphrase: ") != first:
            raise PassphraseMismatchError("the two passphrases differ")
    except EOFError as exc:
        raise PassphraseRequiredError(
            f"no passphrase: neither {PASSPHRASE_ENV} nor {PASSPHRASE_FILE_ENV} is set and the input ended"
        ) from exc
    return first


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(temp, flags, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits; make the mode exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError as exc:
            logger.warning("could not remove temporary key file %s: %s", temp, exc)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)

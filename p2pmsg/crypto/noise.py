"""The Noise Protocol Framework (revision 34), restricted to ``Noise_XX_25519_ChaChaPoly_<HASH>``.

Theory of operation
-------------------
Noise builds a handshake out of three layers, each a small object here:

* :class:`CipherState` holds a 32-byte key ``k`` and a 64-bit counter ``n``.  Every encryption uses the next ``n``
  as the ChaCha20-Poly1305 (IETF) nonce ``00000000 || little-endian u64(n)``.  ``n = 2**64 - 1`` is reserved: once
  the counter reaches it the state refuses to work (:class:`NonceExhaustedError`) instead of ever reusing a nonce.
  :meth:`CipherState.rekey` replaces ``k`` with the first 32 bytes of ``ENCRYPT(k, 2**64 - 1, b"", 32 zero bytes)``.
* :class:`SymmetricState` keeps the chaining key ``ck`` and the transcript hash ``h``.  ``MixHash`` folds every sent
  or received byte into ``h``; ``MixKey`` runs HKDF (HMAC over the chosen hash) on ``ck`` and a DH output and keys the
  cipher; everything encrypted during the handshake uses ``h`` as associated data, so both sides must have seen the
  same transcript or decryption fails.  ``Split`` derives the two transport keys at the end.
* :class:`HandshakeState` runs the XX message pattern::

      -> e
      <- e, ee, s, es
      -> s, se

  The initiator writes messages 1 and 3, the responder message 2.  Whose turn it is lives in one explicit state
  machine (:class:`HandshakeStatus` plus the ``_TRANSITIONS`` table); anything out of turn raises
  :class:`NoiseStateError` (a :class:`~p2pmsg.errors.LocalProtocolError`).  Bad input from the peer raises a
  :class:`NoiseRemoteError` subclass and leaves the handshake ``FAILED`` for good: a Noise handshake cannot be
  resumed after a failed message, because the transcript hash has already absorbed part of it.

After the last message :meth:`HandshakeState.transport` hands out a :class:`NoiseTransport` (the two
:class:`CipherState` objects of ``Split``, oriented for this side).  No message, handshake or transport, may exceed
65535 bytes.

The module is sans-IO and deterministic when keys are injected (test vectors); otherwise static and ephemeral keys
come from the operating system's CSPRNG.  Primitives: X25519 ``crypto_scalarmult`` (an all-zero shared secret,
i.e. a low-order public key from the peer, is rejected), ChaCha20-Poly1305 IETF from libsodium, and ``hashlib``
SHA-256 / SHA-512 / BLAKE2b / BLAKE2s with ``hmac``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError
from nacl.exceptions import RuntimeError as NaclRuntimeError

from p2pmsg.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DH_LEN",
    "KEY_LEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "MAX_PLAINTEXT_LEN",
    "TAG_LEN",
    "CipherState",
    "DecryptionError",
    "HandshakeState",
    "HandshakeStatus",
    "InvalidDHError",
    "KeyPair",
    "MalformedMessageError",
    "NoiseHash",
    "NoiseLocalError",
    "NoiseRemoteError",
    "NoiseStateError",
    "NoiseTransport",
    "NonceExhaustedError",
    "SymmetricState",
    "hash_for_protocol",
]

MAX_MESSAGE_LEN: Final = 65535
"""The Noise limit on any message (handshake or transport), in bytes."""
TAG_LEN: Final = 16
"""Poly1305 authentication tag length."""
MAX_PLAINTEXT_LEN: Final = MAX_MESSAGE_LEN - TAG_LEN
"""Largest transport payload that fits one Noise message."""
DH_LEN: Final = 32
"""X25519 public key / shared secret length."""
KEY_LEN: Final = 32
"""Cipher key length."""
MAX_NONCE: Final = 2**64 - 1
"""The reserved nonce value: a :class:`CipherState` never encrypts or decrypts with it (except inside rekey)."""

_ZERO_DH: Final = bytes(DH_LEN)
_ZEROS_32: Final = bytes(32)
_NONCE: Final = struct.Struct("<4xQ")


# --------------------------------------------------------------------------------------------------------- errors


class NoiseLocalError(LocalProtocolError):
    """This side misused the Noise API (wrong turn, oversized payload, bad key material, unsupported name)."""


class NoiseStateError(NoiseLocalError):
    """The operation is not allowed in the current handshake state."""


class NonceExhaustedError(NoiseLocalError):
    """The 64-bit nonce space of a :class:`CipherState` is used up; the session must end (nonces never repeat)."""


class NoiseRemoteError(RemoteProtocolError):
    """The peer sent a Noise message that cannot be accepted."""


class DecryptionError(NoiseRemoteError):
    """Authenticated decryption failed: the message was forged, corrupted, replayed, reordered or mis-keyed."""


class MalformedMessageError(NoiseRemoteError):
    """A Noise message has the wrong length for the pattern (too short, too long)."""


class InvalidDHError(NoiseRemoteError):
    """The peer's public key gave an all-zero X25519 shared secret (a low-order point)."""


# ----------------------------------------------------------------------------------------------------- primitives


@dataclass(frozen=True, slots=True, kw_only=True)
class NoiseHash:
    """One of the four Noise hash functions, with ``HMAC`` and ``HKDF`` built on it."""

    name: str
    hashlen: int
    blocklen: int
    constructor: Callable[..., Any]

    def hash(self, data: bytes) -> bytes:
        """``HASH(data)``."""
        h = self.constructor()
        h.update(data)
        digest: bytes = h.digest()
        return digest

    def hmac(self, key: bytes, data: bytes) -> bytes:
        """``HMAC-HASH(key, data)`` (RFC 2104 with this hash's BLOCKLEN)."""
        return hmac.digest(key, data, self.constructor)

    def hkdf(self, chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
        """Noise ``HKDF``: two or three HASHLEN outputs from ``chaining_key`` and ``input_key_material``."""
        if num_outputs not in (2, 3):
            raise NoiseLocalError(f"hkdf: num_outputs must be 2 or 3, got {num_outputs}")
        temp_key = self.hmac(chaining_key, input_key_material)
        output1 = self.hmac(temp_key, b"\x01")
        output2 = self.hmac(temp_key, output1 + b"\x02")
        if num_outputs == 2:
            return output1, output2
        output3 = self.hmac(temp_key, output2 + b"\x03")
        return output1, output2, output3


_HASHES: Final[dict[str, NoiseHash]] = {
    "SHA256": NoiseHash(name="SHA256", hashlen=32, blocklen=64, constructor=hashlib.sha256),
    "SHA512": NoiseHash(name="SHA512", hashlen=64, blocklen=128, constructor=hashlib.sha512),
    "BLAKE2b": NoiseHash(name="BLAKE2b", hashlen=64, blocklen=128, constructor=hashlib.blake2b),
    "BLAKE2s": NoiseHash(name="BLAKE2s", hashlen=32, blocklen=64, constructor=hashlib.blake2s),
}

_PROTOCOL_PREFIX: Final = "Noise_XX_25519_ChaChaPoly_"


def hash_for_protocol(protocol_name: str) -> NoiseHash:
    """Return the hash of ``Noise_XX_25519_ChaChaPoly_<HASH>``; any other protocol name raises NoiseLocalError."""
    if not protocol_name.startswith(_PROTOCOL_PREFIX):
        raise NoiseLocalError(f"protocol_name: only {_PROTOCOL_PREFIX}<HASH> is implemented, got {protocol_name!r}")
    suffix = protocol_name[len(_PROTOCOL_PREFIX) :]
    try:
        return _HASHES[suffix]
    except KeyError:
        raise NoiseLocalError(f"protocol_name: hash {suffix!r} is not one of {', '.join(sorted(_HASHES))}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyPair:
    """An X25519 key pair (raw 32-byte private scalar and public key)."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:  # never print private keys
        return f"KeyPair(public={self.public.hex()})"

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        """Derive the public key of a 32-byte X25519 private key (libsodium clamps it)."""
        if not isinstance(private, bytes) or len(private) != DH_LEN:
            raise NoiseLocalError(f"private key: must be {DH_LEN} bytes")
        return cls(private=private, public=crypto_scalarmult_base(private))

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh random key pair from the OS CSPRNG."""
        return cls.from_private(os.urandom(DH_LEN))


def _dh(private: bytes, public: bytes) -> bytes:
    """X25519; an all-zero result (low-order ``public``) raises InvalidDHError."""
    try:
        shared: bytes = crypto_scalarmult(private, public)
    except NaclRuntimeError:  # libsodium refuses all-zero outputs itself
        raise InvalidDHError("X25519: the peer's public key is a low-order point (all-zero shared secret)") from None
    if hmac.compare_digest(shared, _ZERO_DH):
        raise InvalidDHError("X25519: the peer's public key is a low-order point (all-zero shared secret)")
    return shared


# ---------------------------------------------------------------------------------------------------- CipherState


class CipherState:
    """A ChaCha20-Poly1305 key plus a 64-bit nonce counter (Noise section 5.1).

    Without a key, encryption and decryption are the identity function (as during the first handshake message).
    """

    __slots__ = ("_k", "_n")

    def __init__(self, key: bytes | None = None) -> None:
        self._k: bytes | None = None
        self._n = 0
        self.initialize_key(key)

    def __repr__(self) -> str:
        return f"CipherState(has_key={self._k is not None}, n={self._n})"

    def initialize_key(self, key: bytes | None) -> None:
        """Set the key (or clear it with None) and reset the nonce to zero."""
        if key is not None and (not isinstance(key, bytes) or len(key) != KEY_LEN):
            raise NoiseLocalError(f"cipher key: must be {KEY_LEN} bytes")
        self._k = key
        self._n = 0

    def has_key(self) -> bool:
        """Whether a key is set."""
        return self._k is not None

    @property
    def nonce(self) -> int:
        """The nonce the next encryption or decryption will use."""
        return self._n

    def set_nonce(self, nonce: int) -> None:
        """Set the nonce counter (Noise ``SetNonce``; for out-of-order schemes and tests)."""
        if not 0 <= nonce <= MAX_NONCE:
            raise NoiseLocalError(f"nonce: must be in [0, 2**64 - 1], got {nonce}")
        self._n = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` with associated data ``ad`` and advance the nonce."""
        k = self._k
        if k is None:
            return plaintext
        n = self._n
        if n >= MAX_NONCE:
            raise NonceExhaustedError("encrypt: nonce 2**64 - 1 is reserved; this cipher state is used up")
        if len(plaintext) > MAX_PLAINTEXT_LEN:
            raise NoiseLocalError(f"encrypt: plaintext is {len(plaintext)} bytes, the limit is {MAX_PLAINTEXT_LEN}")
        ciphertext: bytes = crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _NONCE.pack(n), k)
        self._n = n + 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Authenticate and decrypt ``ciphertext``; advance the nonce only on success.

        Raises :class:`DecryptionError` on a bad tag and :class:`MalformedMessageError` on a bad length.
        """
        k = self._k
        if k is None:
            return ciphertext
        n = self._n
        if n >= MAX_NONCE:
            raise NonceExhaustedError("decrypt: nonce 2**64 - 1 is reserved; this cipher state is used up")
        length = len(ciphertext)
        if length < TAG_LEN:
            raise MalformedMessageError(f"ciphertext: {length} bytes is shorter than the {TAG_LEN}-byte tag")
        if length > MAX_MESSAGE_LEN:
            raise MalformedMessageError(f"ciphertext: {length} bytes exceeds the {MAX_MESSAGE_LEN}-byte limit")
        try:
            plaintext: bytes = crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _NONCE.pack(n), k)
        except CryptoError:
            raise DecryptionError(
                f"ciphertext: authentication failed at nonce {n} (corrupted, forged, replayed or reordered)"
            ) from None
        self._n = n + 1
        return plaintext

    def rekey(self) -> None:
        """Noise ``Rekey`` (section 11.3): ``k = ENCRYPT(k, 2**64 - 1, b"", zeros)[:32]``; the nonce is kept."""
        if self._k is None:
            raise NoiseStateError("rekey: the cipher state has no key")
        new = crypto_aead_chacha20poly1305_ietf_encrypt(_ZEROS_32, b"", _NONCE.pack(MAX_NONCE), self._k)
        self._k = new[:KEY_LEN]


# ------------------------------------------------------------------------------------------------- SymmetricState


class SymmetricState:
    """Chaining key ``ck``, transcript hash ``h`` and the handshake :class:`CipherState` (Noise section 5.2)."""

    __slots__ = ("_cipher", "_ck", "_h", "_hash")

    def __init__(self, protocol_name: str, noise_hash: NoiseHash) -> None:
        name = protocol_name.encode("ascii")
        self._hash = noise_hash
        self._h = (
            name + bytes(noise_hash.hashlen - len(name)) if len(name) <= noise_hash.hashlen else noise_hash.hash(name)
        )
        self._ck = self._h
        self._cipher = CipherState()

    @property
    def handshake_hash(self) -> bytes:
        """The current transcript hash ``h`` (the final value after the handshake is the channel binding)."""
        return self._h

    @property
    def cipher(self) -> CipherState:
        """The handshake cipher state."""
        return self._cipher

    def mix_key(self, input_key_material: bytes) -> None:
        """``ck, temp_k = HKDF(ck, ikm, 2)``; key the cipher with ``temp_k`` truncated to 32 bytes."""
        self._ck, temp_k = self._hash.hkdf(self._ck, input_key_material, 2)
        self._cipher.initialize_key(temp_k[:KEY_LEN])

    def mix_hash(self, data: bytes) -> None:
        """``h = HASH(h || data)``."""
        self._h = self._hash.hash(self._h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """Encrypt with ``h`` as associated data, then mix the ciphertext into ``h``."""
        ciphertext = self._cipher.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Decrypt with ``h`` as associated data, then mix the ciphertext into ``h``."""
        plaintext = self._cipher.decrypt_with_ad(self._h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """The transport cipher states ``(initiator -> responder, responder -> initiator)``."""
        temp_k1, temp_k2 = self._hash.hkdf(self._ck, b"", 2)
        return CipherState(temp_k1[:KEY_LEN]), CipherState(temp_k2[:KEY_LEN])


# ------------------------------------------------------------------------------------------------ HandshakeState


class HandshakeStatus(enum.Enum):
    """Where a :class:`HandshakeState` stands."""

    SEND = "send"
    """It is this side's turn to call :meth:`HandshakeState.write_message`."""
    RECEIVE = "receive"
    """It is this side's turn to call :meth:`HandshakeState.read_message`."""
    COMPLETE = "complete"
    """All three messages are done; :meth:`HandshakeState.transport` is available."""
    FAILED = "failed"
    """A message could not be processed; the handshake is dead."""


class _Op(enum.Enum):
    WRITE = "write"
    WRITE_LAST = "write the last message"
    READ = "read"
    READ_LAST = "read the last message"
    FAIL = "fail"


_TRANSITIONS: Final[dict[tuple[HandshakeStatus, _Op], HandshakeStatus]] = {
    (HandshakeStatus.SEND, _Op.WRITE): HandshakeStatus.RECEIVE,
    (HandshakeStatus.SEND, _Op.WRITE_LAST): HandshakeStatus.COMPLETE,
    (HandshakeStatus.RECEIVE, _Op.READ): HandshakeStatus.SEND,
    (HandshakeStatus.RECEIVE, _Op.READ_LAST): HandshakeStatus.COMPLETE,
    (HandshakeStatus.SEND, _Op.FAIL): HandshakeStatus.FAILED,
    (HandshakeStatus.RECEIVE, _Op.FAIL): HandshakeStatus.FAILED,
}

# The XX pattern: message i is sent by the initiator when i is even.
_XX_PATTERN: Final[tuple[tuple[str, ...], ...]] = (
    ("e",),
    ("e", "ee", "s", "es"),
    ("s", "se"),
)
_DH_TOKENS: Final = frozenset({"ee", "es", "se", "ss"})


class NoiseTransport:
    """The two transport :class:`CipherState` objects of one side after the handshake."""

    __slots__ = ("handshake_hash", "recv_cipher", "send_cipher")

    def __init__(self, *, send_cipher: CipherState, recv_cipher: CipherState, handshake_hash: bytes) -> None:
        self.send_cipher = send_cipher
        """Encrypts what this side sends."""
        self.recv_cipher = recv_cipher
        """Decrypts what the peer sends."""
        self.handshake_hash = handshake_hash
        """The final transcript hash, identical on both sides (usable as a channel binding)."""

    def encrypt(self, plaintext: bytes) -> bytes:
        """Encrypt one transport message (empty associated data)."""
        return self.send_cipher.encrypt_with_ad(b"", plaintext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Decrypt one transport message (empty associated data)."""
        return self.recv_cipher.decrypt_with_ad(b"", ciphertext)


class HandshakeState:
    """One side of a ``Noise_XX_25519_ChaChaPoly_<HASH>`` handshake (Noise section 5.3).

    ``static_private`` and ``ephemeral_private`` inject key material (test vectors); by default both are fresh
    random keys.  ``prologue`` must be identical on both sides or message 2 fails to decrypt.
    """

    __slots__ = ("_e", "_index", "_initiator", "_re", "_rs", "_s", "_status", "_symmetric", "_transport")

    def __init__(
        self,
        *,
        initiator: bool,
        protocol_name: str = "Noise_XX_25519_ChaChaPoly_SHA256",
        prologue: bytes = b"",
        static_private: bytes | None = None,
        ephemeral_private: bytes | None = None,
    ) -> None:
        noise_hash = hash_for_protocol(protocol_name)
        self._initiator = initiator
        self._symmetric = SymmetricState(protocol_name, noise_hash)
        self._symmetric.mix_hash(bytes(prologue))
        self._s = KeyPair.generate() if static_private is None else KeyPair.from_private(static_private)
        self._e = None if ephemeral_private is None else KeyPair.from_private(ephemeral_private)
        self._re: bytes | None = None
        self._rs: bytes | None = None
        self._index = 0
        self._status = HandshakeStatus.SEND if initiator else HandshakeStatus.RECEIVE
        self._transport: NoiseTransport | None = None

    def __repr__(self) -> str:
        role = "initiator" if self._initiator else "responder"
        return f"HandshakeState({role}, status={self._status.name}, message={self._index + 1}/{len(_XX_PATTERN)})"

    # -- introspection

    @property
    def initiator(self) -> bool:
        """True for the side that sends the first message."""
        return self._initiator

    @property
    def status(self) -> HandshakeStatus:
        """The current state of the handshake state machine."""
        return self._status

    @property
    def is_complete(self) -> bool:
        """True once all three messages are processed."""
        return self._status is HandshakeStatus.COMPLETE

    @property
    def message_index(self) -> int:
        """Zero-based index of the next handshake message."""
        return self._index

    @property
    def static_public(self) -> bytes:
        """This side's static X25519 public key."""
        return self._s.public

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static X25519 public key, once received (message 2 for the initiator, 3 for the responder)."""
        return self._rs

    @property
    def handshake_hash(self) -> bytes:
        """The transcript hash ``h`` so far (final after completion)."""
        return self._symmetric.handshake_hash

    # -- state machine

    def _next_op(self, writing: bool) -> _Op:
        last = self._index == len(_XX_PATTERN) - 1
        if writing:
            return _Op.WRITE_LAST if last else _Op.WRITE
        return _Op.READ_LAST if last else _Op.READ

    def _check(self, op: _Op, what: str) -> None:
        if (self._status, op) not in _TRANSITIONS:
            if self._status is HandshakeStatus.COMPLETE:
                reason = "the handshake is already complete"
            elif self._status is HandshakeStatus.FAILED:
                reason = "the handshake has failed"
            elif self._status is HandshakeStatus.SEND:
                reason = "it is this side's turn to write"
            else:
                reason = "it is the peer's turn to write"
            raise NoiseStateError(f"{what}: not allowed now ({reason}; message {self._index + 1})")

    def _advance(self, op: _Op) -> None:
        self._status = _TRANSITIONS[(self._status, op)]
        self._index += 1
        if self._status is HandshakeStatus.COMPLETE:
            c1, c2 = self._symmetric.split()
            send, recv = (c1, c2) if self._initiator else (c2, c1)
            self._transport = NoiseTransport(
                send_cipher=send, recv_cipher=recv, handshake_hash=self._symmetric.handshake_hash
            )

    def _fail(self) -> None:
        self._status = _TRANSITIONS[(self._status, _Op.FAIL)]

    def _dh_for(self, token: str) -> bytes:
        e, s, re, rs = self._e, self._s, self._re, self._rs
        if token == "ee":
            pair, remote = e, re
        elif token == "ss":
            pair, remote = s, rs
        elif (token == "es") == self._initiator:  # initiator "es" and responder "se": our e, their s
            pair, remote = e, rs
        else:  # initiator "se" and responder "es": our s, their e
            pair, remote = s, re
        if pair is None or remote is None:  # pragma: no cover - impossible for the XX pattern
            raise NoiseStateError(f"token {token}: a key is missing")
        return _dh(pair.private, remote)

    # -- messages

    def write_message(self, payload: bytes = b"") -> bytes:
        """Produce the next handshake message carrying ``payload`` (encrypted once a key is established)."""
        op = self._next_op(writing=True)
        self._check(op, "write_message")
        tokens = _XX_PATTERN[self._index]
        # Compute the size first so an oversized payload changes nothing.
        keyed = self._symmetric.cipher.has_key()
        size = 0
        for token in tokens:
            if token in _DH_TOKENS:
                keyed = True
            elif token == "e":
                size += DH_LEN
            else:
                size += DH_LEN + (TAG_LEN if keyed else 0)
        size += len(payload) + (TAG_LEN if keyed else 0)
        if size > MAX_MESSAGE_LEN:
            raise NoiseLocalError(
                f"write_message: message {self._index + 1} would be {size} bytes, the limit is {MAX_MESSAGE_LEN}"
            )
        sym = self._symmetric
        parts: list[bytes] = []
        try:
            for token in tokens:
                if token == "e":
                    if self._e is None:
                        self._e = KeyPair.generate()
                    parts.append(self._e.public)
                    sym.mix_hash(self._e.public)
                elif token == "s":
                    parts.append(sym.encrypt_and_hash(self._s.public))
                else:
                    sym.mix_key(self._dh_for(token))
            parts.append(sym.encrypt_and_hash(bytes(payload)))
        except BaseException:
            self._fail()
            raise
        self._advance(op)
        return b"".join(parts)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message and return its decrypted payload.

        Raises :class:`MalformedMessageError`, :class:`DecryptionError` or :class:`InvalidDHError` on bad input, after
        which the handshake is FAILED.
        """
        op = self._next_op(writing=False)
        self._check(op, "read_message")
        number = self._index + 1
        data = bytes(message)
        sym = self._symmetric
        try:
            if len(data) > MAX_MESSAGE_LEN:
                raise MalformedMessageError(
                    f"handshake message {number}: {len(data)} bytes exceeds the {MAX_MESSAGE_LEN}-byte limit"
                )
            offset = 0
            for token in _XX_PATTERN[self._index]:
                if token == "e":
                    if len(data) - offset < DH_LEN:
                        raise MalformedMessageError(
                            f"handshake message {number}: too short for the ephemeral key ({len(data)} bytes)"
                        )
                    self._re = data[offset : offset + DH_LEN]
                    offset += DH_LEN
                    sym.mix_hash(self._re)
                elif token == "s":
                    need = DH_LEN + (TAG_LEN if sym.cipher.has_key() else 0)
                    if len(data) - offset < need:
                        raise MalformedMessageError(
                            f"handshake message {number}: too short for the static key ({len(data)} bytes)"
                        )
                    try:
                        self._rs = sym.decrypt_and_hash(data[offset : offset + need])
                    except DecryptionError:
                        raise DecryptionError(
                            f"handshake message {number}: the static key failed authentication"
                        ) from None
                    offset += need
                else:
                    sym.mix_key(self._dh_for(token))
            rest = data[offset:]
            if sym.cipher.has_key() and len(rest) < TAG_LEN:
                raise MalformedMessageError(
                    f"handshake message {number}: too short for the payload tag ({len(data)} bytes)"
                )
            try:
                payload = sym.decrypt_and_hash(rest)
            except DecryptionError:
                raise DecryptionError(f"handshake message {number}: the payload failed authentication") from None
        except BaseException:
            self._fail()
            raise
        self._advance(op)
        return payload

    def transport(self) -> NoiseTransport:
        """The transport cipher states (``Split``); only once the handshake is COMPLETE.

        Every call returns the same object, so nonces can never be reused by splitting twice.
        """
        if self._transport is None:
            raise NoiseStateError(
                f"transport: not available before the handshake is complete (status {self._status.name})"
            )
        return self._transport

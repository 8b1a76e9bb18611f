"""The secure channel: a trio Stream that runs the libp2p-noise handshake, then encrypts every byte.

Theory of operation
-------------------
:func:`secure_outbound` (the dialer, who knows the peer ID it wants) and :func:`secure_inbound` (the listener) drive
the sans-IO :class:`~p2pmsg.crypto.libp2p_noise.NoiseHandshake` over any ``trio.abc.Stream``: each handshake message
goes out in one frame (``u16be length || Noise message``), and frames coming in are reassembled by a
:class:`~p2pmsg.crypto.libp2p_noise.FrameDecoder`.  The whole handshake runs under one deadline; on *any* failure
(timeout, bad message, wrong peer, cancellation) the underlying stream is closed before the error propagates, and
remote or timeout failures surface as :class:`HandshakeError`.

Afterwards :class:`SecureChannel` is an ordinary ``trio.abc.Stream``:

* ``send_all`` cuts the data into plaintext pieces of at most 65519 bytes, encrypts each into one frame and writes a
  batch of frames with one underlying ``send_all`` (a batch holds up to :data:`SEND_BATCH_BYTES` of plaintext, so a
  64 KiB write is one underlying write).  If the underlying ``send_all`` fails or is cancelled part-way, the
  encrypted byte stream may now have a gap, so the channel refuses further sends (``BrokenResourceError``).
* ``receive_some`` decrypts one frame at a time and hands its plaintext out in pieces of at most ``max_bytes``; a
  clean end of stream between frames is ``b""``.
* A frame that fails to authenticate (corrupted, forged, replayed, reordered, truncated) or a stream that ends inside
  a frame closes the channel and raises :class:`ChannelError` (:class:`ChannelCutError` for the end inside a frame: a
  cut write or a broken connection, not bad input); later calls raise ``trio.ClosedResourceError``.
  Errors of the underlying stream (``BrokenResourceError``, ``ClosedResourceError``) pass through unchanged.
* Two tasks sending at once (or receiving at once) raise ``trio.BusyResourceError``.
* There is no ``send_eof`` (closing is the only end) and no rekeying on the wire (libp2p has none); if a 64-bit
  nonce counter is ever exhausted the channel closes with :class:`ChannelError`.
"""

from __future__ import annotations

import math
import struct
from typing import Final

import trio

from p2pmsg.crypto.libp2p_noise import (
    FrameDecoder,
    FrameError,
    HandshakeError,
    HandshakeResult,
    NoiseHandshake,
    PeerIdMismatchError,
    encode_frame,
)
from p2pmsg.crypto.noise import MAX_PLAINTEXT_LEN, NoiseRemoteError, NonceExhaustedError
from p2pmsg.errors import P2PMsgError, RemoteProtocolError
from p2pmsg.identity import Identity, PeerId
from p2pmsg.net.conflict import ConflictGuard

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "MAX_EMPTY_FRAMES",
    "RECEIVE_CHUNK",
    "SEND_BATCH_BYTES",
    "ChannelCutError",
    "ChannelError",
    "HandshakeError",
    "PeerIdMismatchError",
    "SecureChannel",
    "close_gracefully",
    "secure_inbound",
    "secure_outbound",
]

DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds allowed for the whole handshake."""
SEND_BATCH_BYTES: Final = 16 * MAX_PLAINTEXT_LEN
"""Plaintext encrypted per underlying ``send_all`` (16 full frames, about 1 MiB)."""
MAX_EMPTY_FRAMES: Final = 8
"""Empty frames in a row a receiver takes (valid, but each costs a decryption and delivers nothing; ours sends none)."""
RECEIVE_CHUNK: Final = 64 * 1024
"""``max_bytes`` asked of the underlying stream per read (larger reads measured slower: big allocations)."""

_HEADER: Final = struct.Struct(">H")


class ChannelError(RemoteProtocolError):
    """The secure channel received something it cannot accept and has been closed."""


class ChannelCutError(ChannelError):
    """The underlying stream ended inside a frame: the peer's write was cut short (it was killed, or gave up on a
    slow link) or the connection broke, rather than bad input.  The channel has been closed."""


class SecureChannel(trio.abc.Stream):
    """An authenticated, encrypted ``trio.abc.Stream`` to :attr:`remote_peer` (build it with secure_*bound)."""

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        result: HandshakeResult,
        *,
        local_peer: PeerId,
        decoder: FrameDecoder | None = None,
    ) -> None:
        self.transport_stream: trio.abc.Stream = transport_stream
        """The underlying (plaintext) stream."""
        self.remote_peer: PeerId = result.remote_peer
        """The authenticated peer at the other end."""
        self.local_peer: PeerId = local_peer
        """Our own peer ID."""
        self.handshake_hash: bytes = result.handshake_hash
        """The Noise handshake hash, identical on both ends (a channel binding)."""
        self._encrypt = result.transport.send_cipher.encrypt_with_ad
        self._decrypt = result.transport.recv_cipher.decrypt_with_ad
        self._decoder = decoder if decoder is not None else FrameDecoder()
        self._pending: bytes = b""
        self._pending_pos = 0
        self.work_done = 0
        """Reads from the transport plus frames decrypted so far: what receiving cost us, for callers that pace a
        peer by the work it causes (a frame trickled byte by byte, or empty frames, cost work and deliver little)."""
        self._closed = False
        self._close_reason = "the channel was closed"
        self._send_broken: str | None = None
        self._send_guard = ConflictGuard("another task is already sending on this secure channel")
        self._receive_guard = ConflictGuard("another task is already receiving on this secure channel")

    def __repr__(self) -> str:
        return f"SecureChannel(remote_peer={self.remote_peer}, closed={self._closed})"

    # ---------------------------------------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError(self._close_reason)

    async def _fail(self, reason: str, error: type[ChannelError] = ChannelError) -> ChannelError:
        """Close everything and return the ``error`` to raise."""
        self._closed = True
        self._close_reason = f"the channel was closed after an error: {reason}"
        self._pending = b""
        await trio.aclose_forcefully(self.transport_stream)
        return error(f"secure channel with {self.remote_peer}: {reason}")

    # ---------------------------------------------------------------------------------------------- sending

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` into frames and write them (batched) to the underlying stream."""
        with self._send_guard:
            self._check_open()
            if self._send_broken is not None:
                raise trio.BrokenResourceError(self._send_broken)
            with memoryview(data) as raw:
                view = raw if raw.format == "B" and raw.ndim == 1 else raw.cast("B")
                total = len(view)
                if total == 0:
                    await trio.lowlevel.checkpoint()
                    return
                # Be cancellable before touching the nonce, so a pre-cancelled send changes nothing.
                await trio.lowlevel.checkpoint_if_cancelled()
                encrypt = self._encrypt
                pack = _HEADER.pack
                for batch_start in range(0, total, SEND_BATCH_BYTES):
                    batch_end = min(total, batch_start + SEND_BATCH_BYTES)
                    parts: list[bytes] = []
                    try:
                        for start in range(batch_start, batch_end, MAX_PLAINTEXT_LEN):
                            ciphertext = encrypt(b"", bytes(view[start : min(batch_end, start + MAX_PLAINTEXT_LEN)]))
                            parts.append(pack(len(ciphertext)))
                            parts.append(ciphertext)
                    except NonceExhaustedError as exc:
                        raise await self._fail(f"send nonce exhausted ({exc})") from None
                    try:
                        await self.transport_stream.send_all(b"".join(parts))
                    except BaseException as exc:
                        self._send_broken = (
                            f"an earlier send_all on this secure channel did not complete ({type(exc).__name__}); "
                            "the encrypted stream may have a gap, so nothing more can be sent"
                        )
                        raise

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the underlying stream might accept data without blocking."""
        with self._send_guard:
            self._check_open()
            await self.transport_stream.wait_send_all_might_not_block()

    # -------------------------------------------------------------------------------------------- receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return decrypted bytes (at most ``max_bytes``), or ``b""`` once the peer closed cleanly."""
        if max_bytes is not None:
            if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
                raise TypeError(f"max_bytes must be an int or None, got {type(max_bytes).__name__}")
            if max_bytes < 1:
                raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        with self._receive_guard:
            self._check_open()
            pending = self._pending
            if pending:
                await trio.lowlevel.checkpoint()
                return self._take(max_bytes)
            decoder = self._decoder
            checkpointed = False
            empty = 0
            while True:
                frame = decoder.next_frame()
                if frame is None:
                    data = await self.transport_stream.receive_some(RECEIVE_CHUNK)
                    self.work_done += 1
                    checkpointed = True
                    if self._closed:  # closed by another task while we waited
                        raise trio.ClosedResourceError(self._close_reason)
                    if not data:
                        try:
                            decoder.check_eof()
                        except FrameError as exc:
                            raise await self._fail(f"connection ended inside a frame: {exc}", ChannelCutError) from None
                        return b""
                    decoder.feed(data)
                    continue
                self.work_done += 1
                try:
                    plaintext = self._decrypt(b"", frame)
                except NoiseRemoteError as exc:
                    raise await self._fail(f"bad frame ({len(frame)} bytes): {exc}") from None
                except NonceExhaustedError as exc:
                    raise await self._fail(f"receive nonce exhausted ({exc})") from None
                if not plaintext:  # an empty frame carries nothing; b"" would mean end of stream
                    empty += 1
                    if empty > MAX_EMPTY_FRAMES:  # each costs a decryption and delivers nothing
                        raise await self._fail(f"more than {MAX_EMPTY_FRAMES} empty frames in a row")
                    continue
                self._pending = plaintext
                self._pending_pos = 0
                if not checkpointed:  # every receive_some must be a checkpoint, even from the buffer
                    await trio.lowlevel.checkpoint()
                return self._take(max_bytes)

    def _take(self, max_bytes: int | None) -> bytes:
        pending, pos = self._pending, self._pending_pos
        if max_bytes is None or len(pending) - pos <= max_bytes:
            self._pending = b""
            self._pending_pos = 0
            return pending[pos:] if pos else pending
        self._pending_pos = pos + max_bytes
        return pending[pos : pos + max_bytes]

    # ---------------------------------------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Close the channel and the underlying stream (idempotent; closes even when cancelled)."""
        self._closed = True
        self._pending = b""
        await self.transport_stream.aclose()


# ------------------------------------------------------------------------------------------------ handshakes


async def _read_frame(stream: trio.abc.Stream, decoder: FrameDecoder, number: int, limit: int) -> bytes:
    while True:
        announced = decoder.announced_length()
        if announced is not None and announced > limit:  # refuse at once rather than wait for the body
            raise HandshakeError(
                f"handshake message {number}: the frame announces {announced} bytes, at most {limit} are possible"
            )
        frame = decoder.next_frame()
        if frame is not None:
            return frame
        data = await stream.receive_some(RECEIVE_CHUNK)
        if not data:
            raise HandshakeError(f"the peer closed the connection before handshake message {number} arrived")
        decoder.feed(data)


async def _handshake(
    stream: trio.abc.Stream, identity: Identity, handshake: NoiseHandshake, timeout: float
) -> SecureChannel:
    if not (timeout > 0 and math.isfinite(timeout)):
        await trio.aclose_forcefully(stream)
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    decoder = FrameDecoder()
    number = 0
    try:
        with trio.fail_after(timeout):
            while not handshake.is_complete:
                number += 1
                if handshake.wants_write:
                    await stream.send_all(encode_frame(handshake.write_message()))
                else:
                    frame = await _read_frame(stream, decoder, number, handshake.max_incoming_len)
                    handshake.read_message(frame)
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise HandshakeError(f"handshake timed out after {timeout:g} s (at message {number})") from None
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        raise HandshakeError(f"the connection broke during handshake message {number}: {exc}") from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return SecureChannel(stream, handshake.result(), local_peer=identity.peer_id, decoder=decoder)


async def secure_outbound(
    stream: trio.abc.Stream,
    identity: Identity,
    expected_peer: PeerId,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> SecureChannel:
    """Run the handshake as initiator and return the channel to ``expected_peer``.

    Raises :class:`PeerIdMismatchError` if someone else answers (before our identity is revealed to it) and
    :class:`HandshakeError` on any other remote failure or on timeout; ``stream`` is closed on every failure.
    """
    handshake = NoiseHandshake(identity, initiator=True, expected_peer=expected_peer)
    return await _handshake(stream, identity, handshake, timeout)


async def secure_inbound(
    stream: trio.abc.Stream,
    identity: Identity,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> SecureChannel:
    """Run the handshake as responder; the channel's :attr:`~SecureChannel.remote_peer` is whoever authenticated.

    Raises :class:`HandshakeError` on a remote failure or on timeout; ``stream`` is closed on every failure.
    """
    handshake = NoiseHandshake(identity, initiator=False)
    return await _handshake(stream, identity, handshake, timeout)


async def close_gracefully(stream: trio.abc.Stream) -> None:
    """Close ``stream`` gracefully (over WebSocket a Close frame, waited for at most the WebSocket's close timeout,
    so the peer sees the end of the stream rather than an abnormal 1006); forcefully if that fails or we are
    cancelled.  Never raises a stream error."""
    try:
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, P2PMsgError):
        await trio.aclose_forcefully(stream)

"""Invite links: how one person hands their peer id (and where to reach them) to another.

Theory of operation
-------------------
An invite is a single line of text, short enough for a QR code or a chat message::

    p2pmsg://invite/<peer id, base58btc>?addr=<percent-encoded multiaddr>&addr=...

The peer id is the only part that matters for security: the Noise handshake proves who answers, so a wrong or
stale address can at worst fail to connect, never connect to somebody else.  The ``addr`` parameters are *hints*
tried before (or while) the DHT is asked for the peer's signed record.  Hints that carry their own ``/p2p/<id>``
must name the same peer as the invite.

Invites come from other people, so parsing is strict and bounded: at most :data:`MAX_INVITE_LENGTH` characters and
:data:`MAX_INVITE_ADDRS` addresses; anything else raises :class:`InviteError` naming the field and the reason.
Unknown query parameters are ignored so later versions can add some without breaking older readers; their names
are kept in :attr:`Invite.ignored`, so a user interface can say so (``adr=`` is more often a typo than a newer version).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote, urlsplit

from p2pmsg.errors import LocalProtocolError, RemoteProtocolError
from p2pmsg.identity import InvalidPeerIdError, PeerId
from p2pmsg.wire.multiaddr import Multiaddr, MultiaddrError

__all__ = [
    "INVITE_PREFIX",
    "MAX_INVITE_ADDRS",
    "MAX_INVITE_LENGTH",
    "Invite",
    "InviteError",
    "format_invite",
    "parse_invite",
    "parse_target",
]

INVITE_SCHEME = "p2pmsg"
INVITE_HOST = "invite"
INVITE_PREFIX = f"{INVITE_SCHEME}://{INVITE_HOST}/"
MAX_INVITE_LENGTH = 4096
MAX_INVITE_ADDRS = 16


class InviteError(RemoteProtocolError):
    """An invite link (or peer id given in its place) is malformed.

    ``field`` names the part that is wrong (``"scheme"``, ``"peer_id"``, ``"addr"``, ...), ``reason`` says why.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid invite: {field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class Invite:
    """A parsed invite: the peer to talk to and the address hints to try first."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...] = ()
    ignored: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    """Names of the query parameters this version does not know and left out, each once, in link order."""

    def __str__(self) -> str:
        return format_invite(self.peer_id, self.addrs)


def format_invite(peer_id: PeerId, addrs: tuple[Multiaddr, ...] | list[Multiaddr] = ()) -> str:
    """Return the invite link for ``peer_id`` with ``addrs`` as hints (``/p2p/`` suffixes are stripped).

    At most :data:`MAX_INVITE_ADDRS` addresses are included (the first ones); duplicates are dropped.
    """
    seen: list[str] = []
    for addr in addrs:
        own = addr.peer_id
        if own is not None and own != peer_id:
            raise LocalProtocolError(f"invite addr: {addr} belongs to {own}, not to {peer_id}")
        text = str(addr.without_peer_id())
        if text not in seen:
            seen.append(text)
        if len(seen) == MAX_INVITE_ADDRS:
            break
    query = "&".join("addr=" + quote(text, safe="") for text in seen)
    return INVITE_PREFIX + peer_id.to_base58() + ("?" + query if query else "")


def parse_invite(text: str) -> Invite:
    """Parse an invite link; raise :class:`InviteError` with the offending field on any problem."""
    if not isinstance(text, str):
        raise InviteError("invite", f"expected text, got {type(text).__name__}")
    text = text.strip()
    if len(text) > MAX_INVITE_LENGTH:
        raise InviteError("invite", f"longer than {MAX_INVITE_LENGTH} characters")
    if not text.isprintable() or any(ch.isspace() for ch in text):
        raise InviteError("invite", "contains whitespace or control characters")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise InviteError("invite", f"not a URL ({exc})") from None
    if parts.scheme.lower() != INVITE_SCHEME:
        if text[:1] in ("'", '"', "<"):
            raise InviteError("invite", f"starts with {text[0]!r}: give the link without the quotes around it")
        raise InviteError("scheme", f"expected {INVITE_SCHEME!r}, got {parts.scheme!r}")
    if parts.netloc.lower() != INVITE_HOST:
        raise InviteError("kind", f"expected {INVITE_HOST!r}, got {parts.netloc!r}")
    if parts.fragment:
        raise InviteError("invite", "unexpected '#' fragment")
    path = parts.path
    if not path.startswith("/") or "/" in path[1:] or len(path) < 2:
        raise InviteError("peer_id", "missing: expected p2pmsg://invite/<peer id>")
    try:
        peer_id = PeerId.from_string(path[1:])
    except RemoteProtocolError as exc:
        # What a person did (a link cut short or mistyped when copied), then the decoder's exact reason.
        raise InviteError("peer_id", f"not a valid peer id: cut short or mistyped? ({exc})") from None
    pairs = _query_pairs(parts.query)
    addrs: list[Multiaddr] = []
    ignored: list[str] = []
    for key, value in pairs:
        if key != "addr":
            if key not in ignored:  # unknown parameters are reserved for later versions
                ignored.append(key)
            continue
        if len(addrs) == MAX_INVITE_ADDRS:
            raise InviteError("addr", f"more than {MAX_INVITE_ADDRS} addresses")
        try:
            addr = Multiaddr.parse(value)
        except MultiaddrError as exc:
            raise InviteError("addr", f"{value!r}: {exc}") from None
        own = addr.peer_id
        if own is not None and own != peer_id:
            raise InviteError("addr", f"{value!r} names peer {own}, not the invite's peer {peer_id}")
        addr = addr.without_peer_id()
        if addr not in addrs:
            addrs.append(addr)
    return Invite(peer_id=peer_id, addrs=tuple(addrs), ignored=tuple(ignored))


_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
"""A ``%`` not followed by two hex digits (``unquote`` would keep it as it is)."""


def _query_pairs(query: str) -> list[tuple[str, str]]:
    """The ``name=value`` pairs of a link's query, percent-decoded as UTF-8 (RFC 3986: ``+`` is a plus sign, not the
    space of HTML form encoding); :class:`InviteError` for a pair without ``=`` or a name, or a bad escape."""
    pairs: list[tuple[str, str]] = []
    if not query:
        return pairs
    for part in query.split("&"):
        name, equals, value = part.partition("=")
        if not equals or not name:
            raise InviteError("query", f"malformed parameter {part[:64]!r} (expected name=value)")
        if _BAD_ESCAPE.search(part):
            raise InviteError("query", f"malformed percent-encoding in {part[:64]!r} (% must start %XX)")
        try:
            pairs.append((unquote(name, errors="strict"), unquote(value, errors="strict")))
        except UnicodeDecodeError as exc:
            raise InviteError("query", f"malformed percent-encoding ({exc})") from None
    return pairs


def parse_target(text: str) -> Invite:
    """Parse what a user typed to name a peer: an invite link, or a bare peer id (base58 or CIDv1) without hints."""
    if not isinstance(text, str):
        raise InviteError("invite", f"expected text, got {type(text).__name__}")
    stripped = text.strip()
    if "://" in stripped:
        invite = parse_invite(stripped)
    else:
        if not stripped:
            raise InviteError("peer_id", "empty")
        if len(stripped) > MAX_INVITE_LENGTH:
            raise InviteError("peer_id", f"longer than {MAX_INVITE_LENGTH} characters")
        try:
            invite = Invite(peer_id=PeerId.from_string(stripped))
        except RemoteProtocolError as exc:
            raise InviteError("peer_id", str(exc)) from None
    # A peer id has no checksum: a mistyped one usually still parses, but its key is then (19 times in 20) no point
    # of the curve, so nobody can ever hold it and messages to it could never be encrypted.
    try:
        invite.peer_id.x25519_public_key  # noqa: B018 (the conversion is the check)
    except InvalidPeerIdError:
        raise InviteError(
            "peer_id", "its key is not a valid Ed25519 public key, so no node can have it (mistyped?)"
        ) from None
    return invite

"""Invite links (docs/protocol.md section 6.6).

Written from docs/protocol.md alone; imports nothing from p2pmsg or the other test folders.
"""

from __future__ import annotations

from .encoding import CleanroomError
from .identity import parse_peer_id
from .multiaddr import parse_multiaddr

_UNRESERVED = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = "0123456789abcdefABCDEF"


def pct_decode(s: str) -> str:
    out, i = bytearray(), 0
    while i < len(s):
        if s[i] == "%":
            h = s[i + 1 : i + 3]
            if len(h) != 2 or any(x not in _HEX for x in h):
                raise CleanroomError("query: bad escape")
            out.append(int(h, 16))
            i += 3
        else:
            out += s[i].encode("utf-8")
            i += 1
    return out.decode("utf-8")


def pct_encode(s: str) -> str:
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in s.encode("utf-8"))


def parse_invite(link: str) -> tuple[bytes, list[str]]:
    """Return (binary peer id, canonical addresses without /p2p)."""
    link = link.strip()
    if len(link) > 4096:
        raise CleanroomError("invite: too long")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F or c == "#" for c in link):
        raise CleanroomError("invite: white space, control character or fragment")
    scheme, sep, rest = link.partition("://")
    if not sep or scheme.lower() != "p2pmsg":
        raise CleanroomError("scheme")
    kind, sep, rest = rest.partition("/")
    if not sep or kind.lower() != "invite":
        raise CleanroomError("kind")
    pid_text, has_query, query = rest.partition("?")
    peer = parse_peer_id(pid_text)
    addrs: list[str] = []
    if has_query:
        for pair in query.split("&"):
            if "=" not in pair:
                raise CleanroomError("query: pair without =")
            raw_name, raw_value = pair.split("=", 1)
            name, value = pct_decode(raw_name), pct_decode(raw_value)
            if not name:
                raise CleanroomError("query: empty name")
            if name != "addr":
                continue
            ma = parse_multiaddr(value)
            canonical = ma.canonical
            if ma.peer is not None:
                if ma.peer != peer:
                    raise CleanroomError("addr: names another peer")
                canonical = canonical[: canonical.index("/p2p/")]
            addrs.append(canonical)
    if len(addrs) > 16:
        raise CleanroomError("invite: more than 16 addresses")
    return peer, addrs


def make_invite(peer_text: str, addrs: list[str]) -> str:
    query = "&".join("addr=" + pct_encode(a) for a in addrs)
    return f"p2pmsg://invite/{peer_text}" + (f"?{query}" if query else "")

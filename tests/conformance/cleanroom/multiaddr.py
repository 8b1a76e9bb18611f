"""Multiaddr text: parsing, canonical form and transport (docs/protocol.md section 2.4).

Written from docs/protocol.md alone; imports nothing from p2pmsg or the other test folders.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .encoding import CleanroomError, b58encode
from .identity import parse_peer_id

_PORT = re.compile(r"^(0|[1-9][0-9]{0,4})$")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_IPV4 = re.compile(r"^(0|[1-9][0-9]{0,2})(\.(0|[1-9][0-9]{0,2})){3}$")


@dataclass
class Multiaddr:
    canonical: str
    host_proto: str | None = None
    host: str | None = None
    transport: str | None = None  # "tcp" | "udp"
    port: int | None = None
    ws: bool = False
    peer: bytes | None = None

    def transport_tuple(self) -> tuple[str, str, int] | None:
        if self.transport is None or self.host is None or self.port is None:
            return None
        return ("ws" if self.ws else self.transport, self.host, self.port)


def parse_multiaddr(text: str) -> Multiaddr:
    if len(text) > 512 or not text.startswith("/"):
        raise CleanroomError("not a multiaddr")
    if any(not 0x21 <= ord(c) <= 0x7E for c in text):
        raise CleanroomError("non-printable character")
    comps = text[1:].split("/")
    if "" in comps:
        raise CleanroomError("empty component")
    pos = 0

    def take() -> str:
        nonlocal pos
        if pos >= len(comps):
            raise CleanroomError("truncated")
        pos += 1
        return comps[pos - 1]

    out: list[str] = []
    ma = Multiaddr("")
    proto: str | None = take()
    if proto != "p2p":
        value = take()
        if proto == "ip4":
            if not _IPV4.match(value) or any(int(x) > 255 for x in value.split(".")):
                raise CleanroomError("bad ip4")
            host = value
        elif proto == "ip6":
            if "%" in value:
                raise CleanroomError("IPv6 zone")
            a = ipaddress.IPv6Address(value)
            host = f"::ffff:{a.ipv4_mapped}" if a.ipv4_mapped else a.compressed
        elif proto in ("dns4", "dns6"):
            if len(value) > 253 or value.endswith(".") or not all(_LABEL.match(lb) for lb in value.split(".")):
                raise CleanroomError("bad DNS name")
            if value.split(".")[-1].isdigit():
                raise CleanroomError("last DNS label all digits")
            host = value.lower()
        else:
            raise CleanroomError(f"{proto}: unknown protocol")
        ma.host_proto, ma.host = proto, host
        out.append(f"/{proto}/{host}")
        transport = take()
        if transport not in ("tcp", "udp"):
            raise CleanroomError("expected tcp or udp")
        port = take()
        if not _PORT.match(port) or int(port) > 65535:
            raise CleanroomError("bad port")
        ma.transport, ma.port = transport, int(port)
        out.append(f"/{transport}/{int(port)}")
        if pos < len(comps) and comps[pos] == "ws":
            if transport != "tcp":
                raise CleanroomError("/ws after /udp")
            pos += 1
            ma.ws = True
            out.append("/ws")
        proto = take() if pos < len(comps) else None
        if proto not in (None, "p2p"):
            raise CleanroomError(f"unexpected {proto}")
    if proto == "p2p":
        ma.peer = parse_peer_id(take())
        out.append("/p2p/" + b58encode(ma.peer))
    if pos != len(comps):
        raise CleanroomError("trailing components")
    ma.canonical = "".join(out)
    return ma

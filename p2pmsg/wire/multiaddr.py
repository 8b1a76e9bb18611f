"""Multiaddrs: self-describing network addresses in their text form (``/ip4/1.2.3.4/tcp/4001/p2p/12D3KooW...``).

Theory of operation
-------------------
A multiaddr is a path of *components*, each a protocol name optionally followed by one value:
``/ip4/198.51.100.7/tcp/4001/ws/p2p/12D3KooW...``.  p2pmsg supports eight protocols -- ``ip4``, ``ip6``, ``dns4``,
``dns6``, ``tcp``, ``udp``, ``ws`` (no value) and ``p2p`` -- and one stack grammar, checked by a small explicit state
machine (:class:`_State` and the single transition table :data:`_TRANSITIONS`)::

    multiaddr = host transport [ "/p2p/" peer-id ]  |  "/p2p/" peer-id
    host      = "/ip4/" ipv4 | "/ip6/" ipv6 | "/dns4/" name | "/dns6/" name
    transport = "/tcp/" port [ "/ws" ] | "/udp/" port

Every value is validated (``ipaddress`` for IPs, a decimal 0..65535 with no sign or leading zero for ports, LDH
hostname syntax for DNS names, :meth:`PeerId.from_string` for peer IDs) and stored in canonical form: RFC 5952 IPv6
text, lowercase DNS names, base58btc peer IDs.  So one address has one text form, and two :class:`Multiaddr` objects
are equal exactly when they denote the same address.  Anything else raises :class:`MultiaddrError` naming the
component and the reason.  Multiaddrs travel on the wire as this canonical text (a msgpack str of at most
:data:`MAX_MULTIADDR_LENGTH` bytes); the binary multiaddr encoding is not used.  Sans-IO: nothing here resolves
names or opens sockets.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Callable
from typing import Final

from p2pmsg.errors import P2PMsgError
from p2pmsg.identity import PeerId

__all__ = ["MAX_MULTIADDR_LENGTH", "PROTOCOLS", "Multiaddr", "MultiaddrError"]

#: Longest multiaddr text accepted, in characters (the longest valid one is about 340).
MAX_MULTIADDR_LENGTH: Final = 512

#: Longest DNS name (RFC 1035, without the trailing dot) and label.
MAX_DNS_NAME_LENGTH: Final = 253
MAX_DNS_LABEL_LENGTH: Final = 63


class MultiaddrError(P2PMsgError):
    """A multiaddr is malformed or unsupported.  ``component`` names the part at fault, ``reason`` says why."""

    def __init__(self, component: str, reason: str) -> None:
        super().__init__(f"{component}: {reason}" if component else reason)
        self.component = component
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------------
# Value validators: text in, canonical text out, ValueError with a reason otherwise
# ---------------------------------------------------------------------------------------------------------------------

_PORT_RE: Final = re.compile(r"0|[1-9][0-9]{0,4}")
_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _canonical_ip4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError as exc:
        raise ValueError(f"not an IPv4 address ({exc})") from None


def _canonical_ip6(text: str) -> str:
    if "%" in text:
        raise ValueError("IPv6 zone identifiers (%...) are not supported")
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError as exc:
        raise ValueError(f"not an IPv6 address ({exc})") from None
    if addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"  # RFC 5952 section 5: the mixed notation for IPv4-mapped addresses
    return str(addr)  # RFC 5952: lowercase, no leading zeros, longest run of two or more zero groups as "::"


def _canonical_dns(text: str) -> str:
    name = text.lower()
    if not name:
        raise ValueError("empty DNS name")
    if len(name) > MAX_DNS_NAME_LENGTH:
        raise ValueError(f"DNS name is {len(name)} characters, more than {MAX_DNS_NAME_LENGTH}")
    if name.endswith("."):
        raise ValueError("DNS name must not end with a dot")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise ValueError("DNS name has an empty label")
        if len(label) > MAX_DNS_LABEL_LENGTH:
            raise ValueError(f"DNS label is {len(label)} characters, more than {MAX_DNS_LABEL_LENGTH}")
        if not _LABEL_RE.fullmatch(label):
            raise ValueError(
                f"DNS label {label!r} is not letters, digits and inner hyphens (IDNs must be given as xn-- A-labels)"
            )
    if labels[-1].isdigit():
        raise ValueError("the last DNS label is all digits (an IP address belongs in /ip4 or /ip6)")
    return name


def _canonical_port(text: str) -> str:
    if not _PORT_RE.fullmatch(text):
        raise ValueError(f"port {text!r} is not a decimal number without sign or leading zeros")
    if int(text) > 65535:
        raise ValueError(f"port {text} is out of range 0..65535")
    return text


def _canonical_peer_id(text: str) -> str:
    try:
        return str(PeerId.from_string(text))
    except (P2PMsgError, ValueError) as exc:
        raise ValueError(f"not a valid peer ID ({exc})") from None


def _no_value(text: str) -> str:
    return text


@dataclasses.dataclass(frozen=True, slots=True)
class _Protocol:
    name: str
    has_value: bool
    canonical: Callable[[str], str]


#: The supported protocols, by name.
PROTOCOLS: Final[dict[str, _Protocol]] = {
    p.name: p
    for p in (
        _Protocol("ip4", True, _canonical_ip4),
        _Protocol("ip6", True, _canonical_ip6),
        _Protocol("dns4", True, _canonical_dns),
        _Protocol("dns6", True, _canonical_dns),
        _Protocol("tcp", True, _canonical_port),
        _Protocol("udp", True, _canonical_port),
        _Protocol("ws", False, _no_value),
        _Protocol("p2p", True, _canonical_peer_id),
    )
}

_SUPPORTED: Final = ", ".join(PROTOCOLS)


# ---------------------------------------------------------------------------------------------------------------------
# The stack grammar as a state machine
# ---------------------------------------------------------------------------------------------------------------------


class _State(enum.Enum):
    START = "start"
    HOST = "host"  # after ip4/ip6/dns4/dns6
    TCP = "tcp"
    WS = "ws"
    UDP = "udp"
    PEER = "peer"  # after p2p: nothing may follow


#: The one transition table: (state, protocol) -> next state.  A pair that is missing is a grammar error.
_TRANSITIONS: Final[dict[tuple[_State, str], _State]] = {
    (_State.START, "ip4"): _State.HOST,
    (_State.START, "ip6"): _State.HOST,
    (_State.START, "dns4"): _State.HOST,
    (_State.START, "dns6"): _State.HOST,
    (_State.START, "p2p"): _State.PEER,
    (_State.HOST, "tcp"): _State.TCP,
    (_State.HOST, "udp"): _State.UDP,
    (_State.TCP, "ws"): _State.WS,
    (_State.TCP, "p2p"): _State.PEER,
    (_State.WS, "p2p"): _State.PEER,
    (_State.UDP, "p2p"): _State.PEER,
}

#: States in which a multiaddr may end.
_ACCEPTING: Final = frozenset({_State.TCP, _State.WS, _State.UDP, _State.PEER})

#: What may come next in each state, for error messages.
_EXPECTED: Final = {
    state: " or ".join(proto for (s, proto) in _TRANSITIONS if s is state) or "nothing" for state in _State
}


def _validate(components: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Check ``components`` against the grammar and return them with canonical values."""
    if not components:
        raise MultiaddrError("", "empty multiaddr")
    state = _State.START
    out: list[tuple[str, str]] = []
    for component in components:
        if not (
            isinstance(component, tuple)
            and len(component) == 2
            and isinstance(component[0], str)
            and isinstance(component[1], str)
        ):
            raise MultiaddrError("", f"component must be a (name, value) pair of str, got {component!r}")
        name, value = component
        protocol = PROTOCOLS.get(name)
        if protocol is None:
            raise MultiaddrError(name, f"unknown protocol (supported: {_SUPPORTED})")
        following = _TRANSITIONS.get((state, name))
        if following is None:
            where = "at the start" if state is _State.START else f"after /{out[-1][0]}"
            raise MultiaddrError(name, f"/{name} cannot come {where}; expected {_EXPECTED[state]}")
        if not protocol.has_value and value:
            raise MultiaddrError(name, f"/{name} takes no value, got {value!r}")
        try:
            canonical = protocol.canonical(value)
        except ValueError as exc:
            raise MultiaddrError(name, str(exc)) from None
        out.append((name, canonical))
        state = following
    if state not in _ACCEPTING:
        raise MultiaddrError(out[-1][0], f"a multiaddr cannot end after /{out[-1][0]}; expected {_EXPECTED[state]}")
    return tuple(out)


@dataclasses.dataclass(frozen=True, slots=True)
class Multiaddr:
    """A validated, canonical multiaddr.  Immutable and hashable; equal addresses have equal text.

    Build one with :meth:`parse` (text) or from ``components`` directly (``Multiaddr((("ip4", "127.0.0.1"),
    ("tcp", "4001")))``); either way the grammar is checked and values are canonicalised.
    """

    #: ``(protocol, value)`` pairs in order, e.g. ``(("ip4", "127.0.0.1"), ("tcp", "4001"), ("ws", ""))``.
    components: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        components = self.components
        if not isinstance(components, tuple):
            raise MultiaddrError("", f"components must be a tuple, got {type(components).__name__}")
        object.__setattr__(self, "components", _validate(components))

    @classmethod
    def parse(cls, text: str) -> Multiaddr:
        """Parse multiaddr text such as ``/dns4/example.org/tcp/443/ws/p2p/12D3KooW...``.

        Raises :class:`MultiaddrError` on anything that is not in the grammar (including a trailing ``/``, an
        empty component, a non-ASCII character or text longer than :data:`MAX_MULTIADDR_LENGTH`).
        """
        if not isinstance(text, str):
            raise MultiaddrError("", f"multiaddr must be str, got {type(text).__name__}")
        if len(text) > MAX_MULTIADDR_LENGTH:
            raise MultiaddrError("", f"multiaddr is {len(text)} characters, more than {MAX_MULTIADDR_LENGTH}")
        if not text.isascii() or not text.isprintable():
            raise MultiaddrError("", "multiaddr text must be printable ASCII")
        if not text.startswith("/"):
            raise MultiaddrError("", f"multiaddr must start with '/', got {text[:20]!r}")
        parts = text[1:].split("/")
        components: list[tuple[str, str]] = []
        i = 0
        while i < len(parts):
            name = parts[i]
            if not name:
                raise MultiaddrError("", "empty component ('//' or a trailing '/')")
            protocol = PROTOCOLS.get(name)
            if protocol is None:
                raise MultiaddrError(name, f"unknown protocol (supported: {_SUPPORTED})")
            if protocol.has_value:
                if i + 1 >= len(parts):
                    raise MultiaddrError(name, f"/{name} needs a value")
                components.append((name, parts[i + 1]))
                i += 2
            else:
                components.append((name, ""))
                i += 1
        return cls(tuple(components))

    @classmethod
    def from_transport(cls, kind: str, host: str, port: int, *, peer_id: PeerId | None = None) -> Multiaddr:
        """The inverse of :meth:`transport`: ``("ws", "127.0.0.1", 4001)`` -> ``/ip4/127.0.0.1/tcp/4001/ws``.

        An IP literal gives ``/ip4`` or ``/ip6``; any other host is taken as a DNS name and gives ``/dns4``.
        """
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            host_part = ("dns4", host)
        else:
            host_part = ("ip4" if ip.version == 4 else "ip6", str(ip))
        if not isinstance(port, int) or isinstance(port, bool):
            raise MultiaddrError(kind, f"port must be an int, got {type(port).__name__}")
        if kind == "tcp":
            tail: tuple[tuple[str, str], ...] = (("tcp", str(port)),)
        elif kind == "ws":
            tail = (("tcp", str(port)), ("ws", ""))
        elif kind == "udp":
            tail = (("udp", str(port)),)
        else:
            raise MultiaddrError(kind, "transport kind must be tcp, ws or udp")
        peer = (("p2p", str(peer_id)),) if peer_id is not None else ()
        return cls((host_part, *tail, *peer))

    def __str__(self) -> str:
        return "".join(
            f"/{name}/{value}" if PROTOCOLS[name].has_value else f"/{name}" for name, value in self.components
        )

    def __repr__(self) -> str:
        return f"Multiaddr({str(self)!r})"

    @property
    def peer_id(self) -> PeerId | None:
        """The peer ID of the trailing ``/p2p`` component, or ``None`` when there is none."""
        name, value = self.components[-1]
        return PeerId.from_string(value) if name == "p2p" else None

    def with_peer_id(self, peer_id: PeerId) -> Multiaddr:
        """This address with ``/p2p/<peer_id>`` appended (``self`` if it already ends with that peer ID).

        Raises :class:`MultiaddrError` if it already names a *different* peer.
        """
        current = self.peer_id
        if current == peer_id:
            return self
        if current is not None:
            raise MultiaddrError("p2p", f"address already names peer {current}, not {peer_id}")
        return Multiaddr((*self.components, ("p2p", str(peer_id))))

    def without_peer_id(self) -> Multiaddr:
        """This address without its trailing ``/p2p`` component (``self`` if it has none).

        Raises :class:`MultiaddrError` for a bare ``/p2p/<id>``, which has nothing left without it.
        """
        if self.components[-1][0] != "p2p":
            return self
        if len(self.components) == 1:
            raise MultiaddrError("p2p", "a bare /p2p address has no transport address to keep")
        return Multiaddr(self.components[:-1])

    def transport(self) -> tuple[str, str, int]:
        """``(kind, host, port)`` with kind ``"tcp"``, ``"ws"`` (WebSocket over TCP) or ``"udp"``.

        ``host`` is the canonical IP text or the DNS name (not resolved).  Raises :class:`MultiaddrError` for a bare
        ``/p2p`` address, which has no transport.
        """
        components = self.components
        if len(components) < 2:
            raise MultiaddrError("p2p", "a bare /p2p address has no transport; look the peer up first")
        host = components[0][1]
        proto, port = components[1]
        if proto == "tcp" and len(components) > 2 and components[2][0] == "ws":
            return "ws", host, int(port)
        return proto, host, int(port)

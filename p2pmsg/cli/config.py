"""The node's configuration file, ``<home>/config.toml``.

Theory of operation
-------------------
``p2pmsg init`` writes the file once; the user may edit it; ``p2pmsg run`` reads it with :mod:`tomllib`, validates
every key and hands the resulting :class:`Config` to the node (multiaddrs in their canonical text form).  Reading is
strict: an unknown key (usually a typo), a value of the wrong type, a multiaddr that does not parse or an
out-of-range port raises :class:`ConfigError` naming the file, the key and the reason, so a node never starts on a
configuration it misunderstood.

The file (every key optional; the values shown are the defaults)::

    listen = ["/ip4/0.0.0.0/tcp/4001"]   # multiaddrs to listen on: tcp, or tcp + ws; no /p2p component
    bootstrap = []                       # multiaddrs of known nodes to join the DHT through
    accept_from = "contacts"             # "contacts": strangers' messages wait in `p2pmsg requests`;
                                         # "anyone": strangers' messages are accepted like a contact's
    # dht_port = 4001                    # UDP port of the DHT (absent: the port of the first listen address)

Writing uses :func:`dump_config`, which escapes strings itself (TOML basic strings) because the standard library
reads TOML but does not write it.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from p2pmsg.errors import P2PMsgError
from p2pmsg.identity import read_small_file
from p2pmsg.wire.multiaddr import Multiaddr, MultiaddrError

__all__ = [
    "ACCEPT_FROM_CHOICES",
    "CONFIG_FILENAME",
    "DEFAULT_LISTEN",
    "Config",
    "ConfigError",
    "dump_config",
    "load_config",
    "parse_config",
    "toml_string",
    "write_config",
]

CONFIG_FILENAME: Final = "config.toml"
DEFAULT_LISTEN: Final = ("/ip4/0.0.0.0/tcp/4001",)
ACCEPT_FROM_CHOICES: Final = ("contacts", "anyone")

#: Bounds on what a hand-edited file may contain (generous; they only catch accidents).
MAX_ADDRS: Final = 64
MAX_CONFIG_SIZE: Final = 64 * 1024

_LISTEN_TRANSPORTS: Final = frozenset({"tcp", "ws"})


class ConfigError(P2PMsgError):
    """The configuration file is missing, unreadable or invalid; the message names the file, key and reason."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """A validated node configuration (what ``p2pmsg run`` passes to the node).

    * ``listen``: multiaddr texts the node listens on (TCP, or TCP + WebSocket), e.g. ``/ip4/0.0.0.0/tcp/4001``.
    * ``bootstrap``: multiaddr texts of nodes to join the DHT through (may be empty for the first node).
    * ``accept_from``: ``"contacts"`` (strangers' messages become requests) or ``"anyone"``.
    * ``dht_port``: the DHT's UDP port, or ``None`` for the port of the first listen address.
    """

    listen: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_LISTEN))
    bootstrap: list[str] = dataclasses.field(default_factory=list)
    accept_from: str = "contacts"
    dht_port: int | None = None

    def __post_init__(self) -> None:
        _check_config(self, source="config")


def _check_addrs(values: object, *, key: str, source: str, listen: bool) -> list[str]:
    if not isinstance(values, list | tuple):
        raise ConfigError(f"{source}: {key}: must be a list of multiaddr strings, got {_type_name(values)}")
    if len(values) > MAX_ADDRS:
        raise ConfigError(f"{source}: {key}: at most {MAX_ADDRS} addresses, got {len(values)}")
    if listen and not values:
        raise ConfigError(f"{source}: {key}: must name at least one address to listen on")
    result: list[str] = []
    for index, value in enumerate(values):
        where = f"{source}: {key}[{index}]"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a multiaddr string, got {_type_name(value)}")
        try:
            addr = Multiaddr.parse(value)
            kind, _host, port = addr.transport()
        except MultiaddrError as exc:
            raise ConfigError(f"{where}: {value!r} is not a valid multiaddr: {exc}") from None
        if listen:
            if kind not in _LISTEN_TRANSPORTS:
                raise ConfigError(f"{where}: {value!r}: can only listen on tcp or ws, not {kind}")
            if addr.peer_id is not None:
                raise ConfigError(f"{where}: {value!r}: a listen address must not carry a /p2p peer id")
        elif port == 0:
            raise ConfigError(f"{where}: {value!r}: a bootstrap address needs a real port, not 0")
        result.append(str(addr))  # canonical text: one address, one spelling
    return result


def _check_accept_from(value: object, *, source: str) -> str:
    if not isinstance(value, str) or value not in ACCEPT_FROM_CHOICES:
        choices = " or ".join(repr(c) for c in ACCEPT_FROM_CHOICES)
        raise ConfigError(f"{source}: accept_from: must be {choices}, got {value!r}")
    return value


def _check_dht_port(value: object, *, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{source}: dht_port: must be an integer from 0 to 65535, got {value!r}")
    return value


def _check_config(config: Config, *, source: str) -> None:
    _check_addrs(config.listen, key="listen", source=source, listen=True)
    _check_addrs(config.bootstrap, key="bootstrap", source=source, listen=False)
    _check_accept_from(config.accept_from, source=source)
    _check_dht_port(config.dht_port, source=source)


def _type_name(value: object) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a float",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


_KNOWN_KEYS: Final = ("listen", "bootstrap", "accept_from", "dht_port")


def parse_config(text: str, *, source: str = CONFIG_FILENAME) -> Config:
    """Parse and validate the TOML ``text`` of a configuration file; ``source`` names it in error messages."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(_KNOWN_KEYS))
    if unknown:
        known = ", ".join(_KNOWN_KEYS)
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} (known keys: {known})")
    kwargs: dict[str, Any] = {}
    if "listen" in data:
        kwargs["listen"] = _check_addrs(data["listen"], key="listen", source=source, listen=True)
    if "bootstrap" in data:
        kwargs["bootstrap"] = _check_addrs(data["bootstrap"], key="bootstrap", source=source, listen=False)
    if "accept_from" in data:
        kwargs["accept_from"] = _check_accept_from(data["accept_from"], source=source)
    if "dht_port" in data:
        kwargs["dht_port"] = _check_dht_port(data["dht_port"], source=source)
    return Config(**kwargs)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the configuration file at ``path``."""
    path = Path(path)
    try:
        raw, _ = read_small_file(path, MAX_CONFIG_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no configuration file (`p2pmsg init` writes one; in a home that has an identity, only the "
            "config, with the --listen and --bootstrap options given)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_SIZE} bytes; is this the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    # Some editors start a UTF-8 file with a byte order mark, which tomllib calls an invalid statement at line 1.
    return parse_config(text.removeprefix("\ufeff"), source=str(path))


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (double quotes), escaping backslash, quote and every control character."""
    out = ['"']
    for char in value:
        code = ord(char)
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            # A lone surrogate cannot be written as UTF-8 nor escaped in TOML.
            raise ConfigError(f"cannot write {value!r} to TOML: it contains a lone surrogate U+{code:04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(toml_string(v) for v in values) + "]"


def dump_config(config: Config) -> str:
    """The TOML text of ``config``, with comments explaining each key (``parse_config`` reads it back equal)."""
    lines = [
        "# p2pmsg node configuration, read by `p2pmsg run`.",
        "",
        '# Multiaddrs to listen on (tcp, or tcp + ws), e.g. "/ip4/0.0.0.0/tcp/4001" or "/ip4/0.0.0.0/tcp/4002/ws".',
        f"listen = {_toml_list(config.listen)}",
        "",
        '# Multiaddrs of known nodes to join the DHT through (UDP), e.g. "/ip4/192.0.2.7/udp/4001/p2p/12D3KooW..."',
        "# as `p2pmsg bootstrap` prints it (a /tcp/ address means the same port on UDP).",
        f"bootstrap = {_toml_list(config.bootstrap)}",
        "",
        '# Whose messages are accepted: "contacts" (strangers wait in `p2pmsg requests`) or "anyone".',
        f"accept_from = {toml_string(config.accept_from)}",
        "",
        "# UDP port of the DHT; commented out, it is the port of the first listen address (0 there: any free port).",
    ]
    if config.dht_port is None:
        lines.append("# dht_port = 4001")
    else:
        lines.append(f"dht_port = {config.dht_port}")
    return "\n".join(lines) + "\n"


def write_config(path: str | os.PathLike[str], config: Config) -> None:
    """Write ``config`` to ``path`` atomically (temporary file + rename), mode 0600."""
    path = Path(path)
    text = dump_config(config)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

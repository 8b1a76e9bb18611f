"""The local control API: a Unix socket in the node's home directory.

The node runs a :class:`ControlServer` on ``<home>/control.sock`` (mode 0600) and publishes events through an
:class:`EventHub`; the CLI talks to it with the synchronous :class:`ControlClient`.  Formats:
``docs/protocol.md (section 7)``.
"""

from typing import TYPE_CHECKING

from p2pmsg.control.client import ControlClient, EventStream
from p2pmsg.control.errors import (
    ERROR_CODES,
    ControlConnectionError,
    ControlError,
    ControlProtocolError,
    ControlRequestError,
    ControlSetupError,
    FrameTooLargeError,
    NodeAlreadyRunningError,
    NodeNotRunningError,
)
from p2pmsg.control.methods import EVENT_NAMES, METHODS, check_params
from p2pmsg.control.socketpath import SOCKET_NAME, SocketState, control_socket_path, probe_socket

if TYPE_CHECKING:
    from p2pmsg.control.server import ControlServer, EventHub, Handler
else:
    _SERVER_NAMES = frozenset({"ControlServer", "EventHub", "Handler"})

    def __getattr__(name: str) -> object:
        """The server side (trio) is imported on first use, so a CLI command that only talks to a node starts
        faster.  Type checkers see the plain imports above instead, so they still check these names."""
        if name in _SERVER_NAMES:
            from p2pmsg.control import server

            return getattr(server, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ERROR_CODES",
    "EVENT_NAMES",
    "METHODS",
    "SOCKET_NAME",
    "ControlClient",
    "ControlConnectionError",
    "ControlError",
    "ControlProtocolError",
    "ControlRequestError",
    "ControlServer",
    "ControlSetupError",
    "EventHub",
    "EventStream",
    "FrameTooLargeError",
    "Handler",
    "NodeAlreadyRunningError",
    "NodeNotRunningError",
    "SocketState",
    "check_params",
    "control_socket_path",
    "probe_socket",
]

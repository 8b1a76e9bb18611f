"""Errors of the local control API (server side and client side)."""

from __future__ import annotations

from typing import Final

from p2pmsg.errors import P2PMsgError, RemoteProtocolError

__all__ = [
    "ERROR_CODES",
    "ControlConnectionError",
    "ControlError",
    "ControlProtocolError",
    "ControlRequestError",
    "ControlSetupError",
    "FrameTooLargeError",
    "NodeAlreadyRunningError",
    "NodeNotRunningError",
]

#: The error codes a response may carry (``{"error": {"code": ..., "message": ...}}``).
ERROR_CODES: Final = frozenset(
    {"unknown_contact", "bad_request", "name_taken", "invalid_invite", "not_stored", "internal"}
)


class ControlError(P2PMsgError):
    """Base class of the control API's local errors (setup, connection, lifecycle)."""


class NodeNotRunningError(ControlError):
    """No node answers on the control socket of this home; the message says how to start one."""


class NodeAlreadyRunningError(ControlError):
    """Another node already answers on this home's control socket, so a second one must not start."""


class ControlSetupError(ControlError):
    """The control socket cannot be set up safely (path too long, unsafe directory, a non-socket in the way...)."""


class ControlConnectionError(ControlError):
    """The control connection failed or was closed by the other side in the middle of an exchange."""


class ControlRequestError(P2PMsgError):
    """A request failed with an error code from :data:`ERROR_CODES`.

    Handlers raise it to answer ``{"error": {"code": code, "message": message}}``; the client raises it when it reads
    such an answer.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControlProtocolError(RemoteProtocolError):
    """The other end of a control connection sent a malformed frame.  ``field`` and ``reason`` say what and why.

    ``drop_reason`` is the counter the server bumps when it closes the connection because of this error.
    """

    drop_reason = "control_malformed_frame"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"control frame: {field}: {reason}")
        self.field = field
        self.reason = reason


class FrameTooLargeError(ControlProtocolError):
    """A frame's length prefix is above the receiver's limit (the body is never read)."""

    drop_reason = "control_oversize_frame"

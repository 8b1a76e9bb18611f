"""Errors the chat service raises to the user (through the control API), each with its control error code.

Remote-input errors of the chat protocols live next to their parsers (:class:`~p2pmsg.chat.envelope.ChatEnvelopeError`,
:class:`~p2pmsg.chat.protocol.SessionProtocolError`, :class:`~p2pmsg.chat.invite.InviteError`).  The errors here
answer a *local* request: an unknown contact, a name in use, a malformed argument.
"""

from __future__ import annotations

from typing import ClassVar, Final

from p2pmsg.chat.invite import InviteError
from p2pmsg.errors import P2PMsgError
from p2pmsg.store.errors import StoreReadError, StoreWriteError

__all__ = ["ERROR_CODES", "BadRequestError", "ChatError", "NameTakenError", "UnknownContactError"]


class ChatError(P2PMsgError):
    """Base class of the chat service's request errors; :attr:`code` is the control API error code."""

    code: ClassVar[str] = "internal"

    @property
    def message(self) -> str:
        """The human-readable message (what the user sees)."""
        return str(self)


class UnknownContactError(ChatError):
    """No contact (or pending request) with that name or peer id."""

    code = "unknown_contact"


class NameTakenError(ChatError):
    """Another contact already has that name."""

    code = "name_taken"


class BadRequestError(ChatError):
    """The request cannot be done as asked (bad peer id, blocked contact, text too long, ...)."""

    code = "bad_request"


#: Exception type -> control API error code, for ``ControlServer(error_codes=...)``.  A write the store could not
#: commit (disk full, I/O error) is ``not_stored``: nothing of the request was stored, and its message says so (and,
#: for a send, whether the text had already left for the recipient).
ERROR_CODES: Final[dict[type[BaseException], str]] = {
    UnknownContactError: UnknownContactError.code,
    NameTakenError: NameTakenError.code,
    BadRequestError: BadRequestError.code,
    InviteError: "invalid_invite",
    StoreWriteError: "not_stored",
    StoreReadError: "not_stored",
}

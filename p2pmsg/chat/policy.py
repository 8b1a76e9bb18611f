"""Who may talk to us, and where their messages land.

Theory of operation
-------------------
Every peer is, from our side, in exactly one of three relations: a *contact* (we added them, or accepted their
request), *blocked*, or a *stranger* (neither).  The policy maps the relation to what happens:

==========  ==========================  =======================================================
relation    at the channel              a message from them
==========  ==========================  =======================================================
contact     admitted                    stored in the conversation (the inbox), acknowledged
stranger    admitted                    ``accept_from = "contacts"`` (default): stored as a *message request*,
                                        kept apart from the inbox until accepted; acknowledged.
                                        ``accept_from = "anyone"``: the stranger is added as a contact
                                        (named by its peer id, marked *auto-added*) and the message goes to
                                        the inbox; beyond :attr:`ChatPolicy.max_auto_added` auto-added
                                        contacts it is stored as a request instead.
blocked     refused right after the     never stored, never acknowledged
            handshake (channel closed)
==========  ==========================  =======================================================

Requests are bounded: at most :attr:`ChatPolicy.max_request_peers` strangers with pending requests and
:attr:`ChatPolicy.max_requests_per_peer` messages each, and by size: at most :attr:`ChatPolicy.max_request_bytes`
of message text (UTF-8) over all pending requests and :attr:`ChatPolicy.max_request_bytes_per_peer` per stranger.
Over any bound the message is dropped *without* an acknowledgement (so an honest sender keeps it queued and retries
later) and counted.

An auto-added contact's messages go to the inbox, but until the user vouches for it by renaming it its sessions stay
under the stranger limits (slots, idle timeout), and what it may store is bounded as one stranger's requests are
(:meth:`ChatPolicy.unvetted_admissible`: the same per-peer count and bytes, counted since it was added), so that
``anyone`` cannot fill the disk either.  Blocking or removing it ends the mark (blocked, it is a stranger blocked:
unblocking does not vouch for it).

The policy is pure data plus decisions; the chat service asks it and does the I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from p2pmsg.errors import LocalProtocolError

__all__ = ["AcceptFrom", "ChatPolicy", "Disposition", "Relation"]


class AcceptFrom(enum.StrEnum):
    """The ``accept_from`` setting."""

    CONTACTS = "contacts"
    ANYONE = "anyone"


class Relation(enum.StrEnum):
    """How we know a peer."""

    CONTACT = "contact"
    BLOCKED = "blocked"
    STRANGER = "stranger"


class Disposition(enum.Enum):
    """Where an incoming message goes."""

    INBOX = "inbox"  #: store in the conversation with a contact
    REQUEST = "request"  #: store as a message request from a stranger
    ADD_AND_INBOX = "add_and_inbox"  #: add the stranger as a contact, then store in the conversation
    REFUSE = "refuse"  #: drop, do not acknowledge


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatPolicy:
    """The message-request policy and its bounds."""

    accept_from: AcceptFrom = AcceptFrom.CONTACTS
    max_request_peers: int = 256
    max_requests_per_peer: int = 100
    max_request_bytes: int = 32 * 1024 * 1024
    """Text bytes (UTF-8) of all pending requests together."""
    max_request_bytes_per_peer: int = 256 * 1024
    """Text bytes (UTF-8) of one stranger's pending requests."""
    max_auto_added: int = 256
    """``accept_from = "anyone"``: most contacts auto-added and not yet renamed by the user; beyond it a stranger's
    message is stored as a request."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "accept_from", AcceptFrom(self.accept_from))
        except ValueError:
            choices = ", ".join(repr(a.value) for a in AcceptFrom)
            raise LocalProtocolError(f"accept_from: {self.accept_from!r} is not one of {choices}") from None
        if self.max_request_peers < 1 or self.max_requests_per_peer < 1:
            raise LocalProtocolError("max_request_peers and max_requests_per_peer must be at least 1")
        if self.max_auto_added < 0:
            raise LocalProtocolError(f"max_auto_added must be at least 0, got {self.max_auto_added}")
        if self.max_request_bytes_per_peer < 1 or self.max_request_bytes < self.max_request_bytes_per_peer:
            raise LocalProtocolError(
                "max_request_bytes_per_peer must be at least 1, "
                "and max_request_bytes at least max_request_bytes_per_peer"
            )

    def admit_channel(self, relation: Relation) -> bool:
        """Whether a channel authenticated as a peer with this relation may stay open."""
        return relation is not Relation.BLOCKED

    def classify(self, relation: Relation, *, auto_added: int = 0) -> Disposition:
        """Where a (valid, decrypted) message from a peer with this relation goes; ``auto_added`` is the number of
        contacts auto-added and not yet vouched for (``accept_from = "anyone"`` adds no more than the cap)."""
        if relation is Relation.CONTACT:
            return Disposition.INBOX
        if relation is Relation.BLOCKED:
            return Disposition.REFUSE
        if self.accept_from is AcceptFrom.ANYONE and auto_added < self.max_auto_added:
            return Disposition.ADD_AND_INBOX
        return Disposition.REQUEST

    def unvetted_admissible(self, *, stored: int, stored_bytes: int, size: int) -> bool:
        """Whether one more message of ``size`` text bytes from an auto-added contact not vouched for fits the bounds
        of one stranger's requests, given the ``stored`` messages and ``stored_bytes`` text bytes it stored since it
        was added."""
        return stored < self.max_requests_per_peer and stored_bytes + size <= self.max_request_bytes_per_peer

    def request_admissible(
        self,
        *,
        pending_peers: int,
        pending_from_peer: int,
        peer_already_pending: bool,
        pending_bytes: int = 0,
        pending_bytes_from_peer: int = 0,
        size: int = 0,
    ) -> bool:
        """Whether one more request message from a stranger fits the bounds.

        ``pending_peers`` is the number of strangers with pending requests now, ``pending_from_peer`` the number of
        requests pending from this stranger, ``peer_already_pending`` whether this stranger is among them;
        ``pending_bytes`` and ``pending_bytes_from_peer`` the text bytes pending in all and from this stranger, and
        ``size`` the text bytes of the new message.
        """
        if pending_from_peer >= self.max_requests_per_peer:
            return False
        if pending_bytes_from_peer + size > self.max_request_bytes_per_peer:
            return False
        if pending_bytes + size > self.max_request_bytes:
            return False
        return peer_already_pending or pending_peers < self.max_request_peers

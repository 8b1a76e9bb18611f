"""Events of the chat session protocol (:class:`p2pmsg.chat.protocol.ChatConnection`) and of the chat service.

Session events come out of ``ChatConnection.receive_data``; service events are what the chat service reports to the
control API's subscribers (each has :meth:`fields` giving the map sent after ``{"event": name}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from p2pmsg.chat.envelope import SealedEnvelope

__all__ = [
    "AckReceived",
    "ChatServiceEvent",
    "EnvelopeReceived",
    "HelloReceived",
    "MessageEvent",
    "PeerDownEvent",
    "PeerUpEvent",
    "ReceiptEvent",
    "RequestEvent",
    "SessionClosed",
    "SessionEvent",
    "message_fields",
]


# ---------------------------------------------------------------------------------------------------------------------
# Session protocol events
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloReceived:
    """The peer opened the session with its hello (always the first event)."""

    proto: str
    run: bytes | None = None
    """The peer's ``run`` (random per start of its node), if it sent one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvelopeReceived:
    """The peer sent a message; the envelope's outer fields are valid, its box is still closed."""

    envelope: SealedEnvelope


@dataclass(frozen=True, slots=True, kw_only=True)
class AckReceived:
    """The peer has durably stored the messages with these ids."""

    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionClosed:
    """The peer ended its side of the byte stream cleanly, at a frame boundary."""


SessionEvent = HelloReceived | EnvelopeReceived | AckReceived | SessionClosed


# ---------------------------------------------------------------------------------------------------------------------
# Service events (published to control API subscribers)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageEvent:
    """A message was stored in a conversation (incoming, or sent by us from another control connection)."""

    name: ClassVar[str] = "message"
    id: str
    peer_id: str
    contact: str | None
    sender: str
    text: str
    ts: int
    direction: str

    def fields(self) -> dict[str, Any]:
        """The event's fields for the control API."""
        return message_fields(self.id, self.peer_id, self.contact, self.sender, self.text, self.ts, self.direction)


def message_fields(
    id: str,
    peer_id: str,
    contact: str | None,
    sender: str,
    text: str,
    ts: int,
    direction: str,
) -> dict[str, Any]:
    """The control-API fields of a ``message`` event (:class:`MessageEvent`), built straight from its values: the
    hot paths publish one per message and skip the event object."""
    return {
        "id": id,
        "peer_id": peer_id,
        "name": contact,
        "from": sender,
        "text": text,
        "ts": ts,
        "direction": direction,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptEvent:
    """Outgoing messages to one peer changed status (``sent``, ``delivered`` or ``failed``): one event per batch,
    so a burst of thousands of messages costs a subscriber a handful of events, not one per message."""

    name: ClassVar[str] = "receipt"
    ids: tuple[str, ...]
    """The message ids (hex), in the order the batch was written or acknowledged."""
    peer_id: str
    status: str

    def fields(self) -> dict[str, Any]:
        """The event's fields for the control API."""
        return {"ids": list(self.ids), "peer_id": self.peer_id, "status": self.status}


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerUpEvent:
    """A chat session with a peer opened."""

    name: ClassVar[str] = "peer_up"
    peer_id: str
    contact: str | None
    direction: str
    addr: str

    def fields(self) -> dict[str, Any]:
        """The event's fields for the control API."""
        return {"peer_id": self.peer_id, "name": self.contact, "direction": self.direction, "addr": self.addr}


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerDownEvent:
    """The chat session with a peer closed."""

    name: ClassVar[str] = "peer_down"
    peer_id: str
    contact: str | None
    reason: str

    def fields(self) -> dict[str, Any]:
        """The event's fields for the control API."""
        return {"peer_id": self.peer_id, "name": self.contact, "reason": self.reason}


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestEvent:
    """A stranger's message was stored as a message request."""

    name: ClassVar[str] = "request"
    id: str
    peer_id: str
    text: str
    ts: int

    def fields(self) -> dict[str, Any]:
        """The event's fields for the control API."""
        return {"id": self.id, "peer_id": self.peer_id, "text": self.text, "ts": self.ts}


ChatServiceEvent = MessageEvent | ReceiptEvent | PeerUpEvent | PeerDownEvent | RequestEvent

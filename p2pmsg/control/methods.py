"""The control methods and their params, declared once (the server checks params before calling a handler).

Theory of operation
-------------------
:data:`METHODS` maps every method name of the control contract to the schema of its params map, declared with the
strict codec (:mod:`p2pmsg.wire.codec`): each param's type, bounds, and whether it is required; unknown params are
refused.  :func:`check_params` validates a request's params against that schema and raises
:class:`~p2pmsg.control.errors.ControlRequestError` with code ``bad_request`` naming the param and the reason, so a
handler only ever sees params of the declared types.  A method that is not
declared (an extension a node registers itself) gets its params unchecked.

Results are not checked here: the node produces them.  Their shapes are documented in
``docs/protocol.md (section 7)`` and in :data:`METHOD_DOCS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from p2pmsg.control.errors import ControlRequestError
from p2pmsg.wire.codec import Array, CodecError, Int, Schema, Str, Struct

__all__ = ["EVENT_NAMES", "METHODS", "METHOD_DOCS", "check_params"]


_NAME: Final = Str(256, min_len=1)
_PEER_OR_NAME: Final = Str(256, min_len=1)
_TEXT: Final = Str(64 * 1024, min_len=1)
_TARGET: Final = Str(8 * 1024, min_len=1)
_INT31: Final = (1 << 31) - 1
_INT63: Final = (1 << 63) - 1


def _params(method: str, fields: dict[str, Schema[Any]], optional: dict[str, Schema[Any]] | None = None) -> Struct:
    return Struct(method, fields, optional)


#: Every method of the control contract and the schema of its params (a :class:`~p2pmsg.wire.codec.Struct`).
METHODS: Final[Mapping[str, Struct]] = {
    "id": _params("id", {}),
    "contacts.add": _params("contacts.add", {"target": _TARGET, "name": _NAME}),
    "contacts.list": _params("contacts.list", {}),
    "contacts.rename": _params("contacts.rename", {"name": _NAME, "new_name": _NAME}),
    "contacts.remove": _params("contacts.remove", {"name": _NAME}),
    "contacts.block": _params("contacts.block", {"name_or_peer": _PEER_OR_NAME}),
    "contacts.unblock": _params("contacts.unblock", {"name_or_peer": _PEER_OR_NAME}),
    "send": _params("send", {"name": _NAME, "text": _TEXT}),
    "send_many": _params("send_many", {"name": _NAME, "texts": Array(_TEXT, 1000, min_items=1)}),
    "history": _params(
        "history", {"name": _NAME}, {"limit": Int(1, _INT31), "before": Int(0, _INT63), "before_seq": Int(0, _INT63)}
    ),
    "inbox": _params("inbox", {}),
    "requests.list": _params("requests.list", {}),
    "requests.accept": _params("requests.accept", {"peer_id": _PEER_OR_NAME, "name": _NAME}),
    "requests.block": _params("requests.block", {"peer_id": _PEER_OR_NAME}),
    "peers": _params("peers", {}),
    "status": _params("status", {}),
    "export": _params("export", {"name": _NAME}),
    "subscribe": _params("subscribe", {}),
}

#: One line per method: what it returns (for ``--help`` texts and the protocol document).
METHOD_DOCS: Final[Mapping[str, str]] = {
    "id": "{peer_id, addrs: [str], invite}",
    "contacts.add": "{peer_id, name}",
    "contacts.list": '[{peer_id, name, state: "contact"|"blocked", added}]',
    "contacts.rename": "{}",
    "contacts.remove": "{}",
    "contacts.block": "{}",
    "contacts.unblock": "{}",
    "send": "{id, status}",
    "send_many": "{ids: [id], status} (texts queued in order, in one transaction)",
    "history": "[{id, from, text, ts, status, direction, seq}] oldest first, in (ts, seq) order",
    "inbox": "[{name, peer_id, last_text, last_ts}] most recent first",
    "requests.list": "[{peer_id, count, last_text, last_ts}]",
    "requests.accept": "{}",
    "requests.block": "{}",
    "peers": "[{peer_id, name?, addr, direction: inbound|outbound, since}]",
    "status": "{peer_id, uptime_s, connections, dht_size, outbox_depth, dropped: {reason: count}}",
    "export": "{contact: {...}, messages: [...]}",
    "subscribe": "{} then a stream of event frames",
}

#: The events a subscriber may receive (a node may add more; clients ignore names they do not know).
EVENT_NAMES: Final = frozenset({"message", "receipt", "peer_up", "peer_down", "request"})


def check_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``params`` for ``method`` and return them as a new dict; ``bad_request`` naming the param if not.

    Params of a method that is not in :data:`METHODS` are returned unchecked.
    """
    schema = METHODS.get(method)
    if schema is None:
        return dict(params)
    try:
        return schema.validate(dict(params))
    except CodecError as exc:
        raise ControlRequestError("bad_request", f"{exc.field}: {exc.reason}") from None

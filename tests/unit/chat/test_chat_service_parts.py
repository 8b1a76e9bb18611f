"""The chat service's plain parts: configuration checks, event payloads, error codes."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from p2pmsg.chat import events as ev
from p2pmsg.chat.errors import ERROR_CODES, BadRequestError, NameTakenError, UnknownContactError
from p2pmsg.chat.invite import InviteError
from p2pmsg.chat.service import ChatConfig
from p2pmsg.errors import LocalProtocolError
from p2pmsg.store.errors import StoreReadError, StoreWriteError


@pytest.mark.parametrize(
    "change",
    [
        {"dial_timeout": 0},
        {"send_timeout": float("inf")},
        {"stranger_idle_timeout": -1.0},
        {"resend_after_ms": 0},
        {"max_sessions": 0},
        {"max_stranger_sessions": 0},
        {"due_batch": 10_001},
        {"batch_size": 512, "max_session_queue": 256},
    ],
)
def test_bad_config_is_refused(change: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        ChatConfig(**change)  # type: ignore[arg-type]


def test_default_config_is_valid() -> None:
    config = ChatConfig()
    assert config.policy.accept_from == "contacts"
    assert config.backoff.cap_ms == 2 * 60 * 1000  # a contact back without a new record waits at most this


def test_event_payloads_match_the_control_contract() -> None:
    message = ev.MessageEvent(id="ab" * 16, peer_id="12D3", contact=None, sender="12D3", text="t", ts=5, direction="in")
    assert (message.name, message.fields()) == (
        "message",
        {"id": "ab" * 16, "peer_id": "12D3", "name": None, "from": "12D3", "text": "t", "ts": 5, "direction": "in"},
    )
    assert ev.ReceiptEvent(ids=("x", "y"), peer_id="p", status="sent").fields() == {
        "ids": ["x", "y"],
        "peer_id": "p",
        "status": "sent",
    }
    assert ev.PeerUpEvent(peer_id="p", contact="bob", direction="inbound", addr="/ip4/1.2.3.4/tcp/1").fields() == {
        "peer_id": "p",
        "name": "bob",
        "direction": "inbound",
        "addr": "/ip4/1.2.3.4/tcp/1",
    }
    assert ev.PeerDownEvent(peer_id="p", contact=None, reason="r").name == "peer_down"
    assert ev.RequestEvent(id="x", peer_id="p", text="hi", ts=1).fields() == {
        "id": "x",
        "peer_id": "p",
        "text": "hi",
        "ts": 1,
    }
    with pytest.raises(AttributeError):
        message.text = "changed"  # type: ignore[misc]


def test_error_codes() -> None:
    assert {
        UnknownContactError: "unknown_contact",
        NameTakenError: "name_taken",
        BadRequestError: "bad_request",
        InviteError: "invalid_invite",
        StoreWriteError: "not_stored",
        StoreReadError: "not_stored",
    } == ERROR_CODES
    assert BadRequestError("why").message == "why"


async def test_the_inbox_byte_budget_makes_readers_wait_and_lets_one_oversized_chunk_through_alone() -> None:
    from p2pmsg.chat.service import _ByteBudget

    budget = _ByteBudget(100)
    await budget.take(60)
    order: list[str] = []

    async def reader(name: str, size: int) -> None:
        await budget.take(size)
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "fits", 40)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(reader, "waits", 10)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["fits"] and budget.used == 100
        budget.give_back(100)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["fits", "waits"] and budget.used == 10
        budget.give_back(10)
    await budget.take(500)  # larger than the limit: allowed when nothing else is taken
    assert budget.used == 500

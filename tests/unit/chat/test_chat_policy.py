"""The message-request policy: where each relation's messages land, and the request bounds."""

from __future__ import annotations

import pytest

from p2pmsg.chat.policy import AcceptFrom, ChatPolicy, Disposition, Relation
from p2pmsg.errors import LocalProtocolError


def test_default_policy_quarantines_strangers() -> None:
    policy = ChatPolicy()
    assert policy.accept_from is AcceptFrom.CONTACTS
    assert policy.classify(Relation.CONTACT) is Disposition.INBOX
    assert policy.classify(Relation.STRANGER) is Disposition.REQUEST
    assert policy.classify(Relation.BLOCKED) is Disposition.REFUSE


def test_anyone_adds_strangers_but_still_refuses_blocked_peers() -> None:
    policy = ChatPolicy(accept_from=AcceptFrom("anyone"))
    assert policy.classify(Relation.STRANGER) is Disposition.ADD_AND_INBOX
    assert policy.classify(Relation.CONTACT) is Disposition.INBOX
    assert policy.classify(Relation.BLOCKED) is Disposition.REFUSE
    assert not policy.admit_channel(Relation.BLOCKED)


def test_channel_admission() -> None:
    policy = ChatPolicy()
    assert policy.admit_channel(Relation.CONTACT)
    assert policy.admit_channel(Relation.STRANGER)
    assert not policy.admit_channel(Relation.BLOCKED)


def test_accept_from_is_validated() -> None:
    assert ChatPolicy(accept_from="anyone").accept_from is AcceptFrom.ANYONE  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="accept_from"):
        ChatPolicy(accept_from="everybody")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        ChatPolicy(max_request_peers=0)


def test_request_bounds() -> None:
    policy = ChatPolicy(max_request_peers=2, max_requests_per_peer=3)
    assert policy.request_admissible(pending_peers=0, pending_from_peer=0, peer_already_pending=False)
    assert policy.request_admissible(pending_peers=1, pending_from_peer=0, peer_already_pending=False)
    assert not policy.request_admissible(pending_peers=2, pending_from_peer=0, peer_already_pending=False)
    assert policy.request_admissible(pending_peers=2, pending_from_peer=2, peer_already_pending=True)
    assert not policy.request_admissible(pending_peers=2, pending_from_peer=3, peer_already_pending=True)


def test_request_byte_budget() -> None:
    policy = ChatPolicy(max_request_bytes=1000, max_request_bytes_per_peer=400)
    fits = dict(pending_peers=1, pending_from_peer=1, peer_already_pending=True)
    assert policy.request_admissible(**fits, pending_bytes=600, pending_bytes_from_peer=0, size=400)
    assert not policy.request_admissible(**fits, pending_bytes=0, pending_bytes_from_peer=1, size=400)
    assert not policy.request_admissible(**fits, pending_bytes=601, pending_bytes_from_peer=0, size=400)
    with pytest.raises(LocalProtocolError, match="max_request_bytes"):
        ChatPolicy(max_request_bytes=100, max_request_bytes_per_peer=200)


def test_unvetted_bounds_are_one_strangers_request_bounds() -> None:
    policy = ChatPolicy(max_requests_per_peer=3, max_request_bytes_per_peer=400)
    assert policy.unvetted_admissible(stored=2, stored_bytes=0, size=400)
    assert not policy.unvetted_admissible(stored=3, stored_bytes=0, size=1)
    assert not policy.unvetted_admissible(stored=0, stored_bytes=1, size=400)


def test_default_request_budget() -> None:
    policy = ChatPolicy()
    assert (policy.max_request_bytes, policy.max_request_bytes_per_peer) == (32 * 1024 * 1024, 256 * 1024)


def test_auto_add_cap() -> None:
    assert ChatPolicy().max_auto_added == 256
    with pytest.raises(LocalProtocolError, match="max_auto_added"):
        ChatPolicy(max_auto_added=-1)

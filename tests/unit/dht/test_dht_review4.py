"""Findings of the session-13 review of what a remote stranger can make the DHT do: ever new node ids from a few
addresses (routing-table share per address and per host, the cost of hand-off scans)."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import time

import pytest
import trio
from dht_sim import build_network
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmsg.dht.core.contact import Address, Contact
from p2pmsg.dht.core.engine import DhtConfig, DhtEngine
from p2pmsg.dht.core.errors import DhtUsageError, RecordError
from p2pmsg.dht.core.events import LookupDone, PingDone
from p2pmsg.dht.core.messages import (
    FindValueRequest,
    IncomingRequest,
    IncomingResponse,
    PingRequest,
    decode_datagram,
    encode_request,
    encode_response,
    new_message_id,
)
from p2pmsg.dht.core.records import PeerRecord, peer_record_key, seal_peer_record
from p2pmsg.dht.core.routing import ContactAdded, ContactRemoved, RoutingTable
from p2pmsg.dht.service import open_dht_node
from p2pmsg.identity import Identity


def ident(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"review4-%d" % n).digest())


def node_id(n: int) -> bytes:
    return hashlib.sha1(b"id-%d" % n).digest()


def ping_from(engine: DhtEngine, address: Address, sender: bytes, now: float) -> None:
    request = encode_request(new_message_id(hashlib.sha256(sender).digest()[:12]), PingRequest(node_id=sender))
    engine.datagram_received(request, address, now)
    engine.take_datagrams()


def flood(engine: DhtEngine, addresses: list[Address], ids: int, *, step: float = 0.02) -> float:
    """Pings under ``ids`` new node ids spread over ``addresses`` (already proven), below the per-address rate."""
    now = 1.0
    for address in addresses:
        engine.guard.mark_proven(address, now)
    for n in range(ids):
        now += step / len(addresses)
        ping_from(engine, addresses[n % len(addresses)], node_id(n), now)
    return now


def test_one_address_under_ever_new_ids_holds_one_contact() -> None:
    """The review's probe: one proven address pinging under a new id each time filled the table along our own id
    (3,000 contacts from a single address), each id a newcomer."""
    engine = DhtEngine(ident(1))
    address = ("198.51.100.7", 4000)
    flood(engine, [address], 300)
    assert [(c.node_id, c.address) for c in engine.table.contacts()] == [(node_id(0), address)]
    assert all(not b.replacements for b in engine.table.buckets())  # not waiting in a cache either


@pytest.mark.parametrize(
    ("host", "ports", "held"),
    [("198.51.100.7", 12, 8), ("2001:db8::", 12, 8), ("127.0.0.1", 12, 12)],  # IPv6: one /64, many addresses
)
def test_one_host_holds_at_most_eight_contacts_loopback_aside(host: str, ports: int, held: int) -> None:
    engine = DhtEngine(ident(2))
    if ":" in host:
        addresses = [(f"{host}{n + 1:x}", 4000) for n in range(ports)]
    else:
        addresses = [(host, 4000 + n) for n in range(ports)]
    flood(engine, addresses, 10 * ports)
    contacts = engine.table.contacts()
    assert len(contacts) == held
    assert len({c.address for c in contacts}) == held  # one per address


def test_a_node_that_restarted_under_a_new_id_takes_its_address_back_by_answering_a_ping() -> None:
    engine = DhtEngine(ident(3))
    address = ("198.51.100.7", 4000)
    flood(engine, [address], 1)
    engine.ping(address, 10.0)
    [(datagram, to)] = engine.take_datagrams()
    assert to == address
    request = decode_datagram(datagram)
    assert isinstance(request, IncomingRequest)
    engine.datagram_received(encode_response(request.msg_id, node_id(99)), address, 10.1)
    assert [(c.node_id, c.address) for c in engine.table.contacts()] == [(node_id(99), address)]


def test_hand_off_scans_are_bounded_however_fast_newcomers_come() -> None:
    """Each newcomer started a walk of the whole store and table (about 3 ms with 2,400 contacts) before the hand-off
    rate was checked; newcomers from many hosts made faster than that took the node's CPU."""
    config = DhtConfig(k=1024)  # one bucket: every id from a new host is a newcomer
    engine = DhtEngine(ident(4), config=config)
    scans = 0
    items = engine.storage.items

    def counted(now: float) -> object:
        nonlocal scans
        scans += 1
        return items(now)

    engine.storage.items = counted  # type: ignore[method-assign]
    hosts = [(f"198.51.{n // 250}.{n % 250 + 1}", 4000) for n in range(600)]
    end = flood(engine, hosts, 600, step=1.0)  # 600 newcomers in 1 s
    assert len(engine.table) == 600
    assert scans <= config.handoff_burst + config.handoff_rate * end + 1
    assert engine.stats["handoff_scans_skipped"] == 600 - scans


def test_routing_table_share_bounds_are_checked() -> None:
    with pytest.raises(DhtUsageError, match="max_contacts_per_host"):
        DhtConfig(max_contacts_per_host=0)
    with pytest.raises(DhtUsageError, match="max_per_host"):
        RoutingTable(bytes(20), max_per_host=0)


def test_answers_to_a_proven_address_are_capped_so_forged_requests_cannot_reflect_much_at_it() -> None:
    """A proof only says the address talked to us lately: a ``find_value`` forged with its source was answered to it
    in full, a 2 KB record for 78 bytes, 100 times a second from every node it had talked to."""
    config = DhtConfig()
    engine = DhtEngine(ident(5), config=config)
    signer = ident(6)
    label = "a" * 60
    addrs = tuple(f"/dns4/{label}.{label}.h{i}.example/tcp/4001" for i in range(8))  # a 1,400-byte record
    record = PeerRecord(peer_id=signer.peer_id, addrs=addrs, seq=1, expires_at=int(time.time()) + 3600)
    key = peer_record_key(signer.peer_id)
    assert engine.store_local(key, seal_peer_record(signer, record), 0.0)
    victim, other = ("198.51.100.9", 4000), ("203.0.113.5", 4000)
    engine.guard.mark_proven(victim, 0.0)
    engine.guard.mark_proven(other, 0.0)
    sent_to_victim = forged = 0
    now = 0.0
    answers: list[bytes] = []
    for n in range(1000):  # 100 a second for 10 s: what the per-address request rate lets through
        now += 0.01
        request = encode_request(new_message_id(n.to_bytes(12, "big")), FindValueRequest(node_id=node_id(n), key=key))
        forged += len(request)
        engine.datagram_received(request, victim, now)
        out = [data for data, to in engine.take_datagrams() if to == victim]
        sent_to_victim += sum(map(len, out))
        answers += [data for data in out if isinstance(decode_datagram(data), IncomingResponse)]
    single = len(encode_response(bytes(20), [])) + 1500
    # In full up to the budget; beyond it, an answer no larger than its request each (forged bytes, not more).
    assert sent_to_victim <= config.answer_burst_per_address + config.answer_rate_per_address * now + single + forged
    assert sent_to_victim >= config.answer_burst_per_address  # not answered less than the cap either
    assert engine.stats["answers_capped"] > 0
    assert len(answers) == 1000  # every request answered: a capped one with a short answer, not with silence
    assert sum(1 for data in answers if len(data) > 1400) < 1000 - engine.stats["answers_capped"] + 1
    request = FindValueRequest(node_id=node_id(5000), key=key)
    engine.datagram_received(encode_request(new_message_id(bytes(12)), request), other, now)
    answers = [
        d for d, to in engine.take_datagrams() if to == other and isinstance(decode_datagram(d), IncomingResponse)
    ]
    assert len(answers) == 1 and len(answers[0]) > 1400  # another address is answered as before


def answer_our_pings(engine: DhtEngine, address: Address, with_id: bytes, now: float) -> int:
    """Answer every ping the engine sent to ``address`` with ``with_id``; how many there were."""
    pings = []
    for data, to in engine.take_datagrams():
        message = decode_datagram(data)
        if to == address and isinstance(message, IncomingRequest) and isinstance(message.request, PingRequest):
            pings.append(message.msg_id)
    for msg_id in pings:
        engine.datagram_received(encode_response(msg_id, with_id), address, now)
    return len(pings)


def test_an_id_a_third_node_gave_for_an_address_does_not_keep_out_the_node_living_there() -> None:
    """Lookup answers bring contacts under the ids other nodes name; one that names a wrong id for an honest node's
    address put that id in the table, and the honest node's own requests were then ignored for good."""
    engine = DhtEngine(ident(9))
    honest = ("198.51.100.20", 4000)
    engine.guard.mark_proven(honest, 0.0)
    engine.table.observe(Contact(node_id=node_id(1), host=honest[0], port=honest[1]), 0.0)  # as a lookup answer does
    request = encode_request(new_message_id(b"\x07" * 12), PingRequest(node_id=node_id(2)))
    engine.datagram_received(request, honest, 1.1)
    assert answer_our_pings(engine, honest, node_id(2), 1.2) == 1  # we asked who lives there
    assert engine.table.holder(honest) == node_id(2)
    assert node_id(1) not in engine.table


def test_a_request_forged_under_another_id_does_not_move_an_honest_contact() -> None:
    engine = DhtEngine(ident(10))
    honest = ("198.51.100.21", 4000)
    flood(engine, [honest], 1)  # node_id(0) lives there
    for n in range(5):
        request = encode_request(new_message_id(bytes([n]) * 12), PingRequest(node_id=node_id(500 + n)))
        engine.datagram_received(request, honest, 2.0 + n)
        answer_our_pings(engine, honest, node_id(0), 2.1 + n)  # the real node answers with its own id
    assert [c.node_id for c in engine.table.contacts()] == [node_id(0)]


def test_an_address_answering_under_ever_new_ids_replaces_its_contact_at_most_once_a_minute() -> None:
    """Each request under a new id made us ping the address, and each pong replaced its contact: a newcomer (a
    hand-off scan, an identity check) per request, 1,000 in 10 s from one address."""
    engine = DhtEngine(ident(11))
    address = ("198.51.100.30", 4000)
    flood(engine, [address], 1)
    added = 0
    for n in range(1, 300):  # 300 s, a request each second, each answered under its own id
        now = 1.0 + n
        request = encode_request(new_message_id(n.to_bytes(12, "big")), PingRequest(node_id=node_id(n)))
        engine.datagram_received(request, address, now)
        answer_our_pings(engine, address, node_id(n), now + 0.01)
        added += engine.table.holder(address) == node_id(n)
    assert 1 <= added <= 300 // 60 + 1


def test_a_pending_ping_has_not_stalled_while_its_address_is_heard_from() -> None:
    """Two pings to one address, the first lost: the answer to the second put the node in the table, yet lookups
    skipped it until the first timed out, as its stall clock ran from the first ping."""
    engine = DhtEngine(ident(12))
    address = ("198.51.100.31", 4000)
    engine.ping(address, 0.0)
    engine.take_datagrams()  # lost
    engine.ping(address, 0.9)
    answer_our_pings(engine, address, node_id(7), 1.0)
    assert engine.table.holder(address) == node_id(7)
    engine.lookup_nodes(node_id(8), 1.1)
    asked = [to for _, to in engine.take_datagrams()]
    assert address in asked
    assert engine.stats["silent_skipped"] == 0


# -- the table alone ---------------------------------------------------------------------------------------------------


def far(n: int, host: str, port: int = 4000) -> Contact:
    return Contact(node_id=((1 << 159) | n).to_bytes(20, "big"), host=host, port=port)


def test_an_address_holds_one_contact_until_it_answers_a_ping_with_another_id() -> None:
    table = RoutingTable(bytes(20), k=4)
    first, second = far(1, "198.51.100.7"), far(2, "198.51.100.7")
    assert table.observe(first, 0.0) == [ContactAdded(contact=first)]
    assert table.observe(second, 1.0) == []
    assert table.contacts() == [first]
    assert table.observe(second, 2.0, answered_ping=True) == [
        ContactRemoved(contact=first),
        ContactAdded(contact=second),
    ]
    assert table.contacts() == [second]


def test_a_waiting_replacement_whose_host_filled_up_meanwhile_stays_in_the_cache() -> None:
    table = RoutingTable(bytes(20), k=2, max_per_host=1, split_depth_modulus=1)  # the far half never splits
    a, b = far(1, "192.0.2.1"), far(2, "192.0.2.2")
    c, e = far(3, "192.0.2.3"), far(4, "192.0.2.3", 4001)
    for contact in (a, b, c, e):  # c and e wait (bucket full); their host has no contact yet
        table.observe(contact, 0.0)
    assert table.contacts() == [a, b]
    assert table.ping_result(a.node_id, alive=False, now=1.0) == [ContactRemoved(contact=a), ContactAdded(contact=e)]
    assert table.failed(b.node_id, 2.0) == [ContactRemoved(contact=b)]  # c's host is full now: not promoted
    assert table.contacts() == [e]
    [bucket] = [bk for bk in table.buckets() if bk.contacts]
    assert bucket.replacements == (c,)


@settings(max_examples=80, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["observe", "answered", "failed", "dead", "remove"]), st.integers(0, 2**160 - 1)),
        max_size=200,
    )
)
def test_address_and_host_shares_hold_under_any_sequence(ops: list[tuple[str, int]]) -> None:
    table = RoutingTable(bytes(20), k=3, max_per_host=2)
    seen: list[Contact] = []
    for now, (op, value) in enumerate(ops):
        if op in ("observe", "answered") or not seen:
            # Few hosts and ports, so addresses and hosts collide all the time; 127.0.0.1 is not counted.
            host = ("192.0.2.1", "192.0.2.2", "127.0.0.1")[value % 3]
            contact = Contact(node_id=value.to_bytes(20, "big"), host=host, port=1 + (value >> 8) % 3)
            table.observe(contact, float(now), answered_ping=op == "answered")
            seen.append(contact)
            continue
        target = seen[value % len(seen)].node_id
        if op == "failed":
            table.failed(target, float(now))
        elif op == "dead":
            table.ping_result(target, alive=False, now=float(now))
        else:
            table.remove(target)
    contacts = table.contacts()
    assert len({c.address for c in contacts}) == len(contacts)
    per_host = collections.Counter(c.host for c in contacts if c.host != "127.0.0.1")
    assert all(count <= 2 for count in per_host.values())
    assert table._addresses == {c.address: c.node_id for c in contacts}
    assert table._hosts == {f"{h}/32": n for h, n in per_host.items()}


# -- a restart with dead nodes in the saved routing table --------------------------------------------------------------


def test_lookups_skip_an_address_whose_ping_has_stalled_rather_than_wait_for_it_to_time_out() -> None:
    """A restarted node pings the nodes it saved and, once the live ones answered, looks up its own id; the live
    nodes still name the dead ones, and the lookup (and the first publish after it) waited for their timeouts, 2 s
    after the pings that were about to find them dead."""
    net, engines = build_network(6)
    dead = [net.address_of(e) for e in engines[3:]]
    net.dead.update(dead)
    joiner = net.add(50)
    start = net.now
    pings = [joiner.ping(address, net.now) for address in [*dead, net.address_of(engines[0])]]
    assert isinstance(net.wait(joiner, pings[-1]), PingDone)  # the live node answered
    net.now = start + joiner.config.stall_timeout  # nothing is due before: the dead pings time out at start + 2 s
    done = net.wait(joiner, joiner.lookup_nodes(joiner.node_id, net.now))
    assert isinstance(done, LookupDone)
    assert {c.address for c in done.closest} == {net.address_of(e) for e in engines[:3]}
    assert net.now - start < joiner.config.rpc_timeout  # not held by the dead nodes it was still pinging
    assert joiner.stats["silent_skipped"] >= len(dead)
    for op in pings[:-1]:
        event = net.wait(joiner, op)
        assert isinstance(event, PingDone) and event.node_id is None  # they time out as before


async def test_bootstrap_returns_when_no_ping_could_even_go_out() -> None:
    """Pings that cannot be sent (the pending table is full) end at once, inside the first flush: the wait for
    them must not start after they ended (it hung)."""
    config = DhtConfig(max_pending=8, rpc_timeout=20.0, stall_timeout=0.2)
    async with open_dht_node(ident(7), config=config) as node:
        silent = [trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) for _ in range(9)]
        try:
            for sock in silent:
                await sock.bind(("127.0.0.1", 0))
            for sock in silent[:8]:
                node.engine.ping(sock.getsockname(), trio.current_time())  # fill the pending table
            with trio.fail_after(5):
                assert await node.bootstrap([silent[8].getsockname()]) == 0
        finally:
            for sock in silent:
                sock.close()
        assert node.engine.stats["pending_full"] >= 1
        assert node._waiters == {}


def test_a_record_checked_again_keeps_the_network_that_brought_it() -> None:
    """A node checks each record its store took in once more, for its record listener (``verify_record``, source
    "local"): that moved every sample to the "local" network, itself capped at 8, so 20 honest networks' records
    counted as 8 and one host's 8 records signed weeks ahead outweighed them."""
    engine = DhtEngine(ident(8))
    wall = int(time.time())

    def store(signer: Identity, left: int, lifetime: int, source: str) -> None:
        record = PeerRecord(peer_id=signer.peer_id, addrs=(), seq=wall + left - lifetime, expires_at=wall + left)
        key, value = peer_record_key(signer.peer_id), seal_peer_record(signer, record)
        engine._accept_store(key, value, source, 0.0)
        with contextlib.suppress(RecordError):
            engine.verify_record(key, value)  # what DhtNode does for on_record

    for n in range(20):
        store(ident(100 + n), 1800, 3600, f"198.51.{n}.7")
    for n in range(8):
        store(ident(200 + n), 30 * 86_400, 86_400, "203.0.113.9")
    lefts = sorted(left for left, _ in engine.record_lifetimes())
    assert len(lefts) == 28
    assert sum(1 for left in lefts if 1700 <= left <= 1800) == 20

"""The worked example of the chat protocol section is what the code produces (and opens)."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import nacl.bindings
import pytest

from p2pmsg.chat.envelope import MESSAGE_SCHEMA, DirectionMismatchError, EnvelopeSealer
from p2pmsg.chat.events import AckReceived, EnvelopeReceived, HelloReceived
from p2pmsg.chat.invite import format_invite, parse_invite
from p2pmsg.chat.protocol import ChatConnection
from p2pmsg.identity import Identity
from p2pmsg.wire.multiaddr import Multiaddr

DOCS = Path(__file__).resolve().parents[3] / "docs"

ALICE = Identity.from_seed(bytes(range(32)))
BOB = Identity.from_seed(bytes(range(1, 33)))
MESSAGE_ID = bytes(range(0x10, 0x20))
NONCE = bytes(range(0x40, 0x58))
TS = 1_700_000_000_000

SHARED = "c19a5d2a5d91fa6b96bec69fea29aec2ebbf79381b71f52b63e09e8273bd04f3"
ALICE_ID = "00240801122003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
BOB_ID = "00240801122079b5562e8fe654f94078b112e8a98ba7901f853ae695bed7e0e3910bad049664"
INNER = (
    "87a17602a26964c410101112131415161718191a1b1c1d1e1f"
    "a466726f6dc426" + ALICE_ID + "a2746fc426" + BOB_ID + "a27473cf0000018bcfe56800a46b696e64a474657874a474657874a26869"
)
BOX = (
    "d5a65ccfd33857501e277e340c1591c431a6d37ed7ac018d8aed3b2c45033a429821f552ef33524e59c8d4642c8e2ad2799ef3db21f5355270"
    "cbd347ed08b585bfbcb664beadd51b3a8112216953e48524096485a7317dfd12700deb58c7f7b609926179a9cf36dc699392cb84efa5b8a59d"
    "ecb5c0a69fa87ce9a9aab70af21aae0ffd6fb4505f78ce2dd6d22fb7d065f4811fe83b306e78816418fde6ee0f"
)
ENVELOPE = (
    "86a17601a26964c410101112131415161718191a1b1c1d1e1fa466726f6dc426"
    + ALICE_ID
    + "a2746fc426"
    + BOB_ID
    + "a56e6f6e6365"
    "c418404142434445464748494a4b4c4d4e4f5051525354555657a3626f78c49f" + BOX
)
HELLO = "0000001882a17601a570726f746fad7032706d73672f636861742f31"
MSG_HEADER = "0000014783a17601a174a36d7367a3656e76c50136"
ACK = "0000002183a17601a174a361636ba369647391c410101112131415161718191a1b1c1d1e1f"
INVITE = (
    "p2pmsg://invite/12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"
    "?addr=%2Fip4%2F192.0.2.7%2Ftcp%2F4001&addr=%2Fip6%2F2001%3Adb8%3A%3A1%2Ftcp%2F443%2Fws"
)


def test_example_bytes() -> None:
    assert str(ALICE.peer_id) == "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"
    assert str(BOB.peer_id) == "12D3KooWJ1TsijH7H5F74hfAD5XishQz3sxrmAtVY37GtNd9CqYf"
    assert ALICE.x25519_public_key.hex() == "4701d08488451f545a409fb58ae3e58581ca40ac3f7f114698cd71deac73ca01"
    assert BOB.x25519_public_key.hex() == "4a3807d064d077181cc070989e76891d20dca5559548dc2c77c1a50273882b38"
    assert nacl.bindings.crypto_box_beforenm(BOB.x25519_public_key, bytes(ALICE.x25519_private_key)).hex() == SHARED
    assert ALICE.peer_id.to_bytes().hex() == ALICE_ID and BOB.peer_id.to_bytes().hex() == BOB_ID
    inner = MESSAGE_SCHEMA.encode(
        {
            "v": 2,
            "id": MESSAGE_ID,
            "from": ALICE.peer_id.to_bytes(),
            "to": BOB.peer_id.to_bytes(),
            "ts": TS,
            "kind": "text",
            "text": "hi",
        }
    )
    assert inner.hex() == INNER and len(inner) == 143
    sealed = EnvelopeSealer(ALICE).seal(BOB.peer_id, "hi", ts=TS, message_id=MESSAGE_ID, nonce=NONCE)
    assert sealed.box.hex() == BOX and len(sealed.box) == 159
    assert nacl.bindings.crypto_box_open_afternm(sealed.box, NONCE, bytes.fromhex(SHARED)).hex() == INNER
    assert sealed.raw.hex() == ENVELOPE and len(sealed.raw) == 310

    alice, bob = ChatConnection(), ChatConnection()
    wire = alice.send_hello() + alice.send_messages([sealed])
    assert wire.hex() == HELLO + MSG_HEADER + ENVELOPE
    hello, received = bob.receive_data(wire)
    assert isinstance(hello, HelloReceived) and isinstance(received, EnvelopeReceived)
    assert EnvelopeSealer(BOB).open(received.envelope).text == "hi"
    bob.send_hello()
    ack = bob.send_ack([MESSAGE_ID])
    assert ack.hex() == ACK
    assert alice.receive_data(bytes.fromhex(HELLO) + ack)[1] == AckReceived(ids=(MESSAGE_ID,))

    addrs = [Multiaddr.parse("/ip4/192.0.2.7/tcp/4001"), Multiaddr.parse("/ip6/2001:db8::1/tcp/443/ws")]
    assert format_invite(ALICE.peer_id, addrs) == INVITE
    assert parse_invite(INVITE).addrs == tuple(addrs)


def test_example_reflected_is_refused() -> None:
    """The example envelope with from and to swapped opens at Alice's key but is refused by the inner ``from``."""
    fields = msgpack.unpackb(bytes.fromhex(ENVELOPE), raw=False)
    fields["from"], fields["to"] = fields["to"], fields["from"]
    with pytest.raises(DirectionMismatchError) as info:
        EnvelopeSealer(ALICE).open(msgpack.packb(fields, use_bin_type=True))
    assert info.value.field == "message.from"


def _document() -> str:
    text = (DOCS / "protocol.md").read_text()
    assert "p2pmsg/chat/1" in text, "the chat section is missing from docs/protocol.md"
    return text


def test_document_shows_these_bytes() -> None:
    text = _document()
    flat = "".join(text.split()).replace("…", "")
    for snippet in (SHARED, BOX, INVITE, ALICE_ID, BOB_ID, "d5a65ccf", "0000018bcfe56800"):
        assert snippet in flat, snippet
    assert "00000018 82 a17601 a5 70726f746f ad 7032706d73672f636861742f31" in text
    assert "00000147 83 a17601 a174 a3 6d7367 a3 656e76 c5 0136" in text
    assert "00000021 83 a17601 a174 a3 61636b a3 696473 91 c4 10 101112131415161718191a1b1c1d1e1f" in text


def _listing_hex(text: str, title: str) -> str:
    """The hex bytes of the listing that follows ``title`` in the document: each line's leading hex tokens."""
    start = text.index(title)
    block = text[text.index("```\n", start) + 4 :]
    block = block[: block.index("```")]
    out = []
    for line in block.splitlines():
        for token in line.split():
            if not re.fullmatch(r"(?:[0-9a-f]{2})+(?:\.\.\.[0-9a-f]{4})?", token):
                break
            out.append(token)
    return "".join(out)


def test_document_listings_are_these_bytes() -> None:
    """The annotated Message and Envelope listings of section 6.7, read byte by byte, are the example's bytes."""
    text = _document()
    assert _listing_hex(text, "The plaintext `Message` (143 bytes):") == INNER
    envelope = _listing_hex(text, "The `Envelope` (310 bytes):")
    assert envelope == ENVELOPE.replace(BOX, "d5a65ccf...ee0f")

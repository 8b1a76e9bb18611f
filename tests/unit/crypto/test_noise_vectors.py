"""Known-answer tests: every Noise_XX_25519_ChaChaPoly_* vector in ../shared/vectors, all messages."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import load_vectors

from p2pmsg.crypto.noise import HandshakeState, HandshakeStatus

VECTOR_FILE = "noise-xx-25519-chachapoly.json"
HANDSHAKE_MESSAGES = 3


def _vectors() -> list[Any]:
    return list(load_vectors(VECTOR_FILE)["vectors"])


# The file is read inside each test (so a missing file skips with a reason instead of breaking collection).
@pytest.mark.parametrize("index", range(8), ids=lambda i: f"vector{i}")
def test_vector(index: int) -> None:
    vectors = _vectors()
    assert len(vectors) == 8, "the vector file should hold eight XX vectors"
    vector = vectors[index]
    assert not vector.get("init_psks") and not vector.get("resp_psks")
    initiator = HandshakeState(
        initiator=True,
        protocol_name=vector["protocol_name"],
        prologue=bytes.fromhex(vector["init_prologue"]),
        static_private=bytes.fromhex(vector["init_static"]),
        ephemeral_private=bytes.fromhex(vector["init_ephemeral"]),
    )
    responder = HandshakeState(
        initiator=False,
        protocol_name=vector["protocol_name"],
        prologue=bytes.fromhex(vector["resp_prologue"]),
        static_private=bytes.fromhex(vector["resp_static"]),
        ephemeral_private=bytes.fromhex(vector["resp_ephemeral"]),
    )
    messages = vector["messages"]
    assert len(messages) > HANDSHAKE_MESSAGES, "vectors must include transport messages"
    for i, message in enumerate(messages):
        payload = bytes.fromhex(message["payload"])
        expected = bytes.fromhex(message["ciphertext"])
        sender, receiver = (initiator, responder) if i % 2 == 0 else (responder, initiator)
        if i < HANDSHAKE_MESSAGES:
            assert sender.status is HandshakeStatus.SEND and receiver.status is HandshakeStatus.RECEIVE
            ciphertext = sender.write_message(payload)
            assert ciphertext == expected, f"message {i}"
            assert receiver.read_message(ciphertext) == payload, f"message {i}"
        else:
            ciphertext = sender.transport().encrypt(payload)
            assert ciphertext == expected, f"transport message {i}"
            assert receiver.transport().decrypt(ciphertext) == payload, f"transport message {i}"
    assert initiator.is_complete and responder.is_complete
    assert initiator.handshake_hash == responder.handshake_hash
    if "handshake_hash" in vector:
        assert initiator.handshake_hash == bytes.fromhex(vector["handshake_hash"])
    assert initiator.remote_static == responder.static_public
    assert responder.remote_static == initiator.static_public

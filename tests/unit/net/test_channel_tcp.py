"""SecureChannel over real TCP sockets on 127.0.0.1."""

from __future__ import annotations

import hashlib

import trio
import trio.testing

from p2pmsg.identity import Identity
from p2pmsg.net.channel import HandshakeError, PeerIdMismatchError, SecureChannel, secure_inbound, secure_outbound

ALICE = Identity.from_seed(bytes([0xA1]) * 32)
BOB = Identity.from_seed(bytes([0xB0]) * 32)
MALLORY = Identity.from_seed(bytes([0x3A]) * 32)


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            accepted: list[trio.SocketStream] = []

            async def accept() -> None:
                accepted.append(await listeners[0].accept())

            nursery.start_soon(accept)
            client = await trio.open_tcp_stream("127.0.0.1", port)
        return client, accepted[0]
    finally:
        for listener in listeners:
            await listener.aclose()


async def tcp_secure_pair() -> tuple[SecureChannel, SecureChannel]:
    client_stream, server_stream = await _tcp_pair()
    channels: dict[str, SecureChannel] = {}

    async def outbound() -> None:
        channels["client"] = await secure_outbound(client_stream, ALICE, BOB.peer_id)

    async def inbound() -> None:
        channels["server"] = await secure_inbound(server_stream, BOB)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbound)
        nursery.start_soon(inbound)
    return channels["client"], channels["server"]


async def test_check_two_way_stream_over_tcp() -> None:
    await trio.testing.check_two_way_stream(tcp_secure_pair, None)


async def test_bulk_transfer_both_ways_over_tcp() -> None:
    client, server = await tcp_secure_pair()
    blob = hashlib.shake_256(b"p2pmsg").digest(4 * 1024 * 1024)
    chunk = 64 * 1024

    async def send(channel: SecureChannel, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            await channel.send_all(view[start : start + chunk])

    async def receive(channel: SecureChannel, expected: bytes) -> None:
        digest = hashlib.sha256()
        received = 0
        while received < len(expected):
            data = await channel.receive_some()
            assert data
            digest.update(data)
            received += len(data)
        assert received == len(expected)
        assert digest.digest() == hashlib.sha256(expected).digest()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, client, blob)
        nursery.start_soon(send, server, blob[::-1])
        nursery.start_soon(receive, server, blob)
        nursery.start_soon(receive, client, blob[::-1])
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


async def test_wrong_peer_over_tcp() -> None:
    client_stream, server_stream = await _tcp_pair()
    errors: dict[str, BaseException] = {}

    async def outbound() -> None:
        try:
            await secure_outbound(client_stream, ALICE, BOB.peer_id)
        except HandshakeError as exc:
            errors["client"] = exc

    async def inbound() -> None:
        try:
            await secure_inbound(server_stream, MALLORY)
        except HandshakeError as exc:
            errors["server"] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbound)
        nursery.start_soon(inbound)
    assert isinstance(errors["client"], PeerIdMismatchError)
    assert isinstance(errors["server"], HandshakeError)
    assert not isinstance(errors["server"], PeerIdMismatchError)

"""WebSocketStream: the trio Stream contract over a real loopback WebSocket, limits, close mapping, cleanup."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
import trio_websocket

from p2pmsg.net.websocket import (
    WS_MAX_MESSAGE_SIZE,
    WebSocketStream,
    WebSocketUpgradeError,
    accept_websocket_stream,
    connect_websocket_stream,
)


class TcpPairs:
    """Hands out connected loopback TCP stream pairs from one listener."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self.listener = listener
        self.port: int = listener.socket.getsockname()[1]

    async def pair(self) -> tuple[trio.SocketStream, trio.SocketStream]:
        client = await trio.open_tcp_stream("127.0.0.1", self.port)
        server = await self.listener.accept()
        return client, server


@pytest.fixture
async def tcp_pairs() -> AsyncIterator[TcpPairs]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        yield TcpPairs(listener)


async def ws_pair(nursery: trio.Nursery, pairs: TcpPairs) -> tuple[WebSocketStream, WebSocketStream]:
    client_tcp, server_tcp = await pairs.pair()
    accepted: list[WebSocketStream] = []

    async def server_side() -> None:
        accepted.append(await accept_websocket_stream(nursery, server_tcp))

    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            inner.start_soon(server_side)
            client = await connect_websocket_stream(nursery, client_tcp, host_header=f"127.0.0.1:{pairs.port}")
    return client, accepted[0]


async def test_passes_check_two_way_stream(tcp_pairs: TcpPairs) -> None:
    async with trio.open_nursery() as nursery:

        async def maker() -> tuple[trio.abc.Stream, trio.abc.Stream]:
            return await ws_pair(nursery, tcp_pairs)

        await trio.testing.check_two_way_stream(maker, None)
        # Every stream the check made was closed, so every reader host task must have ended on its own.
        with trio.fail_after(5):
            while nursery.child_tasks:
                await trio.sleep(0.01)


async def test_large_send_is_cut_into_bounded_messages(tcp_pairs: TcpPairs) -> None:
    async with trio.open_nursery() as nursery:
        client, server = await ws_pair(nursery, tcp_pairs)
        payload = bytes(range(256)) * 1024  # 256 KiB: more than three maximum-size messages
        sizes: list[int] = []

        async def receive_all() -> bytes:
            got = bytearray()
            while len(got) < len(payload):
                chunk = await server.receive_some()
                sizes.append(len(chunk))
                got += chunk
            return bytes(got)

        async with trio.open_nursery() as inner:
            inner.start_soon(client.send_all, payload)
            received = await receive_all()
        assert received == payload
        assert max(sizes) == WS_MAX_MESSAGE_SIZE
        assert len(sizes) == -(-len(payload) // WS_MAX_MESSAGE_SIZE)
        await client.aclose()
        await server.aclose()


async def test_receive_some_respects_max_bytes_and_keeps_the_rest(tcp_pairs: TcpPairs) -> None:
    async with trio.open_nursery() as nursery:
        client, server = await ws_pair(nursery, tcp_pairs)
        await client.send_all(b"hello world")
        assert await server.receive_some(5) == b"hello"
        assert await server.receive_some(1) == b" "
        assert await server.receive_some() == b"world"
        await client.aclose()
        assert await server.receive_some() == b""
        assert await server.receive_some() == b""  # EOF is sticky
        await server.aclose()


async def test_data_sent_before_close_is_still_read_after_a_failed_send(tcp_pairs: TcpPairs) -> None:
    """A send failing because the peer closed must not hide the data the peer sent before its Close."""
    async with trio.open_nursery() as nursery:
        client, server = await ws_pair(nursery, tcp_pairs)
        await client.send_all(b"last words")
        async with trio.open_nursery() as closer:
            closer.start_soon(client.aclose)
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                while True:  # bounded by fail_after: the Close arrives within milliseconds
                    await server.send_all(b"x")
                    await trio.sleep(0.001)
        assert await server.receive_some() == b"last words"
        assert await server.receive_some() == b""
        await server.aclose()


async def test_oversized_message_closes_with_1009_and_breaks_the_stream(
    tcp_pairs: TcpPairs, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that ignores the limit: trio-websocket answers Close 1009 and our stream reports it as broken."""
    async with trio.open_nursery() as nursery:
        client_tcp, server_tcp = await tcp_pairs.pair()
        accepted: list[WebSocketStream] = []

        async def server_side() -> None:
            accepted.append(await accept_websocket_stream(nursery, server_tcp))

        nursery.start_soon(server_side)
        # A raw trio-websocket client with the library's 1 MiB default limit, i.e. not ours.
        rogue = await trio_websocket.wrap_client_stream(nursery, client_tcp, "127.0.0.1", "/")
        with trio.fail_after(5):
            while not accepted:
                await trio.sleep(0.01)
        server = accepted[0]
        await rogue.send_message(b"x" * WS_MAX_MESSAGE_SIZE)  # exactly at the limit: fine
        got = 0
        while got < WS_MAX_MESSAGE_SIZE:
            got += len(await server.receive_some())
        await rogue.send_message(b"y" * (WS_MAX_MESSAGE_SIZE + 1))
        with pytest.raises(trio.BrokenResourceError, match="1009"), trio.fail_after(5):
            await server.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"after")
        with trio.fail_after(5):
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await rogue.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == 1009
        await server.aclose()
        # trio-websocket leaves the TCP socket open after a 1009; our aclose must have closed it.
        assert server.transport_stream is not None
        with pytest.raises(trio.ClosedResourceError):
            await server.transport_stream.send_all(b"z")
        await rogue.aclose()
        await client_tcp.aclose()


async def test_text_message_breaks_the_stream(tcp_pairs: TcpPairs) -> None:
    async with trio.open_nursery() as nursery:
        client_tcp, server_tcp = await tcp_pairs.pair()
        accepted: list[WebSocketStream] = []

        async def server_side() -> None:
            accepted.append(await accept_websocket_stream(nursery, server_tcp))

        nursery.start_soon(server_side)
        rogue = await trio_websocket.wrap_client_stream(nursery, client_tcp, "127.0.0.1", "/")
        with trio.fail_after(5):
            while not accepted:
                await trio.sleep(0.01)
        server = accepted[0]
        await rogue.send_message("a text message")
        with pytest.raises(trio.BrokenResourceError, match="text message"):
            await server.receive_some()
        await server.aclose()
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as info:
            await rogue.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == 1003
        await rogue.aclose()
        await client_tcp.aclose()


async def test_empty_binary_messages_are_ignored(tcp_pairs: TcpPairs) -> None:
    async with trio.open_nursery() as nursery:
        client_tcp, server_tcp = await tcp_pairs.pair()
        accepted: list[WebSocketStream] = []

        async def server_side() -> None:
            accepted.append(await accept_websocket_stream(nursery, server_tcp))

        nursery.start_soon(server_side)
        rogue = await trio_websocket.wrap_client_stream(nursery, client_tcp, "127.0.0.1", "/")
        with trio.fail_after(5):
            while not accepted:
                await trio.sleep(0.01)
        server = accepted[0]
        for _ in range(3):
            await rogue.send_message(b"")
        await rogue.send_message(b"data")
        with trio.fail_after(5):
            assert await server.receive_some() == b"data"
        await server.aclose()
        await rogue.aclose()
        await client_tcp.aclose()


async def test_wrong_path_is_rejected_with_404(tcp_pairs: TcpPairs) -> None:
    async with trio.open_nursery() as nursery:
        client_tcp, server_tcp = await tcp_pairs.pair()
        errors: list[BaseException] = []

        async def server_side() -> None:
            try:
                await accept_websocket_stream(nursery, server_tcp)
            except WebSocketUpgradeError as exc:
                errors.append(exc)

        nursery.start_soon(server_side)
        with trio.fail_after(5), pytest.raises(WebSocketUpgradeError, match="404"):
            await connect_websocket_stream(nursery, client_tcp, host_header="x", path="/other")
        with trio.fail_after(5):
            while not errors:
                await trio.sleep(0.01)
        assert "path" in str(errors[0])
        # Both failed upgrades closed their TCP streams.
        with pytest.raises(trio.ClosedResourceError):
            await client_tcp.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await server_tcp.send_all(b"x")


async def test_client_upgrade_fails_fast_when_server_hangs_up(tcp_pairs: TcpPairs) -> None:
    """No upgrade response, TCP closed: the upgrade must fail at once, not wait for a timeout."""
    async with trio.open_nursery() as nursery:
        client_tcp, server_tcp = await tcp_pairs.pair()

        async def rude_server() -> None:
            await server_tcp.receive_some(4096)  # read the HTTP request, answer nothing
            await server_tcp.aclose()

        nursery.start_soon(rude_server)
        with trio.fail_after(5), pytest.raises(WebSocketUpgradeError, match="ended"):
            await connect_websocket_stream(nursery, client_tcp, host_header="x")
        # The failed upgrade closed our TCP stream and left no task behind.
        with pytest.raises(trio.ClosedResourceError):
            await client_tcp.send_all(b"x")
        with trio.fail_after(5):
            while nursery.child_tasks:
                await trio.sleep(0.01)


async def test_server_upgrade_fails_on_garbage_request(tcp_pairs: TcpPairs) -> None:
    async with trio.open_nursery() as nursery:
        client_tcp, server_tcp = await tcp_pairs.pair()
        await client_tcp.send_all(b"\x16\x03\x01 this is not an HTTP request\r\n\r\n")
        with trio.fail_after(5), pytest.raises(WebSocketUpgradeError):
            await accept_websocket_stream(nursery, server_tcp)
        with trio.fail_after(5):
            reply = await client_tcp.receive_some(4096)
            while reply and b"\r\n\r\n" not in reply:
                more = await client_tcp.receive_some(4096)
                if not more:
                    break
                reply += more
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4")
        await client_tcp.aclose()


async def test_server_upgrade_fails_fast_when_client_hangs_up(tcp_pairs: TcpPairs) -> None:
    async with trio.open_nursery() as nursery:
        client_tcp, server_tcp = await tcp_pairs.pair()
        await client_tcp.send_all(b"GET / HTTP/1.1\r\n")  # half a request line, then gone
        await client_tcp.aclose()
        with trio.fail_after(5), pytest.raises(WebSocketUpgradeError):
            await accept_websocket_stream(nursery, server_tcp)


async def test_cancelling_the_owner_nursery_stops_the_reader(tcp_pairs: TcpPairs) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            client, server = await ws_pair(nursery, tcp_pairs)
            await client.send_all(b"ping")
            assert await server.receive_some() == b"ping"
            nursery.cancel_scope.cancel()
    # Reader tasks were cancelled with the nursery; closing afterwards is still clean and idempotent.
    await client.aclose()
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()


async def test_peer_vanishing_is_broken_not_eof(tcp_pairs: TcpPairs, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        client, server = await ws_pair(nursery, tcp_pairs)
        # Cut the TCP connection under the client without a WebSocket Close frame.
        await client.transport_stream.aclose()
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError, match="1006"):
            await server.receive_some()
        await client.aclose()
        await server.aclose()

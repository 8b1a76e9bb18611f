"""Transports: multiaddr shapes, TCP and WebSocket connects over loopback, listening helpers."""

from __future__ import annotations

import itertools
import socket as stdlib_socket

import pytest
import trio
import trio.testing

from p2pmsg.errors import LocalProtocolError
from p2pmsg.net.transport import (
    TransportError,
    TransportTimeoutError,
    UnsupportedAddressError,
    open_listeners,
    open_stream,
    parse_transport_address,
    remote_multiaddr,
    tcp_send_progress,
)
from p2pmsg.net.websocket import WebSocketStream, accept_websocket_stream
from p2pmsg.wire.multiaddr import Multiaddr

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def ma(text: str) -> Multiaddr:
    return Multiaddr.parse(text)


def _has_ipv6_loopback() -> bool:
    try:
        with stdlib_socket.socket(stdlib_socket.AF_INET6, stdlib_socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("text", "kind", "family", "host", "port"),
    [
        ("/ip4/127.0.0.1/tcp/4001", "tcp", "ip4", "127.0.0.1", 4001),
        ("/ip4/10.0.0.1/tcp/0/ws", "ws", "ip4", "10.0.0.1", 0),
        ("/ip6/::1/tcp/443/ws", "ws", "ip6", "::1", 443),
        ("/dns4/example.org/tcp/80/ws", "ws", "dns4", "example.org", 80),
        ("/dns6/example.org/tcp/4001", "tcp", "dns6", "example.org", 4001),
        (f"/ip4/192.0.2.7/tcp/4001/p2p/{PEER}", "tcp", "ip4", "192.0.2.7", 4001),
        (f"/ip4/192.0.2.7/tcp/4001/ws/p2p/{PEER}", "ws", "ip4", "192.0.2.7", 4001),
    ],
)
def test_parse_supported_shapes(text: str, kind: str, family: str, host: str, port: int) -> None:
    address = parse_transport_address(ma(text))
    assert (address.kind, address.family, address.host, address.port) == (kind, family, host, port)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("/ip4/127.0.0.1/udp/4001", "only /tcp"),
        (f"/dns6/example.org/udp/53/p2p/{PEER}", "only /tcp"),
        (f"/p2p/{PEER}", "needs a host"),
    ],
)
def test_parse_rejects_other_shapes_naming_the_component(text: str, needle: str) -> None:
    with pytest.raises(UnsupportedAddressError, match=needle) as info:
        parse_transport_address(ma(text))
    assert str(ma(text)) in str(info.value)  # the message names the address


def test_host_header() -> None:
    assert parse_transport_address(ma("/ip6/::1/tcp/8080/ws")).host_header() == "[::1]:8080"
    assert parse_transport_address(ma("/dns4/example.org/tcp/80/ws")).host_header() == "example.org"
    assert parse_transport_address(ma("/ip4/127.0.0.1/tcp/81/ws")).host_header() == "127.0.0.1:81"


async def test_tcp_connect_sets_nodelay_and_carries_bytes() -> None:
    (bound,) = await open_listeners([ma("/ip4/127.0.0.1/tcp/0")])
    async with bound.listener:
        port = bound.listener.socket.getsockname()[1]
        assert bound.addr == ma(f"/ip4/127.0.0.1/tcp/{port}")
        assert bound.kind == "tcp"
        client = await open_stream(bound.addr, timeout=5)
        server = await bound.listener.accept()
        async with client, server:
            assert isinstance(client, trio.SocketStream)
            assert client.socket.getsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY) != 0
            await client.send_all(b"over tcp")
            assert await server.receive_some() == b"over tcp"
            observed = remote_multiaddr(server, "tcp")
            assert observed == ma(f"/ip4/127.0.0.1/tcp/{client.socket.getsockname()[1]}")


async def test_dns4_localhost_resolves_and_connects() -> None:
    (bound,) = await open_listeners([ma("/ip4/127.0.0.1/tcp/0")])
    async with bound.listener:
        port = bound.listener.socket.getsockname()[1]
        client = await open_stream(ma(f"/dns4/localhost/tcp/{port}"), timeout=5)
        server = await bound.listener.accept()
        async with client, server:
            await server.send_all(b"resolved")
            assert await client.receive_some() == b"resolved"


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_ip6_loopback() -> None:
    (bound,) = await open_listeners([ma("/ip6/::1/tcp/0")])
    async with bound.listener:
        assert str(bound.addr).startswith("/ip6/::1/tcp/")
        client = await open_stream(bound.addr, timeout=5)
        server = await bound.listener.accept()
        async with client, server:
            await client.send_all(b"v6")
            assert await server.receive_some() == b"v6"
            assert str(remote_multiaddr(server, "ws")).endswith("/ws")


async def test_connection_refused_names_the_address() -> None:
    (bound,) = await open_listeners([ma("/ip4/127.0.0.1/tcp/0")])
    addr = bound.addr
    await bound.listener.aclose()  # nothing listens there any more
    with pytest.raises(TransportError, match=str(addr)) as info:
        await open_stream(addr, timeout=5)
    assert not isinstance(info.value, TransportTimeoutError)


async def test_unresolvable_name_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match="resolve"):
        await open_stream(ma("/dns4/no-such-host.invalid/tcp/4001"), timeout=5)


async def test_unsupported_or_bad_arguments() -> None:
    with pytest.raises(UnsupportedAddressError, match="port 0"):
        await open_stream(ma("/ip4/127.0.0.1/tcp/0"), timeout=1)
    with pytest.raises(LocalProtocolError, match="nursery"):
        await open_stream(ma("/ip4/127.0.0.1/tcp/9/ws"), timeout=1)
    with pytest.raises(LocalProtocolError, match="timeout"):
        await open_stream(ma("/ip4/127.0.0.1/tcp/9"), timeout=0)


async def test_websocket_connect_and_exchange() -> None:
    (bound,) = await open_listeners([ma("/ip4/127.0.0.1/tcp/0/ws")])
    assert bound.kind == "ws"
    assert str(bound.addr).endswith("/ws")
    async with bound.listener, trio.open_nursery() as nursery:
        accepted: list[WebSocketStream] = []

        async def serve_one() -> None:
            raw = await bound.listener.accept()
            accepted.append(await accept_websocket_stream(nursery, raw))

        nursery.start_soon(serve_one)
        client = await open_stream(bound.addr, timeout=5, nursery=nursery)
        assert isinstance(client, WebSocketStream)
        with trio.fail_after(5):
            while not accepted:
                await trio.sleep(0.01)
        server = accepted[0]
        await client.send_all(b"over websocket")
        assert await server.receive_some() == b"over websocket"
        await client.aclose()
        assert await server.receive_some() == b""
        await server.aclose()


async def test_websocket_upgrade_timeout_closes_the_socket() -> None:
    """A server that accepts TCP but never answers the upgrade: TransportTimeoutError, and the socket is closed."""
    (bound,) = await open_listeners([ma("/ip4/127.0.0.1/tcp/0/ws")])
    async with bound.listener, trio.open_nursery() as nursery:
        with pytest.raises(TransportTimeoutError, match=r"0\.3 s"):
            await open_stream(bound.addr, timeout=0.3, nursery=nursery)
        server = await bound.listener.accept()
        with trio.fail_after(5):
            data = b""
            while chunk := await server.receive_some(4096):
                data += chunk
        assert data.startswith(b"GET / HTTP/1.1")  # the request went out, then our side hung up
        await server.aclose()
        assert not nursery.child_tasks  # the WebSocket host task is gone too


async def test_websocket_upgrade_to_a_non_websocket_server_fails() -> None:
    (bound,) = await open_listeners([ma("/ip4/127.0.0.1/tcp/0")])
    async with bound.listener, trio.open_nursery() as nursery:

        async def http_server() -> None:
            server = await bound.listener.accept()
            async with server:
                await server.receive_some(4096)
                await server.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await server.receive_some(4096)

        nursery.start_soon(http_server)
        port = bound.listener.socket.getsockname()[1]
        with pytest.raises(TransportError, match="403"):
            await open_stream(ma(f"/ip4/127.0.0.1/tcp/{port}/ws"), timeout=5, nursery=nursery)


async def test_open_listeners_reports_ports_and_cleans_up_on_failure() -> None:
    bound = await open_listeners([ma("/ip4/127.0.0.1/tcp/0"), ma("/ip4/127.0.0.1/tcp/0/ws")])
    try:
        ports = [item.listener.socket.getsockname()[1] for item in bound]
        assert all(port != 0 for port in ports)
        assert [str(item.addr) for item in bound] == [
            f"/ip4/127.0.0.1/tcp/{ports[0]}",
            f"/ip4/127.0.0.1/tcp/{ports[1]}/ws",
        ]
        # A second bind of a port in use fails, and the listener opened before it in the same call is closed.
        with pytest.raises(TransportError, match=f"cannot listen on /ip4/127.0.0.1/tcp/{ports[0]}"):
            await open_listeners([ma("/ip4/127.0.0.1/tcp/0"), ma(f"/ip4/127.0.0.1/tcp/{ports[0]}")])
    finally:
        for item in bound:
            await item.listener.aclose()
    # The ports are free again.
    again = await open_listeners([ma(f"/ip4/127.0.0.1/tcp/{ports[0]}")])
    await again[0].listener.aclose()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("/dns4/localhost/tcp/0", "needs an ip4 or ip6 address"),
        (f"/ip4/127.0.0.1/tcp/0/p2p/{PEER}", "no /p2p"),
        ("/ip4/127.0.0.1/udp/0", "only /tcp"),
    ],
)
async def test_open_listeners_rejects(text: str, needle: str) -> None:
    with pytest.raises(UnsupportedAddressError, match=needle):
        await open_listeners([ma(text)])


async def test_tcp_send_progress_follows_what_the_peer_takes() -> None:
    """A write that waits for a slow reader: the bytes the reader's TCP acknowledged grow as it reads, while some
    stay queued; a stream that is not a socket cannot tell."""
    listener = trio.socket.socket()
    listener.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, 4096)  # a small window: the queue stays
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = await open_stream(ma(f"/ip4/127.0.0.1/tcp/{listener.getsockname()[1]}"), timeout=5)
    reader, _ = await listener.accept()
    seen = []
    async with client, trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"x" * 1_000_000)
        for _ in range(4):
            await trio.sleep(0.05)
            progress = tcp_send_progress(client)
            assert progress is not None
            seen.append(progress)
            await reader.recv(20_000)
        nursery.cancel_scope.cancel()
    reader.close()
    listener.close()
    acknowledged = [a for a, _ in seen]
    assert all(earlier < later for earlier, later in itertools.pairwise(acknowledged)), seen
    assert all(queued > 0 for _, queued in seen), seen
    left, _ = trio.testing.memory_stream_pair()
    assert tcp_send_progress(left) is None

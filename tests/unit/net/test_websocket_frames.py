"""The small-frame budget of WebSocket connections: FrameMeter's header walk, and a flood cut off for real."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import AsyncIterator

import pytest
import trio
from test_websocket_stream import TcpPairs, ws_pair

from p2pmsg.net.websocket import (
    WS_MAX_FRAGMENTS,
    WS_MAX_PIECES,
    WS_SMALL_FRAME,
    FrameMeter,
    WebSocketUpgradeError,
    accept_websocket_stream,
)
from p2pmsg.ratelimit import RateLimiter

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One RFC 6455 frame (the mask is random; FrameMeter never unmasks)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 65536:
        head += bytes([mask_bit | 126]) + struct.pack(">H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", size)
    return head + (os.urandom(4) if masked else b"") + payload


LONG_PAYLOAD = b"z" * 70000
FRAMES = (
    frame(0x2, b"x" * 60)  # small: an ack-sized message
    + frame(0x2, b"y" * WS_SMALL_FRAME)  # not small
    + frame(0x2, LONG_PAYLOAD, masked=False)  # the 8-byte length form, not small
    + frame(0x9, b"")  # a ping is small
    + frame(0x2, b"", fin=False)
    + frame(0x0, b"", fin=False)
    + frame(0x0, b"w" * 300)  # the 2-byte length form, still small
)
SMALL_IN_FRAMES = 5


def chunks(data: bytes, cut: int) -> list[bytes]:
    """``data`` in chunks of ``cut`` bytes, except the long payload of FRAMES, which stays whole: a payload trickled
    in more than WS_MAX_PIECES reads is a violation of its own."""
    start = data.find(LONG_PAYLOAD)
    end = start + len(LONG_PAYLOAD)
    head, tail = data[:start], data[end:]
    return (
        [head[i : i + cut] for i in range(0, len(head), cut)]
        + [data[start:end]]
        + [tail[i : i + cut] for i in range(0, len(tail), cut)]
    )


RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


def test_a_server_meter_counts_from_its_answer_and_refuses_bytes_before_it() -> None:
    """A client waits for the 101; wsproto drops what comes before it, or parses it as frames if it races our
    answer.  The meter refuses it (a fake frame header announcing 2**62 bytes would otherwise blind it)."""
    meter = FrameMeter(client=False)
    assert meter.feed(UPGRADE) == 0 and meter.violation is None
    meter.response_sent()
    assert meter.feed(FRAMES) == SMALL_IN_FRAMES
    for cut in (1, 2, 3, 7, 64):  # any split of the same bytes gives the same count
        meter = FrameMeter(client=False)
        meter.feed(UPGRADE)
        meter.response_sent()
        total = sum(meter.feed(chunk) for chunk in chunks(FRAMES, cut))
        assert total == meter.small_frames == SMALL_IN_FRAMES, cut
    for early in ([UPGRADE + b"\x82\xff"], [UPGRADE, b"\x82"]):  # with the request, or after it
        meter = FrameMeter(client=False)
        for chunk in early:
            meter.feed(chunk)
        assert meter.violation is not None and "before the WebSocket upgrade was answered" in meter.violation
        meter.response_sent()
        assert meter.feed(FRAMES) == 0


@pytest.mark.parametrize(
    "response",
    [RESPONSE, RESPONSE.replace(b"\r\n", b"\n"), RESPONSE[:-2] + b"\n"],
    ids=["crlf", "bare-lf", "mixed"],
)
def test_a_client_meter_counts_right_after_the_blank_line_that_ends_a_101(response: bytes) -> None:
    """h11 ends the head at the first \\n\\r?\\n; frames that came in the same chunk as the response count."""
    for cut in (1, 2, 3, len(response) + len(FRAMES)):
        meter = FrameMeter(client=True)
        stream = response + FRAMES
        total = sum(meter.feed(chunk) for chunk in chunks(stream, cut))
        assert total == SMALL_IN_FRAMES, cut


def test_a_client_meter_counts_nothing_after_a_refused_upgrade_and_keeps_its_body_short() -> None:
    meter = FrameMeter(client=True)
    assert meter.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n" + frame(0x2, b"")) == 0
    assert meter.violation is None
    meter.feed(b"x" * 4096)  # a hostile server's endless body: trio-websocket would keep it all
    assert meter.violation is not None and "refused the upgrade" in meter.violation


def test_the_meter_handles_payloads_spanning_chunks() -> None:
    meter = FrameMeter(client=False)
    meter.response_sent()
    big = frame(0x2, b"q" * 5000)
    assert big[1] & 0x7F == 126
    assert meter.feed(big[:100]) == 0 and meter.feed(big[100:]) == 0
    assert meter.feed(frame(0x2, b"q" * 200)) == 1


@pytest.fixture
async def listener() -> AsyncIterator[trio.SocketListener]:
    (server,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with server:
        yield server


@pytest.mark.parametrize(
    ("request_bytes", "flood"),
    [
        (UPGRADE, frame(0x2, b"") * 1000),
        (UPGRADE.replace(b"\r\n", b"\n"), frame(0x2, b"") * 1000),
        (UPGRADE, frame(0x9, b"") * 1000),
    ],
    ids=["empty-messages", "bare-lf-request", "pings"],
)
async def test_a_flood_of_small_frames_breaks_the_stream_with_the_reason(
    listener: trio.SocketListener, request_bytes: bytes, flood: bytes
) -> None:
    """Empty messages (our stream skips them) or pings beyond the budget; also after a request ending in bare line
    feeds, which a review found slipped past the first meter."""
    port = listener.socket.getsockname()[1]
    limiter: RateLimiter[None] = RateLimiter(rate=1.0, burst=200, max_sources=1)
    charged: list[int] = []

    def budget(count: int) -> bool:
        charged.append(count)
        return limiter.allow(None, trio.current_time(), count)

    async with trio.open_nursery() as nursery:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server_tcp = await listener.accept()
        await client.send_all(request_bytes)
        with trio.fail_after(5):
            server = await accept_websocket_stream(nursery, server_tcp, frame_budget=budget)
            response = b""
            while b"\r\n\r\n" not in response:
                response += await client.receive_some()
        assert response.startswith(b"HTTP/1.1 101")
        with trio.fail_after(5):
            with contextlib.suppress(trio.BrokenResourceError):  # the server may already have cut the connection
                await client.send_all(flood)
            with pytest.raises(trio.BrokenResourceError, match="small WebSocket frames"):
                await server.receive_some()
        assert sum(charged) > 200  # it stopped once the budget could not pay, not before
        await server.aclose()
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_an_honest_peer_sending_many_small_messages_stays_within_the_default_budget(
    listener: trio.SocketListener,
) -> None:
    count = 3000  # ack-sized messages, far more at once than a node sends
    async with trio.open_nursery() as nursery:
        client, server = await ws_pair(nursery, TcpPairs(listener))

        async def send() -> None:
            for _ in range(count):
                await client.send_all(b"a" * 60)

        received = 0
        with trio.fail_after(30):
            nursery.start_soon(send)
            while received < count * 60:
                received += len(await server.receive_some())
        assert received == count * 60
        await client.aclose()
        await server.aclose()
        nursery.cancel_scope.cancel()


async def test_bytes_sent_before_the_answer_break_the_upgrade(listener: trio.SocketListener) -> None:
    """A client must wait for the 101 (RFC 6455 4.1); wsproto would drop such bytes or, in a race with our answer,
    parse them as frames the meter never saw.  Either way the upgrade fails, and says why."""
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server_tcp = await listener.accept()
        await client.send_all(UPGRADE + b"\x82\xff\x3f" + b"\xff" * 7 + b"mask")
        with trio.fail_after(5), pytest.raises(WebSocketUpgradeError, match="before the WebSocket upgrade"):
            await accept_websocket_stream(nursery, server_tcp)
        await client.aclose()


def test_a_message_in_too_many_fragments_is_a_violation() -> None:
    meter = FrameMeter(client=False)
    meter.feed(UPGRADE)
    meter.response_sent()
    fragments = frame(0x2, b"a" * 2000, fin=False) + frame(0x0, b"b" * 2000, fin=False) * (WS_MAX_FRAGMENTS - 2)
    assert meter.feed(fragments + frame(0x0, b"c")) == 1 and meter.violation is None  # 128 frames: allowed
    meter.feed(frame(0x2, b"a" * 2000, fin=False) + frame(0x0, b"b" * 2000, fin=False) * (WS_MAX_FRAGMENTS - 1))
    assert meter.violation is not None and "more than 128 frames" in meter.violation
    assert meter.feed(frame(0x2, b"")) == 0  # nothing counts after a violation


def test_control_frames_between_fragments_do_not_end_the_message() -> None:
    meter = FrameMeter(client=False)
    meter.feed(UPGRADE)
    meter.response_sent()
    stream = (frame(0x2, b"a" * 2000, fin=False) + frame(0x9, b"")) * 100 + frame(0x0, b"a" * 2000, fin=False) * 30
    meter.feed(stream)
    assert meter.violation is not None  # 130 fragments of one message, pings or not


def test_a_message_trickled_in_too_many_reads_is_a_violation() -> None:
    """wsproto hands each read's part of a payload to trio-websocket, which keeps a list entry per part until the
    message ends: a peer trickling one byte per TCP segment made a 64 KiB message cost about 2.7 MB."""
    meter = FrameMeter(client=False)
    meter.feed(UPGRADE)
    meter.response_sent()
    message = frame(0x2, b"t" * 3000)
    head = len(message) - 3000
    meter.feed(message[:head])  # a header alone is no piece: wsproto hands over nothing yet
    for i in range(WS_MAX_PIECES):
        meter.feed(message[head + i : head + i + 1])
    assert meter.violation is None
    meter.feed(message[head + WS_MAX_PIECES : head + WS_MAX_PIECES + 1])
    assert meter.violation is not None and f"more than {WS_MAX_PIECES} pieces" in meter.violation


def test_the_piece_count_starts_again_with_each_message() -> None:
    meter = FrameMeter(client=False)
    meter.feed(UPGRADE)
    meter.response_sent()
    for _ in range(3):  # each message in WS_MAX_PIECES pieces: empty fragments, a ping, a payload in small reads
        message = frame(0x2, b"", fin=False) * 10 + frame(0x9, b"p") + frame(0x0, b"m" * (WS_MAX_PIECES - 10))
        cut = len(message) - (WS_MAX_PIECES - 10)
        meter.feed(message[:cut])
        for i in range(cut, len(message)):
            meter.feed(message[i : i + 1])
    assert meter.violation is None
    message = frame(0x2, b"m" * (WS_MAX_PIECES + 1))
    cut = len(message) - WS_MAX_PIECES - 1
    meter.feed(message[:cut])
    for i in range(cut, len(message)):
        meter.feed(message[i : i + 1])
    assert meter.violation is not None and "pieces" in meter.violation

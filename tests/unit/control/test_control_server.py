"""ControlServer and ControlClient over real Unix sockets in temporary homes."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from p2pmsg.control import (
    ControlClient,
    ControlConnectionError,
    ControlRequestError,
    ControlServer,
    ControlSetupError,
    EventHub,
    Handler,
    NodeAlreadyRunningError,
    NodeNotRunningError,
    SocketState,
    control_socket_path,
    probe_socket,
)
from p2pmsg.errors import LocalProtocolError


@pytest.fixture
def home() -> Iterator[Path]:
    # A short path: sun_path holds 107 bytes, and pytest's tmp_path can be longer than that.
    path = Path(tempfile.mkdtemp(prefix="p2pc-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class UnknownContact(Exception):
    pass


async def _id(params: dict[str, Any]) -> Any:
    return {"peer_id": "12D3KooWtest", "addrs": ["/ip4/127.0.0.1/tcp/4001"], "invite": "p2pmsg://invite/x"}


async def _history(params: dict[str, Any]) -> Any:
    if params["name"] != "bob":
        raise ControlRequestError("unknown_contact", f"no contact named {params['name']!r}")
    return [{"id": "00" * 16, "text": "hi", "limit": params.get("limit")}]


async def _crash(params: dict[str, Any]) -> Any:
    raise RuntimeError("handler bug")


async def _mapped(params: dict[str, Any]) -> Any:
    raise UnknownContact("no contact named 'zed'")


async def _unencodable(params: dict[str, Any]) -> Any:
    return {"x": object()}


HANDLERS: dict[str, Handler] = {
    "id": _id,
    "history": _history,
    "status": _crash,
    "export": _mapped,
    "peers": _unencodable,
}


@contextlib.asynccontextmanager
async def serving(
    home: Path, handlers: dict[str, Handler] | None = None, hub: EventHub | None = None, **kwargs: Any
) -> AsyncIterator[ControlServer]:
    server = ControlServer(control_socket_path(home), HANDLERS if handlers is None else handlers, hub, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


async def in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


def raw_frame(obj: object) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


def decode_frames(data: bytes) -> list[Any]:
    """The complete frames in ``data`` (a trailing partial frame is ignored)."""
    return split_frames(data)[0]


def split_frames(data: bytes) -> tuple[list[Any], bytes]:
    """The complete frames in ``data`` and the bytes of a trailing partial frame."""
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        if len(data) < 4 + n:
            break
        out.append(msgpack.unpackb(data[4 : 4 + n]))
        data = data[4 + n :]
    return out, data


# -- request / response ------------------------------------------------------------------------------------------------


async def test_round_trip_and_several_calls_on_one_connection(home: Path) -> None:
    async with serving(home):

        def client_side() -> list[Any]:
            with ControlClient(home) as client:
                return [client.call("id"), client.call("history", name="bob", limit=3), client.call("id")]

        first, history, again = await in_thread(client_side)
    assert first["peer_id"] == "12D3KooWtest" and again == first
    assert history == [{"id": "00" * 16, "text": "hi", "limit": 3}]


async def test_handler_errors_become_error_responses(home: Path) -> None:
    async with serving(home, error_codes={UnknownContact: "unknown_contact"}) as server:

        def client_side() -> list[tuple[str, str]]:
            errors = []
            with ControlClient(home) as client:
                cases: list[tuple[str, dict[str, Any]]] = [
                    ("history", {"name": "carol"}),  # ControlRequestError raised by the handler
                    ("status", {}),  # unexpected exception -> internal
                    ("export", {"name": "zed"}),  # mapped exception type
                    ("peers", {}),  # result that cannot be encoded -> internal
                    ("nope", {}),  # unknown method
                    ("history", {"name": 7}),  # params failing their schema
                ]
                for method, params in cases:
                    with pytest.raises(ControlRequestError) as info:
                        client.call(method, **params)
                    errors.append((info.value.code, info.value.message))
                assert client.call("id")["peer_id"] == "12D3KooWtest"  # the connection is still fine
            return errors

        errors = await in_thread(client_side)
        assert server.dropped["control_handler_error"] == 2
    codes = [code for code, _ in errors]
    assert codes == ["unknown_contact", "internal", "unknown_contact", "internal", "bad_request", "bad_request"]
    assert "carol" in errors[0][1]
    assert "status failed" in errors[1][1] and "RuntimeError" in errors[1][1] and "handler bug" not in errors[1][1]
    assert "zed" in errors[2][1]
    assert "cannot be sent" in errors[3][1]
    assert "unknown method 'nope'" in errors[4][1]
    assert "history.name: expected str, got int" in errors[5][1]


async def test_pipelined_requests_are_answered_in_order(home: Path) -> None:
    async with serving(home):
        stream = await trio.open_unix_socket(str(control_socket_path(home)))
        await stream.send_all(
            raw_frame({"id": 1, "method": "id", "params": {}})
            + raw_frame({"id": 2, "method": "history", "params": {"name": "x"}})
            + raw_frame({"id": 3, "method": "id", "params": {}})
        )
        await stream.send_eof()
        replies = decode_frames(await read_all(stream))
    assert [r["id"] for r in replies] == [1, 2, 3]
    assert replies[1]["error"]["code"] == "unknown_contact"
    assert "result" in replies[0] and "result" in replies[2]


def test_error_codes_must_be_known() -> None:
    with pytest.raises(LocalProtocolError, match="unknown code"):
        ControlServer("/tmp/x.sock", {}, error_codes={KeyError: "not_a_code"})


# -- malformed input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (struct.pack(">I", 1) + b"\xc1", "control_malformed_frame"),
        (raw_frame([1, 2, 3]), "control_malformed_frame"),
        (raw_frame({"id": 1, "method": "id"}), "control_malformed_frame"),
        (b"\x00\x00\x00\x00", "control_malformed_frame"),
        (struct.pack(">I", 10) + b"abc", "control_malformed_frame"),  # then EOF mid-frame
        (struct.pack(">I", 4096), "control_oversize_frame"),
    ],
    ids=["bad-msgpack", "not-a-map", "missing-params", "zero-length", "eof-mid-frame", "oversize"],
)
async def test_malformed_input_closes_only_that_connection(home: Path, payload: bytes, reason: str) -> None:
    async with serving(home, max_request_size=1024) as server:
        bystander = await trio.open_unix_socket(str(control_socket_path(home)))
        stream = await trio.open_unix_socket(str(control_socket_path(home)))
        await stream.send_all(payload)
        await stream.send_eof()
        replies = decode_frames(await read_all(stream))  # the server closes it
        assert len(replies) == 1
        assert replies[0]["id"] == 0 and replies[0]["error"]["code"] == "bad_request"
        assert server.dropped == {reason: 1}
        # The other connection is unaffected.
        await bystander.send_all(raw_frame({"id": 5, "method": "id", "params": {}}))
        (reply,) = decode_frames(await bystander.receive_some())
        assert reply["id"] == 5 and reply["result"]["peer_id"] == "12D3KooWtest"
        await bystander.aclose()


async def test_oversize_frame_is_refused_from_its_header_alone(home: Path) -> None:
    async with serving(home, max_request_size=1024) as server:
        stream = await trio.open_unix_socket(str(control_socket_path(home)))
        # Announce 1 GiB but send only the header, and do not close: the server must not wait for the body.
        await stream.send_all(struct.pack(">I", 1 << 30))
        replies = decode_frames(await read_all(stream))
        assert "larger than the limit of 1024" in replies[0]["error"]["message"]
        assert server.dropped == {"control_oversize_frame": 1}


async def test_connection_limit(home: Path) -> None:
    async with serving(home, max_connections=2) as server:
        held = [await trio.open_unix_socket(str(control_socket_path(home))) for _ in range(2)]
        for s in held:  # make sure both were accepted and are being served
            await s.send_all(raw_frame({"id": 1, "method": "id", "params": {}}))
            await s.receive_some()
        assert server.connections == 2

        def third() -> ControlRequestError:
            with pytest.raises(ControlRequestError) as info:
                ControlClient(home).call("id")
            return info.value

        error = await in_thread(third)
        assert error.code == "internal" and "too many control connections" in error.message
        assert server.dropped == {"control_too_many_connections": 1}
        await held[0].aclose()
        with trio.fail_after(5):
            while server.connections != 1:
                await trio.sleep(0.01)
        assert (await in_thread(lambda: ControlClient(home).call("id")))["peer_id"] == "12D3KooWtest"


async def test_a_failing_peer_credentials_check_refuses_the_connection(
    home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A fault we cannot cause for real: the kernel refusing SO_PEERCRED.  An unknown option number makes the real
    # getsockopt call fail (ENOPROTOOPT) on the accepted socket.
    if not hasattr(socket, "SO_PEERCRED"):
        pytest.skip("no SO_PEERCRED on this platform")
    monkeypatch.setattr(socket, "SO_PEERCRED", 0x7FFF)
    async with serving(home) as server:
        stream = await trio.open_unix_socket(str(control_socket_path(home)))
        with trio.fail_after(5):
            assert await read_all(stream) == b""  # closed at once (a served connection would wait for a request)
        await stream.aclose()
        assert server.dropped == {"control_peercred_failed": 1}
        assert server.connections == 0
    assert "cannot read the peer's credentials" in caplog.text


# -- events ------------------------------------------------------------------------------------------------------------


async def test_event_stream_delivers_in_order_and_ends_with_the_node(home: Path) -> None:
    hub = EventHub()
    received: list[dict[str, Any]] = []
    subscribed = threading.Event()

    def listen() -> None:
        stream = ControlClient(home).events()
        subscribed.set()
        received.extend(stream)  # ends when the server goes away

    async with trio.open_nursery() as outer, serving(home, hub=hub):
        outer.start_soon(in_thread, listen)
        with trio.fail_after(5):
            while hub.subscribers != 1:
                await trio.sleep(0.01)
        hub.publish("message", peer_id="12D3a", text="one", ts=1)
        hub.publish("receipt", id="ab" * 16, status="delivered")
        hub.publish("peer_down", peer_id="12D3a")
        with trio.fail_after(5):
            while len(received) < 3:
                await trio.sleep(0.01)
    assert subscribed.is_set()
    assert received == [
        {"event": "message", "peer_id": "12D3a", "text": "one", "ts": 1},
        {"event": "receipt", "id": "ab" * 16, "status": "delivered"},
        {"event": "peer_down", "peer_id": "12D3a"},
    ]
    assert hub.published == 3


async def test_closing_the_event_stream_unsubscribes(home: Path) -> None:
    hub = EventHub()
    async with serving(home, hub=hub):
        stream = await in_thread(lambda: ControlClient(home).events())
        assert hub.subscribers == 1
        result: list[Any] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_thread, lambda: result.extend(stream))  # blocks in recv
            await trio.sleep(0.05)
            stream.close()  # from another thread: wakes the reader, which stops
        assert result == []
        with trio.fail_after(5):
            while hub.subscribers:
                await trio.sleep(0.01)
        hub.publish("peer_up", peer_id="x")  # nobody left; nothing breaks


@pytest.mark.parametrize(
    "limits",
    [{"queue_size": 4}, {"queue_size": 10_000, "max_queued_bytes": 200_000}],
    ids=["event-count", "byte-budget"],
)
async def test_slow_subscriber_is_dropped_and_never_blocks_publish(home: Path, limits: dict[str, int]) -> None:
    hub = EventHub(**limits)
    async with serving(home, hub=hub) as server:
        lazy = await trio.open_unix_socket(str(control_socket_path(home)))
        await lazy.send_all(raw_frame({"id": 1, "method": "subscribe", "params": {}}))
        (answer,) = decode_frames(await lazy.receive_some())
        assert answer == {"id": 1, "result": {}}
        big = "x" * 60_000
        published = 0
        # The subscriber never reads: the socket buffer fills, then its queue, then it is dropped.  publish() is
        # synchronous, so it cannot block; we just check the drop happens within a bounded number of events.
        while hub.subscribers and published < 1000:
            hub.publish("message", text=big, n=published)
            published += 1
            await trio.testing.wait_all_tasks_blocked()
        assert hub.subscribers == 0
        assert server.dropped == {"control_slow_subscriber": 1}
        # Its connection is closed: reading drains what was sent (the last frame may be cut), then the stream ends.
        data = await read_all(lazy)
        frames = decode_frames(data)
        assert 0 < len(frames) < published
        assert [f["n"] for f in frames] == list(range(len(frames)))


async def test_a_burst_of_one_transaction_s_events_does_not_drop_a_subscriber(home: Path) -> None:
    """publish() is synchronous: a send_many of 1,000 texts publishes 1,000 message events before the pump writes
    any.  A subscriber that keeps reading must get them all (found in QA: the former 256-event queue dropped the
    event feed of a `p2pmsg chat` that piped 300 lines)."""
    hub = EventHub()
    async with serving(home, hub=hub) as server:
        reader = await trio.open_unix_socket(str(control_socket_path(home)))
        await reader.send_all(raw_frame({"id": 1, "method": "subscribe", "params": {}}))
        (answer,) = decode_frames(await reader.receive_some())
        assert answer == {"id": 1, "result": {}}
        for n in range(1000):  # one burst, as one transaction's events are published
            hub.publish("message", text="x" * 100, n=n)
        received: list[dict[str, Any]] = []
        data = b""
        with trio.fail_after(10):
            while len(received) < 1000:
                data += await reader.receive_some()
                frames, data = split_frames(data)
                received.extend(frames)
        assert [f["n"] for f in received] == list(range(1000))
        assert server.dropped == {} and hub.subscribers == 1
        await reader.aclose()


async def test_subscriber_that_sends_frames_is_disconnected(home: Path) -> None:
    hub = EventHub()
    async with serving(home, hub=hub) as server:
        stream = await trio.open_unix_socket(str(control_socket_path(home)))
        await stream.send_all(raw_frame({"id": 1, "method": "subscribe", "params": {}}))
        await stream.receive_some()
        await stream.send_all(raw_frame({"id": 2, "method": "id", "params": {}}))
        replies = decode_frames(await read_all(stream))
        assert replies[-1]["id"] == 0 and "must not send frames" in replies[-1]["error"]["message"]
        assert server.dropped == {"control_malformed_frame": 1}
        assert hub.subscribers == 0


async def test_subscribe_without_a_hub_is_a_bad_request(home: Path) -> None:
    async with serving(home):

        def client_side() -> str:
            with pytest.raises(ControlRequestError) as info:
                ControlClient(home).events()
            return info.value.code

        assert await in_thread(client_side) == "bad_request"


def test_publish_refuses_unencodable_or_oversize_events() -> None:
    hub = EventHub(max_event_size=1000)
    hub.publish("message", payload=object())  # nobody subscribed: counted, never encoded
    assert hub.published == 1
    hub._add()
    with pytest.raises(LocalProtocolError):
        hub.publish("message", payload=object())
    with pytest.raises(LocalProtocolError, match="more than the maximum 1000"):
        hub.publish("message", text="x" * 1000)
    with pytest.raises(LocalProtocolError):
        EventHub(queue_size=0)


# -- socket lifecycle --------------------------------------------------------------------------------------------------


async def test_socket_is_0600_and_removed_on_shutdown(home: Path) -> None:
    path = control_socket_path(home)
    async with serving(home):
        info = path.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
    assert not path.exists()


async def test_stale_socket_is_replaced(home: Path) -> None:
    path = control_socket_path(home)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays: a node that died without cleaning up
    assert probe_socket(path) is SocketState.STALE
    server = ControlServer(path, HANDLERS)
    await server.bind()  # bind first, serve later (how a node checks before starting anything else)
    assert probe_socket(path) is SocketState.RUNNING
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert (await in_thread(lambda: ControlClient(home).call("id")))["peer_id"] == "12D3KooWtest"
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_bound_but_never_served_socket_is_cleaned_up(home: Path) -> None:
    server = ControlServer(control_socket_path(home), HANDLERS)
    await server.bind()
    assert control_socket_path(home).exists()
    await server.aclose()
    assert not control_socket_path(home).exists()


async def test_second_node_on_the_same_home_is_refused(home: Path) -> None:
    async with serving(home):
        with pytest.raises(NodeAlreadyRunningError, match="another node is already running"):
            await ControlServer(control_socket_path(home), HANDLERS).bind()
        # The first server still works and still owns its socket.
        assert (await in_thread(lambda: ControlClient(home).call("id")))["peer_id"] == "12D3KooWtest"


async def test_something_else_in_the_way_is_refused(home: Path) -> None:
    control_socket_path(home).write_text("not a socket")
    with pytest.raises(ControlSetupError, match="is not a socket"):
        await ControlServer(control_socket_path(home), HANDLERS).bind()
    assert control_socket_path(home).read_text() == "not a socket"


async def test_home_open_to_others_is_refused(home: Path) -> None:
    os.chmod(home, 0o755)
    with pytest.raises(ControlSetupError, match="chmod 700"):
        await ControlServer(control_socket_path(home), HANDLERS).bind()
    assert not control_socket_path(home).exists()


def test_path_too_long_is_a_clear_error(home: Path) -> None:
    with pytest.raises(ControlSetupError, match="longer than the 107"):
        control_socket_path(home / ("d" * 120))


# -- client errors -----------------------------------------------------------------------------------------------------


def test_client_without_a_node_says_how_to_start_one(home: Path) -> None:
    with pytest.raises(NodeNotRunningError) as info:
        ControlClient(home).call("id")
    assert f"p2pmsg --home {home} run" in str(info.value)
    with pytest.raises(NodeNotRunningError, match=r"p2pmsg --home .* init"):
        ControlClient(home / "missing").call("id")
    with pytest.raises(NodeNotRunningError):
        ControlClient(home).events()


def test_client_with_a_stale_socket_says_not_running(home: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(control_socket_path(home)))
    dead.close()
    with pytest.raises(NodeNotRunningError, match="run"):
        ControlClient(home).call("id")


def test_client_reports_a_node_that_hangs_up(home: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(control_socket_path(home)))
    listener.listen(1)

    def hang_up() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    try:
        with pytest.raises(ControlConnectionError, match="closed the control connection"):
            ControlClient(home, timeout=5).call("id")
    finally:
        thread.join()
        listener.close()


def test_client_rejects_a_reply_with_the_wrong_id(home: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(control_socket_path(home)))
    listener.listen(1)

    def answer_wrong() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.sendall(raw_frame({"id": 99, "result": {}}))
        conn.close()

    thread = threading.Thread(target=answer_wrong)
    thread.start()
    try:
        with pytest.raises(Exception, match="response to request 99, expected 1"):
            ControlClient(home, timeout=5).call("id")
    finally:
        thread.join()
        listener.close()


async def test_a_node_of_another_user_is_named_when_it_refuses_us(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sudo p2pmsg status` on a node run by a service user: the node closes the connection (SO_PEERCRED), and the
    client says whose node it is instead of "connection reset".  The socket is handed to another user with chown
    (root only), and the refusal is made real by the failing credentials check of the test above."""
    if os.geteuid() != 0 or not hasattr(socket, "SO_PEERCRED"):
        pytest.skip("needs root (to chown the socket) and SO_PEERCRED")
    monkeypatch.setattr(socket, "SO_PEERCRED", 0x7FFF)
    async with serving(home) as server:
        os.chown(control_socket_path(home), 65534, 65534, follow_symlinks=False)
        with pytest.raises(ControlConnectionError, match=r"runs as user .* and answers only that user") as info:
            await in_thread(lambda: ControlClient(home).call("id"))
        assert "sudo -u " in str(info.value)
        assert server.dropped == {"control_peercred_failed": 1}

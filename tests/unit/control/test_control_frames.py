"""Control API framing and validation (sans-IO): frame splitting, limits, request/response/event checks, params."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pmsg.control.errors import ControlProtocolError, ControlRequestError, FrameTooLargeError
from p2pmsg.control.frames import (
    Event,
    FrameReader,
    Response,
    encode_error,
    encode_event,
    encode_frame,
    encode_request,
    encode_result,
    parse_event,
    parse_reply,
    parse_request,
)
from p2pmsg.control.methods import METHODS, check_params
from p2pmsg.errors import LocalProtocolError


def frame(obj: object) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def body(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


# -- FrameReader -------------------------------------------------------------------------------------------------------


def test_reader_splits_frames_fed_byte_by_byte() -> None:
    data = frame({"a": 1}) + frame({"b": "x" * 300})
    reader = FrameReader(1024)
    bodies = []
    for i in range(len(data)):
        reader.receive_data(data[i : i + 1])
        got = reader.next_frame()
        if got is not None:
            bodies.append(msgpack.unpackb(got))
    assert bodies == [{"a": 1}, {"b": "x" * 300}]
    assert reader.at_boundary


def test_reader_returns_several_frames_from_one_chunk() -> None:
    reader = FrameReader(1024)
    reader.receive_data(frame({"n": 1}) + frame({"n": 2}) + frame({"n": 3})[:3])
    assert msgpack.unpackb(reader.next_frame()) == {"n": 1}
    assert msgpack.unpackb(reader.next_frame()) == {"n": 2}
    assert reader.next_frame() is None
    assert not reader.at_boundary


def test_reader_refuses_oversize_length_before_the_body_arrives() -> None:
    reader = FrameReader(100)
    reader.receive_data(struct.pack(">I", 101))
    with pytest.raises(FrameTooLargeError) as info:
        reader.next_frame()
    assert info.value.field == "length"
    assert "101" in info.value.reason and "100" in info.value.reason


def test_reader_accepts_a_frame_of_exactly_the_limit() -> None:
    reader = FrameReader(10)
    reader.receive_data(struct.pack(">I", 10) + b"\x00" * 10)
    assert reader.next_frame() == b"\x00" * 10


def test_reader_refuses_zero_length() -> None:
    reader = FrameReader(100)
    reader.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(ControlProtocolError, match="0 bytes"):
        reader.next_frame()


# -- requests ----------------------------------------------------------------------------------------------------------


def test_request_round_trip() -> None:
    data = encode_request(7, "history", {"name": "bob", "limit": 5}, max_size=1024)
    reader = FrameReader(1024)
    reader.receive_data(data)
    request = parse_request(reader.next_frame() or b"")
    assert (request.id, request.method, request.params) == (7, "history", {"name": "bob", "limit": 5})


@pytest.mark.parametrize(
    ("message", "field", "reason"),
    [
        ([1, 2], "body", "must be a msgpack map, got an array"),
        ({"method": "id", "params": {}}, "id", "missing"),
        ({"id": 1, "method": "id"}, "params", "missing"),
        ({"id": 1, "method": "id", "params": {}, "extra": 1}, "extra", "unknown key"),
        ({"id": 0, "method": "id", "params": {}}, "id", "must be from 1"),
        ({"id": -3, "method": "id", "params": {}}, "id", "must be from 1"),
        ({"id": True, "method": "id", "params": {}}, "id", "got a boolean"),
        ({"id": "1", "method": "id", "params": {}}, "id", "got a string"),
        ({"id": 1, "method": b"id", "params": {}}, "method", "got binary"),
        ({"id": 1, "method": "", "params": {}}, "method", "1 to 64 characters"),
        ({"id": 1, "method": "m" * 65, "params": {}}, "method", "1 to 64 characters"),
        ({"id": 1, "method": "id", "params": []}, "params", "must be a map, got an array"),
    ],
)
def test_request_validation_names_field_and_reason(message: object, field: str, reason: str) -> None:
    with pytest.raises(ControlProtocolError) as info:
        parse_request(body(message))
    assert info.value.field == field
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xc1", "invalid msgpack"),
        (body({"id": 1}) + b"\x00", "trailing bytes"),
        (b"\x81\xa2id", "truncated"),
        (b"\xd6\x01abcd", "ext"),
        (body({1: 2}), ""),
        (b"\x82\xa1a\x01\xa1a\x02", "repeats a key"),
    ],
)
def test_garbage_bodies_raise_control_protocol_error(raw: bytes, reason: str) -> None:
    with pytest.raises(ControlProtocolError) as info:
        parse_request(raw)
    assert reason in info.value.reason


def test_body_over_size_limit_is_refused() -> None:
    with pytest.raises(ControlProtocolError, match="more than the maximum"):
        parse_request(body({"id": 1, "method": "id", "params": {"x": "y" * 100}}), max_size=50)


def test_nesting_too_deep_is_refused() -> None:
    deep: object = {}
    for _ in range(40):
        deep = {"d": deep}
    with pytest.raises(ControlProtocolError, match="deeper"):
        parse_request(body({"id": 1, "method": "id", "params": deep}))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_control_protocol_error(data: bytes) -> None:
    reader = FrameReader(64)
    reader.receive_data(data)
    try:
        while (got := reader.next_frame()) is not None:
            parse_request(got, max_size=64)
    except ControlProtocolError:
        pass


# -- replies and events ------------------------------------------------------------------------------------------------


def _one(data: bytes) -> bytes:
    reader = FrameReader(1 << 20)
    reader.receive_data(data)
    got = reader.next_frame()
    assert got is not None
    return got


def test_result_error_and_event_round_trip() -> None:
    assert parse_reply(_one(encode_result(3, [{"id": "ab"}], max_size=1024))) == Response(id=3, result=[{"id": "ab"}])
    error = parse_reply(_one(encode_error(4, "unknown_contact", "no contact 'bob'", max_size=1024)))
    assert error == Response(id=4, error_code="unknown_contact", error_message="no contact 'bob'")
    event = parse_reply(_one(encode_event("message", {"peer_id": "12D3", "text": "hi"}, max_size=1024)))
    assert event == Event(event="message", fields={"peer_id": "12D3", "text": "hi"})
    assert parse_event(_one(encode_event("peer_down", {}, max_size=1024))) == Event(event="peer_down", fields={})


def test_a_nil_result_is_a_result() -> None:
    assert parse_reply(body({"id": 1, "result": None})) == Response(id=1, result=None)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"id": 1}, "result"),
        ({"id": 1, "result": 1, "x": 2}, "x"),
        ({"id": 1, "error": "boom"}, "error"),
        ({"id": 1, "error": {"code": "", "message": "m"}}, "error.code"),
        ({"id": 1, "error": {"code": "internal", "message": 5}}, "error.message"),
        ({"id": 1, "error": {"code": "internal", "message": "m", "x": 1}}, "error.x"),
        ({"event": 5}, "event"),
    ],
)
def test_bad_replies_are_refused(message: object, field: str) -> None:
    with pytest.raises(ControlProtocolError) as info:
        parse_reply(body(message))
    assert info.value.field == field


def test_parse_event_requires_an_event_key() -> None:
    with pytest.raises(ControlProtocolError, match="missing"):
        parse_event(body({"id": 1, "result": 2}))


def test_encoding_refuses_what_msgpack_cannot_carry() -> None:
    with pytest.raises(LocalProtocolError):
        encode_result(1, {"x": object()}, max_size=1024)
    with pytest.raises(LocalProtocolError, match="more than the maximum"):
        encode_frame({"x": "y" * 100}, max_size=50)
    with pytest.raises(LocalProtocolError, match="unknown control error code"):
        encode_error(1, "no_such_code", "m", max_size=1024)
    with pytest.raises(LocalProtocolError, match="must not contain"):
        encode_event("message", {"event": "x"}, max_size=1024)
    with pytest.raises(LocalProtocolError):
        encode_event("", {}, max_size=1024)


# -- params ------------------------------------------------------------------------------------------------------------


def test_every_contract_method_is_declared() -> None:
    contract = {
        "id", "contacts.add", "contacts.list", "contacts.rename", "contacts.remove", "contacts.block",
        "contacts.unblock", "send", "send_many", "history", "inbox", "requests.list", "requests.accept",
        "requests.block", "peers", "status", "export", "subscribe",
    }  # fmt: skip
    assert set(METHODS) == contract


def test_valid_params_pass() -> None:
    assert check_params("history", {"name": "bob"}) == {"name": "bob"}
    assert check_params("history", {"name": "bob", "limit": 10, "before": 0}) == {
        "name": "bob",
        "limit": 10,
        "before": 0,
    }
    assert check_params("x.extension", {"anything": [1]}) == {"anything": [1]}


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("send", {"name": "bob"}, "send.text: required field is missing"),
        ("send", {"name": "bob", "text": "hi", "x": 1}, "send.x: unknown field"),
        ("send", {"name": 5, "text": "hi"}, "send.name: expected str, got int"),
        ("send", {"name": "", "text": "hi"}, "send.name: str is 0 bytes long"),
        ("history", {"name": "bob", "limit": 0}, "history.limit"),
        ("history", {"name": "bob", "limit": True}, "history.limit: expected int, got bool"),
        ("history", {"name": "bob", "before": -1}, "history.before"),
        ("id", {"verbose": True}, "id.verbose: unknown field"),
    ],
)
def test_bad_params_are_bad_requests_naming_the_param(method: str, params: dict[str, object], expected: str) -> None:
    with pytest.raises(ControlRequestError) as info:
        check_params(method, params)
    assert info.value.code == "bad_request"
    assert expected in info.value.message

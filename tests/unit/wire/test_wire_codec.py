"""The strict msgpack codec: every rule of docs/protocol.md (section 2), one by one, with the error it produces."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import msgpack
import pytest
import umsgpack

from p2pmsg.errors import LocalProtocolError, RemoteProtocolError
from p2pmsg.wire.codec import (
    MAX_DEPTH,
    MAX_FRAME_SIZE,
    Array,
    Bool,
    Bytes,
    CodecEncodeError,
    CodecError,
    Float,
    Int,
    Literal,
    Map,
    Nil,
    OneOf,
    Optional,
    SchemaError,
    Str,
    Struct,
    Tuple,
    packb,
    unpackb_limited,
)

BODY = Struct("body", {"text": Str(16)}, {"mentions": Array(Bytes(4, 4), 2)})
ENVELOPE = Struct(
    "envelope",
    {
        "v": Int(1, 1),
        "id": Bytes(16, 16),
        "kind": Literal("text", "file"),
        "body": BODY,
        "reply_to": Optional(Bytes(16, 16)),
    },
    {"ttl": Int(0, 2**32 - 1), "score": Float()},
)


def envelope(**changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"v": 1, "id": b"i" * 16, "kind": "text", "body": {"text": "hi"}, "reply_to": None}
    value.update(changes)
    return value


def raw(value: Any) -> bytes:
    """Pack with plain msgpack, bypassing every check (to build hostile frames)."""
    return bytes(msgpack.packb(value, use_bin_type=True))


def decode_error(schema: Any, data: bytes) -> CodecError:
    with pytest.raises(CodecError) as info:
        schema.decode(data)
    return info.value


# ---------------------------------------------------------------------------------------------------------------------
# Round trips and the decoded shapes


def test_struct_round_trip_returns_plain_dict() -> None:
    value = envelope(ttl=60, score=0.5, body={"text": "héllo", "mentions": [b"abcd"]})
    data = ENVELOPE.encode(value)
    assert ENVELOPE.decode(data) == value
    assert msgpack.unpackb(data) == value  # the wire form is plain msgpack


def test_optional_fields_absent_stay_absent() -> None:
    decoded = ENVELOPE.decode(ENVELOPE.encode(envelope()))
    assert "ttl" not in decoded
    assert "mentions" not in decoded["body"]


def test_tuple_decodes_to_tuple_and_array_to_list() -> None:
    pair = Tuple(Str(8), Int(0, 9), name="pair")
    assert pair.decode(raw(["a", 3])) == ("a", 3)
    assert pair.encode(("a", 3)) == pair.encode(["a", 3]) == raw(["a", 3])
    assert Array(Int(0, 9), 3).decode(raw([1, 2])) == [1, 2]


def test_map_with_int_keys_is_allowed_only_where_declared() -> None:
    scores = Map(Int(0, 100), Str(8), 4, name="scores")
    assert scores.decode(raw({1: "a", 2: "b"})) == {1: "a", 2: "b"}
    assert decode_error(scores, raw({"1": "a"})).field == "scores['1']"
    record = Struct("record", {"n": Int(0, 9)})
    error = decode_error(record, raw({1: 2}))
    assert error.field == "record"
    assert "map key" in error.reason


def test_bytearray_and_int_subclass_are_accepted_when_encoding_only() -> None:
    import enum

    class Kind(enum.IntEnum):
        A = 3

    assert Bytes(4).encode(bytearray(b"ab")) == raw(b"ab")
    assert Int(0, 9).encode(Kind.A) == raw(3)
    # a decoder never sees these, and never accepts them from validate() either
    with pytest.raises(CodecError):
        Bytes(4).validate(bytearray(b"ab"))


# ---------------------------------------------------------------------------------------------------------------------
# Field-level rules, with the path in the error


@pytest.mark.parametrize(
    ("value", "field", "reason"),
    [
        (envelope(v=2), "envelope.v", "int 2 is outside 1..1"),
        (envelope(v=True), "envelope.v", "expected int, got bool"),
        (envelope(v=1.0), "envelope.v", "expected int, got float"),
        (envelope(id="i" * 16), "envelope.id", "expected bin, got str"),
        (envelope(id=b"i" * 15), "envelope.id", "less than the minimum 16"),
        (envelope(kind="textx"), "envelope.kind", "is not one of"),
        (envelope(kind=1), "envelope.kind", "is not one of"),
        (envelope(body={"text": b"hi"}), "envelope.body.text", "expected str, got bin"),
        (envelope(body={"text": "x" * 17}), "envelope.body.text", "more than the maximum 16"),
        (envelope(body={"text": "é" * 9}), "envelope.body.text", "18 bytes long, more than the maximum 16"),
        (envelope(body={"text": "", "mentions": [b"abcd", b"abc"]}), "envelope.body.mentions[1]", "minimum 4"),
        (envelope(body={"text": "", "mentions": [b"abcd"] * 3}), "envelope.body.mentions", "3 items"),
        (envelope(body=[]), "envelope.body", "expected map, got array"),
        (envelope(reply_to=b"r"), "envelope.reply_to", "less than the minimum 16"),
        (envelope(ttl=-1), "envelope.ttl", "outside 0..4294967295"),
        (envelope(score=math.nan), "envelope.score", "not finite"),
        (envelope(score=1), "envelope.score", "expected float, got int"),
        (envelope(extra=1), "envelope.extra", "unknown field"),
        ({k: v for k, v in envelope().items() if k != "kind"}, "envelope.kind", "required field is missing"),
        ({k: v for k, v in envelope().items() if k != "reply_to"}, "envelope.reply_to", "required field is missing"),
    ],
)
def test_decode_names_field_and_reason(value: dict[str, Any], field: str, reason: str) -> None:
    error = decode_error(ENVELOPE, raw(value))
    assert error.field == field
    assert reason in error.reason
    assert str(error).startswith(field + ": ")
    assert isinstance(error, RemoteProtocolError)
    # The encoder refuses the same value, as a local error with the same path.
    with pytest.raises(CodecEncodeError) as info:
        ENVELOPE.encode(value)
    assert info.value.field == field
    assert isinstance(info.value, LocalProtocolError)


def test_str_and_bin_are_distinct_and_utf8_is_strict() -> None:
    assert decode_error(Str(8), raw(b"abc")).reason == "expected str, got bin"
    assert decode_error(Bytes(8), raw("abc")).reason == "expected bin, got str"
    bad_utf8 = b"\xa2\xc3\x28"  # fixstr of 2 bytes, invalid continuation byte
    assert "not valid UTF-8" in decode_error(Str(8), bad_utf8).reason
    surrogate = b"\xa3\xed\xa0\x80"  # an encoded UTF-16 surrogate is not UTF-8
    assert "not valid UTF-8" in decode_error(Str(8), surrogate).reason
    with pytest.raises(CodecEncodeError, match="lone surrogate"):
        Str(8).encode("\ud800")


def test_str_length_counts_utf8_bytes() -> None:
    assert Str(4).decode(raw("éé")) == "éé"  # 4 bytes
    assert "5 bytes long" in decode_error(Str(4), raw("éé1")).reason
    assert "less than the minimum 3" in decode_error(Str(8, min_len=3), raw("é")).reason


def test_literal_type_must_match_exactly() -> None:
    one = Literal(1, "one")
    assert one.decode(raw(1)) == 1
    assert one.decode(raw("one")) == "one"
    for wrong in (True, 1.0, "1", b"one", [1]):
        with pytest.raises(CodecError, match="is not one of"):
            one.decode(raw(wrong))


def test_nil_bool_float() -> None:
    assert Nil().decode(b"\xc0") is None
    assert Bool().decode(b"\xc3") is True
    assert decode_error(Bool(), raw(1)).reason == "expected bool, got int"
    assert decode_error(Nil(), raw(0)).reason == "expected nil, got int"
    assert Float().decode(b"\xca\x3f\xc0\x00\x00") == 1.5  # float 32
    assert math.isinf(Float(finite=False).decode(raw(math.inf)))
    assert "not finite" in decode_error(Float(), raw(-math.inf)).reason


def test_one_of_takes_first_match_and_reports_all_reasons() -> None:
    either = OneOf(Bytes(4), Str(4))
    assert either.decode(raw("ab")) == "ab"
    assert either.decode(raw(b"ab")) == b"ab"
    reason = decode_error(either, raw(7)).reason
    assert "bin[..4]: expected bin, got int" in reason
    assert "str[..4]: expected str, got int" in reason


def test_allow_unknown_drops_unknown_fields_but_bounds_them() -> None:
    open_struct = Struct("hello", {"v": Int(0, 9)}, allow_unknown=True)
    assert open_struct.decode(raw({"v": 1, "future": {"a": [1, 2]}})) == {"v": 1}
    deep: Any = 0
    for _ in range(MAX_DEPTH):  # the struct itself is level 1, so this unknown value is one level too deep
        deep = [deep]
    error = decode_error(open_struct, raw({"v": 1, "future": deep}))
    assert error.field == "hello.future"
    assert "deeper" in error.reason
    assert open_struct.decode(raw({"v": 1, "future": deep[0]})) == {"v": 1}
    assert "map key" in decode_error(open_struct, raw({"v": 1, "future": {b"k": 1}})).reason
    with pytest.raises(CodecEncodeError, match="unknown field"):
        open_struct.encode({"v": 1, "future": 1})


def test_validate_checks_already_decoded_values() -> None:
    rpc = Tuple(Str(16), Array(Bytes(20, 20), 4), name="rpc")
    assert rpc.validate(["find_node", [b"k" * 20]]) == ("find_node", [b"k" * 20])
    with pytest.raises(CodecError) as info:
        rpc.validate(["find_node", [b"k" * 19]], name="find_node")
    assert info.value.field == "find_node[1][0]"


# ---------------------------------------------------------------------------------------------------------------------
# Frame-level rules


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty frame"),
        (b"\xc1", "invalid msgpack type byte"),
        (b"\x81\xa1v", "truncated"),
        (raw({"v": 1}) + b"\x00", "trailing bytes"),
        (b"\xd4\x05\x00", "length header over the limit"),  # fixext 1
        (b"\xc7\x00\x05", "ext type 5 is not allowed"),  # ext 8 of length 0: reaches the ext hook
        (b"\xd6\xff\x00\x00\x00\x01", "length header over the limit"),  # the timestamp ext -1
        (b"\x82\xa1v\x01\xa1v\x02", "repeats a key"),
        (b"\x81\x91\x01\x02", "map key"),  # a map key that is an array
    ],
)
def test_frame_rules(data: bytes, reason: str) -> None:
    open_struct = Struct("frame", {}, {"v": Int(0, 9)}, allow_unknown=True)
    error = decode_error(open_struct, data)
    assert error.field == "frame"
    assert reason in error.reason


def test_frame_size_limit() -> None:
    blob = Bytes(MAX_FRAME_SIZE)
    assert "more than the maximum" in decode_error(blob, raw(b"x" * MAX_FRAME_SIZE)).reason
    assert blob.decode(raw(b"x" * (MAX_FRAME_SIZE - 5))) == b"x" * (MAX_FRAME_SIZE - 5)
    with pytest.raises(CodecError, match="more than the maximum 10"):
        Str(64).decode(raw("x" * 20), max_size=10)
    with pytest.raises(CodecEncodeError, match="more than the maximum 10"):
        Str(64).encode("x" * 20, max_size=10)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"\xdb", "truncated"),  # str 32: msgpack reads strs in place, so a short frame is refused as truncated
        (b"\xc6", "truncated"),  # bin 32: likewise
        (b"\xdd", "exceeds max_array_len"),  # array 32: refused on the header, before a list is pre-sized
        (b"\xdf", "exceeds max_map_len"),  # map 32: likewise
    ],
)
def test_4gib_length_header_in_10_bytes_is_refused_cheaply(header: bytes, reason: str) -> None:
    data = header + b"\xff\xff\xff\xff" + b"x" * 5
    open_struct = Struct("open", {}, allow_unknown=True)
    tracemalloc.start()
    try:
        for schema in (Str(16), Bytes(16), Array(Nil(), 4), open_struct):
            assert reason in decode_error(schema, data).reason
        with pytest.raises(CodecError, match=reason):
            unpackb_limited(data, max_size=1024, max_depth=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_complete_frame_over_the_schema_limit_is_refused_by_the_unpacker() -> None:
    claimed = b"\xda\x01\x00" + b"x" * 256  # str 16 of 256 bytes where the schema never accepts more than 64
    assert "max_str_len" in decode_error(Struct("s", {"t": Str(16)}), b"\x81\xa1t" + claimed).reason


def test_hostile_array_header_does_not_allocate() -> None:
    """Array headers claiming 2**20 items are refused before the unpacker pre-sizes a list for them."""
    data = b"\xdd\x00\x10\x00\x00" * 100
    schema = Array(Int(0, 9), 8)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="max_array_len"):
            schema.decode(data)
        _, guarded_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with pytest.raises(ValueError):  # the control: plain msgpack does allocate megabytes of list slots
            msgpack.unpackb(data, max_array_len=1 << 20)
        _, plain_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert guarded_peak < 256 * 1024
    assert plain_peak > 4 * 1024 * 1024


def test_depth_rules() -> None:
    nested: Any = Int(0, 9)
    for _ in range(MAX_DEPTH):
        nested = Array(nested, 1)
    assert nested.depth == MAX_DEPTH
    with pytest.raises(SchemaError, match="nests 33 levels"):
        Array(nested, 1)
    very_deep = b"\x91" * 5000 + b"\x00"  # deeper than msgpack's own unpacker stack
    assert "nesting" in decode_error(Struct("deep", {}, allow_unknown=True), very_deep).reason


@pytest.mark.parametrize(
    "bad",
    [
        lambda: Int(5, 1),
        lambda: Int(0, 2**64),
        lambda: Bytes(4, 5),
        lambda: Str(MAX_FRAME_SIZE + 1),
        lambda: Literal(),
        lambda: Literal(True),
        lambda: OneOf(Nil()),
        lambda: Tuple(),
        lambda: Map(Array(Int(0, 1), 1), Nil(), 1),
        lambda: Struct("s", {"a": Nil()}, {"a": Nil()}),
        lambda: Struct("s", {"": Nil()}),
    ],
)
def test_inconsistent_schemas_are_refused(bad: Any) -> None:
    with pytest.raises(SchemaError):
        bad()


# ---------------------------------------------------------------------------------------------------------------------
# Raw bounded unpacking and packing (the DHT's [name, args] arrays)


def test_unpackb_limited_reads_umsgpack_output() -> None:
    request = ["find_node", [b"\x01" * 20, b"\x02" * 20]]
    data = umsgpack.packb(request)
    assert unpackb_limited(data, max_size=8192, max_depth=4) == request
    response = [[b"\x03" * 20, "127.0.0.1", 8468], [b"\x04" * 20, "::1", 2**40]]  # umsgpack packs 2**40 as uint 64
    assert unpackb_limited(umsgpack.packb(response), max_size=8192, max_depth=4) == response
    assert unpackb_limited(umsgpack.packb({"value": "x"}), max_size=8192, max_depth=4) == {"value": "x"}
    assert umsgpack.unpackb(packb(("store", [b"k" * 20, b"v"]))) == ["store", [b"k" * 20, b"v"]]


@pytest.mark.parametrize(
    ("limit", "value"),
    [
        ("max_str_len", "x" * 11),
        ("max_bin_len", b"x" * 11),
        ("max_array_len", list(range(11))),
        ("max_map_len", {str(i): i for i in range(11)}),
    ],
)
def test_unpackb_limited_limits(limit: str, value: Any) -> None:
    data = raw([value])
    with pytest.raises(CodecError, match=limit):
        unpackb_limited(data, max_size=1024, max_depth=4, **{limit: 10})
    assert unpackb_limited(data, max_size=1024, max_depth=4, **{limit: 11}) == [value]


def test_unpackb_limited_depth_keys_and_size() -> None:
    three = raw([[[1]]])
    assert unpackb_limited(three, max_size=64, max_depth=3) == [[[1]]]
    with pytest.raises(CodecError, match="deeper than 2"):
        unpackb_limited(three, max_size=64, max_depth=2)
    with pytest.raises(CodecError, match="only str keys"):
        unpackb_limited(raw({b"k": 1}), max_size=64, max_depth=2)
    assert unpackb_limited(raw({b"k": 1, 2: 3}), max_size=64, max_depth=2, str_keys_only=False) == {b"k": 1, 2: 3}
    with pytest.raises(CodecError, match="more than the maximum 3") as info:
        unpackb_limited(three, max_size=3, max_depth=3, name="datagram")
    assert info.value.field == "datagram"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({1, 2}, "type set"),
        (msgpack.ExtType(1, b"x"), "type ExtType"),
        (msgpack.Timestamp(1), "type Timestamp"),
        ("\udc80", "lone surrogate"),
        (2**64, "outside msgpack's range"),
        (-(2**63) - 1, "outside msgpack's range"),
        ({"a": [object()]}, "type object"),
    ],
)
def test_packb_refuses_what_a_peer_would_refuse(value: Any, reason: str) -> None:
    with pytest.raises(CodecEncodeError, match=reason):
        packb(value)


def test_packb_depth_and_size() -> None:
    deep: Any = 0
    for _ in range(MAX_DEPTH):
        deep = [deep]
    assert unpackb_limited(packb(deep), max_size=1024, max_depth=MAX_DEPTH) == deep
    with pytest.raises(CodecEncodeError, match="deeper"):
        packb([deep])
    with pytest.raises(CodecEncodeError, match="more than the maximum 4"):
        packb("hello", max_size=4)
    assert packb((1, (b"a", "b"), {"k": None})) == raw([1, [b"a", "b"], {"k": None}])


# ---------------------------------------------------------------------------------------------------------------------
# The documentation notation


def test_describe_uses_the_documented_notation() -> None:
    assert Bytes(32, 32).describe() == "bin[32]"
    assert Str(64, 1).describe() == "str[1..64]"
    assert Array(Optional(Int(0, 255)), 8).describe() == "array<int[0..255]?>[..8]"
    assert Optional(OneOf(Nil(), Bool())).describe() == "(nil | bool)?"
    assert Map(Bytes(20, 20), Literal("a", 1), 4).describe() == 'map<bin[20], "a" | 1>[..4]'
    assert Tuple(Str(16), Nil()).describe() == "tuple(str[..16], nil)"
    assert ENVELOPE.definition().splitlines() == [
        "envelope {",
        "  v:         int[1..1]",
        "  id:        bin[16]",
        '  kind:      "text" | "file"',
        "  body:      body",
        "  reply_to:  bin[16]?",
        "  ttl?:      int[0..4294967295]",
        "  score?:    float",
        "}",
    ]


def test_worked_example_of_the_protocol_document() -> None:
    """docs/protocol.md, section 2.2: the example encodes to exactly the bytes shown there."""
    example = Struct("example", {"v": Int(1, 1), "id": Bytes(4, 4), "text": Str(16)}, {"tags": Array(Str(8), 4)})
    encoded = example.encode({"v": 1, "id": b"\x01\x02\x03\x04", "text": "hé", "tags": ["a"]})
    assert (
        encoded.hex(" ") == "84 a1 76 01 a2 69 64 c4 04 01 02 03 04 a4 74 65 78 74 a3 68 c3 a9 a4 74 61 67 73 91 a1 61"
    )
    rejected = {
        "85 a1 76 01 a2 69 64 c4 04 01 02 03 04 a4 74 65 78 74 a3 68 c3 a9 a4 74 61 67 73 91 a1 61 a1 78 c0": (
            "example.x: unknown field"
        ),
        "83 a1 76 01 a2 69 64 c4 04 01 02 03 04 a4 74 65 78 74 c4 01 68": "example.text: expected str, got bin",
        "82 a1 76 01 a1 76 01": "example: a map repeats a key",
        "db ff ff ff ff 78 78 78 78 78": "example: truncated msgpack value",
    }
    for frame, message in rejected.items():
        with pytest.raises(CodecError) as info:
            example.decode(bytes.fromhex(frame))
        assert str(info.value) == message

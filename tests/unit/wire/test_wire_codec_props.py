"""Property tests of the codec: random schemas round-trip their values, hostile bytes only ever give CodecError."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import msgpack
import umsgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pmsg.wire.codec import (
    MSGPACK_INT_MAX,
    MSGPACK_INT_MIN,
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
    Schema,
    Str,
    Struct,
    Tuple,
    packb,
    unpackb_limited,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------------------------------
# Random schemas and values that fit them

field_names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=6)


@st.composite
def int_schemas(draw: st.DrawFn) -> Int:
    lo = draw(st.integers(MSGPACK_INT_MIN, MSGPACK_INT_MAX))
    hi = draw(st.integers(lo, MSGPACK_INT_MAX))
    return Int(lo, hi)


@st.composite
def len_bounds(draw: st.DrawFn) -> tuple[int, int]:
    hi = draw(st.integers(0, 40))
    return draw(st.integers(0, hi)), hi


leaf_schemas: st.SearchStrategy[Schema[Any]] = st.one_of(
    st.just(Nil()),
    st.just(Bool()),
    st.just(Float()),
    int_schemas(),
    len_bounds().map(lambda b: Bytes(b[1], b[0])),
    len_bounds().map(lambda b: Str(b[1], b[0])),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=4)), min_size=1, max_size=3, unique=True).map(
        lambda vs: Literal(*vs)
    ),
)


def _containers(children: st.SearchStrategy[Schema[Any]]) -> st.SearchStrategy[Schema[Any]]:
    return st.one_of(
        st.builds(Optional, children),
        st.builds(lambda item, n: Array(item, n), children, st.integers(0, 4)),
        st.lists(children, min_size=1, max_size=3).map(lambda items: Tuple(*items)),
        st.builds(
            lambda k, v, n: Map(k, v, n), st.sampled_from([Str(8), Bytes(8), Int(-9, 9)]), children, st.integers(0, 3)
        ),
        st.builds(
            lambda req, opt, open_: Struct(
                "s", req, {k: v for k, v in opt.items() if k not in req}, allow_unknown=open_
            ),
            st.dictionaries(field_names, children, max_size=3),
            st.dictionaries(field_names, children, max_size=2),
            st.booleans(),
        ),
    )


schemas = st.recursive(leaf_schemas, _containers, max_leaves=8)


def values_for(schema: Schema[Any]) -> st.SearchStrategy[Any]:
    """A strategy for values that ``schema`` accepts, in the shape its decoder returns."""
    if isinstance(schema, Nil):
        return st.none()
    if isinstance(schema, Bool):
        return st.booleans()
    if isinstance(schema, Float):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(schema, Int):
        return st.integers(schema.min_value, schema.max_value)
    if isinstance(schema, Bytes):
        return st.binary(min_size=schema.min_len, max_size=schema.max_len)
    if isinstance(schema, Str):
        return st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=schema.max_len).filter(
            lambda s: schema.min_len <= len(s.encode()) <= schema.max_len
        )
    if isinstance(schema, Literal):
        return st.sampled_from(list(schema._ordered))
    if isinstance(schema, Optional):
        return st.one_of(st.none(), values_for(schema.inner))
    if isinstance(schema, OneOf):
        return st.one_of(*(values_for(a) for a in schema.alternatives))
    if isinstance(schema, Array):
        return st.lists(values_for(schema.item), min_size=schema.min_items, max_size=schema.max_items)
    if isinstance(schema, Tuple):
        return st.tuples(*(values_for(i) for i in schema.items))
    if isinstance(schema, Map):
        return st.dictionaries(values_for(schema.key), values_for(schema.value), max_size=schema.max_items)
    if isinstance(schema, Struct):
        return st.fixed_dictionaries(
            {k: values_for(s) for k, s in schema.fields.items()},
            optional={k: values_for(s) for k, s in schema.optional.items()},
        )
    raise AssertionError(f"no strategy for {schema!r}")


def _same(a: Any, b: Any) -> bool:
    """Equality that also tells 1 from True and 1.0 (the codec must keep them apart)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# ---------------------------------------------------------------------------------------------------------------------
# Properties


@SETTINGS
@given(st.data(), schemas)
def test_valid_values_round_trip(data: st.DataObject, schema: Schema[Any]) -> None:
    value = data.draw(values_for(schema))
    encoded = schema.encode(value)
    assert _same(schema.decode(encoded), value)
    assert _same(schema.validate(msgpack.unpackb(encoded, strict_map_key=False)), value)


@SETTINGS
@given(st.data(), schemas)
def test_mutated_frames_give_only_codec_error(data: st.DataObject, schema: Schema[Any]) -> None:
    encoded = bytearray(schema.encode(data.draw(values_for(schema))))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, len(encoded)))
        if action == "flip" and pos < len(encoded):
            encoded[pos] = data.draw(st.integers(0, 255))
        elif action == "insert":
            encoded[pos:pos] = data.draw(st.binary(min_size=1, max_size=5))
        elif action == "delete":
            del encoded[pos : pos + 1]
        else:
            del encoded[pos:]
    with contextlib.suppress(CodecError):
        schema.decode(bytes(encoded))


@SETTINGS
@given(st.binary(max_size=200), schemas)
def test_arbitrary_bytes_give_only_codec_error(blob: bytes, schema: Schema[Any]) -> None:
    with contextlib.suppress(CodecError):
        schema.decode(blob)


@SETTINGS
@given(
    st.binary(max_size=300),
    st.integers(0, 6),
    st.integers(0, 64),
    st.integers(0, 64),
    st.integers(0, 16),
    st.booleans(),
)
def test_unpackb_limited_gives_only_codec_error_and_respects_limits(
    blob: bytes, depth: int, strs: int, items: int, pairs: int, str_keys: bool
) -> None:
    try:
        value = unpackb_limited(
            blob,
            max_size=256,
            max_depth=depth,
            max_str_len=strs,
            max_bin_len=strs,
            max_array_len=items,
            max_map_len=pairs,
            str_keys_only=str_keys,
        )
    except CodecError:
        return
    assert len(blob) <= 256
    stack = [(value, 0)]
    while stack:  # what came back obeys every limit
        item, level = stack.pop()
        if isinstance(item, list | dict):
            assert level < depth
            assert len(item) <= (items if isinstance(item, list) else pairs)
            children = list(item) if isinstance(item, list) else [*item.keys(), *item.values()]
            if isinstance(item, dict) and str_keys:
                assert all(type(k) is str for k in item)
            stack.extend((c, level + 1) for c in children)
        elif isinstance(item, str):
            assert len(item.encode()) <= strs
        elif isinstance(item, bytes):
            assert len(item) <= strs
        else:
            assert item is None or isinstance(item, bool | int | float)


plain_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(MSGPACK_INT_MIN, MSGPACK_INT_MAX),
        st.floats(allow_nan=False),
        st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20),
        st.binary(max_size=20),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@SETTINGS
@given(plain_values)
def test_plain_values_round_trip_through_packb(value: Any) -> None:
    assert _same(unpackb_limited(packb(value), max_size=1 << 16, max_depth=32), value)


@SETTINGS
@given(plain_values, st.binary(min_size=1, max_size=8), st.integers(0, 10**6))
def test_spliced_plain_frames_give_only_codec_error(value: Any, junk: bytes, where: int) -> None:
    frame = packb(value)
    pos = where % (len(frame) + 1)
    for candidate in (frame[:pos] + junk + frame[pos:], frame[:pos] + junk + frame[pos + len(junk) :]):
        with contextlib.suppress(CodecError):
            unpackb_limited(candidate, max_size=4096, max_depth=3, max_str_len=8, max_array_len=3, max_map_len=3)


dht_values = st.recursive(
    st.one_of(st.binary(max_size=24), st.text(max_size=12), st.integers(-(2**63), 2**64 - 1)),
    lambda children: st.lists(children, max_size=4),
    max_leaves=12,
)


@SETTINGS
@given(dht_values)
def test_umsgpack_interoperates_both_ways(value: Any) -> None:
    assert _same(unpackb_limited(umsgpack.packb(value), max_size=4096, max_depth=32), value)
    assert _same(umsgpack.unpackb(packb(value)), value)


@SETTINGS
@given(st.integers(0, 64), st.integers(1, 64), st.sampled_from(["str", "bin", "array", "map"]))
def test_each_length_limit_is_enforced(limit: int, over: int, kind: str) -> None:
    n = limit + over
    schema: Schema[Any]
    if kind == "str":
        schema, good, bad = Str(limit), "x" * limit, "x" * n
    elif kind == "bin":
        schema, good, bad = Bytes(limit), b"x" * limit, b"x" * n
    elif kind == "array":
        schema, good, bad = Array(Nil(), limit), [None] * limit, [None] * n
    else:
        schema = Map(Int(0, 200), Nil(), limit)
        good, bad = dict.fromkeys(range(limit)), dict.fromkeys(range(n))
    assert schema.decode(schema.encode(good)) == good
    wire = msgpack.packb(bad, use_bin_type=True)
    try:
        schema.decode(wire)
    except CodecError as exc:
        assert "maximum" in exc.reason or "over the limit" in exc.reason
    else:
        raise AssertionError(f"{schema!r} accepted {n} > {limit}")
    try:
        schema.encode(bad)
    except CodecEncodeError:
        pass
    else:
        raise AssertionError(f"{schema!r} encoded {n} > {limit}")


@SETTINGS
@given(st.floats(), st.integers())
def test_float_and_int_bounds(x: float, i: int) -> None:
    try:
        assert Float().decode(msgpack.packb(x)) == x
        assert math.isfinite(x)
    except CodecError:
        assert not math.isfinite(x)
    bounded = Int(-1000, 1000)
    if MSGPACK_INT_MIN <= i <= MSGPACK_INT_MAX:
        try:
            assert bounded.decode(msgpack.packb(i)) == i
            assert -1000 <= i <= 1000
        except CodecError:
            assert not -1000 <= i <= 1000

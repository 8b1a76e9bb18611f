"""Strict msgpack codec: declared schemas turn untrusted bytes into validated Python values.

Theory of operation
-------------------
Every p2pmsg format that is not a fixed byte layout is one msgpack value.  Bytes from the network go through two
gates before any protocol code sees them:

1. **Bounded unpacking.**  :func:`msgpack.unpackb` (the C unpacker that also drives ``msgpack.Unpacker``) runs with
   ``max_str_len``/``max_bin_len``/``max_array_len``/``max_map_len`` set from the schema, so a hostile length header
   (a 4 GiB ``str 32`` in ten bytes, an array of 2**32 elements) is refused *before* anything is allocated.  Ext types
   (including the timestamp ext ``-1``) are refused by ``max_ext_len=0`` plus an ``ext_hook`` that raises; map keys are
   ``str`` only unless the schema declares a :class:`Map` with other keys (``strict_map_key``); ``str`` is decoded as
   strict UTF-8 (``raw=False``) and stays distinct from ``bin``; a map with a repeated key is refused (two parsers
   must never disagree about which value won); trailing bytes after the value are refused; the frame is at most
   :data:`MAX_FRAME_SIZE` bytes.
2. **Schema walk.**  The decoded value is checked against the schema: exact types (``bool`` is not an ``int``),
   integer ranges, byte/str lengths, item counts, required fields present, unknown fields refused unless the
   :class:`Struct` opts in with ``allow_unknown=True`` (then they are dropped from the result, after a depth check),
   nesting depth at most :data:`MAX_DEPTH`.  The walk is iterative over fields and builds no error text unless
   something is wrong: on failure an internal exception collects the path on its way up, and the caller gets a
   :class:`CodecError` such as ``envelope.body.text: str is 300 bytes long, more than the maximum 256``.

Encoding runs the same schema walk first (so nothing that the peer would refuse ever leaves this node) and raises
:class:`CodecEncodeError` -- a *local* error -- when the value does not fit its schema.

For formats that are not described by a schema (the DHT's ``[name, args]`` arrays produced by ``umsgpack`` in the
PyPI ``kademlia``/``rpcudp`` packages), :func:`unpackb_limited` applies gate 1 with explicit limits and a depth walk,
and :func:`packb` packs a plain value after checking that it only holds msgpack's core types.

The schema vocabulary (its notation in ``docs/protocol.md`` in brackets)::

    Nil()                     nil
    Bool()                    bool
    Int(lo, hi)               int[lo..hi]
    Float(finite=True)        float
    Bytes(max_len, min_len)   bin[min..max]          (bin[n] when min == max)
    Str(max_len, min_len)     str[min..max]          (length in UTF-8 bytes)
    Literal(v1, v2, ...)      "v1" | "v2" | ...      (exact values, str or int)
    Array(item, max_items)    array<item>[min..max]
    Tuple(a, b, ...)          tuple(a, b, ...)       (fixed-length array)
    Map(key, value, max)      map<key, value>[..max]
    Optional(x)               x?                     (x or nil)
    OneOf(a, b, ...)          a | b | ...
    Struct(name, fields, optional, allow_unknown)    Name { field: type, field?: type }
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, Final, Generic, TypeVar

import msgpack

from p2pmsg.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_DEPTH",
    "MAX_FRAME_SIZE",
    "Array",
    "Bool",
    "Bytes",
    "CodecEncodeError",
    "CodecError",
    "Float",
    "Int",
    "Literal",
    "Map",
    "Nil",
    "OneOf",
    "Optional",
    "Schema",
    "SchemaError",
    "Str",
    "Struct",
    "Tuple",
    "packb",
    "unpackb_limited",
]

#: Largest msgpack frame any p2pmsg decoder accepts, in bytes (1 MiB).  Protocols may set a lower limit.
MAX_FRAME_SIZE: Final = 1 << 20

#: Deepest nesting accepted: a top-level array or map is depth 1, each container inside adds one; scalars add none.
MAX_DEPTH: Final = 32

#: The integer range msgpack can represent.
MSGPACK_INT_MIN: Final = -(1 << 63)
MSGPACK_INT_MAX: Final = (1 << 64) - 1

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


class CodecError(RemoteProtocolError):
    """Received bytes are not a valid frame for the expected schema.

    ``field`` is the dotted path of the offending value (``envelope.body.text``, ``find_node.args[1]``; just the root
    name when the frame as a whole is bad) and ``reason`` says what is wrong with it.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class CodecEncodeError(LocalProtocolError):
    """A value given to an encoder does not fit its schema (a bug on this side); ``field`` and ``reason`` as above."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class SchemaError(LocalProtocolError):
    """A schema was declared inconsistently (for example ``Int(5, 1)``, or nested deeper than :data:`MAX_DEPTH`)."""


class _Invalid(Exception):
    """Internal: a value failed its check.  ``path`` collects path elements innermost first on the way up."""

    __slots__ = ("path", "reason")

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []


class _Rejected(ValueError):
    """Internal: raised from msgpack hooks (ext types, repeated map keys) to abort unpacking."""


def _join_path(root: str, path: list[str]) -> str:
    return root + "".join(reversed(path))


def _type_name(value: object) -> str:
    """The msgpack name of a decoded value's type, for error messages."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes | bytearray | memoryview):
        return "bin"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "map"
    return type(value).__name__


def _field_suffix(key: object) -> str:
    if isinstance(key, str) and key.isidentifier():
        return "." + key
    return f"[{key!r}]"


# ---------------------------------------------------------------------------------------------------------------------
# Raw bounded unpacking and packing
# ---------------------------------------------------------------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> object:
    raise _Rejected(f"ext type {code} is not allowed")


def _pairs_to_dict(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    try:
        result = dict(pairs)
    except TypeError:
        raise _Rejected("a map key is an array or map; keys must be scalars") from None
    if len(result) != len(pairs):
        raise _Rejected("a map repeats a key")
    return result


def _describe_unpack_error(exc: Exception) -> str:
    if isinstance(exc, _Rejected):
        return str(exc)
    if isinstance(exc, msgpack.ExtraData):
        return "trailing bytes after the msgpack value"
    if isinstance(exc, msgpack.StackError):
        return "nesting is deeper than the unpacker's stack"
    if isinstance(exc, msgpack.FormatError):
        return "invalid msgpack type byte (0xc1)"
    if isinstance(exc, UnicodeDecodeError):
        return f"str is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    text = str(exc)
    if "exceeds max_" in text:
        return f"length header over the limit: {text}"
    if "incomplete" in text:
        return "truncated msgpack value"
    return f"malformed msgpack: {text or type(exc).__name__}"


def _unpacker(
    *, max_str_len: int, max_bin_len: int, max_array_len: int, max_map_len: int, strict_map_key: bool
) -> Callable[[Any], Any]:
    """``msgpack.unpackb`` with every p2pmsg rule and the given length limits bound in."""
    return functools.partial(
        msgpack.unpackb,
        raw=False,
        use_list=True,
        strict_map_key=strict_map_key,
        object_pairs_hook=_pairs_to_dict,
        ext_hook=_reject_ext,
        max_str_len=max_str_len,
        max_bin_len=max_bin_len,
        max_array_len=max_array_len,
        max_map_len=max_map_len,
        max_ext_len=0,
    )


def _unpack(data: bytes | bytearray | memoryview, root: str, max_size: int, unpack: Callable[[Any], Any]) -> Any:
    if type(data) is bytes or isinstance(data, bytearray):
        size = len(data)
    elif isinstance(data, memoryview):
        size = data.nbytes
    else:
        raise TypeError(f"{root}: expected bytes to decode, got {type(data).__name__}")
    if size > max_size:
        raise CodecError(root, f"frame is {size} bytes, more than the maximum {max_size}")
    if size == 0:
        raise CodecError(root, "empty frame")
    try:
        return unpack(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CodecError(root, _describe_unpack_error(exc)) from None


def _check_plain(value: object, budget: int, *, str_keys: bool) -> None:
    """Check that ``value`` nests at most ``budget`` containers deep and, if ``str_keys``, has only str map keys.

    ``value`` comes from the unpacker, so its containers are exactly ``list`` and ``dict``.  Iterative, so deep input
    cannot exhaust the Python stack; a flat container costs one C-level pass.  Raises :class:`_Invalid`.
    """
    if type(value) is not list and type(value) is not dict:
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > budget:
            raise _Invalid(f"nesting is deeper than {budget} levels")
        if type(item) is dict:
            if str_keys and not set(map(type, item)) <= _STR_ONLY:
                bad = next(k for k in item if type(k) is not str)
                raise _Invalid(f"map key of type {_type_name(bad)}; only str keys are allowed here")
            children: Any = item.values()
        else:
            children = item
        kinds = set(map(type, children))
        if list in kinds or dict in kinds:
            stack.extend((child, depth + 1) for child in children if type(child) is list or type(child) is dict)


_STR_ONLY: Final = frozenset({str})


def unpackb_limited(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int,
    max_depth: int,
    max_str_len: int | None = None,
    max_bin_len: int | None = None,
    max_array_len: int | None = None,
    max_map_len: int | None = None,
    str_keys_only: bool = True,
    name: str = "message",
) -> Any:
    """Decode one msgpack value from untrusted ``data`` with explicit bounds and no schema.

    The ``max_*_len`` limits apply to every str (in bytes), bin, array (items) and map (pairs) anywhere in the value
    and are checked on the length header, before anything is allocated; ``None`` means ``len(data)`` (no header can
    honestly claim more than that).  Only msgpack's core types come back: ``None``, ``bool``, ``int``, ``float``,
    ``str``, ``bytes``, ``list`` and ``dict``.  Map keys must be ``str`` unless ``str_keys_only=False`` (then any
    scalar).  A frame over ``max_size``, ext types, repeated map keys, trailing bytes, invalid UTF-8 and nesting
    deeper than ``max_depth`` raise :class:`CodecError` with ``name`` as the field.  Decodes ``umsgpack`` output (as
    sent by the PyPI ``kademlia`` package) exactly like ``msgpack`` output.
    """
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    unpack = _unpacker(
        max_str_len=size if max_str_len is None else max_str_len,
        max_bin_len=size if max_bin_len is None else max_bin_len,
        max_array_len=size if max_array_len is None else max_array_len,
        max_map_len=size if max_map_len is None else max_map_len,
        strict_map_key=str_keys_only,
    )
    value = _unpack(data, name, max_size, unpack)
    try:
        _check_plain(value, max_depth, str_keys=str_keys_only)
    except _Invalid as exc:
        raise CodecError(name, exc.reason) from None
    return value


#: Scalar types that pack as themselves with nothing to check.
_SAFE_SCALARS: Final = frozenset({type(None), bool, float, bytes, bytearray})


def _check_scalar(item: object) -> None:
    if isinstance(item, str):
        if not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _Invalid("str holds a lone surrogate and cannot be encoded as UTF-8") from None
    elif isinstance(item, int) and not isinstance(item, bool):
        if not MSGPACK_INT_MIN <= item <= MSGPACK_INT_MAX:
            raise _Invalid(f"int {item} is outside msgpack's range")
    elif type(item) not in _SAFE_SCALARS:
        raise _Invalid(f"type {type(item).__name__} cannot be sent (core msgpack types only)")


def _check_packable(value: object) -> None:
    """Raise :class:`_Invalid` unless ``value`` holds only core msgpack types within :data:`MAX_DEPTH`."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is dict:
            children: Any = [*item.keys(), *item.values()]
        elif kind is list or kind is tuple:
            children = item
        else:
            _check_scalar(item)
            continue
        if depth >= MAX_DEPTH:
            raise _Invalid(f"nesting is deeper than {MAX_DEPTH} levels")
        if set(map(type, children)) <= _SAFE_SCALARS:
            continue
        for child in children:
            kind = type(child)
            if kind is list or kind is tuple or kind is dict:
                stack.append((child, depth + 1))
            elif kind not in _SAFE_SCALARS:
                _check_scalar(child)


def _pack(value: object) -> bytes:
    result: bytes = msgpack.packb(value, use_bin_type=True, datetime=False)
    return result


def packb(obj: object, *, max_size: int | None = None, name: str = "message") -> bytes:
    """Pack a plain value (``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, lists/tuples, dicts).

    ``str`` becomes msgpack str and ``bytes``/``bytearray`` become bin; tuples become arrays.  Anything else (ext
    types, timestamps, sets, out-of-range ints, lone surrogates), nesting deeper than :data:`MAX_DEPTH` or a result
    larger than ``max_size`` (when given) raises :class:`CodecEncodeError`.
    """
    try:
        _check_packable(obj)
    except _Invalid as exc:
        raise CodecEncodeError(name, exc.reason) from None
    data = _pack(obj)
    if max_size is not None and len(data) > max_size:
        raise CodecEncodeError(name, f"encoded frame is {len(data)} bytes, more than the maximum {max_size}")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------------------------------


class _Limits:
    """Largest str/bin/array/map length a schema can accept anywhere: the coarse limits handed to the unpacker."""

    __slots__ = ("array", "bin", "map", "non_str_keys", "str")

    def __init__(self, *, str: int = 0, bin: int = 0, array: int = 0, map: int = 0, non_str_keys: bool = False) -> None:
        self.str = str
        self.bin = bin
        self.array = array
        self.map = map
        self.non_str_keys = non_str_keys

    @classmethod
    def union(cls, *items: _Limits) -> _Limits:
        return cls(
            str=max((i.str for i in items), default=0),
            bin=max((i.bin for i in items), default=0),
            array=max((i.array for i in items), default=0),
            map=max((i.map for i in items), default=0),
            non_str_keys=any(i.non_str_keys for i in items),
        )


#: Floors of the unpacker's coarse limits (see ``Schema.__init__``).
_SCALAR_FLOOR: Final = 64
_CONTAINER_FLOOR: Final = 16

_UNBOUNDED: Final = _Limits(
    str=MAX_FRAME_SIZE, bin=MAX_FRAME_SIZE, array=MAX_FRAME_SIZE, map=MAX_FRAME_SIZE, non_str_keys=False
)


class Schema(Generic[T]):
    """Base class of every schema node.  A schema can be used at the top level or nested inside another.

    Subclasses implement ``_check(value, depth, encoding)``: validate ``value`` (found inside ``depth`` enclosing
    containers), return the value to hand out, raise :class:`_Invalid` otherwise.
    """

    __slots__ = ("_unpack", "depth", "limits", "name")

    #: How many container levels this schema adds (0 for scalars).
    depth: int
    #: Coarse length limits for the unpacker.
    limits: _Limits
    #: Root name used in error paths when this schema is decoded at the top level.
    name: str

    def __init__(self, *, depth: int, limits: _Limits, name: str = "value") -> None:
        if depth > MAX_DEPTH:
            raise SchemaError(f"{name}: schema nests {depth} levels, more than MAX_DEPTH={MAX_DEPTH}")
        self.depth = depth
        self.limits = limits
        self.name = name
        # The unpacker's limits are coarse (one value for the whole frame) and have a small floor, so that a
        # merely mistyped field still reaches the schema walk and gets an error message naming the field.
        self._unpack = _unpacker(
            max_str_len=max(limits.str, _SCALAR_FLOOR),
            max_bin_len=max(limits.bin, _SCALAR_FLOOR),
            max_array_len=max(limits.array, _CONTAINER_FLOOR),
            max_map_len=max(limits.map, _CONTAINER_FLOOR),
            strict_map_key=not limits.non_str_keys,
        )

    def _check(self, value: Any, depth: int, encoding: bool) -> T:
        raise NotImplementedError

    def describe(self) -> str:
        """This schema in the notation of ``docs/protocol.md`` (``bin[32]``, ``array<str[..64]>[..8]``...)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def decode(self, data: bytes | bytearray | memoryview, *, max_size: int = MAX_FRAME_SIZE) -> T:
        """Decode untrusted ``data`` (exactly one msgpack value) and validate it; raise :class:`CodecError`."""
        value = _unpack(data, self.name, max_size, self._unpack)
        try:
            return self._check(value, 0, False)
        except _Invalid as exc:
            raise CodecError(_join_path(self.name, exc.path), exc.reason) from None

    def validate(self, value: object, *, name: str | None = None) -> T:
        """Validate an already-decoded untrusted value (for example from :func:`unpackb_limited`).

        Raises :class:`CodecError` naming the path from ``name`` (default: the schema's name).
        """
        try:
            return self._check(value, 0, False)
        except _Invalid as exc:
            raise CodecError(_join_path(self.name if name is None else name, exc.path), exc.reason) from None

    def encode(self, value: object, *, max_size: int = MAX_FRAME_SIZE) -> bytes:
        """Validate ``value`` against this schema and pack it; raise :class:`CodecEncodeError` if it does not fit."""
        try:
            checked = self._check(value, 0, True)
        except _Invalid as exc:
            raise CodecEncodeError(_join_path(self.name, exc.path), exc.reason) from None
        data = _pack(checked)
        if len(data) > max_size:
            raise CodecEncodeError(self.name, f"encoded frame is {len(data)} bytes, more than the maximum {max_size}")
        return data


def _check_len_bounds(kind: str, min_len: int, max_len: int) -> None:
    if min_len < 0 or max_len < min_len or max_len > MAX_FRAME_SIZE:
        raise SchemaError(f"{kind}: need 0 <= min_len <= max_len <= MAX_FRAME_SIZE, got {min_len}..{max_len}")


def _range_text(min_len: int, max_len: int) -> str:
    if min_len == max_len:
        return f"[{max_len}]"
    if min_len == 0:
        return f"[..{max_len}]"
    return f"[{min_len}..{max_len}]"


class Nil(Schema[None]):
    """msgpack nil, decoded as ``None``."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(depth=0, limits=_Limits())

    def _check(self, value: Any, depth: int, encoding: bool) -> None:
        if value is not None:
            raise _Invalid(f"expected nil, got {_type_name(value)}")

    def describe(self) -> str:
        return "nil"


class Bool(Schema[bool]):
    """msgpack true/false.  Integers are not booleans."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(depth=0, limits=_Limits())

    def _check(self, value: Any, depth: int, encoding: bool) -> bool:
        if value is True or value is False:
            return bool(value)
        raise _Invalid(f"expected bool, got {_type_name(value)}")

    def describe(self) -> str:
        return "bool"


class Int(Schema[int]):
    """A msgpack integer in ``[min_value, max_value]`` (both inclusive).  Booleans and floats are refused."""

    __slots__ = ("max_value", "min_value")

    def __init__(self, min_value: int, max_value: int) -> None:
        if not MSGPACK_INT_MIN <= min_value <= max_value <= MSGPACK_INT_MAX:
            raise SchemaError(
                f"Int: need {MSGPACK_INT_MIN} <= min <= max <= {MSGPACK_INT_MAX}, got {min_value}..{max_value}"
            )
        super().__init__(depth=0, limits=_Limits())
        self.min_value = min_value
        self.max_value = max_value

    def _check(self, value: Any, depth: int, encoding: bool) -> int:
        if type(value) is not int:
            if not (encoding and isinstance(value, int) and not isinstance(value, bool)):
                raise _Invalid(f"expected int, got {_type_name(value)}")
            value = int(value)
        if not self.min_value <= value <= self.max_value:
            raise _Invalid(f"int {value} is outside {self.min_value}..{self.max_value}")
        result: int = value
        return result

    def describe(self) -> str:
        return f"int[{self.min_value}..{self.max_value}]"


class Float(Schema[float]):
    """A msgpack float 32 or float 64.  With ``finite=True`` (the default) NaN and infinities are refused."""

    __slots__ = ("finite",)

    def __init__(self, *, finite: bool = True) -> None:
        super().__init__(depth=0, limits=_Limits())
        self.finite = finite

    def _check(self, value: Any, depth: int, encoding: bool) -> float:
        if type(value) is not float:
            raise _Invalid(f"expected float, got {_type_name(value)}")
        if self.finite and not math.isfinite(value):
            raise _Invalid(f"float {value} is not finite")
        return value

    def describe(self) -> str:
        return "float" if self.finite else "float (NaN and infinities allowed)"


class Bytes(Schema[bytes]):
    """A msgpack bin of ``min_len`` to ``max_len`` bytes, decoded as ``bytes``.  A str is never accepted as bin."""

    __slots__ = ("max_len", "min_len")

    def __init__(self, max_len: int, min_len: int = 0) -> None:
        _check_len_bounds("Bytes", min_len, max_len)
        super().__init__(depth=0, limits=_Limits(bin=max_len))
        self.max_len = max_len
        self.min_len = min_len

    def _check(self, value: Any, depth: int, encoding: bool) -> bytes:
        if type(value) is not bytes:
            if not (encoding and isinstance(value, bytearray)):
                raise _Invalid(f"expected bin, got {_type_name(value)}")
            value = bytes(value)
        n = len(value)
        if n > self.max_len:
            raise _Invalid(f"bin is {n} bytes long, more than the maximum {self.max_len}")
        if n < self.min_len:
            raise _Invalid(f"bin is {n} bytes long, less than the minimum {self.min_len}")
        result: bytes = value
        return result

    def describe(self) -> str:
        return "bin" + _range_text(self.min_len, self.max_len)


class Str(Schema[str]):
    """A msgpack str (valid UTF-8) of ``min_len`` to ``max_len`` *bytes* once encoded, decoded as ``str``."""

    __slots__ = ("max_len", "min_len")

    def __init__(self, max_len: int, min_len: int = 0) -> None:
        _check_len_bounds("Str", min_len, max_len)
        super().__init__(depth=0, limits=_Limits(str=max_len))
        self.max_len = max_len
        self.min_len = min_len

    def _check(self, value: Any, depth: int, encoding: bool) -> str:
        if type(value) is not str:
            raise _Invalid(f"expected str, got {_type_name(value)}")
        n = len(value)
        if n > self.max_len:  # at least n bytes: too long whatever the encoding; measure it for the message
            try:
                n = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise _Invalid("str holds a lone surrogate and is not valid UTF-8") from None
            raise _Invalid(f"str is {n} bytes long, more than the maximum {self.max_len}")
        if not value.isascii() and (encoding or n * 4 > self.max_len or self.min_len > n):
            try:
                n = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise _Invalid("str holds a lone surrogate and is not valid UTF-8") from None
            if n > self.max_len:
                raise _Invalid(f"str is {n} bytes long, more than the maximum {self.max_len}")
        if n < self.min_len:
            raise _Invalid(f"str is {n} bytes long, less than the minimum {self.min_len}")
        return value

    def describe(self) -> str:
        return "str" + _range_text(self.min_len, self.max_len)


class Literal(Schema[Any]):
    """Exactly one of the given ``str`` or ``int`` values (type and value must both match: ``1`` is not ``True``)."""

    __slots__ = ("_ordered", "values")

    def __init__(self, *values: str | int) -> None:
        if not values:
            raise SchemaError("Literal: needs at least one value")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, str | int):
                raise SchemaError(f"Literal: values must be str or int, got {v!r}")
            if isinstance(v, int) and not MSGPACK_INT_MIN <= v <= MSGPACK_INT_MAX:
                raise SchemaError(f"Literal: int {v} is outside msgpack's range")
        str_max = max((len(v.encode("utf-8")) for v in values if isinstance(v, str)), default=0)
        super().__init__(depth=0, limits=_Limits(str=str_max))
        self.values: frozenset[tuple[type, str | int]] = frozenset((type(v), v) for v in values)
        self._ordered = values

    def _check(self, value: Any, depth: int, encoding: bool) -> Any:
        if (type(value) is not str and type(value) is not int) or (type(value), value) not in self.values:
            shown = value if isinstance(value, str | int) and len(repr(value)) <= 40 else _type_name(value)
            raise _Invalid(f"{shown!r} is not one of {self.describe()}")
        return value

    def describe(self) -> str:
        return " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in self._ordered)


class Optional(Schema[T | None]):
    """``inner`` or nil (``None``).  Not the same as an optional :class:`Struct` field, which may be absent."""

    __slots__ = ("inner",)

    def __init__(self, inner: Schema[T]) -> None:
        super().__init__(depth=inner.depth, limits=inner.limits)
        self.inner = inner

    def _check(self, value: Any, depth: int, encoding: bool) -> T | None:
        if value is None:
            return None
        return self.inner._check(value, depth, encoding)

    def describe(self) -> str:
        inner = self.inner.describe()
        return f"({inner})?" if " " in inner else f"{inner}?"


class OneOf(Schema[Any]):
    """The first alternative that accepts the value wins; if none does, the reasons of all of them are reported."""

    __slots__ = ("alternatives",)

    def __init__(self, *alternatives: Schema[Any]) -> None:
        if len(alternatives) < 2:
            raise SchemaError("OneOf: needs at least two alternatives")
        super().__init__(
            depth=max(a.depth for a in alternatives), limits=_Limits.union(*(a.limits for a in alternatives))
        )
        self.alternatives = alternatives

    def _check(self, value: Any, depth: int, encoding: bool) -> Any:
        reasons = []
        for alternative in self.alternatives:
            try:
                return alternative._check(value, depth, encoding)
            except _Invalid as exc:
                where = _join_path("", exc.path)
                reasons.append(f"{alternative.describe()}: {where + ': ' if where else ''}{exc.reason}")
        raise _Invalid("matches no alternative (" + "; ".join(reasons) + ")")

    def describe(self) -> str:
        return " | ".join(a.describe() for a in self.alternatives)


class Array(Schema[list[T]]):
    """A msgpack array of ``min_items`` to ``max_items`` items, each matching ``item``; decoded as a ``list``."""

    __slots__ = ("item", "max_items", "min_items")

    def __init__(self, item: Schema[T], max_items: int, *, min_items: int = 0, name: str = "value") -> None:
        _check_len_bounds("Array", min_items, max_items)
        lim = _Limits.union(item.limits, _Limits(array=max_items))
        super().__init__(depth=1 + item.depth, limits=lim, name=name)
        self.item = item
        self.max_items = max_items
        self.min_items = min_items

    def _check(self, value: Any, depth: int, encoding: bool) -> list[T]:
        if type(value) is not list and not (encoding and isinstance(value, tuple)):
            raise _Invalid(f"expected array, got {_type_name(value)}")
        n = len(value)
        if n > self.max_items:
            raise _Invalid(f"array has {n} items, more than the maximum {self.max_items}")
        if n < self.min_items:
            raise _Invalid(f"array has {n} items, less than the minimum {self.min_items}")
        check = self.item._check
        depth += 1
        out: list[T] = []
        append = out.append
        index = 0
        try:
            for index, item in enumerate(value):  # noqa: B007 -- index is read in the handler
                append(check(item, depth, encoding))
        except _Invalid as exc:
            exc.path.append(f"[{index}]")
            raise
        return out

    def describe(self) -> str:
        return f"array<{self.item.describe()}>{_range_text(self.min_items, self.max_items)}"


class Tuple(Schema[tuple[Any, ...]]):
    """A fixed-length msgpack array whose items match ``items`` position by position; decoded as a ``tuple``."""

    __slots__ = ("items",)

    def __init__(self, *items: Schema[Any], name: str = "value") -> None:
        if not items:
            raise SchemaError("Tuple: needs at least one item")
        lim = _Limits.union(*(i.limits for i in items), _Limits(array=len(items)))
        super().__init__(depth=1 + max(i.depth for i in items), limits=lim, name=name)
        self.items = items

    def _check(self, value: Any, depth: int, encoding: bool) -> tuple[Any, ...]:
        if type(value) is not list and not (encoding and isinstance(value, tuple)):
            raise _Invalid(f"expected array, got {_type_name(value)}")
        if len(value) != len(self.items):
            raise _Invalid(f"array has {len(value)} items, expected exactly {len(self.items)}")
        depth += 1
        out: list[Any] = []
        index = 0
        try:
            for index, (schema, item) in enumerate(zip(self.items, value, strict=True)):  # noqa: B007
                out.append(schema._check(item, depth, encoding))
        except _Invalid as exc:
            exc.path.append(f"[{index}]")
            raise
        return tuple(out)

    def describe(self) -> str:
        return "tuple(" + ", ".join(i.describe() for i in self.items) + ")"


_KEY_SCHEMAS: Final = (Str, Bytes, Int, Literal)


class Map(Schema[dict[K, V]]):
    """A msgpack map of up to ``max_items`` pairs with keys matching ``key`` (``Str``, ``Bytes``, ``Int`` or
    ``Literal``) and values matching ``value``; decoded as a ``dict``.  Non-str keys are allowed only here."""

    __slots__ = ("key", "max_items", "value")

    def __init__(self, key: Schema[K], value: Schema[V], max_items: int, *, name: str = "value") -> None:
        if not isinstance(key, _KEY_SCHEMAS):
            raise SchemaError(f"Map: key schema must be Str, Bytes, Int or Literal, got {key!r}")
        _check_len_bounds("Map", 0, max_items)
        non_str = not isinstance(key, Str) and not (
            isinstance(key, Literal) and all(isinstance(v, str) for v in key._ordered)
        )
        lim = _Limits.union(key.limits, value.limits, _Limits(map=max_items, non_str_keys=non_str))
        super().__init__(depth=1 + value.depth, limits=lim, name=name)
        self.key = key
        self.value = value
        self.max_items = max_items

    def _check(self, value: Any, depth: int, encoding: bool) -> dict[K, V]:
        if type(value) is not dict and not (encoding and isinstance(value, Mapping)):
            raise _Invalid(f"expected map, got {_type_name(value)}")
        if len(value) > self.max_items:
            raise _Invalid(f"map has {len(value)} pairs, more than the maximum {self.max_items}")
        check_key = self.key._check
        check_value = self.value._check
        depth += 1
        out: dict[K, V] = {}
        k: Any = None
        try:
            for k, v in value.items():
                out[check_key(k, depth, encoding)] = check_value(v, depth, encoding)
        except _Invalid as exc:
            exc.path.append(_field_suffix(k))
            raise
        return out

    def describe(self) -> str:
        return f"map<{self.key.describe()}, {self.value.describe()}>[..{self.max_items}]"


class Struct(Schema[dict[str, Any]]):
    """A msgpack map with ``str`` keys: a record with named fields.

    ``fields`` must all be present; ``optional`` fields may be absent (absent fields are absent from the decoded
    dict; an optional field that is present must match its schema -- write ``Optional(x)`` to also allow nil).
    Unknown fields are refused, unless ``allow_unknown=True``: then the decoder drops them (after checking they nest
    no deeper than :data:`MAX_DEPTH` and use only str map keys) so that newer peers can add fields.  Encoding always
    refuses unknown fields.
    """

    __slots__ = ("_optional", "_required", "allow_unknown", "fields", "optional")

    def __init__(
        self,
        name: str,
        fields: Mapping[str, Schema[Any]],
        optional: Mapping[str, Schema[Any]] | None = None,
        *,
        allow_unknown: bool = False,
    ) -> None:
        optional = dict(optional or {})
        both = set(fields) & set(optional)
        if both:
            raise SchemaError(f"{name}: fields declared both required and optional: {sorted(both)}")
        members = {**fields, **optional}
        for key in members:
            if not isinstance(key, str) or not key:
                raise SchemaError(f"{name}: field names must be non-empty str, got {key!r}")
        if allow_unknown:
            lim = _Limits.union(_UNBOUNDED, *(s.limits for s in members.values()))
        else:
            key_len = max((len(k.encode("utf-8")) for k in members), default=0)
            lim = _Limits.union(_Limits(str=key_len, map=len(members)), *(s.limits for s in members.values()))
        super().__init__(depth=1 + max((s.depth for s in members.values()), default=0), limits=lim, name=name)
        self.fields: dict[str, Schema[Any]] = dict(fields)
        self.optional: dict[str, Schema[Any]] = optional
        self.allow_unknown = allow_unknown
        self._required = tuple((k, s._check) for k, s in self.fields.items())
        self._optional = {k: s._check for k, s in optional.items()}

    def _check(self, value: Any, depth: int, encoding: bool) -> dict[str, Any]:
        if type(value) is not dict and not (encoding and isinstance(value, Mapping)):
            raise _Invalid(f"expected map, got {_type_name(value)}")
        depth += 1
        out: dict[str, Any] = {}
        key: Any = None
        try:
            for key, check in self._required:
                try:
                    item = value[key]
                except KeyError:
                    raise _Invalid("required field is missing") from None
                out[key] = check(item, depth, encoding)
            if len(value) != len(out):
                optional = self._optional
                for key, item in value.items():
                    if key in out:
                        continue
                    optional_check = optional.get(key) if type(key) is str else None
                    if optional_check is not None:
                        out[key] = optional_check(item, depth, encoding)
                    elif type(key) is not str:
                        raise _Invalid(f"map key of type {_type_name(key)}; field names are str")
                    elif encoding or not self.allow_unknown:
                        raise _Invalid("unknown field")
                    else:
                        _check_plain(item, MAX_DEPTH - depth, str_keys=True)
        except _Invalid as exc:
            exc.path.append(_field_suffix(key))
            raise
        return out

    def describe(self) -> str:
        return self.name

    def definition(self) -> str:
        """The full definition block in the notation of ``docs/protocol.md``."""
        lines = [f"{self.name} {{" + ("  ; open: unknown fields are ignored" if self.allow_unknown else "")]
        width = max((len(k) + 1 for k in {**self.fields, **self.optional}), default=0)
        for key, schema in self.fields.items():
            lines.append(f"  {(key + ':').ljust(width + 1)} {schema.describe()}")
        for key, schema in self.optional.items():
            lines.append(f"  {(key + '?:').ljust(width + 1)} {schema.describe()}")
        lines.append("}")
        return "\n".join(lines)

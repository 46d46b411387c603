"""Serializers: how results and cached errors become the bytes a store keeps.

A duplicate call returns what the first call returned, read back from the store, so the
round trip must give back an equal value *of the same type*. The default
:class:`JSONSerializer` is a typed JSON that does: tuples stay tuples, ``{1: x}`` stays
different from ``{"1": x}``, datetimes, ``Decimal`` and ``UUID`` come back as themselves.
:class:`PickleSerializer` is there for results JSON cannot hold, when chosen explicitly.

>>> s = get_serializer("json")
>>> s.loads(s.dumps({"ok": True, "at": (1, 2)}))
{'ok': True, 'at': (1, 2)}
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as _dt
import decimal
import enum
import json
import json.encoder
import pathlib
import pickle
import sys
import uuid
import zoneinfo
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, Protocol, runtime_checkable

from idempotask.errors import CachedFailure, ConfigurationError, SerializationError

__all__ = [
    "JSONSerializer",
    "PickleSerializer",
    "Serializer",
    "dump_exception",
    "get_serializer",
    "load_exception",
]


@runtime_checkable
class Serializer(Protocol):
    """Turns the result of an idempotent call into bytes and back.

    Results travel through it twice: ``dumps`` when the first caller completes, ``loads``
    when a duplicate caller is answered from the store. Stores see only the bytes, so a
    serializer alone decides which Python values survive the trip. ``loads(dumps(v))``
    must equal ``v``, types included; both raise
    :class:`~idempotask.errors.SerializationError` when they cannot do their job.
    """

    def dumps(self, value: object) -> bytes:
        """Encode ``value``; raise ``SerializationError`` if it cannot be stored."""
        ...

    def loads(self, data: bytes) -> object:
        """Decode bytes written by ``dumps``; raise ``SerializationError`` otherwise."""
        ...


# --------------------------------------------------------------------------------------
# Typed JSON: the wire format.
#
# Plain JSON values are written as themselves: str, int, float (nan and infinities as
# NaN/Infinity, -0.0 as -0.0), bool, None, lists, and dicts whose keys are all str and do
# not include _MARKER. Everything else is a tagged object {"$t": <tag>, "v": <payload>},
# whose payload is again typed JSON. A user dict that contains _MARKER as a key, or has a
# key that is not a str, is written as the tag "dict" with a flat [k1, v1, k2, v2, ...]
# payload, so any dict on the wire holding _MARKER is one of ours.
# --------------------------------------------------------------------------------------

_MARKER = "$t"
_PAYLOAD = "v"

# Types json writes and reads back unchanged; containers never qualify (tuple -> list).
_SCALARS = frozenset({str, int, float, bool, type(None)})

# When json refuses an int as too long for str() (the int/str digit limit of
# CVE-2020-10735), ints from this size up are written as hex, which the limit exempts;
# smaller ones stay plain JSON numbers.
_BIG_INT = 10**600

_Encoder = Callable[[Any], object]
_Decoder = Callable[[Any], object]


def _type_name(cls: type) -> str:
    """``module.qualname``, or just the name for builtins, as users write it."""
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", None) or getattr(cls, "__name__", repr(cls))
    if not isinstance(module, str) or module == "builtins":
        return str(qualname)
    return f"{module}.{qualname}"


class _EncodeError(Exception):
    """Raised from deep inside the walk; containers add where they are as it unwinds.

    ``child`` is the object that failed at the current level, found by identity in its
    parent so the happy path tracks no positions at all.
    """

    def __init__(self, child: object, reason: str) -> None:
        super().__init__(reason)
        self.child = child
        self.reason = reason
        self.segments: list[str] = []

    def within(self, container: object, segment: str) -> None:
        self.segments.append(segment)
        self.child = container

    def path(self) -> str:
        return "result" + "".join(reversed(self.segments))


def _key_segment(key: object) -> str:
    if type(key) is str:
        return "[" + json.dumps(key, ensure_ascii=False) + "]"
    return f"[{key!r}]"


def _index_of(items: Iterable[object], child: object) -> int:
    for i, item in enumerate(items):
        if item is child:
            return i
    return -1


def _enc(value: object) -> object:
    """Return a JSON-ready tree for ``value`` (anything json can write unchanged)."""
    t = type(value)
    if t in _SCALARS:
        return value
    return _ENCODERS[t](value)


def _enc_items(values: Any) -> list[object]:
    for x in values:
        if type(x) not in _SCALARS:
            return [x if type(x) in _SCALARS else _ENCODERS[type(x)](x) for x in values]
    return list(values)


def _enc_list(value: list[object]) -> object:
    # A list or dict of scalars is JSON already and goes to json as it is; checking is
    # cheaper than copying, and at the sizes of most results a Python loop beats a C scan.
    for x in value:
        if type(x) not in _SCALARS:
            break
    else:
        return value
    try:
        return [x if type(x) in _SCALARS else _ENCODERS[type(x)](x) for x in value]
    except _EncodeError as e:
        e.within(value, f"[{_index_of(value, e.child)}]")
        raise


def _enc_tuple(value: tuple[object, ...]) -> object:
    try:
        return {_MARKER: "tuple", _PAYLOAD: _enc_items(value)}
    except _EncodeError as e:
        e.within(value, f"[{_index_of(value, e.child)}]")
        raise


def _enc_set_like(tag: str) -> _Encoder:
    def encode(value: set[object] | frozenset[object]) -> object:
        try:
            return {_MARKER: tag, _PAYLOAD: _enc_items(value)}
        except _EncodeError as e:
            e.within(value, "[<set item>]")
            raise

    return encode


def _enc_dict(value: dict[Any, object]) -> object:
    if _MARKER in value:
        return _enc_dict_pairs(value)
    items = iter(value.items())
    for k, x in items:
        if type(k) is not str:
            return _enc_dict_pairs(value)
        if type(x) not in _SCALARS:
            break
    else:
        return value
    # One pass in all: the loop below carries on from the first value that needs
    # encoding, over a C-level copy in which only such values are replaced.
    out = value.copy()
    try:
        out[k] = _ENCODERS[type(x)](x)
        for k, x in items:
            if type(k) is not str:
                return _enc_dict_pairs(value)
            if type(x) not in _SCALARS:
                out[k] = _ENCODERS[type(x)](x)
    except _EncodeError as e:
        e.within(value, _dict_segment(value, e.child))
        raise
    return out


def _enc_dict_pairs(value: dict[Any, object]) -> object:
    flat: list[object] = []
    append = flat.append
    try:
        for k, x in value.items():
            append(k if type(k) in _SCALARS else _ENCODERS[type(k)](k))
            append(x if type(x) in _SCALARS else _ENCODERS[type(x)](x))
    except _EncodeError as e:
        e.within(value, _dict_segment(value, e.child))
        raise
    return {_MARKER: "dict", _PAYLOAD: flat}


def _dict_segment(value: dict[Any, object], child: object) -> str:
    for k, x in value.items():
        if k is child:
            return "[<key>]"
        if x is child:
            return _key_segment(k)
    return "[?]"


def _enc_bytes(value: bytes) -> object:
    return {_MARKER: "bytes", _PAYLOAD: base64.b64encode(value).decode("ascii")}


def _enc_bytearray(value: bytearray) -> object:
    return {_MARKER: "bytearray", _PAYLOAD: base64.b64encode(value).decode("ascii")}


_ONE_MICROSECOND = _dt.timedelta(microseconds=1)


def _zone(tz: _dt.tzinfo | None, offset: _dt.timedelta | None) -> object:
    """The wire form of a tzinfo: None, or [offset in us or None, name or None, key or None].

    The offset is written as a number, not left to isoformat(): fromisoformat() reads an
    offset of a few microseconds back as UTC on some Python versions.
    """
    if tz is None:
        return None
    micros = None if offset is None else offset // _ONE_MICROSECOND
    if isinstance(tz, zoneinfo.ZoneInfo) and tz.key is not None:
        # Rebuilt by key; the offset lets a reader without this zone keep the instant.
        return [micros, None, tz.key]
    if offset is None:
        return None  # a tzinfo without an offset is naive in all but name
    name = None
    if type(tz) is _dt.timezone and tz.tzname(None) != _dt.timezone(offset).tzname(None):
        name = tz.tzname(None)
    # Any other tzinfo class keeps its offset: the same instant, as a fixed-offset zone.
    return [micros, name, None]


def _enc_datetime(value: _dt.datetime) -> object:
    tz = value.tzinfo
    if tz is None:
        return {_MARKER: "datetime", _PAYLOAD: [value.isoformat(), value.fold, None]}
    return {
        _MARKER: "datetime",
        _PAYLOAD: [
            value.replace(tzinfo=None).isoformat(),
            value.fold,
            _zone(tz, value.utcoffset()),
        ],
    }


def _enc_time(value: _dt.time) -> object:
    tz = value.tzinfo
    return {
        _MARKER: "time",
        _PAYLOAD: [
            value.replace(tzinfo=None).isoformat(),
            value.fold,
            None if tz is None else _zone(tz, value.utcoffset()),
        ],
    }


def _enc_date(value: _dt.date) -> object:
    return {_MARKER: "date", _PAYLOAD: value.isoformat()}


def _enc_timedelta(value: _dt.timedelta) -> object:
    return {_MARKER: "timedelta", _PAYLOAD: [value.days, value.seconds, value.microseconds]}


def _enc_decimal(value: decimal.Decimal) -> object:
    # str() of a Decimal is exact: sign, digits, exponent, NaN/sNaN and Infinity.
    return {_MARKER: "decimal", _PAYLOAD: str(value)}


def _enc_uuid(value: uuid.UUID) -> object:
    return {_MARKER: "uuid", _PAYLOAD: str(value)}


def _enc_path_as(tag: str) -> _Encoder:
    def encode(value: pathlib.PurePath) -> object:
        return {_MARKER: tag, _PAYLOAD: str(value)}

    return encode


def _class_ref(cls: type) -> list[object]:
    return [cls.__module__, cls.__qualname__]


def _enc_enum(value: enum.Enum) -> object:
    return {_MARKER: "enum", _PAYLOAD: [*_class_ref(type(value)), value.name]}


def _enc_flag(value: enum.Flag) -> object:
    # A combination of flags has no single member name, so flags travel by value.
    try:
        payload = _enc(value.value)
    except _EncodeError as e:
        e.within(value, ".value")
        raise
    return {_MARKER: "flag", _PAYLOAD: [*_class_ref(type(value)), payload]}


def _enc_namedtuple(value: Any) -> object:
    try:
        items = _enc_items(value)
    except _EncodeError as e:
        e.within(value, f".{value._fields[_index_of(value, e.child)]}")
        raise
    return {_MARKER: "namedtuple", _PAYLOAD: [*_class_ref(type(value)), items]}


def _enc_dataclass(value: Any) -> object:
    names = [f.name for f in dataclasses.fields(value)]
    try:
        state = {
            n: (x if type(x := getattr(value, n)) in _SCALARS else _ENCODERS[type(x)](x))
            for n in names
        }
    except _EncodeError as e:
        e.within(value, "." + next((n for n in names if getattr(value, n) is e.child), "?"))
        raise
    # Field names are identifiers, never the marker, so the state needs no escaping.
    return {_MARKER: "dataclass", _PAYLOAD: [*_class_ref(type(value)), state]}


class _EncoderTable(dict[type, _Encoder]):
    """Exact type -> encoder. Subclasses and user classes are resolved on first sight."""

    def __missing__(self, cls: type) -> _Encoder:
        return _resolve(cls)


_ENCODERS = _EncoderTable(
    {
        list: _enc_list,
        tuple: _enc_tuple,
        dict: _enc_dict,
        set: _enc_set_like("set"),
        frozenset: _enc_set_like("frozenset"),
        bytes: _enc_bytes,
        bytearray: _enc_bytearray,
        _dt.datetime: _enc_datetime,
        _dt.date: _enc_date,
        _dt.time: _enc_time,
        _dt.timedelta: _enc_timedelta,
        decimal.Decimal: _enc_decimal,
        uuid.UUID: _enc_uuid,
        pathlib.PurePosixPath: _enc_path_as("pureposixpath"),
        pathlib.PureWindowsPath: _enc_path_as("purewindowspath"),
        pathlib.PosixPath: _enc_path_as("path"),
        pathlib.WindowsPath: _enc_path_as("path"),
    }
)

_UNSUPPORTED_HINT = (
    "return plain data (dict, list, str, int, float, datetime, Decimal, a dataclass, ...) or "
    'choose serializer="pickle"'
)


def _rejecting(reason: str) -> _Encoder:
    def reject(value: object) -> NoReturn:
        raise _EncodeError(value, reason)

    return reject


def _resolve(cls: type) -> _Encoder:
    """Find the encoder for a type that is not one of the exact types above.

    Enums, named tuples and dataclasses are rebuilt by looking their class up, so a class
    that cannot be found again by ``module`` + ``qualname`` is refused now, when the
    first call stores its result, rather than when a duplicate tries to read it.
    """
    encode: _Encoder | None = None
    if issubclass(cls, enum.Flag):
        encode = _enc_flag
    elif issubclass(cls, enum.Enum):
        encode = _enc_enum
    elif issubclass(cls, tuple) and hasattr(cls, "_fields") and hasattr(cls, "_make"):
        encode = _enc_namedtuple
    elif dataclasses.is_dataclass(cls):
        encode = _enc_dataclass
    if encode is None:
        base = next((b for b in cls.__mro__[1:] if b in _ENCODERS or b in _SCALARS), None)
        if base is not None:
            return _rejecting(
                f"{_type_name(cls)} is a subclass of {_type_name(base)}, and the JSON "
                f"serializer gives back exact types only; convert it to {base.__name__} "
                f'or choose serializer="pickle"'
            )
        return _rejecting(
            f"objects of type {_type_name(cls)} are not supported by the JSON serializer; "
            f"{_UNSUPPORTED_HINT}"
        )
    try:
        found = _find_class(cls.__module__, cls.__qualname__)
    except SerializationError:
        found = None
    if found is not cls:
        return _rejecting(
            f"class {_type_name(cls)} cannot be found again by module and qualified name "
            f"when the result is read back (is it defined inside a function?); define it "
            f'at module level or choose serializer="pickle"'
        )
    # Only classes found again by name are remembered: they live as long as their module
    # anyway, while local or unsupported classes could pile up in a long-lived process.
    _ENCODERS[cls] = encode
    return encode


def _find_class(module: str, qualname: str) -> type:
    """Look a class up among modules already imported; never import anything.

    Importing on read would let stored bytes choose which code runs.
    """
    name = f"{module}.{qualname}"
    mod = sys.modules.get(module)
    if mod is None:
        raise SerializationError(
            f"cannot rebuild {name}: module {module!r} is not imported in this process, and "
            f"idempotask never imports modules while reading stored data; import {module} "
            f"before the duplicate call"
        )
    first, *rest = qualname.split(".")
    # The module's own dict, not getattr: a module-level __getattr__ may import lazily.
    obj: object = vars(mod).get(first)
    for part in rest:
        obj = getattr(obj, part, None)
    if obj is None:
        raise SerializationError(f"cannot rebuild {name}: module {module} has no {qualname}")
    if not isinstance(obj, type):
        raise SerializationError(f"cannot rebuild {name}: it is not a class")
    return obj


# --------------------------------------------------------------------------------------
# Decoding: json calls _object_hook bottom-up, so a payload's children are already
# decoded (a set's items are tuples, not lists) when its tag is applied.
# --------------------------------------------------------------------------------------


class _BadData(Exception):
    """The bytes are valid JSON but not in our format."""


def _expect(value: object, kind: type) -> Any:
    if type(value) is not kind:
        raise _BadData(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _dec_dict(payload: object) -> object:
    flat = _expect(payload, list)
    if len(flat) % 2:
        raise _BadData("odd number of items in a dict")
    it = iter(flat)
    return dict(zip(it, it, strict=True))


def _dec_bytes(payload: object) -> bytes:
    return base64.b64decode(_expect(payload, str), validate=True)


def _dec_timed(payload: object, parse: Callable[[str], Any]) -> Any:
    iso, fold, zone = _expect(payload, list)
    value = parse(_expect(iso, str))
    if value.tzinfo is not None:
        raise _BadData("the wall time must be naive")
    if zone is not None:
        micros, name, key = _expect(zone, list)
        tz: _dt.tzinfo | None = None
        if key is not None:
            try:
                tz = zoneinfo.ZoneInfo(_expect(key, str))
            except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
                if micros is None:
                    raise
        if tz is None:
            offset = _dt.timedelta(microseconds=_expect(micros, int))
            tz = _dt.timezone(offset) if name is None else _dt.timezone(offset, _expect(name, str))
        value = value.replace(tzinfo=tz)
    if fold:
        value = value.replace(fold=1)
    return value


def _dec_timedelta(payload: object) -> _dt.timedelta:
    days, seconds, micros = _expect(payload, list)
    return _dt.timedelta(
        days=_expect(days, int), seconds=_expect(seconds, int), microseconds=_expect(micros, int)
    )


def _dec_class(payload: object, base: type) -> tuple[Any, object]:
    module, qualname, rest = _expect(payload, list)
    cls = _find_class(_expect(module, str), _expect(qualname, str))
    if not issubclass(cls, base):
        raise SerializationError(f"cannot rebuild {_type_name(cls)}: not a {base.__name__}")
    return cls, rest


def _dec_enum(payload: object) -> object:
    cls, name = _dec_class(payload, enum.Enum)
    try:
        return cls[_expect(name, str)]
    except KeyError:
        raise SerializationError(
            f"cannot rebuild {_type_name(cls)}.{name}: the enum has no such member"
        ) from None


def _dec_flag(payload: object) -> object:
    cls, value = _dec_class(payload, enum.Flag)
    return cls(value)


def _dec_namedtuple(payload: object) -> object:
    cls, items = _dec_class(payload, tuple)
    if not hasattr(cls, "_fields"):
        raise SerializationError(f"cannot rebuild {_type_name(cls)}: not a named tuple")
    return cls(*_expect(items, list))


def _dec_dataclass(payload: object) -> object:
    cls, state = _dec_class(payload, object)
    is_dataclass = dataclasses.is_dataclass(cls)  # a name, so mypy keeps cls a plain class
    if not is_dataclass:
        raise SerializationError(f"cannot rebuild {_type_name(cls)}: not a dataclass")
    state = _expect(state, dict)
    # Restore the stored state without running __init__/__post_init__, as pickle does: the
    # first call already built this object. Fields added since it was stored take their
    # defaults; fields removed since are dropped.
    obj = cls.__new__(cls)
    for field in dataclasses.fields(cls):
        if field.name in state:
            value = state[field.name]
        elif field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            raise SerializationError(
                f"cannot rebuild {_type_name(cls)}: the stored value has no field "
                f"{field.name!r} and the field has no default"
            )
        object.__setattr__(obj, field.name, value)
    return obj


_DECODERS: dict[str, _Decoder] = {
    "tuple": lambda p: tuple(_expect(p, list)),
    "set": lambda p: set(_expect(p, list)),
    "frozenset": lambda p: frozenset(_expect(p, list)),
    "dict": _dec_dict,
    "bytes": _dec_bytes,
    "bytearray": lambda p: bytearray(_dec_bytes(p)),
    "int": lambda p: int(_expect(p, str), 16),
    "datetime": lambda p: _dec_timed(p, _dt.datetime.fromisoformat),
    "date": lambda p: _dt.date.fromisoformat(_expect(p, str)),
    "time": lambda p: _dec_timed(p, _dt.time.fromisoformat),
    "timedelta": _dec_timedelta,
    "decimal": lambda p: decimal.Decimal(_expect(p, str)),
    "uuid": lambda p: uuid.UUID(_expect(p, str)),
    "pureposixpath": lambda p: pathlib.PurePosixPath(_expect(p, str)),
    "purewindowspath": lambda p: pathlib.PureWindowsPath(_expect(p, str)),
    "path": lambda p: pathlib.Path(_expect(p, str)),
    "enum": _dec_enum,
    "flag": _dec_flag,
    "namedtuple": _dec_namedtuple,
    "dataclass": _dec_dataclass,
}


def _object_hook(obj: dict[str, Any]) -> object:
    if _MARKER not in obj:
        return obj
    if len(obj) != 2 or _PAYLOAD not in obj:
        raise _BadData("a tagged object must have exactly the keys '$t' and 'v'")
    decode = _DECODERS.get(obj[_MARKER])
    if decode is None:
        raise _BadData(f"unknown tag {obj[_MARKER]!r}")
    return decode(obj[_PAYLOAD])


# --------------------------------------------------------------------------------------
# JSON text. json.dumps/json.loads build a new encoder or decoder on every call when
# given options (about 0.5 us each); these are built once.
# --------------------------------------------------------------------------------------


def _never_called(obj: object) -> NoReturn:
    raise TypeError(f"not JSON-ready: {type(obj).__name__}")


_public_encoder = json.JSONEncoder(
    separators=(",", ":"),
    ensure_ascii=False,
    allow_nan=True,
    check_circular=False,
    default=_never_called,
)


def _make_c_encoder() -> Callable[[object], str] | None:
    """The C encoder json.dumps uses internally, made once, or None if unavailable.

    ``c_make_encoder`` is not public API, so it is used only if it exists, takes the
    arguments we pass, and writes exactly what the public encoder writes.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    basestring = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or basestring is None:
        return None
    try:
        # Arguments: markers (None: our trees are fresh and acyclic), default, string
        # encoder, indent, key separator, item separator, sort_keys, skipkeys, allow_nan.
        c_encode = make(None, _never_called, basestring, None, ":", ",", False, False, True)

        def encode(tree: object) -> str:
            return "".join(c_encode(tree, 0))

        sample = {"a": [1, -0.0, float("nan"), None, True, "\ud800\u00e9"], "b": {}}
        if encode(sample) != _public_encoder.encode(sample):
            return None
    except Exception:
        return None
    return encode


_to_json_text: Callable[[object], str] = _make_c_encoder() or _public_encoder.encode
_decoder = json.JSONDecoder(object_hook=_object_hook)


def _tag_big_ints(node: Any) -> object:
    """Rewrite ints too long for str() (the int/str digit limit) as hex-tagged ints."""
    t = type(node)
    if t is int:
        return node if -_BIG_INT < node < _BIG_INT else {_MARKER: "int", _PAYLOAD: hex(node)}
    if t is list:
        return [_tag_big_ints(x) for x in node]
    if t is dict:
        return {k: _tag_big_ints(x) for k, x in node.items()}
    return node


def _tree(value: object) -> object:
    """The JSON-ready tree for ``value``; SerializationError names the failing part."""
    try:
        return value if type(value) in _SCALARS else _enc(value)
    except _EncodeError as e:
        raise SerializationError(f"cannot serialize {e.path()}: {e.reason}") from None
    except RecursionError:
        raise SerializationError(_too_deep(value)) from None


def _tree_to_bytes(tree: object) -> bytes:
    try:
        text = _to_json_text(tree)
    except ValueError:
        # Only a huge int makes json raise here; rare enough to walk the tree again.
        text = _to_json_text(_tag_big_ints(tree))
    except RecursionError:
        raise SerializationError("cannot serialize result: it is nested too deeply") from None
    # surrogatepass keeps lone surrogates ("\ud800"), which are valid in a Python str.
    return text.encode("utf-8", "surrogatepass")


def _children(value: Any) -> list[tuple[str, object]]:
    """What the encoder walks into, with path segments; for error reports only."""
    t = type(value)
    if t is dict:
        items = value.items()
        return [("[<key>]", k) for k, _ in items] + [(_key_segment(k), x) for k, x in items]
    if t is list or t is tuple:
        return [(f"[{i}]", x) for i, x in enumerate(value)]
    if t is set or t is frozenset:
        return [("[<set item>]", x) for x in value]
    if isinstance(value, tuple) and hasattr(t, "_fields"):
        return [(f".{name}", x) for name, x in zip(t._fields, value, strict=True)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    return []


def _too_deep(value: object) -> str:
    """Explain a RecursionError: find a reference cycle, or report deep nesting."""
    on_path: set[int] = set()
    # Iterative depth-first search, since recursion is what just failed.
    stack: list[tuple[str, object, bool]] = [("result", value, False)]
    while stack:
        path, node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        if id(node) in on_path:
            return (
                f"cannot serialize {path}: it contains itself (a reference cycle); "
                f"the JSON serializer stores trees of values only"
            )
        children = _children(node)
        if children:
            on_path.add(id(node))
            stack.append((path, node, True))
            stack.extend((path + segment, child, False) for segment, child in reversed(children))
    return (
        "cannot serialize result: it is nested too deeply for the JSON serializer; "
        'flatten it or choose serializer="pickle"'
    )


class JSONSerializer:
    """The default serializer: typed JSON in UTF-8.

    Gives back a value equal to the one stored, types included. Supported: ``None``,
    ``bool``, ``int`` (any size), ``float`` (nan, infinities, ``-0.0``), ``str`` (lone
    surrogates too), ``bytes``, ``bytearray``, ``list``, ``tuple``, ``set``, ``frozenset``,
    ``dict`` with any supported hashable keys, ``datetime`` (naive or aware; a
    ``ZoneInfo`` by key, any other zone as its UTC offset), ``date``, ``time``,
    ``timedelta``, ``Decimal``, ``UUID``, pure and concrete ``pathlib`` paths, and
    ``Enum`` members, dataclass instances and named tuples of module-level classes.

    Classes are found again through ``sys.modules`` by module and qualified name; reading
    never imports a module, so stored bytes cannot make a process load code. Subclasses
    of the built-in types are refused rather than quietly turned into their base type.

    Plain data costs nothing extra: ``{"ok": true, "n": 3}`` is stored as exactly that.

    >>> s = JSONSerializer()
    >>> s.loads(s.dumps({1: "a", "1": "b"}))
    {1: 'a', '1': 'b'}
    """

    __slots__ = ()

    def dumps(self, value: object) -> bytes:
        """Encode ``value``.

        Raises ``SerializationError`` naming where in the value the problem is
        (``result["items"][2]``) and its type, for unsupported objects and cycles.
        """
        return _tree_to_bytes(_tree(value))

    def loads(self, data: bytes) -> object:
        """Decode bytes written by :meth:`dumps`.

        Raises ``SerializationError``, and nothing else, for bytes that are not ours or
        name a class that is not loaded in this process.
        """
        try:
            text = str(data, "utf-8", "surrogatepass")
            value, end = _decoder.raw_decode(text)
            if end != len(text):
                raise _BadData("trailing data after the value")
        except SerializationError:
            raise
        except Exception as exc:
            # Anything from the json scanner, a tag decoder or a rebuilt class's own
            # constructor means the same thing to the caller: unreadable stored data.
            raise SerializationError(
                f"stored data is not a result written by the JSON serializer: {exc}"
            ) from exc
        return value

    def __repr__(self) -> str:
        return "JSONSerializer()"


class PickleSerializer:
    """Pickle, for results the JSON serializer cannot hold; only when chosen explicitly.

    .. warning::
       Unpickling runs code named by the bytes. Anyone who can write to the store can
       then run code in every process that reads from it. Use it only with a store that
       nothing untrusted can write to.

    Protocol 5 is used, which every supported Python version reads.
    """

    __slots__ = ()

    protocol = 5

    def dumps(self, value: object) -> bytes:
        """Pickle ``value``; any pickling failure becomes ``SerializationError``."""
        try:
            return pickle.dumps(value, protocol=self.protocol)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle result of type {_type_name(type(value))}: {exc}"
            ) from exc

    def loads(self, data: bytes) -> object:
        """Unpickle ``data``; any unpickling failure becomes ``SerializationError``."""
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise SerializationError(f"cannot unpickle stored result: {exc}") from exc

    def __repr__(self) -> str:
        return "PickleSerializer()"


_DEFAULT_JSON = JSONSerializer()
_DEFAULT_PICKLE = PickleSerializer()


def get_serializer(spec: str | Serializer | None) -> Serializer:
    """Resolve the ``serializer=`` option.

    ``None`` or ``"json"`` gives the shared :class:`JSONSerializer`, ``"pickle"`` a
    :class:`PickleSerializer`, and an object with ``dumps`` and ``loads`` is used as is.
    Anything else raises ``ConfigurationError``.
    """
    if spec is None or spec == "json":
        return _DEFAULT_JSON
    if spec == "pickle":
        return _DEFAULT_PICKLE
    accepted = '"json" (the default), "pickle", or an object with dumps() and loads()'
    if isinstance(spec, type):
        raise ConfigurationError(
            f"serializer={spec.__name__} is a class; pass an instance, "
            f"serializer={spec.__name__}(), or one of {accepted}"
        )
    if (
        not isinstance(spec, str)
        and callable(getattr(spec, "dumps", None))
        and callable(getattr(spec, "loads", None))
    ):
        return spec
    raise ConfigurationError(f"serializer={spec!r} is not supported; use {accepted}")


# --------------------------------------------------------------------------------------
# Cached errors (cache_errors=): stored as typed JSON, whatever the result serializer.
# --------------------------------------------------------------------------------------


def _tree_or_none(value: object) -> object | None:
    try:
        return _tree(value)
    except SerializationError:
        return None


def dump_exception(exc: BaseException) -> bytes:
    """Encode an exception for ``cache_errors``: its type, message and, if possible, args.

    The type is stored by module and qualified name, the message as ``str(exc)``;
    ``exc.args`` and the instance's attributes are kept when the JSON serializer can hold
    them and silently left out otherwise. Never raises for an exception it is given.
    """
    cls = type(exc)
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {_type_name(cls)} object>"
    record: dict[str, object] = {
        "module": str(cls.__module__),
        "qualname": str(cls.__qualname__),
        "message": message,
    }
    args = _tree_or_none(tuple(exc.args))
    if args is not None:
        record["args"] = args
    attrs = getattr(exc, "__dict__", None)
    if attrs:
        tree = _tree_or_none(dict(attrs))
        if tree is not None:
            record["attrs"] = tree
    return _tree_to_bytes(record)


def load_exception(data: bytes) -> BaseException:
    """Rebuild an exception written by :func:`dump_exception`.

    The type is looked up in already-imported modules only. It is built with the stored
    args, else with the message, preferring whichever gives the same ``str()`` as the
    original. If the type is missing or will not build, the result is a
    :class:`~idempotask.errors.CachedFailure` carrying the type name and message.
    Raises ``SerializationError`` only if ``data`` is not a stored exception at all.
    """
    record = _DEFAULT_JSON.loads(data)
    try:
        fields: dict[str, Any] = _expect(record, dict)
        module: str = _expect(fields["module"], str)
        qualname: str = _expect(fields["qualname"], str)
        message: str = _expect(fields["message"], str)
        args = fields.get("args")
        attrs = fields.get("attrs")
        if not (args is None or type(args) is tuple) or not (attrs is None or type(attrs) is dict):
            raise _BadData("args must be a tuple and attrs a dict")
    except (_BadData, KeyError) as exc:
        raise SerializationError(f"stored data is not a cached exception: {exc}") from None
    type_name = qualname if module == "builtins" else f"{module}.{qualname}"
    try:
        cls = _find_class(module, qualname)
    except SerializationError:
        return CachedFailure(type_name, message)
    if not issubclass(cls, BaseException):
        return CachedFailure(type_name, message)
    return _rebuild(cls, args, attrs or {}, message) or CachedFailure(type_name, message)


def _rebuild(
    cls: type[BaseException],
    args: tuple[object, ...] | None,
    attrs: dict[str, object],
    message: str,
) -> BaseException | None:
    """Build ``cls`` again, preferring a way that gives the original ``str()``.

    ``cls(*args)`` is what pickle does and suits most exceptions. A custom ``__init__``
    that formats its message (``super().__init__(f"declined {code}")``) or takes
    keyword-only arguments breaks it; ``cls(message)`` or, last, an instance made without
    ``__init__`` and given the stored args then still has the right message. If none
    matches, the first that builds is kept: ``except`` clauses care about the type.
    """
    first: BaseException | None = None
    for make in _RECIPES:
        try:
            candidate = make(cls, args, message)
            if candidate is None:
                continue
            for name, value in attrs.items():
                # Attributes are a bonus; the type and message are what callers rely on.
                with contextlib.suppress(Exception):
                    setattr(candidate, name, value)
            if str(candidate) == message:
                return candidate
        except Exception:
            continue
        if first is None:
            first = candidate
    return first


def _from_args(
    cls: type[BaseException], args: tuple[object, ...] | None, message: str
) -> BaseException | None:
    return None if args is None else cls(*args)


def _from_message(
    cls: type[BaseException], args: tuple[object, ...] | None, message: str
) -> BaseException | None:
    return cls(message)


def _without_init(
    cls: type[BaseException], args: tuple[object, ...] | None, message: str
) -> BaseException | None:
    exc = cls.__new__(cls)
    exc.args = (message,) if args is None else args
    return exc


_RECIPES = (_from_args, _from_message, _without_init)

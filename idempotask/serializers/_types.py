"""What every part of the typed JSON shares: the wire markers, the value types written
and read in both directions, finding a class again by name, and which classes a
serializer may write and rebuild (its allowlist)."""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import datetime as _dt
import decimal
import enum
import pathlib
import sys
import typing
import uuid
import zoneinfo
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from idempotask.errors import ConfigurationError, SerializationError

__all__ = ["register_type", "result_types"]

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

MARKER = "$t"
PAYLOAD = "v"

# Types json writes and reads back unchanged; containers never qualify (tuple -> list).
SCALARS = frozenset({str, int, float, bool, type(None)})

# When json refuses an int as too long for str() (the int/str digit limit of
# CVE-2020-10735), ints from this size up are written as hex, which the limit exempts;
# smaller ones stay plain JSON numbers.
BIG_INT = 10**600


class BadData(Exception):
    """The bytes are valid JSON but not in our format."""


def expect(value: object, kind: type) -> Any:
    if type(value) is not kind:
        raise BadData(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------
# Value types: each one's class, tag, and payload in both directions, written once.
# --------------------------------------------------------------------------------------

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


def _timed(value: _dt.datetime | _dt.time) -> list[object]:
    """A datetime or time as [its naive wall time in ISO format, fold, zone]."""
    naive = value.replace(tzinfo=None).isoformat()
    return [naive, value.fold, _zone(value.tzinfo, value.utcoffset())]


def _untimed(payload: object, parse: Callable[[str], Any]) -> Any:
    iso, fold, zone = expect(payload, list)
    value = parse(expect(iso, str))
    if value.tzinfo is not None:
        raise BadData("the wall time must be naive")
    if zone is not None:
        micros, name, key = expect(zone, list)
        tz: _dt.tzinfo | None = None
        if key is not None:
            try:
                tz = zoneinfo.ZoneInfo(expect(key, str))
            except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
                if micros is None:
                    raise
        if tz is None:
            offset = _dt.timedelta(microseconds=expect(micros, int))
            tz = _dt.timezone(offset) if name is None else _dt.timezone(offset, expect(name, str))
        value = value.replace(tzinfo=tz)
    if fold:
        value = value.replace(fold=1)
    return value


def _untimedelta(payload: object) -> _dt.timedelta:
    days, seconds, micros = expect(payload, list)
    return _dt.timedelta(
        days=expect(days, int), seconds=expect(seconds, int), microseconds=expect(micros, int)
    )


def _b64(value: bytes | bytearray) -> str:
    return base64.b64encode(value).decode("ascii")


def _from_text(parse: Callable[[str], object]) -> Callable[[object], object]:
    return lambda payload: parse(expect(payload, str))


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


_Codec = Callable[[Any], object]

# (exact class, tag, value -> payload, payload -> value). str() of a Decimal is exact:
# sign, digits, exponent, NaN/sNaN and Infinity.
VALUE_TYPES: tuple[tuple[type, str, _Codec, _Codec], ...] = (
    (bytes, "bytes", _b64, _from_text(_unb64)),
    (bytearray, "bytearray", _b64, _from_text(lambda text: bytearray(_unb64(text)))),
    (_dt.datetime, "datetime", _timed, lambda p: _untimed(p, _dt.datetime.fromisoformat)),
    (_dt.date, "date", _dt.date.isoformat, _from_text(_dt.date.fromisoformat)),
    (_dt.time, "time", _timed, lambda p: _untimed(p, _dt.time.fromisoformat)),
    (_dt.timedelta, "timedelta", lambda v: [v.days, v.seconds, v.microseconds], _untimedelta),
    (decimal.Decimal, "decimal", str, _from_text(decimal.Decimal)),
    (uuid.UUID, "uuid", str, _from_text(uuid.UUID)),
    (pathlib.PurePosixPath, "pureposixpath", str, _from_text(pathlib.PurePosixPath)),
    (pathlib.PureWindowsPath, "purewindowspath", str, _from_text(pathlib.PureWindowsPath)),
    (pathlib.PosixPath, "path", str, _from_text(pathlib.Path)),
    (pathlib.WindowsPath, "path", str, _from_text(pathlib.Path)),
)


def type_name(cls: type) -> str:
    """``module.qualname``, or just the name for builtins, as users write it."""
    module = getattr(cls, "__module__", None)
    qualname = getattr(cls, "__qualname__", None) or getattr(cls, "__name__", repr(cls))
    if not isinstance(module, str) or module == "builtins":
        return str(qualname)
    return f"{module}.{qualname}"


def find_class(module: str, qualname: str) -> type:
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
# Which classes may be written and rebuilt. A stored record names the class to rebuild;
# whoever can write to the store could otherwise make every reader build any dataclass
# (without running its __init__), named tuple or enum of any imported module. A
# serializer bound to a function (JSONSerializer(types=...), what @idempotent uses)
# writes and rebuilds only the classes the function's return annotation names (and
# their fields' classes, and subclasses of them) plus the types registered here.
# --------------------------------------------------------------------------------------

# None: no restriction (a JSONSerializer used on its own); else the allowed classes.
allowed_classes: contextvars.ContextVar[tuple[type, ...] | None] = contextvars.ContextVar(
    "idempotask_serializer_classes", default=None
)
_registered: tuple[type, ...] = ()
_A = TypeVar("_A")
_R = TypeVar("_R")


def restricted(types: tuple[type, ...] | None, convert: Callable[[_A], _R], value: _A) -> _R:
    """``convert(value)`` writing and rebuilding only ``types`` and registered types
    (None: leave the current restriction alone)."""
    if types is None:
        return convert(value)
    token = allowed_classes.set(types)
    try:
        return convert(value)
    finally:
        allowed_classes.reset(token)


def register_type(cls: type) -> type:
    """Allow ``cls`` (a dataclass, named tuple or enum) in every function's results and
    cached errors, beside the classes their return annotations name. Usable as a class
    decorator; registering again is harmless.

    >>> @register_type
    ... @dataclasses.dataclass
    ... class Receipt:
    ...     id: int
    """
    global _registered
    if not isinstance(cls, type) or not (
        dataclasses.is_dataclass(cls)
        or issubclass(cls, enum.Enum)
        or (issubclass(cls, tuple) and hasattr(cls, "_fields"))
    ):
        raise ConfigurationError(
            f"register_type: expected a dataclass, named tuple or enum class, got {cls!r}"
        )
    if cls not in _registered:
        _registered = (*_registered, cls)
    return cls


def permitted(cls: type) -> bool:
    """Whether the serializer running now may write or rebuild an instance of ``cls``."""
    allowed = allowed_classes.get()
    return allowed is None or issubclass(cls, allowed) or issubclass(cls, _registered)


def not_allowed(cls: type) -> str:
    """Why ``cls`` is refused, and the fix."""
    name = type_name(cls)
    return (
        f"{name} is not a type this function returns: only the classes its return "
        f"annotation names (and their fields' classes) and registered types are written "
        f"and rebuilt; annotate the return type (-> {cls.__qualname__}) or call "
        f"idempotask.serializers.register_type({cls.__qualname__})"
    )


def result_types(func: Callable[..., Any]) -> tuple[type, ...]:
    """The dataclasses, named tuples and enums ``func``'s return annotation names,
    through unions, generics (``list[Order]``, ``dict[str, Item]``, ``Optional``...) and
    the fields of the classes found. ``()`` when it has no usable annotation (missing,
    ``Any``, a name that does not resolve).

    >>> def f() -> list[Color] | None: ...  # doctest: +SKIP
    """
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # an annotation naming something that does not exist (yet)
        return ()
    found: dict[type, None] = {}
    if "return" in hints:
        _collect(hints["return"], found)
    return tuple(found)


def _collect(tp: Any, found: dict[type, None]) -> None:
    if isinstance(tp, typing.TypeVar):
        for t in (*tp.__constraints__, *((tp.__bound__,) if tp.__bound__ else ())):
            _collect(t, found)
        return
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        for value in args:
            if isinstance(value, enum.Enum):
                found.setdefault(type(value))
        return
    for arg in args:
        if arg is not Ellipsis:
            _collect(arg, found)
    # A generic alias (list[Order]) is no class of its own: its arguments were collected.
    if typing.get_origin(tp) is not None or not isinstance(tp, type) or tp in found:
        return
    is_named_tuple = issubclass(tp, tuple) and hasattr(tp, "_fields")
    if not (dataclasses.is_dataclass(tp) or issubclass(tp, enum.Enum) or is_named_tuple):
        return
    found[tp] = None
    if issubclass(tp, enum.Enum):
        return
    try:
        fields = typing.get_type_hints(tp)
    except Exception:
        return
    for field_type in fields.values():
        _collect(field_type, found)


def classes_of(types_: Iterable[type]) -> tuple[type, ...]:
    """Validate a ``types=`` argument."""
    out = tuple(types_)
    for cls in out:
        if not isinstance(cls, type):
            raise ConfigurationError(f"JSONSerializer: types must be classes, got {cls!r}")
    return out

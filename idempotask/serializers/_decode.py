"""Typed JSON, reading: JSON text back to the values written, types included.

json calls the object hook bottom-up, so a payload's children are already decoded (a
set's items are tuples, not lists) when its tag is applied.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable
from typing import Any

from idempotask.errors import SerializationError
from idempotask.serializers._types import MARKER as _MARKER
from idempotask.serializers._types import PAYLOAD as _PAYLOAD
from idempotask.serializers._types import VALUE_TYPES
from idempotask.serializers._types import BadData as _BadData
from idempotask.serializers._types import expect as _expect
from idempotask.serializers._types import find_class as _find_class
from idempotask.serializers._types import not_allowed as _not_allowed
from idempotask.serializers._types import permitted as _permitted
from idempotask.serializers._types import type_name as _type_name

__all__ = ["from_bytes"]

_Decoder = Callable[[Any], object]


# Hashed containers (sets, dicts with keys that are not str) are built from stored items.
# Items crafted to share one hash (ints congruent modulo 2**61 - 1, say) make building
# them quadratic: a 1 MB set takes seconds, on every duplicate. Real data almost never
# has more than a few items with one hash, so more than this many is refused.
_MAX_SAME_HASH = 32


def _check_hashes(items: list[Any]) -> None:
    if len(items) <= _MAX_SAME_HASH:
        return
    seen: dict[int, int] = {}
    for item in items:
        h = hash(item)  # ints, hash values spread by the dict's own probing
        n = seen[h] = seen.get(h, 0) + 1
        if n > _MAX_SAME_HASH:
            raise SerializationError(
                f"stored data has more than {_MAX_SAME_HASH} set items or dict keys with one "
                "hash value: crafted to make decoding slow (hash flooding), refused"
            )


def _dec_hashed(payload: object, make: Callable[[list[Any]], object]) -> object:
    items = _expect(payload, list)
    _check_hashes(items)
    return make(items)


def _dec_dict(payload: object) -> object:
    flat = _expect(payload, list)
    if len(flat) % 2:
        raise _BadData("odd number of items in a dict")
    _check_hashes(flat[::2])
    it = iter(flat)
    return dict(zip(it, it, strict=True))


def _dec_class(payload: object, base: type) -> tuple[Any, object]:
    module, qualname, rest = _expect(payload, list)
    cls = _find_class(_expect(module, str), _expect(qualname, str))
    if not issubclass(cls, base):
        raise SerializationError(f"cannot rebuild {_type_name(cls)}: not a {base.__name__}")
    if not _permitted(cls):
        raise SerializationError(f"cannot rebuild {_type_name(cls)}: {_not_allowed(cls)}")
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
    "set": lambda p: _dec_hashed(p, set),
    "frozenset": lambda p: _dec_hashed(p, frozenset),
    "dict": _dec_dict,
    "int": lambda p: int(_expect(p, str), 16),
    **{tag: decode for _, tag, _, decode in VALUE_TYPES},
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


_decoder = json.JSONDecoder(object_hook=_object_hook)


def from_bytes(data: bytes) -> object:
    """Decode typed JSON bytes. Raises ``SerializationError``, and nothing else, for bytes
    that are not ours, too deeply nested, or naming a class that may not be rebuilt."""
    try:
        text = str(data, "utf-8", "surrogatepass")
        value, end = _decoder.raw_decode(text)
        if end != len(text):
            raise _BadData("trailing data after the value")
    except SerializationError:
        raise
    except RecursionError:
        raise SerializationError(
            "stored data is nested too deeply to be a result written by the JSON serializer"
        ) from None
    except Exception as exc:
        # Anything from the json scanner, a tag decoder or a rebuilt class's own
        # constructor means the same thing to the caller: unreadable stored data.
        raise SerializationError(
            f"stored data is not a result written by the JSON serializer: {exc}"
        ) from exc
    return value

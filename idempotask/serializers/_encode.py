"""Typed JSON, writing: a value becomes a JSON-ready tree, then UTF-8 JSON text.

See :mod:`idempotask.serializers._types` for the wire format's markers.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import json.encoder
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from idempotask.errors import SerializationError
from idempotask.serializers._types import (
    BIG_INT,
    MARKER,
    PAYLOAD,
    SCALARS,
    VALUE_TYPES,
    find_class,
    not_allowed,
    permitted,
    type_name,
)

__all__ = ["to_bytes", "tree", "tree_to_bytes"]

_Encoder = Callable[[Any], object]


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
    if t in SCALARS:
        return value
    return _ENCODERS[t](value)


def _enc_items(values: Any) -> list[object]:
    for x in values:
        if type(x) not in SCALARS:
            return [x if type(x) in SCALARS else _ENCODERS[type(x)](x) for x in values]
    return list(values)


def _enc_list(value: list[object]) -> object:
    # A list or dict of scalars is JSON already and goes to json as it is; checking is
    # cheaper than copying, and at the sizes of most results a Python loop beats a C scan.
    for x in value:
        if type(x) not in SCALARS:
            return _sequence_items(value)
    return value


def _sequence_items(value: list[object] | tuple[object, ...]) -> list[object]:
    try:
        return _enc_items(value)
    except _EncodeError as e:
        e.within(value, f"[{_index_of(value, e.child)}]")
        raise


def _set_items(value: set[object] | frozenset[object]) -> list[object]:
    try:
        return _enc_items(value)
    except _EncodeError as e:
        e.within(value, "[<set item>]")
        raise


def _enc_dict(value: dict[Any, object]) -> object:
    if MARKER in value:
        return _enc_dict_pairs(value)
    items = iter(value.items())
    for k, x in items:
        if type(k) is not str:
            return _enc_dict_pairs(value)
        if type(x) not in SCALARS:
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
            if type(x) not in SCALARS:
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
            append(k if type(k) in SCALARS else _ENCODERS[type(k)](k))
            append(x if type(x) in SCALARS else _ENCODERS[type(x)](x))
    except _EncodeError as e:
        e.within(value, _dict_segment(value, e.child))
        raise
    return {MARKER: "dict", PAYLOAD: flat}


def _dict_segment(value: dict[Any, object], child: object) -> str:
    for k, x in value.items():
        if k is child:
            return "[<key>]"
        if x is child:
            return _key_segment(k)
    return "[?]"


def _tagged(tag: str, payload: _Encoder) -> _Encoder:
    return lambda value: {MARKER: tag, PAYLOAD: payload(value)}


def _class_ref(value: object) -> list[object]:
    """``[module, qualname]`` of ``value``'s class, if this serializer may write it."""
    cls = type(value)
    if not permitted(cls):
        raise _EncodeError(value, not_allowed(cls))
    return [cls.__module__, cls.__qualname__]


def _enc_enum(value: enum.Enum) -> object:
    return {MARKER: "enum", PAYLOAD: [*_class_ref(value), value.name]}


def _enc_flag(value: enum.Flag) -> object:
    # A combination of flags has no single member name, so flags travel by value.
    ref = _class_ref(value)
    try:
        payload = _enc(value.value)
    except _EncodeError as e:
        e.within(value, ".value")
        raise
    return {MARKER: "flag", PAYLOAD: [*ref, payload]}


def _enc_namedtuple(value: Any) -> object:
    ref = _class_ref(value)
    try:
        items = _enc_items(value)
    except _EncodeError as e:
        e.within(value, f".{value._fields[_index_of(value, e.child)]}")
        raise
    return {MARKER: "namedtuple", PAYLOAD: [*ref, items]}


def _enc_dataclass(value: Any) -> object:
    ref = _class_ref(value)
    names = [f.name for f in dataclasses.fields(value)]
    try:
        state = {
            n: (x if type(x := getattr(value, n)) in SCALARS else _ENCODERS[type(x)](x))
            for n in names
        }
    except _EncodeError as e:
        e.within(value, "." + next((n for n in names if getattr(value, n) is e.child), "?"))
        raise
    # Field names are identifiers, never the marker, so the state needs no escaping.
    return {MARKER: "dataclass", PAYLOAD: [*ref, state]}


class _EncoderTable(dict[type, _Encoder]):
    """Exact type -> encoder. Subclasses and user classes are resolved on first sight."""

    def __missing__(self, cls: type) -> _Encoder:
        return _resolve(cls)


_ENCODERS = _EncoderTable(
    {
        list: _enc_list,
        tuple: _tagged("tuple", _sequence_items),
        dict: _enc_dict,
        set: _tagged("set", _set_items),
        frozenset: _tagged("frozenset", _set_items),
        **{cls: _tagged(tag, encode) for cls, tag, encode, _ in VALUE_TYPES},
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
        base = next((b for b in cls.__mro__[1:] if b in _ENCODERS or b in SCALARS), None)
        if base is not None:
            return _rejecting(
                f"{type_name(cls)} is a subclass of {type_name(base)}, and the JSON "
                f"serializer gives back exact types only; convert it to {base.__name__} "
                f'or choose serializer="pickle"'
            )
        return _rejecting(
            f"objects of type {type_name(cls)} are not supported by the JSON serializer; "
            f"{_UNSUPPORTED_HINT}"
        )
    try:
        found = find_class(cls.__module__, cls.__qualname__)
    except SerializationError:
        found = None
    if found is not cls:
        return _rejecting(
            f"class {type_name(cls)} cannot be found again by module and qualified name "
            f"when the result is read back (is it defined inside a function?); define it "
            f'at module level or choose serializer="pickle"'
        )
    # Only classes found again by name are remembered: they live as long as their module
    # anyway, while local or unsupported classes could pile up in a long-lived process.
    _ENCODERS[cls] = encode
    return encode


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


def _tag_big_ints(node: Any) -> object:
    """Rewrite ints too long for str() (the int/str digit limit) as hex-tagged ints."""
    t = type(node)
    if t is int:
        return node if -BIG_INT < node < BIG_INT else {MARKER: "int", PAYLOAD: hex(node)}
    if t is list:
        return [_tag_big_ints(x) for x in node]
    if t is dict:
        return {k: _tag_big_ints(x) for k, x in node.items()}
    return node


def tree(value: object) -> object:
    """The JSON-ready tree for ``value``; SerializationError names the failing part."""
    try:
        return value if type(value) in SCALARS else _enc(value)
    except _EncodeError as e:
        raise SerializationError(f"cannot serialize {e.path()}: {e.reason}") from None
    except RecursionError:
        raise SerializationError(_too_deep(value)) from None


def tree_to_bytes(json_tree: object) -> bytes:
    try:
        text = _to_json_text(json_tree)
    except ValueError:
        # Only a huge int makes json raise here; rare enough to walk the tree again.
        text = _to_json_text(_tag_big_ints(json_tree))
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


def to_bytes(value: object) -> bytes:
    """``value`` as typed JSON bytes; ``SerializationError`` names the failing part."""
    return tree_to_bytes(tree(value))

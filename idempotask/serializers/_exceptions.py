"""Cached errors (``cache_errors=``): stored as typed JSON, whatever the result serializer.

Only built-in types and registered classes are written in an exception's args and
attributes, and rebuilt from them: a cached error never builds a dataclass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from idempotask.errors import CachedFailure, SerializationError
from idempotask.serializers._decode import from_bytes
from idempotask.serializers._encode import tree as _tree
from idempotask.serializers._encode import tree_to_bytes as _tree_to_bytes
from idempotask.serializers._types import BadData as _BadData
from idempotask.serializers._types import expect as _expect
from idempotask.serializers._types import find_class as _find_class
from idempotask.serializers._types import restricted
from idempotask.serializers._types import type_name as _type_name

__all__ = ["dump_exception", "load_exception"]


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
    return restricted((), _dump_exception, exc)  # registered types only, as loaded


def _dump_exception(exc: BaseException) -> bytes:
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
    record = restricted((), from_bytes, data)  # registered types only
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


def _without_init(
    cls: type[BaseException], args: tuple[object, ...] | None, message: str
) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = (message,) if args is None else args
    return exc


_Recipe = Callable[[type[BaseException], "tuple[object, ...] | None", str], "BaseException | None"]

# The ways _rebuild tries, in its order; None: this way does not apply.
_RECIPES: tuple[_Recipe, ...] = (
    lambda cls, args, message: None if args is None else cls(*args),
    lambda cls, args, message: cls(message),
    _without_init,
)

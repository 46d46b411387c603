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

import pickle
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from idempotask.errors import ConfigurationError, SerializationError
from idempotask.serializers._decode import from_bytes
from idempotask.serializers._encode import to_bytes
from idempotask.serializers._exceptions import dump_exception, load_exception
from idempotask.serializers._types import (
    classes_of,
    register_type,
    restricted,
    result_types,
    type_name,
)

__all__ = [
    "JSONSerializer",
    "PickleSerializer",
    "Serializer",
    "dump_exception",
    "get_serializer",
    "load_exception",
    "register_type",
    "result_types",
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


class JSONSerializer:
    """The default serializer: typed JSON in UTF-8.

    Gives back a value equal to the one stored, types included. Supported: ``None``,
    ``bool``, ``int`` (any size), ``float`` (nan, infinities, ``-0.0``), ``str`` (lone
    surrogates too), ``bytes``, ``bytearray``, ``list``, ``tuple``, ``set``, ``frozenset``,
    ``dict`` with any supported hashable keys, ``datetime`` (naive or aware; a
    ``ZoneInfo`` by key, any other zone as its UTC offset), ``date``, ``time``,
    ``timedelta``, ``Decimal``, ``UUID``, pure and concrete ``pathlib`` paths, and
    ``Enum`` members, dataclass instances and named tuples of module-level classes.

    ``types``: the classes (dataclasses, named tuples, enums) it may write and rebuild,
    with their subclasses and the classes given to :func:`register_type`; None (the
    default) allows any. ``@idempotent`` binds the serializer of each function to the
    classes its return annotation names (:func:`result_types`), so a record in the store
    cannot make a reader build any other class; ``serializer=JSONSerializer(types=...)``
    chooses them by hand.

    Classes are found again through ``sys.modules`` by module and qualified name; reading
    never imports a module, so stored bytes cannot make a process load code. Subclasses
    of the built-in types are refused rather than quietly turned into their base type.
    Reading refuses data nested deeper than the interpreter's recursion limit and sets or
    dicts crafted so that many items share one hash (which would make decoding slow).

    Plain data costs nothing extra: ``{"ok": true, "n": 3}`` is stored as exactly that.

    >>> s = JSONSerializer()
    >>> s.loads(s.dumps({1: "a", "1": "b"}))
    {1: 'a', '1': 'b'}
    """

    __slots__ = ("_types",)

    def __init__(self, *, types: Iterable[type] | None = None) -> None:
        self._types = None if types is None else classes_of(types)

    @property
    def types(self) -> tuple[type, ...] | None:
        """The classes this serializer may write and rebuild (None: any)."""
        return self._types

    def restricted_to(self, types: Iterable[type]) -> JSONSerializer:
        """A serializer like this one that writes and rebuilds only ``types`` (and
        registered types)."""
        return JSONSerializer(types=types)

    def dumps(self, value: object) -> bytes:
        """Encode ``value``.

        Raises ``SerializationError`` naming where in the value the problem is
        (``result["items"][2]``) and its type, for unsupported objects, classes this
        serializer may not write, and cycles.
        """
        return restricted(self._types, to_bytes, value)

    def loads(self, data: bytes) -> object:
        """Decode bytes written by :meth:`dumps`.

        Raises ``SerializationError``, and nothing else, for bytes that are not ours,
        name a class that is not loaded in this process or that this serializer may not
        rebuild, or are crafted to make decoding slow or deep.
        """
        return restricted(self._types, from_bytes, data)

    def __repr__(self) -> str:
        if self._types is None:
            return "JSONSerializer()"
        names = ", ".join(type_name(t) for t in self._types)
        return f"JSONSerializer(types=[{names}])"


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
                f"cannot pickle result of type {type_name(type(value))}: {exc}"
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

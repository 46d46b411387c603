"""Canonical keys: one logical call, one key, in every process and Python version.

A call's arguments are bound to the function's signature with defaults applied, encoded
canonically (typed, length-framed, order-free where order carries no meaning) and
hashed with BLAKE2b, so no argument value reaches the key::

    namespace:name:v1:3f2a...c9

The encoding never uses ``hash()``, ``repr()`` or ``id()``; its output for every kind of
value is pinned by golden vectors in the tests. Changing it means a new version tag.

>>> autoclose.key_for(7, datetime.date(2026, 1, 2))  # doctest: +SKIP
'idempotask:reports.autoclose:v1:...'
>>> make_key("reports.autoclose", job_id=7, day=datetime.date(2026, 1, 2))  # the same key
... # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import inspect
import math
import pathlib
import re
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from hashlib import blake2b
from typing import Any

from idempotask.errors import (
    ConfigurationError,
    DuplicateNameError,
    KeyEncodingError,
    MissingKeyMaterialError,
)

__all__ = [
    "KEY_VERSION",
    "CallKeyer",
    "check_name",
    "digest",
    "encode",
    "explicit_key",
    "make_key",
    "qualified_name",
    "register_encoder",
    "unregister_encoder",
]

KEY_VERSION = "v1"
"""The version tag of the canonical encoding; part of every key."""

_DIGEST_SIZE = 16  # 128-bit BLAKE2b: collision-safe for keys, short enough to read.

Encoder = Callable[[Any], Any]
_user_encoders: dict[type, Encoder] = {}


def qualified_name(obj: Any) -> str:
    """``module.qualname`` of a class or function; stable across processes."""
    return f"{obj.__module__}.{obj.__qualname__}"


def register_encoder(type_: type, encoder: Encoder) -> None:
    """Teach key hashing to encode instances of ``type_`` (and its subclasses).

    ``encoder(value)`` returns key material: any value the canonical encoding supports
    (an id, a tuple of fields...). The type's qualified name is mixed in, so two types
    returning the same material still give different keys::

        register_encoder(Account, lambda a: a.account_id)
    """
    if not isinstance(type_, type):
        raise ConfigurationError(f"register_encoder: expected a type, got {type_!r}")
    if not callable(encoder):
        raise ConfigurationError(f"register_encoder: encoder for {type_!r} is not callable")
    if type_ in _EXACT or type_ is object:
        raise ConfigurationError(
            f"register_encoder: {type_.__name__} has a fixed canonical encoding; wrap such "
            "values in a type of your own instead"
        )
    _user_encoders[type_] = encoder
    _fallback_cache.clear()


def unregister_encoder(type_: type) -> None:
    """Remove an encoder added with :func:`register_encoder` (mainly for tests)."""
    _user_encoders.pop(type_, None)
    _fallback_cache.clear()


# --------------------------------------------------------------------------------------
# Canonical encoding. Every value becomes a str that starts with a one-letter type tag;
# variable-length parts carry their length and containers their item count, so the
# encoding is prefix-free: no two different values, however nested, share an encoding.
# The final str is UTF-8 encoded (surrogatepass keeps lone surrogates encodable).
# --------------------------------------------------------------------------------------

Path = str  # "order.items[2]": where a value sits, for error messages only.


def _enc_none(v: Any, path: Path) -> str:
    return "N"


def _enc_bool(v: bool, path: Path) -> str:
    return "T" if v else "F"


# Ints of more than this many digits are refused, whatever sys.set_int_max_str_digits()
# says in this process (Python's default limit): every process must agree on what
# encodes, and such a number is never how a call is identified.
_MAX_INT_DIGITS = 4300


def _enc_int(v: int, path: Path) -> str:
    try:
        s = str(v)
    except ValueError:  # over this interpreter's limit, which is at most ours
        raise _too_long_int(path) from None
    if len(s) > _MAX_INT_DIGITS and len(s) - (s[0] == "-") > _MAX_INT_DIGITS:
        raise _too_long_int(path)
    return f"i{len(s)}:{s}"


def _too_long_int(path: Path) -> KeyEncodingError:
    return KeyEncodingError(
        f"{_where(path)} is an int of more than {_MAX_INT_DIGITS:,} digits, which key "
        f"material cannot hold; {_advice(path, 'key the call by something shorter')}",
        path=path,
        type_name="builtins.int",
    )


def _enc_float(v: float, path: Path) -> str:
    if v != v:  # every NaN is one value
        return "fnan"
    if v == 0.0:  # 0.0 == -0.0
        return "f0"
    if math.isinf(v):
        return "f+inf" if v > 0 else "f-inf"
    s = v.hex()  # exact, locale- and version-independent
    return f"f{len(s)}:{s}"


def _enc_str(v: str, path: Path) -> str:
    return f"s{len(v)}:{v}"


def _enc_bytes(v: bytes | bytearray | memoryview, path: Path) -> str:
    s = bytes(v).hex()
    return f"b{len(s)}:{s}"


def _enc_seq(v: Iterable[Any], path: Path) -> str:
    # tuple and list encode alike: a broker turns one into the other.
    parts = [_encode(item, f"{path}[{i}]") for i, item in enumerate(v)]
    return f"l{len(parts)}[{''.join(parts)}]"


def _enc_set(v: Iterable[Any], path: Path) -> str:
    parts = sorted(_encode(item, f"{path}{{}}") for item in v)
    return f"e{len(parts)}[{''.join(parts)}]"


def _enc_dict(v: Mapping[Any, Any], path: Path) -> str:
    # Paths name an entry by its position and its key's type, never by the key itself:
    # a dict key may be a secret (a card number, a token).
    pairs = []
    for i, (k, item) in enumerate(v.items()):
        ek = _encode(k, f"{path}<key {i}>")
        pairs.append(ek + _encode(item, f"{path}[<{type(k).__name__} key {i}>]"))
    pairs.sort()
    return f"d{len(pairs)}[{''.join(pairs)}]"


# normalize() in a context that can neither round nor overflow: every finite Decimal has
# one canonical form (the default context's exponent range stops at 1E+999999).
_DECIMAL_CONTEXT = decimal.Context(
    prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN
)


def _enc_decimal(v: decimal.Decimal, path: Path) -> str:
    if v.is_nan():
        return "mnan"
    if v.is_zero():
        return "m0"
    s = str(v.normalize(_DECIMAL_CONTEXT))
    return f"m{len(s)}:{s}"


def _enc_datetime(v: datetime.datetime, path: Path) -> str:
    if v.utcoffset() is None:  # naive: wall-clock value, never equal to an aware one
        s = v.isoformat()
        return f"t{len(s)}:{s}"
    # aware: by instant, so the same moment in two zones gives one key
    try:
        s = v.astimezone(datetime.timezone.utc).replace(tzinfo=None).isoformat()
    except OverflowError:  # within a day of datetime.min / max: no UTC datetime for it
        raise KeyEncodingError(
            f"{_where(path)} is an aware datetime whose UTC instant falls outside the years "
            f"1-9999, so it has no canonical form; {_advice(path, 'pass it in UTC')}",
            path=path,
            type_name=qualified_name(type(v)),
        ) from None
    return f"z{len(s)}:{s}"


def _enc_date(v: datetime.date, path: Path) -> str:
    s = v.isoformat()
    return f"D{len(s)}:{s}"


def _enc_time(v: datetime.time, path: Path) -> str:
    s = v.isoformat()
    return f"h{len(s)}:{s}"


def _enc_timedelta(v: datetime.timedelta, path: Path) -> str:
    s = f"{v.days}.{v.seconds}.{v.microseconds}"
    return f"r{len(s)}:{s}"


def _enc_uuid(v: uuid.UUID, path: Path) -> str:
    return f"u{v.hex}"


def _enc_path(v: pathlib.PurePath, path: Path) -> str:
    s = v.as_posix()
    return f"p{len(s)}:{s}"


def _enc_type(v: type, path: Path) -> str:
    s = qualified_name(v)
    return f"y{len(s)}:{s}"


def _tagged(tag: str, cls: type, material: str) -> str:
    name = qualified_name(cls)
    return f"{tag}{len(name)}:{name}{material}"


def _enc_enum(v: enum.Enum, path: Path) -> str:
    return _tagged("E", type(v), _encode(v.value, f"{path}.value"))


def _enc_fields(v: Any, names: Iterable[str], path: Path) -> str:
    parts = [_enc_str(n, path) + _encode(getattr(v, n), f"{path}.{n}") for n in names]
    return _tagged("C", type(v), f"{len(parts)}[{''.join(parts)}]")


def _enc_dataclass(v: Any, path: Path) -> str:
    return _enc_fields(v, (f.name for f in dataclasses.fields(v)), path)


def _enc_namedtuple(v: Any, path: Path) -> str:
    return _enc_fields(v, v._fields, path)


def _enc_pydantic(v: Any, path: Path) -> str:
    return _tagged("C", type(v), _encode(v.model_dump(mode="json"), path))


def _enc_key_method(v: Any, path: Path) -> str:
    return _tagged("K", type(v), _encode(v.__idempotency_key__(), f"{path}.__idempotency_key__()"))


def _user(encoder: Encoder, cls: type) -> Callable[[Any, Path], str]:
    def enc(v: Any, path: Path) -> str:
        return _tagged("R", cls, _encode(encoder(v), f"{path}<{cls.__name__} encoder>"))

    return enc


# Builtin bases tried for subclasses without an encoder of their own, most specific first.
_BASES: tuple[tuple[type, Callable[[Any, Path], str]], ...] = (
    (bool, _enc_bool),
    (int, _enc_int),
    (float, _enc_float),
    (str, _enc_str),
    (bytes, _enc_bytes),
    (datetime.datetime, _enc_datetime),
    (datetime.date, _enc_date),
    (datetime.time, _enc_time),
    (datetime.timedelta, _enc_timedelta),
    (decimal.Decimal, _enc_decimal),
    (uuid.UUID, _enc_uuid),
    (pathlib.PurePath, _enc_path),
    (tuple, _enc_seq),
    (list, _enc_seq),
    (frozenset, _enc_set),
    (set, _enc_set),
    (dict, _enc_dict),
    (Mapping, _enc_dict),
)

# The encoders of exact types, found with one dict lookup: the concrete bases above (a
# path is always a subclass of PurePath, a Mapping abstract), None and the byte buffers.
_EXACT: dict[type, Callable[[Any, Path], str]] = {
    **{base: enc for base, enc in _BASES if base not in (pathlib.PurePath, Mapping)},
    type(None): _enc_none,
    bytearray: _enc_bytes,
    memoryview: _enc_bytes,
}

_fallback_cache: dict[type, Callable[[Any, Path], str] | None] = {}


def _find_encoder(cls: type) -> Callable[[Any, Path], str] | None:
    for base in cls.__mro__:
        if base in _user_encoders:
            return _user(_user_encoders[base], base)
    if callable(getattr(cls, "__idempotency_key__", None)):
        return _enc_key_method
    if issubclass(cls, type):
        return _enc_type
    if issubclass(cls, enum.Enum):
        return _enc_enum
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        return _enc_namedtuple
    if dataclasses.is_dataclass(cls):
        return _enc_dataclass
    if callable(getattr(cls, "model_dump", None)) and hasattr(cls, "model_fields"):
        return _enc_pydantic
    for base, enc in _BASES:
        if issubclass(cls, base):
            plain = _PLAIN_VALUE.get(base)
            return enc if plain is None else _as_plain(plain, enc)
    return None


# A subclass of a builtin type encodes as the plain value it holds, taken with the base
# type's own method: its overrides (a redacting __str__ or items(), a lossy __eq__ or
# __iter__) would otherwise reach the encoder and give two different values one key.
_PLAIN_VALUE: dict[type, Callable[[Any], Any]] = {
    int: int.__int__,
    float: float.__float__,
    str: str.__str__,
    bytes: lambda v: bytes.__getitem__(v, slice(None)),
    tuple: lambda v: tuple.__getitem__(v, slice(None)),
    list: list.copy,
    frozenset: frozenset.copy,
    set: set.copy,
    dict: dict.copy,
}


def _as_plain(
    plain: Callable[[Any], Any], enc: Callable[[Any, Path], str]
) -> Callable[[Any, Path], str]:
    def enc_subclass(v: Any, path: Path) -> str:
        return enc(plain(v), path)

    return enc_subclass


# Paths start with what holds the value: an argument's name, "key=" (what the key=
# callable returned), or "value" / "" (a value given to encode() directly).
_KEY_CALLABLE = "key="
_NOT_AN_ARGUMENT = ("", "value", _KEY_CALLABLE)
_PATH_STEP = re.compile(r"[.\[{<]")


def _argument(path: Path) -> str:
    """The argument a path starts in ("" when the value is not an argument)."""
    head = _PATH_STEP.split(path, maxsplit=1)[0]
    return "" if head in _NOT_AN_ARGUMENT else head


def _where(path: Path) -> str:
    if path.startswith(_KEY_CALLABLE):
        rest = path[len(_KEY_CALLABLE) :]
        return f"what key= returned{f' (at {rest})' if rest else ''}"
    if not _argument(path):
        return f"key material at {path!r}" if path else "key material"
    return f"argument {path!r}"


def _advice(path: Path, first: str) -> str:
    """What the user can do about an argument: ``first``, then key= or exclude_args."""
    if path.startswith(_KEY_CALLABLE):
        return f"{first}, or make key= return an id"
    argument = _argument(path)
    if not argument:
        return first
    return (
        f"{first}, pass key=... to the decorator, or leave the argument out with "
        f"exclude_args=({argument!r},)"
    )


def _user_defined(cls: type) -> bool:
    """Whether the user can add a method to ``cls`` (not a builtin such as ``function``)."""
    return cls.__module__ != "builtins" and hasattr(cls, "__dict__")


def _unsupported(v: Any, path: Path) -> KeyEncodingError:
    cls = type(v)
    tname = qualified_name(cls)
    where = _where(path)
    register = f"call idempotask.register_encoder({cls.__name__}, ...)"
    if _user_defined(cls) and (
        getattr(cls, "__init__", object.__init__) is not object.__init__ or hasattr(v, "__dict__")
    ):
        return MissingKeyMaterialError(
            f"{where} is a {tname} instance, which carries no key material; "
            + _advice(
                path,
                f"define {cls.__name__}.__idempotency_key__() returning what identifies it, "
                f"{register}",
            ),
            path=path,
            type_name=tname,
        )
    first = register if cls.__module__ != "builtins" else "key the call by an id instead"
    return KeyEncodingError(
        f"{where} has type {tname}, which idempotency keys cannot encode; " + _advice(path, first),
        path=path,
        type_name=tname,
    )


def _encode(v: Any, path: Path) -> str:
    enc = _EXACT.get(type(v))
    if enc is not None:
        return enc(v, path)
    cls = type(v)
    try:
        found = _fallback_cache[cls]
    except KeyError:
        found = _fallback_cache[cls] = _find_encoder(cls)
    if found is None:
        raise _unsupported(v, path)
    return found(v, path)


def encode(value: Any, path: str = "value") -> bytes:
    """The canonical encoding of ``value`` as bytes (what key digests are computed from)."""
    try:
        return _encode(value, path).encode("utf-8", "surrogatepass")
    except RecursionError:
        raise KeyEncodingError(
            f"{_where(path)} is nested too deeply (or contains itself) to encode as key material",
            path=path,
            type_name=qualified_name(type(value)),
        ) from None


def digest(material: bytes) -> str:
    """The hex BLAKE2b digest used in keys."""
    return blake2b(material, digest_size=_DIGEST_SIZE).hexdigest()


def explicit_digest(key: str) -> str:
    """The last part of the store key of an explicit per-call key (``using(key=...)``):
    ``x`` and a digest of it, as the key itself may be secret (an Idempotency-Key header)."""
    return "x" + digest(b"explicit:" + key.encode("utf-8", "surrogatepass"))


def explicit_key(name: str, key: str, *, namespace: str | None = None) -> str:
    """The store key of calls to the function named ``name`` made with
    ``using(key=key)``; the function need not be defined in this process.

    >>> explicit_key("billing.charge", "Idem-123")  # doctest: +SKIP
    'idempotask:billing.charge:v1:x4f0c...'
    """
    from idempotask.config import check_namespace, settings

    check_name(name)
    if not isinstance(key, str) or not key:
        raise ConfigurationError("explicit_key: the explicit key must be a non-empty str")
    ns = settings().namespace if namespace is None else check_namespace(namespace)
    return f"{ns}:{name}:{KEY_VERSION}:{explicit_digest(key)}"


def check_name(name: str) -> str:
    """``name`` if it can be an idempotency name (the stable part of a key), else a
    :class:`ConfigurationError` saying what is wrong with it."""
    if not isinstance(name, str) or not name or name.strip() != name:
        raise ConfigurationError(f"name: expected a non-empty string, got {name!r}")
    bad = set(name) & set("{}\n\r\t ")
    if bad:
        raise ConfigurationError(
            f"name {name!r} contains {''.join(sorted(bad))!r}; braces and whitespace are "
            "not allowed in idempotency names (braces would break Redis Cluster hash tags)"
        )
    return name


def make_key(
    name: str,
    arguments: Mapping[str, Any] | None = None,
    /,
    *,
    namespace: str | None = None,
    **kwargs: Any,
) -> str:
    """The store key of a call to the ``@idempotent`` function named ``name``, from its
    arguments by name: the same key as ``fn.key_for(...)``, for code (or the ``idempotask
    keys compute`` command) that has the name and the arguments but not the function.

    >>> make_key("reports.autoclose", job_id=7, day=datetime.date(2026, 1, 2))  # doctest: +SKIP
    'idempotask:reports.autoclose:v1:...'
    >>> make_key("reports.autoclose", {"job_id": 7, "day": datetime.date(2026, 1, 2)})
    ... # doctest: +SKIP

    What it needs: the function must be defined in this process (import its module), as
    its signature says the order of the arguments and their defaults, and its
    ``key_args`` / ``exclude_args`` / ``key=`` what makes the key. Arguments go by
    parameter name, in any order; defaults apply; ``*args`` is given as a list under its
    name and ``**kwargs`` as a dict under its name (as dead letters store them).
    Give them as a mapping when a parameter is called ``namespace``. The namespace
    defaults to the configured one.
    """
    from idempotask.config import check_namespace, settings

    check_name(name)
    with _names_lock:
        keyer = _keyers.get(name)
    if keyer is None:
        raise ConfigurationError(
            f"make_key: no @idempotent function named {name!r} is defined in this process; "
            "import the module that defines it (its signature gives the arguments' order "
            "and defaults), or call fn.key_for(...) on the function itself"
        )
    if arguments is not None and not isinstance(arguments, Mapping):
        raise ConfigurationError(
            f"make_key: arguments must be a mapping of parameter names to values, got "
            f"{type(arguments).__name__}"
        )
    given = {**(arguments or {}), **kwargs}
    ns = settings().namespace if namespace is None else check_namespace(namespace)
    args, kw = keyer.call_arguments(name, given)
    return f"{ns}:{name}:{KEY_VERSION}:{digest(keyer.material(args, kw))}"


# --------------------------------------------------------------------------------------
# Names and binding.
# --------------------------------------------------------------------------------------

_names: dict[str, str] = {}
_keyers: dict[str, CallKeyer] = {}  # what make_key() needs to key a call by name
_names_lock = threading.Lock()


def claim_name(name: str, owner: str, keyer: CallKeyer | None = None) -> None:
    """Register ``name`` for the function ``owner`` (its qualified name), with the
    ``keyer`` that keys its calls (for :func:`make_key`).

    The same function registered again (a module reload, a test re-definition) is
    fine and its latest keyer is kept; a different function under the same name is a
    :class:`DuplicateNameError`.
    """
    with _names_lock:
        current = _names.setdefault(name, owner)
        if current == owner and keyer is not None:
            _keyers[name] = keyer
    if current != owner:
        raise DuplicateNameError(
            f"idempotency name {name!r} is already used by {current}; {owner} cannot share it "
            "(two functions under one name would share keys). Pass a distinct name=."
        )


_MISSING = object()


class CallKeyer:
    """Turns a call's arguments into key material for one function.

    Everything that depends only on the signature is computed here, once, at
    decoration time, so the per-call path does no ``inspect`` work: positional
    arguments fill a defaults template by index, keywords by a name -> index table.
    Irregular calls (missing or unexpected arguments) fall back to
    ``Signature.bind`` only to raise Python's own ``TypeError``.
    """

    __slots__ = (
        "_by_name",
        "_defaults",
        "_filled",
        "_key_fn",
        "_n_positional",
        "_names",
        "_parts",
        "_sig",
        "_var_kw",
        "_var_pos",
    )

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        key: Callable[..., Any] | None = None,
        key_args: Iterable[str] | None = None,
        exclude_args: Iterable[str] | None = None,
    ) -> None:
        self._sig = sig = inspect.signature(func)
        params = list(sig.parameters.values())
        self._key_fn = key
        self._names = tuple(p.name for p in params)
        self._var_pos = next((i for i, p in enumerate(params) if p.kind is p.VAR_POSITIONAL), -1)
        self._var_kw = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), -1)
        self._n_positional = sum(
            1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        self._by_name = {
            p.name: i
            for i, p in enumerate(params)
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        defaults: list[Any] = []
        for p in params:
            if p.kind is p.VAR_POSITIONAL:
                defaults.append(())
            elif p.kind is p.VAR_KEYWORD:
                defaults.append({})
            else:
                defaults.append(_MISSING if p.default is p.empty else p.default)
        self._defaults = tuple(defaults)
        # With at least this many positional arguments (and no keywords) every parameter
        # has a value: the defaults left after them are all real ones.
        # A required keyword-only parameter is never filled by position: always checked.
        missing = [i for i, value in enumerate(defaults) if value is _MISSING]
        if not missing:
            self._filled = 0
        elif missing[-1] < self._n_positional:
            self._filled = missing[-1] + 1
        else:
            self._filled = sys.maxsize
        # Each argument in the key: its index, the encoding of its name, and its name.
        names = self._names
        self._parts = tuple(
            (i, f"s{len(names[i])}:{names[i]}", names[i])
            for i in self._select(key_args, exclude_args)
        )

    def _select(
        self, key_args: Iterable[str] | None, exclude_args: Iterable[str] | None
    ) -> tuple[int, ...]:
        if key_args is not None and exclude_args is not None:
            raise ConfigurationError("key_args and exclude_args cannot be combined; pick one")
        option = "key_args" if key_args is not None else "exclude_args"
        if self._key_fn is not None and (key_args is not None or exclude_args is not None):
            raise ConfigurationError(
                f"key= and {option}= cannot be combined: key= computes the key material from "
                f"the arguments itself, so {option}= would be ignored; pick one"
            )
        chosen = key_args if key_args is not None else exclude_args
        if isinstance(chosen, str):
            raise ConfigurationError(f"{option}: expected a tuple of names, got {chosen!r}")
        names = tuple(chosen) if chosen is not None else ()
        unknown = [n for n in names if n not in self._names]
        if unknown:
            raise ConfigurationError(
                f"{option}: {', '.join(map(repr, unknown))} not in the signature "
                f"({', '.join(self._names)})"
            )
        if key_args is not None:
            return tuple(i for i, n in enumerate(self._names) if n in names)
        return tuple(i for i, n in enumerate(self._names) if n not in names)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """Argument values in signature order, defaults applied."""
        values = list(self._defaults)
        n_pos = self._n_positional
        if len(args) <= n_pos:
            values[: len(args)] = args
        elif self._var_pos >= 0:
            values[:n_pos] = args[:n_pos]
            values[self._var_pos] = args[n_pos:]
        else:
            self._raise_bind_error(args, kwargs)
        if kwargs:
            extra: dict[str, Any] = {}
            by_name = self._by_name
            for k, v in kwargs.items():
                i = by_name.get(k, -1)
                if i < 0:
                    if self._var_kw < 0:
                        self._raise_bind_error(args, kwargs)
                    extra[k] = v
                elif i < n_pos and i < len(args):  # given by position already
                    self._raise_bind_error(args, kwargs)
                else:
                    values[i] = v
            if extra:
                values[self._var_kw] = extra
        elif len(args) >= self._filled:
            return values
        for v in values:
            if v is _MISSING:
                self._raise_bind_error(args, kwargs)
        return values

    def call_arguments(
        self, name: str, arguments: Mapping[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments for a call given by parameter name
        (``*args`` as a sequence under its name, ``**kwargs`` as a mapping under its)."""
        signature = self._sig
        unknown = [n for n in arguments if n not in signature.parameters]
        if unknown:
            raise ConfigurationError(
                f"{name} takes no argument {', '.join(map(repr, unknown))}; its parameters "
                f"are ({', '.join(signature.parameters)})"
            )
        ordered = {n: arguments[n] for n in signature.parameters if n in arguments}
        bound = inspect.BoundArguments(signature, ordered)
        # Defaults first: .args stops at the first parameter without a value, which would
        # turn a later *args into a keyword.
        bound.apply_defaults()
        return bound.args, bound.kwargs

    def _raise_bind_error(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._sig.bind(*args, **kwargs)  # raises Python's own, precise TypeError
        raise TypeError(f"cannot bind arguments to {self._sig}")  # pragma: no cover

    def material(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        """The canonical encoding of one call's key material."""
        if self._key_fn is not None:
            return encode(self._key_fn(*args, **kwargs), _KEY_CALLABLE)
        values = self.bind(args, kwargs)
        exact = _EXACT.get  # _encode's first step, without a call per argument
        try:
            parts = [
                name + (exact(type(values[i])) or _encode)(values[i], path)
                for i, name, path in self._parts
            ]
        except RecursionError:
            raise KeyEncodingError(
                "an argument is nested too deeply (or contains itself) to encode"
            ) from None
        return f"a{len(parts)}[{''.join(parts)}]".encode("utf-8", "surrogatepass")


def default_name(func: Callable[..., Any]) -> str:
    """``module.qualname`` of ``func``, warning when the module is ``__main__``."""
    module = getattr(func, "__module__", None) or "__main__"
    if module == "__main__":
        warnings.warn(
            f"{func.__qualname__} is defined in __main__, so its idempotency keys depend on "
            "how the program is started (python app.py vs python -m app); pass name= to pin them",
            stacklevel=4,
        )
    return f"{module}.{func.__qualname__}"

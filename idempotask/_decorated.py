"""What ``@idempotent`` returns: the protocols that type it for mypy, and the runtime
object with its key helpers (``key_for``, ``key_for_explicit``, ``forget``, ``aforget``,
``forget_key``, ``aforget_key``, ``using``), which binds like a function (see
:mod:`idempotask._binding`). The call itself is :mod:`idempotask.idempotent`'s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

from idempotask._binding import Bindable
from idempotask.backends.base import State
from idempotask.errors import AlreadyInProgress, ConfigurationError, KeyEncodingError
from idempotask.flow import Flow, Op, adrive, drive
from idempotask.keys import KEY_VERSION

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs 3.11; only mypy reads this

    from idempotask.call import Options, Spec

__all__ = ["BoundCall", "IdempotentFunction", "IdempotentMethod", "check_explicit_key"]

P = ParamSpec("P")
R_co = TypeVar("R_co", covariant=True)
_S = TypeVar("_S")
_P2 = ParamSpec("_P2")


class BoundCall(Protocol[P, R_co]):
    """What ``fn.using(key=..., owner=...)`` returns: the function with call-level
    options, and the key helpers for a call made that way."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The store key this call uses: the explicit key's, whatever the arguments, or
        the arguments' when only ``owner=`` was given."""
        ...

    def forget(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drop the record this call would answer from (see ``forget_key``)."""
        ...

    async def aforget(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Async :meth:`forget`."""
        ...


class IdempotentMethod(Protocol[P, R_co]):
    """An ``@idempotent`` function as a caller sees it: callable, with key helpers.

    This is also what looking the function up on an instance gives (a method): the
    instance is then passed first to the call *and* to ``key_for``, ``forget`` and
    ``using``, exactly like the call does (and the class, for a class method).
    """

    @property
    def idempotency(self) -> Options:
        """The validated options this function was decorated with."""
        ...

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The store key of this call, without running or claiming anything: what
        ``idempotask keys show`` takes (on Redis the record lives under
        ``idempotask.backends.redis.record_key(key)``, ``ns:{name:v1:digest}``)."""
        ...

    def key_for_explicit(self, key: str) -> str:
        """The store key of calls made with ``using(key=key)`` (an Idempotency-Key
        header, a message id): what ``forget_key`` and ``idempotask keys`` take."""
        ...

    def forget(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drop this call's stored result so it runs again; see :meth:`forget_key`."""
        ...

    async def aforget(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Async :meth:`forget`, through the store's async methods."""
        ...

    def forget_key(self, key: str, *, force: bool = False) -> bool:
        """Drop the record under ``key`` (one of this function's store keys). An
        in-progress claim raises :class:`AlreadyInProgress` unless ``force=True``.
        Returns whether a record went."""
        ...

    async def aforget_key(self, key: str, *, force: bool = False) -> bool:
        """Async :meth:`forget_key`."""
        ...

    def using(self, *, key: str | None = None, owner: str | None = None) -> BoundCall[P, R_co]:
        """This function with a per-call explicit key (an Idempotency-Key header, a
        message id) and/or an owner id (a task id shared by a task's retries)."""
        ...


class IdempotentFunction(IdempotentMethod[P, R_co], Protocol[P, R_co]):
    """What ``@idempotent`` returns: the function, plus key helpers.

    Looked up on an instance it binds like a function, helpers included:
    ``account.charge.key_for(100)`` is the key of ``account.charge(100)``; on the class,
    pass the instance yourself: ``Account.charge.key_for(account, 100)``.
    """

    @property
    def __wrapped__(self) -> Callable[P, R_co]:
        """The undecorated function."""
        ...

    # Binding, for type checkers, in the order Python applies it at runtime: a class
    # method binds its class on the class and on instances; a method binds the instance;
    # a static method (or a method looked up on its class) binds nothing. The self types
    # are Callables (not this protocol) because mypy matches a protocol's ParamSpec too
    # loosely to tell `cls: type[A]` from `self: A`; mypy then notes that a Callable is
    # not a supertype of this protocol, which is what the ignores silence.
    @overload
    def __get__(  # type: ignore[misc]
        self: Callable[Concatenate[type[_S], _P2], R_co], instance: None, owner: type[_S]
    ) -> IdempotentMethod[_P2, R_co]: ...

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...

    @overload
    def __get__(  # type: ignore[misc]
        self: Callable[Concatenate[type[_S], _P2], R_co],
        instance: _S,
        owner: type[Any] | None = None,
    ) -> IdempotentMethod[_P2, R_co]: ...

    @overload
    def __get__(
        self: Callable[Concatenate[_S, _P2], R_co],
        instance: _S,
        owner: type[Any] | None = None,
    ) -> IdempotentMethod[_P2, R_co]: ...

    @overload
    def __get__(self, instance: object, owner: type[Any] | None = None) -> Self: ...


class _BoundCall:
    """``fn.using(key=..., owner=...)``: the function bound to call-level options.

    ``prefix`` holds the instance of a method looked up on one; ``recorded`` is the call
    through ``@dead_letter``'s recording, when the options came through it.
    """

    __slots__ = ("_driver", "_explicit", "_owner", "_prefix", "_recorded", "_spec")

    def __init__(
        self,
        spec: Spec | None,
        driver: Callable[..., Any] | None,
        explicit: str | None,
        owner: str,
        prefix: tuple[Any, ...] = (),
        recorded: Callable[..., Any] | None = None,
    ) -> None:
        self._spec = spec
        self._driver = driver  # idempotask.idempotent's drive or adrive
        self._explicit = explicit
        self._owner = owner
        self._prefix = prefix
        self._recorded = recorded

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._prefix:
            args = (*self._prefix, *args)
        if self._recorded is not None:
            return self._recorded(*args, **kwargs)
        assert self._driver is not None  # only a recorded call may lack one
        return self._driver(self._spec, args, kwargs, self._explicit, self._owner)

    def through(self, recorded: Callable[..., Any], prefix: tuple[Any, ...]) -> _BoundCall:
        """The same options, called through ``recorded`` with ``prefix`` first."""
        return _BoundCall(self._spec, self._driver, self._explicit, self._owner, prefix, recorded)

    def _spec_or_refuse(self, helper: str) -> Spec:
        if self._spec is None:
            raise ConfigurationError(f"using(...).{helper}() needs @idempotent under @dead_letter")
        return self._spec

    def key_for(self, *args: Any, **kwargs: Any) -> str:
        spec = self._spec_or_refuse("key_for")
        return spec.key((*self._prefix, *args), kwargs, self._explicit)

    def forget(self, *args: Any, **kwargs: Any) -> bool:
        return drive(_forget_call(self._spec_or_refuse("forget"), self.key_for(*args, **kwargs)))

    async def aforget(self, *args: Any, **kwargs: Any) -> bool:
        key = self.key_for(*args, **kwargs)
        return await adrive(_forget_call(self._spec_or_refuse("aforget"), key))

    def __repr__(self) -> str:
        what = [f"key=<{len(self._explicit)} chars>"] if self._explicit is not None else []
        if self._owner:
            what.append(f"owner={self._owner!r}")
        name = self._spec.name if self._spec is not None else "?"
        return f"<{name}.using({', '.join(what)})>"


def check_explicit_key(name: str, key: Any) -> str:
    """``using(key=...)``'s value: a non-empty str (never echoed: it may be secret)."""
    if not isinstance(key, str):
        raise KeyEncodingError(
            f"{name}.using(key=...): an explicit key must be a str (an Idempotency-Key "
            f"header, a message id), got {type(key).__name__}; pass str() of an id, or leave "
            "key= out to key the call by its arguments",
            path="key",
            type_name=f"{type(key).__module__}.{type(key).__qualname__}",
        )
    if not key:
        raise ConfigurationError(
            f"{name}.using(key=...): the explicit key is empty; a missing header must not "
            "become one key shared by every call: refuse the request, or leave key= out to "
            "key the call by its arguments"
        )
    return key


_DIGEST = re.compile(r"x?[0-9a-f]{32}")


def _check_own_key(spec: Spec, key: Any, helper: str) -> str:
    """``key`` if it is a store key of ``spec``'s function (under any namespace, its name
    or a previous one), else a clear error: a header given where a store key belongs
    would otherwise silently forget nothing."""
    if isinstance(key, str):
        namespace, _, rest = key.partition(":")
        for name in (spec.name, *spec.options.previous_names):
            head = f"{name}:{KEY_VERSION}:"
            if namespace and rest.startswith(head) and _DIGEST.fullmatch(rest[len(head) :]):
                return key
        got = "a str that is not one"
    else:
        got = type(key).__name__
    raise ConfigurationError(
        f"{spec.name}.{helper}(key): expected one of this function's store keys "
        f"('<namespace>:{spec.name}:{KEY_VERSION}:<digest>', as key_for() gives), got {got}; "
        f"for an explicit key (an Idempotency-Key header) pass "
        f"key_for_explicit(header), or use using(key=header).forget(...)"
    )


def _forget(spec: Spec, key: str, force: bool) -> Flow[bool]:
    """Drop the record under ``key``; one in progress only with ``force``."""
    backend = spec.backend()
    dropped: bool
    if force:
        dropped = yield Op(backend.delete, backend.adelete, key)
        return dropped
    record = yield Op(backend.get, backend.aget, key)
    if record is None:
        return False
    if record.state is State.IN_PROGRESS:
        raise AlreadyInProgress(
            f"{key} is being computed right now; pass force=True to drop the claim anyway",
            key=key,
        )
    dropped = yield Op(backend.delete, backend.adelete, key, token=record.token)
    return dropped


def _forget_call(spec: Spec, key: str) -> Flow[bool]:
    """``forget(...)``: the call's record under ``key`` and under each previous name,
    where a record would still answer the next call (see ``previous_names``)."""
    dropped = False
    for k in (key, *spec.previous_keys(key)):
        dropped = (yield from _forget(spec, k, False)) or dropped
    return dropped


class _Idempotent(Bindable):
    """The runtime type of :class:`IdempotentFunction` (see :mod:`idempotask._binding`)."""

    _kind = "idempotent function"
    __idempotask_spec__: Spec
    idempotency: Options
    _driver: Callable[..., Any]  # drive or adrive, set by @idempotent

    def key_for(self, *args: Any, **kwargs: Any) -> str:
        return self.__idempotask_spec__.key(args, kwargs, None)

    def key_for_explicit(self, key: str) -> str:
        spec = self.__idempotask_spec__
        return spec.key((), {}, check_explicit_key(spec.name, key))

    def forget(self, *args: Any, **kwargs: Any) -> bool:
        spec = self.__idempotask_spec__
        return drive(_forget_call(spec, spec.key(args, kwargs, None)))

    async def aforget(self, *args: Any, **kwargs: Any) -> bool:
        spec = self.__idempotask_spec__
        return await adrive(_forget_call(spec, spec.key(args, kwargs, None)))

    def forget_key(self, key: str, *, force: bool = False) -> bool:
        spec = self.__idempotask_spec__
        return drive(_forget(spec, _check_own_key(spec, key, "forget_key"), force))

    async def aforget_key(self, key: str, *, force: bool = False) -> bool:
        spec = self.__idempotask_spec__
        return await adrive(_forget(spec, _check_own_key(spec, key, "aforget_key"), force))

    def using(self, *, key: str | None = None, owner: str | None = None, **unknown: Any) -> Any:
        return self._bound_using(key, owner, unknown, ())

    def _bound_using(
        self, key: Any, owner: Any, unknown: dict[str, Any], prefix: tuple[Any, ...]
    ) -> _BoundCall:
        name = self.__name__
        if unknown:
            first = next(iter(unknown))
            raise TypeError(
                f"{name}.using() got an unexpected keyword argument {first!r}; it takes key= (an "
                "explicit idempotency key) and owner= (an id shared by retries of one execution)"
            )
        explicit = None if key is None else check_explicit_key(name, key)
        if owner is not None and not isinstance(owner, str):
            raise ConfigurationError(
                f"{name}.using(owner=...): expected a str (a task or message id shared by the "
                f"retries of one execution), got {type(owner).__name__}"
            )
        return _BoundCall(self.__idempotask_spec__, self._driver, explicit, owner or "", prefix)

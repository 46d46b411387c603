"""``@idempotent``: the same logical call within ``ttl`` runs once.

This module is the decorator: it validates the options, builds the call's
:class:`~idempotask.call.Spec` and returns the wrapped function with its helpers
(:mod:`idempotask._decorated`). What a call does is in :mod:`idempotask.call`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, cast, overload

from idempotask import config
from idempotask._decorated import BoundCall, IdempotentFunction, IdempotentMethod, _Idempotent
from idempotask.backends.base import Backend
from idempotask.call import Options, Spec, adrive, drive, register_cancellation
from idempotask.config import Seconds
from idempotask.errors import ConfigurationError
from idempotask.keys import CallKeyer, check_name, claim_name, default_name
from idempotask.serializers import Serializer, get_serializer

if TYPE_CHECKING:
    from idempotask.breaker import CircuitBreaker

__all__ = [
    "BoundCall",
    "IdempotentFunction",
    "IdempotentMethod",
    "idempotent",
    "register_cancellation",
]

P = ParamSpec("P")
R = TypeVar("R")


def _wrap(func: Any, options: dict[str, Any]) -> Any:
    if isinstance(func, staticmethod):
        return staticmethod(_wrap(func.__func__, options))
    if isinstance(func, classmethod):
        # Binds the class itself rather than sitting in a classmethod, so the helpers
        # bind it too (a classmethod around it would on Python < 3.13 only).
        wrapped = _wrap(func.__func__, options)
        wrapped.binds_class()
        return wrapped
    if not callable(func):
        raise ConfigurationError(f"@idempotent: expected a function, got {func!r}")
    if hasattr(func, "__idempotask_dead_letter__"):
        raise ConfigurationError(
            f"@idempotent must be applied under @dead_letter, not over it: put @dead_letter "
            f"first (outermost) on {getattr(func, '__qualname__', func)!r}"
        )
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise ConfigurationError(
            f"@idempotent cannot wrap {getattr(func, '__qualname__', func)!r}: it is a "
            "generator function, so a call returns an iterator that runs later and no store "
            "can keep it as the call's result. Collect the items in the function (return a "
            "list) and decorate that"
        )
    name = options.pop("name")
    qualname = getattr(func, "__qualname__", None)
    if name is None and not isinstance(qualname, str):
        # A callable instance (or a functools.partial) has no name to key its calls by.
        raise ConfigurationError(
            f"@idempotent: a {type(func).__name__} object has no __qualname__ to name its "
            "keys by; pass name='...' (a stable name such as 'billing.charge')"
        )
    name = check_name(name) if name is not None else default_name(func)
    owner = f"{getattr(func, '__module__', None) or '?'}.{qualname or type(func).__qualname__}"
    keyer = CallKeyer(
        func,
        key=options.pop("key"),
        key_args=options.pop("key_args"),
        exclude_args=options.pop("exclude_args"),
    )
    breaker = options.pop("breaker")
    if breaker is not None:
        from idempotask.breaker import check_breaker  # imported only when a breaker is given

        breaker = check_breaker(breaker)
    opts = _validate(name, options)
    claim_name(name, owner, keyer)
    # The breaker guards the body, inside the claim: an open breaker fails fast and the
    # key is released like after any failure.
    spec = Spec(func if breaker is None else breaker(func), opts, keyer)

    async def call_async(*args: Any, **kwargs: Any) -> Any:
        return await adrive(spec, args, kwargs)

    def call(*args: Any, **kwargs: Any) -> Any:
        return drive(spec, args, kwargs)

    is_async = inspect.iscoroutinefunction(func)
    w = _Idempotent.make(call_async if is_async else call, func)
    w.idempotency = opts
    w.__idempotask_spec__ = spec
    w._driver = adrive if is_async else drive
    return w


def _check_previous(name: str, previous: Any) -> tuple[str, ...]:
    if isinstance(previous, str) or not isinstance(previous, (tuple, list)):
        raise ConfigurationError(f"previous_names: expected a tuple of names, got {previous!r}")
    names = tuple(check_name(p) for p in previous)
    if name in names or len(set(names)) != len(names):
        raise ConfigurationError(
            f"previous_names: {names!r} must be distinct and must not contain the current "
            f"name {name!r}"
        )
    return names


def _unless_none(check: Callable[..., Any], option: str, value: Any, *args: Any, **kw: Any) -> Any:
    """``check(option, value, ...)``, or None (the configured default) for None."""
    return None if value is None else check(option, value, *args, **kw)


def _validate(name: str, o: dict[str, Any]) -> Options:
    cache = None if o["cache_errors"] is False else o["cache_errors"]
    if cache is True:
        raise ConfigurationError("cache_errors: pass the seconds to keep a failure, not True")
    transactional = _check_transactional(name, o)
    seconds, choice = config.check_seconds, config.check_choice
    return Options(
        name=name,
        ttl=_unless_none(seconds, "ttl", o["ttl"]),
        lease=_unless_none(seconds, "lease", o["lease"]),
        on_conflict=cast(
            Literal["wait", "raise"], choice("on_conflict", o["on_conflict"], ("wait", "raise"))
        ),
        wait_timeout=_unless_none(seconds, "wait_timeout", o["wait_timeout"], allow_zero=True),
        cache_errors=_unless_none(seconds, "cache_errors", cache),
        backend=config.check_backend(o["backend"]),
        serializer=None if o["serializer"] is None else get_serializer(o["serializer"]),
        previous_names=_check_previous(name, o["previous_names"]),
        max_result_bytes=_unless_none(config.check_size, "max_result_bytes", o["max_result_bytes"]),
        on_backend_error=_unless_none(
            choice, "on_backend_error", o["on_backend_error"], ("raise", "open")
        ),
        transactional=transactional,
    )


def _check_transactional(name: str, o: dict[str, Any]) -> bool:
    transactional = o["transactional"]
    if not isinstance(transactional, bool):
        raise ConfigurationError(f"transactional: expected True or False, got {transactional!r}")
    if not transactional:
        return False
    if o["on_backend_error"] == "open":
        raise ConfigurationError(
            f"{name}: transactional=True cannot run with on_backend_error='open': the body "
            "writes in the store's database, so it cannot run while that store is down"
        )
    if o["previous_names"]:
        raise ConfigurationError(
            f"{name}: transactional=True does not support previous_names yet: the result "
            "is written in one transaction under the current name only"
        )
    if o["backend"] is not None:
        from idempotask._transactional import check_store

        check_store(name, o["backend"])
    return True


@overload
def idempotent(func: Callable[P, R], /) -> IdempotentFunction[P, R]: ...


@overload
def idempotent(
    *,
    ttl: Seconds | None = None,
    lease: Seconds | None = None,
    on_conflict: Literal["wait", "raise"] = "wait",
    wait_timeout: Seconds | None = None,
    cache_errors: Seconds | None = None,
    key: Callable[..., Any] | None = None,
    key_args: tuple[str, ...] | list[str] | None = None,
    exclude_args: tuple[str, ...] | list[str] | None = None,
    name: str | None = None,
    backend: Backend | str | None = None,
    serializer: Serializer | str | None = None,
    on_backend_error: Literal["raise", "open"] | None = None,
    breaker: CircuitBreaker | None = None,
    max_result_bytes: int | None = None,
    previous_names: tuple[str, ...] | list[str] = (),
    transactional: bool = False,
) -> Callable[[Callable[P, R]], IdempotentFunction[P, R]]: ...


def idempotent(
    func: Callable[..., Any] | None = None,
    /,
    *,
    ttl: Seconds | None = None,
    lease: Seconds | None = None,
    on_conflict: Literal["wait", "raise"] = "wait",
    wait_timeout: Seconds | None = None,
    cache_errors: Seconds | None = None,
    key: Callable[..., Any] | None = None,
    key_args: tuple[str, ...] | list[str] | None = None,
    exclude_args: tuple[str, ...] | list[str] | None = None,
    name: str | None = None,
    backend: Backend | str | None = None,
    serializer: Serializer | str | None = None,
    on_backend_error: Literal["raise", "open"] | None = None,
    breaker: CircuitBreaker | None = None,
    max_result_bytes: int | None = None,
    previous_names: tuple[str, ...] | list[str] = (),
    transactional: bool = False,
) -> Any:
    """Make a function idempotent: the same logical call within ``ttl`` runs once.

    Use it bare or with options, on functions, methods, static and class methods and
    ``async def`` functions::

        @idempotent(ttl=4 * 3600)
        def charge(account_id: int, amount: Decimal) -> dict: ...

    Options (None means "the configured default", see :func:`idempotask.configure`):

    - ``ttl``: seconds a result is kept, counted from completion (default 24 h).
    - ``lease``: seconds a running call holds its claim without renewal (default 60 s);
      renewed every third of it in the background while the body runs, so a crashed
      caller's claim is taken over after at most one lease.
    - ``on_conflict``: ``"wait"`` (default) polls another caller's claim until it
      completes (returns its result), fails (claims and runs itself) or ``wait_timeout``
      passes (:class:`AlreadyInProgress`); ``"raise"`` raises at once.
    - ``wait_timeout``: seconds to wait with ``on_conflict="wait"`` (default 60 s).
    - ``cache_errors``: seconds to keep a failure; duplicates then re-raise an exception
      of the same type and message without running. Off by default: a failure releases
      the key so the next call runs again. Cancellations are never cached.
    - ``key``: a callable taking the function's arguments and returning key material.
    - ``key_args`` / ``exclude_args``: names of the arguments that make the key, or that
      do not.
    - ``name``: the stable name in the key (default ``module.qualname``); pin it so a
      refactor does not change keys. Two functions cannot share a name.
    - ``backend``: a store instance or URL for this function only.
    - ``serializer``: ``"json"`` (typed JSON, default), ``"pickle"`` or an object with
      ``dumps`` / ``loads``.
    - ``on_backend_error``: ``"raise"`` (fail closed, default) or ``"open"`` (run
      unprotected when the store is down, loudly logged).
    - ``breaker``: a :class:`idempotask.CircuitBreaker` guarding the body; while it is
      open, calls fail fast with :class:`idempotask.CircuitOpenError` and release the key.
    - ``max_result_bytes``: the largest serialized result stored (default 1 MiB, see
      ``configure``); a bigger one is a :class:`SerializationError` and releases the key.
    - ``previous_names``: names this function's keys had before a rename. While listed,
      a first call also claims (and completes) the key under each previous name, so
      results stored under them are honoured and processes still running the old code
      never run a call twice; duplicates still cost one round trip. Remove them once
      the old code is gone and the longest ttl has passed.
    - ``transactional``: run the body in one database transaction on the store's database
      (a SQL store), in which the result is written too, with a compare-and-set on the
      claim, and commit once: the body's writes (through :func:`idempotask.transaction`)
      and the result commit together or not at all. A late owner's transaction is rolled
      back whole (:class:`idempotask.LeaseLostError`); a failure rolls the writes back and
      is recorded outside the transaction. See the README's "Transactional mode".
    """
    options = dict(locals())  # every option by name: read before any other local exists
    del options["func"]
    if key is not None and not callable(key):
        raise ConfigurationError(
            f"key: expected a callable taking the function's arguments, got {key!r}"
        )
    if func is not None:
        return _wrap(func, options)
    return lambda f: _wrap(f, dict(options))

"""The breaker's small parts: the per-call guards, what counts as a failure, and the
store that goes with a backend."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

from idempotask.backends.base import BreakerStore
from idempotask.errors import ConfigurationError
from idempotask.taxonomy import FailureKind, check_kind, classify

if TYPE_CHECKING:
    from idempotask.breaker._breaker import CircuitBreaker

__all__ = [
    "AsyncBreakerGuard",
    "BreakerGuard",
    "FailurePredicate",
    "OnStoreError",
    "failure_test",
    "store_for_backend",
]

OnStoreError = Literal["allow", "raise"]
FailurePredicate = Callable[[BaseException], bool]
"""Decides whether an exception counts as a failure of the protected dependency."""


class BreakerGuard:
    """One guarded call: ``with breaker.guard(): ...`` (see :meth:`CircuitBreaker.guard`).

    ``probe`` tells, inside the block, whether this call is the half-open probe.
    """

    __slots__ = ("_breaker", "probe")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self.probe = False

    def __enter__(self) -> BreakerGuard:
        self.probe = self._breaker._enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._breaker._exit(self.probe, exc)


class AsyncBreakerGuard:
    """One guarded async call: ``async with breaker.aguard(): ...`` (see ``aguard``)."""

    __slots__ = ("_breaker", "probe")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self.probe = False

    async def __aenter__(self) -> AsyncBreakerGuard:
        self.probe = await self._breaker._aenter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._breaker._aexit(self.probe, exc)


# ------------------------------------------------------------------ helpers


def failure_test(value: Iterable[FailureKind | str] | FailurePredicate) -> FailurePredicate:
    """A predicate for ``failure_kinds``: kinds are looked up through the classifier."""
    if isinstance(value, (str, FailureKind)):
        value = (value,)
    if callable(value) and not isinstance(value, type):  # the FailureKind class is iterable
        return value
    try:
        kinds = frozenset(check_kind("failure_kinds", kind) for kind in cast(Iterable[Any], value))
    except TypeError:
        raise ConfigurationError(
            f"failure_kinds: expected FailureKinds or a predicate exc -> bool, got {value!r}"
        ) from None
    # classify() at call time, so failure kinds registered later apply.
    return lambda exc: classify(exc).kind in kinds


def store_for_backend(backend: object, *, namespace: str = "idempotask") -> BreakerStore:
    """The breaker store that goes with an idempotency backend (used for ``store=None``):
    the backend's own ``breaker_store(namespace=namespace)``
    (:class:`~idempotask.backends.base.ProvidesStores`).

    >>> from idempotask.backends.memory import MemoryBackend
    >>> type(store_for_backend(MemoryBackend())).__name__
    'MemoryBreakerStore'
    """
    make = getattr(backend, "breaker_store", None)
    kind = type(backend).__name__
    if not callable(make):
        raise ConfigurationError(
            f"CircuitBreaker: the configured backend {kind} keeps no breaker state (it has "
            "no breaker_store(namespace=...) method, see idempotask.backends.base."
            "ProvidesStores); pass store= to the CircuitBreaker: a MemoryBreakerStore for "
            "one process, or a shared store such as RedisBreakerStore or SQLBreakerStore"
        )
    try:
        store = make(namespace=namespace)
    except TypeError as exc:
        raise ConfigurationError(
            f"CircuitBreaker: {kind}.breaker_store() does not take namespace= ({exc}); "
            "update the backend to idempotask.backends.base.ProvidesStores, or pass store= "
            "to the CircuitBreaker"
        ) from None
    if not isinstance(store, BreakerStore):
        raise ConfigurationError(
            f"CircuitBreaker: {kind}.breaker_store() returned {type(store).__name__}, not a "
            "BreakerStore (idempotask.backends.base); pass store= to the CircuitBreaker"
        )
    return store

"""The circuit breaker itself: its local view, and the decision core that asks the
shared store (a flow of store operations run by :mod:`idempotask.flow`). See
:mod:`idempotask.breaker` for the behaviour."""

from __future__ import annotations

import contextvars
import enum
import functools
import inspect
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from idempotask import flow
from idempotask.backends.base import BreakerState, BreakerStatus, BreakerStore
from idempotask.breaker._support import (
    AsyncBreakerGuard,
    BreakerGuard,
    FailurePredicate,
    OnStoreError,
    failure_test,
    store_for_backend,
)
from idempotask.errors import (
    AlreadyInProgress,
    BackendError,
    CircuitOpenError,
    ConfigurationError,
)
from idempotask.flow import Flow, Op, store_op
from idempotask.taxonomy import FailureKind

__all__ = ["CircuitBreaker", "check_breaker"]

logger = logging.getLogger("idempotask.breaker")

_P = ParamSpec("_P")
_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

# Recording an outcome never raises: every error an operation raises is thrown into the flow.
_ANY_ERROR: tuple[type[BaseException], ...] = (Exception,)


# --------------------------------------------------------------------------- the core


class _Op(enum.Enum):
    """A store operation the decision core asks its driver to perform (the value is the
    :class:`BreakerStore` method's name)."""

    STATE = "state"
    PROBE = "try_probe"
    SUCCESS = "record_success"
    FAILURE = "record_failure"


# `with breaker:` keeps whether each entry holds the probe here, per thread and per task
# (a ContextVar is both), as a stack of (breaker, probe) so nesting works.
_entered: contextvars.ContextVar[tuple[tuple[CircuitBreaker, bool], ...]] = contextvars.ContextVar(
    "idempotask_breaker_entered", default=()
)


class CircuitBreaker:
    """A closed / open / half-open circuit breaker with one probe, shared through a store.

    ``name`` identifies the breaker in the store: every breaker with this name, in every
    process using the same store, shares one state (create one per dependency, at module
    level, and share it). ``failure_threshold`` failures within ``window`` seconds open it
    for ``recovery_timeout`` seconds; then one probe call decides. See the module
    docstring for what counts as a failure and for round trips.

    ``store`` is a :class:`BreakerStore` (None: the configured backend's, resolved at
    first use and again after :func:`idempotask.configure`). ``failure_kinds`` is an
    iterable of :class:`~idempotask.taxonomy.FailureKind` (TRANSIENT and EXTERNAL by
    default) or a predicate ``exc -> bool``. ``check_interval`` is the most often (in
    seconds) a process re-reads the shared state while it believes the breaker closed;
    None never does (a process then learns of an opening from its next failure).
    ``probe_lease`` bounds how long a crashed or hung probe blocks the next one.
    ``on_store_error`` is ``"allow"`` or ``"raise"`` (see the module). ``clock`` (seconds,
    monotonic) times the local cache only; the store times everything shared.

    >>> breaker = CircuitBreaker("geo-api", failure_threshold=3, recovery_timeout=10)
    >>> with breaker:
    ...     pass  # call the dependency here
    >>> breaker.status.value
    'closed'
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        window: float = 60.0,
        recovery_timeout: float = 30.0,
        store: BreakerStore | None = None,
        failure_kinds: Iterable[FailureKind | str] | FailurePredicate = (
            FailureKind.TRANSIENT,
            FailureKind.EXTERNAL,
        ),
        check_interval: float | None = 1.0,
        probe_lease: float = 30.0,
        on_store_error: OnStoreError = "allow",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from idempotask.config import check_choice, check_seconds

        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"CircuitBreaker: name must be a non-empty str, got {name!r}")
        if (
            isinstance(failure_threshold, bool)
            or not isinstance(failure_threshold, int)
            or failure_threshold < 1
        ):
            raise ConfigurationError(
                f"CircuitBreaker: failure_threshold must be an int >= 1, got {failure_threshold!r}"
            )
        if store is not None and not isinstance(store, BreakerStore):
            raise ConfigurationError(
                "CircuitBreaker: store must implement idempotask.backends.base.BreakerStore "
                f"(e.g. MemoryBreakerStore, RedisBreakerStore), got {type(store).__name__}"
            )
        if not callable(clock):
            raise ConfigurationError(f"CircuitBreaker: clock must be callable, got {clock!r}")
        self._name = name
        self._threshold = failure_threshold
        self._window = check_seconds("window", window)
        self._recovery = check_seconds("recovery_timeout", recovery_timeout)
        self._probe_lease = check_seconds("probe_lease", probe_lease)
        self._interval = (
            math.inf if check_interval is None else check_seconds("check_interval", check_interval)
        )
        self._on_store_error = check_choice("on_store_error", on_store_error, ("allow", "raise"))
        self._counts_as_failure = failure_test(failure_kinds)
        self._clock = clock
        self._store = store
        # (config generation, store) when the store comes from the configured backend.
        self._resolved: tuple[int, BreakerStore] | None = None

        self._lock = threading.Lock()
        # The local cache, all on ``clock``. None: believed closed. A time: believed open
        # or half-open; calls before it fail fast, the first call after it asks the store
        # for the probe.
        self._open_until: float | None = None
        # This process holds (or is asking for) the probe until then: its other callers
        # fail fast instead of asking the store too.
        self._probe_until = -math.inf
        # The next amortised read of the shared state while believed closed (-inf: the
        # first call reads, so a process started during an outage learns at once).
        self._next_check = -math.inf if check_interval is not None else math.inf
        # Whether the store has answered once. Until then every caller reads the state
        # (not only the one whose turn it is), so the threads of a process started during
        # an outage do not all run before its first read returns.
        self._known = check_interval is None
        # After a store error (on_store_error="allow"): leave the store alone until then.
        self._quiet_until = -math.inf
        with _registry_lock:
            _breakers.add(self)

    # ------------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        """The breaker's name in the store."""
        return self._name

    @property
    def status(self) -> BreakerStatus:
        """This process's view, without store I/O (see :meth:`current` for the store's).

        >>> CircuitBreaker("x").status
        <BreakerStatus.CLOSED: 'closed'>
        """
        open_until = self._open_until
        if open_until is None:
            return BreakerStatus.CLOSED
        return BreakerStatus.OPEN if self._clock() < open_until else BreakerStatus.HALF_OPEN

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker({self._name!r}, failure_threshold={self._threshold}, "
            f"window={self._window:g}, recovery_timeout={self._recovery:g}, "
            f"status={self.status.value})"
        )

    # ---------------------------------------------------------------- public API

    def guard(self) -> BreakerGuard:
        """A context manager around one call: fails fast before, records the outcome after.

        Entering raises :class:`~idempotask.errors.CircuitOpenError` while the breaker is
        open; leaving records the exception (if it counts) or, for a probe, the success.
        Exceptions always propagate. This is the hook for wrappers::

            with breaker.guard():
                return func(*args, **kwargs)
        """
        return BreakerGuard(self)

    def aguard(self) -> AsyncBreakerGuard:
        """The async :meth:`guard`, for ``async with`` (store I/O is awaited).

        >>> async def fetch() -> None:
        ...     async with breaker.aguard():  # doctest: +SKIP
        ...         await client.get(url)
        """
        return AsyncBreakerGuard(self)

    def call(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``fn(*args, **kwargs)`` through the breaker (for ``async def``: :meth:`acall`).

        >>> CircuitBreaker("math").call(pow, 2, 10)
        1024
        """
        with BreakerGuard(self):
            return fn(*args, **kwargs)

    async def acall(
        self, fn: Callable[_P, Awaitable[_T]], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Await ``fn(*args, **kwargs)`` through the breaker.

        >>> await breaker.acall(client.get, url)  # doctest: +SKIP
        """
        async with AsyncBreakerGuard(self):
            return await fn(*args, **kwargs)

    def __call__(self, fn: _F) -> _F:
        """Decorate a function (sync or ``async def``) so every call goes through the breaker.

        >>> @CircuitBreaker("inventory")
        ... def stock(sku: str) -> int:
        ...     return 3
        >>> stock("A-1")
        3
        """
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async with AsyncBreakerGuard(self):
                    return await fn(*args, **kwargs)

            return cast(_F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with BreakerGuard(self):
                return fn(*args, **kwargs)

        return cast(_F, wrapper)

    def __enter__(self) -> CircuitBreaker:
        """``with breaker:`` guards the block like :meth:`guard`."""
        probe = self._enter()
        _entered.set((*_entered.get(), (self, probe)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(self._pop_entered(), exc)

    async def __aenter__(self) -> CircuitBreaker:
        """``async with breaker:`` guards the block like :meth:`aguard`."""
        probe = await self._aenter()
        _entered.set((*_entered.get(), (self, probe)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._aexit(self._pop_entered(), exc)

    def current(self) -> BreakerState:
        """Read the shared state from the store (one round trip) and refresh the local view.

        Store errors propagate here (:class:`~idempotask.errors.BackendError`).

        >>> CircuitBreaker("reports").current().status.value
        'closed'
        """
        state = self._store_now().state(self._name)
        self._learn(state, _Op.STATE, self._clock())
        return state

    async def acurrent(self) -> BreakerState:
        """Async :meth:`current`."""
        state = await self._store_now().astate(self._name)
        self._learn(state, _Op.STATE, self._clock())
        return state

    def reset(self) -> None:
        """Force the breaker closed, in the store and locally (failures forgotten).

        Other processes keep failing fast until their cached open period ends.

        >>> CircuitBreaker("reports").reset()
        """
        self._store_now().reset(self._name)
        self._forget()

    async def areset(self) -> None:
        """Async :meth:`reset`."""
        await self._store_now().areset(self._name)
        self._forget()

    # ---------------------------------------------------------- the decision core

    def _enter(self) -> bool:
        """Admit one call (sync); True when it is the probe."""
        op = self._before(self._clock())
        return False if op is None else flow.drive(self._admit(op))

    async def _aenter(self) -> bool:
        op = self._before(self._clock())
        return False if op is None else await flow.adrive(self._admit(op))

    def _exit(self, probe: bool, exc: BaseException | None) -> None:
        """Record one call's outcome (sync); never raises."""
        op = self._after(probe, exc)
        if op is not None:
            flow.drive(self._record(op, probe), _ANY_ERROR)

    async def _aexit(self, probe: bool, exc: BaseException | None) -> None:
        op = self._after(probe, exc)
        if op is not None:
            await flow.adrive(self._record(op, probe), _ANY_ERROR)

    def _before(self, now: float) -> _Op | None:
        """The store operation needed before a call, or None to run it; fails fast."""
        open_until = self._open_until
        if open_until is None:
            # The hot path reads without the lock: a stale value at worst repeats or delays
            # one cheap state read by a moment.
            if (now < self._next_check and self._known) or now < self._quiet_until:
                return None
            with self._lock:
                if now < self._next_check and self._known:
                    return None  # another thread claimed this check
                self._next_check = now + self._interval
            return _Op.STATE
        if now < open_until:
            raise CircuitOpenError(self._name, open_until - now)
        with self._lock:
            return self._claim_probe(now)

    def _claim_probe(self, now: float) -> _Op | None:
        """Under the lock: ask the store for the probe, unless this process already is."""
        if now < self._probe_until:
            raise CircuitOpenError(self._name, min(self._probe_until - now, self._interval))
        if now < self._quiet_until:
            return None  # the store is failing; "allow" lets the call through
        self._probe_until = now + self._probe_lease
        return _Op.PROBE

    def _admit(self, op: _Op) -> Flow[bool]:
        """Ask the store before a call: at most a state read, then a probe request."""
        while True:
            try:
                state = yield self._io(op)
            except BackendError as exc:
                if op is _Op.PROBE:
                    self._release_probe()
                self._store_failed(exc, op)
                if self._on_store_error == "raise":
                    raise
                return False
            now = self._clock()
            with self._lock:
                wait = self._learn_locked(state, op, now)
                if op is _Op.PROBE and state.probe:
                    return True
                if state.status is BreakerStatus.CLOSED:
                    return False
                if op is _Op.STATE and wait is None:
                    # Half-open with the probe free: ask for it right away.
                    next_op = self._claim_probe(now)
                    if next_op is None:
                        return False
                    op = next_op
                    continue
            raise CircuitOpenError(self._name, wait or 0.0)

    def _after(self, probe: bool, exc: BaseException | None) -> _Op | None:
        """The store operation that records a call's outcome, or None (nothing to share)."""
        if exc is None:
            if not probe:
                return None  # the hot path: a success in the closed state writes nothing
            op = _Op.SUCCESS
        elif not isinstance(exc, Exception) or isinstance(exc, AlreadyInProgress):
            # Cancellation, KeyboardInterrupt, work running elsewhere: no verdict on the
            # dependency. A probe is released locally; its store lease runs out.
            if probe:
                self._release_probe()
            return None
        elif self._counts(exc):
            op = _Op.FAILURE
        elif probe:
            op = _Op.SUCCESS  # the dependency answered, if with an error that is not its fault
        else:
            return None
        if self._clock() < self._quiet_until:
            if probe:
                self._release_probe()
            return None
        return op

    def _record(self, op: _Op, probe: bool) -> Flow[None]:
        """Record a call's outcome in the store (driven with every error thrown in)."""
        try:
            state = yield self._io(op)
            now = self._clock()
            with self._lock:
                if probe:
                    self._probe_until = -math.inf
                self._learn_locked(state, op, now)
            if state.changed:
                self._log_transition(state, op, probe)
        except BackendError as exc:
            # The call's own outcome must win: log, never raise from here.
            self._store_failed(exc, op)
            if probe:
                self._release_probe()
        except Exception:
            # Not a BackendError: a store that cannot be built, a broken third-party store.
            # The call's own outcome must still win.
            if probe:
                self._release_probe()
            logger.exception("circuit breaker %r: %s failed", self._name, op.value)

    def _learn(self, state: BreakerState, op: _Op, now: float) -> None:
        with self._lock:
            self._learn_locked(state, op, now)

    def _learn_locked(self, state: BreakerState, op: _Op, now: float) -> float | None:
        """Cache what the store said; returns seconds to fail fast for (None: may run/probe)."""
        self._next_check = now + self._interval
        self._known = True
        was_open = self._open_until is not None
        wait: float | None
        if state.status is BreakerStatus.CLOSED:
            self._open_until = None
            wait = None
        elif state.status is BreakerStatus.OPEN:
            wait = state.retry_after
            self._open_until = now + wait
        elif state.probe:
            self._open_until = now  # our probe; _probe_until keeps our other callers out
            wait = None
        elif state.retry_after > 0:
            # Another caller's probe is in flight: look again within check_interval, so its
            # success is learnt soon rather than at the end of its lease.
            wait = min(state.retry_after, self._interval)
            self._open_until = now + wait
        else:
            self._open_until = now  # half-open, probe free: the next call asks for it
            wait = None
        if op is _Op.PROBE and not state.probe:
            self._probe_until = -math.inf
        if not state.changed and was_open != (self._open_until is not None):
            logger.debug(
                "circuit breaker %r: learnt from the store that it is %s",
                self._name,
                state.status.value,
            )
        return wait

    def _release_probe(self) -> None:
        with self._lock:
            self._probe_until = -math.inf

    def _forget(self) -> None:
        with self._lock:
            self._open_until = None
            self._probe_until = -math.inf
            self._next_check = self._clock() + self._interval

    def _counts(self, exc: BaseException) -> bool:
        try:
            return self._counts_as_failure(exc)
        except Exception:
            # A broken predicate must not replace the caller's exception; counting errs on
            # the side of protecting the dependency.
            logger.warning(
                "circuit breaker %r: the failure predicate raised; counting %s as a failure",
                self._name,
                type(exc).__name__,
                exc_info=True,
            )
            return True

    def _store_failed(self, exc: BackendError, op: _Op) -> None:
        if self._on_store_error == "allow":
            with self._lock:
                self._quiet_until = self._clock() + (
                    self._interval if math.isfinite(self._interval) else 1.0
                )
            logger.warning(
                "circuit breaker %r: its store failed during %s (%s); calls run unguarded for now",
                self._name,
                op.value,
                exc,
            )
        else:
            logger.warning(
                "circuit breaker %r: its store failed during %s: %s", self._name, op.value, exc
            )

    def _log_transition(self, state: BreakerState, op: _Op, probe: bool) -> None:
        if state.status is BreakerStatus.CLOSED:
            logger.warning("circuit breaker %r closed: the probe call succeeded", self._name)
        elif op is _Op.FAILURE and state.failures == 0:
            logger.warning(
                "circuit breaker %r opened again: %s failed; failing fast for %.3gs",
                self._name,
                "the probe call" if probe else "a call while half-open",
                state.retry_after,
            )
        else:
            logger.warning(
                "circuit breaker %r opened after %d failures within %.3gs; failing fast for %.3gs",
                self._name,
                state.failures,
                self._window,
                state.retry_after,
            )

    def _pop_entered(self) -> bool:
        stack = _entered.get()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] is self:
                _entered.set(stack[:i] + stack[i + 1 :])
                return stack[i][1]
        return False

    def _io(self, op: _Op) -> Op:
        """The store operation ``op`` stands for (its value names the method), on the
        store in use now."""
        store = self._store_now()
        if op is _Op.PROBE:
            return store_op(store, op.value, self._name, uuid.uuid4().hex, lease=self._probe_lease)
        if op is _Op.FAILURE:
            return store_op(
                store,
                op.value,
                self._name,
                threshold=self._threshold,
                window=self._window,
                open_for=self._recovery,
            )
        return store_op(store, op.value, self._name)  # STATE, SUCCESS

    def _store_now(self) -> BreakerStore:
        if self._store is not None:
            return self._store
        from idempotask import config

        resolved = self._resolved
        if resolved is not None and resolved[0] == config.generation:
            return resolved[1]
        generation = config.generation
        store = store_for_backend(config.get_backend(), namespace=config.settings().namespace)
        self._resolved = (generation, store)
        return store


# --------------------------------------------------------------------------- fork

# Every live breaker, so a forked child can replace locks a parent thread held at fork().
_breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
_registry_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # The thread that forked holds the registry lock (taken before fork()) and is the
    # child's only thread: it releases it, as the parent does.
    _registry_lock.release()
    for breaker in list(_breakers):
        breaker._lock = threading.Lock()
        # A probe the parent was running is not the child's to report.
        breaker._probe_until = -math.inf


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_registry_lock.acquire,
        after_in_parent=_registry_lock.release,
        after_in_child=_after_fork_in_child,
    )


def check_breaker(value: Any) -> CircuitBreaker | None:
    """Validate a ``breaker=`` option: a :class:`CircuitBreaker` or None."""
    if value is None or isinstance(value, CircuitBreaker):
        return value
    raise ConfigurationError(
        f"breaker: expected an idempotask.CircuitBreaker, got {type(value).__name__}"
    )

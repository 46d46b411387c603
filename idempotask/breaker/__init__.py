"""A circuit breaker whose state is shared across processes through a small store.

While a dependency is down, calling it again and again only adds load and latency. A
:class:`CircuitBreaker` counts the failures of the calls it guards and, after
``failure_threshold`` of them within ``window`` seconds, *opens*: every call fails fast
with :class:`~idempotask.errors.CircuitOpenError` without running. After
``recovery_timeout`` seconds it is *half-open*: exactly one caller, across every process
sharing the store, gets to run a *probe* call. A probe that succeeds *closes* the breaker
(failures forgotten); a probe that fails opens it again for another ``recovery_timeout``.

>>> payments = CircuitBreaker("payments", failure_threshold=5, window=60, recovery_timeout=30)
>>> @payments
... def charge(order_id: int) -> str:
...     return f"charged {order_id}"
>>> charge(7)
'charged 7'

It also works as ``with payments:`` / ``async with payments:``, ``payments.call(fn, ...)``
/ ``await payments.acall(fn, ...)``, on ``async def`` functions, and through
:meth:`CircuitBreaker.guard` / :meth:`CircuitBreaker.aguard`, which wrappers such as
``@dead_letter(breaker=...)`` use. Nothing else in idempotask uses a breaker unless given
one.

Counting
    A *fixed window* anchored at the first failure: the first failure starts a window of
    ``window`` seconds, each failure in it adds one, and the ``failure_threshold``-th opens
    the breaker. A failure after the window ended starts a new window at 1. Successes do
    not reset the count: five failures within a minute open the breaker even if hundreds
    of calls succeeded in between (a dependency failing 5 % of a heavy load is unhealthy
    too), and this is what lets a success in the closed state write nothing. Two bursts
    straddling a window's end may each stay under the threshold; choose ``window``
    accordingly.

What counts as a failure
    An exception whose :func:`~idempotask.taxonomy.classify` kind is in ``failure_kinds``
    (TRANSIENT and EXTERNAL by default: a ``ValueError`` is the caller's bug, not the
    dependency's), or for which a predicate given as ``failure_kinds`` returns True. Any
    other exception is a sign the dependency answered: it counts as a success for a probe.
    ``AlreadyInProgress`` (the work runs elsewhere), cancellation, ``KeyboardInterrupt`` and
    other ``BaseException`` subclasses are no verdict at all.

Round trips
    The store is asked only when something must be shared: a counted failure (one write),
    a probe (one write to take it, one to report its outcome), and an amortised read of
    the state at most once per ``check_interval`` (1 s by default) per breaker and process,
    so a process with no failures of its own still learns within a second that others
    opened the breaker. A successful call in the closed state does no store I/O at all. The
    open state is cached locally until its known end, so failing fast costs no round trip
    either. A process that missed the opening (between two checks) makes at most one more
    attempt: the write of its failure answers "open".

Store errors
    With ``on_store_error="allow"`` (the default) a failing store never blocks calls: the
    call runs as if the breaker were closed, a WARNING is logged, and the store is left
    alone for ``check_interval`` seconds. ``"raise"`` raises the
    :class:`~idempotask.errors.BackendError` before the call instead. Recording an outcome
    after the call never raises: the call's own result or exception always wins.

Stores
    ``store=None`` uses the configured backend's: its ``breaker_store(namespace=...)``
    (:class:`~idempotask.backends.base.ProvidesStores`; every built-in backend offers one:
    Redis on the same server, SQL in a table beside the records, memory in this process
    only), under the configured namespace. A backend without one is a
    :class:`~idempotask.errors.ConfigurationError` asking for ``store=``. Transitions are
    logged at WARNING on the ``idempotask.breaker`` logger by the process whose write made
    them.
"""

from __future__ import annotations

from idempotask.backends.base import BreakerState, BreakerStatus, BreakerStore
from idempotask.breaker._breaker import CircuitBreaker, check_breaker
from idempotask.breaker._support import (
    AsyncBreakerGuard,
    BreakerGuard,
    FailurePredicate,
    OnStoreError,
    store_for_backend,
)
from idempotask.errors import CircuitOpenError

__all__ = [
    "AsyncBreakerGuard",
    "BreakerGuard",
    "BreakerState",
    "BreakerStatus",
    "BreakerStore",
    "CircuitBreaker",
    "CircuitOpenError",
    "FailurePredicate",
    "OnStoreError",
    "check_breaker",
    "store_for_backend",
]

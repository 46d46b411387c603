"""Retry policies per failure kind, and short in-call retries.

Two kinds of retry:

* **Stored retries.** The dead-letter queue records a failed call with
  ``next_retry_at = now + policy.delay(attempt)`` and a processor replays it then.
  :class:`RetryPolicy` computes those delays; each :class:`FailureKind` has one.
* **In-call retries** of blips, before anything is dead-lettered: :func:`in_call_retry`
  wraps a callable with tenacity and retries only what the classifier calls TRANSIENT,
  a few times with waits of a fraction of a second.

The default policies (:data:`DEFAULT_POLICIES`, overridable with :func:`policies`):

=============  =======  =====================================================
kind           retries  delay before each retry
=============  =======  =====================================================
TRANSIENT      5        5, 10, 20, 40, 80 min, each up to 50 % later (jitter
                        bounded so every delay exceeds the one before); 6 h cap
EXTERNAL       3        1 h, 3 h, 9 h, each up to 10 % later, so calls
                        throttled together do not come back together; 24 h cap
CONFIGURATION  1        2 h
PERMANENT      0        never retried
=============  =======  =====================================================

>>> DEFAULT_POLICIES[FailureKind.CONFIGURATION].delay(1)
7200.0
>>> DEFAULT_POLICIES[FailureKind.CONFIGURATION].delay(2) is None
True

Delays come from tenacity wait objects: anything called as ``wait(retry_state)`` that
returns seconds, where ``retry_state.attempt_number`` is the retry's number (1 for the
first retry). :class:`ExponentialBackoff` and :class:`FixedDelay` are such waits written
with the standard library, so the defaults work without tenacity, and they work as
``tenacity.Retrying(wait=...)`` too. Any other wait (``tenacity.wait_exponential``,
``wait_chain``, tenacity 9's ``wait_exception``...) is called with a real
``tenacity.RetryCallState``, and tenacity is imported only then.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeGuard, TypeVar, cast, overload

from idempotask.config import check_seconds
from idempotask.errors import ConfigurationError, MissingDependencyError
from idempotask.taxonomy import Classifier, FailureKind, check_kind, default_classifier

if TYPE_CHECKING:
    from tenacity import AsyncRetrying, RetryCallState, Retrying

__all__ = [
    "DEFAULT_IN_CALL_WAIT",
    "DEFAULT_POLICIES",
    "RETRY_AFTER_LIMIT",
    "AttemptState",
    "ExponentialBackoff",
    "FixedDelay",
    "InCallRetry",
    "RetryPolicy",
    "Wait",
    "in_call_retry",
    "policies",
]

P = ParamSpec("P")
R = TypeVar("R")

_TENACITY_HINT = "pip install tenacity"
"""What to install for tenacity waits and in-call retries; named in the error."""

RETRY_AFTER_LIMIT = 30 * 24 * 3600.0
"""The longest ``retry_after`` hint honoured, in seconds; a longer one counts as this.

A hint beats a policy's cap, but a broken or hostile ``Retry-After`` must not push a
retry past what a timestamp can hold."""

# What tenacity returns once an exponential overflows; far beyond any real schedule.
_MAX_WAIT = sys.maxsize / 2

Wait = Callable[["RetryCallState"], "float | int"]
"""A tenacity wait: ``wait(retry_state)`` returns the seconds to wait."""


class AttemptState(Protocol):
    """The part of ``tenacity.RetryCallState`` the built-in waits read."""

    @property
    def attempt_number(self) -> int:
        """The retry's number: 1 before the first retry."""
        ...


@contextlib.contextmanager
def _needs_tenacity(what: str) -> Iterator[None]:
    """Turn a missing tenacity into a MissingDependencyError saying what to install."""
    try:
        yield
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "tenacity":
            raise
        raise MissingDependencyError(f"{what} needs tenacity: {_TENACITY_HINT}") from None


def _is_number(value: object, minimum: float) -> TypeGuard[float]:
    """Whether ``value`` is a finite int or float (not a bool) of at least ``minimum``."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value >= minimum
    )


def _check_number(option: str, value: object, *, minimum: float) -> float:
    if not _is_number(value, minimum):
        raise ConfigurationError(
            f"{option}: expected a finite number >= {minimum:g}, got {value!r}"
        )
    return float(value)


def _check_int(option: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{option}: expected an int >= {minimum}, got {value!r}")


def _check_wait(option: str, value: object, *, required: bool) -> None:
    if value is None:
        if required:
            raise ConfigurationError(f"{option}: a wait is needed when there are retries")
        return
    if isinstance(value, type):
        # wait=tenacity.wait_fixed is callable too, but returns a wait, not seconds.
        raise ConfigurationError(
            f"{option}: got the class {value.__name__}; pass an instance, "
            f"e.g. {value.__name__}(...)"
        )
    if not callable(value):
        raise ConfigurationError(
            f"{option}: expected a tenacity wait (called with a retry state, returning "
            f"seconds), got {value!r}"
        )


# --- standard-library waits ------------------------------------------------------------


@dataclass(frozen=True)
class ExponentialBackoff:
    """``initial * factor ** (n - 1)`` seconds before retry ``n``, plus bounded jitter.

    The jitter adds up to ``jitter`` times the nominal delay (0.5: up to 50 % more),
    drawn uniformly. It must stay below ``factor - 1`` so that the longest delay for
    retry ``n`` is still shorter than the shortest for retry ``n + 1``: the schedule
    grows strictly, for any random draw, until ``cap`` is reached. ``rng`` (a
    :class:`random.Random`) makes the draws reproducible; the default is the
    :mod:`random` module.

    A tenacity wait: ``tenacity.Retrying(wait=ExponentialBackoff(0.1, cap=2))`` works.

    >>> wait = ExponentialBackoff(300, factor=2, jitter=0.5)
    >>> class State: attempt_number = 3
    >>> 1200 <= wait(State()) < 1800
    True
    """

    initial: float
    factor: float = 2.0
    jitter: float = 0.0
    cap: float | None = None
    rng: random.Random | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", check_seconds("initial", self.initial))
        factor = _check_number("factor", self.factor, minimum=1)
        jitter = _check_number("jitter", self.jitter, minimum=0)
        if jitter and jitter >= factor - 1:
            raise ConfigurationError(
                f"jitter: must be below factor - 1 ({factor - 1:g}) so each delay exceeds "
                f"the one before, got {self.jitter!r}"
            )
        object.__setattr__(self, "factor", factor)
        object.__setattr__(self, "jitter", jitter)
        if self.cap is not None:
            object.__setattr__(self, "cap", check_seconds("cap", self.cap))
        if self.rng is not None and not isinstance(self.rng, random.Random):
            raise ConfigurationError(f"rng: expected a random.Random, got {self.rng!r}")

    def _nominal(self, exponent: int) -> float:
        try:
            return self.initial * self.factor**exponent
        except OverflowError:
            return math.inf

    def __call__(self, retry_state: AttemptState) -> float:
        """Seconds before retry ``retry_state.attempt_number``."""
        exponent = max(1, retry_state.attempt_number) - 1
        nominal = self._nominal(exponent)
        delay = nominal
        if self.jitter:
            draw = self.rng.random() if self.rng is not None else random.random()
            delay *= 1.0 + draw * self.jitter
            # jitter < factor - 1 keeps this below the next nominal delay in exact
            # arithmetic; clamp so float rounding cannot reach it either.
            delay = min(delay, max(nominal, math.nextafter(self._nominal(exponent + 1), 0)))
        if self.cap is not None:
            delay = min(delay, self.cap)
        return min(delay, _MAX_WAIT)


@dataclass(frozen=True)
class FixedDelay:
    """The same ``seconds`` before every retry; a tenacity wait like ``wait_fixed``.

    >>> class State: attempt_number = 1
    >>> FixedDelay(7200)(State())
    7200.0
    """

    seconds: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "seconds", check_seconds("seconds", self.seconds, allow_zero=True))

    def __call__(self, retry_state: AttemptState) -> float:
        """``seconds``, whatever the attempt."""
        return self.seconds


_STDLIB_WAITS = (ExponentialBackoff, FixedDelay)


class _Attempt:
    """A retry state for the standard-library waits, which read only the number."""

    __slots__ = ("attempt_number",)

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number


@functools.cache
def _retrying_stub() -> Retrying:
    # RetryCallState wants the Retrying it belongs to; waits never use it.
    from tenacity import Retrying

    return Retrying()


def _retry_call_state(
    attempt: int, exception: BaseException | None, elapsed: float | None
) -> RetryCallState:
    with _needs_tenacity("a tenacity wait"):
        from tenacity import RetryCallState
    state = RetryCallState(_retrying_stub(), None, (), {})
    state.attempt_number = attempt
    if exception is not None:
        # For waits that read the outcome, such as wait_exception.
        state.set_exception((type(exception), exception, exception.__traceback__))
    if elapsed is not None:
        # seconds_since_start = outcome_timestamp - start_time
        now = state.outcome_timestamp if state.outcome_timestamp is not None else time.monotonic()
        state.outcome_timestamp = now
        state.start_time = now - elapsed
    return state


def _check_delay(option: str, wait: Wait, value: object, attempt: int) -> float:
    if not _is_number(value, 0):
        raise ConfigurationError(
            f"{option}: {wait!r} returned {value!r} for attempt {attempt}; expected seconds >= 0"
        )
    return float(value)


# --- policies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and after how long, a failure of one kind is retried from the store.

    ``max_retries`` retries (0: never); ``wait`` a tenacity wait giving the delay before
    each (needed when there are retries); ``cap`` the longest delay, in seconds.

    >>> import tenacity  # doctest: +SKIP
    >>> policy = RetryPolicy(4, tenacity.wait_exponential(multiplier=60), cap=600)  # doctest: +SKIP
    >>> [policy.delay(n) for n in range(1, 6)]  # doctest: +SKIP
    [60.0, 120.0, 240.0, 480.0, None]
    """

    max_retries: int
    wait: Wait | None = None
    cap: float | None = None

    def __post_init__(self) -> None:
        _check_int("max_retries", self.max_retries, 0)
        _check_wait("wait", self.wait, required=self.max_retries > 0)
        if self.cap is not None:
            object.__setattr__(self, "cap", check_seconds("cap", self.cap))

    def delay(
        self,
        attempt: int,
        *,
        retry_after: float | None = None,
        exception: BaseException | None = None,
        elapsed: float | None = None,
    ) -> float | None:
        """Seconds before retry number ``attempt`` (1-based), or None once exhausted.

        The wait's delay is capped by ``cap``. A ``retry_after`` hint (a server's
        ``Retry-After``, from :class:`~idempotask.taxonomy.Classification`) raises the
        delay to at least the hint and beats the cap: a server that says "come back in
        two hours" is believed (up to :data:`RETRY_AFTER_LIMIT`). It never turns an
        exhausted policy into a retry.

        ``exception`` and ``elapsed`` (seconds since the first failure) fill in the
        ``outcome`` and ``seconds_since_start`` of the retry state for tenacity waits
        that read them.

        >>> policy = RetryPolicy(2, FixedDelay(60), cap=3600)
        >>> policy.delay(1), policy.delay(1, retry_after=7200), policy.delay(3)
        (60.0, 7200.0, None)
        """
        _check_int("attempt", attempt, 1)
        if elapsed is not None:
            elapsed = check_seconds("elapsed", elapsed, allow_zero=True)
        hint = None
        if retry_after is not None:
            hint = min(
                check_seconds("retry_after", retry_after, allow_zero=True), RETRY_AFTER_LIMIT
            )
        if attempt > self.max_retries or self.wait is None:
            return None
        state: Any = (
            _Attempt(attempt)
            if isinstance(self.wait, _STDLIB_WAITS)
            else _retry_call_state(attempt, exception, elapsed)
        )
        seconds = _check_delay("wait", self.wait, self.wait(state), attempt)
        if self.cap is not None:
            seconds = min(seconds, self.cap)
        if hint is not None:
            seconds = max(seconds, hint)
        return seconds


DEFAULT_POLICIES: Mapping[FailureKind, RetryPolicy] = MappingProxyType(
    {
        FailureKind.TRANSIENT: RetryPolicy(
            5, ExponentialBackoff(300, factor=2, jitter=0.5), cap=6 * 3600
        ),
        FailureKind.EXTERNAL: RetryPolicy(
            3, ExponentialBackoff(3600, factor=3, jitter=0.1), cap=24 * 3600
        ),
        FailureKind.CONFIGURATION: RetryPolicy(1, FixedDelay(2 * 3600)),
        FailureKind.PERMANENT: RetryPolicy(0),
    }
)
"""The policy of each kind unless overridden (read-only; see :func:`policies`)."""


def policies(
    overrides: Mapping[FailureKind, RetryPolicy] | Mapping[str, RetryPolicy] | None = None,
) -> dict[FailureKind, RetryPolicy]:
    """The default policies with ``overrides`` (keyed by kind or its value) replacing some.

    >>> table = policies({"permanent": RetryPolicy(1, FixedDelay(86400))})
    >>> table[FailureKind.PERMANENT].delay(1)
    86400.0
    """
    table = dict(DEFAULT_POLICIES)
    if overrides is None:
        return table
    if not isinstance(overrides, Mapping):
        raise ConfigurationError(
            f"policies: expected a mapping of FailureKind to RetryPolicy, got {overrides!r}"
        )
    for key, policy in overrides.items():
        kind = check_kind(f"policies[{key!r}]", key)
        if not isinstance(policy, RetryPolicy):
            raise ConfigurationError(f"policies[{key!r}]: expected a RetryPolicy, got {policy!r}")
        table[kind] = policy
    return table


# --- in-call retries ---------------------------------------------------------------------

DEFAULT_IN_CALL_WAIT = ExponentialBackoff(0.1, factor=2, jitter=0.5, cap=2.0)
"""The in-call wait unless given: 0.1 s, 0.2 s, 0.4 s... up to 50 % more, at most 2 s."""


class InCallRetry:
    """Short retries inside one call, for blips, built on tenacity.

    ``attempts`` calls at most (3: two retries), ``wait`` between them (default
    :data:`DEFAULT_IN_CALL_WAIT`: 0.1 s doubling to 2 s at most, with jitter). Only
    exceptions whose kind is in ``retry_on`` are retried, and the last one is re-raised
    as itself (not wrapped in ``tenacity.RetryError``) so the dead-letter queue
    classifies what really happened. A ``retry_after`` hint is slept when it is at most
    ``max_hint`` seconds; a longer one ends the in-call retries at once, leaving the
    wait to the stored retries.

    Made by :func:`in_call_retry`; it decorates sync and async functions:

    >>> @in_call_retry(attempts=3)  # doctest: +SKIP
    ... def fetch(url: str) -> bytes: ...
    """

    __slots__ = ("attempts", "classifier", "max_hint", "retry_on", "wait")

    def __init__(
        self,
        *,
        attempts: int = 3,
        wait: Wait | None = None,
        retry_on: Iterable[FailureKind | str] | FailureKind | str = (FailureKind.TRANSIENT,),
        classifier: Classifier | None = None,
        max_hint: float = 5.0,
    ) -> None:
        _check_int("attempts", attempts, 1)
        _check_wait("wait", wait, required=False)
        if isinstance(retry_on, str):  # one kind; iterating it would give letters
            retry_on = (retry_on,)
        try:
            kinds = frozenset(check_kind("retry_on", kind) for kind in retry_on)
        except TypeError:
            raise ConfigurationError(
                f"retry_on: expected failure kinds, got {retry_on!r}"
            ) from None
        if classifier is not None and not isinstance(classifier, Classifier):
            raise ConfigurationError(f"classifier: expected a Classifier, got {classifier!r}")
        self.attempts: int = attempts
        self.wait: Wait = wait if wait is not None else DEFAULT_IN_CALL_WAIT
        self.retry_on: frozenset[FailureKind] = kinds
        self.classifier: Classifier | None = classifier
        self.max_hint: float = check_seconds("max_hint", max_hint, allow_zero=True)

    def __repr__(self) -> str:
        kinds = ", ".join(sorted(kind.value for kind in self.retry_on))
        return (
            f"InCallRetry(attempts={self.attempts}, wait={self.wait!r}, "
            f"retry_on={{{kinds}}}, max_hint={self.max_hint:g})"
        )

    def _classifier(self) -> Classifier:
        return self.classifier if self.classifier is not None else default_classifier

    def should_retry(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth retrying within the call."""
        found = self._classifier().classify(exc)
        if found.kind not in self.retry_on:
            return False
        return found.retry_after is None or found.retry_after <= self.max_hint

    def _wait(self, retry_state: RetryCallState) -> float:
        attempt = retry_state.attempt_number
        seconds = _check_delay("wait", self.wait, self.wait(retry_state), attempt)
        outcome = retry_state.outcome
        if outcome is not None and outcome.failed:
            error = outcome.exception()
            if error is not None:
                hint = self._classifier().classify(error).retry_after
                if hint is not None:
                    seconds = max(seconds, hint)
        return seconds

    def _tenacity(self, kind: str, options: dict[str, Any]) -> Any:
        """A tenacity ``kind`` (``Retrying`` or ``AsyncRetrying``) with these settings."""
        with _needs_tenacity("in-call retries"):
            import tenacity
        merged: dict[str, Any] = {
            "stop": tenacity.stop_after_attempt(self.attempts),
            "wait": self._wait,
            "retry": tenacity.retry_if_exception(self.should_retry),
            "reraise": True,
        }
        merged.update(options)
        return getattr(tenacity, kind)(**merged)

    def retrying(self, **options: Any) -> Retrying:
        """A ``tenacity.Retrying`` with these settings; ``options`` override any of its
        arguments (``sleep=``, ``before_sleep=``...).

        >>> for attempt in in_call_retry().retrying():  # doctest: +SKIP
        ...     with attempt:
        ...         send()
        """
        return cast("Retrying", self._tenacity("Retrying", options))

    def async_retrying(self, **options: Any) -> AsyncRetrying:
        """A ``tenacity.AsyncRetrying`` with these settings (see :meth:`retrying`)."""
        return cast("AsyncRetrying", self._tenacity("AsyncRetrying", options))

    def wrap(self, fn: Callable[P, R]) -> Callable[P, R]:
        """``fn`` retried as configured; coroutine functions get an async wrapper.

        A missing tenacity is reported here, when decorating, not at the first call.
        """
        if not callable(fn):
            raise ConfigurationError(f"fn: expected a callable, got {fn!r}")
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
        ):
            async_template = self.async_retrying()
            coroutine_fn = cast("Callable[..., Any]", fn)

            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                # A copy per call: a Retrying keeps per-call statistics.
                return await async_template.copy()(coroutine_fn, *args, **kwargs)

            return cast("Callable[P, R]", functools.wraps(fn)(async_wrapper))
        template = self.retrying()

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return template.copy()(fn, *args, **kwargs)

        return wrapper

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn``: the same as :meth:`wrap`."""
        return self.wrap(fn)


@overload
def in_call_retry(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def in_call_retry(
    fn: None = None,
    /,
    *,
    attempts: int = 3,
    wait: Wait | None = None,
    retry_on: Iterable[FailureKind | str] | FailureKind | str = (FailureKind.TRANSIENT,),
    classifier: Classifier | None = None,
    max_hint: float = 5.0,
) -> InCallRetry: ...


def in_call_retry(
    fn: Callable[P, R] | None = None,
    /,
    *,
    attempts: int = 3,
    wait: Wait | None = None,
    retry_on: Iterable[FailureKind | str] | FailureKind | str = (FailureKind.TRANSIENT,),
    classifier: Classifier | None = None,
    max_hint: float = 5.0,
) -> Callable[P, R] | InCallRetry:
    """Retry blips within the call, before anything is dead-lettered.

    As a bare decorator it uses the defaults; with arguments it returns an
    :class:`InCallRetry`, which decorates and builds tenacity ``Retrying`` objects:

    >>> import tenacity  # doctest: +SKIP
    >>> @in_call_retry(attempts=4, wait=tenacity.wait_exponential(0.1, max=2))  # doctest: +SKIP
    ... async def charge(order_id: int) -> str: ...

    See :class:`InCallRetry` for the options.
    """
    retry = InCallRetry(
        attempts=attempts,
        wait=wait,
        retry_on=retry_on,
        classifier=classifier,
        max_hint=max_hint,
    )
    return retry if fn is None else retry.wrap(fn)

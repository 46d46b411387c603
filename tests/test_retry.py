"""Retry policies (DESIGN §5): the default schedules, tenacity waits, in-call retries."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import sys
from typing import Any

import pytest
import tenacity
from hypothesis import given
from hypothesis import strategies as st

from idempotask.errors import ConfigurationError, MissingDependencyError
from idempotask.retry import (
    _MAX_WAIT,
    _TENACITY_HINT,
    DEFAULT_IN_CALL_WAIT,
    DEFAULT_POLICIES,
    RETRY_AFTER_LIMIT,
    ExponentialBackoff,
    FixedDelay,
    InCallRetry,
    RetryPolicy,
    in_call_retry,
    policies,
)
from idempotask.taxonomy import Classifier, ExternalError, FailureKind, TransientError

T = FailureKind.TRANSIENT
E = FailureKind.EXTERNAL
C = FailureKind.CONFIGURATION
P = FailureKind.PERMANENT

HOUR = 3600.0


class FixedRandom(random.Random):
    """A Random whose every draw is ``value``: the jitter's extremes, on demand."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def with_rng(policy: RetryPolicy, rng: random.Random) -> RetryPolicy:
    """``policy`` with its ExponentialBackoff drawing from ``rng``."""
    assert isinstance(policy.wait, ExponentialBackoff)
    return dataclasses.replace(policy, wait=dataclasses.replace(policy.wait, rng=rng))


def schedule(policy: RetryPolicy) -> list[float]:
    """Every delay of ``policy``, checking that the next one is None."""
    delays = []
    for attempt in range(1, policy.max_retries + 1):
        delay = policy.delay(attempt)
        assert delay is not None
        delays.append(delay)
    assert policy.delay(policy.max_retries + 1) is None
    return delays


# --- the documented defaults -----------------------------------------------------------------

EDGE_DRAWS = st.sampled_from([0.0, 1 - 2**-53]).map(FixedRandom)


@given(st.one_of(st.randoms(use_true_random=False), EDGE_DRAWS))
def test_transient_retries_5_times_from_5_minutes_doubling_with_bounded_jitter(
    rng: random.Random,
) -> None:
    """TRANSIENT: 5 retries, delay n in [300, 450] * 2^(n-1) s, strictly growing, capped."""
    policy = with_rng(DEFAULT_POLICIES[T], rng)
    delays = schedule(policy)
    assert len(delays) == 5
    for n, delay in enumerate(delays, start=1):
        nominal = 300 * 2 ** (n - 1)
        assert nominal <= delay <= 1.5 * nominal
    assert all(a < b for a, b in itertools.pairwise(delays))
    assert max(delays) <= 6 * HOUR


@given(st.random_module())
def test_the_default_objects_themselves_grow_for_every_global_seed(seeded: Any) -> None:
    """The shipped DEFAULT_POLICIES (drawing from the random module) grow strictly."""
    for kind in (T, E):
        delays = schedule(DEFAULT_POLICIES[kind])
        assert all(a < b for a, b in itertools.pairwise(delays))
        assert DEFAULT_POLICIES[kind].cap is not None
        assert max(delays) <= DEFAULT_POLICIES[kind].cap


@given(st.one_of(st.randoms(use_true_random=False), EDGE_DRAWS))
def test_external_retries_3_times_after_1_3_and_9_hours(rng: random.Random) -> None:
    """EXTERNAL: 1 h, 3 h, 9 h, each at most 10 % later; then exhausted."""
    delays = schedule(with_rng(DEFAULT_POLICIES[E], rng))
    assert len(delays) == 3
    for delay, nominal in zip(delays, [1 * HOUR, 3 * HOUR, 9 * HOUR], strict=True):
        assert nominal <= delay <= 1.1 * nominal
    assert delays[0] < delays[1] < delays[2] <= 24 * HOUR


def test_configuration_retries_once_after_2_hours() -> None:
    """CONFIGURATION: one retry, two hours later."""
    assert schedule(DEFAULT_POLICIES[C]) == [2 * HOUR]


def test_permanent_is_never_retried() -> None:
    """PERMANENT: no retry at all."""
    assert DEFAULT_POLICIES[P].delay(1) is None
    assert schedule(DEFAULT_POLICIES[P]) == []


def test_every_kind_has_a_default_policy_and_the_table_is_read_only() -> None:
    """DEFAULT_POLICIES covers the four kinds and cannot be edited by accident."""
    assert set(DEFAULT_POLICIES) == set(FailureKind)
    with pytest.raises(TypeError):
        DEFAULT_POLICIES[T] = RetryPolicy(0)  # type: ignore[index]


@given(st.integers(min_value=6, max_value=10_000))
def test_delays_past_max_retries_are_none(attempt: int) -> None:
    """Any attempt beyond the policy's retries is exhausted."""
    assert DEFAULT_POLICIES[T].delay(attempt) is None


# --- ExponentialBackoff -----------------------------------------------------------------------


@st.composite
def backoffs(draw: st.DrawFn) -> ExponentialBackoff:
    factor = draw(st.floats(min_value=1.05, max_value=10))
    jitter = draw(st.floats(min_value=0, max_value=factor - 1, exclude_max=True))
    return ExponentialBackoff(
        draw(st.floats(min_value=0.001, max_value=10_000)),
        factor=factor,
        jitter=jitter,
        cap=draw(st.none() | st.floats(min_value=0.001, max_value=1e7)),
        rng=draw(st.one_of(st.randoms(use_true_random=False), EDGE_DRAWS)),
    )


@given(backoffs(), st.integers(min_value=2, max_value=40))
def test_bounded_jitter_grows_strictly_until_the_cap(wait: ExponentialBackoff, n: int) -> None:
    """For any draw, delay n+1 exceeds delay n until the cap, and never passes the cap."""
    policy = RetryPolicy(n, wait)
    delays = schedule(policy)
    cap = wait.cap if wait.cap is not None else _MAX_WAIT  # the ceiling of any wait
    assert all(0 < d <= cap for d in delays)
    for a, b in itertools.pairwise(delays):
        assert a < b or a == b == cap
    if wait.cap is not None:
        assert all(d <= wait.cap for d in delays)


def test_exponential_backoff_is_a_tenacity_wait() -> None:
    """In tenacity.Retrying the built-in wait gives growing sleeps."""
    sleeps: list[float] = []
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 5:
            raise ConnectionError
        return "ok"

    retrying = tenacity.Retrying(
        wait=ExponentialBackoff(1, factor=2, jitter=0.5),
        stop=tenacity.stop_after_attempt(5),
        sleep=sleeps.append,
    )
    assert retrying(flaky) == "ok"
    assert len(sleeps) == 4
    assert all(a < b for a, b in itertools.pairwise(sleeps))
    assert 1 <= sleeps[0] <= 1.5


def test_built_in_waits_compose_with_tenacity_waits() -> None:
    """ExponentialBackoff + tenacity.wait_fixed is a tenacity wait_combine."""
    policy = RetryPolicy(2, ExponentialBackoff(10) + tenacity.wait_fixed(5))
    assert schedule(policy) == [15.0, 25.0]
    policy = RetryPolicy(2, tenacity.wait_fixed(1) + FixedDelay(2))
    assert schedule(policy) == [3.0, 3.0]


def test_an_overflowing_exponential_stays_finite() -> None:
    """A huge attempt number gives the cap, or a huge finite number without one."""
    assert RetryPolicy(5000, ExponentialBackoff(1), cap=60).delay(5000) == 60.0
    delay = RetryPolicy(5000, ExponentialBackoff(1)).delay(5000)
    assert delay is not None
    assert math.isfinite(delay)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"initial": 0}, "initial"),
        ({"initial": -1}, "initial"),
        ({"initial": "5"}, "initial"),
        ({"initial": 1, "factor": 0.5}, "factor"),
        ({"initial": 1, "factor": math.inf}, "factor"),
        ({"initial": 1, "jitter": -0.1}, "jitter"),
        ({"initial": 1, "factor": 2, "jitter": 1.0}, "jitter"),  # 2x could equal the next
        ({"initial": 1, "factor": 1, "jitter": 0.1}, "jitter"),
        ({"initial": 1, "cap": 0}, "cap"),
        ({"initial": 1, "rng": 42}, "rng"),
    ],
)
def test_exponential_backoff_validates_its_options(kwargs: dict[str, Any], option: str) -> None:
    """Bad options, and jitter that could break the growth, name the option."""
    with pytest.raises(ConfigurationError, match=f"^{option}:"):
        ExponentialBackoff(**kwargs)


# --- RetryPolicy with user waits and hints ------------------------------------------------------


def test_tenacity_waits_are_honoured() -> None:
    """User-supplied tenacity waits decide the delays."""
    assert schedule(RetryPolicy(3, tenacity.wait_fixed(10))) == [10.0, 10.0, 10.0]
    assert schedule(RetryPolicy(4, tenacity.wait_exponential(multiplier=2))) == [2, 4, 8, 16]
    assert schedule(RetryPolicy(3, tenacity.wait_incrementing(start=60, increment=30))) == [
        60.0,
        90.0,
        120.0,
    ]
    chain = tenacity.wait_chain(tenacity.wait_fixed(1), tenacity.wait_fixed(100))
    assert schedule(RetryPolicy(3, chain)) == [1.0, 100.0, 100.0]
    for delay in schedule(RetryPolicy(20, tenacity.wait_random(5, 10))):
        assert 5 <= delay <= 10


def test_the_cap_limits_a_user_wait() -> None:
    """cap clips whatever the wait returns."""
    policy = RetryPolicy(4, tenacity.wait_exponential(multiplier=100), cap=350)
    assert schedule(policy) == [100.0, 200.0, 350.0, 350.0]


def test_a_wait_can_read_the_exception_and_the_elapsed_time() -> None:
    """exception= and elapsed= reach tenacity waits through a real RetryCallState."""

    def by_exception(state: tenacity.RetryCallState) -> float:
        # What tenacity 9's wait_exception does; our floor, tenacity 8.2, lacks it.
        assert state.outcome is not None
        return 77.0 if isinstance(state.outcome.exception(), OSError) else 1.0

    policy = RetryPolicy(1, by_exception)
    assert policy.delay(1, exception=OSError()) == 77.0

    def half_the_elapsed_time(state: tenacity.RetryCallState) -> float:
        assert state.seconds_since_start is not None
        return state.seconds_since_start / 2

    assert RetryPolicy(1, half_the_elapsed_time).delay(1, elapsed=600) == pytest.approx(300)


def test_a_plain_callable_is_a_wait() -> None:
    """Any callable taking the retry state is accepted, like in tenacity."""
    policy = RetryPolicy(3, lambda state: 10.0 * state.attempt_number)
    assert schedule(policy) == [10.0, 20.0, 30.0]


@given(
    attempt=st.integers(min_value=1, max_value=5),
    hint=st.floats(min_value=0, max_value=1e9, allow_nan=False),
)
def test_retry_after_raises_the_delay_beats_the_cap_and_is_bounded(
    attempt: int, hint: float
) -> None:
    """delay = max(min(wait, cap), min(hint, RETRY_AFTER_LIMIT)): the server is believed."""
    policy = RetryPolicy(5, tenacity.wait_exponential(multiplier=60), cap=600)
    plain = policy.delay(attempt)
    assert plain is not None
    assert policy.delay(attempt, retry_after=hint) == max(plain, min(hint, RETRY_AFTER_LIMIT))


def test_a_retry_after_hint_never_revives_an_exhausted_policy() -> None:
    """Past max_retries the answer is None whatever the hint."""
    assert DEFAULT_POLICIES[E].delay(4, retry_after=60) is None
    assert DEFAULT_POLICIES[P].delay(1, retry_after=60) is None


def test_a_two_hour_retry_after_beats_the_transient_cap_on_the_default_policy() -> None:
    """A server saying 'come back in 7 h' is honoured above TRANSIENT's 6 h cap."""
    assert DEFAULT_POLICIES[T].delay(1, retry_after=7 * HOUR) == 7 * HOUR


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (lambda: RetryPolicy(-1, FixedDelay(1)), "max_retries"),
        (lambda: RetryPolicy(True, FixedDelay(1)), "max_retries"),
        (lambda: RetryPolicy(2.0, FixedDelay(1)), "max_retries"),  # type: ignore[arg-type]
        (lambda: RetryPolicy(1), "wait"),
        (lambda: RetryPolicy(1, 30), "wait"),  # type: ignore[arg-type]
        (lambda: RetryPolicy(1, tenacity.wait_fixed), "wait"),  # type: ignore[arg-type]
        (lambda: RetryPolicy(1, FixedDelay(1), cap=0), "cap"),
        (lambda: RetryPolicy(1, FixedDelay(1), cap=-5), "cap"),
        (lambda: FixedDelay(-1), "seconds"),
        (lambda: RetryPolicy(1, FixedDelay(1)).delay(0), "attempt"),
        (lambda: RetryPolicy(1, FixedDelay(1)).delay(1, retry_after=-1), "retry_after"),
        (lambda: RetryPolicy(1, FixedDelay(1)).delay(1, elapsed=-1), "elapsed"),
        (lambda: RetryPolicy(1, lambda s: -1.0).delay(1), "wait"),
        (lambda: RetryPolicy(1, lambda s: math.nan).delay(1), "wait"),
        (lambda: RetryPolicy(1, lambda s: "soon").delay(1), "wait"),  # type: ignore[arg-type,return-value]
    ],
)
def test_bad_values_raise_configuration_errors_naming_the_option(make: Any, option: str) -> None:
    """Each bad value is refused with the option's name first."""
    with pytest.raises(ConfigurationError, match=f"^{option}:"):
        make()


def test_the_class_instead_of_an_instance_gets_a_hint() -> None:
    """wait=tenacity.wait_fixed (not wait_fixed(...)) says how to fix it."""
    with pytest.raises(ConfigurationError, match=r"wait_fixed\(\.\.\.\)"):
        RetryPolicy(1, tenacity.wait_fixed)  # type: ignore[arg-type]


def test_policies_applies_overrides_by_kind_or_value() -> None:
    """policies() is the defaults with some replaced; DEFAULT_POLICIES is untouched."""
    daily = RetryPolicy(3, FixedDelay(24 * HOUR))
    table = policies({"permanent": daily, FailureKind.CONFIGURATION: RetryPolicy(0)})
    assert table[P] is daily
    assert table[C].delay(1) is None
    assert table[T] is DEFAULT_POLICIES[T]
    assert DEFAULT_POLICIES[P].delay(1) is None
    assert policies() == dict(DEFAULT_POLICIES)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"sometimes": RetryPolicy(0)}, r"policies\['sometimes'\]"),
        ({"transient": 5}, r"policies\['transient'\]: expected a RetryPolicy"),
        ([("transient", RetryPolicy(0))], "policies: expected a mapping"),
    ],
)
def test_policies_validates_overrides(overrides: Any, match: str) -> None:
    """Unknown kinds, non-policies and non-mappings are refused by name."""
    with pytest.raises(ConfigurationError, match=match):
        policies(overrides)


def test_without_tenacity_the_defaults_work_and_tenacity_waits_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The built-in waits need no tenacity; anything else raises MissingDependencyError."""
    monkeypatch.setitem(sys.modules, "tenacity", None)
    assert DEFAULT_POLICIES[C].delay(1) == 2 * HOUR
    assert len(schedule(DEFAULT_POLICIES[T])) == 5
    custom = RetryPolicy(1, lambda state: 5.0)
    with pytest.raises(MissingDependencyError, match=_TENACITY_HINT):
        custom.delay(1)
    with pytest.raises(MissingDependencyError, match=_TENACITY_HINT):
        in_call_retry(lambda: None)
    retry = in_call_retry(attempts=2)  # configuring is fine; building needs tenacity
    with pytest.raises(MissingDependencyError, match="in-call retries"):
        retry.retrying()


# --- in-call retries ----------------------------------------------------------------------------

NO_WAIT = FixedDelay(0)


def flaky(failures: list[BaseException], result: str = "done") -> Any:
    """A function that raises each of ``failures`` in turn, then returns ``result``."""
    calls: list[int] = []

    def fn(x: int = 0) -> str:
        calls.append(x)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def test_two_connection_errors_then_success_returns_after_three_calls() -> None:
    """TRANSIENT blips are retried within the call."""
    fn = flaky([ConnectionResetError(), ConnectionRefusedError()])
    wrapped = in_call_retry(attempts=3, wait=NO_WAIT)(fn)
    assert wrapped(7) == "done"
    assert fn.calls == [7, 7, 7]


def test_a_value_error_is_not_retried() -> None:
    """PERMANENT failures go straight out, after one call."""
    fn = flaky([ValueError("bad amount")])
    wrapped = in_call_retry(attempts=3, wait=NO_WAIT)(fn)
    with pytest.raises(ValueError, match="bad amount"):
        wrapped()
    assert len(fn.calls) == 1


def test_when_attempts_run_out_the_last_exception_itself_is_raised() -> None:
    """reraise: the caller (and the dead-letter queue) sees the real error, no RetryError."""
    errors = [TimeoutError("1"), TimeoutError("2"), TimeoutError("3"), TimeoutError("4")]
    fn = flaky(errors)
    wrapped = in_call_retry(attempts=3, wait=NO_WAIT)(fn)
    with pytest.raises(TimeoutError) as info:
        wrapped()
    assert info.value is errors[2]
    assert len(fn.calls) == 3


async def test_async_functions_get_an_async_wrapper() -> None:
    """A coroutine function is retried with tenacity.AsyncRetrying."""
    calls = 0

    async def fetch(url: str) -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionResetError
        return f"body of {url}"

    wrapped = in_call_retry(attempts=3, wait=NO_WAIT)(fetch)
    assert await wrapped("/x") == "body of /x"
    assert calls == 3


async def test_async_permanent_failures_are_not_retried() -> None:
    """The async wrapper applies the same classification."""
    calls = 0

    async def fetch() -> None:
        nonlocal calls
        calls += 1
        raise KeyError("missing")

    with pytest.raises(KeyError):
        await in_call_retry(wait=NO_WAIT)(fetch)()
    assert calls == 1


def test_the_bare_decorator_keeps_the_name_and_uses_the_defaults() -> None:
    """@in_call_retry without arguments works and preserves metadata."""

    @in_call_retry
    def charge(order_id: int) -> str:
        """Charge an order."""
        return f"charged {order_id}"

    assert charge(3) == "charged 3"
    assert charge.__name__ == "charge"
    assert charge.__doc__ == "Charge an order."
    assert in_call_retry().wait is DEFAULT_IN_CALL_WAIT


def test_retry_on_chooses_the_kinds_and_a_classifier_can_be_given() -> None:
    """retry_on names the kinds retried; classifier= replaces the default one."""
    fn = flaky([ExternalError("quota"), TransientError("blip")])
    with pytest.raises(TransientError):
        in_call_retry(attempts=5, wait=NO_WAIT, retry_on=("external",))(fn)()
    assert len(fn.calls) == 2

    strict = Classifier()
    strict.register(ConnectionError, P)
    fn = flaky([ConnectionResetError()])
    with pytest.raises(ConnectionResetError):
        in_call_retry(wait=NO_WAIT, classifier=strict)(fn)()
    assert len(fn.calls) == 1

    fn = flaky([ExternalError("quota")])
    assert in_call_retry(wait=NO_WAIT, retry_on=E)(fn)() == "done"


def test_a_short_retry_after_hint_is_slept_and_a_long_one_stops_in_call_retries() -> None:
    """A hint up to max_hint raises the sleep; a longer one is left to stored retries."""
    sleeps: list[float] = []
    retry = in_call_retry(attempts=3, wait=FixedDelay(0.01), max_hint=5)
    fn = flaky([TransientError("busy", retry_after=2)])
    assert retry.retrying(sleep=sleeps.append)(fn) == "done"
    assert sleeps == [2.0]

    sleeps.clear()
    fn = flaky([TransientError("busy", retry_after=60)])
    with pytest.raises(TransientError):
        retry.retrying(sleep=sleeps.append)(fn)
    assert sleeps == []
    assert len(fn.calls) == 1


def test_retrying_objects_accept_tenacity_options_and_waits() -> None:
    """retrying(**options) overrides tenacity arguments; a tenacity wait is used as is."""
    sleeps: list[float] = []
    retry = in_call_retry(attempts=4, wait=tenacity.wait_exponential(multiplier=0.5))
    fn = flaky([ConnectionError(), ConnectionError(), ConnectionError()])
    assert retry.retrying(sleep=sleeps.append)(fn) == "done"
    assert sleeps == [0.5, 1.0, 2.0]
    for attempt in retry.retrying(sleep=sleeps.append):
        with attempt:
            pass
    assert isinstance(retry.async_retrying(), tenacity.AsyncRetrying)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"attempts": 0}, "attempts"),
        ({"attempts": True}, "attempts"),
        ({"wait": "fast"}, "wait"),
        ({"retry_on": ("transient", "sometimes")}, "retry_on"),
        ({"retry_on": 5}, "retry_on"),
        ({"classifier": object()}, "classifier"),
        ({"max_hint": -1}, "max_hint"),
    ],
)
def test_in_call_retry_validates_its_options(kwargs: dict[str, Any], option: str) -> None:
    """Each bad option is refused by name when configuring."""
    with pytest.raises(ConfigurationError, match=f"^{option}:"):
        InCallRetry(**kwargs)


def test_in_call_retry_has_a_readable_repr() -> None:
    """The repr shows the settings, for logs."""
    text = repr(in_call_retry(attempts=4, retry_on=("external", "transient")))
    assert "attempts=4" in text
    assert "retry_on={external, transient}" in text

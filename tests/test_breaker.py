"""The circuit breaker: counting, failing fast, one probe, shared state, round trips.

Memory-store tests drive time with a fake clock shared by the breaker and the store.
Redis tests use the shared server at ``IDEMPOTASK_REDIS_URL`` (skipped when it is down,
failed under ``IDEMPOTASK_REQUIRE_SERVICES=1``), real forked processes, and durations of
a fraction of a second, since the server's clock cannot be faked; every key lives under
a per-run prefix removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import pickle
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import idempotask
from idempotask.backends.memory import MemoryBackend, MemoryBreakerStore
from idempotask.breaker import (
    BreakerState,
    BreakerStatus,
    BreakerStore,
    CircuitBreaker,
    store_for_backend,
)
from idempotask.errors import (
    AlreadyInProgress,
    BackendError,
    CircuitOpenError,
    ConfigurationError,
    IdempotaskError,
)
from idempotask.taxonomy import FailureKind, classify
from tests.conftest import service_url

FORK = multiprocessing.get_context("fork")
PREFIX = f"brktest-{uuid.uuid4().hex[:12]}"


def new_name() -> str:
    """A breaker name no other test (or test run) uses."""
    return f"dep-{uuid.uuid4().hex[:12]}"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingStore:
    """A BreakerStore that counts every call (each one is a round trip on a real store)."""

    def __init__(self, inner: BreakerStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def state(self, name: str) -> BreakerState:
        self.calls["state"] += 1
        return self.inner.state(name)

    def record_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> BreakerState:
        self.calls["record_failure"] += 1
        return self.inner.record_failure(
            name, threshold=threshold, window=window, open_for=open_for
        )

    def record_success(self, name: str) -> BreakerState:
        self.calls["record_success"] += 1
        return self.inner.record_success(name)

    def try_probe(self, name: str, token: str, *, lease: float) -> BreakerState:
        self.calls["try_probe"] += 1
        return self.inner.try_probe(name, token, lease=lease)

    def reset(self, name: str) -> None:
        self.calls["reset"] += 1
        self.inner.reset(name)

    def states(self, *, limit: int = 1000) -> dict[str, BreakerState]:
        self.calls["states"] += 1
        return self.inner.states(limit=limit)

    async def astates(self, *, limit: int = 1000) -> dict[str, BreakerState]:
        self.calls["states"] += 1
        return await self.inner.astates(limit=limit)

    async def astate(self, name: str) -> BreakerState:
        self.calls["state"] += 1
        return await self.inner.astate(name)

    async def arecord_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> BreakerState:
        self.calls["record_failure"] += 1
        return await self.inner.arecord_failure(
            name, threshold=threshold, window=window, open_for=open_for
        )

    async def arecord_success(self, name: str) -> BreakerState:
        self.calls["record_success"] += 1
        return await self.inner.arecord_success(name)

    async def atry_probe(self, name: str, token: str, *, lease: float) -> BreakerState:
        self.calls["try_probe"] += 1
        return await self.inner.atry_probe(name, token, lease=lease)

    async def areset(self, name: str) -> None:
        self.calls["reset"] += 1
        await self.inner.areset(name)


class BrokenStore(CountingStore):
    """A store whose every operation fails like an unreachable server."""

    def __init__(self) -> None:
        super().__init__(MemoryBreakerStore())

    def state(self, name: str) -> BreakerState:
        self.calls["state"] += 1
        raise BackendError("store down")

    def record_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> BreakerState:
        self.calls["record_failure"] += 1
        raise BackendError("store down")

    def try_probe(self, name: str, token: str, *, lease: float) -> BreakerState:
        self.calls["try_probe"] += 1
        raise BackendError("store down")


class Dependency:
    """A protected callable that counts its calls and fails while ``down``."""

    def __init__(
        self, down: bool = True, exc: Callable[[], BaseException] = ConnectionError
    ) -> None:
        self.down = down
        self.exc = exc
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.down:
            raise self.exc()
        return "ok"


@pytest.fixture
def clock() -> FakeClock:
    """One fake clock for a breaker and its memory store."""
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> CountingStore:
    """A counted memory store on the fake clock."""
    return CountingStore(MemoryBreakerStore(clock=clock))


def make(store: BreakerStore, clock: Callable[[], float], **options: Any) -> CircuitBreaker:
    """A breaker with small numbers: 3 failures in 10 s open it for 30 s."""
    settings: dict[str, Any] = {
        "failure_threshold": 3,
        "window": 10.0,
        "recovery_timeout": 30.0,
        "store": store,
        "clock": clock,
    }
    settings.update(options)
    return CircuitBreaker(new_name(), **settings)


def status_of(breaker: CircuitBreaker) -> BreakerStatus:
    """The local status (a call, so type checkers do not carry narrowing across calls)."""
    return breaker.status


def fail_times(breaker: CircuitBreaker, dep: Dependency, n: int) -> None:
    for _ in range(n):
        with pytest.raises(ConnectionError):
            breaker.call(dep)


# -- one process, memory store ----------------------------------------------------------


def test_opens_after_threshold_failures_and_then_fails_fast_without_calling(
    store: CountingStore, clock: FakeClock
) -> None:
    """N failures within the window open it; later calls raise without running."""
    breaker = make(store, clock)
    dep = Dependency()
    fail_times(breaker, dep, 3)
    assert breaker.status is BreakerStatus.OPEN
    before = store.total
    for _ in range(5):
        with pytest.raises(CircuitOpenError) as info:
            breaker.call(dep)
    assert dep.calls == 3
    assert store.total == before  # failing fast is local: no round trip
    assert info.value.name == breaker.name
    assert info.value.retry_after == pytest.approx(30.0)


def test_failures_spread_over_more_than_the_window_do_not_open_it(
    store: CountingStore, clock: FakeClock
) -> None:
    """The window starts at its first failure; a failure after it ends starts a new one."""
    breaker = make(store, clock)
    dep = Dependency()
    fail_times(breaker, dep, 2)
    clock.advance(10.0)
    fail_times(breaker, dep, 2)
    assert status_of(breaker) is BreakerStatus.CLOSED
    assert breaker.current().failures == 2
    fail_times(breaker, dep, 1)
    assert status_of(breaker) is BreakerStatus.OPEN


def test_successes_between_failures_do_not_reset_the_count(
    store: CountingStore, clock: FakeClock
) -> None:
    """Windowed counting: three failures in the window open it whatever succeeded between."""
    breaker = make(store, clock)
    dep = Dependency()
    for _ in range(3):
        dep.down = True
        fail_times(breaker, dep, 1)
        dep.down = False
        with contextlib.suppress(CircuitOpenError):
            assert breaker.call(dep) == "ok"
    assert dep.calls == 5  # three failures, two successes, then open
    assert breaker.status is BreakerStatus.OPEN


def test_exceptions_outside_failure_kinds_are_not_counted(
    store: CountingStore, clock: FakeClock
) -> None:
    """A ValueError is the caller's bug (PERMANENT), not the dependency's: never counted."""
    breaker = make(store, clock)
    dep = Dependency(exc=lambda: ValueError("bad input"))
    for _ in range(10):
        with pytest.raises(ValueError, match="bad input"):
            breaker.call(dep)
    assert breaker.status is BreakerStatus.CLOSED
    assert store.calls["record_failure"] == 0


def test_a_predicate_decides_what_counts(store: CountingStore, clock: FakeClock) -> None:
    """failure_kinds may be a predicate exc -> bool."""
    breaker = make(store, clock, failure_kinds=lambda exc: isinstance(exc, KeyError))
    with pytest.raises(ConnectionError):
        breaker.call(Dependency())
    assert store.calls["record_failure"] == 0
    for _ in range(3):
        with pytest.raises(KeyError):
            breaker.call(Dependency(exc=KeyError))
    assert breaker.status is BreakerStatus.OPEN


def test_failure_kinds_may_name_kinds_as_strings(store: CountingStore, clock: FakeClock) -> None:
    """failure_kinds=("permanent",) counts ValueError and no longer ConnectionError."""
    breaker = make(store, clock, failure_kinds=("permanent",))
    with pytest.raises(ConnectionError):
        breaker.call(Dependency())
    assert store.calls["record_failure"] == 0
    with pytest.raises(ValueError):
        breaker.call(Dependency(exc=ValueError))
    assert store.calls["record_failure"] == 1


def test_already_in_progress_and_cancellation_are_no_verdict(
    store: CountingStore, clock: FakeClock
) -> None:
    """Work running elsewhere or a cancelled call says nothing about the dependency."""
    breaker = make(store, clock, failure_threshold=1)
    with pytest.raises(AlreadyInProgress):
        breaker.call(Dependency(exc=lambda: AlreadyInProgress("busy", key="k")))
    with pytest.raises(KeyboardInterrupt):
        breaker.call(Dependency(exc=KeyboardInterrupt))
    assert breaker.status is BreakerStatus.CLOSED
    assert store.calls["record_failure"] == 0


def test_half_open_probe_success_closes_it(store: CountingStore, clock: FakeClock) -> None:
    """After recovery_timeout one probe runs; its success closes the breaker for everyone."""
    breaker = make(store, clock)
    dep = Dependency()
    fail_times(breaker, dep, 3)
    clock.advance(29.9)
    with pytest.raises(CircuitOpenError):
        breaker.call(dep)
    clock.advance(0.1)
    assert status_of(breaker) is BreakerStatus.HALF_OPEN
    dep.down = False
    assert breaker.call(dep) == "ok"
    assert breaker.current() == BreakerState(BreakerStatus.CLOSED)
    assert breaker.status is BreakerStatus.CLOSED
    assert store.calls["try_probe"] == 1
    assert store.calls["record_success"] == 1
    # Failures were forgotten: it takes a full threshold again to open it.
    dep.down = True
    fail_times(breaker, dep, 2)
    assert breaker.status is BreakerStatus.CLOSED


def test_half_open_probe_failure_reopens_it_for_another_period(
    store: CountingStore, clock: FakeClock
) -> None:
    """A failed probe opens the breaker again for recovery_timeout."""
    breaker = make(store, clock)
    dep = Dependency()
    fail_times(breaker, dep, 3)
    clock.advance(30.0)
    fail_times(breaker, dep, 1)  # the probe
    assert dep.calls == 4
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(dep)
    assert info.value.retry_after == pytest.approx(30.0)
    assert breaker.current().status is BreakerStatus.OPEN


def test_a_probe_that_raises_an_uncounted_error_still_closes_it(
    store: CountingStore, clock: FakeClock
) -> None:
    """The dependency answered (with an error that is not its fault): that is health."""
    breaker = make(store, clock)
    fail_times(breaker, Dependency(), 3)
    clock.advance(30.0)
    with pytest.raises(ValueError):
        breaker.call(Dependency(exc=ValueError))
    assert breaker.status is BreakerStatus.CLOSED


def test_exactly_one_probe_among_eight_threads(clock: FakeClock) -> None:
    """Eight threads reach a half-open breaker together: one runs, seven fail fast."""
    store = CountingStore(MemoryBreakerStore(clock=clock))
    breaker = make(store, clock)
    fail_times(breaker, Dependency(), 3)
    clock.advance(30.0)
    release = threading.Event()
    ran: list[int] = []
    outcomes: Counter[str] = Counter()
    start = threading.Barrier(8)
    lock = threading.Lock()

    def probe_body() -> str:
        ran.append(1)
        release.wait(5)
        return "ok"

    def worker() -> None:
        start.wait()
        try:
            breaker.call(probe_body)
            outcome = "ran"
        except CircuitOpenError:
            outcome = "open"
        with lock:
            outcomes[outcome] += 1
            if outcomes["open"] == 7:
                release.set()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(ran) == 1
    assert outcomes == Counter(ran=1, open=7)
    assert breaker.status is BreakerStatus.CLOSED


def test_the_store_grants_one_probe_among_eight_breaker_instances(clock: FakeClock) -> None:
    """Eight instances of one breaker (as in eight processes) get one probe from the store."""
    shared = MemoryBreakerStore(clock=clock)
    name = new_name()
    breakers = [
        CircuitBreaker(name, failure_threshold=1, store=shared, clock=clock) for _ in range(8)
    ]
    fail_times(breakers[0], Dependency(), 1)
    clock.advance(30.0)
    guards = [b.guard() for b in breakers]
    admitted = []
    for guard in guards:
        try:
            guard.__enter__()
            admitted.append(guard)
        except CircuitOpenError:
            pass
    assert len(admitted) == 1
    assert admitted[0].probe
    admitted[0].__exit__(None, None, None)
    assert shared.state(name).status is BreakerStatus.CLOSED


def test_a_crashed_probers_lease_runs_out_and_frees_the_probe(clock: FakeClock) -> None:
    """A probe that never reports back blocks the next one for probe_lease only."""
    shared = MemoryBreakerStore(clock=clock)
    breaker = make(shared, clock, probe_lease=5.0, check_interval=None)
    name = breaker.name
    fail_times(breaker, Dependency(), 3)
    clock.advance(30.0)
    assert shared.try_probe(name, "crashed-worker", lease=5.0).probe
    with pytest.raises(CircuitOpenError):
        breaker.call(Dependency(down=False))
    clock.advance(5.0)
    assert breaker.call(Dependency(down=False)) == "ok"
    assert shared.state(name).status is BreakerStatus.CLOSED


def test_a_resent_probe_request_recognises_its_own_grant(clock: FakeClock) -> None:
    """try_probe with the same token is granted again (a retried command after a lost reply)."""
    shared = MemoryBreakerStore(clock=clock)
    name = new_name()
    shared.record_failure(name, threshold=1, window=10, open_for=1)
    clock.advance(1.0)
    assert shared.try_probe(name, "t1", lease=5).probe
    assert shared.try_probe(name, "t1", lease=5).probe
    taken = shared.try_probe(name, "t2", lease=5)
    assert not taken.probe
    assert taken.status is BreakerStatus.HALF_OPEN
    assert taken.retry_after == pytest.approx(5.0)


def test_a_cancelled_probe_frees_the_local_gate(clock: FakeClock) -> None:
    """KeyboardInterrupt in the probe: no verdict; the store's lease bounds the wait."""
    shared = MemoryBreakerStore(clock=clock)
    breaker = make(shared, clock, probe_lease=5.0, check_interval=None)
    fail_times(breaker, Dependency(), 3)
    clock.advance(30.0)
    with pytest.raises(KeyboardInterrupt):
        breaker.call(Dependency(exc=KeyboardInterrupt))
    assert shared.state(breaker.name).status is BreakerStatus.HALF_OPEN
    clock.advance(5.0)
    assert breaker.call(Dependency(down=False)) == "ok"
    assert breaker.status is BreakerStatus.CLOSED


# -- round trips ---------------------------------------------------------------------


def test_a_closed_breaker_makes_no_store_round_trip_on_success(
    store: CountingStore, clock: FakeClock
) -> None:
    """Successes write nothing; the amortised state read happens once per check_interval."""
    breaker = make(store, clock, check_interval=1.0)
    dep = Dependency(down=False)
    for _ in range(1000):
        breaker.call(dep)
    assert store.calls == Counter(state=1)  # the first call's look at the shared state
    clock.advance(0.999)
    for _ in range(1000):
        breaker.call(dep)
    assert store.calls == Counter(state=1)
    clock.advance(0.001)
    for _ in range(1000):
        breaker.call(dep)
    assert store.calls == Counter(state=2)


def test_without_a_check_interval_a_closed_breaker_never_touches_the_store(
    store: CountingStore, clock: FakeClock
) -> None:
    """check_interval=None: successes are free forever."""
    breaker = make(store, clock, check_interval=None)
    for _ in range(100):
        breaker.call(Dependency(down=False))
        clock.advance(10.0)
    assert store.total == 0


def test_a_failure_is_one_round_trip(store: CountingStore, clock: FakeClock) -> None:
    """A counted failure in the closed state is exactly one write."""
    breaker = make(store, clock, check_interval=None)
    fail_times(breaker, Dependency(), 2)
    assert store.calls == Counter(record_failure=2)


def test_the_amortised_check_tells_a_breaker_another_one_opened(clock: FakeClock) -> None:
    """A breaker with no failures of its own learns of an opening within check_interval."""
    shared = CountingStore(MemoryBreakerStore(clock=clock))
    name = new_name()
    here = CircuitBreaker(name, failure_threshold=3, store=shared, clock=clock, check_interval=1.0)
    there = CircuitBreaker(name, failure_threshold=3, store=shared, clock=clock)
    dep = Dependency(down=False)
    here.call(dep)  # its first look: closed
    fail_times(there, Dependency(), 3)
    here.call(dep)  # within the interval it does not know yet: one more attempt
    assert dep.calls == 2
    clock.advance(1.0)
    with pytest.raises(CircuitOpenError):
        here.call(dep)
    assert dep.calls == 2


def test_a_breaker_that_missed_the_opening_learns_it_from_its_next_failure(
    clock: FakeClock,
) -> None:
    """At worst each process makes one more attempt: its failure's write answers open."""
    shared = CountingStore(MemoryBreakerStore(clock=clock))
    name = new_name()
    here = CircuitBreaker(name, failure_threshold=3, store=shared, clock=clock, check_interval=None)
    there = CircuitBreaker(name, failure_threshold=3, store=shared, clock=clock)
    fail_times(there, Dependency(), 3)
    dep = Dependency()
    fail_times(here, dep, 1)
    with pytest.raises(CircuitOpenError):
        here.call(dep)
    assert dep.calls == 1


# -- the API surface -------------------------------------------------------------------


def test_with_statement_decorator_guard_and_call_share_one_state(
    store: CountingStore, clock: FakeClock
) -> None:
    """Every way of using the breaker counts into, and fails fast on, the same state."""
    breaker = make(store, clock)

    @breaker
    def decorated(x: int) -> int:
        raise ConnectionError(x)

    with pytest.raises(ConnectionError):
        decorated(1)
    with pytest.raises(ConnectionError), breaker:
        raise ConnectionError("with")
    with pytest.raises(ConnectionError), breaker.guard():
        raise ConnectionError("guard")
    assert breaker.status is BreakerStatus.OPEN
    with pytest.raises(CircuitOpenError), breaker:
        pytest.fail("the block must not run")
    with pytest.raises(CircuitOpenError):
        decorated(2)
    assert decorated.__name__ == "decorated"


def test_nested_with_blocks_keep_their_own_probe_flags(clock: FakeClock) -> None:
    """`with breaker:` inside `with other:` pops the right entry on exit."""
    shared = MemoryBreakerStore(clock=clock)
    outer, inner = make(shared, clock), make(shared, clock)
    fail_times(outer, Dependency(), 3)
    clock.advance(30.0)
    with outer, inner:  # outer is the probe here, inner is closed
        pass
    assert outer.status is BreakerStatus.CLOSED
    assert shared.state(outer.name).status is BreakerStatus.CLOSED


def test_reset_forces_it_closed(store: CountingStore, clock: FakeClock) -> None:
    """reset() clears the store and the local cache."""
    breaker = make(store, clock)
    fail_times(breaker, Dependency(), 3)
    breaker.reset()
    assert breaker.status is BreakerStatus.CLOSED
    assert breaker.call(Dependency(down=False)) == "ok"


def test_circuit_open_error_is_external_spends_no_attempt_and_pickles() -> None:
    """The dead-letter queue classifies it EXTERNAL and honours consumes_attempt=False."""
    err = CircuitOpenError("payments", 12.0)
    assert isinstance(err, IdempotaskError)
    verdict = classify(err)
    assert verdict.kind is FailureKind.EXTERNAL
    assert verdict.retry_after == 12.0
    assert err.consumes_attempt is False
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), copy.name, copy.retry_after, str(copy)) == (
        CircuitOpenError,
        "payments",
        12.0,
        str(err),
    )


def test_transitions_are_logged_at_warning(
    store: CountingStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening, reopening and closing each log one WARNING on idempotask.breaker."""
    caplog.set_level(logging.WARNING, logger="idempotask.breaker")
    breaker = make(store, clock)
    fail_times(breaker, Dependency(), 3)
    clock.advance(30.0)
    fail_times(breaker, Dependency(), 1)
    clock.advance(30.0)
    breaker.call(Dependency(down=False))
    messages = [r.getMessage() for r in caplog.records if r.name == "idempotask.breaker"]
    assert len(messages) == 3
    assert "opened after 3 failures" in messages[0]
    assert "opened again" in messages[1]
    assert "closed" in messages[2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"window": 0}, "window"),
        ({"recovery_timeout": -1}, "recovery_timeout"),
        ({"check_interval": 0}, "check_interval"),
        ({"probe_lease": float("inf")}, "probe_lease"),
        ({"on_store_error": "ignore"}, "on_store_error"),
        ({"failure_kinds": ("sometimes",)}, "failure_kinds"),
        ({"failure_kinds": 3}, "failure_kinds"),
        ({"store": object()}, "BreakerStore"),
    ],
)
def test_bad_options_are_configuration_errors_naming_the_option(
    options: dict[str, Any], message: str
) -> None:
    """Every option is validated when the breaker is made."""
    with pytest.raises(ConfigurationError, match=message):
        CircuitBreaker("x", **options)


# -- store errors ----------------------------------------------------------------------


def test_a_failing_store_lets_calls_through_by_default(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """on_store_error="allow": the call runs, a WARNING says so, and the store gets a rest."""
    broken = BrokenStore()
    breaker = make(broken, clock, check_interval=1.0)
    dep = Dependency(down=False)
    with caplog.at_level(logging.WARNING, logger="idempotask.breaker"):
        assert breaker.call(dep) == "ok"
    assert "store failed" in caplog.text
    with pytest.raises(ConnectionError):
        breaker.call(Dependency())  # recording skipped while the store rests
    assert broken.total == 1
    clock.advance(1.0)
    breaker.call(dep)
    assert broken.total == 2


def test_a_failing_store_raises_before_the_call_when_asked(clock: FakeClock) -> None:
    """on_store_error="raise": BackendError before the call, which does not run."""
    breaker = make(BrokenStore(), clock, on_store_error="raise")
    dep = Dependency(down=False)
    with pytest.raises(BackendError):
        breaker.call(dep)
    assert dep.calls == 0


def test_recording_an_outcome_never_replaces_the_callers_exception(clock: FakeClock) -> None:
    """The call's own exception propagates even when writing its failure fails."""
    breaker = make(BrokenStore(), clock, on_store_error="raise", check_interval=None)
    with pytest.raises(ConnectionError):
        breaker.call(Dependency())


# -- the configured store ----------------------------------------------------------------


def test_store_none_follows_the_configured_memory_backend() -> None:
    """Without store=, breakers share the configured memory backend's MemoryBreakerStore."""
    a = CircuitBreaker(new_name(), failure_threshold=1)
    b = CircuitBreaker(a.name, failure_threshold=1, check_interval=None)
    fail_times(a, Dependency(), 1)
    dep = Dependency()
    fail_times(b, dep, 1)  # b's failure write answers "open"
    with pytest.raises(CircuitOpenError):
        b.call(dep)
    assert type(store_for_backend(idempotask.get_backend())) is MemoryBreakerStore


def test_store_none_refuses_a_backend_with_no_breaker_store() -> None:
    """A backend that offers no breaker store is an error naming the fix."""

    class Odd:
        pass

    with pytest.raises(ConfigurationError, match="store="):
        store_for_backend(Odd())


def test_store_none_asks_the_backend_for_its_store_under_the_namespace() -> None:
    """store_for_backend calls breaker_store(namespace=...) on any backend, ours or not,
    and refuses an answer that is not a BreakerStore or a method without namespace=."""
    asked: list[str] = []
    made = MemoryBreakerStore()

    class Custom:
        def breaker_store(self, *, namespace: str = "idempotask") -> MemoryBreakerStore:
            asked.append(namespace)
            return made

    assert store_for_backend(Custom(), namespace="billing") is made
    assert asked == ["billing"]

    class Wrong:
        def breaker_store(self, *, namespace: str = "idempotask") -> object:
            return object()

    class Old:
        def breaker_store(self) -> MemoryBreakerStore:
            return made

    with pytest.raises(ConfigurationError, match="not a BreakerStore"):
        store_for_backend(Wrong())
    with pytest.raises(ConfigurationError, match="namespace="):
        store_for_backend(Old())


def test_breakers_of_two_namespaces_on_one_memory_backend_do_not_share_state() -> None:
    backend = MemoryBackend()
    idempotask.configure(backend=backend, namespace="app-a")
    a = CircuitBreaker("shared-name", failure_threshold=1)
    fail_times(a, Dependency(), 1)
    assert a.current().status is BreakerStatus.OPEN
    idempotask.configure(namespace="app-b")
    b = CircuitBreaker("shared-name", failure_threshold=1)
    assert b.current().status is BreakerStatus.CLOSED


# -- async -------------------------------------------------------------------------


async def test_async_decorator_opens_and_fails_fast(store: CountingStore, clock: FakeClock) -> None:
    """@breaker on an async def counts failures and fails fast without awaiting the body."""
    breaker = make(store, clock)
    calls = 0

    @breaker
    async def fetch() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        raise TimeoutError

    for _ in range(3):
        with pytest.raises(TimeoutError):
            await fetch()
    with pytest.raises(CircuitOpenError):
        await fetch()
    assert calls == 3


async def test_async_with_acall_and_aguard_probe_and_close(
    store: CountingStore, clock: FakeClock
) -> None:
    """async with / acall / aguard: a half-open probe success closes the breaker."""
    breaker = make(store, clock)

    async def down() -> None:
        raise ConnectionError

    async def up() -> str:
        return "ok"

    with pytest.raises(ConnectionError):
        await breaker.acall(down)
    with pytest.raises(ConnectionError):
        async with breaker:
            await down()
    with pytest.raises(ConnectionError):
        async with breaker.aguard():
            await down()
    with pytest.raises(CircuitOpenError):
        await breaker.acall(up)
    clock.advance(30.0)
    async with breaker.aguard() as guard:
        assert guard.probe
        await up()
    assert breaker.status is BreakerStatus.CLOSED
    assert (await breaker.acurrent()).status is BreakerStatus.CLOSED


async def test_exactly_one_probe_among_eight_tasks(store: CountingStore, clock: FakeClock) -> None:
    """Eight tasks reach a half-open breaker: one probes, the rest fail fast."""
    breaker = make(store, clock)
    fail_times(breaker, Dependency(), 3)
    clock.advance(30.0)
    ran = refused = 0
    release = asyncio.Event()

    async def body() -> str:
        nonlocal ran
        ran += 1
        await release.wait()  # hold the probe until every other task was refused
        return "ok"

    async def attempt() -> str:
        nonlocal refused
        try:
            return await breaker.acall(body)
        except CircuitOpenError:
            refused += 1
            if refused == 7:
                release.set()
            return "open"

    results = await asyncio.wait_for(asyncio.gather(*(attempt() for _ in range(8))), 5)
    assert ran == 1
    assert sorted(results) == ["ok"] + ["open"] * 7
    assert breaker.status is BreakerStatus.CLOSED


async def test_a_cancelled_async_probe_is_no_verdict(clock: FakeClock) -> None:
    """CancelledError in the probe: nothing is recorded; the lease frees the probe."""
    shared = MemoryBreakerStore(clock=clock)
    breaker = make(shared, clock, probe_lease=5.0, check_interval=None)
    fail_times(breaker, Dependency(), 3)
    clock.advance(30.0)
    task = asyncio.create_task(breaker.acall(asyncio.sleep, 10))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert shared.state(breaker.name).status is BreakerStatus.HALF_OPEN
    clock.advance(5.0)
    await breaker.acall(asyncio.sleep, 0)
    assert breaker.status is BreakerStatus.CLOSED


# -- Redis: shared across processes ------------------------------------------------------

redis_only = pytest.mark.redis


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """The shared Redis server; every key under this run's prefix is removed at the end."""
    import redis

    url = service_url("redis")
    yield url
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{PREFIX}:*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[Any]:
    """A RedisBreakerStore under this run's prefix, closed afterwards."""
    from idempotask.backends.redis import RedisBreakerStore

    store = RedisBreakerStore(redis_url, prefix=PREFIX)
    yield store
    store.close()


def _race_for_the_probe(breakers: list[CircuitBreaker]) -> tuple[int, list[str]]:
    """Each breaker calls from its own thread at once; the probe is held until every
    other thread was refused (bounded), so a thread slow to start (a loaded machine)
    cannot arrive after the probe closed the breaker and run legitimately."""
    start = threading.Barrier(len(breakers))
    refused_all = threading.Event()
    lock = threading.Lock()
    ran: list[int] = []
    outcomes: list[str] = []

    def body() -> None:
        ran.append(1)
        refused_all.wait(8)  # a second probe would wait here too, and be counted

    def worker(breaker: CircuitBreaker) -> None:
        start.wait()
        try:
            breaker.call(body)
            outcome = "ran"
        except CircuitOpenError:
            outcome = "open"
        with lock:
            outcomes.append(outcome)
            if outcomes.count("open") == len(breakers) - 1:
                refused_all.set()

    threads = [threading.Thread(target=worker, args=(b,)) for b in breakers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return len(ran), outcomes


def _hold_until_refused(opened: Any, count: int) -> None:
    """Hold a probe until ``count`` calls across the processes were refused (bounded)."""
    deadline = time.monotonic() + 8
    while opened.value < count and time.monotonic() < deadline:
        time.sleep(0.01)


def _redis_breaker(url: str, name: str, **options: Any) -> CircuitBreaker:
    from idempotask.backends.redis import RedisBreakerStore

    return CircuitBreaker(name, store=RedisBreakerStore(url, prefix=PREFIX), **options)


def _child_opens_it(url: str, name: str) -> None:
    breaker = _redis_breaker(url, name, failure_threshold=3, check_interval=None)
    for _ in range(3):
        with contextlib.suppress(ConnectionError):
            breaker.call(Dependency())
    assert breaker.status is BreakerStatus.OPEN


def _run_child(target: Callable[..., None], *args: Any) -> None:
    child = FORK.Process(target=target, args=args)
    child.start()
    child.join(20)
    assert child.exitcode == 0


@redis_only
def test_redis_opened_in_one_process_fails_fast_in_another_after_its_check_interval(
    redis_url: str,
) -> None:
    """A forked child opens it; this process, with no failures, learns within 0.2 s."""
    name = new_name()
    here = _redis_breaker(redis_url, name, failure_threshold=3, check_interval=0.2)
    dep = Dependency(down=False)
    here.call(dep)  # first look at the shared state: closed
    _run_child(_child_opens_it, redis_url, name)
    time.sleep(0.25)
    with pytest.raises(CircuitOpenError) as info:
        here.call(dep)
    assert dep.calls == 1
    assert 29.0 < info.value.retry_after <= 30.0


@redis_only
def test_redis_opened_in_one_process_fails_fast_in_another_after_its_next_failure(
    redis_url: str,
) -> None:
    """Without amortised checks, this process's one more attempt learns the open state."""
    name = new_name()
    here = _redis_breaker(redis_url, name, failure_threshold=3, check_interval=None)
    _run_child(_child_opens_it, redis_url, name)
    dep = Dependency()
    fail_times(here, dep, 1)
    with pytest.raises(CircuitOpenError):
        here.call(dep)
    assert dep.calls == 1


@redis_only
def test_redis_closed_breaker_makes_no_round_trip_on_success(redis_store: Any) -> None:
    """Counted on a real store: 500 successes cost the one amortised read."""
    counted = CountingStore(redis_store)
    breaker = CircuitBreaker(new_name(), store=counted, check_interval=60.0)
    for _ in range(500):
        breaker.call(Dependency(down=False))
    assert counted.calls == Counter(state=1)


@redis_only
def test_redis_half_open_probe_failure_reopens_and_success_closes(redis_store: Any) -> None:
    """On the server's clock: open 0.2 s, probe fails, open again, probe succeeds, closed."""
    breaker = CircuitBreaker(
        new_name(), failure_threshold=2, recovery_timeout=0.2, store=redis_store
    )
    dep = Dependency()
    fail_times(breaker, dep, 2)
    with pytest.raises(CircuitOpenError):
        breaker.call(dep)
    time.sleep(0.22)
    fail_times(breaker, dep, 1)  # the probe fails
    assert redis_store.state(breaker.name).status is BreakerStatus.OPEN
    with pytest.raises(CircuitOpenError):
        breaker.call(dep)
    time.sleep(0.22)
    dep.down = False
    assert breaker.call(dep) == "ok"
    assert dep.calls == 4
    assert redis_store.state(breaker.name) == BreakerState(BreakerStatus.CLOSED)


@redis_only
def test_redis_exactly_one_probe_across_eight_threads(redis_url: str, redis_store: Any) -> None:
    """Eight threads, each with its own breaker instance: the server grants one probe."""
    name = new_name()
    redis_store.record_failure(name, threshold=1, window=10, open_for=0.1)
    time.sleep(0.12)
    breakers = [_redis_breaker(redis_url, name) for _ in range(8)]
    ran, outcomes = _race_for_the_probe(breakers)
    assert ran == 1
    assert sorted(outcomes) == ["open"] * 7 + ["ran"]
    assert redis_store.state(name).status is BreakerStatus.CLOSED


def _probe_racer(url: str, name: str, barrier: Any, ran: Any, opened: Any) -> None:
    breaker = _redis_breaker(url, name)

    def body() -> None:
        with ran.get_lock():
            ran.value += 1
        _hold_until_refused(opened, 7)  # every other thread, in either process

    def worker() -> None:
        barrier.wait()
        try:
            breaker.call(body)
        except CircuitOpenError:
            with opened.get_lock():
                opened.value += 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)


@redis_only
def test_redis_exactly_one_probe_across_two_processes(redis_url: str, redis_store: Any) -> None:
    """Two forked processes of four threads each race for the probe: one call runs."""
    name = new_name()
    redis_store.record_failure(name, threshold=1, window=10, open_for=0.1)
    time.sleep(0.12)
    barrier = FORK.Barrier(8)
    ran, opened = FORK.Value("i", 0), FORK.Value("i", 0)
    children = [
        FORK.Process(target=_probe_racer, args=(redis_url, name, barrier, ran, opened))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(20)
        assert child.exitcode == 0
    assert (ran.value, opened.value) == (1, 7)
    assert redis_store.state(name).status is BreakerStatus.CLOSED


@redis_only
def test_redis_records_expire_with_their_window_and_reset_removes_them(
    redis_url: str, redis_store: Any
) -> None:
    """A closed count lives only as long as its window; reset deletes the hash."""
    import redis

    from idempotask.backends.redis import record_key

    name = new_name()
    state = redis_store.record_failure(name, threshold=5, window=2.0, open_for=30)
    assert (state.status, state.failures) == (BreakerStatus.CLOSED, 1)
    client = redis.Redis.from_url(redis_url)
    try:
        rkey = record_key(redis_store.key(name))
        assert 0 < client.pttl(rkey) <= 2000
        opened = redis_store.record_failure(name, threshold=2, window=2.0, open_for=30)
        assert (opened.status, opened.failures, opened.changed) == (BreakerStatus.OPEN, 2, True)
        assert client.pttl(rkey) > 30_000  # kept past the open period for the half-open state
        redis_store.reset(name)
        assert client.exists(rkey) == 0
    finally:
        client.close()


@redis_only
def test_redis_a_foreign_value_under_a_breaker_key_is_a_corrupt_record_error(
    redis_url: str, redis_store: Any
) -> None:
    """A value we did not write is reported, never overwritten."""
    import redis

    from idempotask.backends.redis import record_key
    from idempotask.errors import CorruptRecordError

    name = new_name()
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(record_key(redis_store.key(name)), "someone else's")
        with pytest.raises(CorruptRecordError):
            redis_store.record_failure(name, threshold=1, window=1, open_for=1)
    finally:
        client.close()
    redis_store.reset(name)


@redis_only
async def test_redis_async_breaker_opens_probes_and_closes(redis_url: str) -> None:
    """The async twins on Redis: open, fail fast, probe on the server's clock, close."""
    from idempotask.backends.redis import RedisBreakerStore

    store = RedisBreakerStore(redis_url, prefix=PREFIX)
    breaker = CircuitBreaker(new_name(), failure_threshold=2, recovery_timeout=0.2, store=store)
    calls = 0

    @breaker
    async def remote(ok: bool) -> str:
        nonlocal calls
        calls += 1
        if not ok:
            raise ConnectionError
        return "ok"

    try:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await remote(False)
        with pytest.raises(CircuitOpenError):
            await remote(True)
        await asyncio.sleep(0.22)
        assert await remote(True) == "ok"
        assert calls == 3
        assert (await store.astate(breaker.name)).status is BreakerStatus.CLOSED
        await breaker.areset()
    finally:
        await store.aclose()
        store.close()


@redis_only
def test_store_none_follows_a_configured_redis_backend(redis_url: str) -> None:
    """configure(backend=redis://) gives breakers a RedisBreakerStore on the same backend."""
    from idempotask.backends.redis import RedisBreakerStore

    idempotask.configure(backend=redis_url, namespace=PREFIX)
    breaker = CircuitBreaker(new_name(), failure_threshold=1)
    fail_times(breaker, Dependency(), 1)
    store = store_for_backend(idempotask.get_backend(), namespace=PREFIX)
    assert isinstance(store, RedisBreakerStore)
    assert store.backend is idempotask.get_backend()
    assert store.state(breaker.name).status is BreakerStatus.OPEN
    store.reset(breaker.name)


# -- SQL: shared across processes through a table -------------------------------------------

SQL_TABLE = f"idem_brk_{uuid.uuid4().hex[:10]}"
_sql_stores: dict[str, Any] = {}
# name -> (service for service_url, or None for a SQLite file; plan forced on the store)
SQL_DATABASES: dict[str, tuple[str | None, str | None]] = {
    "postgres": ("postgres", None),
    "mariadb": ("mysql", None),
    "mysql-plan": ("mysql", "mysql"),
    "sqlite": (None, None),
}
SQL_PARAMS = [
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mysql),
    pytest.param("mysql-plan", marks=pytest.mark.mysql),
    "sqlite",
]


@pytest.fixture(scope="module")
def sqlite_breaker_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('breakers') / 'breakers.db'}"


@pytest.fixture(scope="module", autouse=True)
def _drop_sql_breaker_tables() -> Iterator[None]:
    yield
    for sql_store in _sql_stores.values():
        try:
            sql_store.drop_tables()
        finally:
            sql_store.close()
    _sql_stores.clear()


def sql_url(name: str, sqlite_url: str) -> str:
    service = SQL_DATABASES[name][0]
    return sqlite_url if service is None else service_url(service)


def sql_store(name: str, sqlite_url: str) -> Any:
    """One SQLBreakerStore per database for the module, on this run's table."""
    from idempotask.backends.sql import SQLBreakerStore

    if name not in _sql_stores:
        created = SQLBreakerStore(sql_url(name, sqlite_url), table_name=SQL_TABLE)
        created._force_flavour = SQL_DATABASES[name][1]
        created.create_tables()
        _sql_stores[name] = created
    return _sql_stores[name]


def _sql_breaker(url: str, name: str, **options: Any) -> CircuitBreaker:
    from idempotask.backends.sql import SQLBreakerStore

    return CircuitBreaker(name, store=SQLBreakerStore(url, table_name=SQL_TABLE), **options)


@pytest.mark.parametrize("db", SQL_PARAMS)
def test_sql_store_follows_the_breaker_store_rules(db: str, sqlite_breaker_url: str) -> None:
    """The BreakerStore rules on each database's clock: counting within a window, opening
    at the threshold (changed once, with the count), failing while open, one probe per
    token in half-open, re-opening on a failed probe, closing on a successful one."""
    store = sql_store(db, sqlite_breaker_url)
    name = new_name()
    assert store.state(name) == BreakerState(BreakerStatus.CLOSED)
    first = store.record_failure(name, threshold=3, window=30, open_for=0.3)
    assert (first.status, first.failures, first.changed) == (BreakerStatus.CLOSED, 1, False)
    assert store.state(name).failures == 1
    assert store.record_failure(name, threshold=3, window=30, open_for=0.3).failures == 2
    opened = store.record_failure(name, threshold=3, window=30, open_for=0.3)
    assert (opened.status, opened.failures, opened.changed) == (BreakerStatus.OPEN, 3, True)
    assert opened.retry_after == pytest.approx(0.3)
    again = store.record_failure(name, threshold=3, window=30, open_for=0.3)
    assert (again.status, again.changed) == (BreakerStatus.OPEN, False)
    assert 0 < again.retry_after <= 0.3
    assert store.try_probe(name, "p1", lease=5).probe is False  # still open
    assert store.record_success(name).status is BreakerStatus.OPEN  # proves nothing yet
    time.sleep(0.35)
    assert store.state(name) == BreakerState(BreakerStatus.HALF_OPEN)
    granted = store.try_probe(name, "p1", lease=5)
    assert (granted.status, granted.probe, granted.retry_after) == (
        BreakerStatus.HALF_OPEN,
        True,
        5,
    )
    assert store.try_probe(name, "p1", lease=5).probe is True  # a resent request: its own
    refused = store.try_probe(name, "p2", lease=5)
    assert (refused.status, refused.probe) == (BreakerStatus.HALF_OPEN, False)
    assert 4 < refused.retry_after <= 5
    reopened = store.record_failure(name, threshold=3, window=30, open_for=0.3)
    assert (reopened.status, reopened.failures, reopened.changed) == (BreakerStatus.OPEN, 0, True)
    time.sleep(0.35)
    assert store.try_probe(name, "p3", lease=5).probe is True
    closed = store.record_success(name)
    assert closed == BreakerState(BreakerStatus.CLOSED, changed=True)
    assert store.state(name) == BreakerState(BreakerStatus.CLOSED)
    # A window that ended starts the count afresh; threshold 1 opens at once.
    store.record_failure(name, threshold=5, window=0.1, open_for=30)
    time.sleep(0.15)
    assert store.state(name).failures == 0
    assert store.record_failure(name, threshold=5, window=0.1, open_for=30).failures == 1
    assert store.record_failure(name, threshold=1, window=30, open_for=30).changed is True
    store.reset(name)
    assert store.state(name) == BreakerState(BreakerStatus.CLOSED)
    fresh = new_name()
    instant = store.record_failure(fresh, threshold=1, window=30, open_for=30)
    assert (instant.status, instant.failures, instant.changed) == (BreakerStatus.OPEN, 1, True)
    store.reset(fresh)


@pytest.mark.parametrize("db", SQL_PARAMS)
async def test_sql_async_breaker_opens_probes_and_closes(db: str, sqlite_breaker_url: str) -> None:
    """The async twins: open, fail fast, one probe on the database's clock, close."""
    store = sql_store(db, sqlite_breaker_url)
    breaker = CircuitBreaker(new_name(), failure_threshold=2, recovery_timeout=0.2, store=store)
    calls = 0

    @breaker
    async def remote(ok: bool) -> str:
        nonlocal calls
        calls += 1
        if not ok:
            raise ConnectionError
        return "ok"

    try:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await remote(False)
        with pytest.raises(CircuitOpenError):
            await remote(True)
        await asyncio.sleep(0.25)
        assert await remote(True) == "ok"
        assert calls == 3
        assert (await store.astate(breaker.name)).status is BreakerStatus.CLOSED
        await breaker.areset()
    finally:
        await store.aclose()


def _sql_child_opens_it(url: str, name: str) -> None:
    breaker = _sql_breaker(url, name, failure_threshold=3, check_interval=None)
    for _ in range(3):
        with contextlib.suppress(ConnectionError):
            breaker.call(Dependency())
    assert breaker.status is BreakerStatus.OPEN


@pytest.mark.postgres
def test_sql_opened_in_one_process_fails_fast_in_another(sqlite_breaker_url: str) -> None:
    """A forked child opens it on PostgreSQL; this process learns within its check
    interval and fails fast without calling."""
    sql_store("postgres", sqlite_breaker_url)
    url = service_url("postgres")
    name = new_name()
    here = _sql_breaker(url, name, failure_threshold=3, check_interval=0.2)
    dep = Dependency(down=False)
    here.call(dep)  # first look at the shared state: closed
    _run_child(_sql_child_opens_it, url, name)
    time.sleep(0.25)
    with pytest.raises(CircuitOpenError) as info:
        here.call(dep)
    assert dep.calls == 1
    assert 29.0 < info.value.retry_after <= 30.0


@pytest.mark.parametrize(
    "db",
    [
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mysql),
        "sqlite",
    ],
)
def test_sql_exactly_one_probe_across_eight_threads(db: str, sqlite_breaker_url: str) -> None:
    """Eight threads, each with its own breaker instance and store: one probe runs."""
    store = sql_store(db, sqlite_breaker_url)
    url = sql_url(db, sqlite_breaker_url)
    name = new_name()
    store.record_failure(name, threshold=1, window=10, open_for=0.1)
    time.sleep(0.15)
    breakers = [_sql_breaker(url, name) for _ in range(8)]
    ran, outcomes = _race_for_the_probe(breakers)
    assert ran == 1
    assert sorted(outcomes) == ["open"] * 7 + ["ran"]
    assert store.state(name).status is BreakerStatus.CLOSED


def _sql_probe_racer(url: str, name: str, barrier: Any, ran: Any, opened: Any) -> None:
    breaker = _sql_breaker(url, name)

    def body() -> None:
        with ran.get_lock():
            ran.value += 1
        _hold_until_refused(opened, 7)  # every other thread, in either process

    def worker() -> None:
        barrier.wait()
        try:
            breaker.call(body)
        except CircuitOpenError:
            with opened.get_lock():
                opened.value += 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)


@pytest.mark.postgres
def test_sql_exactly_one_probe_across_two_processes(sqlite_breaker_url: str) -> None:
    """Two forked processes of four threads each race for the probe on PostgreSQL."""
    store = sql_store("postgres", sqlite_breaker_url)
    url = service_url("postgres")
    name = new_name()
    store.record_failure(name, threshold=1, window=10, open_for=0.1)
    time.sleep(0.15)
    barrier = FORK.Barrier(8)
    ran, opened = FORK.Value("i", 0), FORK.Value("i", 0)
    children = [
        FORK.Process(target=_sql_probe_racer, args=(url, name, barrier, ran, opened))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(20)
        assert child.exitcode == 0
    assert (ran.value, opened.value) == (1, 7)
    assert store.state(name).status is BreakerStatus.CLOSED


def test_store_none_follows_a_configured_sql_backend(tmp_path: Any) -> None:
    """configure(backend=SQLAlchemyBackend) gives breakers its breaker_store(): the same
    engines, the idempotask_breakers table."""
    from idempotask.backends.sql import SQLAlchemyBackend, SQLBreakerStore

    backend = SQLAlchemyBackend(f"sqlite:///{tmp_path / 'app.db'}")
    shared = backend.breaker_store()
    shared.create_tables()
    idempotask.configure(backend=backend)
    breaker = CircuitBreaker(new_name(), failure_threshold=1)
    fail_times(breaker, Dependency(), 1)
    store = store_for_backend(idempotask.get_backend())
    assert isinstance(store, SQLBreakerStore)
    assert store.database is backend.database
    assert store.state(breaker.name).status is BreakerStatus.OPEN
    assert store.purge_stale(retain=3600) == 0
    backend.close()


def test_sql_bad_arguments_are_configuration_errors(sqlite_breaker_url: str) -> None:
    store = sql_store("sqlite", sqlite_breaker_url)
    for call, message in [
        (lambda: store.record_failure("", threshold=1, window=1, open_for=1), "name"),
        (lambda: store.record_failure("x", threshold=0, window=1, open_for=1), "threshold"),
        (lambda: store.record_failure("x", threshold=1, window=-1, open_for=1), "window"),
        (lambda: store.try_probe("x", "t", lease=float("inf")), "lease"),
        (lambda: store.state("n" * 300), "bytes"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            call()

"""The breaker store contract as a pytest base class, for every store, ours or not.

Subclass :class:`BreakerStoreContract` in a ``Test...`` class and give it a
``breaker_store`` fixture::

    import pytest
    from idempotask.testing import BreakerStoreContract

    class TestMyBreakers(BreakerStoreContract):
        @pytest.fixture
        def breaker_store(self) -> MyBreakerStore:
            return MyBreakerStore("mystore://localhost")

It checks every rule of :class:`~idempotask.backends.base.BreakerStore`: counting in a
fixed window, opening at the threshold, half-open after the open period, one probe at a
time (a resent request recognising its own grant, a crashed prober's lease running out),
closing and reopening, ``reset`` and ``states``. Every test runs twice, through the sync
methods and through the ``a``-prefixed ones on an event loop (:class:`BreakerView` hides
which). Breaker names are unique to each test and every name used is reset afterwards,
so a shared server needs no cleaning. Time is the store's own: the tests that need an
open period, a window or a probe lease to pass use short ones (0.2 s) and sleep past
them (about 0.4 s each); set ``real_time_tests = False`` on the subclass to skip them.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar, cast

import pytest

from idempotask.backends.base import BreakerState, BreakerStatus, BreakerStore
from idempotask.testing.views import Mode, _check_mode, _View

__all__ = ["BreakerStoreContract", "BreakerView"]

#: An open period, window or probe lease that never ends on its own during a test.
LONG = 600.0
#: One that ends during a test, and how long the tests sleep to be past it.
SHORT, PAST_SHORT = 0.2, 0.45

CLOSED, OPEN, HALF_OPEN = BreakerStatus.CLOSED, BreakerStatus.OPEN, BreakerStatus.HALF_OPEN


class BreakerView(_View):
    """A breaker store as plain synchronous calls, through its sync or its async methods.

    :meth:`name` makes breaker names unique to this view; :meth:`close` resets them all
    (and, in async mode, closes the view's event loop after the store's ``aclose()``).
    """

    def __init__(self, store: BreakerStore, mode: Mode) -> None:
        self.mode = _check_mode(mode)
        self.store = store
        self.concurrency = 8 if mode == "sync" else 30
        super().__init__(store, f"brk-{uuid.uuid4().hex[:12]}-")

    def name(self, suffix: str = "b") -> str:
        """A breaker name unique to this view."""
        return self._unique(suffix)

    def state(self, name: str) -> BreakerState:
        """``state`` / ``astate``."""
        return cast(BreakerState, self._call("state", name))

    def fail(
        self, name: str, *, threshold: int = 3, window: float = LONG, open_for: float = LONG
    ) -> BreakerState:
        """``record_failure`` / ``arecord_failure``."""
        args = {"threshold": threshold, "window": window, "open_for": open_for}
        return cast(BreakerState, self._call("record_failure", name, **args))

    def succeed(self, name: str) -> BreakerState:
        """``record_success`` / ``arecord_success``."""
        return cast(BreakerState, self._call("record_success", name))

    def probe(self, name: str, token: str, *, lease: float = LONG) -> BreakerState:
        """``try_probe`` / ``atry_probe``."""
        return cast(BreakerState, self._call("try_probe", name, token, lease=lease))

    def reset(self, name: str) -> None:
        """``reset`` / ``areset``."""
        self._call("reset", name)

    def states(self, *, limit: int = 1000) -> dict[str, BreakerState]:
        """``states`` / ``astates``."""
        return cast("dict[str, BreakerState]", self._call("states", limit=limit))

    def open(self, name: str, *, open_for: float = LONG) -> BreakerState:
        """Open ``name`` with one failure (threshold 1)."""
        return self.fail(name, threshold=1, open_for=open_for)

    def half_open(self, name: str) -> None:
        """Open ``name`` for a short period and wait past it (real time)."""
        self.open(name, open_for=SHORT)
        time.sleep(PAST_SHORT)

    def concurrently(self, method: str, calls: list[tuple[Any, ...]], **kwargs: Any) -> list[Any]:
        """``method`` once per argument tuple, all at once: threads (sync) or tasks (async)."""
        return self._race(method, calls, **kwargs)

    def close(self) -> None:
        """Reset every breaker this view named, then close its event loop."""
        try:
            for name in self._names:
                with contextlib.suppress(Exception):
                    self.reset(name)
        finally:
            self._close_loop()


class BreakerStoreContract:
    """Conformance tests for a :class:`~idempotask.backends.base.BreakerStore`.

    Subclass it in a ``Test...`` class with a ``breaker_store`` fixture returning the
    store under test. Each test receives ``bv``, a :class:`BreakerView` of that store,
    once through the sync methods and once through the async ones.
    """

    #: Run the tests that sleep (about 0.4 s each) for an open period, window or lease.
    real_time_tests: ClassVar[bool] = True

    @pytest.fixture(params=["sync", "async"])
    def bv(
        self, request: pytest.FixtureRequest, breaker_store: BreakerStore
    ) -> Iterator[BreakerView]:
        """The store under test through its sync or its async methods."""
        with contextlib.closing(BreakerView(breaker_store, request.param)) as view:
            yield view

    def _real_time(self) -> None:
        if not self.real_time_tests:
            pytest.skip("real_time_tests = False")

    def _half_open(self, bv: BreakerView) -> str:
        """A new breaker, opened for a short period and waited past (real time)."""
        self._real_time()
        name = bv.name()
        bv.half_open(name)
        return name

    # -- closed ------------------------------------------------------------------------

    def test_store_satisfies_the_protocol(self, breaker_store: BreakerStore) -> None:
        """The store is a BreakerStore (every method and its async twin)."""
        assert isinstance(breaker_store, BreakerStore)

    def test_a_breaker_without_a_record_is_closed(self, bv: BreakerView) -> None:
        """No record reads as closed, no failures, nothing to wait for, nothing changed."""
        state = bv.state(bv.name())
        assert state == BreakerState(CLOSED, failures=0, retry_after=0.0)

    def test_failures_below_the_threshold_are_counted_and_stay_closed(
        self, bv: BreakerView
    ) -> None:
        """Each failure adds one in the window; below the threshold nothing changes."""
        name = bv.name()
        first, second = bv.fail(name), bv.fail(name)
        assert (first.status, first.failures, first.changed) == (CLOSED, 1, False)
        assert (second.status, second.failures, second.changed) == (CLOSED, 2, False)
        assert bv.state(name).failures == 2

    def test_the_threshold_failure_opens_it(self, bv: BreakerView) -> None:
        """The failure that reaches the threshold opens it: ``changed``, the count that
        opened it, and ``retry_after`` of at most the open period."""
        name = bv.name()
        bv.fail(name, threshold=3, open_for=30)
        bv.fail(name, threshold=3, open_for=30)
        opened = bv.fail(name, threshold=3, open_for=30)
        assert (opened.status, opened.failures, opened.changed) == (OPEN, 3, True)
        assert 0 < opened.retry_after <= 30
        state = bv.state(name)
        assert state.status is OPEN
        assert 0 < state.retry_after <= 30
        assert not state.changed

    def test_successes_do_not_reset_the_count(self, bv: BreakerView) -> None:
        """A success while closed changes nothing: failures around it add up."""
        name = bv.name()
        bv.fail(name)
        success = bv.succeed(name)
        assert (success.status, success.failures, success.changed) == (CLOSED, 1, False)
        assert bv.fail(name).failures == 2

    def test_a_probe_while_closed_is_not_granted(self, bv: BreakerView) -> None:
        """try_probe on a closed breaker answers closed, probe False: the caller just runs."""
        name = bv.name()
        bv.fail(name)
        state = bv.probe(name, "t1")
        assert (state.status, state.probe) == (CLOSED, False)

    def test_breakers_are_independent_by_name(self, bv: BreakerView) -> None:
        """Opening one name leaves another closed."""
        a, b = bv.name("a"), bv.name("b")
        bv.open(a)
        assert bv.state(a).status is OPEN
        assert bv.state(b).status is CLOSED

    def test_a_window_that_ended_starts_a_new_count(self, bv: BreakerView) -> None:
        """A failure after the window ended counts from 1 again (fixed window)."""
        self._real_time()
        name = bv.name()
        bv.fail(name, threshold=2, window=SHORT)
        time.sleep(PAST_SHORT)
        again = bv.fail(name, threshold=2, window=SHORT)
        assert (again.status, again.failures) == (CLOSED, 1)

    # -- open ------------------------------------------------------------------------------

    def test_while_open_failures_successes_and_probes_change_nothing(self, bv: BreakerView) -> None:
        """OPEN: record_failure and record_success answer OPEN unchanged; no probe."""
        name = bv.name()
        bv.open(name)
        for state in (bv.fail(name), bv.succeed(name), bv.probe(name, "t1")):
            assert state.status is OPEN
            assert not state.changed
            assert not state.probe
            assert state.retry_after > 0

    def test_reset_closes_it_and_forgets_the_failures(self, bv: BreakerView) -> None:
        """reset removes the record: closed, no failures; resetting nothing is harmless."""
        name, other = bv.name("a"), bv.name("never")
        bv.open(name)
        bv.reset(name)
        assert bv.state(name) == BreakerState(CLOSED)
        bv.reset(other)
        assert bv.state(other) == BreakerState(CLOSED)
        assert bv.fail(name).failures == 1

    # -- half-open ---------------------------------------------------------------------------

    def test_after_the_open_period_it_is_half_open_with_the_probe_free(
        self, bv: BreakerView
    ) -> None:
        """Past open_until, the state is HALF_OPEN with retry_after 0 (a probe may go)."""
        name = self._half_open(bv)
        state = bv.state(name)
        assert (state.status, state.retry_after, state.changed) == (HALF_OPEN, 0.0, False)

    def test_one_probe_at_a_time_and_a_resent_request_recognises_its_grant(
        self, bv: BreakerView
    ) -> None:
        """The first token gets the probe; another waits (retry_after: the lease left);
        the same token asking again is granted again."""
        name = self._half_open(bv)
        granted = bv.probe(name, "t1", lease=30)
        assert (granted.status, granted.probe) == (HALF_OPEN, True)
        assert 0 < granted.retry_after <= 30
        refused = bv.probe(name, "t2", lease=30)
        assert (refused.status, refused.probe) == (HALF_OPEN, False)
        assert 0 < refused.retry_after <= 30
        assert bv.state(name).retry_after > 0
        assert bv.probe(name, "t1", lease=30).probe

    def test_a_crashed_probers_lease_runs_out(self, bv: BreakerView) -> None:
        """A probe never reported frees the probe for another caller after its lease."""
        name = self._half_open(bv)
        assert bv.probe(name, "t1", lease=SHORT).probe
        assert not bv.probe(name, "t2", lease=SHORT).probe
        time.sleep(PAST_SHORT)
        assert bv.probe(name, "t2", lease=SHORT).probe

    def test_a_success_while_half_open_closes_it(self, bv: BreakerView) -> None:
        """HALF_OPEN + record_success: CLOSED, changed; the record is gone."""
        name = self._half_open(bv)
        assert bv.probe(name, "t1").probe
        closed = bv.succeed(name)
        assert (closed.status, closed.changed) == (CLOSED, True)
        assert bv.state(name) == BreakerState(CLOSED)
        assert name not in bv.states()

    def test_a_failure_while_half_open_opens_it_again(self, bv: BreakerView) -> None:
        """HALF_OPEN + record_failure: OPEN for another period, changed, probe cleared."""
        name = self._half_open(bv)
        assert bv.probe(name, "t1").probe
        reopened = bv.fail(name, threshold=5, open_for=30)
        assert (reopened.status, reopened.changed) == (OPEN, True)
        assert 0 < reopened.retry_after <= 30
        assert not bv.probe(name, "t1").probe
        assert bv.state(name).status is OPEN

    # -- listing ------------------------------------------------------------------------------

    def test_states_lists_breakers_with_records_by_name(self, bv: BreakerView) -> None:
        """states() has every breaker with a record (here: one closed with failures, one
        open) and not one that has none; limit bounds the answer."""
        counting, opened, none = bv.name("counting"), bv.name("opened"), bv.name("none")
        bv.fail(counting)
        bv.open(opened)
        listed = bv.states()
        assert listed[counting].status is CLOSED
        assert listed[counting].failures == 1
        assert listed[opened].status is OPEN
        assert none not in listed
        assert len(bv.states(limit=1)) <= 1

    # -- concurrency --------------------------------------------------------------------------

    def test_concurrent_failures_open_it_exactly_once(self, bv: BreakerView) -> None:
        """Racing failures (threads or tasks) past the threshold: one reply opened it."""
        name = bv.name()
        replies = bv.concurrently(
            "record_failure",
            [(name,)] * bv.concurrency,
            threshold=3,
            window=LONG,
            open_for=LONG,
        )
        assert sum(1 for r in replies if r.changed) == 1
        assert bv.state(name).status is OPEN

    def test_concurrent_probe_requests_grant_exactly_one(self, bv: BreakerView) -> None:
        """Racing try_probe with different tokens: exactly one is granted."""
        name = self._half_open(bv)
        tokens = [(name, f"t{i}") for i in range(bv.concurrency)]
        replies = bv.concurrently("try_probe", tokens, lease=LONG)
        assert sum(1 for r in replies if r.probe) == 1

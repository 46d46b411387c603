"""The dead-letter store contract as a pytest base class, for every store, ours or not.

Subclass :class:`DeadLetterStoreContract` in a ``Test...`` class and give it a
``dead_letter_store`` fixture::

    import pytest
    from idempotask.testing import DeadLetterStoreContract

    class TestMyDeadLetters(DeadLetterStoreContract):
        @pytest.fixture
        def dead_letter_store(self) -> MyDeadLetterStore:
            return MyDeadLetterStore("mystore://localhost")

Every test runs twice, through the sync methods and through the ``a``-prefixed ones on
an event loop (:class:`DeadLetterView` hides which). Letters carry ids and function names
unique to the test, and every query, claim, stats and purge the suite makes is restricted
to them, so a shared server needs no cleaning and tests may run in parallel. The store
must implement :class:`~idempotask.backends.deadletters.DeadLetterStore` and the test-only
``expire_claim(id)`` hook (:class:`~idempotask.backends.deadletters.SupportsExpireClaim`).
One test sleeps about 1.2 s to see a real claim lease run out; set
``real_time_tests = False`` on the subclass to skip it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar, cast

import pytest

from idempotask.backends.deadletters import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStore,
    StatRow,
    Status,
    SupportsExpireClaim,
)
from idempotask.errors import ConfigurationError
from idempotask.flow import Flow, Op, store_op
from idempotask.testing.views import Mode, _check_mode, _View

__all__ = [
    "T0",
    "AsyncDeadLetterView",
    "DeadLetterStoreContract",
    "DeadLetterView",
    "SyncDeadLetterView",
    "open_dead_letter_view",
]

#: The wall-clock time the contract's letters failed at; tests count from it.
T0 = 1_700_000_000.0
#: A claim lease that never runs out on its own during a test.
LONG_LEASE = 600.0


class DeadLetterView(_View):
    """A dead-letter store as plain synchronous calls, scoped to one test.

    :meth:`letter` builds letters whose ``id`` and ``function`` start with this view's
    unique prefix. ``query``, ``claim_due``, ``stats`` and ``purge`` called without a
    filter are restricted to the functions this view made (:meth:`scope`); given a filter,
    the view narrows it to them too. :meth:`close` purges them.
    """

    #: How many concurrent claimers :meth:`claim_concurrently` races by default.
    concurrency: int

    def __init__(self, store: DeadLetterStore, *, prefix: str | None = None) -> None:
        if not isinstance(store, SupportsExpireClaim):
            raise TypeError(
                f"{type(store).__qualname__} has no expire_claim(id) method; the dead-letter "
                "conformance suite needs it to end a claim's lease on the store's own clock "
                "(see idempotask.backends.deadletters.SupportsExpireClaim)"
            )
        self.store = self._expirer = store
        super().__init__(store, f"dlt-{uuid.uuid4().hex[:12]}-" if prefix is None else prefix)

    def function(self, name: str = "fn") -> str:
        """A function name unique to this view."""
        return self._unique(name)

    def letter(self, name: str = "", *, function: str = "fn", **fields: Any) -> DeadLetter:
        """A letter (not yet added) with a unique id; ``fields`` override the defaults."""
        values: dict[str, Any] = {
            "kind": "transient",
            "error_type": "builtins.ConnectionError",
            "message": "connection refused",
            "traceback": "Traceback (most recent call last):\n  ...\nConnectionError\n",
            "arguments": b'{"order": 7}',
            "attempts": 1,
            "status": Status.PENDING,
            "first_failed_at": T0,
            "last_failed_at": T0,
            "next_retry_at": T0 + 60,
        }
        values.update(fields)
        letter_id = self.prefix + (name or uuid.uuid4().hex[:10])
        return DeadLetter(id=letter_id, function=self.function(function), **values)

    def scope(self, base: DeadLetterFilter | None = None) -> DeadLetterFilter:
        """``base`` (default: everything) narrowed to this view's functions."""
        base = base or DeadLetterFilter()
        mine = tuple(sorted(self._names))
        functions = tuple(f for f in base.function if f in self._names) if base.function else mine
        # An empty tuple would mean "all"; a name no letter has means "none of them".
        return DeadLetterFilter(
            status=base.status,
            kind=base.kind,
            function=functions or (self.prefix + "<none>",),
            since=base.since,
            until=base.until,
        )

    def expire_claim(self, id: str) -> bool:
        """Run the store's test hook: the claim on ``id`` runs out now."""
        return self._expirer.expire_claim(id)

    def add(self, letter: DeadLetter) -> DeadLetter:
        """``add`` / ``aadd``."""
        return cast(DeadLetter, self._call("add", letter))

    def get(self, id: str) -> DeadLetter | None:
        """``get`` / ``aget``."""
        return cast("DeadLetter | None", self._call("get", id))

    def update(
        self, id: str, version: int, *, unless_claimed: bool = False, **changes: Any
    ) -> DeadLetter | None:
        """``update`` / ``aupdate`` (``unless_claimed`` is passed on only when true, so a
        plain update is the call every store has always taken)."""
        if unless_claimed:
            changes["unless_claimed"] = True
        return cast("DeadLetter | None", self._call("update", id, version, **changes))

    def query(
        self, filter: DeadLetterFilter | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """``query`` / ``aquery`` within :meth:`scope`."""
        found = self._call("query", self.scope(filter), limit=limit, offset=offset)
        return cast("list[DeadLetter]", found)

    def claim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = LONG_LEASE,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]:
        """``claim_due`` / ``aclaim_due`` within :meth:`scope`."""
        found = self._call("claim_due", now, limit=limit, lease=lease, filter=self.scope(filter))
        return cast("list[DeadLetter]", found)

    def stats(self, filter: DeadLetterFilter | None = None) -> list[StatRow]:
        """``stats`` / ``astats`` within :meth:`scope`."""
        return cast("list[StatRow]", self._call("stats", self.scope(filter)))

    def purge(self, filter: DeadLetterFilter | None = None) -> int:
        """``purge`` / ``apurge`` within :meth:`scope`."""
        return cast(int, self._call("purge", self.scope(filter)))

    def claim_concurrently(
        self, now: float, *, claimers: int, limit: int, lease: float = LONG_LEASE
    ) -> list[list[DeadLetter]]:
        """Race ``claimers`` callers (threads released together by a barrier, or tasks
        gathered on the loop), each claiming until nothing is left; what each got."""
        scope = self.scope()

        def claimer() -> Flow[list[DeadLetter]]:
            got: list[DeadLetter] = []
            claim = store_op(self.store, "claim_due", now, limit=limit, lease=lease, filter=scope)
            while batch := (yield claim):
                got.extend(batch)
                yield Op(time.sleep, asyncio.sleep, 0)  # let the other claimers interleave
            return got

        return self._run_all([claimer() for _ in range(claimers)])

    def close(self) -> None:
        """Purge this view's letters (best effort), then close its event loop, if any."""
        if self._names:
            with contextlib.suppress(Exception):
                self.store.purge(self.scope())
        self._close_loop(aclose=False)


class SyncDeadLetterView(DeadLetterView):
    """Exercises the store's sync methods; concurrency is real threads."""

    mode: Mode = "sync"
    concurrency = 8


class AsyncDeadLetterView(DeadLetterView):
    """Exercises the ``a``-prefixed coroutines on an event loop this view owns."""

    mode: Mode = "async"
    concurrency = 20
    loop: asyncio.AbstractEventLoop


def open_dead_letter_view(
    store: DeadLetterStore, mode: Mode, *, prefix: str | None = None
) -> DeadLetterView:
    """A :class:`SyncDeadLetterView` or :class:`AsyncDeadLetterView`; close it when done."""
    view = SyncDeadLetterView if _check_mode(mode) == "sync" else AsyncDeadLetterView
    return view(store, prefix=prefix)


def _fields(letter: DeadLetter) -> dict[str, Any]:
    return {f.name: getattr(letter, f.name) for f in dataclasses.fields(letter)}


def _same(got: DeadLetter | None, want: DeadLetter, **expected_changes: Any) -> None:
    """Assert ``got`` is ``want`` with ``expected_changes``; times compared to 1 µs."""
    assert got is not None, f"expected letter {want.id!r}, got none"
    expected = {**_fields(want), **expected_changes}
    actual = _fields(got)
    for name in ("first_failed_at", "last_failed_at", "next_retry_at"):
        a, e = actual.pop(name), expected.pop(name)
        if e is None:
            assert a is None, f"{name}: expected None, got {a!r}"
        else:
            assert a == pytest.approx(e, abs=1e-6), f"{name}: expected {e!r}, got {a!r}"
    assert actual == expected
    assert isinstance(got.status, Status), f"status must come back a Status, got {got.status!r}"


def _ids(letters: list[DeadLetter]) -> list[str]:
    return [x.id for x in letters]


class DeadLetterStoreContract:
    """Conformance tests for a :class:`~idempotask.backends.deadletters.DeadLetterStore`.

    Subclass it in a ``Test...`` class with a ``dead_letter_store`` fixture returning the
    store under test. Each test receives ``dl``, a :class:`DeadLetterView` of that store,
    once through the sync methods and once through the async ones.
    """

    #: Run the one test that sleeps (~1.2 s) to see a real claim lease run out.
    real_time_tests: ClassVar[bool] = True

    @pytest.fixture(params=["sync", "async"])
    def dl(
        self, request: pytest.FixtureRequest, dead_letter_store: DeadLetterStore
    ) -> Iterator[DeadLetterView]:
        """The store under test through its sync or its async methods."""
        with contextlib.closing(open_dead_letter_view(dead_letter_store, request.param)) as view:
            yield view

    # -- add / get -----------------------------------------------------------------------

    def test_store_satisfies_the_protocol(self, dead_letter_store: DeadLetterStore) -> None:
        """The store is a DeadLetterStore and has the expire_claim test hook."""
        assert isinstance(dead_letter_store, DeadLetterStore)
        assert isinstance(dead_letter_store, SupportsExpireClaim)

    def test_add_then_get_round_trips_every_field(self, dl: DeadLetterView) -> None:
        """Every field comes back as written: odd bytes, unicode, long text, None and floats."""
        letter = dl.letter(
            "full",
            kind="external",
            error_type="billing.errors.Declined",
            message="déclinée 💳 \x00 'quoted' \"double\" %_*",
            traceback="Traceback\n" + "  frame ✓\n" * 5000,
            arguments=bytes(range(256)) * 4,
            key="idempotask:billing.charge:v1:9f86d081884c7d65",
            attempts=3,
            status=Status.RETRYING,
            first_failed_at=T0 + 0.125,
            last_failed_at=T0 + 3600.5,
            next_retry_at=T0 + 7200.25,
            route="celery",
            critical=True,
            resolution="",
        )
        stored = dl.add(letter)
        _same(stored, letter)
        _same(dl.get(letter.id), letter)

    def test_get_of_an_unknown_id_is_none(self, dl: DeadLetterView) -> None:
        """An id never added reads as None."""
        assert dl.get(dl.prefix + "missing") is None

    def test_a_letter_without_next_retry_or_arguments_round_trips(self, dl: DeadLetterView) -> None:
        """next_retry_at None, empty arguments, traceback and key survive as themselves."""
        letter = dl.letter(
            "bare",
            arguments=b"",
            traceback="",
            key="",
            next_retry_at=None,
            status=Status.ABANDONED,
        )
        dl.add(letter)
        _same(dl.get(letter.id), letter)

    def test_adding_an_existing_id_changes_nothing(self, dl: DeadLetterView) -> None:
        """A second add of the same id (a spool delivered twice) returns the stored letter."""
        first = dl.letter("dup", message="first")
        dl.add(first)
        again = dl.add(first.evolve(message="second", attempts=9))
        _same(again, first)
        _same(dl.get(first.id), first)
        assert len(dl.query()) == 1

    # -- query ---------------------------------------------------------------------------

    def test_query_filters_by_status_kind_and_function(self, dl: DeadLetterView) -> None:
        """Each filter field narrows; several values in one field mean any of them."""
        a = dl.add(dl.letter("a", function="charge", kind="transient", status=Status.PENDING))
        b = dl.add(dl.letter("b", function="charge", kind="permanent", status=Status.ABANDONED))
        c = dl.add(dl.letter("c", function="refund", kind="transient", status=Status.RESOLVED))
        d = dl.add(dl.letter("d", function="refund", kind="external", status=Status.RETRYING))

        def ids(**filter: Any) -> set[str]:
            return set(_ids(dl.query(DeadLetterFilter(**filter))))

        assert ids() == {a.id, b.id, c.id, d.id}
        assert ids(status=(Status.PENDING,)) == {a.id}
        assert ids(status=(Status.PENDING, Status.RETRYING)) == {a.id, d.id}
        assert ids(kind=("transient",)) == {a.id, c.id}
        assert ids(kind=("external", "permanent")) == {b.id, d.id}
        assert ids(function=(a.function,)) == {a.id, b.id}
        assert ids(function=(c.function,), kind=("transient",)) == {c.id}
        assert ids(status=(Status.RESOLVED,), kind=("permanent",)) == set()

    def test_query_time_bounds_are_since_inclusive_until_exclusive(
        self, dl: DeadLetterView
    ) -> None:
        """since and until bound last_failed_at: since <= t < until."""
        letters = [dl.add(dl.letter(f"t{i}", last_failed_at=T0 + i)) for i in range(5)]
        got = dl.query(DeadLetterFilter(since=T0 + 1, until=T0 + 3))
        assert set(_ids(got)) == {letters[1].id, letters[2].id}
        assert set(_ids(dl.query(DeadLetterFilter(since=T0 + 4)))) == {letters[4].id}
        assert set(_ids(dl.query(DeadLetterFilter(until=T0 + 1)))) == {letters[0].id}

    def test_query_lists_newest_failure_first_ties_by_id(self, dl: DeadLetterView) -> None:
        """Order: last_failed_at descending, then id ascending."""
        dl.add(dl.letter("m", last_failed_at=T0 + 5))
        dl.add(dl.letter("z", last_failed_at=T0 + 9))
        dl.add(dl.letter("b", last_failed_at=T0 + 5))
        dl.add(dl.letter("a", last_failed_at=T0 + 1))
        assert _ids(dl.query()) == [dl.prefix + n for n in ("z", "b", "m", "a")]

    def test_query_pages_are_complete_and_disjoint(self, dl: DeadLetterView) -> None:
        """limit/offset pages, walked to the end, give every letter exactly once, in order."""
        for i in range(11):
            dl.add(dl.letter(f"p{i:02d}", last_failed_at=T0 + i % 4))
        everything = _ids(dl.query(limit=1000))
        pages: list[str] = []
        for offset in range(0, 15, 4):
            pages.extend(_ids(dl.query(limit=4, offset=offset)))
        assert pages == everything
        assert len(everything) == 11
        assert _ids(dl.query(limit=3)) == everything[:3]
        assert dl.query(limit=5, offset=11) == []

    # -- update --------------------------------------------------------------------------

    def test_update_with_the_current_version_applies_and_bumps_it(self, dl: DeadLetterView) -> None:
        """A compare-and-set with the right version applies every mutable field."""
        letter = dl.add(dl.letter("u"))
        changes: dict[str, Any] = {
            "kind": "external",
            "error_type": "builtins.TimeoutError",
            "message": "timed out",
            "traceback": "tb2",
            "attempts": 2,
            "status": Status.RETRYING,
            "last_failed_at": T0 + 100,
            "next_retry_at": T0 + 500,
            "resolution": "",
        }
        updated = dl.update(letter.id, letter.version, **changes)
        _same(updated, letter, version=letter.version + 1, **changes)
        _same(dl.get(letter.id), letter, version=letter.version + 1, **changes)
        cleared = dl.update(letter.id, letter.version + 1, next_retry_at=None)
        _same(cleared, letter, version=letter.version + 2, **{**changes, "next_retry_at": None})

    def test_update_with_a_stale_version_returns_none_and_changes_nothing(
        self, dl: DeadLetterView
    ) -> None:
        """Two writers read version v; the second compare-and-set loses."""
        letter = dl.add(dl.letter("cas"))
        assert dl.update(letter.id, letter.version, status=Status.RESOLVED, resolution="manual")
        assert dl.update(letter.id, letter.version, status=Status.ABANDONED) is None
        assert dl.update(letter.id, letter.version + 5, status=Status.ABANDONED) is None
        _same(
            dl.get(letter.id),
            letter,
            status=Status.RESOLVED,
            resolution="manual",
            version=letter.version + 1,
        )

    def test_update_of_an_unknown_id_returns_none(self, dl: DeadLetterView) -> None:
        """Nothing to compare against: None, and nothing is created."""
        assert dl.update(dl.prefix + "ghost", 0, attempts=2) is None
        assert dl.get(dl.prefix + "ghost") is None

    @pytest.mark.parametrize(
        "field", ["function", "arguments", "key", "first_failed_at", "route", "critical"]
    )
    def test_update_refuses_fixed_fields(self, dl: DeadLetterView, field: str) -> None:
        """Fields fixed at add time are refused with ConfigurationError, nothing changes."""
        letter = dl.add(dl.letter("fixed"))
        with pytest.raises(ConfigurationError, match=field):
            dl.update(letter.id, letter.version, **{field: getattr(letter, field)}, attempts=5)
        _same(dl.get(letter.id), letter)

    @pytest.mark.parametrize(
        "change",
        [{"attempts": "3"}, {"next_retry_at": "soon"}, {"message": 5}, {"history": "x"}],
        ids=["attempts", "next_retry_at", "message", "history"],
    )
    def test_update_refuses_badly_typed_values(
        self, dl: DeadLetterView, change: dict[str, Any]
    ) -> None:
        """A value of the wrong type is refused with ConfigurationError, nothing changes
        (a store must not keep what it cannot give back as a DeadLetter)."""
        letter = dl.add(dl.letter("typed"))
        with pytest.raises(ConfigurationError, match=next(iter(change))):
            dl.update(letter.id, letter.version, **change)
        _same(dl.get(letter.id), letter)

    def test_update_without_changes_still_bumps_the_version(self, dl: DeadLetterView) -> None:
        """An empty update is a valid compare-and-set (processors use it to release a claim)."""
        letter = dl.add(dl.letter("noop"))
        _same(dl.update(letter.id, letter.version), letter, version=letter.version + 1)

    # -- claim_due -----------------------------------------------------------------------

    def test_claim_due_takes_only_open_due_letters(self, dl: DeadLetterView) -> None:
        """Open (PENDING/RETRYING) with next_retry_at <= now: claimed; anything else: not."""
        now = T0 + 100
        due = [
            dl.add(dl.letter("due-pending", next_retry_at=now - 50)),
            dl.add(dl.letter("due-retrying", status=Status.RETRYING, next_retry_at=now - 10)),
            dl.add(dl.letter("due-exactly-now", next_retry_at=now)),
        ]
        dl.add(dl.letter("future", next_retry_at=now + 0.5))
        dl.add(dl.letter("never", next_retry_at=None))
        dl.add(dl.letter("resolved", status=Status.RESOLVED, next_retry_at=now - 50))
        dl.add(dl.letter("abandoned", status=Status.ABANDONED, next_retry_at=now - 50))
        claimed = dl.claim_due(now)
        assert sorted(_ids(claimed)) == sorted(_ids(due))
        for letter in claimed:
            original = next(x for x in due if x.id == letter.id)
            _same(letter, original, version=original.version + 1)
            _same(dl.get(letter.id), original, version=original.version + 1)

    def test_claim_due_serves_the_most_overdue_first_up_to_limit(self, dl: DeadLetterView) -> None:
        """Earliest next_retry_at first (ties by id), at most ``limit`` per claim."""
        for name, at in [("c", 30), ("a", 10), ("d", 10), ("b", 20)]:
            dl.add(dl.letter(name, next_retry_at=T0 + at))
        first = dl.claim_due(T0 + 100, limit=2)
        assert _ids(first) == [dl.prefix + "a", dl.prefix + "d"]
        second = dl.claim_due(T0 + 100, limit=5)
        assert _ids(second) == [dl.prefix + "b", dl.prefix + "c"]
        assert dl.claim_due(T0 + 100, limit=5) == []

    def test_claim_due_honours_its_filter(self, dl: DeadLetterView) -> None:
        """A processor can claim only some functions or kinds."""
        a = dl.add(dl.letter("a", function="charge", kind="transient", next_retry_at=T0))
        dl.add(dl.letter("b", function="refund", kind="transient", next_retry_at=T0))
        dl.add(dl.letter("c", function="charge", kind="external", next_retry_at=T0))
        only = DeadLetterFilter(function=(a.function,), kind=("transient",))
        assert _ids(dl.claim_due(T0 + 1, filter=only)) == [a.id]
        assert len(dl.claim_due(T0 + 1)) == 2

    def test_a_claimed_letter_is_not_claimed_again_within_its_lease(
        self, dl: DeadLetterView
    ) -> None:
        """While a claim holds, other processors do not get the letter."""
        letter = dl.add(dl.letter("held", next_retry_at=T0))
        assert _ids(dl.claim_due(T0 + 1)) == [letter.id]
        assert dl.claim_due(T0 + 1) == []
        assert dl.claim_due(T0 + 10_000) == []

    def test_an_unreleased_claim_becomes_claimable_after_its_lease(
        self, dl: DeadLetterView
    ) -> None:
        """A processor that crashed holding a claim does not hold the letter forever."""
        letter = dl.add(dl.letter("crashed", next_retry_at=T0))
        first = dl.claim_due(T0 + 1)
        assert dl.expire_claim(letter.id) is True
        again = dl.claim_due(T0 + 1)
        assert _ids(again) == [letter.id]
        assert again[0].version == first[0].version + 1
        assert dl.expire_claim(dl.prefix + "never-claimed") is False

    def test_update_ends_the_claim(self, dl: DeadLetterView) -> None:
        """A holder's update (even an empty one) releases the letter at once."""
        letter = dl.add(dl.letter("release", next_retry_at=T0))
        (claimed,) = dl.claim_due(T0 + 1)
        released = dl.update(claimed.id, claimed.version)
        assert released is not None
        assert _ids(dl.claim_due(T0 + 1)) == [letter.id]

    def test_update_unless_claimed_is_refused_while_a_claim_is_live(
        self, dl: DeadLetterView
    ) -> None:
        """A person's "retry now" cannot end the claim of a replay that is running: the
        letter stays as it is, still held (no other processor can claim it)."""
        dl.add(dl.letter("replaying", next_retry_at=T0))
        (claimed,) = dl.claim_due(T0 + 1)
        refused = dl.update(
            claimed.id, claimed.version, unless_claimed=True, next_retry_at=T0, attempts=2
        )
        assert refused is None
        _same(dl.get(claimed.id), claimed)
        assert dl.claim_due(T0 + 1) == []
        done = dl.update(claimed.id, claimed.version, status=Status.RESOLVED, resolution="retry")
        assert done is not None, "the holder's own update still applies"

    def test_update_unless_claimed_applies_when_no_claim_is_live(self, dl: DeadLetterView) -> None:
        """Never claimed, or the claim ran out: the update applies, and a stale version
        still loses."""
        never = dl.add(dl.letter("never-claimed", next_retry_at=T0))
        updated = dl.update(never.id, never.version, unless_claimed=True, next_retry_at=T0 + 5)
        _same(updated, never, version=never.version + 1, next_retry_at=T0 + 5)
        assert dl.update(never.id, never.version, unless_claimed=True, attempts=3) is None

        letter = dl.add(dl.letter("claim-ran-out", next_retry_at=T0))
        (claimed,) = dl.claim_due(T0 + 1)
        assert dl.expire_claim(letter.id) is True
        reopened = dl.update(claimed.id, claimed.version, unless_claimed=True, attempts=2)
        _same(reopened, claimed, version=claimed.version + 1, attempts=2)
        assert _ids(dl.claim_due(T0 + 1)) == [letter.id]

    def test_a_plain_update_still_ends_a_live_claim(self, dl: DeadLetterView) -> None:
        """Without ``unless_claimed`` the update applies over a live claim and ends it."""
        letter = dl.add(dl.letter("plain", next_retry_at=T0))
        (claimed,) = dl.claim_due(T0 + 1)
        updated = dl.update(claimed.id, claimed.version, attempts=2)
        _same(updated, claimed, version=claimed.version + 1, attempts=2)
        assert _ids(dl.claim_due(T0 + 1)) == [letter.id]

    def test_claiming_bumps_the_version_so_a_stale_writer_loses(self, dl: DeadLetterView) -> None:
        """A writer holding the pre-claim version cannot overwrite a claimed letter."""
        letter = dl.add(dl.letter("stale", next_retry_at=T0))
        (claimed,) = dl.claim_due(T0 + 1)
        assert dl.update(letter.id, letter.version, status=Status.RESOLVED) is None
        done = dl.update(claimed.id, claimed.version, status=Status.RESOLVED, resolution="retry")
        assert done is not None
        assert done.status is Status.RESOLVED

    def test_concurrent_claimers_never_get_the_same_letter(self, dl: DeadLetterView) -> None:
        """Racing claimers (8 threads or 20 tasks) split the due letters with no overlap."""
        letters = [dl.add(dl.letter(f"race{i:02d}", next_retry_at=T0 + i)) for i in range(40)]
        got = dl.claim_concurrently(T0 + 100, claimers=dl.concurrency, limit=3)
        everything = [x.id for batch in got for x in batch]
        duplicates = [id for id, n in Counter(everything).items() if n > 1]
        assert duplicates == [], f"letters claimed twice: {duplicates}"
        assert sorted(everything) == sorted(_ids(letters))

    def test_a_real_claim_lease_runs_out_on_the_store_clock(
        self, dead_letter_store: DeadLetterStore
    ) -> None:
        """A 1 s lease, not renewed, lets another processor claim the letter after ~1 s."""
        if not self.real_time_tests:
            pytest.skip("real_time_tests = False")
        with contextlib.closing(SyncDeadLetterView(dead_letter_store)) as view:
            letter = view.add(view.letter("real", next_retry_at=T0))
            assert _ids(view.claim_due(T0 + 1, lease=1.0)) == [letter.id]
            assert view.claim_due(T0 + 1, lease=1.0) == []
            time.sleep(1.2)
            assert _ids(view.claim_due(T0 + 1, lease=1.0)) == [letter.id]

    # -- stats / purge -------------------------------------------------------------------

    def test_stats_count_by_function_kind_and_status_and_add_up(self, dl: DeadLetterView) -> None:
        """Rows group letters exactly; retries sum attempts-1; resolved_by_retry counts."""
        specs = [
            ("charge", "transient", Status.PENDING, 1, ""),
            ("charge", "transient", Status.PENDING, 1, ""),
            ("charge", "transient", Status.RETRYING, 3, ""),
            ("charge", "transient", Status.RESOLVED, 2, "retry"),
            ("charge", "transient", Status.RESOLVED, 1, "manual"),
            ("charge", "permanent", Status.ABANDONED, 1, ""),
            ("refund", "external", Status.RESOLVED, 4, "retry"),
            ("refund", "external", Status.RESOLVED, 1, "completed"),
        ]
        for i, (function, kind, status, attempts, resolution) in enumerate(specs):
            dl.add(
                dl.letter(
                    f"s{i}",
                    function=function,
                    kind=kind,
                    status=status,
                    attempts=attempts,
                    resolution=resolution,
                )
            )
        charge, refund = dl.function("charge"), dl.function("refund")
        rows = dl.stats()
        assert rows == [
            StatRow(charge, "permanent", Status.ABANDONED, 1, 0, 0),
            StatRow(charge, "transient", Status.PENDING, 2, 0, 0),
            StatRow(charge, "transient", Status.RESOLVED, 2, 1, 1),
            StatRow(charge, "transient", Status.RETRYING, 1, 2, 0),
            StatRow(refund, "external", Status.RESOLVED, 2, 3, 1),
        ]
        assert all(isinstance(row.status, Status) for row in rows)
        assert sum(row.count for row in rows) == len(specs) == len(dl.query())
        assert dl.stats(DeadLetterFilter(kind=("external",))) == [rows[-1]]

    def test_stats_respect_the_time_window(self, dl: DeadLetterView) -> None:
        """stats(filter) counts only letters whose last failure is in the window."""
        dl.add(dl.letter("old", last_failed_at=T0 - 90_000))
        dl.add(dl.letter("new", last_failed_at=T0))
        (row,) = dl.stats(DeadLetterFilter(since=T0 - 86_400))
        assert row.count == 1

    def test_purge_deletes_only_matching_letters(self, dl: DeadLetterView) -> None:
        """purge returns how many went; the others stay untouched."""
        old = dl.add(dl.letter("old", status=Status.RESOLVED, last_failed_at=T0 - 100))
        dl.add(dl.letter("old-open", status=Status.PENDING, last_failed_at=T0 - 100))
        dl.add(dl.letter("new", status=Status.RESOLVED, last_failed_at=T0))
        gone = dl.purge(DeadLetterFilter(status=(Status.RESOLVED,), until=T0 - 50))
        assert gone == 1
        assert dl.get(old.id) is None
        assert sorted(_ids(dl.query())) == [dl.prefix + "new", dl.prefix + "old-open"]
        assert dl.purge(DeadLetterFilter(status=(Status.RESOLVED,), until=T0 - 50)) == 0
        assert dl.purge() == 2
        assert dl.query() == []

"""The overview's figures, computed in the background and shared by every viewer.

Counting letters by status, kind and function means reading every letter on Redis (a
sorted-set walk, 2 s for 100,000 letters) and a ``GROUP BY`` over the table on SQL. So
the overview is a *snapshot*: one thread at a time computes it with the stores' public
calls, every page and every poll renders the latest one (in milliseconds, whatever the
queue holds), and a snapshot older than ``refresh`` seconds starts the next computation.
However many browsers poll, the stores do one count at a time, and never more often
than every four times as long as the last count took -- the dashboard stays a small
fraction of the store's work. A page that finds no snapshot yet waits a quarter of a
second for the first, then shows "counting" and fills in by itself.

One count is one pass over the letters, cut into time segments at every hour of the
past 24 and every UTC day of the past 7: each segment is one ``stats(filter)`` of the
dead-letter store, and its rows add up into the totals, the hourly and the daily chart
at once (a Redis walk of each range, an index range on SQL).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from idempotask.backends.base import (
    BreakerState,
    BreakerStore,
    DeadLetterFilter,
    DeadLetterStore,
    StatRow,
    Status,
)
from idempotask.spool import Spool

__all__ = ["Bucket", "Health", "OverviewCache", "Snapshot", "Totals", "compute"]

log = logging.getLogger("idempotask.web")

HOUR, DAY = 3600.0, 86400.0


@dataclass
class Bucket:
    """Letters whose last failure falls in ``[start, end)``, counted by kind."""

    start: float
    end: float
    by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Every letter of the bucket."""
        return sum(self.by_kind.values())


@dataclass(frozen=True)
class Health:
    """Whether the idempotency store answers, how fast, and what it warns about."""

    reachable: bool
    latency_ms: float | None
    error: str = ""
    warning: str = ""


@dataclass(frozen=True)
class Snapshot:
    """Everything the overview shows, as of ``taken_at`` (computing it took ``took``)."""

    taken_at: float
    took: float
    total: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    matrix: dict[tuple[str, str], int] = field(default_factory=dict)
    by_function: dict[str, int] = field(default_factory=dict)
    open_by_function: dict[str, int] = field(default_factory=dict)
    retries_failed: int = 0
    retries_succeeded: int = 0
    hourly: tuple[Bucket, ...] = ()
    daily: tuple[Bucket, ...] = ()
    letters_error: str = ""
    breakers: dict[str, BreakerState] = field(default_factory=dict)
    breakers_error: str = ""
    spool_path: str = ""
    spool_backlog: int = 0
    spool_error: str = ""
    health: Health | None = None

    @property
    def functions(self) -> list[str]:
        """Every function with letters, most letters first."""
        return sorted(self.by_function, key=lambda f: (-self.by_function[f], f))


def boundaries(now: float) -> tuple[list[float], list[float]]:
    """The starts of the 24 hourly buckets (the last one is the current hour) and of the
    7 daily ones (UTC days, the last one today)."""
    hour = math.floor(now / HOUR) * HOUR
    day = math.floor(now / DAY) * DAY
    return [hour - HOUR * i for i in range(23, -1, -1)], [day - DAY * i for i in range(6, -1, -1)]


def _segments(now: float) -> list[tuple[float | None, float | None]]:
    hours, days = boundaries(now)
    cuts = sorted(set(hours) | set(days))
    segments: list[tuple[float | None, float | None]] = [(None, cuts[0])]
    segments += list(itertools.pairwise(cuts))
    segments.append((cuts[-1], None))
    return segments


def _bucket_of(buckets: list[Bucket], start: float | None) -> Bucket | None:
    if start is None:
        return None
    for bucket in reversed(buckets):
        if bucket.start <= start:
            return bucket
    return None


@dataclass
class Totals:
    """Counts added up over the segments of one pass."""

    total: int = 0
    by_status: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in Status})
    by_kind: dict[str, int] = field(default_factory=dict)
    matrix: dict[tuple[str, str], int] = field(default_factory=dict)
    by_function: dict[str, int] = field(default_factory=dict)
    open_by_function: dict[str, int] = field(default_factory=dict)
    retries_failed: int = 0
    retries_succeeded: int = 0

    def add(self, rows: list[StatRow], *buckets: Bucket | None) -> None:
        """Count ``rows`` here and in each of ``buckets``."""
        for row in rows:
            status = Status(row.status).value
            self.total += row.count
            self.by_status[status] = self.by_status.get(status, 0) + row.count
            self.by_kind[row.kind] = self.by_kind.get(row.kind, 0) + row.count
            cell = (status, row.kind)
            self.matrix[cell] = self.matrix.get(cell, 0) + row.count
            self.by_function[row.function] = self.by_function.get(row.function, 0) + row.count
            if status in (Status.PENDING.value, Status.RETRYING.value):
                opened = self.open_by_function.get(row.function, 0) + row.count
                self.open_by_function[row.function] = opened
            self.retries_failed += row.retries
            self.retries_succeeded += row.resolved_by_retry
            for bucket in buckets:
                if bucket is not None:
                    bucket.by_kind[row.kind] = bucket.by_kind.get(row.kind, 0) + row.count


def _error(exc: BaseException, scrub: Callable[[str], str]) -> str:
    return scrub(f"{type(exc).__name__}: {exc}")


def compute(
    letters: DeadLetterStore,
    breakers: BreakerStore | None,
    health: Callable[[], Health] | None,
    spool_path: Callable[[], str],
    *,
    now: float,
    scrub: Callable[[str], str] = str,
) -> Snapshot:
    """One snapshot (see the module docstring); a store that fails is reported in its
    part of the snapshot, never raised."""
    started = time.perf_counter()
    hours, days = boundaries(now)
    hourly = [Bucket(s, s + HOUR) for s in hours]
    daily = [Bucket(s, s + DAY) for s in days]
    totals = Totals()
    letters_error = ""
    try:
        for since, until in _segments(now):
            rows = letters.stats(DeadLetterFilter(since=since, until=until))
            totals.add(rows, _bucket_of(hourly, since), _bucket_of(daily, since))
    except Exception as exc:
        letters_error = _error(exc, scrub)
    states: dict[str, BreakerState] = {}
    breakers_error = ""
    if breakers is not None:
        try:
            states = breakers.states(limit=500)
        except Exception as exc:
            breakers_error = _error(exc, scrub)
    path, backlog, spool_error = "", 0, ""
    try:
        path = spool_path()
        backlog = len(Spool(path).letters())
    except Exception as exc:
        spool_error = _error(exc, scrub)
    return Snapshot(
        taken_at=now,
        took=time.perf_counter() - started,
        hourly=tuple(hourly),
        daily=tuple(daily),
        letters_error=letters_error,
        breakers=states,
        breakers_error=breakers_error,
        spool_path=path,
        spool_backlog=backlog,
        spool_error=spool_error,
        health=health() if health is not None else None,
        total=totals.total,
        by_status=totals.by_status,
        by_kind=totals.by_kind,
        matrix=totals.matrix,
        by_function=totals.by_function,
        open_by_function=totals.open_by_function,
        retries_failed=totals.retries_failed,
        retries_succeeded=totals.retries_succeeded,
    )


class OverviewCache:
    """The latest snapshot, and the one background computation of the next.

    ``make`` computes a snapshot (in a daemon thread, with the stores' sync calls);
    ``refresh`` is the age after which a snapshot is recomputed, stretched to four times
    the last computation's length when that is longer.
    """

    def __init__(self, make: Callable[[], Snapshot], *, refresh: float) -> None:
        self._make = make
        self.refresh = refresh
        self._lock = threading.Lock()
        self._current: Snapshot | None = None
        self._running: threading.Event | None = None
        self._due = 0.0

    def _start(self) -> threading.Event:
        with self._lock:
            if self._running is not None:
                return self._running
            done = self._running = threading.Event()
        thread = threading.Thread(target=self._run, args=(done,), daemon=True)
        thread.name = "idempotask-web-overview"
        thread.start()
        return done

    def _run(self, done: threading.Event) -> None:
        started = time.monotonic()
        try:
            snapshot = self._make()
        except Exception:  # compute() reports store failures itself; this is a bug
            log.exception("idempotask.web: computing the overview failed")
            snapshot = None
        took = time.monotonic() - started
        with self._lock:
            if snapshot is not None:
                self._current = snapshot
            self._due = time.monotonic() + max(self.refresh, 4 * took)
            self._running = None
        done.set()

    def peek(self) -> Snapshot | None:
        """The latest snapshot, starting nothing (for pages that only borrow from it)."""
        with self._lock:
            return self._current

    def get(self, *, wait: float = 0.25, fresh: bool = False) -> Snapshot | None:
        """The latest snapshot, starting the next one when it is due (``fresh``: now,
        and wait up to ``wait`` seconds for it). None when none finished yet."""
        with self._lock:
            current = self._current
            due = fresh or current is None or time.monotonic() >= self._due
        if due:
            done = self._start()
            if current is None or fresh:
                done.wait(wait)
                with self._lock:
                    current = self._current
        return current

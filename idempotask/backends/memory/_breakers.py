"""An in-process circuit-breaker store: the reference semantics of the contract."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from idempotask.backends._twins import inline
from idempotask.backends.base import BreakerState, BreakerStatus
from idempotask.backends.memory._common import check_clock, new_lock

__all__ = ["MemoryBreakerStore"]

_BREAKER_CLOSED = BreakerState(BreakerStatus.CLOSED)


@dataclass(slots=True, eq=False)
class _BreakerEntry:
    """One breaker's shared state; times are on the store's clock."""

    failures: int = 0
    window_until: float = -math.inf
    open_until: float | None = None  # None: closed
    probe_until: float = -math.inf
    probe_token: str = ""


class MemoryBreakerStore:
    """An in-process :class:`~idempotask.breaker.BreakerStore`: the reference semantics.

    Every operation is one short critical section under a :class:`threading.Lock` (the
    async twins run them directly). ``clock`` (monotonic seconds) drives windows, open
    periods and probe leases; inject a fake one to test without sleeping. State lives in
    this process only: breakers in other processes do not see it (use
    ``RedisBreakerStore`` for that). It keeps one small entry per breaker name that failed.

    >>> store = MemoryBreakerStore()
    >>> store.record_failure("api", threshold=1, window=60, open_for=30).status.value
    'open'
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        check_clock(clock, "MemoryBreakerStore")
        self._clock = clock
        self._lock = new_lock(self)
        self._entries: dict[str, _BreakerEntry] = {}

    def __repr__(self) -> str:
        return f"MemoryBreakerStore(breakers={len(self._entries)})"

    # -- sync protocol -------------------------------------------------------------------

    def state(self, name: str) -> BreakerState:
        """The breaker's state (read only)."""
        with self._lock:
            return self._view(self._entries.get(name), self._clock())

    def record_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> BreakerState:
        """Count a failure; open at ``threshold`` within ``window``; reopen when half-open."""
        with self._lock:
            now = self._clock()
            entry = self._entries.get(name)
            if entry is not None and entry.open_until is not None:
                if now < entry.open_until:
                    return BreakerState(BreakerStatus.OPEN, retry_after=entry.open_until - now)
                return self._open(entry, now, open_for, failures=0)  # half-open: reopen
            if entry is None:
                entry = self._entries[name] = _BreakerEntry()
            if entry.window_until <= now:
                entry.failures = 0
                entry.window_until = now + window
            entry.failures += 1
            if entry.failures >= threshold:
                return self._open(entry, now, open_for, failures=entry.failures)
            return BreakerState(BreakerStatus.CLOSED, failures=entry.failures)

    def record_success(self, name: str) -> BreakerState:
        """Close a half-open breaker; otherwise nothing changes (see the protocol)."""
        with self._lock:
            now = self._clock()
            entry = self._entries.get(name)
            if entry is not None and entry.open_until is not None and now >= entry.open_until:
                del self._entries[name]
                return BreakerState(BreakerStatus.CLOSED, changed=True)
            return self._view(entry, now)

    def try_probe(self, name: str, token: str, *, lease: float) -> BreakerState:
        """Grant the half-open probe to ``token`` for ``lease`` seconds, if it is free."""
        with self._lock:
            now = self._clock()
            entry = self._entries.get(name)
            if (
                entry is None
                or entry.open_until is None
                or now < entry.open_until
                or (now < entry.probe_until and entry.probe_token != token)
            ):
                return self._view(entry, now)
            entry.probe_until = now + lease
            entry.probe_token = token
            return BreakerState(BreakerStatus.HALF_OPEN, retry_after=lease, probe=True)

    def reset(self, name: str) -> None:
        """Forget the breaker: it is closed with no failures."""
        with self._lock:
            self._entries.pop(name, None)

    def states(self, *, limit: int = 1000) -> dict[str, BreakerState]:
        """Every breaker with a record here (up to ``limit``), by name."""
        with self._lock:
            now = self._clock()
            return {
                name: self._view(entry, now)
                for name, entry in itertools.islice(self._entries.items(), limit)
            }

    # -- async protocol: the same short critical sections ---------------------------------

    astate = inline(state)
    arecord_failure = inline(record_failure)
    arecord_success = inline(record_success)
    atry_probe = inline(try_probe)
    astates = inline(states)
    areset = inline(reset)

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _open(entry: _BreakerEntry, now: float, open_for: float, *, failures: int) -> BreakerState:
        entry.open_until = now + open_for
        entry.failures = 0
        entry.window_until = -math.inf
        entry.probe_until = -math.inf
        entry.probe_token = ""
        return BreakerState(
            BreakerStatus.OPEN, failures=failures, retry_after=open_for, changed=True
        )

    @staticmethod
    def _view(entry: _BreakerEntry | None, now: float) -> BreakerState:
        if entry is None:
            return _BREAKER_CLOSED
        if entry.open_until is None:
            live = entry.failures if entry.window_until > now else 0
            return BreakerState(BreakerStatus.CLOSED, failures=live)
        if now < entry.open_until:
            return BreakerState(BreakerStatus.OPEN, retry_after=entry.open_until - now)
        return BreakerState(BreakerStatus.HALF_OPEN, retry_after=max(0.0, entry.probe_until - now))

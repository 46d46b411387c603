"""An in-process dead-letter store: every letter in a dict, one lock."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from idempotask.backends._letters import (
    ALL,
    check_filter,
    check_page,
    field_value,
    stored,
    sum_stats,
)
from idempotask.backends._twins import inline
from idempotask.backends.base import (
    OPEN_STATUSES,
    DeadLetter,
    DeadLetterFilter,
    StatRow,
    Status,
    check_changes,
)
from idempotask.backends.memory._common import check_clock, new_lock
from idempotask.errors import ConfigurationError

__all__ = ["MemoryDeadLetterStore"]

_WHO = "memory dead-letter store"


def _by_retry(letter: DeadLetter) -> bool:
    return letter.status is Status.RESOLVED and letter.resolution == "retry"


class MemoryDeadLetterStore:
    """An in-process :class:`~idempotask.backends.deadletters.DeadLetterStore`.

    Thread- and asyncio-safe: every operation is one short critical section under a
    :class:`threading.Lock`, and the async methods run the sync ones directly. ``clock``
    (monotonic seconds) measures claim leases; inject a fake one to move past a lease
    without sleeping, or end a claim with :meth:`expire_claim`.

    It is unbounded on purpose: a dead letter is never evicted, only purged (see
    :meth:`idempotask.deadletter.DeadLetterQueue.purge`). Letters live as long as the
    process, and each process has its own: two processor *processes* cannot share it.

    >>> store = MemoryDeadLetterStore()
    >>> store.add(DeadLetter(id="1", function="f", kind="transient", error_type="E",
    ...                      message="boom")).status.value
    'pending'
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        check_clock(clock, "MemoryDeadLetterStore")
        self._clock = clock
        self._lock = new_lock(self)
        self._letters: dict[str, DeadLetter] = {}
        # id -> store-clock time at which a processor's claim runs out.
        self._claims: dict[str, float] = {}

    @classmethod
    def from_url(cls, url: str) -> MemoryDeadLetterStore:
        """Build a store from ``memory://`` (it takes no options)."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "memory" or parts.netloc or parts.path not in ("", "/"):
            raise ConfigurationError(
                f"MemoryDeadLetterStore.from_url: expected 'memory://', got {url!r}"
            )
        if parts.query or parts.fragment:
            raise ConfigurationError(
                f"MemoryDeadLetterStore.from_url: memory:// takes no options, got {url!r}"
            )
        return cls()

    @property
    def size(self) -> int:
        """The number of letters held (a property, so an empty store stays truthy)."""
        return len(self._letters)

    def __repr__(self) -> str:
        return f"MemoryDeadLetterStore(letters={len(self._letters)})"

    # -- sync protocol -------------------------------------------------------------------

    def add(self, letter: DeadLetter) -> DeadLetter:
        """Store ``letter`` unless its id exists; return the stored one."""
        letter = stored(letter, _WHO)
        with self._lock:
            return self._letters.setdefault(letter.id, letter)

    def get(self, id: str) -> DeadLetter | None:
        """The letter with this id, or None."""
        return self._letters.get(id)

    def query(
        self, filter: DeadLetterFilter = ALL, *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """Matching letters, newest ``last_failed_at`` first, ties by id."""
        if not check_page(limit, offset, _WHO):
            return []
        with self._lock:
            found = [x for x in self._letters.values() if filter.matches(x)]
        found.sort(key=lambda x: (-x.last_failed_at, x.id))
        return found[offset : offset + limit]

    def update(
        self, /, id: str, version: int, *, unless_claimed: bool = False, **changes: Any
    ) -> DeadLetter | None:
        """Compare-and-set: apply ``changes`` if the stored version is ``version`` (and,
        with ``unless_claimed``, no processor's claim on the letter is live)."""
        check_changes(changes)
        for field, value in changes.items():  # checked as the other stores check them
            checked = field_value(field, value, _WHO)
            changes[field] = tuple(value) if field == "history" else checked
        with self._lock:
            current = self._letters.get(id)
            if current is None or current.version != version:
                return None
            if unless_claimed and self._claims.get(id, -math.inf) > self._clock():
                return None
            updated = replace(current, **changes, version=version + 1)
            self._letters[id] = updated
            self._claims.pop(id, None)
            return updated

    def claim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]:
        """Take up to ``limit`` due, unclaimed open letters for ``lease`` seconds."""
        if not check_page(limit, 0, _WHO):
            return []
        with self._lock:
            held_until = self._clock()
            due = [
                x
                for x in self._letters.values()
                if x.status in OPEN_STATUSES
                and x.next_retry_at is not None
                and x.next_retry_at <= now
                and self._claims.get(x.id, -math.inf) <= held_until
                and (filter is None or filter.matches(x))
            ]
            due.sort(key=lambda x: (x.next_retry_at, x.id))
            claimed = []
            for letter in due[:limit]:
                letter = replace(letter, version=letter.version + 1)
                self._letters[letter.id] = letter
                self._claims[letter.id] = held_until + lease
                claimed.append(letter)
            return claimed

    def stats(self, filter: DeadLetterFilter = ALL) -> list[StatRow]:
        """Counts by (function, kind, status)."""
        with self._lock:
            letters = [x for x in self._letters.values() if filter.matches(x)]
        return sum_stats(
            (x.function, x.kind, x.status, 1, max(x.attempts - 1, 0), int(_by_retry(x)))
            for x in letters
        )

    def purge(self, filter: DeadLetterFilter) -> int:
        """Delete matching letters; return how many went."""
        check_filter(filter, "purge")
        with self._lock:
            doomed = [id for id, x in self._letters.items() if filter.matches(x)]
            for id in doomed:
                del self._letters[id]
                self._claims.pop(id, None)
            return len(doomed)

    def expire_claim(self, id: str) -> bool:
        """Test hook: end a processor's claim on ``id`` now; True if a live one was there."""
        with self._lock:
            return self._claims.pop(id, -math.inf) > self._clock()

    # -- async protocol: the same short critical sections ---------------------------------

    aadd = inline(add)
    aget = inline(get)
    aquery = inline(query)
    aupdate = inline(update)
    aclaim_due = inline(claim_due)
    astats = inline(stats)
    apurge = inline(purge)

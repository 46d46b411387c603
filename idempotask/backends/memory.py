"""An in-process idempotency store: bounded, thread- and asyncio-safe, with an injectable clock.

It is the default backend and the one tests use. It deduplicates calls made *within one
process* only: every worker process of a pre-fork server (Celery prefork, gunicorn, RQ) has
its own copy, so a duplicate delivered to another worker runs again. The first use in a
forked child says so with a :class:`RuntimeWarning`; use ``redis://`` or a SQL URL there.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from idempotask.backends.base import (
    OPEN_STATUSES,
    BreakerState,
    BreakerStatus,
    DeadLetter,
    DeadLetterFilter,
    Record,
    State,
    StatRow,
    Status,
    check_changes,
)
from idempotask.errors import BackendError, ConfigurationError

__all__ = ["MemoryBackend", "MemoryDeadLetterStore"]

_IN_PROGRESS = State.IN_PROGRESS
_COMPLETED = State.COMPLETED
_FAILED = State.FAILED
_EXPIRED = -math.inf

# The pid of this process, kept current by the fork hook below so the per-call check is a
# global load and a comparison rather than a system call.
_pid = os.getpid()
# The process that already warned about per-process stores (warn once per process).
_warned_pid = 0
# Every live backend, so the fork hooks can reach their locks; guarded by _registry_lock
# because a WeakSet must not grow while the fork hook iterates it.
_instances: weakref.WeakSet[MemoryBackend] = weakref.WeakSet()
_registry_lock = threading.Lock()
# The stores whose locks _before_fork acquired, released again after the fork.
_held_across_fork: list[MemoryBackend] = []


class _Entry:
    """One stored record; mutable, slotted to keep a record at a few dozen bytes."""

    __slots__ = ("deadline", "fingerprint", "owner", "payload", "state", "token")

    def __init__(
        self,
        state: State,
        token: str,
        owner: str,
        fingerprint: str,
        payload: bytes,
        deadline: float,
    ) -> None:
        self.state = state
        self.token = token
        self.owner = owner
        self.fingerprint = fingerprint
        self.payload = payload
        # Store-clock time at which the lease (IN_PROGRESS) or ttl (COMPLETED/FAILED) runs
        # out; the record is live while ``deadline > now``.
        self.deadline = deadline


class MemoryBackend:
    """An in-process store implementing :class:`~idempotask.backends.base.Backend`.

    ``max_entries`` bounds the number of records: inserting a new key into a full store
    first drops expired records, then the least recently written COMPLETED or FAILED
    ones. In-progress claims are never evicted; a store full of them raises
    :class:`~idempotask.errors.BackendError`. ``clock`` returns seconds on a monotonic
    scale and drives every expiry (inject a fake one to test expiry without sleeping).

    The async methods run the sync ones directly: every operation is a short critical
    section under one :class:`threading.Lock`, with nothing awaited or blocking inside.
    Records are not shared across processes (see the module docstring).
    """

    def __init__(
        self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError(
                f"MemoryBackend: max_entries must be a positive int, got {max_entries!r}"
            )
        _check_clock(clock, "MemoryBackend")
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, _Entry] = {}
        # Keys of COMPLETED/FAILED records, least recently written first: the eviction
        # order. In-progress claims are never in here, so they are never evicted.
        self._finished: OrderedDict[str, None] = OrderedDict()
        # A full scan for expired records is O(n); doing one only when this many new keys
        # came in since the last keeps inserts into a full store O(1) amortised.
        self._sweep_every = max(1, max_entries // 4)
        self._inserts_since_sweep = 0
        self._pid = _pid
        with _registry_lock:
            _instances.add(self)

    @classmethod
    def from_url(cls, url: str) -> MemoryBackend:
        """Build a store from ``memory://`` or ``memory://?max_entries=5000``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "memory":
            raise ConfigurationError(
                f"MemoryBackend.from_url: expected a memory:// URL, got {url!r}"
            )
        if parts.netloc or parts.path not in ("", "/") or parts.fragment:
            raise ConfigurationError(
                f"MemoryBackend.from_url: a memory:// URL takes no host, path or fragment, "
                f"only query options such as ?max_entries=5000; got {url!r}"
            )
        options: dict[str, str] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in options:
                raise ConfigurationError(
                    f"MemoryBackend.from_url: option {name!r} given twice in {url!r}"
                )
            options[name] = value
        unknown = sorted(set(options) - {"max_entries"})
        if unknown:
            raise ConfigurationError(
                f"MemoryBackend.from_url: unknown option(s) {', '.join(unknown)} in {url!r}; "
                "the only option is max_entries"
            )
        if "max_entries" not in options:
            return cls()
        try:
            max_entries = int(options["max_entries"])
        except ValueError:
            raise ConfigurationError(
                f"MemoryBackend.from_url: max_entries must be a positive int, "
                f"got {options['max_entries']!r} in {url!r}"
            ) from None
        return cls(max_entries=max_entries)

    @property
    def max_entries(self) -> int:
        """The most records this store keeps."""
        return self._max_entries

    @property
    def size(self) -> int:
        """The number of records held, counting expired ones not yet dropped.

        A property rather than ``__len__`` so that an empty store is still truthy
        (``backend or default`` must not skip it).
        """
        return len(self._records)

    def __repr__(self) -> str:
        return f"MemoryBackend(max_entries={self._max_entries}, records={len(self._records)})"

    # -- sync protocol -------------------------------------------------------------------

    def claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        """Take ``key`` for ``token`` or return the record that holds it (see ``Backend``)."""
        if self._pid != _pid:
            self._first_use_in_this_process()
        with self._lock:
            now = self._clock()
            entry = self._records.get(key)
            if entry is not None and entry.deadline > now:
                if entry.state is not _IN_PROGRESS or (
                    entry.token != token and (not owner or entry.owner != owner)
                ):
                    # The duplicate path: someone else's live record, returned as is.
                    return Record(
                        key,
                        entry.state,
                        entry.token,
                        entry.owner,
                        entry.fingerprint,
                        entry.payload,
                        entry.deadline - now,
                    )
                # Same token (a retried claim) or same owner (a framework retry): re-take.
                entry.token = token
                entry.owner = owner
                if fingerprint:
                    entry.fingerprint = fingerprint
                entry.deadline = now + lease
                return Record(key, _IN_PROGRESS, token, owner, entry.fingerprint, b"", lease)
            if entry is None:
                if len(self._records) >= self._max_entries:
                    self._make_room(now)
                self._inserts_since_sweep += 1
            elif entry.state is not _IN_PROGRESS:
                del self._finished[key]
            self._records[key] = _Entry(_IN_PROGRESS, token, owner, fingerprint, b"", now + lease)
            return Record(key, _IN_PROGRESS, token, owner, fingerprint, b"", lease)

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Store a result for the claim held with ``token``; True when stored (or already)."""
        return self._finish(key, token, payload, ttl, _COMPLETED)

    def fail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Store a failure for the claim held with ``token``; True when stored (or already)."""
        return self._finish(key, token, payload, ttl, _FAILED)

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """Restart the lease of the claim held with ``token``; False when it is not held."""
        if self._pid != _pid:
            self._first_use_in_this_process()
        with self._lock:
            now = self._clock()
            entry = self._records.get(key)
            if (
                entry is None
                or entry.deadline <= now
                or entry.state is not _IN_PROGRESS
                or entry.token != token
            ):
                return False
            entry.deadline = now + lease
            return True

    def get(self, key: str) -> Record | None:
        """The live record under ``key``, or None when absent or expired."""
        if self._pid != _pid:
            self._first_use_in_this_process()
        with self._lock:
            now = self._clock()
            entry = self._records.get(key)
            if entry is None:
                return None
            if entry.deadline <= now:
                self._drop(key, entry)
                return None
            return Record(
                key,
                entry.state,
                entry.token,
                entry.owner,
                entry.fingerprint,
                entry.payload,
                entry.deadline - now,
            )

    def delete(self, key: str, *, token: str | None = None) -> bool:
        """Remove the record (only if it carries ``token``, when given); True if removed."""
        if self._pid != _pid:
            self._first_use_in_this_process()
        with self._lock:
            now = self._clock()
            entry = self._records.get(key)
            if entry is None:
                return False
            if entry.deadline <= now:
                self._drop(key, entry)
                return False
            if token is not None and entry.token != token:
                return False
            self._drop(key, entry)
            return True

    def expire_now(self, key: str) -> bool:
        """Test hook: make the record's lease or ttl run out now; True if a live one was there."""
        with self._lock:
            now = self._clock()
            entry = self._records.get(key)
            if entry is None or entry.deadline <= now:
                return False
            entry.deadline = _EXPIRED
            return True

    # -- async protocol: the same critical sections, which never block for long ------------

    async def aclaim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        """Async :meth:`claim`."""
        return self.claim(key, token, lease=lease, owner=owner, fingerprint=fingerprint)

    async def acomplete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Async :meth:`complete`."""
        return self._finish(key, token, payload, ttl, _COMPLETED)

    async def afail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Async :meth:`fail`."""
        return self._finish(key, token, payload, ttl, _FAILED)

    async def arenew(self, key: str, token: str, *, lease: float) -> bool:
        """Async :meth:`renew`."""
        return self.renew(key, token, lease=lease)

    async def aget(self, key: str) -> Record | None:
        """Async :meth:`get`."""
        return self.get(key)

    async def adelete(self, key: str, *, token: str | None = None) -> bool:
        """Async :meth:`delete`."""
        return self.delete(key, token=token)

    # -- internals -------------------------------------------------------------------------

    def _finish(self, key: str, token: str, payload: bytes, ttl: float, state: State) -> bool:
        if self._pid != _pid:
            self._first_use_in_this_process()
        # bytes(b) is b itself for an exact bytes object; it copies a bytearray so a caller
        # mutating its buffer later cannot change the stored result.
        payload = bytes(payload)
        with self._lock:
            now = self._clock()
            entry = self._records.get(key)
            if entry is None or entry.deadline <= now or entry.token != token:
                return False
            if entry.state is not _IN_PROGRESS:
                # Repeating a finish that already succeeded (a retried call) is harmless;
                # the stored record stays exactly as first written.
                return entry.state is state
            entry.state = state
            entry.payload = payload
            entry.deadline = now + ttl
            self._finished[key] = None
            return True

    def _drop(self, key: str, entry: _Entry) -> None:
        del self._records[key]
        if entry.state is not _IN_PROGRESS:
            del self._finished[key]

    def _make_room(self, now: float) -> None:
        """Free one slot for a new key; called under the lock when the store is full."""
        if self._inserts_since_sweep >= self._sweep_every or not self._finished:
            self._sweep(now)
        if len(self._records) < self._max_entries:
            return
        if not self._finished:
            raise BackendError(
                f"MemoryBackend is full: all {len(self._records)} records are in-progress "
                f"claims, which are never evicted; raise max_entries (now {self._max_entries}) "
                "or use a shared store such as redis://"
            )
        evicted, _ = self._finished.popitem(last=False)
        del self._records[evicted]

    def _sweep(self, now: float) -> None:
        expired = [key for key, entry in self._records.items() if entry.deadline <= now]
        for key in expired:
            self._drop(key, self._records[key])
        self._inserts_since_sweep = 0

    def _first_use_in_this_process(self) -> None:
        global _warned_pid
        self._pid = _pid
        if _warned_pid != _pid:
            _warned_pid = _pid
            warnings.warn(
                "idempotask: a MemoryBackend created in another process is being used in a "
                "forked worker process; each worker process has its own memory store, so a "
                "duplicate call handled by a different process is not detected and runs "
                "again. Configure a shared store (redis://... or a SQL URL) for "
                "multi-process workers.",
                RuntimeWarning,
                stacklevel=3,
            )


def _check_clock(clock: object, owner: str) -> None:
    """Refuse a ``clock=`` that cannot be called (a store's monotonic seconds)."""
    if not callable(clock):
        raise ConfigurationError(
            f"{owner}: clock must be a callable returning seconds, got {clock!r}"
        )


def _fresh_locks_in_child(stores: weakref.WeakSet[Any]) -> None:
    # The dead-letter and breaker stores' hook: a thread of the parent may have held a
    # store's lock at fork(); the child has no such thread, so it gets fresh locks.
    for store in list(stores):
        store._lock = threading.Lock()


def _before_fork() -> None:
    # Hold every store's lock across fork() so the child copies consistent records, and no
    # store is mid-update in the copy.
    _registry_lock.acquire()
    _held_across_fork[:] = list(_instances)
    for backend in _held_across_fork:
        backend._lock.acquire()


def _after_fork_in_parent() -> None:
    for backend in _held_across_fork:
        backend._lock.release()
    _held_across_fork.clear()
    _registry_lock.release()


def _after_fork_in_child() -> None:
    global _pid, _registry_lock
    _pid = os.getpid()
    # Fresh locks rather than release(): the held ones belong to the parent's thread.
    for backend in _held_across_fork:
        backend._lock = threading.Lock()
    _held_across_fork.clear()
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


# ----------------------------------------------------------------------------------------
# Dead letters
# ----------------------------------------------------------------------------------------

_ALL = DeadLetterFilter()
# Every live dead-letter store, so a forked child can replace locks a parent thread held.
_dl_instances: weakref.WeakSet[MemoryDeadLetterStore] = weakref.WeakSet()


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
        _check_clock(clock, "MemoryDeadLetterStore")
        self._clock = clock
        self._lock = threading.Lock()
        self._letters: dict[str, DeadLetter] = {}
        # id -> store-clock time at which a processor's claim runs out.
        self._claims: dict[str, float] = {}
        with _registry_lock:
            _dl_instances.add(self)

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
        if not isinstance(letter, DeadLetter):
            raise TypeError(f"add: expected a DeadLetter, got {type(letter).__name__}")
        letter = letter.evolve(status=Status(letter.status), arguments=bytes(letter.arguments))
        with self._lock:
            return self._letters.setdefault(letter.id, letter)

    def get(self, id: str) -> DeadLetter | None:
        """The letter with this id, or None."""
        return self._letters.get(id)

    def query(
        self, filter: DeadLetterFilter = _ALL, *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """Matching letters, newest ``last_failed_at`` first, ties by id."""
        with self._lock:
            found = [x for x in self._letters.values() if filter.matches(x)]
        found.sort(key=lambda x: (-x.last_failed_at, x.id))
        return found[offset : offset + limit]

    def update(self, id: str, version: int, **changes: Any) -> DeadLetter | None:
        """Compare-and-set: apply ``changes`` if the stored version is ``version``."""
        check_changes(changes)
        if "status" in changes:
            changes["status"] = Status(changes["status"])
        with self._lock:
            current = self._letters.get(id)
            if current is None or current.version != version:
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
            for letter in due[: max(limit, 0)]:
                letter = replace(letter, version=letter.version + 1)
                self._letters[letter.id] = letter
                self._claims[letter.id] = held_until + lease
                claimed.append(letter)
            return claimed

    def stats(self, filter: DeadLetterFilter = _ALL) -> list[StatRow]:
        """Counts by (function, kind, status)."""
        groups: dict[tuple[str, str, Status], list[int]] = {}
        with self._lock:
            letters = [x for x in self._letters.values() if filter.matches(x)]
        for x in letters:
            counts = groups.setdefault((x.function, x.kind, x.status), [0, 0, 0])
            counts[0] += 1
            counts[1] += max(x.attempts - 1, 0)
            counts[2] += x.status is Status.RESOLVED and x.resolution == "retry"
        return [
            StatRow(function, kind, status, count, retries, resolved)
            for (function, kind, status), (count, retries, resolved) in sorted(groups.items())
        ]

    def purge(self, filter: DeadLetterFilter) -> int:
        """Delete matching letters; return how many went."""
        with self._lock:
            doomed = [id for id, x in self._letters.items() if filter.matches(x)]
            for id in doomed:
                del self._letters[id]
                self._claims.pop(id, None)
            return len(doomed)

    def expire_claim(self, id: str) -> bool:
        """Test hook: end a processor's claim on ``id`` now; True if a live one was there."""
        with self._lock:
            live = self._claims.pop(id, -math.inf) > self._clock()
            return live

    # -- async protocol: the same short critical sections ---------------------------------

    async def aadd(self, letter: DeadLetter) -> DeadLetter:
        """Async :meth:`add`."""
        return self.add(letter)

    async def aget(self, id: str) -> DeadLetter | None:
        """Async :meth:`get`."""
        return self.get(id)

    async def aquery(
        self, filter: DeadLetterFilter = _ALL, *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """Async :meth:`query`."""
        return self.query(filter, limit=limit, offset=offset)

    async def aupdate(self, id: str, version: int, **changes: Any) -> DeadLetter | None:
        """Async :meth:`update`."""
        return self.update(id, version, **changes)

    async def aclaim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]:
        """Async :meth:`claim_due`."""
        return self.claim_due(now, limit=limit, lease=lease, filter=filter)

    async def astats(self, filter: DeadLetterFilter = _ALL) -> list[StatRow]:
        """Async :meth:`stats`."""
        return self.stats(filter)

    async def apurge(self, filter: DeadLetterFilter) -> int:
        """Async :meth:`purge`."""
        return self.purge(filter)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=functools.partial(_fresh_locks_in_child, _dl_instances))


# ----------------------------------------------------------------------------------------
# Circuit breakers
# ----------------------------------------------------------------------------------------

__all__ += ["MemoryBreakerStore"]

_BREAKER_CLOSED = BreakerState(BreakerStatus.CLOSED)
# Every live breaker store, so a forked child can replace locks a parent thread held.
_breaker_stores: weakref.WeakSet[MemoryBreakerStore] = weakref.WeakSet()


class _BreakerEntry:
    """One breaker's shared state; times are on the store's clock."""

    __slots__ = ("failures", "open_until", "probe_token", "probe_until", "window_until")

    def __init__(self) -> None:
        self.failures = 0
        self.window_until = -math.inf
        self.open_until: float | None = None  # None: closed
        self.probe_until = -math.inf
        self.probe_token = ""


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
        _check_clock(clock, "MemoryBreakerStore")
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _BreakerEntry] = {}
        with _registry_lock:
            _breaker_stores.add(self)

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

    async def astate(self, name: str) -> BreakerState:
        """Async :meth:`state`."""
        return self.state(name)

    async def arecord_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> BreakerState:
        """Async :meth:`record_failure`."""
        return self.record_failure(name, threshold=threshold, window=window, open_for=open_for)

    async def arecord_success(self, name: str) -> BreakerState:
        """Async :meth:`record_success`."""
        return self.record_success(name)

    async def atry_probe(self, name: str, token: str, *, lease: float) -> BreakerState:
        """Async :meth:`try_probe`."""
        return self.try_probe(name, token, lease=lease)

    async def astates(self, *, limit: int = 1000) -> dict[str, BreakerState]:
        """Async :meth:`states`."""
        return self.states(limit=limit)

    async def areset(self, name: str) -> None:
        """Async :meth:`reset`."""
        self.reset(name)

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


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=functools.partial(_fresh_locks_in_child, _breaker_stores))

"""The in-process idempotency store, :class:`MemoryBackend` (see the package docstring)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit

from idempotask import events
from idempotask.backends._twins import inline
from idempotask.backends.base import Record, State
from idempotask.backends.memory._breakers import MemoryBreakerStore
from idempotask.backends.memory._common import check_clock, new_lock
from idempotask.backends.memory._deadletters import MemoryDeadLetterStore
from idempotask.errors import BackendError, ConfigurationError

__all__ = ["MemoryBackend"]

log = logging.getLogger("idempotask")

_S = TypeVar("_S", MemoryDeadLetterStore, MemoryBreakerStore)

_IN_PROGRESS = State.IN_PROGRESS
_COMPLETED = State.COMPLETED
_FAILED = State.FAILED
_EXPIRED = -math.inf

# The pid of this process, kept current by the fork hook below so the per-call check is a
# global load and a comparison rather than a system call.
_pid = os.getpid()
# The process that already warned about per-process stores (warn once per process).
_warned_pid = 0


@dataclass(slots=True, eq=False)
class _Entry:
    """One stored record; mutable, slotted to keep a record at a few dozen bytes."""

    state: State
    token: str
    owner: str
    fingerprint: str
    payload: bytes
    # Store-clock time at which the lease (IN_PROGRESS) or ttl (COMPLETED/FAILED) runs
    # out; the record is live while ``deadline > now``.
    deadline: float

    def record(self, key: str, now: float) -> Record:
        return Record(
            key,
            self.state,
            self.token,
            self.owner,
            self.fingerprint,
            self.payload,
            self.deadline - now,
        )


class MemoryBackend:
    """An in-process store implementing :class:`~idempotask.backends.base.Backend`.

    ``max_entries`` bounds the number of records: inserting a new key into a full store
    first drops expired records, then the least recently written COMPLETED or FAILED
    ones. Evicting a result inside its ttl breaks the guarantee for that call (it runs
    again if called again), so each such eviction emits an ``evicted`` event
    (:class:`~idempotask.events.EventKind`) and the first one per store logs a warning.
    In-progress claims are never evicted; a store full of them raises
    :class:`~idempotask.errors.BackendError`. ``clock`` returns seconds on a monotonic
    scale and drives every expiry (inject a fake one to test expiry without sleeping).

    The async methods run the sync ones directly: every operation is a short critical
    section under one :class:`threading.Lock`, with nothing awaited or blocking inside.
    Records are not shared across processes (see the module docstring).

    Beside its records it keeps dead letters (:meth:`dead_letter_store`) and breaker
    state (:meth:`breaker_store`), one store of each per namespace, and lists records by
    key prefix for operators (:meth:`scan`).
    """

    def __init__(
        self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError(
                f"MemoryBackend: max_entries must be a positive int, got {max_entries!r}"
            )
        check_clock(clock, "MemoryBackend")
        self._max_entries = max_entries
        self._clock = clock
        self._lock = new_lock(self, hold_across_fork=True)
        self._records: dict[str, _Entry] = {}
        # Keys of COMPLETED/FAILED records, least recently written first: the eviction
        # order. In-progress claims are never in here, so they are never evicted.
        self._finished: OrderedDict[str, None] = OrderedDict()
        # A full scan for expired records is O(n); doing one only when this many new keys
        # came in since the last keeps inserts into a full store O(1) amortised.
        self._sweep_every = max(1, max_entries // 4)
        self._inserts_since_sweep = 0
        self._pid = _pid
        self._warned_eviction = False
        # namespace -> the store kept beside the records (dead_letter_store() etc.).
        self._dead_letters: dict[str, MemoryDeadLetterStore] = {}
        self._breakers: dict[str, MemoryBreakerStore] = {}

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
                    return entry.record(key, now)
                # Same token (a retried claim) or same owner (a framework retry): re-take.
                entry.token = token
                entry.owner = owner
                if fingerprint:
                    entry.fingerprint = fingerprint
                entry.deadline = now + lease
                return Record(key, _IN_PROGRESS, token, owner, entry.fingerprint, b"", lease)
            evicted: tuple[str, float] | None = None
            if entry is None:
                if len(self._records) >= self._max_entries:
                    evicted = self._make_room(now)
                self._inserts_since_sweep += 1
            elif entry.state is not _IN_PROGRESS:
                del self._finished[key]
            self._records[key] = _Entry(_IN_PROGRESS, token, owner, fingerprint, b"", now + lease)
        if evicted is not None:
            self._report_eviction(*evicted)  # outside the lock: listeners may use the store
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
            return entry.record(key, now)

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

    def scan(self, prefix: str, *, limit: int = 100) -> list[Record]:
        """Up to ``limit`` live records whose key starts with ``prefix``, for operators.

        One pass over the store under its lock (bounded by ``max_entries``).

        >>> store = MemoryBackend()
        >>> _ = store.claim("app:f:v1:ab", "t", lease=30)
        >>> [r.key for r in store.scan("app:f:")]
        ['app:f:v1:ab']
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigurationError(f"scan: limit must be an int >= 0, got {limit!r}")
        if not isinstance(prefix, str):
            raise ConfigurationError(f"scan: prefix must be a str, got {type(prefix).__name__}")
        found: list[Record] = []
        with self._lock:
            now = self._clock()
            for key, e in self._records.items():
                if len(found) >= limit:
                    break
                if e.deadline > now and key.startswith(prefix):
                    found.append(e.record(key, now))
        return found

    def dead_letter_store(self, *, namespace: str = "idempotask") -> MemoryDeadLetterStore:
        """The dead-letter store kept beside these records for ``namespace`` (made on
        first use; the same one after). It lives as long as this backend, in this
        process only."""
        return _per_namespace(self._dead_letters, namespace, MemoryDeadLetterStore, self._lock)

    def breaker_store(self, *, namespace: str = "idempotask") -> MemoryBreakerStore:
        """The circuit-breaker store kept beside these records for ``namespace`` (made on
        first use; the same one after), in this process only."""
        return _per_namespace(self._breakers, namespace, MemoryBreakerStore, self._lock)

    # -- async protocol: the same critical sections, which never block for long ------------

    ascan = inline(scan)

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

    arenew = inline(renew)
    aget = inline(get)
    adelete = inline(delete)

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

    def _make_room(self, now: float) -> tuple[str, float] | None:
        """Free one slot for a new key; called under the lock when the store is full.

        Returns the key of a record evicted inside its ttl and the seconds it had left.
        """
        if self._inserts_since_sweep >= self._sweep_every or not self._finished:
            self._sweep(now)
        if len(self._records) < self._max_entries:
            return None
        if not self._finished:
            raise BackendError(
                f"MemoryBackend is full: all {len(self._records)} records are in-progress "
                f"claims, which are never evicted; raise max_entries (now {self._max_entries}) "
                "or use a shared store such as redis://"
            )
        evicted, _ = self._finished.popitem(last=False)
        left = self._records.pop(evicted).deadline - now
        return (evicted, left) if left > 0 else None

    def _report_eviction(self, key: str, left: float) -> None:
        parts = key.split(":")
        name = parts[1] if len(parts) == 4 else ""  # namespace:name:version:digest
        if events.listeners:
            events.emit(
                events.EventKind.EVICTED, name, key, attributes={"ttl_left": round(left, 3)}
            )
        if not self._warned_eviction:
            self._warned_eviction = True
            log.warning(
                "idempotask: the memory store is full (max_entries=%d) and evicted the stored "
                "result of %s with %.0fs of its ttl left: that call runs again if called "
                "again. Raise max_entries or use a shared store (redis://, a SQL URL); "
                "every such eviction emits an 'evicted' event",
                self._max_entries,
                key,
                left,
            )

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


def _per_namespace(
    stores: dict[str, _S], namespace: str, make: Callable[[], _S], lock: threading.Lock
) -> _S:
    if not isinstance(namespace, str) or not namespace:
        raise ConfigurationError(f"namespace: expected a non-empty str, got {namespace!r}")
    store = stores.get(namespace)
    if store is None:
        with lock:
            store = stores.setdefault(namespace, make())
    return store


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

"""Redis first, SQL during an outage: one store made of a primary and a secondary.

:class:`FallbackBackend` sends every operation to the primary (Redis) while it answers,
and new claims to the secondary (SQL) while it does not. Records written to SQL alone
are announced by outage markers in SQL, which every process reads, so after the outage
any process confirms new claims in SQL until those records have expired: calls completed
during the outage are not run again. Its docstring states the guarantee exactly (the
README quotes it).

Every decision is made once, in flows (:mod:`idempotask.flow`): the shared steps in
``_router``, each operation's own in :class:`FallbackBackend`.

The URL form (``fallback+redis``, ``fallback+rediss`` and ``fallback+unix``) is described
at :meth:`FallbackBackend.from_url`; :func:`fallback_url` builds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from idempotask.backends._twins import twins
from idempotask.backends.base import (
    Backend,
    BreakerStore,
    DeadLetterStore,
    ProvidesStores,
    Record,
    SupportsExpireNow,
    SupportsScan,
)
from idempotask.backends.fallback._router import Route, Router
from idempotask.backends.fallback._url import fallback_url, seconds, split_url
from idempotask.errors import BackendError, ConfigurationError
from idempotask.flow import Flow, Op, adrive, drive, store_op

__all__ = [
    "DEFAULT_MARKER_KEY",
    "DEFAULT_PROBE_INTERVAL",
    "FallbackBackend",
    "FallbackStatus",
    "fallback_url",
]

#: Seconds between two attempts to reach a primary marked down.
DEFAULT_PROBE_INTERVAL = 5.0
#: The prefix of the outage markers' keys in the secondary (``<prefix>:<seconds>``).
#: Keys the library builds have four ``:``-separated parts, so these three-part keys
#: never meet one of them.
DEFAULT_MARKER_KEY = "idempotask-fallback:outage"
_DEFAULT_MAX_TRACKED = 100_000


@dataclass(frozen=True, slots=True)
class FallbackStatus:
    """A snapshot of a :class:`FallbackBackend`'s view of its stores, for health checks.

    ``primary_up`` is whether calls go to the primary; ``next_probe_in`` the seconds
    until the primary is tried again (``None`` while it is up); ``confirming_for`` the
    seconds left in the confirm window (0.0 when closed); ``tracked_claims`` how many
    claims taken in the secondary (or in both) are remembered for token routing;
    ``last_error`` the primary's last failure, if any.
    """

    primary_up: bool
    next_probe_in: float | None
    confirming_for: float
    tracked_claims: int
    last_error: str | None


class FallbackBackend(Router):
    """A primary store (Redis) with a secondary (SQL) that takes over while it is down.

    ``FallbackBackend(primary, secondary)`` takes two stores implementing
    :class:`~idempotask.backends.base.Backend`, normally a
    :class:`~idempotask.backends.redis.RedisBackend` and a
    :class:`~idempotask.backends.sql.SQLAlchemyBackend` (create its table first). It
    serves sync and async callers, like both of them.

    >>> from idempotask.backends.redis import RedisBackend
    >>> from idempotask.backends.sql import SQLAlchemyBackend
    >>> store = FallbackBackend(
    ...     RedisBackend.from_url("redis://cache:6379/0", socket_timeout=1.0),
    ...     SQLAlchemyBackend("postgresql+psycopg://app@db/app"),
    ... )
    >>> store.secondary.create_tables()                     # doctest: +SKIP
    >>> import idempotask
    >>> idempotask.configure(backend=store)                 # doctest: +SKIP

    or, by URL (see :func:`fallback_url`)::

        idempotask.configure(backend="fallback+redis://cache:6379/0"
                             "?secondary=postgresql%2Bpsycopg%3A%2F%2Fapp%40db%2Fapp")

    **The guarantee** (Redis is the primary, SQL the secondary):

    - While Redis is healthy every call goes to Redis only, as with the Redis backend
      alone. The exceptions are reads of the *outage markers* in SQL (see below): by
      every caller until one read has answered when the backend is first used, then by
      one call per ``probe_interval`` (one SQL query with a secondary that can list keys,
      else one per marker length).
    - When a Redis operation fails (a ``BackendError``: connection refused, timeout,
      Redis refusing writes), or its caller gives up on it (a cancellation, a deadline
      of its own) after a second without an answer, Redis is marked down and new claims
      go to SQL. Redis is then tried again at most once per ``probe_interval`` (default
      5 s), by letting the next operation go to it; every other call goes straight to
      SQL without waiting. So only the call that notices the outage, and then one call
      per probe, waits for Redis's client timeouts (seconds: give the Redis backend
      short ones).
    - Before it writes a record to SQL alone (a claim, a result, a failure), a client
      writes an outage marker to SQL that outlives that record. Any process whose
      latest read of the markers found a live one -- a client that saw the outage, one
      started after it, one restarted, one that never noticed it -- confirms its claims
      in SQL until the markers expire: a claim that takes a key in Redis is also made in
      SQL before the caller runs anything, and if SQL holds a COMPLETED or FAILED record,
      or a live IN_PROGRESS claim, for that key, the Redis claim is released and the SQL
      record is the answer. **So a call completed during the outage is not run again**,
      by any process, and one still running in SQL is waited for. If the claim takes the
      key in SQL too, the call holds it in both, and its result is stored in both.
      Markers last twice the ttl (or lease) of the records they cover, rounded up to a
      fixed ladder of lengths (2 min ... 10 years), or ``confirm_window`` when that is
      shorter; a client that saw the outage also confirms for ``confirm_window`` (default:
      the longest ttl or lease it has stored) after Redis answers again. When every
      marker has expired, no SQL call is made.
    - complete, fail, renew and delete of a claim go to the store(s) that issued it: a
      claim taken in SQL during the outage completes in SQL even after Redis is back.
    - A call claimed or completed only in Redis before the outage may run once more
      during it (SQL cannot see it). If Redis comes back empty (a restart without
      persistence), such a call may also run once more afterwards, as with the Redis
      backend alone when Redis loses data.
    - Where it ends: a process reading markers once per ``probe_interval`` learns of an
      outage another process noticed up to ``probe_interval`` late. In that interval
      (and during a partition, while one client reaches Redis and another does not) the
      two may claim the same key, one in Redis and one in SQL, and both run. Closing
      that gap would cost a SQL round trip on every call while Redis is healthy.
    - When SQL fails too, the operation raises ``BackendError`` and ``on_backend_error``
      applies. A claim whose outage marker cannot be written, and in the confirm window
      a claim that cannot be confirmed in SQL (the Redis claim is then released), raise
      ``BackendError`` (fail closed).

    Round trips per operation: healthy, 1 (as Redis alone); during the outage, 1 to SQL
    (plus the Redis timeout on the call that notices it and on each probe); in the
    confirm window, 1 when Redis holds the key (a duplicate), 2 for a new claim (Redis,
    then SQL), 3 when SQL's record wins (the Redis claim is released), and 2 for each
    complete, fail, renew or delete of a claim held in both.

    The order in the window is claim in Redis, then claim in SQL, then (when SQL's record
    wins) release the Redis claim. Between the first and the last step another caller
    asking Redis sees an IN_PROGRESS claim: ``on_conflict="wait"`` waits a few
    milliseconds for its release, ``on_conflict="raise"`` raises ``AlreadyInProgress``
    once. Nobody runs the body in between: callers asking Redis see the claim, and the
    SQL record that wins was already in SQL. Claiming in Redis first keeps duplicates at
    one round trip; in either order two clients that both ask SQL elect one holder there.

    Options: ``probe_interval`` (seconds between probes, and between two reads of the
    outage markers), ``confirm_window`` (seconds, an upper bound on how long a claim is
    confirmed in SQL after an outage; 0 turns confirmation, and the markers, off),
    ``max_tracked_claims`` (claims taken in SQL remembered for token routing; when one
    is forgotten its token is tried in Redis, then in SQL), ``marker_key`` (the prefix of
    the outage markers' keys in SQL; None: no markers, so only the client that saw an
    outage confirms after it) and ``clock`` (a monotonic clock, for tests).
    :meth:`status` tells what the backend currently sees.
    """

    def __init__(
        self,
        primary: Backend,
        secondary: Backend,
        *,
        probe_interval: float = DEFAULT_PROBE_INTERVAL,
        confirm_window: float | None = None,
        max_tracked_claims: int = _DEFAULT_MAX_TRACKED,
        marker_key: str | None = DEFAULT_MARKER_KEY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for role, store in (("primary", primary), ("secondary", secondary)):
            if not isinstance(store, Backend):
                raise ConfigurationError(
                    f"FallbackBackend: {role} must implement idempotask.backends.Backend, "
                    f"got {type(store).__qualname__}"
                )
        if primary is secondary:
            raise ConfigurationError("FallbackBackend: primary and secondary are the same store")
        if (
            isinstance(max_tracked_claims, bool)
            or not isinstance(max_tracked_claims, int)
            or max_tracked_claims < 1
        ):
            raise ConfigurationError(
                f"FallbackBackend: max_tracked_claims must be a positive int, "
                f"got {max_tracked_claims!r}"
            )
        if marker_key is not None and (not isinstance(marker_key, str) or not marker_key):
            raise ConfigurationError(
                f"FallbackBackend: marker_key must be a non-empty str or None, got {marker_key!r}"
            )
        if not callable(clock):
            raise ConfigurationError(f"FallbackBackend: clock must be callable, got {clock!r}")
        self.primary = primary
        self.secondary = secondary
        self.probe_interval = seconds("probe_interval", probe_interval)
        self.confirm_window = (
            None
            if confirm_window is None
            else seconds("confirm_window", confirm_window, allow_zero=True)
        )
        self._init_state(max_tracked_claims, marker_key, clock)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FallbackBackend:
        """Build from ``fallback+redis://host:6379/0?secondary=<percent-encoded URL>``.

        ``fallback+rediss://`` and ``fallback+unix://`` wrap those Redis URLs. The query
        may also carry ``probe_interval`` and ``confirm_window`` (seconds); every other
        parameter stays in the Redis URL (``socket_timeout=1``, for instance). The
        secondary is built from its URL like any backend (its table must exist: call
        ``.secondary.create_tables()`` once, or use Alembic). ``options`` are the
        constructor's keyword arguments (they win over the same names in the query).
        Nothing connects until the first operation.

        >>> store = FallbackBackend.from_url(
        ...     "fallback+redis://cache:6379/0?socket_timeout=1&probe_interval=2"
        ...     "&secondary=sqlite%3A%2F%2F%2F%2Fvar%2Flib%2Fapp%2Fidem.db"
        ... )
        >>> store
        FallbackBackend(RedisBackend('redis://cache:6379/0'), SQLAlchemyBackend('sqlite:////var/lib/app/idem.db', table='idempotask_records'), probe_interval=2.0)
        """  # noqa: E501 - a doctest's expected output is one line
        from idempotask.backends import backend_from_url

        primary_url, parsed = split_url(url)
        secondary_url = parsed.pop("secondary")
        for name, text in parsed.items():
            try:
                options.setdefault(name, float(text))
            except ValueError:
                raise ConfigurationError(
                    f"fallback URL: {name}={text!r} is not a number of seconds"
                ) from None
        primary = backend_from_url(primary_url)
        secondary = backend_from_url(secondary_url)
        return cls(primary, secondary, **options)

    def __repr__(self) -> str:
        extra = ""
        if self.probe_interval != DEFAULT_PROBE_INTERVAL:
            extra += f", probe_interval={self.probe_interval!r}"
        if self.confirm_window is not None:
            extra += f", confirm_window={self.confirm_window!r}"
        return f"{type(self).__name__}({self.primary!r}, {self.secondary!r}{extra})"

    # ------------------------------------------------------------------ health

    def status(self) -> FallbackStatus:
        """What this backend currently sees; cheap, no I/O.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> FallbackBackend(MemoryBackend(), MemoryBackend()).status().primary_up
        True
        """
        now = self._clock()
        with self._lock:
            return FallbackStatus(
                primary_up=self._up,
                next_probe_in=None if self._up else max(0.0, self._next_probe - now),
                confirming_for=max(0.0, self._window_end - now) if self._up else 0.0,
                tracked_claims=len(self._routes),
                last_error=self._last_error,
            )

    # ------------------------------------------------------------------ the store protocol

    def _claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Flow[Record]:
        """Take ``key`` with ``token``, or return the record that holds it (see the class
        docstring for which store answers).

        >>> from idempotask.backends.memory import MemoryBackend
        >>> store = FallbackBackend(MemoryBackend(), MemoryBackend())
        >>> store.claim("k", "t1", lease=30).held_by("t1")
        True
        """
        self._saw(lease)
        kwargs = {"lease": lease, "owner": owner, "fingerprint": fingerprint}
        if self._route(key, token) is Route.SECONDARY:
            # A claim retried with its own token: where it was taken.
            return (yield from self._claim_secondary(key, token, kwargs, lease, None))
        record: Record
        record, down = yield from self._try_primary("claim", key, token, **kwargs)
        if down is not None:
            return (yield from self._claim_secondary(key, token, kwargs, lease, down))
        if not record.held_by(token) or not self._confirming():
            return record
        # The confirm window: the key was free in the primary; the secondary decides.
        try:
            other: Record = yield store_op(self.secondary, "claim", key, token, **kwargs)
        except BackendError as exc:
            yield from self._release_primary(key, token)
            raise BackendError(
                f"fallback: {key!r} was claimed in the primary {self.primary!r}, but the "
                f"secondary {self.secondary!r}, which may hold a result stored during the "
                f"outage, cannot confirm it ({exc}); the claim was released"
            ) from exc
        if other.held_by(token):
            self._track(key, token, Route.BOTH)
            return record
        yield from self._release_primary(key, token)
        return other

    claim, aclaim = twins(_claim)

    def _complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> Flow[bool]:
        """Store a result for the claim held with ``token``, in the store(s) holding it.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> store = FallbackBackend(MemoryBackend(), MemoryBackend())
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.complete("k", "t1", b"42", ttl=3600)
        True
        """
        args = (key, token, payload)
        return (yield from self._by_token("complete", key, token, args, {"ttl": ttl}, ttl))

    complete, acomplete = twins(_complete)

    def _fail(self, key: str, token: str, payload: bytes, *, ttl: float) -> Flow[bool]:
        """Store a failure for the claim held with ``token``, in the store(s) holding it.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> store = FallbackBackend(MemoryBackend(), MemoryBackend())
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.fail("k", "t1", b"ValueError: no", ttl=60)
        True
        """
        args = (key, token, payload)
        return (yield from self._by_token("fail", key, token, args, {"ttl": ttl}, ttl))

    fail, afail = twins(_fail)

    def _renew(self, key: str, token: str, *, lease: float) -> Flow[bool]:
        """Restart the lease of the claim held with ``token``, where it was taken.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> store = FallbackBackend(MemoryBackend(), MemoryBackend())
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.renew("k", "t1", lease=30)
        True
        """
        return (
            yield from self._by_token("renew", key, token, (key, token), {"lease": lease}, lease)
        )

    renew, arenew = twins(_renew)

    def _get(self, key: str) -> Flow[Record | None]:
        """The record under ``key``: the primary's; the secondary's while the primary is
        down, or in the confirm window when the primary has none.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> FallbackBackend(MemoryBackend(), MemoryBackend()).get("k") is None
        True
        """
        record: Record | None
        record, down = yield from self._try_primary("get", key)
        if down is not None or (record is None and self._confirming()):
            record = yield from self._secondary(down, "get", key)
        return record

    get, aget = twins(_get)

    def _delete(self, key: str, *, token: str | None = None) -> Flow[bool]:
        """Remove the record (only if it carries ``token``, when given). Without a token
        it is removed from the secondary too whenever the secondary may hold one.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> store = FallbackBackend(MemoryBackend(), MemoryBackend())
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.delete("k", token="t1")
        True
        """
        if token is None:
            return (yield from self._delete_any(key))
        return (yield from self._by_token("delete", key, token, (key,), {"token": token}, None))

    delete, adelete = twins(_delete)

    def expire_now(self, key: str) -> bool:
        """Test hook: the record's lease or ttl runs out now in both stores (a primary
        marked down is skipped); True if either had a live record.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> store = FallbackBackend(MemoryBackend(), MemoryBackend())
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.expire_now("k"), store.get("k")
        (True, None)
        """
        found = False
        for role, store in (("primary", self.primary), ("secondary", self.secondary)):
            if store is self.primary and not self._up:
                continue
            if not isinstance(store, SupportsExpireNow):
                raise TypeError(
                    f"FallbackBackend.expire_now: the {role} {type(store).__qualname__} has "
                    "no expire_now(key) method"
                )
            found = store.expire_now(key) or found
        return found

    def close(self) -> None:
        """Close both stores' sync connections (each closes only what it created).

        >>> from idempotask.backends.memory import MemoryBackend
        >>> FallbackBackend(MemoryBackend(), MemoryBackend()).close()
        """
        drive(self._close_each("close"), catch=(Exception,))

    def _close_each(self, name: str) -> Flow[None]:
        """``close`` or ``aclose`` of each store that has it; the first failure is raised
        once both were tried."""
        errors: list[Exception] = []
        for store in (self.primary, self.secondary):
            method = getattr(store, name, None)
            if callable(method):
                try:
                    yield Op(method, method)
                except Exception as exc:  # close the other one all the same
                    errors.append(exc)
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ beside the records

    def dead_letter_store(self, *, namespace: str = "idempotask") -> DeadLetterStore:
        """The dead-letter store of the secondary (SQL): failures happen when stores
        fail, and SQL is the store that stays up through a Redis outage."""
        return self._provider("dead_letter_store").dead_letter_store(namespace=namespace)

    def breaker_store(self, *, namespace: str = "idempotask") -> BreakerStore:
        """The circuit-breaker store of the secondary (SQL), for the same reason."""
        return self._provider("breaker_store").breaker_store(namespace=namespace)

    def _provider(self, what: str) -> ProvidesStores:
        for store in (self.secondary, self.primary):
            if callable(getattr(store, what, None)):
                return store  # type: ignore[return-value]
        raise ConfigurationError(
            f"FallbackBackend.{what}: neither {self.secondary!r} nor {self.primary!r} "
            f"offers {what}(namespace=...); pass a store explicitly"
        )

    def _scan(self, prefix: str, *, limit: int = 100) -> Flow[list[Record]]:
        """Up to ``limit`` live records whose key starts with ``prefix``: the primary's,
        with the secondary's added while it may hold records this backend honours."""
        records: list[Record] | None = None
        down: BackendError | None = None
        if isinstance(self.primary, SupportsScan):
            records, down = yield from self._try_primary("scan", prefix, limit=limit)
        found = {record.key: record for record in records or ()}
        if (down is not None or self._secondary_may_hold()) and isinstance(
            self.secondary, SupportsScan
        ):
            more: list[Record] = yield from self._secondary(down, "scan", prefix, limit=limit)
            for record in more:
                found.setdefault(record.key, record)
        return list(found.values())[:limit]

    scan, ascan = twins(_scan)

    async def aclose(self) -> None:
        """Close both stores' connections for the running event loop.

        >>> await store.aclose()  # doctest: +SKIP
        """
        await adrive(self._close_each("aclose"), catch=(Exception,))

"""Redis first, SQL during an outage: one store made of a primary and a secondary.

:class:`FallbackBackend` sends every operation to the primary (Redis) while it answers,
and new claims to the secondary (SQL) while it does not; after the primary recovers it
confirms new claims in the secondary for a while, so calls completed during the outage
are not run again. Its docstring states the guarantee exactly (the README quotes it).

Every decision is made once, in plan generators that yield the store operations they
need (``(store, "claim", args, kwargs)``) and receive the answers, or have the store's
:class:`~idempotask.errors.BackendError` thrown in; :meth:`FallbackBackend._run` performs
them with the sync methods and :meth:`FallbackBackend._arun` with the ``a``-prefixed ones,
the way :mod:`idempotask.idempotent` drives its call protocol.

The URL form (registered as ``fallback+redis``, ``fallback+rediss`` and
``fallback+unix``) is the primary's Redis URL with ``fallback+`` before its scheme and the
secondary's URL, percent-encoded whole, in a ``secondary`` query parameter::

    fallback+redis://cache:6379/0?secondary=postgresql%2Bpsycopg%3A%2F%2Fapp%40db%2Fapp

:func:`fallback_url` builds it. ``probe_interval`` and ``confirm_window`` may be given
in the query too; every other query parameter belongs to the Redis URL.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from idempotask.backends.base import Backend, Record, SupportsExpireNow
from idempotask.errors import BackendError, ConfigurationError, CorruptRecordError

__all__ = [
    "DEFAULT_MARKER_KEY",
    "DEFAULT_PROBE_INTERVAL",
    "FallbackBackend",
    "FallbackStatus",
    "fallback_url",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Seconds between two attempts to reach a primary marked down.
DEFAULT_PROBE_INTERVAL = 5.0
#: Where a recovering backend tells the others (and processes started later) that a
#: confirm window is open. Keys the library builds have four ``:``-separated parts, so
#: this two-part key never meets one of them.
DEFAULT_MARKER_KEY = "idempotask-fallback:confirm-window"
_MARKER_OWNER = "idempotask-fallback"
_DEFAULT_MAX_TRACKED = 100_000

# The Redis URL schemes a fallback URL may wrap, and the query options that are ours.
_PRIMARY_SCHEMES = ("redis", "rediss", "unix")
_SCHEME_PREFIX = "fallback+"
_URL_OPTIONS = ("secondary", "probe_interval", "confirm_window")

# A step of a plan: the store, the sync method's name, its arguments and keywords.
_Step = tuple[Backend, str, tuple[Any, ...], dict[str, Any]]
_Plan = Generator[_Step, Any, _T]
_ASYNC_NAMES = {
    "claim": "aclaim",
    "complete": "acomplete",
    "fail": "afail",
    "renew": "arenew",
    "get": "aget",
    "delete": "adelete",
}


class _Gate(enum.Enum):
    """What a call may do with the primary right now."""

    UP = "up"  # healthy: use it
    PROBE = "probe"  # marked down, and this call is the one probe of the interval
    DOWN = "down"  # marked down: go straight to the secondary


class _Route(enum.Enum):
    """Which store(s) issued a claim, for the operations that carry its token."""

    SECONDARY = "secondary"  # taken in the secondary only (the primary was down)
    BOTH = "both"  # taken in both (the confirm window)


def _is_outage(exc: BaseException) -> bool:
    """A store failure that means "unreachable", not "answered with bad data"."""
    return isinstance(exc, BackendError) and not isinstance(exc, CorruptRecordError)


def _seconds(option: str, value: object, *, allow_zero: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigurationError(
            f"FallbackBackend: {option} must be a {kind}, finite number of seconds, got {value!r}"
        )
    return float(value)


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


# Locks are re-made in a forked child: the parent may have held one while forking.
_instances: weakref.WeakSet[FallbackBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for backend in list(_instances):
        backend._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class FallbackBackend:
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

    - While Redis is healthy there is no extra round trip: every operation goes to Redis
      only, as with the Redis backend alone. (The one exception: the first call, and the
      first call after the backend has been idle for ``probe_interval``, also read one
      small marker record in Redis, to learn whether another client has opened a
      confirm window; see below.)
    - When a Redis operation fails (a ``BackendError``: connection refused, timeout,
      Redis refusing writes), Redis is marked down and new claims go to SQL. Redis is
      then tried again at most once per ``probe_interval`` (default 5 s), by letting the
      next operation go to it; every other call goes straight to SQL without waiting. So
      only the call that notices the outage, and then one call per probe, waits for
      Redis's client timeouts (seconds: give the Redis backend short ones).
    - For a confirm window after Redis answers again, a claim that takes a key in Redis
      is also made in SQL before the caller runs anything: if SQL holds a COMPLETED or
      FAILED record, or a live IN_PROGRESS claim, for that key, the Redis claim is
      released and the SQL record is the answer. So a call completed during the outage
      is not run again, and one still running in SQL is waited for. If the claim takes
      the key in SQL too, the call holds it in both, and its result is stored in both.
      The window lasts ``confirm_window`` seconds if given, else the longest ttl or lease
      this backend has been asked to store, and in any case until every record this
      backend wrote to SQL while Redis was down has expired. After the window no SQL
      call is made.
    - complete, fail, renew and delete of a claim go to the store(s) that issued it: a
      claim taken in SQL during the outage completes in SQL even after Redis is back.
    - A call claimed or completed only in Redis before the outage may run once more
      during it (SQL cannot see it). If Redis comes back empty (a restart without
      persistence), such a call may also run once more afterwards, as with the Redis
      backend alone when Redis loses data.
    - Clients that disagree about whether Redis is down are outside the guarantee: while
      one client reaches Redis and another does not (a network partition, or a process
      that never saw the outage), both may claim the same key, one in Redis and one in
      SQL, and both run. Three cases are covered. A client in its confirm window makes
      its claims in SQL too, so clients that have not yet seen Redis recover still see
      them. A recovering client records its window in Redis, and both processes started
      later and processes that were idle for ``probe_interval`` or longer read it and
      confirm as well. What remains is a partition, and a process that made a call less
      than ``probe_interval`` before an outage shorter than that and none during it.
      Covering those would cost a SQL round trip on every call while Redis is healthy.
    - When SQL fails too, the operation raises ``BackendError`` and ``on_backend_error``
      applies. In the confirm window a claim that cannot be confirmed in SQL is released
      in Redis and raises ``BackendError`` (fail closed).

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

    Options: ``probe_interval`` (seconds between probes), ``confirm_window`` (seconds; 0
    turns confirmation off), ``max_tracked_claims`` (claims taken in SQL remembered for
    token routing; when one is forgotten its token is tried in Redis, then in SQL),
    ``marker_key`` (the key of the window marker in Redis; None: no marker) and ``clock``
    (a monotonic clock, for tests). :meth:`status` tells what the backend currently sees.
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
        self.primary = primary
        self.secondary = secondary
        self.probe_interval = _seconds("probe_interval", probe_interval)
        self.confirm_window = (
            None
            if confirm_window is None
            else _seconds("confirm_window", confirm_window, allow_zero=True)
        )
        self._max_tracked = max_tracked_claims
        self._marker_key = marker_key
        self._clock = clock
        self._lock = threading.Lock()
        # Health. _up is read without the lock on the hot path (a plain attribute read);
        # every change happens under it.
        self._up = True
        self._probing = False
        self._next_probe = 0.0
        self._last_error: str | None = None
        # The confirm window closes at _window_end (clock time). _horizon is when the
        # last record this backend wrote to the secondary alone may expire; _longest the
        # longest lease or ttl it has been asked to store, the default window length.
        self._window_end = 0.0
        self._horizon = 0.0
        self._longest = 0.0
        # When the primary was last used: the first call, and the first after an idle
        # probe_interval (an outage this backend may have slept through), read the marker.
        self._last_used = -math.inf
        # (key, token) -> where the claim was taken, for claims not in the primary alone.
        # Insertion-ordered; the oldest entries go first when it is full.
        self._routes: dict[tuple[str, str], _Route] = {}
        _instances.add(self)

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

        primary_url, parsed = _split_url(url)
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

    def _gate(self) -> _Gate:
        if self._up:  # the healthy path: no lock, no clock
            return _Gate.UP
        return self._gate_when_down()

    def _gate_when_down(self) -> _Gate:
        now = self._clock()
        with self._lock:
            if self._up:  # a probe succeeded meanwhile
                return _Gate.UP
            if self._probing or now < self._next_probe:
                return _Gate.DOWN
            # One probe at a time: a hung primary delays this caller only.
            self._probing = True
            return _Gate.PROBE

    def _mark_down(self, exc: BaseException) -> None:
        now = self._clock()
        with self._lock:
            was_up = self._up
            self._up = False
            self._probing = False
            self._next_probe = now + self.probe_interval
            self._last_error = f"{type(exc).__name__}: {exc}"
        if was_up:
            logger.warning(
                "idempotask: primary store %r is down (%s); new claims go to %r, and the "
                "primary is tried again every %gs",
                self.primary,
                exc,
                self.secondary,
                self.probe_interval,
            )

    def _recovered(self) -> float:
        """Mark the primary up and open the confirm window; returns its length."""
        now = self._clock()
        with self._lock:
            self._up = True
            self._probing = False
            self._window_end = max(self._window_end, now + self._window_length(), self._horizon)
            length = max(0.0, self._window_end - now)
        logger.warning(
            "idempotask: primary store %r answers again; new claims are confirmed in %r "
            "for the next %.0fs",
            self.primary,
            self.secondary,
            length,
        )
        return length

    def _window_length(self) -> float:
        return self.confirm_window if self.confirm_window is not None else self._longest

    def _confirming(self) -> bool:
        return self._window_end > self._clock()

    def _secondary_may_hold(self) -> bool:
        """Whether the secondary may hold a live claim or record this backend must honour."""
        return not self._up or self._confirming()

    def _saw(self, seconds: float) -> None:
        # Unlocked: a lost update only shortens a default that the next call corrects.
        if seconds > self._longest:
            self._longest = seconds

    def _wrote_secondary_alone(self, seconds: float) -> None:
        """A record in the secondary alone lives ``seconds`` more: keep the window open
        at least that long (capped by ``confirm_window`` when one is configured)."""
        if self.confirm_window is not None:
            seconds = min(seconds, self.confirm_window)
        until = self._clock() + seconds
        with self._lock:
            self._horizon = max(self._horizon, until)
            if self._up and self._window_end < until:
                self._window_end = until

    def _join_window(self, seconds: float) -> None:
        with self._lock:
            self._window_end = max(self._window_end, self._clock() + seconds)

    def _track(self, key: str, token: str, route: _Route) -> None:
        with self._lock:
            routes = self._routes
            routes.pop((key, token), None)
            routes[(key, token)] = route
            while len(routes) > self._max_tracked:
                del routes[next(iter(routes))]

    def _route(self, key: str, token: str) -> _Route | None:
        # No lock: a dict lookup is atomic, and an empty map (the healthy case) is cheap.
        return self._routes.get((key, token)) if self._routes else None

    def _untrack(self, key: str, token: str) -> None:
        with self._lock:
            self._routes.pop((key, token), None)

    def _down_error(self) -> BackendError:
        with self._lock:
            wait = max(0.0, self._next_probe - self._clock())
            last = self._last_error
        return BackendError(
            f"fallback: the primary store {self.primary!r} is marked down (last error: "
            f"{last}); it is tried again in {wait:.1f}s"
        )

    def _both_failed(self, primary_error: BaseException, exc: BaseException) -> BackendError:
        return BackendError(
            f"fallback: both stores failed: the primary {self.primary!r} ({primary_error}) "
            f"and the secondary {self.secondary!r} ({exc})"
        )

    # ------------------------------------------------------------------ plans

    def _primary(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Plan[Any]:
        """``op`` on the primary, keeping its health: raises BackendError at once when it
        is marked down, marks it down when it fails, up when a probe succeeds."""
        gate = self._gate()
        if gate is _Gate.DOWN:
            raise self._down_error()
        settled = False
        try:
            try:
                if self._marker_key is not None:
                    now = self._clock()
                    idle = now - self._last_used >= self.probe_interval
                    self._last_used = now  # before the read: concurrent callers read once
                    if idle:
                        yield from self._read_marker(self._marker_key)
                reply = yield self.primary, op, args, kwargs
            except BackendError as exc:
                if _is_outage(exc):
                    self._mark_down(exc)
                    settled = True
                raise
            settled = True
            if gate is _Gate.PROBE:
                length = self._recovered()
                yield from self._write_marker(length)
            return reply
        finally:
            if gate is _Gate.PROBE and not settled:
                # Cancelled, or a corrupt record: the primary answered or we cannot tell;
                # either way the next call may probe again.
                with self._lock:
                    self._probing = False

    def _read_marker(self, key: str) -> _Plan[None]:
        """Learn whether a recovering client opened a confirm window this backend missed."""
        try:
            marker: Record | None = yield self.primary, "get", (key,), {}
        except CorruptRecordError:
            return
        if marker is not None:
            seconds = marker.expires_in
            if seconds is None:  # a store that cannot tell: assume the configured window
                seconds = self.confirm_window or 0.0
            self._join_window(seconds)

    def _write_marker(self, seconds: float) -> _Plan[None]:
        """Record the confirm window in the primary for processes that start later or
        slept through the outage.

        The marker is a claim held by a fixed owner for ``seconds``: any recovering client
        re-takes it (same owner), and a longer window already there is kept.
        """
        key = self._marker_key
        if key is None or seconds <= 0:
            return
        try:
            current: Record | None = yield self.primary, "get", (key,), {}
            if current is not None and (current.expires_in or 0.0) >= seconds:
                return
            token = uuid.uuid4().hex
            kwargs = {"lease": seconds, "owner": _MARKER_OWNER}
            yield self.primary, "claim", (key, token), kwargs
        except BackendError as exc:
            # Only processes started later miss it; this one confirms regardless.
            logger.debug("idempotask: could not record the confirm window in %r: %s", key, exc)

    def _claim(
        self, key: str, token: str, lease: float, owner: str, fingerprint: str
    ) -> _Plan[Record]:
        self._saw(lease)
        kwargs = {"lease": lease, "owner": owner, "fingerprint": fingerprint}
        if self._route(key, token) is _Route.SECONDARY:
            # A claim retried with its own token: where it was taken.
            return (yield from self._claim_secondary(key, token, kwargs, lease, None))
        try:
            record: Record = yield from self._primary("claim", (key, token), kwargs)
        except BackendError as exc:
            if not _is_outage(exc):
                raise
            return (yield from self._claim_secondary(key, token, kwargs, lease, exc))
        if not record.held_by(token) or not self._confirming():
            return record
        # The confirm window: the key was free in the primary; the secondary decides.
        try:
            other: Record = yield self.secondary, "claim", (key, token), kwargs
        except BackendError as exc:
            yield from self._release_primary(key, token)
            raise BackendError(
                f"fallback: {key!r} was claimed in the primary {self.primary!r}, but the "
                f"secondary {self.secondary!r}, which may hold a result stored during the "
                f"outage, cannot confirm it ({exc}); the claim was released"
            ) from exc
        if other.held_by(token):
            self._track(key, token, _Route.BOTH)
            return record
        yield from self._release_primary(key, token)
        return other

    def _claim_secondary(
        self,
        key: str,
        token: str,
        kwargs: dict[str, Any],
        lease: float,
        primary_error: BaseException | None,
    ) -> _Plan[Record]:
        # Before the write: if its answer is lost, the record may exist all the same.
        self._wrote_secondary_alone(lease)
        try:
            record: Record = yield self.secondary, "claim", (key, token), kwargs
        except BackendError as exc:
            if primary_error is None:
                raise
            raise self._both_failed(primary_error, exc) from exc
        if record.held_by(token):
            self._track(key, token, _Route.SECONDARY)
        return record

    def _release_primary(self, key: str, token: str) -> _Plan[None]:
        try:
            yield from self._primary("delete", (key,), {"token": token})
        except BackendError as exc:
            logger.warning(
                "idempotask: could not release %r in %r after the secondary answered; it "
                "stays claimed there until its lease runs out: %s",
                key,
                self.primary,
                exc,
            )

    def _by_token(
        self,
        op: str,
        key: str,
        token: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        seconds: float | None,
    ) -> _Plan[bool]:
        """complete, fail, renew or delete(token=...): to the store(s) that issued it."""
        if seconds is not None:
            self._saw(seconds)
        route = self._route(key, token)
        if route is _Route.SECONDARY:
            if seconds is not None:
                self._wrote_secondary_alone(seconds)
            done: bool = yield self.secondary, op, args, kwargs
        elif route is _Route.BOTH:
            done = yield from self._on_both(op, args, kwargs)
        else:
            done = yield from self._primary_then_secondary(op, args, kwargs, seconds)
        if done and op == "delete":
            self._untrack(key, token)
        return done

    def _on_both(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Plan[bool]:
        """A claim held in both stores: the primary's answer counts while it answers."""
        primary_error: BackendError | None = None
        answer = False
        try:
            answer = yield from self._primary(op, args, kwargs)
        except BackendError as exc:
            if not _is_outage(exc):
                raise
            primary_error = exc
        try:
            in_secondary: bool = yield self.secondary, op, args, kwargs
        except BackendError as exc:
            if primary_error is not None:
                raise self._both_failed(primary_error, exc) from exc
            # The primary has it; the secondary's copy runs out with its lease.
            logger.warning(
                "idempotask: %s of %r in %r failed: %s", op, args[0], self.secondary, exc
            )
            return answer
        return answer if primary_error is None else in_secondary

    def _primary_then_secondary(
        self,
        op: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        seconds: float | None,
    ) -> _Plan[bool]:
        """A token this backend did not route: the primary's, unless the secondary has it
        (a claim forgotten by the bounded map, or a caller sharing tokens between stores).
        The secondary is asked only when it may hold one of our claims, so never while
        the primary is healthy and no window is open."""
        try:
            done: bool = yield from self._primary(op, args, kwargs)
        except BackendError as exc:
            if not _is_outage(exc) or not self._secondary_may_hold():
                raise
            try:
                found: bool = yield self.secondary, op, args, kwargs
            except BackendError as exc2:
                raise self._both_failed(exc, exc2) from exc2
            if not found:
                # Most likely a claim taken in the primary before the outage: the store
                # that holds it cannot be reached, which is not the same as "not held".
                raise
            if seconds is not None:
                self._wrote_secondary_alone(seconds)
            return True
        if done or not self._secondary_may_hold():
            return done
        found = yield self.secondary, op, args, kwargs
        return found

    def _get(self, key: str) -> _Plan[Record | None]:
        try:
            record: Record | None = yield from self._primary("get", (key,), {})
        except BackendError as exc:
            if not _is_outage(exc):
                raise
            try:
                fallback: Record | None = yield self.secondary, "get", (key,), {}
            except BackendError as exc2:
                raise self._both_failed(exc, exc2) from exc2
            return fallback
        if record is None and self._confirming():
            record = yield self.secondary, "get", (key,), {}
        return record

    def _delete_any(self, key: str) -> _Plan[bool]:
        primary_error: BackendError | None = None
        removed = False
        try:
            removed = yield from self._primary("delete", (key,), {})
        except BackendError as exc:
            if not _is_outage(exc):
                raise
            primary_error = exc
        if primary_error is None and not self._secondary_may_hold():
            return removed
        try:
            in_secondary: bool = yield self.secondary, "delete", (key,), {}
        except BackendError as exc:
            if primary_error is not None:
                raise self._both_failed(primary_error, exc) from exc
            # A record left in the secondary would be confirmed back: say so.
            raise BackendError(
                f"fallback: {key!r} was deleted in the primary {self.primary!r} but not in "
                f"the secondary {self.secondary!r} ({exc}); delete it again"
            ) from exc
        return removed or in_secondary

    # ------------------------------------------------------------------ drivers

    def _run(self, plan: _Plan[_T]) -> _T:
        """Perform a plan's steps with the stores' sync methods."""
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                store, op, args, kwargs = plan.send(reply) if error is None else plan.throw(error)
            except StopIteration as stop:
                result: _T = stop.value
                return result
            error = None
            try:
                reply = getattr(store, op)(*args, **kwargs)
            except BaseException as exc:  # the plan decides; what it does not catch leaves
                error = exc

    async def _arun(self, plan: _Plan[_T]) -> _T:
        """Perform a plan's steps with the stores' ``a``-prefixed coroutines."""
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                store, op, args, kwargs = plan.send(reply) if error is None else plan.throw(error)
            except StopIteration as stop:
                result: _T = stop.value
                return result
            error = None
            try:
                reply = await getattr(store, _ASYNC_NAMES[op])(*args, **kwargs)
            except BaseException as exc:  # cancellation too: the plan's finally runs
                error = exc

    # ------------------------------------------------------------------ sync API

    def claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        """Take ``key`` with ``token``, or return the record that holds it (see the class
        docstring for which store answers).

        >>> from idempotask.backends.memory import MemoryBackend
        >>> store = FallbackBackend(MemoryBackend(), MemoryBackend())
        >>> store.claim("k", "t1", lease=30).held_by("t1")
        True
        """
        return self._run(self._claim(key, token, lease, owner, fingerprint))

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Store a result for the claim held with ``token``, in the store(s) holding it.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> store = FallbackBackend(MemoryBackend(), MemoryBackend())
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.complete("k", "t1", b"42", ttl=3600)
        True
        """
        return self._run(
            self._by_token("complete", key, token, (key, token, payload), {"ttl": ttl}, ttl)
        )

    def fail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Store a failure for the claim held with ``token``, in the store(s) holding it.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> store = FallbackBackend(MemoryBackend(), MemoryBackend())
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.fail("k", "t1", b"ValueError: no", ttl=60)
        True
        """
        return self._run(
            self._by_token("fail", key, token, (key, token, payload), {"ttl": ttl}, ttl)
        )

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """Restart the lease of the claim held with ``token``, where it was taken.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> store = FallbackBackend(MemoryBackend(), MemoryBackend())
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.renew("k", "t1", lease=30)
        True
        """
        return self._run(self._by_token("renew", key, token, (key, token), {"lease": lease}, lease))

    def get(self, key: str) -> Record | None:
        """The record under ``key``: the primary's; the secondary's while the primary is
        down, or in the confirm window when the primary has none.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> FallbackBackend(MemoryBackend(), MemoryBackend()).get("k") is None
        True
        """
        return self._run(self._get(key))

    def delete(self, key: str, *, token: str | None = None) -> bool:
        """Remove the record (only if it carries ``token``, when given). Without a token
        it is removed from the secondary too whenever the secondary may hold one.

        >>> from idempotask.backends.memory import MemoryBackend
        >>> store = FallbackBackend(MemoryBackend(), MemoryBackend())
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.delete("k", token="t1")
        True
        """
        if token is None:
            return self._run(self._delete_any(key))
        return self._run(self._by_token("delete", key, token, (key,), {"token": token}, None))

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
        errors: list[BaseException] = []
        for store in (self.primary, self.secondary):
            close = getattr(store, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as exc:  # close the other one all the same
                    errors.append(exc)
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ async API

    async def aclaim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        """Async :meth:`claim`.

        >>> record = await store.aclaim("k", "t1", lease=30)  # doctest: +SKIP
        """
        return await self._arun(self._claim(key, token, lease, owner, fingerprint))

    async def acomplete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Async :meth:`complete`.

        >>> await store.acomplete("k", "t1", b"42", ttl=3600)  # doctest: +SKIP
        True
        """
        return await self._arun(
            self._by_token("complete", key, token, (key, token, payload), {"ttl": ttl}, ttl)
        )

    async def afail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Async :meth:`fail`.

        >>> await store.afail("k", "t1", b"ValueError: no", ttl=60)  # doctest: +SKIP
        True
        """
        return await self._arun(
            self._by_token("fail", key, token, (key, token, payload), {"ttl": ttl}, ttl)
        )

    async def arenew(self, key: str, token: str, *, lease: float) -> bool:
        """Async :meth:`renew`.

        >>> await store.arenew("k", "t1", lease=30)  # doctest: +SKIP
        True
        """
        return await self._arun(
            self._by_token("renew", key, token, (key, token), {"lease": lease}, lease)
        )

    async def aget(self, key: str) -> Record | None:
        """Async :meth:`get`.

        >>> await store.aget("k")  # doctest: +SKIP
        """
        return await self._arun(self._get(key))

    async def adelete(self, key: str, *, token: str | None = None) -> bool:
        """Async :meth:`delete`.

        >>> await store.adelete("k", token="t1")  # doctest: +SKIP
        True
        """
        if token is None:
            return await self._arun(self._delete_any(key))
        return await self._arun(
            self._by_token("delete", key, token, (key,), {"token": token}, None)
        )

    async def aclose(self) -> None:
        """Close both stores' connections for the running event loop.

        >>> await store.aclose()  # doctest: +SKIP
        """
        errors: list[BaseException] = []
        for store in (self.primary, self.secondary):
            aclose = getattr(store, "aclose", None)
            if callable(aclose):
                try:
                    await aclose()
                except Exception as exc:  # close the other one all the same
                    errors.append(exc)
        if errors:
            raise errors[0]


# ---------------------------------------------------------------------- URL form


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """The primary's URL, and our options (``secondary`` decoded) from a fallback URL.

    >>> _split_url("fallback+redis://h:6379/0?socket_timeout=1&secondary=sqlite%3A%2F%2F%2Fa.db")
    ('redis://h:6379/0?socket_timeout=1', {'secondary': 'sqlite:///a.db'})
    """
    scheme, sep, rest = url.partition("://") if isinstance(url, str) else ("", "", "")
    primary_scheme = scheme.lower().removeprefix(_SCHEME_PREFIX)
    if not sep or not scheme.lower().startswith(_SCHEME_PREFIX):
        raise ConfigurationError(
            f"fallback URL: expected 'fallback+redis://host:6379/0?secondary=...', got "
            f"{_redacted(url)!r}"
        )
    if primary_scheme not in _PRIMARY_SCHEMES:
        raise ConfigurationError(
            f"fallback URL: the primary must be a Redis URL ({', '.join(_PRIMARY_SCHEMES)}), "
            f"got {scheme!r}; write e.g. 'fallback+redis://host:6379/0?secondary=...'"
        )
    base, _, query = rest.partition("?")
    kept: list[str] = []
    ours: dict[str, str] = {}
    for part in query.split("&") if query else ():
        raw_name, _, raw_value = part.partition("=")
        name = unquote(raw_name)
        if name not in _URL_OPTIONS:
            kept.append(part)  # the Redis URL's own, passed on verbatim
            continue
        if name in ours:
            raise ConfigurationError(f"fallback URL: {name!r} is given twice")
        if name == "secondary" and ("://" in raw_value or "?" in raw_value):
            # Unencoded, its own '&' and '?' would be read as the fallback URL's.
            raise ConfigurationError(
                "fallback URL: the secondary URL must be percent-encoded whole, e.g. "
                "secondary=postgresql%2Bpsycopg%3A%2F%2Fapp%40db%2Fapp (urllib.parse.quote("
                "url, safe='') does it; idempotask.backends.fallback.fallback_url() builds "
                "the whole URL)"
            )
        ours[name] = unquote(raw_value)
    if not ours.get("secondary"):
        raise ConfigurationError(
            "fallback URL: the secondary store is missing; add "
            "?secondary=<percent-encoded URL>, e.g. secondary=sqlite%3A%2F%2F%2Fidem.db"
        )
    if ours["secondary"].lower().startswith(_SCHEME_PREFIX):
        raise ConfigurationError("fallback URL: the secondary cannot be a fallback store itself")
    primary = f"{primary_scheme}://{base}" + ("?" + "&".join(kept) if kept else "")
    return primary, ours


def _redacted(url: object) -> str:
    """A URL for an error message, without anything between ``://`` and ``@``."""
    if not isinstance(url, str):
        return repr(url)
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path.partition('?')[0]}"


def fallback_url(
    primary: str,
    secondary: str,
    *,
    probe_interval: float | None = None,
    confirm_window: float | None = None,
) -> str:
    """The URL of a :class:`FallbackBackend` on a Redis ``primary`` URL and any
    ``secondary`` URL (encoded here, so its own ``?``, ``&`` and ``%`` survive).

    >>> fallback_url("redis://cache:6379/0", "postgresql+psycopg://app@db/app")
    'fallback+redis://cache:6379/0?secondary=postgresql%2Bpsycopg%3A%2F%2Fapp%40db%2Fapp'
    >>> fallback_url("redis://cache/0?socket_timeout=1", "sqlite:///idem.db", probe_interval=2)
    'fallback+redis://cache/0?socket_timeout=1&secondary=sqlite%3A%2F%2F%2Fidem.db&probe_interval=2'
    """
    scheme = primary.partition("://")[0].lower() if isinstance(primary, str) else ""
    if scheme not in _PRIMARY_SCHEMES:
        raise ConfigurationError(
            f"fallback_url: the primary must be a redis://, rediss:// or unix:// URL, got "
            f"{_redacted(primary)!r}"
        )
    if not isinstance(secondary, str) or "://" not in secondary:
        raise ConfigurationError(
            f"fallback_url: the secondary must be a store URL, got {_redacted(secondary)!r}"
        )
    params: Mapping[str, float | None] = {
        "probe_interval": probe_interval,
        "confirm_window": confirm_window,
    }
    query = [f"secondary={quote(secondary, safe='')}"]
    for name, value in params.items():
        if value is not None:
            _seconds(name, value, allow_zero=name == "confirm_window")
            query.append(f"{name}={value:g}")
    separator = "&" if "?" in primary else "?"
    return f"{_SCHEME_PREFIX}{primary}{separator}{'&'.join(query)}"

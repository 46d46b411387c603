"""The fallback store's decisions, as flows (:mod:`idempotask.flow`): which store serves
each operation, and when. :class:`Router` holds the state they share (the primary's
health, the confirm window, the claims taken outside the primary alone)."""

from __future__ import annotations

import enum
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any

from idempotask.backends.base import Backend, Record, SupportsScan
from idempotask.backends.memory._common import new_lock
from idempotask.errors import BackendError, CorruptRecordError
from idempotask.flow import Flow, store_op

__all__ = ["MARKER_LADDER", "Route", "Router", "marker_bucket"]

logger = logging.getLogger("idempotask.backends.fallback")

MARKER_OWNER = "idempotask-fallback"
# A primary operation whose caller gave up on it after this many seconds without an
# answer marks the primary down, as its failure would (a healthy Redis answers in ms).
_GAVE_UP_AFTER = 1.0
# The lengths (seconds) an outage marker may have. A marker covering ``s`` seconds of
# records written to the secondary alone has the smallest length >= 2 s, so it is
# rewritten at most once per ``s`` during an outage. Every writer of one key writes the
# same length, so a re-take (same owner: the lease restarts) only ever moves its end
# later, whoever writes it; a reader lists them all (one scan, or one get each).
MARKER_LADDER = (120, 1_200, 14_400, 172_800, 1_728_000, 31_536_000, 315_360_000)


def marker_bucket(seconds: float) -> int:
    """The ladder length that covers ``seconds`` twice over (the longest, past it)."""
    for length in MARKER_LADDER:
        if length >= 2 * seconds:
            return length
    return MARKER_LADDER[-1]


class Gate(enum.Enum):
    """What a call may do with the primary right now."""

    UP = "up"  # healthy: use it
    PROBE = "probe"  # marked down, and this call is the one probe of the interval
    DOWN = "down"  # marked down: go straight to the secondary


class Route(enum.Enum):
    """Which store(s) issued a claim, for the operations that carry its token."""

    SECONDARY = "secondary"  # taken in the secondary only (the primary was down)
    BOTH = "both"  # taken in both (the confirm window)


def is_outage(exc: BaseException) -> bool:
    """A store failure that means "unreachable", not "answered with bad data"."""
    return isinstance(exc, BackendError) and not isinstance(exc, CorruptRecordError)


class Router:
    """The state and the plans of a fallback store (see ``FallbackBackend``)."""

    primary: Backend
    secondary: Backend
    probe_interval: float
    confirm_window: float | None

    def _init_state(
        self, max_tracked: int, marker_key: str | None, clock: Callable[[], float]
    ) -> None:
        self._max_tracked = max_tracked
        self._marker_key = marker_key
        self._clock = clock
        self._lock = new_lock(self)  # re-made in a forked child
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
        # Outage markers in the secondary: read at first use (by every caller until one
        # read answered) and then by one caller per probe_interval; _covered_until is
        # how far the markers this backend wrote reach (clock time).
        self._markers_known = marker_key is None or self.confirm_window == 0
        self._next_marker_read = -math.inf if not self._markers_known else math.inf
        self._covered_until = -math.inf
        # (key, token) -> where the claim was taken, for claims not in the primary alone.
        # Insertion-ordered; the oldest entries go first when it is full.
        self._routes: dict[tuple[str, str], Route] = {}

    # ------------------------------------------------------------------ health

    def _gate(self) -> Gate:
        if self._up:  # the healthy path: no lock, no clock
            return Gate.UP
        return self._gate_when_down()

    def _gate_when_down(self) -> Gate:
        now = self._clock()
        with self._lock:
            if self._up:  # a probe succeeded meanwhile
                return Gate.UP
            if self._probing or now < self._next_probe:
                return Gate.DOWN
            # One probe at a time: a hung primary delays this caller only.
            self._probing = True
            return Gate.PROBE

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

    def _recovered(self) -> None:
        """Mark the primary up and open the confirm window."""
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

    def _join_window(self, seconds: float) -> None:
        with self._lock:
            self._window_end = max(self._window_end, self._clock() + seconds)

    def _track(self, key: str, token: str, route: Route) -> None:
        with self._lock:
            routes = self._routes
            routes.pop((key, token), None)
            routes[(key, token)] = route
            while len(routes) > self._max_tracked:
                del routes[next(iter(routes))]

    def _route(self, key: str, token: str) -> Route | None:
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

    # ------------------------------------------------------------------ outage markers

    def _cover(self, seconds: float, *, strict: bool) -> Flow[None]:
        """Before writing a record to the secondary alone that lives ``seconds``: make
        sure an outage marker in the secondary outlives it, so every process -- one that
        never saw the outage, one started after it -- confirms its claims there.

        ``strict``: a marker that cannot be written fails the operation (a claim, before
        anything ran); otherwise it is logged (a result, which must still be stored).
        """
        if self.confirm_window is not None:
            seconds = min(seconds, self.confirm_window)
        until = self._clock() + seconds
        with self._lock:
            self._horizon = max(self._horizon, until)
            if self._up and self._window_end < until:
                self._window_end = until
        key = self._marker_key
        if key is None or seconds <= 0 or until <= self._covered_until:
            return
        length = marker_bucket(seconds)
        started = self._clock()
        try:
            yield store_op(
                self.secondary,
                "claim",
                f"{key}:{length}",
                uuid.uuid4().hex,
                lease=float(length),
                owner=MARKER_OWNER,
            )
        except BackendError as exc:
            if strict:
                raise BackendError(
                    f"fallback: the outage marker {key}:{length} could not be written to "
                    f"{self.secondary!r} ({exc}); without it a process that never saw the "
                    "outage could run this call again, so the claim is refused"
                ) from exc
            logger.error(
                "idempotask: could not write the outage marker %s:%s to %r: %s",
                key,
                length,
                self.secondary,
                exc,
            )
            return
        with self._lock:
            # The marker's lease runs on the store's clock from about when it was sent
            # (less a margin for the round trip and the two clocks' rates).
            covered = started + length - max(1.0, 0.05 * length)
            self._covered_until = max(self._covered_until, covered)

    def _read_markers(self) -> Flow[None]:
        """Learn whether any process wrote records to the secondary alone that are still
        live (its outage markers), and confirm claims there until they have expired."""
        key = self._marker_key
        assert key is not None
        found: list[tuple[Record, int]] = []
        try:
            if isinstance(self.secondary, SupportsScan):
                records: list[Record] = yield store_op(self.secondary, "scan", key + ":", limit=64)
                for record in records:
                    tail = record.key[len(key) + 1 :]
                    if tail.isdigit():
                        found.append((record, int(tail)))
            else:
                for length in MARKER_LADDER:
                    one: Record | None = yield store_op(self.secondary, "get", f"{key}:{length}")
                    if one is not None:
                        found.append((one, length))
        except BackendError as exc:
            # A secondary that cannot be read cannot be confirmed against either; try
            # again an interval later rather than make every call wait for it.
            with self._lock:
                self._next_marker_read = self._clock() + self.probe_interval
            logger.warning(
                "idempotask: could not read the outage markers in %r; claims go to the "
                "primary alone until the next read: %s",
                self.secondary,
                exc,
            )
            return
        with self._lock:
            if not self._markers_known:
                self._markers_known = True
                self._next_marker_read = max(
                    self._next_marker_read, self._clock() + self.probe_interval
                )
        longest = max(
            (float(length) if r.expires_in is None else r.expires_in for r, length in found),
            default=0.0,
        )
        if longest > 0:
            self._join_window(longest)

    def _maybe_read_markers(self) -> Flow[None]:
        now = self._clock()
        with self._lock:
            if now < self._next_marker_read:
                return  # another caller took this read
            # Until one read has answered, every caller reads (a process started during
            # an outage must not let its first callers through unconfirmed).
            if self._markers_known:
                self._next_marker_read = now + self.probe_interval
        yield from self._read_markers()

    # ------------------------------------------------------------------ plans

    def _primary(self, op: str, *args: Any, **kwargs: Any) -> Flow[Any]:
        """``op`` on the primary, keeping its health: raises BackendError at once when it
        is marked down, marks it down when it fails, up when a probe succeeds."""
        gate = self._gate()
        if gate is Gate.DOWN:
            raise self._down_error()
        settled = False
        try:
            try:
                if gate is Gate.UP and self._clock() >= self._next_marker_read:
                    yield from self._maybe_read_markers()
                sent = self._clock()
                try:
                    reply = yield store_op(self.primary, op, *args, **kwargs)
                except GeneratorExit:
                    # The caller gave up (cancelled, a deadline of its own): a primary
                    # that kept it waiting that long is down, or callers whose deadlines
                    # are shorter than its client's timeouts would never reach the
                    # secondary while it hangs.
                    waited = self._clock() - sent
                    if waited >= _GAVE_UP_AFTER:
                        self._mark_down(
                            TimeoutError(f"{op} unanswered after {waited:.1f}s, the caller gave up")
                        )
                        settled = True
                    raise
            except BackendError as exc:
                if is_outage(exc):
                    self._mark_down(exc)
                    settled = True
                raise
            settled = True
            if gate is Gate.PROBE:
                self._recovered()
            return reply
        finally:
            if gate is Gate.PROBE and not settled:
                # Cancelled, or a corrupt record: the primary answered or we cannot tell;
                # either way the next call may probe again.
                with self._lock:
                    self._probing = False

    def _try_primary(
        self, op: str, *args: Any, **kwargs: Any
    ) -> Flow[tuple[Any, BackendError | None]]:
        """``op`` on the primary (see :meth:`_primary`): ``(its answer, None)``, or
        ``(None, the error)`` when the primary is out; any other failure raises."""
        try:
            return (yield from self._primary(op, *args, **kwargs)), None
        except BackendError as exc:
            if not is_outage(exc):
                raise
            return None, exc

    def _secondary(
        self, down: BackendError | None, op: str, *args: Any, **kwargs: Any
    ) -> Flow[Any]:
        """``op`` on the secondary; with ``down`` (the primary's outage) its failure is
        both stores' failure."""
        try:
            return (yield store_op(self.secondary, op, *args, **kwargs))
        except BackendError as exc:
            if down is not None:
                raise self._both_failed(down, exc) from exc
            raise

    def _claim_secondary(
        self,
        key: str,
        token: str,
        kwargs: dict[str, Any],
        lease: float,
        primary_error: BaseException | None,
    ) -> Flow[Record]:
        try:
            # Before the write: if its answer is lost, the record may exist all the same.
            yield from self._cover(lease, strict=True)
            record: Record = yield store_op(self.secondary, "claim", key, token, **kwargs)
        except BackendError as exc:
            if primary_error is None:
                raise
            raise self._both_failed(primary_error, exc) from exc
        if record.held_by(token):
            self._track(key, token, Route.SECONDARY)
        return record

    def _release_primary(self, key: str, token: str) -> Flow[None]:
        try:
            yield from self._primary("delete", key, token=token)
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
    ) -> Flow[bool]:
        """complete, fail, renew or delete(token=...): to the store(s) that issued it."""
        if seconds is not None:
            self._saw(seconds)
        route = self._route(key, token)
        if route is Route.SECONDARY:
            if seconds is not None:
                yield from self._cover(seconds, strict=False)
            done: bool = yield store_op(self.secondary, op, *args, **kwargs)
        elif route is Route.BOTH:
            done = yield from self._on_both(op, args, kwargs, seconds)
        else:
            done = yield from self._primary_then_secondary(op, args, kwargs, seconds)
        if done and op == "delete":
            self._untrack(key, token)
        return done

    def _on_both(
        self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any], seconds: float | None
    ) -> Flow[bool]:
        """A claim held in both stores: the primary's answer counts while it answers."""
        answer, down = yield from self._try_primary(op, *args, **kwargs)
        if down is not None and seconds is not None:
            # The primary is out again: this lease or result lands in the secondary alone.
            yield from self._cover(seconds, strict=False)
        try:
            in_secondary: bool = yield from self._secondary(down, op, *args, **kwargs)
        except BackendError as exc:
            if down is not None:
                raise
            # The primary has it; the secondary's copy runs out with its lease.
            logger.warning(
                "idempotask: %s of %r in %r failed: %s", op, args[0], self.secondary, exc
            )
            return bool(answer)
        return bool(answer) if down is None else in_secondary

    def _primary_then_secondary(
        self,
        op: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        seconds: float | None,
    ) -> Flow[bool]:
        """A token this backend did not route: the primary's, unless the secondary has it
        (a claim forgotten by the bounded map, or a caller sharing tokens between stores).
        The secondary is asked only when it may hold one of our claims, so never while
        the primary is healthy and no window is open."""
        done, down = yield from self._try_primary(op, *args, **kwargs)
        if down is None and (done or not self._secondary_may_hold()):
            return bool(done)
        if down is not None:
            if not self._secondary_may_hold():
                raise down
            if seconds is not None:
                yield from self._cover(seconds, strict=False)
        found: bool = yield from self._secondary(down, op, *args, **kwargs)
        if down is not None and not found:
            # Most likely a claim taken in the primary before the outage: the store
            # that holds it cannot be reached, which is not the same as "not held".
            raise down
        return found

    def _delete_any(self, key: str) -> Flow[bool]:
        removed, down = yield from self._try_primary("delete", key)
        if down is None and not self._secondary_may_hold():
            return bool(removed)
        try:
            in_secondary: bool = yield from self._secondary(down, "delete", key)
        except BackendError as exc:
            if down is not None:
                raise
            # A record left in the secondary would be confirmed back: say so.
            raise BackendError(
                f"fallback: {key!r} was deleted in the primary {self.primary!r} but not in "
                f"the secondary {self.secondary!r} ({exc}); delete it again"
            ) from exc
        return bool(removed) or in_secondary

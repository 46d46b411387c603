"""Lease renewal while a body runs.

One renewal thread per store and process serves every sync call on that store
(re-created lazily after ``fork``, ended after a while without leases), and one timer per
store and event loop serves async calls (with one task while it sends renewals): never a
thread or a task per call, and never one store's renewals waiting behind another's (a
hung store, its client's timeouts and retries taking seconds each, would let the other's
leases run out and their bodies run twice).
Each held claim is renewed every third of its lease; a renewal the store refuses means
another caller took the key over, which is reported (a ``lease_lost`` event and a
:class:`LeaseLostWarning`), never silent. The body can ask through :func:`lease_held`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import TypeVar

from idempotask import events, flow
from idempotask.backends.base import Backend
from idempotask.errors import BackendError

__all__ = ["Lease", "LeaseLostWarning", "current_lease", "lease_held"]

log = logging.getLogger("idempotask")


class LeaseLostWarning(RuntimeWarning):
    """A running call's claim was taken over; its result will not be stored."""


class Lease:
    """A claim held by a running body. ``held`` turns False once the claim is lost."""

    __slots__ = ("_lost", "active", "backend", "deadline", "due", "key", "name", "seconds", "token")

    def __init__(self, backend: Backend, key: str, token: str, seconds: float, name: str) -> None:
        self.backend = backend
        self.key = key
        self.token = token
        self.seconds = seconds
        self.name = name
        now = time.monotonic()
        self.deadline = now + seconds  # when the claim runs out unless renewed
        self.due = now + seconds / 3  # next renewal
        self._lost = False
        self.active = True  # False once the body has finished: late answers are ignored

    @property
    def reported_lost(self) -> bool:
        """Whether a renewal already found (and reported) the claim lost."""
        return self._lost

    @property
    def held(self) -> bool:
        """Whether this call still holds its claim, as far as renewals have shown."""
        return not self._lost and time.monotonic() < self.deadline

    def renewed(self, ok: bool, started: float) -> None:
        """Record a renewal answer (``started``: when the request was sent)."""
        if not self.active:
            return
        if ok:
            self.deadline = started + self.seconds
            self.due = started + self.seconds / 3
        else:
            self.lost("the store refused the renewal: another caller took the key over")

    def failed(self, exc: BaseException) -> None:
        """A renewal could not reach the store; retry soon, give up past the deadline."""
        if not self.active:
            return
        now = time.monotonic()
        if now >= self.deadline:
            self.lost(f"renewals failed until the lease ran out ({exc})")
        else:
            self.due = min(self.deadline, now + max(self.seconds / 30, 0.05))
            log.warning("idempotask: renewing %s failed, retrying: %s", self.key, exc)

    def lost(self, why: str) -> None:
        """Mark the claim lost and report it once."""
        if self._lost:
            return
        self._lost = True
        report_lost(self.name, self.key, why)


def report_lost(name: str, key: str, why: str) -> None:
    """Report a lost claim: a log record, a :class:`LeaseLostWarning` and an event."""
    message = f"idempotask: lease on {key} ({name}) lost: {why}"
    log.warning(message)
    events.emit(events.EventKind.LEASE_LOST, name, key)
    # Last: a warnings filter may turn it into an exception (-W error).
    warnings.warn(message, LeaseLostWarning, stacklevel=3)


_current: contextvars.ContextVar[Lease | None] = contextvars.ContextVar(
    "idempotask_lease", default=None
)


def current_lease() -> Lease | None:
    """The lease of the idempotent call running in this context, if any."""
    return _current.get()


def lease_held() -> bool:
    """Inside an idempotent body: whether it still holds its claim (True outside one)."""
    lease = _current.get()
    return True if lease is None else lease.held


# A renewal worker with no lease to renew for this long ends (its thread or timer); the
# next lease on its store starts it again. Stores made and dropped by the hundred (tests,
# a backend per tenant) must not leave a thread each behind.
_IDLE_EXIT = 30.0


_ANY_ERROR = (Exception,)


def _renewal(lease: Lease) -> flow.Flow[None]:
    """Renew ``lease`` once and note how it went; never raises an Exception."""
    started = time.monotonic()
    try:
        ok = yield flow.store_op(
            lease.backend, "renew", lease.key, lease.token, lease=lease.seconds
        )
    except BackendError as exc:
        lease.failed(exc)
    except Exception as exc:  # a broken third-party store must not stop the renewals
        log.exception("idempotask: unexpected error renewing %s", lease.key)
        lease.failed(exc)
    else:
        lease.renewed(ok, started)


# A LeaseLostWarning turned into an exception by a warnings filter (-W error, pytest's
# filterwarnings) must not end the renewals: a dead renewal thread is never started again,
# and every later lease on its store would run out under a body still running.
def _renew_once(lease: Lease) -> None:
    try:
        flow.drive(_renewal(lease), _ANY_ERROR)
    except Exception:
        log.exception("idempotask: reporting the lease on %s failed", lease.key)


async def _arenew_once(lease: Lease) -> None:
    try:
        await flow.adrive(_renewal(lease), _ANY_ERROR)
    except Exception:
        log.exception("idempotask: reporting the lease on %s failed", lease.key)


class _ThreadKeeper:
    """Renews the leases of every sync call on one store from one daemon thread (one per
    store, not per process: see the module's docstring)."""

    def __init__(self) -> None:
        # add()/remove() run on every call: a bare Lock is entered in C, where the
        # Condition's own __enter__ would be two Python calls more each time.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._leases: dict[int, Lease] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases[id(lease)] = lease
            if self._thread is None:
                # The name is what observability.otel looks for (events from renewals).
                self._thread = threading.Thread(
                    target=self._run, name="idempotask-lease-renewal", daemon=True
                )
                self._thread.start()
            elif lease.due < self._wake_at:
                self._cond.notify()

    def remove(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(id(lease), None)

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                now = time.monotonic()
                if self._leases:
                    idle_since = now
                elif now - idle_since >= _IDLE_EXIT:
                    self._thread = None  # under the lock: the next add() starts another
                    return
                due = [x for x in self._leases.values() if x.due <= now]
                if not due:
                    # Idle, it still looks every second, so add() rarely has to wake it:
                    # a notify per call would cost every first call a thread switch.
                    nxt = min((x.due for x in self._leases.values()), default=now + 1.0)
                    self._wake_at = nxt
                    self._cond.wait(nxt - now)
                    self._wake_at = float("inf")
                    continue
            for lease in due:
                _renew_once(lease)
                if not lease.held:
                    self.remove(lease)


class _LoopKeeper:
    """Renews the leases of every async call on one store, on one event loop.

    A loop timer set for the earliest renewal stands in for an idle task: holding a
    lease is a dict insert unless it is due before the timer (and a lease is due a third
    of its lease after its call started, so in a stream of calls it never is), and
    nothing is left pending for a loop closed without cancelling its tasks. When the
    timer fires with renewals due, one task sends them and sets the next timer. One
    keeper per store and loop (see the module's docstring).
    """

    def __init__(self) -> None:
        self._leases: dict[int, Lease] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = float("inf")  # time.monotonic() at which the timer fires
        self._task: asyncio.Task[None] | None = None  # renewals being sent

    def add(self, lease: Lease) -> None:
        self._leases[id(lease)] = lease
        if self._task is None and lease.due < self._timer_due:
            self._schedule(lease.due)

    def remove(self, lease: Lease) -> None:
        self._leases.pop(id(lease), None)

    def _schedule(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        # call_later, not call_at: a loop's clock (uvloop's) need not be time.monotonic().
        delay = max(0.0, due - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)
        self._timer_due = due

    def _fire(self) -> None:
        self._timer, self._timer_due = None, float("inf")
        if not self._leases:
            return
        now = time.monotonic()
        due = [x for x in self._leases.values() if x.due <= now]
        if not due:
            self._schedule(min(x.due for x in self._leases.values()))
            return
        self._task = asyncio.get_running_loop().create_task(
            self._renew(due), name="idempotask-lease-renewal"
        )

    async def _renew(self, due: list[Lease]) -> None:
        try:
            for lease in due:
                await _arenew_once(lease)
                if not lease.held:
                    self.remove(lease)
        finally:
            self._task = None
            # RuntimeError: no running loop, when a task of a closed loop is collected.
            if self._leases:
                with contextlib.suppress(RuntimeError):
                    self._schedule(min(x.due for x in self._leases.values()))


_K = TypeVar("_K", _ThreadKeeper, _LoopKeeper)
# A table of keepers by store: id(store) -> (a reference to the store, its keeper). The
# reference is weak where the store allows it, so a dropped store's entry is pruned (and
# a reused id is never mistaken for it); the leases being renewed hold their store.
_Table = dict[int, tuple[Callable[[], object], _K]]


def _keeper(table: _Table[_K], store: object, make: Callable[[], _K]) -> _K:
    entry = table.get(id(store))
    if entry is not None and entry[0]() is store:
        return entry[1]
    with _table_lock:
        entry = table.get(id(store))
        if entry is not None and entry[0]() is store:
            return entry[1]
        for key, (ref, _) in list(table.items()):
            if ref() is None:
                del table[key]
        try:
            ref = weakref.ref(store)
        except TypeError:  # a store with __slots__ and no __weakref__: keep it
            ref = functools.partial(_same, store)
        keeper = make()
        table[id(store)] = (ref, keeper)
        return keeper


def _same(store: object) -> object:
    return store


_table_lock = threading.Lock()
_thread_keepers: _Table[_ThreadKeeper] = {}
_loop_keepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Table[_LoopKeeper]] = (
    weakref.WeakKeyDictionary()
)


def _after_fork() -> None:
    # The parent's threads do not exist in the child and their locks may be held.
    global _thread_keepers, _loop_keepers, _table_lock
    _table_lock = threading.Lock()
    _thread_keepers = {}
    _loop_keepers = weakref.WeakKeyDictionary()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def hold(lease: Lease) -> Callable[[], None]:
    """Start renewing ``lease`` for a sync call; returns the function that stops it."""
    return _held(_keeper(_thread_keepers, lease.backend, _ThreadKeeper), lease)


def ahold(lease: Lease) -> Callable[[], None]:
    """Start renewing ``lease`` for an async call on the running loop."""
    loop = asyncio.get_running_loop()
    table = _loop_keepers.setdefault(loop, {})
    return _held(_keeper(table, lease.backend, _LoopKeeper), lease)


def _held(keeper: _ThreadKeeper | _LoopKeeper, lease: Lease) -> Callable[[], None]:
    """``lease`` renewed by ``keeper`` and current (:func:`current_lease`) until the
    returned function is called."""
    keeper.add(lease)
    token = _current.set(lease)

    def release() -> None:
        lease.active = False
        keeper.remove(lease)
        _current.reset(token)

    return release

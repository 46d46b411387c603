"""Connections kept checked out between back-to-back operations on an engine made here.

Checking a connection out of SQLAlchemy's pool and back in runs about 80,000 instructions
per operation (a ``Connection``, the pool's proxy with its finalizer, events, the pool's
queue): two thirds of psycopg's own work for a statement, and on a cold CPU cache, between
two round trips, 25 µs (sync) to 100 µs (asyncio) of CPU. A :class:`Stash` keeps a few
connections checked out, each with its :class:`~idempotask.backends.sql._dbapi.Executor`,
so that the next operation takes one with a ``deque.pop()``: the claim and the complete of
one call, and a stream of calls, pay the pool once per second per connection.

The pool stays in charge:

* Only the engines a :class:`~idempotask.backends.sql._database.Database` creates get a
  stash (their pools serve only the stores sharing it); an engine you pass is checked out
  and returned per operation, so its pool is shared with your code exactly as configured.
* At most :func:`capacity` connections wait in a stash: ``pool_size``, and never the
  pool's last connection (so ``create_tables()`` always finds one); none without a
  ``QueuePool``, or with ``pool_pre_ping`` (a ping per checkout was asked for, so each
  operation checks out). When every connection the pool may open is out, one that
  finishes goes back to the pool, where a caller may be waiting, not into the stash.
* A connection goes back through the pool at most :data:`MAX_AGE` after it came out of
  it, so ``pool_recycle``, invalidation after a disconnect and ``dispose()`` apply within
  a second; the oldest waiting connection is returned once it is due.
* One whose operation failed goes back to the pool (discarded if the executor invalidated
  it), as does one left in a transaction (SQLAlchemy's own execution, for engines with
  statement listeners). An invalidated one empties the stash: the server may be gone, and
  the others then pass the pool's checks (which replace connections older than the
  invalidation) before their next use.

Where stashed connections go when their owner stops (see ``_database``): ``close()`` and
an event loop's shutdown return them to the pool; before a ``fork()`` a sync stash is
returned to the pool in the parent, so a child never holds the parent's connections out of
it; at interpreter exit a sync stash returns its connections, and the connections of an
asyncio stash, or a parent's left in a forked child, are detached from their pool without
I/O, so SQLAlchemy's finalizers never try to return, on a closed event loop or in the
wrong process, a connection they cannot safely touch.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import weakref
from collections import deque
from collections.abc import Mapping
from time import monotonic
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import QueuePool

from idempotask.backends.sql._dbapi import CompiledCache, Executor

__all__ = ["MAX_AGE", "Entry", "Stash", "capacity", "max_overflow", "returned_to_pool"]

#: Seconds a connection may stay checked out of its pool across operations.
MAX_AGE = 1.0

# (the executor and its connection, when it goes back to the pool, the stash's epoch when
# it was checked out)
Entry = tuple[Executor, float, int]

# Every stash alive (to let go of them at exit or before a fork), and, strongly, the asyncio
# stashes that hold connections: they are returned on their loop by its guard (or detached
# at exit), never left to the garbage collector, whose SQLAlchemy finalizer would warn and
# terminate them without their loop.
_stashes: weakref.WeakSet[Stash] = weakref.WeakSet()
_async_held: set[Stash] = set()
_exit_hook = False
_exit_lock = threading.Lock()


def capacity(engine: Engine, options: Mapping[str, Any]) -> int:
    """How many connections a stash may keep for ``engine``, made with ``options``.

    >>> from sqlalchemy import create_engine
    >>> capacity(create_engine("sqlite:///x.db"), {})
    5
    >>> capacity(create_engine("sqlite:///x.db", pool_size=1, max_overflow=0), {"max_overflow": 0})
    0
    >>> capacity(create_engine("sqlite:///x.db", pool_pre_ping=True), {"pool_pre_ping": True})
    0
    """
    pool = engine.pool
    if not isinstance(pool, QueuePool) or options.get("pool_pre_ping"):
        return 0
    size = pool.size()
    overflow = max_overflow(options)
    if size <= 0:  # pool_size=0: no limit, and nothing kept idle by the pool either
        return 0
    return size if overflow < 0 else max(0, min(size, size + overflow - 1))


def max_overflow(options: Mapping[str, Any]) -> int:
    """The ``max_overflow`` of a ``QueuePool`` made with ``options`` (-1: no limit)."""
    return int(options.get("max_overflow", 10))


class Stash:
    """Up to ``capacity`` connections of ``engine`` kept out of its pool between
    operations (``capacity`` 0: every operation checks out and returns its own).

    Thread-safe without a lock: ``deque.pop`` and ``append`` are atomic, and a connection
    is in the stash or with one operation, never both. An asyncio engine's stash is used
    by its own loop only (inside the greenlet of an operation).
    """

    __slots__ = (
        "__weakref__",
        "_async",
        "_bound",
        "_compiled",
        "_epoch",
        "_idle",
        "_overflow",
        "_pid",
        "engine",
        "size",
    )

    def __init__(
        self,
        engine: Engine,
        compiled: CompiledCache,
        bound: float | None,
        size: int,
        overflow: int = -1,
    ) -> None:
        self.engine = engine
        self.size = size
        # The pool's max_overflow (-1: no limit): once that many connections beyond its
        # size exist and none is left in the pool, a caller may be waiting for one.
        self._overflow = overflow
        self._compiled = compiled
        self._bound = bound
        self._idle: deque[Entry] = deque()
        # Bumped when the stash is emptied: a connection checked out before goes back to
        # the pool instead of into the stash.
        self._epoch = 0
        self._pid = os.getpid()
        self._async = engine.dialect.is_async
        if size:
            _stashes.add(self)

    def __len__(self) -> int:
        return len(self._idle)

    def take(self) -> Entry:
        """A connection for one operation: the newest one waiting, or one from the pool."""
        idle = self._idle
        while idle:
            try:
                entry = idle.pop()
            except IndexError:  # another thread took the last one
                break
            if entry[2] == self._epoch and monotonic() < entry[1]:
                entry[0].refresh()
                return entry
            entry[0].close()
        conn = self.engine.connect()
        if self.size:
            _exit_hook_registered()
        return Executor(conn, self._compiled, self._bound), monotonic() + MAX_AGE, self._epoch

    def take_kept(self, pq: bool = False) -> Entry | None:
        """The newest waiting connection if it can be used as it is, without a greenlet or
        SQLAlchemy's execution: fresh, and its executor awaits the driver directly
        (:meth:`~idempotask.backends.sql._dbapi.Executor.acall`) or, with ``pq``, runs
        psycopg's libpq path (``run_pq``, ``arun_pq``); else None (and :meth:`take`)."""
        idle = self._idle
        try:
            entry = idle.pop()
        except IndexError:
            return None
        execute, due, epoch = entry
        if epoch == self._epoch and monotonic() < due:
            execute.refresh()
            if execute.runs_pq if pq else execute.awaits_directly:
                return entry
        idle.append(entry)  # take() returns it to the pool, or runs it in a greenlet
        return None

    def give(self, entry: Entry) -> None:
        """After an operation that succeeded: keep the connection for the next one, or
        return it to the pool; and return the oldest waiting one if it is due."""
        returned = self.release(entry)
        if returned is not None:
            returned_to_pool(*returned)

    def release(
        self, entry: Entry, untouched: bool = False
    ) -> tuple[Entry | None, Entry | None] | None:
        """:meth:`give` without I/O: None, or the connections for the caller to return to
        the pool (``entry`` unless it went back into the stash, and the oldest waiting one
        if it is due: one used by a thread that stopped calling, say).

        ``untouched``: the operation ran only on the libpq path, which leaves the
        ``Connection`` as it was (valid, with no transaction), so that is not looked at
        again.
        """
        execute, due, epoch = entry
        idle = self._idle
        now = monotonic()
        kept = (
            now < due
            and epoch == self._epoch
            and len(idle) < self.size
            and (
                untouched
                or not (execute.connection.invalidated or execute.connection.in_transaction())
            )
            and not self._exhausted()
        )
        if kept:
            if self._async and not idle:
                _async_held.add(self)
            idle.append(entry)
        try:
            oldest: Entry | None = idle[0]
        except IndexError:  # another thread took the last one
            oldest = None
        if oldest is not None and oldest is not entry and now >= oldest[1]:
            try:
                idle.remove(oldest)
            except ValueError:  # taken meanwhile
                oldest = None
        else:
            oldest = None
        if kept and oldest is None:
            return None
        return None if kept else entry, oldest

    def _exhausted(self) -> bool:
        """Whether every connection the pool may open is out of it: then a caller may be
        waiting in the pool (it found the stash empty), so a connection goes back there
        rather than into the stash, where that caller would not see it."""
        if self._overflow < 0:
            return False
        pool: QueuePool = self.engine.pool  # type: ignore[assignment]
        return pool.overflow() >= self._overflow and pool.checkedin() == 0

    def discard(self, entry: Entry) -> None:
        """After an operation that failed: its connection goes back to the pool (the
        executor invalidated it if it cannot be trusted); an invalidated one empties the
        stash, since the others may be as broken."""
        if entry[0].connection.invalidated:
            self.clear()
        entry[0].close()

    def clear(self) -> None:
        """Return every waiting connection to the pool (for an asyncio engine: inside a
        greenlet on its loop, as pool returns are)."""
        self._epoch += 1
        idle = self._idle
        while True:
            try:
                execute = idle.pop()[0]
            except IndexError:
                break
            execute.close()
        _async_held.discard(self)

    def let_go(self) -> None:
        """Detach every waiting connection from its pool, without I/O: where returning it
        is not safe (no event loop, another process). The driver's connection is left to
        its own finalizer (which closes it only in the process that opened it)."""
        self._epoch += 1
        idle = self._idle
        while True:
            try:
                conn: Connection = idle.pop()[0].connection
            except IndexError:
                break
            with contextlib.suppress(Exception):
                conn.detach()
        _async_held.discard(self)

    def before_fork(self) -> None:
        """In the parent, just before ``fork()``: a sync stash returns its connections to
        the pool, so the child holds none of them checked out (asyncio stashes are let go
        of in the child: returning them needs their loop)."""
        if not self._async and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self.clear()

    def at_exit(self) -> None:
        """At interpreter exit: return the connections of a sync stash made in this
        process; let go of the others (asyncio ones, and those inherited through fork)."""
        if not self._async and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self.clear()
        else:
            self.let_go()


def returned_to_pool(*entries: Entry | None) -> None:
    """Return these connections to their pool (an asyncio engine's: in a greenlet)."""
    for entry in entries:
        if entry is not None:
            entry[0].close()


def _before_fork() -> None:
    for stash in list(_stashes):
        stash.before_fork()


def _at_exit() -> None:
    for stash in list(_stashes):
        stash.at_exit()


def _exit_hook_registered() -> None:
    """Register :func:`_at_exit` once, after SQLAlchemy created a pool finalizer (so after
    ``weakref.finalize`` registered its own exit function): exit functions run last-in
    first-out, so ours lets go of the stashed connections before those finalizers run."""
    global _exit_hook
    if _exit_hook:
        return
    with _exit_lock:
        if not _exit_hook:
            atexit.register(_at_exit)
            _exit_hook = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork)

"""One database as the SQL stores use it: its engines, and the runner of plans on them.

:class:`Database` owns what the idempotency backend, the dead-letter store and the
breaker store have in common: the URL, the sync engine and one asyncio engine per event
loop (created on first use, replaced in a forked child, disposed when their loop shuts
down), the statements compiled per engine, the statement time bound, and running a plan
(see :mod:`~idempotask.backends.sql._plans`) with database errors turned into
:class:`~idempotask.errors.BackendError`, or the one statement that starts a claim or a
complete on a connection kept for it (:meth:`Database.first`). Stores built from one
another share one ``Database``, hence one pool of connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

from sqlalchemy import URL, Engine, Executable, MetaData, Table
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, SQLAlchemyError, StatementError
from sqlalchemy.util import greenlet_spawn

from idempotask.backends.sql import _dbapi, _engines
from idempotask.backends.sql._plans import Plan, seconds
from idempotask.backends.sql._stash import Entry, Stash, capacity, max_overflow, returned_to_pool
from idempotask.backends.sql._timeouts import client_bound
from idempotask.errors import BackendError, ConfigurationError, CorruptRecordError

if TYPE_CHECKING:
    # Imported for real only when async is used: it needs greenlet, sync callers do not.
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["DEFAULT_STATEMENT_TIMEOUT", "Database", "is_async_engine"]

_T = TypeVar("_T")
Params = Mapping[str, Any]
#: A statement's rows (when fetched) and row count.
Answer = tuple[Sequence[Any], int]

#: Seconds a statement may take before the server cancels it (and, a grace later, the
#: client gives up on the connection); None turns both off.
DEFAULT_STATEMENT_TIMEOUT = 10.0

# A deadlock victim's statement was rolled back whole; every plan is safe to re-run then.
_DEADLOCK_ATTEMPTS = 3
_MYSQL_DEADLOCK = 1213
_PG_RETRYABLE = {"40P01", "40001"}  # deadlock_detected, serialization_failure

# The pid of this process, kept current by a fork hook, so a child process notices
# (with one comparison) that its pools hold its parent's connections.
_pid = os.getpid()
# Loop guards of engines abandoned in a forked child: kept, never finalized (their loops
# live in the parent).
_orphans: list[Any] = []


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def is_async_engine(obj: object) -> TypeGuard[AsyncEngine]:
    """Whether ``obj`` is an ``AsyncEngine`` (without importing greenlet to find out)."""
    if not type(obj).__module__.startswith("sqlalchemy.ext.asyncio"):
        return False
    from sqlalchemy.ext.asyncio import AsyncEngine

    return isinstance(obj, AsyncEngine)


def _is_retryable(exc: BaseException) -> bool:
    """A deadlock victim: its statement was rolled back whole, so the plan can run again."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _PG_RETRYABLE:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return len(args) > 0 and args[0] == _MYSQL_DEADLOCK


def _finished(stop: StopIteration) -> Any:
    return stop.value


# _greenlets.spawn, imported on the first asyncio operation (it needs greenlet, which
# sync callers need not install).
_spawn: _dbapi.Spawn | None = None


def _load_spawn() -> _dbapi.Spawn:
    global _spawn
    from idempotask.backends.sql._greenlets import spawn

    _spawn = spawn
    return spawn


@dataclass(slots=True)
class _LoopEngine:
    """The asyncio engine made for one event loop, the connections kept out of its pool
    between operations, and the guard that disposes of them."""

    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    stash: Stash
    guard: AsyncGenerator[None, None] | None = None


async def _loop_guard(slot: _LoopEngine, db: weakref.ref[Database]) -> AsyncGenerator[None, None]:
    """Dispose of ``slot``'s engine when its loop shuts down.

    Started once on the loop, this async generator is registered with it, so
    ``loop.shutdown_asyncgens()`` (which ``asyncio.run()`` calls before closing the loop)
    closes it while the loop still runs: the engine's connections are closed on the loop
    they belong to, instead of leaking when a program calls ``asyncio.run()`` repeatedly.
    A forked child that shuts down a loop it inherited lets go of the parent's
    connections instead (closing them would end the parent's sessions).
    """
    started_in = _pid
    try:
        yield
    finally:
        owner = db()
        if owner is not None:
            owner._forget(slot)
        if _pid != started_in:
            slot.stash.let_go()
            slot.engine.sync_engine.dispose(close=False)
        elif not slot.loop.is_closed():
            with contextlib.suppress(Exception):
                await greenlet_spawn(slot.stash.clear)
            with contextlib.suppress(Exception):
                await slot.engine.dispose()
        else:
            slot.stash.let_go()


@dataclass(frozen=True, slots=True)
class _AsyncStash:
    """An asyncio engine and the stash of its sync engine (what an operation needs)."""

    engine_of: AsyncEngine
    stash: Stash


def _failed_on(stash: Stash, entry: Entry, exc: BaseException) -> None:
    """After a plan failed on ``entry``'s connection (in a greenlet)."""
    entry[0].abandon(exc)
    stash.discard(entry)


def _stop_guard(guard: AsyncGenerator[None, None]) -> None:
    """Finish a guard whose loop is already closed, without awaiting anything."""
    with contextlib.suppress(StopIteration, RuntimeError):
        guard.aclose().send(None)


class Database:
    """The engines of one database and the runner of plans on them.

    ``bind`` is a URL, an ``Engine`` or an ``AsyncEngine`` (or pass ``engine=`` and
    ``async_engine=``); ``owner`` names the store in configuration errors. Engines you
    pass are used as given (in autocommit mode per connection) and never disposed here;
    the engines made here get autocommit, ``connect_timeout``, hidden parameters in error
    messages, for SQLite WAL and ``busy_timeout``, and the ``statement_timeout`` bounds of
    :mod:`~idempotask.backends.sql._timeouts`. The client-side bound applies to every
    connection, yours included.

    >>> db = Database("postgresql+psycopg://app:secret@db/app", owner="SQLAlchemyBackend")
    >>> db.where, db.bound  # nothing connects until the first operation
    ('postgresql+psycopg://db/app', 11.0)
    """

    def __init__(
        self,
        bind: str | URL | Engine | AsyncEngine | None = None,
        *,
        owner: str,
        engine: Engine | None = None,
        async_engine: AsyncEngine | None = None,
        connect_timeout: float = 10.0,
        busy_timeout: float = 30.0,
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        url: URL | None = None
        if isinstance(bind, (str, URL)):
            url = _engines.parse_url(bind)
        elif isinstance(bind, Engine):
            if engine is not None:
                raise ConfigurationError(f"{owner}: two engines given")
            engine = bind
        elif is_async_engine(bind):
            if async_engine is not None:
                raise ConfigurationError(f"{owner}: two async engines given")
            async_engine = bind
        elif bind is not None:
            raise ConfigurationError(
                f"{owner}: expected a database URL, an Engine or an AsyncEngine, "
                f"got {type(bind).__qualname__}"
            )
        if engine is not None and not isinstance(engine, Engine):
            raise ConfigurationError(
                f"{owner}: engine= must be a sqlalchemy Engine, got {type(engine).__qualname__}"
            )
        if async_engine is not None and not is_async_engine(async_engine):
            raise ConfigurationError(
                f"{owner}: async_engine= must be a sqlalchemy AsyncEngine, got "
                f"{type(async_engine).__qualname__}"
            )
        if url is not None and (engine is not None or async_engine is not None):
            raise ConfigurationError(f"{owner}: pass a URL or engines, not both")
        if url is None:
            source = engine if engine is not None else async_engine
            if source is None:
                raise ConfigurationError(
                    f"{owner}: pass a database URL such as "
                    "'postgresql+psycopg://user@host/db', an Engine or an AsyncEngine"
                )
            url = _engines.parse_url(source.url)
        for option, value in (("connect_timeout", connect_timeout), ("busy_timeout", busy_timeout)):
            seconds(value, option)
        if statement_timeout is not None:
            seconds(statement_timeout, "statement_timeout")

        self.url = url
        #: The URL without credentials, for messages and ``repr``.
        self.where = _engines.describe(url)
        #: Whether this is a private in-memory SQLite database (one connection).
        self.memory = _engines.is_memory_sqlite(url)
        if self.memory and engine is None and async_engine is not None:
            raise ConfigurationError(
                f"{owner}: an in-memory SQLite database lives in one connection; "
                "pass the sync Engine (or the URL), which serves async callers too"
            )
        self.compiled = _dbapi.CompiledCache()
        self.statement_timeout = None if statement_timeout is None else float(statement_timeout)
        # The watchdog's deadline per statement (None: no client-side bound).
        self.bound = None if statement_timeout is None else client_bound(float(statement_timeout))
        self._connect_timeout = float(connect_timeout)
        self._busy_timeout = float(busy_timeout)
        self._engine_options = dict(engine_options or {})
        self.engine: Engine | None = _engines.autocommit(engine) if engine is not None else None
        self._given_async: AsyncEngine | None = (
            _engines.async_autocommit(async_engine) if async_engine is not None else None
        )
        self._owns_engine = engine is None
        # Connections kept out of the pool between operations: only on the engines made
        # here (see _stash); an engine you passed gets a stash that keeps none.
        self._stash: Stash | None = None
        self._given_stash: _AsyncStash | None = None
        self._lock = threading.Lock()
        # In-memory SQLite: one connection, so one operation at a time.
        self.memory_lock = threading.RLock()
        # asyncio connections belong to the loop they were made on: one engine per loop,
        # disposed when that loop shuts down (see _loop_guard).
        self.loops: dict[int, _LoopEngine] = {}
        self._last_loop: tuple[weakref.ref[asyncio.AbstractEventLoop], _AsyncStash] | None = None
        self._pid = _pid

    # -- engines -------------------------------------------------------------------------

    def _check_fork(self) -> None:
        """In a forked child, drop the parent's pooled connections (never close them:
        they are the parent's sockets) and start afresh."""
        with self._lock:
            if self._pid == _pid:
                return
            self._pid = _pid
            if self._stash is not None:
                self._stash.let_go()
                self._stash = None
            if self.engine is not None:
                self.engine.dispose(close=False)
            if self._given_async is not None:
                self._given_async.sync_engine.dispose(close=False)
            self._given_stash = None
            for slot in self.loops.values():
                slot.stash.let_go()
                slot.engine.sync_engine.dispose(close=False)
                _orphans.append(slot.guard)
            self.loops.clear()
            self._last_loop = None

    def sync_engine(self) -> Engine:
        """The sync engine, created on first use."""
        if self._pid != _pid:
            self._check_fork()
        engine = self.engine
        if engine is None:
            with self._lock:
                if self.engine is None:
                    self.engine = _engines.new_sync_engine(
                        _engines.sync_url(self.url),
                        connect_timeout=self._connect_timeout,
                        busy_timeout=self._busy_timeout,
                        statement_timeout=self.statement_timeout,
                        options=self._engine_options,
                    )
                engine = self.engine
        return engine

    def _sync_stash(self) -> Stash:
        """The sync engine's stash, created with it."""
        if self._pid != _pid:
            self._check_fork()
        stash = self._stash
        if stash is None:
            engine = self.sync_engine()
            with self._lock:
                if self._stash is None:
                    options = self._engine_options
                    size = capacity(engine, options) if self._owns_engine else 0
                    overflow = max_overflow(options)
                    self._stash = Stash(engine, self.compiled, self.bound, size, overflow)
                stash = self._stash
        return stash

    async def async_engine(self) -> AsyncEngine:
        """The running loop's asyncio engine, created on first use there."""
        return (await self._async_stash()).engine_of

    def _loop_stash(self) -> Stash | None:
        """The running loop's stash if it is made already (the usual case, answered
        without a coroutine); None: await :meth:`_async_stash`."""
        if self._pid != _pid:
            return None
        given = self._given_stash
        if given is not None:
            return given.stash
        last = self._last_loop
        if (
            last is not None
            and self._given_async is None
            and last[0]() is asyncio.get_running_loop()
        ):
            return last[1].stash
        return None

    async def _made_stash(self, operation: str, key: str | None) -> Stash:
        """:meth:`_async_stash`'s stash for ``operation``, a failure to make its engine
        raised as the operation's :class:`BackendError`."""
        try:
            return (await self._async_stash()).stash
        except (SQLAlchemyError, OSError) as exc:
            raise self.error(operation, key, exc) from exc

    async def _async_stash(self) -> _AsyncStash:
        """The running loop's asyncio engine and its stash, created on first use there."""
        if self._pid != _pid:
            self._check_fork()
        if self._given_async is not None:
            given = self._given_stash
            if given is None:
                engine = self._given_async
                given = self._given_stash = _AsyncStash(
                    engine, Stash(engine.sync_engine, self.compiled, self.bound, 0)
                )
            return given
        loop = asyncio.get_running_loop()
        last = self._last_loop
        if last is not None and last[0]() is loop:
            return last[1]
        with self._lock:
            slot = self.loops.get(id(loop))
            fresh = slot is None or slot.loop is not loop
            stale: list[_LoopEngine] = []
            if slot is None or slot.loop is not loop:
                engine = self._new_async_engine()
                options = self._engine_options
                size = capacity(engine.sync_engine, options)
                overflow = max_overflow(options)
                stash = Stash(engine.sync_engine, self.compiled, self.bound, size, overflow)
                slot = _LoopEngine(loop, engine, stash)
                stale = [s for s in self.loops.values() if s.loop.is_closed()]
                for old in stale:
                    del self.loops[id(old.loop)]
                self.loops[id(loop)] = slot
            current = _AsyncStash(slot.engine, slot.stash)
            self._last_loop = (weakref.ref(loop), current)
        if fresh:
            guard = _loop_guard(slot, weakref.ref(self))
            await guard.asend(None)  # registers the guard with the loop
            slot.guard = guard
            for old in stale:
                await self._retire(old)
        return current

    def _forget(self, slot: _LoopEngine) -> None:
        with self._lock:
            if self.loops.get(id(slot.loop)) is slot:
                del self.loops[id(slot.loop)]
            if self._last_loop is not None and self._last_loop[1].stash is slot.stash:
                self._last_loop = None

    def _new_async_engine(self) -> AsyncEngine:
        # Derived from the user's engine if one was given: same database, our async defaults.
        url = self.engine.url if self.engine is not None and not self._owns_engine else self.url
        return _engines.new_async_engine(
            _engines.async_url(url),
            connect_timeout=self._connect_timeout,
            busy_timeout=self._busy_timeout,
            statement_timeout=self.statement_timeout,
            options=self._engine_options,
        )

    @staticmethod
    async def _retire(slot: _LoopEngine) -> None:
        """Let go of the engine of a loop that closed without shutting down its async
        generators: connections that can be closed from here are; the rest are dropped."""
        if slot.guard is not None:
            _stop_guard(slot.guard)
        # psycopg and aiosqlite close a connection without its loop; MySQL drivers need the
        # (closed) loop's transport, so their sockets are left to the garbage collector.
        close = slot.engine.dialect.driver in ("psycopg", "psycopg_async", "aiosqlite")
        if close:
            with contextlib.suppress(Exception):
                await greenlet_spawn(slot.stash.clear)
        else:
            slot.stash.let_go()
        with contextlib.suppress(Exception):
            await slot.engine.dispose(close=close)

    def close(self) -> None:
        """Close the connections of the sync engine made here (one you passed stays open)."""
        with self._lock:
            engine = self.engine if self._owns_engine else None
            stash = self._stash
        if stash is not None:
            stash.clear()
        if engine is not None:
            engine.dispose()

    async def aclose(self) -> None:
        """Close the connections of the asyncio engine made here for the running loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            slot = self.loops.get(id(loop))
            if slot is None or slot.loop is not loop:
                return
            del self.loops[id(loop)]
            self._last_loop = None
        if slot.guard is not None:
            await slot.guard.aclose()
        else:
            await greenlet_spawn(slot.stash.clear)
            await slot.engine.dispose()

    # -- running plans ----------------------------------------------------------------------

    def error(self, operation: str, key: str | None, exc: BaseException) -> BackendError:
        """The BackendError for ``exc`` raised by ``operation`` (on ``key``, if any)."""
        target = f" {key!r}" if key is not None else ""
        if isinstance(exc, UnicodeDecodeError):
            return CorruptRecordError(
                f"sql backend: {operation}{target} on {self.where}: a text column holds "
                f"bytes that are not UTF-8, so the row was not written by idempotask ({exc})"
            )
        # The driver's own error (also one raised outside its classes, in a StatementError).
        detail = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
        message = " ".join(str(detail).split())
        if len(message) > 500:
            message = message[:500] + "…"
        return BackendError(
            f"sql backend: {operation}{target} failed on {self.where}: "
            f"{type(detail).__name__}: {message}"
        )

    def run(self, operation: str, key: str | None, make: Callable[[Dialect], Plan[_T]]) -> _T:
        """Run the plan ``make(dialect)`` on the sync engine (in-memory SQLite: one
        operation at a time)."""
        if self.memory:
            with self.memory_lock:
                return self._run_on(self._sync_stash, operation, key, make)
        return self._run_on(self._sync_stash, operation, key, make)

    async def arun(
        self, operation: str, key: str | None, make: Callable[[Dialect], Plan[_T]]
    ) -> _T:
        """:meth:`run` on the running loop's asyncio engine (the same plans)."""
        if self.memory:
            # One in-memory connection, no I/O to wait for: the sync path, inline.
            return self.run(operation, key, make)
        stash = self._loop_stash()
        if stash is None:
            stash = await self._made_stash(operation, key)
        # The whole operation in one greenlet: the pool's checkout and return are
        # SQLAlchemy's sync code (awaiting the driver through the greenlet), and each
        # statement is one await of the driver's own coroutine (see _dbapi.Executor).
        # AsyncConnection would spawn a greenlet for the checkout and another for the
        # return, about 40 µs more per operation; a greenlet reused from one operation
        # to the next saves making one (see _greenlets).
        spawn = _spawn if _spawn is not None else _load_spawn()
        entry = stash.take_kept()
        if entry is not None:
            # A kept connection whose driver we await directly: no greenlet at all, unless
            # something has to be returned to the pool or discarded.
            try:
                direct: _T = await self._arun_kept(stash, entry, make, spawn)
                return direct
            except (SQLAlchemyError, OSError, UnicodeDecodeError) as exc:
                if not _is_retryable(exc):
                    raise self.error(operation, key, exc) from exc
                # A deadlock victim runs again, as in _run_on.
        result: _T = await spawn(self._run_on, lambda: stash, operation, key, make)
        return result

    @staticmethod
    async def _arun_kept(
        stash: Stash, entry: Entry, make: Callable[[Dialect], Plan[_T]], spawn: _dbapi.Spawn
    ) -> _T:
        """:meth:`_run_on`'s plan loop, in the coroutine, on a kept connection whose
        executor awaits the driver directly (see ``Executor.acall``)."""
        execute = entry[0]
        try:
            plan = make(execute.dialect)
            reply: Any = None
            while True:
                try:
                    step = plan.send(reply)
                except StopIteration as stop:
                    result: _T = _finished(stop)
                    break
                reply = await execute.acall(step, spawn)
        except BaseException as exc:
            await spawn(_failed_on, stash, entry, exc)
            raise
        returned = stash.release(entry)
        if returned is not None:
            await spawn(returned_to_pool, *returned)
        return result

    # -- one statement on a kept connection ------------------------------------------------

    def first(
        self, operation: str, key: str | None, statement: Executable, params: Params, fetch: bool
    ) -> Answer | None:
        """The first statement of an operation on a connection kept from an earlier one,
        through psycopg's libpq path: its rows (when ``fetch``) and row count, or None
        when no connection is ready for that (the caller runs the operation's plan).

        The one statement that settles nearly every claim and complete, sent without the
        plan, its steps and the general executor around it (they were about a sixth of
        a first call's client instructions). Errors are raised as :meth:`run` raises
        them; after a deadlock (the statement was rolled back whole) None, so the plan
        runs it again.
        """
        stash = self._stash
        if stash is None or self._pid != _pid:
            return None
        entry = stash.take_kept(pq=True)
        if entry is None:
            return None
        execute = entry[0]
        try:
            answer = execute.run_pq(statement, params, fetch)
        except BaseException as exc:
            _failed_on(stash, entry, exc)
            self._first_failed(operation, key, exc)
            return None
        returned = stash.release(entry, untouched=True)
        if returned is not None:
            returned_to_pool(*returned)
        return answer

    async def afirst(
        self, operation: str, key: str | None, statement: Executable, params: Params, fetch: bool
    ) -> Answer | None:
        """:meth:`first` for asyncio callers, on the running loop's engine."""
        if self.memory:
            return None
        stash = self._loop_stash()
        if stash is None:
            stash = await self._made_stash(operation, key)
        entry = stash.take_kept(pq=True)
        if entry is None:
            return None
        spawn = _spawn if _spawn is not None else _load_spawn()
        execute = entry[0]
        try:
            answer = await execute.arun_pq(statement, params, fetch, spawn)
        except BaseException as exc:
            await spawn(_failed_on, stash, entry, exc)
            self._first_failed(operation, key, exc)
            return None
        returned = stash.release(entry, untouched=True)
        if returned is not None:
            await spawn(returned_to_pool, *returned)
        return answer

    def _first_failed(self, operation: str, key: str | None, exc: BaseException) -> None:
        """After :meth:`first`'s statement raised ``exc`` (its connection discarded): raise
        the error as :meth:`run` raises it, unless the statement was a deadlock victim
        (the caller's plan runs it again)."""
        if not isinstance(exc, (SQLAlchemyError, OSError, UnicodeDecodeError)):
            raise exc
        if _is_retryable(exc):
            return None
        raise self.error(operation, key, exc) from exc

    def _run_on(
        self,
        stash: Callable[[], Stash],
        operation: str,
        key: str | None,
        make: Callable[[Dialect], Plan[_T]],
    ) -> _T:
        """Run a plan on a connection from ``stash()`` (or its engine's pool); database
        errors (and the watchdog's TimeoutError) become BackendError, and a deadlock
        victim's plan runs again."""
        for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
            try:
                connections = stash()
                entry = connections.take()
                execute = entry[0]
                try:
                    plan = make(execute.dialect)
                    reply: Any = None
                    while True:
                        try:
                            step = plan.send(reply)
                        except StopIteration as stop:
                            result: _T = _finished(stop)
                            break
                        reply = execute(step)
                except BaseException as exc:
                    execute.abandon(exc)
                    connections.discard(entry)
                    raise
                connections.give(entry)
                return result
            except (SQLAlchemyError, OSError, UnicodeDecodeError) as exc:
                if attempt < _DEADLOCK_ATTEMPTS and _is_retryable(exc):
                    continue
                raise self.error(operation, key, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- schema ------------------------------------------------------------------------------

    @staticmethod
    def _ddl(conn: Connection, metadata: MetaData, tables: Sequence[Table], create: bool) -> None:
        if create:
            metadata.create_all(conn, tables=list(tables), checkfirst=True)
        else:
            metadata.drop_all(conn, tables=list(tables), checkfirst=True)

    def schema_change(self, metadata: MetaData, tables: Sequence[Table], create: bool) -> None:
        """Create (or drop) ``tables`` if missing (present); safe from several processes."""
        operation = "create_tables" if create else "drop_tables"
        try:
            with (
                self.memory_lock if self.memory else contextlib.nullcontext(),
                self.sync_engine().connect() as conn,
            ):
                try:
                    self._ddl(conn, metadata, tables, create)
                except SQLAlchemyError:
                    # Another process created (or dropped) it between our check and our
                    # statement; the second check sees it.
                    self._ddl(conn, metadata, tables, create)
        except (SQLAlchemyError, OSError) as exc:
            raise self.error(operation, None, exc) from exc

    async def aschema_change(
        self, metadata: MetaData, tables: Sequence[Table], create: bool
    ) -> None:
        """Async :meth:`schema_change`."""
        if self.memory:
            self.schema_change(metadata, tables, create)
            return
        operation = "create_tables" if create else "drop_tables"
        try:
            engine = await self.async_engine()
            async with engine.connect() as conn:
                try:
                    await conn.run_sync(self._ddl, metadata, tables, create)
                except SQLAlchemyError:
                    await conn.run_sync(self._ddl, metadata, tables, create)
        except (SQLAlchemyError, OSError) as exc:
            raise self.error(operation, None, exc) from exc

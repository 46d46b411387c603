"""Running the plans' statements on the driver's own connection.

SQLAlchemy Core builds every statement (:class:`~idempotask.backends.sql._plans.Statements`);
here each is compiled once per dialect into the SQL string the driver receives and the
layout of its parameters, with the bind processors SQLAlchemy would apply, and then run
with the driver's own calls. That skips SQLAlchemy's per-execution work (execution
context, compiled-cache lookup, parameter and result processing, ``CursorResult``), which
cost about 100 µs per statement where a PostgreSQL insert round trip takes 150 µs. Rows
come back as the driver returns them; :func:`~idempotask.backends.sql._plans.parse_record`
reads them.

Connections still come from SQLAlchemy's pool through a ``Connection``, which sets and
resets the isolation level of an engine you passed, returns the connection to the pool
(fork safety and ``dispose()`` included) and is invalidated the way SQLAlchemy does it
when the database drops it; on the engines the stores make, one stays checked out
across back-to-back operations (see :mod:`~idempotask.backends.sql._stash`), with its
executor and cursor. An asyncio engine's ``Connection`` is used the way SQLAlchemy's
asyncio extension uses it, inside a greenlet, or, once checked out, by the calling
coroutine itself (see :class:`Executor`).

Statements go through SQLAlchemy's own execution instead (``exec_driver_sql``, with the
same compiled SQL) when something watches the engine's statements (event listeners for
tracing, statement comments or counting, and SQL logging such as ``echo=True``) so that
it sees every one, and for an asyncio driver without a direct path here (asyncpg).

On psycopg, statements go through psycopg's libpq wrapper instead of a cursor where a
cursor would add nothing (see :mod:`~idempotask.backends.sql._libpq`).

With a ``bound`` (the stores' ``statement_timeout`` plus a grace), every statement, on
either path, is bounded: it runs under the
:class:`~idempotask.backends.sql._timeouts.Watchdog`, which shuts the socket of a
statement still unanswered at its deadline, or, on the sync libpq path, waits on the
socket with that deadline itself; either way it raises :class:`TimeoutError` with the
connection discarded.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from operator import itemgetter
from typing import Any, NoReturn

from sqlalchemy import Executable, LargeBinary
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from idempotask.backends.sql._libpq import PqStatement, Session, Unanswered, session_for
from idempotask.backends.sql._plans import Step
from idempotask.backends.sql._timeouts import Watch, socket_of, watchdog

__all__ = ["Compiled", "CompiledCache", "Executor", "Spawn", "compile_statement"]

_Processor = Callable[[Any], Any]


def _getter(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """A function from a mapping to the tuple of its values at ``names`` (in C when there
    are several: ``operator.itemgetter``)."""
    if len(names) > 1:
        return itemgetter(*names)
    if names:
        name = names[0]
        return lambda mapping: (mapping[name],)
    return lambda mapping: ()


class Compiled:
    """One statement compiled for one dialect: the driver's SQL and how a plan's parameters
    are laid out for it (a dict for named paramstyles, a tuple for positional ones).

    ``constants`` are the statement's own values (``literal()``, e.g. the 'in_progress'
    state), processed once; ``inputs`` are (the plan's parameter name, the name in the
    SQL, SQLAlchemy's bind processor or None); ``positions``, for positional paramstyles,
    the parameter names in placeholder order (a name may repeat). ``driver_sql`` is what
    the direct path sends (``sql`` unless given).
    """

    __slots__ = (
        "_keys",
        "_order",
        "_processed",
        "_take",
        "constants",
        "driver_sql",
        "pq",
        "sql",
        "statement",
    )

    def __init__(
        self,
        statement: Executable,
        sql: str,
        constants: Mapping[str, Any],
        inputs: tuple[tuple[str, str, _Processor | None], ...],
        positions: tuple[str, ...] | None,
        driver_sql: str | bytes | None = None,
        pq: PqStatement | None = None,
    ) -> None:
        self.statement = statement  # kept alive: the cache's key, its id, is never reused
        self.sql = sql
        self.driver_sql = sql if driver_sql is None else driver_sql
        self.pq = pq  # psycopg's libpq path (see _libpq), for psycopg dialects
        self.constants = dict(constants)
        self._keys = tuple(key for _, key, _ in inputs)
        self._take = _getter(tuple(name for name, _, _ in inputs))
        self._processed = tuple((key, process) for _, key, process in inputs if process)
        self._order = None if positions is None else _getter(positions)

    def parameters(self, values: Mapping[str, Any]) -> Any:
        """The driver's parameters for a plan's ``values``."""
        params = dict(zip(self._keys, self._take(values), strict=True))
        for key, process in self._processed:
            params[key] = process(params[key])
        if self.constants:
            params.update(self.constants)
        order = self._order
        return params if order is None else order(params)


def compile_statement(statement: Executable, dialect: Dialect) -> Compiled:
    """Compile ``statement`` for ``dialect`` as SQLAlchemy would to execute it.

    SQLAlchemy applies each parameter's bind processor at execution time (here: our
    ``BinaryText`` encodes text as UTF-8 bytes on MySQL's VARBINARY, ``LargeBinary`` wraps
    bytes in the driver's ``Binary``); the same processors are applied here, to the
    statement's constant values once and to the plan's values per call.
    """
    if not isinstance(statement, ClauseElement):  # pragma: no cover - plans yield Core
        raise TypeError(f"not a Core statement: {statement!r}")
    compiled = statement.compile(dialect=dialect)
    if not isinstance(compiled, SQLCompiler):  # pragma: no cover - DDL is never a step
        raise TypeError(f"not a SQL statement: {statement!r}")
    if compiled.literal_execute_params or compiled.post_compile_params:
        # Rendered into the SQL per execution (expanding IN, some LIMITs): not cacheable.
        raise TypeError(f"statement has parameters rendered per execution: {compiled.string!r}")
    # Named paramstyles use the (possibly escaped) names in the SQL; positional ones none.
    escaped: Mapping[str, str] = {} if compiled.positional else (compiled.escaped_bind_names or {})
    constants: dict[str, Any] = {}
    inputs: list[tuple[str, str, _Processor | None]] = []
    # The libpq path's layout: psycopg's adapters dump bytes as bytea themselves, so
    # LargeBinary's processor (a wrap in psycopg's Binary, dumped by Python code) is left
    # out there.
    pq_constants: dict[str, Any] = {}
    pq_inputs: list[tuple[str, str, _Processor | None]] = []
    for name, value in compiled.params.items():
        bind = compiled.binds[name]
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        pq_process = None if isinstance(bind.type, LargeBinary) else process
        key = escaped.get(name, name)
        if bind.required:  # a bindparam() without a value: the plan provides it
            inputs.append((name, key, process))
            pq_inputs.append((name, key, pq_process))
        else:
            constants[key] = value if process is None else process(value)
            pq_constants[key] = value if pq_process is None else pq_process(value)
    sql = compiled.string
    positions = tuple(compiled.positiontup or ()) if compiled.positional else None
    pq = None
    driver_sql: str | bytes = sql
    if dialect.driver in _BYTES_SQL:
        # psycopg takes the SQL as bytes: given a str it encodes the whole statement per
        # execution, and a new bytes object is hashed again for its query cache.
        driver_sql = sql.encode()
        pq = PqStatement(driver_sql, pq_constants, tuple(pq_inputs))
    return Compiled(statement, sql, constants, tuple(inputs), positions, driver_sql, pq)


_BYTES_SQL = frozenset({"psycopg", "psycopg_async"})


class CompiledCache:
    """Each statement compiled once per engine (its dialect is configured by the server it
    connected to: MariaDB's version decides its SQL).

    Held by the engine, weakly: the compiled statements refer to the dialect (bind
    processors close over it), so keyed by the dialect they would keep it, and every
    asyncio engine made for an event loop, alive for good.
    """

    def __init__(self) -> None:
        self._by_engine: weakref.WeakKeyDictionary[Engine, dict[int, Compiled]] = (
            weakref.WeakKeyDictionary()
        )

    def __len__(self) -> int:
        return len(self._by_engine)

    def for_engine(self, engine: Engine) -> dict[int, Compiled]:
        """The statements compiled for ``engine``'s dialect, by ``id(statement)``."""
        compiled = self._by_engine.get(engine)
        if compiled is None:
            compiled = self._by_engine.setdefault(engine, {})
        return compiled


def _observed(engine: Engine, dialect: Dialect) -> bool:
    """Whether something watches this engine's statements (so they must go through
    SQLAlchemy's execution to be seen): statement or error listeners, or SQL logging.

    The engine's listeners, not the ``Connection``'s: nobody else holds our new
    ``Connection`` to listen on it, and each one joins its engine's dispatcher anew,
    which made these look-ups cost 7 µs per operation.
    """
    # SQLAlchemy's own gates for these events: false until a listener is added to the
    # engine (or to every Engine) or its dialect; only then are the listeners looked at.
    if getattr(engine, "_has_events", True):
        dispatch = engine.dispatch
        if (
            dispatch.before_cursor_execute
            or dispatch.after_cursor_execute
            or dispatch.before_execute
            or dispatch.after_execute
        ):
            return True
    if getattr(dialect, "_has_events", True) and dialect.dispatch.handle_error:
        return True
    return bool(engine.logger.isEnabledFor(logging.INFO))


async def _execute_on_async_cursor(
    driver: Any, held: list[Any], sql: str | bytes, params: Any, step: Step
) -> Any:
    """psycopg's ``AsyncConnection`` and asyncmy: one cursor per checkout (``held``), made
    on its first statement and reused (see :class:`Executor`)."""
    if held:
        cursor = held[0]
    else:
        cursor = driver.cursor()
        held.append(cursor)
    await cursor.execute(sql, params)
    return step.take(await cursor.fetchall() if step.fetches else (), cursor.rowcount)


async def _execute_on_aiomysql(
    driver: Any, held: list[Any], sql: str | bytes, params: Any, step: Step
) -> Any:
    """aiomysql, whose ``cursor()`` is awaited: one cursor per statement."""
    async with driver.cursor() as cursor:
        await cursor.execute(sql, params)
        return step.take(await cursor.fetchall() if step.fetches else (), cursor.rowcount)


async def _execute_on_aiosqlite(
    driver: Any, held: list[Any], sql: str | bytes, params: Any, step: Step
) -> Any:
    """aiosqlite runs each call on its own thread: one hop per statement where possible
    (``execute_fetchall``), two when the row count is needed (execute, close)."""
    if step.reply != "rowcount":
        return step.take(await driver.execute_fetchall(sql, params), -1)
    async with driver.execute(sql, params) as cursor:
        return step.take((), cursor.rowcount)


_AsyncExecute = Callable[[Any, list[Any], str | bytes, Any, Step], Coroutine[Any, Any, Any]]
#: How a coroutine runs a sync function in a greenlet (SQLAlchemy's greenlet_spawn, or
#: _greenlets.spawn).
Spawn = Callable[..., Awaitable[Any]]

# An asyncio dialect's ``driver`` -> how its driver connection runs a statement.
_ASYNC_DRIVERS: dict[str, _AsyncExecute] = {
    "psycopg": _execute_on_async_cursor,
    "asyncmy": _execute_on_async_cursor,
    "aiomysql": _execute_on_aiomysql,
    "aiosqlite": _execute_on_aiosqlite,
}


class Executor:
    """Runs a plan's steps on one checked-out ``Connection`` (in autocommit mode).

    A sync driver runs the statements of one checkout on one cursor (a cursor made and
    closed per statement cost psycopg about 17,000 instructions, an eighth of its work
    for the statement). An asyncio engine's ``Connection`` is used inside a greenlet (the
    backend runs a whole operation in one greenlet: checkout, plan and return), where
    the driver's own coroutine runs through ``AdaptedConnection.run_async``: one switch
    out of the greenlet per statement, where SQLAlchemy's adapted cursor takes several
    (and aiosqlite several thread hops). On a connection already checked out,
    :meth:`acall` awaits the driver's coroutine from the calling coroutine, with no
    greenlet unless a connection must be discarded.
    """

    __slots__ = (
        "_async",
        "_bound",
        "_bounds_itself",
        "_compiled",
        "_conn",
        "_cursor",
        "_dialect",
        "_direct",
        "_dog",
        "_engine",
        "_fairy",
        "_held",
        "_native",
        "_pq",
        "_watch",
        "awaits_directly",
        "runs_pq",
    )

    def __init__(self, conn: Connection, cache: CompiledCache, bound: float | None = None) -> None:
        dialect = conn.dialect
        self._conn = conn
        self._engine = conn.engine
        self._dialect = dialect
        self._compiled = cache.for_engine(conn.engine)
        # A Connection just checked out holds a valid pooled connection: no I/O here.
        self._fairy = conn.connection
        self._async = _ASYNC_DRIVERS.get(dialect.driver) if dialect.is_async else None
        # Whether this driver has a direct path here at all (asyncpg has not).
        self._native = self._async is not None or not dialect.is_async
        # psycopg's libpq path, where a cursor would add nothing (see _libpq).
        self._pq: Session | None = (
            session_for(self._fairy.driver_connection, self._fairy.info)
            if dialect.driver == "psycopg"
            else None
        )
        if self._pq is not None:
            self._pq.bound = bound  # a sync statement's wait is bounded in _libpq
        #: Whether :meth:`run_pq` (sync) or :meth:`arun_pq` (asyncio) can run this
        #: operation's statements: psycopg's libpq path, nothing watching the engine.
        self.runs_pq = False
        #: Whether :meth:`acall` can run this operation's statements: an asyncio driver
        #: with a direct path, and nothing watching the engine's statements.
        self.awaits_directly = False
        self._bounds_itself = False
        self._direct: bool | None = None  # until refresh() sets it
        self.refresh()
        # The client-side bound needs the connection's socket (none for SQLite).
        self._bound = bound
        fd = socket_of(self._fairy.driver_connection) if bound is not None else None
        self._watch = Watch(fd) if fd is not None else None
        # The process's watchdog (a connection is let go of, never used, across a fork).
        self._dog = watchdog() if fd is not None else None
        self._cursor: Any = None  # the sync driver's cursor, made on the first statement
        self._held: list[Any] = []  # the asyncio driver's cursor, likewise

    @property
    def connection(self) -> Connection:
        """The checked-out ``Connection`` this executor runs statements on."""
        return self._conn

    @property
    def dialect(self) -> Dialect:
        """The connection's dialect."""
        return self._dialect

    def refresh(self) -> None:
        """Before another operation on the same connection (and when made): look again for
        listeners or SQL logging added to the engine since (they must see every
        statement). Without them, a sync psycopg connection takes the libpq path, which
        bounds its own wait (:attr:`_bounds_itself`)."""
        engine, dialect = self._engine, self._dialect
        # _observed, its usual answer first (no listeners at all, no SQL logging).
        if getattr(engine, "_has_events", True) or getattr(dialect, "_has_events", True):
            watched = _observed(engine, dialect)
        else:
            watched = engine.logger.isEnabledFor(logging.INFO)
        direct = self._native and not watched
        if direct is self._direct:
            return  # as before (nearly always)
        self._direct = direct
        self.runs_pq = direct and self._pq is not None
        self.awaits_directly = direct and self._async is not None
        self._bounds_itself = self.runs_pq and self._async is None

    def close(self) -> None:
        """Return the connection to its pool (its sync cursor closed first)."""
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            with contextlib.suppress(Exception):
                cursor.close()
        self._held.clear()
        self._conn.close()

    def __call__(self, step: Step) -> Any:
        if self._bounds_itself:
            # The sync libpq path, which bounds its own wait: nearly every statement on
            # PostgreSQL.
            reply = step.reply
            try:
                rows, count = self.run_pq(step.statement, step.params, reply == "rows")
            except IntegrityError as exc:
                return step.refused(exc)
            return rows if reply == "rows" else step.take(rows, count)
        watch, dog = self._watch, self._dog
        if watch is None or dog is None:
            return self._execute(step)
        dog.start(watch, self._bound)  # type: ignore[arg-type]
        try:
            reply = self._execute(step)
        except BaseException as exc:
            if dog.stop(watch):
                raise self._timed_out(exc) from exc
            raise
        if dog.stop(watch):
            # Answered just as the deadline passed: the socket is shut down all the same.
            raise self._timed_out(None)
        return reply

    def run_pq(
        self, statement: Executable, params: Mapping[str, Any], fetch: bool
    ) -> tuple[Sequence[Any], int]:
        """One statement on the sync libpq path (only when :attr:`runs_pq` on a sync
        engine): its rows (when ``fetch``) and row count. Errors are SQLAlchemy's, as
        :meth:`__call__` raises them."""
        compiled = self._compiled.get(id(statement)) or self._compile(statement)
        pq = self._pq
        assert pq is not None  # psycopg: each statement is compiled with a PqStatement
        assert compiled.pq is not None
        try:
            return pq.execute(compiled.pq, params, fetch)  # type: ignore[no-any-return]
        except Unanswered:
            raise self._timed_out(None) from None
        except BaseException as exc:
            self._raise(compiled.sql, exc)

    async def acall(self, step: Step, spawn: Spawn) -> Any:
        """:meth:`__call__` from a coroutine, without a greenlet: the driver's coroutine is
        awaited here. What may need SQLAlchemy's greenlet (discarding a connection after
        an error or a timeout) runs in one, through ``spawn``. Only when
        :attr:`awaits_directly`."""
        if self._pq is not None:
            try:
                rows, count = await self.arun_pq(step.statement, step.params, step.fetches, spawn)
            except IntegrityError as exc:
                return step.refused(exc)
            return step.take(rows, count)
        compiled = self._compiled_for(step)
        watch, dog = self._watch, self._dog
        if watch is not None and dog is not None:
            dog.start(watch, self._bound)  # type: ignore[arg-type]
        try:
            reply = await self._async(  # type: ignore[misc]
                self._fairy.driver_connection,
                self._held,
                compiled.driver_sql,
                compiled.parameters(step.params),
                step,
            )
        except BaseException as exc:
            fired = watch is not None and dog is not None and dog.stop(watch)
            return await spawn(self._settle, step, compiled.sql, exc, fired)
        if watch is not None and dog is not None and dog.stop(watch):
            await spawn(self._settle, step, compiled.sql, None, True)
        return reply

    async def arun_pq(
        self, statement: Executable, params: Mapping[str, Any], fetch: bool, spawn: Spawn
    ) -> tuple[Sequence[Any], int]:
        """:meth:`run_pq` on an asyncio engine, from a coroutine (only when
        :attr:`runs_pq` and :attr:`awaits_directly`), under the watchdog."""
        compiled = self._compiled.get(id(statement)) or self._compile(statement)
        pq = self._pq
        assert pq is not None  # psycopg: each statement is compiled with a PqStatement
        assert compiled.pq is not None
        watch, dog = self._watch, self._dog
        if watch is not None and dog is not None:
            dog.start(watch, self._bound)  # type: ignore[arg-type]
        try:
            answer: tuple[Sequence[Any], int] = await pq.aexecute(compiled.pq, params, fetch)
        except BaseException as exc:
            fired = watch is not None and dog is not None and dog.stop(watch)
            return await spawn(self._settle, None, compiled.sql, exc, fired)  # type: ignore[no-any-return]
        if watch is not None and dog is not None and dog.stop(watch):
            await spawn(self._settle, None, compiled.sql, None, True)
        return answer

    def _settle(self, step: Step | None, sql: str, exc: BaseException | None, fired: bool) -> Any:
        """After an awaited statement raised ``exc`` or outlived its bound: the reply, or
        the exception, that :meth:`__call__` would give (in a greenlet; ``step`` None:
        :meth:`run_pq`'s exception)."""
        try:
            if exc is None:
                reply = None
            elif step is None:
                self._raise(sql, exc)
            else:
                reply = self._outcome(step, sql, exc)
        except BaseException as error:
            if fired:
                raise self._timed_out(error) from error
            raise
        if fired:
            raise self._timed_out(None)
        return reply

    def _compiled_for(self, step: Step) -> Compiled:
        return self._compiled.get(id(step.statement)) or self._compile(step.statement)

    def _compile(self, statement: Executable) -> Compiled:
        compiled = self._compiled[id(statement)] = compile_statement(statement, self._dialect)
        return compiled

    def _execute(self, step: Step) -> Any:
        compiled = self._compiled_for(step)
        if not self._direct:
            try:
                result = self._conn.exec_driver_sql(compiled.sql, compiled.parameters(step.params))
            except IntegrityError as exc:
                return step.refused(exc)
            return step.take(result.fetchall() if step.fetches else (), result.rowcount)
        native, pq, statement = self._async, self._pq, compiled.pq
        try:
            if native is not None and pq is not None and statement is not None:
                # An asyncio psycopg connection in a greenlet (the sync libpq path is
                # __call__'s).
                rows, count = self._fairy.dbapi_connection.run_async(  # type: ignore[union-attr]
                    lambda driver: pq.aexecute(statement, step.params, step.fetches)
                )
                return step.take(rows, count)
            sql, params = compiled.driver_sql, compiled.parameters(step.params)
            if native is not None:
                held = self._held
                return self._fairy.dbapi_connection.run_async(  # type: ignore[union-attr]
                    lambda driver: native(driver, held, sql, params, step)
                )
            cursor = self._cursor
            if cursor is None:
                cursor = self._cursor = self._fairy.dbapi_connection.cursor()  # type: ignore[union-attr]
            cursor.execute(sql, params)
            return step.take(cursor.fetchall() if step.fetches else (), cursor.rowcount)
        except BaseException as exc:
            return self._outcome(step, compiled.sql, exc)

    def _outcome(self, step: Step, sql: str, exc: BaseException) -> Any:
        """The reply to a statement the driver failed with ``exc``: a refused INSERT's, or
        else SQLAlchemy's exception, raised after discarding the connection if it cannot
        be trusted."""
        try:
            self._raise(sql, exc)
        except IntegrityError as error:
            return step.refused(error)

    def _raise(self, sql: str, exc: BaseException) -> NoReturn:
        """Raise SQLAlchemy's exception for ``exc``, raised by the driver running ``sql``
        (the connection discarded if it cannot be trusted). An interruption (a cancelled
        task, Ctrl-C) is raised as it is, its connection discarded: it may still be busy
        with the statement, so it must not go back to the pool."""
        if isinstance(exc, Exception):
            raise self._failed(exc, sql) from exc
        self._conn.invalidate(exc)
        raise exc

    def _timed_out(self, exc: BaseException | None) -> TimeoutError:
        """The watchdog shut this connection's socket down: discard the connection, and
        let the pool replace its older ones on their next checkout (a server that let a
        statement go unanswered past its own timeout is gone, or its route is)."""
        error = TimeoutError(
            f"no answer within {self._bound:g} s (statement_timeout plus grace); the "
            "connection was discarded"
        )
        if not self._conn.invalidated:
            self._conn.engine.pool._invalidate(self._fairy, error, _checkin=False)
            self._conn.invalidate(exc if exc is not None else error)
        return error

    def abandon(self, exc: BaseException) -> None:
        """After a plan failed: roll back a transaction it may have left open (SQLite's
        ``BEGIN IMMEDIATE`` claim) before the connection goes back to the pool, which does
        not roll back on our engines (``skip_autocommit_rollback``). Without a transaction
        this is free or one round trip, on a failure path only."""
        if self._conn.invalidated:
            return
        if not isinstance(exc, Exception):  # interrupted: not worth waiting for a rollback
            self._conn.invalidate(exc)
            return
        watch, dog = self._watch, self._dog
        if watch is None or dog is None:
            try:
                self._fairy.dbapi_connection.rollback()  # type: ignore[union-attr]
            except Exception:
                self._conn.invalidate(exc)
            return
        dog.start(watch, self._bound)  # type: ignore[arg-type]
        try:
            self._fairy.dbapi_connection.rollback()  # type: ignore[union-attr]
        except Exception:
            self._conn.invalidate(exc)
        if dog.stop(watch) and not self._conn.invalidated:
            self._conn.invalidate(exc)

    def _failed(self, exc: Exception, sql: str) -> BaseException:
        """SQLAlchemy's exception for an error the driver raised, as ``Connection.execute``
        would raise it, after discarding the connection if it cannot be trusted."""
        dbapi_error = self._dialect.loaded_dbapi.Error
        ours = disconnect = False
        if isinstance(exc, dbapi_error):
            ours, disconnect = True, self._dialect.is_disconnect(exc, self._fairy, None)
        if disconnect:
            # The pool's older connections are suspect too (a server restart, a failover):
            # each is replaced on its next checkout, as SQLAlchemy does on a disconnect.
            self._conn.engine.pool._invalidate(self._fairy, exc, _checkin=False)
        if disconnect or not ours:
            # Gone, or failed outside the driver's own error classes (an asyncio driver's
            # broken socket, say) in a state nobody knows: not given back to the pool.
            self._conn.invalidate(exc)
        return DBAPIError.instance(
            sql,
            None,
            exc,
            dbapi_error,
            hide_parameters=True,
            connection_invalidated=disconnect,
            dialect=self._dialect,
        )

"""One database as the SQL stores use it: its engines, and running flows on them.

:class:`Database` owns what the SQL stores share: the URL, the sync engine and one asyncio
engine per event loop, the time bound of a statement, and running an operation: a flow
(:mod:`idempotask.flow`) of statements on one connection of the engine's pool, through
SQLAlchemy's public ``Connection.execute`` / ``AsyncConnection.execute``. Database errors
become :class:`~idempotask.errors.BackendError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, TypeVar

from sqlalchemy import URL, Engine, Executable, MetaData, Table
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError, StatementError

from idempotask.backends.sql import _engines
from idempotask.backends.sql._session import Reply, Session
from idempotask.backends.sql._timeouts import LIBPQ, bounded, client_bound
from idempotask.errors import (
    BackendError,
    ConfigurationError,
    CorruptRecordError,
    MissingTableError,
)
from idempotask.flow import Flow, Op, adrive, drive

if TYPE_CHECKING:
    # Imported for real only when async is used: it needs greenlet, sync callers do not.
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = [
    "ASYNC_BOUNDED",
    "DEFAULT_STATEMENT_TIMEOUT",
    "Database",
    "Flavour",
    "OnDatabase",
    "Session",
    "flavour_of",
    "flow_batches",
    "is_async_engine",
    "seconds",
]

_T = TypeVar("_T")

#: Seconds a statement may take before the server cancels it (and, a grace later, the
#: client gives up on the connection); None turns both off.
DEFAULT_STATEMENT_TIMEOUT = 10.0

#: How an operation is done on a database: ``postgresql``, ``mariadb`` (10.5+: RETURNING
#: on ``INSERT … ON DUPLICATE KEY UPDATE``), ``mysql`` (no RETURNING), ``sqlite``.
Flavour = Literal["postgresql", "mariadb", "mysql", "sqlite"]


# A deadlock victim's statement was rolled back whole; every flow is safe to re-run then.
_DEADLOCK_ATTEMPTS = 3
_MYSQL_DEADLOCK = 1213
_PG_RETRYABLE = {"40P01", "40001"}  # deadlock_detected, serialization_failure
_PG_UNDEFINED_TABLE = "42P01"
_MYSQL_NO_SUCH_TABLE = 1146
#: asyncio drivers bounded by asyncio.timeout around the operation (those with no bound
#: of their own); libpq's (_timeouts.LIBPQ) are bounded by the watchdog instead.
ASYNC_BOUNDED = frozenset({"asyncmy", "aiomysql", "aiosqlite"})
# Errors a flow gets thrown back: a plain INSERT that found the key taken (MySQL).
_CAUGHT = (IntegrityError,)
_FAILURES = (SQLAlchemyError, OSError, UnicodeDecodeError, TimeoutError, asyncio.TimeoutError)


def is_async_engine(obj: object) -> TypeGuard[AsyncEngine]:
    """Whether ``obj`` is an ``AsyncEngine`` (without importing greenlet to find out)."""
    if not type(obj).__module__.startswith("sqlalchemy.ext.asyncio"):
        return False
    from sqlalchemy.ext.asyncio import AsyncEngine

    return isinstance(obj, AsyncEngine)


def seconds(value: Any, option: str, who: str = "sql backend") -> float:
    """A positive, finite number of seconds (a lease, a ttl, a timeout), as a float."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (0 < value < float("inf"))
    ):
        raise ConfigurationError(
            f"{who}: {option} must be a positive, finite number of seconds, got {value!r}"
        )
    return float(value)


def flavour_of(dialect: Dialect) -> Flavour:
    """How operations are done on a connected dialect (MariaDB is known once connected)."""
    name = dialect.name
    if name in ("postgresql", "sqlite"):
        return name  # type: ignore[return-value]
    if name in ("mysql", "mariadb"):
        version = tuple(dialect.server_version_info or (0,))
        return (
            "mariadb" if getattr(dialect, "is_mariadb", False) and version >= (10, 5) else "mysql"
        )
    raise ConfigurationError(
        f"sql backend: {name!r} databases are not supported; use PostgreSQL, SQLite, "
        "MySQL or MariaDB"
    )


def _codes(exc: BaseException) -> tuple[Any, Any, Any] | None:
    """A database error's driver error, its SQLSTATE (PostgreSQL) and its error number
    (MySQL/MariaDB); None for any other error."""
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return orig, getattr(orig, "sqlstate", None), args[0] if args else None


def _is_retryable(exc: BaseException) -> bool:
    """A deadlock victim: its statement was rolled back whole, so the flow can run again."""
    codes = _codes(exc)
    return codes is not None and (codes[1] in _PG_RETRYABLE or codes[2] == _MYSQL_DEADLOCK)


def _is_missing_table(exc: BaseException) -> bool:
    """Whether the database said a table does not exist (PostgreSQL ``42P01``, MySQL and
    MariaDB error 1146, SQLite "no such table")."""
    codes = _codes(exc)
    if codes is None:
        return False
    orig, sqlstate, number = codes
    # sqlite3's (and aiosqlite's, which raises sqlite3's) error carries only its message.
    sqlite = type(orig).__module__ == "sqlite3" and str(orig).startswith("no such table")
    return sqlstate == _PG_UNDEFINED_TABLE or number == _MYSQL_NO_SUCH_TABLE or sqlite


@dataclass(slots=True)
class _LoopEngine:
    """The asyncio engine made for one event loop, and the guard that disposes of it."""

    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    guard: AsyncGenerator[None, None] | None = None


async def _loop_guard(slot: _LoopEngine, db: weakref.ref[Database]) -> AsyncGenerator[None, None]:
    """Dispose of ``slot``'s engine when its loop shuts down: registered with the loop,
    ``loop.shutdown_asyncgens()`` (``asyncio.run()``) closes it while the loop still runs,
    so the connections close on their own loop instead of leaking."""
    started_in = os.getpid()
    try:
        yield
    finally:
        owner = db()
        if owner is not None:
            with owner._lock:
                if owner.loops.get(id(slot.loop)) is slot:
                    del owner.loops[id(slot.loop)]
        if os.getpid() != started_in:  # a forked child: the connections are the parent's
            slot.engine.sync_engine.dispose(close=False)
        elif not slot.loop.is_closed():
            with contextlib.suppress(Exception):
                await slot.engine.dispose()


class Database:
    """The engines of one database, and the runner of flows on them. ``bind`` and the
    options are ``SQLAlchemyBackend``'s (which documents what engines get); ``owner``
    names the store in configuration errors.

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
        connect_timeout = seconds(connect_timeout, "connect_timeout")
        busy_timeout = seconds(busy_timeout, "busy_timeout")
        if statement_timeout is not None:
            statement_timeout = seconds(statement_timeout, "statement_timeout")

        self.url = url
        #: The URL without credentials, for messages and ``repr``.
        self.where = _engines.describe(url)
        #: Whether this is a private in-memory SQLite database (one connection).
        self.memory = _engines.is_memory_sqlite(url)
        #: Whether asyncio operations run the sync ones in a worker thread: a SQLite file
        #: (no network), unless an AsyncEngine was given.
        self.local = url.get_backend_name() == "sqlite" and async_engine is None
        if self.memory and engine is None and async_engine is not None:
            raise ConfigurationError(
                f"{owner}: an in-memory SQLite database lives in one connection; "
                "pass the sync Engine (or the URL), which serves async callers too"
            )
        self.statement_timeout = statement_timeout
        #: The client's bound on one statement (None: none).
        self.bound = None if statement_timeout is None else client_bound(statement_timeout)
        # What the engines made here get (see _engines.new_engine).
        self._settings: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "busy_timeout": busy_timeout,
            "statement_timeout": statement_timeout,
            "options": dict(engine_options or {}),
        }
        self._given = engine  # the user's engine, as given
        self._given_async = async_engine
        self.engine: Engine | None = None  # the engine operations use (sync)
        self._async: AsyncEngine | None = None  # the user's, in autocommit (async)
        self._flavour: Flavour | None = None
        # Tables to create before the first operation (create_tables=True).
        self._pending: list[tuple[MetaData, list[Table]]] = []
        self._lock = threading.Lock()
        # In-memory SQLite: one connection, so one operation at a time.
        self.memory_lock = threading.RLock()
        # asyncio connections belong to the loop they were made on: one engine per loop,
        # disposed when that loop shuts down (see _loop_guard).
        self.loops: dict[int, _LoopEngine] = {}
        self._pid = os.getpid()

    # -- engines -------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child, let go of the parent's pooled connections (never close them:
        they are the parent's sockets; SQLAlchemy's documented ``dispose(close=False)``)."""
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            for engine in (self.engine, self._given):
                if engine is not None:
                    engine.dispose(close=False)
            if self._given_async is not None:
                self._given_async.sync_engine.dispose(close=False)
            for slot in self.loops.values():
                slot.engine.sync_engine.dispose(close=False)
            self.loops.clear()

    def sync_engine(self) -> Engine:
        """The sync engine operations use, made (or put in autocommit) on first use."""
        if self._pid != os.getpid():
            self._after_fork()
        engine = self.engine
        if engine is None:
            with self._lock:
                if self.engine is None:
                    if self._given is not None:
                        self.engine = _engines.autocommit(self._given)
                    else:
                        self.engine = _engines.new_engine(self.url, False, **self._settings)
                engine = self.engine
        return engine

    async def async_engine(self) -> AsyncEngine:
        """The running loop's asyncio engine, made on first use there."""
        if self._pid != os.getpid():
            self._after_fork()
        if self._given_async is not None:
            if self._async is None:
                self._async = await _engines.async_autocommit(self._given_async)
            return self._async
        loop = asyncio.get_running_loop()
        slot = self.loops.get(id(loop))
        if slot is not None and slot.loop is loop:
            return slot.engine
        with self._lock:
            slot = self.loops.get(id(loop))
            fresh = slot is None or slot.loop is not loop
            if slot is None or slot.loop is not loop:
                # Derived from the user's engine if one was given: same database, our
                # defaults.
                url = self._given.url if self._given is not None else self.url
                slot = _LoopEngine(loop, _engines.new_engine(url, True, **self._settings))
                for key in [k for k, s in self.loops.items() if s.loop.is_closed()]:
                    del self.loops[key]  # their connections went with their loops
                self.loops[id(loop)] = slot
        if fresh:
            guard = _loop_guard(slot, weakref.ref(self))
            await guard.asend(None)  # registers the guard with the loop
            slot.guard = guard
        return slot.engine

    def close(self) -> None:
        """Close the connections of the sync engine made here (one you passed stays open)."""
        with self._lock:
            engine = self.engine if self._given is None else None
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
        if slot.guard is not None:
            await slot.guard.aclose()
        else:
            await slot.engine.dispose()

    # -- errors ------------------------------------------------------------------------------

    def error(
        self, operation: str, key: str | None, exc: BaseException, table: Table | None = None
    ) -> BackendError:
        """The BackendError for ``exc`` raised by ``operation`` (on ``key``, if any) on
        ``table``."""
        target = f" {key!r}" if key is not None else ""
        if isinstance(exc, UnicodeDecodeError):
            return CorruptRecordError(
                f"sql backend: {operation}{target} on {self.where}: a text column holds "
                f"bytes that are not UTF-8, so the row was not written by idempotask ({exc})"
            )
        if table is not None and _is_missing_table(exc):
            return MissingTableError(
                f"sql backend: {operation}{target} on {self.where}: the table "
                f"{table.fullname!r} does not exist. Create the tables idempotask needs "
                "with `idempotask db create --url URL` (or the store's create_tables(), "
                "or add ?create_tables=true to the URL to create them on first use)",
                table=table.fullname,
            )
        # The driver's own error (also one raised outside its classes, in a StatementError).
        detail = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
            # The watchdog's, or asyncio.timeout's (which says nothing): the connection
            # was invalidated, so the next operation starts on a fresh one.
            detail = TimeoutError(
                f"no answer within {self.bound:g} s; the connection was discarded"
            )
        message = " ".join(str(detail).split())
        if len(message) > 500:
            message = message[:500] + "…"
        return BackendError(
            f"sql backend: {operation}{target} failed on {self.where}: "
            f"{type(detail).__name__}: {message}"
        )

    # -- running flows -----------------------------------------------------------------------

    def create_on_first_use(self, metadata: MetaData, tables: Sequence[Table]) -> None:
        """Create ``tables`` (if missing) before the next operation runs."""
        with self._lock:
            self._pending.append((metadata, list(tables)))

    def _flavour_of(self, dialect: Dialect) -> Flavour:
        flavour = self._flavour
        if flavour is None:
            flavour = self._flavour = flavour_of(dialect)
        return flavour

    def _session(self, conn: Connection, aconn: AsyncConnection | None) -> Session:
        """The session of one operation on ``conn`` (``aconn``'s, for asyncio): psycopg's
        statements are bounded by the watchdog (see _timeouts)."""
        dialect = conn.dialect
        watched = self.bound if dialect.driver in LIBPQ else None
        return Session(conn, aconn, self._flavour_of(dialect), watched)

    def run(
        self,
        operation: str,
        key: str | None,
        make: Callable[[Session], Flow[_T]],
        table: Table | None = None,
    ) -> _T:
        """Run the flow ``make(session)`` on a connection of the sync engine (in-memory
        SQLite: one operation at a time); a deadlock victim's flow runs again."""
        for metadata, tables in self._take_pending() if self._pending else ():
            self.schema_change(metadata, tables, True)
        engine = self.engine if self._pid == os.getpid() else None
        if engine is None:
            try:
                engine = self.sync_engine()
            except _FAILURES as exc:
                raise self.error(operation, key, exc) from exc
        with self.memory_lock if self.memory else contextlib.nullcontext():
            for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
                try:
                    with engine.connect() as conn:
                        session = self._session(conn, None)
                        try:
                            return drive(make(session), _CAUGHT)
                        except BaseException:
                            session.end()
                            raise
                except _FAILURES as exc:
                    self._again_or_raise(attempt, operation, key, exc, table)
        raise AssertionError("unreachable")  # pragma: no cover

    async def arun(
        self,
        operation: str,
        key: str | None,
        make: Callable[[Session], Flow[_T]],
        table: Table | None = None,
    ) -> _T:
        """:meth:`run` on the running loop's asyncio engine (the same flows), bounded by
        ``asyncio.timeout`` for drivers without a bound of their own."""
        if self.memory:
            # One in-memory connection, no I/O to wait for: the sync path, inline.
            return self.run(operation, key, make, table)
        if self.local:
            # A SQLite file: a few local statements, which may wait for the file's write
            # lock (busy_timeout). One hop to a worker thread for the whole operation;
            # aiosqlite would hop for every statement, checkout and return.
            return await asyncio.to_thread(self.run, operation, key, make, table)
        for metadata, tables in self._take_pending() if self._pending else ():
            await self.aschema_change(metadata, tables, True)
        try:
            engine = await self.async_engine()
        except _FAILURES as exc:
            raise self.error(operation, key, exc, table) from exc
        bound = self.bound if engine.dialect.driver in ASYNC_BOUNDED else None
        for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
            try:
                if bound is None:
                    return await self._arun_once(engine, make)
                return await bounded(self._arun_once(engine, make), bound)
            except _FAILURES as exc:
                self._again_or_raise(attempt, operation, key, exc, table)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _arun_once(self, engine: AsyncEngine, make: Callable[[Session], Flow[_T]]) -> _T:
        async with engine.connect() as aconn:
            conn = aconn.sync_connection
            assert conn is not None
            session = self._session(conn, aconn)
            try:
                return await adrive(make(session), _CAUGHT)
            except BaseException:
                await session.aend()
                raise

    def _again_or_raise(
        self, attempt: int, operation: str, key: str | None, exc: Exception, table: Table | None
    ) -> None:
        """Return if ``exc`` made a deadlock victim whose flow may run again; else raise
        its BackendError."""
        if attempt < _DEADLOCK_ATTEMPTS and _is_retryable(exc):
            return
        raise self.error(operation, key, exc, table) from exc

    # -- schema ------------------------------------------------------------------------------

    def schema_change(self, metadata: MetaData, tables: Sequence[Table], create: bool) -> None:
        """Create (or drop) ``tables`` if missing (present); safe from several processes."""
        self.run("create_tables" if create else "drop_tables", None, _ddl(metadata, tables, create))

    async def aschema_change(
        self, metadata: MetaData, tables: Sequence[Table], create: bool
    ) -> None:
        """Async :meth:`schema_change`."""
        operation = "create_tables" if create else "drop_tables"
        await self.arun(operation, None, _ddl(metadata, tables, create))

    def _take_pending(self) -> list[tuple[MetaData, list[Table]]]:
        """The tables to create before the next operation, taken once."""
        with self._lock:
            pending, self._pending = self._pending, []
        return pending


def _ddl(
    metadata: MetaData, tables: Sequence[Table], create: bool
) -> Callable[[Session], Flow[None]]:
    """The flow that creates (or drops) ``tables`` if missing (present)."""

    def change(conn: Connection) -> None:
        # Another process may create (or drop) a table between our check and our
        # statement: the next check sees it. One more try per table at most.
        for attempt in range(len(tables) + 1):
            try:
                if create:
                    metadata.create_all(conn, tables=list(tables), checkfirst=True)
                else:
                    metadata.drop_all(conn, tables=list(tables), checkfirst=True)
                return
            except SQLAlchemyError:
                if attempt == len(tables):
                    raise

    def flow(q: Session) -> Flow[None]:
        if q.aconn is None:
            yield Op(change, None, q.conn)
        else:  # on the asyncio connection's sync one, as SQLAlchemy runs sync code there
            yield Op(q.aconn.run_sync, q.aconn.run_sync, change)

    return flow


def flow_batches(
    q: Session, statement: Executable, params: Mapping[str, Any], batch: int
) -> Flow[int]:
    """Run a DELETE of up to ``batch`` rows until one deletes fewer; how many went."""
    total = 0
    while True:
        count: int = yield q.op(statement, params, "rowcount")
        total += max(0, count)
        if count < batch:
            return total


class OnDatabase:
    """What a SQL store runs its operations with: its :class:`Database` and its table."""

    database: Database
    table: Table
    # Tests force "mysql" on MariaDB to run the MySQL flows on a real server.
    _force_flavour: Flavour | None = None

    def _flavour(self, q: Session) -> Flavour:
        return self._force_flavour or q.flavour

    def _on_db(
        self, operation: str, key: str | None, make: Callable[[Session], Flow[_T]]
    ) -> Flow[_T]:
        """One operation as a flow: ``make``'s flow run on a connection, sync or async."""
        db = self.database
        result: _T = yield Op(db.run, db.arun, operation, key, make, self.table)
        return result

    def _one(
        self,
        operation: str,
        key: str | None,
        statement: Executable,
        params: Mapping[str, Any],
        then: Callable[[Any], _T],
        reply: Reply = "rows",
    ) -> Flow[_T]:
        """One statement as an operation's flow, its answer mapped by ``then`` on the
        connection's side (a row that is not ours is reported as a database error is)."""

        def flow(q: Session) -> Flow[_T]:
            return then((yield q.op(statement, params, reply)))

        return (yield from self._on_db(operation, key, flow))

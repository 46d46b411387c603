"""The SQL store on SQLAlchemy 2 Core: PostgreSQL, SQLite, MySQL and MariaDB, sync and async.

One table holds one row per key (see :func:`define_table`); every expiry is computed on the
database's clock, never the client's. One backend object serves sync and async callers::

    >>> from idempotask.backends.sql import SQLAlchemyBackend
    >>> store = SQLAlchemyBackend("postgresql+psycopg://app@db/app")  # connects on first use
    >>> store.create_tables()                                          # doctest: +SKIP
    >>> record = store.claim("ns:billing.charge:1:ab12", "token-1", lease=30)  # doctest: +SKIP
    >>> record.held_by("token-1")  # doctest: +SKIP
    True

Engines are created on first use: the sync one for the URL's sync driver, and one asyncio
engine per event loop for the matching async driver (psycopg serves both on PostgreSQL;
SQLite uses aiosqlite, MySQL/MariaDB asyncmy; aiomysql 0.3 cannot send bytes with
PyMySQL 1.2.3+, aio-libs/aiomysql#1080). Pass your own ``Engine`` and/or
``AsyncEngine`` instead of a URL to control pools; the missing one is derived from its URL.

Round trips per operation (every statement runs in autocommit mode, so there is no
``BEGIN``/``COMMIT`` around single statements). Counted by ``tests/backends/test_sql.py``:
PostgreSQL from a libpq protocol trace, MariaDB from the server's ``Questions`` counter,
the MySQL column by running the MySQL plan (no ``RETURNING``) on MariaDB:

==========================  ==========  ==============  ===============  ==============
operation                   PostgreSQL  MariaDB 10.5+   MySQL            SQLite (file)
==========================  ==========  ==============  ===============  ==============
claim, key absent           1           1               2                5 statements
claim, duplicate            1           1               1                1 statement
claim, lease taken over     1           1               3                5 statements
complete / fail / renew     1           1               1                1 statement
get / delete                1           1               1                1 statement
==========================  ==========  ==============  ===============  ==============

* **PostgreSQL** — one statement, read in one snapshot: ``INSERT … SELECT … WHERE NOT
  EXISTS (<a live record that blocks us>) ON CONFLICT (key) DO UPDATE … WHERE <expired, or
  same token, or same non-empty owner> RETURNING`` takes the key, and a ``UNION ALL``
  answers with the live record when the insert returns nothing (``DO UPDATE … WHERE
  false`` returns no row). A duplicate therefore takes no row lock and writes nothing.
  When a concurrent claim commits after the statement's snapshot, the insert conflicts
  but the read cannot see the row: the empty (or stale) answer is detected and the
  statement re-sent with a fresh snapshot, at most ``CLAIM_ATTEMPTS`` times.
  ``clock_timestamp()`` is the clock (``now()`` is frozen per transaction). A repeated
  complete/fail is answered in the same single statement.
* **MariaDB 10.5+** — ``INSERT … ON DUPLICATE KEY UPDATE … RETURNING`` (verified on 10.11):
  MariaDB returns the row as it stands after the statement, also when the conditional
  update changed nothing, so one statement both claims and answers. The SET assignments
  are ordered so MySQL's left-to-right evaluation keeps them consistent.
* **MySQL** (no ``RETURNING``) — a plain read answers duplicates; an absent key is taken
  with a plain ``INSERT``; a takeover (or an insert that lost a race) is the same
  conditional ``ON DUPLICATE KEY UPDATE`` followed by a read. Our token is unique to the
  claim, so the row carries it only if this claim took the key.
* **SQLite** — a plain read answers duplicates (WAL lets it run beside a writer);
  otherwise ``BEGIN IMMEDIATE``, the upsert, a read and ``COMMIT``, on the local file.
  Every connection gets WAL and a busy timeout so several processes can share one file;
  ``sqlite:///:memory:`` keeps one connection for the process and runs async calls on it
  directly (they never wait on I/O).

A repeated complete/fail (same token) costs one more statement outside PostgreSQL.

Statements are built with SQLAlchemy Core, compiled once per engine, and run on the
driver's own connection from SQLAlchemy's pool (psycopg prepares each after its fifth
use on a connection), without SQLAlchemy's per-execution machinery, which cost about as
much as the round trip itself; an asyncio operation runs in one greenlet with the
driver's coroutines. An engine with statement event listeners or SQL logging gets every
statement through SQLAlchemy's execution, so they see them (see ``_dbapi``).
Database errors become :class:`~idempotask.errors.BackendError` naming the operation and
the database (never its password); a row that is not one of ours raises
:class:`~idempotask.errors.CorruptRecordError`. :meth:`SQLAlchemyBackend.purge_expired`
deletes expired rows in short batches; run it from a periodic job.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

from sqlalchemy import URL, Engine, MetaData, Table
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, SQLAlchemyError, StatementError
from sqlalchemy.util import greenlet_spawn

from idempotask.backends.base import Record, State
from idempotask.backends.sql import _dbapi, _engines
from idempotask.backends.sql._plans import (
    CLAIM_ATTEMPTS,
    Flavour,
    Plan,
    Statements,
    flavour_of,
    plan_claim,
    plan_delete,
    plan_expire_now,
    plan_finish,
    plan_get,
    plan_purge,
    plan_renew,
    seconds,
)
from idempotask.backends.sql._schema import (
    DEFAULT_TABLE_NAME,
    KEY_LENGTH,
    TEXT_LENGTH,
    BinaryText,
    DbNow,
    define_table,
)
from idempotask.errors import BackendError, ConfigurationError, CorruptRecordError

if TYPE_CHECKING:
    # Imported for real only when async is used: it needs greenlet, sync callers do not.
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "CLAIM_ATTEMPTS",
    "DEFAULT_TABLE_NAME",
    "KEY_LENGTH",
    "TEXT_LENGTH",
    "BinaryText",
    "DbNow",
    "SQLAlchemyBackend",
    "define_table",
    "metadata",
    "records",
]

_T = TypeVar("_T")

#: The ``MetaData`` holding the default records table, for Alembic's ``target_metadata``
#: (a backend with another ``table_name`` has its own, as its ``metadata`` attribute).
metadata = MetaData()
#: The default records table, ``idempotask_records``.
records = define_table(metadata)

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


def _is_async_engine(obj: object) -> TypeGuard[AsyncEngine]:
    if not type(obj).__module__.startswith("sqlalchemy.ext.asyncio"):
        return False  # no need to import the asyncio extension (and greenlet) to know
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


@dataclass(slots=True)
class _LoopEngine:
    """The asyncio engine made for one event loop, and the guard that disposes of it."""

    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    guard: AsyncGenerator[None, None] | None = None


async def _loop_guard(
    slot: _LoopEngine, backend: weakref.ref[SQLAlchemyBackend]
) -> AsyncGenerator[None, None]:
    """Dispose of ``slot``'s engine when its loop shuts down.

    Started once on the loop, this async generator is registered with it, so
    ``loop.shutdown_asyncgens()`` (which ``asyncio.run()`` calls before closing the loop)
    closes it while the loop still runs: the engine's connections are closed on the loop
    they belong to, instead of leaking when a program calls ``asyncio.run()`` repeatedly.
    """
    try:
        yield
    finally:
        owner = backend()
        if owner is not None:
            owner._forget(slot)
        if not slot.loop.is_closed():
            with contextlib.suppress(Exception):
                await slot.engine.dispose()


def _stop_guard(guard: AsyncGenerator[None, None]) -> None:
    """Finish a guard whose loop is already closed, without awaiting anything."""
    with contextlib.suppress(StopIteration, RuntimeError):
        guard.aclose().send(None)


class SQLAlchemyBackend:
    """The idempotency store on a SQL database, implementing
    :class:`~idempotask.backends.base.Backend` for sync and async callers.

    ``bind`` is a URL (``"postgresql+psycopg://user:pw@host/db"``, ``"sqlite:///app.db"``,
    ``"mysql+pymysql://user@host/db"``), an ``Engine`` or an ``AsyncEngine``; ``engine=``
    and ``async_engine=`` pass both. Engines you pass are used as given (in autocommit
    mode per connection) and never disposed by this backend; the engines it creates get
    autocommit, a connect timeout (``connect_timeout`` seconds), hidden parameters in
    error messages, and for SQLite WAL and a busy timeout (``busy_timeout`` seconds).
    ``engine_options`` are extra ``create_engine`` arguments for the engines it creates.

    On MySQL/MariaDB, an engine you pass should be created with
    ``isolation_level="AUTOCOMMIT", skip_autocommit_rollback=True`` (as ours are): otherwise
    every operation also pays a ``SET autocommit`` on checkout and a ``ROLLBACK`` and a
    reset on return. PostgreSQL and SQLite engines need nothing special.

    ``table_name`` (and ``schema``) name the records table; :meth:`create_tables` creates
    it, or let Alembic do it from :attr:`metadata`.

    >>> store = SQLAlchemyBackend("sqlite:///:memory:")
    >>> store.create_tables()
    >>> store.claim("k", "t1", lease=30).held_by("t1")
    True
    >>> store.claim("k", "t2", lease=30).token
    't1'
    """

    def __init__(
        self,
        bind: str | URL | Engine | AsyncEngine | None = None,
        /,
        *,
        engine: Engine | None = None,
        async_engine: AsyncEngine | None = None,
        table_name: str = DEFAULT_TABLE_NAME,
        schema: str | None = None,
        connect_timeout: float = 10.0,
        busy_timeout: float = 30.0,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        url: URL | None = None
        if isinstance(bind, (str, URL)):
            url = _engines.parse_url(bind)
        elif isinstance(bind, Engine):
            if engine is not None:
                raise ConfigurationError("SQLAlchemyBackend: two engines given")
            engine = bind
        elif _is_async_engine(bind):
            if async_engine is not None:
                raise ConfigurationError("SQLAlchemyBackend: two async engines given")
            async_engine = bind
        elif bind is not None:
            raise ConfigurationError(
                "SQLAlchemyBackend: expected a database URL, an Engine or an AsyncEngine, "
                f"got {type(bind).__qualname__}"
            )
        if engine is not None and not isinstance(engine, Engine):
            raise ConfigurationError(
                f"SQLAlchemyBackend: engine= must be a sqlalchemy Engine, got "
                f"{type(engine).__qualname__}"
            )
        if async_engine is not None and not _is_async_engine(async_engine):
            raise ConfigurationError(
                f"SQLAlchemyBackend: async_engine= must be a sqlalchemy AsyncEngine, got "
                f"{type(async_engine).__qualname__}"
            )
        if url is not None and (engine is not None or async_engine is not None):
            raise ConfigurationError("SQLAlchemyBackend: pass a URL or engines, not both")
        if url is None:
            source = engine if engine is not None else async_engine
            if source is None:
                raise ConfigurationError(
                    "SQLAlchemyBackend: pass a database URL such as "
                    "'postgresql+psycopg://user@host/db', an Engine or an AsyncEngine"
                )
            url = _engines.parse_url(source.url)
        if not isinstance(table_name, str) or not table_name:
            raise ConfigurationError(
                f"SQLAlchemyBackend: table_name must be a non-empty string, got {table_name!r}"
            )
        for option, value in (("connect_timeout", connect_timeout), ("busy_timeout", busy_timeout)):
            seconds(value, option)

        self._url = url
        self._where = _engines.describe(url)
        self._memory = _engines.is_memory_sqlite(url)
        if self._memory and engine is None and async_engine is not None:
            raise ConfigurationError(
                "SQLAlchemyBackend: an in-memory SQLite database lives in one connection; "
                "pass the sync Engine (or the URL), which serves async callers too"
            )
        if table_name == DEFAULT_TABLE_NAME and schema is None:
            self.metadata = metadata
            self.table: Table = records
        else:
            self.metadata = MetaData()
            self.table = define_table(self.metadata, table_name, schema=schema)
        self._sql = Statements(self.table)
        self._compiled = _dbapi.CompiledCache()
        self._connect_timeout = float(connect_timeout)
        self._busy_timeout = float(busy_timeout)
        self._engine_options = dict(engine_options or {})
        self._engine: Engine | None = _engines.autocommit(engine) if engine is not None else None
        self._given_async: AsyncEngine | None = (
            _engines.async_autocommit(async_engine) if async_engine is not None else None
        )
        self._owns_engine = engine is None
        self._lock = threading.Lock()
        # In-memory SQLite: one connection, so one operation at a time.
        self._memory_lock = threading.RLock()
        # asyncio connections belong to the loop they were made on: one engine per loop,
        # disposed when that loop shuts down (see _loop_guard).
        self._loops: dict[int, _LoopEngine] = {}
        self._last_loop: tuple[weakref.ref[asyncio.AbstractEventLoop], AsyncEngine] | None = None
        self._pid = _pid
        # Tests force "mysql" on MariaDB to run the MySQL plan on a real server.
        self._force_flavour: Flavour | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLAlchemyBackend:
        """Build a backend for a SQLAlchemy URL; nothing connects until the first operation.

        This is what ``backend_from_url`` and ``configure(backend="postgresql://...")``
        call. ``options`` are the constructor's keyword arguments.

        >>> SQLAlchemyBackend.from_url("postgresql+psycopg://app:secret@db:5432/app")
        SQLAlchemyBackend('postgresql+psycopg://db:5432/app', table='idempotask_records')
        """
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where!r}, table={self.table.fullname!r})"

    # -- engines -------------------------------------------------------------------------

    def _check_fork(self) -> None:
        """In a forked child, drop the parent's pooled connections (never close them:
        they are the parent's sockets) and start afresh."""
        with self._lock:
            if self._pid == _pid:
                return
            self._pid = _pid
            if self._engine is not None:
                self._engine.dispose(close=False)
            if self._given_async is not None:
                self._given_async.sync_engine.dispose(close=False)
            for slot in self._loops.values():
                slot.engine.sync_engine.dispose(close=False)
                _orphans.append(slot.guard)
            self._loops.clear()
            self._last_loop = None

    def _sync_engine(self) -> Engine:
        if self._pid != _pid:
            self._check_fork()
        engine = self._engine
        if engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = _engines.new_sync_engine(
                        _engines.sync_url(self._url),
                        connect_timeout=self._connect_timeout,
                        busy_timeout=self._busy_timeout,
                        options=self._engine_options,
                    )
                engine = self._engine
        return engine

    async def _async_engine(self) -> AsyncEngine:
        if self._pid != _pid:
            self._check_fork()
        if self._given_async is not None:
            return self._given_async
        loop = asyncio.get_running_loop()
        last = self._last_loop
        if last is not None and last[0]() is loop:
            return last[1]
        with self._lock:
            slot = self._loops.get(id(loop))
            fresh = slot is None or slot.loop is not loop
            stale: list[_LoopEngine] = []
            if slot is None or slot.loop is not loop:
                slot = _LoopEngine(loop, self._new_async_engine())
                stale = [s for s in self._loops.values() if s.loop.is_closed()]
                for old in stale:
                    del self._loops[id(old.loop)]
                self._loops[id(loop)] = slot
            self._last_loop = (weakref.ref(loop), slot.engine)
        if fresh:
            guard = _loop_guard(slot, weakref.ref(self))
            await guard.asend(None)  # registers the guard with the loop
            slot.guard = guard
            for old in stale:
                await self._retire(old)
        return slot.engine

    def _forget(self, slot: _LoopEngine) -> None:
        with self._lock:
            if self._loops.get(id(slot.loop)) is slot:
                del self._loops[id(slot.loop)]
            if self._last_loop is not None and self._last_loop[1] is slot.engine:
                self._last_loop = None

    def _new_async_engine(self) -> AsyncEngine:
        # Derived from the user's engine if one was given: same database, our async defaults.
        url = self._engine.url if self._engine is not None and not self._owns_engine else self._url
        return _engines.new_async_engine(
            _engines.async_url(url),
            connect_timeout=self._connect_timeout,
            busy_timeout=self._busy_timeout,
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
        with contextlib.suppress(Exception):
            await slot.engine.dispose(close=close)

    def close(self) -> None:
        """Close the connections of the sync engine this backend created (an engine you
        passed stays open); async engines are closed by :meth:`aclose` or when their
        event loop shuts down.

        >>> SQLAlchemyBackend("sqlite:///:memory:").close()
        """
        with self._lock:
            engine = self._engine if self._owns_engine else None
        if engine is not None:
            engine.dispose()

    async def aclose(self) -> None:
        """Close the connections of the asyncio engine this backend made for the running
        event loop (an ``AsyncEngine`` you passed stays open).

        >>> import asyncio
        >>> asyncio.run(SQLAlchemyBackend("sqlite:///:memory:").aclose())
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            slot = self._loops.get(id(loop))
            if slot is None or slot.loop is not loop:
                return
            del self._loops[id(loop)]
            self._last_loop = None
        if slot.guard is not None:
            await slot.guard.aclose()
        else:
            await slot.engine.dispose()

    # -- running plans ----------------------------------------------------------------------

    def _flavour(self, dialect: Dialect) -> Flavour:
        return self._force_flavour or flavour_of(dialect)

    def _error(self, operation: str, key: str | None, exc: BaseException) -> BackendError:
        target = f" {key!r}" if key is not None else ""
        if isinstance(exc, UnicodeDecodeError):
            return CorruptRecordError(
                f"sql backend: {operation}{target} on {self._where}: a text column holds "
                f"bytes that are not UTF-8, so the row was not written by idempotask ({exc})"
            )
        # The driver's own error (also one raised outside its classes, in a StatementError).
        detail = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
        message = " ".join(str(detail).split())
        if len(message) > 500:
            message = message[:500] + "…"
        return BackendError(
            f"sql backend: {operation}{target} failed on {self._where}: "
            f"{type(detail).__name__}: {message}"
        )

    def _run(self, operation: str, key: str | None, make: Callable[[Flavour], Plan[_T]]) -> _T:
        """Run a plan on the sync engine (in-memory SQLite: one operation at a time)."""
        with self._memory_lock if self._memory else contextlib.nullcontext():
            return self._run_on(self._sync_engine, operation, key, make)

    async def _arun(
        self, operation: str, key: str | None, make: Callable[[Flavour], Plan[_T]]
    ) -> _T:
        """:meth:`_run` on the running loop's asyncio engine (the same plans)."""
        if self._memory:
            # One in-memory connection, no I/O to wait for: the sync path, inline.
            return self._run(operation, key, make)
        try:
            engine = await self._async_engine()
        except (SQLAlchemyError, OSError) as exc:
            raise self._error(operation, key, exc) from exc
        # The whole operation in one greenlet: the pool's checkout and return are
        # SQLAlchemy's sync code (awaiting the driver through the greenlet), and each
        # statement is one await of the driver's own coroutine (see _dbapi.Executor).
        # AsyncConnection would spawn a greenlet for the checkout and another for the
        # return, about 40 µs more per operation.
        return await greenlet_spawn(self._run_on, lambda: engine.sync_engine, operation, key, make)

    def _run_on(
        self,
        engine: Callable[[], Engine],
        operation: str,
        key: str | None,
        make: Callable[[Flavour], Plan[_T]],
    ) -> _T:
        """Run a plan on a connection from ``engine()``'s pool; database errors become
        BackendError, and a deadlock victim's plan runs again."""
        for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
            try:
                with engine().connect() as conn:
                    execute = _dbapi.Executor(conn, self._compiled)
                    plan = make(self._flavour(conn.dialect))
                    reply: Any = None
                    try:
                        while True:
                            try:
                                step = plan.send(reply)
                            except StopIteration as stop:
                                result: _T = _finished(stop)
                                return result
                            reply = execute(step)
                    except BaseException as exc:
                        execute.abandon(exc)
                        raise
            except (SQLAlchemyError, OSError, UnicodeDecodeError) as exc:
                if attempt < _DEADLOCK_ATTEMPTS and _is_retryable(exc):
                    continue
                raise self._error(operation, key, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the store protocol ------------------------------------------------------------------

    @staticmethod
    def _check_key(key: str, *texts: tuple[str, str]) -> None:
        """Refuse values longer than their columns, the same way on every database (SQLite
        would store them, PostgreSQL and MySQL fail with a driver error)."""
        for name, value, limit in (
            ("key", key, KEY_LENGTH),
            *((n, v, TEXT_LENGTH) for n, v in texts),
        ):
            if not isinstance(value, str):
                raise ConfigurationError(f"sql backend: {name} must be a str, got {value!r}")
            if len(value) > limit // 4 and len(value.encode("utf-8")) > limit:
                raise ConfigurationError(
                    f"sql backend: {name} {value[:60]!r}… is {len(value.encode())} bytes in "
                    f"UTF-8; the SQL store holds a {name} of up to {limit} bytes"
                )

    def _claim_plan(
        self, key: str, token: str, lease: float, owner: str, fingerprint: str
    ) -> Callable[[Flavour], Plan[Record]]:
        self._check_key(key, ("token", token), ("owner", owner), ("fingerprint", fingerprint))
        lease = seconds(lease, "lease")
        return lambda flavour: plan_claim(
            self._sql, flavour, key, token, lease=lease, owner=owner, fingerprint=fingerprint
        )

    def _finish_plan(
        self, key: str, token: str, payload: bytes, ttl: float, state: State
    ) -> Callable[[Flavour], Plan[bool]]:
        self._check_key(key, ("token", token))
        ttl = seconds(ttl, "ttl")
        return lambda flavour: plan_finish(self._sql, flavour, key, token, payload, ttl, state)

    def _renew_plan(self, key: str, token: str, lease: float) -> Callable[[Flavour], Plan[bool]]:
        self._check_key(key, ("token", token))
        lease = seconds(lease, "lease")
        return lambda flavour: plan_renew(self._sql, key, token, lease)

    def claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        """Take ``key`` for ``token`` or return the record that holds it (see ``Backend``).

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> store.claim("k", "t1", lease=30, owner="task-7").held_by("t1")
        True
        """
        return self._run("claim", key, self._claim_plan(key, token, lease, owner, fingerprint))

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Store a result for the claim held with ``token``; True when stored (or already).

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.complete("k", "t1", b"42", ttl=3600), store.get("k").payload
        (True, b'42')
        """
        plan = self._finish_plan(key, token, payload, ttl, State.COMPLETED)
        return self._run("complete", key, plan)

    def fail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Store a failure for the claim held with ``token``; True when stored (or already).

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.fail("k", "t1", b"ValueError: boom", ttl=60)
        True
        """
        return self._run("fail", key, self._finish_plan(key, token, payload, ttl, State.FAILED))

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """Restart the lease of the claim held with ``token``; False when it is not held.

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.renew("k", "t1", lease=30), store.renew("k", "other", lease=30)
        (True, False)
        """
        return self._run("renew", key, self._renew_plan(key, token, lease))

    def get(self, key: str) -> Record | None:
        """The live record under ``key``, or None when absent or expired.

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> store.get("never-claimed") is None
        True
        """
        self._check_key(key)
        return self._run("get", key, lambda flavour: plan_get(self._sql, key))

    def delete(self, key: str, *, token: str | None = None) -> bool:
        """Remove the record (only if it carries ``token``, when given); True if removed.

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.delete("k", token="other"), store.delete("k", token="t1")
        (False, True)
        """
        self._check_key(key)
        return self._run("delete", key, lambda flavour: plan_delete(self._sql, key, token))

    def expire_now(self, key: str) -> bool:
        """Test hook: the record's lease or ttl runs out now on the database's clock
        (its expiry is set a second in the past); True if a live record was there.

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.expire_now("k"), store.get("k")
        (True, None)
        """
        self._check_key(key)
        return self._run("expire_now", key, lambda flavour: plan_expire_now(self._sql, key))

    async def aclaim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        """Async :meth:`claim`."""
        return await self._arun(
            "claim", key, self._claim_plan(key, token, lease, owner, fingerprint)
        )

    async def acomplete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Async :meth:`complete`."""
        plan = self._finish_plan(key, token, payload, ttl, State.COMPLETED)
        return await self._arun("complete", key, plan)

    async def afail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Async :meth:`fail`."""
        plan = self._finish_plan(key, token, payload, ttl, State.FAILED)
        return await self._arun("fail", key, plan)

    async def arenew(self, key: str, token: str, *, lease: float) -> bool:
        """Async :meth:`renew`."""
        return await self._arun("renew", key, self._renew_plan(key, token, lease))

    async def aget(self, key: str) -> Record | None:
        """Async :meth:`get`."""
        self._check_key(key)
        return await self._arun("get", key, lambda flavour: plan_get(self._sql, key))

    async def adelete(self, key: str, *, token: str | None = None) -> bool:
        """Async :meth:`delete`."""
        self._check_key(key)
        return await self._arun("delete", key, lambda flavour: plan_delete(self._sql, key, token))

    # -- maintenance ---------------------------------------------------------------------------

    @staticmethod
    def _check_batch(batch: int) -> int:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigurationError(
                f"sql backend: purge batch must be a positive int, got {batch!r}"
            )
        return batch

    def purge_expired(self, batch: int = 1000) -> int:
        """Delete expired records, ``batch`` rows per statement (each its own short
        transaction, so no lock is held for long); returns how many were deleted.

        Expired records already behave as absent; purging only reclaims space. Run it
        from a periodic job.

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30); _ = store.expire_now("k")
        >>> store.purge_expired(batch=100)
        1
        """
        self._check_batch(batch)
        return self._run("purge_expired", None, lambda f: plan_purge(self._sql, f, batch))

    async def apurge_expired(self, batch: int = 1000) -> int:
        """Async :meth:`purge_expired`."""
        self._check_batch(batch)
        return await self._arun("purge_expired", None, lambda f: plan_purge(self._sql, f, batch))

    def _ddl(self, conn: Connection, create: bool) -> None:
        if create:
            self.metadata.create_all(conn, tables=[self.table], checkfirst=True)
        else:
            self.metadata.drop_all(conn, tables=[self.table], checkfirst=True)

    def create_tables(self) -> None:
        """Create the records table and its index if missing (safe to call again, and from
        several processes at once). Use Alembic with :attr:`metadata` in production.

        >>> SQLAlchemyBackend("sqlite:///:memory:").create_tables()
        """
        self._schema_change(True)

    def drop_tables(self) -> None:
        """Drop the records table if it exists (every record is lost).

        >>> SQLAlchemyBackend("sqlite:///:memory:").drop_tables()
        """
        self._schema_change(False)

    def _schema_change(self, create: bool) -> None:
        operation = "create_tables" if create else "drop_tables"
        try:
            with (
                self._memory_lock if self._memory else contextlib.nullcontext(),
                self._sync_engine().connect() as conn,
            ):
                try:
                    self._ddl(conn, create)
                except SQLAlchemyError:
                    # Another process created (or dropped) it between our check and our
                    # statement; the second check sees it.
                    self._ddl(conn, create)
        except (SQLAlchemyError, OSError) as exc:
            raise self._error(operation, None, exc) from exc

    async def acreate_tables(self) -> None:
        """Async :meth:`create_tables`."""
        await self._aschema_change(True)

    async def adrop_tables(self) -> None:
        """Async :meth:`drop_tables`."""
        await self._aschema_change(False)

    async def _aschema_change(self, create: bool) -> None:
        if self._memory:
            self._schema_change(create)
            return
        operation = "create_tables" if create else "drop_tables"
        try:
            engine = await self._async_engine()
            async with engine.connect() as conn:
                try:
                    await conn.run_sync(self._ddl, create)
                except SQLAlchemyError:
                    await conn.run_sync(self._ddl, create)
        except (SQLAlchemyError, OSError) as exc:
            raise self._error(operation, None, exc) from exc

"""Transactions a transactional call's body writes in (``@idempotent(transactional=True)``).

:func:`begin` / :func:`abegin` check a connection out of the store's engine (sync
``Connection``, asyncio ``AsyncConnection``), take it out of autocommit for the time of
the call (SQLAlchemy's ``execution_options(isolation_level=...)``, which the pool undoes
when the connection goes back) and open a transaction with ``Connection.begin()``. The
body writes through that connection; :class:`SQLTransaction` then writes the result with
the store's compare-and-set ``UPDATE`` (held with the claim's token, lease not run out),
which locks the record's row only at the very end, and commits.

The waits a paused owner can cause are bounded by the call's lease (the README's
transactional "Its limits" say what that guarantees, and why SQLite is refused unless
``sqlite_transactions=True``, ``:memory:`` always): PostgreSQL's for the transaction
only (``set_config(..., true)``, i.e. ``SET LOCAL``); MariaDB's and MySQL's are session
variables in whole seconds, given their own values back once the transaction ended (one
round trip, see ``_RESTORE``); MySQL has no idle-transaction timeout. Each statement of
the body is also bounded by the store's ``statement_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from sqlalchemy import Connection, text

from idempotask.backends.base import State
from idempotask.backends.sql._database import ASYNC_BOUNDED, seconds
from idempotask.backends.sql._timeouts import LIBPQ, bounded, watchdog
from idempotask.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.engine import Transaction as SATransaction
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncTransaction

    from idempotask.backends.sql import SQLAlchemyBackend

__all__ = ["SQLTransaction", "abegin", "begin"]

_T = TypeVar("_T")

# Integers only are formatted into them (never user text): ``ms`` milliseconds or ``s``
# whole seconds of one lease. SQLite has no such bounds.
_BOUNDS = {
    "postgresql": "SELECT set_config('idle_in_transaction_session_timeout', '{ms}ms', true), "
    "set_config('lock_timeout', '{ms}ms', true)",
    "mariadb": "SET @idempotask_itt = @@SESSION.idle_transaction_timeout, "
    "@idempotask_ilwt = @@SESSION.innodb_lock_wait_timeout, "
    "SESSION idle_transaction_timeout = {s}, innodb_lock_wait_timeout = {s}",
    "mysql": "SET @idempotask_ilwt = @@SESSION.innodb_lock_wait_timeout, "
    "SESSION innodb_lock_wait_timeout = {s}",
}
# MariaDB's and MySQL's bounds are session variables: the connection gets its own values
# (saved by _BOUNDS) back once the transaction ended, before it returns to the pool, so
# they never outlive the call (an application's engine shares that connection).
# The statement runs on the DB-API connection (one round trip, after the commit: no
# transaction of SQLAlchemy's to end again).
_RESTORE = {
    "mariadb": "SET SESSION idle_transaction_timeout = @idempotask_itt, "
    "innodb_lock_wait_timeout = @idempotask_ilwt",
    "mysql": "SET SESSION innodb_lock_wait_timeout = @idempotask_ilwt",
}


def _restore_session(conn: Connection, statement: str) -> None:
    cursor = conn.connection.cursor()
    try:
        cursor.execute(statement)
    finally:
        cursor.close()


def _flavour(store: SQLAlchemyBackend, conn: Connection) -> str:
    return store._force_flavour or store.database._flavour_of(conn.dialect)


def _bounds(store: SQLAlchemyBackend, conn: Connection, lease: float) -> Any:
    """The statement that bounds the transaction's waits by ``lease`` (see the module)."""
    sql = _BOUNDS.get(_flavour(store, conn))
    ms, s = max(1, math.ceil(lease * 1000)), max(1, math.ceil(lease))
    return None if sql is None else text(sql.format(ms=ms, s=s))


@contextlib.contextmanager
def _watched(store: SQLAlchemyBackend, conn: Connection) -> Iterator[None]:
    """Bound what runs inside by the watchdog, as every store statement is on psycopg (see
    _timeouts: libpq has no client-side timeout, a paused server would hold the call for
    ever); TimeoutError once it shut the socket down."""
    bound = store.database.bound if conn.dialect.driver in LIBPQ else None
    if bound is None or conn.closed or conn.invalidated:  # (no socket to watch)
        yield
        return
    dog = watchdog()
    watch = dog.start(conn.connection.driver_connection.fileno(), bound)  # type: ignore[union-attr]
    try:
        yield
    finally:
        if dog.stop(watch):
            raise TimeoutError


async def _awatched(
    store: SQLAlchemyBackend, conn: Connection, fn: Callable[..., Awaitable[_T]], *args: Any
) -> _T:
    """``await fn(*args)`` bounded as the store's asyncio operations are: by the watchdog
    (psycopg) or ``asyncio.timeout`` (drivers with no bound of their own)."""
    bound = store.database.bound
    if bound is not None and conn.dialect.driver in ASYNC_BOUNDED:
        return await bounded(fn(*args), bound)
    with _watched(store, conn):
        return await fn(*args)


def _refuse(store: SQLAlchemyBackend, asynchronous: bool) -> None:
    """Refuse transactions where SQLite cannot hold them well (the messages say why)."""
    db = store.database
    if db.url.get_backend_name() != "sqlite":
        return
    if db.memory:
        raise ConfigurationError(
            f"{store!r}: transactional calls cannot run on an in-memory SQLite database: "
            "its one connection serves every operation, which would all run inside the "
            "call's transaction. Use a SQLite file with sqlite_transactions=True, or "
            "PostgreSQL / MariaDB"
        )
    if not store.sqlite_transactions:
        raise ConfigurationError(
            f"{store!r}: SQLite has one writer at a time, so a transactional call holds the "
            "write lock of the whole file from its first write to its commit, and every "
            "claim, renewal and result of every process waits for it (busy_timeout), a "
            "paused process's for ever. Make the store with sqlite_transactions=True to "
            "accept that (one process, short bodies), or use PostgreSQL / MariaDB"
        )
    if asynchronous and db.local:
        raise ConfigurationError(
            f"{store!r}: an async transactional call on SQLite needs an AsyncEngine "
            "(sqlite+aiosqlite://...) passed as async_engine=, so the body gets an "
            "AsyncConnection"
        )


def _reraise(store: SQLAlchemyBackend, operation: str, key: str, exc: BaseException) -> NoReturn:
    """Raise ``exc`` again, a database's error as the BackendError of ``operation``."""
    if isinstance(exc, Exception):
        raise store.database.error(operation, key, exc, store.table) from exc
    raise exc


def begin(store: SQLAlchemyBackend, key: str, token: str, lease: float) -> SQLTransaction:
    """Open the transaction of the call holding ``key`` with ``token`` (sync)."""
    _refuse(store, False)
    lease = seconds(lease, "lease")
    db = store.database
    try:
        conn = db.sync_engine().connect()
    except Exception as exc:
        raise db.error("begin", key, exc, store.table) from exc
    try:
        conn = conn.execution_options(isolation_level=conn.default_isolation_level)
        trans = conn.begin()
        bounds = _bounds(store, conn, lease)
        if bounds is not None:
            with _watched(store, conn):
                conn.execute(bounds).close()
    except BaseException as exc:
        _discard(conn)
        _reraise(store, "begin", key, exc)
    return SQLTransaction(store, key, token, conn, trans, None, None)


async def abegin(store: SQLAlchemyBackend, key: str, token: str, lease: float) -> SQLTransaction:
    """Open the transaction of the call holding ``key`` with ``token`` (asyncio)."""
    _refuse(store, True)
    lease = seconds(lease, "lease")
    db = store.database
    try:
        engine = await db.async_engine()
        aconn = await engine.connect()
    except Exception as exc:
        raise db.error("begin", key, exc, store.table) from exc
    try:
        conn = aconn.sync_connection
        assert conn is not None
        await aconn.execution_options(isolation_level=conn.default_isolation_level)
        atrans = await aconn.begin()
        bounds = _bounds(store, conn, lease)
        if bounds is not None:
            (await _awatched(store, conn, aconn.execute, bounds)).close()
    except BaseException as exc:
        await _to_end(_adiscard(aconn))
        _reraise(store, "begin", key, exc)
    return SQLTransaction(store, key, token, conn, None, aconn, atrans)


def _discard(conn: Connection) -> None:
    """End a connection whose state is unknown: invalidated, it is never reused (one the
    body closed itself is returned already, its transaction rolled back)."""
    if conn.closed:
        return
    try:
        conn.invalidate()
    finally:
        conn.close()


async def _adiscard(aconn: AsyncConnection) -> None:
    if aconn.closed:
        return
    try:
        await aconn.invalidate()
    finally:
        await aconn.close()


async def _to_end(awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` to its end however often the caller is cancelled meanwhile,
    then re-raise the cancellation (after its result, or its error, is in)."""
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            cancelled = True
    result = task.result()  # its error, if it failed: the cancellation is then lost
    if cancelled:
        raise asyncio.CancelledError
    return result


class SQLTransaction:
    """The transaction of one transactional call on a SQL store (see the module).

    :attr:`connection` is a SQLAlchemy ``Connection`` for a sync call, an
    ``AsyncConnection`` for an async one, inside the open transaction.
    """

    __slots__ = (
        "_aconn",
        "_atrans",
        "_conn",
        "_ended",
        "_key",
        "_restore",
        "_store",
        "_token",
        "_trans",
    )

    def __init__(
        self,
        store: SQLAlchemyBackend,
        key: str,
        token: str,
        conn: Connection,
        trans: SATransaction | None,
        aconn: AsyncConnection | None,
        atrans: AsyncTransaction | None,
    ) -> None:
        self._store = store
        self._key = key
        self._token = token
        self._conn = conn
        self._trans = trans
        self._aconn = aconn
        self._atrans = atrans
        self._ended = False  # the connection is gone: nothing is left to roll back
        self._restore = _RESTORE.get(_flavour(store, conn))  # (MariaDB, MySQL)

    @property
    def connection(self) -> Any:
        return self._aconn if self._aconn is not None else self._conn

    def __repr__(self) -> str:
        return f"<SQLTransaction {self._key!r} on {self._store.database.where!r}>"

    def _params(self, payload: bytes, ttl: float) -> dict[str, Any]:
        return {
            "k": self._key,
            "t": self._token,
            "s": State.COMPLETED.value,
            "p": bytes(payload),
            "d": seconds(ttl, "ttl"),
        }

    # -- sync ------------------------------------------------------------------------------

    def complete(self, payload: bytes, *, ttl: float) -> bool:
        params = self._params(payload, ttl)
        try:
            with _watched(self._store, self._conn):
                count = self._conn.execute(self._store._sql.finish, params).rowcount
        except Exception as exc:
            self._ended = True
            _discard(self._conn)
            _reraise(self._store, "complete", self._key, exc)
        return bool(count)

    def commit(self) -> None:
        self._end("commit")

    def rollback(self) -> None:
        self._end("rollback")

    def _end(self, operation: str) -> None:
        assert self._trans is not None
        if self._ended:
            return
        self._ended = True
        try:
            with _watched(self._store, self._conn):
                getattr(self._trans, operation)()  # commit() or rollback()
        except BaseException as exc:
            _discard(self._conn)
            _reraise(self._store, operation, self._key, exc)
        if self._restore is not None:
            try:
                with _watched(self._store, self._conn):
                    _restore_session(self._conn, self._restore)
            except Exception:
                _discard(self._conn)  # its bounds would outlive the call: never reused
                return
        self._conn.close()

    # -- asyncio ---------------------------------------------------------------------------

    async def acomplete(self, payload: bytes, *, ttl: float) -> bool:
        params = self._params(payload, ttl)
        aconn = self._aconn
        assert aconn is not None
        try:
            finish = self._store._sql.finish
            result = await _awatched(self._store, self._conn, aconn.execute, finish, params)
        except BaseException as exc:
            self._ended = True
            await _to_end(_adiscard(aconn))
            _reraise(self._store, "complete", self._key, exc)
        return bool(result.rowcount)

    async def acommit(self) -> None:
        await _to_end(self._aend("commit"))

    async def arollback(self) -> None:
        await _to_end(self._aend("rollback"))

    async def _aend(self, operation: str) -> None:
        aconn, atrans = self._aconn, self._atrans
        assert aconn is not None
        assert atrans is not None
        if self._ended:
            return
        self._ended = True
        try:
            # commit() or rollback()
            await _awatched(self._store, self._conn, getattr(atrans, operation))
        except BaseException as exc:
            await _adiscard(aconn)
            _reraise(self._store, operation, self._key, exc)
        if self._restore is not None:
            try:
                restore = self._restore
                await _awatched(self._store, self._conn, aconn.run_sync, _restore_session, restore)
            except Exception:
                await _adiscard(aconn)  # its bounds would outlive the call: never reused
                return
        await aconn.close()

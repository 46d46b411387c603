"""psycopg's connections driven through its libpq wrapper, for the stores' own statements.

A psycopg cursor's ``execute()`` and ``fetchall()`` run several layers of Python around
the libpq calls (query conversion and cache, prepare bookkeeping, result and row-maker
set-up), touched again after every wait on the socket, when none of it is in the
processor's caches. Sending our statements with :mod:`psycopg.pq` (psycopg's documented
libpq wrapper) and psycopg's own :class:`~psycopg.adapt.Transformer` to dump parameters
and load rows does the same work in a few calls: a first call's claim and complete,
sent this way, cost 46,000 instructions and 1.8-2.0 times one plain ``INSERT`` through
a cursor, against 2.1-2.4 times through a cursor.

What psycopg does, :class:`Session` does the same way: parameters dumped by the
connection's adapters (so types and encodings are psycopg's), one round trip per
statement, a statement prepared on a connection at its ``prepare_threshold``-th run
there (one more round trip, once; never with ``prepare_threshold=None``, as PgBouncer in
transaction mode needs) and again if something deallocated it, errors raised
as psycopg's own exception classes (so SQLAlchemy and the executor read them as they read
a cursor's), rows loaded as tuples. It is used only where a cursor would add nothing:
an exact ``psycopg.Connection`` or ``AsyncConnection`` (no subclass, no cursor factory
of a tracing library), in autocommit, without a pipeline open.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import select
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from time import monotonic
from typing import Any

__all__ = ["PqStatement", "Session", "Unanswered", "session_for"]

try:  # psycopg is an optional extra; without it no connection is ever a psycopg one
    import psycopg
    from psycopg import errors as _errors
    from psycopg.adapt import PyFormat, Transformer

    _AVAILABLE = True
except ImportError:  # pragma: no cover - the [postgresql] extra is not installed
    _AVAILABLE = False

_PLACEHOLDER = re.compile(rb"%\((\w+)\)s|%%")
_names = itertools.count(1)

#: A result's status codes (the values of psycopg.pq.ExecStatus).
_COMMAND_OK, _TUPLES_OK, _FATAL_ERROR = 1, 2, 7
#: InvalidSqlStatementName: a prepared statement that is not there (DEALLOCATE, DISCARD).
_NOT_PREPARED = "26000"
_NO_ROWS: tuple[()] = ()


class PqStatement:
    """A pyformat statement as libpq takes it: ``$n`` placeholders (each name numbered
    once, at its first place) and its parameter values in that order, made from a plan's
    values (``inputs``: the plan's name, the name in the SQL, a bind processor or None)
    and the statement's ``constants`` (by name in the SQL)."""

    __slots__ = ("formats", "sql", "values")

    def __init__(
        self,
        driver_sql: bytes,
        constants: Mapping[str, Any],
        inputs: tuple[tuple[str, str, Callable[[Any], Any] | None], ...],
    ) -> None:
        names: list[str] = []

        def number(match: re.Match[bytes]) -> bytes:
            if match.group(1) is None:
                return b"%"  # an escaped percent sign
            name = match.group(1).decode()
            if name not in names:
                names.append(name)
            return b"$%d" % (names.index(name) + 1)

        self.sql = _PLACEHOLDER.sub(number, driver_sql)
        self.formats = [PyFormat.AUTO] * len(names)
        fixed = dict(constants)
        if not names:
            self.values: Callable[[Mapping[str, Any]], tuple[Any, ...]] = lambda values: ()
        elif all(plan == key and process is None for plan, key, process in inputs):
            # The usual case: the plan's names are the SQL's, nothing to process.
            pick = itemgetter(*names) if len(names) > 1 else _one(names[0])
            self.values = lambda values: pick({**fixed, **values})
        else:
            pick = itemgetter(*names) if len(names) > 1 else _one(names[0])

            def layout(values: Mapping[str, Any]) -> tuple[Any, ...]:
                params = dict(fixed)
                for plan, key, process in inputs:
                    value = values[plan]
                    params[key] = value if process is None else process(value)
                return pick(params)

            self.values = layout


def _one(name: str) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    return lambda params: (params[name],)


def session_for(driver_connection: Any, info: dict[Any, Any]) -> Session | None:
    """The libpq path for ``driver_connection``, kept in its pool record's ``info`` (which
    SQLAlchemy clears when the connection is replaced), or None where a cursor must run
    the statements: not an exact psycopg connection, a tracing cursor factory, not in
    autocommit, or a pipeline open."""
    if not _AVAILABLE:
        return None
    kind = type(driver_connection)
    if kind is psycopg.Connection:
        factory: Any = psycopg.Cursor
    elif kind is psycopg.AsyncConnection:
        factory = psycopg.AsyncCursor
    else:
        return None
    if (
        driver_connection.cursor_factory is not factory
        or not driver_connection.autocommit
        or driver_connection.pgconn.pipeline_status
    ):
        return None
    session = info.get(Session)
    if session is None or session.connection is not driver_connection:
        session = info[Session] = Session(driver_connection)
    return session


class Session:
    """One psycopg connection's libpq path: its ``PGconn``, a transformer for its
    adapters, and what was prepared on it."""

    __slots__ = ("_poll", "bound", "connection", "fd", "pgconn", "seen", "threshold", "tx")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.pgconn = connection.pgconn
        self.fd: int = self.pgconn.socket
        self.tx = Transformer.from_context(connection)
        self.threshold: int | None = connection.prepare_threshold
        # (statement, parameter types) -> the prepared statement's name, or how often it
        # ran unprepared.
        self.seen: dict[tuple[PqStatement, tuple[int, ...]], bytes | int] = {}
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        #: How long a sync statement may wait for its answer (seconds; None: for ever),
        #: set by the executor using the connection.
        self.bound: float | None = None

    # -- sending and reading ------------------------------------------------------------

    def _prepare_now(self, key: tuple[PqStatement, tuple[int, ...]]) -> bytes | None:
        """For a statement not prepared on this connection: the name to prepare it under
        now, on its run number ``prepare_threshold`` here as psycopg does, or None (it
        is sent unprepared, and the run counted)."""
        runs = self.seen.get(key, 0)
        assert not isinstance(runs, bytes)  # prepared ones are sent by execute()
        if self.threshold is not None and runs + 1 >= self.threshold:
            return b"idempotask_%d" % next(_names)
        self.seen[key] = runs + 1
        return None

    def _send(
        self, statement: PqStatement, types: Any, values: Any, formats: Any, name: bytes | None
    ) -> None:
        if name:
            self.pgconn.send_query_prepared(name, values, formats, 1)
        else:
            self.pgconn.send_query_params(statement.sql, values, types, formats, 1)

    def _check(self, results: list[Any], prepared: Any = None) -> Any:
        """The one result of a statement, or psycopg's exception for its error. None when
        the statement was sent prepared (``prepared``: its key in :attr:`seen`) and the
        error says the prepared statement is gone (someone deallocated it): the caller
        sends it again unprepared (it is prepared again later)."""
        result = results[-1] if results else None
        if result is None:
            raise psycopg.OperationalError("the server sent no result for the statement")
        status = result.status
        if status in (_TUPLES_OK, _COMMAND_OK):
            return result
        error = _errors.error_from_result(result, encoding=self.tx.encoding)
        if prepared is not None and error.sqlstate == _NOT_PREPARED:
            self.seen[prepared] = 0
            return None
        raise error

    def _load(self, result: Any, fetch: bool) -> tuple[Sequence[Any], int]:
        rows: Sequence[Any] = _NO_ROWS
        if fetch and result.ntuples:
            tx = self.tx
            tx.set_pgresult(result)
            rows = tx.load_rows(0, result.ntuples, tuple)
        count = result.command_tuples
        return rows, -1 if count is None else count

    def execute(self, statement: PqStatement, params: Mapping[str, Any], fetch: bool) -> Any:
        """Run ``statement`` with the plan's ``params``: its rows (when ``fetch``) and row
        count, as a cursor's ``fetchall()`` and ``rowcount`` give them."""
        tx = self.tx
        values = tx.dump_sequence(statement.values(params), statement.formats)
        key, formats = (statement, tx.types or ()), tx.formats
        name = self.seen.get(key)
        if type(name) is bytes:  # prepared: the path of nearly every statement
            self.pgconn.send_query_prepared(name, values, formats, 1)
            results = self._wait()
            if len(results) == 1:  # the result, inline (see _check and _load)
                result = results[0]
                status, count = result.status, result.command_tuples
                if count is None:
                    count = -1
                if status == _TUPLES_OK and fetch and result.ntuples:
                    tx.set_pgresult(result)
                    return tx.load_rows(0, result.ntuples, tuple), count
                if status in (_TUPLES_OK, _COMMAND_OK):
                    return _NO_ROWS, count
            result = self._check(results, key)
            if result is not None:
                return self._load(result, fetch)
        fresh = self._prepare_now(key)
        if fresh is not None:
            self.pgconn.send_prepare(fresh, statement.sql, key[1])
            self._check(self._wait())
            self.seen[key] = fresh
        self._send(statement, key[1], values, formats, fresh)
        return self._load(self._check(self._wait()), fetch)

    async def aexecute(self, statement: PqStatement, params: Mapping[str, Any], fetch: bool) -> Any:
        """:meth:`execute` on an ``AsyncConnection``, waiting on the running loop."""
        tx = self.tx
        values = tx.dump_sequence(statement.values(params), statement.formats)
        key, formats = (statement, tx.types or ()), tx.formats
        name = self.seen.get(key)
        if type(name) is bytes:
            self.pgconn.send_query_prepared(name, values, formats, 1)
            result = self._check(await self._await(), key)
            if result is not None:
                return self._load(result, fetch)
        fresh = self._prepare_now(key)
        if fresh is not None:
            self.pgconn.send_prepare(fresh, statement.sql, key[1])
            self._check(await self._await())
            self.seen[key] = fresh
        self._send(statement, key[1], values, formats, fresh)
        return self._load(self._check(await self._await()), fetch)

    # -- waiting -----------------------------------------------------------------------

    def _wait(self) -> list[Any]:
        """Finish sending, then read until the server is ready again: the results.

        Bounded by :attr:`bound` (seconds, None: no bound) from here: past it the
        statement is abandoned with :class:`Unanswered` (the caller discards the
        connection). A sync connection needs no watchdog thread: the wait is ours.
        """
        pgconn, bound = self.pgconn, self.bound
        deadline = 0.0 if bound is None else monotonic() + bound
        if pgconn.flush():
            self._flush(deadline)
        results: list[Any] = []
        poll = self._poll.poll
        timeout = None if bound is None else bound * 1000.0
        while True:
            if not poll(timeout):
                raise Unanswered
            pgconn.consume_input()
            if _drain(pgconn, results):
                return results
            if bound is not None:  # more to come: what is left of the bound
                timeout = (deadline - monotonic()) * 1000.0
                if timeout <= 0:
                    raise Unanswered

    def _flush(self, deadline: float) -> None:
        """Send what did not fit in the socket's buffer (a large payload), reading what
        the server sends meanwhile so neither side waits on the other (until
        ``deadline``, on the monotonic clock, when :attr:`bound` is set)."""
        pgconn, fd, bound = self.pgconn, self.fd, self.bound
        while True:
            timeout = None if bound is None else deadline - monotonic()
            if timeout is not None and timeout <= 0:
                raise Unanswered
            readable, writable, _ = select.select([fd], [fd], [], timeout)
            if not readable and not writable:
                raise Unanswered
            if readable:
                pgconn.consume_input()
            if not pgconn.flush():
                return

    async def _await(self) -> list[Any]:
        """:meth:`_wait` on the running loop."""
        pgconn, fd = self.pgconn, self.fd
        loop = asyncio.get_running_loop()
        if pgconn.flush():
            await self._aflush(loop)
        results: list[Any] = []
        while True:
            future = loop.create_future()
            loop.add_reader(fd, _wake, future)
            try:
                await future
            finally:
                loop.remove_reader(fd)
            pgconn.consume_input()
            if _drain(pgconn, results):
                return results

    async def _aflush(self, loop: asyncio.AbstractEventLoop) -> None:
        pgconn, fd = self.pgconn, self.fd
        while True:
            future = loop.create_future()
            loop.add_writer(fd, _wake, future)
            loop.add_reader(fd, _wake, future)
            try:
                await future
            finally:
                loop.remove_writer(fd)
                loop.remove_reader(fd)
            pgconn.consume_input()
            if not pgconn.flush():
                return


def _drain(pgconn: Any, results: list[Any]) -> bool:
    """Collect the results libpq has read in full; True once the server is ready for the
    next statement (libpq's last result, None, came)."""
    while not pgconn.is_busy():
        result = pgconn.get_result()
        if result is None:
            return True
        results.append(result)
    return False


class Unanswered(Exception):
    """A sync statement got no complete answer within its bound: the connection is in an
    unknown state, and is discarded."""


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

"""The SQL store's flows run on a Django database alias.

The SQL store (:mod:`idempotask.backends.sql`) does every operation as a *flow* of
SQLAlchemy Core statements handed to a session. Here the session compiles each
statement with SQLAlchemy for the alias's database (once per statement, then cached)
and executes it with a cursor of ``django.db.connections[alias]``: the connection
Django already holds for the calling thread, with its settings (``CONN_MAX_AGE``,
``OPTIONS``, ``CONN_HEALTH_CHECKS``), and no second pool. Values pass through the
columns' own SQLAlchemy type processors both ways, exactly as on a SQLAlchemy engine.

Transactions: a statement outside a transaction commits at once (Django's autocommit).
An operation that needs several statements in one transaction (claiming on SQLite,
claiming a due dead letter, a breaker's failure) opens its own (``BEGIN``; SQLite
``BEGIN IMMEDIATE``); when the alias is already inside a transaction (your
``transaction.atomic()``, ``ATOMIC_REQUESTS``), every statement joins it and such an
operation uses a savepoint: what the store writes then commits or rolls back with
your transaction.

Async callers run the sync operation with ``asgiref.sync.sync_to_async(
thread_sensitive=False)``, Django's documented way to use its database from async
code, in a thread of the event loop's executor with that thread's connection (one per
executor thread at most): never on the thread of an async transactional call, whose
open transaction a claim or a lease renewal must not join.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

from sqlalchemy import MetaData, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.schema import CreateIndex, CreateTable, DropTable
from sqlalchemy.sql.expression import Executable

from idempotask.backends.sql._database import Database, Flavour, Session
from idempotask.django.schema import dialect_for
from idempotask.errors import BackendError, ConfigurationError
from idempotask.flow import Flow, Op, drive

__all__ = ["DjangoDatabase", "DjangoSession"]

_T = TypeVar("_T")
_NO_PARAMS: Mapping[str, Any] = MappingProxyType({})
_DEADLOCK_ATTEMPTS = 3
_PG_RETRYABLE = {"40P01", "40001"}
_MYSQL_DEADLOCK = 1213


def _result_processor(type_: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """The column type's processor of result values, if it has one. The driver's type
    code is not known here: a numeric processor that needs it (psycopg's, converting a
    ``numeric`` to float) is left out, as the columns read here are ``double precision``,
    which the drivers return as float already."""
    try:
        process: Callable[[Any], Any] | None = type_.dialect_impl(dialect).result_processor(
            dialect, None
        )
    except TypeError:
        return None
    return process


class _Compiled:
    """A statement compiled for one dialect: its SQL, how to order its parameters, the
    bind processors of its parameters and the result processors of its columns."""

    __slots__ = ("binds", "compiled", "dialect", "postcompile", "results", "sql", "statement")

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
        self.statement = statement  # kept alive, so its id() is not reused
        self.dialect = dialect
        self.compiled = compiled
        self.sql = str(compiled)
        # A value rendered into the SQL (MySQL's LIMIT): compiled per execution.
        self.postcompile = "POSTCOMPILE" in self.sql
        self.binds = self._bind_processors(compiled, dialect)
        columns = getattr(statement, "selected_columns", None)
        if columns is None or not len(columns):
            columns = getattr(statement, "exported_columns", None) or ()
        self.results = [_result_processor(column.type, dialect) for column in columns]

    @staticmethod
    def _bind_processors(compiled: Any, dialect: Dialect) -> dict[str, Callable[[Any], Any]]:
        binds: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                binds[name] = process
        return binds

    def query(self, params: Mapping[str, Any]) -> tuple[str, Any]:
        """The SQL and the parameters, in the form Django's cursor takes, for ``params``."""
        compiled, binds, sql = self.compiled, self.binds, self.sql
        if self.postcompile:
            statement: Any = self.statement
            compiled = statement.params(**params).compile(
                dialect=self.dialect, compile_kwargs={"render_postcompile": True}
            )
            binds, sql = self._bind_processors(compiled, self.dialect), str(compiled)
        values = compiled.construct_params(params)
        for name, process in binds.items():
            if name in values:
                values[name] = process(values[name])
        if not self.dialect.positional:
            return sql, values
        return sql, [values[name] for name in compiled.positiontup or ()]

    def rows(self, rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        results = self.results
        if not any(results):
            return [tuple(row) for row in rows]
        return [
            tuple(v if p is None else p(v) for v, p in zip(row, results, strict=False))
            for row in rows
        ]


class DjangoSession(Session):
    """One operation's statements on the alias's connection (see the module's doc)."""

    __slots__ = ("alias", "cache", "sid")

    def __init__(self, database: DjangoDatabase) -> None:
        # Session's attributes, without a SQLAlchemy connection.
        self.conn = None  # type: ignore[assignment]
        self.aconn = None
        self.dialect = database.dialect
        self.flavour = database.flavour
        self.bound = None
        self.in_transaction = False
        self.alias = database.alias
        self.cache = database.compiled
        self.sid: str | None = None

    def op(self, statement: Executable, params: Mapping[str, Any] = {}, reply: Any = "rows") -> Op:
        return Op(self.execute, None, statement, params, reply)

    def begin(self) -> Op:
        return Op(self._begin, None)

    def commit(self) -> Op:
        return Op(self._commit, None)

    def _begin(self) -> None:
        from django.db import transaction  # type: ignore[import-untyped]

        if not transaction.get_autocommit(using=self.alias):
            self.sid = transaction.savepoint(using=self.alias)
        else:
            self._raw("BEGIN IMMEDIATE" if self.flavour == "sqlite" else "BEGIN")
        self.in_transaction = True

    def _commit(self) -> None:
        from django.db import transaction

        if self.sid is not None:
            transaction.savepoint_commit(self.sid, using=self.alias)
            self.sid = None
        else:
            self._raw("COMMIT")
        self.in_transaction = False

    def _raw(self, sql: str) -> None:
        from django.db import connections

        with connections[self.alias].cursor() as cursor:
            cursor.execute(sql)

    def compiled(self, statement: Executable) -> _Compiled:
        entry = self.cache.get(id(statement))
        if entry is None or entry.statement is not statement:
            entry = _Compiled(statement, self.dialect)
            if len(self.cache) > 1024:
                self.cache.clear()
            self.cache[id(statement)] = entry
        return entry

    def execute(self, statement: Executable, params: Mapping[str, Any], reply: Any) -> Any:
        from django.db import DatabaseError, connections
        from django.db import IntegrityError as DjangoIntegrityError

        compiled = self.compiled(statement)
        sql, values = compiled.query(params)
        try:
            with connections[self.alias].cursor() as cursor:
                cursor.execute(sql, values)
                if reply == "rows":
                    return compiled.rows(cursor.fetchall())
                if reply == "rowcount":
                    return cursor.rowcount
                return None
        except DjangoIntegrityError as exc:
            # The flows catch SQLAlchemy's IntegrityError (an INSERT that lost a race).
            raise IntegrityError(compiled.sql, None, exc.__cause__ or exc) from exc
        except DatabaseError as exc:
            orig = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            raise DBAPIError(compiled.sql, None, orig) from exc

    async def aexecute(self, statement: Executable, params: Mapping[str, Any], reply: Any) -> Any:
        return self.execute(statement, params, reply)  # never used: see DjangoDatabase.arun

    def end(self) -> None:
        if not self.in_transaction:
            return
        self.in_transaction = False
        from django.db import transaction

        try:
            if self.sid is not None:
                sid, self.sid = self.sid, None
                transaction.savepoint_rollback(sid, using=self.alias)
            else:
                self._raw("ROLLBACK")
        except Exception:
            from django.db import connections

            connections[self.alias].close()

    async def aend(self) -> None:
        self.end()


def _retryable(exc: BaseException, in_transaction: bool) -> bool:
    if in_transaction or not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _PG_RETRYABLE:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return len(args) > 0 and args[0] == _MYSQL_DEADLOCK


class DjangoDatabase(Database):
    """The SQL store's :class:`~idempotask.backends.sql.Database` on a Django alias."""

    def __init__(self, alias: str = "default") -> None:  # no engines: no super().__init__
        from django.db import connections

        if not isinstance(alias, str) or alias not in connections:
            known = ", ".join(sorted(connections)) or "none"
            raise ConfigurationError(
                f"idempotask.django: {alias!r} is not a database alias in DATABASES "
                f"(known: {known})"
            )
        self.alias = alias
        vendor = connections[alias].vendor
        self.dialect = dialect_for(vendor)
        self.flavour: Flavour = "mysql" if vendor == "mysql" else vendor
        #: MySQL or MariaDB: told apart (and the server's version read) on first use.
        self.mariadb = False
        self._server_known = vendor != "mysql"
        self.where = f"django:{alias}"
        self.memory = False
        self.local = False
        self.bound = None
        self.statement_timeout = None
        self.compiled: dict[int, _Compiled] = {}
        self._pending: list[tuple[MetaData, list[Table]]] = []
        self._lock = threading.Lock()
        self._flavour = self.flavour

    def close(self) -> None:
        """Nothing to close: the connections are Django's."""

    async def aclose(self) -> None:
        """Nothing to close: the connections are Django's."""

    def run(
        self,
        operation: str,
        key: str | None,
        make: Callable[[Session], Flow[_T]],
        table: Table | None = None,
    ) -> _T:
        """Run the flow on the alias's connection for this thread; a deadlock victim's flow
        runs again (outside a transaction of yours only: inside, the whole of it is gone)."""
        from django.db import connections, transaction

        if self._pending:
            self._create_pending()
        if not self._server_known:
            self._read_server(operation, key)
        for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
            session = DjangoSession(self)
            try:
                return drive(make(session), (IntegrityError,))
            except (DBAPIError, UnicodeDecodeError) as exc:
                session.end()
                outer = not transaction.get_autocommit(using=self.alias)
                if attempt < _DEADLOCK_ATTEMPTS and _retryable(exc, outer):
                    continue
                if not outer and isinstance(exc, DBAPIError):
                    # Django reconnects only between requests: a connection the server
                    # dropped would fail every later operation of this thread (the lease
                    # renewal's, a worker's). Outside a transaction of yours nothing is
                    # lost by closing it; the next operation connects again.
                    connections[self.alias].close()
                raise self.error(operation, key, exc, table) from exc
            except BaseException:
                session.end()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_server(self, operation: str, key: str | None) -> None:
        """MySQL or MariaDB, and its version: MariaDB 10.5+ runs the one-statement
        ``RETURNING`` plan, and ``SKIP LOCKED`` depends on the version (as on the SQL
        store, whose dialect learns both when it connects)."""
        from django.db import DatabaseError, connections

        try:
            with connections[self.alias].cursor() as cursor:
                cursor.execute("SELECT VERSION()")
                (text,) = cursor.fetchone()
        except DatabaseError as exc:
            raise self.error(operation, key, exc) from exc
        numbers = [int(n) for n in re.findall(r"\d+", str(text).split("-")[0])[:3]]
        version = tuple(numbers) or (0,)
        self.mariadb = "mariadb" in str(text).lower()
        self.dialect.server_version_info = version
        self.dialect.is_mariadb = self.mariadb  # type: ignore[attr-defined]
        if self.mariadb and version >= (10, 5):
            self.flavour = self._flavour = "mariadb"
        self._server_known = True

    async def arun(
        self,
        operation: str,
        key: str | None,
        make: Callable[[Session], Flow[_T]],
        table: Table | None = None,
    ) -> _T:
        """:meth:`run` through ``sync_to_async(thread_sensitive=False)``: in a thread of the
        loop's executor, on that thread's own connection, never on the thread of a
        transactional call's open transaction (which would make a claim or a renewal
        part of it)."""
        from asgiref.sync import sync_to_async

        return await sync_to_async(self.run, thread_sensitive=False)(operation, key, make, table)

    # -- schema (tests and scripts; an application has ``manage.py migrate idempotask``) --

    def _create_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for metadata, tables in pending:
            self.schema_change(metadata, tables, True)

    def schema_change(self, metadata: MetaData, tables: Sequence[Table], create: bool) -> None:
        """Create the missing ``tables`` (with their indexes) or drop the existing ones."""
        from django.db import DatabaseError, connections

        connection = connections[self.alias]
        try:
            existing = set(connection.introspection.table_names())
            statements: list[str] = []
            for table in tables if create else list(reversed(tables)):
                if create and table.name not in existing:
                    statements.append(str(CreateTable(table).compile(dialect=self.dialect)))
                    statements += [
                        str(CreateIndex(index).compile(dialect=self.dialect))
                        for index in table.indexes
                    ]
                elif not create and table.name in existing:
                    statements.append(str(DropTable(table).compile(dialect=self.dialect)))
            with connection.cursor() as cursor:
                for sql in statements:
                    cursor.execute(sql)
        except DatabaseError as exc:
            operation = "create_tables" if create else "drop_tables"
            raise BackendError(f"idempotask.django: {operation} on {self.where}: {exc}") from exc

    async def aschema_change(
        self, metadata: MetaData, tables: Sequence[Table], create: bool
    ) -> None:
        from asgiref.sync import sync_to_async

        await sync_to_async(self.schema_change, thread_sensitive=True)(metadata, tables, create)

"""The records table, its column types and the database-clock expression.

Pure SQLAlchemy Core definitions: nothing here connects, and nothing imports a driver.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Executable,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.mysql import LONGBLOB, LONGTEXT, VARBINARY
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import CompileError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = [
    "DEFAULT_BREAKER_TABLE",
    "DEFAULT_DEAD_LETTER_TABLE",
    "DEFAULT_TABLE_NAME",
    "KEY_LENGTH",
    "NAME_LENGTH",
    "TEXT_LENGTH",
    "BinaryText",
    "CodePoints",
    "DbNow",
    "DbStatementNow",
    "StatementSet",
    "built",
    "define_breaker_table",
    "define_dead_letter_table",
    "define_table",
    "metadata",
    "text_of",
]

#: The ``MetaData`` holding the default tables (records, dead letters, breakers), for
#: Alembic's ``target_metadata``; a store with another table name has its own, as its
#: ``metadata`` attribute.
metadata = MetaData()

#: The table name used unless ``table_name=`` says otherwise.
DEFAULT_TABLE_NAME = "idempotask_records"
#: The longest key: characters on PostgreSQL and SQLite, UTF-8 bytes on MySQL/MariaDB
#: (InnoDB indexes up to 3072 bytes, PostgreSQL's B-tree about 2700).
KEY_LENGTH = 1024
#: The longest token, owner id or fingerprint.
TEXT_LENGTH = 255
#: The longest function name or exception type of a dead letter.
NAME_LENGTH = 512
#: The dead-letter table used unless ``table_name=`` says otherwise.
DEFAULT_DEAD_LETTER_TABLE = "idempotask_dead_letters"
#: The circuit-breaker table used unless ``table_name=`` says otherwise.
DEFAULT_BREAKER_TABLE = "idempotask_breakers"

_MYSQL = ("mysql", "mariadb")


class StatementSet:
    """The statements a store sends for one ``table``, each built once (per arguments, see
    :func:`built`; or a ``cached_property``) and reused, so each compiles once per dialect."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self._built: dict[tuple[Any, ...], Executable] = {}


def built(build: Callable[..., Executable]) -> Callable[..., Executable]:
    """A :class:`StatementSet` method whose statement is built once per arguments."""
    name = build.__name__

    def method(self: StatementSet, *args: Any) -> Executable:
        statement = self._built.get((name, *args))
        if statement is None:
            statement = self._built.setdefault((name, *args), build(self, *args))
        return statement

    method.__name__, method.__doc__ = name, build.__doc__
    return method


class BinaryText(TypeDecorator[str]):
    """A string compared byte for byte on every database.

    MySQL and MariaDB compare strings through a collation, and their default ones fold
    case and ignore trailing spaces (``'Key' = 'key '`` is true), which would merge
    distinct keys, tokens and owner ids. There the column is ``VARBINARY`` holding UTF-8;
    PostgreSQL and SQLite already compare ``VARCHAR`` exactly.

    >>> from sqlalchemy.dialects import mysql, postgresql
    >>> BinaryText(40).compile(dialect=mysql.dialect())
    'VARBINARY(40)'
    >>> BinaryText(40).compile(dialect=postgresql.dialect())
    'VARCHAR(40)'
    """

    impl = String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in _MYSQL:
            return dialect.type_descriptor(VARBINARY(self.length))
        return dialect.type_descriptor(String(self.length))

    def process_bind_param(self, value: str | None, dialect: Dialect) -> Any:
        if value is not None and dialect.name in _MYSQL:
            return value.encode("utf-8")
        return value

    def bind_processor(self, dialect: Dialect) -> Any:
        # Elsewhere the value passes unchanged: the implementation's own processor (as
        # TypeDecorator does without process_bind_param), not a call per key and token.
        if dialect.name in _MYSQL:
            return super().bind_processor(dialect)
        return self.impl_instance.bind_processor(dialect)

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        return text_of(value)  # type: ignore[no-any-return]


def text_of(value: Any) -> Any:
    """A text column's value as str: MySQL/MariaDB hold text as VARBINARY, whose bytes are
    UTF-8 -- strictly: bytes that are not were not written by us (the UnicodeDecodeError
    is reported as a CorruptRecordError)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8")
    return value


class DbNow(FunctionElement[float]):
    """The database's current time as epoch seconds (a double), per dialect.

    PostgreSQL uses ``clock_timestamp()``, the real time even inside a transaction
    (``now()`` is frozen at the transaction's start); SQLite ``julianday('now')``;
    MySQL/MariaDB ``UTC_TIMESTAMP(6)``, counted from the epoch with ``TIMESTAMPDIFF`` so the
    session time zone (and its daylight-saving jumps) cannot shift it.

    >>> from sqlalchemy.dialects import postgresql
    >>> str(DbNow().compile(dialect=postgresql.dialect()))
    'CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)'
    """

    type = Double()
    inherit_cache = True
    name = "idempotask_db_now"


class DbStatementNow(DbNow):
    """:class:`DbNow` read once per statement, however often the statement uses it.

    PostgreSQL's ``statement_timestamp()`` (``clock_timestamp()`` is read anew at each use,
    so two ``CASE`` branches of one statement could disagree about the time); MySQL,
    MariaDB and SQLite read their clock once per statement already.

    >>> from sqlalchemy.dialects import postgresql
    >>> str(DbStatementNow().compile(dialect=postgresql.dialect()))
    'CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)'
    """

    inherit_cache = True
    name = "idempotask_db_statement_now"


@compiles(DbNow)
def _now_unsupported(element: DbNow, compiler: SQLCompiler, **kw: Any) -> str:
    raise CompileError(
        f"idempotask's SQL backend supports PostgreSQL, SQLite, MySQL and MariaDB, "
        f"not {compiler.dialect.name!r}"
    )


@compiles(DbNow, "postgresql")
def _now_postgresql(element: DbNow, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(DbStatementNow, "postgresql")
def _statement_now_postgresql(element: DbStatementNow, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"


@compiles(DbNow, "sqlite")
def _now_sqlite(element: DbNow, compiler: SQLCompiler, **kw: Any) -> str:
    # 2440587.5 is the Julian day of 1970-01-01T00:00Z; millisecond resolution.
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(DbNow, "mysql")
@compiles(DbNow, "mariadb")
def _now_mysql(element: DbNow, compiler: SQLCompiler, **kw: Any) -> str:
    # 1e6 is a DOUBLE literal: dividing by 1000000.0 would give a DECIMAL cut to four
    # places by div_precision_increment. UTC_TIMESTAMP is fixed for one statement.
    return "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1e6)"


class CodePoints(FunctionElement[str]):
    """A string column compared by code point (so a ``>=``/``<`` range is a prefix):
    ``COLLATE "C"`` on PostgreSQL, whose default collations sort by language rules;
    elsewhere the column itself (MySQL's VARBINARY and SQLite's BINARY collation already
    compare that way). On a column defined with the ``"C"`` collation, as the tables
    here are, PostgreSQL still uses the column's index.

    >>> from sqlalchemy import column
    >>> from sqlalchemy.dialects import postgresql, sqlite
    >>> str(CodePoints(column("key")).compile(dialect=postgresql.dialect()))
    'key COLLATE "C"'
    >>> str(CodePoints(column("key")).compile(dialect=sqlite.dialect()))
    '"key"'
    """

    type = String()
    inherit_cache = True
    name = "idempotask_code_points"


@compiles(CodePoints)
def _code_points(element: CodePoints, compiler: SQLCompiler, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(CodePoints, "postgresql")
def _code_points_postgresql(element: CodePoints, compiler: SQLCompiler, **kw: Any) -> str:
    return f'{compiler.process(element.clauses, **kw)} COLLATE "C"'


def _index_name(table: str, suffix: str = "expires_at") -> str:
    # PostgreSQL cuts identifiers at 63 bytes and MySQL refuses more than 64: a long table
    # name gets a shortened, still unique, index name.
    name = f"ix_{table}_{suffix}"
    if len(name.encode()) <= 60:
        return name
    digest = hashlib.sha256(table.encode()).hexdigest()[:10]
    return f"ix_{table.encode()[:30].decode(errors='ignore')}_{digest}_{suffix}"


def _ordered_text(length: int) -> TypeEngine[Any]:
    """:class:`BinaryText` that also sorts by code point, as Python compares ``str``
    (``COLLATE "C"`` on PostgreSQL: see :class:`CodePoints`)."""
    return BinaryText(length).with_variant(String(length, collation="C"), "postgresql")


def define_table(
    metadata: MetaData, name: str = DEFAULT_TABLE_NAME, *, schema: str | None = None
) -> Table:
    """The records table ``name`` in ``metadata`` (the existing one if already defined).

    Add it to your own ``MetaData`` so Alembic's autogenerate sees it::

        from idempotask.backends.sql import define_table
        define_table(Base.metadata)          # or define_table(metadata, "my_records")

    Columns: ``key`` (the primary key, compared byte for byte and ordered by code point:
    ``COLLATE "C"`` on PostgreSQL, so listing keys by prefix uses the index), ``state``, ``token``,
    ``owner``, ``fingerprint``, ``payload`` (``LONGBLOB`` on MySQL/MariaDB for results of
    megabytes) and ``expires_at`` (epoch seconds on the database's clock, indexed for
    :meth:`~idempotask.backends.sql.SQLAlchemyBackend.purge_expired`).
    """
    existing = metadata.tables.get(f"{schema}.{name}" if schema else name)
    if existing is not None:
        return existing
    return Table(
        name,
        metadata,
        Column("key", _ordered_text(KEY_LENGTH), primary_key=True),
        Column("state", BinaryText(16), nullable=False),
        Column("token", BinaryText(TEXT_LENGTH), nullable=False),
        Column("owner", BinaryText(TEXT_LENGTH), nullable=False),
        Column("fingerprint", BinaryText(TEXT_LENGTH), nullable=False),
        Column("payload", _blob(), nullable=False),
        Column("expires_at", Double(), nullable=False),
        Index(_index_name(name), "expires_at"),
        schema=schema,
    )


def _blob() -> TypeEngine[Any]:
    return LargeBinary().with_variant(LONGBLOB(), *_MYSQL)


def _unicode_text() -> TypeEngine[Any]:
    """Text of any length in any language: ``TEXT`` (PostgreSQL, SQLite), ``LONGTEXT`` in
    utf8mb4 with byte-wise comparison on MySQL/MariaDB (whose default charset may not hold
    every character and whose default collation folds case)."""
    return Text().with_variant(LONGTEXT(charset="utf8mb4", collation="utf8mb4_bin"), *_MYSQL)


def define_dead_letter_table(
    metadata: MetaData, name: str = DEFAULT_DEAD_LETTER_TABLE, *, schema: str | None = None
) -> Table:
    """The dead-letter table ``name`` in ``metadata`` (the existing one if already defined),
    for :class:`~idempotask.backends.sql.SQLDeadLetterStore` and Alembic::

        from idempotask.backends.sql import define_dead_letter_table
        define_dead_letter_table(Base.metadata)

    One row per letter and namespace (the primary key is ``namespace, id``: applications
    sharing a database keep separate queues): every
    :class:`~idempotask.backends.base.DeadLetter` field (``message``, ``traceback`` and
    ``arguments`` as bytes, the first two UTF-8, since a message may hold a NUL that
    PostgreSQL text refuses; times as epoch seconds; ``next_retry_at`` NULL when none;
    ``history`` as the text of :func:`~idempotask.backends.base.encode_history`), plus
    ``search``, the case-folded error type and message that ``DeadLetterFilter.search``
    looks in, and ``claimed_until``, the end of a processor's claim on the database's
    clock (NULL: not held). Indexed for due scans (``namespace, status, next_retry_at``)
    and pages sorted by the last failure, newest first (``namespace, last_failed_at DESC,
    id``; by status ``namespace, status, last_failed_at DESC, id``; by function
    ``namespace, function, last_failed_at DESC, id``).
    """
    existing = metadata.tables.get(f"{schema}.{name}" if schema else name)
    if existing is not None:
        return existing
    table = Table(
        name,
        metadata,
        Column("namespace", BinaryText(TEXT_LENGTH), nullable=False),
        Column("id", _ordered_text(TEXT_LENGTH), nullable=False),
        Column("function", BinaryText(NAME_LENGTH), nullable=False),
        Column("kind", BinaryText(64), nullable=False),
        Column("error_type", BinaryText(NAME_LENGTH), nullable=False),
        Column("message", _blob(), nullable=False),
        Column("traceback", _blob(), nullable=False),
        Column("arguments", _blob(), nullable=False),
        Column("key", BinaryText(KEY_LENGTH), nullable=False),
        Column("attempts", Integer(), nullable=False),
        Column("status", BinaryText(16), nullable=False),
        Column("first_failed_at", Double(), nullable=False),
        Column("last_failed_at", Double(), nullable=False),
        Column("next_retry_at", Double(), nullable=True),
        Column("route", BinaryText(TEXT_LENGTH), nullable=False),
        Column("critical", Boolean(), nullable=False),
        Column("resolution", BinaryText(64), nullable=False),
        Column("version", BigInteger(), nullable=False),
        Column("history", _unicode_text(), nullable=False),
        Column("search", _unicode_text(), nullable=False),
        Column("claimed_until", Double(), nullable=True),
        PrimaryKeyConstraint("namespace", "id"),
        Index(_index_name(name, "due"), "namespace", "status", "next_retry_at"),
        schema=schema,
    )
    # Pages are newest last failure first, ties by ascending id: indexes in that very
    # order (descending on last_failed_at) give them without a sort.
    c = table.c
    newest = (c.last_failed_at.desc(), c.id)
    Index(_index_name(name, "last_failed_at"), c.namespace, *newest)
    Index(_index_name(name, "status"), c.namespace, c.status, *newest)
    Index(_index_name(name, "function"), c.namespace, c.function, *newest)
    return table


def define_breaker_table(
    metadata: MetaData, name: str = DEFAULT_BREAKER_TABLE, *, schema: str | None = None
) -> Table:
    """The circuit-breaker table ``name`` in ``metadata`` (the existing one if already
    defined), for :class:`~idempotask.backends.sql.SQLBreakerStore` and Alembic::

        from idempotask.backends.sql import define_breaker_table
        define_breaker_table(Base.metadata)

    One row per breaker name and namespace (the primary key), as
    :class:`~idempotask.backends.base.BreakerStore` describes it: ``failures``,
    ``window_until``, ``open_until`` (NULL while closed), ``probe_until`` (NULL: no
    probe), ``probe_token``, all times in epoch seconds of the database's clock; and
    ``opened_by``, the token of the failure that last opened it, which tells that failure
    it was the one (``changed``) even where the row is read back separately.
    """
    existing = metadata.tables.get(f"{schema}.{name}" if schema else name)
    if existing is not None:
        return existing
    return Table(
        name,
        metadata,
        Column("namespace", BinaryText(TEXT_LENGTH), nullable=False),
        Column("name", BinaryText(TEXT_LENGTH), nullable=False),
        Column("failures", Integer(), nullable=False),
        Column("window_until", Double(), nullable=False),
        Column("open_until", Double(), nullable=True),
        Column("probe_until", Double(), nullable=True),
        Column("probe_token", BinaryText(TEXT_LENGTH), nullable=False),
        Column("opened_by", BinaryText(64), nullable=False),
        PrimaryKeyConstraint("namespace", "name"),
        schema=schema,
    )

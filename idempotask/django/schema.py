"""The DDL of idempotask's tables for a Django connection, from the SQL store's own
definitions (:mod:`idempotask.backends.sql`), compiled by SQLAlchemy for the
connection's database and run through Django's schema editor: the tables a migration
creates are exactly those ``idempotask db create`` would."""

from __future__ import annotations

from typing import Any

from sqlalchemy import MetaData, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateIndex, CreateTable, DropTable

from idempotask.backends.sql import define_breaker_table, define_dead_letter_table, define_table
from idempotask.errors import ConfigurationError

__all__ = ["create_statements", "dialect_for", "drop_statements", "tables"]


def dialect_for(vendor: str) -> Dialect:
    """The SQLAlchemy dialect that compiles statements for a Django ``connection.vendor``
    (``postgresql``, ``sqlite``, ``mysql``; MariaDB is ``mysql`` to Django), with the
    ``%s`` / ``%(name)s`` parameter style Django's cursors take."""
    if vendor == "postgresql":
        from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

        return PGDialect_psycopg(paramstyle="pyformat")  # type: ignore[no-untyped-call]
    if vendor == "sqlite":
        from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

        return SQLiteDialect_pysqlite(paramstyle="format")
    if vendor == "mysql":
        from sqlalchemy.dialects.mysql.pymysql import MySQLDialect_pymysql

        return MySQLDialect_pymysql(paramstyle="format")
    raise ConfigurationError(
        f"idempotask.django: {vendor!r} databases are not supported; use PostgreSQL, "
        "SQLite, MySQL or MariaDB"
    )


def tables() -> list[Table]:
    """The records, dead-letter and breaker tables, with their default names."""
    meta = MetaData()
    return [define_table(meta), define_dead_letter_table(meta), define_breaker_table(meta)]


def create_statements(vendor: str) -> list[str]:
    """``CREATE TABLE`` and ``CREATE INDEX`` for every table, for ``vendor``."""
    dialect = dialect_for(vendor)
    out: list[str] = []
    for table in tables():
        out.append(str(CreateTable(table).compile(dialect=dialect)).strip())
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            out.append(str(CreateIndex(index).compile(dialect=dialect)).strip())
    return out


def drop_statements(vendor: str) -> list[str]:
    """``DROP TABLE`` for every table (their indexes go with them), for ``vendor``."""
    dialect = dialect_for(vendor)
    return [str(DropTable(t).compile(dialect=dialect)).strip() for t in reversed(tables())]


def run(schema_editor: Any, statements: list[str]) -> None:
    """Run DDL ``statements`` with Django's schema editor (no parameters)."""
    for sql in statements:
        schema_editor.execute(sql, None)

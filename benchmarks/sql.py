"""SQL stores: duplicate and first calls beside a raw ``INSERT … ON CONFLICT DO NOTHING``
round trip with psycopg in autocommit on the same PostgreSQL; SQLite and MariaDB beside
their own one-statement floors."""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import idempotask
from benchmarks.timing import Timing, ameasure, ameasure_each, measure, measure_each
from idempotask import idempotent

Row = tuple[str, Timing, str, Timing | None, str]

POSTGRES = os.environ.get(
    "IDEMPOTASK_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL = os.environ.get("IDEMPOTASK_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


def _decorated_rows(
    label: str, url: str, floor_name: str, floor: Timing, quick: bool, targets: tuple[str, str]
) -> list[Row]:
    from idempotask.backends.sql import SQLAlchemyBackend

    scale = 4 if quick else 1
    batches, count = 100 // scale, 1000 // scale
    table = f"idem_bench_{uuid.uuid4().hex[:8]}"
    backend = SQLAlchemyBackend(url, table_name=table)
    backend.create_tables()
    idempotask.configure(backend=backend, namespace=f"bench{uuid.uuid4().hex[:6]}")
    seq = itertools.count()

    @idempotent(name=f"bench.{label}.charge")
    def charge(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    @idempotent(name=f"bench.{label}.acharge")
    async def acharge(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    try:
        charge(1, "user@example.com")
        dup = measure(lambda: charge(1, "user@example.com"), batches=batches, batch=10)
        first = measure_each(lambda i: charge(next(seq), "user@example.com"), count=count)

        async def async_rows() -> tuple[Timing, Timing]:
            await acharge(1, "user@example.com")
            adup = await ameasure(lambda: acharge(1, "user@example.com"), batches=batches, batch=10)
            afirst = await ameasure_each(
                lambda i: acharge(next(seq), "user@example.com"), count=count
            )
            await backend.aclose()
            return adup, afirst

        adup, afirst = asyncio.run(async_rows())
    finally:
        backend.drop_tables()
        backend.close()
    dup_target, first_target = targets
    return [
        (f"{label}: duplicate call, sync", dup, floor_name, floor, dup_target),
        (f"{label}: first call (claim+complete), sync", first, floor_name, floor, first_target),
        (f"{label}: duplicate call, async", adup, floor_name, floor, dup_target),
        (f"{label}: first call, async", afirst, floor_name, floor, first_target),
    ]


def _floor(execute: Callable[[int], Any], quick: bool) -> Timing:
    seq = itertools.count()
    return measure(lambda: execute(next(seq)), batches=100 // (4 if quick else 1), batch=10)


def postgres_rows(quick: bool = False) -> list[Row]:
    """PostgreSQL beside a raw psycopg ``INSERT … ON CONFLICT DO NOTHING`` in autocommit."""
    import psycopg

    dsn = POSTGRES.replace("postgresql+psycopg://", "postgresql://")
    table = f"idem_floor_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (k text PRIMARY KEY, v bytea)")
        try:
            sql = f"INSERT INTO {table} (k, v) VALUES (%s, %s) ON CONFLICT DO NOTHING"
            floor = _floor(lambda i: conn.execute(sql, (f"k{i}", b"v")), quick)
        finally:
            conn.execute(f"DROP TABLE {table}")
    return _decorated_rows(
        "postgresql", POSTGRES, "INSERT ON CONFLICT DO NOTHING", floor, quick, ("≤ 1.5x", "≤ 2.5x")
    )


def sqlite_rows(quick: bool = False) -> list[Row]:
    """A SQLite file beside a raw sqlite3 ``INSERT OR IGNORE`` (autocommit, WAL)."""
    import sqlite3

    directory = Path(tempfile.mkdtemp(prefix="idempotask-bench-"))
    path = directory / "bench.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE floor (k TEXT PRIMARY KEY, v BLOB)")
    floor = _floor(
        lambda i: conn.execute("INSERT OR IGNORE INTO floor (k, v) VALUES (?, ?)", (f"k{i}", b"v")),
        quick,
    )
    conn.close()
    try:
        return _decorated_rows(
            "sqlite", f"sqlite:///{path}", "INSERT OR IGNORE", floor, quick, ("", "")
        )
    finally:
        for f in directory.iterdir():
            f.unlink()
        directory.rmdir()


def mysql_rows(quick: bool = False) -> list[Row]:
    """MariaDB beside a raw PyMySQL ``INSERT IGNORE`` in autocommit."""
    import pymysql
    from sqlalchemy.engine import make_url

    url = make_url(MYSQL)
    conn = pymysql.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",
        database=url.database,
        autocommit=True,
    )
    table = f"idem_floor_{uuid.uuid4().hex[:8]}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (k VARBINARY(255) PRIMARY KEY, v BLOB)")
    try:
        with conn.cursor() as cur:
            sql = f"INSERT IGNORE INTO {table} (k, v) VALUES (%s, %s)"
            floor = _floor(lambda i: cur.execute(sql, (f"k{i}", b"v")), quick)
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE {table}")
        conn.close()
    return _decorated_rows("mariadb", MYSQL, "INSERT IGNORE", floor, quick, ("", ""))

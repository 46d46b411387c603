"""SQL stores: duplicate and first calls beside a raw ``INSERT … ON CONFLICT DO NOTHING``
round trip with psycopg in autocommit on the same PostgreSQL (asyncio calls beside the
same statement on psycopg's asyncio connection, and for information beside the sync
one); SQLite and MariaDB beside their own one-statement floors. Throughput with threads
(and, on PostgreSQL, asyncio tasks) beside the same statement run by as many callers,
each on its own connection."""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import idempotask
from benchmarks.report import Plan, Row
from benchmarks.throughput import UNIQUE, MakeCall, task_rows, thread_rows
from benchmarks.timing import Timing, ainterleaved, interleaved
from idempotask import idempotent

POSTGRES = os.environ.get(
    "IDEMPOTASK_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MYSQL = os.environ.get("IDEMPOTASK_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
EMAIL = "user@example.com"


def _decorated_rows(
    label: str,
    url: str,
    floor_name: str,
    floor_call: Callable[[], Any],
    plan: Plan,
    targets: tuple[str, str],
    make_floor: MakeCall,
    make_afloor: MakeCall | None = None,
    aclose_floor: Callable[[], Awaitable[None]] | None = None,
    async_floor: tuple[str, Callable[[], Awaitable[Callable[[], Awaitable[Any]]]]] | None = None,
) -> list[Row]:
    """Rows for one SQL store. ``async_floor``: the floor statement through the driver's
    asyncio connection (its name, and a coroutine making the call), measured in turn with
    the async figures, which are then shown beside it (with the targets) as well as
    beside the sync floor; without one, the async figures stand beside the sync floor."""
    from idempotask.backends.sql import SQLAlchemyBackend

    batches = 100 // plan.scale
    table = f"idem_bench_{uuid.uuid4().hex[:8]}"
    callers = max(plan.callers)
    # One pooled connection per concurrent caller, as a deployment with that many workers
    # would configure; SQLAlchemy's default (5 + 10 overflow, overflow closed on return)
    # would make the 16-caller figures measure reconnects instead of the store.
    backend = SQLAlchemyBackend(
        url, table_name=table, engine_options={"pool_size": callers, "max_overflow": 4}
    )
    backend.create_tables()
    idempotask.configure(backend=backend, namespace=f"bench{uuid.uuid4().hex[:6]}")
    seq = itertools.count()
    beside_sync: list[Row] = []

    @idempotent(name=f"bench.{label}.charge")
    def charge(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    @idempotent(name=f"bench.{label}.acharge")
    async def acharge(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    async def afloor_call() -> Any:  # the same sync floor, between the async batches
        return floor_call()

    try:
        charge(1, EMAIL)
        # The floor and the figures in turn, batch by batch (see timing.interleaved): on a
        # shared machine a floor measured once, before, drifts away from the figures.
        timings = interleaved(
            {
                "floor": floor_call,
                "dup": lambda: charge(1, EMAIL),
                "first": lambda: charge(next(seq), EMAIL),
            },
            batches=batches,
            batch=10,
        )
        floor, dup, first = timings["floor"], timings["dup"], timings["first"]
        threads = thread_rows(label, plan, floor_name, make_floor, lambda i: charge(i, EMAIL))

        async def async_rows() -> tuple[Timing, Timing, Timing, list[Row]]:
            await acharge(1, EMAIL)
            fns: dict[str, Callable[[], Awaitable[Any]]] = {
                "floor": afloor_call,
                "dup": lambda: acharge(1, EMAIL),
                "first": lambda: acharge(next(seq), EMAIL),
            }
            if async_floor is not None:
                fns["native"] = await async_floor[1]()
            atimings = await ainterleaved(fns, batches=batches, batch=10)
            if "native" in atimings:
                # Beside the sync floor too, for information (the targets are beside the
                # same statement on the driver's asyncio connection, as for Redis).
                beside_sync.extend(
                    [
                        Row(
                            f"{label}: duplicate call, async (beside the sync floor)",
                            atimings["dup"],
                            floor_name,
                            atimings["floor"],
                        ),
                        Row(
                            f"{label}: first call, async (beside the sync floor)",
                            atimings["first"],
                            floor_name,
                            atimings["floor"],
                        ),
                    ]
                )
            tasks: list[Row] = []
            try:
                if make_afloor is not None:
                    tasks = await task_rows(
                        label, plan, floor_name, make_afloor, lambda i: acharge(i, EMAIL)
                    )
            finally:
                if aclose_floor is not None:
                    await aclose_floor()
                await backend.aclose()
            afloor = atimings.get("native", atimings["floor"])
            return afloor, atimings["dup"], atimings["first"], tasks

        afloor, adup, afirst, tasks = asyncio.run(async_rows())
        afloor_name = async_floor[0] if async_floor is not None else floor_name
    finally:
        backend.drop_tables()
        backend.close()
    dup_target, first_target = targets
    return [
        Row(f"{label}: duplicate call, sync", dup, floor_name, floor, dup_target),
        Row(f"{label}: first call (claim+complete), sync", first, floor_name, floor, first_target),
        Row(f"{label}: duplicate call, async", adup, afloor_name, afloor, dup_target),
        Row(f"{label}: first call, async", afirst, afloor_name, afloor, first_target),
        *beside_sync,
        *threads,
        *tasks,
    ]


def _floor_call(execute: Callable[[int], Any]) -> Callable[[], Any]:
    """One floor statement per call, each with a key never used before."""
    seq = itertools.count()
    return lambda: execute(next(seq))


class _PerCaller:
    """A floor caller factory: caller ``i`` runs ``statement`` on its own connection ``i``,
    reused across runs (a 16-caller floor holds 16 connections, not one per run)."""

    def __init__(self, connect: Callable[[], Any], statement: Callable[[Any, str], Any]) -> None:
        self._connect = connect
        self._statement = statement
        self._connections: dict[int, Any] = {}

    def __call__(self, caller: int) -> Callable[[], Any]:
        if caller not in self._connections:
            self._connections[caller] = self._connect()
        conn, statement = self._connections[caller], self._statement
        return lambda: statement(conn, f"t{next(UNIQUE)}")

    def close(self) -> None:
        """Close every caller's connection."""
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()


def postgres_rows(plan: Plan) -> list[Row]:
    """PostgreSQL beside a raw psycopg ``INSERT … ON CONFLICT DO NOTHING`` in autocommit."""
    import psycopg

    dsn = POSTGRES.replace("postgresql+psycopg://", "postgresql://")
    table = f"idem_floor_{uuid.uuid4().hex[:8]}"
    sql = f"INSERT INTO {table} (k, v) VALUES (%s, %s) ON CONFLICT DO NOTHING"
    make_floor = _PerCaller(
        lambda: psycopg.connect(dsn, autocommit=True), lambda c, k: c.execute(sql, (k, b"v"))
    )
    aconnections: dict[int, Any] = {}

    async def make_afloor(caller: int) -> Callable[[], Any]:
        if caller not in aconnections:
            aconnections[caller] = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        conn = aconnections[caller]
        return lambda: conn.execute(sql, (f"t{next(UNIQUE)}", b"v"))

    async def aclose_floor() -> None:
        for conn in aconnections.values():
            await conn.close()

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (k text PRIMARY KEY, v bytea)")
        try:
            return _decorated_rows(
                "postgresql",
                POSTGRES,
                "INSERT ON CONFLICT DO NOTHING",
                _floor_call(lambda i: conn.execute(sql, (f"k{i}", b"v"))),
                plan,
                ("≤ 1.5x", "≤ 2.5x"),
                make_floor,
                make_afloor,
                aclose_floor,
                # The same statement on psycopg's asyncio connection: a second floor for
                # the async rows, with the driver's own asyncio path counted in it too.
                ("INSERT ON CONFLICT DO NOTHING (async psycopg)", lambda: make_afloor(-1)),
            )
        finally:
            make_floor.close()
            conn.execute(f"DROP TABLE {table}")


def sqlite_rows(plan: Plan) -> list[Row]:
    """A SQLite file beside a raw sqlite3 ``INSERT OR IGNORE`` (autocommit, WAL)."""
    import sqlite3

    directory = Path(tempfile.mkdtemp(prefix="idempotask-bench-"))
    path = directory / "bench.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE floor (k TEXT PRIMARY KEY, v BLOB)")
    insert = "INSERT OR IGNORE INTO floor (k, v) VALUES (?, ?)"
    # check_same_thread=False: a caller's connection is made in its thread but closed
    # from the main one; the same busy timeout as the backend's (30 s) for the writer lock.
    make_floor = _PerCaller(
        lambda: sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False),
        lambda c, k: c.execute(insert, (k, b"v")),
    )
    try:
        return _decorated_rows(
            "sqlite",
            f"sqlite:///{path}",
            "INSERT OR IGNORE",
            _floor_call(lambda i: conn.execute(insert, (f"k{i}", b"v"))),
            plan,
            ("", ""),
            make_floor,
        )
    finally:
        conn.close()
        make_floor.close()
        for f in directory.iterdir():
            f.unlink()
        directory.rmdir()


def mysql_connect(**options: Any) -> Any:
    """A PyMySQL connection in autocommit to the database at IDEMPOTASK_MYSQL_URL."""
    import pymysql
    from sqlalchemy.engine import make_url

    url = make_url(MYSQL)
    return pymysql.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",
        database=url.database,
        autocommit=True,
        **options,
    )


def mysql_rows(plan: Plan) -> list[Row]:
    """MariaDB beside a raw PyMySQL ``INSERT IGNORE`` in autocommit."""
    conn = mysql_connect()
    table = f"idem_floor_{uuid.uuid4().hex[:8]}"
    sql = f"INSERT IGNORE INTO {table} (k, v) VALUES (%s, %s)"
    with conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (k VARBINARY(255) PRIMARY KEY, v BLOB)")

    def insert(c: Any, key: str) -> Any:
        with c.cursor() as cur:
            return cur.execute(sql, (key, b"v"))

    make_floor = _PerCaller(mysql_connect, insert)
    try:
        with conn.cursor() as cur:
            floor_call = _floor_call(lambda i: cur.execute(sql, (f"k{i}", b"v")))
            return _decorated_rows(
                "mariadb", MYSQL, "INSERT IGNORE", floor_call, plan, ("", ""), make_floor
            )
    finally:
        make_floor.close()
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE {table}")
        conn.close()

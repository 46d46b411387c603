"""SQL stores: duplicate and first calls beside a raw ``INSERT … ON CONFLICT DO NOTHING``
round trip with psycopg in autocommit on the same PostgreSQL (asyncio calls beside the
same statement on psycopg's asyncio connection, and for information beside the sync
one); SQLite and MariaDB beside their own one-statement floors. Throughput with threads
(and, on PostgreSQL, asyncio tasks) beside the same statement run by as many callers,
each on its own connection.

PostgreSQL is measured twice in one run: as is, and with OpenTelemetry's SQLAlchemy
instrumentation on the store's engines (what production runs: a span per statement,
batched to an exporter), each beside the same raw floor. The instrumented rows need
``opentelemetry-sdk`` and ``opentelemetry-instrumentation-sqlalchemy`` (the ``bench``
extra); without them they say so."""

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
from benchmarks.report import Plan, Row, Skipped
from benchmarks.throughput import UNIQUE, MakeCall, task_rows, thread_rows
from benchmarks.timing import Quantity, Timing, ainterleaved, interleaved
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
    instrumented: bool = False,
) -> list[Row]:
    """Rows for one SQL store. ``async_floor``: the floor statement through the driver's
    asyncio connection (its name, and a coroutine making the call), measured in turn with
    the async figures, which are then shown beside it (with the targets) as well as
    beside the sync floor; without one, the async figures stand beside the sync floor.
    ``instrumented``: OpenTelemetry instruments every engine made meanwhile (the
    throughput rows are left out)."""
    from idempotask.backends.sql import SQLAlchemyBackend

    batches = 100 // plan.scale
    table = f"idem_bench_{uuid.uuid4().hex[:8]}"
    callers = max(plan.callers)
    # One pooled connection per concurrent caller, as a deployment with that many workers
    # would configure; SQLAlchemy's default (5 + 10 overflow, overflow closed on return)
    # would make the 16-caller figures measure reconnects instead of the store.
    backend = SQLAlchemyBackend(
        url,
        table_name=table,
        dead_letter_table=f"{table}_dl",
        breaker_table=f"{table}_br",
        engine_options={"pool_size": callers, "max_overflow": 4},
    )
    backend.create_tables()
    idempotask.configure(backend=backend, namespace=f"bench{uuid.uuid4().hex[:6]}")
    seq = itertools.count()
    beside_sync: list[Row] = []

    slug = label.split()[0] + ("_otel" if instrumented else "")

    @idempotent(name=f"bench.{slug}.charge")
    def charge(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    @idempotent(name=f"bench.{slug}.acharge")
    async def acharge(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    # A transactional first call (claim; begin; the result written in the transaction;
    # commit): on the servers that take transactional calls, not on SQLite (refused by
    # default: one writer for the file).
    transactional = not label.startswith("sqlite")

    @idempotent(name=f"bench.{slug}.charge_tx", transactional=True)
    def charge_tx(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
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
                **({"tx": lambda: charge_tx(next(seq), EMAIL)} if transactional else {}),
            },
            batches=batches,
            batch=10,
        )
        floor, dup, first = timings["floor"], timings["dup"], timings["first"]
        tx_rows = (
            [
                Row(
                    f"{label}: transactional first call (claim, then result and commit in "
                    "the body's transaction), sync",
                    timings["tx"],
                    floor_name,
                    floor,
                )
            ]
            if transactional
            else []
        )
        threads = (
            []
            if instrumented
            else thread_rows(label, plan, floor_name, make_floor, lambda i: charge(i, EMAIL))
        )

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
                if make_afloor is not None and not instrumented:
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
        backend.dead_letter_store().drop_tables()
        backend.breaker_store().drop_tables()
        backend.close()
    dup_target, first_target = targets
    return [
        Row(f"{label}: duplicate call, sync", dup, floor_name, floor, dup_target),
        Row(f"{label}: first call (claim+complete), sync", first, floor_name, floor, first_target),
        *tx_rows,
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
        aconnections.clear()  # the next loop (the instrumented run) connects anew

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (k text PRIMARY KEY, v bytea)")
        floor_call = _floor_call(lambda i: conn.execute(sql, (f"k{i}", b"v")))
        # The same statement on psycopg's asyncio connection: a second floor for the async
        # rows, with the driver's own asyncio path counted in it too.
        async_floor = ("INSERT ON CONFLICT DO NOTHING (async psycopg)", lambda: make_afloor(-1))
        try:
            rows = _decorated_rows(
                "postgresql",
                POSTGRES,
                "INSERT ON CONFLICT DO NOTHING",
                floor_call,
                plan,
                TARGETS,
                make_floor,
                make_afloor,
                aclose_floor,
                async_floor,
            )
            otel = _otel()
            if isinstance(otel, Skipped):
                return [*rows, Row("postgresql + OpenTelemetry: all rows", otel)]
            instrumentor, spans = otel
            try:
                traced = _decorated_rows(
                    "postgresql + OpenTelemetry",
                    POSTGRES,
                    "INSERT ON CONFLICT DO NOTHING",
                    floor_call,
                    plan,
                    TARGETS,
                    make_floor,
                    make_afloor,
                    aclose_floor,
                    async_floor,
                    instrumented=True,
                )
            finally:
                instrumentor.uninstrument()
            count = Quantity(spans(), "spans", "one per statement, batched to an exporter")
            return [*rows, *traced, Row("postgresql + OpenTelemetry: spans made", count)]
        finally:
            make_floor.close()
            conn.execute(f"DROP TABLE {table}")


#: issue 14: a duplicate within 1.5x and a first call (claim + complete) within 3.0x of
#: one raw INSERT ... ON CONFLICT DO NOTHING in autocommit.
TARGETS = ("≤ 1.5x", "≤ 3.0x")


def _otel() -> tuple[Any, Callable[[], int]] | Skipped:
    """OpenTelemetry's SQLAlchemy instrumentation, switched on for every engine made from
    now on (as ``opentelemetry-instrument`` does for an application), spans going through
    a batch processor to an exporter that counts and drops them: the cost of making and
    queueing spans, not of shipping them. Returns the instrumentor (to switch it off) and
    the span count; or why it cannot be done here."""
    try:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError as exc:
        return Skipped(f"pip install 'idempotask[bench]' ({exc.name} is missing)")

    exported = [0]

    class Counted(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            exported[0] += len(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Counted()))
    instrumentor = SQLAlchemyInstrumentor()
    # skip_dep_check: the instrumentation declares SQLAlchemy < 2.1 and refuses 2.1 (it
    # works with it: its listeners are public engine and pool events).
    instrumentor.instrument(tracer_provider=provider, skip_dep_check=True)

    def spans() -> int:
        provider.force_flush()
        return exported[0]

    return instrumentor, spans


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

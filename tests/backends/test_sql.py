"""SQLAlchemyBackend: the shared contract on PostgreSQL, SQLite and MariaDB, then SQL specifics.

Servers come from ``IDEMPOTASK_POSTGRES_URL`` and ``IDEMPOTASK_MYSQL_URL`` (defaults in
``tests/conftest.py``); an unreachable one skips its tests, or fails them under
``IDEMPOTASK_REQUIRE_SERVICES=1``. SQLite runs on a file in a temporary directory. Every
table this module makes has a name unique to the run, and is dropped at the end.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, func, insert, make_url, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from idempotask.backends import backend_from_url
from idempotask.backends.base import Backend, Record, State
from idempotask.backends.sql import (
    DEFAULT_TABLE_NAME,
    SQLAlchemyBackend,
    define_table,
    metadata,
)
from idempotask.backends.sql._engines import async_url, sync_url
from idempotask.errors import BackendError, ConfigurationError, CorruptRecordError
from idempotask.testing import StoreContract, make_state_machine

from ._modes import caller, pg_trace
from ._sql_workers import claim_worker, counter_table

try:  # tests/conftest.py: the URL of a service, or skip (fail in CI) when it is down
    from tests.conftest import service_url
except ImportError:  # tests/ is not a package: pytest imported it as top-level "conftest"
    from conftest import service_url  # type: ignore[no-redef]

# Unique per test run, so concurrent runs on one server never share a table.
RUN = uuid.uuid4().hex[:10]
TABLE = f"idem_{RUN}"
_SQLITE_DIR = Path(tempfile.mkdtemp(prefix="idempotask-sql-"))
SQLITE_URL = f"sqlite:///{_SQLITE_DIR / 'store.db'}"

# name -> (service for service_url, or None for SQLite; plan forced on the backend)
DATABASES: dict[str, tuple[str | None, str | None]] = {
    "postgres": ("postgres", None),
    "sqlite": (None, None),
    "mariadb": ("mysql", None),
    # The MySQL plan (no RETURNING) run on MariaDB: MySQL itself is not on this machine.
    "mysql-plan": ("mysql", "mysql"),
}

_backends: dict[str, SQLAlchemyBackend] = {}
_lock = threading.Lock()


def url_for(name: str) -> str:
    """The database URL for ``name`` (skips or fails when its server is down)."""
    service = DATABASES[name][0]
    return SQLITE_URL if service is None else service_url(service)


def backend_for(url: str, table: str, **options: Any) -> SQLAlchemyBackend:
    """A backend whose three tables (records, dead letters, breakers) are named after
    ``table``, so a test on a shared server never touches the default ones."""
    return SQLAlchemyBackend(
        url,
        table_name=table,
        dead_letter_table=f"{table}_dl",
        breaker_table=f"{table}_br",
        **options,
    )


def drop_all(store: SQLAlchemyBackend) -> None:
    """Drop the three tables of a :func:`backend_for` backend."""
    store.drop_tables()
    store.dead_letter_store().drop_tables()
    store.breaker_store().drop_tables()


def shared_backend(name: str) -> SQLAlchemyBackend:
    """One backend per database for the whole module, its table created on first use."""
    url = url_for(name)
    with _lock:
        if name not in _backends:
            store = backend_for(url, TABLE)
            store._force_flavour = DATABASES[name][1]  # type: ignore[assignment]
            store.create_tables()
            _backends[name] = store
        return _backends[name]


@pytest.fixture(scope="module", autouse=True)
def _drop_tables_at_the_end() -> Iterator[None]:
    """Drop every table this module created, and remove the SQLite directory."""
    yield
    for store in _backends.values():
        try:
            drop_all(store)
        finally:
            store.close()
    _backends.clear()
    shutil.rmtree(_SQLITE_DIR, ignore_errors=True)


# -- the shared contract -----------------------------------------------------------------


class TestPostgresContract(StoreContract):
    """The conformance suite, sync and async, on PostgreSQL."""

    @pytest.fixture
    def backend(self) -> SQLAlchemyBackend:
        return shared_backend("postgres")


class TestSqliteFileContract(StoreContract):
    """The conformance suite, sync and async, on a SQLite file."""

    @pytest.fixture
    def backend(self) -> SQLAlchemyBackend:
        return shared_backend("sqlite")


class TestMariadbContract(StoreContract):
    """The conformance suite, sync and async, on MariaDB (one-statement RETURNING claim)."""

    @pytest.fixture
    def backend(self) -> SQLAlchemyBackend:
        return shared_backend("mariadb")


class TestMysqlPlanContract(StoreContract):
    """The conformance suite with the MySQL plan (read, insert or upsert, read) on MariaDB."""

    real_time_tests = False

    @pytest.fixture
    def backend(self) -> SQLAlchemyBackend:
        return shared_backend("mysql-plan")


class TestSqliteMemoryContract(StoreContract):
    """The conformance suite on ``sqlite:///:memory:`` (one connection, async inline)."""

    real_time_tests = False

    @pytest.fixture
    def backend(self) -> Iterator[SQLAlchemyBackend]:
        store = SQLAlchemyBackend("sqlite:///:memory:")
        store.create_tables()
        yield store
        store.close()


TestPostgresStateMachine = make_state_machine(lambda: shared_backend("postgres")).TestCase
TestSqliteStateMachine = make_state_machine(lambda: shared_backend("sqlite")).TestCase
TestMariadbStateMachine = make_state_machine(lambda: shared_backend("mariadb")).TestCase
TestMysqlPlanStateMachine = make_state_machine(lambda: shared_backend("mysql-plan")).TestCase


# -- helpers -------------------------------------------------------------------------------

SERVER_DBS = ["postgres", "mariadb"]
ALL_DBS = ["postgres", "sqlite", "mariadb", "mysql-plan"]


def new_key(name: str = "k") -> str:
    """A fresh key shaped like the library's."""
    return f"sqltest:{name}:1:{uuid.uuid4().hex}"


def token() -> str:
    """A fresh claim token."""
    return uuid.uuid4().hex


def run(store: SQLAlchemyBackend, mode: str, operation: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``operation`` through the sync method, or its async twin on a fresh loop."""
    if mode == "sync":
        return getattr(store, operation)(*args, **kwargs)

    async def call() -> Any:
        return await getattr(store, "a" + operation)(*args, **kwargs)

    return asyncio.run(call())


def free_port() -> int:
    """A loopback TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class StatementLog:
    """Every statement an engine sends through SQLAlchemy (``before_cursor_execute``)."""

    def __init__(self, engine: Any) -> None:
        self.statements: list[str] = []
        self._engine = engine
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(" ".join(statement.split())[:60])

    def take(self) -> list[str]:
        """The statements logged since the last call."""
        taken, self.statements = self.statements, []
        return taken

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._record)


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_postgres_operations_take_one_statement_and_one_round_trip_each(
    mode: str, tmp_path: Path
) -> None:
    """PostgreSQL, sync (psycopg) and async (psycopg's AsyncConnection): claim, complete,
    duplicate claim, renew and get are one statement and one round trip each (a repeated
    complete two) (libpq trace of the only pooled connection), with no BEGIN, COMMIT or
    ROLLBACK sent; and a claim repeated often enough runs as a prepared statement."""
    from psycopg import pq

    url = url_for("postgres")
    shared_backend("postgres")
    trace = tmp_path / "libpq.trace"
    key, first = new_key(), token()
    sync_engine = create_engine(url, pool_size=1, max_overflow=0)
    async_engine = create_async_engine(url, pool_size=1, max_overflow=0)
    store = SQLAlchemyBackend(engine=sync_engine, async_engine=async_engine, table_name=TABLE)

    call = caller(store, mode)

    async def pgconn() -> Any:
        if mode == "sync":
            with sync_engine.connect() as conn:
                return conn.connection.driver_connection.pgconn  # type: ignore[union-attr]
        async with async_engine.connect() as aconn:
            return (await aconn.get_raw_connection()).driver_connection.pgconn

    async def scenario() -> None:
        await call("get", key)  # connect, and let SQLAlchemy run its first-connect queries
        for _ in range(6):  # psycopg prepares a statement on its 5th execution
            await call("claim", new_key(), token(), lease=60)
        conn = await pgconn()
        counts: dict[str, tuple[int, int]] = {}
        with trace.open("w") as out:
            conn.trace(out.fileno())
            conn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
            for label, operation, args, kwargs in [
                ("claim", "claim", (key, first), {"lease": 60}),
                ("complete", "complete", (key, first, b"result"), {"ttl": 600}),
                ("duplicate", "claim", (key, token()), {"lease": 60}),
                ("complete again", "complete", (key, first, b"result"), {"ttl": 600}),
                ("renew", "renew", (key, first), {"lease": 60}),
                ("get", "get", (key,), {}),
            ]:
                out.flush()
                trips, executed, _ = pg_trace(trace)
                await call(operation, *args, **kwargs)
                out.flush()
                after = pg_trace(trace)
                counts[label] = (after[0] - trips, after[1] - executed)
            conn.untrace()
        # A repeated complete is the one exception: its UPDATE changes nothing, and a read
        # tells "already done by this token" from "lease lost".
        expected = {label: (1, 1) for label in counts} | {"complete again": (2, 2)}
        assert counts == expected, counts
        _, _, sql = pg_trace(trace)
        words = {word.strip('"').upper() for statement in sql for word in statement.split()}
        assert not words & {"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT"}, sql
        # The claim was prepared before the trace started: only statements seen fewer
        # than five times on this connection are parsed in it.
        assert not any(statement.startswith("WITH ins AS") for statement in sql), sql
        record = await call("get", key)
        assert record is not None
        assert record.state is State.COMPLETED
        await call("delete", key)
        await async_engine.dispose()

    try:
        asyncio.run(scenario())
    finally:
        sync_engine.dispose()


def _mysql_counters(conn: Any) -> dict[str, int]:
    rows = conn.exec_driver_sql(
        "SHOW SESSION STATUS WHERE Variable_name IN "
        "('Questions', 'Com_commit', 'Com_rollback', 'Com_begin')"
    ).all()
    return {name: int(value) for name, value in rows}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mariadb", {"claim": 1, "duplicate": 1, "complete": 1, "takeover": 1}),
        ("mysql-plan", {"claim": 2, "duplicate": 1, "complete": 1, "takeover": 3}),
    ],
)
def test_mysql_family_round_trips(name: str, expected: dict[str, int]) -> None:
    """MariaDB: every claim is one statement (INSERT … ON DUPLICATE KEY UPDATE … RETURNING);
    the MySQL plan: a duplicate is one, a first claim two, a takeover three. The server's
    own counters show no BEGIN, COMMIT or ROLLBACK."""
    url = url_for(name)
    shared_backend(name)
    engine = create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        skip_autocommit_rollback=True,
        pool_size=1,
        max_overflow=0,
    )
    store = SQLAlchemyBackend(engine, table_name=TABLE)
    store._force_flavour = DATABASES[name][1]  # type: ignore[assignment]
    key, first, second = new_key(), token(), token()
    try:
        store.get(key)
        counts: dict[str, int] = {}
        for label, call in [
            ("claim", lambda: store.claim(key, first, lease=60)),
            ("takeover", lambda: (store.expire_now(key), store.claim(key, second, lease=60))),
            ("complete", lambda: store.complete(key, second, b"r", ttl=60)),
            ("duplicate", lambda: store.claim(key, token(), lease=60)),
        ]:
            with engine.connect() as conn:
                before = _mysql_counters(conn)
            call()
            with engine.connect() as conn:
                after = _mysql_counters(conn)
            # Minus the SHOW STATUS itself, and expire_now's UPDATE for the takeover.
            counts[label] = after["Questions"] - before["Questions"] - 1
            counts[label] -= label == "takeover"
            for counter in ("Com_commit", "Com_rollback", "Com_begin"):
                assert after[counter] == before[counter], (label, counter)
        assert counts == expected
    finally:
        store.delete(key)
        engine.dispose()


def test_sqlite_duplicate_is_one_statement_and_a_claim_one_immediate_transaction() -> None:
    """SQLite: a duplicate is one read; a first claim is read, BEGIN IMMEDIATE, upsert,
    read, COMMIT (as sqlite3's trace callback sees them)."""
    shared_backend("sqlite")
    # In autocommit mode already: a transactional engine would also show the PRAGMAs that
    # switch each checked-out connection to autocommit and back.
    engine = create_engine(SQLITE_URL, isolation_level="AUTOCOMMIT")
    executed: list[str] = []

    @event.listens_for(engine, "connect")
    def _trace(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.set_trace_callback(executed.append)

    store = SQLAlchemyBackend(engine, table_name=TABLE)
    key, first = new_key(), token()

    def take() -> list[str]:
        words = [statement.split()[0] for statement in executed]
        executed.clear()
        return words

    try:
        store.get(key)
        take()
        store.claim(key, first, lease=60)
        assert take() == ["SELECT", "BEGIN", "INSERT", "SELECT", "COMMIT"]
        store.complete(key, first, b"r", ttl=60)
        assert take() == ["UPDATE"]
        store.claim(key, token(), lease=60)
        assert take() == ["SELECT"]
    finally:
        store.delete(key)
        engine.dispose()


def test_mariadb_returns_the_row_of_an_on_duplicate_key_update_that_changed_nothing() -> None:
    """The server behaviour the one-statement MariaDB claim relies on: RETURNING works with
    ON DUPLICATE KEY UPDATE and gives the row after the statement, even for a no-op."""
    engine = create_engine(url_for("mariadb"))
    name = f"idem_rt_{RUN}"
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {name} (k VARBINARY(10) PRIMARY KEY, v INT)")
            sql = (
                f"INSERT INTO {name} VALUES ('a', %s) ON DUPLICATE KEY UPDATE v = "
                "IF(VALUES(v) > v, VALUES(v), v) RETURNING k, v"
            )
            assert conn.exec_driver_sql(sql, (5,)).all() == [(b"a", 5)]  # inserted
            assert conn.exec_driver_sql(sql, (9,)).all() == [(b"a", 9)]  # updated
            assert conn.exec_driver_sql(sql, (1,)).all() == [(b"a", 9)]  # unchanged
            assert engine.dialect.is_mariadb  # type: ignore[attr-defined]
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        engine.dispose()


# -- keys, payloads, purge -------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_DBS)
def test_keys_differing_in_case_or_trailing_space_are_distinct(name: str) -> None:
    """Keys ending "Key", "key", "key " and "KEY" are four keys (MariaDB's default collation
    would merge them), and owners or tokens differing only in case do not match."""
    store = shared_backend(name)
    base = new_key()
    keys = [base + "Key", base + "key", base + "key ", base + "KEY"]
    tokens = [token() for _ in keys]
    try:
        for key, tok in zip(keys, tokens, strict=True):
            assert store.claim(key, tok, lease=60, owner="Owner").held_by(tok), key
        # The same owner or token in another case is another one: no re-take.
        other = token()
        assert not store.claim(keys[0], other, lease=60, owner="owner").held_by(other)
        assert not store.claim(keys[0], tokens[0].upper(), lease=60).held_by(tokens[0].upper())
        for key, tok in zip(keys, tokens, strict=True):
            record = store.get(key)
            assert record is not None
            assert record.token == tok
    finally:
        for key in keys:
            store.delete(key)


@pytest.mark.parametrize("name", ALL_DBS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_300_character_key_and_a_1_mib_payload_round_trip(name: str, mode: str) -> None:
    """A key of about 300 characters (multi-byte ones too) and a 1 MiB result come back
    exactly, also to a duplicate claim."""
    store = shared_backend(name)
    key = new_key("é" * 150 + "x" * 150)
    payload = os.urandom(1 << 20)
    first = token()
    try:
        assert run(store, mode, "claim", key, first, lease=60).held_by(first)
        assert run(store, mode, "complete", key, first, payload, ttl=60) is True
        record = run(store, mode, "claim", key, token(), lease=60)
        assert (record.key, record.state, record.payload) == (key, State.COMPLETED, payload)
    finally:
        store.delete(key)


def test_a_key_too_long_for_the_column_is_refused_before_any_statement() -> None:
    """A key over 1024 UTF-8 bytes is a ConfigurationError, the same on every database."""
    store = SQLAlchemyBackend("sqlite:///:memory:")
    store.create_tables()
    with pytest.raises(ConfigurationError, match="1024 bytes"):
        store.claim("é" * 600, "t", lease=60)
    assert store.claim("x" * 1024, "t", lease=60).held_by("t")  # the limit itself is fine


@pytest.mark.parametrize("name", ALL_DBS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_purge_expired_deletes_only_expired_records_in_batches(name: str, mode: str) -> None:
    """purge_expired removes exactly the expired records, ``batch`` rows per statement, and
    says how many; live records stay."""
    store = backend_for(url_for(name), f"idem_purge_{RUN}")
    store._force_flavour = DATABASES[name][1]  # type: ignore[assignment]
    store.create_tables()
    try:
        keys = [new_key(f"p{i}") for i in range(23)]
        for i, key in enumerate(keys):
            tok = token()
            store.claim(key, tok, lease=60)
            if i % 2:
                store.complete(key, tok, b"r", ttl=600)
        expired = keys[:13]
        for key in expired:
            assert store.expire_now(key)
        log = StatementLog(store.database.sync_engine())
        try:
            assert run(store, mode, "purge_expired", batch=5) == 13
            if mode == "sync":
                deletes = [s for s in log.take() if s.startswith("DELETE")]
                assert len(deletes) == 3  # 5 + 5 + 3: the short batch ends it
        finally:
            log.close()
        assert run(store, mode, "purge_expired", batch=5) == 0
        assert [store.get(key) is not None for key in keys] == [False] * 13 + [True] * 10
        with store.database.sync_engine().connect() as conn:
            left = conn.execute(select(func.count()).select_from(store.table)).scalar()
        assert left == 10
    finally:
        drop_all(store)
        store.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_purge_expired_rejects_a_bad_batch(mode: str) -> None:
    """The batch size must be a positive int."""
    store = SQLAlchemyBackend("sqlite:///:memory:")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError, match="batch"):
            run(store, mode, "purge_expired", batch=bad)


# -- in-memory SQLite --------------------------------------------------------------------------


def test_sqlite_memory_serves_threads_and_async_callers_from_one_database() -> None:
    """sqlite:///:memory: is one database for every thread and for async callers."""
    store = SQLAlchemyBackend("sqlite:///:memory:")
    store.create_tables()
    runs: Counter[str] = Counter()
    keys = [f"k{i}" for i in range(30)]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            for key in keys:
                tok = token()
                if store.claim(key, tok, lease=60).held_by(tok):
                    runs[key] += 1
                    assert store.complete(key, tok, key.encode(), ttl=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert runs == Counter(dict.fromkeys(keys, 1))

    async def check() -> Record | None:
        return await store.aget("k7")

    record = asyncio.run(check())
    assert record is not None
    assert record.payload == b"k7"


# -- engines -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["postgres", "sqlite", "mariadb"])
def test_an_engine_you_pass_is_used_and_the_async_engine_derived(name: str) -> None:
    """A user's plain (transactional) Engine works: claims are committed, async callers get
    a derived asyncio engine on the same database, and close() leaves the engine open."""
    url = url_for(name)
    shared_backend(name)
    engine = create_engine(url)
    store = SQLAlchemyBackend(engine, table_name=TABLE)
    key, first = new_key(), token()
    try:
        assert store.claim(key, first, lease=60).held_by(first)
        other = SQLAlchemyBackend(url, table_name=TABLE)  # another pool: sees the commit
        assert other.claim(key, token(), lease=60).token == first
        other.close()
        assert run(store, "async", "complete", key, first, b"r", ttl=60) is True
        assert store.get(key) is not None
        assert store.get(key).payload == b"r"
        store.close()
        with engine.connect() as conn:  # still usable
            assert conn.execute(select(func.count()).select_from(store.table)).scalar()
    finally:
        store.delete(key)
        engine.dispose()


@pytest.mark.parametrize("name", ["postgres", "sqlite", "mariadb"])
async def test_an_async_engine_you_pass_is_used_and_the_sync_engine_derived(name: str) -> None:
    """A user's AsyncEngine serves async callers; sync callers get a derived engine."""
    url = async_url(make_url(url_for(name)))
    shared_backend(name)
    engine = create_async_engine(url)
    store = SQLAlchemyBackend(async_engine=engine, table_name=TABLE)
    key, first = new_key(), token()
    try:
        assert (await store.aclaim(key, first, lease=60)).held_by(first)
        assert store.complete(key, first, b"sync", ttl=60) is True
        record = await store.aget(key)
        assert record is not None
        assert record.payload == b"sync"
        await store.aclose()  # not ours: stays usable
        assert await store.adelete(key, token=first) is True
    finally:
        store.close()
        await engine.dispose()


@pytest.mark.parametrize("name", ["postgres", "sqlite", "mariadb"])
async def test_both_engines_can_be_passed(name: str) -> None:
    """engine= and async_engine= together: each serves its callers, one table."""
    url = make_url(url_for(name))
    shared_backend(name)
    engine, aengine = create_engine(sync_url(url)), create_async_engine(async_url(url))
    store = SQLAlchemyBackend(engine=engine, async_engine=aengine, table_name=TABLE)
    key, first = new_key(), token()
    try:
        assert store.claim(key, first, lease=60).held_by(first)
        assert await store.acomplete(key, first, b"both", ttl=60)
        assert store.get(key) is not None
    finally:
        store.delete(key)
        engine.dispose()
        await aengine.dispose()


def test_nothing_connects_before_the_first_operation() -> None:
    """Building a backend (also through the URL registry) opens no connection."""
    port = free_port()
    store = backend_from_url(f"postgresql://user:pw@127.0.0.1:{port}/db")
    assert isinstance(store, SQLAlchemyBackend)
    assert isinstance(store, Backend)
    assert repr(store) == f"SQLAlchemyBackend('postgresql://127.0.0.1:{port}/db', table=" + (
        f"'{DEFAULT_TABLE_NAME}')"
    )
    assert store.database.engine is None
    assert not store.database.loops


@pytest.mark.parametrize(
    ("given", "sync", "asynchronous"),
    [
        ("postgresql://h/d", "postgresql+psycopg://h/d", "postgresql+psycopg://h/d"),
        ("postgres://h/d", "postgresql+psycopg://h/d", "postgresql+psycopg://h/d"),
        ("postgresql+psycopg2://h/d", "postgresql+psycopg2://h/d", "postgresql+psycopg://h/d"),
        ("postgresql+asyncpg://h/d", "postgresql+psycopg://h/d", "postgresql+asyncpg://h/d"),
        ("sqlite:///x.db", "sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("mysql://h/d", "mysql+pymysql://h/d", "mysql+asyncmy://h/d"),
        ("mysql+pymysql://h/d", "mysql+pymysql://h/d", "mysql+asyncmy://h/d"),
        ("mariadb+mysqldb://h/d", "mariadb+mysqldb://h/d", "mariadb+asyncmy://h/d"),
        ("mysql+aiomysql://h/d", "mysql+pymysql://h/d", "mysql+aiomysql://h/d"),
    ],
)
def test_sync_and_async_drivers_are_derived_from_one_url(
    given: str, sync: str, asynchronous: str
) -> None:
    """A URL names one driver; the other side gets the matching one."""
    from idempotask.backends.sql._engines import parse_url

    url = parse_url(given)
    assert (str(sync_url(url)), str(async_url(url))) == (sync, asynchronous)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: SQLAlchemyBackend(), "pass a database URL"),
        (lambda: SQLAlchemyBackend("oracle://h/d"), "not supported"),
        (lambda: SQLAlchemyBackend("not a url"), "invalid database URL"),
        (lambda: SQLAlchemyBackend(42), "expected a database URL"),  # type: ignore[arg-type]
        (
            lambda: SQLAlchemyBackend("sqlite://", engine=create_engine("sqlite://")),
            "not both",
        ),
        (lambda: SQLAlchemyBackend("sqlite://", table_name=""), "table_name"),
        (lambda: SQLAlchemyBackend("sqlite://", connect_timeout=0), "connect_timeout"),
        (lambda: SQLAlchemyBackend("sqlite://").claim("k", "t", lease=0), "lease"),
        (lambda: SQLAlchemyBackend("sqlite://").renew("k", "t", lease=float("nan")), "lease"),
        (lambda: SQLAlchemyBackend("sqlite://").complete("k", "t", b"", ttl=-1), "ttl"),
        (
            lambda: SQLAlchemyBackend(async_engine=create_async_engine("sqlite+aiosqlite://")),
            "in-memory SQLite",
        ),
    ],
)
def test_bad_arguments_are_configuration_errors(call: Callable[[], Any], message: str) -> None:
    """Wrong URLs, engines and options fail at once with a message that names them."""
    with pytest.raises(ConfigurationError, match=message):
        call()


def test_metadata_is_there_for_alembic() -> None:
    """The module's MetaData holds the default table and its expiry index; define_table adds
    the table to your own MetaData (once)."""
    table = metadata.tables[DEFAULT_TABLE_NAME]
    assert [c.name for c in table.primary_key] == ["key"]
    assert {tuple(c.name for c in index.columns) for index in table.indexes} == {("expires_at",)}
    from sqlalchemy import MetaData

    mine = MetaData()
    assert define_table(mine, "jobs_idempotency") is define_table(mine, "jobs_idempotency")
    store = SQLAlchemyBackend("sqlite://", table_name="jobs", schema=None)
    assert store.metadata is not metadata
    assert "jobs" in store.metadata.tables


@pytest.mark.parametrize("name", ["postgres", "sqlite", "mariadb"])
def test_create_tables_is_idempotent_and_safe_from_several_threads(name: str) -> None:
    """create_tables() from eight backends at once, and again, never fails."""
    table = f"idem_create_{RUN}"
    stores = [backend_for(url_for(name), table) for _ in range(8)]
    errors: list[BaseException] = []

    def create(store: SQLAlchemyBackend) -> None:
        try:
            store.create_tables()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(s,)) for s in stores]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        stores[0].create_tables()
        assert stores[0].claim("k", "t", lease=60).held_by("t")
    finally:
        drop_all(stores[0])
        drop_all(stores[0])  # idempotent too
        for store in stores:
            store.close()


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["postgres", "sqlite", "mariadb"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_foreign_row_is_a_corrupt_record_error(name: str, mode: str) -> None:
    """A row under our key with a state we never write makes claim and get raise
    CorruptRecordError naming the key."""
    store = shared_backend(name)
    key = new_key("foreign")
    with store.database.sync_engine().connect() as conn:
        conn.execute(
            insert(store.table).values(
                key=key,
                state="bogus",
                token="t",
                owner="",
                fingerprint="",
                payload=b"",
                expires_at=4e9,
            )
        )
    try:
        for operation, args, kwargs in [
            ("claim", (key, "t2"), {"lease": 60}),
            ("get", (key,), {}),
        ]:
            with pytest.raises(CorruptRecordError, match="unknown state 'bogus'") as caught:
                run(store, mode, operation, *args, **kwargs)
            assert key in str(caught.value)
    finally:
        store.delete(key)


def test_bytes_that_are_not_utf8_in_a_mariadb_text_column_are_a_corrupt_record_error() -> None:
    """MariaDB stores text as VARBINARY: bytes that are not UTF-8 were not written by us."""
    store = shared_backend("mariadb")
    key = new_key("binary")
    with store.database.sync_engine().connect() as conn:
        conn.execute(
            text(f"INSERT INTO {TABLE} VALUES (:k, 'in_progress', :t, '', '', '', 4e9)"),
            {"k": key.encode(), "t": b"\xff\xfe"},
        )
    try:
        with pytest.raises(CorruptRecordError, match="not UTF-8"):
            store.get(key)
    finally:
        store.delete(key)


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "mysql+pymysql"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_unreachable_database_is_a_backend_error_at_once(scheme: str, mode: str) -> None:
    """A closed port fails the operation within seconds as BackendError naming the
    operation and the server, never the password."""
    port = free_port()
    store = SQLAlchemyBackend(f"{scheme}://user:s3cret@127.0.0.1:{port}/db", connect_timeout=3)
    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        run(store, mode, "claim", "k", "t", lease=60)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"claim 'k' failed on {scheme}://127.0.0.1:{port}/db: " in message, message
    assert "s3cret" not in message
    assert "user@" not in message
    assert caught.value.__cause__ is not None
    assert not isinstance(caught.value, CorruptRecordError)


def test_an_unusable_sqlite_path_is_a_backend_error() -> None:
    """A SQLite file that cannot be opened is a BackendError naming the path."""
    store = SQLAlchemyBackend(f"sqlite:///{_SQLITE_DIR}/missing/dir/x.db")
    with pytest.raises(BackendError, match="get 'k' failed on sqlite:///"):
        store.get("k")


def _server_connection_id(conn: Any) -> int:
    sql = (
        "SELECT pg_backend_pid()" if conn.dialect.name == "postgresql" else "SELECT CONNECTION_ID()"
    )
    return int(conn.exec_driver_sql(sql).scalar_one())


def _end_server_connection(name: str, connection_id: int) -> None:
    """End a connection from the server's side, as an administrator or a failover would."""
    engine = create_engine(url_for(name), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if name == "postgres":  # waits (up to 5 s) until the backend has exited
                conn.execute(
                    text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": connection_id}
                )
            else:
                conn.exec_driver_sql(f"KILL {int(connection_id)}")
    finally:
        engine.dispose()


@pytest.mark.parametrize("name", SERVER_DBS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_connection_the_server_ended_fails_one_call_and_the_next_reconnects(
    name: str, mode: str
) -> None:
    """The server ends the only pooled connection (pg_terminate_backend, KILL): the next
    call fails with BackendError naming the operation, and the one after that runs on a
    new connection."""
    shared_backend(name)
    options = {"pool_size": 1, "max_overflow": 0}
    store = SQLAlchemyBackend(url_for(name), table_name=TABLE, engine_options=options)
    key, first = new_key(), token()

    call = caller(store, mode)

    async def pooled_connection_id() -> int:
        if mode == "sync":
            with store.database.sync_engine().connect() as conn:
                return _server_connection_id(conn)
        async with (await store.database.async_engine()).connect() as aconn:
            return await aconn.run_sync(_server_connection_id)

    async def scenario() -> None:
        assert await call("get", key) is None
        _end_server_connection(name, await pooled_connection_id())
        with pytest.raises(BackendError, match=f"claim {key!r} failed on ") as caught:
            await call("claim", key, first, lease=60)
        assert not isinstance(caught.value, CorruptRecordError)
        assert (await call("claim", key, first, lease=60)).held_by(first)
        assert await call("complete", key, first, b"r", ttl=60)
        assert await pooled_connection_id() != 0
        await call("delete", key)
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        store.close()


@pytest.mark.parametrize("name", SERVER_DBS)
def test_a_call_cancelled_mid_statement_leaves_no_busy_connection_behind(name: str) -> None:
    """An async complete waiting on a row lock is cancelled (a timeout): its connection,
    still busy with the statement, is discarded rather than given back to the pool, so
    the next calls work and see a consistent record. (Whether the cancelled statement
    still ran is up to the server: MariaDB finishes it once the lock is released.)"""
    shared_backend(name)
    options = {"pool_size": 1, "max_overflow": 0}
    store = SQLAlchemyBackend(url_for(name), table_name=TABLE, engine_options=options)
    key, first = new_key(), token()
    locker = create_engine(url_for(name))

    async def scenario() -> None:
        assert (await store.aclaim(key, first, lease=60)).held_by(first)
        with locker.begin() as conn:
            # Hold the row: the complete's UPDATE waits for this transaction.
            conn.execute(
                select(store.table.c.key).where(store.table.c.key == key).with_for_update()
            )
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(store.acomplete(key, first, b"late", ttl=60), 0.5)
        # The lock is gone; had the cancelled statement stayed on a pooled connection, the
        # calls below would find the connection busy or read its leftovers.
        for _ in range(3):
            record = await store.aget(key)
            assert record is not None
            assert record.token == first
        assert await store.acomplete(key, first, b"r", ttl=60)  # stored, or already
        record = await store.aget(key)
        assert record is not None
        assert record.state is State.COMPLETED
        assert record.payload in (b"r", b"late")
        await store.adelete(key)
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        store.close()
        locker.dispose()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_sqlite_claim_failing_inside_its_transaction_leaves_none_open(
    mode: str, tmp_path: Path
) -> None:
    """A SQLite claim whose upsert fails after BEGIN IMMEDIATE (here a trigger refuses the
    key) rolls its transaction back before the connection returns to the pool: the same
    connection claims again, and another process can write at once."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'tx.db'}"
    options = {"pool_size": 1, "max_overflow": 0}
    store = SQLAlchemyBackend(url, engine_options=options, busy_timeout=0.2)
    store.create_tables()
    with sqlite3.connect(tmp_path / "tx.db") as conn:
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT ON {DEFAULT_TABLE_NAME} "
            "WHEN NEW.key = 'refused' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )

    call = caller(store, mode)

    async def scenario() -> None:  # one event loop: one async engine, one connection
        for _ in range(2):
            with pytest.raises(BackendError, match="refused"):
                await call("claim", "refused", token(), lease=60)
            assert (await call("claim", new_key(), "t", lease=60)).held_by("t")
        other = sqlite3.connect(tmp_path / "tx.db", timeout=0)
        try:
            other.execute(f"DELETE FROM {DEFAULT_TABLE_NAME}")  # no lock left behind
            other.commit()
        finally:
            other.close()
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        store.close()


@pytest.mark.parametrize("name", ALL_DBS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_statement_listeners_see_every_statement(name: str, mode: str) -> None:
    """With a statement listener on the engine (tracing, statement comments), statements
    go through SQLAlchemy's execution so it sees each one, and the store behaves the same."""
    url = make_url(url_for(name))
    shared_backend(name)
    engine = create_engine(sync_url(url))
    aengine = create_async_engine(async_url(url))
    store = SQLAlchemyBackend(engine=engine, async_engine=aengine, table_name=TABLE)
    store._force_flavour = DATABASES[name][1]  # type: ignore[assignment]
    log = StatementLog(engine if mode == "sync" else aengine.sync_engine)
    key, first = new_key(), token()

    call = caller(store, mode)

    async def scenario() -> None:
        assert (await call("claim", key, first, lease=60)).held_by(first)
        assert log.take()
        assert await call("complete", key, first, b"r", ttl=60)
        assert [s.split()[0] for s in log.take()][:1] in (["UPDATE"], ["WITH"])
        assert (await call("claim", key, token(), lease=60)).payload == b"r"
        assert log.take()
        assert await call("delete", key)
        await aengine.dispose()

    try:
        asyncio.run(scenario())
    finally:
        log.close()
        engine.dispose()


# -- concurrency -------------------------------------------------------------------------------


def _check_each_key_ran_once(store: SQLAlchemyBackend, keys: list[str], runs: Counter[str]) -> None:
    assert runs == Counter(dict.fromkeys(keys, 1))
    for key in keys:
        record = store.get(key)
        assert record is not None
        assert (record.state, record.payload) == (State.COMPLETED, key.encode())
        store.delete(key)


@pytest.mark.parametrize("name", ALL_DBS)
def test_16_threads_racing_over_shared_keys_run_each_key_exactly_once(name: str) -> None:
    """16 threads race claim/complete over 40 keys: each key's body runs exactly once and
    every record ends COMPLETED with its result."""
    store = shared_backend(name)
    keys = [new_key(f"thread{i}") for i in range(40)]
    runs: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            barrier.wait()
            for key in keys[seed % 7 :] + keys[: seed % 7]:
                tok = token()
                record = store.claim(key, tok, lease=60)
                if record.held_by(tok):
                    with lock:
                        runs[key] += 1
                    assert store.complete(key, tok, key.encode(), ttl=600)
                else:
                    assert record.state in (State.IN_PROGRESS, State.COMPLETED), record
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    _check_each_key_ran_once(store, keys, runs)


@pytest.mark.parametrize("name", ALL_DBS)
def test_50_asyncio_tasks_racing_over_shared_keys_run_each_key_exactly_once(name: str) -> None:
    """50 asyncio tasks on one loop race claim/complete over 40 keys: each key's body runs
    exactly once."""
    store = shared_backend(name)
    keys = [new_key(f"task{i}") for i in range(40)]
    runs: Counter[str] = Counter()

    async def task(seed: int) -> None:
        for key in keys[seed % 7 :] + keys[: seed % 7]:
            tok = token()
            record = await store.aclaim(key, tok, lease=60)
            if record.held_by(tok):
                runs[key] += 1
                assert await store.acomplete(key, tok, key.encode(), ttl=600)
            else:
                assert record.state in (State.IN_PROGRESS, State.COMPLETED), record

    async def race() -> None:
        await asyncio.gather(*(task(i) for i in range(50)))

    asyncio.run(race())
    _check_each_key_ran_once(store, keys, runs)


@pytest.mark.parametrize("name", ["postgres", "sqlite"])
def test_8_processes_claiming_500_keys_3_times_each_run_every_key_exactly_once(
    name: str,
) -> None:
    """Eight processes claim 500 keys three times each in random orders, counting every run
    in the database: each key ran exactly once, and every record is COMPLETED."""
    url = url_for(name)
    table = shared_backend(name).table.name
    counters = f"idem_runs_{RUN}"
    counter = counter_table(counters)
    prefix = new_key("proc")
    keys = [f"{prefix}:{i}" for i in range(500)]
    engine = create_engine(url)
    counter.create(engine, checkfirst=True)
    try:
        with engine.begin() as conn:
            conn.execute(insert(counter), [{"key": key, "runs": 0} for key in keys])
        context = multiprocessing.get_context("spawn")
        with context.Pool(8) as pool:
            ran = pool.starmap(
                claim_worker, [(url, table, counters, keys, 3, seed) for seed in range(8)]
            )
        with engine.connect() as conn:
            runs = dict(conn.execute(select(counter.c.key, counter.c.runs)).all())
        assert sum(ran) == 500
        assert Counter(runs.values()) == Counter({1: 500})
        store = shared_backend(name)
        assert all(store.get(key).state is State.COMPLETED for key in keys)  # type: ignore[union-attr]
    finally:
        counter.drop(engine, checkfirst=True)
        engine.dispose()


# -- event loops, forks ------------------------------------------------------------------------


def _pg_connections(url: str, application: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :a"),
                    {"a": application},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_asyncio_run_again_and_again_leaves_no_connections_behind() -> None:
    """Each event loop gets its own asyncio engine, closed when asyncio.run() shuts the
    loop down: 25 runs leave no PostgreSQL connection open, and aclose() closes one too."""
    url = url_for("postgres")
    shared_backend("postgres")
    application = f"idem-loops-{RUN}"
    store = SQLAlchemyBackend(
        url, table_name=TABLE, engine_options={"connect_args": {"application_name": application}}
    )

    async def call(key: str) -> None:
        tok = token()
        assert (await store.aclaim(key, tok, lease=60)).held_by(tok)
        await asyncio.gather(*(store.aget(key) for _ in range(3)))  # a few pooled connections
        assert await store.adelete(key)

    for _ in range(25):
        asyncio.run(call(new_key()))
    assert _pg_connections(url, application) == 0
    assert not store.database.loops  # the loops' engines are gone

    async def call_then_close() -> int:
        await call(new_key())
        open_now = _pg_connections(url, application)
        await store.aclose()
        return open_now

    assert asyncio.run(call_then_close()) >= 1
    assert _pg_connections(url, application) == 0


_FORK_SCRIPT = """
import os, sys, uuid
from idempotask.backends.sql import SQLAlchemyBackend
store = SQLAlchemyBackend(sys.argv[1], table_name=sys.argv[2])
key = "fork:" + uuid.uuid4().hex
assert store.claim(key, "parent", lease=60).held_by("parent")
pid = os.fork()
if pid == 0:
    # The child must not share the parent's pooled socket.
    record = store.claim(key, "child", lease=60)
    os._exit(0 if record.token == "parent" and store.complete(key, "parent", b"c", ttl=60) else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
record = store.get(key)
assert record is not None and record.payload == b"c", record
store.delete(key)
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("name", ["postgres", "mariadb"])
def test_a_forked_child_opens_its_own_connections(name: str) -> None:
    """After fork, the child drops the parent's pooled connections and opens its own; the
    parent's connection keeps working."""
    import subprocess
    import sys

    shared_backend(name)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, url_for(name), TABLE],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


# -- statement timeouts: bounded waiting ---------------------------------------------------


def test_statement_timeout_becomes_connect_options_and_none_turns_it_off() -> None:
    """PostgreSQL: statement_timeout in libpq options (after the URL's own), keepalives and
    tcp_user_timeout; MariaDB: max_statement_time in an init_command MySQL reads as a
    comment; asyncpg: server_settings and command_timeout; the URL's own settings win.
    In the version matrix, tcp_user_timeout also checks the libpq version lookup
    (psycopg's documented pq.version()) at the lowest and newest psycopg."""
    from idempotask.backends.sql._timeouts import connect_options

    pg = connect_options("postgresql", "psycopg", {"options": "-c search_path=app"}, 2.5)
    assert pg["options"] == "-c search_path=app -c statement_timeout=2500"
    assert (pg["keepalives"], pg["keepalives_idle"], pg["tcp_user_timeout"]) == (1, 3, 3500)
    mine = connect_options("postgresql", "psycopg", {"options": "-c statement_timeout=1"}, 2.5)
    assert "options" not in mine
    assert connect_options("mysql", "asyncmy", {}, 0.5)["init_command"] == (
        "SET /*M! SESSION max_statement_time=0.5, */ @idempotask_statement_timeout=0.5"
    )
    assert connect_options("postgresql", "asyncpg", {}, 1.0) == {
        "server_settings": {"statement_timeout": "1000"},
        "command_timeout": 2.0,
    }
    assert connect_options("postgresql", "psycopg", {}, None) == {}
    assert connect_options("sqlite", "pysqlite", {}, 10.0) == {}
    with pytest.raises(ConfigurationError, match="statement_timeout"):
        SQLAlchemyBackend(SQLITE_URL, statement_timeout=0)


@pytest.mark.parametrize("name", SERVER_DBS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_server_side_timeout_is_set_on_every_connection(name: str, mode: str) -> None:
    """The engines the backend creates, sync and async, set the server's statement timeout
    (10 s by default); None leaves the server's default."""
    query = "SHOW statement_timeout" if name == "postgres" else "SELECT @@max_statement_time"

    async def setting(store: SQLAlchemyBackend) -> str:
        if mode == "sync":
            with store.database.sync_engine().connect() as conn:
                return str(conn.exec_driver_sql(query).scalar_one())
        async with (await store.database.async_engine()).connect() as aconn:
            return str((await aconn.exec_driver_sql(query)).scalar_one())

    async def scenario() -> tuple[str, str]:
        default = SQLAlchemyBackend(url_for(name), table_name=TABLE)
        off = SQLAlchemyBackend(url_for(name), table_name=TABLE, statement_timeout=None)
        try:
            return await setting(default), await setting(off)
        finally:
            for store in (default, off):
                await store.aclose()
                store.close()

    default, off = asyncio.run(scenario())
    if name == "postgres":
        assert (default, off) == ("10s", "0")
    else:
        assert (float(default), float(off)) == (10.0, 0.0)


@pytest.mark.parametrize("name", SERVER_DBS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_statement_past_the_timeout_is_cancelled_by_the_server_and_the_connection_kept(
    name: str, mode: str
) -> None:
    """A complete waiting on a row lock held elsewhere is cancelled by the server after
    statement_timeout (0.5 s): BackendError at once, on the same pooled connection, which
    the next call uses (the cancellation is clean; the watchdog did not need to act)."""
    shared_backend(name)
    options = {"pool_size": 1, "max_overflow": 0}
    store = SQLAlchemyBackend(
        url_for(name), table_name=TABLE, statement_timeout=0.5, engine_options=options
    )
    key, first = new_key(), token()
    assert store.claim(key, first, lease=60).held_by(first)
    locker = create_engine(url_for(name))

    call = caller(store, mode)

    async def pooled_connection_id() -> int:
        if mode == "sync":
            with store.database.sync_engine().connect() as conn:
                return _server_connection_id(conn)
        async with (await store.database.async_engine()).connect() as aconn:
            return await aconn.run_sync(_server_connection_id)

    async def scenario() -> None:
        before = await pooled_connection_id()
        with locker.begin() as conn:
            conn.execute(store.table.select().where(store.table.c.key == key).with_for_update())
            started = time.monotonic()
            with pytest.raises(BackendError, match=f"complete {key!r} failed on "):
                await call("complete", key, first, b"r", ttl=60)
            assert 0.4 < time.monotonic() - started < 1.0  # the server's 0.5 s, not 1 s
        assert await pooled_connection_id() == before
        assert await call("complete", key, first, b"r", ttl=60)
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        store.delete(key)
        store.close()
        locker.dispose()


@pytest.mark.parametrize("name", SERVER_DBS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_database_that_stops_answering_fails_within_the_bound_and_the_next_call_recovers(
    name: str, mode: str
) -> None:
    """Guarantee (bounded waiting): the database accepts bytes on the pooled connection
    but never answers (a proxy swallowing everything). With statement_timeout=0.3 the
    call raises BackendError within the client bound (0.6 s; PyMySQL's read_timeout is
    whole seconds) instead of hanging, the connection is discarded, and once the database
    answers again the next call works. No private driver attribute is involved."""
    from urllib.parse import urlsplit

    from tests.faults._proxy import DelayProxy

    shared_backend(name)
    url = url_for(name)
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the fault proxy only forwards to a server on 127.0.0.1")
    proxy = DelayProxy("127.0.0.1", parts.port or (5432 if name == "postgres" else 3306)).start()
    proxied = url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}", 1)
    store = SQLAlchemyBackend(proxied, table_name=TABLE, statement_timeout=0.3, connect_timeout=2)
    key, first = new_key(), token()

    call = caller(store, mode)

    async def scenario() -> None:
        assert await call("get", key) is None  # a pooled connection through the proxy
        proxy.blackhole = True
        started = time.monotonic()
        # psycopg: the watchdog; PyMySQL: its read_timeout (1 s, whole seconds for
        # MySQLdb's sake); asyncmy: asyncio.timeout.
        with pytest.raises(BackendError, match=r"claim .*(no answer within 0.6 s|timed out)"):
            await call("claim", key, first, lease=60)
        assert time.monotonic() - started < 1.5
        proxy.blackhole = False
        assert (await call("claim", key, first, lease=60)).held_by(first)
        assert await call("delete", key)
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        store.close()
        proxy.stop()


def test_the_watchdog_costs_little_and_leaves_nothing_behind() -> None:
    """Statements far under their bound: the watchdog never fires, and forgets each one."""
    from idempotask.backends.sql._timeouts import watchdog

    store = shared_backend("postgres")
    for _ in range(200):
        store.get(new_key())
    assert watchdog()._live == set()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg_async"])
def test_psycopg_connections_expose_their_socket_through_fileno(driver: str) -> None:
    """The watchdog finds a psycopg connection's socket with psycopg's documented
    ``Connection.fileno()`` (sync and asyncio): this fails if a release drops it."""
    import psycopg

    url = make_url(url_for("postgres")).set(drivername="postgresql+psycopg")
    if driver == "psycopg":
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                raw = conn.connection.driver_connection
                assert isinstance(raw, psycopg.Connection)
                assert raw.fileno() >= 0
        finally:
            engine.dispose()
        return

    async def check() -> None:
        aengine = create_async_engine(url)
        try:
            async with aengine.connect() as aconn:
                raw = (await aconn.get_raw_connection()).driver_connection
                assert isinstance(raw, psycopg.AsyncConnection)
                assert raw.fileno() >= 0
        finally:
            await aengine.dispose()

    asyncio.run(check())

"""Transactional mode (``@idempotent(transactional=True)``): the body's writes and the result
commit together or not at all, on real PostgreSQL and MariaDB, with real processes.

Servers come from ``IDEMPOTASK_POSTGRES_URL`` and ``IDEMPOTASK_MYSQL_URL`` (defaults in
``tests/conftest.py``). Every test makes its own tables (a unique prefix) and drops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import idempotask
from idempotask import (
    ConfigurationError,
    DeadLetterQueue,
    LeaseLostError,
    SerializationError,
    dead_letter,
    idempotent,
    keep_all,
    lease_held,
)
from idempotask.backends.base import State
from idempotask.backends.fallback import fallback_url
from idempotask.backends.memory import MemoryBackend
from idempotask.backends.sql import SQLAlchemyBackend

from . import _transactional_workers as workers

try:  # tests/conftest.py: the URL of a service, or skip (fail in CI) when it is down
    from tests.conftest import service_url
except ImportError:  # pragma: no cover
    from conftest import service_url  # type: ignore[no-redef]

WORKERS = Path(workers.__file__)


@dataclass
class Db:
    """One test's database: its URL, a store on its own tables, and the tables the bodies
    write, all dropped at the end."""

    url: str
    prefix: str
    store: SQLAlchemyBackend
    engine: Engine

    def rows(self) -> list[tuple[str, str]]:
        table = workers.rows_table(self.prefix)
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(table.c.key, table.c.writer)).all()]

    def unique_rows(self) -> list[tuple[int, str]]:
        table = workers.unique_table(self.prefix)
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(table.c.id, table.c.writer)).all()]


def _make_db(url: str, **options: Any) -> Iterator[Db]:
    prefix = f"tx{uuid.uuid4().hex[:10]}"
    store = SQLAlchemyBackend(
        url,
        table_name=f"{prefix}_records",
        dead_letter_table=f"{prefix}_letters",
        breaker_table=f"{prefix}_breakers",
        **options,
    )
    store.create_tables()
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    tables = [workers.rows_table(prefix), workers.unique_table(prefix)]
    for table in tables:
        table.create(engine)
    try:
        yield Db(url, prefix, store, engine)
    finally:
        for table in tables:
            table.drop(engine, checkfirst=True)
        store.metadata.drop_all(store.database.sync_engine())
        store.close()
        engine.dispose()


@pytest.fixture(params=["postgres", "mysql"])
def db(request: pytest.FixtureRequest) -> Iterator[Db]:
    yield from _make_db(service_url(request.param))


@pytest.fixture
def mariadb() -> Iterator[Db]:
    yield from _make_db(service_url("mysql"))


@pytest.fixture
def postgres_1s() -> Iterator[Db]:
    """PostgreSQL with a one-second statement_timeout (client bound: two seconds)."""
    yield from _make_db(service_url("postgres"), statement_timeout=1)


def _writer(db: Db, *, name: str, fail: bool = False, **options: Any) -> Any:
    """A transactional function on ``db`` that writes one row (and raises after, if
    ``fail``); counts its runs in ``.runs``."""
    rows = workers.rows_table(db.prefix)
    runs: list[str] = []

    @idempotent(
        ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.{name}", **options
    )
    def write(key: str) -> str:
        runs.append(key)
        idempotask.transaction().execute(insert(rows).values(key=key, writer="body"))
        if fail:
            raise ValueError(f"failed after writing {key}")
        return f"wrote {key}"

    write.runs = runs  # type: ignore[attr-defined]
    return write


# -- commit together, roll back together ------------------------------------------------------


def test_writes_and_result_commit_together(db: Db) -> None:
    """The body's row and the COMPLETED record are there after the call; a duplicate
    answers from the record without running or writing."""
    write = _writer(db, name="write")
    assert write("a") == "wrote a"
    assert write("a") == "wrote a"
    assert write.runs == ["a"]
    assert db.rows() == [("a", "body")]
    record = db.store.get(write.key_for("a"))
    assert record is not None
    assert record.state is State.COMPLETED


def test_a_failing_body_rolls_back_and_releases(db: Db) -> None:
    """A body raising after it wrote leaves no row and no record: the next call runs."""
    write = _writer(db, name="fails", fail=True)
    for _ in range(2):
        with pytest.raises(ValueError, match="failed after writing"):
            write("b")
    assert write.runs == ["b", "b"]
    assert db.rows() == []
    assert db.store.get(write.key_for("b")) is None


def test_a_cached_failure_is_stored_outside_the_rolled_back_transaction(db: Db) -> None:
    """With cache_errors=, the FAILED record is written although the writes rolled back."""
    write = _writer(db, name="cached", fail=True, cache_errors=60)
    with pytest.raises(ValueError):
        write("c")
    with pytest.raises(ValueError):
        write("c")  # answered from the cached failure
    assert write.runs == ["c"]
    assert db.rows() == []
    record = db.store.get(write.key_for("c"))
    assert record is not None
    assert record.state is State.FAILED


def test_a_failure_is_dead_lettered_and_its_writes_rolled_back(db: Db) -> None:
    """@dead_letter over a transactional call records the failure; the row is gone."""
    rows = workers.rows_table(db.prefix)
    queue = DeadLetterQueue(db.store.dead_letter_store(namespace=db.prefix))

    @dead_letter(queue=queue, redact=keep_all)
    @idempotent(ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.dl")
    def charge(order: int) -> int:
        idempotask.transaction().execute(insert(rows).values(key=str(order), writer="body"))
        raise TimeoutError("gateway")

    with pytest.raises(TimeoutError):
        charge(7)
    assert db.rows() == []
    assert queue.count() == 1
    (letter,) = queue.query()
    assert letter.error_type.endswith("TimeoutError")
    assert letter.key == charge.key_for(7)


def test_an_orm_session_on_the_connection_commits_with_the_call(db: Db) -> None:
    """Session(bind=transaction()): the session's commit() only flushes; a failure after
    it rolls its writes back with the rest."""
    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.orm")
    def orm(key: str, fail: bool) -> str:
        with Session(bind=idempotask.transaction()) as session:
            session.execute(insert(rows).values(key=key, writer="session"))
            session.commit()
        if fail:
            raise ValueError("after the session's commit")
        return key

    with pytest.raises(ValueError):
        orm("x", True)
    assert db.rows() == []
    assert orm("y", False) == "y"
    assert db.rows() == [("y", "session")]


def test_the_mysql_plan_commits_together_and_refuses_a_late_owner(mariadb: Db) -> None:
    """MySQL (no idle-transaction timeout, no RETURNING), run as the plan forced on
    MariaDB: writes and result commit together, a late owner is rolled back whole."""
    db = mariadb
    db.store._force_flavour = "mysql"
    write = _writer(db, name="mysql")
    assert write("s") == write("s") == "wrote s"
    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.mlate")
    def late(key: str) -> str:
        idempotask.transaction().execute(insert(rows).values(key=key, writer="late"))
        assert db.store.expire_now(late.key_for(key))
        assert db.store.claim(late.key_for(key), "new", lease=60).held_by("new")
        return key

    with pytest.raises(LeaseLostError):
        late("t")
    assert db.rows() == [("s", "body")]


# -- late owners, leases -------------------------------------------------------------------------


def test_a_late_owner_is_rolled_back_whole(db: Db) -> None:
    """A claim taken over while the body ran: complete's compare-and-set fails, the whole
    transaction (the body's row included) rolls back, LeaseLostError is raised, the new
    owner's claim is untouched, and nothing is dead-lettered."""
    rows = workers.rows_table(db.prefix)
    queue = DeadLetterQueue(db.store.dead_letter_store(namespace=db.prefix))

    @dead_letter(queue=queue, redact=keep_all)
    @idempotent(ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.late")
    def late(key: str) -> str:
        idempotask.transaction().execute(insert(rows).values(key=key, writer="late"))
        store_key = late.key_for(key)
        # Another caller takes the key over (its lease ran out) while this body runs.
        assert db.store.expire_now(store_key)
        assert db.store.claim(store_key, "new-owner", lease=60).held_by("new-owner")
        return key

    with pytest.raises(LeaseLostError) as caught:
        late("d")
    assert caught.value.key == late.key_for("d")
    assert db.rows() == []
    record = db.store.get(late.key_for("d"))
    assert record is not None
    assert (record.state, record.token) == (State.IN_PROGRESS, "new-owner")
    assert queue.count() == 0


def test_the_lease_is_renewed_while_the_body_works_in_its_transaction(db: Db) -> None:
    """A body longer than its lease, working in its transaction all along, keeps its
    claim: renewals run on their own connection and do not wait on the transaction."""
    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, lease=1.0, backend=db.store, transactional=True, name=f"{db.prefix}.long")
    def long(key: str) -> bool:
        conn = idempotask.transaction()
        conn.execute(insert(rows).values(key=key, writer="long"))
        held = True
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            conn.execute(text("SELECT 1"))
            held = held and lease_held()
            time.sleep(0.05)
        return held

    assert long("e") is True
    assert db.rows() == [("e", "long")]
    record = db.store.get(long.key_for("e"))
    assert record is not None
    assert record.state is State.COMPLETED


def test_duplicates_see_the_claim_while_the_body_runs(db: Db) -> None:
    """The record's row is not locked while the body runs (only complete() locks it, at
    the end): a concurrent duplicate gets its answer (in progress) at once."""
    rows = workers.rows_table(db.prefix)
    answers: list[BaseException] = []

    def duplicate(key: str) -> None:
        try:
            busy(key)
        except Exception as exc:
            answers.append(exc)

    @idempotent(
        ttl=600,
        on_conflict="raise",
        backend=db.store,
        transactional=True,
        name=f"{db.prefix}.busy",
    )
    def busy(key: str) -> str:
        idempotask.transaction().execute(insert(rows).values(key=key, writer="busy"))
        other = threading.Thread(target=duplicate, args=(key,))
        other.start()
        other.join(30)  # liveness: a duplicate blocked on a row lock would not return
        return key

    assert busy("r") == "r"
    assert [type(a) for a in answers] == [idempotask.AlreadyInProgress]
    assert db.rows() == [("r", "busy")]


def test_a_transaction_idle_for_a_lease_is_ended_by_the_server(db: Db) -> None:
    """The bound on a paused owner's locks: a transaction left idle for longer than the
    lease is ended by the database, so the body's next statement fails, nothing it wrote
    is kept and the key is released."""
    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, lease=1.0, backend=db.store, transactional=True, name=f"{db.prefix}.idle")
    def idle(key: str) -> str:
        conn = idempotask.transaction()
        conn.execute(insert(rows).values(key=key, writer="idle"))
        time.sleep(3.0)  # idle in the transaction for three leases
        conn.execute(text("SELECT 1"))
        return key

    with pytest.raises(Exception) as caught:
        idle("f")
    assert not isinstance(caught.value, AssertionError)
    assert db.rows() == []
    assert db.store.get(idle.key_for("f")) is None


def test_a_lock_wait_in_the_body_is_bounded_by_the_lease(db: Db) -> None:
    """A body whose write waits on a row lock another transaction holds (here the
    caller's own, on another connection) fails after about a lease instead of waiting
    for ever; nothing it wrote is kept and the key is released."""
    unique = workers.unique_table(db.prefix)
    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, lease=1.0, backend=db.store, transactional=True, name=f"{db.prefix}.lock")
    def blocked(n: int) -> int:
        conn = idempotask.transaction()
        conn.execute(insert(rows).values(key=str(n), writer="blocked"))
        conn.execute(insert(unique).values(id=n, writer="blocked"))
        return n

    errors: list[BaseException] = []

    def call() -> None:
        try:
            blocked(5)
        except Exception as exc:
            errors.append(exc)

    with db.engine.connect().execution_options(isolation_level="READ COMMITTED") as holder:
        held = holder.begin()
        holder.execute(insert(unique).values(id=5, writer="holder"))
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(60)  # liveness: unbounded, the call would wait for the holder
        finished = not thread.is_alive()
        held.rollback()
    thread.join(60)
    assert finished, "the body's lock wait was not bounded"
    assert len(errors) == 1, errors
    assert "lock" in str(errors[0]).lower(), errors  # the database's lock-wait timeout
    assert db.rows() == []
    assert db.unique_rows() == []
    assert db.store.get(blocked.key_for(5)) is None


# -- nesting -------------------------------------------------------------------------------------


def test_a_transactional_call_inside_another_is_refused(db: Db) -> None:
    """Nested transactional calls raise ConfigurationError before the inner claims; the
    outer call's writes roll back with its failure."""
    inner = _writer(db, name="inner")
    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.outer")
    def outer(key: str) -> str:
        idempotask.transaction().execute(insert(rows).values(key=key, writer="outer"))
        return str(inner(key))

    with pytest.raises(ConfigurationError, match="inside another transactional call"):
        outer("g")
    assert inner.runs == []
    assert db.rows() == []
    assert db.store.get(inner.key_for("g")) is None
    assert db.store.get(outer.key_for("g")) is None


def test_a_plain_idempotent_call_inside_a_transactional_body_commits_on_its_own(db: Db) -> None:
    """A non-transactional call inside the body uses the store as usual: its result is
    stored at once, and stays when the outer transaction rolls back."""

    @idempotent(ttl=600, backend=db.store, name=f"{db.prefix}.plain")
    def plain(key: str) -> str:
        return key

    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.host")
    def host(key: str) -> str:
        idempotask.transaction().execute(insert(rows).values(key=key, writer="host"))
        plain(key)
        raise ValueError("after the plain call")

    with pytest.raises(ValueError):
        host("h")
    assert db.rows() == []
    record = db.store.get(plain.key_for("h"))
    assert record is not None
    assert record.state is State.COMPLETED


def test_a_transactional_call_commits_apart_from_the_callers_own_transaction(db: Db) -> None:
    """The caller's own open transaction (another connection) is not joined: the call
    commits on its own, and the caller's rollback does not undo it."""
    write = _writer(db, name="apart")
    unique = workers.unique_table(db.prefix)
    with db.engine.connect().execution_options(isolation_level="READ COMMITTED") as conn:
        tx = conn.begin()
        conn.execute(insert(unique).values(id=1, writer="caller"))
        assert write("i") == "wrote i"
        tx.rollback()
    assert db.rows() == [("i", "body")]
    assert db.unique_rows() == []


def test_a_body_that_closes_the_connection_releases_the_key(db: Db) -> None:
    """A body that closes the call's connection itself (its transaction is rolled back):
    the call raises BackendError and gives the key back, instead of a raw SQLAlchemy
    error with the key held until its lease runs out."""
    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, lease=30, backend=db.store, transactional=True, name=f"{db.prefix}.c")
    def closes(key: str) -> str:
        conn = idempotask.transaction()
        conn.execute(insert(rows).values(key=key, writer="closes"))
        conn.close()
        return key

    with pytest.raises(idempotask.BackendError, match="closed"):
        closes("c")
    assert db.store.get(closes.key_for("c")) is None
    assert db.rows() == []


async def test_async_a_body_that_closes_the_connection_releases_the_key(db: Db) -> None:
    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, lease=30, backend=db.store, transactional=True, name=f"{db.prefix}.c")
    async def closes(key: str) -> str:
        conn = idempotask.transaction()
        await conn.execute(insert(rows).values(key=key, writer="closes"))
        await conn.close()
        return key

    with pytest.raises(idempotask.BackendError, match="closed"):
        await closes("c")
    assert await db.store.aget(closes.key_for("c")) is None
    assert db.rows() == []
    await db.store.aclose()


@pytest.fixture
def mariadb_pool_of_two() -> Iterator[Db]:
    yield from _make_db(service_url("mysql"), engine_options={"pool_size": 2, "max_overflow": 0})


def _session_bounds(engine: Engine) -> set[tuple[int, int]]:
    """The session timeouts of every connection of ``engine``'s pool of two."""
    with engine.connect() as one, engine.connect() as two:
        sql = text("SELECT @@SESSION.idle_transaction_timeout, @@SESSION.innodb_lock_wait_timeout")
        return {tuple(conn.execute(sql).one()) for conn in (one, two)}  # type: ignore[misc]


def test_mariadb_session_bounds_do_not_outlive_the_call(mariadb_pool_of_two: Db) -> None:
    """MariaDB's bounds are session variables: after the call its connection goes back to
    the pool with its own values, so a later transaction on it (the application's, on an
    engine it shares with the store) is not ended after one lease of idleness."""
    db = mariadb_pool_of_two
    engine = db.store.database.sync_engine()
    before = _session_bounds(engine)
    writer = _writer(db, name="bounds", lease=2)
    assert writer("b") == "wrote b"
    with pytest.raises(ValueError):
        _writer(db, name="bounds-fail", lease=2, fail=True)("c")
    assert _session_bounds(engine) == before
    with engine.begin() as conn:
        conn.execute(text("SELECT 1"))
        time.sleep(3.0)  # idle in a transaction for longer than the call's lease
        assert conn.execute(text("SELECT 2")).scalar_one() == 2


async def test_async_mariadb_session_bounds_do_not_outlive_the_call(
    mariadb_pool_of_two: Db,
) -> None:
    db = mariadb_pool_of_two
    rows = workers.rows_table(db.prefix)
    engine = await db.store.database.async_engine()
    sql = text("SELECT @@SESSION.idle_transaction_timeout, @@SESSION.innodb_lock_wait_timeout")

    async def bounds() -> set[tuple[int, int]]:
        async with engine.connect() as one, engine.connect() as two:
            return {tuple((await conn.execute(sql)).one()) for conn in (one, two)}  # type: ignore[misc]

    before = await bounds()

    @idempotent(ttl=600, lease=2, backend=db.store, transactional=True, name=f"{db.prefix}.ab")
    async def awrite(key: str) -> str:
        await idempotask.transaction().execute(insert(rows).values(key=key, writer="async"))
        return key

    assert await awrite("b") == "b"
    assert await bounds() == before
    await db.store.aclose()


# -- a paused server -------------------------------------------------------------------------


def _pause_own_backend(conn: Any, pid: int, resume_after: float) -> threading.Timer:
    """SIGSTOP the PostgreSQL backend process ``pid`` serving the body's connection, and
    SIGCONT it after ``resume_after`` seconds (the test needs to run as the server's user
    or root)."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except PermissionError:
        pytest.skip("cannot signal the PostgreSQL server's processes")
    timer = threading.Timer(resume_after, os.kill, (pid, signal.SIGCONT))
    timer.start()
    return timer


def test_a_paused_server_ends_the_call_within_the_statement_bound(postgres_1s: Db) -> None:
    """PostgreSQL paused (its backend SIGSTOPped) after the body's last statement: the
    result's compare-and-set and the commit are bounded like every store statement, so
    the call raises BackendError within statement_timeout plus its grace, not when the
    server wakes up; nothing is kept."""
    db = postgres_1s
    rows = workers.rows_table(db.prefix)
    timers: list[threading.Timer] = []

    @idempotent(ttl=600, lease=30, backend=db.store, transactional=True, name=f"{db.prefix}.p")
    def paused(key: str) -> str:
        conn = idempotask.transaction()
        conn.execute(insert(rows).values(key=key, writer="paused"))
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        timers.append(_pause_own_backend(conn, pid, 10.0))
        return key

    started = time.monotonic()
    try:
        with pytest.raises(idempotask.BackendError, match="no answer within"):
            paused("s")
        assert time.monotonic() - started < 6.0
    finally:
        for timer in timers:
            timer.join()
    time.sleep(0.5)
    assert db.rows() == []


async def test_async_a_paused_server_ends_the_call_within_the_statement_bound(
    postgres_1s: Db,
) -> None:
    db = postgres_1s
    rows = workers.rows_table(db.prefix)
    timers: list[threading.Timer] = []

    @idempotent(ttl=600, lease=30, backend=db.store, transactional=True, name=f"{db.prefix}.a")
    async def paused(key: str) -> str:
        conn = idempotask.transaction()
        await conn.execute(insert(rows).values(key=key, writer="paused"))
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        timers.append(_pause_own_backend(conn, pid, 10.0))
        return key

    started = time.monotonic()
    try:
        with pytest.raises(idempotask.BackendError, match="no answer within"):
            await paused("s")
        assert time.monotonic() - started < 6.0
    finally:
        for timer in timers:
            await asyncio.to_thread(timer.join)
    await asyncio.sleep(0.5)
    assert db.rows() == []
    await db.store.aclose()


async def test_async_a_hung_mariadb_ends_the_call_within_the_statement_bound() -> None:
    """MariaDB stops answering (a blackholing proxy) after the body's last statement: on
    an asyncio driver with no timeout of its own (asyncmy, aiomysql) the result's
    compare-and-set is bounded by asyncio.timeout as every store operation is, so the
    call raises BackendError instead of hanging."""
    from urllib.parse import urlsplit

    from tests.faults._proxy import DelayProxy

    url = urlsplit(service_url("mysql"))
    if url.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the fault proxy only forwards to 127.0.0.1")
    proxy = DelayProxy("127.0.0.1", url.port or 3306).start()
    try:
        user = url.netloc.rpartition("@")[0]
        proxied = url._replace(netloc=f"{user}@127.0.0.1:{proxy.port}").geturl()
        for db in _make_db(proxied, statement_timeout=1):

            @idempotent(ttl=600, lease=30, backend=db.store, transactional=True, name=db.prefix)
            async def hung(key: str) -> str:
                await idempotask.transaction().execute(text("SELECT 1"))
                proxy.blackhole = True
                return key

            started = time.monotonic()
            try:
                with pytest.raises(idempotask.BackendError, match="no answer within"):
                    await asyncio.wait_for(hung("h"), 20)
                assert time.monotonic() - started < 10.0
            finally:
                proxy.blackhole = False
            await db.store.aclose()
    finally:
        proxy.stop()


# -- asyncio -------------------------------------------------------------------------------------


async def test_async_writes_commit_together_and_roll_back_together(db: Db) -> None:
    """An async body writes through an AsyncConnection (and an AsyncSession on it)."""
    rows = workers.rows_table(db.prefix)
    runs: list[str] = []

    @idempotent(ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.async")
    async def awrite(key: str, fail: bool) -> str:
        runs.append(key)
        async with AsyncSession(bind=idempotask.transaction()) as session:
            await session.execute(insert(rows).values(key=key, writer="async"))
            await session.commit()
        if fail:
            raise ValueError("async failure")
        return key

    assert await awrite("j", False) == "j"
    assert await awrite("j", False) == "j"
    with pytest.raises(ValueError):
        await awrite("k", True)
    assert runs == ["j", "k"]
    assert db.rows() == [("j", "async")]
    assert db.store.get(awrite.key_for("k", True)) is None
    await db.store.aclose()


async def test_async_late_owner_is_rolled_back_whole(db: Db) -> None:
    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.alate")
    async def alate(key: str) -> str:
        await idempotask.transaction().execute(insert(rows).values(key=key, writer="late"))
        store_key = alate.key_for(key)
        assert db.store.expire_now(store_key)
        assert (await db.store.aclaim(store_key, "new", lease=60)).held_by("new")
        return key

    with pytest.raises(LeaseLostError):
        await alate("l")
    assert db.rows() == []
    await db.store.aclose()


async def test_async_cancellation_mid_body_rolls_back_and_releases(db: Db) -> None:
    """A caller cancelled while its body awaits, after writing: no row, the key free."""
    rows = workers.rows_table(db.prefix)
    wrote = asyncio.Event()

    @idempotent(ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.cancel")
    async def slow(key: str) -> str:
        await idempotask.transaction().execute(insert(rows).values(key=key, writer="cancel"))
        wrote.set()
        await asyncio.sleep(30)
        return key

    task = asyncio.ensure_future(slow("m"))
    await asyncio.wait_for(wrote.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert db.rows() == []
    assert await db.store.aget(slow.key_for("m")) is None
    await db.store.aclose()


async def test_async_cancellation_anywhere_never_leaves_half_a_state(db: Db) -> None:
    """Cancelled at points spread over a whole call (claim, begin, body, complete,
    commit): each time, either the row and the COMPLETED record are both there, or
    neither is and the key is free."""
    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.points")
    async def point(key: str) -> str:
        await idempotask.transaction().execute(insert(rows).values(key=key, writer="p"))
        return key

    await point("warm-up")  # engines and pools made, statements compiled
    started = time.perf_counter()
    await point("measured")
    whole = time.perf_counter() - started
    outcomes: Counter[str] = Counter()
    for step in range(40):
        key = f"p{step}"
        task = asyncio.ensure_future(point(key))
        await asyncio.sleep(whole * 1.2 * step / 40)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        record = await db.store.aget(point.key_for(key))
        written = [r for r in db.rows() if r[0] == key]
        if record is not None and record.state is State.COMPLETED:
            assert written == [(key, "p")], step
            outcomes["committed"] += 1
        else:
            assert record is None, (step, record)
            assert written == [], step
            outcomes["rolled back"] += 1
    print(f"cancelled over a {whole * 1000:.1f} ms call: {dict(outcomes)}")
    await db.store.aclose()


# -- real processes ------------------------------------------------------------------------------


def _start_owner(db: Db, n: int, signal_file: Path, sleep: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(WORKERS),
            "owner",
            db.url,
            db.prefix,
            str(n),
            str(signal_file),
            str(sleep),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(WORKERS.parent.parent)},
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the owner exited early: {proc.stdout and proc.stdout.read()}"
        assert time.monotonic() < end, "the owner never wrote its row"
        time.sleep(0.01)


def test_sigkill_between_the_write_and_the_commit(db: Db, tmp_path: Path) -> None:
    """An owner killed after its body wrote, before the commit: its row is gone, the call
    runs once more after the lease, and exactly one row stands after it."""
    signal_file = tmp_path / "wrote"
    proc = _start_owner(db, 1, signal_file, 60)
    try:
        _wait_for(signal_file, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert db.rows() == []  # the killed owner's write was never committed
    owner = workers.make_owner(db.store, db.prefix, "rerun", None, 0)
    assert db.store.get(owner.key_for(1)) is not None  # the dead owner's claim, until its lease
    assert owner(1) == "rerun"  # waits out the lease, takes over, runs once
    assert owner(1) == "rerun"
    assert db.rows() == [("1", "rerun")]
    assert db.unique_rows() == [(1, "rerun")]


def test_sigstop_past_the_lease_then_sigcont(db: Db, tmp_path: Path) -> None:
    """An owner paused after writing, past its lease: a new owner takes over, its write of
    the same row waits at most until the server ends the paused transaction (idle for a
    lease), and commits; resumed, the late owner's transaction is rolled back whole
    (LeaseLostError) and the new owner's rows and result stand."""
    signal_file = tmp_path / "wrote"
    proc = _start_owner(db, 2, signal_file, 0.5)
    try:
        _wait_for(signal_file, proc)
        proc.send_signal(signal.SIGSTOP)
        owner = workers.make_owner(db.store, db.prefix, "new", None, 0)
        answers: list[Any] = []
        started = time.monotonic()
        thread = threading.Thread(target=lambda: answers.append(owner(2)), daemon=True)
        thread.start()
        # Liveness, not a timing claim: with no bound the new owner would wait for ever.
        thread.join(60)
        waited = time.monotonic() - started
        assert answers == ["new"], "the new owner did not finish while the old one was paused"
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.communicate()
    assert out.strip() == "LeaseLostError", out
    assert db.rows() == [("2", "new")]
    assert db.unique_rows() == [(2, "new")]
    record = db.store.get(owner.key_for(2))
    assert record is not None
    assert record.state is State.COMPLETED
    print(f"new owner's call took {waited:.2f}s with lease {workers.LEASE}s")


def test_eight_processes_two_hundred_keys_three_duplicates(db: Db) -> None:
    """8 processes call 200 keys 3 times each in their own random orders: each key's body
    commits exactly once (200 rows), every call answers."""
    keys = [f"k{i}" for i in range(200)]
    # A fork server that has imported the workers' modules once: eight spawned children
    # would each import SQLAlchemy and idempotask again, seconds on a busy machine.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests._transactional_workers"])
    with context.Pool(8) as pool:
        answered = pool.starmap(
            workers.many_worker, [(db.url, db.prefix, keys, 3, seed) for seed in range(8)]
        )
    assert answered == [600] * 8
    rows = db.rows()
    assert len(rows) == 200
    assert Counter(key for key, _ in rows) == Counter({key: 1 for key in keys})


def test_threads_run_each_key_once(db: Db) -> None:
    """8 threads, 50 keys, 3 duplicates each, in one process: 50 rows, each key once."""
    keys = [f"t{i}" for i in range(50)]
    write = _writer(db, name="threads")
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        order = [key for key in keys for _ in range(3)]
        random.Random(seed).shuffle(order)
        try:
            for key in order:
                assert write(key) == f"wrote {key}"
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert Counter(key for key, _ in db.rows()) == Counter({key: 1 for key in keys})


async def test_concurrent_tasks_run_each_key_once(db: Db) -> None:
    """30 keys, 3 duplicates each, as concurrent asyncio tasks: 30 rows, each key once."""
    rows = workers.rows_table(db.prefix)

    @idempotent(ttl=600, backend=db.store, transactional=True, name=f"{db.prefix}.tasks")
    async def awrite(key: str) -> str:
        await idempotask.transaction().execute(insert(rows).values(key=key, writer="task"))
        return key

    keys = [f"a{i}" for i in range(30)]
    calls = [key for key in keys for _ in range(3)]
    random.Random(1).shuffle(calls)
    assert await asyncio.gather(*(awrite(key) for key in calls)) == calls
    assert Counter(key for key, _ in db.rows()) == Counter({key: 1 for key in keys})
    await db.store.aclose()


# -- stores that cannot, options -----------------------------------------------------------------


def test_a_store_without_transactions_is_refused_when_decorating() -> None:
    with pytest.raises(ConfigurationError, match=r"MemoryBackend.*cannot"):

        @idempotent(backend=MemoryBackend(), transactional=True)
        def f() -> None: ...


@pytest.mark.parametrize(
    ("url", "store"),
    [
        ("redis://127.0.0.1:6379/0", "RedisBackend"),
        (fallback_url("redis://127.0.0.1:6379/0", "sqlite:///:memory:"), "FallbackBackend"),
    ],
)
def test_redis_and_fallback_stores_are_refused(url: str, store: str) -> None:
    """Stores given by URL are resolved at the first call, refused before anything runs
    (and before any connection is made)."""

    @idempotent(backend=url, transactional=True, name=f"tx.{store}")
    def f() -> int:
        raise AssertionError("the body must not run")

    with pytest.raises(ConfigurationError, match=store):
        f()


def test_a_configured_store_without_transactions_is_refused_at_the_first_call() -> None:
    """The configured store (memory:// here) is known at call time: the call raises
    before claiming or running anything."""
    ran: list[int] = []

    @idempotent(transactional=True, name="tx.configured")
    def f(n: int) -> int:
        ran.append(n)
        return n

    with pytest.raises(ConfigurationError, match="MemoryBackend"):
        f(1)
    assert ran == []
    assert idempotask.get_backend().get(f.key_for(1)) is None


def test_transaction_outside_a_transactional_body_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="only available inside"):
        idempotask.transaction()

    @idempotent(name="tx.plain")
    def plain() -> None:
        idempotask.transaction()

    with pytest.raises(ConfigurationError, match="only available inside"):
        plain()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"transactional": "yes"}, "expected True or False"),
        ({"transactional": True, "on_backend_error": "open"}, "on_backend_error='open'"),
        ({"transactional": True, "previous_names": ("old.name",)}, "previous_names"),
    ],
)
def test_bad_transactional_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        idempotent(name="tx.bad", **options)(lambda: None)


# -- SQLite ----------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="idempotask-tx-") as folder:
        yield Path(folder) / "app.db"


def _sqlite_db(path: Path, **options: Any) -> Db:
    url = f"sqlite:///{path}"
    prefix = f"tx{uuid.uuid4().hex[:10]}"
    store = SQLAlchemyBackend(url, table_name=f"{prefix}_records", **options)
    store.create_tables()
    engine = create_engine(url)
    for table in (workers.rows_table(prefix), workers.unique_table(prefix)):
        table.create(engine)
    return Db(url, prefix, store, engine)


def test_sqlite_refuses_transactional_calls_unless_asked(sqlite_path: Path) -> None:
    """By default a SQLite store refuses (naming sqlite_transactions=True), before the
    body runs, and gives its claim back."""
    db = _sqlite_db(sqlite_path)
    write = _writer(db, name="sqlite")
    with pytest.raises(ConfigurationError, match="sqlite_transactions=True"):
        write("n")
    assert write.runs == []
    assert db.store.get(write.key_for("n")) is None
    db.store.close()
    db.engine.dispose()


def test_sqlite_transactions_when_asked(sqlite_path: Path) -> None:
    """With sqlite_transactions=True: commit together, roll back together (one process)."""
    db = _sqlite_db(sqlite_path, sqlite_transactions=True)
    write, fail = _writer(db, name="ok"), _writer(db, name="bad", fail=True)
    assert write("o") == write("o") == "wrote o"
    with pytest.raises(ValueError):
        fail("p")
    assert db.rows() == [("o", "body")]
    assert write.runs == ["o"]
    assert db.store.get(fail.key_for("p")) is None
    db.store.close()
    db.engine.dispose()


def test_sqlite_in_memory_is_always_refused() -> None:
    store = SQLAlchemyBackend("sqlite:///:memory:", sqlite_transactions=True)
    store.create_tables()

    @idempotent(backend=store, transactional=True, name="tx.memory")
    def f() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="in-memory SQLite"):
        f()


async def test_sqlite_async_needs_an_async_engine(sqlite_path: Path) -> None:
    """Async on a SQLite file: refused without an AsyncEngine, works with aiosqlite's."""
    db = _sqlite_db(sqlite_path, sqlite_transactions=True)
    rows = workers.rows_table(db.prefix)

    @idempotent(backend=db.store, transactional=True, name=f"{db.prefix}.nosync")
    async def refused() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="AsyncEngine"):
        await refused()

    engine = create_async_engine(f"sqlite+aiosqlite:///{sqlite_path}")
    store = SQLAlchemyBackend(
        async_engine=engine, table_name=f"{db.prefix}_records", sqlite_transactions=True
    )

    @idempotent(backend=store, transactional=True, name=f"{db.prefix}.aio")
    async def awrite(key: str) -> str:
        await idempotask.transaction().execute(insert(rows).values(key=key, writer="aio"))
        return key

    assert await awrite("q") == await awrite("q") == "q"
    assert db.rows() == [("q", "aio")]
    await engine.dispose()
    db.store.close()
    db.engine.dispose()


def test_sqlite_store_option_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="sqlite_transactions"):
        SQLAlchemyBackend("sqlite:///:memory:", sqlite_transactions="yes")  # type: ignore[arg-type]


def test_row_count_helper_counts(db: Db) -> None:
    """The helpers the tests above rely on see rows written outside any call."""
    with db.engine.connect() as conn:
        conn.execute(insert(workers.rows_table(db.prefix)).values(key="z", writer="w"))
        total = conn.execute(select(func.count()).select_from(workers.rows_table(db.prefix)))
        assert total.scalar() == 1
    assert db.rows() == [("z", "w")]


class _PlainJSON:
    """A third-party serializer raising json's own TypeError, not SerializationError."""

    def dumps(self, value: object) -> bytes:
        return json.dumps(value).encode()

    def loads(self, data: bytes) -> object:
        return json.loads(data)


def test_a_third_party_serializers_own_error_rolls_back_and_releases(db: Db) -> None:
    """json.dumps's TypeError for a result: the transaction is rolled back (the body's
    row with it) and the key released at once, as for a SerializationError."""
    rows = workers.rows_table(db.prefix)

    @idempotent(
        backend=db.store,
        transactional=True,
        name=f"{db.prefix}.plainjson",
        serializer=_PlainJSON(),
        on_conflict="raise",
    )
    def write(key: str) -> object:
        idempotask.transaction().execute(insert(rows).values(key=key, writer="body"))
        return {"at": datetime.date(2026, 1, 2)}

    for _ in range(2):
        with pytest.raises(SerializationError, match="rolled back"):
            write("s")
    assert db.rows() == []
    assert db.store.get(write.key_for("s")) is None

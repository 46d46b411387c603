"""SQL stores keep a few connections of the engines they made out of the pool between
operations (``_stash``), and the pool stays in charge: sizes, pre-ping, recycling within
a second, invalidation, ``close()``, event loops, fork and interpreter exit."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, make_url, text

from idempotask.backends.sql import SQLAlchemyBackend, _stash
from idempotask.backends.sql._engines import sync_url
from idempotask.errors import BackendError

from ._modes import caller, stash_of

try:  # tests/conftest.py: the URL of a service, or skip (fail in CI) when it is down
    from tests.conftest import service_url
except ImportError:  # tests/ is not a package: pytest imported it as top-level "conftest"
    from conftest import service_url  # type: ignore[no-redef]

RUN = uuid.uuid4().hex[:10]
TABLE = f"idem_stash_{RUN}"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('stash') / 'store.db'}"


def url_for(name: str, sqlite_url: str) -> str:
    return sqlite_url if name == "sqlite" else service_url("mysql" if name == "mariadb" else name)


# One store per database, made to create this module's table there and drop it at the end.
_tables: dict[str, SQLAlchemyBackend] = {}


@pytest.fixture(scope="module", autouse=True)
def _drop_tables_at_the_end() -> Iterator[None]:
    yield
    for store in _tables.values():
        try:
            store.drop_tables()
        finally:
            store.close()
    _tables.clear()


def backend(url: str, **options: Any) -> SQLAlchemyBackend:
    """A new store on ``url`` with this module's table (created once per database)."""
    if url not in _tables:
        _tables[url] = SQLAlchemyBackend(url, table_name=TABLE)
        _tables[url].create_tables()
    return SQLAlchemyBackend(url, table_name=TABLE, **options)


class PoolLog:
    """Checkouts and checkins on an engine's pool."""

    def __init__(self, engine: Any) -> None:
        self.checkouts = self.checkins = 0
        event.listen(engine, "checkout", self._checkout)
        event.listen(engine, "checkin", self._checkin)

    def _checkout(self, *args: Any) -> None:
        self.checkouts += 1

    def _checkin(self, *args: Any) -> None:
        self.checkins += 1


def key() -> str:
    return f"stash:k:1:{uuid.uuid4().hex}"


@pytest.mark.parametrize("name", ["postgres", "sqlite", "mariadb"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_back_to_back_operations_take_one_connection_from_the_pool(
    sqlite_url: str, name: str, mode: str
) -> None:
    """On an engine the store made, a claim, its complete and the calls after them run on
    the connection the first one checked out: the pool sees one checkout, not one per
    operation, and that one connection is out of the pool."""
    store = backend(url_for(name, sqlite_url))

    async def scenario() -> None:
        assert await store.aget(key()) is None if mode == "async" else store.get(key()) is None
        engine = (
            (await store._async_engine()).sync_engine if mode == "async" else store._sync_engine()
        )
        log = PoolLog(engine)
        for _ in range(10):
            k, t = key(), uuid.uuid4().hex
            if mode == "sync":
                assert store.claim(k, t, lease=60).held_by(t)
                assert store.complete(k, t, b"r", ttl=60)
            else:
                assert (await store.aclaim(k, t, lease=60)).held_by(t)
                assert await store.acomplete(k, t, b"r", ttl=60)
        assert (log.checkouts, log.checkins) == (0, 0)
        assert engine.pool.checkedout() == 1
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        store.close()


def test_an_engine_you_pass_is_checked_out_and_returned_per_operation() -> None:
    """An engine you pass may be shared with your code: each operation checks a connection
    out and returns it, as its pool is configured."""
    url = service_url("postgres")
    backend(url).close()  # the table
    engine = create_engine(sync_url(make_url(url)))
    store = SQLAlchemyBackend(engine, table_name=TABLE)
    log = PoolLog(engine)
    try:
        for _ in range(5):
            assert store.get(key()) is None
        assert (log.checkouts, log.checkins) == (5, 5)
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "options", [{"pool_pre_ping": True}, {"pool_size": 1, "max_overflow": 0}], ids=str
)
def test_pre_ping_or_a_pool_of_one_keeps_no_connection_out(
    options: dict[str, Any],
) -> None:
    """With ``pool_pre_ping`` each operation checks out (and is pinged), and a pool of one
    connection is never emptied into the stash: the engine's own ``connect()`` gets it."""
    store = backend(service_url("postgres"), engine_options=options)
    try:
        assert store.get(key()) is None
        engine = store._sync_engine()
        log = PoolLog(engine)
        for _ in range(3):
            assert store.get(key()) is None
        assert log.checkouts == 3
        assert engine.pool.checkedout() == 0
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        store.close()


def test_a_connection_goes_back_through_the_pool_a_second_after_it_came_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kept connection is returned to the pool (so pool_recycle, pre-ping and
    invalidation apply) once it has been out for MAX_AGE; the oldest one waiting is
    returned by the next operation, even when nobody takes it."""
    now = [1000.0]
    monkeypatch.setattr(_stash, "monotonic", lambda: now[0])
    store = backend(service_url("postgres"))
    try:
        engine = store._sync_engine()
        log = PoolLog(engine)
        assert store.get(key()) is None
        now[0] += _stash.MAX_AGE / 2
        assert store.get(key()) is None
        assert (log.checkouts, log.checkins) == (1, 0)
        now[0] += _stash.MAX_AGE / 2
        assert store.get(key()) is None  # due: returned, and another checked out
        assert (log.checkouts, log.checkins) == (2, 1)

        # Two threads at once leave two connections waiting; a single caller after the
        # age returns the one it does not use. Each waits for the other once it holds a
        # connection, so both surely hold their own: merely started together, one could
        # finish before the other began, and both would use one connection.
        inside = threading.Barrier(2, timeout=10)
        take = _stash.Stash.take

        def take_and_meet(self: _stash.Stash) -> Any:
            entry = take(self)
            inside.wait()
            return entry

        def call() -> None:
            assert store.get(key()) is None

        with engine.connect():  # the pool's idle connection is busy: the threads take two
            monkeypatch.setattr(_stash.Stash, "take", take_and_meet)
            threads = [threading.Thread(target=call) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            monkeypatch.setattr(_stash.Stash, "take", take)
        assert not inside.broken
        assert engine.pool.checkedout() == 2
        now[0] += _stash.MAX_AGE
        assert store.get(key()) is None
        assert engine.pool.checkedout() == 1
    finally:
        store.close()


def _session_ids(store: SQLAlchemyBackend, stash: _stash.Stash) -> list[int]:
    """The server's ids of the connections waiting in ``stash``."""
    ids = []
    for execute, _, _ in list(stash._idle):
        driver = execute.connection.connection.driver_connection
        info = getattr(driver, "info", None)
        ids.append(int(info.backend_pid) if info is not None else int(driver.thread_id()))
    return ids


def _end_sessions(url: str, ids: list[int]) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for session in ids:
                if engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_terminate_backend(:p, 5000)"), {"p": session})
                else:
                    conn.exec_driver_sql(f"KILL {int(session)}")
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("name", "mode"), [("postgres", "sync"), ("postgres", "async"), ("mariadb", "sync")]
)
def test_a_kept_connection_the_server_ended_fails_one_call_and_the_next_reconnects(
    name: str, mode: str
) -> None:
    """The server ends the connections waiting in the stash: the next call fails with
    BackendError (as it would on a pooled connection), the stash is emptied, and the
    calls after it run on new connections."""
    url = service_url("mysql" if name == "mariadb" else name)
    store = backend(url)
    k, t = key(), uuid.uuid4().hex

    call = caller(store, mode)

    async def scenario() -> None:
        assert await call("get", k) is None
        kept = await stash_of(store, mode)
        ended = _session_ids(store, kept)
        assert len(ended) == 1
        _end_sessions(url, ended)
        with pytest.raises(BackendError, match=f"claim {k!r} failed on "):
            await call("claim", k, t, lease=60)
        assert len(kept) == 0
        assert (await call("claim", k, t, lease=60)).held_by(t)
        assert await call("complete", k, t, b"r", ttl=60)
        assert _session_ids(store, kept) not in ([], ended)
        await call("delete", k)
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        store.close()


def test_close_returns_the_kept_connections() -> None:
    """After calls from several threads, ``close()`` leaves no connection open."""
    application = f"idem-stash-{RUN}"
    options = {"connect_args": {"application_name": application}}
    store = backend(service_url("postgres"), engine_options=options)

    def open_sessions() -> int:
        engine = create_engine(service_url("postgres"))
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

    threads = [threading.Thread(target=lambda: store.get(key())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert open_sessions() >= 1
    store.close()
    assert open_sessions() == 0


def test_a_listener_added_later_sees_the_statements_of_kept_connections() -> None:
    """A statement listener added after connections were kept still sees every statement
    (each operation looks again), and such connections go back to the pool."""
    store = backend(service_url("postgres"))
    try:
        assert store.get(key()) is None
        engine = store._sync_engine()
        seen: list[str] = []

        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            seen.append(statement)

        event.listen(engine, "before_cursor_execute", record)
        try:
            k, t = key(), uuid.uuid4().hex
            assert store.claim(k, t, lease=60).held_by(t)
            assert store.complete(k, t, b"r", ttl=60)
            assert len(seen) == 2
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert store.delete(k)
    finally:
        store.close()


_FORK_SCRIPT = """
import asyncio, os, sys, uuid
from idempotask.backends.sql import SQLAlchemyBackend
store = SQLAlchemyBackend(sys.argv[1], table_name=sys.argv[2])

loop = asyncio.new_event_loop()  # never shut down: its stash is left to the exit hook
k = "fork:" + uuid.uuid4().hex
assert store.claim(k, "parent", lease=60).held_by("parent")
assert loop.run_until_complete(store.aget(k)).token == "parent"
pid = os.fork()
if pid == 0:
    if sys.argv[3] == "use":  # the child's own connections
        assert store.get(k).token == "parent"
        assert loop.run_until_complete(store.aget(k)).token == "parent"
    sys.exit(0)  # a normal exit: exit hooks and finalizers run in the child
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
# The parent's connections (kept ones included) still work.
assert store.complete(k, "parent", b"c", ttl=60)
assert loop.run_until_complete(store.aget(k)).payload == b"c"
assert store.delete(k)
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("child", ["idle", "use"])
def test_a_forked_child_exiting_normally_leaves_the_parents_connections_working(
    child: str,
) -> None:
    """Before fork the kept sync connections go back to the pool; a child that exits
    normally (exit hooks and finalizers run), whether it used the store or not, ends none
    of the parent's sessions and warns about none of its connections, and an event loop
    never shut down warns about none at exit either."""
    url = service_url("postgres")
    backend(url)  # the table
    result = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, url, TABLE, child],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout
    assert "SAWarning" not in result.stderr, result.stderr


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_statement_the_server_cancels_on_a_kept_connection_fails_once_and_keeps_it(
    mode: str,
) -> None:
    """A complete waiting on a row lock is cancelled by the server (statement_timeout):
    BackendError, and the connection (clean: the server cancelled the statement) goes
    back to the pool and serves the next calls; nothing is left in a transaction."""
    url = service_url("postgres")
    store = backend(url, statement_timeout=0.5)
    locker = create_engine(url)
    k, t = key(), uuid.uuid4().hex

    call = caller(store, mode)

    async def scenario() -> None:
        assert (await call("claim", k, t, lease=60)).held_by(t)
        before = _session_ids(store, await stash_of(store, mode))
        with locker.begin() as conn:
            conn.execute(text(f"SELECT 1 FROM {TABLE} WHERE key = :k FOR UPDATE"), {"k": k})
            with pytest.raises(BackendError, match="canceling statement due to statement"):
                await call("complete", k, t, b"r", ttl=60)
        assert len(await stash_of(store, mode)) == 0
        assert await call("complete", k, t, b"r", ttl=60)
        assert _session_ids(store, await stash_of(store, mode)) == before
        assert await call("delete", k)
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        store.close()
        locker.dispose()


def test_an_async_call_cancelled_on_a_kept_connection_discards_it() -> None:
    """An async complete on a kept connection, cancelled while it waits for a row lock:
    the connection, still busy with the statement, is discarded (neither kept nor
    pooled), and the calls after it see a consistent record."""
    url = service_url("postgres")
    store = backend(url)
    locker = create_engine(url)
    k, t = key(), uuid.uuid4().hex

    async def scenario() -> None:
        assert (await store.aclaim(k, t, lease=60)).held_by(t)
        kept = (await store.database._async_stash()).stash
        busy = _session_ids(store, kept)
        with locker.begin() as conn:
            conn.execute(text(f"SELECT 1 FROM {TABLE} WHERE key = :k FOR UPDATE"), {"k": k})
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(store.acomplete(k, t, b"late", ttl=60), 0.3)
            assert len(kept) == 0
        for _ in range(3):
            record = await store.aget(k)
            assert record is not None
            assert record.token == t
        assert _session_ids(store, kept) != busy
        assert await store.acomplete(k, t, b"r", ttl=60)  # stored, or already
        assert await store.adelete(k)
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        store.close()
        locker.dispose()


def test_a_caller_waiting_for_the_pool_gets_the_next_connection_that_finishes() -> None:
    """Every connection of the pool is out and a caller waits in the pool (it found the
    stash empty): the next operation to finish returns its connection to the pool rather
    than keeping it in the stash, so that caller goes on while the others still wait."""
    url = service_url("postgres")
    options = {"pool_size": 2, "max_overflow": 0, "pool_timeout": 5}
    # No statement timeout: the completes wait for their locks until they are released.
    store = backend(url, engine_options=options, statement_timeout=None)
    locker = create_engine(url, isolation_level="AUTOCOMMIT")
    first, second = key(), key()
    for k in (first, second):
        assert store.claim(k, "t", lease=60).held_by("t")
    engine = store._sync_engine()
    locks = [locker.connect(), locker.connect()]
    try:
        for conn, k in zip(locks, (first, second), strict=True):
            conn.exec_driver_sql("BEGIN")
            conn.execute(text(f"SELECT 1 FROM {TABLE} WHERE key = :k FOR UPDATE"), {"k": k})
        # Two completes wait for the row locks, each on one of the pool's two connections.
        blocked = [
            threading.Thread(target=store.complete, args=(k, "t", b"r"), kwargs={"ttl": 60})
            for k in (first, second)
        ]
        for thread in blocked:
            thread.start()
        while engine.pool.checkedout() < 2:
            time.sleep(0.01)
        first_still_waiting: list[bool] = []

        def waiter() -> None:
            assert store.get(first) is not None
            first_still_waiting.append(blocked[0].is_alive())

        waiting = threading.Thread(target=waiter)
        waiting.start()
        time.sleep(0.2)  # the waiter is in the pool's queue now
        assert not first_still_waiting
        locks[1].exec_driver_sql("COMMIT")  # the second complete finishes
        waiting.join(15)
        # The waiter got the second complete's connection: it did not wait until the pool's
        # timeout (5 s, then it fails) or the first complete gave its connection up.
        assert first_still_waiting == [True]
        locks[0].exec_driver_sql("COMMIT")
        for thread in blocked:
            thread.join(30)
    finally:
        for conn in locks:
            conn.close()
        locker.dispose()
        for k in (first, second):
            store.delete(k)
        store.close()

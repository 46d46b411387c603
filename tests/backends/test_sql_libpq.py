"""PostgreSQL through psycopg's libpq wrapper (``idempotask.backends.sql._libpq``).

The stores send their statements on psycopg connections with ``psycopg.pq`` instead of a
cursor. These tests pin down what that path must keep from psycopg's own behaviour:
statements prepared once per connection and prepared again when deallocated, none
prepared under ``prepare_threshold=None``, a tracing cursor factory or subclassed
connection still sees every statement, payloads larger than the socket's buffers go
both ways, and errors arrive as the backend's errors with the connection still usable.
On a connection kept between operations, where a claim or complete runs its first
statement without a plan, the round trips and answers are the documented ones.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import create_async_engine

from idempotask.backends.base import Record, State
from idempotask.backends.sql import SQLAlchemyBackend
from idempotask.errors import BackendError

try:  # tests/conftest.py: the URL of a service, or skip (fail in CI) when it is down
    from tests.conftest import service_url
except ImportError:  # tests/ is not a package: pytest imported it as top-level "conftest"
    from conftest import service_url  # type: ignore[no-redef]

from ._modes import caller, pg_trace

psycopg = pytest.importorskip("psycopg")

TABLE = f"idem_pq_{uuid.uuid4().hex[:10]}"


def _key() -> str:
    return f"pq:{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    url = service_url("postgres")
    store = SQLAlchemyBackend(url, table_name=TABLE)
    store.create_tables()
    try:
        yield url
    finally:
        store.drop_tables()
        store.close()


def _prepared(engine: Engine) -> list[tuple[str, str]]:
    """(name, statement) of what is prepared on the engine's only pooled connection."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT name, statement FROM pg_prepared_statements"))
        return [(row[0], row[1]) for row in rows]


def _ours(prepared: list[tuple[str, str]]) -> list[str]:
    return [statement for name, statement in prepared if name.startswith("idempotask_")]


def test_statements_are_prepared_once_per_connection_and_again_after_deallocate(
    url: str,
) -> None:
    engine = create_engine(url, pool_size=1, max_overflow=0)
    store = SQLAlchemyBackend(engine=engine, table_name=TABLE)
    try:
        for _ in range(6):
            store.claim(_key(), "t", lease=30)
        claims = [s for s in _ours(_prepared(engine)) if s.startswith("WITH ins AS")]
        assert len(claims) == 1, _prepared(engine)
        # Someone else's DISCARD ALL or DEALLOCATE ALL on the connection (a pool's reset,
        # a migration tool): the next claim still succeeds, and is prepared again.
        with engine.connect() as conn:
            conn.execute(text("DEALLOCATE ALL"))
        assert not _ours(_prepared(engine))
        key = _key()
        assert store.claim(key, "t1", lease=30).held_by("t1")
        assert store.complete(key, "t1", b"done", ttl=60)
        record = store.get(key)
        assert record is not None
        assert record.payload == b"done"
        for _ in range(6):
            store.claim(_key(), "t", lease=30)
        claims = [s for s in _ours(_prepared(engine)) if s.startswith("WITH ins AS")]
        assert len(claims) == 1
    finally:
        store.close()
        engine.dispose()


def test_the_async_path_prepares_and_recovers_the_same_way(url: str) -> None:
    engine = create_async_engine(url, pool_size=1, max_overflow=0)
    store = SQLAlchemyBackend(async_engine=engine, table_name=TABLE)

    async def prepared() -> list[str]:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT name, statement FROM pg_prepared_statements"))
            return _ours([(row[0], row[1]) for row in rows])

    async def scenario() -> None:
        for _ in range(6):
            await store.aclaim(_key(), "t", lease=30)
        assert any(s.startswith("WITH ins AS") for s in await prepared())
        async with engine.connect() as conn:
            await conn.execute(text("DEALLOCATE ALL"))
        key = _key()
        assert (await store.aclaim(key, "t1", lease=30)).held_by("t1")
        assert await store.acomplete(key, "t1", b"done", ttl=60)
        record = await store.aget(key)
        assert record is not None
        assert record.state is State.COMPLETED
        await store.aclose()
        await engine.dispose()

    asyncio.run(scenario())


def test_prepare_threshold_none_never_prepares(url: str) -> None:
    """PgBouncer in transaction mode needs ``prepare_threshold=None``: nothing prepared."""
    engine = create_engine(
        url, pool_size=1, max_overflow=0, connect_args={"prepare_threshold": None}
    )
    store = SQLAlchemyBackend(engine=engine, table_name=TABLE)
    try:
        for _ in range(8):
            key = _key()
            assert store.claim(key, "t", lease=30).held_by("t")
            assert store.complete(key, "t", b"r", ttl=60)
        assert _prepared(engine) == []
    finally:
        store.close()
        engine.dispose()


class _TracingCursor(psycopg.Cursor):  # type: ignore[misc,name-defined]
    """What a tracing library installs: a cursor factory that sees every statement."""

    seen: ClassVar[list[bytes | str]] = []

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _TracingCursor.seen.append(query)
        return super().execute(query, params, **kwargs)


class _SubclassedConnection(psycopg.Connection):  # type: ignore[misc,name-defined]
    """A connection class of someone's own (instrumentation, a wrapper): it may override
    anything, so its statements go through its cursors."""


def test_a_tracing_cursor_factory_sees_every_statement(url: str) -> None:
    _TracingCursor.seen.clear()
    engine = create_engine(url, connect_args={"cursor_factory": _TracingCursor})
    store = SQLAlchemyBackend(engine=engine, table_name=TABLE)
    try:
        key = _key()
        store.claim(key, "t", lease=30)
        store.complete(key, "t", b"r", ttl=60)
        sent = [q.decode() if isinstance(q, bytes) else q for q in _TracingCursor.seen]
        assert any(q.startswith("WITH ins AS") for q in sent), sent
        assert any(q.startswith("UPDATE") for q in sent), sent
    finally:
        store.close()
        engine.dispose()


def test_a_subclassed_connection_keeps_its_cursors(url: str) -> None:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    engine = create_engine(
        url, pool_size=1, max_overflow=0, creator=lambda: _SubclassedConnection.connect(dsn)
    )
    store = SQLAlchemyBackend(engine=engine, table_name=TABLE)
    try:
        for _ in range(6):
            assert store.claim(_key(), "t", lease=30).held_by("t")
        prepared = _prepared(engine)
        # Prepared by psycopg's cursor (its own names), none by the libpq path.
        assert any(s.startswith("WITH ins AS") for _, s in prepared), prepared
        assert _ours(prepared) == [], prepared
    finally:
        store.close()
        engine.dispose()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_payloads_larger_than_the_socket_buffers_go_both_ways(url: str, mode: str) -> None:
    """A 24 MiB result does not fit the socket's buffers: sending it waits for the socket
    to drain while reading whatever the server says meanwhile."""
    payload = os.urandom(24 * 1024 * 1024)
    store = SQLAlchemyBackend(url, table_name=TABLE)
    key = _key()

    async def scenario() -> None:
        if mode == "sync":
            assert store.claim(key, "t", lease=60).held_by("t")
            assert store.complete(key, "t", payload, ttl=60)
            record = store.get(key)
        else:
            assert (await store.aclaim(key, "t", lease=60)).held_by("t")
            assert await store.acomplete(key, "t", payload, ttl=60)
            record = await store.aget(key)
            await store.aclose()
        assert record is not None
        assert record.payload == payload

    try:
        asyncio.run(scenario())
    finally:
        store.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_server_error_is_a_backend_error_and_the_connection_stays_usable(
    url: str, mode: str
) -> None:
    table = f"idem_pq_gone_{uuid.uuid4().hex[:8]}"
    store = SQLAlchemyBackend(url, table_name=table)
    store.create_tables()

    async def claim(key: str) -> bool:
        if mode == "sync":
            return store.claim(key, "t", lease=30).held_by("t")
        return (await store.aclaim(key, "t", lease=30)).held_by("t")

    async def scenario() -> None:
        for _ in range(6):  # prepared on this connection by now
            assert await claim(_key())
        store.drop_tables()
        key = _key()
        with pytest.raises(BackendError, match="UndefinedTable"):
            await claim(key)
        store.create_tables()
        assert await claim(key)
        await store.aclose()

    try:
        asyncio.run(scenario())
    finally:
        store.drop_tables()
        store.close()


def _held(token: str) -> Callable[[Any], bool]:
    return lambda record: isinstance(record, Record) and record.held_by(token)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_kept_connection_takes_the_documented_round_trips(
    url: str, mode: str, tmp_path: Path
) -> None:
    """On the engines a store makes, one connection is kept between operations, and a
    claim or complete sends its first statement there without a plan: still one round
    trip each, two for a re-take of one's own claim, a repeated or lost complete and a
    takeover of an expired record, every answer as the store protocol gives it, all on
    the one connection."""
    store = SQLAlchemyBackend(url, table_name=TABLE, engine_options={"pool_size": 1})
    call = caller(store, mode)
    trace = tmp_path / "libpq.trace"
    connections: list[Any] = []

    with trace.open("w") as out:

        def traced(dbapi_connection: Any, record: Any) -> None:
            driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
            driver.pgconn.trace(out.fileno())
            driver.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            connections.append(driver)

        async def scenario() -> dict[str, int]:
            if mode == "sync":
                engine = store.database.sync_engine()
            else:
                engine = (await store.database.async_engine()).sync_engine
            event.listen(engine, "connect", traced)
            for _ in range(6):  # connected, and the statements prepared
                await call("claim", _key(), "warm-up", lease=60)
                await call("complete", _key(), "warm-up", b"", ttl=60)
            key = _key()

            def completed(r: Any) -> bool:
                return r.state is State.COMPLETED and r.token == "t1" and r.payload == b"r"

            steps: list[tuple[str, str, tuple[Any, ...], dict[str, Any], Callable[[Any], bool]]]
            steps = [
                ("claim", "claim", (key, "t1"), {"lease": 60}, _held("t1")),
                ("re-take", "claim", (key, "t1"), {"lease": 60}, _held("t1")),
                ("complete", "complete", (key, "t1", b"r"), {"ttl": 600}, lambda ok: ok is True),
                ("duplicate", "claim", (key, "t2"), {"lease": 60}, completed),
                ("complete again", "complete", (key, "t1", b"r"), {"ttl": 600}, lambda ok: ok),
                ("lost complete", "complete", (key, "t2", b"x"), {"ttl": 600}, lambda ok: not ok),
                ("expire", "expire_now", (key,), {}, lambda ok: ok is True),  # sync only
                ("takeover", "claim", (key, "t3"), {"lease": 60}, _held("t3")),
                ("fail", "fail", (key, "t3", b"err"), {"ttl": 60}, lambda ok: ok is True),
            ]
            trips: dict[str, int] = {}
            for label, operation, args, kwargs, check in steps:
                out.flush()
                before = pg_trace(trace)[0]
                if operation == "expire_now":  # a test hook without an async twin
                    answer = store.expire_now(*args)
                else:
                    answer = await call(operation, *args, **kwargs)
                out.flush()
                trips[label] = pg_trace(trace)[0] - before
                assert check(answer), (label, answer)
            record = await call("get", key)
            assert record is not None
            assert (record.state, record.token, record.payload) == (State.FAILED, "t3", b"err")
            if mode == "async":
                await store.aclose()
            return trips

        try:
            trips = asyncio.run(scenario())
        finally:
            store.close()
    expected = {"claim": 1, "complete": 1, "duplicate": 1, "fail": 1}
    expected["expire"] = 1 if mode == "sync" else 0  # async: on the untraced sync engine
    expected |= {"re-take": 2, "complete again": 2, "lost complete": 2, "takeover": 2}
    assert trips == expected
    assert len(connections) == 1  # kept (or returned to the pool and taken again)

"""PostgreSQL connections dropped (``pg_terminate_backend``) while workers keep calling.

The backend's connections carry an ``application_name`` of their own (set through the
URL's query), so the test finds exactly them in ``pg_stat_activity`` and terminates them,
twice, while 4 processes x 4 threads (and, separately, asyncio tasks) call. Executions are
counted in the shared Redis.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask import idempotent
from tests.conftest import service_url
from tests.faults._support import (
    CALL_BOUND,
    FORK,
    CallTracker,
    Hammer,
    Tally,
    Workers,
    assert_clean,
    audit,
    hammer_worker,
    merge,
    unique,
    wait_for,
)

pytest.importorskip("sqlalchemy")
pytest.importorskip("psycopg")
pytest.importorskip("redis")


class PgTarget:
    """A table of our own, and a URL whose connections are recognisable."""

    def __init__(self) -> None:

        base = service_url("postgres")
        self.app = unique("idemfault_")
        self.url = f"{base}{'&' if '?' in base else '?'}application_name={self.app}"
        self.table = f"idem_fault_{uuid.uuid4().hex[:10]}"
        self.admin_url = base
        setup = self._backend(base)
        setup.create_tables()
        setup.close()

    def _backend(self, url: str) -> Any:
        """A backend on this target's tables (records, dead letters, breakers)."""
        from idempotask.backends.sql import SQLAlchemyBackend

        return SQLAlchemyBackend(
            url,
            table_name=self.table,
            dead_letter_table=f"{self.table}_dl",
            breaker_table=f"{self.table}_br",
        )

    def backend(self) -> Any:
        return self._backend(self.url)

    def terminate(self) -> int:
        """Terminate every connection of ours; how many there were."""
        import psycopg

        with psycopg.connect(_libpq(self.admin_url), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (self.app,),
            ).fetchall()
        return sum(1 for (ok,) in rows if ok)

    def connections(self) -> int:
        import psycopg

        with psycopg.connect(_libpq(self.admin_url), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self.app,)
            ).fetchone()
        return int(row[0]) if row else 0

    def drop(self) -> None:
        self.terminate()
        backend = self._backend(self.admin_url)
        backend.drop_tables()
        backend.dead_letter_store().drop_tables()
        backend.breaker_store().drop_tables()
        backend.close()


def _libpq(url: str) -> str:
    """The SQLAlchemy URL as a libpq one."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def pg() -> Iterator[PgTarget]:
    target = PgTarget()
    yield target
    target.drop()


@pytest.fixture
def tally() -> Iterator[Tally]:
    t = Tally(service_url("redis"))
    yield t
    t.drop()


def test_postgres_connections_terminated_mid_run_recover_with_no_duplicate_or_lost_result(
    pg: PgTarget, tally: Tally, tmp_path: Path
) -> None:
    """Guarantee (DESIGN §3.6, README "store down"): when PostgreSQL terminates the
    backend's connections twice mid-run under 4 processes x 4 threads, the next calls
    recover: at most one store error (a raised BackendError, or a result that could not
    be stored) per terminated connection, then success; no duplicate execution inside
    the guarantee and no lost result; every call returns within the bound."""
    namespace = unique("faultpg")

    def configure() -> None:
        idempotask.configure(backend=pg.backend(), namespace=namespace, on_backend_error="raise")

    hammer = Hammer(configure=configure, tally=tally, name="faults.pg_drop", window=160)
    go, stop = FORK.Event(), FORK.Event()
    terminated = 0
    with Workers(tmp_path / "out") as workers:
        for seed in range(4):
            workers.start(hammer_worker, hammer, seed, go, stop)
        go.set()
        wait_for(lambda: tally.total("exec") >= 40, 30, "the workers to get going")
        terminated += pg.terminate()
        time.sleep(2.0)
        terminated += pg.terminate()
        last_drop = time.time()
        time.sleep(5.0)  # recovery
        stop.set()
        workers.join(120)
        results = workers.results()
    assert len(results) == 4
    assert terminated > 0, "no connection of ours was found to terminate"
    records, lost = merge(results.values())
    result = audit(records, tally.counts("exec"), lost_elsewhere=lost)
    assert_clean(result)
    hits = result.errors["BackendError"] + sum(r["unstored"] for r in records)
    assert hits <= terminated, f"{hits} store errors for {terminated} dropped connections"
    # Recovery: the calls made a while after the drops succeed.
    late = [r for r in records if r["t0"] > last_drop + 2.5]
    assert late, "no call after the last drop"
    assert all(r["outcome"] == "value" for r in late), [r for r in late if r["outcome"] != "value"]
    print(
        f"terminated={terminated} store_errors={hits} calls={result.calls} "
        f"executions={result.executions} second_runs={result.second_runs} "
        f"max_call={max(r['dt'] for r in records):.2f}s"
    )


def test_async_callers_recover_after_their_postgres_connections_are_terminated(
    pg: PgTarget, tally: Tally
) -> None:
    """Guarantee (DESIGN §3.6, one backend for sync and async callers): asyncio callers
    on the async engine recover after PostgreSQL terminates their connections: at most
    one store error per terminated connection, then success; no duplicate execution
    inside the guarantee, no lost result, and no call hangs (each is awaited under a
    watchdog timeout)."""
    backend = pg.backend()
    idempotask.configure(backend=backend, namespace=unique("faultpgasync"))
    tracker = CallTracker()

    @idempotent(name="faults.pg_drop_async", lease=3, wait_timeout=20)
    async def job(k: int) -> dict[str, Any]:
        tracker.body_ran()
        n = await asyncio.to_thread(tally.incr, "exec", f"k{k}")
        await asyncio.sleep(0.005)
        return {"k": k, "n": n}

    records: list[dict] = []
    stop = asyncio.Event()

    async def caller(i: int) -> None:
        for step in range(1000):
            if stop.is_set():
                return
            k = (step * 7 + i) % 80
            record = await tracker.acall(
                job, k, key=f"k{k}", store_key=job.key_for(k), timeout=CALL_BOUND
            )
            records.append(record)
            await asyncio.sleep(0.01)

    async def main() -> tuple[int, float]:
        tasks = [asyncio.create_task(caller(i)) for i in range(8)]
        await asyncio.sleep(1.0)
        dropped = await asyncio.to_thread(pg.terminate)
        await asyncio.sleep(1.0)
        dropped += await asyncio.to_thread(pg.terminate)
        last_drop = time.time()
        await asyncio.sleep(3.0)
        stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), 2 * CALL_BOUND)
        finally:
            await backend.aclose()
        return dropped, last_drop

    try:
        dropped, last_drop = asyncio.run(main())
    finally:
        tracker.close()
        backend.close()
    assert dropped > 0, "no connection of ours was found to terminate"
    result = audit(records, tally.counts("exec"), lost_elsewhere=Counter(tracker.lost_elsewhere))
    assert_clean(result)
    hits = result.errors["BackendError"] + sum(r["unstored"] for r in records)
    assert hits <= dropped, f"{hits} store errors for {dropped} dropped connections"
    late = [r for r in records if r["t0"] > last_drop + 1.5]
    assert late, "no call after the last drop"
    assert all(r["outcome"] == "value" for r in late), [r for r in late if r["outcome"] != "value"]
    print(f"async: dropped={dropped} store_errors={hits} calls={result.calls}")

"""Redis killed (SIGKILL) and restarted while 4 processes x 4 threads keep calling.

The store is a private ``redis-server`` with an append-only file fsynced on every write,
so a restart keeps every write it acknowledged: the guarantee must hold through the
outage. (Without persistence a restart is "the store itself loses data", outside the
guarantee, as the README says.) Executions are counted in the shared Redis, which is
never touched.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask import idempotent
from tests.conftest import service_url, unavailable
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

pytest.importorskip("redis")

from idempotask.backends.redis import RedisBackend

PERSISTENT = (
    "--maxmemory-policy",
    "noeviction",
    "--appendonly",
    "yes",
    "--appendfsync",
    "always",
)


class KillableRedis:
    """A private, persistent redis-server that can be SIGKILLed and restarted in place."""

    def __init__(self) -> None:
        from tests.backends._redis_servers import RedisServer, have_redis_binaries

        if not have_redis_binaries():
            unavailable("redis-server is not on PATH")
        self._cls = RedisServer
        self.server = RedisServer.start(*PERSISTENT)
        self.port = self.server.port
        self.directory: Path = self.server.directory
        self.url = self.server.url
        self._servers = [self.server]

    def kill(self) -> None:
        self.server.kill()

    def restart(self) -> None:
        self.server = self._cls.start(*PERSISTENT, port=self.port, directory=self.directory)
        self._servers.append(self.server)

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def killable_redis() -> Iterator[KillableRedis]:
    server = KillableRedis()
    yield server
    server.stop()


@pytest.fixture
def tally() -> Iterator[Tally]:
    t = Tally(service_url("redis"))
    yield t
    t.drop()


def test_redis_killed_and_restarted_mid_run_no_duplicate_no_lost_result_bounded_wait(
    killable_redis: KillableRedis, tally: Tally, tmp_path: Path
) -> None:
    """Guarantee (DESIGN §3.6, README "store down"): with Redis SIGKILLed and restarted
    mid-run under 4 processes x 4 threads, fail-closed: no duplicate execution inside the
    guarantee (a key runs again only after a run whose result could not be stored), no
    lost result (duplicates all get the stored run's value), and bounded waiting (each
    call returns or raises BackendError within the bound; no worker hangs)."""
    namespace = unique("faultredis")
    url = killable_redis.url

    def configure() -> None:
        idempotask.configure(backend=url, namespace=namespace, on_backend_error="raise")

    hammer = Hammer(configure=configure, tally=tally, name="faults.redis_restart", window=160)
    go, stop = FORK.Event(), FORK.Event()
    with Workers(tmp_path / "out") as workers:
        for seed in range(4):
            workers.start(hammer_worker, hammer, seed, go, stop)
        go.set()
        wait_for(lambda: tally.total("exec") >= 40, 30, "the workers to get going")
        killable_redis.kill()
        killed_at = time.time()
        time.sleep(1.5)  # calls fail (closed) meanwhile
        killable_redis.restart()
        restarted_at = time.time()
        time.sleep(4.5)  # recovery: leases of unstored results run out, keys run again
        stop.set()
        workers.join(120)
        results = workers.results()
    assert len(results) == 4
    records, lost = merge(results.values())
    result = audit(records, tally.counts("exec"), lost_elsewhere=lost)
    assert_clean(result)
    # The fault was really met, and the store was really used again afterwards.
    assert result.errors["BackendError"] > 0, "no call saw the outage"
    failed = [r for r in records if r["outcome"] == "BackendError"]
    assert min(r["t0"] for r in failed) >= killed_at - 5
    recovered = [r for r in records if r["outcome"] == "value" and r["t0"] > restarted_at + 1]
    assert recovered, "no call succeeded after the restart"
    _report(result, records)


def _report(result: Any, records: list[dict]) -> None:
    print(
        f"calls={result.calls} values={result.values} errors={dict(result.errors)} "
        f"executions={result.executions} second_runs={result.second_runs} keys={result.keys} "
        f"unstored={sum(r['unstored'] for r in records)} "
        f"max_call={max(r['dt'] for r in records):.2f}s"
    )


def test_async_callers_through_a_redis_kill_and_restart(
    killable_redis: KillableRedis, tally: Tally
) -> None:
    """Guarantee (DESIGN §3.6, one backend for sync and async callers): 16 asyncio tasks
    calling through a Redis SIGKILL and restart see the same guarantee as threads: no
    duplicate execution inside the guarantee, no lost result, and every call returns or
    raises BackendError within the bound (each is awaited under a watchdog timeout)."""
    backend = RedisBackend(url=killable_redis.url)
    idempotask.configure(backend=backend, namespace=unique("faultredisasync"))
    tracker = CallTracker()

    @idempotent(name="faults.redis_restart_async", lease=3, wait_timeout=20, ttl=3600)
    async def job(k: int) -> dict[str, Any]:
        tracker.body_ran()
        n = await asyncio.to_thread(tally.incr, "exec", f"k{k}")
        await asyncio.sleep(0.5 if k % 10 == 9 else 0.005)
        return {"k": k, "n": n}

    records: list[dict] = []
    stop = asyncio.Event()

    async def caller(i: int) -> None:
        rng = random.Random(i)
        started = time.monotonic()
        for _ in range(2000):
            if stop.is_set():
                return
            k = max(0, int((time.monotonic() - started) * 30) - rng.randrange(90))
            record = await tracker.acall(
                job, k, key=f"k{k}", store_key=job.key_for(k), timeout=CALL_BOUND
            )
            records.append(record)
            await asyncio.sleep(0.01 if record["outcome"] == "value" else 0.05)

    async def main() -> tuple[float, float]:
        tasks = [asyncio.create_task(caller(i)) for i in range(16)]
        await asyncio.sleep(1.5)
        await asyncio.to_thread(killable_redis.kill)
        killed_at = time.time()
        await asyncio.sleep(1.5)
        await asyncio.to_thread(killable_redis.restart)
        restarted_at = time.time()
        await asyncio.sleep(4.0)
        stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), 2 * CALL_BOUND)
        finally:
            await backend.aclose()
        return killed_at, restarted_at

    try:
        killed_at, restarted_at = asyncio.run(main())
    finally:
        tracker.close()
    result = audit(records, tally.counts("exec"), lost_elsewhere=Counter(tracker.lost_elsewhere))
    assert_clean(result)
    assert result.errors["BackendError"] > 0, "no call saw the outage"
    assert min(r["t0"] for r in records if r["outcome"] == "BackendError") >= killed_at - 5
    assert any(r["outcome"] == "value" and r["t0"] > restarted_at + 1 for r in records)
    _report(result, records)

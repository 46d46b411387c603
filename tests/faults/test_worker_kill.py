"""A worker process SIGKILLed while it holds claims, under load from 3 other processes.

Every body counts its start and its completion (in the shared Redis, outside the store),
and remembers which process started it, so the audit can tell the keys the killed
process had started -- the only ones allowed to run once more, after their lease -- from
all the others, which must run exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask import idempotent
from tests.conftest import service_url
from tests.faults._support import (
    FORK,
    CallTracker,
    Tally,
    Workers,
    assert_clean,
    audit,
    drop_keys,
    merge,
    run_threads,
    unique,
    wait_for,
)

pytest.importorskip("redis")

PROCESSES, THREADS, KEYS = 4, 4, 160
LEASE = 2.0  # the killed worker's claims are taken over this long after its last renewal


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = unique("faultkill")
    yield ns
    drop_keys(service_url("redis"), f"{ns}:*")


def _redis_store() -> Iterator[Callable[[str], None]]:
    url = service_url("redis")
    yield lambda namespace: idempotask.configure(backend=url, namespace=namespace)


def _postgres_store() -> Iterator[Callable[[str], None]]:
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    from idempotask.backends.sql import SQLAlchemyBackend

    url = service_url("postgres")
    table = f"idem_fault_{uuid.uuid4().hex[:10]}"
    setup = SQLAlchemyBackend(url, table_name=table)
    setup.create_tables()

    def configure(namespace: str) -> None:  # in the worker: its own engine
        idempotask.configure(backend=SQLAlchemyBackend(url, table_name=table), namespace=namespace)

    try:
        yield configure
    finally:
        setup.drop_tables()
        setup.close()


STORES = {"redis": _redis_store, "postgres": _postgres_store}


@pytest.fixture(params=sorted(STORES))
def configure_store(request: pytest.FixtureRequest) -> Iterator[Callable[[str], None]]:
    """How a worker configures the store under test (given its namespace)."""
    yield from STORES[request.param]()


@pytest.fixture
def tally() -> Iterator[Tally]:
    t = Tally(service_url("redis"))
    yield t
    t.drop()


def _worker(
    configure: Callable[[str], None], namespace: str, tally: Tally, seed: int, go: Any
) -> dict[str, Any]:
    configure(namespace)
    tracker = CallTracker()
    pid = str(os.getpid())

    @idempotent(name="faults.worker_kill", lease=LEASE, wait_timeout=30, ttl=3600)
    def job(k: int) -> dict[str, Any]:
        tracker.body_ran()
        key = f"k{k}"
        tally.add(f"started-by:{pid}", key)
        n = tally.incr("start", key)
        time.sleep(0.02 + (k % 5) * 0.02)
        tally.incr("exec", key)  # completions: the body reached its end
        return {"k": k, "n": n, "pid": os.getpid(), "thread": threading.get_ident()}

    if not go.wait(60):
        raise RuntimeError("the start signal never came")

    def caller(i: int, records: list[dict]) -> None:
        order = list(range(KEYS))
        random.Random(seed * 100 + i).shuffle(order)
        for k in order:  # every thread calls every key once: survivors cover them all
            records.append(tracker.call(job, k, key=f"k{k}", store_key=job.key_for(k)))

    records = run_threads(THREADS, caller)
    return {"records": records, "lost_elsewhere": tracker.lost_elsewhere}


def test_a_worker_sigkilled_mid_run_under_load_leaves_every_key_run_once_or_once_more(
    configure_store: Callable[[str], None], namespace: str, tally: Tally, tmp_path: Path
) -> None:
    """Guarantee (DESIGN §3.6: "a crash before the result is stored lets the body run
    once more after the lease"), on Redis and on PostgreSQL: 4 processes x 4 threads
    call the same 160 keys and one
    process is SIGKILLed at random mid-run. The others finish; every key completed; a
    key the killed process had not started ran exactly once, a key it had started ran at
    most once more; the survivors' duplicate answers all agree; no call hung."""
    go = FORK.Event()
    with Workers(tmp_path / "out") as workers:
        processes = [
            workers.start(_worker, configure_store, namespace, tally, seed, go)
            for seed in range(PROCESSES)
        ]
        victim = random.choice(processes)
        go.set()
        # Mid-run: the victim holds claims (has started bodies it has not finished).
        wait_for(
            lambda: (
                len(tally.members(f"started-by:{victim.pid}")) >= 5
                and tally.total("start") >= KEYS // 4
            ),
            60,
            "the victim to be in the middle of its work",
        )
        os.kill(victim.pid, signal.SIGKILL)
        workers.join(180, killed=[victim])
        results = workers.results()
    assert victim.exitcode == -signal.SIGKILL
    assert victim.pid not in results
    assert len(results) == PROCESSES - 1

    starts, completions = tally.counts("start"), tally.counts("exec")
    by_victim = tally.members(f"started-by:{victim.pid}")
    # Bodies the victim started and never finished: their claims died with it.
    interrupted = {k for k in by_victim if starts[k] > completions.get(k, 0)}
    records, lost = merge(results.values())
    keys = {f"k{k}" for k in range(KEYS)}
    assert set(completions) == keys, f"keys never completed: {sorted(keys - set(completions))}"
    lost_by_key: Counter[str] = Counter()
    for r in records:
        if r["store_key"] in lost:
            lost_by_key[r["key"]] = lost[r["store_key"]]
    leases_lost = sum(1 for r in records if r["lease_lost"]) + sum(lost.values())
    for key in sorted(keys):
        allowed = 1 + (key in by_victim) + lost_by_key[key]
        assert starts[key] <= allowed, (key, starts[key], key in by_victim)
        if key not in by_victim:
            assert completions[key] == starts[key], key
    for key in interrupted:  # taken over after the lease and run to the end, once
        assert starts[key] == completions[key] + 1, (key, starts[key], completions[key])
    # The survivors' calls: every one returned, the runs they saw fit the allowance.
    result = audit(
        records,
        {k: v for k, v in starts.items()},
        lost_elsewhere=lost,
        allowed_errors=(),
        extra_runs={k: 1 for k in by_victim},
        every_run_recorded=False,
    )
    assert_clean(result)
    assert len(records) == (PROCESSES - 1) * THREADS * KEYS
    print(
        f"victim started {len(by_victim)} keys, {len(interrupted)} interrupted; "
        f"starts={sum(starts.values())} completions={sum(completions.values())} "
        f"leases_lost={leases_lost} max_call={max(r['dt'] for r in records):.2f}s"
    )

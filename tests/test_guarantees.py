"""The DESIGN §3.6 guarantee, end to end through @idempotent, with real processes and
real servers: exactly-once under contention, crash takeover, paused owners, outages.

Each store under test is a (name, URL factory, counter factory) entry in STORES; the
counter records body executions somewhere the guarantee does not depend on.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

import idempotask
from idempotask import AlreadyInProgress, BackendError, EventKind, idempotent
from tests.conftest import service_url, unavailable

redis = pytest.importorskip("redis")

FORK = multiprocessing.get_context("fork")
PROCESSES, KEYS, REPEATS = 8, 500, 3


class Counter(Protocol):
    """Counts body executions per key outside the store under test."""

    def incr(self, key: str) -> int: ...

    def counts(self) -> dict[str, int]: ...


class RedisCounter:
    """Executions in a Redis hash (HINCRBY is atomic across processes)."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self._client: Any = None

    def _redis(self) -> Any:
        if self._client is None:  # created lazily, so a forked child makes its own
            self._client = redis.Redis.from_url(self.url)
        return self._client

    def incr(self, key: str) -> int:
        return int(self._redis().hincrby(self.name, key, 1))

    def counts(self) -> dict[str, int]:
        raw = self._redis().hgetall(self.name)
        return {k.decode(): int(v) for k, v in raw.items()}

    def drop(self) -> None:
        self._redis().delete(self.name)


def _redis_store(tmp: Path) -> str:
    return service_url("redis")


def _postgres_store(tmp: Path) -> str:
    return service_url("postgres")


def _sqlite_store(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'guarantees.db'}"


STORES: dict[str, Callable[[Path], str]] = {
    "redis": _redis_store,
    "postgres": _postgres_store,
    "sqlite": _sqlite_store,
}


@pytest.fixture(params=sorted(STORES))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The store under test, as a URL (SQL URLs carry their own table)."""
    url = STORES[request.param](tmp_path)
    if request.param == "redis":
        yield url
        return
    pytest.importorskip("sqlalchemy")
    from idempotask.backends.sql import SQLAlchemyBackend

    # A table of its own per test, created before any worker starts and dropped after.
    table = f"idem_guarantee_{uuid.uuid4().hex[:10]}"
    backend = SQLAlchemyBackend(url, table_name=table)
    backend.create_tables()
    yield _SQLStore(url, table)
    backend.drop_tables()
    backend.close()


class _SQLStore(str):
    """A SQL URL that also names the table the workers must use."""

    table: str

    def __new__(cls, url: str, table: str) -> _SQLStore:
        self = super().__new__(cls, url)
        self.table = table
        return self


@pytest.fixture
def counter() -> Iterator[RedisCounter]:
    c = RedisCounter(service_url("redis"), f"idempotask-test-executions:{uuid.uuid4().hex}")
    yield c
    c.drop()


@pytest.fixture
def namespace() -> str:
    return f"guarantee{uuid.uuid4().hex[:12]}"


def _configure(url: str, namespace: str) -> None:
    # Built in the process that uses it (workers are forked children).
    if isinstance(url, _SQLStore):
        from idempotask.backends.sql import SQLAlchemyBackend

        idempotask.configure(
            backend=SQLAlchemyBackend(url, table_name=url.table), namespace=namespace
        )
    else:
        idempotask.configure(backend=url, namespace=namespace)


# ---------------------------------------------------------------------------- contention


def _contention_worker(
    url: str, namespace: str, counter: RedisCounter, seed: int, start: Any, out: Any
) -> None:
    _configure(url, namespace)

    # A lease far longer than the run: a renewal thread starved on 2 busy cores must
    # never let another process take a key over.
    @idempotent(name="guarantee.contention", lease=120, wait_timeout=120)
    def job(k: int) -> dict[str, Any]:
        n = counter.incr(str(k))
        return {"k": k, "pid": os.getpid(), "n": n}

    calls = [k for k in range(KEYS) for _ in range(REPEATS)]
    random.Random(seed).shuffle(calls)
    start.wait(30)
    out.put([(k, job(k)) for k in calls])


def test_eight_processes_run_every_key_once_and_agree_on_results(
    store_url: str, namespace: str, counter: RedisCounter
) -> None:
    """8 processes x 500 keys x 3 calls each, shuffled: one execution per key."""
    start, out = FORK.Event(), FORK.Queue()
    workers = [
        FORK.Process(
            target=_contention_worker, args=(store_url, namespace, counter, seed, start, out)
        )
        for seed in range(PROCESSES)
    ]
    for w in workers:
        w.start()
    start.set()
    results: list[tuple[int, dict[str, Any]]] = []
    for _ in workers:
        results.extend(out.get(timeout=300))
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    counts = counter.counts()
    assert len(counts) == KEYS
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    assert len(results) == PROCESSES * KEYS * REPEATS
    first: dict[int, dict[str, Any]] = {}
    for k, value in results:
        assert first.setdefault(k, value) == value
        assert value["n"] == 1


# ---------------------------------------------------------------------------- crashes


def _crash_job(counter: RedisCounter, sleep: float) -> Callable[[], str]:
    # One definition for the owner and the successor: a name belongs to one function.
    @idempotent(name="guarantee.crash", lease=1.0, wait_timeout=30)
    def job() -> str:
        counter.incr("crash")
        time.sleep(sleep)
        return "ran after the crash"

    return job


def _crashing_owner(url: str, namespace: str, counter: RedisCounter) -> None:
    _configure(url, namespace)
    _crash_job(counter, sleep=60)()  # killed long before the sleep ends


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_a_sigkilled_owner_is_taken_over_after_its_lease_and_the_body_runs_once_more(
    store_url: str, namespace: str, counter: RedisCounter
) -> None:
    owner = FORK.Process(target=_crashing_owner, args=(store_url, namespace, counter))
    owner.start()
    _wait_for(lambda: counter.counts().get("crash") == 1, 30, "the owner to start its body")
    os.kill(owner.pid or 0, signal.SIGKILL)
    owner.join(10)
    _configure(store_url, namespace)
    job = _crash_job(counter, sleep=0)
    assert job() == "ran after the crash"  # waits out the dead owner's lease, then runs
    assert job() == "ran after the crash"  # stored: not run again
    assert counter.counts()["crash"] == 2


def _paused_job(counter: RedisCounter, sleep: float) -> Any:
    @idempotent(name="guarantee.paused", lease=1.0, on_conflict="raise")
    def job() -> str:
        counter.incr("paused")
        time.sleep(sleep)
        return f"pid-{os.getpid()}"

    return job


def _paused_owner(url: str, namespace: str, counter: RedisCounter, out: Any) -> None:
    _configure(url, namespace)
    lost: list[idempotask.Event] = []
    idempotask.add_listener(lambda e: lost.append(e) if e.kind is EventKind.LEASE_LOST else None)
    job = _paused_job(counter, sleep=2.5)  # SIGSTOPped in the sleep, past its lease
    out.put((job(), len(lost)))


def test_a_paused_owner_cannot_overwrite_the_new_owners_result(
    store_url: str, namespace: str, counter: RedisCounter
) -> None:
    out = FORK.Queue()
    owner = FORK.Process(target=_paused_owner, args=(store_url, namespace, counter, out))
    owner.start()
    _wait_for(lambda: counter.counts().get("paused") == 1, 30, "the owner to start its body")
    os.kill(owner.pid or 0, signal.SIGSTOP)
    try:
        _configure(store_url, namespace)
        job = _paused_job(counter, sleep=0)
        mine = f"pid-{os.getpid()}"
        result = None
        deadline = time.monotonic() + 30
        while result is None:  # poll until the paused owner's lease has run out
            try:
                result = job()
            except AlreadyInProgress:
                assert time.monotonic() < deadline, "the paused owner's lease never ran out"
                time.sleep(0.05)
        assert result == mine
    finally:
        os.kill(owner.pid or 0, signal.SIGCONT)
    late_value, lease_lost_events = out.get(timeout=30)
    owner.join(10)
    assert late_value == f"pid-{owner.pid}"  # the late owner's caller still gets its value
    assert lease_lost_events == 1  # ... and is told its claim was lost
    assert job() == mine  # the store kept the new owner's result
    assert counter.counts()["paused"] == 2


# ---------------------------------------------------------------------------- outages


@pytest.fixture
def private_redis() -> Iterator[Any]:
    from tests.backends._redis_servers import RedisServer, have_redis_binaries

    if not have_redis_binaries():
        unavailable("redis-server is not on PATH")
    server = RedisServer.start("--maxmemory-policy", "noeviction")
    yield server
    server.stop()


def test_redis_outage_fails_closed_promptly_fails_open_when_asked_and_recovers(
    private_redis: Any, namespace: str
) -> None:
    from tests.backends._redis_servers import RedisServer

    _configure(private_redis.url, namespace)
    runs: list[str] = []

    @idempotent(name="guarantee.outage.closed")
    def closed(x: int) -> int:
        runs.append(f"closed-{x}")
        return x

    @idempotent(name="guarantee.outage.open", on_backend_error="open")
    def opened(x: int) -> int:
        runs.append(f"open-{x}")
        return x

    assert closed(1) == 1
    assert closed(1) == 1
    private_redis.kill()
    started = time.monotonic()
    with pytest.raises(BackendError):
        closed(2)
    assert time.monotonic() - started < 15  # bounded: no hang on a dead server
    assert opened(3) == 3
    assert opened(3) == 3  # unprotected while Redis is down: runs every time
    restarted = RedisServer.start(
        "--maxmemory-policy",
        "noeviction",
        port=private_redis.port,
        directory=private_redis.directory,
    )
    try:
        _wait_for(lambda: _answers(closed), 30, "the restarted server to answer")
        assert opened(4) == 4
        assert opened(4) == 4
    finally:
        restarted.stop()
    assert runs.count("open-3") == 2
    assert runs.count("open-4") == 1  # protected again after the restart
    assert "closed-2" not in runs


def _answers(fn: Any) -> bool:
    try:
        fn(5)
    except BackendError:
        return False
    return True


# ---------------------------------------------------------------------- corrupt records


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_foreign_value_in_redis_fails_closed_even_when_fail_open(mode: str) -> None:
    """A foreign string under a record's Redis key is bad data, not an outage: with
    on_backend_error="open" every call still raises and the body never runs."""
    import asyncio

    from idempotask import CorruptRecordError
    from idempotask.backends.redis import record_key

    url = service_url("redis")
    namespace = f"corrupt{uuid.uuid4().hex[:12]}"
    idempotask.configure(backend=url, namespace=namespace, on_backend_error="open")
    runs: list[int] = []

    @idempotent(name=f"guarantee.corrupt.{mode}")
    def job(n: int) -> int:
        runs.append(n)
        return n

    @idempotent(name=f"guarantee.acorrupt.{mode}")
    async def ajob(n: int) -> int:
        runs.append(n)
        return n

    fn: Any = job if mode == "sync" else ajob
    call = (lambda: job(1)) if mode == "sync" else (lambda: asyncio.run(ajob(1)))
    client = redis.Redis.from_url(url)
    storage_key = record_key(fn.key_for(1))
    client.set(storage_key, "not a record of ours")
    try:
        for _ in range(2):
            with pytest.raises(CorruptRecordError):
                call()
        assert runs == []
    finally:
        client.delete(storage_key)
        client.close()

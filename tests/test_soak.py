"""Soak: mixed, duplicate-heavy load over 4 processes x 4 threads, then a full audit.

Each call picks a key from a skewed distribution (a few hot keys take most calls, so
duplicates and concurrent duplicates are the common case). What a key does is fixed by
its number: even keys go to ``soak.cached`` (``cache_errors``), odd keys to
``soak.released`` (a failure releases the key); one key in ten fails, every seventh one
that succeeds is slow. Both functions are ``@dead_letter`` over ``@idempotent``.
Executions are counted in the shared Redis (outside the store under test).

The audit: every key that succeeded ran exactly once and every caller got its value;
a ``soak.cached`` key that failed ran once and has exactly one dead letter (duplicates
re-raise the cached error and are not dead-lettered); a ``soak.released`` key that failed
has exactly one dead letter per execution (each failure released the key, so the next
caller ran it again: the documented number); no call hung, no unexpected error.

The idempotency store is Redis (with the Redis dead-letter store, shared by the
processes) or PostgreSQL (with the memory dead-letter store, one per process, each
reporting its letters). The CI run takes ~30 s of load per store; the long run is
``pytest --run-slow -k soak_long`` for ``$IDEMPOTASK_SOAK_SECONDS`` (default 600) each.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask import DeadLetter, DeadLetterQueue, dead_letter, idempotent
from idempotask.backends.deadletters import DeadLetterFilter, dead_letter_store_from_url
from idempotask.errors import ConfigurationError
from tests.conftest import service_url
from tests.faults._support import (
    FORK,
    CallTracker,
    Compactor,
    Tally,
    Workers,
    assert_clean,
    audit,
    drop_keys,
    merge,
    run_threads,
    unique,
)

pytest.importorskip("redis")

PROCESSES, THREADS, KEYS = 4, 4, 600
CI_SECONDS = 30.0
LONG_SECONDS = float(os.environ.get("IDEMPOTASK_SOAK_SECONDS", "600"))


class SoakFailure(ValueError):
    """What a failing key's body raises (PERMANENT: its letter is abandoned at once)."""


def fails(function: str, i: int) -> bool:
    """One key in ten fails, of each function."""
    return (i % 10 == 4) if function == "cached" else (i % 10 == 7)


def body_seconds(function: str, i: int, rng: random.Random) -> float:
    """Every seventh key that succeeds is slow (50-150 ms), the others take up to 2 ms.

    (A slow key that fails would run again for every caller, one at a time: a hot one
    gets more calls than it can serve, and its callers end in ``AlreadyInProgress``.)
    """
    slow = i % 7 == 0 and not fails(function, i)
    return rng.uniform(0.05, 0.15) if slow else rng.uniform(0.0, 0.002)


def split(key: str) -> tuple[str, int]:
    """``"cached:42"`` -> ``("cached", 42)``."""
    function, _, i = key.partition(":")
    return function, int(i)


def skewed_key(rng: random.Random) -> int:
    """Key i with probability ~ the density of u**3: key 0..5 take ~1/5 of all calls."""
    return min(KEYS - 1, int(KEYS * rng.random() ** 3))


# ---------------------------------------------------------------------------- stores


@dataclass
class SoakStore:
    """An idempotency store and a dead-letter store for one soak run."""

    name: str
    configure: Callable[[str], None]  # configure(namespace), in each worker
    open_dead_letters: Callable[[], Any]  # a DeadLetterStore, in each worker
    shared_dead_letters: bool  # one store for all processes (else each reports its own)
    cleanup: Callable[[], None]


def _redis_store(tmp: Path) -> SoakStore:
    url = service_url("redis")
    prefix = unique("soakdlq")
    try:
        dead_letter_store_from_url(f"{url}?prefix={prefix}")
        shared = True
    except ConfigurationError:  # no Redis dead-letter store: one memory store per process
        shared = False
    namespace_holder: list[str] = []

    def configure(namespace: str) -> None:
        namespace_holder.append(namespace)
        idempotask.configure(backend=url, namespace=namespace)

    def open_dead_letters() -> Any:
        if shared:
            return dead_letter_store_from_url(f"{url}?prefix={prefix}")
        return dead_letter_store_from_url("memory://")

    def cleanup() -> None:
        drop_keys(url, f"{prefix}:*")

    return SoakStore("redis", configure, open_dead_letters, shared, cleanup)


def _postgres_store(tmp: Path) -> SoakStore:
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    from idempotask.backends.sql import SQLAlchemyBackend

    url = service_url("postgres")
    table = f"idem_soak_{uuid.uuid4().hex[:10]}"
    setup = SQLAlchemyBackend(url, table_name=table)
    setup.create_tables()
    setup.close()

    def configure(namespace: str) -> None:
        idempotask.configure(backend=SQLAlchemyBackend(url, table_name=table), namespace=namespace)

    def cleanup() -> None:
        backend = SQLAlchemyBackend(url, table_name=table)
        backend.drop_tables()
        backend.close()

    return SoakStore(
        "postgres", configure, lambda: dead_letter_store_from_url("memory://"), False, cleanup
    )


STORES: dict[str, Callable[[Path], SoakStore]] = {
    "redis": _redis_store,
    "postgres": _postgres_store,
}


@pytest.fixture(params=sorted(STORES))
def soak_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SoakStore]:
    store = STORES[request.param](tmp_path)
    yield store
    store.cleanup()


@pytest.fixture
def tally() -> Iterator[Tally]:
    t = Tally(service_url("redis"))
    yield t
    t.drop()


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = unique("soak")
    yield ns
    drop_keys(service_url("redis"), f"{ns}:*")


# ---------------------------------------------------------------------------- workers


def _letter_row(letter: DeadLetter) -> list[Any]:
    return [letter.function, letter.key, letter.message, letter.error_type]


def _all_letters(store: Any) -> list[DeadLetter]:
    letters: list[DeadLetter] = []
    for _ in range(10_000):  # bounded paging
        page = store.query(DeadLetterFilter(), limit=1000, offset=len(letters))
        letters.extend(page)
        if len(page) < 1000:
            return letters
    raise AssertionError("more letters than a soak run can make")


def _worker(
    store: SoakStore,
    namespace: str,
    tally: Tally,
    spool: str,
    seconds: float,
    seed: int,
    go: Any,
) -> dict[str, Any]:
    store.configure(namespace)
    idempotask.configure(spool_path=spool)
    # Thousands of failures each log their letter; the audit reads the store instead.
    logging.getLogger("idempotask").setLevel(logging.CRITICAL + 1)
    dead_letters = store.open_dead_letters()
    queue = DeadLetterQueue(dead_letters, spool=spool)
    tracker = CallTracker()
    compactor = Compactor()

    def body(function: str, i: int) -> dict[str, Any]:
        tracker.body_ran()
        n = tally.incr("exec", f"{function}:{i}")
        time.sleep(body_seconds(function, i, random.Random(n * 7919 + i)))
        if fails(function, i):
            raise SoakFailure(f"{function} {i} failed (run {n})")
        return {"i": i, "n": n, "pid": os.getpid()}

    @dead_letter(name="soak.cached", queue=queue)
    @idempotent(name="soak.cached", lease=30, wait_timeout=60, ttl=3600, cache_errors=3600)
    def cached(i: int) -> dict[str, Any]:
        return body("cached", i)

    @dead_letter(name="soak.released", queue=queue)
    @idempotent(name="soak.released", lease=30, wait_timeout=60, ttl=3600)
    def released(i: int) -> dict[str, Any]:
        return body("released", i)

    if not go.wait(60):
        raise RuntimeError("the start signal never came")
    stop_at = time.monotonic() + seconds

    def caller(t: int, _: list[dict]) -> None:
        rng = random.Random(seed * 100 + t)
        for _ in range(int(seconds * 2000)):
            if time.monotonic() >= stop_at:
                return
            i = skewed_key(rng)
            fn, function = (cached, "cached") if i % 2 == 0 else (released, "released")
            compactor.add(tracker.call(fn, i, key=f"{function}:{i}", store_key=fn.key_for(i)))
            time.sleep(0.002)

    run_threads(THREADS, caller)
    letters = (
        [] if store.shared_dead_letters else [_letter_row(x) for x in _all_letters(queue.store)]
    )
    return {
        "records": compactor.records(),
        "lost_elsewhere": tracker.lost_elsewhere,
        "letters": letters,
        "spool_pending": queue.spool.pending(),
    }


# ---------------------------------------------------------------------------- the run


def _soak(store: SoakStore, namespace: str, tally: Tally, tmp_path: Path, seconds: float) -> None:
    spool = str(tmp_path / "spool.jsonl")
    go = FORK.Event()
    with Workers(tmp_path / "out", watchdog=seconds + 180) as workers:
        for seed in range(PROCESSES):
            workers.start(_worker, store, namespace, tally, spool, seconds, seed, go)
        go.set()
        workers.join(seconds + 240)
        results = workers.results()
    assert len(results) == PROCESSES
    assert not any(r["spool_pending"] for r in results.values()), "letters left in the spool"

    records, lost = merge(results.values())
    executions = tally.counts("exec")
    # A released key that fails runs again at the next call: one run per failure.
    reruns = {
        key: n - 1
        for key, n in executions.items()
        if split(key)[0] == "released" and fails(*split(key))
    }
    result = audit(
        records,
        executions,
        lost_elsewhere=lost,
        allowed_errors=("SoakFailure",),
        extra_runs=reruns,
    )
    assert_clean(result)

    # Dead letters: exactly the documented number per key, and nothing else.
    if store.shared_dead_letters:
        rows = [_letter_row(x) for x in _all_letters(store.open_dead_letters())]
    else:
        rows = [row for r in results.values() for row in r["letters"]]
    keys_by_store_key = {r["store_key"]: r["key"] for r in records}
    letters = Counter(keys_by_store_key.get(key, f"?{key}") for _, key, _, _ in rows)
    assert {error_type for _, _, _, error_type in rows} <= {"tests.test_soak.SoakFailure"}
    problems = []
    for key in sorted(set(executions) | set(letters)):
        function, i = split(key)
        runs, found = executions.get(key, 0), letters.get(key, 0)
        if not fails(function, i):
            expected = 0
        elif function == "cached":
            expected = 1  # one run; its error is cached and re-raised without a letter
        else:
            expected = runs  # each failed run released the key: one letter each
        if found != expected:
            problems.append(f"{key}: {found} dead letters for {runs} runs, expected {expected}")
        if function == "cached" and runs != 1:
            problems.append(f"{key}: ran {runs} times")
        if not fails(function, i) and runs != 1:
            problems.append(f"{key}: succeeded but ran {runs} times")
    assert not problems, problems[:25]
    assert len(rows) == sum(n for key, n in executions.items() if fails(*split(key)))
    assert result.errors["SoakFailure"] > 0
    assert result.values > 0
    print(
        f"{store.name}: {result.calls} calls, {result.keys} keys, {result.executions} runs, "
        f"{len(rows)} dead letters ({'shared' if store.shared_dead_letters else 'per process'})"
        f", max call {max(r['dt'] for r in records):.2f}s"
    )


def test_soak(soak_store: SoakStore, namespace: str, tally: Tally, tmp_path: Path) -> None:
    """Guarantee (DESIGN §3.6 and §5, under sustained duplicate-heavy load): every key
    that succeeded ran exactly once and all its callers got the same value; every
    failure has exactly one dead letter (one per failed run when failures release the
    key, one per key when they are cached); no call hung. The bounded CI run."""
    _soak(soak_store, namespace, tally, tmp_path, CI_SECONDS)


@pytest.mark.slow
def test_soak_long(soak_store: SoakStore, namespace: str, tally: Tally, tmp_path: Path) -> None:
    """Guarantee: as :func:`test_soak`, for ``$IDEMPOTASK_SOAK_SECONDS`` (default 600) of
    load per store. Run with ``--run-slow``."""
    _soak(soak_store, namespace, tally, tmp_path, LONG_SECONDS)

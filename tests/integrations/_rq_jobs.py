"""Job functions of the RQ integration tests, run by real ``rq worker`` processes.

The workers import this module by path (the jobs' ``func_name``); with
``IDEMPOTASK_RQ_TEST_WORKER=1`` it configures idempotask from the environment the tests
set, so the worker and the test agree on the store, namespace and dead-letter queue.
Bodies count their runs in Redis (``<namespace>:count:<name>``), so the tests see how
often a body really ran, in whichever process.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

import idempotask
from idempotask import idempotent
from idempotask.deadletter import keep_all
from idempotask.integrations.rq import idempotent_job

ENV_WORKER = "IDEMPOTASK_RQ_TEST_WORKER"
ENV_NAMESPACE = "IDEMPOTASK_RQ_TEST_NAMESPACE"
ENV_REDIS = "IDEMPOTASK_RQ_TEST_REDIS"  # the idempotency store, and the counters
ENV_DEAD_LETTERS = "IDEMPOTASK_RQ_TEST_DEAD_LETTERS"  # redis://...?prefix=...
ENV_SPOOL = "IDEMPOTASK_RQ_TEST_SPOOL"

LEASE = 2.0  # the crash test's lease: short, so a dead worker's claim runs out quickly

_redis_url = os.environ.get(ENV_REDIS, "redis://127.0.0.1:6379/0")
_counters: redis.Redis | None = None

if os.environ.get(ENV_WORKER) == "1":
    idempotask.configure(
        backend=os.environ.get("IDEMPOTASK_URL", _redis_url),
        namespace=os.environ[ENV_NAMESPACE],
        dead_letter_store=os.environ[ENV_DEAD_LETTERS],
        spool_path=os.environ[ENV_SPOOL],
    )


def counter(namespace: str, name: str) -> str:
    """The Redis key counting the runs of ``name``."""
    return f"{namespace}:count:{name}"


def _count(name: str) -> int:
    global _counters
    if _counters is None:
        _counters = redis.Redis.from_url(_redis_url)
    # The configured namespace: the worker's (from the environment) or the test's.
    return int(_counters.incr(counter(idempotask.config.settings().namespace, name)))


@idempotent_job(idempotency_ttl=600)
def add(a: int, b: int = 0, *, scale: int = 1) -> dict[str, Any]:
    """The deduplicated job: counts its runs, returns a typed value."""
    _count("add")
    time.sleep(0.05)  # long enough for concurrent duplicates to meet the claim
    return {"sum": (a + b) * scale, "pair": (a, b)}


@idempotent(ttl=600)
def plain_add(a: int, b: int = 0) -> tuple[int, int]:
    """A plain @idempotent job function (no integration decorator)."""
    _count("plain_add")
    time.sleep(0.05)
    return (a, a + b)


@idempotent_job(idempotency_ttl=600)
def spread(a: int, b: int = 1, *rest: int, **extra: int) -> int:
    """A job with a defaulted parameter before ``*rest``: the replay route's letters."""
    return a + b + sum(rest) + sum(extra.values())


@idempotent_job(idempotency_ttl=600, idempotency_cache_errors=600)
def flaky(n: int) -> int:
    """Fails on its first two runs, then succeeds. It caches its failures for
    duplicates, so its own retries must not be answered by them."""
    runs = _count(f"flaky:{n}")
    if runs <= 2:
        raise ConnectionError(f"flaky run {runs} failed")
    return n * 2


@idempotent_job(
    idempotency_ttl=600,
    dead_letter_redact=keep_all,  # kept on purpose: the replay sends the same call again
)
def always_fails(n: int, secret: str = "s3cret") -> None:
    """Always fails with a transient error (so its dead letter gets a next retry)."""
    _count(f"always_fails:{n}")
    raise ConnectionError(f"upstream unavailable for {n}")


@idempotent_job(
    idempotency_ttl=600,
    # The card is not kept: its letter cannot rebuild the call, so it waits for a person.
    dead_letter_redact=lambda arguments: {**arguments, "card": "<redacted>"},
)
def charge_fails(n: int, card: str) -> None:
    """Always fails; its dead letter keeps no card."""
    _count(f"charge_fails:{n}")
    raise ConnectionError(f"gateway unavailable for {n}")


@idempotent_job(idempotency_ttl=600, idempotency_lease=LEASE, idempotency_wait_timeout=60)
def slow(n: int) -> dict[str, int]:
    """Its first run blocks (the test kills its worker); later runs finish at once."""
    started = _count(f"slow:{n}:started")
    if started == 1:
        time.sleep(120)
    _count(f"slow:{n}:done")
    return {"n": n, "run": started}


OWNED_LEASE = 3.0  # the lease a re-run of a job whose worker died must wait out


@idempotent_job(idempotency_ttl=600, idempotency_lease=OWNED_LEASE, idempotency_wait_timeout=0.5)
def slow_owned(n: int) -> dict[str, int]:
    """Like :func:`slow`, with a wait far shorter than the lease: a re-run of the same
    job waits out a dead run's lease all the same (the run is its own job's), then runs.
    Each run records when it started."""
    started = _count(f"slow_owned:{n}:started")
    _mark(f"slow_owned:{n}:started_at:{started}")
    if started == 1:
        time.sleep(120)
    _count(f"slow_owned:{n}:done")
    return {"n": n, "run": started}


@idempotent_job(idempotency_ttl=600, idempotency_lease=30, idempotency_wait_timeout=0.5)
def stalls(n: int) -> dict[str, int]:
    """A 3 s body with a long lease: the test stops its worker mid-body and resumes it
    before the lease runs out, so its run is stalled, never dead."""
    started = _count(f"stalls:{n}:started")
    time.sleep(3)
    _count(f"stalls:{n}:done")
    return {"n": n, "run": started}


def _mark(name: str) -> None:
    """Record the time (this machine's clock) under ``name``."""
    global _counters
    if _counters is None:
        _counters = redis.Redis.from_url(_redis_url)
    _counters.set(counter(idempotask.config.settings().namespace, name), repr(time.time()))

"""The broker and actors of the Dramatiq integration tests.

Real ``dramatiq tests.integrations._dramatiq_actors`` worker processes import this module,
and so does the test process (to send messages and read results). Both build the broker
from the ``IDEMPOTASK_DRAMATIQ_TEST_*`` environment variables: RabbitMQ (or Redis) as the
broker, Redis for the Results middleware, ``IdempotencyMiddleware`` with the configured
store. With ``IDEMPOTASK_DRAMATIQ_TEST_WORKER=1`` the module also configures idempotask
(store, namespace, dead letters). Bodies count their runs in Redis
(``<namespace>:count:<name>``), so the tests see how often a body really ran.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

import idempotask
from idempotask import idempotent
from idempotask.integrations.dramatiq import IdempotencyMiddleware

ENV_WORKER = "IDEMPOTASK_DRAMATIQ_TEST_WORKER"
ENV_NAMESPACE = "IDEMPOTASK_DRAMATIQ_TEST_NAMESPACE"  # unique per test session
ENV_BROKER = "IDEMPOTASK_DRAMATIQ_TEST_BROKER"  # amqp://... or redis://...
ENV_REDIS = "IDEMPOTASK_DRAMATIQ_TEST_REDIS"  # results, idempotency store, counters
ENV_DEAD_LETTERS = "IDEMPOTASK_DRAMATIQ_TEST_DEAD_LETTERS"  # redis://...?prefix=...
ENV_SPOOL = "IDEMPOTASK_DRAMATIQ_TEST_SPOOL"

LEASE = 2.0  # the crash test's lease: short, so a dead worker's claim runs out quickly

NAMESPACE = os.environ[ENV_NAMESPACE]
QUEUE = f"idq_{NAMESPACE}"
_redis_url = os.environ[ENV_REDIS]
_broker_url = os.environ[ENV_BROKER]

broker: dramatiq.Broker = (
    RedisBroker(url=_broker_url, namespace=f"{NAMESPACE}-broker")
    if _broker_url.startswith(("redis://", "rediss://"))
    else RabbitmqBroker(url=_broker_url)
)
results = RedisBackend(url=_redis_url, namespace=f"{NAMESPACE}-results")
broker.add_middleware(Results(backend=results))
broker.add_middleware(IdempotencyMiddleware())
dramatiq.set_broker(broker)

if os.environ.get(ENV_WORKER) == "1":
    idempotask.configure(
        backend=os.environ.get("IDEMPOTASK_URL", _redis_url),
        namespace=NAMESPACE,
        dead_letter_store=os.environ[ENV_DEAD_LETTERS],
        spool_path=os.environ[ENV_SPOOL],
    )

_counters = redis.Redis.from_url(_redis_url)


def counter(name: str) -> str:
    """The Redis key counting the runs of ``name``."""
    return f"{NAMESPACE}:count:{name}"


def _count(name: str) -> int:
    return int(_counters.incr(counter(name)))


_FAST_RETRIES: dict[str, Any] = {"min_backoff": 10, "max_backoff": 50}


@dramatiq.actor(queue_name=QUEUE, store_results=True, max_retries=0, idempotency_ttl=600)
def add(a: int, b: int = 0, scale: int = 1) -> dict[str, Any]:
    """The deduplicated actor: counts its runs."""
    _count("add")
    time.sleep(0.05)  # long enough for concurrent duplicates to meet the claim
    return {"sum": (a + b) * scale, "pair": [a, b]}


@dramatiq.actor(
    queue_name=QUEUE,
    store_results=True,
    max_retries=2,
    idempotency_ttl=600,
    idempotency_cache_errors=600,
    **_FAST_RETRIES,
)
def flaky(n: int) -> int:
    """Fails on its first two runs, then succeeds. It caches its failures for
    duplicates, so its own retries must not be answered by them."""
    runs = _count(f"flaky:{n}")
    if runs <= 2:
        raise ConnectionError(f"flaky run {runs} failed")
    return n * 2


@dramatiq.actor(
    queue_name=QUEUE,
    max_retries=2,
    # The secret is not kept; a replay runs with the default.
    dead_letter_redact=lambda arguments: {k: v for k, v in arguments.items() if k != "secret"},
    **_FAST_RETRIES,
)
@idempotent(ttl=600)  # the plain decorator: the key's name is still the actor name
def always_fails(n: int, secret: str = "s3cret") -> None:
    """Always fails with a transient error (so its dead letter gets a next retry)."""
    _count(f"always_fails:{n}")
    raise ConnectionError(f"upstream unavailable for {n}")


@dramatiq.actor(
    queue_name=QUEUE,
    store_results=True,
    max_retries=0,
    idempotency_ttl=600,
    idempotency_lease=LEASE,
    idempotency_wait_timeout=60,
)
def slow(n: int) -> dict[str, int]:
    """Its first run blocks (the test kills its worker); later runs finish at once."""
    started = _count(f"slow:{n}:started")
    if started == 1:
        time.sleep(120)
    _count(f"slow:{n}:done")
    return {"n": n, "run": started}


@dramatiq.actor(
    queue_name=QUEUE,
    store_results=True,
    max_retries=0,
    idempotency_ttl=600,
    idempotency_lease=60,
    idempotency_wait_timeout=5,
)
def slow_owned(n: int) -> dict[str, int]:
    """Like :func:`slow`, with a long lease and a short wait: only a delivery that owns
    the claim (the same message) can run it soon after its worker died."""
    started = _count(f"slow_owned:{n}:started")
    if started == 1:
        time.sleep(120)
    _count(f"slow_owned:{n}:done")
    return {"n": n, "run": started}

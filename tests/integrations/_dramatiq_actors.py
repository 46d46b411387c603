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
from dramatiq.middleware import Middleware
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

import idempotask
from idempotask import idempotent
from idempotask.deadletter import keep_all
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
_counters = redis.Redis.from_url(_redis_url)


def counter(name: str) -> str:
    """The Redis key counting the runs of ``name``."""
    return f"{NAMESPACE}:count:{name}"


class DeliveryCounter(Middleware):
    """Counts, per message id, the deliveries a worker took and those that ended without
    an exception (``received:<id>``, ``ok:<id>``), so tests see a second delivery of one
    message even when it runs no body."""

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        _counters.incr(counter(f"received:{message.message_id}"))

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        outcome = "ok" if exception is None else f"error:{type(exception).__name__}"
        _counters.incr(counter(f"{outcome}:{message.message_id}"))


broker.add_middleware(Results(backend=results))
broker.add_middleware(DeliveryCounter())
broker.add_middleware(IdempotencyMiddleware())
dramatiq.set_broker(broker)

if os.environ.get(ENV_WORKER) == "1":
    idempotask.configure(
        backend=os.environ.get("IDEMPOTASK_URL", _redis_url),
        namespace=NAMESPACE,
        dead_letter_store=os.environ[ENV_DEAD_LETTERS],
        spool_path=os.environ[ENV_SPOOL],
    )


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
    max_retries=0,
    # The card is not kept: its letter cannot rebuild the call, so it waits for a person.
    dead_letter_redact=lambda arguments: {**arguments, "card": "<redacted>"},
)
def charge_fails(n: int, card: str) -> None:
    """Always fails; its dead letter keeps no card."""
    _count(f"charge_fails:{n}")
    raise ConnectionError(f"gateway unavailable for {n}")


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
    dead_letter_redact=keep_all,  # kept on purpose: the replay sends the same call again
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


OWNED_LEASE = 3.0  # the lease a redelivery of a message whose worker died must wait out


@dramatiq.actor(
    queue_name=QUEUE,
    store_results=True,
    max_retries=0,
    idempotency_ttl=600,
    idempotency_lease=OWNED_LEASE,
    idempotency_wait_timeout=0.5,
)
def slow_owned(n: int) -> dict[str, int]:
    """Like :func:`slow`, with a wait far shorter than the lease: a redelivery of the
    same message waits out a dead run's lease all the same (the run is its own
    message's), then runs. Each run records when it started."""
    started = _count(f"slow_owned:{n}:started")
    _counters.set(counter(f"slow_owned:{n}:started_at:{started}"), repr(time.time()))
    if started == 1:
        time.sleep(120)
    _count(f"slow_owned:{n}:done")
    return {"n": n, "run": started}


@dramatiq.actor(
    queue_name=QUEUE,
    store_results=True,
    max_retries=0,
    idempotency_ttl=600,
    idempotency_lease=30,
    idempotency_wait_timeout=0.5,
)
def stalls(n: int, seconds: float = 3.0) -> dict[str, int]:
    """A body of a few seconds with a long lease: a test delivers its message twice at
    once, or stops its worker mid-body and resumes it before the lease runs out."""
    started = _count(f"stalls:{n}:started")
    time.sleep(seconds)
    _count(f"stalls:{n}:done")
    return {"n": n, "run": started}


@dramatiq.actor(
    queue_name=QUEUE,
    store_results=True,
    max_retries=3,
    idempotency_ttl=600,
    idempotency_lease=60,
    idempotency_wait_timeout=0.5,
)
def retries_once(n: int) -> dict[str, int]:
    """Raises dramatiq.Retry on its first run, which keeps the claim for the retry; the
    retry must re-take it at once rather than wait out its 60 s lease."""
    started = _count(f"retries_once:{n}:started")
    if started == 1:
        raise dramatiq.Retry(delay=20)
    return {"n": n, "run": started}


@dramatiq.actor(
    queue_name=QUEUE,
    store_results=True,
    max_retries=1,
    idempotency_ttl=600,
    idempotency_lease=60,
    idempotency_wait_timeout=0.5,
)
def retries_until_given_up(n: int) -> dict[str, int]:
    """Raises dramatiq.Retry on its first two runs: the second is its last retry, so the
    Retries middleware gives up and the claim kept for a retry must be released. A
    duplicate sent after that runs (the third run) at once."""
    started = _count(f"retries_until_given_up:{n}:started")
    if started <= 2:
        raise dramatiq.Retry(delay=20)
    return {"n": n, "run": started}

"""The Celery app of the Celery integration tests.

The tests build one app per broker with :func:`make_app`; the real worker processes they
start import this module (``celery -A tests.integrations._celery_app worker``), which
builds ``app`` from the ``IDEMPOTASK_CELERY_*`` environment variables the tests set. So
both sides agree on the broker, queues, idempotency store, namespace and dead-letter
queue. Task bodies count their runs in Redis (``<namespace>:count:<task>:<tag>``) so
the tests can see how often a body really ran, in whichever process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery, signals
from kombu import Queue

import idempotask
from idempotask.integrations.celery import KEY_HEADER, IdempotentTask

ENV_BROKER = "IDEMPOTASK_CELERY_BROKER"
ENV_RESULTS = "IDEMPOTASK_CELERY_RESULTS"  # the Redis result backend
ENV_STORE = "IDEMPOTASK_CELERY_STORE"  # the idempotency store (Redis), also counters
ENV_NAMESPACE = "IDEMPOTASK_CELERY_NAMESPACE"  # unique per test session and broker
ENV_DEAD_LETTERS = "IDEMPOTASK_CELERY_DEAD_LETTERS"  # redis://...?prefix=...
ENV_SPOOL = "IDEMPOTASK_CELERY_SPOOL"
ENV_VISIBILITY = "IDEMPOTASK_CELERY_VISIBILITY"  # Redis broker: seconds before redelivery
ENV_MEMORY = "IDEMPOTASK_CELERY_MEMORY"  # "1": the worker uses memory:// (the warning test)

LEASE = 3.0  # the crash test's lease: short, so a dead worker's claim runs out quickly


def crash_queue(queue: str) -> str:
    """The queue of the crash test's workers, apart from the shared worker's."""
    return f"{queue}.crash"


def counter(namespace: str, task: str, tag: object) -> str:
    return f"{namespace}:count:{task}:{tag}"


def make_app(env: Mapping[str, str]) -> Celery:
    """An app on the broker, queues and stores ``env`` names, with the test tasks."""
    namespace = env[ENV_NAMESPACE]
    broker = env[ENV_BROKER]
    counters = redis.Redis.from_url(env[ENV_STORE])
    app = Celery("idempotask_celery_tests", broker=broker, backend=env[ENV_RESULTS])
    transport: dict[str, Any] = {}
    if broker.startswith("redis"):
        transport = {
            # Every broker key (queues, the unacked hash) under this session's prefix.
            "global_keyprefix": f"{namespace}:broker:",
            "visibility_timeout": float(env.get(ENV_VISIBILITY, 3600)),
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        }
    # RabbitMQ deletes these queues ten minutes after their last consumer left.
    expiring = {"x-expires": 600_000}
    app.conf.update(
        task_default_queue=namespace,
        task_queues=[
            Queue(namespace, routing_key=namespace, queue_arguments=expiring),
            Queue(
                crash_queue(namespace),
                routing_key=crash_queue(namespace),
                queue_arguments=expiring,
            ),
        ],
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
        result_expires=600,
    )

    def count(task: str, tag: object) -> int:
        return int(counters.incr(counter(namespace, task, tag)))

    # shared=False: the tests build one app per broker, each with its own tasks.

    @app.task(base=IdempotentTask, shared=False, name="itest.once", idempotency_ttl=600)
    def once(x: int, y: int = 0) -> dict[str, int]:
        run = count("once", f"{x}:{y}")
        time.sleep(0.3)  # long enough for duplicates to arrive while it runs
        return {"x": x, "y": y, "run": run}

    @app.task(
        base=IdempotentTask,
        shared=False,
        name="itest.once_dedupe",
        idempotency_ttl=600,
        idempotency_dedupe_enqueue=True,
    )
    def once_dedupe(x: int) -> dict[str, int]:
        run = count("once_dedupe", x)
        time.sleep(0.3)
        return {"x": x, "run": run}

    @app.task(base=IdempotentTask, shared=False, bind=True, name="itest.keyed", idempotency_ttl=600)
    def keyed(self: Any, a: int, b: int = 2) -> dict[str, Any]:
        count("keyed", a)
        held = idempotask.current_lease()
        header = getattr(self.request, KEY_HEADER, None) or (self.request.headers or {}).get(
            KEY_HEADER
        )
        return {"key": held.key if held else None, "header": header, "a": a, "b": b}

    @app.task(
        base=IdempotentTask,
        shared=False,
        name="itest.flaky_auto",
        autoretry_for=(ConnectionError,),
        max_retries=3,
        default_retry_delay=0,
        idempotency_lease=30,
    )
    def flaky_auto(tag: str) -> dict[str, Any]:
        run = count("flaky_auto", tag)
        if run <= 2:
            raise ConnectionError(f"attempt {run} of {tag} refused")
        return {"tag": tag, "run": run}

    @app.task(
        base=IdempotentTask,
        shared=False,
        bind=True,
        name="itest.flaky_manual",
        max_retries=3,
        idempotency_lease=30,
    )
    def flaky_manual(self: Any, tag: str) -> dict[str, Any]:
        run = count("flaky_manual", tag)
        if run <= 2:
            # Long enough for a duplicate sent meanwhile to find the claim held.
            raise self.retry(countdown=1.0)
        return {"tag": tag, "run": run}

    @app.task(
        base=IdempotentTask,
        shared=False,
        name="itest.doomed",
        autoretry_for=(TimeoutError,),
        max_retries=1,
        default_retry_delay=0,
    )
    def doomed(tag: str) -> None:
        run = count("doomed", tag)
        raise TimeoutError(f"the gateway timed out on {tag} (run {run})")

    @app.task(
        base=IdempotentTask,
        shared=False,
        bind=True,
        name="itest.crashy",
        acks_late=True,
        idempotency_lease=LEASE,
    )
    def crashy(self: Any, tag: str) -> dict[str, Any]:
        run = count("crashy", tag)
        counters.set(f"{namespace}:started_at:crashy:{tag}:{run}", repr(time.time()))
        if run == 1:
            time.sleep(120)  # the test kills this worker meanwhile
        count("crashy_done", tag)
        redelivered = (self.request.delivery_info or {}).get("redelivered")
        return {"tag": tag, "run": run, "redelivered": bool(redelivered)}

    @app.task(
        base=IdempotentTask,
        shared=False,
        bind=True,
        name="itest.outlives_visibility",
        acks_late=True,
        idempotency_lease=LEASE,
        idempotency_wait_timeout=1,
    )
    def outlives_visibility(self: Any, tag: str) -> dict[str, Any]:
        run = count("outlives_visibility", tag)
        time.sleep(12)  # past the visibility timeout and the lease (renewed meanwhile)
        redelivered = (self.request.delivery_info or {}).get("redelivered")
        return {"tag": tag, "run": run, "redelivered": bool(redelivered)}

    @app.task(
        base=IdempotentTask,
        shared=False,
        bind=True,
        name="itest.late_retry",
        max_retries=1,
        idempotency_lease=LEASE,
    )
    def late_retry(self: Any, tag: str) -> dict[str, Any]:
        run = count("late_retry", tag)
        if run == 1:
            raise self.retry(countdown=6)  # past the Redis visibility timeout
        time.sleep(1)
        return {"tag": tag, "run": run}

    @app.task(base=IdempotentTask, shared=False, name="itest.hard", time_limit=1)
    def hard(tag: str) -> dict[str, Any]:
        run = count("hard", tag)
        time.sleep(5)  # the pool kills this process after 1 s
        return {"tag": tag, "run": run}

    @app.task(base=IdempotentTask, shared=False, name="itest.soft", soft_time_limit=1)
    def soft(tag: str) -> dict[str, Any]:
        run = count("soft", tag)
        if run == 1:
            time.sleep(5)  # interrupted by SoftTimeLimitExceeded after 1 s
        return {"tag": tag, "run": run}

    return app


@signals.worker_ready.connect
def _announce(sender: Any = None, **_: Any) -> None:
    """Tell the tests this worker consumes (they wait for the key, never sleep)."""
    namespace = os.environ.get(ENV_NAMESPACE)
    if namespace and sender is not None:
        redis.Redis.from_url(os.environ[ENV_STORE]).set(
            f"{namespace}:ready:{sender.hostname}", os.getpid(), ex=600
        )


if os.environ.get(ENV_BROKER):
    # A worker process: its store and dead-letter queue are the test's.
    idempotask.configure(
        backend="memory://" if os.environ.get(ENV_MEMORY) == "1" else os.environ[ENV_STORE],
        namespace=os.environ[ENV_NAMESPACE],
        dead_letter_store=os.environ[ENV_DEAD_LETTERS],
        spool_path=os.environ[ENV_SPOOL],
    )
    app = make_app(os.environ)

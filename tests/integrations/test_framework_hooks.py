"""The framework behaviour the integrations rely on where no documented API says it.

Each test names one hook and fails when a Celery, Dramatiq or RQ release changes it, so
the dependency matrix (lowest and newest declared versions) points at the hook instead of
at a user's duplicate run. They run in process, without workers.
"""

from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import idempotask
from idempotask import idempotent
from tests.conftest import service_url

# ----------------------------------------------------------------------------------------
# Celery
# ----------------------------------------------------------------------------------------


def test_celery_autoretry_keeps_the_tasks_signature_visible_through_wrapped() -> None:
    """autoretry_for replaces ``task.run`` with a ``(*args, **kwargs)`` wrapper; its
    ``__wrapped__`` must lead back to the function, or keys would depend on how the
    arguments were spelled (IdempotentTask no longer reads the private ``_orig_run``)."""
    pytest.importorskip("celery")
    from celery import Celery

    from idempotask.integrations.celery import IdempotentTask

    app = Celery(f"hooks{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://")

    @app.task(base=IdempotentTask, bind=True, autoretry_for=(ConnectionError,), max_retries=1)
    def charge(self: Any, order: int, cents: int = 100) -> int:
        return order + cents

    assert list(inspect.signature(charge.run).parameters) == ["order", "cents"]
    assert charge.key_for(7) == charge.key_for(order=7, cents=100)
    assert charge.app.conf.result_expires is not None  # Task.app, not Task._get_app()


# ----------------------------------------------------------------------------------------
# Dramatiq
# ----------------------------------------------------------------------------------------


def _stub_worker(broker: Any) -> Any:
    import dramatiq

    worker = dramatiq.Worker(broker, worker_timeout=50)
    broker.emit_after("process_boot")
    worker.start()
    return worker


def test_dramatiq_workers_run_a_message_through_actor_fn() -> None:
    """IdempotencyMiddleware replaces ``actor.fn``: the worker must call it."""
    dramatiq = pytest.importorskip("dramatiq")
    from dramatiq.brokers.stub import StubBroker

    broker = StubBroker()
    calls: list[str] = []

    @dramatiq.actor(broker=broker, actor_name=f"hooks_{uuid.uuid4().hex[:8]}")
    def original(x: int) -> None:
        calls.append("original")

    original.fn = lambda x: calls.append("replacement")
    original.send(1)
    worker = _stub_worker(broker)
    try:
        broker.join(original.queue_name, timeout=10_000)
        worker.join()
    finally:
        worker.stop()
        broker.emit_before("process_stop")
    assert calls == ["replacement"]


def test_dramatiq_async_actors_keep_their_coroutine_function_as_wrapped() -> None:
    """Dramatiq runs an ``async def`` actor through a sync shim; the middleware finds
    the coroutine function (and its signature) as the shim's ``__wrapped__``."""
    dramatiq = pytest.importorskip("dramatiq")
    from dramatiq.brokers.stub import StubBroker
    from dramatiq.middleware import AsyncIO

    from idempotask.integrations.dramatiq import _unwrap

    broker = StubBroker()
    broker.add_middleware(AsyncIO())

    async def body(x: int) -> int:
        return x

    actor = dramatiq.actor(broker=broker, actor_name=f"hooks_{uuid.uuid4().hex[:8]}")(body)
    assert _unwrap(actor.fn) == (body, True)


def test_dramatiq_retries_re_enqueue_the_message_object_the_actor_ran_with() -> None:
    """The handover of a claim kept by ``dramatiq.Retry`` is written into the running
    message's options; the Retries middleware must re-enqueue that same message (its
    options included), so the retry sees it."""
    dramatiq = pytest.importorskip("dramatiq")
    from dramatiq.brokers.stub import StubBroker

    from idempotask.integrations.dramatiq import HANDOVER_OPTION, IdempotencyMiddleware

    idempotask.configure(backend="memory://")
    broker = StubBroker()
    broker.add_middleware(IdempotencyMiddleware())
    seen: list[Any] = []

    class Options(dramatiq.Middleware):  # type: ignore[misc]
        def before_process_message(self, broker: Any, message: Any) -> None:
            seen.append(message.options.get(HANDOVER_OPTION))

    broker.add_middleware(Options())

    @dramatiq.actor(
        broker=broker,
        actor_name=f"hooks_{uuid.uuid4().hex[:8]}",
        max_retries=2,
        min_backoff=1,
        max_backoff=5,
        idempotency_ttl=60,
    )
    def once(x: int) -> None:
        if len(seen) == 1:
            raise dramatiq.Retry(delay=1)

    once.send(1)
    worker = _stub_worker(broker)
    try:
        broker.join(once.queue_name, timeout=10_000)
        worker.join()
    finally:
        worker.stop()
        broker.emit_before("process_stop")
    assert len(seen) == 2
    assert seen[0] is None
    assert isinstance(seen[1], dict)
    assert set(seen[1]) == {"owner", "ticket"}


# ----------------------------------------------------------------------------------------
# RQ
# ----------------------------------------------------------------------------------------


@pytest.fixture
def rq_connection() -> Iterator[Any]:
    pytest.importorskip("rq")
    from redis import Redis

    conn = Redis.from_url(service_url("redis"))
    try:
        yield conn
    finally:
        conn.close()


@idempotent(name=f"hooks.plain.{uuid.uuid4().hex[:8]}", ttl=60)
def _plain(a: int) -> int:
    return a * 3


def test_rq_jobs_run_their_function_through_the_func_property(rq_connection: Any) -> None:
    """IdempotentJob overrides the public ``Job.func`` property (not the private
    ``_execute``): performing the job must call what ``func`` returns, inside the job."""
    from idempotask.integrations.rq import IdempotentJob

    idempotask.configure(backend="memory://")
    job = IdempotentJob.create(_plain, args=(4,), connection=rq_connection)  # never saved
    assert job.perform() == 12
    record = idempotask.get_backend().get(_plain.key_for(4))
    assert record is not None
    assert record.owner.rpartition("~")[0] == job.id  # the run's own owner


def test_rq_retry_counts_and_worker_lookup_are_where_the_integration_reads_them(
    rq_connection: Any,
) -> None:
    """``Job.retries_left`` (exhausted or not) and a worker found by name with its pid
    (whether jobs run in a forked work horse)."""
    from rq import Queue, Retry, Worker
    from rq.timeouts import JobTimeoutException

    assert issubclass(JobTimeoutException, Exception)
    queue = Queue(f"hooks{uuid.uuid4().hex[:8]}", connection=rq_connection)
    job = queue.enqueue(_plain, 1, retry=Retry(max=2))
    worker = Worker([queue], connection=rq_connection, name=f"hooks-{uuid.uuid4().hex[:8]}")
    try:
        assert job.retries_left == 2
        worker.register_birth()
        found = Worker.find_by_key(
            Worker.redis_worker_namespace_prefix + worker.name, connection=rq_connection
        )
        assert found is not None
        assert found.pid == os.getpid()
    finally:
        worker.register_death()
        rq_connection.delete(worker.key)
        job.delete()
        queue.delete(delete_jobs=True)

"""Celery integration: real worker processes on Redis and on RabbitMQ.

Each broker gets its own namespace, queues and a prefork worker (4 processes) started
with ``celery worker``; the crash test starts two more. Task bodies count their runs in
Redis, so "ran once" is measured across processes, not assumed.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import inspect
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

celery = pytest.importorskip("celery")
redis = pytest.importorskip("redis")

from celery.exceptions import Retry, SoftTimeLimitExceeded  # noqa: E402

import idempotask  # noqa: E402
from idempotask import ConfigurationError, idempotent  # noqa: E402
from idempotask.backends.base import State  # noqa: E402
from idempotask.backends.deadletters import DeadLetterFilter, Status  # noqa: E402
from idempotask.integrations._common import MultiProcessMemoryWarning  # noqa: E402
from idempotask.integrations.celery import (  # noqa: E402
    IdempotentTask,
    _check_worker,
    _hold_for_retry,
)
from idempotask.lease import Lease  # noqa: E402
from tests.conftest import service_url  # noqa: E402
from tests.integrations import _celery_app as capp  # noqa: E402
from tests.integrations import _workers as workers  # noqa: E402

TIMEOUT = 60.0


wait_for = functools.partial(workers.wait_for, timeout=TIMEOUT)


class Worker:
    """One ``celery worker`` process group, stopped by its own pid."""

    def __init__(
        self, env: dict[str, str], name: str, queue: str, log_dir: Path, concurrency: int = 4
    ) -> None:
        self.name = f"{name}@localhost"
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.integrations._celery_app",
            "worker",
            "--pool=prefork",
            f"--concurrency={concurrency}",
            "-Q",
            queue,
            "-n",
            self.name,
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "WARNING",
        ]
        full_env = {**os.environ, **env, "PYTHONPATH": str(workers.ROOT)}
        # Its own session: the worker and its pool processes form one group to kill.
        self.process = workers.start_worker(command, full_env, self.log_path, cwd=workers.ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, client: Any) -> None:
        key = f"{self.env[capp.ENV_NAMESPACE]}:ready:{self.name}"

        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"worker {self.name} exited early:\n{self.log()}")
            return bool(client.exists(key))

        wait_for(ready, f"worker {self.name} to consume")

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """Warm shutdown; SIGKILL whatever is left after 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        self.kill()


@dataclass
class Env:
    """One broker's app, worker, stores and namespace."""

    broker: str
    env: dict[str, str]
    app: Any
    client: Any  # redis-py, for counters and cleanup
    log_dir: Path
    worker: Worker

    @property
    def namespace(self) -> str:
        return self.env[capp.ENV_NAMESPACE]

    def task(self, name: str) -> Any:
        return self.app.tasks[f"itest.{name}"]

    def count(self, task: str, tag: object) -> int:
        return workers.counter_value(self.client, capp.counter(self.namespace, task, tag))

    def configure(self) -> None:
        """Point this test process at the workers' store and dead-letter queue."""
        idempotask.configure(
            backend=self.env[capp.ENV_STORE],
            namespace=self.namespace,
            dead_letter_store=self.env[capp.ENV_DEAD_LETTERS],
            spool_path=self.env[capp.ENV_SPOOL],
        )
        self.app.set_current()  # process_due re-enqueues through the current app


@pytest.fixture(scope="module", params=["redis", "amqp"])
def celery_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    """A broker, an app on it and a prefork worker consuming the session's queue."""
    store = service_url("redis")
    broker = store if request.param == "redis" else service_url("amqp")
    namespace = f"ictest{uuid.uuid4().hex[:10]}{request.param}"
    log_dir = tmp_path_factory.mktemp(f"celery-{request.param}")
    env = {
        capp.ENV_BROKER: broker,
        capp.ENV_RESULTS: store,
        capp.ENV_STORE: store,
        capp.ENV_NAMESPACE: namespace,
        capp.ENV_DEAD_LETTERS: f"{store}?prefix={namespace}dlq",
        capp.ENV_SPOOL: str(log_dir / "spool.jsonl"),
    }
    client = redis.Redis.from_url(store)
    worker = Worker(env, "main", namespace, log_dir)
    try:
        worker.wait_ready(client)
        yield Env(request.param, env, capp.make_app(env), client, log_dir, worker)
    finally:
        worker.stop()
        workers.delete_keys(store, f"{namespace}*")
        client.close()


@pytest.fixture
def cel(celery_env: Env, fresh_config: None) -> Iterator[Env]:
    """The broker's environment, with this process configured like its workers.

    The cyclic garbage collector is off while a test runs and collects afterwards: in
    Celery before 5.7 an ``AsyncResult`` finalized by a collection that lands inside the
    Redis result consumer's own pub/sub write unsubscribes on the same connection and
    deadlocks (celery/celery#10477, fixed by #10497); the lowest-versions matrix hung
    there once. Collected between tests, its finalizer runs outside any write.
    """
    celery_env.configure()
    gc.collect()
    gc.disable()
    try:
        yield celery_env
    finally:
        gc.enable()
        gc.collect()


def letters_of(task: str) -> list[Any]:
    return idempotask.default_queue().query(function=task)


# ----------------------------------------------------------------------------------------
# Real workers, on each broker
# ----------------------------------------------------------------------------------------


def test_twenty_sends_from_threads_positionally_and_by_keyword_run_the_body_once(
    cel: Env,
) -> None:
    """20 concurrent sends of one logical call: one body run, every result the first's."""
    once = cel.task("once")
    sends: list[Callable[[], Any]] = [
        lambda: once.delay(7, 1),
        lambda: once.delay(x=7, y=1),
        lambda: once.apply_async(kwargs={"x": 7, "y": 1}),
        lambda: once.apply_async((7,), {"y": 1}),
    ]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: sends[i % len(sends)](), range(20)))
    assert len({r.id for r in results}) == 20  # twenty messages really went out
    values = [r.get(timeout=TIMEOUT) for r in results]
    assert values == [{"x": 7, "y": 1, "run": 1}] * 20
    assert cel.count("once", "7:1") == 1


def test_two_sends_with_one_explicit_task_id_run_the_body_once(cel: Env) -> None:
    """One message published twice (a producer re-sending with its own task id, or
    kombu's publish retry after a lost confirm): two deliveries, neither redelivered,
    with the same task id. The second must not re-take the first's live claim."""
    once = cel.task("once")
    task_id = f"order-{uuid.uuid4().hex}"
    first = once.apply_async((11, 4), task_id=task_id)
    second = once.apply_async((11, 4), task_id=task_id)
    assert first.get(timeout=TIMEOUT) == {"x": 11, "y": 4, "run": 1}
    assert second.get(timeout=TIMEOUT) == {"x": 11, "y": 4, "run": 1}
    wait_for(lambda: workers.stored(once.key_for(11, 4)) is not None, "the stored result")
    time.sleep(1.0)  # both messages have been handled by now
    assert cel.count("once", "11:4") == 1


def test_enqueue_dedupe_sends_one_message_and_every_send_gets_its_result(cel: Env) -> None:
    """With idempotency_dedupe_enqueue, 20 concurrent sends share one task id."""
    task = cel.task("once_dedupe")
    with ThreadPoolExecutor(20) as pool:
        results = list(
            pool.map(
                lambda i: task.delay(3) if i % 2 else task.apply_async(kwargs={"x": 3}), range(20)
            )
        )
    ids = {r.id for r in results}
    assert len(ids) == 1
    assert [r.get(timeout=TIMEOUT) for r in results] == [{"x": 3, "run": 1}] * 20
    later = task.delay(x=3)  # after completion too, within the window
    assert later.id in ids
    assert later.get(timeout=TIMEOUT) == {"x": 3, "run": 1}
    assert cel.count("once_dedupe", 3) == 1


def test_autoretry_fails_twice_then_succeeds_in_three_runs_under_its_own_claim(
    cel: Env,
) -> None:
    """autoretry_for: three runs, not blocked by its own claim, one result, no letter."""
    task = cel.task("flaky_auto")
    started = time.monotonic()
    assert task.delay("a").get(timeout=TIMEOUT) == {"tag": "a", "run": 3}
    # The claim's lease is 30 s: a retry that had to wait for it would take that long.
    assert time.monotonic() - started < 15
    assert cel.count("flaky_auto", "a") == 3
    assert workers.stored(task.key_for("a")) == {"tag": "a", "run": 3}
    assert letters_of("itest.flaky_auto") == []


def test_self_retry_keeps_the_claim_so_a_duplicate_waits_instead_of_running(cel: Env) -> None:
    """self.retry(): a duplicate sent while the retry is scheduled gets its result."""
    task = cel.task("flaky_manual")
    started = time.monotonic()
    first = task.delay("m")
    wait_for(lambda: cel.count("flaky_manual", "m") >= 1, "the first run")
    duplicate = task.delay(tag="m")  # another producer, another task id, same call
    assert first.get(timeout=TIMEOUT) == {"tag": "m", "run": 3}
    assert duplicate.get(timeout=TIMEOUT) == {"tag": "m", "run": 3}
    assert cel.count("flaky_manual", "m") == 3
    assert time.monotonic() - started < 15  # lease 30 s: the retries never waited on it
    assert letters_of("itest.flaky_manual") == []


def test_exhausted_retries_are_dead_lettered_and_process_due_replays_through_celery(
    cel: Env,
) -> None:
    """After Celery's retries, a letter with the traceback; process_due re-enqueues it."""
    task = cel.task("doomed")
    result = task.delay("d")
    with pytest.raises(TimeoutError):
        result.get(timeout=TIMEOUT)
    letter = wait_for(lambda: next(iter(letters_of("itest.doomed")), None), "the dead letter")
    assert cel.count("doomed", "d") == 2  # the run and its one Celery retry
    assert letter.route == "celery"
    assert letter.key == task.key_for("d")
    assert letter.error_type == "builtins.TimeoutError"
    assert "the gateway timed out on d" in letter.traceback
    assert "in doomed" in letter.traceback  # the body's own frame
    assert (letter.attempts, letter.status) == (1, Status.PENDING)

    queue = idempotask.default_queue()
    report = queue.process_due(
        now=letter.next_retry_at + 1, filter=DeadLetterFilter(function=("itest.doomed",))
    )
    assert [r.outcome for r in report.results] == ["enqueued"]
    # The worker runs it again (with its own Celery retry) and updates the same letter.
    wait_for(lambda: queue.get(letter.id).attempts == 2, "the replay's failure on the letter")
    assert cel.count("doomed", "d") == 4
    assert queue.get(letter.id).status is Status.RETRYING
    assert len(letters_of("itest.doomed")) == 1


def test_a_worker_killed_mid_task_is_replaced_after_the_lease_and_runs_it_once(
    cel: Env,
) -> None:
    """SIGKILL mid-task (acks_late, prefetch 1): another worker runs the task once."""
    task = cel.task("crashy")
    queue = capp.crash_queue(cel.namespace)
    # Redis redelivers an unacknowledged message after the visibility timeout.
    env = {**cel.env, capp.ENV_VISIBILITY: "4"}
    doomed_worker = Worker(env, "crash-a", queue, cel.log_dir, concurrency=1)
    rescuer: Worker | None = None
    try:
        doomed_worker.wait_ready(cel.client)
        result = task.apply_async(("k",), queue=queue)
        wait_for(lambda: cel.count("crashy", "k") == 1, "the first run to start")
        delivered = time.monotonic()
        doomed_worker.kill()
        held = idempotask.get_backend().get(task.key_for("k"))
        assert held is not None  # the dead worker's claim, still in its lease
        assert held.state is State.IN_PROGRESS
        assert held.expires_in is not None
        lease_ends = time.time() + held.expires_in
        # kombu before 5.7 restores unacknowledged messages when a worker starts polling,
        # then only every ~100 s (5.7 adds unacked_restore_interval): start the rescuer
        # once the message is past its 4 s visibility timeout, so its first restore
        # finds it on every kombu release.
        time.sleep(max(0.0, delivered + 5.0 - time.monotonic()))
        rescuer = Worker(env, "crash-b", queue, cel.log_dir, concurrency=1)
        rescuer.wait_ready(cel.client)
        # The broker redelivers the message, which waits out the dead worker's lease.
        assert result.get(timeout=TIMEOUT) == {"tag": "k", "run": 2, "redelivered": True}
    finally:
        doomed_worker.stop()
        if rescuer is not None:
            rescuer.stop()
    second_start = float(cel.client.get(f"{cel.namespace}:started_at:crashy:k:2"))
    assert second_start >= lease_ends - 0.05  # not before the lease ran out
    assert cel.count("crashy", "k") == 2  # two bodies started
    assert cel.count("crashy_done", "k") == 1  # one completed
    assert workers.stored(task.key_for("k")) == {"tag": "k", "run": 2, "redelivered": True}


def test_a_message_redelivered_while_its_first_run_still_runs_waits_for_that_runs_result(
    cel: Env,
) -> None:
    """A task outliving the Redis broker's visibility timeout (the worker alive): the
    restored copy, delivered to another worker, waits for the live run past one lease
    and wait_timeout and answers with its result; it neither runs the body nor fails
    the task id with AlreadyInProgress."""
    if cel.broker != "redis":
        pytest.skip("the visibility timeout is the Redis transport's")
    task = cel.task("outlives_visibility")
    queue = capp.crash_queue(cel.namespace)
    env = {**cel.env, capp.ENV_VISIBILITY: "3"}
    first = Worker(env, "visible-a", queue, cel.log_dir, concurrency=1)
    second: Worker | None = None
    try:
        first.wait_ready(cel.client)
        result = task.apply_async(("v",), queue=queue)
        wait_for(lambda: cel.count("outlives_visibility", "v") == 1, "the first run to start")
        second = Worker(env, "visible-b", queue, cel.log_dir, concurrency=1)
        second.wait_ready(cel.client)
        assert result.get(timeout=TIMEOUT) == {"tag": "v", "run": 1, "redelivered": False}
        time.sleep(2.0)  # the redelivered copy has answered by now
        assert result.state == "SUCCESS"
        assert result.get(timeout=TIMEOUT)["run"] == 1
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert cel.count("outlives_visibility", "v") == 1


def test_a_retry_whose_countdown_outlives_the_visibility_timeout_runs_once(cel: Env) -> None:
    """Redis restores a retry held for its countdown past the visibility timeout, so two
    workers hold copies of it: one takes the handover and runs, the other waits for it
    and returns its result."""
    if cel.broker != "redis":
        pytest.skip("the visibility timeout is the Redis transport's")
    task = cel.task("late_retry")
    queue = capp.crash_queue(cel.namespace)
    env = {**cel.env, capp.ENV_VISIBILITY: "2"}
    pair = [Worker(env, f"eta-{n}", queue, cel.log_dir, concurrency=2) for n in "ab"]
    try:
        for worker in pair:
            worker.wait_ready(cel.client)
        result = task.apply_async(("e",), queue=queue)
        assert result.get(timeout=TIMEOUT) == {"tag": "e", "run": 2}
        time.sleep(3.0)  # any restored copy has run by now
        assert result.get(timeout=TIMEOUT) == {"tag": "e", "run": 2}
    finally:
        for worker in pair:
            worker.stop()
    assert cel.count("late_retry", "e") == 2
    assert letters_of("itest.late_retry") == []


def test_a_hard_time_limit_is_dead_lettered_once_from_the_workers_main_process(cel: Env) -> None:
    """The pool kills the body's process, so the letter comes from the worker's main
    process (Celery releases whose Request.on_timeout runs the task's on_failure)."""
    from celery.worker.request import Request

    # Celery 5.3's on_timeout names only acks_on_failure_or_timeout; 5.7's calls the hook.
    if "task.on_failure(" not in inspect.getsource(Request.on_timeout):
        pytest.skip("this Celery release runs no failure hook for a hard time limit")
    task = cel.task("hard")
    with pytest.raises(Exception, match="TimeLimitExceeded"):
        task.delay("h").get(timeout=TIMEOUT)
    letter = wait_for(lambda: next(iter(letters_of("itest.hard")), None), "the dead letter")
    assert letter.error_type == "billiard.exceptions.TimeLimitExceeded"
    assert letter.key == task.key_for("h")
    assert letter.route == "celery"
    time.sleep(1.0)
    assert len(letters_of("itest.hard")) == 1
    assert cel.count("hard", "h") == 1


def test_the_producer_key_equals_the_key_the_worker_computes_for_send_task(cel: Env) -> None:
    """The header key and the worker's own key (send_task, no header) are the same."""
    task = cel.task("keyed")
    sent = task.apply_async((5,)).get(timeout=TIMEOUT)
    assert sent["header"] == sent["key"] == task.key_for(5) == task.key_for(a=5, b=2)
    by_name = cel.app.send_task("itest.keyed", args=(6,)).get(timeout=TIMEOUT)
    assert by_name["header"] is None
    assert by_name["key"] == task.key_for(6)
    # By name and by keyword, the first call is a duplicate: answered from the store.
    again = cel.app.send_task("itest.keyed", kwargs={"a": 5}).get(timeout=TIMEOUT)
    assert again == sent
    assert cel.count("keyed", 5) == 1


def test_a_soft_time_limit_releases_the_claim_so_the_next_send_runs(cel: Env) -> None:
    """SoftTimeLimitExceeded is never cached: the key is free again at once."""
    task = cel.task("soft")
    first = task.delay("s")
    with pytest.raises(SoftTimeLimitExceeded):
        first.get(timeout=TIMEOUT)
    assert idempotask.get_backend().get(task.key_for("s")) is None
    assert task.delay("s").get(timeout=TIMEOUT) == {"tag": "s", "run": 2}
    assert cel.count("soft", "s") == 2


# ----------------------------------------------------------------------------------------
# Without a broker
# ----------------------------------------------------------------------------------------


def _eager_app() -> Any:
    app = celery.Celery("idempotask_eager_tests", set_as_current=False)
    app.conf.task_always_eager = True
    return app


def test_an_unknown_prefixed_option_is_refused_naming_it() -> None:
    """idempotency_tll (a typo) is an error naming the option and the task."""
    app = _eager_app()

    def charge(order_id: int) -> int:
        return order_id

    with pytest.raises(ConfigurationError, match=r"itest\.typo.*'idempotency_tll'"):
        app.task(base=IdempotentTask, name="itest.typo", idempotency_tll=60, lazy=False)(charge)
    with pytest.raises(ConfigurationError, match="dead_letter_enabled"):
        app.task(base=IdempotentTask, name="itest.typo2", dead_letter_enabled="no", lazy=False)(
            charge
        )


def test_a_prefork_worker_on_the_memory_store_warns_when_it_starts(
    tmp_path: Path,
) -> None:
    """A real prefork worker with 2 processes and memory:// logs the warning."""
    store = service_url("redis")
    namespace = f"ictest{uuid.uuid4().hex[:10]}memory"
    env = {
        capp.ENV_BROKER: store,
        capp.ENV_RESULTS: store,
        capp.ENV_STORE: store,
        capp.ENV_NAMESPACE: namespace,
        capp.ENV_DEAD_LETTERS: "memory://",
        capp.ENV_SPOOL: str(tmp_path / "spool.jsonl"),
        capp.ENV_MEMORY: "1",
    }
    client = redis.Redis.from_url(store)
    worker = Worker(env, "memory", namespace, tmp_path, concurrency=2)
    try:
        worker.wait_ready(client)
    finally:
        worker.stop()
        workers.delete_keys(store, f"{namespace}*")
        client.close()
    assert "MultiProcessMemoryWarning" in worker.log()
    assert "runs tasks in 2 processes" in worker.log()


def test_the_memory_store_in_a_prefork_worker_warns_and_a_solo_worker_does_not() -> None:
    """worker_init: memory:// under prefork with 4 processes cannot deduplicate."""
    idempotask.configure(backend="memory://")
    app = _eager_app()
    with pytest.warns(MultiProcessMemoryWarning, match="4 processes"):
        _check_worker(SimpleNamespace(pool_cls="prefork", concurrency=4, app=app))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_worker(SimpleNamespace(pool_cls="solo", concurrency=1, app=app))


def test_eager_retries_re_take_their_claim_and_only_the_final_failure_is_a_letter() -> None:
    """task_always_eager: the retry re-takes the claim; one letter after max_retries."""
    app = _eager_app()
    runs: list[int] = []
    queue = idempotask.DeadLetterQueue("memory://")

    @app.task(
        base=IdempotentTask,
        bind=True,
        name="itest.eager_flaky",
        max_retries=2,
        idempotency_on_conflict="raise",  # a retry blocked by its own claim would raise
        dead_letter_queue=queue,
    )
    def eager_flaky(self: Any, n: int) -> int:
        runs.append(n)
        if len(runs) < 3:
            raise self.retry(countdown=0)
        return n * 10

    assert eager_flaky.delay(4).get() == 40
    assert len(runs) == 3
    assert eager_flaky.delay(n=4).get() == 40  # a duplicate: answered from the store
    assert len(runs) == 3
    assert queue.query() == []

    @app.task(base=IdempotentTask, name="itest.eager_doomed", dead_letter_queue=queue)
    def eager_doomed(n: int) -> int:
        raise ValueError(f"bad {n}")

    with pytest.raises(ValueError, match="bad 1"):
        eager_doomed.delay(1).get()
    [letter] = queue.query()
    assert (letter.function, letter.route, letter.key) == (
        "itest.eager_doomed",
        "celery",
        eager_doomed.key_for(1),
    )


def test_the_body_sees_its_own_request_id_and_retries_on_every_celery_release() -> None:
    """IdempotentTask runs ``run`` under the request Celery's tracer pushed: before
    Celery 5.5, going through Task.__call__ again pushed a blank one (no id, retries
    always 0), so ``self.request`` lied and ``self.retry()`` misfired."""
    app = _eager_app()
    seen: list[tuple[Any, int]] = []

    @app.task(base=IdempotentTask, bind=True, name="itest.request_seen", max_retries=1)
    def request_seen(self: Any, n: int) -> int:
        seen.append((self.request.id, self.request.retries))
        if len(seen) == 1:
            raise self.retry(countdown=0)
        return n

    result = request_seen.apply_async((5,), task_id="the-task-id")
    assert result.get() == 5
    assert seen == [("the-task-id", 0), ("the-task-id", 1)]


def test_a_retry_holds_the_claim_for_its_countdown_plus_a_lease() -> None:
    """On Retry the kept claim's lease is extended by the countdown (or until the eta)."""
    app = _eager_app()

    @app.task(base=IdempotentTask, name="itest.hold", idempotency_lease=10)
    def hold(n: int) -> int:
        return n

    binding = hold._idempotask()
    backend = idempotask.get_backend()
    key = hold.key_for(1)
    backend.claim(key, "token-1", lease=10, owner="task-1")
    held = Lease(backend, key, "token-1", 10, "itest.hold")

    def expires_in() -> float:
        record = backend.get(key)
        assert record is not None
        assert record.owner == "task-1"
        assert record.expires_in is not None
        return record.expires_in

    _hold_for_retry(binding, held, Retry(when=100))
    assert 105 < expires_in() <= 110
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=300)
    _hold_for_retry(binding, held, Retry(when=eta))
    assert 305 < expires_in() <= 310
    # Once the retry re-took the claim (with its own token), holding changes nothing.
    backend.claim(key, "token-2", lease=10, owner="task-1")
    _hold_for_retry(binding, held, Retry(when=1000))
    assert expires_in() <= 10


def test_celery_signals_are_never_cached_and_retry_keeps_the_claim_only_for_an_owner() -> None:
    """Importing the integration registers Celery's exceptions with the core."""
    raised: list[BaseException] = []

    @idempotent(name="itest.signals", cache_errors=600)
    def body(n: int) -> int:
        raise raised[-1]

    backend = idempotask.get_backend()
    raised.append(SoftTimeLimitExceeded())
    with pytest.raises(SoftTimeLimitExceeded):
        body(1)
    assert backend.get(body.key_for(1)) is None  # released, not cached
    raised.append(Retry(when=0))
    with pytest.raises(Retry):
        body(2)
    assert backend.get(body.key_for(2)) is None  # no owner could re-take it: released
    with pytest.raises(Retry):
        body.using(owner="task-3")(3)
    record = backend.get(body.key_for(3))
    assert record is not None
    assert (record.state, record.owner) == (State.IN_PROGRESS, "task-3")
    raised.append(ValueError("a real failure"))
    with pytest.raises(ValueError, match="a real failure"):
        body.using(owner="task-3")(3)  # the "retry" re-takes its claim, then fails
    record = backend.get(body.key_for(3))
    assert record is not None
    assert record.state is State.FAILED  # cache_errors applies to real failures


def test_plain_idempotent_stacked_under_app_task_runs_once_without_a_producer_key() -> None:
    """@app.task over @idempotent works too: the worker computes the key itself."""
    app = _eager_app()
    runs: list[int] = []

    @app.task(bind=True, name="itest.stacked")
    @idempotent(name="itest.stacked", exclude_args=("self",))
    def stacked(self: Any, n: int, scale: int = 2) -> int:
        runs.append(n)
        return n * scale

    assert stacked.delay(5).get() == 10
    assert stacked.delay(n=5, scale=2).get() == 10
    assert stacked(5) == 10
    assert runs == [5]

    @app.task(base=IdempotentTask, bind=True, name="itest.stacked_twin")
    def twin(self: Any, n: int, scale: int = 2) -> int:
        return n * scale

    # The same signature gives the same digest either way: switching keeps the keys.
    stacked_key = stacked.run.key_for(5)  # run is bound to the task, like the call
    assert stacked_key.startswith("idempotask:itest.stacked:v1:")
    assert stacked_key.rsplit(":", 1)[1] == twin.key_for(5).rsplit(":", 1)[1]

"""The RQ integration with real ``rq worker`` processes on a real Redis.

Every test gets its own namespace, queue and dead-letter prefix (under one random
per-module prefix, deleted at the end); workers are started with the job module
``tests.integrations._rq_jobs`` importable and are stopped (SIGTERM, then SIGKILL of the
whole process group) when the test ends, whatever happened.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("rq")

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.registry import StartedJobRegistry

import idempotask
from idempotask.backends.base import State
from idempotask.backends.deadletters import DeadLetterFilter, Status
from idempotask.deadletter import Redacted, default_queue, letter_arguments, unregister_route
from idempotask.errors import ConfigurationError
from idempotask.integrations import rq as rq_integration
from idempotask.integrations.rq import (
    LETTER_META,
    ROUTE,
    enqueue_once,
    idempotent_job,
    job_id_for,
    register_replay_route,
)
from idempotask.serializers import get_serializer
from tests.conftest import service_url
from tests.integrations import _rq_jobs as jobs
from tests.integrations._workers import (
    counter_value,
    delete_keys,
    in_threads,
    kill_worker,
    read_logs,
    start_worker,
    stop_worker,
    stored,
    wait_for,
    with_query,
    worker_env,
)

PREFIX = f"idqrq{uuid.uuid4().hex[:8]}"  # every key this module creates contains it
_numbers = itertools.count()


@dataclass
class Env:
    """One test's namespace, queue, stores and worker processes."""

    redis_url: str
    namespace: str
    dead_letters: str
    spool: Path
    logs: Path
    conn: Redis
    queue: Queue
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_logs: dict[int, Path] = field(default_factory=dict)

    def count(self, name: str) -> int:
        return counter_value(self.conn, jobs.counter(self.namespace, name))

    def worker(
        self,
        *,
        burst: bool = True,
        job_class: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start an ``rq worker`` on this test's queue, with the dead-letter handler."""
        name = f"{self.namespace}-w{len(self.workers)}"
        cmd = [
            sys.executable,
            "-c",
            "import sys; from rq.cli import main; sys.argv[0] = 'rq'; main()",
            "worker",
            "--url",
            self.redis_url,
            "--name",
            name,
            "--exception-handler",
            "idempotask.integrations.rq.dead_letter_handler",
            "--logging_level",
            "INFO",
        ]
        if burst:
            cmd.append("--burst")
        if job_class is not None:
            cmd += ["--job-class", job_class]
        cmd.append(self.queue.name)
        child_env = worker_env(
            **{
                jobs.ENV_WORKER: "1",
                jobs.ENV_NAMESPACE: self.namespace,
                jobs.ENV_REDIS: self.redis_url,
                jobs.ENV_DEAD_LETTERS: self.dead_letters,
                jobs.ENV_SPOOL: str(self.spool),
                "IDEMPOTASK_URL": self.redis_url,
                **(env or {}),
            }
        )
        log = self.logs / f"{name}.log"
        proc = start_worker(cmd, child_env, log)
        self.workers.append(proc)
        self.worker_logs[proc.pid] = log
        return proc

    def finish(self, *procs: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        """Wait for burst workers to run out of work, then for them to exit.

        A burst worker that has logged "done, quitting" has finished every job; it may
        still take up to 60 s to exit, because RQ 3.0 subscribes its pubsub thread with
        ``sleep_time=60`` and redis-py 8.2's ``PubSubWorkerThread.stop()`` waits for that
        thread's read to time out (it reproduces without idempotask). Past a short grace
        such a worker is stopped, so the tests measure the work, not RQ's shutdown.
        """
        for proc in procs:
            log = self.worker_logs[proc.pid]
            deadline = time.monotonic() + timeout
            while proc.poll() is None and ": done, quitting" not in _text(log):
                if time.monotonic() >= deadline:
                    pytest.fail(f"rq worker {proc.pid} still working after {timeout:g}s")
                time.sleep(0.05)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                stop_worker(proc)

    def log(self) -> str:
        return read_logs(self.logs.glob("*.log"))


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _delete_queue_jobs(conn: Redis, queue: Queue) -> None:
    ids = set(queue.get_job_ids())
    for registry in (
        queue.started_job_registry,
        queue.finished_job_registry,
        queue.failed_job_registry,
        queue.deferred_job_registry,
        queue.scheduled_job_registry,
        queue.canceled_job_registry,
    ):
        ids.update(registry.get_job_ids())
    for job_id in ids:
        try:
            Job.fetch(job_id, connection=conn).delete()
        except Exception:
            conn.delete(f"rq:job:{job_id}")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url = service_url("redis")
    yield url
    delete_keys(url, f"*{PREFIX}*")


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> Iterator[Env]:
    namespace = f"{PREFIX}-{next(_numbers)}"
    conn = Redis.from_url(redis_url)
    logs = tmp_path / "logs"
    logs.mkdir()
    e = Env(
        redis_url=redis_url,
        namespace=namespace,
        dead_letters=with_query(redis_url, prefix=namespace),
        spool=tmp_path / "spool.jsonl",
        logs=logs,
        conn=conn,
        queue=Queue(namespace, connection=conn),
    )
    idempotask.configure(
        backend=redis_url,
        namespace=namespace,
        dead_letter_store=e.dead_letters,
        spool_path=e.spool,
    )
    try:
        yield e
    finally:
        for proc in e.workers:
            stop_worker(proc, descendants=True)  # the worker and its work horses
        unregister_route(ROUTE)
        _delete_queue_jobs(conn, e.queue)
        conn.close()


# ----------------------------------------------------------------------------------------
# Duplicates
# ----------------------------------------------------------------------------------------


def test_one_call_enqueued_20_times_from_threads_is_one_job_whose_body_runs_once(
    env: Env,
) -> None:
    """enqueue_once from 20 threads, positionally and by keyword: one job, one run."""
    spellings: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((2, 3), {}),
        ((), {"a": 2, "b": 3}),
        ((2,), {"b": 3, "scale": 1}),
    ]
    found: list[str] = []
    barrier = threading.Barrier(20)

    def enqueue(i: int) -> None:
        args, kwargs = spellings[i % len(spellings)]
        barrier.wait()
        found.append(enqueue_once(env.queue, jobs.add, *args, **kwargs).id)

    in_threads(enqueue, 20)

    assert len(found) == 20
    assert set(found) == {job_id_for(jobs.add, 2, 3)}
    assert env.queue.job_ids == [found[0]]
    env.finish(env.worker())

    job = Job.fetch(found[0], connection=env.conn)
    assert job.get_status() == "finished"
    assert job.return_value() == {"sum": 5, "pair": (2, 3)}
    assert env.count("add") == 1
    # Once finished, the same call still returns that job while the store has its result.
    again = enqueue_once(env.queue, jobs.add, a=2, b=3)
    assert again.id == job.id
    assert again.get_status() == "finished"
    assert env.queue.count == 0


def test_twenty_separate_jobs_of_one_call_run_its_body_once_and_all_return_its_result(
    env: Env,
) -> None:
    """Plain Queue.enqueue 20 times (no enqueue-time dedup), two workers at once: the
    body runs once and every job's return value equals the first."""
    spellings: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((4, 5), {}),
        ((), {"a": 4, "b": 5}),
        ((4,), {"b": 5}),
        ((4, 5), {"scale": 1}),
    ]
    enqueued: list[Job] = []
    lock = threading.Lock()

    def enqueue(i: int) -> None:
        args, kwargs = spellings[i % len(spellings)]
        job = env.queue.enqueue(jobs.add, *args, **kwargs)
        with lock:
            enqueued.append(job)

    in_threads(enqueue, 20)
    assert len({job.id for job in enqueued}) == 20

    env.finish(env.worker(), env.worker())

    results = [job.return_value(refresh=True) for job in enqueued]
    assert results == [{"sum": 9, "pair": (4, 5)}] * 20
    assert env.count("add") == 1
    assert stored(jobs.add.key_for(4, 5)) == {"sum": 9, "pair": (4, 5)}
    record = idempotask.config.get_backend().get(jobs.add.key_for(4, 5))
    assert record is not None
    # The claim's owner is the run of one of the jobs: its id and a per-run suffix.
    assert record.owner.rpartition("~")[0] in {job.id for job in enqueued}


def test_a_plain_idempotent_function_runs_once_in_a_worker_with_the_idempotent_job_class(
    env: Env,
) -> None:
    """@idempotent without the integration's decorator, under IdempotentJob."""
    enqueued = [
        env.queue.enqueue(jobs.plain_add, 1, 2)
        if i % 2
        else env.queue.enqueue(jobs.plain_add, a=1, b=2)
        for i in range(10)
    ]
    env.finish(env.worker(job_class="idempotask.integrations.rq.IdempotentJob"))
    assert [job.return_value(refresh=True) for job in enqueued] == [(1, 3)] * 10
    assert env.count("plain_add") == 1
    # The job class made the run of the job that ran the body the claim's owner.
    record = idempotask.config.get_backend().get(jobs.plain_add.key_for(1, 2))
    assert record is not None
    assert record.owner.rpartition("~")[0] in {job.id for job in enqueued}


def test_enqueue_once_replaces_an_ended_job_only_once_the_store_forgot_the_call(
    env: Env,
) -> None:
    """A finished job is returned while its result is stored; after forget() the same
    call gets a fresh job under the same id, which runs."""
    first = enqueue_once(env.queue, jobs.add, 6, 1)
    env.finish(env.worker())
    assert env.count("add") == 1
    assert enqueue_once(env.queue, jobs.add, 6, b=1).get_status() == "finished"

    assert jobs.add.forget(6, 1)
    replaced = enqueue_once(env.queue, jobs.add, 6, b=1)
    assert replaced.id == first.id
    assert replaced.get_status() == "queued"
    assert env.queue.job_ids == [first.id]
    env.finish(env.worker())
    assert env.count("add") == 2
    assert Job.fetch(first.id, connection=env.conn).return_value() == {"sum": 7, "pair": (6, 1)}


def test_enqueue_once_replaces_a_failed_job_unless_the_store_caches_its_failure(
    env: Env,
) -> None:
    """A failure that released the key: the call is enqueued again under the same id (and
    its letter updated). A failure cached with cache_errors answers for the call: the
    failed job is returned and nothing runs."""
    failed = enqueue_once(env.queue, jobs.always_fails, 8)
    env.finish(env.worker())
    assert failed.get_status(refresh=True) == "failed"
    again = enqueue_once(env.queue, jobs.always_fails, n=8)
    assert again.id == failed.id
    assert again.get_status() == "queued"
    env.finish(env.worker())
    assert env.count("always_fails:8") == 2
    (letter,) = default_queue().query(function="tests.integrations._rq_jobs.always_fails")
    assert letter.id == failed.id
    assert letter.attempts == 2

    cached = enqueue_once(env.queue, jobs.flaky, 30)
    env.finish(env.worker())
    assert cached.get_status(refresh=True) == "failed"
    assert env.count("flaky:30") == 1
    assert enqueue_once(env.queue, jobs.flaky, n=30).get_status() == "failed"
    assert env.queue.count == 0


# ----------------------------------------------------------------------------------------
# RQ's retries and dead letters
# ----------------------------------------------------------------------------------------


def test_a_job_failing_twice_then_succeeding_under_rq_retry_runs_three_times_without_letter(
    env: Env,
) -> None:
    """Retry(max=2): three runs in all, each retry re-taking the job's own claim (its
    cached failures answer duplicates, not its retries), one stored result, no letter."""
    job = env.queue.enqueue(jobs.flaky, 21, retry=Retry(max=2))
    env.finish(env.worker())

    assert job.get_status(refresh=True) == "finished"
    assert job.return_value() == 42
    assert env.count("flaky:21") == 3
    assert stored(jobs.flaky.key_for(21)) == 42
    assert default_queue().query(function="tests.integrations._rq_jobs.flaky") == []
    # A duplicate is answered from the store.
    dup = env.queue.enqueue(jobs.flaky, n=21)
    env.finish(env.worker())
    assert dup.return_value(refresh=True) == 42
    assert env.count("flaky:21") == 3


def test_a_job_that_always_fails_is_dead_lettered_after_its_retries_and_replayed_through_rq(
    env: Env,
) -> None:
    """After Retry(max=2) the job becomes one dead letter (traceback, redacted
    arguments, key, route "rq"); process_due re-enqueues it with Queue.enqueue_call, the
    worker runs it, and its failure updates the same letter."""
    job = env.queue.enqueue(jobs.always_fails, 7, "tok", retry=Retry(max=2))
    env.finish(env.worker())
    assert job.get_status(refresh=True) == "failed"
    assert env.count("always_fails:7") == 3

    name = "tests.integrations._rq_jobs.always_fails"
    (letter,) = default_queue().query(function=name)
    assert letter.id == job.id
    assert letter.route == ROUTE
    assert letter.status is Status.PENDING
    assert letter.kind == "transient"
    assert letter.attempts == 1
    assert letter.error_type == "builtins.ConnectionError"
    assert "upstream unavailable for 7" in letter.message
    assert "in always_fails" in letter.traceback
    assert "ConnectionError" in letter.traceback
    assert letter.key == jobs.always_fails.key_for(7, "tok")
    arguments = get_serializer("json").loads(letter.arguments)
    assert arguments == {"n": 7, "secret": "tok"}

    register_replay_route(env.conn)
    report = default_queue().process_due(now=time.time() + 24 * 3600)
    assert [r.outcome for r in report.results] == ["enqueued"]
    (replayed_id,) = env.queue.job_ids
    replayed = Job.fetch(replayed_id, connection=env.conn)
    assert replayed.func_name == name
    assert replayed.meta[LETTER_META] == letter.id
    assert (replayed.args, replayed.kwargs) in (((7, "tok"), {}), ((7,), {"secret": "tok"}))

    env.finish(env.worker())
    assert env.count("always_fails:7") == 4
    (updated,) = default_queue().query(function=name)
    assert updated.id == letter.id
    assert updated.attempts == 2
    assert updated.status is Status.RETRYING


def test_a_job_whose_letter_lost_an_argument_to_redaction_is_held_not_replayed(
    env: Env,
) -> None:
    """dead_letter_redact replaced the card: a replay would charge "<redacted>" (or the
    default), so the letter waits for a person, says why, and nothing is enqueued."""
    job = env.queue.enqueue(jobs.charge_fails, 9, "4111 1111 1111 1111")
    env.finish(env.worker())
    assert job.get_status(refresh=True) == "failed"
    name = "tests.integrations._rq_jobs.charge_fails"
    (letter,) = default_queue().query(function=name)
    kept = letter_arguments(letter)
    assert kept.values is not None
    assert kept.values["n"] == 9
    assert isinstance(kept.values["card"], Redacted)
    assert "4111" not in letter.arguments.decode()

    register_replay_route(env.conn)
    report = default_queue().process_due(
        now=time.time() + 24 * 3600, filter=DeadLetterFilter(function=(name,))
    )
    assert [r.outcome for r in report.results] == ["held"]
    assert "card" in report.results[0].reason
    assert env.queue.job_ids == []
    assert env.count("charge_fails:9") == 1
    assert default_queue().get(letter.id).status is Status.PENDING


# ----------------------------------------------------------------------------------------
# Dead workers
# ----------------------------------------------------------------------------------------


def test_a_worker_killed_mid_job_leaves_the_call_to_another_worker_after_the_lease(
    env: Env,
) -> None:
    """SIGKILL the worker (and its work horse) while the body runs: a duplicate job in
    another worker waits out the dead claim's lease, then runs the body once."""
    first = env.queue.enqueue(jobs.slow, 1)
    worker = env.worker(burst=False)
    wait_for(lambda: env.count("slow:1:started") == 1, "the first run to start")
    kill_worker(
        worker, signal.SIGKILL, descendants=True
    )  # the worker and the work horse running the body
    worker.wait(timeout=10)
    killed = time.monotonic()

    duplicate = env.queue.enqueue(jobs.slow, n=1)
    env.finish(env.worker())
    assert duplicate.get_status(refresh=True) == "finished"
    assert duplicate.return_value() == {"n": 1, "run": 2}
    assert env.count("slow:1:started") == 2
    assert env.count("slow:1:done") == 1
    # The claim was renewed every third of the lease until the kill, so it survived it
    # by at least two thirds of a lease.
    assert time.monotonic() - killed >= jobs.LEASE * 2 / 3 - 0.1
    assert first.get_status(refresh=True) == "started"  # until RQ notices the dead worker

    later = env.queue.enqueue(jobs.slow, 1)
    env.finish(env.worker())
    assert later.return_value(refresh=True) == {"n": 1, "run": 2}
    assert env.count("slow:1:done") == 1


def test_rq_re_running_a_job_whose_worker_died_waits_out_the_dead_runs_lease_then_runs_it(
    env: Env,
) -> None:
    """RQ re-runs an abandoned job (its Retry) under the same job id. That run never
    re-takes the dead run's claim: it waits for it past its own short wait_timeout (the
    claim is its own job's) until the lease runs out, then runs the body once."""
    job = env.queue.enqueue(jobs.slow_owned, 2, retry=Retry(max=1))
    worker = env.worker(burst=False)
    wait_for(lambda: env.count("slow_owned:2:started") == 1, "the first run to start")
    kill_worker(worker, signal.SIGKILL, descendants=True)
    worker.wait(timeout=10)
    held = idempotask.config.get_backend().get(jobs.slow_owned.key_for(2))
    assert held is not None
    assert held.state is State.IN_PROGRESS
    assert held.expires_in is not None
    lease_ends = time.time() + held.expires_in

    # RQ's maintenance finds abandoned jobs once their heartbeat (at least 60 s) expired;
    # run that same cleanup now, as if the time had passed.
    registry = StartedJobRegistry(env.queue.name, connection=env.conn)
    registry.cleanup(timestamp=time.time() + 3600)
    assert job.get_status(refresh=True) == "queued"

    env.finish(env.worker())
    assert job.get_status(refresh=True) == "finished"
    assert job.return_value() == {"n": 2, "run": 2}
    assert env.count("slow_owned:2:done") == 1
    second_start = float(env.conn.get(jobs.counter(env.namespace, "slow_owned:2:started_at:2")))
    assert second_start >= lease_ends - 0.05  # not before the dead run's lease ran out


def test_a_job_re_queued_while_its_stalled_worker_still_runs_it_waits_for_that_run(
    env: Env,
) -> None:
    """SIGSTOP the worker and its work horse mid-body; RQ's maintenance, finding the
    heartbeat expired, re-queues the job (its Retry) and another worker takes it. That
    run must not run the body beside the stalled one: it waits, the stalled worker is
    resumed within its lease and stores its result, and the re-run returns it."""
    job = env.queue.enqueue(jobs.stalls, 5, retry=Retry(max=1))
    stalled = env.worker(burst=False)
    wait_for(lambda: env.count("stalls:5:started") == 1, "the first run to start")
    kill_worker(stalled, signal.SIGSTOP, descendants=True)
    try:
        registry = StartedJobRegistry(env.queue.name, connection=env.conn)
        registry.cleanup(timestamp=time.time() + 3600)  # as if the heartbeat had expired
        assert job.get_status(refresh=True) == "queued"
        second = env.worker()
        wait_for(lambda: job.get_status(refresh=True) == "started", "the second worker to take it")
        time.sleep(1.0)  # room for a second run of the body to start, were it allowed to
        assert env.count("stalls:5:started") == 1
    finally:
        kill_worker(stalled, signal.SIGCONT, descendants=True)
    env.finish(second)
    assert env.count("stalls:5:started") == 1
    assert env.count("stalls:5:done") == 1
    assert job.get_status(refresh=True) == "finished"
    assert job.return_value() == {"n": 5, "run": 1}


def test_a_job_abandoned_by_a_dead_worker_without_retries_left_becomes_a_dead_letter(
    env: Env,
) -> None:
    """RQ reports a job whose worker died to the exception handlers (AbandonedJobError)
    when its maintenance finds it; with no retry left it is dead-lettered."""
    job = env.queue.enqueue(jobs.slow, 3)
    worker = env.worker(burst=False)
    wait_for(lambda: env.count("slow:3:started") == 1, "the run to start")
    kill_worker(worker, signal.SIGKILL, descendants=True)
    worker.wait(timeout=10)

    registry = StartedJobRegistry(env.queue.name, connection=env.conn)
    registry.cleanup(
        timestamp=time.time() + 3600, exception_handlers=[rq_integration.dead_letter_handler]
    )
    assert job.get_status(refresh=True) == "failed"
    (letter,) = default_queue().query(function="tests.integrations._rq_jobs.slow")
    assert letter.id == job.id
    assert letter.error_type == "rq.exceptions.AbandonedJobError"
    assert get_serializer("json").loads(letter.arguments) == {"n": 3}


def test_the_memory_store_in_a_forking_worker_is_warned_about(env: Env) -> None:
    """Each job runs in a fresh work horse, where memory:// cannot deduplicate."""
    env.queue.enqueue(jobs.add, 100)
    env.finish(env.worker(env={"IDEMPOTASK_URL": "memory://"}))
    assert "MultiProcessMemoryWarning" in env.log()
    assert "memory://" in env.log()


# ----------------------------------------------------------------------------------------
# Options and refusals (no worker)
# ----------------------------------------------------------------------------------------


def test_job_ids_are_derived_from_the_key_so_argument_spellings_agree(env: Env) -> None:
    """Positional, keyword and defaulted spellings of one call give one job id."""
    assert job_id_for(jobs.add, 1, 2) == job_id_for(jobs.add, a=1, b=2)
    assert job_id_for(jobs.add, 1, 2) == job_id_for(jobs.add, 1, b=2, scale=1)
    assert job_id_for(jobs.add, 1, 2) != job_id_for(jobs.add, 2, 1)
    assert job_id_for(jobs.add, 1).startswith("idem-")
    assert ":" not in job_id_for(jobs.add, 1)


def test_enqueue_once_refuses_what_would_break_deduplication(env: Env) -> None:
    """job_id, unique, pipeline, prefixed options and non-idempotent functions."""
    with pytest.raises(ConfigurationError, match="job_id"):
        enqueue_once(env.queue, jobs.add, 1, job_id="mine")
    with pytest.raises(ConfigurationError, match="pipeline"):
        enqueue_once(env.queue, jobs.add, 1, pipeline=env.conn.pipeline())
    with pytest.raises(ConfigurationError, match="belong on the job function"):
        enqueue_once(env.queue, jobs.add, 1, idempotency_ttl=5)
    with pytest.raises(ConfigurationError, match="not idempotent"):
        enqueue_once(env.queue, print, 1)

    def lookalike(order: int) -> int:  # a key_for of its own, not made by @idempotent
        return order

    lookalike.key_for = lambda order: f"order:{order}"  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="not idempotent"):
        enqueue_once(env.queue, lookalike, 1)
    with pytest.raises(ConfigurationError, match="not idempotent"):
        job_id_for(lookalike, 1)
    assert env.queue.count == 0


def test_enqueue_once_passes_rq_options_through(env: Env) -> None:
    """RQ's own keywords reach RQ; the rest are the function's arguments."""
    job = enqueue_once(
        env.queue, jobs.add, 3, b=4, job_timeout=77, result_ttl=99, meta={"who": "test"}
    )
    assert job.timeout == 77
    assert job.result_ttl == 99
    assert job.meta == {"who": "test"}
    assert job.args == (3,)
    assert job.kwargs == {"b": 4}
    explicit = enqueue_once(env.queue, jobs.add, args=(3,), kwargs={"b": 4})
    assert explicit.id == job.id


def test_idempotent_job_refuses_unknown_and_doubled_options() -> None:
    """Unknown prefixed names, unprefixed names and a second idempotency decorator."""
    with pytest.raises(ConfigurationError, match="idempotency_tll"):
        idempotent_job(idempotency_tll=5)(lambda: None)
    with pytest.raises(ConfigurationError, match="dead_letter_critcal"):
        idempotent_job(dead_letter_critcal=True)(lambda: None)
    with pytest.raises(ConfigurationError, match="'ttl'"):
        idempotent_job(ttl=5)(lambda: None)
    with pytest.raises(ConfigurationError, match="already decorated"):
        idempotent_job(jobs.plain_add)
    with pytest.raises(ConfigurationError, match="dead_letter_queue"):
        idempotent_job(dead_letter_queue="redis://")(lambda: None)


def test_a_job_function_called_outside_a_worker_is_plain_idempotent(env: Env) -> None:
    """No current job: no owner, same key and store."""
    assert jobs.add(50, 1) == {"sum": 51, "pair": (50, 1)}
    assert jobs.add(a=50, b=1) == {"sum": 51, "pair": (50, 1)}
    assert env.count("add") == 1
    assert rq_integration.ROUTE == "rq"


def test_a_letter_alone_cannot_make_the_replay_route_enqueue_any_function(
    env: Env,
) -> None:
    """A letter written into the dead-letter store naming os.system, or a module nobody
    imported, with no job of RQ's behind it: nothing is enqueued (a worker would run it)
    and no module is imported."""
    assert "this" not in sys.modules
    for function, arguments in (("os.system", {"command": "true"}), ("this.s", {})):
        default_queue().record(function, ConnectionError("x"), arguments=arguments, route=ROUTE)
    register_replay_route(env.conn, queue=env.queue.name)
    report = default_queue().process_due(now=time.time() + 24 * 3600)
    assert [r.outcome for r in report.results] == ["skipped", "skipped"]
    assert "RQ no longer keeps job" in report.results[0].reason
    assert env.queue.job_ids == []
    assert "this" not in sys.modules


def test_the_replay_route_falls_back_to_the_default_queue_when_the_job_is_gone(
    env: Env,
) -> None:
    """A letter whose job RQ no longer keeps is enqueued on the route's queue."""
    letter = default_queue().record(
        "tests.integrations._rq_jobs.add",
        ConnectionError("x"),
        arguments={"a": 1, "b": 2, "scale": 3},
        route=ROUTE,
    )
    register_replay_route(env.conn, queue=env.queue.name)
    report = default_queue().process_due(now=time.time() + 24 * 3600)
    assert [r.outcome for r in report.results] == ["enqueued"]
    (job_id,) = env.queue.job_ids
    job = Job.fetch(job_id, connection=env.conn)
    assert job.args == (1, 2)
    assert job.kwargs == {"scale": 3}
    assert job.meta[LETTER_META] == letter.id
    with pytest.raises(NoSuchJobError):
        Job.fetch(letter.id, connection=env.conn)


def test_a_replay_sends_star_args_positionally_when_the_letter_lacks_a_parameter_before_them(
    env: Env,
) -> None:
    """A letter recorded before ``b=1`` was added in front of ``*rest`` has no ``b``: the
    route passes b's default so that ``rest``'s items stay positional (before, they were
    sent as a keyword ``rest=[2, 3]`` into ``**extra``)."""
    default_queue().record(
        "tests.integrations._rq_jobs.spread",
        ConnectionError("x"),
        arguments={"a": 1, "rest": (2, 3), "extra": {"z": 9}},
        route=ROUTE,
    )
    register_replay_route(env.conn, queue=env.queue.name)
    report = default_queue().process_due(now=time.time() + 24 * 3600)
    assert [r.outcome for r in report.results] == ["enqueued"]
    (job_id,) = env.queue.job_ids
    job = Job.fetch(job_id, connection=env.conn)
    assert job.args == (1, 1, 2, 3)
    assert job.kwargs == {"z": 9}

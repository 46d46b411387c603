"""The Dramatiq integration with real ``dramatiq`` worker processes on RabbitMQ.

The broker is RabbitMQ (``IDEMPOTASK_AMQP_URL``), with the Results middleware and the
idempotency store on Redis. One queue and namespace per test session (random, deleted at
the end); tests keep apart by their arguments. Workers are started per test and stopped
(SIGTERM, then SIGKILL of their process group) when the test ends, whatever happened.
The last tests need no worker: they check options on an in-process stub broker.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

pytest.importorskip("dramatiq")
pytest.importorskip("pika")

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO
from redis import Redis

import idempotask
from idempotask import dead_letter, idempotent
from idempotask.backends.base import State
from idempotask.backends.deadletters import DeadLetterFilter, Status
from idempotask.deadletter import Redacted, default_queue, letter_arguments
from idempotask.errors import ConfigurationError
from idempotask.integrations.dramatiq import (
    LETTER_OPTION,
    ROUTE,
    ActorOptionError,
    IdempotencyMiddleware,
)
from idempotask.serializers import get_serializer
from tests.conftest import service_url
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

PREFIX = f"idqdr{uuid.uuid4().hex[:8]}"  # every queue and key this module creates has it
RESULT_WAIT_MS = 30_000
# The environment tests.integrations._dramatiq_actors reads when imported.
ENV_NAMESPACE = "IDEMPOTASK_DRAMATIQ_TEST_NAMESPACE"
ENV_BROKER = "IDEMPOTASK_DRAMATIQ_TEST_BROKER"
ENV_REDIS = "IDEMPOTASK_DRAMATIQ_TEST_REDIS"
ENV_DEAD_LETTERS = "IDEMPOTASK_DRAMATIQ_TEST_DEAD_LETTERS"
ENV_SPOOL = "IDEMPOTASK_DRAMATIQ_TEST_SPOOL"


def _pika_url(url: str) -> str:
    """Kombu's ``amqp://host//`` (vhost "/") in pika's spelling, ``amqp://host/%2F``."""
    parts = urlsplit(url)
    if parts.path == "//":
        parts = parts._replace(path="/%2F")
    return urlunsplit(parts)


@pytest.fixture(scope="module")
def actors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The actors module, imported with this session's broker, queue and stores (it reads
    them from the environment when imported, as the worker processes do)."""
    redis_url = service_url("redis")
    amqp_url = _pika_url(service_url("amqp"))
    patch = pytest.MonkeyPatch()
    patch.setenv(ENV_NAMESPACE, PREFIX)
    patch.setenv(ENV_BROKER, amqp_url)
    patch.setenv(ENV_REDIS, redis_url)
    patch.setenv(ENV_DEAD_LETTERS, with_query(redis_url, prefix=PREFIX))
    patch.setenv(ENV_SPOOL, str(tmp_path_factory.mktemp("spool") / "spool.jsonl"))
    module = importlib.import_module("tests.integrations._dramatiq_actors")
    assert module.NAMESPACE == PREFIX
    try:
        yield module
    finally:
        broker = module.broker
        try:
            channel = broker.channel
            for queue in (module.QUEUE, f"{module.QUEUE}.DQ", f"{module.QUEUE}.XQ"):
                channel.queue_delete(queue)
        finally:
            broker.close()
        delete_keys(redis_url, f"*{PREFIX}*")
        patch.undo()


@dataclass
class Env:
    """One test's view of the session: the actors, stores and worker processes."""

    actors: ModuleType
    redis: Redis
    logs: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def count(self, name: str) -> int:
        return counter_value(self.redis, self.actors.counter(name))

    def worker(
        self, *, threads: int = 4, processes: int = 1, **env: str
    ) -> subprocess.Popen[bytes]:
        """Start ``dramatiq`` on the session's queue."""
        cmd = [
            sys.executable,
            "-m",
            "dramatiq",
            "tests.integrations._dramatiq_actors",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--queues",
            self.actors.QUEUE,
        ]
        child_env = worker_env(
            **{
                "IDEMPOTASK_DRAMATIQ_TEST_WORKER": "1",
                "IDEMPOTASK_URL": os.environ[ENV_REDIS],
                **env,
            }
        )
        log = self.logs / f"worker{len(self.workers)}.log"
        proc = start_worker(cmd, child_env, log)
        self.workers.append(proc)
        return proc

    def log(self) -> str:
        return read_logs(self.logs.glob("*.log"))


@pytest.fixture
def env(actors: ModuleType, tmp_path: Path) -> Iterator[Env]:
    idempotask.configure(
        backend=os.environ[ENV_REDIS],
        namespace=actors.NAMESPACE,
        dead_letter_store=os.environ[ENV_DEAD_LETTERS],
        spool_path=os.environ[ENV_SPOOL],
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    e = Env(actors=actors, redis=Redis.from_url(os.environ[ENV_REDIS]), logs=logs)
    try:
        yield e
    finally:
        for proc in e.workers:
            stop_worker(proc)  # the CLI and its worker processes
        actors.broker.flush_all()  # nothing a test left behind reaches the next one
        e.redis.close()


# ----------------------------------------------------------------------------------------
# Duplicates
# ----------------------------------------------------------------------------------------


def test_one_call_sent_20_times_from_threads_runs_once_and_every_result_is_the_first(
    env: Env,
) -> None:
    """20 messages (positional and keyword spellings, sent concurrently), a worker with 4
    threads: the body runs once; the Results middleware has the same value for all."""
    add = env.actors.add
    spellings: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((2, 3), {}),
        ((), {"a": 2, "b": 3}),
        ((2,), {"b": 3, "scale": 1}),
    ]
    messages: list[Any] = []
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    def send(i: int) -> None:
        args, kwargs = spellings[i % len(spellings)]
        barrier.wait()
        message = add.send_with_options(args=args, kwargs=kwargs)
        with lock:
            messages.append(message)

    in_threads(send, 20)
    assert len({m.message_id for m in messages}) == 20
    env.worker(threads=4)

    results = [m.get_result(block=True, timeout=RESULT_WAIT_MS) for m in messages]
    assert results == [{"sum": 5, "pair": [2, 3]}] * 20
    assert env.count("add") == 1
    assert stored(add.fn.key_for(2, 3)) == {"sum": 5, "pair": [2, 3]}


# ----------------------------------------------------------------------------------------
# Retries and dead letters
# ----------------------------------------------------------------------------------------


def test_a_message_failing_twice_then_succeeding_under_retries_runs_three_times_without_letter(
    env: Env,
) -> None:
    """max_retries=2: three runs of one message (its id kept across retries, so each
    retry re-takes its own claim and skips its own cached failure), one stored result,
    no dead letter."""
    flaky = env.actors.flaky
    message = flaky.send(21)
    env.worker()
    # The result is stored under the original message id: the retries kept it.
    assert message.get_result(block=True, timeout=RESULT_WAIT_MS) == 42
    assert env.count("flaky:21") == 3
    assert stored(flaky.fn.key_for(21)) == 42
    assert default_queue().query(function="flaky") == []

    duplicate = flaky.send(n=21)
    assert duplicate.get_result(block=True, timeout=RESULT_WAIT_MS) == 42
    assert env.count("flaky:21") == 3


def test_a_message_that_always_fails_is_dead_lettered_after_retries_and_replayed_by_send(
    env: Env,
) -> None:
    """After max_retries=2 the message becomes one dead letter (traceback, redacted
    arguments, key under the actor name, route "dramatiq"); process_due re-sends it
    through the actor, the worker runs it (three more runs), and its failure updates
    the same letter."""
    always_fails = env.actors.always_fails
    message = always_fails.send(7, "tok")
    env.worker()
    wait_for(lambda: default_queue().query(function="always_fails"), "the dead letter")
    assert env.count("always_fails:7") == 3

    (letter,) = default_queue().query(function="always_fails")
    assert letter.id == message.message_id
    assert letter.route == ROUTE
    assert letter.status is Status.PENDING
    assert letter.kind == "transient"
    assert letter.attempts == 1
    assert letter.error_type == "builtins.ConnectionError"
    assert "upstream unavailable for 7" in letter.message
    assert "in always_fails" in letter.traceback
    assert letter.key == always_fails.fn.key_for(7, "tok")
    assert letter.key.startswith(f"{env.actors.NAMESPACE}:always_fails:")
    assert get_serializer("json").loads(letter.arguments) == {"n": 7, "secret": "tok"}

    report = default_queue().process_due(now=time.time() + 24 * 3600)
    assert [r.outcome for r in report.results] == ["enqueued"]
    wait_for(lambda: env.count("always_fails:7") == 6, "the replay's three runs")
    updated = wait_for(
        lambda: [x for x in default_queue().query(function="always_fails") if x.attempts == 2],
        "the letter to record the replay's failure",
    )
    assert [x.id for x in updated] == [letter.id]
    assert updated[0].status is Status.RETRYING
    assert len(default_queue().query(function="always_fails")) == 1


def test_a_message_whose_letter_lost_an_argument_to_redaction_is_held_not_replayed(
    env: Env,
) -> None:
    """dead_letter_redact replaced the card: a replay would charge "<redacted>", so the
    letter waits for a person, says why, and nothing is sent."""
    env.actors.charge_fails.send(9, "4111 1111 1111 1111")
    env.worker()
    (letter,) = wait_for(lambda: default_queue().query(function="charge_fails"), "the letter")
    kept = letter_arguments(letter)
    assert kept.values is not None
    assert isinstance(kept.values["card"], Redacted)
    assert "4111" not in letter.arguments.decode()

    report = default_queue().process_due(
        now=time.time() + 24 * 3600, filter=DeadLetterFilter(function=("charge_fails",))
    )
    assert [r.outcome for r in report.results] == ["held"]
    assert "card" in report.results[0].reason
    time.sleep(1)  # a send would have reached the worker by now
    assert env.count("charge_fails:9") == 1


# ----------------------------------------------------------------------------------------
# Dead workers
# ----------------------------------------------------------------------------------------


def test_a_redelivered_message_whose_worker_died_waits_out_the_dead_runs_lease_then_runs(
    env: Env,
) -> None:
    """SIGKILL the worker mid-body: RabbitMQ redelivers the message (same id) to a new
    worker. The redelivery never re-takes the dead run's claim: it waits for it past its
    own short wait_timeout (the claim is its own message's) until the lease runs out,
    then runs the body once."""
    slow_owned = env.actors.slow_owned
    message = slow_owned.send(2)
    first = env.worker(threads=1)
    wait_for(lambda: env.count("slow_owned:2:started") == 1, "the first run to start")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    held = idempotask.get_backend().get(slow_owned.fn.key_for(2))
    assert held is not None
    assert held.state is State.IN_PROGRESS
    assert held.expires_in is not None
    lease_ends = time.time() + held.expires_in

    env.worker(threads=1)
    assert message.get_result(block=True, timeout=RESULT_WAIT_MS) == {"n": 2, "run": 2}
    assert env.count("slow_owned:2:done") == 1
    second_start = float(env.redis.get(env.actors.counter("slow_owned:2:started_at:2")))
    assert second_start >= lease_ends - 0.05  # not before the dead run's lease ran out


def test_one_message_delivered_twice_at_once_runs_its_body_once_and_both_deliveries_succeed(
    env: Env,
) -> None:
    """The same message (one id) enqueued twice, a worker with two threads: the second
    delivery meets the first one's live claim, never re-takes it, waits for that run
    (past its 0.5 s wait_timeout) and returns its result."""
    stalls = env.actors.stalls
    message = stalls.message(7)
    env.actors.broker.enqueue(message)
    env.actors.broker.enqueue(message)
    env.worker(threads=2)

    wait_for(lambda: env.count(f"ok:{message.message_id}") == 2, "both deliveries to end")
    assert env.count(f"received:{message.message_id}") == 2
    assert env.count("stalls:7:started") == 1
    assert env.count("stalls:7:done") == 1
    assert message.get_result(block=True, timeout=RESULT_WAIT_MS) == {"n": 7, "run": 1}


def test_a_message_redelivered_while_its_stalled_worker_still_runs_it_waits_for_that_run(
    env: Env,
) -> None:
    """SIGSTOP a worker mid-body: RabbitMQ misses its heartbeats (2 s), closes its
    connection and redelivers the unacknowledged message to another worker. That
    delivery must not run the body beside the stalled one: it waits; the stalled worker
    is resumed within its lease and stores its result, which the redelivery returns."""
    stalls = env.actors.stalls
    message = stalls.send(8)
    short_heartbeat = with_query(os.environ[ENV_BROKER], heartbeat="2")
    stalled = env.worker(threads=1, **{ENV_BROKER: short_heartbeat})
    wait_for(lambda: env.count("stalls:8:started") == 1, "the first run to start")
    kill_worker(stalled, signal.SIGSTOP)
    try:
        env.worker(threads=1)
        wait_for(
            lambda: env.count(f"received:{message.message_id}") == 2,
            "RabbitMQ to redeliver the stalled worker's message",
            timeout=60,
        )
        time.sleep(1.0)  # room for a second run of the body to start, were it allowed to
        assert env.count("stalls:8:started") == 1
    finally:
        kill_worker(stalled, signal.SIGCONT)
    assert message.get_result(block=True, timeout=RESULT_WAIT_MS) == {"n": 8, "run": 1}
    wait_for(lambda: env.count(f"ok:{message.message_id}") >= 1, "the redelivery to end")
    assert env.count("stalls:8:started") == 1
    assert env.count("stalls:8:done") == 1


def test_dramatiq_retry_hands_its_kept_claim_to_the_retry_which_re_takes_it_at_once(
    env: Env,
) -> None:
    """A body raising dramatiq.Retry keeps its claim (a duplicate would wait); the
    retry is handed that claim and re-takes it at once, not after its 60 s lease."""
    message = env.actors.retries_once.send(9)
    sent = time.monotonic()
    env.worker()
    assert message.get_result(block=True, timeout=RESULT_WAIT_MS) == {"n": 9, "run": 2}
    assert env.count("retries_once:9:started") == 2
    assert time.monotonic() - sent < 30  # well within the 60 s lease


def test_a_claim_kept_for_a_retry_is_released_when_the_retries_middleware_gives_up(
    env: Env,
) -> None:
    """dramatiq.Retry on the last allowed attempt: the message fails for good, and the
    claim kept for a retry that will never run is released, so a duplicate sent then runs
    at once instead of waiting out the 60 s lease (it would wait 0.5 s, then fail)."""
    env.actors.retries_until_given_up.send(11)
    env.worker()
    # The claim is released before the failure is recorded as a dead letter.
    wait_for(lambda: default_queue().query(function="retries_until_given_up"), "the letter")
    assert env.count("retries_until_given_up:11:started") == 2
    sent = time.monotonic()
    again = env.actors.retries_until_given_up.send(11)
    assert again.get_result(block=True, timeout=RESULT_WAIT_MS) == {"n": 11, "run": 3}
    assert time.monotonic() - sent < 30  # well within the kept claim's 60 s lease


def test_a_worker_killed_mid_task_leaves_the_call_to_another_worker_after_the_lease(
    env: Env,
) -> None:
    """SIGKILL the worker mid-body and drop the redelivered message (as if it were lost):
    the same call sent again waits out the dead claim's lease in another worker, then
    runs the body once; later duplicates are answered from the store."""
    actors = env.actors
    actors.slow.send(1)
    first = env.worker(threads=1)
    wait_for(lambda: env.count("slow:1:started") == 1, "the first run to start")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    killed = time.monotonic()
    wait_for(
        lambda: actors.broker.get_queue_message_counts(actors.QUEUE)[0] == 1,
        "RabbitMQ to requeue the dead worker's message",
    )
    actors.broker.flush(actors.QUEUE)

    again = actors.slow.send(n=1)
    env.worker(threads=2)
    assert again.get_result(block=True, timeout=RESULT_WAIT_MS) == {"n": 1, "run": 2}
    assert env.count("slow:1:started") == 2
    assert env.count("slow:1:done") == 1
    # The claim was renewed every third of the lease until the kill.
    assert time.monotonic() - killed >= actors.LEASE * 2 / 3 - 0.1

    later = actors.slow.send(1)
    assert later.get_result(block=True, timeout=RESULT_WAIT_MS) == {"n": 1, "run": 2}
    assert env.count("slow:1:done") == 1


def test_the_memory_store_in_a_multi_process_worker_is_warned_about(env: Env) -> None:
    """Two worker processes cannot share memory://: each warns when it boots."""
    env.worker(processes=2, threads=1, IDEMPOTASK_URL="memory://")
    wait_for(lambda: "MultiProcessMemoryWarning" in env.log(), "the warning", timeout=20)
    assert "memory://" in env.log()


# ----------------------------------------------------------------------------------------
# Options, in process (a stub broker, no worker)
# ----------------------------------------------------------------------------------------


def _stub() -> StubBroker:
    broker = StubBroker()
    broker.add_middleware(IdempotencyMiddleware())
    return broker


def _name(base: str) -> str:
    return f"{base}_{uuid.uuid4().hex[:8]}"


def test_actor_options_are_checked_when_the_actor_is_declared() -> None:
    """Bad values are ConfigurationErrors; names no middleware declares are refused by
    Dramatiq itself (a ValueError naming them)."""
    broker = _stub()
    with pytest.raises(ActorOptionError, match="lease"):
        dramatiq.actor(broker=broker, actor_name=_name("a"), idempotency_lease=0)(lambda: None)
    with pytest.raises(ConfigurationError, match="dead_letter_queue"):
        dramatiq.actor(broker=broker, actor_name=_name("a"), dead_letter_queue="x")(lambda: None)
    with pytest.raises(ValueError, match="idempotency_tll"):
        dramatiq.actor(broker=broker, actor_name=_name("a"), idempotency_tll=5)(lambda: None)


def test_an_actor_cannot_be_idempotent_twice_or_dead_letter_every_attempt() -> None:
    """@idempotent plus idempotency_* options, or @dead_letter under the actor, refused."""
    broker = _stub()

    def body(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="already @idempotent"):
        dramatiq.actor(broker=broker, actor_name=_name("b"), idempotency_ttl=5)(
            idempotent(name=_name("idem"))(body)
        )
    with pytest.raises(ConfigurationError, match="dead_letter"):
        dramatiq.actor(broker=broker, actor_name=_name("b"))(
            dead_letter(name=_name("dl"))(idempotent(name=_name("idem"))(body))
        )


def test_prefixed_options_on_a_message_are_refused_not_ignored() -> None:
    """Idempotency options are per actor; a per-message one would silently do nothing."""
    broker = _stub()
    actor = dramatiq.actor(broker=broker, actor_name=_name("c"), idempotency_ttl=5)(lambda x: x)
    with pytest.raises(ActorOptionError, match="idempotency_ttl"):
        actor.send_with_options(args=(1,), idempotency_ttl=9)
    actor.send_with_options(args=(1,), **{LETTER_OPTION: "letter-1"})


def test_the_middleware_applies_to_actors_declared_before_it_was_added() -> None:
    """add_middleware() prepares existing actors: their key's name is the actor name."""
    broker = StubBroker()
    name = _name("early")

    @idempotent(name=_name("early_fn"))
    def early(x: int) -> int:
        return x

    actor = dramatiq.actor(broker=broker, actor_name=name)(early)
    broker.add_middleware(IdempotencyMiddleware())
    assert actor.fn.key_for(1).startswith(f"idempotask:{name}:v1:")


def test_async_and_sync_actors_deduplicate_in_an_in_process_worker() -> None:
    """An ``async def`` actor and a sync one, each sent three times: one run each."""
    idempotask.configure(backend="memory://")
    broker = StubBroker()
    broker.add_middleware(AsyncIO())
    broker.add_middleware(IdempotencyMiddleware())
    runs = {"sync": 0, "async": 0}

    @dramatiq.actor(broker=broker, actor_name=_name("sync"), idempotency_ttl=60)
    def sync_actor(x: int) -> None:
        runs["sync"] += 1

    @dramatiq.actor(broker=broker, actor_name=_name("async"), idempotency_ttl=60)
    async def async_actor(x: int) -> None:
        runs["async"] += 1

    for actor in (sync_actor, async_actor):
        actor.send(1)
        actor.send(x=1)
        actor.send(1)
    worker = dramatiq.Worker(broker, worker_timeout=50)
    broker.emit_after("process_boot")
    worker.start()
    try:
        broker.join(sync_actor.queue_name, timeout=10_000)
        worker.join()
    finally:
        worker.stop()
        broker.emit_before("process_stop")
    assert runs == {"sync": 1, "async": 1}

"""@dead_letter, the DeadLetterQueue, its processor and its spool: DESIGN §5, on memory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask import (
    AlreadyInProgress,
    BackendError,
    ConfigurationError,
    DeadLetter,
    DeadLetterQueue,
    DuplicateNameError,
    KeyMismatchError,
    Status,
    dead_letter,
    idempotent,
)
from idempotask.backends.base import State
from idempotask.backends.deadletters import (
    DeadLetterFilter,
    DeadLetterStore,
    dead_letter_store_from_url,
    register_dead_letter_scheme,
)
from idempotask.backends.memory import MemoryBackend, MemoryDeadLetterStore
from idempotask.deadletter import (
    DeadLetterNotFound,
    Redacted,
    Unserializable,
    register_route,
    registered_functions,
    replaying,
    unregister_route,
)
from idempotask.retry import FixedDelay, InCallRetry, RetryPolicy
from idempotask.serializers import get_serializer
from idempotask.spool import Spool, SpoolError, decode_letter, encode_letter
from idempotask.taxonomy import FailureKind, PermanentError
from tests._deadletter_support import (
    provides_namespaced_stores,
    skip_unless_keeps_history,
    skip_unless_namespaced,
)
from tests.backends.test_redis_deadletters import redis_store_for_processes
from tests.backends.test_sql_deadletters import postgres_store_for_processes

# Most functions here keep every argument on purpose; the warning has a test of its own.
pytestmark = pytest.mark.filterwarnings("ignore::idempotask.deadletter.KeepsAllArgumentsWarning")

JSON = get_serializer("json")
T0 = 1_800_000_000.0
LATER = T0 + 10**7  # a processor's "now" at which every letter of these tests is due
FAST = {
    FailureKind.TRANSIENT: RetryPolicy(2, FixedDelay(60)),
    FailureKind.EXTERNAL: RetryPolicy(1, FixedDelay(60)),
}


class GatewayTimeout(TimeoutError):
    """A transient failure with a qualified name of its own."""


class WallClock:
    """A wall clock (epoch seconds) that moves only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FlakyStore(MemoryDeadLetterStore):
    """A memory store whose ``add`` fails while ``down`` is set, like a store outage."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def add(self, letter: DeadLetter) -> DeadLetter:
        if self.down:
            raise BackendError("dead-letter store unreachable")
        return super().add(letter)


@pytest.fixture(autouse=True)
def private_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every spool of these tests (the default queue's too) out of the home directory."""
    directory = tmp_path / "spool"
    directory.mkdir()
    monkeypatch.setenv("IDEMPOTASK_SPOOL", str(directory))
    return directory


@pytest.fixture
def clock() -> WallClock:
    return WallClock()


@pytest.fixture
def store() -> FlakyStore:
    return FlakyStore()


@pytest.fixture
def queue(store: FlakyStore, clock: WallClock, tmp_path: Path) -> DeadLetterQueue:
    return DeadLetterQueue(store, policies=FAST, clock=clock, spool=tmp_path / "q.jsonl")


def only_letter(queue: DeadLetterQueue) -> DeadLetter:
    letters = queue.query(limit=10)
    assert len(letters) == 1, letters
    return letters[0]


def arguments_of(letter: DeadLetter) -> Any:
    return JSON.loads(letter.arguments)


# ------------------------------------------------------------------------ recording


def test_a_failure_is_recorded_completely_before_the_exception_propagates(
    queue: DeadLetterQueue,
) -> None:
    @dead_letter(queue=queue)
    @idempotent(ttl=60)
    def charge(order_id: int, note: str = "default") -> str:
        raise GatewayTimeout(f"gateway timed out for {order_id}")

    try:
        charge(7)
    except GatewayTimeout:
        letter = only_letter(queue)  # already there while the exception is in flight
    else:
        pytest.fail("the exception did not propagate")
    assert letter.id
    assert letter.function == charge.dead_letter_name == charge.__wrapped__.idempotency.name
    assert letter.kind == "transient"
    assert letter.error_type == "tests.test_deadletter.GatewayTimeout"
    assert letter.message == "gateway timed out for 7"
    assert "Traceback (most recent call last)" in letter.traceback
    assert "in charge" in letter.traceback
    assert letter.traceback.rstrip().endswith("GatewayTimeout: gateway timed out for 7")
    assert arguments_of(letter) == {"order_id": 7, "note": "default"}
    assert letter.key == charge.__wrapped__.key_for(7)
    assert letter.attempts == 1
    assert letter.status is Status.PENDING
    assert letter.first_failed_at == letter.last_failed_at == T0
    assert letter.next_retry_at == T0 + 60
    assert (letter.route, letter.critical, letter.resolution) == ("", False, "")
    assert queue.get(letter.id) == letter


def test_a_permanent_failure_is_abandoned_at_once_and_fires_the_hooks(
    queue: DeadLetterQueue,
) -> None:
    seen: list[tuple[str, Status]] = []

    @dead_letter(
        queue=queue,
        on_dead_letter=lambda x: seen.append(("dead", x.status)),
        on_retry_exhausted=lambda x: seen.append(("exhausted", x.status)),
    )
    def parse(payload: str) -> int:
        raise ValueError("not a number")

    with pytest.raises(ValueError, match="not a number"):
        parse("x")
    letter = only_letter(queue)
    assert (letter.kind, letter.status, letter.next_retry_at) == (
        "permanent",
        Status.ABANDONED,
        None,
    )
    assert seen == [("dead", Status.ABANDONED), ("exhausted", Status.ABANDONED)]


def test_the_default_name_is_module_and_qualname_for_a_plain_function(
    queue: DeadLetterQueue,
) -> None:
    @dead_letter(queue=queue)
    def plain() -> None:
        raise GatewayTimeout("x")

    with pytest.raises(GatewayTimeout):
        plain()
    assert only_letter(queue).function == (
        "tests.test_deadletter."
        "test_the_default_name_is_module_and_qualname_for_a_plain_function.<locals>.plain"
    )
    assert only_letter(queue).key == ""


def test_idempotent_over_dead_letter_is_refused_when_decorating() -> None:
    @dead_letter
    def job() -> None: ...

    with pytest.raises(ConfigurationError, match="under @dead_letter"):
        idempotent(job)


def test_dead_letter_twice_is_refused_when_decorating() -> None:
    @dead_letter
    def job() -> None: ...

    with pytest.raises(ConfigurationError, match="twice"):
        dead_letter(job)


def test_two_functions_cannot_share_a_dead_letter_name() -> None:
    @dead_letter(name="tests.shared-dl-name")
    def first() -> None: ...

    with pytest.raises(DuplicateNameError, match=r"tests\.shared-dl-name"):

        @dead_letter(name="tests.shared-dl-name")
        def second() -> None: ...


def test_already_in_progress_is_not_dead_lettered(queue: DeadLetterQueue) -> None:
    @dead_letter(queue=queue)
    @idempotent(on_conflict="raise")
    def export(batch: int) -> None: ...

    key = export.__wrapped__.key_for(1)
    idempotask.get_backend().claim(key, "someone-else", lease=60)
    with pytest.raises(AlreadyInProgress):
        export(1)
    assert queue.query() == []


def test_key_mismatch_is_not_dead_lettered(queue: DeadLetterQueue) -> None:
    @dead_letter(queue=queue)
    def reuse() -> None:
        raise KeyMismatchError("explicit key reused", key="k")

    with pytest.raises(KeyMismatchError):
        reuse()
    assert queue.query() == []


def test_keyboard_interrupt_is_not_dead_lettered(queue: DeadLetterQueue) -> None:
    @dead_letter(queue=queue)
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted()
    assert queue.query() == []


async def test_a_cancelled_async_call_is_not_dead_lettered(queue: DeadLetterQueue) -> None:
    started = asyncio.Event()

    @dead_letter(queue=queue)
    @idempotent
    async def slow(n: int) -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(slow(1))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert queue.query() == []


def test_using_an_explicit_key_records_that_key(queue: DeadLetterQueue) -> None:
    @dead_letter(queue=queue)
    @idempotent(cache_errors=60)
    def webhook(event: str) -> None:
        raise GatewayTimeout("receiver down")

    with pytest.raises(GatewayTimeout):
        webhook.using(key="delivery-42", owner="task-9")("order.paid")
    letter = only_letter(queue)
    record = idempotask.get_backend().get(letter.key)
    assert record is not None
    assert (record.state, record.owner) == (State.FAILED, "task-9")
    assert letter.key != webhook.__wrapped__.key_for("order.paid")


def test_swallow_returns_none_after_recording(queue: DeadLetterQueue) -> None:
    @dead_letter(queue=queue, swallow=True)
    def fire_and_forget(n: int) -> int:
        raise GatewayTimeout("x")

    assert fire_and_forget(1) is None
    assert only_letter(queue).status is Status.PENDING


def test_the_dead_letter_path_never_replaces_the_callers_exception(
    queue: DeadLetterQueue,
) -> None:
    def broken_hook(letter: DeadLetter) -> None:
        raise RuntimeError("hook bug")

    @dead_letter(queue=queue, on_dead_letter=broken_hook, redact=lambda a: 1 / 0)  # type: ignore[arg-type, return-value]
    def job(n: int) -> None:
        raise GatewayTimeout("the real failure")

    with pytest.raises(GatewayTimeout, match="the real failure"):
        job(1)
    assert only_letter(queue).arguments == b""  # a failing redact keeps nothing


# ------------------------------------------------------------------------ arguments


def test_arguments_are_kept_by_default_with_defaults_applied(queue: DeadLetterQueue) -> None:
    @dead_letter(queue=queue)
    def send(to: str, *cc: str, subject: str = "hi", **headers: str) -> None:
        raise GatewayTimeout("smtp")

    with pytest.raises(GatewayTimeout):
        send("a@x", "b@x", priority="high")
    assert arguments_of(only_letter(queue)) == {
        "to": "a@x",
        "cc": ("b@x",),
        "subject": "hi",
        "headers": {"priority": "high"},
    }


def test_the_redaction_hook_decides_what_is_kept(queue: DeadLetterQueue) -> None:
    received: list[dict[str, Any]] = []

    def redact(arguments: dict[str, Any]) -> dict[str, Any]:
        received.append(dict(arguments))
        return {**arguments, "card": "****" + arguments["card"][-4:]}

    @dead_letter(queue=queue, redact=redact)
    def pay(order_id: int, card: str) -> None:
        raise GatewayTimeout("psp")

    with pytest.raises(GatewayTimeout):
        pay(9, card="4111111111111111")
    assert received == [{"order_id": 9, "card": "4111111111111111"}]
    # What redact= changed is marked, so no replay can mistake it for the call's value.
    assert arguments_of(only_letter(queue)) == {"order_id": 9, "card": Redacted("****1111")}
    assert b"4111111111111111" not in only_letter(queue).arguments


def test_an_unserializable_argument_is_stored_as_a_placeholder(queue: DeadLetterQueue) -> None:
    @dead_letter(queue=queue)
    def locked(lock: Any, n: int) -> None:
        raise GatewayTimeout("x")

    with pytest.raises(GatewayTimeout):
        locked(threading.Lock(), 3)
    stored = arguments_of(only_letter(queue))
    assert stored["n"] == 3
    assert isinstance(stored["lock"], Unserializable)
    assert "lock" in stored["lock"].type_name


def test_a_letter_with_a_placeholder_waits_for_a_person_and_says_why(
    queue: DeadLetterQueue,
) -> None:
    runs: list[int] = []

    @dead_letter(queue=queue)
    def locked(lock: Any) -> None:
        runs.append(1)
        raise GatewayTimeout("x")

    with pytest.raises(GatewayTimeout):
        locked(threading.Lock())
    report = queue.process_due(now=LATER)
    letter = only_letter(queue)
    assert report.held == [(letter.id, report.results[0].reason)]
    assert "could not be stored" in report.results[0].reason
    assert runs == [1]
    assert (letter.status, letter.next_retry_at) == (Status.PENDING, None)
    assert letter.history[-1].what == "skipped"
    assert "could not be stored" in letter.history[-1].note
    assert queue.process_due(now=LATER).claimed == 0  # no retry is scheduled


def test_unreplayable_abandon_closes_such_a_letter_instead(
    store: FlakyStore, clock: WallClock, tmp_path: Path
) -> None:
    queue = DeadLetterQueue(
        store, policies=FAST, clock=clock, spool=tmp_path / "q.jsonl", unreplayable="abandon"
    )
    exhausted: list[str] = []

    @dead_letter(queue=queue, on_retry_exhausted=lambda x: exhausted.append(x.id))
    def locked(lock: Any) -> None:
        raise GatewayTimeout("x")

    with pytest.raises(GatewayTimeout):
        locked(threading.Lock())
    report = queue.process_due(now=LATER)
    letter = only_letter(queue)
    assert report.abandoned == [letter.id]
    assert letter.status is Status.ABANDONED
    assert exhausted == [letter.id]
    assert letter.history[-1].what == "abandoned"
    assert "could not be stored" in letter.history[-1].note


# ------------------------------------------------------------------------ the processor


def test_a_failing_call_is_retried_by_its_policy_then_abandoned(
    queue: DeadLetterQueue, clock: WallClock
) -> None:
    runs: list[int] = []
    exhausted: list[DeadLetter] = []

    @dead_letter(queue=queue, on_retry_exhausted=exhausted.append)
    @idempotent
    def flaky(n: int) -> None:
        runs.append(n)
        raise GatewayTimeout(f"try {len(runs)}")

    with pytest.raises(GatewayTimeout):
        flaky(5)
    first = only_letter(queue)
    assert first.next_retry_at == T0 + 60

    # Not due yet: nothing happens.
    assert queue.process_due(now=T0 + 59).claimed == 0

    report = queue.process_due(now=T0 + 60)
    assert report.failed == [first.id]
    second = only_letter(queue)
    assert (second.id, second.attempts, second.status) == (first.id, 2, Status.RETRYING)
    assert (second.message, second.last_failed_at, second.next_retry_at) == (
        "try 2",
        T0 + 60,
        T0 + 120,
    )
    assert second.first_failed_at == T0

    report = queue.process_due(now=T0 + 120)
    assert report.abandoned == [first.id]
    final = only_letter(queue)
    assert (final.attempts, final.status, final.next_retry_at) == (3, Status.ABANDONED, None)
    assert [x.id for x in exhausted] == [first.id]
    assert runs == [5, 5, 5]
    assert queue.process_due(now=LATER).claimed == 0


def test_a_replay_refused_by_an_open_breaker_does_not_use_up_an_attempt(
    queue: DeadLetterQueue,
) -> None:
    class BreakerOpen(Exception):
        consumes_attempt = False

    state = {"error": GatewayTimeout("down")}

    @dead_letter(queue=queue, swallow=True)
    def call(n: int) -> None:
        raise state["error"]

    call(1)
    state["error"] = BreakerOpen("failing fast")
    queue.process_due(now=T0 + 60)
    letter = only_letter(queue)
    assert (letter.attempts, letter.status, letter.message) == (1, Status.RETRYING, "failing fast")
    assert letter.next_retry_at is not None


def test_a_replay_that_succeeds_resolves_the_letter(queue: DeadLetterQueue) -> None:
    fail = [True]
    seen_replay: list[str | None] = []

    @dead_letter(queue=queue)
    @idempotent
    def sync_job(n: int) -> int:
        seen_replay.append(replaying())
        if fail[0]:
            raise GatewayTimeout("down")
        return n * 2

    with pytest.raises(GatewayTimeout):
        sync_job(4)
    fail[0] = False
    report = queue.process_due(now=LATER)
    letter = only_letter(queue)
    assert report.resolved == [letter.id]
    assert (letter.status, letter.resolution, letter.next_retry_at) == (
        Status.RESOLVED,
        "retry",
        None,
    )
    assert seen_replay == [None, letter.id]  # the replay knows which letter it settles
    assert sync_job(4) == 8  # the replay's result is stored under the original key


def test_a_call_that_completed_meanwhile_is_resolved_without_running(
    queue: DeadLetterQueue,
) -> None:
    runs: list[int] = []

    @dead_letter(queue=queue)
    @idempotent
    def report_job(day: int) -> str:
        runs.append(day)
        if len(runs) == 1:
            raise GatewayTimeout("first try failed")
        return f"report {day}"

    with pytest.raises(GatewayTimeout):
        report_job(1)
    assert report_job(1) == "report 1"  # a later call did the work
    assert runs == [1, 1]
    result = queue.process_due(now=LATER)
    assert [r.outcome for r in result.results] == ["completed"]
    assert runs == [1, 1]  # not run again
    letter = only_letter(queue)
    assert (letter.status, letter.resolution) == (Status.RESOLVED, "completed")


def test_a_cached_error_is_cleared_so_the_replay_really_runs(queue: DeadLetterQueue) -> None:
    runs: list[int] = []

    @dead_letter(queue=queue)
    @idempotent(cache_errors=600)
    def settle(n: int) -> str:
        runs.append(n)
        if len(runs) == 1:
            raise GatewayTimeout("psp down")
        return "settled"

    with pytest.raises(GatewayTimeout):
        settle(3)
    key = settle.__wrapped__.key_for(3)
    record = idempotask.get_backend().get(key)
    assert record is not None
    assert record.state is State.FAILED
    with pytest.raises(GatewayTimeout):
        settle(3)  # answered from the cached error, without running
    assert runs == [3]
    assert len(queue.query()) == 1  # the duplicate is not a second dead letter

    report = queue.process_due(now=LATER)
    assert [r.outcome for r in report.results] == ["resolved"]
    assert runs == [3, 3]
    completed = idempotask.get_backend().get(key)
    assert completed is not None
    assert completed.state is State.COMPLETED


def test_a_replay_failure_updates_the_same_letter(queue: DeadLetterQueue) -> None:
    @dead_letter(queue=queue, swallow=True)
    def always(n: int) -> None:
        raise GatewayTimeout("still down")

    always(1)
    queue.process_due(now=LATER)
    letters = queue.query()
    assert len(letters) == 1
    assert letters[0].attempts == 2
    assert letters[0].status is Status.RETRYING


def test_a_letter_whose_function_is_unknown_here_is_left_untouched_for_others(
    queue: DeadLetterQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without routes, a processor claims only the functions it knows: another
    function's letter is not delayed for the processes that know it."""
    # Integrations imported by earlier tests register their routes for the process.
    monkeypatch.setattr("idempotask.deadletter._replay._routes", {})
    letter = queue.record("somewhere.else.job", GatewayTimeout("x"), now=T0)
    before = only_letter(queue)
    report = queue.process_due(now=T0 + 100)
    assert report.claimed == 0
    assert only_letter(queue) == before
    assert before.next_retry_at == letter.next_retry_at


def test_with_a_route_registered_an_unknown_function_is_skipped_and_released(
    queue: DeadLetterQueue,
) -> None:
    register_route("tests-skip-route", lambda letter, arguments: None)
    try:
        letter = queue.record("somewhere.else.job", GatewayTimeout("x"), now=T0)
        report = queue.process_due(now=T0 + 100)
        assert report.skipped == [(letter.id, report.results[0].reason)]
        assert "not registered in this process" in report.results[0].reason
        after = only_letter(queue)
        assert (after.status, after.attempts) == (Status.PENDING, 1)
        assert after.next_retry_at == T0 + 100 + 60  # released with the skip delay
        assert queue.process_due(now=T0 + 100).claimed == 0
        assert queue.process_due(now=T0 + 160).claimed == 1
        # A skip repeated for the same reason is one history entry, not one per round.
        assert [a.what for a in only_letter(queue).history] == ["failed", "skipped"]
    finally:
        unregister_route("tests-skip-route")


FORGED = "\nCRITICAL idempotask: forged line\x1b[2J\r"


def test_outside_text_in_dead_letter_log_lines_cannot_forge_lines(
    queue: DeadLetterQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception's message and a letter someone else wrote (its function name) reach
    the log escaped: no line break, carriage return or terminal escape gets through."""
    register_route("tests-hostile-route", lambda letter, arguments: None)
    try:
        with caplog.at_level(logging.INFO, logger="idempotask"):
            queue.record("somewhere.else" + FORGED, GatewayTimeout("body" + FORGED), now=T0)
            queue.process_due(now=T0 + 100)  # skipped: not registered in this process
        lines = [r.getMessage() for r in caplog.records if "forged line" in r.getMessage()]
        assert len(lines) >= 2  # the recording's warning and the processor's skip
        for line in lines:
            assert not any(c in line for c in "\n\r\x1b"), line
            assert "\\nCRITICAL idempotask: forged line\\x1b[2J\\r" in line
    finally:
        unregister_route("tests-hostile-route")


def test_a_process_that_knows_no_function_and_no_route_claims_nothing_and_says_why(
    store: FlakyStore, clock: WallClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from idempotask.deadletter import _replay

    monkeypatch.setattr(_replay, "_registry", {})
    monkeypatch.setattr(_replay, "_routes", {})
    queue = DeadLetterQueue(store, clock=clock, spool=tmp_path / "q.jsonl")
    letter = queue.record("somewhere.else.job", GatewayTimeout("x"), now=T0)
    report = queue.process_due(now=LATER)
    assert report.claimed == 0
    assert "no @dead_letter function or integration route is registered" in report.note
    assert "--import" in report.note
    assert queue.get(letter.id) == letter


def test_a_call_running_elsewhere_is_skipped(queue: DeadLetterQueue) -> None:
    @dead_letter(queue=queue, swallow=True)
    @idempotent
    def busy(n: int) -> None:
        raise GatewayTimeout("x")

    busy(1)
    idempotask.get_backend().claim(busy.__wrapped__.key_for(1), "other", lease=60)
    report = queue.process_due(now=LATER)
    assert [r.outcome for r in report.results] == ["skipped"]
    assert "running elsewhere" in report.results[0].reason


def test_processors_in_eight_threads_replay_each_letter_once(
    store: FlakyStore, tmp_path: Path
) -> None:
    runs: Counter[int] = Counter()
    lock = threading.Lock()

    @dead_letter(queue=DeadLetterQueue(store, policies=FAST), swallow=True)
    def job(n: int) -> None:
        with lock:
            runs[n] += 1
            first = runs[n] == 1
        if first:
            raise GatewayTimeout("first try")
        time.sleep(0.001)

    for n in range(40):
        job(n)
    barrier = threading.Barrier(8)

    def processor() -> None:
        queue = DeadLetterQueue(store, policies=FAST, spool=tmp_path / "p.jsonl")
        barrier.wait()
        while queue.process_due(limit=3, now=LATER).claimed:
            pass

    threads = [threading.Thread(target=processor) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert runs == dict.fromkeys(range(40), 2)
    assert {x.status for x in store.query(limit=100)} == {Status.RESOLVED}


# -- two processor processes ---------------------------------------------------------------
#
# The guarantee needs a store shared by processes. Each entry of CROSS_PROCESS_STORES is a
# context manager yielding an ``open_store()`` callable that returns, in any (forked)
# process, a store on the same data. Memory is per process, so it takes part through a
# multiprocessing manager: one server process owns the store and the processors call it.
# Redis and SQL stores add themselves here with a ``pytest.param(..., marks=...)``.


class _StoreManager(BaseManager):
    pass


_StoreManager.register(
    "MemoryDeadLetterStore",
    MemoryDeadLetterStore,
    exposed=[
        name
        for name in dir(MemoryDeadLetterStore)
        if not name.startswith("_") and name not in ("from_url", "size")
    ],
)


@contextlib.contextmanager
def memory_through_a_manager() -> Iterator[Callable[[], DeadLetterStore]]:
    manager = _StoreManager(ctx=multiprocessing.get_context("fork"))
    manager.start()
    try:
        proxy = manager.MemoryDeadLetterStore()  # type: ignore[attr-defined]
        yield lambda: proxy
    finally:
        manager.shutdown()


@contextlib.contextmanager
def store_at(url: str) -> Iterator[Callable[[], DeadLetterStore]]:
    """A store reached by URL: each process builds its own client after the fork."""
    yield lambda: dead_letter_store_from_url(url)


CROSS_PROCESS_STORES = [
    pytest.param(memory_through_a_manager, id="memory-through-a-manager"),
    # A fresh queue (its own ?prefix=) on the shared Redis, deleted afterwards.
    pytest.param(redis_store_for_processes, id="redis", marks=pytest.mark.redis),
    # A fresh table on the shared PostgreSQL, dropped afterwards.
    pytest.param(postgres_store_for_processes, id="postgres", marks=pytest.mark.postgres),
]


@dead_letter(name="tests.deadletter.cross_process_replay")
def cross_process_replay(path: str, n: int) -> None:
    """Appends ``n`` to ``path``: one line per replay that ran."""
    time.sleep(0.005)  # long enough for the two processors to overlap
    with open(path, "a") as f:
        f.write(f"{n}\n")


def _processor_process(
    open_store: Callable[[], DeadLetterStore], spool: str, barrier: Any, done: Any
) -> None:
    queue = DeadLetterQueue(open_store(), spool=spool)
    barrier.wait()
    replayed: list[str] = []
    while report := queue.process_due(limit=2, now=time.time() + 10**7):
        if not report.claimed:
            break
        replayed.extend(report.resolved)
    done.put(replayed)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("shared_store", CROSS_PROCESS_STORES)
def test_two_processor_processes_replay_each_due_letter_once(
    shared_store: Callable[[], contextlib.AbstractContextManager[Callable[[], DeadLetterStore]]],
    tmp_path: Path,
) -> None:
    ctx = multiprocessing.get_context("fork")
    out = tmp_path / "replays.txt"
    with shared_store() as open_store:
        skip_unless_keeps_history(open_store())
        queue = DeadLetterQueue(open_store(), spool=tmp_path / "s.jsonl")
        letters = [
            queue.record(
                cross_process_replay.dead_letter_name,
                GatewayTimeout("first try"),
                arguments={"path": str(out), "n": n},
            )
            for n in range(12)
        ]
        barrier, done = ctx.Barrier(2), ctx.Queue()
        processes = [
            ctx.Process(
                target=_processor_process,
                args=(open_store, str(tmp_path / "s.jsonl"), barrier, done),
            )
            for _ in range(2)
        ]
        for process in processes:
            process.start()
        replayed = [done.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(30)
            assert process.exitcode == 0
        assert sorted(out.read_text().split()) == sorted(str(n) for n in range(12))
        assert sorted(replayed[0] + replayed[1]) == sorted(x.id for x in letters)
        assert {x.status for x in queue.query(limit=100)} == {Status.RESOLVED}


# -- async --------------------------------------------------------------------------------


async def test_an_async_failure_is_recorded_before_it_propagates(queue: DeadLetterQueue) -> None:
    @dead_letter(queue=queue)
    @idempotent
    async def fetch(url: str) -> bytes:
        await asyncio.sleep(0)
        raise GatewayTimeout(f"GET {url}")

    try:
        await fetch("https://example.test/a")
    except GatewayTimeout:
        letter = (await queue.aquery())[0]
    assert letter.message == "GET https://example.test/a"
    assert letter.key == fetch.__wrapped__.key_for("https://example.test/a")
    assert arguments_of(letter) == {"url": "https://example.test/a"}


async def test_the_async_processor_replays_async_and_sync_functions(
    queue: DeadLetterQueue,
) -> None:
    state = {"fail": True}
    ran: list[str] = []

    @dead_letter(queue=queue, swallow=True)
    @idempotent
    async def async_job(n: int) -> int:
        ran.append(f"async {n} {replaying() is not None}")
        if state["fail"]:
            raise GatewayTimeout("x")
        return n

    @dead_letter(queue=queue, swallow=True)
    def sync_job(n: int) -> int:
        ran.append(f"sync {n}")
        if state["fail"]:
            raise GatewayTimeout("x")
        return n

    assert await async_job(1) is None
    assert sync_job(2) is None
    state["fail"] = False
    report = await queue.aprocess_due(now=LATER)
    assert sorted(r.outcome for r in report.results) == ["resolved", "resolved"]
    assert sorted(ran) == ["async 1 False", "async 1 True", "sync 2", "sync 2"]
    assert {x.resolution for x in await queue.aquery()} == {"retry"}


async def test_an_async_replay_failure_reaches_abandoned(queue: DeadLetterQueue) -> None:
    @dead_letter(queue=queue, swallow=True)
    async def always(n: int) -> None:
        raise GatewayTimeout("x")

    await always(1)
    for step in (1, 2):
        await queue.aprocess_due(now=T0 + 60 * step)
    letter = (await queue.aquery())[0]
    assert (letter.attempts, letter.status) == (3, Status.ABANDONED)


def test_the_sync_processor_runs_an_async_function_on_its_own_loop(
    queue: DeadLetterQueue,
) -> None:
    state = {"fail": True}

    @dead_letter(queue=queue, swallow=True)
    async def job() -> str:
        if state["fail"]:
            raise GatewayTimeout("x")
        return "ok"

    asyncio.run(job())
    state["fail"] = False
    assert queue.process_due(now=LATER).resolved == [only_letter(queue).id]


async def test_the_sync_processor_leaves_an_async_function_alone_inside_a_running_loop(
    queue: DeadLetterQueue,
) -> None:
    @dead_letter(queue=queue, swallow=True)
    async def job() -> None:
        raise GatewayTimeout("x")

    await job()
    report = queue.process_due(now=LATER)  # sync, but this thread runs an event loop
    reason = (
        f"{job.dead_letter_name} is async and an event loop is running in this thread: "
        "use aprocess_due()"
    )
    assert report.skipped == [(only_letter(queue).id, reason)]
    assert only_letter(queue).attempts == 1


# ------------------------------------------------------------------------ in-call retries


def test_in_call_retries_absorb_a_blip_before_anything_is_dead_lettered(
    queue: DeadLetterQueue,
) -> None:
    runs: list[int] = []

    @dead_letter(queue=queue, retry=InCallRetry(attempts=3, wait=FixedDelay(0)))
    def blip() -> str:
        runs.append(1)
        if len(runs) < 3:
            raise GatewayTimeout("blip")
        return "ok"

    assert blip() == "ok"
    assert len(runs) == 3
    assert queue.query() == []


def test_in_call_retries_do_not_retry_permanent_failures(queue: DeadLetterQueue) -> None:
    runs: list[int] = []

    @dead_letter(queue=queue, retry=InCallRetry(attempts=3, wait=FixedDelay(0)))
    def bad() -> None:
        runs.append(1)
        raise PermanentError("no such order")

    with pytest.raises(PermanentError):
        bad()
    assert len(runs) == 1
    assert only_letter(queue).kind == "permanent"


# ------------------------------------------------------------------------ the spool


def test_a_letter_is_spooled_while_the_store_is_down_and_delivered_once(
    store: FlakyStore, queue: DeadLetterQueue, caplog: pytest.LogCaptureFixture
) -> None:
    @dead_letter(queue=queue)
    def job(n: int) -> None:
        raise GatewayTimeout(f"job {n}")

    store.down = True
    with pytest.raises(GatewayTimeout):
        job(1)
    assert store.size == 0
    spooled = queue.spool.letters()
    assert [x.message for x in spooled] == ["job 1"]
    assert "spooled" in caplog.text

    store.down = False
    assert queue.flush_spool() == 1
    assert only_letter(queue) == spooled[0]
    assert not queue.spool.pending()
    assert queue.flush_spool() == 0

    # The same line delivered again (a crash after delivery) adds nothing.
    queue.spool.append(spooled[0])
    assert queue.flush_spool() == 1
    assert only_letter(queue) == spooled[0]


def test_spooled_letters_are_delivered_by_the_next_successful_record(
    store: FlakyStore, queue: DeadLetterQueue
) -> None:
    store.down = True
    for n in range(3):
        queue.record("jobs.sync", GatewayTimeout(str(n)))
    assert store.size == 0
    assert len(queue.spool.letters()) == 3
    store.down = False
    queue.record("jobs.sync", GatewayTimeout("3"))
    assert sorted(x.message for x in queue.query()) == ["0", "1", "2", "3"]
    assert not queue.spool.pending()


def test_a_failed_delivery_keeps_the_rest_in_the_spool(
    store: FlakyStore, queue: DeadLetterQueue
) -> None:
    store.down = True
    letters = [queue.record("jobs.sync", GatewayTimeout(str(n))) for n in range(3)]
    assert queue.flush_spool() == 0
    assert sorted(x.id for x in queue.spool.letters()) == sorted(x.id for x in letters)
    store.down = False
    assert queue.process_due(now=T0).spool_delivered == 3  # the processor delivers first


async def test_the_async_path_spools_and_flushes_too(
    store: FlakyStore, queue: DeadLetterQueue
) -> None:
    @dead_letter(queue=queue)
    async def job() -> None:
        raise GatewayTimeout("async")

    store.down = True
    with pytest.raises(GatewayTimeout):
        await job()
    store.down = False
    assert await queue.aflush_spool() == 1
    assert [x.message for x in await queue.aquery()] == ["async"]


def test_an_unreadable_spool_line_is_set_aside_not_dropped(
    store: FlakyStore, queue: DeadLetterQueue
) -> None:
    store.down = True
    queue.record("jobs.sync", GatewayTimeout("good"))
    with open(queue.spool.path, "ab") as f:
        f.write(b'{"torn": \n')
    store.down = False
    assert queue.flush_spool() == 1
    assert Path(queue.spool.path + ".rejected").read_bytes() == b'{"torn": \n'


def test_when_the_spool_cannot_be_written_the_letter_is_logged_at_critical(
    store: FlakyStore, clock: WallClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    queue = DeadLetterQueue(store, clock=clock, spool=blocker / "spool.jsonl")

    @dead_letter(queue=queue)
    def job() -> None:
        raise GatewayTimeout("nowhere to go")

    store.down = True
    with pytest.raises(GatewayTimeout, match="nowhere to go"):
        job()  # the caller's exception, not the spool's
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical
    assert '"message": "nowhere to go"' in critical[0].getMessage()
    with pytest.raises(SpoolError):
        queue.record("jobs.sync", GatewayTimeout("direct"))


def test_the_spool_location_is_configurable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_spool: Path
) -> None:
    queue = DeadLetterQueue()
    assert queue.spool.path == str(private_spool / "spool-idempotask.jsonl")
    idempotask.configure(namespace="billing")
    assert queue.spool.path == str(private_spool / "spool-billing.jsonl")
    monkeypatch.setenv("IDEMPOTASK_SPOOL", str(tmp_path / "env.jsonl"))
    assert queue.spool.path == str(tmp_path / "env.jsonl")
    idempotask.configure(spool_path=tmp_path / "configured.jsonl")
    assert queue.spool.path == str(tmp_path / "configured.jsonl")
    monkeypatch.delenv("IDEMPOTASK_SPOOL")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    idempotask.configure(spool_path=None)
    assert queue.spool.path == str(tmp_path / "cache" / "idempotask" / "spool-billing.jsonl")


def _append_letters(path: str, worker: int, count: int) -> None:
    spool = Spool(path)
    for i in range(count):
        spool.append(
            DeadLetter(
                id=f"w{worker}-{i}",
                function="jobs.sync",
                kind="transient",
                error_type="E",
                message="x" * (i * 37 % 3000),  # lines of varied length
            )
        )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_processes_appending_while_threads_deliver_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "busy.jsonl")
    store = MemoryDeadLetterStore()
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_append_letters, args=(path, w, 50)) for w in range(4)]
    stop = threading.Event()
    delivered: list[int] = []

    def deliverer() -> None:
        queue = DeadLetterQueue(store, spool=path)
        while not stop.is_set():
            delivered.append(queue.flush_spool())

    threads = [threading.Thread(target=deliverer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    stop.set()
    for thread in threads:
        thread.join(30)
    DeadLetterQueue(store, spool=path).flush_spool()
    ids = [x.id for x in store.query(limit=1000)]
    assert sorted(ids) == sorted(f"w{w}-{i}" for w in range(4) for i in range(50))
    assert not Spool(path).pending()
    assert sum(delivered) >= 1


def test_spool_lines_round_trip_every_field() -> None:
    letter = DeadLetter(
        id="x",
        function="f",
        kind="external",
        error_type="E",
        message="surrogate \ud800 and é",
        traceback="tb",
        arguments=bytes(range(256)),
        key="k",
        attempts=2,
        status=Status.RETRYING,
        first_failed_at=1.5,
        last_failed_at=2.5,
        next_retry_at=None,
        route="celery",
        critical=True,
        resolution="",
        version=3,
    )
    assert decode_letter(encode_letter(letter)) == letter


# ------------------------------------------------------------------------ queue operations


def test_stats_add_up(queue: DeadLetterQueue, clock: WallClock) -> None:
    state = {"fail": True}

    @dead_letter(queue=queue, swallow=True)
    def a(n: int) -> None:
        if state["fail"] or n % 2:
            raise GatewayTimeout("a")

    @dead_letter(queue=queue, swallow=True)
    def b(n: int) -> None:
        raise ValueError("b")

    for n in range(4):
        a(n)
    b(1)
    queue.record("old.job", GatewayTimeout("old"), now=T0 - 2 * 86400)
    state["fail"] = False
    queue.process_due(now=T0 + 60, filter=DeadLetterFilter(function=(a.dead_letter_name,)))
    # a(0), a(2) resolved by retry; a(1), a(3) failed again (RETRYING); b abandoned.
    stats = queue.stats(hours=24, now=T0 + 100)
    assert stats.total == 5
    assert sum(stats.by_kind.values()) == sum(stats.by_function.values()) == stats.total
    assert sum(stats.by_status.values()) == stats.total
    assert stats.by_kind == {"transient": 4, "permanent": 1}
    assert stats.by_function == {a.dead_letter_name: 4, b.dead_letter_name: 1}
    assert stats.by_status == {
        Status.PENDING: 0,
        Status.RETRYING: 2,
        Status.RESOLVED: 2,
        Status.ABANDONED: 1,
    }
    assert (stats.retries_failed, stats.retries_succeeded) == (2, 2)
    assert stats.since == T0 + 100 - 86400
    assert queue.stats(hours=24 * 7, now=T0 + 100).total == 6


def test_manual_transitions_compare_and_set(queue: DeadLetterQueue, clock: WallClock) -> None:
    letter = queue.record("jobs.sync", GatewayTimeout("x"))
    resolved = queue.mark_resolved(letter.id)
    assert (resolved.status, resolved.resolution, resolved.next_retry_at) == (
        Status.RESOLVED,
        "manual",
        None,
    )
    clock.now += 10
    requeued = queue.requeue(letter.id)
    assert (requeued.status, requeued.next_retry_at, requeued.resolution) == (
        Status.PENDING,
        T0 + 10,
        "",
    )
    later = queue.schedule_retry(letter.id, in_=3600)
    assert later.next_retry_at == T0 + 10 + 3600
    at = queue.schedule_retry(letter.id, at=T0 + 5)
    assert at.next_retry_at == T0 + 5
    abandoned = queue.mark_abandoned(letter.id)
    assert (abandoned.status, abandoned.next_retry_at) == (Status.ABANDONED, None)
    assert abandoned.version == letter.version + 5
    with pytest.raises(DeadLetterNotFound):
        queue.mark_resolved("no-such-letter")
    with pytest.raises(ConfigurationError):
        queue.schedule_retry(letter.id, at=T0, in_=5)


def test_requeue_all_leaves_resolved_letters_alone_unless_asked(
    queue: DeadLetterQueue, clock: WallClock
) -> None:
    kept = queue.record("jobs.a", GatewayTimeout("x"))
    gone = queue.record("jobs.a", ValueError("x"))  # abandoned at once
    done = queue.mark_resolved(queue.record("jobs.a", GatewayTimeout("y")).id)
    other = queue.record("jobs.b", GatewayTimeout("z"))
    clock.now = T0 + 1
    assert queue.requeue_all(function="jobs.a") == 2
    assert queue.get(kept.id).next_retry_at == T0 + 1  # type: ignore[union-attr]
    assert queue.get(gone.id).status is Status.PENDING  # type: ignore[union-attr]
    assert queue.get(done.id).status is Status.RESOLVED  # type: ignore[union-attr]
    assert queue.get(other.id).next_retry_at == T0 + 60  # type: ignore[union-attr]
    assert queue.requeue_all(status="resolved") == 1


def test_purge_keeps_open_and_recent_letters_by_default(
    queue: DeadLetterQueue, clock: WallClock
) -> None:
    old = T0 - 31 * 86400
    closed_old = queue.record("jobs.a", ValueError("x"), now=old)
    open_old = queue.record("jobs.a", GatewayTimeout("x"), now=old)
    closed_new = queue.record("jobs.a", ValueError("y"))
    assert queue.purge() == 1
    assert queue.get(closed_old.id) is None
    assert queue.get(open_old.id) is not None
    assert queue.get(closed_new.id) is not None
    clock.now += 1
    assert queue.purge(older_than=0, status=("pending", "abandoned")) == 2
    assert queue.query() == []


def test_query_filters_by_status_kind_function_and_time(queue: DeadLetterQueue) -> None:
    a = queue.record("jobs.a", GatewayTimeout("x"), now=T0)
    b = queue.record("jobs.b", ValueError("x"), now=T0 + 10)
    assert [x.id for x in queue.query()] == [b.id, a.id]
    assert [x.id for x in queue.query(status=Status.ABANDONED)] == [b.id]
    assert [x.id for x in queue.query(kind=FailureKind.TRANSIENT)] == [a.id]
    assert [x.id for x in queue.query(function=["jobs.a", "jobs.c"])] == [a.id]
    assert [x.id for x in queue.query(since=T0 + 5)] == [b.id]
    assert [x.id for x in queue.query(until=T0 + 5)] == [a.id]
    assert [x.id for x in queue.query(limit=1, offset=1)] == [a.id]
    with pytest.raises(ConfigurationError, match="status"):
        queue.query(status="lost")


def test_critical_functions_call_the_alert_hooks_and_log_critical(
    queue: DeadLetterQueue, caplog: pytest.LogCaptureFixture
) -> None:
    from_queue: list[DeadLetter] = []
    from_config: list[DeadLetter] = []
    queue.on_alert(from_queue.append)
    idempotask.configure(on_alert=from_config.append)

    @dead_letter(queue=queue, critical=True, swallow=True)
    def payroll(n: int) -> None:
        raise ValueError("negative salary")

    @dead_letter(queue=queue, swallow=True)
    def ordinary(n: int) -> None:
        raise ValueError("meh")

    payroll(1)
    ordinary(1)
    assert [x.function for x in from_queue] == [payroll.dead_letter_name]
    assert from_queue == from_config
    assert from_queue[0].critical
    assert any(
        r.levelno == logging.CRITICAL and "negative salary" in r.getMessage()
        for r in caplog.records
    )


def test_a_route_replays_through_the_integration(queue: DeadLetterQueue) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    register_route("tests-broker", lambda letter, args: sent.append((letter.function, args)))
    try:
        letter = queue.record(
            "tasks.sync_account", GatewayTimeout("x"), arguments={"id": 3}, route="tests-broker"
        )
        report = queue.process_due(now=LATER)
        assert [r.outcome for r in report.results] == ["enqueued"]
        assert sent == [("tasks.sync_account", {"id": 3})]
        assert queue.get(letter.id).resolution == "enqueued"  # type: ignore[union-attr]
        # The framework run failed again: the integration updates the same letter.
        again = queue.record("tasks.sync_account", GatewayTimeout("y"), replay_of=letter.id)
        assert (again.id, again.attempts, again.status) == (letter.id, 2, Status.RETRYING)
        assert len(queue.query()) == 1
    finally:
        unregister_route("tests-broker")


def test_a_route_that_raises_is_a_failed_replay_retried_by_the_policy(
    queue: DeadLetterQueue,
) -> None:
    def refuse(letter: DeadLetter, arguments: dict[str, Any]) -> None:
        raise GatewayTimeout("broker down")

    register_route("tests-refusing", refuse)
    try:
        letter = queue.record(
            "tasks.sync_account", GatewayTimeout("x"), arguments={"id": 3}, route="tests-refusing"
        )
        report = queue.process_due(now=LATER)
        assert report.failed == [letter.id]
        again = queue.get(letter.id)
        assert again is not None
        assert (again.attempts, again.status, again.message) == (2, Status.RETRYING, "broker down")
    finally:
        unregister_route("tests-refusing")


def test_the_default_queue_uses_the_configured_store(tmp_path: Path) -> None:
    configured = MemoryDeadLetterStore()
    idempotask.configure(dead_letter_store=configured)

    @dead_letter(swallow=True)
    def job() -> None:
        raise GatewayTimeout("x")

    job()
    assert [x.function for x in configured.query()] == [job.dead_letter_name]
    assert idempotask.default_queue().store is configured
    idempotask.configure(namespace="other")  # unrelated options keep the same store
    assert idempotask.default_queue().store is configured


def test_the_dead_letter_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    register_dead_letter_scheme("envdl", lambda url: seen.append(url) or MemoryDeadLetterStore())
    monkeypatch.setenv("IDEMPOTASK_DEAD_LETTER_URL", "envdl://from-env")
    idempotask.configure(dead_letter_store=None)
    assert isinstance(idempotask.default_queue().store, MemoryDeadLetterStore)
    assert seen == ["envdl://from-env"]


def test_the_default_store_follows_a_memory_backend() -> None:
    skip_unless_namespaced(MemoryBackend)
    idempotask.configure(backend=MemoryBackend())
    assert isinstance(idempotask.default_queue().store, MemoryDeadLetterStore)
    assert idempotask.default_queue().store is idempotask.default_queue().store


def test_sql_urls_build_the_sql_store_and_schemes_can_be_registered() -> None:
    from idempotask.backends.sql import SQLAlchemyBackend, SQLDeadLetterStore

    table = DeadLetterQueue("postgresql+psycopg://u@h/db?table=letters").store
    assert isinstance(table, SQLDeadLetterStore)
    if not provides_namespaced_stores(SQLAlchemyBackend):
        assert isinstance(DeadLetterQueue("postgresql+psycopg://u@h/db").store, SQLDeadLetterStore)
    made: list[str] = []

    def factory(url: str) -> MemoryDeadLetterStore:
        made.append(url)
        return MemoryDeadLetterStore()

    register_dead_letter_scheme("testdl", factory)
    assert isinstance(DeadLetterQueue("testdl://x").store, MemoryDeadLetterStore)
    assert made == ["testdl://x"]
    with pytest.raises(ConfigurationError, match="dead_letter_store"):
        idempotask.configure(dead_letter_store="not a url")


def test_a_misconfigured_store_spools_rather_than_losing_the_failure(
    tmp_path: Path,
) -> None:
    queue = DeadLetterQueue("postgresql+psycopg://u@h/db", spool=tmp_path / "r.jsonl")

    @dead_letter(queue=queue)
    def job() -> None:
        raise GatewayTimeout("x")

    with pytest.raises(GatewayTimeout):
        job()
    assert [x.function for x in queue.spool.letters()] == [job.dead_letter_name]


def test_options_are_validated_when_decorating() -> None:
    with pytest.raises(ConfigurationError, match="retry"):
        dead_letter(retry="yes")(lambda: None)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="policies"):
        dead_letter(policies={"transient": 5})(lambda: None)  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError, match="queue"):
        dead_letter(queue="memory://")(lambda: None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="redact"):
        dead_letter(redact="all")(lambda: None)  # type: ignore[arg-type]


def test_registered_names_point_at_the_outer_wrapper() -> None:
    @dead_letter(name="tests.registered-outer")
    @idempotent
    def job(n: int) -> int:
        return n

    assert registered_functions()["tests.registered-outer"] is job


def test_registered_cancellations_are_never_dead_lettered() -> None:
    """A framework's retry signal or time limit is not a failure of the call."""

    class RetryLater(Exception):
        pass

    idempotask.register_cancellation(RetryLater)
    queue = DeadLetterQueue("memory://")

    @dead_letter(queue=queue)
    def job() -> None:
        raise RetryLater("scheduled again in 10 s")

    with pytest.raises(RetryLater):
        job()
    assert queue.query() == []


def test_the_default_dead_letter_store_sits_beside_a_backend_instance() -> None:
    """configure(backend=<a store instance>) puts dead letters in the same store."""
    pytest.importorskip("redis")
    from idempotask.backends.redis import RedisBackend, RedisDeadLetterStore

    skip_unless_namespaced(RedisBackend)
    backend = RedisBackend.from_url("redis://127.0.0.1:6379/0")
    idempotask.configure(backend=backend)
    store = idempotask.config.get_dead_letter_store()
    assert isinstance(store, RedisDeadLetterStore)
    assert store.backend is backend

"""What operators (and the dashboard) see and do: every change to a letter appends to its
history with who acted; letters are found by id prefix, searched, counted, and changed
in bulk by filter. On memory; the stores' own suites run the contract elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from idempotask import DeadLetterQueue, Status, dead_letter, idempotent
from idempotask.backends.base import Action
from idempotask.deadletter import AmbiguousLetterId, DeadLetterNotFound
from idempotask.errors import ConfigurationError
from idempotask.retry import FixedDelay, RetryPolicy
from idempotask.taxonomy import FailureKind

pytestmark = pytest.mark.filterwarnings("ignore::idempotask.deadletter.KeepsAllArgumentsWarning")

T0 = 1_800_000_000.0
FAST = {FailureKind.TRANSIENT: RetryPolicy(1, FixedDelay(60))}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(clock: Clock, tmp_path: Path) -> DeadLetterQueue:
    return DeadLetterQueue("memory://", policies=FAST, clock=clock, spool=tmp_path / "q")


def steps(history: tuple[Action, ...]) -> list[tuple[str, str]]:
    return [(a.what, a.actor) for a in history]


def test_every_change_to_a_letter_is_in_its_history_with_who_did_it(
    queue: DeadLetterQueue, clock: Clock
) -> None:
    """First failure, a failed replay, retries running out, a requeue by hand, a replay
    that succeeds: each is one entry, oldest first, with its time, kind and error."""
    fail = [True]

    @dead_letter(queue=queue, swallow=True)
    @idempotent
    def sync(n: int) -> int:
        if fail[0]:
            raise TimeoutError(f"upstream timed out for {n}")
        return n

    sync(1)
    (letter,) = queue.query()
    assert steps(letter.history) == [("failed", "worker")]
    first = letter.history[0]
    assert (first.at, first.kind, first.error) == (
        T0,
        "transient",
        "TimeoutError: upstream timed out for 1",
    )

    clock.now = T0 + 100
    queue.process_due()  # fails again; the policy allows one retry only
    letter = queue.get(letter.id)
    assert letter is not None
    assert letter.status is Status.ABANDONED
    assert steps(letter.history) == [
        ("failed", "worker"),
        ("retry_failed", "processor"),
        ("abandoned", "processor"),
    ]
    assert letter.history[1].at == T0 + 100
    assert letter.history[2].note == "no retry left"

    clock.now = T0 + 200
    queue.requeue(letter.id, actor="alice", note="upstream fixed")
    fail[0] = False
    queue.process_due()
    letter = queue.get(letter.id)
    assert letter is not None
    assert (letter.status, letter.resolution) == (Status.RESOLVED, "retry")
    assert steps(letter.history)[-2:] == [("requeued", "alice"), ("retried", "processor")]
    assert letter.history[-2].note == "upstream fixed"


def test_a_replay_that_finds_the_call_completed_says_so(queue: DeadLetterQueue) -> None:
    runs: list[int] = []

    @dead_letter(queue=queue, swallow=True)
    @idempotent
    def report(day: int) -> int:
        runs.append(day)
        if len(runs) == 1:
            raise TimeoutError("first try")
        return day

    report(1)
    report(1)
    queue.process_due(now=T0 + 10**6)
    (letter,) = queue.query()
    assert steps(letter.history)[-1] == ("completed", "processor")
    assert letter.history[-1].note == "the call had completed meanwhile"


def test_resolve_and_abandon_keep_the_note_and_the_actor(queue: DeadLetterQueue) -> None:
    a = queue.record("billing.charge", TimeoutError("x"))
    b = queue.record("billing.charge", TimeoutError("y"))
    resolved = queue.mark_resolved(a.id, note="refunded by hand", actor="cli:alice")
    abandoned = queue.mark_abandoned(b.id, note="customer left", actor="web:bob")
    assert (resolved.status, resolved.resolution) == (Status.RESOLVED, "manual")
    assert resolved.history[-1] == Action(T0, "resolved", "cli:alice", note="refunded by hand")
    assert abandoned.history[-1] == Action(T0, "abandoned", "web:bob", note="customer left")
    assert steps(queue.mark_resolved(b.id).history)[-1] == ("resolved", "api")
    with pytest.raises(ConfigurationError, match="actor"):
        queue.mark_resolved(a.id, actor="")


def test_a_framework_replay_that_fails_again_adds_to_the_same_letter(
    queue: DeadLetterQueue,
) -> None:
    letter = queue.record("tasks.sync", TimeoutError("x"), route="celery")
    assert steps(letter.history) == [("failed", "celery")]
    again = queue.record("tasks.sync", TimeoutError("y"), route="celery", replay_of=letter.id)
    assert again.id == letter.id
    assert steps(again.history) == [
        ("failed", "celery"),
        ("retry_failed", "celery"),
        ("abandoned", "celery"),
    ]


def test_find_accepts_an_unambiguous_id_prefix(queue: DeadLetterQueue) -> None:
    letters = [queue.record("jobs.x", TimeoutError(str(n))) for n in range(40)]
    target = letters[17]
    assert queue.find(target.id) == target
    prefix = next(
        target.id[:n]
        for n in range(4, 33)
        if sum(x.id.startswith(target.id[:n]) for x in letters) == 1
    )
    assert queue.find(prefix) == target
    assert queue.find(prefix + "...") == target  # as the README writes ids
    with pytest.raises(DeadLetterNotFound):
        queue.find("ffffffffffffffffffff")
    with pytest.raises(DeadLetterNotFound):
        queue.find(target.id[:3])  # too short to look for

    shared = queue.record("jobs.x", TimeoutError("a"))
    twin = shared.evolve(id=shared.id[:6] + "0" * 26)
    queue.store.add(twin)
    with pytest.raises(AmbiguousLetterId) as caught:
        queue.find(shared.id[:6])
    assert set(caught.value.candidates) == {shared.id, twin.id}


def test_query_and_count_search_error_types_and_messages(queue: DeadLetterQueue) -> None:
    queue.record("billing.charge", TimeoutError("Gateway timed out"))
    queue.record("billing.charge", ValueError("card declined"))
    queue.record("billing.refund", ConnectionError("gateway refused the connection"))
    assert {x.message for x in queue.query(search="GATEWAY")} == {
        "Gateway timed out",
        "gateway refused the connection",
    }
    assert [x.message for x in queue.query(search="valueerror")] == ["card declined"]
    assert queue.count(DeadLetterQueue.filter(search="gateway")) == 2
    assert queue.count(DeadLetterQueue.filter(search="gateway", function="billing.refund")) == 1
    assert queue.count() == 3


def test_bulk_resolve_and_abandon_by_filter_record_each_letter(queue: DeadLetterQueue) -> None:
    for n in range(3):
        queue.record("billing.charge", TimeoutError(f"t{n}"))
    queue.record("billing.refund", TimeoutError("r"))
    charge = DeadLetterQueue.filter(function="billing.charge")
    assert queue.resolve_all(charge, note="settled in the PSP console", actor="web:carol") == 3
    assert queue.resolve_all(charge) == 0  # already resolved
    assert {x.status for x in queue.query(function="billing.charge")} == {Status.RESOLVED}
    assert {x.history[-1].actor for x in queue.query(function="billing.charge")} == {"web:carol"}
    assert queue.abandon_all(DeadLetterQueue.filter(search="r"), actor="web:carol") == 1
    (refund,) = queue.query(function="billing.refund")
    assert refund.status is Status.ABANDONED
    assert queue.requeue_all(function="billing.refund", actor="web:carol") == 1
    (refund,) = queue.query(function="billing.refund")
    assert steps(refund.history)[-1] == ("requeued", "web:carol")

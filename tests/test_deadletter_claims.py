"""A person's "retry now" against a replay that is running (DESIGN §5: a processor claims
due letters with a lease, so two processors never replay one letter).

Requeueing a letter must not end the claim of the processor replaying it: while the
replay runs, ``requeue`` / ``schedule_retry`` are refused with ``AlreadyInProgress``,
``requeue_all`` passes the letter over, and a second processor finds nothing to claim.
Real threads, on every store kind: memory, Redis, PostgreSQL and SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from idempotask import AlreadyInProgress, DeadLetterQueue, Status, dead_letter, keep_all
from idempotask.backends.base import DeadLetter, DeadLetterStore
from idempotask.backends.memory import MemoryDeadLetterStore
from idempotask.backends.sql import SQLDeadLetterStore
from idempotask.deadletter import ProcessReport
from tests.backends.test_redis_deadletters import redis_store_for_processes
from tests.backends.test_sql_deadletters import postgres_store_for_processes


@contextlib.contextmanager
def memory_store() -> Iterator[Callable[[], DeadLetterStore]]:
    store = MemoryDeadLetterStore()
    yield lambda: store


@contextlib.contextmanager
def sqlite_store() -> Iterator[Callable[[], DeadLetterStore]]:
    with tempfile.TemporaryDirectory(prefix="idempotask-claims-") as directory:
        store = SQLDeadLetterStore(f"sqlite:///{directory}/dl.db", create_tables=True)
        try:
            yield lambda: store
        finally:
            store.close()


STORES = [
    pytest.param(memory_store, id="memory"),
    pytest.param(redis_store_for_processes, id="redis", marks=pytest.mark.redis),
    pytest.param(postgres_store_for_processes, id="postgres", marks=pytest.mark.postgres),
    pytest.param(sqlite_store, id="sqlite"),
]

StoreMaker = Callable[[], contextlib.AbstractContextManager[Callable[[], DeadLetterStore]]]


class Shipping:
    """A plain ``@dead_letter`` function (no ``@idempotent`` key to protect it): its
    first call fails, each replay notes itself and waits in its body until released."""

    def __init__(self, queue: DeadLetterQueue) -> None:
        self.runs: list[int] = []
        self.replaying = threading.Event()
        self.release = threading.Event()
        self.name = f"tests.claims.ship_{uuid.uuid4().hex[:10]}"

        @dead_letter(queue=queue, redact=keep_all, name=self.name)
        def ship(order: int) -> None:
            self.runs.append(order)
            if len(self.runs) == 1:
                raise TimeoutError("carrier down")
            self.replaying.set()
            self.release.wait(30)

        self.ship = ship

    def fail_once(self, queue: DeadLetterQueue) -> DeadLetter:
        with pytest.raises(TimeoutError):
            self.ship(1)
        (letter,) = queue.query(function=self.name)
        return letter


@contextlib.contextmanager
def replaying(queue: DeadLetterQueue, now: float) -> Iterator[list[ProcessReport]]:
    """Processor A, in a thread, claims and replays the due letter; the block runs while
    the replay waits in the function's body. Yields A's report (filled once it ends)."""
    reports: list[ProcessReport] = []
    a = threading.Thread(target=lambda: reports.append(queue.process_due(now=now)))
    a.start()
    try:
        yield reports
    finally:
        a.join(30)
        assert not a.is_alive(), "processor A did not finish"


@pytest.mark.parametrize("make_store", STORES)
def test_retry_now_during_a_replay_is_refused_and_the_letter_is_replayed_once(
    make_store: StoreMaker, tmp_path: Path
) -> None:
    """While processor A replays a letter, "retry now" (requeue, schedule_retry) and the
    closes (mark_abandoned, mark_resolved) are refused naming the letter, the bulk
    operations pass it over, processor B claims nothing; the function body ran once for
    the failure and once for the replay. Afterwards a requeue works again."""
    with make_store() as open_store:
        queue = DeadLetterQueue(open_store(), spool=tmp_path / "spool.jsonl")
        shipping = Shipping(queue)
        letter = shipping.fail_once(queue)
        assert letter.next_retry_at is not None
        later = letter.next_retry_at + 1
        with replaying(queue, later) as reports:
            try:
                assert shipping.replaying.wait(30), "processor A never started the replay"
                with pytest.raises(AlreadyInProgress, match="being replayed") as refused:
                    queue.requeue(letter.id, actor="web:ann")
                assert letter.id in str(refused.value)
                assert "try again after the replay ends" in str(refused.value)
                with pytest.raises(AlreadyInProgress):
                    queue.schedule_retry(letter.id, in_=0, actor="cli:bob")
                assert queue.requeue_all(function=shipping.name, actor="cli:bob") == 0
                # Nor can a close end the claim (a requeue after it would pass).
                with pytest.raises(AlreadyInProgress, match="being replayed"):
                    queue.mark_abandoned(letter.id, actor="web:ann")
                with pytest.raises(AlreadyInProgress, match="being replayed"):
                    queue.mark_resolved(letter.id, actor="web:ann")
                assert queue.abandon_all(queue.filter(function=shipping.name)) == 0
                assert queue.resolve_all(queue.filter(function=shipping.name)) == 0
                b = queue.process_due(now=later)  # processor B
                assert b.claimed == 0, b.results
            finally:
                shipping.release.set()
        assert [r.outcome for r in reports[0].results] == ["resolved"]
        assert shipping.runs == [1, 1], "one failure and exactly one replay"
        done = queue.get(letter.id)
        assert done is not None
        assert done.status is Status.RESOLVED
        assert not {"requeued", "abandoned"} & {a.what for a in done.history}
        requeued = queue.requeue(letter.id, actor="web:ann")
        assert requeued.status is Status.PENDING


def test_a_refused_requeue_of_a_claimed_letter_changes_nothing_async(tmp_path: Path) -> None:
    """The async twins refuse too, and the claim survives: a second claim gets nothing."""
    store = MemoryDeadLetterStore()
    queue = DeadLetterQueue(store, spool=tmp_path / "spool.jsonl")
    letter = queue.record("tests.claims.async", TimeoutError("t"))
    assert letter.next_retry_at is not None
    (claimed,) = store.claim_due(letter.next_retry_at + 1)

    async def main() -> Any:
        with pytest.raises(AlreadyInProgress, match=letter.id):
            await queue.arequeue(letter.id)
        with pytest.raises(AlreadyInProgress):
            await queue.aschedule_retry(letter.id, in_=60)
        return await queue.arequeue_all(function="tests.claims.async")

    assert asyncio.run(main()) == 0
    assert queue.get(letter.id) == claimed
    assert store.claim_due(letter.next_retry_at + 1) == []


def test_a_requeue_after_the_claim_ran_out_applies(tmp_path: Path) -> None:
    """A processor that crashed holding the claim does not block people past its lease."""
    store = MemoryDeadLetterStore()
    queue = DeadLetterQueue(store, spool=tmp_path / "spool.jsonl")
    letter = queue.record("tests.claims.crashed", TimeoutError("t"))
    assert letter.next_retry_at is not None
    store.claim_due(letter.next_retry_at + 1)
    assert store.expire_claim(letter.id)
    assert queue.requeue(letter.id).status is Status.PENDING

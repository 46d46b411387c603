"""The delivery rule Dramatiq and RQ share (``idempotask.integrations._common``), in
process: each delivery of a message claims under an owner of its own, waits for a live
run of its own message, and is never answered by its own message's cached failure.

Real threads and asyncio tasks on the memory store; the real workers and brokers are in
test_dramatiq.py and test_rq.py.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest

import idempotask
from idempotask import idempotent
from idempotask.call import is_cached_error
from idempotask.errors import AlreadyInProgress
from idempotask.integrations._common import Delivery, Handover, arun_delivery, run_delivery


def _name() -> str:
    return f"deliveries.{uuid.uuid4().hex[:8]}"


class Gate:
    """A body (``gate.body``) that counts its runs and blocks until the test opens the
    gate."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = threading.Event()
        self.open = threading.Event()

        def body(n: int) -> dict[str, int]:
            self.runs += 1
            self.started.set()
            assert self.open.wait(10), "the test never opened the gate"
            return {"n": n, "run": self.runs}

        self.body = body


def _in_thread(target: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = target(*args)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_second_delivery_of_a_running_message_waits_past_wait_timeout_for_its_result() -> None:
    """Two deliveries of message m1 at once: the second never re-takes the first's claim;
    it waits for that run (well past its 0.05 s wait_timeout) and returns its result."""
    gate = Gate()
    spec = idempotent(name=_name(), lease=30, wait_timeout=0.05)(gate.body).__idempotask_spec__
    first, first_out = _in_thread(run_delivery, spec, (1,), {}, Delivery("m1"))
    assert gate.started.wait(10)
    second, second_out = _in_thread(run_delivery, spec, (1,), {}, Delivery("m1"))
    second.join(0.5)
    assert second.is_alive()  # still waiting for the first run, wait_timeout long gone
    gate.open.set()
    first.join(10)
    second.join(10)
    assert first_out == {"value": {"n": 1, "run": 1}}
    assert second_out == {"value": {"n": 1, "run": 1}}
    assert gate.runs == 1


def test_a_delivery_of_another_message_for_the_same_call_follows_wait_timeout() -> None:
    """A duplicate (another message id) is not the running message: AlreadyInProgress
    after its wait_timeout, as for any conflict."""
    gate = Gate()
    spec = idempotent(name=_name(), lease=30, wait_timeout=0.05)(gate.body).__idempotask_spec__
    first, _ = _in_thread(run_delivery, spec, (1,), {}, Delivery("m1"))
    assert gate.started.wait(10)
    try:
        with pytest.raises(AlreadyInProgress):
            run_delivery(spec, (1,), {}, Delivery("m2"))
    finally:
        gate.open.set()
        first.join(10)
    assert gate.runs == 1


def test_on_conflict_raise_raises_at_once_even_for_a_delivery_of_the_same_message() -> None:
    gate = Gate()
    spec = idempotent(name=_name(), lease=30, on_conflict="raise")(gate.body).__idempotask_spec__
    first, _ = _in_thread(run_delivery, spec, (1,), {}, Delivery("m1"))
    assert gate.started.wait(10)
    try:
        with pytest.raises(AlreadyInProgress):
            run_delivery(spec, (1,), {}, Delivery("m1"))
    finally:
        gate.open.set()
        first.join(10)


def test_a_failure_cached_by_a_message_answers_other_messages_but_never_its_own() -> None:
    """cache_errors: the failure of m1 answers m2 (a duplicate) without running, and is
    dropped for m1's own retry, which runs."""
    runs: list[int] = []

    @idempotent(name=_name(), cache_errors=60)
    def flaky(n: int) -> int:
        runs.append(n)
        if len(runs) == 1:
            raise ValueError("first run fails")
        return n * 2

    spec = flaky.__idempotask_spec__
    with pytest.raises(ValueError, match="first run fails"):
        run_delivery(spec, (4,), {}, Delivery("m1"))
    with pytest.raises(ValueError, match="first run fails") as cached:
        run_delivery(spec, (4,), {}, Delivery("m2"))
    assert is_cached_error(cached.value)
    assert runs == [4]
    assert run_delivery(spec, (4,), {}, Delivery("m1")) == 8
    assert runs == [4, 4]


def test_a_handover_lets_one_delivery_re_take_the_kept_claim_and_its_redelivery_waits() -> None:
    """An attempt kept its claim for its retry (dramatiq.Retry). The retry carrying the
    handover takes its ticket and re-takes the claim at once; a redelivery of that same
    retry (same handover) finds the ticket taken, does not re-take, and waits."""
    gate = Gate()
    spec = idempotent(name=_name(), lease=30, wait_timeout=0.05)(gate.body).__idempotask_spec__
    kept = Delivery("m1")
    key = spec.key((1,), {}, None)
    backend = spec.backend()
    assert backend.claim(key, "kept-token", lease=30, owner=kept.owner).held_by("kept-token")
    handover = Handover(kept.owner, uuid.uuid4().hex)

    retry, retry_out = _in_thread(run_delivery, spec, (1,), {}, Delivery("m1", handover))
    assert gate.started.wait(10)  # the kept claim was re-taken at once
    again, again_out = _in_thread(run_delivery, spec, (1,), {}, Delivery("m1", handover))
    again.join(0.5)
    assert again.is_alive()
    gate.open.set()
    retry.join(10)
    again.join(10)
    assert retry_out == again_out == {"value": {"n": 1, "run": 1}}
    assert gate.runs == 1


def test_a_handover_naming_another_messages_claim_is_ignored() -> None:
    """A delivery only accepts a handover of a claim of its own message."""
    other = Delivery("m2")
    assert Delivery("m1", Handover(other.owner, "t")).handover is None
    assert Handover.from_option({"owner": 3, "ticket": "t"}) is None
    assert Handover.from_option("nonsense") is None
    mine = Delivery("m1")
    assert Delivery("m1", Handover(mine.owner, "t")).handover == Handover(mine.owner, "t")


def test_owners_tell_deliveries_of_one_message_from_other_ids() -> None:
    """Each delivery has its own owner; "a" is never mistaken for "a~..." or "a/b"."""
    a1, a2 = Delivery("a"), Delivery("a")
    assert a1.owner != a2.owner
    assert a1.is_own(a2.owner)
    assert a1.is_own("a")  # a claim made when the message id itself was the owner
    assert not a1.is_own(Delivery("a/b").owner)
    assert not a1.is_own(Delivery("a~0123456789abcdef").owner)
    assert not a1.is_own(Delivery("b").owner)
    assert not a1.is_own("")
    long = Delivery("j" * 300)
    assert len(long.owner) <= 255  # stores keep owners in 255 characters
    assert long.is_own(Delivery("j" * 300).owner)
    assert not long.is_own(Delivery("j" * 301).owner)


async def test_two_async_deliveries_of_one_message_run_the_body_once() -> None:
    """The same rule through arun_delivery, for async actors and jobs."""
    idempotask.configure(backend="memory://")
    runs = 0
    release = asyncio.Event()

    @idempotent(name=_name(), lease=30, wait_timeout=0.05)
    async def body(n: int) -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return n + runs

    spec = body.__idempotask_spec__
    first = asyncio.create_task(arun_delivery(spec, (1,), {}, Delivery("m1")))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(arun_delivery(spec, (1,), {}, Delivery("m1")))
    await asyncio.sleep(0.3)
    assert not second.done()
    release.set()
    assert await first == await second == 2
    assert runs == 1

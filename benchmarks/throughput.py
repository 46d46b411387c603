"""Throughput: N concurrent callers (threads, or asyncio tasks) calling for a fixed time.

Every run is timed from the moment all callers are connected and warmed up until the last
one stops, so connection setup and thread start-up are not counted. Two mixes:

- *first calls*: every call has arguments never seen before (claim, run, complete);
- *duplicate-heavy*: 9 calls in 10 repeat one of ``HOT_KEYS`` calls already stored,
  1 in 10 is a first call — the shape of redelivered messages and retried requests.

The floor runs with the same number of callers, each doing one raw store write per call.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.report import Plan, Row
from benchmarks.timing import Rate

Call = Callable[[], Any]  # one call; for asyncio callers it returns an awaitable
MakeCall = Callable[[int], Any]  # caller index -> Call (or an awaitable of one)

HOT_KEYS = 100
# Argument values for the two mixes, far apart so a hot key is never a "first" call.
HOT_BASE = 10**11
# First-call arguments: next() on an itertools.count is atomic under the GIL, so threads
# can share it and still never repeat a value.
UNIQUE = itertools.count(10**12)
# A caller that has not finished this long after its run should have ended is stuck (a
# server that stopped answering): fail the run rather than hang the report.
STUCK_AFTER = 120.0


def first_calls(charge: Callable[[int], Any]) -> MakeCall:
    """Callers whose every call is a first call."""

    def make(caller: int) -> Call:
        return lambda: charge(next(UNIQUE))

    return make


def duplicate_heavy(charge: Callable[[int], Any]) -> MakeCall:
    """Callers repeating stored calls 9 times in 10 (see :func:`prime`), else a first call."""

    def make(caller: int) -> Call:
        # Callers start at different hot keys so they do not march in lockstep on one.
        turn = itertools.count(caller * 7)

        def call() -> Any:
            n = next(turn)
            if n % 10 == 9:
                return charge(next(UNIQUE))
            return charge(HOT_BASE + n % HOT_KEYS)

        return call

    return make


def prime(charge: Callable[[int], Any]) -> None:
    """Store the hot calls once, so the duplicate-heavy mix finds them."""
    for k in range(HOT_KEYS):
        charge(HOT_BASE + k)


async def aprime(charge: Callable[[int], Awaitable[Any]]) -> None:
    """:func:`prime` for a coroutine function."""
    for k in range(HOT_KEYS):
        await charge(HOT_BASE + k)


def _rate(spans: list[tuple[float, float, int]]) -> Rate:
    begin = min(s[0] for s in spans)
    end = max(s[1] for s in spans)
    calls = sum(s[2] for s in spans)
    return Rate(calls / (end - begin), calls, end - begin)


def run_threads(make_call: MakeCall, callers: int, seconds: float, *, warmup: int = 10) -> Rate:
    """``callers`` threads, each calling ``make_call(i)()`` in a loop for ``seconds``.

    ``make_call`` runs in the caller's own thread (so a per-thread connection, e.g. a
    sqlite3 one, belongs to the thread that uses it). The first error in any caller is
    raised here.
    """
    barrier = threading.Barrier(callers)
    spans: list[tuple[float, float, int]] = []
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            call = make_call(index)
            for _ in range(warmup):
                call()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()  # the other callers must not wait for this one forever
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        calls = 0
        start = now = time.perf_counter()
        deadline = start + seconds
        try:
            while now < deadline:
                call()
                calls += 1
                now = time.perf_counter()
        except BaseException as exc:
            errors.append(exc)
        spans.append((start, now, calls))  # list.append is atomic under the GIL

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"bench-caller-{i}", daemon=True)
        for i in range(callers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + STUCK_AFTER)
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"a benchmark caller did not finish within {STUCK_AFTER:g} s")
    if errors:
        raise errors[0]
    return _rate(spans)


async def run_tasks(make_call: MakeCall, callers: int, seconds: float, *, warmup: int = 10) -> Rate:
    """:func:`run_threads` with asyncio tasks on the running loop.

    ``make_call`` may be a coroutine function (to open a connection per task).
    """

    async def prepare(index: int) -> Call:
        made = make_call(index)
        call: Call = await made if inspect.isawaitable(made) else made
        for _ in range(warmup):
            await call()
        return call

    async def loop(call: Call) -> tuple[float, float, int]:
        calls = 0
        start = now = time.perf_counter()
        deadline = start + seconds
        while now < deadline:
            await call()
            calls += 1
            now = time.perf_counter()
        return start, now, calls

    # Prepared first and started together by one gather: no task runs its timed loop
    # while another is still connecting.
    prepared = await asyncio.gather(*(prepare(i) for i in range(callers)))
    spans = await asyncio.wait_for(
        asyncio.gather(*(loop(call) for call in prepared)), seconds + STUCK_AFTER
    )
    return _rate(list(spans))


def _who(n: int, kind: str) -> str:
    return f"{n} {kind}" if n != 1 else f"1 {kind.rstrip('s')}"


def thread_rows(
    label: str, plan: Plan, floor_name: str, make_floor: MakeCall, charge: Callable[[int], Any]
) -> list[Row]:
    """Throughput rows for a sync decorated ``charge(account_id)`` with 1, 4, 16 threads."""
    prime(charge)
    rows = []
    for n in plan.callers:
        who = _who(n, "threads")
        # The floor is run at each concurrency just before the figures it stands beside,
        # so a load spike from elsewhere hits both rather than one.
        floor = run_threads(make_floor, n, plan.seconds)
        dup = run_threads(duplicate_heavy(charge), n, plan.seconds)
        first = run_threads(first_calls(charge), n, plan.seconds)
        rows.append(Row(f"{label}: throughput, 90% duplicates, {who}", dup, floor_name, floor))
        rows.append(Row(f"{label}: throughput, first calls, {who}", first, floor_name, floor))
    return rows


async def task_rows(
    label: str,
    plan: Plan,
    floor_name: str,
    make_floor: MakeCall,
    charge: Callable[[int], Awaitable[Any]],
) -> list[Row]:
    """:func:`thread_rows` for an ``async def`` decorated ``charge`` with asyncio tasks."""
    await aprime(charge)
    rows = []
    for n in plan.callers:
        who = _who(n, "asyncio tasks")
        floor = await run_tasks(make_floor, n, plan.seconds)
        dup = await run_tasks(duplicate_heavy(charge), n, plan.seconds)
        first = await run_tasks(first_calls(charge), n, plan.seconds)
        rows.append(Row(f"{label}: throughput, 90% duplicates, {who}", dup, floor_name, floor))
        rows.append(Row(f"{label}: throughput, first calls, {who}", first, floor_name, floor))
    return rows

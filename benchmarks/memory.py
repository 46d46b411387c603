"""The embedded default: key hashing, the in-memory decorator's overhead and throughput,
and what its records cost in RAM."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
import tracemalloc
from typing import Any

import idempotask
from benchmarks.report import Plan, Row
from benchmarks.throughput import UNIQUE, thread_rows
from benchmarks.timing import Quantity, Timing, ameasure, ameasure_each, measure, measure_each
from idempotask import idempotent
from idempotask.backends.memory import MemoryBackend


def bare(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
    """The benchmarked body: returns a small dict, like a typical task's result."""
    return {"ok": True, "account": account_id}


async def abare(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
    """:func:`bare` as a coroutine function."""
    return {"ok": True, "account": account_id}


def rows(plan: Plan) -> list[Row]:
    """Latency and throughput rows, then the RAM rows (:func:`footprint_rows`)."""
    return latency_rows(plan) + throughput_rows(plan) + footprint_rows(plan)


def latency_rows(plan: Plan) -> list[Row]:
    """Key hashing and duplicate/first call latency beside a bare call."""
    scale = plan.scale
    idempotask.configure(backend=MemoryBackend(max_entries=1_000_000))
    wrapped = idempotent(name="bench.memory.charge")(bare)
    awrapped = idempotent(name="bench.memory.acharge")(abare)

    args = (12345, "user@example.com")
    kwargs: dict[str, Any] = {"notify": True}
    batches = 200 // scale

    key = measure(lambda: wrapped.key_for(*args, **kwargs), batches=batches)
    # What the most used alternatives do: hash str() of the arguments (ambiguous:
    # 1 and "1" collide, dict order leaks in).
    naive = measure(lambda: hashlib.md5(str((args, kwargs)).encode()).hexdigest(), batches=batches)
    wrapped(*args, **kwargs)  # store the result once
    bare_call = measure(lambda: bare(*args, **kwargs), batches=batches)
    dup = measure(lambda: wrapped(*args, **kwargs), batches=batches)
    counter = itertools.count()
    first = measure_each(lambda i: wrapped(next(counter), "user@example.com"), count=4000 // scale)

    async def adup_loop() -> tuple[Timing, Timing, Timing]:
        await awrapped(*args, **kwargs)
        bare_t = await ameasure(lambda: abare(*args, **kwargs), batches=batches)
        dup_t = await ameasure(lambda: awrapped(*args, **kwargs), batches=batches)
        acounter = itertools.count()
        first_t = await ameasure_each(
            lambda i: awrapped(next(acounter), "user@example.com"), count=4000 // scale
        )
        return bare_t, dup_t, first_t

    abare_t, adup, afirst = asyncio.run(adup_loop())
    return [
        Row("key for a call with 3 small args", key, "md5(str(args))", naive, "≤ 4 µs"),
        Row("memory: duplicate call, sync", dup, "bare call", bare_call, "added ≤ 8 µs"),
        Row("memory: first call, sync", first, "bare call", bare_call),
        Row("memory: duplicate call, async", adup, "bare await", abare_t, "added ≤ 8 µs"),
        Row("memory: first call, async", afirst, "bare await", abare_t),
    ]


def throughput_rows(plan: Plan) -> list[Row]:
    """Calls/s with 1, 4 and 16 threads beside the same threads making bare calls.

    The GIL serialises in-process work, so more threads add no throughput here; the rows
    show what contention on the store's lock and the GIL costs instead.
    """
    # Large enough that no first call of the run evicts a hot record.
    idempotask.configure(backend=MemoryBackend(max_entries=5_000_000))
    charge = idempotent(name="bench.memory.throughput")(bare)

    def make_floor(caller: int) -> Any:
        return lambda: bare(next(UNIQUE), "user@example.com")

    try:
        return thread_rows(
            "memory", plan, "bare call", make_floor, lambda i: charge(i, "user@example.com")
        )
    finally:
        # Drop the run's records now rather than hold them through the later suites.
        idempotask.configure(backend=MemoryBackend())
        gc.collect()


def _traced_bytes() -> int:
    gc.collect()  # count what is held, not garbage a later collection would free
    return tracemalloc.get_traced_memory()[0]


def footprint_rows(plan: Plan) -> list[Row]:
    """Bytes per stored record, and RAM bounded at ``max_entries`` (tracemalloc).

    Records are stored through the decorator, as an application would: the figure is
    everything the process holds per remembered call (record, key, token, result bytes,
    and the store's index entries), not a size estimate of one object.
    """
    count = 20_000 if plan.quick else 100_000
    store = MemoryBackend(max_entries=count + 1)
    remember = idempotent(name="bench.memory.footprint", backend=store)(bare)
    remember(-1, "user@example.com")  # the function's own lazy setup is not per record
    record = store.get(remember.key_for(-1, "user@example.com"))
    key_chars = len(record.key) if record else 0
    result_bytes = len(record.payload) if record else 0

    tracemalloc.start()
    try:
        before = _traced_bytes()
        for i in range(count):
            remember(i, "user@example.com")
        held = _traced_bytes() - before
        per_record = held / count
        stored = store.size - 1
        del remember, store
        gc.collect()

        cap = 2_000 if plan.quick else 20_000
        bounded = MemoryBackend(max_entries=cap)
        fill = idempotent(name="bench.memory.bounded", backend=bounded)(bare)
        fill(-1, "user@example.com")
        base = _traced_bytes()
        tracemalloc.reset_peak()
        for i in range(5 * cap):
            fill(i, "user@example.com")
        final = _traced_bytes() - base
        peak = tracemalloc.get_traced_memory()[1] - base
        kept = bounded.size
    finally:
        tracemalloc.stop()

    expected = Quantity(cap * per_record, "B")
    return [
        Row(
            f"memory: bytes per stored record ({stored:,} completed calls, "
            f"{key_chars}-char key, {result_bytes}-byte result)",
            Quantity(per_record, "B"),
        ),
        Row(
            f"memory: records held after {5 * cap:,} first calls, max_entries={cap:,}",
            Quantity(kept, "records"),
            "max_entries",
            Quantity(cap, "records"),
            "= max_entries",
        ),
        Row(
            f"memory: bytes held after {5 * cap:,} first calls, max_entries={cap:,}",
            Quantity(final, "B", f"peak {Quantity(peak, 'B')}"),
            "max_entries x bytes per record",
            expected,
            "≈ 1x",
        ),
    ]

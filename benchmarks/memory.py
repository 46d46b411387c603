"""The embedded default: key hashing and the in-memory decorator's overhead."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from typing import Any

import idempotask
from benchmarks.timing import Timing, ameasure, ameasure_each, measure, measure_each
from idempotask import idempotent
from idempotask.backends.memory import MemoryBackend

Row = tuple[str, Timing, str, Timing | None, str]


def rows(quick: bool = False) -> list[Row]:
    """Benchmark rows: (what, figure, floor name, floor, target)."""
    scale = 4 if quick else 1
    idempotask.configure(backend=MemoryBackend(max_entries=1_000_000))

    def bare(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    wrapped = idempotent(name="bench.memory.charge")(bare)

    async def abare(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    awrapped = idempotent(name="bench.memory.acharge")(abare)

    args = (12345, "user@example.com")
    kwargs = {"notify": True}
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
        ("key for a call with 3 small args", key, "md5(str(args))", naive, "≤ 4 µs"),
        ("memory: duplicate call, sync", dup, "bare call", bare_call, "added ≤ 8 µs"),
        ("memory: first call, sync", first, "bare call", bare_call, ""),
        ("memory: duplicate call, async", adup, "bare await", abare_t, "added ≤ 8 µs"),
        ("memory: first call, async", afirst, "bare await", abare_t, ""),
    ]

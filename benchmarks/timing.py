"""Small measuring helpers: batches of calls, per-call medians and p95s, and the value
types the report prints (latency, throughput, amounts such as bytes)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Per-call latency in microseconds."""

    median: float
    p95: float
    samples: int

    def __str__(self) -> str:
        return f"{self.median:9.2f} µs (p95 {self.p95:9.2f})"


@dataclass(frozen=True)
class Rate:
    """Throughput: calls completed per second by all callers together."""

    per_second: float
    calls: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.per_second:,.0f} calls/s"


@dataclass(frozen=True)
class Quantity:
    """An amount that is not a time, such as bytes held or records stored.

    ``note`` is printed after the value, e.g. ``"peak 3.20 MiB"``.
    """

    value: float
    unit: str
    note: str = ""

    def __str__(self) -> str:
        text = format_amount(self.value, self.unit)
        return f"{text} ({self.note})" if self.note else text


def format_amount(value: float, unit: str) -> str:
    """``value`` in ``unit``; bytes scale to KiB/MiB so a README reader need not count digits."""
    if unit == "B":
        if abs(value) >= 1024 * 1024:
            return f"{value / (1024 * 1024):.2f} MiB"
        if abs(value) >= 10 * 1024:
            return f"{value / 1024:.1f} KiB"
        return f"{value:.0f} B"
    return f"{value:,.0f} {unit}"


def _summary(per_call: list[float]) -> Timing:
    per_call.sort()
    p95 = per_call[min(len(per_call) - 1, int(len(per_call) * 0.95))]
    return Timing(statistics.median(per_call), p95, len(per_call))


def measure(fn: Callable[[], Any], *, batches: int = 200, batch: int = 50) -> Timing:
    """Time ``fn()`` in batches; each batch's mean is one sample (µs per call)."""
    for _ in range(batch):  # warm up caches, connections and lazy setup
        fn()
    samples = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter_ns() - start) / batch / 1000)
    return _summary(samples)


def measure_each(fn: Callable[[int], Any], *, count: int = 2000) -> Timing:
    """Time ``fn(i)`` one call at a time (for calls that must differ, like first calls)."""
    fn(-1)
    samples = []
    for i in range(count):
        start = time.perf_counter_ns()
        fn(i)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return _summary(samples)


async def ameasure(
    fn: Callable[[], Awaitable[Any]], *, batches: int = 200, batch: int = 50
) -> Timing:
    """``measure`` for coroutine functions, awaited one after another on the running loop."""
    for _ in range(batch):
        await fn()
    samples = []
    for _ in range(batches):
        start = time.perf_counter_ns()
        for _ in range(batch):
            await fn()
        samples.append((time.perf_counter_ns() - start) / batch / 1000)
    return _summary(samples)


async def ameasure_each(fn: Callable[[int], Awaitable[Any]], *, count: int = 2000) -> Timing:
    """``measure_each`` for coroutine functions."""
    await fn(-1)
    samples = []
    for i in range(count):
        start = time.perf_counter_ns()
        await fn(i)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return _summary(samples)


def _in_turn(names: list[str], rounds: int) -> Iterator[str]:
    """Every name once per round, the order rotating from round to round."""
    for round_ in range(rounds):
        shift = round_ % len(names)
        yield from names[shift:] + names[:shift]


def interleaved(
    fns: Mapping[str, Callable[[], Any]], *, batches: int = 200, batch: int = 20
) -> dict[str, Timing]:
    """``measure`` for several functions at once, batch by batch in turn.

    Round after round, each function runs one batch (the order rotating every round), so
    a figure and its floor are sampled over the same seconds: a machine that speeds up or
    slows down during the run (a shared VM does) moves them together instead of skewing
    their ratio. Each batch's mean is one sample; the figure is the median of a
    function's samples.
    """
    names = list(fns)
    for name in names:  # warm up caches, connections and lazy setup
        for _ in range(batch):
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in _in_turn(names, batches):
        fn = fns[name]
        start = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        samples[name].append((time.perf_counter_ns() - start) / batch / 1000)
    return {name: _summary(values) for name, values in samples.items()}


async def ainterleaved(
    fns: Mapping[str, Callable[[], Awaitable[Any]]], *, batches: int = 200, batch: int = 20
) -> dict[str, Timing]:
    """``interleaved`` for coroutine functions, awaited one after another on the loop."""
    names = list(fns)
    for name in names:
        for _ in range(batch):
            await fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in _in_turn(names, batches):
        fn = fns[name]
        start = time.perf_counter_ns()
        for _ in range(batch):
            await fn()
        samples[name].append((time.perf_counter_ns() - start) / batch / 1000)
    return {name: _summary(values) for name, values in samples.items()}

"""Redis: duplicate and first calls beside a raw ``SET NX PX`` round trip, the peers on the
same Redis beside the same floor, and throughput with threads and asyncio tasks."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from typing import Any

import idempotask
from benchmarks import peers, roundtrips
from benchmarks.report import Plan, Row
from benchmarks.throughput import UNIQUE, task_rows, thread_rows
from benchmarks.timing import Timing, ainterleaved, interleaved
from idempotask import idempotent

URL = os.environ.get("IDEMPOTASK_REDIS_URL", "redis://127.0.0.1:6379/0")
EMAIL = "user@example.com"
FLOOR = "SET NX PX"
AFLOOR = "SET NX PX (async)"


def rows(plan: Plan) -> list[Row]:
    """Benchmark rows on the Redis at IDEMPOTASK_REDIS_URL."""
    import redis
    import redis.asyncio as aredis

    from idempotask.backends.redis import RedisBackend

    batches = 100 // plan.scale
    ns = f"bench{uuid.uuid4().hex[:8]}"
    backend = RedisBackend.from_url(URL)
    idempotask.configure(backend=backend, namespace=ns)
    raw = redis.Redis.from_url(URL)
    raw.ping()
    seq = itertools.count()

    # A ttl of an hour rather than the default day: should the clean-up below not run,
    # the run's records still go away by themselves.
    @idempotent(name="bench.redis.charge", ttl=3600)
    def charge(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    @idempotent(name="bench.redis.acharge", ttl=3600)
    async def acharge(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    def set_floor(key: str) -> Any:
        return raw.set(key, b"1", nx=True, px=60_000)

    try:

        def set_nx_then_get() -> Any:
            k = f"{ns}:twotrips"
            raw.set(k, b"v", nx=True, px=60_000)
            return raw.get(k)

        charge(1, EMAIL)
        # Floor and figures in turn, batch by batch: see benchmarks.timing.interleaved.
        timings = interleaved(
            {
                "floor": lambda: set_floor(f"{ns}:floor:{next(seq)}"),
                "two_trips": set_nx_then_get,
                "dup": lambda: charge(1, EMAIL),
                "first": lambda: charge(next(seq), EMAIL),
            },
            batches=batches,
            batch=20,
        )
        floor, two_trips = timings["floor"], timings["two_trips"]
        dup, first = timings["dup"], timings["first"]
        dup_trips = roundtrips.label(roundtrips.per_call(lambda i: charge(1, EMAIL)))
        first_trips = roundtrips.label(roundtrips.per_call(lambda i: charge(next(seq), EMAIL)))
        # Right after our own rows, so the peers stand beside the very same floor figure.
        peer_rows = peers.rows(plan, URL, ns, FLOOR, floor) if plan.peers else []

        def make_floor(caller: int) -> Any:
            return lambda: set_floor(f"{ns}:tfloor:{next(UNIQUE)}")

        threads = thread_rows("redis", plan, FLOOR, make_floor, lambda i: charge(i, EMAIL))

        async def async_rows() -> tuple[Timing, Timing, Timing, list[Row]]:
            client = aredis.Redis.from_url(URL)

            def aset_floor(key: str) -> Any:
                return client.set(key, b"1", nx=True, px=60_000)

            await acharge(1, EMAIL)
            atimings = await ainterleaved(
                {
                    "floor": lambda: aset_floor(f"{ns}:afloor:{next(seq)}"),
                    "dup": lambda: acharge(1, EMAIL),
                    "first": lambda: acharge(next(seq), EMAIL),
                },
                batches=batches,
                batch=20,
            )
            afloor, adup, afirst = atimings["floor"], atimings["dup"], atimings["first"]

            def make_afloor(caller: int) -> Any:
                return lambda: aset_floor(f"{ns}:tfloor:{next(UNIQUE)}")

            tasks = await task_rows("redis", plan, AFLOOR, make_afloor, lambda i: acharge(i, EMAIL))
            await client.aclose()
            await backend.aclose()
            return afloor, adup, afirst, tasks

        afloor, adup, afirst, tasks = asyncio.run(async_rows())
    finally:
        _delete(raw, f"{ns}:*")
        _delete(raw, f"qo_{ns}:*")  # celery-once's lock keys
        raw.close()
        backend.close()
    return [
        Row(f"redis: duplicate call, sync ({dup_trips})", dup, FLOOR, floor, "≤ 1.3x"),
        Row("redis: SET NX then GET (2 round trips)", two_trips, FLOOR, floor),
        Row(
            f"redis: first call (claim+complete), sync ({first_trips})",
            first,
            FLOOR,
            floor,
            "≤ 2.3x",
        ),
        Row("redis: duplicate call, async", adup, AFLOOR, afloor, "≤ 1.3x"),
        Row("redis: first call, async", afirst, AFLOOR, afloor, "≤ 2.3x"),
        *peer_rows,
        *threads,
        *tasks,
    ]


def _delete(client: Any, pattern: str) -> None:
    """Remove the run's keys: UNLINK in batches, since a throughput run leaves 100k+."""
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)

"""Redis: duplicate and first calls beside a raw ``SET NX PX`` round trip."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from typing import Any

import idempotask
from benchmarks.timing import Timing, ameasure, ameasure_each, measure, measure_each
from idempotask import idempotent

Row = tuple[str, Timing, str, Timing | None, str]

URL = os.environ.get("IDEMPOTASK_REDIS_URL", "redis://127.0.0.1:6379/0")


def rows(quick: bool = False) -> list[Row]:
    """Benchmark rows on the Redis at IDEMPOTASK_REDIS_URL."""
    import redis
    import redis.asyncio as aredis

    from idempotask.backends.redis import RedisBackend

    scale = 4 if quick else 1
    batches, count = 100 // scale, 2000 // scale
    ns = f"bench{uuid.uuid4().hex[:8]}"
    backend = RedisBackend.from_url(URL)
    idempotask.configure(backend=backend, namespace=ns)
    raw = redis.Redis.from_url(URL)
    raw.ping()
    seq = itertools.count()

    @idempotent(name="bench.redis.charge")
    def charge(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    @idempotent(name="bench.redis.acharge")
    async def acharge(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        return {"ok": True, "account": account_id}

    try:
        floor = measure(
            lambda: raw.set(f"{ns}:floor:{next(seq)}", b"1", nx=True, px=60_000),
            batches=batches,
            batch=20,
        )

        def set_nx_then_get() -> Any:
            k = f"{ns}:twotrips"
            raw.set(k, b"v", nx=True, px=60_000)
            return raw.get(k)

        two_trips = measure(set_nx_then_get, batches=batches, batch=20)
        charge(1, "user@example.com")
        dup = measure(lambda: charge(1, "user@example.com"), batches=batches, batch=20)
        first = measure_each(lambda i: charge(next(seq), "user@example.com"), count=count)

        async def async_rows() -> tuple[Timing, Timing, Timing]:
            client = aredis.Redis.from_url(URL)
            afloor = await ameasure(
                lambda: client.set(f"{ns}:afloor:{next(seq)}", b"1", nx=True, px=60_000),
                batches=batches,
                batch=20,
            )
            await acharge(1, "user@example.com")
            adup = await ameasure(lambda: acharge(1, "user@example.com"), batches=batches, batch=20)
            afirst = await ameasure_each(
                lambda i: acharge(next(seq), "user@example.com"), count=count
            )
            await client.aclose()
            await backend.aclose()
            return afloor, adup, afirst

        afloor, adup, afirst = asyncio.run(async_rows())
    finally:
        for key in raw.scan_iter(match=f"{ns}:*", count=1000):
            raw.delete(key)
        raw.close()
        backend.close()
    return [
        ("redis: duplicate call, sync", dup, "SET NX PX", floor, "≤ 1.3x"),
        ("redis: SET NX then GET (two trips)", two_trips, "SET NX PX", floor, ""),
        ("redis: first call (claim+complete), sync", first, "SET NX PX", floor, "≤ 2.3x"),
        ("redis: duplicate call, async", adup, "SET NX PX (async)", afloor, "≤ 1.3x"),
        ("redis: first call, async", afirst, "SET NX PX (async)", afloor, "≤ 2.3x"),
    ]

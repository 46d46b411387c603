"""Redis: duplicate and first calls beside a raw ``SET NX PX`` sent through redis-py's
``execute_command`` (the floor: the same public path the backend uses), again with
OpenTelemetry's redis instrumentation on (on our client and the floor's alike), the peers
on the same Redis beside the same floor, and throughput with threads and asyncio tasks."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import idempotask
from benchmarks import peers, roundtrips
from benchmarks.report import Plan, Row, Skipped
from benchmarks.throughput import UNIQUE, task_rows, thread_rows
from benchmarks.timing import Timing, ainterleaved, interleaved
from idempotask import idempotent

URL = os.environ.get("IDEMPOTASK_REDIS_URL", "redis://127.0.0.1:6379/0")
EMAIL = "user@example.com"
FLOOR = "SET NX PX"
AFLOOR = "SET NX PX (async)"
OTEL_FLOOR = "SET NX PX, OpenTelemetry on"
OTEL_AFLOOR = "SET NX PX (async), OpenTelemetry on"
DUP_TARGET, FIRST_TARGET = "≤ 1.15x", "≤ 2.3x"


@contextmanager
def _opentelemetry() -> Iterator[str]:
    """OpenTelemetry's RedisInstrumentor on, with an SDK tracer whose spans are batched
    and dropped (production exports them; the export is not what is measured). Yields ""
    or the reason it cannot run."""
    try:
        from opentelemetry.instrumentation.redis import RedisInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError as exc:
        yield f"opentelemetry-instrumentation-redis not installed ({exc.name})"
        return

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    instrumentor = RedisInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield ""
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


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
        return raw.execute_command("SET", key, b"1", "NX", "PX", 60_000)

    def sync_timings(tag: str) -> dict[str, Timing]:
        def set_nx_then_get() -> Any:
            k = f"{ns}:twotrips"
            raw.execute_command("SET", k, b"v", "NX", "PX", 60_000)
            return raw.execute_command("GET", k)

        charge(1, EMAIL)
        # Floor and figures in turn, batch by batch: see benchmarks.timing.interleaved.
        return interleaved(
            {
                "floor": lambda: set_floor(f"{ns}:{tag}floor:{next(seq)}"),
                "two_trips": set_nx_then_get,
                "dup": lambda: charge(1, EMAIL),
                "first": lambda: charge(next(seq), EMAIL),
            },
            batches=batches,
            batch=20,
        )

    async def async_timings(tag: str) -> dict[str, Timing]:
        client = aredis.Redis.from_url(URL)
        try:
            await acharge(1, EMAIL)
            return await ainterleaved(
                {
                    "floor": lambda: client.execute_command(
                        "SET", f"{ns}:{tag}afloor:{next(seq)}", b"1", "NX", "PX", 60_000
                    ),
                    "dup": lambda: acharge(1, EMAIL),
                    "first": lambda: acharge(next(seq), EMAIL),
                },
                batches=batches,
                batch=20,
            )
        finally:
            await client.aclose()

    try:
        plain = sync_timings("")
        floor = plain["floor"]
        dup_trips = roundtrips.label(roundtrips.per_call(lambda i: charge(1, EMAIL)))
        first_trips = roundtrips.label(roundtrips.per_call(lambda i: charge(next(seq), EMAIL)))
        aplain = asyncio.run(async_timings(""))
        with _opentelemetry() as otel_missing:
            if not otel_missing:
                traced = sync_timings("otel")
                atraced = asyncio.run(async_timings("otel"))
        # Right after our own rows, so the peers stand beside the very same floor figure.
        peer_rows = peers.rows(plan, URL, ns, FLOOR, floor) if plan.peers else []

        def make_floor(caller: int) -> Any:
            return lambda: set_floor(f"{ns}:tfloor:{next(UNIQUE)}")

        threads = thread_rows("redis", plan, FLOOR, make_floor, lambda i: charge(i, EMAIL))

        async def async_throughput() -> list[Row]:
            client = aredis.Redis.from_url(URL)

            def make_afloor(caller: int) -> Any:
                return lambda: client.execute_command(
                    "SET", f"{ns}:tfloor:{next(UNIQUE)}", b"1", "NX", "PX", 60_000
                )

            try:
                return await task_rows(
                    "redis", plan, AFLOOR, make_afloor, lambda i: acharge(i, EMAIL)
                )
            finally:
                await client.aclose()

        tasks = asyncio.run(async_throughput())
    finally:
        _delete(raw, f"{ns}:*")
        _delete(raw, f"qo_{ns}:*")  # celery-once's lock keys
        raw.close()
        backend.close()

    result = [
        Row(f"redis: duplicate call, sync ({dup_trips})", plain["dup"], FLOOR, floor, DUP_TARGET),
        Row("redis: SET NX then GET (2 round trips)", plain["two_trips"], FLOOR, floor),
        Row(
            f"redis: first call (claim+complete), sync ({first_trips})",
            plain["first"],
            FLOOR,
            floor,
            FIRST_TARGET,
        ),
        Row("redis: duplicate call, async", aplain["dup"], AFLOOR, aplain["floor"], DUP_TARGET),
        Row("redis: first call, async", aplain["first"], AFLOOR, aplain["floor"], FIRST_TARGET),
    ]
    if otel_missing:
        result.append(Row("redis, OpenTelemetry on", Skipped(otel_missing)))
    else:
        result += [
            Row(
                "redis, OpenTelemetry on: duplicate call, sync",
                traced["dup"],
                OTEL_FLOOR,
                traced["floor"],
                DUP_TARGET,
            ),
            Row(
                "redis, OpenTelemetry on: first call, sync",
                traced["first"],
                OTEL_FLOOR,
                traced["floor"],
                FIRST_TARGET,
            ),
            Row(
                "redis, OpenTelemetry on: duplicate call, async",
                atraced["dup"],
                OTEL_AFLOOR,
                atraced["floor"],
                DUP_TARGET,
            ),
            Row(
                "redis, OpenTelemetry on: first call, async",
                atraced["first"],
                OTEL_AFLOOR,
                atraced["floor"],
                FIRST_TARGET,
            ),
        ]
    return [*result, *peer_rows, *peers.versus_ours(peer_rows, plain["dup"]), *threads, *tasks]


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

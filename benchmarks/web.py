"""The dashboard with 100,000 dead letters in the store, on Redis and on PostgreSQL: the
server time of the letters page and of the overview (the ``Server-Timing`` the app sends,
the app called in-process), each beside a bare query of the store measured in turn in
the same run, and the background count the overview renders from beside one ``stats()``
over every letter.

Letters are written through the store's own ``add`` (threads, a few minutes for 100,000
on a 2-core machine; 10,000 with ``--quick``), their last failures spread over the past
ten days, four statuses and kinds, 50 functions.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.report import Plan, Row, Skipped
from benchmarks.timing import Timing

REDIS_URL = os.environ.get("IDEMPOTASK_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "IDEMPOTASK_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
TARGET = "≤ 300,000 µs"  # 300 ms of server time
KINDS = ("transient", "external", "configuration", "permanent")


def _timing(samples_ms: list[float]) -> Timing:
    values = sorted(s * 1000 for s in samples_ms)  # µs, as every figure of the report
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    return Timing(statistics.median(values), p95, len(values))


def _fill(store: Any, count: int, now: float) -> None:
    from idempotask.backends.base import DeadLetter, Status

    statuses = list(Status)
    span = 10 * 86400.0

    def add(i: int) -> None:
        at = now - span * i / count
        status = statuses[i % 4]
        store.add(
            DeadLetter(
                id=f"{i:06d}-{uuid.uuid4().hex[:8]}",
                function=f"bench.fn{i % 50}",
                kind=KINDS[i % 4],
                error_type="builtins.TimeoutError",
                message=f"gateway timed out for order {i}",
                traceback="Traceback (most recent call last):\n  ...\nTimeoutError\n",
                arguments=b'{"order": %d}' % i,
                status=status,
                first_failed_at=at,
                last_failed_at=at,
                next_retry_at=at + 300 if status in (Status.PENDING, Status.RETRYING) else None,
                attempts=1 + i % 3,
            )
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(count)))


def _from_loopback(app: Any) -> Any:
    """``app`` with every request from 127.0.0.1 (the dashboard serves this machine only
    when it has no authentication; the test client's own address is no address)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "client": ("127.0.0.1", 1)}
        await app(scope, receive, send)

    return wrapped


def _server_ms(response: Any) -> float:
    value = response.headers["server-timing"].split("dur=", 1)[1]
    assert response.status_code == 200, response.status_code
    return float(value)


def _in_turn(
    page: Callable[[], float], floor: Callable[[], None], rounds: int
) -> tuple[Timing, Timing]:
    """The page's server time and the floor's time, sampled in turn (ms in, µs out)."""
    page()
    floor()
    pages, floors = [], []
    for _ in range(rounds):
        pages.append(page())
        started = time.perf_counter()
        floor()
        floors.append((time.perf_counter() - started) * 1000)
    return _timing(pages), _timing(floors)


def _suite(name: str, url: str, plan: Plan) -> list[Row]:
    import idempotask
    from idempotask.backends.base import DeadLetterFilter, Status
    from idempotask.config import resolve_backend
    from idempotask.web import create_app

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2")
        from starlette.testclient import TestClient

    count = 10_000 if plan.quick else 100_000
    rounds = 8 if plan.quick else 30
    namespace = f"benchweb{uuid.uuid4().hex[:6]}"
    backend = resolve_backend(url)
    store = backend.dead_letter_store(namespace=namespace)  # type: ignore[attr-defined]
    for made in (backend, store):
        create = getattr(made, "create_tables", None)
        if create is not None:
            create()
    now = time.time()
    idempotask.configure(backend=url, namespace=namespace)
    try:
        _fill(store, count, now)
        app = create_app(refresh=3600.0)  # the benchmark takes its counts itself
        dash = app.state.dashboard
        # One client kept open: one event loop for every request, as a server has (a
        # client per request would measure a new loop's connections each time).
        client = TestClient(_from_loopback(app)).__enter__()

        def get(path: str) -> Callable[[], float]:
            return lambda: _server_ms(client.get(path))

        rows = []
        label = f"{name} web, {count:,} letters"
        newest = _in_turn(
            get("/letters"), lambda: store.query(DeadLetterFilter(), limit=51), rounds
        )
        rows.append(
            Row(
                f"{label}: letters page, newest first",
                newest[0],
                "query of 51 letters",
                newest[1],
                TARGET,
            )
        )
        pending = DeadLetterFilter(status=(Status.PENDING,))
        deep = store.query(pending, limit=1, offset=count // 8)[0].last_failed_at
        path = f"/letters?status=pending&before={deep!r}&skip=1"
        later = _in_turn(
            get(path), lambda: store.query(pending, limit=51, offset=count // 8), rounds
        )
        rows.append(
            Row(
                f"{label}: letters page, status pending, page {count // 400} (keyset)",
                later[0],
                "query of 51 letters at that offset",
                later[1],
                TARGET,
            )
        )
        function = DeadLetterFilter(function=("bench.fn7",))
        by_fn = _in_turn(
            get("/letters?function=bench.fn7"), lambda: store.query(function, limit=51), rounds
        )
        rows.append(
            Row(
                f"{label}: letters page, one function",
                by_fn[0],
                "query of 51 letters",
                by_fn[1],
                TARGET,
            )
        )
        rare = DeadLetterFilter(search="for order 4242")
        search = _in_turn(
            get("/letters?search=for+order+4242"),
            lambda: store.query(rare, limit=51),
            max(rounds // 6, 3),
        )
        rows.append(
            Row(
                f"{label}: letters page, text search matching 1 letter",
                search[0],
                "query with that search",
                search[1],
            )
        )
        snapshot = dash.overview.get(wait=600.0, fresh=True)
        overview = _in_turn(get("/"), lambda: store.stats(DeadLetterFilter()), max(rounds // 3, 3))
        rows.append(
            Row(
                f"{label}: overview page (from the background count)",
                overview[0],
                "stats() over every letter",
                overview[1],
                TARGET,
            )
        )
        counts = [snapshot.took * 1000]
        for _ in range(1 if plan.quick else 2):
            counts.append(dash.overview.get(wait=600.0, fresh=True).took * 1000)
        rows.append(
            Row(
                f"{label}: the overview's background count (31 time ranges)",
                _timing(counts),
                "stats() over every letter",
                overview[1],
            )
        )
        client.__exit__(None, None, None)
        return rows
    finally:
        store.purge(DeadLetterFilter())
        idempotask.config.reset()


def _guarded(name: str, url: str, plan: Plan) -> list[Row]:
    try:
        import starlette  # noqa: F401
    except ImportError:
        return [Row(f"{name} web: whole suite", Skipped("pip install 'idempotask[web]'"))]
    try:
        return _suite(name, url, plan)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        return [Row(f"{name} web: whole suite", Skipped(reason))]


def rows(plan: Plan) -> list[Row]:
    """The dashboard on Redis, then on PostgreSQL."""
    return _guarded("redis", REDIS_URL, plan) + _guarded("postgresql", POSTGRES_URL, plan)

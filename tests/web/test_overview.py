"""The overview's figures: counts and time buckets, store health (an unreachable store, a
Redis that may evict keys), the spool backlog, and one background count at a time."""

from __future__ import annotations

import re
import threading
import time
import warnings
from pathlib import Path

import pytest

from idempotask import DeadLetterQueue, configure
from idempotask.backends.base import DeadLetter, Status
from idempotask.spool import Spool
from idempotask.web import create_app
from idempotask.web._overview import DAY, HOUR, OverviewCache, Snapshot, boundaries, compute
from tests.backends._redis_servers import RedisServer, have_redis_binaries
from tests.web.conftest import free_port, from_address

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from starlette.testclient import TestClient

NOW = 1_767_323_045.0  # 2026-01-02 03:04:05 UTC


def letter(
    id: str, at: float, kind: str = "transient", status: Status = Status.PENDING
) -> DeadLetter:
    return DeadLetter(
        id=id,
        function=f"fn.{id[0]}",
        kind=kind,
        error_type="builtins.TimeoutError",
        message="m",
        status=status,
        first_failed_at=at,
        last_failed_at=at,
        attempts=3 if status is Status.RESOLVED else 1,
        resolution="retry" if status is Status.RESOLVED else "",
    )


def test_one_pass_gives_the_totals_and_the_hourly_and_daily_buckets() -> None:
    """Letters land in the hour and the UTC day of their last failure; older ones count
    in the totals only."""
    configure(backend="memory://", namespace="webov")
    store = DeadLetterQueue().store
    hours, days = boundaries(NOW)
    placed = [
        letter("a1", NOW - 60),  # this hour, today
        letter("a2", NOW - 90, kind="external"),
        letter("b1", hours[-2] + 5),  # the previous hour, 02:00 today
        letter("c1", days[-2] + 10),  # yesterday 00:00, before the 24 hours
        letter("d1", days[0] - 10, status=Status.RESOLVED),  # 8 days ago: totals only
    ]
    for each in placed:
        store.add(each)
    snapshot = compute(store, None, None, lambda: "/nonexistent/spool", now=NOW)
    assert snapshot.total == 5
    assert snapshot.by_status["pending"] == 4
    assert snapshot.by_status["resolved"] == 1
    assert snapshot.by_kind == {"transient": 4, "external": 1}
    assert snapshot.retries_failed == 2
    assert snapshot.retries_succeeded == 1
    assert [b.total for b in snapshot.hourly][-2:] == [1, 2]
    assert sum(b.total for b in snapshot.hourly) == 3
    assert snapshot.hourly[-1].by_kind == {"transient": 1, "external": 1}
    assert [b.total for b in snapshot.daily] == [0, 0, 0, 0, 0, 1, 3]
    assert snapshot.hourly[-1].start == hours[-1]
    assert snapshot.hourly[-1].end == hours[-1] + HOUR
    assert snapshot.daily[-1].end == days[-1] + DAY


def test_an_unreachable_store_is_shown_as_down_not_as_an_error_page() -> None:
    """The overview still renders: the idempotency store down, breakers unknown."""
    pytest.importorskip("redis")
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"  # nothing listens there
    app = create_app(backend=url, dead_letter_store="memory://", refresh=0.2)
    snapshot = app.state.dashboard.overview.get(wait=60, fresh=True)
    assert snapshot is not None
    assert snapshot.health is not None
    assert not snapshot.health.reachable
    page = TestClient(from_address(app, ("127.0.0.1", 1)), base_url="http://localhost").get("/live")
    assert page.status_code == 200
    assert 'data-figure="health">down<' in page.text
    assert "unreachable" in page.text
    assert "s3cret-pw" not in page.text  # the store is named without its password


@pytest.mark.skipif(not have_redis_binaries(), reason="needs redis-server on PATH")
@pytest.mark.filterwarnings("ignore:Redis at .* has maxmemory-policy:RuntimeWarning")
def test_a_redis_that_may_evict_keys_is_warned_about() -> None:
    """maxmemory-policy allkeys-lru: the overview says so, with the fix."""
    server = RedisServer.start("--maxmemory-policy", "allkeys-lru")
    try:
        app = create_app(backend=server.url, namespace="webevict", refresh=0.2)
        snapshot = app.state.dashboard.overview.get(wait=30, fresh=True)
        assert snapshot is not None
        assert snapshot.health is not None
        assert "allkeys-lru" in snapshot.health.warning
        page = (
            TestClient(from_address(app, ("127.0.0.1", 1)), base_url="http://localhost")
            .get("/live")
            .text
        )
        assert "maxmemory-policy=allkeys-lru" in page
        assert "noeviction" in page
    finally:
        server.stop()


def test_the_spool_backlog_of_this_host_is_counted(tmp_path: Path) -> None:
    """Letters waiting in the namespace's spool file show on the overview."""
    spool = tmp_path / "spool.jsonl"
    configure(backend="memory://", namespace="webspool", spool_path=str(spool))
    for i in range(3):
        Spool(spool).append(letter(f"s{i}", NOW))
    app = create_app(refresh=0.2)
    snapshot = app.state.dashboard.overview.get(wait=30, fresh=True)
    assert snapshot.spool_backlog == 3
    assert snapshot.spool_path == str(spool)
    page = (
        TestClient(from_address(app, ("127.0.0.1", 1)), base_url="http://localhost")
        .get("/live")
        .text
    )
    assert re.search(r'data-figure="spool">3<', page)


def test_many_viewers_share_one_count_at_a_time() -> None:
    """Twenty threads asking at once start one computation; the next waits for the
    refresh interval, stretched to four times the last count's length."""
    calls = []
    gate = threading.Event()

    def make() -> Snapshot:
        calls.append(time.monotonic())
        gate.wait(5)
        return Snapshot(taken_at=time.time(), took=0.3)

    cache = OverviewCache(make, refresh=0.01)
    threads = [threading.Thread(target=cache.get, kwargs={"wait": 0.05}) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    gate.set()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 5
    while cache.peek() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 1
    assert cache.get() is not None
    assert len(calls) == 1  # the count took 0.5 s or more: the next is due 2 s later, not 0.01 s

"""A store that answers slowly, or not at all: Redis behind a delaying TCP proxy.

The backend talks to the shared Redis through :class:`tests.faults._proxy.DelayProxy`
with its own timeouts (``socket_timeout=0.5``, ``connect_timeout=0.5``); a second
backend without the proxy looks at the records directly.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

import idempotask
from idempotask import BackendError, EventKind, idempotent
from idempotask.backends.base import State
from tests.conftest import service_url
from tests.faults._proxy import DelayProxy
from tests.faults._support import (
    CallTracker,
    Tally,
    assert_clean,
    audit,
    call_with_watchdog,
    drop_keys,
    listening,
    run_threads,
    unique,
    wait_for,
)

pytest.importorskip("redis")

from idempotask.backends.redis import RedisBackend

TIMEOUTS = {"socket_timeout": 0.5, "connect_timeout": 0.5}


@pytest.fixture
def proxy() -> Iterator[DelayProxy]:
    parts = urlsplit(service_url("redis"))
    if parts.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the fault proxy only forwards to a Redis on 127.0.0.1")
    with DelayProxy("127.0.0.1", parts.port or 6379) as p:
        yield p


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = unique("faultslow")
    yield ns
    drop_keys(service_url("redis"), f"{ns}:*")


@pytest.fixture
def tally() -> Iterator[Tally]:
    t = Tally(service_url("redis"))
    yield t
    t.drop()


@pytest.fixture
def slow_backend(proxy: DelayProxy) -> Iterator[RedisBackend]:
    backend = RedisBackend(url=proxy.url, **TIMEOUTS)
    yield backend
    backend.close()


@pytest.fixture
def direct_backend() -> Iterator[RedisBackend]:
    backend = RedisBackend(url=service_url("redis"))
    yield backend
    backend.close()


def test_a_slow_store_under_the_timeout_gives_correct_results(
    proxy: DelayProxy, slow_backend: RedisBackend, tally: Tally, namespace: str
) -> None:
    """Guarantee (DESIGN §3.6, README "Redis": bounded timeouts): a store whose every
    packet is delayed (a round trip of 2 x 50 ms, well under the 0.5 s socket timeout)
    is slow, not wrong: 4 threads calling 8 keys 3 times each get no error, every key
    runs once and every duplicate gets the stored value."""
    proxy.delay = 0.05
    idempotask.configure(backend=slow_backend, namespace=namespace)
    tracker = CallTracker()

    @idempotent(name="faults.slow.correct", lease=10, wait_timeout=30)
    def job(k: int) -> dict[str, Any]:
        tracker.body_ran()
        n = tally.incr("exec", f"k{k}")
        time.sleep(0.02)
        return {"k": k, "n": n, "thread": threading.get_ident()}

    def caller(i: int, records: list[dict]) -> None:
        order = [k for k in range(8) for _ in range(3)]
        random.Random(i).shuffle(order)
        for k in order:
            records.append(tracker.call(job, k, key=f"k{k}", store_key=job.key_for(k)))

    try:
        records = call_with_watchdog(lambda: run_threads(4, caller), 120)
    finally:
        tracker.close()
    result = audit(records, tally.counts("exec"), allowed_errors=())
    assert_clean(result)
    assert result.executions == 8
    # The delay was really there: no answer can come back faster than one round trip.
    assert min(r["dt"] for r in records if not r["ran"]) >= 2 * proxy.delay


def test_a_blackholed_store_fails_closed_within_a_bound_fails_open_and_recovers(
    proxy: DelayProxy, slow_backend: RedisBackend, namespace: str
) -> None:
    """Guarantee (README "store down", bounded waiting): when the store accepts
    connections but never answers, a fail-closed call raises BackendError within a bound
    (its timeouts and bounded retries, no hang) without running the body; a fail-open
    call runs the body unprotected; when the store answers again, calls are protected
    again."""
    idempotask.configure(backend=slow_backend, namespace=namespace)
    runs: list[str] = []

    @idempotent(name="faults.blackhole.closed")
    def closed(k: int) -> int:
        runs.append(f"closed-{k}")
        return k

    @idempotent(name="faults.blackhole.open", on_backend_error="open")
    def opened(k: int) -> int:
        runs.append(f"open-{k}")
        return k

    assert closed(1) == 1  # connections are pooled before the blackhole
    proxy.blackhole = True
    for k in (2, 3):  # a pooled connection, then a fresh one into the void
        started = time.monotonic()
        with pytest.raises(BackendError):
            call_with_watchdog(lambda k=k: closed(k), 60)
        assert time.monotonic() - started < 15
    with listening([EventKind.FAIL_OPEN]) as fail_open:
        started = time.monotonic()
        assert call_with_watchdog(lambda: opened(4), 60) == 4
        assert time.monotonic() - started < 15
    assert [e.kind for e in fail_open] == [EventKind.FAIL_OPEN]
    assert "closed-2" not in runs
    assert "closed-3" not in runs
    assert runs.count("open-4") == 1

    proxy.blackhole = False

    def answers() -> bool:
        try:
            call_with_watchdog(lambda: closed(5), 60)
        except BackendError:
            return False
        return True

    wait_for(answers, 30, "the store to answer again")
    assert call_with_watchdog(lambda: opened(6), 60) == 6
    assert call_with_watchdog(lambda: opened(6), 60) == 6
    assert runs.count("open-6") == 1  # protected again
    assert runs.count("closed-5") == 1


def test_lease_renewal_under_a_slow_store_keeps_the_lease(
    proxy: DelayProxy, slow_backend: RedisBackend, direct_backend: RedisBackend, namespace: str
) -> None:
    """Guarantee (DESIGN §3.2-3.3: the lease is renewed every third of it while the body
    runs): with every packet delayed 100 ms (a renewal round trip well under lease/3 =
    0.5 s), a body running 4 s on a 1.5 s lease never loses it: lease_held() stays True,
    no lease_lost event, a contender's claim never takes the key, and the result is
    stored."""
    proxy.delay = 0.1
    idempotask.configure(backend=slow_backend, namespace=namespace)
    held: list[bool] = []
    runs: list[int] = []

    @idempotent(name="faults.slow.lease", lease=1.5, wait_timeout=30)
    def long_job() -> str:
        runs.append(1)
        for _ in range(16):
            time.sleep(0.25)
            held.append(idempotask.lease_held())
        return "done"

    key = long_job.key_for()
    contender_tokens: list[str] = []
    seen_tokens: set[str] = set()
    stop = threading.Event()

    def contend() -> None:
        for i in range(200):
            if stop.wait(0.3):
                return
            record = direct_backend.get(key)
            if record is None or record.state is not State.IN_PROGRESS:
                continue
            seen_tokens.add(record.token)
            token = f"contender-{i}"
            claimed = direct_backend.claim(key, token, lease=1.5)
            if claimed.held_by(token):
                contender_tokens.append(token)

    contender = threading.Thread(target=contend, name="contender", daemon=True)
    with listening([EventKind.LEASE_LOST]) as lost:
        contender.start()
        try:
            assert call_with_watchdog(long_job, 60) == "done"
        finally:
            stop.set()
            contender.join(30)
    assert not contender.is_alive()
    assert len(held) == 16
    assert all(held), held
    assert lost == []
    assert contender_tokens == []  # nobody else ever got the key
    assert len(seen_tokens) == 1  # one claim, renewed in place, the whole time
    record = direct_backend.get(key)
    assert record is not None
    assert record.state is State.COMPLETED
    assert call_with_watchdog(long_job, 60) == "done"
    assert runs == [1]


# ---------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_through_proxy() -> Iterator[tuple[DelayProxy, Any]]:
    """A SQL backend whose connections go through the proxy to the shared PostgreSQL,
    on a table of its own (created and dropped directly)."""
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    from idempotask.backends.sql import SQLAlchemyBackend

    url = service_url("postgres")
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the fault proxy only forwards to a PostgreSQL on 127.0.0.1")
    table = unique("idem_fault_hole_")
    tables = {
        "table_name": table,
        "dead_letter_table": f"{table}_dl",
        "breaker_table": f"{table}_br",
    }
    direct = SQLAlchemyBackend(url, **tables)
    direct.create_tables()
    proxy = DelayProxy("127.0.0.1", parts.port or 5432).start()
    proxied = url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}", 1)
    backend = SQLAlchemyBackend(proxied, connect_timeout=2, **tables)
    try:
        yield proxy, backend
    finally:
        backend.close()
        proxy.stop()  # also wakes a call still blocked on a blackholed connection
        direct.drop_tables()
        direct.dead_letter_store().drop_tables()
        direct.breaker_store().drop_tables()
        direct.close()


def test_a_blackholed_postgres_fails_closed_within_a_bound(
    pg_through_proxy: tuple[DelayProxy, Any], namespace: str
) -> None:
    """Guarantee (issue 7 "bounded waiting: timeouts everywhere, nothing hangs"; README
    "store down": fail closed with BackendError): when PostgreSQL accepts but never
    answers on the backend's pooled connection, a fail-closed call raises BackendError
    within a bound instead of hanging, and the body does not run."""
    proxy, backend = pg_through_proxy
    idempotask.configure(backend=backend, namespace=namespace)
    runs: list[int] = []

    @idempotent(name="faults.blackhole.postgres")
    def job(k: int) -> int:
        runs.append(k)
        return k

    assert job(1) == 1  # a pooled connection, before the store stops answering
    proxy.blackhole = True
    started = time.monotonic()
    with pytest.raises(BackendError):
        call_with_watchdog(lambda: job(2), 20)
    assert time.monotonic() - started < 20
    assert runs == [1]

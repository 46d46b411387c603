"""FallbackBackend: Redis first, SQL during an outage.

The conformance suite runs on Redis + SQLite while healthy and on Redis + PostgreSQL in
a confirm window; the outage tests kill, pause and restart private ``redis-server``
processes; the routing tests switch a wrapped store off and on (and move an injected
clock) to reach each state without waiting.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

import idempotask
from idempotask import idempotent
from idempotask.backends import Backend, backend_from_url
from idempotask.backends.base import Record, State
from idempotask.backends.fallback import FallbackBackend, fallback_url
from idempotask.backends.fallback._router import MARKER_LADDER, marker_bucket
from idempotask.backends.redis import RedisBackend
from idempotask.backends.sql import SQLAlchemyBackend
from idempotask.errors import BackendError, ConfigurationError, CorruptRecordError
from idempotask.testing import StoreContract, make_state_machine

from ._redis_servers import RedisServer, have_redis_binaries

try:  # tests/conftest.py: the URL of a service, or skip (fail in CI) when it is down
    from tests.conftest import service_url, unavailable
except ImportError:  # tests/ is not a package: pytest imported it as top-level "conftest"
    from conftest import service_url  # type: ignore[no-redef]

pytestmark = pytest.mark.redis

RUN = uuid.uuid4().hex[:10]
TABLE = f"idem_fb_{RUN}"
_SQLITE_DIR = Path(tempfile.mkdtemp(prefix="idempotask-fallback-"))
LEASE, TTL = 30.0, 600.0

_secondaries: dict[str, SQLAlchemyBackend] = {}
_lock = threading.Lock()


def secondary(name: str = "sqlite") -> SQLAlchemyBackend:
    """One SQL store per database for the module, its table created on first use."""
    url = f"sqlite:///{_SQLITE_DIR / 'fallback.db'}" if name == "sqlite" else service_url(name)
    with _lock:
        if name not in _secondaries:
            store = SQLAlchemyBackend(url, table_name=TABLE)
            store.create_tables()
            _secondaries[name] = store
        return _secondaries[name]


@pytest.fixture(scope="module", autouse=True)
def _drop_tables_at_the_end() -> Iterator[None]:
    """Drop the tables this module created, and remove the SQLite directory."""
    yield
    for store in _secondaries.values():
        try:
            store.drop_tables()
        finally:
            store.close()
    _secondaries.clear()
    shutil.rmtree(_SQLITE_DIR, ignore_errors=True)


def marker() -> str:
    """A window-marker key of its own, so no test opens a window for another."""
    return f"fbmarker{RUN}:{uuid.uuid4().hex}"


def new_key(name: str = "k") -> str:
    """A fresh key shaped like the library's."""
    return f"fbtest{RUN}:{name}:1:{uuid.uuid4().hex}"


def token() -> str:
    """A fresh claim token."""
    return uuid.uuid4().hex


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Switch:
    """Wraps a store: counts calls per method, and fails every call while ``down``."""

    def __init__(self, inner: Any, error: type[BackendError] = BackendError) -> None:
        self.inner = inner
        self.error = error
        self.down = False
        self.calls: Counter[str] = Counter()
        self.keys: list[str] = []  # the keys claimed through it, in order
        self.fail_keys = ""  # claims of keys starting with this fail (when set)

    def __repr__(self) -> str:
        return f"Switch({self.inner!r})"

    @property
    def total(self) -> int:
        """Every call made through this wrapper so far."""
        return sum(self.calls.values())

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.calls[name] += 1
        if name == "claim":
            self.keys.append(args[0])
            if self.fail_keys and args[0].startswith(self.fail_keys):
                raise self.error(f"simulated failure: claim of {args[0]}")
        if self.down:
            raise self.error(f"simulated outage: {name}")
        return getattr(self.inner, name)(*args, **kwargs)

    async def _acall(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.calls[name] += 1
        if self.down:
            raise self.error(f"simulated outage: {name}")
        return await getattr(self.inner, name)(*args, **kwargs)

    def claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        return self._call("claim", key, token, lease=lease, owner=owner, fingerprint=fingerprint)

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        return self._call("complete", key, token, payload, ttl=ttl)

    def fail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        return self._call("fail", key, token, payload, ttl=ttl)

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        return self._call("renew", key, token, lease=lease)

    def get(self, key: str) -> Record | None:
        return self._call("get", key)

    def delete(self, key: str, *, token: str | None = None) -> bool:
        return self._call("delete", key, token=token)

    async def aclaim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        return await self._acall(
            "aclaim", key, token, lease=lease, owner=owner, fingerprint=fingerprint
        )

    async def acomplete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        return await self._acall("acomplete", key, token, payload, ttl=ttl)

    async def afail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        return await self._acall("afail", key, token, payload, ttl=ttl)

    async def arenew(self, key: str, token: str, *, lease: float) -> bool:
        return await self._acall("arenew", key, token, lease=lease)

    async def aget(self, key: str) -> Record | None:
        return await self._acall("aget", key)

    async def adelete(self, key: str, *, token: str | None = None) -> bool:
        return await self._acall("adelete", key, token=token)

    def expire_now(self, key: str) -> bool:
        return bool(self.inner.expire_now(key))

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()


def run(mode: str, store: Backend, op: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``store.op`` (sync) or ``await store.aop`` (async, on a fresh loop)."""
    if mode == "sync":
        return getattr(store, op)(*args, **kwargs)

    async def call() -> Any:
        return await getattr(store, "a" + op)(*args, **kwargs)

    return asyncio.run(call())


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """The shared Redis server; the keys this module left there are removed at the end."""
    url = service_url("redis")
    yield url
    client = redis.Redis.from_url(url)
    try:
        for prefix in ("fbtest", "fbmarker", "fbhealthy"):
            for key in client.scan_iter(match=f"{prefix}{RUN}:*", count=1000):
                client.delete(key)
    finally:
        client.close()


@pytest.fixture
def switched(redis_url: str) -> Iterator[tuple[FallbackBackend, Switch, Switch, Clock]]:
    """A fallback on the shared Redis and SQLite, both wrapped in a Switch, on a hand clock."""
    clock = Clock()
    primary = Switch(RedisBackend.from_url(redis_url))
    second = Switch(secondary("sqlite"))
    # No marker: these tests move the clock, and Redis keeps the marker on its own clock.
    store = FallbackBackend(primary, second, probe_interval=5.0, marker_key=None, clock=clock)
    yield store, primary, second, clock
    primary.inner.close()


def recover(store: FallbackBackend, primary: Switch, clock: Clock) -> None:
    """Bring the switched primary back and let the next call probe it."""
    primary.down = False
    clock.advance(store.probe_interval)
    store.get(new_key("probe"))
    assert store.status().primary_up


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to kill, pause and restart."""
    if not have_redis_binaries():
        if os.environ.get("IDEMPOTASK_REQUIRE_SERVICES") == "1":
            pytest.fail("IDEMPOTASK_REQUIRE_SERVICES=1 but redis-server is not on PATH")
        unavailable("redis-server is not on PATH")
    server = RedisServer.start("--maxmemory-policy", "noeviction")
    yield server
    server.stop()


# -- the contract ------------------------------------------------------------------------


class TestFallbackContractWhileHealthy(StoreContract):
    """The conformance suite, sync and async, on Redis + SQLite while Redis is healthy."""

    @pytest.fixture
    def backend(self, redis_url: str) -> Iterator[FallbackBackend]:
        redis_store = RedisBackend.from_url(redis_url)
        yield FallbackBackend(redis_store, secondary("sqlite"), marker_key=marker())
        redis_store.close()


class TestFallbackContractInTheConfirmWindow(StoreContract):
    """The suite again on Redis + PostgreSQL after an outage: new claims are made in both."""

    @pytest.fixture
    def backend(self, redis_url: str) -> Iterator[FallbackBackend]:
        clock = Clock()
        primary = Switch(RedisBackend.from_url(redis_url))
        store = FallbackBackend(
            primary,
            secondary("postgres"),
            confirm_window=3600,
            marker_key=marker(),
            clock=clock,
        )
        primary.down = True
        store.get(new_key("outage"))  # notices the outage
        recover(store, primary, clock)
        assert store.status().confirming_for == 3600
        yield store
        primary.inner.close()


_machine_backend: list[FallbackBackend] = []


def _shared_machine_backend() -> FallbackBackend:
    if not _machine_backend:
        _machine_backend.append(
            FallbackBackend(
                RedisBackend.from_url(service_url("redis")),
                secondary("sqlite"),
                marker_key=marker(),
            )
        )
    return _machine_backend[0]


TestFallbackStateMachine = make_state_machine(_shared_machine_backend, max_examples=25).TestCase


# -- the healthy path ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_healthy_redis_serves_every_call_alone_one_operation_per_duplicate(
    redis_url: str, mode: str
) -> None:
    """While Redis is healthy: no SQL call at all, and one Redis operation per duplicate."""
    primary = Switch(RedisBackend.from_url(redis_url))
    second = Switch(secondary("sqlite"))
    store = FallbackBackend(primary, second, marker_key=marker())
    idempotask.configure(backend=store, namespace=f"fbhealthy{RUN}")
    runs: Counter[int] = Counter()

    @idempotent(name=f"fallback.healthy.{mode}")
    def job(x: int) -> int:
        runs[x] += 1
        return x * 2

    @idempotent(name=f"fallback.ahealthy.{mode}")
    async def ajob(x: int) -> int:
        runs[x] += 1
        return x * 2

    def call(x: int) -> int:
        return job(x) if mode == "sync" else asyncio.run(ajob(x))

    assert call(0) == 0  # first use also reads the outage markers in SQL, once
    assert second.total == len(MARKER_LADDER)  # one get per marker length (no scan here)
    read_markers = second.total
    before = primary.total
    assert call(1) == 2
    assert primary.total - before == 2  # a first call: claim, complete
    for _ in range(5):
        before = primary.total
        assert call(1) == 2
        assert primary.total - before == 1  # a duplicate: one claim
    assert runs[1] == 1
    assert second.total == read_markers  # nothing more within a probe_interval
    assert store.status().primary_up
    primary.inner.close()


# -- a real outage, through @idempotent ----------------------------------------------------


def test_redis_killed_mid_run_then_restarted_empty_keeps_every_promise_the_docs_make(
    private_redis: RedisServer,
) -> None:
    """Kill Redis while calling: SQL takes over without duplicates or lost results; restart it
    empty: calls completed during the outage are honoured, not run again."""
    redis_store = RedisBackend.from_url(private_redis.url, socket_timeout=1.0, connect_timeout=1.0)
    store = FallbackBackend(
        redis_store, secondary("sqlite"), probe_interval=0.3, marker_key=marker()
    )
    idempotask.configure(backend=store, namespace=f"fbkill{RUN}")
    runs: Counter[int] = Counter()
    lock = threading.Lock()
    gates = {100: threading.Event(), 200: threading.Event()}
    started = {100: threading.Event(), 200: threading.Event()}

    @idempotent(name="fallback.kill", ttl=600, lease=30)
    def job(k: int) -> str:
        with lock:
            runs[k] += 1
            value = f"{k}:{runs[k]}"
        if k in gates and runs[k] == 1:  # the first run of these keys is a long one
            started[k].set()
            assert gates[k].wait(30)
        return value

    def call_twice(keys: range, threads: int = 1) -> dict[int, str]:
        with ThreadPoolExecutor(threads) as pool:
            pairs = list(pool.map(lambda k: (k, job(k)), [*keys, *keys]))
        results: dict[int, str] = {}
        for k, value in pairs:
            assert results.setdefault(k, value) == value, f"key {k}: two different results"
        return results

    # Healthy: A keys run once each; key 100 is left running, claimed in Redis only.
    before_outage = call_twice(range(10))
    assert all(runs[k] == 1 for k in range(10))
    slow_pool = ThreadPoolExecutor(2)
    slow_in_redis = slow_pool.submit(job, 100)
    assert started[100].wait(10)

    private_redis.kill()

    # The outage. The first call notices it within Redis's client timeouts.
    began = time.monotonic()
    assert job(10) == "10:1"
    assert time.monotonic() - began < 5
    assert not store.status().primary_up
    during = call_twice(range(10, 30), threads=4)  # duplicates race in SQL: still once each
    assert all(runs[k] == 1 for k in range(10, 30))
    # Claimed or completed only in Redis before the outage: SQL cannot see them, so they
    # run once more (and only once more).
    again = call_twice(range(10))
    assert all(runs[k] == 2 for k in range(10))
    assert job(100) == "100:2"
    gates[100].set()
    assert slow_in_redis.result(10) == "100:1"  # its caller still gets its value
    # Key 200 is claimed in SQL and still running when Redis comes back.
    slow_in_sql = slow_pool.submit(job, 200)
    assert started[200].wait(10)

    restarted = RedisServer.start(
        "--maxmemory-policy",
        "noeviction",
        port=private_redis.port,
        directory=private_redis.directory,
    )
    try:
        time.sleep(store.probe_interval)
        # Redis is back, empty. Everything completed during the outage is honoured.
        assert call_twice(range(10, 30)) == during
        assert store.status().primary_up
        assert store.status().confirming_for > 500  # the longest ttl seen: 600 s
        assert call_twice(range(10)) == again
        assert job(100) == "100:2"
        # The claim taken in SQL completes in SQL although Redis is back...
        gates[200].set()
        assert slow_in_sql.result(10) == "200:1"
        key_200 = job.key_for(200)
        assert redis_store.get(key_200) is None
        in_sql = secondary("sqlite").get(key_200)
        assert in_sql is not None
        assert in_sql.state is State.COMPLETED
        assert job(200) == "200:1"  # ... and is honoured
        # New keys run once, and are recorded in both stores during the window.
        after = call_twice(range(30, 40))
        assert all(runs[k] == 1 for k in range(30, 40))
        assert secondary("sqlite").get(job.key_for(30)) is not None
        assert redis_store.get(job.key_for(30)) is not None
        assert after == {k: f"{k}:1" for k in range(30, 40)}
    finally:
        slow_pool.shutdown(wait=False)
        restarted.stop()
    assert before_outage == {k: f"{k}:1" for k in range(10)}
    assert runs[200] == 1
    assert runs[100] == 2


def test_a_hung_redis_delays_one_call_per_probe_interval_and_no_other(
    private_redis: RedisServer,
) -> None:
    """Redis paused (SIGSTOP): the first call waits for the client timeout, later calls go
    straight to SQL until the probe interval passes, and then only the probing call waits."""
    primary = Switch(
        RedisBackend.from_url(private_redis.url, socket_timeout=0.5, connect_timeout=0.5, retries=0)
    )
    store = FallbackBackend(
        primary,
        secondary("sqlite"),
        probe_interval=1.5,
        marker_key=marker(),
    )
    store.get(new_key())  # connected, eviction policy read
    os.kill(private_redis.process.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        key = new_key()
        assert store.claim(key, token(), lease=LEASE) is not None
        assert time.monotonic() - began < 3  # one socket timeout, not a hang
        assert not store.status().primary_up
        calls = primary.total
        began = time.monotonic()
        for _ in range(20):
            store.claim(new_key(), token(), lease=LEASE)
        assert time.monotonic() - began < 1.0  # no waiting at all
        assert primary.total == calls  # Redis was not even tried
        time.sleep(store.probe_interval)
        began = time.monotonic()
        store.claim(new_key(), token(), lease=LEASE)  # the probe: still hung
        assert 0.4 < time.monotonic() - began < 3
        assert primary.total == calls + 1
        store.claim(new_key(), token(), lease=LEASE)
        assert primary.total == calls + 1  # the next probe is an interval away again
    finally:
        os.kill(private_redis.process.pid, signal.SIGCONT)
    time.sleep(store.probe_interval)
    store.claim(new_key(), token(), lease=LEASE)
    assert store.status().primary_up
    primary.inner.close()


def test_a_claim_held_in_both_whose_redis_fails_again_is_covered_by_a_marker(
    private_redis: RedisServer,
) -> None:
    """A claim taken in both stores in the confirm window; Redis dies again before its
    result: the renewal and the result land in SQL alone, so (as for every record in SQL
    alone) a marker must outlive them, or a process started once the first outage's
    lease-long marker has expired claims the key in an empty Redis and runs it again."""
    mk = marker()
    sql = secondary("sqlite")

    redis_stores = [
        RedisBackend.from_url(private_redis.url, socket_timeout=1.0, connect_timeout=1.0)
        for _ in range(2)
    ]
    store = FallbackBackend(redis_stores[0], sql, probe_interval=0.3, marker_key=mk)
    private_redis.kill()
    first, t1 = new_key("first"), token()  # the first outage: a call cancelled in SQL
    assert store.claim(first, t1, lease=LEASE).held_by(t1)
    assert store.delete(first, token=t1)

    def restart() -> RedisServer:
        return RedisServer.start(
            "--maxmemory-policy",
            "noeviction",
            port=private_redis.port,
            directory=private_redis.directory,
        )

    server = restart()
    try:
        time.sleep(store.probe_interval)
        store.get(new_key("probe"))
        assert store.status().primary_up
        key, t2 = new_key(), token()
        assert store.claim(key, t2, lease=LEASE).held_by(t2)  # the window: in both
        assert sql.get(key) is not None
        server.kill()  # the second outage, mid-run
        assert store.renew(key, t2, lease=LEASE)
        assert store.complete(key, t2, b"42", ttl=TTL)
        assert not store.status().primary_up
        server = restart()  # back, empty
        # The first outage's marker (as long as its lease needed) runs out.
        assert sql.expire_now(f"{mk}:{marker_bucket(LEASE)}")
        later = FallbackBackend(redis_stores[1], sql, probe_interval=0.3, marker_key=mk)
        answer = later.claim(key, token(), lease=LEASE)  # a process started now
        assert answer.state is State.COMPLETED
        assert answer.payload == b"42"
    finally:
        server.stop()
        for redis_store in redis_stores:
            redis_store.close()


def test_callers_that_give_up_on_a_hung_redis_before_its_timeout_still_reach_sql(
    private_redis: RedisServer,
) -> None:
    """Async callers with deadlines of their own shorter than the Redis client's timeout
    (default 5 s a try, retried): each is cancelled while Redis hangs. Redis must still
    be marked down, so later calls go to SQL; it was never marked down, and every call
    timed out for as long as Redis hung although SQL answered."""
    primary = RedisBackend.from_url(private_redis.url)  # the default timeouts and retries
    store = FallbackBackend(primary, secondary("sqlite"), probe_interval=2.0, marker_key=marker())

    async def calls() -> list[str]:
        await store.aget(new_key())  # connected
        os.kill(private_redis.process.pid, signal.SIGSTOP)
        outcomes = []
        for _ in range(4):
            try:
                await asyncio.wait_for(store.aclaim(new_key(), token(), lease=LEASE), 1.5)
                outcomes.append("served")
            except asyncio.TimeoutError:
                outcomes.append("timed out")
        return outcomes

    try:
        outcomes = asyncio.run(calls())
    finally:
        os.kill(private_redis.process.pid, signal.SIGCONT)
    assert outcomes == ["timed out", "served", "served", "served"]
    assert store.status().primary_up is False
    assert "gave up" in (store.status().last_error or "")
    primary.close()


# -- routing by token ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_claim_taken_in_sql_completes_in_sql_after_redis_is_back(
    switched: tuple[FallbackBackend, Switch, Switch, Clock], mode: str
) -> None:
    """renew, complete and delete of a claim taken during the outage go to SQL, not Redis."""
    store, primary, second, clock = switched
    key, tok = new_key(), token()
    primary.down = True
    assert run(mode, store, "claim", key, tok, lease=LEASE).held_by(tok)
    recover(store, primary, clock)
    primary.calls.clear()
    assert run(mode, store, "renew", key, tok, lease=LEASE) is True
    assert run(mode, store, "complete", key, tok, b"done", ttl=TTL) is True
    assert run(mode, store, "complete", key, tok, b"done", ttl=TTL) is True  # a repeat
    assert primary.total == 0
    assert primary.inner.get(key) is None
    stored = second.inner.get(key)
    assert stored is not None
    assert stored.state is State.COMPLETED
    assert stored.payload == b"done"
    # In the window, the record stored in SQL answers a new claim.
    other = token()
    record = run(mode, store, "claim", key, other, lease=LEASE)
    assert not record.held_by(other)
    assert record.payload == b"done"
    assert primary.inner.get(key) is None  # the Redis claim taken to ask was released
    assert run(mode, store, "delete", key, token=tok) is True
    assert second.inner.get(key) is None


def test_a_forgotten_route_is_found_in_sql_while_it_may_hold_claims(
    redis_url: str,
) -> None:
    """With the route map full, a token it forgot is tried in Redis, then in SQL."""
    clock = Clock()
    primary = Switch(RedisBackend.from_url(redis_url))
    store = FallbackBackend(
        primary,
        secondary("sqlite"),
        max_tracked_claims=1,
        marker_key=marker(),
        clock=clock,
    )
    primary.down = True
    first, second_key = (new_key(), token()), (new_key(), token())
    for key, tok in (first, second_key):
        assert store.claim(key, tok, lease=LEASE).held_by(tok)
    assert store.status().tracked_claims == 1
    assert store.complete(*first, b"r", ttl=TTL) is True  # Redis skipped (down), SQL has it
    recover(store, primary, clock)
    assert store.renew(*second_key, lease=LEASE) is True  # tracked: straight to SQL
    assert store.complete(*first, b"r", ttl=TTL) is True  # Redis says no, SQL says yes
    primary.inner.close()


def test_a_token_redis_issued_before_the_outage_is_an_error_not_a_lost_claim(
    switched: tuple[FallbackBackend, Switch, Switch, Clock],
) -> None:
    """complete of a Redis claim while Redis is down raises BackendError: it cannot tell."""
    store, primary, _, _ = switched
    key, tok = new_key(), token()
    assert store.claim(key, tok, lease=LEASE).held_by(tok)
    primary.down = True
    with pytest.raises(BackendError, match="simulated outage"):
        store.complete(key, tok, b"r", ttl=TTL)
    with pytest.raises(BackendError, match="marked down"):
        store.renew(key, tok, lease=LEASE)


# -- the confirm window ----------------------------------------------------------------------


def test_the_window_lasts_the_longest_ttl_seen_then_redis_serves_alone(
    switched: tuple[FallbackBackend, Switch, Switch, Clock],
) -> None:
    """Confirmation lasts the longest ttl seen; afterwards a Redis miss makes no SQL call."""
    store, primary, second, clock = switched
    k1, t1 = new_key(), token()
    store.claim(k1, t1, lease=LEASE)
    store.complete(k1, t1, b"r", ttl=120)  # the longest ttl seen so far
    primary.down = True
    k2, t2 = new_key(), token()
    store.claim(k2, t2, lease=LEASE)
    store.complete(k2, t2, b"during", ttl=90)
    recover(store, primary, clock)
    assert store.status().confirming_for == 120
    second.calls.clear()
    record = store.claim(k2, token(), lease=LEASE)
    assert record.payload == b"during"  # completed during the outage: honoured
    assert second.total == 1
    clock.advance(121)
    assert store.status().confirming_for == 0
    second.calls.clear()
    fresh = token()
    assert store.claim(new_key(), fresh, lease=LEASE).held_by(fresh)
    assert store.get(new_key()) is None
    assert second.total == 0


def test_a_claim_still_running_in_sql_keeps_the_window_open_until_its_result_expires(
    switched: tuple[FallbackBackend, Switch, Switch, Clock],
) -> None:
    """A SQL claim completed after recovery extends the window to its result's ttl."""
    store, primary, _, clock = switched
    key, tok = new_key(), token()
    primary.down = True
    store.claim(key, tok, lease=LEASE)
    recover(store, primary, clock)
    assert store.status().confirming_for == LEASE
    clock.advance(20)
    store.complete(key, tok, b"late", ttl=TTL)
    assert store.status().confirming_for == TTL


def test_a_new_claim_in_the_window_is_held_in_both_stores_and_completed_in_both(
    switched: tuple[FallbackBackend, Switch, Switch, Clock],
) -> None:
    """In the window a new key is claimed in Redis and SQL, and its result stored in both."""
    store, primary, second, clock = switched
    primary.down = True
    store.claim(new_key(), token(), lease=LEASE)
    recover(store, primary, clock)
    key, tok = new_key(), token()
    assert store.claim(key, tok, lease=LEASE).held_by(tok)
    for inner in (primary.inner, second.inner):
        held = inner.get(key)
        assert held is not None
        assert held.held_by(tok)
    assert store.complete(key, tok, b"both", ttl=TTL) is True
    for inner in (primary.inner, second.inner):
        done = inner.get(key)
        assert done is not None
        assert done.state is State.COMPLETED
        assert done.payload == b"both"


def test_a_live_sql_claim_wins_over_a_redis_miss_in_the_window(
    switched: tuple[FallbackBackend, Switch, Switch, Clock],
) -> None:
    """A claim taken in SQL during the outage and still running is waited for, not run twice."""
    store, primary, _, clock = switched
    key, holder = new_key(), token()
    primary.down = True
    store.claim(key, holder, lease=LEASE, owner="task-1")
    recover(store, primary, clock)
    other = token()
    record = store.claim(key, other, lease=LEASE, owner="task-2")
    assert not record.held_by(other)
    assert record.token == holder
    assert primary.inner.get(key) is None
    # The same task retried (same owner) re-takes its own claim, in SQL where it lives.
    retry = token()
    assert store.claim(key, retry, lease=LEASE, owner="task-1").held_by(retry)


def test_sql_failing_in_the_window_fails_closed_and_releases_the_redis_claim(
    switched: tuple[FallbackBackend, Switch, Switch, Clock],
) -> None:
    """If SQL cannot confirm a Redis miss, the claim is released and BackendError raised."""
    store, primary, second, clock = switched
    primary.down = True
    store.claim(new_key(), token(), lease=LEASE)
    recover(store, primary, clock)
    second.down = True
    key = new_key()
    with pytest.raises(BackendError, match="cannot confirm"):
        store.claim(key, token(), lease=LEASE)
    assert primary.inner.get(key) is None


def test_confirm_window_zero_turns_confirmation_off(redis_url: str) -> None:
    """confirm_window=0: after recovery Redis serves alone at once."""
    clock = Clock()
    primary = Switch(RedisBackend.from_url(redis_url))
    second = Switch(secondary("sqlite"))
    store = FallbackBackend(
        primary,
        second,
        confirm_window=0,
        marker_key=marker(),
        clock=clock,
    )
    primary.down = True
    store.claim(new_key(), token(), lease=LEASE)
    recover(store, primary, clock)
    second.calls.clear()
    store.claim(new_key(), token(), lease=LEASE)
    assert second.total == 0
    primary.inner.close()


# -- several clients ---------------------------------------------------------------------------


def test_a_client_that_has_not_seen_redis_recover_sees_claims_made_in_the_window(
    redis_url: str,
) -> None:
    """Covered disagreement: one client recovered (claims in both), another still in outage
    mode (claims in SQL) — they see each other's claims in SQL."""
    clock = Clock()
    shared_redis = RedisBackend.from_url(redis_url)
    key = marker()
    recovered_view, stale_view = Switch(shared_redis), Switch(shared_redis)
    recovered = FallbackBackend(
        recovered_view,
        secondary("sqlite"),
        marker_key=key,
        clock=clock,
    )
    stale = FallbackBackend(
        stale_view,
        secondary("sqlite"),
        marker_key=key,
        clock=clock,
    )
    for view, backend in ((recovered_view, recovered), (stale_view, stale)):
        view.down = True
        backend.claim(new_key(), token(), lease=LEASE)
    recover(recovered, recovered_view, clock)
    k1, t1 = new_key(), token()
    assert recovered.claim(k1, t1, lease=LEASE).held_by(t1)
    assert stale.claim(k1, token(), lease=LEASE).token == t1  # seen in SQL
    k2, t2 = new_key(), token()
    assert stale.claim(k2, t2, lease=LEASE).held_by(t2)
    assert recovered.claim(k2, token(), lease=LEASE).token == t2  # confirmed in SQL
    shared_redis.close()


def test_processes_started_later_idle_or_busy_through_the_outage_join_the_window(
    redis_url: str,
) -> None:
    """The client that fell back wrote an outage marker in SQL; a backend used for the
    first time, one idle through the outage and a busy one (at its next marker read, a
    probe_interval later) read it and confirm. Within that interval the busy one has not
    read it yet: the documented gap."""
    shared = RedisBackend.from_url(redis_url)
    key = marker()
    idle_clock, busy_clock, clock = Clock(), Clock(), Clock()
    idle = FallbackBackend(shared, secondary("sqlite"), marker_key=key, clock=idle_clock)
    busy = FallbackBackend(shared, secondary("sqlite"), marker_key=key, clock=busy_clock)
    for backend in (idle, busy):
        backend.get(new_key())  # in use before the outage: markers read, none found
    primary = Switch(shared)
    first = FallbackBackend(
        primary, secondary("sqlite"), confirm_window=300, marker_key=key, clock=clock
    )
    primary.down = True
    done_key, tok = new_key(), token()
    first.claim(done_key, tok, lease=LEASE)
    first.complete(done_key, tok, b"during", ttl=TTL)
    # Never recovered: this client is still in outage mode (or has crashed).

    late = FallbackBackend(shared, secondary("sqlite"), marker_key=key)
    assert late.claim(done_key, token(), lease=LEASE).payload == b"during"  # not run again
    assert 300 < late.status().confirming_for <= marker_bucket(300)
    busy_clock.advance(1)
    assert busy.claim(done_key, token(), lease=LEASE).state is State.IN_PROGRESS  # the gap
    busy.delete(done_key)
    idle_clock.advance(idle.probe_interval)
    assert idle.claim(done_key, token(), lease=LEASE).payload == b"during"
    busy_clock.advance(busy.probe_interval)
    assert busy.claim(done_key, token(), lease=LEASE).payload == b"during"
    assert busy.status().confirming_for > 300
    shared.close()


def test_without_markers_only_the_client_that_saw_the_outage_confirms(redis_url: str) -> None:
    """marker_key=None: a fresh process claims in Redis alone (what markers prevent)."""
    shared = RedisBackend.from_url(redis_url)
    clock = Clock()
    primary = Switch(shared)
    first = FallbackBackend(primary, secondary("sqlite"), marker_key=None, clock=clock)
    primary.down = True
    done_key, tok = new_key(), token()
    first.claim(done_key, tok, lease=LEASE)
    first.complete(done_key, tok, b"during", ttl=TTL)
    recover(first, primary, clock)
    assert first.claim(done_key, token(), lease=LEASE).payload == b"during"
    fresh = FallbackBackend(shared, secondary("sqlite"), marker_key=None)
    assert fresh.claim(done_key, token(), lease=LEASE).state is State.IN_PROGRESS
    shared.close()


_WORKER = """
import json, os, sys
import idempotask
from idempotask import idempotent
from idempotask.backends.fallback import FallbackBackend
from idempotask.backends.redis import RedisBackend
from idempotask.backends.sql import SQLAlchemyBackend

redis_url, sql_url, table, runs_file, namespace = sys.argv[1:6]
keys = [int(k) for k in sys.argv[6:]]
store = FallbackBackend(
    RedisBackend.from_url(redis_url, socket_timeout=0.5, connect_timeout=0.5, retries=0),
    SQLAlchemyBackend(sql_url, table_name=table),
    probe_interval=0.3,
)
idempotask.configure(backend=store, namespace=namespace)


@idempotent(name="fallback.fresh", ttl=600, lease=30)
def job(k: int) -> str:
    with open(runs_file, "a") as f:
        f.write(f"{k}\\n")
    return f"{k}:{os.getpid()}"


print(json.dumps({str(k): job(k) for k in keys}))
"""


def _fresh_process(args: list[str]) -> dict[str, str]:
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_process_started_after_the_outage_never_reruns_a_call_completed_in_sql(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    """Real processes: B completes calls in SQL while Redis is down; Redis comes back
    empty; C, a new process that never saw the outage, calls them again: answered from
    SQL, the body does not run."""
    sql_url = f"sqlite:///{tmp_path / 'outage.db'}"
    table = f"idem_fresh_{uuid.uuid4().hex[:8]}"
    sql = SQLAlchemyBackend(sql_url, table_name=table)
    sql.create_tables()
    runs_file = tmp_path / "runs.txt"
    runs_file.touch()
    common = [private_redis.url, sql_url, table, str(runs_file), f"fbfresh{RUN}"]

    before = _fresh_process([*common, "1"])  # A: Redis up, completes in Redis
    private_redis.kill()
    during = _fresh_process([*common, "2", "3"])  # B: the outage, completes in SQL
    restarted = RedisServer.start(
        "--maxmemory-policy",
        "noeviction",
        port=private_redis.port,
        directory=private_redis.directory,
    )
    try:
        after = _fresh_process([*common, "2", "3", "4"])  # C: new, never saw the outage
        again = _fresh_process([*common, "4"])
    finally:
        restarted.stop()
        sql.close()
    runs = runs_file.read_text().split()
    assert after["2"] == during["2"]
    assert after["3"] == during["3"]
    assert runs.count("2") == 1
    assert runs.count("3") == 1
    assert runs.count("4") == 1  # new during the window: run once, held in both stores
    assert again["4"] == after["4"]
    assert before["1"].startswith("1:")


def test_clients_that_disagree_about_redis_can_both_claim_a_key(redis_url: str) -> None:
    """The documented limitation: a client that never saw the outage claims in Redis alone."""
    shared = RedisBackend.from_url(redis_url)
    blind = FallbackBackend(shared, secondary("sqlite"), marker_key=marker())
    cut_off_view = Switch(shared)
    cut_off = FallbackBackend(cut_off_view, secondary("sqlite"), marker_key=marker())
    cut_off_view.down = True  # a partition: only this client cannot reach Redis
    key, t1, t2 = new_key(), token(), token()
    assert cut_off.claim(key, t1, lease=LEASE).held_by(t1)
    assert blind.claim(key, t2, lease=LEASE).held_by(t2)
    shared.close()


def test_an_outage_marker_is_written_once_per_length_not_per_call(
    switched: tuple[FallbackBackend, Switch, Switch, Clock],
) -> None:
    """During an outage the marker covering a lease is written before the first SQL
    claim and not again while it still covers the next ones."""
    store, primary, second, _ = switched
    store._marker_key = marker()  # the switched fixture has none; give it one
    primary.down = True
    for _ in range(5):
        store.claim(new_key(), token(), lease=LEASE)
    marker_claims = [k for k in second.keys if k.startswith(store._marker_key)]
    assert marker_claims == [f"{store._marker_key}:{marker_bucket(LEASE)}"]


def test_a_claim_whose_outage_marker_cannot_be_written_is_refused(redis_url: str) -> None:
    """Without its marker a SQL claim could be run again by a fresh process: refused."""
    primary = Switch(RedisBackend.from_url(redis_url))
    prefix = marker()
    second = Switch(secondary("sqlite"))
    second.fail_keys = prefix
    store = FallbackBackend(primary, second, marker_key=prefix)
    primary.down = True
    key = new_key()
    with pytest.raises(BackendError, match="outage marker"):
        store.claim(key, token(), lease=LEASE)
    assert second.inner.get(key) is None
    primary.inner.close()


def test_dead_letters_and_breakers_live_in_the_secondary() -> None:
    from idempotask.backends.memory import MemoryBackend

    first, second = MemoryBackend(), MemoryBackend()
    store = FallbackBackend(first, second)
    assert store.dead_letter_store(namespace="a") is second.dead_letter_store(namespace="a")
    assert store.breaker_store(namespace="a") is second.breaker_store(namespace="a")


class ScanSwitch(Switch):
    """A Switch over a store that lists its keys."""

    def scan(self, prefix: str, *, limit: int = 100) -> list[Record]:
        return self._call("scan", prefix, limit=limit)  # type: ignore[no-any-return]

    async def ascan(self, prefix: str, *, limit: int = 100) -> list[Record]:
        return await self._acall("ascan", prefix, limit=limit)  # type: ignore[no-any-return]


def test_scan_lists_the_primary_and_while_it_may_hold_records_the_secondary() -> None:
    from idempotask.backends.memory import MemoryBackend

    first, second, clock = MemoryBackend(), MemoryBackend(), Clock()
    primary = ScanSwitch(first)
    store = FallbackBackend(primary, second, marker_key=None, clock=clock)
    store.claim("ns:f:v1:a", "t", lease=LEASE)
    primary.down = True
    store.claim("ns:f:v1:b", "t", lease=LEASE)
    assert sorted(r.key for r in store.scan("ns:f:")) == ["ns:f:v1:b"]
    recover(store, primary, clock)
    assert sorted(r.key for r in store.scan("ns:f:")) == ["ns:f:v1:a", "ns:f:v1:b"]


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_both_stores_down_is_one_backend_error_naming_both(
    switched: tuple[FallbackBackend, Switch, Switch, Clock], mode: str
) -> None:
    """When SQL fails too, the caller gets a BackendError naming both stores."""
    store, primary, second, _ = switched
    primary.down = second.down = True
    with pytest.raises(BackendError, match="both stores failed"):
        run(mode, store, "claim", new_key(), token(), lease=LEASE)
    with pytest.raises(BackendError, match="marked down"):
        run(mode, store, "claim", new_key(), token(), lease=LEASE)  # Redis skipped, SQL down


def test_a_corrupt_record_in_redis_is_not_an_outage(redis_url: str) -> None:
    """CorruptRecordError is raised as it is, and Redis stays in use."""
    primary = Switch(RedisBackend.from_url(redis_url), error=CorruptRecordError)
    store = FallbackBackend(primary, secondary("sqlite"), marker_key=None)
    primary.down = True
    with pytest.raises(CorruptRecordError):
        store.claim(new_key(), token(), lease=LEASE)
    assert store.status().primary_up
    primary.inner.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_only_one_caller_probes_a_primary_marked_down(
    switched: tuple[FallbackBackend, Switch, Switch, Clock], mode: str
) -> None:
    """Once the interval passes, one call tries Redis; the rest keep going to SQL."""
    store, primary, _, clock = switched
    primary.down = True
    run(mode, store, "claim", new_key(), token(), lease=LEASE)
    assert primary.total == 1  # the marker read on first use notices the outage
    for _ in range(3):
        run(mode, store, "claim", new_key(), token(), lease=LEASE)
    assert primary.total == 1
    clock.advance(store.probe_interval)
    for _ in range(3):
        run(mode, store, "claim", new_key(), token(), lease=LEASE)
    assert primary.total == 2  # one probe, which failed: the next is an interval away


# -- the URL form ------------------------------------------------------------------------------


def test_the_url_form_builds_redis_and_sql_with_their_own_options(tmp_path: Path) -> None:
    """fallback+redis://...?secondary=<encoded> builds both stores; our options are read."""
    sql = f"sqlite:///{tmp_path / 'idem.db'}?timeout=5"
    url = fallback_url("redis://127.0.0.1:6379/0?socket_timeout=1", sql, probe_interval=2)
    assert url == (
        "fallback+redis://127.0.0.1:6379/0?socket_timeout=1&secondary=sqlite%3A%2F%2F%2F"
        + str(tmp_path / "idem.db").replace("/", "%2F")
        + "%3Ftimeout%3D5&probe_interval=2"
    )
    store = backend_from_url(url + "&confirm_window=60")
    assert isinstance(store, FallbackBackend)
    assert isinstance(store.primary, RedisBackend)
    assert store.primary.connections.url == "redis://127.0.0.1:6379/0?socket_timeout=1"  # whole
    assert isinstance(store.secondary, SQLAlchemyBackend)
    assert (store.probe_interval, store.confirm_window) == (2.0, 60.0)
    assert isinstance(
        backend_from_url(url.replace("fallback+redis", "fallback+rediss")), FallbackBackend
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("fallback+redis://h:6379/0", "secondary store is missing"),
        ("fallback+redis://h:6379/0?secondary=sqlite:///a.db", "percent-encoded"),
        ("fallback+redis://h/0?secondary=sqlite%3A%2F%2F%2Fa.db&probe_interval=soon", "seconds"),
        ("fallback+redis://h/0?secondary=sqlite%3A%2F%2F%2Fa.db&probe_interval=0", "positive"),
        ("fallback+redis://h/0?secondary=fallback%2Bredis%3A%2F%2Fh", "fallback store itself"),
        (
            "fallback+redis://h/0?secondary=sqlite%3A%2F%2F%2Fa.db&secondary=sqlite%3A%2F%2F%2Fb",
            "given twice",
        ),
    ],
)
def test_a_bad_fallback_url_is_a_configuration_error(url: str, message: str) -> None:
    """Each mistake in the URL form is refused with a message saying what to fix."""
    with pytest.raises(ConfigurationError, match=message):
        backend_from_url(url)


@pytest.mark.parametrize(
    "build",
    [
        lambda: FallbackBackend(object(), object()),  # type: ignore[arg-type]
        lambda: FallbackBackend(*(2 * [secondary("sqlite")])),
        lambda: FallbackBackend(secondary("sqlite"), _memory(), probe_interval=-1),
        lambda: FallbackBackend(secondary("sqlite"), _memory(), max_tracked_claims=0),
        lambda: fallback_url("postgresql://db/app", "sqlite:///a.db"),
        lambda: FallbackBackend.from_url("fallback+memory://?secondary=sqlite%3A%2F%2F%2Fa.db"),
    ],
)
def test_bad_arguments_are_configuration_errors(build: Callable[[], Any]) -> None:
    """Wrong stores, durations and URLs are refused when the backend is built."""
    with pytest.raises(ConfigurationError):
        build()


def _memory() -> Backend:
    return backend_from_url("memory://")

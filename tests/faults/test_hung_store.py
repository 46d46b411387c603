"""One hung store must not starve the leases of another store in the same process.

Two Redis stores in one process: the shared server (healthy) and a private
``redis-server`` on another loopback port, SIGSTOPped while a call on it holds a claim,
so every renewal sent to it waits for its client timeouts. A call on the healthy store
with a 1.5 s lease and a 6 s body must keep its claim all along: a duplicate caller
waits for its result and never runs the body a second time. Sync (the renewal thread)
and asyncio (the renewal timer of the loop).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from idempotask import idempotent
from tests.conftest import service_url, unavailable
from tests.faults._support import drop_keys, unique

pytest.importorskip("redis")

from idempotask.backends.redis import RedisBackend
from tests.backends._redis_servers import RedisServer, have_redis_binaries

LEASE = 1.5
BODY = 6.0


@pytest.fixture
def hung_server() -> Iterator[RedisServer]:
    if not have_redis_binaries():
        unavailable("redis-server is not on PATH")
    server = RedisServer.start()
    try:
        yield server
    finally:
        # A stopped server must be continued before it can be terminated.
        if server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = unique("hungstore")
    yield ns
    drop_keys(service_url("redis"), f"{ns}:*")


def _stores(hung_server: RedisServer) -> tuple[RedisBackend, RedisBackend]:
    healthy = RedisBackend(url=service_url("redis"))
    # The client timeouts a hung server meets: seconds per renewal, several tries.
    hung = RedisBackend(url=hung_server.url, socket_timeout=5.0, connect_timeout=5.0)
    return healthy, hung


@pytest.mark.filterwarnings("ignore::idempotask.LeaseLostWarning")
def test_a_hung_store_never_delays_the_renewals_of_a_healthy_one(
    hung_server: RedisServer, namespace: str
) -> None:
    """Sync: a lease on the healthy store is renewed in time while renewals of a lease
    on a stopped server hang, so a duplicate caller waits and the body runs once."""
    import idempotask

    idempotask.configure(namespace=namespace)
    healthy, hung = _stores(hung_server)
    runs: list[str] = []
    hung_started, hung_release = threading.Event(), threading.Event()

    @idempotent(backend=hung, lease=LEASE, name=f"{namespace}.hung")
    def on_hung(n: int) -> int:
        hung_started.set()
        hung_release.wait(60)
        return n

    @idempotent(backend=healthy, lease=LEASE, wait_timeout=30, name=f"{namespace}.healthy")
    def on_healthy(n: int) -> int:
        runs.append(threading.current_thread().name)
        time.sleep(BODY)
        return n * 2

    results: dict[str, Any] = {}

    def call(name: str, fn: Any) -> None:
        try:
            results[name] = fn()
        except BaseException as exc:
            results[name] = exc

    hung_thread = threading.Thread(target=call, args=("hung", lambda: on_hung(1)))
    hung_thread.start()
    assert hung_started.wait(10)
    os.kill(hung_server.process.pid, signal.SIGSTOP)
    try:
        first = threading.Thread(target=call, args=("first", lambda: on_healthy(7)), name="first")
        first.start()
        time.sleep(LEASE * 2)  # well past the lease: only renewals keep the claim
        second = threading.Thread(
            target=call, args=("second", lambda: on_healthy(7)), name="second"
        )
        second.start()
        first.join(60)
        second.join(60)
    finally:
        os.kill(hung_server.process.pid, signal.SIGCONT)
        hung_release.set()
        hung_thread.join(60)
        healthy.close()
        hung.close()
    assert results["first"] == 14
    assert results["second"] == 14
    assert runs == ["first"]


@pytest.mark.filterwarnings("ignore::idempotask.LeaseLostWarning")
def test_a_hung_store_never_delays_async_renewals_of_a_healthy_one(
    hung_server: RedisServer, namespace: str
) -> None:
    """asyncio: the same on one event loop, where the hung store's renewals are awaited."""
    import idempotask

    idempotask.configure(namespace=namespace)
    healthy, hung = _stores(hung_server)
    runs: list[str] = []

    async def scenario() -> tuple[Any, Any]:
        hung_started, hung_release = asyncio.Event(), asyncio.Event()

        @idempotent(backend=hung, lease=LEASE, name=f"{namespace}.ahung")
        async def on_hung(n: int) -> int:
            hung_started.set()
            await hung_release.wait()
            return n

        @idempotent(
            backend=healthy,
            lease=LEASE,
            wait_timeout=30,
            key_args=("n",),
            name=f"{namespace}.ahealthy",
        )
        async def on_healthy(n: int, who: str) -> int:
            runs.append(who)
            await asyncio.sleep(BODY)
            return n * 2

        hung_task = asyncio.create_task(on_hung(1))
        await asyncio.wait_for(hung_started.wait(), 10)
        os.kill(hung_server.process.pid, signal.SIGSTOP)
        try:
            first = asyncio.create_task(on_healthy(7, "first"))
            await asyncio.sleep(LEASE * 2)
            second = asyncio.create_task(on_healthy(7, "second"))
            outcome = await asyncio.gather(first, second, return_exceptions=True)
        finally:
            os.kill(hung_server.process.pid, signal.SIGCONT)
            hung_release.set()
            await asyncio.gather(hung_task, return_exceptions=True)
            await healthy.aclose()
            await hung.aclose()
        return outcome[0], outcome[1]

    try:
        first, second = asyncio.run(scenario())
    finally:
        healthy.close()
        hung.close()
    assert runs == ["first"], (first, second)
    assert first == 14
    assert second == 14

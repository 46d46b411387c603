"""An asyncio caller cancelled at any await of its call never loses a finished body's
result and never leaves its key blocked: the claim is settled (result stored, failure
cached, or key released at once) before the cancellation propagates.

Each case stops the call at one await -- the claim, the body, storing the result,
caching a failure, releasing the key, a lease renewal -- and cancels it there, on the
memory store and on Redis (behind a delaying proxy, so the cancellation lands while the
command is on the wire). Then a second caller with ``on_conflict="raise"`` shows what the
store holds: a blocked key would raise ``AlreadyInProgress``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

import idempotask
from idempotask import idempotent
from idempotask.backends.base import Backend, Record, State
from idempotask.backends.memory import MemoryBackend
from tests.conftest import service_url


class Stalling:
    """A store that stops the first time one async operation runs, until cancelled.

    ``when`` is ``"before"`` (the real operation never ran), ``"after"`` (it ran, its
    answer is lost) or ``"during"`` (it is on its way: ``entered`` is set and the real
    operation awaited, for a store slow enough that a cancellation lands inside it).
    """

    def __init__(self, inner: Backend, op: str, when: str) -> None:
        self.inner = inner
        self.op = op
        self.when = when
        self.entered = asyncio.Event()
        self._armed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _call(self, name: str, real: Callable[[], Awaitable[Any]]) -> Any:
        if name != self.op or not self._armed:
            return await real()
        self._armed = False
        if self.when == "during":
            self.entered.set()
            return await real()
        if self.when == "after":
            await real()
        self.entered.set()
        await asyncio.Event().wait()  # until cancelled
        raise AssertionError("not reached")

    async def aclaim(self, key: str, token: str, **kw: Any) -> Record:
        return await self._call("aclaim", lambda: self.inner.aclaim(key, token, **kw))  # type: ignore[no-any-return]

    async def acomplete(self, key: str, token: str, payload: bytes, **kw: Any) -> bool:
        return await self._call(  # type: ignore[no-any-return]
            "acomplete", lambda: self.inner.acomplete(key, token, payload, **kw)
        )

    async def afail(self, key: str, token: str, payload: bytes, **kw: Any) -> bool:
        return await self._call(  # type: ignore[no-any-return]
            "afail", lambda: self.inner.afail(key, token, payload, **kw)
        )

    async def arenew(self, key: str, token: str, **kw: Any) -> bool:
        return await self._call("arenew", lambda: self.inner.arenew(key, token, **kw))  # type: ignore[no-any-return]

    async def adelete(self, key: str, **kw: Any) -> bool:
        return await self._call("adelete", lambda: self.inner.adelete(key, **kw))  # type: ignore[no-any-return]


# (the operation stopped, where, what the body does, what a second call then sees)
CASES = {
    "claim": ("aclaim", "after", "ok", "runs"),
    "body": ("", "", "hang", "runs"),
    "complete": ("acomplete", "before", "ok", "stored"),
    "fail": ("afail", "before", "raise", "cached"),
    "release": ("adelete", "before", "raise-uncached", "runs"),
}
# On Redis each write is cancelled before it is sent (waiting for a connection, say) and
# on the wire; the claim after its answer came (a cancelled claim still in flight may land
# after its release, like any late write).
REDIS_CASES = [
    ("claim", "after"),
    ("body", ""),
    *((case, when) for case in ("complete", "fail", "release") for when in ("before", "during")),
]


async def _cancel_at(store: Stalling | Backend, case: str, name: str) -> list[int]:
    op, _, body, expect = CASES[case]
    runs: list[int] = []
    hang = asyncio.Event()

    @idempotent(
        backend=store,  # type: ignore[arg-type]
        lease=30,
        on_conflict="raise",
        cache_errors=60 if body == "raise" else None,
        name=name,
    )
    async def job(n: int) -> int:
        runs.append(n)
        if body == "hang" and len(runs) == 1:
            hang.set()
            await asyncio.Event().wait()
        if body.startswith("raise"):
            raise ValueError(f"no {n}")
        return n * 2

    task = asyncio.create_task(job(1))
    if isinstance(store, Stalling) and op:
        await asyncio.wait_for(store.entered.wait(), 10)
        if store.when == "during":
            await asyncio.sleep(0.02)  # the command is on the wire (the proxy delays it)
    else:
        await asyncio.wait_for(hang.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    inner = store.inner if isinstance(store, Stalling) else store
    record = await inner.aget(job.key_for(1))
    if expect == "stored":
        assert record is not None
        assert record.state is State.COMPLETED
        assert await job(1) == 2
        assert runs == [1]
    elif expect == "cached":
        assert record is not None
        assert record.state is State.FAILED
        with pytest.raises(ValueError, match="no 1"):
            await job(1)
        assert runs == [1]
    else:
        # Nothing held: the next caller runs at once (a blocked key would raise
        # AlreadyInProgress under on_conflict="raise").
        assert record is None
        if body.startswith("raise"):
            with pytest.raises(ValueError):
                await job(1)
        else:
            assert await job(1) == 2
        assert len(runs) == (1 if case == "claim" else 2)
    return runs


@pytest.mark.parametrize("case", list(CASES))
async def test_a_cancelled_call_on_memory_settles_its_claim(case: str) -> None:
    op, when, _, _ = CASES[case]
    store = Stalling(MemoryBackend(), op, when)
    await _cancel_at(store, case, f"cancel.memory.{case}.{uuid.uuid4().hex[:8]}")


async def test_a_cancelled_renewal_does_not_cost_the_call_its_lease() -> None:
    """Cancelling the renewal task in flight: the next renewal still keeps the lease."""
    store = Stalling(MemoryBackend(), "arenew", "after")
    held: list[bool] = []

    @idempotent(backend=store, lease=0.3, name=f"cancel.renewal.{uuid.uuid4().hex[:8]}")  # type: ignore[arg-type]
    async def job(n: int) -> int:
        await asyncio.sleep(1.0)
        held.append(idempotask.lease_held())
        return n

    task = asyncio.create_task(job(1))
    await asyncio.wait_for(store.entered.wait(), 10)
    renewals = [t for t in asyncio.all_tasks() if t.get_name() == "idempotask-lease-renewal"]
    assert renewals
    for t in renewals:
        t.cancel()
    assert await task == 1
    assert held == [True]
    record = await store.inner.aget(job.key_for(1))
    assert record is not None
    assert record.state is State.COMPLETED


# ------------------------------------------------------------------------------ Redis


@pytest.fixture
def slow_redis() -> Iterator[str]:
    pytest.importorskip("redis")
    from tests.faults._proxy import DelayProxy

    parts = urlsplit(service_url("redis"))
    if parts.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the fault proxy only forwards to a Redis on 127.0.0.1")
    with DelayProxy("127.0.0.1", parts.port or 6379, delay=0.05) as proxy:
        yield proxy.url


@pytest.mark.parametrize(("case", "when"), REDIS_CASES)
def test_a_cancelled_call_on_redis_settles_its_claim(case: str, when: str, slow_redis: str) -> None:
    from idempotask.backends.redis import RedisBackend

    namespace = f"cancel{uuid.uuid4().hex[:12]}"
    idempotask.configure(namespace=namespace)
    op, _, _, _ = CASES[case]
    backend = RedisBackend(url=slow_redis, socket_timeout=5.0)

    async def scenario() -> None:
        store = Stalling(backend, op, when)
        try:
            await _cancel_at(store, case, f"cancel.redis.{case}")
        finally:
            key_pattern = f"{namespace}:*"
            await backend.aclose()
            import redis

            client = redis.Redis.from_url(service_url("redis"))
            for k in client.scan_iter(match=key_pattern):
                client.delete(k)
            client.close()

    try:
        asyncio.run(scenario())
    finally:
        backend.close()

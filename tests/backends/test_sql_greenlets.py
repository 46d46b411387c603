"""The SQL store's asyncio operations run in greenlets reused from one call to the next
(``_greenlets.spawn``), behaving as SQLAlchemy's ``greenlet_spawn``."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.util import await_

from idempotask.backends.sql import _greenlets

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


@pytest.fixture(autouse=True)
def _fresh_greenlets() -> Iterator[None]:
    _greenlets._local.__dict__.clear()
    yield
    _greenlets._local.__dict__.clear()


async def _value(value: Any, delay: float = 0.0) -> Any:
    await asyncio.sleep(delay)
    return value


async def test_a_function_awaits_through_its_greenlet_and_the_greenlet_is_reused() -> None:
    """Each await_ inside the function is awaited by the caller; once the function
    returned, its greenlet waits for the next call instead of being made again."""

    def add() -> int:
        return int(await_(_value(1))) + int(await_(_value(2)))

    assert await _greenlets.spawn(add) == 3
    (kept,) = _greenlets._local.idle
    assert await _greenlets.spawn(add) == 3
    assert _greenlets._local.idle == [kept]


async def test_the_function_sees_the_calling_tasks_context_variables() -> None:
    """Tasks interleaving on the same thread each see their own context inside the
    function, before and after an await, in whichever greenlet they get."""

    def read() -> tuple[str, str]:
        before = request_id.get()
        await_(_value(None, 0.01))
        return before, request_id.get()

    async def task(name: str) -> tuple[str, str]:
        request_id.set(name)
        return await _greenlets.spawn(read)

    results = await asyncio.gather(*(task(f"r{i}") for i in range(5)))
    assert results == [(f"r{i}", f"r{i}") for i in range(5)]
    assert len(_greenlets._local.idle) == 5  # one per call in flight at once


async def test_an_exception_from_the_function_propagates_and_the_greenlet_stays_usable() -> None:
    def fail() -> None:
        await_(_value(None))
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await _greenlets.spawn(fail)
    assert await _greenlets.spawn(lambda: await_(_value("again"))) == "again"


async def test_a_cancellation_while_awaiting_is_thrown_into_the_function() -> None:
    """As with greenlet_spawn: the function's await_ raises CancelledError, so it can
    clean up (the SQL executor discards a busy connection there), then it propagates."""
    cleaned = asyncio.Event()

    def wait_forever() -> None:
        try:
            await_(asyncio.sleep(3600))
        except asyncio.CancelledError:
            cleaned.set()
            raise

    task = asyncio.ensure_future(_greenlets.spawn(wait_forever))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()
    assert await _greenlets.spawn(lambda: 1) == 1


async def test_without_sqlalchemys_greenlet_marker_it_falls_back_to_greenlet_spawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Should await_ not accept our greenlets (another SQLAlchemy), the one-time check
    finds out and every call goes through greenlet_spawn."""
    monkeypatch.setattr(_greenlets, "_compatible", None)
    monkeypatch.setattr(_greenlets._Greenlet, "__sqlalchemy_greenlet_provider__", False)
    assert await _greenlets.spawn(lambda: await_(_value(7))) == 7
    assert _greenlets._compatible is False
    assert await _greenlets.spawn(lambda: await_(_value(8))) == 8

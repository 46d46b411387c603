"""breaker= on @idempotent and @dead_letter: fail fast while open, no attempt used up."""

from __future__ import annotations

import pytest

from idempotask import CircuitBreaker, CircuitOpenError, DeadLetterQueue, dead_letter, idempotent
from idempotask.backends.deadletters import Status
from idempotask.backends.memory import MemoryBreakerStore
from idempotask.errors import ConfigurationError


def _breaker(name: str, threshold: int = 2) -> CircuitBreaker:
    return CircuitBreaker(
        name, failure_threshold=threshold, recovery_timeout=600, store=MemoryBreakerStore()
    )


def test_an_open_breaker_fails_idempotent_calls_fast_and_releases_the_key() -> None:
    calls = 0
    breaker = _breaker("tests.wrappers.idem")

    @idempotent(breaker=breaker)
    def fetch(x: int) -> int:
        nonlocal calls
        calls += 1
        raise ConnectionError("dependency down")

    for x in range(2):
        with pytest.raises(ConnectionError):
            fetch(x)
    with pytest.raises(CircuitOpenError):
        fetch(9)
    assert calls == 2  # the third call never reached the body
    with pytest.raises(CircuitOpenError):
        fetch(9)  # the key was released, not stuck in progress


def test_an_open_breaker_letter_is_external_and_uses_no_attempt() -> None:
    queue = DeadLetterQueue("memory://")
    breaker = _breaker("tests.wrappers.dlq", threshold=1)
    calls = 0

    @dead_letter(queue=queue, breaker=breaker)
    def sync_orders(batch: int) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("ERP down")

    with pytest.raises(ConnectionError):
        sync_orders(1)
    with pytest.raises(CircuitOpenError):
        sync_orders(2)
    assert calls == 1
    letters = {
        letter.error_type.rsplit(".", 1)[-1]: letter
        for letter in queue.query(status=[Status.PENDING])
    }
    assert letters["CircuitOpenError"].kind == "external"
    assert letters["ConnectionError"].kind == "transient"


async def test_breaker_on_async_idempotent_functions() -> None:
    breaker = _breaker("tests.wrappers.async", threshold=1)

    @idempotent(breaker=breaker)
    async def fetch() -> None:
        raise TimeoutError("slow upstream")

    with pytest.raises(TimeoutError):
        await fetch()
    with pytest.raises(CircuitOpenError):
        await fetch()


def test_breaker_option_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="breaker"):
        idempotent(breaker="on")(lambda: None)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="breaker"):
        dead_letter(breaker=object())(lambda: None)  # type: ignore[call-overload]

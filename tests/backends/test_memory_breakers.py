"""MemoryBreakerStore: the shared breaker-store contract, and what is memory-specific."""

from __future__ import annotations

import pytest

from idempotask.backends.base import BreakerStatus
from idempotask.backends.memory import MemoryBackend, MemoryBreakerStore
from idempotask.errors import ConfigurationError
from idempotask.testing import BreakerStoreContract


class TestMemoryBreakerContract(BreakerStoreContract):
    """The conformance suite, sync and async, on a fresh store per test."""

    @pytest.fixture
    def breaker_store(self) -> MemoryBreakerStore:
        return MemoryBreakerStore()


class TestSharedMemoryBreakerContract(BreakerStoreContract):
    """The suite again on the store a backend keeps beside its records, shared by every
    test as a real server would be."""

    real_time_tests = False
    shared = MemoryBackend().breaker_store(namespace="contract")

    @pytest.fixture
    def breaker_store(self) -> MemoryBreakerStore:
        return self.shared


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_injected_clock_moves_a_breaker_through_its_states_without_sleeping() -> None:
    clock = FakeClock()
    store = MemoryBreakerStore(clock=clock)
    assert store.record_failure("api", threshold=1, window=60, open_for=30).changed
    clock.now += 29
    assert store.state("api").status is BreakerStatus.OPEN
    clock.now += 2
    assert store.state("api").status is BreakerStatus.HALF_OPEN
    assert store.try_probe("api", "t", lease=10).probe
    assert store.record_success("api").changed
    assert store.states() == {}


def test_clock_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match="clock"):
        MemoryBreakerStore(clock=1.0)  # type: ignore[arg-type]

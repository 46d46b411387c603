"""MemoryDeadLetterStore: the shared dead-letter contract, and what is memory-specific."""

from __future__ import annotations

import pytest

from idempotask.backends.deadletters import (
    DeadLetter,
    DeadLetterStore,
    Status,
    dead_letter_store_from_url,
)
from idempotask.backends.memory import MemoryDeadLetterStore
from idempotask.errors import ConfigurationError
from idempotask.testing import DeadLetterStoreContract


class TestMemoryDeadLetterContract(DeadLetterStoreContract):
    """The conformance suite, sync and async, on a fresh store per test."""

    @pytest.fixture
    def dead_letter_store(self) -> MemoryDeadLetterStore:
        return MemoryDeadLetterStore()


class TestSharedMemoryDeadLetterContract(DeadLetterStoreContract):
    """The suite again on one store shared by every test, as a real server would be."""

    real_time_tests = False
    shared = MemoryDeadLetterStore()

    @pytest.fixture
    def dead_letter_store(self) -> MemoryDeadLetterStore:
        return self.shared


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def _letter(id: str, **fields: object) -> DeadLetter:
    values: dict[str, object] = {
        "function": "f",
        "kind": "transient",
        "error_type": "E",
        "message": "m",
        "next_retry_at": 10.0,
    }
    values.update(fields)
    return DeadLetter(id=id, **values)  # type: ignore[arg-type]


def test_the_injected_clock_drives_claim_leases() -> None:
    """A claim runs out exactly when the store's clock passes its lease."""
    clock = FakeClock()
    store = MemoryDeadLetterStore(clock=clock)
    store.add(_letter("a"))
    assert [x.id for x in store.claim_due(100.0, lease=30)] == ["a"]
    clock.now += 29.9
    assert store.claim_due(100.0, lease=30) == []
    clock.now += 0.1
    assert [x.id for x in store.claim_due(100.0, lease=30)] == ["a"]


def test_memory_url_builds_a_fresh_store_and_options_are_refused() -> None:
    """memory:// gives a new empty store; anything more in the URL is a clear error."""
    store = dead_letter_store_from_url("memory://")
    assert isinstance(store, MemoryDeadLetterStore)
    assert isinstance(store, DeadLetterStore)
    assert store.size == 0
    assert store  # truthy while empty
    with pytest.raises(ConfigurationError, match="no options"):
        dead_letter_store_from_url("memory://?max_entries=3")


@pytest.mark.parametrize("url", ["postgresql+psycopg://u@h/db", "sqlite:///dl.db"])
def test_sql_urls_build_the_sql_store(url: str) -> None:
    """SQL dead-letter URLs build a SQLDeadLetterStore (without connecting)."""
    from idempotask.backends.sql import SQLDeadLetterStore

    assert isinstance(dead_letter_store_from_url(url), SQLDeadLetterStore)


def test_status_strings_are_stored_as_status_members() -> None:
    """A status given as its string value comes back as the enum member."""
    store = MemoryDeadLetterStore()
    added = store.add(_letter("s", status="retrying"))
    assert added.status is Status.RETRYING
    updated = store.update("s", added.version, status="resolved")
    assert updated is not None
    assert updated.status is Status.RESOLVED


def test_bad_pages_filters_and_arguments_are_refused_as_the_other_stores_refuse_them() -> None:
    """limit/offset, a purge without a filter and non-bytes arguments are ConfigurationErrors
    (as on Redis and SQL), and nothing is written or deleted."""
    store = MemoryDeadLetterStore()
    store.add(_letter("kept"))
    with pytest.raises(ConfigurationError, match="offset"):
        store.query(offset=-1)
    with pytest.raises(ConfigurationError, match="limit"):
        store.claim_due(100.0, limit="10")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="DeadLetterFilter"):
        store.purge(None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="arguments"):
        store.add(_letter("bad", arguments=5))
    assert store.query(limit=0) == []
    assert store.claim_due(100.0, limit=-1) == []
    assert [x.id for x in store.query()] == ["kept"]

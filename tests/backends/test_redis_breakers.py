"""RedisBreakerStore beyond tests/test_breaker.py: listing every breaker (``states``),
namespaces, and the store a backend hands out.

Keys start with this run's ``NAMESPACE`` and are deleted at the end.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis

from idempotask.backends.base import BreakerStatus, BreakerStore, ProvidesStores
from idempotask.backends.redis import RedisBackend, RedisBreakerStore, record_key
from idempotask.errors import ConfigurationError
from tests.conftest import service_url

pytestmark = pytest.mark.redis

NAMESPACE = f"brktest-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """The shared server; every key this module made is removed at the end."""
    url = service_url("redis")
    yield url
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{NAMESPACE}*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def backend(redis_url: str) -> Iterator[RedisBackend]:
    """A backend on the shared server, closed afterwards."""
    store = RedisBackend.from_url(redis_url)
    yield store
    store.close()


def fresh_namespace() -> str:
    """A namespace of its own under this run's NAMESPACE."""
    return f"{NAMESPACE}-{uuid.uuid4().hex[:8]}"


def test_a_backend_hands_out_a_breaker_store_on_its_clients(backend: RedisBackend) -> None:
    """breaker_store(namespace=) is a BreakerStore sharing the backend's connections."""
    assert isinstance(backend, ProvidesStores)
    store = backend.breaker_store(namespace="billing")
    assert isinstance(store, RedisBreakerStore)
    assert isinstance(store, BreakerStore)
    assert store.backend is backend
    assert record_key(store.key("pay")) == "billing:{breaker:pay}"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_states_lists_every_breaker_of_the_namespace(backend: RedisBackend, mode: str) -> None:
    """states() names each breaker with a record and its state; another namespace's
    breakers, a foreign value under a breaker key and reset breakers are left out."""
    ns, other = fresh_namespace(), fresh_namespace()
    store, elsewhere = backend.breaker_store(namespace=ns), backend.breaker_store(namespace=other)
    for name in ["pay", "mail", "sms:eu", "odd{1}"]:
        store.record_failure(name, threshold=2 if name == "mail" else 1, window=60, open_for=60)
    store.record_failure("gone", threshold=5, window=60, open_for=60)
    store.reset("gone")
    elsewhere.record_failure("pay", threshold=1, window=60, open_for=60)
    raw = redis.Redis.from_url(service_url("redis"))
    raw.set(record_key(store.key("foreign")), "not a breaker")
    raw.close()

    async def listing() -> tuple[dict[str, object], dict[str, object]]:
        try:
            return await store.astates(), await store.astates(limit=2)
        finally:
            await backend.aclose()

    states, few = (
        (store.states(), store.states(limit=2)) if mode == "sync" else asyncio.run(listing())
    )
    assert set(states) == {"pay", "mail", "sms:eu", "odd{1}"}
    assert states["pay"].status is BreakerStatus.OPEN  # type: ignore[attr-defined]
    assert states["mail"].status is BreakerStatus.CLOSED  # type: ignore[attr-defined]
    assert states["mail"].failures == 1  # type: ignore[attr-defined]
    assert len(few) == 2
    assert set(elsewhere.states()) == {"pay"}
    assert store.states(limit=0) == {}


def test_states_of_an_empty_namespace_is_empty(backend: RedisBackend) -> None:
    """No breaker has a record yet: states() is {}."""
    assert backend.breaker_store(namespace=fresh_namespace()).states() == {}


def test_namespace_and_its_older_name_prefix(redis_url: str) -> None:
    """prefix= still names the namespace (breaker.py passes it); both, different, is an error."""
    assert RedisBreakerStore(redis_url, prefix="a").namespace == "a"
    assert RedisBreakerStore.from_url(redis_url, namespace="b").namespace == "b"
    with pytest.raises(ConfigurationError, match="disagree"):
        RedisBreakerStore(redis_url, namespace="a", prefix="b")
    with pytest.raises(ConfigurationError, match="namespace"):
        RedisBreakerStore(redis_url, namespace="a:b")
    with pytest.raises(ConfigurationError, match="limit"):
        RedisBreakerStore(redis_url).states(limit=-1)

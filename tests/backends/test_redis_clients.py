"""RedisBackend on redis-py's public path: event-loop clients closed with their loop,
instrumented and decoding clients, and URLs whose passwords never reach an error.

The shared server is ``IDEMPOTASK_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); every
key written here starts with this run's ``NAMESPACE`` and is deleted at the end. Clients
are told apart on the server by a ``client_name`` unique to the test.
"""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

import idempotask
from idempotask import idempotent
from idempotask.backends.deadletters import dead_letter_store_from_url
from idempotask.backends.redis import RedisBackend, RedisDeadLetterStore, safe_url
from idempotask.config import get_backend
from idempotask.errors import ConfigurationError
from tests.conftest import service_url

pytestmark = pytest.mark.redis

NAMESPACE = f"idemclients-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """The shared server; every key this module made under NAMESPACE is removed at the end."""
    url = service_url("redis")
    yield url
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{NAMESPACE}*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client to look at the server's client list."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def named(url: str, name: str) -> str:
    """``url`` with a client_name query option, so the server can count our connections."""
    return f"{url}{'&' if '?' in url else '?'}client_name={name}"


def server_clients(admin: redis.Redis, name: str) -> int:
    """How many connections the server has open under the client name ``name``."""
    return sum(1 for client in admin.client_list() if client.get("name") == name)


def open_fds() -> int:
    """This process's open file descriptors."""
    return len(os.listdir("/proc/self/fd"))


# -- one asyncio client per event loop, closed with it ----------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc")
def test_three_hundred_asyncio_runs_leave_no_socket_or_server_client_behind(
    redis_url: str, admin: redis.Redis
) -> None:
    """Regression (issue 13 §2): each asyncio.run() of an async idempotent call made an
    asyncio client that outlived its loop: 300 runs left 300 sockets and 300 server clients.
    Now the loop's client is closed when asyncio.run() shuts the loop down."""
    name = f"leak-{uuid.uuid4().hex[:10]}"
    backend = RedisBackend.from_url(named(redis_url, name))
    idempotask.configure(backend=backend, namespace=NAMESPACE)

    @idempotent(name=f"tests.redis.leak.{name}", ttl=60)
    async def double(n: int) -> int:
        return 2 * n

    try:
        assert asyncio.run(double(0)) == 0
        gc.collect()
        fds_before = open_fds()
        for i in range(300):
            assert asyncio.run(double(i % 7)) == 2 * (i % 7)
        gc.collect()
        assert open_fds() - fds_before <= 2, "a socket per asyncio.run() is left open"
        assert server_clients(admin, name) <= 1, "the server still holds old loops' clients"
        assert backend.connections.loop_count() == 0
    finally:
        backend.close()


def test_a_loops_client_is_closed_when_the_loop_ends(redis_url: str, admin: redis.Redis) -> None:
    """While its loop runs, the loop's client is connected; once asyncio.run() returns, the
    server has forgotten it, without aclose() being called."""
    name = f"loop-{uuid.uuid4().hex[:10]}"
    backend = RedisBackend.from_url(named(redis_url, name), check_eviction_policy=False)

    async def call() -> int:
        await backend.aget(f"{NAMESPACE}:f:1:d")
        return server_clients(admin, name)

    try:
        assert asyncio.run(call()) == 1
        assert server_clients(admin, name) == 0
        assert backend.connections.loop_count() == 0
    finally:
        backend.close()


def test_a_loop_closed_without_shutting_down_its_generators_is_not_kept_alive(
    redis_url: str,
) -> None:
    """A bare loop.close() (no shutdown_asyncgens) cannot run the closer; the backend drops
    that loop's client when the next loop comes, so the closed loop can be collected."""
    backend = RedisBackend.from_url(redis_url, check_eviction_policy=False)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(backend.aget(f"{NAMESPACE}:f:1:d"))
    loop.close()
    gone = weakref.ref(loop)
    del loop
    assert asyncio.run(backend.aget(f"{NAMESPACE}:f:1:d")) is None
    gc.collect()
    assert gone() is None, "the backend kept a closed event loop alive"
    assert backend.connections.loop_count() == 0
    backend.close()


def test_aclose_closes_the_running_loops_client_at_once(redis_url: str, admin: redis.Redis) -> None:
    """aclose() inside the loop closes its client now; the next call makes a new one."""
    name = f"aclose-{uuid.uuid4().hex[:10]}"
    backend = RedisBackend.from_url(named(redis_url, name), check_eviction_policy=False)

    async def scenario() -> list[int]:
        seen = []
        await backend.aget(f"{NAMESPACE}:f:1:d")
        seen.append(server_clients(admin, name))
        await backend.aclose()
        seen.append(server_clients(admin, name))
        await backend.aget(f"{NAMESPACE}:f:1:d")
        seen.append(server_clients(admin, name))
        return seen

    try:
        assert asyncio.run(scenario()) == [1, 0, 1]
        assert server_clients(admin, name) == 0
    finally:
        backend.close()


async def test_a_users_async_client_is_never_closed_by_the_backend(redis_url: str) -> None:
    """An async_client you passed is used as given and stays yours to close."""
    client = redis.asyncio.Redis.from_url(redis_url)
    backend = RedisBackend(async_client=client)
    await backend.aget(f"{NAMESPACE}:f:1:d")
    await backend.aclose()
    assert await client.ping()
    await client.aclose()


# -- instrumented and decoding clients ------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[Any]:
    """OpenTelemetry's redis instrumentation on, spans kept in memory; off afterwards."""
    instrumentation = pytest.importorskip("opentelemetry.instrumentation.redis")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = instrumentation.RedisInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        instrumentor.uninstrument()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_opentelemetry_sees_every_command(redis_url: str, spans: Any, mode: str) -> None:
    """With RedisInstrumentor on, every command the backend sends is a span: the claim's
    SET, complete's EVALSHA, a duplicate's SET, and a NOSCRIPT reload's SCRIPT LOAD."""
    backend = RedisBackend.from_url(redis_url, check_eviction_policy=False)
    key, tok = f"{NAMESPACE}:otel:1:{uuid.uuid4().hex}", uuid.uuid4().hex

    async def scenario() -> None:
        assert (await backend.aclaim(key, tok, lease=30)).held_by(tok)
        assert await backend.acomplete(key, tok, b"r", ttl=30)
        assert (await backend.aclaim(key, "other", lease=30)).payload == b"r"

    try:
        spans.clear()
        if mode == "sync":
            assert backend.claim(key, tok, lease=30).held_by(tok)
            assert backend.complete(key, tok, b"r", ttl=30)
            assert backend.claim(key, "other", lease=30).payload == b"r"
        else:
            asyncio.run(scenario())
    finally:
        backend.close()
    names = [span.name for span in spans.get_finished_spans()]
    assert [n for n in names if n in ("SET", "EVALSHA")] == ["SET", "EVALSHA", "SET"], names


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_decoding_clients_alone_keep_payloads_as_bytes(redis_url: str, mode: str) -> None:
    """A decode_responses=True client given alone (sync, or asyncio) returns the exact bytes
    of a payload that is not UTF-8, on claim, get and a duplicate's SET ... GET."""
    payload = bytes(range(256))
    key, tok = f"{NAMESPACE}:decode:1:{uuid.uuid4().hex}", uuid.uuid4().hex
    if mode == "sync":
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        backend = RedisBackend(client)
        try:
            assert backend.claim(key, tok, lease=30).held_by(tok)
            assert backend.complete(key, tok, payload, ttl=30)
            duplicate = backend.claim(key, "other", lease=30)
            record = backend.get(key)
        finally:
            client.close()
    else:

        async def scenario() -> tuple[Any, Any]:
            aclient = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
            abackend = RedisBackend(aclient)
            try:
                assert (await abackend.aclaim(key, tok, lease=30)).held_by(tok)
                assert await abackend.acomplete(key, tok, payload, ttl=30)
                return await abackend.aclaim(key, "other", lease=30), await abackend.aget(key)
            finally:
                await aclient.aclose()

        duplicate, record = asyncio.run(scenario())
    assert duplicate.payload == payload
    assert record is not None
    assert record.payload == payload


# -- secrets in URLs ---------------------------------------------------------------------------

_BAD_URLS = [
    "redis://user:s3cretpw@cache.example:notaport/0",
    "redis://:s3cret/pw@cache.example:6379/0",  # a '/' in the password ends the netloc
    "redis://user:s3cret#pw@cache.example:6379/0",  # so does a '#'
    "redis://cache.example:6379/0?password=s3cretpw&socket_timeout=soon",
    "http://user:s3cretpw@cache.example:6379/0",  # the wrong scheme
]


@pytest.mark.parametrize("url", _BAD_URLS)
def test_a_malformed_url_never_shows_its_password(url: str) -> None:
    """RedisBackend, its dead-letter store and configure(): the ConfigurationError (and
    its cause chain) names the URL with the password hidden."""
    builders = [
        lambda: RedisBackend.from_url(url),
        lambda: RedisDeadLetterStore.from_url(url),
    ]
    if url.startswith("redis"):
        builders.append(lambda: dead_letter_store_from_url(url))
        builders.append(lambda: (idempotask.configure(backend=url), get_backend()))
    for build in builders:
        with pytest.raises(ConfigurationError) as caught:
            build()
        shown = str(caught.value) + repr(caught.value.__cause__) + repr(caught.value.__context__)
        assert "s3cret" not in shown, shown
        assert "pw" not in shown.replace("password=***", ""), shown


def test_safe_url_hides_user_info_and_secret_query_values() -> None:
    """safe_url keeps scheme, host, port, path and harmless options; hides the rest."""
    assert safe_url("rediss://u:p@h:6380/2?socket_timeout=1&password=x") == (
        "rediss://***@h:6380/2?socket_timeout=1&password=***"
    )
    assert safe_url("redis://:p@ss@h/0") == "redis://***@h/0"
    assert safe_url(None) == "<NoneType>"

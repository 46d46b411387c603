"""RedisBackend: the shared store contract (single server and Cluster), then Redis specifics.

The shared server is ``IDEMPOTASK_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); when
it is unreachable these tests skip, or fail under ``IDEMPOTASK_REQUIRE_SERVICES=1``. Tests
that flush scripts, reset statistics, change the eviction policy, kill the server or need a
cluster start their own ``redis-server`` processes on free loopback ports.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import struct
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.crc import key_slot

from idempotask.backends import backend_from_url
from idempotask.backends.base import (
    Backend,
    ProvidesStores,
    Record,
    State,
    SupportsExpireNow,
    SupportsScan,
)
from idempotask.backends.redis import (
    MAX_FIELD_BYTES,
    RECORD_FORMAT,
    RedisBackend,
    eviction_warning,
    library_key,
    parse_flag,
    parse_record,
    parse_value,
    record_key,
)
from idempotask.backends.redis import milliseconds as _milliseconds
from idempotask.backends.redis._clients import SOURCES
from idempotask.errors import BackendError, ConfigurationError, CorruptRecordError
from idempotask.testing import StoreContract, make_state_machine

from ._redis_servers import RedisCluster3, RedisServer, free_port, have_redis_binaries

pytestmark = pytest.mark.redis

REDIS_URL = os.environ.get("IDEMPOTASK_REDIS_URL", "redis://127.0.0.1:6379/0")
# Unique per test run, so parallel sessions on one server never share a key.
NAMESPACE = f"idemtest-{uuid.uuid4().hex[:12]}"


def _unavailable(reason: str) -> None:
    if os.environ.get("IDEMPOTASK_REQUIRE_SERVICES") == "1":
        pytest.fail(f"IDEMPOTASK_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


_reachable: dict[str, str | None] = {}


def require_redis() -> str:
    """The shared server's URL, or skip (fail under IDEMPOTASK_REQUIRE_SERVICES=1)."""
    if REDIS_URL not in _reachable:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
            _reachable[REDIS_URL] = None
        except redis.RedisError as exc:
            _reachable[REDIS_URL] = (
                f"Redis is not reachable at IDEMPOTASK_REDIS_URL={REDIS_URL}: {exc}"
            )
        finally:
            client.close()
    reason = _reachable[REDIS_URL]
    if reason is not None:
        _unavailable(reason)
    return REDIS_URL


def require_binaries() -> None:
    """Skip (or fail) when redis-server / redis-cli are not on PATH."""
    if not have_redis_binaries():
        _unavailable("redis-server and redis-cli are not on PATH")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """The shared server; every key this module made under NAMESPACE is removed at the end."""
    url = require_redis()
    yield url
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{NAMESPACE}:*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def backend(redis_url: str) -> Iterator[RedisBackend]:
    """A backend on the shared server, closed afterwards."""
    store = RedisBackend.from_url(redis_url)
    yield store
    store.close()


@pytest.fixture
async def abackend(redis_url: str) -> AsyncIterator[RedisBackend]:
    """A backend on the shared server for async tests; its loop's client is closed after."""
    store = RedisBackend.from_url(redis_url)
    yield store
    await store.aclose()
    store.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client on the shared server, to look at and plant raw values."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def private_server() -> Iterator[RedisServer]:
    """A private server for tests that flush scripts, reset stats or change its config."""
    require_binaries()
    server = RedisServer.start("--maxmemory-policy", "noeviction")
    yield server
    server.stop()


def new_key(name: str = "f") -> str:
    """A fresh key shaped like the library's: namespace:name:version:digest."""
    return f"{NAMESPACE}:{name}:1:{uuid.uuid4().hex}"


def token() -> str:
    """A fresh claim token."""
    return uuid.uuid4().hex


# -- the shared contract on one server ---------------------------------------------------


class TestRedisContract(StoreContract):
    """The conformance suite, sync and async, on the shared Redis server."""

    @pytest.fixture
    def backend(self, redis_url: str) -> Iterator[RedisBackend]:
        store = RedisBackend.from_url(redis_url)
        yield store
        store.close()


class TestRedisContractWithDecodingClient(StoreContract):
    """The suite again through a user's ``decode_responses=True`` client (async derived)."""

    real_time_tests = False

    @pytest.fixture
    def backend(self, redis_url: str) -> Iterator[RedisBackend]:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        yield RedisBackend(client)
        client.close()


_machine_backend: list[RedisBackend] = []


def _shared_machine_backend() -> RedisBackend:
    # One backend for every example: each example awaits it from a new event loop, which
    # is how a long-lived backend is used by asyncio.run() called again and again.
    url = require_redis()
    if not _machine_backend:
        _machine_backend.append(RedisBackend.from_url(url))
    return _machine_backend[0]


TestRedisStateMachine = make_state_machine(_shared_machine_backend).TestCase


# -- the shared contract on a 3-master cluster -------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster3]:
    """Three cluster-enabled masters on loopback ports, stopped (and cleaned) afterwards."""
    require_binaries()
    nodes = RedisCluster3.start()
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def cluster_client(cluster: RedisCluster3) -> Iterator[redis.cluster.RedisCluster]:
    """A sync RedisCluster client shared by the module's cluster tests."""
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield client
    client.close()


class TestRedisClusterContract(StoreContract):
    """The conformance suite, sync and async, on Redis Cluster (async client derived)."""

    real_time_tests = False  # the clock test runs on the single server above

    @pytest.fixture
    def backend(self, cluster_client: redis.cluster.RedisCluster) -> RedisBackend:
        return RedisBackend(cluster_client)


async def test_cluster_with_a_users_async_cluster_client(cluster: RedisCluster3) -> None:
    """A user's asyncio RedisCluster client is used as given, on keys across all masters."""
    aclient = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[-1])
    store = RedisBackend(async_client=aclient)
    try:
        # 48 keys: all three masters get some unless chance is 3 * (2/3)**48 unkind.
        keys = [new_key(f"spread{i}") for i in range(48)]
        tokens = [token() for _ in keys]
        for key, tok in zip(keys, tokens, strict=True):
            assert (await store.aclaim(key, tok, lease=30)).held_by(tok)
            assert await store.acomplete(key, tok, tok.encode(), ttl=30)
        for key, tok in zip(keys, tokens, strict=True):
            record = await store.aclaim(key, token(), lease=30)
            assert (record.state, record.payload) == (State.COMPLETED, tok.encode())
            assert await store.adelete(key, token=tok)
        slots = {key_slot(record_key(k).encode()) for k in keys}
        owners = {getattr(aclient.get_node_from_key(record_key(k)), "name", None) for k in keys}
        assert len(slots) > 1, "records should spread over the slots"
        assert len(owners) == 3, "records should spread over the masters"
    finally:
        await aclient.aclose()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_cluster_recovers_from_noscript_on_every_node(
    cluster_client: redis.cluster.RedisCluster, mode: str
) -> None:
    """After SCRIPT FLUSH on every master, each node gets the script again on its first use."""
    store = RedisBackend(cluster_client)
    keys = [new_key(f"noscript{i}") for i in range(12)]
    run(store, mode, "get", new_key())  # the scripts are cached on some node
    cluster_client.script_flush()  # every primary, by redis-py's routing
    for key in keys:
        tok = token()
        assert run(store, mode, "claim", key, tok, lease=30).held_by(tok)
        assert run(store, mode, "complete", key, tok, b"ok", ttl=30) is True
        assert run(store, mode, "delete", key) is True


# -- pure helpers ------------------------------------------------------------------------


def test_record_key_puts_the_hash_tag_on_the_per_record_part() -> None:
    """namespace:name:version:digest becomes namespace:{name:version:digest}."""
    assert record_key("ns:billing.charge:1:ab12") == "ns:{billing.charge:1:ab12}"
    assert record_key("plain") == "{plain}"
    same_slot = key_slot(b"billing.charge:1:ab12")
    assert key_slot(record_key("ns:billing.charge:1:ab12").encode()) == same_slot
    assert key_slot(record_key("other:billing.charge:1:ab12").encode()) == same_slot


def test_braces_in_keys_are_escaped_so_the_hash_tag_stays_ours() -> None:
    """Braces (and the escape character) are escaped: one tag, and distinct keys stay distinct."""
    assert record_key("ns:{a}:1:d") == "ns:{%7Ba%7D:1:d}"
    assert record_key("n{s}:x") == "n%7Bs%7D:{x}"
    odd = ["ns:{a}", "ns:%7Ba%7D", "ns:%7Ba}", "ns:{a%7D", "{ns}:a", "ns:a", "ns:{}", "ns:"]
    assert len({record_key(k) for k in odd}) == len(odd)
    for key in odd:
        mapped = record_key(key)
        assert mapped.count("{") == 1
        assert mapped.count("}") == 1
        assert mapped.endswith("}")


@pytest.mark.parametrize("bad", ["", None, 3])
def test_record_key_refuses_empty_and_non_string_keys(bad: Any) -> None:
    """An empty or non-str key is a configuration error, not a Redis call."""
    with pytest.raises(ConfigurationError, match="non-empty str"):
        record_key(bad)


def test_seconds_become_whole_milliseconds_rounded_up() -> None:
    """Leases and ttls are PEXPIRE milliseconds: rounded up, at least 1, no float noise."""
    assert _milliseconds(1.1, "ttl") == 1100
    assert _milliseconds(0.0015, "ttl") == 2
    assert _milliseconds(0.0000001, "ttl") == 1
    assert _milliseconds(4 * 3600, "ttl") == 14_400_000


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), True, "5"])
def test_non_positive_or_non_finite_durations_are_refused(bad: Any) -> None:
    """A lease or ttl that is not a positive finite number raises ConfigurationError."""
    with pytest.raises(ConfigurationError, match="lease must be a positive"):
        _milliseconds(bad, "lease")


def _stored(state: bytes, token: bytes, owner: bytes, fingerprint: bytes, payload: bytes) -> bytes:
    """A record value laid out as lua/claim.lua documents, built independently here."""
    lengths = struct.pack(">HHH", len(token), len(owner), len(fingerprint))
    return RECORD_FORMAT.encode() + state + lengths + token + owner + fingerprint + payload


def test_replies_parse_the_same_as_bytes_or_str() -> None:
    """The reply parsers accept bytes and str replies alike."""
    value = _stored(b"c", b"t", b"o", b"fp", "é".encode())
    expected = Record("k", State.COMPLETED, "t", "o", "fp", "é".encode(), 1.5)
    assert parse_record("k", [value, 1500]) == expected
    assert parse_record("k", [value.decode(), 1500]) == expected
    persistent = parse_record("k", [_stored(b"i", b"t", b"", b"", b""), -1])
    assert persistent is not None
    assert persistent.expires_in is None
    assert persistent.held_by("t")
    assert parse_value("k", _stored(b"f", b"t", b"", b"", b"\xff")).payload == b"\xff"
    assert parse_record("k", None) is None
    assert parse_flag("k", 1) is True
    assert parse_flag("k", 0) is False
    with pytest.raises(CorruptRecordError, match="'k'"):
        parse_flag("k", [b"corrupt", b"a Redis list value"])
    with pytest.raises(CorruptRecordError, match=r"'k'.*list"):
        parse_record("k", [b"corrupt", b"a Redis list value"])
    with pytest.raises(CorruptRecordError, match="unknown state"):
        parse_record("k", [_stored(b"x", b"t", b"", b"", b""), 5])
    with pytest.raises(CorruptRecordError, match="truncated"):
        parse_value("k", _stored(b"c", b"t", b"", b"", b"")[:-1])
    with pytest.raises(CorruptRecordError, match="format marker"):
        parse_value("k", b"idempotask/9" + _stored(b"c", b"t", b"", b"", b"")[12:])


def test_eviction_warning_covers_every_policy_but_noeviction() -> None:
    """allkeys-* and volatile-* policies warn (our keys all have a TTL); noeviction does not."""
    assert eviction_warning("s", ["noeviction"]) is None
    assert eviction_warning("s", []) is None
    for policy in ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-ttl"]:
        message = eviction_warning("s", [policy])
        assert message is not None
        assert policy in message
        assert "noeviction" in message


# -- construction ------------------------------------------------------------------------


def test_construction_never_connects_and_satisfies_the_protocols() -> None:
    """from_url on a port nobody listens on succeeds; nothing connects until the first call."""
    store = RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0")
    assert isinstance(store, Backend)
    assert isinstance(store, SupportsExpireNow)
    assert isinstance(store, SupportsScan)
    assert isinstance(store, ProvidesStores)
    assert store.connections.loop_count() == 0
    store.close()


@pytest.mark.parametrize(
    "url", ["redis://h:6379/0", "rediss://h:6380/1", "unix:///tmp/redis.sock?db=2"]
)
def test_registry_builds_a_redis_backend_for_each_scheme(url: str) -> None:
    """backend_from_url maps redis://, rediss:// and unix:// to RedisBackend."""
    assert isinstance(backend_from_url(url), RedisBackend)


def test_repr_and_messages_never_show_the_password() -> None:
    """The server description drops user:password from the URL."""
    store = RedisBackend.from_url("redis://user:s3cret@cache.example:6380/2")
    assert repr(store) == "RedisBackend('redis://cache.example:6380/2')"
    assert "s3cret" not in repr(store)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "pass url="),
        ({"url": "memory://"}, "redis://, rediss:// or unix://"),
        ({"url": "redis://h:notaport/0"}, "invalid URL"),
        ({"client": object()}, "client= must be"),
        ({"async_client": object()}, "async_client= must be"),
        ({"url": "redis://h", "client": redis.Redis()}, "not both"),
        ({"url": "redis://h", "retries": -1}, "retries"),
        ({"url": "redis://h", "socket_timeout": 0}, "socket_timeout"),
        ({"client": redis.asyncio.Redis(), "async_client": redis.asyncio.Redis()}, "asyncio"),
    ],
)
def test_bad_arguments_raise_configuration_error(kwargs: dict[str, Any], message: str) -> None:
    """Each bad constructor argument is a ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match=message):
        RedisBackend(**kwargs)


def test_clients_we_create_get_our_timeouts_and_bounded_retries(backend: RedisBackend) -> None:
    """Our own clients use a 5 s socket timeout, 2 s connect timeout and 2 quick retries."""
    backend.get(new_key())
    client = backend.connections.sync().client
    assert isinstance(client, redis.Redis)
    settings = client.connection_pool.connection_kwargs
    assert settings["socket_timeout"] == 5.0
    assert settings["socket_connect_timeout"] == 2.0
    retry = settings["retry"]
    # redis-py >= 6 reads the count with get_retries(); 5.x (our floor) keeps it as _retries.
    retries = retry.get_retries() if hasattr(retry, "get_retries") else retry._retries
    assert retries == 2


def test_url_query_options_override_our_defaults(redis_url: str) -> None:
    """A socket_timeout in the URL's query wins over the backend's default."""
    store = RedisBackend.from_url(redis_url + "?socket_timeout=9")
    try:
        store.get(new_key())
        client = store.connections.sync().client
        assert isinstance(client, redis.Redis)
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 9
    finally:
        store.close()


# -- record layout -----------------------------------------------------------------------


def test_a_record_is_one_marked_string_with_a_millisecond_ttl(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    """claim writes one marked string expiring with the lease; complete re-arms it with the ttl."""
    key, tok = new_key(), token()
    record = backend.claim(key, tok, lease=0.25, owner="task-1", fingerprint="fp")
    assert record.held_by(tok)
    assert record.expires_in == 0.25
    assert raw.type(record_key(key)) == b"string"
    assert raw.get(record_key(key)) == _stored(b"i", tok.encode(), b"task-1", b"fp", b"")
    assert 0 < raw.pttl(record_key(key)) <= 250
    assert backend.complete(key, tok, b"\x00result", ttl=3600.0005) is True
    assert 3_599_000 < raw.pttl(record_key(key)) <= 3_600_001
    assert raw.get(record_key(key)) == _stored(b"c", tok.encode(), b"task-1", b"fp", b"\x00result")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_servers_without_set_nx_get_are_served_by_the_claim_script(
    backend: RedisBackend, mode: str
) -> None:
    """Redis < 7.0 refuses NX with GET ("syntax error"); claims then run claim.lua instead.

    No such server runs here, so this forces the switch the refusal would make and checks
    that the script path keeps every claim outcome.
    """
    backend._set_get = False
    key, first, second = new_key(), token(), token()
    assert run(backend, mode, "claim", key, first, lease=30, owner="o", fingerprint="fp").held_by(
        first
    )
    held = run(backend, mode, "claim", key, second, lease=30)
    assert (held.state, held.token, held.fingerprint) == (State.IN_PROGRESS, first, "fp")
    retaken = run(backend, mode, "claim", key, second, lease=30, owner="o")
    assert retaken.held_by(second)
    assert retaken.fingerprint == "fp"
    assert run(backend, mode, "complete", key, second, b"r", ttl=30) is True
    done = run(backend, mode, "claim", key, token(), lease=30)
    assert (done.state, done.payload, done.token) == (State.COMPLETED, b"r", second)


def test_an_oversized_token_owner_or_fingerprint_is_refused(backend: RedisBackend) -> None:
    """Fields longer than a record can frame are a ConfigurationError naming the field."""
    huge = "x" * (MAX_FIELD_BYTES + 1)
    with pytest.raises(ConfigurationError, match="owner is 65536 bytes"):
        backend.claim(new_key(), token(), lease=30, owner=huge)
    with pytest.raises(ConfigurationError, match="token is 65536 bytes"):
        backend.complete(new_key(), huge, b"", ttl=30)


def test_a_short_lease_runs_out_and_the_key_is_taken_over(backend: RedisBackend) -> None:
    """A 50 ms lease is gone (by Redis's clock) soon after; a second claim then holds the key."""
    key, first, second = new_key(), token(), token()
    assert backend.claim(key, first, lease=0.05).held_by(first)
    deadline = time.monotonic() + 5
    while not backend.claim(key, second, lease=30).held_by(second):
        assert time.monotonic() < deadline, "a 50 ms lease was still held after 5 s"
        time.sleep(0.02)
    assert backend.complete(key, first, b"late", ttl=30) is False


# -- clients: decode_responses, sync/async pairs -----------------------------------------


async def test_decoding_clients_round_trip_arbitrary_bytes(redis_url: str) -> None:
    """Sync and async clients made with decode_responses=True still return exact bytes."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    aclient = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    store = RedisBackend(client, async_client=aclient)
    payload = bytes(range(256)) + b"\xc3\x28"
    try:
        key, tok = new_key(), token()
        assert store.claim(key, tok, lease=30, owner="ключ").held_by(tok)
        assert await store.acomplete(key, tok, payload, ttl=30)
        for record in (
            store.get(key),
            await store.aget(key),
            await store.aclaim(key, token(), lease=9),
        ):
            assert record is not None
            assert (record.payload, record.owner) == (payload, "ключ")
    finally:
        client.close()
        await aclient.aclose()


async def test_a_sync_client_alone_serves_async_callers_through_a_derived_client(
    redis_url: str,
) -> None:
    """Given only redis.Redis, async calls use a derived asyncio client to the same server."""
    client = redis.Redis.from_url(redis_url, socket_timeout=3)
    store = RedisBackend(client)
    try:
        key, tok = new_key(), token()
        assert store.claim(key, tok, lease=30).held_by(tok)
        assert await store.acomplete(key, tok, b"r", ttl=30)
        derived = (await store.connections.achannel()).client
        assert isinstance(derived, redis.asyncio.Redis)
        settings = derived.connection_pool.connection_kwargs
        assert settings["socket_timeout"] == 3
        assert settings["port"] == client.get_connection_kwargs()["port"]
    finally:
        await store.aclose()
        store.close()
        client.close()


async def test_an_async_client_alone_serves_sync_callers_through_a_derived_client(
    redis_url: str,
) -> None:
    """Given only redis.asyncio.Redis, sync calls use a derived sync client."""
    aclient = redis.asyncio.Redis.from_url(redis_url)
    store = RedisBackend(aclient)  # an asyncio client may be passed positionally too
    try:
        key, tok = new_key(), token()
        assert (await store.aclaim(key, tok, lease=30)).held_by(tok)
        assert store.complete(key, tok, b"r", ttl=30) is True
        derived: object = store.connections.sync().client
        assert isinstance(derived, redis.Redis), "a sync client of its own"
    finally:
        store.close()
        await aclient.aclose()


class _CustomConnection(redis.connection.Connection):
    """A connection class the backend cannot reproduce for asyncio (like Sentinel's)."""


async def test_an_underivable_client_names_the_missing_argument(redis_url: str) -> None:
    """A sync client with a custom connection class needs async_client= for async calls."""
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=_CustomConnection)
    client = redis.Redis(connection_pool=pool)
    store = RedisBackend(client)
    try:
        key, tok = new_key(), token()
        assert store.claim(key, tok, lease=30).held_by(tok)  # sync is fine
        with pytest.raises(ConfigurationError, match="pass async_client="):
            await store.aget(key)
    finally:
        client.close()


# -- NOSCRIPT ----------------------------------------------------------------------------


def test_scripts_are_reloaded_after_script_flush_sync(private_server: RedisServer) -> None:
    """After SCRIPT FLUSH the next call sends the script (EVAL) and succeeds."""
    store = RedisBackend.from_url(private_server.url)
    admin = redis.Redis.from_url(private_server.url)
    try:
        key, tok = new_key(), token()
        assert store.claim(key, tok, lease=30).held_by(tok)
        admin.script_flush()
        assert admin.script_exists(_sha("finish")) == [False]
        assert store.complete(key, tok, b"r", ttl=30) is True
        assert admin.script_exists(_sha("finish")) == [True], "EVAL caches it again"
        assert store.get(key) is not None
    finally:
        store.close()
        admin.close()


async def test_scripts_are_reloaded_after_script_flush_async(private_server: RedisServer) -> None:
    """The asyncio path recovers from NOSCRIPT the same way."""
    store = RedisBackend.from_url(private_server.url)
    admin = redis.Redis.from_url(private_server.url)
    try:
        key, tok = new_key(), token()
        assert (await store.aclaim(key, tok, lease=30)).held_by(tok)
        admin.script_flush()
        assert await store.acomplete(key, tok, b"r", ttl=30)
        assert (await store.aget(key)) is not None
        assert admin.script_exists(_sha("finish")) == [True]
    finally:
        await store.aclose()
        admin.close()


def _sha(name: str) -> str:
    return hashlib.sha1(SOURCES[name]).hexdigest()


# -- values that are not ours ------------------------------------------------------------

_FOREIGN = {
    "string": lambda r, k: r.set(k, "hello"),
    "list": lambda r, k: r.rpush(k, "a", "b"),
    "hash": lambda r, k: r.hset(k, mapping={"state": "completed", "token": "t"}),
    "hash-of-format-1": lambda r, k: r.hset(k, mapping={"fmt": "idempotask/1", "state": "i"}),
    "string-of-a-future-format": lambda r, k: r.set(k, "idempotask/9c\0\1\0\0\0\0t"),
}


def run(store: RedisBackend, mode: str, operation: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``operation`` through the sync method, or its async twin on a fresh loop."""
    if mode == "sync":
        return getattr(store, operation)(*args, **kwargs)

    async def call() -> Any:
        try:
            return await getattr(store, "a" + operation)(*args, **kwargs)
        finally:
            await store.aclose()

    return asyncio.run(call())


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("kind", _FOREIGN)
def test_a_foreign_value_under_our_key_is_a_corrupt_record_error(
    backend: RedisBackend, raw: redis.Redis, kind: str, mode: str
) -> None:
    """Every operation on a value we did not write raises CorruptRecordError naming the key."""
    key = new_key()
    _FOREIGN[kind](raw, record_key(key))
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("claim", (key, "t"), {"lease": 30}),
        ("get", (key,), {}),
        ("complete", (key, "t", b"r"), {"ttl": 30}),
        ("fail", (key, "t", b"e"), {"ttl": 30}),
        ("renew", (key, "t"), {"lease": 30}),
        ("delete", (key,), {"token": "t"}),
    ]
    for operation, args, kwargs in calls:
        with pytest.raises(CorruptRecordError, match=f"{key}.*not an idempotask record"):
            run(backend, mode, operation, *args, **kwargs)
    assert raw.exists(record_key(key)) == 1, "nothing was overwritten"
    assert run(backend, mode, "delete", key) is True, "delete without a token clears it"
    tok = token()
    assert run(backend, mode, "claim", key, tok, lease=30).held_by(tok)


def test_a_marked_string_with_an_unknown_state_is_corrupt(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    """Our marker with a state we never write is reported, not trusted."""
    key = new_key()
    raw.set(record_key(key), _stored(b"x", b"t", b"", b"", b""))
    with pytest.raises(CorruptRecordError, match="unknown state"):
        backend.claim(key, token(), lease=30)
    with pytest.raises(CorruptRecordError, match="unknown state"):
        backend.get(key)


def test_keys_with_braces_land_in_the_slot_of_their_per_record_part(
    backend: RedisBackend, raw: redis.Redis
) -> None:
    """A key with braces works and its Redis key keeps exactly one hash tag, ours."""
    key, tok = f"{NAMESPACE}:na{{me}}:1:d{uuid.uuid4().hex}", token()
    assert backend.claim(key, tok, lease=30).held_by(tok)
    mapped = record_key(key)
    assert raw.exists(mapped) == 1
    tag = mapped[mapped.index("{") + 1 : mapped.index("}")]
    assert key_slot(mapped.encode()) == key_slot(tag.encode())


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_redis_down_raises_backend_error_promptly(mode: str) -> None:
    """A killed server: BackendError naming the operation and address, cause chained, < 10 s."""
    require_binaries()
    server = RedisServer.start()
    store = RedisBackend.from_url(server.url)
    try:
        key, tok = new_key(), token()
        assert run(store, mode, "claim", key, tok, lease=30).held_by(tok)
        server.kill()
        started = time.monotonic()
        with pytest.raises(BackendError) as caught:
            run(store, mode, "complete", key, tok, b"r", ttl=30)
        assert time.monotonic() - started < 10
        assert not isinstance(caught.value, CorruptRecordError)
        message = str(caught.value)
        assert "complete" in message
        assert f"127.0.0.1:{server.port}" in message
        assert isinstance(caught.value.__cause__, redis.ConnectionError)

        # Back up on the same port: the same backend works again (an empty server).
        server.stop()
        server = RedisServer.start(port=server.port)
        assert run(store, mode, "claim", key, token(), lease=30).state is State.IN_PROGRESS
    finally:
        store.close()
        server.stop()


def test_a_hung_server_times_out_instead_of_hanging() -> None:
    """A stopped (SIGSTOP) server: the socket timeout ends the call with a BackendError."""
    require_binaries()
    server = RedisServer.start()
    store = RedisBackend.from_url(server.url, socket_timeout=0.3, retries=1)
    try:
        key, tok = new_key(), token()
        assert store.claim(key, tok, lease=30).held_by(tok)
        server.process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(BackendError, match="renew") as caught:
            store.renew(key, tok, lease=30)
        assert time.monotonic() - started < 5, "2 attempts x 0.3 s, plus a short backoff"
        assert isinstance(caught.value.__cause__, redis.TimeoutError)
    finally:
        server.process.send_signal(signal.SIGCONT)
        store.close()
        server.stop()


def test_a_dead_server_on_first_use_fails_promptly_too() -> None:
    """Nothing listening at all (first call, eviction check pending): BackendError, < 10 s."""
    store = RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(BackendError, match="claim"):
        store.claim(new_key(), token(), lease=30)
    assert time.monotonic() - started < 10
    assert not store.connections.policy_checked, "the eviction check is retried next call"


def test_a_redis_error_reply_becomes_backend_error(private_server: RedisServer) -> None:
    """An error reply (OOM under maxmemory) is a BackendError with the ResponseError as cause."""
    admin = redis.Redis.from_url(private_server.url)
    store = RedisBackend.from_url(private_server.url)
    try:
        store.get(new_key())  # connect and check the policy before memory runs out
        admin.config_set("maxmemory", 1)
        with pytest.raises(BackendError, match="claim") as caught:
            store.claim(new_key(), token(), lease=30)
        assert isinstance(caught.value.__cause__, redis.ResponseError)
        assert "maxmemory" in str(caught.value)
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        store.close()


# -- maxmemory-policy ------------------------------------------------------------------------


def _warnings_of(call: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_an_evicting_policy_warns_once_per_backend() -> None:
    """allkeys-lru: one RuntimeWarning on first use (sync or async), none after."""
    require_binaries()
    server = RedisServer.start("--maxmemory-policy", "allkeys-lru")
    store = RedisBackend.from_url(server.url)
    try:
        first = _warnings_of(lambda: store.claim(new_key(), token(), lease=30))
        assert len(first) == 1
        assert "allkeys-lru" in first[0]
        assert f":{server.port}" in first[0]
        later = _warnings_of(lambda: (store.get(new_key()), run(store, "async", "get", new_key())))
        assert later == []

        admin = redis.Redis.from_url(server.url)
        admin.config_set("maxmemory-policy", "volatile-lru")
        admin.close()
        fresh = RedisBackend.from_url(server.url)
        volatile = _warnings_of(lambda: run(fresh, "async", "get", new_key()))
        assert len(volatile) == 1
        assert "volatile-lru" in volatile[0]
        fresh.close()
    finally:
        store.close()
        server.stop()


def test_noeviction_or_an_opt_out_does_not_warn(private_server: RedisServer) -> None:
    """noeviction never warns; check_eviction_policy=False does not even ask."""
    store = RedisBackend.from_url(private_server.url)
    assert _warnings_of(lambda: store.get(new_key())) == []
    store.close()
    quiet = RedisBackend.from_url(private_server.url, check_eviction_policy=False)
    admin = redis.Redis.from_url(private_server.url)
    admin.config_resetstat()
    quiet.get(new_key())
    assert "cmdstat_config|get" not in admin.info("commandstats")
    quiet.close()
    admin.close()


def test_a_server_that_forbids_config_is_tolerated(caplog: pytest.LogCaptureFixture) -> None:
    """Without CONFIG (managed services) the check is skipped with a debug log."""
    require_binaries()
    server = RedisServer.start("--rename-command", "CONFIG", "")
    store = RedisBackend.from_url(server.url)
    try:
        with caplog.at_level(logging.DEBUG, logger="idempotask.backends.redis"):
            caught = _warnings_of(lambda: store.claim(new_key(), token(), lease=30))
        assert caught == []
        assert "cannot read maxmemory-policy" in caplog.text
        assert store.get(new_key()) is None
    finally:
        store.close()
        server.stop()


# -- concurrency -----------------------------------------------------------------------------


def test_sixteen_threads_racing_for_one_key_elect_exactly_one(backend: RedisBackend) -> None:
    """16 threads claim the same key at once: exactly one holds it, all see its token."""
    key = new_key()
    tokens = [token() for _ in range(16)]
    results: dict[str, Record] = {}
    barrier = threading.Barrier(len(tokens))

    def worker(tok: str) -> None:
        barrier.wait(timeout=30)
        results[tok] = backend.claim(key, tok, lease=30)

    threads = [threading.Thread(target=worker, args=(t,)) for t in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    winners = [t for t, r in results.items() if r.held_by(t)]
    assert len(results) == 16
    assert len(winners) == 1
    assert {r.token for r in results.values()} == set(winners)


async def test_fifty_tasks_racing_for_one_key_elect_exactly_one(abackend: RedisBackend) -> None:
    """50 asyncio tasks claim the same key at once: exactly one holds it."""
    key = new_key()
    tokens = [token() for _ in range(50)]
    records = await asyncio.gather(*(abackend.aclaim(key, t, lease=30) for t in tokens))
    winners = [t for t, r in zip(tokens, records, strict=True) if r.held_by(t)]
    assert len(winners) == 1
    assert {r.token for r in records} == set(winners)
    finished = await asyncio.gather(*(abackend.acomplete(key, t, b"r", ttl=30) for t in tokens))
    assert finished.count(True) == 1


# -- round trips ---------------------------------------------------------------------------


class _Wire:
    """Counts requests written by every redis-py connection, sync and asyncio, in this process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sends = 0
        sync_send: Any = redis.connection.Connection.send_packed_command
        async_send: Any = redis.asyncio.connection.Connection.send_packed_command

        def counting_send(conn: Any, *args: Any, **kwargs: Any) -> Any:
            self.sends += 1
            return sync_send(conn, *args, **kwargs)

        async def counting_asend(conn: Any, *args: Any, **kwargs: Any) -> Any:
            self.sends += 1
            return await async_send(conn, *args, **kwargs)

        monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting_send)
        monkeypatch.setattr(
            redis.asyncio.connection.Connection, "send_packed_command", counting_asend
        )

    def take(self) -> int:
        """Requests sent since the last take."""
        sends, self.sends = self.sends, 0
        return sends


def _evalsha_calls(admin: redis.Redis) -> int:
    stats = admin.info("commandstats")
    admin.config_resetstat()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_duplicate_is_one_round_trip_and_a_first_call_two(
    private_server: RedisServer, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted on the wire and on the server: first call = claim + complete, duplicate = one.

    A claim is a plain SET NX GET (no script); complete is the one script of a first call.
    """
    admin = redis.Redis.from_url(private_server.url)
    store = RedisBackend.from_url(private_server.url)
    key, tok = new_key(), token()
    wire = _Wire(monkeypatch)

    async def scenario() -> list[Any]:
        # Connect, greet and check the eviction policy first: those happen once per backend.
        await store.aget(new_key())
        admin.config_resetstat()
        wire.take()
        assert (await store.aclaim(key, tok, lease=30)).held_by(tok)
        assert await store.acomplete(key, tok, b"result", ttl=30)
        first = (wire.take(), _evalsha_calls(admin))
        wire.take()
        duplicate = await store.aclaim(key, token(), lease=30)
        again = (wire.take(), _evalsha_calls(admin))
        await store.aclose()
        return [first, again, duplicate]

    try:
        if mode == "sync":
            store.get(new_key())
            admin.config_resetstat()
            wire.take()
            assert store.claim(key, tok, lease=30).held_by(tok)
            assert store.complete(key, tok, b"result", ttl=30)
            first = (wire.take(), _evalsha_calls(admin))
            wire.take()
            duplicate = store.claim(key, token(), lease=30)
            again = (wire.take(), _evalsha_calls(admin))
        else:
            first, again, duplicate = asyncio.run(scenario())
        assert first == (2, 1), "first call: (requests sent, EVALSHA run on the server)"
        assert again == (1, 0), "duplicate: (requests sent, EVALSHA run on the server)"
        assert (duplicate.state, duplicate.payload) == (State.COMPLETED, b"result")
    finally:
        store.close()
        admin.close()


# -- instrumented clients ------------------------------------------------------------------


class _TracedRedis(redis.Redis):
    """A client whose execute_command is overridden, as a user's subclass may be."""

    seen: ClassVar[list[str]] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.seen.append(str(args[0]))
        return super().execute_command(*args, **options)


def test_a_subclass_with_its_own_execute_command_sees_every_command(redis_url: str) -> None:
    """Commands of a client that overrides execute_command go through it, claim included."""
    client = _TracedRedis.from_url(redis_url)
    store = RedisBackend(client, check_eviction_policy=False)
    key, tok = new_key(), token()
    _TracedRedis.seen = []
    try:
        assert store.claim(key, tok, lease=30).held_by(tok)
        assert store.complete(key, tok, b"r", ttl=30) is True
        assert store.get(key) is not None
    finally:
        client.close()
    assert _TracedRedis.seen == ["SET", "EVALSHA", "EVALSHA"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_wrapped_execute_command_sees_every_command(
    redis_url: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instrumentation (OpenTelemetry, ddtrace) wraps Redis.execute_command on the class;
    a backend built afterwards sends every command through the wrapper."""
    seen: ClassVar[list[str]] = []
    cls: Any = redis.Redis if mode == "sync" else redis.asyncio.Redis
    original = cls.execute_command
    if mode == "sync":

        def traced(self: Any, *args: Any, **options: Any) -> Any:
            seen.append(str(args[0]))
            return original(self, *args, **options)

    else:

        async def traced(self: Any, *args: Any, **options: Any) -> Any:  # type: ignore[misc]
            seen.append(str(args[0]))
            return await original(self, *args, **options)

    monkeypatch.setattr(cls, "execute_command", traced)
    store = RedisBackend.from_url(redis_url, check_eviction_policy=False)
    key, tok = new_key(), token()
    assert run(store, mode, "claim", key, tok, lease=30).held_by(tok)
    assert run(store, mode, "complete", key, tok, b"r", ttl=30) is True
    store.close()
    assert seen == ["SET", "EVALSHA"]


# -- connections ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_pooled_connections_survive_a_server_restart(mode: str) -> None:
    """A restarted server breaks every pooled connection; the next call retries on a fresh
    one (redis-py's retry policy, as we configured it) and succeeds instead of failing."""
    require_binaries()
    servers = [RedisServer.start("--maxmemory-policy", "noeviction")]
    store = RedisBackend.from_url(servers[0].url)

    def restart() -> None:
        old = servers[0]
        old.kill()
        servers.append(RedisServer.start(port=old.port, directory=old.directory))

    async def scenario() -> list[bool]:
        tok = token()
        results = [(await store.aclaim(new_key(), tok, lease=30)).held_by(tok)]
        restart()
        results.append((await store.aclaim(new_key(), tok, lease=30)).held_by(tok))
        results.append(await store.acomplete(new_key(), tok, b"r", ttl=30) is False)
        await store.aclose()
        return results

    try:
        if mode == "sync":
            tok = token()
            results = [store.claim(new_key(), tok, lease=30).held_by(tok)]
            restart()
            results.append(store.claim(new_key(), tok, lease=30).held_by(tok))
            results.append(store.complete(new_key(), tok, b"r", ttl=30) is False)
        else:
            results = asyncio.run(scenario())
        assert results == [True, True, True]
    finally:
        store.close()
        for server in reversed(servers):
            server.stop()


# -- library keys, listing, size bounds --------------------------------------------------------


def test_library_key_reverses_record_key() -> None:
    """The Redis key of a record maps back to its library key; other shapes map to None."""
    for key in ["ns:billing.charge:1:ab12", "ns:{a}:1:%7B", "n{s}:x", "plain", "ns:"]:
        assert library_key(record_key(key)) == key
        assert library_key(record_key(key).encode()) == key
    for other in ["ns:{a}:letter:1", "ns:x", "a:b:{c}", "{a}{b}", b"\xff{x}"]:
        assert library_key(other) is None


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_scan_lists_records_by_library_key_prefix(
    backend: RedisBackend, raw: redis.Redis, mode: str
) -> None:
    """scan(prefix) finds the live records under a prefix, returns their library keys (which
    get and delete accept), honours limit, and leaves out values that are not records."""
    ns = f"{NAMESPACE}scan{uuid.uuid4().hex[:6]}"
    keys = {f"{ns}:fa:1:{i}" for i in range(7)} | {f"{ns}:fb:1:{i}" for i in range(3)}
    for key in keys:
        tok = token()
        assert backend.claim(key, tok, lease=30).held_by(tok)
        assert backend.complete(key, tok, key.encode(), ttl=60)
    raw.set(record_key(f"{ns}:fa:1:foreign"), "not ours")
    raw.hset(record_key(f"{ns}:fa:1:hash"), mapping={"a": "b"})
    raw.set(f"{ns}:fa:1:untagged", "not a record key")

    everything = run(backend, mode, "scan", f"{ns}:", limit=100)
    assert {r.key for r in everything} == keys
    assert all(r.payload == r.key.encode() and r.state is State.COMPLETED for r in everything)
    assert all(r.expires_in is not None and 0 < r.expires_in <= 60 for r in everything)
    only_fa = run(backend, mode, "scan", f"{ns}:fa:", limit=100)
    assert {r.key for r in only_fa} == {k for k in keys if ":fa:" in k}
    assert len(run(backend, mode, "scan", f"{ns}:", limit=4)) == 4
    assert run(backend, mode, "scan", f"{ns}:", limit=0) == []
    assert run(backend, mode, "scan", f"{ns}:nothing", limit=10) == []
    listed = everything[0].key
    fetched = run(backend, mode, "get", listed)
    assert fetched is not None
    assert (fetched.key, fetched.payload) == (listed, everything[0].payload)
    assert run(backend, mode, "delete", listed) is True
    assert run(backend, mode, "get", listed) is None


def test_scan_escapes_glob_characters_in_the_prefix(backend: RedisBackend) -> None:
    """A prefix with * ? [ ] is matched literally, never as a pattern."""
    ns = f"{NAMESPACE}glob{uuid.uuid4().hex[:6]}"
    for name in ["a*b", "axb", "a?b", "a[x]b"]:
        tok = token()
        backend.claim(f"{ns}:{name}:1:d", tok, lease=30)
    assert [r.key for r in backend.scan(f"{ns}:a*b")] == [f"{ns}:a*b:1:d"]
    assert [r.key for r in backend.scan(f"{ns}:a[x]")] == [f"{ns}:a[x]b:1:d"]
    assert len(backend.scan(f"{ns}:a")) == 4


async def test_scan_works_through_a_decoding_client(redis_url: str) -> None:
    """A decode_responses=True client's scan returns the records' exact bytes too."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    store = RedisBackend(async_client=client)
    ns = f"{NAMESPACE}dscan{uuid.uuid4().hex[:6]}"
    try:
        tok = token()
        assert (await store.aclaim(f"{ns}:f:1:d", tok, lease=30)).held_by(tok)
        assert await store.acomplete(f"{ns}:f:1:d", tok, b"\xff\xfe", ttl=30)
        (record,) = await store.ascan(f"{ns}:")
        assert (record.key, record.payload) == (f"{ns}:f:1:d", b"\xff\xfe")
    finally:
        await client.aclose()


def test_scan_walks_every_master_of_a_cluster(cluster_client: redis.cluster.RedisCluster) -> None:
    """On a cluster, scan finds records on all three masters."""
    store = RedisBackend(cluster_client)
    ns = f"{NAMESPACE}cscan{uuid.uuid4().hex[:6]}"
    keys = {f"{ns}:spread{i}:1:d" for i in range(30)}
    for key in keys:
        store.claim(key, token(), lease=30)
    owners = {cluster_client.get_node_from_key(record_key(k)).name for k in keys}
    assert len(owners) == 3
    assert {r.key for r in store.scan(f"{ns}:", limit=100)} == keys
    assert {r.key for r in run(store, "async", "scan", f"{ns}:", limit=100)} == keys


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_value_over_max_record_bytes_is_refused_before_it_is_parsed(
    redis_url: str, raw: redis.Redis, mode: str
) -> None:
    """A stored value over max_record_bytes (here one of ours, 8 KiB) is a
    CorruptRecordError naming the key, on claim (SET NX GET) and get alike."""
    store = RedisBackend.from_url(redis_url, max_record_bytes=4096)
    key = new_key()
    raw.set(record_key(key), _stored(b"c", b"t", b"", b"", b"x" * 8192), px=30_000)
    try:
        for operation, args, kwargs in [
            ("claim", (key, token()), {"lease": 30}),
            ("get", (key,), {}),
        ]:
            with pytest.raises(CorruptRecordError, match=f"{key}.*over max_record_bytes=4,096"):
                run(store, mode, operation, *args, **kwargs)
        # The same value is fine under the default bound.
        assert RedisBackend.from_url(redis_url).get(key) is not None
    finally:
        store.close()


def test_a_result_over_max_record_bytes_is_not_written(redis_url: str, raw: redis.Redis) -> None:
    """complete() with a payload no read would accept raises BackendError and writes nothing."""
    store = RedisBackend.from_url(redis_url, max_record_bytes=4096)
    key, tok = new_key(), token()
    try:
        assert store.claim(key, tok, lease=30).held_by(tok)
        with pytest.raises(BackendError, match="max_record_bytes=4,096"):
            store.complete(key, tok, b"x" * 5000, ttl=30)
        record = store.get(key)
        assert record is not None
        assert record.state is State.IN_PROGRESS
    finally:
        store.close()


@pytest.mark.parametrize("bad", [0, 1023, True, "16MB"])
def test_max_record_bytes_must_be_an_int_of_at_least_a_kib(bad: Any) -> None:
    """max_record_bytes below 1024 or not an int is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="max_record_bytes"):
        RedisBackend.from_url("redis://h", max_record_bytes=bad)

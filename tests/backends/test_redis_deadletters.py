"""RedisDeadLetterStore: the shared dead-letter contract (one server, tiny scan steps,
Cluster), then what is Redis-specific: key layout, foreign values, outages and the spool,
and the processor end to end on Redis.

The shared server is ``IDEMPOTASK_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); when
it is unreachable these tests skip, or fail under ``IDEMPOTASK_REQUIRE_SERVICES=1``. Every
key they write starts with this run's ``PREFIX`` and is deleted at the end. Tests that kill
a server or need a cluster start their own ``redis-server`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
from redis.crc import key_slot

import idempotask
import idempotask.backends.redis._deadletters as dlq_module
from idempotask import DeadLetterQueue, Status, dead_letter, idempotent
from idempotask.backends.base import Action
from idempotask.backends.deadletters import (
    OPEN_STATUSES,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStore,
    dead_letter_store_from_url,
)
from idempotask.backends.redis import (
    DEAD_LETTER_FORMAT,
    RedisBackend,
    RedisDeadLetterStore,
    filter_json,
    letter_fields,
    parse_dead_letter,
)
from idempotask.errors import BackendError, ConfigurationError, CorruptRecordError
from idempotask.flow import Op
from idempotask.retry import FixedDelay, RetryPolicy
from idempotask.taxonomy import FailureKind
from idempotask.testing import DeadLetterStoreContract
from idempotask.testing.deadletters import (
    T0,
    AsyncDeadLetterView,
    DeadLetterView,
    open_dead_letter_view,
)
from tests.conftest import service_url

from ._redis_servers import RedisCluster3, RedisServer, free_port, have_redis_binaries

pytestmark = pytest.mark.redis

# Unique per test run, so parallel sessions on one server never share a key.
PREFIX = f"dlqtest-{uuid.uuid4().hex[:12]}"
FAST: dict[FailureKind | str, RetryPolicy] = {FailureKind.TRANSIENT: RetryPolicy(2, FixedDelay(60))}


class GatewayTimeout(TimeoutError):
    """A transient failure with a qualified name of its own."""


def _unavailable(reason: str) -> None:
    if os.environ.get("IDEMPOTASK_REQUIRE_SERVICES") == "1":
        pytest.fail(f"IDEMPOTASK_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


def require_binaries() -> None:
    """Skip (or fail) when redis-server / redis-cli are not on PATH."""
    if not have_redis_binaries():
        _unavailable("redis-server and redis-cli are not on PATH")


def delete_keys(url: str, pattern: str) -> None:
    """Delete every key matching ``pattern`` on the server at ``url``."""
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)
    finally:
        client.close()


def with_prefix(url: str, prefix: str) -> str:
    """``url`` with the store's ``prefix`` query option added."""
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


def fresh_prefix() -> str:
    """A queue name of its own under this run's PREFIX."""
    return f"{PREFIX}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """The shared server; every key this module made is removed at the end."""
    url = service_url("redis")
    yield url
    delete_keys(url, f"{PREFIX}*")


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisDeadLetterStore]:
    """A store on the shared server with a queue of its own, closed afterwards."""
    dl_store = RedisDeadLetterStore(redis_url, prefix=fresh_prefix())
    yield dl_store
    dl_store.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client on the shared server, to look at and plant raw values."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def letter(id: str = "", **fields: Any) -> DeadLetter:
    """A complete letter with a fresh id; ``fields`` override the defaults."""
    values: dict[str, Any] = {
        "function": "billing.charge",
        "kind": "transient",
        "error_type": "builtins.ConnectionError",
        "message": "connection refused",
        "traceback": "Traceback (most recent call last):\n  ...\n",
        "arguments": b'{"order": 7}',
        "first_failed_at": T0,
        "last_failed_at": T0,
        "next_retry_at": T0 + 60,
    }
    values.update(fields)
    return DeadLetter(id=id or uuid.uuid4().hex[:10], **values)


@contextlib.contextmanager
def redis_store_for_processes() -> Iterator[Callable[[], DeadLetterStore]]:
    """A fresh queue on the shared server, reached by URL from any (forked) process.

    tests/test_deadletter.py runs its two-processor test on it (``CROSS_PROCESS_STORES``);
    the queue's keys are deleted afterwards.
    """
    url = service_url("redis")
    prefix = f"dlqproc-{uuid.uuid4().hex[:12]}"
    try:
        yield lambda: dead_letter_store_from_url(with_prefix(url, prefix))
    finally:
        delete_keys(url, f"{prefix}*")


# -- the shared contract -------------------------------------------------------------------


class RedisContract(DeadLetterStoreContract):
    """The contract, closing the asyncio client each async view's event loop used."""

    @pytest.fixture(params=["sync", "async"])
    def dl(
        self, request: pytest.FixtureRequest, dead_letter_store: RedisDeadLetterStore
    ) -> Iterator[DeadLetterView]:
        """The store under test through its sync or its async methods."""
        view = open_dead_letter_view(dead_letter_store, request.param)
        try:
            yield view
        finally:
            if isinstance(view, AsyncDeadLetterView) and not view.loop.is_closed():
                view.loop.run_until_complete(dead_letter_store.aclose())
            view.close()


class TestRedisDeadLetterContract(RedisContract):
    """The conformance suite, sync and async, on the shared server."""

    @pytest.fixture
    def dead_letter_store(self, redis_url: str) -> Iterator[RedisDeadLetterStore]:
        dl_store = RedisDeadLetterStore(redis_url, prefix=PREFIX)
        yield dl_store
        dl_store.close()


class TestRedisDeadLetterContractInTinySteps(RedisContract):
    """The suite again with every walk cut into calls of two index entries, so cursors,
    offsets and ties carry across calls everywhere."""

    real_time_tests = False

    @pytest.fixture
    def dead_letter_store(
        self, redis_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[RedisDeadLetterStore]:
        monkeypatch.setattr(dlq_module, "SCAN_BUDGET", 2)
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        yield RedisDeadLetterStore(client, prefix=PREFIX)
        client.close()


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


class TestRedisClusterDeadLetterContract(RedisContract):
    """The conformance suite, sync and async, on a 3-master cluster (async client derived)."""

    real_time_tests = False  # the clock test runs on the single server above

    @pytest.fixture
    def dead_letter_store(self, cluster_client: redis.cluster.RedisCluster) -> RedisDeadLetterStore:
        return RedisDeadLetterStore(cluster_client, prefix=PREFIX)


def test_a_queue_lives_in_one_cluster_slot_and_queues_spread(
    cluster_client: redis.cluster.RedisCluster,
) -> None:
    """Every key of a queue shares its hash tag's slot; different prefixes hash apart."""
    stores = [RedisDeadLetterStore(cluster_client, prefix=f"q{i}") for i in range(8)]
    for dl_store in stores:
        dl_store.add(letter("a", next_retry_at=T0))
        assert dl_store.claim_due(T0 + 1)
        keys: list[bytes] = list(cluster_client.scan_iter(match=f"{dl_store.base_key}*"))
        assert len(keys) == 3, keys  # the letter, by_time and claims (due is empty now)
        assert {key_slot(key) for key in keys} == {key_slot(dl_store.base_key.encode())}
        dl_store.purge(DeadLetterFilter())
    assert len({key_slot(s.letter_key("a").encode()) for s in stores}) > 1


# -- layout and encoding -------------------------------------------------------------------


def test_a_letter_is_one_hash_plus_sorted_set_entries_under_one_hash_tag(
    store: RedisDeadLetterStore, raw: redis.Redis
) -> None:
    """The documented layout: letter hash, by_time (-t), due (next retry), claims (ms)."""
    added = store.add(letter("a1", last_failed_at=T0 + 0.25, next_retry_at=T0 + 60.5))
    base = f"{store.prefix}:{{{store.prefix}:dlq}}"
    assert store.letter_key("a1") == f"{base}:letter:a1"
    stored = raw.hgetall(f"{base}:letter:a1")
    assert stored[b"fmt"] == DEAD_LETTER_FORMAT.encode()
    assert stored[b"last_failed_at"] == b"1700000000.25"
    assert stored[b"arguments"] == added.arguments
    assert raw.zscore(f"{base}:by_time", "a1") == -(T0 + 0.25)
    assert raw.zscore(f"{base}:due", "a1") == T0 + 60.5
    keys: list[bytes] = raw.keys(f"{base}*")  # type: ignore[assignment]
    assert {key_slot(k) for k in keys} == {key_slot(base.encode())}

    before_ms = time.time() * 1000
    (claimed,) = store.claim_due(T0 + 100, lease=30)
    expiry = raw.zscore(f"{base}:claims", "a1")
    assert expiry is not None
    assert before_ms + 25_000 < expiry < time.time() * 1000 + 35_000
    assert raw.zscore(f"{base}:due", "a1") is None, "a held letter leaves the due index"
    done = store.update("a1", claimed.version, status=Status.RESOLVED, resolution="retry")
    assert done is not None
    assert raw.zscore(f"{base}:claims", "a1") is None
    assert raw.zscore(f"{base}:due", "a1") is None, "closed letters are never due"


def test_times_round_trip_exactly_and_odd_text_survives(store: RedisDeadLetterStore) -> None:
    """Shortest-repr floats come back bit for bit; lone surrogates and NULs survive too."""
    odd = letter(
        "odd \x00 {brace} 💳",
        message="bad file name \udcff",
        first_failed_at=0.1 + 0.2,
        last_failed_at=1_700_000_000.123456789,
        next_retry_at=2**52 + 0.5,
    )
    store.add(odd)
    assert store.get(odd.id) == odd


def test_pure_encoding_round_trips_and_filters_are_json() -> None:
    """letter_fields and parse_dead_letter are inverses; filter_json leaves empty fields out."""
    original = letter("x", critical=True, status=Status.RETRYING, next_retry_at=None)
    assert parse_dead_letter("k", letter_fields(original)) == original
    as_text = [value.decode("latin-1") for value in letter_fields(original)]
    assert parse_dead_letter("k", as_text) == original  # a client that decoded replies
    assert filter_json(None) == b"{}"
    assert filter_json(DeadLetterFilter(status=(Status.PENDING,), until=2.0)) == (
        b'{"status": ["pending"], "until": 2.0}'
    )


def test_the_scripts_open_statuses_are_the_protocols() -> None:
    """The Lua scripts hard-code 'pending' and 'retrying' as the open statuses."""
    assert {status.value for status in OPEN_STATUSES} == {"pending", "retrying"}


def test_single_letter_operations_are_one_round_trip_each(
    store: RedisDeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """add, get, update, expire_claim, an unfiltered claim and a time-only query: one call."""
    calls: list[str] = []
    connections = store.backend.connections
    run = connections.run

    def counting(operation: str, *args: Any) -> Any:
        calls.append(operation)
        return run(operation, *args)

    monkeypatch.setattr(connections, "run", counting)
    added = store.add(letter("rt", next_retry_at=T0))
    store.get(added.id)
    (claimed,) = store.claim_due(T0 + 1)
    store.expire_claim(added.id)
    store.update(added.id, claimed.version, attempts=2)
    store.query(DeadLetterFilter(since=T0 - 1), offset=0)
    assert len(calls) == 6, calls


def test_bad_arguments_raise_configuration_error_and_write_nothing(
    store: RedisDeadLetterStore,
) -> None:
    """Non-finite times, non-int versions and bad prefixes are refused before any write."""
    with pytest.raises(ConfigurationError, match="next_retry_at"):
        store.add(letter("nan", next_retry_at=float("nan")))
    assert store.get("nan") is None
    added = store.add(letter("ok"))
    with pytest.raises(ConfigurationError, match="version"):
        store.update(added.id, "0", attempts=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="function"):
        store.update(added.id, added.version, function="other")
    with pytest.raises(ConfigurationError, match="offset"):
        store.query(offset=-1)
    with pytest.raises(ConfigurationError, match="lease"):
        store.claim_due(T0, lease=0)
    with pytest.raises(ConfigurationError, match="arguments"):
        store.add(letter("five", arguments=5))  # it used to store five NUL bytes
    assert store.get("five") is None
    for prefix in ("", "a:b", "{x}", "a b"):
        with pytest.raises(ConfigurationError, match="namespace"):
            RedisDeadLetterStore("redis://localhost", prefix=prefix)
        with pytest.raises(ConfigurationError, match="namespace"):
            RedisDeadLetterStore("redis://localhost", namespace=prefix)
    with pytest.raises(ConfigurationError, match="RedisBackend"):
        RedisDeadLetterStore(42)  # type: ignore[arg-type]


# -- URLs and construction -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["redis://localhost:6379/0", "rediss://user:pw@cache:6380/2", "unix:///tmp/redis.sock"],
)
def test_every_redis_scheme_builds_a_redis_dead_letter_store(url: str) -> None:
    """redis://, rediss:// and unix:// URLs build the store without connecting."""
    built = dead_letter_store_from_url(url)
    assert isinstance(built, RedisDeadLetterStore)
    assert isinstance(built, DeadLetterStore)
    assert built.prefix == "idempotask"
    assert "pw" not in repr(built)


def test_the_prefix_option_is_taken_out_of_the_url_and_the_rest_kept() -> None:
    """?prefix= names the queue; redis-py options stay and still apply."""
    built = RedisDeadLetterStore.from_url(
        "redis://localhost:6379/3?socket_timeout=0.5&prefix=billing"
    )
    assert built.prefix == "billing"
    assert built.letter_key("7") == "billing:{billing:dlq}:letter:7"
    assert built.backend.connections.url == "redis://localhost:6379/3?socket_timeout=0.5"
    queue = DeadLetterQueue("redis://localhost:6379/0?prefix=ops")
    assert isinstance(queue.store, RedisDeadLetterStore)
    assert queue.store.prefix == "ops"


def test_the_default_store_follows_a_redis_backend_url(redis_url: str) -> None:
    """configure(backend="redis://...") puts dead letters on that Redis too."""
    idempotask.configure(backend=redis_url)
    default = idempotask.default_queue().store
    assert isinstance(default, RedisDeadLetterStore)
    assert default.prefix == "idempotask"
    idempotask.configure(dead_letter_store=with_prefix(redis_url, PREFIX))
    configured = idempotask.default_queue().store
    assert isinstance(configured, RedisDeadLetterStore)
    assert configured.prefix == PREFIX


def test_a_store_shares_a_given_backend_and_closes_only_its_own(redis_url: str) -> None:
    """Given a RedisBackend, the store uses its connections and leaves them open."""
    backend = RedisBackend.from_url(redis_url)
    shared = RedisDeadLetterStore(backend, prefix=fresh_prefix())
    shared.add(letter("s"))
    shared.close()
    assert shared.get("s") is not None, "the backend's client stays open"
    shared.purge(DeadLetterFilter())
    backend.close()


# -- foreign values, stale entries, resent commands ---------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_foreign_value_under_a_letter_key_is_a_corrupt_record_error(
    store: RedisDeadLetterStore, raw: redis.Redis, mode: str
) -> None:
    """A string, or a hash without our marker, at a letter's key: CorruptRecordError."""
    raw.set(store.letter_key("str"), "not ours")
    raw.hset(store.letter_key("hash"), mapping={"state": "x"})

    def call(name: str, *args: Any, **kwargs: Any) -> Any:
        if mode == "sync":
            return getattr(store, name)(*args, **kwargs)

        async def run() -> Any:
            try:
                return await getattr(store, "a" + name)(*args, **kwargs)
            finally:
                await store.aclose()

        return asyncio.run(run())

    for id in ("str", "hash"):
        for name, args in [("get", (id,)), ("add", (letter(id),)), ("update", (id, 0))]:
            with pytest.raises(CorruptRecordError, match="not an idempotask dead letter"):
                call(name, *args)
    # An index naming the foreign key makes a walk stop with the same error, unharmed.
    raw.zadd(store.base_key + ":by_time", {"hash": -T0})
    with pytest.raises(CorruptRecordError, match=r"letter:hash"):
        call("query")
    assert raw.hgetall(store.letter_key("hash")) == {b"state": b"x"}


def test_index_entries_of_deleted_letters_are_passed_over_and_cleaned(
    store: RedisDeadLetterStore, raw: redis.Redis
) -> None:
    """A letter hash deleted by hand: query skips it, claim and purge drop its entries."""
    for id in ("a", "b", "c"):
        store.add(letter(id, next_retry_at=T0))
    raw.delete(store.letter_key("b"))
    assert [x.id for x in store.query()] == ["a", "c"]
    assert [x.id for x in store.claim_due(T0 + 1)] == ["a", "c"]
    assert store.purge(DeadLetterFilter()) == 2
    assert raw.keys(store.base_key + "*") == []


def test_a_resent_update_recognises_its_own_write(store: RedisDeadLetterStore) -> None:
    """redis-py resends a command whose reply timed out: the second run returns the letter."""
    added = store.add(letter("resend"))
    flow = store._update(added.id, added.version, attempts=2)
    op = next(flow)
    op.fn(*op.args, **op.kwargs)  # the reply "was lost"
    again = op.fn(*op.args, **op.kwargs)
    with pytest.raises(StopIteration) as stop:
        flow.send(again)
    updated = stop.value.value
    assert (updated.attempts, updated.version) == (2, added.version + 1)
    assert store.update(added.id, added.version, attempts=3) is None, "others still lose"


def finish_by_hand(store: RedisDeadLetterStore, flow: Any, reply: Any) -> Any:
    """Drive a store's flow to its end, sending ``reply`` first; its return value."""
    try:
        while True:
            op: Op = flow.send(reply)
            reply = op.fn(*op.args, **op.kwargs)
    except StopIteration as stop:
        return stop.value


def test_a_walk_continues_when_its_cursor_letter_goes_between_calls(
    store: RedisDeadLetterStore, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tied scores, steps of two, the cursor's letter leaves the index mid-walk: the walk
    goes on after it, missing nothing and returning nothing twice."""
    monkeypatch.setattr(dlq_module, "SCAN_BUDGET", 2)
    for id in ("a", "b", "c", "d", "e", "f"):
        store.add(letter(id, function="fx" if id in "bdf" else "fy"))
    wanted = DeadLetterFilter(function=("fx",))
    flow = store._query(wanted, limit=100, offset=0)
    op = next(flow)
    reply = op.fn(*op.args, **op.kwargs)
    assert reply[3] == b"b", "the first step walked a and b and stopped at b"
    raw.zrem(f"{store.base_key}:by_time", "b")  # as a concurrent purge would
    assert [x.id for x in finish_by_hand(store, flow, reply)] == ["b", "d", "f"]
    assert [x.id for x in store.query(wanted, offset=1)] == ["f"]


def test_big_walks_take_several_calls_and_still_count_everything(
    store: RedisDeadLetterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stats, claims and purges over more letters than one call examines add up."""
    monkeypatch.setattr(dlq_module, "SCAN_BUDGET", 7)
    for i in range(40):
        store.add(letter(f"l{i:02d}", function=f"f{i % 3}", next_retry_at=T0 + i))
    rows = store.stats()
    assert sum(row.count for row in rows) == 40
    assert {row.function: row.count for row in rows} == {"f0": 14, "f1": 13, "f2": 13}
    only = DeadLetterFilter(function=("f2",))
    claimed = store.claim_due(T0 + 100, limit=100, filter=only)
    assert [x.id for x in claimed] == [f"l{i:02d}" for i in range(2, 40, 3)]
    assert store.purge(DeadLetterFilter(function=("f0", "f1"))) == 27
    assert len(store.query(limit=100)) == 13


# -- outages --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_redis_down_raises_backend_error_promptly(mode: str) -> None:
    """Nothing listening: BackendError naming the operation and address, within seconds."""
    port = free_port()
    dl_store = RedisDeadLetterStore(f"redis://127.0.0.1:{port}/0")
    started = time.monotonic()

    def add() -> Any:
        return dl_store.add(letter()) if mode == "sync" else asyncio.run(dl_store.aadd(letter()))

    with pytest.raises(BackendError, match=f"dead-letter add.*127.0.0.1:{port}") as caught:
        add()
    assert not isinstance(caught.value, CorruptRecordError)
    assert time.monotonic() - started < 10


def test_store_down_at_failure_time_spools_and_delivers_after_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis killed: the failure is spooled, the caller gets its own exception; Redis back
    on the same port: flush_spool delivers it, complete, exactly once."""
    require_binaries()
    server = RedisServer.start("--maxmemory-policy", "noeviction")
    dl_store = RedisDeadLetterStore(server.url, prefix="spooltest")
    clock_now = [T0]
    queue = DeadLetterQueue(
        dl_store, policies=FAST, spool=tmp_path / "spool.jsonl", clock=lambda: clock_now[0]
    )
    try:

        @dead_letter(queue=queue, name="tests.redis.spooled_charge", critical=True)
        @idempotent
        def charge(order: int, note: str = "n") -> None:
            raise GatewayTimeout(f"gateway timed out for {order}")

        server.kill()
        with pytest.raises(GatewayTimeout, match="gateway timed out for 7"):
            charge(7)
        (spooled,) = queue.spool.letters()
        assert "spooled" in caplog.text

        server.stop()
        server = RedisServer.start("--maxmemory-policy", "noeviction", port=server.port)
        assert queue.flush_spool() == 1
        assert not queue.spool.pending()
        (stored,) = queue.query(limit=10)
        # The spool reads a letter's history back as a list (its JSON); stores keep tuples.
        assert stored == spooled.evolve(history=tuple(spooled.history))
        assert stored.function == "tests.redis.spooled_charge"
        assert (stored.kind, stored.status, stored.attempts) == ("transient", Status.PENDING, 1)
        assert stored.error_type.endswith("GatewayTimeout")
        assert stored.message == "gateway timed out for 7"
        assert "Traceback (most recent call last)" in stored.traceback
        assert b'"order"' in stored.arguments
        assert stored.key == charge.__wrapped__.key_for(7)  # type: ignore[attr-defined]
        assert stored.first_failed_at == stored.last_failed_at == T0
        assert stored.next_retry_at == T0 + 60
        assert (stored.route, stored.critical, stored.resolution) == ("", True, "")

        queue.spool.append(spooled)  # a crash after delivery: delivered again, no duplicate
        assert queue.flush_spool() == 1
        assert len(queue.query(limit=10)) == 1
    finally:
        dl_store.close()
        server.stop()


# -- the processor on Redis -----------------------------------------------------------------


@pytest.fixture
def redis_queue(redis_url: str, store: RedisDeadLetterStore, tmp_path: Path) -> DeadLetterQueue:
    """A queue on Redis whose clock says T0; idempotency keys on Redis as well."""
    idempotask.configure(backend=redis_url, namespace=f"{PREFIX}-keys")
    return DeadLetterQueue(store, policies=FAST, spool=tmp_path / "q.jsonl", clock=lambda: T0)


def test_a_permanently_failing_call_ends_abandoned_after_its_policy(
    redis_queue: DeadLetterQueue,
) -> None:
    """Two retries 60 s apart, each failing: RETRYING, then ABANDONED with three runs."""
    queue = redis_queue
    runs: list[int] = []
    exhausted: list[DeadLetter] = []
    order = uuid.uuid4().int % 10**9

    @dead_letter(queue=queue, name="tests.redis.flaky", on_retry_exhausted=exhausted.append)
    @idempotent
    def flaky(n: int) -> None:
        runs.append(n)
        raise GatewayTimeout(f"try {len(runs)}")

    with pytest.raises(GatewayTimeout):
        flaky(order)
    (first,) = queue.query()
    assert queue.process_due(now=T0 + 59).claimed == 0
    assert queue.process_due(now=T0 + 60).failed == [first.id]
    (second,) = queue.query()
    assert (second.attempts, second.status, second.next_retry_at) == (
        2,
        Status.RETRYING,
        T0 + 120,
    )
    assert queue.process_due(now=T0 + 120).abandoned == [first.id]
    (final,) = queue.query()
    assert (final.attempts, final.status, final.next_retry_at) == (3, Status.ABANDONED, None)
    assert [x.id for x in exhausted] == [first.id]
    assert runs == [order] * 3
    assert queue.process_due(now=T0 + 10**7).claimed == 0


def test_a_replay_of_a_call_that_completed_meanwhile_is_resolved_without_running(
    redis_queue: DeadLetterQueue,
) -> None:
    """The idempotency record on Redis says COMPLETED: the letter resolves, nothing runs."""
    queue = redis_queue
    runs: list[int] = []
    day = uuid.uuid4().int % 10**9

    @dead_letter(queue=queue, name="tests.redis.report")
    @idempotent
    def report(d: int) -> str:
        runs.append(d)
        if len(runs) == 1:
            raise GatewayTimeout("first try failed")
        return f"report {d}"

    with pytest.raises(GatewayTimeout):
        report(day)
    assert report(day) == f"report {day}"  # a later call did the work
    result = queue.process_due(now=T0 + 10**7)
    assert [r.outcome for r in result.results] == ["completed"]
    assert runs == [day, day]
    (resolved,) = queue.query()
    assert (resolved.status, resolved.resolution) == (Status.RESOLVED, "completed")
    assert queue.stats(hours=10**6, now=T0 + 1).total == 1


# -- namespaces, history, search, size bounds -----------------------------------------------


def test_each_namespace_has_its_own_queue(redis_url: str) -> None:
    """Regression (issue 13 §3): every app shared one queue whatever its namespace, so one
    app's processor claimed another's letters. A backend's dead_letter_store(namespace=)
    and the URL's ?namespace= now each scope their own queue."""
    backend = RedisBackend.from_url(redis_url)
    a, b = fresh_prefix(), fresh_prefix()
    try:
        app_a = backend.dead_letter_store(namespace=a)
        app_b = backend.dead_letter_store(namespace=b)
        assert app_a.base_key == f"{a}:{{{a}:dlq}}"
        app_a.add(letter("only-a", next_retry_at=T0))
        assert app_b.get("only-a") is None
        assert app_b.claim_due(T0 + 1) == []
        assert [x.id for x in app_a.claim_due(T0 + 1)] == ["only-a"]
        by_url = dead_letter_store_from_url(f"{redis_url}?namespace={a}")
        assert isinstance(by_url, RedisDeadLetterStore)
        assert by_url.namespace == a
        assert by_url.get("only-a") is not None
        by_url.close()
        assert RedisDeadLetterStore.from_url(with_prefix(redis_url, b)).namespace == b
    finally:
        backend.close()


def test_namespace_and_its_older_name_prefix_must_agree() -> None:
    """prefix= is accepted as the old name of namespace=; both, different, is an error."""
    assert RedisDeadLetterStore("redis://h", prefix="x").namespace == "x"
    assert RedisDeadLetterStore("redis://h", namespace="x", prefix="x").namespace == "x"
    with pytest.raises(ConfigurationError, match="disagree"):
        RedisDeadLetterStore("redis://h", namespace="x", prefix="y")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_letters_history_is_stored_and_updated(store: RedisDeadLetterStore, mode: str) -> None:
    """history round-trips through add, get, update and claim_due, sync and async."""
    first = (Action(T0, "failed", "worker", "transient", "ConnectionError: refused"),)
    later = (*first, Action(T0 + 60, "retry_failed", "processor", note="again, ünïcode"))

    async def scenario() -> list[Any]:
        try:
            added = await store.aadd(letter("h", history=first, next_retry_at=T0))
            got = await store.aget("h")
            updated = await store.aupdate("h", added.version, history=later)
            return [added, got, updated, await store.aclaim_due(T0 + 1)]
        finally:
            await store.aclose()

    if mode == "sync":
        added = store.add(letter("h", history=first, next_retry_at=T0))
        got = store.get("h")
        updated = store.update("h", added.version, history=later)
        seen = [added, got, updated, store.claim_due(T0 + 1)]
    else:
        seen = asyncio.run(scenario())
    assert seen[0].history == first
    assert seen[1].history == first
    assert seen[2].history == later
    assert seen[3][0].history == later


def test_search_is_a_plain_case_insensitive_substring(
    store: RedisDeadLetterStore, raw: redis.Redis
) -> None:
    """search matches error_type or message ignoring case (Unicode too), as plain text:
    Lua pattern characters match themselves, and letters without the case-folded copies
    (written before them) are still found by their ASCII text."""
    store.add(letter("t", error_type="builtins.TimeoutError", message="Gateway timed out"))
    store.add(letter("p", error_type="app.Err", message="50% done (a.b) [x]"))
    store.add(letter("u", error_type="app.Err", message="ÉCHEC de la Straße"))
    store.add(letter("old", error_type="app.LegacyError", message="Old News"))
    raw.hdel(store.letter_key("old"), "cf_error_type", "cf_message")

    def ids(search: str, **more: Any) -> list[str]:
        return sorted(x.id for x in store.query(DeadLetterFilter(search=search, **more)))

    assert ids("timeout") == ["t"]
    assert ids("GATEWAY") == ["t"]
    assert ids("50%") == ["p"]
    assert ids("(a.b)") == ["p"]
    assert ids("[x]") == ["p"]
    assert ids(".%") == []
    assert ids("a.b.c") == []
    assert ids("échec") == ["u"]
    assert ids("strasse") == ["u"]  # casefold: ß is ss
    assert ids("legacy") == ["old"]
    assert ids("old news") == ["old"]
    assert ids("err", function=("billing.charge",)) == ["old", "p", "t", "u"]
    assert len(store.query(DeadLetterFilter(search="e"), limit=2)) == 2
    counts = store.stats(DeadLetterFilter(search="timeout"))
    assert sum(row.count for row in counts) == 1
    assert store.purge(DeadLetterFilter(search="échec")) == 1
    assert store.get("u") is None
    updated = store.update("t", 0, message="now it is a refusal")
    assert updated is not None
    assert ids("refusal") == ["t"]
    assert ids("gateway") == []


def test_a_letter_over_max_record_bytes_is_refused_before_it_is_parsed(redis_url: str) -> None:
    """A letter hash bigger than the backend's max_record_bytes is a CorruptRecordError
    naming its Redis key, on get and on a walk."""
    writer = RedisDeadLetterStore(redis_url, namespace=fresh_prefix())
    reader = RedisBackend.from_url(redis_url, max_record_bytes=4096).dead_letter_store(
        namespace=writer.namespace
    )
    try:
        writer.add(letter("big", traceback="x" * 8192))
        with pytest.raises(CorruptRecordError, match=r"letter:big.*over max_record_bytes"):
            reader.get("big")
        with pytest.raises(CorruptRecordError, match="over max_record_bytes"):
            reader.query()
        assert writer.get("big") is not None
    finally:
        writer.purge(DeadLetterFilter())
        writer.close()
        reader.backend.close()

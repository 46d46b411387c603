"""Hostile records: bytes written straight into the store (by anyone who can write to it)
never make a duplicate call decode without bounds, build a class the function does not
return, or run the body again. Each is refused with SerializationError, every time.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest

import idempotask
from idempotask import SerializationError, idempotent
from idempotask.backends.base import Backend
from idempotask.backends.memory import MemoryBackend
from idempotask.serializers import JSONSerializer, register_type, result_types
from tests.conftest import service_url

P = 2**61 - 1  # hash(k * P) == 0 for every int k: a set of them collides completely


class Level(enum.Enum):
    LOW = 1


@dataclasses.dataclass
class Line:
    sku: str
    level: Level


@dataclasses.dataclass
class Order:
    id: int
    lines: list[Line]


class Pair(NamedTuple):
    a: int
    b: int


@dataclasses.dataclass
class Secret:
    """A class no function here returns: a record naming it must not be rebuilt (a
    rebuild makes the object with __new__, which counts)."""

    built = 0
    token: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Secret:
        Secret.built += 1
        return super().__new__(cls)


@dataclasses.dataclass
class Extra:
    n: int


register_type(Extra)


def _tagged(tag: str, payload: Any) -> bytes:
    return json.dumps({"$t": tag, "v": payload}).encode()


def _plant(store: Backend, key: str, payload: bytes) -> None:
    token = f"foreign-{uuid.uuid4().hex}"
    store.claim(key, token, lease=60)
    assert store.complete(key, token, payload, ttl=600)


@pytest.fixture
def memory() -> MemoryBackend:
    store = MemoryBackend()
    idempotask.configure(backend=store)
    return store


def _job(name: str, runs: list[int]) -> Callable[[int], int]:
    @idempotent(name=f"hostile.{name}.{uuid.uuid4().hex[:8]}")
    def job(n: int) -> int:
        runs.append(n)
        return n

    return job


def _refused_twice(job: Callable[[int], Any], match: str) -> None:
    for _ in range(2):
        with pytest.raises(SerializationError, match=match):
            job(1)


def test_a_30_mb_payload_is_not_decoded(memory: MemoryBackend) -> None:
    """A payload over max_result_bytes is refused before decoding: no memory spike."""
    runs: list[int] = []
    job = _job("big", runs)
    _plant(memory, job.key_for(1), b"[" + b"1," * (15 * 1024 * 1024) + b"1]")  # type: ignore[attr-defined]
    tracemalloc.start()
    try:
        _refused_twice(job, "over max_result_bytes")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak allocation while refusing a 30 MB payload: {peak / 1e6:.2f} MB (floor: 0)")
    assert peak < 5_000_000
    assert runs == []


def test_a_set_of_colliding_ints_is_refused(memory: MemoryBackend) -> None:
    """~1 MB of ints sharing one hash (quadratic to build) is refused as hash flooding."""
    runs: list[int] = []
    job = _job("flood", runs)
    items = [k * P for k in range(1, 40_000)]
    payload = _tagged("set", items)
    assert len(payload) < 1024 * 1024
    _plant(memory, job.key_for(1), payload)  # type: ignore[attr-defined]
    started = time.perf_counter()
    _refused_twice(job, "hash flooding")
    print(
        f"refusing a {len(payload) / 1e6:.1f} MB flooding set twice: "
        f"{time.perf_counter() - started:.3f}s (the old decoder: ~15 s each)"
    )
    assert runs == []


def test_a_dict_with_colliding_int_keys_is_refused(memory: MemoryBackend) -> None:
    runs: list[int] = []
    job = _job("floodict", runs)
    flat: list[int] = []
    for k in range(1, 20_000):
        flat += [k * P, 0]
    _plant(memory, job.key_for(1), _tagged("dict", flat))  # type: ignore[attr-defined]
    _refused_twice(job, "hash flooding")
    assert runs == []


def test_a_deeply_nested_payload_is_refused(memory: MemoryBackend) -> None:
    runs: list[int] = []
    job = _job("deep", runs)
    _plant(memory, job.key_for(1), b"[" * 200_000 + b"]" * 200_000)  # type: ignore[attr-defined]
    _refused_twice(job, "nested too deeply")
    assert runs == []


def test_a_record_naming_a_class_the_function_does_not_return_is_not_built(
    memory: MemoryBackend,
) -> None:
    """A function annotated -> int never rebuilds a dataclass named by a stored record
    (its __init__, __post_init__ and fields untouched), nor a named tuple or enum."""
    runs: list[int] = []
    job = _job("foreign", runs)
    key = job.key_for(1)  # type: ignore[attr-defined]
    for payload in (
        _tagged("dataclass", [__name__, "Secret", {"token": "x"}]),
        _tagged("namedtuple", [__name__, "Pair", [1, 2]]),
        _tagged("enum", [__name__, "Level", "LOW"]),
    ):
        memory.delete(key)
        _plant(memory, key, payload)
        _refused_twice(job, "not a type this function returns")
    assert Secret.built == 0
    assert runs == []


def test_the_return_annotation_decides_which_classes_come_back(memory: MemoryBackend) -> None:
    """-> Order allows Order and the classes of its fields (Line, Level), through
    generics; registered types are allowed everywhere; others are refused when written."""
    assert set(result_types(_orders)) == {Order, Line, Level}

    @idempotent(name=f"hostile.orders.{uuid.uuid4().hex[:8]}")
    def orders(n: int) -> list[Order] | None:
        return [Order(n, [Line("a", Level.LOW)])]

    @idempotent(name=f"hostile.extra.{uuid.uuid4().hex[:8]}")
    def extra(n: int) -> int:
        return Extra(n)  # type: ignore[return-value]

    @idempotent(name=f"hostile.wrong.{uuid.uuid4().hex[:8]}")
    def wrong(n: int) -> int:
        return Pair(n, n)  # type: ignore[return-value]

    assert orders(1) == orders(1) == [Order(1, [Line("a", Level.LOW)])]
    assert extra(2) == extra(2) == Extra(2)
    with pytest.raises(SerializationError, match="register_type"):
        wrong(3)


def _orders() -> Order:
    raise NotImplementedError


def test_a_serializer_chosen_by_hand_keeps_its_own_types() -> None:
    ser = JSONSerializer(types=[Pair])
    assert ser.loads(ser.dumps(Pair(1, 2))) == Pair(1, 2)
    with pytest.raises(SerializationError):
        ser.dumps(Line("x", Level.LOW))
    with pytest.raises(SerializationError):
        ser.loads(_tagged("dataclass", [__name__, "Secret", {}]))
    # On its own (no types=), the serializer keeps every module-level class.
    assert JSONSerializer().loads(JSONSerializer().dumps(Line("x", Level.LOW))) == Line(
        "x", Level.LOW
    )


def test_a_cached_error_never_builds_a_dataclass(memory: MemoryBackend) -> None:
    """A cached error whose args name a dataclass is not rebuilt with it."""
    runs: list[int] = []

    @idempotent(name=f"hostile.err.{uuid.uuid4().hex[:8]}", cache_errors=60)
    def job(n: int) -> int:
        runs.append(n)
        raise ValueError("no")

    key = job.key_for(1)
    record = {
        "module": "builtins",
        "qualname": "ValueError",
        "message": "x",
        "args": {"$t": "tuple", "v": [{"$t": "dataclass", "v": [__name__, "Secret", {}]}]},
    }
    token = "foreign"
    memory.claim(key, token, lease=60)
    memory.fail(key, token, json.dumps(record).encode(), ttl=60)
    with pytest.raises(SerializationError, match="cached error"):
        job(1)
    assert Secret.built == 0
    assert runs == []


# ------------------------------------------------------------------------------ Redis


@pytest.fixture
def redis_store() -> Iterator[Backend]:
    pytest.importorskip("redis")
    from idempotask.backends.redis import RedisBackend

    store = RedisBackend(url=service_url("redis"))
    idempotask.configure(backend=store, namespace=f"hostile{uuid.uuid4().hex[:10]}")
    yield store
    store.close()


def test_hostile_payloads_in_redis_are_refused(redis_store: Backend) -> None:
    """The same refusals on Redis: too big, flooding, a foreign class."""
    runs: list[int] = []
    job = _job("redis", runs)
    key = job.key_for(1)  # type: ignore[attr-defined]
    for payload, match in (
        (b"[" + b"1," * (2 * 1024 * 1024) + b"1]", "over max_result_bytes"),
        (_tagged("frozenset", [k * P for k in range(1, 40_000)]), "hash flooding"),
        (_tagged("dataclass", [__name__, "Secret", {}]), "not a type this function returns"),
    ):
        redis_store.delete(key)
        _plant(redis_store, key, payload)
        _refused_twice(job, match)
    redis_store.delete(key)
    assert runs == []
    assert Secret.built == 0


class _Stopped(Exception):
    """A framework's time limit: registered as a cancellation, so never cached."""


idempotask.register_cancellation(_Stopped)

# Types a cached error can never be (cancellations are released, never cached): a record
# naming one was written by someone else.
_NEVER_CACHED = [
    ("builtins", "SystemExit"),
    ("builtins", "KeyboardInterrupt"),
    ("asyncio.exceptions", "CancelledError"),
    ("builtins", "GeneratorExit"),
    (__name__, "_Stopped"),
]


def _cancellations_are_refused(store: Backend) -> None:
    runs: list[int] = []

    @idempotent(name=f"hostile.cancel.{uuid.uuid4().hex[:8]}", cache_errors=60)
    def job(n: int) -> int:
        runs.append(n)
        raise ValueError("no")

    key = job.key_for(1)
    for module, qualname in _NEVER_CACHED:
        args = {"$t": "tuple", "v": [0]}
        record = {"module": module, "qualname": qualname, "message": "0", "args": args}
        store.delete(key)
        store.claim(key, "foreign", lease=60)
        assert store.fail(key, "foreign", json.dumps(record).encode(), ttl=60)
        for _ in range(2):
            # Not SystemExit(0) (a worker quietly exiting) nor a CancelledError.
            with pytest.raises(SerializationError, match=f"{key} cannot be read: it is a"):
                job(1)
    store.delete(key)
    assert runs == []


def test_a_cached_error_naming_a_cancellation_is_refused(memory: MemoryBackend) -> None:
    _cancellations_are_refused(memory)


def test_a_cached_error_naming_a_cancellation_is_refused_on_redis(redis_store: Backend) -> None:
    _cancellations_are_refused(redis_store)


class _PlainJSON:
    """A third-party serializer that raises json's own errors, not SerializationError."""

    def dumps(self, value: object) -> bytes:
        return json.dumps(value).encode()

    def loads(self, data: bytes) -> object:
        return json.loads(data)


def _serializer_errors_name_the_key_and_release_it(store: Backend) -> None:
    runs: list[int] = []

    @idempotent(
        name=f"hostile.plainjson.{uuid.uuid4().hex[:8]}",
        serializer=_PlainJSON(),
        on_conflict="raise",
    )
    def job(n: int) -> Any:
        runs.append(n)
        return {"day": datetime.date(2026, 1, n)} if n == 1 else n

    # json.dumps raises TypeError: the key is released at once, not held for a lease
    # (a duplicate would get AlreadyInProgress).
    for _ in range(2):
        with pytest.raises(SerializationError, match=f"{job.key_for(1)} was released"):
            job(1)
    assert runs == [1, 1]
    assert store.get(job.key_for(1)) is None
    # json.loads raises UnicodeDecodeError on bytes someone else wrote: refused, naming the key.
    _plant(store, job.key_for(2), b"\xff{")
    for _ in range(2):
        with pytest.raises(SerializationError, match=f"under {job.key_for(2)} cannot be read"):
            job(2)
    assert runs == [1, 1]
    store.delete(job.key_for(2))


def test_a_third_party_serializers_own_errors_release_the_key_and_name_it(
    memory: MemoryBackend,
) -> None:
    _serializer_errors_name_the_key_and_release_it(memory)


def test_a_third_party_serializers_own_errors_release_the_key_and_name_it_on_redis(
    redis_store: Backend,
) -> None:
    _serializer_errors_name_the_key_and_release_it(redis_store)


def test_a_claim_without_a_token_in_redis_is_refused_not_waited_on(redis_store: Backend) -> None:
    """An IN_PROGRESS record with no token was not written by a claim: no caller could
    ever complete, renew or release it. It fails closed at once, naming the key, instead
    of making every call wait for wait_timeout and raise AlreadyInProgress."""
    import redis as redis_py

    from idempotask.backends.base import State
    from idempotask.backends.redis import RECORD_FORMAT, record_key
    from idempotask.errors import CorruptRecordError

    runs: list[int] = []

    @idempotent(name=f"hostile.notoken.{uuid.uuid4().hex[:8]}", wait_timeout=5)
    def job(n: int) -> int:
        runs.append(n)
        return n

    key = job.key_for(1)
    client = redis_py.Redis.from_url(service_url("redis"))
    try:
        value = RECORD_FORMAT.encode() + b"i" + bytes(6)  # no token, owner or fingerprint
        client.set(record_key(key), value, px=60_000)
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(CorruptRecordError, match=f"{key}.*a claim without a token"):
                job(1)
            assert time.monotonic() - started < 2
        assert runs == []
        # Our own claims still parse (and hold their tokens).
        client.delete(record_key(key))
        assert redis_store.claim(key, "t-1", lease=5).state is State.IN_PROGRESS
    finally:
        client.delete(record_key(key))
        client.close()

"""Upgrades: records written by earlier releases stay honoured, and renames roll out
without running a call twice.

GOLDEN_RECORDS are records exactly as release 0.1 (key encoding v1, typed JSON format 1)
writes them. A later release must answer these calls from these bytes without running
the body; if it cannot, it needs a new key version and a transition, never a silent
change.
"""

from __future__ import annotations

import datetime
import multiprocessing
import random
import uuid
from decimal import Decimal
from typing import Any

import pytest

import idempotask
from idempotask import ConfigurationError, idempotent
from idempotask.backends.memory import MemoryBackend
from tests.conftest import service_url

UTC = datetime.timezone.utc

GOLDEN_VALUE = {
    "order": 7,
    "items": (1, 2),
    "tags": {"a"},
    "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    "amount": Decimal("10.50"),
    "id": uuid.UUID(int=5),
    3: b"raw",
}
GOLDEN_KEY = "golden:golden.export:v1:84ddf6c67027a7c938eb2cbc22c69afd"
GOLDEN_PAYLOAD = (
    b'{"$t":"dict","v":["order",7,"items",{"$t":"tuple","v":[1,2]},"tags",{"$t":"set",'
    b'"v":["a"]},"when",{"$t":"datetime","v":["2026-01-02T03:04:05",0,[0,null,null]]},'
    b'"amount",{"$t":"decimal","v":"10.50"},"id",{"$t":"uuid","v":'
    b'"00000000-0000-0000-0000-000000000005"},3,{"$t":"bytes","v":"cmF3"}]}'
)


def test_a_golden_record_from_release_0_1_is_honoured_without_running() -> None:
    store = MemoryBackend()
    idempotask.configure(backend=store, namespace="golden")
    ran: list[int] = []

    @idempotent(name="golden.export")
    def export(order: int, day: datetime.date, amount: Decimal = Decimal("0")) -> dict[Any, Any]:
        ran.append(order)
        return {}

    key = export.key_for(7, datetime.date(2026, 1, 2), Decimal("10.50"))
    assert key == GOLDEN_KEY
    record = store.claim(GOLDEN_KEY, "written-by-0.1", lease=60)
    assert store.complete(GOLDEN_KEY, record.token, GOLDEN_PAYLOAD, ttl=3600)
    value = export(order=7, day=datetime.date(2026, 1, 2), amount=Decimal("10.5"))
    assert value == GOLDEN_VALUE
    assert type(value["items"]) is tuple
    assert str(value["amount"]) == "10.50"
    assert ran == []


def test_a_renamed_function_honours_results_stored_under_its_previous_name() -> None:
    store = MemoryBackend()
    idempotask.configure(backend=store)
    runs: list[str] = []

    @idempotent(name="tests.upgrades.old_charge")
    def old_charge(order: int) -> str:
        runs.append("old")
        return f"charged {order} (old code)"

    assert old_charge(1) == "charged 1 (old code)"

    @idempotent(name="tests.upgrades.charge", previous_names=("tests.upgrades.old_charge",))
    def charge(order: int) -> str:
        runs.append("new")
        return f"charged {order} (new code)"

    assert charge(1) == "charged 1 (old code)"  # the result stored before the rename
    assert charge(2) == "charged 2 (new code)"
    assert old_charge(2) == "charged 2 (new code)"  # old code sees the new result too
    assert runs == ["old", "new"]


def test_previous_names_are_validated() -> None:
    def f() -> None:
        return None

    with pytest.raises(ConfigurationError, match="previous_names"):
        idempotent(name="a.b", previous_names="a.c")(f)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="previous_names"):
        idempotent(name="a.b", previous_names=("a.b",))(f)
    with pytest.raises(ConfigurationError, match="braces"):
        idempotent(name="a.b", previous_names=("a{c}",))(f)


# ------------------------------------------------------------------- a rolling deploy

FORK = multiprocessing.get_context("fork")
KEYS, REPEATS = 200, 3


def _release(version: str, counter_url: str, counter_name: str) -> Any:
    """The task as each release defines it: 0.1 under its old name, 0.2 renamed."""
    import redis

    counter = redis.Redis.from_url(counter_url)
    if version == "0.1":

        @idempotent(name="shop.tasks.send_receipt", lease=120, wait_timeout=120)
        def send_receipt(order: int) -> str:
            n = counter.hincrby(counter_name, str(order), 1)
            return f"receipt {order} #{n}"

    else:

        @idempotent(
            name="billing.send_receipt",
            previous_names=("shop.tasks.send_receipt",),
            lease=120,
            wait_timeout=120,
        )
        def send_receipt(order: int) -> str:
            n = counter.hincrby(counter_name, str(order), 1)
            return f"receipt {order} #{n}"

    return send_receipt


def _deploy_worker(
    version: str, url: str, ns: str, counter_name: str, seed: int, start: Any, out: Any
) -> None:
    idempotask.configure(backend=url, namespace=ns)
    task = _release(version, url, counter_name)
    calls = [k for k in range(KEYS) for _ in range(REPEATS)]
    random.Random(seed).shuffle(calls)
    start.wait(30)
    out.put([(k, task(k)) for k in calls])


@pytest.fixture
def redis_url() -> str:
    return service_url("redis")


def test_a_rolling_deploy_with_old_and_new_releases_side_by_side_runs_no_call_twice(
    redis_url: str,
) -> None:
    """4 processes on release 0.1 (old name) and 4 on 0.2 (renamed, previous_names)."""
    import redis

    ns = f"deploy{uuid.uuid4().hex[:10]}"
    counter_name = f"idempotask-test-deploy:{ns}"
    start, out = FORK.Event(), FORK.Queue()
    workers = [
        FORK.Process(
            target=_deploy_worker,
            args=(version, redis_url, ns, counter_name, seed, start, out),
        )
        for seed, version in enumerate(["0.1", "0.2"] * 4)
    ]
    for w in workers:
        w.start()
    start.set()
    results: list[tuple[int, str]] = []
    for _ in workers:
        results.extend(out.get(timeout=300))
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    client = redis.Redis.from_url(redis_url)
    try:
        counts = {int(k): int(v) for k, v in client.hgetall(counter_name).items()}
        assert counts == dict.fromkeys(range(KEYS), 1)
        first: dict[int, str] = {}
        for k, value in results:
            assert first.setdefault(k, value) == value
    finally:
        client.delete(counter_name)
        for key in client.scan_iter(match=f"{ns}:*", count=1000):
            client.delete(key)
        client.close()

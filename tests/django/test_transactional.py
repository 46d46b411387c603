"""@idempotent(transactional=True) on DjangoBackend: the body's ORM writes and the
result commit in one transaction.atomic(using=alias), on PostgreSQL and on SQLite
(sqlite_transactions=True); a failing body leaves no rows and its failure recorded; a
late owner's writes are rolled back; a call inside the user's own atomic() is refused.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import idempotask
from idempotask import dead_letter, idempotent
from idempotask.backends.base import State
from idempotask.errors import ConfigurationError, LeaseLostError

pytest.importorskip("django")

from idempotask.django import DjangoBackend


@pytest.fixture(params=["pg", "sqlite"])
def alias(request: pytest.FixtureRequest, django_aliases: list[str]) -> str:
    if request.param == "pg":
        return str(request.getfixturevalue("pg_alias"))
    return "default"


@pytest.fixture
def store(alias: str) -> DjangoBackend:
    backend = DjangoBackend(alias, sqlite_transactions=True)
    idempotask.configure(backend=backend, namespace=f"tx{uuid.uuid4().hex[:10]}")
    return backend


def payments(alias: str, order: str) -> int:
    from tests.django.testapp.models import Payment

    return int(Payment.objects.using(alias).filter(order=order).count())


def make_pay(alias: str, *, fail: bool = False, name: str | None = None) -> Callable[..., Any]:
    from tests.django.testapp.models import Payment

    runs: list[str] = []

    @idempotent(transactional=True, name=name or f"pay.{uuid.uuid4().hex[:8]}")
    def pay(order: str, amount: int) -> int:
        runs.append(order)
        assert idempotask.transaction() == alias
        row = Payment.objects.using(alias).create(order=order, amount=amount)
        if fail:
            raise RuntimeError("card declined")
        return int(row.pk)

    pay.runs = runs  # type: ignore[attr-defined]
    return pay


def test_orm_writes_and_the_result_commit_together(store: DjangoBackend, alias: str) -> None:
    pay = make_pay(alias)
    order = uuid.uuid4().hex
    first = pay(order, 10)
    assert pay(order, 10) == first  # the duplicate gets the stored result
    assert payments(alias, order) == 1
    assert pay.runs == [order]  # type: ignore[attr-defined]
    record = store.get(pay.key_for(order, 10))  # type: ignore[attr-defined]
    assert record is not None
    assert record.state is State.COMPLETED


def test_a_failing_body_leaves_no_rows_and_its_failure_is_dead_lettered(
    store: DjangoBackend, alias: str
) -> None:
    pay = dead_letter(make_pay(alias, fail=True))
    order = uuid.uuid4().hex
    with pytest.raises(RuntimeError, match="card declined"):
        pay(order, 10)
    assert payments(alias, order) == 0
    letters = store.dead_letter_store(namespace=idempotask.config.settings().namespace)
    stats = letters.stats()
    assert sum(s.count for s in stats) == 1
    # The key was released: the next call runs the body again.
    with pytest.raises(RuntimeError):
        pay(order, 10)
    assert pay.__wrapped__.runs == [order, order]  # type: ignore[attr-defined]


def test_inside_the_users_atomic_the_call_is_refused_and_leaves_nothing(
    store: DjangoBackend, alias: str
) -> None:
    from django.db import transaction

    pay = make_pay(alias)
    order = uuid.uuid4().hex

    def inside() -> None:
        with transaction.atomic(using=alias):
            pay(order, 10)

    with pytest.raises(ConfigurationError, match="already in a transaction"):
        inside()
    assert pay.runs == []  # type: ignore[attr-defined]
    assert payments(alias, order) == 0
    assert store.get(pay.key_for(order, 10)) is None  # type: ignore[attr-defined]


def test_a_late_owner_has_its_writes_rolled_back(store: DjangoBackend, alias: str) -> None:
    """The body's claim is taken over while it runs (its lease made to run out, another
    caller claims): its compare-and-set fails, the call raises LeaseLostError and its
    payment row is gone; the new owner's claim stands."""
    from tests.django.testapp.models import Payment

    order = uuid.uuid4().hex
    taken = threading.Event()

    @idempotent(transactional=True, name=f"late.{uuid.uuid4().hex[:8]}", lease=30)
    def pay(order: str) -> int:
        Payment.objects.using(alias).create(order=order, amount=1)
        key = pay.key_for(order)

        def take_over() -> None:
            store.expire_now(key)
            assert store.claim(key, "new-owner", lease=30).held_by("new-owner")
            taken.set()

        # Another thread: its own Django connection, autocommit.
        worker = threading.Thread(target=take_over)
        worker.start()
        worker.join()
        return 1

    if alias == "default":
        pytest.skip("SQLite: the body's write holds the file's lock; the takeover would wait")
    with pytest.raises(LeaseLostError):
        pay(order)
    assert taken.is_set()
    assert payments(alias, order) == 0
    record = store.get(pay.key_for(order))
    assert record is not None
    assert record.held_by("new-owner")


def test_duplicates_from_threads_write_exactly_once(store: DjangoBackend, alias: str) -> None:
    """4 threads, 15 orders, 2 calls each: one payment row per order."""
    if alias == "default":
        pytest.skip("one writer at a time on SQLite: covered by the sequential tests")
    pay = make_pay(alias)
    orders = [uuid.uuid4().hex for _ in range(15)]
    calls = [o for o in orders for _ in range(2)] * 4

    def call(order: str) -> int:
        from django.db import connections

        try:
            return int(pay(order, 5))
        finally:
            connections[alias].close()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, calls))
    for order in orders:
        assert payments(alias, order) == 1
    by_order: dict[str, set[int]] = {}
    for order, result in zip(calls, results, strict=True):
        by_order.setdefault(order, set()).add(result)
    assert all(len(ids) == 1 for ids in by_order.values())


def test_an_async_body_writes_in_the_same_transaction(store: DjangoBackend, alias: str) -> None:
    """An async def body reaches the call's transaction with sync_to_async; a failure
    rolls its writes back."""
    from asgiref.sync import sync_to_async

    from tests.django.testapp.models import Payment

    create = sync_to_async(
        lambda order: Payment.objects.using(alias).create(order=order, amount=3),
        thread_sensitive=True,
    )

    @idempotent(transactional=True, name=f"apay.{uuid.uuid4().hex[:8]}")
    async def apay(order: str, fail: bool) -> int:
        row = await create(order)
        if fail:
            raise RuntimeError("declined")
        return int(row.pk)

    good, bad = uuid.uuid4().hex, uuid.uuid4().hex

    async def scenario() -> None:
        first = await apay(good, False)
        assert await apay(good, False) == first
        with pytest.raises(RuntimeError):
            await apay(bad, True)

    asyncio.run(scenario())
    assert payments(alias, good) == 1
    assert payments(alias, bad) == 0


def test_sqlite_refuses_transactional_calls_unless_opted_in(sqlite_alias: str) -> None:
    idempotask.configure(backend=DjangoBackend(sqlite_alias))
    pay = make_pay(sqlite_alias)
    with pytest.raises(ConfigurationError, match="sqlite_transactions=True"):
        pay(uuid.uuid4().hex, 1)
    assert pay.runs == []  # type: ignore[attr-defined]

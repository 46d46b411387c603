"""@idempotent(transactional=True) on DjangoBackend: the body's ORM writes and the
result commit in one transaction.atomic(using=alias), on PostgreSQL and on SQLite
(sqlite_transactions=True); a failing body leaves no rows and its failure recorded; a
late owner's writes are rolled back; a call inside the user's own atomic() is refused.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask import dead_letter, idempotent
from idempotask.backends.base import State
from idempotask.errors import ConfigurationError, LeaseLostError

pytest.importorskip("django")

from idempotask.django import DjangoBackend


@pytest.fixture(params=["pg", "maria", "sqlite"])
def alias(request: pytest.FixtureRequest, django_aliases: list[str]) -> str:
    if request.param != "sqlite":
        return str(request.getfixturevalue(f"{request.param}_alias"))
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


def test_mariadb_session_bounds_do_not_outlive_the_call(maria_alias: str) -> None:
    """MariaDB's bounds are session variables of the alias's connection, which the
    application goes on using: after the call (committed or rolled back) they have the
    session's own values again, so the application's next transaction is not ended
    after one lease of idleness."""
    from django.db import connections

    idempotask.configure(backend=DjangoBackend(maria_alias), namespace=f"tx{uuid.uuid4().hex[:10]}")
    sql = "SELECT @@SESSION.idle_transaction_timeout, @@SESSION.innodb_lock_wait_timeout"

    def bounds() -> tuple[int, int]:
        with connections[maria_alias].cursor() as cursor:
            cursor.execute(sql)
            return tuple(cursor.fetchone())  # type: ignore[return-value]

    before = bounds()
    pay = make_pay(maria_alias)
    pay(uuid.uuid4().hex, 10)
    assert bounds() == before
    with pytest.raises(RuntimeError):
        make_pay(maria_alias, fail=True)(uuid.uuid4().hex, 10)
    assert bounds() == before


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
        return int(pay(order, 5))

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


def test_concurrent_async_calls_each_have_their_own_transaction(
    store: DjangoBackend, alias: str
) -> None:
    """Two async transactional calls at once on one event loop: each body writes in its
    own transaction (one failing rolls back only its own rows), and neither call's
    claim or renewal joins the other's transaction."""
    if alias == "default":
        pytest.skip("one writer at a time on SQLite")
    from asgiref.sync import sync_to_async

    from tests.django.testapp.models import Payment

    both_inside = asyncio.Event()
    inside = 0

    @idempotent(transactional=True, name=f"cpay.{uuid.uuid4().hex[:8]}")
    async def cpay(order: str, fail: bool) -> int:
        nonlocal inside
        row = await sync_to_async(
            lambda: Payment.objects.using(alias).create(order=order, amount=7),
            thread_sensitive=True,
        )()
        inside += 1
        if inside == 2:
            both_inside.set()
        await asyncio.wait_for(both_inside.wait(), 10)
        if fail:
            raise RuntimeError("declined")
        return int(row.pk)

    good, bad = uuid.uuid4().hex, uuid.uuid4().hex

    async def scenario() -> list[Any]:
        return await asyncio.gather(cpay(good, False), cpay(bad, True), return_exceptions=True)

    first, second = asyncio.run(scenario())
    assert isinstance(first, int)
    assert isinstance(second, RuntimeError)
    assert payments(alias, good) == 1
    assert payments(alias, bad) == 0


CRASH = '''\
"""Charge ORDER in a transactional call; with "hang", stop after the ORM write."""
import sys
import time

import django

django.setup()

from idempotask import idempotent  # noqa: E402
from shop.models import Payment  # noqa: E402

order, mode = sys.argv[1], sys.argv[2]


@idempotent(transactional=True, name="shop.charge", lease=1.0)
def charge(order: str) -> int:
    payment = Payment.objects.create(order=order, cents=500)
    if mode == "hang":
        print("written", flush=True)
        time.sleep(120)
    return payment.pk


print("result", charge(order), flush=True)
'''


def test_a_process_killed_mid_body_leaves_no_rows_and_the_call_runs_once_more(
    tmp_path: Path,
) -> None:
    """SIGKILL between the body's ORM write and the commit (PostgreSQL): no row; after
    the lease the call runs again and writes exactly one; a duplicate then writes none."""
    from tests.conftest import service_url
    from tests.django._project import base_settings, environment, run, write_project
    from tests.django._support import RUN, fresh_pg_database

    url = service_url("postgres")
    with fresh_pg_database(url, f"idempotask_djk_{RUN}_{uuid.uuid4().hex[:6]}") as params:
        databases = {"default": {"ENGINE": "django.db.backends.postgresql", **params}}
        namespace = f"kill{uuid.uuid4().hex[:8]}"
        root = write_project(
            tmp_path / "site",
            base_settings(databases, IDEMPOTASK={"backend": "default", "namespace": namespace}),
        )
        (root / "crash.py").write_text(CRASH)
        for args in (("makemigrations", "shop"), ("migrate",)):
            done = run(root, "manage.py", *args)
            assert done.returncode == 0, done.stdout + done.stderr
        child = subprocess.Popen(
            [sys.executable, "crash.py", "A-1", "hang"],
            cwd=root,
            env=environment(root),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "written", child.stderr
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        count = (
            "import django; django.setup(); from shop.models import Payment; "
            "print(Payment.objects.filter(order='A-1').count())"
        )
        assert run(root, "-c", count).stdout.strip() == "0"
        again = run(root, "crash.py", "A-1", "run")  # waits out the dead owner's lease
        assert again.returncode == 0, again.stderr
        duplicate = run(root, "crash.py", "A-1", "run")
        assert duplicate.stdout == again.stdout  # the stored result
        assert run(root, "-c", count).stdout.strip() == "1"

"""Behaviour of @idempotent on the in-memory store: DESIGN §3 call protocol."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import threading
import time
import warnings
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest

import idempotask
from idempotask import (
    AlreadyInProgress,
    BackendError,
    ConfigurationError,
    CorruptRecordError,
    DuplicateNameError,
    EventKind,
    KeyMismatchError,
    LeaseLostWarning,
    MissingKeyMaterialError,
    SerializationError,
    idempotent,
)
from idempotask.backends.base import Record, State
from idempotask.backends.memory import MemoryBackend


class FakeClock:
    """A clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryBackend:
    backend = MemoryBackend(clock=clock)
    idempotask.configure(backend=backend)
    return backend


@pytest.fixture
def seen() -> Iterator[list[idempotask.Event]]:
    events: list[idempotask.Event] = []
    remove = idempotask.add_listener(events.append)
    yield events
    remove()


def kinds(events: list[idempotask.Event]) -> list[EventKind]:
    return [e.kind for e in events]


# ---------------------------------------------------------------------------- basics


def test_a_duplicate_call_returns_the_stored_result_without_running(store: MemoryBackend) -> None:
    calls: list[int] = []

    @idempotent(ttl=60)
    def charge(order: int) -> str:
        calls.append(order)
        return f"charged {order}"

    assert charge(1) == "charged 1"
    assert charge(1) == "charged 1"
    assert charge(2) == "charged 2"
    assert calls == [1, 2]


def test_bare_decorator_works_and_keeps_signature_and_wrapped() -> None:
    def send(to: str, body: str = "hi") -> int:
        return len(body)

    wrapped = idempotent(send)
    assert wrapped(to="a") == 2
    assert wrapped.__wrapped__ is send
    assert inspect.signature(wrapped) == inspect.signature(send)
    assert wrapped.__name__ == "send"


def test_positional_keyword_and_default_arguments_are_one_logical_call(
    store: MemoryBackend,
) -> None:
    calls = 0

    @idempotent
    def f(a: int, b: int = 2, *, c: str = "x") -> int:
        nonlocal calls
        calls += 1
        return a + b

    assert f(1) == f(a=1) == f(1, 2) == f(1, b=2, c="x") == f(b=2, a=1) == 3
    assert calls == 1
    assert f.key_for(1) == f.key_for(a=1, b=2)
    assert f.key_for(1) != f.key_for(1, 3)


def test_a_duplicate_gets_the_first_result_with_types_intact(store: MemoryBackend) -> None:
    value = {
        "tuple": (1, 2),
        "set": {1, 2},
        "when": datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc),
        "amount": Decimal("10.50"),
        "id": UUID(int=7),
        7: b"raw",
    }

    @idempotent
    def build() -> dict[Any, Any]:
        return value

    first = build()
    second = build()
    assert first is value
    assert second == value
    assert type(second["tuple"]) is tuple
    assert type(second["set"]) is set
    assert second["amount"].as_tuple() == Decimal("10.50").as_tuple()


def test_ttl_counts_from_completion_and_expiry_runs_the_body_again(
    store: MemoryBackend, clock: FakeClock
) -> None:
    calls = 0

    @idempotent(ttl=100)
    def job() -> int:
        nonlocal calls
        calls += 1
        clock.advance(50)  # a long body: ttl must start when it ends
        return calls

    assert job() == 1
    clock.advance(99)
    assert job() == 1
    clock.advance(2)
    assert job() == 2


# ---------------------------------------------------------------------------- failures


def test_a_failure_releases_the_key_so_the_next_call_runs(
    store: MemoryBackend, seen: list[Any]
) -> None:
    attempts = 0

    @idempotent
    def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("down")
        return "ok"

    with pytest.raises(ConnectionError, match="down"):
        flaky()
    assert flaky() == "ok"
    assert flaky() == "ok"
    assert attempts == 2
    assert EventKind.RELEASED in kinds(seen)


class PaymentDeclined(Exception):
    pass


def test_cache_errors_replays_the_same_exception_without_running(
    store: MemoryBackend, clock: FakeClock
) -> None:
    attempts = 0

    @idempotent(cache_errors=30)
    def pay() -> None:
        nonlocal attempts
        attempts += 1
        raise PaymentDeclined("card 4242 declined")

    for _ in range(3):
        with pytest.raises(PaymentDeclined, match="card 4242 declined"):
            pay()
    assert attempts == 1
    clock.advance(31)
    with pytest.raises(PaymentDeclined):
        pay()
    assert attempts == 2


def test_keyboard_interrupt_releases_the_claim_even_with_cache_errors(store: MemoryBackend) -> None:
    attempts = 0

    @idempotent(cache_errors=60)
    def job() -> str:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise KeyboardInterrupt
        return "done"

    with pytest.raises(KeyboardInterrupt):
        job()
    assert job() == "done"
    assert attempts == 2


async def test_asyncio_cancellation_releases_the_claim(store: MemoryBackend) -> None:
    started = asyncio.Event()
    attempts = 0

    @idempotent(cache_errors=60)
    async def job() -> str:
        nonlocal attempts
        attempts += 1
        started.set()
        await asyncio.sleep(10 if attempts == 1 else 0)
        return "done"

    task = asyncio.create_task(job())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await job() == "done"
    assert attempts == 2


def test_a_result_that_cannot_be_stored_is_a_clear_error_and_releases_the_key(
    store: MemoryBackend,
) -> None:
    attempts = 0

    @idempotent
    def make() -> object:
        nonlocal attempts
        attempts += 1
        return threading.Lock()

    with pytest.raises(SerializationError, match="cannot be stored"):
        make()
    with pytest.raises(SerializationError):
        make()
    assert attempts == 2  # released both times: nothing half-stored blocks the key


# ---------------------------------------------------------------------------- conflicts


def test_thirty_two_threads_run_the_body_once_and_share_the_result(store: MemoryBackend) -> None:
    calls = 0
    gate = threading.Barrier(32)

    @idempotent(ttl=60)
    def slow(x: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        time.sleep(0.2)
        return {"x": x, "calls": calls}

    results: list[Any] = [None] * 32

    def worker(i: int) -> None:
        gate.wait()
        results[i] = slow(5)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == 1
    assert results == [{"x": 5, "calls": 1}] * 32


async def test_a_hundred_asyncio_tasks_run_the_body_once(store: MemoryBackend) -> None:
    calls = 0

    @idempotent
    async def fetch(x: int) -> tuple[int, int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return (x, calls)

    results = await asyncio.gather(*(fetch(9) for _ in range(100)))
    assert calls == 1
    assert results == [(9, 1)] * 100


def test_on_conflict_raise_gives_the_others_already_in_progress(store: MemoryBackend) -> None:
    entered = threading.Event()
    release = threading.Event()

    @idempotent(on_conflict="raise")
    def job() -> str:
        entered.set()
        release.wait(5)
        return "first"

    holder = threading.Thread(target=job)
    holder.start()
    entered.wait(5)
    errors = []
    for _ in range(5):
        with pytest.raises(AlreadyInProgress) as info:
            job()
        errors.append(info.value)
    release.set()
    holder.join()
    assert all(e.key == job.key_for() for e in errors)
    assert job() == "first"


async def test_on_conflict_raise_with_asyncio_tasks(store: MemoryBackend) -> None:
    @idempotent(on_conflict="raise")
    async def job() -> int:
        await asyncio.sleep(0.05)
        return 1

    results = await asyncio.gather(*(job() for _ in range(20)), return_exceptions=True)
    assert results.count(1) == 1
    assert all(isinstance(r, AlreadyInProgress) for r in results if r != 1)


def test_a_waiter_whose_owner_failed_claims_and_runs_itself(store: MemoryBackend) -> None:
    entered = threading.Event()
    release = threading.Event()
    runs: list[str] = []

    @idempotent(wait_timeout=10)
    def job(who: str = "") -> str:
        runs.append(threading.current_thread().name)
        if len(runs) == 1:
            entered.set()
            release.wait(5)
            raise RuntimeError("first attempt fails")
        return "second attempt"

    def first() -> None:
        with pytest.raises(RuntimeError):
            job()

    holder = threading.Thread(target=first, name="first")
    holder.start()
    entered.wait(5)
    waiter_result: list[str] = []
    waiter = threading.Thread(target=lambda: waiter_result.append(job()), name="waiter")
    waiter.start()
    time.sleep(0.05)
    release.set()
    holder.join()
    waiter.join()
    assert waiter_result == ["second attempt"]
    assert runs == ["first", "waiter"]


def test_wait_timeout_ends_in_already_in_progress(store: MemoryBackend) -> None:
    entered = threading.Event()
    release = threading.Event()

    @idempotent(wait_timeout=0.2)
    def job() -> None:
        entered.set()
        release.wait(5)

    holder = threading.Thread(target=job)
    holder.start()
    entered.wait(5)
    started = time.monotonic()
    with pytest.raises(AlreadyInProgress, match=r"after 0\.2s"):
        job()
    assert time.monotonic() - started >= 0.2
    release.set()
    holder.join()


# ---------------------------------------------------------------------------- leases


def test_a_crashed_owner_is_taken_over_after_its_lease(
    store: MemoryBackend, clock: FakeClock
) -> None:
    @idempotent(lease=30, on_conflict="raise")
    def job() -> str:
        return "ran"

    key = job.key_for()
    held = store.claim(key, "crashed-process-token", lease=30)  # a caller that then died
    assert held.held_by("crashed-process-token")
    with pytest.raises(AlreadyInProgress):
        job()
    clock.advance(31)
    assert job() == "ran"
    assert store.complete(key, "crashed-process-token", b"late", ttl=60) is False
    assert job() == "ran"


def test_a_late_owner_keeps_its_value_but_the_store_keeps_the_new_owners(
    store: MemoryBackend, clock: FakeClock, seen: list[Any]
) -> None:
    entered = threading.Event()
    release = threading.Event()

    # The store's clock is fake, the renewal thread's real: the first renewal (after a
    # third of 0.3 s) finds the claim taken over.
    @idempotent(lease=0.3, wait_timeout=0)
    def job(who: list[str]) -> str:
        if not entered.is_set():
            entered.set()
            release.wait(5)
            deadline = time.monotonic() + 5
            while idempotask.lease_held() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not idempotask.lease_held()  # the body can see it lost its claim
            return "late owner"
        return "new owner"

    late: list[str] = []
    first = threading.Thread(target=lambda: late.append(job([])))
    first.start()
    entered.wait(5)
    clock.advance(1)  # the first owner's lease runs out (it looks paused to the store)
    assert job([]) == "new owner"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        release.set()
        first.join()
    assert late == ["late owner"]
    assert job([]) == "new owner"
    assert EventKind.LEASE_LOST in kinds(seen)
    assert any(issubclass(w.category, LeaseLostWarning) for w in caught)


def test_the_lease_is_renewed_while_a_long_body_runs(store: MemoryBackend) -> None:
    # Real clock here: a 0.3 s lease and a 1 s body need renewals to stay held.
    idempotask.configure(backend=MemoryBackend())
    entered = threading.Event()
    held_at_end: list[bool] = []

    @idempotent(lease=0.3, on_conflict="raise")
    def long_job() -> str:
        entered.set()
        time.sleep(1.0)
        held_at_end.append(idempotask.lease_held())
        return "done"

    t = threading.Thread(target=long_job)
    t.start()
    entered.wait(5)
    conflicts = 0
    while t.is_alive():
        try:
            long_job()
        except AlreadyInProgress:
            conflicts += 1
        time.sleep(0.1)
    t.join()
    assert conflicts >= 5  # never taken over while the owner was alive
    assert held_at_end == [True]


async def test_async_leases_are_renewed_from_one_timer_per_loop(store: MemoryBackend) -> None:
    """Ten bodies outliving their 0.2 s lease keep it, with never more than one extra task."""
    idempotask.configure(backend=MemoryBackend())
    held: list[bool] = []

    @idempotent(lease=0.2)
    async def long_job(i: int) -> int:
        await asyncio.sleep(0.7)
        held.append(idempotask.lease_held())
        return i

    here = asyncio.current_task()
    jobs = [asyncio.create_task(long_job(i)) for i in range(10)]
    extra: list[set[str]] = []
    while not all(job.done() for job in jobs):
        others = asyncio.all_tasks() - set(jobs) - {here}
        extra.append({t.get_name() for t in others})
        assert len(others) <= 1, others
        await asyncio.sleep(0.005)
    assert await asyncio.gather(*jobs) == list(range(10))
    assert held == [True] * 10
    assert set().union(*extra) <= {"idempotask-lease-renewal"}


def test_sync_leases_on_one_store_share_one_renewal_thread(store: MemoryBackend) -> None:
    idempotask.configure(backend=MemoryBackend())
    gate = threading.Barrier(8)

    @idempotent(lease=0.2)
    def job(i: int) -> int:
        gate.wait()
        time.sleep(0.4)
        return i

    before = {t for t in threading.enumerate() if t.name == "idempotask-lease-renewal"}
    threads = [threading.Thread(target=job, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    renewers = {t for t in threading.enumerate() if t.name == "idempotask-lease-renewal"}
    for t in threads:
        t.join()
    assert len(renewers - before) == 1


def test_each_store_gets_its_own_renewal_thread() -> None:
    """Leases on two stores are renewed by two threads (one per store, not per call)."""
    stores = [MemoryBackend(), MemoryBackend()]
    gate = threading.Barrier(6)
    before = {t for t in threading.enumerate() if t.name == "idempotask-lease-renewal"}

    @idempotent(lease=0.2, backend=stores[0], name="renewal.store0")
    def job0(i: int) -> int:
        gate.wait()
        time.sleep(0.4)
        return i

    @idempotent(lease=0.2, backend=stores[1], name="renewal.store1")
    def job1(i: int) -> int:
        gate.wait()
        time.sleep(0.4)
        return i

    threads = [threading.Thread(target=(job0, job1)[i % 2], args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    renewers = {t for t in threading.enumerate() if t.name == "idempotask-lease-renewal"}
    for t in threads:
        t.join()
    assert len(renewers - before) == 2


# ---------------------------------------------------------------------------- keys and methods


class Account:
    def __init__(self, account_id: int) -> None:
        self.account_id = account_id
        self.charges = 0

    def __idempotency_key__(self) -> int:
        return self.account_id

    @idempotent(name="tests.account.charge")
    def charge(self, amount: int) -> str:
        self.charges += 1
        return f"{self.account_id}:{amount}"

    @classmethod
    @idempotent(name="tests.account.open")
    def open(cls, account_id: int) -> str:
        return f"{cls.__name__}:{account_id}"

    @staticmethod
    @idempotent(name="tests.account.rate")
    def rate(currency: str) -> float:
        return 1.5


def test_methods_key_self_through_idempotency_key(store: MemoryBackend) -> None:
    a, b, a_again = Account(1), Account(2), Account(1)
    assert a.charge(10) == "1:10"
    assert b.charge(10) == "2:10"
    assert a_again.charge(10) == "1:10"
    assert (a.charges, b.charges, a_again.charges) == (1, 1, 0)
    assert Account.charge.key_for(a, 10) == Account.charge.key_for(a_again, 10)
    assert Account.charge.key_for(a, 10) != Account.charge.key_for(b, 10)
    assert Account.open(3) == "Account:3"
    assert Account.rate("EUR") == 1.5


def test_an_instance_without_key_material_names_the_fix(store: MemoryBackend) -> None:
    class Mailer:
        @idempotent
        def send(self, to: str) -> None:
            return None

    with pytest.raises(MissingKeyMaterialError) as info:
        Mailer().send("a@example.com")
    message = str(info.value)
    assert "__idempotency_key__" in message
    assert "key=" in message
    assert "exclude_args=('self',)" in message
    assert info.value.path == "self"


def test_exclude_args_key_args_and_key_callable(store: MemoryBackend) -> None:
    @idempotent(exclude_args=("self", "trace_id"))
    def a(self: object, order: int, trace_id: str) -> int:
        return order

    @idempotent(key_args=("order",))
    def b(order: int, trace_id: str) -> int:
        return order

    @idempotent(key=lambda order, **_: ("order", order["id"]))
    def c(order: dict[str, Any], note: str = "") -> int:
        return int(order["id"])

    assert a.key_for(object(), 1, "t1") == a.key_for(object(), 1, "t2")
    assert b.key_for(1, "t1") == b.key_for(1, "t2") != b.key_for(2, "t1")
    assert c.key_for({"id": 4, "x": 1}) == c.key_for({"id": 4, "x": 2}, note="n")


def test_explicit_keys_detect_reuse_with_other_arguments(store: MemoryBackend) -> None:
    calls = 0

    @idempotent
    def pay(amount: int) -> int:
        nonlocal calls
        calls += 1
        return amount

    assert pay.using(key="hdr-123")(10) == 10
    assert pay.using(key="hdr-123")(amount=10) == 10
    assert calls == 1
    with pytest.raises(KeyMismatchError) as info:
        pay.using(key="hdr-123")(11)
    assert "hdr-123" not in str(info.value)  # the explicit key is hashed, never shown
    assert pay.using(key="hdr-456")(10) == 10
    assert calls == 2


def test_the_same_owner_retakes_its_own_in_progress_claim(store: MemoryBackend) -> None:
    @idempotent(on_conflict="raise")
    def task(x: int) -> int:
        return x * 2

    key = task.key_for(3)
    store.claim(key, "attempt-1", lease=60, owner="task-id-9")  # the first attempt died mid-way
    with pytest.raises(AlreadyInProgress):
        task.using(owner="another-task")(3)
    assert task.using(owner="task-id-9")(3) == 6  # the framework's retry of the same task
    assert task(3) == 6


def test_forget_and_forget_key(store: MemoryBackend) -> None:
    calls = 0

    @idempotent(on_conflict="raise")
    def job(x: int) -> int:
        nonlocal calls
        calls += 1
        return calls

    assert job(1) == 1
    assert job.forget(1) is True
    assert job.forget(1) is False
    assert job(1) == 2
    key = job.key_for(5)
    store.claim(key, "someone", lease=60)
    with pytest.raises(AlreadyInProgress):
        job.forget_key(key)
    assert job.forget_key(key, force=True) is True
    assert job(5) == 3


def test_two_functions_cannot_share_a_name() -> None:
    @idempotent(name="tests.shared-name")
    def first() -> None:
        return None

    with pytest.raises(DuplicateNameError, match=r"tests\.shared-name"):

        @idempotent(name="tests.shared-name")
        def second() -> None:
            return None


def test_a_function_in_main_warns_that_its_keys_depend_on_the_entry_point() -> None:
    namespace: dict[str, Any] = {"__name__": "__main__", "idempotent": idempotent}
    with pytest.warns(UserWarning, match="__main__"):
        exec("@idempotent\ndef main_job():\n    return 1\n", namespace)


def test_keys_have_the_documented_format() -> None:
    idempotask.configure(namespace="billing")

    @idempotent(name="billing.charge")
    def charge(x: int) -> int:
        return x

    ns, name, version, digest = charge.key_for(1).split(":")
    assert (ns, name, version) == ("billing", "billing.charge", "v1")
    assert len(digest) == 32
    assert int(digest, 16) >= 0


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"ttl": -1}, "ttl"),
        ({"ttl": "1h"}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"lease": 0}, "lease"),
        ({"lease": float("inf")}, "lease"),
        ({"on_conflict": "maybe"}, "on_conflict"),
        ({"wait_timeout": -2}, "wait_timeout"),
        ({"cache_errors": True}, "cache_errors"),
        ({"cache_errors": 0}, "cache_errors"),
        ({"on_backend_error": "ignore"}, "on_backend_error"),
        ({"backend": "localhost:6379"}, "backend"),
        ({"backend": 42}, "backend"),
        ({"serializer": "yaml"}, "serializer"),
        ({"key_args": ("nope",)}, "key_args"),
        ({"key_args": "a"}, "key_args"),
        ({"exclude_args": ("a",), "key_args": ("a",)}, "key_args"),
        ({"name": "has space"}, "name"),
        ({"name": "a{b}"}, "name"),
        ({"key": "not callable"}, "key"),
    ],
)
def test_bad_options_are_refused_at_decoration_naming_the_option(
    options: dict[str, Any], named: str
) -> None:
    def f(a: int) -> int:
        return a

    with pytest.raises(ConfigurationError, match=named):
        idempotent(**options)(f)


def test_configure_validates_and_names_the_option() -> None:
    with pytest.raises(ConfigurationError, match="default_ttl"):
        idempotask.configure(default_ttl=0)
    with pytest.raises(ConfigurationError, match="namespace"):
        idempotask.configure(namespace="a:b")
    with pytest.raises(ConfigurationError, match="unknown URL scheme 'mongodb'"):
        idempotask.configure(backend="mongodb://x")  # at once, not at the first call


def test_configure_after_decoration_is_honoured(clock: FakeClock) -> None:
    @idempotent
    def job() -> int:
        return 1

    first, second = MemoryBackend(), MemoryBackend()
    idempotask.configure(backend=first, namespace="one")
    job()
    assert first.get(job.key_for()) is not None
    idempotask.configure(backend=second, namespace="two")
    assert job.key_for().startswith("two:")
    job()
    assert second.get(job.key_for()) is not None


# ---------------------------------------------------------------------------- store failures


class BrokenStore(MemoryBackend):
    """A store whose every operation fails like a dead server."""

    def claim(self, *args: Any, **kwargs: Any) -> Record:
        raise BackendError("connection refused")

    async def aclaim(self, *args: Any, **kwargs: Any) -> Record:
        raise BackendError("connection refused")


def test_a_store_failure_raises_by_default_and_runs_unprotected_when_fail_open(
    seen: list[Any],
) -> None:
    idempotask.configure(backend=BrokenStore())
    calls = 0

    @idempotent
    def closed() -> int:
        nonlocal calls
        calls += 1
        return 1

    @idempotent(on_backend_error="open")
    def opened() -> int:
        nonlocal calls
        calls += 1
        return 2

    with pytest.raises(BackendError):
        closed()
    assert calls == 0
    assert opened() == 2
    assert opened() == 2
    assert calls == 2
    assert EventKind.FAIL_OPEN in kinds(seen)


class CorruptStore(MemoryBackend):
    """A store whose record under every key is not one it wrote."""

    def claim(self, key: str, *args: Any, **kwargs: Any) -> Record:
        raise CorruptRecordError(f"memory: the value under {key} is not a record")

    async def aclaim(self, key: str, *args: Any, **kwargs: Any) -> Record:
        raise CorruptRecordError(f"memory: the value under {key} is not a record")


def test_a_corrupt_record_fails_closed_even_when_fail_open(seen: list[Any]) -> None:
    """on_backend_error="open" is for outages: a corrupt record never runs the body."""
    idempotask.configure(backend=CorruptStore(), on_backend_error="open")
    calls = 0

    @idempotent
    def job() -> int:
        nonlocal calls
        calls += 1
        return 1

    for _ in range(2):
        with pytest.raises(CorruptRecordError):
            job()
    assert calls == 0
    assert EventKind.FAIL_OPEN not in kinds(seen)


async def test_a_corrupt_record_fails_closed_even_when_fail_open_async() -> None:
    idempotask.configure(backend=CorruptStore(), on_backend_error="open")
    calls = 0

    @idempotent
    async def job() -> int:
        nonlocal calls
        calls += 1
        return 1

    with pytest.raises(CorruptRecordError):
        await job()
    assert calls == 0


@pytest.mark.parametrize("state", ["completed", "failed"])
def test_a_foreign_payload_written_through_the_store_never_runs_the_body(state: str) -> None:
    """A record whose payload is not ours (written through the store API) is an error on
    every call, fail-open or not: the body never runs."""
    backend = MemoryBackend()
    idempotask.configure(backend=backend, on_backend_error="open")
    calls = 0

    @idempotent(cache_errors=60)
    def job(n: int) -> int:
        nonlocal calls
        calls += 1
        return n

    key = job.key_for(1)
    backend.claim(key, "foreign", lease=30)
    finish = backend.complete if state == "completed" else backend.fail
    assert finish(key, "foreign", b"\x80not ours", ttl=60)
    for _ in range(2):
        with pytest.raises(SerializationError):
            job(1)
    assert calls == 0


async def test_async_fail_open(seen: list[Any]) -> None:
    idempotask.configure(backend=BrokenStore(), on_backend_error="open")

    @idempotent
    async def job() -> str:
        return "unprotected"

    assert await job() == "unprotected"


def test_events_report_the_lifecycle_without_argument_values(
    store: MemoryBackend, seen: list[Any]
) -> None:
    @idempotent(name="tests.events.job")
    def job(secret: str) -> str:
        return "ok"

    job("hunter2")
    job("hunter2")
    assert kinds(seen) == [EventKind.CLAIMED, EventKind.COMPLETED, EventKind.DUPLICATE]
    assert all(e.name == "tests.events.job" for e in seen)
    assert all("hunter2" not in repr(e) for e in seen)
    assert seen[1].duration is not None


def test_dead_store_records_are_read_only_once_per_call(store: MemoryBackend) -> None:
    """The duplicate path makes exactly one store operation."""
    ops: list[str] = []

    class CountingStore(MemoryBackend):
        def claim(self, *a: Any, **k: Any) -> Record:
            ops.append("claim")
            return super().claim(*a, **k)

        def get(self, *a: Any, **k: Any) -> Record | None:
            ops.append("get")
            return super().get(*a, **k)

    idempotask.configure(backend=CountingStore())

    @idempotent
    def job() -> int:
        return 1

    job()
    ops.clear()
    job()
    assert ops == ["claim"]


def test_a_stored_record_is_completed_with_its_payload(store: MemoryBackend) -> None:
    @idempotent
    def job() -> list[int]:
        return [1, 2]

    job()
    record = store.get(job.key_for())
    assert record is not None
    assert record.state is State.COMPLETED
    assert record.payload


def test_idempotent_may_also_sit_over_staticmethod_and_classmethod(store: MemoryBackend) -> None:
    calls: list[str] = []

    class Rates:
        @idempotent(name="tests.rates.fetch")
        @staticmethod
        def fetch(currency: str) -> float:
            calls.append(currency)
            return 1.5

        @idempotent(name="tests.rates.make")
        @classmethod
        def make(cls, n: int) -> tuple[str, int]:
            calls.append(cls.__name__)
            return (cls.__name__, n)

    assert Rates.fetch("EUR") == Rates().fetch("EUR") == 1.5
    assert Rates.make(1) == Rates().make(1) == ("Rates", 1)
    assert calls == ["EUR", "Rates"]


# ---------------------------------------------------------------------------- size limits


def test_an_oversized_result_is_a_clear_error_and_releases_the_key(store: MemoryBackend) -> None:
    attempts = 0

    @idempotent(max_result_bytes=1000)
    def export() -> str:
        nonlocal attempts
        attempts += 1
        return "x" * 5000

    with pytest.raises(SerializationError, match=r"max_result_bytes=1,000") as info:
        export()
    assert "5,00" in str(info.value)  # the size, within a few bytes of framing
    with pytest.raises(SerializationError):
        export()
    assert attempts == 2  # released: nothing half-stored blocks the key


def test_the_result_limit_comes_from_configure_by_default(store: MemoryBackend) -> None:
    idempotask.configure(max_result_bytes=100)

    @idempotent
    def small() -> str:
        return "ok"

    @idempotent
    def big() -> list[int]:
        return list(range(1000))

    assert small() == "ok"
    with pytest.raises(SerializationError, match="max_result_bytes=100"):
        big()


def test_oversized_arguments_are_a_key_error_naming_the_fix(store: MemoryBackend) -> None:
    idempotask.configure(max_argument_bytes=10_000)
    calls = 0

    @idempotent
    def ingest(blob: bytes) -> int:
        nonlocal calls
        calls += 1
        return len(blob)

    assert ingest(b"x" * 100) == 100
    with pytest.raises(idempotask.KeyEncodingError, match="max_argument_bytes=10,000") as info:
        ingest(b"x" * 50_000)
    assert "key=" in str(info.value)
    assert calls == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1MB"])
def test_size_limits_are_validated(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_result_bytes"):
        idempotent(max_result_bytes=bad)(lambda: None)
    with pytest.raises(ConfigurationError, match="max_argument_bytes"):
        idempotask.configure(max_argument_bytes=bad)


_configured_elsewhere = threading.Event()


def _while_another_thread_configures() -> type[int]:
    # Evaluated as the return annotation, while the first call of the function reads the
    # settings: it waits there until another thread's configure() has returned.
    assert _configured_elsewhere.wait(10)
    return int


def test_a_configure_racing_a_first_call_is_not_missed() -> None:
    """configure() in another thread while a call reads the settings: the function must
    not keep the old namespace for good (its keys would differ from every other
    process's, so a call would run twice)."""
    _configured_elsewhere.clear()
    idempotask.configure(namespace="before")

    @idempotent(name="tests.race.configure")
    def job(n: int) -> _while_another_thread_configures():  # type: ignore[valid-type]
        return n

    def configure_elsewhere() -> None:
        time.sleep(0.05)  # the call is reading the settings by now
        idempotask.configure(namespace="after")
        _configured_elsewhere.set()

    other = threading.Thread(target=configure_elsewhere)
    other.start()
    job.key_for(1)  # a first call: reads the settings while configure() runs
    other.join()
    assert job.key_for(1).startswith("after:")
    assert job(1) == 1
    assert job.key_for(1).startswith("after:")


def test_a_lease_lost_under_warnings_as_errors_does_not_end_the_renewals() -> None:
    """With LeaseLostWarning turned into an error (-W error, pytest's filterwarnings), a
    lost lease must not end the store's renewal thread: no later lease on that store
    would be renewed, and a body running past its lease would run twice."""
    pytest.importorskip("redis")
    from idempotask.backends.redis import RedisBackend
    from tests.conftest import service_url

    store = RedisBackend.from_url(service_url("redis"))
    idempotask.configure(backend=store, namespace=f"warnerr{time.time_ns()}")
    runs: list[int] = []

    @idempotent(name="tests.lease.warnings_as_errors", lease=0.6, on_conflict="raise")
    def job(n: int, seconds: float) -> int:
        runs.append(n)
        time.sleep(seconds)
        return n

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", LeaseLostWarning)
            first = threading.Thread(target=job, args=(1, 1.0))
            first.start()
            time.sleep(0.1)
            job.forget_key(job.key_for(1, 1.0), force=True)  # its next renewal is refused
            first.join()
            # A body of 2 s under a 0.6 s lease: renewed, so a duplicate meanwhile is refused.
            second = threading.Thread(target=job, args=(2, 2.0))
            second.start()
            time.sleep(1.3)
            with pytest.raises(AlreadyInProgress):
                job(2, 2.0)
            second.join()
        assert runs == [1, 2]
        assert job(2, 2.0) == 2
        assert runs == [1, 2]
    finally:
        for args in ((1, 1.0), (2, 2.0)):
            job.forget_key(job.key_for(*args), force=True)
        store.close()

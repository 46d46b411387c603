"""Methods: helpers looked up on an instance (or a class, for class methods) bind it
exactly like the call does, through ``@idempotent`` and ``@dead_letter`` alike.

Before the fix the helpers ignored ``self``: ``account.charge.key_for(5)`` was a
TypeError, and with a default argument worse -- ``a.refund.forget(5)`` forgot the call
with ``self=5`` and ``a.refund.using(key="h")(5)`` ran the body with ``self=5``.
"""

from __future__ import annotations

import asyncio
import inspect
import pickle
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask import DeadLetterQueue, dead_letter, idempotent
from idempotask.backends.base import State
from idempotask.backends.memory import MemoryBackend, MemoryDeadLetterStore


@pytest.fixture
def store() -> MemoryBackend:
    backend = MemoryBackend()
    idempotask.configure(backend=backend)
    return backend


@pytest.fixture
def queue(tmp_path: Path) -> DeadLetterQueue:
    return DeadLetterQueue(MemoryDeadLetterStore(), spool=tmp_path / "spool.jsonl")


class Account:
    def __init__(self, account_id: int) -> None:
        self.account_id = account_id
        self.ran: list[tuple[Any, ...]] = []

    def __idempotency_key__(self) -> int:
        return self.account_id

    @idempotent(name="tests.methods.charge")
    def charge(self, amount: int) -> str:
        self.ran.append(("charge", amount))
        return f"{self.account_id}:{amount}"

    @idempotent(name="tests.methods.refund")
    def refund(self, amount: Any = 0) -> str:
        assert isinstance(self, Account), f"the body ran with self={self!r}"
        self.ran.append(("refund", amount))
        return f"refunded {amount} from {self.account_id}"

    @idempotent(name="tests.methods.fetch")
    async def fetch(self, n: int) -> int:
        self.ran.append(("fetch", n))
        return n * 2


def test_key_for_on_an_instance_passes_the_instance_first(store: MemoryBackend) -> None:
    a, b = Account(1), Account(2)
    assert a.charge.key_for(5) == Account.charge.key_for(a, 5)
    assert a.charge.key_for(5) != b.charge.key_for(5)
    a.charge(5)
    record = store.get(a.charge.key_for(5))
    assert record is not None
    assert record.state is State.COMPLETED


def test_forget_on_an_instance_forgets_that_instances_call(store: MemoryBackend) -> None:
    """With a default argument the old helper silently forgot the call with self=5."""
    a = Account(1)
    assert a.refund(5) == "refunded 5 from 1"
    assert a.refund.forget(5) is True
    assert a.refund(5) == "refunded 5 from 1"
    assert a.ran == [("refund", 5), ("refund", 5)]


def test_using_on_an_instance_runs_the_body_with_that_instance(store: MemoryBackend) -> None:
    a = Account(1)
    assert a.refund.using(key="hdr-1")(5) == "refunded 5 from 1"
    assert a.refund.using(key="hdr-1")(5) == "refunded 5 from 1"  # a duplicate
    assert a.ran == [("refund", 5)]
    assert a.refund.using(owner="task-1")(7) == "refunded 7 from 1"
    assert a.refund.using(owner="task-1").key_for(7) == a.refund.key_for(7)
    assert a.refund.using(key="hdr-1").key_for(5) == a.refund.key_for_explicit("hdr-1")


def test_a_bound_method_has_the_signature_without_self(store: MemoryBackend) -> None:
    a = Account(1)
    assert list(inspect.signature(a.refund).parameters) == ["amount"]
    assert list(inspect.signature(Account.refund).parameters) == ["self", "amount"]
    assert a.refund.__name__ == "refund"
    assert a.refund.idempotency.name == "tests.methods.refund"
    assert a.refund.__self__ is a
    assert a.refund == a.refund
    assert a.refund != Account(1).refund


def test_async_methods_stay_coroutine_functions_and_get_async_helpers(
    store: MemoryBackend,
) -> None:
    a = Account(1)
    assert inspect.iscoroutinefunction(Account.fetch)
    assert inspect.iscoroutinefunction(a.fetch)

    async def main() -> None:
        assert await a.fetch(3) == 6
        assert await a.fetch(3) == 6
        assert await a.fetch.aforget(3) is True
        assert await a.fetch(3) == 6
        key = a.fetch.key_for(3)
        assert await a.fetch.aforget_key(key) is True
        assert await a.fetch.aforget_key(key) is False

    asyncio.run(main())
    assert a.ran == [("fetch", 3), ("fetch", 3)]


@pytest.mark.parametrize("order", ["classmethod outside", "classmethod inside"])
def test_class_method_helpers_bind_the_class_in_either_order(
    store: MemoryBackend, order: str
) -> None:
    ran: list[str] = []
    if order == "classmethod outside":

        class Rates:
            @classmethod
            @idempotent(name="tests.methods.rates.outside")
            def make(cls, n: int, scale: int = 1) -> str:
                ran.append(cls.__name__)
                return f"{cls.__name__}:{n * scale}"

    else:

        class Rates:  # type: ignore[no-redef]
            @idempotent(name="tests.methods.rates.inside")
            @classmethod
            def make(cls, n: int, scale: int = 1) -> str:
                ran.append(cls.__name__)
                return f"{cls.__name__}:{n * scale}"

    class Child(Rates):
        pass

    assert Rates.make(2) == "Rates:2"
    assert Rates().make(2) == "Rates:2"
    assert Child.make(2) == "Child:2"
    assert ran == ["Rates", "Child"]
    assert Rates.make.key_for(2) == Rates().make.key_for(2) != Child.make.key_for(2)
    assert Rates.make.forget(2) is True
    assert Rates.make.using(key="k")(2) == "Rates:2"
    assert ran == ["Rates", "Child", "Rates"]
    assert Child.make.using(owner="t").key_for(2) == Child.make.key_for(2)


@pytest.mark.parametrize("order", ["staticmethod outside", "staticmethod inside"])
def test_static_method_helpers_take_no_instance_in_either_order(
    store: MemoryBackend, order: str
) -> None:
    if order == "staticmethod outside":

        class Rates:
            @staticmethod
            @idempotent(name="tests.methods.static.outside")
            def fetch(currency: str) -> str:
                return currency

    else:

        class Rates:  # type: ignore[no-redef]
            @idempotent(name="tests.methods.static.inside")
            @staticmethod
            def fetch(currency: str) -> str:
                return currency

    assert Rates.fetch("EUR") == Rates().fetch("EUR") == "EUR"
    assert Rates.fetch.key_for("EUR") == Rates().fetch.key_for("EUR")
    assert Rates().fetch.forget("EUR") is True
    assert Rates().fetch.using(key="k")("EUR") == "EUR"


class Ledger:
    def __init__(self, ledger_id: int, fail: bool = False) -> None:
        self.ledger_id = ledger_id
        self.fail = fail
        self.ran = 0

    def __idempotency_key__(self) -> int:
        return self.ledger_id


def test_dead_letter_over_idempotent_methods_bind_their_helpers(
    store: MemoryBackend, queue: DeadLetterQueue
) -> None:
    class Books(Ledger):
        @dead_letter(queue=queue, name="tests.methods.books.post")
        @idempotent(name="tests.methods.books.post")
        def post(self, amount: int, memo: str = "") -> str:
            self.ran += 1
            if self.fail:
                raise ConnectionError("ledger unreachable")
            return f"{self.ledger_id}:{amount}"

    a = Books(1)
    assert a.post(5) == "1:5"
    assert a.post.key_for(5) == Books.post.key_for(a, 5)
    assert a.post.forget(5) is True
    assert a.post.using(key="hdr")(5) == "1:5"
    assert a.post.using(key="hdr").key_for(5) == a.post.key_for_explicit("hdr")
    assert a.post.forget_key(a.post.key_for_explicit("hdr")) is True
    assert a.ran == 2
    assert list(inspect.signature(a.post).parameters) == ["amount", "memo"]

    broken = Books(2, fail=True)
    with pytest.raises(ConnectionError):
        broken.post(9)
    with pytest.raises(ConnectionError):
        broken.post.using(key="hdr-2")(9)
    keys = {letter.key for letter in queue.query(limit=10)}
    assert keys == {broken.post.key_for(9), broken.post.key_for_explicit("hdr-2")}


def test_dead_letter_over_an_async_idempotent_method_stays_a_coroutine_function(
    store: MemoryBackend, queue: DeadLetterQueue
) -> None:
    class Books(Ledger):
        @dead_letter(queue=queue, name="tests.methods.books.apost")
        @idempotent(name="tests.methods.books.apost")
        async def apost(self, amount: int) -> int:
            self.ran += 1
            return amount

    a = Books(1)
    assert inspect.iscoroutinefunction(Books.apost)
    assert inspect.iscoroutinefunction(a.apost)

    async def main() -> None:
        assert await a.apost(4) == 4
        assert await a.apost.aforget(4) is True
        assert await a.apost.using(key="h")(4) == 4
        assert await a.apost.aforget_key(a.apost.key_for_explicit("h")) is True

    asyncio.run(main())
    assert a.ran == 2


@pytest.mark.parametrize("order", ["classmethod outside", "classmethod inside"])
def test_dead_letter_over_idempotent_class_methods_bind_the_class(
    store: MemoryBackend, queue: DeadLetterQueue, order: str
) -> None:
    if order == "classmethod outside":

        class Jobs:
            @classmethod
            @dead_letter(queue=queue, name="tests.methods.jobs.outside")
            @idempotent(name="tests.methods.jobs.outside")
            def run(cls, n: int) -> str:
                return f"{cls.__name__}:{n}"

    else:

        class Jobs:  # type: ignore[no-redef]
            @dead_letter(queue=queue, name="tests.methods.jobs.inside")
            @idempotent(name="tests.methods.jobs.inside")
            @classmethod
            def run(cls, n: int) -> str:
                return f"{cls.__name__}:{n}"

    assert Jobs.run(1) == Jobs().run(1) == "Jobs:1"
    assert Jobs.run.key_for(1) == Jobs().run.key_for(1)
    assert Jobs.run.forget(1) is True
    assert Jobs.run.using(key="k")(1) == "Jobs:1"


# Module level, so that pickle finds them by name.
@idempotent(name="tests.methods.pickled")
def pickled(n: int) -> int:
    return n


class Pickled:
    def __idempotency_key__(self) -> str:
        return "p"

    @idempotent(name="tests.methods.pickled.method")
    def method(self, n: int) -> int:
        return n


def test_decorated_functions_and_bound_methods_pickle_by_reference(store: MemoryBackend) -> None:
    """What RQ, multiprocessing and Celery need of a function they send elsewhere."""
    assert pickle.loads(pickle.dumps(pickled)) is pickled
    bound = pickle.loads(pickle.dumps(Pickled().method))
    assert bound(3) == 3
    assert bound.key_for(3) == Pickled().method.key_for(3)

"""Ordinary uses of the public API; ``mypy --strict`` must accept this file as written.

tests/test_typing.py runs mypy on it, so a decorator that loses the wrapped signature
fails the suite.
"""

from __future__ import annotations

import datetime
from decimal import Decimal

import idempotask
from idempotask import IdempotentFunction, idempotent

idempotask.configure(backend="memory://", namespace="typing", default_ttl=60)


@idempotent
def bare(job_id: int, day: datetime.date) -> dict[str, int]:
    return {"job": job_id}


@idempotent(ttl=3600, on_conflict="raise", exclude_args=("trace",))
def called(amount: Decimal, trace: str = "") -> str:
    return str(amount)


@idempotent(ttl=10)
async def fetch(url: str) -> bytes:
    return url.encode()


result: dict[str, int] = bare(1, datetime.date(2026, 1, 1))
text: str = called(Decimal("1.5"), trace="t")
key: str = called.key_for(Decimal("1.5"))
forgot: bool = called.forget(Decimal("1.5"))
explicit: str = called.using(key="hdr-1")(Decimal("2"))
as_protocol: IdempotentFunction[[Decimal, str], str] = called


async def use_async() -> bytes:
    return await fetch("https://example.com")


class Account:
    def __init__(self, account_id: int) -> None:
        self.account_id = account_id

    def __idempotency_key__(self) -> int:
        return self.account_id

    @idempotent(name="typing.account.charge")
    def charge(self, amount: int) -> int:
        return amount


charged: int = Account(1).charge(5)


# -- methods looked up on an instance: the helpers bind it, like the call -------------------

account = Account(1)
method_key: str = account.charge.key_for(5)
method_forgot: bool = account.charge.forget(5)
method_explicit: int = account.charge.using(key="hdr-2")(5)
method_owned: int = account.charge.using(owner="task-1")(5)
method_explicit_key: str = account.charge.using(key="hdr-2").key_for(5)
as_method: idempotask.IdempotentMethod[[int], int] = account.charge
unbound_key: str = Account.charge.key_for(account, 5)


# -- class and static methods, in either decorator order ------------------------------------


class Rates:
    @classmethod
    @idempotent(name="typing.rates.outside")
    def outside(cls, currency: str) -> float:
        return 1.5

    @idempotent(name="typing.rates.inside")
    @classmethod
    def inside(cls, currency: str) -> float:
        return 1.5

    @staticmethod
    @idempotent(name="typing.rates.static_outside")
    def static_outside(currency: str) -> float:
        return 1.5

    @idempotent(name="typing.rates.static_inside")
    @staticmethod
    def static_inside(currency: str) -> float:
        return 1.5


rate: float = Rates.outside("EUR") + Rates().outside("EUR")
rate_key: str = Rates.outside.key_for("EUR")
rate_forgot: bool = Rates().outside.forget("EUR")
rate_inside: float = Rates.inside("EUR") + Rates().inside("EUR")
rate_inside_key: str = Rates.inside.key_for("EUR")
rate_inside_using: float = Rates.inside.using(key="k")("EUR")
static_rate: float = Rates.static_outside("EUR") + Rates().static_outside("EUR")
static_key: str = Rates.static_outside.key_for("EUR")
static_inside_rate: float = Rates.static_inside("EUR") + Rates().static_inside("EUR")
static_inside_key: str = Rates().static_inside.key_for("EUR")


# -- @dead_letter over @idempotent: the same helpers ----------------------------------------


@idempotask.dead_letter(redact=lambda a: {"order_id": a["order_id"]})
@idempotent(ttl=600)
def settle(order_id: int, card: str) -> str:
    return f"settled {order_id}"


settled: str = settle(1, "tok")
settle_key: str = settle.key_for(1, "tok")
settle_forgot: bool = settle.forget(1, "tok")
settle_forgot_key: bool = settle.forget_key(settle_key, force=True)
settle_explicit: str = settle.using(key="hdr-3")(1, "tok")
settle_explicit_key: str = settle.key_for_explicit("hdr-3")
settle_name: str = settle.dead_letter_name


class Ledger:
    def __idempotency_key__(self) -> str:
        return "ledger"

    @idempotask.dead_letter()
    @idempotent(name="typing.ledger.post")
    def post(self, amount: int) -> int:
        return amount

    @classmethod
    @idempotask.dead_letter()
    @idempotent(name="typing.ledger.open")
    def open(cls, day: datetime.date) -> str:
        return cls.__name__


posted: int = Ledger().post(3)
post_key: str = Ledger().post.key_for(3)
post_using: int = Ledger().post.using(key="hdr-4")(3)
opened: str = Ledger.open(datetime.date(2026, 1, 1))
open_key: str = Ledger.open.key_for(datetime.date(2026, 1, 1))


# -- async helpers ----------------------------------------------------------------------------


class Feed:
    def __idempotency_key__(self) -> str:
        return "feed"

    @idempotent(name="typing.feed.pull")
    async def pull(self, page: int) -> list[str]:
        return [str(page)]


async def use_async_helpers() -> None:
    got: bytes = await fetch.using(key="hdr-5")("https://example.com")
    forgot_async: bool = await fetch.aforget("https://example.com")
    forgot_key_async: bool = await fetch.aforget_key(fetch.key_for("https://example.com"))
    page: list[str] = await Feed().pull(1)
    page_forgot: bool = await Feed().pull.aforget(1)
    page_key: str = Feed().pull.key_for(1)
    explicit_forgot: bool = await Feed().pull.using(key="hdr-6").aforget(1)
    print(got, forgot_async, forgot_key_async, page, page_forgot, page_key, explicit_forgot)


# Transactional mode: the option types, and transaction() gives the body's connection.
@idempotent(ttl=60, transactional=True)
def write_order(order_id: int) -> int:
    conn = idempotask.transaction()
    conn.execute("...")
    return order_id


write_total: int = write_order(1)
lost: type[idempotask.AlreadyInProgress] = idempotask.LeaseLostError

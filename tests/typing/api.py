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

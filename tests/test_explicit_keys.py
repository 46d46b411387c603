"""Explicit keys and hand-computed keys: every key a call is stored under can be computed,
shown and forgotten, and ``make_key`` gives exactly the key a call gets.

Before the fix there was no way to compute the stored key of ``using(key=header)``,
``forget_key(header)`` silently returned False, and ``make_key(name, **args)`` gave a
key no call ever used.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
import sys
import textwrap
import uuid
from decimal import Decimal
from typing import Any

import pytest

import idempotask
from idempotask import ConfigurationError, idempotent, make_key
from idempotask.backends.base import State
from idempotask.backends.memory import MemoryBackend
from tests.conftest import service_url


@pytest.fixture
def store() -> MemoryBackend:
    backend = MemoryBackend()
    idempotask.configure(backend=backend, namespace="explicit")
    return backend


def test_key_for_explicit_is_the_key_a_call_with_that_explicit_key_is_stored_under(
    store: MemoryBackend,
) -> None:
    @idempotent(name="tests.explicit.charge")
    def charge(order: int) -> str:
        return f"charged {order}"

    charge.using(key="Idem-123")(7)
    key = charge.key_for_explicit("Idem-123")
    record = store.get(key)
    assert record is not None
    assert record.state is State.COMPLETED
    assert key.startswith("explicit:tests.explicit.charge:v1:x")
    assert "Idem-123" not in key  # the header may be secret: it is hashed
    assert charge.using(key="Idem-123").key_for(7) == key
    assert charge.key_for_explicit("Idem-124") != key


def test_an_explicit_call_is_forgotten_through_using_or_its_key(store: MemoryBackend) -> None:
    runs: list[int] = []

    @idempotent(name="tests.explicit.forget")
    def charge(order: int) -> int:
        runs.append(order)
        return order

    charge.using(key="h1")(1)
    assert charge.using(key="h1").forget(1) is True
    charge.using(key="h1")(1)
    assert charge.forget_key(charge.key_for_explicit("h1")) is True
    charge.using(key="h1")(1)
    assert runs == [1, 1, 1]

    async def main() -> None:
        assert await charge.using(key="h1").aforget(1) is True
        assert await charge.aforget_key(charge.key_for_explicit("h1")) is False

    asyncio.run(main())


def test_forget_key_with_a_header_instead_of_a_store_key_is_an_error(store: MemoryBackend) -> None:
    """It used to return False, and the stale result stayed."""

    @idempotent(name="tests.explicit.header")
    def charge(order: int) -> int:
        return order

    charge.using(key="secret-header-value")(1)
    with pytest.raises(ConfigurationError) as info:
        charge.forget_key("secret-header-value")
    message = str(info.value)
    assert "key_for_explicit" in message
    assert "secret-header-value" not in message
    with pytest.raises(ConfigurationError):
        charge.forget_key(charge.key_for(1).replace("tests.explicit.header", "other.fn"))


def test_forget_key_accepts_keys_under_previous_names_and_other_namespaces(
    store: MemoryBackend,
) -> None:
    @idempotent(name="tests.explicit.renamed", previous_names=("tests.explicit.old",))
    def job(n: int) -> int:
        return n

    key = job.key_for(1)
    assert job.forget_key(key.replace("tests.explicit.renamed", "tests.explicit.old")) is False
    assert job.forget_key("otherns" + key[len("explicit") :]) is False


def test_make_key_gives_the_key_of_the_call_defaults_applied(store: MemoryBackend) -> None:
    @idempotent(name="tests.explicit.autoclose")
    def autoclose(job_id: int, day: datetime.date, mode: str = "auto") -> None:
        return None

    day = datetime.date(2026, 1, 2)
    key = autoclose.key_for(7, day)
    assert make_key("tests.explicit.autoclose", job_id=7, day=day) == key
    assert make_key("tests.explicit.autoclose", day=day, job_id=7) == key
    assert make_key("tests.explicit.autoclose", {"job_id": 7, "day": day, "mode": "auto"}) == key
    assert make_key("tests.explicit.autoclose", job_id=7, day=day, mode="manual") != key
    assert make_key("tests.explicit.autoclose", {"job_id": 7, "day": day}, namespace="o") == (
        "o" + key[len("explicit") :]
    )


def test_make_key_follows_key_args_key_callables_and_variadic_parameters(
    store: MemoryBackend,
) -> None:
    @idempotent(name="tests.explicit.ship", key_args=("order_id",))
    def ship(order_id: int, trace: str = "") -> None:
        return None

    @idempotent(name="tests.explicit.handle", key=lambda event, **_: event["id"])
    def handle(event: dict[str, Any], *, verbose: bool = False) -> None:
        return None

    @idempotent(name="tests.explicit.variadic")
    def variadic(a: int, /, *rest: int, scale: Decimal = Decimal(1), **extra: str) -> None:
        return None

    assert make_key("tests.explicit.ship", order_id=3, trace="x") == ship.key_for(3, "y")
    assert make_key("tests.explicit.handle", event={"id": 9, "x": 1}) == handle.key_for({"id": 9})
    assert make_key(
        "tests.explicit.variadic", a=1, rest=[2, 3], extra={"k": "v"}
    ) == variadic.key_for(1, 2, 3, k="v")


def test_make_key_needs_the_function_and_its_parameter_names(store: MemoryBackend) -> None:
    with pytest.raises(ConfigurationError, match="import the module"):
        make_key("tests.explicit.never-defined", a=1)

    @idempotent(name="tests.explicit.named")
    def named(a: int) -> None:
        return None

    with pytest.raises(ConfigurationError, match="takes no argument 'b'"):
        make_key("tests.explicit.named", a=1, b=2)
    with pytest.raises(TypeError, match="missing a required argument"):
        make_key("tests.explicit.named")


def test_make_key_is_the_same_in_another_interpreter() -> None:
    script = textwrap.dedent(
        """
        import datetime, decimal
        from idempotask import idempotent, make_key

        @idempotent(name="x.y")
        def f(a, b, c=decimal.Decimal("2.50"), d=None):
            return None

        args = dict(a={"k": {1, 2, "z"}, 3.5: [None, b"b"]}, b=frozenset({"p", "q"}),
                    d=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))
        print(make_key("x.y", **args), f.key_for(**args))
        """
    )
    outputs = set()
    for seed in ("0", "1", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        made, called = out.stdout.split()
        assert made == called
        outputs.add(made)
    assert len(outputs) == 1


def test_key_for_is_the_key_under_which_redis_holds_the_record_as_documented() -> None:
    """On Redis the record of key ``ns:name:v1:digest`` is ``ns:{name:v1:digest}``."""
    redis_py = pytest.importorskip("redis")
    url = service_url("redis")
    from idempotask.backends.redis import RedisBackend, record_key

    namespace = f"explicit{uuid.uuid4().hex[:10]}"
    backend = RedisBackend.from_url(url)
    idempotask.configure(backend=backend, namespace=namespace)

    @idempotent(name="tests.explicit.redis")
    def charge(order: int) -> int:
        return order

    charge(5)
    key = charge.key_for(5)
    client = redis_py.Redis.from_url(url)
    try:
        assert record_key(key) == f"{namespace}:{{tests.explicit.redis:v1:{key.rsplit(':', 1)[1]}}}"
        assert client.exists(record_key(key)) == 1
        assert charge.forget(5) is True
        assert client.exists(record_key(key)) == 0
    finally:
        client.close()
        backend.close()


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_forget_drops_the_record_under_previous_names_too_so_the_call_runs_again(
    where: str,
) -> None:
    """A record under a previous name answers the next call: forget() that left it would
    say True and the call would still not run again."""
    backend: Any = MemoryBackend()
    if where == "redis":
        pytest.importorskip("redis")
        from idempotask.backends.redis import RedisBackend

        backend = RedisBackend.from_url(service_url("redis"))
    idempotask.configure(backend=backend, namespace=f"explicit{uuid.uuid4().hex[:10]}")
    runs: list[int] = []

    @idempotent(name=f"tests.explicit.renamed_{where}", previous_names=("tests.explicit.was",))
    def job(n: int) -> int:
        runs.append(n)
        return len(runs)

    @idempotent(name=f"tests.explicit.arenamed_{where}", previous_names=("tests.explicit.awas",))
    async def ajob(n: int) -> int:
        runs.append(n)
        return len(runs)

    try:
        assert job(1) == job(1) == 1
        assert job.forget(1) is True
        assert job(1) == 2
        assert job.using(owner="o").forget(1) is True
        assert job(1) == 3
        assert job.forget(1) is True
        assert job.forget(1) is False

        async def run_async() -> None:
            assert await ajob(1) == await ajob(1) == 4
            assert await ajob.aforget(1) is True
            assert await ajob(1) == 5

        asyncio.run(run_async())
        assert runs == [1] * 5
    finally:
        job.forget(1)
        if where == "redis":
            backend.close()

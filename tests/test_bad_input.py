"""Bad input gets a library error naming the argument or option, at the earliest moment.

Each test here failed before its fix with a stray AttributeError, ValueError, OverflowError
or decimal.Overflow, with an error only at call time, or with nothing at all.
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import idempotask
from idempotask import ConfigurationError, KeyEncodingError, idempotent


@pytest.mark.parametrize("bad", [b"x", 123, 1.5, None.__class__])
def test_an_explicit_key_that_is_not_a_str_is_a_key_encoding_error(bad: Any) -> None:
    @idempotent
    def charge(order: int) -> int:
        return order

    with pytest.raises(KeyEncodingError) as info:
        charge.using(key=bad)(1)
    assert "using(key=...)" in str(info.value)
    assert type(bad).__name__ in str(info.value)


def test_an_empty_explicit_key_is_refused() -> None:
    """A missing header must not become one key shared by every request."""

    @idempotent
    def charge(order: int) -> int:
        return order

    with pytest.raises(ConfigurationError, match="empty"):
        charge.using(key="")


def test_an_owner_that_is_not_a_str_is_refused() -> None:
    @idempotent
    def charge(order: int) -> int:
        return order

    with pytest.raises(ConfigurationError, match="owner"):
        charge.using(owner=7)  # type: ignore[arg-type]


def test_a_misspelt_using_option_names_the_function_and_the_options() -> None:
    @idempotent
    def charge(order: int) -> int:
        return order

    with pytest.raises(TypeError) as info:
        charge.using(kye="h")  # type: ignore[call-arg]
    message = str(info.value)
    assert "<lambda>" not in message
    assert "<locals>" not in message
    assert "'kye'" in message
    assert "charge" in message
    assert "key=" in message
    assert "owner=" in message


def test_an_int_too_long_for_str_is_a_key_encoding_error_naming_the_argument() -> None:
    @idempotent
    def f(n: int) -> int:
        return 1

    with pytest.raises(KeyEncodingError) as info:
        f.key_for(10**5000)
    assert info.value.path == "n"
    assert "'n'" in str(info.value)
    assert f.key_for(10**4299) != f.key_for(10**4298)  # long, but fine


def test_huge_ints_are_refused_the_same_way_whatever_the_interpreter_limit() -> None:
    """A process that raised sys.set_int_max_str_digits must not make keys that other
    processes cannot: the limit is part of the encoding, not of the interpreter."""
    import sys

    @idempotent
    def f(n: int) -> int:
        return 1

    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        with pytest.raises(KeyEncodingError):
            f.key_for(10**5000)
        with pytest.raises(KeyEncodingError):
            f.key_for(-(10**4300))
        f.key_for(-(10**4300) + 1)  # 4300 digits: fine
    finally:
        sys.set_int_max_str_digits(old)


def test_decimals_beyond_the_default_context_encode_by_value() -> None:
    @idempotent
    def f(d: decimal.Decimal) -> int:
        return 1

    big = f.key_for(decimal.Decimal("1E+1000000"))
    assert big == f.key_for(decimal.Decimal("10E+999999"))
    assert big != f.key_for(decimal.Decimal("1E+999999"))
    tiny = f.key_for(decimal.Decimal("1E-1000000"))
    assert tiny == f.key_for(decimal.Decimal("0.1E-999999"))


def test_an_aware_datetime_outside_the_utc_range_is_a_key_encoding_error() -> None:
    @idempotent
    def f(at: datetime.datetime) -> int:
        return 1

    plus_one = datetime.timezone(datetime.timedelta(hours=1))
    with pytest.raises(KeyEncodingError) as info:
        f.key_for(datetime.datetime.min.replace(tzinfo=plus_one))
    assert info.value.path == "at"
    minus_one = datetime.timezone(datetime.timedelta(hours=-1))
    with pytest.raises(KeyEncodingError):
        f.key_for(datetime.datetime.max.replace(tzinfo=minus_one))


def test_key_callable_with_key_args_or_exclude_args_is_refused_when_decorating() -> None:
    with pytest.raises(ConfigurationError, match="key="):
        idempotent(key=lambda a: a, key_args=("a",))(lambda a: a)
    with pytest.raises(ConfigurationError, match="key="):
        idempotent(key=lambda a: a, exclude_args=("a",))(lambda a: a)


def test_an_unknown_backend_scheme_fails_when_decorating() -> None:
    with pytest.raises(ConfigurationError, match="nosuch"):

        @idempotent(backend="nosuch://x")
        def f() -> None:
            return None


def test_an_unknown_backend_scheme_fails_in_configure() -> None:
    with pytest.raises(ConfigurationError, match="nosuch"):
        idempotask.configure(backend="nosuch://x")


def test_a_known_scheme_is_accepted_without_connecting() -> None:
    """Checking the scheme builds nothing: an unreachable server decorates fine."""

    @idempotent(backend="redis://127.0.0.1:1/0")
    def f() -> None:
        return None

    @idempotent(backend="postgresql+psycopg://nobody@127.0.0.1:1/none")
    def g() -> None:
        return None

    idempotask.configure(backend="sqlite:////nonexistent-dir/x.db")


def test_a_registered_scheme_is_accepted() -> None:
    from idempotask.backends import register_scheme
    from idempotask.backends.memory import MemoryBackend

    register_scheme("tests-bad-input", lambda url: MemoryBackend())

    @idempotent(backend="tests-bad-input://x")
    def f() -> int:
        return 1

    assert f() == 1


def test_generator_functions_are_refused_when_decorating() -> None:
    def numbers() -> Iterator[int]:
        yield 1

    async def anumbers() -> AsyncIterator[int]:
        yield 1

    for func in (numbers, anumbers):
        with pytest.raises(ConfigurationError) as info:
            idempotent(func)
        message = str(info.value)
        assert "generator" in message
        assert "pickle" not in message


def test_a_callable_object_without_a_name_is_refused_and_with_name_works() -> None:
    """A callable instance has no ``__qualname__``: the decorator asks for ``name=``
    instead of failing with AttributeError; with a name it deduplicates like a function."""

    class Charger:
        def __init__(self) -> None:
            self.runs = 0

        def __call__(self, order: int) -> int:
            self.runs += 1
            return order

    with pytest.raises(ConfigurationError, match="name="):
        idempotask.idempotent(Charger())
    charger = Charger()
    charge = idempotask.idempotent(name="tests.bad_input.charger")(charger)
    assert charge(7) == charge(7) == 7
    assert charger.runs == 1

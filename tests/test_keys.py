"""Canonical keys (DESIGN §2): golden vectors, equalities, differences, determinism."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import uuid
from decimal import Decimal
from typing import Any, ClassVar, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import idempotask
from idempotask import KeyEncodingError, MissingKeyMaterialError, idempotent
from idempotask.keys import encode

UTC = datetime.timezone.utc

# Every row of the DESIGN §2 table, pinned. Changing any of these changes users' keys:
# that needs a new KEY_VERSION and a transition, never a silent edit.
GOLDEN: list[tuple[Any, bytes]] = [
    (1, b"i1:1"),
    (-5, b"i2:-5"),
    (2**70, b"i22:1180591620717411303424"),
    (1.0, b"f20:0x1.0000000000000p+0"),
    (0.1, b"f20:0x1.999999999999ap-4"),
    (0.0, b"f0"),
    (-0.0, b"f0"),
    (float("nan"), b"fnan"),
    (float("inf"), b"f+inf"),
    (float("-inf"), b"f-inf"),
    (True, b"T"),
    (False, b"F"),
    ("1", b"s1:1"),
    (None, b"N"),
    ("None", b"s4:None"),
    ("\u00e9\ud800", b"s2:\xc3\xa9\xed\xa0\x80"),
    (b"1", b"b2:31"),
    ((1, 2), b"l2[i1:1i1:2]"),
    ([1, 2], b"l2[i1:1i1:2]"),
    ({2, 1}, b"e2[i1:1i1:2]"),
    (frozenset({1, 2}), b"e2[i1:1i1:2]"),
    ({"b": 2, "a": 1}, b"d2[s1:ai1:1s1:bi1:2]"),
    ({1: "x"}, b"d1[i1:1s1:x]"),
    ({"1": "x"}, b"d1[s1:1s1:x]"),
    (Decimal("1.0"), b"m1:1"),
    (Decimal("1.00"), b"m1:1"),
    (Decimal("1E+2"), b"m4:1E+2"),
    (Decimal("-0"), b"m0"),
    (datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), b"z19:2026-01-02T03:04:05"),
    (
        datetime.datetime(
            2026, 1, 2, 4, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=1))
        ),
        b"z19:2026-01-02T03:04:05",
    ),
    (datetime.datetime(2026, 1, 2, 3, 4, 5), b"t19:2026-01-02T03:04:05"),
    (datetime.date(2026, 1, 2), b"D10:2026-01-02"),
    (datetime.time(3, 4, 5), b"h8:03:04:05"),
    (datetime.timedelta(days=1, seconds=2, microseconds=3), b"r5:1.2.3"),
    (uuid.UUID(int=1), b"u00000000000000000000000000000001"),
    (pathlib.PurePosixPath("/tmp/x"), b"p6:/tmp/x"),
]


class Color(enum.Enum):
    RED = "r"
    BLUE = 2


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Pair(NamedTuple):
    x: int
    y: int


class Customer:
    def __init__(self, customer_id: int) -> None:
        self.customer_id = customer_id

    def __idempotency_key__(self) -> int:
        return self.customer_id


class Vendor:
    def __init__(self, vendor_id: int) -> None:
        self.vendor_id = vendor_id

    def __idempotency_key__(self) -> int:
        return self.vendor_id


def _tag(letter: str, cls: type, rest: str) -> bytes:
    name = f"{cls.__module__}.{cls.__qualname__}"
    return f"{letter}{len(name)}:{name}{rest}".encode()


GOLDEN_TAGGED: list[tuple[Any, bytes]] = [
    (Color.RED, _tag("E", Color, "s1:r")),
    (Color.BLUE, _tag("E", Color, "i1:2")),
    (Point(1, 2), _tag("C", Point, "2[s1:xi1:1s1:yi1:2]")),
    (Pair(1, 2), _tag("C", Pair, "2[s1:xi1:1s1:yi1:2]")),
    (Customer(7), _tag("K", Customer, "i1:7")),
    (Point, _tag("y", Point, "")),
]


@pytest.mark.parametrize(("value", "expected"), GOLDEN, ids=lambda v: repr(v)[:40])
def test_golden_encoding_of_builtin_values(value: Any, expected: bytes) -> None:
    assert encode(value) == expected


@pytest.mark.parametrize(("value", "expected"), GOLDEN_TAGGED, ids=lambda v: repr(v)[:40])
def test_golden_encoding_of_classes_is_tagged_with_their_qualified_name(
    value: Any, expected: bytes
) -> None:
    assert encode(value) == expected


def test_golden_keys_of_decorated_calls() -> None:
    """The whole key, digest included, is pinned for one call."""
    idempotask.configure(namespace="golden")

    @idempotent(name="golden.charge")
    def charge(account: int, amount: Decimal, currency: str = "EUR") -> None:
        return None

    key = charge.key_for(42, Decimal("10.50"))
    material = b"a3[s7:accounti2:42s6:amountm4:10.5s8:currencys3:EUR]"
    assert key == f"golden:golden.charge:v1:{_expected_digest(material)}"
    assert key == "golden:golden.charge:v1:3522af66081d99bfbdbb0f4cd104683a"


def _expected_digest(material: bytes) -> str:
    import hashlib

    return hashlib.blake2b(material, digest_size=16).hexdigest()


@pytest.mark.parametrize(
    "values",
    [
        [1, 1.0, True, "1", None, "None", b"1", Decimal("1")],
        [0, 0.0, False, "", b"", None, (), frozenset(), {}],
        [("a", "bc"), ("ab", "c"), ("abc",), "abc"],
        [[1, [2, 3]], [[1, 2], 3], [1, 2, 3]],
        [{"a": {"b": 1}}, {"a": {"b": "1"}}, {"a.b": 1}, {("a", "b"): 1}],
        [Color.RED, "r", Color.BLUE, 2],
        [Point(1, 2), Pair(1, 2), (1, 2), {"x": 1, "y": 2}],
        [Customer(1), Vendor(1), 1],
        [Decimal("1.5"), 1.5, "1.5"],
        [
            datetime.datetime(2026, 1, 2, tzinfo=UTC),
            datetime.datetime(2026, 1, 2),
            datetime.date(2026, 1, 2),
        ],
        [uuid.UUID(int=5), uuid.UUID(int=5).hex, uuid.UUID(int=5).bytes],
        [pathlib.PurePosixPath("a/b"), "a/b"],
    ],
)
def test_different_values_never_share_an_encoding(values: list[Any]) -> None:
    encodings = [encode(v) for v in values]
    assert len(set(encodings)) == len(values), encodings


def test_equal_logical_values_share_an_encoding() -> None:
    same = [
        ((1, 2), [1, 2]),
        ({1, 2}, frozenset({2, 1})),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        (0.0, -0.0),
        (float("nan"), -float("nan")),
        (Decimal("1.0"), Decimal("1.00")),
        (
            datetime.datetime(2026, 1, 2, 12, tzinfo=UTC),
            datetime.datetime(
                2026, 1, 2, 14, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
            ),
        ),
        ([{"k": (1, {2, 3})}], ({"k": [1, frozenset({3, 2})]},)),
    ]
    for left, right in same:
        assert encode(left) == encode(right), (left, right)


def test_unsupported_values_name_the_argument_path_and_type() -> None:
    @idempotent
    def place(order: dict[str, Any]) -> None:
        return None

    with pytest.raises(KeyEncodingError) as info:
        place.key_for({"items": [1, 2, object()]})
    assert info.value.path == "order[<str key 0>][2]"
    assert info.value.type_name == "builtins.object"
    assert "order[<str key 0>][2]" in str(info.value)
    assert isinstance(info.value, TypeError)


def test_an_instance_argument_without_key_material_is_a_missing_key_material_error() -> None:
    class Thing:
        def __init__(self) -> None:
            self.a = 1

    with pytest.raises(MissingKeyMaterialError, match="__idempotency_key__"):
        encode({"t": Thing()})


def test_cycles_are_a_clear_error_not_a_crash() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(KeyEncodingError, match="nested too deeply"):
        encode(loop)


def test_registered_encoders_apply_to_subclasses_and_mix_in_the_type() -> None:
    class Money:
        def __init__(self, cents: int) -> None:
            self.cents = cents

    class Euro(Money):
        pass

    idempotask.register_encoder(Money, lambda m: m.cents)
    try:
        assert encode(Money(5)) == encode(Money(5))
        assert encode(Money(5)) != encode(Money(6))
        assert encode(Euro(5)) == encode(Euro(5))
        assert encode(Money(5)) != encode(5)
    finally:
        idempotask.unregister_encoder(Money)
    with pytest.raises(MissingKeyMaterialError):
        encode(Money(5))


def test_builtin_types_cannot_get_a_custom_encoder() -> None:
    with pytest.raises(idempotask.ConfigurationError, match="fixed canonical encoding"):
        idempotask.register_encoder(int, str)


def test_pydantic_style_models_encode_by_qualified_name_and_json_dump() -> None:
    class Model:
        model_fields: ClassVar[dict[str, None]] = {"a": None}

        def __init__(self, a: int) -> None:
            self.a = a

        def model_dump(self, mode: str = "python") -> dict[str, Any]:
            assert mode == "json"
            return {"a": self.a}

    assert encode(Model(1)) == encode(Model(1))
    assert encode(Model(1)) != encode(Model(2))
    assert encode(Model(1)) != encode({"a": 1})


def test_classmethod_cls_encodes_as_its_qualified_name() -> None:
    class Base:
        @classmethod
        @idempotent
        def make(cls) -> str:
            return cls.__name__

    class Child(Base):
        pass

    assert Base.make() == "Base"
    assert Child.make() == "Child"
    assert Base.make.key_for() != Child.make.key_for()


# ---------------------------------------------------------------------------- properties

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.decimals(allow_nan=False)
    | st.datetimes(timezones=st.none() | st.just(UTC))
    | st.dates()
    | st.uuids()
)
hashables = st.recursive(
    scalars.filter(lambda v: not (isinstance(v, float) and math.isnan(v))),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.sets(hashables, max_size=4)
    ),
    max_leaves=12,
)


def _flip(value: Any) -> Any:
    """The same logical value in another shape: lists<->tuples, dicts and sets rebuilt in
    reverse insertion order."""
    if isinstance(value, list):
        return tuple(_flip(v) for v in value)
    if isinstance(value, tuple):
        return [_flip(v) for v in value]
    if isinstance(value, dict):
        return {k: _flip(v) for k, v in reversed(list(value.items()))}
    if isinstance(value, (set, frozenset)):
        return type(value)(reversed(list(value)))
    return value


@settings(max_examples=300, deadline=None)
@given(values)
def test_encoding_is_deterministic_and_shape_independent(value: Any) -> None:
    assert encode(value) == encode(value)
    assert encode(value) == encode(_flip(value))


@settings(max_examples=300, deadline=None)
@given(values, values)
def test_values_with_different_encodings_are_different_values(a: Any, b: Any) -> None:
    """Encoding is injective: equal encodings only for logically equal values."""
    if encode(a) == encode(b):
        assert _normal(a) == _normal(b)


def _normal(value: Any) -> Any:
    """A comparable normal form with the table's equalities (and type tags kept)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else value + 0.0)
    if isinstance(value, Decimal):
        return ("dec", value.normalize() if not value.is_zero() else 0)
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(_normal(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(_normal(v)) for v in value)))
    if isinstance(value, dict):
        return (
            "dict",
            tuple(sorted((repr(_normal(k)), repr(_normal(v))) for k, v in value.items())),
        )
    if isinstance(value, datetime.datetime) and value.tzinfo is not None:
        return ("aware", value.astimezone(UTC))
    return (type(value).__name__, value)


@settings(max_examples=200, deadline=None)
@given(a=st.integers(), b=st.text(max_size=5), c=st.booleans())
def test_positional_keyword_and_defaults_give_one_key(a: int, b: str, c: bool) -> None:
    @idempotent(name="tests.keys.binding")
    def f(a: int, b: str = "x", *, c: bool = False) -> None:
        return None

    key = f.key_for(a, b, c=c)
    assert f.key_for(a=a, b=b, c=c) == key
    assert f.key_for(b=b, a=a, c=c) == key
    if b == "x" and c is False:
        assert f.key_for(a) == key


def test_keys_are_identical_in_other_interpreters_with_other_hash_seeds() -> None:
    script = textwrap.dedent(
        """
        import datetime, decimal, uuid
        import idempotask
        from idempotask import idempotent

        @idempotent(name="x.y")
        def f(a, b, c, d, e):
            return None

        print(f.key_for(a={"k": {1, 2, "z"}, 3.5: [None, b"b"]},
                        b=frozenset({"p", "q", "r"}), c=decimal.Decimal("2.50"),
                        d=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
                        e=uuid.UUID(int=3)))
        """
    )
    outputs = set()
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(out.stdout.strip())
    assert len(outputs) == 1
    assert outputs.pop().startswith("idempotask:x.y:v1:")


def test_varargs_and_kwargs_are_part_of_the_key() -> None:
    @idempotent
    def f(a: int, *rest: int, **extra: int) -> None:
        return None

    assert f.key_for(1, 2, 3) == f.key_for(1, 2, 3)
    assert f.key_for(1, 2, 3) != f.key_for(1, 2)
    assert f.key_for(1, x=1, y=2) == f.key_for(1, y=2, x=1)
    assert f.key_for(1, x=1) != f.key_for(1, 1)


def test_a_bad_call_raises_pythons_own_type_error() -> None:
    @idempotent
    def f(a: int, b: int) -> int:
        return a + b

    with pytest.raises(TypeError, match="missing a required argument: 'b'"):
        f(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'c'|got an unexpected"):
        f(1, 2, c=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values"):
        f(1, 2, a=1)  # type: ignore[misc]
    with pytest.raises(TypeError, match="too many positional"):
        f(1, 2, 3)  # type: ignore[call-arg]

    @idempotent
    def g(a: int, b: int = 1, *, k: int) -> int:
        return a + b + k

    # Every positional argument given, or a default: a keyword-only one is still missing.
    for args in [(1,), (1, 2)]:
        with pytest.raises(TypeError, match="missing a required argument: 'k'"):
            g(*args)  # type: ignore[call-arg]


# ---------------------------------------------------------------- errors never show values


def test_a_key_encoding_error_names_dict_entries_by_position_and_type_never_by_value() -> None:
    """A dict key may be a secret (a card number): the path and message never show it."""

    @idempotent
    def pay(cards: dict[Any, Any]) -> None:
        return None

    with pytest.raises(KeyEncodingError) as info:
        pay.key_for({"4111 1111 1111 1111": object()})
    assert "4111" not in str(info.value)
    assert "4111" not in info.value.path
    assert info.value.path == "cards[<str key 0>]"
    with pytest.raises(KeyEncodingError) as info:
        pay.key_for({"ok": 1, 4111111111111111: [object()]})
    assert "4111" not in str(info.value)
    assert info.value.path == "cards[<int key 1>][0]"
    with pytest.raises(KeyEncodingError) as info:
        pay.key_for({("4111", object()): 1})
    assert "4111" not in str(info.value)
    assert info.value.path == "cards<key 0>[1]"


def test_advice_for_a_nested_value_names_the_argument_not_the_path() -> None:
    @idempotent
    def place(order: dict[str, Any]) -> None:
        return None

    class Opaque:
        __slots__ = ()

    with pytest.raises(KeyEncodingError) as info:
        place.key_for({"items": [Opaque()]})
    message = str(info.value)
    assert "exclude_args=('order',)" in message
    assert "exclude_args=('order[" not in message


def test_advice_never_asks_to_define_a_method_on_a_builtin_type() -> None:
    """A lambda (or any builtin type) cannot get ``__idempotency_key__``: the advice is
    what the user can do, and its type is named."""

    @idempotent
    def schedule(callback: Any) -> None:
        return None

    with pytest.raises(KeyEncodingError) as info:
        schedule.key_for(lambda: 1)
    message = str(info.value)
    assert not isinstance(info.value, MissingKeyMaterialError)
    assert "function.__idempotency_key__" not in message
    assert "__idempotency_key__" not in message
    assert "builtins.function" in message
    assert "exclude_args=('callback',)" in message


def test_advice_for_key_material_from_key_callable_does_not_suggest_exclude_args() -> None:
    @idempotent(key=lambda event: event["payload"])
    def handle(event: dict[str, Any]) -> None:
        return None

    with pytest.raises(KeyEncodingError) as info:
        handle.key_for({"payload": object()})
    message = str(info.value)
    assert "exclude_args" not in message
    assert "key=" in message


def test_a_user_class_without_key_material_gets_the_method_advice() -> None:
    class Ledger:
        def __init__(self) -> None:
            self.book = "secret-book"

    @idempotent
    def post(ledger: Ledger) -> None:
        return None

    with pytest.raises(MissingKeyMaterialError) as info:
        post.key_for(Ledger())
    message = str(info.value)
    assert "Ledger.__idempotency_key__()" in message
    assert "exclude_args=('ledger',)" in message
    assert "secret-book" not in message


def test_keyword_only_arguments_after_varargs_bind_with_many_positional_arguments() -> None:
    """A keyword-only parameter's index is no position: ``f(1, 2, 3, scale=2)`` used to be
    refused as if ``scale`` had been given twice."""

    @idempotent
    def f(a: int, *rest: int, scale: int = 1, **extra: int) -> None:
        return None

    assert f.key_for(1, 2, 3, scale=2) != f.key_for(1, 2, 3)
    assert f.key_for(1, 2, 3, scale=1) == f.key_for(1, 2, 3)
    assert f.key_for(1, 2, 3, scale=2, k=5) == f.key_for(1, 2, 3, k=5, scale=2)
    assert f(1, 2, 3, scale=2) is None


def test_subclasses_of_builtin_values_encode_by_the_value_they_hold_not_their_overrides() -> None:
    # A redacting __str__ or items(), a lossy __eq__, __bytes__ or __iter__ must not give
    # two values one key.
    class Secret(str):
        def __str__(self) -> str:
            return "***"

        def __format__(self, spec: str) -> str:
            return "***"

    class Switch(int):
        def __str__(self) -> str:
            return "on" if self else "off"

    class Loose(float):
        def __eq__(self, other: object) -> bool:
            return True

        def __ne__(self, other: object) -> bool:
            return False

        __hash__ = float.__hash__

    class Blob(bytes):
        def __bytes__(self) -> bytes:
            return b"x"

    class Hidden(dict):  # type: ignore[type-arg]
        def items(self) -> Any:
            return [(k, "***") for k in self]

    class Lazy(list):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            return iter(())

    @idempotent(name="tests.keys.subclass_values")
    def f(v: Any) -> None: ...

    pairs = [
        (Secret("abc"), Secret("xyz"), "abc"),
        (Switch(1), Switch(2), 1),
        (Loose(1.5), Loose(2.5), 1.5),
        (Blob(b"abc"), Blob(b"def"), b"abc"),
        (Hidden(a=1), Hidden(a=2), {"a": 1}),
        (Lazy([1]), Lazy([2]), [1]),
    ]
    for one, other, plain in pairs:
        assert f.key_for(one) != f.key_for(other), type(one)
        assert f.key_for(one) == f.key_for(plain), type(one)


def test_a_missing_keyword_only_argument_after_varargs_is_pythons_own_type_error() -> None:
    # Not a KeyEncodingError about an argument of type "object".
    @idempotent(name="tests.keys.kwonly_after_varargs")
    def f(a: int, *rest: int, b: int) -> int:
        return b

    for args in ((1, 2), (1, 2, 3)):
        with pytest.raises(TypeError, match="missing a required argument: 'b'") as info:
            f.key_for(*args)
        assert not isinstance(info.value, KeyEncodingError)
    with pytest.raises(TypeError, match="missing a required argument: 'b'"):
        f(1, 2, 3)
    assert f.key_for(1, 2, b=3) != f.key_for(1, 2, b=4)

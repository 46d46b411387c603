"""Serializers (DESIGN §3.4): typed JSON round trips, error reports, pickle, cached errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import pathlib
import pickle
import socket
import sys
import types
import uuid
import zoneinfo
from collections import OrderedDict
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idempotask.errors import CachedFailure, ConfigurationError, SerializationError
from idempotask.serializers import (
    JSONSerializer,
    PickleSerializer,
    Serializer,
    dump_exception,
    get_serializer,
    load_exception,
)

# --- module-level classes: the serializer finds them again through sys.modules ----------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.Flag):
    READ = 1
    WRITE = 2


@dataclasses.dataclass
class Box:
    item: object
    label: str = "box"


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclasses.dataclass(slots=True)
class Slotted:
    a: object
    b: int = 0


@dataclasses.dataclass
class Counter:
    n: int
    doubled: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.doubled = self.n * 2


class Pair(NamedTuple):
    left: object
    right: object = None


class PaymentDeclined(Exception):
    """A user-defined exception, as an application would raise."""


class CardError(Exception):
    """An exception whose __init__ formats its message from a code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"card declined with code {code}")
        self.code = code


class StrictInit(Exception):
    """An exception that can only be built with a keyword argument."""

    def __init__(self, *, reason: str) -> None:
        super().__init__(reason)


SER = JSONSerializer()


def roundtrip(value: object) -> object:
    return SER.loads(SER.dumps(value))


# --- strict comparison: equal AND of the same types, all the way down --------------------


def assert_same(a: object, b: object, path: str = "value") -> None:
    """Assert ``b`` equals ``a`` with identical types at every level (nan equals nan)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} came back as {type(b).__name__}"
    if isinstance(a, float):
        assert isinstance(b, float)
        if math.isnan(a):
            assert math.isnan(b), path
        else:
            assert a == b, f"{path}: {a!r} != {b!r}"
            assert math.copysign(1, a) == math.copysign(1, b), f"{path}: {a!r} {b!r}"
    elif isinstance(a, decimal.Decimal):
        assert isinstance(b, decimal.Decimal)
        # compare_total tells NaN, sNaN, -0 and 1.0 vs 1.00 apart, and never raises.
        assert a.compare_total(b) == 0, f"{path}: {a!r} {b!r}"
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple))
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert len(a) == len(b), path
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same(ka, kb, f"{path} key {ka!r}")
            assert_same(va, vb, f"{path}[{ka!r}]")
    elif isinstance(a, (set, frozenset)):
        assert isinstance(b, (set, frozenset))
        assert len(a) == len(b), path
        for x in a:
            assert any(_same(x, y) for y in b), f"{path}: {x!r} missing from {b!r}"
    elif isinstance(a, (dt.datetime, dt.time)):
        assert isinstance(b, (dt.datetime, dt.time))
        assert a.replace(tzinfo=None) == b.replace(tzinfo=None), path
        assert a.fold == b.fold, path
        assert type(a.tzinfo) is type(b.tzinfo), path
        if isinstance(a.tzinfo, zoneinfo.ZoneInfo):
            assert isinstance(b.tzinfo, zoneinfo.ZoneInfo)
            assert a.tzinfo.key == b.tzinfo.key, path
        assert a.utcoffset() == b.utcoffset(), path
    elif dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            assert_same(getattr(a, field.name), getattr(b, field.name), f"{path}.{field.name}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _same(a: object, b: object) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return False
    return True


def assert_roundtrips(value: object) -> None:
    assert_same(value, roundtrip(value))


# --- strategies ----------------------------------------------------------------------------

any_text = st.text(st.characters(exclude_categories=()), max_size=8)  # lone surrogates too
dict_keys = st.sampled_from(["$t", "v", "", "1"]) | any_text
fixed_offsets = st.builds(
    dt.timezone,
    st.timedeltas(min_value=dt.timedelta(hours=-23, minutes=-59), max_value=dt.timedelta(hours=23)),
)
zones = st.none() | fixed_offsets | st.timezones()
paths = st.builds(pathlib.PurePosixPath, any_text) | st.builds(pathlib.Path, st.text(max_size=8))

hashable_atoms = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | any_text
    | st.binary(max_size=8)
    | st.decimals(allow_nan=False)
    | st.uuids()
    | st.dates()
    | st.datetimes(timezones=zones)
    | st.times(timezones=zones)
    | st.timedeltas()
    | paths
    | st.sampled_from([*Color, *Level, *Perm, Perm.READ | Perm.WRITE])
    | st.builds(Point, st.integers(), st.integers())
)
hashables = st.recursive(
    hashable_atoms,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
atoms = (
    hashable_atoms
    | st.floats()
    | st.decimals()
    | st.binary(max_size=8).map(bytearray)
    | st.integers(min_value=2**64)
    | st.integers(max_value=-(2**64))
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(dict_keys, inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
        | st.builds(Box, inner, any_text)
        | st.builds(Pair, inner, inner)
    )


values = st.recursive(atoms, _containers, max_leaves=20)


# --- the round-trip property -----------------------------------------------------------


@given(values)
@settings(max_examples=400, deadline=None)
def test_every_supported_value_comes_back_equal_with_the_same_types(value: object) -> None:
    """Any nesting of supported values round-trips to an equal value of identical types."""
    assert_roundtrips(value)


@given(st.dictionaries(st.text(), st.none() | st.booleans() | st.integers() | st.text()))
def test_str_keyed_dicts_of_scalars_are_stored_as_plain_json(value: dict[str, object]) -> None:
    """Plain data costs no tags: its bytes are what json itself would write."""
    data = SER.dumps(value)
    if "$t" not in value:
        assert json.loads(data) == value


# --- explicit cases ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -7,
        2**200,
        -(2**200),
        1.5,
        float("inf"),
        float("-inf"),
        "",
        "héllo ☃",
        "\ud800",
        "\udfff tail",
        "\ud83d\ude00",
        b"",
        b"\x00\xff",
        bytearray(b"abc"),
        [],
        (),
        set(),
        frozenset(),
        {},
        decimal.Decimal("1.10"),
        decimal.Decimal("-0"),
        decimal.Decimal("NaN"),
        decimal.Decimal("-sNaN7"),
        decimal.Decimal("Infinity"),
        decimal.Decimal("1E+999999"),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        dt.date(2024, 2, 29),
        dt.timedelta(days=-3, seconds=5, microseconds=7),
        pathlib.PurePosixPath("/srv/data"),
        pathlib.PureWindowsPath(r"C:\Users\x"),
        pathlib.Path("relative/file.txt"),
    ],
    ids=repr,
)
def test_scalar_values_round_trip_exactly(value: object) -> None:
    """Each supported scalar type comes back as itself."""
    assert_roundtrips(value)


def test_negative_zero_stays_negative() -> None:
    """-0.0 comes back as -0.0, not 0.0."""
    result = roundtrip(-0.0)
    assert isinstance(result, float)
    assert math.copysign(1, result) == -1


def test_nan_comes_back_as_nan() -> None:
    """nan survives, alone and inside containers."""
    result = roundtrip([float("nan"), {"x": float("nan")}])
    assert isinstance(result, list)
    assert math.isnan(result[0])
    assert math.isnan(result[1]["x"])


def test_int_keys_and_str_keys_stay_different() -> None:
    """{1: x} and {"1": x} are different dicts after the trip too."""
    assert_roundtrips({1: "a"})
    assert_roundtrips({"1": "a"})
    assert_roundtrips({1: "int", "1": "str", 1.5: "float", None: "none", False: "bool"})
    assert roundtrip({1: "a"}) != roundtrip({"1": "a"})


def test_tuple_and_composite_keys_round_trip() -> None:
    """Tuples, frozensets, dates and frozen dataclasses work as dict keys."""
    assert_roundtrips(
        {
            (1, "a"): 1,
            frozenset({1, 2}): 2,
            dt.date(2020, 1, 1): 3,
            Point(1, 2): 4,
            (): 5,
            Color.RED: 6,
        }
    )


def test_tuples_stay_tuples_and_lists_stay_lists_inside_dicts_and_sets() -> None:
    """Sequence types are kept at any depth: in dict values, dict keys and set items."""
    value = {
        "t": (1, [2, (3,)]),
        "l": [(1, 2), [3]],
        "s": {(1, 2), (3, (4,))},
        (1, (2,)): [[], ()],
    }
    result = roundtrip(value)
    assert_same(value, result)
    assert isinstance(result, dict)
    assert type(result["t"]) is tuple
    assert type(result["t"][1]) is list
    assert all(type(item) is tuple for item in result["s"])


def test_a_user_dict_holding_the_marker_key_round_trips() -> None:
    """A dict that looks like a tag, or uses the marker key, is escaped and comes back."""
    for value in (
        {"$t": "tuple", "v": [1, 2]},
        {"$t": 1},
        {"v": 1, "$t": None},
        {"outer": {"$t": "datetime", "v": ["2020-01-01", None, 0]}},
        [{"$t": "bytes", "v": "AA=="}],
    ):
        assert_roundtrips(value)


def test_a_dict_with_the_marker_key_is_escaped_but_an_ordinary_one_is_not() -> None:
    """Only dicts that need it are tagged; the rest stay plain JSON objects."""
    assert SER.dumps({"ok": True, "n": 3}) == b'{"ok":true,"n":3}'
    assert SER.dumps([1, "a", None]) == b'[1,"a",null]'
    assert SER.dumps(7) == b"7"
    assert json.loads(SER.dumps({"$t": 1})) != {"$t": 1}


def test_naive_and_fixed_offset_datetimes_round_trip() -> None:
    """Naive datetimes stay naive; aware ones keep their UTC offset to the microsecond."""
    assert_roundtrips(dt.datetime(2024, 5, 6, 7, 8, 9, 123456))
    assert_roundtrips(dt.datetime(2024, 5, 6, tzinfo=dt.timezone.utc))
    odd = dt.timezone(dt.timedelta(hours=-3, minutes=-30, seconds=-15, microseconds=-5))
    assert_roundtrips(dt.datetime(2024, 5, 6, 1, 2, 3, tzinfo=odd))
    assert_roundtrips(dt.time(23, 59, 59, 999999, tzinfo=odd))


def test_tiny_and_named_offsets_are_kept_exactly() -> None:
    """A one-microsecond offset is not read back as UTC, and a zone's name survives."""
    tiny = dt.timezone(dt.timedelta(microseconds=1))
    assert_roundtrips(dt.datetime(2000, 1, 1, tzinfo=tiny))
    assert_roundtrips(dt.time(0, 0, tzinfo=dt.timezone(-dt.timedelta(microseconds=1))))
    named = dt.timezone(dt.timedelta(hours=-5), "EST")
    result = roundtrip(dt.datetime(2000, 1, 1, tzinfo=named))
    assert isinstance(result, dt.datetime)
    assert result.tzname() == "EST"
    assert roundtrip(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)).tzinfo is dt.timezone.utc  # type: ignore[attr-defined]


def test_a_zone_unknown_to_the_reader_falls_back_to_the_stored_offset() -> None:
    """A datetime whose zone the reading host lacks keeps its instant as a fixed offset."""
    data = b'{"$t":"datetime","v":["2020-06-01T12:00:00",0,[7200000000,null,"No/Such_Zone"]]}'
    result = SER.loads(data)
    assert result == dt.datetime(2020, 6, 1, 10, tzinfo=dt.timezone.utc)


def test_zoneinfo_datetimes_keep_their_zone_and_fold() -> None:
    """A ZoneInfo zone comes back by key, and an ambiguous wall time keeps its fold."""
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    # 02:30 happens twice on 2023-10-29 in Paris; fold picks the second one.
    for fold in (0, 1):
        value = dt.datetime(2023, 10, 29, 2, 30, tzinfo=paris, fold=fold)
        result = roundtrip(value)
        assert_same(value, result)
        assert isinstance(result, dt.datetime)
        assert result.tzinfo is paris
    # 02:30 does not exist on 2023-03-26; the wall time must not be moved.
    assert_roundtrips(dt.datetime(2023, 3, 26, 2, 30, tzinfo=paris))
    assert_roundtrips(dt.time(8, 0, tzinfo=paris))


def test_other_tzinfo_types_keep_at_least_their_offset() -> None:
    """A tzinfo that is neither timezone nor ZoneInfo comes back as the same instant."""

    class Plus2(dt.tzinfo):
        def utcoffset(self, d: dt.datetime | None) -> dt.timedelta:
            return dt.timedelta(hours=2)

        def dst(self, d: dt.datetime | None) -> dt.timedelta:
            return dt.timedelta(0)

        def tzname(self, d: dt.datetime | None) -> str:
            return "plus two"

    value = dt.datetime(2024, 1, 1, 12, tzinfo=Plus2())
    result = roundtrip(value)
    assert result == value
    assert isinstance(result, dt.datetime)
    assert result.utcoffset() == dt.timedelta(hours=2)


def test_enum_members_come_back_as_the_same_members() -> None:
    """Enum, IntEnum and Flag members (combined flags too) come back identical."""
    for member in (Color.RED, Level.HIGH, Perm.WRITE, Perm.READ | Perm.WRITE, Perm(0)):
        assert roundtrip(member) is member


def test_dataclasses_round_trip_without_rerunning_init() -> None:
    """Dataclass instances come back field for field, frozen ones and nested ones too."""
    assert_roundtrips(Box(item=(1, {2}), label="x"))
    assert_roundtrips(Point(1, 2))
    assert_roundtrips(Box(Box([Point(0, 0)])))
    assert_roundtrips(Slotted((1,), 2))
    counter = Counter(3)
    counter.doubled = 100  # changed after __init__: the stored state wins
    result = roundtrip(counter)
    assert isinstance(result, Counter)
    assert (result.n, result.doubled) == (3, 100)


def test_named_tuples_round_trip_as_their_class() -> None:
    """A NamedTuple comes back as its own class, not a plain tuple."""
    value = Pair((1, 2), [Pair("a")])
    result = roundtrip(value)
    assert_same(value, result)
    assert type(result) is Pair


def test_a_large_nested_result_round_trips() -> None:
    """A realistic API-style payload survives intact."""
    value = {
        "order": {
            "id": uuid.UUID(int=7),
            "total": decimal.Decimal("19.99"),
            "placed_at": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
            "items": [{"sku": f"S{i}", "qty": i, "tags": ("a", "b")} for i in range(50)],
            "status": Color.GREEN,
        },
        "warnings": [],
    }
    assert_roundtrips(value)


def test_memoryview_and_bytearray_input_is_accepted_by_loads() -> None:
    """Stores that hand back a memoryview (some SQL drivers do) still decode."""
    data = SER.dumps({"a": (1, 2)})
    assert roundtrip({"a": (1, 2)}) == SER.loads(memoryview(data))  # type: ignore[arg-type]
    assert SER.loads(bytearray(data)) == {"a": (1, 2)}  # type: ignore[arg-type]


def test_huge_ints_round_trip_even_past_the_int_string_limit() -> None:
    """Ints longer than the int/str digit limit are stored as hex and come back."""
    big = 3**20000
    assert roundtrip(big) == big
    assert roundtrip({"n": [-big]}) == {"n": [-big]}
    assert roundtrip({big: 1}) == {big: 1}


# --- dumps errors ---------------------------------------------------------------------


def test_an_unsupported_object_is_reported_with_its_path_and_type() -> None:
    """The message names where the object sits and its type, and suggests what to do."""
    with socket.socket() as sock, pytest.raises(SerializationError) as info:
        SER.dumps({"items": [1, 2, sock]})
    message = str(info.value)
    assert 'result["items"][2]' in message
    assert "socket.socket" in message
    assert 'serializer="pickle"' in message
    assert "plain data" in message


def test_a_lambda_at_the_top_is_refused() -> None:
    """A function is not data."""
    with pytest.raises(SerializationError, match=r"result: .*function"):
        SER.dumps(lambda: 1)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"a": {"b": (1, object())}}, 'result["a"]["b"][1]'),
        ([{}, {1: object()}], "result[1][1]"),
        ({"a": {object(): 1}}, 'result["a"][<key>]'),
        ({"s": {1, 2, object()}}, 'result["s"][<set item>]'),
        (Box(item=[object()]), "result.item[0]"),
        (Pair(1, object()), "result.right"),
        ({"$t": object()}, 'result["$t"]'),
    ],
)
def test_the_error_path_points_at_the_bad_part(value: object, where: str) -> None:
    """Paths go through dicts, lists, tuples, dict keys, sets, dataclasses and named tuples."""
    with pytest.raises(SerializationError) as info:
        SER.dumps(value)
    assert f"cannot serialize {where}:" in str(info.value)


def test_subclasses_of_builtin_types_are_refused_rather_than_changed() -> None:
    """An OrderedDict would come back as a dict, so it is refused with a hint."""
    with pytest.raises(SerializationError, match=r"subclass of dict.*convert it to dict"):
        SER.dumps({"x": OrderedDict(a=1)})


def test_a_class_defined_in_a_function_is_refused_when_stored() -> None:
    """A local dataclass could never be found again, so dumps refuses it at once."""

    @dataclasses.dataclass
    class Local:
        x: int

    with pytest.raises(SerializationError, match=r"Local cannot be found again"):
        SER.dumps([Local(1)])


def test_a_reference_cycle_is_a_serialization_error_with_its_path() -> None:
    """Cycles raise SerializationError, not RecursionError, and say where they close."""
    data: list[object] = [1]
    data.append({"self": data})
    with pytest.raises(SerializationError, match=r'result\[1\]\["self"\]: .*cycle'):
        SER.dumps(data)
    loop: dict[str, object] = {}
    loop["me"] = loop
    with pytest.raises(SerializationError, match="cycle"):
        SER.dumps(loop)


def test_nesting_too_deep_is_a_serialization_error() -> None:
    """Absurd depth without a cycle is reported, not crashed on."""
    deep: list[object] = []
    for _ in range(sys.getrecursionlimit() * 2):
        deep = [deep]
    with pytest.raises(SerializationError, match="nested too deeply"):
        SER.dumps(deep)


# --- loads errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"{not json",
        b"[1] trailing",
        b" 1",
        b'{"$t":"no-such-tag","v":1}',
        b'{"$t":"tuple"}',
        b'{"$t":"tuple","v":[],"extra":1}',
        b'{"$t":"tuple","v":"abc"}',
        b'{"$t":"set","v":[[1]]}',
        b'{"$t":"dict","v":[1]}',
        b'{"$t":"dict","v":[[1],2]}',
        b'{"$t":"bytes","v":"***"}',
        b'{"$t":"int","v":"xyz"}',
        b'{"$t":"datetime","v":["yesterday",0,null]}',
        b'{"$t":"datetime","v":["2020-01-01T00:00:00+01:00",0,null]}',
        b'{"$t":"datetime","v":["2020-01-01T00:00:00",0,[null,null,"No/Such_Zone"]]}',
        b'{"$t":"datetime","v":["2020-01-01T00:00:00",0,[1.5,null,null]]}',
        b'{"$t":"time","v":["01:00:00",0,[null,null,"No/Such_Zone"]]}',
        b'{"$t":"timedelta","v":[1.5,0,0]}',
        b'{"$t":"decimal","v":"one"}',
        b'{"$t":"uuid","v":"nope"}',
        b'{"$t":"enum","v":["builtins","int","X"]}',
        b'{"$t":"flag","v":["tests","Nope",1]}',
        b'{"$t":"namedtuple","v":["builtins","tuple",[1]]}',
        b'{"$t":"dataclass","v":["builtins","dict",{}]}',
        b"[" * 100_000,
        b"\x80\x04K\x01.",  # a pickle
    ],
)
def test_bytes_that_are_not_ours_raise_only_serialization_error(data: bytes) -> None:
    """Foreign, truncated or malformed bytes never leak another exception type."""
    with pytest.raises(SerializationError):
        SER.loads(data)


def test_loads_of_a_non_bytes_object_is_a_serialization_error() -> None:
    """Even a wrong argument type surfaces as SerializationError."""
    with pytest.raises(SerializationError):
        SER.loads("1")  # type: ignore[arg-type]


def test_loads_never_imports_a_module_to_find_a_class() -> None:
    """A class in a module that is not loaded is an error naming it; nothing is imported."""
    assert "antigravity" not in sys.modules
    data = b'{"$t":"enum","v":["antigravity","Thing","A"]}'
    with pytest.raises(SerializationError, match=r"antigravity\.Thing.*not imported"):
        SER.loads(data)
    assert "antigravity" not in sys.modules


def test_a_missing_class_or_member_is_named_in_the_error() -> None:
    """A class that vanished from its module, or a member that vanished, is named."""
    with pytest.raises(SerializationError, match=r"Vanished"):
        SER.loads(json.dumps({"$t": "dataclass", "v": [__name__, "Vanished", {}]}).encode())
    with pytest.raises(SerializationError, match=r"Color\.BLUE"):
        SER.loads(json.dumps({"$t": "enum", "v": [__name__, "Color", "BLUE"]}).encode())


def test_a_dataclass_read_back_after_a_field_was_added_uses_the_default() -> None:
    """Stored results from before a new defaulted field still read; a required one fails."""
    old = json.dumps({"$t": "dataclass", "v": [__name__, "Box", {"item": 1}]}).encode()
    assert roundtrip(Box(1)) == SER.loads(old)
    with pytest.raises(SerializationError, match=r"no field 'x'"):
        SER.loads(json.dumps({"$t": "dataclass", "v": [__name__, "Point", {"y": 1}]}).encode())


# --- pickle and get_serializer ------------------------------------------------------------


def test_pickle_serializer_round_trips_arbitrary_objects() -> None:
    """Pickle holds what JSON cannot, such as OrderedDict and SimpleNamespace."""
    ser = PickleSerializer()
    value = OrderedDict(a=types.SimpleNamespace(x=1))
    assert ser.loads(ser.dumps(value)) == value


def test_pickle_errors_become_serialization_errors() -> None:
    """Unpicklable values and garbage bytes both raise SerializationError."""
    ser = PickleSerializer()
    with pytest.raises(SerializationError, match="cannot pickle"):
        ser.dumps(lambda: 1)
    with socket.socket() as sock, pytest.raises(SerializationError):
        ser.dumps(sock)
    with pytest.raises(SerializationError, match="cannot unpickle"):
        ser.loads(b"not a pickle")
    with pytest.raises(SerializationError):
        ser.loads(pickle.dumps(1)[:-1])


def test_get_serializer_resolves_names_and_objects() -> None:
    """None and "json" share one JSONSerializer; "pickle" and custom objects work."""
    assert get_serializer(None) is get_serializer("json")
    assert isinstance(get_serializer(None), JSONSerializer)
    assert isinstance(get_serializer("pickle"), PickleSerializer)

    class Custom:
        def dumps(self, value: object) -> bytes:
            return b"x"

        def loads(self, data: bytes) -> object:
            return "x"

    custom = Custom()
    assert get_serializer(custom) is custom
    assert isinstance(custom, Serializer)
    assert isinstance(SER, Serializer)
    assert isinstance(PickleSerializer(), Serializer)


@pytest.mark.parametrize("spec", ["yaml", "JSON", "", 3, object(), JSONSerializer])
def test_get_serializer_rejects_anything_else_naming_the_option(spec: Any) -> None:
    """Unknown names, classes and objects without dumps/loads raise ConfigurationError."""
    with pytest.raises(ConfigurationError) as info:
        get_serializer(spec)
    message = str(info.value)
    assert "serializer=" in message
    assert '"json"' in message
    assert '"pickle"' in message


# --- cached exceptions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("x"),
        KeyError("k"),
        PaymentDeclined("card refused"),
        ValueError("two", 2),
        RuntimeError(),
        TypeError(("tuple", "arg")),
        FileNotFoundError(2, "No such file or directory", "/tmp/x"),
        CardError(51),
        StrictInit(reason="only by keyword"),
        KeyboardInterrupt(),
    ],
    ids=repr,
)
def test_cached_exceptions_come_back_with_the_same_type_and_message(exc: BaseException) -> None:
    """The rebuilt exception has the original's exact type and str()."""
    rebuilt = load_exception(dump_exception(exc))
    assert type(rebuilt) is type(exc)
    assert str(rebuilt) == str(exc)


def test_cached_exception_args_and_attributes_are_kept() -> None:
    """args come back as they were, and so do JSON-friendly instance attributes."""
    rebuilt = load_exception(dump_exception(CardError(51)))
    assert isinstance(rebuilt, CardError)
    assert rebuilt.code == 51
    assert rebuilt.args == ("card declined with code 51",)
    two = load_exception(dump_exception(ValueError("two", 2)))
    assert two.args == ("two", 2)


def test_unserializable_exception_args_are_left_out_but_the_message_kept() -> None:
    """An exception carrying a socket still caches, by message."""
    with socket.socket() as sock:
        exc = ValueError(sock)
        message = str(exc)
        data = dump_exception(exc)
    assert "args" not in json.loads(data)
    rebuilt = load_exception(data)
    assert type(rebuilt) is ValueError
    assert str(rebuilt) == message


def test_an_exception_whose_class_cannot_be_found_becomes_cached_failure() -> None:
    """A local or unloaded exception class gives CachedFailure with its name and message."""

    class LocalError(Exception):
        pass

    rebuilt = load_exception(dump_exception(LocalError("gone")))
    assert isinstance(rebuilt, CachedFailure)
    assert rebuilt.type_name.endswith("LocalError")
    assert rebuilt.message == "gone"

    unloaded = json.dumps({"module": "not_loaded_mod", "qualname": "E", "message": "m"})
    rebuilt = load_exception(unloaded.encode())
    assert isinstance(rebuilt, CachedFailure)
    assert rebuilt.type_name == "not_loaded_mod.E"


def test_a_stored_type_that_is_not_an_exception_becomes_cached_failure() -> None:
    """Only BaseException subclasses are ever instantiated."""
    data = json.dumps({"module": "builtins", "qualname": "dict", "message": "m"}).encode()
    rebuilt = load_exception(data)
    assert isinstance(rebuilt, CachedFailure)
    assert rebuilt.type_name == "dict"


def test_an_exception_that_will_not_build_becomes_cached_failure() -> None:
    """When no way of building the type works, CachedFailure carries type and message."""

    class Unbuildable(Exception):
        def __new__(cls, *args: object) -> Unbuildable:
            raise RuntimeError("no")

    module = types.ModuleType("unbuildable_mod")
    module.Unbuildable = Unbuildable  # type: ignore[attr-defined]
    Unbuildable.__module__, Unbuildable.__qualname__ = "unbuildable_mod", "Unbuildable"
    sys.modules["unbuildable_mod"] = module
    try:
        data = json.dumps(
            {"module": "unbuildable_mod", "qualname": "Unbuildable", "message": "m"}
        ).encode()
        rebuilt = load_exception(data)
    finally:
        del sys.modules["unbuildable_mod"]
    assert isinstance(rebuilt, CachedFailure)
    assert str(rebuilt) == "unbuildable_mod.Unbuildable: m"


def test_load_exception_of_foreign_bytes_is_a_serialization_error() -> None:
    """Bytes that are not a cached exception raise SerializationError."""
    for data in (
        b"[]",
        b'{"module":"builtins"}',
        b"\xff",
        b'{"module":1,"qualname":"E","message":""}',
    ):
        with pytest.raises(SerializationError):
            load_exception(data)


def test_dump_exception_survives_an_exception_whose_str_raises() -> None:
    """A broken __str__ does not stop the failure from being cached."""

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    record = json.loads(dump_exception(Unprintable()))
    assert "unprintable" in record["message"]


def test_the_prebuilt_c_encoder_writes_what_the_public_json_encoder_writes() -> None:
    """The fast path through json's C encoder changes speed only, never bytes."""
    from idempotask.serializers import _encode

    tree = {"a": [1, -0.0, float("nan"), float("-inf"), None, True, '\ud800é\n"\\'], "b": {}}
    assert _encode._to_json_text(tree) == _encode._public_encoder.encode(tree)


def test_class_lookup_does_not_trigger_a_module_level_getattr() -> None:
    """A module's lazy __getattr__ (which may import) is never called while reading."""
    calls: list[str] = []
    module = types.ModuleType("lazy_mod")
    module.__dict__["__getattr__"] = calls.append
    sys.modules["lazy_mod"] = module
    try:
        with pytest.raises(SerializationError, match=r"lazy_mod has no Thing"):
            SER.loads(b'{"$t":"enum","v":["lazy_mod","Thing","A"]}')
    finally:
        del sys.modules["lazy_mod"]
    assert calls == []

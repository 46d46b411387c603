"""What the dead-letter stores check and compute alike: a letter's field values and an
operation's arguments, checked before any I/O, and stats rows summed by group."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import Any

from idempotask.backends.base import DeadLetter, DeadLetterFilter, StatRow, Status, encode_history
from idempotask.errors import ConfigurationError

__all__ = [
    "ALL",
    "FIELDS",
    "TEXT_FIELDS",
    "check_filter",
    "check_int",
    "check_page",
    "check_text",
    "check_time",
    "field_value",
    "filter_fields",
    "stored",
    "sum_stats",
]

#: The filter that matches every letter (the default of ``query`` and ``stats``).
ALL = DeadLetterFilter()
#: Letter fields in the order stores write and read them.
FIELDS = (
    "id",
    "function",
    "kind",
    "error_type",
    "message",
    "traceback",
    "arguments",
    "key",
    "attempts",
    "status",
    "first_failed_at",
    "last_failed_at",
    "next_retry_at",
    "route",
    "critical",
    "resolution",
    "version",
    "history",
)
TEXT_FIELDS = frozenset(
    {"id", "function", "kind", "error_type", "message", "traceback", "key", "route", "resolution"}
)


def check_time(value: Any, field: str, who: str) -> float:
    """Epoch seconds: a finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(
            f"{who}: {field} must be a finite number of epoch seconds, got {value!r}"
        )
    return float(value)


def check_int(
    value: Any, field: str, who: str, *, minimum: int | None = None, limit: int = 2**63
) -> int:
    """An int (not a bool) of at least ``minimum``, of magnitude under ``limit``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not -limit <= value < limit
        or (minimum is not None and value < minimum)
    ):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ConfigurationError(f"{who}: {field} must be an int{bound}, got {value!r}")
    return value


def check_text(value: Any, field: str, who: str) -> str:
    """A str; an enum (a ``FailureKind``, a ``Status``) counts as its value."""
    if isinstance(value, enum.Enum):
        value = value.value
    if not isinstance(value, str):
        raise ConfigurationError(f"{who}: {field} must be a str, got {type(value).__qualname__}")
    return value


def check_page(limit: Any, offset: Any, who: str) -> bool:
    """A page's ``limit`` and ``offset`` (ints, ``offset >= 0``): whether it can hold any
    letter."""
    wanted = check_int(limit, "limit", who)
    check_int(offset, "offset", who, minimum=0)
    return wanted > 0


def check_filter(filter: Any, who: str) -> DeadLetterFilter:
    """``filter`` if it is a :class:`DeadLetterFilter` (where None is no filter, the
    caller says so before: ``purge(None)`` must not delete every letter)."""
    if not isinstance(filter, DeadLetterFilter):
        raise ConfigurationError(f"{who}: expected a DeadLetterFilter, got {type(filter).__name__}")
    return filter


def field_value(field: str, value: Any, who: str, *, attempts_limit: int = 2**63) -> Any:
    """A letter field's value, checked: text as str, ``status`` a :class:`Status`,
    ``arguments`` bytes, times floats (``next_retry_at`` may be None), ``attempts`` and
    ``version`` ints, ``critical`` a bool, ``history`` its :func:`encode_history` text."""
    if field in TEXT_FIELDS:
        return check_text(value, field, who)
    if field == "status":
        return Status(value)
    if field == "arguments":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ConfigurationError(
                f"{who}: arguments must be bytes, got {type(value).__qualname__}"
            )
        return bytes(value)
    if field in ("first_failed_at", "last_failed_at"):
        return check_time(value, field, who)
    if field == "next_retry_at":
        return None if value is None else check_time(value, field, who)
    if field in ("attempts", "version"):
        return check_int(value, field, who, limit=attempts_limit if field == "attempts" else 2**63)
    if field == "critical":
        return bool(value)
    if field == "history":
        if not isinstance(value, (tuple, list)):
            raise ConfigurationError(
                f"{who}: history must be a tuple of Action, got {type(value).__qualname__}"
            )
        return encode_history(tuple(value))
    raise AssertionError(field)  # pragma: no cover


def stored(letter: DeadLetter, who: str) -> DeadLetter:
    """``letter`` as a store keeps it (its status a :class:`Status`, its arguments bytes,
    ``critical`` a bool); a TypeError for anything that is not a :class:`DeadLetter`."""
    if not isinstance(letter, DeadLetter):
        raise TypeError(f"add: expected a DeadLetter, got {type(letter).__name__}")
    arguments = field_value("arguments", letter.arguments, who)
    return letter.evolve(
        status=Status(letter.status), arguments=arguments, critical=bool(letter.critical)
    )


def sum_stats(rows: Iterable[tuple[str, str, Status, int, int, int]]) -> list[StatRow]:
    """``(function, kind, status, count, retries, resolved_by_retry)`` rows summed by
    group (a group may come in several rows), ordered by the group."""
    groups: dict[tuple[str, str, Status], list[int]] = {}
    for function, kind, status, *counts in rows:
        sums = groups.setdefault((function, kind, status), [0, 0, 0])
        for i, count in enumerate(counts):
            sums[i] += count
    return [StatRow(*group, *sums) for group, sums in sorted(groups.items())]


def filter_fields(filter: DeadLetterFilter | None, who: str) -> dict[str, Any]:
    """The fields of ``filter`` that narrow it, checked: ``status``, ``kind``, ``function``
    (lists of str), ``since``, ``until`` (floats), ``search`` (a str)."""
    if filter is None:
        return {}
    check_filter(filter, who)
    fields: dict[str, Any] = {}
    if filter.status:
        fields["status"] = [Status(s).value for s in filter.status]
    for name in ("kind", "function"):
        if getattr(filter, name):
            fields[name] = [check_text(v, name, who) for v in getattr(filter, name)]
    for name in ("since", "until"):
        if getattr(filter, name) is not None:
            fields[name] = check_time(getattr(filter, name), name, who)
    if check_text(filter.search, "search", who):
        fields["search"] = filter.search
    return fields

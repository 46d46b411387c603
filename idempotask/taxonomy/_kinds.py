"""Failure kinds and classifications: the values the classifier and its rules share."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Protocol

from idempotask.errors import ConfigurationError

__all__ = [
    "KINDS",
    "Classification",
    "FailureKind",
    "Rule",
    "RuleContext",
    "as_kind",
    "check_kind",
    "parse_retry_after",
]


class FailureKind(str, enum.Enum):
    """What kind of failure an exception is; each kind has its own retry policy."""

    TRANSIENT = "transient"  # clears by itself within minutes: retry soon
    EXTERNAL = "external"  # someone else's limit: retry after hours
    CONFIGURATION = "configuration"  # needs a person: retry once, much later
    PERMANENT = "permanent"  # the call is wrong: never retried automatically


KINDS = tuple(kind.value for kind in FailureKind)


def as_kind(value: object) -> FailureKind | None:
    """A FailureKind for a member or its value (any case), else None."""
    if isinstance(value, FailureKind):
        return value
    if isinstance(value, str):
        try:
            return FailureKind(value.strip().lower())
        except ValueError:
            return None
    return None


def check_kind(option: str, value: object) -> FailureKind:
    """Validate a failure kind option; the error names the option and the kinds."""
    kind = as_kind(value)
    if kind is None:
        raise ConfigurationError(
            f"{option}: expected a FailureKind or one of {', '.join(map(repr, KINDS))}, "
            f"got {value!r}"
        )
    return kind


def parse_retry_after(value: object, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or None when it says nothing usable.

    Accepts a number of seconds (an int, a float or a numeric string), an HTTP-date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``), a :class:`~datetime.timedelta` or an aware
    :class:`~datetime.datetime` (a naive one is taken as UTC). A date in the past gives
    0. Negative, non-finite or unparsable values give None: a broken header must not
    break classification. ``now`` (epoch seconds) defaults to :func:`time.time`.

    >>> parse_retry_after("120")
    120.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0)
    10.0
    >>> parse_retry_after("soon") is None
    True
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, (int, float)):
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    if isinstance(value, bytes):
        try:
            value = value.decode("latin-1")
        except Exception:  # pragma: no cover - latin-1 decodes any bytes
            return None
    when: datetime
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            return parse_retry_after(float(text))
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    else:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # HTTP-dates are GMT
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one exception.

    ``kind`` picks the retry policy; ``retry_after`` is a hint in seconds (a
    ``Retry-After`` header, a marker's or an attribute's value) that the policy honours;
    ``reason`` says which rule decided, for failure records and logs.

    >>> Classification(FailureKind.EXTERNAL, 60.0, "HTTP 429")
    Classification(kind=<FailureKind.EXTERNAL: 'external'>, retry_after=60.0, reason='HTTP 429')
    """

    kind: FailureKind
    retry_after: float | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", check_kind("kind", self.kind))
        hint: object = self.retry_after
        if hint is not None:
            if (
                isinstance(hint, bool)
                or not isinstance(hint, (int, float))
                or not math.isfinite(hint)
                or hint < 0
            ):
                raise ConfigurationError(
                    f"retry_after: expected seconds >= 0 or None, got {hint!r}"
                )
            object.__setattr__(self, "retry_after", float(hint))


class RuleContext(Protocol):
    """What a built-in rule may ask of the classifier running it."""

    def inner(self, wrapped: BaseException) -> Classification | None:
        """The classification of a wrapped exception, or None (no default applied)."""
        ...

    def named(self, name: str) -> FailureKind | None:
        """The kind registered under a qualified name, if it is a plain kind."""
        ...


Rule = Callable[[BaseException, RuleContext], "Classification | None"]
"""A built-in registry rule: reads the instance, returns None to pass on to the next
class of the MRO."""

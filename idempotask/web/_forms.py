"""What a request asks for: the letters filter in a query string, the page cursor, and
the fields of a posted form (parsed here, so no multipart library is needed).

Pages of letters are found by *keyset*, not by offset: a cursor ``(before, skip)`` says
"letters whose last failure is at or before ``before``, passing over the first ``skip``
of those at exactly ``before``" (those already shown, ties being ordered by id). Every
store serves that from its time index -- a Redis sorted-set range, a SQL index range --
so page 2,000 of 100,000 letters costs what page 1 costs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode

from idempotask.backends.base import DeadLetter, DeadLetterFilter, Status
from idempotask.cli._text import parse_time
from idempotask.taxonomy import FailureKind

__all__ = [
    "BODY_LIMIT",
    "FILTER_FIELDS",
    "KINDS",
    "STATUSES",
    "Cursor",
    "FormError",
    "LetterQuery",
    "parse_body",
]

STATUSES = tuple(s.value for s in Status)
KINDS = tuple(k.value for k in FailureKind)
FILTER_FIELDS = ("status", "kind", "function", "since", "until", "search")
BODY_LIMIT = 64 * 1024  # a form posted here is a few fields; refuse anything larger


class FormError(ValueError):
    """A field the page cannot use; the message names the field and what it takes."""


def parse_body(body: bytes) -> dict[str, list[str]]:
    """The fields of an ``application/x-www-form-urlencoded`` body."""
    if len(body) > BODY_LIMIT:
        raise FormError(f"the form is larger than {BODY_LIMIT} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError("the form is not UTF-8") from None
    return parse_qs(text, keep_blank_values=True, max_num_fields=200)


def _values(params: Mapping[str, Sequence[str]], name: str) -> list[str]:
    return [v.strip() for v in params.get(name, ()) if v.strip()]


def _choices(params: Mapping[str, Sequence[str]], name: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [v.lower() for v in _values(params, name)]
    wrong = [v for v in chosen if v not in allowed]
    if wrong:
        raise FormError(f"{name}: {wrong[0]!r} is not one of {', '.join(allowed)}")
    return chosen


def _time(params: Mapping[str, Sequence[str]], name: str, now: float) -> float | None:
    given = _values(params, name)
    if not given:
        return None
    try:
        return parse_time(given[0], now)
    except ValueError as exc:
        raise FormError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class Cursor:
    """Where a page starts (see the module docstring); the first page has none."""

    before: float
    skip: int

    @classmethod
    def parse(cls, params: Mapping[str, Sequence[str]]) -> Cursor | None:
        """The cursor in ``before``/``skip``, or None."""
        before = _values(params, "before")
        if not before:
            return None
        try:
            at = float(before[0])
            skip = int((_values(params, "skip") or ["0"])[0])
        except ValueError:
            raise FormError("before/skip: not a page of this list (start again)") from None
        if not math.isfinite(at) or skip < 0 or skip > 1_000_000:
            raise FormError("before/skip: not a page of this list (start again)")
        return cls(at, skip)

    @classmethod
    def after(cls, shown: Sequence[DeadLetter], current: Cursor | None) -> Cursor:
        """The cursor of the page after ``shown`` (newest first, ties by id)."""
        last = shown[-1].last_failed_at
        ties = sum(1 for letter in shown if letter.last_failed_at == last)
        if current is not None and current.before == last:
            ties += current.skip
        return cls(last, ties)


@dataclass(frozen=True)
class LetterQuery:
    """The letters a page or an action is about, as the operator chose them."""

    status: tuple[str, ...] = ()
    kind: tuple[str, ...] = ()
    function: tuple[str, ...] = ()
    since_text: str = ""
    until_text: str = ""
    search: str = ""
    since: float | None = None
    until: float | None = None
    cursor: Cursor | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, params: Mapping[str, Sequence[str]], now: float) -> LetterQuery:
        """Read the filter fields (and the cursor) of a query string or a form."""
        search = (params.get("search") or [""])[0]
        if len(search) > 500:
            raise FormError("search: at most 500 characters")
        return cls(
            status=tuple(_choices(params, "status", STATUSES)),
            kind=tuple(_choices(params, "kind", KINDS)),
            function=tuple(f[:512] for f in _values(params, "function")),
            since_text=(_values(params, "since") or [""])[0],
            until_text=(_values(params, "until") or [""])[0],
            search=search.strip(),
            since=_time(params, "since", now),
            until=_time(params, "until", now),
            cursor=Cursor.parse(params),
        )

    @property
    def empty(self) -> bool:
        """Whether nothing is filtered (every letter matches)."""
        return (
            not (self.status or self.kind or self.function or self.since_text or self.until_text)
            and not self.search
        )

    def filter(self, statuses: tuple[Status, ...] | None = None) -> DeadLetterFilter:
        """The store filter; ``statuses`` replaces an empty status choice, or is
        intersected with the one made (what a bulk action may touch)."""
        chosen = tuple(Status(s) for s in self.status)
        if statuses is not None:
            chosen = tuple(s for s in chosen if s in statuses) if chosen else statuses
        return DeadLetterFilter(
            status=chosen,
            kind=self.kind,
            function=self.function,
            since=self.since,
            until=self.until,
            search=self.search,
        )

    def page_filter(self) -> tuple[DeadLetterFilter, int]:
        """The store filter and offset of the page the cursor names."""
        chosen = self.filter()
        if self.cursor is None:
            return chosen, 0
        # Letters at or before the cursor: until is exclusive, so just above it.
        bound = math.nextafter(self.cursor.before, math.inf)
        until = bound if self.until is None else min(self.until, bound)
        return dataclasses.replace(chosen, until=until), self.cursor.skip

    def pairs(self) -> list[tuple[str, str]]:
        """The filter as query-string pairs (no cursor), for links and hidden fields."""
        pairs = [("status", s) for s in self.status]
        pairs += [("kind", k) for k in self.kind]
        pairs += [("function", f) for f in self.function]
        if self.since_text:
            pairs.append(("since", self.since_text))
        if self.until_text:
            pairs.append(("until", self.until_text))
        if self.search:
            pairs.append(("search", self.search))
        return pairs

    def query_string(self, cursor: Cursor | None = None, **extra: str) -> str:
        """``?status=pending&...`` (with ``cursor`` and ``extra``), or ``""``."""
        pairs = self.pairs()
        if cursor is not None:
            pairs += [("before", repr(cursor.before)), ("skip", str(cursor.skip))]
        pairs += list(extra.items())
        return "?" + urlencode(pairs) if pairs else ""

    def describe(self) -> str:
        """The filter in words: ``status pending, function billing.charge``."""
        parts = []
        for name, values in (("status", self.status), ("kind", self.kind)):
            if values:
                parts.append(f"{name} {' or '.join(values)}")
        if self.function:
            parts.append(f"function {' or '.join(self.function)}")
        if self.since_text:
            parts.append(f"last failure since {self.since_text}")
        if self.until_text:
            parts.append(f"last failure before {self.until_text}")
        if self.search:
            parts.append(f"error containing {self.search!r}")
        return ", ".join(parts) if parts else "every letter"

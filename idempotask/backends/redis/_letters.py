"""The dead-letter format on Redis: a letter as the fields of one hash, filters as the
JSON ``dlq_scan.lua`` reads, and the scripts' replies parsed back (pure: no I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from idempotask.backends._letters import (
    FIELDS,
    TEXT_FIELDS,
    check_text,
    check_time,
    field_value,
    filter_fields,
)
from idempotask.backends.base import DeadLetter, DeadLetterFilter, Status, decode_history
from idempotask.backends.redis._records import DEFAULT_MAX_RECORD_BYTES
from idempotask.errors import CorruptRecordError

__all__ = [
    "DEAD_LETTER_FORMAT",
    "WHO",
    "ScanPage",
    "encode_change",
    "filter_json",
    "letter_fields",
    "parse_add_reply",
    "parse_dead_letter",
    "parse_letter_reply",
    "parse_scan",
    "search_fields",
]

#: The ``fmt`` field of every dead-letter hash (a value without it is not ours).
DEAD_LETTER_FORMAT = "idempotask-dlq/1"
FMT = DEAD_LETTER_FORMAT.encode()

WHO = "redis dead-letter store"
# Case-folded copies of the searched fields (Lua's string.lower knows ASCII only).
_SEARCHED = ("error_type", "message")


def as_bytes(value: Any) -> bytes:
    """A reply item as bytes (a client with ``decode_responses=True`` gives str)."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


def _utf8(text: str) -> bytes:
    # surrogatepass: an exception message may carry the lone surrogates of an undecodable
    # file name, and it must round-trip, not fail.
    return text.encode("utf-8", "surrogatepass")


def encode_text(value: Any, field: str) -> bytes:
    """A text field as the UTF-8 a letter hash holds."""
    return _utf8(check_text(value, field, WHO))


def encode_time(value: Any, field: str) -> bytes:
    """Epoch seconds as the shortest exact decimal (``repr``): Lua and ``ZADD`` read it
    back as the same double, so times round-trip exactly."""
    return repr(check_time(value, field, WHO)).encode()


def by_time_score(last_failed_at: Any) -> bytes:
    """A letter's ``by_time`` score: negated, so ascending ZRANGE order is newest first."""
    return repr(-check_time(last_failed_at, "last_failed_at", WHO)).encode()


def encode_change(field: str, value: Any) -> bytes:
    """The hash value of one letter field (checked first)."""
    value = field_value(field, value, WHO)
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, Status):
        return value.value.encode()
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, (int, float)):
        return repr(value).encode()
    return _utf8(value)


def search_fields(changes: dict[str, Any]) -> list[bytes]:
    """The case-folded copies ``dlq_scan`` searches, for the searched fields in ``changes``."""
    pairs: list[bytes] = []
    for name in _SEARCHED:
        if name in changes:
            folded = check_text(changes[name], name, WHO).casefold()
            pairs += [f"cf_{name}".encode(), _utf8(folded)]
    return pairs


def letter_fields(letter: DeadLetter) -> list[bytes]:
    """A letter as the field, value pairs of its Redis hash (the format marker first).

    >>> letter = DeadLetter(id="1", function="f", kind="transient", error_type="E",
    ...                     message="m", last_failed_at=1.5, next_retry_at=None)
    >>> dict(zip(*[iter(letter_fields(letter))] * 2))[b"next_retry_at"]
    b''
    """
    fields: list[bytes] = [b"fmt", FMT]
    for name in FIELDS:
        fields += [name.encode(), encode_change(name, getattr(letter, name))]
    return fields + search_fields({name: getattr(letter, name) for name in _SEARCHED})


def corrupt(where: str, what: Any) -> CorruptRecordError:
    """The error for a value at ``where`` that is not one of our dead letters."""
    found = as_bytes(what).decode("utf-8", "replace") if what is not None else "nothing"
    return CorruptRecordError(
        f"redis dead-letter store: the value under Redis key {where!r} is not an idempotask "
        f"dead letter: found {found}. Another program uses this key, or the data is "
        "corrupt; use another namespace, or delete the key"
    )


def parse_dead_letter(
    where: str, fields: Any, *, limit: int = DEFAULT_MAX_RECORD_BYTES
) -> DeadLetter:
    """Build a :class:`DeadLetter` from a letter hash as ``HGETALL`` lists it.

    Unknown fields are ignored (``op`` is the last update's token); a missing or
    malformed one, or a hash over ``limit`` bytes, is a :class:`CorruptRecordError`
    naming ``where``.

    >>> pairs = letter_fields(DeadLetter(id="1", function="f", kind="transient",
    ...                                  error_type="E", message="m", attempts=2))
    >>> parse_dead_letter("k", pairs).attempts
    2
    """
    if not isinstance(fields, list) or len(fields) % 2:
        raise corrupt(where, repr(fields)[:80])
    size = sum(len(item) for item in fields if isinstance(item, (bytes, str)))
    if size > limit:
        raise CorruptRecordError(
            f"redis dead-letter store: the letter under Redis key {where!r} is {size:,} "
            f"bytes, over max_record_bytes={limit:,}; it was not read. Delete it if it is "
            "not ours, or raise max_record_bytes= on the RedisBackend"
        )
    data = {as_bytes(fields[i]): as_bytes(fields[i + 1]) for i in range(0, len(fields), 2)}
    if data.get(b"fmt") != FMT:
        raise corrupt(where, f"a hash without the format marker {DEAD_LETTER_FORMAT}")
    try:
        text = {n: data[n.encode()].decode("utf-8", "surrogatepass") for n in TEXT_FIELDS}
        next_retry_at = data[b"next_retry_at"]
        return DeadLetter(
            **text,
            arguments=data[b"arguments"],
            attempts=int(data[b"attempts"]),
            status=Status(data[b"status"].decode()),
            first_failed_at=float(data[b"first_failed_at"]),
            last_failed_at=float(data[b"last_failed_at"]),
            next_retry_at=float(next_retry_at) if next_retry_at else None,
            critical=data[b"critical"] == b"1",
            version=int(data[b"version"]),
            # Letters written before histories were kept have none.
            history=decode_history(
                data.get(b"history", b"").decode("utf-8", "surrogatepass"), where
            ),
        )
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise corrupt(where, f"a dead letter with a missing or malformed field ({exc!r})")


def reply_tag(reply: Any) -> bytes:
    """The first item of a script's reply, which says what the reply is."""
    if isinstance(reply, list) and reply:
        return as_bytes(reply[0])
    return b""


def parse_letter_reply(
    where: str, reply: Any, *, limit: int = DEFAULT_MAX_RECORD_BYTES
) -> DeadLetter | None:
    """Turn a ``dlq_get`` / ``dlq_update`` reply into a letter (``None``: absent, stale,
    or held by a processor's claim).

    >>> parse_letter_reply("k", [b"stale"]) is None
    True
    """
    tag = reply_tag(reply)
    if tag == b"dl" and len(reply) == 2:
        return parse_dead_letter(where, reply[1], limit=limit)
    if tag in (b"absent", b"stale", b"claimed") and len(reply) == 1:
        return None
    raise corrupt(where, reply[1] if tag == b"corrupt" and len(reply) == 2 else repr(reply))


def parse_add_reply(
    where: str, reply: Any, letter: DeadLetter, *, limit: int = DEFAULT_MAX_RECORD_BYTES
) -> DeadLetter:
    """The stored letter after ``dlq_add``: ``letter`` itself when it was new.

    >>> letter = DeadLetter(id="1", function="f", kind="k", error_type="E", message="m")
    >>> parse_add_reply("k", [b"new"], letter) is letter
    True
    """
    if reply_tag(reply) == b"new" and len(reply) == 1:
        return letter
    stored = parse_letter_reply(where, reply, limit=limit)
    if stored is None:
        raise corrupt(where, repr(reply))
    return stored


@dataclass(frozen=True, slots=True)
class ScanPage:
    """One ``dlq_scan`` call's answer: see ``lua/dlq_scan.lua``."""

    done: bool
    cursor: tuple[bytes, bytes]
    skipped: int
    items: list[Any]


def parse_scan(base: str, reply: Any) -> ScanPage:
    """Turn a ``dlq_scan`` reply into a :class:`ScanPage`; ``base`` is the queue's key.

    >>> parse_scan("q", [b"scan", 1, b"", b"", 0, []]).done
    True
    """
    tag = reply_tag(reply)
    if tag == b"scan" and len(reply) == 6 and isinstance(reply[5], list):
        _, done, score, id, skipped, items = reply
        return ScanPage(int(done) == 1, (as_bytes(score), as_bytes(id)), int(skipped), items)
    if tag == b"corrupt" and len(reply) == 3:
        letter = as_bytes(reply[1]).decode("utf-8", "replace")
        raise corrupt(f"{base}:letter:{letter}", reply[2])
    raise corrupt(base, repr(reply)[:80])


def stat_rows(items: list[Any]) -> list[tuple[str, str, Status, int, int, int]]:
    """A ``stats`` page's flat sextuples as rows."""
    rows = []
    for i in range(0, len(items) - 5, 6):
        function, kind, status = (
            as_bytes(x).decode("utf-8", "surrogatepass") for x in items[i : i + 3]
        )
        count, retries, by_retry = (int(x) for x in items[i + 3 : i + 6])
        rows.append((function, kind, Status(status), count, retries, by_retry))
    return rows


def filter_json(filter: DeadLetterFilter | None) -> bytes:
    """A filter as the JSON ``dlq_scan`` reads (empty fields left out: they match all).

    ``search`` goes case-folded: the script compares it, as plain text, with the letter's
    case-folded ``error_type`` and ``message``.

    >>> filter_json(DeadLetterFilter(kind=("transient",), since=1.5))
    b'{"kind": ["transient"], "since": 1.5}'
    >>> filter_json(DeadLetterFilter(search="TimeOut"))
    b'{"search": "timeout"}'
    """
    spec = filter_fields(filter, WHO)
    if "search" in spec:
        spec["search"] = spec["search"].casefold()
    # UTF-8 as is (ensure_ascii=False): cjson passes the bytes through unchanged, so they
    # compare equal to the stored fields byte for byte.
    return json.dumps(spec, ensure_ascii=False).encode("utf-8", "surrogatepass")


def by_time_range(filter: DeadLetterFilter | None) -> tuple[bytes, bytes]:
    """(exclusive lower, inclusive upper) by_time scores for ``since <= t < until``."""
    if filter is None:
        return b"", b""
    lo = b"" if filter.until is None else by_time_score(filter.until)
    hi = b"" if filter.since is None else by_time_score(filter.since)
    return lo, hi

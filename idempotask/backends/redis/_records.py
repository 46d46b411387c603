"""The record format: how one idempotency record is laid out in one Redis string.

:func:`record_key` names the string (the package docstring tells the two key forms); its
hash tag keeps everything one record needs in one cluster slot while records spread over
the cluster. ``lua/claim.lua`` documents the value's layout; its format marker is how a
value that is not ours is detected. The key's own expiry is the lease (IN_PROGRESS) or
the ttl (COMPLETED, FAILED), by the server's clock.

Everything here is pure: no I/O, no redis-py.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

from idempotask.backends.base import Record, State
from idempotask.errors import ConfigurationError, CorruptRecordError

__all__ = [
    "DEFAULT_MAX_RECORD_BYTES",
    "MAX_FIELD_BYTES",
    "RECORD_FORMAT",
    "check_max_record_bytes",
    "claim_value",
    "eviction_warning",
    "library_key",
    "milliseconds",
    "parse_claim",
    "parse_flag",
    "parse_record",
    "parse_value",
    "record_key",
]

#: The marker every record this backend writes starts with. A value under one of our keys
#: without it is foreign (or from an incompatible format: ``idempotask/1`` was a hash).
RECORD_FORMAT = "idempotask/2"
FORMAT = RECORD_FORMAT.encode()
# Marker, state byte, the lengths of token, owner and fingerprint: see lua/claim.lua.
_LENGTHS = struct.Struct(">HHH")
_HEADER = len(FORMAT) + 1 + _LENGTHS.size
_MARKER = len(FORMAT)  # where the state byte is
_unpack_lengths = _LENGTHS.unpack_from
STATE_BYTES = {State.IN_PROGRESS: b"i", State.COMPLETED: b"c", State.FAILED: b"f"}
_STATES = {ord(v): k for k, v in STATE_BYTES.items()}
#: The longest token, owner id or fingerprint a record can hold, in UTF-8 bytes.
MAX_FIELD_BYTES = 0xFFFF
#: The largest stored value a read will parse, unless ``max_record_bytes=`` says otherwise:
#: 16 MiB, far above the 1 MiB ``max_result_bytes`` default of ``@idempotent``. A larger
#: value under our key is refused as corrupt before it is parsed.
DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024


# ------------------------------------------------------------------------------- keys


def _escape(part: str) -> str:
    if "{" in part or "}" in part or "%" in part:
        return part.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return part


def _unescape(part: str) -> str:
    if "%" in part:
        return part.replace("%7B", "{").replace("%7D", "}").replace("%25", "%")
    return part


def record_key(key: str) -> str:
    """The Redis key of a record: the hash tag goes around everything after the first ``:``.

    ``key`` is the library key (``namespace:name:v1:digest``, what ``key_for`` returns and
    ``idempotask keys show`` accepts); the result is what ``redis-cli`` shows. A key without
    ``:`` is tagged whole. ``{``, ``}`` and ``%`` are percent-escaped, so the only braces in
    a Redis key are the hash tag's own and two different keys never share a Redis key. Keys
    built by :mod:`idempotask.keys` never need escaping. :func:`library_key` reverses it.

    >>> record_key("ns:billing.charge:1:ab12")
    'ns:{billing.charge:1:ab12}'
    >>> record_key("ns:{odd}:100%")
    'ns:{%7Bodd%7D:100%25}'
    """
    if not isinstance(key, str) or not key:
        raise ConfigurationError(
            f"redis backend: a key must be a non-empty str, got {type(key).__qualname__}"
            + ("" if key else " (empty)")
        )
    namespace, sep, rest = _escape(key).partition(":")
    if not sep:
        return "{" + namespace + "}"
    return namespace + ":{" + rest + "}"


def library_key(redis_key: str | bytes) -> str | None:
    """The library key of a record's Redis key (``None`` when it is not shaped like one).

    >>> library_key("ns:{billing.charge:1:ab12}")
    'ns:billing.charge:1:ab12'
    >>> library_key(record_key("ns:{odd}:100%"))
    'ns:{odd}:100%'
    >>> library_key("ns:{breaker:x}:extra") is None
    True
    """
    if isinstance(redis_key, bytes):
        try:
            redis_key = redis_key.decode()
        except UnicodeDecodeError:
            return None
    head, brace, rest = redis_key.partition("{")
    if not brace or not rest.endswith("}") or "{" in rest or "}" in rest[:-1]:
        return None
    if head and (not head.endswith(":") or ":" in head[:-1] or "}" in head):
        return None
    body = _unescape(rest[:-1])
    return _unescape(head) + body if head else body


# ------------------------------------------------------------------------ durations


def milliseconds(seconds: float, option: str) -> int:
    """Seconds -> whole milliseconds for ``PX``/``PEXPIRE``, rounded up, at least 1.

    >>> milliseconds(1.1, "ttl"), milliseconds(0.0000001, "lease")
    (1100, 1)
    """
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise ConfigurationError(
            f"redis backend: {option} must be a positive, finite number of seconds, got {seconds!r}"
        )
    # round() first so float noise (1.1 * 1000 = 1100.0000000000002) does not add a ms.
    return max(1, math.ceil(round(seconds * 1000, 6)))


def check_max_record_bytes(value: Any) -> int:
    """Validate the ``max_record_bytes`` option (an int of at least 1 KiB)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
        raise ConfigurationError(
            f"redis backend: max_record_bytes must be an int >= 1024, got {value!r}"
        )
    return value


# ------------------------------------------------------------------------ values


def field(value: str, what: str) -> bytes:
    """A token, owner id or fingerprint as the UTF-8 bytes a record holds."""
    if not value and type(value) is str:
        return b""
    if not isinstance(value, str):
        raise ConfigurationError(
            f"redis backend: {what} must be a str, got {type(value).__qualname__}"
        )
    data = value.encode()
    if len(data) > MAX_FIELD_BYTES:
        raise ConfigurationError(
            f"redis backend: {what} is {len(data)} bytes in UTF-8; a record holds at most "
            f"{MAX_FIELD_BYTES}"
        )
    return data


def claim_value(token: bytes, owner: bytes, fingerprint: bytes) -> bytes:
    """The value of a fresh claim: an in-progress record with no payload.

    >>> claim_value(b"t-1", b"", b"")
    b'idempotask/2i\\x00\\x03\\x00\\x00\\x00\\x00t-1'
    """
    lengths = _LENGTHS.pack(len(token), len(owner), len(fingerprint))
    return b"".join((FORMAT, b"i", lengths, token, owner, fingerprint))


def _text(value: bytes, key: str) -> str:
    if not value:
        return ""
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise CorruptRecordError(
            f"redis backend: record {key!r} has a token, owner or fingerprint that is not UTF-8"
        ) from None


def corrupt(key: str, what: str) -> CorruptRecordError:
    """The error for a value under ``key`` that is not a record; ``what`` says what it is."""
    return CorruptRecordError(
        f"redis backend: the value under key {key!r} (Redis key {record_key(key)!r}) is not "
        f"an idempotask record: found {what}. Another program uses this key, or the data is "
        "corrupt; use another namespace, or delete the key (delete() without a token does)"
    )


def _reply_text(reply: Any) -> str:
    if isinstance(reply, list) and len(reply) == 2 and reply[0] in (b"corrupt", "corrupt"):
        what = reply[1]
        return what.decode(errors="replace") if isinstance(what, bytes) else str(what)
    return f"an unexpected reply of type {type(reply).__qualname__}"


def parse_value(
    key: str, value: Any, pttl: int | None = None, *, limit: int = DEFAULT_MAX_RECORD_BYTES
) -> Record:
    """Turn a record's stored value into a :class:`Record`; ``pttl`` is its PTTL in ms.

    A value over ``limit`` bytes is refused before it is read any further.

    >>> parse_value("k", claim_value(b"t-1", b"", b""), 30000).held_by("t-1")
    True
    """
    if isinstance(value, str):  # only from a client that decoded the reply after all
        value = value.encode("utf-8", "surrogateescape")
    if not isinstance(value, bytes):
        raise corrupt(key, f"a reply of type {type(value).__qualname__}")
    if len(value) > limit:
        raise CorruptRecordError(
            f"redis backend: the value under key {key!r} (Redis key {record_key(key)!r}) is "
            f"{len(value):,} bytes, over max_record_bytes={limit:,}; it was not read. Delete "
            "the key if it is not ours, or raise max_record_bytes= if it is"
        )
    if len(value) < _HEADER or not value.startswith(FORMAT):
        raise corrupt(key, f"a string without the format marker {RECORD_FORMAT}")
    state = _STATES.get(value[_MARKER])
    if state is None:
        raise CorruptRecordError(f"redis backend: record {key!r} has an unknown state byte")
    token_len, owner_len, fingerprint_len = _unpack_lengths(value, _MARKER + 1)
    owner_at = _HEADER + token_len
    fingerprint_at = owner_at + owner_len
    payload_at = fingerprint_at + fingerprint_len
    if payload_at > len(value):
        raise CorruptRecordError(
            f"redis backend: record {key!r} is truncated ({len(value)} bytes, its header "
            f"announces at least {payload_at})"
        )
    if state is State.IN_PROGRESS and not token_len:
        # Every claim carries its caller's token: a claim without one is not ours, and no
        # caller could ever complete, renew or release it.
        raise corrupt(key, "a claim without a token")
    return Record(
        key=key,
        state=state,
        token=_text(value[_HEADER:owner_at], key),
        owner=_text(value[owner_at:fingerprint_at], key),
        fingerprint=_text(value[fingerprint_at:payload_at], key),
        payload=value[payload_at:],
        expires_in=pttl / 1000 if pttl is not None and pttl >= 0 else None,
    )


def parse_record(key: str, reply: Any, *, limit: int = DEFAULT_MAX_RECORD_BYTES) -> Record | None:
    """Turn a ``claim`` or ``get`` script reply into a :class:`Record` (``None``: absent).

    >>> parse_record("k", [claim_value(b"t", b"", b""), 1500]).expires_in
    1.5
    >>> parse_record("k", None) is None
    True
    """
    if reply is None:
        return None
    if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], int):
        return parse_value(key, reply[0], reply[1], limit=limit)
    raise corrupt(key, _reply_text(reply))


def parse_claim(key: str, reply: Any, *, limit: int = DEFAULT_MAX_RECORD_BYTES) -> Record:
    """Like :func:`parse_record`, for ``claim``, whose reply always carries a record.

    >>> parse_claim("k", [claim_value(b"t", b"", b""), 30000]).held_by("t")
    True
    """
    record = parse_record(key, reply, limit=limit)
    if record is None:
        raise corrupt(key, "no record in a claim's reply")
    return record


def parse_flag(key: str, reply: Any) -> bool:
    """Turn a ``complete``/``fail``/``renew``/``delete`` script reply into a bool.

    >>> parse_flag("k", 1), parse_flag("k", 0)
    (True, False)
    """
    if isinstance(reply, int):
        return reply == 1
    raise corrupt(key, _reply_text(reply))


# -------------------------------------------------------------------- eviction policy


def policies(reply: Any) -> list[str]:
    """Every ``maxmemory-policy`` value in a CONFIG GET reply (one node's or a cluster's)."""
    found: list[str] = []
    if isinstance(reply, Mapping):
        for name, value in reply.items():
            name_ = name.decode() if isinstance(name, bytes) else name
            if name_ == "maxmemory-policy" and isinstance(value, (bytes, str)):
                found.append(value.decode() if isinstance(value, bytes) else value)
            else:
                found.extend(policies(value))
    elif isinstance(reply, (list, tuple)):
        items = list(reply)
        for i in range(0, len(items) - 1, 2):
            found.extend(policies({items[i]: items[i + 1]}))
    return found


def eviction_warning(server: str, found: list[str]) -> str | None:
    """The warning text when a ``maxmemory-policy`` could evict our keys, else ``None``.

    ``allkeys-*`` evicts any key; ``volatile-*`` evicts keys with a TTL, and every record
    has one. Only ``noeviction`` keeps records until their lease or ttl runs out.

    >>> eviction_warning("localhost:6379/0", ["noeviction"]) is None
    True
    >>> "allkeys-lru" in eviction_warning("localhost:6379/0", ["allkeys-lru"])
    True
    """
    risky = sorted({policy for policy in found if policy != "noeviction"})
    if not risky:
        return None
    return (
        f"Redis at {server} has maxmemory-policy={','.join(risky)}: under memory pressure it "
        "can evict idempotency records before their ttl (every record has a TTL, so "
        "volatile-* policies evict them too), and a duplicate call could then run again. "
        "Use maxmemory-policy noeviction for the idempotask database."
    )

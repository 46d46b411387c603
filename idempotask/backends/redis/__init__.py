"""The Redis stores: idempotency records, dead letters and circuit breakers on Redis,
Redis Cluster or Sentinel, through redis-py's public API.

- :class:`RedisBackend` (``_store``): one string per record, one atomic command per state
  change; a duplicate is one round trip, a first call two.
- :class:`RedisDeadLetterStore` (``_deadletters``, format in ``_letters``) and
  :class:`RedisBreakerStore` (``_breakers``): on a backend's clients, scoped by namespace
  (``backend.dead_letter_store(namespace=...)``, ``backend.breaker_store(namespace=...)``).
- The record format (``_records``), making clients (``_connect``), running commands and
  scripts on them (``_clients``), and the Lua scripts in ``lua/``.

A record for the library key ``namespace:name:v1:digest`` (what ``key_for`` returns)
lives in the Redis key ``namespace:{name:v1:digest}``: :func:`record_key` maps one to the
other and :func:`library_key` back. Every lookup (``get``, ``delete``, ``scan``) takes the
library key, and ``scan`` returns it.

One backend object serves sync and async callers::

    >>> from idempotask.backends.redis import RedisBackend
    >>> store = RedisBackend.from_url("redis://localhost:6379/0")   # connects on first use
    >>> record = store.claim("ns:billing.charge:1:ab12", "token-1", lease=30)  # doctest: +SKIP
    >>> record.held_by("token-1")  # doctest: +SKIP
    True

Guarantees hold only while Redis keeps its data: eviction (any ``maxmemory-policy`` but
``noeviction``: every record has a TTL, so ``volatile-*`` policies evict them too) or a
failover without persistence can lose a record. The backend warns once when the server's
policy could evict our keys.
"""

from __future__ import annotations

from idempotask.backends.redis._breakers import BREAKER_FORMAT, RedisBreakerStore, parse_breaker
from idempotask.backends.redis._connect import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RETRIES,
    DEFAULT_SOCKET_TIMEOUT,
    safe_url,
)
from idempotask.backends.redis._deadletters import SCAN_BUDGET, RedisDeadLetterStore
from idempotask.backends.redis._letters import (
    DEAD_LETTER_FORMAT,
    filter_json,
    letter_fields,
    parse_dead_letter,
)
from idempotask.backends.redis._records import (
    DEFAULT_MAX_RECORD_BYTES,
    MAX_FIELD_BYTES,
    RECORD_FORMAT,
    claim_value,
    eviction_warning,
    library_key,
    milliseconds,
    parse_claim,
    parse_flag,
    parse_record,
    parse_value,
    record_key,
)
from idempotask.backends.redis._store import SCAN_CALLS, SCAN_COUNT, RedisBackend, scan_pattern

__all__ = [
    "BREAKER_FORMAT",
    "DEAD_LETTER_FORMAT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_RETRIES",
    "DEFAULT_SOCKET_TIMEOUT",
    "MAX_FIELD_BYTES",
    "RECORD_FORMAT",
    "SCAN_BUDGET",
    "SCAN_CALLS",
    "SCAN_COUNT",
    "RedisBackend",
    "RedisBreakerStore",
    "RedisDeadLetterStore",
    "claim_value",
    "eviction_warning",
    "filter_json",
    "letter_fields",
    "library_key",
    "milliseconds",
    "parse_breaker",
    "parse_claim",
    "parse_dead_letter",
    "parse_flag",
    "parse_record",
    "parse_value",
    "record_key",
    "safe_url",
    "scan_pattern",
]

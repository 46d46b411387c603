"""Building a dead-letter store from a URL.

The contract (:class:`~idempotask.backends.base.DeadLetterStore`) and its value types
live in :mod:`idempotask.backends.base`; they are re-exported here for existing imports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from idempotask.backends.base import (
    MUTABLE_FIELDS,
    OPEN_STATUSES,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStore,
    StatRow,
    Status,
    SupportsExpireClaim,
    check_changes,
)

__all__ = [
    "MUTABLE_FIELDS",
    "OPEN_STATUSES",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterStore",
    "DeadLetterStoreFactory",
    "StatRow",
    "Status",
    "SupportsExpireClaim",
    "check_changes",
    "dead_letter_store_from_url",
    "register_dead_letter_scheme",
]

# -- building a store from a URL ---------------------------------------------------------

DeadLetterStoreFactory = Callable[[str], DeadLetterStore]
"""Builds a dead-letter store from its URL."""

# scheme -> "module:attribute"; imported only when a store of that scheme is built.
_BUILTIN: dict[str, str] = {
    "memory": "idempotask.backends.memory:MemoryDeadLetterStore.from_url",
    # ?prefix=NAME picks the queue (default "idempotask"); other options go to redis-py.
    "redis": "idempotask.backends.redis:RedisDeadLetterStore.from_url",
    "rediss": "idempotask.backends.redis:RedisDeadLetterStore.from_url",
    "unix": "idempotask.backends.redis:RedisDeadLetterStore.from_url",
}
# SQL URLs as the idempotency backend takes them, bare or naming a driver (the drivers of
# idempotask.backends.sql._engines; a test checks the two lists agree). ?table=NAME names
# the dead-letter table.
_BUILTIN.update(
    {
        f"{database}+{driver}" if driver else database: (
            "idempotask.backends.sql:SQLDeadLetterStore.from_url"
        )
        for databases, drivers in (
            (
                ("postgresql", "postgres"),
                ("psycopg", "psycopg2", "psycopg2cffi", "pg8000", "psycopg_async", "asyncpg"),
            ),
            (("sqlite",), ("pysqlite", "pysqlcipher", "aiosqlite")),
            (
                ("mysql", "mariadb"),
                (
                    "pymysql",
                    "mysqldb",
                    "mysqlconnector",
                    "mariadbconnector",
                    "cymysql",
                    "aiomysql",
                    "asyncmy",
                ),
            ),
        )
        for database in databases
        for driver in ("", *drivers)
    }
)
# Schemes the idempotency backends know whose dead-letter store is still to be written:
# their URLs get an error that says so rather than "unknown scheme". (None left.)
_NOT_YET: tuple[str, ...] = ()
_registered: dict[str, DeadLetterStoreFactory] = {}


def register_dead_letter_scheme(scheme: str, factory: DeadLetterStoreFactory) -> None:
    """Make :func:`dead_letter_store_from_url` build ``scheme://...`` with ``factory(url)``.

    Registered schemes win over built-in ones; SQL URLs register their dialect name
    (``"postgresql"`` also serves ``postgresql+psycopg://``)::

        register_dead_letter_scheme("redis", RedisDeadLetterStore.from_url)
    """
    from idempotask.errors import ConfigurationError

    if not isinstance(scheme, str) or not scheme.replace("+", "").replace("-", "").isalnum():
        raise ConfigurationError(f"register_dead_letter_scheme: invalid URL scheme {scheme!r}")
    if not callable(factory):
        raise ConfigurationError(
            f"register_dead_letter_scheme: factory must be a callable taking the URL, "
            f"got {factory!r}"
        )
    _registered[scheme.lower()] = factory


def dead_letter_store_from_url(url: str) -> DeadLetterStore:
    """Build a dead-letter store from a URL: ``memory://``, ``redis://`` (``rediss://``,
    ``unix://``; see :class:`~idempotask.backends.redis.RedisDeadLetterStore`) or a
    registered scheme.

    >>> dead_letter_store_from_url("memory://")  # doctest: +ELLIPSIS
    MemoryDeadLetterStore(...)

    An unknown scheme, or one whose store is not written yet, is a
    :class:`~idempotask.errors.ConfigurationError` that says so.
    """
    import importlib

    from idempotask.errors import ConfigurationError

    if not isinstance(url, str) or "://" not in url:
        # Never echo the value: a malformed URL may still carry a password.
        raise ConfigurationError(
            "dead_letter_store: expected a URL such as 'memory://', "
            f"got a {type(url).__name__} without '://'"
        )
    scheme = url.split("://", 1)[0].lower()
    for candidate in (scheme, scheme.split("+", 1)[0]):
        if candidate in _registered:
            return _registered[candidate](url)
    if scheme in _BUILTIN:
        module_name, _, attr_path = _BUILTIN[scheme].partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr_path.split("."):
            obj = getattr(obj, part)
        store: DeadLetterStore = obj(url)
        return store
    if scheme.split("+", 1)[0] in _NOT_YET:
        raise ConfigurationError(
            f"dead_letter_store: the dead-letter store for {scheme}:// URLs is not available "
            f"yet; use 'memory://' (per process), or register a store for the scheme with "
            f"idempotask.backends.deadletters.register_dead_letter_scheme()"
        )
    known = sorted({*_BUILTIN, *_registered})
    raise ConfigurationError(
        f"dead_letter_store: unknown URL scheme {scheme!r}; known schemes: {', '.join(known)}"
    )

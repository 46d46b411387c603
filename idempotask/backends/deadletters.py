"""Building a dead-letter store from a URL.

The contract (:class:`~idempotask.backends.base.DeadLetterStore`) and its value types
live in :mod:`idempotask.backends.base`; they are re-exported here for existing imports.
"""

from __future__ import annotations

from collections.abc import Callable

from idempotask.backends import SQL_DRIVERS, SQL_EXTRAS, backend_from_url, load_factory
from idempotask.backends.base import (
    MUTABLE_FIELDS,
    OPEN_STATUSES,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStore,
    ProvidesStores,
    StatRow,
    Status,
    SupportsExpireClaim,
    check_changes,
)
from idempotask.errors import ConfigurationError

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

# scheme -> ("module:attribute", the extra that installs its driver); imported only when a
# store of that scheme is built.
_REDIS = ("idempotask.backends.redis:RedisDeadLetterStore.from_url", "redis")
_BUILTIN: dict[str, tuple[str, str]] = {
    "memory": ("idempotask.backends.memory:MemoryDeadLetterStore.from_url", ""),
    # ?prefix=NAME picks the queue; other options go to redis-py.
    "redis": _REDIS,
    "rediss": _REDIS,
    "unix": _REDIS,
}
# SQL URLs as the idempotency backend takes them, bare or naming one of its drivers;
# ?table=NAME names the dead-letter table. The extra installs SQLAlchemy and the
# dialect's driver at once.
_BUILTIN.update(
    {
        f"{database}+{driver}" if driver else database: (
            "idempotask.backends.sql:SQLDeadLetterStore.from_url",
            SQL_EXTRAS[database],
        )
        for dialect, (sync, _, asynchronous, _) in SQL_DRIVERS.items()
        for database in ((dialect, "postgres") if dialect == "postgresql" else (dialect,))
        for driver in ("", *sync, *asynchronous)
    }
)


# URL options by which a built-in store's URL names its queue itself (a Redis key prefix,
# a SQL table): such a URL is built as it says, whatever the namespace.
_QUEUE_OPTIONS = frozenset({"prefix", "table"})
_registered: dict[str, DeadLetterStoreFactory] = {}


def register_dead_letter_scheme(scheme: str, factory: DeadLetterStoreFactory) -> None:
    """Make :func:`dead_letter_store_from_url` build ``scheme://...`` with ``factory(url)``.

    Registered schemes win over built-in ones; SQL URLs register their dialect name
    (``"postgresql"`` also serves ``postgresql+psycopg://``)::

        register_dead_letter_scheme("redis", RedisDeadLetterStore.from_url)
    """
    if not isinstance(scheme, str) or not scheme.replace("+", "").replace("-", "").isalnum():
        raise ConfigurationError(f"register_dead_letter_scheme: invalid URL scheme {scheme!r}")
    if not callable(factory):
        raise ConfigurationError(
            f"register_dead_letter_scheme: factory must be a callable taking the URL, "
            f"got {factory!r}"
        )
    _registered[scheme.lower()] = factory


def _names_its_queue(url: str) -> bool:
    from urllib.parse import parse_qsl, urlsplit

    try:
        query = urlsplit(url).query
    except ValueError:
        return False
    return any(name in _QUEUE_OPTIONS for name, _ in parse_qsl(query, keep_blank_values=True))


def dead_letter_store_from_url(url: str, *, namespace: str | None = None) -> DeadLetterStore:
    """Build a dead-letter store from a URL: ``memory://``, ``redis://`` (``rediss://``,
    ``unix://``; see :class:`~idempotask.backends.redis.RedisDeadLetterStore`), a SQL URL
    (see :class:`~idempotask.backends.sql.SQLDeadLetterStore`) or a registered scheme.

    With ``namespace``, a built-in scheme keeps that namespace's letters only: the store
    is the one its backend gives for the namespace (``backend.dead_letter_store(
    namespace=...)``, :class:`~idempotask.backends.base.ProvidesStores`), unless the URL
    names its queue itself (``?prefix=`` for Redis, ``?table=`` for SQL). Registered
    schemes get the URL alone.

    >>> dead_letter_store_from_url("memory://")  # doctest: +ELLIPSIS
    MemoryDeadLetterStore(...)

    An unknown scheme is a :class:`~idempotask.errors.ConfigurationError` listing the
    known ones; a driver that is not installed is a
    :class:`~idempotask.errors.MissingDependencyError` naming the extra to install
    (``pip install 'idempotask[redis]'``, ``'idempotask[postgresql]'``...).
    """
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
    if scheme not in _BUILTIN:
        known = sorted({*_BUILTIN, *_registered})
        raise ConfigurationError(
            f"dead_letter_store: unknown URL scheme {scheme!r}; known schemes: {', '.join(known)}"
        )
    if namespace is not None and not _names_its_queue(url):
        backend = backend_from_url(url)
        if isinstance(backend, ProvidesStores):
            return backend.dead_letter_store(namespace=namespace)
    store: DeadLetterStore = load_factory(*_BUILTIN[scheme])(url)
    return store

"""The dead-letter store protocol.

A dead letter is the record of a call that failed: what ran, with which (redacted)
arguments, how it failed, how often, and when it is due for another try. Stores keep
them and answer five questions; the scheduling logic lives in
:class:`idempotask.deadletter.DeadLetterQueue`, not here.

Times are wall-clock epoch seconds (``time.time()``) chosen by the caller, because a
spooled record must keep the moment it failed. The one exclusion that must hold across
processes -- two processors never replay one record -- is a lease taken by
:meth:`DeadLetterStore.claim_due`, which stores measure on their own clock where they
have one (Redis ``TIME``, the database's clock).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

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


class Status(str, enum.Enum):
    """Where a dead letter stands."""

    PENDING = "pending"  # failed, waiting for its next retry (or for a person)
    RETRYING = "retrying"  # replayed at least once and failed again; another retry is due
    RESOLVED = (
        "resolved"  # a replay succeeded, the call had completed meanwhile, or a person said so
    )
    ABANDONED = "abandoned"  # retries exhausted (or a person gave up): nothing more happens


OPEN_STATUSES = (Status.PENDING, Status.RETRYING)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One failed call.

    ``function`` is the replay name (a registered function's name, or a framework's
    task name when ``route`` names the framework). ``arguments`` are the call's
    arguments after the redaction hook, serialized (the store sees bytes). ``kind`` is a
    :class:`idempotask.taxonomy.FailureKind` value. ``attempts`` counts failures so far.
    ``version`` increases with every change and makes :meth:`DeadLetterStore.update` a
    compare-and-set. ``resolution`` says how a RESOLVED record got there (``"retry"``,
    ``"completed"`` -- the call had already completed --, ``"manual"``).
    """

    id: str
    function: str
    kind: str
    error_type: str
    message: str
    traceback: str = ""
    arguments: bytes = b""
    key: str = ""
    attempts: int = 1
    status: Status = Status.PENDING
    first_failed_at: float = 0.0
    last_failed_at: float = 0.0
    next_retry_at: float | None = None
    route: str = ""
    critical: bool = False
    resolution: str = ""
    version: int = 0

    def evolve(self, **changes: Any) -> DeadLetter:
        """A copy with ``changes`` applied (the version is left to the store)."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters a query or a bulk operation is about; empty matches all.

    ``since`` / ``until`` bound ``last_failed_at``.
    """

    status: tuple[Status, ...] = ()
    kind: tuple[str, ...] = ()
    function: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` passes this filter (stores may use it, or SQL/indexes)."""
        return (
            (not self.status or letter.status in self.status)
            and (not self.kind or letter.kind in self.kind)
            and (not self.function or letter.function in self.function)
            and (self.since is None or letter.last_failed_at >= self.since)
            and (self.until is None or letter.last_failed_at < self.until)
        )


@dataclass(frozen=True, slots=True)
class StatRow:
    """Counts for one (function, kind, status) group of dead letters."""

    function: str
    kind: str
    status: Status
    count: int
    retries: int = field(default=0)
    """Failed replays in the group: the sum of ``attempts - 1``."""
    resolved_by_retry: int = field(default=0)
    """Records of the group resolved by a successful replay."""


# Fields update() may change; everything else is fixed once a letter is added.
MUTABLE_FIELDS = frozenset(
    {
        "kind",
        "error_type",
        "message",
        "traceback",
        "attempts",
        "status",
        "last_failed_at",
        "next_retry_at",
        "resolution",
    }
)


@runtime_checkable
class DeadLetterStore(Protocol):
    """Where dead letters live. Each operation has an ``a``-prefixed async twin.

    - ``add(letter)`` stores a new letter as given (its ``version`` included, 0 for a new
      letter); adding an id that exists changes nothing and returns the stored letter (a
      spooled letter may be delivered twice).
    - ``get(id)`` returns a letter or None.
    - ``query(filter, limit=, offset=)`` lists matching letters, newest
      ``last_failed_at`` first, ties broken by ascending ``id`` (so pages are stable).
    - ``update(id, version, **changes)`` applies ``changes`` (only
      :data:`MUTABLE_FIELDS`) if the stored version is ``version`` and returns the new
      letter with ``version + 1``, else None (someone else changed it first). It also
      ends any processor claim on the letter.
    - ``claim_due(now, limit=, lease=, filter=)`` atomically takes up to ``limit`` open
      letters (PENDING or RETRYING) with ``next_retry_at <= now`` that no other processor
      holds and that match ``filter`` (None: all), earliest ``next_retry_at`` first (ties
      by ``id``), holds them for ``lease`` seconds (store clock where it has one) and
      returns them with their version bumped. A letter its holder does not update within
      the lease becomes claimable again.
    - ``stats(filter)`` counts matching letters by (function, kind, status), rows ordered
      by those three.
    - ``purge(filter)`` deletes matching letters and returns how many.
    """

    def add(self, letter: DeadLetter) -> DeadLetter: ...

    def get(self, id: str) -> DeadLetter | None: ...

    def query(
        self, filter: DeadLetterFilter = ..., *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]: ...

    def update(self, id: str, version: int, **changes: Any) -> DeadLetter | None: ...

    def claim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]: ...

    def stats(self, filter: DeadLetterFilter = ...) -> list[StatRow]: ...

    def purge(self, filter: DeadLetterFilter) -> int: ...

    async def aadd(self, letter: DeadLetter) -> DeadLetter: ...

    async def aget(self, id: str) -> DeadLetter | None: ...

    async def aquery(
        self, filter: DeadLetterFilter = ..., *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]: ...

    async def aupdate(self, id: str, version: int, **changes: Any) -> DeadLetter | None: ...

    async def aclaim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]: ...

    async def astats(self, filter: DeadLetterFilter = ...) -> list[StatRow]: ...

    async def apurge(self, filter: DeadLetterFilter) -> int: ...


def check_changes(changes: Iterable[str]) -> None:
    """Refuse updates to fields that are fixed once a letter is added."""
    fixed = set(changes) - MUTABLE_FIELDS
    if fixed:
        from idempotask.errors import ConfigurationError

        raise ConfigurationError(
            f"dead letter update: {', '.join(sorted(fixed))} cannot change after the letter "
            f"is added; changeable fields: {', '.join(sorted(MUTABLE_FIELDS))}"
        )


@runtime_checkable
class SupportsExpireClaim(Protocol):
    """Test-only power: end a processor's claim on a letter now, on the store's clock.

    The dead-letter conformance suite uses it to check that an unreleased claim becomes
    claimable again without waiting for the lease. Returns whether a live claim was there.
    """

    def expire_claim(self, id: str) -> bool: ...


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

"""Dead letters on Redis: :class:`RedisDeadLetterStore`, each operation one flow of
``dlq_*.lua`` script calls, driven sync or async by :mod:`idempotask.flow`."""

from __future__ import annotations

import uuid
from typing import Any

from idempotask.backends.base import (
    OPEN_STATUSES,
    DeadLetter,
    DeadLetterFilter,
    StatRow,
    Status,
    check_changes,
)
from idempotask.backends.redis._connect import AsyncClient, SyncClient, split_query_option
from idempotask.backends.redis._letters import (
    FMT,
    ScanPage,
    by_time_range,
    by_time_score,
    check_int,
    encode_change,
    encode_text,
    encode_time,
    filter_json,
    letter_fields,
    parse_add_reply,
    parse_dead_letter,
    parse_letter_reply,
    parse_scan,
    search_fields,
    stat_rows,
)
from idempotask.backends.redis._records import milliseconds, parse_flag, record_key
from idempotask.backends.redis._store import RedisBackend
from idempotask.backends.redis._stores import OnBackend
from idempotask.errors import ConfigurationError
from idempotask.flow import Flow, Op, adrive, drive

__all__ = ["SCAN_BUDGET", "RedisDeadLetterStore"]

#: Index entries one ``dlq_scan`` call examines at most. A script blocks the server while
#: it runs: 500 entries take 2-7 ms (purging large letters is the slow end), and a longer
#: walk is more calls, letting other clients in between.
SCAN_BUDGET = 500

_ALL_LETTERS = DeadLetterFilter()


def _raw(key: str, reply: Any) -> Any:
    return reply


class RedisDeadLetterStore(OnBackend):
    """Dead letters on Redis or Redis Cluster: a
    :class:`~idempotask.backends.base.DeadLetterStore`.

    Each operation is one ``EVALSHA`` of a ``dlq_*.lua`` script (a walk is several), run
    on a :class:`RedisBackend`'s clients (timeouts, retries, ``NOSCRIPT`` recovery and
    error wrapping: Redis failures raise :class:`~idempotask.errors.BackendError`, values
    that are not ours :class:`~idempotask.errors.CorruptRecordError`). Get one from the
    backend your idempotency store uses (``backend.dead_letter_store(namespace=...)``), or
    pass a backend, a URL or a redis-py client::

        >>> store = RedisDeadLetterStore("redis://localhost:6379/0", namespace="billing")
        >>> store
        RedisDeadLetterStore('redis://localhost:6379/0', namespace='billing')
        >>> from idempotask import DeadLetterQueue
        >>> queue = DeadLetterQueue(store)   # or DeadLetterQueue("redis://...?namespace=billing")

    Each namespace has its own queue (``prefix=`` is the older name of ``namespace=``).
    A queue is the keys under one hash tag, ``{namespace:dlq}``, so it lives in one cluster
    slot (every script touches one slot; several namespaces spread over a cluster). With
    base ``B = namespace:{namespace:dlq}``:

    - ``B:letter:<id>``: a hash per letter, every field (times as exact decimal strings,
      ``next_retry_at`` ``''`` for None, ``arguments`` as bytes, ``history`` as the JSON
      text of ``encode_history``, ``cf_error_type``/``cf_message`` case-folded copies for
      searches, ``fmt`` a format marker);
    - ``B:by_time``: sorted set of every id, score ``-last_failed_at`` (newest first, ties
      by id: query, stats and purge walk it);
    - ``B:due``: open letters with a next retry that no processor holds, score
      ``next_retry_at`` (claims walk it, earliest first, ties by id);
    - ``B:claims``: ids held by a processor, score the claim's expiry in milliseconds of
      the server's ``TIME`` (an expired claim is moved back to ``B:due`` by the next claim).

    Round trips: ``add``, ``get``, ``update``, ``expire_claim`` one each; ``claim_due``
    one, plus one per :data:`SCAN_BUDGET` due letters its filter passes over; ``query``
    one per page when filtering only by time (offsets are jumped), else one per
    :data:`SCAN_BUDGET` letters examined; ``stats`` and ``purge`` one per
    :data:`SCAN_BUDGET` letters in the time range. Every call is atomic; a walk over
    several calls is not one snapshot. A ``search`` is a plain, case-insensitive
    substring test in the script (``string.find`` with ``plain``: no pattern syntax).

    Dead letters have no TTL: a ``maxmemory-policy`` of ``allkeys-*`` can evict them, the
    ``volatile-*`` policies and ``noeviction`` cannot. A resent command (redis-py resends
    one whose reply timed out) is harmless for ``add`` and ``update`` (an update knows its
    own write by a token); a resent claim leaves the first claim's letters held until
    their lease runs out, and a resent purge may count fewer letters than it deleted.
    """

    _TAKES_CLIENTS = True

    def __init__(
        self,
        backend: RedisBackend | str | SyncClient | AsyncClient,
        *,
        namespace: str | None = None,
        prefix: str | None = None,
    ) -> None:
        self._attach(backend, namespace, prefix)
        # record_key tags what follows the first ':', so this store key becomes the Redis
        # key namespace:{namespace:dlq}, the base every script derives its keys from.
        self._key = f"{self._namespace}:{self._namespace}:dlq"
        self._base = record_key(self._key)
        self._limit = self._backend.max_record_bytes

    @classmethod
    def from_url(
        cls, url: str, *, namespace: str | None = None, prefix: str | None = None
    ) -> RedisDeadLetterStore:
        """A store on its own connections to ``url`` (``redis://``, ``rediss://``, ``unix://``).

        This is what ``DeadLetterQueue("redis://...")`` and
        ``configure(dead_letter_store="redis://...")`` call. The query option ``namespace``
        (or its older name ``prefix``) picks the queue (default ``idempotask``); other
        options go to redis-py.

        >>> RedisDeadLetterStore.from_url("redis://localhost:6379/0?namespace=billing")
        RedisDeadLetterStore('redis://localhost:6379/0', namespace='billing')
        """
        if not isinstance(url, str):
            raise ConfigurationError(
                f"RedisDeadLetterStore.from_url: expected a URL, got {type(url).__name__}"
            )
        rest, in_url = split_query_option(url, "namespace", "prefix")
        if namespace is None and prefix is None:
            namespace = in_url
        return cls(rest, namespace=namespace, prefix=prefix)

    @property
    def base_key(self) -> str:
        """The Redis key every key of the queue starts with (never itself written).

        >>> RedisDeadLetterStore("redis://localhost", namespace="billing").base_key
        'billing:{billing:dlq}'
        """
        return self._base

    def letter_key(self, id: str) -> str:
        """The Redis key of the letter ``id``.

        >>> RedisDeadLetterStore("redis://localhost").letter_key("42")
        'idempotask:{idempotask:dlq}:letter:42'
        """
        return f"{self._base}:letter:{id}"

    # -- flows: each operation written once, driven by idempotask.flow ----------------------

    def _call(self, what: str, script: str, args: tuple[Any, ...]) -> Op:
        c = self._connections
        return Op(c.run, c.arun, what, script, self._key, args, _raw)

    def _add_flow(self, letter: DeadLetter) -> Flow[DeadLetter]:
        if not isinstance(letter, DeadLetter):
            raise TypeError(f"add: expected a DeadLetter, got {type(letter).__name__}")
        letter = letter.evolve(status=Status(letter.status), arguments=bytes(letter.arguments))
        open_ = letter.status in OPEN_STATUSES and letter.next_retry_at is not None
        args = (
            FMT,
            encode_text(letter.id, "id"),
            by_time_score(letter.last_failed_at),
            encode_time(letter.next_retry_at, "next_retry_at") if open_ else b"",
            *letter_fields(letter),
        )
        reply = yield self._call(f"dead-letter add of {letter.id!r} to queue", "dlq_add", args)
        return parse_add_reply(self.letter_key(letter.id), reply, letter, limit=self._limit)

    def _get_flow(self, id: str) -> Flow[DeadLetter | None]:
        args = (FMT, encode_text(id, "id"))
        reply = yield self._call(f"dead-letter get of {id!r} from queue", "dlq_get", args)
        return parse_letter_reply(self.letter_key(id), reply, limit=self._limit)

    def _update_flow(
        self, id: str, version: int, changes: dict[str, Any]
    ) -> Flow[DeadLetter | None]:
        check_changes(changes)
        pairs: list[bytes] = []
        for name, value in changes.items():
            pairs += [name.encode(), encode_change(name, value)]
        pairs += search_fields(changes)
        by_time = by_time_score(changes["last_failed_at"]) if "last_failed_at" in changes else b""
        args = (
            FMT,
            encode_text(id, "id"),
            str(check_int(version, "version")).encode(),
            uuid.uuid4().hex.encode(),
            by_time,
            *pairs,
        )
        reply = yield self._call(f"dead-letter update of {id!r} in queue", "dlq_update", args)
        return parse_letter_reply(self.letter_key(id), reply, limit=self._limit)

    def _scan_flow(
        self,
        mode: str,
        filter: DeadLetterFilter | None,
        bounds: tuple[bytes, bytes],
        *,
        offset: int = 0,
        wanted: int = 0,
        lease_ms: int = 0,
    ) -> Flow[list[ScanPage]]:
        """Walk an index to its end (or to ``wanted`` letters): every page it took."""
        pages: list[ScanPage] = []
        cursor = (b"", b"")
        spec = filter_json(filter)
        while True:
            args: tuple[Any, ...] = (FMT, mode.encode(), spec, *bounds, *cursor)
            args += (SCAN_BUDGET, offset, wanted, lease_ms)
            reply = yield self._call(f"dead-letter {mode} in queue", "dlq_scan", args)
            page = parse_scan(self._base, reply)
            pages.append(page)
            offset -= page.skipped
            wanted -= len(page.items)
            if page.done or (mode in ("query", "claim") and wanted <= 0):
                return pages
            cursor = page.cursor

    def _letters(self, pages: list[ScanPage]) -> list[DeadLetter]:
        return [
            parse_dead_letter(self._base, fields, limit=self._limit)
            for page in pages
            for fields in page.items
        ]

    def _query_flow(
        self, filter: DeadLetterFilter, limit: int, offset: int
    ) -> Flow[list[DeadLetter]]:
        check_int(limit, "limit")
        check_int(offset, "offset", minimum=0)
        if limit <= 0:
            return []
        pages = yield from self._scan_flow(
            "query", filter, by_time_range(filter), offset=offset, wanted=limit
        )
        return self._letters(pages)[:limit]

    def _claim_flow(
        self, now: float, limit: int, lease: float, filter: DeadLetterFilter | None
    ) -> Flow[list[DeadLetter]]:
        check_int(limit, "limit")
        bounds = (b"", encode_time(now, "now"))
        lease_ms = milliseconds(lease, "lease")
        if limit <= 0:
            return []
        pages = yield from self._scan_flow("claim", filter, bounds, wanted=limit, lease_ms=lease_ms)
        return self._letters(pages)

    def _stats_flow(self, filter: DeadLetterFilter) -> Flow[list[StatRow]]:
        pages = yield from self._scan_flow("stats", filter, by_time_range(filter))
        groups: dict[tuple[str, str, Status], list[int]] = {}
        for page in pages:
            for function, kind, status, count, retries, by_retry in stat_rows(page.items):
                sums = groups.setdefault((function, kind, status), [0, 0, 0])
                sums[0] += count
                sums[1] += retries
                sums[2] += by_retry
        return [
            StatRow(function, kind, status, count, retries, by_retry)
            for (function, kind, status), (count, retries, by_retry) in sorted(groups.items())
        ]

    def _purge_flow(self, filter: DeadLetterFilter) -> Flow[int]:
        if not isinstance(filter, DeadLetterFilter):
            raise ConfigurationError(
                f"purge: expected a DeadLetterFilter, got {type(filter).__name__}"
            )
        pages = yield from self._scan_flow("purge", filter, by_time_range(filter))
        return sum(int(page.items[0]) for page in pages if page.items)

    def _expire_claim_flow(self, id: str) -> Flow[bool]:
        args = (FMT, encode_text(id, "id"))
        what = f"dead-letter expire_claim of {id!r} in queue"
        reply = yield self._call(what, "dlq_expire_claim", args)
        return parse_flag(self.letter_key(id), reply)

    # -- sync API --------------------------------------------------------------------------

    def add(self, letter: DeadLetter) -> DeadLetter:
        """Store ``letter`` unless its id exists; return the stored one. One round trip."""
        return drive(self._add_flow(letter))

    def get(self, id: str) -> DeadLetter | None:
        """The letter with this id, or None. One round trip."""
        return drive(self._get_flow(id))

    def query(
        self, filter: DeadLetterFilter = _ALL_LETTERS, *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """Matching letters, newest ``last_failed_at`` first, ties by id."""
        return drive(self._query_flow(filter, limit, offset))

    def update(self, id: str, version: int, **changes: Any) -> DeadLetter | None:
        """Compare-and-set ``changes`` on version ``version``; ends any claim. One round trip."""
        return drive(self._update_flow(id, version, changes))

    def claim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]:
        """Take up to ``limit`` due, unclaimed open letters for ``lease`` seconds (server clock)."""
        return drive(self._claim_flow(now, limit, lease, filter))

    def stats(self, filter: DeadLetterFilter = _ALL_LETTERS) -> list[StatRow]:
        """Counts by (function, kind, status); reads every letter in the time range."""
        return drive(self._stats_flow(filter))

    def purge(self, filter: DeadLetterFilter) -> int:
        """Delete matching letters; return how many went."""
        return drive(self._purge_flow(filter))

    def expire_claim(self, id: str) -> bool:
        """Test hook: end a processor's claim on ``id`` now; True if a live one was there."""
        return drive(self._expire_claim_flow(id))

    # -- async API -------------------------------------------------------------------------

    async def aadd(self, letter: DeadLetter) -> DeadLetter:
        """Async :meth:`add`."""
        return await adrive(self._add_flow(letter))

    async def aget(self, id: str) -> DeadLetter | None:
        """Async :meth:`get`."""
        return await adrive(self._get_flow(id))

    async def aquery(
        self, filter: DeadLetterFilter = _ALL_LETTERS, *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """Async :meth:`query`."""
        return await adrive(self._query_flow(filter, limit, offset))

    async def aupdate(self, id: str, version: int, **changes: Any) -> DeadLetter | None:
        """Async :meth:`update`."""
        return await adrive(self._update_flow(id, version, changes))

    async def aclaim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]:
        """Async :meth:`claim_due`."""
        return await adrive(self._claim_flow(now, limit, lease, filter))

    async def astats(self, filter: DeadLetterFilter = _ALL_LETTERS) -> list[StatRow]:
        """Async :meth:`stats`."""
        return await adrive(self._stats_flow(filter))

    async def apurge(self, filter: DeadLetterFilter) -> int:
        """Async :meth:`purge`."""
        return await adrive(self._purge_flow(filter))

    async def aexpire_claim(self, id: str) -> bool:
        """Async :meth:`expire_claim` (test hook)."""
        return await adrive(self._expire_claim_flow(id))

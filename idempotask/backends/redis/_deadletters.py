"""Dead letters on Redis: :class:`RedisDeadLetterStore`, each operation one flow of
``dlq_*.lua`` script calls, driven sync or async by :mod:`idempotask.flow`."""

from __future__ import annotations

import uuid
from typing import Any

from idempotask.backends._letters import ALL, check_filter, check_int, check_page, stored, sum_stats
from idempotask.backends._twins import twins
from idempotask.backends.base import (
    OPEN_STATUSES,
    DeadLetter,
    DeadLetterFilter,
    StatRow,
    check_changes,
)
from idempotask.backends.redis._connect import AsyncClient, SyncClient, split_query_option
from idempotask.backends.redis._letters import (
    FMT,
    WHO,
    by_time_range,
    by_time_score,
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
from idempotask.flow import Flow, Op

__all__ = ["SCAN_BUDGET", "RedisDeadLetterStore"]

#: Index entries one ``dlq_scan`` call examines at most. A script blocks the server while
#: it runs: 500 entries take 2-7 ms (purging large letters is the slow end), and a longer
#: walk is more calls, letting other clients in between.
SCAN_BUDGET = 500


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

    # -- each operation written once as a flow; twins() makes the sync and async methods --

    def _call(self, what: str, script: str, args: tuple[Any, ...]) -> Op:
        c = self._connections
        return Op(c.run, c.arun, what, script, self._key, args, _raw)

    def _add(self, letter: DeadLetter) -> Flow[DeadLetter]:
        """Store ``letter`` unless its id exists; return the stored one. One round trip."""
        letter = stored(letter, WHO)
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

    add, aadd = twins(_add)

    def _get(self, id: str) -> Flow[DeadLetter | None]:
        """The letter with this id, or None. One round trip."""
        args = (FMT, encode_text(id, "id"))
        reply = yield self._call(f"dead-letter get of {id!r} from queue", "dlq_get", args)
        return parse_letter_reply(self.letter_key(id), reply, limit=self._limit)

    get, aget = twins(_get)

    def _update(
        self, /, id: str, version: int, *, unless_claimed: bool = False, **changes: Any
    ) -> Flow[DeadLetter | None]:
        """Compare-and-set ``changes`` on version ``version``; ends any claim, or with
        ``unless_claimed`` changes nothing while one is live (server clock). One round trip."""
        check_changes(changes)
        pairs: list[bytes] = []
        for name, value in changes.items():
            pairs += [name.encode(), encode_change(name, value)]
        pairs += search_fields(changes)
        by_time = by_time_score(changes["last_failed_at"]) if "last_failed_at" in changes else b""
        args = (
            FMT,
            encode_text(id, "id"),
            str(check_int(version, "version", WHO)).encode(),
            uuid.uuid4().hex.encode(),
            by_time,
            b"1" if unless_claimed else b"",
            *pairs,
        )
        reply = yield self._call(f"dead-letter update of {id!r} in queue", "dlq_update", args)
        return parse_letter_reply(self.letter_key(id), reply, limit=self._limit)

    update, aupdate = twins(_update)

    def _scan(
        self,
        mode: str,
        filter: DeadLetterFilter | None,
        bounds: tuple[bytes, bytes],
        *,
        offset: int = 0,
        wanted: int = 0,
        lease_ms: int = 0,
    ) -> Flow[list[Any]]:
        """Walk an index to its end (or to ``wanted`` letters): what every page held."""
        items: list[Any] = []
        cursor = (b"", b"")
        spec = filter_json(filter)
        while True:
            args: tuple[Any, ...] = (FMT, mode.encode(), spec, *bounds, *cursor)
            args += (SCAN_BUDGET, offset, wanted, lease_ms)
            reply = yield self._call(f"dead-letter {mode} in queue", "dlq_scan", args)
            page = parse_scan(self._base, reply)
            items += page.items
            offset -= page.skipped
            wanted -= len(page.items)
            if page.done or (mode in ("query", "claim") and wanted <= 0):
                return items
            cursor = page.cursor

    def _letters(self, items: list[Any]) -> list[DeadLetter]:
        return [parse_dead_letter(self._base, fields, limit=self._limit) for fields in items]

    def _query(
        self, filter: DeadLetterFilter = ALL, *, limit: int = 100, offset: int = 0
    ) -> Flow[list[DeadLetter]]:
        """Matching letters, newest ``last_failed_at`` first, ties by id."""
        if not check_page(limit, offset, WHO):
            return []
        items = yield from self._scan(
            "query", filter, by_time_range(filter), offset=offset, wanted=limit
        )
        return self._letters(items)[:limit]

    query, aquery = twins(_query)

    def _claim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> Flow[list[DeadLetter]]:
        """Take up to ``limit`` due, unclaimed open letters for ``lease`` seconds (server clock)."""
        bounds = (b"", encode_time(now, "now"))
        lease_ms = milliseconds(lease, "lease")
        if not check_page(limit, 0, WHO):
            return []
        items = yield from self._scan("claim", filter, bounds, wanted=limit, lease_ms=lease_ms)
        return self._letters(items)

    claim_due, aclaim_due = twins(_claim_due)

    def _stats(self, filter: DeadLetterFilter = ALL) -> Flow[list[StatRow]]:
        """Counts by (function, kind, status); reads every letter in the time range."""
        items = yield from self._scan("stats", filter, by_time_range(filter))
        return sum_stats(stat_rows(items))

    stats, astats = twins(_stats)

    def _purge(self, filter: DeadLetterFilter) -> Flow[int]:
        """Delete matching letters; return how many went."""
        check_filter(filter, "purge")
        counts = yield from self._scan("purge", filter, by_time_range(filter))  # one a page
        return sum(int(count) for count in counts)

    purge, apurge = twins(_purge)

    def _expire_claim(self, id: str) -> Flow[bool]:
        """Test hook: end a processor's claim on ``id`` now; True if a live one was there."""
        args = (FMT, encode_text(id, "id"))
        what = f"dead-letter expire_claim of {id!r} in queue"
        reply = yield self._call(what, "dlq_expire_claim", args)
        return parse_flag(self.letter_key(id), reply)

    expire_claim, aexpire_claim = twins(_expire_claim)

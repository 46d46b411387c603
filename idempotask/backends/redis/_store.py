"""The idempotency store on Redis: :class:`RedisBackend`.

A claim is ``SET key value NX PX lease GET``: it takes the key, or leaves it and returns
the record holding it, in one command that needs no script. Every other state change is
one ``EVALSHA`` of a script shipped in ``lua/``: a duplicate is one round trip, a first
call two (claim, complete). Every command is safe to run twice with the same token,
because redis-py resends a command whose reply timed out: a resent claim finds its own
record and re-takes it through ``claim.lua``, as does a claim by the same owner (the
script also serves servers older than 7.0, where NX and GET do not mix).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from operator import methodcaller
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import ResponseError

from idempotask.backends._twins import twins
from idempotask.backends.base import Record, State
from idempotask.backends.redis._clients import RAW_SET, Connections, scan_targets
from idempotask.backends.redis._connect import (
    CLIENT_TYPES,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RETRIES,
    DEFAULT_SOCKET_TIMEOUT,
    AsyncClient,
    SyncClient,
    check_url,
    is_async,
)
from idempotask.backends.redis._records import (
    DEFAULT_MAX_RECORD_BYTES,
    FORMAT,
    STATE_BYTES,
    check_max_record_bytes,
    claim_value,
    field,
    library_key,
    milliseconds,
    parse_claim,
    parse_flag,
    parse_record,
    parse_value,
    record_key,
)
from idempotask.errors import (
    BackendError,
    ConfigurationError,
    CorruptRecordError,
    IdempotaskError,
)
from idempotask.flow import Flow, Op

if TYPE_CHECKING:
    from idempotask.backends.redis._breakers import RedisBreakerStore
    from idempotask.backends.redis._deadletters import RedisDeadLetterStore

__all__ = ["SCAN_CALLS", "SCAN_COUNT", "RedisBackend", "scan_pattern"]

logger = logging.getLogger("idempotask.backends.redis")
_T = TypeVar("_T")

#: Keys one ``SCAN`` call looks at (its ``COUNT``), and the most calls :meth:`RedisBackend.scan`
#: makes per server: at most 100,000 keys examined per server, whatever the database holds.
SCAN_COUNT = 1000
SCAN_CALLS = 100
_GLOB = str.maketrans({c: "\\" + c for c in "\\*?[]"})


def scan_pattern(prefix: str) -> str:
    """The ``SCAN MATCH`` pattern for the Redis keys of records whose library key starts
    with ``prefix`` (glob characters escaped; the caller still checks each key).

    >>> scan_pattern("ns:billing.charge:1:")
    'ns:{billing.charge:1:*}'
    >>> scan_pattern("ns")
    'ns*}'
    """
    if ":" not in prefix:
        return record_key(prefix)[1:-1].translate(_GLOB) + "*}" if prefix else "*}"
    return record_key(prefix)[:-1].translate(_GLOB) + "*}"


class RedisBackend:
    """The idempotency store on Redis, Redis Cluster or Sentinel (through your client).

    Build it from a URL (``redis://``, ``rediss://``, ``unix://``; clients are made on first
    use, one asyncio client per event loop and closed with it, with a 5 s socket timeout, a
    2 s connect timeout and 2 quick retries with backoff on connection errors and timeouts;
    the URL's query, e.g. ``?socket_timeout=1``, wins over those) or from clients you made:
    a sync ``client`` and/or an ``async_client`` (``redis.Redis``,
    ``redis.cluster.RedisCluster`` or their ``redis.asyncio`` counterparts; pass a Sentinel
    master this way). Your clients are used exactly as you configured them (timeouts,
    retries, TLS, ``decode_responses=True``), and you close them. Given only one flavour,
    the other is derived from its connection settings when they can be copied; otherwise
    the first call of the other flavour raises :class:`ConfigurationError`.

    >>> store = RedisBackend(url="redis://localhost:6379/0", socket_timeout=2.0)
    >>> store
    RedisBackend('redis://localhost:6379/0')
    >>> import redis
    >>> store = RedisBackend(redis.Redis(decode_responses=True))  # doctest: +SKIP

    ``check_eviction_policy`` (default on) reads ``maxmemory-policy`` on first use (one
    extra round trip, once) and emits one :class:`RuntimeWarning` when Redis could evict
    records. ``max_record_bytes`` (default 16 MiB) bounds what a read parses: a larger value
    under one of our keys is a :class:`~idempotask.errors.CorruptRecordError`, and a
    complete or fail that would write one is refused. Call :meth:`close` / :meth:`aclose`
    to release the clients this backend made.
    """

    def __init__(
        self,
        client: SyncClient | AsyncClient | None = None,
        *,
        url: str | None = None,
        async_client: AsyncClient | None = None,
        socket_timeout: float | None = DEFAULT_SOCKET_TIMEOUT,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        check_eviction_policy: bool = True,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        sync_client: SyncClient | None = None
        if client is not None and not isinstance(client, CLIENT_TYPES):
            raise ConfigurationError(
                "RedisBackend: client= must be a redis.Redis, redis.cluster.RedisCluster or "
                f"their redis.asyncio counterparts, got {type(client).__qualname__}"
            )
        if client is not None and is_async(client):
            if async_client is not None:
                raise ConfigurationError(
                    "RedisBackend: client= is an asyncio client and async_client= is given "
                    "too; pass the sync client as client="
                )
            async_client = client  # type: ignore[assignment]
        elif client is not None:
            sync_client = client  # type: ignore[assignment]
        if async_client is not None and not is_async(async_client):
            raise ConfigurationError(
                "RedisBackend: async_client= must be a redis.asyncio.Redis or "
                f"redis.asyncio.cluster.RedisCluster, got {type(async_client).__qualname__}"
            )
        if url is not None:
            if sync_client is not None or async_client is not None:
                raise ConfigurationError("RedisBackend: pass url= or clients, not both")
            check_url(url, "RedisBackend")
        elif sync_client is None and async_client is None:
            raise ConfigurationError(
                "RedisBackend: pass url='redis://host:6379/0', a client, or an async_client"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"RedisBackend: retries must be an int >= 0, got {retries!r}")
        for option, value in (
            ("socket_timeout", socket_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigurationError(
                    f"RedisBackend: {option} must be a positive number of seconds or None, "
                    f"got {value!r}"
                )
        self._max = check_max_record_bytes(max_record_bytes)
        self._connections = Connections(
            url=url,
            client=sync_client,
            async_client=async_client,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            check_eviction_policy=check_eviction_policy,
        )
        self._parse_record = functools.partial(parse_record, limit=self._max)
        self._parse_claim = functools.partial(parse_claim, limit=self._max)
        # False once the server refused SET NX GET (Redis < 7.0): claims then use a script.
        self._set_get = True

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBackend:
        """Build a backend for a ``redis://``, ``rediss://`` or ``unix://`` URL.

        This is what ``backend_from_url`` and ``configure(backend="redis://...")`` call.
        Nothing connects until the first operation.

        >>> RedisBackend.from_url("rediss://user:secret@cache.example:6380/2")
        RedisBackend('rediss://cache.example:6380/2')
        """
        return cls(url=url, **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._connections.server!r})"

    @property
    def connections(self) -> Connections:
        """The clients this backend (and the stores made from it) run on."""
        return self._connections

    @property
    def max_record_bytes(self) -> int:
        """The largest stored value a read parses (see the class docstring)."""
        return self._max

    def close(self) -> None:
        """Close the sync client if this backend created it (a client you passed stays open).

        >>> RedisBackend.from_url("redis://localhost:6379/0").close()
        """
        self._connections.close()

    async def aclose(self) -> None:
        """Close the asyncio client this backend created for the running event loop (it
        is also closed by itself when the loop is shut down, e.g. by ``asyncio.run()``).

        >>> import asyncio
        >>> asyncio.run(RedisBackend.from_url("redis://localhost:6379/0").aclose())
        """
        await self._connections.aclose()

    def dead_letter_store(self, *, namespace: str = "idempotask") -> RedisDeadLetterStore:
        """A dead-letter store on this backend's clients, its queue scoped by ``namespace``.

        >>> RedisBackend.from_url("redis://localhost").dead_letter_store(namespace="billing")
        RedisDeadLetterStore('redis://localhost', namespace='billing')
        """
        from idempotask.backends.redis._deadletters import RedisDeadLetterStore

        return RedisDeadLetterStore(self, namespace=namespace)

    def breaker_store(self, *, namespace: str = "idempotask") -> RedisBreakerStore:
        """A circuit-breaker store on this backend's clients, its keys under ``namespace``.

        >>> RedisBackend.from_url("redis://localhost").breaker_store(namespace="billing")
        RedisBreakerStore('redis://localhost', namespace='billing')
        """
        from idempotask.backends.redis._breakers import RedisBreakerStore

        return RedisBreakerStore(self, namespace=namespace)

    # ------------------------------------------------------------------- claims

    def _set_get_error(self, key: str, exc: Exception) -> None:
        """Raise the store error for a failed SET NX GET claim, unless it was an old
        server refusing NX with GET: then claims use the script from now on (return)."""
        if isinstance(exc, IdempotaskError):
            raise exc
        if isinstance(exc, ResponseError) and "syntax error" in str(exc).lower():
            self._set_get = False
            logger.info(
                "redis backend: %s refuses SET NX GET (Redis < 7.0); claims use a script",
                self._connections.server,
            )
            return
        raise self._connections.error("claim", key, exc) from exc

    def _claimed(
        self, key: str, reply: Any, token: str, owner: str, fingerprint: str, ms: int
    ) -> Record | None:
        """The record a SET NX GET reply shows, or None when claim.lua must re-take it."""
        if reply is None:
            return Record(key, State.IN_PROGRESS, token, owner, fingerprint, b"", ms / 1000)
        record = parse_value(key, reply, limit=self._max)
        if record.state is State.IN_PROGRESS and (
            record.token == token or (owner and record.owner == owner)
        ):
            return None
        return record

    @staticmethod
    def _claim_commands(
        key: str, token: str, lease: float, owner: str, fingerprint: str
    ) -> tuple[tuple[Any, ...], tuple[Any, ...], int]:
        """A claim as its SET NX GET command, claim.lua's arguments, and the lease in ms."""
        token_ = field(token, "token")
        owner_ = field(owner, "owner")
        fingerprint_ = field(fingerprint, "fingerprint")
        ms = milliseconds(lease, "lease")
        value = claim_value(token_, owner_, fingerprint_)
        command = ("SET", record_key(key), value, "NX", "PX", ms, "GET")
        return command, (FORMAT, token_, ms, owner_, fingerprint_), ms

    def _finish_args(
        self, key: str, token: str, payload: bytes, ttl: float, state: State
    ) -> tuple[bytes, bytes, bytes, int, bytes]:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise ConfigurationError(
                f"redis backend: payload must be bytes, got {type(payload).__qualname__}"
            )
        token_ = field(token, "token")
        if len(FORMAT) + 7 + len(token_) + len(payload) > self._max:
            raise BackendError(
                f"redis backend: the result for {key!r} is {len(payload):,} bytes, so its "
                f"record would be over max_record_bytes={self._max:,}, which no read accepts; "
                "it is not written. Raise max_record_bytes= on the RedisBackend, or store a "
                "smaller result"
            )
        ms = milliseconds(ttl, "ttl")
        return (FORMAT, token_, bytes(payload), ms, STATE_BYTES[state])

    @staticmethod
    def _delete_args(token: str | None) -> tuple[bytes, bytes, bytes]:
        if token is None:
            return (FORMAT, b"0", b"")
        return (FORMAT, b"1", field(token, "token"))

    # -------------------------------------------------------------- sync API

    def claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        """Take ``key`` with ``token`` for ``lease`` seconds, or return the record holding it.

        One round trip. ``record.held_by(token)`` tells whether the caller holds the key.

        >>> record = store.claim("ns:f:1:d", "t-1", lease=30)  # doctest: +SKIP
        """
        command, args, ms = self._claim_commands(key, token, lease, owner, fingerprint)
        if self._set_get:
            connections = self._connections
            try:
                channel = connections.sync()
                reply = channel.client.execute_command(*command, **RAW_SET)
            except Exception as exc:
                self._set_get_error(key, exc)
            else:
                record = self._claimed(key, reply, token, owner, fingerprint, ms)
                if record is not None:
                    return record
        return self._connections.run("claim", "claim", key, args, self._parse_claim)

    def _script(
        self,
        operation: str,
        script: str,
        key: str,
        args: tuple[Any, ...],
        parse: Callable[[str, Any], _T],
    ) -> Flow[_T]:
        c = self._connections
        answer: _T = yield Op(c.run, c.arun, operation, script, key, args, parse)
        return answer

    def _complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> Flow[bool]:
        """Store ``payload`` as the result if ``key`` is held with ``token``; keep it ``ttl`` s.

        >>> store.complete("ns:f:1:d", "t-1", b"42", ttl=3600)  # doctest: +SKIP
        True
        """
        args = self._finish_args(key, token, payload, ttl, State.COMPLETED)
        return (yield from self._script("complete", "finish", key, args, parse_flag))

    complete, acomplete = twins(_complete)

    def _fail(self, key: str, token: str, payload: bytes, *, ttl: float) -> Flow[bool]:
        """Store ``payload`` as a failure if ``key`` is held with ``token``; keep it ``ttl`` s.

        >>> store.fail("ns:f:1:d", "t-1", b"ValueError: no", ttl=60)  # doctest: +SKIP
        True
        """
        args = self._finish_args(key, token, payload, ttl, State.FAILED)
        return (yield from self._script("fail", "finish", key, args, parse_flag))

    fail, afail = twins(_fail)

    def _renew(self, key: str, token: str, *, lease: float) -> Flow[bool]:
        """Reset the lease of ``key`` to ``lease`` seconds if it is held with ``token``.

        >>> store.renew("ns:f:1:d", "t-1", lease=30)  # doctest: +SKIP
        True
        """
        args = (FORMAT, field(token, "token"), milliseconds(lease, "lease"))
        return (yield from self._script("renew", "renew", key, args, parse_flag))

    renew, arenew = twins(_renew)

    def _get(self, key: str) -> Flow[Record | None]:
        """The record of the library key ``key`` with the time left on its lease or ttl.

        >>> store.get("ns:f:1:d")  # doctest: +SKIP
        Record(key='ns:f:1:d', state=<State.COMPLETED: 'completed'>, ...)
        """
        return (yield from self._script("get", "get", key, (), self._parse_record))

    get, aget = twins(_get)

    def _delete(self, key: str, *, token: str | None = None) -> Flow[bool]:
        """Remove the record of ``key`` (with ``token``: only if that token wrote it).

        Without a token, whatever is under the key goes, foreign values included.

        >>> store.delete("ns:f:1:d")  # doctest: +SKIP
        True
        """
        args = self._delete_args(token)
        return (yield from self._script("delete", "delete", key, args, parse_flag))

    delete, adelete = twins(_delete)

    def _expire_now(self, key: str) -> Flow[bool]:
        """Test-only: end the record's lease or ttl now; returns whether one was there.

        An expired Redis key is an absent key, so this deletes it.
        """
        args = self._delete_args(None)
        return (yield from self._script("expire_now", "delete", key, args, parse_flag))

    expire_now, aexpire_now = twins(_expire_now)

    def _scan(self, prefix: str, *, limit: int = 100) -> Flow[list[Record]]:
        """Up to ``limit`` live records whose library key starts with ``prefix``.

        ``SCAN MATCH`` over the Redis keys (every primary of a cluster), at most
        :data:`SCAN_CALLS` calls of :data:`SCAN_COUNT` keys per server, then one pipeline of
        ``GET``/``PTTL`` per page of matches: bounded work, so on a large database it may
        return fewer records than exist. Values that are not records are left out. Each
        :attr:`Record.key` is the library key (``namespace:name:v1:digest``).

        >>> store.scan("ns:billing.charge:1:", limit=10)  # doctest: +SKIP
        [Record(key='ns:billing.charge:1:ab12', ...)]
        """
        if not isinstance(prefix, str):
            raise ConfigurationError(
                f"redis backend: scan prefix must be a str, got {type(prefix).__qualname__}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigurationError(
                f"redis backend: scan limit must be an int >= 0, got {limit!r}"
            )
        found: list[Record] = []
        c = self._connections

        def visit(keys: list[Any]) -> Flow[bool]:
            named = [(k, lk) for k in keys if (lk := library_key(k)) and lk.startswith(prefix)]
            if named:
                replies = yield Op(c.values, c.avalues, [k for k, _ in named])
                for (_, lk), value, pttl in zip(named, replies[::2], replies[1::2], strict=True):
                    if not isinstance(value, (bytes, str)) or not isinstance(pttl, int):
                        continue  # gone since the SCAN, or another type (a breaker's hash)
                    try:
                        found.append(parse_value(lk, value, pttl, limit=self._max))
                    except CorruptRecordError:
                        continue  # not an idempotask record: a listing leaves it out
                    if len(found) >= limit:
                        return True
            return False

        if limit > 0:
            yield from scan_keys(c, scan_pattern(prefix), visit)
        return found

    scan, ascan = twins(_scan)

    # ------------------------------------------------------------- async API

    async def aclaim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        """Async :meth:`claim`."""
        command, args, ms = self._claim_commands(key, token, lease, owner, fingerprint)
        if self._set_get:
            connections = self._connections
            try:
                channel = connections.ready_channel() or await connections.achannel()
                reply = await channel.client.execute_command(*command, **RAW_SET)
            except Exception as exc:
                self._set_get_error(key, exc)
            else:
                record = self._claimed(key, reply, token, owner, fingerprint, ms)
                if record is not None:
                    return record
        return await self._connections.arun("claim", "claim", key, args, self._parse_claim)


def scan_keys(c: Connections, match: str, visit: Callable[[list[Any]], Flow[bool]]) -> Flow[None]:
    """``SCAN MATCH match`` on every primary, at most :data:`SCAN_CALLS` calls each;
    ``visit`` each page of keys until it returns True."""
    targets = yield Op(c.call, c.acall, "scan", "*", scan_targets)
    for target in targets:
        cursor = 0
        nodes = {} if target is None else {"target_nodes": target}
        for _ in range(SCAN_CALLS):
            page = methodcaller("scan", cursor=cursor, match=match, count=SCAN_COUNT, **nodes)
            reply = yield Op(c.call, c.acall, "scan", match, page)
            # A cluster's reply has a cursor per node.
            cursor, keys = reply
            cursor = int(cursor if target is None else cursor[target.name])
            if (yield from visit(keys)):
                return
            if cursor == 0:
                break

"""The Redis store: one string per record, one atomic command per state change.

A record for the key ``namespace:name:version:digest`` lives in the Redis string
``namespace:{name:version:digest}``: the hash tag keeps everything one record needs in one
cluster slot while records spread over the cluster. The value is a format marker (so a
value that is not ours is detected), a state byte, the lengths of token, owner and
fingerprint, those three, then the payload (``lua/claim.lua`` documents the layout); the
key's own expiry is the lease (IN_PROGRESS) or the ttl (COMPLETED, FAILED), counted by
the server's clock. An expired lease is simply an absent key, so a claim takes it over.

A claim is ``SET key value NX PX lease GET``: it takes the key, or leaves it and returns
the record holding it, in one command that needs no script. Every other state change is
one ``EVALSHA`` of a script shipped in ``idempotask/backends/lua/``: a duplicate check is
one round trip, a first call two (claim, complete). ``NOSCRIPT`` (a restarted or flushed
server, a cluster node that never saw the script) is answered by sending the script
itself with ``EVAL``, on whichever node the key lives, which also caches it there. Every
command is safe to run twice with the same token, because redis-py resends a command
whose reply timed out: a resent claim finds its own record and re-takes it (through
``claim.lua``, which also serves servers older than 7.0, where NX and GET do not mix).

One backend object serves sync and async callers::

    >>> from idempotask.backends.redis import RedisBackend
    >>> store = RedisBackend.from_url("redis://localhost:6379/0")   # connects on first use
    >>> record = store.claim("ns:billing.charge:1:ab12", "token-1", lease=30)  # doctest: +SKIP
    >>> record.held_by("token-1")  # doctest: +SKIP
    True

Guarantees hold only while Redis keeps its data: eviction (any ``maxmemory-policy`` but
``noeviction``: every record has a TTL, so ``volatile-*`` policies evict them too) or a
failover without persistence can lose a record. The backend warns once when the
server's policy could evict our keys.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import hashlib
import importlib.resources
import inspect
import json
import logging
import math
import os
import struct
import threading
import types
import uuid
import warnings
import weakref
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote_plus, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
import redis.retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from idempotask.backends.base import BreakerState, BreakerStatus, Record, State
from idempotask.backends.deadletters import (
    OPEN_STATUSES,
    DeadLetter,
    DeadLetterFilter,
    StatRow,
    Status,
    check_changes,
)
from idempotask.errors import (
    BackendError,
    ConfigurationError,
    CorruptRecordError,
    IdempotaskError,
)

__all__ = [
    "BREAKER_FORMAT",
    "DEAD_LETTER_FORMAT",
    "RECORD_FORMAT",
    "RedisBackend",
    "RedisBreakerStore",
    "RedisDeadLetterStore",
    "record_key",
]

logger = logging.getLogger(__name__)

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
_T = TypeVar("_T")

#: The marker every record this backend writes starts with. A value under one of our keys
#: without it is foreign (or from an incompatible format: ``idempotask/1`` was a hash).
RECORD_FORMAT = "idempotask/2"
_FORMAT = RECORD_FORMAT.encode()
# A record is one string: marker, state byte, the lengths of token, owner and fingerprint,
# those fields, then the payload (see lua/claim.lua, which documents the same layout).
_LENGTHS = struct.Struct(">HHH")
_HEADER = len(_FORMAT) + 1 + _LENGTHS.size
_STATE_BYTES = {State.IN_PROGRESS: b"i", State.COMPLETED: b"c", State.FAILED: b"f"}
_STATES = {ord(v): k for k, v in _STATE_BYTES.items()}
#: The longest token, owner id or fingerprint a record can hold, in UTF-8 bytes.
MAX_FIELD_BYTES = 0xFFFF

# redis-py passes this option down to the reply parser: the reply stays bytes even on a
# client made with decode_responses=True, so payloads can be arbitrary bytes.
_NEVER_DECODE = "NEVER_DECODE"
_RAW = {_NEVER_DECODE: True}
_RAW_SET = {_NEVER_DECODE: True, "get": True}  # get: SET's reply is the old value, as is

# Defaults for the clients this backend creates itself: a dead or hung server must fail a
# call within seconds, and a stale pooled connection deserves a quick retry, not ten.
DEFAULT_SOCKET_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_RETRIES = 2
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 0.5

# Connection settings that mean the same to redis-py's sync and asyncio connections; a
# twin client is derived from these only (everything else is driver plumbing).
_PORTABLE_SETTINGS = (
    "host",
    "port",
    "db",
    "path",
    "username",
    "password",
    "credential_provider",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "socket_keepalive_options",
    "client_name",
    "health_check_interval",
    "protocol",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_check_hostname",
    "ssl_min_version",
    "ssl_ciphers",
)
_SYNC_TO_ASYNC: dict[type[Any], type[Any]] = {
    redis.connection.Connection: redis.asyncio.connection.Connection,
    redis.connection.SSLConnection: redis.asyncio.connection.SSLConnection,
    redis.connection.UnixDomainSocketConnection: (
        redis.asyncio.connection.UnixDomainSocketConnection
    ),
}
# Exact classes only: a subclass (Sentinel's, a user's) has behaviour we cannot copy.
_CONNECTION_TWINS = {**_SYNC_TO_ASYNC, **{v: k for k, v in _SYNC_TO_ASYNC.items()}}


# --------------------------------------------------------------------------- scripts


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: bytes
    sha: str


def _load_script(name: str) -> _Script:
    source = (importlib.resources.files("idempotask.backends") / "lua" / f"{name}.lua").read_bytes()
    return _Script(name, source, hashlib.sha1(source).hexdigest())


_CLAIM = _load_script("claim")
_FINISH = _load_script("finish")  # complete and fail: the state to store is its last argument
_RENEW = _load_script("renew")
_DELETE = _load_script("delete")
_GET = _load_script("get")


# ------------------------------------------------------------- pure key/reply helpers


def record_key(key: str) -> str:
    """The Redis key of a record: the hash tag goes around everything after the first ``:``.

    A key without ``:`` is tagged whole. ``{``, ``}`` and ``%`` are percent-escaped, so the
    only braces in a Redis key are the hash tag's own (a record always lands in the slot of
    its per-record part) and two different keys never share a Redis key. Keys built by
    :mod:`idempotask.keys` never need escaping: names with braces are refused there.

    >>> record_key("ns:billing.charge:1:ab12")
    'ns:{billing.charge:1:ab12}'
    >>> record_key("ns:{odd}:100%")
    'ns:{%7Bodd%7D:100%25}'
    """
    if not isinstance(key, str) or not key:
        raise ConfigurationError(f"redis backend: a key must be a non-empty str, got {key!r}")
    if "{" in key or "}" in key or "%" in key:
        key = key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    namespace, sep, rest = key.partition(":")
    if not sep:
        return "{" + key + "}"
    return namespace + ":{" + rest + "}"


def _milliseconds(seconds: float, option: str) -> int:
    """Seconds -> whole milliseconds for PEXPIRE, rounded up, at least 1."""
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


def _text(value: Any, key: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise CorruptRecordError(
                f"redis backend: record {key!r} has a field that is not UTF-8: {value[:40]!r}"
            ) from None
    return str(value)


def _corrupt(key: str, reply: Any) -> CorruptRecordError:
    what = _text(reply[1], key) if isinstance(reply, list) and len(reply) > 1 else repr(reply)
    return CorruptRecordError(
        f"redis backend: the value under key {key!r} (Redis key {record_key(key)!r}) is not an "
        f"idempotask record: found {what}. Another program uses this key, or the data is "
        "corrupt; use another namespace, or delete the key (delete() without a token does)"
    )


def _tag(reply: Any) -> bytes:
    if isinstance(reply, list) and reply:
        first = reply[0]
        return first if isinstance(first, bytes) else str(first).encode()
    return b""


def _field(value: str, what: str) -> bytes:
    """A token, owner id or fingerprint as the UTF-8 bytes a record holds."""
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
    return b"".join((_FORMAT, b"i", lengths, token, owner, fingerprint))


def parse_value(key: str, value: Any, pttl: int | None = None) -> Record:
    """Turn a record's stored value into a :class:`Record`; ``pttl`` is its PTTL in ms.

    >>> parse_value("k", claim_value(b"t-1", b"", b"") + b"", 30000).held_by("t-1")
    True
    """
    if isinstance(value, str):  # only if a client ignored NEVER_DECODE
        value = value.encode()
    if not isinstance(value, bytes) or len(value) < _HEADER or not value.startswith(_FORMAT):
        raise _corrupt(key, [b"", f"a string without the format marker {RECORD_FORMAT}"])
    state = _STATES.get(value[len(_FORMAT)])
    if state is None:
        found = value[len(_FORMAT) : len(_FORMAT) + 1]
        raise CorruptRecordError(f"redis backend: record {key!r} has an unknown state {found!r}")
    token_len, owner_len, fingerprint_len = _LENGTHS.unpack_from(value, len(_FORMAT) + 1)
    owner_at = _HEADER + token_len
    fingerprint_at = owner_at + owner_len
    payload_at = fingerprint_at + fingerprint_len
    if payload_at > len(value):
        raise CorruptRecordError(
            f"redis backend: record {key!r} is truncated ({len(value)} bytes, its header "
            f"announces at least {payload_at})"
        )
    return Record(
        key=key,
        state=state,
        token=_text(value[_HEADER:owner_at], key),
        owner=_text(value[owner_at:fingerprint_at], key),
        fingerprint=_text(value[fingerprint_at:payload_at], key),
        payload=value[payload_at:],
        expires_in=pttl / 1000 if pttl is not None and pttl >= 0 else None,
    )


def parse_record(key: str, reply: Any) -> Record | None:
    """Turn a ``claim`` or ``get`` script reply into a :class:`Record` (``None``: absent).

    >>> parse_record("k", [claim_value(b"t", b"", b""), 1500]).expires_in
    1.5
    >>> parse_record("k", None) is None
    True
    """
    if reply is None:
        return None
    if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], int):
        return parse_value(key, reply[0], reply[1])
    raise _corrupt(key, reply)


def parse_claim(key: str, reply: Any) -> Record:
    """Like :func:`parse_record`, for ``claim``, whose reply always carries a record.

    >>> parse_claim("k", [claim_value(b"t", b"", b""), 30000]).held_by("t")
    True
    """
    record = parse_record(key, reply)
    if record is None:
        raise _corrupt(key, reply)
    return record


def parse_flag(key: str, reply: Any) -> bool:
    """Turn a ``complete``/``fail``/``renew``/``delete`` script reply into a bool.

    >>> parse_flag("k", 1), parse_flag("k", 0)
    (True, False)
    """
    if isinstance(reply, int):
        return reply == 1
    raise _corrupt(key, reply)


# ------------------------------------------------------------------ eviction policy


def _policies(reply: Any) -> list[str]:
    """Every ``maxmemory-policy`` value in a CONFIG GET reply (one node's or a cluster's)."""
    found: list[str] = []
    if isinstance(reply, Mapping):
        for name, value in reply.items():
            name_ = name.decode() if isinstance(name, bytes) else name
            if name_ == "maxmemory-policy" and isinstance(value, (bytes, str)):
                found.append(value.decode() if isinstance(value, bytes) else value)
            else:
                found.extend(_policies(value))
    elif isinstance(reply, (list, tuple)):
        items = list(reply)
        for i in range(0, len(items) - 1, 2):
            found.extend(_policies({items[i]: items[i + 1]}))
    return found


def eviction_warning(server: str, policies: list[str]) -> str | None:
    """The warning text when a ``maxmemory-policy`` could evict our keys, else ``None``.

    ``allkeys-*`` evicts any key; ``volatile-*`` evicts keys with a TTL, and every record
    has one. Only ``noeviction`` keeps records until their lease or ttl runs out.

    >>> eviction_warning("localhost:6379/0", ["noeviction"]) is None
    True
    >>> "allkeys-lru" in eviction_warning("localhost:6379/0", ["allkeys-lru"])
    True
    """
    risky = sorted({policy for policy in policies if policy != "noeviction"})
    if not risky:
        return None
    return (
        f"Redis at {server} has maxmemory-policy={','.join(risky)}: under memory pressure it "
        "can evict idempotency records before their ttl (every record has a TTL, so "
        "volatile-* policies evict them too), and a duplicate call could then run again. "
        "Use maxmemory-policy noeviction for the idempotask database."
    )


# --------------------------------------------------------------------- client twins


def _own_retry(retries: int, *, asyncio_: bool) -> Any:
    backoff = EqualJitterBackoff(cap=_BACKOFF_CAP, base=_BACKOFF_BASE)
    if asyncio_:
        return redis.asyncio.retry.Retry(backoff, retries)
    return redis.retry.Retry(backoff, retries)


# isinstance() in helpers, so the driver objects stay Any (their settings are untyped).
def _is_cluster(client: object) -> bool:
    return isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


def _is_sync(client: object) -> bool:
    return isinstance(client, (redis.Redis, redis.cluster.RedisCluster))


def _portable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {name: settings[name] for name in _PORTABLE_SETTINGS if name in settings}


def _twin_client(client: Any, *, retries: int) -> Any:
    """A client of the other flavour (sync <-> asyncio) for the same server(s).

    Raises ``LookupError`` when the client's connections cannot be reproduced (Sentinel,
    a custom connection class).
    """
    to_async = _is_sync(client)
    retry = _own_retry(retries, asyncio_=to_async)
    retry_errors: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError]
    if _is_cluster(client):
        nodes = list(client.nodes_manager.startup_nodes.values())
        if not nodes:
            raise LookupError("the cluster client knows no nodes")
        settings: Mapping[str, Any]
        if to_async:
            connection = getattr(nodes[0], "redis_connection", None)
            if connection is None:
                raise LookupError("the cluster client's nodes have no connection settings")
            settings = connection.connection_pool.connection_kwargs
            ssl = connection.connection_pool.connection_class.__name__ == "SSLConnection"
        else:
            settings = client.connection_kwargs
            ssl = getattr(settings.get("connection_class"), "__name__", "") == "SSLConnection"
        options = _portable(settings)
        for name in ("host", "port", "db", "path"):
            options.pop(name, None)
        if to_async:
            startup = [redis.asyncio.cluster.ClusterNode(n.host, n.port) for n in nodes]
            return redis.asyncio.cluster.RedisCluster(
                startup_nodes=startup, ssl=ssl, retry=retry, retry_on_error=retry_errors, **options
            )
        sync_node: Any = redis.cluster.ClusterNode  # untyped in redis-py
        sync_startup = [sync_node(n.host, n.port) for n in nodes]
        if ssl:
            options["ssl"] = True
        return redis.cluster.RedisCluster(
            startup_nodes=sync_startup, retry=retry, retry_on_error=retry_errors, **options
        )
    pool = client.connection_pool
    twin_class = _CONNECTION_TWINS.get(pool.connection_class)
    if twin_class is None:
        raise LookupError(f"its connection class {pool.connection_class.__qualname__} has no twin")
    options = _portable(pool.connection_kwargs)
    if to_async:
        async_pool = redis.asyncio.ConnectionPool(
            connection_class=twin_class, retry=retry, retry_on_error=retry_errors, **options
        )
        return redis.asyncio.Redis.from_pool(async_pool)
    sync_pool = redis.ConnectionPool(
        connection_class=twin_class, retry=retry, retry_on_error=retry_errors, **options
    )
    return redis.Redis.from_pool(sync_pool)


def _describe_client(client: Any) -> str:
    """host:port[/db] or the socket path of a client, for messages; never a password."""
    try:
        if _is_cluster(client):
            nodes = ",".join(sorted(client.nodes_manager.startup_nodes))
            return f"cluster {nodes}"
        settings = client.connection_pool.connection_kwargs
        if "path" in settings:
            return f"unix:{settings['path']}"
        return f"{settings.get('host')}:{settings.get('port')}/{settings.get('db', 0)}"
    except Exception:  # a message must never fail: fall back to the client's type
        return type(client).__qualname__


def _describe_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]  # drop user:password
    return f"{parts.scheme}://{netloc}{parts.path}"


# ---------------------------------------------------------------------------- backend

_UNCHECKED, _CHECKING, _CHECKED = 0, 1, 2


def _redis_metrics_on() -> bool:
    """Whether redis-py's own OpenTelemetry metrics (redis-py 8) are switched on."""
    try:
        from redis.observability.providers import get_observability_instance
    except ImportError:
        return False
    try:
        manager = get_observability_instance().get_provider_manager()
        return manager is not None and bool(manager.config.enabled_telemetry)
    except Exception:
        return True  # cannot tell: keep the client's own path


def _direct(client: Any) -> bool:
    """Whether this backend may send commands straight over ``client``'s pooled connections.

    redis-py's ``execute_command`` takes a pooled connection, sends, reads and gives it
    back inside its retry policy; around that it keeps per-command bookkeeping (metrics,
    event hooks, reply callbacks) that costs about a quarter of a round trip's CPU. For a
    plain ``redis.Redis`` or ``redis.asyncio.Redis`` the backend does those same steps
    itself, with the connection's own retry policy, and skips the rest. Everything else
    keeps ``execute_command``: Cluster clients (routing, redirections), single-connection
    clients, subclasses and instrumented clients that replace ``execute_command``
    (OpenTelemetry, ddtrace and Sentry wrap it, so they keep seeing every command), and
    processes where redis-py's own metrics are on.
    """
    if type(client) is redis.Redis:
        module = "redis.client"
    elif type(client) is redis.asyncio.Redis:
        module = "redis.asyncio.client"
    else:
        return False
    if getattr(client, "connection", None) is not None:  # single_connection_client=True
        return False
    execute = inspect.getattr_static(type(client), "execute_command", None)
    if type(execute) is not types.FunctionType or execute.__module__ != module:
        return False
    return not _redis_metrics_on()


def _send_read(conn: Any, args: tuple[Any, ...]) -> Any:
    conn.send_command(*args)
    return conn.read_response(disable_decoding=True)


class _Stash:
    """Idle connections of a pool only this backend uses, kept out of it between commands.

    Taking a connection from redis-py's pool and giving it back costs about as much CPU as
    the command itself (a lock, pid checks, observability counters, and a non-blocking
    read with its system calls to spot a stale connection). A backend that made its
    client itself keeps up to :data:`_STASH_LIMIT` connections it has used cleanly and
    takes one with a ``deque.pop()``; the pool still made them and still owns them, so
    ``close()`` and redis-py's own health checks (``health_check_interval``, a broken
    connection reconnecting on its next command, under the retry policy) apply. A command
    that fails gives its connection back to the pool, which checks it before its next use.
    Clients you pass (``limit`` 0) take and return a pooled connection per command.
    Thread-safe without a lock: ``pop`` and ``append`` are atomic and a connection is in
    the stash or with one command, never both. A forked child empties every stash: the
    parent's connections are not its to use.
    """

    __slots__ = ("__weakref__", "idle", "limit", "pool")

    def __init__(self, pool: Any, limit: int) -> None:
        self.pool = pool
        self.limit = limit
        self.idle: collections.deque[Any] = collections.deque()
        if limit:
            _stashes.add(self)

    def keeps(self, conn: Any) -> bool:
        """Whether ``conn``, which just served a command cleanly, waits here for the next."""
        if len(self.idle) >= self.limit:
            return False
        # A server announcing maintenance (redis-py 6+) asks for a fresh connection.
        reconnect = getattr(conn, "should_reconnect", None)
        return reconnect is None or not reconnect()


_STASH_LIMIT = 16
_stashes: weakref.WeakSet[_Stash] = weakref.WeakSet()


def _empty_stashes_in_child() -> None:
    for stash in list(_stashes):
        stash.idle.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_empty_stashes_in_child)


def _stash_for(client: Any, owned: bool) -> _Stash:
    """The stash for a direct client: kept connections only in a plain pool of our own."""
    pool = client.connection_pool
    plain = type(pool) in (redis.ConnectionPool, redis.asyncio.ConnectionPool)
    return _Stash(pool, _STASH_LIMIT if owned and plain else 0)


def _execute_direct(stash: _Stash, args: tuple[Any, ...]) -> Any:
    """One command on a kept or pooled connection, as redis-py's execute_command sends it."""
    idle = stash.idle
    conn = idle.pop() if idle else stash.pool.get_connection()
    try:
        reply = conn.retry.call_with_retry(
            lambda: _send_read(conn, args), lambda _error: conn.disconnect()
        )
    except BaseException:
        stash.pool.release(conn)
        raise
    if stash.keeps(conn):
        idle.append(conn)
    else:
        stash.pool.release(conn)  # the pool disconnects one that should reconnect
    return reply


async def _asend_read(conn: Any, args: tuple[Any, ...]) -> Any:
    await conn.send_command(*args)
    return await conn.read_response(disable_decoding=True)


async def _aexecute_direct(stash: _Stash, args: tuple[Any, ...]) -> Any:
    """Async :func:`_execute_direct`: a cancelled read disconnects inside redis-py."""
    idle = stash.idle
    conn = idle.pop() if idle else await stash.pool.get_connection()
    try:
        reply = await conn.retry.call_with_retry(
            lambda: _asend_read(conn, args), lambda _error: conn.disconnect()
        )
    except BaseException:
        await stash.pool.release(conn)
        raise
    if stash.keeps(conn):
        idle.append(conn)
    else:
        await stash.pool.release(conn)
    return reply


@dataclass(slots=True)
class _AsyncSlot:
    """An asyncio client and whether it is ready for concurrent first commands."""

    client: Any
    ready: bool = False
    owned: bool = True  # made by the backend (from its URL or as a twin), not passed in
    stash: _Stash | None = None  # set when commands go straight to connections (_direct)


class RedisBackend:
    """The idempotency store on Redis, Redis Cluster or Sentinel (through your client).

    Build it from a URL (``redis://``, ``rediss://``, ``unix://``; clients are created on
    first use, one asyncio client per event loop, with a 5 s socket timeout, a 2 s connect
    timeout and 2 quick retries on connection errors and timeouts; the URL's query, e.g.
    ``?socket_timeout=1``, overrides the timeouts) or from clients you made: a sync
    ``client`` and/or an
    ``async_client`` (``redis.Redis``, ``redis.cluster.RedisCluster`` or their
    ``redis.asyncio`` counterparts; pass a Sentinel master this way). Given only one
    flavour, the other is derived from its connection settings when they can be copied;
    otherwise the first call of the other flavour raises :class:`ConfigurationError`.
    Clients made with ``decode_responses=True`` work: replies are read undecoded.

    >>> store = RedisBackend(url="redis://localhost:6379/0", socket_timeout=2.0)
    >>> store
    RedisBackend('redis://localhost:6379/0')
    >>> import redis
    >>> store = RedisBackend(redis.Redis(decode_responses=True))  # doctest: +SKIP

    ``check_eviction_policy`` (default on) reads ``maxmemory-policy`` on first use (one
    extra round trip, once) and emits one :class:`RuntimeWarning` when Redis could evict
    records. Call :meth:`close` / :meth:`aclose` to release the clients this backend made.
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
    ) -> None:
        sync_client: SyncClient | None = None
        if isinstance(client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)):
            if async_client is not None:
                raise ConfigurationError(
                    "RedisBackend: client= is an asyncio client and async_client= is given "
                    "too; pass the sync client as client="
                )
            async_client = client
        elif isinstance(client, (redis.Redis, redis.cluster.RedisCluster)):
            sync_client = client
        elif client is not None:
            raise ConfigurationError(
                "RedisBackend: client= must be a redis.Redis, redis.cluster.RedisCluster or "
                f"their redis.asyncio counterparts, got {type(client).__qualname__}"
            )
        if async_client is not None and not isinstance(
            async_client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)
        ):
            raise ConfigurationError(
                "RedisBackend: async_client= must be a redis.asyncio.Redis or "
                f"redis.asyncio.cluster.RedisCluster, got {type(async_client).__qualname__}"
            )
        if url is not None:
            if sync_client is not None or async_client is not None:
                raise ConfigurationError("RedisBackend: pass url= or clients, not both")
            if not isinstance(url, str) or url.split("://", 1)[0].lower() not in (
                "redis",
                "rediss",
                "unix",
            ):
                raise ConfigurationError(
                    f"RedisBackend: url= must be a redis://, rediss:// or unix:// URL, got {url!r}"
                )
            try:  # parse only: nothing connects before the first operation
                parse_url: Any = redis.connection.parse_url  # untyped in redis-py
                parse_url(url)
            except ValueError as exc:
                raise ConfigurationError(f"RedisBackend: invalid URL {url!r}: {exc}") from exc
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

        self._url = url
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._retries = retries
        self._sync_client: SyncClient | None = sync_client
        self._given_async: AsyncClient | None = async_client
        self._given_slot = None if async_client is None else _AsyncSlot(async_client, owned=False)
        self._owns_sync = sync_client is None
        self._lock = threading.Lock()
        # asyncio clients are bound to the event loop they first ran on, so the clients
        # this backend creates are kept per loop; a user's async client is used as given.
        self._async_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncSlot]
        self._async_by_loop = weakref.WeakKeyDictionary()
        # The hot path's shortcut to the running loop's client, without taking the lock.
        self._last_async: tuple[weakref.ref[asyncio.AbstractEventLoop], _AsyncSlot] | None
        self._last_async = None
        self._policy_state = _UNCHECKED if check_eviction_policy else _CHECKED
        # False once the server refused SET NX GET (Redis < 7.0): claims then use a script.
        self._set_get = True
        # Whether the sync client's commands go straight to its connections (see _direct),
        # and the connections they use.
        self._sync_direct: bool | None = None
        self._sync_stash: _Stash | None = None

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
        return f"{type(self).__name__}({self._server!r})"

    @property
    def _server(self) -> str:
        if self._url is not None:
            return _describe_url(self._url)
        return _describe_client(
            self._sync_client if self._sync_client is not None else self._given_async
        )

    # ------------------------------------------------------------------ clients

    def _client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "socket_timeout": self._socket_timeout,
            "socket_connect_timeout": self._connect_timeout,
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        }
        return options

    def _make_sync(self) -> SyncClient:
        with self._lock:
            if self._sync_client is None:
                if self._url is not None:
                    self._sync_client = redis.Redis.from_url(
                        self._url,
                        retry=_own_retry(self._retries, asyncio_=False),
                        **self._client_options(),
                    )
                else:
                    self._sync_client = self._derive(self._given_async, "client")
            return self._sync_client

    def _loop_slot(self) -> _AsyncSlot:
        loop = asyncio.get_running_loop()
        last = self._last_async
        if last is not None and last[0]() is loop:
            return last[1]
        with self._lock:
            slot = self._async_by_loop.get(loop)
            if slot is None:
                if self._url is not None:
                    client = redis.asyncio.Redis.from_url(
                        self._url,
                        retry=_own_retry(self._retries, asyncio_=True),
                        **self._client_options(),
                    )
                else:
                    client = self._derive(self._sync_client, "async_client")
                slot = self._async_by_loop[loop] = _AsyncSlot(client)
            self._last_async = (weakref.ref(loop), slot)
        return slot

    def _derive(self, client: Any, missing: str) -> Any:
        try:
            return _twin_client(client, retries=self._retries)
        except (LookupError, TypeError, AttributeError) as exc:
            flavour = "async" if missing == "async_client" else "sync"
            raise ConfigurationError(
                f"RedisBackend: {flavour} callers need a {flavour} client, and one cannot be "
                f"derived from the {type(client).__qualname__} given ({exc}); pass "
                f"{missing}= as well"
            ) from exc

    def close(self) -> None:
        """Close the sync client if this backend created it (a client you passed stays open).

        >>> RedisBackend.from_url("redis://localhost:6379/0").close()
        """
        with self._lock:
            client = self._sync_client
            if client is None or not self._owns_sync:
                return
            self._sync_client = None
            self._sync_direct = None
            if self._sync_stash is not None:
                self._sync_stash.idle.clear()  # closing the client disconnects them
            self._sync_stash = None
        client.close()

    async def aclose(self) -> None:
        """Close the asyncio client this backend created for the running event loop.

        >>> import asyncio
        >>> asyncio.run(RedisBackend.from_url("redis://localhost:6379/0").aclose())
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            slot = self._async_by_loop.pop(loop, None)
            self._last_async = None
        if slot is not None:
            if slot.stash is not None:
                slot.stash.idle.clear()  # closing the client disconnects them
            await slot.client.aclose()

    def dead_letter_store(self, *, prefix: str = "idempotask") -> RedisDeadLetterStore:
        """A dead-letter store on this backend's connections (same server, same pools)."""
        return RedisDeadLetterStore(self, prefix=prefix)

    # ------------------------------------------------------------ shared core

    def _error(self, operation: str, key: str, exc: BaseException) -> BackendError:
        if isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"):
            return CorruptRecordError(
                f"redis backend: {operation} {key!r} on {self._server}: the value under "
                f"Redis key {record_key(key)!r} is not an idempotask record ({exc})"
            )
        return BackendError(
            f"redis backend: {operation} {key!r} failed on {self._server}: "
            f"{type(exc).__name__}: {exc}"
        )

    def _policy_begin(self) -> bool:
        with self._lock:
            if self._policy_state != _UNCHECKED:
                return False
            self._policy_state = _CHECKING
            return True

    def _policy_failed(self, exc: Exception) -> None:
        if isinstance(exc, (RedisConnectionError, RedisTimeoutError, RedisClusterException)):
            # The server is unreachable: the operation fails too; check on the next call.
            self._policy_state = _UNCHECKED
            raise exc
        # Managed Redis services often forbid CONFIG; that is no reason to fail.
        self._policy_state = _CHECKED
        logger.debug("redis backend: cannot read maxmemory-policy on %s: %s", self._server, exc)

    def _policy_read(self, reply: Any) -> None:
        self._policy_state = _CHECKED
        message = eviction_warning(self._server, _policies(reply))
        if message is not None:
            # stacklevel 4: _policy_read <- _client <- claim (the usual first call) <- caller
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    @staticmethod
    def _config_get_args(client: Any) -> dict[str, Any]:
        if _is_cluster(client):
            return {"target_nodes": client.PRIMARIES}
        return {}

    def _client(self) -> Any:
        """The sync client, checking the eviction policy on first use."""
        # Any: redis-py's execute_command is untyped, and replies are parsed by the caller.
        client: Any = self._sync_client
        if client is None:
            client = self._make_sync()
        if self._sync_direct is None:
            if _direct(client):
                self._sync_stash = _stash_for(client, self._owns_sync)
            self._sync_direct = self._sync_stash is not None
        if self._policy_state == _UNCHECKED and self._policy_begin():
            try:
                reply = client.config_get("maxmemory-policy", **self._config_get_args(client))
            except Exception as exc:
                self._policy_failed(exc)
            else:
                self._policy_read(reply)
        return client

    def _execute(self, client: Any, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        """Send one command on the sync client; the reply is raw (bytes, never decoded)."""
        stash = self._sync_stash
        if stash is not None:
            return _execute_direct(stash, args)
        return client.execute_command(*args, **options)

    async def _aclient(self) -> _AsyncSlot:
        """The running loop's asyncio client, ready, eviction policy checked on first use."""
        slot = self._given_slot
        if slot is None:
            slot = self._loop_slot()
        client: Any = slot.client
        if not slot.ready:
            if _is_cluster(client):
                # redis-py's asyncio RedisCluster (seen with 8.1) can hand a connection
                # that its first topology refresh is replacing to a concurrent first
                # command ("'NoneType' object has no attribute 'writelines'").
                # initialize() first is lock-protected and idempotent, so every early
                # caller may await it.
                await client.initialize()
            if _direct(client):
                slot.stash = _stash_for(client, slot.owned)
            slot.ready = True
        if self._policy_state == _UNCHECKED and self._policy_begin():
            try:
                reply = await client.config_get("maxmemory-policy", **self._config_get_args(client))
            except Exception as exc:
                self._policy_failed(exc)
            else:
                self._policy_read(reply)
        return slot

    @staticmethod
    def _aexecute(
        slot: _AsyncSlot, args: tuple[Any, ...], options: dict[str, Any]
    ) -> Awaitable[Any]:
        """Send one command on the loop's asyncio client; the reply is raw bytes.

        A plain function handing back the awaitable: no coroutine of its own per command.
        """
        if slot.stash is not None:
            return _aexecute_direct(slot.stash, args)
        return slot.client.execute_command(*args, **options)  # type: ignore[no-any-return]

    def _ready_slot(self) -> _AsyncSlot | None:
        """The running loop's slot when it needs no first-use work (else None)."""
        slot = self._given_slot
        if slot is None:
            slot = self._loop_slot()
        if slot.ready and self._policy_state != _UNCHECKED:
            return slot
        return None

    def _run(
        self,
        operation: str,
        script: _Script,
        key: str,
        args: tuple[Any, ...],
        parse: Callable[[str, Any], _T],
    ) -> _T:
        rkey = record_key(key).encode()
        try:
            client = self._client()
            try:
                reply = self._execute(client, ("EVALSHA", script.sha, 1, rkey, *args), _RAW)
            except NoScriptError:
                # This node has not cached the script (restart, SCRIPT FLUSH, a new cluster
                # node): EVAL sends it, runs it and caches it there for the next EVALSHA.
                reply = self._execute(client, ("EVAL", script.source, 1, rkey, *args), _RAW)
        except IdempotaskError:
            raise
        except Exception as exc:
            # Not only RedisError: cluster routing errors (RedisClusterException) and driver
            # bugs surface as other types, and on_backend_error must see every store failure.
            raise self._error(operation, key, exc) from exc
        return parse(key, reply)

    async def _arun(
        self,
        operation: str,
        script: _Script,
        key: str,
        args: tuple[Any, ...],
        parse: Callable[[str, Any], _T],
    ) -> _T:
        rkey = record_key(key).encode()
        try:
            slot = self._ready_slot() or await self._aclient()
            try:
                reply = await self._aexecute(slot, ("EVALSHA", script.sha, 1, rkey, *args), _RAW)
            except NoScriptError:
                reply = await self._aexecute(slot, ("EVAL", script.source, 1, rkey, *args), _RAW)
        except IdempotaskError:
            raise
        except Exception as exc:
            # Not only RedisError: cluster routing errors (RedisClusterException) and driver
            # bugs surface as other types, and on_backend_error must see every store failure.
            raise self._error(operation, key, exc) from exc
        return parse(key, reply)

    # A claim is first a plain SET NX PX GET: no script, the cheapest command that takes
    # a key or returns what holds it. Only a claim the caller may re-take (its own token,
    # its owner) and servers older than 7.0 (no NX with GET) go through claim.lua.

    def _set_get_error(self, key: str, exc: Exception) -> None:
        """Raise the store error for a failed SET NX GET claim, unless it was an old
        server refusing NX with GET: then claims use the script from now on (return)."""
        if isinstance(exc, IdempotaskError):
            raise exc
        if isinstance(exc, ResponseError) and "syntax error" in str(exc).lower():
            self._set_get = False
            logger.info(
                "redis backend: %s refuses SET NX GET (Redis < 7.0); claims use a script",
                self._server,
            )
            return
        raise self._error("claim", key, exc) from exc

    @staticmethod
    def _claimed(
        key: str, reply: Any, token: str, owner: str, fingerprint: str, ms: int
    ) -> Record | None:
        """The record a SET NX GET reply shows, or None when claim.lua must re-take it."""
        if reply is None:
            return Record(key, State.IN_PROGRESS, token, owner, fingerprint, b"", ms / 1000)
        record = parse_value(key, reply)
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
        token_ = _field(token, "token")
        owner_ = _field(owner, "owner")
        fingerprint_ = _field(fingerprint, "fingerprint")
        ms = _milliseconds(lease, "lease")
        value = claim_value(token_, owner_, fingerprint_)
        command = ("SET", record_key(key).encode(), value, "NX", "PX", ms, "GET")
        return command, (_FORMAT, token_, ms, owner_, fingerprint_), ms

    # Each operation is its script's arguments; _run/_arun do the I/O, parse_* the rest.

    @staticmethod
    def _finish_args(
        token: str, payload: bytes, ttl: float, state: State
    ) -> tuple[bytes, bytes, bytes, int, bytes]:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise ConfigurationError(
                f"redis backend: payload must be bytes, got {type(payload).__qualname__}"
            )
        ms = _milliseconds(ttl, "ttl")
        return (_FORMAT, _field(token, "token"), bytes(payload), ms, _STATE_BYTES[state])

    @staticmethod
    def _delete_args(token: str | None) -> tuple[bytes, bytes, bytes]:
        if token is None:
            return (_FORMAT, b"0", b"")
        return (_FORMAT, b"1", _field(token, "token"))

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
            try:
                reply = self._execute(self._client(), command, _RAW_SET)
            except Exception as exc:
                self._set_get_error(key, exc)
            else:
                record = self._claimed(key, reply, token, owner, fingerprint, ms)
                if record is not None:
                    return record
        return self._run("claim", _CLAIM, key, args, parse_claim)

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Store ``payload`` as the result if ``key`` is held with ``token``; keep it ``ttl`` s.

        >>> store.complete("ns:f:1:d", "t-1", b"42", ttl=3600)  # doctest: +SKIP
        True
        """
        args = self._finish_args(token, payload, ttl, State.COMPLETED)
        return self._run("complete", _FINISH, key, args, parse_flag)

    def fail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Store ``payload`` as a failure if ``key`` is held with ``token``; keep it ``ttl`` s.

        >>> store.fail("ns:f:1:d", "t-1", b"ValueError: no", ttl=60)  # doctest: +SKIP
        True
        """
        args = self._finish_args(token, payload, ttl, State.FAILED)
        return self._run("fail", _FINISH, key, args, parse_flag)

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """Reset the lease of ``key`` to ``lease`` seconds if it is held with ``token``.

        >>> store.renew("ns:f:1:d", "t-1", lease=30)  # doctest: +SKIP
        True
        """
        args = (_FORMAT, _field(token, "token"), _milliseconds(lease, "lease"))
        return self._run("renew", _RENEW, key, args, parse_flag)

    def get(self, key: str) -> Record | None:
        """The record of ``key`` with the time left on its lease or ttl, or ``None``.

        >>> store.get("ns:f:1:d")  # doctest: +SKIP
        Record(key='ns:f:1:d', state=<State.COMPLETED: 'completed'>, ...)
        """
        return self._run("get", _GET, key, (), parse_record)

    def delete(self, key: str, *, token: str | None = None) -> bool:
        """Remove the record of ``key`` (with ``token``: only if that token wrote it).

        Without a token, whatever is under the key goes, foreign values included.

        >>> store.delete("ns:f:1:d")  # doctest: +SKIP
        True
        """
        return self._run("delete", _DELETE, key, self._delete_args(token), parse_flag)

    def expire_now(self, key: str) -> bool:
        """Test-only: end the record's lease or ttl now; returns whether one was there.

        An expired Redis key is an absent key, so this deletes it.

        >>> store.expire_now("ns:f:1:d")  # doctest: +SKIP
        True
        """
        return self._run("expire_now", _DELETE, key, self._delete_args(None), parse_flag)

    # ------------------------------------------------------------- async API

    async def aclaim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        """Async :meth:`claim`.

        >>> record = await store.aclaim("ns:f:1:d", "t-1", lease=30)  # doctest: +SKIP
        """
        command, args, ms = self._claim_commands(key, token, lease, owner, fingerprint)
        if self._set_get:
            try:
                slot = self._ready_slot() or await self._aclient()
                reply = await self._aexecute(slot, command, _RAW_SET)
            except Exception as exc:
                self._set_get_error(key, exc)
            else:
                record = self._claimed(key, reply, token, owner, fingerprint, ms)
                if record is not None:
                    return record
        return await self._arun("claim", _CLAIM, key, args, parse_claim)

    async def acomplete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Async :meth:`complete`.

        >>> await store.acomplete("ns:f:1:d", "t-1", b"42", ttl=3600)  # doctest: +SKIP
        True
        """
        args = self._finish_args(token, payload, ttl, State.COMPLETED)
        return await self._arun("complete", _FINISH, key, args, parse_flag)

    async def afail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """Async :meth:`fail`.

        >>> await store.afail("ns:f:1:d", "t-1", b"ValueError: no", ttl=60)  # doctest: +SKIP
        True
        """
        args = self._finish_args(token, payload, ttl, State.FAILED)
        return await self._arun("fail", _FINISH, key, args, parse_flag)

    async def arenew(self, key: str, token: str, *, lease: float) -> bool:
        """Async :meth:`renew`.

        >>> await store.arenew("ns:f:1:d", "t-1", lease=30)  # doctest: +SKIP
        True
        """
        args = (_FORMAT, _field(token, "token"), _milliseconds(lease, "lease"))
        return await self._arun("renew", _RENEW, key, args, parse_flag)

    async def aget(self, key: str) -> Record | None:
        """Async :meth:`get`.

        >>> await store.aget("ns:f:1:d")  # doctest: +SKIP
        """
        return await self._arun("get", _GET, key, (), parse_record)

    async def adelete(self, key: str, *, token: str | None = None) -> bool:
        """Async :meth:`delete`.

        >>> await store.adelete("ns:f:1:d", token="t-1")  # doctest: +SKIP
        True
        """
        return await self._arun("delete", _DELETE, key, self._delete_args(token), parse_flag)

    async def aexpire_now(self, key: str) -> bool:
        """Async :meth:`expire_now` (test-only).

        >>> await store.aexpire_now("ns:f:1:d")  # doctest: +SKIP
        True
        """
        return await self._arun("expire_now", _DELETE, key, self._delete_args(None), parse_flag)


# -------------------------------------------------------------------- circuit breakers

#: The ``fmt`` field of a circuit breaker's hash (breaker records are not idempotency
#: records; the marker keeps the two from being mistaken for each other).
BREAKER_FORMAT = "idempotask-breaker/1"
_BREAKER_FMT = BREAKER_FORMAT.encode()
_BREAKER_STATE = _load_script("breaker_state")
_BREAKER_FAILURE = _load_script("breaker_failure")
_BREAKER_SUCCESS = _load_script("breaker_success")
_BREAKER_PROBE = _load_script("breaker_probe")
_BREAKER_STATUSES = {status.value.encode(): status for status in BreakerStatus}


def parse_breaker(key: str, reply: Any) -> BreakerState:
    """Turn a ``breaker_*`` script reply into a :class:`~idempotask.breaker.BreakerState`.

    >>> state = parse_breaker("k", [b"brk", b"open", 5, 30000, 1, 0])
    >>> state.status.value, state.failures, state.retry_after, state.changed
    ('open', 5, 30.0, True)
    """
    if _tag(reply) == b"brk" and len(reply) == 6:
        _, status, failures, wait_ms, changed, probe = reply
        found = _BREAKER_STATUSES.get(status if isinstance(status, bytes) else str(status).encode())
        if found is not None:
            return BreakerState(
                found,
                failures=int(failures),
                retry_after=max(0, int(wait_ms)) / 1000,
                changed=int(changed) == 1,
                probe=int(probe) == 1,
            )
    raise _corrupt(key, reply)


# ------------------------------------------------- stores that run their scripts on a backend

_CLIENT_TYPES = (
    redis.Redis,
    redis.cluster.RedisCluster,
    redis.asyncio.Redis,
    redis.asyncio.cluster.RedisCluster,
)


class _OnBackend:
    """What the breaker and dead-letter stores share: the :class:`RedisBackend` whose
    clients and script runner they use, and the prefix of their keys."""

    # Not in a prefix: ':' and braces would break the keys' hash tags.
    _PREFIX_FORBIDDEN = ":{} "
    # Whether a redis-py client may be given for the backend.
    _TAKES_CLIENTS = False

    _backend: RedisBackend
    _owns_backend: bool
    _prefix: str

    def _attach(self, backend: RedisBackend | str | SyncClient | AsyncClient, prefix: str) -> None:
        name = type(self).__name__
        if isinstance(backend, str):
            # Made for this store only: the eviction-policy warning speaks of idempotency
            # records with a TTL, which breakers (disposable) and dead letters (no TTL) are
            # not.
            backend = RedisBackend.from_url(backend, check_eviction_policy=False)
            self._owns_backend = True
        elif self._TAKES_CLIENTS and isinstance(backend, _CLIENT_TYPES):
            backend = RedisBackend(backend, check_eviction_policy=False)
            self._owns_backend = True
        elif isinstance(backend, RedisBackend):
            self._owns_backend = False
        else:
            accepted = (
                "a RedisBackend, a redis:// URL or a redis-py client"
                if self._TAKES_CLIENTS
                else "a RedisBackend or a redis:// URL"
            )
            raise ConfigurationError(f"{name}: expected {accepted}, got {type(backend).__name__}")
        if (
            not isinstance(prefix, str)
            or not prefix
            or any(c in prefix for c in self._PREFIX_FORBIDDEN)
        ):
            raise ConfigurationError(
                f"{name}: prefix must be a non-empty str without ':', braces or spaces, "
                f"got {prefix!r}"
            )
        self._backend = backend
        self._prefix = prefix

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._backend._server!r}, prefix={self._prefix!r})"

    @property
    def backend(self) -> RedisBackend:
        """The backend whose clients and script runner this store uses."""
        return self._backend

    def close(self) -> None:
        """Close the connections, if this store made its own backend (from a URL or a
        client)."""
        if self._owns_backend:
            self._backend.close()

    async def aclose(self) -> None:
        """Async :meth:`close`, for the running event loop's client."""
        if self._owns_backend:
            await self._backend.aclose()


class RedisBreakerStore(_OnBackend):
    """Circuit breaker state on Redis: a :class:`~idempotask.breaker.BreakerStore`.

    One hash per breaker, at ``prefix:{breaker:NAME}`` (one cluster slot per breaker), and
    one ``EVALSHA`` of a ``breaker_*.lua`` script per operation, run by a
    :class:`RedisBackend` (its clients, timeouts, retries and ``NOSCRIPT`` recovery). Every
    window, open period and probe lease is timed by the server's ``TIME``. A closed record
    expires when its window ends; an open one ``retain`` seconds (a day) after its open
    period, so an abandoned half-open breaker ends up closed. A resent command (redis-py
    retries a timed-out one) may count a failure twice; a resent probe request recognises
    its own grant by its token.

    Pass the backend your idempotency store uses to share its connections, or a URL:

    >>> store = RedisBreakerStore("redis://localhost:6379/0")
    >>> from idempotask.breaker import CircuitBreaker
    >>> breaker = CircuitBreaker("payments", store=store)
    """

    def __init__(
        self,
        backend: RedisBackend | str,
        *,
        prefix: str = "idempotask",
        retain: float = 86400.0,
    ) -> None:
        self._attach(backend, prefix)
        self._retain_ms = _milliseconds(retain, "retain")

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "idempotask") -> RedisBreakerStore:
        """A store on its own connections to ``url``.

        >>> RedisBreakerStore.from_url("redis://localhost:6379/0", prefix="billing")
        RedisBreakerStore('redis://localhost:6379/0', prefix='billing')
        """
        return cls(url, prefix=prefix)

    def key(self, name: str) -> str:
        """The store key of breaker ``name`` (its Redis key is ``record_key`` of it).

        >>> record_key(RedisBreakerStore("redis://localhost").key("payments"))
        'idempotask:{breaker:payments}'
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"RedisBreakerStore: a breaker name must be a non-empty str, got {name!r}"
            )
        return f"{self._prefix}:breaker:{name}"

    # Script arguments; the backend's _run/_arun do the I/O and parse_breaker the rest.

    @staticmethod
    def _failure_args(threshold: int, window: float, open_for: float) -> tuple[Any, ...]:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ConfigurationError(
                f"redis breaker store: threshold must be an int >= 1, got {threshold!r}"
            )
        return (
            threshold,
            _milliseconds(window, "window"),
            _milliseconds(open_for, "open_for"),
        )

    def _probe_args(self, token: str, lease: float) -> tuple[Any, ...]:
        return (_milliseconds(lease, "lease"), token.encode(), self._retain_ms)

    # -------------------------------------------------------------- sync API

    def state(self, name: str) -> BreakerState:
        """The breaker's state; one round trip, no writes."""
        return self._backend._run(
            "breaker.state", _BREAKER_STATE, self.key(name), (_BREAKER_FMT,), parse_breaker
        )

    def record_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> BreakerState:
        """Count a failure (opening at ``threshold``); one round trip."""
        args = (_BREAKER_FMT, *self._failure_args(threshold, window, open_for), self._retain_ms)
        return self._backend._run(
            "breaker.record_failure", _BREAKER_FAILURE, self.key(name), args, parse_breaker
        )

    def record_success(self, name: str) -> BreakerState:
        """Report a success (closing a half-open breaker); one round trip."""
        return self._backend._run(
            "breaker.record_success",
            _BREAKER_SUCCESS,
            self.key(name),
            (_BREAKER_FMT,),
            parse_breaker,
        )

    def try_probe(self, name: str, token: str, *, lease: float) -> BreakerState:
        """Take the half-open probe for ``lease`` seconds if it is free; one round trip."""
        args = (_BREAKER_FMT, *self._probe_args(token, lease))
        return self._backend._run(
            "breaker.try_probe", _BREAKER_PROBE, self.key(name), args, parse_breaker
        )

    def reset(self, name: str) -> None:
        """Remove the breaker's record (closed, no failures); one round trip."""
        self._backend._run(
            "breaker.reset", _DELETE, self.key(name), RedisBackend._delete_args(None), parse_flag
        )

    # ------------------------------------------------------------- async API

    async def astate(self, name: str) -> BreakerState:
        """Async :meth:`state`."""
        return await self._backend._arun(
            "breaker.state", _BREAKER_STATE, self.key(name), (_BREAKER_FMT,), parse_breaker
        )

    async def arecord_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> BreakerState:
        """Async :meth:`record_failure`."""
        args = (_BREAKER_FMT, *self._failure_args(threshold, window, open_for), self._retain_ms)
        return await self._backend._arun(
            "breaker.record_failure", _BREAKER_FAILURE, self.key(name), args, parse_breaker
        )

    async def arecord_success(self, name: str) -> BreakerState:
        """Async :meth:`record_success`."""
        return await self._backend._arun(
            "breaker.record_success",
            _BREAKER_SUCCESS,
            self.key(name),
            (_BREAKER_FMT,),
            parse_breaker,
        )

    async def atry_probe(self, name: str, token: str, *, lease: float) -> BreakerState:
        """Async :meth:`try_probe`."""
        args = (_BREAKER_FMT, *self._probe_args(token, lease))
        return await self._backend._arun(
            "breaker.try_probe", _BREAKER_PROBE, self.key(name), args, parse_breaker
        )

    async def areset(self, name: str) -> None:
        """Async :meth:`reset`."""
        await self._backend._arun(
            "breaker.reset", _DELETE, self.key(name), RedisBackend._delete_args(None), parse_flag
        )


# ------------------------------------------------------------------------ dead letters

#: The ``fmt`` field of every dead-letter hash (a value without it is not ours).
DEAD_LETTER_FORMAT = "idempotask-dlq/1"
_DLQ_FMT = DEAD_LETTER_FORMAT.encode()
_DLQ_ADD = _load_script("dlq_add")
_DLQ_GET = _load_script("dlq_get")
_DLQ_UPDATE = _load_script("dlq_update")
_DLQ_SCAN = _load_script("dlq_scan")
_DLQ_EXPIRE_CLAIM = _load_script("dlq_expire_claim")

#: Index entries one ``dlq_scan`` call examines at most. A script blocks the server while
#: it runs: 500 entries take 2-7 ms (purging large letters is the slow end), and a longer
#: walk is more calls, letting other clients in between.
SCAN_BUDGET = 500

# Text fields of a letter, stored as UTF-8. surrogatepass: an exception message may carry
# the lone surrogates of an undecodable file name, and it must round-trip, not fail.
_LETTER_TEXT = (
    "id",
    "function",
    "kind",
    "error_type",
    "message",
    "traceback",
    "key",
    "route",
    "resolution",
)

# A script call a flow asks its driver to make: (what, for messages; script; ARGV).
_Call = tuple[str, _Script, tuple[Any, ...]]
_Flow = Generator[_Call, Any, _T]


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _encode_text(value: Any, field: str) -> bytes:
    if isinstance(value, enum.Enum):  # FailureKind and other str enums: their value
        value = value.value
    if not isinstance(value, str):
        raise ConfigurationError(
            f"redis dead-letter store: {field} must be a str, got {type(value).__qualname__}"
        )
    return value.encode("utf-8", "surrogatepass")


def _encode_time(value: Any, field: str) -> bytes:
    """Epoch seconds as the shortest exact decimal (``repr``): Lua and ``ZADD`` read it
    back as the same double, so times round-trip exactly."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(
            f"redis dead-letter store: {field} must be a finite number of epoch seconds, "
            f"got {value!r}"
        )
    return repr(float(value)).encode()


def _by_time_score(last_failed_at: Any) -> bytes:
    # Negated, so ascending ZRANGE order is newest first with ties by ascending id.
    _encode_time(last_failed_at, "last_failed_at")
    return repr(-float(last_failed_at)).encode()


def _encode_int(value: Any, field: str) -> bytes:
    return str(_check_int(value, field)).encode()


def _encode_change(field: str, value: Any) -> bytes:
    if field == "status":
        return Status(value).value.encode()
    if field == "attempts":
        return _encode_int(value, field)
    if field == "next_retry_at":
        return b"" if value is None else _encode_time(value, field)
    if field == "last_failed_at":
        return _encode_time(value, field)
    return _encode_text(value, field)


def letter_fields(letter: DeadLetter) -> list[bytes]:
    """A letter as the field, value pairs of its Redis hash (the format marker first).

    >>> letter = DeadLetter(id="1", function="f", kind="transient", error_type="E",
    ...                     message="m", last_failed_at=1.5, next_retry_at=None)
    >>> dict(zip(*[iter(letter_fields(letter))] * 2))[b"next_retry_at"]
    b''
    """
    fields: list[bytes] = [b"fmt", _DLQ_FMT]
    for name in _LETTER_TEXT:
        fields += [name.encode(), _encode_text(getattr(letter, name), name)]
    if not isinstance(letter.arguments, (bytes, bytearray, memoryview)):
        raise ConfigurationError(
            "redis dead-letter store: arguments must be bytes, got "
            f"{type(letter.arguments).__qualname__}"
        )
    fields += [
        b"arguments",
        bytes(letter.arguments),
        b"attempts",
        _encode_int(letter.attempts, "attempts"),
        b"status",
        Status(letter.status).value.encode(),
        b"first_failed_at",
        _encode_time(letter.first_failed_at, "first_failed_at"),
        b"last_failed_at",
        _encode_time(letter.last_failed_at, "last_failed_at"),
        b"next_retry_at",
        _encode_change("next_retry_at", letter.next_retry_at),
        b"critical",
        b"1" if letter.critical else b"0",
        b"version",
        _encode_int(letter.version, "version"),
    ]
    return fields


def _dlq_corrupt(where: str, what: Any) -> CorruptRecordError:
    found = _as_bytes(what).decode("utf-8", "replace") if what is not None else "nothing"
    return CorruptRecordError(
        f"redis dead-letter store: the value under Redis key {where!r} is not an idempotask "
        f"dead letter: found {found}. Another program uses this key, or the data is "
        "corrupt; use another prefix, or delete the key"
    )


def parse_dead_letter(where: str, fields: Any) -> DeadLetter:
    """Build a :class:`DeadLetter` from a letter hash as ``HGETALL`` lists it.

    Unknown fields are ignored (``op`` is the last update's token); a missing or
    malformed one is a :class:`CorruptRecordError` naming ``where``.

    >>> pairs = letter_fields(DeadLetter(id="1", function="f", kind="transient",
    ...                                  error_type="E", message="m", attempts=2))
    >>> parse_dead_letter("k", pairs).attempts
    2
    """
    if not isinstance(fields, list) or len(fields) % 2:
        raise _dlq_corrupt(where, repr(fields)[:80])
    data = {_as_bytes(fields[i]): _as_bytes(fields[i + 1]) for i in range(0, len(fields), 2)}
    if data.get(b"fmt") != _DLQ_FMT:
        raise _dlq_corrupt(where, f"a hash without the format marker {DEAD_LETTER_FORMAT}")
    try:
        text = {name: data[name.encode()].decode("utf-8", "surrogatepass") for name in _LETTER_TEXT}
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
        )
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise _dlq_corrupt(where, f"a dead letter with a missing or malformed field ({exc!r})")


def parse_letter_reply(where: str, reply: Any) -> DeadLetter | None:
    """Turn a ``dlq_get`` / ``dlq_update`` reply into a letter (``None``: absent or stale).

    >>> parse_letter_reply("k", [b"stale"]) is None
    True
    """
    tag = _tag(reply)
    if tag == b"dl" and len(reply) == 2:
        return parse_dead_letter(where, reply[1])
    if tag in (b"absent", b"stale") and len(reply) == 1:
        return None
    raise _dlq_corrupt(where, reply[1] if tag == b"corrupt" and len(reply) == 2 else repr(reply))


def parse_add_reply(where: str, reply: Any, letter: DeadLetter) -> DeadLetter:
    """The stored letter after ``dlq_add``: ``letter`` itself when it was new.

    >>> letter = DeadLetter(id="1", function="f", kind="k", error_type="E", message="m")
    >>> parse_add_reply("k", [b"new"], letter) is letter
    True
    """
    if _tag(reply) == b"new" and len(reply) == 1:
        return letter
    stored = parse_letter_reply(where, reply)
    if stored is None:
        raise _dlq_corrupt(where, repr(reply))
    return stored


@dataclass(frozen=True, slots=True)
class ScanPage:
    """One ``dlq_scan`` call's answer: see ``idempotask/backends/lua/dlq_scan.lua``."""

    done: bool
    cursor: tuple[bytes, bytes]
    skipped: int
    items: list[Any]


def parse_scan(base: str, reply: Any) -> ScanPage:
    """Turn a ``dlq_scan`` reply into a :class:`ScanPage`; ``base`` is the queue's key.

    >>> parse_scan("q", [b"scan", 1, b"", b"", 0, []]).done
    True
    """
    tag = _tag(reply)
    if tag == b"scan" and len(reply) == 6 and isinstance(reply[5], list):
        _, done, score, id, skipped, items = reply
        return ScanPage(int(done) == 1, (_as_bytes(score), _as_bytes(id)), int(skipped), items)
    if tag == b"corrupt" and len(reply) == 3:
        letter = _as_bytes(reply[1]).decode("utf-8", "replace")
        raise _dlq_corrupt(f"{base}:letter:{letter}", reply[2])
    raise _dlq_corrupt(base, repr(reply)[:80])


def _stat_rows(items: list[Any]) -> list[tuple[str, str, Status, int, int, int]]:
    rows = []
    for i in range(0, len(items) - 5, 6):
        function, kind, status = (
            _as_bytes(x).decode("utf-8", "surrogatepass") for x in items[i : i + 3]
        )
        count, retries, by_retry = (int(x) for x in items[i + 3 : i + 6])
        rows.append((function, kind, Status(status), count, retries, by_retry))
    return rows


def filter_json(filter: DeadLetterFilter | None) -> bytes:
    """A filter as the JSON ``dlq_scan`` reads (empty fields left out: they match all).

    >>> filter_json(DeadLetterFilter(kind=("transient",), since=1.5))
    b'{"kind": ["transient"], "since": 1.5}'
    """
    spec: dict[str, Any] = {}
    if filter is not None:
        if filter.status:
            spec["status"] = [Status(s).value for s in filter.status]
        for name in ("kind", "function"):
            values = getattr(filter, name)
            if values:
                spec[name] = [
                    _encode_text(v, name).decode("utf-8", "surrogatepass") for v in values
                ]
        for name in ("since", "until"):
            value = getattr(filter, name)
            if value is not None:
                spec[name] = float(_encode_time(value, name))
    # UTF-8 as is (ensure_ascii=False): cjson passes the bytes through unchanged, so they
    # compare equal to the stored fields byte for byte.
    return json.dumps(spec, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _by_time_range(filter: DeadLetterFilter | None) -> tuple[bytes, bytes]:
    """(exclusive lower, inclusive upper) by_time scores for ``since <= t < until``."""
    if filter is None:
        return b"", b""
    lo = b"" if filter.until is None else _by_time_score(filter.until)
    hi = b"" if filter.since is None else _by_time_score(filter.since)
    return lo, hi


def _check_int(value: Any, option: str, *, minimum: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (minimum is not None and value < minimum)
    ):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ConfigurationError(
            f"redis dead-letter store: {option} must be an int{bound}, got {value!r}"
        )
    return value


def _split_prefix_option(url: str) -> tuple[str, str | None]:
    """Take ``prefix=`` out of a URL's query (redis-py would pass it to the connection).

    >>> _split_prefix_option("redis://h:6379/0?socket_timeout=1&prefix=billing")
    ('redis://h:6379/0?socket_timeout=1', 'billing')
    """
    head, sep, rest = url.partition("?")
    if not sep:
        return url, None
    query, hash_, fragment = rest.partition("#")
    kept: list[str] = []
    prefix: str | None = None
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if unquote_plus(name) == "prefix":
            prefix = unquote_plus(value)
        elif part:
            kept.append(part)
    rebuilt = head + ("?" + "&".join(kept) if kept else "") + hash_ + fragment
    return rebuilt, prefix


def _raw_reply(key: str, reply: Any) -> Any:
    return reply


_ALL_LETTERS = DeadLetterFilter()


class RedisDeadLetterStore(_OnBackend):
    """Dead letters on Redis or Redis Cluster: a
    :class:`~idempotask.backends.deadletters.DeadLetterStore`.

    Each operation is one ``EVALSHA`` of a ``dlq_*.lua`` script, run by a
    :class:`RedisBackend` (its clients, timeouts, retries, ``NOSCRIPT`` recovery and error
    wrapping: Redis failures raise :class:`~idempotask.errors.BackendError`, values that
    are not ours :class:`~idempotask.errors.CorruptRecordError`). Pass the backend your
    idempotency store uses to share its connections, a URL, or a redis-py client::

        >>> store = RedisDeadLetterStore("redis://localhost:6379/0", prefix="billing")
        >>> store
        RedisDeadLetterStore('redis://localhost:6379/0', prefix='billing')
        >>> from idempotask import DeadLetterQueue
        >>> queue = DeadLetterQueue(store)   # or DeadLetterQueue("redis://...?prefix=billing")

    Layout. A queue is the keys under one hash tag, ``{prefix:dlq}``, so it lives in one
    cluster slot (every script touches one slot; a busy queue does not spread over a
    cluster, several prefixes do). With base ``B = prefix:{prefix:dlq}``:

    - ``B:letter:<id>``: a hash per letter, every field (times as exact decimal strings,
      ``next_retry_at`` ``''`` for None, ``arguments`` as bytes, ``fmt`` a format marker);
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
    :data:`SCAN_BUDGET` letters in the time range, i.e. O(letters in the range). Every
    call is atomic; a walk over several calls is not one snapshot.

    Dead letters have no TTL: a ``maxmemory-policy`` of ``allkeys-*`` can evict them, the
    ``volatile-*`` policies and ``noeviction`` cannot. A resent command (redis-py resends
    one whose reply timed out) is harmless for ``add`` and ``update`` (an update knows its
    own write by a token); a resent claim leaves the first claim's letters held until
    their lease runs out, and a resent purge may count fewer letters than it deleted.
    """

    _PREFIX_FORBIDDEN = ":{} \t\r\n"
    _TAKES_CLIENTS = True

    def __init__(
        self,
        backend: RedisBackend | str | SyncClient | AsyncClient,
        *,
        prefix: str = "idempotask",
    ) -> None:
        self._attach(backend, prefix)
        # The backend hash-tags what follows the first ':', so this store key becomes the
        # Redis key prefix:{prefix:dlq}, the base every script derives its keys from.
        self._key = f"{prefix}:{prefix}:dlq"
        self._base = record_key(self._key)

    @classmethod
    def from_url(cls, url: str, *, prefix: str | None = None) -> RedisDeadLetterStore:
        """A store on its own connections to ``url`` (``redis://``, ``rediss://``, ``unix://``).

        This is what ``DeadLetterQueue("redis://...")`` and
        ``configure(dead_letter_store="redis://...")`` call. The query option ``prefix``
        names the queue (default ``idempotask``); other options go to redis-py.

        >>> RedisDeadLetterStore.from_url("redis://localhost:6379/0?prefix=billing")
        RedisDeadLetterStore('redis://localhost:6379/0', prefix='billing')
        """
        if not isinstance(url, str):
            raise ConfigurationError(
                f"RedisDeadLetterStore.from_url: expected a URL, got {type(url).__name__}"
            )
        rest, in_url = _split_prefix_option(url)
        chosen = prefix if prefix is not None else in_url
        return cls(rest, prefix="idempotask" if chosen is None else chosen)

    @property
    def prefix(self) -> str:
        """The queue's name: its keys are ``prefix:{prefix:dlq}:...``."""
        return self._prefix

    @property
    def base_key(self) -> str:
        """The Redis key every key of the queue starts with (never itself written).

        >>> RedisDeadLetterStore("redis://localhost", prefix="billing").base_key
        'billing:{billing:dlq}'
        """
        return self._base

    def letter_key(self, id: str) -> str:
        """The Redis key of the letter ``id``.

        >>> RedisDeadLetterStore("redis://localhost").letter_key("42")
        'idempotask:{idempotask:dlq}:letter:42'
        """
        return f"{self._base}:letter:{id}"

    # -- drivers: a flow yields script calls; these run them, sync or async ----------------

    def _drive(self, flow: _Flow[_T]) -> _T:
        reply: Any = None
        while True:
            try:
                operation, script, args = flow.send(reply)
            except StopIteration as stop:
                result: _T = stop.value
                return result
            reply = self._backend._run(operation, script, self._key, args, _raw_reply)

    async def _adrive(self, flow: _Flow[_T]) -> _T:
        reply: Any = None
        while True:
            try:
                operation, script, args = flow.send(reply)
            except StopIteration as stop:
                result: _T = stop.value
                return result
            reply = await self._backend._arun(operation, script, self._key, args, _raw_reply)

    # -- flows: each operation written once ------------------------------------------------

    def _add_flow(self, letter: DeadLetter) -> _Flow[DeadLetter]:
        if not isinstance(letter, DeadLetter):
            raise TypeError(f"add: expected a DeadLetter, got {type(letter).__name__}")
        letter = letter.evolve(status=Status(letter.status), arguments=bytes(letter.arguments))
        open_ = letter.status in OPEN_STATUSES and letter.next_retry_at is not None
        args = (
            _DLQ_FMT,
            _encode_text(letter.id, "id"),
            _by_time_score(letter.last_failed_at),
            _encode_time(letter.next_retry_at, "next_retry_at") if open_ else b"",
            *letter_fields(letter),
        )
        reply = yield (f"dead-letter add of {letter.id!r} to queue", _DLQ_ADD, args)
        return parse_add_reply(self.letter_key(letter.id), reply, letter)

    def _get_flow(self, id: str) -> _Flow[DeadLetter | None]:
        args = (_DLQ_FMT, _encode_text(id, "id"))
        reply = yield (f"dead-letter get of {id!r} from queue", _DLQ_GET, args)
        return parse_letter_reply(self.letter_key(id), reply)

    def _update_flow(
        self, id: str, version: int, changes: dict[str, Any]
    ) -> _Flow[DeadLetter | None]:
        check_changes(changes)
        pairs: list[bytes] = []
        for name, value in changes.items():
            pairs += [name.encode(), _encode_change(name, value)]
        by_time = _by_time_score(changes["last_failed_at"]) if "last_failed_at" in changes else b""
        args = (
            _DLQ_FMT,
            _encode_text(id, "id"),
            _encode_int(version, "version"),
            uuid.uuid4().hex.encode(),
            by_time,
            *pairs,
        )
        reply = yield (f"dead-letter update of {id!r} in queue", _DLQ_UPDATE, args)
        return parse_letter_reply(self.letter_key(id), reply)

    def _scan_flow(
        self,
        mode: str,
        filter: DeadLetterFilter | None,
        bounds: tuple[bytes, bytes],
        *,
        offset: int = 0,
        wanted: int = 0,
        lease_ms: int = 0,
    ) -> Generator[_Call, Any, list[ScanPage]]:
        """Walk an index to its end (or to ``wanted`` letters): every page it took."""
        pages: list[ScanPage] = []
        cursor = (b"", b"")
        spec = filter_json(filter)
        while True:
            args = (
                _DLQ_FMT,
                mode.encode(),
                spec,
                *bounds,
                *cursor,
                SCAN_BUDGET,
                offset,
                wanted,
                lease_ms,
            )
            page = parse_scan(self._base, (yield (f"dead-letter {mode} in queue", _DLQ_SCAN, args)))
            pages.append(page)
            offset -= page.skipped
            wanted -= len(page.items)
            if page.done or (mode in ("query", "claim") and wanted <= 0):
                return pages
            cursor = page.cursor

    def _letters(self, pages: list[ScanPage]) -> list[DeadLetter]:
        return [parse_dead_letter(self._base, fields) for page in pages for fields in page.items]

    def _query_flow(
        self, filter: DeadLetterFilter, limit: int, offset: int
    ) -> _Flow[list[DeadLetter]]:
        _check_int(limit, "limit")
        _check_int(offset, "offset", minimum=0)
        if limit <= 0:
            return []
        pages = yield from self._scan_flow(
            "query", filter, _by_time_range(filter), offset=offset, wanted=limit
        )
        return self._letters(pages)[:limit]

    def _claim_flow(
        self, now: float, limit: int, lease: float, filter: DeadLetterFilter | None
    ) -> _Flow[list[DeadLetter]]:
        _check_int(limit, "limit")
        bounds = (b"", _encode_time(now, "now"))
        lease_ms = _milliseconds(lease, "lease")
        if limit <= 0:
            return []
        pages = yield from self._scan_flow("claim", filter, bounds, wanted=limit, lease_ms=lease_ms)
        return self._letters(pages)

    def _stats_flow(self, filter: DeadLetterFilter) -> _Flow[list[StatRow]]:
        pages = yield from self._scan_flow("stats", filter, _by_time_range(filter))
        groups: dict[tuple[str, str, Status], list[int]] = {}
        for page in pages:
            for function, kind, status, count, retries, by_retry in _stat_rows(page.items):
                sums = groups.setdefault((function, kind, status), [0, 0, 0])
                sums[0] += count
                sums[1] += retries
                sums[2] += by_retry
        return [
            StatRow(function, kind, status, count, retries, by_retry)
            for (function, kind, status), (count, retries, by_retry) in sorted(groups.items())
        ]

    def _purge_flow(self, filter: DeadLetterFilter) -> _Flow[int]:
        if not isinstance(filter, DeadLetterFilter):
            raise ConfigurationError(
                f"purge: expected a DeadLetterFilter, got {type(filter).__name__}"
            )
        pages = yield from self._scan_flow("purge", filter, _by_time_range(filter))
        return sum(int(page.items[0]) for page in pages if page.items)

    def _expire_claim_flow(self, id: str) -> _Flow[bool]:
        args = (_DLQ_FMT, _encode_text(id, "id"))
        reply = yield (f"dead-letter expire_claim of {id!r} in queue", _DLQ_EXPIRE_CLAIM, args)
        return parse_flag(self.letter_key(id), reply)

    # -- sync API --------------------------------------------------------------------------

    def add(self, letter: DeadLetter) -> DeadLetter:
        """Store ``letter`` unless its id exists; return the stored one. One round trip."""
        return self._drive(self._add_flow(letter))

    def get(self, id: str) -> DeadLetter | None:
        """The letter with this id, or None. One round trip."""
        return self._drive(self._get_flow(id))

    def query(
        self, filter: DeadLetterFilter = _ALL_LETTERS, *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """Matching letters, newest ``last_failed_at`` first, ties by id."""
        return self._drive(self._query_flow(filter, limit, offset))

    def update(self, id: str, version: int, **changes: Any) -> DeadLetter | None:
        """Compare-and-set ``changes`` on version ``version``; ends any claim. One round trip."""
        return self._drive(self._update_flow(id, version, changes))

    def claim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]:
        """Take up to ``limit`` due, unclaimed open letters for ``lease`` seconds (server clock)."""
        return self._drive(self._claim_flow(now, limit, lease, filter))

    def stats(self, filter: DeadLetterFilter = _ALL_LETTERS) -> list[StatRow]:
        """Counts by (function, kind, status); reads every letter in the time range."""
        return self._drive(self._stats_flow(filter))

    def purge(self, filter: DeadLetterFilter) -> int:
        """Delete matching letters; return how many went."""
        return self._drive(self._purge_flow(filter))

    def expire_claim(self, id: str) -> bool:
        """Test hook: end a processor's claim on ``id`` now; True if a live one was there."""
        return self._drive(self._expire_claim_flow(id))

    # -- async API -------------------------------------------------------------------------

    async def aadd(self, letter: DeadLetter) -> DeadLetter:
        """Async :meth:`add`."""
        return await self._adrive(self._add_flow(letter))

    async def aget(self, id: str) -> DeadLetter | None:
        """Async :meth:`get`."""
        return await self._adrive(self._get_flow(id))

    async def aquery(
        self, filter: DeadLetterFilter = _ALL_LETTERS, *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """Async :meth:`query`."""
        return await self._adrive(self._query_flow(filter, limit, offset))

    async def aupdate(self, id: str, version: int, **changes: Any) -> DeadLetter | None:
        """Async :meth:`update`."""
        return await self._adrive(self._update_flow(id, version, changes))

    async def aclaim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]:
        """Async :meth:`claim_due`."""
        return await self._adrive(self._claim_flow(now, limit, lease, filter))

    async def astats(self, filter: DeadLetterFilter = _ALL_LETTERS) -> list[StatRow]:
        """Async :meth:`stats`."""
        return await self._adrive(self._stats_flow(filter))

    async def apurge(self, filter: DeadLetterFilter) -> int:
        """Async :meth:`purge`."""
        return await self._adrive(self._purge_flow(filter))

    async def aexpire_claim(self, id: str) -> bool:
        """Async :meth:`expire_claim` (test hook)."""
        return await self._adrive(self._expire_claim_flow(id))

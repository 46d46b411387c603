"""Making redis-py clients: from a URL with our timeouts and retries, or as the other
flavour (sync <-> asyncio) of a client you gave; and describing them without secrets.

Only redis-py's public surface is used: ``Redis.from_url``, ``Retry`` with a backoff,
``get_connection_kwargs()``, ``get_nodes()`` and a pool's ``connection_class``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
import redis.retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from idempotask.errors import ConfigurationError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_RETRIES",
    "DEFAULT_SOCKET_TIMEOUT",
    "SCHEMES",
    "check_url",
    "describe_client",
    "is_async",
    "is_cluster",
    "new_client",
    "safe_url",
    "server_of",
    "split_query_option",
    "twin_client",
]

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
CLIENT_TYPES = (
    redis.Redis,
    redis.cluster.RedisCluster,
    redis.asyncio.Redis,
    redis.asyncio.cluster.RedisCluster,
)
SCHEMES = ("redis", "rediss", "unix")

# Defaults for the clients a backend creates itself: a dead or hung server must fail a
# call within seconds, and a stale pooled connection deserves a quick retry, not ten.
DEFAULT_SOCKET_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_RETRIES = 2
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 0.5
_RETRY_ON: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError]

# Connection settings that mean the same to redis-py's sync and asyncio connections; a
# twin client is made from these only (everything else is driver plumbing).
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
_SENSITIVE_QUERY = ("pass", "user", "secret", "token", "auth", "cred", "key")


# isinstance() in helpers, so the driver objects stay Any (their settings are untyped).
def is_cluster(client: object) -> bool:
    """Whether ``client`` is a (sync or asyncio) Redis Cluster client."""
    return isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


def is_async(client: object) -> bool:
    """Whether ``client`` is a redis.asyncio client."""
    return isinstance(client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster))


# ------------------------------------------------------------------------------ URLs


def safe_url(url: object) -> str:
    """``url`` for a message: no user, password or secret query value, even when malformed.

    Everything between ``://`` and the last ``@`` before the path is hidden (a password
    with a ``/`` or ``#`` in it can make a URL parser put part of it in the host or port),
    and so are query values whose names look secret.

    >>> safe_url("rediss://user:s3cret@cache.example:6380/2?password=x&socket_timeout=1")
    'rediss://***@cache.example:6380/2?password=***&socket_timeout=1'
    >>> safe_url("redis://:pa/ss@host:6379/0")
    'redis://***@host:6379/0'
    """
    if not isinstance(url, str):
        return f"<{type(url).__qualname__}>"
    scheme, slashes, rest = url.partition("://")
    if not slashes:
        scheme, rest = "", url
    # The last '@' anywhere: a '#', '?' or '/' inside a password must not end the hiding.
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    rest = rest.partition("#")[0]
    rest, sep, query = rest.partition("?")
    kept = []
    for part in query.split("&") if sep else []:
        name, eq, _value = part.partition("=")
        secret = any(word in unquote_plus(name).lower() for word in _SENSITIVE_QUERY)
        kept.append(f"{name}{eq}***" if secret and eq else part)
    return scheme + slashes + rest + (sep + "&".join(kept) if sep else "")


def server_of(url: str) -> str:
    """The server a URL names, for a backend's repr and messages: no user, no query.

    >>> server_of("rediss://user:s3cret@cache.example:6380/2?socket_timeout=1")
    'rediss://cache.example:6380/2'
    """
    return safe_url(url).partition("?")[0].replace("***@", "", 1)


def check_url(url: object, who: str) -> str:
    """Refuse a URL that is not ``redis://``, ``rediss://`` or ``unix://``, or that redis-py
    cannot parse; never connects, and never shows a password in the error."""
    scheme = url.split("://", 1)[0].lower() if isinstance(url, str) and "://" in url else ""
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"{who}: url= must be a redis://, rediss:// or unix:// URL, got {safe_url(url)!r}"
        )
    assert isinstance(url, str)
    failure = ""
    try:  # parse only: nothing connects before the first operation
        redis.ConnectionPool.from_url(url)  # a pool object: it connects on first use only
    except (ValueError, TypeError) as exc:
        failure = type(exc).__name__
    if failure:
        # Raised outside the except block, and without exc's text: a parser error can quote
        # a piece of the password, and a chained exception would carry it along.
        raise ConfigurationError(
            f"{who}: invalid URL {safe_url(url)!r} ({failure} while parsing it): check the "
            "host, the port, the database number and that the password is percent-encoded"
        )
    return url


def split_query_option(url: str, *names: str) -> tuple[str, str | None]:
    """Take the first of ``names`` out of a URL's query (redis-py would pass it on to the
    connection); returns the URL without them and the value found.

    >>> split_query_option("redis://h:6379/0?socket_timeout=1&namespace=billing", "namespace")
    ('redis://h:6379/0?socket_timeout=1', 'billing')
    """
    head, sep, rest = url.partition("?")
    if not sep:
        return url, None
    query, hash_, fragment = rest.partition("#")
    kept: list[str] = []
    found: dict[str, str] = {}
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if unquote_plus(name) in names:
            found[unquote_plus(name)] = unquote_plus(value)
        elif part:
            kept.append(part)
    rebuilt = head + ("?" + "&".join(kept) if kept else "") + hash_ + fragment
    chosen = next((found[name] for name in names if name in found), None)
    return rebuilt, chosen


# --------------------------------------------------------------------------- clients


def _flavour(asyncio_: bool) -> Any:
    """The redis-py package of a flavour: ``redis.asyncio`` or ``redis``."""
    return redis.asyncio if asyncio_ else redis


def _retry(retries: int, *, asyncio_: bool) -> Any:
    backoff = EqualJitterBackoff(cap=_BACKOFF_CAP, base=_BACKOFF_BASE)
    return _flavour(asyncio_).retry.Retry(backoff, retries)


def new_client(
    url: str,
    *,
    asyncio_: bool,
    socket_timeout: float | None,
    connect_timeout: float | None,
    retries: int,
) -> Any:
    """A client for ``url`` with our timeouts and a short retry with backoff on connection
    errors and timeouts; options in the URL's query win over ours."""
    return _flavour(asyncio_).Redis.from_url(
        url,
        retry=_retry(retries, asyncio_=asyncio_),
        retry_on_error=list(_RETRY_ON),
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
    )


def _portable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {name: settings[name] for name in _PORTABLE_SETTINGS if name in settings}


def twin_client(client: Any, *, retries: int) -> Any:
    """A client of the other flavour (sync <-> asyncio) for the same server(s).

    Raises ``LookupError`` when the client's connections cannot be reproduced (Sentinel,
    a custom connection class, an asyncio cluster client that has not met its nodes yet).
    """
    to_async = not is_async(client)
    flavour = _flavour(to_async)
    retry = _retry(retries, asyncio_=to_async)
    if is_cluster(client):
        nodes = list(client.get_nodes())
        if not nodes:
            raise LookupError("the cluster client knows no nodes yet")
        settings = client.get_connection_kwargs()
        connection_class = settings.get("connection_class")
        ssl = getattr(connection_class, "__name__", "") == "SSLConnection"
        options = _portable(settings)
        for name in ("host", "port", "db", "path"):
            options.pop(name, None)
        if ssl or to_async:  # the sync cluster client is given ssl only when it is on
            options["ssl"] = ssl
        startup = [flavour.cluster.ClusterNode(n.host, n.port) for n in nodes]
        return flavour.cluster.RedisCluster(
            startup_nodes=startup, retry=retry, retry_on_error=_RETRY_ON, **options
        )
    pool = client.connection_pool
    twin_class = _CONNECTION_TWINS.get(pool.connection_class)
    if twin_class is None:
        raise LookupError(f"its connection class {pool.connection_class.__qualname__} has no twin")
    options = _portable(client.get_connection_kwargs())
    twin_pool = flavour.ConnectionPool(
        connection_class=twin_class, retry=retry, retry_on_error=_RETRY_ON, **options
    )
    return flavour.Redis.from_pool(twin_pool)


def describe_client(client: Any) -> str:
    """host:port[/db] or the socket path of a client, for messages; never a password."""
    try:
        if is_cluster(client):
            nodes = ",".join(sorted(f"{n.host}:{n.port}" for n in client.get_nodes()))
            return f"cluster {nodes or '(not connected yet)'}"
        settings = client.get_connection_kwargs()
        if "path" in settings:
            return f"unix:{settings['path']}"
        return f"{settings.get('host')}:{settings.get('port')}/{settings.get('db', 0)}"
    except Exception:  # a message must never fail: fall back to the client's type
        return type(client).__qualname__

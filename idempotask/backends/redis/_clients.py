"""Client plumbing shared by the Redis stores: which redis-py client serves a call, the
Lua scripts registered on it, the eviction-policy check, and error wrapping.

Every command goes through redis-py's public API (``execute_command``, pipelines,
``register_script``: on ``NOSCRIPT`` the ``Script`` itself loads the script and runs it
again), so whatever wraps ``execute_command`` (OpenTelemetry, ddtrace, Sentry) sees every
command, and the client's own retries, timeouts and health checks apply.

asyncio clients this package makes are made per event loop and closed *with* it: a tiny
async generator started on the loop awaits the client's ``aclose()`` in its ``finally``,
which ``loop.shutdown_asyncgens()`` (``asyncio.run()``, pytest's and anyio's runners) runs
while the loop still runs (PEP 525). A loop closed without it is dropped when a new loop
shows up or :meth:`Connections.close` runs, so no loop is kept alive here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import inspect
import logging
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

# NEVER_DECODE is the execute_command option redis-py's own commands use (DUMP, for one)
# to keep a reply as bytes on a client made with decode_responses=True. A record's payload
# is arbitrary bytes, so its replies must never be decoded, and redis-py has no public
# spelling of this option. tests/backends/test_redis.py
# ::test_decoding_clients_round_trip_arbitrary_bytes fails if it ever stops working.
from redis.client import NEVER_DECODE
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from idempotask.backends.redis._connect import (
    describe_client,
    is_async,
    is_cluster,
    new_client,
    server_of,
    twin_client,
)
from idempotask.backends.redis._records import eviction_warning, policies, record_key
from idempotask.errors import BackendError, ConfigurationError, CorruptRecordError, IdempotaskError

__all__ = ["RAW", "RAW_SET", "SCRIPTS", "Channel", "Connections", "scan_targets"]

logger = logging.getLogger("idempotask.backends.redis")
_T = TypeVar("_T")

#: execute_command options: the reply stays bytes (and SET ... GET returns the old value).
RAW: dict[str, Any] = {NEVER_DECODE: True}
RAW_SET: dict[str, Any] = {NEVER_DECODE: True, "get": True}

SCRIPTS = (
    "claim",
    "finish",  # complete and fail: the state to store is its last argument
    "renew",
    "delete",
    "get",
    "breaker_state",
    "breaker_failure",
    "breaker_success",
    "breaker_probe",
    "dlq_add",
    "dlq_get",
    "dlq_update",
    "dlq_scan",
    "dlq_expire_claim",
)
_LUA = importlib.resources.files("idempotask.backends.redis") / "lua"
SOURCES: dict[str, bytes] = {name: (_LUA / f"{name}.lua").read_bytes() for name in SCRIPTS}

_UNCHECKED, _CHECKING, _CHECKED = 0, 1, 2


class _Undecoded:
    """The ``client=`` a redis-py ``Script`` runs on: ``EVALSHA`` with its reply left as
    bytes, ``SCRIPT LOAD`` as the client does it. Looked up per call, so instrumentation
    added to the client class later still sees every command."""

    __slots__ = ("client",)

    def __init__(self, client: Any) -> None:
        self.client = client

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self.client.execute_command("EVALSHA", sha, numkeys, *keys_and_args, **RAW)

    def script_load(self, source: Any) -> Any:
        return self.client.script_load(source)


class Channel:
    """One redis-py client and its registered scripts."""

    __slots__ = ("client", "closer", "owned", "ready", "scripts", "undecoded")

    def __init__(self, client: Any, *, owned: bool) -> None:
        self.client = client
        self.owned = owned  # made by this package (from a URL, or as a twin): ours to close
        self.scripts: dict[str, Any] = {
            name: client.register_script(source) for name, source in SOURCES.items()
        }
        self.undecoded = _Undecoded(client)
        # redis-py's asyncio RedisCluster can hand a connection its first topology refresh
        # is replacing to a concurrent first command; initialize() first avoids that.
        self.ready = not (is_async(client) and is_cluster(client))
        self.closer: Any = None  # the async generator that closes a loop's client with it


async def _close_with_loop(client: Any, forget: Callable[[], None]) -> AsyncIterator[None]:
    """Suspended for the loop's life; finalized by ``loop.shutdown_asyncgens()``."""
    try:
        yield
    finally:
        forget()
        try:
            await client.aclose()
        except Exception as exc:  # closing must not fail the loop's shutdown
            logger.debug("redis backend: closing an event loop's client failed: %r", exc)


def _forget(
    connections: weakref.ref[Connections], loop: weakref.ref[asyncio.AbstractEventLoop]
) -> None:
    owner, gone = connections(), loop()
    if owner is not None and gone is not None:
        owner.drop_loop(gone)


class Connections:
    """The clients of one backend (and the stores that share it): a sync client, and an
    asyncio client per event loop (or the one you gave), made on first use."""

    def __init__(
        self,
        *,
        url: str | None,
        client: Any,
        async_client: Any,
        socket_timeout: float | None,
        connect_timeout: float | None,
        retries: int,
        check_eviction_policy: bool,
    ) -> None:
        self.url = url
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._retries = retries
        self._sync: Channel | None = None if client is None else Channel(client, owned=False)
        self._given_sync = client
        self._given_async = async_client
        self._async = None if async_client is None else Channel(async_client, owned=False)
        self._lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Channel]
        self._loops = weakref.WeakKeyDictionary()
        # The hot path's shortcut to the running loop's channel, without taking the lock.
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], Channel] | None = None
        self._policy = _UNCHECKED if check_eviction_policy else _CHECKED

    @property
    def server(self) -> str:
        """The server(s), for messages and reprs; never a password."""
        if self.url is not None:
            return server_of(self.url)
        given = self._given_sync if self._given_sync is not None else self._given_async
        return describe_client(given)

    # ---------------------------------------------------------------- channels

    def _make(self, *, asyncio_: bool) -> Any:
        if self.url is not None:
            return new_client(
                self.url,
                asyncio_=asyncio_,
                socket_timeout=self._socket_timeout,
                connect_timeout=self._connect_timeout,
                retries=self._retries,
            )
        given = self._given_sync if asyncio_ else self._given_async
        try:
            return twin_client(given, retries=self._retries)
        except (LookupError, TypeError, AttributeError) as exc:
            flavour, missing = ("async", "async_client") if asyncio_ else ("sync", "client")
            raise ConfigurationError(
                f"RedisBackend: {flavour} callers need a {flavour} client, and one cannot be "
                f"derived from the {type(given).__qualname__} given ({exc}); pass {missing}= "
                "as well"
            ) from exc

    def sync(self) -> Channel:
        """The sync channel, made on first use, the eviction policy checked once."""
        channel = self._sync
        if channel is None:
            with self._lock:
                if self._sync is None:
                    self._sync = Channel(self._make(asyncio_=False), owned=True)
                channel = self._sync
        if self._policy == _UNCHECKED and self._policy_begin():
            try:
                reply = channel.client.config_get("maxmemory-policy", **_primaries(channel))
            except Exception as exc:
                reply = exc
            self._policy_read(reply)
        return channel

    def ready_channel(self) -> Channel | None:
        """The running loop's channel when it needs no first-use work, else None."""
        channel = self._async
        if channel is None:
            last = self._last
            if last is None or last[0]() is not asyncio.get_running_loop():
                return None
            channel = last[1]
        if channel.ready and self._policy != _UNCHECKED:
            return channel
        return None

    async def achannel(self) -> Channel:
        """The running loop's channel: made, started and checked on first use."""
        channel = self._async
        if channel is None:
            channel = await self._loop_channel()
        if not channel.ready:
            await channel.client.initialize()  # lock-protected and idempotent in redis-py
            channel.ready = True
        if self._policy == _UNCHECKED and self._policy_begin():
            try:
                reply = await channel.client.config_get("maxmemory-policy", **_primaries(channel))
            except Exception as exc:
                reply = exc
            self._policy_read(reply)
        return channel

    async def _loop_channel(self) -> Channel:
        loop = asyncio.get_running_loop()
        closer = None
        with self._lock:
            channel = self._loops.get(loop)
            if channel is None:
                self._sweep()
                channel = Channel(self._make(asyncio_=True), owned=True)
                forget = functools.partial(_forget, weakref.ref(self), weakref.ref(loop))
                closer = channel.closer = _close_with_loop(channel.client, forget)
                self._loops[loop] = channel
            self._last = (weakref.ref(loop), channel)
        if closer is not None:
            # Run it to its yield: from now on the loop's asyncgen hooks know it, and its
            # finally is armed.
            await closer.__anext__()
        return channel

    def drop_loop(self, loop: asyncio.AbstractEventLoop) -> Channel | None:
        """Forget ``loop``'s channel (its closer is finishing it); returns it."""
        with self._lock:
            return self._pop_loop(loop)

    def _pop_loop(self, loop: asyncio.AbstractEventLoop) -> Channel | None:
        channel = self._loops.pop(loop, None)
        if self._last is not None and self._last[0]() is loop:
            self._last = None
        return channel

    def _sweep(self) -> None:
        """Drop the channels of loops closed without ``shutdown_asyncgens`` (lock held):
        keeping them would keep those loops alive through their transports."""
        for loop in [loop for loop in self._loops if loop.is_closed()]:
            self._pop_loop(loop)

    def loop_count(self) -> int:
        """How many event loops currently have a client of ours (for tests and metrics)."""
        with self._lock:
            return len(self._loops)

    def close(self) -> None:
        """Close the sync client if this package made it; drop closed loops' clients."""
        with self._lock:
            channel = self._sync
            self._sweep()
            if channel is None or not channel.owned:
                return
            self._sync = None
        channel.client.close()

    async def aclose(self) -> None:
        """Close the running event loop's client if this package made it."""
        loop = asyncio.get_running_loop()
        channel = self.drop_loop(loop)
        if channel is None:
            return
        if channel.closer is not None:
            await channel.closer.aclose()  # its finally closes the client
        else:
            await channel.client.aclose()

    # ------------------------------------------------------------ eviction policy

    def _policy_begin(self) -> bool:
        with self._lock:
            if self._policy != _UNCHECKED:
                return False
            self._policy = _CHECKING
            return True

    def _policy_read(self, reply: Any) -> None:
        """Warn once if ``reply`` (CONFIG GET's, or the exception it raised) shows a
        policy that could evict records."""
        if isinstance(reply, (RedisConnectionError, RedisTimeoutError, RedisClusterException)):
            # The server is unreachable: the operation fails too; check on the next call.
            self._policy = _UNCHECKED
            raise reply
        self._policy = _CHECKED
        if isinstance(reply, Exception):
            # Managed Redis services often forbid CONFIG; that is no reason to fail.
            logger.debug(
                "redis backend: cannot read maxmemory-policy on %s: %s", self.server, reply
            )
            return
        message = eviction_warning(self.server, policies(reply))
        if message is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=5)

    @property
    def policy_checked(self) -> bool:
        """Whether the eviction policy was read (or its check is off or under way)."""
        return self._policy != _UNCHECKED

    # ------------------------------------------------------------------ commands

    def error(self, operation: str, key: str, exc: BaseException) -> BackendError:
        """The library error for a driver error met by ``operation`` on ``key``."""
        if isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"):
            return CorruptRecordError(
                f"redis backend: {operation} {key!r} on {self.server}: the value under "
                f"Redis key {record_key(key)!r} is not an idempotask record ({exc})"
            )
        return BackendError(
            f"redis backend: {operation} {key!r} failed on {self.server}: "
            f"{type(exc).__name__}: {exc}"
        )

    @contextlib.contextmanager
    def wrapped(self, operation: str, key: str) -> Iterator[None]:
        """Raise every failure inside as a :class:`BackendError` (see :meth:`error`)."""
        try:
            yield
        except IdempotaskError:
            raise
        except Exception as exc:
            # Not only RedisError: cluster routing errors (RedisClusterException) and driver
            # bugs surface as other types, and on_backend_error must see every store failure.
            raise self.error(operation, key, exc) from exc

    def run(
        self,
        operation: str,
        script: str,
        key: str,
        args: tuple[Any, ...],
        parse: Callable[[str, Any], _T],
    ) -> _T:
        """Run ``script`` on ``key``'s Redis key with ``args``; ``parse`` the raw reply.

        The ``EVALSHA`` goes straight through ``execute_command`` (redis-py's ``Script``
        call costs about a sixth of a loopback round trip in CPU); when the server answers
        ``NOSCRIPT``, the registered ``Script`` runs it instead, loading it first.
        """
        rkey = record_key(key)
        with self.wrapped(operation, key):
            channel = self._sync
            if channel is None or self._policy == _UNCHECKED:
                channel = self.sync()
            registered = channel.scripts[script]
            try:
                reply = channel.client.execute_command(
                    "EVALSHA", registered.sha, 1, rkey, *args, **RAW
                )
            except NoScriptError:
                reply = registered(keys=(rkey,), args=args, client=channel.undecoded)
        return parse(key, reply)

    async def arun(
        self,
        operation: str,
        script: str,
        key: str,
        args: tuple[Any, ...],
        parse: Callable[[str, Any], _T],
    ) -> _T:
        """Async :meth:`run`, on the running loop's client."""
        rkey = record_key(key)
        with self.wrapped(operation, key):
            channel = self.ready_channel() or await self.achannel()
            registered = channel.scripts[script]
            try:
                reply = await channel.client.execute_command(
                    "EVALSHA", registered.sha, 1, rkey, *args, **RAW
                )
            except NoScriptError:
                reply = await registered(keys=(rkey,), args=args, client=channel.undecoded)
        return parse(key, reply)

    # ------------------------------------------------------------ scanning keys

    def call(self, operation: str, key: str, use: Callable[[Any], Any]) -> Any:
        """``use(client)`` on the sync client, failures raised as :meth:`wrapped` says."""
        with self.wrapped(operation, key):
            return use(self.sync().client)

    async def acall(self, operation: str, key: str, use: Callable[[Any], Any]) -> Any:
        """Async :meth:`call`, on the running loop's client; an awaitable that ``use``
        returns is awaited."""
        with self.wrapped(operation, key):
            reply = use((await self.achannel()).client)
            return await reply if inspect.isawaitable(reply) else reply

    def values(self, keys: list[Any]) -> list[Any]:
        """``GET`` (undecoded) and ``PTTL`` of each key in one pipeline: a flat list of
        replies, an error object in place of a failed one (a key holding another type)."""
        with self.wrapped("scan", "*"), self.sync().client.pipeline(transaction=False) as pipe:
            _get_and_pttl(pipe, keys)
            return list(pipe.execute(raise_on_error=False))

    async def avalues(self, keys: list[Any]) -> list[Any]:
        """Async :meth:`values`."""
        with self.wrapped("scan", "*"):
            async with (await self.achannel()).client.pipeline(transaction=False) as pipe:
                _get_and_pttl(pipe, keys)
                return list(await pipe.execute(raise_on_error=False))


def _get_and_pttl(pipe: Any, keys: list[Any]) -> None:
    for key in keys:
        pipe.execute_command("GET", key, **RAW)
        pipe.execute_command("PTTL", key)


def _primaries(channel: Channel) -> dict[str, Any]:
    if is_cluster(channel.client):
        return {"target_nodes": channel.client.PRIMARIES}
    return {}


def scan_targets(client: Any) -> list[Any]:
    """What a full SCAN walks: every primary of a cluster, else the one server (None)."""
    if is_cluster(client):
        return list(client.get_primaries())
    return [None]

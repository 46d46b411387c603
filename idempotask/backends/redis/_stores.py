"""What the breaker and dead-letter stores share: the :class:`RedisBackend` whose clients
and script runner they use, and the namespace that scopes their keys."""

from __future__ import annotations

from typing import Any

from idempotask.backends.redis._clients import Connections
from idempotask.backends.redis._connect import CLIENT_TYPES
from idempotask.backends.redis._store import RedisBackend
from idempotask.errors import ConfigurationError

__all__ = ["OnBackend", "pick_namespace"]

# Not in a namespace: ':' and braces would break the keys' hash tags; whitespace would
# break the SCAN patterns and the CLI's output.
_FORBIDDEN = ":{} \t\r\n"
_DEFAULT = "idempotask"


def pick_namespace(who: str, namespace: str | None, prefix: str | None) -> str:
    """``namespace=``, or its older spelling ``prefix=``; checked. Default ``idempotask``."""
    if namespace is not None and prefix is not None and namespace != prefix:
        raise ConfigurationError(
            f"{who}: namespace= and prefix= (its older name) disagree; pass namespace= only"
        )
    chosen = namespace if namespace is not None else prefix
    if chosen is None:
        return _DEFAULT
    if not isinstance(chosen, str) or not chosen or any(c in chosen for c in _FORBIDDEN):
        raise ConfigurationError(
            f"{who}: namespace must be a non-empty str without ':', braces or whitespace, "
            f"got {chosen!r}"
        )
    return chosen


class OnBackend:
    """A store that runs its scripts on a :class:`RedisBackend`'s clients, under a namespace."""

    # Whether a redis-py client may be given in place of a backend.
    _TAKES_CLIENTS = False

    _backend: RedisBackend
    _connections: Connections
    _owns_backend: bool
    _namespace: str

    def _attach(self, backend: Any, namespace: str | None, prefix: str | None) -> None:
        name = type(self).__name__
        self._namespace = pick_namespace(name, namespace, prefix)
        if isinstance(backend, str):
            # Made for this store only: the eviction-policy warning speaks of idempotency
            # records with a TTL, which breakers (disposable) and dead letters are not.
            backend = RedisBackend.from_url(backend, check_eviction_policy=False)
            self._owns_backend = True
        elif self._TAKES_CLIENTS and isinstance(backend, CLIENT_TYPES):
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
        self._backend = backend
        self._connections = backend.connections

    def __repr__(self) -> str:
        server = self._connections.server
        return f"{type(self).__name__}({server!r}, namespace={self._namespace!r})"

    @property
    def backend(self) -> RedisBackend:
        """The backend whose clients and script runner this store uses."""
        return self._backend

    @property
    def namespace(self) -> str:
        """The namespace that scopes this store's keys."""
        return self._namespace

    @property
    def prefix(self) -> str:
        """The namespace under its older name."""
        return self._namespace

    def close(self) -> None:
        """Close the connections, if this store made its own backend (from a URL or a
        client)."""
        if self._owns_backend:
            self._backend.close()

    async def aclose(self) -> None:
        """Async :meth:`close`, for the running event loop's client."""
        if self._owns_backend:
            await self._backend.aclose()

"""Which stores the dashboard reads and acts on, how they are named on the page (never
with a password), and the idempotency store's health check."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

from idempotask import config
from idempotask.backends.base import Backend, BreakerStore, DeadLetterStore, ProvidesStores
from idempotask.backends.deadletters import dead_letter_store_from_url
from idempotask.cli._common import redact_url, scrub
from idempotask.deadletter import DeadLetterQueue
from idempotask.errors import ConfigurationError
from idempotask.spool import spool_path
from idempotask.web._overview import Health

__all__ = ["Stores"]

PROBE = "idempotask.web:health-probe"  # a key no call makes: reading it is a round trip


@dataclass
class Stores:
    """The dashboard's stores. Left unset, each follows :func:`idempotask.configure` at
    every use (so an application that configures after mounting the app is served)."""

    backend_option: Backend | None
    queue_option: DeadLetterQueue | None
    breakers_option: BreakerStore | None
    namespace_option: str | None
    urls: tuple[str | None, ...] = ()

    @classmethod
    def build(
        cls,
        backend: Backend | str | None,
        dead_letter_store: DeadLetterStore | str | None,
        breaker_store: BreakerStore | None,
        namespace: str | None,
        queue: DeadLetterQueue | None,
    ) -> Stores:
        """Check and resolve what :func:`~idempotask.web.create_app` was given."""
        ns = None if namespace is None else config.check_namespace(namespace)
        urls = tuple(x for x in (backend, dead_letter_store) if isinstance(x, str))
        resolved = None if backend is None else config.resolve_backend(backend)
        if queue is not None and dead_letter_store is not None:
            raise ConfigurationError("create_app: give queue= or dead_letter_store=, not both")
        if queue is None and dead_letter_store is not None:
            store = dead_letter_store
            if isinstance(store, str):
                store = dead_letter_store_from_url(store, namespace=ns or _namespace())
            queue = DeadLetterQueue(store)
        elif queue is None and (resolved is not None or ns is not None):
            queue = DeadLetterQueue(_beside(resolved or config.get_backend(), ns or _namespace()))
        if breaker_store is None and resolved is not None and isinstance(resolved, ProvidesStores):
            breaker_store = resolved.breaker_store(namespace=ns or _namespace())
        return cls(resolved, queue, breaker_store, ns, urls)

    @property
    def namespace(self) -> str:
        """The key namespace the pages are about."""
        return self.namespace_option or _namespace()

    @property
    def backend(self) -> Backend:
        """The idempotency store."""
        return self.backend_option or config.get_backend()

    @property
    def queue(self) -> DeadLetterQueue:
        """The dead-letter queue."""
        from idempotask.deadletter import default_queue

        return self.queue_option or default_queue()

    @property
    def breakers(self) -> BreakerStore | None:
        """The breaker store, or None when the backend keeps no breakers."""
        if self.breakers_option is not None:
            return self.breakers_option
        backend = self.backend
        if isinstance(backend, ProvidesStores):
            return backend.breaker_store(namespace=self.namespace)
        return None

    def spool_path(self) -> str:
        """This host's spool file for the namespace (where letters wait while the store
        is unreachable)."""
        return spool_path(config.settings().spool_path, self.namespace)

    def scrub(self, text: str) -> str:
        """``text`` without any password of the stores' URLs."""
        configured = (config.settings().backend, config.settings().dead_letter_store)
        urls = [*self.urls, *(u for u in configured if isinstance(u, str))]
        urls += [os.environ.get(config.ENV_URL), os.environ.get(config.ENV_DEAD_LETTER_URL)]
        return scrub(redact_url(text), *urls)

    def describe(self) -> str:
        """The idempotency store as the page names it: its URL without a password, or its
        repr."""
        backend = self.backend
        chosen = config.settings().backend if self.backend_option is None else None
        if isinstance(chosen, str):
            return redact_url(chosen)
        if self.backend_option is None and chosen is None:
            return redact_url(os.environ.get(config.ENV_URL) or config.DEFAULT_URL)
        return self.scrub(repr(backend))

    def health(self) -> Health:
        """Read a key no call makes; on Redis, also the eviction policy."""
        backend = self.backend
        started = time.perf_counter()
        try:
            backend.get(f"{self.namespace}:{PROBE}")
        except Exception as exc:
            return Health(False, None, self.scrub(f"{type(exc).__name__}: {exc}"))
        latency = (time.perf_counter() - started) * 1000
        return Health(True, latency, warning=_eviction_warning(backend))


def _namespace() -> str:
    return config.settings().namespace


def _beside(backend: Backend, namespace: str) -> DeadLetterStore:
    url = config.settings().dead_letter_store or os.environ.get(config.ENV_DEAD_LETTER_URL)
    if isinstance(url, str):
        return dead_letter_store_from_url(url, namespace=namespace)
    if not isinstance(backend, ProvidesStores):
        raise ConfigurationError(
            f"create_app: {type(backend).__name__} keeps no dead letters; pass "
            "dead_letter_store= (a store or a URL)"
        )
    return backend.dead_letter_store(namespace=namespace)


def _eviction_warning(backend: Backend) -> str:
    """What the Redis backend warns about its ``maxmemory-policy``, read now ("" when the
    policy keeps records, the store is not Redis, or the server forbids CONFIG)."""
    try:
        from idempotask.backends.redis import RedisBackend, eviction_warning
    except ImportError:
        return ""
    if not isinstance(backend, RedisBackend):
        return ""
    connections = backend.connections
    try:
        with warnings.catch_warnings():
            # The first use of a client warns about the same policy: say it here instead.
            warnings.simplefilter("ignore", RuntimeWarning)
            reply = connections.sync().client.config_get("maxmemory-policy")
    except Exception:  # managed services forbid CONFIG; that is no reason to fail
        return ""
    values = reply.values() if isinstance(reply, dict) else []
    found = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return eviction_warning(connections.server, found) or ""

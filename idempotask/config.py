"""Process-wide configuration, resolved lazily.

:func:`configure` may run before or after decorated functions are defined: each call
looks the settings up when it runs (cheaply: a generation counter tells decorated
functions when to refresh). Without ``configure()``, the backend comes from the
``IDEMPOTASK_URL`` environment variable, else the embedded ``memory://`` store. Nothing
connects at import time.
"""

from __future__ import annotations

import datetime
import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

from idempotask.backends import Backend, backend_from_url, check_url
from idempotask.backends.base import ProvidesStores
from idempotask.backends.deadletters import DeadLetter, DeadLetterStore, dead_letter_store_from_url
from idempotask.errors import ConfigurationError
from idempotask.serializers import Serializer, get_serializer

__all__ = [
    "AlertHook",
    "Settings",
    "configure",
    "get_backend",
    "get_dead_letter_store",
    "reset",
    "settings",
]

OnBackendError = Literal["raise", "open"]

ENV_URL = "IDEMPOTASK_URL"
ENV_DEAD_LETTER_URL = "IDEMPOTASK_DEAD_LETTER_URL"
DEFAULT_URL = "memory://"

AlertHook = Callable[[DeadLetter], object]
"""Called with a dead letter of a function marked ``critical=True``."""


@dataclass(frozen=True)
class Settings:
    """The active configuration. Read it with :func:`settings`."""

    backend: Backend | str | None = None
    """A backend instance, a URL, or None for ``$IDEMPOTASK_URL`` / ``memory://``."""
    namespace: str = "idempotask"
    """First part of every key; lets several applications share one store."""
    default_ttl: float = 24 * 3600.0
    """Seconds a result is kept when a decorator gives no ``ttl``."""
    default_lease: float = 60.0
    """Seconds a claim is held without renewal when a decorator gives no ``lease``."""
    wait_timeout: float = 60.0
    """Seconds ``on_conflict="wait"`` waits when a decorator gives no ``wait_timeout``."""
    on_backend_error: OnBackendError = "raise"
    """``"raise"`` (fail closed) or ``"open"`` (run unprotected, loudly logged)."""
    serializer: Serializer | str = "json"
    """How results are stored: ``"json"`` (typed JSON), ``"pickle"`` or an object."""
    max_result_bytes: int = 1024 * 1024
    """Largest serialized result stored (default 1 MiB): a bigger one is a
    :class:`SerializationError` and the key is released. Store a reference instead."""
    max_argument_bytes: int = 1024 * 1024
    """Largest encoded key material (default 1 MiB): bigger arguments are a
    :class:`KeyEncodingError`; key them by an id with ``key=`` or ``key_args=``."""
    dead_letter_store: DeadLetterStore | str | None = None
    """Where dead letters go: a store, a URL, or None for ``$IDEMPOTASK_DEAD_LETTER_URL``,
    else beside the idempotency backend; a store built from a URL or the backend keeps the
    namespace's letters only."""
    spool_path: str | None = None
    """The spool file for letters the store cannot take (None: ``$IDEMPOTASK_SPOOL``, else
    a per-user cache directory); a directory holds ``spool-<namespace>.jsonl``."""
    dead_letter_retention: float = 30 * 86400.0
    """Seconds resolved and abandoned dead letters are kept before ``purge()`` drops them."""
    on_alert: tuple[AlertHook, ...] = ()
    """Hooks called with every dead letter of a function marked ``critical=True``."""


_lock = threading.RLock()
_settings = Settings()
_backend: Backend | None = None
_dead_letter_store: DeadLetterStore | None = None
generation = 0
"""Bumped on every configure(); decorated functions refresh their cache when it moves."""


Seconds = float | datetime.timedelta
"""A duration option: seconds as a number, or a :class:`datetime.timedelta`."""


def check_seconds(option: str, value: Any, *, allow_zero: bool = False) -> float:
    """Validate a duration option (seconds, or a ``timedelta``); the error names the option.

    >>> check_seconds("ttl", datetime.timedelta(hours=1))
    3600.0
    """
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"{option}: expected seconds (a number or a datetime.timedelta), "
            f"got {type(value).__name__}"
        )
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(
            f"{option}: must be a finite number of seconds {bound}, got {value!r}"
        )
    return float(value)


def check_size(option: str, value: Any) -> int:
    """Validate a size in bytes (a positive int); the error names the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"{option}: expected a positive number of bytes, got {value!r}")
    return value


def check_choice(option: str, value: Any, choices: tuple[str, ...]) -> str:
    """Validate a named choice; the error names the option and the choices."""
    if value not in choices:
        raise ConfigurationError(
            f"{option}: expected one of {', '.join(map(repr, choices))}, got {value!r}"
        )
    return str(value)


def check_backend(value: Any) -> Backend | str | None:
    """Validate a backend option: an instance, a URL or None."""
    if value is None or isinstance(value, Backend):
        return value
    if isinstance(value, str):
        if "://" not in value:
            raise ConfigurationError(
                "backend: expected a URL such as 'redis://localhost:6379/0' (a scheme and "
                "'://'); the value given has no scheme"
            )
        check_url(value)  # an unknown scheme fails here, not at the first call
        return value
    raise ConfigurationError(
        f"backend: expected a URL or a store implementing idempotask.backends.Backend, "
        f"got {type(value).__name__}"
    )


def check_namespace(value: Any) -> str:
    """Validate a namespace: non-empty, without ':' or braces or whitespace."""
    if not isinstance(value, str) or not value or any(c in value for c in ":{} \t\r\n"):
        raise ConfigurationError(
            f"namespace: expected a non-empty string without ':', braces or spaces, got {value!r}"
        )
    return value


def check_dead_letter_store(value: Any) -> DeadLetterStore | str | None:
    """Validate a dead-letter store option: an instance, a URL or None."""
    if value is None or isinstance(value, DeadLetterStore):
        return value
    if isinstance(value, str) and "://" in value:
        return value
    # Never echo a string: a malformed URL may still carry a password.
    got = "a string without '://'" if isinstance(value, str) else type(value).__name__
    raise ConfigurationError(
        "dead_letter_store: expected a URL such as 'memory://' or a store implementing "
        f"idempotask.backends.deadletters.DeadLetterStore, got {got}"
    )


def check_hooks(option: str, value: Any) -> tuple[Callable[..., Any], ...]:
    """Validate a hook option: a callable, an iterable of callables, or None."""
    hooks = () if value is None else (value,) if callable(value) else value
    try:
        hooks = tuple(hooks)
    except TypeError:
        hooks = (value,)
    for hook in hooks:
        if not callable(hook):
            raise ConfigurationError(f"{option}: expected callables, got {hook!r}")
    return hooks


def _check_serializer(value: Serializer | str) -> Serializer | str:
    get_serializer(value)  # validates
    return value


def _check_spool_path(value: Any) -> str | None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ConfigurationError(f"spool_path: expected a path or None, got {value!r}")
    return None if value is None else os.fspath(value)


# configure()'s options, each with its check (in the order of its parameters).
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "backend": check_backend,
    "namespace": check_namespace,
    "default_ttl": partial(check_seconds, "default_ttl"),
    "default_lease": partial(check_seconds, "default_lease"),
    "wait_timeout": partial(check_seconds, "wait_timeout", allow_zero=True),
    "on_backend_error": partial(check_choice, "on_backend_error", choices=("raise", "open")),
    "serializer": _check_serializer,
    "max_result_bytes": partial(check_size, "max_result_bytes"),
    "max_argument_bytes": partial(check_size, "max_argument_bytes"),
    "dead_letter_store": check_dead_letter_store,
    "spool_path": _check_spool_path,
    "dead_letter_retention": partial(check_seconds, "dead_letter_retention"),
    "on_alert": partial(check_hooks, "on_alert"),
}

_UNSET: Any = object()


def configure(
    *,
    backend: Backend | str | None = _UNSET,
    namespace: str = _UNSET,
    default_ttl: Seconds = _UNSET,
    default_lease: Seconds = _UNSET,
    wait_timeout: Seconds = _UNSET,
    on_backend_error: OnBackendError = _UNSET,
    serializer: Serializer | str = _UNSET,
    max_result_bytes: int = _UNSET,
    max_argument_bytes: int = _UNSET,
    dead_letter_store: DeadLetterStore | str | None = _UNSET,
    spool_path: str | os.PathLike[str] | None = _UNSET,
    dead_letter_retention: Seconds = _UNSET,
    on_alert: AlertHook | Iterable[AlertHook] | None = _UNSET,
) -> Settings:
    """Set process-wide defaults; options not given keep their current value.

    >>> configure(backend="redis://localhost:6379/0", namespace="billing")  # doctest: +SKIP

    Every option is validated now, and the error names the option. Returns the new
    :class:`Settings`. Dead-letter options (see :mod:`idempotask.deadletter`):

    >>> configure(dead_letter_store="memory://", spool_path="/var/spool/app/dlq.jsonl",
    ...           on_alert=page_the_on_call)  # doctest: +SKIP
    """
    global _settings, _backend, _dead_letter_store, generation
    # Every option given, checked (locals(): read before any other local exists).
    changes = {name: _CHECKS[name](v) for name, v in locals().items() if v is not _UNSET}
    with _lock:
        _settings = replace(_settings, **changes)
        if "backend" in changes:
            _backend = None
        # The default dead-letter store follows the backend and the namespace; an
        # unrelated option (a ttl) must not swap a store full of letters for an empty one.
        if changes.keys() & {"backend", "dead_letter_store", "namespace"}:
            _dead_letter_store = None
        generation += 1
        return _settings


def reset() -> None:
    """Restore the defaults (the next call rebuilds the backend from the environment)."""
    global _settings, _backend, _dead_letter_store, generation
    with _lock:
        _settings = Settings()
        _backend = None
        _dead_letter_store = None
        generation += 1


def settings() -> Settings:
    """The active :class:`Settings`."""
    return _settings


def resolve_backend(value: Backend | str) -> Backend:
    """A backend instance for an instance or a URL."""
    return value if not isinstance(value, str) else backend_from_url(value)


def get_backend() -> Backend:
    """The configured backend, built on first use."""
    global _backend
    current = _backend
    if current is not None:
        return current
    with _lock:
        if _backend is None:
            chosen = _settings.backend
            if chosen is None:
                chosen = os.environ.get(ENV_URL) or DEFAULT_URL
            _backend = resolve_backend(chosen)
        return _backend


def get_dead_letter_store() -> DeadLetterStore:
    """The configured dead-letter store, built on first use.

    ``configure(dead_letter_store=...)`` (a store, or a URL), else
    ``$IDEMPOTASK_DEAD_LETTER_URL``, else beside the idempotency backend: its
    ``dead_letter_store(namespace=...)`` (:class:`~idempotask.backends.base.ProvidesStores`).
    A store built here keeps the letters of the configured namespace only, so
    applications sharing one server keep separate queues (a URL naming its queue itself,
    ``?prefix=`` or ``?table=``, is built as it says).
    """
    global _dead_letter_store
    current = _dead_letter_store
    if current is not None:
        return current
    with _lock:
        if _dead_letter_store is None:
            chosen = _settings.dead_letter_store
            namespace = _settings.namespace
            # A URL: the option's, else $IDEMPOTASK_DEAD_LETTER_URL (None: follow the backend).
            url = chosen if isinstance(chosen, str) else os.environ.get(ENV_DEAD_LETTER_URL)
            store: DeadLetterStore
            if chosen is not None and not isinstance(chosen, str):
                store = chosen
            elif url:
                store = dead_letter_store_from_url(url, namespace=namespace)
            else:
                backend = get_backend()
                if isinstance(backend, ProvidesStores):
                    store = backend.dead_letter_store(namespace=namespace)
                elif isinstance(_settings.backend, str) or _settings.backend is None:
                    # A third-party scheme may register a dead-letter store of its own.
                    backend_url = _settings.backend or os.environ.get(ENV_URL) or DEFAULT_URL
                    store = dead_letter_store_from_url(backend_url, namespace=namespace)
                else:
                    raise ConfigurationError(
                        f"dead_letter_store: the backend, a {type(backend).__name__}, keeps "
                        "no dead letters (it offers no dead_letter_store()); pass "
                        "configure(dead_letter_store=...) (a URL or a store) or set "
                        f"${ENV_DEAD_LETTER_URL}"
                    )
            _dead_letter_store = store
        return _dead_letter_store

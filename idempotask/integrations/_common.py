"""What every framework integration shares: prefixed options and worker checks."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from idempotask.backends.base import Backend
from idempotask.errors import ConfigurationError

__all__ = [
    "DEAD_LETTER_OPTIONS",
    "IDEMPOTENCY_OPTIONS",
    "MultiProcessMemoryWarning",
    "check_worker_backend",
    "split_options",
]

# @idempotent's options an integration accepts as ``idempotency_<name>``. ``name`` is
# not among them: the key's name is always the framework's task/actor name.
IDEMPOTENCY_OPTIONS = frozenset(
    {
        "ttl",
        "lease",
        "on_conflict",
        "wait_timeout",
        "cache_errors",
        "key",
        "key_args",
        "exclude_args",
        "backend",
        "serializer",
        "on_backend_error",
        "breaker",
        "max_result_bytes",
        "previous_names",
    }
)
# @dead_letter's options an integration accepts as ``dead_letter_<name>``.
DEAD_LETTER_OPTIONS = frozenset(
    {
        "queue",
        "redact",
        "classifier",
        "policies",
        "critical",
        "on_dead_letter",
        "on_retry_exhausted",
        "enabled",
    }
)


def split_options(
    options: Mapping[str, Any], *, where: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split a framework's task options into (idempotency, dead-letter, the rest).

    ``idempotency_ttl=60`` becomes ``{"ttl": 60}`` in the first dict; an unknown
    ``idempotency_*`` or ``dead_letter_*`` name is a :class:`ConfigurationError` naming
    it and ``where`` (the task), instead of being silently ignored.
    """
    idem: dict[str, Any] = {}
    dead: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for name, value in options.items():
        if name.startswith("idempotency_"):
            option = name.removeprefix("idempotency_")
            if option not in IDEMPOTENCY_OPTIONS:
                raise ConfigurationError(
                    f"{where}: unknown option {name!r}; idempotency options are "
                    + ", ".join(f"idempotency_{o}" for o in sorted(IDEMPOTENCY_OPTIONS))
                )
            idem[option] = value
        elif name.startswith("dead_letter_"):
            option = name.removeprefix("dead_letter_")
            if option not in DEAD_LETTER_OPTIONS:
                raise ConfigurationError(
                    f"{where}: unknown option {name!r}; dead-letter options are "
                    + ", ".join(f"dead_letter_{o}" for o in sorted(DEAD_LETTER_OPTIONS))
                )
            dead[option] = value
        else:
            rest[name] = value
    return idem, dead, rest


class MultiProcessMemoryWarning(RuntimeWarning):
    """The in-memory store is used by a worker that runs tasks in several processes."""


def check_worker_backend(backend: Backend, *, framework: str, processes: int) -> None:
    """Warn loudly when a multi-process worker uses the in-memory store.

    Each worker process would have its own store, so duplicates handled by different
    processes would all run. ``processes`` is the worker's concurrency in processes
    (1 for a solo or threaded worker, where memory still deduplicates).
    """
    from idempotask.backends.memory import MemoryBackend

    if isinstance(backend, MemoryBackend) and processes > 1:
        warnings.warn(
            f"idempotask: the {framework} worker runs tasks in {processes} processes but the "
            "idempotency store is memory://, which each process keeps for itself: duplicates "
            "handled by different processes WILL all run. Configure a shared store, e.g. "
            "idempotask.configure(backend='redis://localhost:6379/0').",
            MultiProcessMemoryWarning,
            stacklevel=2,
        )

"""What every framework integration shares: prefixed options, dead letters for calls
the framework gave up on, replays, claims owned by a task id, and worker checks."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from idempotask.backends.base import Backend, State
from idempotask.backends.deadletters import DeadLetter
from idempotask.deadletter import DeadLetterQueue, default_queue
from idempotask.deadletter._core import (
    NOT_DEAD_LETTERED,
    Hook,
    bound_arguments,
    check_classifier,
    check_hook,
    check_policies,
    fire_letter_hooks,
    redact_arguments,
)
from idempotask.errors import BackendError, ConfigurationError
from idempotask.taxonomy import Classifier

if TYPE_CHECKING:
    from idempotask.idempotent import Spec

__all__ = [
    "DEAD_LETTER_OPTIONS",
    "DEFAULT_DEAD_LETTER_OPTIONS",
    "IDEMPOTENCY_OPTIONS",
    "NOT_DEAD_LETTERED",
    "DeadLetterOptions",
    "MultiProcessMemoryWarning",
    "call_key",
    "check_worker_backend",
    "clear_own_failure",
    "replay_arguments",
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


# ----------------------------------------------------------------------------------------
# Dead letters: a call the framework gave up on (its retries exhausted) becomes a letter.
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetterOptions:
    """A task's ``dead_letter_*`` options, validated (:meth:`from_options`).

    The defaults (:data:`DEFAULT_DEAD_LETTER_OPTIONS`) record every final failure in the
    process-wide queue with the queue's classifier and policies.
    """

    queue: DeadLetterQueue | None = None
    redact: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None
    classifier: Classifier | None = None
    policies: Any = None  # Mapping[FailureKind, RetryPolicy] | None, as check_policies gives
    critical: bool = False
    on_dead_letter: Hook | None = None
    on_retry_exhausted: Hook | None = None
    enabled: bool = True

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str) -> DeadLetterOptions:
        """The options :func:`split_options` gave as its second dict (names without the
        ``dead_letter_`` prefix); a bad value is a :class:`ConfigurationError` naming
        ``where`` or the option."""
        queue = options.get("queue")
        if queue is not None and not isinstance(queue, DeadLetterQueue):
            raise ConfigurationError(f"{where}: dead_letter_queue: expected a DeadLetterQueue")
        return cls(
            queue=queue,
            redact=check_hook("dead_letter_redact", options.get("redact")),
            classifier=check_classifier(options.get("classifier")),
            policies=check_policies(options.get("policies")),
            critical=bool(options.get("critical", False)),
            on_dead_letter=check_hook("dead_letter_on_dead_letter", options.get("on_dead_letter")),
            on_retry_exhausted=check_hook(
                "dead_letter_on_retry_exhausted", options.get("on_retry_exhausted")
            ),
            enabled=bool(options.get("enabled", True)),
        )

    def arguments(
        self,
        target: Callable[..., Any] | inspect.Signature | None,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        name: str,
    ) -> dict[str, Any] | None:
        """The call's arguments as its letter keeps them: bound by name to ``target``
        (the task's function or signature), defaults applied, through
        ``dead_letter_redact``. None keeps none (no target, arguments that do not bind, a
        redact hook that failed)."""
        arguments = bound_arguments(target, args, kwargs)
        return redact_arguments(self.redact, arguments, option="dead_letter_redact", name=name)

    def record(
        self,
        name: str,
        error: BaseException,
        *,
        arguments: Mapping[str, Any] | None,
        key: str,
        route: str,
        replay_of: str | None,
        queue: DeadLetterQueue | None = None,
    ) -> DeadLetter:
        """Record the final failure of task ``name`` and run the letter's hooks.

        The letter goes to ``dead_letter_queue``, else ``queue`` (the integration's),
        else the process-wide queue. ``replay_of``: the letter a replayed task belongs
        to, or the task's own id, so that a task recorded twice keeps one letter.
        """
        target = self.queue or queue or default_queue()
        letter = target.record(
            name,
            error,
            arguments=arguments,
            key=key,
            route=route,
            critical=self.critical,
            classifier=self.classifier,
            policies=self.policies,
            replay_of=replay_of,
        )
        fire_letter_hooks(
            letter, self.on_dead_letter, self.on_retry_exhausted, prefix="dead_letter_"
        )
        return letter


DEFAULT_DEAD_LETTER_OPTIONS = DeadLetterOptions()
"""The options of a task that sets no ``dead_letter_*`` option."""


def call_key(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The idempotency key of ``func(*args, **kwargs)`` through ``func.key_for``, or
    ``""`` when ``func`` is not idempotent or the key cannot be built (a letter is still
    recorded, without key)."""
    key_for = getattr(func, "key_for", None)
    if not callable(key_for):
        return ""
    try:
        return str(key_for(*args, **kwargs))
    except Exception:
        return ""


def replay_arguments(
    func: Any, arguments: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for ``func`` from arguments a letter stored by
    name; a ``ValueError`` if ``func`` no longer takes some of them. When its signature
    cannot be read, everything goes by keyword."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return (), dict(arguments)
    unknown = sorted(set(arguments) - set(sig.parameters))
    if unknown:
        raise ValueError(
            f"{getattr(func, '__qualname__', func)} no longer takes "
            f"{', '.join(map(repr, unknown))}; its signature changed"
        )
    ordered = {name: arguments[name] for name in sig.parameters if name in arguments}
    bound = inspect.BoundArguments(sig, ordered)
    return tuple(bound.args), dict(bound.kwargs)


# ----------------------------------------------------------------------------------------
# Claims owned by the framework's task/message id
# ----------------------------------------------------------------------------------------


def clear_own_failure(
    spec: Spec, args: tuple[Any, ...], kwargs: dict[str, Any], owner: str
) -> None:
    """Drop a failure this very task cached (``idempotency_cache_errors``), so its retry
    runs.

    A cached failure answers *duplicates*; the framework's retry of the same task (the
    same ``owner``) is the same execution, not a duplicate of itself. A store error is
    ignored: the claim that follows meets the same store and applies
    ``on_backend_error``.
    """
    if spec.options.cache_errors is None:
        return
    try:
        key = spec.key(args, kwargs, None)
        backend = spec.backend()
        record = backend.get(key)
        if record is not None and record.state is State.FAILED and record.owner == owner:
            backend.delete(key, token=record.token)
    except BackendError:
        pass

"""What every framework integration shares: prefixed options, dead letters for calls
the framework gave up on, replays, a claim owner per delivery of a message, and worker
checks."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import logging
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from idempotask import config, flow
from idempotask.backends.base import Backend, Record, State
from idempotask.backends.deadletters import DeadLetter
from idempotask.call import adrive, drive
from idempotask.deadletter import DeadLetterQueue, default_queue
from idempotask.deadletter._arguments import bound_arguments, keep_arguments
from idempotask.deadletter._core import (
    NOT_DEAD_LETTERED,
    Hook,
    check_classifier,
    check_hook,
    check_policies,
    fire_letter_hooks,
)
from idempotask.errors import AlreadyInProgress, BackendError, ConfigurationError
from idempotask.flow import Flow, Op, store_op
from idempotask.idempotent import idempotent
from idempotask.taxonomy import Classifier

if TYPE_CHECKING:
    from idempotask.call import Spec

__all__ = [
    "DEAD_LETTER_OPTIONS",
    "DEFAULT_DEAD_LETTER_OPTIONS",
    "IDEMPOTENCY_OPTIONS",
    "NOT_DEAD_LETTERED",
    "DeadLetterOptions",
    "Delivery",
    "Handover",
    "MultiProcessMemoryWarning",
    "arun_delivery",
    "call_key",
    "check_worker_backend",
    "delivery_flow",
    "replay_arguments",
    "run_delivery",
    "split_options",
]

log = logging.getLogger("idempotask")

# @idempotent's options an integration accepts as ``idempotency_<name>``: its keyword
# parameters but ``name`` (the key's name is always the framework's task/actor name).
IDEMPOTENCY_OPTIONS = frozenset(
    name
    for name, parameter in inspect.signature(idempotent).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "name"
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
    groups = (
        ("idempotency_", "idempotency", IDEMPOTENCY_OPTIONS, idem),
        ("dead_letter_", "dead-letter", DEAD_LETTER_OPTIONS, dead),
    )
    for name, value in options.items():
        for prefix, what, known, chosen in groups:
            if name.startswith(prefix):
                option = name.removeprefix(prefix)
                if option not in known:
                    raise ConfigurationError(
                        f"{where}: unknown option {name!r}; {what} options are "
                        + ", ".join(prefix + o for o in sorted(known))
                    )
                chosen[option] = value
                break
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

    def record(
        self,
        name: str,
        error: BaseException,
        target: Callable[..., Any] | inspect.Signature | None,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        key: str | None = None,
        route: str,
        replay_of: str | None,
        queue: DeadLetterQueue | None = None,
    ) -> DeadLetter | None:
        """Record the final failure of task ``name`` and run the letter's hooks (nothing
        when ``dead_letter_enabled=False``).

        The letter keeps the call's arguments bound by name to ``target`` (the task's
        function or signature), defaults applied, through ``dead_letter_redact``: an
        argument the hook changed or removed is kept as a
        :class:`~idempotask.deadletter.Redacted` placeholder, so a replay never sends the
        task a redacted value (the letter waits for a person instead). It keeps none when
        there is no target, the arguments do not bind, or the redact hook failed.

        The letter goes to ``dead_letter_queue``, else ``queue`` (the integration's),
        else the process-wide queue. ``replay_of``: the letter a replayed task belongs
        to, or the task's own id, so that a task recorded twice keeps one letter.
        ``key``: the call's idempotency key (default: :func:`call_key` of ``target``).
        """
        if not self.enabled:
            return None
        arguments = keep_arguments(
            self.redact,
            bound_arguments(target, args, kwargs),
            option="dead_letter_redact",
            name=name,
        )
        letter = (self.queue or queue or default_queue()).record(
            name,
            error,
            arguments=arguments,
            key=call_key(target, args, kwargs) if key is None else key,
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


# @dead_letter's options an integration accepts as ``dead_letter_<name>``.
DEAD_LETTER_OPTIONS = frozenset(field.name for field in dataclasses.fields(DeadLetterOptions))
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
    target: Any,
    arguments: Mapping[str, Any],
    *,
    name: str = "",
    error: type[Exception] = ValueError,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for ``target`` (a function or its signature)
    from arguments a letter stored by name; ``error`` (a ``ValueError`` unless told),
    naming ``name`` (default: the function's qualified name), if it no longer takes some
    of them, or now takes a parameter without a default before arguments that must be
    positional. A positional parameter the letter lacks is passed its default when
    later arguments must be positional. When its signature cannot be
    read, everything goes by keyword."""
    try:
        sig = target if isinstance(target, inspect.Signature) else inspect.signature(target)
    except (TypeError, ValueError):
        return (), dict(arguments)
    who = name or getattr(target, "__qualname__", target)
    unknown = sorted(set(arguments) - set(sig.parameters))
    if unknown:
        raise error(f"{who} no longer takes {', '.join(map(repr, unknown))}; its signature changed")
    ordered = {arg: arguments[arg] for arg in sig.parameters if arg in arguments}
    # A positional parameter the letter lacks (one added since, with a default) ends the
    # positional arguments there: a later positional-only one, and *args' items, would then
    # be sent by keyword. So a gap before them takes the parameter's own default (and an
    # empty *args is left out, not sent as a keyword).
    gap: list[inspect.Parameter] = []
    for param in sig.parameters.values():
        if param.kind in (param.KEYWORD_ONLY, param.VAR_KEYWORD):
            break
        if param.name not in ordered:
            gap.append(param)
        elif gap and (
            param.kind is param.POSITIONAL_ONLY
            or (param.kind is param.VAR_POSITIONAL and ordered[param.name])
        ):
            missing = [p.name for p in gap if p.default is p.empty]
            if missing:
                raise error(
                    f"{who} takes {', '.join(map(repr, missing))} before arguments that must be "
                    "positional, and the letter has no value for it; its signature changed"
                )
            ordered.update((p.name, p.default) for p in gap)
            gap = []
    ordered = {
        arg: ordered[arg]
        for arg, param in sig.parameters.items()
        if arg in ordered and (param.kind is not param.VAR_POSITIONAL or ordered[arg])
    }
    bound = inspect.BoundArguments(sig, ordered)
    return tuple(bound.args), dict(bound.kwargs)


# ----------------------------------------------------------------------------------------
# Deliveries: each run of a message or job claims under an owner of its own
# ----------------------------------------------------------------------------------------
#
# A broker may hand one message to two workers at once: RabbitMQ redelivers an
# unacknowledged message when its consumer's connection drops (or its heartbeat is
# missed) while the worker still runs it, and RQ re-queues a job whose worker's heartbeat
# expired while that worker was only stalled. Were the message id the claim's owner, the
# second delivery would re-take the live first run's claim and run the body beside it.
# So each delivery claims under an owner of its own, "<message id>~<16 hex digits>":
#
# - a delivery never re-takes a claim that another delivery holds;
# - a delivery meeting a claim held by another delivery of its own message waits for that
#   run for as long as it holds the claim: its result, or its lease running out after a
#   crash (on_conflict="raise" raises at once, as for any conflict);
# - a failure cached (cache_errors) by any delivery of its own message never answers it;
# - so a framework retry of a failed attempt (the claim released, or its cached failure
#   dropped) runs at once; one whose previous attempt kept its claim for it
#   (dramatiq.Retry) is handed that claim through a one-use ticket (:class:`Handover`).

_SEP = "~"
_NONCE_HEX = 16
_LONGEST_ID = 200  # owners are stored in 255 characters
_OWN_RUN_PAUSE = 0.2  # between two waits for a run of the same message
_CATCH: tuple[type[BaseException], ...] = (BackendError, AlreadyInProgress)


@dataclass(frozen=True)
class Handover:
    """A claim an attempt kept for the retry it scheduled (``dramatiq.Retry``).

    It travels in the retry's message: ``owner`` is the kept claim's owner, ``ticket``
    names a one-use store record. The first delivery of the retry to take the ticket
    claims under ``owner`` and so re-takes the kept claim at once; a redelivery of that
    same retry finds the ticket taken and claims under an owner of its own.
    """

    owner: str
    ticket: str

    def as_option(self) -> dict[str, str]:
        """The JSON-able form carried in a message."""
        return {"owner": self.owner, "ticket": self.ticket}

    @classmethod
    def from_option(cls, value: Any) -> Handover | None:
        """The handover a message carries, or None (none, or not one of ours)."""
        if not isinstance(value, Mapping):
            return None
        owner, ticket = value.get("owner"), value.get("ticket")
        if isinstance(owner, str) and isinstance(ticket, str) and owner and ticket:
            return cls(owner, ticket)
        return None


class Delivery:
    """One delivery of message (or run of job) ``execution``, with its claim owner.

    ``owner`` is fresh for each delivery; :func:`delivery_flow` replaces it with a
    :class:`Handover`'s owner when this delivery wins the handover's ticket.
    """

    __slots__ = ("_base", "execution", "handover", "owner")

    def __init__(self, execution: str, handover: Handover | None = None) -> None:
        self.execution = execution
        self._base = execution
        if len(execution) > _LONGEST_ID:
            digest = hashlib.blake2b(execution.encode("utf-8", "surrogatepass"), digest_size=16)
            self._base = "h:" + digest.hexdigest()
        self.owner = f"{self._base}{_SEP}{uuid.uuid4().hex[:_NONCE_HEX]}"
        self.handover = handover if handover and self.is_own(handover.owner) else None

    def is_own(self, owner: str) -> bool:
        """Whether ``owner`` is that of a delivery of this same message (or the message
        id itself, as claims made before per-delivery owners carry)."""
        base = self._base
        return owner == base or (
            len(owner) == len(base) + 1 + _NONCE_HEX
            and owner.startswith(base)
            and owner[len(base)] == _SEP
        )


def delivery_flow(
    spec: Spec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    delivery: Delivery,
    key: str | None = None,
) -> Flow[Any]:
    """The idempotent call of ``spec`` for one delivery of a message (see the rules
    above); run it with :func:`run_delivery` or :func:`arun_delivery`. ``key``: the
    message's own key (Celery's header), default the one the arguments give."""
    key = key or spec.key(args, kwargs, None)
    backend = spec.backend()
    if delivery.handover is not None:
        yield from _take_handover(spec, backend, key, delivery, delivery.handover)
    if spec.options.cache_errors is not None:
        yield from _drop_own_failure(backend, key, delivery)
    waiting = False
    while True:
        try:
            return (yield Op(drive, adrive, spec, args, kwargs, None, delivery.owner, key))
        except AlreadyInProgress as exc:
            conflict = exc
        if conflict.key != key or spec.options.on_conflict == "raise":
            raise conflict
        try:
            record: Record | None = yield store_op(backend, "get", key)
        except BackendError:
            raise conflict from None
        if (
            record is not None
            and record.state is State.IN_PROGRESS
            and not delivery.is_own(record.owner)
        ):
            raise conflict  # another message's run: on_conflict's wait is over
        if not waiting:
            waiting = True
            log.info(
                "idempotask: %s: message %s is already running in another delivery; waiting "
                "for that run",
                spec.name,
                delivery.execution,
            )
        yield Op(time.sleep, asyncio.sleep, _OWN_RUN_PAUSE)


def _take_handover(
    spec: Spec, backend: Backend, key: str, delivery: Delivery, handover: Handover
) -> Flow[None]:
    """Claim the handover's ticket; the delivery that gets it claims as the kept claim's
    owner. A store error leaves the delivery its own owner: it then waits for the kept
    claim like a redelivery would, which is safe."""
    # The ticket outlives any redelivery of the retry that could still come.
    ttl = spec.options.ttl or config.settings().default_ttl
    token = uuid.uuid4().hex
    try:
        ticket: Record = yield store_op(
            backend, "claim", f"{key}:handover:{handover.ticket}", token, lease=ttl
        )
    except BackendError:
        return
    if ticket.held_by(token):
        delivery.owner = handover.owner


def _drop_own_failure(backend: Backend, key: str, delivery: Delivery) -> Flow[None]:
    """Drop a failure a delivery of this same message cached (``cache_errors``): it
    answers duplicates, never the message's own retries and redeliveries. A FAILED record
    holds no run, so dropping it cannot start a second one. A store error is ignored: the
    claim that follows meets the same store and applies ``on_backend_error``."""
    try:
        record: Record | None = yield store_op(backend, "get", key)
        if record is not None and record.state is State.FAILED and delivery.is_own(record.owner):
            yield store_op(backend, "delete", key, token=record.token)
    except BackendError:
        return


def run_delivery(
    spec: Spec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    delivery: Delivery,
    key: str | None = None,
) -> Any:
    """Run :func:`delivery_flow` with the sync store and body."""
    return flow.drive(delivery_flow(spec, args, kwargs, delivery, key), _CATCH)


async def arun_delivery(
    spec: Spec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    delivery: Delivery,
) -> Any:
    """Run :func:`delivery_flow` awaiting the async store and body."""
    return await flow.adrive(delivery_flow(spec, args, kwargs, delivery), _CATCH)

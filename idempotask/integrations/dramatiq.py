"""Dramatiq integration: idempotent actors and dead letters, as one broker middleware.

``pip install 'idempotask[dramatiq]'``::

    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    from idempotask.integrations.dramatiq import IdempotencyMiddleware

    broker = RabbitmqBroker(url="amqp://guest:guest@localhost:5672/")
    broker.add_middleware(IdempotencyMiddleware())  # the configured idempotency store
    dramatiq.set_broker(broker)

    @dramatiq.actor(max_retries=3, idempotency_ttl=4 * 3600, dead_letter_critical=True)
    def autoclose(job_id: int, day: str) -> dict: ...

An actor is idempotent when it has an ``idempotency_*`` option, or when its function is
a plain ``@idempotent`` one (``@dramatiq.actor`` over ``@idempotent``); either way the
key's name is the actor name, so an actor keeps its keys whichever way it is decorated.
What happens to duplicates, retries, redeliveries and messages whose retries are
exhausted (dead letters): see :class:`IdempotencyMiddleware`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import multiprocessing
import os
import sys
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

# The AsyncIO middleware's event loop thread, which Dramatiq's own async actors run on
# (``dramatiq.asyncio``, no underscore, but not in Dramatiq's API reference). The async
# actor test in test_dramatiq.py runs through it.
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.errors import ActorNotFound, Retry
from dramatiq.middleware import Middleware, MiddlewareError

from idempotask import config
from idempotask.backends.base import Backend, State
from idempotask.backends.deadletters import DeadLetter
from idempotask.call import Spec, adrive, drive, register_cancellation
from idempotask.deadletter import DeadLetterQueue, ReplayError, register_route
from idempotask.errors import ConfigurationError
from idempotask.idempotent import idempotent
from idempotask.integrations._common import (
    DEAD_LETTER_OPTIONS,
    DEFAULT_DEAD_LETTER_OPTIONS,
    IDEMPOTENCY_OPTIONS,
    NOT_DEAD_LETTERED,
    DeadLetterOptions,
    Delivery,
    Handover,
    arun_delivery,
    check_worker_backend,
    replay_arguments,
    run_delivery,
    split_options,
)
from idempotask.keys import claim_name

if TYPE_CHECKING:
    from dramatiq.actor import Actor
    from dramatiq.broker import Broker, MessageProxy
    from dramatiq.message import Message
    from dramatiq.worker import Worker

__all__ = ["HANDOVER_OPTION", "LETTER_OPTION", "ROUTE", "ActorOptionError", "IdempotencyMiddleware"]

log = logging.getLogger("idempotask")

ROUTE = "dramatiq"
"""The dead-letter route of Dramatiq messages."""
LETTER_OPTION = "idempotask_dead_letter"
"""The message option naming the dead letter a replayed message belongs to."""
HANDOVER_OPTION = "idempotask_handover"
"""The message option with which an attempt that raised ``dramatiq.Retry`` hands its
kept claim to its retry."""

_PREPARED = "_idempotask_prepared"

# A body raising dramatiq.Retry asks for its message to run again: the claim stays with
# the message (its owner) until the retry re-takes it, so a duplicate waits meanwhile.
# Time limits and shutdown raise BaseExceptions, which release the claim already.
register_cancellation(Retry, keep_claim=True)


class ActorOptionError(ConfigurationError, MiddlewareError):
    """An actor's ``idempotency_*`` / ``dead_letter_*`` options are wrong.

    A :class:`~idempotask.errors.ConfigurationError` that is also a Dramatiq
    ``MiddlewareError``, because Dramatiq lets only those out of its ``before_*`` hooks:
    the actor's declaration fails with it instead of a log line.
    """


# ----------------------------------------------------------------------------------------
# Per-thread state: the message a worker thread is processing, and how it failed.
# Dramatiq runs before_process_message, the actor and after_process_message, then the
# ack/nack hooks, all in the worker thread that took the message.
# ----------------------------------------------------------------------------------------

_local = threading.local()


# ----------------------------------------------------------------------------------------
# Replays
# ----------------------------------------------------------------------------------------

# Brokers with this middleware in this process; a replay looks its actor up in them.
_brokers: weakref.WeakSet[Broker] = weakref.WeakSet()
_brokers_lock = threading.Lock()


def _replay(letter: DeadLetter, arguments: dict[str, Any]) -> Any:
    with _brokers_lock:
        brokers = list(_brokers)
    for broker in brokers:
        try:
            actor = _get_actor(broker, letter.function)
        except ActorNotFound:
            continue
        args, kwargs = replay_arguments(actor.fn, arguments)
        options: dict[str, Any] = {LETTER_OPTION: letter.id}
        return actor.send_with_options(args=args, kwargs=kwargs, **options)
    # ReplayError: the processor leaves the letter for a process that knows the actor.
    raise ReplayError(
        f"no broker with IdempotencyMiddleware in this process declares actor "
        f"{letter.function!r}; import the module that defines it"
    )


def _get_actor(broker: Broker, name: str) -> Any:
    # Broker.get_actor is untyped before Dramatiq 2: the answer is Any on every release.
    found: Any = broker
    return found.get_actor(name)


def _remember_broker(broker: Broker) -> None:
    with _brokers_lock:
        first = not _brokers
        _brokers.add(broker)
    if first:
        register_route(ROUTE, _replay)


# ----------------------------------------------------------------------------------------
# Running an actor: the message id owns the claim
# ----------------------------------------------------------------------------------------


def _owned(spec: Spec, is_async: bool) -> Callable[..., Any]:
    """The actor function: the idempotent call, as one delivery of the current message
    (see ``_common.Delivery``). A body raising ``dramatiq.Retry`` keeps its claim: the
    Retries middleware re-enqueues this very message object, so the handover put in its
    options reaches the retry, which re-takes the claim at once."""

    def call(*args: Any, **kwargs: Any) -> Any:
        message: Any = getattr(_local, "message", None)
        if message is None or message.actor_name != spec.name:
            # Called directly (``actor(...)``, maybe from another actor's body), not as
            # the message a worker is processing.
            if not is_async:
                return drive(spec, args, kwargs)
            return _loop_thread(spec).run_coroutine(adrive(spec, args, kwargs))
        options = message.options
        handover = Handover.from_option(options.pop(HANDOVER_OPTION, None))
        delivery = Delivery(str(message.message_id), handover)
        try:
            if not is_async:
                return run_delivery(spec, args, kwargs, delivery)
            return _loop_thread(spec).run_coroutine(arun_delivery(spec, args, kwargs, delivery))
        except Retry:
            options[HANDOVER_OPTION] = Handover(delivery.owner, uuid.uuid4().hex).as_option()
            raise

    functools.update_wrapper(call, spec.func)  # __wrapped__: the signature replays bind to
    c: Any = call
    c.key_for = lambda *args, **kwargs: spec.key(args, kwargs, None)
    c.__idempotask_spec__ = spec
    return call


def _loop_thread(spec: Spec) -> Any:
    loop_thread = get_event_loop_thread()
    if loop_thread is None:
        raise RuntimeError(
            f"actor {spec.name} is async: add Dramatiq's AsyncIO middleware to the broker"
        )
    return loop_thread


def _unwrap(fn: Any) -> tuple[Any, bool]:
    """(the function the actor was declared with, whether it is async).

    Dramatiq wraps an ``async def`` actor function in a sync ``async_to_sync`` shim made
    with ``functools.wraps``, so its ``__wrapped__`` is the coroutine function; Dramatiq
    offers no other way to get it back. test_framework_hooks.py fails if that changes.
    """
    inner = getattr(fn, "__wrapped__", None)
    if not inspect.iscoroutinefunction(fn) and inspect.iscoroutinefunction(inner):
        return inner, True
    return fn, inspect.iscoroutinefunction(fn)


def _cli_processes() -> int:
    """How many worker processes the ``dramatiq`` command runs (1 in-process).

    A worker process started by the CLI inherits its command line; ``--processes``
    defaults to the CPU count there.
    """
    if multiprocessing.parent_process() is None:
        return 1
    argv = sys.argv
    for i, arg in enumerate(argv):
        value = None
        if arg in ("-p", "--processes") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--processes="):
            value = arg.partition("=")[2]
        if value is not None:
            try:
                return max(int(value), 1)
            except ValueError:
                break
    return os.cpu_count() or 1


class IdempotencyMiddleware(Middleware):
    """Idempotent actors and dead letters for a Dramatiq broker.

    ::

        broker.add_middleware(IdempotencyMiddleware())

        @dramatiq.actor(max_retries=3, store_results=True, idempotency_ttl=3600)
        def charge(order: int, card: str) -> str: ...

    ``backend``: the idempotency store for actors that do not name one with
    ``idempotency_backend`` (default: the configured one, read at call time).
    ``dead_letters``: record exhausted messages (default True; per actor
    ``dead_letter_enabled=False``). ``dead_letter_queue``: the
    :class:`~idempotask.deadletter.DeadLetterQueue` (default: the process-wide one).

    Actor options: the prefixed ones of :mod:`idempotask.integrations`. Dramatiq itself
    refuses names no middleware declares; a bad value is an :class:`ActorOptionError`
    (a ``ConfigurationError``) when the actor is declared.

    - **Duplicates** run no body; the actor returns the stored result (stored by the
      Results middleware for the duplicate's message as well) and the message is acked.
      A duplicate arriving while the first runs waits (``idempotency_on_conflict``,
      ``idempotency_wait_timeout``); ``AlreadyInProgress`` is retried by Retries like
      any failure and never dead-lettered.
    - **Retries** (the Retries middleware): a failure releases the claim (or is cached
      with ``idempotency_cache_errors`` -- for duplicates only, never for the message's
      own retries), so the retry runs at once. A body raising ``dramatiq.Retry`` keeps
      its claim and hands it to its retry (the ``idempotask_handover`` message option),
      which re-takes it at once; a duplicate arriving meanwhile waits. When Retries gives
      up instead (retries used up), the kept claim is released as the message is
      rejected.
    - **Redeliveries** of a message whose first delivery still runs (RabbitMQ after a
      dropped connection or missed heartbeats, a stalled worker) never re-take that
      run's claim: each delivery has an owner of its own. The redelivery waits for that
      run for as long as it holds its claim, whatever ``idempotency_wait_timeout`` says,
      and returns its result.
    - **Time limits and shutdown** interrupt the body with a ``BaseException``: the
      claim is released, never cached.
    - **A dead worker** (SIGKILL, OOM): its claim expires after the lease; the
      redelivered message, like any other message for the same call, runs once the lease
      has run out.
    - **Exhausted retries** (any message Dramatiq rejects with an exception: retries
      used up, ``max_retries=0``, an exception listed in ``throws``): the message is
      recorded as a dead letter (``function`` = the actor name, ``route="dramatiq"``,
      traceback, bound arguments through ``dead_letter_redact``, the key) under its
      message id. ``DeadLetterQueue.process_due()`` in any process whose broker has this
      middleware replays it with ``actor.send_with_options`` (the actor's retry options
      apply to the replay); a replayed message that fails for good updates its letter.
    - The in-memory store is warned about (``MultiProcessMemoryWarning``) when the worker
      runs several processes, where it cannot deduplicate.
    """

    def __init__(
        self,
        backend: Backend | str | None = None,
        *,
        dead_letters: bool = True,
        dead_letter_queue: DeadLetterQueue | None = None,
    ) -> None:
        self._backend = config.check_backend(backend)
        if dead_letter_queue is not None and not isinstance(dead_letter_queue, DeadLetterQueue):
            raise ConfigurationError(
                f"dead_letter_queue: expected a DeadLetterQueue, got {dead_letter_queue!r}"
            )
        self._dead_letters = bool(dead_letters)
        self._queue = dead_letter_queue
        self._options: dict[str, DeadLetterOptions] = {}
        self._specs: dict[str, Spec] = {}
        self._lock = threading.Lock()

    @property
    def actor_options(self) -> set[str]:
        """The option names actors may use with this middleware."""
        return {f"idempotency_{o}" for o in IDEMPOTENCY_OPTIONS} | {
            f"dead_letter_{o}" for o in DEAD_LETTER_OPTIONS
        }

    # -- declaring actors ---------------------------------------------------------------

    def before_declare_actor(self, broker: Broker, actor: Actor[Any, Any]) -> None:
        self._prepare(broker, actor)

    def after_declare_actor(self, broker: Broker, actor: Actor[Any, Any]) -> None:
        # add_middleware() calls this for actors declared before the middleware was added
        # (Dramatiq 1.x passes the actor's name there).
        declared: Any = actor
        if isinstance(declared, str):
            declared = _get_actor(broker, declared)
        self._prepare(broker, declared)

    def _prepare(self, broker: Broker, actor: Actor[Any, Any]) -> None:
        if getattr(actor, _PREPARED, None) is self:
            return
        where = f"actor {actor.actor_name!r}"
        try:
            idem, dead, _ = split_options(actor.options, where=where)
            options = DeadLetterOptions.from_options(dead, where)
            spec = self._spec_for(actor, idem, where)
        except ActorOptionError:
            raise
        except ConfigurationError as exc:
            raise ActorOptionError(str(exc)) from exc
        _remember_broker(broker)
        with self._lock:
            self._options[actor.actor_name] = options
            if spec is not None:
                self._specs[actor.actor_name] = spec[0]
        if spec is not None:
            # Dramatiq's worker runs a message as ``actor(*args, **kwargs)``, which calls
            # ``actor.fn``. No middleware hook runs *around* that call, and a duplicate
            # must return the stored result as the actor's own (the Results middleware
            # stores it), so the middleware replaces ``fn`` with the idempotent call.
            # The documented alternative, ``@dramatiq.actor(actor_class=...)``, would
            # make every actor opt in at its declaration instead of through the broker's
            # middleware. test_framework_hooks.py fails if the worker stops calling fn.
            actor.fn = _owned(*spec)
        setattr(actor, _PREPARED, self)

    def _spec_for(
        self, actor: Actor[Any, Any], idem: dict[str, Any], where: str
    ) -> tuple[Spec, bool] | None:
        raw, is_async = _unwrap(actor.fn)
        if hasattr(raw, "__idempotask_dead_letter__"):
            raise ConfigurationError(
                f"{where}: @dead_letter would record every failed attempt, retries included; "
                "use dead_letter_* actor options (recorded when Dramatiq's retries are "
                "exhausted) instead"
            )
        plain: Spec | None = getattr(raw, "__idempotask_spec__", None)
        if plain is not None:
            if idem:
                raise ConfigurationError(
                    f"{where}: the function is already @idempotent; give its options there "
                    "or as idempotency_* actor options, not both"
                )
            # The key's name is the actor name whichever way the actor is decorated, so
            # switching styles keeps the keys.
            opts = plain.options
            if opts.name != actor.actor_name:
                func = plain.func
                claim_name(actor.actor_name, f"{func.__module__}.{func.__qualname__}")
                opts = dataclasses.replace(opts, name=actor.actor_name)
            if opts.backend is None and self._backend is not None:
                opts = dataclasses.replace(opts, backend=self._backend)
            return Spec(plain.func, opts, plain.keyer), is_async
        if not idem:
            return None
        if self._backend is not None:
            idem.setdefault("backend", self._backend)
        wrapped: Any = idempotent(name=actor.actor_name, **idem)(raw)
        return wrapped.__idempotask_spec__, is_async

    # -- messages -------------------------------------------------------------------------

    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int) -> None:
        # Dramatiq checks actor options, not message options: without this a per-message
        # idempotency_ttl would be silently ignored.
        for name in message.options:
            if name.startswith(("idempotency_", "dead_letter_")):
                raise ActorOptionError(
                    f"message to {message.actor_name!r}: {name!r} is an actor option; "
                    "idempotency and dead-letter options cannot be set per message"
                )

    # -- the worker -----------------------------------------------------------------------

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        from idempotask.backends.memory import MemoryBackend

        with self._lock:
            specs = list(self._specs.values())
        for spec in specs:
            backend = spec.backend()
            if isinstance(backend, MemoryBackend):
                check_worker_backend(backend, framework="dramatiq", processes=_cli_processes())
                return

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        _local.message = message
        _local.failure = None

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any | None = None,
        exception: BaseException | None = None,
    ) -> None:
        _local.message = None
        # Whether the message is rejected for good is known only after the Retries
        # middleware has run (it may run after this hook): keep the failure until nack.
        _local.failure = None if exception is None else (message.message_id, exception)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        _local.message = None
        _local.failure = None

    def after_ack(self, broker: Broker, message: MessageProxy) -> None:
        _local.failure = None

    def before_nack(self, broker: Broker, message: MessageProxy) -> None:
        failure = getattr(_local, "failure", None)
        _local.failure = None
        if failure is None or failure[0] != message.message_id:
            return
        if isinstance(failure[1], Retry):
            self._release_kept_claim(message)
        if not self._dead_letters:
            return
        try:
            self._record(broker, message, failure[1])
        except Exception:
            log.exception(
                "idempotask: could not record the failure of message %s (%s)",
                message.message_id,
                message.actor_name,
            )

    def _release_kept_claim(self, message: MessageProxy) -> None:
        """The Retries middleware gave up on a message whose body raised
        ``dramatiq.Retry``: release the claim that attempt kept for its retry, so a
        duplicate runs at once instead of waiting out the claim's lease. Only that claim:
        the record must still be in progress under the owner the handover names."""
        handover = Handover.from_option(message.options.get(HANDOVER_OPTION))
        with self._lock:
            spec = self._specs.get(str(message.actor_name))
        if handover is None or spec is None:
            return
        try:
            key = spec.key(tuple(message.args), dict(message.kwargs), None)
            backend = spec.backend()
            record = backend.get(key)
            if (
                record is not None
                and record.state is State.IN_PROGRESS
                and record.owner == handover.owner
            ):
                backend.delete(key, token=record.token)
        except Exception:
            log.warning(
                "idempotask: could not release the claim message %s (%s) kept for a retry "
                "that will not run; it runs out with its lease",
                message.message_id,
                message.actor_name,
                exc_info=True,
            )

    def _record(self, broker: Broker, message: MessageProxy, error: BaseException) -> None:
        if isinstance(error, (*NOT_DEAD_LETTERED, MiddlewareError)):
            return
        name = str(message.actor_name)
        with self._lock:
            options = self._options.get(name, DEFAULT_DEAD_LETTER_OPTIONS)
        try:
            fn: Any = _get_actor(broker, name).fn
        except ActorNotFound:
            fn = None
        args, kwargs = tuple(message.args), dict(message.kwargs)
        # Recorded under the message id, so a message recorded twice (redelivered after
        # its worker died between recording and rejecting it) keeps one letter; a replay
        # names its letter in its options.
        options.record(
            name,
            error,
            fn,
            args,
            kwargs,
            route=ROUTE,
            replay_of=str(message.options.get(LETTER_OPTION) or message.message_id),
            queue=self._queue,
        )

"""Celery: idempotent tasks whose failures go to the dead-letter queue.

``pip install 'idempotask[celery]'``, then give a task the :class:`IdempotentTask` base::

    from celery import Celery

    import idempotask
    from idempotask.integrations.celery import IdempotentTask

    app = Celery("billing", broker="redis://localhost:6379/1", backend="redis://localhost:6379/2")
    idempotask.configure(backend="redis://localhost:6379/0")  # shared by every worker


    @app.task(base=IdempotentTask, bind=True, autoretry_for=(ConnectionError,), max_retries=3,
              idempotency_ttl=4 * 3600)
    def charge(self, order_id: int, cents: int) -> dict:
        receipt = payments.charge(order_id, cents)  # your payment client
        return {"order_id": order_id, "receipt": receipt}


    charge.delay(7, 500)
    charge.delay(order_id=7, cents=500).get()  # the same call: runs once, same result

What the base class does:

- **The key** is computed by the producer (``apply_async``, ``delay``, signatures,
  chains) from the arguments bound to the task's signature, ``self`` excluded, and
  travels in the ``idempotask_key`` message header. The worker uses that header, and
  computes the same key itself when a message has none (``send_task``, beat). Its name is
  the Celery task name.
- **Each delivery of a task id owns the claim it takes**, and hands it to the task's
  own retry (``self.retry()``, ``autoretry_for``) in the retry's ``idempotask_handover``
  header, so the retry re-takes it while a second delivery of the same task id (a
  producer re-sending with its own ``task_id``) waits for the first's run instead of
  running beside it. On ``Retry`` the claim is *kept* and its lease extended
  by the retry's countdown, so a duplicate arriving before the retry runs waits instead
  of running the body. A message the broker *redelivers* (``acks_late`` after a worker
  died, a visibility timeout) is such a second delivery: it waits for the first's run
  for as long as that run holds its claim (past ``idempotency_wait_timeout``), so it
  returns a live run's result, or runs once after a dead worker's lease ran out.
- **Duplicates** return the stored result, so ``result.get()`` of every copy equals the
  first run's value. ``idempotency_dedupe_enqueue=True`` goes further: a send while the
  same call is already enqueued or done returns the original ``AsyncResult`` without
  sending anything. (The marker lives for the ttl, capped by Celery's ``result_expires``;
  if the message is lost meanwhile, ``charge.forget(7, 500)`` lets a send go out again.)
- **Failures** go to the dead-letter queue once Celery's retries are exhausted (or when
  the task has none), with the task name, the bound arguments and the traceback, under
  the route ``"celery"``: :meth:`~idempotask.DeadLetterQueue.process_due` re-enqueues
  them through ``apply_async`` and a new failure updates the same letter.
- A hard time limit (``TimeLimitExceeded``; the pool kills the process) is a final
  failure too: dead-lettered from the worker's main process, on Celery releases that
  run the task's ``on_failure`` for it.
- ``SoftTimeLimitExceeded``, ``Ignore`` and ``Reject`` release the claim and are never
  cached as errors; ``Retry`` keeps it for the task's own retry (see
  :func:`idempotask.register_cancellation`).

Plain ``@idempotent`` stacked under ``@app.task`` works too (with ``bind=True``, pass
``exclude_args=("self",)``; with ``name=`` equal to the task name the keys are the same):
the worker computes the key, there is no owner (a ``self.retry()`` releases the claim and
the retry claims it afresh), no enqueue dedupe and no dead-lettering on exhaustion.

Options are task options: the prefixed ones of :mod:`idempotask.integrations`
(``idempotency_ttl``, ``dead_letter_redact``...) and ``idempotency_dedupe_enqueue``.
"""

from __future__ import annotations

import datetime as _dt
import functools
import inspect
import logging
import os
import threading
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from idempotask import config
from idempotask.backends.base import State
from idempotask.backends.deadletters import DeadLetter
from idempotask.call import Spec, drive, register_cancellation
from idempotask.deadletter import ReplayError, register_route
from idempotask.errors import (
    BackendError,
    ConfigurationError,
    MissingDependencyError,
)
from idempotask.idempotent import idempotent
from idempotask.integrations._common import (
    NOT_DEAD_LETTERED,
    DeadLetterOptions,
    Delivery,
    Handover,
    check_worker_backend,
    replay_arguments,
    run_delivery,
    split_options,
)
from idempotask.lease import Lease, current_lease

try:
    import celery  # type: ignore[import-untyped]
    from celery import signals
    from celery.exceptions import (  # type: ignore[import-untyped]
        Ignore,
        Reject,
        Retry,
        SoftTimeLimitExceeded,
        TimeLimitExceeded,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        "idempotask.integrations.celery needs Celery: pip install 'idempotask[celery]'"
    ) from exc

__all__ = ["HANDOVER_HEADER", "KEY_HEADER", "REPLAY_HEADER", "ROUTE", "IdempotentTask"]

log = logging.getLogger("idempotask")

KEY_HEADER = "idempotask_key"
"""Message header carrying the producer's idempotency key."""
REPLAY_HEADER = "idempotask_replay_of"
"""Message header carrying the id of the dead letter a message replays."""
HANDOVER_HEADER = "idempotask_handover"
"""Message header with which an attempt that raised ``Retry`` hands its kept claim to
its retry (see ``_common.Handover``)."""
ROUTE = "celery"
"""The dead-letter route of Celery tasks; :meth:`DeadLetterQueue.process_due` replays
letters on it through ``apply_async`` (``send_task`` for tasks this process lacks)."""

_ENQUEUED_SUFFIX = ":enqueued"
_OWN_OPTIONS = ("idempotency_dedupe_enqueue",)
_PREFIXES = ("idempotency_", "dead_letter_")

# A time limit stops the body from outside and Ignore/Reject tell the worker not to
# record an outcome: none is a result of the call, so none may be cached. Retry means
# "this execution continues in a retry": the claim stays with the task id.
register_cancellation(SoftTimeLimitExceeded)
register_cancellation(Ignore)
register_cancellation(Reject)
register_cancellation(Retry, keep_claim=True)

# Not failures of the task's work: never dead-lettered (a duplicate that gave up
# waiting, a misused explicit key, Celery's own control flow).
_NOT_DEAD_LETTERED: tuple[type[BaseException], ...] = (*NOT_DEAD_LETTERED, Retry, Ignore, Reject)


# ----------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------


def _class_options(cls: type) -> dict[str, Any]:
    """The prefixed options of a task class, subclasses overriding their bases."""
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if name.startswith(_PREFIXES):
                found[name] = value
    return found


def _split(cls: type) -> tuple[dict[str, Any], DeadLetterOptions | None, bool]:
    """(``@idempotent`` options, dead-letter options or None when off, dedupe_enqueue)."""
    where = f"task {getattr(cls, 'name', None) or cls.__qualname__}"
    options = _class_options(cls)
    dedupe = options.pop("idempotency_dedupe_enqueue", False)
    if not isinstance(dedupe, bool):
        raise ConfigurationError(
            f"{where}: idempotency_dedupe_enqueue: expected True or False, got {dedupe!r}"
        )
    try:
        idem, dead, _ = split_options(options, where=where)
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"{exc}; Celery tasks also take {', '.join(_OWN_OPTIONS)}"
        ) from None
    enabled = dead.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigurationError(
            f"{where}: dead_letter_enabled: expected True or False, got {enabled!r}"
        )
    letters = DeadLetterOptions.from_options(dead, where)
    return idem, (letters if letters.enabled else None), dedupe


@dataclass(frozen=True)
class _Binding:
    """What one task needs per call, built once per process on first use."""

    function: Any  # the @idempotent function wrapping Task.__call__
    spec: Spec
    signature: inspect.Signature
    dead_letters: DeadLetterOptions | None
    dedupe_enqueue: bool


class _Call:
    """The running call's lease, seen from outside the body once it has ended, and its
    delivery (None for an eager call), whose claim a retry sent from the body is
    handed."""

    __slots__ = ("delivery", "lease")

    def __init__(self, delivery: Delivery | None) -> None:
        self.lease: Lease | None = None
        self.delivery = delivery


_calls: ContextVar[_Call | None] = ContextVar("idempotask_celery_call", default=None)
_bind_lock = threading.Lock()


def _next_call_is_celerys(cls: type) -> bool:
    """Whether the first ``__call__`` after IdempotentTask in ``cls``'s MRO is
    ``celery.Task``'s own."""
    mro = cls.__mro__
    for klass in mro[mro.index(IdempotentTask) + 1 :]:
        if "__call__" in vars(klass):
            return klass is celery.Task
    return False


def _bind(task: Any) -> _Binding:
    idem, letters, dedupe = _split(type(task))
    # The key and the replayed arguments follow the task's own signature, ``self``
    # excluded (``run`` is a bound method when bind=True). autoretry_for replaces ``run``
    # by a ``(*args, **kwargs)`` wrapper made with ``functools.wraps`` semantics
    # (``vine.utils.wraps``), whose ``__wrapped__`` is the original: inspect.signature
    # follows it, so the private ``task._orig_run`` is not needed. A test in the version
    # matrix (test_celery.py) fails if an autoretry task's run stops showing its signature.
    run = task.run
    celerys_own = _next_call_is_celerys(type(task))

    def body(*args: Any, **kwargs: Any) -> Any:
        call = _calls.get()
        if call is None:
            # A direct call (``charge(7, 500)``): the next __call__ in the MRO pushes a
            # request and runs ``run``, as for any Celery task called directly.
            return super(IdempotentTask, task).__call__(*args, **kwargs)
        call.lease = current_lease()
        if celerys_own:
            # Celery's tracer (worker or eager) pushed this task and its request before
            # calling __call__, and calls ``run`` itself for tasks without a __call__ of
            # their own. Celery's Task.__call__ would push a second request -- blank
            # before Celery 5.5, hiding the message's id, retries and delivery info from
            # the body and breaking ``self.retry()`` -- so run ``run`` as the tracer does.
            return task.run(*args, **kwargs)
        # A user's task base between IdempotentTask and celery.Task has its own say.
        return super(IdempotentTask, task).__call__(*args, **kwargs)

    functools.update_wrapper(body, run)
    function: Any = idempotent(name=task.name, **idem)(body)
    return _Binding(
        function=function,
        spec=function.__idempotask_spec__,
        signature=inspect.signature(run),
        dead_letters=letters,
        dedupe_enqueue=dedupe,
    )


# ----------------------------------------------------------------------------------------
# The task base class
# ----------------------------------------------------------------------------------------


class IdempotentTask(celery.Task):  # type: ignore[misc]
    """A Celery task base: the same logical call runs once, duplicates get its result,
    and failures that exhaust Celery's retries are dead-lettered.

    ::

        @app.task(base=IdempotentTask, bind=True, max_retries=3, idempotency_ttl=3600,
                  dead_letter_redact=lambda a: {**a, "card": "<redacted>"})
        def charge(self, order_id: int, card: str) -> str:
            try:
                return payments.charge(order_id, card)  # your payment client
            except ConnectionError as exc:
                raise self.retry(exc=exc, countdown=30)  # re-takes this task's claim

        charge.key_for(7, "4242...")  # the store key, as the producer computes it
        charge.forget(7, "4242...")  # drop the stored result (and enqueue marker)

    See the module documentation for the semantics and options.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Refuse a misspelt option where the task is defined, not at its first call.
        _split(cls)

    # -- helpers ------------------------------------------------------------------------

    def _idempotask(self) -> _Binding:
        binding: _Binding | None = self.__dict__.get("_idempotask_binding")
        if binding is None:
            with _bind_lock:
                binding = self.__dict__.get("_idempotask_binding")
                if binding is None:
                    binding = self.__dict__["_idempotask_binding"] = _bind(self)
        return binding

    def key_for(self, *args: Any, **kwargs: Any) -> str:
        """The store key of this call, as the producer puts it in the message header."""
        return str(self._idempotask().function.key_for(*args, **kwargs))

    def forget(self, *args: Any, **kwargs: Any) -> bool:
        """Drop this call's stored result and enqueue marker, so it runs again."""
        binding = self._idempotask()
        key = self.key_for(*args, **kwargs)
        binding.spec.backend().delete(key + _ENQUEUED_SUFFIX)
        return bool(binding.function.forget_key(key))

    # -- producer side --------------------------------------------------------------------

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: Any = None,
        **options: Any,
    ) -> Any:
        """Send the task with its idempotency key in the ``idempotask_key`` header.

        A retry's message keeps the header of the message it retries, so the key stays
        the same even when ``self.retry(args=...)`` changes the arguments. With
        ``idempotency_dedupe_enqueue=True``, a call already enqueued or done is not sent
        again: the original task's ``AsyncResult`` is returned.
        """
        headers = dict(options.get("headers") or {})
        if not headers.get(KEY_HEADER):
            headers[KEY_HEADER] = self.key_for(*(args or ()), **(kwargs or {}))
        # A retry sent from the running attempt's body (self.retry(), autoretry_for)
        # carries a one-use handover of that attempt's claim; no other message does.
        headers.pop(HANDOVER_HEADER, None)
        call = _calls.get()
        if (
            options.get("retries")
            and call is not None
            and call.delivery is not None
            and call.delivery.execution == task_id
        ):
            handover = Handover(call.delivery.owner, uuid.uuid4().hex)
            headers[HANDOVER_HEADER] = handover.as_option()
        options["headers"] = headers
        binding = self._idempotask()
        first_send = not options.get("retries") and REPLAY_HEADER not in headers
        if not (binding.dedupe_enqueue and first_send):
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        task_id = task_id or str(uuid.uuid4())
        marker = headers[KEY_HEADER] + _ENQUEUED_SUFFIX
        token = uuid.uuid4().hex
        backend = binding.spec.backend()
        # The marker is a claim of its own key, owned by the task id and expiring with
        # the dedupe window: one atomic step decides which send goes out.
        record = backend.claim(marker, token, lease=self._dedupe_window(binding), owner=task_id)
        if not record.held_by(token) and record.state is State.IN_PROGRESS and record.owner:
            return self.AsyncResult(record.owner)
        try:
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        except BaseException:
            backend.delete(marker, token=token)  # nothing was sent: later sends must go out
            raise

    def _dedupe_window(self, binding: _Binding) -> float:
        """How long a send is remembered: the ttl, capped by the result expiry (past it,
        the original ``AsyncResult`` could no longer answer)."""
        ttl = binding.spec.options.ttl or config.settings().default_ttl
        expires = self.app.conf.result_expires
        if isinstance(expires, _dt.timedelta):
            expires = expires.total_seconds()
        if isinstance(expires, (int, float)) and expires > 0:
            ttl = min(ttl, float(expires))
        return float(ttl)

    # -- worker side ----------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        binding = self._idempotask()
        request = self.request
        if request.called_directly:
            # A plain function call (``charge(7, 500)``, maybe from another task's body,
            # whose call this is not): idempotent, nothing else.
            direct = _calls.set(None)
            try:
                return binding.function(*args, **kwargs)
            finally:
                _calls.reset(direct)
        key = _header_key(request, binding.spec)
        owner = str(request.id or "")
        delivery = None
        if owner and not request.is_eager:
            # One message may be delivered twice: redelivered while its first delivery
            # still runs (a visibility timeout, a dropped connection), or sent twice with
            # one task id (a producer re-sending with its own task_id, a publish retry).
            # Each delivery claims under an owner of its own, waits for a run of its
            # own message for as long as that run holds the claim, and a retry re-takes
            # its attempt's claim through the handover that attempt put in its message.
            handover = _header_value(request, HANDOVER_HEADER)
            delivery = Delivery(owner, Handover.from_option(handover))
        call = _Call(delivery)
        reset = _calls.set(call)
        try:
            if delivery is not None:
                return run_delivery(binding.spec, args, kwargs, delivery, key)
            return drive(binding.spec, args, kwargs, None, owner, key)
        except Retry as exc:
            if owner:  # without an owner the core released the claim: nothing to hold
                _hold_for_retry(binding, call.lease, exc)
            raise
        except Exception as exc:
            if not isinstance(exc, _NOT_DEAD_LETTERED):
                # Retries are exhausted (autoretry_for and self.retry() raise Retry while
                # any are left): the failure is final.
                _final_failure(self, binding, request, exc, args, kwargs, key)
            raise
        finally:
            _calls.reset(reset)

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Record a hard time limit as a final failure.

        The pool kills the process that ran the body, so ``__call__`` never sees it; the
        worker's main process calls this instead (Celery releases that run the task's
        failure hooks for a hard time limit). A message the worker re-queues after its
        time limit (``acks_late`` without ``acks_on_timeout``) runs again: not final.
        """
        super().on_failure(exc, task_id, args, kwargs, einfo)
        if not isinstance(exc, TimeLimitExceeded) or self.request.id == task_id:
            return  # a failure the body's own call saw (and recorded) in __call__
        if self.acks_late and not getattr(self, "acks_on_timeout", True):
            return
        request = SimpleNamespace(id=task_id, headers={})
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        _final_failure(self, self._idempotask(), request, exc, args, kwargs, None)


def _header_value(request: Any, name: str) -> Any:
    # Protocol 2 merges custom headers into the request; eager calls keep them in
    # ``request.headers``.
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def _header(request: Any, name: str) -> str | None:
    value = _header_value(request, name)
    return value if isinstance(value, str) and value else None


def _header_key(request: Any, spec: Spec) -> str | None:
    """The producer's key, if the message has one this worker agrees with.

    A key of another namespace or name (a producer configured differently, the old name
    during a rename) is ignored: the worker's own key is the one ``previous_names`` and
    the configuration govern.
    """
    key = _header(request, KEY_HEADER)
    if key is None:
        return None
    if not key.startswith(f"{config.settings().namespace}:{spec.name}:"):
        log.warning(
            "idempotask: %s received key %s for another namespace or name; using its own",
            spec.name,
            key,
        )
        return None
    return key


def _lease_seconds(spec: Spec) -> float:
    return spec.options.lease or config.settings().default_lease


def _retry_delay(exc: Any) -> float:
    when = getattr(exc, "when", None)
    if isinstance(when, _dt.datetime):
        return max((when - _dt.datetime.now(when.tzinfo)).total_seconds(), 0.0)
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        return max(float(when), 0.0)
    return 0.0


def _hold_for_retry(binding: _Binding, held: Lease | None, exc: Any) -> None:
    """Keep the claim until the scheduled retry can re-take it.

    The core left the claim with its owner (the task id); its lease would run out after
    one lease, possibly before a retry with a long countdown runs. Extend it by the
    countdown. Compare-and-set on the token: if the retry already re-took the claim,
    this changes nothing.
    """
    if held is None:
        return  # unprotected (fail-open) or released: nothing to hold
    seconds = _retry_delay(exc) + _lease_seconds(binding.spec)
    try:
        held.backend.renew(held.key, held.token, lease=seconds)
    except BackendError as error:
        log.warning(
            "idempotask: could not hold %s for the retry of %s (%s); a duplicate may run it "
            "once the lease runs out",
            held.key,
            binding.spec.name,
            error,
        )


def _final_failure(
    task: Any,
    binding: _Binding,
    request: Any,
    error: Exception,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: str | None,
) -> None:
    """Record a final failure; never raises (the task's exception must propagate)."""
    try:
        if key is None:
            key = binding.spec.key(args, kwargs, None)
    except Exception:
        key = ""  # the key itself cannot be built: the letter says why
    if binding.dedupe_enqueue and key:
        _drop_marker(binding, key, str(request.id or ""))
    letters = binding.dead_letters
    if letters is None:
        return
    try:
        letters.record(
            task.name,
            error,
            binding.signature,
            args,
            kwargs,
            key=key,
            route=ROUTE,
            replay_of=_header(request, REPLAY_HEADER),
        )
    except Exception:
        # SpoolError was logged with the letter itself; anything else is a bug of ours.
        log.exception("idempotask: could not record the failure of %s", task.name)


def _drop_marker(binding: _Binding, key: str, task_id: str) -> None:
    """A failed call must be sendable again: drop its enqueue marker if it is ours."""
    marker = key + _ENQUEUED_SUFFIX
    try:
        backend = binding.spec.backend()
        record = backend.get(marker)
        if record is not None and record.owner == task_id:
            backend.delete(marker, token=record.token)
    except BackendError as exc:
        log.warning("idempotask: could not drop the enqueue marker %s: %s", marker, exc)


# ----------------------------------------------------------------------------------------
# Replays and worker checks
# ----------------------------------------------------------------------------------------


def _replay(letter: DeadLetter, arguments: dict[str, Any]) -> None:
    """The ``"celery"`` route: re-enqueue a letter through the current Celery app."""
    app = celery.current_app
    headers = {REPLAY_HEADER: letter.id}
    if letter.key:
        headers[KEY_HEADER] = letter.key  # the replay runs under the original key
    task = app.tasks.get(letter.function)
    if not isinstance(task, IdempotentTask):
        # This process does not import the task: send it by name, by keyword.
        app.send_task(letter.function, kwargs=arguments, headers=headers)
        return
    args, kwargs = replay_arguments(
        task._idempotask().signature, arguments, name=letter.function, error=ReplayError
    )
    task.apply_async(args, kwargs, headers=headers)


register_route(ROUTE, _replay)


def _worker_processes(worker: Any) -> int:
    """How many processes run tasks in this worker (1 unless prefork).

    ``worker`` is ``worker_init``'s sender, the WorkController, which keeps its
    documented ``pool_cls`` and ``concurrency`` arguments (``-P``, ``-c``) as attributes
    of those names; Celery has no other public way to read them. The real prefork test
    (test_celery.py, memory-store warning) fails if they move.
    """
    pool = getattr(worker, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "prefork" not in str(name) and name != "processes":
        return 1
    concurrency = getattr(worker, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0:
        return concurrency
    return os.cpu_count() or 2


def _check_worker(sender: Any = None, **_: Any) -> None:
    """``worker_init``: warn when a prefork worker would use a per-process memory store."""
    processes = _worker_processes(sender)
    if processes <= 1:
        return
    backends = {}
    try:
        default = config.get_backend()
        backends[id(default)] = default
        app = getattr(sender, "app", None) or celery.current_app
        for task in list(app.tasks.values()):
            if isinstance(task, IdempotentTask):
                backend = task._idempotask().spec.backend()
                backends[id(backend)] = backend
    except Exception:
        log.exception("idempotask: could not inspect the Celery worker's idempotency stores")
    for backend in backends.values():
        check_worker_backend(backend, framework="Celery", processes=processes)


signals.worker_init.connect(_check_worker, weak=False)

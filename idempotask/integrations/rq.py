"""RQ integration: idempotent jobs, deduplicating enqueue, dead letters for exhausted jobs.

``pip install 'idempotask[rq]'`` (RQ 2 or later). The pieces work alone or together::

    from rq import Queue, Retry
    from idempotask.integrations.rq import enqueue_once, idempotent_job

    @idempotent_job(idempotency_ttl=4 * 3600, dead_letter_critical=True)
    def autoclose(job_id: int, day: str) -> dict: ...

    job = enqueue_once(queue, autoclose, 7, "2026-01-02", retry=Retry(max=2))

and the worker runs with the dead-letter handler::

    rq worker --exception-handler idempotask.integrations.rq.dead_letter_handler

- :func:`idempotent_job` is ``@idempotent`` with prefixed options (``idempotency_ttl``,
  ``dead_letter_redact``...) that knows the job running it: each run of a job claims
  under an owner of its own (see there). A plain ``@idempotent`` job function works in a
  worker too (duplicates are answered from the store); :class:`IdempotentJob`
  (``rq worker --job-class``) runs it like :func:`idempotent_job` does.
- :func:`enqueue_once` derives the job id from the idempotency key, so the same logical
  call enqueued again returns the same job while it is queued, running, or its result is
  still in the store.
- :func:`dead_letter_handler` records a job whose retries are exhausted in the dead-letter
  queue (``function`` = the job's ``func_name``, ``route="rq"``); with
  :func:`register_replay_route`, ``DeadLetterQueue.process_due()`` re-enqueues it through
  ``Queue.enqueue_call``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, overload

from rq import get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.queue import Queue
from rq.timeouts import JobTimeoutException

from idempotask import config
from idempotask.backends.deadletters import DeadLetter
from idempotask.call import register_cancellation
from idempotask.deadletter import ReplayError, register_route
from idempotask.errors import AlreadyInProgress, ConfigurationError
from idempotask.idempotent import IdempotentFunction, idempotent
from idempotask.integrations._common import (
    DEFAULT_DEAD_LETTER_OPTIONS,
    NOT_DEAD_LETTERED,
    DeadLetterOptions,
    Delivery,
    arun_delivery,
    check_worker_backend,
    replay_arguments,
    run_delivery,
    split_options,
)

__all__ = [
    "JOB_ID_PREFIX",
    "LETTER_META",
    "ROUTE",
    "IdempotentJob",
    "dead_letter_handler",
    "enqueue_once",
    "idempotent_job",
    "job_id_for",
    "register_replay_route",
]

log = logging.getLogger("idempotask")

P = ParamSpec("P")
R = TypeVar("R")

ROUTE = "rq"
"""The dead-letter route of RQ jobs: letters carry it, :func:`register_replay_route`
handles it."""
LETTER_META = "idempotask_dead_letter"
"""The job meta entry naming the dead letter a replayed job belongs to."""
JOB_ID_PREFIX = "idem-"
"""Job ids :func:`enqueue_once` derives from idempotency keys start with this."""

# Statuses after which RQ never runs a job again by itself. Strings, not JobStatus
# members: the enum gained members over RQ releases.
_TERMINAL = frozenset({"finished", "failed", "stopped", "canceled"})
# Queue.enqueue() keywords that are RQ's own, not the job function's (RQ 2 and 3).
_RQ_OPTIONS = {
    "job_timeout": "timeout",
    "description": "description",
    "result_ttl": "result_ttl",
    "ttl": "ttl",
    "failure_ttl": "failure_ttl",
    "depends_on": "depends_on",
    "at_front": "at_front",
    "meta": "meta",
    "retry": "retry",
    "repeat": "repeat",
    "on_success": "on_success",
    "on_failure": "on_failure",
    "on_stopped": "on_stopped",
    "rate_limit": "rate_limit",
    "webhooks": "webhooks",
}
_REFUSED = {
    "job_id": "enqueue_once derives the job id from the idempotency key",
    "unique": "enqueue_once is unique by construction",
    "pipeline": "enqueue_once reads the existing job first, which a pipeline would defer",
}
_LOCK_TTL_MS = 10_000  # an enqueuer that dies holding the enqueue lock blocks others this long
_LOCK_WAIT = 10.0
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RQ_MARKER = "__idempotask_rq__"

# RQ's job timeout interrupts the body like a time limit: the claim is released so the
# retry (or the next call) runs, and it is never cached as the call's error.
register_cancellation(JobTimeoutException)


# ----------------------------------------------------------------------------------------
# Running a job: each run claims under an owner of its own
# ----------------------------------------------------------------------------------------

_checked_pid = 0  # the process whose store was checked (a forked work horse checks its own)


def _worker_processes(job: Job) -> int:
    """2 when the job runs in another process than its worker (a forked or spawned work
    horse: each job gets a fresh process), else 1 (SimpleWorker, a synchronous queue)."""
    from rq.worker import Worker

    # Public names (Job.worker_name, Worker.find_by_key, Worker.pid), but RQ documents no
    # way to ask whether a job runs in a work horse; test_framework_hooks.py checks them.
    name = job.worker_name
    if not name:
        return 1
    try:
        worker = Worker.find_by_key(
            Worker.redis_worker_namespace_prefix + name, connection=job.connection
        )
    except Exception:
        return 1
    pid = getattr(worker, "pid", None)
    return 2 if pid is not None and pid != os.getpid() else 1


def _check_backend_once(fn: Any, job: Job) -> None:
    """Warn (once per process) when a job in a forking worker uses the memory store."""
    global _checked_pid
    if _checked_pid == os.getpid():
        return
    _checked_pid = os.getpid()
    from idempotask.backends.memory import MemoryBackend

    backend = fn.__idempotask_spec__.backend()
    if isinstance(backend, MemoryBackend):
        check_worker_backend(backend, framework="rq", processes=_worker_processes(job))


def _job_run(func: Any, job: Job | None, wrapped: Any) -> Any:
    """``func`` (``@idempotent``) run as one delivery of ``job``, or of the current job
    when ``job`` is None (plain ``func`` outside any job), with ``wrapped``'s name and
    docstring; RQ runs the coroutine an async one returns."""
    spec = func.__idempotask_spec__

    def delivery() -> Delivery | None:
        # This run of the job: it claims under an owner of its own, never re-taking the
        # claim of another run of the same job (see ``_common.Delivery``).
        current = job if job is not None else get_current_job()
        if current is None:
            return None
        _check_backend_once(func, current)
        return Delivery(str(current.id))

    if inspect.iscoroutinefunction(wrapped):

        async def arun(*args: Any, **kwargs: Any) -> Any:
            this = delivery()
            if this is None:  # called directly, not by a worker
                return await func(*args, **kwargs)
            return await arun_delivery(spec, args, kwargs, this)

        return functools.update_wrapper(arun, wrapped)

    def run(*args: Any, **kwargs: Any) -> Any:
        this = delivery()
        if this is None:  # called directly, not by a worker
            return func(*args, **kwargs)
        return run_delivery(spec, args, kwargs, this)

    return functools.update_wrapper(run, wrapped)


def _is_plain_idempotent(func: Any) -> bool:
    return (
        func is not None
        and hasattr(func, "__idempotask_spec__")
        and callable(getattr(func, "using", None))
        and not hasattr(func, _RQ_MARKER)
    )


class IdempotentJob(Job):
    """An RQ job class that runs plain ``@idempotent`` functions as :func:`idempotent_job`
    runs its own: each run of the job claims under an owner of its own, and failures the
    job cached never answer its retries.

    ``rq worker --job-class idempotask.integrations.rq.IdempotentJob`` (or
    ``Worker(queues, job_class=IdempotentJob)``). Other functions run unchanged.
    """

    # RQ's worker runs a job as ``job.func(*job.args, **job.kwargs)``; ``func`` is the
    # job's public property, so overriding it (in a job class, RQ's documented way to
    # customise jobs) changes what runs without touching RQ's private ``_execute``.
    @property
    def func(self) -> Any:
        """The job's function; a plain ``@idempotent`` one run as this job's delivery."""
        func = super().func
        if _is_plain_idempotent(func):
            return _job_run(func, self, func)
        return func


@overload
def idempotent_job(func: Callable[P, R], /) -> IdempotentFunction[P, R]: ...


@overload
def idempotent_job(
    **options: Any,
) -> Callable[[Callable[P, R]], IdempotentFunction[P, R]]: ...


def idempotent_job(func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """``@idempotent`` for RQ job functions, with prefixed options, aware of their job.

    ::

        @idempotent_job(idempotency_ttl=3600, dead_letter_redact=lambda a: {"order": a["order"]})
        def charge(order: int, card: str) -> str: ...

        queue.enqueue(charge, 7, "tok_1", retry=Retry(max=3))

    Options: the prefixed ones of :mod:`idempotask.integrations`; the key's name is the
    job's ``func_name`` (``module.qualname``), and the ``dead_letter_*`` options tell
    :func:`dead_letter_handler` how to record this function's exhausted jobs.

    Inside a worker each run of the job claims under an owner of its own (the job id and
    a random suffix). A failed run releases the claim, and a failure the job cached with
    ``idempotency_cache_errors`` answers duplicates but never the job's own retries, so
    RQ's ``Retry`` runs at once. A run that meets a claim held by another run of the
    same job -- RQ re-queued the job while its first run is still alive, its worker only
    stalled past its heartbeat -- waits for that run for as long as it holds the claim
    (whatever ``idempotency_wait_timeout`` says) and returns its result; after a crash,
    once its lease has run out. Called outside a job, it is plain ``@idempotent``.
    """

    def wrap(f: Callable[..., Any]) -> Any:
        where = f"@idempotent_job on {getattr(f, '__qualname__', f)!r}"
        idem, dead, rest = split_options(options, where=where)
        if rest:
            raise ConfigurationError(
                f"{where}: unknown option(s) {', '.join(map(repr, sorted(rest)))}; options "
                "are idempotency_* and dead_letter_* (RQ's own go to Queue.enqueue)"
            )
        if hasattr(f, "__idempotask_spec__") or hasattr(f, "__idempotask_dead_letter__"):
            raise ConfigurationError(
                f"{where}: the function is already decorated with @idempotent or "
                "@dead_letter; use one of them (dead letters come from dead_letter_handler, "
                "which records a job only when RQ's retries are exhausted)"
            )
        dead_options = DeadLetterOptions.from_options(dead, where)
        inner: Any = idempotent(**idem)(f)
        w = _job_run(inner, None, f)
        for name in ("idempotency", "__idempotask_spec__", "key_for", "forget", "forget_key"):
            setattr(w, name, getattr(inner, name))
        w.using = inner.using
        w.__idempotask_rq_dead_letter__ = dead_options
        setattr(w, _RQ_MARKER, True)
        return w

    if func is not None:
        return wrap(func)
    return wrap


# ----------------------------------------------------------------------------------------
# Enqueueing once
# ----------------------------------------------------------------------------------------


def job_id_for(func: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The job id :func:`enqueue_once` uses for this call: ``idem-`` and a digest of the
    idempotency key (which may hold a namespace with ``:``, which RQ ids must not).

    >>> job_id_for(charge, 7, "tok_1")  # doctest: +SKIP
    'idem-5b0e1c...'
    """
    key_for, _ = _idempotent_parts(func)
    return _job_id(str(key_for(*args, **kwargs)))


def _idempotent_parts(func: Callable[..., Any]) -> tuple[Callable[..., Any], Any]:
    """``func``'s ``key_for`` and its idempotency spec, or the error naming the fix: a
    function with a ``key_for`` of its own that ``@idempotent`` did not make is refused
    like any other."""
    key_for = getattr(func, "key_for", None)
    spec = getattr(func, "__idempotask_spec__", None)
    if not callable(key_for) or spec is None:
        raise ConfigurationError(
            f"enqueue_once: {getattr(func, '__qualname__', func)!r} is not idempotent; "
            "decorate it with @idempotent_job (or @idempotent) so the same call has one key"
        )
    return key_for, spec


def _job_id(key: str) -> str:
    return JOB_ID_PREFIX + hashlib.blake2b(key.encode("utf-8"), digest_size=16).hexdigest()


def _split_enqueue(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """(the function's args, its kwargs, RQ's enqueue_call options), as Queue.enqueue
    would split them."""
    kwargs = dict(kwargs)
    for name, why in _REFUSED.items():
        if name in kwargs:
            raise ConfigurationError(f"enqueue_once: {name}= is not accepted: {why}")
    idem, dead, _ = split_options(kwargs, where="enqueue_once")
    if idem or dead:
        raise ConfigurationError(
            "enqueue_once: idempotency_* and dead_letter_* options belong on the job function "
            "(@idempotent_job(idempotency_ttl=...)), where the worker sees them too"
        )
    rq_options = {
        _RQ_OPTIONS[name]: kwargs.pop(name) for name in list(kwargs) if name in _RQ_OPTIONS
    }
    if "args" in kwargs or "kwargs" in kwargs:
        # Queue.enqueue's explicit form: enqueue(f, args=(...), kwargs={...}).
        if args:
            raise ConfigurationError("enqueue_once: pass args= or positional arguments, not both")
        args = tuple(kwargs.pop("args", None) or ())
        kwargs = dict(kwargs.pop("kwargs", None) or {})
    return args, kwargs, rq_options


def enqueue_once(queue: Queue, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Job:
    """Enqueue ``func(*args, **kwargs)`` unless the same logical call already has a job.

    ::

        job = enqueue_once(queue, charge, 7, "tok_1", retry=Retry(max=3))
        assert enqueue_once(queue, charge, order=7, card="tok_1").id == job.id

    ``func`` is an idempotent job function (:func:`idempotent_job` or ``@idempotent``).
    The job id is derived from its idempotency key (:func:`job_id_for`), so positional
    and keyword spellings, and concurrent callers in any process, meet on one job. The
    existing job is returned while it is queued, scheduled, deferred or running, and
    after it ended for as long as the store still answers for the key (a result within
    its ttl, a failure cached with ``cache_errors``). When the store no longer has the
    key -- the result expired or was forgotten, or the job failed and released it --
    the ended job is replaced by a new one under the same id, because the call would
    run again anyway. RQ's own options (``job_timeout``, ``result_ttl``, ``retry``,
    ``meta``, ``at_front``...) are passed through; ``job_id``, ``unique`` and ``pipeline``
    are refused.
    """
    fargs, fkwargs, rq_options = _split_enqueue(args, kwargs)
    key_for, spec = _idempotent_parts(func)
    key = str(key_for(*fargs, **fkwargs))
    job_id = _job_id(key)
    connection = queue.connection
    lock = f"{config.settings().namespace}:rq-enqueue:{job_id}"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + _LOCK_WAIT
    pause = 0.002
    # A short lock per job id: reading the existing job and replacing an ended one must
    # be one step, or two enqueuers replacing the same failed job would both enqueue.
    while not connection.set(lock, token, nx=True, px=_LOCK_TTL_MS):
        if time.monotonic() >= deadline:
            raise AlreadyInProgress(
                f"enqueue_once: another enqueuer holds the lock for {job_id} after {_LOCK_WAIT:g}s",
                key=key,
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    try:
        try:
            existing: Job | None = queue.job_class.fetch(
                job_id, connection=connection, serializer=queue.serializer
            )
        except NoSuchJobError:
            existing = None
        if existing is not None:
            status = existing.get_status(refresh=False)
            if str(getattr(status, "value", status)) not in _TERMINAL:
                return existing
            if spec.backend().get(key) is not None:
                return existing
            existing.delete()
        return queue.enqueue_call(func, args=fargs, kwargs=fkwargs, job_id=job_id, **rq_options)
    finally:
        connection.eval(_RELEASE, 1, lock, token)


# ----------------------------------------------------------------------------------------
# Dead letters
# ----------------------------------------------------------------------------------------


def _record_failure(job: Job, error: BaseException) -> DeadLetter | None:
    retries_left = getattr(job, "retries_left", None)
    if (retries_left is not None and retries_left > 0) or isinstance(error, NOT_DEAD_LETTERED):
        return None
    name = job.func_name or job.id
    try:
        func: Any = job.func
    except Exception:
        func = None  # the function itself cannot be imported: the letter says so
    options: DeadLetterOptions = getattr(
        func, "__idempotask_rq_dead_letter__", DEFAULT_DEAD_LETTER_OPTIONS
    )
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if func is not None:
        try:
            args, kwargs = tuple(job.args), dict(job.kwargs)
        except Exception:
            args, kwargs = (), {}
    # The first failure of a job is recorded under the job's id, so the replay route can
    # find the job (its queue and options); a replayed job names its letter in its meta.
    return options.record(
        name,
        error,
        func,
        args,
        kwargs,
        route=ROUTE,
        replay_of=str((job.meta or {}).get(LETTER_META) or job.id),
    )


def dead_letter_handler(
    job: Job,
    exc_type: type[BaseException] | None,
    exc_value: BaseException | None,
    traceback: TracebackType | None,
) -> bool:
    """An RQ exception handler: a job whose retries are exhausted becomes a dead letter.

    ::

        rq worker --exception-handler idempotask.integrations.rq.dead_letter_handler
        Worker([queue], exception_handlers=[dead_letter_handler])

    A job RQ will retry (``Retry(max=...)`` with retries left) is left alone; the last
    failure is recorded with its traceback, ``function`` = the job's ``func_name``,
    the bound arguments (through ``dead_letter_redact``), the idempotency key and
    ``route="rq"``. A job abandoned by a dead worker is recorded too (RQ reports it with
    ``AbandonedJobError``, without traceback). ``AlreadyInProgress`` (the call runs
    elsewhere) never is. A replayed job that fails again updates its letter. Recording
    never raises into RQ; the handler returns True so the next handlers run.
    """
    try:
        if exc_value is None:
            exc_value = exc_type() if exc_type is not None else RuntimeError("unknown failure")
        # RQ 2 reports an abandoned job with a StackSummary where a traceback goes.
        if exc_value.__traceback__ is None and isinstance(traceback, TracebackType):
            exc_value = exc_value.with_traceback(traceback)
        _record_failure(job, exc_value)
    except Exception:
        log.exception("idempotask: could not record the failure of RQ job %s", job.id)
    return True


def _import_function(dotted: str) -> Any:
    """The function a job's ``func_name`` (``module.qualname``) names, found with
    importlib (the longest importable module prefix, then attributes)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            found = getattr(found, name)
        return found
    raise ImportError(f"cannot import {dotted!r}")


def _imported_function(dotted: str) -> Any:
    """What ``dotted`` names among the modules this process has imported, or None; never
    imports one (a name read from a letter must not load code)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        found: Any = sys.modules.get(".".join(parts[:i]))
        if found is not None:
            for name in parts[i:]:
                found = getattr(found, name, None)
            return found
    return None


def _replay(
    connection: Any, default_queue_name: str, letter: DeadLetter, arguments: dict[str, Any]
) -> Job:
    try:
        original = Job.fetch(letter.id, connection=connection)
    except Exception:  # gone (NoSuchJobError) or unreadable (another serializer...)
        original = None  # the default queue then
    func: Any = None
    if original is not None and original.func_name == letter.function:
        try:  # RQ ran a job of this name: the name is a job's
            func = _import_function(letter.function)
        except Exception:
            func = None
    else:
        # A worker imports and runs whatever a job names: without RQ's own job, only an
        # idempotask job function this process imported is enqueued from a letter's name.
        func = _imported_function(letter.function)
        if not hasattr(func, "__idempotask_spec__"):
            raise ReplayError(
                f"RQ no longer keeps job {letter.id}, and {letter.function!r} is not an "
                "@idempotent_job (or @idempotent) function of a module imported here: import "
                "it (--import), or enqueue the job by hand and resolve the letter"
            )
    args, kwargs = ((), dict(arguments)) if func is None else replay_arguments(func, arguments)
    queue_name = default_queue_name
    options: dict[str, Any] = {}
    if original is not None and original.func_name == letter.function and original.origin:
        queue_name = original.origin
        options = {
            "timeout": original.timeout,
            "result_ttl": original.result_ttl,
            "failure_ttl": original.failure_ttl,
        }
    queue = Queue(queue_name, connection=connection)
    return queue.enqueue_call(
        letter.function,
        args=args,
        kwargs=kwargs,
        meta={LETTER_META: letter.id},
        **{k: v for k, v in options.items() if v is not None},
    )


def register_replay_route(connection: Any, *, queue: str = "default") -> None:
    """Let ``DeadLetterQueue.process_due()`` in this process replay RQ letters.

    ::

        register_replay_route(Redis.from_url("redis://localhost:6379/0"))
        DeadLetterQueue().process_due()  # cron, or a loop

    A due letter is enqueued again with its stored arguments on the queue its job came
    from (the original job is found by the letter's id while RQ keeps it, with its
    timeout and result/failure ttls), else on ``queue`` -- then only when it names an
    ``@idempotent_job`` (or ``@idempotent``) function of a module this process imported,
    since a worker runs whatever function a job names and a letter alone could name any
    (``os.system``); other such letters are skipped. The new job carries the letter
    id in ``meta[LETTER_META]``, so if it fails for good :func:`dead_letter_handler`
    updates that letter instead of adding one. The processor resolves the letter as
    ``"enqueued"`` once the job is enqueued.
    """
    register_route(ROUTE, functools.partial(_replay, connection, queue))

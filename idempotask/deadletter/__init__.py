"""Dead letters: failed calls are classified, recorded, retried later, never lost.

``@dead_letter`` goes outside ``@idempotent`` (the other order is refused when the
function is decorated)::

    from idempotask import dead_letter, idempotent

    @dead_letter(critical=True)
    @idempotent(ttl=4 * 3600)
    def autoclose_job(job_id: int) -> dict: ...

When the call raises, the failure is classified (:mod:`idempotask.taxonomy`), a
:class:`~idempotask.backends.deadletters.DeadLetter` is written -- function name,
arguments (through ``redact=``), the idempotency key, kind, exception type, message,
traceback, attempts, times, the next retry from the kind's policy -- and only then does
the exception propagate. If the store is down the letter goes to a local spool
(:mod:`idempotask.spool`) and is delivered later. A processor
(:meth:`DeadLetterQueue.process_due`, run from cron or a worker loop) claims due letters
with a lease, so two processors never replay one letter, and replays each with its
original arguments -- hence its original idempotency key: a call that completed
meanwhile is resolved without running, a cached error is cleared first so the replay
really runs.

Every queue operation is written once, as a generator that yields the I/O it needs
(``_core._Op``); ``_core._drive`` performs it for sync callers and ``_core._adrive``
for async ones, so the sync and async methods share all their logic.

Modules: ``_core`` (the I/O protocol and the pure decisions), ``_replay`` (the replay
registry, routes and marker), ``_queue`` (:class:`DeadLetterQueue` and the processor),
``_decorator`` (``@dead_letter``).
"""

from __future__ import annotations

from idempotask.backends.deadletters import dead_letter_store_from_url, register_dead_letter_scheme
from idempotask.deadletter._core import (
    DeadLetterNotFound,
    ReplayError,
    RouteHandler,
    Unserializable,
)
from idempotask.deadletter._decorator import DeadLetterFunction, dead_letter
from idempotask.deadletter._queue import (
    DeadLetterQueue,
    DeadLetterStats,
    ProcessReport,
    ReplayResult,
    default_queue,
)
from idempotask.deadletter._replay import (
    register_route,
    registered_functions,
    replaying,
    unregister_route,
)

__all__ = [
    "DeadLetterFunction",
    "DeadLetterNotFound",
    "DeadLetterQueue",
    "DeadLetterStats",
    "ProcessReport",
    "ReplayError",
    "ReplayResult",
    "RouteHandler",
    "Unserializable",
    "dead_letter",
    "dead_letter_store_from_url",
    "default_queue",
    "register_dead_letter_scheme",
    "register_route",
    "registered_functions",
    "replaying",
    "unregister_route",
]

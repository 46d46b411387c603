"""Dead letters: failed calls are classified, recorded, retried later, never lost.

``@dead_letter`` goes outside ``@idempotent`` (the other order is refused when the
function is decorated)::

    from idempotask import dead_letter, idempotent

    @dead_letter(critical=True, redact=lambda a: {**a, "card": "<redacted>"},
                 replay_with=lambda kept: {**kept, "card": load_card(kept["order_id"])})
    @idempotent(ttl=4 * 3600)
    def charge(order_id: int, card: str) -> dict: ...

When the call raises, the failure is classified (:mod:`idempotask.taxonomy`), a
:class:`~idempotask.backends.base.DeadLetter` is written -- function name, arguments
(through ``redact=``), the idempotency key, kind, exception type, message, traceback,
attempts, times, the next retry from the kind's policy, and a history of what happened
to it -- and only then does the exception propagate. If the store is down the letter goes
to a local spool (:mod:`idempotask.spool`) and is delivered later. A processor
(:meth:`DeadLetterQueue.process_due`, run from cron or a worker loop) claims due letters
with a lease, so two processors never replay one letter, and replays each as the
original call under its original idempotency key -- or not at all: a call that completed
meanwhile is resolved without running, a cached error is cleared first so the replay
really runs, and a letter whose arguments were redacted is rebuilt by ``replay_with=`` or
left for a person.

Modules: ``_core`` (errors, option checks, the helpers integrations share),
``_arguments`` (what a letter keeps of a call's arguments), ``_letters`` (the pure
decisions and history entries), ``_replay`` (the replay registry, routes, rebuilding and
running a call), ``_base``, ``_recording``, ``_admin`` and ``_processing`` (the three
parts of :class:`DeadLetterQueue`, each flow written once and driven sync or async by
:mod:`idempotask.flow`), ``_queue`` (the facade) and ``_decorator`` (``@dead_letter``).
"""

from __future__ import annotations

from idempotask.backends.deadletters import dead_letter_store_from_url, register_dead_letter_scheme
from idempotask.deadletter._admin import DeadLetterStats
from idempotask.deadletter._arguments import (
    KeepsAllArgumentsWarning,
    LetterArguments,
    Redacted,
    Unserializable,
    keep_all,
    letter_arguments,
)
from idempotask.deadletter._core import (
    AmbiguousLetterId,
    DeadLetterNotFound,
    ReplayError,
    RouteHandler,
)
from idempotask.deadletter._decorator import DeadLetterFunction, dead_letter
from idempotask.deadletter._processing import ProcessReport, ReplayResult
from idempotask.deadletter._queue import DeadLetterQueue, default_queue
from idempotask.deadletter._replay import (
    register_route,
    registered_functions,
    registered_routes,
    replaying,
    unregister_route,
)

__all__ = [
    "AmbiguousLetterId",
    "DeadLetterFunction",
    "DeadLetterNotFound",
    "DeadLetterQueue",
    "DeadLetterStats",
    "KeepsAllArgumentsWarning",
    "LetterArguments",
    "ProcessReport",
    "Redacted",
    "ReplayError",
    "ReplayResult",
    "RouteHandler",
    "Unserializable",
    "dead_letter",
    "dead_letter_store_from_url",
    "default_queue",
    "keep_all",
    "letter_arguments",
    "register_dead_letter_scheme",
    "register_route",
    "registered_functions",
    "registered_routes",
    "replaying",
    "unregister_route",
]

"""The :class:`DeadLetterQueue` facade: recording, administration and processing, each in
a module of its own, on one set of options."""

from __future__ import annotations

import threading

from idempotask.deadletter._admin import Administration
from idempotask.deadletter._processing import Processing
from idempotask.deadletter._recording import Recording

__all__ = ["DeadLetterQueue", "default_queue"]


class DeadLetterQueue(Recording, Administration, Processing):
    """Records failed calls, answers questions about them, and replays them when due.

    ``store`` is a :class:`~idempotask.backends.base.DeadLetterStore`, a URL
    (``memory://``, ``redis://...``, a SQL URL; other schemes register through
    :func:`register_dead_letter_scheme`), or None for the configured store
    (``configure(dead_letter_store=...)``, else the one beside the idempotency backend).
    A store given by URL, or the configured one, keeps the letters of the configured
    namespace only. ``classifier`` and ``policies`` (a mapping of
    :class:`~idempotask.taxonomy.FailureKind` to retry policy, merged over
    :data:`idempotask.retry.DEFAULT_POLICIES`) decide kinds and schedules. ``retention``
    is how long resolved and abandoned letters are kept by :meth:`purge` (default
    ``configure(dead_letter_retention=...)``, 30 days). ``spool`` is the spool file, or a
    :class:`~idempotask.spool.Spool` (default: see :func:`idempotask.spool.spool_path`).
    ``clock`` gives wall-clock epoch seconds; ``skip_delay`` is how long a letter this
    process cannot replay is left for others before it is offered again;
    ``unreplayable`` says what the processor does with a letter whose stored arguments
    cannot rebuild the call (redacted, not storable) and whose function has no
    ``replay_with=``: ``"hold"`` (default: it stays open, without a retry, the reason in
    its history, until a person requeues, resolves or abandons it) or ``"abandon"``.

    The parts: recording (:meth:`record`, :meth:`flush_spool`), administration
    (:meth:`get`, :meth:`find`, :meth:`query`, :meth:`count`, :meth:`stats`,
    :meth:`requeue`, :meth:`mark_resolved`, :meth:`mark_abandoned`, their ``*_all``
    forms by :meth:`filter`, :meth:`purge`) and processing (:meth:`process_due`). Every
    change appends an :class:`~idempotask.backends.base.Action` to the letter's
    ``history``, naming who acted (``actor=``).

    >>> queue = DeadLetterQueue("memory://")
    >>> letter = queue.record("billing.charge", TimeoutError("gateway"), arguments={"order": 7})
    >>> letter.kind, letter.status.value, letter.attempts
    ('transient', 'pending', 1)
    >>> resolved = queue.mark_resolved(letter.id, note="refunded by hand", actor="alice")
    >>> [(a.what, a.actor) for a in resolved.history]
    [('failed', 'worker'), ('resolved', 'alice')]

    Every method has an ``a``-prefixed coroutine twin (``arecord``, ``aprocess_due``...).
    """


_default_queue: DeadLetterQueue | None = None
_default_queue_lock = threading.Lock()


def default_queue() -> DeadLetterQueue:
    """The process-wide queue ``@dead_letter`` uses unless given ``queue=``.

    It follows the configuration at each use (store, namespace, spool, retention, alert
    hooks).

    >>> default_queue() is default_queue()
    True
    """
    global _default_queue
    if _default_queue is None:
        with _default_queue_lock:
            if _default_queue is None:
                _default_queue = DeadLetterQueue()
    return _default_queue

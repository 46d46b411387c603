"""What the three parts of :class:`~idempotask.deadletter.DeadLetterQueue` share: its
options, its store and spool, the clock, alerts, and the flows (:mod:`idempotask.flow`)
every part uses (reading a letter, changing it with compare-and-set, delivering the spool).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Literal

from idempotask import config, events
from idempotask._printable import printable
from idempotask.backends.base import DeadLetter, DeadLetterStore, Status
from idempotask.backends.deadletters import dead_letter_store_from_url
from idempotask.deadletter._core import (
    CAS_TRIES,
    DeadLetterNotFound,
    Hook,
    Policies,
    check_classifier,
    check_hook,
    check_policies,
    epoch,
    fire_hook,
)
from idempotask.deadletter._letters import Decide
from idempotask.errors import AlreadyInProgress, BackendError, ConfigurationError
from idempotask.events import EventKind
from idempotask.flow import Flow, Op, store_op
from idempotask.retry import DEFAULT_POLICIES, RetryPolicy
from idempotask.spool import Spool, spool_path
from idempotask.taxonomy import Classifier, FailureKind, default_classifier

__all__ = ["QueueCore", "Unreplayable", "emit_letter"]

log = logging.getLogger("idempotask")

Unreplayable = Literal["hold", "abandon"]


def emit_letter(kind: EventKind, letter: DeadLetter) -> None:
    """Tell event listeners about ``letter``: names, kinds and counts only, never its
    arguments or message (both may hold what ``redact=`` is there to keep private).
    Callers test ``events.listeners`` first, so nothing is built when nobody listens."""
    attributes: dict[str, events.AttributeValue] = {
        "letter_id": letter.id,
        "failure_kind": letter.kind,
        "letter_status": Status(letter.status).value,
        "attempts": letter.attempts,
        "critical": letter.critical,
    }
    if letter.resolution:
        attributes["resolution"] = letter.resolution
    error = None if kind is EventKind.RETRY_SUCCEEDED else (letter.error_type or None)
    events.emit(kind, letter.function, letter.key, error=error, attributes=attributes)


class QueueCore:
    """The state and shared flows of a dead-letter queue (see ``DeadLetterQueue`` for
    the options)."""

    def __init__(
        self,
        store: DeadLetterStore | str | None = None,
        *,
        classifier: Classifier | None = None,
        policies: Mapping[FailureKind | str, RetryPolicy] | None = None,
        retention: float | _dt.timedelta | None = None,
        spool: Spool | str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
        skip_delay: float = 60.0,
        unreplayable: Unreplayable = "hold",
    ) -> None:
        self._store_option = config.check_dead_letter_store(store)
        self._store: DeadLetterStore | None = (
            None if store is None or isinstance(store, str) else store
        )
        self._classifier = check_classifier(classifier)
        self._policies = check_policies(policies)
        self._retention = (
            None if retention is None else config.check_seconds("retention", retention)
        )
        if spool is not None and not isinstance(spool, (Spool, str, os.PathLike)):
            raise ConfigurationError(f"spool: expected a path or a Spool, got {spool!r}")
        self._spool_option = (
            spool if spool is None or isinstance(spool, Spool) else Spool(os.fspath(spool))
        )
        self._spools: dict[str, Spool] = {}
        if not callable(clock):
            raise ConfigurationError(
                f"clock: expected a callable returning epoch seconds, got {clock!r}"
            )
        self._clock = clock
        self._skip_delay = config.check_seconds("skip_delay", skip_delay, allow_zero=True)
        self._unreplayable = config.check_choice("unreplayable", unreplayable, ("hold", "abandon"))
        self._alerts: tuple[Hook, ...] = ()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        option = self._store_option
        if option is None:
            where = "the configured store"
        elif isinstance(option, str):
            where = option.split("://", 1)[0] + "://..."  # never show credentials
        else:
            where = repr(option)
        return f"DeadLetterQueue({where})"

    # -- what the queue is made of ---------------------------------------------------------

    @property
    def store(self) -> DeadLetterStore:
        """The store, built on first use: the one given, the URL given (for the
        configured namespace), else the configured one
        (:func:`idempotask.config.get_dead_letter_store`)."""
        if self._store is not None:
            return self._store
        if isinstance(self._store_option, str):
            with self._lock:
                if self._store is None:
                    self._store = dead_letter_store_from_url(
                        self._store_option, namespace=config.settings().namespace
                    )
                return self._store
        return config.get_dead_letter_store()

    @property
    def classifier(self) -> Classifier:
        """The classifier given, else :data:`idempotask.taxonomy.default_classifier`."""
        return self._classifier if self._classifier is not None else default_classifier

    @property
    def policies(self) -> Policies:
        """Retry policy per kind: the ones given over the defaults."""
        if self._policies is None:
            return DEFAULT_POLICIES
        return {**DEFAULT_POLICIES, **self._policies}

    @property
    def retention(self) -> float:
        """Seconds :meth:`purge` keeps resolved and abandoned letters by default."""
        if self._retention is not None:
            return self._retention
        return config.settings().dead_letter_retention

    @property
    def spool(self) -> Spool:
        """Where letters wait while the store is unreachable: the spool given, else the
        configured namespace's (:func:`idempotask.spool.spool_path`)."""
        if self._spool_option is not None:
            return self._spool_option
        s = config.settings()
        path = spool_path(s.spool_path, s.namespace)
        return self._spools.get(path) or self._spools.setdefault(path, Spool(path))

    def now(self, value: float | _dt.datetime | None = None) -> float:
        """``value`` as epoch seconds, or the queue's clock when None."""
        return float(self._clock()) if value is None else epoch(value, "now")

    def merged_policies(self, policies: Policies | None) -> Policies:
        """The queue's policies with ``policies`` (a function's own) over them."""
        return self.policies if policies is None else {**self.policies, **policies}

    def on_alert(self, hook: Hook) -> Callable[[], None]:
        """Call ``hook(letter)`` for each dead letter of a ``critical=True`` function
        (when recorded, and when its retries run out); returns a remover.

        >>> from idempotask import DeadLetterQueue
        >>> remove = DeadLetterQueue("memory://").on_alert(print)
        >>> remove()
        """
        check_hook("on_alert", hook)
        with self._lock:
            self._alerts = (*self._alerts, hook)

        def remove() -> None:
            with self._lock:
                self._alerts = tuple(h for h in self._alerts if h is not hook)

        return remove

    def _alert(self, letter: DeadLetter, event: str) -> None:
        """Log the letter; for critical functions, log CRITICAL and call the alert hooks."""
        # The function, error and message may come from outside (an exception's text, a
        # letter someone else wrote): escaped, so they cannot forge log lines.
        text = printable(
            f"idempotask: {letter.function} {event}: {letter.error_type}: {letter.message} "
            f"(dead letter {letter.id}, {letter.kind}, attempt {letter.attempts}, "
            f"{Status(letter.status).value})"
        )
        if not letter.critical:
            log.log(logging.ERROR if letter.status is Status.ABANDONED else logging.WARNING, text)
            return
        log.critical(text)
        for hook in (*self._alerts, *config.settings().on_alert):
            fire_hook(hook, letter, "alert")

    # -- flows every part uses -------------------------------------------------------------

    def _store_flow(self) -> Flow[DeadLetterStore]:
        # An operation, so that a store that cannot be built (a bad URL, a missing
        # driver) is thrown back into the flow like any store error.
        store: DeadLetterStore = yield Op(lambda: self.store, None)
        return store

    def _transition_flow(
        self, id: str, decide: Decide, *, unless_claimed: bool = False
    ) -> Flow[DeadLetter]:
        """Read-modify-write with compare-and-set, again until no one interferes.

        ``unless_claimed`` (a person's change): the store refuses while a processor's
        claim on the letter is live; a refused letter whose version did not move is being
        replayed right now, and :class:`AlreadyInProgress` says so (ending that claim
        would let a second processor replay the letter beside the first).
        """
        store = yield from self._store_flow()
        options = {"unless_claimed": True} if unless_claimed else {}
        letter: DeadLetter | None = yield store_op(store, "get", id)
        for _ in range(CAS_TRIES):
            if letter is None:
                raise DeadLetterNotFound(f"no dead letter has id {id!r}")
            updated: DeadLetter | None = yield store_op(
                store, "update", id, letter.version, **options, **decide(letter)
            )
            if updated is not None:
                return updated
            current: DeadLetter | None = yield store_op(store, "get", id)
            if unless_claimed and current is not None and current.version == letter.version:
                raise AlreadyInProgress(
                    f"dead letter {id!r} is being replayed by a processor right now; try "
                    "again after the replay ends",
                    key=letter.key,
                )
            letter = current
        raise BackendError(f"dead letter {id} kept changing; gave up after {CAS_TRIES} tries")

    def _flush_flow(self, store: DeadLetterStore | None = None) -> Flow[int]:
        """Deliver the spool to the store; how many letters were delivered."""
        spool = self.spool
        if not spool.pending():
            return 0
        if store is None:
            store = yield from self._store_flow()
        delivered = 0
        batches = spool.take()
        try:
            for batch in batches:
                with batch:
                    for done, letter in enumerate(batch):
                        try:
                            yield store_op(store, "add", letter)
                        except BackendError as exc:
                            log.warning(
                                "idempotask: dead-letter store still unavailable (%s); %d "
                                "letter(s) stay in the spool %s",
                                exc,
                                len(batch) - done,
                                spool.path,
                            )
                            return delivered
                        except Exception as exc:
                            # Not an outage: the store refuses this letter. It stays
                            # spooled, and does not hold back the letters after it.
                            log.error(
                                "idempotask: the dead-letter store refuses spooled letter "
                                "%s of %s (%s: %s); it stays in the spool %s",
                                letter.id,
                                letter.function,
                                type(exc).__name__,
                                exc,
                                spool.path,
                            )
                            continue
                        batch.done(letter)
                        delivered += 1
        finally:
            batches.close()
        if delivered:
            log.info(
                "idempotask: delivered %d spooled dead letter(s) from %s", delivered, spool.path
            )
        return delivered

    def _deliver_flow(self, store: DeadLetterStore | None = None) -> Flow[int]:
        """:meth:`_flush_flow` for recording and processing, which the spool never fails:
        an error is logged, and 0 delivered."""
        try:
            return (yield from self._flush_flow(store))
        except Exception:
            log.warning("idempotask: could not deliver the dead-letter spool", exc_info=True)
            return 0

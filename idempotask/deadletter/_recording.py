"""Recording failures: a failed call becomes a letter in the store -- or in the local
spool while the store cannot take it, delivered once it can. Nothing is dropped."""

from __future__ import annotations

import datetime as _dt
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from idempotask import events
from idempotask.backends._twins import twins
from idempotask.backends.base import DeadLetter, Status
from idempotask.deadletter._arguments import encode_arguments
from idempotask.deadletter._base import QueueCore, emit_letter
from idempotask.deadletter._core import (
    RECORDING_CATCH,
    DeadLetterNotFound,
    Policies,
    check_actor,
    check_classifier,
    check_policies,
)
from idempotask.deadletter._letters import after_failure, classify, first_failure
from idempotask.errors import ConfigurationError, MissingTableError
from idempotask.events import EventKind
from idempotask.flow import Flow, Op, store_op
from idempotask.retry import RetryPolicy
from idempotask.spool import SpoolError, encode_letter
from idempotask.taxonomy import Classifier, FailureKind

__all__ = ["Recording"]

log = logging.getLogger("idempotask")


class Recording(QueueCore):
    """The recording part of :class:`~idempotask.deadletter.DeadLetterQueue`."""

    def _record(
        self,
        function: str,
        error: BaseException,
        *,
        arguments: Mapping[str, Any] | None = None,
        key: str = "",
        route: str = "",
        critical: bool = False,
        classifier: Classifier | None = None,
        policies: Mapping[FailureKind | str, RetryPolicy] | None = None,
        replay_of: str | None = None,
        now: float | _dt.datetime | None = None,
        actor: str | None = None,
    ) -> Flow[DeadLetter]:
        """Record that ``function`` failed with ``error``; returns the letter.

        ``arguments`` (name -> value, already redacted) are stored as typed JSON; values
        it cannot hold become :class:`Unserializable`. ``key`` is the call's idempotency
        key, ``route`` the integration that replays it. ``replay_of`` names a letter this
        failure is a new attempt of (integrations use it for framework-run replays): that
        letter is updated instead of a new one added. ``actor`` is who failed, for the
        letter's history (default: the route, else ``"worker"``). When the store is down
        the letter is spooled (and :class:`~idempotask.spool.SpoolError` raised if that
        fails too).

        >>> from idempotask import DeadLetterQueue
        >>> DeadLetterQueue("memory://").record("jobs.sync", ValueError("bad")).status.value
        'abandoned'
        """
        # Checked now: a bad argument raises before anything is stored.
        if not isinstance(function, str) or not function:
            raise ConfigurationError(f"record: expected a function name, got {function!r}")
        if not isinstance(error, BaseException):
            raise ConfigurationError(f"record: expected an exception, got {error!r}")
        return self.record_flow(
            function,
            error,
            arguments=encode_arguments(arguments),
            key=key,
            route=route,
            critical=critical,
            classifier=check_classifier(classifier),
            policies=check_policies(policies),
            replay_of=replay_of,
            now=self.now(now),
            actor=check_actor(actor) if actor is not None else (route or "worker"),
        )

    record, arecord = twins(_record, catch=RECORDING_CATCH)

    def record_flow(
        self,
        function: str,
        error: BaseException,
        *,
        arguments: bytes,
        key: str,
        route: str,
        critical: bool,
        classifier: Classifier | None,
        policies: Policies | None,
        replay_of: str | None,
        now: float,
        actor: str,
    ) -> Flow[DeadLetter]:
        """The flow behind :meth:`record`, with the arguments already encoded (what
        ``@dead_letter`` drives). Drive it with
        :data:`~idempotask.deadletter._core.RECORDING_CATCH`: every error of the store or
        the spool must come back into it, so the letter is spooled or logged."""
        classification = classify(classifier or self.classifier, error)
        merged = self.merged_policies(policies)
        if replay_of is not None:
            try:
                letter = yield from self._transition_flow(
                    replay_of, after_failure(error, classification, merged, now, actor)
                )
            except DeadLetterNotFound:
                pass  # recorded below under that id
            except Exception as exc:
                log.warning(
                    "idempotask: could not update dead letter %s (%s); the failure is "
                    "recorded as a new letter",
                    replay_of,
                    exc,
                )
                replay_of = None
            else:
                abandoned = letter.status is Status.ABANDONED
                if events.listeners:  # a framework's replay of the letter failed again
                    kind = EventKind.RETRY_EXHAUSTED if abandoned else EventKind.RETRY_FAILED
                    emit_letter(kind, letter)
                if abandoned:
                    self._alert(letter, "ran out of retries")
                return letter
        letter = DeadLetter(
            id=replay_of or uuid.uuid4().hex,
            function=function,
            arguments=arguments,
            key=key,
            route=route,
            critical=critical,
            **first_failure(error, classification, merged, now, actor),
        )
        letter = yield from self._add_flow(letter)
        if events.listeners:
            emit_letter(EventKind.DEAD_LETTER, letter)
        self._alert(letter, "failed" if letter.status is Status.PENDING else "failed for good")
        return letter

    def _add_flow(self, letter: DeadLetter) -> Flow[DeadLetter]:
        """Store a new letter, or spool it; deliver the spool after a successful add."""
        try:
            store = yield from self._store_flow()
            stored: DeadLetter = yield store_op(store, "add", letter)
        except Exception as exc:
            # BackendError is the expected case, but nothing the store does may lose it.
            return (yield from self._spool_flow(letter, exc))
        # The store answers again: deliver what waited. (Spool file I/O is synchronous on
        # the async path too: a stat here, and a few small writes only after an outage.)
        yield from self._deliver_flow(store)
        return stored

    def _spool_flow(self, letter: DeadLetter, cause: BaseException) -> Flow[DeadLetter]:
        try:
            spool = self.spool
            yield Op(spool.append, None, letter)
        except Exception as exc:
            log.critical(
                "idempotask: dead letter %s of %s could not be stored (%s: %s) nor spooled "
                "(%s: %s); it is kept only in this log record: %s",
                letter.id,
                letter.function,
                type(cause).__name__,
                cause,
                type(exc).__name__,
                exc,
                encode_letter(letter).decode("ascii"),
            )
            raise SpoolError(
                f"dead letter {letter.id} could not be stored ({cause}) nor spooled ({exc}); "
                "it was logged at CRITICAL"
            ) from exc
        if isinstance(cause, MissingTableError):
            # Not an outage: the table will not appear by itself, so say what to do.
            log.error(
                "idempotask: the dead-letter store has no table %r, so letter %s of %s was "
                "spooled to %s; create the table (`idempotask db create --url ...`, or the "
                "store's create_tables()) and the spool is delivered with the next letter "
                "or `idempotask dlq flush` (%s)",
                cause.table,
                letter.id,
                letter.function,
                spool.path,
                cause,
            )
            return letter
        log.error(
            "idempotask: the dead-letter store is unavailable (%s: %s); letter %s of %s was "
            "spooled to %s and will be delivered when the store is back",
            type(cause).__name__,
            cause,
            letter.id,
            letter.function,
            spool.path,
        )
        return letter

    def _flush_spool(self) -> Flow[int]:
        """Deliver spooled letters to the store; returns how many were delivered.

        Letters the store still refuses stay spooled; delivering one twice is harmless.
        """
        return self._flush_flow()

    flush_spool, aflush_spool = twins(_flush_spool, catch=RECORDING_CATCH)

"""The :class:`DeadLetterQueue` service: records, questions, transitions and the
processor, each written once as a flow and driven sync or async."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from idempotask import config, events
from idempotask.backends.base import Backend, State
from idempotask.backends.deadletters import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStore,
    StatRow,
    Status,
    dead_letter_store_from_url,
)
from idempotask.deadletter._core import (
    _CAS_TRIES,
    _PAGE,
    DeadLetterNotFound,
    Flow,
    Hook,
    Policies,
    ReplayError,
    RouteHandler,
    _adrive,
    _arguments_payload,
    _classify,
    _close,
    _drive,
    _epoch,
    _failure_changes,
    _fire,
    _make_filter,
    _new_letter,
    _Op,
    _reopen,
    _seconds,
    check_classifier,
    check_hook,
    check_policies,
)
from idempotask.deadletter._replay import (
    _call_arguments,
    _Outcome,
    _Registration,
    _registry,
    _registry_lock,
    _replay_async,
    _replay_sync,
    _route_call,
    _routes,
    _stored_arguments,
)
from idempotask.errors import AlreadyInProgress, BackendError, ConfigurationError
from idempotask.events import EventKind
from idempotask.retry import DEFAULT_POLICIES, RetryPolicy
from idempotask.spool import Spool, SpoolError, encode_letter, spool_path
from idempotask.taxonomy import Classifier, FailureKind, default_classifier

log = logging.getLogger("idempotask")


# What a replay's outcome tells event listeners; the other outcomes (skipped, conflict,
# enqueued to a framework) settle nothing yet, so they emit nothing.
_REPLAY_EVENTS = {
    "resolved": EventKind.RETRY_SUCCEEDED,
    "completed": EventKind.RETRY_SUCCEEDED,
    "failed": EventKind.RETRY_FAILED,
    "abandoned": EventKind.RETRY_EXHAUSTED,
}


def _emit_letter(kind: EventKind, letter: DeadLetter) -> None:
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


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetterStats:
    """Dead letters whose last failure falls in ``[since, until)``, counted three ways.

    ``by_kind``, ``by_function`` and ``by_status`` each sum to ``total``.
    ``retries_failed`` counts replays that failed again (each letter's ``attempts - 1``),
    ``retries_succeeded`` letters a replay resolved.

    >>> stats = queue.stats(hours=24)  # doctest: +SKIP
    >>> stats.total == sum(stats.by_kind.values())  # doctest: +SKIP
    True
    """

    since: float
    until: float
    rows: tuple[StatRow, ...]
    total: int
    by_kind: Mapping[str, int]
    by_function: Mapping[str, int]
    by_status: Mapping[Status, int]
    retries_failed: int
    retries_succeeded: int

    @classmethod
    def from_rows(cls, rows: Iterable[StatRow], since: float, until: float) -> DeadLetterStats:
        """Sum store rows into totals (pure)."""
        rows = tuple(rows)
        by_kind: dict[str, int] = {}
        by_function: dict[str, int] = {}
        by_status: dict[Status, int] = dict.fromkeys(Status, 0)
        for row in rows:
            by_kind[row.kind] = by_kind.get(row.kind, 0) + row.count
            by_function[row.function] = by_function.get(row.function, 0) + row.count
            by_status[Status(row.status)] += row.count
        return cls(
            since=since,
            until=until,
            rows=rows,
            total=sum(row.count for row in rows),
            by_kind=by_kind,
            by_function=by_function,
            by_status=by_status,
            retries_failed=sum(row.retries for row in rows),
            retries_succeeded=sum(row.resolved_by_retry for row in rows),
        )


@dataclass(frozen=True)
class ReplayResult:
    """What the processor did with one claimed letter.

    ``outcome`` is ``"resolved"`` (the replay succeeded), ``"completed"`` (the call had
    completed meanwhile: resolved without running), ``"enqueued"`` (handed to a
    framework route), ``"failed"`` (failed again, retry scheduled), ``"abandoned"`` (no
    retry left, or not replayable), ``"skipped"`` (left for later or another process;
    ``reason`` says why) or ``"conflict"`` (someone changed the letter meanwhile).
    """

    id: str
    function: str
    outcome: Literal[
        "resolved", "completed", "enqueued", "failed", "abandoned", "skipped", "conflict"
    ]
    reason: str = ""
    letter: DeadLetter | None = None


@dataclass
class ProcessReport:
    """The outcome of one :meth:`DeadLetterQueue.process_due` run: one
    :class:`ReplayResult` per claimed letter, and how many spooled letters were delivered.

    >>> report = ProcessReport([ReplayResult("a1", "jobs.sync", "skipped", "not here")])
    >>> report.claimed, report.skipped
    (1, [('a1', 'not here')])
    """

    results: list[ReplayResult] = field(default_factory=list)
    spool_delivered: int = 0

    def _ids(self, *outcomes: str) -> list[str]:
        return [r.id for r in self.results if r.outcome in outcomes]

    @property
    def claimed(self) -> int:
        """How many letters were claimed."""
        return len(self.results)

    @property
    def resolved(self) -> list[str]:
        """Letters resolved: replayed, completed meanwhile, or enqueued."""
        return self._ids("resolved", "completed", "enqueued")

    @property
    def failed(self) -> list[str]:
        """Letters that failed again and have another retry scheduled."""
        return self._ids("failed")

    @property
    def abandoned(self) -> list[str]:
        """Letters with no retry left."""
        return self._ids("abandoned")

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(id, reason) of letters left alone (not replayable in this process, busy...)."""
        return [(r.id, r.reason) for r in self.results if r.outcome in ("skipped", "conflict")]


# ----------------------------------------------------------------------------------------
# The queue
# ----------------------------------------------------------------------------------------


class DeadLetterQueue:
    """Records failed calls, answers questions about them, and replays them when due.

    ``store`` is a :class:`~idempotask.backends.deadletters.DeadLetterStore`, a URL
    (``memory://``; stores for other schemes register through
    :func:`register_dead_letter_scheme`), or None for the configured store
    (``configure(dead_letter_store=...)``). ``classifier`` and ``policies`` (a mapping
    of :class:`~idempotask.taxonomy.FailureKind` to retry policy, merged over
    :data:`idempotask.retry.DEFAULT_POLICIES`) decide kinds and schedules.
    ``retention`` is how long resolved and abandoned letters are kept by :meth:`purge`
    (default ``configure(dead_letter_retention=...)``, 30 days). ``spool`` is the spool
    file, or a :class:`~idempotask.spool.Spool` (default: see :func:`idempotask.spool.spool_path`).
    ``clock`` gives wall-clock epoch seconds; ``skip_delay`` is how long a letter this
    process cannot replay is left for others before it is offered again.

    >>> queue = DeadLetterQueue("memory://")
    >>> letter = queue.record("billing.charge", TimeoutError("gateway"), arguments={"order": 7})
    >>> letter.kind, letter.status.value, letter.attempts
    ('transient', 'pending', 1)
    >>> queue.mark_resolved(letter.id).resolution
    'manual'

    Every method has an ``a``-prefixed coroutine twin (``arecord``, ``aprocess_due``...).
    """

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
    ) -> None:
        self._store_option = config.check_dead_letter_store(store)
        self._store: DeadLetterStore | None = (
            None if store is None or isinstance(store, str) else store
        )
        self._classifier = check_classifier(classifier)
        self._policies = check_policies(policies)
        self._retention = (
            None if retention is None else _seconds(retention, "retention", allow_zero=False)
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
        """The store, built on first use (the configured one when none was given)."""
        if self._store is not None:
            return self._store
        if isinstance(self._store_option, str):
            with self._lock:
                if self._store is None:
                    self._store = dead_letter_store_from_url(self._store_option)
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
        """Where letters wait while the store is unreachable."""
        if self._spool_option is not None:
            return self._spool_option
        s = config.settings()
        path = spool_path(s.spool_path, s.namespace)
        spool = self._spools.get(path)
        if spool is None:
            spool = self._spools.setdefault(path, Spool(path))
        return spool

    def on_alert(self, hook: Hook) -> Callable[[], None]:
        """Call ``hook(letter)`` for each dead letter of a ``critical=True`` function
        (when recorded, and when its retries run out); returns a remover.

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

    def _now(self, now: float | _dt.datetime | None) -> float:
        return float(self._clock()) if now is None else _epoch(now, "now")

    def _alert(self, letter: DeadLetter, event: str) -> None:
        """Log the letter; for critical functions, log CRITICAL and call the alert hooks."""
        text = (
            f"idempotask: {letter.function} {event}: {letter.error_type}: {letter.message} "
            f"(dead letter {letter.id}, {letter.kind}, attempt {letter.attempts}, "
            f"{Status(letter.status).value})"
        )
        if not letter.critical:
            log.log(logging.ERROR if letter.status is Status.ABANDONED else logging.WARNING, text)
            return
        log.critical(text)
        for hook in (*self._alerts, *config.settings().on_alert):
            _fire(hook, letter, "alert")

    # -- flows: the logic, written once ----------------------------------------------------

    def _store_flow(self) -> Flow[DeadLetterStore]:
        store: DeadLetterStore = yield _Op(lambda: self.store, None)
        return store

    def _spool_flow(self, letter: DeadLetter, cause: BaseException) -> Flow[DeadLetter]:
        try:
            spool = self.spool
            yield _Op(spool.append, None, letter)
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

    def _add_flow(self, letter: DeadLetter) -> Flow[DeadLetter]:
        """Store a new letter, or spool it; deliver the spool after a successful add."""
        try:
            store = yield from self._store_flow()
            stored: DeadLetter = yield _Op(store.add, store.aadd, letter)
        except Exception as exc:
            # BackendError is the expected case, but nothing the store does may lose it.
            return (yield from self._spool_flow(letter, exc))
        # The store answers again: deliver what waited. (Spool file I/O is synchronous on
        # the async path too: a stat here, and a few small writes only after an outage.)
        try:
            if self.spool.pending():
                yield from self._flush_flow(store)
        except Exception:
            log.warning("idempotask: could not deliver the dead-letter spool", exc_info=True)
        return stored

    def _record_flow(
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
    ) -> Flow[DeadLetter]:
        classification = _classify(classifier or self.classifier, error)
        merged = self.policies if policies is None else {**self.policies, **policies}
        if replay_of is not None:
            try:
                letter = yield from self._transition_flow(
                    replay_of, lambda x: _failure_changes(x, error, classification, merged, now)
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
                if events.listeners:  # a framework's replay of the letter failed again
                    _emit_letter(
                        EventKind.RETRY_EXHAUSTED
                        if letter.status is Status.ABANDONED
                        else EventKind.RETRY_FAILED,
                        letter,
                    )
                if letter.status is Status.ABANDONED:
                    self._alert(letter, "ran out of retries")
                return letter
        letter = _new_letter(
            function=function,
            error=error,
            classification=classification,
            policies=merged,
            arguments=arguments,
            key=key,
            route=route,
            critical=critical,
            now=now,
            id=replay_of,
        )
        letter = yield from self._add_flow(letter)
        if events.listeners:
            _emit_letter(EventKind.DEAD_LETTER, letter)
        self._alert(letter, "failed" if letter.status is Status.PENDING else "failed for good")
        return letter

    def _flush_flow(self, store: DeadLetterStore | None = None) -> Flow[int]:
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
                    for letter in batch:
                        try:
                            yield _Op(store.add, store.aadd, letter)
                        except BackendError as exc:
                            log.warning(
                                "idempotask: dead-letter store still unavailable (%s); %d "
                                "letter(s) stay in the spool %s",
                                exc,
                                len(batch) - delivered,
                                spool.path,
                            )
                            return delivered
                        batch.done(letter)
                        delivered += 1
        finally:
            batches.close()
        if delivered:
            log.info(
                "idempotask: delivered %d spooled dead letter(s) from %s", delivered, spool.path
            )
        return delivered

    def _transition_flow(
        self, id: str, decide: Callable[[DeadLetter], dict[str, Any]]
    ) -> Flow[DeadLetter]:
        """Read-modify-write with compare-and-set, again until no one interferes."""
        store = yield from self._store_flow()
        for _ in range(_CAS_TRIES):
            letter: DeadLetter | None = yield _Op(store.get, store.aget, id)
            if letter is None:
                raise DeadLetterNotFound(f"no dead letter has id {id!r}")
            updated: DeadLetter | None = yield _Op(
                store.update, store.aupdate, id, letter.version, **decide(letter)
            )
            if updated is not None:
                return updated
        raise BackendError(f"dead letter {id} kept changing; gave up after {_CAS_TRIES} tries")

    def _get_flow(self, id: str) -> Flow[DeadLetter | None]:
        store = yield from self._store_flow()
        letter: DeadLetter | None = yield _Op(store.get, store.aget, id)
        return letter

    def _query_flow(
        self, filter: DeadLetterFilter, limit: int, offset: int
    ) -> Flow[list[DeadLetter]]:
        store = yield from self._store_flow()
        found: list[DeadLetter] = yield _Op(
            store.query, store.aquery, filter, limit=limit, offset=offset
        )
        return found

    def _requeue_all_flow(self, filter: DeadLetterFilter, at: float) -> Flow[int]:
        if not filter.status:
            # Never reopen resolved letters by accident: a replay may run the call again.
            filter = dataclasses.replace(
                filter, status=(Status.PENDING, Status.RETRYING, Status.ABANDONED)
            )
        ids: list[str] = []
        while True:
            page = yield from self._query_flow(filter, _PAGE, len(ids))
            ids.extend(letter.id for letter in page)
            if len(page) < _PAGE:
                break
        count = 0
        for id in ids:
            try:
                yield from self._transition_flow(id, _reopen(at))
            except DeadLetterNotFound:
                continue  # purged meanwhile
            count += 1
        return count

    def _purge_flow(self, filter: DeadLetterFilter) -> Flow[int]:
        store = yield from self._store_flow()
        count: int = yield _Op(store.purge, store.apurge, filter)
        return count

    def _stats_flow(
        self, filter: DeadLetterFilter, since: float, until: float
    ) -> Flow[DeadLetterStats]:
        store = yield from self._store_flow()
        rows: list[StatRow] = yield _Op(store.stats, store.astats, filter)
        return DeadLetterStats.from_rows(rows, since, until)

    def _process_flow(
        self, limit: int, lease: float, now: float, filter: DeadLetterFilter | None
    ) -> Flow[ProcessReport]:
        report = ProcessReport()
        try:
            report.spool_delivered = yield from self._flush_flow()
        except Exception:
            log.warning("idempotask: could not deliver the dead-letter spool", exc_info=True)
        store = yield from self._store_flow()
        letters: list[DeadLetter] = yield _Op(
            store.claim_due, store.aclaim_due, now, limit=limit, lease=lease, filter=filter
        )
        for letter in letters:
            result = yield from self._replay_flow(store, letter, now)
            report.results.append(result)
            if events.listeners and result.letter is not None:
                replay_event = _REPLAY_EVENTS.get(result.outcome)
                if replay_event is not None:
                    _emit_letter(replay_event, result.letter)
        return report

    def _replay_flow(
        self, store: DeadLetterStore, letter: DeadLetter, now: float
    ) -> Flow[ReplayResult]:
        """Replay one claimed letter and record what happened, under its claim."""

        def finish(outcome: Any, changes: dict[str, Any], reason: str = "") -> Flow[ReplayResult]:
            try:
                updated: DeadLetter | None = yield _Op(
                    store.update, store.aupdate, letter.id, letter.version, **changes
                )
            except BackendError as exc:
                log.warning("idempotask: could not update dead letter %s: %s", letter.id, exc)
                return ReplayResult(letter.id, letter.function, "conflict", f"store error: {exc}")
            if updated is None:
                return ReplayResult(
                    letter.id, letter.function, "conflict", "the letter was changed meanwhile"
                )
            return ReplayResult(letter.id, letter.function, outcome, reason, updated)

        def skip(reason: str) -> Flow[ReplayResult]:
            # Released with a short delay, so letters this process cannot handle do not
            # crowd out the others at the head of the due list.
            result = yield from finish("skipped", {"next_retry_at": now + self._skip_delay}, reason)
            if result.outcome == "skipped":
                log.info("idempotask: dead letter %s skipped: %s", letter.id, reason)
            return result

        def abandon(reason: str) -> Flow[ReplayResult]:
            result = yield from finish("abandoned", _close(Status.ABANDONED, "")(letter), reason)
            if result.letter is not None:
                log.error("idempotask: dead letter %s abandoned: %s", letter.id, reason)
                self._exhausted(result.letter, reg)
            return result

        reg: _Registration | None = None
        handler: RouteHandler | None = None
        with _registry_lock:
            if letter.route:
                handler = _routes.get(letter.route)
            else:
                reg = _registry.get(letter.function)
        if letter.route and handler is None:
            return (yield from skip(f"no route {letter.route!r} is registered in this process"))
        if not letter.route and reg is None:
            return (
                yield from skip(
                    f"{letter.function} is not registered in this process; import the module "
                    "that defines it (the CLI's --import)"
                )
            )

        arguments = _stored_arguments(letter)
        if isinstance(arguments, str):
            return (yield from abandon(arguments))
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}
        if reg is not None:
            call = _call_arguments(reg, letter, arguments)
            if isinstance(call, str):
                return (yield from abandon(call))
            args, kwargs = call

        if letter.key:
            backend: Backend
            try:
                backend = (
                    reg.spec.backend()
                    if reg is not None and reg.spec is not None
                    else config.get_backend()
                )
                record = yield _Op(backend.get, backend.aget, letter.key)
                if record is not None and record.state is State.FAILED:
                    # A cached error would answer the replay without running it.
                    yield _Op(backend.delete, backend.adelete, letter.key, token=record.token)
            except BackendError as exc:
                return (yield from skip(f"the idempotency store is unavailable: {exc}"))
            if record is not None and record.state is State.COMPLETED:
                return (
                    yield from finish("completed", _close(Status.RESOLVED, "completed")(letter))
                )
            if record is not None and record.state is State.IN_PROGRESS:
                return (yield from skip("the call is running elsewhere right now"))

        if reg is not None:
            outcome: _Outcome = yield _Op(_replay_sync, _replay_async, reg, letter.id, args, kwargs)
        else:
            assert handler is not None
            outcome = yield _Op(_route_call, None, handler, letter, arguments)

        error = outcome.error
        if error is None:
            resolution = "retry" if reg is not None else "enqueued"
            return (
                yield from finish(
                    "resolved" if reg is not None else "enqueued",
                    _close(Status.RESOLVED, resolution)(letter),
                )
            )
        if isinstance(error, AlreadyInProgress):
            return (yield from skip("the call is running elsewhere right now"))
        if isinstance(error, ReplayError):
            return (yield from skip(str(error)))
        classifier = (reg.classifier if reg is not None else None) or self.classifier
        policies = self.policies
        if reg is not None and reg.policies is not None:
            policies = {**policies, **reg.policies}
        changes = _failure_changes(letter, error, _classify(classifier, error), policies, now)
        outcome_name = "failed" if changes["status"] is Status.RETRYING else "abandoned"
        result = yield from finish(
            outcome_name, changes, f"{changes['error_type']}: {changes['message']}"
        )
        if result.letter is not None and result.outcome == "abandoned":
            self._exhausted(result.letter, reg)
        return result

    def _exhausted(self, letter: DeadLetter, reg: _Registration | None) -> None:
        self._alert(letter, "ran out of retries")
        if reg is not None:
            _fire(reg.on_retry_exhausted, letter, "on_retry_exhausted")

    # -- the public face: thin sync and async wrappers --------------------------------------

    def record(
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
    ) -> DeadLetter:
        """Record that ``function`` failed with ``error``; returns the letter.

        ``arguments`` (name -> value, already redacted) are stored as typed JSON; values
        it cannot hold become :class:`Unserializable`. ``key`` is the call's idempotency
        key, ``route`` the integration that replays it. ``replay_of`` names a letter this
        failure is a new attempt of (integrations use it for framework-run replays): that
        letter is updated instead of a new one added. When the store is down the letter is
        spooled (and :class:`~idempotask.spool.SpoolError` raised if that fails too).

        >>> DeadLetterQueue("memory://").record("jobs.sync", ValueError("bad")).status.value
        'abandoned'
        """
        return _drive(
            self._record(
                function,
                error,
                arguments,
                key,
                route,
                critical,
                classifier,
                policies,
                replay_of,
                now,
            )
        )

    async def arecord(
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
    ) -> DeadLetter:
        """Async :meth:`record`."""
        return await _adrive(
            self._record(
                function,
                error,
                arguments,
                key,
                route,
                critical,
                classifier,
                policies,
                replay_of,
                now,
            )
        )

    def _record(
        self,
        function: str,
        error: BaseException,
        arguments: Mapping[str, Any] | None,
        key: str,
        route: str,
        critical: bool,
        classifier: Classifier | None,
        policies: Mapping[FailureKind | str, RetryPolicy] | None,
        replay_of: str | None,
        now: float | _dt.datetime | None,
    ) -> Flow[DeadLetter]:
        if not isinstance(function, str) or not function:
            raise ConfigurationError(f"record: expected a function name, got {function!r}")
        if not isinstance(error, BaseException):
            raise ConfigurationError(f"record: expected an exception, got {error!r}")
        return self._record_flow(
            function,
            error,
            arguments=_arguments_payload(arguments),
            key=key,
            route=route,
            critical=critical,
            classifier=check_classifier(classifier),
            policies=check_policies(policies),
            replay_of=replay_of,
            now=self._now(now),
        )

    def get(self, id: str) -> DeadLetter | None:
        """The letter with this id, or None."""
        return _drive(self._get_flow(id))

    async def aget(self, id: str) -> DeadLetter | None:
        """Async :meth:`get`."""
        return await _adrive(self._get_flow(id))

    def query(
        self,
        *,
        status: Status | str | Iterable[Status | str] | None = None,
        kind: FailureKind | str | Iterable[FailureKind | str] | None = None,
        function: str | Iterable[str] | None = None,
        since: float | _dt.datetime | None = None,
        until: float | _dt.datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[DeadLetter]:
        """Letters matching every filter given, newest failure first.

        ``since``/``until`` bound the last failure time (``since <= t < until``).

        >>> DeadLetterQueue("memory://").query(status="pending", kind="transient")
        []
        """
        return _drive(
            self._query_flow(_make_filter(status, kind, function, since, until), limit, offset)
        )

    async def aquery(
        self,
        *,
        status: Status | str | Iterable[Status | str] | None = None,
        kind: FailureKind | str | Iterable[FailureKind | str] | None = None,
        function: str | Iterable[str] | None = None,
        since: float | _dt.datetime | None = None,
        until: float | _dt.datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[DeadLetter]:
        """Async :meth:`query`."""
        return await _adrive(
            self._query_flow(_make_filter(status, kind, function, since, until), limit, offset)
        )

    def _due_at(self, at: float | _dt.datetime | None, in_: float | _dt.timedelta | None) -> float:
        if at is not None and in_ is not None:
            raise ConfigurationError("schedule_retry: pass at= or in_=, not both")
        if at is not None:
            return _epoch(at, "at")
        return self._now(None) + (0.0 if in_ is None else _seconds(in_, "in_"))

    def schedule_retry(
        self,
        id: str,
        *,
        at: float | _dt.datetime | None = None,
        in_: float | _dt.timedelta | None = None,
    ) -> DeadLetter:
        """Make the letter due at ``at`` (or ``in_`` seconds from now; default now).

        A resolved or abandoned letter is reopened as PENDING; attempts are kept, so
        the policy still decides what follows a failure.

        >>> queue.schedule_retry(letter_id, in_=3600)  # doctest: +SKIP
        """
        return _drive(self._transition_flow(id, _reopen(self._due_at(at, in_))))

    async def aschedule_retry(
        self,
        id: str,
        *,
        at: float | _dt.datetime | None = None,
        in_: float | _dt.timedelta | None = None,
    ) -> DeadLetter:
        """Async :meth:`schedule_retry`."""
        return await _adrive(self._transition_flow(id, _reopen(self._due_at(at, in_))))

    def requeue(self, id: str) -> DeadLetter:
        """Make the letter due now (reopening it if it was closed)."""
        return self.schedule_retry(id)

    async def arequeue(self, id: str) -> DeadLetter:
        """Async :meth:`requeue`."""
        return await self.aschedule_retry(id)

    def requeue_all(
        self,
        filter: DeadLetterFilter | None = None,
        *,
        status: Status | str | Iterable[Status | str] | None = None,
        kind: FailureKind | str | Iterable[FailureKind | str] | None = None,
        function: str | Iterable[str] | None = None,
        since: float | _dt.datetime | None = None,
        until: float | _dt.datetime | None = None,
    ) -> int:
        """Make every matching letter due now; returns how many.

        Without a status, RESOLVED letters are left alone (replaying them could run a
        finished call again); ask for ``status="resolved"`` explicitly.

        >>> queue.requeue_all(kind="external", function="billing.charge")  # doctest: +SKIP
        3
        """
        chosen = filter or _make_filter(status, kind, function, since, until)
        return _drive(self._requeue_all_flow(chosen, self._now(None)))

    async def arequeue_all(
        self,
        filter: DeadLetterFilter | None = None,
        *,
        status: Status | str | Iterable[Status | str] | None = None,
        kind: FailureKind | str | Iterable[FailureKind | str] | None = None,
        function: str | Iterable[str] | None = None,
        since: float | _dt.datetime | None = None,
        until: float | _dt.datetime | None = None,
    ) -> int:
        """Async :meth:`requeue_all`."""
        chosen = filter or _make_filter(status, kind, function, since, until)
        return await _adrive(self._requeue_all_flow(chosen, self._now(None)))

    def mark_resolved(self, id: str, resolution: str = "manual") -> DeadLetter:
        """Close the letter as RESOLVED (nothing more is retried)."""
        return _drive(self._transition_flow(id, _close(Status.RESOLVED, resolution)))

    async def amark_resolved(self, id: str, resolution: str = "manual") -> DeadLetter:
        """Async :meth:`mark_resolved`."""
        return await _adrive(self._transition_flow(id, _close(Status.RESOLVED, resolution)))

    def mark_abandoned(self, id: str) -> DeadLetter:
        """Close the letter as ABANDONED (kept for people, never retried)."""
        return _drive(self._transition_flow(id, _close(Status.ABANDONED, "")))

    async def amark_abandoned(self, id: str) -> DeadLetter:
        """Async :meth:`mark_abandoned`."""
        return await _adrive(self._transition_flow(id, _close(Status.ABANDONED, "")))

    def _purge_filter(
        self,
        older_than: float | _dt.timedelta | None,
        status: Status | str | Iterable[Status | str] | None,
        now: float | _dt.datetime | None,
    ) -> DeadLetterFilter:
        age = self.retention if older_than is None else _seconds(older_than, "older_than")
        statuses = (Status.RESOLVED, Status.ABANDONED) if status is None else status
        return _make_filter(statuses, until=self._now(now) - age)

    def purge(
        self,
        older_than: float | _dt.timedelta | None = None,
        *,
        status: Status | str | Iterable[Status | str] | None = None,
        now: float | _dt.datetime | None = None,
    ) -> int:
        """Delete letters whose last failure is older than ``older_than`` (default: the
        retention); only RESOLVED and ABANDONED ones unless ``status`` says otherwise.

        >>> queue.purge(older_than=timedelta(days=7))  # doctest: +SKIP
        12
        """
        return _drive(self._purge_flow(self._purge_filter(older_than, status, now)))

    async def apurge(
        self,
        older_than: float | _dt.timedelta | None = None,
        *,
        status: Status | str | Iterable[Status | str] | None = None,
        now: float | _dt.datetime | None = None,
    ) -> int:
        """Async :meth:`purge`."""
        return await _adrive(self._purge_flow(self._purge_filter(older_than, status, now)))

    def _stats_window(
        self, hours: float, now: float | _dt.datetime | None, function: Any, kind: Any
    ) -> tuple[DeadLetterFilter, float, float]:
        until = self._now(now)
        since = until - config.check_seconds("hours", hours) * 3600.0
        return _make_filter(None, kind, function, since), since, until

    def stats(
        self,
        hours: float = 24,
        *,
        function: str | Iterable[str] | None = None,
        kind: FailureKind | str | Iterable[FailureKind | str] | None = None,
        now: float | _dt.datetime | None = None,
    ) -> DeadLetterStats:
        """Counts of the letters that last failed in the past ``hours``, by kind,
        function and status, with replays that failed and succeeded.

        >>> DeadLetterQueue("memory://").stats(hours=1).total
        0
        """
        return _drive(self._stats_flow(*self._stats_window(hours, now, function, kind)))

    async def astats(
        self,
        hours: float = 24,
        *,
        function: str | Iterable[str] | None = None,
        kind: FailureKind | str | Iterable[FailureKind | str] | None = None,
        now: float | _dt.datetime | None = None,
    ) -> DeadLetterStats:
        """Async :meth:`stats`."""
        return await _adrive(self._stats_flow(*self._stats_window(hours, now, function, kind)))

    def flush_spool(self) -> int:
        """Deliver spooled letters to the store; returns how many were delivered.

        Letters the store still refuses stay spooled; delivering one twice is harmless.
        """
        return _drive(self._flush_flow())

    async def aflush_spool(self) -> int:
        """Async :meth:`flush_spool`."""
        return await _adrive(self._flush_flow())

    def process_due(
        self,
        limit: int = 100,
        lease: float = 300.0,
        *,
        now: float | _dt.datetime | None = None,
        filter: DeadLetterFilter | None = None,
    ) -> ProcessReport:
        """Claim up to ``limit`` due letters for ``lease`` seconds and replay each.

        Run it from cron or a loop, in as many processes as you like: a letter is
        replayed by one processor at a time. Letters of functions this process does not
        know are released for others and reported as skipped. The spool is delivered
        first.

        >>> report = queue.process_due(limit=50)  # doctest: +SKIP
        >>> report.resolved, report.failed, report.skipped  # doctest: +SKIP
        """
        return _drive(self._process(limit, lease, now, filter))

    async def aprocess_due(
        self,
        limit: int = 100,
        lease: float = 300.0,
        *,
        now: float | _dt.datetime | None = None,
        filter: DeadLetterFilter | None = None,
    ) -> ProcessReport:
        """Async :meth:`process_due`; sync functions are replayed in a worker thread."""
        return await _adrive(self._process(limit, lease, now, filter))

    def _process(
        self,
        limit: int,
        lease: float,
        now: float | _dt.datetime | None,
        filter: DeadLetterFilter | None,
    ) -> Flow[ProcessReport]:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"limit: expected a positive int, got {limit!r}")
        return self._process_flow(
            limit, config.check_seconds("lease", lease), self._now(now), filter
        )


_default_queue: DeadLetterQueue | None = None
_default_queue_lock = threading.Lock()


def default_queue() -> DeadLetterQueue:
    """The process-wide queue ``@dead_letter`` uses unless given ``queue=``.

    It follows the configuration at each use (store, spool, retention, alert hooks).

    >>> default_queue() is default_queue()
    True
    """
    global _default_queue
    if _default_queue is None:
        with _default_queue_lock:
            if _default_queue is None:
                _default_queue = DeadLetterQueue()
    return _default_queue

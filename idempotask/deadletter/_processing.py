"""Processing: claim due letters with a lease (so two processors never replay one) and
replay each -- the original call under its original idempotency key, or not at all."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from idempotask import config, events
from idempotask._printable import printable
from idempotask.backends._twins import twins
from idempotask.backends.base import Backend, DeadLetter, DeadLetterFilter, Record, State, Status
from idempotask.deadletter._arguments import letter_arguments
from idempotask.deadletter._base import QueueCore, emit_letter
from idempotask.deadletter._core import ReplayError, fire_hook
from idempotask.deadletter._letters import after_failure, classify, close, skipped
from idempotask.deadletter._replay import (
    Prepared,
    Registration,
    lookup,
    prepare,
    registered_functions,
    registered_routes,
    run_async,
    run_sync,
)
from idempotask.errors import AlreadyInProgress, BackendError, ConfigurationError
from idempotask.events import EventKind
from idempotask.flow import Flow, Op, store_op

__all__ = ["ProcessReport", "Processing", "ReplayResult"]

log = logging.getLogger("idempotask")

ACTOR = "processor"

Outcomes = Literal[
    "resolved", "completed", "enqueued", "failed", "abandoned", "held", "skipped", "conflict"
]

# What a replay's outcome tells event listeners; the other outcomes (held, skipped,
# conflict, enqueued to a framework) settle nothing yet, so they emit nothing.
_REPLAY_EVENTS = {
    "resolved": EventKind.RETRY_SUCCEEDED,
    "completed": EventKind.RETRY_SUCCEEDED,
    "failed": EventKind.RETRY_FAILED,
    "abandoned": EventKind.RETRY_EXHAUSTED,
}


@dataclass(frozen=True)
class ReplayResult:
    """What the processor did with one claimed letter.

    ``outcome`` is ``"resolved"`` (the replay succeeded), ``"completed"`` (the call had
    completed meanwhile: resolved without running), ``"enqueued"`` (handed to a
    framework route), ``"failed"`` (failed again, retry scheduled), ``"abandoned"`` (no
    retry left, or not replayable under ``unreplayable="abandon"``), ``"held"`` (the
    stored arguments cannot rebuild the call: left open, without a retry, for a person),
    ``"skipped"`` (left for later or another process) or ``"conflict"`` (someone changed
    the letter meanwhile). ``reason`` says why, in full, for the last four.
    """

    id: str
    function: str
    outcome: Outcomes
    reason: str = ""
    letter: DeadLetter | None = None


@dataclass
class ProcessReport:
    """The outcome of one :meth:`DeadLetterQueue.process_due` run: one
    :class:`ReplayResult` per claimed letter, how many spooled letters were delivered,
    and ``note``: why nothing was claimed, when this process can replay nothing.

    >>> report = ProcessReport([ReplayResult("a1", "jobs.sync", "skipped", "not here")])
    >>> report.claimed, report.skipped
    (1, [('a1', 'not here')])
    """

    results: list[ReplayResult] = field(default_factory=list)
    spool_delivered: int = 0
    note: str = ""

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
    def held(self) -> list[tuple[str, str]]:
        """(id, reason) of letters left open for a person: their call cannot be rebuilt."""
        return [(r.id, r.reason) for r in self.results if r.outcome == "held"]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(id, reason) of letters left alone (not replayable in this process, busy...)."""
        return [(r.id, r.reason) for r in self.results if r.outcome in ("skipped", "conflict")]


async def _aprepare(reg: Registration, letter: DeadLetter) -> Prepared | str:
    # A replay_with= hook (which may reload from a database) runs in a worker thread,
    # off the event loop.
    if reg.replay_with is None:
        return prepare(reg, letter)
    return await asyncio.to_thread(prepare, reg, letter)


def _claim_filter(
    chosen: DeadLetterFilter | None, functions: set[str], routes: tuple[str, ...]
) -> DeadLetterFilter | str | None:
    """What to claim: ``chosen`` narrowed to the functions this process can replay when it
    has no route (letters of other functions stay untouched for other processes), or why
    nothing can be claimed here."""
    if not functions and not routes:
        return (
            "no @dead_letter function or integration route is registered in this process, so "
            "no letter can be replayed here: import the modules that define them first (the "
            "command line's --import MODULE); due letters were left untouched"
        )
    if routes:
        return chosen
    base = chosen or DeadLetterFilter()
    names = functions if not base.function else functions & set(base.function)
    if not names:
        return (
            f"none of the functions asked for ({', '.join(base.function)}) is registered in "
            "this process: import the modules that define them (--import MODULE)"
        )
    return dataclasses.replace(base, function=tuple(sorted(names)))


class Processing(QueueCore):
    """The processing part of :class:`~idempotask.deadletter.DeadLetterQueue`."""

    def _process_due(
        self,
        limit: int = 100,
        lease: float = 300.0,
        *,
        now: float | _dt.datetime | None = None,
        filter: DeadLetterFilter | None = None,
    ) -> Flow[ProcessReport]:
        """Claim up to ``limit`` due letters for ``lease`` seconds and replay each.

        Run it from cron or a loop, in as many processes as you like: a letter is
        replayed by one processor at a time. A process claims only letters it can replay
        when it has no integration route (with routes, letters of functions it does not
        know are released for others after ``skip_delay``); one that knows no function
        and no route claims nothing and says why in :attr:`ProcessReport.note`. The
        spool is delivered first.

        >>> report = queue.process_due(limit=50)  # doctest: +SKIP
        >>> report.resolved, report.failed, report.skipped  # doctest: +SKIP
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"limit: expected a positive int, got {limit!r}")
        if filter is not None and not isinstance(filter, DeadLetterFilter):
            raise ConfigurationError(f"filter: expected a DeadLetterFilter, got {filter!r}")
        lease = config.check_seconds("lease", lease)
        at = self.now(now)
        report = ProcessReport()
        report.spool_delivered = yield from self._deliver_flow()
        chosen = _claim_filter(filter, set(registered_functions()), registered_routes())
        if isinstance(chosen, str):
            report.note = chosen
            return report
        store = yield from self._store_flow()
        letters: list[DeadLetter] = yield store_op(
            store, "claim_due", at, limit=limit, lease=lease, filter=chosen
        )
        for letter in letters:
            result = yield from self._replay_flow(store, letter, at)
            report.results.append(result)
            if events.listeners and result.letter is not None:
                replay_event = _REPLAY_EVENTS.get(result.outcome)
                if replay_event is not None:
                    emit_letter(replay_event, result.letter)
        return report

    # Whatever a replay, its replay_with= hook or its route raises is thrown back into the
    # flow, which records it on the letter; what the flow does not catch propagates.
    process_due, aprocess_due = twins(
        _process_due,
        catch=(Exception,),
        adoc="Async :meth:`process_due`; sync functions are replayed in a worker thread.",
    )

    def _replay_flow(self, store: Any, letter: DeadLetter, now: float) -> Flow[ReplayResult]:
        """Replay one claimed letter and record what happened, under its claim."""

        def finish(
            outcome: Outcomes, changes: dict[str, Any], reason: str = ""
        ) -> Flow[ReplayResult]:
            try:
                updated: DeadLetter | None = yield store_op(
                    store, "update", letter.id, letter.version, **changes
                )
            except BackendError as exc:
                log.warning(
                    "idempotask: could not update dead letter %s: %s",
                    printable(letter.id),
                    printable(str(exc)),
                )
                return ReplayResult(letter.id, letter.function, "conflict", f"store error: {exc}")
            if updated is None:
                return ReplayResult(
                    letter.id, letter.function, "conflict", "the letter was changed meanwhile"
                )
            return ReplayResult(letter.id, letter.function, outcome, reason, updated)

        def resolve(
            outcome: Outcomes, resolution: str, what: str, note: str = ""
        ) -> Flow[ReplayResult]:
            decide = close(Status.RESOLVED, resolution, what, now, ACTOR, note)
            return finish(outcome, decide(letter))

        def skip(reason: str) -> Flow[ReplayResult]:
            # Released with a short delay, so letters this process cannot handle do not
            # crowd out the others at the head of the due list.
            changes = skipped(letter, now, ACTOR, reason, now + self._skip_delay)
            result = yield from finish("skipped", changes, reason)
            if result.outcome == "skipped":
                log.info(
                    "idempotask: dead letter %s skipped: %s",
                    printable(letter.id),
                    printable(reason),
                )
            return result

        def cannot_replay(reason: str) -> Flow[ReplayResult]:
            if self._unreplayable == "abandon":
                decide = close(Status.ABANDONED, "", "abandoned", now, ACTOR, reason)
                result = yield from finish("abandoned", decide(letter), reason)
                if result.letter is not None:
                    log.error(
                        "idempotask: dead letter %s abandoned: %s",
                        printable(letter.id),
                        printable(reason),
                    )
                    self._exhausted(result.letter, reg)
                return result
            result = yield from finish("held", skipped(letter, now, ACTOR, reason, None), reason)
            if result.letter is not None:
                log.warning(
                    "idempotask: dead letter %s of %s cannot be replayed, so it waits for a "
                    "person (no retry is scheduled): %s",
                    printable(letter.id),
                    printable(letter.function),
                    printable(reason),
                )
            return result

        reg, handler = lookup(letter)
        if reg is None and handler is None:
            missing = (
                f"no route {letter.route!r} is registered in this process; import the module "
                "that registers it"
                if letter.route
                else f"{letter.function} is not registered in this process; import the module "
                "that defines it"
            )
            return (yield from skip(f"{missing} (the command line's --import)"))

        # Whether the call completed (or is running) meanwhile: that settles the letter
        # whatever its stored arguments hold.
        backend: Backend | None = None
        record: Record | None = None
        if letter.key:
            try:
                backend = (
                    reg.spec.backend()
                    if reg is not None and reg.spec is not None
                    else config.get_backend()
                )
                record = yield store_op(backend, "get", letter.key)
            except BackendError as exc:
                return (yield from skip(f"the idempotency store is unavailable: {exc}"))
            if record is not None and record.state is State.COMPLETED:
                note = "the call had completed meanwhile"
                return (yield from resolve("completed", "completed", "completed", note))
            if record is not None and record.state is State.IN_PROGRESS:
                return (yield from skip("the call is running elsewhere right now"))

        prepared: Prepared | None = None
        arguments: dict[str, Any] = {}
        failure: Exception | None = None
        if reg is not None:
            try:
                made: Prepared | str = yield Op(prepare, _aprepare, reg, letter)
            except Exception as exc:  # the replay_with= hook failed: the replay failed
                failure = exc
            else:
                if isinstance(made, str):
                    return (yield from cannot_replay(made))
                prepared = made
        else:
            stored = letter_arguments(letter)
            if not stored.complete:
                return (
                    yield from cannot_replay(
                        f"{stored.why_incomplete()}; a route replays stored arguments only"
                    )
                )
            arguments = dict(stored.values or {})

        if failure is None:
            if backend is not None and record is not None and record.state is State.FAILED:
                # A cached error would answer the replay without running it (one under a
                # previous name of the function too: see previous_names).
                try:
                    yield store_op(backend, "delete", letter.key, token=record.token)
                    for old in _previous_keys(reg, letter.key):
                        cached = yield store_op(backend, "get", old)
                        if cached is not None and cached.state is State.FAILED:
                            yield store_op(backend, "delete", old, token=cached.token)
                except BackendError as exc:
                    return (yield from skip(f"the idempotency store is unavailable: {exc}"))
            try:
                if prepared is not None:
                    yield Op(run_sync, run_async, reg, letter.id, prepared)
                elif handler is not None:
                    yield Op(handler, None, letter, arguments)
            except Exception as exc:  # the replay (or its route) failed
                failure = exc

        if failure is None and reg is not None:
            return (yield from resolve("resolved", "retry", "retried"))
        if failure is None:
            note = f"handed to the {letter.route} route"
            return (yield from resolve("enqueued", "enqueued", "retried", note))
        if isinstance(failure, AlreadyInProgress):
            return (yield from skip("the call is running elsewhere right now"))
        if isinstance(failure, ReplayError):
            return (yield from skip(str(failure)))
        classifier = (reg.classifier if reg is not None else None) or self.classifier
        policies = self.merged_policies(reg.policies if reg is not None else None)
        changes = after_failure(failure, classify(classifier, failure), policies, now, ACTOR)(
            letter
        )
        outcome_name: Outcomes = "failed" if changes["status"] is Status.RETRYING else "abandoned"
        result = yield from finish(
            outcome_name, changes, f"{changes['error_type']}: {changes['message']}"
        )
        if result.letter is not None and result.outcome == "abandoned":
            self._exhausted(result.letter, reg)
        return result

    def _exhausted(self, letter: DeadLetter, reg: Registration | None) -> None:
        self._alert(letter, "ran out of retries")
        if reg is not None:
            fire_hook(reg.on_retry_exhausted, letter, "on_retry_exhausted")


def _previous_keys(reg: Registration | None, key: str) -> tuple[str, ...]:
    """``key`` under each previous name of ``reg``'s @idempotent function (none when
    ``key`` is not one of its keys): ``namespace:name:v1:digest`` with the name swapped."""
    spec = reg.spec if reg is not None else None
    if spec is None:
        return ()
    namespace, _, rest = key.partition(":")
    head = f"{spec.name}:"
    if not rest.startswith(head):
        return ()
    tail = rest[len(head) :]
    return tuple(f"{namespace}:{old}:{tail}" for old in spec.options.previous_names)

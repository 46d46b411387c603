"""Administration: questions about letters (get, find by id prefix, query, count, stats)
and what people do to them (requeue, resolve, abandon, purge), one by one or by filter,
each recorded in the letter's history with ``actor=`` (see
:func:`~idempotask.deadletter._core.check_actor`) and ``note``.

A person's change never ends a processor's claim: a letter being replayed right now is
refused (:class:`~idempotask.errors.AlreadyInProgress`) or, in bulk, passed over. Ending
the claim would let a second processor replay the letter beside the first -- at once
after a requeue, or after a close followed by a requeue.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from idempotask import config
from idempotask.backends._twins import twins
from idempotask.backends.base import DeadLetter, DeadLetterFilter, StatRow, Status
from idempotask.deadletter._base import QueueCore
from idempotask.deadletter._core import (
    PAGE,
    AmbiguousLetterId,
    DeadLetterNotFound,
    check_actor,
    make_filter,
)
from idempotask.deadletter._letters import Decide, close, reopen
from idempotask.errors import AlreadyInProgress, ConfigurationError
from idempotask.flow import Flow, store_op
from idempotask.taxonomy import FailureKind

__all__ = ["Administration", "DeadLetterStats"]

FIND_SCAN = 10_000  # newest letters an id prefix is looked for among
_NOT_RESOLVED = (Status.PENDING, Status.RETRYING, Status.ABANDONED)
_OPEN = (Status.PENDING, Status.RETRYING)

Statuses = Status | str | Iterable[Status | str] | None
Kinds = FailureKind | str | Iterable[FailureKind | str] | None
Functions = str | Iterable[str] | None
Moment = float | _dt.datetime | None


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


def _note(note: Any) -> str:
    if not isinstance(note, str):
        raise ConfigurationError(f"note: expected text, got {type(note).__name__}")
    return note.strip()


class Administration(QueueCore):
    """The administration part of :class:`~idempotask.deadletter.DeadLetterQueue`."""

    @staticmethod
    def filter(
        *,
        status: Statuses = None,
        kind: Kinds = None,
        function: Functions = None,
        since: Moment = None,
        until: Moment = None,
        search: str | None = None,
    ) -> DeadLetterFilter:
        """A filter for the bulk operations and :meth:`count`: letters with any of the
        statuses, kinds and functions given (each a value or several), whose last failure
        is in ``[since, until)`` and whose error type or message contains ``search``
        (ignoring case). Nothing given matches every letter.

        >>> from idempotask import DeadLetterQueue
        >>> DeadLetterQueue.filter(status="pending", search="timeout").status
        (<Status.PENDING: 'pending'>,)
        """
        return make_filter(status, kind, function, since, until, search)

    # -- questions -------------------------------------------------------------------------

    def _get(self, id: str) -> Flow[DeadLetter | None]:
        """The letter with this id, or None."""
        store = yield from self._store_flow()
        letter: DeadLetter | None = yield store_op(store, "get", id)
        return letter

    get, aget = twins(_get)

    def _find(self, id: str) -> Flow[DeadLetter]:
        """The letter whose id is ``id``, else the one letter whose id starts with it (at
        least 4 characters; a trailing ``...`` is ignored), looked for among the newest
        10,000. :class:`DeadLetterNotFound` when there is none,
        :class:`AmbiguousLetterId` (with the ``candidates``) when there are several.

        >>> queue.find("3f2a9c").id  # doctest: +SKIP
        '3f2a9c81d2...'
        """
        if not isinstance(id, str):
            raise ConfigurationError(f"id: expected text, got {type(id).__name__}")
        text = id.strip().removesuffix("...").removesuffix("\u2026")
        if text:
            letter = yield from self._get(text)
            if letter is not None:
                return letter
        if len(text) < 4:
            raise DeadLetterNotFound(f"no dead letter has id {id!r}")
        found: list[DeadLetter] = []
        scanned = 0
        while scanned < FIND_SCAN:
            page = yield from self._query_flow(DeadLetterFilter(), PAGE, scanned)
            found.extend(x for x in page if x.id.startswith(text))
            scanned += len(page)
            if len(page) < PAGE or len(found) > 10:
                break
        if len(found) == 1:
            return found[0]
        if found:
            ids = tuple(x.id for x in found[:10])
            raise AmbiguousLetterId(
                f"{len(found)}{'+' if len(found) > 10 else ''} dead letters have an id "
                f"starting with {text!r} ({', '.join(ids)}); give more of the id",
                candidates=ids,
            )
        among = f" among the newest {scanned:,}" if scanned >= FIND_SCAN else ""
        raise DeadLetterNotFound(f"no dead letter has id {id!r} or an id starting with it{among}")

    find, afind = twins(_find)

    def _query(
        self,
        *,
        status: Statuses = None,
        kind: Kinds = None,
        function: Functions = None,
        since: Moment = None,
        until: Moment = None,
        search: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> Flow[list[DeadLetter]]:
        """Letters matching every criterion given (see :meth:`filter`), newest failure
        first (ties by id, so pages are stable).

        >>> from idempotask import DeadLetterQueue
        >>> DeadLetterQueue("memory://").query(status="pending", kind="transient")
        []
        """
        chosen = make_filter(status, kind, function, since, until, search)
        return self._query_flow(chosen, limit, offset)

    query, aquery = twins(_query)

    def _query_flow(
        self, filter: DeadLetterFilter, limit: int, offset: int
    ) -> Flow[list[DeadLetter]]:
        for option, value, least in (("limit", limit, 1), ("offset", offset, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigurationError(f"{option}: expected an int >= {least}, got {value!r}")
        store = yield from self._store_flow()
        found: list[DeadLetter] = yield store_op(store, "query", filter, limit=limit, offset=offset)
        return found

    def _count(self, filter: DeadLetterFilter | None = None) -> Flow[int]:
        """How many letters match ``filter`` (see :meth:`filter`; None: all).

        >>> from idempotask import DeadLetterQueue
        >>> DeadLetterQueue("memory://").count(DeadLetterQueue.filter(status="pending"))
        0
        """
        store = yield from self._store_flow()
        rows: list[StatRow] = yield store_op(store, "stats", filter or DeadLetterFilter())
        return sum(row.count for row in rows)

    count, acount = twins(_count)

    def _stats(
        self,
        hours: float = 24,
        *,
        function: Functions = None,
        kind: Kinds = None,
        now: Moment = None,
    ) -> Flow[DeadLetterStats]:
        """Counts of the letters that last failed in the past ``hours``, by kind,
        function and status, with replays that failed and succeeded.

        >>> from idempotask import DeadLetterQueue
        >>> DeadLetterQueue("memory://").stats(hours=1).total
        0
        """
        until = self.now(now)
        since = until - config.check_seconds("hours", hours, allow_zero=True) * 3600.0
        chosen = make_filter(None, kind, function, since)
        store = yield from self._store_flow()
        rows: list[StatRow] = yield store_op(store, "stats", chosen)
        return DeadLetterStats.from_rows(rows, since, until)

    stats, astats = twins(_stats)

    # -- one letter ------------------------------------------------------------------------

    def _reopen(
        self, at: Moment, in_: float | _dt.timedelta | None, actor: str, note: str
    ) -> Decide:
        if at is not None and in_ is not None:
            raise ConfigurationError("schedule_retry: pass at= or in_=, not both")
        if at is not None:
            due = self.now(at)
        else:
            delay = 0.0 if in_ is None else config.check_seconds("in_", in_, allow_zero=True)
            due = self.now() + delay
        return reopen(due, self.now(), check_actor(actor), _note(note))

    def _schedule_retry(
        self,
        id: str,
        *,
        at: Moment = None,
        in_: float | _dt.timedelta | None = None,
        actor: str = "api",
        note: str = "",
    ) -> Flow[DeadLetter]:
        """Make the letter due at ``at`` (or ``in_`` seconds from now; default now).

        A resolved or abandoned letter is reopened as PENDING; attempts are kept, so
        the policy still decides what follows a failure. The history records
        ``requeued`` by ``actor``, with ``note``. A letter a processor is replaying right
        now is left alone: :class:`~idempotask.errors.AlreadyInProgress` (try again
        after the replay ends), so no second processor replays it beside the first.

        >>> queue.schedule_retry(letter_id, in_=3600)  # doctest: +SKIP
        """
        decide = self._reopen(at, in_, actor, note)
        return self._transition_flow(id, decide, unless_claimed=True)

    schedule_retry, aschedule_retry = twins(_schedule_retry)

    def _requeue(self, id: str, *, actor: str = "api", note: str = "") -> Flow[DeadLetter]:
        """Make the letter due now (reopening it if it was closed);
        :class:`~idempotask.errors.AlreadyInProgress` while a processor replays it."""
        return self._schedule_retry(id, actor=actor, note=note)

    requeue, arequeue = twins(_requeue)

    def _resolve(self, resolution: str, actor: str, note: str) -> Decide:
        if not isinstance(resolution, str) or not resolution:
            raise ConfigurationError(f"resolution: expected a non-empty text, got {resolution!r}")
        return close(
            Status.RESOLVED, resolution, "resolved", self.now(), check_actor(actor), _note(note)
        )

    def _mark_resolved(
        self, id: str, resolution: str = "manual", *, note: str = "", actor: str = "api"
    ) -> Flow[DeadLetter]:
        """Close the letter as RESOLVED (nothing more is retried); the history records
        ``resolved`` by ``actor``, with ``note`` (what was done by hand, say).
        :class:`~idempotask.errors.AlreadyInProgress` while a processor replays it (its
        claim must stand: a requeue after the close would let a second replay run)."""
        return self._transition_flow(
            id, self._resolve(resolution, actor, note), unless_claimed=True
        )

    mark_resolved, amark_resolved = twins(_mark_resolved)

    def _abandon(self, actor: str, note: str) -> Decide:
        return close(Status.ABANDONED, "", "abandoned", self.now(), check_actor(actor), _note(note))

    def _mark_abandoned(self, id: str, *, note: str = "", actor: str = "api") -> Flow[DeadLetter]:
        """Close the letter as ABANDONED (kept for people, never retried);
        :class:`~idempotask.errors.AlreadyInProgress` while a processor replays it."""
        return self._transition_flow(id, self._abandon(actor, note), unless_claimed=True)

    mark_abandoned, amark_abandoned = twins(_mark_abandoned)

    # -- many letters ----------------------------------------------------------------------

    def _bulk_flow(
        self, filter: DeadLetterFilter | None, statuses: tuple[Status, ...], decide: Decide
    ) -> Flow[int]:
        """Apply ``decide`` to every letter matching ``filter``, of ``statuses`` when it
        names none (ids listed first, so the changes do not move the pages); how many
        were changed. Letters purged meanwhile, and those a processor is replaying right
        now, are passed over (not counted)."""
        filter = filter or DeadLetterFilter()
        if not filter.status:
            filter = dataclasses.replace(filter, status=statuses)
        ids: list[str] = []
        while True:
            page = yield from self._query_flow(filter, PAGE, len(ids))
            ids.extend(letter.id for letter in page)
            if len(page) < PAGE:
                break
        count = 0
        for id in ids:
            try:
                yield from self._transition_flow(id, decide, unless_claimed=True)
            except (DeadLetterNotFound, AlreadyInProgress):
                continue  # purged meanwhile, or being replayed right now
            count += 1
        return count

    def _requeue_all(
        self,
        filter: DeadLetterFilter | None = None,
        *,
        status: Statuses = None,
        kind: Kinds = None,
        function: Functions = None,
        since: Moment = None,
        until: Moment = None,
        search: str | None = None,
        actor: str = "api",
        note: str = "",
    ) -> Flow[int]:
        """Make every matching letter due now; returns how many.

        Without a status, RESOLVED letters are left alone (replaying them could run a
        finished call again); ask for ``status="resolved"`` explicitly. Letters a
        processor is replaying right now are left to that replay (and not counted).

        >>> queue.requeue_all(kind="external", function="billing.charge")  # doctest: +SKIP
        3
        """
        chosen = filter or make_filter(status, kind, function, since, until, search)
        return self._bulk_flow(chosen, _NOT_RESOLVED, self._reopen(None, None, actor, note))

    requeue_all, arequeue_all = twins(_requeue_all)

    def _resolve_all(
        self,
        filter: DeadLetterFilter | None = None,
        *,
        note: str = "",
        actor: str = "api",
        resolution: str = "manual",
    ) -> Flow[int]:
        """Close every matching letter as RESOLVED (by default those not resolved yet);
        returns how many. Each letter's history records it, with ``note``. Letters a
        processor is replaying right now are left to that replay (and not counted)."""
        return self._bulk_flow(filter, _NOT_RESOLVED, self._resolve(resolution, actor, note))

    resolve_all, aresolve_all = twins(_resolve_all)

    def _abandon_all(
        self, filter: DeadLetterFilter | None = None, *, note: str = "", actor: str = "api"
    ) -> Flow[int]:
        """Close every matching letter as ABANDONED (by default the open ones, PENDING and
        RETRYING); returns how many. Letters a processor is replaying right now are left
        to that replay (and not counted)."""
        return self._bulk_flow(filter, _OPEN, self._abandon(actor, note))

    abandon_all, aabandon_all = twins(_abandon_all)

    def _purge(
        self,
        older_than: float | _dt.timedelta | None = None,
        *,
        status: Statuses = None,
        now: Moment = None,
    ) -> Flow[int]:
        """Delete letters whose last failure is older than ``older_than`` (default: the
        retention); only RESOLVED and ABANDONED ones unless ``status`` says otherwise.

        >>> queue.purge(older_than=timedelta(days=7))  # doctest: +SKIP
        12
        """
        age = (
            self.retention
            if older_than is None
            else config.check_seconds("older_than", older_than, allow_zero=True)
        )
        statuses = (Status.RESOLVED, Status.ABANDONED) if status is None else status
        filter = make_filter(statuses, until=self.now(now) - age)
        store = yield from self._store_flow()
        count: int = yield store_op(store, "purge", filter)
        return count

    purge, apurge = twins(_purge)

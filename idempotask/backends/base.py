"""Every store contract and its value types.

Three small protocols, each operation with a sync method and an ``a``-prefixed async
twin on the same object, so one store serves sync and async callers:

- :class:`Backend`, the idempotency store: one *record* per key, payloads as bytes::

    claim / aclaim        take the key, or return the record that holds it
    complete / acomplete  store a result (compare-and-set on the token)
    fail / afail          store a failure (compare-and-set on the token)
    renew / arenew        extend a lease (compare-and-set on the token)
    get / aget            read a record
    delete / adelete      remove a record (optionally only if the token matches)

- :class:`DeadLetterStore`: failed calls, their schedule, and a lease for processors;
- :class:`BreakerStore`: the shared state of circuit breakers.

A backend offers the other two beside its records (:class:`ProvidesStores`). Every
expiry uses the store's clock, never the caller's. Nothing here imports a feature
module: features depend on these contracts, never the other way round.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from idempotask.errors import ConfigurationError, CorruptRecordError

__all__ = [
    "ACTIONS",
    "HISTORY_LIMIT",
    "MUTABLE_FIELDS",
    "OPEN_STATUSES",
    "Action",
    "Backend",
    "BreakerState",
    "BreakerStatus",
    "BreakerStore",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterStore",
    "ProvidesStores",
    "Record",
    "StatRow",
    "State",
    "Status",
    "SupportsExpireClaim",
    "SupportsExpireNow",
    "SupportsPurgeExpired",
    "SupportsScan",
    "SupportsTransactions",
    "Transaction",
    "check_changes",
    "decode_history",
    "encode_history",
]


# ---------------------------------------------------------------------- idempotency records


class State(str, enum.Enum):
    """The state of a key. ABSENT is represented by the absence of a record."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Record:
    """One key's record as a store returns it.

    ``token`` identifies the claim that wrote it (caller-generated, unique per call);
    ``owner`` is an optional id shared by retries of one execution (a task id);
    ``fingerprint`` is set when the caller supplied an explicit key, and digests the
    arguments so a reused key with other arguments is detected; ``payload`` is the
    serialized result (COMPLETED) or error (FAILED), empty while IN_PROGRESS;
    ``expires_in`` is the time left on the lease or ttl in seconds by the store's clock,
    or ``None`` when the store cannot tell cheaply.
    """

    key: str
    state: State
    token: str
    owner: str = ""
    fingerprint: str = ""
    payload: bytes = b""
    expires_in: float | None = None

    def held_by(self, token: str) -> bool:
        """True when this record is an in-progress claim taken with ``token``."""
        return self.state is State.IN_PROGRESS and self.token == token


@runtime_checkable
class Backend(Protocol):
    """The idempotency store contract.

    ``claim`` is atomic and answers in one operation: the returned record is the one
    that holds the key *after* the claim. If ``record.held_by(token)`` the caller holds
    the key; otherwise the record is the existing COMPLETED, FAILED or IN_PROGRESS
    record. The key is taken when it is absent, when its record has expired (a lease
    that ran out, a ttl that passed), when the existing IN_PROGRESS record carries the
    same non-empty ``owner`` (a framework retry of the same execution re-takes its own
    claim), or when it carries the same ``token`` (a claim retried after a timeout
    recognises its own success). Re-taking keeps the record's fingerprint unless a new
    one is given and resets the lease.

    ``complete``, ``fail`` and ``renew`` succeed only while the key is held with
    ``token`` (IN_PROGRESS, same token, lease not run out) and return whether they did;
    repeating one that already succeeded with the same token is harmless (``complete``
    and ``fail`` return True again; the first stored payload stays). ``delete`` with a
    token removes the record only if it carries that token; without one it removes
    whatever is there. A FAILED record is taken like a COMPLETED one only once its ttl
    passes, so a caller that wants to run again deletes it (with its token) first.
    ``ttl`` and ``lease`` are seconds (floats allowed; stores may round up to their
    resolution). Driver errors are raised as :class:`idempotask.BackendError`.

    Keys are opaque strings; those the library builds are ASCII and under 200
    characters (explicit per-call keys are hashed), and stores may refuse keys over
    1024 bytes. A store holding connections may offer ``close()`` / ``aclose()``.
    """

    def claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record: ...

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool: ...

    def fail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool: ...

    def renew(self, key: str, token: str, *, lease: float) -> bool: ...

    def get(self, key: str) -> Record | None: ...

    def delete(self, key: str, *, token: str | None = None) -> bool: ...

    async def aclaim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record: ...

    async def acomplete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool: ...

    async def afail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool: ...

    async def arenew(self, key: str, token: str, *, lease: float) -> bool: ...

    async def aget(self, key: str) -> Record | None: ...

    async def adelete(self, key: str, *, token: str | None = None) -> bool: ...


@runtime_checkable
class SupportsScan(Protocol):
    """Listing records by key prefix, for operators (``idempotask keys list``, the
    dashboard), never on a call's path.

    ``scan(prefix, limit=)`` returns up to ``limit`` live records whose key (as the
    library builds it, ``namespace:name:v1:digest``) starts with ``prefix``, in no
    promised order; it is bounded in the work it does, so on a large store it may return
    fewer than exist. Every built-in backend offers it.
    """

    def scan(self, prefix: str, *, limit: int = 100) -> list[Record]: ...

    async def ascan(self, prefix: str, *, limit: int = 100) -> list[Record]: ...


@runtime_checkable
class SupportsPurgeExpired(Protocol):
    """Deleting expired records, for stores whose expired rows stay until deleted (SQL);
    Redis and memory expire records by themselves and do not offer it.

    ``purge_expired(batch=)`` deletes expired records ``batch`` at a time, each batch its
    own short transaction, and returns how many it deleted. Expired records already behave
    as absent: purging only reclaims space (``idempotask keys purge``).
    """

    def purge_expired(self, batch: int = 1000) -> int: ...

    async def apurge_expired(self, batch: int = 1000) -> int: ...


@runtime_checkable
class SupportsExpireNow(Protocol):
    """Test-only power: make a record's lease or ttl run out now, on the store's clock.

    Real servers' clocks cannot be faked, so the conformance suite uses this to move a
    record past its expiry. Returns whether a record was there.
    """

    def expire_now(self, key: str) -> bool: ...


# ---------------------------------------------------------------------- dead letters


class Status(str, enum.Enum):
    """Where a dead letter stands."""

    PENDING = "pending"  # failed, waiting for its next retry (or for a person)
    RETRYING = "retrying"  # replayed at least once and failed again; another retry is due
    # a replay succeeded, the call had completed meanwhile, or a person said so:
    RESOLVED = "resolved"
    ABANDONED = "abandoned"  # retries exhausted (or a person gave up): nothing more happens


OPEN_STATUSES = (Status.PENDING, Status.RETRYING)


@dataclass(frozen=True, slots=True)
class Action:
    """One entry of a dead letter's history: what happened, when, and who did it.

    ``what`` is one of :data:`ACTIONS`; ``actor`` says who or what acted (``"worker"``
    for the failing call, ``"processor"`` for a replay, an operator's name for a manual
    action); ``kind`` and ``error`` describe a failure (``"ValueError: bad card"``,
    clipped); ``note`` is an operator's note.
    """

    at: float
    what: str
    actor: str = ""
    kind: str = ""
    error: str = ""
    note: str = ""


ACTIONS = (
    "failed",  # the call failed and the letter was written (or a failure updated it)
    "retry_failed",  # a replay failed again
    "retried",  # a replay succeeded
    "completed",  # a replay found the call completed meanwhile
    "requeued",  # made due now (or at a chosen time) by hand
    "resolved",  # closed by hand
    "abandoned",  # closed because retries ran out, or by hand
    "skipped",  # a replay could not run (no function, arguments that cannot rebuild it)
)
HISTORY_LIMIT = 50  # the newest entries a letter keeps; older ones are dropped


def encode_history(history: tuple[Action, ...]) -> str:
    """``history`` as compact JSON text, the form stores keep (``""`` when empty)."""
    if not history:
        return ""
    rows = [[a.at, a.what, a.actor, a.kind, a.error, a.note] for a in history[-HISTORY_LIMIT:]]
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False)


def decode_history(text: str | bytes | None, where: str) -> tuple[Action, ...]:
    """Read what :func:`encode_history` wrote; anything else is a
    :class:`~idempotask.errors.CorruptRecordError` naming ``where``."""
    if not text:
        return ()
    try:
        rows = json.loads(text)
        return tuple(
            Action(float(at), str(what), str(actor), str(kind), str(error), str(note))
            for at, what, actor, kind, error, note in rows
        )
    except (ValueError, TypeError) as exc:
        raise CorruptRecordError(f"{where}: unreadable letter history ({exc})") from None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One failed call.

    ``function`` is the replay name (a registered function's name, or a framework's
    task name when ``route`` names the framework). ``arguments`` are the call's
    arguments after the redaction hook, serialized (the store sees bytes). ``kind`` is a
    :class:`idempotask.taxonomy.FailureKind` value. ``attempts`` counts failures so far.
    ``version`` increases with every change and makes :meth:`DeadLetterStore.update` a
    compare-and-set. ``resolution`` says how a RESOLVED record got there (``"retry"``,
    ``"completed"`` -- the call had already completed --, ``"manual"``). ``history`` is
    what happened to the letter, oldest first (:class:`Action`); stores keep it as the
    text :func:`encode_history` gives and read it back with :func:`decode_history`.
    """

    id: str
    function: str
    kind: str
    error_type: str
    message: str
    traceback: str = ""
    arguments: bytes = b""
    key: str = ""
    attempts: int = 1
    status: Status = Status.PENDING
    first_failed_at: float = 0.0
    last_failed_at: float = 0.0
    next_retry_at: float | None = None
    route: str = ""
    critical: bool = False
    resolution: str = ""
    version: int = 0
    history: tuple[Action, ...] = ()

    def evolve(self, **changes: Any) -> DeadLetter:
        """A copy with ``changes`` applied (the version is left to the store)."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters a query or a bulk operation is about; empty matches all.

    ``since`` / ``until`` bound ``last_failed_at``. ``search`` keeps letters whose
    ``error_type`` or ``message`` contains it, ignoring case (a plain substring, never a
    pattern: stores escape ``%``, ``_`` and the like).
    """

    status: tuple[Status, ...] = ()
    kind: tuple[str, ...] = ()
    function: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None
    search: str = ""

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` passes this filter (stores may use it, or SQL/indexes)."""
        return (
            (not self.status or letter.status in self.status)
            and (not self.kind or letter.kind in self.kind)
            and (not self.function or letter.function in self.function)
            and (self.since is None or letter.last_failed_at >= self.since)
            and (self.until is None or letter.last_failed_at < self.until)
            and (
                not self.search
                or self.search.casefold() in letter.error_type.casefold()
                or self.search.casefold() in letter.message.casefold()
            )
        )


@dataclass(frozen=True, slots=True)
class StatRow:
    """Counts for one (function, kind, status) group of dead letters."""

    function: str
    kind: str
    status: Status
    count: int
    retries: int = field(default=0)
    """Failed replays in the group: the sum of ``attempts - 1``."""
    resolved_by_retry: int = field(default=0)
    """Records of the group resolved by a successful replay."""


# Fields update() may change; everything else is fixed once a letter is added.
MUTABLE_FIELDS = frozenset(
    {
        "kind",
        "error_type",
        "message",
        "traceback",
        "attempts",
        "status",
        "last_failed_at",
        "next_retry_at",
        "resolution",
        "history",
    }
)


@runtime_checkable
class DeadLetterStore(Protocol):
    """Where dead letters live. Each operation has an ``a``-prefixed async twin.

    - ``add(letter)`` stores a new letter as given (its ``version`` included, 0 for a new
      letter); adding an id that exists changes nothing and returns the stored letter (a
      spooled letter may be delivered twice).
    - ``get(id)`` returns a letter or None.
    - ``query(filter, limit=, offset=)`` lists matching letters, newest
      ``last_failed_at`` first, ties broken by ascending ``id`` (so pages are stable).
    - ``update(id, version, *, unless_claimed=False, **changes)`` applies ``changes``
      (only :data:`MUTABLE_FIELDS`) if the stored version is ``version`` and returns the
      new letter with ``version + 1``, else None (someone else changed it first). It also
      ends any processor claim on the letter. With ``unless_claimed=True`` it changes
      nothing and returns None while a processor's claim on the letter is live (store
      clock), checked in the same atomic step: a person's "retry now" must not end the
      claim of a replay that is running, or a second processor would replay it too.
    - ``claim_due(now, limit=, lease=, filter=)`` atomically takes up to ``limit`` open
      letters (PENDING or RETRYING) with ``next_retry_at <= now`` that no other processor
      holds and that match ``filter`` (None: all), earliest ``next_retry_at`` first (ties
      by ``id``), holds them for ``lease`` seconds (store clock where it has one) and
      returns them with their version bumped. A letter its holder does not update within
      the lease becomes claimable again.
    - ``stats(filter)`` counts matching letters by (function, kind, status), rows ordered
      by those three.
    - ``purge(filter)`` deletes matching letters and returns how many.
    """

    def add(self, letter: DeadLetter) -> DeadLetter: ...

    def get(self, id: str) -> DeadLetter | None: ...

    def query(
        self, filter: DeadLetterFilter = ..., *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]: ...

    def update(
        self, id: str, version: int, *, unless_claimed: bool = False, **changes: Any
    ) -> DeadLetter | None: ...

    def claim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]: ...

    def stats(self, filter: DeadLetterFilter = ...) -> list[StatRow]: ...

    def purge(self, filter: DeadLetterFilter) -> int: ...

    async def aadd(self, letter: DeadLetter) -> DeadLetter: ...

    async def aget(self, id: str) -> DeadLetter | None: ...

    async def aquery(
        self, filter: DeadLetterFilter = ..., *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]: ...

    async def aupdate(
        self, id: str, version: int, *, unless_claimed: bool = False, **changes: Any
    ) -> DeadLetter | None: ...

    async def aclaim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]: ...

    async def astats(self, filter: DeadLetterFilter = ...) -> list[StatRow]: ...

    async def apurge(self, filter: DeadLetterFilter) -> int: ...


def check_changes(changes: Iterable[str]) -> None:
    """Refuse updates to fields that are fixed once a letter is added."""
    fixed = set(changes) - MUTABLE_FIELDS
    if fixed:
        raise ConfigurationError(
            f"dead letter update: {', '.join(sorted(fixed))} cannot change after the letter "
            f"is added; changeable fields: {', '.join(sorted(MUTABLE_FIELDS))}"
        )


@runtime_checkable
class SupportsExpireClaim(Protocol):
    """Test-only power: end a processor's claim on a letter now, on the store's clock.

    The dead-letter conformance suite uses it to check that an unreleased claim becomes
    claimable again without waiting for the lease. Returns whether a live claim was there.
    """

    def expire_claim(self, id: str) -> bool: ...


# ---------------------------------------------------------------------- circuit breakers


class BreakerStatus(str, enum.Enum):
    """Where a breaker stands."""

    CLOSED = "closed"  # calls run; failures are counted
    OPEN = "open"  # calls fail fast until the open period ends
    HALF_OPEN = "half_open"  # the open period ended: one probe call decides


@dataclass(frozen=True, slots=True)
class BreakerState:
    """A breaker's shared state as a store reports it after an operation.

    ``failures`` is the count in the current window (CLOSED; at the opening write, the
    count that opened it). ``retry_after`` is seconds by the store's clock: OPEN, until a
    probe may be taken; HALF_OPEN, what is left of the lease of a probe in flight (0 when
    a probe may be taken now); CLOSED, 0. ``changed`` is True when *this* operation moved
    the status (closed -> open, half-open -> open, half-open -> closed); ``probe`` is
    True when *this* :meth:`BreakerStore.try_probe` granted the probe.

    >>> BreakerState(BreakerStatus.OPEN, retry_after=30.0).status.value
    'open'
    """

    status: BreakerStatus
    failures: int = 0
    retry_after: float = 0.0
    changed: bool = False
    probe: bool = False


@runtime_checkable
class BreakerStore(Protocol):
    """Where breakers keep their shared state: one small record per breaker name.

    Each operation is atomic (Redis: one Lua script; memory: one lock; SQL: one or two
    statements in one transaction) and measures time by the *store's* clock, never the
    caller's. ``threshold`` is a count, ``window``, ``open_for`` and ``lease`` are seconds.
    Each method has an ``a``-prefixed async twin on the same object. Driver errors are
    raised as :class:`~idempotask.errors.BackendError`.

    The record of a breaker holds ``failures``, ``window_until``, ``open_until`` (absent
    or NULL while closed), ``probe_until`` and ``probe_token``; no record means closed
    with no failures. With ``now`` the store's clock:

    - status: CLOSED without ``open_until``; OPEN while ``now < open_until``; HALF_OPEN
      once ``now >= open_until`` (it stays so until a probe reports back).
    - ``record_failure``: OPEN -> unchanged. HALF_OPEN -> open again:
      ``open_until = now + open_for``, probe cleared, ``changed``. CLOSED -> if
      ``window_until <= now`` start a window (``failures = 0``, ``window_until = now +
      window``); ``failures += 1``; at ``threshold`` open (``open_until = now + open_for``,
      failures and probe cleared, ``changed``; the reply's ``failures`` is the count that
      opened it).
    - ``record_success``: HALF_OPEN -> closed: the record is removed (``changed``).
      OPEN -> unchanged (a call that began before the opening proves nothing now).
      CLOSED -> unchanged: successes do not reset the window's count.
    - ``try_probe(name, token, lease)``: HALF_OPEN and (no probe in flight, i.e.
      ``probe_until <= now``, or ``probe_token == token``) -> ``probe_until = now + lease``,
      ``probe_token = token``, reply ``probe=True``. Otherwise the state unchanged, with
      ``probe=False`` (CLOSED: the caller just runs; OPEN or a probe in flight: it fails
      fast). The token makes a resent command recognise its own grant; the lease lets
      another caller probe when a prober crashed.
    - ``state``: read only. ``reset``: remove the record (force closed).

    Rows of breakers left CLOSED past their window or HALF_OPEN long after may be purged;
    a store may forget them (Redis drops a closed record when its window ends and a
    half-open one a day after its open period).
    """

    def state(self, name: str) -> BreakerState: ...

    def record_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> BreakerState: ...

    def record_success(self, name: str) -> BreakerState: ...

    def try_probe(self, name: str, token: str, *, lease: float) -> BreakerState: ...

    def reset(self, name: str) -> None: ...

    def states(self, *, limit: int = 1000) -> dict[str, BreakerState]:
        """Every breaker the store has a record of (up to ``limit``), by name: for
        operators, never on a call's path. A breaker with no record is closed."""
        ...

    async def astate(self, name: str) -> BreakerState: ...

    async def arecord_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> BreakerState: ...

    async def arecord_success(self, name: str) -> BreakerState: ...

    async def atry_probe(self, name: str, token: str, *, lease: float) -> BreakerState: ...

    async def areset(self, name: str) -> None: ...

    async def astates(self, *, limit: int = 1000) -> dict[str, BreakerState]: ...


@runtime_checkable
class ProvidesStores(Protocol):
    """A backend that keeps dead letters and breaker state beside its records.

    ``namespace`` scopes what the returned store sees (the configured namespace by
    default), so two applications sharing one server keep separate dead-letter queues.
    Every built-in backend offers both; :func:`idempotask.configure` uses them when no
    other dead-letter store or breaker store is given.
    """

    def dead_letter_store(self, *, namespace: str = "idempotask") -> DeadLetterStore: ...

    def breaker_store(self, *, namespace: str = "idempotask") -> BreakerStore: ...


# ---------------------------------------------------------------------- transactional calls


@runtime_checkable
class Transaction(Protocol):
    """One database transaction that a transactional call's body writes in.

    Made by :meth:`SupportsTransactions.begin` after the claim was committed. The body
    writes through :attr:`connection` (what it is depends on the store: a SQLAlchemy
    ``Connection`` or ``AsyncConnection``, a Django database alias...), then the call
    writes its result with :meth:`complete` in the same transaction and commits once, so
    the body's writes and the result commit together or not at all. Each method has an
    ``a``-prefixed async twin.

    Every method ends the transaction's connection when it fails (the database then rolls
    the transaction back); :meth:`commit` and :meth:`rollback` also end it when they
    succeed, and are each called at most once. Driver errors are :class:`BackendError`.
    :meth:`acommit` and :meth:`arollback` run to their end even when the caller is
    cancelled meanwhile, and then re-raise the cancellation: a cancellation raised by
    ``acommit`` means the transaction *was* committed.
    """

    @property
    def connection(self) -> Any:
        """What the body uses for its own writes, inside this transaction."""
        ...

    def complete(self, payload: bytes, *, ttl: float) -> bool:
        """Write the COMPLETED record in this transaction if the key is still held with
        the claim's token and its lease has not run out (compare-and-set; the record's
        row stays locked until commit or rollback). False: the claim was taken over,
        and the caller rolls the whole transaction back, the body's writes included."""
        ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    async def acomplete(self, payload: bytes, *, ttl: float) -> bool: ...

    async def acommit(self) -> None: ...

    async def arollback(self) -> None: ...


@runtime_checkable
class SupportsTransactions(Protocol):
    """A store whose database can hold a call's own writes (``@idempotent(transactional=
    True)``): ``begin(key, token, lease=...)`` opens a transaction on the store's
    database for the call holding ``key`` with ``token`` and a lease of ``lease``
    seconds (a store may derive the bounds of the transaction's waits from it).
    Driver errors are :class:`BackendError`; a store that cannot offer transactions in
    its current configuration (SQLite without opting in) raises
    :class:`~idempotask.errors.ConfigurationError` naming the fix."""

    def begin(self, key: str, token: str, *, lease: float) -> Transaction: ...

    async def abegin(self, key: str, token: str, *, lease: float) -> Transaction: ...

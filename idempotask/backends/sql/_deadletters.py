"""Dead letters on SQL: :class:`SQLDeadLetterStore`, its statements and its plans.

Same machinery as the idempotency backend: statements built with SQLAlchemy Core and
compiled once per engine, plans (generators of :class:`~idempotask.backends.sql._plans.Step`)
run on the pooled driver connection by :class:`~idempotask.backends.sql._database.Database`,
every single statement its own autocommit transaction.

Statements per operation (SQLite's are local calls, not round trips):

===================  ===============  ===================  ========================
operation            PostgreSQL       MariaDB / MySQL      SQLite (file)
===================  ===============  ===================  ========================
add                  1 (+1 if the id  1 (+1 if the id      1 (+1 if the id exists)
                     exists)          exists)
get                  1                1                    1
query                1                1                    1
update               1 (RETURNING)    2 (UPDATE, read)     4 (BEGIN IMMEDIATE,
                                                           UPDATE, read, COMMIT)
claim_due            1                4 (BEGIN, SELECT …   4 (BEGIN IMMEDIATE,
                                      FOR UPDATE SKIP      SELECT, UPDATE, COMMIT)
                                      LOCKED, UPDATE,
                                      COMMIT)
stats                1 (GROUP BY)     1                    1
purge                1 per 1000       1 per 1000           1 per 1000
expire_claim         1                1                    1
===================  ===============  ===================  ========================

Filters become ``IN`` lists of bound parameters whose length is rounded up to a power
of two (the last value repeated), so each filter shape compiles once and the number of
shapes stays small.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    URL,
    Double,
    Engine,
    Executable,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement

from idempotask.backends.deadletters import (
    DeadLetter,
    DeadLetterFilter,
    StatRow,
    Status,
    check_changes,
)
from idempotask.backends.sql import _engines
from idempotask.backends.sql._database import DEFAULT_STATEMENT_TIMEOUT, Database
from idempotask.backends.sql._plans import Flavour, Plan, Step, flavour_of
from idempotask.backends.sql._schema import (
    DEFAULT_DEAD_LETTER_TABLE,
    KEY_LENGTH,
    NAME_LENGTH,
    TEXT_LENGTH,
    DbNow,
    define_dead_letter_table,
    metadata,
)
from idempotask.errors import BackendError, ConfigurationError, CorruptRecordError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine
    from typing_extensions import Self

__all__ = [
    "PURGE_BATCH",
    "DeadLetterStatements",
    "SQLDeadLetterStore",
    "dead_letters",
    "parse_letter",
]

_T = TypeVar("_T")

#: The default dead-letter table, ``idempotask_dead_letters``, in the shared ``metadata``.
dead_letters = define_dead_letter_table(metadata)

#: Letters deleted per statement by ``purge`` (each its own short transaction).
PURGE_BATCH = 1000

_ALL = DeadLetterFilter()
_OPEN = (Status.PENDING.value, Status.RETRYING.value)
_INT32 = 2**31
_INT64 = 2**63

# Letter fields in the order every statement reads them.
_FIELDS = (
    "id",
    "function",
    "kind",
    "error_type",
    "message",
    "traceback",
    "arguments",
    "key",
    "attempts",
    "status",
    "first_failed_at",
    "last_failed_at",
    "next_retry_at",
    "route",
    "critical",
    "resolution",
    "version",
)
# Text fields held as (binary-compared) strings, with their column's size in UTF-8 bytes.
_TEXT_LIMITS = {
    "id": TEXT_LENGTH,
    "function": NAME_LENGTH,
    "kind": 64,
    "error_type": NAME_LENGTH,
    "key": KEY_LENGTH,
    "route": TEXT_LENGTH,
    "resolution": 64,
    "status": 16,
}
# Free text held as UTF-8 bytes ("surrogatepass": any str round-trips, NUL included).
_BLOB_TEXT = ("message", "traceback")
_TIMES = ("first_failed_at", "last_failed_at")

_BEGIN = text("BEGIN")
_BEGIN_IMMEDIATE = text("BEGIN IMMEDIATE")
_COMMIT = text("COMMIT")

# A filter's shape: how many statuses, kinds and functions (rounded up to a power of two),
# and whether it has since / until. Each shape is one statement per operation.
_Shape = tuple[int, int, int, bool, bool]


def _padded(count: int) -> int:
    return 0 if count == 0 else 1 << (count - 1).bit_length()


def _value(item: Any) -> Any:
    """A filter value as stored: an enum (Status, FailureKind) by its value."""
    return getattr(item, "value", item)


def _filter_params(filter: DeadLetterFilter) -> tuple[_Shape, dict[str, Any]]:
    """The shape of ``filter`` and its parameters (lists padded with their last value)."""
    if not isinstance(filter, DeadLetterFilter):
        raise ConfigurationError(
            f"sql dead-letter store: expected a DeadLetterFilter, got {type(filter).__name__}"
        )
    params: dict[str, Any] = {}
    counts = []
    for prefix, values in (
        ("fs", [Status(x).value for x in filter.status]),
        ("fk", [_value(x) for x in filter.kind]),
        ("ff", [_value(x) for x in filter.function]),
    ):
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise ConfigurationError(
                    f"sql dead-letter store: filter values must be str, got {value!r}"
                )
            params[f"{prefix}{i}"] = value
        size = _padded(len(values))
        for i in range(len(values), size):
            params[f"{prefix}{i}"] = values[-1]
        counts.append(size)
    for name in ("since", "until"):
        bound = getattr(filter, name)
        if bound is not None:
            params[name] = _time(bound, name)
    shape = (counts[0], counts[1], counts[2], filter.since is not None, filter.until is not None)
    return shape, params


# -- validation ------------------------------------------------------------------------------


def _time(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(
            f"sql dead-letter store: {field} must be a finite number of epoch seconds, "
            f"got {value!r}"
        )
    return float(value)


def _int(value: Any, field: str, *, limit: int = _INT32, minimum: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not -limit <= value < limit
        or (minimum is not None and value < minimum)
    ):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ConfigurationError(
            f"sql dead-letter store: {field} must be an int{bound}, got {value!r}"
        )
    return value


def _text(value: Any, field: str) -> str:
    value = _value(value)
    if not isinstance(value, str):
        raise ConfigurationError(
            f"sql dead-letter store: {field} must be a str, got {type(value).__qualname__}"
        )
    limit = _TEXT_LIMITS[field]
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"sql dead-letter store: {field} {value[:60]!r} is not valid Unicode text "
            "(a lone surrogate); only message and traceback may hold one"
        ) from None
    if size > limit:
        raise ConfigurationError(
            f"sql dead-letter store: {field} {value[:60]!r}… is {size} bytes in UTF-8; the "
            f"SQL store holds a {field} of up to {limit} bytes"
        )
    return value


def _blob_text(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigurationError(
            f"sql dead-letter store: {field} must be a str, got {type(value).__qualname__}"
        )
    return value.encode("utf-8", "surrogatepass")


def _column_value(field: str, value: Any) -> Any:
    """A letter field's value as its column holds it (validated)."""
    if field in _TEXT_LIMITS:
        return Status(value).value if field == "status" else _text(value, field)
    if field in _BLOB_TEXT:
        return _blob_text(value, field)
    if field == "arguments":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ConfigurationError(
                f"sql dead-letter store: arguments must be bytes, got {type(value).__qualname__}"
            )
        return bytes(value)
    if field in _TIMES:
        return _time(value, field)
    if field == "next_retry_at":
        return None if value is None else _time(value, field)
    if field == "attempts":
        return _int(value, field)
    if field == "version":
        return _int(value, field, limit=_INT64)
    if field == "critical":
        return bool(value)
    raise AssertionError(field)  # pragma: no cover


def _letter_params(letter: DeadLetter) -> dict[str, Any]:
    if not isinstance(letter, DeadLetter):
        raise TypeError(f"add: expected a DeadLetter, got {type(letter).__name__}")
    return {f"p_{field}": _column_value(field, getattr(letter, field)) for field in _FIELDS}


# -- rows --------------------------------------------------------------------------------------


def _str(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        # MySQL/MariaDB hold text as VARBINARY: UTF-8, or the row is not ours (the
        # UnicodeDecodeError is reported as a CorruptRecordError).
        return bytes(value).decode("utf-8")
    return value


def parse_letter(row: Sequence[Any], *, bump: int = 0) -> DeadLetter:
    """A :class:`DeadLetter` from a row in the order of ``_FIELDS`` as the driver returns it
    (``bump`` is added to its version: a claim read before its own update)."""
    try:
        (
            id,
            function,
            kind,
            error_type,
            message,
            traceback,
            arguments,
            key,
            attempts,
            status,
            first_failed_at,
            last_failed_at,
            next_retry_at,
            route,
            critical,
            resolution,
            version,
        ) = row
    except ValueError:
        raise CorruptRecordError(f"sql dead-letter store: unexpected row {row!r}") from None
    id = _str(id)
    try:
        letter = DeadLetter(
            id=id,
            function=_str(function),
            kind=_str(kind),
            error_type=_str(error_type),
            message=bytes(message).decode("utf-8", "surrogatepass"),
            traceback=bytes(traceback).decode("utf-8", "surrogatepass"),
            arguments=bytes(arguments),
            key=_str(key),
            attempts=int(attempts),
            status=Status(_str(status)),
            first_failed_at=float(first_failed_at),
            last_failed_at=float(last_failed_at),
            next_retry_at=None if next_retry_at is None else float(next_retry_at),
            route=_str(route),
            critical=bool(critical),
            resolution=_str(resolution),
            version=int(version) + bump,
        )
    except UnicodeDecodeError:
        raise
    except (TypeError, ValueError) as exc:
        raise CorruptRecordError(
            f"sql dead-letter store: the row of letter {id!r} was not written by idempotask: {exc}"
        ) from None
    texts = (letter.id, letter.function, letter.kind, letter.error_type, letter.key, letter.route)
    if not all(isinstance(x, str) for x in texts) or not isinstance(letter.resolution, str):
        raise CorruptRecordError(
            f"sql dead-letter store: the row of letter {id!r} has a text column that is not text"
        )
    return letter


# -- statements ------------------------------------------------------------------------------


class DeadLetterStatements:
    """Every statement the dead-letter store sends for one table, built once each (per
    filter shape or set of changed fields) and reused, so each compiles once per engine.

    Parameter names: ``p_<field>`` a new letter's fields, ``u_<field>`` an update's,
    ``id``, ``v`` a version, ``now`` the caller's time, ``lease``, ``n`` a limit, ``o`` an
    offset, ``fs<i>`` / ``fk<i>`` / ``ff<i>`` filter statuses, kinds and functions,
    ``since`` / ``until``, ``id<i>`` claimed ids.
    """

    def __init__(self, table: Table) -> None:
        self.table = table
        c = table.c
        self.columns = [c[field] for field in _FIELDS]
        self._id = bindparam("id", type_=c.id.type)
        self._open = [literal(value, c.status.type) for value in _OPEN]
        self._cache: dict[Any, Executable] = {}

    def _cached(self, key: Any, build: Callable[[], Executable]) -> Executable:
        statement = self._cache.get(key)
        if statement is None:
            statement = self._cache.setdefault(key, build())
        return statement

    def _param(self, name: str, field: str) -> Any:
        column = self.table.c[field]
        type_ = LargeBinary() if field in _BLOB_TEXT else column.type
        return bindparam(name, type_=type_)

    def _row(self) -> dict[str, Any]:
        return {field: self._param(f"p_{field}", field) for field in _FIELDS}

    def _where(self, shape: _Shape) -> list[ColumnElement[bool]]:
        c = self.table.c
        statuses, kinds, functions, since, until = shape
        clauses: list[ColumnElement[bool]] = []
        for count, prefix, column in (
            (statuses, "fs", c.status),
            (kinds, "fk", c.kind),
            (functions, "ff", c.function),
        ):
            if count:
                params = [bindparam(f"{prefix}{i}", type_=column.type) for i in range(count)]
                clauses.append(column.in_(params))
        if since:
            clauses.append(c.last_failed_at >= bindparam("since", type_=Double()))
        if until:
            clauses.append(c.last_failed_at < bindparam("until", type_=Double()))
        return clauses

    # add / get -----------------------------------------------------------------------------

    def insert(self, flavour: Flavour) -> Executable:
        """Insert a new letter; PostgreSQL and SQLite skip an existing id (rowcount 0),
        MySQL/MariaDB refuse it with a duplicate-key error (the plan reads it then)."""

        def build() -> Executable:
            if flavour == "postgresql":
                return postgresql.insert(self.table).values(self._row()).on_conflict_do_nothing()
            if flavour == "sqlite":
                return sqlite.insert(self.table).values(self._row()).on_conflict_do_nothing()
            # Not INSERT IGNORE: it would also turn a bad value into a warning.
            return self.table.insert().values(self._row())

        return self._cached(("insert", flavour == "postgresql", flavour == "sqlite"), build)

    @property
    def get(self) -> Executable:
        """The letter ``id``."""
        return self._cached("get", lambda: select(*self.columns).where(self.table.c.id == self._id))

    # query / stats / purge ---------------------------------------------------------------------

    def query(self, shape: _Shape) -> Executable:
        """A page of matching letters: newest ``last_failed_at`` first, ties by ``id``."""
        c = self.table.c
        return self._cached(
            ("query", shape),
            lambda: (
                select(*self.columns)
                .where(*self._where(shape))
                .order_by(c.last_failed_at.desc(), c.id)
                .limit(bindparam("n", type_=Integer()))
                .offset(bindparam("o", type_=Integer()))
            ),
        )

    def stats(self, shape: _Shape) -> Executable:
        """Counts by (function, kind, status): letters, failed replays, resolved by retry."""
        c = self.table.c

        def build() -> Executable:
            resolved = literal(Status.RESOLVED.value, c.status.type)
            retry = literal("retry", c.resolution.type)
            return (
                select(
                    c.function,
                    c.kind,
                    c.status,
                    func.count(),
                    func.sum(case((c.attempts > 1, c.attempts - 1), else_=0)),
                    func.sum(case((and_(c.status == resolved, c.resolution == retry), 1), else_=0)),
                )
                .where(*self._where(shape))
                .group_by(c.function, c.kind, c.status)
            )

        return self._cached(("stats", shape), build)

    def purge(self, flavour: Flavour, shape: _Shape) -> Executable:
        """Delete up to :data:`PURGE_BATCH` matching letters (``n`` elsewhere)."""
        c = self.table.c

        def build() -> Executable:
            where = self._where(shape)
            if flavour in ("mysql", "mariadb"):
                # MySQL's DELETE … LIMIT takes no placeholder (nor a LIMIT in IN (…)).
                return (
                    delete(self.table)
                    .where(*where)
                    .with_dialect_options(mysql_limit=PURGE_BATCH, mariadb_limit=PURGE_BATCH)
                )
            batch = select(c.id).where(*where).limit(bindparam("n", type_=Integer()))
            # The filter again outside: a letter changed since the subquery read it and no
            # longer matching stays.
            return delete(self.table).where(c.id.in_(batch.scalar_subquery()), *where)

        return self._cached(("purge", flavour in ("mysql", "mariadb"), shape), build)

    # update --------------------------------------------------------------------------------------

    def update(self, fields: tuple[str, ...], returning: bool) -> Executable:
        """Compare-and-set: apply ``u_<field>`` if the version is ``v``; bump the version
        and end any claim."""
        c = self.table.c

        def build() -> Executable:
            values: dict[str, Any] = {f: self._param(f"u_{f}", f) for f in fields}
            values["version"] = c.version + 1
            values["claimed_until"] = None
            statement = (
                update(self.table)
                .where(c.id == self._id, c.version == bindparam("v", type_=c.version.type))
                .values(values)
            )
            return statement.returning(*self.columns) if returning else statement

        return self._cached(("update", fields, returning), build)

    @property
    def expire_claim(self) -> Executable:
        """End a live claim on ``id`` now."""
        c = self.table.c
        return self._cached(
            "expire_claim",
            lambda: (
                update(self.table)
                .where(c.id == self._id, c.claimed_until > DbNow())
                .values(claimed_until=None)
            ),
        )

    # claim_due -----------------------------------------------------------------------------------

    def _due(self, shape: _Shape) -> list[ColumnElement[bool]]:
        c = self.table.c
        return [
            or_(*(c.status == value for value in self._open)),
            c.next_retry_at <= bindparam("now", type_=Double()),
            or_(c.claimed_until.is_(None), c.claimed_until <= DbNow()),
            *self._where(shape),
        ]

    def _claim_values(self) -> dict[str, Any]:
        c = self.table.c
        return {
            "version": c.version + 1,
            "claimed_until": DbNow() + bindparam("lease", type_=Double()),
        }

    def claim_postgresql(self, shape: _Shape) -> Executable:
        """One statement: lock up to ``n`` due letters, skipping those another claimer is
        locking, take them for ``lease`` seconds, and return them."""
        c = self.table.c

        def build() -> Executable:
            due = (
                select(c.id)
                .where(*self._due(shape))
                .order_by(c.next_retry_at, c.id)
                .limit(bindparam("n", type_=Integer()))
                .with_for_update(skip_locked=True)
            )
            return (
                update(self.table)
                .where(c.id.in_(due.scalar_subquery()))
                .values(self._claim_values())
                .returning(*self.columns)
            )

        return self._cached(("claim_pg", shape), build)

    def select_due(self, shape: _Shape, lock: str) -> Executable:
        """Up to ``n`` due letters, in order; ``lock`` is ``"skip"`` (``FOR UPDATE SKIP
        LOCKED``), ``"wait"`` (``FOR UPDATE``) or ``""`` (SQLite, already the only writer)."""
        c = self.table.c

        def build() -> Executable:
            statement = (
                select(*self.columns)
                .where(*self._due(shape))
                .order_by(c.next_retry_at, c.id)
                .limit(bindparam("n", type_=Integer()))
            )
            if lock:
                statement = statement.with_for_update(skip_locked=lock == "skip")
            return statement

        return self._cached(("select_due", shape, lock), build)

    def claim_ids(self, count: int) -> Executable:
        """Take the letters ``id0`` … ``id<count-1>`` (locked by the transaction)."""
        c = self.table.c
        return self._cached(
            ("claim_ids", count),
            lambda: (
                update(self.table)
                .where(c.id.in_([bindparam(f"id{i}", type_=c.id.type) for i in range(count)]))
                .values(self._claim_values())
            ),
        )


# -- plans ------------------------------------------------------------------------------------


def _skip_locked(dialect: Dialect) -> bool:
    """Whether the MySQL-family server supports ``SKIP LOCKED`` (MariaDB 10.6+, MySQL 8+)."""
    version = tuple(dialect.server_version_info or (0,))
    if getattr(dialect, "is_mariadb", False):
        return version >= (10, 6)
    return version >= (8, 0, 1)


def plan_add(sql: DeadLetterStatements, flavour: Flavour, letter: DeadLetter) -> Plan[DeadLetter]:
    """Insert unless the id exists; the stored letter either way."""
    params = _letter_params(letter)
    stored = letter.evolve(
        status=Status(letter.status),
        arguments=params["p_arguments"],
        critical=bool(letter.critical),
    )
    for _ in range(3):
        if flavour in ("postgresql", "sqlite"):
            inserted = bool((yield Step(sql.insert(flavour), params, reply="rowcount")))
        else:
            inserted = bool((yield Step(sql.insert(flavour), params, reply="inserted")))
        if inserted:
            return stored
        rows = yield Step(sql.get, {"id": params["p_id"]})
        if rows:
            return parse_letter(rows[0])
        # Deleted between the two statements (a purge): try again.
    raise BackendError(
        f"sql dead-letter store: add of {letter.id!r} did not settle: the letter kept "
        "appearing and disappearing under concurrent purges"
    )


def plan_get(sql: DeadLetterStatements, id: str) -> Plan[DeadLetter | None]:
    """The letter ``id``, or None."""
    rows = yield Step(sql.get, {"id": _text(id, "id")})
    return parse_letter(rows[0]) if rows else None


def plan_query(
    sql: DeadLetterStatements, filter: DeadLetterFilter, limit: int, offset: int
) -> Plan[list[DeadLetter]]:
    """A page of matching letters."""
    shape, params = _filter_params(filter)
    rows = yield Step(sql.query(shape), {**params, "n": limit, "o": offset})
    return [parse_letter(row) for row in rows]


def plan_update(
    sql: DeadLetterStatements, flavour: Flavour, id: str, version: int, changes: Mapping[str, Any]
) -> Plan[DeadLetter | None]:
    """Compare-and-set on the version; the new letter, or None."""
    check_changes(changes)
    fields = tuple(sorted(changes))
    params: dict[str, Any] = {f"u_{f}": _column_value(f, changes[f]) for f in fields}
    params["id"] = _text(id, "id")
    params["v"] = _int(version, "version", limit=_INT64)
    if flavour == "postgresql":
        rows = yield Step(sql.update(fields, True), params)
        return parse_letter(rows[0]) if rows else None
    if flavour == "sqlite":
        # The read is in the update's transaction: it sees exactly the version written.
        yield Step(_BEGIN_IMMEDIATE, reply="none")
    count = yield Step(sql.update(fields, False), params, reply="rowcount")
    rows = (yield Step(sql.get, {"id": params["id"]})) if count else []
    if flavour == "sqlite":
        yield Step(_COMMIT, reply="none")
    # MySQL/MariaDB (no UPDATE … RETURNING): read right after the update; a writer that
    # changed the letter in between makes this its later version.
    return parse_letter(rows[0]) if rows else None


def plan_claim_due(
    sql: DeadLetterStatements,
    flavour: Flavour,
    skip_locked: bool,
    now: float,
    limit: int,
    lease: float,
    filter: DeadLetterFilter,
) -> Plan[list[DeadLetter]]:
    """Take up to ``limit`` due letters for ``lease`` seconds; earliest first."""
    shape, params = _filter_params(filter)
    params.update({"now": now, "n": limit, "lease": lease})
    if flavour == "postgresql":
        rows = yield Step(sql.claim_postgresql(shape), params)
        letters = [parse_letter(row) for row in rows]
    else:
        sqlite_file = flavour == "sqlite"
        yield Step(_BEGIN_IMMEDIATE if sqlite_file else _BEGIN, reply="none")
        lock = "" if sqlite_file else ("skip" if skip_locked else "wait")
        rows = yield Step(sql.select_due(shape, lock), params)
        letters = [parse_letter(row, bump=1) for row in rows]
        if letters:
            ids = [letter.id for letter in letters]
            size = _padded(len(ids))
            ids += [ids[-1]] * (size - len(ids))
            take = {f"id{i}": value for i, value in enumerate(ids)}
            yield Step(sql.claim_ids(size), {**take, "lease": lease}, reply="none")
        yield Step(_COMMIT, reply="none")
    letters.sort(key=lambda x: (x.next_retry_at, x.id))
    return letters


def plan_stats(sql: DeadLetterStatements, filter: DeadLetterFilter) -> Plan[list[StatRow]]:
    """Counts by (function, kind, status), sorted as Python sorts them."""
    shape, params = _filter_params(filter)
    rows = yield Step(sql.stats(shape), params)
    stats = [
        StatRow(
            _str(function),
            _str(kind),
            Status(_str(status)),
            int(count),
            int(retries or 0),
            int(by_retry or 0),
        )
        for function, kind, status, count, retries, by_retry in rows
    ]
    stats.sort(key=lambda row: (row.function, row.kind, row.status))
    return stats


def plan_purge(sql: DeadLetterStatements, flavour: Flavour, filter: DeadLetterFilter) -> Plan[int]:
    """Delete matching letters in batches until a batch comes back short."""
    shape, params = _filter_params(filter)
    params["n"] = PURGE_BATCH
    statement = sql.purge(flavour, shape)
    total = 0
    while True:
        count: int = yield Step(statement, params, reply="rowcount")
        total += max(0, count)
        if count < PURGE_BATCH:
            return total


def plan_expire_claim(sql: DeadLetterStatements, id: str) -> Plan[bool]:
    """End a live claim on ``id``."""
    count = yield Step(sql.expire_claim, {"id": _text(id, "id")}, reply="rowcount")
    return bool(count)


# -- the store --------------------------------------------------------------------------------


def _shared_database(bind: object) -> Database | None:
    database = getattr(bind, "database", None)
    return database if isinstance(database, Database) else None


def attach(
    owner: str,
    bind: Any,
    *,
    engine: Engine | None,
    async_engine: AsyncEngine | None,
    connect_timeout: float,
    busy_timeout: float,
    statement_timeout: float | None,
    engine_options: Mapping[str, Any] | None,
) -> tuple[Database, bool]:
    """The database a store runs on, and whether the store owns it: the one of another
    SQL store it was given (``SQLAlchemyBackend``, …), or a new one."""
    shared = _shared_database(bind)
    if shared is None:
        return (
            Database(
                bind,
                owner=owner,
                engine=engine,
                async_engine=async_engine,
                connect_timeout=connect_timeout,
                busy_timeout=busy_timeout,
                statement_timeout=statement_timeout,
                engine_options=engine_options,
            ),
            True,
        )
    if (
        engine is not None
        or async_engine is not None
        or engine_options
        or (connect_timeout, busy_timeout, statement_timeout)
        != (10.0, 30.0, DEFAULT_STATEMENT_TIMEOUT)
    ):
        raise ConfigurationError(
            f"{owner}: given {type(bind).__name__}, the store uses its engines and their "
            "options; set engines and timeouts there"
        )
    return shared, False


def check_table_name(owner: str, table_name: Any) -> str:
    if not isinstance(table_name, str) or not table_name:
        raise ConfigurationError(
            f"{owner}: table_name must be a non-empty string, got {table_name!r}"
        )
    return table_name


def url_and_table(url: Any, owner: str) -> tuple[URL, str | None]:
    """A store URL without its ``table=`` option, and that option."""
    if not isinstance(url, str):
        raise ConfigurationError(f"{owner}.from_url: expected a URL, got {type(url).__name__}")
    parsed = _engines.parse_url(url)
    table = parsed.query.get("table")
    if isinstance(table, tuple):
        raise ConfigurationError(f"{owner}.from_url: table= given twice")
    return parsed.difference_update_query(["table"]), table


class TableStore:
    """What the SQL dead-letter and breaker stores share: the engines (their own, or a
    backend's), one table, the flavour of plan to run, and the table's lifecycle.

    Subclasses name their default table and say how to define it and build statements.
    """

    default_table_name: str
    default_table: Table

    def __init__(
        self,
        bind: Any = None,
        /,
        *,
        engine: Engine | None = None,
        async_engine: AsyncEngine | None = None,
        table_name: str | None = None,
        schema: str | None = None,
        connect_timeout: float = 10.0,
        busy_timeout: float = 30.0,
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        owner = type(self).__name__
        self.database, self._owns_database = attach(
            owner,
            bind,
            engine=engine,
            async_engine=async_engine,
            connect_timeout=connect_timeout,
            busy_timeout=busy_timeout,
            statement_timeout=statement_timeout,
            engine_options=engine_options,
        )
        table_name = self.default_table_name if table_name is None else table_name
        check_table_name(owner, table_name)
        if table_name == self.default_table_name and schema is None:
            self.metadata = metadata
            self.table = self.default_table
        else:
            self.metadata = MetaData()
            self.table = self._define_table(self.metadata, table_name, schema)
        self._sql = self._statements(self.table)
        # Tests force "mysql" on MariaDB to run the MySQL plan on a real server.
        self._force_flavour: Flavour | None = None

    def _define_table(self, meta: MetaData, name: str, schema: str | None) -> Table:
        raise NotImplementedError

    def _statements(self, table: Table) -> Any:
        raise NotImplementedError

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """A store on its own engines for ``url``; ``?table=NAME`` names the table."""
        parsed, table = url_and_table(url, cls.__name__)
        if table is not None:
            options.setdefault("table_name", table)
        return cls(parsed, **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.database.where!r}, table={self.table.fullname!r})"

    def _flavour(self, dialect: Dialect) -> Flavour:
        return self._force_flavour or flavour_of(dialect)

    def create_tables(self) -> None:
        """Create the table and its indexes if missing (safe to repeat)."""
        self.database.schema_change(self.metadata, [self.table], True)

    def drop_tables(self) -> None:
        """Drop the table if it exists (its rows are lost)."""
        self.database.schema_change(self.metadata, [self.table], False)

    async def acreate_tables(self) -> None:
        """Async :meth:`create_tables`."""
        await self.database.aschema_change(self.metadata, [self.table], True)

    async def adrop_tables(self) -> None:
        """Async :meth:`drop_tables`."""
        await self.database.aschema_change(self.metadata, [self.table], False)

    def close(self) -> None:
        """Close the sync engine this store created (shared engines stay open)."""
        if self._owns_database:
            self.database.close()

    async def aclose(self) -> None:
        """Close the asyncio engine this store created for the running loop."""
        if self._owns_database:
            await self.database.aclose()


class SQLDeadLetterStore(TableStore):
    """Dead letters in a SQL table: a :class:`~idempotask.backends.deadletters.DeadLetterStore`
    on PostgreSQL, SQLite, MariaDB or MySQL, sync and async from one object.

    ``bind`` is a URL, an ``Engine`` / ``AsyncEngine`` (as for
    :class:`~idempotask.backends.sql.SQLAlchemyBackend`, with the same options), or a
    ``SQLAlchemyBackend`` (or another SQL store) whose engines, pools and timeouts it
    shares. ``table_name`` (and ``schema``) name the table; :meth:`create_tables` creates
    it, or let Alembic do it from :attr:`metadata` (see ``define_dead_letter_table``).
    The claim lease runs on the database's clock. Database errors raise
    :class:`~idempotask.errors.BackendError`; rows that are not ours
    :class:`~idempotask.errors.CorruptRecordError`.

    >>> store = SQLDeadLetterStore("sqlite:///:memory:")
    >>> store.create_tables()
    >>> store.add(DeadLetter(id="1", function="billing.charge", kind="transient",
    ...                      error_type="TimeoutError", message="slow")).status.value
    'pending'
    >>> [x.id for x in store.claim_due(now=1e10, lease=60)]
    []

    ``DeadLetterQueue("postgresql+psycopg://app@db/app")`` builds one from a URL (the
    query option ``table=`` names the table), and so does the default queue when the
    idempotency backend was configured by a SQL URL.
    """

    default_table_name = DEFAULT_DEAD_LETTER_TABLE
    default_table = dead_letters

    _sql: DeadLetterStatements

    def _define_table(self, meta: MetaData, name: str, schema: str | None) -> Table:
        return define_dead_letter_table(meta, name, schema=schema)

    def _statements(self, table: Table) -> DeadLetterStatements:
        return DeadLetterStatements(table)

    # -- running -----------------------------------------------------------------------------

    def _run(self, operation: str, id: str | None, make: Callable[[Dialect], Plan[_T]]) -> _T:
        return self.database.run(f"dead-letter {operation}", id, make)

    async def _arun(
        self, operation: str, id: str | None, make: Callable[[Dialect], Plan[_T]]
    ) -> _T:
        return await self.database.arun(f"dead-letter {operation}", id, make)

    def _add(self, letter: DeadLetter) -> Callable[[Dialect], Plan[DeadLetter]]:
        _letter_params(letter)  # refuse a bad letter before any I/O
        return lambda d: plan_add(self._sql, self._flavour(d), letter)

    def _query(
        self, filter: DeadLetterFilter, limit: int, offset: int
    ) -> Callable[[Dialect], Plan[list[DeadLetter]]] | None:
        _int(limit, "limit", limit=_INT64)
        _int(offset, "offset", limit=_INT64, minimum=0)
        _filter_params(filter)
        if limit <= 0:
            return None
        return lambda d: plan_query(self._sql, filter, limit, offset)

    def _update(
        self, id: str, version: int, changes: dict[str, Any]
    ) -> Callable[[Dialect], Plan[DeadLetter | None]]:
        check_changes(changes)
        _text(id, "id")
        _int(version, "version", limit=_INT64)
        for field, value in changes.items():
            _column_value(field, value)
        return lambda d: plan_update(self._sql, self._flavour(d), id, version, changes)

    def _claim(
        self, now: float, limit: int, lease: float, filter: DeadLetterFilter | None
    ) -> Callable[[Dialect], Plan[list[DeadLetter]]] | None:
        now = _time(now, "now")
        _int(limit, "limit", limit=_INT64)
        if (
            isinstance(lease, bool)
            or not isinstance(lease, (int, float))
            or not (math.isfinite(lease) and lease > 0)
        ):
            raise ConfigurationError(
                f"sql dead-letter store: lease must be a positive, finite number of seconds, "
                f"got {lease!r}"
            )
        chosen = _ALL if filter is None else filter
        _filter_params(chosen)
        if limit <= 0:
            return None
        return lambda d: plan_claim_due(
            self._sql, self._flavour(d), _skip_locked(d), now, limit, float(lease), chosen
        )

    def _purge(self, filter: DeadLetterFilter) -> Callable[[Dialect], Plan[int]]:
        _filter_params(filter)
        return lambda d: plan_purge(self._sql, self._flavour(d), filter)

    # -- sync API ------------------------------------------------------------------------------

    def add(self, letter: DeadLetter) -> DeadLetter:
        """Store ``letter`` unless its id exists; return the stored one.

        One ``INSERT`` that skips an existing id (PostgreSQL, SQLite ``ON CONFLICT DO
        NOTHING``; MySQL/MariaDB a duplicate-key error), and a read when it did.
        """
        return self._run("add", getattr(letter, "id", None), self._add(letter))

    def get(self, id: str) -> DeadLetter | None:
        """The letter with this id, or None. One statement."""
        return self._run("get", id, lambda d: plan_get(self._sql, id))

    def query(
        self, filter: DeadLetterFilter = _ALL, *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """Matching letters, newest ``last_failed_at`` first, ties by id. One statement."""
        make = self._query(filter, limit, offset)
        return [] if make is None else self._run("query", None, make)

    def update(self, id: str, version: int, **changes: Any) -> DeadLetter | None:
        """Compare-and-set ``changes`` on version ``version``; ends any claim.

        One ``UPDATE … WHERE version = :v`` (with ``RETURNING`` on PostgreSQL; elsewhere
        followed by a read).
        """
        return self._run("update", id, self._update(id, version, changes))

    def claim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]:
        """Take up to ``limit`` due, unclaimed open letters for ``lease`` seconds (the
        database's clock); concurrent claimers skip each other's rows (``SKIP LOCKED``)."""
        make = self._claim(now, limit, lease, filter)
        return [] if make is None else self._run("claim_due", None, make)

    def stats(self, filter: DeadLetterFilter = _ALL) -> list[StatRow]:
        """Counts by (function, kind, status): one ``GROUP BY`` statement."""
        _filter_params(filter)
        return self._run("stats", None, lambda d: plan_stats(self._sql, filter))

    def purge(self, filter: DeadLetterFilter) -> int:
        """Delete matching letters, :data:`PURGE_BATCH` per statement; how many went."""
        return self._run("purge", None, self._purge(filter))

    def expire_claim(self, id: str) -> bool:
        """Test hook: end a processor's claim on ``id`` now; True if a live one was there."""
        return self._run("expire_claim", id, lambda d: plan_expire_claim(self._sql, id))

    # -- async API -----------------------------------------------------------------------------

    async def aadd(self, letter: DeadLetter) -> DeadLetter:
        """Async :meth:`add`."""
        return await self._arun("add", getattr(letter, "id", None), self._add(letter))

    async def aget(self, id: str) -> DeadLetter | None:
        """Async :meth:`get`."""
        return await self._arun("get", id, lambda d: plan_get(self._sql, id))

    async def aquery(
        self, filter: DeadLetterFilter = _ALL, *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """Async :meth:`query`."""
        make = self._query(filter, limit, offset)
        return [] if make is None else await self._arun("query", None, make)

    async def aupdate(self, id: str, version: int, **changes: Any) -> DeadLetter | None:
        """Async :meth:`update`."""
        return await self._arun("update", id, self._update(id, version, changes))

    async def aclaim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> list[DeadLetter]:
        """Async :meth:`claim_due`."""
        make = self._claim(now, limit, lease, filter)
        return [] if make is None else await self._arun("claim_due", None, make)

    async def astats(self, filter: DeadLetterFilter = _ALL) -> list[StatRow]:
        """Async :meth:`stats`."""
        _filter_params(filter)
        return await self._arun("stats", None, lambda d: plan_stats(self._sql, filter))

    async def apurge(self, filter: DeadLetterFilter) -> int:
        """Async :meth:`purge`."""
        return await self._arun("purge", None, self._purge(filter))

    async def aexpire_claim(self, id: str) -> bool:
        """Async :meth:`expire_claim` (test hook)."""
        return await self._arun("expire_claim", id, lambda d: plan_expire_claim(self._sql, id))

"""Dead letters on SQL: the statements, and what goes in and comes out of a row.

Statements are built with SQLAlchemy Core, once per filter shape or set of changed
fields, and reused. Every statement is scoped by the store's ``namespace`` (a column of
the primary key), so applications sharing a table keep separate queues. Filters become
``IN`` lists of bound parameters whose length is rounded up to a power of two (the last
value repeated), so each filter shape compiles once and the number of shapes stays small;
``search`` is a ``LIKE`` (wildcards escaped) over the ``search`` column, which holds the
case-folded error type and message.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from sqlalchemy import (
    Double,
    Executable,
    Integer,
    LargeBinary,
    String,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from idempotask.backends import _letters as shared
from idempotask.backends._letters import FIELDS
from idempotask.backends.base import DeadLetter, DeadLetterFilter, Status, decode_history
from idempotask.backends.sql._database import Flavour
from idempotask.backends.sql._schema import (
    KEY_LENGTH,
    NAME_LENGTH,
    TEXT_LENGTH,
    DbNow,
    StatementSet,
    built,
    text_of,
)
from idempotask.errors import ConfigurationError, CorruptRecordError

__all__ = [
    "FIELDS",
    "PURGE_BATCH",
    "WHO",
    "DeadLetterStatements",
    "Shape",
    "check_text",
    "column_value",
    "filter_params",
    "fold",
    "letter_params",
    "padded",
    "parse_letter",
]

#: Letters deleted per statement by ``purge`` (each its own short transaction).
PURGE_BATCH = 1000

WHO = "sql dead-letter store"
_OPEN = (Status.PENDING.value, Status.RETRYING.value)
_INT32 = 2**31

# Text fields held as (binary-compared) strings, with their column's size in UTF-8 bytes.
_TEXT_LIMITS = {
    "namespace": TEXT_LENGTH,
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
# Text columns read back as str (not status, not the blobs).
_STR_FIELDS = ("id", "function", "kind", "error_type", "key", "route", "resolution")

#: A filter's shape: how many statuses, kinds and functions (rounded up to a power of
#: two), and whether it has since / until / search. One statement per shape and operation.
Shape = tuple[int, int, int, bool, bool, bool]

# Between the folded error type and message in the search column: a character no folded
# text holds (fold() replaces it), so a search never matches across the two.
_SEPARATOR = "\uffff"


def _clean(text: str) -> str:
    """``text`` as every database stores it: no NUL (PostgreSQL refuses it), no lone
    surrogate (not UTF-8), no separator."""
    text = text.replace("\x00", "\ufffd").replace(_SEPARATOR, "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")


def fold(error_type: str, message: str) -> str:
    """The ``search`` column's text for a letter: its error type and message, case-folded.

    >>> fold("ValueError", "Bad CARD")
    'valueerror\uffffbad card'
    """
    return _clean(error_type.casefold()) + _SEPARATOR + _clean(message.casefold())


def _needle(search: str) -> str:
    """The ``LIKE`` pattern of a filter's ``search``: its folded text anywhere in the
    ``search`` column, with ``%`` and ``_`` escaped (by ``/``) to match themselves.

    >>> _needle("100% A_b")
    '%100/% a/_b%'
    """
    text = _clean(search.casefold())
    return "%" + text.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"


def padded(count: int) -> int:
    """``count`` rounded up to a power of two (0 stays 0)."""
    return 0 if count == 0 else 1 << (count - 1).bit_length()


def filter_params(filter: DeadLetterFilter) -> tuple[Shape, dict[str, Any]]:
    """The shape of ``filter`` and its parameters (lists padded with their last value)."""
    fields = shared.filter_fields(filter, WHO)
    params: dict[str, Any] = {}
    counts = []
    for prefix, name in (("fs", "status"), ("fk", "kind"), ("ff", "function")):
        values = fields.get(name, [])
        size = padded(len(values))
        for i in range(size):
            params[f"{prefix}{i}"] = values[min(i, len(values) - 1)]
        counts.append(size)
    for name in ("since", "until"):
        if name in fields:
            params[name] = fields[name]
    if "search" in fields:
        params["needle"] = _needle(fields["search"])
    shape: Shape = (
        counts[0],
        counts[1],
        counts[2],
        "since" in fields,
        "until" in fields,
        "search" in fields,
    )
    return shape, params


# -- validation ------------------------------------------------------------------------------


def check_text(value: Any, field: str) -> str:
    """A text field that fits its column (UTF-8 bytes, no lone surrogate)."""
    text = shared.check_text(value, field, WHO)
    limit = _TEXT_LIMITS[field]
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"{WHO}: {field} {text[:60]!r} is not valid Unicode text "
            "(a lone surrogate); only message and traceback may hold one"
        ) from None
    if size > limit:
        raise ConfigurationError(
            f"{WHO}: {field} {text[:60]!r}… is {size} bytes in UTF-8; the "
            f"SQL store holds a {field} of up to {limit} bytes"
        )
    return text


def column_value(field: str, value: Any) -> Any:
    """A letter field's value as its column holds it (validated)."""
    value = shared.field_value(field, value, WHO, attempts_limit=_INT32)
    if field == "status":
        return value.value
    if field in _BLOB_TEXT:
        return value.encode("utf-8", "surrogatepass")
    if field in _TEXT_LIMITS:
        return check_text(value, field)
    return value


def letter_params(letter: DeadLetter, namespace: str) -> dict[str, Any]:
    """A new letter's statement parameters (validated)."""
    params = {f"p_{field}": column_value(field, getattr(letter, field)) for field in FIELDS}
    params["p_namespace"] = namespace
    params["p_search"] = fold(letter.error_type, letter.message)
    return params


# -- rows --------------------------------------------------------------------------------------


def parse_letter(row: Sequence[Any], *, bump: int = 0) -> DeadLetter:
    """A :class:`DeadLetter` from a row in the order of ``FIELDS`` as the driver returns it
    (``bump`` is added to its version: a claim read before its own update)."""
    try:
        raw = dict(zip(FIELDS, row, strict=True))
    except (TypeError, ValueError):
        raise CorruptRecordError(f"sql dead-letter store: unexpected row {row!r}") from None
    id = text_of(raw["id"])
    try:
        letter = DeadLetter(
            **{name: text_of(raw[name]) for name in _STR_FIELDS},
            message=bytes(raw["message"]).decode("utf-8", "surrogatepass"),
            traceback=bytes(raw["traceback"]).decode("utf-8", "surrogatepass"),
            arguments=bytes(raw["arguments"]),
            attempts=int(raw["attempts"]),
            status=Status(text_of(raw["status"])),
            first_failed_at=float(raw["first_failed_at"]),
            last_failed_at=float(raw["last_failed_at"]),
            next_retry_at=None if raw["next_retry_at"] is None else float(raw["next_retry_at"]),
            critical=bool(raw["critical"]),
            version=int(raw["version"]) + bump,
            history=decode_history(raw["history"], f"sql dead-letter store: letter {id!r}"),
        )
    except UnicodeDecodeError:
        raise
    except (TypeError, ValueError) as exc:
        raise CorruptRecordError(
            f"sql dead-letter store: the row of letter {id!r} was not written by idempotask: {exc}"
        ) from None
    if not all(isinstance(getattr(letter, name), str) for name in _STR_FIELDS):
        raise CorruptRecordError(
            f"sql dead-letter store: the row of letter {id!r} has a text column that is not text"
        )
    return letter


class DeadLetterStatements(StatementSet):
    """Every statement the dead-letter store sends for one table, built once each (per
    filter shape or set of changed fields) and reused, so each compiles once per engine.

    Parameter names (none is a column's name: an UPDATE would take it for a new value):
    ``p_<field>`` a new letter's fields, ``u_<field>`` an update's, ``lid`` the letter's
    id, ``v`` a version, ``now`` the caller's time, ``lease``, ``n`` a limit, ``o`` an
    offset, ``fs<i>`` / ``fk<i>`` / ``ff<i>`` filter statuses, kinds and functions,
    ``since`` / ``until``, ``needle`` the search, ``id<i>`` claimed ids, and ``ns`` the namespace,
    in every statement.
    """

    def __init__(self, table: Table) -> None:
        super().__init__(table)
        c = table.c
        self.columns = [c[field] for field in FIELDS]
        self._id = bindparam("lid", type_=c.id.type)
        self._ns = bindparam("ns", type_=c.namespace.type)
        self._open = [literal(value, c.status.type) for value in _OPEN]

    def _param(self, name: str, field: str) -> Any:
        column = self.table.c[field]
        type_ = LargeBinary() if field in _BLOB_TEXT else column.type
        return bindparam(name, type_=type_)

    def _row(self) -> dict[str, Any]:
        row = {field: self._param(f"p_{field}", field) for field in FIELDS}
        row["namespace"] = self._param("p_namespace", "namespace")
        row["search"] = self._param("p_search", "search")
        return row

    def _one(self) -> ColumnElement[bool]:
        """The letter ``id`` of this namespace."""
        c = self.table.c
        return and_(c.namespace == self._ns, c.id == self._id)

    def _where(self, shape: Shape) -> list[ColumnElement[bool]]:
        c = self.table.c
        statuses, kinds, functions, since, until, search = shape
        clauses: list[ColumnElement[bool]] = [c.namespace == self._ns]
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
        if search:
            needle = bindparam("needle", type_=String())
            clauses.append(c.search.like(needle, escape="/"))
        return clauses

    # add / get -----------------------------------------------------------------------------

    @built
    def insert(self, flavour: Flavour) -> Executable:
        """Insert a new letter; PostgreSQL and SQLite skip an existing id (rowcount 0),
        MySQL/MariaDB refuse it with a duplicate-key error (the plan reads it then)."""
        if flavour in ("postgresql", "sqlite"):
            dialect_insert = postgresql.insert if flavour == "postgresql" else sqlite.insert
            # SQLAlchemy reports an INSERT's row count only when asked to.
            return (
                dialect_insert(self.table)
                .values(self._row())
                .on_conflict_do_nothing()
                .execution_options(preserve_rowcount=True)
            )
        # Not INSERT IGNORE: it would also turn a bad value into a warning.
        return self.table.insert().values(self._row())

    @cached_property
    def get(self) -> Executable:
        """The letter ``id``."""
        return select(*self.columns).where(self._one())

    # query / stats / purge ---------------------------------------------------------------------

    @built
    def query(self, shape: Shape) -> Executable:
        """A page of matching letters: newest ``last_failed_at`` first, ties by ``id``."""
        c = self.table.c
        return (
            select(*self.columns)
            .where(*self._where(shape))
            .order_by(c.last_failed_at.desc(), c.id)
            .limit(bindparam("n", type_=Integer()))
            .offset(bindparam("o", type_=Integer()))
        )

    @built
    def stats(self, shape: Shape) -> Executable:
        """Counts by (function, kind, status): letters, failed replays, resolved by retry."""
        c = self.table.c
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

    @built
    def purge(self, flavour: Flavour, shape: Shape) -> Executable:
        """Delete up to :data:`PURGE_BATCH` matching letters (``n`` elsewhere)."""
        c = self.table.c
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

    # update --------------------------------------------------------------------------------------

    @built
    def update(self, fields: tuple[str, ...], returning: bool, unless_claimed: bool) -> Executable:
        """Compare-and-set: apply ``u_<field>`` if the version is ``v`` (and, when
        ``unless_claimed``, no claim is live on the database's clock); bump the version
        and end any claim."""
        c = self.table.c
        values: dict[str, Any] = {f: self._param(f"u_{f}", f) for f in fields}
        values["version"] = c.version + 1
        values["claimed_until"] = None
        where = [self._one(), c.version == bindparam("v", type_=c.version.type)]
        if unless_claimed:
            where.append(or_(c.claimed_until.is_(None), c.claimed_until <= DbNow()))
        statement = update(self.table).where(*where).values(values)
        return statement.returning(*self.columns) if returning else statement

    @cached_property
    def expire_claim(self) -> Executable:
        """End a live claim on ``id`` now."""
        c = self.table.c
        return (
            update(self.table)
            .where(self._one(), c.claimed_until > DbNow())
            .values(claimed_until=None)
        )

    # claim_due -----------------------------------------------------------------------------------

    def _due(self, shape: Shape) -> list[ColumnElement[bool]]:
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

    @built
    def claim_postgresql(self, shape: Shape) -> Executable:
        """One statement: lock up to ``n`` due letters, skipping those another claimer is
        locking, take them for ``lease`` seconds, and return them."""
        c = self.table.c
        due = (
            select(c.id)
            .where(*self._due(shape))
            .order_by(c.next_retry_at, c.id)
            .limit(bindparam("n", type_=Integer()))
            .with_for_update(skip_locked=True)
        )
        # A CTE, read once (PostgreSQL may run an IN subquery again per row, each run
        # locking the next letters: more than ``n`` would be taken).
        chosen = due.cte("due").prefix_with("MATERIALIZED")
        return (
            update(self.table)
            .where(c.namespace == self._ns, c.id == chosen.c.id)
            .values(self._claim_values())
            .returning(*self.columns)
        )

    @built
    def select_due(self, shape: Shape, lock: str) -> Executable:
        """Up to ``n`` due letters, in order; ``lock`` is ``"skip"`` (``FOR UPDATE SKIP
        LOCKED``), ``"wait"`` (``FOR UPDATE``) or ``""`` (SQLite, already the only writer)."""
        c = self.table.c
        statement = (
            select(*self.columns)
            .where(*self._due(shape))
            .order_by(c.next_retry_at, c.id)
            .limit(bindparam("n", type_=Integer()))
        )
        return statement.with_for_update(skip_locked=lock == "skip") if lock else statement

    @built
    def claim_ids(self, count: int) -> Executable:
        """Take the letters ``id0`` … ``id<count-1>`` (locked by the transaction)."""
        c = self.table.c
        ids = [bindparam(f"id{i}", type_=c.id.type) for i in range(count)]
        return (
            update(self.table)
            .where(c.namespace == self._ns, c.id.in_(ids))
            .values(self._claim_values())
        )

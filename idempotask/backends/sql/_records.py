"""What each idempotency-store operation says to the database: statements and flows
(generators of statements, :mod:`idempotask.flow`, run by
:class:`~idempotask.backends.sql._database.Database` on one pooled connection).

Every statement runs in autocommit mode: no ``BEGIN``/``COMMIT`` around single statements.
The round trips of each operation per database (counted by ``tests/backends/test_sql.py``)
and how each database claims a key are in the README's SQL section; the statements below
say how, and :func:`flow_claim` which runs when.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from sqlalchemy import (
    Delete,
    Double,
    Executable,
    Integer,
    LargeBinary,
    Select,
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    false,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from idempotask.backends.base import Record, State
from idempotask.backends.sql._database import Flavour, Session
from idempotask.backends.sql._schema import CodePoints, DbNow, StatementSet, built, text_of
from idempotask.errors import BackendError, CorruptRecordError
from idempotask.flow import Flow

__all__ = [
    "CLAIM_ATTEMPTS",
    "Statements",
    "flow_claim",
    "flow_finish",
    "parse_record",
    "successor",
]

#: How often a claim is re-sent when a concurrent change slipped between its read and its
#: write (each attempt sees a newer snapshot, so one retry nearly always settles it).
CLAIM_ATTEMPTS = 10

_IN_PROGRESS = State.IN_PROGRESS.value


class Statements(StatementSet):
    """Every statement the backend sends for one table, built once and reused.

    Built with SQLAlchemy Core and bound parameters, so each compiles once per dialect
    (SQLAlchemy's compiled cache) and quoting, types and driver placeholders are
    SQLAlchemy's business. Parameter names: ``k`` key, ``t`` token,
    ``o`` owner, ``f`` fingerprint, ``s`` state, ``p`` payload, ``d`` a duration in seconds,
    ``n`` a batch size.
    """

    def __init__(self, table: Table) -> None:
        super().__init__(table)
        c = table.c
        self._k = bindparam("k", type_=c.key.type)
        self._t = bindparam("t", type_=c.token.type)
        self._o = bindparam("o", type_=c.owner.type)
        self._f = bindparam("f", type_=c.fingerprint.type)
        self._s = bindparam("s", type_=c.state.type)
        self._p: BindParameter[bytes] = bindparam("p", type_=LargeBinary())
        self._d: BindParameter[float] = bindparam("d", type_=Double())
        # Constant strings, typed like the columns (bytes on MySQL's VARBINARY); one bound
        # value each however often a statement uses them, so the driver sends fewer.
        self._in_progress = literal(_IN_PROGRESS, c.state.type)
        self._empty = literal("", c.state.type)

    # Shared pieces -----------------------------------------------------------------------

    def _record_columns(self, now: ColumnElement[float]) -> list[ColumnElement[Any]]:
        c = self.table.c
        return [
            c.state,
            c.token,
            c.owner,
            c.fingerprint,
            c.payload,
            (c.expires_at - now).label("expires_in"),
        ]

    def _retakable(self, token: Any, owner: Any) -> ColumnElement[bool]:
        """The row is a claim in progress under ``token``, or under the same non-empty
        ``owner``: a claim with them takes it again."""
        c = self.table.c
        return and_(
            c.state == self._in_progress,
            or_(c.token == token, and_(owner != self._empty, c.owner == owner)),
        )

    def _takeable(self, now: ColumnElement[float], token: Any, owner: Any) -> ColumnElement[bool]:
        """The existing row may be taken by a claim with ``token`` and ``owner``: its lease
        or ttl ran out, or :meth:`_retakable`."""
        return or_(self.table.c.expires_at <= now, self._retakable(token, owner))

    def _new_row(self, now: ColumnElement[float]) -> dict[str, Any]:
        return {
            "key": self._k,
            "state": self._in_progress,
            "token": self._t,
            "owner": self._o,
            "fingerprint": self._f,
            "payload": literal(b"", LargeBinary()),
            "expires_at": now + self._d,
        }

    def _retake_on_conflict(self, ins: Any, now: ColumnElement[float]) -> Any:
        """``ins`` with ``ON CONFLICT … DO UPDATE … WHERE``: a takeover or a re-take
        (PostgreSQL and SQLite)."""
        c, excluded = self.table.c, ins.excluded
        retake = {
            "state": excluded.state,
            "token": excluded.token,
            "owner": excluded.owner,
            # A re-take of a live claim keeps its fingerprint unless a new one is given;
            # a takeover of an expired record starts afresh.
            "fingerprint": case(
                (
                    and_(excluded.fingerprint == self._empty, c.expires_at > now),
                    c.fingerprint,
                ),
                else_=excluded.fingerprint,
            ),
            "payload": excluded.payload,
            "expires_at": excluded.expires_at,
        }
        return ins.on_conflict_do_update(
            index_elements=[c.key],
            set_=retake,
            where=self._takeable(now, excluded.token, excluded.owner),
        )

    # Reads -------------------------------------------------------------------------------

    @cached_property
    def read_live(self) -> Executable:
        """The live record under ``k`` (none when absent or expired)."""
        return self.read_any.where(self.table.c.expires_at > DbNow())

    @cached_property
    def read_first(self) -> Executable:
        """The record under ``k`` with a last column saying whether it is live."""
        now = DbNow()
        c = self.table.c
        live = (c.expires_at > now).label("live")
        return select(*self._record_columns(now), live).where(c.key == self._k)

    @cached_property
    def read_any(self) -> Select[Any]:
        """The record under ``k`` even if expired (read back right after our own write)."""
        return select(*self._record_columns(DbNow())).where(self.table.c.key == self._k)

    # Claims ------------------------------------------------------------------------------

    @cached_property
    def claim_new_postgresql(self) -> Executable:
        """The first try of a claim: insert our row unless the key has one, and answer with
        ours or with the row that is there, live or not (a last column says which).

        ``INSERT … ON CONFLICT DO NOTHING`` neither locks nor writes an existing row, so a
        duplicate writes nothing; the ``UNION ALL`` reads the existing row, in the same
        snapshot, when the insert returns nothing. The plan settles everything else (an
        expired row to take over, our own claim to re-take, a row committed after the
        snapshot) with :attr:`claim_postgresql`. Cheaper for the server than that
        statement: about 0.06 of a plain ``INSERT``'s round trip less on a first call.
        """
        t, c = self.table, self.table.c
        now = DbNow()
        ins = postgresql.insert(t).values(self._new_row(now))
        ins = ins.on_conflict_do_nothing(index_elements=[c.key])
        answer = ins.returning(
            true().label("taken"), *self._record_columns(now), true().label("live")
        ).cte("ins")
        from_ins = select(*answer.c)
        from_row = select(
            false().label("taken"), *self._record_columns(now), (c.expires_at > now).label("live")
        ).where(c.key == self._k, ~exists(select(true()).select_from(answer)))
        return from_ins.union_all(from_row)

    @cached_property
    def claim_postgresql(self) -> Executable:
        """The claim once :attr:`claim_new_postgresql` found a row it cannot settle (an
        expired one to take over, ours to re-take, or none visible to its snapshot): one
        statement that inserts or takes over unless the live record blocks us, and
        answers with the winning row.

        ``ins`` inserts our row only when no live record blocks this claim (one that is not
        ours to re-take), so a duplicate takes no row lock and writes nothing; its ``ON
        CONFLICT … DO UPDATE … WHERE`` takes over an expired record or re-takes our own
        (same token or owner), and ``RETURNING`` gives our row. When ``ins`` returns
        nothing (``DO UPDATE … WHERE false`` returns no row) the ``UNION ALL`` answers with
        the live record. The first column says which half answered.

        Every part of the statement reads the same snapshot, taken before ``ins`` writes:
        the blocking check and the answer see the same record. Both read the table
        directly (a CTE holding the record, read twice, made a duplicate slower).
        """
        t, c = self.table, self.table.c
        now = DbNow()
        live = and_(c.key == self._k, c.expires_at > now)
        blocking = select(true()).where(live, ~self._retakable(self._t, self._o))
        row = self._new_row(now)
        source = select(*row.values()).where(~exists(blocking))
        ins = postgresql.insert(t).from_select(list(row), source)
        ins = self._retake_on_conflict(ins, now)
        ins_cte = ins.returning(true().label("taken"), *self._record_columns(now)).cte("ins")
        from_ins = select(*ins_cte.c)
        from_live = select(false().label("taken"), *self._record_columns(now)).where(
            live, ~exists(select(true()).select_from(ins_cte))
        )
        return from_ins.union_all(from_live)

    @cached_property
    def claim_mariadb(self) -> Executable:
        """One statement: ``INSERT … ON DUPLICATE KEY UPDATE … RETURNING`` (MariaDB 10.5+).

        MariaDB returns the row as it is after the statement, also when the update
        changed nothing, so the answer is the winning record. MySQL evaluates the SET
        assignments left to right, each seeing the ones before: ``token`` goes first under
        the full takeover condition; once it holds our token, "our token and (in progress
        or expired)" is true exactly when the takeover happened, and the other columns
        follow that; ``expires_at`` goes last because the conditions read it.
        """
        return self.upsert_mysql.returning(*self._record_columns(DbNow()))

    @cached_property
    def upsert_mysql(self) -> mysql.Insert:
        """The MariaDB claim without RETURNING, for MySQL (read the row afterwards)."""
        t, c = self.table, self.table.c
        now = DbNow()
        ins = mysql.insert(t).values(self._new_row(now))
        new = ins.inserted
        took = and_(
            c.token == new.token,
            or_(c.state == self._in_progress, c.expires_at <= now),
        )
        keep_fingerprint = and_(new.fingerprint == self._empty, c.expires_at > now)
        return ins.on_duplicate_key_update(
            [
                (
                    "token",
                    case((self._takeable(now, new.token, new.owner), new.token), else_=c.token),
                ),
                ("owner", case((took, new.owner), else_=c.owner)),
                (
                    "fingerprint",
                    case(
                        (and_(took, ~keep_fingerprint), new.fingerprint),
                        else_=c.fingerprint,
                    ),
                ),
                ("payload", case((took, new.payload), else_=c.payload)),
                ("state", case((took, new.state), else_=c.state)),
                ("expires_at", case((took, new.expires_at), else_=c.expires_at)),
            ]
        )

    @cached_property
    def insert_new(self) -> Executable:
        """A plain INSERT of a new claim (MySQL's first call; fails on an existing key)."""
        return self.table.insert().values(self._new_row(DbNow()))

    @cached_property
    def upsert_sqlite(self) -> Executable:
        """Insert, or take over / re-take under the same conditions as PostgreSQL's."""
        now = DbNow()
        ins = sqlite.insert(self.table).values(self._new_row(now))
        return self._retake_on_conflict(ins, now)  # type: ignore[no-any-return]

    # complete / fail / renew / delete / expire -------------------------------------------

    def _held(self, now: ColumnElement[float]) -> ColumnElement[bool]:
        c = self.table.c
        return and_(
            c.key == self._k,
            c.token == self._t,
            c.state == self._in_progress,
            c.expires_at > now,
        )

    @cached_property
    def finish(self) -> Executable:
        """Store a result or failure (``s``, ``p``, ttl ``d``) if held with ``t``."""
        now = DbNow()
        return (
            update(self.table)
            .where(self._held(now))
            .values(state=self._s, payload=self._p, expires_at=now + self._d)
        )

    @cached_property
    def finished_already(self) -> Executable:
        """Whether ``t`` already finished ``k`` with state ``s`` (a repeated complete/fail)."""
        c = self.table.c
        return (
            select(true())
            .select_from(self.table)
            .where(c.key == self._k, c.token == self._t, c.state == self._s, c.expires_at > DbNow())
        )

    @cached_property
    def renew(self) -> Executable:
        """Restart the lease (``d``) of the claim held with ``t``."""
        now = DbNow()
        return update(self.table).where(self._held(now)).values(expires_at=now + self._d)

    @cached_property
    def delete_any(self) -> Delete:
        """Remove the live record under ``k``."""
        c = self.table.c
        return delete(self.table).where(c.key == self._k, c.expires_at > DbNow())

    @cached_property
    def delete_token(self) -> Executable:
        """Remove the live record under ``k`` if it carries token ``t``."""
        return self.delete_any.where(self.table.c.token == self._t)

    @cached_property
    def expire_now(self) -> Executable:
        """Move a live record's expiry a second into the past, on the database's clock."""
        c = self.table.c
        now = DbNow()
        return (
            update(self.table)
            .where(c.key == self._k, c.expires_at > now)
            .values(expires_at=now - 1.0)
        )

    # scan --------------------------------------------------------------------------------

    @built
    def scan(self, lower: bool, upper: bool) -> Executable:
        """Live records, up to ``n``, with ``key >= lo`` if ``lower`` and ``key < hi`` if
        ``upper`` (both: a key prefix's range)."""
        c = self.table.c
        key = CodePoints(c.key)
        bounds = [key >= bindparam("lo", type_=c.key.type)] if lower else []
        if upper:
            bounds.append(key < bindparam("hi", type_=c.key.type))
        now = select(DbNow()).scalar_subquery()
        return (
            select(c.key, *self._record_columns(DbNow()))
            .where(*bounds, c.expires_at > now)
            .limit(bindparam("n", type_=Integer()))
        )

    # purge -------------------------------------------------------------------------------

    def purge(self, flavour: Flavour, batch: int) -> Executable:
        """Delete up to ``batch`` expired records in one statement (its own transaction)."""
        if flavour in ("mysql", "mariadb"):
            # MySQL's DELETE … LIMIT takes no placeholder: one statement per batch size.
            return self._purge_mysql(batch)
        return self._purge_keyed

    @cached_property
    def _purge_keyed(self) -> Executable:
        # The clock is read once in a scalar subquery: a volatile clock_timestamp() in the
        # WHERE would keep PostgreSQL from using the expires_at index.
        t, c = self.table, self.table.c
        now = select(DbNow()).scalar_subquery()
        batch = select(c.key).where(c.expires_at <= now).limit(bindparam("n"))
        # Rows a claim is taking over right now are skipped, not waited for (PostgreSQL;
        # SQLite has one writer anyway). The outer condition is checked again on the row's
        # latest version, so a record taken over since the subquery read it is kept.
        batch = batch.with_for_update(skip_locked=True)
        return delete(t).where(c.key.in_(batch.scalar_subquery()), c.expires_at <= now)

    @built
    def _purge_mysql(self, batch: int) -> Executable:
        c = self.table.c
        now = select(DbNow()).scalar_subquery()
        return (
            delete(self.table)
            .where(c.expires_at <= now)
            .with_dialect_options(mysql_limit=batch, mariadb_limit=batch)
        )


# -- rows ----------------------------------------------------------------------------------


_STATES = {state.value: state for state in State}


def parse_record(key: str, row: Sequence[Any]) -> Record:
    """A :class:`Record` from ``(state, token, owner, fingerprint, payload, expires_in)``, as
    the driver returns it."""
    try:
        state_text, token, owner, fingerprint, payload, expires_in = row
    except ValueError:
        raise CorruptRecordError(f"sql backend: record {key!r}: unexpected row {row!r}") from None
    if (  # PostgreSQL's and SQLite's rows, checked at once
        type(state_text) is str
        and type(token) is str
        and type(owner) is str
        and type(fingerprint) is str
        and type(payload) is bytes
        and type(expires_in) is float
    ):
        state = _STATES.get(state_text)
        if state is not None:
            return Record(key, state, token, owner, fingerprint, payload, max(0.0, expires_in))
    if not isinstance(state_text, str):
        # MySQL/MariaDB hold text as VARBINARY (see BinaryText): its bytes are UTF-8, or
        # the row is not ours (UnicodeDecodeError, reported as a CorruptRecordError).
        state_text, token, owner, fingerprint = map(
            text_of, (state_text, token, owner, fingerprint)
        )
    state = _STATES.get(state_text)
    if state is None:
        raise CorruptRecordError(
            f"sql backend: record {key!r} has an unknown state {state_text!r}; "
            "it was not written by idempotask"
        )
    for name, value in (("token", token), ("owner", owner), ("fingerprint", fingerprint)):
        if not isinstance(value, str):
            raise CorruptRecordError(
                f"sql backend: record {key!r} has a {name} that is not text: {value!r}"
            )
    if isinstance(payload, (bytearray, memoryview)):
        payload = bytes(payload)
    if not isinstance(payload, bytes) or not isinstance(expires_in, (int, float)):
        raise CorruptRecordError(
            f"sql backend: record {key!r} has an unreadable payload or expiry: "
            f"{type(payload).__name__}, {expires_in!r}"
        )
    return Record(key, state, token, owner, fingerprint, payload, max(0.0, float(expires_in)))


def _takeable_record(record: Record, token: str, owner: str) -> bool:
    """Whether a live ``record`` gives way to a claim with ``token`` and ``owner``."""
    return record.state is State.IN_PROGRESS and (
        record.token == token or (owner != "" and record.owner == owner)
    )


# -- flows ---------------------------------------------------------------------------------


def flow_claim(
    sql: Statements,
    q: Session,
    flavour: Flavour,
    key: str,
    token: str,
    lease: float,
    owner: str,
    fingerprint: str,
) -> Flow[Record]:
    """Take ``key`` or return the record holding it (the ``Backend.claim`` contract)."""
    params = {"k": key, "t": token, "o": owner, "f": fingerprint, "d": lease}
    if flavour == "postgresql":
        # The first try settles nearly every claim: an absent key is taken, a live record
        # of someone else's is the answer (a duplicate writes nothing, locks nothing).
        rows = yield q.op(sql.claim_new_postgresql, params)
        if rows:
            taken, *fields, live = rows[0]
            if taken:
                return Record(key, State.IN_PROGRESS, token, owner, fingerprint, b"", lease)
            record = parse_record(key, fields)
            if live and not _takeable_record(record, token, owner):
                return record
        # Expired, ours to re-take, or committed after our snapshot: the full claim.
    for _ in range(CLAIM_ATTEMPTS):
        if flavour == "postgresql":
            rows = yield q.op(sql.claim_postgresql, params)
            if rows:
                row = rows[0]  # (taken, *the record)
                record = parse_record(key, row[1:])
                if row[0] or not _takeable_record(record, token, owner):
                    return record
            # Nothing came back, or our snapshot showed a record we could re-take while
            # the upsert found a newer version: a concurrent commit our snapshot missed.
            continue

        if flavour == "mariadb":
            rows = yield q.op(sql.claim_mariadb, params)
            if rows:
                return parse_record(key, rows[0])
            continue

        # MySQL and SQLite: a plain read answers duplicates in one statement, without
        # locks; only a claim that may take the key writes.
        rows = yield q.op(sql.read_first, {"k": key})
        if rows:
            *fields, live = rows[0]
            current = parse_record(key, fields)
            if live and not _takeable_record(current, token, owner):
                return current
        if flavour == "sqlite":
            # One writer at a time on the file: the upsert and the read that follows see
            # the same state, and no other process changes it in between.
            yield q.begin()
            yield q.op(sql.upsert_sqlite, params, "none")
            rows = yield q.op(sql.read_any, {"k": key})
            yield q.commit()
            if rows:
                return parse_record(key, rows[0])
            continue
        if not rows:  # absent: a plain INSERT takes it, unless someone was faster
            try:
                yield q.op(sql.insert_new, params, "none")
            except IntegrityError:
                pass
            else:
                return Record(key, State.IN_PROGRESS, token, owner, fingerprint, b"", lease)
        # A record to take over or re-take, or one inserted by someone else since our
        # read: the conditional upsert decides atomically, the read shows who won. Our
        # token is unique to this claim, so the row carries it only if we took the key.
        yield q.op(sql.upsert_mysql, params, "none")
        rows = yield q.op(sql.read_any, {"k": key})
        if rows:
            return parse_record(key, rows[0])
    raise BackendError(
        f"sql backend: claim {key!r} did not settle after {CLAIM_ATTEMPTS} attempts; "
        "the record kept changing under concurrent claims"
    )


def flow_finish(
    sql: Statements, q: Session, key: str, token: str, payload: bytes, ttl: float, state: State
) -> Flow[bool]:
    """complete (``state=COMPLETED``) or fail (``state=FAILED``): compare-and-set on the
    token; repeating one that succeeded returns True again."""
    # A plain UPDATE; only when it changes nothing (a repeated complete, a lost lease)
    # does a read tell the two apart: a statement that did both cost every first call on
    # PostgreSQL 0.06 of a plain INSERT's round trip more.
    params = {"k": key, "t": token, "s": state.value, "p": bytes(payload), "d": ttl}
    if (yield q.op(sql.finish, params, "rowcount")):
        return True
    rows = yield q.op(sql.finished_already, {"k": key, "t": token, "s": state.value})
    return bool(rows)


def successor(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (code point
    order, which is UTF-8 byte order), or None when there is none."""
    for i in range(len(prefix) - 1, -1, -1):
        point = ord(prefix[i]) + 1
        if 0xD800 <= point <= 0xDFFF:
            point = 0xE000
        if point <= 0x10FFFF:
            return prefix[:i] + chr(point)
    return None

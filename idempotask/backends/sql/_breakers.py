"""Circuit breaker state on SQL: :class:`SQLBreakerStore`, its statements and its plans.

One row per breaker name (see ``define_breaker_table``), every time on the database's
clock, each operation atomic. Statements per operation:

====================  ==========  =============  ==========================  ===============
operation             PostgreSQL  MariaDB 10.5+  MySQL                       SQLite (file)
====================  ==========  =============  ==========================  ===============
record_failure        1           1              2 (upsert, read)            4 local (BEGIN
                                                                             IMMEDIATE, upsert,
                                                                             read, COMMIT)
try_probe, granted    1           1              1                           1
try_probe, refused    2           2              2                           2
record_success        1 (closes)  1              1                           1
                      / 2         / 2            / 2                         / 2
state, reset          1           1              1                           1
====================  ==========  =============  ==========================  ===============

``record_failure`` is one ``INSERT … ON CONFLICT (name) DO UPDATE SET`` (MySQL: ``ON
DUPLICATE KEY UPDATE``) whose ``CASE`` expressions apply the rules of
:class:`~idempotask.breaker.BreakerStore`, with ``RETURNING`` where the database has it.
The clock is read once per statement (``statement_timestamp()`` on PostgreSQL), so all
branches of one statement agree on the time. The failure that opens the breaker writes
its own random token in ``opened_by``: that is how it learns it made the change, also
where the row is read back by a second statement. ``try_probe`` is a guarded ``UPDATE``
(its row count says whether the probe was granted), ``record_success`` a guarded
``DELETE``; each reads the state only when it changed nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from sqlalchemy import (
    Double,
    Executable,
    Integer,
    Table,
    and_,
    bindparam,
    case,
    delete,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from idempotask.backends._letters import check_int
from idempotask.backends._twins import twins
from idempotask.backends.base import BreakerState, BreakerStatus
from idempotask.backends.sql._database import Flavour, Session, seconds
from idempotask.backends.sql._deadletters import TableStore
from idempotask.backends.sql._schema import (
    DEFAULT_BREAKER_TABLE,
    TEXT_LENGTH,
    DbNow,
    DbStatementNow,
    StatementSet,
    built,
    define_breaker_table,
    metadata,
    text_of,
)
from idempotask.errors import ConfigurationError, CorruptRecordError
from idempotask.flow import Flow, drive

__all__ = ["BreakerStatements", "SQLBreakerStore", "breakers"]

#: The default breaker table, ``idempotask_breakers``, in the shared ``metadata``.
breakers = define_breaker_table(metadata)

_CLOSED = BreakerState(BreakerStatus.CLOSED)


class BreakerStatements(StatementSet):
    """Every statement the breaker store sends for one table, built once each.

    Parameter names (none is a column's name: an UPDATE would take it for a new value):
    ``ns`` the namespace (in every statement), ``bn`` the breaker's name, ``tok`` a
    token, ``threshold``, ``window``, ``open_for``, ``lease`` and ``retain`` (seconds),
    ``n`` a limit.
    """

    def __init__(self, table: Table) -> None:
        super().__init__(table)
        c = table.c
        self._name = bindparam("bn", type_=c.name.type)
        self._ns = bindparam("ns", type_=c.namespace.type)
        self._tok = bindparam("tok", type_=c.probe_token.type)
        self._empty = literal("", c.probe_token.type)

    def _state_columns(self, now: ColumnElement[float]) -> list[ColumnElement[Any]]:
        c = self.table.c
        return [c.failures, c.window_until, c.open_until, c.probe_until, c.opened_by, now]

    def _one(self) -> ColumnElement[bool]:
        c = self.table.c
        return and_(c.namespace == self._ns, c.name == self._name)

    @built
    def failure(self, flavour: Flavour) -> Executable:
        """Count one failure, opening at ``threshold``, re-opening a half-open breaker."""
        t, c = self.table, self.table.c
        now = DbStatementNow()
        threshold: BindParameter[int] = bindparam("threshold", type_=Integer())
        window: BindParameter[float] = bindparam("window", type_=Double())
        open_for: BindParameter[float] = bindparam("open_for", type_=Double())
        first_opens = threshold <= 1
        row = {
            "namespace": self._ns,
            "name": self._name,
            "failures": 1,
            "window_until": case((first_opens, literal(0.0)), else_=now + window),
            "open_until": case((first_opens, now + open_for), else_=null()),
            "probe_until": null(),
            "probe_token": self._empty,
            "opened_by": case((first_opens, self._tok), else_=self._empty),
        }
        # The rules of BreakerStore, over the row as it was (c.*).
        is_open = and_(c.open_until.is_not(None), now < c.open_until)
        is_half = and_(c.open_until.is_not(None), now >= c.open_until)
        fresh_window = c.window_until <= now
        count = case((fresh_window, 1), else_=c.failures + 1)
        opens = or_(is_half, and_(c.open_until.is_(None), count >= threshold))
        mysql_family = flavour in ("mysql", "mariadb")
        # MySQL assigns left to right, each assignment seeing the ones before, so it
        # cannot evaluate ``opens`` after failures or window_until changed: opened_by goes
        # first, and later columns ask whether it now holds our token. PostgreSQL and
        # SQLite evaluate every assignment on the old row, where ``opens`` is right.
        opened = c.opened_by == self._tok if mysql_family else opens
        assignments: list[tuple[str, Any]] = [
            ("opened_by", case((is_open, c.opened_by), (opens, self._tok), else_=self._empty)),
            ("probe_until", case((is_open, c.probe_until), else_=null())),
            ("probe_token", case((is_open, c.probe_token), else_=self._empty)),
            ("failures", case((is_open, c.failures), (is_half, 0), else_=count)),
            (
                "window_until",
                case(
                    (is_open, c.window_until),
                    (opened, literal(0.0)),
                    (fresh_window, now + window),
                    else_=c.window_until,
                ),
            ),
            ("open_until", case((is_open, c.open_until), (opened, now + open_for), else_=null())),
        ]
        if mysql_family:
            ins = mysql.insert(t).values(row).on_duplicate_key_update(assignments)
            return ins.returning(*self._state_columns(now)) if flavour == "mariadb" else ins
        dialect_insert = postgresql.insert if flavour == "postgresql" else sqlite.insert
        upsert = dialect_insert(t).values(row)
        upsert = upsert.on_conflict_do_update(
            index_elements=[c.namespace, c.name], set_=dict(assignments)
        )
        return upsert.returning(*self._state_columns(now)) if flavour == "postgresql" else upsert

    @cached_property
    def read(self) -> Executable:
        """The breaker's row and the database's time."""
        return select(*self._state_columns(DbNow())).where(self._one())

    @cached_property
    def probe(self) -> Executable:
        """Grant the probe to ``tok`` for ``lease`` seconds if half-open and it is free."""
        c = self.table.c
        now = DbStatementNow()
        return (
            update(self.table)
            .where(
                self._one(),
                c.open_until.is_not(None),
                c.open_until <= now,
                or_(c.probe_until.is_(None), c.probe_until <= now, c.probe_token == self._tok),
            )
            .values(probe_until=now + bindparam("lease", type_=Double()), probe_token=self._tok)
        )

    @cached_property
    def close_half_open(self) -> Executable:
        """Remove the row of a half-open breaker (a probe succeeded)."""
        c = self.table.c
        return delete(self.table).where(
            self._one(), c.open_until.is_not(None), c.open_until <= DbNow()
        )

    @cached_property
    def reset(self) -> Executable:
        """Remove the row."""
        return delete(self.table).where(self._one())

    @cached_property
    def all(self) -> Executable:
        """Up to ``n`` breakers of the namespace, by name, and the database's time."""
        c = self.table.c
        return (
            select(c.name, *self._state_columns(DbNow()))
            .where(c.namespace == self._ns)
            .order_by(c.name)
            .limit(bindparam("n", type_=Integer()))
        )

    @cached_property
    def purge_stale(self) -> Executable:
        """Remove rows that only say "closed": a count whose window ended, or a half-open
        breaker whose open period ended ``retain`` seconds ago with no probe in flight."""
        c = self.table.c
        now = DbStatementNow()
        retain: BindParameter[float] = bindparam("retain", type_=Double())
        return delete(self.table).where(
            c.namespace == self._ns,
            or_(
                and_(c.open_until.is_(None), c.window_until <= now),
                and_(
                    c.open_until.is_not(None),
                    c.open_until + retain <= now,
                    or_(c.probe_until.is_(None), c.probe_until <= now),
                ),
            ),
        )


# -- replies ------------------------------------------------------------------------------------


def breaker_view(
    name: str,
    row: Sequence[Any] | None,
    *,
    token: str | None = None,
    open_for: float = 0.0,
) -> BreakerState:
    """A :class:`BreakerState` from ``(failures, window_until, open_until, probe_until,
    opened_by, now)``; with ``token``, a reply to the failure carrying it (``changed`` when
    its token is the one that opened the breaker)."""
    if row is None:
        return _CLOSED
    try:
        failures, window_until, open_until, probe_until, opened_by, now = row
        failures, window_until, now = int(failures), float(window_until), float(now)
        open_until = None if open_until is None else float(open_until)
        probe_until = None if probe_until is None else float(probe_until)
        opened_by = text_of(opened_by)
    except (TypeError, ValueError) as exc:
        raise CorruptRecordError(
            f"sql breaker store: the row of breaker {name!r} was not written by idempotask: {exc}"
        ) from None
    if open_until is None:
        return BreakerState(BreakerStatus.CLOSED, failures=failures if window_until > now else 0)
    if token is not None and opened_by == token:
        return BreakerState(
            BreakerStatus.OPEN, failures=failures, retry_after=open_for, changed=True
        )
    if now < open_until:
        return BreakerState(BreakerStatus.OPEN, retry_after=open_until - now)
    wait = 0.0 if probe_until is None else max(0.0, probe_until - now)
    return BreakerState(BreakerStatus.HALF_OPEN, retry_after=wait)


# -- the store -----------------------------------------------------------------------------------


def _checktext_of(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(
            f"sql breaker store: {what} must be a non-empty str, got {value!r}"
        )
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ConfigurationError(f"sql breaker store: {what} {value!r} is not valid text") from None
    if size > TEXT_LENGTH:
        raise ConfigurationError(
            f"sql breaker store: {what} {value[:60]!r}… is {size} bytes in UTF-8; the SQL "
            f"store holds up to {TEXT_LENGTH}"
        )
    return value


def _seconds(value: Any, option: str) -> float:
    return seconds(value, option, "sql breaker store")


def _count(rowcount: int) -> int:
    return max(0, rowcount)


class SQLBreakerStore(TableStore):
    """Circuit breaker state in a SQL table: a :class:`~idempotask.backends.base.BreakerStore`
    on PostgreSQL, SQLite, MariaDB or MySQL, sync and async, shared by every process
    using the database.

    ``bind`` is a URL, an ``Engine`` / ``AsyncEngine`` (with the options of
    :class:`~idempotask.backends.sql.SQLAlchemyBackend`) or a ``SQLAlchemyBackend`` whose
    engines it shares (``backend.breaker_store()`` does that, and it is what a
    ``CircuitBreaker`` with ``store=None`` uses when a SQL backend is configured).
    ``namespace`` scopes the breakers: two namespaces on one table have separate ones.
    :meth:`create_tables` creates its table (or Alembic, see ``define_breaker_table``).

    >>> from idempotask.breaker import CircuitBreaker
    >>> store = SQLBreakerStore("sqlite:///:memory:")
    >>> store.create_tables()
    >>> store.record_failure("erp", threshold=1, window=60, open_for=30).status.value
    'open'
    >>> breaker = CircuitBreaker("erp", store=store)
    """

    default_table_name = DEFAULT_BREAKER_TABLE
    default_table = breakers
    table_option = "breaker_table"
    _define_table = staticmethod(define_breaker_table)

    def __init__(self, bind: Any = None, /, **options: Any) -> None:
        super().__init__(bind, **options)
        self._sql = BreakerStatements(self.table)

    def _params(self, name: str, **params: Any) -> dict[str, Any]:
        """A statement's parameters for breaker ``name`` (checked) of this namespace."""
        return {"ns": self.namespace, "bn": _checktext_of(name, "a breaker name"), **params}

    def _read(self, q: Session, name: str) -> Flow[BreakerState]:
        rows = yield q.op(self._sql.read, {"ns": self.namespace, "bn": name})
        return breaker_view(name, rows[0] if rows else None)

    def _write(
        self, operation: str, name: str, statement: Executable, params: Any, done: BreakerState
    ) -> Flow[BreakerState]:
        """A guarded write: ``done`` if it changed the row, else the state unchanged."""

        def flow(q: Session) -> Flow[BreakerState]:
            if (yield q.op(statement, params, "rowcount")):
                return done
            return (yield from self._read(q, name))

        return (yield from self._on_db(operation, name, flow))

    def _state(self, name: str) -> Flow[BreakerState]:
        """The breaker's state; one statement, no writes."""
        _checktext_of(name, "a breaker name")
        return (yield from self._on_db("breaker.state", name, lambda q: self._read(q, name)))

    state, astate = twins(_state)

    def _states(self, *, limit: int = 1000) -> Flow[dict[str, BreakerState]]:
        """Every breaker of the namespace with a row (up to ``limit``, by name): one
        statement, for operators. A breaker with no row is closed.

        >>> store = SQLBreakerStore("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.record_failure("erp", threshold=1, window=60, open_for=30)
        >>> {name: state.status.value for name, state in store.states().items()}
        {'erp': 'open'}
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigurationError(
                f"sql breaker store: limit must be a non-negative int, got {limit!r}"
            )
        return (
            yield from self._one(
                "breaker.states",
                None,
                self._sql.all,
                {"ns": self.namespace, "n": limit},
                lambda rows: {text_of(n): breaker_view(text_of(n), row) for n, *row in rows},
            )
        )

    states, astates = twins(_states)

    def _record_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> Flow[BreakerState]:
        """Count a failure (opening at ``threshold``); one upsert (see the module)."""
        _checktext_of(name, "a breaker name")
        check_int(threshold, "threshold", "sql breaker store", minimum=1)
        window, open_for = _seconds(window, "window"), _seconds(open_for, "open_for")

        def flow(q: Session) -> Flow[BreakerState]:
            token = uuid.uuid4().hex
            params = self._params(
                name, tok=token, threshold=threshold, window=window, open_for=open_for
            )
            flavour = self._flavour(q)
            statement = self._sql.failure(flavour)
            if flavour in ("postgresql", "mariadb"):
                rows = yield q.op(statement, params)
            else:
                # No RETURNING (MySQL) or not relied on (SQLite < 3.35): the row is read
                # back, in the same transaction on SQLite (one writer: nothing slips in).
                if flavour == "sqlite":
                    yield q.begin()
                yield q.op(statement, params, "none")
                rows = yield q.op(self._sql.read, {"ns": self.namespace, "bn": name})
                if flavour == "sqlite":
                    yield q.commit()
            if not rows:  # reset by someone else right after our write (MySQL): closed
                return _CLOSED
            return breaker_view(name, rows[0], token=token, open_for=open_for)

        return (yield from self._on_db("breaker.record_failure", name, flow))

    record_failure, arecord_failure = twins(_record_failure)

    def _record_success(self, name: str) -> Flow[BreakerState]:
        """Report a success (closing a half-open breaker)."""
        params = self._params(name)
        closed = BreakerState(BreakerStatus.CLOSED, changed=True)
        statement = self._sql.close_half_open
        return (yield from self._write("breaker.record_success", name, statement, params, closed))

    record_success, arecord_success = twins(_record_success)

    def _try_probe(self, name: str, token: str, *, lease: float) -> Flow[BreakerState]:
        """Take the half-open probe for ``lease`` seconds if it is free."""
        _checktext_of(name, "a breaker name")
        _checktext_of(token, "a probe token")
        params = self._params(name, tok=token, lease=_seconds(lease, "lease"))
        probe = BreakerState(BreakerStatus.HALF_OPEN, retry_after=params["lease"], probe=True)
        return (yield from self._write("breaker.try_probe", name, self._sql.probe, params, probe))

    try_probe, atry_probe = twins(_try_probe)

    def _reset(self, name: str) -> Flow[None]:
        """Remove the breaker's row (closed, no failures)."""
        params = self._params(name)
        yield from self._one("breaker.reset", name, self._sql.reset, params, bool, "rowcount")

    reset, areset = twins(_reset)

    def purge_stale(self, retain: float = 86400.0) -> int:
        """Delete rows that only say "closed" (a count whose window ended) or that stayed
        half-open ``retain`` seconds past their open period; how many went. Optional: a
        table holds one small row per breaker name.

        >>> store = SQLBreakerStore("sqlite:///:memory:"); store.create_tables()
        >>> store.purge_stale()
        0
        """
        params = {"ns": self.namespace, "retain": _seconds(retain, "retain")}
        statement = self._sql.purge_stale
        flow = self._one("breaker.purge_stale", None, statement, params, _count, "rowcount")
        return drive(flow)

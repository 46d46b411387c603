"""Dead letters on SQL: :class:`SQLDeadLetterStore` and the flows of its operations.

Same machinery as the idempotency backend: statements built with SQLAlchemy Core (see
:mod:`~idempotask.backends.sql._letters`), flows run on one pooled connection by
:class:`~idempotask.backends.sql._database.Database`, every single statement its own
autocommit transaction. A store sees the letters of its ``namespace`` only.

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

An update that changes the error type or the message but not both reads the other first
(one statement more), to keep the ``search`` column right.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, MetaData, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError

from idempotask.backends import _letters as shared
from idempotask.backends._twins import twins
from idempotask.backends.base import (
    DeadLetter,
    DeadLetterFilter,
    StatRow,
    Status,
    check_changes,
)
from idempotask.backends.sql import _engines
from idempotask.backends.sql._database import (
    DEFAULT_STATEMENT_TIMEOUT,
    Database,
    OnDatabase,
    Session,
    flow_batches,
    seconds,
)
from idempotask.backends.sql._letters import (
    PURGE_BATCH,
    WHO,
    DeadLetterStatements,
    check_text,
    column_value,
    filter_params,
    fold,
    letter_params,
    padded,
    parse_letter,
)
from idempotask.backends.sql._schema import (
    DEFAULT_DEAD_LETTER_TABLE,
    TEXT_LENGTH,
    define_dead_letter_table,
    metadata,
    text_of,
)
from idempotask.errors import BackendError, ConfigurationError
from idempotask.flow import Flow

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine
    from typing_extensions import Self

__all__ = ["SQLDeadLetterStore", "TableStore", "dead_letters"]

#: The default dead-letter table, ``idempotask_dead_letters``, in the shared ``metadata``.
dead_letters = define_dead_letter_table(metadata)


def _skip_locked(dialect: Dialect) -> bool:
    """Whether the MySQL-family server supports ``SKIP LOCKED`` (MariaDB 10.6+, MySQL 8+)."""
    version = tuple(dialect.server_version_info or (0,))
    if getattr(dialect, "is_mariadb", False):
        return version >= (10, 6)
    return version >= (8, 0, 1)


# -- the store ------------------------------------------------------------------------------


def attach(owner: str, bind: Any, **engines: Any) -> tuple[Database, bool]:
    """The database a store runs on, and whether the store owns it: the one of another
    SQL store it was given (``SQLAlchemyBackend``, …), or a new one (``engines``: the
    :class:`Database` options)."""
    shared = getattr(bind, "database", None)
    if not isinstance(shared, Database):
        return Database(bind, owner=owner, **engines), True
    if (
        engines["engine"] is not None
        or engines["async_engine"] is not None
        or engines["engine_options"]
        or (engines["connect_timeout"], engines["busy_timeout"], engines["statement_timeout"])
        != (10.0, 30.0, DEFAULT_STATEMENT_TIMEOUT)
    ):
        raise ConfigurationError(
            f"{owner}: given {type(bind).__name__}, the store uses its engines and their "
            "options; set engines and timeouts there"
        )
    return shared, False


def _check_name(owner: str, what: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{owner}: {what} must be a non-empty string, got {value!r}")
    if len(value.encode("utf-8", "surrogatepass")) > TEXT_LENGTH:
        raise ConfigurationError(f"{owner}: {what} is longer than {TEXT_LENGTH} bytes")
    return value


class TableStore(OnDatabase):
    """What the SQL dead-letter and breaker stores share: the engines (their own, or a
    backend's), one table, the ``namespace`` their rows are scoped by, and the table's
    lifecycle. Subclasses name their default table and say how to define it."""

    default_table_name: str
    default_table: Table
    #: The URL option naming this store's table when one URL serves several stores.
    table_option: str
    #: ``define_*_table(metadata, name, schema=)`` of the store's table.
    _define_table: Callable[..., Table]

    def __init__(
        self,
        bind: Any = None,
        /,
        *,
        namespace: str = "idempotask",
        engine: Engine | None = None,
        async_engine: AsyncEngine | None = None,
        table_name: str | None = None,
        schema: str | None = None,
        connect_timeout: float = 10.0,
        busy_timeout: float = 30.0,
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
        engine_options: Mapping[str, Any] | None = None,
        create_tables: bool = False,
    ) -> None:
        owner = type(self).__name__
        if isinstance(bind, str):
            bind, options = _engines.store_options(bind, owner)
            namespace = options.get("namespace", namespace)
            # One URL may serve the backend and this store: its own option names its
            # table before ``table=`` (the records table's, or this store's alone).
            table_name = options.get(self.table_option, options.get("table_name", table_name))
            create_tables = options.get("create_tables", create_tables)
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
        #: The namespace this store's rows belong to.
        self.namespace = _check_name(owner, "namespace", namespace)
        table_name = self.default_table_name if table_name is None else table_name
        _check_name(owner, "table_name", table_name)
        # The default table is the shared metadata's, already defined there.
        default = table_name == self.default_table_name and schema is None
        self.metadata = metadata if default else MetaData()
        self.table = self._define_table(self.metadata, table_name, schema=schema)
        if create_tables:
            self.database.create_on_first_use(self.metadata, [self.table])

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """A store on its own engines for ``url``; the URL may also say ``?table=NAME``
        (or ``?dead_letter_table=`` / ``?breaker_table=``, which win: one URL can serve
        the backend and this store), ``?namespace=NS`` and ``?create_tables=true``."""
        if not isinstance(url, str):
            raise ConfigurationError(f"{cls.__name__}.from_url: expected a URL, got {url!r}")
        return cls(url, **options)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.database.where!r}, table={self.table.fullname!r}, "
            f"namespace={self.namespace!r})"
        )

    @property
    def tables(self) -> list[str]:
        """The name of this store's table (with its schema, if any), in a list."""
        return [self.table.fullname]

    def create_tables(self) -> None:
        """Create the table and its indexes if missing (safe to repeat)."""
        self.database.schema_change(self.metadata, [self.table], True)

    def drop_tables(self) -> None:
        """Drop the table if it exists (the rows of every namespace are lost)."""
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
    """Dead letters in a SQL table: a :class:`~idempotask.backends.base.DeadLetterStore`
    on PostgreSQL, SQLite, MariaDB or MySQL, sync and async from one object.

    ``bind`` is a URL, an ``Engine`` / ``AsyncEngine`` (as for
    :class:`~idempotask.backends.sql.SQLAlchemyBackend`, with the same options), or a
    ``SQLAlchemyBackend`` (or another SQL store) whose engines, pools and timeouts it
    shares. ``namespace`` scopes the queue: stores of two namespaces on one table see
    separate letters. ``table_name`` (and ``schema``) name the table; :meth:`create_tables`
    creates it (or ``create_tables=True`` on first use, or Alembic from :attr:`metadata`,
    see ``define_dead_letter_table``). The claim lease runs on the database's clock.
    Database errors raise :class:`~idempotask.errors.BackendError` (a missing table
    :class:`~idempotask.errors.MissingTableError`); rows that are not ours
    :class:`~idempotask.errors.CorruptRecordError`.

    >>> store = SQLDeadLetterStore("sqlite:///:memory:")
    >>> store.create_tables()
    >>> store.add(DeadLetter(id="1", function="billing.charge", kind="transient",
    ...                      error_type="TimeoutError", message="slow")).status.value
    'pending'
    >>> [x.id for x in store.claim_due(now=1e10, lease=60)]
    []

    ``DeadLetterQueue("postgresql+psycopg://app@db/app")`` builds one from a URL (the
    query options ``table=`` and ``namespace=`` name the table and the queue).
    """

    default_table_name = DEFAULT_DEAD_LETTER_TABLE
    default_table = dead_letters
    table_option = "dead_letter_table"
    _define_table = staticmethod(define_dead_letter_table)

    def __init__(self, bind: Any = None, /, **options: Any) -> None:
        super().__init__(bind, **options)
        self._sql = DeadLetterStatements(self.table)

    # -- each operation one flow (checks first, then one run on the database) -----------

    def _add(self, letter: DeadLetter) -> Flow[DeadLetter]:
        """Store ``letter`` unless its id exists; return the stored one.

        One ``INSERT`` that skips an existing id (PostgreSQL, SQLite ``ON CONFLICT DO
        NOTHING``; MySQL/MariaDB a duplicate-key error), and a read when it did.
        """
        letter = shared.stored(letter, WHO)
        params = letter_params(letter, self.namespace)  # refuse a bad letter before any I/O
        get = {"ns": self.namespace, "lid": params["p_id"]}

        def flow(q: Session) -> Flow[DeadLetter]:
            flavour = self._flavour(q)
            for _ in range(3):
                if flavour in ("postgresql", "sqlite"):
                    inserted = bool((yield q.op(self._sql.insert(flavour), params, "rowcount")))
                else:
                    try:
                        yield q.op(self._sql.insert(flavour), params, "none")
                        inserted = True
                    except IntegrityError:  # the id exists (MySQL: no ON CONFLICT DO NOTHING)
                        inserted = False
                if inserted:
                    return letter
                rows = yield q.op(self._sql.get, get)
                if rows:
                    return parse_letter(rows[0])
                # Deleted between the two statements (a purge): try again.
            raise BackendError(
                f"sql dead-letter store: add of {letter.id!r} did not settle: the letter kept "
                "appearing and disappearing under concurrent purges"
            )

        return (yield from self._on_db("dead-letter add", letter.id, flow))

    add, aadd = twins(_add)

    def _get(self, id: str) -> Flow[DeadLetter | None]:
        """The letter with this id, or None. One statement."""
        params = {"ns": self.namespace, "lid": check_text(id, "id")}
        return (yield from self._one("dead-letter get", id, self._sql.get, params, _first))

    get, aget = twins(_get)

    def _query(
        self, filter: DeadLetterFilter = shared.ALL, *, limit: int = 100, offset: int = 0
    ) -> Flow[list[DeadLetter]]:
        """Matching letters, newest ``last_failed_at`` first, ties by id. One statement
        (on the ``namespace, last_failed_at`` index)."""
        wanted = shared.check_page(limit, offset, WHO)
        shape, params = filter_params(filter)
        if not wanted:
            return []
        params.update({"ns": self.namespace, "n": limit, "o": offset})
        statement = self._sql.query(shape)
        return (yield from self._one("dead-letter query", None, statement, params, _letters))

    query, aquery = twins(_query)

    def _update(
        self, /, id: str, version: int, *, unless_claimed: bool = False, **changes: Any
    ) -> Flow[DeadLetter | None]:
        """Compare-and-set ``changes`` on version ``version``; ends any claim, or with
        ``unless_claimed`` changes nothing while one is live (the database's clock).

        One ``UPDATE … WHERE version = :v`` (``AND claimed_until`` has passed, when
        ``unless_claimed``), with ``RETURNING`` on PostgreSQL; elsewhere followed by a read.
        """
        check_changes(changes)
        ns, lid = self.namespace, check_text(id, "id")
        v = shared.check_int(version, "version", WHO)
        params: dict[str, Any] = {f"u_{f}": column_value(f, changes[f]) for f in changes}
        params.update({"ns": ns, "lid": lid, "v": v})
        sql, claimed = self._sql, bool(unless_claimed)

        def flow(q: Session) -> Flow[DeadLetter | None]:
            if "error_type" in changes or "message" in changes:
                if "error_type" in changes and "message" in changes:
                    error_type, message = changes["error_type"], changes["message"]
                else:
                    # The search column folds both: read the one that stays. If the letter
                    # changes meanwhile, its version does too and the update changes nothing.
                    rows = yield q.op(sql.get, {"ns": ns, "lid": lid})
                    if not rows:
                        return None
                    current = parse_letter(rows[0])
                    if current.version != version:
                        return None
                    error_type = changes.get("error_type", current.error_type)
                    message = changes.get("message", current.message)
                params["u_search"] = fold(error_type, message)
            fields = tuple(sorted(name[2:] for name in params if name.startswith("u_")))
            flavour = self._flavour(q)
            if flavour == "postgresql":
                return _first((yield q.op(sql.update(fields, True, claimed), params)))
            if flavour == "sqlite":
                # The read is in the update's transaction: it sees exactly the version written.
                yield q.begin()
            count = yield q.op(sql.update(fields, False, claimed), params, "rowcount")
            rows = (yield q.op(sql.get, {"ns": ns, "lid": lid})) if count else []
            if flavour == "sqlite":
                yield q.commit()
            # MySQL/MariaDB (no UPDATE … RETURNING): read right after the update; a writer
            # that changed the letter in between makes this its later version.
            return _first(rows)

        return (yield from self._on_db("dead-letter update", id, flow))

    update, aupdate = twins(_update)

    def _claim_due(
        self,
        now: float,
        *,
        limit: int = 100,
        lease: float = 300.0,
        filter: DeadLetterFilter | None = None,
    ) -> Flow[list[DeadLetter]]:
        """Take up to ``limit`` due, unclaimed open letters for ``lease`` seconds (the
        database's clock), earliest first; concurrent claimers skip each other's rows
        (``SKIP LOCKED``)."""
        now = shared.check_time(now, "now", WHO)
        wanted = shared.check_page(limit, 0, WHO)
        lease = seconds(lease, "lease", WHO)
        shape, params = filter_params(shared.ALL if filter is None else filter)
        if not wanted:
            return []
        ns, sql = self.namespace, self._sql
        params.update({"ns": ns, "now": now, "n": limit, "lease": lease})

        def flow(q: Session) -> Flow[list[DeadLetter]]:
            flavour = self._flavour(q)
            if flavour == "postgresql":
                letters = _letters((yield q.op(sql.claim_postgresql(shape), params)))
            else:
                yield q.begin()
                lock = (
                    "" if flavour == "sqlite" else ("skip" if _skip_locked(q.dialect) else "wait")
                )
                rows = yield q.op(sql.select_due(shape, lock), params)
                letters = [parse_letter(row, bump=1) for row in rows]
                if letters:
                    ids = [letter.id for letter in letters]
                    size = padded(len(ids))
                    ids += [ids[-1]] * (size - len(ids))
                    take = {f"id{i}": value for i, value in enumerate(ids)}
                    yield q.op(sql.claim_ids(size), {**take, "ns": ns, "lease": lease}, "none")
                yield q.commit()
            letters.sort(key=lambda x: (x.next_retry_at, x.id))
            return letters

        return (yield from self._on_db("dead-letter claim_due", None, flow))

    claim_due, aclaim_due = twins(_claim_due)

    def _stats(self, filter: DeadLetterFilter = shared.ALL) -> Flow[list[StatRow]]:
        """Counts by (function, kind, status), sorted as Python sorts them: one ``GROUP
        BY`` statement."""
        shape, params = filter_params(filter)
        params["ns"] = self.namespace
        statement = self._sql.stats(shape)
        return (yield from self._one("dead-letter stats", None, statement, params, _stat_rows))

    stats, astats = twins(_stats)

    def _purge(self, filter: DeadLetterFilter) -> Flow[int]:
        """Delete matching letters, :data:`PURGE_BATCH` per statement (until a batch
        comes back short); how many went."""
        shape, params = filter_params(shared.check_filter(filter, WHO))
        params.update({"ns": self.namespace, "n": PURGE_BATCH})

        def flow(q: Session) -> Flow[int]:
            statement = self._sql.purge(self._flavour(q), shape)
            return (yield from flow_batches(q, statement, params, PURGE_BATCH))

        return (yield from self._on_db("dead-letter purge", None, flow))

    purge, apurge = twins(_purge)

    def _expire_claim(self, id: str) -> Flow[bool]:
        """Test hook: end a processor's claim on ``id`` now; True if a live one was there."""
        params = {"ns": self.namespace, "lid": check_text(id, "id")}
        statement = self._sql.expire_claim
        return (
            yield from self._one(
                "dead-letter expire_claim", id, statement, params, bool, "rowcount"
            )
        )

    expire_claim, aexpire_claim = twins(_expire_claim)


def _first(rows: Sequence[Any]) -> DeadLetter | None:
    return parse_letter(rows[0]) if rows else None


def _letters(rows: Sequence[Any]) -> list[DeadLetter]:
    return [parse_letter(row) for row in rows]


def _stat_rows(rows: Sequence[Any]) -> list[StatRow]:
    return shared.sum_stats(
        (text_of(f), text_of(k), Status(text_of(s)), int(n), int(r or 0), int(b or 0))
        for f, k, s, n, r, b in rows
    )

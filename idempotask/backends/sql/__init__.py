"""The SQL store on SQLAlchemy 2 Core: PostgreSQL, SQLite, MySQL and MariaDB, sync and async.

One table holds one row per key (see :func:`define_table`); every expiry is computed on the
database's clock, never the client's. One backend object serves sync and async callers::

    >>> from idempotask.backends.sql import SQLAlchemyBackend
    >>> store = SQLAlchemyBackend("postgresql+psycopg://app@db/app")  # connects on first use
    >>> store.create_tables()                                          # doctest: +SKIP
    >>> record = store.claim("ns:billing.charge:1:ab12", "token-1", lease=30)  # doctest: +SKIP
    >>> record.held_by("token-1")  # doctest: +SKIP
    True

Engines are created on first use: the sync one for the URL's sync driver, and one asyncio
engine per event loop for the matching async driver (psycopg serves both on PostgreSQL;
MySQL/MariaDB use asyncmy; aiomysql 0.3 cannot send statements with PyMySQL 1.2.3+,
aio-libs/aiomysql#1080). On a SQLite file an asyncio call runs the sync operation in a
worker thread unless you pass an ``AsyncEngine``.

Every statement runs in autocommit mode, through SQLAlchemy's public
``Connection.execute`` on a connection of the engine's pool (engines, their options and
the time bounds of statements: :class:`SQLAlchemyBackend`). A duplicate is one statement
on every database; a first call two on PostgreSQL and MariaDB (claim, complete). How each
database claims a key and the round trips per operation (counted by
``tests/backends/test_sql.py``) are in the README's SQL section and in
:mod:`~idempotask.backends.sql._records`. Database errors become
:class:`~idempotask.errors.BackendError` naming the operation and the database (never its
password); a row that is not ours :class:`~idempotask.errors.CorruptRecordError`.

The same engines serve :class:`SQLDeadLetterStore` (dead letters; also built from a SQL
URL by ``DeadLetterQueue``) and :class:`SQLBreakerStore` (circuit breakers; what
:meth:`SQLAlchemyBackend.breaker_store` returns), each with its own table in
:data:`metadata`::

    >>> backend = SQLAlchemyBackend("sqlite:///:memory:")
    >>> letters, breakers = backend.dead_letter_store(), backend.breaker_store()
    >>> letters.database is backend.database is breakers.database
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Engine, MetaData, Table

from idempotask.backends._twins import twins
from idempotask.backends.base import Record, State
from idempotask.backends.sql import _engines, _transactions
from idempotask.backends.sql._breakers import SQLBreakerStore, breakers
from idempotask.backends.sql._database import (
    DEFAULT_STATEMENT_TIMEOUT,
    Database,
    OnDatabase,
    Session,
    flow_batches,
    seconds,
)
from idempotask.backends.sql._deadletters import SQLDeadLetterStore, dead_letters
from idempotask.backends.sql._records import (
    CLAIM_ATTEMPTS,
    Statements,
    flow_claim,
    flow_finish,
    parse_record,
    successor,
)
from idempotask.backends.sql._schema import (
    DEFAULT_BREAKER_TABLE,
    DEFAULT_DEAD_LETTER_TABLE,
    DEFAULT_TABLE_NAME,
    KEY_LENGTH,
    TEXT_LENGTH,
    BinaryText,
    DbNow,
    define_breaker_table,
    define_dead_letter_table,
    define_table,
    metadata,
)
from idempotask.errors import ConfigurationError
from idempotask.flow import Flow, drive

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "CLAIM_ATTEMPTS",
    "DEFAULT_BREAKER_TABLE",
    "DEFAULT_DEAD_LETTER_TABLE",
    "DEFAULT_STATEMENT_TIMEOUT",
    "DEFAULT_TABLE_NAME",
    "KEY_LENGTH",
    "TEXT_LENGTH",
    "BinaryText",
    "DbNow",
    "SQLAlchemyBackend",
    "SQLBreakerStore",
    "SQLDeadLetterStore",
    "breakers",
    "dead_letters",
    "define_breaker_table",
    "define_dead_letter_table",
    "define_table",
    "metadata",
    "records",
]

#: The default records table, ``idempotask_records``, in :data:`metadata` (which also holds
#: the default dead-letter and breaker tables).
records = define_table(metadata)


def check_store_options(owner: str, sqlite_transactions: object, **tables: object) -> None:
    """The checks a SQL idempotency store (this module's, or the Django one) makes of its
    table names and ``sqlite_transactions``, with ``owner`` naming it in the error."""
    for option, name in tables.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"{owner}: {option} must be a non-empty string, got {name!r}")
    if not isinstance(sqlite_transactions, bool):
        raise ConfigurationError(
            f"{owner}: sqlite_transactions must be True or False, got {sqlite_transactions!r}"
        )


class SQLAlchemyBackend(OnDatabase):
    """The idempotency store on a SQL database, implementing
    :class:`~idempotask.backends.base.Backend` for sync and async callers.

    ``bind`` is a URL (``"postgresql+psycopg://user:pw@host/db"``, ``"sqlite:///app.db"``,
    ``"mysql+pymysql://user@host/db"``), an ``Engine`` or an ``AsyncEngine``; ``engine=``
    and ``async_engine=`` pass both. Engines you pass are used as you configured them
    (pool, ``pool_pre_ping``, events, ``echo``), in autocommit mode per connection unless
    they are in it already, and never disposed by this backend; the engines it creates
    get autocommit, a connect timeout (``connect_timeout`` seconds), hidden parameters in
    error messages, and for SQLite WAL and a busy timeout (``busy_timeout`` seconds).
    ``engine_options`` are extra ``create_engine`` arguments for the engines it creates.

    ``statement_timeout`` (seconds, 10 by default; None turns it off) bounds every
    statement: on the engines it creates the server cancels one that runs longer
    (PostgreSQL ``statement_timeout``, MariaDB ``max_statement_time``), TCP keepalives
    notice a vanished peer (libpq) and PyMySQL gives up reading after the bound; on any
    engine, a psycopg statement still unanswered a grace later (at most a second) has its
    socket shut down, and an asyncio operation on MySQL or SQLite is cancelled
    (``asyncio.timeout``): the call raises :class:`~idempotask.errors.BackendError` and the
    connection is discarded. Connecting is bounded by ``connect_timeout`` on top.

    On MySQL/MariaDB, an engine you pass should be created with
    ``isolation_level="AUTOCOMMIT", skip_autocommit_rollback=True`` (as ours are): otherwise
    every operation also pays a ``SET autocommit`` on checkout and a ``ROLLBACK`` and a
    reset on return. PostgreSQL and SQLite engines need nothing special.

    ``table_name`` (and ``schema``) name the records table, ``dead_letter_table`` and
    ``breaker_table`` those of :meth:`dead_letter_store` and :meth:`breaker_store`.
    ``sqlite_transactions=True`` lets transactional calls run on a SQLite file (see
    :meth:`begin`).
    :meth:`create_tables` creates all three (so does ``idempotask db create``, or
    ``create_tables=True`` / the URL option ``?create_tables=true`` on first use); or let
    Alembic do it from :attr:`metadata`. Without them, an operation raises
    :class:`~idempotask.errors.MissingTableError` naming the table.

    >>> store = SQLAlchemyBackend("sqlite:///:memory:")
    >>> store.create_tables()
    >>> store.claim("k", "t1", lease=30).held_by("t1")
    True
    >>> store.claim("k", "t2", lease=30).token
    't1'
    """

    def __init__(
        self,
        bind: str | URL | Engine | AsyncEngine | None = None,
        /,
        *,
        engine: Engine | None = None,
        async_engine: AsyncEngine | None = None,
        table_name: str = DEFAULT_TABLE_NAME,
        schema: str | None = None,
        connect_timeout: float = 10.0,
        busy_timeout: float = 30.0,
        statement_timeout: float | None = DEFAULT_STATEMENT_TIMEOUT,
        engine_options: Mapping[str, Any] | None = None,
        create_tables: bool = False,
        dead_letter_table: str = DEFAULT_DEAD_LETTER_TABLE,
        breaker_table: str = DEFAULT_BREAKER_TABLE,
        sqlite_transactions: bool = False,
    ) -> None:
        if isinstance(bind, (str, URL)):
            bind, options = _engines.store_options(bind, "SQLAlchemyBackend")
            options.pop("namespace", None)  # keys carry their namespace
            table_name = options.pop("table_name", table_name)
            create_tables = options.pop("create_tables", create_tables)
            dead_letter_table = options.pop("dead_letter_table", dead_letter_table)
            breaker_table = options.pop("breaker_table", breaker_table)
        self.database = Database(
            bind,
            owner="SQLAlchemyBackend",
            engine=engine,
            async_engine=async_engine,
            connect_timeout=connect_timeout,
            busy_timeout=busy_timeout,
            statement_timeout=statement_timeout,
            engine_options=engine_options,
        )
        check_store_options(
            "SQLAlchemyBackend",
            sqlite_transactions,
            table_name=table_name,
            dead_letter_table=dead_letter_table,
            breaker_table=breaker_table,
        )
        self.schema = schema
        #: Whether transactional calls may run on SQLite (see :meth:`begin`).
        self.sqlite_transactions = sqlite_transactions
        self.dead_letter_table = dead_letter_table
        self.breaker_table = breaker_table
        # The default tables are those of the shared metadata, already defined there.
        default = (table_name, dead_letter_table, breaker_table, schema) == (
            DEFAULT_TABLE_NAME,
            DEFAULT_DEAD_LETTER_TABLE,
            DEFAULT_BREAKER_TABLE,
            None,
        )
        self.metadata = metadata if default else MetaData()
        self._tables = [
            define_table(self.metadata, table_name, schema=schema),
            define_dead_letter_table(self.metadata, dead_letter_table, schema=schema),
            define_breaker_table(self.metadata, breaker_table, schema=schema),
        ]
        self.table: Table = self._tables[0]
        self._sql = Statements(self.table)
        if create_tables:
            self.database.create_on_first_use(*self._all_tables())

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLAlchemyBackend:
        """Build a backend for a SQLAlchemy URL; nothing connects until the first operation.

        This is what ``backend_from_url`` and ``configure(backend="postgresql://...")``
        call. ``options`` are the constructor's keyword arguments; the URL may also say
        ``?create_tables=true``, ``?table=NAME`` (the records table),
        ``?dead_letter_table=NAME`` and ``?breaker_table=NAME``.

        >>> SQLAlchemyBackend.from_url("postgresql+psycopg://app:secret@db:5432/app")
        SQLAlchemyBackend('postgresql+psycopg://db:5432/app', table='idempotask_records')
        """
        return cls(url, **options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.database.where!r}, table={self.table.fullname!r})"

    # -- the stores that share this backend's engines ----------------------------------------

    def breaker_store(
        self, *, namespace: str = "idempotask", table_name: str | None = None
    ) -> SQLBreakerStore:
        """A :class:`SQLBreakerStore` on this backend's engines, its breakers scoped by
        ``namespace`` (what ``CircuitBreaker`` uses with ``store=None`` when this backend
        is configured; :meth:`create_tables` creates its table).

        >>> SQLAlchemyBackend("sqlite:///app.db").breaker_store(namespace="billing")
        SQLBreakerStore('sqlite:///app.db', table='idempotask_breakers', namespace='billing')
        """
        table = self.breaker_table if table_name is None else table_name
        return SQLBreakerStore(self, namespace=namespace, table_name=table, schema=self.schema)

    def dead_letter_store(
        self, *, namespace: str = "idempotask", table_name: str | None = None
    ) -> SQLDeadLetterStore:
        """A :class:`SQLDeadLetterStore` on this backend's engines, its queue scoped by
        ``namespace``: two applications sharing a database keep separate dead letters.

        >>> SQLAlchemyBackend("sqlite:///app.db").dead_letter_store(namespace="shop").namespace
        'shop'
        """
        table = self.dead_letter_table if table_name is None else table_name
        return SQLDeadLetterStore(self, namespace=namespace, table_name=table, schema=self.schema)

    # -- engines -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connections of the sync engine this backend created (an engine you
        passed stays open); async engines are closed by :meth:`aclose` or when their
        event loop shuts down. Stores sharing this backend's engines share this too.

        >>> SQLAlchemyBackend("sqlite:///:memory:").close()
        """
        self.database.close()

    async def aclose(self) -> None:
        """Close the connections of the asyncio engine this backend made for the running
        event loop (an ``AsyncEngine`` you passed stays open).

        >>> import asyncio
        >>> asyncio.run(SQLAlchemyBackend("sqlite:///:memory:").aclose())
        """
        await self.database.aclose()

    # -- checks -------------------------------------------------------------------------------

    @staticmethod
    def _check_key(key: str, *texts: tuple[str, str]) -> None:
        """Refuse values longer than their columns, the same way on every database (SQLite
        would store them, PostgreSQL and MySQL fail with a driver error)."""
        for name, value, limit in (
            ("key", key, KEY_LENGTH),
            *((n, v, TEXT_LENGTH) for n, v in texts),
        ):
            if not isinstance(value, str):
                raise ConfigurationError(f"sql backend: {name} must be a str, got {value!r}")
            # UTF-8 takes at most 4 bytes a character: only long strings are measured.
            if len(value) > limit // 4 and len(value.encode("utf-8")) > limit:
                raise ConfigurationError(
                    f"sql backend: {name} {value[:60]!r}… is {len(value.encode())} bytes in "
                    f"UTF-8; the SQL store holds a {name} of up to {limit} bytes"
                )

    # -- the store protocol: each operation one flow, twins() makes both methods --------------

    def _claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Flow[Record]:
        """Take ``key`` for ``token`` or return the record that holds it (see ``Backend``).

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> store.claim("k", "t1", lease=30, owner="task-7").held_by("t1")
        True
        """
        self._check_key(key, ("token", token), ("owner", owner), ("fingerprint", fingerprint))
        lease = seconds(lease, "lease")
        sql = self._sql
        return (
            yield from self._on_db(
                "claim",
                key,
                lambda q: flow_claim(
                    sql, q, self._flavour(q), key, token, lease, owner, fingerprint
                ),
            )
        )

    claim, aclaim = twins(_claim)

    def _finish(self, key: str, token: str, payload: bytes, ttl: float, state: State) -> Flow[bool]:
        self._check_key(key, ("token", token))
        ttl = seconds(ttl, "ttl")
        sql, operation = self._sql, "complete" if state is State.COMPLETED else "fail"
        make = lambda q: flow_finish(sql, q, key, token, payload, ttl, state)  # noqa: E731
        return (yield from self._on_db(operation, key, make))

    def _complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> Flow[bool]:
        """Store a result for the claim held with ``token``; True when stored (or already).

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.complete("k", "t1", b"42", ttl=3600), store.get("k").payload
        (True, b'42')
        """
        return (yield from self._finish(key, token, payload, ttl, State.COMPLETED))

    complete, acomplete = twins(_complete)

    def _fail(self, key: str, token: str, payload: bytes, *, ttl: float) -> Flow[bool]:
        """Store a failure for the claim held with ``token``; True when stored (or already).

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.fail("k", "t1", b"ValueError: boom", ttl=60)
        True
        """
        return (yield from self._finish(key, token, payload, ttl, State.FAILED))

    fail, afail = twins(_fail)

    def _renew(self, key: str, token: str, *, lease: float) -> Flow[bool]:
        """Restart the lease of the claim held with ``token``; False when it is not held.

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.renew("k", "t1", lease=30), store.renew("k", "other", lease=30)
        (True, False)
        """
        self._check_key(key, ("token", token))
        params = {"k": key, "t": token, "d": seconds(lease, "lease")}
        return (yield from self._one("renew", key, self._sql.renew, params, bool, "rowcount"))

    renew, arenew = twins(_renew)

    def _get(self, key: str) -> Flow[Record | None]:
        """The live record under ``key``, or None when absent or expired.

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> store.get("never-claimed") is None
        True
        """
        self._check_key(key)
        return (
            yield from self._one(
                "get",
                key,
                self._sql.read_live,
                {"k": key},
                lambda rows: parse_record(key, rows[0]) if rows else None,
            )
        )

    get, aget = twins(_get)

    def _delete(self, key: str, *, token: str | None = None) -> Flow[bool]:
        """Remove the record (only if it carries ``token``, when given); True if removed.

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.delete("k", token="other"), store.delete("k", token="t1")
        (False, True)
        """
        self._check_key(key)
        sql = self._sql
        statement, params = (
            (sql.delete_any, {"k": key})
            if token is None
            else (sql.delete_token, {"k": key, "t": token})
        )
        return (yield from self._one("delete", key, statement, params, bool, "rowcount"))

    delete, adelete = twins(_delete)

    def _scan(self, prefix: str, *, limit: int = 100) -> Flow[list[Record]]:
        """Up to ``limit`` live records whose key starts with ``prefix`` (one statement:
        a range on the key's index), for operators; never on a call's path.

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("app:billing.charge:v1:ab", "t1", lease=30)
        >>> [r.key for r in store.scan("app:billing.")]
        ['app:billing.charge:v1:ab']
        """
        if not isinstance(prefix, str):
            raise ConfigurationError(f"sql backend: scan prefix must be a str, got {prefix!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigurationError(
                f"sql backend: scan limit must be a non-negative int, got {limit!r}"
            )
        prefix = prefix[:KEY_LENGTH]
        params, upper = dict[str, Any](n=limit), successor(prefix)
        if prefix:
            params["lo"] = prefix
            if upper is not None:
                params["hi"] = upper
        return (
            yield from self._one(
                "scan",
                None,
                self._sql.scan("lo" in params, "hi" in params),
                params,
                # The range is exact; the prefix check only guards a foreign row.
                lambda rows: [parse_record(k, f) for k, *f in rows if k.startswith(prefix)],
            )
        )

    scan, ascan = twins(_scan)

    def expire_now(self, key: str) -> bool:
        """Test hook: the record's lease or ttl runs out now on the database's clock
        (its expiry is set a second in the past); True if a live record was there.

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30)
        >>> store.expire_now("k"), store.get("k")
        (True, None)
        """
        self._check_key(key)
        params = {"k": key}
        return drive(self._one("expire_now", key, self._sql.expire_now, params, bool, "rowcount"))

    # -- transactional calls (idempotask.backends.sql._transactions) -----------------------

    def begin(self, key: str, token: str, *, lease: float) -> _transactions.SQLTransaction:
        """Open the transaction of an ``@idempotent(transactional=True)`` call holding
        ``key`` with ``token``: a pooled connection taken out of autocommit, its waits
        bounded by ``lease`` (PostgreSQL ``idle_in_transaction_session_timeout`` and
        ``lock_timeout``, MariaDB ``idle_transaction_timeout`` and
        ``innodb_lock_wait_timeout``). On SQLite, only with ``sqlite_transactions=True``.
        """
        return _transactions.begin(self, key, token, lease)

    async def abegin(self, key: str, token: str, *, lease: float) -> _transactions.SQLTransaction:
        """Async :meth:`begin` (the body gets an ``AsyncConnection``)."""
        return await _transactions.abegin(self, key, token, lease)

    # -- maintenance ---------------------------------------------------------------------------

    def _purge_expired(self, batch: int = 1000) -> Flow[int]:
        """Delete expired records, ``batch`` rows per statement (each its own short
        transaction, so no lock is held for long); returns how many were deleted.

        Expired records already behave as absent; purging only reclaims space. Run it
        from a periodic job.

        >>> store = SQLAlchemyBackend("sqlite:///:memory:"); store.create_tables()
        >>> _ = store.claim("k", "t1", lease=30); _ = store.expire_now("k")
        >>> store.purge_expired(batch=100)
        1
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ConfigurationError(
                f"sql backend: purge batch must be a positive int, got {batch!r}"
            )

        def flow(q: Session) -> Flow[int]:
            statement = self._sql.purge(self._flavour(q), batch)
            return (yield from flow_batches(q, statement, {"n": batch}, batch))

        return (yield from self._on_db("purge_expired", None, flow))

    purge_expired, apurge_expired = twins(_purge_expired)

    # -- tables -------------------------------------------------------------------------------

    @property
    def tables(self) -> list[str]:
        """The names of the tables :meth:`create_tables` creates: records, dead letters,
        breakers (with their schema, if any).

        >>> SQLAlchemyBackend("sqlite:///:memory:").tables
        ['idempotask_records', 'idempotask_dead_letters', 'idempotask_breakers']
        """
        return [table.fullname for table in self._tables]

    def _all_tables(self) -> tuple[MetaData, list[Table]]:
        """Every table this backend's stores use: records, dead letters, breakers."""
        return self.metadata, self._tables

    def create_tables(self) -> None:
        """Create the records, dead-letter and breaker tables and their indexes if missing
        (safe to call again, and from several processes at once). Use Alembic with
        :attr:`metadata` in production, or ``idempotask db create``.

        >>> SQLAlchemyBackend("sqlite:///:memory:").create_tables()
        """
        self.database.schema_change(*self._all_tables(), True)

    def drop_tables(self) -> None:
        """Drop the records table if it exists (every record is lost); the dead-letter and
        breaker tables stay (drop them through their stores).

        >>> SQLAlchemyBackend("sqlite:///:memory:").drop_tables()
        """
        self.database.schema_change(self.metadata, [self.table], False)

    async def acreate_tables(self) -> None:
        """Async :meth:`create_tables`."""
        await self.database.aschema_change(*self._all_tables(), True)

    async def adrop_tables(self) -> None:
        """Async :meth:`drop_tables`."""
        await self.database.aschema_change(self.metadata, [self.table], False)

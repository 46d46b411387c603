"""idempotask's stores on a Django database alias.

:class:`DjangoBackend` is the idempotency store, :meth:`~DjangoBackend.dead_letter_store`
and :meth:`~DjangoBackend.breaker_store` the dead-letter and circuit-breaker stores, all
on ``django.db.connections[alias]`` (any alias in ``DATABASES``: PostgreSQL, SQLite,
MySQL or MariaDB) and on the tables ``manage.py migrate idempotask`` creates. They run
the SQL store's own statements (see :mod:`idempotask.django._database`), so they keep
its guarantees and answer exactly like a ``SQLAlchemyBackend`` on the same database::

    from idempotask import configure
    from idempotask.django import DjangoBackend

    configure(backend=DjangoBackend("default"))   # what IDEMPOTASK = {} does at startup

:class:`DjangoBackend` also runs transactional calls (``@idempotent(transactional=
True)``): :meth:`~DjangoBackend.begin` opens ``transaction.atomic(using=alias)``, the
body's ORM writes on that alias join it, and the result is written in it with a
compare-and-set on the claim's token and lease before it commits (see
:class:`DjangoTransaction`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from sqlalchemy import MetaData, Table

from idempotask.backends.base import State
from idempotask.backends.sql import (
    DEFAULT_BREAKER_TABLE,
    DEFAULT_DEAD_LETTER_TABLE,
    DEFAULT_TABLE_NAME,
    SQLAlchemyBackend,
    SQLBreakerStore,
    SQLDeadLetterStore,
    breakers,
    check_store_options,
    dead_letters,
    define_breaker_table,
    define_dead_letter_table,
    define_table,
    metadata,
    records,
)
from idempotask.backends.sql._database import seconds
from idempotask.backends.sql._records import Statements
from idempotask.django._database import DjangoDatabase
from idempotask.errors import BackendError, ConfigurationError

__all__ = ["DjangoBackend", "DjangoBreakerStore", "DjangoDeadLetterStore", "DjangoTransaction"]


class _On:
    """What the SQL stores' constructors take to share a database: its ``database``."""

    def __init__(self, database: DjangoDatabase) -> None:
        self.database = database


def _database(bind: Any) -> DjangoDatabase:
    if isinstance(bind, str):
        return DjangoDatabase(bind)
    database = getattr(bind, "database", None)
    if isinstance(database, DjangoDatabase):
        return database
    raise ConfigurationError(
        f"idempotask.django: expected a Django database alias or a DjangoBackend, got {bind!r}"
    )


class DjangoBackend(SQLAlchemyBackend):
    """The idempotency store on the Django database ``alias`` (``"default"`` unless
    told), implementing :class:`~idempotask.backends.base.Backend` for sync and async
    callers, and :class:`~idempotask.backends.base.SupportsTransactions`.

    Operations use the connection Django holds for the calling thread (async callers:
    through ``sync_to_async(thread_sensitive=True)``); inside your own
    ``transaction.atomic()`` they join your transaction. The tables are the app's
    migrations (``manage.py migrate idempotask``); :meth:`create_tables` also creates
    them (tests, scripts). ``table_name``, ``dead_letter_table`` and ``breaker_table``
    name other tables than the migrated ones (created by :meth:`create_tables` only).

    There is no ``statement_timeout`` here: set one on the database (PostgreSQL
    ``OPTIONS = {"options": "-c statement_timeout=10000"}``) if you want one.
    """

    def __init__(
        self,
        alias: str = "default",
        /,
        *,
        table_name: str = DEFAULT_TABLE_NAME,
        dead_letter_table: str = DEFAULT_DEAD_LETTER_TABLE,
        breaker_table: str = DEFAULT_BREAKER_TABLE,
        create_tables: bool = False,
        sqlite_transactions: bool = False,
    ) -> None:
        self.database: DjangoDatabase = DjangoDatabase(alias)
        self.alias = alias
        check_store_options(
            "DjangoBackend",
            sqlite_transactions,
            table_name=table_name,
            dead_letter_table=dead_letter_table,
            breaker_table=breaker_table,
        )
        #: Whether transactional calls may run on a SQLite alias (see :meth:`begin`).
        self.sqlite_transactions = sqlite_transactions
        self.schema = None
        self.dead_letter_table = dead_letter_table
        self.breaker_table = breaker_table
        if (table_name, dead_letter_table, breaker_table) == (
            DEFAULT_TABLE_NAME,
            DEFAULT_DEAD_LETTER_TABLE,
            DEFAULT_BREAKER_TABLE,
        ):
            self.metadata = metadata
            self.table: Table = records
            self._tables = [records, dead_letters, breakers]
        else:
            self.metadata = MetaData()
            self.table = define_table(self.metadata, table_name)
            self._tables = [
                self.table,
                define_dead_letter_table(self.metadata, dead_letter_table),
                define_breaker_table(self.metadata, breaker_table),
            ]
        self._sql = Statements(self.table)
        self._force_flavour = None
        if create_tables:
            self.database.create_on_first_use(*self._all_tables())

    def __repr__(self) -> str:
        return f"DjangoBackend({self.alias!r}, table={self.table.fullname!r})"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> DjangoBackend:
        """Not a URL store: build it from an alias, ``DjangoBackend("default")``."""
        raise ConfigurationError(
            "DjangoBackend is built from a Django database alias, DjangoBackend('default'), "
            f"not a URL ({url!r})"
        )

    def breaker_store(
        self, *, namespace: str = "idempotask", table_name: str | None = None
    ) -> DjangoBreakerStore:
        """A :class:`DjangoBreakerStore` on this backend's alias, scoped by ``namespace``."""
        table = self.breaker_table if table_name is None else table_name
        return DjangoBreakerStore(self, namespace=namespace, table_name=table)

    def dead_letter_store(
        self, *, namespace: str = "idempotask", table_name: str | None = None
    ) -> DjangoDeadLetterStore:
        """A :class:`DjangoDeadLetterStore` on this backend's alias, scoped by ``namespace``."""
        table = self.dead_letter_table if table_name is None else table_name
        return DjangoDeadLetterStore(self, namespace=namespace, table_name=table)

    # -- transactional calls --------------------------------------------------------------

    # Not a SQLTransaction (a SQLAlchemy connection): the Django one, same protocol.
    def begin(  # type: ignore[override]
        self, key: str, token: str, *, lease: float
    ) -> DjangoTransaction:
        """Open ``transaction.atomic(using=alias)`` for the call holding ``key`` with
        ``token`` (its claim already committed), its waits bounded by ``lease`` as on
        the SQL store (PostgreSQL ``idle_in_transaction_session_timeout`` and
        ``lock_timeout``, MariaDB ``idle_transaction_timeout`` and
        ``innodb_lock_wait_timeout``, MySQL the latter, all for this transaction).

        Refused with :class:`~idempotask.errors.ConfigurationError`: when the alias is
        already in a transaction (your ``atomic()``, ``ATOMIC_REQUESTS``): the claim
        would not be committed, so concurrent callers could not see it and the lease
        renewal could not find it; and on SQLite unless the store is made with
        ``sqlite_transactions=True`` (one writer for the whole file: a body's open
        transaction blocks every claim and renewal on it, a paused process's for ever).
        """
        self._check_key(key, ("token", token))
        lease = seconds(lease, "lease")
        if self.database.flavour == "sqlite" and not self.sqlite_transactions:
            raise ConfigurationError(
                f"DjangoBackend({self.alias!r}): transactional calls on SQLite hold the "
                "file's only write lock for the whole body, blocking every claim, renewal "
                "and result of every process on it (a paused process's, for ever). Make "
                "the store with sqlite_transactions=True (IDEMPOTASK['sqlite_transactions'] "
                "= True) if one process at a time is what you run, or use PostgreSQL"
            )
        return DjangoTransaction(self, key, token, lease)

    async def abegin(  # type: ignore[override]
        self, key: str, token: str, *, lease: float
    ) -> DjangoTransaction:
        """Async :meth:`begin`. The transaction lives on one thread, as Django's
        connections do: this enters an ``asgiref.sync.ThreadSensitiveContext`` for the
        rest of the call (unless one is already active, as in Django's ASGI handler), so
        the body's ``sync_to_async`` calls and Django's async ORM methods run on the
        transaction's thread, inside it; the context ends with the transaction."""
        from asgiref.sync import ThreadSensitiveContext, sync_to_async

        context: Any = ThreadSensitiveContext()  # entered here, left by acommit/arollback
        await context.__aenter__()
        try:
            tx = await sync_to_async(self.begin, thread_sensitive=True)(key, token, lease=lease)
        except BaseException:
            await context.__aexit__(None, None, None)
            raise
        tx._context = context
        return tx


class DjangoTransaction:
    """One transactional call's ``transaction.atomic(using=alias)``.

    :attr:`connection` is the alias: the body writes with the ORM (or
    ``connections[alias].cursor()``) on the same thread, inside the atomic block.
    :meth:`complete` writes the COMPLETED record in it, only if the key is still held
    with the claim's token and its lease has not run out on the database's clock (the
    row stays locked until the end); :meth:`commit` leaves the block, committing the
    body's writes and the result together; :meth:`rollback` leaves it rolling both back.
    """

    def __init__(self, backend: DjangoBackend, key: str, token: str, lease: float) -> None:
        from django.db import transaction  # type: ignore[import-untyped]

        alias = backend.alias
        if not transaction.get_autocommit(using=alias):
            raise ConfigurationError(
                f"idempotask.django: a transactional call on {key!r} was made while the "
                f"database {alias!r} is already in a transaction (transaction.atomic(), "
                "ATOMIC_REQUESTS, or another transactional call's body). Its claim would "
                "not be visible to other callers until that transaction commits; call it "
                "outside the transaction, e.g. from transaction.on_commit()"
            )
        self._backend = backend
        self._key = key
        self._token = token
        self._atomic = transaction.atomic(using=alias)
        self._open = False
        self._context: Any = None  # the async path's ThreadSensitiveContext
        from django.db import DatabaseError, connections

        try:
            self._atomic.__enter__()
        except DatabaseError as exc:
            raise BackendError(
                f"idempotask.django: begin on {key!r} failed on django:{alias}: {exc}"
            ) from exc
        self._open = True
        bounds = _bounds(backend.database, lease)
        if bounds is not None:
            try:
                with connections[alias].cursor() as cursor:
                    cursor.execute(*bounds)
            except DatabaseError as exc:
                self._exit(rollback=True)
                raise BackendError(
                    f"idempotask.django: begin on {key!r} failed on django:{alias}: {exc}"
                ) from exc

    @property
    def connection(self) -> str:
        """The Django database alias the body writes on."""
        return self._backend.alias

    def complete(self, payload: bytes, *, ttl: float) -> bool:
        """Compare-and-set the COMPLETED record inside the transaction."""
        ttl = seconds(ttl, "ttl")
        backend = self._backend
        params = {
            "k": self._key,
            "t": self._token,
            "s": State.COMPLETED.value,
            "p": bytes(payload),
            "d": ttl,
        }
        statement = backend._sql.finish

        def flow(q: Any) -> Any:
            return (yield q.op(statement, params, "rowcount"))

        return bool(backend.database.run("complete", self._key, flow, backend.table))

    def commit(self) -> None:
        """Leave the atomic block, committing the body's writes and the result."""
        self._exit(rollback=False)

    def rollback(self) -> None:
        """Leave the atomic block, rolling back the body's writes (and the result)."""
        self._exit(rollback=True)

    def _exit(self, *, rollback: bool) -> None:
        from django.db import DatabaseError, transaction

        if not self._open:
            return
        self._open = False
        alias = self._backend.alias
        try:
            if rollback:
                transaction.set_rollback(True, using=alias)
            self._atomic.__exit__(None, None, None)
            from django.db import connections

            if self._context is not None:
                # The async path's thread ends with its context: so does its connection.
                connections[alias].close()
            elif self._backend.database.flavour in ("mysql", "mariadb"):
                try:
                    with connections[alias].cursor() as cursor:
                        cursor.execute(_RESTORE[self._backend.database.mariadb])
                except DatabaseError:
                    connections[alias].close()  # its bounds would outlive the call
        except DatabaseError as exc:
            raise BackendError(
                f"idempotask.django: {'rollback' if rollback else 'commit'} on "
                f"{self._key!r} failed on django:{alias}: {exc}"
            ) from exc

    async def acomplete(self, payload: bytes, *, ttl: float) -> bool:
        from asgiref.sync import sync_to_async

        return await sync_to_async(self.complete, thread_sensitive=True)(payload, ttl=ttl)

    async def acommit(self) -> None:
        """Async :meth:`commit`: runs to its end even if the caller is cancelled meanwhile,
        then re-raises the cancellation (raised here, it means the commit happened)."""
        try:
            await _to_the_end(self.commit)
        finally:
            await self._leave()

    async def arollback(self) -> None:
        """Async :meth:`rollback`, run to its end like :meth:`acommit`."""
        try:
            await _to_the_end(self.rollback)
        finally:
            await self._leave()

    async def _leave(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            await context.__aexit__(None, None, None)


async def _to_the_end(fn: Callable[[], None]) -> None:
    from asgiref.sync import sync_to_async

    task = asyncio.ensure_future(sync_to_async(fn, thread_sensitive=True)())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                continue
        task.result()
        raise


def _bounds(database: DjangoDatabase, lease: float) -> tuple[str, Any] | None:
    """The statement bounding the transaction's waits by ``lease`` (as the SQL store)."""
    flavour = database.flavour
    if flavour == "postgresql":
        ms = f"{max(1, math.ceil(lease * 1000))}ms"
        return (
            "SELECT set_config('idle_in_transaction_session_timeout', %s, true), "
            "set_config('lock_timeout', %s, true)",
            [ms, ms],
        )
    if flavour in ("mysql", "mariadb"):
        whole = max(1, math.ceil(lease))  # an integer: formatted, never user text
        # The session's own values are saved, and set back by _exit (_RESTORE).
        if database.mariadb:
            return (
                "SET @idempotask_itt = @@SESSION.idle_transaction_timeout, "
                "@idempotask_ilwt = @@SESSION.innodb_lock_wait_timeout, "
                f"SESSION idle_transaction_timeout = {whole}, "
                f"innodb_lock_wait_timeout = {whole}",
                [],
            )
        return (
            "SET @idempotask_ilwt = @@SESSION.innodb_lock_wait_timeout, "
            f"SESSION innodb_lock_wait_timeout = {whole}",
            [],
        )
    return None


# MariaDB's and MySQL's bounds are session variables of the alias's connection, which
# the application goes on using: they get their own values back after the transaction.
_RESTORE = {
    True: "SET SESSION idle_transaction_timeout = @idempotask_itt, "
    "innodb_lock_wait_timeout = @idempotask_ilwt",
    False: "SET SESSION innodb_lock_wait_timeout = @idempotask_ilwt",
}


class DjangoDeadLetterStore(SQLDeadLetterStore):
    """Dead letters on a Django alias (``bind``: an alias or a :class:`DjangoBackend`), a
    :class:`~idempotask.backends.base.DeadLetterStore` scoped by ``namespace``."""

    def __init__(
        self,
        bind: Any = "default",
        /,
        *,
        namespace: str = "idempotask",
        table_name: str | None = None,
        create_tables: bool = False,
    ) -> None:
        super().__init__(
            _On(_database(bind)),
            namespace=namespace,
            table_name=table_name,
            create_tables=create_tables,
        )


class DjangoBreakerStore(SQLBreakerStore):
    """Circuit breakers on a Django alias (``bind``: an alias or a :class:`DjangoBackend`),
    a :class:`~idempotask.backends.base.BreakerStore` scoped by ``namespace``."""

    def __init__(
        self,
        bind: Any = "default",
        /,
        *,
        namespace: str = "idempotask",
        table_name: str | None = None,
        create_tables: bool = False,
    ) -> None:
        super().__init__(
            _On(_database(bind)),
            namespace=namespace,
            table_name=table_name,
            create_tables=create_tables,
        )

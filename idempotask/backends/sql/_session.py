"""One connection's share of an operation: :class:`Session` runs a flow's statements with
SQLAlchemy's public ``execute``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Executable, text
from sqlalchemy.engine import Connection

from idempotask.backends.sql._timeouts import watchdog
from idempotask.flow import Op

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from idempotask.backends.sql._database import Flavour

__all__ = ["Reply", "Session"]

#: What a statement's operation answers: its rows, its row count, or None.
Reply = Literal["rows", "rowcount", "none"]
_NO_PARAMS: Mapping[str, Any] = MappingProxyType({})

_BEGIN = text("BEGIN")
_BEGIN_IMMEDIATE = text("BEGIN IMMEDIATE")
_COMMIT = text("COMMIT")
_ROLLBACK = text("ROLLBACK")


class Session:
    """One connection checked out for one operation, sync (``conn``) or asyncio
    (``aconn``). :meth:`op` makes the :class:`~idempotask.flow.Op` of one statement,
    answering its rows, its row count or None. Statements run in autocommit mode unless
    the flow opens a transaction with :meth:`begin` (a failing flow's is rolled back)."""

    __slots__ = ("aconn", "bound", "conn", "dialect", "flavour", "in_transaction")

    def __init__(
        self,
        conn: Connection,
        aconn: AsyncConnection | None,
        flavour: Flavour,
        bound: float | None,
    ) -> None:
        self.conn = conn  # the sync Connection (an asyncio one's sync_connection)
        self.aconn = aconn
        self.dialect = conn.dialect
        self.flavour = flavour
        self.bound = bound  # the watchdog's bound on each statement (psycopg), or None
        self.in_transaction = False

    def op(
        self, statement: Executable, params: Mapping[str, Any] = _NO_PARAMS, reply: Reply = "rows"
    ) -> Op:
        """The operation that executes ``statement`` with ``params`` on this connection."""
        return Op(self.execute, self.aexecute, statement, params, reply)

    def begin(self) -> Op:
        """Open a transaction (SQLite: ``BEGIN IMMEDIATE``, taking the write lock now)."""
        self.in_transaction = True
        return self.op(_BEGIN_IMMEDIATE if self.flavour == "sqlite" else _BEGIN, reply="none")

    def commit(self) -> Op:
        """Commit the transaction :meth:`begin` opened (until it succeeds, a failure of
        the flow rolls the transaction back)."""
        return Op(self._commit, self._acommit)

    def _commit(self) -> None:
        self.conn.execute(_COMMIT)
        self.in_transaction = False

    async def _acommit(self) -> None:
        assert self.aconn is not None
        await self.aconn.execute(_COMMIT)
        self.in_transaction = False

    def execute(self, statement: Executable, params: Mapping[str, Any], reply: Reply) -> Any:
        """Run one statement (sync)."""
        conn = self.conn
        if self.bound is None:
            result = conn.execute(statement, params)
        else:
            fd = conn.connection.driver_connection.fileno()  # type: ignore[union-attr]
            dog = watchdog()
            watch = dog.start(fd, self.bound)
            try:
                result = conn.execute(statement, params)
            finally:
                if dog.stop(watch):
                    conn.invalidate()
                    raise TimeoutError
        return _answer(result, reply)

    async def aexecute(self, statement: Executable, params: Mapping[str, Any], reply: Reply) -> Any:
        """Run one statement (asyncio)."""
        aconn = self.aconn
        assert aconn is not None
        if self.bound is None:
            result = await aconn.execute(statement, params)
        else:
            driver = self.conn.connection.driver_connection
            dog = watchdog()
            watch = dog.start(driver.fileno(), self.bound)  # type: ignore[union-attr]
            try:
                result = await aconn.execute(statement, params)
            finally:
                if dog.stop(watch):
                    await aconn.invalidate()
                    raise TimeoutError
        return _answer(result, reply)

    def end(self) -> None:
        """After a failed flow (sync): roll back a transaction it left open."""
        if self.in_transaction:
            self.in_transaction = False
            try:
                self.conn.execute(_ROLLBACK)
            except Exception:
                self.conn.invalidate()

    async def aend(self) -> None:
        """After a failed flow (asyncio): roll back a transaction it left open."""
        if self.in_transaction and self.aconn is not None:
            self.in_transaction = False
            try:
                await self.aconn.execute(_ROLLBACK)
            except Exception:
                await self.aconn.invalidate()


def _answer(result: Any, reply: Reply) -> Any:
    if reply == "rows":
        return result.all()
    if reply == "rowcount":
        return result.rowcount
    result.close()
    return None

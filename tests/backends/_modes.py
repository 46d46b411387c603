"""Running one test scenario through a store's sync methods and again through its async
ones: the SQL tests parametrised by ``mode`` ("sync" or "async") share these, and the
reading of a libpq protocol trace (round trips counted on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any


def caller(store: Any, mode: str) -> Callable[..., Awaitable[Any]]:
    """``call(operation, *args, **kwargs)``: the store's ``operation`` (``claim``,
    ``complete``...) awaited from a scenario, through the sync method in "sync" mode and
    the ``a``-prefixed one in "async" mode."""

    async def call(operation: str, *args: Any, **kwargs: Any) -> Any:
        if mode == "sync":
            return getattr(store, operation)(*args, **kwargs)
        return await getattr(store, "a" + operation)(*args, **kwargs)

    return call


def pg_trace(path: Path) -> tuple[int, int, list[str]]:
    """From a libpq protocol trace: round trips (Sync or simple Query messages), statements
    executed (Execute or Query messages: a prepared statement is executed without a
    Parse) and the SQL of each Parse or Query."""
    trips, executed, sql = 0, 0, []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0] != "F":
            continue
        message = parts[2]
        trips += message in ("Sync", "Query")
        executed += message in ("Execute", "Query")
        if message in ("Parse", "Query"):
            sql.append(parts[3] if len(parts) > 3 else "")
    return trips, executed, sql

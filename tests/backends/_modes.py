"""Running one test scenario through a store's sync methods and again through its async
ones: the SQL tests parametrised by ``mode`` ("sync" or "async") share these."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from idempotask.backends.sql import SQLAlchemyBackend, _stash


def caller(store: Any, mode: str) -> Callable[..., Awaitable[Any]]:
    """``call(operation, *args, **kwargs)``: the store's ``operation`` (``claim``,
    ``complete``...) awaited from a scenario, through the sync method in "sync" mode and
    the ``a``-prefixed one in "async" mode."""

    async def call(operation: str, *args: Any, **kwargs: Any) -> Any:
        if mode == "sync":
            return getattr(store, operation)(*args, **kwargs)
        return await getattr(store, "a" + operation)(*args, **kwargs)

    return call


async def stash_of(store: SQLAlchemyBackend, mode: str) -> _stash.Stash:
    """The stash of kept connections the mode's engine uses (the running loop's, async)."""
    if mode == "sync":
        return store.database._sync_stash()
    return (await store.database._async_stash()).stash

"""What the memory stores share: clock checks and fresh locks in a forked child."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from idempotask.errors import ConfigurationError

__all__ = ["check_clock", "fresh_locks_in_child"]


def check_clock(clock: object, owner: str) -> None:
    """Refuse a ``clock=`` that cannot be called (a store's monotonic seconds)."""
    if not callable(clock):
        raise ConfigurationError(
            f"{owner}: clock must be a callable returning seconds, got {clock!r}"
        )


def fresh_locks_in_child(stores: weakref.WeakSet[Any]) -> None:
    # The dead-letter and breaker stores' hook: a thread of the parent may have held a
    # store's lock at fork(); the child has no such thread, so it gets fresh locks.
    for store in list(stores):
        store._lock = threading.Lock()

"""What the memory stores share: clock checks and fresh locks in a forked child."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from idempotask.errors import ConfigurationError

__all__ = ["check_clock", "new_lock"]


def check_clock(clock: object, owner: str) -> None:
    """Refuse a ``clock=`` that cannot be called (a store's monotonic seconds)."""
    if not callable(clock):
        raise ConfigurationError(
            f"{owner}: clock must be a callable returning seconds, got {clock!r}"
        )


# Every store with a lock from new_lock(), so a forked child can replace the locks.
_locked: weakref.WeakSet[Any] = weakref.WeakSet()


def new_lock(store: object) -> threading.Lock:
    """A lock for ``store``'s ``_lock``, replaced by a fresh one in a forked child: a
    thread of the parent may have held it at fork(), and the child has no such thread."""
    _locked.add(store)
    return threading.Lock()


def _fresh_locks_in_child() -> None:
    for store in list(_locked):
        store._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks_in_child)

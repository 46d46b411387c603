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


# Every store with a lock from new_lock(), so a forked child can replace the locks, and
# those whose locks are held across fork(); guarded by _registry_lock because a WeakSet
# must not grow while the fork hooks iterate it.
_locked: weakref.WeakSet[Any] = weakref.WeakSet()
_held: weakref.WeakSet[Any] = weakref.WeakSet()
_registry_lock = threading.Lock()
# The stores whose locks _before_fork acquired, released again after the fork.
_held_across_fork: list[Any] = []


def new_lock(store: Any, *, hold_across_fork: bool = False) -> threading.Lock:
    """A fresh lock, set as ``store._lock`` and returned, replaced by a fresh one in a
    forked child: a thread of the parent may have held it at fork(), and the child has no
    such thread. With ``hold_across_fork``, fork() also waits for it, so the child copies
    the store's data consistent, with no update half done."""
    with _registry_lock:
        lock = store._lock = threading.Lock()
        _locked.add(store)
        if hold_across_fork:
            _held.add(store)
    return lock


def _before_fork() -> None:
    _registry_lock.acquire()
    _held_across_fork[:] = list(_held)
    for store in _held_across_fork:
        store._lock.acquire()


def _after_fork_in_parent() -> None:
    for store in _held_across_fork:
        store._lock.release()
    _held_across_fork.clear()
    _registry_lock.release()


def _after_fork_in_child() -> None:
    global _registry_lock
    # Fresh locks rather than release(): the held ones belong to the parent's thread.
    for store in list(_locked):
        store._lock = threading.Lock()
    _held_across_fork.clear()
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )

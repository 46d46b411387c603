"""A small hook interface for observing idempotent calls.

Listeners receive :class:`Event` objects; exporters (metrics, tracing, logging) are
built on it. Events carry the key and the function's name, never argument values or
results. A listener that raises is logged and ignored: observing must not break calls.

>>> seen = []
>>> remove = add_listener(seen.append)
>>> remove()
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Event", "EventKind", "add_listener", "emit", "remove_listener"]

log = logging.getLogger("idempotask")


class EventKind(str, enum.Enum):
    """What happened to a key."""

    CLAIMED = "claimed"  # this caller took the key and will run the body
    DUPLICATE = "duplicate"  # a stored result (or cached error) answered the call
    CONFLICT = "conflict"  # another caller holds the key (before waiting or raising)
    LEASE_LOST = "lease_lost"  # this caller's claim was taken over; its result is not stored
    COMPLETED = "completed"  # the result was stored
    FAILED = "failed"  # the body raised; the error was cached (cache_errors) or released
    RELEASED = "released"  # the claim was given up without a result (failure, cancellation)
    BACKEND_ERROR = "backend_error"  # the store failed; see ``error``
    FAIL_OPEN = "fail_open"  # the body ran unprotected because the store failed


@dataclass(frozen=True, slots=True)
class Event:
    """One observation. ``duration`` is the body's run time in seconds, when it ran;
    ``error`` the qualified type name of an exception involved, if any."""

    kind: EventKind
    name: str
    key: str
    duration: float | None = None
    error: str | None = None


Listener = Callable[[Event], None]

# A tuple, swapped whole on change, so emitting needs no lock and callers can test
# ``if events.listeners`` before building an Event at all.
listeners: tuple[Listener, ...] = ()


def add_listener(listener: Listener) -> Callable[[], None]:
    """Call ``listener(event)`` for every event; returns a function that removes it."""
    global listeners
    listeners = (*listeners, listener)
    return lambda: remove_listener(listener)


def remove_listener(listener: Listener) -> None:
    """Stop calling ``listener``; unknown listeners are ignored."""
    global listeners
    listeners = tuple(x for x in listeners if x is not listener)


def emit(
    kind: EventKind,
    name: str,
    key: str,
    *,
    duration: float | None = None,
    error: str | None = None,
) -> None:
    """Deliver an event to every listener."""
    if not listeners:
        return
    event = Event(kind, name, key, duration, error)
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            log.exception("idempotask event listener %r failed on %s", listener, kind.value)

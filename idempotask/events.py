"""A small hook interface for observing idempotent calls and dead letters.

Listeners receive :class:`Event` objects; exporters (metrics, tracing, logging) are
built on it (:mod:`idempotask.observability`). Events carry the key and the function's
name, never argument values, results or exception messages (which often quote
arguments): only exception type names and a few small, non-sensitive ``attributes``.
A listener that raises is logged and ignored: observing must not break calls.

Listeners run synchronously, in the thread or asyncio task whose call the event is
about (so ``contextvars`` such as the current trace span are the caller's), except
``lease_lost`` when the background renewal finds the claim gone: that one comes from
the renewal thread or task.

>>> seen = []
>>> remove = add_listener(seen.append)
>>> remove()

Code that emits should test ``events.listeners`` before building anything costly, so
that observing costs nothing when nobody listens::

    if events.listeners:
        events.emit(EventKind.DEAD_LETTER, name, key, attributes={"failure_kind": kind})
"""

from __future__ import annotations

import enum
import logging
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

__all__ = ["AttributeValue", "Event", "EventKind", "add_listener", "emit", "remove_listener"]

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
    # A store dropped a stored result (or cached error) inside its ttl to make room (the
    # memory store's max_entries): that call runs again if called again. ``attributes``
    # hold ``ttl_left``, the seconds the record had left.
    EVICTED = "evicted"
    # Dead letters. ``name`` is the letter's function, ``key`` its idempotency key ("" for
    # a function without @idempotent), ``error`` the exception type; ``attributes`` hold
    # ``letter_id``, ``failure_kind`` (a FailureKind value), ``letter_status``, ``attempts``,
    # ``critical`` and, once resolved, ``resolution``.
    DEAD_LETTER = "dead_letter"  # a failure was recorded as a new letter (or spooled)
    RETRY_SUCCEEDED = "retry_succeeded"  # a replay resolved its letter (``resolution``)
    RETRY_FAILED = "retry_failed"  # a replay failed again; another retry is scheduled
    RETRY_EXHAUSTED = "retry_exhausted"  # a replay failed with no retry left, or could
    # not be replayed at all: the letter is ABANDONED


AttributeValue: TypeAlias = str | int | float | bool
"""The types an event attribute may have (what every exporter can carry as-is)."""

# Shared by every event without attributes: no allocation on the hot path.
_NO_ATTRIBUTES: Mapping[str, AttributeValue] = types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Event:
    """One observation. ``duration`` is the body's run time in seconds, when it ran;
    ``error`` the type name of an exception involved, if any; ``attributes`` extra
    non-sensitive details (see :class:`EventKind` for which kinds carry which).

    >>> event = Event(EventKind.DEAD_LETTER, "jobs.sync", "", attributes={"attempts": 1})
    >>> event.attributes["attempts"], event.duration
    (1, None)
    """

    kind: EventKind
    name: str
    key: str
    duration: float | None = None
    error: str | None = None
    attributes: Mapping[str, AttributeValue] = field(default_factory=lambda: _NO_ATTRIBUTES)


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
    attributes: Mapping[str, AttributeValue] | None = None,
) -> None:
    """Deliver an event to every listener.

    ``attributes`` must not hold argument values, results or exception messages.
    """
    if not listeners:
        return
    # Read-only, so one listener cannot change what the next one sees.
    attrs = _NO_ATTRIBUTES if not attributes else types.MappingProxyType(dict(attributes))
    event = Event(kind, name, key, duration, error, attrs)
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            log.exception("idempotask event listener %r failed on %s", listener, kind.value)

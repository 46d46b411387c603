"""Standard-library logging of idempotask events: one record per event (stdlib only).

::

    import logging
    from idempotask.observability import logging as idempotask_logging

    idempotask_logging.install()  # logger "idempotask.events"
    logging.getLogger("idempotask.events").setLevel(logging.INFO)  # hide claims/duplicates

Every record names the event, the function and the key in its message::

    idempotask duplicate: billing.charge key=app:billing.charge:v1:3522af66...
    idempotask dead_letter: billing.charge key=app:billing.charge:v1:3522af66... \
error=builtins.TimeoutError letter_id=9f1c... failure_kind=transient letter_status=pending \
attempts=1 critical=False

and carries them as ``extra`` fields for structured (JSON) formatters:
``idempotask_event``, ``idempotask_name``, ``idempotask_key``, ``idempotask_duration``
(seconds, or None), ``idempotask_error`` (an exception type name, or None) and
``idempotask_attributes`` (a dict: the dead-letter details). Argument values, results
and exception messages are never logged: events do not carry them.

Default levels: ``claimed``, ``duplicate``, ``completed``, ``released`` DEBUG;
``conflict``, ``failed``, ``retry_succeeded`` INFO; ``lease_lost``, ``evicted``,
``backend_error``, ``dead_letter``, ``retry_failed`` WARNING; ``fail_open``,
``retry_exhausted`` ERROR; ``dead_letter`` and ``retry_exhausted`` of
``@dead_letter(critical=True)`` functions CRITICAL. Override any with ``levels=``.

The ``idempotask`` logger keeps its own records (a dead letter with its exception
message, a lost lease, a fail-open run); this listener adds the uniform, structured
stream on ``idempotask.events``, the place to route to a log pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from idempotask.errors import ConfigurationError
from idempotask.events import Event, EventKind
from idempotask.observability import EventListener, _Slot

__all__ = ["DEFAULT_LEVELS", "LOGGER_NAME", "LoggingListener", "install", "installed", "uninstall"]

LOGGER_NAME = "idempotask.events"

DEFAULT_LEVELS: Mapping[EventKind, int] = {
    EventKind.CLAIMED: logging.DEBUG,
    EventKind.DUPLICATE: logging.DEBUG,
    EventKind.COMPLETED: logging.DEBUG,
    EventKind.RELEASED: logging.DEBUG,
    EventKind.CONFLICT: logging.INFO,
    EventKind.FAILED: logging.INFO,
    EventKind.RETRY_SUCCEEDED: logging.INFO,
    EventKind.LEASE_LOST: logging.WARNING,
    EventKind.EVICTED: logging.WARNING,
    EventKind.BACKEND_ERROR: logging.WARNING,
    EventKind.DEAD_LETTER: logging.WARNING,
    EventKind.RETRY_FAILED: logging.WARNING,
    EventKind.FAIL_OPEN: logging.ERROR,
    EventKind.RETRY_EXHAUSTED: logging.ERROR,
}
"""The level of each event kind's record."""

# Kinds logged at CRITICAL when the dead-letter function is marked critical=True.
_ESCALATED = frozenset({EventKind.DEAD_LETTER, EventKind.RETRY_EXHAUSTED})


class LoggingListener(EventListener):
    """Logs one record per idempotask event (see the module docstring).

    ``logger`` is a logger or its name (default ``idempotask.events``); ``levels`` maps
    event kinds (or their values, ``"duplicate"``) to levels, over :data:`DEFAULT_LEVELS`.
    ``critical_level`` is used instead for dead letters and exhausted retries of
    ``critical=True`` functions (None: no escalation).

    >>> listener = LoggingListener(levels={"duplicate": logging.INFO}).install()
    >>> listener.uninstall()
    """

    def __init__(
        self,
        logger: logging.Logger | str = LOGGER_NAME,
        *,
        levels: Mapping[EventKind | str, int] | None = None,
        critical_level: int | None = logging.CRITICAL,
    ) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        if not isinstance(self.logger, logging.Logger):
            raise ConfigurationError(f"logger: expected a Logger or a name, got {logger!r}")
        self.levels: dict[EventKind, int] = dict(DEFAULT_LEVELS)
        for kind, level in (levels or {}).items():
            try:
                event_kind = EventKind(kind)
            except ValueError:
                raise ConfigurationError(
                    f"levels: unknown event kind {kind!r}; expected one of "
                    f"{', '.join(k.value for k in EventKind)}"
                ) from None
            if isinstance(level, bool) or not isinstance(level, int):
                raise ConfigurationError(
                    f"levels[{kind!r}]: expected a logging level, got {level!r}"
                )
            self.levels[event_kind] = level
        self.critical_level = critical_level

    def level_of(self, event: Event) -> int:
        """The level ``event`` is logged at."""
        if (
            self.critical_level is not None
            and event.kind in _ESCALATED
            and event.attributes.get("critical") is True
        ):
            return self.critical_level
        return self.levels.get(event.kind, logging.INFO)

    def __call__(self, event: Event) -> None:
        level = self.level_of(event)
        if not self.logger.isEnabledFor(level):
            return  # nothing is formatted for a record nobody keeps
        details = []
        if event.duration is not None:
            details.append(f"in {event.duration:.6f}s")
        if event.error:
            details.append(f"error={event.error}")
        details.extend(f"{name}={value}" for name, value in event.attributes.items())
        self.logger.log(
            level,
            "idempotask %s: %s key=%s%s",
            event.kind.value,
            event.name,
            event.key or "-",
            "".join(" " + d for d in details),
            extra={
                "idempotask_event": event.kind.value,
                "idempotask_name": event.name,
                "idempotask_key": event.key,
                "idempotask_duration": event.duration,
                "idempotask_error": event.error,
                "idempotask_attributes": dict(event.attributes),
            },
        )


_slot: _Slot[LoggingListener] = _Slot()


def install(
    logger: logging.Logger | str = LOGGER_NAME,
    *,
    levels: Mapping[EventKind | str, int] | None = None,
    critical_level: int | None = logging.CRITICAL,
) -> LoggingListener:
    """Log every idempotask event, process-wide; installing again replaces the
    previous listener.

    >>> from idempotask.observability import logging as idempotask_logging
    >>> listener = idempotask_logging.install(levels={"conflict": logging.DEBUG})
    >>> idempotask_logging.uninstall()
    """
    listener = _slot.replace(
        lambda: LoggingListener(logger, levels=levels, critical_level=critical_level)
    )
    assert listener is not None
    return listener


def uninstall() -> None:
    """Stop the process-wide listener."""
    _slot.replace(None)


def installed() -> LoggingListener | None:
    """The process-wide listener, if installed."""
    return _slot.current

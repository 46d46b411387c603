"""Exporters on the events hook: Prometheus metrics, OpenTelemetry traces, stdlib logs.

Each exporter is an event listener (:func:`idempotask.add_listener`) in a module of its
own, and imports its third-party package only when it is created, so importing
idempotask still needs only the standard library::

    from idempotask.observability import logging as idempotask_logging
    from idempotask.observability import otel, prometheus

    prometheus.install()  # pip install 'idempotask[prometheus]'
    otel.install()  # pip install 'idempotask[otel]'
    idempotask_logging.install()  # stdlib only

Events carry the idempotency key and the function's name, never argument values,
results or exception messages, so no exporter can leak them. Nothing is computed for
an exporter that is not installed: with no listener, emitting an event is one check of
a tuple.

Each module offers a class (``PrometheusExporter``, ``OpenTelemetryListener``,
``LoggingListener``) with ``install()`` / ``uninstall()``, and module functions
``install(...)`` / ``uninstall()`` that manage one process-wide instance.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from idempotask import events
from idempotask.events import Event

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs 3.11; only mypy reads this

__all__ = ["EventListener"]


class EventListener:
    """Base of the exporters: an event listener that can install and remove itself.

    >>> class Printer(EventListener):
    ...     def __call__(self, event: Event) -> None:
    ...         print(event.kind.value, event.name)
    >>> printer = Printer().install()
    >>> printer.installed
    True
    >>> printer.uninstall()
    """

    def __call__(self, event: Event) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def installed(self) -> bool:
        """Whether this listener receives events now."""
        return any(x is self for x in events.listeners)

    def install(self) -> Self:
        """Start receiving events (once, however often it is called); returns self."""
        if not self.installed:
            events.add_listener(self)
        return self

    def uninstall(self) -> None:
        """Stop receiving events."""
        events.remove_listener(self)


L = TypeVar("L", bound=EventListener)


class _Slot(Generic[L]):
    """The one process-wide instance behind a module's ``install()`` / ``uninstall()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: L | None = None

    @property
    def current(self) -> L | None:
        """The installed instance, if any."""
        return self._current

    def replace(
        self, make: Callable[[], L] | None, retire: Callable[[L], None] | None = None
    ) -> L | None:
        """Uninstall (and ``retire``) the current instance, then install ``make()``.

        If ``make`` raises, nothing is left installed and the error propagates.
        """
        with self._lock:
            old, self._current = self._current, None
            if old is not None:
                old.uninstall()
                if retire is not None:
                    retire(old)
            if make is None:
                return None
            new = make()
            self._current = new.install()
            return new

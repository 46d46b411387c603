"""OpenTelemetry tracing for idempotent calls and dead letters (``idempotask[otel]``).

::

    from idempotask.observability import otel

    otel.install()  # uses the global tracer provider; or install(tracer_provider=...)

It only needs ``opentelemetry-api``; configure the SDK and an exporter as usual.

**Design.** idempotask's events are points in time emitted synchronously, in the thread
or asyncio task that makes the call. OpenTelemetry keeps the current span in a
``contextvars`` context, which is per thread and per task. So the listener keeps no
state of its own and asks, at each event, for the span that is current *for that
call*: calls running at once in threads or tasks can never mix their attributes.
For each event it:

1. adds a span event ``idempotask.<kind>`` (``idempotask.claimed``,
   ``idempotask.duplicate``, ``idempotask.dead_letter``...) with ``idempotask.name``,
   ``idempotask.key`` and, when known, ``idempotask.duration_s``, ``idempotask.error``
   and the dead-letter details (``idempotask.letter_id``, ``idempotask.failure_kind``,
   ``idempotask.letter_status``, ``idempotask.attempts``...) to the **current span** --
   the request, the task, or a span you open around the call;
2. sets the current span's attributes ``idempotask.name``, ``idempotask.key`` and
   ``idempotask.outcome`` (``claimed`` then ``completed`` or ``failed``, ``duplicate``,
   ``conflict``, ``lease_lost``, ``backend_error``, ``fail_open``) for call events, and
   ``idempotask.letter_id`` / ``idempotask.failure_kind`` when the failure became a
   dead letter. If one span covers several idempotent calls, the attributes hold the
   last one's, and the span events hold each; open a span per call for one set each;
3. when the body ran (``completed`` / ``failed`` events carry its duration), records a
   child span ``idempotask.run <name>`` covering the body's run time, with status ERROR
   and ``error.type`` when it raised. A first call therefore shows a run span and a
   duplicate shows none.

Why not one span opened at ``claimed`` and ended at ``completed``? Making it current for
the body would need the listener to attach a context that only a later event detaches,
and some paths emit no later event (a store failure while releasing): the caller's
context would then keep a foreign span as current forever. The run span is instead
built when the body has finished, from its measured duration, so nothing is ever left
open; its end is when the outcome was stored (one store round trip after the body), and
spans the body opens itself are its siblings, not its children.

A ``lease_lost`` found by the background renewal is emitted from the renewal thread or
task, where no span of the call's is current (or the asyncio renewal task's copy of an
unrelated caller's context). It is recorded as a short span of its own,
``idempotask.lease_lost <name>``, with no parent, instead of on a wrong span. A late
owner's ``lease_lost`` found when storing the result is emitted in the caller's context
and annotates its span like any other event.

Replays by :meth:`~idempotask.DeadLetterQueue.process_due` annotate the processor's
current span with ``idempotask.retry_succeeded`` / ``retry_failed`` /
``retry_exhausted`` span events, one per letter.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

import idempotask
from idempotask.errors import MissingDependencyError
from idempotask.events import Event, EventKind
from idempotask.observability import EventListener, _Slot

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

__all__ = ["OpenTelemetryListener", "install", "installed", "uninstall"]

# The names lease.py gives its renewal thread and its per-loop renewal task.
_RENEWAL = "idempotask-lease-renewal"

# What each call event says about the call, for ``idempotask.outcome``. RELEASED is left
# out on purpose: it follows ``failed`` (or a result that could not be stored), and must
# not hide it.
_OUTCOME = {
    EventKind.CLAIMED: "claimed",
    EventKind.COMPLETED: "completed",
    EventKind.FAILED: "failed",
    EventKind.DUPLICATE: "duplicate",
    EventKind.CONFLICT: "conflict",
    EventKind.LEASE_LOST: "lease_lost",
    EventKind.BACKEND_ERROR: "backend_error",
    EventKind.FAIL_OPEN: "fail_open",
}

_Attributes = dict[str, "str | bool | int | float"]


def _import() -> Any:
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise MissingDependencyError(
            "idempotask.observability.otel needs opentelemetry-api: pip install 'idempotask[otel]'"
        ) from exc
    return trace


def _in_renewal() -> bool:
    """Whether this code runs in lease renewal rather than in a call's own context."""
    if threading.current_thread().name == _RENEWAL:
        return True
    loop = asyncio._get_running_loop()  # None outside a loop, without raising
    if loop is None:
        return False
    task = asyncio.current_task(loop)
    return task is not None and task.get_name() == _RENEWAL


def _attributes(event: Event) -> _Attributes:
    attrs: _Attributes = {
        "idempotask.event": event.kind.value,
        "idempotask.name": event.name,
        "idempotask.key": event.key,
    }
    if event.duration is not None:
        attrs["idempotask.duration_s"] = event.duration
    if event.error:
        attrs["idempotask.error"] = event.error
    for name, value in event.attributes.items():
        attrs[f"idempotask.{name}"] = value
    return attrs


class OpenTelemetryListener(EventListener):
    """Records idempotask events on OpenTelemetry spans (see the module docstring).

    ``tracer_provider`` defaults to the global one (looked up at each span, so it may be
    set after installing). ``run_spans=False`` keeps only the span events and attributes
    on the current span.

    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> listener = OpenTelemetryListener(TracerProvider()).install()
    >>> listener.uninstall()
    """

    def __init__(
        self, tracer_provider: TracerProvider | None = None, *, run_spans: bool = True
    ) -> None:
        trace = _import()
        self._trace = trace
        self._tracer = trace.get_tracer(
            "idempotask", idempotask.__version__, tracer_provider=tracer_provider
        )
        self.run_spans = run_spans

    def __call__(self, event: Event) -> None:
        kind = event.kind
        if kind is EventKind.LEASE_LOST and _in_renewal():
            self._detached(event)
            return
        span: Span = self._trace.get_current_span()
        recording = span.is_recording()
        run = (
            self.run_spans
            and event.duration is not None
            and (kind is EventKind.COMPLETED or kind is EventKind.FAILED)
        )
        if not recording and not run:
            return  # no sampled span to annotate (the common duplicate outside a trace)
        attrs = _attributes(event)
        if recording:
            span.add_event(f"idempotask.{kind.value}", attrs)
            outcome = _OUTCOME.get(kind)
            if outcome is not None:
                span.set_attributes(
                    {
                        "idempotask.name": event.name,
                        "idempotask.key": event.key,
                        "idempotask.outcome": outcome,
                    }
                )
            elif kind is EventKind.DEAD_LETTER:
                span.set_attributes(
                    {
                        "idempotask.letter_id": str(event.attributes.get("letter_id", "")),
                        "idempotask.failure_kind": str(event.attributes.get("failure_kind", "")),
                    }
                )
        if run:
            self._run_span(event, attrs)

    def _run_span(self, event: Event, attrs: _Attributes) -> None:
        assert event.duration is not None
        end = time.time_ns()
        start = end - max(0, int(event.duration * 1e9))
        attrs = {**attrs, "idempotask.outcome": event.kind.value}
        if event.error:
            attrs["error.type"] = event.error
        # A child of the current span, built after the fact: nothing stays open.
        run = self._tracer.start_span(
            f"idempotask.run {event.name}", attributes=attrs, start_time=start
        )
        if event.kind is EventKind.FAILED:
            run.set_status(self._trace.Status(self._trace.StatusCode.ERROR, event.error))
        run.end(end_time=end)

    def _detached(self, event: Event) -> None:
        from opentelemetry.context import Context

        attrs = _attributes(event)
        attrs["idempotask.outcome"] = event.kind.value
        # An empty context: no parent, whatever span the renewal task's context holds.
        span = self._tracer.start_span(
            f"idempotask.lease_lost {event.name}", context=Context(), attributes=attrs
        )
        span.end()


_slot: _Slot[OpenTelemetryListener] = _Slot()


def install(
    tracer_provider: TracerProvider | None = None, *, run_spans: bool = True
) -> OpenTelemetryListener:
    """Record every idempotask event on OpenTelemetry spans, process-wide; installing
    again replaces the previous listener.

    >>> from idempotask.observability import otel
    >>> listener = otel.install()  # doctest: +SKIP
    """
    listener = _slot.replace(lambda: OpenTelemetryListener(tracer_provider, run_spans=run_spans))
    assert listener is not None
    return listener


def uninstall() -> None:
    """Stop the process-wide listener."""
    _slot.replace(None)


def installed() -> OpenTelemetryListener | None:
    """The process-wide listener, if installed."""
    return _slot.current

"""Prometheus metrics for idempotent calls and dead letters (``idempotask[prometheus]``).

::

    from idempotask.observability import prometheus

    prometheus.install()  # counters and a histogram in prometheus_client's default registry
    # expose them as you already do: prometheus_client.start_http_server(9100), or your
    # web framework's /metrics route

Metrics (``idempotask_`` is the ``namespace``; every metric has a ``function`` label,
the idempotency name such as ``billing.charge`` -- never the key or an argument, so
cardinality is bounded by the number of decorated functions):

=============================================  =========================================
``idempotask_claims_total``                    calls that took the key and ran the body
``idempotask_duplicates_total``                calls answered by a stored result or a
                                               cached error, without running
``idempotask_conflicts_total``                 times a call found the key held by another
                                               caller (each poll of a waiting caller)
``idempotask_completions_total``               results stored
``idempotask_failures_total``                  bodies that raised (or were cancelled)
``idempotask_releases_total``                  claims given up without a result
``idempotask_lease_losses_total``              claims taken over while the body ran
``idempotask_evictions_total``                 stored results a store dropped inside
                                               their ttl to make room (memory store)
``idempotask_backend_errors_total``            store failures; label ``error`` (type name)
``idempotask_fail_open_runs_total``            bodies run unprotected (fail-open)
``idempotask_dead_letters_total``              new dead letters; label ``kind``
``idempotask_retries_succeeded_total``         replays that resolved their letter
``idempotask_retries_failed_total``            replays that failed, another retry
                                               scheduled; label ``kind``
``idempotask_retries_exhausted_total``         letters abandoned by a replay (no retry
                                               left, or not replayable); label ``kind``
``idempotask_run_duration_seconds``            histogram of the body's run time, label
                                               ``outcome`` (``completed`` / ``failed``)
=============================================  =========================================

The histogram measures bodies that ran under a claim; duplicates never run, so their
(store round trip) latency is not in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from idempotask.errors import ConfigurationError, MissingDependencyError
from idempotask.events import Event, EventKind
from idempotask.observability import EventListener, _Slot

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["DEFAULT_BUCKETS", "PrometheusExporter", "install", "installed", "uninstall"]

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
"""Histogram buckets in seconds: from a fast web handler to an hour-long batch job,
since idempotent bodies range from both ends."""

# Events counted on one ``function``-labelled counter: event kind -> attribute name.
_SIMPLE = {
    EventKind.CLAIMED: "claims",
    EventKind.DUPLICATE: "duplicates",
    EventKind.CONFLICT: "conflicts",
    EventKind.COMPLETED: "completions",
    EventKind.FAILED: "failures",
    EventKind.RELEASED: "releases",
    EventKind.LEASE_LOST: "lease_losses",
    EventKind.EVICTED: "evictions",
    EventKind.FAIL_OPEN: "fail_open_runs",
    EventKind.RETRY_SUCCEEDED: "retries_succeeded",
}
# Dead-letter events counted with the letter's failure kind as a second label.
_BY_KIND = {
    EventKind.DEAD_LETTER: "dead_letters",
    EventKind.RETRY_FAILED: "retries_failed",
    EventKind.RETRY_EXHAUSTED: "retries_exhausted",
}


def _import() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise MissingDependencyError(
            "idempotask.observability.prometheus needs prometheus_client: "
            "pip install 'idempotask[prometheus]'"
        ) from exc
    return prometheus_client


class PrometheusExporter(EventListener):
    """Counts idempotask events into Prometheus metrics (see the module docstring).

    ``registry`` defaults to ``prometheus_client.REGISTRY``; ``namespace`` prefixes every
    metric name (``""`` for none); ``buckets`` are the run-time histogram's bounds in
    seconds. Creating it registers the metrics; :meth:`install` starts counting.

    >>> from prometheus_client import CollectorRegistry
    >>> registry = CollectorRegistry()
    >>> exporter = PrometheusExporter(registry).install()
    >>> exporter(Event(EventKind.DUPLICATE, "billing.charge", "app:billing.charge:v1:ab"))
    >>> registry.get_sample_value("idempotask_duplicates_total", {"function": "billing.charge"})
    1.0
    >>> exporter.uninstall()
    """

    claims: Counter
    duplicates: Counter
    conflicts: Counter
    completions: Counter
    failures: Counter
    releases: Counter
    lease_losses: Counter
    evictions: Counter
    backend_errors: Counter
    fail_open_runs: Counter
    dead_letters: Counter
    retries_succeeded: Counter
    retries_failed: Counter
    retries_exhausted: Counter
    run_duration: Histogram

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        namespace: str = "idempotask",
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        pc = _import()
        self.registry: CollectorRegistry = pc.REGISTRY if registry is None else registry
        self.namespace = namespace
        self._collectors: list[Counter | Histogram] = []
        try:
            self._create(pc, tuple(buckets))
        except ValueError as exc:
            # Half-registered metrics would block a corrected retry: take them back.
            self.unregister()
            raise ConfigurationError(
                f"cannot register idempotask metrics with namespace {namespace!r} in this "
                f"registry ({exc}); one exporter per registry and namespace -- uninstall() "
                "the module-level one, or unregister() the previous exporter, first"
            ) from exc
        self._simple: dict[EventKind, Counter] = {k: getattr(self, a) for k, a in _SIMPLE.items()}
        self._by_kind: dict[EventKind, Counter] = {k: getattr(self, a) for k, a in _BY_KIND.items()}
        # (kind, function) -> its labelled counter; as bounded as the label values.
        self._children: dict[tuple[EventKind, str], Counter] = {}

    def _create(self, pc: Any, buckets: tuple[float, ...]) -> None:
        def counter(attr: str, doc: str, *labels: str) -> None:
            metric = pc.Counter(
                attr,
                doc,
                ("function", *labels),
                namespace=self.namespace,
                registry=self.registry,
            )
            self._collectors.append(metric)
            setattr(self, attr, metric)

        counter("claims", "Calls that took the idempotency key and ran the body.")
        counter("duplicates", "Calls answered by a stored result or cached error, not run.")
        counter("conflicts", "Times a call found its key held by another caller.")
        counter("completions", "Results stored.")
        counter("failures", "Bodies that raised or were cancelled.")
        counter("releases", "Claims given up without a result.")
        counter("lease_losses", "Claims taken over by another caller while the body ran.")
        counter("evictions", "Stored results dropped inside their ttl to make room.")
        counter("backend_errors", "Store failures, by exception type.", "error")
        counter("fail_open_runs", "Bodies run unprotected because the store failed.")
        counter("dead_letters", "Failures recorded as new dead letters.", "kind")
        counter("retries_succeeded", "Dead-letter replays that resolved their letter.")
        counter("retries_failed", "Dead-letter replays that failed; retry scheduled.", "kind")
        counter(
            "retries_exhausted",
            "Dead letters abandoned by a replay: no retry left, or not replayable.",
            "kind",
        )
        self.run_duration = pc.Histogram(
            "run_duration_seconds",
            "Run time of idempotent bodies that ran under a claim, in seconds.",
            ("function", "outcome"),
            namespace=self.namespace,
            registry=self.registry,
            buckets=buckets,
        )
        self._collectors.append(self.run_duration)

    def __call__(self, event: Event) -> None:
        kind = event.kind
        # The hot path (claims, duplicates...): one dict lookup for the labelled child,
        # since prometheus_client's labels() validates and locks on every call.
        child = self._children.get((kind, event.name))
        if child is None:
            counter = self._simple.get(kind)
            if counter is None:
                self._rare(event)
                return
            child = self._children.setdefault((kind, event.name), counter.labels(event.name))
        child.inc()
        if event.duration is not None and (kind is EventKind.COMPLETED or kind is EventKind.FAILED):
            self.run_duration.labels(event.name, kind.value).observe(event.duration)

    def _rare(self, event: Event) -> None:
        counter = self._by_kind.get(event.kind)
        if counter is not None:
            counter.labels(event.name, str(event.attributes.get("failure_kind", ""))).inc()
        elif event.kind is EventKind.BACKEND_ERROR:
            self.backend_errors.labels(event.name, event.error or "").inc()
        # Kinds added later are ignored until this exporter learns them.

    def unregister(self) -> None:
        """Remove this exporter's metrics from its registry (stop counting first with
        :meth:`uninstall`); another exporter can then register the same names."""
        while self._collectors:
            collector = self._collectors.pop()
            # Never registered (a failed creation) or already removed: nothing to undo.
            with contextlib.suppress(KeyError):
                self.registry.unregister(collector)


_slot: _Slot[PrometheusExporter] = _Slot()


def install(
    registry: CollectorRegistry | None = None,
    namespace: str = "idempotask",
    *,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> PrometheusExporter:
    """Count every idempotask event into Prometheus metrics, process-wide.

    Installing again replaces (and unregisters) the previous exporter, so its counters
    start from zero -- which Prometheus reads as a counter reset.

    >>> from idempotask.observability import prometheus
    >>> exporter = prometheus.install()  # doctest: +SKIP
    """
    exporter = _slot.replace(
        lambda: PrometheusExporter(registry, namespace, buckets=buckets),
        PrometheusExporter.unregister,
    )
    assert exporter is not None
    return exporter


def uninstall() -> None:
    """Stop the process-wide exporter and remove its metrics from the registry."""
    _slot.replace(None, PrometheusExporter.unregister)


def installed() -> PrometheusExporter | None:
    """The process-wide exporter, if installed."""
    return _slot.current

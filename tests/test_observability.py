"""Exporters on the events hook: Prometheus metrics, OpenTelemetry spans, stdlib logs.

Prometheus and OpenTelemetry tests skip when their optional packages are absent; the
logging ones need only the standard library.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask import (
    AlreadyInProgress,
    BackendError,
    DeadLetterQueue,
    Event,
    EventKind,
    MissingDependencyError,
    dead_letter,
    events,
    idempotent,
)
from idempotask.backends.base import Record
from idempotask.backends.memory import MemoryBackend
from idempotask.deadletter import _processing, _recording
from idempotask.errors import ConfigurationError
from idempotask.observability import logging as idem_logging
from idempotask.retry import FixedDelay, RetryPolicy
from idempotask.taxonomy import FailureKind

SECRET = "s3cr3t-card-4242"  # passed as an argument; must never reach a metric, span or log
T0 = 1_800_000_000.0
DAY = 86_400.0
FAST = {FailureKind.TRANSIENT: RetryPolicy(2, FixedDelay(60))}


class FakeClock:
    """A store clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class BrokenStore(MemoryBackend):
    """A store whose claims fail like a dead server's."""

    def claim(self, *args: Any, **kwargs: Any) -> Record:
        raise BackendError("connection refused") from ConnectionRefusedError(111, "refused")


class GatewayTimeout(TimeoutError):
    """A transient failure."""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryBackend:
    backend = MemoryBackend(clock=clock)
    idempotask.configure(backend=backend)
    return backend


@pytest.fixture
def queue(tmp_path: Path) -> DeadLetterQueue:
    return DeadLetterQueue("memory://", policies=FAST, clock=lambda: T0, spool=tmp_path / "q")


def run_late_owner(clock: FakeClock, name: str) -> str:
    """A caller whose lease is taken over while its body runs; returns what it got.

    The store's clock is fake and the renewal thread's real: the first renewal (after a
    third of 0.3 s) finds the claim taken over and reports the loss from that thread.
    """
    entered = threading.Event()
    release = threading.Event()

    @idempotent(name=name, lease=0.3, wait_timeout=0)
    def job(card: str) -> str:
        if not entered.is_set():
            entered.set()
            release.wait(5)
            deadline = time.monotonic() + 5
            while idempotask.lease_held() and time.monotonic() < deadline:
                time.sleep(0.01)
            return "late owner"
        return "new owner"

    late: list[str] = []
    first = threading.Thread(target=lambda: late.append(job(SECRET)))
    first.start()
    assert entered.wait(5)
    clock.now += 1  # the first owner's lease runs out: it looks paused to the store
    assert job(SECRET) == "new owner"
    release.set()
    first.join(5)
    return late[0]


def hold_and_conflict(name: str) -> None:
    """One thread holds the key while another call meets it and raises at once."""
    entered = threading.Event()
    release = threading.Event()

    @idempotent(name=name, on_conflict="raise")
    def slow(card: str) -> str:
        entered.set()
        release.wait(5)
        return "done"

    holder = threading.Thread(target=slow, args=(SECRET,))
    holder.start()
    assert entered.wait(5)
    with pytest.raises(AlreadyInProgress):
        slow(SECRET)
    release.set()
    holder.join(5)


# ------------------------------------------------------------------------ prometheus


@pytest.fixture
def registry() -> Iterator[Any]:
    prometheus_client = pytest.importorskip("prometheus_client")
    from idempotask.observability.prometheus import PrometheusExporter

    registry = prometheus_client.CollectorRegistry()
    exporter = PrometheusExporter(registry).install()
    yield registry
    exporter.uninstall()


def sample(registry: Any, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


@pytest.mark.filterwarnings("ignore::idempotask.LeaseLostWarning")
def test_prometheus_counts_every_outcome_exactly(
    registry: Any, store: MemoryBackend, clock: FakeClock
) -> None:
    """Counters and the run-time histogram match a scripted run, label by label."""

    @idempotent(name="obs.charge", ttl=60)
    def charge(order: int, card: str) -> str:
        return f"charged {order}"

    @idempotent(name="obs.flaky")
    def flaky(card: str) -> None:
        raise ValueError("declined")

    @idempotent(name="obs.cached", cache_errors=60)
    def cached(card: str) -> None:
        raise ValueError("declined")

    @idempotent(name="obs.open", backend=BrokenStore(), on_backend_error="open")
    def unprotected(card: str) -> str:
        return "ran"

    charge(1, SECRET)
    charge(1, SECRET)
    charge(2, SECRET)
    with pytest.raises(ValueError, match="declined"):
        flaky(SECRET)
    for _ in range(2):
        with pytest.raises(ValueError, match="declined"):
            cached(SECRET)
    assert unprotected(SECRET) == "ran"
    hold_and_conflict("obs.slow")
    assert run_late_owner(clock, "obs.late") == "late owner"

    counts = {
        ("claims", "obs.charge"): 2,
        ("completions", "obs.charge"): 2,
        ("duplicates", "obs.charge"): 1,
        ("failures", "obs.flaky"): 1,
        ("releases", "obs.flaky"): 1,
        ("claims", "obs.cached"): 1,
        ("failures", "obs.cached"): 1,
        ("releases", "obs.cached"): 0,  # the error was stored, not released
        ("duplicates", "obs.cached"): 1,
        ("fail_open_runs", "obs.open"): 1,
        ("claims", "obs.slow"): 1,
        ("conflicts", "obs.slow"): 1,
        ("completions", "obs.slow"): 1,
        ("claims", "obs.late"): 2,
        ("completions", "obs.late"): 1,  # only the new owner's result is stored
        ("lease_losses", "obs.late"): 1,
    }
    for (metric, function), expected in counts.items():
        got = sample(registry, f"idempotask_{metric}_total", function=function)
        assert got == expected, (metric, function)
    assert (
        sample(
            registry,
            "idempotask_backend_errors_total",
            function="obs.open",
            error="ConnectionRefusedError",
        )
        == 1
    )
    duration = "idempotask_run_duration_seconds_count"
    assert sample(registry, duration, function="obs.charge", outcome="completed") == 2
    assert sample(registry, duration, function="obs.flaky", outcome="failed") == 1
    assert sample(registry, duration, function="obs.late", outcome="completed") == 1
    assert sample(registry, duration, function="obs.open", outcome="completed") == 0


def test_prometheus_counts_dead_letters_by_kind_and_every_replay_outcome(
    registry: Any, queue: DeadLetterQueue
) -> None:
    """New letters by kind; replays that succeed, fail and run out of retries."""
    fail = [True]

    @dead_letter(queue=queue)
    @idempotent(name="obs.sync")
    def sync(n: int, card: str) -> int:
        if fail[0]:
            raise GatewayTimeout("gateway")
        return n

    @dead_letter(queue=queue, name="obs.always", swallow=True)
    def always(card: str) -> None:
        raise GatewayTimeout("still down")

    @dead_letter(queue=queue, name="obs.bad", swallow=True)
    def bad(card: str) -> None:
        raise ValueError("permanent")

    with pytest.raises(GatewayTimeout):
        sync(1, SECRET)
    always(SECRET)
    bad(SECRET)
    fail[0] = False
    queue.process_due(now=T0 + DAY)  # sync resolves; always fails with a retry left
    queue.process_due(now=T0 + 2 * DAY)  # always fails again: its 2 retries are used up
    assert queue.process_due(now=T0 + 3 * DAY).claimed == 0

    def count(metric: str, function: str, **labels: str) -> float:
        return sample(registry, f"idempotask_{metric}_total", function=function, **labels)

    assert count("dead_letters", "obs.sync", kind="transient") == 1
    assert count("dead_letters", "obs.always", kind="transient") == 1
    assert count("dead_letters", "obs.bad", kind="permanent") == 1
    assert count("retries_succeeded", "obs.sync") == 1
    assert count("retries_failed", "obs.always", kind="transient") == 1
    assert count("retries_exhausted", "obs.always", kind="transient") == 1
    assert count("retries_exhausted", "obs.bad", kind="permanent") == 0  # never replayed
    # The replay ran through @idempotent: its own claim and stored result are counted.
    assert count("claims", "obs.sync") == 2
    assert count("completions", "obs.sync") == 1
    assert count("failures", "obs.sync") == 1


def test_prometheus_labels_hold_function_names_never_keys_or_arguments(
    registry: Any, queue: DeadLetterQueue
) -> None:
    """Every label value is a function name or a small enum, bounded and secret-free."""

    @dead_letter(queue=queue, swallow=True)
    @idempotent(name="obs.labels")
    def job(card: str) -> None:
        raise GatewayTimeout(f"declined {card}")  # a message that quotes an argument

    job(SECRET)
    job(SECRET + "-2")
    queue.process_due(now=T0 + DAY)
    label_values = {
        (name, value)
        for metric in registry.collect()
        for s in metric.samples
        for name, value in s.labels.items()
    }
    assert label_values, "no samples were exported"
    assert {name for name, _ in label_values} <= {"function", "kind", "outcome", "error", "le"}
    assert {v for n, v in label_values if n == "function"} == {"obs.labels"}
    assert all(SECRET not in v and ":" not in v for n, v in label_values if n != "le")


def test_prometheus_install_replaces_and_uninstall_unregisters_the_metrics() -> None:
    """The module-level exporter can be installed again on the same registry."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from idempotask.observability import prometheus

    registry = prometheus_client.CollectorRegistry()
    first = prometheus.install(registry, namespace="app")
    second = prometheus.install(registry, namespace="app")  # no "duplicated timeseries"
    assert prometheus.installed() is second
    assert not first.installed
    assert second.installed
    second(Event(EventKind.CLAIMED, "obs.x", "k"))
    assert registry.get_sample_value("app_claims_total", {"function": "obs.x"}) == 1
    prometheus.uninstall()
    assert prometheus.installed() is None
    assert not second.installed
    assert registry.get_sample_value("app_claims_total", {"function": "obs.x"}) is None


def test_two_exporters_on_one_registry_are_refused_with_the_fix_named() -> None:
    """A second exporter with the same names is a ConfigurationError, not a half state."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from idempotask.observability.prometheus import PrometheusExporter

    registry = prometheus_client.CollectorRegistry()
    PrometheusExporter(registry)
    with pytest.raises(ConfigurationError, match="one exporter per registry"):
        PrometheusExporter(registry)
    PrometheusExporter(registry, namespace="other")  # another namespace is fine


# ----------------------------------------------------------------------- opentelemetry


@dataclass
class Tracing:
    tracer: Any
    exporter: Any

    def spans(self, prefix: str = "") -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if s.name.startswith(prefix)]

    def span(self, name: str) -> Any:
        (found,) = [s for s in self.exporter.get_finished_spans() if s.name == name]
        return found


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from idempotask.observability.otel import OpenTelemetryListener

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    listener = OpenTelemetryListener(provider).install()
    yield Tracing(provider.get_tracer("tests"), exporter)
    listener.uninstall()


def event_names(span: Any) -> list[str]:
    return [e.name for e in span.events]


def run_span_of(tracing: Tracing, key: str) -> Any:
    (found,) = [
        s for s in tracing.spans("idempotask.run ") if s.attributes["idempotask.key"] == key
    ]
    return found


def test_a_first_call_annotates_the_current_span_and_records_a_run_span(
    tracing: Tracing, store: MemoryBackend
) -> None:
    """First call: outcome "completed", claimed/completed events, a timed child run span."""

    @idempotent(name="obs.otel.charge")
    def charge(order: int, card: str) -> str:
        time.sleep(0.02)
        return "ok"

    with tracing.tracer.start_as_current_span("request"):
        charge(1, SECRET)
    request = tracing.span("request")
    key = charge.key_for(1, SECRET)
    assert request.attributes["idempotask.name"] == "obs.otel.charge"
    assert request.attributes["idempotask.key"] == key
    assert request.attributes["idempotask.outcome"] == "completed"
    assert event_names(request) == ["idempotask.claimed", "idempotask.completed"]
    run = tracing.span("idempotask.run obs.otel.charge")
    assert run.parent is not None
    assert run.parent.span_id == request.context.span_id
    assert run.end_time - run.start_time >= 20_000_000  # the body's 20 ms
    assert run.attributes["idempotask.outcome"] == "completed"
    assert run.status.is_ok


def test_a_duplicate_is_an_annotation_without_a_run_span(
    tracing: Tracing, store: MemoryBackend
) -> None:
    """Duplicate: outcome "duplicate" on the caller's span, and nothing ran."""

    @idempotent(name="obs.otel.dup")
    def charge(order: int) -> str:
        return "ok"

    charge(1)  # outside any span: nothing to annotate, but the run span is recorded
    tracing.exporter.clear()
    with tracing.tracer.start_as_current_span("retry"):
        charge(1)
    retry = tracing.span("retry")
    assert retry.attributes["idempotask.outcome"] == "duplicate"
    assert event_names(retry) == ["idempotask.duplicate"]
    assert tracing.spans("idempotask.run") == []


def test_a_failure_marks_the_run_span_as_an_error_and_names_the_dead_letter(
    tracing: Tracing, store: MemoryBackend, queue: DeadLetterQueue
) -> None:
    """Failure: outcome "failed", run span status ERROR with error.type, letter attributes."""

    @dead_letter(queue=queue)
    @idempotent(name="obs.otel.fail")
    def charge(card: str) -> None:
        raise GatewayTimeout(f"declined {card}")

    with tracing.tracer.start_as_current_span("request"), pytest.raises(GatewayTimeout):
        charge(SECRET)
    request = tracing.span("request")
    assert request.attributes["idempotask.outcome"] == "failed"
    assert request.attributes["idempotask.failure_kind"] == "transient"
    letter = queue.query()[0]
    assert request.attributes["idempotask.letter_id"] == letter.id
    assert event_names(request) == [
        "idempotask.claimed",
        "idempotask.failed",
        "idempotask.released",
        "idempotask.dead_letter",
    ]
    from opentelemetry.trace import StatusCode

    run = tracing.span("idempotask.run obs.otel.fail")
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes["error.type"] == "GatewayTimeout"
    for span in tracing.spans():
        text = repr(dict(span.attributes)) + repr([dict(e.attributes) for e in span.events])
        assert SECRET not in text
        assert "declined" not in text


def test_calls_on_threads_each_annotate_their_own_span(
    tracing: Tracing, store: MemoryBackend
) -> None:
    """Eight overlapping threads: each span holds its own call's key, name and run span."""
    n = 8
    barrier = threading.Barrier(n)

    @idempotent(name="obs.otel.thread")
    def work(i: int) -> int:
        barrier.wait(5)  # every body runs at the same time
        return i

    def call(i: int) -> None:
        with tracing.tracer.start_as_current_span(f"thread-{i}"):
            assert work(i) == i

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for i in range(n):
        span = tracing.span(f"thread-{i}")
        key = work.key_for(i)
        assert span.attributes["idempotask.key"] == key
        assert [e.attributes["idempotask.key"] for e in span.events] == [key, key]
        assert run_span_of(tracing, key).parent.span_id == span.context.span_id


async def test_calls_in_asyncio_tasks_each_annotate_their_own_span(
    tracing: Tracing, store: MemoryBackend
) -> None:
    """Eight interleaved tasks on one loop: no attribute lands on another task's span."""
    n = 8
    arrived = 0
    all_in = asyncio.Event()

    @idempotent(name="obs.otel.task")
    async def work(i: int) -> int:
        nonlocal arrived
        arrived += 1
        if arrived == n:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 5)  # every body is suspended at once
        return i

    async def call(i: int) -> None:
        with tracing.tracer.start_as_current_span(f"task-{i}"):
            assert await work(i) == i

    await asyncio.gather(*(call(i) for i in range(n)))
    for i in range(n):
        span = tracing.span(f"task-{i}")
        key = work.key_for(i)
        assert span.attributes["idempotask.key"] == key
        assert span.attributes["idempotask.outcome"] == "completed"
        assert {e.attributes["idempotask.key"] for e in span.events} == {key}
        assert run_span_of(tracing, key).parent.span_id == span.context.span_id


def test_several_calls_in_one_span_keep_one_span_event_each(
    tracing: Tracing, store: MemoryBackend
) -> None:
    """Attributes hold the last call; span events keep every call."""

    @idempotent(name="obs.otel.many")
    def job(i: int) -> int:
        return i

    with tracing.tracer.start_as_current_span("batch"):
        job(1)
        job(2)
        job(1)
    batch = tracing.span("batch")
    assert batch.attributes["idempotask.key"] == job.key_for(1)
    assert batch.attributes["idempotask.outcome"] == "duplicate"
    keys = [e.attributes["idempotask.key"] for e in batch.events]
    assert keys == [job.key_for(1)] * 2 + [job.key_for(2)] * 2 + [job.key_for(1)]


@pytest.mark.filterwarnings("ignore::idempotask.LeaseLostWarning")
def test_a_lease_lost_in_the_renewal_thread_gets_a_span_of_its_own(
    tracing: Tracing, store: MemoryBackend, clock: FakeClock
) -> None:
    """The renewal thread's report is a root span, never an annotation of a wrong span."""
    with tracing.tracer.start_as_current_span("unrelated"):
        assert run_late_owner(clock, "obs.otel.late") == "late owner"
    lost = tracing.span("idempotask.lease_lost obs.otel.late")
    assert lost.parent is None
    assert lost.attributes["idempotask.key"].startswith("idempotask:obs.otel.late:")
    assert "idempotask.lease_lost" not in event_names(tracing.span("unrelated"))


async def test_a_lease_lost_in_the_renewal_task_skips_the_span_its_context_copied(
    tracing: Tracing,
) -> None:
    """The asyncio renewal task inherits its first caller's context; that span stays clean."""

    async def renewal() -> None:
        events.emit(EventKind.LEASE_LOST, "obs.otel.alost", "idempotask:obs:v1:ab")

    with tracing.tracer.start_as_current_span("first-caller"):
        task = asyncio.get_running_loop().create_task(renewal(), name="idempotask-lease-renewal")
        await task
    assert event_names(tracing.span("first-caller")) == []
    assert tracing.span("idempotask.lease_lost obs.otel.alost").parent is None


def test_replays_annotate_the_processors_span(
    tracing: Tracing, store: MemoryBackend, queue: DeadLetterQueue
) -> None:
    """process_due inside a span: one retry_* span event per replayed letter."""
    fail = [True]

    @dead_letter(queue=queue, swallow=True)
    @idempotent(name="obs.otel.replay")
    def job(i: int) -> None:
        if fail[0]:
            raise GatewayTimeout("down")

    job(1)
    fail[0] = False
    with tracing.tracer.start_as_current_span("processor"):
        queue.process_due(now=T0 + DAY)
    processor = tracing.span("processor")
    assert "idempotask.retry_succeeded" in event_names(processor)
    (event,) = [e for e in processor.events if e.name == "idempotask.retry_succeeded"]
    assert event.attributes["idempotask.resolution"] == "retry"
    assert event.attributes["idempotask.name"] == "obs.otel.replay"


# ----------------------------------------------------------------------------- logging


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)  # every logger, so "no record anywhere" means it
    listener = idem_logging.LoggingListener().install()
    yield caplog
    listener.uninstall()


def event_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "idempotask.events"]


def test_every_record_names_the_key_and_function_and_no_argument_value(
    logged: pytest.LogCaptureFixture, store: MemoryBackend, queue: DeadLetterQueue
) -> None:
    """Claims, duplicates, failures and dead letters log key and name; the secret nowhere."""

    @idempotent(name="obs.log.charge")
    def charge(order: int, card: str) -> str:
        return "ok"

    @dead_letter(queue=queue, swallow=True)
    @idempotent(name="obs.log.fail")
    def fail(card: str) -> None:
        raise GatewayTimeout("gateway")

    charge(1, SECRET)
    charge(1, SECRET)
    fail(SECRET)
    records = event_records(logged)
    assert [r.idempotask_event for r in records] == [  # type: ignore[attr-defined]
        "claimed",
        "completed",
        "duplicate",
        "claimed",
        "failed",
        "released",
        "dead_letter",
    ]
    for r in records:
        key: str = r.idempotask_key  # type: ignore[attr-defined]
        name: str = r.idempotask_name  # type: ignore[attr-defined]
        assert key
        assert key in r.getMessage()
        assert name in r.getMessage()
        assert name in ("obs.log.charge", "obs.log.fail")
    assert records[0].idempotask_key == charge.key_for(1, SECRET)  # type: ignore[attr-defined]
    assert records[1].idempotask_duration is not None  # type: ignore[attr-defined]
    letter = records[-1]
    assert letter.idempotask_attributes["failure_kind"] == "transient"  # type: ignore[attr-defined]
    assert "failure_kind=transient" in letter.getMessage()
    for r in logged.records:  # every logger, every field
        assert SECRET not in r.getMessage()
        assert SECRET not in repr(vars(r))


def test_exception_messages_stay_out_of_event_records(
    logged: pytest.LogCaptureFixture, store: MemoryBackend, queue: DeadLetterQueue
) -> None:
    """An exception quoting an argument is logged by type only on idempotask.events."""

    @dead_letter(queue=queue, swallow=True)
    @idempotent(name="obs.log.quote")
    def job(card: str) -> None:
        raise ValueError(f"bad card {card}")

    job(SECRET)
    records = event_records(logged)
    assert any(getattr(r, "idempotask_error", None) == "ValueError" for r in records)
    for r in records:
        assert SECRET not in r.getMessage()
        assert SECRET not in repr(vars(r))


def test_levels_follow_how_much_attention_each_event_needs(
    logged: pytest.LogCaptureFixture, queue: DeadLetterQueue
) -> None:
    """DEBUG routine, INFO conflicts, WARNING dead letters, CRITICAL for critical ones."""
    idempotask.configure(backend=BrokenStore(), on_backend_error="open")

    @idempotent(name="obs.log.open")
    def unprotected() -> str:
        return "ran"

    @dead_letter(queue=queue, name="obs.log.plain", swallow=True)
    def plain() -> None:
        raise GatewayTimeout("x")

    @dead_letter(queue=queue, name="obs.log.critical", swallow=True, critical=True)
    def vital() -> None:
        raise GatewayTimeout("x")

    idempotask.configure(backend="memory://")
    hold_and_conflict("obs.log.slow")
    idempotask.configure(backend=BrokenStore(), on_backend_error="open")
    unprotected()
    plain()
    vital()
    levels = {
        (r.idempotask_event, r.idempotask_name): r.levelno  # type: ignore[attr-defined]
        for r in event_records(logged)
    }
    assert levels[("claimed", "obs.log.slow")] == logging.DEBUG
    assert levels[("conflict", "obs.log.slow")] == logging.INFO
    assert levels[("backend_error", "obs.log.open")] == logging.WARNING
    assert levels[("fail_open", "obs.log.open")] == logging.ERROR
    assert levels[("dead_letter", "obs.log.plain")] == logging.WARNING
    assert levels[("dead_letter", "obs.log.critical")] == logging.CRITICAL


def test_levels_can_be_overridden_and_unknown_kinds_are_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """levels= by kind or value; a typo is a ConfigurationError naming the kinds."""
    listener = idem_logging.LoggingListener(levels={"duplicate": logging.INFO})
    assert listener.level_of(Event(EventKind.DUPLICATE, "n", "k")) == logging.INFO
    with pytest.raises(ConfigurationError, match="duplicate"):
        idem_logging.LoggingListener(levels={"duplicates": logging.INFO})
    caplog.set_level(logging.INFO, logger="idempotask.events")
    listener(Event(EventKind.CLAIMED, "n", "k"))  # DEBUG: dropped before formatting
    assert event_records(caplog) == []


# ---------------------------------------------------------------- safety and cost


def test_a_listener_that_raises_never_breaks_a_call(
    store: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken listener is logged and skipped; the call and later listeners carry on."""
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("exporter down")

    remove_broken = idempotask.add_listener(broken)
    remove_seen = idempotask.add_listener(seen.append)
    try:

        @idempotent(name="obs.safe")
        def job(i: int) -> int:
            return i

        assert job(1) == 1
        assert job(1) == 1
    finally:
        remove_broken()
        remove_seen()
    assert [e.kind for e in seen] == [EventKind.CLAIMED, EventKind.COMPLETED, EventKind.DUPLICATE]
    assert any("listener" in r.getMessage() for r in caplog.records)


def test_with_no_listener_the_dead_letter_paths_build_no_event(
    monkeypatch: pytest.MonkeyPatch, queue: DeadLetterQueue, store: MemoryBackend
) -> None:
    """Recording and replaying letters never reach the event builder unobserved."""

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an event was built with no listener installed")

    monkeypatch.setattr(events, "listeners", ())  # whatever other tests left installed
    monkeypatch.setattr(_recording, "emit_letter", forbidden)
    monkeypatch.setattr(_processing, "emit_letter", forbidden)
    monkeypatch.setattr(events, "Event", forbidden)
    fail = [True]

    @dead_letter(queue=queue, name="obs.cost")
    def job() -> None:
        if fail[0]:
            raise GatewayTimeout("x")

    with pytest.raises(GatewayTimeout):
        job()
    queue.record("obs.cost.direct", GatewayTimeout("x"))
    fail[0] = False
    report = queue.process_due(now=T0 + DAY)
    assert len(report.resolved) == 1  # obs.cost; the direct letter has no function here


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("prometheus", "prometheus_client", "prometheus"),
        ("otel", "opentelemetry", "otel"),
    ],
)
def test_a_missing_optional_package_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, module: str, blocked: str, extra: str
) -> None:
    """Without the package, creating the exporter says pip install 'idempotask[...]'."""
    import importlib

    mod = importlib.import_module(f"idempotask.observability.{module}")  # imports fine
    monkeypatch.setitem(sys.modules, blocked, None)
    factory: Callable[[], Any] = (
        mod.PrometheusExporter if module == "prometheus" else mod.OpenTelemetryListener
    )
    with pytest.raises(MissingDependencyError, match=rf"idempotask\[{extra}\]"):
        factory()


def test_importing_idempotask_and_the_exporters_needs_only_the_stdlib() -> None:
    """A fresh interpreter imports every exporter module with the packages blocked."""
    import subprocess

    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "sys.modules['opentelemetry'] = None\n"
        "import idempotask\n"
        "from idempotask.observability import logging, otel, prometheus\n"
        "logging.install()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)

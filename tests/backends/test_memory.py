"""MemoryBackend: the shared store contract, the state machine, and what is memory-specific."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest

from idempotask.backends import backend_from_url
from idempotask.backends.base import Backend, State
from idempotask.backends.memory import MemoryBackend
from idempotask.errors import BackendError, ConfigurationError
from idempotask.testing import StoreContract, make_state_machine

ROOT = Path(__file__).resolve().parents[2]


# -- the shared contract -----------------------------------------------------------------


class TestMemoryContract(StoreContract):
    """The conformance suite, sync and async, on a fresh MemoryBackend per test."""

    @pytest.fixture
    def backend(self) -> MemoryBackend:
        return MemoryBackend()


# Memory is fast enough for four times the default number of examples.
TestMemoryStateMachine = make_state_machine(MemoryBackend, max_examples=200).TestCase


# -- memory-specific ---------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_backend_satisfies_the_protocol() -> None:
    """MemoryBackend is a Backend by the runtime-checkable protocol, and truthy when empty."""
    store = MemoryBackend()
    assert isinstance(store, Backend)
    assert store
    assert store.size == 0


def test_injected_clock_drives_lease_expiry_without_sleeping() -> None:
    """The lease runs out exactly when the injected clock passes it."""
    clock = FakeClock()
    store = MemoryBackend(clock=clock)
    assert store.claim("k", "t1", lease=10).held_by("t1")
    clock.now += 9.5
    record = store.claim("k", "t2", lease=10)
    assert not record.held_by("t2")
    assert record.expires_in == pytest.approx(0.5)
    clock.now += 0.5  # exactly at the deadline: expired
    assert store.get("k") is None
    assert store.renew("k", "t1", lease=10) is False
    assert store.claim("k", "t2", lease=10).held_by("t2")
    assert store.complete("k", "t1", b"late", ttl=60) is False


def test_injected_clock_drives_ttl_expiry_and_renew() -> None:
    """renew moves the deadline on the injected clock; the ttl counts from completion."""
    clock = FakeClock()
    store = MemoryBackend(clock=clock)
    store.claim("k", "t1", lease=10)
    clock.now += 8
    assert store.renew("k", "t1", lease=10) is True
    clock.now += 8  # 16 s after the claim, 8 s after the renewal: still held
    assert store.complete("k", "t1", b"r", ttl=100) is True
    clock.now += 99
    record = store.get("k")
    assert record is not None
    assert record.state is State.COMPLETED
    assert record.expires_in == pytest.approx(1)
    clock.now += 1
    assert store.get("k") is None
    assert store.claim("k", "t2", lease=10).held_by("t2")


def test_max_entries_bound_holds_under_ten_times_the_inserts() -> None:
    """Inserting 10x max_entries finished records never grows past max_entries."""
    store = MemoryBackend(max_entries=100)
    for i in range(1000):
        key = f"k{i}"
        store.claim(key, "t", lease=60)
        store.complete(key, "t", b"r", ttl=3600)
        assert store.size <= 100
    # The most recently written survive; the oldest were evicted first.
    assert store.get("k999") is not None
    assert store.get("k900") is not None
    assert store.get("k0") is None


def test_a_full_store_sweeps_for_expired_records_only_occasionally(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inserting into a full store scans all records once per max_entries/4 new keys at most."""
    store = MemoryBackend(max_entries=1000)
    sweeps = 0
    real_sweep = store._sweep

    def counting_sweep(now: float) -> None:
        nonlocal sweeps
        sweeps += 1
        real_sweep(now)

    monkeypatch.setattr(store, "_sweep", counting_sweep)
    for i in range(10_000):
        store.claim(f"k{i}", "t", lease=60)
        store.complete(f"k{i}", "t", b"r", ttl=3600)
    assert store.size == 1000
    assert sweeps <= 10_000 // 250


def test_eviction_takes_the_least_recently_written_record() -> None:
    """The record evicted is the one whose result was written longest ago."""
    store = MemoryBackend(max_entries=3)
    for key in ("a", "b", "c"):
        store.claim(key, "t", lease=60)
    for key in ("b", "a", "c"):  # written in this order
        store.complete(key, "t", b"r", ttl=3600)
    store.claim("d", "t", lease=60)
    assert store.get("b") is None
    assert [store.get(k) is not None for k in ("a", "c", "d")] == [True, True, True]


def test_expired_records_are_dropped_before_live_ones() -> None:
    """A full store first drops expired records, even ones written more recently."""
    clock = FakeClock()
    store = MemoryBackend(max_entries=10, clock=clock)
    for i in range(5):
        store.claim(f"long{i}", "t", lease=60)
        store.complete(f"long{i}", "t", b"r", ttl=3600)
    for i in range(5):
        store.claim(f"short{i}", "t", lease=60)
        store.complete(f"short{i}", "t", b"r", ttl=1)
    clock.now += 2
    for i in range(5):
        store.claim(f"new{i}", "t", lease=60)
    assert all(store.get(f"long{i}") is not None for i in range(5))
    assert store.size == 10


def test_in_progress_claims_are_never_evicted() -> None:
    """Eviction under pressure leaves every live in-progress claim in place."""
    store = MemoryBackend(max_entries=10)
    for i in range(5):
        assert store.claim(f"running{i}", f"t{i}", lease=60).held_by(f"t{i}")
    for i in range(200):
        store.claim(f"done{i}", "t", lease=60)
        store.complete(f"done{i}", "t", b"r", ttl=3600)
    assert store.size <= 10
    for i in range(5):
        assert store.renew(f"running{i}", f"t{i}", lease=60) is True


def test_a_store_full_of_in_progress_claims_raises_backend_error() -> None:
    """When only live claims remain, a new key is refused with advice to raise max_entries."""
    clock = FakeClock()
    store = MemoryBackend(max_entries=3, clock=clock)
    for i in range(3):
        store.claim(f"k{i}", "t", lease=10)
    with pytest.raises(BackendError, match=r"all 3 records are in-progress.*max_entries"):
        store.claim("k3", "t", lease=10)
    # Existing keys still answer; and once a lease runs out its slot is reused.
    assert store.claim("k0", "other", lease=10).token == "t"
    clock.now += 11
    assert store.claim("k3", "t", lease=10).held_by("t")


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "10", None])
def test_max_entries_must_be_a_positive_int(bad: object) -> None:
    """A bad max_entries is a ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match="max_entries"):
        MemoryBackend(max_entries=bad)  # type: ignore[arg-type]


def test_clock_must_be_callable() -> None:
    """A clock that is not callable is a ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match="clock"):
        MemoryBackend(clock=42.0)  # type: ignore[arg-type]


def test_a_mutable_payload_is_copied() -> None:
    """Mutating a bytearray after complete does not change the stored result."""
    store = MemoryBackend()
    store.claim("k", "t", lease=60)
    buffer = bytearray(b"abc")
    store.complete("k", "t", buffer, ttl=60)  # type: ignore[arg-type]
    buffer[0] = ord("z")
    record = store.get("k")
    assert record is not None
    assert record.payload == b"abc"


async def test_sync_and_async_callers_share_one_store() -> None:
    """A claim taken through the sync API is completed through the async one."""
    store = MemoryBackend()
    assert store.claim("k", "t", lease=60).held_by("t")
    assert not (await store.aclaim("k", "u", lease=60)).held_by("u")
    assert await store.acomplete("k", "t", b"r", ttl=60) is True
    record = await store.aget("k")
    assert record is not None
    assert record.payload == b"r"


# -- URLs --------------------------------------------------------------------------------


def test_from_url_defaults_and_options() -> None:
    """memory:// gives the default bound; ?max_entries= sets it; the registry finds it."""
    assert MemoryBackend.from_url("memory://").max_entries == 100_000
    assert MemoryBackend.from_url("memory:///").max_entries == 100_000
    assert MemoryBackend.from_url("memory://?max_entries=5000").max_entries == 5000
    built = backend_from_url("memory://?max_entries=7")
    assert isinstance(built, MemoryBackend)
    assert built.max_entries == 7


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://?max_entries=abc", "max_entries must be a positive int"),
        ("memory://?max_entries=0", "max_entries must be a positive int"),
        ("memory://?max_entries=", "max_entries must be a positive int"),
        ("memory://?foo=1&bar=2", "unknown option.*bar, foo"),
        ("memory://?max_entries=1&max_entries=2", "given twice"),
        ("memory://somehost", "no host"),
        ("memory://?max_entries=5#frag", "no host, path or fragment"),
        ("redis://localhost", "expected a memory:// URL"),
    ],
)
def test_from_url_rejects_bad_urls(url: str, message: str) -> None:
    """A malformed memory URL is a ConfigurationError that says what is wrong."""
    with pytest.raises(ConfigurationError, match=message):
        MemoryBackend.from_url(url)


# -- processes and threads ---------------------------------------------------------------

_FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time, warnings
    from idempotask.backends.memory import MemoryBackend

    store = MemoryBackend()
    other = MemoryBackend()
    store.claim("seen", "t", lease=60)
    store.complete("seen", "t", b"parent", ttl=60)

    # A thread keeps taking the store's lock while we fork, so a fork may land while it
    # is held: the child must still be able to use the store.
    stop = threading.Event()
    def hammer():
        i = 0
        while not stop.is_set():
            store.claim(f"h{i % 50}", "x", lease=60)
            i += 1
    thread = threading.Thread(target=hammer)
    with warnings.catch_warnings(record=True) as parent_caught:
        warnings.simplefilter("always")
        thread.start()
        children = []
        for n in range(5):
            time.sleep(0.01)
            pid = os.fork()
            if pid == 0:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fresh = MemoryBackend()
                    fresh.claim("k", "t", lease=60)  # made here: no warning
                    ok = not caught
                    record = store.get("seen")  # inherited copy: warns once
                    store.claim("c", "t", lease=60)
                    other.claim("c", "t", lease=60)  # another inherited store: still once
                ok = ok and record is not None and record.payload == b"parent"
                runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
                ok = ok and len(runtime) == 1
                text = str(runtime[0].message) if runtime else ""
                ok = ok and "own memory store" in text and "redis://" in text
                os._exit(0 if ok else 1)
            children.append(pid)
        stop.set()
        thread.join()
        store.claim("after", "t", lease=60)
    deadline = time.monotonic() + 20
    codes = []
    for pid in children:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes.append(os.waitstatus_to_exitcode(status))
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                codes.append("deadlocked")
                break
            time.sleep(0.01)
    parent_runtime = [w for w in parent_caught if issubclass(w.category, RuntimeWarning)]
    print(codes, len(parent_runtime))
    sys.exit(0 if codes == [0] * 5 and not parent_runtime else 1)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_warns_once_and_does_not_deadlock() -> None:
    """A store used in a forked child warns once there (not in the parent) and still works."""
    result = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_32_threads_on_200_keys_run_each_key_exactly_once() -> None:
    """Threads racing claim/complete over shared keys run each key's body exactly once."""
    store = MemoryBackend()
    keys = [f"job:{i}" for i in range(200)]
    runs: Counter[str] = Counter()
    runs_lock = threading.Lock()
    errors: list[BaseException] = []
    barrier = threading.Barrier(32)

    def worker(seed: int) -> None:
        order = keys[:]
        random.Random(seed).shuffle(order)
        try:
            barrier.wait()
            for key in order:
                token = uuid.uuid4().hex
                record = store.claim(key, token, lease=60)
                if record.held_by(token):
                    with runs_lock:
                        runs[key] += 1
                    assert store.complete(key, token, key.encode(), ttl=3600)
                else:
                    assert record.state in (State.IN_PROGRESS, State.COMPLETED)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert runs == Counter(dict.fromkeys(keys, 1))
    for key in keys:
        record = store.get(key)
        assert record is not None
        assert record.state is State.COMPLETED
        assert record.payload == key.encode()


# ------------------------------------------------------------------ eviction is reported


def test_evicting_a_live_result_emits_an_evicted_event_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A result dropped inside its ttl (the store is full) is an 'evicted' event with the
    seconds it had left; the first eviction per store logs a warning too."""
    from idempotask import EventKind, events

    seen: list[events.Event] = []
    remove = events.add_listener(seen.append)
    clock = FakeClock()
    store = MemoryBackend(max_entries=2, clock=clock)
    try:
        for key in ("ns:app.f:v1:a", "ns:app.f:v1:b"):
            store.claim(key, "t", lease=60)
            store.complete(key, "t", b"r", ttl=3600)
        clock.now += 100
        with caplog.at_level("WARNING", logger="idempotask"):
            store.claim("ns:app.f:v1:c", "t", lease=60)
            store.complete("ns:app.f:v1:c", "t", b"r", ttl=3600)
            store.claim("ns:app.f:v1:d", "t", lease=60)
    finally:
        remove()
    evicted = [e for e in seen if e.kind is EventKind.EVICTED]
    assert [(e.name, e.key) for e in evicted] == [
        ("app.f", "ns:app.f:v1:a"),
        ("app.f", "ns:app.f:v1:b"),
    ]
    assert evicted[0].attributes["ttl_left"] == 3500.0
    warnings = [r for r in caplog.records if "evicted the stored result" in r.getMessage()]
    assert len(warnings) == 1


def test_dropping_expired_records_emits_no_eviction() -> None:
    from idempotask import EventKind, events

    seen: list[events.Event] = []
    remove = events.add_listener(seen.append)
    clock = FakeClock()
    store = MemoryBackend(max_entries=1, clock=clock)
    try:
        store.claim("a", "t", lease=60)
        store.complete("a", "t", b"r", ttl=10)
        clock.now += 11
        store.claim("b", "t", lease=60)
    finally:
        remove()
    assert [e for e in seen if e.kind is EventKind.EVICTED] == []


def test_an_evicted_result_runs_the_call_again_and_says_so() -> None:
    """Through @idempotent: max_entries=1, two calls, the first's result is evicted; its
    duplicate runs again, and the eviction was reported."""
    import idempotask
    from idempotask import EventKind, events, idempotent

    idempotask.configure(backend=MemoryBackend(max_entries=1))
    seen: list[events.Event] = []
    remove = events.add_listener(seen.append)
    runs: list[int] = []

    @idempotent(name=f"memory.evicted.{uuid.uuid4().hex[:8]}")
    def job(n: int) -> int:
        runs.append(n)
        return n

    try:
        job(1)
        job(2)
        job(1)
    finally:
        remove()
    assert runs == [1, 2, 1]
    assert [e.key for e in seen if e.kind is EventKind.EVICTED] == [job.key_for(1), job.key_for(2)]


# ------------------------------------------------------------------ scan and the stores beside


def test_scan_lists_live_records_by_prefix_up_to_limit() -> None:
    from idempotask.backends.base import SupportsScan

    clock = FakeClock()
    store = MemoryBackend(clock=clock)
    assert isinstance(store, SupportsScan)
    for i in range(5):
        store.claim(f"ns:app.f:v1:{i}", "t", lease=60)
    store.claim("ns:app.g:v1:0", "t", lease=60)
    store.claim("ns:app.f:v1:gone", "t", lease=1)
    clock.now += 2
    assert sorted(r.key for r in store.scan("ns:app.f:")) == [f"ns:app.f:v1:{i}" for i in range(5)]
    assert len(store.scan("ns:app.f:", limit=2)) == 2
    assert [r.state for r in store.scan("ns:app.g:")] == [State.IN_PROGRESS]
    # As on Redis and SQL (a fallback store asks both): limit=0 lists nothing.
    assert store.scan("ns:", limit=0) == []
    with pytest.raises(ConfigurationError, match="limit"):
        store.scan("ns:", limit=-1)


async def test_ascan_is_scan() -> None:
    store = MemoryBackend()
    store.claim("ns:a:v1:1", "t", lease=60)
    assert [r.key for r in await store.ascan("ns:a:")] == ["ns:a:v1:1"]


def test_the_backend_provides_one_dead_letter_and_one_breaker_store_per_namespace() -> None:
    from idempotask.backends.base import BreakerStore, DeadLetterStore, ProvidesStores
    from idempotask.backends.memory import MemoryBreakerStore, MemoryDeadLetterStore

    backend = MemoryBackend()
    assert isinstance(backend, ProvidesStores)
    letters = backend.dead_letter_store(namespace="app")
    assert isinstance(letters, MemoryDeadLetterStore)
    assert isinstance(letters, DeadLetterStore)
    assert backend.dead_letter_store(namespace="app") is letters
    assert backend.dead_letter_store(namespace="other") is not letters
    breakers = backend.breaker_store(namespace="app")
    assert isinstance(breakers, MemoryBreakerStore)
    assert isinstance(breakers, BreakerStore)
    assert backend.breaker_store(namespace="app") is breakers
    assert backend.breaker_store(namespace="other") is not breakers
    assert MemoryBackend().dead_letter_store() is not backend.dead_letter_store()


def test_the_exporters_report_evictions() -> None:
    """The logging listener logs 'evicted' at WARNING; Prometheus counts it per function."""
    import logging

    from idempotask import Event, EventKind
    from idempotask.observability.logging import DEFAULT_LEVELS

    assert DEFAULT_LEVELS[EventKind.EVICTED] == logging.WARNING
    prometheus_client = pytest.importorskip("prometheus_client")
    from idempotask.observability.prometheus import PrometheusExporter

    registry = prometheus_client.CollectorRegistry()
    exporter = PrometheusExporter(registry)
    exporter(Event(EventKind.EVICTED, "app.f", "ns:app.f:v1:a", attributes={"ttl_left": 5.0}))
    sample = registry.get_sample_value("idempotask_evictions_total", {"function": "app.f"})
    assert sample == 1.0

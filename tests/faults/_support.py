"""What the fault and soak tests share: counters outside the store under test, forked
worker processes with a watchdog, per-call records, and the exactly-once audit.

A worker process is forked (so its arguments may be closures), builds its own store and
clients, runs threads of calls, and writes one JSON file of call records into a
directory the parent reads afterwards. A record says which key was called, how the call
ended (``"value"`` or the exception's type name), the value, whether this call ran the
body (``ran``), whether storing its result then failed (``unstored``: a
``backend_error`` event after the body ran) or its claim was taken over
(``lease_lost``), and how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import faulthandler
import json
import multiprocessing
import os
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

import idempotask
from idempotask import EventKind

FORK = multiprocessing.get_context("fork")

# A call that takes longer than this has hung, whatever the fault: every store operation
# has a timeout of a few seconds and every wait a wait_timeout well below it.
CALL_BOUND = 45.0


def unique(prefix: str) -> str:
    """A name no other test run uses."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


class Tally:
    """Counters and sets in the shared Redis, which no fault here touches.

    HINCRBY and SADD are atomic across processes; the client is made per process (a
    forked child never uses its parent's connections).
    """

    def __init__(self, url: str, name: str | None = None) -> None:
        self.url = url
        self.name = name or unique("idempotask-fault-tally:")
        self._client: Any = None
        self._pid = -1

    def _redis(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            self._client = redis.Redis.from_url(self.url, socket_timeout=10)
            self._pid = os.getpid()
        return self._client

    def incr(self, counter: str, key: str) -> int:
        return int(self._redis().hincrby(f"{self.name}:{counter}", key, 1))

    def counts(self, counter: str) -> dict[str, int]:
        raw = self._redis().hgetall(f"{self.name}:{counter}")
        return {k.decode(): int(v) for k, v in raw.items()}

    def total(self, counter: str) -> int:
        return sum(self.counts(counter).values())

    def add(self, group: str, member: str) -> None:
        self._redis().sadd(f"{self.name}:{group}", member)

    def members(self, group: str) -> set[str]:
        return {m.decode() for m in self._redis().smembers(f"{self.name}:{group}")}

    def drop(self) -> None:
        """Delete every counter and set, and close this process's client."""
        drop_keys(self.url, f"{self.name}:*")
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None


def drop_keys(url: str, pattern: str) -> int:
    """Delete the keys matching ``pattern`` (a test's namespace) from the Redis at ``url``."""
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        client.close()


class CallTracker:
    """In a worker: runs calls (sync or async) and records how each ended.

    It listens to idempotask's events, matched to the call by a context variable (so
    threads and asyncio tasks each see their own call) and by store key: a
    ``backend_error`` after the body ran means the result could not be stored (the claim
    stays until its lease runs out, so the body may run once more: inside the
    guarantee); a ``lease_lost`` marks the call, and one from a renewal thread or task is
    kept by store key in :attr:`lost_elsewhere`.
    """

    def __init__(self) -> None:
        self._current: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
            "fault_call", default=None
        )
        self._lock = threading.Lock()
        self.lost_elsewhere: list[str] = []
        self._remove = idempotask.add_listener(self._on_event)

    def close(self) -> None:
        """Stop listening (a worker process just exits; a test in this process calls it)."""
        self._remove()

    def body_ran(self) -> None:
        """Called first thing by a body: this call ran it."""
        current = self._current.get()
        if current is not None:
            current["ran"] = True

    def _on_event(self, event: idempotask.Event) -> None:
        current = self._current.get()
        mine = current is not None and current["ran"] and current["store_key"] == event.key
        if event.kind is EventKind.BACKEND_ERROR and mine:
            assert current is not None
            current["unstored"] = True
        elif event.kind is EventKind.LEASE_LOST:
            if mine:
                assert current is not None
                current["lease_lost"] = True
            else:
                with self._lock:
                    self.lost_elsewhere.append(event.key)

    def _begin(self, key: str, store_key: str) -> dict[str, Any]:
        record: dict[str, Any] = {
            "key": key,
            "store_key": store_key,
            "ran": False,
            "unstored": False,
            "lease_lost": False,
            "pid": os.getpid(),
            "value": None,
            "message": "",
            "t0": time.time(),
            "clock": time.monotonic(),
        }
        self._current.set(record)
        return record

    def _end(self, record: dict[str, Any], value: Any, exc: BaseException | None) -> dict:
        self._current.set(None)
        record["dt"] = time.monotonic() - record.pop("clock")
        if exc is None:
            record["outcome"] = "value"
            record["value"] = value
        else:
            record["outcome"] = type(exc).__name__
            record["message"] = str(exc)[:300]
        return record

    def call(self, fn: Callable[..., Any], *args: Any, key: str, store_key: str) -> dict:
        """Call ``fn(*args)`` and return its record (never raises an Exception)."""
        record = self._begin(key, store_key)
        try:
            value = fn(*args)
        except Exception as exc:
            return self._end(record, None, exc)
        return self._end(record, value, None)

    async def acall(
        self, fn: Callable[..., Any], *args: Any, key: str, store_key: str, timeout: float
    ) -> dict:
        """Await ``fn(*args)`` under a watchdog ``timeout`` (a hang is a ``TimeoutError``
        outcome, which the audit reports); returns its record."""
        record = self._begin(key, store_key)
        try:
            value = await asyncio.wait_for(fn(*args), timeout)
        except Exception as exc:
            return self._end(record, None, exc)
        return self._end(record, value, None)


def run_threads(count: int, target: Callable[[int, list[dict]], None]) -> list[dict]:
    """Run ``target(i, records)`` in ``count`` threads; every thread's records, merged.

    A thread that raises fails the worker (after the others finish); the worker's
    watchdog ends a worker whose threads hang.
    """
    results: list[list[dict]] = [[] for _ in range(count)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            target(i, results[i])
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=run, args=(i,), name=f"caller-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [record for part in results for record in part]


def _worker_main(
    out_dir: str, watchdog: float, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    # A hung worker dumps every thread's stack to stderr and exits with status 1, which
    # the parent reports; it never keeps the test waiting.
    faulthandler.dump_traceback_later(watchdog, exit=True)
    result = fn(*args)
    tmp = Path(out_dir) / f".{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result))
    tmp.rename(Path(out_dir) / f"{os.getpid()}.json")
    faulthandler.cancel_dump_traceback_later()


class Workers:
    """Forked worker processes, each writing its result as JSON into ``out_dir``.

    Use it as a context manager: on exit every worker still alive is SIGKILLed and
    reaped, so no process outlives its test.
    """

    def __init__(self, out_dir: Path, *, watchdog: float = 180.0) -> None:
        self.out_dir = out_dir
        self.watchdog = watchdog
        self.processes: list[Any] = []
        out_dir.mkdir(parents=True, exist_ok=True)

    def start(self, fn: Callable[..., Any], *args: Any) -> Any:
        process = FORK.Process(
            target=_worker_main, args=(str(self.out_dir), self.watchdog, fn, args), daemon=True
        )
        process.start()
        self.processes.append(process)
        return process

    def join(self, timeout: float, *, killed: Iterable[Any] = ()) -> None:
        """Wait for every worker; fail if one hangs past ``timeout`` or exits non-zero
        (except those in ``killed``)."""
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        hung = [p.pid for p in self.processes if p.is_alive()]
        if hung:
            self.kill_all()
            raise AssertionError(f"worker processes {hung} hung past {timeout:g}s")
        skip = {id(p) for p in killed}
        failed = {p.pid: p.exitcode for p in self.processes if id(p) not in skip and p.exitcode}
        assert not failed, f"worker processes exited with errors (pid: status): {failed}"

    def results(self) -> dict[int, Any]:
        """Each finished worker's result, by pid."""
        return {
            int(path.stem): json.loads(path.read_text()) for path in self.out_dir.glob("*.json")
        }

    def kill_all(self) -> None:
        for process in self.processes:
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        for process in self.processes:
            process.join(10)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def call_with_watchdog(fn: Callable[[], Any], timeout: float) -> Any:
    """Run ``fn()`` in a thread; its result or exception, or fail if it hangs."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="watched-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"the call hung for more than {timeout:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------------------- the hammer


@dataclass
class Hammer:
    """Threads calling one ``@idempotent`` function on a moving window of keys.

    Each call picks a key just behind a frontier that advances ``rate`` keys a second,
    so first executions happen all through the run (a fault always finds bodies in
    flight) while most calls are duplicates of keys other threads are running or ran.
    Every ``slow_every``-th key's body takes ``slow_sleep`` seconds, the others
    ``body_sleep``: a fault then finds slow bodies in flight, whose results it may keep
    from being stored. Each thread pauses ``pace`` between calls so 16 threads do not
    starve the machine. Executions are counted in ``tally`` under ``"exec"``.

    The run starts when the parent sets ``go`` and ends when it sets ``stop`` (after its
    faults and a recovery phase), or after ``max_seconds``, or ``max_calls`` per thread.
    """

    configure: Callable[[], None]  # builds the store under test, in the worker
    tally: Tally
    name: str
    threads: int = 4
    max_seconds: float = 60.0
    rate: float = 40.0
    window: int = 40
    max_calls: int = 5000
    body_sleep: float = 0.01
    slow_every: int = 10
    slow_sleep: float = 1.0
    pace: float = 0.005
    lease: float = 3.0
    wait_timeout: float = 20.0
    pause_after_error: float = 0.05
    options: dict[str, Any] = field(default_factory=dict)


def hammer_worker(h: Hammer, seed: int, go: Any, stop: Any) -> dict[str, Any]:
    """A worker process's run of :class:`Hammer`: its records and lease losses."""
    h.configure()
    tracker = CallTracker()

    @idempotask.idempotent(
        name=h.name, lease=h.lease, wait_timeout=h.wait_timeout, ttl=3600, **h.options
    )
    def job(k: int) -> dict[str, Any]:
        tracker.body_ran()
        n = h.tally.incr("exec", f"k{k}")
        time.sleep(h.slow_sleep if k % h.slow_every == h.slow_every - 1 else h.body_sleep)
        return {"k": k, "n": n, "pid": os.getpid(), "thread": threading.get_ident()}

    if not go.wait(60):
        raise RuntimeError("the start signal never came")
    started = time.monotonic()
    stop_at = started + h.max_seconds

    def caller(i: int, records: list[dict]) -> None:
        rng = random.Random(seed * 1000 + i)
        for _ in range(h.max_calls):
            now = time.monotonic()
            if now >= stop_at or stop.is_set():
                return
            frontier = int((now - started) * h.rate)
            k = max(0, frontier - rng.randrange(h.window))
            record = tracker.call(job, k, key=f"k{k}", store_key=job.key_for(k))
            records.append(record)
            time.sleep(h.pace if record["outcome"] == "value" else h.pause_after_error)

    records = run_threads(h.threads, caller)
    return {"records": records, "lost_elsewhere": tracker.lost_elsewhere}


# ---------------------------------------------------------------------------- the audit


class Compactor:
    """Call records kept in bounded memory for long runs: every call that ran the body
    is kept, and the others are grouped by (key, outcome, value), each group one record
    with a ``count`` and the longest duration. The audit reads both kinds alike."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ran: list[dict] = []
        self._groups: dict[tuple[str, str, str], dict] = {}

    def add(self, record: dict) -> None:
        with self._lock:
            if record["ran"]:
                self._ran.append(record)
                return
            group = (record["key"], record["outcome"], _canon(record["value"]))
            kept = self._groups.get(group)
            if kept is None:
                record["count"] = 1
                self._groups[group] = record
            else:
                kept["count"] += 1
                kept["dt"] = max(kept["dt"], record["dt"])

    def records(self) -> list[dict]:
        with self._lock:
            return [*self._ran, *self._groups.values()]


@dataclass
class Audit:
    """What :func:`audit` found, for the test's own extra assertions."""

    calls: int
    values: int
    errors: Counter[str]
    executions: int
    second_runs: int
    keys: int
    problems: list[str]


def merge(results: Iterable[dict[str, Any]]) -> tuple[list[dict], Counter[str]]:
    """The records of every worker, and the lease losses seen by renewal threads
    (by store key)."""
    records: list[dict] = []
    lost: Counter[str] = Counter()
    for result in results:
        records.extend(result["records"])
        lost.update(result.get("lost_elsewhere", ()))
    return records, lost


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def audit(
    records: list[dict],
    executions: dict[str, int],
    *,
    lost_elsewhere: Counter[str] | None = None,
    allowed_errors: tuple[str, ...] = ("BackendError",),
    extra_runs: dict[str, int] | None = None,
    every_run_recorded: bool = True,
    bound: float = CALL_BOUND,
) -> Audit:
    """Check the DESIGN §3.6 guarantee over a run's call records.

    Per key:

    - every call returned a value or raised one of ``allowed_errors``, within ``bound``;
    - the body ran at most once, plus once more for each run whose result could not be
      stored (``unstored``) or whose claim was taken over (``lease_lost``), plus
      ``extra_runs[key]`` (e.g. bodies a SIGKILLed worker had started);
    - every execution was seen by its caller (``every_run_recorded``: no worker died);
    - at most one execution stored its result, and every duplicate answer is that same
      value: all duplicates agree, and their value is one the body returned.
    """
    lost_elsewhere = lost_elsewhere or Counter()
    extra_runs = extra_runs or {}
    problems: list[str] = []
    errors: Counter[str] = Counter()
    by_key: dict[str, list[dict]] = defaultdict(list)
    store_keys: dict[str, str] = {}
    calls = 0
    for record in records:
        by_key[record["key"]].append(record)
        calls += record.get("count", 1)
        if record.get("store_key"):
            store_keys[record["key"]] = record["store_key"]
        if record["outcome"] != "value":
            errors[record["outcome"]] += record.get("count", 1)
            if record["outcome"] not in allowed_errors:
                problems.append(
                    f"{record['key']}: unexpected {record['outcome']}: {record['message']}"
                )
        if record["dt"] > bound:
            problems.append(f"{record['key']}: a call took {record['dt']:.1f}s (> {bound:g}s)")
    second_runs = 0
    for key in sorted(set(by_key) | set(executions)):
        of_key = by_key.get(key, [])
        ran = [r for r in of_key if r["ran"]]
        runs = executions.get(key, 0)
        lost_here = lost_elsewhere.get(store_keys.get(key, ""), 0)
        retried = sum(1 for r in ran if r["unstored"] or r["lease_lost"]) + lost_here
        second_runs += max(0, runs - 1)
        if every_run_recorded and runs != len(ran):
            problems.append(f"{key}: the body ran {runs} times but {len(ran)} callers ran it")
        if runs > 1 + retried + extra_runs.get(key, 0):
            problems.append(
                f"{key}: DUPLICATE EXECUTION: ran {runs} times; allowed 1 + {retried} "
                f"(unstored or lease lost) + {extra_runs.get(key, 0)} (killed)"
            )
        stored = [
            r for r in ran if r["outcome"] == "value" and not (r["unstored"] or r["lease_lost"])
        ]
        if len(stored) > 1 + lost_here:
            problems.append(f"{key}: {len(stored)} executions stored a result")
        duplicates = {
            _canon(r["value"]) for r in of_key if r["outcome"] == "value" and not r["ran"]
        }
        if len(duplicates) > 1:
            problems.append(f"{key}: LOST RESULT: duplicates got different values {duplicates}")
        if duplicates and every_run_recorded:
            produced = {_canon(r["value"]) for r in ran if r["outcome"] == "value"}
            if not duplicates <= produced:
                problems.append(f"{key}: duplicates got {duplicates}, never returned by a body")
            if len(stored) == 1 and lost_here == 0 and duplicates != {_canon(stored[0]["value"])}:
                problems.append(
                    f"{key}: LOST RESULT: duplicates got {duplicates}, the stored run "
                    f"returned {_canon(stored[0]['value'])}"
                )
    return Audit(
        calls=calls,
        values=sum(r.get("count", 1) for r in records if r["outcome"] == "value"),
        errors=errors,
        executions=sum(executions.values()),
        second_runs=second_runs,
        keys=len(by_key),
        problems=problems,
    )


def assert_clean(result: Audit) -> None:
    """Fail with the first problems the audit found."""
    shown = "\n".join(result.problems[:25])
    more = len(result.problems) - 25
    assert not result.problems, (
        f"{len(result.problems)} problem(s) in {result.calls} calls:\n{shown}"
        + (f"\n... and {more} more" if more > 0 else "")
    )


@contextlib.contextmanager
def listening(kinds: Iterable[EventKind]) -> Iterator[list[idempotask.Event]]:
    """Collect the events of ``kinds`` emitted in this process while the block runs."""
    wanted = set(kinds)
    seen: list[idempotask.Event] = []
    remove = idempotask.add_listener(lambda e: seen.append(e) if e.kind in wanted else None)
    try:
        yield seen
    finally:
        remove()

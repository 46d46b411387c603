"""Dead letters while their store is down: spooled, delivered after it is back, none lost.

4 processes x 3 threads call a ``@dead_letter`` over ``@idempotent`` function that always
fails, each call with arguments of its own (so each failure is one letter), while the
dead-letter store goes down mid-run and comes back. The store is either a private,
persistent ``redis-server`` SIGKILLed and restarted, or a memory store served to every
process by a multiprocessing manager and switched off and on (the spool's own
cross-process protocol is then tested without Redis). Every process shares one spool file.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask import BackendError, DeadLetter, DeadLetterQueue, dead_letter, idempotent
from idempotask.backends.deadletters import DeadLetterStore, dead_letter_store_from_url
from idempotask.backends.memory import MemoryDeadLetterStore
from idempotask.errors import ConfigurationError
from tests.conftest import service_url, unavailable
from tests.faults._support import FORK, Workers, drop_keys, unique, wait_for

pytest.importorskip("redis")

PROCESSES, THREADS = 4, 3
MAX_SECONDS = 60.0  # the parent stops the run long before


class GatewayTimeout(TimeoutError):
    """The failure every call ends with (TRANSIENT: its letter waits for a retry)."""


# ------------------------------------------------------------------ the two stores


class _FlakyMemoryStore(MemoryDeadLetterStore):
    """A memory store whose every operation fails while it is switched off."""

    def __init__(self) -> None:
        super().__init__()
        self._down = False

    def set_down(self, down: bool) -> None:
        self._down = down

    def _check(self) -> None:
        if self._down:
            raise BackendError("dead-letter store unreachable (switched off by the test)")

    def add(self, letter: DeadLetter) -> DeadLetter:
        self._check()
        return super().add(letter)

    def get(self, id: str) -> DeadLetter | None:
        self._check()
        return super().get(id)

    def query(self, *args: Any, **kwargs: Any) -> list[DeadLetter]:
        self._check()
        return super().query(*args, **kwargs)


class _Manager(BaseManager):
    pass


_Manager.register(
    "FlakyStore",
    _FlakyMemoryStore,
    exposed=[
        name
        for name in dir(_FlakyMemoryStore)
        if not name.startswith("_") and name not in ("from_url", "size")
    ],
)


class SharedMemoryStore:
    """One memory store for every process, in a manager process; down means switched off."""

    name = "memory-through-a-manager"

    def __init__(self) -> None:
        self._manager = _Manager(ctx=multiprocessing.get_context("fork"))
        self._manager.start()
        self._proxy = self._manager.FlakyStore()  # type: ignore[attr-defined]

    def open(self) -> DeadLetterStore:
        return self._proxy  # type: ignore[no-any-return]

    def go_down(self) -> None:
        self._proxy.set_down(True)

    def come_back(self) -> None:
        self._proxy.set_down(False)

    def close(self) -> None:
        self._manager.shutdown()


class KilledRedisStore:
    """A private redis-server with an fsync-always append-only file, SIGKILLed and
    restarted in place: it keeps every letter it acknowledged."""

    name = "redis-killed-and-restarted"
    ARGS = ("--maxmemory-policy", "noeviction", "--appendonly", "yes", "--appendfsync", "always")

    def __init__(self) -> None:
        from tests.backends._redis_servers import RedisServer, have_redis_binaries

        if not have_redis_binaries():
            unavailable("redis-server is not on PATH")
        self._cls = RedisServer
        self.server = RedisServer.start(*self.ARGS)
        self._servers = [self.server]
        self.port, self.directory = self.server.port, self.server.directory
        self.url = f"{self.server.url}?prefix={unique('faultdlq')}"
        try:
            dead_letter_store_from_url(self.url)
        except ConfigurationError as exc:
            self.close()
            pytest.fail(f"the Redis dead-letter store cannot be built: {exc}")

    def open(self) -> DeadLetterStore:
        return dead_letter_store_from_url(self.url)

    def go_down(self) -> None:
        self.server.kill()

    def come_back(self) -> None:
        self.server = self._cls.start(*self.ARGS, port=self.port, directory=self.directory)
        self._servers.append(self.server)

    def close(self) -> None:
        for server in self._servers:
            server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


STORES: dict[str, Callable[[], Any]] = {
    "redis": KilledRedisStore,
    "memory": SharedMemoryStore,
}


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = unique("faultdlq")
    yield ns
    drop_keys(service_url("redis"), f"{ns}:*")


@pytest.fixture(params=sorted(STORES))
def dlq_store(request: pytest.FixtureRequest) -> Iterator[Any]:
    store = STORES[request.param]()
    yield store
    store.close()


# ------------------------------------------------------------------ the workers


class _SpoolCounter(logging.Handler):
    """Counts the "spooled" log records of this process: letters that met the outage."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.spooled = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "was spooled" in record.getMessage():
            self.spooled += 1


def _worker(
    idem_url: str, namespace: str, open_store: Callable[[], Any], spool: str, go: Any, stop: Any
) -> dict[str, Any]:
    idempotask.configure(backend=idem_url, namespace=namespace, spool_path=spool)
    queue = DeadLetterQueue(open_store(), spool=spool)
    counter = _SpoolCounter()
    logging.getLogger("idempotask").addHandler(counter)

    @dead_letter(name="faults.dlq.job", queue=queue)
    @idempotent(name="faults.dlq.job", lease=10)
    def job(tag: str) -> None:
        raise GatewayTimeout(tag)

    failed: list[str] = []
    unexpected: list[str] = []
    durations: list[float] = []
    if not go.wait(60):
        raise RuntimeError("the start signal never came")
    stop_at = time.monotonic() + MAX_SECONDS

    def caller(i: int) -> None:
        for n in range(5000):
            if time.monotonic() >= stop_at or stop.is_set():
                return
            tag = f"{os.getpid()}-{i}-{n}"
            started = time.monotonic()
            try:
                job(tag)
            except GatewayTimeout:
                failed.append(tag)
            except Exception as exc:  # e.g. BackendError from the idempotency store
                unexpected.append(f"{tag}: {type(exc).__name__}: {exc}")
            durations.append(time.monotonic() - started)
            time.sleep(0.01)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "failed": failed,
        "unexpected": unexpected,
        "spooled": counter.spooled,
        "max_call": max(durations, default=0.0),
    }


def _all_letters(queue: DeadLetterQueue) -> list[DeadLetter]:
    letters: list[DeadLetter] = []
    for _ in range(1000):  # bounded paging
        page = queue.query(limit=500, offset=len(letters))
        letters.extend(page)
        if len(page) < 500:
            return letters
    raise AssertionError("more letters than the test can have made")


def test_no_dead_letter_is_lost_when_the_store_dies_at_failure_time(
    dlq_store: Any, namespace: str, tmp_path: Path
) -> None:
    """Guarantee (DESIGN §5: "if the store is down it is spooled locally and delivered
    later, never dropped"): the dead-letter store goes down while 12 callers in 4
    processes fail; letters meanwhile go to the shared spool, and once the store is back
    they are delivered. Afterwards the store holds exactly one letter per failed call --
    none lost, none twice -- the spool is empty, nothing was rejected, and no call
    waited past the bound."""
    spool = str(tmp_path / "spool" / "dead-letters.jsonl")
    idem_url = service_url("redis")
    go, stop = FORK.Event(), FORK.Event()
    queue = DeadLetterQueue(dlq_store.open(), spool=spool)
    with Workers(tmp_path / "out") as workers:
        for _ in range(PROCESSES):
            workers.start(_worker, idem_url, namespace, dlq_store.open, spool, go, stop)
        go.set()
        wait_for(lambda: len(_all_letters(queue)) >= 30, 30, "letters to be stored")
        dlq_store.go_down()
        time.sleep(2.0)
        dlq_store.come_back()
        time.sleep(2.0)  # failures keep coming, and deliver the spool
        stop.set()
        workers.join(120)
        results = workers.results()
    assert len(results) == PROCESSES
    unexpected = [u for r in results.values() for u in r["unexpected"]]
    assert not unexpected, unexpected[:10]
    failed = Counter(tag for r in results.values() for tag in r["failed"])
    spooled = sum(r["spooled"] for r in results.values())
    assert spooled > 0, "no letter met the outage"

    # Whatever still waits in the spool is delivered by the next flush (bounded).
    for _ in range(20):
        with contextlib.suppress(BackendError):
            queue.flush_spool()
        if not queue.spool.pending():
            break
        time.sleep(0.5)
    assert not queue.spool.pending(), "letters stayed in the spool"
    assert not Path(spool + ".rejected").exists()

    letters = _all_letters(queue)
    stored = Counter(letter.message for letter in letters)
    assert len({letter.id for letter in letters}) == len(letters)
    missing = sorted(set(failed) - set(stored))
    extra = sorted(set(stored) - set(failed))
    twice = sorted(tag for tag, n in stored.items() if n > 1)
    assert not missing, f"{len(missing)} LOST dead letters, e.g. {missing[:5]}"
    assert not extra, f"letters for calls that did not fail: {extra[:5]}"
    assert not twice, f"calls with more than one letter: {twice[:5]}"
    assert stored == failed
    assert {letter.function for letter in letters} == {"faults.dlq.job"}
    assert max(r["max_call"] for r in results.values()) < 30
    print(
        f"{dlq_store.name}: {sum(failed.values())} failures, {len(letters)} letters, "
        f"{spooled} spooled during the outage"
    )

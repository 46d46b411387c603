"""Where dead letters go (issue 13 §3): the default queue is the backend's
``dead_letter_store(namespace=...)``, so apps sharing a server keep their own letters;
a missing driver names the extra to install; a missing table is said, not retried
silently."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask import DeadLetter, DeadLetterQueue, dead_letter
from idempotask.backends.base import Backend, DeadLetterFilter
from idempotask.backends.memory import MemoryBackend, MemoryBreakerStore, MemoryDeadLetterStore
from idempotask.errors import ConfigurationError, MissingTableError
from tests._deadletter_support import skip_unless_keeps_history, skip_unless_namespaced
from tests.conftest import service_url

pytestmark = pytest.mark.filterwarnings("ignore::idempotask.deadletter.KeepsAllArgumentsWarning")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDEMPOTASK_SPOOL", str(tmp_path / "spool"))


class NamespacedMemory(MemoryBackend):
    """A memory backend offering ProvidesStores: one dead-letter store per namespace."""

    def __init__(self) -> None:
        super().__init__()
        self.letters: dict[str, MemoryDeadLetterStore] = {}

    def dead_letter_store(self, *, namespace: str = "idempotask") -> MemoryDeadLetterStore:
        return self.letters.setdefault(namespace, MemoryDeadLetterStore())

    def breaker_store(self, *, namespace: str = "idempotask") -> MemoryBreakerStore:
        return MemoryBreakerStore()


class RecordsOnly:
    """A third-party idempotency store that keeps no dead letters (no ProvidesStores)."""

    def __init__(self) -> None:
        self._inner = MemoryBackend()

    def __getattr__(self, name: str) -> Any:
        if name in ("dead_letter_store", "breaker_store"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def fail_once(namespace: str) -> DeadLetter:
    idempotask.configure(namespace=namespace)

    @dead_letter(name=f"tests.ns.{uuid.uuid4().hex[:8]}", swallow=True)
    def job(n: int) -> None:
        raise TimeoutError(f"{namespace} failed")

    job(1)
    (letter,) = idempotask.default_queue().query(function=job.dead_letter_name)
    return letter


def test_each_namespace_gets_the_backends_own_queue() -> None:
    backend = NamespacedMemory()
    idempotask.configure(backend=backend)
    a = fail_once("app-a")
    b = fail_once("app-b")
    assert [x.id for x in backend.letters["app-a"].query()] == [a.id]
    assert [x.id for x in backend.letters["app-b"].query()] == [b.id]
    idempotask.configure(namespace="app-a")
    assert idempotask.default_queue().store is backend.letters["app-a"]
    # app A's processor never claims app B's letters
    report = idempotask.default_queue().process_due(now=a.last_failed_at + 10**7)
    assert {r.id for r in report.results} == {a.id}


def test_a_backend_that_keeps_no_dead_letters_is_a_clear_error() -> None:
    backend = RecordsOnly()
    assert isinstance(backend, Backend)
    idempotask.configure(backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"dead_letter_store\(\)"):
        idempotask.config.get_dead_letter_store()
    idempotask.configure(dead_letter_store="memory://")
    assert isinstance(idempotask.config.get_dead_letter_store(), MemoryDeadLetterStore)


def test_two_apps_on_one_redis_keep_separate_dead_letter_queues() -> None:
    """The bug of issue 13: app A's process_due() claimed app B's letters."""
    url = service_url("redis")
    pytest.importorskip("redis")
    from idempotask.backends.redis import RedisBackend

    skip_unless_namespaced(RedisBackend)
    run = uuid.uuid4().hex[:8]
    idempotask.configure(backend=url)
    skip_unless_keeps_history(idempotask.default_queue().store)
    try:
        a = fail_once(f"appa{run}")
        b = fail_once(f"appb{run}")
        idempotask.configure(namespace=f"appa{run}")
        assert [x.id for x in idempotask.default_queue().query()] == [a.id]
        report = idempotask.default_queue().process_due(now=a.last_failed_at + 10**7)
        assert {r.id for r in report.results} == {a.id}
        idempotask.configure(namespace=f"appb{run}")
        assert [x.id for x in idempotask.default_queue().query()] == [b.id]
    finally:
        for namespace in (f"appa{run}", f"appb{run}"):
            idempotask.configure(namespace=namespace)
            idempotask.default_queue().store.purge(DeadLetterFilter())


def test_a_url_that_names_its_queue_is_built_as_it_says() -> None:
    url = service_url("redis")
    pytest.importorskip("redis")
    prefix = f"named{uuid.uuid4().hex[:8]}"
    idempotask.configure(namespace="whatever")
    store = DeadLetterQueue(f"{url}?prefix={prefix}").store
    assert getattr(store, "prefix", None) == prefix


# -- missing drivers ---------------------------------------------------------------------

BLOCKER = """
import sys

class Blocker:
    '''Acts as if these distributions were not installed.'''

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
for loaded in [m for m in sys.modules if m.split(".")[0] in {blocked!r}]:
    del sys.modules[loaded]
"""


def run_without(blocked: set[str], code: str) -> subprocess.CompletedProcess[str]:
    script = BLOCKER.format(blocked=blocked) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_redis_dead_letter_url_without_redis_names_the_extra() -> None:
    done = run_without(
        {"redis"},
        """
        from idempotask import DeadLetterQueue, MissingDependencyError
        try:
            DeadLetterQueue("redis://127.0.0.1:6379/0").store
        except MissingDependencyError as exc:
            print("hint:", exc)
        """,
    )
    assert "hint:" in done.stdout, done.stderr
    assert "pip install 'idempotask[redis]'" in done.stdout


def test_a_postgresql_url_on_a_bare_install_names_the_postgresql_extra_at_once() -> None:
    done = run_without(
        {"sqlalchemy", "psycopg", "psycopg2"},
        """
        from idempotask import DeadLetterQueue, MissingDependencyError, configure, get_backend

        def backend():
            configure(backend="postgresql://u@h/db")
            return get_backend()

        for build in (lambda: DeadLetterQueue("postgresql+psycopg://u@h/db").store, backend):
            try:
                build()
            except MissingDependencyError as exc:
                print("hint:", exc)
        """,
    )
    hints = [line for line in done.stdout.splitlines() if line.startswith("hint:")]
    assert len(hints) == 2, done.stdout + done.stderr
    assert all("pip install 'idempotask[postgresql]'" in h for h in hints)


def test_dlq_list_without_redis_prints_the_hint_not_a_traceback() -> None:
    done = run_without(
        {"redis"},
        """
        import sys
        from idempotask.cli import main
        sys.exit(main(["--url", "redis://127.0.0.1:6379/0", "dlq", "list"]))
        """,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "pip install 'idempotask[redis]'" in done.stderr
    assert "Traceback" not in done.stderr


# -- a missing table -----------------------------------------------------------------------


class NoTableStore(MemoryDeadLetterStore):
    """A dead-letter store whose table was never created."""

    def add(self, letter: DeadLetter) -> DeadLetter:
        raise MissingTableError(
            "table 'idempotask_dead_letters' does not exist: create it with "
            "`idempotask db create --url ...`",
            table="idempotask_dead_letters",
        )


def test_a_missing_table_spools_the_letter_and_logs_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    queue = DeadLetterQueue(NoTableStore(), spool=tmp_path / "q.jsonl")

    @dead_letter(queue=queue)
    def job(n: int) -> None:
        raise TimeoutError("x")

    with caplog.at_level(logging.ERROR, logger="idempotask"), pytest.raises(TimeoutError):
        job(1)
    assert [x.function for x in queue.spool.letters()] == [job.dead_letter_name]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        "no table 'idempotask_dead_letters'" in m and "idempotask db create" in m for m in errors
    ), errors

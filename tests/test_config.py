"""Configuration, the backend registry, and import hygiene."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

import idempotask
from idempotask import ConfigurationError, MissingDependencyError, idempotent
from idempotask.backends import backend_from_url, register_scheme
from idempotask.backends.memory import MemoryBackend


def test_importing_idempotask_imports_only_the_standard_library() -> None:
    script = textwrap.dedent(
        """
        import sys
        before = set(sys.modules)
        import idempotask
        from idempotask import idempotent, configure
        new = {m.split('.')[0] for m in set(sys.modules) - before}
        stdlib = set(sys.stdlib_module_names)
        # _sysconfigdata_* is the interpreter's own build data, not a package
        third_party = [m for m in new if m not in stdlib and m != 'idempotask'
                       and not m.startswith('_sysconfigdata')]
        print(sorted(third_party))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_the_default_store_is_memory_or_idempotask_url(monkeypatch: pytest.MonkeyPatch) -> None:
    idempotask.config.reset()
    assert isinstance(idempotask.get_backend(), MemoryBackend)
    idempotask.config.reset()
    monkeypatch.setenv("IDEMPOTASK_URL", "memory://?max_entries=10")
    backend = idempotask.get_backend()
    assert isinstance(backend, MemoryBackend)


def test_an_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        backend_from_url("mongodb://localhost/x")
    message = str(info.value)
    assert "'mongodb'" in message
    assert "redis" in message
    assert "memory" in message
    assert "idempotask.backends" in message


def test_a_missing_driver_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate an environment without redis-py by hiding it from the import system."""
    monkeypatch.setitem(sys.modules, "redis", None)
    for name in [m for m in sys.modules if m.startswith("idempotask.backends.redis")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(MissingDependencyError, match=r"pip install 'idempotask\[redis\]'"):
        backend_from_url("redis://localhost:6379/0")


def test_third_party_schemes_can_be_registered() -> None:
    made: list[str] = []

    def factory(url: str) -> MemoryBackend:
        made.append(url)
        return MemoryBackend()

    register_scheme("mystore", factory)
    idempotask.configure(backend="mystore://somewhere")

    @idempotent
    def job() -> int:
        return 1

    assert job() == 1
    assert made == ["mystore://somewhere"]


def test_a_bad_scheme_name_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="scheme"):
        register_scheme("no spaces", lambda url: MemoryBackend())


def test_a_per_function_backend_url_is_built_once() -> None:
    @idempotent(backend="memory://")
    def job(x: int) -> int:
        return x

    job(1)
    job(1)
    assert job.__idempotask_spec__.backend().get(job.key_for(1)) is not None  # type: ignore[attr-defined]


def _child_runs_a_long_call(queue: Any) -> None:
    # In a forked child the parent's renewal thread does not exist; a fresh one must
    # start, or this 0.3 s lease would run out during the 0.8 s body.
    idempotask.configure(backend=MemoryBackend())

    @idempotent(lease=0.3, name="tests.fork.child")
    def long_job() -> bool:
        time.sleep(0.8)
        return idempotask.lease_held()

    queue.put(long_job())


def test_lease_renewal_works_in_a_forked_child() -> None:
    # Start the parent's renewal thread first, so the child inherits a stale one.
    @idempotent(lease=0.3, name="tests.fork.parent")
    def parent_job() -> bool:
        time.sleep(0.2)
        return True

    assert parent_job()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_runs_a_long_call, args=(queue,))
    child.start()
    held = queue.get(timeout=20)
    child.join(20)
    assert held is True
    assert child.exitcode == 0


def test_backend_url_errors_never_echo_credentials() -> None:
    with pytest.raises(ConfigurationError) as info:
        backend_from_url("mongodb://admin:hunter2@db/x")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        idempotask.configure(backend="admin:hunter2@localhost:6379")
    assert "hunter2" not in str(info.value)


# ---------------------------------------------------------------------------- durations


def test_durations_may_be_timedeltas_in_configure() -> None:
    """configure(default_ttl=timedelta(...)) and friends store seconds."""
    from datetime import timedelta

    s = idempotask.configure(
        default_ttl=timedelta(hours=1),
        default_lease=timedelta(seconds=90),
        wait_timeout=timedelta(0),
        dead_letter_retention=timedelta(days=7),
    )
    assert (s.default_ttl, s.default_lease, s.wait_timeout) == (3600.0, 90.0, 0.0)
    assert s.dead_letter_retention == 7 * 86400.0


def test_durations_may_be_timedeltas_on_the_decorator() -> None:
    """@idempotent(ttl=timedelta(hours=1)) works as ttl=3600, for every duration option."""
    from datetime import timedelta

    @idempotent(
        ttl=timedelta(hours=1),
        lease=timedelta(seconds=30),
        wait_timeout=timedelta(seconds=5),
        cache_errors=timedelta(minutes=2),
    )
    def job(n: int) -> int:
        return n

    o = job.idempotency
    assert (o.ttl, o.lease, o.wait_timeout, o.cache_errors) == (3600.0, 30.0, 5.0, 120.0)
    assert job(3) == 3


@pytest.mark.parametrize("option", ["ttl", "lease", "cache_errors"])
def test_a_zero_or_negative_timedelta_is_refused_naming_the_option(option: str) -> None:
    from datetime import timedelta

    def job() -> None:
        return None

    for bad in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(ConfigurationError, match=f"^{option}: "):
            idempotent(**{option: bad})(job)
    with pytest.raises(ConfigurationError, match=r"^default_ttl: "):
        idempotask.configure(default_ttl=timedelta(seconds=-5))
    with pytest.raises(ConfigurationError, match=r"^wait_timeout: .*timedelta"):
        idempotask.configure(wait_timeout="5s")  # type: ignore[arg-type]

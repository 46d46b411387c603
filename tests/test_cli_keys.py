"""``idempotask keys list`` and ``keys compute``, and what ``keys show`` prints from a store.

These run the command in this process (``idempotask.cli.main``) on a store configured
here, so a record written through the public API is what the command reads.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import idempotask
from idempotask.backends.base import Record, SupportsExpireNow
from idempotask.backends.memory import MemoryBackend
from idempotask.cli import main
from tests.conftest import service_url


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*argv: str, code: int = 0) -> Result:
        got = main(list(argv))
        captured = capsys.readouterr()
        assert got == code, f"exit {got}, expected {code}\nout: {captured.out}\nerr: {captured.err}"
        return Result(got, captured.out, captured.err)

    return run


class ScanningStore(MemoryBackend):
    """The memory store with the SupportsScan power, for the listing tests: it remembers
    the keys claimed through it and lists those still live."""

    def __init__(self) -> None:
        super().__init__()
        self.claimed: set[str] = set()

    def claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        self.claimed.add(key)
        return super().claim(key, token, lease=lease, owner=owner, fingerprint=fingerprint)

    def scan(self, prefix: str, *, limit: int = 100) -> list[Record]:
        found = (self.get(k) for k in sorted(self.claimed) if k.startswith(prefix))
        return [r for r in found if r is not None][:limit]

    async def ascan(self, prefix: str, *, limit: int = 100) -> list[Record]:
        return self.scan(prefix, limit=limit)


MODULE_SOURCE = """
import datetime
from idempotask import idempotent

@idempotent(name="{name}")
def autoclose(job_id: int, day: datetime.date, mode: str = "auto", *tags: str) -> str:
    return f"closed {{job_id}}"
"""


@pytest.fixture
def jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """A module of the test's own defining ``autoclose`` under a unique name."""
    module = f"clikeys_{uuid.uuid4().hex[:10]}"
    name = f"{module}.autoclose"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(MODULE_SOURCE.format(name=name)))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = importlib.import_module(module)
    loaded.NAME = name  # type: ignore[attr-defined]
    yield loaded
    sys.modules.pop(module, None)


def test_compute_gives_the_key_key_for_gives_from_json_arguments(run: Any, jobs: Any) -> None:
    import datetime

    day = datetime.date(2026, 1, 2)
    expected = jobs.autoclose.key_for(7, day)
    typed = '{"job_id": 7, "day": {"$t": "date", "v": "2026-01-02"}}'
    out = run("--import", jobs.__name__, "keys", "compute", jobs.NAME, typed).out
    assert out.strip() == f"key: {expected}"
    data = run("keys", "compute", jobs.NAME, typed, "--json").json()
    assert data == {"key": expected, "redis_key": None}
    with_tags = '{"job_id": 7, "day": {"$t": "date", "v": "2026-01-02"}, "tags": ["a", "b"]}'
    assert run("keys", "compute", jobs.NAME, with_tags, "--json").json()["key"] == (
        jobs.autoclose.key_for(7, day, "auto", "a", "b")
    )


def test_compute_explains_what_it_needs(run: Any, jobs: Any) -> None:
    missing = run("keys", "compute", "nobody.defines.this", '{"a": 1}', code=1)
    assert "--import" in missing.err
    assert "import the module" in missing.err
    assert "JSON" in run("keys", "compute", jobs.NAME, "{not json", code=2).err
    assert "object" in run("keys", "compute", jobs.NAME, "[1, 2]", code=2).err
    incomplete = run("keys", "compute", jobs.NAME, '{"job_id": 7}', code=1)
    assert "missing a required argument: 'day'" in incomplete.err
    unknown = run("keys", "compute", jobs.NAME, '{"job_id": 7, "dya": 1}', code=1)
    assert "'dya'" in unknown.err
    assert "NAME:" in run("keys", "compute", "bad name", code=2).err


def test_compute_an_explicit_key_needs_no_import_and_matches_key_for_explicit(
    run: Any, jobs: Any
) -> None:
    out = run("keys", "compute", jobs.NAME, "--explicit", "Idem-7", "--json").json()
    assert out["key"] == jobs.autoclose.key_for_explicit("Idem-7")
    assert "not both" in run("keys", "compute", jobs.NAME, "{}", "--explicit", "Idem-7", code=2).err


def test_compute_on_redis_also_shows_the_redis_key(run: Any, jobs: Any) -> None:
    pytest.importorskip("redis")
    from idempotask.backends.redis import record_key

    data = run(
        "--url", "redis://127.0.0.1:1/0", "keys", "compute", jobs.NAME, "--explicit", "h", "--json"
    ).json()
    assert data["redis_key"] == record_key(data["key"])
    assert data["redis_key"].count("{") == 1


def test_list_shows_a_functions_live_records_bounded(run: Any, jobs: Any) -> None:
    import datetime

    idempotask.configure(backend=ScanningStore())
    day = datetime.date(2026, 1, 2)
    for job in range(3):
        jobs.autoclose(job, day)
    text = run("keys", "list", jobs.NAME).out
    for job in range(3):
        assert jobs.autoclose.key_for(job, day) in text
    assert "completed" in text
    assert "3 records" in text
    data = run("keys", "list", jobs.NAME, "--limit", "2", "--json").json()
    assert len(data["records"]) == 2
    assert data["more"] is True
    assert {r["state"] for r in data["records"]} == {"completed"}
    assert "there are more" in run("keys", "list", jobs.NAME, "--limit", "2").out
    assert "no live records" in run("keys", "list", "nothing.here").out
    assert "at most 10000" in run("keys", "list", jobs.NAME, "--limit", "10001", code=2).err


class _StoreWithoutScan:
    """A third-party store: the six operations, without the optional scan power."""

    def __init__(self) -> None:
        self._inner = MemoryBackend()

    def __getattr__(self, name: str) -> Any:
        if name in ("scan", "ascan"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_list_on_a_store_without_scan_says_so(run: Any, jobs: Any) -> None:
    idempotask.configure(backend=_StoreWithoutScan())
    result = run("keys", "list", jobs.NAME, code=1)
    assert "scan(" in result.err
    assert "cannot list its keys" in result.err


def test_control_characters_from_the_store_are_escaped(run: Any) -> None:
    """An owner or a cached error message could carry ESC/OSC sequences meant for the
    operator's terminal; they are printed escaped."""
    store = ScanningStore()
    idempotask.configure(backend=store, namespace="esc")
    hostile = "task\x1b]0;owned\x07\x1b[2J\r\u202e"
    store.claim("esc:demo.esc:v1:" + "0" * 32, "tok\x1b", lease=60, owner=hostile)

    @idempotask.idempotent(name="demo.esc.err", cache_errors=60)
    def fails() -> None:
        raise ValueError("bad\x1b[31m red\r")

    with pytest.raises(ValueError):
        fails()
    outputs = [
        run("keys", "show", "esc:demo.esc:v1:" + "0" * 32).out,
        run("keys", "list", "demo.esc").out,
        run("keys", "show", fails.key_for()).out,
        run("keys", "forget", "esc:demo.esc:v1:" + "0" * 32, code=1).err,
    ]
    for text in outputs:
        assert "\x1b" not in text
        assert "\r" not in text
        assert "\u202e" not in text
    assert "\\x1b]0;owned\\x07" in outputs[0]
    assert "\\x1b[31m red\\r" in outputs[2]


@pytest.mark.parametrize("store", ["redis", "sqlite"])
def test_list_on_the_real_stores(run: Any, jobs: Any, store: str, tmp_path: Path) -> None:
    """Runs once the store offers scan() (the store helpers add it); skipped before."""
    import datetime

    from idempotask.backends import backend_from_url
    from idempotask.backends.base import SupportsScan

    if store == "redis":
        pytest.importorskip("redis")
        url = service_url("redis")
    else:
        pytest.importorskip("sqlalchemy")
        url = f"sqlite:///{tmp_path / 'keys.db'}"
    backend = backend_from_url(url)
    assert isinstance(backend, SupportsScan), f"{type(backend).__name__} offers no scan()"
    create = getattr(backend, "create_tables", None)
    if create is not None:
        create()
    idempotask.configure(backend=backend, namespace=f"list{uuid.uuid4().hex[:10]}")
    day = datetime.date(2026, 1, 2)
    jobs.autoclose(1, day)
    jobs.autoclose(2, day)
    data = run("keys", "list", jobs.NAME, "--json").json()
    assert sorted(r["key"] for r in data["records"]) == sorted(
        [jobs.autoclose.key_for(1, day), jobs.autoclose.key_for(2, day)]
    )


def test_show_on_redis_prints_the_redis_key_beside_the_key(run: Any, jobs: Any) -> None:
    """key_for() is what `keys show` takes; on Redis the record's own key is shown too."""
    import datetime

    pytest.importorskip("redis")
    url = service_url("redis")
    from idempotask.backends.redis import record_key

    idempotask.configure(backend=url, namespace=f"show{uuid.uuid4().hex[:10]}")
    day = datetime.date(2026, 1, 2)
    jobs.autoclose(4, day)
    key = jobs.autoclose.key_for(4, day)
    try:
        text = run("--url", url, "keys", "show", key).out
        assert f"key:         {key}\n" in text
        assert f"redis key:   {record_key(key)}\n" in text
    finally:
        jobs.autoclose.forget(4, day)


def test_purge_deletes_expired_records_from_a_sql_store(run: Any, tmp_path: Path) -> None:
    """`keys purge` deletes the expired records of a SQL store and keeps the live ones."""
    url = f"sqlite:///{tmp_path / 'purge.sqlite3'}?create_tables=true"
    idempotask.configure(backend=url)
    backend = idempotask.config.get_backend()
    for key in ("ns:f:v1:old1", "ns:f:v1:old2", "ns:f:v1:live"):
        backend.claim(key, "token", lease=60)
    assert isinstance(backend, SupportsExpireNow)
    backend.expire_now("ns:f:v1:old1")
    backend.expire_now("ns:f:v1:old2")
    assert run("--url", url, "keys", "purge", "--batch", "1", "--json").json() == {
        "deleted": 2,
        "purges": True,
    }
    assert backend.get("ns:f:v1:live") is not None
    out = run("--url", url, "keys", "purge").out
    assert out.startswith("deleted 0 expired records from the idempotency store at sqlite:///")


def test_purge_on_a_store_that_expires_records_itself_deletes_nothing(run: Any) -> None:
    out = run("--url", "memory://", "keys", "purge").out
    assert out.startswith("nothing to purge: the idempotency store at memory:// expires")
    run("keys", "purge", "--batch", "0", code=2)

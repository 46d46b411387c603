"""``idempotask db create``: every table the configured SQL stores need, in one command;
and a missing table is reported as such (with that command), never as an outage."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from idempotask.backends.sql import SQLAlchemyBackend
from idempotask.cli import main
from tests.conftest import service_url


@pytest.fixture(autouse=True)
def _no_store_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("IDEMPOTASK_URL", "IDEMPOTASK_DEAD_LETTER_URL"):
        monkeypatch.delenv(name, raising=False)


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_db_create_makes_the_records_dead_letter_and_breaker_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a fresh SQLite file, `db create` creates the three tables, says so, and can run
    again; afterwards the dead letters and breakers of the quick start work."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    assert main(["--url", url, "db", "create"]) == 0
    out = capsys.readouterr().out
    assert "idempotask_records, idempotask_dead_letters, idempotask_breakers ready" in out
    assert _tables(url) >= {"idempotask_records", "idempotask_dead_letters", "idempotask_breakers"}
    assert main(["--url", url, "--json", "db", "create"]) == 0
    created = json.loads(capsys.readouterr().out)["created"]
    assert created[0]["tables"] == [
        "idempotask_records",
        "idempotask_dead_letters",
        "idempotask_breakers",
    ]
    backend = SQLAlchemyBackend(url)
    assert backend.dead_letter_store().query() == []
    assert backend.breaker_store().states() == {}
    backend.close()


@pytest.mark.parametrize("service", ["postgres", "mysql"])
def test_db_create_on_a_server_names_tables_from_the_url(
    service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """On PostgreSQL and MariaDB, with the tables named in the URL (as a shared server
    needs), `db create` creates exactly those three."""
    prefix = f"idem_cli_{uuid.uuid4().hex[:8]}"
    base = service_url(service)
    names = {"table": prefix, "dead_letter_table": f"{prefix}_dl", "breaker_table": f"{prefix}_br"}
    url = base + ("&" if "?" in base else "?") + "&".join(f"{k}={v}" for k, v in names.items())
    try:
        assert main(["--url", url, "db", "create"]) == 0
        assert f"{prefix}, {prefix}_dl, {prefix}_br ready" in capsys.readouterr().out
        assert {prefix, f"{prefix}_dl", f"{prefix}_br"} <= _tables(base)
    finally:
        backend = SQLAlchemyBackend(url)
        backend.drop_tables()
        backend.dead_letter_store().drop_tables()
        backend.breaker_store().drop_tables()
        backend.close()


def test_db_create_on_stores_without_tables_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """memory:// (or Redis) keeps no tables: nothing to create, exit 0."""
    assert main(["--url", "memory://", "db", "create"]) == 0
    assert "nothing to create" in capsys.readouterr().out


def test_a_missing_table_is_not_reported_as_an_unreachable_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression (issue 13 §3): `dlq list` and `keys show` on a database without the
    tables exit 1 (not 3, "unreachable") with the table's name and `idempotask db
    create` in the message."""
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["--url", url, "dlq", "list"]) == 1
    err = capsys.readouterr().err
    assert "'idempotask_dead_letters' does not exist" in err
    assert "idempotask db create --url" in err
    assert "cannot reach" not in err
    assert main(["--url", url, "keys", "show", "idempotask:f:v1:ab"]) == 1
    err = capsys.readouterr().err
    assert "'idempotask_records' does not exist" in err
    assert main(["--url", url, "db", "create"]) == 0
    capsys.readouterr()
    assert main(["--url", url, "dlq", "list"]) == 0

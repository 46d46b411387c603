"""The IDEMPOTASK setting: validated by system checks in a real project
(``manage.py check`` names the key and the check id), applied at startup (the
configured store becomes the default one), migrations applied and reversed on
PostgreSQL and SQLite; and the validation itself, in this process.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask.errors import ConfigurationError
from tests.conftest import service_url
from tests.django._project import base_settings, run, write_project
from tests.django._support import RUN, fresh_pg_database

pytest.importorskip("django")


def sqlite_databases(root: Path) -> dict[str, Any]:
    return {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(root / "db.sqlite3")}}


def project(tmp_path: Path, **settings: Any) -> Path:
    return write_project(tmp_path / "site", base_settings(sqlite_databases(tmp_path), **settings))


# -- system checks in a real project --------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "check_id", "names"),
    [
        (["backend", "default"], "idempotask.E001", "IDEMPOTASK must be a dict"),
        ({"namepsace": "shop"}, "idempotask.E002", "Did you mean 'namespace'?"),
        ({"default_ttl": -5}, "idempotask.E003", "IDEMPOTASK['default_ttl']"),
        ({"on_backend_error": "ignore"}, "idempotask.E003", "IDEMPOTASK['on_backend_error']"),
        ({"backend": "replica"}, "idempotask.E004", "neither a URL nor an alias"),
        ({"backend": "nosuch://x"}, "idempotask.E003", "IDEMPOTASK['backend']"),
        ({"dead_letter_store": "replica"}, "idempotask.E004", "IDEMPOTASK['dead_letter_store']"),
    ],
)
def test_manage_py_check_names_the_wrong_setting(
    tmp_path: Path, setting: Any, check_id: str, names: str
) -> None:
    root = project(tmp_path, IDEMPOTASK=setting)
    done = run(root, "manage.py", "check")
    assert done.returncode != 0
    assert check_id in done.stderr
    assert names in done.stderr


def test_a_valid_setting_passes_the_checks_and_configures_the_store(tmp_path: Path) -> None:
    setting = {"backend": "default", "namespace": "shop", "default_ttl": 600}
    root = project(tmp_path, IDEMPOTASK=setting)
    assert run(root, "manage.py", "check").returncode == 0
    script = (
        "import django, json; django.setup();"
        "from idempotask import config;"
        "print(json.dumps([repr(config.get_backend()), config.settings().namespace,"
        " config.settings().default_ttl, repr(config.get_dead_letter_store())]))"
    )
    done = run(root, "-c", script)
    assert done.returncode == 0, done.stderr
    backend, namespace, ttl, letters = json.loads(done.stdout)
    assert backend == "DjangoBackend('default', table='idempotask_records')"
    assert (namespace, ttl) == ("shop", 600.0)
    assert letters.startswith("DjangoDeadLetterStore('django:default'")
    assert "namespace='shop'" in letters


def test_an_invalid_setting_fails_closed_at_the_first_call(tmp_path: Path) -> None:
    """A worker started with a typo does not deduplicate in its own memory: every call
    raises, naming the problem."""
    root = project(tmp_path, IDEMPOTASK={"default_ttl": "1h"})
    script = (
        "import django; django.setup();"
        "from idempotask import idempotent\n"
        "@idempotent(name='x')\n"
        "def f(): return 1\n"
        "f()"
    )
    done = run(root, "-c", script)
    assert done.returncode != 0
    assert "ConfigurationError" in done.stderr
    assert "idempotask.E003" in done.stderr


def test_check_database_warns_while_the_tables_are_missing(tmp_path: Path) -> None:
    root = project(tmp_path, IDEMPOTASK={"namespace": "shop"})
    before = run(root, "manage.py", "check", "--database", "default")
    assert before.returncode == 0, before.stderr
    assert "idempotask.W001" in before.stderr
    assert "migrate idempotask --database default" in before.stderr
    assert run(root, "manage.py", "migrate", "idempotask").returncode == 0
    after = run(root, "manage.py", "check", "--database", "default")
    assert "idempotask.W001" not in after.stderr + after.stdout


# -- migrations -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "pg"])
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    if request.param == "sqlite":
        yield sqlite_databases(tmp_path)
        return
    url = service_url("postgres")
    with fresh_pg_database(url, f"idempotask_djm_{RUN}_{uuid.uuid4().hex[:6]}") as params:
        yield {"default": {"ENGINE": "django.db.backends.postgresql", **params}}


def tables(databases: dict[str, Any]) -> set[str]:
    db = databases["default"]
    if db["ENGINE"].endswith("sqlite3"):
        with sqlite3.connect(db["NAME"]) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    else:
        import psycopg

        with psycopg.connect(
            host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"]
        ) as conn:
            rows = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            ).fetchall()
    return {name for (name,) in rows if name.startswith("idempotask_")}


def test_migrations_apply_and_reverse(tmp_path: Path, databases: dict[str, Any]) -> None:
    root = write_project(tmp_path / "site", base_settings(databases))
    done = run(root, "manage.py", "migrate", "idempotask")
    assert done.returncode == 0, done.stderr
    assert tables(databases) == {
        "idempotask_records",
        "idempotask_dead_letters",
        "idempotask_breakers",
    }
    # The models and the migration agree: nothing for makemigrations to write.
    done = run(root, "manage.py", "makemigrations", "idempotask", "--check", "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    done = run(root, "manage.py", "migrate", "idempotask", "zero")
    assert done.returncode == 0, done.stderr
    assert tables(databases) == set()


def test_sqlmigrate_shows_the_sql_stores_ddl(tmp_path: Path) -> None:
    root = project(tmp_path)
    done = run(root, "manage.py", "sqlmigrate", "idempotask", "0001")
    assert done.returncode == 0, done.stderr
    assert "CREATE INDEX ix_idempotask_dead_letters_last_failed_at" in done.stdout
    assert "last_failed_at DESC" in done.stdout


# -- the validation, in this process -------------------------------------------------------


def test_validate_turns_an_alias_into_the_django_store(django_aliases: list[str]) -> None:
    from idempotask.django import DjangoBackend, DjangoDeadLetterStore
    from idempotask.django.settings import validate

    resolved, problems = validate(
        {"namespace": "shop", "dead_letter_store": "default", "sqlite_transactions": True}
    )
    assert problems == []
    backend = resolved.options["backend"]
    assert isinstance(backend, DjangoBackend)
    assert backend.sqlite_transactions is True
    letters = resolved.options["dead_letter_store"]
    assert isinstance(letters, DjangoDeadLetterStore)
    assert letters.namespace == "shop"


def test_validate_accepts_urls_paths_and_import_strings(django_aliases: list[str]) -> None:
    from idempotask.django.settings import validate

    resolved, problems = validate(
        {
            "backend": "memory://",
            "dead_letter_store": "memory://",
            "spool_path": Path("/tmp/x.jsonl"),
            "on_alert": "logging.getLogger",
            "wait_timeout": 0,
        }
    )
    assert problems == []
    assert resolved.options["backend"] == "memory://"
    assert resolved.options["spool_path"] == Path("/tmp/x.jsonl")


def test_the_misconfigured_backend_refuses_every_call(django_aliases: list[str]) -> None:
    from idempotask.django.settings import Misconfigured, validate

    _, problems = validate({"ttl": 5})
    assert [p.id for p in problems] == ["idempotask.E002"]
    idempotask.configure(backend=Misconfigured(problems))  # type: ignore[arg-type]

    @idempotask.idempotent(name=f"m.{uuid.uuid4().hex[:6]}")
    def f() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="IDEMPOTASK setting is invalid"):
        f()


_AUTH = "django.contrib.auth.middleware.AuthenticationMiddleware"
_KEYS = "idempotask.http.django.IdempotencyMiddleware"
_SESSIONS = "django.contrib.sessions.middleware.SessionMiddleware"


@pytest.mark.parametrize(
    ("middleware", "warned"),
    [
        ([_SESSIONS, _KEYS, _AUTH], True),  # before authentication: every user shares keys
        ([_SESSIONS, _AUTH, _KEYS], False),
        ([_SESSIONS, _AUTH], False),  # not used
        ([_SESSIONS, _KEYS], False),  # no authentication at all: scope= is the answer
    ],
)
def test_the_idempotency_middleware_before_authentication_is_warned_about(
    django_aliases: list[str], middleware: list[str], warned: bool
) -> None:
    """request.user does not exist yet when the middleware runs before Django's
    AuthenticationMiddleware: every user would silently share one key space."""
    from django.core import checks
    from django.test import override_settings

    with override_settings(MIDDLEWARE=middleware):
        found = [m for m in checks.run_checks() if m.id == "idempotask.W002"]
    if not warned:
        assert found == []
        return
    (message,) = found
    assert message.level == checks.WARNING
    assert _KEYS in message.msg
    assert _AUTH in message.msg
    assert "after" in message.hint
    assert message.hint == f"Put {_KEYS!r} after {_AUTH!r} in MIDDLEWARE."

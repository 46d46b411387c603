"""Django for the tests in this directory: settings configured once per process (see
:mod:`tests.django._support`), the app's migrations applied to every alias, and a
fixture per database.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import service_url
from tests.django._support import (
    RUN,
    Scratch,
    fresh_mysql_database,
    fresh_pg_database,
    settings_for,
    sqlite_wal,
)

pytest.importorskip("django")

_stack = contextlib.ExitStack()
_aliases: list[str] = []


@pytest.fixture(scope="session")
def django_aliases() -> Iterator[list[str]]:
    """Configure Django (SQLite as ``default``, PostgreSQL as ``pg`` when reachable),
    migrate the ``idempotask`` app on each, and drop the PostgreSQL database at the end."""
    import django
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections

    if settings.configured:
        if "idempotask.django" not in settings.INSTALLED_APPS:
            pytest.skip("Django was configured by another test module in this process")
        yield list(settings.DATABASES)
        return
    scratch = Scratch()
    databases: dict[str, Any] = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(scratch.path / "default.sqlite3"),
            "OPTIONS": {"timeout": 30},
        }
    }

    def reachable(name: str) -> str | None:
        try:
            return service_url(name)
        except pytest.skip.Exception:
            return None

    url = reachable("postgres")
    mysql_url = reachable("mysql")
    with contextlib.ExitStack() as stack:
        stack.callback(scratch.close)
        if url is not None:
            pg = stack.enter_context(fresh_pg_database(url, f"idempotask_dj_{RUN}"))
            databases["pg"] = {"ENGINE": "django.db.backends.postgresql", **pg}
        if mysql_url is not None:
            maria = stack.enter_context(fresh_mysql_database(mysql_url, f"idempotask_dj_{RUN}"))
            databases["maria"] = {"ENGINE": "django.db.backends.mysql", **maria}
        settings.configure(**settings_for(databases))
        django.setup()
        stack.callback(connections.close_all)
        sqlite_wal("default")
        from tests.django.testapp.models import Payment

        for alias in databases:
            call_command("migrate", "idempotask", database=alias, verbosity=0)
            with connections[alias].schema_editor() as editor:
                editor.create_model(Payment)
        yield list(databases)


@pytest.fixture
def sqlite_alias(django_aliases: list[str]) -> str:
    return "default"


@pytest.fixture
def maria_alias(django_aliases: list[str]) -> str:
    if "maria" not in django_aliases:
        service_url("mysql")  # skips (or fails in CI) with the reason
    return "maria"


@pytest.fixture
def pg_alias(django_aliases: list[str]) -> str:
    if "pg" not in django_aliases:
        service_url("postgres")  # skips (or fails in CI) with the reason
    return "pg"

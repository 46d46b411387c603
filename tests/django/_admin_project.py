"""The admin and command tests' project: the settings of :mod:`tests.django._support`
(configured by the ``django_aliases`` fixture of ``tests/django/conftest.py``), with
Django's own apps migrated on ``default`` and idempotask's tables on ``default``
(SQLite), ``pg`` (PostgreSQL) and ``maria`` (MariaDB).

:func:`on_each` runs a test on each alias: idempotask's stores are configured there
(:class:`~idempotask.django.DjangoBackend`, its dead letters beside it) in a key
namespace of the test's own, so tests sharing the tables never see each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest

import idempotask

ALIASES = ("default", "pg", "maria")


class Current:
    """The alias the running test uses."""

    alias = "default"


@pytest.fixture(scope="session")
def admin_project(django_aliases: list[str]) -> list[str]:
    """Django's own apps (auth, sessions, admin) migrated on ``default``."""
    from django.core.management import call_command

    call_command("migrate", database="default", verbosity=0)
    return django_aliases


@pytest.fixture(params=ALIASES)
def on_each(request: pytest.FixtureRequest, admin_project: list[str]) -> Iterator[str]:
    """The test on SQLite (``default``), PostgreSQL (``pg``) and MariaDB (``maria``),
    with the stores configured on that alias in a namespace of the test's own."""
    from idempotask.django import DjangoBackend

    alias: str = request.param
    if alias not in admin_project:
        from tests.conftest import service_url

        service_url("postgres" if alias == "pg" else "mysql")  # skips (fails in CI) saying why
    Current.alias = alias
    idempotask.configure(backend=DjangoBackend(alias), namespace=f"djadmin{uuid.uuid4().hex[:10]}")
    yield alias
    Current.alias = "default"


def store_url(alias: str) -> str:
    """A SQLAlchemy URL of the database Django's ``alias`` names (the same tables)."""
    from django.conf import settings

    db = settings.DATABASES[alias]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    password = f":{quote(db['PASSWORD'], safe='')}" if db.get("PASSWORD") else ""
    if db["ENGINE"].endswith("mysql"):
        return f"mysql+pymysql://{db['USER']}{password}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    return f"postgresql+psycopg://{db['USER']}{password}@{db['HOST']}:{db['PORT']}/{db['NAME']}"

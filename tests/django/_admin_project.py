"""A real Django project for the admin and management-command tests, made in the test
process: settings, a database router and the admin's URLs.

Django's own apps (auth, sessions, admin) live in a SQLite file in a temporary
directory. idempotask's tables are migrated twice: into that SQLite file (alias
``default``) and into a PostgreSQL schema of this run's own (alias ``postgres``, dropped
at the end), and :class:`Router` sends the app's reads and writes to the alias a test
chose (the ``on_both`` fixture), so every test runs on both databases. The stores the
admin's actions and the commands use are configured on the same tables
(:func:`configure_stores`), in a key namespace of each test's own.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

import idempotask
from tests.conftest import SERVICE_URLS, service_url

RUN = uuid.uuid4().hex[:10]
SCHEMA = f"idempotask_djadmin_{RUN}"
ALIASES = ("default", "postgres")


class Router:
    """idempotask's models on the chosen alias; every other app on ``default``."""

    alias = "default"

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return Router.alias if model._meta.app_label == "idempotask" else "default"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return self.db_for_read(model)

    def allow_relation(self, a: Any, b: Any, **hints: Any) -> bool | None:
        return None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        return app_label == "idempotask" or db == "default"


class _Project:
    directory = ""
    postgres: dict[str, Any] | None = None


def _postgres_settings() -> dict[str, Any]:
    url = urlsplit(os.environ.get(*SERVICE_URLS["postgres"]).replace("+psycopg", ""))
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.path.lstrip("/") or "test",
        "USER": url.username or "postgres",
        "PASSWORD": url.password or "",
        "HOST": url.hostname or "127.0.0.1",
        "PORT": url.port or 5432,
        "OPTIONS": {"options": f"-c search_path={SCHEMA}"},
    }


def _create_schema(db: dict[str, Any]) -> None:
    import psycopg

    with psycopg.connect(
        dbname=db["NAME"],
        user=db["USER"],
        password=db["PASSWORD"],
        host=db["HOST"],
        port=db["PORT"],
        autocommit=True,
    ) as conn:
        conn.execute(f'CREATE SCHEMA "{SCHEMA}"')


def _drop_schema(db: dict[str, Any]) -> None:
    import psycopg

    with psycopg.connect(
        dbname=db["NAME"],
        user=db["USER"],
        password=db["PASSWORD"],
        host=db["HOST"],
        port=db["PORT"],
        autocommit=True,
    ) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')


def setup() -> None:
    """Configure Django (once per process), migrate, and make the test environment."""
    from django.conf import settings

    if settings.configured:
        apps = set(settings.INSTALLED_APPS)
        needed = {"django.contrib.admin", "django.contrib.auth", "idempotask.django"}
        if not needed <= apps or "postgres" not in settings.DATABASES:
            raise RuntimeError(
                "Django was configured by another test module without the admin project's "
                f"apps and databases ({sorted(needed - apps)} missing); run tests/django "
                "test modules that configure Django in separate pytest runs"
            )
        return
    service_url("postgres")  # skips (fails in CI) when PostgreSQL is down
    _Project.directory = tempfile.mkdtemp(prefix="idempotask-djadmin-")
    _Project.postgres = _postgres_settings()
    _create_schema(_Project.postgres)
    atexit.register(teardown)
    settings.configure(
        SECRET_KEY="tests-only",
        DEBUG=False,
        ALLOWED_HOSTS=["testserver"],
        INSTALLED_APPS=[
            "django.contrib.admin",
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "idempotask.django",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {
                    "context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages",
                    ]
                },
            }
        ],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": os.path.join(_Project.directory, "project.sqlite3"),
            },
            "postgres": _Project.postgres,
        },
        DATABASE_ROUTERS=["tests.django._admin_project.Router"],
        ROOT_URLCONF="tests.django._admin_urls",
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
        LOGGING_CONFIG=None,
    )
    import django
    from django.core.management import call_command
    from django.test.utils import setup_test_environment

    django.setup()
    setup_test_environment()
    call_command("migrate", database="default", verbosity=0)
    call_command("migrate", "idempotask", database="postgres", verbosity=0)


def teardown() -> None:
    """Close Django's connections, drop this run's schema and temporary directory."""
    from django.db import connections

    connections.close_all()
    if _Project.postgres is not None:
        _drop_schema(_Project.postgres)
        _Project.postgres = None
    if _Project.directory:
        shutil.rmtree(_Project.directory, ignore_errors=True)
        _Project.directory = ""


def store_url(alias: str) -> str:
    """A SQLAlchemy URL of the same tables Django's ``alias`` holds."""
    if alias == "default":
        return f"sqlite:///{os.path.join(_Project.directory, 'project.sqlite3')}"
    db = _Project.postgres
    assert db is not None
    password = f":{quote(db['PASSWORD'], safe='')}" if db["PASSWORD"] else ""
    options = quote(f"-csearch_path={SCHEMA}", safe="")
    return (
        f"postgresql+psycopg://{db['USER']}{password}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
        f"?options={options}"
    )


def configure_stores(alias: str, namespace: str) -> None:
    """Point idempotask's configured stores at the tables of ``alias``, in ``namespace``."""
    idempotask.configure(backend=store_url(alias), namespace=namespace)


@pytest.fixture(scope="session")
def django_project() -> None:
    """The project, set up once per process (several modules share it) and removed when
    the process exits."""
    setup()


@pytest.fixture(params=ALIASES)
def on_both(request: pytest.FixtureRequest, django_project: None) -> Iterator[str]:
    """Each test on SQLite (``default``) and PostgreSQL (``postgres``): the app's tables
    are read there and the stores write there, in a namespace of the test's own."""
    chosen: str = request.param
    Router.alias = chosen
    configure_stores(chosen, f"djadmin{uuid.uuid4().hex[:10]}")
    yield chosen
    Router.alias = "default"

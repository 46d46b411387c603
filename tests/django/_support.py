"""Databases for the Django tests: a PostgreSQL database created for the run (and
dropped after it), a SQLite file in a temporary directory, and Django settings that
name both, configured once per test process.

Aliases: ``default`` (SQLite), ``pg`` (PostgreSQL) and ``maria`` (MariaDB), the last two
when reachable. The admin and
command tests use the same settings (the admin apps are installed; ``ROOT_URLCONF`` is
:mod:`tests.django._urls`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

RUN = uuid.uuid4().hex[:10]


def pg_params(url: str) -> dict[str, Any]:
    """Django's connection settings for a SQLAlchemy-style PostgreSQL URL."""
    parts = urlsplit(url)
    return {
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or 5432),
        "USER": parts.username or "postgres",
        "PASSWORD": parts.password or "",
        "NAME": parts.path.lstrip("/") or "postgres",
    }


def _admin_connection(params: dict[str, Any]) -> Any:
    import psycopg

    return psycopg.connect(
        host=params["HOST"],
        port=params["PORT"],
        user=params["USER"],
        password=params["PASSWORD"],
        dbname=params["NAME"],
        autocommit=True,
    )


@contextlib.contextmanager
def fresh_pg_database(url: str, name: str) -> Iterator[dict[str, Any]]:
    """A new PostgreSQL database ``name`` on the server of ``url`` (dropped at the end,
    with every connection still open to it)."""
    params = pg_params(url)
    with _admin_connection(params) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {**params, "NAME": name}
    finally:
        with _admin_connection(params) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def fresh_mysql_database(url: str, name: str) -> Iterator[dict[str, Any]]:
    """A new MySQL/MariaDB database ``name`` on the server of ``url`` (dropped at the
    end). Django's MySQL backend is given PyMySQL as ``MySQLdb`` (PyMySQL's documented
    ``install_as_MySQLdb()``): mysqlclient needs a C build this machine lacks."""
    import pymysql

    pymysql.install_as_MySQLdb()
    parts = urlsplit(url)
    params = {
        "HOST": parts.hostname or "127.0.0.1",
        "PORT": str(parts.port or 3306),
        "USER": parts.username or "root",
        "PASSWORD": parts.password or "",
    }

    def admin() -> Any:
        return pymysql.connect(
            host=params["HOST"],
            port=int(params["PORT"]),
            user=params["USER"],
            password=params["PASSWORD"],
            autocommit=True,
        )

    with admin() as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield {**params, "NAME": name, "OPTIONS": {"charset": "utf8mb4"}}
    finally:
        with admin() as conn, conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


def settings_for(databases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The Django settings the in-process tests run with."""
    return {
        "SECRET_KEY": "idempotask-tests",
        "DEBUG": False,
        "ALLOWED_HOSTS": ["testserver"],
        "USE_TZ": True,
        "DATABASES": databases,
        "INSTALLED_APPS": [
            "django.contrib.admin",
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "idempotask.django",
            "tests.django.testapp",
        ],
        "MIDDLEWARE": [
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        "TEMPLATES": [
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
        "ROOT_URLCONF": "tests.django._urls",
        "DEFAULT_AUTO_FIELD": "django.db.models.AutoField",
        # The store is configured by the tests themselves, not at startup.
        "IDEMPOTASK": {"configure": False},
    }


class Scratch:
    """A temporary directory, removed by :meth:`close`."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"idempotask-django-{RUN}-"))

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def sqlite_wal(alias: str) -> None:
    """WAL on the alias's SQLite file (kept by the file), so readers and the writer
    do not block each other, as the SQL store's own engines have it."""
    from django.db import connections

    with connections[alias].cursor() as cursor:
        cursor.execute("PRAGMA journal_mode=WAL")

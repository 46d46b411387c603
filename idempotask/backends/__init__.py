"""Idempotency stores and the registry that builds one from a URL.

Backends are chosen by URL scheme through an explicit table; third-party stores add
schemes through the ``idempotask.backends`` entry-point group (the entry point's name is
the scheme, its value a callable taking the URL and returning a backend). Driver
packages are imported only when their backend is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from idempotask.backends.base import Backend, Record, State, SupportsExpireNow
from idempotask.errors import ConfigurationError, MissingDependencyError

__all__ = [
    "Backend",
    "Record",
    "State",
    "SupportsExpireNow",
    "backend_from_url",
    "check_url",
    "load_factory",
    "register_scheme",
]

BackendFactory = Callable[[str], Backend]

# scheme -> ("module:attribute", extra that provides its driver)
_BUILTIN: dict[str, tuple[str, str]] = {
    "memory": ("idempotask.backends.memory:MemoryBackend.from_url", ""),
    "redis": ("idempotask.backends.redis:RedisBackend.from_url", "redis"),
    "rediss": ("idempotask.backends.redis:RedisBackend.from_url", "redis"),
    "unix": ("idempotask.backends.redis:RedisBackend.from_url", "redis"),
    # Redis first, another store during an outage: the Redis URL with "fallback+" before
    # its scheme and ?secondary=<percent-encoded URL> (see idempotask.backends.fallback).
    # No extra: the two stores' own factories name what they need.
    "fallback+redis": ("idempotask.backends.fallback:FallbackBackend.from_url", ""),
    "fallback+rediss": ("idempotask.backends.fallback:FallbackBackend.from_url", ""),
    "fallback+unix": ("idempotask.backends.fallback:FallbackBackend.from_url", ""),
}
# SQLAlchemy dialect names; a URL's scheme is "dialect" or "dialect+driver". Each names
# the extra that installs SQLAlchemy *and* its driver, so a bare install needs one step.
SQL_EXTRAS = {
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mysql",
}
_SQL_DIALECTS = tuple(SQL_EXTRAS)
# dialect -> (sync drivers kept as a URL names them, the sync default, async drivers kept,
# the async default): the SQL backend's drivers (a URL naming an async driver gets the
# sync default for sync callers and the other way round; psycopg 3 serves both).
_MYSQL_DRIVERS = (
    frozenset({"pymysql", "mysqldb", "mysqlconnector", "mariadbconnector", "cymysql"}),
    "pymysql",
    frozenset({"aiomysql", "asyncmy"}),
    "asyncmy",
)
SQL_DRIVERS: dict[str, tuple[frozenset[str], str, frozenset[str], str]] = {
    "postgresql": (
        frozenset({"psycopg", "psycopg2", "psycopg2cffi", "pg8000"}),
        "psycopg",
        frozenset({"psycopg", "psycopg_async", "asyncpg"}),
        "psycopg",
    ),
    "sqlite": (frozenset({"pysqlite", "pysqlcipher"}), "", frozenset({"aiosqlite"}), "aiosqlite"),
    "mysql": _MYSQL_DRIVERS,
    "mariadb": _MYSQL_DRIVERS,
}
_SQL_FACTORY = "idempotask.backends.sql:SQLAlchemyBackend.from_url"

_registered: dict[str, BackendFactory] = {}
_entry_points_loaded = False


def register_scheme(scheme: str, factory: BackendFactory) -> None:
    """Make ``backend_from_url`` build ``scheme://...`` URLs with ``factory(url)``."""
    if not scheme or not scheme.replace("+", "").replace("-", "").isalnum():
        raise ConfigurationError(f"register_scheme: invalid URL scheme {scheme!r}")
    _registered[scheme.lower()] = factory


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="idempotask.backends"):
        _registered.setdefault(ep.name.lower(), ep.load())


def load_factory(target: str, extra: str) -> Any:
    """The object at ``"module:attr.path"``, importing its module; a driver that is not
    installed is a :class:`MissingDependencyError` naming ``pip install
    'idempotask[<extra>]'`` (shared with the dead-letter registry)."""
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or ""
        if extra and missing and missing.split(".")[0] != "idempotask":
            raise MissingDependencyError(
                f"this store needs the {exc.name!r} package: pip install 'idempotask[{extra}]'"
            ) from exc
        raise
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def check_url(url: str) -> str:
    """The lower-cased scheme of a backend URL, checked against the registry without
    building anything (no import of a driver, no connection): a typo in a scheme fails
    where the URL is given (``@idempotent(backend=...)``, ``configure()``), not at the
    first call. Raises :class:`ConfigurationError` as :func:`backend_from_url` does.
    """
    if not isinstance(url, str) or "://" not in url:
        # Never echo the value: a malformed URL may still carry a password.
        raise ConfigurationError(
            "backend: expected a URL such as 'memory://' or 'redis://localhost:6379/0', "
            f"got a {type(url).__name__} without '://'"
        )
    scheme = url.split("://", 1)[0].lower()
    _load_entry_points()
    if scheme in _registered or scheme in _BUILTIN or scheme.split("+", 1)[0] in SQL_EXTRAS:
        return scheme
    known = sorted({*_BUILTIN, *_registered, *_SQL_DIALECTS})
    raise ConfigurationError(
        f"backend: unknown URL scheme {scheme!r}; known schemes: {', '.join(known)} "
        "(SQL URLs may name a driver, e.g. 'postgresql+psycopg'); third-party stores "
        "register through the 'idempotask.backends' entry-point group"
    )


def backend_from_url(url: str) -> Backend:
    """Build a backend from a URL: ``memory://``, ``redis://host:6379/0``,
    ``postgresql+psycopg://...``, ``sqlite:///path.db``, or a registered scheme.

    Redis first with a SQL store during outages is the Redis URL with ``fallback+`` before
    its scheme and the other store's URL, percent-encoded whole, as ``secondary``:
    ``fallback+redis://host:6379/0?secondary=postgresql%2Bpsycopg%3A%2F%2Fapp%40db%2Fapp``
    (:func:`idempotask.backends.fallback.fallback_url` builds it).

    An unknown scheme is a :class:`ConfigurationError` listing the known ones; a missing
    driver is a :class:`MissingDependencyError` naming the extra to install.
    """
    scheme = check_url(url)
    if scheme in _registered:
        return _registered[scheme](url)
    target, extra = _BUILTIN.get(scheme) or (_SQL_FACTORY, SQL_EXTRAS[scheme.split("+", 1)[0]])
    backend: Backend = load_factory(target, extra)(url)
    return backend

"""URLs and engines: which driver serves sync and async callers, and how engines are made.

Nothing here connects; engines are only created when the backend first needs one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import URL, Engine, event, make_url
from sqlalchemy.exc import ArgumentError, InvalidRequestError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from idempotask.backends import SQL_DRIVERS
from idempotask.backends.sql._timeouts import connect_options
from idempotask.errors import ConfigurationError, MissingDependencyError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "OPTIONS",
    "async_autocommit",
    "async_url",
    "autocommit",
    "describe",
    "is_memory_sqlite",
    "new_engine",
    "parse_url",
    "store_options",
    "sync_url",
]

_MYSQL = ("mysql", "mariadb")
_SUPPORTED = ("postgresql", "sqlite", *_MYSQL)

_DRIVERS = SQL_DRIVERS

# Drivers whose connect() takes a connect_timeout in seconds (libpq's must be whole).
_TIMEOUT_DRIVERS = {"psycopg", "psycopg_async", "pymysql", "aiomysql", "asyncmy", "mysqldb"}
# The pip package that provides a driver module, for the missing-driver message.
_PACKAGES = {"MySQLdb": "mysqlclient", "psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]"}


def parse_url(url: str | URL) -> URL:
    """A SQLAlchemy URL for a supported database (``postgres://`` read as PostgreSQL)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"sql backend: invalid database URL {url!r}: {exc}") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "postgres":  # Heroku-style URLs; SQLAlchemy only knows "postgresql"
        backend = "postgresql"
        parsed = parsed.set(drivername=f"{backend}+{driver}" if driver else backend)
    if backend not in _SUPPORTED:
        raise ConfigurationError(
            f"sql backend: {backend!r} databases are not supported (URL "
            f"{describe(parsed)!r}); use PostgreSQL, SQLite, MySQL or MariaDB"
        )
    return parsed


#: Query options of a store URL that are idempotask's, not the driver's.
OPTIONS = ("create_tables", "table", "namespace", "dead_letter_table", "breaker_table")

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def store_options(url: str | URL, owner: str) -> tuple[URL, dict[str, Any]]:
    """``url`` without idempotask's own query options (:data:`OPTIONS`), and those options
    as constructor arguments (``table`` becomes ``table_name``, ``create_tables`` a bool).

    >>> url, options = store_options("sqlite:///app.db?create_tables=true&table=t", "S")
    >>> str(url), options
    ('sqlite:///app.db', {'create_tables': True, 'table_name': 't'})
    """
    parsed = parse_url(url)
    options: dict[str, Any] = {}
    for name in OPTIONS:
        value = parsed.query.get(name)
        if value is None:
            continue
        if isinstance(value, tuple):
            raise ConfigurationError(f"{owner}: the URL option {name}= is given twice")
        if name == "create_tables":
            if value.lower() not in _TRUE + _FALSE:
                raise ConfigurationError(
                    f"{owner}: the URL option create_tables= takes true or false, got {value!r}"
                )
            options[name] = value.lower() in _TRUE
        else:
            options["table_name" if name == "table" else name] = value
    return parsed.difference_update_query(OPTIONS), options


def describe(url: URL) -> str:
    """The URL without credentials or query options, for messages and ``repr``."""
    bare = URL.create(url.drivername, host=url.host, port=url.port, database=url.database)
    return bare.render_as_string(hide_password=True)


def is_memory_sqlite(url: URL) -> bool:
    """Whether ``url`` is a private in-memory SQLite database (one per connection)."""
    if url.get_backend_name() != "sqlite":
        return False
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _with_driver(url: URL, asyncio_: bool) -> URL:
    keep_sync, default_sync, keep_async, default_async = _DRIVERS[url.get_backend_name()]
    keep, default = (keep_async, default_async) if asyncio_ else (keep_sync, default_sync)
    driver = url.get_driver_name() if "+" in url.drivername else ""
    if driver in keep:
        return url
    backend = url.get_backend_name()
    return url.set(drivername=f"{backend}+{default}" if default else backend)


def sync_url(url: URL) -> URL:
    """``url`` with a sync driver: its own if it names one, else the default.

    >>> str(sync_url(make_url("sqlite+aiosqlite:///x.db")))
    'sqlite:///x.db'
    """
    return _with_driver(url, False)


def async_url(url: URL) -> URL:
    """``url`` with an asyncio driver: its own if it names one, else the default.

    >>> str(async_url(make_url("mysql+pymysql://root@db/test")))
    'mysql+asyncmy://root@db/test'
    """
    return _with_driver(url, True)


def autocommit(engine: Engine) -> Engine:
    """``engine``, or a view of it that sets autocommit on each connection it checks out.

    An engine whose connections already are in autocommit mode (made with
    ``isolation_level="AUTOCOMMIT"``, as the stores' own are) is used as is: setting it
    per connection would cost MySQL a ``SET autocommit`` on every checkout and return.
    One connection is checked out to tell, with the dialect's documented
    ``detect_autocommit_setting`` (no round trip).
    """
    if engine.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return engine
    with engine.connect() as conn:
        already = _in_autocommit(engine, conn.connection.dbapi_connection)
    return engine if already else engine.execution_options(isolation_level="AUTOCOMMIT")


async def async_autocommit(engine: AsyncEngine) -> AsyncEngine:
    """:func:`~idempotask.backends.sql._engines.autocommit` for an ``AsyncEngine``."""
    if engine.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return engine
    async with engine.connect() as aconn:
        raw = await aconn.get_raw_connection()
        already = _in_autocommit(engine, raw.dbapi_connection)
    return engine if already else engine.execution_options(isolation_level="AUTOCOMMIT")


def _in_autocommit(engine: Engine | AsyncEngine, dbapi_connection: Any) -> bool:
    try:
        return dbapi_connection is not None and bool(
            engine.dialect.detect_autocommit_setting(dbapi_connection)
        )
    except NotImplementedError:
        return False


def _sqlite_pragmas(engine: Engine, busy_timeout: float, *, wal: bool) -> None:
    """Set the busy timeout (and WAL on a file) on every new connection.

    WAL lets readers run beside the one writer, so a duplicate's read never waits for a
    claim; the busy timeout makes a second writer wait for the lock instead of failing
    at once with "database is locked".
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            if wal:
                cursor.execute("PRAGMA journal_mode = WAL")
        finally:
            cursor.close()


def _missing_driver(url: URL, exc: ImportError) -> MissingDependencyError:
    module = (exc.name or "").split(".")[0]
    package = _PACKAGES.get(module, module or url.get_driver_name())
    return MissingDependencyError(
        f"sql backend: {describe(url)!r} needs the {package!r} driver: pip install {package!r}"
    )


def new_engine(
    url: URL,
    asyncio_: bool,
    *,
    connect_timeout: float,
    busy_timeout: float,
    statement_timeout: float | None,
    options: Mapping[str, Any],
) -> Any:
    """A sync engine (an asyncio one with ``asyncio_``) for ``url`` with the driver of
    :func:`sync_url` (:func:`async_url`) and our defaults; ``options`` override them."""
    # Looked up when called: an instrumentation that wraps sqlalchemy.create_engine
    # (OpenTelemetry's, when switched on after this module was imported) sees ours.
    create: Any = sqlalchemy.create_engine
    if asyncio_:
        try:
            from sqlalchemy.ext.asyncio import create_async_engine
        except ImportError as exc:  # SQLAlchemy's asyncio support needs greenlet
            raise MissingDependencyError(
                f"sql backend: async calls need SQLAlchemy's asyncio support: "
                f"pip install 'sqlalchemy[asyncio]' ({exc})"
            ) from exc
        create = create_async_engine
    url = _with_driver(url, asyncio_)
    backend, driver = url.get_backend_name(), url.get_driver_name()
    kwargs: dict[str, Any] = {
        # Every statement is its own transaction: no BEGIN/COMMIT round trips.
        "isolation_level": "AUTOCOMMIT",
        # Payloads (results, tracebacks) stay out of error messages and logs.
        "hide_parameters": True,
        # The pool rolls back every connection it gets back, even in autocommit mode: a
        # ROLLBACK round trip with PyMySQL, a thread hop with aiosqlite. The few flows
        # that open a transaction end it themselves, or discard the connection.
        "skip_autocommit_rollback": True,
    }
    connect_args: dict[str, Any] = {}
    if driver in _TIMEOUT_DRIVERS and "connect_timeout" not in url.query:
        seconds = max(1, math.ceil(connect_timeout)) if backend == "postgresql" else connect_timeout
        connect_args["connect_timeout"] = seconds
    # Server-side statement timeouts and TCP keepalives (see _timeouts).
    connect_args.update(connect_options(backend, driver, url.query, statement_timeout))
    if backend in _MYSQL:
        # MySQL closes connections idle for wait_timeout (8 h by default, often less).
        kwargs["pool_recycle"] = 3600
    if backend == "sqlite":
        connect_args["timeout"] = busy_timeout
        if is_memory_sqlite(url):
            # One private database per connection: keep exactly one, shared by threads.
            kwargs["poolclass"] = StaticPool
            connect_args["check_same_thread"] = False
    extra = dict(options)
    kwargs["connect_args"] = {**connect_args, **extra.pop("connect_args", {})}
    kwargs.update(extra)
    try:
        engine = create(url, **kwargs)
    except NoSuchModuleError as exc:
        raise ConfigurationError(f"sql backend: {exc}") from exc
    except ImportError as exc:
        raise _missing_driver(url, exc) from exc
    except InvalidRequestError as exc:  # "The asyncio extension requires an async driver"
        raise ConfigurationError(f"sql backend: {describe(url)!r}: {exc}") from exc
    if backend == "sqlite":
        sync_engine = getattr(engine, "sync_engine", engine)
        _sqlite_pragmas(sync_engine, busy_timeout, wal=not is_memory_sqlite(url))
    return engine

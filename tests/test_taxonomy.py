"""The failure taxonomy (DESIGN §5): the built-in table, precedence, markers, hints."""

from __future__ import annotations

import asyncio
import email.message
import errno
import importlib
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import urllib.error
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idempotask.errors import (
    AlreadyInProgress,
    BackendError,
    CachedFailure,
    ConfigurationError,
    CorruptRecordError,
    KeyMismatchError,
    MissingDependencyError,
)
from idempotask.taxonomy import (
    Classification,
    Classifier,
    ConfigurationFailure,
    ExternalError,
    FailureKind,
    PermanentError,
    TransientError,
    classify,
    classify_http_status,
    default_classifier,
    parse_retry_after,
    register_failure_kind,
)
from idempotask.taxonomy._rules import BUILTIN

T = FailureKind.TRANSIENT
E = FailureKind.EXTERNAL
C = FailureKind.CONFIGURATION
P = FailureKind.PERMANENT

Factory = Callable[[], BaseException]


def raised(exc: BaseException) -> BaseException:
    """``exc`` after a real raise, with a traceback."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def made(module: str, name: str, *args: Any, **kwargs: Any) -> Factory:
    """A factory for ``module.name(*args, **kwargs)``; skips when the module is absent."""

    def make() -> BaseException:
        mod = pytest.importorskip(module)
        obj: Any = mod
        for part in name.split("."):
            obj = getattr(obj, part)
        exc: BaseException = obj(*args, **kwargs)
        return exc

    return make


def fake_class(module: str, qualname: str, *bases: type) -> type[Exception]:
    """A class with another library's module and qualified name, without that library."""
    cls = type(qualname.rpartition(".")[2], bases or (Exception,), {})
    cls.__module__ = module
    cls.__qualname__ = qualname
    return cls


def missing_env_var() -> BaseException:
    try:
        os.environ["IDEMPOTASK_TEST_SURELY_UNSET_VARIABLE"]
    except KeyError as exc:
        return exc
    raise AssertionError("the variable is set")


def requests_http_error(status: int, headers: dict[str, str] | None = None) -> Factory:
    def make() -> BaseException:
        requests = pytest.importorskip("requests")
        response = requests.Response()
        response.status_code = status
        response.headers.update(headers or {})
        exc: BaseException = requests.HTTPError(f"{status} error", response=response)
        return exc

    return make


def httpx_status_error(status: int, headers: dict[str, str] | None = None) -> Factory:
    def make() -> BaseException:
        httpx = pytest.importorskip("httpx")
        request = httpx.Request("GET", "https://example.invalid/")
        response = httpx.Response(status, headers=headers, request=request)
        exc: BaseException = httpx.HTTPStatusError("boom", request=request, response=response)
        return exc

    return make


def fake_httpx_status_error(status: int, headers: dict[str, str] | None = None) -> Factory:
    """httpx's shape (module "httpx", ``response.status_code``) without httpx."""

    def make() -> BaseException:
        cls = fake_class("httpx", "HTTPStatusError")
        exc = cls("boom")
        exc.response = SimpleNamespace(status_code=status, headers=headers or {})  # type: ignore[attr-defined]
        return exc

    return make


def aiohttp_response_error(status: int, headers: dict[str, str] | None = None) -> Factory:
    def make() -> BaseException:
        aiohttp = pytest.importorskip("aiohttp")
        exc: BaseException = aiohttp.ClientResponseError(None, (), status=status, headers=headers)
        return exc

    return make


def fake_aiohttp_response_error(status: int, headers: dict[str, str] | None = None) -> Factory:
    """aiohttp's shape (``status``, ``headers`` on the exception) without aiohttp."""

    def make() -> BaseException:
        cls = fake_class("aiohttp.client_exceptions", "ClientResponseError")
        exc = cls("boom")
        exc.status = status  # type: ignore[attr-defined]
        exc.headers = headers  # type: ignore[attr-defined]
        return exc

    return make


def urllib_http_error(status: int, headers: dict[str, str] | None = None) -> Factory:
    def make() -> BaseException:
        message = email.message.Message()
        for name, value in (headers or {}).items():
            message[name] = value
        return urllib.error.HTTPError("https://example.invalid/", status, "x", message, None)

    return make


def boto_client_error(code: str, status: int, headers: dict[str, str] | None = None) -> Factory:
    response = {
        "Error": {"Code": code, "Message": "x"},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}},
    }
    return made("botocore.exceptions", "ClientError", response, "PutItem")


def sqlalchemy_wrapping(name: str, orig: Factory, **kwargs: Any) -> Factory:
    def make() -> BaseException:
        exc_module = pytest.importorskip("sqlalchemy.exc")
        exc: BaseException = getattr(exc_module, name)("SELECT 1", {}, orig(), **kwargs)
        return exc

    return make


def backend_error_from(cause: Factory) -> Factory:
    def make() -> BaseException:
        exc = BackendError("the store failed")
        exc.__cause__ = cause()
        return exc

    return make


def tenacity_retry_error(inner: BaseException) -> BaseException:
    tenacity = pytest.importorskip("tenacity")
    future = tenacity.Future(1)
    future.set_exception(inner)
    exc: BaseException = tenacity.RetryError(future)
    return exc


def row(factory: Factory, kind: FailureKind, id: str) -> Any:
    return pytest.param(factory, kind, id=id)


TABLE = [
    # --- standard library: blips
    row(TimeoutError, T, "TimeoutError"),
    row(lambda: socket.timeout("x"), T, "socket.timeout"),  # noqa: UP041 - the alias itself
    row(asyncio.TimeoutError, T, "asyncio.TimeoutError"),
    row(ConnectionResetError, T, "ConnectionResetError"),
    row(ConnectionRefusedError, T, "ConnectionRefusedError"),
    row(ConnectionAbortedError, T, "ConnectionAbortedError"),
    row(BrokenPipeError, T, "BrokenPipeError"),
    row(BlockingIOError, T, "BlockingIOError"),
    row(InterruptedError, T, "InterruptedError"),
    row(lambda: OSError(errno.ENETUNREACH, "unreachable"), T, "OSError-ENETUNREACH"),
    row(lambda: OSError(errno.EHOSTUNREACH, "no route"), T, "OSError-EHOSTUNREACH"),
    row(lambda: OSError(errno.EAGAIN, "again"), T, "OSError-EAGAIN"),
    row(lambda: OSError(errno.ECONNREFUSED, "refused"), T, "OSError-ECONNREFUSED"),
    row(lambda: OSError(errno.EIO, "io"), T, "OSError-EIO"),
    row(lambda: socket.gaierror(socket.EAI_AGAIN, "try again"), T, "socket.gaierror"),
    row(lambda: ssl.SSLEOFError(8, "EOF"), T, "ssl.SSLEOFError"),
    row(lambda: subprocess.TimeoutExpired("cmd", 1), T, "subprocess.TimeoutExpired"),
    row(lambda: asyncio.IncompleteReadError(b"", 10), T, "asyncio.IncompleteReadError"),
    # --- standard library: the environment
    row(PermissionError, C, "PermissionError"),
    row(lambda: OSError(errno.EACCES, "denied"), C, "OSError-EACCES"),
    row(lambda: OSError(errno.EROFS, "read-only"), C, "OSError-EROFS"),
    row(lambda: FileNotFoundError(errno.ENOENT, "no such file"), C, "FileNotFoundError"),
    row(NotADirectoryError, C, "NotADirectoryError"),
    row(lambda: ssl.SSLCertVerificationError(1, "bad cert"), C, "ssl.SSLCertVerificationError"),
    row(ImportError, C, "ImportError"),
    row(ModuleNotFoundError, C, "ModuleNotFoundError"),
    row(missing_env_var, C, "os.environ-KeyError"),
    # --- standard library: the call or the code
    row(lambda: raised(KeyError("sku")), P, "KeyError"),
    row(KeyError, P, "KeyError-not-raised"),
    row(IndexError, P, "IndexError"),
    row(ValueError, P, "ValueError"),
    row(TypeError, P, "TypeError"),
    row(AttributeError, P, "AttributeError"),
    row(NotImplementedError, P, "NotImplementedError"),
    row(AssertionError, P, "AssertionError"),
    row(ZeroDivisionError, P, "ZeroDivisionError"),
    row(lambda: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), P, "UnicodeDecodeError"),
    row(lambda: json.JSONDecodeError("bad", "{", 0), P, "JSONDecodeError"),
    row(RecursionError, P, "RecursionError"),
    row(FileExistsError, P, "FileExistsError"),
    # --- redis-py
    row(made("redis.exceptions", "ConnectionError"), T, "redis.ConnectionError"),
    row(made("redis.exceptions", "TimeoutError"), T, "redis.TimeoutError"),
    row(made("redis.exceptions", "BusyLoadingError"), T, "redis.BusyLoadingError"),
    row(made("redis.exceptions", "TryAgainError"), T, "redis.TryAgainError"),
    row(made("redis.exceptions", "ClusterDownError", "CLUSTERDOWN"), T, "redis.ClusterDownError"),
    row(made("redis.exceptions", "MasterDownError", "MASTERDOWN"), T, "redis.MasterDownError"),
    row(made("redis.exceptions", "ReadOnlyError"), T, "redis.ReadOnlyError"),
    row(made("redis.exceptions", "MovedError", "3999 127.0.0.1:6381"), T, "redis.MovedError"),
    row(made("redis.exceptions", "MaxConnectionsError"), T, "redis.MaxConnectionsError"),
    row(made("redis.exceptions", "WatchError"), T, "redis.WatchError"),
    row(made("redis.exceptions", "AuthenticationError"), C, "redis.AuthenticationError"),
    row(made("redis.exceptions", "AuthorizationError"), C, "redis.AuthorizationError"),
    row(made("redis.exceptions", "NoPermissionError"), C, "redis.NoPermissionError"),
    row(made("redis.exceptions", "ModuleError"), C, "redis.ModuleError"),
    row(made("redis.exceptions", "ResponseError", "WRONGTYPE"), P, "redis.ResponseError"),
    row(made("redis.exceptions", "ExecAbortError"), P, "redis.ExecAbortError"),
    row(made("redis.exceptions", "DataError"), P, "redis.DataError"),
    # --- SQLAlchemy
    row(sqlalchemy_wrapping("OperationalError", Exception), T, "sqlalchemy.OperationalError"),
    row(sqlalchemy_wrapping("InterfaceError", Exception), T, "sqlalchemy.InterfaceError"),
    row(made("sqlalchemy.exc", "DisconnectionError"), T, "sqlalchemy.DisconnectionError"),
    row(made("sqlalchemy.exc", "TimeoutError"), T, "sqlalchemy.TimeoutError-pool"),
    row(sqlalchemy_wrapping("IntegrityError", Exception), P, "sqlalchemy.IntegrityError"),
    row(sqlalchemy_wrapping("DataError", Exception), P, "sqlalchemy.DataError"),
    row(sqlalchemy_wrapping("ProgrammingError", Exception), P, "sqlalchemy.ProgrammingError"),
    row(
        sqlalchemy_wrapping("DBAPIError", Exception, connection_invalidated=True),
        T,
        "sqlalchemy.DBAPIError-connection-invalidated",
    ),
    row(
        sqlalchemy_wrapping("ProgrammingError", Exception, connection_invalidated=True),
        T,
        "sqlalchemy.ProgrammingError-connection-invalidated",
    ),
    row(
        sqlalchemy_wrapping("OperationalError", made("psycopg.errors", "InvalidPassword")),
        C,
        "sqlalchemy-wrapping-psycopg.InvalidPassword",
    ),
    row(
        sqlalchemy_wrapping("ProgrammingError", made("psycopg.errors", "InsufficientPrivilege")),
        C,
        "sqlalchemy-wrapping-psycopg.InsufficientPrivilege",
    ),
    row(
        sqlalchemy_wrapping("OperationalError", made("pymysql.err", "OperationalError", 1045, "x")),
        C,
        "sqlalchemy-wrapping-pymysql-access-denied",
    ),
    row(made("sqlalchemy.exc", "NoSuchModuleError"), C, "sqlalchemy.NoSuchModuleError"),
    row(made("sqlalchemy.exc", "NoResultFound"), P, "sqlalchemy.NoResultFound"),
    # --- psycopg 3
    row(made("psycopg", "OperationalError"), T, "psycopg.OperationalError"),
    row(made("psycopg.errors", "SerializationFailure"), T, "psycopg.SerializationFailure"),
    row(made("psycopg.errors", "DeadlockDetected"), T, "psycopg.DeadlockDetected"),
    row(made("psycopg.errors", "AdminShutdown"), T, "psycopg.AdminShutdown"),
    row(made("psycopg.errors", "QueryCanceled"), T, "psycopg.QueryCanceled"),
    row(made("psycopg.errors", "InsufficientPrivilege"), C, "psycopg.InsufficientPrivilege"),
    row(made("psycopg.errors", "InvalidPassword"), C, "psycopg.InvalidPassword"),
    row(made("psycopg.errors", "InvalidCatalogName"), C, "psycopg.InvalidCatalogName"),
    row(made("psycopg.errors", "UniqueViolation"), P, "psycopg.UniqueViolation"),
    row(made("psycopg.errors", "UndefinedTable"), P, "psycopg.UndefinedTable"),
    row(made("psycopg", "DataError"), P, "psycopg.DataError"),
    # --- PyMySQL
    row(made("pymysql.err", "OperationalError", 2003, "can't connect"), T, "pymysql-2003"),
    row(made("pymysql.err", "OperationalError", 1213, "deadlock"), T, "pymysql-deadlock"),
    row(made("pymysql.err", "OperationalError", 1045, "denied"), C, "pymysql-access-denied"),
    row(made("pymysql.err", "InternalError", 1049, "unknown db"), C, "pymysql-unknown-database"),
    row(made("pymysql.err", "IntegrityError", 1062, "duplicate"), P, "pymysql.IntegrityError"),
    row(made("pymysql.err", "ProgrammingError", 1064, "syntax"), P, "pymysql.ProgrammingError"),
    # --- DB-API drivers not in the table, by PEP 249 names
    row(made("sqlite3", "OperationalError", "database is locked"), T, "sqlite3.OperationalError"),
    row(made("sqlite3", "IntegrityError"), P, "sqlite3.IntegrityError"),
    row(
        lambda: fake_class("somedb", "OperationalError", fake_class("somedb", "DatabaseError"))(),
        T,
        "unknown-driver-OperationalError",
    ),
    # --- HTTP clients: requests
    *(
        row(requests_http_error(status), kind, f"requests-{status}")
        for status, kind in [
            *[(500, T), (502, T), (503, T), (504, T), (408, T), (429, E)],
            *[(401, C), (403, C), (400, P), (404, P), (422, P), (501, P)],
        ]
    ),
    row(made("requests", "ConnectionError"), T, "requests.ConnectionError"),
    row(made("requests", "Timeout"), T, "requests.Timeout"),
    row(made("requests", "ReadTimeout"), T, "requests.ReadTimeout"),
    row(made("requests", "ConnectTimeout"), T, "requests.ConnectTimeout"),
    row(made("requests.exceptions", "ChunkedEncodingError"), T, "requests.ChunkedEncodingError"),
    row(made("requests", "HTTPError", "no response"), T, "requests.HTTPError-without-response"),
    row(
        made("urllib3.exceptions", "MaxRetryError", None, "/", ConnectionRefusedError()),
        T,
        "urllib3.MaxRetryError",
    ),
    # --- httpx (real when installed, and its shape always)
    *(
        row(factory(status), kind, f"{label}-{status}")
        for factory, label in [
            (httpx_status_error, "httpx"),
            (fake_httpx_status_error, "httpx-shape"),
        ]
        for status, kind in [(503, T), (429, E), (403, C), (404, P)]
    ),
    row(made("httpx", "ConnectError", "refused"), T, "httpx.ConnectError"),
    row(made("httpx", "ReadTimeout", "slow"), T, "httpx.ReadTimeout"),
    row(made("httpx", "PoolTimeout", "pool"), T, "httpx.PoolTimeout"),
    # --- aiohttp (real when installed, and its shape always)
    *(
        row(factory(status), kind, f"{label}-{status}")
        for factory, label in [
            (aiohttp_response_error, "aiohttp"),
            (fake_aiohttp_response_error, "aiohttp-shape"),
        ]
        for status, kind in [(502, T), (429, E), (401, C), (410, P)]
    ),
    row(made("aiohttp", "ServerTimeoutError"), T, "aiohttp.ServerTimeoutError"),
    row(made("aiohttp", "ServerDisconnectedError"), T, "aiohttp.ServerDisconnectedError"),
    # --- urllib
    *(
        row(urllib_http_error(status), kind, f"urllib-{status}")
        for status, kind in [(500, T), (429, E), (401, C), (404, P)]
    ),
    row(lambda: urllib.error.URLError(ConnectionRefusedError()), T, "urllib.URLError-refused"),
    row(lambda: urllib.error.URLError("unknown"), T, "urllib.URLError-text"),
    row(
        lambda: urllib.error.URLError(ssl.SSLCertVerificationError(1, "bad")),
        C,
        "urllib.URLError-bad-certificate",
    ),
    # --- botocore
    row(boto_client_error("ThrottlingException", 400), E, "boto-ThrottlingException"),
    row(boto_client_error("SlowDown", 503), E, "boto-SlowDown"),
    row(boto_client_error("TooManyRequestsException", 429), E, "boto-TooManyRequests"),
    row(boto_client_error("InternalError", 500), T, "boto-InternalError"),
    row(boto_client_error("SomethingElse", 503), T, "boto-503"),
    row(boto_client_error("AccessDenied", 403), C, "boto-AccessDenied"),
    row(boto_client_error("ValidationException", 400), P, "boto-ValidationException"),
    row(
        made("botocore.exceptions", "EndpointConnectionError", endpoint_url="https://x"),
        T,
        "boto-EndpointConnectionError",
    ),
    row(made("botocore.exceptions", "NoCredentialsError"), C, "boto-NoCredentialsError"),
    # --- missing settings
    row(
        lambda: fake_class("django.core.exceptions", "ImproperlyConfigured")(),
        C,
        "django.ImproperlyConfigured",
    ),
    row(
        lambda: fake_class("myapp.settings", "SettingsImproperlyConfigured")(),
        C,
        "any-ImproperlyConfigured",
    ),
    row(lambda: ConfigurationFailure("PAYMENTS_URL is not set"), C, "ConfigurationFailure-marker"),
    # --- idempotask itself
    row(lambda: BackendError("down"), T, "BackendError"),
    row(
        backend_error_from(made("redis.exceptions", "AuthenticationError")),
        C,
        "BackendError-from-redis-auth",
    ),
    row(
        backend_error_from(made("redis.exceptions", "ResponseError", "WRONGTYPE")),
        T,
        "BackendError-from-a-permanent-cause",
    ),
    row(lambda: CorruptRecordError("foreign"), C, "CorruptRecordError"),
    row(lambda: ConfigurationError("ttl: bad"), C, "ConfigurationError"),
    row(lambda: MissingDependencyError("pip install redis"), C, "MissingDependencyError"),
    row(lambda: AlreadyInProgress("busy", key="k"), T, "AlreadyInProgress"),
    row(lambda: KeyMismatchError("reused", key="k"), P, "KeyMismatchError"),
    row(lambda: CachedFailure("ValueError", "bad"), P, "CachedFailure-ValueError"),
    row(
        lambda: CachedFailure("redis.exceptions.TimeoutError", "slow"),
        T,
        "CachedFailure-redis-timeout",
    ),
    row(lambda: tenacity_retry_error(ValueError("bad")), P, "tenacity.RetryError-ValueError"),
    row(
        lambda: tenacity_retry_error(PermissionError()),
        C,
        "tenacity.RetryError-PermissionError",
    ),
    # --- unknown: the default
    row(lambda: OSError("no errno"), T, "OSError-without-errno"),
    row(RuntimeError, T, "RuntimeError-unknown"),
]


@pytest.mark.parametrize(("factory", "kind"), TABLE)
def test_the_built_in_table(factory: Factory, kind: FailureKind) -> None:
    """Each row of the documented defaults classifies a real (or same-shaped) exception."""
    exc = factory()
    found = Classifier().classify(exc)
    assert found.kind is kind, found.reason
    assert found.reason


def test_every_built_in_name_names_a_real_class_where_installed() -> None:
    """The qualified names in the table are the classes' real names (no silent typos)."""
    # On 3.11+ these two are aliases of builtins.TimeoutError; 3.10 has its own classes.
    aliases = {"asyncio.exceptions.TimeoutError", "concurrent.futures._base.TimeoutError"}
    checked = 0
    for name in BUILTIN:
        module_name, _, qualname = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # that library is not installed here
        cls = getattr(module, qualname, None)
        assert isinstance(cls, type), f"{name} does not exist"
        assert issubclass(cls, BaseException), name
        if name not in aliases:
            assert f"{cls.__module__}.{cls.__qualname__}" == name
        checked += 1
    assert checked > 60


def test_classifying_imports_no_driver_and_no_tenacity() -> None:
    """The table is names only: classifying everything imports nothing third-party."""
    script = textwrap.dedent(
        """
        import sys
        before = set(sys.modules)
        from idempotask.taxonomy import classify
        from idempotask.retry import DEFAULT_POLICIES
        for exc in (ValueError(), ConnectionError(), OSError(5, "io"), RuntimeError()):
            kind = classify(exc).kind
            DEFAULT_POLICIES[kind].delay(1)
        new = {m.split('.')[0] for m in set(sys.modules) - before}
        stdlib = set(sys.stdlib_module_names)
        print(sorted(m for m in new if m not in stdlib and m != 'idempotask'
                     and not m.startswith('_sysconfigdata')))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# --- precedence --------------------------------------------------------------------------


class Base(Exception):
    pass


class Child(Base):
    pass


class GrandChild(Child):
    pass


def test_the_most_specific_registered_class_in_the_mro_wins() -> None:
    """Registrations are looked up along the MRO, nearest class first."""
    c = Classifier(defaults=False)
    c.register(Base, P)
    c.register(Child, E)
    assert c.classify(GrandChild()).kind is E
    assert c.classify(Child()).kind is E
    assert c.classify(Base()).kind is P


def test_a_registered_type_beats_a_name_at_the_same_class() -> None:
    """At one MRO level a type given by object is consulted before its name."""
    c = Classifier(defaults=False)
    c.register(f"{__name__}.Child", P)
    c.register(Child, E)
    assert c.classify(GrandChild()).kind is E


def test_a_name_registration_needs_no_import() -> None:
    """A 'module.QualName' string classifies a class of a module never imported here."""
    c = Classifier()
    c.register("stripe.error.CardError", P)
    card_error = fake_class("stripe.error", "CardError", ConnectionError)
    assert c.classify(card_error()).kind is P  # beats builtins.ConnectionError, less specific


def test_a_bare_name_means_a_builtin() -> None:
    """register('RuntimeError', ...) is builtins.RuntimeError."""
    c = Classifier()
    c.register("RuntimeError", P)
    assert c.classify(RuntimeError()).kind is P


def test_a_user_registration_replaces_a_built_in_entry() -> None:
    """Registering a table name again overrides the default for that class."""
    c = Classifier()
    c.register("builtins.ValueError", T)
    assert c.classify(ValueError()).kind is T
    c.unregister("builtins.ValueError")
    assert c.classify(ValueError()).kind is T  # now unknown: the default


def test_unregister_forgets_types_and_ignores_unknown_ones() -> None:
    """unregister removes a type registration; an unknown one is a no-op."""
    c = Classifier(defaults=False, default_kind=P)
    c.register(Child, E)
    c.unregister(Child)
    c.unregister(GrandChild)
    assert c.classify(Child()).kind is P


def test_the_registry_beats_predicates() -> None:
    """Predicates are asked only when no registered class matches."""
    c = Classifier()
    c.add_predicate(lambda exc: E)
    assert c.classify(ValueError()).kind is P
    assert c.classify(RuntimeError()).kind is E


def test_predicates_run_in_the_order_added() -> None:
    """The first predicate with an answer wins; None passes to the next."""
    c = Classifier()
    calls: list[str] = []

    def first(exc: BaseException) -> FailureKind | None:
        calls.append("first")
        return None

    def second(exc: BaseException) -> FailureKind | None:
        calls.append("second")
        return C

    def third(exc: BaseException) -> FailureKind | None:
        calls.append("third")
        return P

    for predicate in (first, second, third):
        c.add_predicate(predicate)
    found = c.classify(RuntimeError())
    assert found.kind is C
    assert calls == ["first", "second"]
    assert "second" in found.reason


def test_a_predicate_may_answer_with_a_value_or_a_full_classification() -> None:
    """A kind's string value works, and a Classification carries its own hint."""
    c = Classifier()
    remove = c.add_predicate(lambda exc: "external" if "quota" in str(exc) else None)
    assert c.classify(RuntimeError("quota used up")).kind is E
    remove()
    c.add_predicate(lambda exc: Classification(E, 90.0))
    found = c.classify(RuntimeError("quota used up"))
    assert (found.kind, found.retry_after) == (E, 90.0)
    assert found.reason.startswith("predicate: ")


def test_a_predicate_that_raises_is_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """A broken predicate never breaks classification; the next one still runs."""
    c = Classifier()

    def broken(exc: BaseException) -> FailureKind | None:
        raise RuntimeError("predicate bug")

    c.add_predicate(broken)
    c.add_predicate(lambda exc: C)
    with caplog.at_level(logging.WARNING, logger="idempotask"):
        found = c.classify(RuntimeError("x"))
    assert found.kind is C
    assert "broken" in caplog.text
    assert "predicate bug" in caplog.text


def test_a_predicate_returning_nonsense_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """An answer that is not a kind is logged and ignored."""
    c = Classifier(default_kind=P)
    c.add_predicate(lambda exc: "sometimes")  # type: ignore[arg-type,return-value]
    with caplog.at_level(logging.WARNING, logger="idempotask"):
        assert c.classify(RuntimeError()).kind is P
    assert "sometimes" in caplog.text


def test_markers_beat_the_registry() -> None:
    """The raiser knows best: a marker base wins even behind a registered base."""

    class Declined(ConnectionError, PermanentError):
        pass

    found = classify(Declined("card declined"))
    assert found.kind is P
    assert found.reason == "marker: PermanentError.failure_kind"


def test_markers_beat_predicates_and_user_registrations() -> None:
    """Neither a registration of the marked class nor a predicate overrides a marker."""

    class Flaky(TransientError):
        pass

    c = Classifier()
    c.register(Flaky, P)
    c.add_predicate(lambda exc: P)
    assert c.classify(Flaky()).kind is T


def test_a_failure_kind_attribute_is_a_marker_on_any_exception() -> None:
    """Setting failure_kind on an instance (a kind or its value) reclassifies it."""
    exc = ValueError("upstream rejected the batch")
    exc.failure_kind = "EXTERNAL"  # type: ignore[attr-defined]
    exc.retry_after = 600  # type: ignore[attr-defined]
    found = classify(exc)
    assert (found.kind, found.retry_after) == (E, 600.0)
    assert found.reason == "marker: failure_kind attribute"


def test_a_class_attribute_marker_on_a_user_class() -> None:
    """A user class may declare failure_kind itself instead of using a marker base."""

    class QuotaExceeded(Exception):
        failure_kind = FailureKind.EXTERNAL

    assert classify(QuotaExceeded()).reason == "marker: QuotaExceeded.failure_kind"


def test_an_invalid_marker_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A failure_kind that is no kind falls through to the registry, and says so."""
    exc = ValueError()
    exc.failure_kind = "flaky"  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="idempotask"):
        assert classify(exc).kind is P
    assert "flaky" in caplog.text


@pytest.mark.parametrize(
    ("marker", "kind"),
    [(TransientError, T), (ExternalError, E), (ConfigurationFailure, C), (PermanentError, P)],
)
def test_each_marker_base_class_gives_its_kind(marker: type[Exception], kind: FailureKind) -> None:
    """The four marker bases map to the four kinds."""
    assert classify(marker("x")).kind is kind


def test_marker_retry_after_accepts_seconds_headers_and_timedeltas() -> None:
    """retry_after= takes what a caller has at hand and stores seconds."""
    assert ExternalError("x", retry_after=30).retry_after == 30.0
    assert ExternalError("x", retry_after="120").retry_after == 120.0
    assert ExternalError("x", retry_after=timedelta(minutes=2)).retry_after == 120.0
    soon = datetime.now(timezone.utc) + timedelta(seconds=100)
    hint = ExternalError("x", retry_after=soon).retry_after
    assert hint is not None
    assert 95 <= hint <= 100
    assert ExternalError("x", retry_after="whenever").retry_after is None
    assert classify(ExternalError("x", retry_after=45)).retry_after == 45.0


def test_marker_exceptions_survive_pickling() -> None:
    """A marker with a hint pickles (dead-letter records and worker pools need it)."""
    import pickle

    exc = pickle.loads(pickle.dumps(ExternalError("quota", retry_after=60)))
    assert isinstance(exc, ExternalError)
    assert exc.args == ("quota",)
    assert exc.retry_after == 60.0


def test_a_retry_after_attribute_is_a_hint_whatever_decided_the_kind() -> None:
    """An exception's retry_after attribute completes a registry or default verdict."""

    class Slow(ConnectionError):
        retry_after = 12

    found = classify(Slow())
    assert (found.kind, found.retry_after) == (T, 12.0)
    unknown = RuntimeError()
    unknown.retry_after = "3"  # type: ignore[attr-defined]
    assert classify(unknown).retry_after == 3.0


# --- defaults and configuration -----------------------------------------------------------


def test_unknown_exceptions_get_the_default_kind_which_is_transient() -> None:
    """Nothing matched: default_kind, TRANSIENT unless configured."""

    class Unknown(Exception):
        pass

    found = Classifier().classify(Unknown())
    assert (found.kind, found.reason) == (T, "default")
    assert Classifier(default_kind="permanent").classify(Unknown()).kind is P
    c = Classifier()
    c.default_kind = FailureKind.CONFIGURATION
    assert c.classify(Unknown()).kind is C


def test_default_kind_is_validated() -> None:
    """A bad default_kind names the option and the kinds."""
    with pytest.raises(ConfigurationError, match=r"default_kind.*'transient'"):
        Classifier(default_kind="sometimes")
    c = Classifier()
    with pytest.raises(ConfigurationError, match="default_kind"):
        c.default_kind = 3  # type: ignore[assignment]


def test_register_validates_its_arguments() -> None:
    """A bad exc_type or kind names the option."""
    c = Classifier()
    with pytest.raises(ConfigurationError, match="exc_type"):
        c.register(int, T)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="exc_type"):
        c.register("", T)
    with pytest.raises(ConfigurationError, match="kind"):
        c.register(ValueError, "retry")
    with pytest.raises(ConfigurationError, match="predicate"):
        c.add_predicate("not callable")  # type: ignore[arg-type]


def test_classification_is_validated() -> None:
    """A Classification holds a real kind and a usable hint."""
    assert Classification("external", 5).kind is E  # type: ignore[arg-type]
    assert Classification(T, 5).retry_after == 5.0
    with pytest.raises(ConfigurationError, match="retry_after"):
        Classification(T, -1)
    with pytest.raises(ConfigurationError, match="retry_after"):
        Classification(T, float("nan"))
    with pytest.raises(ConfigurationError, match="kind"):
        Classification("later")  # type: ignore[arg-type]


def test_copy_is_independent() -> None:
    """Registering on a copy leaves the original alone, and the reverse."""
    original = Classifier()
    clone = original.copy()
    clone.register(RuntimeError, P)
    clone.add_predicate(lambda exc: C)
    clone.default_kind = FailureKind.PERMANENT
    assert original.classify(RuntimeError()).kind is T
    assert clone.classify(RuntimeError()).kind is P
    assert clone.classify(Exception()).kind is C
    original.register(Exception, E)
    assert clone.classify(Exception()).kind is C


def test_defaults_false_starts_empty() -> None:
    """Without the defaults nothing is known: not the table, not the heuristics."""
    c = Classifier(defaults=False, default_kind=E)
    assert c.classify(ValueError()).kind is E
    assert c.classify(fake_class("django.core.exceptions", "ImproperlyConfigured")()).kind is E
    assert c.classify(PermanentError()).kind is P  # markers are always honoured


def test_module_helpers_use_the_default_classifier() -> None:
    """register_failure_kind and classify go through default_classifier."""

    class Mine(Exception):
        pass

    register_failure_kind(Mine, "permanent")
    try:
        assert classify(Mine()).kind is P
        assert default_classifier.classify(Mine()).kind is P
    finally:
        default_classifier.unregister(Mine)
    assert classify(Mine()).kind is T


def test_classify_never_raises_on_hostile_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    """Attributes that raise when read are skipped, not propagated."""

    class Hostile(Exception):
        def __getattribute__(self, name: str) -> Any:
            if name in {"failure_kind", "retry_after", "response", "status_code", "sqlstate"}:
                raise RuntimeError(f"no {name} for you")
            return super().__getattribute__(name)

    with caplog.at_level(logging.WARNING, logger="idempotask"):
        assert classify(Hostile()).kind is T


def test_wrapping_cycles_terminate() -> None:
    """A cause chain that loops (built by hand) ends at the depth bound."""
    first = BackendError("a")
    second = BackendError("b")
    first.__cause__ = second
    second.__cause__ = first
    assert classify(first).kind is T
    selfish = BackendError("c")
    selfish.__cause__ = selfish
    assert classify(selfish).kind is T


# --- hints and HTTP -------------------------------------------------------------------------


def test_retry_after_comes_from_the_header_in_seconds_or_as_a_date() -> None:
    """Retry-After in seconds or as an HTTP-date becomes the classification's hint."""
    found = Classifier().classify(requests_http_error(429, {"Retry-After": "120"})())
    assert (found.kind, found.retry_after) == (E, 120.0)
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=300), usegmt=True)
    hint = Classifier().classify(requests_http_error(429, {"retry-after": later})()).retry_after
    assert hint is not None
    assert 290 <= hint <= 300
    assert Classifier().classify(urllib_http_error(503, {"Retry-After": "7"})()).retry_after == 7.0
    boto = boto_client_error("Throttling", 400, {"retry-after": "11"})()
    assert Classifier().classify(boto).retry_after == 11.0
    shaped = fake_httpx_status_error(429, {"Retry-After": "9"})()
    assert Classifier().classify(shaped).retry_after == 9.0


def test_a_broken_retry_after_header_gives_no_hint() -> None:
    """An unusable header is ignored; the kind stands."""
    found = Classifier().classify(requests_http_error(429, {"Retry-After": "soon-ish"})())
    assert (found.kind, found.retry_after) == (E, None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("1.5", 1.5),
        (b"30", 30.0),
        (0, 0.0),
        (7, 7.0),
        (timedelta(seconds=42), 42.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: now
        (datetime(2015, 10, 21, 7, 28, 0), 10.0),  # naive: UTC
        (datetime(2015, 10, 21, 9, 28, 0, tzinfo=timezone(timedelta(hours=2))), 10.0),
        ("-5", None),
        (-5, None),
        (float("inf"), None),
        ("nan", None),
        ("", None),
        ("later", None),
        (True, None),
        (None, None),
        ([], None),
    ],
)
def test_parse_retry_after(value: object, expected: float | None) -> None:
    """Seconds, HTTP-dates, timedeltas and datetimes; anything else is None."""
    now = datetime(2015, 10, 21, 7, 27, 50, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after(value, now=now) == expected


@given(st.one_of(st.text(), st.floats(), st.integers(), st.binary(), st.none()))
def test_parse_retry_after_never_raises(value: object) -> None:
    """Any header garbage gives None or a finite, non-negative number of seconds."""
    hint = parse_retry_after(value)
    assert hint is None or (0 <= hint < float("inf"))


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, T),
        (502, T),
        (503, T),
        (504, T),
        (599, T),
        (408, T),
        (425, T),
        (429, E),
        (401, C),
        (403, C),
        (407, C),
        (511, C),
        (400, P),
        (404, P),
        (409, P),
        (422, P),
        (501, P),
        (505, P),
        (200, None),
        (302, None),
        (700, None),
    ],
)
def test_classify_http_status(status: int, kind: FailureKind | None) -> None:
    """The HTTP status table; non-error statuses have no opinion."""
    found = classify_http_status(status)
    assert (found.kind if found else None) is kind


def test_an_unknown_client_with_a_response_status_code_is_classified() -> None:
    """The duck-typed heuristic reads response.status_code of any library's error."""
    api_error = fake_class("someapi", "APIStatusError")
    exc = api_error("rate limited")
    exc.response = SimpleNamespace(status_code=429, headers={"Retry-After": "4"})  # type: ignore[attr-defined]
    found = classify(exc)
    assert (found.kind, found.retry_after) == (E, 4.0)
    assert found.reason.startswith("heuristic: ")


def test_a_sqlstate_on_an_unknown_driver_is_read() -> None:
    """asyncpg-style errors carry sqlstate; the heuristic maps its class."""
    pg_error = fake_class("asyncpg.exceptions", "SerializationError")
    exc = pg_error("could not serialize")
    exc.sqlstate = "40001"  # type: ignore[attr-defined]
    assert classify(exc).kind is T
    exc.sqlstate = "28P01"  # type: ignore[attr-defined]
    assert classify(exc).kind is C


def test_an_unrelated_class_named_like_dbapi_is_left_alone() -> None:
    """A DataError that does not derive from its package's Error is not a DB error."""
    assert classify(fake_class("pandas.errors", "DataError")()).kind is T  # the default

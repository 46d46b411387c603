"""The built-in rules of the classifier: a table of qualified exception names (standard
library, redis-py, SQLAlchemy and DB-API drivers, HTTP clients, botocore, Django,
idempotask), rules that read an instance (an errno, an HTTP status, a SQLSTATE, a wrapped
error), and heuristics for libraries not in the table. Keyed by name, so nothing is
imported: classifying never loads a driver."""

from __future__ import annotations

import errno as _errno
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TypeGuard, TypeVar

from idempotask.taxonomy._kinds import (
    Classification,
    FailureKind,
    Rule,
    RuleContext,
    parse_retry_after,
)

__all__ = ["BUILTIN", "classify_http_status", "from_heuristics"]

log = logging.getLogger("idempotask")


_T = FailureKind.TRANSIENT
_E = FailureKind.EXTERNAL
_C = FailureKind.CONFIGURATION
_P = FailureKind.PERMANENT
_V = TypeVar("_V")
_Table = dict[str, "FailureKind | Rule"]


def _errnos(names: str) -> set[int]:
    # getattr: several of these do not exist on every platform
    codes = (getattr(_errno, name, None) for name in names.split())
    return {code for code in codes if code is not None}


_ERRNO_KINDS: dict[int, FailureKind] = {
    **dict.fromkeys(
        _errnos(
            "EAGAIN EWOULDBLOCK EINTR EBUSY ETIMEDOUT ECONNRESET ECONNREFUSED ECONNABORTED"
            " EPIPE ESHUTDOWN ENETDOWN ENETUNREACH ENETRESET EHOSTDOWN EHOSTUNREACH"
            " EADDRNOTAVAIL ENOBUFS EMFILE ENFILE ENOMEM EIO ESTALE"
        ),
        _T,
    ),
    **dict.fromkeys(_errnos("EACCES EPERM EROFS ENOENT ENOTDIR EISDIR"), _C),
}


def _oserror_rule(exc: BaseException, ctx: RuleContext) -> Classification | None:
    """An OSError by its errno; an unknown errno passes on (and ends at the default)."""
    code = getattr(exc, "errno", None)
    if not isinstance(code, int) or code not in _ERRNO_KINDS:
        return None
    return Classification(_ERRNO_KINDS[code], None, f"errno {_errno.errorcode.get(code, code)}")


def _keyerror_rule(exc: BaseException, ctx: RuleContext) -> Classification | None:
    """``os.environ["X"]`` on a missing variable is a missing setting, not a bad key.

    Told apart by the frame that raised: the last traceback entry is
    ``os._Environ.__getitem__``. A KeyError never raised (no traceback) is PERMANENT.
    """
    tb = exc.__traceback__
    if tb is not None:
        while tb.tb_next is not None:
            tb = tb.tb_next
        frame = tb.tb_frame
        if frame.f_globals.get("__name__") == "os" and frame.f_code.co_name == "__getitem__":
            return Classification(_C, None, "missing environment variable")
    return Classification(_P, None, "missing key")


def _fallback(kind: FailureKind | None, reason: str) -> Classification | None:
    return None if kind is None else Classification(kind, None, reason)


def _unwrap(
    get: Callable[[BaseException], object],
    fallback: FailureKind | None,
    reason: str = "no known inner error",
) -> Rule:
    """A rule for exceptions that wrap another: the inner one's kind, else ``fallback``."""

    def rule(exc: BaseException, ctx: RuleContext) -> Classification | None:
        wrapped = get(exc)
        if isinstance(wrapped, BaseException):
            found = ctx.inner(wrapped)
            if found is not None:
                return replace(found, reason=f"wraps ({found.reason})")
        return _fallback(fallback, reason)

    return rule


def _backend_rule(exc: BaseException, ctx: RuleContext) -> Classification | None:
    """A store failure takes its cause's kind, except that a PERMANENT cause (a store-side
    data error) says nothing about the call, which is then TRANSIENT like any outage."""
    cause = exc.__cause__
    found = ctx.inner(cause) if cause is not None else None
    if found is not None and found.kind is not _P:
        return replace(found, reason=f"caused by ({found.reason})")
    return Classification(_T, None, "store failure")


def _cached_failure_rule(exc: BaseException, ctx: RuleContext) -> Classification | None:
    """A cached error whose class could not be rebuilt: classify by its type name."""
    type_name = getattr(exc, "type_name", None)
    if not isinstance(type_name, str) or not type_name:
        return None
    kind = ctx.named(type_name)
    return None if kind is None else Classification(kind, None, f"cached {type_name}")


def _retry_error_inner(exc: BaseException) -> object:
    attempt = getattr(exc, "last_attempt", None)
    if attempt is None or not getattr(attempt, "failed", False):
        return None
    return attempt.exception(timeout=0)


# --- HTTP ------------------------------------------------------------------------------


# The statuses whose kind is not their class's (4xx PERMANENT, 5xx TRANSIENT).
_HTTP_STATUSES: dict[int, FailureKind] = {
    429: _E,
    **dict.fromkeys((401, 403, 407, 511), _C),  # credentials, permissions, proxy/network login
    **dict.fromkeys((408, 425), _T),  # request timeout, too early: try again
    **dict.fromkeys((501, 505), _P),  # the server will never support this method or version
}


def _http_kind(status: int) -> FailureKind | None:
    return _HTTP_STATUSES.get(status) or {4: _P, 5: _T}.get(status // 100)


def classify_http_status(status: int, *, retry_after: object = None) -> Classification | None:
    """The classification of an HTTP error status, or None for a non-error status.

    5xx (but 501/505), 408 and 425: TRANSIENT; 429: EXTERNAL; 401, 403, 407 and 511:
    CONFIGURATION; other 4xx, 501 and 505: PERMANENT. ``retry_after`` is the raw
    ``Retry-After`` header, parsed by :func:`parse_retry_after`. Handy in a predicate
    for an HTTP client the table does not know:

    >>> classify_http_status(429, retry_after="30")
    Classification(kind=<FailureKind.EXTERNAL: 'external'>, retry_after=30.0, reason='HTTP 429')
    """
    if isinstance(status, bool) or not isinstance(status, int):
        return None
    kind = _http_kind(int(status))
    if kind is None:
        return None
    return Classification(kind, parse_retry_after(retry_after), f"HTTP {int(status)}")


def _is_status(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599


def _header(headers: object, name: str) -> object:
    get = getattr(headers, "get", None)
    if get is None:
        return None
    try:
        # requests, httpx, aiohttp and email.message headers are case-insensitive;
        # botocore's is a plain dict with lower-case keys.
        value = get(name)
        return value if value is not None else get(name.lower())
    except Exception:
        return None


def _http_status(exc: BaseException, *attrs: str) -> Classification | None:
    """By ``exc.response.status_code`` (requests, httpx, openai...) and the response's
    headers, else by the first of ``exc.status_code`` and ``exc.<attrs>`` that holds a
    status, and ``exc.headers``."""
    response = getattr(exc, "response", None)
    # `is not None`, not truthiness: a requests Response is falsy for 4xx/5xx.
    places = [(response, "status_code")] if response is not None else []
    for owner, attr in [*places, *((exc, attr) for attr in ("status_code", *attrs))]:
        status = getattr(owner, attr, None)
        if _is_status(status):
            headers = getattr(owner, "headers", None)
            return classify_http_status(int(status), retry_after=_header(headers, "Retry-After"))
    return None


def _http(exc: BaseException, ctx: RuleContext) -> Classification | None:
    """The status of a known client's HTTP error: ``response.status_code`` (requests,
    httpx), ``status`` (aiohttp) or ``code`` (urllib)."""
    return _http_status(exc, "status", "code")


def _words(value: _V, names: str, prefix: str = "") -> dict[str, _V]:
    """``value`` for each of the whitespace-separated ``names``, after ``prefix``."""
    return dict.fromkeys([prefix + name for name in names.split()], value)


# botocore's own lists of throttling and transient error codes (retries/standard.py),
# plus the authentication codes AWS services return.
_AWS_CODES: dict[str, FailureKind] = {
    **_words(
        _E,
        """
        Throttling ThrottlingException ThrottledException RequestThrottledException
        TooManyRequestsException ProvisionedThroughputExceededException
        TransactionInProgressException RequestLimitExceeded BandwidthLimitExceeded
        LimitExceededException RequestThrottled SlowDown EC2ThrottledException
        """,
    ),
    **_words(
        _T,
        """
        RequestTimeout RequestTimeoutException PriorRequestNotComplete InternalError
        InternalFailure ServiceUnavailable ServiceUnavailableException
        """,
    ),
    **_words(
        _C,
        """
        AccessDenied AccessDeniedException UnrecognizedClientException InvalidClientTokenId
        InvalidAccessKeyId ExpiredToken ExpiredTokenException SignatureDoesNotMatch
        AuthFailure UnauthorizedOperation MissingAuthenticationToken
        """,
    ),
}


def _botocore_rule(exc: BaseException, ctx: RuleContext) -> Classification | None:
    """botocore's ClientError: the AWS error code first (throttling often comes as a
    400), then the HTTP status."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    code = error.get("Code") if isinstance(error, dict) else None
    headers = meta.get("HTTPHeaders") if isinstance(meta, dict) else None
    hint = parse_retry_after(_header(headers, "Retry-After"))
    kind = None if code is None else _AWS_CODES.get(code)
    if kind is not None:
        return Classification(kind, hint, f"AWS {code}")
    status = meta.get("HTTPStatusCode") if isinstance(meta, dict) else None
    return classify_http_status(status, retry_after=hint) if _is_status(status) else None


# --- databases ---------------------------------------------------------------------------

_SQLSTATE_EXACT: dict[str, FailureKind] = {
    "40001": _T,  # serialization_failure
    "40P01": _T,  # deadlock_detected
    "55P03": _T,  # lock_not_available
    "57014": _T,  # query_canceled (statement_timeout)
    "25006": _T,  # read_only_sql_transaction: a replica after failover
    "42501": _C,  # insufficient_privilege
}
_SQLSTATE_CLASS: dict[str, FailureKind] = {
    "08": _T,  # connection exception
    "40": _T,  # transaction rollback
    "53": _T,  # insufficient resources (too many connections, out of memory, disk full)
    "57": _T,  # operator intervention (admin shutdown, crash recovery)
    "58": _T,  # system error (I/O)
    "28": _C,  # invalid authorization specification (bad password)
    "3D": _C,  # invalid catalog name (no such database)
    "3F": _C,  # invalid schema name
    "0A": _P,  # feature not supported
    "22": _P,  # data exception
    "23": _P,  # integrity constraint violation
    "42": _P,  # syntax error or access rule violation
}
# MySQL/MariaDB error numbers, carried as args[0] by PyMySQL and mysqlclient.
_MYSQL_CODES: dict[int, FailureKind] = {
    **dict.fromkeys((1044, 1045, 1049, 1142, 1143, 1227), _C),  # access denied, no database
    **dict.fromkeys((1040, 1053, 1205, 1213, 2002, 2003, 2006, 2013, 2055), _T),
}
_MYSQL_DRIVERS = frozenset({"pymysql", "MySQLdb", "mysql", "aiomysql", "asyncmy"})


def _db_refinement(exc: BaseException) -> Classification | None:
    """A driver error's SQLSTATE (psycopg, psycopg2, asyncpg) or MySQL error number."""
    for attr in ("sqlstate", "pgcode"):
        code = getattr(exc, attr, None)
        if isinstance(code, str) and len(code) == 5:
            kind = _SQLSTATE_EXACT.get(code) or _SQLSTATE_CLASS.get(code[:2])
            if kind is not None:
                return Classification(kind, None, f"SQLSTATE {code}")
    if type(exc).__module__.partition(".")[0] in _MYSQL_DRIVERS and exc.args:
        number = exc.args[0]
        if isinstance(number, int) and number in _MYSQL_CODES:
            return Classification(_MYSQL_CODES[number], None, f"MySQL error {number}")
    return None


def _db_rule(fallback: FailureKind | None) -> Rule:
    """A DB-API driver error: its SQLSTATE or error number first, else ``fallback``."""

    def rule(exc: BaseException, ctx: RuleContext) -> Classification | None:
        return _db_refinement(exc) or _fallback(fallback, "driver error")

    return rule


def _sqlalchemy_rule(fallback: FailureKind | None) -> Rule:
    """A SQLAlchemy DBAPIError: a disconnect, else the driver error it wraps (``orig``)
    when that is known, else ``fallback`` for its class."""

    unwrap = _unwrap(lambda e: getattr(e, "orig", None), fallback, "database error")

    def rule(exc: BaseException, ctx: RuleContext) -> Classification | None:
        if getattr(exc, "connection_invalidated", False) is True:
            return Classification(_T, None, "connection invalidated")
        return unwrap(exc, ctx)

    return rule


_DBAPI_NAMES: dict[str, FailureKind] = {
    "OperationalError": _T,
    "InterfaceError": _T,
    "IntegrityError": _P,
    "DataError": _P,
    "ProgrammingError": _P,
    "NotSupportedError": _P,
}


def _top(cls: type) -> str:
    return cls.__module__.partition(".")[0]


def _dbapi_heuristic(exc: BaseException, ctx: RuleContext) -> Classification | None:
    """Drivers not in the table (sqlite3, psycopg2, mysqlclient, pyodbc...) by their
    PEP 249 class names, when the class derives from the same package's ``Error`` or
    ``DatabaseError`` (so an unrelated ``DataError`` is left alone)."""
    refined = _db_refinement(exc)
    if refined is not None:
        return refined
    for cls in type(exc).__mro__:
        kind = _DBAPI_NAMES.get(cls.__name__)
        if kind is not None and any(
            base.__name__ in ("DatabaseError", "Error") and _top(base) == _top(cls)
            for base in cls.__mro__[1:]
        ):
            return Classification(kind, None, f"DB-API {cls.__name__}")
    return None


def _improperly_configured_heuristic(exc: BaseException, ctx: RuleContext) -> Classification | None:
    for cls in type(exc).__mro__:
        if cls.__name__.endswith("ImproperlyConfigured"):
            return Classification(_C, None, f"{cls.__name__}")
    return None


def _http_heuristic(exc: BaseException, ctx: RuleContext) -> Classification | None:
    return _http_status(exc)


_HEURISTICS: tuple[Rule, ...] = (
    _improperly_configured_heuristic,
    _http_heuristic,
    _dbapi_heuristic,
)


def from_heuristics(exc: BaseException, ctx: RuleContext) -> Classification | None:
    for heuristic in _HEURISTICS:
        try:
            found = heuristic(exc, ctx)
        except Exception:
            log.warning("failure heuristic %s raised; skipped", heuristic.__name__, exc_info=True)
            continue
        if found is not None:
            return replace(found, reason=f"heuristic: {found.reason}")
    return None


# --- the built-in table ------------------------------------------------------------------
# Keyed by "module.QualName" so nothing is imported; the names are checked against the
# real classes in tests/test_taxonomy.py.


def _driver(make: Callable[[FailureKind | None], Rule], module: str, extra: str) -> _Table:
    """``make(kind)`` for a driver module's PEP 249 classes that have a kind of their own
    (:data:`_DBAPI_NAMES`), and ``make(None)`` for its ``extra`` classes."""
    names = [*extra.split(), *_DBAPI_NAMES]
    return {f"{module}.{name}": make(_DBAPI_NAMES.get(name)) for name in names}


BUILTIN: _Table = {
    # Standard library: blips. socket.timeout, and asyncio's and concurrent.futures'
    # TimeoutError from 3.11, are builtins.TimeoutError; 3.10 has its own classes.
    # ConnectionError: reset, refused, aborted, broken pipe.
    **_words(_T, "TimeoutError ConnectionError BlockingIOError InterruptedError", "builtins."),
    **_words(_T, "TimeoutError IncompleteReadError", "asyncio.exceptions."),
    "concurrent.futures._base.TimeoutError": _T,
    "builtins.OSError": _oserror_rule,  # by errno; other OSErrors get the default
    # DNS: usually a resolver outage (a misspelt host shows at deploy time).
    **_words(_T, "gaierror herror", "socket."),
    "ssl.SSLError": _T,  # EOFs and resets during TLS; certificate errors are below
    "ssl.SSLCertVerificationError": _C,
    "subprocess.TimeoutExpired": _T,
    "http.client.IncompleteRead": _T,
    # Standard library: the environment. A missing path is taken as the environment's
    # fault (a missing config file, mount or directory) rather than the input's: a
    # person fixes it and the one CONFIGURATION retry then succeeds, while a truly
    # missing input costs one retry and ends ABANDONED, as PERMANENT would.
    # ImportError (and ModuleNotFoundError): a missing package.
    **_words(
        _C,
        "PermissionError FileNotFoundError NotADirectoryError IsADirectoryError ImportError",
        "builtins.",
    ),
    # Standard library: the call or the code is wrong. ValueError covers UnicodeError,
    # JSONDecodeError...; a KeyError from os.environ[...] is CONFIGURATION.
    "builtins.KeyError": _keyerror_rule,
    **_words(
        _P,
        """
        LookupError ValueError TypeError AttributeError NameError NotImplementedError
        RecursionError AssertionError ArithmeticError SyntaxError FileExistsError
        """,
        "builtins.",
    ),
    # idempotask itself. CorruptRecordError: foreign data under our key, for a person.
    "idempotask.errors.BackendError": _backend_rule,
    **_words(
        _C, "CorruptRecordError ConfigurationError MissingDependencyError", "idempotask.errors."
    ),
    "idempotask.errors.AlreadyInProgress": _T,
    "idempotask.errors.CachedFailure": _cached_failure_rule,
    "tenacity.RetryError": _unwrap(_retry_error_inner, None),
    # redis-py. ConnectionError covers BusyLoadingError and MaxConnectionsError,
    # ClusterDownError covers MasterDownError, AskError covers MovedError (slots
    # migrating); a ReadOnlyError is a write to a replica during failover.
    # AuthenticationError and AuthorizationError derive from its ConnectionError and are
    # more specific; ModuleError: a server module (RedisJSON...) is not loaded.
    **_words(
        _T,
        """
        ConnectionError TimeoutError BusyLoadingError TryAgainError ClusterDownError
        ReadOnlyError AskError OutOfMemoryError WatchError InvalidResponse
        """,
        "redis.exceptions.",
    ),
    **_words(
        _C,
        """
        AuthenticationError AuthenticationWrongNumberOfArgsError AuthorizationError
        NoPermissionError ModuleError
        """,
        "redis.exceptions.",
    ),
    **_words(_P, "ResponseError DataError", "redis.exceptions."),
    # SQLAlchemy: the wrapped driver error decides when it is known. Its TimeoutError:
    # the connection pool is exhausted; NoSuchModuleError: a dialect or driver is not
    # installed; NoSuchTableError: the schema is not migrated.
    **_driver(_sqlalchemy_rule, "sqlalchemy.exc", "DBAPIError DatabaseError InternalError"),
    **_words(_T, "DisconnectionError TimeoutError", "sqlalchemy.exc."),
    **_words(_C, "NoSuchModuleError NoSuchTableError", "sqlalchemy.exc."),
    **_words(_P, "InvalidRequestError ArgumentError CompileError", "sqlalchemy.exc."),
    # psycopg 3 (its base classes live in the top-level module).
    **_driver(_db_rule, "psycopg", "Error DatabaseError InternalError"),
    **_words(_T, "SerializationFailure DeadlockDetected", "psycopg.errors."),
    **_words(
        _C,
        "InsufficientPrivilege InvalidPassword InvalidAuthorizationSpecification",
        "psycopg.errors.",
    ),
    # PyMySQL.
    **_driver(_db_rule, "pymysql.err", "InternalError"),
    # requests and urllib3. requests' errors are OSErrors, so they must be listed to
    # be more specific than builtins.OSError. requests' ConnectionError covers
    # ConnectTimeout, ProxyError and SSLError; its RetryError: urllib3 retries on a
    # status ran out. urllib3's TimeoutError covers NewConnectionError and
    # NameResolutionError.
    "requests.exceptions.HTTPError": _http,
    **_words(_T, "ConnectionError Timeout ChunkedEncodingError RetryError", "requests.exceptions."),
    **_words(_T, "TimeoutError ProtocolError ProxyError SSLError", "urllib3.exceptions."),
    "urllib3.exceptions.MaxRetryError": _unwrap(lambda e: getattr(e, "reason", None), _T),
    # urllib.
    "urllib.error.HTTPError": _http,
    "urllib.error.URLError": _unwrap(lambda e: getattr(e, "reason", None), _T),
    # httpx (which sets __module__ to "httpx" on its public classes). NetworkError:
    # ConnectError, ReadError, WriteError, CloseError.
    "httpx.HTTPStatusError": _http,
    **_words(_T, "TimeoutException NetworkError RemoteProtocolError ProxyError", "httpx."),
    # aiohttp. ClientConnectionError covers ServerTimeoutError.
    "aiohttp.client_exceptions.ClientResponseError": _http,
    **_words(_T, "ClientConnectionError ClientPayloadError", "aiohttp.client_exceptions."),
    "aiohttp.client_exceptions.ClientConnectorCertificateError": _C,
    # botocore (boto3). ConnectionError: EndpointConnectionError, ConnectTimeout;
    # HTTPClientError: ReadTimeoutError, ConnectionClosedError.
    "botocore.exceptions.ClientError": _botocore_rule,
    **_words(_T, "ConnectionError HTTPClientError", "botocore.exceptions."),
    **_words(
        _C, "NoCredentialsError PartialCredentialsError NoRegionError", "botocore.exceptions."
    ),
    # Django; any other *ImproperlyConfigured is caught by a heuristic.
    "django.core.exceptions.ImproperlyConfigured": _C,
}

"""Failure kinds, and the classifier that tells them apart.

Every failure that reaches the dead-letter queue gets one :class:`FailureKind`, and the
kind picks its retry policy (:mod:`idempotask.retry`):

``TRANSIENT``
    A blip that clears by itself within minutes: a reset connection, a timeout, a
    deadlock, a failover, an HTTP 5xx. Retried soon, with growing waits.
``EXTERNAL``
    A dependency outside our control said "not now": HTTP 429, throttling. Retried
    after hours, honouring the server's ``Retry-After``.
``CONFIGURATION``
    The environment is wrong: credentials, permissions, a missing setting, file or
    module, HTTP 401/403. Only a person can fix it; retried once, much later.
``PERMANENT``
    The call itself is wrong: bad input or a bug (``ValueError``, ``TypeError``, other
    HTTP 4xx). Retrying the same arguments cannot help; kept for a person to look at.

>>> classify(ConnectionResetError()).kind
<FailureKind.TRANSIENT: 'transient'>
>>> classify(PermanentError("card declined")).reason
'marker: PermanentError.failure_kind'

How :meth:`Classifier.classify` decides, first match wins:

1. **Markers on the exception.** A ``failure_kind`` attribute (a :class:`FailureKind`
   or its value, on the instance or its class), which the marker base classes
   :class:`TransientError`, :class:`ExternalError`, :class:`ConfigurationFailure` and
   :class:`PermanentError` set. The code that raises knows best, so markers beat the
   registry: ``class Declined(ConnectionError, PermanentError)`` is PERMANENT.
2. **The registry**, walked along the exception's MRO: the most specific registered
   class wins. At each class a type given to :meth:`Classifier.register` is looked up
   before a ``"module.QualName"`` string. Some built-in entries are rules that read the
   instance (an HTTP status, an ``errno``, a SQLSTATE, a wrapped driver error) and pass
   on to the next class of the MRO when they do not apply.
3. **Predicates** given to :meth:`Classifier.add_predicate`, in the order added.
4. **Built-in heuristics** for libraries not in the table: a class name ending in
   ``ImproperlyConfigured``, an HTTP ``response.status_code``, a SQLSTATE, the
   DB-API (PEP 249) exception names.
5. **default_kind**, TRANSIENT unless configured (see :class:`Classifier`).

A ``retry_after`` hint (seconds) comes from the marker, a ``Retry-After`` header, or a
``retry_after`` attribute on the exception, whichever rule decided the kind.

The built-in table is keyed by qualified names (``"redis.exceptions.TimeoutError"``),
so it imports nothing: classifying never loads a driver. Highlights:

- standard library: ``TimeoutError``, ``ConnectionError``, ``BlockingIOError``,
  ``InterruptedError``, DNS and TLS errors, network ``errno`` values: TRANSIENT;
  ``PermissionError``, ``FileNotFoundError``, ``ImportError``, a ``KeyError`` raised
  by ``os.environ[...]``: CONFIGURATION; ``ValueError``, ``TypeError``, other
  ``KeyError``/``LookupError``, ``AttributeError``, ``ArithmeticError``,
  ``AssertionError``, ``NotImplementedError``: PERMANENT.
- redis-py: connection, timeout, loading, TRYAGAIN, CLUSTERDOWN, READONLY (failover):
  TRANSIENT; authentication and ACL errors: CONFIGURATION; other ``ResponseError`` and
  ``DataError``: PERMANENT.
- SQLAlchemy and DB-API drivers: ``OperationalError``, disconnects, pool timeouts,
  serialization failures, deadlocks: TRANSIENT; bad passwords, missing privileges:
  CONFIGURATION; integrity, data and programming errors: PERMANENT. A SQLAlchemy
  error is classified by the driver error it wraps when that is known.
- HTTP clients (requests, httpx, aiohttp, urllib, botocore): 5xx and timeouts:
  TRANSIENT; 429 and throttling codes: EXTERNAL; 401/403: CONFIGURATION; other 4xx:
  PERMANENT. See :func:`classify_http_status`.
- idempotask: ``BackendError``: TRANSIENT (or its cause's kind);
  ``ConfigurationError``, ``MissingDependencyError``, ``CorruptRecordError``:
  CONFIGURATION.
"""

from __future__ import annotations

import enum
import errno as _errno
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import ClassVar, TypeGuard

from idempotask.errors import ConfigurationError

__all__ = [
    "Classification",
    "ClassifiedError",
    "Classifier",
    "ConfigurationFailure",
    "ExternalError",
    "FailureKind",
    "PermanentError",
    "Predicate",
    "TransientError",
    "classify",
    "classify_http_status",
    "default_classifier",
    "parse_retry_after",
    "register_failure_kind",
]

log = logging.getLogger("idempotask")


class FailureKind(str, enum.Enum):
    """What kind of failure an exception is; each kind has its own retry policy."""

    TRANSIENT = "transient"  # clears by itself within minutes: retry soon
    EXTERNAL = "external"  # someone else's limit: retry after hours
    CONFIGURATION = "configuration"  # needs a person: retry once, much later
    PERMANENT = "permanent"  # the call is wrong: never retried automatically


_KINDS = tuple(kind.value for kind in FailureKind)


def _as_kind(value: object) -> FailureKind | None:
    """A FailureKind for a member or its value (any case), else None."""
    if isinstance(value, FailureKind):
        return value
    if isinstance(value, str):
        try:
            return FailureKind(value.strip().lower())
        except ValueError:
            return None
    return None


def check_kind(option: str, value: object) -> FailureKind:
    """Validate a failure kind option; the error names the option and the kinds."""
    kind = _as_kind(value)
    if kind is None:
        raise ConfigurationError(
            f"{option}: expected a FailureKind or one of {', '.join(map(repr, _KINDS))}, "
            f"got {value!r}"
        )
    return kind


def parse_retry_after(value: object, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or None when it says nothing usable.

    Accepts a number of seconds (an int, a float or a numeric string), an HTTP-date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``), a :class:`~datetime.timedelta` or an aware
    :class:`~datetime.datetime` (a naive one is taken as UTC). A date in the past gives
    0. Negative, non-finite or unparsable values give None: a broken header must not
    break classification. ``now`` (epoch seconds) defaults to :func:`time.time`.

    >>> parse_retry_after("120")
    120.0
    >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0)
    10.0
    >>> parse_retry_after("soon") is None
    True
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, (int, float)):
        seconds = float(value)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    if isinstance(value, bytes):
        try:
            value = value.decode("latin-1")
        except Exception:  # pragma: no cover - latin-1 decodes any bytes
            return None
    when: datetime
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            return parse_retry_after(float(text))
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    else:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)  # HTTP-dates are GMT
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one exception.

    ``kind`` picks the retry policy; ``retry_after`` is a hint in seconds (a
    ``Retry-After`` header, a marker's or an attribute's value) that the policy honours;
    ``reason`` says which rule decided, for failure records and logs.

    >>> Classification(FailureKind.EXTERNAL, 60.0, "HTTP 429")
    Classification(kind=<FailureKind.EXTERNAL: 'external'>, retry_after=60.0, reason='HTTP 429')
    """

    kind: FailureKind
    retry_after: float | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", check_kind("kind", self.kind))
        hint: object = self.retry_after
        if hint is not None:
            if (
                isinstance(hint, bool)
                or not isinstance(hint, (int, float))
                or not math.isfinite(hint)
                or hint < 0
            ):
                raise ConfigurationError(
                    f"retry_after: expected seconds >= 0 or None, got {hint!r}"
                )
            object.__setattr__(self, "retry_after", float(hint))


# --- markers -----------------------------------------------------------------------------


class ClassifiedError(Exception):
    """Base of the marker exceptions: raise a subclass to say what kind a failure is.

    Subclasses set the class attribute ``failure_kind``. ``retry_after`` takes seconds,
    a ``Retry-After`` header value, a timedelta or a datetime; it is turned into seconds
    from now when the exception is made (an unusable value is dropped, so building the
    exception never fails).
    """

    failure_kind: ClassVar[FailureKind]

    def __init__(
        self, *args: object, retry_after: float | str | timedelta | datetime | None = None
    ) -> None:
        super().__init__(*args)
        self.retry_after: float | None = parse_retry_after(retry_after)


class TransientError(ClassifiedError):
    """A failure that should clear by itself soon; retried with short growing waits.

    >>> raise TransientError("replica lagging", retry_after=30)  # doctest: +SKIP
    """

    failure_kind = FailureKind.TRANSIENT


class ExternalError(ClassifiedError):
    """A dependency we do not control refused for now (a quota, a rate limit).

    >>> raise ExternalError("quota", retry_after=resp.headers["Retry-After"])  # doctest: +SKIP
    """

    failure_kind = FailureKind.EXTERNAL


class ConfigurationFailure(ClassifiedError):
    """The environment is wrong (a missing setting, a bad credential); a person must act.

    Not to be confused with :class:`idempotask.errors.ConfigurationError`, which
    idempotask raises for its own bad options (and which is classified CONFIGURATION).

    >>> if "PAYMENTS_URL" not in os.environ:  # doctest: +SKIP
    ...     raise ConfigurationFailure("PAYMENTS_URL is not set")
    """

    failure_kind = FailureKind.CONFIGURATION


class PermanentError(ClassifiedError):
    """The call cannot succeed with these arguments; never retried automatically.

    >>> raise PermanentError(f"order {order_id} does not exist")  # doctest: +SKIP
    """

    failure_kind = FailureKind.PERMANENT


# --- the classifier ----------------------------------------------------------------------

Predicate = Callable[[BaseException], FailureKind | str | Classification | None]
"""A user rule: a kind (or a full Classification) for exceptions it knows, else None."""


# Wrapped exceptions nest (a BackendError around a SQLAlchemy error around a driver
# error); a bound stops a cycle built by hand from recursing forever.
_MAX_DEPTH = 4


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _normalize_name(name: str) -> str:
    name = name.strip()
    return name if "." in name else f"builtins.{name}"


class _Context:
    """What a built-in rule may ask of the classifier running it."""

    __slots__ = ("_classifier", "_depth", "_exc")

    def __init__(self, classifier: Classifier, exc: BaseException, depth: int) -> None:
        self._classifier = classifier
        self._exc = exc
        self._depth = depth

    def inner(self, wrapped: BaseException) -> Classification | None:
        """The classification of a wrapped exception, or None (no default applied)."""
        if self._depth >= _MAX_DEPTH or wrapped is self._exc:
            return None
        return self._classifier._find(wrapped, self._depth + 1)

    def named(self, name: str) -> FailureKind | None:
        """The kind registered under a qualified name, if it is a plain kind."""
        entry = self._classifier._names.get(_normalize_name(name))
        return entry if isinstance(entry, FailureKind) else None


# A built-in registry rule reads the instance and returns None to pass on to the next
# class of the MRO.
_Rule = Callable[[BaseException, _Context], Classification | None]


class Classifier:
    """Decides the :class:`FailureKind` of exceptions; see the module for the order.

    >>> c = Classifier(default_kind="permanent")
    >>> class PaymentDeclined(Exception): ...
    >>> c.register(PaymentDeclined, FailureKind.PERMANENT)
    >>> c.classify(TimeoutError()).kind.value
    'transient'

    ``default_kind`` is what an exception nothing recognises gets. It is TRANSIENT by
    default because the calls idempotask protects are idempotent, so a retry is safe,
    and the two mistakes cost differently: a bug taken for TRANSIENT costs a few
    retries over hours and ends ABANDONED like a PERMANENT one would, while a blip
    taken for PERMANENT leaves the work undone until a person requeues it. The common
    bug types (``ValueError``, ``TypeError``, ``KeyError``...) are in the table as
    PERMANENT anyway, so what is left unknown is mostly library-specific I/O errors.

    ``defaults=False`` starts with an empty registry and no built-in heuristics.
    Registrations are meant for start-up; classifying is safe from any thread.
    """

    def __init__(
        self, *, default_kind: FailureKind | str = FailureKind.TRANSIENT, defaults: bool = True
    ) -> None:
        self._default_kind = check_kind("default_kind", default_kind)
        self._defaults = bool(defaults)
        self._types: dict[type[BaseException], FailureKind] = {}
        self._names: dict[str, FailureKind | _Rule] = dict(_BUILTIN) if defaults else {}
        # A tuple swapped whole on change, so classifying iterates without a lock.
        self._predicates: tuple[Predicate, ...] = ()

    @property
    def default_kind(self) -> FailureKind:
        """The kind of exceptions nothing else recognises."""
        return self._default_kind

    @default_kind.setter
    def default_kind(self, value: FailureKind | str) -> None:
        self._default_kind = check_kind("default_kind", value)

    def register(self, exc_type: type[BaseException] | str, kind: FailureKind | str) -> None:
        """Classify ``exc_type`` and its subclasses as ``kind``.

        ``exc_type`` is a class or its ``"module.QualName"`` (a bare name means a
        builtin), which needs no import: ``register("stripe.error.CardError",
        "permanent")``. A later registration of the same class replaces the earlier
        one, built-in entries included; a subclass registered separately stays more
        specific.
        """
        key = self._key(exc_type)
        checked = check_kind("kind", kind)
        if isinstance(key, str):
            self._names[key] = checked
        else:
            self._types[key] = checked

    def unregister(self, exc_type: type[BaseException] | str) -> None:
        """Forget a registration (a class or a name; unknown ones are ignored)."""
        key = self._key(exc_type)
        if isinstance(key, str):
            self._names.pop(key, None)
        else:
            self._types.pop(key, None)

    @staticmethod
    def _key(exc_type: object) -> type[BaseException] | str:
        if isinstance(exc_type, str) and exc_type.strip():
            return _normalize_name(exc_type)
        if isinstance(exc_type, type) and issubclass(exc_type, BaseException):
            return exc_type
        raise ConfigurationError(
            f"exc_type: expected an exception class or its 'module.QualName', got {exc_type!r}"
        )

    def add_predicate(self, predicate: Predicate) -> Callable[[], None]:
        """Ask ``predicate(exc)`` after the registry; returns a function that removes it.

        A predicate returns a :class:`FailureKind` (or its value), a full
        :class:`Classification` (to give a ``retry_after`` too), or None to pass.
        Predicates run in the order added; one that raises is logged and skipped.

        >>> remove = default_classifier.add_predicate(
        ...     lambda exc: "external" if "quota" in str(exc) else None)
        >>> remove()
        """
        if not callable(predicate):
            raise ConfigurationError(f"predicate: expected a callable, got {predicate!r}")
        self._predicates = (*self._predicates, predicate)
        return lambda: self.remove_predicate(predicate)

    def remove_predicate(self, predicate: Predicate) -> None:
        """Stop asking ``predicate``; unknown predicates are ignored."""
        self._predicates = tuple(p for p in self._predicates if p is not predicate)

    def copy(self) -> Classifier:
        """An independent copy: registering on it leaves this classifier alone."""
        other = Classifier(default_kind=self._default_kind, defaults=False)
        other._defaults = self._defaults
        other._types = dict(self._types)
        other._names = dict(self._names)
        other._predicates = self._predicates
        return other

    def classify(self, exc: BaseException) -> Classification:
        """The :class:`Classification` of ``exc``; never raises.

        >>> Classifier().classify(PermissionError()).kind.value
        'configuration'
        """
        found = self._find(exc, 0)
        if found is not None:
            return found
        return Classification(self._default_kind, _attribute_hint(exc), "default")

    # The stages, in order; each returns None to pass to the next.

    def _find(self, exc: BaseException, depth: int) -> Classification | None:
        ctx = _Context(self, exc, depth)
        found = (
            _from_marker(exc)
            or self._from_registry(exc, ctx)
            or self._from_predicates(exc)
            or (_from_heuristics(exc, ctx) if self._defaults else None)
        )
        if found is not None and found.retry_after is None:
            hint = _attribute_hint(exc)
            if hint is not None:
                found = replace(found, retry_after=hint)
        return found

    def _from_registry(self, exc: BaseException, ctx: _Context) -> Classification | None:
        for cls in type(exc).__mro__:
            entry: FailureKind | _Rule | None = self._types.get(cls)
            name = _name(cls)
            if entry is None:
                entry = self._names.get(name)
            if entry is None:
                continue
            if isinstance(entry, FailureKind):
                return Classification(entry, None, f"registry: {name}")
            try:
                result = entry(exc, ctx)
            except Exception:
                log.warning("built-in failure rule for %s raised; skipped", name, exc_info=True)
                continue
            if result is not None:
                return replace(result, reason=f"registry: {name}: {result.reason}")
        return None

    def _from_predicates(self, exc: BaseException) -> Classification | None:
        for predicate in self._predicates:
            label = getattr(predicate, "__qualname__", None) or repr(predicate)
            try:
                answer = predicate(exc)
            except Exception:
                log.warning("failure predicate %s raised; skipped", label, exc_info=True)
                continue
            if answer is None:
                continue
            if isinstance(answer, Classification):
                return answer if answer.reason else replace(answer, reason=f"predicate: {label}")
            kind = _as_kind(answer)
            if kind is None:
                log.warning("failure predicate %s returned %r, not a kind; skipped", label, answer)
                continue
            return Classification(kind, None, f"predicate: {label}")
        return None


def _attribute_hint(exc: BaseException) -> float | None:
    try:
        return parse_retry_after(getattr(exc, "retry_after", None))
    except Exception:  # a property that raises must not break classification
        return None


def _from_marker(exc: BaseException) -> Classification | None:
    try:
        raw = getattr(exc, "failure_kind", None)
    except Exception:
        log.warning("reading failure_kind of %s raised; ignored", _name(type(exc)), exc_info=True)
        return None
    if raw is None:
        return None
    kind = _as_kind(raw)
    if kind is None:
        log.warning(
            "ignoring failure_kind=%r on %s: expected one of %s", raw, _name(type(exc)), _KINDS
        )
        return None
    if "failure_kind" in getattr(exc, "__dict__", {}):
        where = "failure_kind attribute"
    else:
        owner = next((c for c in type(exc).__mro__ if "failure_kind" in vars(c)), type(exc))
        where = f"{owner.__name__}.failure_kind"
    return Classification(kind, _attribute_hint(exc), f"marker: {where}")


# --- built-in rules ----------------------------------------------------------------------

_T = FailureKind.TRANSIENT
_E = FailureKind.EXTERNAL
_C = FailureKind.CONFIGURATION
_P = FailureKind.PERMANENT


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


def _oserror_rule(exc: BaseException, ctx: _Context) -> Classification | None:
    """An OSError by its errno; an unknown errno passes on (and ends at the default)."""
    code = getattr(exc, "errno", None)
    if not isinstance(code, int) or code not in _ERRNO_KINDS:
        return None
    return Classification(_ERRNO_KINDS[code], None, f"errno {_errno.errorcode.get(code, code)}")


def _keyerror_rule(exc: BaseException, ctx: _Context) -> Classification | None:
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


def _unwrap(get: Callable[[BaseException], object], fallback: FailureKind | None) -> _Rule:
    """A rule for exceptions that wrap another: the inner one's kind, else ``fallback``."""

    def rule(exc: BaseException, ctx: _Context) -> Classification | None:
        wrapped = get(exc)
        if isinstance(wrapped, BaseException):
            found = ctx.inner(wrapped)
            if found is not None:
                return replace(found, reason=f"wraps ({found.reason})")
        return None if fallback is None else Classification(fallback, None, "no known inner error")

    return rule


def _backend_rule(exc: BaseException, ctx: _Context) -> Classification | None:
    """A store failure takes its cause's kind, except that a PERMANENT cause (a store-side
    data error) says nothing about the call, which is then TRANSIENT like any outage."""
    cause = exc.__cause__
    found = ctx.inner(cause) if cause is not None else None
    if found is not None and found.kind is not _P:
        return replace(found, reason=f"caused by ({found.reason})")
    return Classification(_T, None, "store failure")


def _cached_failure_rule(exc: BaseException, ctx: _Context) -> Classification | None:
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


def _http_kind(status: int) -> FailureKind | None:
    if status == 429:
        return _E
    if status in (401, 403, 407, 511):  # credentials, permissions, proxy/network login
        return _C
    if status in (408, 425):  # request timeout, too early: try again
        return _T
    if 400 <= status < 500:
        return _P
    if status in (501, 505):  # the server will never support this method or version
        return _P
    if 500 <= status < 600:
        return _T
    return None


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


def _http_response_status(exc: BaseException) -> tuple[int, object] | None:
    """``exc.response.status_code`` (requests, httpx, openai...) and its headers."""
    response = getattr(exc, "response", None)
    # `is not None`, not truthiness: a requests Response is falsy for 4xx/5xx.
    if response is not None:
        status = getattr(response, "status_code", None)
        if _is_status(status):
            return int(status), getattr(response, "headers", None)
    status = getattr(exc, "status_code", None)
    if _is_status(status):
        return int(status), getattr(exc, "headers", None)
    return None


def _http_rule(exc: BaseException, ctx: _Context) -> Classification | None:
    """The status of a known client's HTTP error: ``response.status_code`` (requests,
    httpx), ``status`` (aiohttp) or ``code`` (urllib)."""
    found = _http_response_status(exc)
    if found is None:
        for attr in ("status", "code"):
            status = getattr(exc, attr, None)
            if _is_status(status):
                found = int(status), getattr(exc, "headers", None)
                break
    if found is None:
        return None
    status, headers = found
    return classify_http_status(status, retry_after=_header(headers, "Retry-After"))


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# botocore's own lists of throttling and transient error codes (retries/standard.py),
# plus the authentication codes AWS services return.
_AWS_THROTTLING = _words(
    """
    Throttling ThrottlingException ThrottledException RequestThrottledException
    TooManyRequestsException ProvisionedThroughputExceededException
    TransactionInProgressException RequestLimitExceeded BandwidthLimitExceeded
    LimitExceededException RequestThrottled SlowDown EC2ThrottledException
    """
)
_AWS_TRANSIENT = _words(
    """
    RequestTimeout RequestTimeoutException PriorRequestNotComplete InternalError
    InternalFailure ServiceUnavailable ServiceUnavailableException
    """
)
_AWS_CONFIGURATION = _words(
    """
    AccessDenied AccessDeniedException UnrecognizedClientException InvalidClientTokenId
    InvalidAccessKeyId ExpiredToken ExpiredTokenException SignatureDoesNotMatch AuthFailure
    UnauthorizedOperation MissingAuthenticationToken
    """
)


def _botocore_rule(exc: BaseException, ctx: _Context) -> Classification | None:
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
    if code in _AWS_THROTTLING:
        return Classification(_E, hint, f"AWS {code}")
    if code in _AWS_TRANSIENT:
        return Classification(_T, hint, f"AWS {code}")
    if code in _AWS_CONFIGURATION:
        return Classification(_C, hint, f"AWS {code}")
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


def _db_rule(fallback: FailureKind | None) -> _Rule:
    """A DB-API driver error: its SQLSTATE or error number first, else ``fallback``."""

    def rule(exc: BaseException, ctx: _Context) -> Classification | None:
        found = _db_refinement(exc)
        if found is not None:
            return found
        return None if fallback is None else Classification(fallback, None, "driver error")

    return rule


def _sqlalchemy_rule(fallback: FailureKind | None) -> _Rule:
    """A SQLAlchemy DBAPIError: a disconnect, else the driver error it wraps (``orig``)
    when that is known, else ``fallback`` for its class."""

    def rule(exc: BaseException, ctx: _Context) -> Classification | None:
        if getattr(exc, "connection_invalidated", False) is True:
            return Classification(_T, None, "connection invalidated")
        orig = getattr(exc, "orig", None)
        if isinstance(orig, BaseException):
            found = ctx.inner(orig)
            if found is not None:
                return replace(found, reason=f"wraps ({found.reason})")
        return None if fallback is None else Classification(fallback, None, "database error")

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


def _dbapi_heuristic(exc: BaseException, ctx: _Context) -> Classification | None:
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


def _improperly_configured_heuristic(exc: BaseException, ctx: _Context) -> Classification | None:
    for cls in type(exc).__mro__:
        if cls.__name__.endswith("ImproperlyConfigured"):
            return Classification(_C, None, f"{cls.__name__}")
    return None


def _http_heuristic(exc: BaseException, ctx: _Context) -> Classification | None:
    found = _http_response_status(exc)
    if found is None:
        return None
    status, headers = found
    return classify_http_status(status, retry_after=_header(headers, "Retry-After"))


_HEURISTICS: tuple[_Rule, ...] = (
    _improperly_configured_heuristic,
    _http_heuristic,
    _dbapi_heuristic,
)


def _from_heuristics(exc: BaseException, ctx: _Context) -> Classification | None:
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

_http = _http_rule

_BUILTIN: dict[str, FailureKind | _Rule] = {
    # Standard library: blips. socket.timeout, and asyncio's and concurrent.futures'
    # TimeoutError from 3.11, are builtins.TimeoutError; 3.10 has its own classes.
    "builtins.TimeoutError": _T,
    "asyncio.exceptions.TimeoutError": _T,
    "concurrent.futures._base.TimeoutError": _T,
    "builtins.ConnectionError": _T,  # reset, refused, aborted, broken pipe
    "builtins.BlockingIOError": _T,
    "builtins.InterruptedError": _T,
    "builtins.OSError": _oserror_rule,  # by errno; other OSErrors get the default
    # DNS: usually a resolver outage (a misspelt host shows at deploy time).
    "socket.gaierror": _T,
    "socket.herror": _T,
    "ssl.SSLError": _T,  # EOFs and resets during TLS; certificate errors are below
    "ssl.SSLCertVerificationError": _C,
    "subprocess.TimeoutExpired": _T,
    "asyncio.exceptions.IncompleteReadError": _T,
    "http.client.IncompleteRead": _T,
    # Standard library: the environment. A missing path is taken as the environment's
    # fault (a missing config file, mount or directory) rather than the input's: a
    # person fixes it and the one CONFIGURATION retry then succeeds, while a truly
    # missing input costs one retry and ends ABANDONED, as PERMANENT would.
    "builtins.PermissionError": _C,
    "builtins.FileNotFoundError": _C,
    "builtins.NotADirectoryError": _C,
    "builtins.IsADirectoryError": _C,
    "builtins.ImportError": _C,  # and ModuleNotFoundError: a missing package
    # Standard library: the call or the code is wrong.
    "builtins.KeyError": _keyerror_rule,  # but os.environ[...] is CONFIGURATION
    "builtins.LookupError": _P,
    "builtins.ValueError": _P,  # UnicodeError, JSONDecodeError...
    "builtins.TypeError": _P,
    "builtins.AttributeError": _P,
    "builtins.NameError": _P,
    "builtins.NotImplementedError": _P,
    "builtins.RecursionError": _P,
    "builtins.AssertionError": _P,
    "builtins.ArithmeticError": _P,
    "builtins.SyntaxError": _P,
    "builtins.FileExistsError": _P,
    # idempotask itself.
    "idempotask.errors.BackendError": _backend_rule,
    "idempotask.errors.CorruptRecordError": _C,  # foreign data under our key: a person
    "idempotask.errors.ConfigurationError": _C,
    "idempotask.errors.MissingDependencyError": _C,
    "idempotask.errors.AlreadyInProgress": _T,
    "idempotask.errors.CachedFailure": _cached_failure_rule,
    "tenacity.RetryError": _unwrap(_retry_error_inner, None),
    # redis-py. AuthenticationError and AuthorizationError derive from its
    # ConnectionError and are more specific.
    "redis.exceptions.ConnectionError": _T,  # and BusyLoadingError, MaxConnectionsError
    "redis.exceptions.TimeoutError": _T,
    "redis.exceptions.BusyLoadingError": _T,
    "redis.exceptions.TryAgainError": _T,
    "redis.exceptions.ClusterDownError": _T,  # and MasterDownError
    "redis.exceptions.ReadOnlyError": _T,  # writing to a replica during failover
    "redis.exceptions.AskError": _T,  # and MovedError: slots migrating
    "redis.exceptions.OutOfMemoryError": _T,
    "redis.exceptions.WatchError": _T,
    "redis.exceptions.InvalidResponse": _T,
    "redis.exceptions.AuthenticationError": _C,
    "redis.exceptions.AuthenticationWrongNumberOfArgsError": _C,
    "redis.exceptions.AuthorizationError": _C,
    "redis.exceptions.NoPermissionError": _C,
    "redis.exceptions.ModuleError": _C,  # a server module (RedisJSON...) is not loaded
    "redis.exceptions.ResponseError": _P,
    "redis.exceptions.DataError": _P,
    # SQLAlchemy: the wrapped driver error decides when it is known.
    "sqlalchemy.exc.DBAPIError": _sqlalchemy_rule(None),
    "sqlalchemy.exc.DatabaseError": _sqlalchemy_rule(None),
    "sqlalchemy.exc.InternalError": _sqlalchemy_rule(None),
    "sqlalchemy.exc.OperationalError": _sqlalchemy_rule(_T),
    "sqlalchemy.exc.InterfaceError": _sqlalchemy_rule(_T),
    "sqlalchemy.exc.IntegrityError": _sqlalchemy_rule(_P),
    "sqlalchemy.exc.DataError": _sqlalchemy_rule(_P),
    "sqlalchemy.exc.ProgrammingError": _sqlalchemy_rule(_P),
    "sqlalchemy.exc.NotSupportedError": _sqlalchemy_rule(_P),
    "sqlalchemy.exc.DisconnectionError": _T,
    "sqlalchemy.exc.TimeoutError": _T,  # the connection pool is exhausted
    "sqlalchemy.exc.NoSuchModuleError": _C,  # a dialect or driver is not installed
    "sqlalchemy.exc.NoSuchTableError": _C,  # the schema is not migrated
    "sqlalchemy.exc.InvalidRequestError": _P,
    "sqlalchemy.exc.ArgumentError": _P,
    "sqlalchemy.exc.CompileError": _P,
    # psycopg 3 (its base classes live in the top-level module).
    "psycopg.Error": _db_rule(None),
    "psycopg.DatabaseError": _db_rule(None),
    "psycopg.InternalError": _db_rule(None),
    "psycopg.OperationalError": _db_rule(_T),
    "psycopg.InterfaceError": _db_rule(_T),
    "psycopg.IntegrityError": _db_rule(_P),
    "psycopg.DataError": _db_rule(_P),
    "psycopg.ProgrammingError": _db_rule(_P),
    "psycopg.NotSupportedError": _db_rule(_P),
    "psycopg.errors.SerializationFailure": _T,
    "psycopg.errors.DeadlockDetected": _T,
    "psycopg.errors.InsufficientPrivilege": _C,
    "psycopg.errors.InvalidPassword": _C,
    "psycopg.errors.InvalidAuthorizationSpecification": _C,
    # PyMySQL.
    "pymysql.err.OperationalError": _db_rule(_T),
    "pymysql.err.InterfaceError": _db_rule(_T),
    "pymysql.err.InternalError": _db_rule(None),
    "pymysql.err.IntegrityError": _db_rule(_P),
    "pymysql.err.DataError": _db_rule(_P),
    "pymysql.err.ProgrammingError": _db_rule(_P),
    "pymysql.err.NotSupportedError": _db_rule(_P),
    # requests and urllib3. requests' errors are OSErrors, so they must be listed to
    # be more specific than builtins.OSError.
    "requests.exceptions.HTTPError": _http,
    "requests.exceptions.ConnectionError": _T,  # and ConnectTimeout, ProxyError, SSLError
    "requests.exceptions.Timeout": _T,
    "requests.exceptions.ChunkedEncodingError": _T,
    "requests.exceptions.RetryError": _T,  # urllib3 retries on a status ran out
    "urllib3.exceptions.TimeoutError": _T,  # and NewConnectionError, NameResolutionError
    "urllib3.exceptions.ProtocolError": _T,
    "urllib3.exceptions.ProxyError": _T,
    "urllib3.exceptions.SSLError": _T,
    "urllib3.exceptions.MaxRetryError": _unwrap(lambda e: getattr(e, "reason", None), _T),
    # urllib.
    "urllib.error.HTTPError": _http,
    "urllib.error.URLError": _unwrap(lambda e: getattr(e, "reason", None), _T),
    # httpx (which sets __module__ to "httpx" on its public classes).
    "httpx.HTTPStatusError": _http,
    "httpx.TimeoutException": _T,
    "httpx.NetworkError": _T,  # ConnectError, ReadError, WriteError, CloseError
    "httpx.RemoteProtocolError": _T,
    "httpx.ProxyError": _T,
    # aiohttp.
    "aiohttp.client_exceptions.ClientResponseError": _http,
    "aiohttp.client_exceptions.ClientConnectionError": _T,  # and ServerTimeoutError
    "aiohttp.client_exceptions.ClientPayloadError": _T,
    "aiohttp.client_exceptions.ClientConnectorCertificateError": _C,
    # botocore (boto3).
    "botocore.exceptions.ClientError": _botocore_rule,
    "botocore.exceptions.ConnectionError": _T,  # EndpointConnectionError, ConnectTimeout
    "botocore.exceptions.HTTPClientError": _T,  # ReadTimeoutError, ConnectionClosedError
    "botocore.exceptions.NoCredentialsError": _C,
    "botocore.exceptions.PartialCredentialsError": _C,
    "botocore.exceptions.NoRegionError": _C,
    # Django; any other *ImproperlyConfigured is caught by a heuristic.
    "django.core.exceptions.ImproperlyConfigured": _C,
}

default_classifier = Classifier()
"""The classifier :func:`classify` and the dead-letter queue use unless given another."""


def classify(exc: BaseException) -> Classification:
    """``default_classifier.classify(exc)``.

    >>> classify(ValueError("bad amount")).kind.value
    'permanent'
    """
    return default_classifier.classify(exc)


def register_failure_kind(exc_type: type[BaseException] | str, kind: FailureKind | str) -> None:
    """``default_classifier.register(exc_type, kind)``.

    >>> register_failure_kind("stripe.error.RateLimitError", FailureKind.EXTERNAL)
    """
    default_classifier.register(exc_type, kind)

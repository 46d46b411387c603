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

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import ClassVar

from idempotask.errors import ConfigurationError
from idempotask.taxonomy._kinds import (
    KINDS,
    Classification,
    FailureKind,
    Rule,
    as_kind,
    check_kind,
    parse_retry_after,
)
from idempotask.taxonomy._rules import BUILTIN, classify_http_status, from_heuristics

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
    "check_kind",
    "classify",
    "classify_http_status",
    "default_classifier",
    "parse_retry_after",
    "register_failure_kind",
]

log = logging.getLogger("idempotask")

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
    """The :class:`RuleContext` of one exception being classified."""

    __slots__ = ("_classifier", "_depth", "_exc")

    def __init__(self, classifier: Classifier, exc: BaseException, depth: int) -> None:
        self._classifier = classifier
        self._exc = exc
        self._depth = depth

    def inner(self, wrapped: BaseException) -> Classification | None:
        if self._depth >= _MAX_DEPTH or wrapped is self._exc:
            return None
        return self._classifier._find(wrapped, self._depth + 1)

    def named(self, name: str) -> FailureKind | None:
        entry = self._classifier._registry.get(_normalize_name(name))
        return entry if isinstance(entry, FailureKind) else None


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
        # Classes given to register() and "module.QualName" strings, in one table.
        self._registry: dict[type[BaseException] | str, FailureKind | Rule] = {}
        if defaults:
            self._registry.update(BUILTIN)
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
        self._registry[key] = check_kind("kind", kind)

    def unregister(self, exc_type: type[BaseException] | str) -> None:
        """Forget a registration (a class or a name; unknown ones are ignored)."""
        self._registry.pop(self._key(exc_type), None)

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
        other._registry = dict(self._registry)
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
            or (from_heuristics(exc, ctx) if self._defaults else None)
        )
        if found is not None and found.retry_after is None:
            hint = _attribute_hint(exc)
            if hint is not None:
                found = replace(found, retry_after=hint)
        return found

    def _from_registry(self, exc: BaseException, ctx: _Context) -> Classification | None:
        for cls in type(exc).__mro__:
            name = _name(cls)
            entry = self._registry.get(cls)
            if entry is None:
                entry = self._registry.get(name)
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
            kind = as_kind(answer)
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
    kind = as_kind(raw)
    if kind is None:
        log.warning(
            "ignoring failure_kind=%r on %s: expected one of %s", raw, _name(type(exc)), KINDS
        )
        return None
    if "failure_kind" in getattr(exc, "__dict__", {}):
        where = "failure_kind attribute"
    else:
        owner = next((c for c in type(exc).__mro__ if "failure_kind" in vars(c)), type(exc))
        where = f"{owner.__name__}.failure_kind"
    return Classification(kind, _attribute_hint(exc), f"marker: {where}")


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

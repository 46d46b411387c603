"""The pieces every dead-letter module shares: the I/O protocol between the logic
and its sync and async drivers, and the pure functions that turn failures into letters
and decide what happens to them next."""

from __future__ import annotations

import datetime as _dt
import enum
import inspect
import logging
import math
import traceback as _traceback
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from idempotask import config
from idempotask.backends.deadletters import OPEN_STATUSES, DeadLetter, DeadLetterFilter, Status
from idempotask.errors import (
    AlreadyInProgress,
    ConfigurationError,
    IdempotaskError,
    KeyMismatchError,
)
from idempotask.lease import LeaseLostWarning
from idempotask.retry import RetryPolicy
from idempotask.serializers import get_serializer
from idempotask.taxonomy import Classification, Classifier, FailureKind, check_kind

log = logging.getLogger("idempotask")

T = TypeVar("T")

_CAS_TRIES = 50  # read-modify-write rounds before a transition gives up
_PAGE = 500  # letters per query page when a bulk operation walks a filter
_MAX_MESSAGE = 8 * 1024
_MAX_TRACEBACK = 64 * 1024
_JSON = get_serializer("json")

# Never dead-lettered: the work is being done elsewhere (AlreadyInProgress, a lost lease
# under warnings-as-errors) or the caller misused an explicit key (KeyMismatchError).
# Public in the package: the framework integrations extend it with their control flow.
NOT_DEAD_LETTERED: tuple[type[BaseException], ...] = (
    AlreadyInProgress,
    KeyMismatchError,
    LeaseLostWarning,
)


class DeadLetterNotFound(IdempotaskError, LookupError):
    """No dead letter has this id."""

    __module__ = "idempotask.deadletter"


class ReplayError(IdempotaskError):
    """A dead letter cannot be replayed as stored (arguments missing or unstorable)."""

    __module__ = "idempotask.deadletter"


Policies = Mapping[FailureKind, RetryPolicy]
Hook = Callable[[DeadLetter], object]
RouteHandler = Callable[[DeadLetter, dict[str, Any]], object]
"""Re-submits a letter to a framework: ``handler(letter, arguments)``; returning means
enqueued, raising means this replay failed."""


@dataclass(frozen=True, slots=True)
class Unserializable:
    """Stands in, in a stored letter, for an argument the JSON serializer cannot hold.

    A letter holding one is kept for people to read but cannot be replayed; use
    ``redact=`` to store something replayable instead (an id rather than an object).
    """

    type_name: str
    reason: str = ""


# Stored letters name the class by module and qualified name: the public module keeps
# them readable if this package's internals move.
Unserializable.__module__ = "idempotask.deadletter"


# ----------------------------------------------------------------------------------------
# The I/O protocol between the logic and its sync and async drivers.
# ----------------------------------------------------------------------------------------


class _Op:
    """One operation a flow needs: ``fn`` for sync drivers, ``afn`` (a coroutine
    function) for async ones; without ``afn`` both call ``fn`` (quick local work)."""

    __slots__ = ("afn", "args", "fn", "kwargs")

    def __init__(
        self,
        fn: Callable[..., Any],
        afn: Callable[..., Awaitable[Any]] | None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.fn = fn
        self.afn = afn
        self.args = args
        self.kwargs = kwargs


Flow = Generator[_Op, Any, T]


def _drive(flow: Flow[T]) -> T:
    """Run ``flow`` synchronously; an operation's exception is thrown back into it."""
    send: Any = None
    error: Exception | None = None
    while True:
        try:
            op = flow.send(send) if error is None else flow.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        send, error = None, None
        try:
            send = op.fn(*op.args, **op.kwargs)
        except Exception as exc:
            error = exc


async def _adrive(flow: Flow[T]) -> T:
    """Run ``flow`` on the event loop, awaiting the async form of each operation."""
    send: Any = None
    error: Exception | None = None
    while True:
        try:
            op = flow.send(send) if error is None else flow.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        send, error = None, None
        try:
            if op.afn is None:
                send = op.fn(*op.args, **op.kwargs)
            else:
                send = await op.afn(*op.args, **op.kwargs)
        except Exception as exc:
            error = exc


# ----------------------------------------------------------------------------------------
# Pure helpers: what a failure looks like as a letter, and what happens to it next.
# ----------------------------------------------------------------------------------------


def _qualified(cls: type) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls.__name__)}"


def _clip(text: str, limit: int, *, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    note = f"... [{len(text) - limit} characters cut] ..."
    return note + text[-limit:] if keep_end else text[:limit] + note


def _describe(error: BaseException) -> tuple[str, str, str]:
    """(qualified type, message, traceback text); never raises."""
    try:
        message = str(error)
    except Exception:
        message = f"<unprintable {type(error).__name__}>"
    try:
        tb = "".join(_traceback.format_exception(type(error), error, error.__traceback__))
    except Exception:
        tb = ""
    # The innermost frames are at the end of a traceback: keep those.
    return (
        _qualified(type(error)),
        _clip(message, _MAX_MESSAGE),
        _clip(tb, _MAX_TRACEBACK, keep_end=True),
    )


def _classify(classifier: Classifier, error: BaseException) -> Classification:
    try:
        return classifier.classify(error)
    except Exception:
        log.exception("idempotask: the failure classifier raised; the failure counts as transient")
        return Classification(FailureKind.TRANSIENT, None, "classifier failed")


def _kind_value(kind: object) -> str:
    return str(kind.value) if isinstance(kind, enum.Enum) else str(kind)


def _next_retry(
    policies: Policies,
    classification: Classification,
    attempts: int,
    now: float,
    error: BaseException,
    first_failed_at: float,
) -> float | None:
    """When the next retry is due after failure number ``attempts``; None: no retry left.

    Failure ``n`` is followed by retry ``n`` of the kind's policy.
    """
    policy = policies.get(classification.kind)
    if policy is None:
        return None
    try:
        delay = policy.delay(
            attempts,
            retry_after=classification.retry_after,
            exception=error,
            elapsed=max(now - first_failed_at, 0.0),
        )
    except Exception:
        log.exception(
            "idempotask: the %s retry policy raised; no retry scheduled", classification.kind
        )
        return None
    return None if delay is None else now + max(float(delay), 0.0)


def _arguments_payload(arguments: Mapping[str, Any] | None) -> bytes:
    """Typed JSON of the arguments; values it cannot hold become :class:`Unserializable`.

    ``b""`` means the arguments were not kept at all. Never raises.
    """
    if arguments is None:
        return b""
    try:
        return _JSON.dumps(dict(arguments))
    except Exception:
        pass
    kept: dict[Any, Any] = {}
    try:
        for name, value in arguments.items():
            try:
                _JSON.dumps(value)
                kept[name] = value
            except Exception as exc:
                kept[name] = Unserializable(_qualified(type(value)), _clip(str(exc), 300))
        return _JSON.dumps(kept)
    except Exception:
        log.warning("idempotask: the arguments of a dead letter could not be stored at all")
        return b""


def _new_letter(
    *,
    function: str,
    error: BaseException,
    classification: Classification,
    policies: Policies,
    arguments: bytes,
    key: str,
    route: str,
    critical: bool,
    now: float,
    id: str | None = None,
) -> DeadLetter:
    error_type, message, tb = _describe(error)
    next_retry_at = _next_retry(policies, classification, 1, now, error, now)
    return DeadLetter(
        id=id or uuid.uuid4().hex,
        function=function,
        kind=_kind_value(classification.kind),
        error_type=error_type,
        message=message,
        traceback=tb,
        arguments=arguments,
        key=key,
        attempts=1,
        status=Status.PENDING if next_retry_at is not None else Status.ABANDONED,
        first_failed_at=now,
        last_failed_at=now,
        next_retry_at=next_retry_at,
        route=route,
        critical=critical,
    )


def _failure_changes(
    letter: DeadLetter,
    error: BaseException,
    classification: Classification,
    policies: Policies,
    now: float,
) -> dict[str, Any]:
    """The update for a replay of ``letter`` that failed again.

    An error with ``consumes_attempt = False`` (an open circuit breaker: the call never
    ran) leaves the attempt count alone and waits as before a first retry.
    """
    error_type, message, tb = _describe(error)
    consumed = getattr(error, "consumes_attempt", True) is not False
    attempts = letter.attempts + 1 if consumed else letter.attempts
    next_retry_at = _next_retry(
        policies, classification, attempts if consumed else 1, now, error, letter.first_failed_at
    )
    return {
        "kind": _kind_value(classification.kind),
        "error_type": error_type,
        "message": message,
        "traceback": tb,
        "attempts": attempts,
        "status": Status.RETRYING if next_retry_at is not None else Status.ABANDONED,
        "last_failed_at": now,
        "next_retry_at": next_retry_at,
        "resolution": "",
    }


def _reopen(at: float) -> Callable[[DeadLetter], dict[str, Any]]:
    """Make a letter due at ``at``; a closed one becomes PENDING again."""

    def decide(letter: DeadLetter) -> dict[str, Any]:
        status = letter.status if letter.status in OPEN_STATUSES else Status.PENDING
        return {"status": status, "next_retry_at": at, "resolution": ""}

    return decide


def _close(status: Status, resolution: str) -> Callable[[DeadLetter], dict[str, Any]]:
    def decide(letter: DeadLetter) -> dict[str, Any]:
        return {"status": status, "next_retry_at": None, "resolution": resolution}

    return decide


def _epoch(value: float | _dt.datetime, option: str) -> float:
    if isinstance(value, _dt.datetime):
        return value.timestamp()  # a naive datetime is local time, as Python reads it
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(f"{option}: expected epoch seconds or a datetime, got {value!r}")
    return float(value)


def _seconds(value: float | _dt.timedelta, option: str, *, allow_zero: bool = True) -> float:
    if isinstance(value, _dt.timedelta):
        value = value.total_seconds()
    return config.check_seconds(option, value, allow_zero=allow_zero)


def _values(value: Any, convert: Callable[[Any], Any]) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, enum.Enum)) or not isinstance(value, Iterable):
        return (convert(value),)
    return tuple(convert(v) for v in value)


def _status(value: Any) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise ConfigurationError(
            f"status: expected one of {', '.join(s.value for s in Status)}, got {value!r}"
        ) from None


def _make_filter(
    status: Any = None,
    kind: Any = None,
    function: Any = None,
    since: float | _dt.datetime | None = None,
    until: float | _dt.datetime | None = None,
) -> DeadLetterFilter:
    return DeadLetterFilter(
        status=_values(status, _status),
        kind=_values(kind, _kind_value),
        function=_values(function, str),
        since=None if since is None else _epoch(since, "since"),
        until=None if until is None else _epoch(until, "until"),
    )


# ----------------------------------------------------------------------------------------
# Public in the package: option checks and recording helpers that @dead_letter, the
# queue and the framework integrations (idempotask.integrations._common) share.
# ----------------------------------------------------------------------------------------


def check_hook(option: str, hook: Any) -> Any:
    """``hook`` if it is None or callable; else a :class:`ConfigurationError` naming
    ``option``."""
    if hook is not None and not callable(hook):
        raise ConfigurationError(f"{option}: expected a callable taking a DeadLetter, got {hook!r}")
    return hook


def check_classifier(classifier: Any) -> Classifier | None:
    """``classifier`` if it is None or has a ``classify`` method."""
    if classifier is not None and not callable(getattr(classifier, "classify", None)):
        raise ConfigurationError(
            f"classifier: expected an idempotask.taxonomy.Classifier, got {classifier!r}"
        )
    return classifier  # type: ignore[no-any-return]


def check_policies(policies: Any) -> Policies | None:
    """``policies`` as a dict of :class:`FailureKind` to :class:`RetryPolicy`, or None."""
    if policies is None:
        return None
    if not isinstance(policies, Mapping):
        raise ConfigurationError(
            f"policies: expected a mapping of FailureKind to RetryPolicy, got {policies!r}"
        )
    checked: dict[FailureKind, RetryPolicy] = {}
    for kind, policy in policies.items():
        if not isinstance(policy, RetryPolicy):
            raise ConfigurationError(f"policies[{kind!r}]: expected a RetryPolicy, got {policy!r}")
        checked[check_kind(f"policies[{kind!r}]", kind)] = policy
    return checked


def bound_arguments(
    target: Callable[..., Any] | inspect.Signature | None,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> dict[str, Any] | None:
    """A call's arguments by name, defaults applied, as a letter stores them.

    ``target`` is the function called (or its signature). None when there is no
    target, its signature cannot be read, or the arguments do not bind to it (the call
    itself was wrong: its TypeError is the letter).
    """
    if target is None:
        return None
    try:
        signature = target if isinstance(target, inspect.Signature) else inspect.signature(target)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def redact_arguments(
    redact: Callable[[dict[str, Any]], object] | None,
    arguments: Mapping[str, Any] | None,
    *,
    option: str,
    name: str,
) -> dict[str, Any] | None:
    """``arguments`` through the ``redact`` hook (option ``option`` of function ``name``).

    None keeps no arguments: there were none, or the hook raised or did not return a
    mapping -- keeping the unredacted arguments could store a secret.
    """
    if arguments is None:
        return None
    if redact is None:
        return dict(arguments)
    try:
        kept = redact(dict(arguments))
    except Exception:
        log.exception("idempotask: the %s hook of %s raised; no arguments kept", option, name)
        return None
    if not isinstance(kept, Mapping):
        log.error(
            "idempotask: the %s hook of %s returned %s, not a mapping; no arguments kept",
            option,
            name,
            type(kept).__name__,
        )
        return None
    return dict(kept)


def _fire(hook: Hook | None, letter: DeadLetter, what: str) -> None:
    if hook is None:
        return
    try:
        hook(letter)
    except Exception:
        log.exception("idempotask: the %s hook %r raised on dead letter %s", what, hook, letter.id)


def fire_letter_hooks(
    letter: DeadLetter,
    on_dead_letter: Hook | None,
    on_retry_exhausted: Hook | None,
    *,
    prefix: str = "",
) -> None:
    """Run the hooks of a letter just recorded: ``on_dead_letter``, then
    ``on_retry_exhausted`` if it has no retry left. A hook that raises is logged (the
    option name is ``prefix`` + the hook's name), never propagated."""
    _fire(on_dead_letter, letter, f"{prefix}on_dead_letter")
    if letter.status is Status.ABANDONED:
        _fire(on_retry_exhausted, letter, f"{prefix}on_retry_exhausted")

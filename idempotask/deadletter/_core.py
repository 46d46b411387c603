"""What every dead-letter module shares: errors, hook types, option checks, the filter
builder, and the helpers the framework integrations (:mod:`idempotask.integrations`)
use to record the failures of their tasks."""

from __future__ import annotations

import datetime as _dt
import enum
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar

from idempotask.backends.base import DeadLetter, DeadLetterFilter, Status
from idempotask.errors import (
    AlreadyInProgress,
    ConfigurationError,
    IdempotaskError,
    KeyMismatchError,
)
from idempotask.lease import LeaseLostWarning
from idempotask.retry import RetryPolicy
from idempotask.taxonomy import Classifier, FailureKind, check_kind

__all__ = [
    "CAS_TRIES",
    "NOT_DEAD_LETTERED",
    "PAGE",
    "RECORDING_CATCH",
    "AmbiguousLetterId",
    "DeadLetterNotFound",
    "Hook",
    "Policies",
    "ReplayError",
    "RouteHandler",
    "check_actor",
    "check_classifier",
    "check_hook",
    "check_policies",
    "epoch",
    "fire_hook",
    "fire_letter_hooks",
    "kind_value",
    "make_filter",
]

log = logging.getLogger("idempotask")

_P = ParamSpec("_P")
_T = TypeVar("_T")
_S = TypeVar("_S")

CAS_TRIES = 50  # read-modify-write rounds before a transition gives up
PAGE = 500  # letters per query page when a bulk operation walks a filter

# Recording a failure must never lose it: whatever a store or the spool raises is thrown
# back into the recording flows (which spool the letter, or log it at CRITICAL), not only
# BackendError. The other flows but process_due's let anything but a store error propagate.
RECORDING_CATCH: tuple[type[BaseException], ...] = (Exception,)

# Never dead-lettered: the work is being done elsewhere (AlreadyInProgress, a lost lease
# under warnings-as-errors) or the caller misused an explicit key (KeyMismatchError).
# Public in the package: the framework integrations extend it with their control flow.
NOT_DEAD_LETTERED: tuple[type[BaseException], ...] = (
    AlreadyInProgress,
    KeyMismatchError,
    LeaseLostWarning,
)


class DeadLetterNotFound(IdempotaskError, LookupError):
    """No dead letter has this id (or no letter's id starts with this prefix)."""

    __module__ = "idempotask.deadletter"


class AmbiguousLetterId(IdempotaskError, LookupError):
    """An id prefix matches several dead letters; ``candidates`` holds their ids."""

    __module__ = "idempotask.deadletter"

    def __init__(self, message: str, *, candidates: tuple[str, ...]) -> None:
        super().__init__(message)
        self.candidates = candidates


class ReplayError(IdempotaskError):
    """A dead letter cannot be replayed as stored (arguments missing or unstorable)."""

    __module__ = "idempotask.deadletter"


Policies = Mapping[FailureKind, RetryPolicy]
Hook = Callable[[DeadLetter], object]
RouteHandler = Callable[[DeadLetter, dict[str, Any]], object]
"""Re-submits a letter to a framework: ``handler(letter, arguments)``; returning means
enqueued, raising means this replay failed."""


# ----------------------------------------------------------------------------------------
# Option checks
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


def check_actor(actor: Any) -> str:
    """Who acts on a letter (``"api"``, ``"cli:alice"``, a dashboard user): a short
    single-line string, kept in the letter's history."""
    if not isinstance(actor, str) or not actor.strip() or len(actor) > 200:
        raise ConfigurationError(
            f"actor: expected a non-empty name of at most 200 characters, got {actor!r}"
        )
    return " ".join(actor.split())


def epoch(value: float | _dt.datetime, option: str) -> float:
    """Epoch seconds from a number or a datetime (a naive one is local time)."""
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(f"{option}: expected epoch seconds or a datetime, got {value!r}")
    return float(value)


def kind_value(kind: object) -> str:
    """A failure kind as the string letters store."""
    return str(kind.value) if isinstance(kind, enum.Enum) else str(kind)


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


def make_filter(
    status: Any = None,
    kind: Any = None,
    function: Any = None,
    since: float | _dt.datetime | None = None,
    until: float | _dt.datetime | None = None,
    search: str | None = None,
) -> DeadLetterFilter:
    """A :class:`DeadLetterFilter` from the keyword criteria the queue's methods take;
    a bad value is a :class:`ConfigurationError` naming the criterion."""
    if search is not None and not isinstance(search, str):
        raise ConfigurationError(f"search: expected text, got {type(search).__name__}")
    return DeadLetterFilter(
        status=_values(status, _status),
        kind=_values(kind, kind_value),
        function=_values(function, str),
        since=None if since is None else epoch(since, "since"),
        until=None if until is None else epoch(until, "until"),
        search=search or "",
    )


# ----------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------


def fire_hook(hook: Hook | None, letter: DeadLetter, what: str) -> None:
    """Call ``hook(letter)``; one that raises is logged (as ``what``), never propagated."""
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
    fire_hook(on_dead_letter, letter, f"{prefix}on_dead_letter")
    if letter.status is Status.ABANDONED:
        fire_hook(on_retry_exhausted, letter, f"{prefix}on_retry_exhausted")

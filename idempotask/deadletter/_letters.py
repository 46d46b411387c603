"""Pure decisions about letters: what a failure looks like as a letter, what a later
failure, a replay or a person changes in it, and the history entry each change appends.

No I/O: the queue's flows apply what these functions return with the store's
compare-and-set ``update``.
"""

from __future__ import annotations

import logging
import traceback as _traceback
from collections.abc import Callable
from typing import Any

from idempotask.backends.base import (
    HISTORY_LIMIT,
    OPEN_STATUSES,
    Action,
    DeadLetter,
    Status,
)
from idempotask.deadletter._arguments import qualified
from idempotask.deadletter._core import Policies, kind_value
from idempotask.taxonomy import Classification, Classifier, FailureKind

__all__ = [
    "Decide",
    "after_failure",
    "classify",
    "close",
    "describe",
    "first_failure",
    "reopen",
    "skipped",
    "with_action",
]

log = logging.getLogger("idempotask")

Decide = Callable[[DeadLetter], dict[str, Any]]
"""Given a letter as stored now, the changes to make to it (fields of ``update``)."""

_MAX_MESSAGE = 8 * 1024
_MAX_TRACEBACK = 64 * 1024
_MAX_ACTION_TEXT = 500


def _clip(text: str, limit: int, *, keep_end: bool = False) -> str:
    if len(text) <= limit:
        return text
    note = f"... [{len(text) - limit} characters cut] ..."
    return note + text[-limit:] if keep_end else text[:limit] + note


def describe(error: BaseException) -> tuple[str, str, str]:
    """(qualified type, message, traceback text) of ``error``; never raises."""
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
        qualified(type(error)),
        _clip(message, _MAX_MESSAGE),
        _clip(tb, _MAX_TRACEBACK, keep_end=True),
    )


def classify(classifier: Classifier, error: BaseException) -> Classification:
    """``classifier``'s verdict on ``error``; TRANSIENT when the classifier itself fails."""
    try:
        return classifier.classify(error)
    except Exception:
        log.exception("idempotask: the failure classifier raised; the failure counts as transient")
        return Classification(FailureKind.TRANSIENT, None, "classifier failed")


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


def with_action(history: tuple[Action, ...], action: Action) -> tuple[Action, ...]:
    """``history`` with ``action`` appended, keeping the newest :data:`HISTORY_LIMIT`
    entries. A skip repeating the last entry's reason replaces it (a letter nobody can
    replay here would otherwise fill its history with the same line)."""
    if (
        history
        and action.what == "skipped"
        and history[-1].what == "skipped"
        and history[-1].note == action.note
    ):
        history = history[:-1]
    return (*history, action)[-HISTORY_LIMIT:]


def _failure(
    error: BaseException,
    described: tuple[str, str, str],
    classification: Classification,
    policies: Policies,
    now: float,
    actor: str,
    letter: DeadLetter | None,
) -> dict[str, Any]:
    """The fields a failure sets: the first (``letter`` None: ``failed``, PENDING) or a
    replay of ``letter`` that failed again (``retry_failed``, RETRYING); ABANDONED, with
    an ``abandoned`` entry, when the kind's policy has no retry left.

    An error with ``consumes_attempt = False`` (an open circuit breaker: the call never
    ran) leaves the attempt count alone and waits as before a first retry.
    """
    error_type, message, tb = described
    kind = kind_value(classification.kind)
    history: tuple[Action, ...]
    attempts, retry, first_failed_at, history = 1, 1, now, ()
    if letter is not None:
        consumed = getattr(error, "consumes_attempt", True) is not False
        attempts = letter.attempts + 1 if consumed else letter.attempts
        retry = attempts if consumed else 1
        first_failed_at, history = letter.first_failed_at, letter.history
    next_retry_at = _next_retry(policies, classification, retry, now, error, first_failed_at)
    what = "failed" if letter is None else "retry_failed"
    text = _clip(f"{error_type.rsplit('.', 1)[-1]}: {message}", _MAX_ACTION_TEXT)
    history = with_action(history, Action(now, what, actor, kind, text))
    if next_retry_at is not None:
        status = Status.PENDING if letter is None else Status.RETRYING
    else:
        status = Status.ABANDONED
        note = "no retry for this kind" if letter is None else "no retry left"
        history = with_action(history, Action(now, "abandoned", actor, note=note))
    return {
        "kind": kind,
        "error_type": error_type,
        "message": message,
        "traceback": tb,
        "attempts": attempts,
        "status": status,
        "last_failed_at": now,
        "next_retry_at": next_retry_at,
        "history": history,
    }


def first_failure(
    error: BaseException, classification: Classification, policies: Policies, now: float, actor: str
) -> dict[str, Any]:
    """The fields of a first failure's letter but its id and the call's: PENDING with its
    first retry scheduled, or ABANDONED when the kind's policy allows none."""
    fields = _failure(error, describe(error), classification, policies, now, actor, None)
    return {**fields, "first_failed_at": now}


def after_failure(
    error: BaseException,
    classification: Classification,
    policies: Policies,
    now: float,
    actor: str,
) -> Decide:
    """The update for a replay of a letter that failed again (``retry_failed``; then
    ``abandoned`` when no retry is left); see :func:`_failure`."""
    described = describe(error)

    def decide(letter: DeadLetter) -> dict[str, Any]:
        changes = _failure(error, described, classification, policies, now, actor, letter)
        return {**changes, "resolution": ""}

    return decide


def reopen(at: float, now: float, actor: str, note: str = "") -> Decide:
    """Make a letter due at ``at`` (``requeued``); a closed one becomes PENDING again."""

    def decide(letter: DeadLetter) -> dict[str, Any]:
        status = letter.status if letter.status in OPEN_STATUSES else Status.PENDING
        return {
            "status": status,
            "next_retry_at": at,
            "resolution": "",
            "history": with_action(letter.history, Action(now, "requeued", actor, note=note)),
        }

    return decide


def close(status: Status, resolution: str, what: str, now: float, actor: str, note: str) -> Decide:
    """Close a letter as ``status`` (nothing more is retried), recording ``what``."""

    def decide(letter: DeadLetter) -> dict[str, Any]:
        return {
            "status": status,
            "next_retry_at": None,
            "resolution": resolution,
            "history": with_action(letter.history, Action(now, what, actor, note=note)),
        }

    return decide


def skipped(
    letter: DeadLetter, now: float, actor: str, reason: str, retry_at: float | None
) -> dict[str, Any]:
    """A replay that could not run now (``skipped``): the letter is due again at
    ``retry_at``; None holds it, open with no retry scheduled, until a person acts (the
    stored arguments cannot rebuild the call). The reason goes to its history."""
    return {
        "next_retry_at": retry_at,
        "history": with_action(
            letter.history, Action(now, "skipped", actor, note=_clip(reason, _MAX_ACTION_TEXT))
        ),
    }

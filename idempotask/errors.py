"""The exceptions idempotask raises.

Every error the library raises derives from :class:`IdempotaskError`; errors that are
also a bad value or a bad type derive from :class:`ValueError` or :class:`TypeError`
too, so existing ``except TypeError`` handlers keep working.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AlreadyInProgress",
    "BackendError",
    "CachedFailure",
    "CircuitOpenError",
    "ConfigurationError",
    "CorruptRecordError",
    "DuplicateNameError",
    "IdempotaskError",
    "KeyEncodingError",
    "KeyMismatchError",
    "LeaseLostError",
    "MissingDependencyError",
    "MissingKeyMaterialError",
    "MissingTableError",
    "SerializationError",
]


class IdempotaskError(Exception):
    """Base class of every error raised by idempotask."""


class ConfigurationError(IdempotaskError, ValueError):
    """An option has a wrong value or type; the message names the option."""


class MissingDependencyError(IdempotaskError, ImportError):
    """A backend needs a driver that is not installed; the message says what to install."""


class DuplicateNameError(IdempotaskError, ValueError):
    """Two different functions were registered under the same idempotency name."""


class KeyEncodingError(IdempotaskError, TypeError):
    """An argument cannot be turned into key material.

    ``path`` names the argument (``order.items[2]``) and ``type_name`` its type.
    """

    def __init__(self, message: str, *, path: str = "", type_name: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.type_name = type_name


class MissingKeyMaterialError(KeyEncodingError):
    """An instance (often ``self``) carries no key material.

    Define ``__idempotency_key__()`` on its class, register an encoder for the type,
    pass ``key=`` or exclude the argument with ``exclude_args=``.
    """


class SerializationError(IdempotaskError, TypeError):
    """A result or an error cannot be stored, or stored bytes cannot be read back."""


class KeyMismatchError(IdempotaskError, ValueError):
    """An explicit idempotency key was reused with different arguments."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class AlreadyInProgress(IdempotaskError):
    """Another caller holds the key's claim and this call will not wait for it.

    Raised at once with ``on_conflict="raise"``, or after ``wait_timeout`` with
    ``on_conflict="wait"``. Never dead-lettered: the work is being done elsewhere.
    Also raised by ``DeadLetterQueue.requeue``, ``schedule_retry``, ``mark_resolved`` and
    ``mark_abandoned`` for a dead letter a processor is replaying right now (``key`` is
    then the letter's idempotency key, ``""`` for a function without one): try again
    after the replay ends.
    """

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class LeaseLostError(AlreadyInProgress):
    """A transactional call (``@idempotent(transactional=True)``) lost its claim while
    its body ran: its lease ran out and another caller took the key over, so its whole
    transaction, the body's writes included, was rolled back. The other caller's run is
    the one that counts; a duplicate made now gets its result. Like
    :class:`AlreadyInProgress`, never dead-lettered.
    """


class BackendError(IdempotaskError):
    """The store failed: a connection error, a timeout or a driver error.

    The driver's own exception is the ``__cause__``; callers catch this one class
    whichever store they use.
    """


class CorruptRecordError(BackendError):
    """A value under one of our keys is not a record we wrote (corrupt or foreign data)."""


class MissingTableError(BackendError):
    """A SQL store's table does not exist. Not an outage: it will not appear by itself.

    The message names the table and the command that creates it
    (``idempotask db create --url ...``). ``table`` is the missing table's name.
    """

    def __init__(self, message: str, *, table: str = "") -> None:
        super().__init__(message)
        self.table = table


class CachedFailure(IdempotaskError):
    """A cached error whose original exception type could not be rebuilt.

    ``type_name`` is the original type's qualified name and ``message`` its message.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


class CircuitOpenError(IdempotaskError):
    """A circuit breaker is open: the call failed fast without running.

    ``name`` is the breaker's name and ``retry_after`` the seconds until the breaker will
    try again (the next probe, or the next look at a probe in flight elsewhere).

    It is classified EXTERNAL (the ``failure_kind`` marker: a dependency is down, so the
    call is retried hours later) and ``consumes_attempt`` is False: a call refused by an
    open breaker never ran, so retry policies should not count it as a spent attempt.

    >>> err = CircuitOpenError("payments", 12.5)
    >>> err.name, err.retry_after, err.consumes_attempt
    ('payments', 12.5, False)
    """

    # A string, not FailureKind.EXTERNAL: idempotask.taxonomy imports this module, and the
    # classifier accepts a kind's value as a marker.
    failure_kind: ClassVar[str] = "external"
    consumes_attempt: ClassVar[bool] = False

    def __init__(self, name: str, retry_after: float) -> None:
        self.name = name
        self.retry_after = max(0.0, float(retry_after))
        super().__init__(
            f"circuit breaker {name!r} is open: failing fast without calling; "
            f"retry in {self.retry_after:.3g}s"
        )

    def __reduce__(self) -> tuple[type[CircuitOpenError], tuple[str, float]]:
        # Pickle by the constructor's arguments (the message is derived), so the error
        # crosses process boundaries (multiprocessing, task queues) intact.
        return (type(self), (self.name, self.retry_after))

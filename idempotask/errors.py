"""The exceptions idempotask raises.

Every error the library raises derives from :class:`IdempotaskError`; errors that are
also a bad value or a bad type derive from :class:`ValueError` or :class:`TypeError`
too, so existing ``except TypeError`` handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "AlreadyInProgress",
    "BackendError",
    "CachedFailure",
    "ConfigurationError",
    "CorruptRecordError",
    "DuplicateNameError",
    "IdempotaskError",
    "KeyEncodingError",
    "KeyMismatchError",
    "MissingDependencyError",
    "MissingKeyMaterialError",
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
    """

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class BackendError(IdempotaskError):
    """The store failed: a connection error, a timeout or a driver error.

    The driver's own exception is the ``__cause__``; callers catch this one class
    whichever store they use.
    """


class CorruptRecordError(BackendError):
    """A value under one of our keys is not a record we wrote (corrupt or foreign data)."""


class CachedFailure(IdempotaskError):
    """A cached error whose original exception type could not be rebuilt.

    ``type_name`` is the original type's qualified name and ``message`` its message.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

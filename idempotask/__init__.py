"""idempotask: make any callable idempotent, and give its failures a dead-letter queue.

>>> from idempotask import idempotent, configure
>>> configure(backend="memory://")  # or "redis://...", a SQL URL, or $IDEMPOTASK_URL
>>> @idempotent(ttl=3600)
... def charge(order_id: int) -> str:
...     return f"charged {order_id}"

The same logical call within the ttl runs once; duplicates get the stored result.
Importing this package needs only the standard library: drivers are imported when a
backend that needs them is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from idempotask._transactional import transaction
from idempotask.backends.base import DeadLetter, Status
from idempotask.config import Settings, configure, get_backend, settings
from idempotask.errors import (
    AlreadyInProgress,
    BackendError,
    CachedFailure,
    CircuitOpenError,
    ConfigurationError,
    CorruptRecordError,
    DuplicateNameError,
    IdempotaskError,
    KeyEncodingError,
    KeyMismatchError,
    LeaseLostError,
    MissingDependencyError,
    MissingKeyMaterialError,
    MissingTableError,
    SerializationError,
)
from idempotask.events import Event, EventKind, add_listener, remove_listener
from idempotask.idempotent import (
    BoundCall,
    IdempotentFunction,
    IdempotentMethod,
    idempotent,
    register_cancellation,
)
from idempotask.keys import make_key, register_encoder, unregister_encoder
from idempotask.lease import LeaseLostWarning, current_lease, lease_held

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and IDEs
    from idempotask.breaker import CircuitBreaker
    from idempotask.deadletter import (
        DeadLetterFunction,
        DeadLetterQueue,
        DeadLetterStats,
        ProcessReport,
        dead_letter,
        default_queue,
        keep_all,
        register_route,
    )
    from idempotask.retry import RetryPolicy
    from idempotask.spool import SpoolError
    from idempotask.taxonomy import (
        ConfigurationFailure,
        ExternalError,
        FailureKind,
        PermanentError,
        TransientError,
        register_failure_kind,
    )

# Names a plain @idempotent call does not need, imported on first use (PEP 562), so
# `import idempotask` stays small: dead letters, the breaker, the failure taxonomy, retry
# policies and the spool.
_LAZY = {
    "CircuitBreaker": "idempotask.breaker",
    "DeadLetterFunction": "idempotask.deadletter",
    "DeadLetterQueue": "idempotask.deadletter",
    "DeadLetterStats": "idempotask.deadletter",
    "ProcessReport": "idempotask.deadletter",
    "dead_letter": "idempotask.deadletter",
    "default_queue": "idempotask.deadletter",
    "keep_all": "idempotask.deadletter",
    "register_route": "idempotask.deadletter",
    "RetryPolicy": "idempotask.retry",
    "SpoolError": "idempotask.spool",
    "ConfigurationFailure": "idempotask.taxonomy",
    "ExternalError": "idempotask.taxonomy",
    "FailureKind": "idempotask.taxonomy",
    "PermanentError": "idempotask.taxonomy",
    "TransientError": "idempotask.taxonomy",
    "register_failure_kind": "idempotask.taxonomy",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'idempotask' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0.dev0"

__all__ = [
    "AlreadyInProgress",
    "BackendError",
    "BoundCall",
    "CachedFailure",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigurationError",
    "ConfigurationFailure",
    "CorruptRecordError",
    "DeadLetter",
    "DeadLetterFunction",
    "DeadLetterQueue",
    "DeadLetterStats",
    "DuplicateNameError",
    "Event",
    "EventKind",
    "ExternalError",
    "FailureKind",
    "IdempotaskError",
    "IdempotentFunction",
    "IdempotentMethod",
    "KeyEncodingError",
    "KeyMismatchError",
    "LeaseLostError",
    "LeaseLostWarning",
    "MissingDependencyError",
    "MissingKeyMaterialError",
    "MissingTableError",
    "PermanentError",
    "ProcessReport",
    "RetryPolicy",
    "SerializationError",
    "Settings",
    "SpoolError",
    "Status",
    "TransientError",
    "__version__",
    "add_listener",
    "configure",
    "current_lease",
    "dead_letter",
    "default_queue",
    "get_backend",
    "idempotent",
    "keep_all",
    "lease_held",
    "make_key",
    "register_cancellation",
    "register_encoder",
    "register_failure_kind",
    "register_route",
    "remove_listener",
    "settings",
    "transaction",
    "unregister_encoder",
]

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

from idempotask.backends.deadletters import DeadLetter, Status
from idempotask.breaker import CircuitBreaker
from idempotask.config import Settings, configure, get_backend, settings
from idempotask.deadletter import (
    DeadLetterFunction,
    DeadLetterQueue,
    DeadLetterStats,
    ProcessReport,
    dead_letter,
    default_queue,
    register_route,
)
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
    MissingDependencyError,
    MissingKeyMaterialError,
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

__version__ = "0.1.0.dev0"

__all__ = [
    "AlreadyInProgress",
    "BackendError",
    "BoundCall",
    "CachedFailure",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigurationError",
    "CorruptRecordError",
    "DeadLetter",
    "DeadLetterFunction",
    "DeadLetterQueue",
    "DeadLetterStats",
    "DuplicateNameError",
    "Event",
    "EventKind",
    "IdempotaskError",
    "IdempotentFunction",
    "IdempotentMethod",
    "KeyEncodingError",
    "KeyMismatchError",
    "LeaseLostWarning",
    "MissingDependencyError",
    "MissingKeyMaterialError",
    "ProcessReport",
    "SerializationError",
    "Settings",
    "Status",
    "__version__",
    "add_listener",
    "configure",
    "current_lease",
    "dead_letter",
    "default_queue",
    "get_backend",
    "idempotent",
    "lease_held",
    "make_key",
    "register_cancellation",
    "register_encoder",
    "register_route",
    "remove_listener",
    "settings",
    "unregister_encoder",
]

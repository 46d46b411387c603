"""The in-process stores: idempotency records, dead letters and circuit breakers.

:class:`MemoryBackend` is the default backend and the one tests use. It deduplicates
calls made *within one process* only: every worker process of a pre-fork server (Celery
prefork, gunicorn, RQ) has its own copy, so a duplicate delivered to another worker runs
again. The first use in a forked child says so with a :class:`RuntimeWarning`; use
``redis://`` or a SQL URL there. It offers a :class:`MemoryDeadLetterStore` and a
:class:`MemoryBreakerStore` beside its records (``dead_letter_store()``,
``breaker_store()``), each usable on its own too.
"""

from __future__ import annotations

from idempotask.backends.memory._breakers import MemoryBreakerStore
from idempotask.backends.memory._deadletters import MemoryDeadLetterStore
from idempotask.backends.memory._records import MemoryBackend

__all__ = ["MemoryBackend", "MemoryBreakerStore", "MemoryDeadLetterStore"]

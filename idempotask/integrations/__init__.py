"""Framework integrations: Celery, RQ and Dramatiq.

Each lives in its own module and imports its framework only when imported itself
(``idempotask.integrations.celery`` needs ``pip install 'idempotask[celery]'``). They
share one key hashing, one locking protocol and one retry taxonomy with plain
``@idempotent``.

Their options carry a prefix, because names like ``name``, ``serializer``, ``backend`` or
``retry`` already mean something to the frameworks: ``idempotency_<option>`` for each
option of :func:`idempotask.idempotent` but ``name`` (``idempotency_ttl``,
``idempotency_lease``, ``idempotency_key_args``...; the key's name is the task's, job
function's or actor's), and ``dead_letter_<option>`` for ``queue``, ``redact``,
``classifier``, ``policies``, ``critical``, ``on_dead_letter``, ``on_retry_exhausted``
and ``enabled``. An unknown prefixed name is a :class:`~idempotask.ConfigurationError`
naming it.
"""

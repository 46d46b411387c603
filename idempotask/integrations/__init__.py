"""Framework integrations: Celery, RQ and Dramatiq.

Each lives in its own module and imports its framework only when imported itself
(``idempotask.integrations.celery`` needs ``pip install 'idempotask[celery]'``). They
share one key hashing, one locking protocol and one retry taxonomy with plain
``@idempotent``; their options carry an ``idempotency_`` or ``dead_letter_`` prefix,
because names like ``name``, ``serializer``, ``backend`` or ``retry`` already mean
something to the frameworks.
"""

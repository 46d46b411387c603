"""The tables of idempotask's SQL store, as Django models.

The tables, columns, types and indexes are exactly those of the SQLAlchemy SQL store
(:mod:`idempotask.backends.sql`): the migration creates them from the same definitions,
so ``idempotask`` commands, the dashboard and a ``SQLAlchemyBackend`` pointed at the same
database see the same rows. The models are for reading (the admin, your own queries);
write through the stores (:class:`~idempotask.django.store.DjangoBackend` and its
``dead_letter_store()`` / ``breaker_store()``), which keep the rows' invariants.

Two tables have a key of two columns, ``(namespace, id)`` and ``(namespace, name)``;
Django 4.2 models have a one-column primary key, so the models name ``id`` and ``name``
as theirs: filter by ``namespace`` too when several applications share the tables.
Times are epoch seconds (a float) on the database's clock; :func:`as_datetime` turns
one into an aware ``datetime``.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from django.db import models  # type: ignore[import-untyped]

__all__ = [
    "BinaryTextField",
    "BreakerRecord",
    "DeadLetterRecord",
    "IdempotencyRecord",
    "as_datetime",
]


def as_datetime(seconds: float | None) -> _dt.datetime | None:
    """An epoch-seconds column value as an aware UTC ``datetime`` (None stays None).

    >>> as_datetime(0.0)
    datetime.datetime(1970, 1, 1, 0, 0, tzinfo=datetime.timezone.utc)
    """
    if seconds is None:
        return None
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)


class BinaryTextField(models.CharField):
    """A string compared byte for byte: ``VARCHAR`` on PostgreSQL (``COLLATE "C"`` for
    keys and ids) and SQLite, ``VARBINARY`` holding UTF-8 on MySQL/MariaDB, whose values
    this field decodes back to ``str``."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value).decode("utf-8")
        return value


class IdempotencyRecord(models.Model):
    """One key's record (``idempotask_records``): its ``state`` (``in_progress``,
    ``completed``, ``failed``), the claim's ``token`` and ``owner``, the explicit key's
    ``fingerprint``, the stored result or error (``payload``) and ``expires_at``."""

    key = BinaryTextField(max_length=1024, primary_key=True)
    state = BinaryTextField(max_length=16)
    token = BinaryTextField(max_length=255)
    owner = BinaryTextField(max_length=255)
    fingerprint = BinaryTextField(max_length=255)
    payload = models.BinaryField()
    expires_at = models.FloatField(help_text="Epoch seconds on the database's clock.")

    class Meta:
        db_table = "idempotask_records"
        verbose_name = "idempotency record"
        ordering = ("key",)

    def __str__(self) -> str:
        return str(self.key)


class DeadLetterRecord(models.Model):
    """One dead letter (``idempotask_dead_letters``), every field of
    :class:`~idempotask.backends.base.DeadLetter`: ``message``, ``traceback`` and
    ``arguments`` are bytes (the first two UTF-8), ``history`` the text of
    :func:`~idempotask.backends.base.encode_history`."""

    namespace = BinaryTextField(max_length=255)
    id = BinaryTextField(max_length=255, primary_key=True)
    function = BinaryTextField(max_length=512)
    kind = BinaryTextField(max_length=64)
    error_type = BinaryTextField(max_length=512)
    message = models.BinaryField()
    traceback = models.BinaryField()
    arguments = models.BinaryField()
    key = BinaryTextField(max_length=1024)
    attempts = models.IntegerField()
    status = BinaryTextField(max_length=16)
    first_failed_at = models.FloatField()
    last_failed_at = models.FloatField()
    next_retry_at = models.FloatField(null=True)
    route = BinaryTextField(max_length=255)
    critical = models.BooleanField()
    resolution = BinaryTextField(max_length=64)
    version = models.BigIntegerField()
    history = models.TextField()
    search = models.TextField()
    claimed_until = models.FloatField(null=True)

    class Meta:
        db_table = "idempotask_dead_letters"
        verbose_name = "dead letter"
        ordering = ("-last_failed_at", "id")

    def __str__(self) -> str:
        return f"{self.function} ({self.id})"


class BreakerRecord(models.Model):
    """One circuit breaker's shared state (``idempotask_breakers``), as
    :class:`~idempotask.backends.base.BreakerStore` describes it."""

    namespace = BinaryTextField(max_length=255)
    name = BinaryTextField(max_length=255, primary_key=True)
    failures = models.IntegerField()
    window_until = models.FloatField()
    open_until = models.FloatField(null=True)
    probe_until = models.FloatField(null=True)
    probe_token = BinaryTextField(max_length=255)
    opened_by = BinaryTextField(max_length=64)

    class Meta:
        db_table = "idempotask_breakers"
        verbose_name = "circuit breaker"
        ordering = ("namespace", "name")

    def __str__(self) -> str:
        return str(self.name)

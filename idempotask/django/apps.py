"""The Django app: ``INSTALLED_APPS = [..., "idempotask.django"]`` (label ``idempotask``)."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]


class IdempotaskConfig(AppConfig):
    """idempotask's app: its models (the tables the SQL store uses, created by
    ``manage.py migrate idempotask``), its system checks, and at startup the
    ``IDEMPOTASK`` settings applied with :func:`idempotask.configure`."""

    name = "idempotask.django"
    label = "idempotask"
    verbose_name = "idempotask"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        from idempotask.django import checks, settings  # noqa: F401 - registers the checks

        settings.apply_at_startup()

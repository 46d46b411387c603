"""idempotask's three tables, exactly as the SQL store defines them.

The database side runs the DDL SQLAlchemy compiles from :mod:`idempotask.backends.sql`
(:mod:`idempotask.django.schema`), so the columns, types and indexes are the store's
own (``COLLATE "C"`` keys, ``VARBINARY`` on MySQL, the two-column keys, the descending
page indexes), which Django's own schema editor would not make; the state side is the
models. Database routers are honoured: the tables are created where
``allow_migrate`` lets the app ``idempotask`` migrate.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import migrations, models, router  # type: ignore[import-untyped]

import idempotask.django.models
from idempotask.django import schema


def _allowed(apps: Any, schema_editor: Any) -> bool:
    alias = schema_editor.connection.alias
    return bool(router.allow_migrate(alias, "idempotask", model_name="idempotencyrecord"))


def create_tables(apps: Any, schema_editor: Any) -> None:
    if _allowed(apps, schema_editor):
        vendor = schema_editor.connection.vendor
        schema.run(schema_editor, schema.create_statements(vendor))


def drop_tables(apps: Any, schema_editor: Any) -> None:
    if _allowed(apps, schema_editor):
        vendor = schema_editor.connection.vendor
        schema.run(schema_editor, schema.drop_statements(vendor))


def _text(length: int, **options: Any) -> Any:
    return idempotask.django.models.BinaryTextField(max_length=length, **options)


class Migration(migrations.Migration):
    initial = True

    dependencies: ClassVar[list[tuple[str, str]]] = []

    operations: ClassVar[list[Any]] = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(create_tables, drop_tables)],
            state_operations=[
                migrations.CreateModel(
                    name="IdempotencyRecord",
                    fields=[
                        ("key", _text(1024, primary_key=True, serialize=False)),
                        ("state", _text(16)),
                        ("token", _text(255)),
                        ("owner", _text(255)),
                        ("fingerprint", _text(255)),
                        ("payload", models.BinaryField()),
                        (
                            "expires_at",
                            models.FloatField(help_text="Epoch seconds on the database's clock."),
                        ),
                    ],
                    options={
                        "verbose_name": "idempotency record",
                        "db_table": "idempotask_records",
                        "ordering": ("key",),
                    },
                ),
                migrations.CreateModel(
                    name="DeadLetterRecord",
                    fields=[
                        ("namespace", _text(255)),
                        ("id", _text(255, primary_key=True, serialize=False)),
                        ("function", _text(512)),
                        ("kind", _text(64)),
                        ("error_type", _text(512)),
                        ("message", models.BinaryField()),
                        ("traceback", models.BinaryField()),
                        ("arguments", models.BinaryField()),
                        ("key", _text(1024)),
                        ("attempts", models.IntegerField()),
                        ("status", _text(16)),
                        ("first_failed_at", models.FloatField()),
                        ("last_failed_at", models.FloatField()),
                        ("next_retry_at", models.FloatField(null=True)),
                        ("route", _text(255)),
                        ("critical", models.BooleanField()),
                        ("resolution", _text(64)),
                        ("version", models.BigIntegerField()),
                        ("history", models.TextField()),
                        ("search", models.TextField()),
                        ("claimed_until", models.FloatField(null=True)),
                    ],
                    options={
                        "verbose_name": "dead letter",
                        "db_table": "idempotask_dead_letters",
                        "ordering": ("-last_failed_at", "id"),
                    },
                ),
                migrations.CreateModel(
                    name="BreakerRecord",
                    fields=[
                        ("namespace", _text(255)),
                        ("name", _text(255, primary_key=True, serialize=False)),
                        ("failures", models.IntegerField()),
                        ("window_until", models.FloatField()),
                        ("open_until", models.FloatField(null=True)),
                        ("probe_until", models.FloatField(null=True)),
                        ("probe_token", _text(255)),
                        ("opened_by", _text(64)),
                    ],
                    options={
                        "verbose_name": "circuit breaker",
                        "db_table": "idempotask_breakers",
                        "ordering": ("namespace", "name"),
                    },
                ),
            ],
        ),
    ]

"""System checks of the ``IDEMPOTASK`` setting (``manage.py check``).

========================  ==========================================================
``idempotask.E001``       ``IDEMPOTASK`` is not a dict
``idempotask.E002``       an unknown key (with the closest known one)
``idempotask.E003``       a key with a wrong value (the message says what is expected)
``idempotask.E004``       ``backend`` / ``dead_letter_store`` is neither a URL nor a
                          ``DATABASES`` alias
``idempotask.E005``       the alias is a database idempotask cannot store on
``idempotask.W001``       the store's tables are missing on its alias (checked with
                          ``manage.py check --database ALIAS``, as Django's own
                          database checks are)
========================  ==========================================================
"""

from __future__ import annotations

from typing import Any

from django.core import checks  # type: ignore[import-untyped]

from idempotask.django.settings import read, validate

__all__ = ["check_settings", "check_tables"]


@checks.register()  # type: ignore[untyped-decorator]
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """One error per problem in ``IDEMPOTASK``."""
    _, problems = validate(read())
    return [
        checks.Error(problem.message, hint=problem.hint, obj="settings.IDEMPOTASK", id=problem.id)
        for problem in problems
    ]


@checks.register(checks.Tags.database)  # type: ignore[untyped-decorator]
def check_tables(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[Any]:
    """A warning when the configured store is on an alias among ``databases`` whose
    tables ``manage.py migrate idempotask`` has not created."""
    from django.db import DatabaseError, connections  # type: ignore[import-untyped]

    from idempotask.django.schema import tables
    from idempotask.django.store import DjangoBackend

    resolved, problems = validate(read())
    backend = resolved.options.get("backend")
    if problems or not isinstance(backend, DjangoBackend) or backend.alias not in (databases or ()):
        return []
    alias = backend.alias
    try:
        existing = set(connections[alias].introspection.table_names())
    except DatabaseError as exc:
        return [
            checks.Warning(
                f"idempotask cannot look at the tables of the database {alias!r}: {exc}",
                obj="settings.IDEMPOTASK",
                id="idempotask.W001",
            )
        ]
    missing = [table.name for table in tables() if table.name not in existing]
    if not missing:
        return []
    return [
        checks.Warning(
            f"idempotask's tables {', '.join(missing)} are missing on the database {alias!r}",
            hint=f"Run `manage.py migrate idempotask --database {alias}`.",
            obj="settings.IDEMPOTASK",
            id="idempotask.W001",
        )
    ]

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
``idempotask.W002``       ``idempotask.http.django.IdempotencyMiddleware`` comes
                          before Django's ``AuthenticationMiddleware`` in
                          ``MIDDLEWARE``: ``request.user`` is not set yet when it
                          runs, so every user shares one key space
========================  ==========================================================
"""

from __future__ import annotations

from typing import Any

from django.core import checks  # type: ignore[import-untyped]

from idempotask.django.settings import read, validate

__all__ = ["check_middleware_order", "check_settings", "check_tables"]


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


@checks.register(checks.Tags.security)  # type: ignore[untyped-decorator]
def check_middleware_order(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """A warning when the Idempotency-Key middleware runs before authentication: keys
    are scoped by ``request.user``, which is not set yet, so every user would share one
    key space (and could be replayed another's response)."""
    from django.apps import apps  # type: ignore[import-untyped]
    from django.conf import settings  # type: ignore[import-untyped]

    if not apps.is_installed("django.contrib.auth"):
        return []  # its middleware cannot be imported (and scope= is the answer)
    from django.contrib.auth.middleware import (  # type: ignore[import-untyped]
        AuthenticationMiddleware,
    )

    from idempotask.http.django import IdempotencyMiddleware

    paths = list(getattr(settings, "MIDDLEWARE", None) or ())
    ours = _first(IdempotencyMiddleware, paths)
    auth = _first(AuthenticationMiddleware, paths)
    if ours is None or auth is None or ours > auth:
        return []
    return [
        checks.Warning(
            f"{paths[ours]!r} comes before {paths[auth]!r} in MIDDLEWARE: request.user "
            "is not set when it runs, so every user shares one Idempotency-Key space and "
            "a client that learns another's key gets that client's response",
            hint=f"Put {paths[ours]!r} after {paths[auth]!r} in MIDDLEWARE.",
            obj="settings.MIDDLEWARE",
            id="idempotask.W002",
        )
    ]


def _first(base: type, paths: list[str]) -> int | None:
    """The index of the first of ``paths`` naming ``base`` or a subclass of it (the
    test Django's admin checks use for its own middleware)."""
    from django.utils.module_loading import import_string  # type: ignore[import-untyped]

    for index, path in enumerate(paths):
        try:
            found = import_string(path)
        except Exception:  # a broken entry is Django's to report when it loads it
            continue
        if isinstance(found, type) and issubclass(found, base):
            return index
    return None

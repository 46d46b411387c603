"""What the dead-letter tests need from the stores, checked rather than assumed.

Every built-in store offers ProvidesStores with ``namespace=``, a letter's ``history``
and ``DeadLetterFilter.search``; these checks fail a test, naming what is missing, when
a store stops offering one.
"""

from __future__ import annotations

import contextlib
import inspect
import uuid
from typing import Any

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
    """Fail the test unless ``backend_class`` implements ProvidesStores with namespace=."""
    reason = provides_namespaced_stores(backend_class)
    if reason:
        pytest.fail(reason)


def _probe(store: Any, what: str, check: Any) -> None:
    letter = DeadLetter(
        id=f"probe-{uuid.uuid4().hex}",
        function="probe",
        kind="transient",
        error_type="builtins.TimeoutError",
        message="history probe",
        history=(Action(1.0, "failed", "probe"),),
    )
    try:
        ok = bool(check(store, letter))
        why = f"its letters come back without their {what}"
    except Exception as exc:
        ok = False
        why = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            store.purge(DeadLetterFilter(function=("probe",)))
    if not ok:
        pytest.fail(f"{type(store).__name__} does not keep letter {what} ({why})")


def _keeps_history(store: Any, letter: DeadLetter) -> bool:
    stored = store.add(letter)
    updated = store.update(letter.id, stored.version, history=())
    return stored.history == letter.history and updated is not None and updated.history == ()


def _searches(store: Any, letter: DeadLetter) -> bool:
    other = letter.evolve(id=letter.id + "-other", message="something else", history=())
    store.add(letter.evolve(history=()))
    store.add(other)
    ids = {x.id for x in store.query(DeadLetterFilter(search="HISTORY PROBE"))}
    return letter.id in ids and other.id not in ids


def skip_unless_keeps_history(store: Any) -> None:
    """Skip the test until ``store`` keeps a letter's history."""
    _probe(store, "history", _keeps_history)


def skip_unless_searches(store: Any) -> None:
    """Skip the test until ``store`` honours ``DeadLetterFilter.search``."""
    _probe(store, "search", _searches)

"""Django integration: an app with idempotask's tables as migrations, settings in one
``IDEMPOTASK`` dict, and stores on Django's own database connections.

Add ``"idempotask.django"`` to ``INSTALLED_APPS`` (``pip install 'idempotask[django]'``),
run ``manage.py migrate idempotask``, and optionally configure it::

    IDEMPOTASK = {"backend": "default", "namespace": "shop"}

At startup the settings are validated (``manage.py check``) and the configured store
becomes the default of ``@idempotent`` and ``@dead_letter``.
:class:`~idempotask.django.store.DjangoBackend` is the store on a Django database alias.
The names here are loaded on first use, so importing this package needs neither
Django's settings nor a database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from idempotask.django.store import (
        DjangoBackend,
        DjangoBreakerStore,
        DjangoDeadLetterStore,
        DjangoTransaction,
    )

__all__ = ["DjangoBackend", "DjangoBreakerStore", "DjangoDeadLetterStore", "DjangoTransaction"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from idempotask.django import store

        return getattr(store, name)
    raise AttributeError(f"module 'idempotask.django' has no attribute {name!r}")

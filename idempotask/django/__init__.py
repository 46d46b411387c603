"""Django integration: an app with idempotask's tables as migrations, settings in one
``IDEMPOTASK`` dict, and a store on Django's own database connections.

Add ``"idempotask.django"`` to ``INSTALLED_APPS`` (``pip install 'idempotask[django]'``),
run ``manage.py migrate idempotask``, and optionally configure it::

    IDEMPOTASK = {"backend": "default", "namespace": "shop"}

At startup (:meth:`~idempotask.django.apps.IdempotaskConfig.ready`) the settings are
validated and the configured store becomes the default of ``@idempotent`` and
``@dead_letter``. :class:`~idempotask.django.store.DjangoBackend` is the store on a
Django database alias; it is imported lazily so that importing this package never
needs Django's settings.
"""

from __future__ import annotations

__all__: list[str] = []

"""Settings of a minimal project for running ``manage.py idempotask`` in a subprocess
(``python -m django`` with ``DJANGO_SETTINGS_MODULE`` naming this module): idempotask's
stores on the ``default`` alias, a SQLite file named by ``IDEMPOTASK_TEST_SQLITE``."""

from __future__ import annotations

import os

SECRET_KEY = "tests-only"
INSTALLED_APPS = ["idempotask.django"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("IDEMPOTASK_TEST_SQLITE", ":memory:"),
    }
}
USE_TZ = True
IDEMPOTASK = {"backend": "default", "namespace": os.environ.get("IDEMPOTASK_TEST_NS", "cli")}

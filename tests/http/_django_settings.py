"""Settings of the Django project the HTTP tests run (runserver, and uvicorn for ASGI)."""

from __future__ import annotations

from typing import Any

from ._runlog import options


def _client(request: Any) -> str | None:
    return request.headers.get("X-Client") or None


SECRET_KEY = "tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, Any] = {}
ROOT_URLCONF = "tests.http._django_urls"
MIDDLEWARE = ["idempotask.http.django.IdempotencyMiddleware"]
IDEMPOTASK_HTTP = options(scope=_client)
USE_TZ = True
LOGGING_CONFIG = None

"""Django's ASGI application for the HTTP tests (the async path of the middleware)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.http._django_settings")

from django.core.asgi import get_asgi_application

application = get_asgi_application()

"""HTTP ``Idempotency-Key``: middlewares for ASGI, WSGI and Django sharing one core.

A client sends a unique ``Idempotency-Key`` header with a POST (or any covered request)
and the same key when it retries. The first request claims the key, runs the handler
and keeps its response for the ttl; a retry with the same request gets that response
again, byte for byte, with ``Idempotent-Replayed: true``, without running the handler.
The semantics follow the IETF HTTPAPI draft "The Idempotency-Key HTTP Header Field"
and Stripe's documented behaviour:

========================================  ==============================================
same key, same request, first one done    the kept response, replayed
same key, another request (fingerprint)   ``422`` problem+json
same key while the first still runs       ``409`` problem+json with ``Retry-After``
                                          (or wait up to ``wait=`` seconds for it)
required key missing / malformed          ``400`` problem+json
handler raised, or answered 5xx           the key is released: a retry runs it again
store down                                ``503`` problem+json (``on_backend_error``)
========================================  ==============================================

- :class:`idempotask.http.asgi.IdempotencyMiddleware` (Starlette, FastAPI, any ASGI app)
- :class:`idempotask.http.wsgi.IdempotencyMiddleware` (Flask, any WSGI app)
- :class:`idempotask.http.django.IdempotencyMiddleware` (Django, sync and async)

They take the options of :class:`Policy`; :func:`idempotent_route` marks one view. The
ASGI and WSGI middlewares need only the standard library; Django's imports Django when
it is made. Claims, leases and stores are those of ``@idempotent``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from idempotask.http._policy import WRITE_METHODS, Policy, Request, Route, idempotent_route

if TYPE_CHECKING:
    from idempotask.http.asgi import IdempotencyMiddleware as ASGIIdempotencyMiddleware
    from idempotask.http.wsgi import IdempotencyMiddleware as WSGIIdempotencyMiddleware

__all__ = [
    "WRITE_METHODS",
    "ASGIIdempotencyMiddleware",
    "Policy",
    "Request",
    "Route",
    "WSGIIdempotencyMiddleware",
    "idempotent_route",
]

_LAZY = {
    "ASGIIdempotencyMiddleware": ("idempotask.http.asgi", "IdempotencyMiddleware"),
    "WSGIIdempotencyMiddleware": ("idempotask.http.wsgi", "IdempotencyMiddleware"),
}


def __getattr__(name: str) -> Any:
    found = _LAZY.get(name)
    if found is None:
        raise AttributeError(f"module 'idempotask.http' has no attribute {name!r}")
    value = getattr(importlib.import_module(found[0]), found[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

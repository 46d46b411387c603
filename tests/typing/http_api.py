"""Ordinary uses of ``idempotask.http``; ``mypy --strict`` must accept this file as written.

tests/test_typing.py runs mypy on it: a middleware that a framework's own typing refuses,
or a route decorator that loses the view's signature, fails the suite.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from idempotask.http import Policy, idempotent_route
from idempotask.http.asgi import IdempotencyMiddleware as ASGIMiddleware
from idempotask.http.wsgi import IdempotencyMiddleware as WSGIMiddleware


@idempotent_route(required=True, ttl=24 * 3600)
async def create_order(request: Request) -> JSONResponse:
    return JSONResponse({"id": 1}, status_code=201)


app = Starlette()
app.add_middleware(ASGIMiddleware, routes=["POST /orders"], required=True)
wrapped = ASGIMiddleware(app, backend="memory://", ttl=3600)


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


wsgi = WSGIMiddleware(wsgi_app, routes=["POST /payments"], wait=2.0)
policy = Policy(required=True, methods=("POST", "PATCH"))


@idempotent_route(methods=("POST",))
def refund(order_id: int) -> dict[str, int]:
    return {"refunded": order_id}


total: int = refund(7)["refunded"]

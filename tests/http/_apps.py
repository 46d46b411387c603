"""The FastAPI and Flask apps the HTTP tests run behind real servers.

Routes (the same in every framework, Django's included):

- ``POST /orders/{tag}``: covered by ``routes=``, key required; answers 201 with a body
  unique to the run, an ``X-Run`` header and a ``Set-Cookie``. ``?sleep=s`` makes it
  take that long, ``?status=n`` answer n; a flag file makes it raise.
- ``GET /orders/{tag}``: not covered (GET); same answer, status 200.
- ``POST /marked/{tag}``: not in ``routes``, marked with ``idempotent_route`` instead
  (``wait=20``: a retry waits for the first request instead of getting 409).
- ``POST /stream/{tag}?size=n``: a streaming response of n random bytes.

Keys are scoped by the ``X-Client`` header through each framework's ``scope=``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from flask import Flask
from flask import Response as FlaskResponse
from flask import request as flask_request

from idempotask.http import idempotent_route
from idempotask.http.asgi import IdempotencyMiddleware as ASGIMiddleware
from idempotask.http.wsgi import IdempotencyMiddleware as WSGIMiddleware

from ._runlog import (
    MARKED_WAIT,
    answer,
    held,
    hold,
    options,
    record,
    should_fail,
    stream_chunks,
)


def _order(tag: str, body: bytes, status: int) -> tuple[bytes, int, dict[str, str]]:
    if should_fail(tag):
        record(tag, "fail")
        raise RuntimeError(f"the handler for {tag} failed, as the test asked")
    content = answer(tag, body)
    record(tag, "done")
    return content, status, {"X-Run": json.loads(content)["run"]}


# ------------------------------------------------------------------------------- FastAPI

fastapi_app = FastAPI()


async def _fastapi_order(tag: str, request: Request, default: int) -> Response:
    record(tag, "start")
    body = await request.body()
    sleep = float(request.query_params.get("sleep", "0"))
    if sleep:
        await asyncio.sleep(sleep)
    for _ in range(1200):
        if not held(tag):
            break
        await asyncio.sleep(0.05)
    status = int(request.query_params.get("status", default))
    content, status, headers = _order(tag, body, status)
    response = Response(content, status, headers, media_type="application/json")
    response.set_cookie("session", "s3cret")
    return response


@fastapi_app.post("/orders/{tag}")
async def fastapi_create(tag: str, request: Request) -> Response:
    return await _fastapi_order(tag, request, 201)


@fastapi_app.get("/orders/{tag}")
async def fastapi_read(tag: str, request: Request) -> Response:
    return await _fastapi_order(tag, request, 200)


@fastapi_app.post("/marked/{tag}")
@idempotent_route(required=True, wait=MARKED_WAIT)
async def fastapi_marked(tag: str, request: Request) -> Response:
    return await _fastapi_order(tag, request, 201)


@fastapi_app.post("/stream/{tag}")
async def fastapi_stream(tag: str, size: int) -> StreamingResponse:
    async def chunks() -> Any:
        for chunk in stream_chunks(tag, size):
            yield chunk

    return StreamingResponse(chunks(), media_type="application/octet-stream")


def _asgi_client(scope: dict[str, Any]) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-client":
            return str(value.decode("latin-1"))
    return None


fastapi_app.add_middleware(ASGIMiddleware, **options(scope=_asgi_client))


# --------------------------------------------------------------------------------- Flask

flask_app = Flask(__name__)


def _flask_order(tag: str, default: int) -> FlaskResponse:
    record(tag, "start")
    body = flask_request.get_data()
    sleep = float(flask_request.args.get("sleep", "0"))
    if sleep:
        time.sleep(sleep)
    hold(tag)
    status = int(flask_request.args.get("status", default))
    content, status, headers = _order(tag, body, status)
    response = FlaskResponse(content, status, headers, mimetype="application/json")
    response.set_cookie("session", "s3cret")
    return response


@flask_app.post("/orders/<tag>")
def flask_create(tag: str) -> FlaskResponse:
    return _flask_order(tag, 201)


@flask_app.get("/orders/<tag>")
def flask_read(tag: str) -> FlaskResponse:
    return _flask_order(tag, 200)


@flask_app.post("/marked/<tag>")
@idempotent_route(required=True, wait=MARKED_WAIT)
def flask_marked(tag: str) -> FlaskResponse:
    return _flask_order(tag, 201)


@flask_app.post("/stream/<tag>")
def flask_stream(tag: str) -> FlaskResponse:
    size = int(flask_request.args["size"])

    def chunks() -> Iterator[bytes]:
        yield from stream_chunks(tag, size)

    return FlaskResponse(chunks(), mimetype="application/octet-stream")


def _wsgi_client(environ: dict[str, Any]) -> str | None:
    client = environ.get("HTTP_X_CLIENT")
    return str(client) if client else None


flask_app.wsgi_app = WSGIMiddleware(  # type: ignore[method-assign]
    flask_app.wsgi_app, **options(scope=_wsgi_client)
)

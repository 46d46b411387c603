"""The Django views of the HTTP tests: the routes described in ``_apps``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from django.http import HttpResponse, StreamingHttpResponse
from django.urls import path
from django.views.decorators.http import require_POST

from idempotask.http import idempotent_route

from ._runlog import MARKED_WAIT, answer, hold, record, should_fail, stream_chunks


def _order(request: Any, tag: str, default: int) -> HttpResponse:
    record(tag, "start")
    body = request.body
    sleep = float(request.GET.get("sleep", "0"))
    if sleep:
        time.sleep(sleep)
    hold(tag)
    if should_fail(tag):
        record(tag, "fail")
        raise RuntimeError(f"the handler for {tag} failed, as the test asked")
    content = answer(tag, body)
    record(tag, "done")
    status = int(request.GET.get("status", default))
    response = HttpResponse(content, status=status, content_type="application/json")
    response["X-Run"] = json.loads(content)["run"]
    response.set_cookie("session", "s3cret")
    return response


def orders(request: Any, tag: str) -> HttpResponse:
    return _order(request, tag, 201 if request.method == "POST" else 200)


@idempotent_route(required=True, wait=MARKED_WAIT)
@require_POST
def marked(request: Any, tag: str) -> HttpResponse:
    return _order(request, tag, 201)


@require_POST
def stream(request: Any, tag: str) -> StreamingHttpResponse:
    size = int(request.GET["size"])

    def chunks() -> Iterator[bytes]:
        yield from stream_chunks(tag, size)

    return StreamingHttpResponse(chunks(), content_type="application/octet-stream")


urlpatterns = [
    path("orders/<str:tag>", orders),
    path("marked/<str:tag>", marked),
    path("stream/<str:tag>", stream),
]

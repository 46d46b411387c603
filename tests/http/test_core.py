"""The options and the edges of the HTTP layer, in process, through the middlewares.

WSGI apps are called through Werkzeug's test client and ASGI apps through httpx's ASGI
transport: the middleware is the same object a server would call. The behaviours every
framework shares run behind real servers in ``test_semantics.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import httpx
import pytest
from werkzeug.test import Client

from idempotask.backends.base import State
from idempotask.backends.memory import MemoryBackend
from idempotask.errors import ConfigurationError
from idempotask.http import Policy, Request, Route, idempotent_route
from idempotask.http.asgi import IdempotencyMiddleware as ASGIMiddleware
from idempotask.http.wsgi import IdempotencyMiddleware as WSGIMiddleware

KEY = "7f1e9a2c-secret-key-0042"


class Counting:
    """A WSGI app answering 201 with a body unique to each run, counting its runs."""

    def __init__(self, status: str = "201 Created", sleep: float = 0.0) -> None:
        self.runs = 0
        self.status = status
        self.sleep = sleep
        self.bodies: list[bytes] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.runs += 1
        self.bodies.append(environ["wsgi.input"].read())
        time.sleep(self.sleep)
        headers = [("Content-Type", "text/plain"), ("Set-Cookie", "session=s3cret")]
        start_response(self.status, headers)
        return [f"run {self.runs} {uuid.uuid4().hex}".encode()]


def client(app: Counting, **options: Any) -> Client:
    options.setdefault("backend", MemoryBackend())
    return Client(WSGIMiddleware(app, **options))


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"ttl": 0}, "ttl"),
        ({"lease": -1}, "lease"),
        ({"wait": "soon"}, "wait"),
        ({"methods": ["P OST"]}, "methods"),
        ({"routes": ["orders"]}, "routes"),
        ({"max_response_bytes": 0}, "max_response_bytes"),
        ({"header": "Idempotency Key"}, "header"),
        ({"docs_url": "docs/idempotency"}, "docs_url"),
        ({"scope": "user"}, "scope"),
        ({"backend": "nowhere"}, "backend"),
        ({"required": "yes"}, "required"),
    ],
)
def test_a_bad_option_is_refused_naming_it(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        Policy(**options)


def test_idempotent_route_refuses_an_option_a_route_cannot_have() -> None:
    with pytest.raises(ConfigurationError, match="backend"):
        idempotent_route(backend="memory://")
    with pytest.raises(ConfigurationError, match="ttl"):
        idempotent_route(ttl=-5)


def test_a_middleware_takes_a_policy_or_options_not_both() -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        WSGIMiddleware(Counting(), Policy(), ttl=5)


def test_routes_match_methods_and_path_patterns() -> None:
    route = Route.parse("POST /orders/{id}/refund")
    assert route.covers("POST", "/orders/7/refund")
    assert not route.covers("PUT", "/orders/7/refund")
    assert not route.covers("POST", "/orders/7/8/refund")
    assert not route.covers("POST", "/orders/7/refund/x")
    files = Route.parse("/files/{path:path}")
    assert files.covers("PUT", "/files/a/b/c.txt")
    assert files.covers("DELETE", "/files/x")
    assert not files.covers("GET", "/files/x")  # a route without a method: writes only
    several = Route.parse("PUT|PATCH /items/{id}")
    assert several.covers("PATCH", "/items/1")
    assert not several.covers("POST", "/items/1")


def test_the_global_mode_covers_post_and_patch_only_unless_configured() -> None:
    app = Counting()
    web = client(app)
    for method in ("POST", "PATCH", "PUT", "DELETE", "GET"):
        for _ in range(2):
            web.open("/x", method=method, headers={"Idempotency-Key": KEY})
    assert app.runs == 1 + 1 + 2 + 2 + 2
    app = Counting()
    web = client(app, methods=("PUT", "DELETE"))
    for method in ("PUT", "DELETE", "POST"):
        for _ in range(2):
            web.open("/x", method=method, headers={"Idempotency-Key": KEY})
    assert app.runs == 1 + 1 + 2


def test_a_request_without_a_key_passes_through_unless_required() -> None:
    app = Counting()
    web = client(app)
    assert web.post("/x").status_code == 201
    assert web.post("/x").status_code == 201
    assert app.runs == 2


# ---------------------------------------------------------------------- responses kept


def test_the_wsgi_reason_phrase_and_headers_are_replayed_as_sent() -> None:
    app = Counting(status="201 Made It")
    web = client(app)
    first = web.post("/x", data=b"a", headers={"Idempotency-Key": KEY})
    again = web.post("/x", data=b"a", headers={"Idempotency-Key": KEY})
    assert first.status == again.status == "201 Made It"
    assert again.get_data() == first.get_data()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Content-Type"] == "text/plain"
    assert "Set-Cookie" in first.headers
    assert "Set-Cookie" not in again.headers


def test_store_cookies_keeps_set_cookie_in_replays() -> None:
    web = client(Counting(), store_cookies=True)
    web.post("/x", headers={"Idempotency-Key": KEY})
    again = web.post("/x", headers={"Idempotency-Key": KEY})
    assert again.headers["Set-Cookie"] == "session=s3cret"


def test_store_client_errors_false_releases_4xx_answers() -> None:
    app = Counting(status="404 Not Found")
    web = client(app, store_client_errors=False)
    web.post("/x", headers={"Idempotency-Key": KEY})
    web.post("/x", headers={"Idempotency-Key": KEY})
    assert app.runs == 2


@pytest.mark.parametrize("status", ["408 Request Timeout", "429 Too Many Requests"])
def test_a_try_again_4xx_answer_is_never_kept(status: str) -> None:
    app = Counting(status=status)
    web = client(app)
    web.post("/x", headers={"Idempotency-Key": KEY})
    web.post("/x", headers={"Idempotency-Key": KEY})
    assert app.runs == 2


def test_a_body_over_max_request_bytes_gets_413_and_never_runs() -> None:
    app = Counting()
    web = client(app, max_request_bytes=1000)
    answer = web.post("/x", data=b"x" * 1001, headers={"Idempotency-Key": KEY})
    assert answer.status_code == 413
    assert json.loads(answer.get_data())["code"] == "request-too-large"
    assert app.runs == 0


def test_a_custom_fingerprint_decides_what_is_the_same_request() -> None:
    """A fingerprint of the parsed JSON treats two spellings of one payload as one
    request, where the default (a digest of the bytes) tells them apart."""

    def parsed(request: Request) -> str:
        return json.dumps(json.loads(request.body), sort_keys=True)

    app = Counting()
    web = client(app, fingerprint=parsed)
    web.post("/x", data=b'{"a": 1, "b": 2}', headers={"Idempotency-Key": KEY})
    again = web.post("/x", data=b'{"b":2,"a":1}', headers={"Idempotency-Key": KEY})
    assert again.headers["Idempotent-Replayed"] == "true"
    other = client(Counting())
    other.post("/x", data=b'{"a": 1, "b": 2}', headers={"Idempotency-Key": KEY})
    assert other.post(
        "/x", data=b'{"b":2,"a":1}', headers={"Idempotency-Key": KEY}
    ).status_code == (422)


def test_without_docs_url_problems_are_about_blank_with_the_status_phrase() -> None:
    answer = client(Counting(), required=True).post("/x")
    body = json.loads(answer.get_data())
    assert answer.status_code == 400
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert body["type"] == "about:blank"
    assert body["title"] == "Bad Request"
    assert body["code"] == "idempotency-key-missing"
    assert "Link" not in answer.headers


def test_a_record_that_is_not_a_kept_response_gets_500_and_never_runs() -> None:
    """Bad data under a key fails closed: the request is not run again."""
    store = MemoryBackend()
    app = Counting()
    web = client(app, backend=store, namespace="hostile")
    web.post("/x", headers={"Idempotency-Key": KEY})
    (record,) = store.scan("hostile:")
    store.delete(record.key)
    token = uuid.uuid4().hex
    store.claim(record.key, token, lease=60, fingerprint=record.fingerprint)
    store.complete(record.key, token, b"not a response", ttl=60)
    answer = web.post("/x", headers={"Idempotency-Key": KEY})
    assert answer.status_code == 500
    assert json.loads(answer.get_data())["code"] == "stored-response-unreadable"
    assert app.runs == 1


@pytest.mark.parametrize(
    ("reason", "headers"),
    [
        ("OK", [["X-A", "1\r\nSet-Cookie: session=attacker"]]),
        ("OK", [["X-A", "1\nSet-Cookie: session=attacker"]]),
        ("OK", [["X-A\r\nSet-Cookie", "session=attacker"]]),
        ("OK", [["X A", "1"]]),
        ("OK", [["X-A", "1\x00"]]),
        ("OK\r\nSet-Cookie: session=attacker", []),
    ],
)
def test_a_forged_record_with_a_line_break_in_its_head_gets_500_not_a_split_response(
    reason: str, headers: list[list[str]]
) -> None:
    """A stored response whose status line or headers hold CR, LF or NUL (or a name that
    is no header name) is foreign data: replaying it would let whoever wrote the record
    add headers (a Set-Cookie, past the cookie filter) on servers that do not check."""
    store = MemoryBackend()
    app = Counting()
    web = client(app, backend=store, namespace="split")
    web.post("/x", headers={"Idempotency-Key": KEY})
    (record,) = store.scan("split:")
    store.delete(record.key)
    token = uuid.uuid4().hex
    store.claim(record.key, token, lease=60, fingerprint=record.fingerprint)
    meta = json.dumps({"status": 200, "reason": reason, "headers": headers}).encode()
    store.complete(record.key, token, b"idempotask-http:1\n" + meta + b"\nhi", ttl=60)
    answer = web.post("/x", headers={"Idempotency-Key": KEY})
    assert answer.status_code == 500
    assert json.loads(answer.get_data())["code"] == "stored-response-unreadable"
    assert "Set-Cookie" not in answer.headers
    assert app.runs == 1


def test_a_wsgi_body_cut_short_by_a_client_that_went_away_never_runs_the_handler() -> None:
    """A body shorter than its Content-Length (the client disconnected mid-upload) is
    not a request: the handler must not run on the truncated bytes (and have its answer
    kept, so the client's real retry would get 422)."""
    store = MemoryBackend()
    app = Counting()
    middleware = WSGIMiddleware(app, backend=store, namespace="cut")
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/x",
        "QUERY_STRING": "",
        "CONTENT_LENGTH": "100",
        "HTTP_IDEMPOTENCY_KEY": KEY,
        "wsgi.input": io.BytesIO(b"a" * 10),
    }
    statuses: list[str] = []
    list(middleware(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    assert app.runs == 0
    assert store.scan("cut:") == []
    assert statuses == ["400 Bad Request"]
    retry = Client(middleware).post("/x", data=b"a" * 100, headers={"Idempotency-Key": KEY})
    assert retry.status_code == 201
    assert app.bodies == [b"a" * 100]


def test_the_store_keeps_no_key_and_no_client_in_clear() -> None:
    store = MemoryBackend()
    client(Counting(), backend=store, namespace="clear").post(
        "/x", headers={"Idempotency-Key": KEY}, environ_base={"REMOTE_USER": "alice@example"}
    )
    (record,) = store.scan("clear:")
    assert record.key.startswith("clear:http:v1:")
    assert KEY not in record.key
    assert "alice" not in record.key
    assert record.state is State.COMPLETED


def test_keys_never_appear_in_full_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    web = client(Counting(), max_response_bytes=5)
    web.post("/x", data=b"one", headers={"Idempotency-Key": KEY})  # over the limit: warned
    web.post("/x", data=b"two", headers={"Idempotency-Key": KEY})  # reused: logged
    assert caplog.records
    assert all(KEY not in record.getMessage() for record in caplog.records)
    assert any(KEY[:4] in record.getMessage() for record in caplog.records)


def test_a_request_path_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """The path is the client's text, percent-decoded by the server: its line breaks and
    terminal escapes are escaped in the log lines that name it."""
    caplog.set_level(logging.DEBUG)
    web = client(Counting(), max_response_bytes=5)
    path = "/x%0D%0AINFO%20admin%20logged%20in%1B[2J"
    web.post(path, data=b"one", headers={"Idempotency-Key": KEY})  # over the limit: warned
    web.post(path, data=b"two", headers={"Idempotency-Key": KEY})  # reused: logged
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert all("/x\\r\\nINFO admin logged in\\x1b[2J" in message for message in messages)
    assert not any(c in message for message in messages for c in "\r\n\x1b")


# ------------------------------------------------------------------------- the store


def _dead_redis() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def test_a_store_outage_answers_503_and_never_runs_the_handler() -> None:
    pytest.importorskip("redis")
    app = Counting()
    answer = client(app, backend=_dead_redis()).post("/x", headers={"Idempotency-Key": KEY})
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "1"
    assert json.loads(answer.get_data())["code"] == "store-unavailable"
    assert app.runs == 0


def test_on_backend_error_open_runs_the_handler_unprotected() -> None:
    pytest.importorskip("redis")
    app = Counting()
    web = client(app, backend=_dead_redis(), on_backend_error="open")
    assert web.post("/x", headers={"Idempotency-Key": KEY}).status_code == 201
    assert app.runs == 1


def test_the_lease_is_renewed_while_a_long_handler_runs() -> None:
    """A handler running for several leases keeps its claim: a retry meanwhile gets 409,
    never a second run."""
    app = Counting(sleep=1.5)
    web = client(app, lease=0.4)
    first: list[Any] = []
    thread = threading.Thread(
        target=lambda: first.append(web.post("/x", headers={"Idempotency-Key": KEY}))
    )
    thread.start()
    deadline = time.monotonic() + 10
    while app.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.9)  # more than two leases in
    busy = web.post("/x", headers={"Idempotency-Key": KEY})
    thread.join()
    assert busy.status_code == 409
    assert first[0].status_code == 201
    assert app.runs == 1


def test_another_request_with_a_key_in_use_gets_422_not_409() -> None:
    """A key reused for another request is a client error even while the first request
    runs: waiting would not make it right."""
    app = Counting(sleep=1.0)
    web = client(app, wait=5)
    thread = threading.Thread(
        target=lambda: web.post("/x", data=b"one", headers={"Idempotency-Key": KEY})
    )
    thread.start()
    deadline = time.monotonic() + 10
    while app.runs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    other = web.post("/x", data=b"two", headers={"Idempotency-Key": KEY})
    thread.join()
    assert other.status_code == 422
    assert app.runs == 1


# ---------------------------------------------------------------------------- scopes


def test_wsgi_keys_are_scoped_by_remote_user() -> None:
    app = Counting()
    web = client(app)
    for user in ("alice", "bob", "alice"):
        web.post("/x", headers={"Idempotency-Key": KEY}, environ_base={"REMOTE_USER": user})
    assert app.runs == 2


def test_asgi_keys_are_scoped_by_the_authenticated_starlette_user() -> None:
    from starlette.applications import Starlette
    from starlette.authentication import (
        AuthCredentials,
        AuthenticationBackend,
        SimpleUser,
    )
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.requests import HTTPConnection
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route as StarletteRoute

    runs: list[str] = []

    class ByHeader(AuthenticationBackend):
        async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
            return AuthCredentials(["authenticated"]), SimpleUser(conn.headers["x-user"])

    async def create(request: Any) -> PlainTextResponse:
        runs.append(request.user.display_name)
        return PlainTextResponse(uuid.uuid4().hex, status_code=201)

    app = Starlette(
        routes=[StarletteRoute("/orders", create, methods=["POST"])],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=ByHeader()),
            Middleware(ASGIMiddleware, backend=MemoryBackend()),
        ],
    )

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as web:
            for user in ("alice", "bob", "alice"):
                await web.post("/orders", headers={"Idempotency-Key": KEY, "X-User": user})

    asyncio.run(scenario())
    assert runs == ["alice", "bob"]


def test_an_asgi_request_cancelled_mid_handler_releases_its_key() -> None:
    """A request cancelled while its handler runs (the server shutting down) gives its
    key back at once, rather than leave it claimed for a lease."""
    started = asyncio.Event()
    runs: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(1)
        if len(runs) == 1:
            started.set()
            await asyncio.sleep(3600)
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    middleware = ASGIMiddleware(app, backend=MemoryBackend(), lease=3600)

    async def request() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/x",
            "query_string": b"",
            "headers": [(b"idempotency-key", KEY.encode())],
        }
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await middleware(scope, receive, send)
        return sent

    async def scenario() -> list[dict[str, Any]]:
        first = asyncio.create_task(request())
        await started.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await request()

    sent = asyncio.run(scenario())
    assert sent[0]["status"] == 201
    assert len(runs) == 2


def test_an_asgi_response_left_unfinished_when_its_client_went_away_is_never_replayed() -> None:
    """Starlette's StreamingResponse under uvicorn (ASGI spec 2.3) stops streaming and
    returns normally when the client disconnects: the half body it sent is not the
    response, so it must not be kept and replayed to the retry as if it were."""
    runs: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(1)
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"part0;", "more_body": True})
        if len(runs) == 1:
            while (await receive())["type"] != "http.disconnect":
                pass
            return  # as StreamingResponse does once the client is gone
        await send({"type": "http.response.body", "body": b"part1;"})

    middleware = ASGIMiddleware(app, backend=MemoryBackend())

    async def request() -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/x",
            "query_string": b"",
            "headers": [(b"idempotency-key", KEY.encode())],
        }
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        with contextlib.suppress(RuntimeError):
            await middleware(scope, receive, send)
        return sent

    async def scenario() -> list[dict[str, Any]]:
        await request()
        return await request()

    sent = asyncio.run(scenario())
    assert len(runs) == 2
    assert sent[1]["body"] == b"part0;part1;"
    assert (b"idempotent-replayed", b"true") not in [(n.lower(), v) for n, v in sent[0]["headers"]]


def test_django_keys_are_scoped_by_the_authenticated_user() -> None:
    pytest.importorskip("django")
    from django.conf import settings

    if not settings.configured:
        settings.configure(ALLOWED_HOSTS=["testserver"], ROOT_URLCONF="tests.http._django_urls")
    from django.http import HttpResponse
    from django.test import RequestFactory, override_settings

    from idempotask.http.django import IdempotencyMiddleware as DjangoMiddleware

    runs: list[object] = []

    def view(request: Any) -> HttpResponse:
        runs.append(request.user.pk)
        return HttpResponse(uuid.uuid4().hex, status=201)

    class User:
        is_authenticated = True

        def __init__(self, pk: int) -> None:
            self.pk = pk

    with override_settings(IDEMPOTASK_HTTP={"backend": MemoryBackend()}):
        middleware = DjangoMiddleware(view)
    factory = RequestFactory()
    answers = []
    for pk in (1, 2, 1):
        request = factory.post("/orders", data=b"{}", content_type="application/json")
        request.META["HTTP_IDEMPOTENCY_KEY"] = KEY
        request.user = User(pk)
        answers.append(middleware(request))
    assert runs == [1, 2]
    assert answers[2].content == answers[0].content
    assert answers[2]["Idempotent-Replayed"] == "true"


def test_a_django_scope_callable_may_use_the_orm_under_asgi() -> None:
    """scope= given a Django request typically looks the client up (request.user, an API
    key's account): ORM work, which Django refuses on the event loop. Under ASGI it runs
    where Django runs sync code, as the view's sync ORM calls would."""
    pytest.importorskip("django")
    from django.conf import settings

    if not settings.configured:
        settings.configure(ALLOWED_HOSTS=["testserver"], ROOT_URLCONF="tests.http._django_urls")
    from django.http import HttpResponse
    from django.test import RequestFactory, override_settings
    from django.utils.asyncio import async_unsafe

    from idempotask.http.django import IdempotencyMiddleware as DjangoMiddleware

    @async_unsafe  # what Django's database layer is
    def account(request: Any) -> str:
        return f"account:{request.headers['X-Account']}"

    runs: list[str] = []

    async def view(request: Any) -> HttpResponse:
        runs.append(request.headers["X-Account"])
        return HttpResponse(uuid.uuid4().hex, status=201)

    with override_settings(IDEMPOTASK_HTTP={"backend": MemoryBackend(), "scope": account}):
        middleware = DjangoMiddleware(view)
    factory = RequestFactory()

    async def scenario() -> list[Any]:
        answers = []
        for who in ("a", "b", "a"):
            request = factory.post("/orders", data=b"{}", content_type="application/json")
            request.META["HTTP_IDEMPOTENCY_KEY"] = KEY
            request.META["HTTP_X_ACCOUNT"] = who
            answers.append(await middleware(request))
        return answers

    answers = asyncio.run(scenario())
    assert runs == ["a", "b"]
    assert answers[2].content == answers[0].content
    assert answers[2]["Idempotent-Replayed"] == "true"


def test_the_asgi_middleware_takes_its_app_by_position_or_by_keyword() -> None:
    """Starlette 1.x builds middlewares with ``cls(app, ...)``, Starlette 0.40 with
    ``cls(app=app, ...)``: both wrap the app; no app at all is a clear error."""

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        return None

    assert ASGIMiddleware(inner, required=True).app is inner
    assert ASGIMiddleware(app=inner, required=True).app is inner
    with pytest.raises(ConfigurationError, match="the ASGI app to wrap is missing"):
        ASGIMiddleware(required=True)


# ------------------------------------------------------------- WSGI's legacy write()


def _writing_app(parts: list[bytes], tail: list[bytes]) -> Any:
    """A WSGI app sending ``parts`` through PEP 3333's legacy ``write()``, then ``tail``
    as its iterable."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        for part in parts:
            write(part)
        return tail

    return app


def test_a_response_written_through_write_is_kept_and_replayed() -> None:
    app = _writing_app([b"ab", b"cd"], [b"ef"])
    web = Client(WSGIMiddleware(app, backend=MemoryBackend()))
    first = web.post("/x", headers={"Idempotency-Key": KEY})
    again = web.post("/x", headers={"Idempotency-Key": KEY})
    assert first.get_data() == again.get_data() == b"abcdef"
    assert again.headers["Idempotent-Replayed"] == "true"


def test_a_response_written_through_write_over_the_limit_is_sent_whole_not_kept() -> None:
    """On a real wsgiref server: past ``max_response_bytes`` what the app writes goes on
    to the server's own ``write()``, in order, and the response is not kept: a retry
    gets 422 and does not run the app again."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    runs = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        runs.append(1)
        return _writing_app([b"one.", b"two.", b"three."], [b"tail."])(environ, start_response)

    middleware = WSGIMiddleware(app, backend=MemoryBackend(), max_response_bytes=5)
    with make_server("127.0.0.1", 0, middleware, handler_class=Quiet) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_port}/x"
            first = httpx.post(url, headers={"Idempotency-Key": KEY}, timeout=10)
            again = httpx.post(url, headers={"Idempotency-Key": KEY}, timeout=10)
        finally:
            server.shutdown()
            thread.join()
    assert first.status_code == 200
    assert first.content == b"one.two.three.tail."
    assert again.status_code == 422
    assert again.json()["code"] == "response-not-kept"
    assert len(runs) == 1


def test_a_response_written_through_write_is_not_held_in_memory_past_the_limit() -> None:
    """64 writes of 1 MiB under the default 1 MiB limit: the middleware holds about the
    limit, not the 64 MiB response (it held all of it, for a peak of ~128 MiB)."""
    import tracemalloc

    mib = 1024 * 1024
    store = MemoryBackend()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        for _ in range(64):
            write(b"x" * mib)
        return []

    middleware = WSGIMiddleware(app, backend=store, namespace="written")
    sent: list[str] = []
    received = 0

    def server_write(data: bytes) -> None:
        nonlocal received
        assert sent, "write() before start_response()"
        received += len(data)

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        assert not sent or exc_info is not None, "start_response() called twice"
        sent.append(status)
        return server_write

    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/x",
        "QUERY_STRING": "",
        "CONTENT_LENGTH": "0",
        "HTTP_IDEMPOTENCY_KEY": KEY,
        "wsgi.input": io.BytesIO(b""),
    }
    tracemalloc.start()
    try:
        result = middleware(environ, start_response)
        for chunk in result:
            received += len(chunk)
        getattr(result, "close", lambda: None)()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent == ["200 OK"]
    assert received == 64 * mib
    assert peak < 8 * mib, f"peak {peak / mib:.1f} MiB"
    (record,) = store.scan("written:")
    assert record.state is State.COMPLETED  # kept as used, without the response

"""HTTP ``Idempotency-Key``: what the middleware adds to a request.

The figures are a replayed request (answered from the store without running the
handler) and a first request (a new key: claim, run, keep), each beside the floor: the
same handler answering the same request without the middleware, measured in the same
run, batch by batch in turn (``benchmarks.timing.interleaved``).

- In process: Flask's WSGI app and FastAPI's ASGI app called directly (no server, no
  socket) on the in-memory store: the middleware's own CPU, as added microseconds.
- Over loopback: FastAPI under uvicorn in a process of its own, one keep-alive httpx
  connection, on the in-memory store and on Redis: what a client sees, as a ratio.

``python -m uvicorn benchmarks.http:served`` is the served app: ``/without/orders`` is
the bare handler, ``/with/orders`` the same handler behind the middleware, on the store
named by ``IDEMPOTASK_URL``.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations at
# run time, and the endpoint is defined where its types are imported, in a function.
import asyncio
import io
import itertools
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.report import Plan, Row, Skipped
from benchmarks.timing import Timing, ainterleaved, interleaved

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("IDEMPOTASK_REDIS_URL", "redis://127.0.0.1:6379/0")
BODY = b'{"customer": 42, "items": [{"sku": "A-1", "quantity": 2}], "currency": "EUR"}'
ANSWER = b'{"order": 1001, "status": "created"}'

Message = MutableMapping[str, Any]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------------- the handlers


def _fastapi_app() -> Any:
    from fastapi import FastAPI, Request, Response

    app = FastAPI()

    @app.post("/orders")
    async def create(request: Request) -> Response:
        await request.body()
        return Response(ANSWER, 201, media_type="application/json")

    return app


def _flask_app() -> Any:
    from flask import Flask, Response, request

    app = Flask("bench")

    @app.post("/orders")
    def create() -> Response:
        request.get_data()
        return Response(ANSWER, 201, mimetype="application/json")

    return app


def _served() -> Callable[[Message, Any, Any], Awaitable[None]]:
    """The app uvicorn serves: one handler, without and with the middleware."""
    from idempotask.http.asgi import IdempotencyMiddleware

    bare = _fastapi_app()
    # A ttl of an hour: should a run's clean-up not happen, its records still go away.
    wrapped = IdempotencyMiddleware(bare, routes=["POST /orders"], namespace=_namespace(), ttl=3600)

    async def app(scope: Message, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        for prefix, target in (("/with", wrapped), ("/without", bare)):
            if path.startswith(prefix + "/"):
                await target({**scope, "path": path[len(prefix) :]}, receive, send)
                return
        await bare(scope, receive, send)

    return app


def _namespace() -> str:
    return os.environ.get("BENCH_HTTP_NAMESPACE", "bench")


def __getattr__(name: str) -> Any:
    # The served app is made when uvicorn asks for it, not when the suite is imported.
    if name == "served":
        return _served()
    raise AttributeError(name)


# -------------------------------------------------------------------------- in process


def _environ(key: str | None) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/orders",
        "QUERY_STRING": "",
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(BODY)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(BODY),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if key is not None:
        environ["HTTP_IDEMPOTENCY_KEY"] = key
    return environ


def _wsgi_call(app: Any, key: str | None) -> bytes:
    status: list[str] = []

    def start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
        status.append(line)
        return None

    result = app(_environ(key), start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not status or not status[0].startswith("201"):
        raise RuntimeError(f"the WSGI app answered {status}, not 201")
    return body


async def _asgi_call(app: Any, key: str | None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    if key is not None:
        headers.append((b"idempotency-key", key.encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/orders",
        "raw_path": b"/orders",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "server": ("bench", 80),
        "client": ("127.0.0.1", 50000),
    }
    pending = [{"type": "http.request", "body": BODY, "more_body": False}]
    status: list[int] = []

    async def receive() -> Message:
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [201]:
        raise RuntimeError(f"the ASGI app answered {status}, not 201")


def in_process_rows(plan: Plan) -> list[Row]:
    """Flask and FastAPI called directly, with and without the middleware (memory store)."""
    from idempotask.backends.memory import MemoryBackend
    from idempotask.http.asgi import IdempotencyMiddleware as ASGIMiddleware
    from idempotask.http.wsgi import IdempotencyMiddleware as WSGIMiddleware

    batches = 200 // plan.scale
    seq = itertools.count()
    store = MemoryBackend(max_entries=1_000_000)
    flask_app = _flask_app()
    bare_wsgi = flask_app.wsgi_app
    wsgi = WSGIMiddleware(bare_wsgi, routes=["POST /orders"], backend=store)
    replay_key = str(uuid.uuid4())
    _wsgi_call(wsgi, replay_key)
    flask = interleaved(
        {
            "floor": lambda: _wsgi_call(bare_wsgi, None),
            "replay": lambda: _wsgi_call(wsgi, replay_key),
            "first": lambda: _wsgi_call(wsgi, f"first-{next(seq)}"),
        },
        batches=batches,
        batch=20,
    )

    bare_asgi = _fastapi_app()
    asgi = ASGIMiddleware(bare_asgi, routes=["POST /orders"], backend=store)

    async def fastapi_timings() -> dict[str, Timing]:
        await _asgi_call(asgi, replay_key)
        return await ainterleaved(
            {
                "floor": lambda: _asgi_call(bare_asgi, None),
                "replay": lambda: _asgi_call(asgi, replay_key),
                "first": lambda: _asgi_call(asgi, f"afirst-{next(seq)}"),
            },
            batches=batches,
            batch=20,
        )

    fast = asyncio.run(fastapi_timings())
    flask_floor = f"Flask {_version('flask')} handler without the middleware"
    fastapi_floor = f"FastAPI {_version('fastapi')} handler without the middleware"
    return [
        Row(
            "http, Flask in process: replayed request", flask["replay"], flask_floor, flask["floor"]
        ),
        Row(
            "http, Flask in process: first request (claim, run, keep)",
            flask["first"],
            flask_floor,
            flask["floor"],
        ),
        Row(
            "http, FastAPI in process: replayed request",
            fast["replay"],
            fastapi_floor,
            fast["floor"],
        ),
        Row(
            "http, FastAPI in process: first request (claim, run, keep)",
            fast["first"],
            fastapi_floor,
            fast["floor"],
        ),
    ]


# ------------------------------------------------------------------------ over loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _uvicorn(store_url: str, namespace: str) -> Iterator[str]:
    """uvicorn serving :func:`_served` in a process of its own; yields its base URL."""
    port = _free_port()
    env = {
        **os.environ,
        "IDEMPOTASK_URL": store_url,
        "BENCH_HTTP_NAMESPACE": namespace,
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "uvicorn", "benchmarks.http:served"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                error = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"uvicorn exited: {error[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("uvicorn did not listen within 30 s") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def loopback_rows(plan: Plan, label: str, store_url: str) -> list[Row]:
    """One keep-alive client against uvicorn: without, replayed, first (``label`` store)."""
    import httpx

    batches = 100 // plan.scale
    seq = itertools.count()
    replay_key = str(uuid.uuid4())
    headers = {"Content-Type": "application/json"}
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    with _uvicorn(store_url, namespace) as base, httpx.Client(base_url=base, timeout=30) as client:

        def send(path: str, key: str | None) -> None:
            sent = headers if key is None else {**headers, "Idempotency-Key": key}
            answer = client.post(path, content=BODY, headers=sent)
            if answer.status_code != 201:
                raise RuntimeError(f"{path} answered {answer.status_code}: {answer.text[:200]}")

        send("/with/orders", replay_key)
        try:
            timings = interleaved(
                {
                    "floor": lambda: send("/without/orders", None),
                    "replay": lambda: send("/with/orders", replay_key),
                    "first": lambda: send("/with/orders", f"first-{next(seq)}"),
                },
                batches=batches,
                batch=10,
            )
        finally:
            if store_url.startswith("redis"):
                _delete_namespace(store_url, namespace)
    server = f"FastAPI {_version('fastapi')} under uvicorn {_version('uvicorn')}"
    floor = "same handler without the middleware, over loopback"
    return [
        Row(
            f"http, {server}, {label}: replayed request", timings["replay"], floor, timings["floor"]
        ),
        Row(
            f"http, {server}, {label}: first request (claim, run, keep)",
            timings["first"],
            floor,
            timings["floor"],
        ),
    ]


def _delete_namespace(url: str, namespace: str) -> None:
    """Remove the run's records from Redis."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i : i + 1000])
    finally:
        client.close()


def rows(plan: Plan) -> list[Row]:
    """In-process rows, then over loopback on the in-memory store and on Redis."""
    result = in_process_rows(plan) + loopback_rows(plan, "memory store", "memory://")
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # no Redis here: say so in the report, never a number
        reason = f"Redis unreachable at {REDIS_URL} ({type(exc).__name__})"
        return [*result, Row("http over loopback, Redis store", Skipped(reason))]
    return result + loopback_rows(plan, "Redis store", REDIS_URL)

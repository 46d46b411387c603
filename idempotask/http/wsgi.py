"""``Idempotency-Key`` for any WSGI app: Flask, Django's WSGI app, Pyramid, Falcon...

::

    from flask import Flask
    from idempotask.http.wsgi import IdempotencyMiddleware

    app = Flask(__name__)
    app.wsgi_app = IdempotencyMiddleware(app.wsgi_app, routes=["POST /orders"])

A covered request's body is read once, before the app runs, and the app gets it as a
new ``wsgi.input`` (with ``CONTENT_LENGTH`` set to its size). The app's response is
collected until it is complete and kept, what it sends through PEP 3333's legacy
``write()`` included (see the README: a response larger than ``max_response_bytes`` is
sent as it comes and not kept). Views marked with
:func:`~idempotask.http.idempotent_route` are found through a Flask app's ``url_map``
when the middleware wraps the app or its ``wsgi_app``. Only the standard library is
needed.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

from idempotask import flow
from idempotask.errors import ConfigurationError
from idempotask.http._core import DROP, PASS, Captured, Handler, Signal
from idempotask.http._policy import Policy
from idempotask.http._stored import Headers, Reply

__all__ = ["IdempotencyMiddleware"]

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_CHUNK = 64 * 1024


class IdempotencyMiddleware:
    """WSGI middleware making covered requests safely retryable with ``Idempotency-Key``.

    Give a :class:`~idempotask.http.Policy` or its options as keyword arguments
    (``routes=``, ``required=``, ``ttl=``...).
    """

    def __init__(self, app: WSGIApp, policy: Policy | None = None, **options: Any) -> None:
        if policy is not None and options:
            raise ConfigurationError(
                "IdempotencyMiddleware: give a Policy or its options, not both"
            )
        self.app = app
        self.handler = Handler(policy if policy is not None else Policy(**options))

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        exchange = _Exchange(self.app, environ, start_response)
        answer = flow.drive(self.handler.flow(exchange))
        if answer is PASS:
            return self.app(environ, start_response)
        if isinstance(answer, Reply):
            start_response(_status_line(answer.status, answer.reason), answer.headers)
            return [answer.body]
        if isinstance(answer, _Capture):
            return answer.finish()
        assert answer is DROP
        # The client is gone, but WSGI wants a response all the same.
        start_response("400 Bad Request", [("Content-Length", "0")])
        return []


def _status_line(status: int, reason: str) -> str:
    if not reason:
        from http import HTTPStatus

        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    return f"{status} {reason}"


class _Capture(Captured):
    """The app's response: status, headers and the body collected so far."""

    def __init__(self, server_start_response: StartResponse, limit: int) -> None:
        super().__init__()
        self.server_start_response = server_start_response
        self.limit = limit
        self.status_line = ""
        self.chunks: list[bytes] = []
        self.rest: Iterator[bytes] | None = None  # what is left once over the limit
        self.result: Iterable[bytes] | None = None  # the app's iterable, to close
        # The server's write(), once a response written past the limit has been started.
        self.server_write: Callable[[bytes], object] | None = None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if self.server_write is not None:
            # Already sent on: the server decides (PEP 3333: it re-raises exc_info).
            return self.server_start_response(status, headers, exc_info)
        # Nothing is sent before the response is complete, so a second call with
        # exc_info (PEP 3333: an error after the first one) may replace the headers.
        self.status_line = status
        self.status = int(status[:3])
        self.reason = status[4:]
        self.headers = list(headers)
        return self.write

    def write(self, data: bytes) -> None:
        """PEP 3333's legacy ``write()``: collected like the iterable's chunks; past the
        limit, what was collected and all that follows go to the server's own
        ``write()``, and nothing more is kept."""
        if not self.status_line:
            raise RuntimeError("the WSGI app called write() before start_response")
        self.size += len(data)
        if self.server_write is not None:
            self.server_write(data)
            return
        self.chunks.append(bytes(data))
        if self.size > self.limit:
            self.complete = False
            self.server_write = self.server_start_response(self.status_line, self.headers)
            chunks, self.chunks = self.chunks, []
            for chunk in chunks:
                self.server_write(chunk)

    def collect(self, result: Iterable[bytes]) -> None:
        self.result = result
        iterator = iter(result)
        if not self.complete:  # over the limit through write(): the rest is sent as it comes
            self.rest = iterator
            return
        for chunk in iterator:
            self.chunks.append(chunk)
            self.size += len(chunk)
            if self.size > self.limit:
                self.complete = False
                self.rest = iterator
                return
        self.close()

    def close(self) -> None:
        result, self.result = self.result, None
        close = getattr(result, "close", None)
        if close is not None:
            close()

    def finish(self) -> Iterable[bytes]:
        if self.server_write is None:
            self.server_start_response(self.status_line, self.headers)
        if self.rest is None:
            return [self.body]
        return _Rest(self)


class _Rest:
    """A response over the limit: what was collected, then the rest as it comes; closing
    it closes the app's iterable (PEP 3333)."""

    def __init__(self, capture: _Capture) -> None:
        self.capture = capture

    def __iter__(self) -> Iterator[bytes]:
        capture = self.capture
        chunks, capture.chunks = capture.chunks, []
        yield from chunks
        if capture.rest is not None:
            yield from capture.rest

    def close(self) -> None:
        self.capture.close()


class _Exchange:
    """One WSGI request for the core."""

    __slots__ = (
        "_body",
        "_headers",
        "app",
        "environ",
        "method",
        "path",
        "query",
        "start_response",
    )

    def __init__(
        self, app: WSGIApp, environ: dict[str, Any], start_response: StartResponse
    ) -> None:
        self.app = app
        self.environ = environ
        self.start_response = start_response
        self.method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        self.path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        self.query = environ.get("QUERY_STRING", "")
        self._headers: Headers | None = None
        self._body = b""

    def headers(self) -> Headers:
        if self._headers is None:
            headers = []
            for name, value in self.environ.items():
                if name.startswith("HTTP_"):
                    headers.append((name[5:].replace("_", "-").lower(), str(value)))
                elif name in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
                    headers.append((name.replace("_", "-").lower(), str(value)))
            self._headers = headers
        return self._headers

    def native(self) -> Any:
        return self.environ

    def client(self) -> str:
        user = self.environ.get("REMOTE_USER")
        return f"user:{user}" if user else ""

    async def aclient(self) -> str:
        return self.client()

    async def acall(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def view(self) -> object | None:
        return _flask_view(self.app, self.environ)

    def read_body(self, limit: int) -> bytes | Signal | None:
        stream = self.environ.get("wsgi.input")
        length = str(self.environ.get("CONTENT_LENGTH") or "").strip()
        if length.isdigit():
            wanted = int(length)
            if wanted > limit:
                return None
        elif self.environ.get("wsgi.input_terminated"):
            wanted = limit + 1  # chunked: read to the end, or one byte past the limit
        else:
            wanted = 0
        parts, got = [], 0
        while stream is not None and got < wanted:
            part = stream.read(min(_CHUNK, wanted - got))
            if not part:
                break
            parts.append(part)
            got += len(part)
        if got > limit:
            return None
        if got < wanted and length.isdigit():
            return DROP  # shorter than its Content-Length: the client went away mid-body
        self._body = b"".join(parts)
        return self._body

    async def aread_body(self, limit: int) -> bytes | Signal | None:
        return self.read_body(limit)

    def run(self, limit: int) -> Captured:
        environ = self.environ
        environ["wsgi.input"] = io.BytesIO(self._body)
        environ["CONTENT_LENGTH"] = str(len(self._body))
        capture = _Capture(self.start_response, limit)
        try:
            capture.collect(self.app(environ, capture.start_response))
        except BaseException as exc:  # the core releases the key, then re-raises it
            capture.error = exc
            with contextlib.suppress(Exception):  # the first error is the one to report
                capture.close()
        if capture.error is None and not capture.status_line:
            capture.error = RuntimeError("the WSGI app returned without calling start_response")
        if capture.rest is None:
            capture.body = b"".join(capture.chunks)
        return capture

    async def arun(self, limit: int) -> Captured:
        return self.run(limit)


def _flask_view(app: Any, environ: dict[str, Any]) -> object | None:
    """The view a Flask app (``app`` itself, or the app of a bound ``app.wsgi_app``)
    routes this request to, through Werkzeug's public ``Map.bind_to_environ().match()``;
    None for other apps, and when no rule matches (a 404, 405 or redirect)."""
    flask_app = app if hasattr(app, "url_map") else getattr(app, "__self__", None)
    url_map = getattr(flask_app, "url_map", None)
    views = getattr(flask_app, "view_functions", None)
    if url_map is None or not isinstance(views, dict):
        return None
    try:
        endpoint, _ = url_map.bind_to_environ(environ).match()
    except Exception:  # werkzeug's NotFound, MethodNotAllowed, RequestRedirect
        return None
    view: object | None = views.get(endpoint)
    return view

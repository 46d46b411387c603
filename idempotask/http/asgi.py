"""``Idempotency-Key`` for any ASGI app: Starlette, FastAPI, Quart, Django's ASGI app.

::

    from fastapi import FastAPI
    from idempotask.http.asgi import IdempotencyMiddleware

    app = FastAPI()
    app.add_middleware(IdempotencyMiddleware, routes=["POST /orders"], required=True)

A covered request's body is received once, before the app runs, and the same
``http.request`` messages are handed to the app when it asks. The app's response is
held until it is complete and kept (see the README: streaming responses are sent when
they end; one larger than ``max_response_bytes`` is sent as it comes and not kept). The
app is told the server offers no ``pathsend``, ``zerocopysend``, ``early_hint`` or
``trailers`` extensions for covered requests, so everything it sends can be kept.
Only the standard library is needed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from idempotask import flow
from idempotask.errors import ConfigurationError
from idempotask.http._core import ASYNC_CATCH, DROP, PASS, Captured, Handler, Signal
from idempotask.http._policy import Policy
from idempotask.http._stored import Headers, Reply

__all__ = ["IdempotencyMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Server extensions whose messages carry a response outside http.response.body: hidden
# from the app for covered requests, so the whole response passes through the capture.
_HELD_BACK = frozenset(
    {
        "http.response.pathsend",
        "http.response.zerocopysend",
        "http.response.early_hint",
        "http.response.trailers",
    }
)


class IdempotencyMiddleware:
    """ASGI middleware making covered requests safely retryable with ``Idempotency-Key``.

    Give a :class:`~idempotask.http.Policy` or its options as keyword arguments
    (``routes=``, ``required=``, ``ttl=``...): both work with Starlette's
    ``add_middleware``. Views marked with :func:`~idempotask.http.idempotent_route`
    are found through a Starlette/FastAPI app's ``routes``.
    """

    # ``app`` is positional-only for type checkers, as Starlette's middleware factory
    # protocol has it (otherwise ``app.add_middleware(IdempotencyMiddleware, ...)`` fails
    # under mypy), and still taken by keyword at run time: older Starlette (0.40) builds
    # middlewares with ``cls(app=app, ...)``.
    def __init__(
        self, app: ASGIApp | None = None, /, policy: Policy | None = None, **options: Any
    ) -> None:
        if app is None:
            app = options.pop("app", None)
            if app is None:
                raise ConfigurationError("IdempotencyMiddleware: the ASGI app to wrap is missing")
        if policy is not None and options:
            raise ConfigurationError(
                "IdempotencyMiddleware: give a Policy or its options, not both"
            )
        self.app = app
        self.handler = Handler(policy if policy is not None else Policy(**options))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(self.app, scope, receive, send)
        answer = await flow.adrive(self.handler.flow(exchange), ASYNC_CATCH)
        if answer is PASS:
            await self.app(scope, receive, send)
        elif isinstance(answer, Reply):
            await send_reply(send, answer)
        elif isinstance(answer, _Capture):
            await answer.finish()
        # DROP: the client is gone, nothing to send.


async def send_reply(send: Send, reply: Reply) -> None:
    """Send a replay or a problem."""
    headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


class _Capture(Captured):
    """The app's response, held until complete (or sent on once over the limit)."""

    def __init__(self, send: Send, limit: int) -> None:
        super().__init__()
        self._send = send
        self._limit = limit
        self._start: Message | None = None
        self._chunks: list[bytes] = []
        self.passing = False  # over the limit: the rest goes straight to the client
        self.ended = False  # the body's last message (more_body false) came

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._start = message
            self.status = int(message["status"])
            self.headers = [
                (bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
                for n, v in message.get("headers", ())
            ]
        elif kind == "http.response.body":
            chunk = bytes(message.get("body", b""))
            self.ended = not message.get("more_body", False)
            self.size += len(chunk)
            if self.passing:
                await self._send(message)
            elif self.size > self._limit and self._start is not None:
                self.complete = False
                self.passing = True
                held, self._chunks = b"".join(self._chunks), []
                await self._send(self._start)
                more = bool(message.get("more_body", False))
                await self._send(
                    {"type": "http.response.body", "body": held + chunk, "more_body": more}
                )
            else:
                self._chunks.append(chunk)
        else:  # a message of an extension the app found anyway: not ours to judge
            await self._send(message)

    def done(self) -> None:
        self.body = b"".join(self._chunks)
        self._chunks = []
        if self.error is None and self._start is None:
            self.error = RuntimeError("the ASGI app returned without starting a response")
        elif self.error is None and not self.ended:
            # Starlette's StreamingResponse returns so when its client goes away: half a
            # response is not the answer to keep (or to replay).
            self.error = RuntimeError("the ASGI app returned before its response ended")

    async def finish(self) -> None:
        """Send what was held (nothing left when it was passed on)."""
        if self.passing or self._start is None:
            return
        await self._send(self._start)
        await self._send({"type": "http.response.body", "body": self.body})


class _Exchange:
    """One ASGI request for the core."""

    __slots__ = (
        "_headers",
        "_received",
        "app",
        "method",
        "path",
        "query",
        "receive",
        "scope",
        "send",
    )

    def __init__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        self.app = app
        self.scope = scope
        self.receive = receive
        self.send = send
        self.method = str(scope["method"]).upper()
        self.path = str(scope["path"])
        self.query = bytes(scope.get("query_string", b"")).decode("latin-1")
        self._headers: Headers | None = None
        self._received: list[Message] = []

    def headers(self) -> Headers:
        if self._headers is None:
            self._headers = [
                (bytes(n).decode("latin-1").lower(), bytes(v).decode("latin-1"))
                for n, v in self.scope.get("headers", ())
            ]
        return self._headers

    def native(self) -> Any:
        return self.scope

    def client(self) -> str:
        # Starlette's AuthenticationMiddleware (running before this one) sets it.
        user = self.scope.get("user")
        if user is None or not getattr(user, "is_authenticated", False):
            return ""
        try:
            identity = str(user.identity)
        except (AttributeError, NotImplementedError):
            identity = str(getattr(user, "display_name", "") or "")
        return f"user:{identity}" if identity else ""

    async def aclient(self) -> str:
        return self.client()

    async def acall(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def view(self) -> object | None:
        owner = self.scope.get("app") or self.app
        routes = getattr(owner, "routes", None)
        return _starlette_view(routes, self.scope, 0) if routes else None

    def read_body(self, limit: int) -> bytes | Signal | None:
        raise TypeError("an ASGI request is read by the async driver only")

    async def aread_body(self, limit: int) -> bytes | Signal | None:
        length = next((v for n, v in self.headers() if n == "content-length"), "")
        if length.strip().isdigit() and int(length) > limit:
            return None
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                return DROP
            self._received.append(message)
            size += len(message.get("body", b""))
            if size > limit:
                return None
            if not message.get("more_body", False):
                return b"".join(bytes(m.get("body", b"")) for m in self._received)

    def run(self, limit: int) -> Captured:
        raise TypeError("an ASGI app is run by the async driver only")

    async def arun(self, limit: int) -> Captured:
        pending = deque(self._received)

        async def receive() -> Message:
            # The body messages received before, in order; then the server's own
            # (a disconnect the app may wait for).
            return pending.popleft() if pending else await self.receive()

        scope = self.scope
        extensions = scope.get("extensions")
        if extensions and _HELD_BACK.intersection(extensions):
            kept = {k: v for k, v in extensions.items() if k not in _HELD_BACK}
            scope = {**scope, "extensions": kept}
        capture = _Capture(self.send, limit)
        try:
            await self.app(scope, receive, capture.send)
        except BaseException as exc:  # the core releases the key, then re-raises it
            capture.error = exc
        capture.done()
        return capture


def _starlette_view(routes: Any, scope: Scope, depth: int) -> object | None:
    """The endpoint a Starlette/FastAPI router would call, through its public
    ``Route.matches(scope)``; None when no route matches fully (a 404 or 405)."""
    for route in routes:
        matches = getattr(route, "matches", None)
        if matches is None:
            continue
        try:
            found, child = matches(scope)
        except Exception:  # a custom route that cannot judge this scope
            continue
        if getattr(found, "name", "") != "FULL":
            continue
        inner = getattr(route, "routes", None)  # a Mount or Host: look inside
        if inner and depth < 8:
            hit = _starlette_view(inner, {**scope, **child}, depth + 1)
            if hit is not None:
                return hit
            continue
        endpoint: object | None = child.get("endpoint")
        return endpoint
    return None

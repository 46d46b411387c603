"""``Idempotency-Key`` as Django middleware, sync and async.

::

    # settings.py
    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "idempotask.http.django.IdempotencyMiddleware",  # after authentication
    ]
    IDEMPOTASK_HTTP = {"required": True}  # Policy options; "routes": [...] or the decorator

    # views.py
    from idempotask.http import idempotent_route

    @idempotent_route(required=True)
    def create_order(request): ...

Marked views are found with ``django.urls.resolve()``; keys are scoped by
``request.user`` when it is authenticated (``request.auser()`` under ASGI). The body is
read once through ``request.body``, which Django keeps for the view. Django is imported
when the middleware is made, never by ``import idempotask.http``.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from idempotask import flow
from idempotask.errors import ConfigurationError
from idempotask.http._core import ASYNC_CATCH, DROP, PASS, Answer, Captured, Handler, Signal
from idempotask.http._policy import Policy
from idempotask.http._stored import Headers, Reply

__all__ = ["IdempotencyMiddleware"]


class IdempotencyMiddleware:
    """Django middleware making covered requests safely retryable with
    ``Idempotency-Key``; its options are the ``IDEMPOTASK_HTTP`` setting (a dict of
    :class:`~idempotask.http.Policy` options, or a ``Policy``)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        from asgiref.sync import iscoroutinefunction, markcoroutinefunction
        from django.conf import settings  # type: ignore[import-untyped]

        options = getattr(settings, "IDEMPOTASK_HTTP", None) or {}
        if isinstance(options, Policy):
            policy = options
        elif isinstance(options, dict):
            policy = Policy(**options)
        else:
            raise ConfigurationError(
                "IDEMPOTASK_HTTP: expected a dict of idempotask.http.Policy options or a "
                f"Policy, got {type(options).__name__}"
            )
        self.get_response = get_response
        self.handler = Handler(policy, always_look_up_views=True)
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self.is_async:
            return self.__acall__(request)
        answer = flow.drive(self.handler.flow(_Exchange(self.get_response, request)))
        if answer is PASS:
            return self.get_response(request)
        return _respond(answer)

    async def __acall__(self, request: Any) -> Any:
        exchange = _Exchange(self.get_response, request)
        answer = await flow.adrive(self.handler.flow(exchange), ASYNC_CATCH)
        if answer is PASS:
            return await self.get_response(request)
        return _respond(answer)


def _respond(answer: Answer) -> Any:
    if isinstance(answer, _Capture):
        return answer.response
    if isinstance(answer, Reply):
        return as_response(answer)
    # DROP: the client went away mid-upload (WSGI); it is not there to read this.
    return as_response(Reply(400))


def as_response(reply: Reply) -> Any:
    """A Django ``HttpResponse`` of a replay or a problem."""
    from django.http import HttpResponse  # type: ignore[import-untyped]

    response = HttpResponse(reply.body, status=reply.status, reason=reply.reason or None)
    del response.headers["Content-Type"]  # only the stored headers
    for name, value in reply.headers:
        if name.lower() == "set-cookie":
            response.cookies.load(value)
        else:
            response.headers[name] = value
    return response


class _Capture(Captured):
    """The view's response, with its streamed content collected up to the limit."""

    def __init__(self, response: Any) -> None:
        super().__init__()
        self.response = response
        self.status = int(response.status_code)
        self.reason = str(response.reason_phrase or "")
        headers: Headers = [(str(n), str(v)) for n, v in response.items()]
        headers += [("Set-Cookie", c.OutputString()) for c in response.cookies.values()]
        self.headers = headers

    def content(self, limit: int) -> None:
        response = self.response
        if response.streaming:
            chunks: list[bytes] = []
            iterator = iter(response)
            for chunk in iterator:
                chunks.append(chunk)
                self.size += len(chunk)
                if self.size > limit:
                    self.complete = False
                    response.streaming_content = itertools.chain(chunks, iterator)
                    return
            self.body = b"".join(chunks)
            response.streaming_content = [self.body]
            return
        self.body = bytes(response.content)
        self.size = len(self.body)
        self.complete = self.size <= limit

    async def acontent(self, limit: int) -> None:
        response = self.response
        if not response.streaming:
            self.content(limit)
            return
        chunks: list[bytes] = []
        iterator = response.__aiter__()
        async for chunk in iterator:
            chunks.append(chunk)
            self.size += len(chunk)
            if self.size > limit:
                self.complete = False
                response.streaming_content = _chain(chunks, iterator)
                return
        self.body = b"".join(chunks)
        response.streaming_content = _chain([self.body], None)


async def _chain(first: Iterable[bytes], rest: AsyncIterator[bytes] | None) -> AsyncIterator[bytes]:
    for chunk in first:
        yield chunk
    if rest is not None:
        async for chunk in rest:
            yield chunk


class _Exchange:
    """One Django request for the core."""

    __slots__ = ("_headers", "get_response", "method", "path", "query", "request")

    def __init__(self, get_response: Any, request: Any) -> None:
        self.get_response = get_response
        self.request = request
        self.method = str(request.method).upper()
        self.path = str(request.path)
        self.query = str(request.META.get("QUERY_STRING", ""))
        self._headers: Headers | None = None

    def headers(self) -> Headers:
        if self._headers is None:
            self._headers = [(str(n).lower(), str(v)) for n, v in self.request.headers.items()]
        return self._headers

    def native(self) -> Any:
        return self.request

    def client(self) -> str:
        user = getattr(self.request, "user", None)
        if user is None or not user.is_authenticated:
            return ""
        return f"user:{user.pk}"

    async def aclient(self) -> str:
        auser = getattr(self.request, "auser", None)  # Django 5+, with authentication
        if auser is None:
            from asgiref.sync import sync_to_async

            # request.user may query the session and the user table: not on the loop.
            client: str = await sync_to_async(self.client)()
            return client
        user = await auser()
        return f"user:{user.pk}" if user.is_authenticated else ""

    async def acall(self, fn: Callable[..., Any], *args: Any) -> Any:
        from asgiref.sync import sync_to_async

        return await sync_to_async(fn)(*args)

    def view(self) -> object | None:
        from django.urls import Resolver404, resolve  # type: ignore[import-untyped]

        try:
            match = resolve(self.request.path_info, getattr(self.request, "urlconf", None))
        except Resolver404:
            return None
        view: object | None = match.func
        return view

    def read_body(self, limit: int) -> bytes | Signal | None:
        length = str(self.request.META.get("CONTENT_LENGTH") or "").strip()
        if length.isdigit() and int(length) > limit:
            return None
        # Django keeps what request.body read: the view (request.POST, request.read())
        # sees the same bytes.
        body = bytes(self.request.body)
        if length.isdigit() and len(body) < int(length):
            # Under WSGI Django reads the body only now, and a client that went away
            # mid-upload leaves it short (Django does not say so): not a request.
            return DROP
        return None if len(body) > limit else body

    async def aread_body(self, limit: int) -> bytes | Signal | None:
        return self.read_body(limit)

    def run(self, limit: int) -> Captured:
        try:
            capture = _Capture(self.get_response(self.request))
            capture.content(limit)
        except BaseException as exc:  # the core releases the key, then re-raises it
            return _failed(exc)
        return capture

    async def arun(self, limit: int) -> Captured:
        try:
            capture = _Capture(await self.get_response(self.request))
            await capture.acontent(limit)
        except BaseException as exc:
            return _failed(exc)
        return capture


def _failed(error: BaseException) -> Captured:
    # Django turns a view's exception into a 500 response before it reaches middleware;
    # this is for what escapes anyway (the test client's raise_request_exception).
    captured = Captured()
    captured.error = error
    return captured

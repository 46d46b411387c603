"""Who may use the dashboard, and what a browser may do with it.

- **Authentication**, on every request (pages, static files, the live overview): the
  ``auth=`` hook of :func:`~idempotask.web.create_app` (it receives the request and
  returns a user name, or None to refuse), else a shared ``token`` (HTTP basic auth with
  any user name and the token as password, or ``Authorization: Bearer <token>``), else
  nothing -- and then only clients on this machine (loopback addresses) are served, and
  only under a loopback name in the URL (``localhost``, ``127.0.0.1``, ``[::1]``): a web
  page could otherwise make the browser send its own site's name to this machine (DNS
  rebinding) and read and act on the dashboard as its own origin.
- **CSRF**: every state-changing request is a POST carrying a token that is an HMAC of a
  random cookie (``HttpOnly``, ``SameSite=Strict``) and the user name; a POST without
  it, with another's, or announced by the browser as cross-site is refused. GETs never
  change anything.
- **Headers** on every response: a strict Content-Security-Policy (scripts and styles
  from this app only, no inline script, no framing, forms posting here only), no
  sniffing, no referrer (keys and ids stay out of other sites' logs), no caching, and a
  ``Server-Timing`` header with the time the app took.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from idempotask.cli._text import safe

__all__ = [
    "CSP",
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "AuthHook",
    "Guard",
    "Refused",
    "check_csrf",
    "csrf_token",
    "describe_auth",
    "user_of",
]

log = logging.getLogger("idempotask.web")

AuthHook = Callable[[Request], "str | Awaitable[str | None] | None"]

CSRF_COOKIE = "idempotask_csrf"
CSRF_FIELD = "csrf"
REALM = "idempotask dashboard"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class Refused(Exception):
    """A request the dashboard does not serve: ``status`` and a message for the person."""

    def __init__(self, status: int, message: str, *, challenge: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.challenge = challenge


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _loopback_name(host: str) -> bool:
    """Whether a ``Host`` header names this machine."""
    name = host.strip().lower()
    if name.startswith("["):  # [::1]:8765
        name = name[1:].partition("]")[0]
    elif ":" in name:
        name = name.rpartition(":")[0]
    name = name.removesuffix(".")
    return name == "localhost" or name.endswith(".localhost") or _loopback(name)


def _clean_user(name: str) -> str:
    """A user name fit for a letter's history: one line, no control characters, short."""
    text = " ".join(safe(name, lines=False).split())[:120]
    return text or "anonymous"


class Guard:
    """The ASGI middleware that authenticates each request, sets the CSRF cookie when
    the browser has none, and adds the security headers and ``Server-Timing``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        auth: AuthHook | None,
        token: str | None,
        secret: bytes,
    ) -> None:
        self.app = app
        self.auth = auth
        self.token = token
        self.secret = secret

    async def _user(self, request: Request) -> str:
        if self.auth is not None:
            try:
                answer = self.auth(request)
                if inspect.isawaitable(answer):
                    answer = await answer
            except PermissionError as exc:
                raise Refused(403, f"refused by the dashboard's auth hook: {exc}") from exc
            if not answer:
                raise Refused(403, "refused by the dashboard's auth hook")
            if not isinstance(answer, str):
                raise Refused(500, "the dashboard's auth hook must return a user name (str)")
            return _clean_user(answer)
        if self.token is not None:
            return self._token_user(request.headers.get("authorization", ""))
        client = request.client.host if request.client else None
        if not _loopback(client):
            raise Refused(
                403,
                "this dashboard has no authentication, so it only answers on the machine it "
                "runs on; start it with --token (or create_app(token=... / auth=...))",
            )
        host = request.headers.get("host")  # none: not a browser's request
        if host is not None and not _loopback_name(host):
            raise Refused(
                403,
                "this dashboard has no authentication, so it only answers to a URL naming "
                f"this machine (localhost, 127.0.0.1, [::1]), not {safe(host, lines=False)!r}: "
                "another site's name pointed here could let a web page use it; open it as "
                "http://localhost:PORT/, or start it with --token (or create_app(token=... / "
                "auth=...))",
            )
        return "local"

    def _token_user(self, header: str) -> str:
        scheme, _, value = header.partition(" ")
        expected = self.token or ""
        if scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), expected.encode()
        ):
            return "token"
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            name, sep, password = decoded.partition(":")
            if sep and hmac.compare_digest(password.encode(), expected.encode()):
                return _clean_user(name or "token")
        raise Refused(
            401,
            "sign in: any user name (it is recorded with your actions) and the dashboard's "
            "token as the password",
            challenge=True,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request = Request(scope)
        try:
            user = await self._user(request)
        except Refused as refused:
            await self._refuse(refused, scope, receive, send, started)
            return
        state = scope.setdefault("state", {})
        state["user"] = user
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if len(cookie) < 32:
            cookie = secrets.token_urlsafe(32)
            state["new_csrf_cookie"] = cookie
        state["csrf_cookie"] = cookie
        state["csrf"] = _sign(self.secret, cookie, user)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += self._headers(scope, started)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _headers(self, scope: Scope, started: float) -> list[tuple[bytes, bytes]]:
        headers = list(HEADERS)
        took = (time.perf_counter() - started) * 1000
        headers.append((b"server-timing", f"app;dur={took:.1f}".encode()))
        new_cookie = scope["state"].get("new_csrf_cookie")
        if new_cookie:
            path = scope.get("root_path") or "/"
            secure = "; Secure" if scope.get("scheme") == "https" else ""
            value = f"{CSRF_COOKIE}={new_cookie}; Path={path}; HttpOnly; SameSite=Strict{secure}"
            headers.append((b"set-cookie", value.encode()))
        return headers

    async def _refuse(
        self, refused: Refused, scope: Scope, receive: Receive, send: Send, started: float
    ) -> None:
        response: Response = PlainTextResponse(f"{refused}\n", status_code=refused.status)
        if refused.challenge:
            response.headers["www-authenticate"] = f'Basic realm="{REALM}", charset="UTF-8"'
        for name, value in HEADERS:
            response.headers[name.decode()] = value.decode()
        took = (time.perf_counter() - started) * 1000
        response.headers["server-timing"] = f"app;dur={took:.1f}"
        await response(scope, receive, send)


def _sign(secret: bytes, cookie: str, user: str) -> str:
    message = f"{cookie}\0{user}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def user_of(request: Request) -> str:
    """The authenticated user's name (``local`` without authentication)."""
    user: str = request.state.user
    return user


def csrf_token(request: Request) -> str:
    """The CSRF token forms of this page carry."""
    token: str = request.state.csrf
    return token


def check_csrf(request: Request, form: dict[str, list[str]]) -> None:
    """Refuse (403) a POST whose CSRF token is missing or wrong, or that the browser
    says comes from another site."""
    site = request.headers.get("sec-fetch-site", "")
    if site == "cross-site":
        raise Refused(403, "refused: a request from another site cannot act here")
    given = (form.get(CSRF_FIELD) or [""])[0]
    if getattr(request.state, "new_csrf_cookie", None) or not hmac.compare_digest(
        given.encode(), csrf_token(request).encode()
    ):
        raise Refused(
            403,
            "refused: the form's CSRF token is missing or does not match this browser's "
            "session; reload the page and try again",
        )


def describe_auth(auth: Any, token: str | None) -> str:
    """How this app authenticates, for the page's footer."""
    if auth is not None:
        return "signed in through the auth hook"
    if token is not None:
        return "signed in with the dashboard's token"
    return "no authentication: serving this machine only"

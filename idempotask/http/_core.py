"""The decision core of the HTTP layer: one flow, driven sync (WSGI, Django) and async
(ASGI, Django async) through :mod:`idempotask.flow`.

:meth:`Handler.flow` decides everything about one request -- is it covered, is its key
valid, has it been answered, is it running elsewhere, may its answer be kept -- and
yields the I/O it needs as :class:`~idempotask.flow.Op` objects: reading the body,
claiming the key, running the handler (with the claim's lease renewed by
:mod:`idempotask.lease`), storing or releasing, sleeping while it waits. The
middlewares only translate between their framework and an :class:`Exchange`, and send
the :data:`Answer`. The store protocol is the call protocol's: ``claim`` with a
caller-made token and the request's fingerprint, ``complete`` / ``delete`` by token.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from idempotask import config, events, lease
from idempotask._printable import printable
from idempotask.backends.base import Backend, Record, State
from idempotask.errors import (
    BackendError,
    ConfigurationError,
    CorruptRecordError,
    MissingTableError,
)
from idempotask.events import EventKind
from idempotask.flow import Flow, Op, release_op, store_op, unstoppable
from idempotask.http import _policy
from idempotask.http._policy import Policy, Request, RoutePolicies
from idempotask.http._problems import problem
from idempotask.http._stored import (
    Headers,
    Reply,
    StoredResponseError,
    decode,
    encode,
    kept_headers,
)
from idempotask.keys import KEY_VERSION, digest
from idempotask.keys import encode as key_material

__all__ = [
    "ASYNC_CATCH",
    "DROP",
    "PASS",
    "Answer",
    "Captured",
    "Exchange",
    "Handler",
    "Signal",
    "redact",
]

log = logging.getLogger("idempotask.http")

_POLL_FIRST, _POLL_MAX = 0.005, 0.25  # waiting on the first request: first and longest poll

# 4xx answers that say "try again" rather than "this request is wrong": never kept.
_RETRYABLE_4XX = frozenset({408, 425, 429})

# What the async driver throws back into the flow: store failures, and a cancellation,
# which the flow answers by settling its claim before it propagates.
ASYNC_CATCH: tuple[type[BaseException], ...] = (BackendError, asyncio.CancelledError)


class Signal:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


PASS = Signal("PASS")
"""Run the app as if the middleware were not there (the request is not covered)."""
DROP = Signal("DROP")
"""The client went away before its request was read: send nothing (WSGI and Django,
which must answer, send an empty ``400``)."""


class Captured:
    """What the handler answered, as an adapter captured it.

    ``complete`` is False when the response grew past ``max_response_bytes``: the
    adapter then sends it on as it comes (``body`` holds only what came before), and
    ``size`` counts every byte. ``error`` is the exception the handler raised, if any.
    Adapters subclass it to carry what they need to send the response.
    """

    status: int = 0
    reason: str = ""
    headers: Headers
    body: bytes = b""
    size: int = 0
    complete: bool = True
    error: BaseException | None = None

    def __init__(self) -> None:
        self.headers = []


Answer = Reply | Captured | Signal
"""What a middleware does with a request: send a :class:`Reply` (a replay or a
problem), send the handler's :class:`Captured` response, or :data:`PASS` / :data:`DROP`."""


class Exchange(Protocol):
    """One request, as a middleware presents it to the core."""

    method: str
    path: str
    query: str

    def headers(self) -> Headers:
        """The request's headers: lower-case names, Latin-1 values."""

    def native(self) -> Any:
        """The framework's request (what ``scope=`` callables get)."""

    def client(self) -> str:
        """The client the framework authenticated ("" when none): the default scope."""

    async def aclient(self) -> str:
        """:meth:`client` for async frameworks."""

    async def acall(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, a callable of the user's (``scope=``), from the async driver:
        where the framework runs sync code (Django's ORM refuses the event loop)."""

    def view(self) -> object | None:
        """The view the framework routes this request to, when it can tell."""

    def read_body(self, limit: int) -> bytes | Signal | None:
        """Read the whole body once: the bytes, None when over ``limit``, or
        :data:`DROP` when the client went away."""

    async def aread_body(self, limit: int) -> bytes | Signal | None:
        """:meth:`read_body` for async frameworks."""

    def run(self, limit: int) -> Captured:
        """Run the handler on the body read, capturing up to ``limit`` bytes."""

    async def arun(self, limit: int) -> Captured:
        """:meth:`run` for async frameworks."""


def redact(key: str) -> str:
    """What logs may show of an idempotency key: its start and its length."""
    return f"{key[:4]}...({len(key)} chars)" if len(key) > 8 else f"...({len(key)} chars)"


def _token() -> str:
    return os.urandom(12).hex()


def parse_key(values: list[str], limit: int) -> tuple[str, str]:
    """The key in the header ``values``, and "" -- or "" and why it is not valid.

    The draft makes the value a Structured Field string (``"8e03978e-..."``); clients
    that send it bare (Stripe's) are accepted too, without a comma (two headers joined
    by the server). Either way the key is 1 to ``limit`` printable ASCII characters.
    """
    if len(values) != 1:
        return "", "The request has more than one Idempotency-Key header"
    raw = values[0].strip(" \t")
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        key, escaped = [], False
        for char in raw[1:-1]:
            if escaped or char not in '\\"':
                key.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            else:
                return "", "The quoted Idempotency-Key has an unescaped quote"
        if escaped:
            return "", "The quoted Idempotency-Key ends with a backslash"
        text = "".join(key)
        allowed = range(0x20, 0x7F)
    elif "," in raw:
        # Servers that join repeated header lines with a comma (wsgiref, Django's ASGI
        # request) hand two keys over as one value: a bare key holds no comma.
        return "", "The request has more than one Idempotency-Key header"
    else:
        text = raw
        allowed = range(0x21, 0x7F)
    if not text:
        return "", "The Idempotency-Key is empty"
    if len(text) > limit:
        return "", f"The Idempotency-Key is longer than {limit} characters"
    if any(ord(c) not in allowed for c in text):
        return "", (
            "The Idempotency-Key may hold printable ASCII characters only (a UUID is a good key)"
        )
    return text, ""


class Handler:
    """The policies of one middleware and the flow that applies them to a request."""

    def __init__(self, policy: Policy, *, always_look_up_views: bool = False) -> None:
        self.policy = policy
        self.routes = RoutePolicies(policy)
        # Until a view is marked the lookup is skipped, unless the framework imports its
        # views lazily (Django's URLconf, on the first request): then marks may appear
        # only once the lookup has run.
        self.always_look_up_views = always_look_up_views
        self._backends: dict[int, Backend] = {}

    def policy_for(self, exchange: Exchange) -> Policy | None:
        """The policy covering ``exchange``, or None when it passes through."""
        if _policy.marked or self.always_look_up_views:
            view = exchange.view()
            if view is not None:
                marked = self.routes.for_view(view)
                if marked is not None:
                    return marked if exchange.method in marked.methods else None
        return self.policy if self.policy.covers(exchange.method, exchange.path) else None

    def backend(self, policy: Policy) -> Backend:
        chosen = policy.backend
        if chosen is None:
            return config.get_backend()
        if isinstance(chosen, str):
            made = self._backends.get(id(policy))
            if made is None:
                made = self._backends[id(policy)] = config.resolve_backend(chosen)
            return made
        return chosen

    def flow(self, exchange: Exchange) -> Flow[Answer]:
        """Everything about one request, from "is it covered" to the stored answer."""
        policy = self.policy_for(exchange)
        if policy is None:
            return PASS
        header = policy.header.lower()
        values = [v for n, v in exchange.headers() if n == header]
        if not values:
            if not policy.required:
                return PASS
            return problem(
                policy,
                400,
                "idempotency-key-missing",
                f"This operation is idempotent and it requires correct usage of "
                f"Idempotency Key: send a unique {policy.header} header with the request "
                "(a UUID), and the same one when you retry it.",
            )
        key, invalid = parse_key(values, policy.max_key_length)
        if invalid:
            return problem(policy, 400, "idempotency-key-invalid", invalid + ".")
        body: bytes | Signal | None = yield Op(
            exchange.read_body, exchange.aread_body, policy.max_request_bytes
        )
        if body is DROP:
            return DROP
        if not isinstance(body, bytes):
            return problem(
                policy,
                413,
                "request-too-large",
                f"The request body is over {policy.max_request_bytes} bytes, the most an "
                "idempotent request of this operation may carry.",
            )
        request = Request(
            exchange.method, exchange.path, exchange.query, tuple(exchange.headers()), body
        )
        if policy.scope is None:
            client = yield Op(exchange.client, exchange.aclient)
        else:
            client = yield Op(
                policy.scope, functools.partial(exchange.acall, policy.scope), exchange.native()
            )
        store_key = self.store_key(policy, exchange, key, client)
        fingerprint = self.fingerprint(policy, request)
        return (yield from self._claim_and_run(policy, exchange, key, store_key, fingerprint))

    def store_key(self, policy: Policy, exchange: Exchange, key: str, client: object) -> str:
        """The store key of ``key`` for this client, method and path (hashed: the key
        may be a secret and the client an account)."""
        if client is not None and not isinstance(client, str):
            raise ConfigurationError(
                f"scope: the callable must return a str or None, got {type(client).__name__}"
            )
        namespace = policy.namespace or config.settings().namespace
        material = key_material(("http", client or "", exchange.method, exchange.path, key))
        return f"{namespace}:{policy.name}:{KEY_VERSION}:{digest(material)}"

    def fingerprint(self, policy: Policy, request: Request) -> str:
        """The digest standing for "the same request" under this policy."""
        if policy.fingerprint is None:
            parts: object = (request.method, request.path, request.query, digest(request.body))
        else:
            parts = policy.fingerprint(request)
            if not isinstance(parts, (bytes, str)):
                raise ConfigurationError(
                    "fingerprint: the callable must return bytes or str, got "
                    f"{type(parts).__name__}"
                )
        return digest(key_material(parts))

    # ------------------------------------------------------------------------------------
    # Claim, run, keep. Every store operation and the handler are yielded to the driver.
    # ------------------------------------------------------------------------------------
    def _claim_and_run(
        self, policy: Policy, exchange: Exchange, key: str, store_key: str, fingerprint: str
    ) -> Flow[Answer]:
        backend = self.backend(policy)
        token = _token()
        deadline = -1.0
        poll = _POLL_FIRST
        while True:
            try:
                record: Record = yield store_op(
                    backend, "claim", store_key, token, lease=policy.lease, fingerprint=fingerprint
                )
            except BackendError as exc:
                return (yield from self._store_down(policy, exchange, store_key, exc))
            except asyncio.CancelledError as exc:
                # The claim may have been taken before the cancellation came: give it back.
                with contextlib.suppress(BackendError):
                    yield release_op(backend, store_key, token)
                raise exc
            if record.held_by(token):
                break
            if record.fingerprint and record.fingerprint != fingerprint:
                log.info(
                    "idempotask.http: %s %s: Idempotency-Key %s reused for another request (422)",
                    exchange.method,
                    printable(exchange.path),
                    redact(key),
                )
                return problem(
                    policy,
                    422,
                    "idempotency-key-reused",
                    "This operation is idempotent and it requires correct usage of Idempotency "
                    "Key. Idempotency Key MUST not be reused across different payloads of this "
                    "operation.",
                )
            if record.state is State.COMPLETED:
                events.emit(EventKind.DUPLICATE, policy.name, store_key)
                return self._replay(policy, store_key, record.payload)
            if record.state is State.FAILED:  # never written by this layer
                return self._unreadable(policy, store_key, "a failure record")
            now = time.monotonic()
            if deadline < 0:
                events.emit(EventKind.CONFLICT, policy.name, store_key)
                deadline = now + policy.wait
            if now >= deadline:
                return problem(
                    policy,
                    409,
                    "idempotency-key-in-use",
                    "A request with the same Idempotency-Key for the same operation is being "
                    "processed or is outstanding. Retry it later with the same key.",
                    retry_after=policy.retry_after,
                )
            # Poll by claiming again: the answer once the first request is done, or the
            # key itself if that request failed or its worker died.
            yield Op(time.sleep, asyncio.sleep, min(poll, deadline - now))
            poll = min(poll * 2, _POLL_MAX)

        events.emit(EventKind.CLAIMED, policy.name, store_key)
        held = lease.Lease(backend, store_key, token, policy.lease, policy.name)
        captured: Captured = yield Op(_run, _arun, exchange, held, policy.max_response_bytes)
        if captured.error is not None:
            events.emit(
                EventKind.FAILED, policy.name, store_key, error=type(captured.error).__name__
            )
            yield from _release(backend, store_key, token, policy.name)
            raise captured.error
        status = captured.status
        if (
            status >= 500
            or status in _RETRYABLE_4XX
            or (status >= 400 and not policy.store_client_errors)
        ):
            # Not an answer to keep: the next request with this key runs the handler.
            yield from _release(backend, store_key, token, policy.name)
            return captured
        if captured.complete:
            headers = kept_headers(captured.headers, cookies=policy.store_cookies)
            payload = encode(Reply(status, headers, captured.body, captured.reason))
        else:
            log.warning(
                "idempotask.http: %s %s answered %d with a response over "
                "max_response_bytes=%d: sent, but not kept; retries with its key get 422 "
                "and do not run it again",
                exchange.method,
                printable(exchange.path),
                status,
                policy.max_response_bytes,
            )
            payload = encode(Reply(status, reason=captured.reason, unkept=captured.size))
        return (yield from self._keep(policy, backend, store_key, token, payload, captured))

    def _keep(
        self,
        policy: Policy,
        backend: Backend,
        store_key: str,
        token: str,
        payload: bytes,
        captured: Captured,
    ) -> Flow[Answer]:
        op = store_op(backend, "complete", store_key, token, payload, ttl=policy.ttl)
        try:
            stored = yield op
        except asyncio.CancelledError as exc:
            # The handler ran: its answer is written to the end before the cancellation
            # goes on, or its key would stay blocked for a lease and then run again.
            with contextlib.suppress(BackendError):
                yield Op(op.fn, unstoppable(backend.acomplete), *op.args, **op.kwargs)
            raise exc
        except BackendError as exc:
            # The handler ran; its client gets its answer. The claim runs out with its
            # lease, after which a retry would run the handler again: say so loudly.
            log.error(
                "idempotask.http: could not keep the response under %s; a retry after the "
                "lease (%gs) runs the handler again: %s",
                store_key,
                policy.lease,
                exc,
            )
            events.emit(EventKind.BACKEND_ERROR, policy.name, store_key, error=type(exc).__name__)
            return captured
        if stored:
            events.emit(EventKind.COMPLETED, policy.name, store_key)
        else:
            lease.report_lost(
                policy.name,
                store_key,
                "the key was taken over while the handler ran; the other request's response "
                "is kept and this one is only sent to its client",
            )
        return captured

    def _store_down(
        self, policy: Policy, exchange: Exchange, store_key: str, exc: BackendError
    ) -> Flow[Answer]:
        events.emit(
            EventKind.BACKEND_ERROR,
            policy.name,
            store_key,
            error=type(exc.__cause__ or exc).__name__,
        )
        mode = policy.on_backend_error or config.settings().on_backend_error
        if mode == "open" and not isinstance(exc, (CorruptRecordError, MissingTableError)):
            log.error(
                "idempotask.http: store unavailable; on_backend_error='open', so %s %s runs "
                "UNPROTECTED and may run twice: %s",
                exchange.method,
                printable(exchange.path),
                exc,
            )
            events.emit(EventKind.FAIL_OPEN, policy.name, store_key)
            captured: Captured = yield Op(exchange.run, exchange.arun, policy.max_response_bytes)
            if captured.error is not None:
                raise captured.error
            return captured
        log.error(
            "idempotask.http: store unavailable for %s %s (%s), answering 503: %s",
            exchange.method,
            printable(exchange.path),
            store_key,
            exc,
        )
        return problem(
            policy,
            503,
            "store-unavailable",
            "The service cannot check this request's Idempotency-Key right now, so it did "
            "not run it. Retry it later with the same key.",
            retry_after=policy.retry_after,
        )

    def _replay(self, policy: Policy, store_key: str, payload: bytes) -> Answer:
        if len(payload) > policy.max_response_bytes + (256 * 1024 + 64):
            return self._unreadable(policy, store_key, "a response over max_response_bytes")
        try:
            reply = decode(payload)
        except StoredResponseError as exc:
            return self._unreadable(policy, store_key, str(exc))
        if reply.unkept:
            return problem(
                policy,
                422,
                "response-not-kept",
                f"A request with this Idempotency-Key was already processed (status "
                f"{reply.status}); its response was larger than the "
                f"{policy.max_response_bytes} bytes kept for a replay, so it cannot be "
                "replayed, and the request is not run again. Fetch the resource it "
                "created, or use a new key for a new request.",
            )
        reply.headers.append((policy.replay_header, "true"))
        return reply

    def _unreadable(self, policy: Policy, store_key: str, why: str) -> Reply:
        log.error(
            "idempotask.http: the record under %s is not a response this layer kept (%s); "
            "answering 500 without running the request. Drop it with "
            "`idempotask keys forget` if it is stale.",
            store_key,
            why,
        )
        return problem(
            policy,
            500,
            "stored-response-unreadable",
            "A request with this Idempotency-Key was processed, but its stored response "
            "cannot be read; the request is not run again.",
        )


def _run(exchange: Exchange, held: lease.Lease, limit: int) -> Captured:
    stop = lease.hold(held)
    try:
        return exchange.run(limit)
    finally:
        stop()


async def _arun(exchange: Exchange, held: lease.Lease, limit: int) -> Captured:
    stop = lease.ahold(held)
    try:
        return await exchange.arun(limit)
    finally:
        stop()


def _release(backend: Backend, store_key: str, token: str, name: str) -> Flow[None]:
    try:
        yield release_op(backend, store_key, token)
    except BackendError as exc:
        log.error(
            "idempotask.http: could not release %s; it stays claimed until its lease runs out: %s",
            store_key,
            exc,
        )
        return
    events.emit(EventKind.RELEASED, name, store_key)

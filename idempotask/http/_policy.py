"""What the HTTP layer protects and how: the :class:`Policy`, routes and the decorator.

A :class:`Policy` holds every option of the ``Idempotency-Key`` middlewares, validated
when it is made (the error names the option). Which requests it covers:

- a view marked with :func:`idempotent_route` (Django, Starlette/FastAPI, Flask): its
  POST, PUT, PATCH and DELETE requests (or the ``methods=`` it gives);
- else, when ``routes=`` is given, a request matching one of them
  (``"POST /orders"``, ``"/orders/{id}/refund"``, ``"DELETE /files/{path:path}"``);
- else (global mode) every request whose method is in ``methods`` (POST and PATCH).

Everything else passes through untouched: its body is not even read.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from idempotask.backends.base import Backend
from idempotask.config import (
    Seconds,
    check_backend,
    check_choice,
    check_namespace,
    check_seconds,
    check_size,
)
from idempotask.errors import ConfigurationError
from idempotask.keys import check_name

__all__ = ["WRITE_METHODS", "Policy", "Request", "Route", "idempotent_route", "route_options"]

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
"""What a marked view or a route without a method covers: GET, HEAD, OPTIONS and TRACE
change nothing, so their retries need no key."""

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP method or header name
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")


@dataclass(frozen=True)
class Request:
    """What a ``fingerprint=`` callable sees of a request: the same for every framework.

    ``headers`` are ``(name, value)`` pairs, names in lower case, values decoded as
    Latin-1 (byte for byte, as HTTP carries them); ``query`` is the raw query string.
    """

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        lowered = name.lower()
        return next((v for n, v in self.headers if n == lowered), None)


def _check_methods(option: str, value: Any) -> frozenset[str]:
    if isinstance(value, str):
        value = (value,)
    try:
        methods = frozenset(str(m).upper() for m in value)
    except TypeError:
        raise ConfigurationError(
            f"{option}: expected HTTP methods such as ('POST', 'PATCH'), got {value!r}"
        ) from None
    bad = sorted(m for m in methods if not _TOKEN.match(m))
    if bad or not methods:
        raise ConfigurationError(
            f"{option}: expected HTTP methods such as ('POST', 'PATCH'), got {value!r}"
        )
    return methods


def _check_header(option: str, value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise ConfigurationError(f"{option}: expected an HTTP header name, got {value!r}")
    return value


def _check_callable(option: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise ConfigurationError(f"{option}: expected a callable or None, got {value!r}")
    return value


@dataclass(frozen=True)
class Route:
    """One entry of ``routes=``: an optional method and a path pattern.

    ``{name}`` matches one path segment, ``{name:path}`` the rest of the path (slashes
    included); everything else matches itself. A route without a method covers POST,
    PUT, PATCH and DELETE; ``"PUT|PATCH /x"`` names several.
    """

    methods: frozenset[str] | None
    pattern: str
    regex: re.Pattern[str] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> Route:
        """``"POST /orders/{id}"`` or ``"/orders/{id}"`` as a :class:`Route`."""
        if not isinstance(text, str):
            raise ConfigurationError(
                f"routes: expected strings such as 'POST /orders/{{id}}', got {text!r}"
            )
        method, _, pattern = text.strip().rpartition(" ")
        if not pattern.startswith("/"):
            raise ConfigurationError(
                f"routes: {text!r} is not '[METHOD] /path', such as 'POST /orders/{{id}}'"
            )
        methods = _check_methods("routes", method.split("|")) if method else None
        parts, end = [], 0
        for match in _PARAM.finditer(pattern):
            parts.append(re.escape(pattern[end : match.start()]))
            parts.append(".+" if match.group(2) else "[^/]+")
            end = match.end()
        parts.append(re.escape(pattern[end:]))
        return cls(methods, pattern, re.compile("".join(parts)))

    def covers(self, method: str, path: str) -> bool:
        """Whether a request with ``method`` to ``path`` is on this route."""
        if method not in (WRITE_METHODS if self.methods is None else self.methods):
            return False
        return self.regex.fullmatch(path) is not None


P = TypeVar("P", bound=Callable[..., Any])

_MARK = "__idempotask_http__"

marked = 0
"""How many views :func:`idempotent_route` marked: while none is, the middlewares skip
looking the view up (a route match per request for nothing)."""

# The options a route may set for itself (the others belong to the whole middleware).
ROUTE_OPTIONS = frozenset(
    {
        "methods",
        "required",
        "ttl",
        "lease",
        "wait",
        "retry_after",
        "scope",
        "fingerprint",
        "max_request_bytes",
        "max_response_bytes",
        "store_client_errors",
        "store_cookies",
    }
)


def idempotent_route(**options: Any) -> Callable[[P], P]:
    """Mark a view as protected by ``Idempotency-Key``, with its own options.

    ::

        @app.post("/orders")
        @idempotent_route(required=True, ttl=24 * 3600)
        async def create_order(order: Order) -> dict: ...

    The middleware finds the view through the framework's own routing: Django's
    ``resolve()``, a Starlette/FastAPI app's ``routes``, a Flask app's ``url_map``. It
    covers the view's POST, PUT, PATCH and DELETE requests unless ``methods=`` says. Any
    :class:`Policy` option a route may have can be given (``methods``, ``required``,
    ``ttl``, ``lease``, ``wait``, ``retry_after``, ``scope``, ``fingerprint``,
    ``max_request_bytes``, ``max_response_bytes``, ``store_client_errors``,
    ``store_cookies``); the rest come from the middleware. The view is returned
    unchanged, with the options as an attribute.
    """
    unknown = sorted(set(options) - ROUTE_OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"idempotent_route: unknown option(s) {', '.join(unknown)}; a route may set "
            f"{', '.join(sorted(ROUTE_OPTIONS))}"
        )
    # Validated now, so a typo fails at import rather than at the first request.
    Policy(**options)
    frozen = dict(options)

    def mark(view: P) -> P:
        global marked
        try:
            setattr(view, _MARK, frozen)
        except (AttributeError, TypeError):
            raise ConfigurationError(
                f"idempotent_route: cannot mark {view!r} (it takes no attributes); "
                "list its path in routes= instead"
            ) from None
        marked += 1
        return view

    return mark


def route_options(view: object) -> Mapping[str, Any] | None:
    """The options :func:`idempotent_route` gave ``view``, or None when it is unmarked.

    Class-based views are looked up on the view function and on its ``view_class``
    (Django's ``as_view()``) or ``cls`` attribute.
    """
    for candidate in (view, getattr(view, "view_class", None), getattr(view, "cls", None)):
        found = getattr(candidate, _MARK, None) if candidate is not None else None
        if isinstance(found, dict):
            return found
    return None


@dataclass(frozen=True)
class Policy:
    """The options of the ``Idempotency-Key`` middlewares.

    Which requests: ``routes`` (patterns, see :class:`Route`), else every request whose
    method is in ``methods``; views marked with :func:`idempotent_route` always.

    - ``required``: a covered request without the header gets ``400`` (else it passes
      through unprotected, as the draft allows).
    - ``ttl``: seconds a response is kept (24 h); ``lease``: seconds a claim survives
      without renewal (renewed while the handler runs, so only a dead worker's claim
      runs out); ``wait``: seconds a request waits for the first one with its key to
      finish before it gets ``409`` (0: at once), ``retry_after``: the ``Retry-After``
      of that ``409``.
    - ``scope(request)``: the client a key belongs to, given the framework's request
      (an ASGI scope, a WSGI environ, a Django ``HttpRequest``); by default the
      authenticated user the framework knows (Starlette's ``scope["user"]``, WSGI's
      ``REMOTE_USER``, Django's ``request.user``), else every client shares one key
      space. Keys are also scoped by method and path.
    - ``fingerprint(request)``: bytes or str standing for "the same request", given a
      :class:`Request`; by default method, path, query and a digest of the body. The
      same key with another fingerprint gets ``422``.
    - ``max_request_bytes``: a covered request's body is read (once) up to this size,
      else ``413``; ``max_response_bytes``: the largest response kept (see the README:
      a larger one is sent, its key kept without a replayable response).
    - ``store_client_errors``: keep 4xx responses (default; 408, 425 and 429 never are);
      5xx responses and exceptions always release the key.
    - ``store_cookies``: keep ``Set-Cookie`` headers in stored responses (off: a replay
      would hand one client's session cookie to whoever holds the key).
    - ``header``, ``replay_header``: the request header carrying the key and the
      response header marking a replay (``Idempotent-Replayed: true``);
      ``max_key_length``: longer keys get ``400``.
    - ``docs_url``: where your API documents its idempotency; problem responses link to
      it (``type`` and a ``Link: rel="describedby"`` header).
    - ``backend``, ``namespace``, ``name``: the store (default: the configured one), the
      first part of keys (default: the configured namespace) and the second (``http``).
    - ``on_backend_error``: ``"raise"`` answers ``503`` while the store is down,
      ``"open"`` runs the handler unprotected (logged); default: the configured one.
    """

    routes: tuple[Route, ...] | None = None
    methods: frozenset[str] = frozenset({"POST", "PATCH"})
    required: bool = False
    ttl: float = 24 * 3600.0
    lease: float = 60.0
    wait: float = 0.0
    retry_after: int = 1
    scope: Callable[[Any], str | None] | None = None
    fingerprint: Callable[[Request], bytes | str] | None = None
    max_key_length: int = 255
    max_request_bytes: int = 1024 * 1024
    max_response_bytes: int = 1024 * 1024
    store_client_errors: bool = True
    store_cookies: bool = False
    header: str = "Idempotency-Key"
    replay_header: str = "Idempotent-Replayed"
    docs_url: str | None = None
    backend: Backend | str | None = None
    namespace: str | None = None
    name: str = "http"
    on_backend_error: Literal["raise", "open"] | None = None

    def __init__(
        self,
        *,
        routes: Iterable[str | Route] | None = None,
        methods: Collection[str] = ("POST", "PATCH"),
        required: bool = False,
        ttl: Seconds = 24 * 3600.0,
        lease: Seconds = 60.0,
        wait: Seconds = 0.0,
        retry_after: int = 1,
        scope: Callable[[Any], str | None] | None = None,
        fingerprint: Callable[[Request], bytes | str] | None = None,
        max_key_length: int = 255,
        max_request_bytes: int = 1024 * 1024,
        max_response_bytes: int = 1024 * 1024,
        store_client_errors: bool = True,
        store_cookies: bool = False,
        header: str = "Idempotency-Key",
        replay_header: str = "Idempotent-Replayed",
        docs_url: str | None = None,
        backend: Backend | str | None = None,
        namespace: str | None = None,
        name: str = "http",
        on_backend_error: Literal["raise", "open"] | None = None,
    ) -> None:
        if isinstance(routes, str):
            routes = (routes,)
        checked = {
            "routes": None
            if routes is None
            else tuple(r if isinstance(r, Route) else Route.parse(r) for r in routes),
            "methods": _check_methods("methods", methods),
            "required": _check_bool("required", required),
            "ttl": check_seconds("ttl", ttl),
            "lease": check_seconds("lease", lease),
            "wait": check_seconds("wait", wait, allow_zero=True),
            "retry_after": _check_int("retry_after", retry_after, low=0),
            "scope": _check_callable("scope", scope),
            "fingerprint": _check_callable("fingerprint", fingerprint),
            "max_key_length": _check_int("max_key_length", max_key_length, low=1),
            "max_request_bytes": check_size("max_request_bytes", max_request_bytes),
            "max_response_bytes": check_size("max_response_bytes", max_response_bytes),
            "store_client_errors": _check_bool("store_client_errors", store_client_errors),
            "store_cookies": _check_bool("store_cookies", store_cookies),
            "header": _check_header("header", header),
            "replay_header": _check_header("replay_header", replay_header),
            "docs_url": _check_docs(docs_url),
            "backend": check_backend(backend),
            "namespace": None if namespace is None else check_namespace(namespace),
            "name": check_name(name),
            "on_backend_error": None
            if on_backend_error is None
            else check_choice("on_backend_error", on_backend_error, ("raise", "open")),
        }
        for option, value in checked.items():
            object.__setattr__(self, option, value)

    def replace(self, **changes: Any) -> Policy:
        """A copy with ``changes`` applied (validated like the constructor's options)."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Policy(**{**current, **changes})

    def covers(self, method: str, path: str) -> bool:
        """Whether a request not on a marked view is covered (routes, else methods)."""
        if self.routes is not None:
            return any(route.covers(method, path) for route in self.routes)
        return method in self.methods


def _check_bool(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{option}: expected True or False, got {value!r}")
    return value


def _check_int(option: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{option}: expected an integer >= {low}, got {value!r}")
    return value


def _check_docs(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.match(r"^https?://\S+$", value) or '"' in value:
        raise ConfigurationError(
            f"docs_url: expected an http(s) URL of your idempotency documentation, got {value!r}"
        )
    return value


class RoutePolicies:
    """The policy of each marked view: its options over the middleware's, made once."""

    def __init__(self, base: Policy) -> None:
        self.base = base
        self._made: dict[int, tuple[object, Policy]] = {}

    def for_view(self, view: object) -> Policy | None:
        """The policy for requests to ``view``, or None when it is not marked."""
        options = route_options(view)
        if options is None:
            return None
        made = self._made.get(id(options))
        if made is not None and made[0] is options:
            return made[1]
        changes = {"methods": WRITE_METHODS, **options}
        policy = self.base.replace(routes=None, **changes)
        self._made[id(options)] = (options, policy)
        return policy

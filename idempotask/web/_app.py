"""The application: :func:`create_app`, the pieces every page shares (layout context,
notices, errors, read-only and CSRF checks) and the overview pages.

The letters, keys and breakers pages are in modules of their own; each handler is an
``async def`` that reads through the stores' async calls (``aquery``, ``aget``...) and
renders a template of ``templates/``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from idempotask.backends.base import Backend, BreakerStore, DeadLetterStore, Status
from idempotask.deadletter import AmbiguousLetterId, DeadLetterNotFound, DeadLetterQueue
from idempotask.errors import (
    AlreadyInProgress,
    BackendError,
    ConfigurationError,
    CorruptRecordError,
)
from idempotask.web._charts import KIND_ORDER, bar_chart
from idempotask.web._forms import KINDS, STATUSES, FormError, parse_body
from idempotask.web._overview import OverviewCache, Snapshot, compute
from idempotask.web._render import HERE, environment
from idempotask.web._security import (
    CSRF_FIELD,
    AuthHook,
    Guard,
    Refused,
    check_csrf,
    csrf_token,
    describe_auth,
    user_of,
)
from idempotask.web._stores import Stores

__all__ = ["Dashboard", "create_app", "letter_path"]

log = logging.getLogger("idempotask.web")

# What a finished action says on the page it leads to: fixed texts, only the count
# comes from the query string (a crafted link cannot put words on the page).
NOTICES = {
    "retried": "{n} made due now: the next `idempotask dlq process` run replays {them}.",
    "resolved": "{n} resolved; {their} history records it with your name.",
    "abandoned": "{n} abandoned; {their} history records it with your name.",
    "purged": "{n} deleted.",
    "forgot": "Key forgotten: the next call with these arguments runs again.",
    "closed": "Breaker closed: calls run again.",
    "opened": "Breaker opened: calls fail fast until it half-opens.",
}


class Dashboard:
    """What the pages share: the stores, the options, the templates and the overview."""

    def __init__(
        self,
        stores: Stores,
        *,
        read_only: bool,
        show_arguments: bool,
        refresh: float,
        title: str,
        auth_note: str,
    ) -> None:
        self.stores = stores
        self.read_only = read_only
        self.show_arguments = show_arguments
        self.refresh = refresh
        self.title = title
        self.auth_note = auth_note
        self.env = environment()
        self.overview = OverviewCache(self._snapshot, refresh=refresh)

    def _snapshot(self) -> Snapshot:
        stores = self.stores
        return compute(
            stores.queue.store,
            stores.breakers,
            stores.health,
            stores.spool_path,
            now=time.time(),
            scrub=stores.scrub,
        )

    # -- rendering ---------------------------------------------------------------------------

    def render(
        self, request: Request, template: str, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        """A page of ``template`` with the layout's context."""

        def href(name: str, **params: Any) -> str:
            return (
                letter_path(request, params["id"])
                if name == "letter"
                else str(request.url_for(name, **params).path)
            )

        page = self.env.get_template(template).render(
            request=request,
            href=href,
            title=self.title,
            user=user_of(request),
            csrf=csrf_token(request),
            csrf_field=CSRF_FIELD,
            read_only=self.read_only,
            namespace=self.stores.namespace,
            store=self.stores.describe(),
            auth_note=self.auth_note,
            refresh=self.refresh,
            notice=notice(request.query_params),
            now=time.time(),
            statuses=STATUSES,
            kinds=KINDS,
            **context,
        )
        return HTMLResponse(page, status_code=status_code)

    def actor(self, request: Request) -> str:
        """Who acts, for a letter's history: ``web:<user>``."""
        return f"web:{user_of(request)}"

    async def form(self, request: Request) -> dict[str, list[str]]:
        """The posted form, after the read-only and CSRF checks (refused with 403)."""
        if self.read_only:
            raise Refused(403, "this dashboard is read-only: it changes nothing")
        form = parse_body(await request.body())
        check_csrf(request, form)
        return form


def dashboard(request: Request) -> Dashboard:
    """The dashboard serving ``request``."""
    found: Dashboard = request.app.state.dashboard
    return found


def notice(params: Mapping[str, str]) -> str:
    """The notice of a finished action named in the query string, or ``""``."""
    text = NOTICES.get(params.get("done", ""))
    if text is None:
        return ""
    try:
        n = max(int(params.get("n", "1")), 0)
    except ValueError:
        n = 1
    letters = f"{n:,} letter{'s' if n != 1 else ''}"
    one = n == 1
    return text.format(n=letters, them="it" if one else "them", their="its" if one else "their")


def letter_path(request: Request, id: str) -> str:
    """The path of a letter's page; its id quoted (a letter written into the store by
    hand may hold ``/`` or ``?``)."""
    return str(request.url_for("letter", id=quote(id, safe="")).path)


def redirect(path: str, **params: str | int) -> RedirectResponse:
    """See Other, to ``path`` with ``params`` added to its query string."""
    extra = urlencode({k: str(v) for k, v in params.items()})
    joiner = "&" if "?" in path else "?"
    return RedirectResponse(f"{path}{joiner}{extra}" if extra else path, status_code=303)


# -- the overview -------------------------------------------------------------------------------


def overview_context(snapshot: Snapshot | None) -> dict[str, Any]:
    """What ``_live.html`` shows: the snapshot, its charts and its tables."""
    if snapshot is None:
        return {"snapshot": None}
    hourly = bar_chart(
        [
            (_clock(b.start), f"{_clock(b.start)}-{_clock(b.end)} UTC", b.by_kind)
            for b in snapshot.hourly
        ],
        caption="letters by the hour of their last failure, past 24 hours (UTC)",
        label_every=3,
    )
    daily = bar_chart(
        [(_weekday(b.start), _weekday(b.start), b.by_kind) for b in snapshot.daily],
        caption="letters by the day of their last failure, past 7 days (UTC)",
        width=360,
    )
    kinds = [k for k in KIND_ORDER if k in snapshot.by_kind or k in KINDS]
    kinds += sorted(k for k in snapshot.by_kind if k not in kinds)
    top = snapshot.functions[:10]
    retries = snapshot.retries_failed + snapshot.retries_succeeded
    share = snapshot.retries_succeeded / retries if retries else 0.0
    return {
        "snapshot": snapshot,
        "hourly": hourly,
        "daily": daily,
        "matrix_kinds": kinds,
        "top": top,
        "retry_share": round(share * 100, 1),
        "open_statuses": (Status.PENDING.value, Status.RETRYING.value),
        "last_24h": sum(b.total for b in snapshot.hourly),
    }


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M", time.gmtime(epoch))


def _weekday(epoch: float) -> str:
    return time.strftime("%a %d", time.gmtime(epoch))


async def overview(request: Request) -> Response:
    """The overview: counts, charts, breakers, spool and store health, refreshing itself."""
    dash = dashboard(request)
    snapshot = dash.overview.get()
    return dash.render(request, "overview.html", active="overview", **overview_context(snapshot))


async def live(request: Request) -> Response:
    """The overview's live part alone, for the page's polling."""
    dash = dashboard(request)
    snapshot = dash.overview.get()
    return dash.render(request, "_live.html", **overview_context(snapshot))


# -- errors -------------------------------------------------------------------------------------


def _error_page(request: Request, status: int, message: str, **extra: Any) -> Response:
    dash = dashboard(request)
    return dash.render(
        request, "error.html", status_code=status, status=status, message=message, **extra
    )


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return _error_page(request, exc.status, str(exc))


async def _bad_form(request: Request, exc: Exception) -> Response:
    return _error_page(request, 400, str(exc))


async def _conflict(request: Request, exc: Exception) -> Response:
    # A letter a processor is replaying right now: refused, to be tried again later.
    return _error_page(request, 409, str(exc))


async def _not_found(request: Request, exc: Exception) -> Response:
    candidates = exc.candidates if isinstance(exc, AmbiguousLetterId) else ()
    return _error_page(request, 404, str(exc), candidates=candidates)


async def _store_error(request: Request, exc: Exception) -> Response:
    dash = dashboard(request)
    if isinstance(exc, CorruptRecordError):
        message = f"the store holds data idempotask did not write: {exc}"
    else:
        message = f"cannot reach the store: {exc}"
    return _error_page(request, 503, dash.stores.scrub(message))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error_page(request, exc.status_code, str(exc.detail))


# -- the factory --------------------------------------------------------------------------------


def create_app(
    *,
    backend: Backend | str | None = None,
    dead_letter_store: DeadLetterStore | str | None = None,
    namespace: str | None = None,
    queue: DeadLetterQueue | None = None,
    breaker_store: BreakerStore | None = None,
    auth: AuthHook | None = None,
    token: str | None = None,
    read_only: bool = False,
    show_arguments: bool = True,
    secret: bytes | str | None = None,
    refresh: float = 5.0,
    title: str = "idempotask",
) -> Starlette:
    """See :func:`idempotask.web.create_app`."""
    from idempotask.web import _keys, _letters

    if auth is not None and token is not None:
        raise ConfigurationError("create_app: give auth= or token=, not both")
    if auth is not None and not callable(auth):
        raise ConfigurationError(f"create_app: auth= must be callable, got {auth!r}")
    if token is not None and (not isinstance(token, str) or len(token) < 12):
        raise ConfigurationError("create_app: token= must be a string of at least 12 characters")
    refresh = config_seconds(refresh)
    if secret is None:
        # Per process: a deployment of several worker processes passes one secret= to all.
        key = secrets.token_bytes(32)
    else:
        key = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(key) < 16:
            raise ConfigurationError("create_app: secret= must be at least 16 bytes")
    stores = Stores.build(backend, dead_letter_store, breaker_store, namespace, queue)
    routes = [
        Route("/", overview, name="overview"),
        Route("/live", live, name="live"),
        *_letters.ROUTES,
        *_keys.ROUTES,
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            Refused: _refused,
            FormError: _bad_form,
            DeadLetterNotFound: _not_found,
            AmbiguousLetterId: _not_found,
            AlreadyInProgress: _conflict,
            BackendError: _store_error,
            ConfigurationError: _bad_form,
            HTTPException: _http_error,
        },
    )
    app.state.dashboard = Dashboard(
        stores,
        read_only=bool(read_only),
        show_arguments=bool(show_arguments),
        refresh=refresh,
        title=title,
        auth_note=describe_auth(auth, token),
    )
    app.add_middleware(Guard, auth=auth, token=token, secret=key)
    return app


def config_seconds(value: Any) -> float:
    """``refresh=``: seconds, at least 0.2."""
    from idempotask.config import check_seconds

    seconds = check_seconds("refresh", value)
    if seconds < 0.2:
        raise ConfigurationError(f"refresh: at least 0.2 seconds, got {value!r}")
    return seconds

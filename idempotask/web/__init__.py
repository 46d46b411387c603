"""A web dashboard for dead letters, idempotency keys and circuit breakers.

``pip install 'idempotask[web]'``, then either the command::

    idempotask web --url redis://localhost:6379/0      # http://127.0.0.1:8765/

or the app, mounted in your own ASGI application under any path::

    from starlette.applications import Starlette
    from starlette.routing import Mount
    from idempotask.web import create_app

    app = Starlette(routes=[Mount("/ops/idempotask", create_app(auth=my_sso_user))])

(FastAPI: ``app.mount("/ops/idempotask", create_app(...))``; Django's ASGI handler:
route the prefix to it.) For a WSGI application (Flask, Django under gunicorn's sync
workers), :func:`create_wsgi_app` gives the same app through the ``a2wsgi`` adapter.

Pages are rendered on the server (Starlette, Jinja2), with one small script of our own
for the overview's live refresh and charts drawn as inline SVG; nothing is loaded from
another site. Each action is a POST with a CSRF token, asks for confirmation with the
count of letters it touches, and is recorded in every letter's history with the user's
name (``web:<user>``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request

    from idempotask.backends.base import Backend, BreakerStore, DeadLetterStore
    from idempotask.deadletter import DeadLetterQueue

__all__ = ["create_app", "create_wsgi_app"]

_INSTALL = "the dashboard needs its extra: pip install 'idempotask[web]'"


def create_app(
    *,
    backend: Backend | str | None = None,
    dead_letter_store: DeadLetterStore | str | None = None,
    namespace: str | None = None,
    queue: DeadLetterQueue | None = None,
    breaker_store: BreakerStore | None = None,
    auth: Callable[[Request], str | Awaitable[str | None] | None] | None = None,
    token: str | None = None,
    read_only: bool = False,
    show_arguments: bool = True,
    secret: bytes | str | None = None,
    refresh: float = 5.0,
    title: str = "idempotask",
) -> Starlette:
    """The dashboard as an ASGI application (a Starlette app), to serve or to mount.

    Stores: ``backend`` (a store or a URL: the idempotency records, and beside them the
    dead letters and breakers of ``namespace``), ``dead_letter_store`` (a store or a URL)
    or ``queue`` (a :class:`~idempotask.deadletter.DeadLetterQueue`), ``breaker_store``.
    Left out, each is the configured one (:func:`idempotask.configure`), read at each
    use. ``namespace`` defaults to the configured namespace.

    Who may use it: ``auth(request)`` returns the user's name, or None (or raises
    ``PermissionError``) to refuse; it may be a coroutine function. Or ``token``: HTTP
    basic auth with any user name (recorded with the actions) and the token as password,
    or ``Authorization: Bearer <token>``. With neither, only clients on this machine
    (loopback addresses) are served, through a URL naming it (``localhost``,
    ``127.0.0.1``: no other site's name, against DNS rebinding) -- behind a reverse proxy
    on the same machine, give ``auth=``. ``secret`` signs the CSRF tokens: give the same
    one to every process serving the dashboard (default: random per process).

    ``read_only=True`` hides and refuses every action; ``show_arguments=False`` never
    shows letters' arguments (each letter page can also hide them). ``refresh`` is how
    old, in seconds, the overview's counts may get before they are counted again (see
    :mod:`idempotask.web._overview`).

    >>> app = create_app(backend="redis://localhost:6379/0", read_only=True)  # doctest: +SKIP
    """
    try:
        from idempotask.web._app import create_app as make
    except ImportError as exc:
        raise ImportError(f"{_INSTALL} ({exc})") from exc
    return make(
        backend=backend,
        dead_letter_store=dead_letter_store,
        namespace=namespace,
        queue=queue,
        breaker_store=breaker_store,
        auth=auth,
        token=token,
        read_only=read_only,
        show_arguments=show_arguments,
        secret=secret,
        refresh=refresh,
        title=title,
    )


def create_wsgi_app(**options: Any) -> Any:
    """:func:`create_app` as a WSGI application, through ``a2wsgi``'s ``ASGIMiddleware``
    (it runs the app on an event loop of its own thread). Options as for
    :func:`create_app`.

    >>> from flask import Flask  # doctest: +SKIP
    >>> from werkzeug.middleware.dispatcher import DispatcherMiddleware  # doctest: +SKIP
    >>> flask_app.wsgi_app = DispatcherMiddleware(  # doctest: +SKIP
    ...     flask_app.wsgi_app, {"/ops/idempotask": create_wsgi_app(auth=my_user)})
    """
    try:
        from a2wsgi import ASGIMiddleware
    except ImportError as exc:
        raise ImportError(f"{_INSTALL} ({exc})") from exc
    # Starlette's and a2wsgi's ASGI type aliases differ in spelling, not in shape.
    return ASGIMiddleware(create_app(**options))  # type: ignore[arg-type]

"""The keys page (look up a record by key, or by a function's name and JSON arguments
giving the key ``key_for`` gives; forget it) and the breakers page (every breaker's
state; close or open one by hand).

A record's stored result is never shown unless the operator asks for it (it may hold
what the call returned to a customer); its size always is.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from idempotask.backends.base import Record, State, SupportsScan
from idempotask.cli._keys import record_json
from idempotask.errors import ConfigurationError, CorruptRecordError
from idempotask.keys import check_name, explicit_key, make_key
from idempotask.serializers import get_serializer
from idempotask.web._app import dashboard, redirect
from idempotask.web._forms import FormError

__all__ = ["ROUTES"]

log = logging.getLogger("idempotask.web")

LISTED = 50


def _arguments(text: str) -> dict[str, Any]:
    """A JSON object of arguments by name: plain JSON, or the typed JSON letters store
    (``{"$t": "date", "v": "2026-01-02"}``)."""
    try:
        json.loads(text)
        value = get_serializer("json").loads(text.encode("utf-8", "surrogatepass"))
    except Exception as exc:
        raise FormError(f"arguments: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FormError('arguments: expected a JSON object of names to values, e.g. {"order": 7}')
    return value


async def _lookup(request: Request, key: str) -> tuple[str, Record | None, str]:
    """The record under ``key`` (or ``<namespace>:key``), or why it cannot be read."""
    dash = dashboard(request)
    backend = dash.stores.backend
    candidates = [key]
    prefix = dash.stores.namespace + ":"
    if not key.startswith(prefix):
        candidates.append(prefix + key)
    for candidate in candidates:
        try:
            record = await backend.aget(candidate)
        except CorruptRecordError as exc:
            return candidate, None, f"the data under this key is not an idempotask record: {exc}"
        if record is not None:
            return candidate, record, ""
    return key, None, ""


async def keys(request: Request) -> Response:
    """Look up a key (or compute it), show its record, list a function's records."""
    dash = dashboard(request)
    params = request.query_params
    key = params.get("key", "").strip()
    function = params.get("function", "").strip()
    arguments = params.get("arguments", "").strip()
    explicit = params.get("explicit", "").strip()
    reveal = params.get("reveal") == "1"
    namespace = dash.stores.namespace
    error = ""
    record: Record | None = None
    listed: list[Record] | None = None
    more = False
    problem = ""
    try:
        if not key and function:
            check_name(function)
            if explicit:
                key = explicit_key(function, explicit, namespace=namespace)
            elif arguments:
                key = make_key(function, _arguments(arguments), namespace=namespace)
        if key:
            key, record, problem = await _lookup(request, key)
        elif function:
            listed, more = await _listing(request, function)
    except FormError as exc:
        error = str(exc)
    except ConfigurationError as exc:
        error = f"{exc} (start the dashboard with --import of the module defining it)"
    except TypeError as exc:  # Python's own: a missing or unexpected argument
        error = f"these arguments do not make a call to {function}: {exc}"
    shown = record_json(key, record, time.time()) if record is not None else None
    return dash.render(
        request,
        "keys.html",
        status_code=400 if error else 200,
        active="keys",
        key=key,
        function=function,
        arguments_text=arguments,
        explicit=explicit,
        error=error,
        problem=problem,
        record=record,
        shown=shown,
        reveal=reveal and record is not None and record.state is not State.IN_PROGRESS,
        listed=listed,
        more=more,
        in_progress=record is not None and record.state is State.IN_PROGRESS,
    )


async def _listing(request: Request, function: str) -> tuple[list[Record], bool]:
    backend = dashboard(request).stores.backend
    if not isinstance(backend, SupportsScan):
        raise FormError(f"{type(backend).__name__} cannot list its keys (no scan())")
    prefix = f"{dashboard(request).stores.namespace}:{function}:"
    found = await backend.ascan(prefix, limit=LISTED + 1)
    return sorted(found[:LISTED], key=lambda r: r.key), len(found) > LISTED


async def forget(request: Request) -> Response:
    """Delete a key's record so the next call runs again (an in-progress claim only with
    ``force``), and only the record that was shown (its token)."""
    dash = dashboard(request)
    form = await dash.form(request)
    key = (form.get("key") or [""])[0]
    token = (form.get("token") or [""])[0]
    force = (form.get("force") or [""])[0] == "1"
    backend = dash.stores.backend
    record = await backend.aget(key)
    back = str(request.url_for("keys").path)
    if record is None or record.token != token:
        raise FormError(
            f"the record under {key!r} changed or went away since it was shown; look again"
        )
    if record.state is State.IN_PROGRESS and not force:
        raise FormError(
            f"{key!r} is in progress: a call may be running right now, and forgetting the key "
            "lets a duplicate run beside it. Tick the box to release it anyway"
        )
    if not await backend.adelete(key, token=token):
        raise FormError(
            f"the record under {key!r} changed while it was being forgotten; look again"
        )
    log.info("idempotask.web: %s forgot key %s (%s)", dash.actor(request), key, record.state.value)
    return redirect(back + "?" + _query(key=key), done="forgot")


def _query(**params: str) -> str:
    return urlencode(params)


# -- breakers -----------------------------------------------------------------------------------


async def breakers(request: Request) -> Response:
    """Every breaker the store has a record of, and the manual controls."""
    dash = dashboard(request)
    store = dash.stores.breakers
    states = await store.astates(limit=500) if store is not None else {}
    return dash.render(
        request,
        "breakers.html",
        active="breakers",
        available=store is not None,
        states=sorted(states.items()),
    )


def _breaker_name(text: str) -> str:
    name = text.strip()
    if not name or len(name) > 200 or not name.isprintable():
        raise FormError("name: a breaker's name, one line of at most 200 characters")
    return name


async def breaker_act(request: Request) -> Response:
    """Close a breaker (its record removed) or open it for a time (POST, CSRF-checked)."""
    dash = dashboard(request)
    form = await dash.form(request)
    store = dash.stores.breakers
    if store is None:
        raise FormError("the store keeps no breakers")
    action = (form.get("action") or [""])[0]
    name = _breaker_name((form.get("name") or [""])[0])
    if action == "close":
        await store.areset(name)
        done = "closed"
    elif action == "open":
        try:
            seconds = float((form.get("seconds") or ["60"])[0])
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or not 1 <= seconds <= 7 * 86400:
            raise FormError("seconds: how long to keep it open, 1 to 604800")
        # One failure with a threshold of one opens it, on the store's clock, as the
        # breaker itself would; it half-opens after `seconds`, then a probe decides.
        await store.arecord_failure(name, threshold=1, window=seconds, open_for=seconds)
        done = "opened"
    else:
        raise FormError(f"action: {action!r} is not close or open")
    log.info("idempotask.web: %s %s breaker %s", dash.actor(request), done, name)
    return redirect(str(request.url_for("breakers").path), done=done)


ROUTES = [
    Route("/keys", keys, name="keys"),
    Route("/keys/forget", forget, methods=["POST"], name="forget"),
    Route("/breakers", breakers, name="breakers"),
    Route("/breakers/act", breaker_act, methods=["POST"], name="breaker_act"),
]

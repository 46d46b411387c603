"""The letters pages: the filtered list, one letter, and the actions on them.

Every action goes through a confirmation page (a GET that changes nothing) that says
what will happen and to how many letters, then a POST with the CSRF token does it,
recording ``web:<user>`` and the note in each letter's history. Bulk actions act on
every letter matching the filter when they run, with the same statuses the count used:

- retry: not-resolved letters unless a status is chosen (replaying a resolved letter
  could run a finished call again; choose "resolved" to do it anyway);
- resolve: not-resolved letters unless a status is chosen;
- abandon: open letters (pending, retrying) unless a status is chosen;
- purge: resolved and abandoned letters only, whatever is chosen.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from idempotask.backends.base import DeadLetter, DeadLetterFilter, Record, State, Status
from idempotask.cli._common import decode_arguments
from idempotask.errors import BackendError, CorruptRecordError
from idempotask.web._app import dashboard, letter_path, redirect
from idempotask.web._forms import Cursor, FormError, LetterQuery
from idempotask.web._security import Refused

__all__ = ["ROUTES"]

log = logging.getLogger("idempotask.web")

PAGE = 50
NOT_RESOLVED = (Status.PENDING, Status.RETRYING, Status.ABANDONED)
OPEN = (Status.PENDING, Status.RETRYING)
CLOSED = (Status.RESOLVED, Status.ABANDONED)

# action -> (statuses when none is chosen, whether a choice is only narrowed to them)
BULK: dict[str, tuple[tuple[Status, ...], bool]] = {
    "retry_all": (NOT_RESOLVED, False),
    "resolve_all": (NOT_RESOLVED, False),
    "abandon_all": (OPEN, False),
    "purge": (CLOSED, True),
}
ONE = ("retry", "resolve", "abandon")
VERBS = {
    "retry": "Retry now",
    "resolve": "Resolve",
    "abandon": "Abandon",
    "retry_all": "Retry now",
    "resolve_all": "Resolve",
    "abandon_all": "Abandon",
    "purge": "Purge",
}
DONE = {"retry": "retried", "resolve": "resolved", "abandon": "abandoned", "purge": "purged"}


def _params(request: Request) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        params.setdefault(name, []).append(value)
    return params


def bulk_filter(query: LetterQuery, action: str) -> DeadLetterFilter | None:
    """The filter a bulk ``action`` acts on (None: no status it may touch was chosen)."""
    default, narrow = BULK[action]
    chosen = tuple(Status(s) for s in query.status)
    if not chosen:
        statuses = default
    elif narrow:
        statuses = tuple(s for s in chosen if s in default)
        if not statuses:
            return None
    else:
        statuses = chosen
    return dataclasses.replace(query.filter(), status=statuses)


async def letters(request: Request) -> Response:
    """Letters matching the filter, newest last failure first, a page at a time."""
    dash = dashboard(request)
    wanted = request.query_params.get("id", "").strip()
    if wanted:  # the "letter id" box: its page finds it by id or prefix
        return redirect(letter_path(request, wanted))
    now = time.time()
    error = ""
    try:
        query = LetterQuery.parse(_params(request), now)
    except FormError as exc:
        query, error = LetterQuery(), str(exc)
    shown: list[DeadLetter] = []
    following: Cursor | None = None
    if not error:
        chosen, offset = query.page_filter()
        found = await dash.stores.queue.aquery(
            status=chosen.status,
            kind=chosen.kind,
            function=chosen.function,
            since=chosen.since,
            until=chosen.until,
            search=chosen.search or None,
            limit=PAGE + 1,
            offset=offset,
        )
        shown = found[:PAGE]
        if len(found) > PAGE:
            following = Cursor.after(shown, query.cursor)
    known = dash.overview.peek()
    return dash.render(
        request,
        "letters.html",
        status_code=400 if error else 200,
        active="letters",
        query=query,
        error=error,
        letters=shown,
        following=following,
        functions=known.functions[:200] if known else [],
        bulk=[a for a in BULK if a != "purge"],
    )


def _record_state(record: Record | None) -> str:
    if record is None:
        return "absent"
    return {
        State.IN_PROGRESS: "in progress",
        State.COMPLETED: "completed",
        State.FAILED: "failed",
    }[record.state]


async def letter(request: Request) -> Response:
    """One letter: every field, its arguments, traceback and history, and its key's
    live record."""
    dash = dashboard(request)
    found = await dash.stores.queue.afind(request.path_params["id"])
    record: Record | None = None
    record_error = ""
    if found.key:
        try:
            record = await dash.stores.backend.aget(found.key)
        except CorruptRecordError as exc:
            record_error = f"not a record idempotask wrote: {exc}"
        except BackendError as exc:
            record_error = dash.stores.scrub(f"the idempotency store did not answer: {exc}")
    wants = request.query_params.get("arguments", "show") != "hide"
    show = dash.show_arguments and wants
    return dash.render(
        request,
        "letter.html",
        active="letters",
        letter=found,
        status_value=Status(found.status).value,
        record=record,
        record_state=_record_state(record),
        record_error=record_error,
        arguments=decode_arguments(found) if show else None,
        arguments_allowed=dash.show_arguments,
        arguments_shown=show,
        actions=_possible(found),
    )


def _possible(found: DeadLetter) -> list[str]:
    status = Status(found.status)
    actions = ["retry"]
    if status is not Status.RESOLVED:
        actions.append("resolve")
    if status in OPEN:
        actions.append("abandon")
    return actions


async def confirm(request: Request) -> Response:
    """What an action will do, and to how many letters; the form that does it."""
    dash = dashboard(request)
    if dash.read_only:
        raise Refused(403, "this dashboard is read-only: it changes nothing")
    params = _params(request)
    action = (params.get("action") or [""])[0]
    context: dict[str, Any] = {"action": action, "verb": VERBS.get(action, "")}
    if action in ONE:
        found = await dash.stores.queue.afind((params.get("id") or [""])[0])
        context.update(letter=found, count=1, query=None, pairs=[("id", found.id)])
    elif action in BULK:
        query = LetterQuery.parse(params, time.time())
        chosen = bulk_filter(query, action)
        count = 0 if chosen is None else await dash.stores.queue.acount(chosen)
        statuses = () if chosen is None else tuple(s.value for s in chosen.status)
        context.update(
            letter=None,
            count=count,
            query=query,
            statuses_acted=statuses,
            pairs=query.pairs(),
        )
    else:
        raise FormError(f"action: {action!r} is not one of {', '.join(VERBS)}")
    return dash.render(request, "confirm.html", active="letters", **context)


async def act(request: Request) -> Response:
    """Do a confirmed action (POST, CSRF-checked, refused when read-only)."""
    dash = dashboard(request)
    form = await dash.form(request)
    action = (form.get("action") or [""])[0]
    note = (form.get("note") or [""])[0].strip()[:2000]
    actor = dash.actor(request)
    queue = dash.stores.queue
    if action in ONE:
        id = (form.get("id") or [""])[0]
        if action == "retry":
            changed = await queue.arequeue(id, actor=actor, note=note)
        elif action == "resolve":
            changed = await queue.amark_resolved(id, note=note, actor=actor)
        else:
            changed = await queue.amark_abandoned(id, note=note, actor=actor)
        log.info("idempotask.web: %s %s letter %s", actor, DONE[action], changed.id)
        return redirect(letter_path(request, changed.id), done=DONE[action], n=1)
    if action not in BULK:
        raise FormError(f"action: {action!r} is not one of {', '.join(VERBS)}")
    query = LetterQuery.parse(form, time.time())
    chosen = bulk_filter(query, action)
    count = 0
    if chosen is not None:
        if action == "retry_all":
            count = await queue.arequeue_all(chosen, actor=actor, note=note)
        elif action == "resolve_all":
            count = await queue.aresolve_all(chosen, note=note, actor=actor)
        elif action == "abandon_all":
            count = await queue.aabandon_all(chosen, note=note, actor=actor)
        else:
            count = await queue.store.apurge(chosen)
    verb = DONE[action.removesuffix("_all")]
    log.info("idempotask.web: %s %s %d letters (%s)", actor, verb, count, query.describe())
    return redirect(str(request.url_for("letters").path) + query.query_string(), done=verb, n=count)


ROUTES = [
    Route("/letters", letters, name="letters"),
    Route("/letters/confirm", confirm, name="confirm"),
    Route("/letters/act", act, methods=["POST"], name="act"),
    Route("/letters/{id}", letter, name="letter"),
]

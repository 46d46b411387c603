"""idempotask in the Django admin: dead letters and idempotency records.

With ``django.contrib.admin`` and ``idempotask.django`` in ``INSTALLED_APPS``, the admin
lists the dead letters of the configured queue (its namespace, on the database alias its
store uses) with filters by status, kind, function, error type and time of the last
failure, and a search over the id, function, key, error type and message. A letter's
page shows every field, its arguments as stored (values ``redact=`` changed stay
``<redacted: ...>``), the traceback and the history. Rows are never edited, added or
deleted here; the actions are those of the command line and the dashboard:

- **Retry now** makes letters due at once (the next ``dlq process`` replays them);
- **Resolve…** closes them as handled by hand, with a note;
- **Abandon…** closes them as given up, with a note;

each through :class:`~idempotask.deadletter.DeadLetterQueue` (``requeue``,
``mark_resolved``, ``mark_abandoned``), so every letter's history records it as done by
``admin:<username>``. Idempotency records of the namespace are browsable too, with
**Forget…** (the store's ``delete(key, token=...)``: the next call runs again; a claim
in progress only when the confirmation says so).

Viewing needs the models' *view* permission; acting needs their *change* permission
(superusers have both).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from django.contrib import admin, messages  # type: ignore[import-untyped]
from django.core.exceptions import PermissionDenied  # type: ignore[import-untyped]
from django.http import (  # type: ignore[import-untyped]
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.urls import path  # type: ignore[import-untyped]
from django.utils.html import format_html, format_html_join  # type: ignore[import-untyped]

from idempotask import config
from idempotask.backends.base import Backend, State
from idempotask.cli._common import decode, decode_arguments
from idempotask.cli._text import clip, iso, safe, span
from idempotask.deadletter import DeadLetterQueue, default_queue
from idempotask.django._admin_base import (
    ErrorTypeFilter,
    ExpiryFilter,
    FunctionFilter,
    KindFilter,
    LastFailureFilter,
    ReadOnlyAdmin,
    StateFilter,
    StatusFilter,
    action,
    admin_actor,
    display,
    letter_of,
    shown,
    store_alias,
    warn_elsewhere,
    when,
)
from idempotask.django.models import DeadLetterRecord, IdempotencyRecord
from idempotask.errors import IdempotaskError

__all__ = ["DeadLetterAdmin", "IdempotencyRecordAdmin", "admin_actor"]

_ACTIONS = {
    # what: (title, button, past tense)
    "retry": ("Retry now", "Retry now", "requeued (due now)"),
    "resolve": ("Resolve", "Resolve", "resolved"),
    "abandon": ("Abandon", "Abandon", "abandoned"),
}


# The letter's own fields on its page, read-only like every field of the admin.
_LETTER_FIELDS = (
    "letter_id_full",
    "function",
    "status_shown",
    "kind",
    "attempts",
    "error",
    "first_failure",
    "last_failure_full",
    "next_retry_full",
    "key",
    "route",
    "critical",
    "version",
)


@admin.register(DeadLetterRecord)
class DeadLetterAdmin(ReadOnlyAdmin):
    """The configured queue's dead letters: filter, search, read, and retry, resolve or
    abandon them through :class:`~idempotask.deadletter.DeadLetterQueue`."""

    list_display = (
        "letter_id",
        "function",
        "kind",
        "status_shown",
        "attempts",
        "last_failure",
        "next_retry",
        "error",
    )
    list_display_links = ("letter_id",)
    list_filter = (StatusFilter, KindFilter, FunctionFilter, ErrorTypeFilter, LastFailureFilter)
    search_fields = ("^id", "function", "key", "search")
    search_help_text = "An id (or its first characters), a function, a key, or error text."
    list_per_page = 50
    actions = ("retry_selected", "resolve_selected", "abandon_selected")
    change_form_template = "admin/idempotask/deadletterrecord/change_form.html"
    fieldsets = (
        (None, {"fields": _LETTER_FIELDS}),
        ("Arguments, as stored (after the function's redact=)", {"fields": ("arguments_shown",)}),
        ("Traceback", {"fields": ("traceback_shown",)}),
        ("History", {"fields": ("history_shown",)}),
    )
    readonly_fields = (
        *_LETTER_FIELDS,
        "arguments_shown",
        "traceback_shown",
        "history_shown",
    )

    # -- which rows ------------------------------------------------------------------------

    def queue(self) -> DeadLetterQueue:
        """The queue the actions go through: the configured one."""
        return default_queue()

    def get_queryset(self, request: HttpRequest) -> Any:
        """The letters of the configured queue: its namespace, on its store's alias
        (none while the configured store cannot be built: the list says why)."""
        queryset = super().get_queryset(request)
        try:
            store = self.queue().store
        except IdempotaskError:
            return queryset.none()
        alias = store_alias(store)
        if alias is not None:
            queryset = queryset.using(alias)
        namespace = getattr(store, "namespace", config.settings().namespace)
        return queryset.filter(namespace=namespace)

    def get_search_results(
        self, request: HttpRequest, queryset: Any, search_term: str
    ) -> tuple[Any, bool]:
        """Also search with the text case-folded: the ``search`` column holds the error
        type and message folded, and compares bytes on MySQL/MariaDB."""
        found, duplicates = super().get_search_results(request, queryset, search_term)
        folded = search_term.casefold()
        if folded != search_term:
            more, more_duplicates = super().get_search_results(request, queryset, folded)
            found, duplicates = found | more, duplicates or more_duplicates
        return found, duplicates

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        if request.method == "GET":
            try:
                store: Any = self.queue().store
            except IdempotaskError as exc:
                message = f"The dead-letter store cannot be used: {exc} (`manage.py check`)"
                self.message_user(request, safe(message), messages.ERROR)
            else:
                warn_elsewhere(self, request, "dead letters", store)
        return super().changelist_view(request, extra_context)

    # -- columns and fields ----------------------------------------------------------------

    @display(description="id", ordering="id")
    def letter_id(self, row: DeadLetterRecord) -> str:
        return str(row.id)[:12]

    @display(description="id")
    def letter_id_full(self, row: DeadLetterRecord) -> str:
        return str(row.id)

    @display(description="status", ordering="status")
    def status_shown(self, row: DeadLetterRecord) -> str:
        text = str(row.status)
        if row.resolution:
            text += f" ({row.resolution})"
        if row.status in ("pending", "retrying") and row.next_retry_at is None:
            text += ", held: waits for a person"
        return text

    @display(description="last failure", ordering="last_failed_at")
    def last_failure(self, row: DeadLetterRecord) -> Any:
        return when(row.last_failed_at, short=True)

    @display(description="last failure")
    def last_failure_full(self, row: DeadLetterRecord) -> Any:
        return when(row.last_failed_at)

    @display(description="first failure")
    def first_failure(self, row: DeadLetterRecord) -> Any:
        return when(row.first_failed_at)

    @display(description="next retry", ordering="next_retry_at")
    def next_retry(self, row: DeadLetterRecord) -> Any:
        if row.next_retry_at is not None and row.next_retry_at <= time.time():
            return format_html('<span title="{}">due now</span>', iso(row.next_retry_at))
        return when(row.next_retry_at, short=True)

    @display(description="next retry")
    def next_retry_full(self, row: DeadLetterRecord) -> Any:
        if row.next_retry_at is None:
            held = row.status in ("pending", "retrying")
            return "none: held, waits for a person (retry it, or resolve it)" if held else "-"
        if row.next_retry_at <= time.time():
            return f"due now ({iso(row.next_retry_at)}): the next `dlq process` replays it"
        return when(row.next_retry_at)

    @display(description="error")
    def error(self, row: DeadLetterRecord) -> str:
        short = str(row.error_type).rsplit(".", 1)[-1]
        return clip(f"{shown(short)}: {shown(row.message)}", 100)

    @display(description="arguments")
    def arguments_shown(self, row: DeadLetterRecord) -> Any:
        decoded = decode_arguments(letter_of(row))
        if not decoded.kept:
            return "Not kept (removed by redact=, or the call did not match the signature)."
        if decoded.values is None:
            return f"Cannot be shown here: {safe(decoded.error or '')}"
        if not decoded.values:
            return "None."
        rows = format_html_join(
            "",
            "<tr><th>{}</th><td><code>{}</code></td></tr>",
            ((safe(name), safe(value)) for name, value in decoded.values.items()),
        )
        return format_html('<table class="idempotask-arguments">{}</table>', rows)

    @display(description="traceback")
    def traceback_shown(self, row: DeadLetterRecord) -> Any:
        text = shown(row.traceback).rstrip() or "(none recorded)"
        return format_html('<pre class="idempotask-traceback">{}</pre>', text)

    @display(description="history")
    def history_shown(self, row: DeadLetterRecord) -> Any:
        history = letter_of(row).history
        if not history:
            return "(none recorded)"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    iso(a.at),
                    a.what,
                    safe(a.actor or "-"),
                    safe("; ".join(part for part in (a.kind, a.error, a.note) if part)),
                )
                for a in history
            ),
        )
        return format_html(
            '<table class="idempotask-history"><thead><tr><th>when</th><th>what</th>'
            "<th>who</th><th>detail</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    # -- actions ---------------------------------------------------------------------------

    def get_urls(self) -> list[Any]:
        opts = self.model._meta
        return [
            path(
                "act/<str:what>/",
                self.admin_site.admin_view(self.act_view),
                name=f"{opts.app_label}_{opts.model_name}_act",
            ),
            *super().get_urls(),
        ]

    def perform(self, request: HttpRequest, what: str, ids: Iterable[str], note: str) -> None:
        """Apply ``what`` to the letters ``ids`` through the queue, as
        ``admin:<username>``, and tell the user what happened to each."""
        queue, actor = self.queue(), admin_actor(request)
        note = " ".join(note.split())
        done: list[str] = []
        for id in ids:
            try:
                if what == "retry":
                    queue.requeue(id, actor=actor, note=note)
                elif what == "resolve":
                    queue.mark_resolved(id, note=note, actor=actor)
                else:
                    queue.mark_abandoned(id, note=note, actor=actor)
            except IdempotaskError as exc:
                self.message_user(request, f"{id}: {safe(str(exc))}", messages.ERROR)
            else:
                done.append(id)
        if done:
            count = "1 dead letter" if len(done) == 1 else f"{len(done)} dead letters"
            self.message_user(request, f"{count} {_ACTIONS[what][2]}.", messages.SUCCESS)

    def act_view(self, request: HttpRequest, what: str) -> HttpResponse:
        """``act/retry|resolve|abandon/?id=ID``: a confirmation (GET), then the action
        (POST), back to the letter's page."""
        if what not in _ACTIONS:
            raise Http404(f"no action {what!r}")
        if not self.may_act(request):
            raise PermissionDenied
        if request.method not in ("GET", "POST"):
            return HttpResponseNotAllowed(["GET", "POST"])
        row = self._row(request, request.POST.get("id") or request.GET.get("id"))
        if request.method == "POST":
            self.perform(request, what, [row.id], request.POST.get("note", ""))
            if str(row.id).isalnum():  # the admin's URLs escape other characters
                return HttpResponseRedirect(self._url("change", row.id))
            return HttpResponseRedirect(self._url("changelist", q=row.id))
        title, button, _ = _ACTIONS[what]
        return self._confirm(
            request,
            title=f"{title}: dead letter {row.id}",
            objects=[(row.id, self._label(row))],
            action=self._url("act", what),
            button=button,
            note=True,
        )

    def _label(self, row: DeadLetterRecord) -> str:
        return f"{row.id} — {safe(str(row.function))}, {row.status}: {self.error(row)}"

    def _bulk(self, request: HttpRequest, queryset: Any, what: str) -> HttpResponse | None:
        if not self.may_act(request):
            raise PermissionDenied
        rows = list(queryset)
        if what == "retry" or request.POST.get("confirmed") == "yes":
            self.perform(request, what, [r.id for r in rows], request.POST.get("note", ""))
            return None
        title, button, _ = _ACTIONS[what]
        count = "1 dead letter" if len(rows) == 1 else f"{len(rows)} dead letters"
        return self._confirm(
            request,
            title=f"{title}: {count}",
            objects=[(r.id, self._label(r)) for r in rows],
            action=self._url("changelist"),
            button=button,
            note=True,
            bulk=f"{what}_selected",
        )

    @action(description="Retry the selected dead letters now")
    def retry_selected(self, request: HttpRequest, queryset: Any) -> HttpResponse | None:
        return self._bulk(request, queryset, "retry")

    @action(description="Resolve the selected dead letters…")
    def resolve_selected(self, request: HttpRequest, queryset: Any) -> HttpResponse | None:
        return self._bulk(request, queryset, "resolve")

    @action(description="Abandon the selected dead letters…")
    def abandon_selected(self, request: HttpRequest, queryset: Any) -> HttpResponse | None:
        return self._bulk(request, queryset, "abandon")

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        return super().get_actions(request) if self.may_act(request) else {}


# -- idempotency records ---------------------------------------------------------------------


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(ReadOnlyAdmin):
    """The records of the configured namespace, read-only, with "forget" through the
    store (``delete(key, token=...)``)."""

    list_display = ("key_shown", "state", "owner", "expires", "payload_size")
    list_filter = (StateFilter, ExpiryFilter)
    search_fields = ("key", "owner")
    search_help_text = "A key (or part of it: the function's name), or an owner."
    list_per_page = 100
    actions = ("forget_selected",)
    change_form_template = "admin/idempotask/idempotencyrecord/change_form.html"
    fields = (
        "key_shown",
        "state",
        "token",
        "owner",
        "fingerprint",
        "expires_full",
        "payload_size",
        "result",
    )
    readonly_fields = fields

    def backend(self) -> Backend:
        """The store "forget" goes through: the configured one."""
        return config.get_backend()

    def get_queryset(self, request: HttpRequest) -> Any:
        """The records of the configured namespace, on the configured store's alias."""
        queryset = super().get_queryset(request)
        try:
            alias = store_alias(self.backend())
        except IdempotaskError:
            return queryset.none()
        if alias is not None:
            queryset = queryset.using(alias)
        return queryset.filter(key__startswith=f"{config.settings().namespace}:")

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        if request.method == "GET":
            try:
                backend = self.backend()
            except IdempotaskError as exc:
                self.message_user(request, safe(str(exc)), messages.ERROR)
            else:
                warn_elsewhere(self, request, "idempotency records", backend)
        return super().changelist_view(request, extra_context)

    @display(description="key", ordering="key")
    def key_shown(self, row: IdempotencyRecord) -> str:
        return safe(str(row.key))

    @display(description="expires", ordering="expires_at")
    def expires(self, row: IdempotencyRecord) -> Any:
        left = row.expires_at - time.time()
        text = "expired" if left <= 0 else f"in {span(left)}"
        return format_html('<span title="{}">{}</span>', iso(row.expires_at), text)

    @display(description="expires")
    def expires_full(self, row: IdempotencyRecord) -> str:
        left = row.expires_at - time.time()
        if left <= 0:
            purge = "`manage.py idempotask keys purge` deletes it"
            return f"expired at {iso(row.expires_at)} ({purge})"
        what = "lease ends in" if row.state == State.IN_PROGRESS.value else "in"
        return f"{what} {span(left)} ({iso(row.expires_at)})"

    @display(description="payload")
    def payload_size(self, row: IdempotencyRecord) -> str:
        return f"{len(bytes(row.payload or b''))} bytes"

    @display(description="result or error")
    def result(self, row: IdempotencyRecord) -> Any:
        payload = bytes(row.payload or b"")
        if not payload:
            return "-"
        decoded = decode(payload)
        if decoded.text is None:
            return f"cannot be decoded here: {safe(decoded.error or '')}"
        return format_html("<code>{}</code>", clip(safe(decoded.text), 2000))

    # -- forget ----------------------------------------------------------------------------

    def get_urls(self) -> list[Any]:
        opts = self.model._meta
        return [
            path(
                "forget/",
                self.admin_site.admin_view(self.forget_view),
                name=f"{opts.app_label}_{opts.model_name}_forget",
            ),
            *super().get_urls(),
        ]

    def forget(self, request: HttpRequest, rows: Iterable[IdempotencyRecord], force: bool) -> None:
        """Delete each row's record through the store, only if it still holds the claim
        shown (its token); a claim in progress only with ``force``. Whether it is still
        live is the store's answer, on its clock (the row's ``expires_at`` against this
        server's clock would forget a live claim whenever the two clocks disagree)."""
        backend, done = self.backend(), 0
        for row in rows:
            key = str(row.key)
            try:
                refused = self._forget_one(backend, key, str(row.token), force)
            except IdempotaskError as exc:
                refused = (f"{safe(key)}: {safe(str(exc))}", messages.ERROR)
            if refused is None:
                done += 1
            else:
                self.message_user(request, *refused)
        if done:
            count = "1 key" if done == 1 else f"{done} keys"
            self.message_user(
                request, f"Forgot {count}: the next call runs again.", messages.SUCCESS
            )

    def _forget_one(
        self, backend: Backend, key: str, token: str, force: bool
    ) -> tuple[str, int] | None:
        """Forget one record: None when done, else why not (a message and its level)."""
        record = backend.get(key)  # None when absent or expired, on the store's clock
        if record is None:
            return (
                f"{safe(key)} has expired or is gone: the next call runs again, with nothing "
                "to forget (`manage.py idempotask keys purge` deletes expired rows)",
                messages.WARNING,
            )
        if record.token == token and record.state is State.IN_PROGRESS and not force:
            return (
                f"{safe(key)} is in progress: a call may be running right now, and "
                "forgetting it lets a duplicate run beside it. Tick the box to forget it "
                "anyway.",
                messages.ERROR,
            )
        if record.token != token or not backend.delete(key, token=token):
            return (f"{safe(key)} changed meanwhile; look again", messages.WARNING)
        return None

    def forget_view(self, request: HttpRequest) -> HttpResponse:
        """``forget/?key=KEY``: a confirmation (GET), then the deletion (POST), back to
        the records."""
        if not self.may_act(request):
            raise PermissionDenied
        if request.method not in ("GET", "POST"):
            return HttpResponseNotAllowed(["GET", "POST"])
        row = self._row(request, request.POST.get("id") or request.GET.get("key"))
        if request.method == "POST":
            self.forget(request, [row], request.POST.get("force") == "yes")
            return HttpResponseRedirect(self._url("changelist"))
        return self._confirm(
            request,
            title=f"Forget the key {safe(str(row.key))}",
            objects=[(str(row.key), self._label(row))],
            action=self._url("forget"),
            button="Forget",
            force=row.state == State.IN_PROGRESS.value,
        )

    def _label(self, row: IdempotencyRecord) -> str:
        return f"{safe(str(row.key))} — {row.state}, expires: {self.expires_full(row)}"

    @action(description="Forget the selected keys…")
    def forget_selected(self, request: HttpRequest, queryset: Any) -> HttpResponse | None:
        if not self.may_act(request):
            raise PermissionDenied
        rows = list(queryset)
        if request.POST.get("confirmed") == "yes":
            self.forget(request, rows, request.POST.get("force") == "yes")
            return None
        count = "1 key" if len(rows) == 1 else f"{len(rows)} keys"
        return self._confirm(
            request,
            title=f"Forget {count}",
            objects=[(str(r.key), self._label(r)) for r in rows],
            action=self._url("changelist"),
            button="Forget",
            force=any(r.state == State.IN_PROGRESS.value for r in rows),
            bulk="forget_selected",
        )

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        return super().get_actions(request) if self.may_act(request) else {}

"""The parts of idempotask's Django admin (:mod:`idempotask.django.admin`): typed
decorators, the read-only base admin with its confirmation page, the list filters, and
how stored rows are shown."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlencode

from django.contrib import admin, messages  # type: ignore[import-untyped]
from django.http import (  # type: ignore[import-untyped]
    Http404,
    HttpRequest,
    HttpResponse,
)
from django.template.response import TemplateResponse  # type: ignore[import-untyped]
from django.urls import reverse  # type: ignore[import-untyped]
from django.utils.html import format_html  # type: ignore[import-untyped]

from idempotask.backends.base import DeadLetter, State, Status, decode_history
from idempotask.cli._text import iso, relative, safe
from idempotask.django._database import DjangoDatabase
from idempotask.django.models import DeadLetterRecord
from idempotask.django.settings import Misconfigured
from idempotask.taxonomy import FailureKind

__all__ = [
    "ChoiceFilter",
    "ErrorTypeFilter",
    "ExpiryFilter",
    "FunctionFilter",
    "KindFilter",
    "LastFailureFilter",
    "ReadOnlyAdmin",
    "StateFilter",
    "StatusFilter",
    "action",
    "admin_actor",
    "display",
    "letter_of",
    "shown",
    "store_alias",
    "warn_elsewhere",
    "when",
]

_PAGE_OF_NAMES = 200  # the most functions / error types a filter offers

F = TypeVar("F", bound=Callable[..., Any])


def display(**options: Any) -> Callable[[F], F]:
    """``admin.display``, typed (Django ships no type information)."""
    decorate: Callable[[F], F] = admin.display(**options)
    return decorate


def action(**options: Any) -> Callable[[F], F]:
    """``admin.action``, typed."""
    decorate: Callable[[F], F] = admin.action(**options)
    return decorate


def admin_actor(request: HttpRequest) -> str:
    """Who acts, in a letter's history: ``admin:<username>``."""
    return f"admin:{request.user.get_username()}"


def store_alias(store: Any) -> str | None:
    """The Django alias a store keeps its rows on (None: not on a Django database)."""
    database = getattr(store, "database", None)
    return database.alias if isinstance(database, DjangoDatabase) else None


def warn_elsewhere(model_admin: Any, request: HttpRequest, what: str, store: Any) -> None:
    """Say so on a list page when the configured ``store`` is not on a Django alias: the
    page shows the idempotask tables of Django's own database, which are that store's
    only when it points at the same database (a SQLAlchemy URL of it); Redis keeps its
    rows elsewhere."""
    if store_alias(store) is not None:
        return
    if isinstance(store, Misconfigured):
        listed = "; ".join(f"{p.id}: {p.message}" for p in store.problems)
        message = f"The IDEMPOTASK setting is invalid ({listed}): run `manage.py check`."
        model_admin.message_user(request, safe(message), messages.ERROR)
        return
    model_admin.message_user(
        request,
        f"The {what} are kept in {safe(repr(store))}, not on a Django database alias: this "
        "page shows the idempotask tables of Django's database, which are that store's only "
        "if it points at the same database. Set IDEMPOTASK's backend to an alias, or use "
        "`manage.py idempotask` or the dashboard.",
        messages.WARNING,
    )


def shown(value: Any) -> str:
    """A stored text column (bytes on some databases) as text, control characters shown
    as escapes, so a hostile message cannot hide or fake what the page shows."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "replace")
    return safe(str(value))


def when(epoch: float | None, *, short: bool = False) -> Any:
    """``5m ago (2026-01-02T03:04:05Z)``, or when ``short`` only ``5m ago`` with the
    time in its tooltip (for list columns); ``-`` for none."""
    if epoch is None:
        return "-"
    if short:
        return format_html('<span title="{}">{}</span>', iso(epoch), relative(epoch, time.time()))
    return f"{relative(epoch, time.time())} ({iso(epoch)})"


def letter_of(row: DeadLetterRecord) -> DeadLetter:
    """The :class:`~idempotask.backends.base.DeadLetter` a row holds."""

    def raw(value: Any) -> bytes:
        return bytes(value) if value is not None else b""

    return DeadLetter(
        id=row.id,
        function=row.function,
        kind=row.kind,
        error_type=row.error_type,
        message=raw(row.message).decode("utf-8", "surrogatepass"),
        traceback=raw(row.traceback).decode("utf-8", "surrogatepass"),
        arguments=raw(row.arguments),
        key=row.key,
        attempts=row.attempts,
        status=Status(row.status),
        first_failed_at=row.first_failed_at,
        last_failed_at=row.last_failed_at,
        next_retry_at=row.next_retry_at,
        route=row.route,
        critical=row.critical,
        resolution=row.resolution,
        version=row.version,
        history=decode_history(row.history, f"dead letter {row.id!r}"),
    )


# -- shared by both admins -------------------------------------------------------------------


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows are never added, changed or deleted here: only the store changes them."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def may_act(self, request: HttpRequest) -> bool:
        """Whether the user may take the actions: the model's change permission."""
        opts = self.model._meta
        return bool(request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}"))

    def _url(self, name: str, *args: Any, **query: str) -> str:
        opts = self.model._meta
        url = str(reverse(f"admin:{opts.app_label}_{opts.model_name}_{name}", args=args))
        return f"{url}?{urlencode(query)}" if query else url

    def _row(self, request: HttpRequest, pk: str | None) -> Any:
        """The row ``pk`` names among those this admin lists, or 404. (Custom views take
        the key as a parameter: keys hold characters the admin's own URLs escape.)"""
        row = None if not pk else self.get_queryset(request).filter(pk=pk).first()
        if row is None:
            raise Http404(f"no {self.model._meta.verbose_name} {pk!r} here")
        return row

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        context = {**(extra_context or {}), "idempotask_may_act": self.may_act(request)}
        return super().change_view(request, object_id, form_url, context)

    def _confirm(
        self,
        request: HttpRequest,
        *,
        title: str,
        objects: Sequence[tuple[str, str]],
        action: str,
        button: str,
        note: bool = False,
        force: bool = False,
        bulk: str | None = None,
    ) -> TemplateResponse:
        """The confirmation page of an action on ``objects`` (id, label): a note to
        keep in the history, or the box allowing a claim in progress to be forgotten.
        ``bulk`` is the changelist action the form posts back to."""
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": title,
            "objects": objects,
            "action": action,
            "button": button,
            "ask_note": note,
            "ask_force": force,
            "bulk": bulk,
            "changelist": self._url("changelist"),
        }
        return TemplateResponse(request, "admin/idempotask/confirm.html", context)


class ChoiceFilter(admin.SimpleListFilter):
    """A filter on one column, among fixed values or those present."""

    column = ""

    def values(self, request: HttpRequest, model_admin: Any) -> Iterable[str]:
        queryset = model_admin.get_queryset(request)
        names = queryset.order_by(self.column).values_list(self.column, flat=True).distinct()
        return list(names[:_PAGE_OF_NAMES])

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(v, safe(v)) for v in self.values(request, model_admin)]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        value = self.value()
        return queryset if value is None else queryset.filter(**{self.column: value})


# -- filters --------------------------------------------------------------------------------


class StatusFilter(ChoiceFilter):
    title = "status"
    parameter_name = "status"
    column = "status"

    def values(self, request: HttpRequest, model_admin: Any) -> Iterable[str]:
        return [s.value for s in Status]


class KindFilter(ChoiceFilter):
    title = "kind"
    parameter_name = "kind"
    column = "kind"

    def values(self, request: HttpRequest, model_admin: Any) -> Iterable[str]:
        return [k.value for k in FailureKind]


class FunctionFilter(ChoiceFilter):
    title = "function"
    parameter_name = "function"
    column = "function"


class ErrorTypeFilter(ChoiceFilter):
    title = "error type"
    parameter_name = "error_type"
    column = "error_type"


class LastFailureFilter(admin.SimpleListFilter):
    """When the letter last failed: within the past hour, day, week or 30 days, or
    before that."""

    title = "last failure"
    parameter_name = "failed"
    _SPANS: ClassVar[dict[str, float]] = {
        "1h": 3600.0,
        "24h": 86400.0,
        "7d": 7 * 86400.0,
        "30d": 30 * 86400.0,
    }

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("1h", "past hour"),
            ("24h", "past 24 hours"),
            ("7d", "past 7 days"),
            ("30d", "past 30 days"),
            ("older", "more than 30 days ago"),
        ]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        value, now = self.value(), time.time()
        if value in self._SPANS:
            return queryset.filter(last_failed_at__gte=now - self._SPANS[value])
        if value == "older":
            return queryset.filter(last_failed_at__lt=now - self._SPANS["30d"])
        return queryset


class StateFilter(ChoiceFilter):
    title = "state"
    parameter_name = "state"
    column = "state"

    def values(self, request: HttpRequest, model_admin: Any) -> Iterable[str]:
        return [s.value for s in State]


class ExpiryFilter(admin.SimpleListFilter):
    title = "expiry"
    parameter_name = "expiry"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("live", "live"), ("expired", "expired")]

    def queryset(self, request: HttpRequest, queryset: Any) -> Any:
        now = time.time()
        if self.value() == "live":
            return queryset.filter(expires_at__gt=now)
        if self.value() == "expired":
            return queryset.filter(expires_at__lte=now)
        return queryset

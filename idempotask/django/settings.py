"""The ``IDEMPOTASK`` setting: one dict in ``settings.py``, read at startup.

::

    IDEMPOTASK = {
        "backend": "default",            # a DATABASES alias, or a URL: "redis://...", ...
        "namespace": "shop",
        "default_ttl": 4 * 3600,         # seconds, or a datetime.timedelta
        "dead_letter_store": None,       # None: beside the backend; an alias or a URL
        "spool_path": BASE_DIR / "var" / "dead-letters.jsonl",
    }

Every key but ``backend``, ``dead_letter_store`` and ``configure`` is the
:func:`idempotask.configure` option of the same name (``default_lease``,
``wait_timeout``, ``on_backend_error``, ``serializer``, ``max_result_bytes``,
``max_argument_bytes``, ``dead_letter_retention``, ``on_alert``; ``on_alert`` and
``serializer`` may also be dotted import paths). ``backend`` is a database alias (the
store on Django's own connections, :class:`~idempotask.django.store.DjangoBackend`) or
a URL of any idempotask store; it defaults to ``"default"``. ``dead_letter_store`` is
an alias or a URL, by default the backend's own dead-letter store. ``"configure":
False`` leaves :func:`idempotask.configure` to you (the checks still run);
``"sqlite_transactions": True`` lets transactional calls run when the backend is a
SQLite alias (see :meth:`~idempotask.django.store.DjangoBackend.begin`).

The dict is validated by Django's system checks (``manage.py check``: ``idempotask.E001``
and on, naming the key) and applied by the app's ``ready()``: the configured store
becomes the default of ``@idempotent`` and ``@dead_letter`` when they are given none.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from idempotask import config
from idempotask.errors import ConfigurationError
from idempotask.serializers import get_serializer

__all__ = ["DEFAULT_BACKEND", "KEYS", "Problem", "apply_at_startup", "read", "validate"]

#: The backend when ``IDEMPOTASK`` names none: the ``default`` database alias.
DEFAULT_BACKEND = "default"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with ``IDEMPOTASK``: the check ``id``, the ``key`` (None: the
    whole setting) and what to do."""

    id: str
    key: str | None
    message: str
    hint: str | None = None


def _import(value: Any) -> Any:
    if isinstance(value, str):
        from django.utils.module_loading import import_string  # type: ignore[import-untyped]

        try:
            return import_string(value)
        except ImportError as exc:
            raise ConfigurationError(f"cannot import {value!r}: {exc}") from exc
    return value


def _spool(value: Any) -> Any:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ConfigurationError(f"expected a path or None, got {value!r}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"expected True or False, got {value!r}")
    return value


def _serializer(value: Any) -> Any:
    value = _import(value) if isinstance(value, str) and "." in value else value
    get_serializer(value)
    return value


def _hooks(value: Any) -> Any:
    hooks = [value] if isinstance(value, str) or callable(value) else list(value or [])
    return config.check_hooks("on_alert", [_import(hook) for hook in hooks])


_VALUES: dict[str, Callable[[Any], Any]] = {
    "namespace": config.check_namespace,
    "default_ttl": lambda v: config.check_seconds("default_ttl", v),
    "default_lease": lambda v: config.check_seconds("default_lease", v),
    "wait_timeout": lambda v: config.check_seconds("wait_timeout", v, allow_zero=True),
    "dead_letter_retention": lambda v: config.check_seconds("dead_letter_retention", v),
    "on_backend_error": lambda v: config.check_choice("on_backend_error", v, ("raise", "open")),
    "serializer": _serializer,
    "max_result_bytes": lambda v: config.check_size("max_result_bytes", v),
    "max_argument_bytes": lambda v: config.check_size("max_argument_bytes", v),
    "spool_path": _spool,
    "on_alert": _hooks,
    "configure": _flag,
    "sqlite_transactions": _flag,
}

#: Every key ``IDEMPOTASK`` may hold.
KEYS = frozenset({"backend", "dead_letter_store", *_VALUES})


@dataclass
class Resolved:
    """A valid ``IDEMPOTASK``: the :func:`idempotask.configure` options, and whether to
    apply them at startup."""

    options: dict[str, Any] = field(default_factory=dict)
    configure: bool = True
    sqlite_transactions: bool = False


def read() -> Any:
    """The raw ``IDEMPOTASK`` setting (``{}`` when absent)."""
    from django.conf import settings  # type: ignore[import-untyped]

    return getattr(settings, "IDEMPOTASK", {})


def _store_option(
    key: str, value: Any, problems: list[Problem], sqlite_transactions: bool = False
) -> Any:
    """A backend or dead-letter store option: an alias becomes a Django store."""
    from django.db import connections  # type: ignore[import-untyped]

    if not isinstance(value, str) or not value:
        if value is not None and key == "backend" and not isinstance(value, str):
            try:
                return config.check_backend(value)  # a store instance
            except ConfigurationError as exc:
                problems.append(Problem("idempotask.E003", key, str(exc)))
                return None
        if value is not None and key == "dead_letter_store" and not isinstance(value, str):
            try:
                return config.check_dead_letter_store(value)
            except ConfigurationError as exc:
                problems.append(Problem("idempotask.E003", key, str(exc)))
                return None
        if value is None and key == "dead_letter_store":
            return None
        problems.append(
            Problem(
                "idempotask.E003",
                key,
                f"IDEMPOTASK[{key!r}] must be a database alias or a URL, got {value!r}",
            )
        )
        return None
    if "://" in value:
        try:
            if key == "backend":
                return config.check_backend(value)
            return config.check_dead_letter_store(value)
        except ConfigurationError as exc:
            problems.append(Problem("idempotask.E003", key, f"IDEMPOTASK[{key!r}]: {exc}"))
            return None
    if value not in connections:
        known = ", ".join(repr(a) for a in connections) or "none"
        problems.append(
            Problem(
                "idempotask.E004",
                key,
                f"IDEMPOTASK[{key!r}] is {value!r}, which is neither a URL nor an alias in "
                f"DATABASES (aliases: {known})",
                hint="Name a DATABASES alias, or give a URL such as 'redis://localhost:6379/0'.",
            )
        )
        return None
    vendor = connections[value].vendor
    if vendor not in ("postgresql", "sqlite", "mysql"):
        problems.append(
            Problem(
                "idempotask.E005",
                key,
                f"IDEMPOTASK[{key!r}] names the alias {value!r}, a {vendor} database; "
                "idempotask stores work on PostgreSQL, SQLite, MySQL and MariaDB",
            )
        )
        return None
    from idempotask.django.store import DjangoBackend, DjangoDeadLetterStore

    if key == "backend":
        return DjangoBackend(value, sqlite_transactions=sqlite_transactions)
    return ("alias", value, DjangoDeadLetterStore)


def validate(raw: Any) -> tuple[Resolved, list[Problem]]:
    """Check ``raw`` (the ``IDEMPOTASK`` setting): the options it resolves to, and every
    problem found (empty when it is valid)."""
    problems: list[Problem] = []
    resolved = Resolved()
    if not isinstance(raw, Mapping):
        problems.append(
            Problem(
                "idempotask.E001",
                None,
                f"IDEMPOTASK must be a dict, got {type(raw).__name__}",
                hint='For example IDEMPOTASK = {"backend": "default", "namespace": "shop"}.',
            )
        )
        return resolved, problems
    for key in raw:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key).lower(), sorted(KEYS), n=1)
            problems.append(
                Problem(
                    "idempotask.E002",
                    str(key),
                    f"IDEMPOTASK has an unknown key {key!r}",
                    hint=(f"Did you mean {close[0]!r}? " if close else "")
                    + f"Known keys: {', '.join(sorted(KEYS))}.",
                )
            )
    for key, check in _VALUES.items():
        if key not in raw:
            continue
        try:
            value = check(raw[key])
        except ConfigurationError as exc:
            problems.append(Problem("idempotask.E003", key, f"IDEMPOTASK[{key!r}]: {exc}"))
            continue
        if key == "configure":
            resolved.configure = value
        elif key == "sqlite_transactions":
            resolved.sqlite_transactions = value
        else:
            resolved.options[key] = raw[key] if key == "spool_path" else value
    backend = _store_option(
        "backend", raw.get("backend", DEFAULT_BACKEND), problems, resolved.sqlite_transactions
    )
    if backend is not None:
        resolved.options["backend"] = backend
    letters = _store_option("dead_letter_store", raw.get("dead_letter_store"), problems)
    if isinstance(letters, tuple):
        _, alias, store = letters
        namespace = resolved.options.get("namespace", config.settings().namespace)
        letters = store(alias, namespace=namespace)
    if letters is not None:
        resolved.options["dead_letter_store"] = letters
    return resolved, problems


class Misconfigured:
    """The backend while ``IDEMPOTASK`` is invalid: every operation raises
    :class:`~idempotask.errors.ConfigurationError` naming the problems, so a worker
    started with a typo in its settings fails closed instead of deduplicating in its
    own memory. ``manage.py check`` lists the same problems."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def __repr__(self) -> str:
        return f"Misconfigured({[p.id for p in self.problems]})"

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        listed = "; ".join(f"{p.id}: {p.message}" for p in self.problems)
        raise ConfigurationError(
            f"the IDEMPOTASK setting is invalid ({listed}); run `manage.py check`"
        )

    async def _arefuse(self, *args: Any, **kwargs: Any) -> Any:
        return self._refuse()


for _name in ("claim", "complete", "fail", "renew", "get", "delete"):
    setattr(Misconfigured, _name, Misconfigured._refuse)
    setattr(Misconfigured, "a" + _name, Misconfigured._arefuse)


def apply_at_startup() -> Resolved | None:
    """Apply ``IDEMPOTASK`` with :func:`idempotask.configure` (what the app's ``ready()``
    does) and return what was applied. An invalid setting configures
    :class:`Misconfigured` as the backend (every call fails, naming the problems) and
    leaves the report to the system checks. ``"configure": False`` applies nothing."""
    resolved, problems = validate(read())
    if not resolved.configure and not problems:
        return None
    if problems:
        config.configure(backend=Misconfigured(problems))  # type: ignore[arg-type]
        return None
    config.configure(**resolved.options)
    return resolved

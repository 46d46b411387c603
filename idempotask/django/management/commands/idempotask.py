"""``manage.py idempotask``: the ``idempotask`` command's ``dlq`` and ``keys`` commands,
on the stores the ``IDEMPOTASK`` setting configures.

::

    manage.py idempotask dlq list|show|retry|resolve|abandon|purge|stats|process|flush ...
    manage.py idempotask keys list|compute|show|forget|purge ...

Every subcommand is the command line's own (:mod:`idempotask.cli`): the same options,
output (aligned text, or ``--json``), messages and exit codes, on the stores the app
configured at startup from ``settings.IDEMPOTASK``. ``--backend STORE`` (and
``--dead-letter-store STORE``), a ``DATABASES`` alias or a URL, reach another store for
this command only. Changes to letters are
recorded in their history as made by ``manage.py:<login name>``, or by ``--actor NAME``.
Expected failures (an unknown id, a refused change, a store unreachable, a bad option)
are raised as Django's :class:`~django.core.management.CommandError` with the message
and exit code the command line gives (1 refused or not found, 2 usage, 3 unreachable);
``--traceback`` shows where they came from.
"""

from __future__ import annotations

import argparse
import getpass
import io
import os
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

from django.core.management.base import (  # type: ignore[import-untyped]
    BaseCommand,
    CommandError,
    CommandParser,
    OutputWrapper,
)

from idempotask import config
from idempotask.cli import CommandError as CliError
from idempotask.cli import Context, run
from idempotask.cli._parser import add_dlq_group, add_keys_group, finish

PROG = "manage.py idempotask"
_STORE_OPTIONS = ("url", "dead_letter_url", "namespace", "spool")

__all__ = ["Command"]


def default_actor() -> str:
    """``manage.py:<login name>``: who acts when ``--actor`` is not given."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"manage.py:{user}"


def _leaf_options(parser: argparse.ArgumentParser) -> None:
    """The options every subcommand takes (given after it: ``dlq list --json``)."""
    group = parser.add_argument_group("common options")
    no = argparse.SUPPRESS
    group.add_argument(
        "--backend",
        dest="url",
        metavar="STORE",
        default=no,
        help="the idempotency store: a DATABASES alias or a URL (postgresql+psycopg://app@db"
        "/app, redis://...), instead of the one settings.IDEMPOTASK configures (its dead "
        "letters then too)",
    )
    group.add_argument(
        "--dead-letter-store",
        dest="dead_letter_url",
        metavar="STORE",
        default=no,
        help="the dead-letter store: a DATABASES alias or a URL, instead of the configured one",
    )
    group.add_argument(
        "--namespace", metavar="NS", default=no, help="the key namespace (default: the setting's)"
    )
    group.add_argument(
        "--import",
        dest="imports",
        metavar="MODULE",
        action="append",
        default=no,
        help="import MODULE first, so `dlq process` finds its @dead_letter functions (repeatable)",
    )
    group.add_argument("--spool", metavar="PATH", default=no, help="the spool file")
    group.add_argument(
        "--json", action="store_true", default=no, help="print JSON (sorted keys, UTC times)"
    )
    group.add_argument(
        "--actor",
        metavar="NAME",
        default=no,
        help="who acts, as recorded in each changed letter's history "
        "(default: manage.py:<login name>)",
    )


class _Stream(io.TextIOBase):
    """A text stream onto a command's ``stdout`` / ``stderr`` wrapper, which writes
    exactly what it is given (``print`` brings its own line ends)."""

    def __init__(self, wrapper: OutputWrapper) -> None:
        super().__init__()
        self._wrapper = wrapper

    def write(self, text: str) -> int:
        self._wrapper.write(text, ending="")
        return len(text)

    def flush(self) -> None:
        self._wrapper.flush()


@dataclass
class _Context(Context):
    """The command line's context, whose error lines are kept for Django's
    ``CommandError`` instead of being printed."""

    errors: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text.startswith("error: "):
            self.errors.append(text[len("error: ") :])
        else:
            super().note(text)


class Command(BaseCommand):
    """``manage.py idempotask dlq ...`` and ``manage.py idempotask keys ...``."""

    help = (
        "Inspect and act on idempotask's dead letters and idempotency keys, on the stores "
        "settings.IDEMPOTASK configures: `manage.py idempotask dlq --help`, "
        "`manage.py idempotask keys --help`."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
        add_dlq_group(groups, _leaf_options, PROG)
        add_keys_group(groups, _leaf_options, PROG)

    def handle(self, *args: Any, **options: Any) -> None:
        ns = argparse.Namespace(**options)
        ns.debug = bool(options.get("traceback"))
        actor = getattr(ns, "actor", None)
        if actor is not None and not actor.strip():
            raise CommandError("--actor: give a name to record in the letters' history")
        named = getattr(ns, "url", None) is not None
        stores = _aliases(ns)
        finish(ns)
        ctx = _Context(
            ns,
            out=cast(TextIO, _Stream(self.stdout)),
            err=cast(TextIO, _Stream(self.stderr)),
            prog=PROG,
            acting_as=actor.strip() if actor is not None else default_actor(),
            store_hint=(
                'set IDEMPOTASK = {"backend": ...} in your settings, or pass --backend STORE '
                "(a DATABASES alias or a URL)"
            ),
            tables_hint=(
                "create it with `idempotask db create --url URL`"
                if ns.url is not None
                else "create it with `manage.py migrate idempotask`"
            ),
        )
        before = config.settings()
        try:
            if stores:
                config.configure(**stores)
            code = run(ctx)
        except CliError as exc:
            raise CommandError(str(exc), returncode=exc.code) from exc
        finally:
            if named or any(getattr(ns, name) is not None for name in _STORE_OPTIONS):
                # call_command() may run in a long-lived process: the stores named for
                # this command must not become the application's.
                config.configure(
                    backend=before.backend,
                    dead_letter_store=before.dead_letter_store,
                    namespace=before.namespace,
                    spool_path=before.spool_path,
                )
        if code:
            raise CommandError("; ".join(ctx.errors) or f"failed (exit {code})", returncode=code)


def _alias_of(option: str, value: str) -> str:
    """``value`` of ``option`` when it names a ``DATABASES`` alias (else a CommandError)."""
    from django.db import connections  # type: ignore[import-untyped]

    if value not in connections:
        known = ", ".join(repr(a) for a in connections) or "none"
        raise CommandError(
            f"{option}: {value!r} is neither a URL (redis://..., postgresql+psycopg://...) "
            f"nor an alias in DATABASES (aliases: {known})"
        )
    return value


def _aliases(ns: argparse.Namespace) -> dict[str, Any]:
    """The stores ``--backend`` / ``--dead-letter-store`` name by database alias, as
    :func:`idempotask.configure` options (those given by URL stay in ``ns`` for the
    command line's own handling); a store named by ``--backend`` alone holds the dead
    letters too."""
    from idempotask.django.store import DjangoBackend, DjangoDeadLetterStore

    stores: dict[str, Any] = {}
    url, letters = getattr(ns, "url", None), getattr(ns, "dead_letter_url", None)
    if url is not None and "://" not in url:
        stores["backend"] = DjangoBackend(_alias_of("--backend", url))
        ns.url = None
        if letters is None:
            stores["dead_letter_store"] = None  # beside that backend
    elif url is not None and letters is None:
        ns.dead_letter_url = url
    if letters is not None and "://" not in letters:
        namespace = getattr(ns, "namespace", None) or config.settings().namespace
        alias = _alias_of("--dead-letter-store", letters)
        stores["dead_letter_store"] = DjangoDeadLetterStore(alias, namespace=namespace)
        ns.dead_letter_url = None
    return stores

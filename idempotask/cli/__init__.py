"""The ``idempotask`` command (also ``python -m idempotask``): dead letters, keys, a demo.

::

    idempotask [--url URL] [--dead-letter-url URL] [--namespace NS] [--import MODULE]...
               [--spool PATH] [--json] [--debug] COMMAND ...

    dlq list [FILTERS] [--since T] [--until T] [--search TEXT] [--limit N] [--offset N]
    dlq show ID [--no-arguments]
    dlq retry ID...  |  dlq retry --all [FILTERS] [--since T] [--until T] [--search TEXT] [--yes]
    dlq resolve ID... [--note TEXT]
    dlq abandon ID... [--note TEXT]
    dlq purge [--older-than AGE] [FILTERS] [--dry-run] [--yes]
    dlq stats [--hours H] [--kind K]... [--function F]...
    dlq process [--limit N] [--lease D] [--kind K]... [--function F]...
                [--loop [--interval D]]
    dlq flush
    keys list NAME [--limit N]
    keys compute NAME [ARGUMENTS] [--explicit KEY]
    keys show KEY
    keys forget KEY [--force]
    keys purge [--batch N]
    demo [--keep]
    db create
    web [--host H] [--port P] [--read-only] [--token T] [--hide-arguments] [--refresh S]

``FILTERS`` are ``--status S``, ``--kind K`` and ``--function F``, each repeatable (a
letter matches any value given for an option, and every option given). An ``ID`` may be
the first characters of a letter's id, when no other letter's id starts with them.
Changes are recorded in each letter's history as made by ``cli:<login name>``. Text from
letters (messages, tracebacks, arguments, names) is printed with control characters
escaped, so it cannot drive the terminal; ``--json`` prints it exactly. Durations are
``90s``, ``15m``, ``24h``, ``30d`` or plain seconds; times are ISO 8601 (UTC unless an
offset is given) or a duration ago. Every command prints aligned text, or JSON with
``--json``. Exit codes: 0 done, 1 refused or not found, 2 usage error, 3 a store is
unreachable. Expected errors print one line on stderr; ``--debug`` adds tracebacks.

Only the standard library is used (``argparse``); store drivers are imported when the
store is built, as everywhere in idempotask.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from idempotask import config
from idempotask.cli._common import (
    CommandError,
    Context,
    backend_url,
    dead_letter_url,
    describe_backend,
    describe_dead_letter_store,
    redact_url,
    scrub,
)
from idempotask.cli._parser import build_parser, parse
from idempotask.errors import (
    BackendError,
    ConfigurationError,
    CorruptRecordError,
    IdempotaskError,
    MissingTableError,
)

__all__ = ["CommandError", "Context", "build_parser", "main", "run"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _import(modules: Sequence[str]) -> None:
    """Import the user's modules, the current directory first on the path (as ``python
    -m`` has it, which the installed script does not)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise CommandError(f"--import {name}: {type(exc).__name__}: {exc}", 2) from exc


def _configure(ctx: Context) -> None:
    """Apply the store options given on the command line, over what imports configured."""
    a = ctx.args
    given = {
        "backend": a.url,
        "dead_letter_store": a.dead_letter_url,
        "namespace": a.namespace,
        "spool_path": a.spool,
    }
    options = {name: value for name, value in given.items() if value is not None}
    if options:
        config.configure(**options)
    if getattr(a, "offline", False):
        return  # the command reads no configured store (keys compute, demo): nothing to note
    url = dead_letter_url() if a.group == "dlq" else backend_url()
    if url is not None and url.lower().startswith("memory:"):
        what = "dead-letter" if a.group == "dlq" else "idempotency"
        ctx.note(
            f"note: the {what} store is memory://, which lives in this process only and "
            f"starts empty; {ctx.store_hint}"
        )


def _where(group: str | None) -> str:
    try:
        return describe_dead_letter_store() if group == "dlq" else describe_backend()
    except Exception:  # pragma: no cover - describing must never hide the real error
        return "the store"


def _fail(ctx: Context, message: str, code: int, exc: BaseException) -> int:
    if ctx.args.debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=ctx.err)
    ctx.note(f"error: {message}")
    return code


def run(ctx: Context) -> int:
    """Run the parsed command of ``ctx``: import ``--import`` modules, apply the store
    options, call the command; returns its exit code. Every expected failure (a refusal,
    an unknown id, a store unreachable or holding foreign data, a bad setting) is raised
    as :class:`CommandError` with the one-line message and exit code ``main`` prints and
    returns (``manage.py idempotask`` raises it as Django's ``CommandError``)."""
    args = ctx.args
    try:
        _import(args.imports)
        _configure(ctx)
        code: int = args.handler(ctx)
        return code
    except CommandError:
        raise
    except CorruptRecordError as exc:
        message = f"{_where(args.group)} holds data idempotask did not write: {exc}"
        raise CommandError(message, EXIT_REFUSED) from exc
    except BackendError as exc:
        urls = (backend_url(), dead_letter_url(), args.url, args.dead_letter_url)
        where = _where(args.group)
        detail = scrub(redact_url(str(exc)), *urls)
        if isinstance(exc, MissingTableError):
            # Not an outage: the table will not appear by itself.
            message = f"{where} has no table {exc.table!r}: {ctx.tables_hint} ({detail})"
            raise CommandError(message, EXIT_REFUSED) from exc
        raise CommandError(f"cannot reach {where}: {detail}", EXIT_UNREACHABLE) from exc
    except ConfigurationError as exc:
        detail = scrub(str(exc), args.url, args.dead_letter_url)
        raise CommandError(detail, EXIT_USAGE) from exc
    except IdempotaskError as exc:
        raise CommandError(str(exc), EXIT_REFUSED) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    >>> main(["--version"])  # doctest: +SKIP
    idempotask 0.1.0.dev0
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:  # a message in any language prints on any terminal
            reconfigure(errors="backslashreplace")
    try:
        args = parse(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version, or a usage error argparse printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    ctx = Context(args)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s %(levelname)s: %(message)s")
    try:
        return run(ctx)
    except CommandError as exc:
        return _fail(ctx, str(exc), exc.code, exc)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python's exit-time
        # flush of stdout from complaining about it again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("idempotask: interrupted", file=ctx.err, flush=True)
        return 130
    except Exception as exc:
        message = f"unexpected {type(exc).__name__}: {exc}"
        if not args.debug:
            message += " (run again with --debug for the traceback)"
        return _fail(ctx, message, EXIT_REFUSED, exc)

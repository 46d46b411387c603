"""The ``argparse`` tree of the ``idempotask`` command."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from functools import partial
from typing import Any

from idempotask import __version__
from idempotask.backends.deadletters import Status
from idempotask.cli import _db, _dlq, _keys
from idempotask.cli._text import (
    DURATION_HELP,
    TIME_HELP,
    duration_arg,
    non_negative_int_arg,
    positive_duration_arg,
    positive_float_arg,
    positive_int_arg,
    time_arg,
)
from idempotask.taxonomy import FailureKind

STATUSES = [s.value for s in Status]
KINDS = [k.value for k in FailureKind]

DESCRIPTION = """\
Inspect and act on idempotask's dead letters and idempotency keys.

Dead letters live in the dead-letter store (--dead-letter-url, else
$IDEMPOTASK_DEAD_LETTER_URL, else next to the idempotency store); idempotency records
in the idempotency store (--url, else $IDEMPOTASK_URL). Import your application with
--import so that `dlq process` can replay its @dead_letter functions; settings it makes
with idempotask.configure() apply, and the options given here override them."""

EPILOG = """\
exit codes:
  0  done
  1  refused, or not found (an unknown id, an in-progress key without --force)
  2  usage error (a bad option, duration, time or URL)
  3  a store is unreachable

examples:
  idempotask --url redis://localhost:6379/0 dlq list --status pending --since 24h
  idempotask dlq show 3f2a9c                       # an id, or its first characters
  idempotask dlq retry --all --kind external --function billing.charge
  idempotask --import myapp.tasks dlq process --loop --interval 30s
  idempotask --import myapp.tasks keys compute billing.charge '{"order_id": 7}'
  idempotask keys list billing.charge --limit 20
  idempotask keys forget 'idempotask:billing.charge:v1:9b1f...' --force
  idempotask db create --url postgresql+psycopg://app@db/app"""

GLOBAL_DESTS = ("url", "dead_letter_url", "namespace", "spool", "json", "debug")

LeafOptions = Callable[[argparse.ArgumentParser], None]
"""Adds the options every command takes to one command's parser (the store, --json...)."""

Adds = Callable[[argparse.ArgumentParser], object]
"""Adds one thing (an option, the filters, defaults) to a command's parser."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the paragraphs of descriptions and epilogs; wraps option help to the
    terminal, at most 100 columns."""

    def __init__(self, prog: str) -> None:
        width = min(shutil.get_terminal_size().columns, 100) - 2
        super().__init__(prog, max_help_position=32, width=width)


def _add_global_options(parser: argparse.ArgumentParser, *, late: bool) -> None:
    """The options every command takes, before or after its name. Defaults are filled in
    by :func:`finish` so that a value given after the command wins over one before it."""
    title = "global options (also accepted before the command)" if late else "global options"
    group = parser.add_argument_group(title)
    no = argparse.SUPPRESS
    group.add_argument(
        "--url",
        metavar="URL",
        default=no,
        help="the idempotency store, e.g. redis://localhost:6379/0 "
        "(default: $IDEMPOTASK_URL, else memory://)",
    )
    group.add_argument(
        "--dead-letter-url",
        metavar="URL",
        default=no,
        help="the dead-letter store (default: $IDEMPOTASK_DEAD_LETTER_URL, else the --url store)",
    )
    group.add_argument(
        "--namespace",
        metavar="NS",
        default=no,
        help="the key namespace, as configure(namespace=...) (default: idempotask)",
    )
    group.add_argument(
        "--import",
        dest="imports_late" if late else "imports",
        metavar="MODULE",
        action="append",
        default=no,
        help="import MODULE first, so its @dead_letter functions and integration routes are "
        "registered (repeatable; the current directory is on the path)",
    )
    group.add_argument(
        "--spool",
        metavar="PATH",
        default=no,
        help="the spool file of letters the store could not take "
        "(default: $IDEMPOTASK_SPOOL, else a per-user cache directory)",
    )
    group.add_argument(
        "--json", action="store_true", default=no, help="print JSON (sorted keys, UTC times)"
    )
    group.add_argument(
        "--debug", action="store_true", default=no, help="show tracebacks and debug logs"
    )


def _late_options(parser: argparse.ArgumentParser) -> None:
    _add_global_options(parser, late=True)


def _opt(flag: str, metavar: str | None, help: str, **options: Any) -> Adds:
    """An option (or a positional argument) with its metavar and help."""
    return lambda parser: parser.add_argument(flag, metavar=metavar, help=help, **options)


def _flag(flag: str, help: str) -> Adds:
    return lambda parser: parser.add_argument(flag, action="store_true", help=help)


def _defaults(**values: Any) -> Adds:
    return lambda parser: parser.set_defaults(**values)


def _add_filters(
    parser: argparse.ArgumentParser,
    *,
    times: bool = True,
    statuses: bool = True,
    search: bool = False,
) -> None:
    group = parser.add_argument_group("filters (repeat an option to match any of its values)")
    lowered: dict[str, Any] = {"action": "append", "type": str.lower}  # --status PENDING
    if statuses:
        text = f"one of: {', '.join(STATUSES)}"
        group.add_argument("--status", choices=STATUSES, metavar="STATUS", help=text, **lowered)
    text = f"failure kind, one of: {', '.join(KINDS)}"
    group.add_argument("--kind", choices=KINDS, metavar="KIND", help=text, **lowered)
    group.add_argument(
        "--function", action="append", metavar="NAME", help="the function's dead-letter name"
    )
    if times:
        text = f"last failure at or after TIME: {TIME_HELP}"
        group.add_argument("--since", type=time_arg, metavar="TIME", help=text)
        group.add_argument(
            "--until", type=time_arg, metavar="TIME", help="last failure before TIME"
        )
    if search:
        group.add_argument(
            "--search",
            metavar="TEXT",
            help="error type or message contains TEXT (ignoring case; plain text, no pattern)",
        )


def _ids(nargs: str = "+") -> Adds:
    help = "dead-letter id (from `dlq list`), or its first characters (at least 4)"
    return _opt("ids", "ID", help, nargs=nargs)


def _parser(groups: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = groups.add_parser(
        name, help=summary, description=description, formatter_class=_Formatter
    )
    return parser


def _adder(sub: Any, leaf_options: LeafOptions | None) -> Callable[..., object]:
    """What adds a command to ``sub``: a parser named after its handler (``cmd_list``:
    ``list``), with what ``adds`` add in that order, then ``leaf_options``."""

    def command(handler: Callable[[Any], int], summary: str, description: str, *adds: Adds) -> None:
        parser = _parser(sub, handler.__name__.removeprefix("cmd_"), summary, description)
        parser.set_defaults(handler=handler, leaf_parser=parser)
        for add in (*adds, leaf_options) if leaf_options else adds:
            add(parser)

    return command


def _dlq_commands(sub: Any, leaf_options: LeafOptions = _late_options) -> None:
    command = _adder(sub, leaf_options)
    command(
        _dlq.cmd_list,
        "list dead letters, newest failure first",
        "List dead letters matching the filters, newest failure first.",
        partial(_add_filters, search=True),
        _opt("--limit", "N", "at most N (default: 50)", type=positive_int_arg, default=50),
        _opt("--offset", "N", "skip the first N", type=non_negative_int_arg, default=0),
    )
    command(
        _dlq.cmd_show,
        "show one dead letter with its arguments and traceback",
        "Show every field of one dead letter: the error and its traceback, times, and the "
        "call's\narguments decoded (values of your own classes need --import of their module).",
        _opt("id", "ID", "dead-letter id (from `dlq list`), or its first characters"),
        _flag("--no-arguments", "do not show the arguments"),
    )
    command(
        _dlq.cmd_retry,
        "make dead letters due now, by id or by filter",
        "Make dead letters due now; the next `dlq process` replays them. A resolved or\n"
        "abandoned letter named by id is reopened. With --all, every letter matching the\n"
        "filters (resolved ones only if --status resolved is given).",
        _ids("*"),
        _flag("--all", "requeue every letter matching the filters"),
        _flag("--yes", "allow --all without any filter"),
        partial(_add_filters, search=True),
    )
    command(
        _dlq.cmd_resolve,
        "close dead letters as resolved (handled by hand)",
        "Close dead letters as RESOLVED: they are kept for the record and never retried.\n"
        "Each letter's history records it, with your login name and the note.",
        _ids(),
        _opt("--note", "TEXT", "why (what was done by hand), kept in the history"),
    )
    command(
        _dlq.cmd_abandon,
        "close dead letters as abandoned (never retried)",
        "Close dead letters as ABANDONED: kept for people to read, never retried.",
        _ids(),
        _opt("--note", "TEXT", "why, kept in the letter's history"),
    )
    command(
        _dlq.cmd_purge,
        "delete old dead letters",
        "Delete dead letters whose last failure is older than --older-than: by default\n"
        "resolved and abandoned ones older than the retention (30 days). Asks first on a\n"
        "terminal; elsewhere it needs --yes.",
        _opt(
            "--older-than",
            "AGE",
            f"age of the last failure: {DURATION_HELP} (default: the retention, 30d)",
            type=duration_arg,
        ),
        partial(_add_filters, times=False),
        _flag("--dry-run", "only count what would be deleted"),
        _flag("--yes", "delete without asking"),
    )
    command(
        _dlq.cmd_stats,
        "count recent dead letters by status, kind and function",
        "Count the dead letters whose last failure is in the past --hours, by status, kind\n"
        "and function, with the replays that failed again and those that succeeded.",
        _opt(
            "--hours",
            "H",
            "the window, in hours (default: 24)",
            type=positive_float_arg,
            default=24.0,
        ),
        partial(_add_filters, times=False, statuses=False),
    )
    command(
        _dlq.cmd_process,
        "replay due dead letters through their functions",
        "Claim due dead letters with a lease (so two processors never replay one) and\n"
        "replay each through its @dead_letter function, found by name among the modules\n"
        "imported with --import, or through its integration's route. Without any such\n"
        "function or route it claims nothing and says why (exit 1); letters of functions\n"
        "it does not know are left for other processes. A letter whose call cannot be\n"
        "rebuilt (redacted arguments, no replay_with=) is held for a person. Spooled\n"
        "letters are delivered first. With --loop it runs until SIGINT or SIGTERM,\n"
        "finishing the batch at hand; with --json it then prints one JSON object per line\n"
        "per batch.",
        _opt(
            "--limit", "N", "letters per batch (default: 100)", type=positive_int_arg, default=100
        ),
        _opt(
            "--lease",
            "DURATION",
            "how long a claim holds a letter (default: 300s)",
            type=positive_duration_arg,
            default=300.0,
        ),
        _flag("--loop", "keep processing until stopped"),
        _opt(
            "--interval",
            "DURATION",
            "pause between batches with --loop (default: 30s)",
            type=positive_duration_arg,
        ),
        partial(_add_filters, times=False, statuses=False),
    )
    command(
        _dlq.cmd_flush,
        "deliver letters waiting in the local spool to the store",
        "Deliver the dead letters that were spooled locally while the store was down.",
    )


def _limit_arg(text: str) -> int:
    value = positive_int_arg(text)
    if value > 10_000:
        raise argparse.ArgumentTypeError(f"at most 10000, got {value}")
    return value


def _keys_commands(sub: Any, leaf_options: LeafOptions = _late_options) -> None:
    command = _adder(sub, leaf_options)
    name = _opt("name", "NAME", "e.g. billing.charge")
    key = _opt("key", "KEY", "e.g. idempotask:billing.charge:v1:9b1f...")
    command(
        _keys.cmd_list,
        "list the live records of one function",
        "List the live records of the @idempotent function named NAME (its name= or\n"
        "module.qualname) in the configured namespace, at most --limit of them: key,\n"
        "state, expiry, owner, payload size. The store must offer scan() (every built-in\n"
        "one does); scans are bounded, so a large store may show fewer than it holds.",
        name,
        _opt(
            "--limit",
            "N",
            "show at most N records (default: 100, at most 10000)",
            type=_limit_arg,
            default=100,
        ),
    )
    command(
        _keys.cmd_compute,
        "compute the key of a call from JSON arguments",
        "Print the store key of a call to the @idempotent function named NAME, the key\n"
        "fn.key_for(...) gives: ARGUMENTS is a JSON object of parameter names to values\n"
        "(defaults apply; *args as a list and **kwargs as an object under their names;\n"
        'typed values as `dlq show --json` prints them, e.g. {"$t": "date", "v":\n'
        '"2026-01-02"}). The function\'s signature decides the key, so --import the\n'
        "module that defines it. With --explicit, the key of calls made with\n"
        "fn.using(key=KEY) instead (no import needed). On Redis, the Redis key too.",
        name,
        _opt("arguments", "ARGUMENTS", "e.g. '{\"order_id\": 7}'", nargs="?"),
        _defaults(offline=True),  # computes; reads no store
        _opt(
            "--explicit",
            "KEY",
            "an explicit key given to fn.using(key=...), e.g. an Idempotency-Key header",
        ),
    )
    command(
        _keys.cmd_show,
        "show the record under an idempotency key",
        "Show the record under an idempotency key: its state, claim token, owner,\n"
        "fingerprint, expiry and the stored result or error (decoded when it is typed\n"
        "JSON). The namespace may be left out of KEY.",
        key,
    )
    command(
        _keys.cmd_forget,
        "release a stuck idempotency key",
        "Delete the record under an idempotency key, so the next call runs again. A key\n"
        "in progress is refused unless --force: a call may be running right now.",
        key,
        _flag("--force", "release a key in progress (or delete data that is not a record)"),
    )
    command(
        _keys.cmd_purge,
        "delete expired idempotency records (SQL stores)",
        "Delete the expired records of a SQL store, --batch rows per statement (each its\n"
        "own short transaction). Expired records already behave as absent: this only\n"
        "reclaims space; run it from a periodic job. Redis and memory stores expire their\n"
        "records by themselves, so there it deletes nothing.",
        _opt(
            "--batch",
            "N",
            "rows per statement (default: 1000, at most 10000)",
            type=_limit_arg,
            default=1000,
        ),
    )


def _group(
    groups: Any,
    name: str,
    summary: str,
    description: str,
    commands: Callable[[Any, LeafOptions], None],
    leaf_options: LeafOptions,
) -> argparse.ArgumentParser:
    parser = _parser(groups, name, summary, description)
    commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True), leaf_options)
    return parser


def add_dlq_group(
    groups: Any, leaf_options: LeafOptions = _late_options, prog: str = "idempotask"
) -> argparse.ArgumentParser:
    """Add the ``dlq`` command and its subcommands to ``groups`` (what
    ``add_subparsers()`` returned); ``leaf_options`` adds the options every subcommand
    takes (``manage.py idempotask`` gives its own)."""
    return _group(
        groups,
        "dlq",
        "dead letters: list, show, retry, resolve, abandon, purge, stats, process, flush",
        f"Inspect and act on dead letters. `{prog} dlq COMMAND --help` tells more.",
        _dlq_commands,
        leaf_options,
    )


def add_keys_group(
    groups: Any, leaf_options: LeafOptions = _late_options, prog: str = "idempotask"
) -> argparse.ArgumentParser:
    """Add the ``keys`` command and its subcommands to ``groups``, as
    :func:`add_dlq_group` does."""
    return _group(
        groups,
        "keys",
        "idempotency keys: list, compute, show a record, forget (release) a key, "
        "purge expired records",
        f"List, compute, inspect, release or purge idempotency keys. `{prog} keys "
        "COMMAND --help` tells more.",
        _keys_commands,
        leaf_options,
    )


def _db_commands(sub: Any, leaf_options: LeafOptions) -> None:
    command = _adder(sub, leaf_options)
    command(
        _db.cmd_create,
        "create the tables the configured SQL stores need",
        "Create, if missing, every table the configured SQL stores use: idempotency\n"
        "records, dead letters and circuit breakers (safe to run again, and from several\n"
        "machines at once). Namespaces share these tables. Stores that keep no tables\n"
        "(Redis, memory) need nothing.",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``idempotask`` parser."""
    parser = argparse.ArgumentParser(
        prog="idempotask",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"idempotask {__version__}")
    _add_global_options(parser, late=False)
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    add_dlq_group(groups)
    add_keys_group(groups)
    command = _adder(groups, None)
    command(
        cmd_demo,
        "see @idempotent and @dead_letter at work on a SQLite file, in seconds",
        "Run a duplicate call, two processes racing on one key, a crash taken\n"
        "over after its lease and a dead letter replayed, on a SQLite file in a temporary\n"
        "directory, and say what happened. Needs pip install 'idempotask[sqlite]'.",
        _flag("--keep", "keep the temporary directory"),
        _defaults(offline=True, command="demo"),
    )
    _group(
        groups,
        "db",
        "SQL stores: create their tables",
        "Set up the SQL stores' tables. `idempotask db create --url URL`.",
        _db_commands,
        _late_options,
    )
    command(
        cmd_web,
        "serve the dashboard: dead letters, keys and breakers in a browser",
        "Serve the web dashboard (pip install 'idempotask[web]') on the configured\n"
        "stores, on 127.0.0.1:8765 by default. Any other --host needs --token.",
        _opt("--host", None, "address to bind (default: 127.0.0.1)", default="127.0.0.1"),
        _opt("--port", None, "port (default: 8765)", type=positive_int_arg, default=8765),
        _flag("--read-only", "hide and refuse every action"),
        _opt(
            "--token",
            "TOKEN",
            "require it as the basic-auth password (any user name, recorded with actions) "
            "or a Bearer token (default: $IDEMPOTASK_WEB_TOKEN)",
        ),
        _flag("--hide-arguments", "never show letters' arguments"),
        _opt(
            "--refresh",
            "S",
            "seconds between the overview's counts (default: 5)",
            type=positive_float_arg,
            default=5.0,
        ),
        _defaults(command="web"),
        _late_options,
    )
    return parser


def cmd_web(ctx: Any) -> int:
    from idempotask.web._serve import serve  # loads Starlette: only for this command

    return serve(ctx)


def cmd_demo(ctx: Any) -> int:
    from idempotask.demo import main as demo  # loads SQLAlchemy: only for this command

    return demo(["--keep"] if ctx.args.keep else [], out=ctx.out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; usage errors exit 2 as argparse does. Fills in the global options'
    defaults and checks the combinations argparse cannot express."""
    parser = build_parser()
    args = parser.parse_args(argv)
    finish(args)
    return args


def finish(args: argparse.Namespace) -> None:
    """Fill in the global options' defaults (those given after the command win over those
    before it) and check the combinations argparse cannot express, as usage errors of the
    command's own parser."""
    for dest in GLOBAL_DESTS:
        if getattr(args, dest, None) is None:
            setattr(args, dest, False if dest in ("json", "debug") else None)
    before, after = getattr(args, "imports", None), getattr(args, "imports_late", None)
    args.imports = [*(before or []), *(after or [])]
    handler = args.handler
    parser: argparse.ArgumentParser = args.leaf_parser
    if handler is _dlq.cmd_retry:
        filters = ("status", "kind", "function", "since", "until", "search")
        has_filter = any(getattr(args, f) is not None for f in filters)
        if args.all and args.ids:
            parser.error("give ids or --all, not both")
        if not args.all and not args.ids:
            parser.error("give the ids to retry, or --all with filters")
        if not args.all and (has_filter or args.yes):
            parser.error("filters and --yes go with --all")
    if handler is _dlq.cmd_process:
        if args.interval is not None and not args.loop:
            parser.error("--interval goes with --loop")
        if args.interval is None:
            args.interval = 30.0

"""The ``argparse`` tree of the ``idempotask`` command."""

from __future__ import annotations

import argparse
import shutil
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


def _command(
    sub: Any, name: str, handler: Any, summary: str, description: str = ""
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=description or summary[0].upper() + summary[1:] + ".",
        formatter_class=_Formatter,
    )
    parser.set_defaults(handler=handler, leaf_parser=parser)
    return parser


def _add_filters(
    parser: argparse.ArgumentParser,
    *,
    times: bool = True,
    statuses: bool = True,
    search: bool = False,
) -> None:
    group = parser.add_argument_group("filters (repeat an option to match any of its values)")
    if statuses:
        group.add_argument(
            "--status",
            action="append",
            type=str.lower,
            choices=STATUSES,
            metavar="STATUS",
            help=f"one of: {', '.join(STATUSES)}",
        )
    group.add_argument(
        "--kind",
        action="append",
        type=str.lower,
        choices=KINDS,
        metavar="KIND",
        help=f"failure kind, one of: {', '.join(KINDS)}",
    )
    group.add_argument(
        "--function", action="append", metavar="NAME", help="the function's dead-letter name"
    )
    if times:
        group.add_argument(
            "--since",
            type=time_arg,
            metavar="TIME",
            help=f"last failure at or after TIME: {TIME_HELP}",
        )
        group.add_argument(
            "--until", type=time_arg, metavar="TIME", help="last failure before TIME"
        )
    if search:
        group.add_argument(
            "--search",
            metavar="TEXT",
            help="error type or message contains TEXT (ignoring case; plain text, no pattern)",
        )


def _ids(parser: argparse.ArgumentParser, nargs: str = "+") -> None:
    parser.add_argument(
        "ids",
        nargs=nargs,
        metavar="ID",
        help="dead-letter id (from `dlq list`), or its first characters (at least 4)",
    )


def _dlq_commands(sub: Any) -> None:
    p = _command(
        sub,
        "list",
        _dlq.cmd_list,
        "list dead letters, newest failure first",
        "List dead letters matching the filters, newest failure first.",
    )
    _add_filters(p, search=True)
    p.add_argument(
        "--limit", type=positive_int_arg, default=50, metavar="N", help="at most N (default: 50)"
    )
    p.add_argument(
        "--offset", type=non_negative_int_arg, default=0, metavar="N", help="skip the first N"
    )

    p = _command(
        sub,
        "show",
        _dlq.cmd_show,
        "show one dead letter with its arguments and traceback",
        "Show every field of one dead letter: the error and its traceback, times, and the "
        "call's\narguments decoded (values of your own classes need --import of their module).",
    )
    p.add_argument(
        "id", metavar="ID", help="dead-letter id (from `dlq list`), or its first characters"
    )
    p.add_argument("--no-arguments", action="store_true", help="do not show the arguments")

    p = _command(
        sub,
        "retry",
        _dlq.cmd_retry,
        "make dead letters due now, by id or by filter",
        "Make dead letters due now; the next `dlq process` replays them. A resolved or\n"
        "abandoned letter named by id is reopened. With --all, every letter matching the\n"
        "filters (resolved ones only if --status resolved is given).",
    )
    _ids(p, "*")
    p.add_argument("--all", action="store_true", help="requeue every letter matching the filters")
    p.add_argument("--yes", action="store_true", help="allow --all without any filter")
    _add_filters(p, search=True)

    p = _command(
        sub,
        "resolve",
        _dlq.cmd_resolve,
        "close dead letters as resolved (handled by hand)",
        "Close dead letters as RESOLVED: they are kept for the record and never retried.\n"
        "Each letter's history records it, with your login name and the note.",
    )
    _ids(p)
    p.add_argument(
        "--note", metavar="TEXT", help="why (what was done by hand), kept in the history"
    )

    p = _command(
        sub,
        "abandon",
        _dlq.cmd_abandon,
        "close dead letters as abandoned (never retried)",
        "Close dead letters as ABANDONED: kept for people to read, never retried.",
    )
    _ids(p)
    p.add_argument("--note", metavar="TEXT", help="why, kept in the letter's history")

    p = _command(
        sub,
        "purge",
        _dlq.cmd_purge,
        "delete old dead letters",
        "Delete dead letters whose last failure is older than --older-than: by default\n"
        "resolved and abandoned ones older than the retention (30 days). Asks first on a\n"
        "terminal; elsewhere it needs --yes.",
    )
    p.add_argument(
        "--older-than",
        type=duration_arg,
        metavar="AGE",
        help=f"age of the last failure: {DURATION_HELP} (default: the retention, 30d)",
    )
    _add_filters(p, times=False)
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    p.add_argument("--yes", action="store_true", help="delete without asking")

    p = _command(
        sub,
        "stats",
        _dlq.cmd_stats,
        "count recent dead letters by status, kind and function",
        "Count the dead letters whose last failure is in the past --hours, by status, kind\n"
        "and function, with the replays that failed again and those that succeeded.",
    )
    p.add_argument(
        "--hours",
        type=positive_float_arg,
        default=24.0,
        metavar="H",
        help="the window, in hours (default: 24)",
    )
    _add_filters(p, times=False, statuses=False)

    p = _command(
        sub,
        "process",
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
    )
    p.add_argument(
        "--limit",
        type=positive_int_arg,
        default=100,
        metavar="N",
        help="letters per batch (default: 100)",
    )
    p.add_argument(
        "--lease",
        type=positive_duration_arg,
        default=300.0,
        metavar="DURATION",
        help="how long a claim holds a letter (default: 300s)",
    )
    p.add_argument("--loop", action="store_true", help="keep processing until stopped")
    p.add_argument(
        "--interval",
        type=positive_duration_arg,
        metavar="DURATION",
        help="pause between batches with --loop (default: 30s)",
    )
    _add_filters(p, times=False, statuses=False)

    _command(
        sub,
        "flush",
        _dlq.cmd_flush,
        "deliver letters waiting in the local spool to the store",
        "Deliver the dead letters that were spooled locally while the store was down.",
    )


def _limit_arg(text: str) -> int:
    value = positive_int_arg(text)
    if value > 10_000:
        raise argparse.ArgumentTypeError(f"at most 10000, got {value}")
    return value


def _keys_commands(sub: Any) -> None:
    p = _command(
        sub,
        "list",
        _keys.cmd_list,
        "list the live records of one function",
        "List the live records of the @idempotent function named NAME (its name= or\n"
        "module.qualname) in the configured namespace, at most --limit of them: key,\n"
        "state, expiry, owner, payload size. The store must offer scan() (every built-in\n"
        "one does); scans are bounded, so a large store may show fewer than it holds.",
    )
    p.add_argument("name", metavar="NAME", help="e.g. billing.charge")
    p.add_argument(
        "--limit",
        type=_limit_arg,
        default=100,
        metavar="N",
        help="show at most N records (default: 100, at most 10000)",
    )

    p = _command(
        sub,
        "compute",
        _keys.cmd_compute,
        "compute the key of a call from JSON arguments",
        "Print the store key of a call to the @idempotent function named NAME, the key\n"
        "fn.key_for(...) gives: ARGUMENTS is a JSON object of parameter names to values\n"
        "(defaults apply; *args as a list and **kwargs as an object under their names;\n"
        'typed values as `dlq show --json` prints them, e.g. {"$t": "date", "v":\n'
        '"2026-01-02"}). The function\'s signature decides the key, so --import the\n'
        "module that defines it. With --explicit, the key of calls made with\n"
        "fn.using(key=KEY) instead (no import needed). On Redis, the Redis key too.",
    )
    p.add_argument("name", metavar="NAME", help="e.g. billing.charge")
    p.add_argument("arguments", metavar="ARGUMENTS", nargs="?", help="e.g. '{\"order_id\": 7}'")
    p.set_defaults(offline=True)  # computes; reads no store
    p.add_argument(
        "--explicit",
        metavar="KEY",
        help="an explicit key given to fn.using(key=...), e.g. an Idempotency-Key header",
    )

    p = _command(
        sub,
        "show",
        _keys.cmd_show,
        "show the record under an idempotency key",
        "Show the record under an idempotency key: its state, claim token, owner,\n"
        "fingerprint, expiry and the stored result or error (decoded when it is typed\n"
        "JSON). The namespace may be left out of KEY.",
    )
    p.add_argument("key", metavar="KEY", help="e.g. idempotask:billing.charge:v1:9b1f...")

    p = _command(
        sub,
        "forget",
        _keys.cmd_forget,
        "release a stuck idempotency key",
        "Delete the record under an idempotency key, so the next call runs again. A key\n"
        "in progress is refused unless --force: a call may be running right now.",
    )
    p.add_argument("key", metavar="KEY", help="e.g. idempotask:billing.charge:v1:9b1f...")
    p.add_argument(
        "--force",
        action="store_true",
        help="release a key in progress (or delete data that is not a record)",
    )


def _db_commands(sub: Any) -> None:
    _command(
        sub,
        "create",
        _db.cmd_create,
        "create the tables the configured SQL stores need",
        "Create, if missing, every table the configured SQL stores use: idempotency\n"
        "records, dead letters and circuit breakers (safe to run again, and from several\n"
        "machines at once). Namespaces share these tables. Stores that keep no tables\n"
        "(Redis, memory) need nothing.",
    )


def _group(groups: Any, name: str, add: Any, summary: str, description: str) -> None:
    """A group of commands, each with the global options after its own."""
    group = groups.add_parser(
        name, help=summary, description=description, formatter_class=_Formatter
    )
    sub = group.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add(sub)
    for parser in sub.choices.values():
        _add_global_options(parser, late=True)


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

    _group(
        groups,
        "dlq",
        _dlq_commands,
        "dead letters: list, show, retry, resolve, abandon, purge, stats, process, flush",
        "Inspect and act on dead letters. `idempotask dlq COMMAND --help` tells more.",
    )
    _group(
        groups,
        "keys",
        _keys_commands,
        "idempotency keys: list, compute, show a record, forget (release) a key",
        "List, compute, inspect or release idempotency keys.",
    )

    demo = groups.add_parser(
        "demo",
        help="see @idempotent and @dead_letter at work on a SQLite file, in seconds",
        description="Run a duplicate call, two processes racing on one key, a crash taken\n"
        "over after its lease and a dead letter replayed, on a SQLite file in a temporary\n"
        "directory, and say what happened. Needs pip install 'idempotask[sqlite]'.",
        formatter_class=_Formatter,
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    demo.set_defaults(handler=_demo, leaf_parser=demo, offline=True, command="demo")

    _group(
        groups,
        "db",
        _db_commands,
        "SQL stores: create their tables",
        "Set up the SQL stores' tables. `idempotask db create --url URL`.",
    )
    _web_command(groups)
    return parser


def _web_command(groups: Any) -> None:
    web = groups.add_parser(
        "web",
        help="serve the dashboard: dead letters, keys and breakers in a browser",
        description="Serve the web dashboard (pip install 'idempotask[web]') on the configured\n"
        "stores, on 127.0.0.1:8765 by default. Any other --host needs --token.",
        formatter_class=_Formatter,
    )
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    web.add_argument("--port", type=positive_int_arg, default=8765, help="port (default: 8765)")
    web.add_argument("--read-only", action="store_true", help="hide and refuse every action")
    web.add_argument(
        "--token",
        metavar="TOKEN",
        help="require it as the basic-auth password (any user name, recorded with actions) "
        "or a Bearer token (default: $IDEMPOTASK_WEB_TOKEN)",
    )
    web.add_argument("--hide-arguments", action="store_true", help="never show letters' arguments")
    web.add_argument(
        "--refresh",
        type=positive_float_arg,
        default=5.0,
        metavar="S",
        help="seconds between the overview's counts (default: 5)",
    )
    web.set_defaults(handler=_web, leaf_parser=web, command="web")
    _add_global_options(web, late=True)


def _web(ctx: Any) -> int:
    from idempotask.web._serve import serve  # loads Starlette: only for this command

    return serve(ctx)


def _demo(ctx: Any) -> int:
    from idempotask.demo import main as demo  # loads SQLAlchemy: only for this command

    return demo(["--keep"] if ctx.args.keep else [], out=ctx.out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; usage errors exit 2 as argparse does. Fills in the global options'
    defaults and checks the combinations argparse cannot express."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for dest in GLOBAL_DESTS:
        if not hasattr(args, dest):
            setattr(args, dest, False if dest in ("json", "debug") else None)
    args.imports = [*getattr(args, "imports", []), *getattr(args, "imports_late", [])]
    _check(args)
    return args


def _check(args: argparse.Namespace) -> None:
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

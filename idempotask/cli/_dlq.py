"""``idempotask dlq ...``: list, show, retry, resolve, abandon, purge, stats, process and
flush dead letters through :class:`~idempotask.deadletter.DeadLetterQueue`."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from idempotask._printable import printable
from idempotask.backends.deadletters import DeadLetter, DeadLetterFilter, Status
from idempotask.cli._common import CommandError, Context, decode_arguments
from idempotask.cli._text import (
    clip,
    fields,
    indent,
    iso,
    plural,
    relative,
    span,
    table,
    to_json,
    when,
)
from idempotask.deadletter import (
    AmbiguousLetterId,
    DeadLetterNotFound,
    DeadLetterStats,
    ProcessReport,
)
from idempotask.errors import AlreadyInProgress, BackendError
from idempotask.spool import Spool, SpoolError

CLOSED = (Status.RESOLVED, Status.ABANDONED)


# -- shared ---------------------------------------------------------------------------------


def held(letter: DeadLetter) -> bool:
    """Open with no retry scheduled: the processor could not rebuild its call, so it
    waits for a person (its history says why)."""
    return letter.status in (Status.PENDING, Status.RETRYING) and letter.next_retry_at is None


def _next_retry(letter: DeadLetter, now: float) -> str:
    if held(letter):
        return "held: waits for a person (dlq show)"
    if letter.next_retry_at is None:
        return "-"
    if letter.next_retry_at <= now:
        return f"due ({iso(letter.next_retry_at)})"
    return when(letter.next_retry_at, now)


_LETTER_FIELDS = ["id", "function", "kind", "attempts", "error_type", "message", "key", "route"]
_LETTER_FIELDS += ["critical", "resolution", "version"]
"""The fields letter_json() gives as they are (times: ISO 8601; the status: its value)."""
_LETTER_TIMES = ("first_failed_at", "last_failed_at", "next_retry_at")
_ACTION_FIELDS = ("what", "actor", "kind", "error", "note")


def letter_json(
    letter: DeadLetter, *, full: bool = False, arguments: bool = True
) -> dict[str, Any]:
    """A letter as JSON: every field, times as ISO 8601 UTC (``held``: open, waiting for a
    person); with ``full`` also the traceback, the history and the arguments
    (``arguments``: the typed JSON document, lossless; ``arguments_repr``: name -> repr of
    the decoded value; ``arguments_error``: why they could not be decoded here).
    ``arguments`` is null when none were kept."""
    data: dict[str, Any] = {name: getattr(letter, name) for name in _LETTER_FIELDS}
    data.update({name: iso(getattr(letter, name), precise=True) for name in _LETTER_TIMES})
    data.update(status=letter.status.value, held=held(letter))
    if full:
        data["traceback"] = letter.traceback
        data["history"] = [  # oldest first
            {"at": iso(a.at, precise=True), **{name: getattr(a, name) for name in _ACTION_FIELDS}}
            for a in letter.history
        ]
        if arguments:
            decoded = decode_arguments(letter)
            data["arguments"] = decoded.document
            data["arguments_repr"] = decoded.values
            data["arguments_error"] = decoded.error
    return data


def _filters(args: Any, *, times: bool = True) -> dict[str, Any]:
    """The query filters given on the command line, as DeadLetterQueue keywords."""
    chosen: dict[str, Any] = {
        "status": args.status or None,
        "kind": args.kind or None,
        "function": args.function or None,
    }
    if times:
        chosen["since"] = args.since
        chosen["until"] = args.until
    if getattr(args, "search", None):
        chosen["search"] = args.search
    return chosen


def _each(ctx: Context, ids: Sequence[str], act: Callable[[str], DeadLetter], done: str) -> int:
    """Apply ``act`` to the letter each id (or id prefix) names; print what happened;
    exit 1 if an id named no letter, or several, or a letter that was refused (one a
    processor is replaying right now cannot be changed)."""
    changed: list[DeadLetter] = []
    missing: list[str] = []
    problems: list[str] = []
    queue = ctx.queue()
    for id in dict.fromkeys(ids):  # once each, in the order given
        try:
            changed.append(act(queue.find(id).id))
        except (DeadLetterNotFound, AmbiguousLetterId) as exc:
            missing.append(id)
            problems.append(str(exc))
        except AlreadyInProgress as exc:
            problems.append(str(exc))
    ctx.show(
        {"count": len(changed), "letters": [letter_json(x) for x in changed], "not_found": missing},
        *(f"{done} {x.id} ({x.function}): now {x.status.value}" for x in changed),
    )
    for problem in problems:
        ctx.note(f"error: {problem}")
    return 1 if problems else 0


# -- list / show ----------------------------------------------------------------------------


def cmd_list(ctx: Context) -> int:
    """``dlq list``: letters matching the filters, newest failure first."""
    a = ctx.args
    letters = ctx.queue().query(**_filters(a), limit=a.limit, offset=a.offset)
    if ctx.json:
        ctx.print(to_json([letter_json(x) for x in letters]))
        return 0
    if not letters:
        ctx.print("no dead letters match" if a.offset == 0 else "no more dead letters match")
        return 0
    rows = [
        [
            x.id,
            x.function,
            x.kind,
            x.status.value,
            x.attempts,
            when(x.last_failed_at, ctx.now),
            _next_retry(x, ctx.now),
            clip(f"{x.error_type.rsplit('.', 1)[-1]}: {x.message}", 60),
        ]
        for x in letters
    ]
    headers = ["ID", "FUNCTION", "KIND", "STATUS", "ATTEMPTS"]
    headers += ["LAST FAILURE", "NEXT RETRY", "MESSAGE"]
    ctx.print(table(headers, rows, right="4"))
    if len(letters) == a.limit:
        ctx.print(f"(first {a.limit} from offset {a.offset}; more: --offset {a.offset + a.limit})")
    return 0


def _arguments_text(letter: DeadLetter) -> str:
    decoded = decode_arguments(letter)
    if not decoded.kept:
        return "not kept (removed by redact=, or the call did not match the signature)"
    if decoded.values is not None:
        if not decoded.values:
            return "none"
        return "\n".join(f"{name} = {clip(value, 500)}" for name, value in decoded.values.items())
    raw = letter.arguments.decode("utf-8", "replace")
    return f"cannot be decoded here: {decoded.error}\nstored as: {clip(raw, 2000)}"


def cmd_show(ctx: Context) -> int:
    """``dlq show ID``: every field of one letter, arguments decoded."""
    a = ctx.args
    try:
        letter = ctx.queue().find(a.id)  # its id, or an unambiguous prefix of it (3f2a9c)
    except (DeadLetterNotFound, AmbiguousLetterId) as exc:
        raise CommandError(str(exc)) from exc
    if ctx.json:
        ctx.print(to_json(letter_json(letter, full=True, arguments=not a.no_arguments)))
        return 0
    now = ctx.now
    pairs: list[tuple[str, object]] = [
        ("id", letter.id),
        ("function", letter.function),
        ("status", letter.status.value + (f" ({letter.resolution})" if letter.resolution else "")),
        ("kind", letter.kind),
        ("attempts", letter.attempts),
        ("error", f"{letter.error_type}: {letter.message}"),
        ("key", letter.key or "-"),
        ("route", letter.route or "-"),
        ("critical", "yes" if letter.critical else "no"),
        ("first failure", when(letter.first_failed_at, now)),
        ("last failure", when(letter.last_failed_at, now)),
        ("next retry", _next_retry(letter, now) if letter.next_retry_at is not None else "none"),
        ("version", letter.version),
    ]
    if held(letter):
        skipped = (a.note for a in reversed(letter.history) if a.what == "skipped")
        pairs.insert(3, ("held", f"waits for a person: {next(skipped, 'no retry is scheduled')}"))
    ctx.print(fields(pairs))
    if not a.no_arguments:
        ctx.print("\narguments:")
        ctx.print(indent(_arguments_text(letter)))
    ctx.print("\nhistory:")
    ctx.print(indent(_history_text(letter, now)))
    ctx.print("\ntraceback:")
    ctx.print(indent(letter.traceback.rstrip() or "(none recorded)"))
    return 0


def _history_text(letter: DeadLetter, now: float) -> str:
    if not letter.history:
        return "(none recorded)"
    rows = []
    for a in letter.history:
        detail = "; ".join(part for part in (a.kind, a.error, a.note) if part)
        rows.append([when(a.at, now), a.what, a.actor or "-", detail])
    return table(["WHEN", "WHAT", "WHO", "DETAIL"], rows)


# -- changes --------------------------------------------------------------------------------


def cmd_retry(ctx: Context) -> int:
    """``dlq retry ID...`` or ``dlq retry --all FILTERS``: make letters due now."""
    a = ctx.args
    queue = ctx.queue()
    if not a.all:
        return _each(ctx, a.ids, lambda id: queue.requeue(id, actor=ctx.actor), "requeued")
    chosen = _filters(a)
    if not any(v is not None for v in chosen.values()) and not a.yes:
        raise CommandError(
            "--all without a filter would requeue every pending, retrying and abandoned dead "
            "letter; narrow it with --status, --kind, --function, --since or --until, or pass "
            "--yes"
        )
    count = queue.requeue_all(**chosen, actor=ctx.actor)
    ctx.show({"count": count}, f"requeued {plural(count, 'dead letter')}: due now")
    return 0


def _close(ctx: Context, mark: Callable[..., DeadLetter], done: str) -> int:
    note = " ".join((ctx.args.note or "").split())
    return _each(ctx, ctx.args.ids, lambda id: mark(id, note=note, actor=ctx.actor), done)


def cmd_resolve(ctx: Context) -> int:
    """``dlq resolve ID... [--note TEXT]``: close letters as RESOLVED by hand; the note
    and who did it go to each letter's history."""
    return _close(ctx, ctx.queue().mark_resolved, "resolved")


def cmd_abandon(ctx: Context) -> int:
    """``dlq abandon ID... [--note TEXT]``: close letters as ABANDONED (never retried)."""
    return _close(ctx, ctx.queue().mark_abandoned, "abandoned")


def _confirm(ctx: Context, question: str) -> bool:
    if ctx.json or not sys.stdin.isatty():
        return False
    print(f"{question} [y/N] ", end="", file=ctx.err, flush=True)
    try:
        answer = sys.stdin.readline()
    except (EOFError, OSError):
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_purge(ctx: Context) -> int:
    """``dlq purge``: delete old letters (by default resolved and abandoned ones older than
    the retention, 30 days)."""
    a = ctx.args
    queue = ctx.queue()
    older = queue.retention if a.older_than is None else a.older_than
    statuses = tuple(Status(s) for s in a.status) if a.status else CLOSED
    chosen = DeadLetterFilter(
        status=statuses,
        kind=tuple(a.kind or ()),
        function=tuple(a.function or ()),
        until=ctx.now - older,
    )
    store = queue.store
    count = sum(row.count for row in store.stats(chosen))
    what = (
        f"{plural(count, 'dead letter')} ({', '.join(s.value for s in statuses)}) whose last "
        f"failure is more than {span(older)} old"
    )
    if count == 0 or a.dry_run:
        said = f"would delete {what}" if count else f"nothing to purge: no {what[2:]}"
        ctx.show({"deleted": 0, "matched": count, "dry_run": bool(a.dry_run)}, said)
        return 0
    if not a.yes and not _confirm(ctx, f"Delete {what}?"):
        raise CommandError(
            f"would delete {what}; pass --yes to delete them (or --dry-run to count only)"
        )
    deleted = store.purge(chosen)
    said = f"deleted {plural(deleted, 'dead letter')}"
    ctx.show({"deleted": deleted, "matched": count, "dry_run": False}, said)
    return 0


# -- stats ----------------------------------------------------------------------------------


def _spooled(ctx: Context) -> int:
    """Letters waiting in this namespace's spool; a spool that cannot be read is said on
    stderr (a refused directory or file: see idempotask.spool), counted as none."""
    try:
        return len(ctx.queue().spool.letters())
    except (OSError, SpoolError) as exc:
        ctx.note(f"warning: the spool cannot be read: {exc}")
        return 0


def stats_json(stats: DeadLetterStats, hours: float, spooled: int) -> dict[str, Any]:
    """Stats as JSON: every count, and the (function, kind, status) rows they sum."""
    return {
        "hours": hours,
        "since": iso(stats.since, precise=True),
        "until": iso(stats.until, precise=True),
        "total": stats.total,
        "by_status": {s.value: n for s, n in stats.by_status.items()},
        "by_kind": dict(stats.by_kind),
        "by_function": dict(stats.by_function),
        "retries_failed": stats.retries_failed,
        "retries_succeeded": stats.retries_succeeded,
        "rows": [
            {
                "function": r.function,
                "kind": r.kind,
                "status": Status(r.status).value,
                "count": r.count,
                "retries_failed": r.retries,
                "retries_succeeded": r.resolved_by_retry,
            }
            for r in stats.rows
        ],
        "spooled": spooled,
    }


def cmd_stats(ctx: Context) -> int:
    """``dlq stats``: counts of recent letters by status, kind and function."""
    a = ctx.args
    stats = ctx.queue().stats(
        hours=a.hours, function=a.function or None, kind=a.kind or None, now=ctx.now
    )
    spooled = _spooled(ctx)
    if ctx.json:
        ctx.print(to_json(stats_json(stats, a.hours, spooled)))
        return 0
    ctx.print(
        f"Dead letters whose last failure is in the past {a.hours:g}h "
        f"({iso(stats.since)} to {iso(stats.until)}): {stats.total}"
    )
    # Statuses in their lifecycle order, not alphabetically.
    statuses = [(s.value, stats.by_status.get(s, 0)) for s in Status]
    kinds, functions = sorted(stats.by_kind.items()), sorted(stats.by_function.items())
    for title, counts in (("STATUS", statuses), ("KIND", kinds), ("FUNCTION", functions)):
        ctx.print()
        ctx.print(table([title, "COUNT"], [*counts, ("total", stats.total)], right="1"))
    if stats.rows:
        ctx.print()
        detail = [
            [r.function, r.kind, Status(r.status).value, r.count, r.retries, r.resolved_by_retry]
            for r in stats.rows
        ]
        headers = ["FUNCTION", "KIND", "STATUS", "COUNT", "FAILED REPLAYS", "RESOLVED BY REPLAY"]
        ctx.print(table(headers, detail, right="345"))
    ctx.print()
    ctx.print(f"Replays: {stats.retries_failed} failed again, {stats.retries_succeeded} succeeded.")
    if spooled:
        ctx.print(
            f"Spool: {plural(spooled, 'letter')} waiting for the store in {ctx.queue().spool.path}"
            f" (`{ctx.prog} dlq flush` delivers them)."
        )
    return 0


# -- process / flush ------------------------------------------------------------------------

_DETAIL = {
    "resolved": "replayed successfully",
    "completed": "the call had completed meanwhile: resolved without running",
    "enqueued": "handed to its framework",
}


def report_json(report: ProcessReport) -> dict[str, Any]:
    """A processor run as JSON: what was claimed, each letter's outcome, and ``note``:
    why nothing was claimed, when this process can replay nothing."""
    return {
        "claimed": report.claimed,
        "spool_delivered": report.spool_delivered,
        "note": report.note,
        "resolved": report.resolved,
        "failed": report.failed,
        "abandoned": report.abandoned,
        "held": [{"id": id, "reason": reason} for id, reason in report.held],
        "skipped": [{"id": id, "reason": reason} for id, reason in report.skipped],
        "results": [
            {
                "id": r.id,
                "function": r.function,
                "outcome": r.outcome,
                "reason": r.reason,
                "status": None if r.letter is None else r.letter.status.value,
                "next_retry_at": None if r.letter is None else iso(r.letter.next_retry_at),
            }
            for r in report.results
        ],
    }


def report_text(report: ProcessReport, now: float) -> str:
    """A processor run for people: a summary line, one row per claimed letter, then the
    full reason of each letter left alone (held, skipped, changed meanwhile)."""
    summary = (
        f"claimed {report.claimed}: {len(report.resolved)} resolved, {len(report.failed)} "
        f"failed, {len(report.abandoned)} abandoned, {len(report.held)} held, "
        f"{len(report.skipped)} skipped"
    )
    if report.spool_delivered:
        summary += f"; delivered {plural(report.spool_delivered, 'spooled letter')}"
    if not report.results:
        return summary if report.spool_delivered else "nothing due"
    rows = []
    for r in report.results:
        detail = _DETAIL.get(r.outcome, r.reason)
        if r.outcome == "failed" and r.letter is not None and r.letter.next_retry_at:
            detail = f"{r.reason}; next retry {relative(r.letter.next_retry_at, now)}"
        rows.append([r.outcome, r.id, r.function, clip(detail, 100)])
    text = summary + "\n" + table(["OUTCOME", "ID", "FUNCTION", "DETAIL"], rows)
    left = [r for r in report.results if r.outcome in ("held", "skipped", "conflict")]
    if left:
        text += "\n\nwhy:\n" + "\n".join(f"  {r.id} {r.outcome}: {r.reason}" for r in left)
    return text


def _due_now(ctx: Context, now: float) -> str:
    """Which functions have letters due now (counted among the first 1,000 open ones)."""
    letters = ctx.queue().query(status=("pending", "retrying"), limit=1000)
    due: dict[str, int] = {}
    for x in letters:
        if x.next_retry_at is not None and x.next_retry_at <= now:
            due[x.function] = due.get(x.function, 0) + 1
    if not due:
        return "no letter is due now"
    counted = ", ".join(f"{printable(name)} ({n})" for name, n in sorted(due.items()))
    more = " among the first 1,000 open ones" if len(letters) == 1000 else ""
    return f"{plural(sum(due.values()), 'letter')} due now{more}: {counted}"


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (a second signal interrupts at once)."""
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_process(ctx: Context) -> int:
    """``dlq process``: replay due letters once, or in a loop until SIGINT/SIGTERM."""
    a = ctx.args
    queue = ctx.queue()
    kinds, functions = tuple(a.kind or ()), tuple(a.function or ())
    chosen = DeadLetterFilter(kind=kinds, function=functions) if kinds or functions else None

    def run() -> ProcessReport:
        report = queue.process_due(limit=a.limit, lease=a.lease, filter=chosen)
        if report.note:
            # Nothing can be replayed by this process (no --import?): claiming letters
            # would only delay them for the processes that can.
            raise CommandError(f"{report.note}. {_due_now(ctx, time.time())}")
        return report

    if not a.loop:
        report = run()
        ctx.print(to_json(report_json(report)) if ctx.json else report_text(report, time.time()))
        return 0
    with _stop_on_signals() as stop:
        ctx.note(f"processing due dead letters every {span(a.interval)}; Ctrl-C stops")
        while not stop.is_set():
            try:
                report = run()
            except BackendError as exc:
                # A worker outlives an outage: say so and try again next round.
                ctx.note(f"warning: this round failed, trying again in {span(a.interval)}: {exc}")
            else:
                if ctx.json:
                    data = {"at": iso(time.time(), precise=True), **report_json(report)}
                    ctx.print(to_json(data, lines=True))
                elif report.results or report.spool_delivered:
                    ctx.print(f"{iso(time.time())} {report_text(report, time.time())}")
            stop.wait(a.interval)
    ctx.note("stopped")
    return 0


def _other_spools(path: str) -> dict[str, int]:
    """Namespace -> letters waiting, for the other namespaces' spools beside ``path``
    (a spool directory holds ``spool-<namespace>.jsonl`` per namespace)."""
    directory, name = os.path.split(path)
    if not (name.startswith("spool-") and name.endswith(".jsonl")):
        return {}
    found: dict[str, int] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return {}
    for other in names:
        if other == name or not (other.startswith("spool-") and other.endswith(".jsonl")):
            continue
        try:
            count = len(Spool(os.path.join(directory, other)).letters())
        except (OSError, SpoolError):
            continue
        if count:
            found[other[len("spool-") : -len(".jsonl")]] = count
    return found


def cmd_flush(ctx: Context) -> int:
    """``dlq flush``: deliver letters waiting in the local spool of the configured
    namespace to the store; say which other namespaces' spools hold letters."""
    queue = ctx.queue()
    delivered = queue.flush_spool()
    left = _spooled(ctx)
    others = _other_spools(queue.spool.path)
    data: dict[str, Any] = {"delivered": delivered, "waiting": left, "spool": queue.spool.path}
    if others:
        data["other_namespaces"] = others
    ctx.show(
        data,
        f"delivered {plural(delivered, 'spooled dead letter')}; {left} still waiting in "
        f"{queue.spool.path}",
        *(
            f"{plural(count, 'letter')} wait in the spool of namespace {namespace} "
            f"(spool-{namespace}.jsonl): `{ctx.prog} dlq flush --namespace {namespace}`"
            for namespace, count in others.items()
        ),
    )
    return 0

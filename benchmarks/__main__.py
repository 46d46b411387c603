"""Run the benchmarks and print one report: ``python -m benchmarks [options]``.

Suites: ``memory`` and ``sqlite`` (no server needed), ``redis`` (IDEMPOTASK_REDIS_URL; with
the peers on the same Redis), ``postgresql`` (IDEMPOTASK_POSTGRES_URL), ``mariadb``
(IDEMPOTASK_MYSQL_URL), ``http`` (the Idempotency-Key middlewares, in process and under
uvicorn; on Redis too when it answers), ``web`` (the dashboard's pages with 100,000 dead
letters on Redis and PostgreSQL; needs ``idempotask[web]``). Each row shows the figure,
its floor measured in the same run, and their ratio (or the added time, for in-process
figures), and its target, met or MISSED.
Latencies (lower is better), throughputs (higher is better) and memory amounts are in
tables of their own. A suite whose server is missing prints one "skipped" row saying why;
a busy machine (load average, CPU steal) is warned about at the top and the bottom.

Regenerate the README table with ``python -m benchmarks --markdown bench.md`` on a quiet
machine (``--wait-for-quiet 0.7`` waits for one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import http, memory, redis, sql, web
from benchmarks.report import (
    MISSED,
    Plan,
    Row,
    Skipped,
    busy_lines,
    cpu_times,
    header_lines,
    load_average,
    load_now,
    missed,
    section_lines,
    steal_share,
    verdict,
)

SUITES: dict[str, Callable[[Plan], list[Row]]] = {
    "memory": memory.rows,
    "redis": redis.rows,
    "postgresql": sql.postgres_rows,
    "sqlite": sql.sqlite_rows,
    "mariadb": sql.mysql_rows,
    "http": http.rows,
    "web": web.rows,
}


def _callers(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,16, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"caller counts must be ≥ 1, got {text!r}")
    return counts


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--only", action="append", choices=sorted(SUITES), help="run only these suites"
    )
    parser.add_argument(
        "--seconds",
        type=_seconds,
        help="length of each throughput run (default 2, or 0.3 with --quick)",
    )
    parser.add_argument(
        "--callers",
        type=_callers,
        default=(1, 4, 16),
        help="concurrent callers for throughput, comma-separated (default 1,4,16)",
    )
    parser.add_argument(
        "--no-peers", action="store_true", help="leave out Powertools, celery-once and Lock"
    )
    parser.add_argument(
        "--markdown", type=Path, metavar="PATH", help="also write the report to PATH"
    )
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        metavar="LOAD",
        help="first wait until the 1-minute load average is below LOAD (polls every 60 s)",
    )
    parser.add_argument(
        "--wait-max",
        type=_seconds,
        default=1200.0,
        metavar="SECONDS",
        help="give up waiting for quiet after this long and run anyway (default 1200)",
    )
    return parser


def _wait_for_quiet(threshold: float, limit: float) -> str:
    """Sleep until the 1-minute load is below ``threshold`` or ``limit`` seconds passed;
    return a note for the report when it never got there."""
    waited = 0.0
    while os.getloadavg()[0] >= threshold:
        if waited >= limit:
            return (
                f"- the 1-minute load average stayed at or above {threshold:g} for "
                f"{waited:.0f} s of waiting: run anyway, figures are noisier than usual"
            )
        print(
            f"waiting for the 1-minute load average ({os.getloadavg()[0]:.2f}) "
            f"to drop below {threshold:g}",
            file=sys.stderr,
            flush=True,
        )
        pause = min(60.0, limit - waited)
        time.sleep(pause)
        waited += pause
    return ""


def _targets(rows: list[Row]) -> list[str]:
    """The footer's account of the targets: how many were met, and each one missed."""
    judged = [row for row in rows if verdict(row) is not None]
    if not judged:
        return []
    misses = missed(judged)
    lines = [f"Targets: {len(judged) - len(misses)} of {len(judged)} met."]
    lines += [f"- {MISSED}: {row.what} (target {row.target})" for row in misses]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the chosen suites, print (and optionally write) the report."""
    args = sys.argv[1:] if argv is None else argv
    options = _parser().parse_args(args)
    plan = Plan(
        quick=options.quick,
        seconds=options.seconds or (0.3 if options.quick else 2.0),
        callers=options.callers,
        peers=not options.no_peers,
    )
    suites = options.only or list(SUITES)
    note = ""
    if options.wait_for_quiet is not None:
        note = _wait_for_quiet(options.wait_for_quiet, options.wait_max)

    report: list[str] = []

    def emit(*lines: str) -> None:
        for line in lines:
            print(line)
            report.append(line)
        sys.stdout.flush()  # a long run shows each suite as it finishes

    started = time.monotonic()
    header = header_lines(plan, suites, " ".join(["python -m benchmarks", *args]))
    if note:
        header.insert(-1, note)
    emit(*header)
    run_start = suite_start = cpu_times()
    steals: list[str] = []
    measured: list[Row] = []
    for name in suites:
        try:
            rows = SUITES[name](plan)
        except Exception as exc:  # a missing server skips its suite, loudly
            reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")
            emit(*section_lines(name, [Row(f"{name}: whole suite", Skipped(reason))]))
            continue
        measured += rows
        emit(*section_lines(name, rows))
        suite_end = cpu_times()
        share = steal_share(suite_start, suite_end)
        if share:
            steals.append(f"{name} {share}")
        suite_start = suite_end
    overall = steal_share(run_start, cpu_times())
    emit(
        f"Load average (1/5/15 min) at end: {load_average()}; "
        f"run took {time.monotonic() - started:.0f} s."
        + (
            f" CPU time taken by the hypervisor (steal) during the run: {overall} "
            f"({', '.join(steals)})."
            if overall
            else ""
        ),
        *_targets(measured),
        *busy_lines(load_now(), os.cpu_count() or 0, overall or None, when="at the end"),
    )
    if options.markdown is not None:
        options.markdown.write_text("\n".join(report) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a suite returns (rows) and how the report prints them: header, tables, footer.

The report stands on its own: it says what each floor is, prints latencies (lower is
better) apart from throughputs (higher is better) and memory amounts, marks every target
MISSED or met, and warns when the machine was busy while it ran.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata

from benchmarks.timing import Quantity, Rate, Timing

# A floor cheaper than this per call is in-process (a bare call, a hash): the ratio to
# it would be huge and meaningless, so the report gives the added microseconds instead.
IN_PROCESS_FLOOR_US = 20.0

# Distributions whose versions the header names when installed: the library, the
# drivers it runs on, and the peers it is compared with.
PACKAGES = (
    "idempotask",
    "redis",
    "hiredis",
    "SQLAlchemy",
    "psycopg",
    "psycopg-binary",
    "PyMySQL",
    "asyncmy",
    "aiosqlite",
    "aws-lambda-powertools",
    "celery",
    "celery-once",
    "starlette",
    "Jinja2",
)


@dataclass(frozen=True)
class Plan:
    """How much to measure: set from the command line, handed to every suite."""

    quick: bool = False
    seconds: float = 2.0  # length of one throughput run
    callers: tuple[int, ...] = (1, 4, 16)
    peers: bool = True

    @property
    def scale(self) -> int:
        """Divide sample counts by this (a quick run takes a quarter of the samples)."""
        return 4 if self.quick else 1


@dataclass(frozen=True)
class Skipped:
    """A figure that could not be measured here, with the reason; never a made-up number."""

    reason: str

    def __str__(self) -> str:
        return f"skipped: {self.reason}"


Figure = Timing | Rate | Quantity | Skipped


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure beside its floor measured in the same run."""

    what: str
    figure: Figure
    floor_name: str = ""
    floor: Timing | Rate | Quantity | None = None
    target: str = ""


def _value(figure: Timing | Rate | Quantity) -> str:
    if isinstance(figure, Timing):
        return f"{figure.median:.2f} µs"
    return str(figure)


def figure_text(figure: Figure) -> str:
    """The "median (p95)" cell."""
    if isinstance(figure, Timing):
        return f"{figure.median:.2f} µs ({figure.p95:.2f})"
    return str(figure)


def relation(figure: Figure, floor: Timing | Rate | Quantity | None) -> str:
    """The "ratio / added" cell: figure / floor, or the added µs per call for an
    in-process floor (for throughput, the added µs per call are 1/rate - 1/floor rate)."""
    if floor is None or isinstance(figure, Skipped):
        return ""
    if isinstance(figure, Timing) and isinstance(floor, Timing):
        if floor.median < IN_PROCESS_FLOOR_US:
            return f"+{figure.median - floor.median:.2f} µs"
        return f"{figure.median / floor.median:.2f}x"
    if isinstance(figure, Rate) and isinstance(floor, Rate):
        if figure.per_second <= 0 or floor.per_second <= 0:
            return ""
        floor_us = 1e6 / floor.per_second
        if floor_us < IN_PROCESS_FLOOR_US:
            return f"+{1e6 / figure.per_second - floor_us:.2f} µs/call"
        return f"{figure.per_second / floor.per_second:.2f}x"
    if isinstance(figure, Quantity) and isinstance(floor, Quantity) and floor.value:
        return f"{figure.value / floor.value:.2f}x"
    return ""


# -- targets ----------------------------------------------------------------------------------

MISSED = "MISSED"
_TARGET = re.compile(r"^(added )?(≤|<=|≥|>=|=|≈)\s*([\d.,]+)?\s*(x|µs|us)?\s*(.*)$")


def verdict(row: Row) -> bool | None:
    """Whether ``row`` meets its target: True, False (missed) or None (no target, no
    figure, or a target this report cannot read).

    Targets read: ``≤ 1.3x`` / ``≥ 2.5x`` (the ratio to the floor), ``≤ 4 µs`` (the
    median), ``added ≤ 8 µs`` (the median minus the floor's), ``≈ 1x`` (the ratio within
    10 %), ``= max_entries`` (the figure equals its floor).
    """
    match = _TARGET.match(row.target.strip())
    if match is None or isinstance(row.figure, Skipped):
        return None
    added, op, number, unit, rest = match.groups()
    if op == "=" and number is None:  # "= max_entries": the figure is its floor
        return _value_of(row.figure) == _value_of(row.floor) if row.floor is not None else None
    if number is None or rest:
        return None
    bound = float(number.replace(",", ""))
    if unit == "x":
        if row.floor is None or not _value_of(row.floor):
            return None
        measured = _value_of(row.figure) / _value_of(row.floor)
    elif unit in ("µs", "us") and isinstance(row.figure, Timing):
        measured = row.figure.median
        if added:
            if not isinstance(row.floor, Timing):
                return None
            measured -= row.floor.median
    else:
        return None
    if op in ("≤", "<="):
        return measured <= bound
    if op in ("≥", ">="):
        return measured >= bound
    if op == "≈":
        return abs(measured - bound) <= 0.1 * bound
    return measured == bound


def _value_of(figure: Timing | Rate | Quantity | Skipped) -> float:
    if isinstance(figure, Timing):
        return figure.median
    if isinstance(figure, Rate):
        return figure.per_second
    if isinstance(figure, Quantity):
        return figure.value
    return 0.0


def target_text(row: Row) -> str:
    """The "target" cell: the target and whether it was met, a miss in capitals."""
    if not row.target:
        return ""
    met = verdict(row)
    if met is None:
        return row.target
    return f"{row.target}: met" if met else f"{row.target}: **{MISSED}**"


def missed(rows: Iterable[Row]) -> list[Row]:
    """The rows whose target was missed."""
    return [row for row in rows if verdict(row) is False]


# -- tables ----------------------------------------------------------------------------------


def table_lines(rows: Iterable[Row]) -> list[str]:
    """Markdown table rows (without the column header) for ``rows``."""
    lines = []
    for row in rows:
        floor_value = _value(row.floor) if row.floor is not None else ""
        cells = [
            row.what,
            figure_text(row.figure),
            row.floor_name,
            floor_value,
            relation(row.figure, row.floor),
            target_text(row),
        ]
        # A pipe inside a reason (an exception text) would break the markdown row.
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


TABLE_HEADER = [
    "| what | median (p95) | floor | floor median | ratio / added | target |",
    "|---|---|---|---|---|---|",
]

# Each kind of figure gets a table of its own, titled with which way is better.
_KINDS: tuple[tuple[type, str, str], ...] = (
    (Timing, "Latency per call: lower is better", "median (p95)"),
    (
        Rate,
        "Throughput: higher is better (the ratio is the share of the floor's calls/s)",
        "calls/s",
    ),
    (Quantity, "Memory held: lower is better; a bound must hold exactly", "amount"),
    (Skipped, "Not measured", "why"),
)


def section_lines(suite: str, rows: list[Row]) -> list[str]:
    """One suite's part of the report: a heading, then a table per kind of figure."""
    lines = [f"### {suite}", ""]
    for kind, title, column in _KINDS:
        chosen = [row for row in rows if isinstance(row.figure, kind)]
        if chosen:
            header = TABLE_HEADER[0].replace("median (p95)", column)
            lines += [f"{title}.", "", header, TABLE_HEADER[1], *table_lines(chosen), ""]
    return lines


FLOORS = (
    "- floor: the same work done without idempotask, measured in the same run, batch by "
    "batch in turn with the figure: the least any library can spend on that store. A bare "
    "function call (or await) for the in-process figures; one `SET k v NX PX` through "
    "redis-py for Redis; one `INSERT … ON CONFLICT DO NOTHING` through psycopg in "
    "autocommit for PostgreSQL, `INSERT OR IGNORE` for SQLite, `INSERT IGNORE` for "
    "MariaDB; asyncio figures beside the same statement made by asyncio"
)


# -- the header: when, where, with what ---------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total() -> str:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / (1024 * 1024):.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return "RAM unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on the box skews every figure)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def cpu_times() -> tuple[int, ...] | None:
    """The machine's CPU time counters from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    return tuple(int(x) for x in fields[1:9])


def steal_share(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> str:
    """The share of CPU time the hypervisor took from this VM between two
    :func:`cpu_times` readings ("steal": our code and the servers ran slower by about as
    much, and the CPU-heavy figures most), or "" when unknown."""
    if before is None or after is None:
        return ""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(spent)
    return f"{100 * spent[7] / total:.1f}%" if total > 0 else ""


def package_versions() -> str:
    """``name version`` for each installed distribution in PACKAGES."""
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _redis_version() -> str:
    import redis as redis_py

    from benchmarks.redis import URL

    client = redis_py.Redis.from_url(URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        return f"Redis {client.info('server')['redis_version']}"
    finally:
        client.close()


def _postgres_version() -> str:
    import psycopg

    from benchmarks.sql import POSTGRES

    dsn = POSTGRES.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, connect_timeout=2) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return f"PostgreSQL {row[0] if row else '?'}"


def _mariadb_version() -> str:
    from benchmarks.sql import mysql_connect

    conn = mysql_connect(connect_timeout=2)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            row = cur.fetchone()
    finally:
        conn.close()
    return f"MariaDB/MySQL {row[0] if row else '?'}"


def server_versions(suites: Iterable[str]) -> str:
    """Versions of the servers the chosen suites use; "unreachable" when one does not answer."""
    probes = {
        "redis": ("Redis", _redis_version),
        "postgresql": ("PostgreSQL", _postgres_version),
        "mariadb": ("MariaDB/MySQL", _mariadb_version),
        "sqlite": ("SQLite", lambda: f"SQLite {sqlite3.sqlite_version}"),
    }
    found = []
    # The web suite runs on Redis and PostgreSQL.
    expanded = [part for s in suites for part in (("redis", "postgresql") if s == "web" else (s,))]
    for suite in dict.fromkeys(expanded):
        if suite not in probes:
            continue
        label, probe = probes[suite]
        try:
            found.append(probe())
        except Exception as exc:  # the suite itself will say why it is skipped
            found.append(f"{label} unreachable ({type(exc).__name__})")
    return ", ".join(found) or "none (in-process suites only)"


def header_lines(plan: Plan, suites: list[str], command: str) -> list[str]:
    """The report's opening: date, machine, software, how the run was made."""
    now = datetime.datetime.now(datetime.timezone.utc)
    cores = os.cpu_count() or 0
    mode = "quick" if plan.quick else "full"
    callers = ", ".join(str(n) for n in plan.callers)
    return [
        f"idempotask benchmarks, {now:%Y-%m-%d %H:%M} UTC, `{command}` ({mode} run)",
        "",
        f"- machine: {cores} cores, {_cpu_model()}, {_memory_total()}, "
        f"{platform.system()} {platform.release()} {platform.machine()}; "
        f"load average (1/5/15 min) at start {load_average()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}); "
        f"{package_versions()}",
        f"- servers on loopback: {server_versions(suites)}",
        f"- throughput: {plan.seconds:g} s per run with {callers} concurrent callers; "
        "the duplicate-heavy mix is 9 calls in 10 to one of 100 stored keys, "
        "1 in 10 a first call",
        FLOORS,
        "- ratio = figure / floor (for throughput, the share of the floor's calls/s); "
        "beside an in-process floor the added µs per call instead; a target is marked met "
        f"or {MISSED}",
        *busy_lines(load_now(), cores, None, when="at the start"),
        "",
    ]


# -- was the machine busy? -------------------------------------------------------------------

BUSY_LOAD = 0.7  # per core: above it, other work competes with the benchmark
BUSY_STEAL = 2.0  # percent of CPU time taken by the hypervisor


def load_now() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def busy_lines(load: float | None, cores: int, steal: str | None, *, when: str) -> list[str]:
    """A warning when the 1-minute load average per core or the CPU steal share says the
    machine was busy ``when`` (an empty list when it was quiet, or nothing is known)."""
    reasons = []
    if load is not None and cores and load / cores > BUSY_LOAD:
        reasons.append(f"1-minute load average {load:.2f} on {cores} cores {when}")
    if steal:
        share = float(steal.rstrip("%"))
        if share > BUSY_STEAL:
            reasons.append(f"the hypervisor took {steal} of the CPU time (steal)")
    if not reasons:
        return []
    return [
        f"- **WARNING: the machine was busy** ({'; '.join(reasons)}): figures are slower and "
        "noisier than on a quiet machine, the CPU-bound ones most; ratios to a floor "
        "measured alongside hold up better than microseconds. For figures to publish, run "
        "again with `--wait-for-quiet 0.7`"
    ]

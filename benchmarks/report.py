"""What a suite returns (rows) and how the report prints them: header, table, footer."""

from __future__ import annotations

import datetime
import os
import platform
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
            row.target,
        ]
        # A pipe inside a reason (an exception text) would break the markdown row.
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


TABLE_HEADER = [
    "| what | median (p95) | floor | floor median | ratio / added | target |",
    "|---|---|---|---|---|---|",
]


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
    for suite in suites:
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
        "- ratio = figure / floor (for throughput, the share of the floor's calls/s); "
        "beside an in-process floor the added µs per call instead",
        "",
    ]

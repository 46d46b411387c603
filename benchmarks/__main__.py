"""Run the benchmarks and print one table: ``python -m benchmarks [--quick] [--only NAME]``.

Suites: ``memory`` and ``sqlite`` (no server needed), ``redis`` (IDEMPOTASK_REDIS_URL),
``postgresql`` (IDEMPOTASK_POSTGRES_URL), ``mariadb`` (IDEMPOTASK_MYSQL_URL). Each row
shows the figure, its floor measured in the same run, and their ratio (or the added
time, for in-process figures).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from collections.abc import Callable

from benchmarks import memory, redis, sql

SUITES: dict[str, Callable[[bool], list[memory.Row]]] = {
    "memory": memory.rows,
    "redis": redis.rows,
    "postgresql": sql.postgres_rows,
    "sqlite": sql.sqlite_rows,
    "mariadb": sql.mysql_rows,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--only", action="append", choices=sorted(SUITES), help="run only these suites"
    )
    options = parser.parse_args(argv)
    print(
        f"idempotask benchmarks, {datetime.date.today()}, Python {platform.python_version()}, "
        f"{platform.machine()}, {platform.processor() or platform.system()}"
    )
    print()
    print("| what | median (p95) | floor | floor median | ratio / added | target |")
    print("|---|---|---|---|---|---|")
    for name in options.only or list(SUITES):
        try:
            rows = SUITES[name](options.quick)
        except Exception as exc:  # a missing server skips its suite, loudly
            print(f"| {name}: skipped ({type(exc).__name__}: {exc}) | | | | | |")
            continue
        for what, figure, floor_name, floor, target in rows:
            if floor is None:
                relation = ""
            elif floor.median < 20:  # in-process floor: report the added time
                relation = f"+{figure.median - floor.median:.2f} µs"
            else:
                relation = f"{figure.median / floor.median:.2f}x"
            floor_text = f"{floor.median:.2f} µs" if floor else ""
            print(
                f"| {what} | {figure.median:.2f} µs ({figure.p95:.2f}) | {floor_name} | "
                f"{floor_text} | {relation} | {target} |"
            )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

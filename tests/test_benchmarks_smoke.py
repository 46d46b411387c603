"""Smoke tests of ``python -m benchmarks``: it runs, and prints the report's rows.

No timing is asserted anywhere: the machines that run this are shared and noisy. What is
checked is the shape (every expected row, six cells each, figures that parse) and the
facts that do not depend on speed (the bounded store holds at most ``max_entries``; a
missing server gives a "skipped" row with a reason, never a number).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import Row, Skipped, relation, steal_share, table_lines
from benchmarks.timing import Quantity, Rate, Timing

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def _table(stdout: str) -> dict[str, list[str]]:
    """The report's table rows by their "what" cell (header and separator left out)."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| what |"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[cells[0]] = cells
    return rows


def _number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    assert found, (pattern, text)
    return int(found.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def memory_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """One quick memory-suite run (short throughput runs keep it to a few seconds)."""
    path = tmp_path_factory.mktemp("bench") / "bench.md"
    proc = _run("--quick", "--only", "memory", "--seconds", "0.1", "--markdown", str(path))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, path.read_text(encoding="utf-8")


def test_header_names_date_machine_and_versions(memory_report: tuple[str, str]) -> None:
    stdout, _ = memory_report
    head = stdout.split("| what |")[0]
    assert re.search(r"idempotask benchmarks, \d{4}-\d\d-\d\d \d\d:\d\d UTC", head)
    assert re.search(r"machine: \d+ cores, ", head)
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in head
    assert "idempotask " in head
    assert "load average (1/5/15 min) at start" in head
    assert "Load average (1/5/15 min) at end" in stdout
    if Path("/proc/stat").exists():
        assert re.search(r"hypervisor \(steal\) during the run: [\d.]+% \(memory [\d.]+%\)", stdout)


def test_memory_suite_prints_every_expected_row(memory_report: tuple[str, str]) -> None:
    rows = _table(memory_report[0])
    expected = [
        "key for a call with 3 small args",
        "memory: duplicate call, sync",
        "memory: first call, sync",
        "memory: duplicate call, async",
        "memory: first call, async",
    ]
    for mix in ("90% duplicates", "first calls"):
        expected += [
            f"memory: throughput, {mix}, 1 thread",
            f"memory: throughput, {mix}, 4 threads",
            f"memory: throughput, {mix}, 16 threads",
        ]
    for what in expected:
        assert what in rows, f"missing row {what!r}"
    for cells in rows.values():
        assert len(cells) == 6, cells
        assert "skipped" not in cells[1], cells
    for what in expected[1:5]:
        assert re.fullmatch(r"[\d.]+ µs \([\d.]+\)", rows[what][1]), rows[what]
        assert re.fullmatch(r"\+-?[\d.]+ µs", rows[what][4]), rows[what]
    for what in expected[5:]:
        assert re.fullmatch(r"[\d,]+ calls/s", rows[what][1]), rows[what]
        assert re.fullmatch(r"[\d,]+ calls/s", rows[what][3]), rows[what]


def test_memory_footprint_rows_and_bound(memory_report: tuple[str, str]) -> None:
    rows = _table(memory_report[0])
    per_record = next(c for w, c in rows.items() if w.startswith("memory: bytes per stored"))
    assert re.fullmatch(r"[\d.]+ (B|KiB)", per_record[1]), per_record
    held = next(c for w, c in rows.items() if w.startswith("memory: records held after"))
    cap, inserted = _number(r"max_entries=([\d,]+)", held[0]), _number(r"after ([\d,]+)", held[0])
    kept = int(held[1].split()[0].replace(",", ""))
    assert 0 < kept <= cap  # the bound itself, not a speed
    assert inserted == 5 * cap
    held_bytes = next(c for w, c in rows.items() if w.startswith("memory: bytes held after"))
    assert re.fullmatch(r"[\d.]+ (B|KiB|MiB) \(peak [\d.]+ (B|KiB|MiB)\)", held_bytes[1])


def test_markdown_file_is_the_printed_report(memory_report: tuple[str, str]) -> None:
    stdout, markdown = memory_report
    assert markdown == stdout


def test_unreachable_server_gives_a_skipped_row_not_a_number() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "IDEMPOTASK_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    proc = _run("--quick", "--only", "redis", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = _table(proc.stdout)
    assert list(rows) == ["redis: whole suite"]
    assert rows["redis: whole suite"][1].startswith("skipped: ")
    assert "Redis unreachable" in proc.stdout


def test_relation_and_rendering() -> None:
    slow, fast = Timing(30.0, 40.0, 10), Timing(20.0, 25.0, 10)
    assert relation(slow, fast) == "1.50x"
    assert relation(Timing(5.5, 6.0, 10), Timing(0.5, 0.6, 10)) == "+5.00 µs"
    assert relation(Rate(5_000, 10, 2.0), Rate(10_000, 20, 2.0)) == "0.50x"
    assert relation(Rate(100_000, 10, 1.0), Rate(1_000_000, 10, 1.0)) == "+9.00 µs/call"
    assert relation(Quantity(2, "records"), Quantity(2, "records")) == "1.00x"
    (line,) = table_lines([Row("peer: x", Skipped("ImportError: a | b"), "floor", fast)])
    assert "skipped: ImportError: a \\| b" in line
    assert line.count(" | ") == 5  # the escaped pipe does not add a column


def test_the_steal_share_is_the_hypervisors_part_of_the_cpu_time_between_readings() -> None:
    """The report says how much CPU time the hypervisor took during the run (on a shared
    VM the reason a run's figures are off): the steal counter's share of all time spent."""
    before = (100, 0, 50, 800, 10, 0, 5, 35)
    after = (160, 0, 70, 880, 10, 0, 5, 75)  # 200 jiffies in all, 40 of them stolen
    assert steal_share(before, after) == "20.0%"
    assert steal_share(before, before) == ""
    assert steal_share(None, after) == ""

"""The benchmark report stands on its own: a missed target is marked, latencies (lower is
better) are kept apart from throughputs (higher is better), the floor is explained, and a
busy machine is warned about. Nothing here measures anything."""

from __future__ import annotations

from benchmarks.report import (
    MISSED,
    Plan,
    Row,
    Skipped,
    busy_lines,
    header_lines,
    section_lines,
    target_text,
    verdict,
)
from benchmarks.timing import Quantity, Rate, Timing

FLOOR = Timing(100.0, 120.0, 10)
BARE = Timing(0.5, 0.6, 10)


def test_targets_are_judged_against_the_floor_or_the_figure() -> None:
    assert verdict(Row("dup", Timing(120.0, 130.0, 10), "SET", FLOOR, "≤ 1.3x")) is True
    assert verdict(Row("dup", Timing(140.0, 150.0, 10), "SET", FLOOR, "≤ 1.3x")) is False
    assert verdict(Row("peer", Timing(300.0, 310.0, 10), "ours", FLOOR, "≥ 2.5x")) is True
    assert verdict(Row("key", Timing(3.5, 4.0, 10), "md5", BARE, "≤ 4 µs")) is True
    assert verdict(Row("mem", Timing(9.0, 9.5, 10), "bare", BARE, "added ≤ 8 µs")) is False
    assert verdict(Row("mem", Timing(8.4, 9.5, 10), "bare", BARE, "added ≤ 8 µs")) is True
    held, cap = Quantity(20_000, "records"), Quantity(20_000, "records")
    assert verdict(Row("held", held, "max_entries", cap, "= max_entries")) is True
    assert verdict(Row("held", Quantity(20_001, "records"), "", cap, "= max_entries")) is False
    assert verdict(Row("bytes", Quantity(105, "B"), "", Quantity(100, "B"), "≈ 1x")) is True
    assert verdict(Row("rate", Rate(900, 9, 1.0), "", Rate(1000, 10, 1.0), "≥ 0.8x")) is True
    # Nothing to judge: no target, no figure, or a target the report cannot read.
    assert verdict(Row("x", Timing(1.0, 1.0, 1), "bare", BARE)) is None
    assert verdict(Row("x", Skipped("no server"), target="≤ 1.3x")) is None
    assert verdict(Row("x", Timing(1.0, 1.0, 1), "bare", BARE, "fast enough")) is None


def test_a_missed_target_is_marked_in_its_row() -> None:
    missed = Row("redis: duplicate", Timing(140.0, 150.0, 10), "SET NX PX", FLOOR, "≤ 1.3x")
    met = Row("redis: duplicate", Timing(120.0, 150.0, 10), "SET NX PX", FLOOR, "≤ 1.3x")
    assert target_text(missed) == f"≤ 1.3x: **{MISSED}**"
    assert target_text(met) == "≤ 1.3x: met"
    assert target_text(Row("x", Skipped("why"))) == ""


def test_latency_throughput_and_memory_are_tables_of_their_own() -> None:
    rows = [
        Row("memory: duplicate call", Timing(8.0, 9.0, 10), "bare call", BARE, "added ≤ 8 µs"),
        Row("memory: throughput", Rate(100_000, 10, 1.0), "bare call", Rate(4e6, 10, 1.0)),
        Row("memory: bytes per record", Quantity(482, "B")),
        Row("peer: x", Skipped("not installed")),
    ]
    text = "\n".join(section_lines("memory", rows))
    latency, rest = text.split("Throughput: higher is better", 1)
    throughput, rest = rest.split("Memory held: lower is better", 1)
    memory, skipped = rest.split("Not measured", 1)
    assert "Latency per call: lower is better" in latency
    assert "memory: duplicate call" in latency
    assert "memory: throughput" not in latency
    assert "memory: throughput" in throughput
    assert "| what | calls/s |" in throughput
    assert "bytes per record" in memory
    assert "not installed" in skipped


def test_the_header_says_what_the_floor_is() -> None:
    head = "\n".join(header_lines(Plan(quick=True), ["memory"], "python -m benchmarks"))
    assert "floor: the same work done without idempotask, measured in the same run" in head
    assert "SET k v NX PX" in head
    assert MISSED in head


def test_a_busy_machine_is_warned_about_and_a_quiet_one_is_not() -> None:
    assert busy_lines(0.5, 2, "0.0%", when="at the start") == []
    assert busy_lines(None, 2, None, when="at the end") == []
    (loaded,) = busy_lines(3.2, 2, None, when="at the start")
    assert "WARNING: the machine was busy" in loaded
    assert "1-minute load average 3.20 on 2 cores at the start" in loaded
    assert "--wait-for-quiet" in loaded
    (stolen,) = busy_lines(0.1, 2, "7.5%", when="at the end")
    assert "the hypervisor took 7.5% of the CPU time (steal)" in stolen

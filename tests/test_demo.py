"""The first command a newcomer runs: ``python -m idempotask demo`` shows the main job on
the embedded store in seconds and says what happened in plain words."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_every_scene_on_sqlite_and_says_what_happened() -> None:
    pytest.importorskip("sqlalchemy")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("IDEMPOTASK_")}
    # A generous bound, never asserted on: a stuck demo fails here instead of hanging.
    done = subprocess.run(
        [sys.executable, "-m", "idempotask", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
        check=False,
    )
    out = " ".join(done.stdout.split())  # wrapped paragraphs, read as one line
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""  # no log noise, no warnings
    assert "demo on a SQLite file" in out
    # 1. the duplicate
    assert "without running the body: the body ran once" in out
    # 2. the race: one process ran the body, the other got its result
    assert re.search(r"Process [AB] \(pid \d+\) claimed the key and ran the body", out)
    assert "returned 'receipt-8' too: the body ran once" in out
    # 3. the crash, taken over after the lease
    assert "died in the middle of it (exit code 17)" in out
    assert "took the key over, ran the body and returned 'parcel-9'" in out
    assert "The body ran 2 times in all" in out
    # 4. the dead letter, recorded then replayed
    assert "recorded as dead letter" in out
    assert "1 letter resolved, its status now resolved" in out
    assert "the mail went out once" in out
    assert "the SQLite file was deleted" in out


def test_the_demo_is_listed_in_the_commands_help() -> None:
    from idempotask.cli._parser import build_parser

    assert "demo" in build_parser().format_help()

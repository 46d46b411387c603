"""The public API keeps wrapped signatures for type checkers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _mypy(path: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_ordinary_usage_type_checks_under_mypy_strict() -> None:
    result = _mypy(HERE / "typing" / "api.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_argument_type_is_caught_by_mypy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from idempotask import idempotent\n"
        "@idempotent(ttl=5)\n"
        "def f(x: int) -> int:\n"
        "    return x\n"
        "f('not an int')\n"
    )
    result = _mypy(bad)
    assert result.returncode == 1
    assert 'incompatible type "str"' in result.stdout

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


def test_http_middlewares_type_check_where_frameworks_take_them() -> None:
    # Starlette's add_middleware types its factory with a positional-only app: a middleware
    # whose app could be passed by keyword was refused (README's FastAPI example).
    pytest.importorskip("starlette")
    result = _mypy(HERE / "typing" / "http_api.py")
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


def test_helpers_of_a_method_looked_up_on_an_instance_check_their_arguments(
    tmp_path: Path,
) -> None:
    """The bound helpers take the method's arguments without self, typed."""
    bad = tmp_path / "bad_method.py"
    bad.write_text(
        "from idempotask import idempotent\n"
        "class A:\n"
        "    @idempotent\n"
        "    def charge(self, amount: int) -> int:\n"
        "        return amount\n"
        "    @classmethod\n"
        "    @idempotent\n"
        "    def make(cls, n: int) -> str:\n"
        "        return ''\n"
        "A().charge.key_for('five')\n"
        "A().charge.forget(A(), 5)\n"
        "A.make.key_for('one')\n"
        "x: int = A().charge.using(key='h')(5)\n"
    )
    result = _mypy(bad)
    assert result.returncode == 1
    lines = {line.split(":")[1] for line in result.stdout.splitlines() if ": error:" in line}
    assert lines == {"10", "11", "12"}, result.stdout
    assert ':10: error: Argument 1 to "key_for"' in result.stdout
    assert ":11: error:" in result.stdout
    assert ':12: error: Argument 1 to "key_for"' in result.stdout

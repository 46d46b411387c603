"""The package's public face: ``import idempotask`` loads only what a plain
``@idempotent`` call needs; every public name stays importable (issue 14 §4)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import idempotask

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("breaker", "deadletter", "taxonomy", "retry", "spool")


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_plain_idempotent_call_loads_no_dead_letter_breaker_taxonomy_retry_or_spool() -> None:
    out = run(
        """
        import sys
        import idempotask

        idempotask.configure(backend="memory://")

        @idempotask.idempotent(ttl=60)
        def double(n: int) -> int:
            return 2 * n

        assert double(2) == double(2) == 4
        print(sorted(m for m in sys.modules if m.startswith("idempotask.")))
        """
    )
    loaded = eval(out)
    assert [m for m in loaded if m.split(".")[1] in OPTIONAL] == []


def test_every_public_name_is_importable_and_listed() -> None:
    for name in idempotask.__all__:
        assert getattr(idempotask, name) is not None, name
    assert set(idempotask.__all__) <= set(dir(idempotask))
    assert idempotask.DeadLetterQueue.__module__.startswith("idempotask.deadletter")
    assert idempotask.FailureKind("transient").value == "transient"


def test_star_import_gives_every_name_of_all() -> None:
    out = run(
        """
        namespace = {}
        exec("from idempotask import *", namespace)
        import idempotask
        missing = [n for n in idempotask.__all__ if n not in namespace]
        print(missing, namespace["dead_letter"].__module__)
        """
    )
    assert out.split(" ", 1)[0] == "[]"
    assert "idempotask.deadletter" in out


def test_an_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        idempotask.no_such_name  # type: ignore[attr-defined]  # noqa: B018

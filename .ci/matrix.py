"""The dependency matrix: our tests against the lowest and the newest driver releases.

`.ci/run` runs the whole suite against what `pip install -e '.[dev]'` resolves today (the
newest releases), then this script builds a second environment pinned to the lowest
versions our extras declare and runs the tests that touch each driver there. Each
dependency gets one line per end of the matrix, so a release that breaks us shows up as
a red line with its name and version:

    python .ci/matrix.py report newest reports/newest.xml   # lines from a finished run
    python .ci/matrix.py lowest                             # build, run, report

Exit status: 0 when every line is green, 1 otherwise.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LOWEST_VENV = Path(os.environ.get("IDEMPOTASK_LOWEST_VENV", "/tmp/idempotask-lowest"))


@dataclass(frozen=True)
class Group:
    """Dependencies whose releases a set of test files exercises."""

    packages: tuple[str, ...]
    tests: tuple[str, ...]  # globs, relative to the repository


GROUPS = (
    Group(
        ("redis",),
        (
            "tests/backends/test_redis*.py",
            "tests/backends/test_fallback*.py",
            "tests/faults/test_redis*.py",
        ),
    ),
    Group(
        ("sqlalchemy", "psycopg", "pymysql", "asyncmy", "aiomysql", "aiosqlite"),
        ("tests/backends/test_sql*.py", "tests/faults/test_postgres*.py"),
    ),
    Group(("celery", "kombu"), ("tests/integrations/test_celery*.py",)),
    Group(("rq",), ("tests/integrations/test_rq*.py",)),
    Group(("dramatiq",), ("tests/integrations/test_dramatiq*.py",)),
    Group(("tenacity",), ("tests/test_retry*.py",)),
    Group(("prometheus-client", "opentelemetry-api"), ("tests/test_observability*.py",)),
    Group(("django",), ("tests/http/test_*.py", "tests/django/test_*.py")),
    Group(("starlette", "jinja2", "uvicorn", "a2wsgi"), ("tests/web/test_*.py",)),
)

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)")


# Extras of tools for our own tests and benchmarks, not drivers a user installs with us.
_TOOL_EXTRAS = {"dev", "bench", "all"}
# Pinned beside the floors: Celery 5.3's own kombu. pip would pair celery 5.3 with the
# newest kombu, whose Redis transport refuses redis-py below 6.1 (kombu's requirement,
# not ours), so the lowest end would test a combination no Celery 5.3 user runs.
_COMPANIONS = {"kombu": "5.3.0"}


def lowest_pins() -> dict[str, str]:
    """``name -> version`` for every ``name>=version`` the user-facing extras declare."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins: dict[str, str] = {}
    for extra, requirements in project["optional-dependencies"].items():
        if extra in _TOOL_EXTRAS:
            continue
        for requirement in requirements:
            match = _REQUIREMENT.match(requirement)
            if match and match.group(1).lower() != "idempotask":
                name = match.group(1).lower().replace("_", "-")
                pins[name] = max(pins.get(name, match.group(3)), match.group(3), key=_version)
    return {**pins, **_COMPANIONS}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def test_files(group: Group) -> list[str]:
    found: list[str] = []
    for pattern in group.tests:
        found.extend(sorted(glob.glob(str(ROOT / pattern))))
    return [os.path.relpath(path, ROOT) for path in found]


def installed(python: str, packages: tuple[str, ...]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try: print(name, m.version(name))\n"
        "    except m.PackageNotFoundError: print(name, '-')\n"
    )
    out = subprocess.run(
        [python, "-c", code, *packages], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def outcomes(junit: Path) -> dict[str, list[tuple[str, str]]]:
    """test file -> [(test name, "passed" | "failed" | "skipped")]."""
    by_file: dict[str, list[tuple[str, str]]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        classname = case.get("classname", "")
        path = classname.replace(".", "/")
        while path and not (ROOT / f"{path}.py").exists():
            path = path.rpartition("/")[0]
        state = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            state = "failed"
        elif case.find("skipped") is not None:
            state = "skipped"
        by_file.setdefault(f"{path}.py", []).append((f"{classname}::{case.get('name')}", state))
    return by_file


def report(label: str, junit: Path, python: str = sys.executable) -> bool:
    """Print one line per dependency group; True when all are green."""
    results = outcomes(junit) if junit.exists() else {}
    green = True
    print(f"\n== dependency matrix: {label} releases")
    for group in GROUPS:
        versions = installed(python, group.packages)
        names = ", ".join(f"{p} {versions.get(p, '-')}" for p in group.packages)
        cases = [c for f in test_files(group) for c in results.get(f, [])]
        failed = [name for name, state in cases if state == "failed"]
        passed = sum(state == "passed" for _, state in cases)
        if not cases:
            green = False
            print(f"RED    {label:<7} {names}: no test of this group ran")
        elif failed:
            green = False
            print(f"RED    {label:<7} {names}: {len(failed)} failed, {passed} passed")
            for name in failed[:20]:
                print(f"         {name}")
        else:
            print(f"green  {label:<7} {names}: {passed} passed")
    return green


def lowest() -> bool:
    """Build the lowest-versions environment, run each group's tests there, report."""
    python = str(LOWEST_VENV / "bin" / "python")
    if not Path(python).exists():
        subprocess.run([sys.executable, "-m", "venv", str(LOWEST_VENV)], check=True)
    pins = lowest_pins()
    constraints = LOWEST_VENV / "lowest-constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
    print("lowest declared versions: " + ", ".join(f"{n}=={v}" for n, v in sorted(pins.items())))
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    install = [*pip, "-c", str(constraints), "-e", f"{ROOT}[dev]"]
    if subprocess.run(install, cwd=ROOT, check=False).returncode != 0:
        print(f"\n== dependency matrix: lowest releases\nRED    lowest  cannot install {pins}")
        return False
    junit = ROOT / "reports" / "lowest.xml"
    junit.parent.mkdir(exist_ok=True)
    files = sorted({f for group in GROUPS for f in test_files(group)})
    subprocess.run(
        [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--continue-on-collection-errors",
            f"--junitxml={junit}",
            *files,
        ],
        cwd=ROOT,
        check=False,
    )
    return report("lowest", junit, python)


def main(argv: list[str]) -> int:
    if argv[:1] == ["lowest"]:
        return 0 if lowest() else 1
    if argv[:1] == ["report"] and len(argv) == 3:
        return 0 if report(argv[1], Path(argv[2])) else 1
    if argv[:1] == ["pins"]:
        for name, version in sorted(lowest_pins().items()):
            print(f"{name}=={version}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

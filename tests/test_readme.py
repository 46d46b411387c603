"""The README's Python examples work as pasted.

Every ```python block must compile and define every name it uses (imports included: a
reader pastes one block, not the page). Blocks that need no server are marked with an
HTML comment on the line before their fence, ``<!-- readme-test: run -->``, and are run,
each in a fresh interpreter; the others (Redis, PostgreSQL, a broker, your own module)
are only compiled and checked for names.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUN_MARK = "<!-- readme-test: run -->"


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    source: str
    run: bool

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of ``text``, with whether the line before marks them to run."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            marked = start > 0 and lines[start - 1].strip() == RUN_MARK
            blocks.append(Block(start + 1, "\n".join(body) + "\n", marked))
        i += 1
    return blocks


def undefined_names(source: str) -> set[str]:
    """Names a block loads but never binds (by import, assignment, def, class, parameter,
    loop or with target...) and that are not builtins. Scopes are not told apart: a name
    bound anywhere in the block counts as defined."""
    tree = ast.parse(source)
    bound: set[str] = set()
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return used - bound - set(dir(builtins))


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_examples_and_some_run() -> None:
    assert len(BLOCKS) > 10
    assert any(block.run for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_every_python_example_compiles(block: Block) -> None:
    compile(block.source, str(block), "exec")


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_every_python_example_defines_what_it_uses(block: Block) -> None:
    missing = undefined_names(block.source)
    assert not missing, (
        f"{block} uses {', '.join(sorted(missing))} without importing or defining it; "
        "a reader pastes the block alone"
    )


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.run], ids=str)
def test_examples_that_need_no_server_run_as_pasted(block: Block, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPOTASK_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", block.source],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{block} failed:\n{done.stderr}"


def test_the_checker_finds_what_a_block_leaves_undefined() -> None:
    source = (
        "from idempotask import idempotent\n"
        "@idempotent(ttl=60)\n"
        "def f(job_id: int, day: date) -> dict:\n"
        "    return payments.charge(job_id)\n"
        "for i in range(3):\n"
        "    f(i, day=today)\n"
    )
    assert undefined_names(source) == {"date", "payments", "today"}
    (block,) = python_blocks(f"x\n{RUN_MARK}\n```python\nprint(1)\n```\n")
    assert (block.line, block.run, block.source) == (3, True, "print(1)\n")
    assert re.fullmatch(r"README\.md:\d+", str(block))

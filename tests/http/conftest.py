"""Fixtures of the HTTP tests: a run log, and real servers started on demand."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ._servers import Server

StartServer = Callable[..., Server]


@pytest.fixture(scope="module")
def runlog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file the servers' handlers append their runs to."""
    return tmp_path_factory.mktemp("http") / "runs.log"


@pytest.fixture(scope="module")
def start_server(runlog: Path) -> Iterator[StartServer]:
    """``start_server(kind, store_url=..., namespace=..., lease=...)``: a started server
    whose handlers write to ``runlog``; every server is stopped at the end."""
    started: list[Server] = []

    def start(
        kind: str,
        *,
        store_url: str = "memory://",
        namespace: str | None = None,
        lease: float = 60.0,
    ) -> Server:
        env = {
            "IDEMPOTASK_URL": store_url,
            "HTTP_TEST_NAMESPACE": namespace or f"http{uuid.uuid4().hex[:10]}",
            "HTTP_TEST_LEASE": str(lease),
            "HTTP_TEST_RUNLOG": str(runlog),
        }
        server = Server(kind, env, runlog.with_name(f"{kind}-server.log"))
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def runs(runlog: Path, tag: str, what: str = "start") -> int:
    """How many times a handler logged ``what`` for ``tag``."""
    if not runlog.exists():
        return 0
    line = f"{tag} {what}"
    return sum(1 for x in runlog.read_text().splitlines() if x == line)


def new_tag() -> str:
    """A path segment no other test uses."""
    return uuid.uuid4().hex[:12]

"""What the integration tests share: polling, worker processes and the Redis they use.

A worker is a real framework process started in its own session, so that it and every
process it forks form one process group that can be stopped as a whole (SIGTERM, then
SIGKILL) whatever the test did; its output goes to a log file the test can read.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

import idempotask
from idempotask.backends.base import State
from idempotask.serializers import get_serializer

ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``condition`` until it is truthy and return its value; fail naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.02
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.2)


def in_threads(target: Callable[[int], object], count: int) -> None:
    """Run ``target(0)`` ... ``target(count - 1)`` in ``count`` threads at once and wait
    for all of them."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query string."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"


# ----------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------


def worker_env(**env: str) -> dict[str, str]:
    """The environment of a worker: this one, with the repository importable (the test
    modules the worker loads), every warning shown in its log, and ``env``."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "default",
        **env,
    }


def start_worker(
    cmd: list[str], env: dict[str, str], log: Path, *, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Run ``cmd`` in a new session (its own process group), output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _descendants(pid: int) -> list[int]:
    """``pid``'s descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_worker(
    proc: subprocess.Popen[bytes], sig: signal.Signals, *, descendants: bool = False
) -> None:
    """Send ``sig`` to the worker's process group; with ``descendants``, also to the
    groups of every process below it (RQ runs each work horse in a group of its own,
    which killing the worker's group does not reach)."""
    groups = {proc.pid}
    if descendants:
        for pid in _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)


def stop_worker(proc: subprocess.Popen[bytes], *, descendants: bool = False) -> None:
    """SIGTERM the worker's process group (see :func:`kill_worker`), then SIGKILL it if
    it is still running after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        kill_worker(proc, sig, descendants=descendants)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def read_logs(paths: Iterable[Path]) -> str:
    """The workers' logs, one after the other."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(paths))


# ----------------------------------------------------------------------------------------
# Redis: counters, stored results, cleanup
# ----------------------------------------------------------------------------------------


def counter_value(conn: Redis, key: str) -> int:
    """A run counter the task bodies increment (0 before the first run)."""
    return int(conn.get(key) or 0)


def stored(key: str) -> Any:
    """The result the configured store holds, completed, under ``key``."""
    record = idempotask.config.get_backend().get(key)
    assert record is not None
    assert record.state is State.COMPLETED
    return get_serializer("json").loads(record.payload)


def delete_keys(url: str, pattern: str) -> None:
    """Delete every key of the Redis at ``url`` that matches ``pattern``."""
    conn = Redis.from_url(url)
    try:
        keys = list(conn.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            conn.delete(*keys[i : i + 500])
    finally:
        conn.close()

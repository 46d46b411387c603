"""Celery under Django: a real project (``app.config_from_object("django.conf:settings",
namespace="CELERY")``, ``autodiscover_tasks()``), a real ``celery worker`` process, a
transactional ``IdempotentTask`` writing with the ORM; every order sent three times is
charged once, and a failing task leaves no writes and a dead letter in the Django
database, on PostgreSQL and on SQLite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import service_url
from tests.django._project import base_settings, environment, run, write_project
from tests.django._support import RUN, fresh_pg_database

pytest.importorskip("django")
pytest.importorskip("celery")


@pytest.fixture(params=["pg", "sqlite"])
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    if request.param == "sqlite":
        yield {
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(tmp_path / "db.sqlite3"),
                "OPTIONS": {"timeout": 30},
            }
        }
        return
    url = service_url("postgres")
    with fresh_pg_database(url, f"idempotask_djc_{RUN}_{uuid.uuid4().hex[:6]}") as params:
        yield {"default": {"ENGINE": "django.db.backends.postgresql", **params}}


@contextlib.contextmanager
def worker(root: Path, queue: str) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A proj worker`` in its own process group, stopped by its pid."""
    log = root / "worker.log"
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "proj",
        "worker",
        "--pool=prefork",
        "--concurrency=2",
        "-Q",
        queue,
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "-l",
        "WARNING",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=environment(root),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def test_duplicate_tasks_are_charged_once(tmp_path: Path, databases: dict[str, Any]) -> None:
    redis_url = service_url("redis")
    namespace = f"djc{uuid.uuid4().hex[:10]}"
    settings = base_settings(
        databases,
        IDEMPOTASK={"backend": "default", "namespace": namespace, "sqlite_transactions": True},
        CELERY_BROKER_URL=redis_url,
        CELERY_RESULT_BACKEND=redis_url,
        CELERY_TASK_DEFAULT_QUEUE=namespace,
        CELERY_BROKER_TRANSPORT_OPTIONS={"global_keyprefix": f"{namespace}:broker:"},
        CELERY_RESULT_EXPIRES=600,
        CELERY_WORKER_HIJACK_ROOT_LOGGER=False,
    )
    root = write_project(tmp_path / "site", settings)
    for args in (("makemigrations", "shop"), ("migrate",)):
        done = run(root, "manage.py", *args)
        assert done.returncode == 0, done.stdout + done.stderr
    orders = [f"order-{i}" for i in range(5)]
    with worker(root, namespace) as process:
        done = run(root, "send.py", *orders, timeout=120)
        log = (root / "worker.log").read_text(errors="replace")[-3000:]
        assert process.poll() is None, log
    assert done.returncode == 0, done.stderr + log
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["counts"] == dict.fromkeys(orders, 1)
    by_order: dict[str, set[int]] = {}
    for order, result in answer["results"]:
        assert result["order"] == order
        by_order.setdefault(order, set()).add(result["payment"])
    assert all(len(ids) == 1 for ids in by_order.values())
    # A task that fails: its writes rolled back, a dead letter in the Django database.
    assert answer["refunds"] == 0
    # LookupError is a permanent failure: recorded, not scheduled for a retry.
    assert answer["letters"] == [["shop.tasks.refund", "builtins.LookupError", "abandoned"]]

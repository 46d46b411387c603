"""What the test apps' handlers write down, and the options every test app shares.

Each server runs in a process of its own (so a test can kill it); its handlers append
one line per event to the run log named by ``HTTP_TEST_RUNLOG``, which the tests read to
count how often a handler ran. Options come from the environment the test gives the
server: ``IDEMPOTASK_URL`` (the store), ``HTTP_TEST_NAMESPACE``, ``HTTP_TEST_LEASE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from typing import Any

RUNLOG = os.environ.get("HTTP_TEST_RUNLOG", os.devnull)
DOCS = "https://api.example.com/docs/idempotency"
MAX_RESPONSE = 64 * 1024
MARKED_WAIT = 20.0


def record(tag: str, what: str) -> None:
    """Append ``tag what`` to the run log (one small O_APPEND write: atomic)."""
    fd = os.open(RUNLOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag} {what}\n".encode())
    finally:
        os.close(fd)


def should_fail(tag: str) -> bool:
    """Whether the test asked the handler for ``tag`` to raise (a flag file)."""
    return os.path.exists(f"{RUNLOG}.fail-{tag}")


def held(tag: str) -> bool:
    """Whether the test asks the handler for ``tag`` to keep running (a flag file);
    a minute at most."""
    return os.path.exists(f"{RUNLOG}.hold-{tag}")


def hold(tag: str) -> None:
    """Keep running while :func:`held` (sync handlers)."""
    for _ in range(1200):
        if not held(tag):
            return
        time.sleep(0.05)


def answer(tag: str, body: bytes) -> bytes:
    """A response body unique to this run of the handler (a replay repeats its run id)."""
    return json.dumps(
        {
            "tag": tag,
            "run": uuid.uuid4().hex,
            "sha256": hashlib.sha256(body).hexdigest(),
            "len": len(body),
        }
    ).encode()


def options(**extra: Any) -> dict[str, Any]:
    """The middleware options every test app uses (``scope=`` is each framework's own)."""
    return {
        "routes": ["POST /orders/{tag}", "POST /stream/{tag}"],
        "required": True,
        "docs_url": DOCS,
        "lease": float(os.environ.get("HTTP_TEST_LEASE", "60")),
        "namespace": os.environ.get("HTTP_TEST_NAMESPACE", "idempotask"),
        "max_response_bytes": MAX_RESPONSE,
        **extra,
    }


def stream_chunks(tag: str, size: int) -> list[bytes]:
    """``size`` random bytes in 4 KiB chunks: a replay can only repeat them if kept."""
    record(tag, "start")
    chunks = [os.urandom(min(4096, size - i)) for i in range(0, size, 4096)]
    record(tag, "done")
    return chunks

"""Shared test setup: a fresh configuration per test, and access to real services.

Services are found through IDEMPOTASK_REDIS_URL, IDEMPOTASK_POSTGRES_URL,
IDEMPOTASK_MYSQL_URL and IDEMPOTASK_AMQP_URL. A missing service skips its tests with
the reason, unless IDEMPOTASK_REQUIRE_SERVICES=1 (as in CI), where it fails them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

import idempotask
from idempotask import config as idem_config
from idempotask import events

SERVICE_URLS = {
    "redis": ("IDEMPOTASK_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "postgres": ("IDEMPOTASK_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mysql": ("IDEMPOTASK_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
    "amqp": ("IDEMPOTASK_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}


def unavailable(reason: str) -> None:
    """Skip the test because something it needs is missing (a service, a server binary),
    or fail it under IDEMPOTASK_REQUIRE_SERVICES=1 (as in CI), where nothing may be."""
    if os.environ.get("IDEMPOTASK_REQUIRE_SERVICES") == "1":
        pytest.fail(f"IDEMPOTASK_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(reason)


def service_url(name: str) -> str:
    """The URL of a service, or skip (fail under IDEMPOTASK_REQUIRE_SERVICES=1) when it
    does not accept connections."""
    env, default = SERVICE_URLS[name]
    url = os.environ.get(env, default)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    try:
        with socket.create_connection((host, port or 0), timeout=2):
            pass
    except OSError as exc:
        unavailable(f"{name} is not reachable at {host}:{port} ({env}={url}): {exc}")
    return url


@pytest.fixture(autouse=True)
def fresh_config() -> Iterator[None]:
    """Each test starts from the defaults with its own in-memory store, and leaves no
    event listener behind."""
    idem_config.reset()
    idempotask.configure(backend="memory://")
    listeners = events.listeners
    yield
    events.listeners = listeners
    idem_config.reset()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the long soak tests too")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow soak test; run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

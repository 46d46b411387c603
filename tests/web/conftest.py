"""The dashboard's test setup: real stores with letters written by real ``@dead_letter``
failures, the app served by uvicorn on a loopback port, and Debian's Chromium driven by
Playwright (``apt-get install chromium``; Playwright's own browser downloads are not
used)."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the dashboard needs pip install 'idempotask[web]'")

import idempotask
from idempotask import DeadLetterQueue, dead_letter, idempotent
from idempotask.backends.base import DeadLetterFilter, ProvidesStores
from idempotask.config import resolve_backend
from tests.conftest import service_url

CHROMIUM = os.environ.get("IDEMPOTASK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """An app served by uvicorn in a thread of the test process."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_app(app: Any, host: str = "127.0.0.1") -> Served:
    """Serve ``app`` (ASGI) on a free loopback port until ``stop()``."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return Served(f"http://{host}:{port}", server, thread)


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """``serve(app)`` starts a server; every one started is stopped after the test."""
    started: list[Served] = []

    def start(app: Any, host: str = "127.0.0.1") -> Served:
        served = serve_app(app, host)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright. Per module, not per session:
    Playwright's sync API keeps an event loop running while it is open, which would make
    every asyncio test that runs after it in the same session fail."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        message = f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
        if os.environ.get("IDEMPOTASK_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context and page; the page's script errors fail the test."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.set_default_timeout(15_000)
    yield tab
    context.close()
    assert not errors, errors


STORES = {
    "redis": lambda: service_url("redis"),
    "postgres": lambda: service_url("postgres"),
}


@dataclass
class Shop:
    """A namespace of its own on a real store, configured as the process's store, with
    ``@dead_letter`` functions whose failures become the letters under test."""

    name: str
    url: str
    namespace: str
    backend: Any
    queue: DeadLetterQueue
    functions: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, Callable[[int], BaseException]] = field(default_factory=dict)
    succeeds: set[int] = field(default_factory=set)  # orders whose next run succeeds

    def fail(self, function: str, orders: range | list[int], reason: str = "timeout") -> None:
        """Call ``function`` for each order, each call failing for real with ``reason``."""
        fn = self.functions[function]
        for order in orders:
            error = type(self.errors[reason](order))
            with pytest.raises(error):
                fn(order, reason)

    def ids(self, **filters: Any) -> list[str]:
        return [x.id for x in self.queue.query(limit=1000, **filters)]


@pytest.fixture(params=sorted(STORES))
def shop(request: pytest.FixtureRequest) -> Iterator[Shop]:
    """Redis, then PostgreSQL: a fresh namespace, configured, with two functions."""
    url = STORES[request.param]()
    namespace = f"web{uuid.uuid4().hex[:8]}"
    idempotask.configure(backend=url, namespace=namespace)
    backend = resolve_backend(url)
    assert isinstance(backend, ProvidesStores)
    for store in (backend, backend.dead_letter_store(namespace=namespace)):
        create = getattr(store, "create_tables", None)
        if create is not None:
            create()
    breakers = backend.breaker_store(namespace=namespace)
    create = getattr(breakers, "create_tables", None)
    if create is not None:
        create()
    queue = DeadLetterQueue()
    shop = Shop(request.param, url, namespace, backend, queue)
    shop.errors.update(
        timeout=lambda order: TimeoutError(f"gateway timed out for order {order}"),
        declined=lambda order: ValueError(f"card declined for order {order}"),
    )

    def make(short: str) -> Any:
        @dead_letter(name=f"{namespace}.{short}", redact=idempotask.keep_all)
        @idempotent(name=f"{namespace}.{short}", ttl=600)
        def call(order: int, reason: str) -> str:
            if order not in shop.succeeds:
                raise shop.errors[reason](order)
            return f"done {order}"

        return call

    shop.functions = {short: make(short) for short in ("charge", "ship")}
    yield shop
    queue.store.purge(DeadLetterFilter())


def from_address(app: Any, host: tuple[str, int]) -> Any:
    """``app`` as if every request came from ``host`` (what a server puts in the ASGI
    scope's ``client``), for in-process clients of any Starlette version."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "client": host}
        await app(scope, receive, send)

    return wrapped

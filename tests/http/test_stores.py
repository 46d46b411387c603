"""The guarantee on shared stores: Redis and PostgreSQL, servers in several processes.

Two server processes share one store (a unique namespace, or a unique table, per test),
so retries spread over both still run the handler once; a server killed in the middle
of a request leaves its claim behind, and the next retry runs once that claim's lease
has run out -- not before, and not twice.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import service_url

from ._servers import KINDS
from .conftest import StartServer, new_tag, runs
from .test_semantics import post, wait_for

STORES = ("redis", "postgres")


@pytest.fixture(scope="module", params=STORES)
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The store's URL: Redis as is (each test has its own namespace), PostgreSQL with
    tables of this module's own, dropped at the end."""
    if request.param == "redis":
        yield service_url("redis")
        return
    from idempotask.backends.sql import SQLAlchemyBackend

    base = service_url("postgres")
    table = f"http_{uuid.uuid4().hex[:10]}"
    store = SQLAlchemyBackend(
        base, table_name=table, dead_letter_table=f"{table}_dl", breaker_table=f"{table}_br"
    )
    store.create_tables()
    try:
        yield f"{base}?table={table}&dead_letter_table={table}_dl&breaker_table={table}_br"
    finally:
        store.drop_tables()
        store.dead_letter_store().drop_tables()
        store.breaker_store().drop_tables()
        store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_twenty_concurrent_retries_over_two_worker_processes_run_the_handler_once(
    kind: str, store_url: str, start_server: StartServer, runlog: Path
) -> None:
    namespace = f"http{uuid.uuid4().hex[:10]}"
    workers = [start_server(kind, store_url=store_url, namespace=namespace) for _ in range(2)]
    tag, key = new_tag(), str(uuid.uuid4())
    barrier = threading.Barrier(20)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        barrier.wait()
        response = post(workers[i % 2], f"/marked/{tag}?sleep=0.5", key)
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for worker in workers:
        worker.stop()
    assert {r.status_code for r in answers} == {201}
    assert len({r.content for r in answers}) == 1
    assert sum("idempotent-replayed" in r.headers for r in answers) == 19
    assert runs(runlog, tag) == 1


@pytest.mark.parametrize("kind", ["fastapi", "flask"])
def test_a_handler_exception_releases_the_key_on_the_store(
    kind: str, store_url: str, start_server: StartServer, runlog: Path
) -> None:
    server = start_server(kind, store_url=store_url)
    tag, key = new_tag(), str(uuid.uuid4())
    flag = Path(f"{runlog}.fail-{tag}")
    flag.touch()
    try:
        assert post(server, f"/orders/{tag}", key).status_code == 500
    finally:
        flag.unlink()
    retry = post(server, f"/orders/{tag}", key)
    assert retry.status_code == 201
    assert post(server, f"/orders/{tag}", key).content == retry.content
    server.stop()
    assert runs(runlog, tag) == 2


@pytest.mark.parametrize("kind", ["fastapi", "flask", "django"])
def test_a_worker_killed_mid_request_lets_the_next_retry_run_once_after_the_lease(
    kind: str, store_url: str, start_server: StartServer, runlog: Path
) -> None:
    lease = 4.0
    namespace = f"http{uuid.uuid4().hex[:10]}"
    tag, key = new_tag(), str(uuid.uuid4())
    path = f"/orders/{tag}"
    first = start_server(kind, store_url=store_url, namespace=namespace, lease=lease)
    hold = Path(f"{runlog}.hold-{tag}")
    hold.touch()
    lost: list[BaseException] = []

    def doomed() -> None:
        try:
            post(first, path, key)
        except httpx.HTTPError as exc:  # the server dies under it
            lost.append(exc)

    thread = threading.Thread(target=doomed)
    thread.start()
    try:
        wait_for(lambda: runs(runlog, tag) == 1)
        time.sleep(lease / 2)  # past a renewal or two: the claim outlives a lease only if renewed
        first.kill()
        killed_at = time.monotonic()
    finally:
        hold.unlink()
    thread.join()
    assert lost, "the request to the killed server should have failed"
    second = start_server(kind, store_url=store_url, namespace=namespace, lease=lease)
    statuses: list[tuple[float, int]] = []
    while True:
        answer = post(second, path, key)
        statuses.append((time.monotonic() - killed_at, answer.status_code))
        if answer.status_code != 409:
            break
        assert statuses[-1][0] < 60, "the dead worker's claim never ran out"
        time.sleep(0.2)
    assert answer.status_code == 201, answer.text
    assert {s for _, s in statuses[:-1]} <= {409}
    if statuses[0][0] < lease / 3:  # asked while the dead worker's lease surely held
        assert statuses[0][1] == 409
    again = post(second, path, key)
    assert again.content == answer.content
    assert again.headers["idempotent-replayed"] == "true"
    second.stop()
    assert runs(runlog, tag) == 2  # once in the killed worker, once after its lease
    assert runs(runlog, tag, "done") == 1

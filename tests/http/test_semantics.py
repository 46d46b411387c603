"""The draft's semantics, behind real servers with a real HTTP client, in every framework.

Each test runs against FastAPI under uvicorn, Flask under waitress, Django under
runserver (the middleware's sync path) and Django's ASGI app under uvicorn (its async
path), each server in a process of its own with the in-memory store (one process per
server: the store is shared by its threads and tasks). The handlers count their runs in
a log file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ._runlog import DOCS, MAX_RESPONSE
from ._servers import KINDS, Server
from .conftest import StartServer, new_tag, runs

BODY = b'{"item": 1, "note": "caf\xc3\xa9"}'


@pytest.fixture(scope="module", params=KINDS)
def server(request: pytest.FixtureRequest, start_server: StartServer) -> Server:
    return start_server(request.param)


def post(
    server: Server,
    path: str,
    key: str | None,
    body: bytes = BODY,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent["Idempotency-Key"] = key
    return httpx.post(server.url + path, content=body, headers=sent, timeout=60)


def problem(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    """The response's RFC 9457 body, checked to be the problem ``code`` with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = json.loads(response.content)
    assert body["type"] == f"{DOCS}#{code}"
    assert body["status"] == status
    assert body["code"] == code
    assert body["title"]
    assert body["detail"]
    assert f"<{DOCS}>" in response.headers["link"]
    assert 'rel="describedby"' in response.headers["link"]
    return dict(body)


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_a_retry_gets_the_first_response_byte_for_byte_and_the_handler_runs_once(
    server: Server, runlog: Path
) -> None:
    tag, key = new_tag(), str(uuid.uuid4())
    first = post(server, f"/orders/{tag}", key)
    again = post(server, f"/orders/{tag}", key)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["x-run"] == first.headers["x-run"]
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert runs(runlog, tag) == 1


def test_a_replay_leaves_out_set_cookie(server: Server) -> None:
    """A kept response has no Set-Cookie: a replay must not hand one client's session to
    whoever holds the key."""
    tag, key = new_tag(), str(uuid.uuid4())
    first = post(server, f"/orders/{tag}", key)
    again = post(server, f"/orders/{tag}", key)
    assert "session=s3cret" in first.headers["set-cookie"]
    assert "set-cookie" not in again.headers


def test_twenty_concurrent_retries_run_the_handler_once_and_all_get_the_same_bytes(
    server: Server, runlog: Path
) -> None:
    tag, key = new_tag(), str(uuid.uuid4())
    barrier = threading.Barrier(20)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        barrier.wait()
        response = post(server, f"/marked/{tag}?sleep=0.5", key)
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=send) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 20
    assert {r.status_code for r in answers} == {201}
    assert len({r.content for r in answers}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 19
    assert runs(runlog, tag) == 1


def test_the_same_key_with_another_body_gets_422(server: Server, runlog: Path) -> None:
    tag, key = new_tag(), str(uuid.uuid4())
    assert post(server, f"/orders/{tag}", key).status_code == 201
    other = post(server, f"/orders/{tag}", key, body=b'{"item": 2}')
    problem(other, 422, "idempotency-key-reused")
    assert key not in other.text
    assert runs(runlog, tag) == 1


def test_a_retry_while_the_first_request_runs_gets_409_with_retry_after(
    server: Server, runlog: Path
) -> None:
    tag, key = new_tag(), str(uuid.uuid4())
    path = f"/orders/{tag}?sleep=2"
    first: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: first.append(post(server, path, key)))
    thread.start()
    wait_for(lambda: runs(runlog, tag) == 1)
    busy = post(server, path, key)
    problem(busy, 409, "idempotency-key-in-use")
    assert busy.headers["retry-after"] == "1"
    thread.join()
    later = post(server, path, key)
    assert later.status_code == first[0].status_code == 201
    assert later.content == first[0].content
    assert runs(runlog, tag) == 1


def test_a_missing_required_key_gets_400_linking_to_the_documentation(
    server: Server, runlog: Path
) -> None:
    tag = new_tag()
    missing = post(server, f"/orders/{tag}", None)
    body = problem(missing, 400, "idempotency-key-missing")
    assert "Idempotency-Key" in str(body["detail"])
    assert runs(runlog, tag) == 0


@pytest.mark.parametrize(
    "key",
    ["x" * 256, "two words", '"unterminated\\"', "caf\xe9"],
    ids=["too-long", "space", "bad-quoting", "not-ascii"],
)
def test_a_malformed_key_gets_400_and_never_runs(server: Server, runlog: Path, key: str) -> None:
    tag = new_tag()
    answer = httpx.post(
        f"{server.url}/orders/{tag}",
        content=BODY,
        headers=[(b"Idempotency-Key", key.encode("latin-1"))],
        timeout=30,
    )
    problem(answer, 400, "idempotency-key-invalid")
    assert runs(runlog, tag) == 0


def test_two_key_headers_get_400_and_never_run(server: Server, runlog: Path) -> None:
    """Two Idempotency-Key headers are refused on every server, also where the server
    joins them with a comma before the middleware sees them (wsgiref, Django's ASGI
    request): a bare key holds no comma."""
    tag = new_tag()
    answer = httpx.post(
        f"{server.url}/orders/{tag}",
        content=BODY,
        headers=[(b"Idempotency-Key", b"key-one"), (b"Idempotency-Key", b"key-two")],
        timeout=30,
    )
    problem(answer, 400, "idempotency-key-invalid")
    assert runs(runlog, tag) == 0


def test_a_quoted_key_is_the_same_key_as_the_bare_one(server: Server, runlog: Path) -> None:
    """The draft sends the key as a Structured Field string; Stripe's clients send it
    bare: both spell one key."""
    tag, key = new_tag(), uuid.uuid4().hex
    first = post(server, f"/orders/{tag}", f'"{key}"')
    again = post(server, f"/orders/{tag}", key)
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert runs(runlog, tag) == 1


def test_a_handler_exception_releases_the_key_and_the_retry_runs(
    server: Server, runlog: Path
) -> None:
    tag, key = new_tag(), str(uuid.uuid4())
    flag = Path(f"{runlog}.fail-{tag}")
    flag.touch()
    try:
        assert post(server, f"/orders/{tag}", key).status_code == 500
    finally:
        flag.unlink()
    assert runs(runlog, tag, "fail") == 1
    retry = post(server, f"/orders/{tag}", key)
    assert retry.status_code == 201
    assert "idempotent-replayed" not in retry.headers
    assert post(server, f"/orders/{tag}", key).content == retry.content
    assert runs(runlog, tag) == 2


def test_a_5xx_answer_is_not_kept_and_a_4xx_answer_is(server: Server, runlog: Path) -> None:
    down, bad = new_tag(), new_tag()
    key = str(uuid.uuid4())
    assert post(server, f"/orders/{down}?status=503", key).status_code == 503
    assert post(server, f"/orders/{down}?status=503", key).status_code == 503
    assert runs(runlog, down) == 2  # released: the retry ran
    first = post(server, f"/orders/{bad}?status=400", key)
    again = post(server, f"/orders/{bad}?status=400", key)
    assert first.status_code == again.status_code == 400
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert runs(runlog, bad) == 1


def test_the_body_reaches_the_handler_unchanged(server: Server) -> None:
    tag, key = new_tag(), str(uuid.uuid4())
    body = os.urandom(300_000)
    answer = post(server, f"/orders/{tag}", key, body=body, headers={"Content-Type": "x/y"})
    assert answer.status_code == 201
    seen = json.loads(answer.content)
    assert seen["len"] == len(body)
    assert seen["sha256"] == __import__("hashlib").sha256(body).hexdigest()


def test_a_body_cut_short_by_a_client_that_went_away_does_not_use_up_its_key(
    server: Server, runlog: Path
) -> None:
    """A client that disconnects mid-upload (its body shorter than its Content-Length)
    has sent no request: its retry with the whole body runs the handler and gets its
    answer, not a 422 for the truncated bytes a handler was run on."""
    tag, key = new_tag(), str(uuid.uuid4())
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as cut:
        cut.sendall(
            f"POST /orders/{tag} HTTP/1.1\r\nHost: {host}\r\nIdempotency-Key: {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
            + BODY[:5]
        )
        cut.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            cut.recv(65536)
    answer = post(server, f"/orders/{tag}", key)
    assert answer.status_code == 201, answer.text
    assert "idempotent-replayed" not in answer.headers


def test_a_chunked_body_reaches_the_handler_unchanged(server: Server) -> None:
    if server.kind == "django":
        pytest.skip("runserver (wsgiref) does not read chunked request bodies")
    tag, key = new_tag(), str(uuid.uuid4())
    parts = [os.urandom(1000) for _ in range(50)]

    def chunks() -> Iterator[bytes]:
        yield from parts

    answer = httpx.post(
        f"{server.url}/orders/{tag}",
        content=chunks(),
        headers={"Idempotency-Key": key},
        timeout=30,
    )
    assert answer.status_code == 201
    seen = json.loads(answer.content)
    assert seen["sha256"] == __import__("hashlib").sha256(b"".join(parts)).hexdigest()


def test_a_streaming_response_is_kept_whole_and_replayed(server: Server, runlog: Path) -> None:
    tag, key = new_tag(), str(uuid.uuid4())
    first = post(server, f"/stream/{tag}?size=40000", key)
    again = post(server, f"/stream/{tag}?size=40000", key)
    assert first.status_code == again.status_code == 200
    assert len(first.content) == 40000
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert runs(runlog, tag) == 1


def test_a_response_over_max_response_bytes_is_sent_whole_but_not_replayed(
    server: Server, runlog: Path
) -> None:
    tag, key = new_tag(), str(uuid.uuid4())
    size = 4 * MAX_RESPONSE
    first = post(server, f"/stream/{tag}?size={size}", key)
    assert first.status_code == 200
    assert len(first.content) == size
    again = post(server, f"/stream/{tag}?size={size}", key)
    body = problem(again, 422, "response-not-kept")
    assert str(MAX_RESPONSE) in str(body["detail"])
    assert runs(runlog, tag) == 1


def test_get_passes_through_even_with_a_key(server: Server, runlog: Path) -> None:
    tag, key = new_tag(), str(uuid.uuid4())
    for _ in range(2):
        answer = httpx.get(f"{server.url}/orders/{tag}", headers={"Idempotency-Key": key})
        assert answer.status_code == 200
        assert "idempotent-replayed" not in answer.headers
    assert runs(runlog, tag) == 2


def test_keys_are_scoped_by_client_and_by_path(server: Server, runlog: Path) -> None:
    one, two = new_tag(), new_tag()
    key = str(uuid.uuid4())
    alice = post(server, f"/orders/{one}", key, headers={"X-Client": "alice"})
    bob = post(server, f"/orders/{one}", key, headers={"X-Client": "bob"})
    assert alice.status_code == bob.status_code == 201
    assert alice.content != bob.content
    assert post(server, f"/orders/{one}", key, headers={"X-Client": "alice"}).content == (
        alice.content
    )
    assert post(server, f"/orders/{two}", key, headers={"X-Client": "alice"}).status_code == 201
    assert runs(runlog, one) == 2
    assert runs(runlog, two) == 1


@pytest.mark.parametrize("kind", ["django", "django-asgi"])
def test_a_marked_django_view_is_covered_from_the_first_request(
    kind: str, start_server: StartServer, runlog: Path
) -> None:
    """Django imports the URLconf (and so marks its views) on the first request that
    needs it, not at start: the very first request to a marked view is covered."""
    fresh = start_server(kind)
    tag = new_tag()
    missing = post(fresh, f"/marked/{tag}", None)
    fresh.stop()
    problem(missing, 400, "idempotency-key-missing")
    assert runs(runlog, tag) == 0

"""The dashboard as a part of other applications and commands: mounted under a path
prefix, served through WSGI, started by ``idempotask web``; and its paging."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
import wsgiref.simple_server
from pathlib import Path
from typing import Any

import httpx
import pytest

from idempotask import DeadLetterQueue, configure
from idempotask.backends.base import DeadLetter, Status
from idempotask.cli import main
from idempotask.web import create_app, create_wsgi_app
from idempotask.web._serve import is_loopback
from tests.web.conftest import free_port, from_address

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient


@pytest.fixture
def queue() -> DeadLetterQueue:
    configure(backend="memory://", namespace="webapp")
    return DeadLetterQueue()


def test_mounted_under_a_prefix_every_link_and_action_stays_under_it(
    queue: DeadLetterQueue,
) -> None:
    """Links, the stylesheet, the script, forms and redirects all carry the prefix."""
    id = queue.record("billing.charge", TimeoutError("t"), arguments={"order": 1}).id
    host = Starlette(routes=[Mount("/ops/idempotask", create_app())])
    c = TestClient(
        from_address(host, ("127.0.0.1", 1)), base_url="http://localhost", follow_redirects=False
    )
    page = c.get(f"/ops/idempotask/letters/confirm?action=resolve&id={id}").text
    links = re.findall(r'(?:href|src|action)="([^"]+)"', page)
    assert links
    assert all(link.startswith("/ops/idempotask/") for link in links), links
    assert c.get("/ops/idempotask/static/dashboard.css").status_code == 200
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    done = c.post(
        "/ops/idempotask/letters/act", data={"action": "resolve", "id": id, "csrf": token}
    )
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"/ops/idempotask/letters/{id}?done=resolved")
    cookie = done.headers.get("set-cookie") or c.get("/ops/idempotask/").headers.get("set-cookie")
    assert cookie is None or "Path=/ops/idempotask" in cookie


def test_served_through_wsgi_pages_and_actions_work(queue: DeadLetterQueue) -> None:
    """create_wsgi_app under a real WSGI server (the standard library's, which tells no
    client port, so the app cannot see a loopback client and needs its token)."""
    id = queue.record("billing.charge", TimeoutError("t"), arguments={"order": 1}).id
    app = create_wsgi_app(token="a-long-enough-token")
    port = free_port()

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = wsgiref.simple_server.make_server("127.0.0.1", port, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as anonymous:
            assert anonymous.get("/").status_code == 401
        auth = ("dora", "a-long-enough-token")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=auth) as c:
            assert c.get("/").status_code == 200
            page = c.get(f"/letters/confirm?action=abandon&id={id}")
            token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
            done = c.post("/letters/act", data={"action": "abandon", "id": id, "csrf": token})
            assert done.status_code == 303
    finally:
        server.shutdown()
        server.server_close()
    letter = queue.get(id)
    assert letter is not None
    assert letter.status is Status.ABANDONED
    assert letter.history[-1].actor == "web:dora"


def test_retry_now_on_a_letter_being_replayed_is_refused_with_a_page_saying_so(
    queue: DeadLetterQueue,
) -> None:
    """ "Retry now" on a letter a processor is replaying right now: a 409 page naming the
    letter and saying to try again after the replay (not a server error), and the
    processor keeps its claim."""
    letter = queue.record("billing.charge", TimeoutError("t"), arguments={"order": 1})
    assert letter.next_retry_at is not None
    (claimed,) = queue.store.claim_due(letter.next_retry_at + 1)  # a processor mid-replay
    c = TestClient(
        from_address(create_app(), ("127.0.0.1", 1)),
        base_url="http://localhost",
        follow_redirects=False,
    )
    page = c.get(f"/letters/confirm?action=retry&id={letter.id}").text
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    refused = c.post("/letters/act", data={"action": "retry", "id": letter.id, "csrf": token})
    assert refused.status_code == 409
    assert 'data-status="409"' in refused.text
    assert "being replayed by a processor right now" in refused.text
    assert "try again after the replay ends" in refused.text
    assert letter.id in refused.text
    assert queue.get(letter.id) == claimed
    bulk = c.post("/letters/act", data={"action": "retry_all", "status": "pending", "csrf": token})
    assert bulk.status_code == 303
    assert "n=0" in bulk.headers["location"]
    assert queue.get(letter.id) == claimed


def test_pages_of_letters_failing_at_the_same_instant_show_each_letter_once(
    queue: DeadLetterQueue,
) -> None:
    """The keyset cursor passes over ties by id: 130 letters at one time, three pages."""
    store = queue.store
    for i in range(130):
        store.add(
            DeadLetter(
                id=f"{i:04d}",
                function="billing.charge",
                kind="transient",
                error_type="builtins.TimeoutError",
                message=f"m{i}",
                first_failed_at=1000.0 + (i % 2),
                last_failed_at=1000.0 + (i % 2),
            )
        )
    c = TestClient(from_address(create_app(), ("127.0.0.1", 1)), base_url="http://localhost")
    seen: list[str] = []
    path = "/letters?status=pending"
    for _ in range(5):
        page = c.get(path).text
        seen += re.findall(r'<tr data-id="([^"]+)"', page)
        following = re.search(r'rel="next" href="([^"]+)"', page)
        if following is None:
            break
        path = following.group(1).replace("&amp;", "&")
    expected = [f"{i:04d}" for i in range(1, 130, 2)] + [f"{i:04d}" for i in range(0, 130, 2)]
    assert seen == expected


def test_the_web_command_refuses_another_address_without_a_token(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--host 0.0.0.0 alone exits 2 and says why; loopback names are recognised."""
    monkeypatch.delenv("IDEMPOTASK_WEB_TOKEN", raising=False)
    assert main(["web", "--host", "0.0.0.0", "--url", "memory://"]) == 2
    assert "needs authentication" in capsys.readouterr().err
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("example.internal")


def test_the_package_ships_its_templates_and_static_files() -> None:
    """What the wheel must carry: every template and the stylesheet and script."""
    from importlib import resources

    root = resources.files("idempotask.web")
    names = {p.name for p in root.joinpath("templates").iterdir()}
    assert {"base.html", "overview.html", "_live.html", "letters.html", "letter.html"} <= names
    assert root.joinpath("static", "dashboard.js").is_file()
    assert root.joinpath("static", "dashboard.css").is_file()


def test_the_keys_page_lists_a_functions_live_records_and_never_shows_results_unasked(
    queue: DeadLetterQueue,
) -> None:
    """A function name alone lists its records; a record's result shows only on request."""
    from idempotask import idempotent

    @idempotent(name="webapp.report", ttl=600)
    def report(day: int) -> str:
        return f"secret report {day}"

    report(1)
    report(2)
    c = TestClient(from_address(create_app(), ("127.0.0.1", 1)), base_url="http://localhost")
    listing = c.get("/keys?function=webapp.report").text
    keys = re.findall(r"<code>(webapp:webapp\.report:v1:[0-9a-f]+)</code>", listing)
    assert sorted(keys) == sorted([report.key_for(1), report.key_for(2)])
    shown = c.get(f"/keys?key={report.key_for(1)}").text
    assert "secret report" not in shown
    assert "completed" in shown
    revealed = c.get(f"/keys?key={report.key_for(1)}&reveal=1").text
    assert "secret report 1" in revealed


def test_idempotask_web_serves_the_dashboard_on_loopback(tmp_path: Any) -> None:
    """The command as a newcomer runs it: a page on 127.0.0.1:PORT, then Ctrl-C."""
    port = free_port()
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "IDEMPOTASK_SPOOL": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "idempotask", "web", "--url", "memory://", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/letters", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "idempotask web did not start"
                time.sleep(0.1)
        assert page.status_code == 200
        assert "Dead letters" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    assert f"dashboard on http://127.0.0.1:{port}/" in err


def test_retrying_one_resolved_letter_warns_that_a_finished_call_runs_again(
    queue: DeadLetterQueue,
) -> None:
    """The single-letter confirmation says what the bulk one says of resolved letters;
    an open letter's confirmation does not."""
    open_id = queue.record("billing.charge", TimeoutError("t"), arguments={"order": 1}).id
    done_id = queue.record("billing.charge", TimeoutError("t"), arguments={"order": 2}).id
    queue.mark_resolved(done_id, note="refunded by hand")
    c = TestClient(from_address(create_app(), ("127.0.0.1", 1)), base_url="http://localhost")
    warning = "retrying it replays a call that already finished"
    assert warning in c.get(f"/letters/confirm?action=retry&id={done_id}").text
    assert warning not in c.get(f"/letters/confirm?action=retry&id={open_id}").text

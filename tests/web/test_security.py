"""The dashboard's safety, request by request: authentication, CSRF, read-only mode,
headers, and that a GET never changes anything (in-process, on the memory store)."""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import pytest

from idempotask import DeadLetterQueue, configure, dead_letter, keep_all
from idempotask.backends.base import DeadLetter, Status
from idempotask.web import create_app
from tests.web.conftest import from_address

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")  # Starlette prefers httpx2 now
    from starlette.testclient import TestClient

LOCAL = ("127.0.0.1", 50000)


@pytest.fixture
def queue() -> DeadLetterQueue:
    configure(backend="memory://", namespace="websec")
    return DeadLetterQueue()


def letter_id(queue: DeadLetterQueue, message: str = "gateway timed out") -> str:
    return queue.record("billing.charge", TimeoutError(message), arguments={"order": 7}).id


def client(
    app: Any,
    host: tuple[str, int] = LOCAL,
    auth: tuple[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> TestClient:
    c = TestClient(
        from_address(app, host),
        base_url="http://localhost",
        follow_redirects=False,
        headers=headers,
    )
    if auth is not None:
        c.auth = auth
    return c


def csrf_of(c: TestClient, path: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', c.get(path).text)
    assert found, path
    return found.group(1)


def last_action(queue: DeadLetterQueue, id: str) -> tuple[str, str]:
    letter = queue.get(id)
    assert letter is not None
    return letter.history[-1].what, letter.history[-1].actor


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(
    queue: DeadLetterQueue,
) -> None:
    """Missing token, another session's token, a cross-site request: 403, letter as it was."""
    id = letter_id(queue)
    c = client(create_app())
    token = csrf_of(c, f"/letters/confirm?action=resolve&id={id}")
    attempts = [
        {"action": "resolve", "id": id},
        {"action": "resolve", "id": id, "csrf": "0" * 64},
    ]
    for form in attempts:
        assert c.post("/letters/act", data=form).status_code == 403
    other = client(create_app())  # another browser: its own cookie, so its own token
    other_token = csrf_of(other, f"/letters/confirm?action=resolve&id={id}")
    assert other_token != token
    assert (
        c.post(
            "/letters/act", data={"action": "resolve", "id": id, "csrf": other_token}
        ).status_code
        == 403
    )
    cross = c.post(
        "/letters/act",
        data={"action": "resolve", "id": id, "csrf": token},
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert cross.status_code == 403
    assert last_action(queue, id) == ("failed", "worker")
    done = c.post("/letters/act", data={"action": "resolve", "id": id, "csrf": token})
    assert done.status_code == 303
    assert last_action(queue, id) == ("resolved", "web:local")


def test_no_get_changes_anything(queue: DeadLetterQueue) -> None:
    """Every page, the confirmations included, read only; the action URLs refuse GET."""
    id = letter_id(queue)
    c = client(create_app())
    for path in (
        "/",
        "/live",
        "/letters",
        f"/letters/{id}",
        f"/letters/confirm?action=retry&id={id}",
        f"/letters/confirm?action=abandon&id={id}",
        "/letters/confirm?action=purge&status=resolved",
        "/letters/confirm?action=resolve_all",
        "/keys?key=idempotask:x:v1:00",
        "/breakers",
    ):
        assert c.get(path).status_code == 200, path
    for path in ("/letters/act", "/keys/forget", "/breakers/act"):
        # /letters/act reads as a letter id there: "no letter act" (404); others 405
        assert c.get(f"{path}?action=resolve&id={id}").status_code in (404, 405), path
    letter = queue.get(id)
    assert letter is not None
    assert letter.status is Status.PENDING
    assert [a.what for a in letter.history] == ["failed"]


def test_without_authentication_only_this_machine_is_served(queue: DeadLetterQueue) -> None:
    """A client on another address gets 403 and nothing else, static files included."""
    app = create_app()
    for path in ("/", "/letters", "/static/dashboard.css"):
        refused = client(app, host=("10.1.2.3", 40000)).get(path)
        assert refused.status_code == 403, path
        assert "only answers on the machine" in refused.text
    assert client(app, host=("::1", 40000)).get("/").status_code == 200
    assert client(app, host=("::ffff:127.0.0.1", 40000)).get("/").status_code == 200
    assert client(app, host=("::ffff:10.1.2.3", 40000)).get("/").status_code == 403


def test_without_authentication_a_url_naming_another_site_is_refused(
    queue: DeadLetterQueue,
) -> None:
    """DNS rebinding: a page of evil.example, whose name now points at 127.0.0.1, makes
    the browser send ``Host: evil.example`` from this machine, as the page's own origin.
    It must neither read a page (and its CSRF token) nor act; a URL naming this machine
    is served."""
    id = letter_id(queue)
    app = create_app()
    rebound = TestClient(
        from_address(app, LOCAL), base_url="http://evil.example:8765", follow_redirects=False
    )
    for path in ("/", "/live", f"/letters/{id}", f"/letters/confirm?action=resolve&id={id}"):
        page = rebound.get(path)
        assert page.status_code == 403, path
        assert "csrf" not in page.text
        assert "evil.example" in page.text  # the refusal says which name it refused
    forged = rebound.post("/letters/act", data={"action": "resolve", "id": id, "csrf": "x"})
    assert forged.status_code == 403
    assert last_action(queue, id) == ("failed", "worker")
    for name in ("localhost:8765", "127.0.0.1:8765", "[::1]:8765", "LOCALHOST", "app.localhost"):
        assert client(app, headers={"Host": name}).get("/").status_code == 200, name
    for name in ("127.0.0.1.evil.example", "localhost.evil.example", "10.1.2.3:8765"):
        assert client(app, headers={"Host": name}).get("/").status_code == 403, name
    # With a token the browser has no credentials for another site's name: served as usual.
    token = "t" * 16
    assert (
        client(create_app(token=token), auth=("ann", token), headers={"Host": "a.example"})
        .get("/")
        .status_code
        == 200
    )


def test_a_letter_written_into_the_store_by_hand_cannot_break_a_page(
    queue: DeadLetterQueue,
) -> None:
    """Times no calendar holds, arguments nested past the recursion limit, an id holding
    "/" and "?": every page still answers, the list of letters first."""
    now = time.time()
    far = 1e300  # finite: every store takes it
    fields: dict[str, Any] = {"function": "f", "kind": "transient", "error_type": "E"}
    queue.store.add(
        DeadLetter(id="0000far", message="far", first_failed_at=far, last_failed_at=far, **fields)
    )
    queue.store.add(
        DeadLetter(
            id="0000deep",
            message="deep",
            arguments=b"[" * 100_000 + b"]" * 100_000,
            first_failed_at=now,
            last_failed_at=now,
            **fields,
        )
    )
    queue.store.add(
        DeadLetter(id="0000a/b?c", message="odd", first_failed_at=now, last_failed_at=now, **fields)
    )
    c = client(create_app())
    for path in ("/", "/live", "/letters", "/letters/0000far", "/letters/0000deep"):
        assert c.get(path).status_code == 200, path
    odd = {"id": "0000a/b?c"}
    assert c.get("/letters/confirm", params={"action": "retry", **odd}).status_code == 200
    goto = c.get("/letters", params=odd)
    assert goto.status_code == 303
    assert goto.headers["location"] == "/letters/0000a%2Fb%3Fc"
    assert c.get(goto.headers["location"]).status_code == 404  # "/" names no letter's page


@dataclass
class Parcel:
    """A dataclass whose repr() needs what __post_init__ sets (a stored one is rebuilt
    without running it)."""

    id: int

    def __post_init__(self) -> None:
        self.label = f"parcel {self.id}"

    def __repr__(self) -> str:
        return self.label


def test_an_argument_whose_repr_fails_once_rebuilt_does_not_break_its_letter(
    queue: DeadLetterQueue,
) -> None:
    """The letter page shows the argument as not showable, with the page's other fields."""

    @dead_letter(queue=queue, redact=keep_all)
    def ship(parcel: Parcel) -> None:
        raise TimeoutError("carrier down")

    with pytest.raises(TimeoutError):
        ship(Parcel(7))
    page = client(create_app()).get(f"/letters/{queue.query()[0].id}")
    assert page.status_code == 200
    assert "Parcel whose repr() raised AttributeError" in page.text


def test_a_token_is_required_as_basic_auth_or_bearer(queue: DeadLetterQueue) -> None:
    """401 with a Basic challenge without it; the basic-auth name is the recorded user."""
    id = letter_id(queue)
    app = create_app(token="a-long-enough-token")
    anonymous = client(app, host=("10.1.2.3", 40000)).get("/")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Basic realm=")
    bad = client(app, host=("10.1.2.3", 40000), auth=("bob", "wrong")).get("/")
    assert bad.status_code == 401
    bearer = client(app, headers={"Authorization": "Bearer a-long-enough-token"})
    assert bearer.get("/letters").status_code == 200
    c = client(app, host=("10.1.2.3", 40000), auth=("bob", "a-long-enough-token"))
    token = csrf_of(c, f"/letters/confirm?action=abandon&id={id}")
    assert (
        c.post("/letters/act", data={"action": "abandon", "id": id, "csrf": token}).status_code
        == 303
    )
    assert last_action(queue, id) == ("abandoned", "web:bob")


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_auth_hook_names_the_user_or_refuses(
    queue: DeadLetterQueue, asynchronous: bool
) -> None:
    """The hook gets the request: a name is recorded as web:<name>; None or
    PermissionError refuses with 403."""
    id = letter_id(queue)

    def decide(request: Any) -> str | None:
        who = request.headers.get("x-user")
        if who == "mallory":
            raise PermissionError("mallory is not on the on-call list")
        return who

    async def adecide(request: Any) -> str | None:
        return decide(request)

    app = create_app(auth=adecide if asynchronous else decide)
    remote = ("10.1.2.3", 40000)
    assert client(app, host=remote).get("/").status_code == 403
    refused = client(app, host=remote, headers={"x-user": "mallory"}).get("/")
    assert refused.status_code == 403
    assert "on-call" in refused.text
    c = client(app, host=remote, headers={"x-user": "carol\x1b[31m"})
    token = csrf_of(c, f"/letters/confirm?action=retry&id={id}")
    assert (
        c.post("/letters/act", data={"action": "retry", "id": id, "csrf": token}).status_code == 303
    )
    assert last_action(queue, id) == ("requeued", "web:carol\\x1b[31m")


def test_read_only_refuses_every_action(queue: DeadLetterQueue) -> None:
    """Confirmations and POSTs answer 403; pages show no form."""
    id = letter_id(queue)
    c = client(create_app(read_only=True))
    page = c.get(f"/letters/{id}").text
    assert "<form" not in page
    assert c.get(f"/letters/confirm?action=retry&id={id}").status_code == 403
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token is None
    for path, form in (
        ("/letters/act", {"action": "retry", "id": id}),
        ("/keys/forget", {"key": "idempotask:x:v1:0", "token": "t"}),
        ("/breakers/act", {"action": "open", "name": "erp"}),
    ):
        assert c.post(path, data=form).status_code == 403, path
    assert last_action(queue, id) == ("failed", "worker")


def test_read_only_refuses_an_action_even_with_a_valid_csrf_token(
    queue: DeadLetterQueue,
) -> None:
    """A read-only dashboard sharing secret= with a writable one (the same cookie and user
    make the same token): the token is good, the action is still refused."""
    id = letter_id(queue)
    secret = "s" * 32
    writable = client(create_app(secret=secret))
    token = csrf_of(writable, f"/letters/confirm?action=resolve&id={id}")
    close = {"action": "close", "name": "erp", "csrf": token}
    assert writable.post("/breakers/act", data=close).status_code == 303  # a good token
    reader = client(create_app(read_only=True, secret=secret))
    reader.cookies = writable.cookies
    assert reader.get("/").status_code == 200
    for path, form in (
        ("/letters/act", {"action": "resolve", "id": id}),
        ("/letters/act", {"action": "purge", "status": "pending"}),
        ("/keys/forget", {"key": "websec:x:v1:0", "token": "t"}),
        ("/breakers/act", {"action": "open", "name": "erp"}),
    ):
        refused = reader.post(path, data={**form, "csrf": token})
        assert refused.status_code == 403, path
        assert "read-only" in refused.text
    assert last_action(queue, id) == ("failed", "worker")


def test_every_response_carries_a_strict_content_security_policy(queue: DeadLetterQueue) -> None:
    """Pages, static files, errors and refusals: no inline script, no framing."""
    app = create_app()
    responses = [
        client(app).get("/"),
        client(app).get("/static/dashboard.js"),
        client(app).get("/letters/nope-not-there"),
        client(app, host=("10.1.2.3", 1)).get("/"),
    ]
    for response in responses:
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["server-timing"].startswith("app;dur=")
    page = responses[0].text
    assert "<script>" not in page  # the one script is a file of the app
    assert "style=" not in page


def test_a_notice_in_the_query_string_cannot_put_words_on_the_page(queue: DeadLetterQueue) -> None:
    """Only the fixed notices show, with a number; anything else shows nothing."""
    c = client(create_app())
    assert "made due now" in c.get("/letters?done=retried&n=3").text
    crafted = c.get("/letters?done=Your+account+is+locked&n=call+us").text
    assert "locked" not in crafted
    assert "call us" not in crafted


def test_an_unknown_letter_is_a_404_page(queue: DeadLetterQueue) -> None:
    """An id (or prefix) that matches nothing: 404, said plainly."""
    response = client(create_app()).get("/letters/feedface")
    assert response.status_code == 404
    assert "no dead letter has id" in response.text


def test_create_app_refuses_unsafe_options() -> None:
    """A short token, a token and a hook together, a short secret."""
    from idempotask.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="at least 12"):
        create_app(token="short")
    with pytest.raises(ConfigurationError, match="not both"):
        create_app(token="a-long-enough-token", auth=lambda r: "x")
    with pytest.raises(ConfigurationError, match="16 bytes"):
        create_app(secret="tiny")

"""The Django admin of ``idempotask.django``, through Django's test client logged in as a
superuser, on SQLite, PostgreSQL and MariaDB: the dead letters' list with its filters and
search, a letter's page (traceback, arguments as stored, redacted ones redacted,
history), the actions (retry now, resolve and abandon with a note, one letter or the
selected ones) recorded in each letter's history as done by the admin user, the
idempotency records with "forget", and nothing else writable."""

from __future__ import annotations

import html
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("django")

from django.test import Client

from idempotask import config, dead_letter, idempotent
from idempotask.backends.base import State
from idempotask.deadletter import DeadLetterQueue, keep_all
from idempotask.django.settings import Misconfigured, Problem
from tests.django._admin_project import (
    admin_project,  # noqa: F401 - a fixture, used by `on_each`
    on_each,  # noqa: F401 - a fixture, used through `each_database`
)

pytestmark = pytest.mark.postgres
each_database = pytest.mark.usefixtures("on_each")  # SQLite, PostgreSQL, MariaDB

LETTERS = "/admin/idempotask/deadletterrecord/"
RECORDS = "/admin/idempotask/idempotencyrecord/"
FAIL = {"charge": True}


@dead_letter(
    name="djadmin.charge",
    redact=lambda a: {**a, "card": "<redacted>"},
    replay_with=lambda kept: {**kept, "card": "4111 1111 1111 1111"},
)
@idempotent(name="djadmin.charge", ttl=3600)
def charge(order_id: int, card: str) -> dict[str, Any]:
    if FAIL["charge"]:
        raise TimeoutError(f"gateway timed out for order {order_id}")
    return {"order_id": order_id, "charged": True}


@dead_letter(name="djadmin.reject", redact=keep_all)
@idempotent(name="djadmin.reject", ttl=3600)
def reject(order_id: int, reason: str = "") -> None:
    raise ValueError(f"order {order_id} is malformed{reason}")


@pytest.fixture(autouse=True)
def _failing() -> None:
    FAIL["charge"] = True


def _user(username: str, *, superuser: bool, perms: tuple[str, ...] = ()) -> Any:
    from django.contrib.auth.models import Permission, User

    user = User.objects.filter(username=username).first()
    if user is None:
        if superuser:
            user = User.objects.create_superuser(username, f"{username}@example.com", "pw")
        else:
            user = User.objects.create_user(username, password="pw", is_staff=True)
            for perm in perms:
                app, codename = perm.split(".")
                user.user_permissions.add(
                    Permission.objects.get(content_type__app_label=app, codename=codename)
                )
    return user


@pytest.fixture
def client() -> Iterator[Client]:
    """The test client, logged in as the superuser ``ada`` (tests marked `each_database`)."""
    client = Client()
    client.force_login(_user("ada", superuser=True))
    yield client
    client.logout()


def failed_charge(order_id: int = 7) -> str:
    with pytest.raises(TimeoutError):
        charge(order_id, "4111 1111 1111 1111")
    letters = DeadLetterQueue().query(function="djadmin.charge")
    (letter,) = [x for x in letters if x.message.endswith(f"for order {order_id}")]
    return letter.id


def failed_reject(order_id: int = 9, reason: str = "") -> str:
    with pytest.raises(ValueError, match="malformed"):
        reject(order_id, reason)
    letters = DeadLetterQueue().query(function="djadmin.reject")
    (letter,) = [x for x in letters if x.message.startswith(f"order {order_id} is")]
    return letter.id


def page(client: Client, url: str, **params: Any) -> str:
    """The HTML of a page that must render (200)."""
    response = client.get(url, params)
    assert response.status_code == 200, response.content[:2000]
    return str(response.content.decode())


def listed(client: Client, **params: Any) -> set[str]:
    """The letter ids (first 12 characters) the list shows with ``params``."""
    text = page(client, LETTERS, **params)
    return {id for id in _ids if id[:12] in text}


_ids: list[str] = []


@pytest.fixture
def letters() -> Iterator[tuple[str, str]]:
    """A transient letter of ``charge`` and a permanent (abandoned) one of ``reject``
    (tests marked `each_database`: the stores are configured first)."""
    _ids[:] = [failed_charge(), failed_reject()]
    yield _ids[0], _ids[1]
    _ids.clear()


# -- the list --------------------------------------------------------------------------------


@each_database
def test_the_list_shows_the_letters_with_their_columns(
    client: Client, letters: tuple[str, str]
) -> None:
    text = page(client, LETTERS)
    for id in letters:
        assert id[:12] in text
    assert "djadmin.charge" in text
    assert "TimeoutError: gateway timed out for order 7" in text
    assert "ValueError: order 9 is malformed" in text
    # the filters offer what there is
    assert "?function=djadmin.reject" in text
    assert "?error_type=builtins.ValueError" in text
    # read-only: no "add" button, no delete action
    assert f"{LETTERS}add/" not in text
    assert "delete_selected" not in text


@each_database
@pytest.mark.parametrize(
    ("params", "which"),
    [
        ({"status": "abandoned"}, {1}),
        ({"status": "pending"}, {0}),
        ({"status": "resolved"}, set()),
        ({"kind": "transient"}, {0}),
        ({"kind": "permanent"}, {1}),
        ({"function": "djadmin.charge"}, {0}),
        ({"error_type": "builtins.ValueError"}, {1}),
        ({"failed": "1h"}, {0, 1}),
        ({"failed": "older"}, set()),
        ({"status": "pending", "kind": "permanent"}, set()),
    ],
)
def test_filters_narrow_the_list(
    client: Client, letters: tuple[str, str], params: dict[str, str], which: set[int]
) -> None:
    assert listed(client, **params) == {letters[i] for i in which}


@each_database
def test_search_finds_by_error_text_id_and_function(
    client: Client, letters: tuple[str, str]
) -> None:
    charged, rejected = letters
    assert listed(client, q="MALFORMED") == {rejected}
    assert listed(client, q="gateway timed") == {charged}
    assert listed(client, q=charged[:8]) == {charged}
    assert listed(client, q="djadmin.reject") == {rejected}
    assert listed(client, q="no such thing") == set()


@each_database
def test_letters_of_another_namespace_are_not_listed(
    client: Client, letters: tuple[str, str]
) -> None:
    namespace = config.settings().namespace
    config.configure(namespace=f"{namespace}x")
    other = failed_charge(70)
    config.configure(namespace=namespace)
    text = page(client, LETTERS)
    assert other[:12] not in text
    assert letters[0][:12] in text


# -- a letter's page -------------------------------------------------------------------------


@each_database
def test_the_detail_shows_traceback_arguments_and_history(
    client: Client, letters: tuple[str, str]
) -> None:
    charged, _ = letters
    text = html.unescape(page(client, f"{LETTERS}{charged}/change/"))
    assert charged in text
    assert "Traceback (most recent call last)" in text
    assert "TimeoutError: gateway timed out for order 7" in text
    assert "<th>order_id</th><td><code>7</code></td>" in text
    assert "<th>card</th><td><code><redacted: '<redacted>'></code></td>" in text
    assert "4111 1111 1111 1111" not in text  # the card itself
    assert "<td>failed</td><td>worker</td>" in text  # the history's first action
    for label in ("Retry now", "Resolve…", "Abandon…"):
        assert label in text
    assert 'name="_save"' not in text  # view only


@each_database
def test_hostile_text_is_escaped(client: Client) -> None:
    id = failed_reject(11, reason="\x1b[2J<script>alert(1)</script>\u202e")
    text = page(client, f"{LETTERS}{id}/change/")
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "\x1b" not in text
    assert "\u202e" not in text
    assert "\\x1b[2J" in text
    assert "\\u202e" in text


# -- actions ---------------------------------------------------------------------------------


@each_database
def test_resolve_with_a_note_is_recorded_with_the_admin_user(
    client: Client, letters: tuple[str, str]
) -> None:
    charged, _ = letters
    url = f"{LETTERS}act/resolve/"
    text = page(client, url, id=charged)
    assert 'name="note"' in text
    response = client.post(url, {"id": charged, "note": "refunded by hand"}, follow=True)
    assert response.status_code == 200
    assert "1 dead letter resolved." in response.content.decode()
    letter = DeadLetterQueue().find(charged)
    assert (letter.status.value, letter.resolution) == ("resolved", "manual")
    action = letter.history[-1]
    assert (action.what, action.actor, action.note) == ("resolved", "admin:ada", "refunded by hand")


@each_database
def test_retry_now_makes_the_letter_due_and_abandon_closes_it(
    client: Client, letters: tuple[str, str]
) -> None:
    charged, rejected = letters
    response = client.post(f"{LETTERS}act/retry/", {"id": charged})
    assert response.status_code == 302
    assert response["Location"] == f"{LETTERS}{charged}/change/"
    letter = DeadLetterQueue().find(charged)
    assert letter.next_retry_at is not None
    assert letter.next_retry_at <= letter.last_failed_at + 300
    assert (letter.history[-1].what, letter.history[-1].actor) == ("requeued", "admin:ada")
    # the processor replays it at once
    FAIL["charge"] = False
    report = DeadLetterQueue().process_due()
    assert report.resolved == [charged]
    FAIL["charge"] = True
    second = failed_charge(8)
    client.post(f"{LETTERS}act/abandon/", {"id": second, "note": "customer left"})
    action = DeadLetterQueue().find(second).history[-1]
    assert (action.what, action.actor, action.note) == ("abandoned", "admin:ada", "customer left")
    # a reopened letter: retrying an abandoned one requeues it
    client.post(f"{LETTERS}act/retry/", {"id": rejected})
    assert DeadLetterQueue().find(rejected).history[-1].what == "requeued"


@each_database
def test_retry_now_on_a_letter_being_replayed_says_so_and_changes_nothing(
    client: Client, letters: tuple[str, str]
) -> None:
    """A processor replaying the letter right now keeps it: the admin shows why (try again
    after the replay ends) and the letter is unchanged."""
    charged, _ = letters
    queue = DeadLetterQueue()
    letter = queue.find(charged)
    assert letter.next_retry_at is not None
    only = queue.filter(function="djadmin.charge")
    (claimed,) = queue.store.claim_due(letter.next_retry_at + 1, filter=only)  # mid-replay
    for what in ("retry", "resolve", "abandon"):
        response = client.post(f"{LETTERS}act/{what}/", {"id": charged}, follow=True)
        assert response.status_code == 200
        text = html.unescape(response.content.decode())
        assert f"dead letter {charged!r} is being replayed by a processor right now" in text
        assert "try again after the replay ends" in text
    assert queue.get(charged) == claimed


@each_database
def test_bulk_actions_on_the_selected_letters(client: Client) -> None:
    ids = [failed_charge(21), failed_charge(22), failed_charge(23)]
    response = client.post(
        LETTERS, {"action": "retry_selected", "_selected_action": ids[:2]}, follow=True
    )
    assert "2 dead letters requeued (due now)." in response.content.decode()
    queue = DeadLetterQueue()
    assert [queue.find(i).history[-1].what for i in ids] == ["requeued", "requeued", "failed"]
    # resolve asks for a note first, then acts
    response = client.post(LETTERS, {"action": "resolve_selected", "_selected_action": ids})
    assert response.status_code == 200
    assert 'name="note"' in response.content.decode()
    assert 'name="confirmed"' in response.content.decode()
    response = client.post(
        LETTERS,
        {
            "action": "resolve_selected",
            "_selected_action": ids,
            "confirmed": "yes",
            "note": "done in the ERP",
        },
        follow=True,
    )
    assert "3 dead letters resolved." in response.content.decode()
    for id in ids:
        action = queue.find(id).history[-1]
        assert (action.what, action.actor, action.note) == (
            "resolved",
            "admin:ada",
            "done in the ERP",
        )


@each_database
def test_an_action_on_an_unknown_letter_is_a_404(client: Client) -> None:
    assert client.get(f"{LETTERS}act/resolve/", {"id": "feedc0de"}).status_code == 404
    assert client.post(f"{LETTERS}act/retry/", {"id": "feedc0de"}).status_code == 404
    assert client.post(f"{LETTERS}act/teleport/", {"id": "feedc0de"}).status_code == 404


@each_database
def test_rows_cannot_be_added_changed_or_deleted(client: Client, letters: tuple[str, str]) -> None:
    charged, _ = letters
    assert client.get(f"{LETTERS}add/").status_code == 403
    assert client.post(f"{LETTERS}{charged}/change/", {"attempts": "99"}).status_code == 403
    assert client.post(f"{LETTERS}{charged}/delete/", {"post": "yes"}).status_code == 403
    assert DeadLetterQueue().find(charged).attempts == 1
    response = client.post(LETTERS, {"action": "delete_selected", "_selected_action": [charged]})
    assert DeadLetterQueue().get(charged) is not None
    assert response.status_code in (200, 302)


@each_database
def test_a_viewer_sees_letters_but_cannot_act(letters: tuple[str, str]) -> None:
    viewer = _user(
        "viewer",
        superuser=False,
        perms=("idempotask.view_deadletterrecord", "idempotask.view_idempotencyrecord"),
    )
    client = Client()
    client.force_login(viewer)
    charged, _ = letters
    text = page(client, f"{LETTERS}{charged}/change/")
    assert "Traceback (most recent call last)" in text
    assert "Retry now" not in text
    assert client.post(f"{LETTERS}act/retry/", {"id": charged}).status_code == 403
    client.post(LETTERS, {"action": "retry_selected", "_selected_action": [charged]})
    assert DeadLetterQueue().find(charged).history[-1].what == "failed"


# -- idempotency records ---------------------------------------------------------------------


@each_database
def test_records_are_listed_filtered_and_shown(client: Client) -> None:
    FAIL["charge"] = False
    charge(31, "x")
    key = charge.key_for(31, "x")
    text = page(client, RECORDS)
    assert key in text
    assert key in page(client, RECORDS, state="completed", q="djadmin.charge")
    assert key not in page(client, RECORDS, state="in_progress")
    assert key not in page(client, RECORDS, expiry="expired")
    changed = f"{RECORDS}" + key.replace(":", "_3A") + "/change/"  # the admin's escaping
    detail = html.unescape(page(client, changed))
    assert "{'order_id': 31, 'charged': True}" in detail
    assert "Forget…" in detail


@each_database
def test_forget_removes_a_record_through_the_store(client: Client) -> None:
    FAIL["charge"] = False
    charge(32, "x")
    key = charge.key_for(32, "x")
    text = page(client, f"{RECORDS}forget/", key=key)
    assert key in text
    assert 'name="force"' not in text  # not in progress
    response = client.post(f"{RECORDS}forget/", {"id": key}, follow=True)
    assert "Forgot 1 key: the next call runs again." in response.content.decode()
    assert config.get_backend().get(key) is None
    assert key not in page(client, RECORDS)


@each_database
def test_forget_refuses_a_claim_in_progress_unless_told(client: Client) -> None:
    key = charge.key_for(33, "x")
    assert config.get_backend().claim(key, "token-1", lease=60).state is State.IN_PROGRESS
    assert 'name="force"' in page(client, f"{RECORDS}forget/", key=key)
    response = client.post(f"{RECORDS}forget/", {"id": key}, follow=True)
    assert "is in progress" in response.content.decode()
    assert config.get_backend().get(key) is not None
    client.post(f"{RECORDS}forget/", {"id": key, "force": "yes"})
    assert config.get_backend().get(key) is None


@each_database
def test_forget_asks_the_store_whether_a_claim_is_in_progress_not_the_web_clock(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease live on the database's clock is in progress even when the web server's
    clock runs an hour ahead (DESIGN: every expiry on the store's clock): forgetting it
    without the box ticked is refused, whatever ``time.time()`` says."""
    import time
    import types

    import idempotask.django.admin as admin_module

    key = charge.key_for(34, "x")
    assert config.get_backend().claim(key, "token-1", lease=60).state is State.IN_PROGRESS
    ahead = types.SimpleNamespace(time=lambda: time.time() + 3600)
    monkeypatch.setattr(admin_module, "time", ahead)
    response = client.post(f"{RECORDS}forget/", {"id": key}, follow=True)
    assert "is in progress" in response.content.decode()
    record = config.get_backend().get(key)
    assert record is not None
    assert record.token == "token-1"
    client.post(RECORDS, {"action": "forget_selected", "_selected_action": [key]})  # confirm
    response = client.post(
        RECORDS,
        {"action": "forget_selected", "_selected_action": [key], "confirmed": "yes"},
        follow=True,
    )
    assert "is in progress" in response.content.decode()
    assert config.get_backend().get(key) is not None


@each_database
def test_forget_says_a_claim_whose_lease_ran_out_on_the_database_clock_has_expired(
    client: Client,
) -> None:
    """A claim whose lease ran out on the store's clock is not in progress, and there is
    nothing left to forget: the page says so (it said "changed meanwhile")."""
    key = charge.key_for(35, "x")
    backend = config.get_backend()
    assert backend.claim(key, "token-1", lease=60).state is State.IN_PROGRESS
    expire_now = getattr(backend, "expire_now", None)
    if expire_now is None:
        pytest.skip(f"{type(backend).__name__} has no expire_now test hook")
    assert expire_now(key)
    response = client.post(f"{RECORDS}forget/", {"id": key}, follow=True)
    assert "has expired or is gone: the next call runs again" in response.content.decode()
    assert "is in progress" not in response.content.decode()
    assert backend.get(key) is None


@each_database
def test_forget_the_selected_records(client: Client) -> None:
    FAIL["charge"] = False
    keys = []
    for order in (41, 42):
        charge(order, "x")
        keys.append(charge.key_for(order, "x"))
    response = client.post(RECORDS, {"action": "forget_selected", "_selected_action": keys})
    assert response.status_code == 200  # the confirmation
    response = client.post(
        RECORDS,
        {"action": "forget_selected", "_selected_action": keys, "confirmed": "yes"},
        follow=True,
    )
    assert "Forgot 2 keys" in response.content.decode()
    assert all(config.get_backend().get(k) is None for k in keys)
    assert client.get(f"{RECORDS}add/").status_code == 403


@each_database
def test_a_store_elsewhere_is_said_on_the_list_pages(client: Client) -> None:
    """With the stores in memory (not on a Django alias), the pages render and say where
    the rows are; an invalid store is named as an error, not a crash."""
    config.configure(backend="memory://")
    for url in (LETTERS, RECORDS):
        text = html.unescape(page(client, url))
        assert "are kept in" in text
        assert "not on a Django database alias" in text
    # an invalid IDEMPOTASK setting: the store refuses, naming the problem
    problem = Problem("idempotask.E004", "backend", "IDEMPOTASK['backend'] is 'nosuch'")
    config.configure(backend=Misconfigured([problem]))  # type: ignore[arg-type]
    response = client.get(LETTERS)
    assert response.status_code == 200
    assert "The dead-letter store cannot be used" in html.unescape(response.content.decode())
    response = client.get(RECORDS)
    assert response.status_code == 200
    text = html.unescape(response.content.decode())
    assert "The IDEMPOTASK setting is invalid (idempotask.E004: " in text
    assert "IDEMPOTASK['backend'] is 'nosuch'" in text

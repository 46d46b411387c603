"""The dashboard in a real browser (Debian's Chromium through Playwright), on Redis and on
PostgreSQL, with letters written by real ``@dead_letter`` failures: what an operator does
-- find a failure, understand it, act on it -- and that each action is recorded with who
did it."""

from __future__ import annotations

import base64
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from idempotask.backends.base import BreakerStatus, State, Status
from idempotask.web import create_app
from tests.web.conftest import Shop

expect = pytest.importorskip("playwright.sync_api").expect

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _letters_in_page(page: Any) -> list[str]:
    return page.locator("table.letters tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.id)"
    )


def test_the_overview_shows_the_failures_and_updates_itself(
    shop: Shop, serve: Any, page: Any
) -> None:
    """Counts, the chart and the top functions; a new failure shows without a reload."""
    shop.fail("charge", range(3))
    shop.fail("ship", range(2), "declined")  # permanent: abandoned at once
    served = serve(create_app(refresh=0.3))
    page.goto(served.url + "/")
    expect(page.locator("[data-figure=total]")).to_have_text("5")
    expect(page.locator("[data-figure=open]")).to_have_text("3")
    bars = page.locator("#chart-hourly g.bar").evaluate_all(
        "bars => bars.map(b => Number(b.dataset.total))"
    )
    assert len(bars) == 24
    assert sum(bars[-2:]) == 5  # this hour (or the last, if the hour turned meanwhile)
    expect(page.locator("section.grid2 table").last).to_contain_text(f"{shop.namespace}.charge")
    expect(page.locator("table.matrix")).to_contain_text("abandoned")
    expect(page.locator("[data-figure=health]")).to_have_text("up")
    marker = page.evaluate("() => { window.__same_page = 1; return 1 }")
    shop.fail("charge", range(10, 14))
    expect(page.locator("[data-figure=total]")).to_have_text("9", timeout=20_000)
    assert page.evaluate("() => window.__same_page") == marker  # no reload happened


def test_filter_open_retry_and_see_the_status_change_after_process_due(
    shop: Shop, serve: Any, page: Any
) -> None:
    """Find a failure by filters, open it, retry it; after process_due it is resolved,
    and its history says who asked and what the processor did."""
    shop.fail("charge", range(3))
    shop.fail("ship", range(2), "declined")
    served = serve(create_app(refresh=0.3))
    page.goto(served.url + "/letters")
    assert len(_letters_in_page(page)) == 5
    page.fill("input[name=search]", "DECLINED")
    page.click("form.filters button[type=submit]")
    assert sorted(_letters_in_page(page)) == sorted(shop.ids(search="declined"))
    page.fill("input[name=search]", "")
    page.fill("input[name=function]", f"{shop.namespace}.charge")
    page.select_option("select[name=status]", "pending")
    page.click("form.filters button[type=submit]")
    ids = _letters_in_page(page)
    assert sorted(ids) == sorted(shop.ids(function=f"{shop.namespace}.charge"))

    target = shop.queue.get(ids[0])
    assert target is not None
    order = int(re.search(r"order (\d+)", target.message).group(1))  # type: ignore[union-attr]
    page.click(f"tr[data-id='{target.id}'] a.id")
    expect(page.locator(".headline")).to_contain_text(f"gateway timed out for order {order}")
    expect(page.locator("[data-record-state]")).to_have_text("absent")
    expect(page.locator("pre.traceback")).to_contain_text("TimeoutError")
    expect(page.locator("table.args")).to_contain_text("order")
    page.click("text=Hide arguments")
    expect(page.locator("table.args")).to_have_count(0)

    page.click("p.actions >> text=Retry now")
    expect(page.locator(".confirm-what")).to_contain_text(target.id)
    page.click("form.confirm button[type=submit]")
    expect(page.locator(".notice")).to_contain_text("1 letter made due now")
    shop.succeeds.add(order)
    report = shop.queue.process_due(limit=10)
    assert target.id in [r.id for r in report.results]
    page.reload()
    expect(page.locator("h1 .badge")).to_have_text("resolved")
    history = page.locator("table.history tbody")
    expect(history).to_contain_text("requeued")
    expect(history).to_contain_text("web:local")
    expect(history).to_contain_text("processor")
    expect(page.locator("[data-record-state]")).to_have_text("completed")


def test_bulk_retry_by_filter_asks_with_the_count_and_records_each_letter(
    shop: Shop, serve: Any, page: Any
) -> None:
    """Retry every letter of a function: the confirmation names the count, and each
    letter is due now with ``web:local`` in its history."""
    shop.fail("charge", range(4))
    shop.fail("ship", range(2))
    served = serve(create_app(refresh=0.3))
    function = f"{shop.namespace}.charge"
    page.goto(f"{served.url}/letters?function={function}")
    page.click("p.summary >> text=Retry now")
    expect(page.locator(".confirm-what b")).to_have_text("4 letters")
    page.fill("textarea[name=note]", "gateway back")
    page.click("form.confirm button[type=submit]")
    expect(page.locator(".notice")).to_contain_text("4 letters made due now")
    now = time.time()
    for letter in shop.queue.query(function=function):
        assert letter.next_retry_at is not None
        assert letter.next_retry_at <= now
        last = letter.history[-1]
        assert (last.what, last.actor, last.note) == ("requeued", "web:local", "gateway back")
    for letter in shop.queue.query(function=f"{shop.namespace}.ship"):
        assert letter.history[-1].what == "failed"  # outside the filter: untouched


def test_resolve_with_a_note_then_purge_closed_letters(shop: Shop, serve: Any, page: Any) -> None:
    """Resolve one letter with a note (kept in its history), then purge the closed ones."""
    shop.fail("charge", range(2))
    served = serve(create_app(refresh=0.3))
    first, second = shop.ids()
    page.goto(f"{served.url}/letters/{first[:8]}")  # an id prefix finds it too
    page.click("p.actions >> text=Resolve")
    page.fill("textarea[name=note]", "refunded by hand <b>twice</b>")
    page.click("form.confirm button[type=submit]")
    expect(page.locator("h1 .badge")).to_have_text("resolved")
    expect(page.locator("table.history td.note").first).to_have_text(
        "refunded by hand <b>twice</b>"
    )
    resolved = shop.queue.get(first)
    assert resolved is not None
    assert resolved.status is Status.RESOLVED
    assert (resolved.history[-1].actor, resolved.history[-1].note) == (
        "web:local",
        "refunded by hand <b>twice</b>",
    )
    page.goto(served.url + "/letters")
    page.click("text=Purge closed")
    expect(page.locator(".confirm-what b")).to_have_text("1 letter")
    page.click("form.confirm button[type=submit]")
    expect(page.locator(".notice")).to_contain_text("1 letter deleted")
    assert shop.ids() == [second]


def test_look_up_a_key_by_function_and_arguments_and_forget_it(
    shop: Shop, serve: Any, page: Any
) -> None:
    """The key ``key_for`` gives, its record without the result until asked, forgetting
    it; an in-progress claim needs the box ticked."""
    charge = shop.functions["charge"]
    shop.succeeds.add(42)
    assert charge(42, "timeout") == "done 42"
    key = charge.key_for(42, "timeout")
    served = serve(create_app(refresh=0.3))
    page.goto(served.url + "/keys")
    page.fill("input[name=function]", f"{shop.namespace}.charge")
    page.fill("textarea[name=arguments]", '{"order": 42, "reason": "timeout"}')
    page.click("text=Compute and look up")
    record = page.locator("dl[data-record-state]")
    expect(record).to_have_attribute("data-record-state", "completed")
    expect(record).to_contain_text(key)
    expect(page.locator("main")).not_to_contain_text("done 42")
    page.click("text=show it")
    expect(page.locator("code.revealed")).to_have_text("'done 42'")
    page.click("text=Forget this key")
    expect(page.locator(".notice")).to_contain_text("Key forgotten")
    expect(page.locator("[data-record-state]")).to_have_attribute("data-record-state", "absent")
    assert shop.backend.get(key) is None

    held = charge.key_for(7, "timeout")
    shop.backend.claim(held, uuid.uuid4().hex, lease=60, owner="worker-1")
    page.goto(f"{served.url}/keys?key={held}")
    expect(page.locator("form.forget .warn")).to_contain_text("in progress")
    page.click("text=Forget this key")  # the required box is not ticked: nothing is sent
    assert shop.backend.get(held).state is State.IN_PROGRESS
    page.check("input[name=force]")
    page.click("text=Forget this key")
    expect(page.locator(".notice")).to_contain_text("Key forgotten")
    assert shop.backend.get(held) is None


def test_close_and_open_a_breaker_by_hand(shop: Shop, serve: Any, page: Any) -> None:
    """An open breaker is listed with its time left; Close closes it for every process."""
    breakers = shop.backend.breaker_store(namespace=shop.namespace)
    breakers.record_failure("erp", threshold=1, window=60, open_for=600)
    served = serve(create_app(refresh=0.3))
    page.goto(served.url + "/breakers")
    row = page.locator("tr[data-breaker=erp]")
    expect(row.locator("[data-state]")).to_have_text("open")
    row.locator("button[value=close]").click()
    expect(page.locator(".notice")).to_contain_text("Breaker closed")
    assert breakers.state("erp").status is BreakerStatus.CLOSED
    page.fill("form.narrow input[name=name]", "payments")
    page.click("text=Open it")
    expect(page.locator("tr[data-breaker=payments] [data-state]")).to_have_text("open")
    assert breakers.state("payments").status is BreakerStatus.OPEN


HOSTILE = (
    '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    "\x1b]0;owned\x07\x1b[31mred\x1b[0m\r\u202eevil"
)


def test_a_hostile_exception_message_is_shown_as_inert_text(
    shop: Shop, serve: Any, page: Any
) -> None:
    """HTML, script tags and terminal escapes in a message are text on every page."""
    shop.errors["hostile"] = lambda order: RuntimeError(HOSTILE)
    shop.fail("charge", [1], "hostile")
    (letter_id,) = shop.ids()
    served = serve(create_app(refresh=0.3))
    for path in ("/", "/letters", f"/letters/{letter_id}", "/letters?search=script"):
        page.goto(served.url + path)
        page.wait_for_load_state("load")
        assert page.evaluate("() => window.__pwned") is None, path
        assert page.locator("main img, main script").count() == 0, path
    page.goto(f"{served.url}/letters/{letter_id}")
    text = page.locator(".headline").inner_text()
    assert "<script>window.__pwned=2</script>" in text
    assert "\\x1b]0;owned\\x07" in text
    assert "\\u202e" in text
    assert "\x1b" not in text
    assert "\\x1b]0;owned" in page.locator("pre.traceback").inner_text()


def test_read_only_mode_hides_and_refuses_every_action(shop: Shop, serve: Any, page: Any) -> None:
    """No action is offered, and a forged request is refused."""
    shop.fail("charge", [1])
    (letter_id,) = shop.ids()
    served = serve(create_app(refresh=0.3, read_only=True))
    page.goto(f"{served.url}/letters/{letter_id}")
    expect(page.locator("header .badge.ro")).to_have_text("read-only")
    assert page.locator("p.actions, form").count() == 0
    page.goto(served.url + "/letters")
    assert page.locator("a.button, td.acts").count() == 0
    page.goto(served.url + "/breakers")
    assert page.locator("main form").count() == 0
    response = page.goto(f"{served.url}/letters/confirm?action=retry&id={letter_id}")
    assert response.status == 403
    forged = httpx.post(f"{served.url}/letters/act", data={"action": "retry", "id": letter_id})
    assert forged.status_code == 403
    assert shop.queue.get(letter_id).history[-1].what == "failed"  # type: ignore[union-attr]


def test_a_token_protects_the_dashboard_and_names_who_acted(
    shop: Shop, serve: Any, browser: Any
) -> None:
    """Without credentials: 401. With basic auth (any name, the token as password) the
    name is recorded in the letter's history."""
    shop.fail("charge", [1])
    (letter_id,) = shop.ids()
    token = "correct-horse-battery-staple"
    served = serve(create_app(refresh=0.3, token=token))
    assert httpx.get(served.url + "/").status_code == 401
    wrong = base64.b64encode(b"alice:guess").decode()
    assert (
        httpx.get(served.url + "/", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    )
    context = browser.new_context(http_credentials={"username": "alice", "password": token})
    try:
        page = context.new_page()
        page.goto(f"{served.url}/letters/confirm?action=abandon&id={letter_id}")
        page.click("form.confirm button[type=submit]")
        expect(page.locator("h1 .badge")).to_have_text("abandoned")
    finally:
        context.close()
    letter = shop.queue.get(letter_id)
    assert letter is not None
    assert letter.history[-1].actor == "web:alice"


def test_screenshots_of_the_overview_and_of_a_letter(
    shop: Shop, serve: Any, browser: Any, tmp_path: Path
) -> None:
    """The README's pictures, made from real failures; written to docs/ when
    IDEMPOTASK_SCREENSHOTS=1 (else to a temporary directory)."""
    if shop.name != "redis":
        pytest.skip("one set of pictures is enough")
    shop.fail("charge", range(6))
    shop.fail("ship", range(3), "declined")
    charges = shop.ids(function=f"{shop.namespace}.charge")  # newest first: order 5 .. 0
    shop.succeeds.add(0)
    shop.queue.requeue(charges[-1], actor="web:alice")  # succeeds when replayed
    shop.queue.requeue(charges[0], actor="web:alice", note="gateway says it is back")
    shop.queue.process_due(limit=10)  # order 5 fails again: retrying
    shop.backend.breaker_store(namespace=shop.namespace).record_failure(
        "erp", threshold=1, window=60, open_for=300
    )
    where = DOCS if os.environ.get("IDEMPOTASK_SCREENSHOTS") == "1" else tmp_path
    where.mkdir(exist_ok=True)
    served = serve(create_app(refresh=0.3))
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        page = context.new_page()
        page.goto(served.url + "/")
        expect(page.locator("[data-figure=total]")).to_have_text("9")
        page.screenshot(path=str(where / "dashboard-overview.png"), full_page=True)
        page.goto(f"{served.url}/letters/{charges[0]}")
        expect(page.locator("h1 .badge")).to_have_text("retrying")
        page.screenshot(path=str(where / "dashboard-letter.png"), full_page=True)
    finally:
        context.close()
    for name in ("dashboard-overview.png", "dashboard-letter.png"):
        assert (where / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_form_on_another_site_cannot_act_through_the_operators_browser(
    shop: Shop, serve: Any, page: Any
) -> None:
    """A page on another origin posts to the dashboard from a browser that has the
    dashboard open: refused (no CSRF token, cookie withheld, cross-site), letter untouched."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    shop.fail("charge", [1])
    (letter_id,) = shop.ids()
    dashboard = serve(create_app(refresh=0.3))
    page.goto(f"{dashboard.url}/letters/{letter_id}")  # the operator's session: its cookie

    async def lure(request: Any) -> HTMLResponse:
        return HTMLResponse(
            f'<form method="post" action="{dashboard.url}/letters/act">'
            f'<input name="action" value="resolve"><input name="id" value="{letter_id}">'
            '<input name="csrf" value="guessed"><button type="submit">win a prize</button></form>'
        )

    evil = serve(Starlette(routes=[Route("/", lure)]), host="127.0.0.2")
    page.goto(evil.url + "/")
    with page.expect_navigation():
        page.click("text=win a prize")
    assert "Refused" in page.content()
    letter = shop.queue.get(letter_id)
    assert letter is not None
    assert letter.status is Status.PENDING
    assert [a.what for a in letter.history] == ["failed"]

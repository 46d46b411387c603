"""A replay runs the original call under its original idempotency key, or does not run
(DESIGN §3, §5; issue 13 §1): redacted letters, ``replay_with=``, explicit keys."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

import idempotask
from idempotask import DeadLetterQueue, Status, dead_letter, idempotent
from idempotask.backends.base import State
from idempotask.deadletter import (
    KeepsAllArgumentsWarning,
    Redacted,
    keep_all,
    letter_arguments,
    register_route,
    unregister_route,
)
from idempotask.retry import FixedDelay, RetryPolicy
from idempotask.taxonomy import FailureKind

T0 = 1_800_000_000.0
LATER = T0 + 10**7
FAST = {FailureKind.TRANSIENT: RetryPolicy(2, FixedDelay(60))}


class GatewayTimeout(TimeoutError):
    """A transient failure: its letter gets a retry."""


@pytest.fixture(autouse=True)
def private_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDEMPOTASK_SPOOL", str(tmp_path / "spool"))


@pytest.fixture
def queue(tmp_path: Path) -> DeadLetterQueue:
    return DeadLetterQueue("memory://", policies=FAST, clock=lambda: T0, spool=tmp_path / "q")


class Gateway:
    """The payment provider: fails while ``down``, and notes every charge it sees."""

    def __init__(self) -> None:
        self.down = True
        self.charges: list[tuple[int, str]] = []

    def charge(self, order_id: int, card: str) -> str:
        self.charges.append((order_id, card))
        if self.down:
            raise GatewayTimeout("gateway timed out")
        return f"receipt {order_id} {card[-4:]}"


def test_two_failed_charges_with_different_cards_stay_two_letters_and_never_replay_redacted(
    queue: DeadLetterQueue,
) -> None:
    """The README's own redact= hook: each failed charge keeps its letter, and no replay
    runs the body with card="<redacted>" (nor under another key), nor marks it resolved."""
    gateway = Gateway()

    @dead_letter(queue=queue, redact=lambda a: {**a, "card": "<redacted>"})
    @idempotent(ttl=3600)
    def charge(order_id: int, card: str) -> str:
        return gateway.charge(order_id, card)

    for card in ("4111111111111111", "5500005555555559"):
        with pytest.raises(GatewayTimeout):
            charge(7, card)
    gateway.down = False
    report = queue.process_due(now=LATER)

    letters = queue.query()
    assert len(letters) == 2
    assert {x.key for x in letters} == {
        charge.__wrapped__.key_for(7, "4111111111111111"),
        charge.__wrapped__.key_for(7, "5500005555555559"),
    }
    assert gateway.charges == [(7, "4111111111111111"), (7, "5500005555555559")]  # no replay
    assert sorted(r.outcome for r in report.results) == ["held", "held"]
    for letter in letters:
        assert (letter.status, letter.next_retry_at, letter.resolution) == (
            Status.PENDING,
            None,
            "",
        )
        assert "card" in letter.history[-1].note
        assert "replay_with" in letter.history[-1].note
        assert letter_arguments(letter).redacted == ("card",)
        assert b"4111" not in letter.arguments
        assert b"5500" not in letter.arguments


def test_an_argument_removed_by_redact_is_not_replaced_by_its_default(
    queue: DeadLetterQueue,
) -> None:
    """Dropping an argument with a default must not replay the call with the default
    (another call, under another key)."""
    seen: list[str] = []

    @dead_letter(queue=queue, redact=lambda a: {"order_id": a["order_id"]})
    @idempotent
    def ship(order_id: int, token: str = "") -> None:
        seen.append(token)
        raise GatewayTimeout("carrier down")

    with pytest.raises(GatewayTimeout):
        ship(3, token="tok_live_1")
    report = queue.process_due(now=LATER)
    assert [r.outcome for r in report.results] == ["held"]
    assert seen == ["tok_live_1"]
    assert letter_arguments(queue.query()[0]).values == {
        "order_id": 3,
        "token": Redacted(None, "removed"),
    }


def test_an_argument_redacted_in_place_is_a_placeholder_never_replayed(
    queue: DeadLetterQueue,
) -> None:
    """A redact= hook that masks a field of a dict argument in place hands back the same
    object: it is still redacted, and the replay never charges card="<redacted>"."""
    seen: list[dict[str, str]] = []

    def redact(arguments: dict[str, Any]) -> dict[str, Any]:
        arguments["payment"]["card"] = "<redacted>"
        return arguments

    @dead_letter(queue=queue, redact=redact)
    def pay(order_id: int, payment: dict[str, str]) -> None:
        seen.append(dict(payment))
        if len(seen) == 1:
            raise GatewayTimeout("gateway timed out")

    with pytest.raises(GatewayTimeout):
        pay(7, {"card": "4111111111111111"})
    letter = queue.query()[0]
    assert letter_arguments(letter).redacted == ("payment",)
    report = queue.process_due(now=LATER)
    assert [r.outcome for r in report.results] == ["held"]
    assert seen == [{"card": "4111111111111111"}]


def test_a_replay_with_hook_that_passes_a_redacted_mask_through_does_not_run(
    queue: DeadLetterQueue,
) -> None:
    """The hook restores the card but passes cvv on as redact= stored it: the replay
    would send cvv="<redacted>", so the letter is held for a person instead."""
    sent: list[tuple[str, str]] = []
    vault = {7: "4111111111111111"}

    @dead_letter(
        queue=queue,
        redact=lambda a: {**a, "card": "<redacted>", "cvv": "<redacted>"},
        replay_with=lambda kept: {**kept, "card": vault[kept["order_id"]]},
    )
    def pay(order_id: int, card: str, cvv: str) -> None:
        sent.append((card, cvv))
        raise GatewayTimeout("gateway timed out")

    with pytest.raises(GatewayTimeout):
        pay(7, "4111111111111111", "123")
    report = queue.process_due(now=LATER)
    assert [r.outcome for r in report.results] == ["held"]
    assert "cvv" in report.results[0].reason
    assert sent == [("4111111111111111", "123")]


def test_replay_with_rebuilds_the_original_call_under_its_original_key(
    queue: DeadLetterQueue,
) -> None:
    """The card is not stored; replay_with reloads it from the order, and the replay runs
    the very call that failed: same arguments, same key, its result stored there."""
    gateway = Gateway()
    cards = {7: "4111111111111111"}
    rebuilt_from: list[dict[str, Any]] = []

    def reload(kept: dict[str, Any]) -> dict[str, Any]:
        rebuilt_from.append(dict(kept))
        return {**kept, "card": cards[kept["order_id"]]}

    @dead_letter(queue=queue, redact=lambda a: {**a, "card": "<redacted>"}, replay_with=reload)
    @idempotent(ttl=3600)
    def charge(order_id: int, card: str) -> str:
        return gateway.charge(order_id, card)

    with pytest.raises(GatewayTimeout):
        charge(7, "4111111111111111")
    (letter,) = queue.query()
    gateway.down = False
    report = queue.process_due(now=LATER)

    assert [r.outcome for r in report.results] == ["resolved"]
    assert rebuilt_from == [{"order_id": 7, "card": "<redacted>"}]
    assert gateway.charges == [(7, "4111111111111111"), (7, "4111111111111111")]
    record = idempotask.get_backend().get(letter.key)
    assert record is not None
    assert record.state is State.COMPLETED
    assert letter.key == charge.__wrapped__.key_for(7, "4111111111111111")
    assert charge(7, "4111111111111111") == "receipt 7 1111"  # answered, not run
    assert len(gateway.charges) == 2
    resolved = queue.get(letter.id)
    assert resolved is not None
    assert resolved.status is Status.RESOLVED


def test_replay_with_that_rebuilds_another_call_does_not_run(queue: DeadLetterQueue) -> None:
    """A reload that finds another card (the customer changed it) would be another call
    under another key: it is refused, the letter waits and says why."""
    gateway = Gateway()

    @dead_letter(
        queue=queue,
        redact=lambda a: {**a, "card": "<redacted>"},
        replay_with=lambda kept: {**kept, "card": "5500005555555559"},
    )
    @idempotent
    def charge(order_id: int, card: str) -> str:
        return gateway.charge(order_id, card)

    with pytest.raises(GatewayTimeout):
        charge(7, "4111111111111111")
    gateway.down = False
    report = queue.process_due(now=LATER)
    assert [r.outcome for r in report.results] == ["held"]
    assert "not the letter's" in report.results[0].reason
    assert gateway.charges == [(7, "4111111111111111")]


def test_a_replay_with_hook_that_raises_is_a_failed_replay_retried_by_the_policy(
    queue: DeadLetterQueue,
) -> None:
    def reload(kept: dict[str, Any]) -> dict[str, Any]:
        raise ConnectionError("card vault unreachable")

    @dead_letter(queue=queue, redact=lambda a: {**a, "card": "<r>"}, replay_with=reload)
    @idempotent
    def charge(order_id: int, card: str) -> str:
        raise GatewayTimeout("down")

    with pytest.raises(GatewayTimeout):
        charge(1, "4111")
    report = queue.process_due(now=LATER)
    assert [r.outcome for r in report.results] == ["failed"]
    letter = queue.query()[0]
    assert (letter.status, letter.attempts) == (Status.RETRYING, 2)
    assert letter.error_type == "builtins.ConnectionError"
    assert letter.history[-1].what == "retry_failed"


def test_a_letter_recorded_under_an_explicit_key_replays_under_that_key(
    queue: DeadLetterQueue,
) -> None:
    """using(key=header): the replay's result is stored under the header's key, so the
    client's retry with the same header is answered without running the body again."""
    runs: list[int] = []
    fail = [True]

    @dead_letter(queue=queue)
    @idempotent(ttl=3600)
    def webhook(event_id: int) -> str:
        runs.append(event_id)
        if fail[0]:
            raise GatewayTimeout("downstream down")
        return f"handled {event_id}"

    with pytest.raises(GatewayTimeout):
        webhook.using(key="delivery-42")(5)
    (letter,) = queue.query()
    assert letter.key != webhook.__wrapped__.key_for(5)
    fail[0] = False
    report = queue.process_due(now=LATER)
    assert [r.outcome for r in report.results] == ["resolved"]
    assert runs == [5, 5]
    assert webhook.using(key="delivery-42")(5) == "handled 5"  # the client's retry
    assert runs == [5, 5]


def test_a_redacted_letter_whose_call_completed_meanwhile_is_resolved_without_running(
    queue: DeadLetterQueue,
) -> None:
    gateway = Gateway()

    @dead_letter(queue=queue, redact=lambda a: {**a, "card": "<redacted>"})
    @idempotent
    def charge(order_id: int, card: str) -> str:
        return gateway.charge(order_id, card)

    with pytest.raises(GatewayTimeout):
        charge(2, "4111")
    gateway.down = False
    assert charge(2, "4111") == "receipt 2 4111"  # the customer tried again
    report = queue.process_due(now=LATER)
    assert [r.outcome for r in report.results] == ["completed"]
    assert len(gateway.charges) == 2


def test_a_route_never_gets_redacted_arguments(queue: DeadLetterQueue) -> None:
    handed: list[dict[str, Any]] = []
    register_route("tests-redacted-route", lambda letter, arguments: handed.append(arguments))
    try:
        queue.record(
            "tasks.charge",
            GatewayTimeout("x"),
            arguments={"order_id": 1, "card": Redacted("<redacted>")},
            route="tests-redacted-route",
        )
        report = queue.process_due(now=LATER)
        assert [r.outcome for r in report.results] == ["held"]
        assert handed == []
    finally:
        unregister_route("tests-redacted-route")


def test_keeping_every_argument_without_redact_warns_once_per_function(
    queue: DeadLetterQueue,
) -> None:
    @dead_letter(queue=queue, swallow=True)
    def charge(order_id: int, card: str) -> None:
        raise GatewayTimeout("x")

    @dead_letter(queue=queue, swallow=True, redact=keep_all)
    def refund(order_id: int) -> None:
        raise GatewayTimeout("x")

    @dead_letter(queue=queue, swallow=True, redact=lambda a: {"order_id": a["order_id"]})
    def capture(order_id: int, card: str) -> None:
        raise GatewayTimeout("x")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        charge(1, "4111")
        charge(2, "4222")
        refund(1)
        capture(1, "4111")
    kept_all = [w for w in caught if issubclass(w.category, KeepsAllArgumentsWarning)]
    assert len(kept_all) == 1
    message = str(kept_all[0].message)
    assert charge.dead_letter_name in message
    assert "order_id, card" in message
    assert "redact=" in message
    assert "4111" not in message
    assert kept_all[0].filename == __file__  # points at the caller


def test_replay_with_must_be_a_sync_callable() -> None:
    async def reload(kept: dict[str, Any]) -> dict[str, Any]:
        return kept

    with pytest.raises(idempotask.ConfigurationError, match="replay_with"):
        dead_letter(replay_with=reload)(lambda n: n)  # type: ignore[arg-type]
    with pytest.raises(idempotask.ConfigurationError, match="replay_with"):
        dead_letter(replay_with="reload")(lambda n: n)  # type: ignore[arg-type]


async def test_the_async_processor_runs_replay_with_off_the_loop(queue: DeadLetterQueue) -> None:
    threads: list[int] = []
    loop_thread = threading.get_ident()

    def reload(kept: dict[str, Any]) -> dict[str, Any]:
        threads.append(threading.get_ident())
        return {**kept, "card": "4111"}

    fail = [True]

    @dead_letter(queue=queue, redact=lambda a: {**a, "card": "<r>"}, replay_with=reload)
    @idempotent
    async def charge(order_id: int, card: str) -> str:
        if fail[0]:
            raise GatewayTimeout("x")
        return f"{order_id} {card}"

    with pytest.raises(GatewayTimeout):
        await charge(4, "4111")
    fail[0] = False
    report = await queue.aprocess_due(now=LATER)
    assert [r.outcome for r in report.results] == ["resolved"]
    assert threads
    assert threads[0] != loop_thread
    assert await charge(4, "4111") == "4 4111"


def test_a_replay_clears_the_cached_error_under_previous_names_too(
    queue: DeadLetterQueue,
) -> None:
    """Under cache_errors= and previous_names=, the failure is cached under both names:
    the replay must clear both, or the old name's cached error answers it without
    running (and the letter counts a failed attempt that never ran)."""
    gateway = Gateway()
    idempotask.configure(backend="memory://")

    @dead_letter(queue=queue, redact=keep_all)
    @idempotent(
        ttl=3600,
        cache_errors=600,
        name="tests.replay.renamed",
        previous_names=("tests.replay.was",),
    )
    def charge(order_id: int, card: str) -> str:
        return gateway.charge(order_id, card)

    with pytest.raises(GatewayTimeout):
        charge(7, "4111111111111111")
    gateway.down = False
    report = queue.process_due(now=LATER)
    assert [r.outcome for r in report.results] == ["resolved"]
    assert len(gateway.charges) == 2
    assert charge(7, "4111111111111111") == "receipt 7 1111"
    assert len(gateway.charges) == 2

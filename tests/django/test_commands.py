"""``manage.py idempotask``, run through Django's ``call_command`` in a real project, on
SQLite, PostgreSQL and MariaDB: every ``dlq`` and ``keys`` subcommand end to end on letters
written by real ``@dead_letter`` failures, its output the command line's own, changes
recorded with who made them, and every bad input a ``CommandError`` naming what was
wrong, with the command line's exit code."""

from __future__ import annotations

import getpass
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")

from django.core.management import CommandError, call_command

from idempotask import config, dead_letter, idempotent
from idempotask.backends.base import State, SupportsExpireNow
from idempotask.cli import main as cli_main
from idempotask.deadletter import DeadLetterQueue, _replay, keep_all
from tests.django._admin_project import (
    Current,
    admin_project,  # noqa: F401 - a fixture, used by `on_each`
    on_each,  # noqa: F401 - a fixture, used through `each_database`
    store_url,
)

pytestmark = pytest.mark.postgres
each_database = pytest.mark.usefixtures("on_each")  # SQLite, PostgreSQL, MariaDB

FAIL = {"charge": True}


@dead_letter(
    name="djcommands.charge",
    redact=lambda a: {**a, "card": "<redacted>"},
    replay_with=lambda kept: {**kept, "card": "4111 1111 1111 1111"},
)
@idempotent(name="djcommands.charge", ttl=3600)
def charge(order_id: int, card: str) -> dict[str, Any]:
    if FAIL["charge"]:
        raise TimeoutError(f"gateway timed out for order {order_id}")
    return {"order_id": order_id, "charged": True}


@dead_letter(name="djcommands.reject", redact=keep_all)
@idempotent(name="djcommands.reject", ttl=3600)
def reject(order_id: int) -> None:
    raise ValueError(f"order {order_id} is malformed")


@pytest.fixture(autouse=True)
def _failing() -> None:
    FAIL["charge"] = True


def manage(*args: str) -> tuple[str, str]:
    """Run ``manage.py idempotask ARGS``; its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    call_command("idempotask", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def refused(*args: str) -> CommandError:
    """Run ``manage.py idempotask ARGS``, which must fail: its ``CommandError``."""
    with pytest.raises(CommandError) as caught:
        manage(*args)
    return caught.value


def failed_charge(order_id: int = 7) -> str:
    """A dead letter of ``charge``, written by a real failure; its id."""
    with pytest.raises(TimeoutError):
        charge(order_id, "4111 1111 1111 1111")
    (letter,) = DeadLetterQueue().query(function="djcommands.charge", search=f"order {order_id}")
    return letter.id


def failed_reject(order_id: int = 9) -> str:
    with pytest.raises(ValueError, match="malformed"):
        reject(order_id)
    (letter,) = DeadLetterQueue().query(function="djcommands.reject")
    return letter.id


def me() -> str:
    return f"manage.py:{getpass.getuser()}"


@each_database
def test_dlq_list_shows_letters_as_a_table_and_filters_them() -> None:
    charged, rejected = failed_charge(), failed_reject()
    out, _ = manage("dlq", "list")
    assert out.splitlines()[0].split()[:5] == ["ID", "FUNCTION", "KIND", "STATUS", "ATTEMPTS"]
    assert charged in out
    assert rejected in out
    out, _ = manage("dlq", "list", "--status", "abandoned")
    assert rejected in out
    assert charged not in out
    out, _ = manage("dlq", "list", "--kind", "transient", "--function", "djcommands.charge")
    assert charged in out
    assert rejected not in out
    out, _ = manage("dlq", "list", "--search", "MALFORMED", "--json")
    assert [x["id"] for x in json.loads(out)] == [rejected]
    out, _ = manage("dlq", "list", "--status", "resolved")
    assert out.strip() == "no dead letters match"


@each_database
def test_dlq_show_prints_arguments_redacted_and_the_traceback() -> None:
    id = failed_charge()
    out, _ = manage("dlq", "show", id[:8])
    assert id in out
    assert "order_id = 7" in out
    assert "card = <redacted: '<redacted>'>" in out
    assert "4111 1111 1111 1111" not in out  # the card itself
    assert "Traceback (most recent call last)" in out
    assert "TimeoutError: gateway timed out for order 7" in out


@each_database
def test_output_is_the_command_lines_own(capsys: pytest.CaptureFixture[str]) -> None:
    """`manage.py idempotask dlq show --json` prints what `idempotask dlq show --json`
    prints for the same letter."""
    id = failed_charge()
    ours, _ = manage("dlq", "show", id, "--json")
    namespace = config.settings().namespace
    capsys.readouterr()
    url = store_url(Current.alias)
    code = cli_main(["--url", url, "--namespace", namespace, "dlq", "show", id, "--json"])
    assert code == 0
    assert json.loads(ours) == json.loads(capsys.readouterr().out)


@each_database
def test_retry_resolve_and_abandon_are_recorded_with_the_actor() -> None:
    first, second, third = failed_charge(1), failed_charge(2), failed_charge(3)
    out, _ = manage("dlq", "retry", first)
    assert out.strip().startswith(f"requeued {first} (djcommands.charge): now")
    out, _ = manage("dlq", "resolve", second, "--note", "refunded  by\nhand", "--actor", "alice")
    assert out.strip() == f"resolved {second} (djcommands.charge): now resolved"
    out, _ = manage("dlq", "abandon", third, "--note", "customer left")
    assert out.strip() == f"abandoned {third} (djcommands.charge): now abandoned"
    queue = DeadLetterQueue()
    requeued = queue.find(first)
    assert requeued.next_retry_at is not None
    assert requeued.next_retry_at <= requeued.last_failed_at + 3600
    assert (requeued.history[-1].what, requeued.history[-1].actor) == ("requeued", me())
    resolved = queue.find(second).history[-1]
    assert (resolved.what, resolved.actor) == ("resolved", "alice")
    assert resolved.note == "refunded by hand"
    abandoned = queue.find(third).history[-1]
    assert (abandoned.what, abandoned.actor, abandoned.note) == ("abandoned", me(), "customer left")


@each_database
def test_retry_all_by_filter_then_process_replays_the_letter() -> None:
    id = failed_charge()
    out, _ = manage("dlq", "retry", "--all", "--function", "djcommands.charge")
    assert out.strip() == "requeued 1 dead letter: due now"
    FAIL["charge"] = False
    out, _ = manage("dlq", "process")
    assert out.splitlines()[0].startswith("claimed 1: 1 resolved, 0 failed")
    assert id in out
    letter = DeadLetterQueue().find(id)
    assert (letter.status.value, letter.resolution) == ("resolved", "retry")
    assert charge(7, "4111 1111 1111 1111") == {"order_id": 7, "charged": True}


@each_database
def test_stats_counts_by_status_kind_and_function() -> None:
    failed_charge()
    failed_reject()
    out, _ = manage("dlq", "stats", "--hours", "1")
    assert out.startswith("Dead letters whose last failure is in the past 1h")
    data = json.loads(manage("dlq", "stats", "--json")[0])
    assert data["total"] == 2
    assert {s: n for s, n in data["by_status"].items() if n} == {"pending": 1, "abandoned": 1}
    assert data["by_function"] == {"djcommands.charge": 1, "djcommands.reject": 1}


@each_database
def test_purge_deletes_closed_letters_and_asks_for_yes() -> None:
    kept, closed = failed_charge(), failed_reject()
    out, _ = manage("dlq", "purge", "--older-than", "0", "--dry-run")
    assert out.strip().startswith("would delete 1 dead letter (resolved, abandoned)")
    error = refused("dlq", "purge", "--older-than", "0")
    assert "pass --yes" in str(error)
    assert error.returncode == 1
    out, _ = manage("dlq", "purge", "--older-than", "0", "--yes")
    assert out.strip() == "deleted 1 dead letter"
    queue = DeadLetterQueue()
    assert queue.get(closed) is None
    assert queue.get(kept) is not None


@each_database
def test_dlq_flush_delivers_spooled_letters(tmp_path: Path) -> None:
    """A letter waiting in the spool (the store was down when it was written) reaches the
    store through `dlq flush`."""
    from idempotask.backends.base import DeadLetter
    from idempotask.spool import Spool

    spool = tmp_path / "spool.jsonl"
    letter = DeadLetter(
        id=uuid.uuid4().hex,
        function="djcommands.charge",
        kind="transient",
        error_type="builtins.TimeoutError",
        message="spooled",
        last_failed_at=1.0,
        first_failed_at=1.0,
    )
    Spool(str(spool)).append(letter)
    out, _ = manage("dlq", "flush", "--spool", str(spool))
    assert out.startswith("delivered 1 spooled dead letter; 0 still waiting")
    assert DeadLetterQueue().find(letter.id).message == "spooled"


@each_database
def test_keys_show_and_forget_a_record() -> None:
    FAIL["charge"] = False
    assert charge(8, "x")["charged"]
    key = charge.key_for(8, "x")
    out, _ = manage("keys", "show", key)
    assert "state:       completed" in out
    assert "'charged': True" in out
    out, _ = manage("keys", "forget", key)
    assert out.strip() == f"forgot {key} (it was completed); the next call runs again"
    assert config.get_backend().get(key) is None
    error = refused("keys", "show", key)
    assert str(error) == f"no record under key {key!r}"
    assert error.returncode == 1


@each_database
def test_keys_list_and_compute_find_a_functions_keys() -> None:
    FAIL["charge"] = False
    charge(12, "y")
    key = charge.key_for(12, "y")
    out, _ = manage("keys", "list", "djcommands.charge")
    assert key in out
    assert "completed" in out
    out, _ = manage("keys", "compute", "djcommands.charge", '{"order_id": 12, "card": "y"}')
    assert out.strip() == f"key: {key}"
    error = refused("keys", "compute", "djcommands.charge", "[1, 2]")
    assert error.returncode == 2
    assert "ARGUMENTS" in str(error)


@each_database
def test_keys_forget_refuses_a_claim_in_progress_without_force() -> None:
    key = charge.key_for(5, "x")
    assert config.get_backend().claim(key, "token-1", lease=60).state is State.IN_PROGRESS
    error = refused("keys", "forget", key)
    assert "is in progress" in str(error)
    assert "--force" in str(error)
    assert error.returncode == 1
    manage("keys", "forget", key, "--force")
    assert config.get_backend().get(key) is None


@each_database
def test_keys_purge_deletes_expired_records() -> None:
    from idempotask.django.models import IdempotencyRecord

    backend = config.get_backend()
    key = charge.key_for(6, "x")
    backend.claim(key, "token-1", lease=60)
    assert isinstance(backend, SupportsExpireNow)
    assert backend.expire_now(key)
    assert IdempotencyRecord.objects.using(Current.alias).filter(key=key).exists()
    data = json.loads(manage("keys", "purge", "--json")[0])
    assert data["purges"]
    assert data["deleted"] >= 1
    assert not IdempotencyRecord.objects.using(Current.alias).filter(key=key).exists()


@each_database
def test_backend_option_reaches_a_store_by_url_or_alias() -> None:
    """`--backend URL` or `--backend ALIAS` reads that store (its dead letters too),
    whatever is configured, for that command only."""
    id = failed_charge()
    namespace = config.settings().namespace
    config.reset()
    config.configure(backend="memory://")
    for store in (store_url(Current.alias), Current.alias):
        out, err = manage("dlq", "list", "--backend", store, "--namespace", namespace)
        assert id in out
        assert err == ""
    out, err = manage("dlq", "list", "--namespace", namespace)
    assert out.strip() == "no dead letters match"
    assert "memory://" in err
    assert "--backend STORE" in err
    out, _ = manage(
        "dlq",
        "show",
        id,
        "--backend",
        "memory://",
        "--dead-letter-store",
        Current.alias,
        "--namespace",
        namespace,
    )
    assert id in out
    error = refused("dlq", "list", "--backend", "nosuchalias")
    assert "'nosuchalias' is neither a URL" in str(error)
    assert "'default'" in str(error)


# -- bad input -------------------------------------------------------------------------------


@each_database
def test_an_unknown_id_is_a_command_error_naming_it() -> None:
    known = failed_charge()
    error = refused("dlq", "show", "feedc0de")
    assert "feedc0de" in str(error)
    assert error.returncode == 1
    out = io.StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("idempotask", "dlq", "resolve", known, "nosuchid", stdout=out)
    assert "nosuchid" in str(caught.value)
    assert caught.value.returncode == 1
    assert f"resolved {known}" in out.getvalue()  # the known one was resolved all the same


@each_database
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("dlq", "list", "--kind", "sometimes"), "--kind"),
        (("dlq", "list", "--limit", "0"), "--limit"),
        (("dlq", "list", "--since", "yesterday-ish"), "--since"),
        (("dlq", "retry"), "give the ids to retry, or --all with filters"),
        (("dlq", "retry", "abcd", "--all"), "give ids or --all, not both"),
        (("dlq", "process", "--interval", "5s"), "--interval goes with --loop"),
        (("dlq", "teleport"), "teleport"),
        (("keys", "purge", "--batch", "-3"), "--batch"),
        (("dlq", "resolve", "abcd", "--actor", "  "), "--actor"),
    ],
)
def test_bad_usage_is_a_command_error_naming_the_option(args: tuple[str, ...], says: str) -> None:
    error = refused(*args)
    assert says in str(error)


@each_database
def test_retry_all_without_a_filter_needs_yes() -> None:
    error = refused("dlq", "retry", "--all")
    assert "--all without a filter" in str(error)
    assert error.returncode == 1


@each_database
def test_an_unreachable_store_exits_3_without_its_password() -> None:
    url = "postgresql+psycopg://app:s3cret@127.0.0.1:1/app?connect_timeout=2"
    error = refused("dlq", "list", "--backend", url)
    assert error.returncode == 3
    assert str(error).startswith("cannot reach the dead-letter store at")
    assert "s3cret" not in str(error)


@each_database
def test_a_bad_url_is_a_usage_error() -> None:
    error = refused("keys", "show", "k", "--backend", "nosuchscheme://x")
    assert error.returncode == 2
    assert "nosuchscheme" in str(error)


@each_database
def test_process_without_known_functions_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked to replay only a function this process does not know, `dlq process` claims
    nothing and says why, naming the due letters and --import (exit 1)."""
    # A process with no integration route: an integration imported by an earlier test
    # registers its route for the whole session, and a process with routes claims letters
    # of any function (they may be the route's tasks) and skips what it cannot replay.
    monkeypatch.setattr(_replay, "_routes", {})
    queue = DeadLetterQueue()
    letter = queue.record(f"elsewhere.{uuid.uuid4().hex[:6]}", TimeoutError("x"), arguments={})
    queue.requeue(letter.id)
    error = refused("dlq", "process", "--function", letter.function)
    assert error.returncode == 1
    assert letter.function in str(error)
    assert "--import MODULE" in str(error)
    assert queue.find(letter.id).history[-1].what == "requeued"  # not claimed


def test_manage_py_runs_it_from_the_command_line(tmp_path: Path) -> None:
    """A real `python -m django` (manage.py) process whose IDEMPOTASK setting names the
    `default` alias: migrate, then the command on that store (and on one named by
    `--backend`), with the command line's exit codes and Django's `CommandError:` line."""
    namespace = f"djcli{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.django._cli_settings",
        "IDEMPOTASK_TEST_SQLITE": str(tmp_path / "cli.sqlite3"),
        "IDEMPOTASK_TEST_NS": namespace,
    }
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"

    def django(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "django", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(Path(__file__).resolve().parents[2]),
        )

    done = django("migrate", "idempotask", "-v", "0")
    assert done.returncode == 0, done.stderr
    config.configure(namespace=namespace)
    queue = DeadLetterQueue(url)
    letter = queue.record("cli.job", TimeoutError("gateway"), arguments={"order_id": 3})
    done = django("idempotask", "dlq", "list")  # the store IDEMPOTASK configures
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].startswith(letter.id)
    assert "\n\n" not in done.stdout  # one line end per line
    done = django("idempotask", "dlq", "resolve", letter.id[:6], "--backend", url, "--note", "ok")
    assert done.returncode == 0, done.stderr
    assert queue.find(letter.id).history[-1].actor == me()
    done = django("idempotask", "dlq", "show", "nosuchletter")
    assert done.returncode == 1
    assert done.stderr.startswith("CommandError: ")
    assert "nosuchletter" in done.stderr
    done = django("idempotask", "dlq", "list", "--kind", "sometimes")
    assert done.returncode == 2
    assert "--kind" in done.stderr

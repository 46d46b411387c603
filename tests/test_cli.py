"""The ``idempotask`` command, run for real: ``python -m idempotask`` in a subprocess
against Redis, which holds both the idempotency records and the dead letters (the dead-letter
tests need the Redis store's letter history, and search; they skip, saying so, until it
has them).

Letters are made through the public API in this process, by calling functions of a small
module written to a temporary directory; the command imports the same module with
``--import`` so that ``dlq process`` can replay them. Each run has a dead-letter queue of
its own (``?prefix=``), emptied after every test, and each test its own key namespace, so
runs sharing the server do not see each other.

The Redis server is ``IDEMPOTASK_REDIS_URL`` (skipped when it is down, failed under
``IDEMPOTASK_REQUIRE_SERVICES=1``); dead-letter tests also need the Redis dead-letter store.
"""

from __future__ import annotations

import getpass
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import idempotask
from idempotask.backends.base import State
from idempotask.backends.deadletters import (
    DeadLetter,
    DeadLetterFilter,
    Status,
    dead_letter_store_from_url,
)
from idempotask.cli._text import parse_duration, parse_time
from idempotask.deadletter import DeadLetterQueue
from idempotask.errors import ConfigurationError
from tests._deadletter_support import (
    skip_unless_keeps_history,
    skip_unless_namespaced,
    skip_unless_searches,
)
from tests.conftest import service_url

ROOT = Path(__file__).resolve().parent.parent
needs_redis = pytest.mark.redis
RUN = uuid.uuid4().hex[:10]
PREFIX = f"clitest{RUN}"
MODULE = f"clijobs_{RUN}"
CHARGE, REJECT, HOLD = f"{PREFIX}.charge", f"{PREFIX}.reject", f"{PREFIX}.hold"

JOBS = f'''
"""Functions the CLI tests make fail; the command imports this module with --import."""

import dataclasses
import os
import threading

from idempotask import dead_letter, idempotent

RELEASE = threading.Event()


@dataclasses.dataclass(frozen=True)
class Order:
    id: int
    total: str


@dead_letter(name="{CHARGE}")
@idempotent(name="{CHARGE}", ttl=600)
def charge(order: Order, gate: str) -> str:
    """Times out until the file ``gate`` exists; then notes the run in ``gate.runs``."""
    if not os.path.exists(gate):
        raise TimeoutError(f"gateway timed out for order {{order.id}}")
    with open(gate + ".runs", "a") as runs:
        runs.write(f"{{order.id}}\\n")
    return f"charged {{order.id}}"


@dead_letter(name="{REJECT}")
def reject(order_id: int) -> None:
    """Always fails for good."""
    raise ValueError(f"order {{order_id}} is invalid")


@idempotent(name="{HOLD}", ttl=600)
def hold(n: int) -> int:
    """Runs until RELEASE is set: its key stays in progress meanwhile."""
    RELEASE.wait(30)
    return n
'''


@dataclass
class Result:
    """What one run of the command did."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """The output parsed as JSON."""
        return json.loads(self.out)


class Cli:
    """Runs ``python -m idempotask`` with this test's stores, namespace and module."""

    def __init__(self, env: dict[str, str], namespace: str, cwd: Path) -> None:
        self.env = env
        self.namespace = namespace
        self.cwd = cwd

    def argv(self, args: tuple[str, ...], imports: bool) -> list[str]:
        """The full command line."""
        first = ["--namespace", self.namespace, *(["--import", MODULE] if imports else [])]
        return [sys.executable, "-m", "idempotask", *first, *args]

    def __call__(self, *args: str, code: int = 0, imports: bool = True) -> Result:
        """Run the command and check its exit code (the output is in the failure)."""
        done = subprocess.run(
            self.argv(args, imports),
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        result = Result(done.returncode, done.stdout, done.stderr)
        assert result.code == code, (
            f"idempotask {' '.join(args)}: exit {result.code}, expected {code}\n"
            f"stdout:\n{result.out}\nstderr:\n{result.err}"
        )
        return result

    def all(self, *commands: tuple[str, ...], code: int = 0, imports: bool = True) -> list[Result]:
        """Run commands that do not change anything side by side; results in order."""
        with ThreadPoolExecutor(len(commands)) as pool:
            runs = [pool.submit(self, *args, code=code, imports=imports) for args in commands]
            return [run.result() for run in runs]

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start the command in the background."""
        return subprocess.Popen(
            self.argv(args, True),
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the jobs module (written once: a module imports once)."""
    path = tmp_path_factory.mktemp("clijobs")
    (path / f"{MODULE}.py").write_text(textwrap.dedent(JOBS))
    return path


@pytest.fixture(scope="module")
def jobs(jobs_dir: Path) -> Iterator[ModuleType]:
    """The jobs module, imported in this process too."""
    sys.path.insert(0, str(jobs_dir))
    try:
        yield importlib.import_module(MODULE)
    finally:
        sys.path.remove(str(jobs_dir))
        sys.modules.pop(MODULE, None)


@pytest.fixture
def redis_url() -> str:
    """The Redis server (skipped, or failed when required, if it is down)."""
    return service_url("redis")


def queue_url(redis_url: str) -> str:
    """The dead-letter queue of this run: the server's URL with a prefix of its own."""
    return f"{redis_url}{'&' if '?' in redis_url else '?'}prefix={PREFIX}"


@pytest.fixture
def dlq_url(redis_url: str) -> Iterator[str]:
    """This run's Redis dead-letter queue; the letters a test leaves are purged after it."""
    url = queue_url(redis_url)
    try:
        store = dead_letter_store_from_url(url)
    except ConfigurationError as exc:
        pytest.fail(f"the Redis dead-letter store cannot be built ({exc})")
    yield url
    store.purge(DeadLetterFilter())


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own, so its idempotency keys are new."""
    return f"cli{uuid.uuid4().hex[:12]}"


@pytest.fixture
def env(tmp_path: Path, jobs_dir: Path) -> dict[str, str]:
    """The command's environment: no store configured, a spool in tmp_path, the jobs
    module on the path."""
    path = [str(jobs_dir), str(ROOT), os.environ.get("PYTHONPATH", "")]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPOTASK_")}
    return {
        **inherited,
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        "IDEMPOTASK_SPOOL": str(tmp_path / "spool.jsonl"),
        "COLUMNS": "200",
    }


@pytest.fixture
def offline(env: dict[str, str], namespace: str, tmp_path: Path) -> Cli:
    """The command, for tests that reach no store (help, usage errors, closed ports)."""
    return Cli(env, namespace, tmp_path)


@pytest.fixture
def cli(env: dict[str, str], namespace: str, tmp_path: Path, redis_url: str) -> Cli:
    """The command on Redis: $IDEMPOTASK_URL is the server, $IDEMPOTASK_DEAD_LETTER_URL
    this run's queue on it; this process is configured alike."""
    idempotask.configure(backend=redis_url, namespace=namespace)
    stores = {"IDEMPOTASK_URL": redis_url, "IDEMPOTASK_DEAD_LETTER_URL": queue_url(redis_url)}
    return Cli({**env, **stores}, namespace, tmp_path)


@pytest.fixture
def queue(cli: Cli, dlq_url: str, jobs: ModuleType, tmp_path: Path) -> DeadLetterQueue:
    """This process's queue, on the same Redis dead-letter queue as the command (skipped
    while that store keeps no letter history: every change appends to it)."""
    idempotask.configure(dead_letter_store=dlq_url, spool_path=tmp_path / "spool.jsonl")
    queue = idempotask.default_queue()
    skip_unless_keeps_history(queue.store)
    return queue


def fail_charge(jobs: ModuleType, order_id: int, gate: Path) -> str:
    """Call the charge job so it fails; the id of its (newest) letter."""
    with pytest.raises(TimeoutError):
        jobs.charge(jobs.Order(order_id, "9.99"), str(gate))
    letters = idempotask.default_queue().query(function=CHARGE)
    assert letters, "the failure was not recorded"
    return letters[0].id


def fail_reject(jobs: ModuleType, order_id: int) -> str:
    """Call the reject job so it fails for good; the id of its letter."""
    with pytest.raises(ValueError, match="invalid"):
        jobs.reject(order_id)
    return idempotask.default_queue().query(function=REJECT)[0].id


def closed_port() -> int:
    """A local TCP port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- help and usage -------------------------------------------------------------------------


def test_help_lists_every_command_and_the_exit_codes(offline: Cli) -> None:
    """The top-level help names both groups, the global options and the exit codes."""
    top, dlq, forget, version = offline.all(
        ("--help",), ("dlq", "--help"), ("keys", "forget", "--help"), ("--version",), imports=False
    )
    for word in ("dlq", "keys", "--url", "--dead-letter-url", "--import", "--json", "exit codes"):
        assert word in top.out
    for command in ("list", "show", "retry", "resolve", "abandon", "purge", "stats", "process"):
        assert command in dlq.out
    assert "--force" in forget.out
    assert version.out.startswith("idempotask ")


def test_bad_durations_times_and_combinations_are_usage_errors(offline: Cli) -> None:
    """Usage errors exit 2 with argparse's message naming the option."""
    expected = {
        ("dlq", "purge", "--older-than", "3x"): "--older-than: invalid duration '3x'",
        ("dlq", "list", "--since", "last tuesday"): "--since: invalid time 'last tuesday'",
        ("dlq", "process", "--lease", "0"): "--lease: invalid duration '0': must be more than 0",
        ("dlq", "process", "--interval", "5s"): "--interval goes with --loop",
        ("dlq", "retry", "abc", "--all"): "give ids or --all, not both",
        ("dlq", "retry"): "give the ids to retry, or --all with filters",
        ("dlq", "list", "--status", "lost"): "--status: invalid choice: 'lost'",
        ("dlq",): "the following arguments are required: COMMAND",
    }
    for (args, message), result in zip(
        expected.items(), offline.all(*expected, code=2, imports=False), strict=True
    ):
        assert message in result.err, f"{args}: {result.err}"
        assert "usage: idempotask" in result.err


def test_an_unknown_scheme_is_a_usage_error_without_a_traceback(offline: Cli) -> None:
    """A bad --url exits 2 with one line that names the problem."""
    result = offline("--url", "bogus://x", "keys", "show", "k", code=2, imports=False)
    assert "unknown URL scheme 'bogus'" in result.err
    assert "Traceback" not in result.err


def test_a_module_that_cannot_be_imported_is_a_usage_error(offline: Cli) -> None:
    """--import of a missing module exits 2 and names it."""
    result = offline("--import", "no_such_module_xyz", "keys", "show", "k", code=2, imports=False)
    assert "--import no_such_module_xyz: ModuleNotFoundError" in result.err


def test_durations_and_times_parse_as_documented() -> None:
    """Durations take units or plain seconds; times take ISO 8601 or a duration ago."""
    assert parse_duration("90s") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("24h") == 86400
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("2.5") == 2.5
    for bad in ("", "-5", "5x", "h", "1e3", "inf"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)
    assert parse_time("2026-01-02T03:04:05Z") == 1767323045.0
    assert parse_time("2026-01-02T03:04:05") == 1767323045.0  # naive means UTC
    assert parse_time("2026-01-02T04:04:05+01:00") == 1767323045.0
    assert parse_time("24h", now=100000.0) == 100000.0 - 86400
    with pytest.raises(ValueError, match="invalid time"):
        parse_time("yesterday")


# -- stores that cannot be reached ----------------------------------------------------------


def test_an_unreachable_idempotency_store_exits_3_promptly_without_its_password(
    offline: Cli,
) -> None:
    """keys show against a closed port: exit 3 within seconds, password hidden."""
    pytest.importorskip("redis")
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    started = time.monotonic()
    result = offline("--url", url, "keys", "show", "k", code=3, imports=False)
    assert time.monotonic() - started < 15
    assert "cannot reach the idempotency store at redis://:***@127.0.0.1:" in result.err
    assert "hunter2" not in result.err + result.out
    assert "Traceback" not in result.err
    assert "Traceback" in offline("--url", url, "--debug", "keys", "show", "k", code=3).err


def test_an_unreachable_dead_letter_store_exits_3_promptly_without_its_password(
    offline: Cli,
) -> None:
    """dlq list against a closed port: exit 3 within seconds, password hidden."""
    pytest.importorskip("redis")
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    try:
        dead_letter_store_from_url(url)
    except ConfigurationError as exc:
        pytest.fail(f"the Redis dead-letter store cannot be built ({exc})")
    started = time.monotonic()
    result = offline("--dead-letter-url", url, "dlq", "list", code=3, imports=False)
    assert time.monotonic() - started < 15
    assert "cannot reach the dead-letter store at redis://:***@127.0.0.1:" in result.err
    assert "hunter2" not in result.err + result.out
    assert "Traceback" not in result.err


# -- dlq list / show ------------------------------------------------------------------------


@needs_redis
def test_list_shows_letters_as_a_table_and_as_json(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """A failed call appears in the table with its kind, status, times and message."""
    charge_id = fail_charge(jobs, 1, tmp_path / "gate")
    reject_id = fail_reject(jobs, 2)
    text = cli("dlq", "list").out
    header, *rows = text.splitlines()
    assert header.split()[:5] == ["ID", "FUNCTION", "KIND", "STATUS", "ATTEMPTS"]
    assert "LAST FAILURE" in header
    assert "NEXT RETRY" in header
    assert "MESSAGE" in header
    row = next(r for r in rows if r.startswith(charge_id))
    assert row.split()[1:5] == [CHARGE, "transient", "pending", "1"]
    assert "ago (" in row or "now (" in row  # relative, then ISO
    assert "in 4m (" in row or "in 5m (" in row or "in 6m (" in row or "in 7m (" in row
    assert "TimeoutError: gateway timed out for order 1" in row
    assert any(r.startswith(reject_id) and "abandoned" in r for r in rows)

    letters = cli("dlq", "list", "--function", CHARGE, "--json").json()
    assert [x["id"] for x in letters] == [charge_id]
    (letter,) = letters
    assert letter["status"] == "pending"
    assert letter["kind"] == "transient"
    assert letter["error_type"] == "builtins.TimeoutError"
    assert letter["last_failed_at"].endswith("Z")
    assert letter["next_retry_at"].endswith("Z")
    assert letter["key"].startswith(f"{cli.namespace}:{CHARGE}:v1:")
    assert sorted(letter) == sorted(
        [
            "id",
            "function",
            "kind",
            "status",
            "attempts",
            "error_type",
            "message",
            "key",
            "route",
            "critical",
            "resolution",
            "version",
            "first_failed_at",
            "last_failed_at",
            "next_retry_at",
            "held",
        ]
    )
    assert letter["held"] is False


@needs_redis
def test_list_filters_by_status_kind_time_and_pages(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """--status, --kind, --since/--until, --limit and --offset narrow the list."""
    charged = [fail_charge(jobs, n, tmp_path / "gate") for n in (1, 2, 3)]
    rejected = fail_reject(jobs, 4)
    old = queue.record(REJECT, ValueError("old"), now=time.time() - 3 * 86400).id

    queries: dict[tuple[str, ...], list[str]] = {
        ("--status", "pending"): charged,
        ("--status", "ABANDONED"): [rejected, old],
        ("--kind", "permanent"): [rejected, old],
        ("--function", CHARGE, "--function", REJECT): [*charged, rejected, old],
        ("--function", CHARGE, "--kind", "permanent"): [],
        ("--since", "1d"): [*charged, rejected],
        ("--until", "2d"): [old],
        ("--since", "2026-01-01T00:00:00Z", "--until", "1d"): [old],
    }
    runs = cli.all(*(("dlq", "list", *args, "--json") for args in queries))
    for (args, want), run in zip(queries.items(), runs, strict=True):
        assert sorted(x["id"] for x in run.json()) == sorted(want), args

    first, second, nothing = cli.all(
        ("dlq", "list", "--limit", "2"),
        ("dlq", "list", "--limit", "2", "--offset", "2", "--json"),
        ("dlq", "list", "--function", "no.such.function"),
    )
    _header, *rows, more = first.out.splitlines()
    assert more == "(first 2 from offset 0; more: --offset 2)"
    pages = [row.split()[0] for row in rows] + [x["id"] for x in second.json()]
    assert len(pages) == 4
    assert set(pages) == {*charged, rejected}  # newest first: the old one comes last
    assert nothing.out.strip() == "no dead letters match"


@needs_redis
def test_show_prints_every_field_with_decoded_arguments_and_traceback(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """dlq show decodes the stored arguments (the imported dataclass too)."""
    gate = tmp_path / "gate"
    letter_id = fail_charge(jobs, 7, gate)
    text = cli("dlq", "show", letter_id).out
    for expected in (
        f"id:            {letter_id}",
        f"function:      {CHARGE}",
        "status:        pending",
        "kind:          transient",
        "attempts:      1",
        "error:         builtins.TimeoutError: gateway timed out for order 7",
        f"key:           {cli.namespace}:{CHARGE}:v1:",
        "next retry:    in ",
        "arguments:",
        "  order = Order(id=7, total='9.99')",
        f"  gate = {str(gate)!r}",
        "traceback:",
        "  Traceback (most recent call last):",
        "  TimeoutError: gateway timed out for order 7",
    ):
        assert expected in text, f"{expected!r} not in:\n{text}"

    data = cli("dlq", "show", letter_id, "--json").json()
    assert data["arguments_repr"] == {
        "order": "Order(id=7, total='9.99')",
        "gate": repr(str(gate)),
    }
    assert data["arguments"]["gate"] == str(gate)  # the typed JSON document itself
    assert data["arguments_error"] is None
    assert "TimeoutError" in data["traceback"]

    hidden = cli("dlq", "show", letter_id, "--no-arguments").out
    assert "arguments:" not in hidden
    assert "9.99" not in hidden
    assert "arguments" not in cli("dlq", "show", letter_id, "--no-arguments", "--json").json()


@needs_redis
def test_show_without_the_module_says_why_arguments_cannot_be_decoded(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """Without --import the dataclass cannot be rebuilt: said, with the stored JSON."""
    letter_id = fail_charge(jobs, 8, tmp_path / "gate")
    text = cli("dlq", "show", letter_id, imports=False).out
    assert "cannot be decoded here" in text
    assert f"module {MODULE!r} is not imported" in text
    assert "stored as: " in text
    assert "9.99" in text


@needs_redis
def test_a_letter_written_into_the_store_by_hand_is_listed_and_shown(
    cli: Cli, queue: DeadLetterQueue
) -> None:
    """A time no calendar holds and arguments nested past the recursion limit: list and
    show still print the letter (no traceback)."""
    far = 1e300  # finite: every store takes it
    queue.store.add(
        DeadLetter(
            id="0000far",
            function="f",
            kind="transient",
            error_type="E",
            message="far away",
            arguments=b"[" * 100_000 + b"]" * 100_000,
            first_failed_at=far,
            last_failed_at=far,
        )
    )
    assert "far away" in cli("dlq", "list").out
    shown = cli("dlq", "show", "0000far").out
    assert "1e+300" in shown
    assert "not typed JSON" in shown
    assert cli("dlq", "show", "0000far", "--json").out


@needs_redis
def test_unknown_ids_exit_1_with_a_clear_message(cli: Cli, queue: DeadLetterQueue) -> None:
    """show, retry, resolve and abandon of an unknown id: exit 1, the id named."""
    commands = [("dlq", command, "nope") for command in ("show", "retry", "resolve", "abandon")]
    for result in cli.all(*commands, code=1):
        assert result.err.strip() == (
            "idempotask: error: no dead letter has id 'nope' or an id starting with it"
        )


# -- dlq retry / resolve / abandon / purge -------------------------------------------------


@needs_redis
def test_retry_makes_letters_due_now_and_reports_unknown_ids(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """dlq retry ID... requeues the known ids and exits 1 for the unknown one."""
    first = fail_charge(jobs, 1, tmp_path / "gate")
    second = fail_reject(jobs, 2)
    result = cli("dlq", "retry", first, second, "nope", code=1)
    assert f"requeued {first} ({CHARGE}): now pending" in result.out
    assert f"requeued {second} ({REJECT}): now pending" in result.out  # reopened
    assert "no dead letter has id 'nope'" in result.err
    for id in (first, second):
        letter = queue.get(id)
        assert letter is not None
        assert letter.status is Status.PENDING
        assert letter.next_retry_at is not None
        assert letter.next_retry_at <= time.time()

    data = cli("dlq", "retry", first, "--json").json()
    assert data["count"] == 1
    assert data["not_found"] == []
    assert data["letters"][0]["id"] == first


@needs_redis
def test_retry_of_a_letter_being_replayed_is_refused_and_the_others_are_requeued(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """dlq retry leaves a letter a processor is replaying right now alone: exit 1 with a
    one-line reason (no traceback), and the other ids given are still requeued."""
    busy = fail_charge(jobs, 1, tmp_path / "gate")
    other = fail_reject(jobs, 2)
    letter = queue.get(busy)
    assert letter is not None
    assert letter.next_retry_at is not None
    only = DeadLetterFilter(function=(CHARGE,))
    (claimed,) = queue.store.claim_due(letter.next_retry_at + 1, filter=only)  # mid-replay
    result = cli("dlq", "retry", busy, other, code=1)
    assert f"requeued {other} ({REJECT}): now pending" in result.out
    assert result.err.strip() == (
        f"idempotask: error: dead letter {busy!r} is being replayed by a processor right "
        "now; try again after the replay ends"
    )
    assert queue.get(busy) == claimed
    assert cli("dlq", "retry", "--all", "--function", CHARGE).out.strip() == (
        "requeued 0 dead letters: due now"
    )


@needs_redis
def test_retry_all_needs_a_filter_or_yes(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """retry --all without a filter is refused (exit 1); with one it requeues the matches."""
    letters = [fail_charge(jobs, n, tmp_path / "gate") for n in (1, 2)]
    refused = cli("dlq", "retry", "--all", code=1)
    assert "--all without a filter" in refused.err
    assert "--yes" in refused.err
    assert cli("dlq", "retry", "--all", "--function", CHARGE).out.strip() == (
        "requeued 2 dead letters: due now"
    )
    assert cli("dlq", "retry", "--all", "--yes", "--json").json() == {"count": 2}
    for id in letters:
        letter = queue.get(id)
        assert letter is not None
        assert letter.next_retry_at is not None
        assert letter.next_retry_at <= time.time()


@needs_redis
def test_resolve_with_a_note_and_abandon_close_letters(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """resolve and abandon close letters; the note and the operator's login name go to
    each letter's history, shown by `dlq show`."""
    first = fail_charge(jobs, 1, tmp_path / "gate")
    second = fail_charge(jobs, 2, tmp_path / "gate")
    out = cli("dlq", "resolve", first[:8], "--note", "refunded by hand").out
    assert out.strip() == f"resolved {first} ({CHARGE}): now resolved"
    resolved = queue.get(first)
    assert resolved is not None
    assert resolved.status is Status.RESOLVED
    assert resolved.resolution == "manual"
    assert resolved.next_retry_at is None
    last = resolved.history[-1]
    assert (last.what, last.actor, last.note) == (
        "resolved",
        f"cli:{getpass.getuser()}",
        "refunded by hand",
    )
    shown = cli("dlq", "show", first).out
    assert "status:        resolved (manual)" in shown
    history = shown.split("\nhistory:\n", 1)[1].split("\ntraceback:", 1)[0]
    assert "failed" in history
    assert f"resolved  cli:{getpass.getuser()}  refunded by hand" in history

    data = cli("dlq", "abandon", second, "--note", "customer left", "--json").json()
    assert data["count"] == 1
    assert data["letters"][0]["status"] == "abandoned"
    abandoned = queue.get(second)
    assert abandoned is not None
    assert abandoned.status is Status.ABANDONED
    assert abandoned.history[-1].note == "customer left"
    full = cli("dlq", "show", second, "--json").json()
    assert [h["what"] for h in full["history"]] == ["failed", "abandoned"]


@needs_redis
def test_purge_deletes_old_closed_letters_only_with_yes(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """purge counts first, refuses without --yes off a terminal, then deletes the old
    resolved and abandoned letters only."""
    long_ago = time.time() - 40 * 86400
    old_closed = queue.record(REJECT, ValueError("old"), now=long_ago).id
    old_open = queue.record(CHARGE, TimeoutError("old"), arguments={}, now=long_ago).id
    recent = fail_reject(jobs, 3)

    dry = cli("dlq", "purge", "--dry-run").out.strip()
    assert dry == (
        "would delete 1 dead letter (resolved, abandoned) whose last failure is more than 30d old"
    )
    refused = cli("dlq", "purge", code=1)
    assert "pass --yes to delete them" in refused.err
    assert queue.get(old_closed) is not None

    assert cli("dlq", "purge", "--yes").out.strip() == "deleted 1 dead letter"
    assert queue.get(old_closed) is None
    assert queue.get(old_open) is not None
    assert queue.get(recent) is not None

    data = cli("dlq", "purge", "--status", "pending", "--yes", "--json").json()
    assert data == {"deleted": 1, "matched": 1, "dry_run": False}
    assert queue.get(old_open) is None
    assert cli("dlq", "purge", "--older-than", "1h", "--yes").out.strip() == (
        "nothing to purge: no dead letters (resolved, abandoned) whose last failure is more "
        "than 1h old"
    )
    assert queue.get(recent) is not None


# -- dlq stats ------------------------------------------------------------------------------


@needs_redis
def test_stats_count_by_status_kind_and_function_and_add_up(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """Every breakdown sums to the total, in the table and in JSON."""
    for n in (1, 2, 3):
        fail_charge(jobs, n, tmp_path / "gate")
    fail_reject(jobs, 4)
    fail_reject(jobs, 5)
    data = cli("dlq", "stats", "--json").json()
    assert data["total"] == 5
    assert data["by_status"] == {"pending": 3, "retrying": 0, "resolved": 0, "abandoned": 2}
    assert data["by_kind"] == {"transient": 3, "permanent": 2}
    assert data["by_function"] == {CHARGE: 3, REJECT: 2}
    assert sum(row["count"] for row in data["rows"]) == 5
    assert data["retries_failed"] == 0
    assert data["retries_succeeded"] == 0

    text = cli("dlq", "stats", "--hours", "1").out
    assert "in the past 1h" in text
    assert text.splitlines()[0].endswith(": 5")
    lines = [line.split() for line in text.splitlines()]
    assert ["pending", "3"] in lines
    assert ["abandoned", "2"] in lines
    assert ["transient", "3"] in lines
    assert [CHARGE, "3"] in lines
    assert lines.count(["total", "5"]) == 3  # status, kind and function tables agree
    assert [CHARGE, "transient", "pending", "3", "0", "0"] in lines
    only = cli("dlq", "stats", "--function", REJECT, "--json").json()
    assert only["total"] == 2
    assert only["by_function"] == {REJECT: 2}


# -- dlq process ----------------------------------------------------------------------------


@needs_redis
def test_process_replays_a_due_letter_through_the_imported_function(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """After the cause is fixed, retry + process replays the call once: RESOLVED."""
    gate = tmp_path / "gate"
    letter_id = fail_charge(jobs, 42, gate)
    nothing = cli("dlq", "process", "--function", CHARGE).out.strip()
    assert nothing == "nothing due"  # not due for minutes yet

    gate.touch()  # the gateway is back
    cli("dlq", "retry", letter_id)
    report = cli("dlq", "process", "--function", CHARGE, "--json").json()
    assert report["claimed"] == 1
    assert report["resolved"] == [letter_id]
    assert report["results"][0]["outcome"] == "resolved"
    assert report["results"][0]["status"] == "resolved"
    letter = queue.get(letter_id)
    assert letter is not None
    assert letter.status is Status.RESOLVED
    assert letter.resolution == "retry"
    assert Path(f"{gate}.runs").read_text().split() == ["42"]
    # The replay ran under the original key: the same call now answers from the store.
    assert jobs.charge(jobs.Order(42, "9.99"), str(gate)) == "charged 42"
    assert Path(f"{gate}.runs").read_text().split() == ["42"]


@needs_redis
def test_process_reports_a_replay_that_fails_again_with_its_next_retry(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """A replay that fails again is RETRYING with attempt 2 and a later retry."""
    letter_id = fail_charge(jobs, 5, tmp_path / "gate")
    cli("dlq", "retry", letter_id)
    text = cli("dlq", "process", "--function", CHARGE).out
    assert text.startswith("claimed 1: 0 resolved, 1 failed, 0 abandoned, 0 held, 0 skipped")
    row = next(line for line in text.splitlines() if line.startswith("failed"))
    assert letter_id in row
    assert "gateway timed out for order 5; next retry in " in row
    letter = queue.get(letter_id)
    assert letter is not None
    assert letter.status is Status.RETRYING
    assert letter.attempts == 2
    assert letter.next_retry_at is not None
    assert letter.next_retry_at > time.time()


@needs_redis
def test_process_without_the_module_claims_nothing_and_says_why_in_full(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """A processor that knows no function leaves every letter untouched (not delayed for
    the processes that know them) and says, unabridged, why and what is due (exit 1)."""
    letter_id = fail_charge(jobs, 6, tmp_path / "gate")
    cli("dlq", "retry", letter_id)
    before = queue.get(letter_id)
    result = cli("dlq", "process", "--function", CHARGE, imports=False, code=1)
    assert result.out == ""
    message = result.err.strip()
    assert "no @dead_letter function or integration route is registered" in message
    assert "--import MODULE" in message
    assert message.endswith(f"1 letter due now: {CHARGE} (1)")
    assert queue.get(letter_id) == before


@needs_redis
def test_process_says_what_is_due_without_letting_a_stored_function_name_forge_a_line(
    cli: Cli, queue: DeadLetterQueue
) -> None:
    """A letter written with a line break in its function name is named escaped in the
    'due now' list (before, the break reached stderr and began a line of its own)."""
    letter = queue.record("jobs.charge\nERROR forged", ConnectionError("x"))
    cli("dlq", "retry", letter.id)
    result = cli("dlq", "process", imports=False, code=1)
    message = result.err.strip()
    assert message.endswith("1 letter due now: jobs.charge\\nERROR forged (1)")
    assert not any(line.startswith("ERROR forged") for line in result.err.splitlines())


@needs_redis
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_process_loop_replays_and_stops_cleanly_on_a_signal(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path, signum: int
) -> None:
    """--loop replays letters as they fall due and exits 0 on SIGTERM or SIGINT."""
    gate = tmp_path / "gate"
    letter_id = fail_charge(jobs, 9, gate)
    gate.touch()
    process = cli.start("dlq", "process", "--function", CHARGE, "--loop", "--interval", "0.2")
    try:
        queue.requeue(letter_id)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            letter = queue.get(letter_id)
            if letter is not None and letter.status is Status.RESOLVED:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the looping processor did not replay the letter")
        process.send_signal(signum)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert f"resolved  {letter_id}" in out
    assert "Traceback" not in err
    assert err.rstrip().endswith("idempotask: stopped")


@needs_redis
def test_flush_delivers_letters_spooled_while_the_store_was_down(
    cli: Cli, queue: DeadLetterQueue, tmp_path: Path
) -> None:
    """A letter spooled during an outage reaches the store through `dlq flush`."""
    spool = tmp_path / "outage.jsonl"
    down = DeadLetterQueue(f"redis://127.0.0.1:{closed_port()}/0", spool=spool)
    letter = down.record(CHARGE, TimeoutError("during the outage"), arguments={})
    assert queue.get(letter.id) is None
    text = cli("--spool", str(spool), "dlq", "flush").out.strip()
    assert text == f"delivered 1 spooled dead letter; 0 still waiting in {spool}"
    stored = queue.get(letter.id)
    assert stored is not None
    assert stored.message == "during the outage"
    assert cli("dlq", "flush", "--spool", str(spool), "--json").json() == {
        "delivered": 0,
        "waiting": 0,
        "spool": str(spool),
    }


@needs_redis
def test_flush_finds_the_spool_of_the_configured_namespace_and_points_at_others(
    cli: Cli, queue: DeadLetterQueue, tmp_path: Path
) -> None:
    """With a spool directory, each namespace has its own spool file: --namespace picks
    it, and a flush of an empty one says which other namespace's spool holds letters."""
    spools = tmp_path / "spools"
    spools.mkdir()
    env = {**cli.env, "IDEMPOTASK_SPOOL": str(spools)}
    idempotask.configure(spool_path=str(spools) + os.sep, namespace=cli.namespace)
    down = DeadLetterQueue(f"redis://127.0.0.1:{closed_port()}/0")
    letter = down.record(CHARGE, TimeoutError("during the outage"), arguments={})
    assert (spools / f"spool-{cli.namespace}.jsonl").exists()

    other = Cli(env, f"other{cli.namespace}", cli.cwd)
    text = other("dlq", "flush").out
    assert "delivered 0 spooled dead letters" in text
    assert f"spool-{cli.namespace}.jsonl" in text
    assert f"--namespace {cli.namespace}" in text
    assert queue.get(letter.id) is None

    mine = Cli(env, cli.namespace, cli.cwd)
    assert "delivered 1 spooled dead letter;" in mine("dlq", "flush").out
    assert queue.get(letter.id) is not None


@needs_redis
def test_show_and_retry_accept_an_unambiguous_id_prefix(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """The README writes ids as `3f2a9c...`: a prefix, with or without the dots."""
    letter_id = fail_charge(jobs, 11, tmp_path / "gate")
    shown = cli("dlq", "show", letter_id[:8] + "...", "--json").json()
    assert shown["id"] == letter_id
    assert f"requeued {letter_id}" in cli("dlq", "retry", letter_id[:10]).out
    too_short = cli("dlq", "show", letter_id[:3], code=1)
    assert "no dead letter has id" in too_short.err


@needs_redis
def test_list_search_matches_error_types_and_messages(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    skip_unless_searches(queue.store)
    charge_id = fail_charge(jobs, 12, tmp_path / "gate")
    reject_id = fail_reject(jobs, 13)
    ids = [x["id"] for x in cli("dlq", "list", "--search", "GATEWAY TIMED", "--json").json()]
    assert ids == [charge_id]
    ids = [x["id"] for x in cli("dlq", "list", "--search", "valueerror", "--json").json()]
    assert ids == [reject_id]
    assert cli("dlq", "list", "--search", "no such text").out.strip() == "no dead letters match"


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\rreal\x9b31m\u202egnp.exe\x7f"


@needs_redis
def test_control_characters_from_letters_never_reach_the_terminal(
    cli: Cli, queue: DeadLetterQueue
) -> None:
    """Messages, tracebacks, function names and arguments are attacker-chosen text: the
    table and `show` print their control characters escaped; --json keeps them exact."""
    try:
        raise ValueError(f"bad input {HOSTILE}")
    except ValueError as exc:
        error = exc
    letter = queue.record(f"{PREFIX}.evil{HOSTILE}", error, arguments={"note": HOSTILE})
    outputs = [
        cli("dlq", "list").out,
        cli("dlq", "show", letter.id).out,
        cli("dlq", "stats").out,
    ]
    for out in outputs:
        assert not any(c in out for c in "\x1b\x07\r\x9b\u202e\x7f"), repr(out)
        assert "\\x1b]0;pwned\\x07" in out
    show = outputs[1]
    assert "\\x1b[2J\\rreal\\x9b31m\\u202egnp.exe\\x7f" in show  # message and traceback
    assert "note = '" in show
    exact = cli("dlq", "show", letter.id, "--json").json()
    assert exact["message"] == f"bad input {HOSTILE}"
    assert exact["function"] == f"{PREFIX}.evil{HOSTILE}"
    raw = cli("dlq", "list", "--json").out
    assert not any(c in raw for c in "\x1b\x07\r\x9b\u202e\x7f")


@needs_redis
def test_process_prints_the_full_reason_of_a_held_letter(
    cli: Cli, queue: DeadLetterQueue, jobs: ModuleType, tmp_path: Path
) -> None:
    """A letter whose arguments were redacted is held, and the reason is printed whole."""
    from idempotask.deadletter import Redacted

    order = jobs.Order(14, "9.99")
    letter = queue.record(
        CHARGE,
        TimeoutError("x"),
        arguments={"order": order, "gate": Redacted("<redacted>")},
        key=jobs.charge.__wrapped__.key_for(order, str(tmp_path / "gate")),
    )
    cli("dlq", "retry", letter.id)
    text = cli("dlq", "process", "--function", CHARGE).out
    assert "1 held" in text
    why = text.split("\nwhy:\n", 1)[1]
    assert f"{letter.id} held: argument(s) gate were redacted" in why
    assert "add one and requeue the letter, or resolve or abandon it by hand" in why
    shown = cli("dlq", "show", letter.id).out
    assert "held:" in shown
    assert "waits for a person" in shown
    assert "gate = <redacted: '<redacted>'>" in shown


NO_TABLE = """
from idempotask.backends.deadletters import register_dead_letter_scheme
from idempotask.backends.memory import MemoryDeadLetterStore
from idempotask.errors import MissingTableError


class NoTable(MemoryDeadLetterStore):
    def query(self, *args, **kwargs):
        raise MissingTableError(
            "dead-letter table 'app_dead_letters' does not exist", table="app_dead_letters"
        )


register_dead_letter_scheme("notable", lambda url: NoTable())
"""


def test_a_missing_table_exits_1_naming_the_table_and_the_command(
    offline: Cli, tmp_path: Path
) -> None:
    """Not exit 3 "unreachable": the table will not appear by itself."""
    (tmp_path / "notable_scheme.py").write_text(NO_TABLE)
    result = offline(
        "--import",
        "notable_scheme",
        "--dead-letter-url",
        "notable://db",
        "dlq",
        "list",
        imports=False,
        code=1,
    )
    message = result.err.strip()
    assert "has no table 'app_dead_letters'" in message
    assert "idempotask db create" in message
    assert "cannot reach" not in message


@needs_redis
def test_the_namespace_option_picks_the_namespaces_queue_on_a_shared_server(
    env: dict[str, str], tmp_path: Path, redis_url: str
) -> None:
    """--namespace means the same for dlq as for keys: the queue beside the store is the
    namespace's own, so another app's letters are neither listed nor processed."""
    pytest.importorskip("redis")
    from idempotask.backends.redis import RedisBackend

    skip_unless_namespaced(RedisBackend)
    run = uuid.uuid4().hex[:8]
    ids = {}
    for app in ("a", "b"):
        idempotask.configure(backend=redis_url, namespace=f"app{app}{run}")
        ids[app] = idempotask.default_queue().record(f"{PREFIX}.job", TimeoutError(app)).id
    try:
        only_b = Cli({**env, "IDEMPOTASK_URL": redis_url}, f"appb{run}", tmp_path)
        listed = [x["id"] for x in only_b("dlq", "list", "--json", imports=False).json()]
        assert listed == [ids["b"]]
    finally:
        for app in ("a", "b"):
            idempotask.configure(namespace=f"app{app}{run}")
            idempotask.default_queue().store.purge(DeadLetterFilter())


# -- keys -----------------------------------------------------------------------------------


@needs_redis
def test_keys_show_prints_a_completed_record_and_its_decoded_result(
    cli: Cli, jobs: ModuleType, tmp_path: Path
) -> None:
    """keys show: state, token, expiry, payload size and the decoded result."""
    gate = tmp_path / "gate"
    gate.touch()
    order = jobs.Order(3, "1.00")
    assert jobs.charge(order, str(gate)) == "charged 3"
    key = jobs.charge.__wrapped__.key_for(order, str(gate))
    record = idempotask.get_backend().get(key)
    assert record is not None
    assert record.state is State.COMPLETED

    text = cli("keys", "show", key).out
    for expected in (
        f"key:         {key}",
        "state:       completed",
        f"token:       {record.token}",
        "expires in:  ",
        f"payload:     {len(record.payload)} bytes",
        "result:      'charged 3'",
    ):
        assert expected in text, f"{expected!r} not in:\n{text}"

    short = key.split(":", 1)[1]  # the namespace may be left out
    data = cli("keys", "show", short, "--json").json()
    assert data["key"] == key
    assert data["state"] == "completed"
    assert data["result"] == "charged 3"
    assert data["result_repr"] == "'charged 3'"
    assert data["payload_size"] == len(record.payload)
    assert 500 < data["expires_in"] <= 600
    assert data["decode_error"] is None
    assert data["error"] is None

    missing = cli("keys", "show", f"{cli.namespace}:nothing:v1:00", code=1)
    assert "no record under key" in missing.err


@needs_redis
def test_keys_show_never_crashes_on_bytes_it_cannot_decode(cli: Cli) -> None:
    """A payload written by another serializer is reported, not unpickled or crashed on."""
    backend = idempotask.get_backend()
    key = f"{cli.namespace}:foreign:v1:00"
    backend.claim(key, "tok", lease=60)
    backend.complete(key, "tok", b"\x80\x05\x95garbage", ttl=60)
    text = cli("keys", "show", key).out
    assert "result:      cannot be decoded here: 10 bytes that are not typed JSON" in text
    data = cli("keys", "show", key, "--json").json()
    assert data["result"] is None
    assert "not typed JSON" in data["decode_error"]


@needs_redis
@pytest.mark.filterwarnings("ignore::idempotask.LeaseLostWarning")
def test_keys_forget_refuses_a_key_in_progress_unless_forced(cli: Cli, jobs: ModuleType) -> None:
    """An in-progress key is refused (exit 1, clear message); --force releases it."""
    key = jobs.hold.key_for(11)
    backend = idempotask.get_backend()
    jobs.RELEASE.clear()
    worker = threading.Thread(target=lambda: jobs.hold(11), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while (record := backend.get(key)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert record is not None
        assert record.state is State.IN_PROGRESS

        shown = cli("keys", "show", key).out
        assert "state:            in_progress" in shown
        assert "lease expires in: " in shown
        assert "result:           -" in shown

        refused = cli("keys", "forget", key, code=1)
        assert f"{key} is in progress" in refused.err
        assert "pass --force to release it anyway" in refused.err
        assert "Traceback" not in refused.err
        assert backend.get(key) is not None

        forced = cli("keys", "forget", key, "--force", "--json").json()
        assert forced == {"key": key, "forgotten": True, "state": "in_progress"}
        assert backend.get(key) is None
    finally:
        jobs.RELEASE.set()
        worker.join(30)


@needs_redis
def test_keys_forget_releases_a_completed_key_so_the_call_runs_again(
    cli: Cli, jobs: ModuleType, tmp_path: Path
) -> None:
    """After keys forget, the same call runs again instead of answering from the store."""
    gate = tmp_path / "gate"
    gate.touch()
    order = jobs.Order(4, "2.00")
    jobs.charge(order, str(gate))
    key = jobs.charge.__wrapped__.key_for(order, str(gate))
    out = cli("keys", "forget", key).out.strip()
    assert out == f"forgot {key} (it was completed); the next call runs again"
    assert idempotask.get_backend().get(key) is None
    jobs.charge(order, str(gate))
    assert Path(f"{gate}.runs").read_text().split() == ["4", "4"]
    assert "no record under key" in cli("keys", "forget", f"{key}x", code=1).err


@needs_redis
def test_data_that_is_not_a_record_is_refused_and_forget_force_removes_it(
    cli: Cli, redis_url: str
) -> None:
    """Foreign data under a key: exit 1 with a hint (not "unreachable"); --force deletes."""
    redis = pytest.importorskip("redis")
    from idempotask.backends.redis import record_key

    key = f"{cli.namespace}:foreign:v1:01"
    client = redis.Redis.from_url(redis_url)
    client.set(record_key(key), b"someone else's value")
    try:
        shown = cli("keys", "show", key, code=1)
        assert "is not an idempotask record" in shown.err
        assert f"keys forget {key} --force" in shown.err
        assert "cannot reach" not in shown.err
        cli("keys", "forget", key, code=1)
        forced = cli("keys", "forget", key, "--force").out.strip()
        assert forced == f"forgot {key} (it held data that was not an idempotask record)"
        assert client.exists(record_key(key)) == 0
    finally:
        client.delete(record_key(key))
        client.close()

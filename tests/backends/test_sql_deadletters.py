"""SQLDeadLetterStore: the shared dead-letter contract on PostgreSQL, a SQLite file and
MariaDB (also with the MySQL plan), then what is SQL-specific: statements per operation,
URLs and shared engines, foreign rows, bad input, and the processor end to end.

Servers come from ``IDEMPOTASK_POSTGRES_URL`` and ``IDEMPOTASK_MYSQL_URL``; an unreachable
one skips its tests (fails under ``IDEMPOTASK_REQUIRE_SERVICES=1``). Every table has a
name unique to the run and is dropped at the end.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text

import idempotask
from idempotask import DeadLetterQueue, dead_letter, idempotent
from idempotask.backends.deadletters import (
    _BUILTIN,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStore,
    Status,
    dead_letter_store_from_url,
)
from idempotask.backends.sql import (
    DEFAULT_DEAD_LETTER_TABLE,
    SQLAlchemyBackend,
    SQLDeadLetterStore,
    dead_letters,
    define_dead_letter_table,
    metadata,
)
from idempotask.backends.sql._engines import _DRIVERS
from idempotask.errors import ConfigurationError, CorruptRecordError
from idempotask.retry import FixedDelay, RetryPolicy
from idempotask.taxonomy import FailureKind
from idempotask.testing import DeadLetterStoreContract
from idempotask.testing.deadletters import T0
from tests.conftest import service_url

RUN = uuid.uuid4().hex[:10]
TABLE = f"idem_dl_{RUN}"
_SQLITE_DIR = Path(tempfile.mkdtemp(prefix="idempotask-sqldl-"))
SQLITE_URL = f"sqlite:///{_SQLITE_DIR / 'dl.db'}"

# name -> (service, or None for SQLite; plan forced on the store)
DATABASES: dict[str, tuple[str | None, str | None]] = {
    "postgres": ("postgres", None),
    "sqlite": (None, None),
    "mariadb": ("mysql", None),
    "mysql-plan": ("mysql", "mysql"),
}
_stores: dict[str, SQLDeadLetterStore] = {}
_lock = threading.Lock()
FAST: dict[FailureKind | str, RetryPolicy] = {FailureKind.TRANSIENT: RetryPolicy(2, FixedDelay(60))}


class GatewayTimeout(TimeoutError):
    """A transient failure."""


def url_for(name: str) -> str:
    service = DATABASES[name][0]
    return SQLITE_URL if service is None else service_url(service)


def shared_store(name: str) -> SQLDeadLetterStore:
    """One store per database for the module, its table created on first use."""
    url = url_for(name)
    with _lock:
        if name not in _stores:
            store = SQLDeadLetterStore(url, table_name=TABLE)
            store._force_flavour = DATABASES[name][1]  # type: ignore[assignment]
            store.create_tables()
            _stores[name] = store
        return _stores[name]


@pytest.fixture(scope="module", autouse=True)
def _drop_tables_at_the_end() -> Iterator[None]:
    yield
    for store in _stores.values():
        try:
            store.drop_tables()
        finally:
            store.close()
    _stores.clear()
    shutil.rmtree(_SQLITE_DIR, ignore_errors=True)


def letter(id: str = "", **fields: Any) -> DeadLetter:
    """A complete letter with a fresh id; ``fields`` override the defaults."""
    values: dict[str, Any] = {
        "function": "billing.charge",
        "kind": "transient",
        "error_type": "builtins.ConnectionError",
        "message": "connection refused",
        "traceback": "Traceback (most recent call last):\n  ...\n",
        "arguments": b'{"order": 7}',
        "first_failed_at": T0,
        "last_failed_at": T0,
        "next_retry_at": T0 + 60,
    }
    values.update(fields)
    return DeadLetter(id=id or f"{RUN}-{uuid.uuid4().hex[:10]}", **values)


@contextlib.contextmanager
def postgres_store_for_processes() -> Iterator[Callable[[], DeadLetterStore]]:
    """A fresh table on the shared PostgreSQL, reached by URL from any (forked) process;
    tests/test_deadletter.py runs its two-processor test on it (``CROSS_PROCESS_STORES``)."""
    url = service_url("postgres")
    table = f"idem_dlproc_{uuid.uuid4().hex[:10]}"
    setup = SQLDeadLetterStore(url, table_name=table)
    setup.create_tables()
    try:
        yield lambda: dead_letter_store_from_url(f"{url}?table={table}")
    finally:
        setup.drop_tables()
        setup.close()


# -- the shared contract -----------------------------------------------------------------------


@pytest.mark.postgres
class TestPostgresDeadLetterContract(DeadLetterStoreContract):
    """The conformance suite, sync and async, on PostgreSQL (one-statement SKIP LOCKED claim)."""

    @pytest.fixture
    def dead_letter_store(self) -> SQLDeadLetterStore:
        return shared_store("postgres")


class TestSqliteDeadLetterContract(DeadLetterStoreContract):
    """The conformance suite, sync and async, on a SQLite file (BEGIN IMMEDIATE claims)."""

    @pytest.fixture
    def dead_letter_store(self) -> SQLDeadLetterStore:
        return shared_store("sqlite")


@pytest.mark.mysql
class TestMariadbDeadLetterContract(DeadLetterStoreContract):
    """The conformance suite, sync and async, on MariaDB (SELECT … FOR UPDATE SKIP LOCKED)."""

    @pytest.fixture
    def dead_letter_store(self) -> SQLDeadLetterStore:
        return shared_store("mariadb")


@pytest.mark.mysql
class TestMysqlPlanDeadLetterContract(DeadLetterStoreContract):
    """The suite with the MySQL plan (no RETURNING anywhere) on MariaDB."""

    real_time_tests = False

    @pytest.fixture
    def dead_letter_store(self) -> SQLDeadLetterStore:
        return shared_store("mysql-plan")


class TestSqliteMemoryDeadLetterContract(DeadLetterStoreContract):
    """The suite on ``sqlite:///:memory:`` (one connection, async calls inline)."""

    real_time_tests = False
    shared = SQLDeadLetterStore("sqlite:///:memory:")
    shared.create_tables()

    @pytest.fixture
    def dead_letter_store(self) -> SQLDeadLetterStore:
        return self.shared


# -- statements per operation --------------------------------------------------------------


class Statements:
    """The first word of every statement an engine runs (``before_cursor_execute``)."""

    def __init__(self, engine: Any) -> None:
        self.words: list[str] = []
        self._engine = engine
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.words.append(statement.split()[0].upper())

    def take(self) -> list[str]:
        taken, self.words = self.words, []
        return taken


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param(
            "postgres",
            {
                "add": ["INSERT"],
                "add again": ["INSERT", "SELECT"],
                "get": ["SELECT"],
                "query": ["SELECT"],
                "update": ["UPDATE"],
                "claim": ["WITH"],  # WITH due AS (SELECT … FOR UPDATE SKIP LOCKED) UPDATE
                "stats": ["SELECT"],
                "purge": ["DELETE"],
            },
            marks=pytest.mark.postgres,
            id="postgres",
        ),
        pytest.param(
            "mariadb",
            {
                "add": ["INSERT"],
                "add again": ["INSERT", "SELECT"],
                "get": ["SELECT"],
                "query": ["SELECT"],
                "update": ["UPDATE", "SELECT"],
                "claim": ["BEGIN", "SELECT", "UPDATE", "COMMIT"],
                "stats": ["SELECT"],
                "purge": ["DELETE"],
            },
            marks=pytest.mark.mysql,
            id="mariadb",
        ),
        pytest.param(
            "sqlite",
            {
                "add": ["INSERT"],
                "add again": ["INSERT", "SELECT"],
                "get": ["SELECT"],
                "query": ["SELECT"],
                "update": ["BEGIN", "UPDATE", "SELECT", "COMMIT"],
                "claim": ["BEGIN", "SELECT", "UPDATE", "COMMIT"],
                "stats": ["SELECT"],
                "purge": ["DELETE"],
            },
            id="sqlite",
        ),
    ],
)
def test_statements_per_operation(name: str, expected: dict[str, list[str]]) -> None:
    """The documented statements: PostgreSQL one per operation (update RETURNING, claim
    one WITH due AS (SELECT … FOR UPDATE SKIP LOCKED) UPDATE … RETURNING); MariaDB a
    short transaction for the claim and a read after the update; SQLite transactions."""
    shared_store(name)
    options = {"isolation_level": "AUTOCOMMIT"}
    if name == "mariadb":
        options["skip_autocommit_rollback"] = True  # type: ignore[assignment]
    engine = create_engine(url_for(name), **options)  # type: ignore[arg-type]
    store = SQLDeadLetterStore(engine, table_name=TABLE)
    log = Statements(engine)
    fn = f"stmt-{uuid.uuid4().hex[:8]}"
    only = DeadLetterFilter(function=(fn,))
    try:
        store.get("warm-up")  # connect first: SQLAlchemy's own first-connect queries
        log.take()
        counts: dict[str, list[str]] = {}
        first = letter(function=fn, next_retry_at=T0)
        for label, call in [
            ("add", lambda: store.add(first)),
            ("add again", lambda: store.add(first)),
            ("get", lambda: store.get(first.id)),
            ("query", lambda: store.query(only)),
            ("update", lambda: store.update(first.id, 0, attempts=2)),
            ("claim", lambda: store.claim_due(T0 + 1, filter=only)),
            ("stats", lambda: store.stats(only)),
            ("purge", lambda: store.purge(only)),
        ]:
            call()
            counts[label] = log.take()
        assert counts == expected
    finally:
        log.take()
        engine.dispose()


# -- URLs, construction, schema ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://app:pw@db/app",
        "postgres://app:pw@db/app",
        "sqlite:///dl.db",
        "mysql+pymysql://root:pw@db/app",
        "mariadb+asyncmy://root:pw@db/app",
    ],
)
def test_sql_urls_build_a_sql_dead_letter_store_without_connecting(url: str) -> None:
    """Every SQL scheme builds the store (DeadLetterQueue too); the password stays out."""
    built = dead_letter_store_from_url(url)
    assert isinstance(built, SQLDeadLetterStore)
    assert isinstance(built, DeadLetterStore)
    assert built.table is dead_letters
    assert "pw" not in repr(built)
    assert built.database.engine is None
    assert isinstance(DeadLetterQueue(url).store, SQLDeadLetterStore)


def test_the_registry_knows_every_driver_the_sql_backend_knows() -> None:
    """The dead-letter registry's SQL schemes and the engines' drivers agree."""
    for backend, (sync, _, asynchronous, _) in _DRIVERS.items():
        for driver in {"", *sync, *asynchronous}:
            scheme = f"{backend}+{driver}" if driver else backend
            target, _extra = _BUILTIN.get(scheme, ("", ""))
            assert target.endswith("SQLDeadLetterStore.from_url"), scheme


def test_the_table_option_names_the_table_and_is_not_passed_to_the_driver() -> None:
    built = SQLDeadLetterStore.from_url(f"{SQLITE_URL}?table=dl_custom")
    assert built.table.name == "dl_custom"
    assert "table" not in built.database.url.query
    with pytest.raises(ConfigurationError, match="table_name"):
        SQLDeadLetterStore(SQLITE_URL, table_name="")


def test_the_default_store_follows_a_sql_backend_url(tmp_path: Path) -> None:
    """configure(backend="sqlite:///...") puts dead letters in the same database."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    idempotask.configure(backend=url)
    default = idempotask.default_queue().store
    assert isinstance(default, SQLDeadLetterStore)
    assert default.database.url.database == str(tmp_path / "app.db")
    idempotask.configure(dead_letter_store=f"{url}?table=other_dl")
    configured = idempotask.default_queue().store
    assert isinstance(configured, SQLDeadLetterStore)
    assert configured.table.name == "other_dl"


def test_a_store_built_from_a_backend_shares_its_engines(tmp_path: Path) -> None:
    """Given a SQLAlchemyBackend, the store uses its Database (one pool) and leaves it open."""
    backend = SQLAlchemyBackend(f"sqlite:///{tmp_path / 'shared.db'}")
    store = backend.dead_letter_store()
    assert store.database is backend.database
    assert SQLDeadLetterStore(backend).database is backend.database
    store.create_tables()
    store.add(letter("s"))
    engine = backend.database.sync_engine()
    store.close()
    assert backend.database.engine is engine
    assert store.get("s") is not None
    with pytest.raises(ConfigurationError, match="engines and timeouts there"):
        SQLDeadLetterStore(backend, statement_timeout=1.0)
    backend.close()


def test_the_tables_are_in_the_shared_metadata_for_alembic() -> None:
    """The default table is in ``metadata`` next to the records; define_* adds it elsewhere."""
    from sqlalchemy import MetaData

    assert metadata.tables[DEFAULT_DEAD_LETTER_TABLE] is dead_letters
    assert "idempotask_breakers" in metadata.tables
    mine = MetaData()
    table = define_dead_letter_table(mine, "my_letters")
    assert define_dead_letter_table(mine, "my_letters") is table
    assert {ix.name for ix in table.indexes} == {
        "ix_my_letters_due",
        "ix_my_letters_last_failed_at",
        "ix_my_letters_function",
        "ix_my_letters_status",
    }
    assert [c.name for c in next(ix for ix in table.indexes if "due" in ix.name).columns] == [
        "namespace",
        "status",
        "next_retry_at",
    ]
    assert [c.name for c in table.primary_key.columns] == ["namespace", "id"]


# -- bad input and foreign rows ----------------------------------------------------------------


def test_bad_arguments_are_configuration_errors_and_write_nothing() -> None:
    store = shared_store("sqlite")
    with pytest.raises(ConfigurationError, match="next_retry_at"):
        store.add(letter("nan", next_retry_at=float("nan")))
    assert store.get("nan") is None
    with pytest.raises(ConfigurationError, match="function"):
        store.add(letter("long", function="f" * 600))
    with pytest.raises(ConfigurationError, match="attempts"):
        store.add(letter("big", attempts=2**40))
    with pytest.raises(TypeError, match="DeadLetter"):
        store.add({"id": "x"})  # type: ignore[arg-type]
    added = store.add(letter())
    with pytest.raises(ConfigurationError, match="version"):
        store.update(added.id, "0", attempts=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="function"):
        store.update(added.id, added.version, function="other")
    with pytest.raises(ConfigurationError, match="offset"):
        store.query(offset=-1)
    with pytest.raises(ConfigurationError, match="lease"):
        store.claim_due(T0, lease=0)
    with pytest.raises(ConfigurationError, match="DeadLetterFilter"):
        store.purge("everything")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="DeadLetterFilter"):
        store.purge(None)  # type: ignore[arg-type]  # it used to delete every letter
    assert store.query(limit=0) == []
    assert store.claim_due(T0, limit=0) == []
    store.purge(DeadLetterFilter(function=("billing.charge",)))


def test_odd_text_round_trips_in_message_and_traceback() -> None:
    """Lone surrogates and NULs survive where only SQL blobs hold them."""
    store = shared_store("sqlite")
    odd = letter(message="bad file name \udcff \x00", traceback="tb \udc80")
    store.add(odd)
    assert store.get(odd.id) == odd
    store.purge(DeadLetterFilter(function=("billing.charge",)))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mysql),
        "sqlite",
    ],
)
def test_a_foreign_row_is_a_corrupt_record_error(name: str) -> None:
    """A row with a status we never write (or not UTF-8 text) is reported, not guessed at."""
    store = shared_store(name)
    good = store.add(letter(function=f"foreign-{RUN}"))
    with store.database.sync_engine().connect() as conn:
        conn.execute(
            store.table.update().where(store.table.c.id == good.id).values(status="exploded")
        )
    with pytest.raises(CorruptRecordError, match="not written by idempotask"):
        store.get(good.id)
    with pytest.raises(CorruptRecordError):
        store.query(DeadLetterFilter(function=(f"foreign-{RUN}",)))
    assert store.purge(DeadLetterFilter(function=(f"foreign-{RUN}",))) == 1


@pytest.mark.postgres
def test_postgres_orders_ids_by_code_point_like_python() -> None:
    """Ties in query order are broken by id as Python compares str (the "C" collation)."""
    store = shared_store("postgres")
    fn = f"order-{RUN}"
    ids = ["a-b", "ab", "a_c", "B", "a.b", "é", "z"]
    for id in ids:
        store.add(letter(f"{RUN}{id}", function=fn))
    got = [x.id for x in store.query(DeadLetterFilter(function=(fn,)))]
    assert got == sorted(f"{RUN}{id}" for id in ids)
    store.purge(DeadLetterFilter(function=(fn,)))


@pytest.mark.postgres
def test_postgres_claims_skip_letters_another_transaction_holds() -> None:
    """A row locked by another claimer is skipped, not waited for (SKIP LOCKED)."""
    store = shared_store("postgres")
    fn = f"locked-{RUN}"
    held, free = letter(function=fn, next_retry_at=T0), letter(function=fn, next_retry_at=T0 + 1)
    store.add(held)
    store.add(free)
    engine = create_engine(url_for("postgres"))
    try:
        with engine.begin() as conn:
            conn.execute(text(f"SELECT 1 FROM {TABLE} WHERE id = :id FOR UPDATE"), {"id": held.id})
            claimed = store.claim_due(T0 + 10, filter=DeadLetterFilter(function=(fn,)))
            assert [x.id for x in claimed] == [free.id]
    finally:
        engine.dispose()
    store.purge(DeadLetterFilter(function=(fn,)))


# -- the processor on SQL ------------------------------------------------------------------------


@pytest.fixture
def pg_queue(tmp_path: Path) -> Iterator[DeadLetterQueue]:
    """A queue on PostgreSQL whose clock says T0; idempotency keys on PostgreSQL too."""
    url = url_for("postgres")
    backend = SQLAlchemyBackend(url, table_name=f"idem_dlrec_{RUN}")
    backend.create_tables()
    store = SQLDeadLetterStore(backend, table_name=f"idem_dlq_{uuid.uuid4().hex[:8]}")
    store.create_tables()
    idempotask.configure(backend=backend, namespace=f"dl-{RUN}")
    try:
        yield DeadLetterQueue(store, policies=FAST, spool=tmp_path / "q.jsonl", clock=lambda: T0)
    finally:
        store.drop_tables()
        backend.drop_tables()
        backend.close()


@pytest.mark.postgres
def test_a_permanently_failing_call_ends_abandoned_after_its_policy(
    pg_queue: DeadLetterQueue,
) -> None:
    """Two retries 60 s apart, each failing: RETRYING, then ABANDONED with three runs."""
    queue = pg_queue
    runs: list[int] = []
    exhausted: list[DeadLetter] = []
    order = uuid.uuid4().int % 10**9

    @dead_letter(queue=queue, name="tests.sql.flaky", on_retry_exhausted=exhausted.append)
    @idempotent
    def flaky(n: int) -> None:
        runs.append(n)
        raise GatewayTimeout(f"try {len(runs)}")

    with pytest.raises(GatewayTimeout):
        flaky(order)
    (first,) = queue.query()
    assert queue.process_due(now=T0 + 59).claimed == 0
    assert queue.process_due(now=T0 + 60).failed == [first.id]
    (second,) = queue.query()
    assert (second.attempts, second.status, second.next_retry_at) == (2, Status.RETRYING, T0 + 120)
    assert queue.process_due(now=T0 + 120).abandoned == [first.id]
    (final,) = queue.query()
    assert (final.attempts, final.status, final.next_retry_at) == (3, Status.ABANDONED, None)
    assert [x.id for x in exhausted] == [first.id]
    assert runs == [order] * 3
    assert queue.stats(hours=10**6, now=T0 + 1).total == 1


@pytest.mark.postgres
async def test_async_a_replay_of_a_call_that_completed_meanwhile_is_resolved_without_running(
    pg_queue: DeadLetterQueue,
) -> None:
    """The idempotency record on PostgreSQL says COMPLETED: the letter resolves, nothing runs."""
    queue = pg_queue
    runs: list[int] = []
    day = uuid.uuid4().int % 10**9

    @dead_letter(queue=queue, name="tests.sql.report")
    @idempotent
    async def report(d: int) -> str:
        runs.append(d)
        if len(runs) == 1:
            raise GatewayTimeout("first try failed")
        return f"report {d}"

    with pytest.raises(GatewayTimeout):
        await report(day)
    assert await report(day) == f"report {day}"
    result = await queue.aprocess_due(now=T0 + 10**7)
    assert [r.outcome for r in result.results] == ["completed"]
    assert runs == [day, day]
    (resolved,) = await queue.aquery()
    assert (resolved.status, resolved.resolution) == (Status.RESOLVED, "completed")

"""DjangoBackend and its dead-letter and breaker stores: the shared contracts (sync and
async) on Django's own connections to PostgreSQL and SQLite, then what is Django's:
no second connection, the same rows as a SQLAlchemyBackend, store writes inside a
user's atomic(), and bad input.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from idempotask.errors import ConfigurationError, MissingTableError
from idempotask.testing import (
    BreakerStoreContract,
    DeadLetterStoreContract,
    StoreContract,
    make_state_machine,
)
from tests.conftest import service_url
from tests.django._support import pg_params

pytest.importorskip("django")

from idempotask.django import (
    DjangoBackend,
    DjangoBreakerStore,
    DjangoDeadLetterStore,
)

# -- the shared contracts -------------------------------------------------------------------


class TestPostgresContract(StoreContract):
    """The idempotency contract on PostgreSQL through Django's connection."""

    @pytest.fixture
    def backend(self, pg_alias: str) -> DjangoBackend:
        return DjangoBackend(pg_alias)


class TestSqliteContract(StoreContract):
    """The idempotency contract on a SQLite file through Django's connection."""

    @pytest.fixture
    def backend(self, sqlite_alias: str) -> DjangoBackend:
        return DjangoBackend(sqlite_alias)


class TestMariadbContract(StoreContract):
    """The idempotency contract on MariaDB (its one-statement RETURNING plan)."""

    @pytest.fixture
    def backend(self, maria_alias: str) -> DjangoBackend:
        return DjangoBackend(maria_alias)


class TestMariadbDeadLetterContract(DeadLetterStoreContract):
    """The dead-letter contract on MariaDB (a namespace per test)."""

    @pytest.fixture
    def dead_letter_store(self, maria_alias: str) -> DjangoDeadLetterStore:
        return DjangoDeadLetterStore(maria_alias, namespace=f"c{uuid.uuid4().hex[:12]}")


class TestMariadbBreakerContract(BreakerStoreContract):
    """The breaker contract on MariaDB (a namespace per test)."""

    @pytest.fixture
    def breaker_store(self, maria_alias: str) -> DjangoBreakerStore:
        return DjangoBreakerStore(maria_alias, namespace=f"c{uuid.uuid4().hex[:12]}")


class TestPostgresDeadLetterContract(DeadLetterStoreContract):
    """The dead-letter contract on PostgreSQL (a namespace per test)."""

    @pytest.fixture
    def dead_letter_store(self, pg_alias: str) -> DjangoDeadLetterStore:
        return DjangoBackend(pg_alias).dead_letter_store(namespace=f"c{uuid.uuid4().hex[:12]}")


class TestSqliteDeadLetterContract(DeadLetterStoreContract):
    """The dead-letter contract on SQLite (a namespace per test)."""

    @pytest.fixture
    def dead_letter_store(self, sqlite_alias: str) -> DjangoDeadLetterStore:
        return DjangoDeadLetterStore(sqlite_alias, namespace=f"c{uuid.uuid4().hex[:12]}")


class TestPostgresBreakerContract(BreakerStoreContract):
    """The breaker contract on PostgreSQL (a namespace per test)."""

    @pytest.fixture
    def breaker_store(self, pg_alias: str) -> DjangoBreakerStore:
        return DjangoBackend(pg_alias).breaker_store(namespace=f"c{uuid.uuid4().hex[:12]}")


class TestSqliteBreakerContract(BreakerStoreContract):
    """The breaker contract on SQLite (a namespace per test)."""

    @pytest.fixture
    def breaker_store(self, sqlite_alias: str) -> DjangoBreakerStore:
        return DjangoBreakerStore(sqlite_alias, namespace=f"c{uuid.uuid4().hex[:12]}")


def test_the_state_machine_holds_on_postgres(pg_alias: str) -> None:
    """The hypothesis state machine against the reference model, on PostgreSQL."""
    machine = make_state_machine(lambda: DjangoBackend(pg_alias))
    machine.TestCase("runTest").runTest()


# -- Django-specific -----------------------------------------------------------------------


def test_operations_use_the_connection_django_holds_for_the_thread(pg_alias: str) -> None:
    """No second pool: the store's statements go through connections[alias] (Django's
    documented execute_wrapper sees them), the very connection object Django holds for
    this thread."""
    from django.db import connections

    store = DjangoBackend(pg_alias)
    seen: list[tuple[str, Any]] = []
    connection = connections[pg_alias]

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append((sql, context["connection"]))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        store.claim(f"pid:{uuid.uuid4().hex}", "t", lease=30)
        store.get("anything")
    statements = [(sql, conn) for sql, conn in seen if "idempotask_records" in sql]
    assert len(statements) >= 2
    assert all(conn is connection for _, conn in statements)


def test_a_sqlalchemy_backend_on_the_same_database_sees_the_same_rows(pg_alias: str) -> None:
    """The migrated tables are the SQL store's: what one writes, the other reads."""
    from django.conf import settings

    from idempotask.backends.sql import SQLAlchemyBackend

    params = pg_params(service_url("postgres"))
    name = settings.DATABASES[pg_alias]["NAME"]
    url = f"postgresql+psycopg://{params['USER']}@{params['HOST']}:{params['PORT']}/{name}"
    sql = SQLAlchemyBackend(url)
    django_store = DjangoBackend(pg_alias)
    key = f"shared:{uuid.uuid4().hex}"
    try:
        assert django_store.claim(key, "t1", lease=30).held_by("t1")
        assert sql.claim(key, "t2", lease=30).token == "t1"
        assert sql.complete(key, "t1", b"\x00result", ttl=60)
        record = django_store.get(key)
        assert record is not None
        assert record.payload == b"\x00result"
        letters = sql.dead_letter_store(namespace="shared")
        assert DjangoDeadLetterStore(pg_alias, namespace="shared").stats() == letters.stats()
    finally:
        sql.close()


def test_the_orm_models_read_the_stores_rows(sqlite_alias: str) -> None:
    """IdempotencyRecord reads what DjangoBackend wrote."""
    from idempotask.django.models import IdempotencyRecord

    key = f"orm:{uuid.uuid4().hex}"
    DjangoBackend(sqlite_alias).claim(key, "tok", lease=30, owner="worker-1")
    row = IdempotencyRecord.objects.using(sqlite_alias).get(key=key)
    assert (row.state, row.token, row.owner) == ("in_progress", "tok", "worker-1")


def test_store_writes_inside_the_users_atomic_roll_back_with_it(pg_alias: str) -> None:
    """Inside transaction.atomic() the store's statements join the user's transaction."""
    from django.db import transaction

    store = DjangoBackend(pg_alias)
    key = f"atomic:{uuid.uuid4().hex}"

    class Boom(Exception):
        pass

    def claim_then_fail() -> None:
        with transaction.atomic(using=pg_alias):
            assert store.claim(key, "t", lease=30).held_by("t")
            raise Boom

    with pytest.raises(Boom):
        claim_then_fail()
    assert store.get(key) is None


def test_an_operation_needing_a_transaction_uses_a_savepoint_inside_atomic(
    sqlite_alias: str,
) -> None:
    """A claim on SQLite (BEGIN IMMEDIATE … COMMIT outside) runs in a savepoint when the
    alias is already in a transaction, and commits with it."""
    from django.db import transaction

    store = DjangoBackend(sqlite_alias)
    key = f"sp:{uuid.uuid4().hex}"
    with transaction.atomic(using=sqlite_alias):
        assert store.claim(key, "t", lease=30).held_by("t")
        assert transaction.get_autocommit(using=sqlite_alias) is False
    record = store.get(key)
    assert record is not None
    assert record.held_by("t")


def test_async_calls_reach_the_same_rows(pg_alias: str) -> None:
    store = DjangoBackend(pg_alias)
    key = f"async:{uuid.uuid4().hex}"

    async def scenario() -> bool:
        await store.aclaim(key, "t", lease=30)
        return await store.acomplete(key, "t", b"r", ttl=60)

    assert asyncio.run(scenario())
    record = store.get(key)
    assert record is not None
    assert record.payload == b"r"


def test_an_unknown_alias_is_a_clear_error(django_aliases: list[str]) -> None:
    with pytest.raises(ConfigurationError, match="'nope' is not a database alias"):
        DjangoBackend("nope")
    with pytest.raises(ConfigurationError, match="alias"):
        DjangoDeadLetterStore(42)
    with pytest.raises(ConfigurationError, match="not a URL"):
        DjangoBackend.from_url("postgresql://x/y")


def test_bad_table_names_and_sqlite_transactions_are_clear_errors(sqlite_alias: str) -> None:
    with pytest.raises(ConfigurationError, match="DjangoBackend: table_name must be a non-empty"):
        DjangoBackend(sqlite_alias, table_name="")
    with pytest.raises(ConfigurationError, match="breaker_table must be a non-empty string"):
        DjangoBackend(sqlite_alias, breaker_table=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="sqlite_transactions must be True or False"):
        DjangoBackend(sqlite_alias, sqlite_transactions="yes")  # type: ignore[arg-type]


@pytest.fixture
def unmigrated(sqlite_alias: str) -> Iterator[DjangoBackend]:
    store = DjangoBackend(sqlite_alias, table_name=f"missing_{uuid.uuid4().hex[:8]}")
    return store


def test_a_missing_table_names_it(unmigrated: DjangoBackend) -> None:
    with pytest.raises(MissingTableError, match="missing_"):
        unmigrated.get("k")


def test_create_tables_makes_other_tables_and_drop_tables_removes_them(sqlite_alias: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    store = DjangoBackend(
        sqlite_alias,
        table_name=f"r_{suffix}",
        dead_letter_table=f"d_{suffix}",
        breaker_table=f"b_{suffix}",
    )
    store.create_tables()
    store.create_tables()  # safe to repeat
    assert store.claim("k", "t", lease=30).held_by("t")
    assert store.dead_letter_store().stats() == []
    store.drop_tables()
    with pytest.raises(MissingTableError):
        store.get("k")


def test_a_connection_the_server_dropped_is_replaced(pg_alias: str) -> None:
    """After the server ends the thread's connection, one operation fails with
    BackendError and the next one works on a new connection (Django itself reconnects
    only between requests)."""
    import psycopg
    from django.db import connections

    from idempotask.errors import BackendError

    store = DjangoBackend(pg_alias)
    store.get("warm-up")
    with connections[pg_alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    params = pg_params(service_url("postgres"))
    with psycopg.connect(
        host=params["HOST"],
        port=params["PORT"],
        user=params["USER"],
        dbname="test",
        autocommit=True,
    ) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    with pytest.raises(BackendError):
        store.get("after")
    assert store.get("after") is None

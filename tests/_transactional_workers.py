"""Child-process code for the transactional-mode tests (tests/test_transactional.py).

Kept apart from the test module so a spawned child imports only this, SQLAlchemy and
idempotask (not pytest), and builds its own engines after it starts. Also runnable as a
script: ``python tests/_transactional_workers.py owner URL PREFIX ID SIGNAL_FILE SLEEP``
runs one transactional call that writes a row, says so by creating SIGNAL_FILE, sleeps,
and returns; it prints the outcome (``returned`` or the exception's type) on stdout.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, insert

import idempotask
from idempotask import idempotent
from idempotask.backends.sql import SQLAlchemyBackend

#: The lease of the process tests' calls: short, so a takeover comes quickly.
LEASE = 1.0


def rows_table(prefix: str) -> Table:
    """The table the bodies write: one row per run (``key`` is not unique, so a second
    run of one call shows as a second row instead of an error)."""
    return Table(
        f"{prefix}_rows",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("key", String(100), nullable=False),
        Column("writer", String(100), nullable=False),
    )


def unique_table(prefix: str) -> Table:
    """A table whose rows the late and the new owner both write (same primary key): the
    new owner's insert waits for the lock the paused owner's uncommitted insert holds."""
    return Table(
        f"{prefix}_unique",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("writer", String(100), nullable=False),
    )


def store_for(url: str, prefix: str) -> SQLAlchemyBackend:
    return SQLAlchemyBackend(url, table_name=f"{prefix}_records")


def make_insert_one(store: SQLAlchemyBackend, prefix: str, writer: str) -> Any:
    """The transactional function of the many-processes test: one row per run."""
    rows = rows_table(prefix)

    @idempotent(
        ttl=600,
        lease=30,
        wait_timeout=60,
        backend=store,
        transactional=True,
        name=f"{prefix}.insert_one",
    )
    def insert_one(key: str) -> str:
        idempotask.transaction().execute(insert(rows).values(key=key, writer=writer))
        return key

    return insert_one


def many_worker(url: str, prefix: str, keys: list[str], repeats: int, seed: int) -> int:
    """Call ``insert_one`` for every key ``repeats`` times in a random order; returns how
    many calls answered (each must give back its key)."""
    store = store_for(url, prefix)
    insert_one = make_insert_one(store, prefix, f"pid-{os.getpid()}")
    order = [key for key in keys for _ in range(repeats)]
    random.Random(seed).shuffle(order)
    answered = 0
    try:
        for key in order:
            if insert_one(key) != key:
                raise AssertionError(f"wrong answer for {key}")
            answered += 1
    finally:
        store.close()
    return answered


def make_owner(
    store: SQLAlchemyBackend, prefix: str, writer: str, signal: Path | None, sleep: float
) -> Any:
    """The transactional function of the kill / pause tests: writes a row in ``rows``
    and row 1 of ``unique``, then (when ``signal`` is given) creates it and sleeps."""
    rows, unique = rows_table(prefix), unique_table(prefix)

    @idempotent(
        ttl=600,
        lease=LEASE,
        wait_timeout=60,
        backend=store,
        transactional=True,
        name=f"{prefix}.owner",
    )
    def owner(n: int) -> str:
        conn = idempotask.transaction()
        conn.execute(insert(rows).values(key=str(n), writer=writer))
        conn.execute(insert(unique).values(id=n, writer=writer))
        if signal is not None:
            signal.touch()
            time.sleep(sleep)
        return writer

    return owner


def main(argv: list[str]) -> int:
    _, url, prefix, n, signal, sleep = argv
    store = store_for(url, prefix)
    owner = make_owner(store, prefix, f"child-{os.getpid()}", Path(signal), float(sleep))
    try:
        owner(int(n))
    except BaseException as exc:  # reported to the parent, which asserts on it
        print(type(exc).__name__, flush=True)
        return 1
    print("returned", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

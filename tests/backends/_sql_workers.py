"""Child-process code for the SQL backend's multi-process tests.

Kept apart from the test module so a spawned child imports only this, SQLAlchemy and
idempotask (not pytest or hypothesis), and builds its own engines after it starts.
"""

from __future__ import annotations

import random
import uuid

from sqlalchemy import Column, Integer, MetaData, Table, create_engine, update

from idempotask.backends.sql import BinaryText, SQLAlchemyBackend


def counter_table(name: str) -> Table:
    """The per-key execution counter the workers increment: one row per key, made upfront."""
    return Table(
        name,
        MetaData(),
        Column("key", BinaryText(255), primary_key=True),
        Column("runs", Integer, nullable=False),
    )


def claim_worker(
    url: str, table: str, counters: str, keys: list[str], repeats: int, seed: int
) -> int:
    """Claim every key ``repeats`` times in a random order; run (count) a key when held.

    Returns how many times this process ran a body. Runs in a child process.
    """
    store = SQLAlchemyBackend(url, table_name=table)
    counter = counter_table(counters)
    # SQLite: the counter's own connection waits for the file's one writer as long as the
    # store does (sqlite3's default 5 s ran out on a loaded machine).
    sqlite = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    engine = create_engine(url, isolation_level="AUTOCOMMIT", **sqlite)
    order = [key for key in keys for _ in range(repeats)]
    random.Random(seed).shuffle(order)
    ran = 0
    try:
        with engine.connect() as conn:
            for key in order:
                token = uuid.uuid4().hex
                record = store.claim(key, token, lease=120)
                if not record.held_by(token):
                    continue
                conn.execute(
                    update(counter).where(counter.c.key == key).values(runs=counter.c.runs + 1)
                )
                ran += 1
                if not store.complete(key, token, b"done", ttl=3600):
                    raise RuntimeError(f"complete failed for {key!r}")
    finally:
        store.close()
        engine.dispose()
    return ran

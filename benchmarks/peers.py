"""The same work through the common alternatives, on the same Redis, beside the same floor.

Each peer is driven the way its documentation shows, with a body like ours (returns a small
dict) and arguments like ours (an account id, an e-mail, a flag):

- AWS Lambda Powertools' ``idempotent_function`` on its Redis persistence layer: a
  duplicate is ``SET NX`` (refused), ``GET`` to inspect the record, ``GET`` again to
  return the stored result; a first call is ``SET NX EX`` (in progress) then ``SET EX``
  (completed with the result). No local cache (its default).
- celery-once's Redis backend: ``raise_or_lock`` (a redis-py ``Lock`` ``SET NX PX``; on
  refusal ``PTTL`` and ``AlreadyQueued``), and ``clear_lock`` (``DEL``) when the task ends.
  It stores no result: a duplicate is refused, not answered.
- A hand-rolled redis-py ``Lock``: ``GET`` the result; when absent, acquire the lock,
  ``GET`` again (another caller may have finished meanwhile), run, ``SET EX`` the result,
  release the lock (a Lua compare-and-delete).

A peer that cannot run here gets rows that say why (never a number).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Callable
from typing import Any

from benchmarks import roundtrips
from benchmarks.report import Plan, Row, Skipped
from benchmarks.timing import Timing, measure, measure_each

EMAIL = "user@example.com"
POWERTOOLS = "peer: Powertools idempotent_function, Redis layer"
CELERY_ONCE = "peer: celery-once Redis lock"
REDIS_LOCK = "peer: hand-rolled redis-py Lock + GET/SET result"


class _LambdaContext:
    """What Powertools reads from a Lambda context: the time left (sets the in-progress
    expiry, as in a real invocation; like our 60 s lease)."""

    function_name = "bench"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 60_000


def _pair(
    label: str,
    plan: Plan,
    floor_name: str,
    floor: Timing,
    dup: Callable[[], Any],
    first: Callable[[int], Any],
    dup_note: str = "",
) -> list[Row]:
    """Duplicate and first call rows for one peer, each with its round trips per call."""
    batches, count = 100 // plan.scale, 2000 // plan.scale
    for _ in range(20):  # connect and load scripts before counting
        dup()
    first(-1)
    dup_trips = roundtrips.per_call(lambda i: dup())
    first_trips = roundtrips.per_call(first)
    dup_t = measure(dup, batches=batches, batch=20)
    first_t = measure_each(first, count=count)
    return [
        Row(
            f"{label}: duplicate call ({dup_note}{roundtrips.label(dup_trips)})",
            dup_t,
            floor_name,
            floor,
        ),
        Row(f"{label}: first call ({roundtrips.label(first_trips)})", first_t, floor_name, floor),
    ]


def _skipped(label: str, reason: str) -> list[Row]:
    return [
        Row(f"{label}: duplicate call", Skipped(reason)),
        Row(f"{label}: first call", Skipped(reason)),
    ]


def powertools_rows(plan: Plan, url: str, ns: str, floor_name: str, floor: Timing) -> list[Row]:
    """AWS Lambda Powertools ``idempotent_function`` with its Redis persistence layer."""
    label = POWERTOOLS
    try:
        from aws_lambda_powertools.utilities.idempotency import (
            IdempotencyConfig,
            idempotent_function,
        )
    except ImportError as exc:
        return _skipped(label, f"aws-lambda-powertools not installed ({exc.name})")
    try:
        # CachePersistenceLayer is the current name; RedisCachePersistenceLayer (the
        # same class) the one from 2.x, deprecated in 3.x.
        from aws_lambda_powertools.utilities.idempotency.persistence.cache import (
            CachePersistenceLayer as Layer,
        )
    except ImportError:
        try:
            from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
                RedisCachePersistenceLayer as Layer,
            )
        except ImportError as exc:
            return _skipped(
                label, f"this aws-lambda-powertools has no Redis persistence layer ({exc})"
            )
    if os.environ.get("POWERTOOLS_IDEMPOTENCY_DISABLED", "").lower() in ("1", "true", "yes", "on"):
        return _skipped(label, "POWERTOOLS_IDEMPOTENCY_DISABLED is set")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the 3.x class-name notice
        layer = Layer(url=url)
    config = IdempotencyConfig(expires_after_seconds=600)
    config.register_lambda_context(_LambdaContext())
    runs = itertools.count()

    @idempotent_function(
        data_keyword_argument="order",
        persistence_store=layer,
        config=config,
        key_prefix=f"{ns}:powertools",
    )
    def charge(order: dict[str, Any]) -> dict[str, Any]:
        next(runs)
        return {"ok": True, "account": order["account_id"]}

    seq = itertools.count()
    hot = {"account_id": 1, "email": EMAIL, "notify": True}
    charge(order=hot)
    rows = _pair(
        label,
        plan,
        floor_name,
        floor,
        lambda: charge(order=hot),
        lambda i: charge(order={"account_id": 10**9 + next(seq), "email": EMAIL, "notify": True}),
    )
    _check_once(label, runs, seq)
    return rows


def celery_once_rows(plan: Plan, url: str, ns: str, floor_name: str, floor: Timing) -> list[Row]:
    """celery-once's Redis backend: the lock ``QueueOnce`` takes and clears per task."""
    label = CELERY_ONCE
    try:
        from celery_once.backends import Redis as OnceRedis
        from celery_once.helpers import queue_once_key
        from celery_once.tasks import AlreadyQueued
    except ImportError as exc:
        return _skipped(label, f"celery-once (and celery) not installed ({exc.name})")

    backend = OnceRedis({"url": url, "default_timeout": 600})
    name = f"{ns}:celery_once.charge"
    seq = itertools.count()

    def key(account_id: int) -> str:
        # What QueueOnce.get_key does with the task's bound arguments.
        return queue_once_key(name, {"account_id": account_id, "email": EMAIL, "notify": True})

    backend.raise_or_lock(key(1), timeout=600)
    refused = itertools.count()

    def duplicate() -> None:
        try:
            backend.raise_or_lock(key(1), timeout=600)
        except AlreadyQueued:
            next(refused)
            return
        raise AssertionError("celery-once let a duplicate through")

    def first(i: int) -> None:
        k = key(10**9 + next(seq))
        backend.raise_or_lock(k, timeout=600)
        backend.clear_lock(k)  # what QueueOnce does after the task returns

    try:
        return _pair(
            label, plan, floor_name, floor, duplicate, first, dup_note="refused, no result; "
        )
    finally:
        backend.clear_lock(key(1))


def redis_lock_rows(plan: Plan, url: str, ns: str, floor_name: str, floor: Timing) -> list[Row]:
    """The hand-rolled pattern: a result key guarded by a redis-py ``Lock``."""
    import redis
    from redis.lock import Lock

    label = REDIS_LOCK
    client = redis.Redis.from_url(url)
    runs = itertools.count()

    def idempotent(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            digest = hashlib.sha256(
                json.dumps([fn.__qualname__, args, kwargs], sort_keys=True).encode()
            ).hexdigest()
            result_key = f"{ns}:result:{digest}"
            cached = client.get(result_key)
            if cached is not None:
                return json.loads(cached)
            with Lock(client, f"{ns}:lock:{digest}", timeout=60, blocking_timeout=10):
                cached = client.get(result_key)  # another caller may have finished
                if cached is not None:
                    return json.loads(cached)
                result = fn(*args, **kwargs)
                client.set(result_key, json.dumps(result), ex=600)
                return result

        return wrapper

    @idempotent
    def charge(account_id: int, email: str, notify: bool = True) -> dict[str, Any]:
        next(runs)
        return {"ok": True, "account": account_id}

    seq = itertools.count()
    charge(1, EMAIL)
    try:
        rows = _pair(
            label,
            plan,
            floor_name,
            floor,
            lambda: charge(1, EMAIL),
            lambda i: charge(10**9 + next(seq), EMAIL),
        )
        _check_once(label, runs, seq)
        return rows
    finally:
        client.close()


def _check_once(label: str, runs: itertools.count[int], seq: itertools.count[int]) -> None:
    """Fail the peer's rows unless its body ran once per distinct call: a peer that let
    duplicates through (or was switched off) would look fast for the wrong reason."""
    ran, distinct = next(runs), next(seq) + 1  # +1: the hot call stored before timing
    if ran != distinct:
        raise AssertionError(f"{label}: body ran {ran} times for {distinct} distinct calls")


def versus_ours(peer_rows: list[Row], ours: Timing) -> list[Row]:
    """Powertools' duplicate call beside ours (the same call, the same Redis): the ratio is
    how many times slower it is, target at least 2.5x."""
    for row in peer_rows:
        if row.what.startswith(f"{POWERTOOLS}: duplicate call") and isinstance(row.figure, Timing):
            return [
                Row(
                    f"{POWERTOOLS}: duplicate call, beside ours",
                    row.figure,
                    "idempotask duplicate, sync",
                    ours,
                    "≥ 2.5x",
                )
            ]
    return []


def rows(plan: Plan, url: str, ns: str, floor_name: str, floor: Timing) -> list[Row]:
    """Rows for every peer; one that fails says so in its rows and the others still run."""
    result: list[Row] = []
    for peer, label in (
        (powertools_rows, POWERTOOLS),
        (celery_once_rows, CELERY_ONCE),
        (redis_lock_rows, REDIS_LOCK),
    ):
        try:
            result.extend(peer(plan, url, ns, floor_name, floor))
        except Exception as exc:
            result.extend(_skipped(label, f"{type(exc).__name__}: {exc}"))
    return result

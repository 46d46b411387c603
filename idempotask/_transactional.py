"""Transactional calls: ``@idempotent(transactional=True)``.

The claim is taken as for any call (committed at once, so duplicates see it and wait).
Then the store opens one transaction (:meth:`~idempotask.backends.base.SupportsTransactions.begin`),
the body runs with that transaction available through :func:`transaction`, the result is
written in the same transaction with a compare-and-set on the claim's token and lease
(:meth:`~idempotask.backends.base.Transaction.complete`), and the transaction commits
once: the body's writes and the result commit together or not at all.

- A late owner (its lease ran out and another caller took the key over) finds its
  compare-and-set refused: its whole transaction, the body's writes included, is rolled
  back and the call raises :class:`~idempotask.errors.LeaseLostError`.
- A body that raises has its writes rolled back; the failure is then recorded outside the
  rolled-back transaction exactly as for any call (key released, or the error cached with
  ``cache_errors=``; ``@dead_letter`` records it).
- A cancellation (asyncio) at any point rolls back; it never leaves half a state.
- A transactional call inside another transactional call's body is refused
  (:class:`~idempotask.errors.ConfigurationError`): it would need its own transaction on
  its own connection, committed before the outer one, which is not what nesting means.

The flow here is a part of :meth:`idempotask.call.Spec.flow` (no I/O of its own).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import TYPE_CHECKING, Any

from idempotask import events
from idempotask.backends.base import Backend, State, SupportsTransactions, Transaction
from idempotask.errors import BackendError, ConfigurationError, LeaseLostError, SerializationError
from idempotask.events import EventKind
from idempotask.flow import Flow, Op, release_op

if TYPE_CHECKING:
    from idempotask.call import Call, Spec, _Outcome

__all__ = ["check_store", "flow", "refuse_nested", "transaction"]

log = logging.getLogger("idempotask")

_current: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar(
    "idempotask_transaction", default=None
)


def transaction() -> Any:
    """Inside the body of an ``@idempotent(transactional=True)`` function: the connection
    of the call's transaction, for the body's own writes.

    On a SQL store (:class:`~idempotask.backends.sql.SQLAlchemyBackend`) it is a
    SQLAlchemy ``Connection`` (an ``AsyncConnection`` in an ``async def`` body) inside an
    open transaction: run statements with ``execute``, or put an ORM ``Session`` on it
    with ``Session(bind=idempotask.transaction())`` (its ``commit()`` then only flushes:
    the call commits once, with its result). Never commit or roll back the connection
    yourself. Outside such a body it raises :class:`~idempotask.errors.ConfigurationError`.
    """
    tx = _current.get()
    if tx is None:
        raise ConfigurationError(
            "idempotask.transaction() is only available inside the body of an "
            "@idempotent(transactional=True) function, while it runs"
        )
    return tx.connection


def check_store(name: str, backend: Backend | str) -> None:
    """Refuse a store that cannot hold a call's writes in its transaction."""
    if isinstance(backend, (str, SupportsTransactions)):
        return
    raise ConfigurationError(
        f"{name}: transactional=True needs a store whose database can hold the body's "
        f"writes in one transaction with the result (a SQL store: SQLAlchemyBackend, or "
        f"the Django store), but {type(backend).__name__} ({backend!r}) cannot; use a SQL "
        "store for this function (backend=...) or drop transactional=True"
    )


def refuse_nested(name: str) -> None:
    """A transactional call made inside another transactional call's body is refused."""
    if _current.get() is not None:
        raise ConfigurationError(
            f"{name}: a transactional call cannot run inside another transactional call's "
            "body: it would commit in its own transaction before the outer one does. Call "
            "the undecorated function (fn.__wrapped__) to write in the outer transaction, "
            "or call this one after the outer call returns"
        )


# The store's begin, its errors returned rather than raised: the driver throws only store
# errors back into a flow, and the claim must be given back whatever begin raised.
def _begin(store: Any, key: str, token: str, lease: float) -> Transaction | Exception:
    try:
        tx: Transaction = store.begin(key, token, lease=lease)
    except Exception as exc:
        return exc
    return tx


async def _abegin(store: Any, key: str, token: str, lease: float) -> Transaction | Exception:
    try:
        tx: Transaction = await store.abegin(key, token, lease=lease)
    except Exception as exc:
        return exc
    return tx


def _rollback(spec: Spec, tx: Transaction, key: str, settle: list[Op]) -> Flow[None]:
    """Roll ``tx`` back. A cancellation of the caller meanwhile (``arollback`` finishes
    first, see the contract) performs ``settle`` (see ``Spec._finish_cancelled``), then
    propagates."""
    try:
        yield Op(tx.rollback, tx.arollback)
    except BackendError as exc:
        # The store discarded the connection: the database rolls back a transaction
        # whose connection ends, so nothing of it is kept either way.
        log.warning("idempotask: rolling back %s (%s) failed: %s", spec.name, key, exc)
    except asyncio.CancelledError as exc:
        yield from spec._finish_cancelled(exc, settle)


def flow(spec: Spec, call: Call, key: str, token: str, owner: str) -> Flow[Any]:
    """Run the body of a call holding ``key`` with ``token`` in one transaction with its
    result (see the module's docstring)."""
    backend = call.backend
    keys = (key,)
    store: Any = backend  # checked by check_store: SupportsTransactions
    try:
        tx: Transaction | Exception = yield Op(_begin, _abegin, store, key, token, spec._lease)
    except asyncio.CancelledError as exc:
        yield from spec._finish_cancelled(exc, [release_op(backend, key, token)])
    if isinstance(tx, Exception):  # a store error, or a store refusing (SQLite)
        yield from spec._release_all(backend, keys, token)
        raise tx
    # The body sees the transaction (transaction()): the flow runs in its caller's
    # context, whichever driver runs it.
    reset = _current.set(tx)
    try:
        outcome: _Outcome = yield Op(call.run, call.arun, keys, token)
    finally:
        _current.reset(reset)
    if outcome.error is not None:
        yield from _rollback(spec, tx, key, [release_op(backend, key, token)])
        if outcome.lost and isinstance(outcome.error, Exception):
            # A late owner's failure: another caller runs the call now; nothing to record.
            raise _lost(spec, key) from outcome.error
        yield from spec._store_error(backend, keys, token, outcome, owner)
        raise outcome.error

    try:
        payload = spec._serializer.dumps(outcome.value)
        if len(payload) > spec._max_result:
            raise SerializationError(
                f"a result of {len(payload):,} bytes, over max_result_bytes="
                f"{spec._max_result:,}; store the data elsewhere and return a reference, or "
                "raise the limit"
            )
    except Exception as exc:  # a third-party serializer's own errors (json's TypeError) too
        yield from _abandon(spec, tx, backend, key, token)
        raise SerializationError(
            f"{spec.name} returned a value that cannot be stored ({exc}), so its "
            f"transaction was rolled back (its writes included) and {key} released"
        ) from exc

    try:
        stored = yield Op(tx.complete, tx.acomplete, payload, ttl=spec._ttl)
    except asyncio.CancelledError as exc:
        yield from _abandon(spec, tx, backend, key, token)
        raise exc
    except BackendError as exc:
        yield from _rollback(spec, tx, key, [release_op(backend, key, token)])
        if (yield from _taken_over(backend, key, token)):
            # The server ended a late owner's transaction (its idle bound) and another
            # caller took the key: say so, rather than the driver's disconnect.
            raise _lost(spec, key) from exc
        yield from spec._release(backend, key, token)
        raise
    if not stored:
        yield from _rollback(spec, tx, key, [])  # (the key is another caller's now)
        raise _lost(spec, key)

    try:
        yield Op(tx.commit, tx.acommit)
    except asyncio.CancelledError as exc:
        # acommit ran to its end before re-raising: committed (see the contract).
        events.emit(EventKind.COMPLETED, spec.name, key, duration=outcome.duration)
        raise exc
    except BackendError as exc:
        return (yield from _settle(spec, backend, key, token, outcome, exc))
    events.emit(EventKind.COMPLETED, spec.name, key, duration=outcome.duration)
    return outcome.value


def _abandon(spec: Spec, tx: Transaction, backend: Backend, key: str, token: str) -> Flow[None]:
    """Roll back and give the key back, so the next call runs (a cancellation arriving
    meanwhile is re-raised once both are done)."""
    yield from _rollback(spec, tx, key, [release_op(backend, key, token)])
    yield from spec._release(backend, key, token)


def _settle(
    spec: Spec, backend: Backend, key: str, token: str, outcome: _Outcome, exc: BackendError
) -> Flow[Any]:
    """The commit failed without saying whether it happened: the record tells. The key is
    never released here (a commit still landing would make that a rerun): an uncommitted
    claim runs out with its lease."""
    try:
        record = yield Op(backend.get, backend.aget, key)
    except BackendError:
        raise exc from None
    if record is not None and record.token == token and record.state is State.COMPLETED:
        log.warning(
            "idempotask: the commit of %s (%s) reported an error but the result is stored: %s",
            spec.name,
            key,
            exc,
        )
        events.emit(EventKind.COMPLETED, spec.name, key, duration=outcome.duration)
        return outcome.value
    if record is not None and record.token != token:
        raise _lost(spec, key) from exc
    raise exc


def _taken_over(backend: Backend, key: str, token: str) -> Flow[bool]:
    """Whether another caller holds ``key`` now (False when the store cannot tell)."""
    try:
        record = yield Op(backend.get, backend.aget, key)
    except BackendError:
        return False
    return record is not None and record.token != token


def _lost(spec: Spec, key: str) -> LeaseLostError:
    events.emit(EventKind.LEASE_LOST, spec.name, key)
    message = (
        f"{spec.name}: the claim on {key} was lost while the body ran (its lease ran out "
        "before the result was written, and another caller may have taken the key over), "
        "so its transaction was rolled back, the body's writes included; the run that "
        "stores a result for this key is the one that counts"
    )
    log.warning("idempotask: %s", message)
    return LeaseLostError(message, key=key)

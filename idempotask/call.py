"""The call protocol: one call of an ``@idempotent`` function, from claim to stored result.

The protocol is one flow (see :mod:`idempotask.flow`), :meth:`Spec.flow`, which yields
the I/O it needs (claim, run the body, sleep, complete...); :func:`drive` runs it for
sync callers and :func:`adrive` for async ones. The decorator
(:mod:`idempotask.idempotent`) builds a :class:`Spec`; the framework integrations run
their tasks through :func:`drive` / :func:`adrive`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, NoReturn

from idempotask import _transactional, config, events, flow, lease
from idempotask.backends.base import Backend, Record, State
from idempotask.errors import (
    AlreadyInProgress,
    BackendError,
    ConfigurationError,
    CorruptRecordError,
    KeyEncodingError,
    KeyMismatchError,
    MissingTableError,
    SerializationError,
)
from idempotask.events import EventKind
from idempotask.flow import Flow, Op, release_op, unstoppable
from idempotask.keys import KEY_VERSION, CallKeyer, digest, explicit_digest
from idempotask.serializers import (
    JSONSerializer,
    Serializer,
    dump_exception,
    get_serializer,
    load_exception,
    result_types,
)

__all__ = [
    "Call",
    "Options",
    "Spec",
    "adrive",
    "drive",
    "is_cached_error",
    "is_cancellation",
    "register_cancellation",
]

log = logging.getLogger("idempotask")

_POLL_FIRST, _POLL_MAX = 0.005, 0.25  # waiting on another caller: first and longest poll

# Store errors that are not outages: fail-open never runs a body past them.
_NOT_OUTAGES = (CorruptRecordError, MissingTableError)

# Tokens must be unique across processes and calls; a random per-process prefix and a
# counter are as unique as uuid4 and several times cheaper on the hot path.
_token_prefix = os.urandom(8).hex()
_token_counter = itertools.count()


def _reseed_tokens() -> None:
    global _token_prefix, _token_counter
    _token_prefix = os.urandom(8).hex()
    _token_counter = itertools.count()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_tokens)


# Exception types a body may raise that are not failures of the call (see
# register_cancellation): never cached, the claim released -- or, for the _keeping ones
# when the call has an owner, left with that owner.
_cancellations: tuple[type[BaseException], ...] = ()
_keeping: tuple[type[BaseException], ...] = ()


def register_cancellation(exc_type: type[BaseException], *, keep_claim: bool = False) -> None:
    """Treat ``exc_type``, raised by a body, as a cancellation rather than a failure.

    Like ``asyncio.CancelledError`` it is never cached as an error (not even under
    ``cache_errors=``), and by default the claim is released so the next call runs.
    For a framework's time limit that is an ``Exception`` subclass::

        from celery.exceptions import SoftTimeLimitExceeded

        register_cancellation(SoftTimeLimitExceeded)

    ``keep_claim=True`` is for a framework's "a retry of this execution is scheduled"
    signal (Celery's ``Retry``): when the call has an owner (``using(owner=task_id)``),
    the claim stays held by that owner until its lease runs out, so the retry re-takes
    it and a duplicate arriving meanwhile waits instead of running. Without an owner
    nothing could re-take it, so it is released. Integrations register their framework's
    types when imported; registering a type again is harmless.
    """
    global _cancellations, _keeping
    if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
        raise ConfigurationError(
            f"register_cancellation: expected an exception class, got {exc_type!r}"
        )
    if exc_type not in _cancellations:
        _cancellations = (*_cancellations, exc_type)
    if keep_claim and exc_type not in _keeping:
        _keeping = (*_keeping, exc_type)


def is_cached_error(error: BaseException) -> bool:
    """Whether ``error`` was re-raised from a failure cached by ``cache_errors=`` rather
    than raised by the body now."""
    return getattr(error, "__idempotask_cached__", False) is True


def is_cancellation(error: BaseException) -> bool:
    """Whether ``error`` is a cancellation, not a failure: any ``BaseException`` that is
    not an ``Exception`` (``CancelledError``, ``KeyboardInterrupt``...) or a type given
    to :func:`register_cancellation`. Such errors are never cached or dead-lettered."""
    return not isinstance(error, Exception) or isinstance(error, _cancellations)


@dataclass(frozen=True)
class Options:
    """The validated options of one ``@idempotent`` function (None: use the configured)."""

    name: str
    ttl: float | None
    lease: float | None
    on_conflict: Literal["wait", "raise"]
    wait_timeout: float | None
    cache_errors: float | None
    backend: Backend | str | None
    serializer: Serializer | None
    on_backend_error: Literal["raise", "open"] | None
    max_result_bytes: int | None = None
    previous_names: tuple[str, ...] = ()
    transactional: bool = False


class _Outcome(NamedTuple):
    """What running the body produced: a value or an exception."""

    value: Any
    error: BaseException | None
    duration: float
    lost: bool = False  # the renewal already reported the claim lost


class Spec:
    """Everything about one decorated function that does not change per call.

    Public in the package (``fn.__idempotask_spec__``): the framework integrations run
    it through :func:`drive` / :func:`adrive` with a task id as the claim's owner.
    """

    def __init__(self, func: Callable[..., Any], options: Options, keyer: CallKeyer) -> None:
        self.func = func
        self.options = options
        self.keyer = keyer
        self.name = options.name
        self._generation = -1
        self._backend: Backend | None = None
        self._namespace = ""
        self._ttl = self._lease = self._wait = 0.0
        self._fail_open = False
        self._serializer: Serializer = get_serializer(None)
        self._result_types: tuple[type, ...] | None = None
        self._max_result = self._max_argument = 0

    # Settings are read once per configure() generation, not once per call.
    def refresh(self) -> None:
        # The generation is read before the settings: a configure() in another thread
        # meanwhile leaves it behind, so the next call reads them again.
        generation = config.generation
        if self._generation == generation:
            return
        s = config.settings()
        o = self.options
        if o.backend is not None:
            if self._backend is None:
                self._backend = config.resolve_backend(o.backend)
        else:
            self._backend = None  # resolved lazily through config.get_backend()
        self._namespace = s.namespace
        self._ttl = o.ttl if o.ttl is not None else s.default_ttl
        self._lease = o.lease if o.lease is not None else s.default_lease
        self._wait = o.wait_timeout if o.wait_timeout is not None else s.wait_timeout
        self._fail_open = (o.on_backend_error or s.on_backend_error) == "open"
        self._serializer = self._bound(o.serializer or get_serializer(s.serializer))
        self._max_result = o.max_result_bytes or s.max_result_bytes
        self._max_argument = s.max_argument_bytes
        self._generation = generation

    def _bound(self, serializer: Serializer) -> Serializer:
        """The JSON serializer bound to the classes this function returns: a record in
        the store can make a duplicate rebuild those classes only (see
        :func:`idempotask.serializers.result_types`)."""
        if type(serializer) is not JSONSerializer or serializer.types is not None:
            return serializer
        if self._result_types is None:
            self._result_types = result_types(self.func)
        return serializer.restricted_to(self._result_types)

    def backend(self) -> Backend:
        self.refresh()
        return self._backend if self._backend is not None else config.get_backend()

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any], explicit: str | None) -> str:
        self.refresh()
        if explicit is not None:
            # An explicit key (an Idempotency-Key header) is hashed too: it may be secret.
            return f"{self._namespace}:{self.name}:{KEY_VERSION}:{explicit_digest(explicit)}"
        return f"{self._namespace}:{self.name}:{KEY_VERSION}:{self.fingerprint(args, kwargs)}"

    def previous_keys(self, key: str) -> tuple[str, ...]:
        """The keys this call had under ``previous_names`` (same digest, older name)."""
        if not self.options.previous_names:
            return ()
        tail = key[len(self._namespace) + len(self.name) + 2 :]  # "v1:digest"
        return tuple(f"{self._namespace}:{old}:{tail}" for old in self.options.previous_names)

    def fingerprint(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        material = self.keyer.material(args, kwargs)
        if len(material) > self._max_argument:
            raise KeyEncodingError(
                f"{self.name}: the arguments encode to {len(material):,} bytes of key material, "
                f"over max_argument_bytes={self._max_argument:,}; key the call by an id with "
                "key= or key_args=, or raise the limit with configure(max_argument_bytes=...)"
            )
        return digest(material)

    # The decision core: no I/O here (see idempotask.flow).
    def flow(self, call: Call, key: str, owner: str, fingerprint: str) -> Flow[Any]:
        token = f"{_token_prefix}{next(_token_counter):x}"
        backend = call.backend
        transactional = self.options.transactional
        if transactional:
            _transactional.refuse_nested(self.name)
            _transactional.check_store(self.name, backend)
        legacy = self.previous_keys(key)
        deadline = -1.0
        poll = _POLL_FIRST
        while True:
            try:
                record: Record = yield Op(
                    backend.claim,
                    backend.aclaim,
                    key,
                    token,
                    lease=self._lease,
                    owner=owner,
                    fingerprint=fingerprint,
                )
            except BackendError as exc:
                return (yield from self._fail_open_or_raise(call, key, exc))
            except asyncio.CancelledError as exc:
                # The claim may have been taken before the cancellation arrived: give it
                # back now rather than leave the key blocked for a whole lease.
                yield from self._finish_cancelled(exc, [release_op(backend, key, token)])
            if record.token == token and record.state is State.IN_PROGRESS:
                if not legacy:
                    break
                blocker = yield from self._claim_legacy(
                    backend, key, legacy, token, owner, fingerprint
                )
                if blocker is None:
                    break
                record = blocker  # a record under a previous name answers, or blocks
            if fingerprint and record.fingerprint and record.fingerprint != fingerprint:
                raise KeyMismatchError(
                    f"idempotency key {key} was first used for {self.name} with other "
                    "arguments; an explicit key must always come with the same arguments",
                    key=key,
                )
            if record.state is State.COMPLETED:
                events.emit(EventKind.DUPLICATE, self.name, key)
                return self._load(key, record.payload)
            if record.state is State.FAILED:
                events.emit(EventKind.DUPLICATE, self.name, key)
                raise self._load_error(key, record.payload)
            # IN_PROGRESS, held by someone else: one conflict event per call, not per poll.
            now = time.monotonic()
            if deadline < 0:
                events.emit(EventKind.CONFLICT, self.name, key)
                deadline = now + self._wait
            if self.options.on_conflict == "raise" or now >= deadline:
                waited = "" if self.options.on_conflict == "raise" else f" after {self._wait:g}s"
                raise AlreadyInProgress(
                    f"{self.name}: another caller holds {key}{waited}; its result is not ready yet",
                    key=key,
                )
            # Poll by claiming again: one round trip that also takes the key if the
            # holder failed or its lease ran out, and returns the result if it finished.
            yield Op(time.sleep, asyncio.sleep, min(poll, deadline - now))
            poll = min(poll * 2, _POLL_MAX)

        events.emit(EventKind.CLAIMED, self.name, key)
        if transactional:  # (no legacy keys: refused at decoration)
            return (yield from _transactional.flow(self, call, key, token, owner))
        keys = (key, *legacy)
        outcome: _Outcome = yield Op(call.run, call.arun, keys, token)
        if outcome.error is None:
            return (yield from self._store_result(backend, keys, token, outcome))
        yield from self._store_error(backend, keys, token, outcome, owner)
        raise outcome.error

    def _claim_legacy(
        self,
        backend: Backend,
        key: str,
        legacy: tuple[str, ...],
        token: str,
        owner: str,
        fingerprint: str,
    ) -> Flow[Record | None]:
        """During a rename, also claim the keys of the previous names.

        Processes still running the old code claim only the old key, so holding it too is
        what keeps a rolling deploy from running a call twice. Returns None when every
        key is held, else the record under a previous name that answers or blocks this
        call (after giving back what was taken).
        """
        taken = [key]
        blocker: Record | None = None
        for old in legacy:
            try:
                record: Record = yield Op(
                    backend.claim,
                    backend.aclaim,
                    old,
                    token,
                    lease=self._lease,
                    owner=owner,
                    fingerprint=fingerprint,
                )
            except BackendError:
                yield from self._release_all(backend, taken, token)
                raise
            except asyncio.CancelledError as exc:
                ops = [release_op(backend, k, token) for k in (*taken, old)]
                yield from self._finish_cancelled(exc, ops)
            if record.token == token and record.state is State.IN_PROGRESS:
                taken.append(old)
                continue
            blocker = record
            break
        if blocker is not None:
            yield from self._release_all(backend, taken, token)
        return blocker

    def _fail_open_or_raise(self, call: Call, key: str, exc: BackendError) -> Flow[Any]:
        events.emit(
            EventKind.BACKEND_ERROR, self.name, key, error=type(exc.__cause__ or exc).__name__
        )
        if not self._fail_open or self.options.transactional:
            # A transactional body needs the store's database: it cannot run without it.
            raise exc
        if isinstance(exc, _NOT_OUTAGES):
            # on_backend_error="open" is about outages. Bad data under a key (or a table
            # that does not exist) will not go away by itself: running unprotected would
            # run the body on every call until someone looks.
            log.error(
                "idempotask: %s for %s (%s) is not an outage, so the call fails closed even "
                "with on_backend_error='open': %s",
                type(exc).__name__,
                self.name,
                key,
                exc,
            )
            raise exc
        log.error(
            "idempotask: store unavailable for %s (%s); on_backend_error='open', so the call "
            "runs UNPROTECTED and duplicates are possible: %s",
            self.name,
            key,
            exc,
        )
        events.emit(EventKind.FAIL_OPEN, self.name, key)
        outcome: _Outcome = yield Op(call.run, call.arun, None, None)
        if outcome.error is not None:
            raise outcome.error
        return outcome.value

    def _store_result(
        self, backend: Backend, keys: tuple[str, ...], token: str, outcome: _Outcome
    ) -> Flow[Any]:
        key = keys[0]
        try:
            payload = self._serializer.dumps(outcome.value)
        except Exception as exc:  # a third-party serializer's own errors (json's TypeError)
            yield from self._release_all(backend, keys, token)
            raise SerializationError(
                f"{self.name} returned a value that cannot be stored, so {key} was released "
                f"and the call is not protected: {exc}"
            ) from exc
        if len(payload) > self._max_result:
            yield from self._release_all(backend, keys, token)
            raise SerializationError(
                f"{self.name} returned a result of {len(payload):,} bytes, over "
                f"max_result_bytes={self._max_result:,}, so {key} was released and the call "
                "is not protected; store the data elsewhere and return a reference, or raise "
                "the limit (max_result_bytes= on the decorator or in configure())"
            )
        stored_all = True
        for k in keys:
            try:
                stored = yield Op(
                    backend.complete, backend.acomplete, k, token, payload, ttl=self._ttl
                )
            except asyncio.CancelledError as exc:
                # Cancelled while the result was being written. The body ran: its result
                # is written to the end (repeating a complete with its token is harmless)
                # before the cancellation goes on, or the key would stay blocked for a
                # lease and the body run again after it.
                ops = [
                    Op(
                        backend.complete,
                        unstoppable(backend.acomplete),
                        x,
                        token,
                        payload,
                        ttl=self._ttl,
                    )
                    for x in keys
                ]
                yield from self._finish_cancelled(exc, ops)
            except BackendError as exc:
                # The body ran; raising would make a framework run it again. The result
                # is returned, and the claim expires with its lease.
                log.error(
                    "idempotask: could not store the result of %s (%s): %s", self.name, k, exc
                )
                events.emit(EventKind.BACKEND_ERROR, self.name, k, error=type(exc).__name__)
                return outcome.value
            stored_all = stored_all and bool(stored)
        if stored_all:
            events.emit(EventKind.COMPLETED, self.name, key, duration=outcome.duration)
        elif not outcome.lost:
            lease.report_lost(
                self.name,
                key,
                "the key was taken over while the body ran; the other "
                "caller's result is kept and this one's is only returned to its caller",
            )
        return outcome.value

    def _store_error(
        self,
        backend: Backend,
        keys: tuple[str, ...],
        token: str,
        outcome: _Outcome,
        owner: str = "",
    ) -> Flow[None]:
        key = keys[0]
        error = outcome.error
        assert error is not None
        ttl = self.options.cache_errors
        events.emit(
            EventKind.FAILED, self.name, key, duration=outcome.duration, error=type(error).__name__
        )
        if owner and isinstance(error, _keeping):
            # A retry of this execution is scheduled (Celery's Retry): the claim stays
            # with its owner, so the retry re-takes it and duplicates meanwhile wait.
            return
        if ttl is None or not isinstance(error, Exception) or isinstance(error, _cancellations):
            # Failures and cancellations (CancelledError, KeyboardInterrupt, registered
            # ones) release.
            yield from self._release_all(backend, keys, token)
            return
        try:
            payload = dump_exception(error)
            for k in keys:
                try:
                    stored = yield Op(backend.fail, backend.afail, k, token, payload, ttl=ttl)
                except asyncio.CancelledError as exc:
                    ops = [
                        Op(backend.fail, unstoppable(backend.afail), x, token, payload, ttl=ttl)
                        for x in keys
                    ]
                    yield from self._finish_cancelled(exc, ops)
                if not stored and not outcome.lost:
                    lease.report_lost(self.name, k, "the key was taken over while the body ran")
        except (BackendError, SerializationError) as exc:
            log.error("idempotask: could not cache the error of %s (%s): %s", self.name, key, exc)
            yield from self._release_all(backend, keys, token)

    def _release_all(self, backend: Backend, keys: Sequence[str], token: str) -> Flow[None]:
        for k in keys:
            yield from self._release(backend, k, token)

    def _release(self, backend: Backend, key: str, token: str) -> Flow[None]:
        try:
            yield Op(backend.delete, backend.adelete, key, token=token)
        except asyncio.CancelledError as exc:
            yield from self._finish_cancelled(exc, [release_op(backend, key, token)])
        except BackendError as exc:
            log.error(
                "idempotask: could not release %s after %s failed; it stays claimed until its "
                "lease runs out: %s",
                key,
                self.name,
                exc,
            )
            return
        events.emit(EventKind.RELEASED, self.name, key)

    def _finish_cancelled(self, cancelled: BaseException, ops: list[Op]) -> Flow[NoReturn]:
        """The caller was cancelled during a store write: perform ``ops`` (the writes that
        must not be lost, made with :func:`~idempotask.flow.unstoppable`), then re-raise
        the cancellation.

        Only the async driver throws a cancellation into the flow (see :func:`adrive`).
        """
        for op in ops:
            try:
                yield op
            except BackendError as exc:
                log.error(
                    "idempotask: %s was cancelled and the store failed while its claim was "
                    "settled; the key stays claimed until its lease runs out: %s",
                    self.name,
                    exc,
                )
        raise cancelled

    def _too_big(self, key: str, payload: bytes, what: str) -> None:
        # A read decodes at most what a write may store: bytes past it were not written
        # under this configuration, and decoding them could take any amount of memory.
        if len(payload) > self._max_result:
            raise SerializationError(
                f"the {what} of {self.name} under {key} is {len(payload):,} bytes, over "
                f"max_result_bytes={self._max_result:,}, so it is not read; the call is not "
                "run again. Raise max_result_bytes if the limit was lowered, or use "
                "forget_key() to drop the record"
            )

    def _load(self, key: str, payload: bytes) -> Any:
        self._too_big(key, payload, "stored result")
        try:
            return self._serializer.loads(payload)
        except Exception as exc:  # a third-party serializer's own errors too
            raise SerializationError(
                f"the stored result of {self.name} under {key} cannot be read ({exc}); the "
                "call is not run again. Use forget_key() to drop the record if it is stale."
            ) from exc

    def _load_error(self, key: str, payload: bytes) -> BaseException:
        try:
            self._too_big(key, payload, "cached error")
            error = load_exception(payload)
        except SerializationError as exc:
            error = SerializationError(f"the cached error under {key} cannot be read: {exc}")
        if is_cancellation(error):
            # Never cached (see _store_error), so not our record: raising it would make a
            # duplicate exit its process (SystemExit) or look cancelled to asyncio.
            error = SerializationError(
                f"the cached error under {key} cannot be read: it is a "
                f"{type(error).__name__}, a cancellation, which is never cached, so the "
                "record was not written by idempotask; the call is not run again. Use "
                "forget_key() to drop the record."
            )
        # Marked where it is made, so outer layers (@dead_letter) know a duplicate was
        # answered from the cache and the first failure's record already covers it.
        with contextlib.suppress(AttributeError, TypeError):
            error.__idempotask_cached__ = True  # type: ignore[attr-defined]
        return error


# What the async driver throws back into a flow: store failures, and a cancellation of
# the caller, which the flow answers by settling its claim before it propagates.
_ASYNC_CATCH: tuple[type[BaseException], ...] = (BackendError, asyncio.CancelledError)


class Call:
    """One call being made: the store it uses and the arguments its body gets."""

    __slots__ = ("args", "backend", "kwargs", "spec")

    def __init__(
        self, spec: Spec, backend: Backend, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.args = args
        self.kwargs = kwargs

    def run(self, keys: tuple[str, ...] | None, token: str | None) -> _Outcome:
        running = _Running(self.spec, self.backend, keys, token, lease.hold)
        try:
            value = self.spec.func(*self.args, **self.kwargs)
        except BaseException as exc:
            return running.done(None, exc)
        return running.done(value, None)

    async def arun(self, keys: tuple[str, ...] | None, token: str | None) -> _Outcome:
        running = _Running(self.spec, self.backend, keys, token, lease.ahold)
        try:
            value = await self.spec.func(*self.args, **self.kwargs)
        except BaseException as exc:
            return running.done(None, exc)
        return running.done(value, None)


def _start(
    spec: Spec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    explicit: str | None,
    owner: str,
    store_key: str | None,
) -> Flow[Any]:
    key = spec.key(args, kwargs, explicit) if store_key is None else store_key
    fingerprint = spec.fingerprint(args, kwargs) if explicit is not None else ""
    return spec.flow(Call(spec, spec.backend(), args, kwargs), key, owner, fingerprint)


def drive(
    spec: Spec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    explicit: str | None = None,
    owner: str = "",
    store_key: str | None = None,
) -> Any:
    """Call ``spec``'s function with ``args`` and ``kwargs``, idempotently.

    ``explicit``: a per-call key (``fn.using(key=...)``); ``owner``: the claim's owner
    (``fn.using(owner=...)``, an integration's task id); ``store_key``: the key an
    integration's producer computed for these arguments. Public in the package: the
    framework integrations run their tasks through it (and :func:`adrive`).
    """
    return flow.drive(_start(spec, args, kwargs, explicit, owner, store_key))


async def adrive(
    spec: Spec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    explicit: str | None = None,
    owner: str = "",
    store_key: str | None = None,
) -> Any:
    """Async :func:`drive`: awaits the store's async methods, the body and the sleeps."""
    return await flow.adrive(_start(spec, args, kwargs, explicit, owner, store_key), _ASYNC_CATCH)


class _Running:
    """A body being run: the leases it holds (when protected) and its start time."""

    __slots__ = ("leases", "started", "stops")

    def __init__(
        self,
        spec: Spec,
        backend: Backend,
        keys: tuple[str, ...] | None,
        token: str | None,
        hold: Callable[[lease.Lease], Callable[[], None]],
    ) -> None:
        if keys is not None and token is not None and len(keys) == 1:  # the usual case
            held = lease.Lease(backend, keys[0], token, spec._lease, spec.name)
            self.leases: list[lease.Lease] = [held]
            self.stops = [hold(held)]
        elif keys is None or token is None:
            # The body runs unprotected (fail-open): nothing to renew.
            self.leases = []
            self.stops = []
        else:
            self.leases = [lease.Lease(backend, k, token, spec._lease, spec.name) for k in keys]
            # The primary key's lease is held last, so lease_held() reports on it.
            self.stops = [hold(x) for x in reversed(self.leases)]
        self.started = time.perf_counter()

    def done(self, value: Any, error: BaseException | None) -> _Outcome:
        lost = False
        for stop in reversed(self.stops):  # contextvar resets must unwind in order
            stop()
        for x in self.leases:
            lost = lost or x.reported_lost
        return _Outcome(value, error, time.perf_counter() - self.started, lost)

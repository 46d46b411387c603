"""Replays: which functions and routes this process can replay, how a letter's call is
rebuilt, and running it under the letter's own idempotency key.

A replay runs the original call under its original key, or does not run. The call is
rebuilt from the stored arguments when they are the call's own (no placeholder, see
:mod:`idempotask.deadletter._arguments`), else by the function's ``replay_with=`` hook
from what was kept; either way it must give the letter's key (or, for a call made under
an explicit key, the digest of the original arguments). Otherwise :func:`prepare` says
why, and the processor leaves the letter to a person.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from idempotask import flow
from idempotask.backends.base import DeadLetter
from idempotask.call import Call
from idempotask.deadletter._arguments import (
    LetterArguments,
    Redacted,
    _same,
    call_arguments,
    letter_arguments,
)
from idempotask.deadletter._core import Hook, Policies, ReplayError, RouteHandler
from idempotask.errors import ConfigurationError, DuplicateNameError
from idempotask.retry import InCallRetry
from idempotask.taxonomy import Classifier

if TYPE_CHECKING:
    from idempotask.deadletter._queue import DeadLetterQueue

__all__ = [
    "Prepared",
    "Registration",
    "lookup",
    "prepare",
    "register",
    "register_route",
    "registered_functions",
    "registered_routes",
    "replaying",
    "run_async",
    "run_sync",
    "unregister_route",
]

ReplayWith = Callable[[dict[str, Any]], Mapping[str, Any]]


@dataclass(eq=False)
class Registration:
    """Everything ``@dead_letter`` knows about one function."""

    name: str
    owner: str
    func: Callable[..., Any]  # the decorated function (an @idempotent one, or plain)
    call: Callable[..., Any]  # the outer wrapper
    is_async: bool
    signature: inspect.Signature | None
    spec: Any  # the inner @idempotent function's spec, or None
    queue: DeadLetterQueue | None  # None: the default queue, looked up per failure
    redact: Callable[[dict[str, Any]], Mapping[str, Any]] | None
    replay_with: ReplayWith | None
    classifier: Classifier | None
    policies: Policies | None
    retry: InCallRetry | None
    swallow: bool
    critical: bool
    on_dead_letter: Hook | None
    on_retry_exhausted: Hook | None
    breaker: Any = None  # a CircuitBreaker guarding each attempt, or None
    warned: bool = False  # KeepsAllArgumentsWarning given for it

    def guarded(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call`` under this function's breaker and in-call retries (each attempt is
        guarded by the breaker, so the retries stop as soon as it opens)."""
        guarded = call if self.breaker is None else self.breaker(call)
        return guarded if self.retry is None else self.retry.wrap(guarded)


_replaying: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "idempotask_replaying", default=None
)
_registry: dict[str, Registration] = {}
_routes: dict[str, RouteHandler] = {}
_registry_lock = threading.Lock()


def replaying() -> str | None:
    """The id of the dead letter whose replay is running in this context, else None.

    >>> replaying() is None
    True
    """
    return _replaying.get()


def registered_functions() -> dict[str, Callable[..., Any]]:
    """Replay name -> decorated function, for every ``@dead_letter`` in this process.

    >>> "billing.charge" in registered_functions()  # doctest: +SKIP
    True
    """
    with _registry_lock:
        return {name: reg.call for name, reg in _registry.items()}


def registered_routes() -> tuple[str, ...]:
    """The names of the integration routes registered in this process.

    >>> isinstance(registered_routes(), tuple)
    True
    """
    with _registry_lock:
        return tuple(sorted(_routes))


def register(reg: Registration) -> None:
    """Make ``reg`` the function replayed for letters named ``reg.name``."""
    with _registry_lock:
        current = _registry.get(reg.name)
        if current is not None and current.owner != reg.owner:
            raise DuplicateNameError(
                f"dead-letter name {reg.name!r} is already used by {current.owner}; "
                f"{reg.owner} cannot share it (replays would run the wrong function). "
                "Pass a distinct name=."
            )
        # The same function defined again (a reload, a test) replaces its registration.
        _registry[reg.name] = reg


def lookup(letter: DeadLetter) -> tuple[Registration | None, RouteHandler | None]:
    """What replays ``letter`` here: its function's registration (letters without a
    route) or its route's handler; (None, None) when this process knows neither."""
    with _registry_lock:
        if letter.route:
            return None, _routes.get(letter.route)
        return _registry.get(letter.function), None


def register_route(name: str, handler: RouteHandler) -> None:
    """Replay letters whose ``route`` is ``name`` with ``handler(letter, arguments)``.

    Integrations record failures with ``route="celery"`` (say) and register how to
    re-submit them; the processor then enqueues rather than calls::

        register_route("celery", lambda letter, args: app.send_task(letter.function,
                                                                    kwargs=args))

    A handler that returns resolves the letter (``resolution="enqueued"``); if the
    framework run fails again, the integration records it with
    ``queue.record(..., replay_of=letter.id)`` so the same letter is updated. A letter
    whose stored arguments are not the call's own (redacted, not storable) is never
    handed to a route.
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"register_route: expected a non-empty name, got {name!r}")
    if not callable(handler):
        raise ConfigurationError(f"register_route: handler must be callable, got {handler!r}")
    with _registry_lock:
        _routes[name] = handler


def unregister_route(name: str) -> None:
    """Forget a route; unknown names are ignored.

    >>> unregister_route("no-such-route")
    """
    with _registry_lock:
        _routes.pop(name, None)


# ----------------------------------------------------------------------------------------
# Rebuilding the call
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """A letter's call, rebuilt and checked: ``call(*args, **kwargs)`` replays it."""

    call: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _keyed(reg: Registration, key: str, fingerprint: str) -> Callable[..., Any]:
    """The inner ``@idempotent`` function run under the store key ``key`` (a call made
    under an explicit key: the key cannot be derived from the arguments), claiming with
    the arguments' ``fingerprint`` as such a call does."""
    spec = reg.spec
    if reg.is_async:

        async def acall(*args: Any, **kwargs: Any) -> Any:
            run = Call(spec, spec.backend(), args, kwargs)
            return await flow.adrive(spec.flow(run, key, "", fingerprint))

        return acall

    def call(*args: Any, **kwargs: Any) -> Any:
        return flow.drive(spec.flow(Call(spec, spec.backend(), args, kwargs), key, "", fingerprint))

    return call


def _rebuild(reg: Registration, stored: LetterArguments) -> dict[str, Any] | str:
    """The call's arguments by name: stored, or from ``replay_with``; or why not. An
    exception of ``replay_with`` propagates (the replay failed, and is retried)."""
    if stored.complete:
        return dict(stored.values or {})
    reason = stored.why_incomplete()
    if reg.replay_with is None:
        return (
            f"{reason}, and {reg.name} has no replay_with= hook to rebuild the call: add one "
            "and requeue the letter, or resolve or abandon it by hand"
        )
    if stored.values is None:
        return reason
    rebuilt: object = reg.replay_with(stored.shown())  # a hook may break its promise
    if not isinstance(rebuilt, Mapping):
        return (
            f"the replay_with= hook of {reg.name} returned {type(rebuilt).__name__}, not a mapping"
        )
    values = dict(rebuilt)
    # What redact= stored in place of a value it changed ("<redacted>") is not the
    # call's own value (an equal one would have been kept as it was).
    masked = [
        name
        for name, kept in (stored.values or {}).items()
        if isinstance(kept, Redacted)
        and kept.how == "changed"
        and name in values
        and _same(values[name], kept.shown)
    ]
    if masked:
        return (
            f"the replay_with= hook of {reg.name} left argument(s) {', '.join(masked)} as "
            "redact= stored them, not as the call had them"
        )
    return values


def prepare(reg: Registration, letter: DeadLetter) -> Prepared | str:
    """Rebuild ``letter``'s call for ``reg``, checked against the letter's key; a string
    says why it cannot be (the letter must wait for a person).

    An exception raised by the ``replay_with=`` hook propagates: a reload that failed is
    a replay that failed.
    """
    stored = letter_arguments(letter)
    values = _rebuild(reg, stored)
    if isinstance(values, str):
        return values
    source = "stored" if stored.complete else "rebuilt (replay_with=)"
    made = call_arguments(
        reg.signature, reg.name, values, kept=stored.kept, source=f"the {source} arguments"
    )
    if isinstance(made, str):
        return made
    args, kwargs = made
    invoke: Callable[..., Any] = reg.func
    if letter.key and reg.spec is not None:
        try:
            if stored.fingerprint:
                fingerprint = reg.spec.fingerprint(args, kwargs)
                if fingerprint != stored.fingerprint:
                    return (
                        f"the {source} arguments are not those of the original call (made "
                        "under an explicit key): their digest differs from the letter's"
                    )
                invoke = _keyed(reg, letter.key, fingerprint)
            else:
                key = reg.spec.key(args, kwargs, None)
                if key != letter.key:
                    return (
                        f"the {source} arguments give the key {key}, not the letter's "
                        f"{letter.key}: they are not the original call's, or this process "
                        "runs with another namespace or key settings than the one that "
                        "failed"
                    )
        except Exception as exc:
            return f"the {source} arguments do not make a key ({type(exc).__name__}: {exc})"
    return Prepared(reg.guarded(invoke), args, kwargs)


# ----------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------


def run_sync(reg: Registration, letter_id: str, prepared: Prepared) -> Any:
    """Replay in this thread (an async function on a loop of its own)."""
    token = _replaying.set(letter_id)
    try:
        if not reg.is_async:
            return prepared.call(*prepared.args, **prepared.kwargs)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(prepared.call(*prepared.args, **prepared.kwargs))
        raise ReplayError(
            f"{reg.name} is async and an event loop is running in this thread: use aprocess_due()"
        )
    finally:
        _replaying.reset(token)


async def run_async(reg: Registration, letter_id: str, prepared: Prepared) -> Any:
    """Replay on the running loop (a sync function in a worker thread)."""
    token = _replaying.set(letter_id)
    try:
        if reg.is_async:
            return await prepared.call(*prepared.args, **prepared.kwargs)
        # A sync function must not block the loop; the thread inherits the replay marker.
        return await asyncio.to_thread(prepared.call, *prepared.args, **prepared.kwargs)
    finally:
        _replaying.reset(token)

"""Replays: which functions and routes this process can replay, and the marker that
tells a ``@dead_letter`` wrapper it is running as the replay of a letter."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from idempotask.backends.deadletters import DeadLetter
from idempotask.deadletter._core import (
    _JSON,
    Hook,
    Policies,
    ReplayError,
    RouteHandler,
    Unserializable,
)
from idempotask.errors import ConfigurationError, DuplicateNameError
from idempotask.retry import InCallRetry
from idempotask.taxonomy import Classifier

if TYPE_CHECKING:
    from idempotask.deadletter._queue import DeadLetterQueue

log = logging.getLogger("idempotask")

# ----------------------------------------------------------------------------------------
# Replays: which functions and routes this process can replay, and the replay marker.
# ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Registration:
    """Everything ``@dead_letter`` knows about one function."""

    name: str
    owner: str
    func: Callable[..., Any]
    call: Callable[..., Any]  # the outer wrapper: replays run through the whole stack
    is_async: bool
    signature: inspect.Signature | None
    spec: Any  # the inner @idempotent function's spec, or None
    queue: DeadLetterQueue | None  # None: the default queue, looked up per failure
    redact: Callable[[dict[str, Any]], Mapping[str, Any]] | None
    classifier: Classifier | None
    policies: Policies | None
    retry: InCallRetry | None
    swallow: bool
    critical: bool
    on_dead_letter: Hook | None
    on_retry_exhausted: Hook | None
    breaker: Any = None  # a CircuitBreaker guarding each attempt, or None


@dataclass
class _Replay:
    """Set while the processor replays letter ``letter_id`` of function ``name``."""

    name: str
    letter_id: str
    entered: bool = False


_replaying: contextvars.ContextVar[_Replay | None] = contextvars.ContextVar(
    "idempotask_replaying", default=None
)
_registry: dict[str, _Registration] = {}
_routes: dict[str, RouteHandler] = {}
_registry_lock = threading.Lock()


def replaying() -> str | None:
    """The id of the dead letter being replayed by the current call, else None.

    >>> replaying() is None
    True
    """
    current = _replaying.get()
    return None if current is None else current.letter_id


def registered_functions() -> dict[str, Callable[..., Any]]:
    """Replay name -> decorated function, for every ``@dead_letter`` in this process.

    >>> "billing.charge" in registered_functions()  # doctest: +SKIP
    True
    """
    with _registry_lock:
        return {name: reg.call for name, reg in _registry.items()}


def _register(reg: _Registration) -> None:
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


def register_route(name: str, handler: RouteHandler) -> None:
    """Replay letters whose ``route`` is ``name`` with ``handler(letter, arguments)``.

    Integrations record failures with ``route="celery"`` (say) and register how to
    re-submit them; the processor then enqueues rather than calls::

        register_route("celery", lambda letter, args: app.send_task(letter.function,
                                                                    kwargs=args))

    A handler that returns resolves the letter (``resolution="enqueued"``); if the
    framework run fails again, the integration records it with
    ``queue.record(..., replay_of=letter.id)`` so the same letter is updated.
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


class _Outcome:
    __slots__ = ("error", "value")

    def __init__(self, value: Any, error: Exception | None) -> None:
        self.value = value
        self.error = error


def _replay_sync(
    reg: _Registration, letter_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _Outcome:
    token = _replaying.set(_Replay(reg.name, letter_id))
    try:
        if not reg.is_async:
            return _Outcome(reg.call(*args, **kwargs), None)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return _Outcome(asyncio.run(reg.call(*args, **kwargs)), None)
        return _Outcome(
            None,
            ReplayError(
                f"{reg.name} is async and an event loop is running in this thread: "
                "use aprocess_due()"
            ),
        )
    except Exception as exc:
        return _Outcome(None, exc)
    finally:
        _replaying.reset(token)


async def _replay_async(
    reg: _Registration, letter_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _Outcome:
    token = _replaying.set(_Replay(reg.name, letter_id))
    try:
        if reg.is_async:
            return _Outcome(await reg.call(*args, **kwargs), None)
        # A sync function must not block the loop; the thread inherits the replay marker.
        return _Outcome(await asyncio.to_thread(reg.call, *args, **kwargs), None)
    except Exception as exc:
        return _Outcome(None, exc)
    finally:
        _replaying.reset(token)


def _route_call(handler: RouteHandler, letter: DeadLetter, arguments: dict[str, Any]) -> _Outcome:
    try:
        return _Outcome(handler(letter, arguments), None)
    except Exception as exc:
        return _Outcome(None, exc)


def _stored_arguments(letter: DeadLetter) -> dict[str, Any] | str:
    """The letter's arguments as a dict, or why they cannot be replayed."""
    if not letter.arguments:
        return {}
    try:
        arguments = _JSON.loads(letter.arguments)
    except Exception as exc:
        return f"the stored arguments cannot be read: {exc}"
    if not isinstance(arguments, dict):
        return "the stored arguments are not a mapping of names to values"
    bad = [
        f"{name} ({v.type_name})" for name, v in arguments.items() if isinstance(v, Unserializable)
    ]
    if bad:
        return f"argument(s) {', '.join(bad)} could not be stored, so the call cannot be replayed"
    return arguments


def _call_arguments(
    reg: _Registration, letter: DeadLetter, arguments: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | str:
    """Positional and keyword arguments to replay ``letter`` with, or why not."""
    sig = reg.signature
    if sig is None:
        if arguments:
            return f"{reg.name} has no inspectable signature to replay its arguments with"
        return (), {}
    unknown = sorted(set(arguments) - set(sig.parameters))
    if unknown:
        return f"{reg.name} no longer takes {', '.join(map(repr, unknown))}; its signature changed"
    ordered = {name: arguments[name] for name in sig.parameters if name in arguments}
    bound = inspect.BoundArguments(sig, ordered)
    args, kwargs = bound.args, bound.kwargs
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        kept = "were not kept" if not letter.arguments else "do not make a call"
        return f"the stored arguments {kept} ({exc}); was an argument removed by redact=?"
    return args, kwargs

"""One way to run a flow: a generator of I/O operations, driven sync or async.

Every decision in idempotask that needs a store -- a call's claim and completion, a dead
letter's recording and replay, a breaker's probe, the fallback store's routing -- is
written once, as a *flow*: a generator that yields :class:`Op` objects (what to call)
and receives their results, with no I/O of its own. Two drivers perform the operations:
:func:`drive` with the sync callables, :func:`adrive` awaiting the async ones, the way
tenacity's ``Retrying`` and ``AsyncRetrying`` drive ``BaseRetrying.iter``. So the logic
exists once for both worlds.

The exception policy is explicit: an operation's exception that is an instance of the
driver's ``catch`` types is thrown back into the flow, which decides (retry, fall back,
give up); any other exception closes the flow (its ``finally`` blocks run) and propagates
to the caller.

>>> def double(store: dict[str, int]) -> Flow[int]:
...     value = yield Op(store.__getitem__, None, "n")
...     return 2 * value
>>> drive(double({"n": 21}))
42
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

from idempotask.errors import BackendError

if TYPE_CHECKING:
    from idempotask.backends.base import Backend

__all__ = ["Flow", "Op", "adrive", "drive", "release_op", "store_op", "unstoppable"]

T = TypeVar("T")


class Op:
    """One operation a flow needs: ``fn(*args, **kwargs)`` for the sync driver, and
    ``afn(*args, **kwargs)`` awaited by the async one. Without ``afn`` both drivers call
    ``fn`` (quick local work that never blocks)."""

    __slots__ = ("afn", "args", "fn", "kwargs")

    def __init__(
        self,
        fn: Callable[..., Any],
        afn: Callable[..., Awaitable[Any]] | None,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.fn = fn
        self.afn = afn
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"Op({name}, args={self.args!r}, kwargs={self.kwargs!r})"


_async_names: dict[str, str] = {}


def store_op(target: Any, method: str, /, *args: Any, **kwargs: Any) -> Op:
    """The :class:`Op` calling ``target.<method>`` (sync) or ``target.a<method>`` (async),
    the naming every store contract in :mod:`idempotask.backends.base` follows."""
    name = _async_names.get(method)
    if name is None:
        name = _async_names[method] = "a" + method
    return Op(getattr(target, method), getattr(target, name), *args, **kwargs)


Flow = Generator[Op, Any, T]
"""A flow yields :class:`Op` objects, is sent their results, and returns its answer."""

DEFAULT_CATCH: tuple[type[BaseException], ...] = (BackendError,)


def drive(flow: Flow[T], catch: tuple[type[BaseException], ...] = DEFAULT_CATCH) -> T:
    """Run ``flow`` with the sync form of each operation.

    ``catch``: the exception types thrown back into the flow (default: store errors);
    anything else raised by an operation closes the flow and propagates.
    """
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = flow.send(send) if error is None else flow.throw(error)
        except StopIteration as stop:
            result: T = stop.value
            return result
        send = error = None
        try:
            send = op.fn(*op.args, **op.kwargs)
        except catch as exc:
            error = exc
        except BaseException:
            flow.close()
            raise


async def adrive(flow: Flow[T], catch: tuple[type[BaseException], ...] = DEFAULT_CATCH) -> T:
    """Run ``flow`` awaiting the async form of each operation (the sync one when it has
    none); ``catch`` as in :func:`drive`."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = flow.send(send) if error is None else flow.throw(error)
        except StopIteration as stop:
            result: T = stop.value
            return result
        send = error = None
        try:
            if op.afn is None:
                send = op.fn(*op.args, **op.kwargs)
            else:
                send = await op.afn(*op.args, **op.kwargs)
        except catch as exc:
            error = exc
        except BaseException:
            flow.close()
            raise


def unstoppable(afn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``afn`` run where its caller's cancellation cannot stop it.

    Used only once a caller was cancelled: the write runs in a task of its own, and the
    caller waits for it however often it is cancelled again (each store operation has
    its own timeouts, so the wait is bounded).
    """

    async def run(*args: Any, **kwargs: Any) -> Any:
        task = asyncio.ensure_future(afn(*args, **kwargs))
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait((task,))
        return task.result()

    return run


def release_op(backend: Backend, key: str, token: str) -> Op:
    """Delete ``key`` if ``token`` still holds it, with the async delete run where a
    cancellation cannot stop it (a cancelled call still releases its claim)."""
    return Op(backend.delete, unstoppable(backend.adelete), key, token=token)

"""SQLAlchemy's ``greenlet_spawn`` without making a greenlet per call.

An asyncio operation runs SQLAlchemy's sync code (the pool, our executor) in a greenlet,
whose ``await_`` hands each driver coroutine to the task to await. ``greenlet_spawn``
makes a new greenlet for every call, and making one costs about 8 µs, more than the rest
of the greenlet's work for an operation. :func:`spawn` runs the function in an idle
greenlet of this thread instead (made once, kept for the next call), switching to it the
same way: the function sees the task's context variables, its ``await_`` calls are
awaited by the caller, and an exception thrown into the caller while it awaits (a
cancellation) is thrown into the function, as ``greenlet_spawn`` does.

Our greenlets carry the marker that SQLAlchemy's ``await_`` looks for. Should a release
of SQLAlchemy look for something else, a one-time check (an ``await_`` in one of ours) finds
out, and :func:`spawn` is ``greenlet_spawn`` from then on.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet  # type: ignore[import-untyped]
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.util import await_, greenlet_spawn

__all__ = ["spawn"]

_T = TypeVar("_T")

#: Idle greenlets kept per thread (one per operation in flight at once is enough).
KEEP = 16

_local = threading.local()
# None until the first call checks that SQLAlchemy's await_ accepts our greenlets.
_compatible: bool | None = None


class _Done:
    """What a greenlet hands back when its function returned or raised."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self.value = value
        self.error = error


class _Greenlet(greenlet):  # type: ignore[misc]
    # What SQLAlchemy's await_ checks for on the current greenlet.
    __sqlalchemy_greenlet_provider__ = True


def _serve(job: tuple[Callable[..., Any], tuple[Any, ...]]) -> None:
    """A greenlet's life: run each job it is switched to with, hand back its outcome, wait
    for the next one."""
    while True:
        fn, args = job
        try:
            done = _Done(fn(*args), None)
        except GreenletExit:  # the greenlet itself is being discarded
            raise
        except BaseException as exc:
            done = _Done(None, exc)
        del fn, args
        job = getcurrent().parent.switch(done)
        del done


async def spawn(fn: Callable[..., _T], *args: Any) -> _T:
    """``await greenlet_spawn(fn, *args)``, in a reused greenlet."""
    if not _compatible:
        if _compatible is None:
            await _check()
        if not _compatible:
            return await greenlet_spawn(fn, *args)
    idle: list[_Greenlet] | None = getattr(_local, "idle", None)
    if idle is None:
        idle = _local.idle = []
    current = getcurrent()
    if idle:
        worker = idle.pop()
        worker.parent = current
    else:
        worker = _Greenlet(_serve, current)
    worker.gr_context = current.gr_context  # the task's context variables
    result = worker.switch((fn, args))
    while not isinstance(result, _Done):
        # An awaitable from await_: await it here, and send its outcome back in.
        try:
            sent = await result
        except BaseException:
            result = worker.throw(*sys.exc_info())
        else:
            result = worker.switch(sent)
    if len(idle) < KEEP:
        idle.append(worker)
    if result.error is not None:
        error, result.error = result.error, None
        raise error
    outcome: _T = result.value
    return outcome


async def _check() -> None:
    """Whether SQLAlchemy's ``await_`` runs in our greenlets (once per process)."""
    global _compatible

    async def nothing() -> None:
        return None

    def probe() -> bool:
        await_(nothing())
        return True

    _compatible = True
    try:
        await spawn(probe)
    except MissingGreenlet:  # await_ closed the probe's coroutine itself
        _compatible = False

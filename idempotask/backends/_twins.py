"""A store's sync method and its ``a``-prefixed async twin, written once: as a flow
(:mod:`idempotask.flow`) for :func:`twins`, or as a sync method that never waits on I/O
for :func:`inline`::

    def _get(self, id: str) -> Flow[DeadLetter | None]:
        \"\"\"The letter with this id, or None.\"\"\"
        ...

    get, aget = twins(_get)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from idempotask.flow import DEFAULT_CATCH, Flow, adrive, drive

__all__ = ["inline", "twins"]

S = TypeVar("S")
P = ParamSpec("P")
T = TypeVar("T")

Method = Callable[Concatenate[S, P], T]
AsyncMethod = Callable[Concatenate[S, P], Coroutine[Any, Any, T]]


def _named(method: Any, like: Any, name: str, doc: str | None) -> None:
    functools.update_wrapper(method, like)
    method.__name__ = name
    method.__qualname__ = like.__qualname__.rsplit(".", 1)[0] + "." + name
    method.__doc__ = doc
    # help() and inspect show the flow's parameters without its return type (a Flow,
    # which the caller never sees).
    method.__signature__ = inspect.signature(like).replace(
        return_annotation=inspect.Parameter.empty
    )


def twins(
    flow: Callable[Concatenate[S, P], Flow[T]],
    *,
    catch: tuple[type[BaseException], ...] = DEFAULT_CATCH,
    adoc: str = "",
) -> tuple[Method[S, P, T], AsyncMethod[S, P, T]]:
    """The sync method that drives ``flow`` and the async one that awaits it, each with
    ``catch`` (see :func:`idempotask.flow.drive`); named as ``flow`` without its leading
    ``_``, documented by ``flow``'s docstring and the async one by ``adoc`` (default:
    "Async :meth:`name`")."""
    name = flow.__name__.lstrip("_")
    own = flow.__name__  # looked up on the instance: a subclass may override the flow

    def method(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        run: Callable[P, Flow[T]] = getattr(self, own)
        return drive(run(*args, **kwargs), catch)

    async def amethod(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        run: Callable[P, Flow[T]] = getattr(self, own)
        return await adrive(run(*args, **kwargs), catch)

    _named(method, flow, name, flow.__doc__)
    _named(amethod, flow, "a" + name, adoc or f"Async :meth:`{name}`.")
    return method, amethod


def inline(method: Method[S, P, T]) -> AsyncMethod[S, P, T]:
    """The async twin of a sync method that never waits on I/O: it runs it in place (as
    the instance has it: a subclass's override counts)."""
    name = method.__name__

    async def amethod(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        run: Callable[P, T] = getattr(self, name)
        return run(*args, **kwargs)

    _named(amethod, method, "a" + name, f"Async :meth:`{name}`.")
    return amethod

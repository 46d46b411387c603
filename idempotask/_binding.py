"""Decorated functions that bind like functions, their helpers included.

``@idempotent`` and ``@dead_letter`` return a :class:`Bindable`: called, it runs the
wrapper it was made with; looked up on an instance (or on a class, for a class method)
it returns a :class:`Bound` view that passes the instance first, to the call *and* to
the helpers (``key_for``, ``forget``, ``using``...). A plain function cannot do that: a
bound method forwards attribute lookups to the function, so ``account.charge.key_for(5)``
would compute the key of a call with ``self=5``.

Both are :class:`functools.partial` subclasses, which keeps them what tools expect of a
function: ``inspect.iscoroutinefunction`` sees through a partial (documented since
Python 3.8), so async functions stay coroutine functions for asyncio, web frameworks
and our own integrations; ``inspect.signature`` gives the wrapped function's signature
(without ``self`` once bound); and calling one is a C-level call into the wrapper.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs 3.11; only mypy reads this

__all__ = ["Bindable", "Bound"]


class Bindable(functools.partial):  # type: ignore[type-arg]
    """A decorated function (``self.func`` is the wrapper to call) that binds like one.

    Build it with :meth:`make`. A class method's binding is kept by the object itself
    (:meth:`binds_class`), not by a ``classmethod`` around it, so that its helpers bind
    the class too on every Python version.
    """

    # Set on each instance by functools.update_wrapper.
    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    # Class level default; an instance made for a class method sets its own.
    _binds_class = False
    _kind = "decorated function"

    @classmethod
    def make(cls, call: Callable[..., Any], wrapped: Callable[..., Any]) -> Self:
        """The decorated function: calls ``call``, looks like ``wrapped``."""
        made = cls(call)
        functools.update_wrapper(made, wrapped)
        # Frameworks treat a callable that is not a plain function as an instance and
        # use its ``__call__``: Celery's @app.task reads its signature and __module__
        # (the C slot wrapper has none), RQ enqueues ``getattr(obj, "__call__")`` and
        # looks for our helpers on what it gets back. Found here, that is the decorated
        # function itself. Only code reading the attribute sees this: calling the object
        # still goes through the type's C-level call.
        made.__dict__["__call__"] = made
        return made

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None:
            if not self._binds_class or owner is None:
                return self  # looked up on the class: the function itself
            instance = owner
        elif self._binds_class:
            instance = type(instance)
        return Bound(self, instance)

    @property
    def __signature__(self) -> inspect.Signature:
        # The decorated function's. Also what keeps inspect from taking this object for
        # a builtin method descriptor (it has __get__), where it finds no signature.
        return inspect.signature(self.__wrapped__)

    def binds_class(self) -> None:
        """Bind to the class when looked up (what ``classmethod`` does)."""
        self._binds_class = True

    def _bound_using(
        self, key: Any, owner: Any, unknown: dict[str, Any], prefix: tuple[Any, ...]
    ) -> Any:
        """``using(...)`` with ``prefix`` (the bound instance) passed first."""
        raise NotImplementedError  # every kind defines its own

    def __reduce__(self) -> str:
        # Pickled by reference, as functions are: a module-level decorated function is
        # found again under its qualified name (what RQ and multiprocessing need).
        return str(self.__qualname__)

    def __repr__(self) -> str:
        return f"<{self._kind} {self.__module__}.{self.__qualname__}>"


class Bound(functools.partial):  # type: ignore[type-arg]
    """A :class:`Bindable` bound to an instance (or a class): ``self.func`` is the
    bindable, ``self.args`` is ``(instance,)``.

    Helpers that take the call's arguments get the instance first, like the call;
    everything else (``forget_key``, ``idempotency``, ``__name__``...) is the function's.
    """

    @property
    def _function(self) -> Any:
        return self.func  # the Bindable (typed loosely: its helpers depend on its kind)

    def __getattr__(self, name: str) -> Any:
        # Only looked up when the view itself has no such attribute. Dunders other than
        # the names stay unforwarded: ``__wrapped__`` or ``__signature__`` from the
        # function would give tools the signature *with* self.
        if name.startswith("__") and name not in ("__name__", "__qualname__"):
            raise AttributeError(name)
        return getattr(self._function, name)

    @property
    def __self__(self) -> Any:
        """The instance (or class) this view is bound to, as on a bound method."""
        return self.args[0]

    @property
    def __func__(self) -> Any:
        """The decorated function, as on a bound method."""
        return self.func

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        doc: str | None = self.func.__doc__
        return doc

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(self.func)
        params = list(signature.parameters.values())
        if params and params[0].kind in (
            params[0].POSITIONAL_ONLY,
            params[0].POSITIONAL_OR_KEYWORD,
        ):
            params = params[1:]
        return signature.replace(parameters=params)

    def key_for(self, *args: Any, **kwargs: Any) -> Any:
        """The store key of this call (the instance passed first)."""
        return self._function.key_for(self.args[0], *args, **kwargs)

    def forget(self, *args: Any, **kwargs: Any) -> Any:
        """Drop this call's stored result (the instance passed first)."""
        return self._function.forget(self.args[0], *args, **kwargs)

    async def aforget(self, *args: Any, **kwargs: Any) -> Any:
        """Async :meth:`forget`."""
        return await self._function.aforget(self.args[0], *args, **kwargs)

    def using(self, *, key: Any = None, owner: Any = None, **unknown: Any) -> Any:
        """This method with a per-call explicit key and/or owner (see the function's)."""
        return self._function._bound_using(key, owner, unknown, self.args)

    def __eq__(self, other: object) -> bool:
        # Like bound methods: equal when bound to the same object by the same function.
        if not isinstance(other, Bound):
            return NotImplemented
        return self.func is other.func and self.args[0] is other.args[0]

    def __hash__(self) -> int:
        return hash((id(self.func), id(self.args[0])))

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, str]]:
        return getattr, (self.args[0], self._function.__name__)

    def __repr__(self) -> str:
        fn = self._function
        return f"<bound {fn._kind} {fn.__qualname__} of {self.args[0]!r}>"

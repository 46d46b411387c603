"""Synchronous views of a backend, so one test body checks both its sync and async methods
(:class:`SyncView`, :class:`AsyncView`; :class:`StoreView` says what they offer). The
dead-letter and breaker views (:mod:`idempotask.testing.deadletters`,
:mod:`idempotask.testing.breakers`) reach their stores the same way, through ``_View``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import uuid
from collections.abc import Callable
from typing import Any, Literal, TypeVar, cast

from idempotask import flow
from idempotask.backends.base import Backend, Record, SupportsExpireNow
from idempotask.flow import Flow, Op, store_op

__all__ = ["AsyncView", "Mode", "StoreView", "SyncView", "in_threads", "open_view"]

Mode = Literal["sync", "async"]
_T = TypeVar("_T")


def in_threads(calls: list[Callable[[], _T]], timeout: float = 60.0) -> list[_T]:
    """Run each call in a thread of its own, all released together by a barrier; their
    answers in order. The first exception raised in a thread is raised here."""
    answers: dict[int, _T] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(calls), timeout=30)

    def worker(index: int, call: Callable[[], _T]) -> None:
        try:
            barrier.wait()
            answers[index] = call()
        except BaseException as exc:  # re-raised in the calling thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=x, daemon=True) for x in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    if errors:
        raise errors[0]
    if len(answers) != len(calls):
        raise TimeoutError(f"{len(calls) - len(answers)} concurrent calls did not return")
    return [answers[i] for i in range(len(calls))]


def _check_mode(mode: str) -> Mode:
    if mode not in ("sync", "async"):
        raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
    return cast(Mode, mode)


def _one(op: Op) -> Flow[Any]:
    return (yield op)


class _View:
    """What every view shares: names unique to it (``prefix`` + a name, remembered in
    ``_names`` so that closing the view can clean up after them), and how it reaches its
    store (``_target``): through the sync methods, or, when the view has an event loop
    (``loop``, which it owns), through the ``a``-prefixed coroutines run on that loop."""

    mode: Mode
    loop: asyncio.AbstractEventLoop | None = None

    def __init__(self, target: Any, prefix: str) -> None:
        self._target = target
        self.prefix = prefix
        self._names: set[str] = set()
        if self.mode == "async":
            self.loop = asyncio.new_event_loop()

    def _unique(self, name: str) -> str:
        unique = self.prefix + name
        self._names.add(unique)
        return unique

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.loop is None:
            return getattr(self._target, method)(*args, **kwargs)
        return self.loop.run_until_complete(getattr(self._target, "a" + method)(*args, **kwargs))

    def _run_all(self, flows: list[Flow[_T]]) -> list[_T]:
        """Run the flows at once: one thread each, released together by a barrier (sync),
        or one task each, gathered on the loop (async); their answers, in order."""
        if self.loop is None:
            return in_threads([functools.partial(flow.drive, f) for f in flows])

        async def race() -> list[_T]:
            return list(await asyncio.gather(*map(flow.adrive, flows)))

        return self.loop.run_until_complete(race())

    def _race(self, method: str, calls: list[tuple[Any, ...]], **kwargs: Any) -> list[Any]:
        """``method`` once per argument tuple, all at once (see :meth:`_run_all`)."""
        return self._run_all([_one(store_op(self._target, method, *a, **kwargs)) for a in calls])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._target!r})"

    def _close_loop(self, *, aclose: bool = True) -> None:
        """Shut down and close the loop, if any; with ``aclose``, a store that keeps
        per-loop connections first releases them through its ``aclose()``."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            release = getattr(self._target, "aclose", None) if aclose else None
            if callable(release):
                with contextlib.suppress(Exception):
                    loop.run_until_complete(release())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


class StoreView(_View):
    """The store protocol as plain synchronous calls, for tests.

    ``mode`` says which methods of ``backend`` are exercised. Keys made with :meth:`key`
    share a prefix unique to this view, so records left on a real server by earlier runs
    never interfere, and :meth:`close` deletes them.
    """

    #: How many concurrent callers :meth:`claim_concurrently` tests use by default.
    concurrency: int

    def __init__(self, backend: Backend, *, prefix: str | None = None) -> None:
        if not isinstance(backend, SupportsExpireNow):
            raise TypeError(
                f"{type(backend).__qualname__} has no expire_now(key) method; the conformance "
                "suite needs it to move a record past its lease or ttl on the store's own clock "
                "(see idempotask.backends.base.SupportsExpireNow)"
            )
        self.backend = backend
        self._expirer: SupportsExpireNow = backend
        super().__init__(
            backend, f"idempotask-test:{uuid.uuid4().hex}:" if prefix is None else prefix
        )

    def key(self, name: str = "k") -> str:
        """A key unique to this view: the view's prefix followed by ``name``."""
        return self._unique(name)

    def expire_now(self, key: str) -> bool:
        """Run the backend's test hook: the record's lease or ttl runs out now."""
        return self._expirer.expire_now(key)

    def claim(
        self, key: str, token: str, *, lease: float, owner: str = "", fingerprint: str = ""
    ) -> Record:
        """``claim`` / ``aclaim``."""
        return cast(
            Record,
            self._call("claim", key, token, lease=lease, owner=owner, fingerprint=fingerprint),
        )

    def complete(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """``complete`` / ``acomplete``."""
        return cast(bool, self._call("complete", key, token, payload, ttl=ttl))

    def fail(self, key: str, token: str, payload: bytes, *, ttl: float) -> bool:
        """``fail`` / ``afail``."""
        return cast(bool, self._call("fail", key, token, payload, ttl=ttl))

    def renew(self, key: str, token: str, *, lease: float) -> bool:
        """``renew`` / ``arenew``."""
        return cast(bool, self._call("renew", key, token, lease=lease))

    def get(self, key: str) -> Record | None:
        """``get`` / ``aget``."""
        return cast("Record | None", self._call("get", key))

    def delete(self, key: str, *, token: str | None = None) -> bool:
        """``delete`` / ``adelete``."""
        return cast(bool, self._call("delete", key, token=token))

    def claim_concurrently(self, key: str, tokens: list[str], *, lease: float) -> list[Record]:
        """Race one claim per token on ``key`` at the same moment (threads released
        together by a barrier, or tasks gathered on the loop); the answers, in order."""
        return self._race("claim", [(key, token) for token in tokens], lease=lease)

    def close(self) -> None:
        """Delete the keys this view made (best effort), then close its event loop, if any."""
        for key in self._names:
            # Through the sync method even for AsyncView, whose loop may be failing; and a
            # failed cleanup must not mask the test's own outcome.
            with contextlib.suppress(Exception):
                self.backend.delete(key)
        self._names.clear()
        self._close_loop()


class SyncView(StoreView):
    """Exercises the backend's sync methods; concurrency is real threads."""

    mode: Mode = "sync"
    concurrency = 16


class AsyncView(StoreView):
    """Exercises the backend's ``a``-prefixed coroutines on an event loop this view owns.

    Concurrency is asyncio tasks on that loop. :meth:`close` closes the loop.
    """

    mode: Mode = "async"
    concurrency = 50
    loop: asyncio.AbstractEventLoop


def open_view(backend: Backend, mode: Mode, *, prefix: str | None = None) -> StoreView:
    """A :class:`SyncView` or :class:`AsyncView` of ``backend``; close it when done."""
    return (SyncView if _check_mode(mode) == "sync" else AsyncView)(backend, prefix=prefix)

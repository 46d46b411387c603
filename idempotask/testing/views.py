"""Synchronous views of a backend, so one test body checks both its sync and async methods.

:class:`SyncView` calls the sync methods; :class:`AsyncView` owns an event loop and drives
the ``a``-prefixed coroutines on it. Both expose the same synchronous interface, plus
``expire_now`` (the test-only hook), a unique key prefix and a concurrent-claim helper that
races threads (sync) or tasks (async).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import threading
import uuid
from collections.abc import Callable
from typing import Any, Literal, TypeVar, cast

from idempotask.backends.base import Backend, Record, SupportsExpireNow

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


def _require_expire_now(backend: Backend) -> SupportsExpireNow:
    if not isinstance(backend, SupportsExpireNow):
        raise TypeError(
            f"{type(backend).__qualname__} has no expire_now(key) method; the conformance "
            "suite needs it to move a record past its lease or ttl on the store's own clock "
            "(see idempotask.backends.base.SupportsExpireNow)"
        )
    return backend


class StoreView(abc.ABC):
    """The store protocol as plain synchronous calls, for tests.

    ``mode`` says which methods of ``backend`` are exercised. Keys made with :meth:`key`
    share a prefix unique to this view, so records left on a real server by earlier runs
    never interfere, and :meth:`close` deletes them.
    """

    mode: Mode
    #: How many concurrent callers :meth:`claim_concurrently` tests use by default.
    concurrency: int

    def __init__(self, backend: Backend, *, prefix: str | None = None) -> None:
        self.backend = backend
        self._expirer = _require_expire_now(backend)
        self.prefix = prefix if prefix is not None else f"idempotask-test:{uuid.uuid4().hex}:"
        self._keys: set[str] = set()

    def key(self, name: str = "k") -> str:
        """A key unique to this view: the view's prefix followed by ``name``."""
        key = self.prefix + name
        self._keys.add(key)
        return key

    def expire_now(self, key: str) -> bool:
        """Run the backend's test hook: the record's lease or ttl runs out now."""
        return self._expirer.expire_now(key)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.backend, method)(*args, **kwargs)

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

    @abc.abstractmethod
    def claim_concurrently(self, key: str, tokens: list[str], *, lease: float) -> list[Record]:
        """Race one claim per token on ``key`` at the same moment; the answers, in order."""

    def close(self) -> None:
        """Delete the keys this view made (best effort) and release its resources."""
        for key in self._keys:
            # Through the sync method even for AsyncView, whose loop may be failing; and a
            # failed cleanup must not mask the test's own outcome.
            with contextlib.suppress(Exception):
                self.backend.delete(key)
        self._keys.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backend!r})"


class SyncView(StoreView):
    """Exercises the backend's sync methods; concurrency is real threads."""

    mode: Mode = "sync"
    concurrency = 16

    def claim_concurrently(self, key: str, tokens: list[str], *, lease: float) -> list[Record]:
        """One thread per token, released together by a barrier."""
        claim = self.backend.claim
        return in_threads([functools.partial(claim, key, t, lease=lease) for t in tokens])


class AsyncView(StoreView):
    """Exercises the backend's ``a``-prefixed coroutines on an event loop this view owns.

    Concurrency is asyncio tasks on that loop. :meth:`close` closes the loop.
    """

    mode: Mode = "async"
    concurrency = 50

    def __init__(self, backend: Backend, *, prefix: str | None = None) -> None:
        super().__init__(backend, prefix=prefix)
        self.loop = asyncio.new_event_loop()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.loop.run_until_complete(getattr(self.backend, "a" + method)(*args, **kwargs))

    def claim_concurrently(self, key: str, tokens: list[str], *, lease: float) -> list[Record]:
        """One task per token, gathered on this view's loop."""

        async def race() -> list[Record]:
            return list(
                await asyncio.gather(*(self.backend.aclaim(key, t, lease=lease) for t in tokens))
            )

        return self.loop.run_until_complete(race())

    def close(self) -> None:
        """Delete this view's keys, then shut down and close the event loop."""
        super().close()
        if self.loop.is_closed():
            return
        try:
            # A backend that keeps per-loop connections releases them before the loop goes.
            aclose = getattr(self.backend, "aclose", None)
            if callable(aclose):
                with contextlib.suppress(Exception):
                    self.loop.run_until_complete(aclose())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()


def open_view(backend: Backend, mode: Mode, *, prefix: str | None = None) -> StoreView:
    """A :class:`SyncView` or :class:`AsyncView` of ``backend``; close it when done."""
    if mode == "sync":
        return SyncView(backend, prefix=prefix)
    if mode == "async":
        return AsyncView(backend, prefix=prefix)
    raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")

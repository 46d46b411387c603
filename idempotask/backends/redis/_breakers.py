"""Circuit breakers' shared state on Redis: :class:`RedisBreakerStore`."""

from __future__ import annotations

from typing import Any

from idempotask.backends.base import BreakerState, BreakerStatus
from idempotask.backends.redis._records import library_key, milliseconds, parse_flag
from idempotask.backends.redis._store import SCAN_CALLS, SCAN_COUNT, RedisBackend, scan_pattern
from idempotask.backends.redis._stores import OnBackend
from idempotask.errors import ConfigurationError, CorruptRecordError
from idempotask.flow import Flow, Op, adrive, drive

__all__ = ["BREAKER_FORMAT", "RedisBreakerStore", "parse_breaker"]

#: The ``fmt`` field of a circuit breaker's hash (breaker records are not idempotency
#: records; the marker keeps the two from being mistaken for each other).
BREAKER_FORMAT = "idempotask-breaker/1"
_FMT = BREAKER_FORMAT.encode()
_STATUSES = {status.value.encode(): status for status in BreakerStatus}
_RESET_ARGS = (b"", b"0", b"")  # delete.lua without a token: remove whatever is there


def _tag(reply: Any) -> bytes:
    if isinstance(reply, list) and reply:
        first = reply[0]
        return first if isinstance(first, bytes) else str(first).encode()
    return b""


def parse_breaker(key: str, reply: Any) -> BreakerState:
    """Turn a ``breaker_*`` script reply into a :class:`~idempotask.backends.base.BreakerState`.

    >>> state = parse_breaker("k", [b"brk", b"open", 5, 30000, 1, 0])
    >>> state.status.value, state.failures, state.retry_after, state.changed
    ('open', 5, 30.0, True)
    """
    if _tag(reply) == b"brk" and len(reply) == 6:
        _, status, failures, wait_ms, changed, probe = reply
        found = _STATUSES.get(status if isinstance(status, bytes) else str(status).encode())
        if found is not None:
            return BreakerState(
                found,
                failures=int(failures),
                retry_after=max(0, int(wait_ms)) / 1000,
                changed=int(changed) == 1,
                probe=int(probe) == 1,
            )
    what = reply[1] if _tag(reply) == b"corrupt" and len(reply) == 2 else repr(reply)[:80]
    if isinstance(what, bytes):
        what = what.decode(errors="replace")
    raise CorruptRecordError(
        f"redis breaker store: the value under {key!r} is not an idempotask breaker: found "
        f"{what}. Another program uses this key; use another namespace, or delete the key"
    )


class RedisBreakerStore(OnBackend):
    """Circuit breaker state on Redis: a :class:`~idempotask.backends.base.BreakerStore`.

    One hash per breaker, at ``namespace:{breaker:NAME}`` (one cluster slot per breaker),
    and one ``EVALSHA`` of a ``breaker_*.lua`` script per operation, run on a
    :class:`RedisBackend`'s clients (timeouts, retries, ``NOSCRIPT`` recovery). Every
    window, open period and probe lease is timed by the server's ``TIME``. A closed record
    expires when its window ends; an open one ``retain`` seconds (a day) after its open
    period, so an abandoned half-open breaker ends up closed. A resent command (redis-py
    retries a timed-out one) may count a failure twice; a resent probe request recognises
    its own grant by its token.

    Get one from the backend your idempotency store uses (``backend.breaker_store()``),
    or give a backend or a URL:

    >>> store = RedisBreakerStore("redis://localhost:6379/0", namespace="billing")
    >>> store.key("payments")
    'billing:breaker:payments'
    """

    def __init__(
        self,
        backend: RedisBackend | str,
        *,
        namespace: str | None = None,
        retain: float = 86400.0,
        prefix: str | None = None,
    ) -> None:
        self._attach(backend, namespace, prefix)
        self._retain_ms = milliseconds(retain, "retain")

    @classmethod
    def from_url(
        cls, url: str, *, namespace: str | None = None, prefix: str | None = None
    ) -> RedisBreakerStore:
        """A store on its own connections to ``url``.

        >>> RedisBreakerStore.from_url("redis://localhost:6379/0", namespace="billing")
        RedisBreakerStore('redis://localhost:6379/0', namespace='billing')
        """
        return cls(url, namespace=namespace, prefix=prefix)

    def key(self, name: str) -> str:
        """The store key of breaker ``name`` (its Redis key is ``record_key`` of it).

        >>> from idempotask.backends.redis import record_key
        >>> record_key(RedisBreakerStore("redis://localhost").key("payments"))
        'idempotask:{breaker:payments}'
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"RedisBreakerStore: a breaker name must be a non-empty str, got {name!r}"
            )
        return f"{self._namespace}:breaker:{name}"

    @staticmethod
    def _failure_args(threshold: int, window: float, open_for: float) -> tuple[Any, ...]:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ConfigurationError(
                f"redis breaker store: threshold must be an int >= 1, got {threshold!r}"
            )
        return (threshold, milliseconds(window, "window"), milliseconds(open_for, "open_for"))

    def _probe_args(self, token: str, lease: float) -> tuple[Any, ...]:
        return (milliseconds(lease, "lease"), token.encode(), self._retain_ms)

    # -------------------------------------------------------------- sync API

    def state(self, name: str) -> BreakerState:
        """The breaker's state; one round trip, no writes."""
        return self._connections.run(
            "breaker.state", "breaker_state", self.key(name), (_FMT,), parse_breaker
        )

    def record_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> BreakerState:
        """Count a failure (opening at ``threshold``); one round trip."""
        args = (_FMT, *self._failure_args(threshold, window, open_for), self._retain_ms)
        return self._connections.run(
            "breaker.record_failure", "breaker_failure", self.key(name), args, parse_breaker
        )

    def record_success(self, name: str) -> BreakerState:
        """Report a success (closing a half-open breaker); one round trip."""
        return self._connections.run(
            "breaker.record_success", "breaker_success", self.key(name), (_FMT,), parse_breaker
        )

    def try_probe(self, name: str, token: str, *, lease: float) -> BreakerState:
        """Take the half-open probe for ``lease`` seconds if it is free; one round trip."""
        args = (_FMT, *self._probe_args(token, lease))
        return self._connections.run(
            "breaker.try_probe", "breaker_probe", self.key(name), args, parse_breaker
        )

    def reset(self, name: str) -> None:
        """Remove the breaker's record (closed, no failures); one round trip."""
        self._connections.run("breaker.reset", "delete", self.key(name), _RESET_ARGS, parse_flag)

    def states(self, *, limit: int = 1000) -> dict[str, BreakerState]:
        """Every breaker with a record (up to ``limit``), by name: ``SCAN`` for their keys
        (bounded as :meth:`RedisBackend.scan` is), then one read per breaker. For operators,
        never on a call's path; a breaker without a record is closed."""
        return drive(self._states_flow(limit))

    # ------------------------------------------------------------- async API

    async def astate(self, name: str) -> BreakerState:
        """Async :meth:`state`."""
        return await self._connections.arun(
            "breaker.state", "breaker_state", self.key(name), (_FMT,), parse_breaker
        )

    async def arecord_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> BreakerState:
        """Async :meth:`record_failure`."""
        args = (_FMT, *self._failure_args(threshold, window, open_for), self._retain_ms)
        return await self._connections.arun(
            "breaker.record_failure", "breaker_failure", self.key(name), args, parse_breaker
        )

    async def arecord_success(self, name: str) -> BreakerState:
        """Async :meth:`record_success`."""
        return await self._connections.arun(
            "breaker.record_success", "breaker_success", self.key(name), (_FMT,), parse_breaker
        )

    async def atry_probe(self, name: str, token: str, *, lease: float) -> BreakerState:
        """Async :meth:`try_probe`."""
        args = (_FMT, *self._probe_args(token, lease))
        return await self._connections.arun(
            "breaker.try_probe", "breaker_probe", self.key(name), args, parse_breaker
        )

    async def areset(self, name: str) -> None:
        """Async :meth:`reset`."""
        await self._connections.arun(
            "breaker.reset", "delete", self.key(name), _RESET_ARGS, parse_flag
        )

    async def astates(self, *, limit: int = 1000) -> dict[str, BreakerState]:
        """Async :meth:`states`."""
        return await adrive(self._states_flow(limit))

    # ------------------------------------------------------------------ listing

    def _states_flow(self, limit: int) -> Flow[dict[str, BreakerState]]:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigurationError(f"RedisBreakerStore: limit must be an int >= 0, got {limit!r}")
        found: dict[str, BreakerState] = {}
        if limit == 0:
            return found
        head = self.key("x")[:-1]  # namespace:breaker:
        match = scan_pattern(head)
        c = self._connections
        targets = yield Op(c.scan_targets, c.ascan_targets)
        for target in targets:
            cursor = 0
            for _ in range(SCAN_CALLS):
                cursor, keys = yield Op(
                    c.scan_page, c.ascan_page, target, cursor, match, SCAN_COUNT
                )
                for redis_key in keys:
                    key = library_key(redis_key)
                    if key is None or not key.startswith(head) or len(key) == len(head):
                        continue
                    name = key[len(head) :]
                    if name in found:
                        continue
                    try:
                        found[name] = yield Op(
                            c.run,
                            c.arun,
                            "breaker.states",
                            "breaker_state",
                            key,
                            (_FMT,),
                            parse_breaker,
                        )
                    except CorruptRecordError:
                        continue  # not a breaker of ours: a listing leaves it out
                    if len(found) >= limit:
                        return found
                if cursor == 0:
                    break
        return found

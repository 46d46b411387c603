"""Circuit breakers' shared state on Redis: :class:`RedisBreakerStore`."""

from __future__ import annotations

from typing import Any

from idempotask.backends._letters import check_int
from idempotask.backends._twins import twins
from idempotask.backends.base import BreakerState, BreakerStatus
from idempotask.backends.redis._letters import as_bytes, reply_tag
from idempotask.backends.redis._records import library_key, milliseconds, parse_flag
from idempotask.backends.redis._store import RedisBackend, scan_keys, scan_pattern
from idempotask.backends.redis._stores import OnBackend
from idempotask.errors import ConfigurationError, CorruptRecordError
from idempotask.flow import Flow, Op

__all__ = ["BREAKER_FORMAT", "RedisBreakerStore", "parse_breaker"]

#: The ``fmt`` field of a circuit breaker's hash (breaker records are not idempotency
#: records; the marker keeps the two from being mistaken for each other).
BREAKER_FORMAT = "idempotask-breaker/1"
_FMT = BREAKER_FORMAT.encode()
_STATUSES = {status.value.encode(): status for status in BreakerStatus}
_RESET_ARGS = (b"", b"0", b"")  # delete.lua without a token: remove whatever is there


def parse_breaker(key: str, reply: Any) -> BreakerState:
    """Turn a ``breaker_*`` script reply into a :class:`~idempotask.backends.base.BreakerState`.

    >>> state = parse_breaker("k", [b"brk", b"open", 5, 30000, 1, 0])
    >>> state.status.value, state.failures, state.retry_after, state.changed
    ('open', 5, 30.0, True)
    """
    if reply_tag(reply) == b"brk" and len(reply) == 6:
        _, status, failures, wait_ms, changed, probe = reply
        found = _STATUSES.get(as_bytes(status))
        if found is not None:
            return BreakerState(
                found,
                failures=int(failures),
                retry_after=max(0, int(wait_ms)) / 1000,
                changed=int(changed) == 1,
                probe=int(probe) == 1,
            )
    what = reply[1] if reply_tag(reply) == b"corrupt" and len(reply) == 2 else repr(reply)[:80]
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

    def _script(
        self, what: str, script: str, name: str, args: tuple[Any, ...]
    ) -> Flow[BreakerState]:
        c = self._connections
        key = self.key(name)
        state: BreakerState = yield Op(
            c.run, c.arun, f"breaker.{what}", script, key, args, parse_breaker
        )
        return state

    def _state(self, name: str) -> Flow[BreakerState]:
        """The breaker's state; one round trip, no writes."""
        return (yield from self._script("state", "breaker_state", name, (_FMT,)))

    state, astate = twins(_state)

    def _record_failure(
        self, name: str, *, threshold: int, window: float, open_for: float
    ) -> Flow[BreakerState]:
        """Count a failure (opening at ``threshold``); one round trip."""
        check_int(threshold, "threshold", "redis breaker store", minimum=1)
        window_ms, open_ms = milliseconds(window, "window"), milliseconds(open_for, "open_for")
        args = (_FMT, threshold, window_ms, open_ms, self._retain_ms)
        return (yield from self._script("record_failure", "breaker_failure", name, args))

    record_failure, arecord_failure = twins(_record_failure)

    def _record_success(self, name: str) -> Flow[BreakerState]:
        """Report a success (closing a half-open breaker); one round trip."""
        return (yield from self._script("record_success", "breaker_success", name, (_FMT,)))

    record_success, arecord_success = twins(_record_success)

    def _try_probe(self, name: str, token: str, *, lease: float) -> Flow[BreakerState]:
        """Take the half-open probe for ``lease`` seconds if it is free; one round trip."""
        args = (_FMT, milliseconds(lease, "lease"), token.encode(), self._retain_ms)
        return (yield from self._script("try_probe", "breaker_probe", name, args))

    try_probe, atry_probe = twins(_try_probe)

    def _reset(self, name: str) -> Flow[None]:
        """Remove the breaker's record (closed, no failures); one round trip."""
        c = self._connections
        yield Op(c.run, c.arun, "breaker.reset", "delete", self.key(name), _RESET_ARGS, parse_flag)

    reset, areset = twins(_reset)

    # ------------------------------------------------------------------ listing

    def _states(self, *, limit: int = 1000) -> Flow[dict[str, BreakerState]]:
        """Every breaker with a record (up to ``limit``), by name: ``SCAN`` for their keys
        (bounded as :meth:`RedisBackend.scan` is), then one read per breaker. For operators,
        never on a call's path; a breaker without a record is closed."""
        check_int(limit, "limit", "RedisBreakerStore", minimum=0)
        found: dict[str, BreakerState] = {}
        head = self.key("x")[:-1]  # namespace:breaker:

        def visit(keys: list[Any]) -> Flow[bool]:
            for redis_key in keys:
                key = library_key(redis_key)
                if key is None or not key.startswith(head) or len(key) == len(head):
                    continue
                name = key[len(head) :]
                if name in found:
                    continue
                try:
                    found[name] = yield from self._script("states", "breaker_state", name, (_FMT,))
                except CorruptRecordError:
                    continue  # not a breaker of ours: a listing leaves it out
                if len(found) >= limit:
                    return True
            return False

        if limit > 0:
            yield from scan_keys(self._connections, scan_pattern(head), visit)
        return found

    states, astates = twins(_states)

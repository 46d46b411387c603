"""Count Redis round trips per call, so a reader can see *why* one row costs more than another.

Counting is a separate, untimed pass: it wraps redis-py's sync ``Connection`` while it runs,
which would add its own cost to a timed call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def _counting() -> Iterator[list[int]]:
    from redis.connection import Connection

    # Every command and every pipeline leaves through send_packed_command once: one
    # call of it is one round trip. Set on the class (not an instance) so that clients
    # built inside the library under test are counted too; removed afterwards.
    original = Connection.send_packed_command
    sent = [0]

    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        original(self, command, check_health)

    Connection.send_packed_command = send_packed_command  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        Connection.send_packed_command = original  # type: ignore[method-assign]


def per_call(fn: Callable[[int], Any], calls: int = 50) -> float:
    """Mean round trips of ``fn(i)`` for ``i`` in ``range(calls)`` (warm it up first)."""
    with _counting() as sent:
        for i in range(calls):
            fn(i)
    return sent[0] / calls


def label(trips: float) -> str:
    """``"1 round trip"``, ``"5 round trips"``, ``"2.5 round trips"``."""
    text = f"{trips:.0f}" if trips == int(trips) else f"{trips:.1f}"
    return f"{text} round trip" + ("" if text == "1" else "s")

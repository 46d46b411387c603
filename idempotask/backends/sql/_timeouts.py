"""Bounded waiting for SQL statements, from the drivers' own documented settings.

What ``statement_timeout`` bounds, and how, is told by
:class:`~idempotask.backends.sql.SQLAlchemyBackend` (the README's "Time bounds" says
why): :func:`connect_options` for the server and the drivers' own timeouts, and for
psycopg, whose libpq has no client-side timeout, a :class:`Watchdog` that shuts the
socket (psycopg's documented ``Connection.fileno()``) down, never closes it. The client's
bound is ``statement_timeout`` plus a grace of at most a second, so the server's cleaner
cancellation normally comes first. Nothing here imports a driver or SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

__all__ = [
    "LIBPQ",
    "Watch",
    "Watchdog",
    "bounded",
    "client_bound",
    "connect_options",
    "watchdog",
]

_T = TypeVar("_T")

#: libpq drivers: they take ``options``, keepalive and ``tcp_user_timeout`` parameters.
LIBPQ = frozenset({"psycopg", "psycopg_async", "psycopg2", "psycopg2cffi"})
#: MySQL drivers whose ``connect()`` runs an ``init_command`` on every new connection.
_INIT_COMMAND = frozenset({"pymysql", "mysqldb", "asyncmy", "aiomysql"})
#: MySQL drivers with documented ``read_timeout`` / ``write_timeout`` connect arguments.
_READ_TIMEOUT = frozenset({"pymysql", "mysqldb"})


def client_bound(statement_timeout: float) -> float:
    """The client's bound on one statement: the server's timeout plus a grace of at most
    a second, in which the server's own cancellation can still arrive.

    >>> client_bound(10.0), client_bound(0.2)
    (11.0, 0.4)
    """
    return statement_timeout + min(statement_timeout, 1.0)


# psycopg's ``pq.version()`` is public and documented ("psycopg.pq -- libpq wrapper
# module": the version of the libpq loaded), as is psycopg2's ``libpq_version()``; they
# are the only way to know whether libpq takes ``tcp_user_timeout`` (libpq 12+). The
# version matrix runs test_statement_timeout_becomes_connect_options_and_none_turns_it_off
# (tests/backends/test_sql.py) at the lowest and newest psycopg: it fails if this changes.
def _libpq_version(driver: str) -> int:
    """The libpq version the driver links (0 when unknown: assume an old one), from the
    documented ``version()`` of psycopg's libpq wrapper / psycopg2's ``libpq_version()``."""
    module, function = (
        ("psycopg.pq", "version")
        if driver.startswith("psycopg_") or driver == "psycopg"
        else ("psycopg2.extensions", "libpq_version")
    )
    try:
        return int(getattr(importlib.import_module(module), function)())
    except Exception:
        return 0


def connect_options(
    backend: str, driver: str, query: Mapping[str, Any], statement_timeout: float | None
) -> dict[str, Any]:
    """``connect_args`` that bound a statement on the server and the client, and detect
    dead peers. ``query`` is the URL's query (options the user set there win).

    >>> connect_options("postgresql", "psycopg", {}, 10.0)["options"]
    '-c statement_timeout=10000'
    >>> opts = connect_options("mysql", "pymysql", {}, 2.5)
    >>> opts["init_command"], opts["read_timeout"]
    ('SET /*M! SESSION max_statement_time=2.5, */ @idempotask_statement_timeout=2.5', 4)
    """
    if statement_timeout is None:
        return {}
    ms = max(1, math.ceil(statement_timeout * 1000))
    bound = client_bound(statement_timeout)
    args: dict[str, Any] = {}
    if backend == "postgresql" and driver in LIBPQ:
        options = str(query.get("options", ""))
        if "statement_timeout" not in options:
            args["options"] = f"{options} -c statement_timeout={ms}".strip()
        # Idle pooled connections to a vanished host are noticed within about 20 s
        # instead of the kernel's two hours; unacknowledged writes fail after the bound.
        idle = max(1, math.ceil(statement_timeout))
        for name, value in (
            ("keepalives", 1),
            ("keepalives_idle", idle),
            ("keepalives_interval", max(1, idle // 3)),
            ("keepalives_count", 3),
        ):
            if name not in query:
                args[name] = value
        if "tcp_user_timeout" not in query and _libpq_version(driver) >= 120000:
            args["tcp_user_timeout"] = math.ceil(bound * 1000)
    elif backend == "postgresql" and driver == "asyncpg":
        args["server_settings"] = {"statement_timeout": str(ms)}
        args["command_timeout"] = bound
    elif backend in ("mysql", "mariadb"):
        if driver in _INIT_COMMAND and "init_command" not in query:
            # MariaDB runs what is inside /*M! … */; MySQL (no max_statement_time) only
            # sets a user variable, so one command serves both behind a mysql:// URL.
            seconds = f"{statement_timeout:g}"
            args["init_command"] = (
                f"SET /*M! SESSION max_statement_time={seconds}, */ "
                f"@idempotask_statement_timeout={seconds}"
            )
        if driver in _READ_TIMEOUT:
            # Whole seconds: MySQLdb takes an int (PyMySQL a float).
            for name in ("read_timeout", "write_timeout"):
                if name not in query:
                    args[name] = math.ceil(bound)
    return args


if sys.version_info >= (3, 11):

    async def bounded(awaitable: Awaitable[_T], seconds: float) -> _T:
        """``await awaitable``, cancelled after ``seconds`` (then TimeoutError)."""
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10 has no asyncio.timeout

    async def bounded(awaitable: Awaitable[_T], seconds: float) -> _T:
        """``await awaitable``, cancelled after ``seconds`` (then TimeoutError)."""
        return await asyncio.wait_for(awaitable, seconds)


class Watch:
    """The watch over one statement: the socket, its deadline and whether it fired."""

    __slots__ = ("deadline", "fd", "fired")

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd = fd
        self.deadline = deadline
        self.fired = False


class Watchdog:
    """Shuts down the sockets of psycopg statements that outlived their bound.

    One daemon thread, started with it, sleeps until the earliest deadline among the
    statements in flight; a finished statement is forgotten at once. :meth:`start` and
    :meth:`stop` each take one short lock. A process uses its own (:func:`watchdog`):
    threads and held locks do not survive a fork.

    >>> dog = Watchdog()
    >>> a, b = socket.socketpair()
    >>> watch = dog.start(a.fileno(), 0.05)
    >>> a.recv(1)  # blocks until the watchdog shuts the socket down
    b''
    >>> dog.stop(watch)
    True
    >>> a.close(); b.close()
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._live: set[Watch] = set()
        self._wake_at = math.inf  # when the thread wakes next (inf: when notified)
        threading.Thread(target=self._run, name="idempotask-sql-watchdog", daemon=True).start()

    def start(self, fd: int, bound: float) -> Watch:
        """Watch socket ``fd`` for ``bound`` seconds from now."""
        watch = Watch(fd, time.monotonic() + bound)
        with self._lock:
            self._live.add(watch)
            if watch.deadline < self._wake_at:
                self._cond.notify()
        return watch

    def stop(self, watch: Watch) -> bool:
        """Stop watching; True if the bound passed and the socket was shut down. Once
        this returns the socket is never touched again."""
        with self._lock:
            self._live.discard(watch)
            return watch.fired

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                earliest = math.inf
                for watch in list(self._live):
                    if watch.deadline <= now:
                        self._live.discard(watch)
                        watch.fired = True
                        _shut_down(watch.fd)
                    elif watch.deadline < earliest:
                        earliest = watch.deadline
                self._wake_at = earliest
                self._cond.wait(None if earliest == math.inf else earliest - now)


def _shut_down(fd: int) -> None:
    """Wake whoever waits on ``fd`` with an end of stream, leaving the descriptor open."""
    with contextlib.suppress(OSError, ValueError):
        sock = socket.socket(fileno=fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()  # the descriptor stays the driver's: it closes it


_watchdogs: dict[int, Watchdog] = {}


def watchdog() -> Watchdog:
    """This process's watchdog, made on first use (a forked child makes its own)."""
    pid = os.getpid()
    dog = _watchdogs.get(pid)
    if dog is None:
        with _made:
            dog = _watchdogs.get(pid)
            if dog is None:
                dog = _watchdogs[pid] = Watchdog()
    return dog


_made = threading.Lock()

"""Bounded waiting for SQL statements: server-side timeouts, TCP keepalives and a watchdog.

A database that stops answering must not hang its callers. Three layers, set up by
:func:`connect_options` for the engines the stores create and by :class:`Watchdog` for
every connection (yours too):

1. **Server side**: PostgreSQL's ``statement_timeout`` (libpq ``options=-c
   statement_timeout=…``; asyncpg ``server_settings``) and MariaDB's
   ``max_statement_time`` (an ``init_command`` that MySQL, which lacks the variable,
   reads as a comment). A statement that runs too long, say waiting for a lock, is
   cancelled by the server with a clean error; the connection stays usable.
2. **TCP** (libpq): keepalives on idle connections and ``tcp_user_timeout``, so a peer
   that vanished (no RST, unacknowledged data) is noticed by the kernel.
3. **Client side**: a peer that acknowledges packets but never answers (a hung server, a
   proxy or load balancer that lost its upstream) defeats both. :class:`Watchdog` gives
   each statement a deadline of ``statement_timeout`` plus a grace of at most one
   second (so the server's own, cleaner cancellation normally comes first); past it, one
   daemon thread shuts the connection's socket down (``shutdown()``, never ``close()``:
   the descriptor stays the driver's, so it cannot be reused under it). The blocked
   driver call, sync or asyncio, returns at once with a connection error, and the
   executor turns it into ``TimeoutError`` and discards the connection. A sync psycopg
   statement on the libpq path waits on its socket itself, with the same deadline as
   a poll timeout, and needs no watchdog (see ``_libpq``).

Nothing here imports a driver or SQLAlchemy.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "Watch",
    "Watchdog",
    "client_bound",
    "connect_options",
    "socket_of",
    "watchdog",
]

#: libpq drivers: they take ``options``, keepalive and ``tcp_user_timeout`` parameters.
_LIBPQ = frozenset({"psycopg", "psycopg_async", "psycopg2", "psycopg2cffi"})
#: MySQL drivers whose ``connect()`` runs an ``init_command`` on every new connection.
_INIT_COMMAND = frozenset({"pymysql", "mysqldb", "asyncmy", "aiomysql"})


def client_bound(statement_timeout: float) -> float:
    """The watchdog's deadline for one statement: the server's timeout plus a grace of
    at most a second, in which the server's own cancellation can still arrive.

    >>> client_bound(10.0), client_bound(0.2)
    (11.0, 0.4)
    """
    return statement_timeout + min(statement_timeout, 1.0)


def _libpq_version(driver: str) -> int:
    """The libpq version the driver links (0 when unknown: assume an old one)."""
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
    """``connect_args`` that bound a statement on the server and detect dead peers.

    ``query`` is the URL's query (options the user set there are kept, and win).

    >>> connect_options("postgresql", "psycopg", {}, 10.0)["options"]
    '-c statement_timeout=10000'
    >>> connect_options("mysql", "pymysql", {}, 2.5)["init_command"]
    'SET /*M! SESSION max_statement_time=2.5, */ @idempotask_statement_timeout=2.5'
    """
    if statement_timeout is None:
        return {}
    ms = max(1, math.ceil(statement_timeout * 1000))
    args: dict[str, Any] = {}
    if backend == "postgresql" and driver in _LIBPQ:
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
            args["tcp_user_timeout"] = math.ceil(client_bound(statement_timeout) * 1000)
    elif backend == "postgresql" and driver == "asyncpg":
        args["server_settings"] = {"statement_timeout": str(ms)}
        args["command_timeout"] = client_bound(statement_timeout)
    elif (
        backend in ("mysql", "mariadb") and driver in _INIT_COMMAND and "init_command" not in query
    ):
        # MariaDB runs what is inside /*M! … */; MySQL (no max_statement_time) only sets a
        # user variable, so one command serves both behind a mysql:// URL.
        seconds = f"{statement_timeout:g}"
        args["init_command"] = (
            f"SET /*M! SESSION max_statement_time={seconds}, */ "
            f"@idempotask_statement_timeout={seconds}"
        )
    return args


def socket_of(driver_connection: Any) -> int | None:
    """The socket descriptor of a driver's connection, or None (SQLite, unknown drivers).

    psycopg (sync and async) through libpq's ``PQsocket``; psycopg2 and MySQLdb through
    ``fileno()``; PyMySQL's socket; asyncmy's and aiomysql's asyncio transport.

    >>> import socket
    >>> a, b = socket.socketpair()
    >>> class PyMySQLLike:
    ...     _sock = a
    >>> socket_of(PyMySQLLike()) == a.fileno(), socket_of(object())
    (True, None)
    >>> a.close(); b.close()
    """
    try:
        pgconn = getattr(driver_connection, "pgconn", None)
        if pgconn is not None:
            return int(pgconn.socket)
        sock = getattr(driver_connection, "_sock", None)
        if sock is not None:
            return int(sock.fileno())
        # aiomysql keeps a StreamWriter, asyncmy the transport: both know the socket.
        for name in ("_writer", "_transport"):
            holder = getattr(driver_connection, name, None)
            if holder is not None:
                transport_socket = holder.get_extra_info("socket")
                return None if transport_socket is None else int(transport_socket.fileno())
        fileno = getattr(driver_connection, "fileno", None)
        if callable(fileno) and not hasattr(driver_connection, "execute_fetchall"):
            return int(fileno())
    except Exception:  # closed, or not what we thought: no client-side bound for it
        return None
    return None


class Watch:
    """The watch over one connection's socket, reused for each of its statements: the
    socket, the running statement's deadline and whether it fired."""

    __slots__ = ("deadline", "fd", "fired")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.deadline = math.inf
        self.fired = False


class Watchdog:
    """Shuts down the sockets of statements that outlived their deadline.

    One daemon thread, started on first use, sleeps until the earliest deadline among the
    statements in flight; only those are kept (a finished statement is forgotten at
    once), so each wake-up scans as many entries as there are connections in use, and a
    busy process wakes the thread about once per bound. :meth:`start` and :meth:`stop`
    each take one short lock: a statement costs about a microsecond more.

    >>> dog = Watchdog()
    >>> a, b = socket.socketpair()
    >>> watch = Watch(a.fileno())
    >>> dog.start(watch, 0.05)
    >>> a.recv(1)  # blocks until the watchdog shuts the socket down
    b''
    >>> dog.stop(watch)
    True
    >>> a.close(); b.close()
    """

    def __init__(self) -> None:
        # Taken directly (a C-level ``with``), the condition only to wait and notify.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._live: dict[int, Watch] = {}  # id(watch) -> watch, for statements in flight
        # When the thread wakes next (inf: it sleeps until notified).
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    def start(self, watch: Watch, bound: float) -> None:
        """Watch ``watch``'s socket for ``bound`` seconds from now."""
        deadline = watch.deadline = time.monotonic() + bound
        watch.fired = False
        with self._lock:
            self._live[id(watch)] = watch
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="idempotask-sql-watchdog", daemon=True
                )
                self._thread.start()
            elif deadline < self._wake_at:
                self._cond.notify()

    def stop(self, watch: Watch) -> bool:
        """Stop watching; True if the deadline passed and the socket was shut down.

        Once this returns, the watchdog never touches the socket again: the connection
        may go back to its pool.
        """
        with self._lock:
            self._live.pop(id(watch), None)
            return watch.fired

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                earliest = math.inf
                for key, watch in list(self._live.items()):
                    if watch.deadline <= now:
                        del self._live[key]
                        watch.fired = True
                        _shut_down(watch.fd)
                    elif watch.deadline < earliest:
                        earliest = watch.deadline
                # A deadline already released still wakes the thread once, harmlessly:
                # cheaper than a notify on every stop().
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


_watchdog: Watchdog | None = None
_watchdog_lock = threading.Lock()


def watchdog() -> Watchdog:
    """The process's watchdog (a forked child makes its own: threads do not survive fork)."""
    global _watchdog
    dog = _watchdog
    if dog is None:
        with _watchdog_lock:
            if _watchdog is None:
                _watchdog = Watchdog()
            dog = _watchdog
    return dog


def _after_fork_in_child() -> None:
    global _watchdog, _watchdog_lock
    _watchdog = None
    _watchdog_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

"""A TCP proxy on a loopback port that delays every packet, or swallows them all.

It runs an asyncio loop in a daemon thread. Each direction of each connection has a
reader that stamps every chunk it receives with ``now + delay`` and a writer that
forwards the chunks in order once they are due, so a round trip costs about twice the
delay. ``blackhole = True`` makes the proxy accept connections but never forward a byte
(chunks in flight and new ones are dropped; new connections get no upstream at all), the
way a hung server or a dropped route looks to a client: only its own timeouts save it.

>>> proxy = DelayProxy("127.0.0.1", 6379).start()  # doctest: +SKIP
>>> proxy.delay = 0.05  # doctest: +SKIP
>>> proxy.stop()  # doctest: +SKIP

Only 127.0.0.1 is ever listened on or connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

__all__ = ["DelayProxy"]

_CHUNK = 65536


class DelayProxy:
    """A delaying, blackholing TCP proxy from a free loopback port to ``host:port``."""

    def __init__(self, host: str, port: int, *, delay: float = 0.0) -> None:
        if host != "127.0.0.1":
            raise ValueError("the fault proxy only forwards to 127.0.0.1")
        self.target = (host, port)
        self.delay = delay  # seconds added to every chunk, in each direction
        self.blackhole = False
        self.port = 0
        self.connections = 0  # accepted so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """A ``redis://`` URL through the proxy (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> DelayProxy:
        """Listen on a free loopback port; returns once connections are accepted."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, "127.0.0.1", 0)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy did not start within 10 s")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and join its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside the loop ---------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def _track(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            if self.blackhole:
                await self._swallow(reader)
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), 5
                )
            except (OSError, asyncio.TimeoutError):
                return
            self._writers.add(up_writer)
            try:
                await asyncio.gather(
                    self._track(self._pipe(reader, up_writer)),
                    self._track(self._pipe(up_reader, writer)),
                    return_exceptions=True,
                )
            finally:
                up_writer.close()
                self._writers.discard(up_writer)
        finally:
            writer.close()
            self._writers.discard(writer)

    @staticmethod
    async def _swallow(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(_CHUNK):
                pass

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Forward ``src`` to ``dst``, each chunk ``delay`` seconds after it arrived."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await src.read(_CHUNK):
                    if not self.blackhole:
                        chunks.put_nowait((loop.time() + self.delay, data))
            except OSError:
                pass
            finally:
                chunks.put_nowait(None)

        reader = self._track(read())
        try:
            while (item := await chunks.get()) is not None:
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.blackhole:
                    continue
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            reader.cancel()
            dst.close()

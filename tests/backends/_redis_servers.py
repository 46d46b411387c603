"""Start and stop private ``redis-server`` processes for the Redis backend tests.

The shared server at ``IDEMPOTASK_REDIS_URL`` serves most tests; these helpers start
servers the tests may configure (eviction policy, no CONFIG), kill (outage) or join into
a cluster, on loopback ports picked at random and checked free. Every process is started
in the foreground with ``subprocess.Popen`` so it is stopped by its own pid.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

__all__ = ["RedisCluster3", "RedisServer", "free_port", "have_redis_binaries"]

# Cluster bus ports are the client port + 10000, so client ports stay below 55535.
_PORT_RANGE = (21000, 45000)


def have_redis_binaries() -> bool:
    """True when ``redis-server`` and ``redis-cli`` are on PATH."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False) -> int:
    """A loopback port nobody listens on (and its cluster bus port, when asked)."""
    for _ in range(200):
        port = random.randint(*_PORT_RANGE)
        if _port_is_free(port) and (not with_bus or _port_is_free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found")


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """One private ``redis-server`` on 127.0.0.1, started in the foreground.

    >>> server = RedisServer.start("--maxmemory-policy", "allkeys-lru")  # doctest: +SKIP
    >>> server.url  # doctest: +SKIP
    'redis://127.0.0.1:31337/0'
    >>> server.stop()  # doctest: +SKIP
    """

    def __init__(self, port: int, directory: Path, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.directory = directory
        self.process = process
        self.url = f"redis://127.0.0.1:{port}/0"

    @classmethod
    def start(
        cls, *extra: str, port: int | None = None, directory: Path | None = None
    ) -> RedisServer:
        """Start a server with ``extra`` arguments and wait until it answers PING."""
        port = port or free_port()
        own_dir = directory is None
        directory = directory or Path(tempfile.mkdtemp(prefix=f"idempotask-redis-{port}-"))
        log = open(directory / "redis.log", "ab")  # noqa: SIM115 - lives as long as the server
        args = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            *extra,
        ]
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        server = cls(port, directory, process)
        server._own_dir = own_dir
        try:
            _wait_until(server.ping, 10, f"redis-server on port {port}")
        except BaseException:
            server.stop()
            raise
        return server

    _own_dir = False

    def ping(self) -> bool:
        """True when the server answers PING."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"redis-server on port {self.port} exited: "
                + (self.directory / "redis.log").read_text(errors="replace")[-2000:]
            )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server (an outage) and reap it; its directory stays."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Stop the server and remove the directory it was given by :meth:`start`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)


class RedisCluster3:
    """Three cluster-enabled masters on loopback ports, joined with ``redis-cli --cluster``."""

    def __init__(self, servers: list[RedisServer], directory: Path) -> None:
        self.servers = servers
        self.directory = directory
        self.ports = [server.port for server in servers]

    @classmethod
    def start(cls) -> RedisCluster3:
        """Start three masters, create the cluster and wait until every node says ok."""
        directory = Path(tempfile.mkdtemp(prefix="idempotask-cluster-"))
        servers: list[RedisServer] = []
        cluster = cls(servers, directory)
        try:
            for _ in range(3):
                port = free_port(with_bus=True)
                node_dir = directory / str(port)
                node_dir.mkdir()
                servers.append(
                    RedisServer.start(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout",
                        "5000",
                        port=port,
                        directory=node_dir,
                    )
                )
            cluster.ports = [server.port for server in servers]
            subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{port}" for port in cluster.ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            _wait_until(cluster._all_ok, 30, "cluster_state:ok on every node")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _all_ok(self) -> bool:
        for port in self.ports:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            try:
                info = client.cluster("INFO")
            except redis.RedisError:
                return False
            finally:
                client.close()
            # redis-py parses CLUSTER INFO into a dict; older versions return the raw text.
            if isinstance(info, dict):
                state = info.get("cluster_state")
            else:
                text = info.decode() if isinstance(info, bytes) else str(info)
                state = "ok" if "cluster_state:ok" in text else text
            if state not in ("ok", b"ok"):
                return False
        return True

    def stop(self) -> None:
        """Stop every node and remove the cluster's directory."""
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

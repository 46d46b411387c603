"""Real servers for the HTTP tests, each in a process of its own.

``fastapi``: uvicorn serving the FastAPI app; ``flask``: waitress serving the Flask
app; ``django``: Django's ``runserver`` (WSGI, the middleware's sync path);
``django-asgi``: uvicorn serving Django's ASGI application (its async path).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("fastapi", "flask", "django", "django-asgi")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(kind: str, port: int) -> list[str]:
    uvicorn = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port)]
    uvicorn += ["--log-level", "warning"]
    if kind == "fastapi":
        return [*uvicorn, "tests.http._apps:fastapi_app"]
    if kind == "django-asgi":
        return [*uvicorn, "tests.http._django_asgi:application"]
    if kind == "flask":
        return [
            *(sys.executable, "-m", "waitress", "--host", "127.0.0.1", "--port", str(port)),
            *("--threads", "32", "tests.http._apps:flask_app"),
        ]
    if kind == "django":
        return [sys.executable, "-m", "django", "runserver", f"127.0.0.1:{port}", "--noreload"]
    raise ValueError(kind)


class Server:
    """One server process; ``url`` is where it listens."""

    def __init__(self, kind: str, env: dict[str, str], log: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._env = {
            **os.environ,
            **env,
            "PYTHONPATH": str(ROOT),
            "DJANGO_SETTINGS_MODULE": "tests.http._django_settings",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Server:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                _command(self.kind, self.port),
                cwd=ROOT,
                env=self._env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.kind} server did not listen in {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the process dies mid-request, leaving its claims behind."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

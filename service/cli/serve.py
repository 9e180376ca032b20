"""``clusca serve``: a private Redis (unless REDIS_URL is set), worker processes and the API, as one.

Start: the API's port is bound before anything else starts, so a port that is taken is
one line on stderr and a non-zero exit within a moment, not after Redis and the models
have loaded.

Stop (SIGINT or SIGTERM to this process, or every worker gone), in order: the API stops
taking connections, the workers hand their running jobs back to the queue and exit, the
API finishes what it holds, then the private Redis stops; within :data:`STOP_BUDGET_S`.
The children run in process groups of their own, so a Ctrl-C in the terminal reaches
this process alone and the order holds; on Linux they are also sent SIGTERM if this
process dies without stopping them.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

log = logging.getLogger("clusca")

# Seconds the API has to finish the requests it holds once it stopped taking connections.
API_GRACE_S = 3.0
# Seconds a worker has to hand its running jobs back and exit; then it is killed.
WORKER_GRACE_S = 7.0
# The whole stop, signal to exit (the Redis stop and Python's own exit come on top of the two above).
STOP_BUDGET_S = 10.0
_PR_SET_PDEATHSIG = 1


def bind_listener(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound now; a port that cannot be bound exits with one line."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise SystemExit(f"clusca serve: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = " (another process holds it; choose another with --port or CLUSCA_PORT)" \
            if exc.errno == 98 or "in use" in str(exc) else ""
        raise SystemExit(f"clusca serve: cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


def child_preexec() -> Callable[[], None]:
    """What a child runs before its program: a process group of its own (a terminal's Ctrl-C
    reaches ``serve`` alone) and, on Linux, SIGTERM when ``serve`` dies."""
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None
    parent = os.getpid()

    def preexec() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent:  # serve died before the tie was made
                os._exit(1)

    return preexec


class _Api:
    """uvicorn's server, telling ``on_closed`` the moment it stops taking connections."""

    def __init__(self, config: Any, on_closed: Callable[[str, float], None]):
        import uvicorn

        on_closed_once = _once(on_closed)

        class Server(uvicorn.Server):
            stop_reason, stop_at = "stop", 0.0

            def handle_exit(self, sig: int, frame: Any) -> None:
                if not self.should_exit:
                    self.stop_reason, self.stop_at = signal.Signals(sig).name, time.monotonic()
                super().handle_exit(sig, frame)

            async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
                for server in self.servers:
                    server.close()
                on_closed_once(self.stop_reason, self.stop_at or time.monotonic())
                await super().shutdown(sockets)

        self.server = Server(config)

    def run(self, sock: socket.socket) -> None:
        self.server.run(sockets=[sock])


def _once(fn: Callable[..., None]) -> Callable[..., None]:
    lock, done = threading.Lock(), []

    def call(*args: Any) -> None:
        with lock:
            if done:
                return
            done.append(True)
        fn(*args)

    return call


class Children:
    """The private Redis and the worker processes, stopped in order: workers, then Redis."""

    def __init__(self) -> None:
        self.redis: Any = None
        self.workers: list[subprocess.Popen] = []
        self.signalled_at: float | None = None
        self._lock = threading.Lock()

    def start_redis(self) -> str:
        from service.broker.embedded import EmbeddedRedis

        self.redis = EmbeddedRedis().start(preexec_fn=child_preexec())
        return self.redis.url

    def start_workers(self, n: int, env: dict[str, str]) -> None:
        for _ in range(n):
            self.workers.append(subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=env,
                                                 preexec_fn=child_preexec()))

    def signal_workers(self) -> None:
        """Ask every worker to stop (SIGTERM: it hands its running jobs back, then exits)."""
        with self._lock:
            if self.signalled_at is not None:
                return
            self.signalled_at = time.monotonic()
        running = [w for w in self.workers if w.poll() is None]
        if running:
            log.info("stopping %d worker(s): their running jobs go back to the queue", len(running))
        for w in running:
            try:
                w.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.signal_workers()
        deadline = (self.signalled_at or time.monotonic()) + WORKER_GRACE_S
        for w in self.workers:
            try:
                w.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
                log.error("worker pid %d did not stop within %.0f s and was killed; its running jobs run again "
                          "after the visibility timeout", w.pid, WORKER_GRACE_S)
        if self.workers:
            log.info("workers stopped")
        if self.redis is not None:
            self.redis.stop()
            log.info("private Redis stopped")


def serve(args: argparse.Namespace) -> None:
    from service.cli.main import _check_registry, _settings, connection_limits

    stop_asked: list[str] = []
    t_stop: list[float] = []

    def on_signal(signum: int, _frame: Any) -> None:
        # Outside uvicorn's run (before it started, or after it returned): note it, the code below stops.
        if not stop_asked:
            stop_asked.append(signal.Signals(signum).name)
            t_stop.append(time.monotonic())

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    s = _settings()
    host, port = args.host or s.host, args.port if args.port is not None else s.port
    sock = bind_listener(host, port)
    _check_registry(s)
    children = Children()
    env = dict(os.environ)
    failed: list[int] = []
    try:
        if not s.redis_url and not stop_asked:
            env["REDIS_URL"] = children.start_redis()
            log.info("started a private Redis at %s", env["REDIS_URL"])
        if not env.get("PROMETHEUS_MULTIPROC_DIR"):
            env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="clusca-metrics-")
        # The API aggregates every local process's metrics, so the worker needs no port of its own here.
        if not stop_asked:
            children.start_workers(args.workers, {**env, "CLUSCA_WORKER_METRICS_PORT": "0"})
        threading.Thread(target=_watch_workers, args=(children.workers, failed), daemon=True).start()
        os.environ.update({k: env[k] for k in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")})
        from service.settings import get_settings

        get_settings.cache_clear()
        if not stop_asked:
            import uvicorn

            def api_closed(reason: str, at: float) -> None:
                t_stop.insert(0, at)
                log.info("stopping (%s): the API takes no new connections", reason)
                children.signal_workers()

            config = uvicorn.Config("service.api:create_app", factory=True, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=API_GRACE_S, **connection_limits(s))
            log.info("ClusCa Serve: send requests to http://%s:%d/generate (docs: http://%s:%d/docs); "
                     "GET /readyz turns 200 once the worker has loaded its models", host, port, host, port)
            _Api(config, api_closed).run(sock)
            log.info("API stopped")
    finally:
        sock.close()
        if stop_asked and not children.signalled_at:
            log.info("stopping (%s)", stop_asked[0])
        children.stop()
        if t_stop:
            log.info("stopped in %.1f s", time.monotonic() - t_stop[0])
    if failed:
        raise SystemExit(1)


def _watch_workers(workers: list[subprocess.Popen], failed: list[int]) -> None:
    """Stop the whole service when every worker has died: an API without workers only queues."""
    while any(w.poll() is None for w in workers):
        time.sleep(0.5)
    codes = [w.returncode for w in workers]
    if workers and any(c not in (0, -signal.SIGTERM) for c in codes):
        failed.extend(codes)
        log.error("worker process(es) exited with %s; stopping (see the worker's error above)", codes)
        os.kill(os.getpid(), signal.SIGTERM)

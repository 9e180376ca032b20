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
import errno
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
            if exc.errno == errno.EADDRINUSE else ""
        raise SystemExit(f"clusca serve: cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


def child_preexec() -> Callable[[], None]:
    """What a child runs before its program: a process group of its own (a terminal's Ctrl-C
    reaches ``serve`` alone) and, on Linux, SIGTERM when ``serve`` dies."""
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):  # no C library to ask: the process group still helps
            pass
    parent = os.getpid()

    def preexec() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent:  # serve died before the tie was made
                os._exit(1)

    return preexec


class StopClock:
    """Why and since when the service is stopping (the first signal counts)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.since = 0.0

    def asked(self, signum: int) -> None:
        if self.reason is None:
            self.reason, self.since = signal.Signals(signum).name, time.monotonic()


def api_server(config: Any, clock: StopClock, on_closed: Callable[[], None]) -> Any:
    """uvicorn's server, calling ``on_closed`` (once) the moment it stops taking connections."""
    import uvicorn

    class Server(uvicorn.Server):
        _closed = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn's own signal handler while it runs; ours (``clock.asked``) before and after.
            clock.asked(sig)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            for server in self.servers:
                server.close()
            if not self._closed:
                self._closed = True
                on_closed()
            await super().shutdown(sockets)

    return Server(config)


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

    def start_workers(self, n: int, env: dict[str, str], groups: list[str] | None = None,
                      others: list[str] | None = None) -> None:
        """``n`` workers for the models not in ``groups`` (all of them without groups), and one worker
        per model of ``groups``: a model that runs as a parallel group has a worker of its own."""
        groups = groups or []
        for name in groups:
            self.workers.append(subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--models", name],
                                                 env=env, preexec_fn=child_preexec()))
        if groups and not others:
            return
        only = ["--models", ",".join(others)] if groups else []
        for i in range(n):
            self.workers.append(subprocess.Popen([sys.executable, "-m", "service.cli", "worker", *only],
                                                 env=lane_env(env, i, n), preexec_fn=child_preexec()))

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


def lane_env(env: dict[str, str], index: int, workers: int) -> dict[str, str]:
    """The environment of worker ``index`` of ``workers``: with two or more, the last one reads only
    the short lanes, so long jobs can never occupy every worker (service/broker/lanes.py)."""
    if workers >= 2 and index == workers - 1:
        return {**env, "CLUSCA_WORKER_LANES": "short"}
    return env


def parallel_split(settings: Any) -> tuple[list[str], list[str]]:
    """The registry's models that run as parallel groups, and the others."""
    from service.registry import Registry

    reg = Registry.load(settings.models_file)
    groups = [e.name for e in reg.entries() if e.parallel.world > 1]
    return groups, [n for n in reg.names if n not in groups]


def serve(args: argparse.Namespace) -> None:
    from service.cli.main import _check_registry, _settings, connection_limits

    # Before anything starts: a signal from here on is a stop, carried out in order below.
    clock = StopClock()
    signal.signal(signal.SIGINT, lambda signum, _frame: clock.asked(signum))
    signal.signal(signal.SIGTERM, lambda signum, _frame: clock.asked(signum))
    s = _settings()
    host, port = args.host or s.host, args.port if args.port is not None else s.port
    sock = bind_listener(host, port)
    _check_registry(s)
    children = Children()
    env = dict(os.environ)
    failed: list[int] = []
    try:
        if not s.redis_url and clock.reason is None:
            env["REDIS_URL"] = children.start_redis()
            log.info("started a private Redis at %s", env["REDIS_URL"])
        if not env.get("PROMETHEUS_MULTIPROC_DIR"):
            env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="clusca-metrics-")
        if clock.reason is None:
            # The API aggregates every local process's metrics, so the worker needs no port of its own here.
            groups, others = parallel_split(s)
            if groups:
                log.info("model(s) %s run as parallel groups, one worker each", ", ".join(groups))
            children.start_workers(args.workers, {**env, "CLUSCA_WORKER_METRICS_PORT": "0"}, groups, others)
            threading.Thread(target=_watch_workers, args=(children.workers, failed), daemon=True).start()
        os.environ.update({k: env[k] for k in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR") if k in env})
        from service.settings import get_settings

        get_settings.cache_clear()
        if clock.reason is None:
            import uvicorn

            def api_closed() -> None:
                log.info("stopping (%s): the API takes no new connections", clock.reason or "stop")
                children.signal_workers()

            config = uvicorn.Config("service.api:create_app", factory=True, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=API_GRACE_S, **connection_limits(s))
            log.info("ClusCa Serve: send requests to http://%s:%d/generate (docs: http://%s:%d/docs); "
                     "GET /readyz turns 200 once the worker has loaded its models", host, port, host, port)
            api_server(config, clock, api_closed).run(sockets=[sock])
            log.info("API stopped")
    finally:
        sock.close()
        if children.signalled_at is None:
            log.info("stopping (%s)", clock.reason or "error")
        children.stop()
        if clock.reason is not None:
            log.info("stopped in %.1f s", time.monotonic() - clock.since)
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

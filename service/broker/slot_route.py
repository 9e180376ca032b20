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
from redis.exceptions import AskError, NoScriptError, TryAgainError

from service.broker.connect import UNAVAILABLE, is_cluster

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


# A script call whose node could not be reached: it runs again through the cluster client.
_AGAIN = object()


def run_scripts(r: Any, cluster: bool, script: Any, calls: list[dict]) -> list[Any]:
    """Run ``script`` once per call (``keys``, ``args``) in as few round trips as the Redis (a single
    server, or a ``cluster``) allows."""
    if not cluster:
        pipe = r.pipeline(transaction=False)
        for call in calls:
            script(**call, client=pipe)
        return pipe.execute()
    # A cluster pipeline refuses scripts: one plain pipeline per primary instead, straight to
    # the node. A slot that moved (MOVED) ran nothing there and runs again through the cluster
    # client, which follows it; so does everything when a node is unreachable, which is
    # how the cluster client learns of a failover.
    replies: list[Any] = [None] * len(calls)
    by_node: dict[str, tuple[Any, list[int]]] = {}
    for i, call in enumerate(calls):
        node = r.get_node_from_key(call["keys"][0])
        by_node.setdefault(node.name, (node, []))[1].append(i)
    try:
        for node, idxs in by_node.values():
            pipe = node.redis_connection.pipeline(transaction=False)
            for i in idxs:
                script(**calls[i], client=pipe)
            for i, reply in zip(idxs, pipe.execute(raise_on_error=False)):
                replies[i] = reply
    except UNAVAILABLE:
        replies = [_AGAIN if x is None else x for x in replies]
    for i, reply in enumerate(replies):
        if reply is _AGAIN or isinstance(reply, (AskError, NoScriptError, TryAgainError)):
            replies[i] = script(**calls[i])
        elif isinstance(reply, Exception):
            raise reply
    return replies

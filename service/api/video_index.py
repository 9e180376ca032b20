"""The videos each caller made through ``POST /v1/videos``, for ``GET /v1/videos``.

One sorted set per caller (the bearer key's identity, or ``anonymous``): video job id ->
creation time. It only points at jobs; a job that expired or was deleted is dropped from it
when a listing meets it, and the set itself expires with the newest job it names. A page
starts after a given id by that id's rank at the time of the call, so videos created or
dropped meanwhile neither repeat nor skip an entry.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, TypeVar

from service.broker.keys import video_index_key

T = TypeVar("T")


class UnknownCursor(LookupError):
    """``after`` names a video this caller's list does not hold (any more)."""


class VideoIndex:
    def __init__(self, redis: Any, ttl_s: int):
        self.r = redis
        # Twice the results' lifetime: a job lives ttl_s past its end, which comes after its creation.
        self.keep_s = 2 * ttl_s

    async def add(self, caller: str, job_id: str, created: float) -> None:
        key = video_index_key(caller)
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(key, {job_id: created})
        pipe.zremrangebyscore(key, "-inf", created - self.keep_s)
        pipe.expire(key, self.keep_s)
        await pipe.execute()

    async def page(self, caller: str, load: Callable[[str], Awaitable[Optional[T]]], *, limit: int,
                   after: str | None = None, newest_first: bool = True) -> tuple[list[T], bool]:
        """Up to ``limit`` loaded videos after the job id ``after`` (None: from the start), and
        whether more follow. ``load`` gives None for a job that is gone; those are dropped."""
        key = video_index_key(caller)
        start = 0
        if after is not None:
            rank = await (self.r.zrevrank if newest_first else self.r.zrank)(key, after)
            if rank is None:
                raise UnknownCursor(after)
            start = rank + 1
        found: list[T] = []
        gone: list[str] = []
        while len(found) <= limit:
            ids = await (self.r.zrevrange if newest_first else self.r.zrange)(key, start, start + limit)
            if not ids:
                break
            start += len(ids)
            for raw in ids:
                job_id = raw.decode() if isinstance(raw, bytes) else raw
                item = await load(job_id)
                if item is None:
                    gone.append(job_id)
                elif len(found) <= limit:
                    found.append(item)
        if gone:
            await self.r.zrem(key, *gone)
        return found[:limit], len(found) > limit

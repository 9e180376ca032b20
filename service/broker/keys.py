"""Where everything lives in Redis: the one place that spells a key.

Redis Cluster runs a script only when every key it touches hashes to one slot, and a
key's slot is decided by its *hash tag*, the text between its first ``{`` and ``}``.
So every key a job's scripts touch carries its model's tag, and a model's stream, its
jobs, their events, outputs and idempotency keys live on one shard, while different
models spread over the cluster. The same layout runs unchanged on a single server.

Layout (version :data:`LAYOUT_VERSION`; ``T`` is :func:`model_tag` of the model)::

    clusca:layout                    the layout version this Redis holds ("2")
    clusca:{T}:stream:<model>        the model's job stream (its short lane); entries carry only the job id
    clusca:{T}:stream:<model>:long   the model's long lane: jobs costing more than its limits'
                                     ``long_cost`` (service/broker/lanes.py); same entries, same slot
    clusca:{T}:job:<id>              hash: status, request (JSON), timestamps, step/steps,
                                     attempts, result (JSON), error, cancel flag
    clusca:{T}:job:<id>:events       stream of JSON events (queued, started, progress...)
    clusca:{T}:job:<id>:images       hash: output index -> encoded bytes, or a video store reference
    clusca:{T}:job:<id>:done         list that gets one element when the job ends
    clusca:{T}:job:<id>:<part>       anything else stored per job (job_part_key)
    clusca:{T}:idem:<hash>           idempotency key -> "<job id> <request fingerprint>"
    clusca:{T}:input:<sha256>        an edit's input image or mask (PNG bytes), with the result TTL
    clusca:idem-owner:<hash>         the model an idempotency key was first used with
    clusca:{T}:workers:<model>       sorted set: worker id -> last heartbeat (unix seconds)
    clusca:worker:<worker id>        what a worker holds, with a short TTL
    clusca:videos:<caller>           sorted set: video job id -> creation time, the videos a caller
                                     made through POST /v1/videos (GET /v1/videos lists them)

Model names cannot contain ``:``, so no model's stream is another's long lane; both of a
model's streams carry its tag, so one blocking read (or script) may name both on a cluster.

A job id is 32 lowercase hex digits whose first four are its model's tag, so the id
alone finds every key of the job: no lookup, no pointer key. The tag is a hash of the
model name (16 bits, so two models may share a shard; that costs nothing but spread).

Keys outside any tag (``clusca:layout``, ``clusca:idem-owner:*``, ``clusca:worker:*``, ``clusca:videos:*``)
are only ever read or written one at a time, never inside a script.

Version 1 (before the tags) used ``clusca:stream:<model>`` and ``clusca:job:<id>``.
:func:`check_layout` refuses to run against a Redis that still holds version-1 queue
data rather than silently ignore those jobs; see docs/deployment.md for draining it.
The long lane came within version 2: a Redis written before it holds short lanes only,
which read as they always did, so it needs no new version (version 1 had no lanes at all).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any, Iterable

from service.broker.lanes import LANES, LONG, SHORT
from service.contract import as_text

PREFIX = "clusca:"
LAYOUT_VERSION = "2"
LAYOUT_KEY = f"{PREFIX}layout"
TAG_HEX = 4
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# SCAN patterns (Redis globs treat braces literally). STREAM_PATTERN matches both lanes' streams.
JOB_PATTERN = PREFIX + "{*}:job:*"
STREAM_PATTERN = PREFIX + "{*}:stream:*"
IDEM_PATTERN = PREFIX + "{*}:idem:*"
WORKER_PATTERN = PREFIX + "worker:*"


class LayoutError(RuntimeError):
    """The Redis holds queue data this version would misread."""


def model_tag(model: str) -> str:
    return hashlib.sha1(model.encode()).hexdigest()[:TAG_HEX]


def job_tag(job_id: str) -> str:
    return job_id[:TAG_HEX]


def new_job_id(model: str) -> str:
    return model_tag(model) + secrets.token_hex(16 - TAG_HEX // 2)


def job_belongs_to(job_id: str, model: str) -> bool:
    return job_tag(job_id) == model_tag(model)


def _in(tag: str) -> str:
    return f"{PREFIX}{{{tag}}}:"


def stream_key(model: str, lane: str = SHORT) -> str:
    """The stream of ``model``'s ``lane``; the short lane's is the model's stream of before lanes."""
    if lane not in LANES:
        raise ValueError(f"unknown lane {lane!r}; lanes are {list(LANES)}")
    base = f"{_in(model_tag(model))}stream:{model}"
    return base if lane == SHORT else f"{base}:{LONG}"


def stream_keys(model: str, lanes: Iterable[str] = LANES) -> list[str]:
    """The streams of ``model``'s ``lanes``, short first."""
    return [stream_key(model, lane) for lane in lanes]


def workers_key(model: str) -> str:
    return f"{_in(model_tag(model))}workers:{model}"


def job_key(job_id: str) -> str:
    return f"{_in(job_tag(job_id))}job:{job_id}"


def job_part_key(job_id: str, part: str) -> str:
    """A per-job key beside the job hash (same slot, so a script may touch both)."""
    return f"{job_key(job_id)}:{part}"


def events_key(job_id: str) -> str:
    return job_part_key(job_id, "events")


def images_key(job_id: str) -> str:
    return job_part_key(job_id, "images")


def done_key(job_id: str) -> str:
    return job_part_key(job_id, "done")


def idem_key(model: str, scoped_key: str) -> str:
    return f"{_in(model_tag(model))}idem:{scoped_key}"


def input_key(model: str, digest: str) -> str:
    """An edit's stored input (named by its content's SHA-256), in its model's slot."""
    return f"{_in(model_tag(model))}input:{digest}"


def idem_owner_key(scoped_key: str) -> str:
    return f"{PREFIX}idem-owner:{scoped_key}"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


def video_index_key(caller: str) -> str:
    return f"{PREFIX}videos:{caller}"


def legacy_stream_key(model: str) -> str:
    """Version 1's stream of ``model`` (only read, to detect a Redis not yet drained)."""
    return f"{PREFIX}stream:{model}"


def check_layout(r: Any, models: Iterable[str]) -> None:
    """Mark a fresh Redis with this layout, or refuse one holding another (sync client).

    Version-1 data is found through the streams of the models served here (no keyspace
    scan, which costs as much as the keyspace on a large Redis).
    """
    found = as_text(r.get(LAYOUT_KEY))
    if found not in (None, LAYOUT_VERSION):
        raise LayoutError(f"this Redis holds queue layout {found!r}; this version reads layout {LAYOUT_VERSION!r}")
    if found is None:
        old = [legacy_stream_key(m) for m in models if r.exists(legacy_stream_key(m))]
        if old:
            raise LayoutError(_legacy_message(old))
        r.set(LAYOUT_KEY, LAYOUT_VERSION, nx=True)


async def check_layout_async(r: Any, models: Iterable[str]) -> None:
    """:func:`check_layout` for an asyncio client."""
    found = as_text(await r.get(LAYOUT_KEY))
    if found not in (None, LAYOUT_VERSION):
        raise LayoutError(f"this Redis holds queue layout {found!r}; this version reads layout {LAYOUT_VERSION!r}")
    if found is None:
        old = [legacy_stream_key(m) for m in models if await r.exists(legacy_stream_key(m))]
        if old:
            raise LayoutError(_legacy_message(old))
        await r.set(LAYOUT_KEY, LAYOUT_VERSION, nx=True)


def _legacy_message(old: list[str]) -> str:
    return (f"this Redis holds jobs of the previous queue layout ({', '.join(old)}); let the previous version "
            f"finish them, then delete the old keys (docs/deployment.md, 'Queue layout') and start again")

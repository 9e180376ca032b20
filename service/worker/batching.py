"""Which jobs run together, and how one call's outputs go back to its jobs.

Pure functions over requests the worker has already read: no Redis, no model. A group is
the jobs of one model with equal :meth:`~service.contract.JobRequest.batch_key` (the
call-wide settings: size, steps, guidance, cache); a group is cut into calls that never
hold more than the worker's image cap, nor, for videos, more than the model's
``max_video_pixels``; and a call's images are handed back to its jobs in order.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

from service.contract import JobRequest

T = TypeVar("T")


def group_by_batch_key(items: Sequence[T], models: Sequence[str],
                       requests: Sequence[JobRequest | None]) -> list[list[T]]:
    """``items`` grouped by their request's batch key, groups in order of first arrival.

    An item whose request could not be read stays alone: starting it fails it with the
    reason, and it must not take a batch down with it.
    """
    groups: dict[Any, list[T]] = {}
    for i, (item, model, req) in enumerate(zip(items, models, requests)):
        key = req.batch_key(model) if req is not None else ("unreadable", i)
        groups.setdefault(key, []).append(item)
    return list(groups.values())


def video_pixels(req: JobRequest) -> int:
    """Width x height x frames over the request's videos (0 for still images)."""
    return req.num_images * req.width * req.height * (req.num_frames or 0)


def split_into_calls(items: Sequence[T], requests: Sequence[JobRequest], max_images: int,
                     max_video_pixels: int | None, max_adapters: int | None = None) -> list[list[T]]:
    """Consecutive calls of at most ``max_images`` images, ``max_video_pixels`` video pixels and
    ``max_adapters`` distinct adapters (the model's adapter slots: jobs with different adapters
    share a call, as long as the call's adapters all fit in the slots at once).

    One job always makes a call of its own, whatever its size: its limits were checked
    against the model's when it was admitted.
    """
    calls: list[list[T]] = []
    chunk: list[T] = []
    images = pixels = 0
    adapters: set[str] = set()
    for item, req in zip(items, requests):
        n, p = req.num_images, video_pixels(req)
        mine = {a.name for a in req.adapters}
        over_pixels = max_video_pixels is not None and pixels + p > max_video_pixels
        over_slots = max_adapters is not None and len(adapters | mine) > max_adapters
        if chunk and (images + n > max_images or over_pixels or over_slots):
            calls.append(chunk)
            chunk, images, pixels, adapters = [], 0, 0, set()
        chunk.append(item)
        images += n
        pixels += p
        adapters |= mine
    if chunk:
        calls.append(chunk)
    return calls


def shares(requests: Sequence[JobRequest], outputs: Sequence[Any]) -> list[list[Any]]:
    """Each request's outputs of one call, in request order (a request's images are adjacent)."""
    out, offset = [], 0
    for req in requests:
        out.append(list(outputs[offset:offset + req.num_images]))
        offset += req.num_images
    return out

"""Where a video job's encoded bytes live: in Redis beside the job, or in a folder the operator names.

Either way the job's outputs hash (``job:{id}:images``) holds one value per output and is written
by the same atomic finish script that stores the result, so a job is never finished without its
outputs. With the Redis store (``CLUSCA_VIDEO_STORE=redis``, the default) the value is the bytes,
bounded by ``CLUSCA_MAX_OUTPUT_BYTES``, and Redis expires them with the job. With the directory
store (``CLUSCA_VIDEO_STORE=dir:///path``) the value is a reference, ``clusca-file:<name>``, to a
file in that folder: every worker and API process must see the same folder (a shared volume).
Files carry the result TTL themselves: each writer sweeps out those older than it (see
:meth:`DirStore.sweep`). Still images always stay in Redis.

No encoded output starts with the reference prefix (MP4, RIFF/WebP, GIF, PNG and JPEG all open
with their own magic bytes), so a value is a reference exactly when it starts with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


log = logging.getLogger("clusca.video_store")

REF_PREFIX = b"clusca-file:"
# Videos, and the PNG inputs of edits (service/outputs/inputs.py).
_NAME = re.compile(r"^[0-9a-f]{32}-\d{1,5}-[0-9a-f]{12}\.(mp4|webp|gif|png)$")
_TMP_PREFIX = ".tmp-"
# A file outlives its job's records by this much, so a reader that just found its reference can still open it.
GRACE_S = 60.0
# How often one process sweeps a folder at most: a sweep lists the whole folder.
SWEEP_EVERY_S = 60.0


class NotKept(Exception):
    """An output the store could not keep: its job fails with this message (retrying would not help)."""


class OutputTooLarge(NotKept):
    """An output is bigger than the store keeps."""


def parse_spec(spec: str) -> Path | None:
    """The folder of a ``dir:///absolute/path`` store, None for ``redis``; ValueError for anything else."""
    if spec == "redis":
        return None
    if spec.startswith("dir://"):
        path = spec[len("dir://"):]
        if path.startswith("/") and len(path) > 1:
            return Path(path)
        raise ValueError("dir:// needs an absolute path, e.g. dir:///var/lib/clusca/videos")
    raise ValueError("expected redis or dir:///absolute/path (S3-compatible object stores are not supported yet)")


@dataclass(frozen=True)
class Blob:
    """Stored bytes, read whole or by byte range (files are read only as far as asked)."""

    size: int
    _data: bytes | None = None
    _path: Path | None = None

    def read(self, first: int = 0, last: int | None = None) -> bytes:
        """Bytes ``first`` to ``last`` inclusive (default: to the end)."""
        last = self.size - 1 if last is None else last
        if self._data is not None:
            return self._data[first:last + 1]
        assert self._path is not None
        with open(self._path, "rb") as f:
            f.seek(first)
            return f.read(max(0, last + 1 - first))


class Store(Protocol):
    kind: str

    def put(self, job_id: str, index: int, data: bytes, fmt: str) -> bytes:
        """What the outputs hash keeps for ``data``; raises :class:`NotKept`."""

    def open(self, stored: bytes) -> Blob | None:
        """The bytes a value of the outputs hash stands for; None when they are gone."""

    def delete(self, stored: list[bytes]) -> None:
        """Remove what these values stand for (what Redis holds itself goes with its keys)."""

    def sweep(self, now: float | None = None) -> int:
        """Remove what has outlived the result TTL; how many were removed."""


class RedisStore:
    """The bytes themselves, in the outputs hash; Redis expires them with the job."""

    kind = "redis"

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def put(self, job_id: str, index: int, data: bytes, fmt: str) -> bytes:
        if len(data) > self.max_bytes:
            raise OutputTooLarge(f"the encoded output is {len(data)} bytes, over the service's limit of "
                                 f"{self.max_bytes} (CLUSCA_MAX_OUTPUT_BYTES) for outputs kept in Redis")
        return data

    def open(self, stored: bytes) -> Blob | None:
        if stored.startswith(REF_PREFIX):
            # Written by a worker with a directory store: this process was not given that folder.
            log.warning("an output is a file reference but this process has no directory store "
                        "(CLUSCA_VIDEO_STORE differs between processes)")
            return None
        return Blob(len(stored), stored)

    def delete(self, stored: list[bytes]) -> None:
        return None

    def sweep(self, now: float | None = None) -> int:
        return 0


class DirStore:
    """One file per output in ``root``; the outputs hash keeps ``clusca-file:<name>``.

    Names are ``<job id>-<index>-<random>.<format>``: two workers that raced on one job never
    write the same file, so the loser can delete its own files without touching the winner's.
    Files appear whole (written aside, then renamed). A file older than the result TTL (plus
    :data:`GRACE_S`) is swept by the next write after it, at most once a minute per process,
    and when a worker starts.
    """

    kind = "dir"

    def __init__(self, root: Path, ttl_s: float):
        self.root = Path(root)
        self.ttl_s = ttl_s
        self._last_sweep = float("-inf")

    def put(self, job_id: str, index: int, data: bytes, fmt: str) -> bytes:
        return self.write(f"{job_id}-{index}-{uuid.uuid4().hex[:12]}.{fmt}", data)

    def write(self, name: str, data: bytes) -> bytes:
        """Write ``data`` as the file ``name`` (whole or not at all); its reference."""
        if not _NAME.match(name):
            raise ValueError(f"not a storable output: {name!r}")
        # A name of its own, so two processes writing one input's bytes at once never share a file.
        tmp = self.root / f"{_TMP_PREFIX}{uuid.uuid4().hex}-0-{uuid.uuid4().hex[:12]}{Path(name).suffix}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.root / name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.error("video store %s: %s", self.root, exc)
            raise NotKept(f"the video could not be written to the video store folder ({exc.strerror or exc}); "
                          "see CLUSCA_VIDEO_STORE") from None
        if time.monotonic() - self._last_sweep >= min(SWEEP_EVERY_S, self.ttl_s):
            self.sweep()
        return REF_PREFIX + name.encode()

    def _path(self, stored: bytes) -> Path | None:
        if not stored.startswith(REF_PREFIX):
            return None
        name = stored[len(REF_PREFIX):].decode(errors="replace")
        # A value from Redis names a file only in this folder: nothing else on the host is served.
        return self.root / name if _NAME.match(name) else None

    def open(self, stored: bytes) -> Blob | None:
        path = self._path(stored)
        if path is None:
            # Bytes from before the store was switched to a folder (or an image): served as they are.
            return None if stored.startswith(REF_PREFIX) else Blob(len(stored), stored)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if st.st_mtime + self.ttl_s + GRACE_S < time.time():
            return None  # expired, not swept yet
        return Blob(st.st_size, None, path)

    def delete(self, stored: list[bytes]) -> None:
        for value in stored:
            path = self._path(value)
            if path is not None:
                path.unlink(missing_ok=True)

    def sweep(self, now: float | None = None) -> int:
        self._last_sweep = time.monotonic()
        now = time.time() if now is None else now
        removed = 0
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        except OSError as exc:  # the worker must still start; writes will name the problem
            log.warning("video store %s cannot be swept: %s", self.root, exc)
            return 0
        for e in entries:
            ours = _NAME.match(e.name) or (e.name.startswith(_TMP_PREFIX) and _NAME.match(e.name[len(_TMP_PREFIX):]))
            if not ours or not e.is_file(follow_symlinks=False):
                continue
            try:
                if e.stat(follow_symlinks=False).st_mtime + self.ttl_s + GRACE_S < now:
                    os.unlink(e.path)
                    removed += 1
            except FileNotFoundError:  # another process swept it first
                pass
            except OSError as exc:
                log.warning("video store %s: %s not swept: %s", self.root, e.name, exc)
        if removed:
            log.info("swept %d expired video file(s) from %s", removed, self.root)
        return removed


def from_settings(settings: Any) -> Store:
    """The video store ``settings.video_store`` names (validated by the settings)."""
    root = parse_spec(settings.video_store)
    if root is None:
        return RedisStore(settings.max_output_bytes)
    return DirStore(root, settings.result_ttl_s)


def stored_is_ref(value: bytes) -> bool:
    return value.startswith(REF_PREFIX)


async def open_output(store: Store, value: bytes | None) -> Blob | None:
    """The blob a value of the outputs hash stands for, read off the event loop when it is a file."""
    if value is None:
        return None
    if not stored_is_ref(value):
        return Blob(len(value), value)
    return await asyncio.to_thread(store.open, value)


async def delete_job(queue: Any, store: Store, job_id: str) -> None:
    """Remove an ended job: its records, then the files they referenced (should this stop between
    the two, the sweep removes the files once they expire)."""
    values = await queue.delete(job_id)
    await asyncio.to_thread(store.delete, [v for v in values if stored_is_ref(v)])

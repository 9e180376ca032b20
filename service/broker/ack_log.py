"""The loss journal on disk, so that jobs an API process confirmed are checked after it restarts.

Each API process (each uvicorn worker included) writes files of its own in the journal
directory, named after the Redis it confirms jobs for and a random process id::

    acks-<redis>-<proc>.lock         held (flock) for as long as the process lives
    acks-<redis>-<proc>.<seq>.log    segments: one line "<unix time> <job id> <model>" per job

At its start and every 30 s after (:func:`service.broker.reconcile.run`), a process takes
over every lock of its Redis that nobody holds (their writer died or stopped): it
reads their segments, writes the unchecked entries into a segment of its own and only
then removes the orphan's files, so a crash in between leaves the entries twice, never
nowhere. A directory shared by deployments of
different Redis servers keeps them apart by the ``<redis>`` part of the names.

Writing costs one ``write`` per confirmed job, made before the API answers: the entry is
in the kernel's page cache, so a killed or crashed process loses none. ``fsync`` runs
at most once a second (from the checker), so a host crash can lose the last second.

Compaction: checks go mostly in confirmation order, so whole segments fall behind the
checks and are deleted; a segment is closed after :data:`SEGMENT_LINES` entries, which
bounds the disk to the unchecked entries plus about two segments.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Iterable

from service.broker.keys import JOB_ID

log = logging.getLogger("clusca.reconcile")

SEGMENT_LINES = 20_000
_SEGMENT = re.compile(r"^acks-(?P<redis>[0-9a-f]+)-(?P<proc>[0-9a-f]+)\.(?P<seq>\d+)\.log$")


def redis_name(redis_url: str) -> str:
    """The ``<redis>`` part of the file names: a hash, so no password is written into a name."""
    return hashlib.sha256(redis_url.encode()).hexdigest()[:12]


def parse_line(line: str) -> tuple[float, str, str] | None:
    """``(unix time, job id, model)``, or None for a line a crash cut short or garbled."""
    parts = line.split(" ")
    if not line.endswith("\n") or len(parts) != 3 or not JOB_ID.match(parts[1]):
        return None
    try:
        wall = float(parts[0])
    except ValueError:
        return None
    model = parts[2][:-1]
    return (wall, parts[1], model) if model else None


class AckLog:
    """This process's journal files: append confirmed jobs, drop checked segments, adopt orphans."""

    def __init__(self, directory: str | os.PathLike, redis_url: str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.redis = redis_name(redis_url)
        self.proc = secrets.token_hex(6)
        self._lock_fd = self._take_lock()
        self._seq = 0
        self._lines: dict[int, int] = {}  # segment -> entries written and not yet checked
        self._fd = -1
        self._written = 0
        self._dirty = False
        self._open_segment()

    def _name(self, proc: str, suffix: str) -> Path:
        return self.dir / f"acks-{self.redis}-{proc}{suffix}"

    def _take_lock(self) -> int:
        # Locked under a temporary name, then renamed: no other process ever sees our lock file unlocked
        # (and takes it for an orphan's).
        tmp = self.dir / f".acks-{self.redis}-{self.proc}.lock.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(tmp, self._name(self.proc, ".lock"))
        return fd

    def _open_segment(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1  # never write to a closed descriptor's number: another file may hold it now
        seq = self._seq + 1
        self._fd = os.open(self._name(self.proc, f".{seq}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._seq, self._lines[seq], self._written = seq, 0, 0

    def append(self, wall: float, job_id: str, model: str) -> int:
        """Write one entry; return the segment that holds it (for :meth:`checked`)."""
        if self._written >= SEGMENT_LINES:
            self._open_segment()
        os.write(self._fd, f"{wall!r} {job_id} {model}\n".encode())
        self._written += 1
        self._lines[self._seq] += 1
        self._dirty = True
        return self._seq

    def checked(self, seq: int, n: int = 1) -> None:
        """``n`` entries of segment ``seq`` need no check any more; a segment left with none is deleted."""
        self._lines[seq] -= n
        if self._lines[seq] <= 0 and seq != self._seq:
            del self._lines[seq]
            self._name(self.proc, f".{seq}.log").unlink(missing_ok=True)

    def sync(self) -> None:
        """fsync what was written since the last call (a no-op when nothing was)."""
        if self._dirty:
            self._dirty = False
            os.fsync(self._fd)

    def adopt(self, since: float = 0.0) -> list[tuple[float, str, str, int]]:
        """The entries ``(unix time, job id, model, segment)`` of every orphaned journal of this Redis
        confirmed at ``since`` or later, oldest first, now in this process's own segments; the
        orphans' files are removed."""
        taken: list[tuple[int, Path, list[Path]]] = []
        for lock in sorted(self.dir.glob(f"acks-{self.redis}-*.lock")):
            proc = lock.name[len(f"acks-{self.redis}-"):-len(".lock")]
            if proc == self.proc:
                continue
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                continue  # another starting process adopted it meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # its writer is alive
            taken.append((fd, lock, self._segments(proc)))
        found = _unique(e for _, _, segs in taken for seg in segs for e in self._read(seg) if e[0] >= since)
        entries = [(wall, job_id, model, self.append(wall, job_id, model)) for wall, job_id, model in found]
        self.sync()
        for fd, lock, segments in taken:
            for seg in segments:
                seg.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            os.close(fd)
        if entries:
            log.info("took over %d unchecked job(s) from the journal of API process(es) that stopped", len(entries))
        return entries

    def _segments(self, proc: str) -> list[Path]:
        out = []
        for path in self.dir.glob(f"acks-{self.redis}-{proc}.*.log"):
            m = _SEGMENT.match(path.name)
            if m and m["proc"] == proc:
                out.append((int(m["seq"]), path))
        return [p for _, p in sorted(out)]

    @staticmethod
    def _read(path: Path) -> list[tuple[float, str, str]]:
        try:
            text = path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return []
        entries = [parse_line(line) for line in text.splitlines(keepends=True)]
        bad = sum(e is None for e in entries)
        if bad:
            log.warning("%s: skipped %d unreadable line(s) (a write cut short by a crash)", path.name, bad)
        return [e for e in entries if e is not None]

    def close(self) -> None:
        """Flush and release. Unchecked entries stay for the next process to adopt; a journal with
        none left is removed."""
        if self._fd < 0:
            return
        try:
            self.sync()
        except OSError as exc:  # a stop must not fail on it: what the kernel holds is written anyway
            log.warning("could not sync the journal at stop (%s)", exc)
        os.close(self._fd)
        self._fd = -1
        if not any(self._lines.values()):
            for seg in self._segments(self.proc):
                seg.unlink(missing_ok=True)
            self._name(self.proc, ".lock").unlink(missing_ok=True)
        os.close(self._lock_fd)


def _unique(entries: Iterable[tuple[float, str, str]]) -> list[tuple[float, str, str]]:
    # A takeover cut short by a crash leaves an entry in two journals: it is checked once.
    first: dict[str, tuple[float, str, str]] = {}
    for e in sorted(entries):
        first.setdefault(e[1], e)
    return list(first.values())

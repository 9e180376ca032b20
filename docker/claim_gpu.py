#!/usr/bin/env python3
"""Give each worker container on a host its own GPU, then run the worker.

Docker turns a device reservation of ``count: N`` into "GPUs 0..N-1" for every
container, so ``docker compose up --scale worker=4`` with ``count: 1`` would put all
four workers on GPU 0. Instead, each worker container sees every GPU of the host and
this wrapper claims one: it takes an exclusive ``flock`` on one lock file per GPU in a
directory shared by the host's workers (a named volume), keeps the lock open across
``exec``, and sets ``CUDA_VISIBLE_DEVICES`` to that GPU. The kernel drops the lock when
the worker exits, however it exits, so a claim never outlives its container.

    clusca-claim-gpu [--lock-dir DIR] [--count N] [--wait-s S] -- clusca worker

With ``CUDA_VISIBLE_DEVICES`` already set, or no GPU visible, the command runs as is.
When every GPU is claimed the wrapper waits (a replica that is still draining its last
job holds its GPU until it exits) and says so on stderr.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PROC_GPUS = Path("/proc/driver/nvidia/gpus")
DEFAULT_LOCK_DIR = "/run/clusca-gpus"


def visible_gpus(env: dict[str, str], proc_dir: Path = PROC_GPUS) -> list[str]:
    """Stable names of the GPUs this container sees, in CUDA's PCI-bus order.

    An explicit ``NVIDIA_VISIBLE_DEVICES`` list is what the NVIDIA runtime exposes, so it
    wins. With ``all`` (a ``count: all`` reservation) the driver's one
    ``/proc/driver/nvidia/gpus/<pci-bus-id>`` entry per GPU is used: sorting the bus ids
    gives the order ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` uses, so position ``i`` is CUDA
    device ``i``. ``nvidia-smi -L`` (same order) is the last resort.
    """
    listed = env.get("NVIDIA_VISIBLE_DEVICES", "")
    if listed in ("none", "void"):
        return []
    if listed and listed != "all":
        return [d.strip() for d in listed.split(",") if d.strip()]
    try:
        return sorted(p.name for p in proc_dir.iterdir())
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"\(UUID: ([^)]+)\)", out)


def try_claim(lock_dir: Path, names: list[str]) -> tuple[int, int] | None:
    """Lock the first free GPU: ``(cuda_index, fd)``, or None when all are taken."""
    for index, name in enumerate(names):
        fd = os.open(lock_dir / f"gpu-{name.replace('/', '_')}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                continue
            raise
        return index, fd
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clusca-claim-gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--lock-dir", default=os.environ.get("CLUSCA_GPU_LOCK_DIR", DEFAULT_LOCK_DIR))
    p.add_argument("--count", type=int, default=None,
                   help="number of GPUs to share out (default: those the container sees)")
    p.add_argument("--wait-s", type=float, default=None,
                   help="give up after this many seconds when every GPU is claimed (default: wait)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("no command given: clusca-claim-gpu [options] -- clusca worker")
    if args.count is not None and args.count < 0:
        p.error("--count must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    if "CUDA_VISIBLE_DEVICES" in env:  # the operator chose already (empty means no GPU)
        os.execvp(args.command[0], args.command)
    names = [str(i) for i in range(args.count)] if args.count is not None else visible_gpus(env)
    if not names:
        print("clusca-claim-gpu: no GPU visible; running without a claim", file=sys.stderr)
        os.execvp(args.command[0], args.command)

    lock_dir = Path(args.lock_dir)
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"clusca-claim-gpu: cannot use lock directory {lock_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    started = time.monotonic()
    last_note = -60.0
    while True:
        claimed = try_claim(lock_dir, names)
        if claimed is not None:
            break
        waited = time.monotonic() - started
        if args.wait_s is not None and waited >= args.wait_s:
            print(f"clusca-claim-gpu: all {len(names)} GPUs are claimed by other workers; gave up",
                  file=sys.stderr)
            return 3
        if waited - last_note >= 60:
            print(f"clusca-claim-gpu: all {len(names)} GPUs are claimed by other workers; waiting",
                  file=sys.stderr, flush=True)
            last_note = waited
        time.sleep(1.0)

    index, fd = claimed
    # The lock lives as long as this descriptor; it must survive exec into the worker.
    os.set_inheritable(fd, True)
    env["CUDA_VISIBLE_DEVICES"] = str(index)
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    print(f"clusca-claim-gpu: GPU {index} ({names[index]}) claimed", file=sys.stderr, flush=True)
    os.execvpe(args.command[0], args.command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

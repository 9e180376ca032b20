#!/usr/bin/env python3
"""Container health probe for ClusCa Serve images (the image's HEALTHCHECK).

One image runs every role, so the probe reads the role from the container's main
command (PID 1's arguments, e.g. ``tini -- clusca worker``):

* ``clusca api`` / ``clusca serve``: ``GET /healthz`` on the API port. Liveness, not
  ``/readyz``: readiness also needs a live worker, and an API container marked
  unhealthy (and perhaps restarted) because no worker is up fixes nothing.
* ``clusca worker``: ``GET /metrics`` on ``CLUSCA_WORKER_METRICS_PORT``, the worker's
  only HTTP endpoint; it answers while the worker process is up.

Exit status 0 is healthy, 1 unhealthy (Docker's convention).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence


def role_and_args(argv: Sequence[str]) -> tuple[str, list[str]]:
    """The ``clusca`` subcommand in a command line and the arguments after it."""
    for i, token in enumerate(argv):
        if Path(token).name == "clusca" and i + 1 < len(argv):
            return argv[i + 1], list(argv[i + 2:])
    return "serve", []


def _flag(args: Sequence[str], name: str) -> str | None:
    for i, token in enumerate(args):
        if token == name and i + 1 < len(args):
            return args[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def probe_url(argv: Sequence[str], env: Mapping[str, str]) -> str:
    role, args = role_and_args(argv)
    if role == "worker":
        port = env.get("CLUSCA_WORKER_METRICS_PORT") or "9101"
        return f"http://127.0.0.1:{port}/metrics"
    port = _flag(args, "--port") or env.get("CLUSCA_PORT") or "8000"
    return f"http://127.0.0.1:{port}/healthz"


def main_command(proc_cmdline: Path = Path("/proc/1/cmdline")) -> list[str]:
    try:
        raw = proc_cmdline.read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def main() -> int:
    url = probe_url(sys.argv[1:] or main_command(), os.environ)
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:  # noqa: S310 - loopback URL built above
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {url} answered {resp.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

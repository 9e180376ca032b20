"""Load benchmark of `clusca serve` with the built-in model: throughput and latency under concurrency.

    python benchmarks/load.py                    # batching off and on, concurrency 1 4 16 64
    python benchmarks/load.py --quick            # concurrency 1 and 4, few requests
    python benchmarks/load.py --url http://host:8000 --label gpu   # against a running service

For each batching setting (``CLUSCA_MAX_BATCH`` 1 = off, and ``--batch`` = on) it starts
its own ``clusca serve`` on a free port, waits for ``/readyz``, sends a few warm-up
requests, and then, per concurrency level, keeps that many synchronous ``POST /generate``
requests in flight (an asyncio client on httpx) until the level's request count is done.
It reports throughput (images/s over the level's wall time), p50/p95/p99 latency, errors
and the mean batch size the worker ran. In the same run, the same requests are timed as
direct in-process pipeline calls (batch 1, and batched) as the baseline without HTTP,
queue and worker. Saves the raw results (``--json``, default benchmarks/results/load.json)
and renders its section of docs/benchmarks.md from them; ``--from-json`` renders again
without measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import write_section, written_by  # noqa: E402
from benchmarks._results import RESULTS, save  # noqa: E402
from benchmarks._service import wait_until_ready  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402

from benchmarks._metrics import percentile  # noqa: E402

START, END = "<!-- service-load:start -->", "<!-- service-load:end -->"
TOPIC = "service"
DOCS = ROOT / "docs" / "benchmarks.md"
PROMPTS = [
    "a red circle on the left", "a blue square at the top", "a green triangle on the right",
    "a yellow circle at the bottom", "a purple square in the centre", "an orange triangle on the left",
    "a blue circle above a red square", "a green square left of a yellow triangle",
]


@dataclass
class LevelResult:
    """One concurrency level against one service configuration."""

    concurrency: int
    requests: int
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    flops_speedups: list[float] = field(default_factory=list)
    inference_s: list[float] = field(default_factory=list)
    queue_wait_s: list[float] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)  # completion times since the level started
    drain_at: float = 0.0  # when the last request was sent: from then on fewer clients are busy

    @property
    def throughput(self) -> float:
        """Answered images per second while every client was busy (the draining tail left out)."""
        steady = sum(1 for t in self.done_at if t <= self.drain_at)
        if steady and self.drain_at > 0:
            return steady / self.drain_at
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    @classmethod
    def combine(cls, parts: list["LevelResult"]) -> dict[str, Any]:
        """Summary of several passes of one level: pooled latencies, median throughput."""
        total = cls(parts[0].concurrency, sum(p.requests for p in parts))
        for p in parts:
            total.ok += p.ok
            total.errors += p.errors
            for k, v in p.error_kinds.items():
                total.error_kinds[k] = total.error_kinds.get(k, 0) + v
            total.wall_s += p.wall_s
            for name in ("latencies", "batch_sizes", "flops_speedups", "inference_s", "queue_wait_s"):
                getattr(total, name).extend(getattr(p, name))
        out = total.summary()
        out["throughput_passes"] = [round(p.throughput, 3) for p in parts]
        out["throughput"] = round(statistics.median(p.throughput for p in parts), 3)
        return out

    def summary(self) -> dict[str, Any]:
        lat = self.latencies or [float("nan")]
        return {
            "concurrency": self.concurrency, "requests": self.requests, "ok": self.ok, "errors": self.errors,
            "error_kinds": self.error_kinds, "wall_s": round(self.wall_s, 2),
            "throughput": round(self.throughput, 3),
            "p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
            "mean_batch": statistics.fmean(self.batch_sizes) if self.batch_sizes else None,
            "flops_speedup": statistics.fmean(self.flops_speedups) if self.flops_speedups else None,
            "inference_s": statistics.median(self.inference_s) if self.inference_s else None,
            "queue_wait_s": statistics.median(self.queue_wait_s) if self.queue_wait_s else None,
        }


# ==================================================================== the service
class Serve:
    """`clusca serve` in a child process (its own private Redis), stopped with SIGTERM."""

    def __init__(self, max_batch: int, batch_wait_ms: float, weights: str | None, port: int, threads: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="clusca-load-"))
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "CLUSCA_MAX_BATCH": str(max_batch), "CLUSCA_BATCH_WAIT_MS": str(batch_wait_ms),
               "CLUSCA_MAX_QUEUE": "100000", "CLUSCA_SYNC_TIMEOUT_S": "3600", "CLUSCA_LOG_LEVEL": "WARNING",
               "CLUSCA_PORT": str(port), "CLUSCA_HOST": "127.0.0.1", "PYTHONPATH": str(ROOT),
               # torch reads this for its intra-op pool: on a shared CPU an oversubscribed pool
               # is many times slower than one thread per worker.
               "OMP_NUM_THREADS": str(threads)}
        for name in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR", "CLUSCA_API_KEYS", "CLUSCA_MODELS", "CLUSCA_DEFAULT_MODEL"):
            env.pop(name, None)
        if weights:
            models = self.tmp / "models.yaml"
            # No defaults here: the registry reads them (and the preset tuning) from the checkpoint.
            models.write_text("models:\n  - name: shapes\n    kind: builtin\n    dtype: float32\n"
                              f"    path: {Path(weights).resolve()}\n")
            env["CLUSCA_MODELS"] = str(models)
        self.log = open(self.tmp / "serve.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                                     env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        def exited() -> str | None:
            if self.proc.poll() is None:
                return None
            return f"clusca serve exited with {self.proc.returncode}; see {self.tmp / 'serve.log'}"

        if not wait_until_ready(self.url, timeout_s, poll_s=0.25, request_timeout_s=2, exited=exited):
            raise RuntimeError(f"clusca serve was not ready after {timeout_s:.0f} s; see {self.tmp / 'serve.log'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ==================================================================== the client
def request_body(i: int, a: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": a.steps,
                            "cache": {"preset": a.cache}}
    return body


async def run_level(url: str, concurrency: int, n_requests: int, a: argparse.Namespace,
                    headers: dict[str, str], transport: httpx.AsyncBaseTransport | None = None) -> LevelResult:
    """Keep ``concurrency`` requests in flight until ``n_requests`` have been answered."""
    res = LevelResult(concurrency, n_requests)
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < n_requests:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            if next_index == n_requests:
                res.drain_at = t0 - start
            try:
                r = await c.post(url + "/generate", json=request_body(i, a), headers=headers)
            except httpx.HTTPError as exc:
                kind = type(exc).__name__
            else:
                if r.status_code == 200:
                    now = time.perf_counter()
                    res.latencies.append(now - t0)
                    res.done_at.append(now - start)
                    res.ok += 1
                    body = r.json()
                    if body.get("batch_images") is not None:
                        res.batch_sizes.append(int(body["batch_images"]))
                    fs = (body.get("cache_stats") or {}).get("flops_speedup")
                    if fs is not None:
                        res.flops_speedups.append(float(fs))
                    tm = body.get("timings") or {}
                    if tm.get("inference_s") is not None:
                        res.inference_s.append(float(tm["inference_s"]))
                    if tm.get("queue_wait_s") is not None:
                        res.queue_wait_s.append(float(tm["queue_wait_s"]))
                    continue
                kind = f"HTTP {r.status_code}"
            res.errors += 1
            res.error_kinds[kind] = res.error_kinds.get(kind, 0) + 1

    async with httpx.AsyncClient(timeout=httpx.Timeout(a.timeout), limits=limits, transport=transport) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        res.wall_s = time.perf_counter() - start
    return res


def requests_for(concurrency: int, a: argparse.Namespace) -> int:
    # Enough requests that every client sends several and the level lasts a few batches.
    return max(a.min_requests, a.rounds * concurrency)


def bench_service(url: str, a: argparse.Namespace, label: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    warm = asyncio.run(run_level(url, 2, 4, a, headers))
    if warm.ok == 0:
        raise RuntimeError(f"{label}: warm-up requests failed: {warm.error_kinds}")
    # The levels run in several passes, one after another within each pass, so that slow drifts
    # in what else the machine is doing hit every level alike; each level's throughput is the
    # median over its passes.
    parts: dict[int, list[LevelResult]] = {c: [] for c in a.concurrency}
    for _ in range(a.passes):
        for c in a.concurrency:
            n = max(2 * c, math.ceil(requests_for(c, a) / a.passes))
            parts[c].append(asyncio.run(run_level(url, c, n, a, headers)))
    out = []
    for c in a.concurrency:
        r = LevelResult.combine(parts[c])
        out.append(r)
        print(f"[{label}] c={c:<3} {r['ok']:>4} ok {r['errors']:>3} err  {r['throughput']:6.2f} img/s  "
              f"p50 {r['p50']:6.2f}s  p95 {r['p95']:6.2f}s  p99 {r['p99']:6.2f}s  "
              f"mean batch {r['mean_batch'] if r['mean_batch'] is None else round(r['mean_batch'], 2)}  "
              f"inference {r['inference_s']}s", flush=True)
    return out


# ==================================================================== in-process baseline
def direct_config(a: argparse.Namespace):
    """The ClusCa settings the service runs for ``--cache``: the checkpoint's tuning of the preset."""
    from service.registry import builtin_entry

    return builtin_entry(a.weights).cache_config({"preset": a.cache})


def bench_direct(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The same requests as direct pipeline calls in this process (no HTTP, queue or worker)."""
    import torch

    from clusca import apply_clusca, clusca_run
    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline

    torch.set_num_threads(a.threads)
    pipe = ShapesFluxPipeline.from_pretrained(a.weights or WEIGHTS_DIR).to(a.device)
    apply_clusca(pipe.transformer)
    cfg = direct_config(a)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    out = []
    for batch in sorted({1, *a.batch}):
        n = requests_for(batch, a)
        lat: list[float] = []
        done = 0
        t_start = time.perf_counter()
        for start in range(-batch, n, batch):  # the first call warms up and is not counted
            idx = [max(start, 0) + k for k in range(batch)]
            gens = [torch.Generator().manual_seed(i) for i in idx]
            t0 = time.perf_counter()
            with clusca_run(pipe.transformer, cfg, num_inference_steps=a.steps):
                pipe([PROMPTS[i % len(PROMPTS)] for i in idx], generator=gens, num_inference_steps=a.steps)
            sync()
            dt = time.perf_counter() - t0
            if start < 0:
                t_start = time.perf_counter()
                continue
            lat += [dt] * batch
            done += batch
        wall = time.perf_counter() - t_start
        r = {"batch": batch, "images": done, "wall_s": round(wall, 2), "throughput": round(done / wall, 3),
             "p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99)}
        out.append(r)
        print(f"[direct] batch {batch:<3} {done:>4} images  {r['throughput']:6.2f} img/s  p50 {r['p50']:6.3f}s", flush=True)
    return out


# ==================================================================== report
def render(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = [
        START,
        "## Service under load (built-in model)",
        "",
        written_by("load.py", m["argv"], m["date"]) + f"; CPU `{m['cpu']}` "
        f"({m['cores']} cores, shared by the load generator, the API, Redis and the worker"
        + (f"; 1-minute load average {m['load_avg']} at the start" if "load_avg" in m else "")
        + f"), {m.get('device_name') or 'no GPU'}; the worker runs torch with {m['worker_threads']} thread(s) "
        f"(`OMP_NUM_THREADS`). Requests: synchronous `POST /generate`, 32x32, {m['steps']} steps, "
        f"cache preset `{m['cache']}`, prompts cycling over {len(PROMPTS)} fixed ones, seed = request index. "
        f"Every level runs in {m.get('passes', 1)} pass(es), the levels taking turns, so that changes in the "
        "machine's other load hit every level alike. Throughput = images answered per second while every client "
        "was busy (up to the moment the last request of a pass was sent), median over the passes; latency = "
        "client-side time of a request, pooled over the passes; "
        "mean batch = images per pipeline call the worker reported.",
        "",
    ]
    targets = res.get("targets") or []
    if targets:
        lines += ["| target | measured | met |", "|---|---|---|"]
        for t in targets:
            lines.append(f"| batching on (max batch {t['batch']}): throughput at concurrency 16 >= 1.5 x concurrency 1 | "
                         f"{t['c16']:.2f} / {t['c1']:.2f} img/s = {t['ratio']:.2f}x | {'yes' if t['ratio'] >= 1.5 else 'no'} |")
        lines.append("")
    lines += ["| setting | concurrency | requests | errors | throughput img/s | per pass | p50 s | p95 s | p99 s | mean batch "
              "| worker inference s (median) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, rows in res["service"].items():
        for r in rows:
            mb = "n/a" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}"
            inf = "n/a" if r.get("inference_s") is None else f"{r['inference_s']:.3f}"
            passes = " / ".join(f"{x:.2f}" for x in r.get("throughput_passes", []))
            lines.append(f"| {label} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['throughput']:.2f} | "
                         f"{passes} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | {mb} | {inf} |")
    if res.get("direct"):
        lines += ["", "Baseline in the same run: the same pipeline called directly in the benchmark process "
                  f"(torch threads: {m['threads']}), one call after another.", "",
                  "| direct call | images | throughput img/s | p50 s | p95 s | p99 s |", "|---|---|---|---|---|---|"]
        for r in res["direct"]:
            lines.append(f"| batch {r['batch']} | {r['images']} | {r['throughput']:.2f} | {r['p50']:.3f} | "
                         f"{r['p95']:.3f} | {r['p99']:.3f} |")
    d = {r["batch"]: r for r in res.get("direct") or []}
    if len(d) >= 2 and min(d) == 1:
        gains = ", ".join(f"batch {b}: {d[b]['throughput'] / d[1]['throughput']:.2f}x" for b in sorted(d) if b > 1)
        lines += ["", f"Direct calls give these multiples of the batch-1 images per second ({gains}): that is "
                  "about the most batching can add on this machine with this thread count, because the built-in model "
                  "is small enough that batch-1 calls are only partly overhead and mostly arithmetic. The service "
                  "at concurrency 1 pays HTTP, queue and worker hand-offs on top of the batch-1 call."]
    if not m.get("device_name"):
        lines += ["", "Not measured here: the same benchmark on a GPU. On a CUDA machine the same command runs "
                  "the service's worker and the direct baseline on the GPU; `python benchmarks/load.py --url "
                  "http://HOST:PORT --label gpu` measures a running GPU service."]
    lines.append(END)
    return "\n".join(lines) + "\n"


def headline(res: dict[str, Any]) -> list[Headline]:
    """The summary's rows: what batching gains under load (concurrency 16 against 1), per max batch."""
    m = res["meta"]
    machine = m.get("device_name") or cpu(m["cpu"], m["cores"], m.get("load_avg"))
    on = f"{machine}, {m['worker_threads']} worker thread(s)"
    return [Headline(f"service under load, built-in model, batching on (max batch {t['batch']}), {m['steps']} steps",
                     f"{t['c16']:.2f} img/s at concurrency 16 against {t['c1']:.2f} at 1: **{t['ratio']:.2f}x** "
                     "(target >= 1.5x)", on, day(m["date"])) for t in res.get("targets") or []]


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    write_section(START, END, render(res), path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="concurrency 1 and 4, few requests (development)")
    p.add_argument("--url", default=None, help="measure this running service instead of starting one")
    p.add_argument("--label", default=None, help="name of the --url setting in the report")
    p.add_argument("--api-key", default=os.environ.get("CLUSCA_API_KEY"))
    p.add_argument("--concurrency", default=None, help="comma-separated levels (default 1,4,16,64)")
    p.add_argument("--batch", default="8", help="CLUSCA_MAX_BATCH of the batching-on run(s), comma-separated (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=None, help="requests per client per level (default 4; quick 2)")
    p.add_argument("--min-requests", type=int, default=None, help="fewest requests per level (default 24; quick 6)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--passes", type=int, default=None, help="passes over all levels (default 3; quick 1)")
    p.add_argument("--cache", default="balanced", choices=["off", "quality", "balanced", "fast"])
    p.add_argument("--weights", default=None, help="built-in model checkpoint (default: the shipped weights)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process baseline")
    p.add_argument("--device", default=None,
                   help="device of the in-process baseline (default: cuda when available, as the service's worker)")
    p.add_argument("--worker-threads", type=int, default=1,
                   help="torch threads of the service's worker (OMP_NUM_THREADS); keep equal to --threads")
    p.add_argument("--timeout", type=float, default=600.0, help="client timeout per request, seconds")
    p.add_argument("--no-direct", action="store_true", help="skip the in-process baseline")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--json", default=str(RESULTS / "load.json"),
                   help="where the raw results go (default: benchmarks/results/load.json)")
    p.add_argument("--from-json", default=None, help="rewrite the docs section from saved results; run nothing")
    a = p.parse_args(argv)
    try:
        levels = a.concurrency or ("1,4" if a.quick else "1,4,16,64")
        a.concurrency = [int(x) for x in levels.split(",") if x.strip()]
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {a.concurrency!r}")
    if not a.concurrency or min(a.concurrency) < 1:
        p.error("--concurrency levels must be positive")
    a.rounds = a.rounds or (2 if a.quick else 4)
    a.passes = a.passes or (1 if a.quick else 3)
    a.min_requests = a.min_requests or (6 if a.quick else 24)
    try:
        a.batch = [int(x) for x in str(a.batch).split(",") if x.strip()]
    except ValueError:
        p.error(f"--batch must be comma-separated integers, got {a.batch!r}")
    if not a.batch or min(a.batch) < 2:
        p.error("--batch values must be at least 2 (1 is the batching-off run)")
    if min(a.steps, a.rounds, a.min_requests, a.threads, a.worker_threads, a.passes) < 1:
        p.error("--steps, --rounds, --min-requests, --threads and --worker-threads must be at least 1")
    return a


def _device_name(device: str) -> str | None:
    """The GPU's name when the direct baseline runs on one (the service picks the same device)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return f"GPU {torch.cuda.get_device_name(torch.device(device))}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.from_json:
        write_docs(json.loads(Path(a.from_json).read_text()))
        return 0
    if a.device is None:
        a.device = "cpu"
        if not a.url:
            import torch

            a.device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict[str, Any] = {"meta": {
        "argv": " ".join(sys.argv[1:] if argv is None else argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "steps": a.steps,
        "cache": a.cache, "batch": a.batch, "threads": a.threads, "worker_threads": a.worker_threads,
        "passes": a.passes, "load_avg": round(os.getloadavg()[0], 2), "device": a.device,
        "device_name": _device_name(a.device),
    }, "service": {}}
    if a.url:
        res["service"][a.label or a.url] = bench_service(a.url.rstrip("/"), a, a.label or a.url)
    else:
        settings = [("batching off (max batch 1)", 1)] + [(f"batching on (max batch {b})", b) for b in a.batch]
        for label, max_batch in settings:
            serve = Serve(max_batch, a.batch_wait_ms, a.weights, free_port(), a.worker_threads)
            try:
                t0 = time.perf_counter()
                serve.wait_ready()
                print(f"[{label}] ready after {time.perf_counter() - t0:.1f}s", flush=True)
                res["service"][label] = bench_service(serve.url, a, label)
            finally:
                serve.stop()
        res["targets"] = []
        for b in a.batch:
            by_c = {r["concurrency"]: r for r in res["service"][f"batching on (max batch {b})"]}
            if 1 in by_c and 16 in by_c and by_c[1]["throughput"] > 0:
                res["targets"].append({"batch": b, "c1": by_c[1]["throughput"], "c16": by_c[16]["throughput"],
                                       "ratio": by_c[16]["throughput"] / by_c[1]["throughput"]})
    if not a.no_direct and not a.url:
        res["direct"] = bench_direct(a)
    for t in res.get("targets") or []:
        print(f"target, max batch {t['batch']}: throughput c16 / c1 = {t['ratio']:.2f}x "
              f"({'met' if t['ratio'] >= 1.5 else 'NOT met'})")
    print(f"wrote {save(res, a.json)}")
    if not a.no_docs:
        write_docs(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA adapters in the service: what switching costs, and what mixing adapters in a batch costs.

Two measurements on the built-in model, on this CPU:

* **Switch cost**, in-process through the worker's own code path (``load_runner`` with an
  adapter store, then ``Runner.run``): a *cold* switch loads an adapter into a slot (file read,
  checks, copy into the bank), a *warm* one selects an adapter already loaded. Each is timed
  as the call's ``adapter_load_s`` and as the call's latency against a call without adapters.
* **Throughput**, through a whole service (private Redis, one built-in worker batching up to
  ``--batch`` jobs, one API): ``--jobs`` jobs submitted by ``--concurrency`` synchronous clients,
  once all naming one adapter, once each naming one of ``--adapters`` adapters in turn (all of
  which fit the worker's slots). Jobs with different adapters share batches (the bank gathers
  each sample's own), so the mixed load should keep most of the one-adapter throughput: the
  goal is at least 0.8x.

The adapters are random rank-``--rank`` LoRAs on every attention and feed-forward linear of
the model (what the figures depend on is their size and count, not what they draw). Prints a
table, saves the raw results (``--json``, default benchmarks/results/adapters_service.json)
and renders the "Service: LoRA adapters" section of docs/benchmarks.md from them alone
(``--no-write`` to skip, ``--docs`` for another file; ``--from-json`` renders a saved file
again without measuring).

    python benchmarks/adapters_service.py
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, write_section, written_by  # noqa: E402
from benchmarks._results import RESULTS, load, quoted_command, save  # noqa: E402
from benchmarks._service import stop_all, wait_until_ready  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402

START, END = "<!-- adapters-service:start -->", "<!-- adapters-service:end -->"
TOPIC = "service"
GOAL = 0.8
PROMPT = "a red circle on the left"


def write_adapters(folder: Path, names: list[str], rank: int) -> None:
    """Random LoRAs of ``rank`` on the built-in model's targetable layers, one file each."""
    import re

    import torch
    from safetensors.torch import save_file

    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
    from service.registry import FLUX_LORA_TARGETS

    transformer = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR).transformer
    patterns = [re.compile(t) for t in FLUX_LORA_TARGETS]
    layers = {n: m for n, m in transformer.named_modules()
              if isinstance(m, torch.nn.Linear) and any(p.fullmatch(n) for p in patterns)}
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        g = torch.Generator().manual_seed(k)
        tensors = {}
        for n, m in layers.items():
            tensors[f"transformer.{n}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            tensors[f"transformer.{n}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1 / rank ** 0.5
        save_file(tensors, str(folder / f"{name}.safetensors"))


# ---------------------------------------------------------------------------- switch cost
def switch_cost(root: Path, names: list[str], steps: int, repeats: int) -> dict[str, Any]:
    """Cold and warm switches through the worker's runner: load time and call latency."""
    from clusca.config import ClusCaConfig

    from service.adapters.store import AdapterStore
    from service.contract import AdapterUse, JobRequest
    from service.registry import builtin_entry
    from service.worker.adapters import AdapterSource
    from service.worker.runners import load_runner
    from service.worker.runners.base import Batch

    entry = builtin_entry()
    entry.adapters.slots = max(len(names), 2)
    source = AdapterSource(AdapterStore(root, 1 << 30, shipped=root / "none"), 1024.0, "bench")
    runner = load_runner(entry, "cpu", 1, source)
    cache = ClusCaConfig.from_dict({"preset": "off"})

    def call(adapters: tuple[AdapterUse, ...]) -> tuple[float, float]:
        req = JobRequest(prompt=PROMPT, width=32, height=32, steps=steps, guidance=entry.defaults.guidance, seed=1,
                         cache=cache, adapters=adapters)
        t0 = time.perf_counter()
        out = runner.run(Batch.of([req]), lambda _i: False)
        return time.perf_counter() - t0, out.adapter_load_s

    call(())  # one more warm-up of the call path
    base = [call(())[0] for _ in range(repeats)]
    cold, cold_load, warm, warm_load = [], [], [], []
    for name in names[:repeats]:
        runner.adapters._forget(name)  # noqa: SLF001 - a cold switch: not in a slot
        s, load_s = call((AdapterUse(name),))
        cold.append(s)
        cold_load.append(load_s)
        s, load_s = call((AdapterUse(name),))
        warm.append(s)
        warm_load.append(load_s)
    return {"base_s": base, "cold_s": cold, "cold_load_s": cold_load, "warm_s": warm, "warm_load_s": warm_load,
            "slots": runner.adapters.slots, "layers": len(runner.adapters.shapes or {})}


# ---------------------------------------------------------------------------- throughput
class Stack:
    """Redis + one built-in worker + the API, as separate processes, over an adapters folder."""

    def __init__(self, root: Path, batch: int, slots: int):
        from service.broker.embedded import EmbeddedRedis, free_port

        self.tmp = Path(tempfile.mkdtemp(prefix="clusca-adapters-"))
        (self.tmp / "models.yaml").write_text(f"models:\n  - name: shapes\n    kind: builtin\n"
                                             f"    adapters: {{slots: {slots}}}\n")
        self.redis = EmbeddedRedis().start()
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "REDIS_URL": self.redis.url, "CLUSCA_MODELS": str(self.tmp / "models.yaml"),
               "CLUSCA_ADAPTERS_DIR": str(root), "CLUSCA_MAX_BATCH": str(batch), "CLUSCA_WORKER_METRICS_PORT": "0",
               "CLUSCA_LOG_LEVEL": "WARNING", "CLUSCA_SYNC_TIMEOUT_S": "600", "PYTHONPATH": str(ROOT)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.procs = [subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], cwd=ROOT, env=env),
                      subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--port",
                                        self.url.rsplit(":", 1)[1]], cwd=ROOT, env=env)]
        if not wait_until_ready(self.url, 300, poll_s=0.2, request_timeout_s=1, exited=self._exited):
            self.close()
            raise RuntimeError("the service did not become ready")

    def _exited(self) -> str | None:
        dead = [p for p in self.procs if p.poll() is not None]
        return f"a service process exited ({dead[0].returncode})" if dead else None

    def close(self) -> None:
        stop_all(self.procs, self.redis)


def load_run(url: str, picks: list[str], jobs: int, concurrency: int, steps: int) -> dict[str, Any]:
    """``jobs`` synchronous jobs from ``concurrency`` clients, job k naming ``picks[k % len(picks)]``."""
    def one(k: int) -> dict[str, Any]:
        with httpx.Client(base_url=url, timeout=600) as c:
            r = c.post("/generate", json={"prompt": PROMPT, "seed": k, "steps": steps, "cache": {"preset": "off"},
                                          "adapters": [{"name": picks[k % len(picks)]}]})
            r.raise_for_status()
            body = r.json()
            if body["status"] != "succeeded":
                raise RuntimeError(f"job {k}: {body.get('error')}")
            return {"batch_images": body["batch_images"], "adapter_load_s": body["adapter_load_s"]}

    # The adapters of this load, once each, off the clock: their first load is the switch cost above.
    for name in picks:
        with httpx.Client(base_url=url, timeout=600) as c:
            c.post("/generate", json={"prompt": PROMPT, "seed": 0, "steps": 2, "adapters": [{"name": name}]})
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, range(jobs)))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "jobs": jobs, "jobs_per_s": jobs / seconds,
            "mean_batch": statistics.mean(d["batch_images"] for d in done),
            "loads": sum(1 for d in done if d["adapter_load_s"])}


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    names = [f"style{k}" for k in range(args.adapters)]
    root = Path(tempfile.mkdtemp(prefix="clusca-adapters-store-"))
    write_adapters(root / "shapes", names, args.rank)
    load_avg = round(os.getloadavg()[0], 2)
    switch = switch_cost(root, names, args.steps, args.repeats)
    print(f"switch: cold {statistics.median(switch['cold_load_s']) * 1000:.1f} ms load, "
          f"warm {statistics.median(switch['warm_load_s']) * 1000:.2f} ms", flush=True)
    stack = Stack(root, args.batch, max(args.adapters, 2))
    try:
        one = load_run(stack.url, names[:1], args.jobs, args.concurrency, args.steps)
        print(f"one adapter: {one['jobs_per_s']:.2f} jobs/s", flush=True)
        mixed = load_run(stack.url, names, args.jobs, args.concurrency, args.steps)
        print(f"mixed ({args.adapters} adapters): {mixed['jobs_per_s']:.2f} jobs/s", flush=True)
    finally:
        stack.close()
    return {"meta": {"argv": " ".join(quoted_command(argv)), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "cores": os.cpu_count(), "machine": platform.machine(), "load_avg": load_avg,
                     "rank": args.rank, "adapters": args.adapters, "steps": args.steps, "jobs": args.jobs,
                     "concurrency": args.concurrency, "batch": args.batch, "repeats": args.repeats},
            "switch": switch, "one_adapter": one, "mixed": mixed}


# ---------------------------------------------------------------------------- report
def ratio(res: dict[str, Any]) -> float:
    """Mixed-adapter throughput over one-adapter throughput."""
    return res["mixed"]["jobs_per_s"] / res["one_adapter"]["jobs_per_s"]


def switch_ms(res: dict[str, Any]) -> tuple[float, float]:
    """Median cold and warm switch (adapter load) time, in milliseconds."""
    s = res["switch"]
    return statistics.median(s["cold_load_s"]) * 1000, statistics.median(s["warm_load_s"]) * 1000


def headline(res: dict[str, Any]) -> list[Headline]:
    m = res["meta"]
    cold, warm = switch_ms(res)
    on, when = cpu(m["machine"], m["cores"], m.get("load_avg")), day(m["date"])
    return [Headline(f"LoRA adapters: mixed-adapter throughput over one adapter, concurrency {m['concurrency']} "
                     f"(goal {GOAL}x)", f"**{ratio(res):.2f}x**", on, when),
            Headline(f"LoRA adapter switch on the built-in model (rank {m['rank']}): cold load, warm",
                     f"{cold:.1f} ms, {warm:.2f} ms", on, when)]


def render(res: dict[str, Any]) -> str:
    m, s = res["meta"], res["switch"]
    cold, warm = switch_ms(res)
    base = statistics.median(s["base_s"])
    one, mixed = res["one_adapter"], res["mixed"]
    met = "met" if ratio(res) >= GOAL else "missed"
    lines = [
        START, "## Service: LoRA adapters", "",
        f"{written_by('adapters_service.py', m['argv'], m['date'])}, on {m['cores']} CPU core(s), {m['machine']} "
        f"(1-minute load average {m['load_avg']} at the start). The built-in model, 32x32, {m['steps']} steps, "
        f"cache off; random rank-{m['rank']} adapters on its {s['layers']} attention and feed-forward linears.", "",
        "| switch | adapter load ms (median) | call s (median) |", "|---|---|---|",
        f"| no adapter | – | {base:.3f} |",
        f"| cold: load into a slot | {cold:.1f} | {statistics.median(s['cold_s']):.3f} |",
        f"| warm: already in a slot | {warm:.2f} | {statistics.median(s['warm_s']):.3f} |", "",
        "The load column is what a switch adds to its call (timed inside it); the call column is single calls' "
        "wall time, as noisy as the machine's load.", "",
        f"Throughput through the service: {m['jobs']} synchronous jobs from {m['concurrency']} clients, one worker "
        f"batching up to {m['batch']} jobs, every adapter already loaded once.", "",
        "| load | jobs/s | mean batch (images) |", "|---|---|---|",
        f"| one adapter | {one['jobs_per_s']:.2f} | {one['mean_batch']:.2f} |",
        f"| {m['adapters']} adapters in turn | {mixed['jobs_per_s']:.2f} | {mixed['mean_batch']:.2f} |", "",
        f"Mixed over one adapter: **{ratio(res):.2f}x** (goal {GOAL}x: {met}). Jobs with different adapters share "
        "batches: the bank gathers each image's own adapters, so mixing costs the gather, not smaller batches. A cold "
        "switch is paid once per adapter and slot (reading the file and copying it in); pinned adapters pay it at "
        "start.", END]
    return "\n".join(lines) + "\n"


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    write_section(START, END, render(res), path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapters", type=int, default=4, help="adapters of the mixed load (all fit the slots)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--jobs", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--json", type=Path, default=RESULTS / "adapters_service.json")
    p.add_argument("--from-json", type=Path, help="render a saved results file; measure nothing")
    p.add_argument("--docs", type=Path, default=DOCS)
    p.add_argument("--no-write", action="store_true", help="leave the docs as they are")
    a = p.parse_args(argv)
    if a.from_json:
        res = load(a.from_json)
    else:
        res = measure(a, argv)
        print(f"wrote {save(res, a.json)}")
    cold, warm = switch_ms(res)
    print(f"switch: cold {cold:.1f} ms, warm {warm:.2f} ms; mixed / one adapter throughput: {ratio(res):.2f}x "
          f"(goal {GOAL}x)")
    if not a.no_write:
        write_docs(res, a.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which torch thread count a CPU worker should default to on a busy machine.

    python benchmarks/thread_default.py [--rounds 4] [--load 1] [--threads 1,2] [--steps 10]

Loads the built-in model the way a worker does (its registry entry, ``load_runner``) and
times one uncached image at its default size (``--steps`` steps), alternating torch's own default
thread count with each of ``--threads`` in every round (the order rotates), while
``--load`` busy processes compete for the cores as other work on a shared machine does.
Prints the median and spread of wall time and CPU time per thread count, saves the raw
times to benchmarks/results/thread_default.json and renders the "Built-in model: torch
threads on a busy machine" section of docs/benchmarks.md from that file.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, write_section  # noqa: E402
from benchmarks._results import RESULTS, parsed_and_results  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402

TOPIC = "builtin"
START, END = "<!-- thread-default:start -->", "<!-- thread-default:end -->"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (one image per thread count each)")
    ap.add_argument("--load", type=int, default=1, help="busy background processes while measuring (0: none)")
    ap.add_argument("--steps", type=int, default=10,
                    help="denoising steps (default 10, a quarter of the model's: the default thread count "
                         "can take 20 s an image on a busy machine, and the run should stay near two minutes)")
    ap.add_argument("--threads", default="1,2", help="thread counts to compare with torch's default")
    ap.add_argument("--json", default=str(RESULTS / "thread_default.json"), help="where the raw results go")
    ap.add_argument("--from-json", help="render the docs from these saved results instead of measuring")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite docs/benchmarks.md")
    return ap.parse_args(argv)


def measure(a: argparse.Namespace, argv: list[str]) -> dict[str, Any]:

    import torch

    from clusca import ClusCaConfig
    from service.registry import Registry
    from service.worker.runners import Batch, load_runner

    default = torch.get_num_threads()
    counts = [default] + [n for n in (int(t) for t in a.threads.split(",")) if n != default]
    labels = {n: f"{n} (torch's default)" if n == default else str(n) for n in counts}
    entry = Registry.load(None).get("shapes")
    runner = load_runner(entry, "cpu")
    d = entry.defaults
    batch = Batch(prompts=["a red circle on the left"], negative_prompts=None, seeds=[7], width=d.width,
                  height=d.height, steps=a.steps, guidance=d.guidance, cache=ClusCaConfig.preset("off"))

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
    wall: dict[int, list[float]] = {n: [] for n in counts}
    cpu: dict[int, list[float]] = {n: [] for n in counts}
    try:
        time.sleep(1.0)  # let the load settle on the cores
        for r in range(a.rounds):
            for n in counts[r % len(counts):] + counts[:r % len(counts)]:
                torch.set_num_threads(n)
                c0, t0 = time.process_time(), time.perf_counter()
                runner.run(batch, lambda step: False)
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
                print(f"round {r + 1}: {n} thread(s) {wall[n][-1]:.2f} s", file=sys.stderr, flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return {"meta": {"argv": shlex.join(argv), "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                     "machine": platform.machine(), "load_avg": round(os.getloadavg()[0], 1), "busy": a.load,
                     "rounds": a.rounds, "steps": batch.steps, "size": f"{d.width}x{d.height}", "default": default},
            "runs": [{"threads": n, "label": labels[n], "wall_s": wall[n], "cpu_s": cpu[n]} for n in counts]}


def _by_threads(res: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["threads"]: r for r in res["runs"]}


def headline(res: dict[str, Any]) -> list[Headline]:
    m, runs = res["meta"], _by_threads(res)
    one, default = runs[1], runs[m["default"]]
    return [Headline(f"built-in model on a busy CPU: one uncached image, {m['steps']} steps",
                     f"**{statistics.median(one['wall_s']):.2f} s** on one torch thread (the default) against "
                     f"{statistics.median(default['wall_s']):.2f} s on torch's default of {m['default']}",
                     cpu(m["machine"], m["cores"], m.get("load_avg")), day(m["date"]))]


def render(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = [START, "## Built-in model: torch threads on a busy machine", "",
             f"`python benchmarks/thread_default.py {m['argv']}` on {m['cores']} CPU cores ({m['machine']}), "
             f"{m['date']}, beside {m['busy']} busy process(es) (1-minute load average {m['load_avg']} at the end): "
             f"one uncached {m['size']} image of {m['steps']} steps per thread count and round, {m['rounds']} rounds, "
             "the order rotating. Medians, with the range in brackets.", "",
             "| torch threads | wall | CPU time |", "|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['label']} | {statistics.median(r['wall_s']):.2f} s ({min(r['wall_s']):.2f}-"
                     f"{max(r['wall_s']):.2f}) | {statistics.median(r['cpu_s']):.2f} s |")
    lines += ["", "With another process on the cores, threads that wait for each other spin; one thread per "
              "worker holds its speed, so it is the workers' default (`CLUSCA_TORCH_THREADS=1`; 0 keeps torch's "
              "own default, right for a machine the worker has to itself).", END]
    return "\n".join(lines)


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    write_section(START, END, render(res), path)


def main(argv: list[str] | None = None) -> int:
    args, res = parsed_and_results(argv, parse_args, measure)
    for r in res["runs"]:
        print(f"  {r['label']:>22} thread(s): wall median {statistics.median(r['wall_s']):.2f} s "
              f"(min {min(r['wall_s']):.2f}, max {max(r['wall_s']):.2f}), CPU median {statistics.median(r['cpu_s']):.2f} s")
    if not args.no_write:
        write_docs(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

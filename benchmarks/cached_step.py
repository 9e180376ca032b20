"""What a cached step costs: operators dispatched, and wall clock against FLOPs.

On a GPU a cached step costs its operator count (each launch has a fixed price), not its
arithmetic. The same regime shows on a CPU with a model of FLUX depth at a tiny width:
19 dual + 38 single blocks, width 64, 256 image + 8 text tokens, batch 1, float32, one
torch thread, 50 steps under ``torch.inference_mode()``. This script measures it there:

* aten operators per step, counted by a ``TorchDispatchMode`` that increments once per
  dispatched operator (median over the run's cached steps, and over its full steps), for
  ClusCa ``fast``, TaylorSeer (``fast`` with mode ``taylorseer``) and FORA (mode ``fora``),
  each on the lean cached step and on the module hooks alone (``apply_clusca(lean=False)``);
* wall-clock speedup against an unhooked copy (median over rounds; in each round a whole
  uncached run and a whole cached run, alternating which goes first), next to the analytic
  FLOPs speedup: the ratio wall / FLOPs says how much of the saved arithmetic turns into time.
  Whole runs, not steps in lockstep: a run of this model takes seconds, so alternating runs
  already sees the same load, and an uncached step between two cached ones would evict the
  cache factors from the CPU caches, a cost no real generation pays (``--lockstep`` measures
  it anyway).

    python benchmarks/cached_step.py                 # ~2 minutes on one core
    python benchmarks/cached_step.py --runs 3 --no-docs
    python benchmarks/cached_step.py --from-json benchmarks/results/cached_step.json

Saves the raw results (``--json``, default benchmarks/results/cached_step.json) and renders its
marked section of docs/benchmarks.md (``--docs`` for another file) from them alone.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, print_targets, targets_line, write_section  # noqa: E402
from benchmarks._results import RESULTS, parsed_and_results, quoted_command  # noqa: E402
from benchmarks._sampling import EulerLoop, FluxInputs  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402
from clusca import ClusCaConfig, apply_clusca, clusca_run, remove_clusca, run_state  # noqa: E402

START, END = "<!-- cached-step:start -->", "<!-- cached-step:end -->"
TOPIC = "library"
TARGETS = {"clusca": 400, "taylorseer": 250, "fora": 250}
WALL_TARGET = 0.85


class OpCounter(TorchDispatchMode):
    """Counts every operator dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def build_proxy():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=19, num_single_layers=38, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
    ).eval()


def proxy_loop(model, steps: int) -> EulerLoop:
    """An Euler loop of the proxy: 16 x 16 latent tokens of 16 channels, 8 text tokens, no guidance."""
    return FluxInputs.random(side=16, text_tokens=8, text_dim=32, channels=16, pooled_dim=32,
                             guidance=None).loop(model, steps)


def count_ops(model, cfg: ClusCaConfig, steps: int) -> dict:
    """Operators per full and per cached step over one run."""
    loop = proxy_loop(model, steps)
    state = run_state(model)
    full, cached = [], []
    with torch.inference_mode(), clusca_run(model, cfg, num_inference_steps=steps) as run:
        for i in range(steps):
            counter = OpCounter()
            with counter:
                loop.step(i)
            (full if state.full else cached).append(counter.count)
        lean_steps = state.lean_steps
    return {"full": statistics.median(full), "cached": statistics.median(cached), "lean_steps": lean_steps,
            "cached_steps": run.stats.cached_steps, "flops_speedup": run.stats.flops_speedup}


def wall_round(model, plain, cfg: ClusCaConfig, steps: int, plain_first: bool, lockstep: bool) -> dict:
    """One round: the wall-clock ratio and the median step times (ms) of each kind."""
    a, b = proxy_loop(plain, steps), proxy_loop(model, steps)
    with torch.inference_mode(), clusca_run(model, cfg, num_inference_steps=steps):
        if lockstep:
            for i in range(steps):
                first, second = (a, b) if (i % 2 == 0) == plain_first else (b, a)
                first.step(i)
                second.step(i)
        else:
            for loop in ((a, b) if plain_first else (b, a)):
                for i in range(steps):
                    loop.step(i)
    full = set(cfg.full_steps(steps))
    cached_ms = statistics.median(t for i, t in enumerate(b.times) if i not in full) * 1000
    full_ms = statistics.median(t for i, t in enumerate(b.times) if i in full) * 1000
    return {"ratios": sum(a.times) / sum(b.times), "cpu_ratios": sum(a.cpu_times) / sum(b.cpu_times),
            "cached_ms": cached_ms,
            "full_ms": full_ms, "plain_ms": statistics.median(a.times[1:]) * 1000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--runs", type=int, default=9, help="interleaved wall-clock runs per method")
    p.add_argument("--preset", default="fast")
    p.add_argument("--lockstep", action="store_true", help="interleave the two runs step by step")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--json", type=Path, default=RESULTS / "cached_step.json", help="the raw results file")
    p.add_argument("--from-json", type=Path, default=None, help="render the docs section from this file; run nothing")
    p.add_argument("--docs", type=Path, default=DOCS, help="the file whose section is rewritten")
    return p.parse_args(argv)


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Operator counts of each (method, path), then wall clock and CPU time per round, unrounded."""
    torch.set_num_threads(1)
    meta = {"argv": shlex.join(quoted_command(argv, paths=("--json", "--docs"))),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
            "machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_avg": round(os.getloadavg()[0], 2), "steps": args.steps, "runs": args.runs, "preset": args.preset,
            "lockstep": args.lockstep}
    model = build_proxy()
    plain = copy.deepcopy(model)
    methods = [("clusca", ClusCaConfig.preset(args.preset)),
               ("taylorseer", ClusCaConfig.preset(args.preset, mode="taylorseer")),
               ("fora", ClusCaConfig.preset(args.preset, mode="fora"))]
    with torch.inference_mode():
        uncached = OpCounter()
        with uncached:
            proxy_loop(plain, args.steps).step(0)

    rows = []
    for lean in (True, False):
        apply_clusca(model, lean=lean)
        for name, cfg in methods:
            ops = count_ops(model, cfg, args.steps)
            assert not lean or ops["lean_steps"] == ops["cached_steps"], "a cached step left the lean path"
            rows.append({"method": name, "lean": lean, **ops, "ratios": [], "cpu_ratios": [], "cached_ms": [],
                         "full_ms": [], "plain_ms": []})
        remove_clusca(model)

    # Wall clock: every (method, path) once per round, rounds interleaved.
    for r in range(args.runs):
        for row in rows:
            apply_clusca(model, lean=row["lean"])
            cfg = dict(methods)[row["method"]]
            for key, value in wall_round(model, plain, cfg, args.steps, r % 2 == 0, args.lockstep).items():
                row[key].append(value)
            remove_clusca(model)
        print(f"round {r + 1}/{args.runs}: " + "  ".join(
            f"{row['method']}{'' if row['lean'] else '(hooks)'} {row['ratios'][-1]:.2f}x" for row in rows), flush=True)
    return {"meta": meta, "uncached_ops": uncached.count, "rows": rows}


def summarise(res: dict[str, Any]) -> tuple[float, list[str], list[tuple[str, bool]]]:
    """The median uncached step (ms), the table's lines and the targets, from the raw results."""
    plain_ms = statistics.median(t for row in res["rows"] for t in row["plain_ms"])
    header = ("| method | cached step path | aten ops / cached step | aten ops / full step | cached step (ms) | "
              "full step (ms) | FLOPs speedup | wall speedup | wall / FLOPs | CPU-time speedup | CPU time / FLOPs |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    lean = {}
    for row in res["rows"]:
        wall = statistics.median(row["ratios"])
        ratio = wall / row["flops_speedup"]
        cpu = statistics.median(row["cpu_ratios"])
        if row["lean"]:
            lean[row["method"]] = (row["cached"], ratio)
        lines.append(
            f"| {row['method']} | {'lean' if row['lean'] else 'module hooks'} | {row['cached']:.0f} | "
            f"{row['full']:.0f} | {statistics.median(row['cached_ms']):.2f} | {statistics.median(row['full_ms']):.2f} | "
            f"{row['flops_speedup']:.2f}x | {wall:.2f}x | {ratio:.3f} | {cpu:.2f}x | {cpu / row['flops_speedup']:.3f} |")
    targets = [(f"{m} aten ops per cached step <= {limit}", lean[m][0] <= limit) for m, limit in TARGETS.items()]
    targets.append((f"clusca wall / FLOPs >= {WALL_TARGET}", lean["clusca"][1] >= WALL_TARGET))
    return plain_ms, lines, targets


def headline(res: dict[str, Any]) -> list[Headline]:
    """The summary's rows: operators per cached step, and how much of the FLOPs gain the clocks keep."""
    m = res["meta"]
    lean = [row for row in res["rows"] if row["lean"]]
    on = cpu(m["machine"], m["cores"], m.get("load_avg"))
    keep = ", ".join(f"{row['method']} {statistics.median(row['ratios']) / row['flops_speedup']:.3f} / "
                     f"{statistics.median(row['cpu_ratios']) / row['flops_speedup']:.3f}" for row in lean)
    return [Headline("aten operators per cached step at FLUX depth (CPU proxy)",
                     ", ".join(f"{row['method']} {row['cached']:.0f}" for row in lean), on, day(m["date"])),
            Headline(f"wall / FLOPs and CPU time / FLOPs at FLUX depth, preset `{m['preset']}`", keep, on,
                     day(m["date"]))]


def render(res: dict[str, Any]) -> str:
    m = res["meta"]
    plain_ms, lines, targets = summarise(res)
    shared = (f" The {m['cores']} cores were shared with other work while this ran (1-minute load average "
              f"{m['load_avg']:.1f} when it began)." if m["load_avg"] > 1 else "")
    body = [START, "## Cached-step cost on the CPU proxy of FLUX depth", "",
            f"`python benchmarks/cached_step.py {m['argv']}`".replace(" `", "`"), "",
            f"FLUX architecture at FLUX depth (19 dual + 38 single blocks), width 64, random weights; "
            f"256 image + 8 text tokens, batch 1, float32, one torch thread, {m['steps']} steps, "
            f"preset `{m['preset']}`. Operators: a `TorchDispatchMode` counting each dispatched aten operator, "
            f"median over the run's steps (an uncached step: {res['uncached_ops']}). Wall clock: against an unhooked "
            f"copy, median of {m['runs']} rounds of one whole run each, alternating which goes first"
            f"{' (steps in lockstep)' if m['lockstep'] else ''}; an uncached step: {plain_ms:.2f} ms. "
            "CPU time is the process thread's, read beside the wall clock: on a shared machine it leaves out "
            f"the time other processes take the core, so it is the steadier of the two.{shared}", "", *lines, "",
            targets_line(targets), END]
    return "\n".join(body) + "\n"


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    write_section(START, END, render(res), path)


def main(argv: list[str] | None = None) -> int:
    args, res = parsed_and_results(argv, parse_args, measure)
    plain_ms, lines, targets = summarise(res)
    print(f"\nuncached step: {res['uncached_ops']} aten operators, {plain_ms:.2f} ms (median)")
    print("\n".join(lines))
    print_targets(targets)
    if not args.no_docs:
        write_docs(res, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

Results go to a marked section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import write_section  # noqa: E402
from clusca import ClusCaConfig, apply_clusca, clusca_run, remove_clusca, run_state  # noqa: E402

START, END = "<!-- cached-step:start -->", "<!-- cached-step:end -->"
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


class Loop:
    """One Euler flow-matching loop on the proxy, advanced a step at a time."""

    def __init__(self, model, steps: int, side: int = 16, text: int = 8) -> None:
        g = torch.Generator().manual_seed(1234)
        self.model = model
        self.x = torch.randn(1, side * side, 16, generator=g)
        self.enc = torch.randn(1, text, 32, generator=g)
        self.pooled = torch.randn(1, 32, generator=g)
        self.img_ids = torch.zeros(side * side, 3)
        self.img_ids[:, 1] = torch.arange(side).repeat_interleave(side)
        self.img_ids[:, 2] = torch.arange(side).repeat(side)
        self.txt_ids = torch.zeros(text, 3)
        self.sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
        self.times: list[float] = []
        self.cpu: list[float] = []  # the thread's CPU time per step: what load from other processes leaves alone

    def step(self, i: int) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        v = self.model(
            hidden_states=self.x, encoder_hidden_states=self.enc, pooled_projections=self.pooled,
            timestep=torch.full((1,), self.sigmas[i]), img_ids=self.img_ids, txt_ids=self.txt_ids, return_dict=False,
        )[0]
        self.x = self.x + (self.sigmas[i + 1] - self.sigmas[i]) * v
        self.times.append(time.perf_counter() - t0)
        self.cpu.append(time.thread_time() - c0)


def count_ops(model, cfg: ClusCaConfig, steps: int) -> dict:
    """Operators per full and per cached step over one run."""
    loop = Loop(model, steps)
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
    a, b = Loop(plain, steps), Loop(model, steps)
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
    return {"ratios": sum(a.times) / sum(b.times), "cpu_ratios": sum(a.cpu) / sum(b.cpu), "cached_ms": cached_ms,
            "full_ms": full_ms, "plain_ms": statistics.median(a.times[1:]) * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--runs", type=int, default=9, help="interleaved wall-clock runs per method")
    p.add_argument("--preset", default="fast")
    p.add_argument("--lockstep", action="store_true", help="interleave the two runs step by step")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)

    model = build_proxy()
    plain = copy.deepcopy(model)
    methods = [("clusca", ClusCaConfig.preset(args.preset)),
               ("taylorseer", ClusCaConfig.preset(args.preset, mode="taylorseer")),
               ("fora", ClusCaConfig.preset(args.preset, mode="fora"))]
    with torch.inference_mode():
        uncached = OpCounter()
        with uncached:
            Loop(plain, args.steps).step(0)

    rows = []
    for lean in (True, False):
        apply_clusca(model, lean=lean)
        for name, cfg in methods:
            ops = count_ops(model, cfg, args.steps)
            rows.append({"method": name, "lean": lean, **ops, "ratios": [], "cpu_ratios": [], "cached_ms": [], "full_ms": [],
                         "plain_ms": []})
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

    plain_ms = statistics.median(t for row in rows for t in row["plain_ms"])
    print(f"\nuncached step: {uncached.count} aten operators, {plain_ms:.2f} ms (median)")
    header = ("| method | cached step path | aten ops / cached step | aten ops / full step | cached step (ms) | "
              "full step (ms) | FLOPs speedup | wall speedup | wall / FLOPs | CPU-time speedup | CPU time / FLOPs |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    results = {}
    for row in rows:
        wall = statistics.median(row["ratios"])
        ratio = wall / row["flops_speedup"]
        cpu = statistics.median(row["cpu_ratios"])
        path = "lean" if row["lean"] else "module hooks"
        if row["lean"]:
            results[row["method"]] = (row["cached"], ratio)
        lines.append(
            f"| {row['method']} | {path} | {row['cached']:.0f} | {row['full']:.0f} | {statistics.median(row['cached_ms']):.2f} | "
            f"{statistics.median(row['full_ms']):.2f} | {row['flops_speedup']:.2f}x | {wall:.2f}x | {ratio:.3f} | "
            f"{cpu:.2f}x | {cpu / row['flops_speedup']:.3f} |")
        assert not row["lean"] or row["lean_steps"] == row["cached_steps"], "a cached step left the lean path"
    print("\n".join(lines))
    targets = [(f"{m} aten ops per cached step <= {limit}", results[m][0] <= limit) for m, limit in TARGETS.items()]
    targets.append((f"clusca wall / FLOPs >= {WALL_TARGET}", results["clusca"][1] >= WALL_TARGET))
    for name, ok in targets:
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    if not args.no_docs:
        body = [START, "## Cached-step cost on the CPU proxy of FLUX depth", "",
                f"`python benchmarks/cached_step.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"), "",
                f"FLUX architecture at FLUX depth (19 dual + 38 single blocks), width 64, random weights; "
                f"256 image + 8 text tokens, batch 1, float32, one torch thread, {args.steps} steps, "
                f"preset `{args.preset}`. Operators: a `TorchDispatchMode` counting each dispatched aten operator, "
                f"median over the run's steps (an uncached step: {uncached.count}). Wall clock: against an unhooked "
                f"copy, median of {args.runs} rounds of one whole run each, alternating which goes first"
                f"{' (steps in lockstep)' if args.lockstep else ''}; an uncached step: {plain_ms:.2f} ms. "
                "CPU time is the process thread's, read beside the wall clock: on a shared machine it leaves out "
                "the time other processes take the core, so it is the steadier of the two.", "", *lines, "",
                "Targets: " + "; ".join(f"{n}: {'met' if ok else 'not met'}" for n, ok in targets), END]
        write_section(START, END, "\n".join(body) + "\n")
        print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()

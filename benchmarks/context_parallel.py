"""Context parallelism (Ulysses) against one process: agreement, step time and collective time.

    python benchmarks/context_parallel.py                     # CPU: 2 gloo ranks, built-in model and FLUX-depth proxy
    python benchmarks/context_parallel.py --workloads flux_dev --device cuda --worlds 1,2,4,8 \\
        --side 64 --label gpu-1024                            # FLUX.1-dev size, 1024x1024 (64x64 latent tokens)
    python benchmarks/context_parallel.py --from-json benchmarks/results/context_parallel.json

Every workload runs on ``--worlds`` groups (spawned ranks, one torch thread each on the CPU;
1 is the one-process baseline, run the same way), each with every ``--modes`` entry: ``off``
(uncached), ``taylorseer`` and a ClusCa preset. Rank 0 records per-step wall time, the time
its collectives took (``clusca.parallel.collective_clock``), and the final output; against
the one-rank run of the same mode that gives the largest difference (the agreement), and for
the built-in model the PSNR of each cached image against the uncached one of its group.

Workloads: ``builtin`` (the shipped pipeline, two prompts with guidance), ``flux_depth`` (the
random-weight FLUX-depth CPU proxy of benchmarks/cached_step.py: 19 dual + 38 single blocks,
4 heads, 256 image tokens) and ``flux_dev`` (FLUX.1-dev's size, random weights, bfloat16:
a GPU workload; ``--side`` sets the latent side, 64 for 1024x1024, 128 for 2048x2048).
Saves the raw numbers to benchmarks/results/context_parallel[-LABEL].json and renders its
section of docs/benchmarks.md from that file.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, write_section  # noqa: E402
from benchmarks._results import RESULTS, load, save  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402

TOPIC = "library"
BUILTIN_PROMPTS = ["a red circle on the left", "a blue square at the top"]


def markers(label: str | None) -> tuple[str, str]:
    tag = f"context-parallel{'-' + label if label else ''}"
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="builtin,flux_depth")
    p.add_argument("--worlds", default="1,2", help="group sizes to run (1: the one-process baseline)")
    p.add_argument("--modes", default="off,taylorseer,fast")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--side", type=int, default=64, help="flux_dev: latent side (64: 1024x1024, 128: 2048x2048)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one group may take")
    p.add_argument("--label", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", default=None)
    p.add_argument("--no-docs", action="store_true")
    return p.parse_args(argv)


def _config(mode: str):
    from clusca import ClusCaConfig

    if mode in ("off", "fora", "taylorseer"):
        return ClusCaConfig(mode=mode) if mode == "off" else ClusCaConfig(mode=mode, interval=3, warmup=3, order=1)
    return ClusCaConfig.preset(mode)


def _flux_model(workload: str, side: int, device):
    import torch
    from diffusers import FluxTransformer2DModel

    from benchmarks._sampling import FluxInputs

    torch.manual_seed(0)
    if workload == "flux_depth":
        from benchmarks.cached_step import build_proxy

        model = build_proxy().to(device)
        inputs = FluxInputs.random(side=16, text_tokens=8, text_dim=32, channels=16, pooled_dim=32, guidance=None,
                                   device=device)
        return model, inputs
    dtype = torch.bfloat16
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model = model.to(device=device, dtype=dtype).eval()
    return model, FluxInputs.random(side=side, text_tokens=512, text_dim=4096, device=device, dtype=dtype)


def _run_flux(workload: str, args: dict, world: int, device) -> dict:
    import torch

    from benchmarks._sampling import sync_for
    from clusca import apply_clusca, clusca_run
    from clusca import parallel as cp

    model, inputs = _flux_model(workload, args["side"], device)
    apply_clusca(model)
    if world > 1:
        cp.enable_context_parallel(model, cp.ParallelDegree(ulysses=world))
    out = {}
    for mode in args["modes"]:
        cfg = _config(mode)
        loop = inputs.loop(model, args["steps"], sync=sync_for(device))
        cp.collective_clock().read()
        with torch.inference_mode(), clusca_run(model, cfg, num_inference_steps=args["steps"]) as run:
            loop.before_step = run.set_step
            loop.run()
        seconds, calls = cp.collective_clock().read()
        out[mode] = {"step_s": loop.times, "collective_s": seconds, "collectives": calls,
                     "output": loop.x.float().cpu(), "full_steps": run.stats.full_steps}
    return out


def _run_builtin(args: dict, world: int) -> dict:
    import torch

    from clusca import apply_clusca, clusca_run
    from clusca import parallel as cp
    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline

    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    pipe.set_progress_bar_config(disable=True)
    apply_clusca(pipe.transformer)
    if world > 1:
        cp.enable_context_parallel(pipe.transformer, cp.ParallelDegree(ulysses=world))
    out = {}
    for mode in args["modes"]:
        steps = args["steps"]
        times: list[float] = []
        last = [0.0]

        def on_end(_pipe, i, _t, kw):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            run.set_step(i + 1)
            return kw

        gens = [torch.Generator().manual_seed(7 + i) for i in range(len(BUILTIN_PROMPTS))]
        cp.collective_clock().read()
        with torch.inference_mode(), clusca_run(pipe.transformer, _config(mode), num_inference_steps=steps) as run:
            last[0] = time.perf_counter()
            images = pipe(prompt=BUILTIN_PROMPTS, num_inference_steps=steps, generator=gens, output_type="np",
                          callback_on_step_end=on_end).images
        seconds, calls = cp.collective_clock().read()
        out[mode] = {"step_s": times, "collective_s": seconds, "collectives": calls,
                     "output": torch.from_numpy(images), "full_steps": run.stats.full_steps}
    return out


def rank_main(rank: int, world: int, init: str, out: str, workload: str, args: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from clusca import parallel as cp

    if args["device"] == "cpu":
        torch.set_num_threads(1)
    device = cp.init_group(rank, world, init, timeout_s=args["timeout"], device=args["device"])
    try:
        res = _run_builtin(args, world) if workload == "builtin" else _run_flux(workload, args, world, device)
        if rank == 0:
            torch.save(res, out)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def run_group(workload: str, world: int, args: dict) -> dict:
    import torch

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.pt")
        init = f"file://{tmp}/rendezvous"
        procs = [ctx.Process(target=rank_main, args=(r, world, init, out, workload, args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args["timeout"]
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"{workload} on {world} rank(s) failed: exit codes {[p.exitcode for p in procs]}")
        return torch.load(out, weights_only=False)


def measure(args: argparse.Namespace, argv: list[str]) -> dict:
    import torch

    from clusca.quality import psnr

    worlds = [int(w) for w in args.worlds.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    if "off" not in modes:
        modes.insert(0, "off")
    opts = {"modes": modes, "steps": args.steps, "side": args.side, "device": args.device, "timeout": args.timeout}
    rows = []
    for workload in args.workloads.split(","):
        if args.device.startswith("cuda") and max(worlds) > torch.cuda.device_count():
            worlds = [w for w in worlds if w <= torch.cuda.device_count()]
        base: dict | None = None
        for world in worlds:
            print(f"{workload}: {world} rank(s)", file=sys.stderr, flush=True)
            res = run_group(workload, world, opts)
            base = base or res
            for mode in modes:
                r, b = res[mode], base[mode]
                steps = len(r["step_s"])
                row = {"workload": workload, "world": world, "mode": mode, "steps": steps,
                       "full_steps": r["full_steps"], "step_s": r["step_s"],
                       "collective_s_per_step": r["collective_s"] / max(1, steps),
                       "collectives_per_step": r["collectives"] / max(1, steps),
                       "max_abs_diff": float((r["output"] - b["output"]).abs().max())}
                if workload == "builtin" and mode != "off":
                    row["psnr_vs_uncached"] = psnr(res["off"]["output"].numpy(), r["output"].numpy())
                rows.append(row)
    meta = {"argv": shlex.join(argv), "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
            "machine": platform.machine(), "load_avg": round(os.getloadavg()[0], 1), "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
            "steps": args.steps, "side": args.side, "label": args.label}
    return {"meta": meta, "rows": rows}


def _mean_ms(row: dict) -> float:
    # The mean, not the median: with cached steps the median is a cached step, and the collective
    # time beside it is a mean over all steps too.
    return 1000 * statistics.fmean(row["step_s"])


WORKLOAD_TEXT = {"builtin": "built-in model (64 image tokens, guidance pair in one call)",
                 "flux_depth": "FLUX-depth CPU proxy (19 dual + 38 single blocks, 256 image tokens)",
                 "flux_dev": "FLUX.1-dev size, random weights, bfloat16"}


def _where(m: dict) -> str:
    return m["gpu"] or cpu(m["machine"], m["cores"], m.get("load_avg"))


def headline(res: dict) -> list[Headline]:
    m, rows = res["meta"], res["rows"]
    out = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == workload]
        top = max(r["world"] for r in mine)
        if top == 1:
            continue
        off1 = next(r for r in mine if r["world"] == 1 and r["mode"] == "off")
        offn = next(r for r in mine if r["world"] == top and r["mode"] == "off")
        worst = max(r["max_abs_diff"] for r in mine if r["world"] == top and r["mode"] in ("off", "fora", "taylorseer"))
        out.append(Headline(f"Ulysses-{top} against one process, {WORKLOAD_TEXT[workload].split(' (')[0]}",
                            f"uncached step {_mean_ms(offn):.1f} ms against {_mean_ms(off1):.1f} ms, collectives "
                            f"{1000 * offn['collective_s_per_step']:.1f} ms/step; largest difference (uncached, "
                            f"TaylorSeer) {worst:.1e}", _where(m), day(m["date"])))
    return out


def render(res: dict) -> str:
    m, rows = res["meta"], res["rows"]
    start, end = markers(m.get("label"))
    title = "## Context parallelism (Ulysses)" + (f", {m['label']}" if m.get("label") else "")
    lines = [start, title, "",
             f"`python benchmarks/context_parallel.py {m['argv']}` on {_where(m)}, {m['date']}: each group spawned "
             f"as separate processes ({'gloo, one torch thread per rank' if m['device'] == 'cpu' else 'nccl'}), "
             f"{m['steps']} steps; world 1 is the one-process baseline run the same way. Step time: rank 0's mean "
             "wall clock per step. Collectives: rank 0's time inside the all-to-all and gather calls per step. "
             "Difference: the largest absolute difference of the final output from the one-rank run of the same "
             "mode (images in [0, 1], latents as they are). Collective time includes waiting for the slower "
             "rank, which on a CPU shared with other work is most of it.", "",
             "| workload | ranks | mode | full steps | step (ms) | collectives (ms/step) | collectives/step "
             "| difference from 1 rank | PSNR vs uncached (dB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("psnr_vs_uncached")
        lines.append(f"| {r['workload']} | {r['world']} | {r['mode']} | {r['full_steps']} | {_mean_ms(r):.2f} | "
                     f"{1000 * r['collective_s_per_step']:.2f} | {r['collectives_per_step']:.0f} | "
                     f"{r['max_abs_diff']:.1e} | {'' if p is None else f'{p:.2f}'} |")
    lines.append(end)
    return "\n".join(lines)


def write_docs(res: dict, path: Path = DOCS) -> None:
    start, end = markers(res["meta"].get("label"))
    write_section(start, end, render(res), path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.from_json:
        res = load(Path(args.from_json))
    else:
        res = measure(args, argv)
        name = f"context_parallel{'-' + args.label if args.label else ''}.json"
        save(res, Path(args.json) if args.json else RESULTS / name)
    print(render(res))
    if not args.no_docs:
        write_docs(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of the built-in shapes model: load time, latency, adherence, ClusCa effect.

    python benchmarks/builtin_model.py [--weights DIR] [-n 200] [--no-write]

Prints the numbers and rewrites the "Built-in model" section of docs/benchmarks.md
(other sections of that file are left as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import write_section  # noqa: E402
from clusca.quality import psnr, ssim  # noqa: E402  (the yardstick of every benchmark)

START, END = "<!-- builtin-model:start -->", "<!-- builtin-model:end -->"


def generate(pipe, prompts, seed, steps, guidance, batch=25, run_cfg=None):
    """Eval images; with ``run_cfg`` each batch runs inside a ClusCa run."""
    import torch

    images, stats = [], []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))]
        kw = dict(generator=gens, output_type="np", num_inference_steps=steps, guidance_scale=guidance)
        if run_cfg is None:
            images += list(pipe(chunk, **kw).images)
        else:
            from clusca import clusca_run

            with clusca_run(pipe.transformer, run_cfg, num_inference_steps=steps) as run:
                images += list(pipe(chunk, **kw).images)
            stats.append(run.stats.to_dict())
    return images, stats


def latency(pipe, steps, guidance, repeats=10, run_cfg=None) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds of one batch-1 image.

    The CPU time does not grow when other processes share the cores, so it is the
    figure to compare between runs on a busy machine (with one torch thread it is an
    upper bound of the wall time on an idle core).
    """
    import torch

    def once():
        g = torch.Generator().manual_seed(0)
        t0, c0 = time.perf_counter(), time.process_time()
        if run_cfg is None:
            pipe("a red circle on the left", generator=g, num_inference_steps=steps, guidance_scale=guidance)
        else:
            from clusca import clusca_run

            with clusca_run(pipe.transformer, run_cfg, num_inference_steps=steps):
                pipe("a red circle on the left", generator=g, num_inference_steps=steps, guidance_scale=guidance)
        return time.perf_counter() - t0, time.process_time() - c0

    once()
    runs = [once() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None)
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--preset", default="balanced")
    p.add_argument("--threads", type=int, default=1, help="torch threads; with 1, CPU time is the compute time")
    p.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    import torch

    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
    from clusca_shapes.tools import checker, data

    import_s = time.perf_counter() - t0
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    pipe = ShapesFluxPipeline.from_pretrained(a.weights or WEIGHTS_DIR)
    load_s = time.perf_counter() - t0
    steps = a.steps or pipe.default_steps
    guidance = pipe.default_guidance if a.guidance is None else a.guidance
    n_params = sum(x.numel() for x in pipe.transformer.parameters()) + sum(x.numel() for x in pipe.text_encoder.parameters())

    items = data.eval_set(a.n)
    prompts, scenes = [t for t, _ in items], [s for _, s in items]
    res = {
        "cpu": platform.processor() or platform.machine(), "threads": a.threads, "params_M": round(n_params / 1e6, 2),
        "steps": steps, "guidance": guidance, "n_prompts": a.n,
        "import_s": round(import_s, 2), "load_s": round(load_s, 3),
    }
    wall, cpu = latency(pipe, steps, guidance)
    res["latency_s"], res["latency_cpu_s"] = round(wall, 3), round(cpu, 3)
    res["load_avg_1min"] = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    base, _ = generate(pipe, prompts, a.seed, steps, guidance)
    res["eval_s"] = round(time.perf_counter() - t0, 1)
    res["uncached"] = checker.summarise([checker.check(i, s) for i, s in zip(base, scenes)], scenes)

    try:
        from clusca import ClusCaConfig, apply_clusca, clusca_run, remove_clusca  # noqa: F401
    except Exception as exc:  # the cache library is optional for this benchmark
        res["clusca"] = f"not available: {type(exc).__name__}: {exc}"
    else:
        # The preset as the service runs it for this model (the checkpoint's own tuning on
        # top of the library's preset), and the library's (the paper's) for reference.
        from service.registry import builtin_entry

        entry = builtin_entry(a.weights)
        runs = {"clusca": entry.cache_config({"preset": a.preset})}
        if entry.defaults.cache_presets.get(a.preset):
            runs["clusca_paper"] = ClusCaConfig.preset(a.preset)
        apply_clusca(pipe.transformer)
        try:
            for key, cfg in runs.items():
                cached, stats = generate(pipe, prompts, a.seed, steps, guidance, run_cfg=cfg)
                summ = checker.summarise([checker.check(i, s) for i, s in zip(cached, scenes)], scenes)
                res[key] = {
                    "preset": a.preset if key == "clusca" else f"paper {a.preset}",
                    "config": {k: cfg.to_dict()[k] for k in ("mode", "interval", "order", "clusters", "gamma")},
                    "summary": summ,
                    "adherence_drop": round(res["uncached"]["adherence"] - summ["adherence"], 2),
                    "psnr_db": round(statistics.mean(psnr(x, y) for x, y in zip(base, cached)), 2),
                    "ssim": round(statistics.mean(ssim(x, y) for x, y in zip(base, cached)), 4),
                    **dict(zip(("latency_s", "latency_cpu_s"),
                               (round(x, 3) for x in latency(pipe, steps, guidance, run_cfg=cfg)))),
                    "stats_first_batch": {k: v for k, v in stats[0].items() if isinstance(v, (int, float))} if stats else {},
                }
        finally:
            remove_clusca(pipe.transformer)

    print(json.dumps(res, indent=2))
    if not a.no_write:
        write_docs(res)
    return 0


def _targets(res) -> list[str]:
    u = res["uncached"]
    lines = [
        "| target | goal | measured | ok |",
        "|---|---|---|---|",
        f"| adherence, uncached ({res['n_prompts']} prompts) | >= 85% | {u['adherence']}% | {'yes' if u['adherence'] >= 85 else 'NO'} |",
        f"| one 32x32 image, batch 1, {res['steps']} steps | <= 1.0 s | {res['latency_s']} s wall, {res['latency_cpu_s']} s CPU | "
        f"{'yes' if min(res['latency_s'], res['latency_cpu_s']) <= 1.0 else 'NO'} |",
        f"| pipeline load (after imports) | <= 3 s | {res['load_s']} s | {'yes' if res['load_s'] <= 3 else 'NO'} |",
    ]
    c = res.get("clusca")
    if isinstance(c, dict):
        lines.append(f"| adherence drop with ClusCa `{c['preset']}` | <= 3 points | {c['adherence_drop']} points | "
                     f"{'yes' if c['adherence_drop'] <= 3 else 'NO'} |")
    else:
        lines.append(f"| adherence drop with ClusCa | <= 3 points | {c} | NO |")
    return lines


def write_docs(res) -> None:
    u = res["uncached"]
    rows, notes = [], []
    if not isinstance(res.get("clusca"), dict):
        notes += ["", f"ClusCa: {res.get('clusca')}."]
    for key in ("clusca", "clusca_paper"):
        c = res.get(key)
        if not isinstance(c, dict):
            continue
        s = c["summary"]
        rows.append(f"| ClusCa `{c['preset']}` | {s['adherence']} | {s['colour']} | {s['shape']} | {s['position']} | "
                    f"{s['adherence_single']} | {s['adherence_pair']} |")
        cfg = ", ".join(f"{k} {v}" for k, v in c.get("config", {}).items())
        notes += [
            "",
            f"ClusCa `{c['preset']}` ({cfg}): PSNR {c['psnr_db']} dB, SSIM {c['ssim']} against the uncached "
            f"image of the same seed (mean over {res['n_prompts']} images); latency {c['latency_s']} s wall, "
            f"{c['latency_cpu_s']} s CPU (uncached {res['latency_s']} s wall, {res['latency_cpu_s']} s CPU); "
            "run stats of the first batch: "
            + ", ".join(f"{k}={round(v, 3)}" for k, v in c["stats_first_batch"].items() if k in
                        ("full_steps", "cached_steps", "token_fraction", "flops_speedup")) + ".",
        ]
    body = [
        START,
        "## Built-in model (shapes)",
        "",
        f"Written by `python benchmarks/builtin_model.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"CPU `{res['cpu']}`, {res['threads']} torch thread(s), no GPU. Model: {res['params_M']}M parameters, "
        f"{res['steps']} Euler steps, guidance {res['guidance']}; prompts: the fixed set "
        f"`clusca_shapes.tools.data.eval_set({res['n_prompts']})`, image i seeded {0}+i. `ClusCa balanced` is the "
        "preset as the service runs it for this model (the checkpoint's `cache_presets` tuning); "
        "`ClusCa paper balanced` is the library's preset, for reference.",
        "",
        *_targets(res),
        "",
        "| run | adherence | colour | shape | position | single object | two objects |",
        "|---|---|---|---|---|---|---|",
        f"| uncached | {u['adherence']} | {u['colour']} | {u['shape']} | {u['position']} | {u['adherence_single']} | {u['adherence_pair']} |",
        *rows,
        *notes,
        "",
        f"Import of torch + diffusers + the package: {res['import_s']} s (not part of the load time). "
        f"1-minute load average during the run: {res['load_avg_1min']} on {os.cpu_count()} cores "
        "(other processes shared the CPU, which inflates wall-clock times; CPU times are not affected).",
        END,
    ]
    write_section(START, END, "\n".join(body))


if __name__ == "__main__":
    sys.exit(main())

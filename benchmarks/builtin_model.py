"""Benchmark of the built-in shapes model: load time, latency, adherence per prompt form, ClusCa effect.

    python benchmarks/builtin_model.py [--weights DIR] [-n 400] [--seeds 2] [--paper] [--no-write]
    python benchmarks/builtin_model.py --from-json benchmarks/results/builtin_model.json

Every prompt of the fixed evaluation set is drawn with ``--seeds`` seeds, uncached and
with the cache preset the service runs for this model; the checker judges each image
(all-right rates and the edge measure, per prompt form). Saves the numbers (``--json``,
default benchmarks/results/builtin_model.json) and renders the "Built-in model" section of
docs/benchmarks.md (``--docs`` for another file) from them alone; other sections are left
as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, write_section, written_by  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402
from benchmarks._results import RESULTS, load, quoted_command, save  # noqa: E402
from clusca.quality import psnr, ssim  # noqa: E402  (the yardstick of every benchmark)

START, END = "<!-- builtin-model:start -->", "<!-- builtin-model:end -->"
TOPIC = "builtin"
SEED_STRIDE = 100_000  # seed round r draws image i with generator seed seed + r * SEED_STRIDE + i
LATENCY_PROMPT = "a red circle on the left"
TARGETS = {"one_object": 97.0, "relation": 80.0, "count": 80.0}
MAX_DROP = 2.0
MAX_LATENCY_S = 0.5


def generate(pipe, prompts, seed, steps, guidance, batch=25, run_cfg=None):
    """Eval images; image i uses the generator seeded ``seed + i``; with ``run_cfg`` each
    batch runs inside a ClusCa run."""
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
            pipe(LATENCY_PROMPT, generator=g, num_inference_steps=steps, guidance_scale=guidance)
        else:
            from clusca import clusca_run

            with clusca_run(pipe.transformer, run_cfg, num_inference_steps=steps):
                pipe(LATENCY_PROMPT, generator=g, num_inference_steps=steps, guidance_scale=guidance)
        return time.perf_counter() - t0, time.process_time() - c0

    once()
    runs = [once() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def latency_pair(pipe, steps, guidance, preset, weights, rounds=15) -> dict:
    """One image uncached and with the service's cache, alternating, ``rounds`` times each:
    medians of wall and CPU seconds, and the median of the per-round CPU ratios."""
    from clusca import apply_clusca, remove_clusca
    from service.registry import builtin_entry

    cfg = builtin_entry(weights).cache_config({"preset": preset})
    apply_clusca(pipe.transformer)
    try:
        latency(pipe, steps, guidance, repeats=1)
        pairs = [(latency(pipe, steps, guidance, repeats=1), latency(pipe, steps, guidance, repeats=1, run_cfg=cfg))
                 for _ in range(rounds)]
    finally:
        remove_clusca(pipe.transformer)
    med = statistics.median
    return {
        "rounds": rounds, "load_avg_1min": round(os.getloadavg()[0], 2),
        "uncached_s": round(med(u[0] for u, _ in pairs), 3), "uncached_cpu_s": round(med(u[1] for u, _ in pairs), 3),
        "cached_s": round(med(c[0] for _, c in pairs), 3), "cached_cpu_s": round(med(c[1] for _, c in pairs), 3),
        "cpu_speedup": round(med(u[1] / c[1] for u, c in pairs), 2),
    }


def evaluate(pipe, prompts, scenes, a, steps, guidance, run_cfg=None):
    """Images of every prompt under every seed round, judged; the summary is over all of them."""
    from clusca_shapes.tools import checker

    images, stats, per_seed = [], [], []
    for r in range(a.seeds):
        imgs, st = generate(pipe, prompts, a.seed + r * SEED_STRIDE, steps, guidance, run_cfg=run_cfg)
        images += imgs
        stats += st
        per_seed.append(checker.summarise([checker.check(i, s) for i, s in zip(imgs, scenes)], scenes)["adherence"])
    summary = checker.summarise([checker.check(i, s) for i, s in zip(images, scenes * a.seeds)], scenes * a.seeds)
    summary["adherence_per_seed"] = per_seed
    return images, stats, summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None)
    p.add_argument("-n", type=int, default=400, help="prompts of the fixed evaluation set")
    p.add_argument("--seeds", type=int, default=2, help="seed rounds: every prompt is drawn this many times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--preset", default="balanced")
    p.add_argument("--paper", action="store_true", help="also run the library's (the paper's) preset")
    p.add_argument("--threads", type=int, default=1, help="torch threads; with 1, CPU time is the compute time")
    p.add_argument("--no-write", action="store_true", help="do not touch the docs")
    p.add_argument("--latency-only", action="store_true",
                   help="only time one image, uncached and cached in alternation (prints, writes nothing)")
    p.add_argument("--json", type=Path, default=RESULTS / "builtin_model.json", help="the raw results file")
    p.add_argument("--from-json", type=Path, default=None, help="render the docs section from this file; run nothing")
    p.add_argument("--docs", type=Path, default=DOCS, help="the file whose section is rewritten")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.from_json:
        if not a.no_write:
            write_docs(load(a.from_json), a.docs)
        return 0

    t0 = time.perf_counter()
    import torch

    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
    from clusca_shapes.tools import data

    import_s = time.perf_counter() - t0
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    pipe = ShapesFluxPipeline.from_pretrained(a.weights or WEIGHTS_DIR)
    load_s = time.perf_counter() - t0
    steps = a.steps or pipe.default_steps
    guidance = pipe.default_guidance if a.guidance is None else a.guidance
    n_params = sum(x.numel() for x in pipe.transformer.parameters()) + sum(x.numel() for x in pipe.text_encoder.parameters())

    if a.latency_only:
        print(json.dumps(latency_pair(pipe, steps, guidance, a.preset, a.weights), indent=2))
        return 0
    items = data.eval_set(a.n)
    prompts, scenes = [t for t, _ in items], [s for _, s in items]
    res = {
        "argv": shlex.join(quoted_command(argv, paths=("--json", "--docs"), flags=("--no-write",))),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(), "preset": a.preset,
        "cpu": platform.processor() or platform.machine(), "threads": a.threads, "params_M": round(n_params / 1e6, 2),
        "steps": steps, "guidance": guidance, "n_prompts": a.n, "seeds": a.seeds, "seed": a.seed,
        "size": f"{pipe.default_size[1]}x{pipe.default_size[0]}",
        "import_s": round(import_s, 2), "load_s": round(load_s, 3),
    }
    wall, cpu = latency(pipe, steps, guidance)
    res["latency_s"], res["latency_cpu_s"] = round(wall, 3), round(cpu, 3)
    if (os.cpu_count() or 1) > a.threads:
        # The service leaves torch at its default, a thread per core: time that too.
        torch.set_num_threads(os.cpu_count())
        res["latency_all_cores_s"] = round(latency(pipe, steps, guidance)[0], 3)
        torch.set_num_threads(a.threads)
    res["load_avg_1min"] = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    base, _, res["uncached"] = evaluate(pipe, prompts, scenes, a, steps, guidance)
    res["eval_s"] = round(time.perf_counter() - t0, 1)

    try:
        from clusca import ClusCaConfig, apply_clusca, remove_clusca
    except Exception as exc:  # the cache library is optional for this benchmark
        res["clusca"] = f"not available: {type(exc).__name__}: {exc}"
    else:
        # The preset as the service runs it for this model (the checkpoint's own tuning on
        # top of the library's preset), and optionally the library's (the paper's).
        from service.registry import builtin_entry

        entry = builtin_entry(a.weights)
        runs = {"clusca": entry.cache_config({"preset": a.preset})}
        if a.paper and entry.defaults.cache_presets.get(a.preset):
            runs["clusca_paper"] = ClusCaConfig.preset(a.preset)
        apply_clusca(pipe.transformer)
        try:
            for key, cfg in runs.items():
                cached, stats, summ = evaluate(pipe, prompts, scenes, a, steps, guidance, run_cfg=cfg)
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
    print(f"wrote {save(res, a.json)}")
    if not a.no_write:
        write_docs(res, a.docs)
    return 0


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def _targets(res) -> list[str]:
    g = res["uncached"]["groups"]
    lines = ["| target | goal | measured | ok |", "|---|---|---|---|"]
    names = {"one_object": "one object, with or without a position", "relation": "two objects in a relation",
             "count": "counts (two or three alike)"}
    for key, goal in TARGETS.items():
        v = g.get(key, {}).get("adherence", 0.0)
        lines.append(f"| all right, {names[key]}, uncached | >= {goal:g}% | {v}% | {_yes(v >= goal)} |")
    c = res.get("clusca")
    if isinstance(c, dict):
        lines.append(f"| adherence lost with the service's default cache (`{c['preset']}`), all prompts | "
                     f"<= {MAX_DROP:g} points | {c['adherence_drop']} points | {_yes(c['adherence_drop'] <= MAX_DROP)} |")
    else:
        lines.append(f"| adherence lost with the service's default cache | <= {MAX_DROP:g} points | {c} | NO |")
    lat = min(res["latency_s"], res["latency_cpu_s"], res.get("latency_all_cores_s", float("inf")))
    all_cores = (f"; {res['latency_all_cores_s']} s wall on {res['cores']} threads (the service's default)"
                 if "latency_all_cores_s" in res else "")
    lines.append(f"| one {res['size']} image, batch 1, {res['steps']} steps, uncached | <= {MAX_LATENCY_S:g} s | "
                 f"{res['latency_s']} s wall, {res['latency_cpu_s']} s CPU on {res['threads']} thread(s)"
                 f"{all_cores} | {_yes(lat <= MAX_LATENCY_S)} |")
    u = res["uncached"]
    lines.append(f"| edges clean (found shapes neither ragged nor bleeding), uncached | reported | {u['clean']}% of "
                 f"{u['judged']} judged images | - |")
    return lines


def _form_rows(res) -> list[str]:
    u, c = res["uncached"], res.get("clusca")
    cs = c["summary"] if isinstance(c, dict) else None
    head = ("| form | images | all right | colour | count | shape | position | all right, cached | judged | "
            "clean | clean, cached | outline | roughness | stray px | touches frame |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    keys = [(f, u["forms"][f], (cs or {}).get("forms", {}).get(f)) for f in u["forms"]]
    keys += [(f"**{g}**", u["groups"][g], (cs or {}).get("groups", {}).get(g)) for g in u["groups"]]
    keys += [("**all**", u, cs)]
    for name, m, k in keys:
        # Edge figures describe the shapes found; with none found there is nothing to describe.
        def edge(x, key):
            return x[key] if x and x["judged"] else "-"

        rows.append(f"| {name} | {m['n']} | {m['adherence']} | {m['colour']} | {m['count']} | {m['shape']} | "
                    f"{m['position']} | {k['adherence'] if k else '-'} | {m['judged']} | {edge(m, 'clean')} | "
                    f"{edge(k, 'clean')} | {edge(m, 'outline')} | {edge(m, 'roughness')} | {edge(m, 'stray_px')} | "
                    f"{edge(m, 'touches_frame')} |")
    return rows


def headline(res: dict) -> list[Headline]:
    """The summary's rows: prompt adherence uncached and with the default cache, and one image's latency."""
    u, c = res["uncached"], res.get("clusca")
    on, date = cpu(res["cpu"], res["cores"]), day(res["date"])
    groups = ", ".join(f"{name.replace('_', ' ')} {u['groups'][key]['adherence']}%"
                       for key, name in (("one_object", "one object"), ("relation", "relations"), ("count", "counts"))
                       if key in u["groups"])
    cached = (f"; `{c['preset']}` {c['adherence_drop']} points lower, PSNR {c['psnr_db']} dB"
              if isinstance(c, dict) else "")
    all_cores = (f", {res['latency_all_cores_s']} s on {res['cores']} threads" if "latency_all_cores_s" in res else "")
    fast = f"; `{c['preset']}` {c['latency_s']} s" if isinstance(c, dict) else ""
    return [Headline(f"built-in model, prompt adherence ({res['n_prompts']} prompts x {res['seeds']} seeds)",
                     f"all right **{u['adherence']}%** ({groups}){cached}", on, date),
            Headline(f"built-in model, one {res['size']} image, {res['steps']} steps, batch 1",
                     f"**{res['latency_s']} s** uncached on {res['threads']} thread(s){all_cores}{fast}", on, date)]


def write_docs(res: dict, path: Path = DOCS) -> None:
    u = res["uncached"]
    notes = []
    if not isinstance(res.get("clusca"), dict):
        notes += ["", f"ClusCa: {res.get('clusca')}."]
    for key in ("clusca", "clusca_paper"):
        c = res.get(key)
        if not isinstance(c, dict):
            continue
        s = c["summary"]
        cfg = ", ".join(f"{k} {v}" for k, v in c.get("config", {}).items())
        notes += [
            "",
            f"ClusCa `{c['preset']}` ({cfg}): all right {s['adherence']}% (per seed round "
            f"{' / '.join(str(x) for x in s['adherence_per_seed'])}), {c['adherence_drop']} points below uncached; "
            f"PSNR {c['psnr_db']} dB, SSIM {c['ssim']} against the uncached image of the same seed (mean over "
            f"{s['n']} images); latency {c['latency_s']} s wall, {c['latency_cpu_s']} s CPU (uncached "
            f"{res['latency_s']} s wall, {res['latency_cpu_s']} s CPU); run stats of the first batch: "
            + ", ".join(f"{k}={round(v, 3)}" for k, v in c["stats_first_batch"].items() if k in
                        ("full_steps", "cached_steps", "token_fraction", "flops_speedup")) + ".",
        ]
    body = [
        START,
        "## Built-in model (shapes)",
        "",
        written_by("builtin_model.py", res["argv"], res["date"]) + "; "
        f"CPU `{res['cpu']}`, {res['threads']} torch thread(s), no GPU. Model: {res['params_M']}M parameters, "
        f"{res['steps']} Euler steps, guidance {res['guidance']}; prompts: the fixed set "
        f"`clusca_shapes.tools.data.eval_set({res['n_prompts']})` (six prompt forms), each drawn with "
        f"{res['seeds']} seeds (round r, image i: generator seed {res['seed']} + r x {SEED_STRIDE} + i), judged by "
        f"`clusca_shapes.tools.checker`. \"Cached\" is the service's default: the `{res['preset']}` preset as the "
        "service runs it for this model (the checkpoint's `cache_presets` tuning).",
        "",
        *_targets(res),
        "",
        "Per prompt form: all-right rates in percent of images; the edge figures (clean, outline, roughness, "
        "stray pixels and touches frame: percent or mean) are over the judged images, those with every requested "
        "colour found (clean: outline IoU >= 0.7, roughness <= 1.2, at most 6 stray pixels, not touching the "
        "frame):",
        "",
        *_form_rows(res),
        "",
        f"Uncached all right per seed round: {' / '.join(str(x) for x in u['adherence_per_seed'])}%.",
        *notes,
        "",
        f"Import of torch + diffusers + the package: {res['import_s']} s; pipeline load (after imports): "
        f"{res['load_s']} s. 1-minute load average during the run: {res['load_avg_1min']} on {res['cores']} cores "
        "(other processes shared the CPU, which inflates wall-clock times; CPU times are not affected).",
        END,
    ]
    write_section(START, END, "\n".join(body), path)


if __name__ == "__main__":
    sys.exit(main())

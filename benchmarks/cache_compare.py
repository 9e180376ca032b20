"""ClusCa against the other caches: speed, quality and memory, side by side.

    python benchmarks/cache_compare.py            # the full comparison (about 25 min on 2 CPU cores)
    python benchmarks/cache_compare.py --quick    # a few methods, small sizes (a couple of minutes)
    python benchmarks/cache_compare.py --from-json benchmarks/results/cache_compare.json   # docs and plot only

Two models, every method in the same process on the same prompts and seeds:

* the built-in shapes model (quality over a fixed prompt set: PSNR and SSIM against the
  uncached image of the same seed, prompt adherence from the model's checker; speed as
  measured FLOPs and wall-clock ratio against uncached, interleaved, median of repeats);
* a FLUX-architecture transformer with random weights and >= 1024 image tokens, called
  in a plain Euler loop (speed only: FLOPs and wall-clock ratio, and how far the final
  latent moves from the uncached one).

FLOPs are measured the same way for every method with torch's FLOP counter (matrix
multiplies and attention actually executed inside the transformer); for our own modes
the library's analytic estimate is shown next to it. Cache memory is the peak bytes of
cache tensors held for one request. Saves the raw results (``--json``, default
benchmarks/results/cache_compare.json), then prints the tables, rewrites its section of
docs/benchmarks.md (other sections are kept) and draws docs/pareto.png from them alone;
``--from-json`` does only the second part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import write_section, written_by  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402
from benchmarks._results import RESULTS, save  # noqa: E402

from benchmarks._metrics import dominators, pareto_front, psnr, ssim  # noqa: E402

START, END = "<!-- cache-compare:start -->", "<!-- cache-compare:end -->"
TOPIC = "library"
PSNR_CAP = 100.0  # identical images count as 100 dB so that means stay finite
TIE_DB = 0.1  # PSNR differences below this are reported as ties, not wins
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "pareto.png"


# ==================================================================== methods
def clusca_label(cfg: Any) -> str:
    """Short name of a ClusCa setting: N interval, K clusters, O order, g gamma."""
    out = f"N{cfg.interval} K{cfg.clusters} O{cfg.order} g{cfg.gamma:g}"
    if cfg.propagation != "paper" and cfg.order > 0:
        out += f" {cfg.propagation}"
    if not cfg.guidance_pairs:
        out += ", pairs off"
    return out


def builtin_methods(quick: bool, weights: str | Path | None = None) -> list:
    """Every setting compared on the built-in model.

    ``weights`` is the built-in checkpoint (default: the shipped one). Its own tuning of the
    named presets (``model_index.json`` key ``cache_presets``) makes the rows named
    ``ClusCa <preset>`` run exactly the settings the service resolves for that model;
    ``ClusCa paper <preset>`` rows run the library's (the paper's) presets.
    """
    from diffusers import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    from benchmarks._caches import Method
    from clusca import ClusCaConfig
    from service.registry import builtin_entry

    entry = builtin_entry(weights)
    model_presets = entry.defaults.cache_presets

    def cc(family: str = "ClusCa", name: str | None = None, **kw) -> Method:
        base = kw.pop("preset", None)
        cfg = ClusCaConfig.preset(base, **kw) if base else ClusCaConfig(**kw).validate()
        return Method(name or f"ClusCa {clusca_label(cfg)}", family, clusca=cfg)

    def model_preset(name: str) -> Method:
        cfg = entry.cache_config({"preset": name})  # exactly what the service runs
        return Method(f"ClusCa {name} ({clusca_label(cfg)})", "ClusCa presets", clusca=cfg,
                      note="this model's tuning" if name in model_presets else "")

    def paper_preset(name: str) -> Method:
        cfg = ClusCaConfig.preset(name)
        return Method(f"ClusCa paper {name} ({clusca_label(cfg)})", "ClusCa paper presets", clusca=cfg)

    def ts_diffusers(interval: int, lite: bool = False):
        # Same warm-up as our presets; factors kept in float32 like ours.
        return lambda env: TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=3, max_order=1,
            taylor_factors_dtype=None, use_lite_mode=lite,
        )

    def fbc(threshold: float):
        return lambda env: FirstBlockCacheConfig(threshold=threshold)

    def mag(threshold: float):
        return lambda env: MagCacheConfig(
            threshold=threshold, num_inference_steps=env.steps, mag_ratios=list(env.mag_ratios)
        )

    def pab(skip: int):
        return lambda env: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: env.timestep,
        )

    m = [Method("uncached", "uncached")]
    m += [model_preset(n) for n in ("quality", "balanced", "fast")]
    tuned = any(n in model_presets for n in ("quality", "balanced", "fast"))
    if tuned:
        m += [paper_preset(n) for n in ("quality", "balanced", "fast")]
    m += [
        cc("TaylorSeer", "TaylorSeer N5 O1", preset="balanced", mode="taylorseer"),
        cc("FORA", "FORA N4", preset="balanced", mode="fora", interval=4),
        Method("diffusers TaylorSeer N5 O1", "diffusers TaylorSeer", diffusers=ts_diffusers(5)),
        Method("diffusers FirstBlockCache t0.05", "diffusers FirstBlockCache", diffusers=fbc(0.05)),
    ]
    if quick:
        return m
    # Order 0 (reuse plus fresh tokens, no extrapolation): the base of this model's tuning.
    for n, k, g in ((4, 2, 0.0), (4, 8, 0.0), (4, 16, 0.0), (5, 2, 0.0), (5, 16, 0.0), (6, 4, 0.0),
                    (4, 4, 0.005), (5, 4, 0.05)):
        m.append(cc("ClusCa O0", preset="balanced", interval=n, clusters=k, gamma=g, order=0))
    # Order 1 with the paper's propagation, around its `balanced` setting.
    # K64 refreshes every image token of the built-in model: the feed-forward never cached.
    for kw in ({"interval": 3}, {"interval": 8}, {"clusters": 8}, {"clusters": 32}, {"clusters": 64}, {"gamma": 0.0},
               {"gamma": 0.05}, {"order": 2}):
        m.append(cc("ClusCa O1", preset="balanced", **kw))
    # `anchored` propagation: fresh tokens exact, not extrapolated further.
    for n in (3, 4, 5, 6):
        m.append(cc("ClusCa anchored", preset="balanced", interval=n, gamma=0.0, propagation="anchored"))
    m.append(cc("ClusCa anchored", preset="balanced", gamma=0.005, propagation="anchored"))
    m.append(cc("ClusCa anchored", preset="balanced", clusters=32, gamma=0.0, propagation="anchored"))
    # Guidance halves clustered on their own (the library before guidance pairs).
    m.append(cc("ClusCa pairs off", preset="balanced", guidance_pairs=False))
    m.append(cc("ClusCa pairs off", preset="balanced", gamma=0.0, propagation="anchored", guidance_pairs=False))
    m.append(cc("ClusCa pairs off", preset="balanced", interval=4, clusters=4, gamma=0.0, order=0,
                guidance_pairs=False))
    # The authors' fresh text tokens, which cannot change the output (docs/library.md): their cost.
    bal = model_preset("balanced")
    m.append(Method(f"ClusCa {clusca_label(bal.clusca)}, text refresh on", "ClusCa text refresh",
                    clusca=dataclasses.replace(bal.clusca, refresh_text=True)))
    for n in (3, 4, 6, 8):
        m.append(cc("TaylorSeer", f"TaylorSeer N{n} O1", preset="balanced", mode="taylorseer", interval=n))
    m.append(cc("TaylorSeer", "TaylorSeer N5 O2", preset="balanced", mode="taylorseer", order=2))
    for n in (2, 3, 5, 6):
        m.append(cc("FORA", f"FORA N{n}", preset="balanced", mode="fora", interval=n))
    m += [
        Method("diffusers TaylorSeer N3 O1", "diffusers TaylorSeer", diffusers=ts_diffusers(3)),
        Method("diffusers TaylorSeer-lite N5 O1", "diffusers TaylorSeer-lite", diffusers=ts_diffusers(5, lite=True)),
        Method("diffusers FirstBlockCache t0.15", "diffusers FirstBlockCache", diffusers=fbc(0.15)),
        Method("diffusers FirstBlockCache t0.3", "diffusers FirstBlockCache", diffusers=fbc(0.3)),
        Method("diffusers MagCache t0.06", "diffusers MagCache", diffusers=mag(0.06), note="ratios calibrated on this model"),
        Method("diffusers MagCache t0.25", "diffusers MagCache", diffusers=mag(0.25), note="ratios calibrated on this model"),
        Method("diffusers PAB skip 2", "diffusers PAB", diffusers=pab(2)),
        Method("diffusers PAB skip 4", "diffusers PAB", diffusers=pab(4)),
    ]
    return m


def large_methods(quick: bool) -> list:
    """The shorter list run on the large random-weight model."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    from benchmarks._caches import Method
    from clusca import ClusCaConfig

    m = [
        Method("uncached", "uncached"),
        Method("ClusCa balanced (N5)", "ClusCa", clusca=ClusCaConfig.preset("balanced")),
        Method("ClusCa fast (N6)", "ClusCa", clusca=ClusCaConfig.preset("fast")),
        Method("TaylorSeer N6 O1", "TaylorSeer", clusca=ClusCaConfig.preset("fast", mode="taylorseer")),
        Method("diffusers TaylorSeer N6 O1", "diffusers TaylorSeer", diffusers=lambda env: TaylorSeerCacheConfig(
            cache_interval=6, disable_cache_before_step=3, max_order=1, taylor_factors_dtype=None)),
        # With random weights the first block's residual changes by more than 0.2 between steps,
        # so lower thresholds never skip anything here.
        Method("diffusers FirstBlockCache t0.4", "diffusers FirstBlockCache",
               diffusers=lambda env: FirstBlockCacheConfig(threshold=0.4)),
    ]
    return m


def select(methods: list, pattern: str | None) -> list:
    if not pattern:
        return methods
    rx = re.compile(pattern, re.I)
    return [m for m in methods if m.uncached or rx.search(m.name)]


# ==================================================================== built-in model
def bench_builtin(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from benchmarks._caches import Env, activate, calibrate_mag_ratios, count_flops, track_timestep
    from clusca import apply_clusca
    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
    from clusca_shapes.tools import checker, data

    weights = Path(a.weights) if a.weights else WEIGHTS_DIR
    pipe = ShapesFluxPipeline.from_pretrained(weights)
    tr = pipe.transformer
    steps = a.steps or pipe.default_steps
    guidance = pipe.default_guidance
    env = Env(steps=steps)
    track_timestep(tr, env)
    apply_clusca(tr)
    methods = select(builtin_methods(a.quick, weights), a.methods)

    items = data.eval_set(a.prompts)
    prompts, scenes = [t for t, _ in items], [s for _, s in items]

    def generate(method, chunk: list[str], seeds: list[int], flops: bool = False):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with activate(method, tr, env) as probe:
            def on_step(_pipe, _i, _t, _kw):
                probe.sample_memory()
                return {}

            counter = count_flops(tr) if flops else _null()
            with counter as fl:
                images = pipe(chunk, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                              output_type="np", callback_on_step_end=on_step).images
        return np.asarray(images), probe, (fl[0] if flops else 0)

    if any("MagCache" in m.family for m in methods):
        calib = [t for t, _ in data.eval_set(8, seed=1)]
        env.mag_ratios = calibrate_mag_ratios(
            tr, steps, lambda: pipe(calib, generator=[torch.Generator().manual_seed(10_000 + i) for i in range(8)],
                                    num_inference_steps=steps, guidance_scale=guidance, output_type="np"))

    # ---- quality and measured FLOPs over the prompt set
    rows: dict[str, dict[str, Any]] = {}
    ref_images = None
    t_quality = time.perf_counter()
    for method in methods:
        t0 = time.perf_counter()
        images, flops, flops_u, flops_a = [], 0, 0, 0
        for start in range(0, len(prompts), a.batch):
            chunk = prompts[start:start + a.batch]
            imgs, probe, fl = generate(method, chunk, list(range(start, start + len(chunk))), flops=True)
            images.append(imgs)
            flops += fl
            if probe.stats is not None:
                flops_u += probe.stats.flops_uncached
                flops_a += probe.stats.flops
        images = np.concatenate(images)
        if method.uncached:
            ref_images = images
        results = [checker.check(img, s) for img, s in zip(images, scenes)]
        summ = checker.summarise(results, scenes)
        row = {
            "name": method.name, "family": method.family, "note": method.note,
            "flops": flops,
            "analytic_flops_speedup": (flops_u / flops_a) if flops_a else None,
            "adherence": summ["adherence"], "colour": summ["colour"], "shape": summ["shape"],
            "position": summ["position"],
        }
        if method.clusca is not None:
            row["config"] = method.clusca.to_dict()
        if ref_images is not None:
            ps = [min(psnr(x, y), PSNR_CAP) for x, y in zip(ref_images, images)]
            row["psnr"] = statistics.fmean(ps)
            row["psnr_min"] = min(ps)
            row["ssim"] = statistics.fmean(ssim(x, y) for x, y in zip(ref_images, images))
        rows[method.name] = row
        print(f"[quality] {method.name:<40} {time.perf_counter() - t0:6.1f}s  "
              f"PSNR {row.get('psnr', float('nan')):6.2f}  adherence {row['adherence']:5.1f}%", flush=True)
    t_quality = time.perf_counter() - t_quality
    base_flops = rows["uncached"]["flops"]
    for row in rows.values():
        row["flops_speedup"] = base_flops / row["flops"] if row["flops"] else None

    # ---- wall clock: batch 1, every method once per round, order rotated each round
    t_wall = time.perf_counter()
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    cpu: dict[str, list[float]] = {m.name: [] for m in methods}
    for r in range(a.repeats + 1):  # round 0 warms every path up and is discarded
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        seed = r % len(prompts)
        for method in order:
            t0, c0 = time.perf_counter(), time.process_time()
            _, probe, _ = generate(method, [prompts[seed]], [seed])
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r:
                times[method.name].append(dt)
                cpu[method.name].append(dc)
            rows[method.name]["cache_bytes"] = probe.cache_bytes
            if probe.stats is not None:
                rows[method.name]["full_steps"] = probe.stats.full_steps
                rows[method.name]["token_fraction"] = probe.stats.token_fraction
    t_wall = time.perf_counter() - t_wall
    base = statistics.median(times["uncached"])
    for name, ts in times.items():
        rows[name]["times"] = [round(t, 4) for t in ts]
        rows[name]["seconds"] = statistics.median(ts)
        rows[name]["wall_speedup"] = base / statistics.median(ts)
        rows[name]["cpu_speedup"] = statistics.median(cpu["uncached"]) / statistics.median(cpu[name])
    return {
        "weights": str(weights), "steps": steps, "guidance": guidance, "prompts": len(prompts),
        "batch": a.batch, "repeats": a.repeats, "image_tokens": (32 // pipe.patch_size) ** 2,
        "params_M": round(sum(p.numel() for p in tr.parameters()) / 1e6, 2),
        "mag_ratios": env.mag_ratios, "quality_s": round(t_quality, 1), "wall_s": round(t_wall, 1),
        "rows": list(rows.values()),
    }


class _null:
    def __enter__(self):
        return [0]

    def __exit__(self, *exc):
        return False


# ==================================================================== large random-weight model
def bench_large(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks._caches import Env, activate, count_flops, track_timestep
    from benchmarks._sampling import FluxInputs
    from benchmarks.speed_flux import build_model
    from clusca import apply_clusca

    spec = SimpleNamespace(width=a.large_width, head_dim=64, dual=a.large_dual, single=a.large_single,
                           latent_side=a.large_side, text_tokens=32, text_dim=a.large_text_dim)
    device, dtype = torch.device("cpu"), torch.float32
    model = build_model(spec, device, dtype)
    inputs = FluxInputs.random(side=spec.latent_side, text_tokens=spec.text_tokens, text_dim=spec.text_dim,
                               device=device, dtype=dtype)
    steps = a.large_steps
    env = Env(steps=steps)
    track_timestep(model, env)
    apply_clusca(model)
    methods = select(large_methods(a.quick), a.methods)

    def run(method, flops: bool = False):
        with activate(method, model, env) as probe:
            counter = count_flops(model) if flops else _null()
            with counter as fl:
                t0, c0 = time.perf_counter(), time.process_time()
                out = inputs.loop(model, steps).run()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
        return out, probe, (dt, dc), (fl[0] if flops else 0)

    inputs.loop(model, 2).run()  # allocator and kernels warm
    rows: dict[str, dict[str, Any]] = {}
    ref = None
    for method in methods:  # one counted run per method: FLOPs, memory, error; also a warm-up
        out, probe, (dt, _), fl = run(method, flops=True)
        if method.uncached:
            ref = out
        rel = float((out - ref).norm() / ref.norm())
        rows[method.name] = {
            "name": method.name, "family": method.family, "flops": fl, "rel_error": rel,
            "cache_bytes": probe.cache_bytes,
            "analytic_flops_speedup": probe.stats.flops_speedup if probe.stats else None,
            "full_steps": probe.stats.full_steps if probe.stats else None,
        }
        print(f"[large] counted {method.name:<34} {dt:6.1f}s  rel.err {rel:.4f}", flush=True)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    cpu: dict[str, list[float]] = {m.name: [] for m in methods}
    for r in range(a.large_repeats):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for method in order:
            _, _, (dt, dc), _ = run(method)
            times[method.name].append(dt)
            cpu[method.name].append(dc)
        print(f"[large] round {r + 1}/{a.large_repeats}: "
              + ", ".join(f"{m.name} {times[m.name][-1]:.1f}s" for m in methods), flush=True)
    base_t = statistics.median(times["uncached"])
    base_f = rows["uncached"]["flops"]
    for name, row in rows.items():
        row["times"] = [round(t, 3) for t in times[name]]
        row["seconds"] = statistics.median(times[name])
        row["wall_speedup"] = base_t / row["seconds"]
        # Fastest run against fastest run: the least disturbed pair on a shared CPU.
        row["wall_speedup_best"] = min(times["uncached"]) / min(times[name])
        # CPU time of this process: with one torch thread it leaves out the time other work
        # held the core, so it shows what the wall clock would be on an idle machine.
        row["cpu_speedup"] = statistics.median(cpu["uncached"]) / statistics.median(cpu[name])
        row["flops_speedup"] = base_f / row["flops"] if row["flops"] else None
        row["wall_over_flops"] = row["wall_speedup"] / row["flops_speedup"] if row["flops_speedup"] else None
    return {
        "width": a.large_width, "dual": a.large_dual, "single": a.large_single,
        "image_tokens": a.large_side ** 2, "text_tokens": 32, "steps": steps, "repeats": a.large_repeats,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "rows": list(rows.values()),
    }


# ==================================================================== report
def _fmt(v: Any, spec: str = ".2f", none: str = "n/a") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _kib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 1024:,.0f}"


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    """Pareto fronts and the issue's targets, from the raw results."""
    out: dict[str, Any] = {}
    b = res.get("builtin")
    if b:
        rows = [r for r in b["rows"] if r["name"] != "uncached"]
        for key in ("flops_speedup", "wall_speedup"):
            pts = [(r[key], r["psnr"]) for r in rows]
            front = {rows[i]["name"] for i in pareto_front(pts)}
            for r in rows:
                r[f"front_{key}"] = r["name"] in front
            bal = next((i for i, r in enumerate(rows) if r["name"].startswith("ClusCa balanced")), None)
            if bal is not None:
                out[f"balanced_dominators_{key}"] = [rows[j]["name"] for j in dominators(pts, bal, strict=True)]
                # How much better `balanced` is than the best method that is faster: a margin of a
                # few hundredths of a dB is a tie in practice, and the docs say so.
                faster = [r for r in rows if r[key] > rows[bal][key]]
                if faster:
                    best = max(faster, key=lambda r: r["psnr"])
                    out[f"balanced_margin_{key}"] = {"name": best["name"], "d_psnr": rows[bal]["psnr"] - best["psnr"]}
        # ClusCa vs our TaylorSeer mode at equal interval, order and warm-up (TaylorSeer at order 0
        # is plain reuse, i.e. our FORA mode): the paper's presets, this model's presets and the
        # `anchored` variant.
        kinds = {"ClusCa paper presets": "paper preset", "ClusCa presets": "this model's preset",
                 "ClusCa anchored": "anchored variant"}
        pairs = []
        for c in rows:
            cc = c.get("config")
            if not cc or cc["mode"] != "clusca" or c["family"] not in kinds:
                continue
            if c["family"] == "ClusCa presets" and c["name"].startswith("ClusCa paper"):
                continue
            for r in rows:
                cfg = r.get("config")
                if not cfg or cfg["mode"] not in ("taylorseer", "fora"):
                    continue
                order = 0 if cfg["mode"] == "fora" else cfg["order"]
                if cfg["interval"] == cc["interval"] and order == cc["order"] and cfg["warmup"] == cc["warmup"]:
                    pairs.append({"taylorseer": r["name"], "clusca": c["name"], "kind": kinds[c["family"]],
                                  "interval": cc["interval"], "order": cc["order"], "d_psnr": c["psnr"] - r["psnr"],
                                  "d_ssim": c["ssim"] - r["ssim"], "clusca_flops_speedup": c["flops_speedup"],
                                  "ts_flops_speedup": r["flops_speedup"]})
                    break
        out["clusca_vs_taylorseer"] = pairs
    lg = res.get("large")
    if lg:
        out["large_ratio"] = {r["name"]: r["wall_over_flops"] for r in lg["rows"] if r["name"] != "uncached"}
    return out


def findings(res: dict[str, Any]) -> list[str]:
    """Plain statements read off the results (each only when its rows were measured)."""
    out: list[str] = []
    b = res.get("builtin")
    if b:
        rows = {r["name"]: r for r in b["rows"]}

        def q(name: str) -> str | None:
            r = rows.get(name)
            return None if r is None else f"{r['psnr']:.2f} dB at {r['flops_speedup']:.2f}x FLOPs"

        def qs(label: str, names: list[tuple[str, str]]) -> str | None:
            got = [(k, q(n)) for k, n in names if q(n)]
            return (label + "; ".join(f"{k}: {v}" for k, v in got) + ".") if got else None

        bal = next((r for r in b["rows"] if r["name"].startswith("ClusCa balanced")), None)
        paper = next((r for r in b["rows"] if r["name"].startswith("ClusCa paper balanced")), None)
        if bal and paper:
            out.append(
                f"`balanced` for this model is `{bal['name'][len('ClusCa balanced '):].strip('()')}` (declared by the "
                "checkpoint's `model_index.json`, applied by the service); the paper's `balanced` "
                f"(`{paper['name'][len('ClusCa paper balanced '):].strip('()')}`) gives {q(paper['name'])} here, "
                f"against {q(bal['name'])} for the tuned one.")
        text = qs("Taylor order, no clusters: ", [
            ("FORA N4", "FORA N4"), ("TaylorSeer N4 O1", "TaylorSeer N4 O1"),
            ("FORA N5", "FORA N5"), ("TaylorSeer N5 O1", "TaylorSeer N5 O1"), ("TaylorSeer N5 O2", "TaylorSeer N5 O2")])
        if text and "FORA N5" in rows and "TaylorSeer N5 O1" in rows:
            if rows["FORA N5"]["psnr"] > rows["TaylorSeer N5 O1"]["psnr"]:
                text += (f" On this model and {b['steps']}-step schedule, extrapolating each module's output over "
                         "several steps costs more than it gains: plain reuse is the more accurate at equal FLOPs, "
                         "which is why this model's presets use order 0.")
            out.append(text)
        text = qs("Fresh tokens at order 0 (gamma 0) against plain reuse at the same interval: ", [
            ("FORA N4", "FORA N4"), ("K2", "ClusCa N4 K2 O0 g0"), ("K4 (`balanced`)", bal["name"] if bal else ""),
            ("K8", "ClusCa N4 K8 O0 g0"), ("K16", "ClusCa N4 K16 O0 g0"),
            ("FORA N5", "FORA N5"), ("N5 K2", "ClusCa N5 K2 O0 g0"), ("N5 K16", "ClusCa N5 K16 O0 g0")])
        if text:
            out.append(text + " Recomputing the feed-forward output of a few tokens per cluster changes PSNR by "
                       "hundredths of a dB here: the two dual-stream feed-forward networks it corrects are a small "
                       "part of what a cached step predicts (attention and the two single-stream blocks are "
                       "predicted whole), so the fresh tokens neither help nor hurt, and each one costs FLOPs. "
                       "Few clusters keep that cost low; that is the whole of the tuning.")
        text = qs("Propagation (gamma) at order 0, K4: ", [
            ("gamma 0 (`balanced`)", bal["name"] if bal else ""), ("N4 gamma 0.005", "ClusCa N4 K4 O0 g0.005"),
            ("N5 gamma 0 (`fast`)", next((n for n in rows if n.startswith("ClusCa fast")), "")),
            ("N5 gamma 0.05", "ClusCa N5 K4 O0 g0.05")])
        if text:
            out.append(text + " Blending a cluster's fresh value into its members does not help on this model.")
        text = qs("Guidance pairs (both halves of a classifier-free-guidance batch refresh the same tokens) against "
                  "each half clustered on its own: ", [
            ("paper `balanced`", paper["name"] if paper else ""), ("pairs off", "ClusCa N5 K16 O1 g0.005, pairs off"),
            ("anchored N5 K16 g0", "ClusCa N5 K16 O1 g0 anchored"),
            ("pairs off", "ClusCa N5 K16 O1 g0 anchored, pairs off"),
            ("`balanced`", bal["name"] if bal else ""), ("pairs off", "ClusCa N4 K4 O0 g0, pairs off")])
        if text:
            out.append(text + " Guidance multiplies the difference of the two halves by the guidance scale, so a "
                       "token that is fresh in one half and predicted in the other becomes a visible error. The "
                       "pairing matters most at order 1, where fresh and predicted values differ most; at order 0 "
                       "it is what keeps the fresh tokens from costing PSNR against plain reuse.")
        text = qs("`anchored` propagation against TaylorSeer at the same interval (order 1, K16, gamma 0): ", [
            (f"N{n} anchored / TaylorSeer", f"ClusCa N{n} K16 O1 g0 anchored") for n in (3, 4, 5, 6)])
        if text:
            diffs = [(n, rows[f"ClusCa N{n} K16 O1 g0 anchored"]["psnr"] - rows[f"TaylorSeer N{n} O1"]["psnr"])
                     for n in (3, 4, 5, 6) if f"ClusCa N{n} K16 O1 g0 anchored" in rows and f"TaylorSeer N{n} O1" in rows]
            if diffs:
                text += " Differences: " + ", ".join(f"N{n} {d:+.2f} dB" for n, d in diffs) + "."
            out.append(text)
        pairs = analyse(res).get("clusca_vs_taylorseer", [])
        if pairs:
            def span(kind: str) -> str | None:
                got = [p for p in pairs if p["kind"] == kind]
                return None if not got else ", ".join(f"N{p['interval']} O{p['order']} {p['d_psnr']:+.2f}" for p in got)
            parts = [(k, span(k)) for k in ("paper preset", "anchored variant", "this model's preset")]
            out.append("The method's claim, ClusCa above TaylorSeer at equal interval and order (TaylorSeer at order "
                       "0 is plain reuse), in dB: " + "; ".join(f"{k}s: {v}" for k, v in parts if v) + f". Differences "
                       f"under {TIE_DB} dB are ties. With the paper's settings the claim does not hold on this model; "
                       "with `anchored` propagation and guidance pairs it holds at three of the four intervals tried, by "
                       "under half a dB; "
                       "at order 0, where this model's presets sit, ClusCa ties plain reuse.")
        if bal and "FORA N4" in rows:
            out.append(_wall_finding(bal, rows, analyse(res)))
        ad = rows.get("uncached", {}).get("adherence")
        if ad is not None and bal:
            out.append(f"Prompt adherence: uncached {ad:.1f}%, `balanced` {bal['adherence']:.1f}%"
                       + (f", paper `balanced` {paper['adherence']:.1f}%" if paper else "") + ".")
    lg = res.get("large")
    if lg:
        cl = [x for x in lg["rows"] if x["name"].startswith("ClusCa")]
        if cl:
            out.append("Large random-weight model: wall-clock / FLOPs speedup "
                       + "; ".join(f"{x['name']} {x['wall_over_flops']:.2f} ({x['wall_speedup']:.2f}x of {x['flops_speedup']:.2f}x)" for x in cl)
                       + ". The gap is the work FLOPs do not count: Taylor arithmetic over every token, norms and "
                       "modulation, and per-module Python overhead on cached steps.")
        by = {x["name"]: x for x in lg["rows"]}
        if "ClusCa fast (N6)" in by and "TaylorSeer N6 O1" in by:
            c, t = by["ClusCa fast (N6)"], by["TaylorSeer N6 O1"]
            out.append(f"With {lg['image_tokens']} image tokens, ClusCa `fast` and TaylorSeer at the same interval end "
                       f"{c['rel_error']:.4f} and {t['rel_error']:.4f} (relative L2) from the uncached latent, at "
                       f"{c['flops_speedup']:.2f}x and {t['flops_speedup']:.2f}x FLOPs: the 16 fresh tokens per "
                       "cached step cost little at this size"
                       + (", and they barely move the result (random weights, so there is no image quality to judge)."
                          if abs(c["rel_error"] - t["rel_error"]) <= 0.05 * max(t["rel_error"], 1e-12) else
                          f"; they change the distance by {c['rel_error'] / t['rel_error'] - 1:+.0%}."))
    return out


def _wall_finding(bal: dict[str, Any], rows: dict[str, dict[str, Any]], ana: dict[str, Any]) -> str:
    """What `balanced` costs in wall-clock time, next to plain reuse and the fastest rivals."""
    f4 = rows["FORA N4"]
    text = (f"Wall clock: `balanced` runs at {bal['wall_speedup']:.2f}x against {f4['wall_speedup']:.2f}x for FORA N4 "
            f"({bal['psnr'] - f4['psnr']:+.2f} dB; FORA N4 saves {f4['flops_speedup'] / bal['flops_speedup'] - 1:.0%} "
            "more FLOPs). What FLOPs leave out is ClusCa's fixed work: one extra feed-forward call per dual-stream "
            "image module on every cached step (a few rows, but all of the module's weights read), the fresh-token "
            "gather and scatter, and k-means on every full step. ")
    doms = ana.get("balanced_dominators_wall_speedup") or []
    margin = ana.get("balanced_margin_wall_speedup")
    if doms:
        text += "Faster and better on wall clock: " + ", ".join(
            f"{n} ({rows[n]['wall_speedup']:.2f}x, {rows[n]['psnr']:.2f} dB)" for n in doms) + "."
    elif margin:
        m = rows[margin["name"]]
        text += (f"No method in the run is both faster and better; of the faster ones the best in PSNR is "
                 f"{margin['name']} ({m['wall_speedup']:.2f}x, {m['psnr']:.2f} dB, {-margin['d_psnr']:+.2f} dB).")
    on = next((r for n, r in rows.items() if n.endswith(", text refresh on")), None)
    if on is not None:
        same = "the same PSNR" if on["psnr"] == bal["psnr"] else f"{on['psnr']:.2f} dB"
        text += (f" The authors' code also refreshes text tokens; they cannot reach the output (docs/library.md, "
                 f"`refresh_text`) and are skipped by default. With them `balanced` gives {same} at "
                 f"{on['wall_speedup']:.2f}x wall ({(on['seconds'] - bal['seconds']) * 1000:+.1f} ms per image).")
    return text


def render(res: dict[str, Any]) -> str:
    ana = analyse(res)
    meta = res["meta"]
    lines = [
        START,
        "## Cache comparison: ClusCa, our other modes and diffusers' caches",
        "",
        written_by("cache_compare.py", meta["argv"], meta["date"]) + "; "
        f"CPU `{meta['cpu']}`, {meta['threads']} torch threads, no GPU; torch {meta['torch']}, diffusers {meta['diffusers']}. "
        "The CPU was shared with other work while this ran, so wall-clock numbers are noisy; "
        "runs are interleaved (every method once per round, order rotated) and medians are reported.",
        "",
        "How to read the columns: **FLOPs x** is the measured ratio uncached / method of the matrix-multiply "
        "and attention FLOPs executed inside the transformer (torch's FLOP counter, the same yardstick for every "
        "method); **analytic x** is our library's own estimate (ClusCa modes only); **wall x** is the ratio of "
        "median wall-clock times against uncached. PSNR and SSIM compare each image with the uncached image of "
        "the same prompt and seed (identical images count as 100 dB). Adherence is the built-in checker's "
        "accuracy (colour, shape and position all right). Cache is the peak cache memory held for one request "
        "(batch 1; with guidance both halves of the batch). ClusCa names read N = interval, K = clusters, "
        "O = Taylor order, g = gamma (propagation ratio); warm-up is 3 full steps everywhere. "
        "`ClusCa quality / balanced / fast` are the presets as the service resolves them for this model "
        "(the library's presets with the checkpoint's `cache_presets` on top, see docs/service.md); "
        "`ClusCa paper ...` are the library's own presets, the paper's settings. Unless a row says "
        "\"pairs off\", both halves of a guidance batch refresh the same tokens (`guidance_pairs`, "
        "docs/library.md). Unless a row says \"text refresh on\", ClusCa refreshes image tokens only: "
        "text-stream fresh tokens cannot change the output (`refresh_text`, docs/library.md).",
        "",
    ]
    b = res.get("builtin")
    lg = res.get("large")
    # ---- targets
    lines += ["### Targets", "", "| target | measured | met |", "|---|---|---|"]
    if b:
        for key, label in (("flops_speedup", "FLOPs"), ("wall_speedup", "wall-clock")):
            dom = ana.get(f"balanced_dominators_{key}")
            if dom is not None:
                margin = ana.get(f"balanced_margin_{key}")
                measured = "no method is both faster and better" if not dom else "beaten by " + ", ".join(dom)
                met = "yes" if not dom else "no"
                if not dom and margin is not None:
                    measured += f"; {margin['d_psnr']:+.2f} dB over the best faster method ({margin['name']})"
                    if margin["d_psnr"] < TIE_DB:
                        met = f"yes, but by less than {TIE_DB} dB: a tie in practice"
                lines.append(f"| ClusCa `balanced` on the Pareto front (PSNR vs {label} speedup, built-in model) | "
                             f"{measured} | {met} |")
        for p in ana["clusca_vs_taylorseer"]:
            d = p["d_psnr"]
            met = "yes" if d > TIE_DB else ("no" if d < -TIE_DB else f"no: a tie (within {TIE_DB} dB)")
            lines.append(f"| ClusCa beats TaylorSeer at N{p['interval']} O{p['order']} in PSNR ({p['kind']}) | "
                         f"{d:+.2f} dB ({p['clusca']} vs {p['taylorseer']}) | {met} |")
    if lg:
        for name, ratio in ana["large_ratio"].items():
            if name.startswith("ClusCa"):
                lines.append(f"| wall >= 0.9 x FLOPs speedup, {name}, large model | {_fmt(ratio, '.2f')} | "
                             f"{'yes' if ratio is not None and ratio >= 0.9 else 'no'} |")
    lines.append("")
    # ---- built-in table
    if b:
        lines += [
            "### (a) Built-in shapes model: quality and speed",
            "",
            f"Checkpoint `{b['weights_label']}`"
            + ("" if b["weights_label"].startswith("clusca_shapes/weights") else
               " (a training checkpoint, not the shipped weights; rerun the command for the shipped ones)")
            + f", {b['params_M']}M parameters, {b['image_tokens']} image tokens, "
            f"{b['steps']} Euler steps, guidance {b['guidance']} (one batched call per step). Quality over the fixed "
            f"prompts `clusca_shapes.tools.data.eval_set({b['prompts']})`, image i seeded i, in batches of {b['batch']}; "
            f"wall clock batch 1, median of {b['repeats']} rounds (CPU-time x: the same ratio of this process's CPU time). "
            "Pareto: on the front of PSNR vs FLOPs x / vs wall x.",
            "",
            "| method | FLOPs x | analytic x | wall x | CPU-time x | PSNR dB | SSIM | adherence % | cache KiB/request | Pareto (FLOPs / wall) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in b["rows"]:
            unc = r["name"] == "uncached"
            lines.append(
                f"| {r['name']} | {_fmt(r['flops_speedup'])} | {_fmt(r.get('analytic_flops_speedup'))} | "
                f"{_fmt(r['wall_speedup'])} | {_fmt(r.get('cpu_speedup'))} | {'ref' if unc else _fmt(r['psnr'])} | {'ref' if unc else _fmt(r['ssim'], '.4f')} | "
                f"{r['adherence']:.1f} | {_kib(r.get('cache_bytes'))} | "
                f"{'' if unc else ('yes' if r['front_flops_speedup'] else '-') + ' / ' + ('yes' if r['front_wall_speedup'] else '-')} |"
            )
        lines += ["", "![PSNR against speedup for every method](pareto.png)", ""]
    if lg:
        lines += [
            "### (b) FLUX architecture, random weights: speed",
            "",
            f"Width {lg['width']}, {lg['dual']} dual + {lg['single']} single blocks, {lg['params_M']}M parameters, "
            f"{lg['image_tokens']} image + {lg['text_tokens']} text tokens, batch 1, float32, {lg['steps']} Euler steps "
            f"(model code of `benchmarks/speed_flux.py`); median of {lg['repeats']} interleaved rounds; "
            "\"wall x, fastest runs\" divides the fastest uncached run by the method's fastest run, a check on "
            "the medians when other work disturbs the machine; \"CPU-time x\" is the same ratio of this process's CPU "
            "time (one torch thread, so it leaves out the time other processes held the core). "
            "Rel. error: relative L2 distance of the final latent from the uncached one (random weights, so only "
            "a sanity check, not image quality). ClusCa rows here are the library's (the paper's) presets: the "
            "built-in model's tuning is that model's own."
            + (f" Measured on {meta['large_from']['date']} by `python benchmarks/cache_compare.py "
               f"{meta['large_from']['argv']}` and reused here (`--reuse-large`): random weights, so this part "
               "does not depend on the checkpoint." if meta.get("large_from") else ""),
            "",
            "| method | FLOPs x | analytic x | wall x | wall / FLOPs | wall x, fastest runs | CPU-time x | s per image | rel. error | cache MiB/request |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in lg["rows"]:
            lines.append(
                f"| {r['name']} | {_fmt(r['flops_speedup'])} | {_fmt(r.get('analytic_flops_speedup'))} | "
                f"{_fmt(r['wall_speedup'])} | {_fmt(r['wall_over_flops'])} | {_fmt(r.get('wall_speedup_best'))} | "
                f"{_fmt(r.get('cpu_speedup'))} | {r['seconds']:.2f} | "
                f"{r['rel_error']:.4f} | {r['cache_bytes'] / 2**20:.1f} |"
            )
        lines.append("")
    notes = findings(res)
    if notes:
        lines += ["### Findings", ""] + [f"- {n}" for n in notes] + [""]
    lines += [
        "### How the outside caches were set up",
        "",
        "diffusers 0.42 caches are enabled with `transformer.enable_cache(config)` inside "
        "`transformer.cache_context(\"cond\")` (the built-in pipeline makes one batched call per step) and removed "
        "with `disable_cache()` after each run. TaylorSeer: `cache_interval` N, `disable_cache_before_step=3`, "
        "order 1, float32 factors, default module patterns (attention outputs only; the feed-forward networks "
        "always run) or `use_lite_mode` (predicts the final projection and skips every block). FirstBlockCache: "
        "the given threshold; it decides per batch, so a quality batch skips or computes together. MagCache: "
        "magnitude ratios calibrated with diffusers' own calibration mode on 8 prompts outside the evaluation set "
        "(no ratios exist for this model). Pyramid Attention Broadcast: spatial attention skip range as given, "
        "timesteps 100..800, the current timestep read by a forward pre-hook.",
        "",
        "Not measured here: the full-size FLUX.1-dev GPU run (no GPU was available to this run).",
        END,
    ]
    return "\n".join(lines) + "\n"


def headline(res: dict[str, Any]) -> list[Headline]:
    """The summary's rows: `balanced` on the built-in model, and ClusCa's wall / FLOPs on the large one."""
    meta, out = res["meta"], []
    on, date = cpu(meta["cpu"]) + f", {meta['threads']} thread(s)", day(meta["date"])
    b = res.get("builtin")
    bal = next((r for r in (b or {}).get("rows", []) if r["name"].startswith("ClusCa balanced")), None)
    if bal:
        out.append(Headline(f"ClusCa `balanced` against other caches, built-in model ({b['prompts']} prompts)",
                            f"PSNR {bal['psnr']:.2f} dB at {bal['flops_speedup']:.2f}x FLOPs, "
                            f"{bal['wall_speedup']:.2f}x wall clock", on, date))
    lg = res.get("large")
    clusca = [r for r in (lg or {}).get("rows", []) if r["name"].startswith("ClusCa")]
    if clusca:
        out.append(Headline(f"ClusCa presets, FLUX architecture, {lg['params_M']:.1f}M random weights, wall / FLOPs",
                            ", ".join(f"{r['name'].split(' (')[0].removeprefix('ClusCa ')} {r['wall_over_flops']:.2f} "
                                      f"({r['wall_speedup']:.2f}x of {r['flops_speedup']:.2f}x)" for r in clusca),
                            on, date))
    return out


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    write_section(START, END, render(res), path)


def plot(res: dict[str, Any], path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = res["builtin"]
    rows = [r for r in b["rows"] if r["name"] != "uncached"]
    families = sorted({r["family"] for r in rows}, key=lambda f: (not f.startswith("ClusCa"), f))
    markers = "o^sDvP*Xhp<>"
    # Images identical to the uncached ones (capped PSNR) are drawn on the top edge so that
    # they do not squash the interesting range.
    finite = [r["psnr"] for r in rows if r["psnr"] < PSNR_CAP]
    top = (max(finite) if finite else PSNR_CAP) + 4.0

    def y(r: dict) -> float:
        return min(r["psnr"], top)

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2), sharey=True)
    for ax, key, label in ((axes[0], "flops_speedup", "FLOPs speedup (measured)"),
                           (axes[1], "wall_speedup", "wall-clock speedup (CPU, batch 1)")):
        for k, fam in enumerate(families):
            pts = sorted((r[key], y(r), r["name"]) for r in rows if r["family"] == fam)
            top_family = fam == "ClusCa presets"  # the settings the service runs: drawn large, on top
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="P" if top_family else markers[k % len(markers)],
                    linestyle="", label=fam, alpha=0.95 if top_family else 0.7, markersize=12 if top_family else 7,
                    zorder=5 if top_family else 2, color="black" if top_family else None, clip_on=False)
        front = [r for r in rows if r[f"front_{key}"]]
        front.sort(key=lambda r: r[key])
        ax.step([r[key] for r in front], [y(r) for r in front], where="pre", color="black", linewidth=0.8,
                linestyle=":", label="Pareto front")
        for r in rows:
            if r[f"front_{key}"] or r["name"].startswith("ClusCa balanced"):
                short = "ClusCa balanced" if r["name"].startswith("ClusCa balanced") else r["name"]
                if r["psnr"] >= PSNR_CAP:
                    short += " (identical images)"
                ax.annotate(short, (r[key], y(r)), textcoords="offset points", xytext=(5, -10 if r["psnr"] >= top else 5),
                            fontsize=7)
        ax.set_ylim(top=top)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR vs uncached (dB), built-in model")
    # Below the plots: inside either one it hides the points a reader compares.
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=5, frameon=False)
    fig.suptitle(f"Quality against speed, built-in model, {b['steps']} steps, {b['prompts']} prompts")
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def _print_table(title: str, columns: list[tuple[str, int, Callable[[dict[str, Any]], str]]],
                 rows: list[dict[str, Any]]) -> None:
    """``rows`` under ``title``; each column is (heading, width, its cell of a row), the first left-aligned."""
    def line(cells: list[str]) -> str:
        return " ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w, _)) in enumerate(zip(cells, columns)))

    print(f"\n{title}")
    print(line([h for h, _, _ in columns]))
    for r in rows:
        print(line([cell(r) for _, _, cell in columns]))


def print_tables(res: dict[str, Any]) -> None:
    analyse(res)
    b = res.get("builtin")
    if b:
        _print_table(f"Built-in model ({b['steps']} steps, {b['prompts']} prompts)", [
            ("method", 40, lambda r: r["name"]), ("FLOPs x", 8, lambda r: _fmt(r["flops_speedup"])),
            ("anal. x", 8, lambda r: _fmt(r.get("analytic_flops_speedup"))),
            ("wall x", 7, lambda r: _fmt(r["wall_speedup"])), ("PSNR", 7, lambda r: _fmt(r.get("psnr"))),
            ("SSIM", 7, lambda r: _fmt(r.get("ssim"), ".4f")), ("adh %", 6, lambda r: f"{r['adherence']:.1f}"),
            ("KiB/req", 9, lambda r: _kib(r.get("cache_bytes")))], b["rows"])
    lg = res.get("large")
    if lg:
        _print_table(f"FLUX architecture, random weights ({lg['image_tokens']} image tokens, {lg['steps']} steps)", [
            ("method", 34, lambda r: r["name"]), ("FLOPs x", 8, lambda r: _fmt(r["flops_speedup"])),
            ("anal. x", 8, lambda r: _fmt(r.get("analytic_flops_speedup"))),
            ("wall x", 7, lambda r: _fmt(r["wall_speedup"])), ("wall/FLOPs", 10, lambda r: _fmt(r["wall_over_flops"])),
            ("s", 7, lambda r: f"{r['seconds']:.2f}"), ("rel.err", 8, lambda r: f"{r['rel_error']:.4f}"),
            ("MiB/req", 8, lambda r: f"{r['cache_bytes'] / 2**20:.1f}")], lg["rows"])


def _weights_label(path: str) -> str:
    p = Path(path)
    try:
        rel = p.resolve().relative_to(ROOT)
        rev = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", str(rel)],
                             capture_output=True, text=True).stdout.strip()
        return f"{rel}" + (f" @ {rev}" if rev else "")
    except ValueError:
        return str(p)


# ==================================================================== main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few methods, 8 prompts, small large-model (development)")
    p.add_argument("--weights", default=None, help="built-in model checkpoint folder (default: the shipped weights)")
    p.add_argument("--prompts", type=int, default=None, help="prompts for the quality part (default 64; quick 8)")
    p.add_argument("--batch", type=int, default=16, help="images per pipeline call in the quality part")
    p.add_argument("--steps", type=int, default=None, help="built-in model steps (default: the model's default)")
    p.add_argument("--repeats", type=int, default=None, help="wall-clock rounds, built-in model (default 7; quick 3)")
    p.add_argument("--methods", default=None, help="regular expression: only methods whose name matches (plus uncached)")
    p.add_argument("--large-width", type=int, default=None, help="default 256 (quick 128)")
    p.add_argument("--large-dual", type=int, default=4)
    p.add_argument("--large-single", type=int, default=8)
    p.add_argument("--large-side", type=int, default=None, help="latent side; image tokens = side^2 (default 32; quick 16)")
    p.add_argument("--large-text-dim", type=int, default=4096)
    p.add_argument("--large-steps", type=int, default=None, help="default 28 (quick 12)")
    p.add_argument("--large-repeats", type=int, default=None, help="default 5 (quick 2)")
    p.add_argument("--skip-builtin", action="store_true")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared CPU an oversubscribed pool is many times slower)")
    p.add_argument("--json", default=str(RESULTS / "cache_compare.json"),
                   help="where the raw results go (default: benchmarks/results/cache_compare.json)")
    p.add_argument("--reuse-large", default=None, help="take the large-model part from this saved results file")
    p.add_argument("--from-json", default=None, help="render tables, docs and plot from saved results; run nothing")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md or docs/pareto.png")
    a = p.parse_args(argv)
    q = a.quick
    a.prompts = a.prompts or (8 if q else 64)
    a.repeats = a.repeats or (3 if q else 7)
    a.large_width = a.large_width or (128 if q else 256)
    a.large_side = a.large_side or (16 if q else 32)
    a.large_steps = a.large_steps or (12 if q else 28)
    a.large_repeats = a.large_repeats or (2 if q else 5)
    for name in ("prompts", "batch", "repeats", "large_width", "large_side", "large_steps", "large_repeats", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.large_width % 64:
        p.error("--large-width must be a multiple of the head size 64")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
    else:
        import diffusers
        import torch

        torch.set_num_threads(a.threads)
        res = {"meta": {
            "argv": " ".join(sys.argv[1:] if argv is None else argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
        }}
        t0 = time.perf_counter()
        if not a.skip_builtin:
            res["builtin"] = bench_builtin(a)
            res["builtin"]["weights_label"] = _weights_label(res["builtin"]["weights"])
        if not a.skip_large and not a.reuse_large:
            res["large"] = bench_large(a)
        res["meta"]["total_s"] = round(time.perf_counter() - t0, 1)
    if a.reuse_large:
        # The large model has random weights, so its part does not change with the checkpoint.
        saved = json.loads(Path(a.reuse_large).read_text())
        res["large"] = saved["large"]
        res["meta"]["large_from"] = {k: v for k, v in saved["meta"].items() if k in ("date", "argv", "threads")}
    analyse(res)
    if not a.from_json:
        print(f"wrote {save(res, a.json)}")
    print_tables(res)
    for p in analyse(res).get("clusca_vs_taylorseer", []):
        print(f"ClusCa - TaylorSeer at N{p['interval']} O{p['order']}: {p['d_psnr']:+.2f} dB PSNR")
    if not a.no_docs:
        if res.get("builtin"):
            plot(res)
        write_docs(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

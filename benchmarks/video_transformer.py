"""The ``--transformer`` mode of benchmarks/video_caches.py: cache methods on a Wan-architecture
transformer with random weights, timed side by side in one process.

:func:`bench` measures and returns the raw results (saved to
benchmarks/results/video_transformer.json); :func:`write_docs` renders the section from them alone.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks._docs import DOCS, write_section
from benchmarks._summary import Headline, day, cpu as summary_cpu  # `cpu` names CPU times here

# (row name, ClusCaConfig keywords): the service presets, then plain reuse and Taylor prediction
# at the interval and warm-up of `fast`, so only the clusters differ from it.
METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("uncached", {"preset": "off"}),
    ("ClusCa quality", {"preset": "quality"}),
    ("ClusCa balanced", {"preset": "balanced"}),
    ("ClusCa fast", {"preset": "fast"}),
    ("FORA N6", {"mode": "fora", "interval": 6, "warmup": 3}),
    ("TaylorSeer N6 O1", {"mode": "taylorseer", "interval": 6, "warmup": 3, "order": 1}),
)
VAE_TIME, VAE_SPACE, PATCH = 4, 8, 2  # Wan's VAE compression and the transformer's patch (1, 2, 2)
MARKERS = ("<!-- video-transformer:start -->", "<!-- video-transformer:end -->")
TOPIC = "video"


def config(kw: dict[str, Any]) -> Any:
    from clusca import ClusCaConfig

    kw = dict(kw)
    preset = kw.pop("preset", None)
    return ClusCaConfig.preset(preset, **kw) if preset else ClusCaConfig(**kw).validate()


def label(cfg: Any) -> str:
    if cfg.mode == "off":
        return "off"
    out = f"{cfg.mode}, interval {cfg.interval}, warm-up {cfg.warmup}, order {cfg.effective_order}"
    return out + (f", K {cfg.clusters}, gamma {cfg.gamma:g}" if cfg.mode == "clusca" else "")


def build(dim: int, layers: int) -> Any:
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    # Wan2.1's block layout (cross-attention norm, RMS q/k norm, feed-forward 4x) at a width a CPU runs.
    return WanTransformer3DModel(
        patch_size=(1, PATCH, PATCH), num_attention_heads=dim // 64, attention_head_dim=64, in_channels=16,
        out_channels=16, text_dim=512, freq_dim=256, ffn_dim=4 * dim, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    ).eval()


def denoise(model: Any, x0: Any, text: Any, steps: int, cfg: Any) -> tuple[Any, Any, float, float]:
    """Flow-matching Euler from sigma 1 to 0 inside one ClusCa run; ``(latent, stats, wall s, CPU s)``."""
    import torch

    from clusca import clusca_run
    from clusca.testing import EulerLoop

    def velocity(x: Any, sigma: float) -> Any:  # Wan's timestep scale is 0..1000
        return model(hidden_states=x, timestep=torch.full((1,), sigma * 1000.0), encoder_hidden_states=text,
                     return_dict=False)[0]

    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad(), clusca_run(model, cfg, num_inference_steps=steps) as run:
        x = EulerLoop(velocity, x0, steps, before_step=run.set_step).run()
    return x, run.stats, time.perf_counter() - t0, time.process_time() - c0


def bench(args: Any, argv: list[str]) -> dict[str, Any]:
    """Every method of :data:`METHODS` on one model, rounds rotated; ``argv``: the command as the docs quote it."""
    import torch

    from clusca import apply_clusca

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    frames, steps = args.frames or 17, args.steps or 20
    if width % 16 or height % 16 or (frames - 1) % VAE_TIME:
        raise SystemExit("--size: multiples of 16; --frames: 1 plus a multiple of 4")
    latent = (1, 16, 1 + (frames - 1) // VAE_TIME, height // VAE_SPACE, width // VAE_SPACE)
    tokens = latent[2] * (latent[3] // PATCH) * (latent[4] // PATCH)
    model = build(args.dim, args.layers)
    apply_clusca(model)  # as the service does at load: "uncached" runs through the inactive hooks
    gen = torch.Generator().manual_seed(0)
    x0, text = torch.randn(latent, generator=gen), torch.randn(1, 32, 512, generator=gen)
    methods = [(name, config(kw)) for name, kw in METHODS]
    for _, cfg in methods:  # untimed: first calls of each setting pay one-off costs
        denoise(model, x0, text, min(steps, 8), cfg)
    wall: dict[str, list[float]] = {n: [] for n, _ in methods}
    cpu: dict[str, list[float]] = {n: [] for n, _ in methods}
    last: dict[str, tuple[Any, Any]] = {}
    for r in range(args.repeats):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for name, cfg in order:  # rotated: each method meets every moment of a shared machine's load
            x, stats, dt, dc = denoise(model, x0, text, steps, cfg)
            wall[name].append(dt)
            cpu[name].append(dc)
            last[name] = (x, stats)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {wall[n][-1]:.1f}s" for n, _ in methods), flush=True)
    ref = last["uncached"][0]
    rows = []
    for name, cfg in methods:
        x, stats = last[name]
        rows.append({
            "name": name, "config": label(cfg), "seconds": statistics.median(wall[name]),
            "wall_speedup": statistics.median(u / t for u, t in zip(wall["uncached"], wall[name])),
            "cpu_speedup": statistics.median(u / t for u, t in zip(cpu["uncached"], cpu[name])),
            "flops_speedup": stats.flops_speedup, "full_steps": stats.full_steps,
            "cached_steps": stats.cached_steps, "token_fraction": stats.token_fraction,
            "rel_error": float((x - ref).norm() / ref.norm()), "times": [round(t, 2) for t in wall[name]],
            "wall_s": wall[name], "cpu_s": cpu[name],  # per round, unrounded: what the medians come from
        })
    report = {"argv": shlex.join(argv), "cores": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "frames": frames, "width": width,
              "height": height, "latent": list(latent[2:]), "tokens": tokens,
              "dim": args.dim, "layers": args.layers, "steps": steps, "repeats": args.repeats,
              "threads": args.threads, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
              "device": f"cpu ({platform.processor() or platform.machine()})",
              "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "rows": rows}
    print(f"Wan transformer {args.dim} wide, {args.layers} blocks: {frames} frames {width}x{height} = {tokens} tokens")
    print(f"{'method':<18} {'s/video':>8} {'FLOPs x':>8} {'wall x':>7} {'CPU x':>6} {'rel.err':>8}")
    for row in rows:
        print(f"{row['name']:<18} {row['seconds']:>8.1f} {row['flops_speedup']:>7.2f}x {row['wall_speedup']:>6.2f}x "
              f"{row['cpu_speedup']:>5.2f}x {row['rel_error']:>8.4f}")
    return report


def render(r: dict[str, Any]) -> str:
    cmd = f"python benchmarks/video_caches.py {r['argv']}"
    lines = [
        MARKERS[0],
        "## Video: cache methods on a Wan-architecture transformer (CPU)",
        "",
        f"`nice -n 19 {cmd}`",
        "",
        f"A WanTransformer3DModel with random weights ({r['dim']} wide, {r['layers']} blocks, {r['params_M']}M "
        f"parameters, Wan2.1's block layout), called directly in a flow-matching Euler loop: batch 1, no "
        f"guidance, float32, {r['threads']} torch thread(s) on {r['device']}. Video: {r['frames']} frames of "
        f"{r['width']}x{r['height']}, i.e. latents of {r['latent'][0]} x {r['latent'][1]} x {r['latent'][2]} "
        f"(frames x height x width) and **{r['tokens']} spatio-temporal tokens** (2 x 2 patches), the largest "
        f"count whose full comparison ran in minutes on this shared {r['cores']}-core machine; {r['steps']} steps. Every "
        f"round runs each method once, in a rotated order; wall x and CPU x are medians over {r['repeats']} "
        "rounds of the per-round ratio uncached / method (CPU x: this process's CPU time, which leaves out the "
        "time other work held the core). FLOPs x: the library's analytic count (`run.stats`). The relative error "
        "is the L2 distance of the final latent from the uncached one.",
        "",
        "| method | setting | s per video (median) | FLOPs x | wall x | CPU x | CPU x / FLOPs x | full / cached steps "
        "| token fraction | rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['name']} | {row['config']} | {row['seconds']:.1f} | {row['flops_speedup']:.2f} | "
                     f"{row['wall_speedup']:.2f} | {row['cpu_speedup']:.2f} | "
                     f"{row['cpu_speedup'] / row['flops_speedup']:.2f} | {row['full_steps']} / "
                     f"{row['cached_steps']} | {row['token_fraction']:.3f} | {row['rel_error']:.4f} |")
    load = f" (load average {r['load_avg']:.1f} at the end)" if r.get("load_avg") is not None else ""
    lines += ["", f"The machine was shared with other work while this ran{load}: absolute seconds vary with "
              "its load, the side-by-side ratios much less, and CPU x is the steadier of the two. With random "
              "weights the errors are a sanity check (cached runs stay close to the uncached one), not a quality "
              "comparison between methods.", MARKERS[1]]
    return "\n".join(lines)


def headline(r: dict[str, Any]) -> list[Headline]:
    """The summary's row: FLOPs, wall and CPU-time speedup of the service presets on video tokens."""
    presets = [row for row in r["rows"] if row["name"].startswith("ClusCa ")]
    return [Headline(f"cache presets on video, Wan-architecture transformer {r['params_M']}M random weights, "
                     f"{r['tokens']} spatio-temporal tokens: FLOPs / wall / CPU time",
                     ", ".join(f"`{row['name'].removeprefix('ClusCa ')}` {row['flops_speedup']:.2f}x / "
                               f"{row['wall_speedup']:.2f}x / {row['cpu_speedup']:.2f}x" for row in presets),
                     summary_cpu(r["device"], r["cores"], r.get("load_avg")), day(r["date"]))]


def write_docs(r: dict[str, Any], path: Path = DOCS) -> None:
    write_section(*MARKERS, render(r), path)

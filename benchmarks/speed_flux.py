"""Speed of ClusCa on a FLUX-architecture transformer with random weights (CPU or GPU).

Runs a plain Euler flow-matching loop that calls the transformer directly (no text
encoder, no VAE). The cached run (hooked model inside ``clusca_run``) and the uncached
run (an unhooked copy with the same weights) advance in lockstep: each step of one is
followed by the same step of the other, alternating which goes first. On a CPU shared
with other work the load drifts over minutes, and step-level interleaving exposes both
runs to the same load, which run-level interleaving does not. Each repeat gives one
wall-clock ratio (sum of uncached step times / sum of cached step times); the median
over repeats is reported next to the analytic FLOPs speedup, with the cost of full
and cached steps and the share of k-means in the full steps.

    python benchmarks/speed_flux.py                       # the target setting (minutes on CPU)
    python benchmarks/speed_flux.py --width 256 --steps 20 --runs 3 --no-docs   # quick look
    python benchmarks/speed_flux.py --from-json benchmarks/results/speed_flux-cpu-float32-1-thread.json

Measures, writes the raw numbers to a JSON file (``--json``, default under
benchmarks/results/), then renders its section of docs/benchmarks.md from that file (other
sections are kept); ``--from-json`` renders again without measuring.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, print_targets, targets_line, write_section  # noqa: E402
from benchmarks._results import RESULTS, save  # noqa: E402
from benchmarks._sampling import FluxInputs, add_flux_shape_args, sync_for  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402
from clusca import ClusCaConfig, apply_clusca, clusca_run  # noqa: E402

TOPIC = "library"
SECTION = "## ClusCa speed, FLUX architecture"
NOTES = (
    "Cached run: the hooked model inside `clusca_run`. Uncached run: an unhooked copy with the same "
    "weights. The two advance in lockstep, step by step, alternating which goes first, so both see the "
    "same load on a shared machine. Wall-clock speedup: the median over repeats of "
    "(sum of uncached step times / sum of cached step times). FLOPs: the library's analytic count "
    "(`run.stats`). Both runs use the same torch thread count."
)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    head_dim = args.head_dim
    heads = args.width // head_dim
    rope = (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16)  # FLUX.1: (16, 56, 56) at 128
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=args.dual,
        num_single_layers=args.single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=args.text_dim,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=rope,
    )
    return model.to(device=device, dtype=dtype).eval()


def lockstep(cached_model, plain_model, inputs: FluxInputs, steps, device, cfg):
    """An uncached and a cached loop, each step of one followed by the same step of the other."""
    sync = sync_for(device)
    plain, cached = inputs.loop(plain_model, steps, sync=sync), inputs.loop(cached_model, steps, sync=sync)
    with clusca_run(cached_model, cfg, num_inference_steps=steps) as run:
        for i in range(steps):
            first, second = (plain, cached) if i % 2 == 0 else (cached, plain)
            first.step(i)
            second.step(i)
    return plain, cached, run.stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flux_shape_args(p, width=512, head_dim=64, dual=4, single=8, text_dim=4096, text_tokens=32, steps=50)
    p.add_argument("--latent-side", type=int, default=32, help="image tokens = side^2 (32 -> 1024)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--preset", default="fast")
    p.add_argument("--mode", default=None, help="override the preset's mode (fora|taylorseer|clusca)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--label", default=None, help="label of the results section in docs/benchmarks.md")
    p.add_argument("--json", default=None, help="raw results file (default: benchmarks/results/speed_flux-LABEL.json)")
    p.add_argument("--from-json", default=None, help="render the docs section from this results file; run nothing")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    return p.parse_args(argv)


def measure(args: argparse.Namespace, argv: list[str]) -> dict:
    """Run the benchmark; every number the report needs, unrounded, per run where it varies."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_model(args, device, dtype)
    inputs = FluxInputs.random(side=args.latent_side, text_tokens=args.text_tokens, text_dim=args.text_dim,
                               device=device, dtype=dtype)
    cfg = ClusCaConfig.preset(args.preset, **({"mode": args.mode} if args.mode else {}))
    plain_model = copy.deepcopy(model)  # never hooked: the exact original
    apply_clusca(model, cfg)

    # Warm-up of both paths (allocator, kernels) before timing.
    lockstep(model, plain_model, inputs, min(args.steps, cfg.warmup + 3), device, cfg)

    runs = {"uncached_s": [], "cached_s": [], "full_step_s": [], "cached_step_s": [], "full_step_overhead": [],
            "kmeans_share": []}
    full_idx = set(cfg.full_steps(args.steps))
    for r in range(args.runs):
        plain, cached, stats = lockstep(model, plain_model, inputs, args.steps, device, cfg)
        fs = [t for i, t in enumerate(cached.times) if i in full_idx]
        cs = [t for i, t in enumerate(cached.times) if i not in full_idx]
        runs["uncached_s"].append(sum(plain.times))
        runs["cached_s"].append(sum(cached.times))
        runs["full_step_s"].append(statistics.median(fs))
        runs["cached_step_s"].append(statistics.median(cs) if cs else None)
        runs["full_step_overhead"].append(statistics.median(
            [cached.times[i] / plain.times[i] - 1.0 for i in full_idx if i >= 1]))  # step 0 runs the FLOPs probe
        runs["kmeans_share"].append(stats.kmeans_ms / 1000.0 / sum(fs))
        print(f"run {r + 1}/{args.runs}: uncached {runs['uncached_s'][-1]:.2f}s  cached {runs['cached_s'][-1]:.2f}s  "
              f"ratio {runs['uncached_s'][-1] / runs['cached_s'][-1]:.2f}x", flush=True)
    out, ref = cached.x.float(), plain.x.float()
    return {
        "meta": {"argv": shlex.join(argv), "label": args.label or f"{device.type}, {args.dtype}",
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "device": f"{device.type} ({platform.processor() or platform.machine()})",
                 "threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": {"width": args.width, "dual": args.dual, "single": args.single,
                  "params": sum(p.numel() for p in model.parameters()), "image_tokens": args.latent_side ** 2,
                  "text_tokens": args.text_tokens, "dtype": args.dtype, "steps": args.steps},
        "config": {"preset": args.preset, **cfg.to_dict()},
        "stats": {"full_steps": stats.full_steps, "cached_steps": stats.cached_steps,
                  "token_fraction": stats.token_fraction, "flops_speedup": stats.flops_speedup,
                  "cache_bytes": stats.cache_bytes},
        "runs": runs,
        "rel_error": ((out - ref).norm() / ref.norm()).item(),
    }


def run_ratios(res: dict) -> list[float]:
    """Each run's wall-clock speedup: its uncached time over its cached time."""
    return [b / a for b, a in zip(res["runs"]["uncached_s"], res["runs"]["cached_s"])]


def headline(res: dict) -> list[Headline]:
    """The summary's row: this label's FLOPs and wall-clock speedup."""
    m, flops = res["meta"], res["stats"]["flops_speedup"]
    wall = statistics.median(run_ratios(res))
    on = cpu(m["device"]) if m["device"].startswith("cpu") else m["device"]
    model = res["model"]
    return [Headline(f"ClusCa `{res['config']['preset']}`, FLUX architecture {model['params'] / 1e6:.0f}M random "
                     f"weights, {model['image_tokens']} image tokens ({m['label']})",
                     f"**{flops:.2f}x** fewer FLOPs, **{wall:.2f}x** wall clock ({wall / flops:.3f} of FLOPs)",
                     f"{on}, {m['threads']} thread(s)", day(m.get("date")))]


def summarise(res: dict) -> tuple[list[tuple[str, str]], list[tuple[str, bool]]]:
    """The report's table rows and targets, from the raw results."""
    m, c, st, runs = res["model"], res["config"], res["stats"], res["runs"]
    n = len(runs["uncached_s"])
    ratios = run_ratios(res)
    wall = statistics.median(ratios)
    cached = [t for t in runs["cached_step_s"] if t is not None]
    kmeans = statistics.median(runs["kmeans_share"])
    rows = [
        ("device", f"{res['meta']['device']}, torch threads {res['meta']['threads']}"),
        ("model", f"FLUX architecture, random weights, width {m['width']}, {m['dual']} dual + {m['single']} single "
                  f"blocks, {m['params'] / 1e6:.1f}M params"),
        ("tokens", f"{m['image_tokens']} image + {m['text_tokens']} text, batch 1, {m['dtype']}"),
        ("schedule", f"{m['steps']} steps, preset `{c['preset']}` ({c['mode']}, interval {c['interval']}, warm-up "
                     f"{c['warmup']}, order {c['order']}, K {c['clusters']}, gamma {c['gamma']})"),
        ("full / cached steps", f"{st['full_steps']} / {st['cached_steps']}"),
        (f"uncached run (median of {n})", f"{statistics.median(runs['uncached_s']):.2f} s"),
        (f"cached run (median of {n})", f"{statistics.median(runs['cached_s']):.2f} s"),
        ("full step / cached step (median)", f"{statistics.median(runs['full_step_s']) * 1000:.1f} ms / "
                                             f"{statistics.median(cached) * 1000 if cached else float('nan'):.1f} ms"),
        ("full step overhead vs the same uncached step (median)",
         f"{statistics.median(runs['full_step_overhead']) * 100:+.1f}%"),
        ("token fraction", f"{st['token_fraction']:.4f}"),
        ("**FLOPs speedup** (analytic)", f"{st['flops_speedup']:.2f}x"),
        ("**wall-clock speedup** (median of per-run ratios)",
         f"{wall:.2f}x  (runs: {', '.join(f'{r:.2f}' for r in ratios)})"),
        ("wall / FLOPs speedup", f"{wall / st['flops_speedup']:.3f}"),
        ("k-means share of full-step time", f"{kmeans * 100:.2f}%"),
        ("cache memory (peak)", f"{st['cache_bytes'] / 2**20:.1f} MiB"),
        ("relative L2 error of the final latent vs uncached", f"{res['rel_error']:.4f}"),
    ]
    targets = [
        ("FLOPs speedup >= 4.8x", st["flops_speedup"] >= 4.8),
        ("wall >= 0.9 x FLOPs speedup", wall >= 0.9 * st["flops_speedup"]),
        ("k-means <= 3% of full steps", kmeans <= 0.03),
    ]
    return rows, targets


def markers(label: str) -> tuple[str, str]:
    return f"<!-- speed-flux {label}:start -->", f"<!-- speed-flux {label}:end -->"


def render(res: dict) -> str:
    """This label's marked section of docs/benchmarks.md."""
    label = res["meta"]["label"]
    start, end = markers(label)
    rows, targets = summarise(res)
    body = [start, f"{SECTION} ({label})", "", f"`python benchmarks/speed_flux.py {res['meta']['argv']}`".replace(" `", "`"),
            "", NOTES, "", "| quantity | value |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in rows]
    body += ["", targets_line(targets), end]
    return "\n".join(body) + "\n"


def write_docs(res: dict, path: Path | None = None) -> None:
    """Rewrite this label's marked section of docs/benchmarks.md; the text around it stays."""
    write_section(*markers(res["meta"]["label"]), render(res), path or DOCS)


def default_json(label: str) -> Path:
    return RESULTS / f"speed_flux-{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.json"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        res = measure(args, argv)
        print(f"wrote {save(res, args.json or default_json(res['meta']['label']))}")
    rows, targets = summarise(res)
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    print_targets(targets)
    if not args.no_docs:
        write_docs(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

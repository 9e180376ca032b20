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

Results are written to a section of docs/benchmarks.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, write_section  # noqa: E402
from clusca import ClusCaConfig, apply_clusca, clusca_run  # noqa: E402

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


def make_inputs(args, device, dtype):
    side = args.latent_side
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1, side * side, 64, generator=g)
    enc = torch.randn(1, args.text_tokens, args.text_dim, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    img_ids = torch.zeros(side * side, 3)
    img_ids[:, 1] = torch.arange(side).repeat_interleave(side)
    img_ids[:, 2] = torch.arange(side).repeat(side)
    txt_ids = torch.zeros(args.text_tokens, 3)
    to = dict(device=device, dtype=dtype)
    return x.to(**to), enc.to(**to), pooled.to(**to), img_ids.to(**to), txt_ids.to(**to)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Loop:
    """One Euler flow-matching loop, advanced a step at a time."""

    def __init__(self, model, inputs, steps: int, device) -> None:
        self.model, self.inputs, self.steps, self.device = model, inputs, steps, device
        x, *_ = inputs
        self.x = x.clone()
        self.sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
        self.guidance = torch.full((1,), 3.5, device=device, dtype=x.dtype)
        self.times: list[float] = []

    @torch.no_grad()
    def step(self, i: int) -> None:
        _, enc, pooled, img_ids, txt_ids = self.inputs
        t0 = time.perf_counter()
        v = self.model(
            hidden_states=self.x,
            encoder_hidden_states=enc,
            pooled_projections=pooled,
            timestep=torch.full((1,), self.sigmas[i], device=self.device, dtype=self.x.dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=self.guidance,
            return_dict=False,
        )[0]
        self.x = self.x + (self.sigmas[i + 1] - self.sigmas[i]) * v
        sync(self.device)
        self.times.append(time.perf_counter() - t0)


def lockstep(cached_model, plain_model, inputs, steps, device, cfg) -> tuple[Loop, Loop, object]:
    plain = Loop(plain_model, inputs, steps, device)
    cached = Loop(cached_model, inputs, steps, device)
    with clusca_run(cached_model, cfg, num_inference_steps=steps) as run:
        for i in range(steps):
            first, second = (plain, cached) if i % 2 == 0 else (cached, plain)
            first.step(i)
            second.step(i)
    return plain, cached, run.stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dual", type=int, default=4)
    p.add_argument("--single", type=int, default=8)
    p.add_argument("--latent-side", type=int, default=32, help="image tokens = side^2 (32 -> 1024)")
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--preset", default="fast")
    p.add_argument("--mode", default=None, help="override the preset's mode (fora|taylorseer|clusca)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--label", default=None, help="label of the results section in docs/benchmarks.md")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_model(args, device, dtype)
    inputs = make_inputs(args, device, dtype)
    cfg = ClusCaConfig.preset(args.preset)
    if args.mode:
        cfg = ClusCaConfig.preset(args.preset, mode=args.mode)
    plain_model = copy.deepcopy(model)  # never hooked: the exact original
    apply_clusca(model, cfg)
    params = sum(p.numel() for p in model.parameters())

    # Warm-up of both paths (allocator, kernels) before timing.
    lockstep(model, plain_model, inputs, min(args.steps, cfg.warmup + 3), device, cfg)

    ratios, base_t, cache_t, full_t, cached_t, full_over, kmeans_share = [], [], [], [], [], [], []
    stats = None
    full_idx = set(cfg.full_steps(args.steps))
    for r in range(args.runs):
        plain, cached, stats = lockstep(model, plain_model, inputs, args.steps, device, cfg)
        base_t.append(sum(plain.times))
        cache_t.append(sum(cached.times))
        ratios.append(base_t[-1] / cache_t[-1])
        fs = [t for i, t in enumerate(cached.times) if i in full_idx]
        cs = [t for i, t in enumerate(cached.times) if i not in full_idx]
        full_t.append(statistics.median(fs))
        cached_t.append(statistics.median(cs) if cs else float("nan"))
        full_over.append(statistics.median(
            [cached.times[i] / plain.times[i] - 1.0 for i in full_idx if i >= 1]))  # step 0 runs the FLOPs probe
        kmeans_share.append(stats.kmeans_ms / 1000.0 / sum(fs))
        print(
            f"run {r + 1}/{args.runs}: uncached {base_t[-1]:.2f}s  cached {cache_t[-1]:.2f}s  "
            f"ratio {ratios[-1]:.2f}x",
            flush=True,
        )
    out, ref = cached.x, plain.x

    wall = statistics.median(ratios)
    b_med, c_med = statistics.median(base_t), statistics.median(cache_t)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    rows = [
        ("device", f"{device.type} ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}"),
        ("model", f"FLUX architecture, random weights, width {args.width}, {args.dual} dual + {args.single} single blocks, {params / 1e6:.1f}M params"),
        ("tokens", f"{args.latent_side ** 2} image + {args.text_tokens} text, batch 1, {args.dtype}"),
        ("schedule", f"{args.steps} steps, preset `{args.preset}` ({cfg.mode}, interval {cfg.interval}, warm-up {cfg.warmup}, order {cfg.order}, K {cfg.clusters}, gamma {cfg.gamma})"),
        ("full / cached steps", f"{stats.full_steps} / {stats.cached_steps}"),
        ("uncached run (median of %d)" % args.runs, f"{b_med:.2f} s"),
        ("cached run (median of %d)" % args.runs, f"{c_med:.2f} s"),
        ("full step / cached step (median)", f"{statistics.median(full_t) * 1000:.1f} ms / {statistics.median(cached_t) * 1000:.1f} ms"),
        ("full step overhead vs the same uncached step (median)", f"{statistics.median(full_over) * 100:+.1f}%"),
        ("token fraction", f"{stats.token_fraction:.4f}"),
        ("**FLOPs speedup** (analytic)", f"{stats.flops_speedup:.2f}x"),
        ("**wall-clock speedup** (median of per-run ratios)", f"{wall:.2f}x  (runs: {', '.join(f'{r:.2f}' for r in ratios)})"),
        ("wall / FLOPs speedup", f"{wall / stats.flops_speedup:.3f}"),
        ("k-means share of full-step time", f"{statistics.median(kmeans_share) * 100:.2f}%"),
        ("cache memory (peak)", f"{stats.cache_bytes / 2**20:.1f} MiB"),
        ("relative L2 error of the final latent vs uncached", f"{rel:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    targets = [
        ("FLOPs speedup >= 4.8x", stats.flops_speedup >= 4.8),
        ("wall >= 0.9 x FLOPs speedup", wall >= 0.9 * stats.flops_speedup),
        ("k-means <= 3% of full steps", statistics.median(kmeans_share) <= 0.03),
    ]
    for name, ok in targets:
        print(f"target {name}: {'met' if ok else 'NOT met'}")

    if not args.no_docs:
        label = args.label or f"{device.type}, {args.dtype}"
        write_docs(label, rows, targets, shlex.join(sys.argv[1:]))


def write_docs(label: str, rows, targets, argv: str, path: Path | None = None) -> None:
    """Rewrite this label's marked section of docs/benchmarks.md; the text around it stays."""
    heading = f"{SECTION} ({label})"
    start, end = f"<!-- speed-flux {label}:start -->", f"<!-- speed-flux {label}:end -->"
    body = [start, heading, "", f"`python benchmarks/speed_flux.py {argv}`".replace(" `", "`"), "", NOTES, "",
            "| quantity | value |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in rows]
    body += ["", "Targets: " + "; ".join(f"{n}: {'met' if ok else 'not met'}" for n, ok in targets), end]
    write_section(start, end, "\n".join(body) + "\n", **({"path": path} if path else {}))
    print(f"wrote {(path or DOCS).name}")


if __name__ == "__main__":
    main()

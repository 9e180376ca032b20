"""Cache presets on video: a served video model end to end, or a Wan-architecture transformer alone.

    python benchmarks/video_caches.py --tiny wan           # a tiny random WanPipeline built here (CPU, seconds)
    python benchmarks/video_caches.py --tiny hunyuan       # likewise, HunyuanVideoPipeline
    CLUSCA_MODELS=models.yaml python benchmarks/video_caches.py --model wan-1.3b --frames 33 --steps 30
    python benchmarks/video_caches.py --transformer --docs # a Wan-architecture transformer, random weights

Pipeline modes run the model the way a worker does (its registry entry, ``load_runner``, one
batch per call) once per preset, on the same prompts and seeds, and report for each: seconds
per frame (median over ``--repeats`` after an untimed round, presets interleaved), the run's
analytic FLOPs speedup and fraction of tokens computed, and PSNR / SSIM of every frame against
the uncached video of the same seed.

``--transformer`` times the denoising loop of a randomly initialised WanTransformer3DModel
called directly (flow-matching Euler, batch 1, no guidance), so the token count can be large
without a VAE or text encoder in the way: the presets plus FORA and TaylorSeer at the ``fast``
interval, each round running every method once in a rotated order; wall-clock and CPU-time
speedups are medians of the per-round ratios against the uncached run of the same round.
It saves its raw results (``--json``, default benchmarks/results/video_transformer.json) and
``--docs [PATH]`` renders its section of docs/benchmarks.md (or PATH) from them alone;
``--from-json FILE`` renders a saved file again without measuring. Pipeline modes save theirs
to benchmarks/results/video_caches-MODEL.json (or ``--json``), and ``--docs [PATH]`` renders
the model's own section from them the same way.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
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
from benchmarks._results import RESULTS, load, quoted_command, save  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402

TOPIC = "video"
PRESETS = ("off", "quality", "balanced", "fast")


def tiny_entry(kind: str, folder: Path) -> Any:
    """A registry entry for a tiny random video pipeline built into ``folder`` (no downloads)."""
    sys.path.insert(0, str(ROOT))
    from tests.worker.video_support import build_tiny_hunyuan_video, build_tiny_wan

    from service.registry import ModelEntry

    build = {"wan": (build_tiny_wan, "WanPipeline"), "hunyuan": (build_tiny_hunyuan_video, "HunyuanVideoPipeline")}
    builder, cls = build[kind]
    builder(folder / kind)
    return ModelEntry(name=f"tiny-{kind}", kind="diffusers", path=str(folder / kind), pipeline_class=cls,
                      defaults={"width": 64, "height": 48, "steps": 12, "guidance": 5.0, "num_frames": 9, "fps": 8,
                                "cache": "off"},
                      limits={"size_multiple": 16, "frame_step": 4},
                      options={"warmup": True, "call_kwargs": {"max_sequence_length": 16}})


def run(entry: Any, frames: int, steps: int, prompts: list[str], repeats: int, device: str) -> dict[str, Any]:
    import numpy as np

    from clusca.quality import psnr, ssim
    from service.worker.runners import Batch, load_runner

    runner = load_runner(entry, device)
    d = entry.defaults
    timings: dict[str, list[float]] = {p: [] for p in PRESETS}
    videos: dict[str, list[Any]] = {}
    stats: dict[str, Any] = {}
    for round_ in range(repeats + 1):  # round 0 is untimed: first calls of each setting pay one-off costs
        for preset in PRESETS:  # interleaved: a slow moment of the machine hits every preset alike
            batch = Batch(prompts=prompts, negative_prompts=None, seeds=list(range(len(prompts))), width=d.width,
                          height=d.height, steps=steps, guidance=d.guidance,
                          cache=entry.cache_config({"preset": preset}), num_frames=frames)
            t0 = time.perf_counter()
            out = runner.run(batch, lambda step: False)
            if round_:
                timings[preset].append((time.perf_counter() - t0) / (frames * len(prompts)))
            videos[preset], stats[preset] = [np.asarray(v) for v in out.images], out.stats
    results = {}
    for preset in PRESETS:
        ref, got = videos["off"], videos[preset]
        pairs = [(np.clip(r[k], 0, 1), np.clip(g[k], 0, 1)) for r, g in zip(ref, got) for k in range(len(r))]
        results[preset] = {
            "seconds_per_frame": statistics.median(timings[preset]),
            "flops_speedup": stats[preset].flops_speedup,
            "token_fraction": stats[preset].token_fraction,
            "cached_steps": stats[preset].cached_steps,
            "psnr": statistics.mean(psnr(r, g, cap=100.0) for r, g in pairs),
            "ssim": statistics.mean(ssim(r, g) for r, g in pairs),
        }
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--tiny", choices=["wan", "hunyuan"])
    which.add_argument("--model", help="a video model of the registry named by CLUSCA_MODELS")
    which.add_argument("--transformer", action="store_true", help="a Wan-architecture transformer alone")
    which.add_argument("--from-json", type=Path, help="render the section of this results file; run nothing")
    ap.add_argument("--frames", type=int, help="frames per video (default: the model's; --transformer: 17)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: the model's; --transformer: 20)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--docs", nargs="?", type=Path, const=DOCS, default=None,
                    help="render the section into docs/benchmarks.md (or this file)")
    wan = ap.add_argument_group("--transformer")
    wan.add_argument("--size", default="416x240", help="WIDTHxHEIGHT in pixels (multiples of 16)")
    wan.add_argument("--dim", type=int, default=384, help="model width (heads of 64)")
    wan.add_argument("--layers", type=int, default=8)
    wan.add_argument("--threads", type=int, default=1, help="torch threads")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    # The command as the docs quote it: where the results and the section went is left out.
    shown = quoted_command(argv, paths=("--json", "--docs")) + (["--docs"] if args.docs else [])
    if args.from_json:
        report = load(args.from_json)
    elif args.transformer:
        from benchmarks.video_transformer import bench

        report = bench(args, shown)
        print(f"wrote {save(report, args.json or RESULTS / 'video_transformer.json')}")
    else:
        report = bench_pipeline(args, shown)
        print(f"wrote {save(report, args.json or default_json(report))}")
    if args.docs:
        if "presets" in report:
            write_docs(report, args.docs)
        else:
            from benchmarks.video_transformer import write_docs as write_transformer_docs

            write_transformer_docs(report, args.docs)
    return report


def bench_pipeline(args: argparse.Namespace, shown: list[str]) -> dict[str, Any]:
    """Every preset on a served video model (``--tiny`` or ``--model``), as a worker runs it."""
    meta = {"argv": shlex.join(shown), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cores": os.cpu_count(), "machine": platform.machine(), "device": args.device,
            "load_avg": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            entry = tiny_entry(args.tiny, Path(tmp))
        else:
            from service.registry import Registry
            from service.settings import get_settings

            entry = Registry.load(get_settings().models_file).get(args.model)
            if entry is None or entry.output != "video":
                raise SystemExit(f"{args.model!r} is not a video model of the registry")
        frames = args.frames or entry.defaults.num_frames
        steps = args.steps or entry.defaults.steps
        prompts = [f"a short clip number {k}" for k in range(args.prompts)]
        results = run(entry, frames, steps, prompts, args.repeats, args.device)
    report = {"meta": meta, "model": entry.name, "frames": frames, "steps": steps,
              "size": f"{entry.defaults.width}x{entry.defaults.height}", "prompts": args.prompts,
              "repeats": args.repeats, "presets": results}
    print(f"{entry.name}: {frames} frames, {steps} steps, {report['size']}")
    print(f"{'preset':<10} {'s/frame':>9} {'speedup':>8} {'tokens':>7} {'PSNR':>7} {'SSIM':>6}")
    for preset, r in results.items():
        print(f"{preset:<10} {r['seconds_per_frame']:>9.4f} {r['flops_speedup'] or 1:>7.2f}x "
              f"{r['token_fraction'] or 1:>7.2f} {r['psnr']:>7.2f} {r['ssim']:>6.3f}")
    return report


def default_json(report: dict[str, Any]) -> Path:
    return RESULTS / f"video_caches-{re.sub(r'[^a-z0-9]+', '-', report['model'].lower()).strip('-')}.json"


def headline(r: dict[str, Any]) -> list[Headline]:
    """The summary's row: each preset's FLOPs speedup on the served pipeline (its quality too, for a real model)."""
    m = r["meta"]
    tiny = r["model"].startswith("tiny-")
    presets = ", ".join(f"`{name}` {p['flops_speedup'] or 1:.2f}x" + ("" if tiny else f" ({p['psnr']:.1f} dB)")
                        for name, p in r["presets"].items() if name != "off")
    on = cpu(m["machine"], m["cores"], m.get("load_avg")) if m["device"] == "cpu" else f"{m['device']}, {m['machine']}"
    return [Headline(f"video cache presets on a served pipeline ({r['model']}), FLOPs speedup"
                     + (" (tiny random model)" if tiny else ""), presets, on, day(m["date"]))]


def markers(model: str) -> tuple[str, str]:
    return f"<!-- video-caches {model}:start -->", f"<!-- video-caches {model}:end -->"


def render(r: dict[str, Any]) -> str:
    """The model's section: every preset's cost and its frames against the uncached video."""
    m = r["meta"]
    start, end = markers(r["model"])
    lines = [start, f"## Video: cache presets on a served pipeline ({r['model']})", "",
             f"`python benchmarks/video_caches.py {m['argv']}`".replace(" `", "`"), "",
             f"The model as a worker runs it (its registry entry, `load_runner`, one batch of {r['prompts']} "
             f"prompt(s) per call, device `{m['device']}`) on {m['cores']} CPU core(s), {m['machine']}: "
             f"{r['frames']} frames of {r['size']}, {r['steps']} steps. Every round runs each preset once; seconds "
             f"per frame are the median of {r['repeats']} timed rounds after an untimed one. PSNR and SSIM: every "
             "frame against the uncached video of the same seed (mean). FLOPs speedup and token fraction: the "
             "library's analytic count (`run.stats`)."]
    if r["model"].startswith("tiny-"):
        lines[-1] += (" The pipeline is tiny and random: its FLOPs and token figures hold, its quality figures "
                      "mean nothing.")
    if m["load_avg"] > 1:
        lines[-1] += (f" Other work shared the cores (1-minute load average {m['load_avg']:.1f} when the run "
                      "began), so the seconds are noisy.")
    lines += ["", "| preset | s per frame | FLOPs speedup | token fraction | cached steps | PSNR dB | SSIM |",
              "|---|---|---|---|---|---|---|"]
    for preset, p in r["presets"].items():
        lines.append(f"| {preset} | {p['seconds_per_frame']:.4f} | {p['flops_speedup'] or 1:.2f}x | "
                     f"{p['token_fraction'] or 1:.3f} | {p['cached_steps'] or 0} | {p['psnr']:.2f} | {p['ssim']:.4f} |")
    lines.append(end)
    return "\n".join(lines)


def write_docs(r: dict[str, Any], path: Path = DOCS) -> None:
    write_section(*markers(r["model"]), render(r), path)


if __name__ == "__main__":
    main()

"""`clusca tune` on the built-in model, checked on prompts it never saw.

    python benchmarks/tune_builtin.py                  # 6-minute tune, then the check (about 10 min)
    python benchmarks/tune_builtin.py --minutes 2 --no-docs

1. Tunes the built-in model with the library function behind `clusca tune`, for
   ``--minutes`` on this machine, *without* the checkpoint's own presets among the
   candidates (they are what the search is compared with, so it must find its own).
2. Runs the tuned presets, the library's (paper) presets and the checkpoint's hand-tuned
   presets on held-out prompts and seeds (``eval_set(n, seed=7)``, image i seeded 1000+i):
   PSNR and SSIM against the uncached image, the built-in checker's adherence, and the
   speedup timed as the tuner times it (``clusca.tune.interleaved_speedups``: batch 1, an
   uncached run between every few settings, by the tuner's clock, the wall clock beside it).
3. Saves every number (``--json``, default benchmarks/results/tune_builtin.json) and renders
   the `tune` section of docs/benchmarks.md (``--docs`` for another file) from them alone;
   other sections are kept. ``--from-json FILE`` renders a saved file again without measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, write_section  # noqa: E402
from benchmarks._summary import Headline, day  # noqa: E402
from benchmarks._results import RESULTS, load, save  # noqa: E402

START, END = "<!-- tune:start -->", "<!-- tune:end -->"
TOPIC = "builtin"
CLOCK_WHY = {"cpu": "the process's CPU time: one torch thread on a CPU, whose wall clock on an idle machine it is",
             "wall": "the wall clock"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--holdout", type=int, default=32, help="held-out prompts of the check")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds of the check")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/clusca-tune-bench")
    p.add_argument("--json", type=Path, default=RESULTS / "tune_builtin.json", help="the raw results file")
    p.add_argument("--from-json", type=Path, default=None, help="render the docs section from this file; run nothing")
    p.add_argument("--docs", type=Path, default=DOCS, help="the file whose section is rewritten")
    p.add_argument("--no-docs", action="store_true")
    a = p.parse_args(argv)
    if a.from_json:
        if not a.no_docs:
            write_docs(load(a.from_json), a.docs)
        return 0

    import numpy as np
    import torch

    import clusca.tune as ct
    from clusca import ClusCaConfig
    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
    from clusca_shapes.tools import checker, data
    from service.registry import builtin_entry
    from service.cli.tune import BUILTIN_PROMPTS

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    entry = builtin_entry()
    d = entry.defaults
    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    items = data.eval_set(BUILTIN_PROMPTS)
    prompts, scenes = [t for t, _ in items], [s for _, s in items]

    def check(images, idx):
        return [checker.check(img, scenes[i]).ok for img, i in zip(images, idx)]

    journal = work / "measurements.json"
    journal.unlink(missing_ok=True)
    t0 = time.perf_counter()
    res = ct.tune(pipe, prompts, minutes=a.minutes, steps=d.steps, guidance=d.guidance, height=d.height,
                  width=d.width, journal=journal, checker=check, baseline={}, batch=16,
                  meta={"model": "shapes"})
    tune_s = time.perf_counter() - t0
    res.plot(work / "pareto.png")

    # ---- the check on held-out prompts and seeds
    settings = {}
    for n in ct.TUNED_PRESETS:
        settings[f"tuned {n}"] = ClusCaConfig.from_dict({"preset": n, **res.presets[n]})
    for n in ct.TUNED_PRESETS:
        settings[f"paper {n}"] = ClusCaConfig.preset(n)
    for n in ct.TUNED_PRESETS:
        settings[f"hand-tuned {n}"] = entry.cache_config({"preset": n})
    gen = ct.pipeline_generate(pipe, steps=d.steps, guidance=d.guidance, height=d.height, width=d.width)
    held = data.eval_set(a.holdout, seed=7)
    h_items = [(t, 1000 + i) for i, (t, _) in enumerate(held)]
    h_scenes = [s for _, s in held]

    def batches(cfg):
        out = []
        for s in range(0, len(h_items), 16):
            out.append(gen(cfg, h_items[s:s + 16])[0])
        return np.concatenate(out)

    ref = batches(None)
    rows = {"uncached": {"adherence": 100.0 * np.mean([checker.check(x, s).ok for x, s in zip(ref, h_scenes)])}}
    unique = {ct.key_of(cfg): cfg for cfg in settings.values()}  # presets that coincide are run once
    measured = {}
    for k, cfg in unique.items():
        imgs = batches(cfg)
        measured[k] = {"label": ct.label(cfg),
                       "psnr": statistics.fmean(ct.psnr(x, y) for x, y in zip(imgs, ref)),
                       "ssim": statistics.fmean(ct.ssim(x, y) for x, y in zip(imgs, ref)),
                       "adherence": 100.0 * np.mean([checker.check(x, s).ok for x, s in zip(imgs, h_scenes)])}
    one = h_items[:1]
    gen(None, one)
    for cfg in unique.values():  # warm
        gen(cfg, one)
    # as the tuner times its finalists: every setting's run against the uncached runs around it
    clock = res.meta.get("clock", "wall")
    timing = ct.interleaved_speedups(lambda: gen(None, one), {k: (lambda c=cfg: gen(c, one)) for k, cfg in unique.items()},
                                     a.rounds, clock=clock)
    speed, wall = timing.speedups(), timing.speedups("wall")
    for name, cfg in settings.items():
        k = ct.key_of(cfg)
        rows[name] = {**measured[k], "speedup": speed[k], "wall_clock_speedup": wall[k]}

    targets = []
    for n in ct.TUNED_PRESETS:
        t, pp, h = rows[f"tuned {n}"], rows[f"paper {n}"], rows[f"hand-tuned {n}"]
        targets.append((f"tuned {n} dominates paper {n}: higher PSNR at an equal or better speedup",
                        f"{t['psnr']:.2f} vs {pp['psnr']:.2f} dB, {t['speedup']:.2f}x vs {pp['speedup']:.2f}x",
                        t["psnr"] > pp["psnr"] and t["speedup"] >= pp["speedup"]))
    # Against each hand-tuned preset: the best tuned preset at least as fast as it (held-out numbers).
    for n in ct.TUNED_PRESETS:
        h = rows[f"hand-tuned {n}"]
        fast_enough = [rows[f"tuned {m}"] for m in ct.TUNED_PRESETS
                       if rows[f"tuned {m}"]["speedup"] >= 0.98 * h["speedup"]]
        if fast_enough:
            b = max(fast_enough, key=lambda r: r["psnr"])
            targets.append((f"a tuned preset at the speed of hand-tuned {n} is within 0.5 dB of it, or better",
                            f"{b['label']}: {b['psnr'] - h['psnr']:+.2f} dB at {b['speedup']:.2f}x "
                            f"(hand-tuned {h['psnr']:.2f} dB at {h['speedup']:.2f}x)",
                            b["psnr"] >= h["psnr"] - 0.5))
        else:
            targets.append((f"a tuned preset at the speed of hand-tuned {n} is within 0.5 dB of it, or better",
                            f"no tuned preset as fast as its {h['speedup']:.2f}x", False))

    summary = {"minutes": a.minutes, "holdout": a.holdout, "rounds": a.rounds, "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tune_s": round(tune_s, 1),
               "plan": res.meta.get("plan"),
               "final_prompts": res.meta.get("final_prompts"), "all_rungs": res.meta.get("all_rungs"),
               "candidates": len(res.candidates), "images_measured": sum(len(c.items) for c in res.candidates),
               "presets": res.presets, "rows": rows, "targets": targets,
               "device": ct.describe_device("cpu"), "clock": clock, "group": ct.GROUP}
    summary = json.loads(json.dumps(summary, default=str))  # as saved: what the section is rendered from
    print(json.dumps(summary, indent=1))
    print(f"wrote {save(summary, a.json)}")
    if not a.no_docs:
        write_docs(summary, a.docs)
    return 0


def headline(s: dict) -> list[Headline]:
    """The summary's row: the checks of the tuned presets on held-out prompts, and where the presets landed."""
    tuned = {name.removeprefix("tuned "): r for name, r in s["rows"].items() if name.startswith("tuned ")}
    met = sum(1 for *_, ok in s["targets"] if ok)
    psnr = " / ".join(f"{r['psnr']:.2f}" for r in tuned.values())
    speed = " / ".join(f"{r['speedup']:.2f}x" for r in tuned.values())
    return [Headline(f"`clusca tune` on the built-in model, {s['minutes']:g} minutes, checked on {s['holdout']} "
                     "held-out prompts",
                     f"{met} of {len(s['targets'])} checks met; tuned {' / '.join(tuned)}: {psnr} dB at {speed}",
                     f"CPU {s['device'].removeprefix('cpu ')}", day(s["date"]))]


def write_docs(s: dict, path: Path = DOCS) -> None:
    write_section(START, END, render(s), path)


def render(s: dict) -> str:
    lines = [START, "## Per-model tuning (`clusca tune`) on the built-in model", "",
             f"Written by `python benchmarks/tune_builtin.py --minutes {s['minutes']:g}` on {s['date']}; "
             f"{s['device']}, "
             f"shared with other work. The tuner ran {s['tune_s']:.0f} s: {s['candidates']} settings, "
             f"{s['images_measured']} candidate images, rungs of {', '.join(map(str, s['plan']['rungs']))} "
             f"image(s), finalists timed interleaved against uncached. The checkpoint's own (hand-tuned) presets "
             "were left out of the search, so the tuner had to find its own. The check below is on "
             f"{s['holdout']} held-out prompts (`eval_set({s['holdout']}, seed=7)`, image i seeded 1000+i), "
             f"batch 1, {s['rounds']} interleaved rounds (an uncached run between every {s['group']} settings), counted as "
             "the tuner counts (CPU time: the median uncached run over the setting's median run; wall clock: the "
             "median of each run's ratio to the uncached runs around it). Speedups are by the tuner's "
             f"clock, `{s['clock']}` ({CLOCK_WHY[s['clock']]}); the wall clock of the same runs is the last column. "
             f"The machine's {s['cores']} cores were shared with other work while this ran, so wall-clock "
             "ratios are noisy; "
             "every number here comes from this one run, side by side.", "",
             "| target | measured | met |", "|---|---|---|"]
    for t, m, ok in s["targets"]:
        lines.append(f"| {t} | {m} | {'yes' if ok else 'no'} |")
    lines += ["", f"| setting | PSNR dB | SSIM | adherence % | speedup ({s['clock']}) | wall-clock speedup |",
              "|---|---|---|---|---|---|"]
    lines.append(f"| uncached | - | - | {s['rows']['uncached']['adherence']:.1f} | 1.00 | 1.00 |")
    for name, r in s["rows"].items():
        if name == "uncached":
            continue
        lines.append(f"| {name} ({r['label']}) | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['adherence']:.1f} | "
                     f"{r['speedup']:.2f} | {r['wall_clock_speedup']:.2f} |")
    lines += ["", f"Tuned `cache_presets`: `{json.dumps(s['presets'])}`.", END]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

"""The divergence guard on the built-in model: worst quality over a sweep of settings, and its cost.

    python benchmarks/guard_sweep.py                       # the sweep and the speed comparison
    python benchmarks/guard_sweep.py --prompts 2 --repeats 2 --no-docs   # a quick look
    python benchmarks/guard_sweep.py --from-json benchmarks/results/guard_sweep.json   # docs only

Quality: every preset (the model's own tuning, as the service resolves it, and the library's
paper presets) and a grid of admitted knob settings (each mode, Taylor orders 0-4, intervals
up to the schema's maximum, cluster counts, gamma values, the hermite predictor), each run
with the guard off and on, over the built-in model's evaluation prompts plus the prompt
that once collapsed to an all-black image, and two seeds (11 among them). PSNR of each
image against the uncached image of the same prompt and seed; the worst over the sweep is
the figure that matters, since the guard exists for the runs that fall apart.

Speed: on the presets, guard off, guard on, and guard on with a bound it never reaches (the
check's own cost, no trips), interleaved run by run and in a rotating order, median of
``--repeats`` rounds; ratios of median times per image. One torch thread.

Saves the raw results (``--json``, default benchmarks/results/guard_sweep.json) and renders
its marked section of docs/benchmarks.md from them alone.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, write_section  # noqa: E402
from benchmarks._results import RESULTS, measured_or_loaded, quoted_command  # noqa: E402

START, END = "<!-- guard-sweep:start -->", "<!-- guard-sweep:end -->"
# The prompt and seed behind the guard: cached at the paper's settings it came out all black.
COLLAPSE_PROMPT = "a black square on the right on a white background"
COLLAPSE_SEED = 11
SEEDS = (11, 12)
PSNR_CAP = 100.0
PSNR_TARGET = 15.0
COST_TARGET = 0.02
NEVER = 100.0  # a guard bound no run reaches: the guard's bookkeeping alone
STRICT = 0.1  # a tighter bound than the default, to show what quality costs


def settings(weights: str | Path | None = None) -> list[dict[str, Any]]:
    """(name, group, config) of every setting swept: the presets first, then the grid."""
    from clusca import ClusCaConfig
    from clusca.config import KNOB
    from service.registry import builtin_entry

    entry = builtin_entry(weights)
    most = int(KNOB["interval"].hi)
    out = []
    for name in ("quality", "balanced", "fast"):
        out.append({"name": f"preset {name}", "group": "presets", "preset": name,
                    "config": entry.cache_config({"preset": name}).to_dict()})
    for name in ("quality", "balanced", "fast"):
        out.append({"name": f"paper {name}", "group": "presets", "preset": f"paper {name}",
                    "config": ClusCaConfig.preset(name).to_dict()})
    grid = [
        ("fora N8", dict(mode="fora", interval=8)),
        (f"fora N{most}", dict(mode="fora", interval=most)),
        ("taylorseer N6 O1", dict(mode="taylorseer", interval=6, order=1)),
        (f"taylorseer N{most} O4", dict(mode="taylorseer", interval=most, order=4)),
        ("clusca N6 O0 K4 g0", dict(mode="clusca", interval=6, order=0, clusters=4, gamma=0.0)),
        ("clusca N10 O1 K1 g0.5", dict(mode="clusca", interval=10, order=1, clusters=1, gamma=0.5)),
        ("clusca N12 O3 K64 g0.05", dict(mode="clusca", interval=12, order=3, clusters=64, gamma=0.05)),
        ("clusca N8 O1 K16 g1", dict(mode="clusca", interval=8, order=1, clusters=16, gamma=1.0)),
        (f"clusca N{most} O2 hermite", dict(mode="clusca", interval=most, order=2, predictor="hermite")),
        ("clusca N6 O1 anchored", dict(mode="clusca", interval=6, order=1, gamma=0.007, propagation="anchored")),
    ]
    for name, kw in grid:
        out.append({"name": name, "group": "grid", "preset": None, "config": ClusCaConfig(**kw).validate().to_dict()})
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=6, help="evaluation prompts (besides the collapse prompt)")
    p.add_argument("--repeats", type=int, default=5, help="speed rounds (median of them)")
    p.add_argument("--speed-prompts", type=int, default=2, help="prompts per speed run (each with both seeds)")
    p.add_argument("--json", default=str(RESULTS / "guard_sweep.json"))
    p.add_argument("--from-json", default=None, help="render saved results; measure nothing")
    p.add_argument("--docs", type=Path, default=DOCS)
    p.add_argument("--no-docs", action="store_true")
    return p.parse_args(argv)


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    from benchmarks._metrics import psnr
    from clusca import ClusCaConfig, apply_clusca, clusca_run
    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
    from clusca_shapes.evaluation import evaluation_prompts

    torch.set_num_threads(1)
    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    apply_clusca(pipe.transformer)
    prompts = [COLLAPSE_PROMPT] + [p for p in evaluation_prompts(args.prompts)[0] if p != COLLAPSE_PROMPT]
    samples = [(p, s) for p in prompts for s in SEEDS]

    def generate(cfg: ClusCaConfig, prompt: str, seed: int):
        g = torch.Generator().manual_seed(seed)
        with clusca_run(pipe.transformer, cfg) as run:
            image = pipe(prompt, generator=g, output_type="np").images[0]
        return image, run.stats

    t0 = time.perf_counter()
    refs = {k: generate(ClusCaConfig(mode="off"), *k)[0] for k in samples}
    rows = []
    for s in settings():
        row = {k: s[k] for k in ("name", "group", "preset")}
        row["config"] = {k: v for k, v in s["config"].items() if k in ("mode", "interval", "warmup", "order", "clusters",
                                                                         "gamma", "predictor", "propagation")}
        for variant, guard in (("off", {"guard": False}), ("on", {"guard": True}),
                               ("strict", {"guard": True, "guard_bound": STRICT})):
            cfg = ClusCaConfig.from_dict({**s["config"], **guard})
            q, trips, full = [], [], []
            for prompt, seed in samples:
                image, st = generate(cfg, prompt, seed)
                q.append(psnr(image, refs[prompt, seed], cap=PSNR_CAP))
                trips.append(st.guard_trips)
                full.append(st.full_steps)
            worst = min(range(len(q)), key=q.__getitem__)
            row[variant] = {
                "psnr": q, "worst_psnr": q[worst], "worst_at": {"prompt": samples[worst][0], "seed": samples[worst][1]},
                "mean_psnr": statistics.fmean(q), "trips": trips, "mean_trips": statistics.fmean(trips),
                "max_trips": max(trips), "mean_full_steps": statistics.fmean(full)}
        rows.append(row)
        print(f"{row['name']:28s} worst {row['off']['worst_psnr']:5.1f} -> {row['on']['worst_psnr']:5.1f} dB "
              f"(strict {row['strict']['worst_psnr']:5.1f}), trips {row['on']['mean_trips']:.2f}/run "
              f"(strict {row['strict']['mean_trips']:.2f})", flush=True)
    sweep_s = time.perf_counter() - t0
    return {"command": " ".join(["python", "benchmarks/guard_sweep.py", *quoted_command(argv)]),
            "machine": f"{platform.machine()} CPU, {platform.system()}, 1 torch thread",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__, "steps": pipe.default_steps, "seeds": list(SEEDS), "prompts": prompts,
            "guard_bound": ClusCaConfig().guard_bound, "strict_bound": STRICT, "sweep_s": sweep_s, "settings": rows,
            "speed": measure_speed(args, generate, prompts[: args.speed_prompts])}


def measure_speed(args: argparse.Namespace, generate, prompts: list[str]) -> list[dict[str, Any]]:
    """Seconds per image of each preset with the guard off, on, and on but never tripping."""
    from clusca import ClusCaConfig

    variants = {"off": {"guard": False}, "on": {"guard": True}, "strict": {"guard": True, "guard_bound": STRICT},
                "check only": {"guard": True, "guard_bound": NEVER}}
    presets = [s for s in settings() if s["group"] == "presets"]
    times = {(s["name"], v): [] for s in presets for v in variants}
    trips = {(s["name"], v): 0 for s in presets for v in variants}
    samples = [(p, seed) for p in prompts for seed in SEEDS]
    for s in presets:  # one untimed pass: first-call costs are not the guard's
        generate(ClusCaConfig.from_dict(s["config"]), *samples[0])
    for r in range(args.repeats):
        for s in presets:
            order = list(variants)
            order = order[r % len(order):] + order[: r % len(order)]  # who goes first rotates
            for v in order:
                cfg = ClusCaConfig.from_dict({**s["config"], **variants[v]})
                t = time.perf_counter()
                for prompt, seed in samples:
                    _, st = generate(cfg, prompt, seed)
                    if r == 0:
                        trips[s["name"], v] += st.guard_trips
                times[s["name"], v].append((time.perf_counter() - t) / len(samples))
    out = []
    for s in presets:
        med = {v: statistics.median(times[s["name"], v]) for v in variants}
        out.append({"name": s["name"], "seconds_per_image": med, "times": {v: times[s["name"], v] for v in variants},
                    "trips_per_image": {v: trips[s["name"], v] / len(samples) for v in variants},
                    "speed_on": med["off"] / med["on"], "speed_strict": med["off"] / med["strict"],
                    "speed_check_only": med["off"] / med["check only"]})
        print(f"speed {s['name']:16s} on/off {out[-1]['speed_on']:.3f}, strict/off {out[-1]['speed_strict']:.3f}, "
              f"check only/off {out[-1]['speed_check_only']:.3f}, trips/image {out[-1]['trips_per_image']}", flush=True)
    return out


def summary(res: dict[str, Any]) -> dict[str, Any]:
    rows = res["settings"]
    worst_off = min(rows, key=lambda r: r["off"]["worst_psnr"])
    worst_on = min(rows, key=lambda r: r["on"]["worst_psnr"])
    worst_strict = min(rows, key=lambda r: r["strict"]["worst_psnr"])
    presets = [r for r in rows if r["group"] == "presets"]
    speed = res["speed"]
    return {"worst_off": worst_off, "worst_on": worst_on, "worst_strict": worst_strict,
            "preset_trips": statistics.fmean(r["on"]["mean_trips"] for r in presets),
            "preset_trips_strict": statistics.fmean(r["strict"]["mean_trips"] for r in presets),
            "worst_speed_on": min(speed, key=lambda s: s["speed_on"]),
            "worst_speed_strict": min(speed, key=lambda s: s["speed_strict"]),
            "worst_speed_check": min(speed, key=lambda s: s["speed_check_only"])}


def headline(res: dict[str, Any]) -> list[dict[str, Any]]:
    """A few summary rows (figure, value, machine, date) for the report's table."""
    s = summary(res)
    base = {"machine": res["machine"], "date": res["date"]}
    return [
        {**base, "figure": "worst PSNR vs uncached, guard off (built-in model sweep)",
         "value": f"{s['worst_off']['off']['worst_psnr']:.1f} dB ({s['worst_off']['name']})"},
        {**base, "figure": f"worst PSNR vs uncached, guard on, bound {res['guard_bound']:g} (built-in model sweep)",
         "value": f"{s['worst_on']['on']['worst_psnr']:.1f} dB ({s['worst_on']['name']})"},
        {**base, "figure": f"worst PSNR vs uncached, guard on, bound {res['strict_bound']:g} (built-in model sweep)",
         "value": f"{s['worst_strict']['strict']['worst_psnr']:.1f} dB ({s['worst_strict']['name']})"},
        {**base, "figure": f"guard trips per run on the presets, bound {res['guard_bound']:g} / {res['strict_bound']:g}",
         "value": f"{s['preset_trips']:.2f} / {s['preset_trips_strict']:.2f}"},
        {**base, "figure": f"preset speed with the guard on / off, bound {res['guard_bound']:g} (worst preset)",
         "value": f"{s['worst_speed_on']['speed_on']:.3f} ({s['worst_speed_on']['name']})"},
        {**base, "figure": f"preset speed with the guard on / off, bound {res['strict_bound']:g} (worst preset)",
         "value": f"{s['worst_speed_strict']['speed_strict']:.3f} ({s['worst_speed_strict']['name']})"},
        {**base, "figure": "preset speed, guard check only / off (worst preset)",
         "value": f"{s['worst_speed_check']['speed_check_only']:.3f} ({s['worst_speed_check']['name']})"},
    ]


def render(res: dict[str, Any]) -> str:
    s = summary(res)
    lines = [
        START,
        "## Divergence guard (built-in model)",
        "",
        f"`{res['command']}` on {res['machine']}, {res['date']}, torch {res['torch']}; {res['steps']} steps, "
        f"{len(res['prompts'])} prompts (the evaluation set's first ones and \"{COLLAPSE_PROMPT}\") x seeds "
        f"{', '.join(map(str, res['seeds']))}; guard off, on at its default bound {res['guard_bound']:g}, and on at "
        f"a strict bound {res['strict_bound']:g}. PSNR against the uncached image "
        "of the same prompt and seed; the worst over the prompts and seeds is what the guard is for. Trips: steps "
        "due to be cached that the guard computed in full, per run. `preset ...` are the presets as the service "
        "resolves them for this model, `paper ...` the library's.",
        "",
        "| setting | worst PSNR off / on / strict | mean PSNR off / on / strict | trips per run on (max) | "
        "trips per run strict (max) | full steps off / on / strict |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["settings"]:
        v = [r["off"], r["on"], r["strict"]]

        def each(key: str, v=v) -> str:
            return " / ".join(f"{x[key]:.1f}" for x in v)

        lines.append(f"| {r['name']} | {each('worst_psnr')} | {each('mean_psnr')} | "
                     f"{v[1]['mean_trips']:.2f} ({v[1]['max_trips']}) | {v[2]['mean_trips']:.2f} ({v[2]['max_trips']}) | "
                     f"{each('mean_full_steps')} |")
    lines += [
        "",
        f"Worst over the sweep: {s['worst_off']['off']['worst_psnr']:.1f} dB with the guard off "
        f"({s['worst_off']['name']}), {s['worst_on']['on']['worst_psnr']:.1f} dB with it on "
        f"({s['worst_on']['name']}), {s['worst_strict']['strict']['worst_psnr']:.1f} dB at the strict bound "
        f"({s['worst_strict']['name']}); target >= {PSNR_TARGET:g} dB: "
        f"{'met' if s['worst_on']['on']['worst_psnr'] >= PSNR_TARGET else 'not met'} at the default bound, "
        f"{'met' if s['worst_strict']['strict']['worst_psnr'] >= PSNR_TARGET else 'not met'} at the strict one.",
        "",
        "Speed on the presets: seconds per image, median of rounds in which the variants run in turn "
        "(rotating which goes first). *check only*: the guard on with a bound no run reaches, i.e. its bookkeeping "
        "without trips; *on* and *strict*: trips included (each trip is one more full step). "
        f"Cost target: at most {COST_TARGET:.0%} of a preset's speed.",
        "",
        "| preset | off s/image | speed on / off | speed strict / off | speed check only / off | trips per image on / strict |",
        "|---|---|---|---|---|---|",
    ]
    for sp in res["speed"]:
        t, n = sp["seconds_per_image"], sp["trips_per_image"]
        lines.append(f"| {sp['name']} | {t['off']:.3f} | {sp['speed_on']:.3f} | {sp['speed_strict']:.3f} | "
                     f"{sp['speed_check_only']:.3f} | {n['on']:.2f} / {n['strict']:.2f} |")
    lines += ["", END]
    return "\n".join(lines)


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    write_section(START, END, render(res), path)
    print(f"wrote {path.name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    res = measured_or_loaded(args.from_json, lambda: measure(args, argv), args.json)
    for row in headline(res):
        print(f"{row['figure']}: {row['value']}")
    if not args.no_docs:
        write_docs(res, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

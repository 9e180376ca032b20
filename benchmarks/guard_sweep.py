"""The divergence guard on the built-in model: worst quality over a sweep of settings, and its cost.

    python benchmarks/guard_sweep.py                       # the sweep and the speed comparison
    python benchmarks/guard_sweep.py --prompts 2 --repeats 2 --no-docs   # a quick look
    python benchmarks/guard_sweep.py --from-json benchmarks/results/guard_sweep.json   # docs only
    python benchmarks/guard_sweep.py --sweep-from benchmarks/results/guard_sweep.json  # speed again

Quality: every preset (the model's own tuning, as the service resolves it, and the library's
paper presets) and a grid of admitted knob settings (each mode, Taylor orders 0-4, intervals
up to the schema's maximum, cluster counts, gamma values, the hermite predictor), each run
with the guard off, on with its bound alone (no layout window), on as it comes, and on at
a strict bound, over the built-in model's evaluation prompts plus the prompt
that once collapsed to an all-black image, and two seeds (11 among them). PSNR of each
image against the uncached image of the same prompt and seed; the worst over the sweep is
the figure that matters, since the guard exists for the runs that fall apart.

Speed: on the presets, guard off, on, on at a strict bound, and on with a bound it never
reaches (the check's own cost, no trips), each image in every variant back to back in a
rotating order, median of ``--repeats`` rounds; ratios of median CPU time per image (one
torch thread), wall clock beside them.

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
from benchmarks._summary import Headline, day  # noqa: E402

TOPIC = "library"
START, END = "<!-- guard-sweep:start -->", "<!-- guard-sweep:end -->"
# The prompt and seed behind the guard: cached at the paper's settings it came out all black.
COLLAPSE_PROMPT = "a black square on the right on a white background"
COLLAPSE_SEED = 11
SEEDS = (11, 12)
PSNR_CAP = 100.0
PSNR_TARGET = 15.0
COST_TARGET = 0.02
NEVER = 100.0  # a guard bound no run reaches: the guard's bookkeeping alone
STRICT = 0.25  # a tighter bound than the default, to show what quality costs
# The sweep's variants: off; the bound alone, without the layout window (what the window adds);
# the guard as it comes; and a stricter bound.
VARIANTS = {"off": {"guard": False}, "bound": {"guard": True, "guard_layout": 0.0}, "on": {"guard": True},
            "strict": {"guard": True, "guard_bound": STRICT}}
QUOTED_PATHS = ("--json", "--from-json", "--sweep-from", "--docs")  # where results went: not part of the command


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
    p.add_argument("--prompts", type=int, default=11, help="evaluation prompts (besides the collapse prompt)")
    p.add_argument("--repeats", type=int, default=5, help="speed rounds (median of them)")
    p.add_argument("--speed-prompts", type=int, default=2, help="prompts per speed run (each with both seeds)")
    p.add_argument("--json", default=str(RESULTS / "guard_sweep.json"))
    p.add_argument("--from-json", default=None, help="render saved results; measure nothing")
    p.add_argument("--sweep-from", default=None, help="take the quality sweep from these saved results and "
                   "measure the speed comparison only")
    p.add_argument("--docs", type=Path, default=DOCS)
    p.add_argument("--no-docs", action="store_true")
    return p.parse_args(argv)


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    from benchmarks._metrics import psnr
    from clusca import ClusCaConfig, apply_clusca, clusca_run
    from clusca.guard import layout_steps
    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
    from clusca_shapes.evaluation import evaluation_prompts

    torch.set_num_threads(1)
    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    apply_clusca(pipe.transformer)
    prompts = [COLLAPSE_PROMPT] + [p for p in evaluation_prompts(args.prompts)[0] if p != COLLAPSE_PROMPT]
    samples = [(p, s) for p in prompts for s in SEEDS]

    def generate(cfg: ClusCaConfig, prompt: str, seed: int):
        g = torch.Generator().manual_seed(seed)
        with clusca_run(pipe.transformer, cfg, num_inference_steps=pipe.default_steps) as run:
            image = pipe(prompt, generator=g, output_type="np").images[0]
        return image, run.stats

    if args.sweep_from:
        from benchmarks._results import load

        res = load(args.sweep_from)
        res["speed"] = measure_speed(args, generate, res["prompts"][: args.speed_prompts])
        res["command"] += "; speed measured again with " + " ".join(
            ["python", "benchmarks/guard_sweep.py", *quoted_command(argv, paths=QUOTED_PATHS), "--sweep-from ..."])
        res["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        return res
    t0 = time.perf_counter()
    refs = {k: generate(ClusCaConfig(mode="off"), *k)[0] for k in samples}
    rows = []
    for s in settings():
        row = {k: s[k] for k in ("name", "group", "preset")}
        row["config"] = {k: v for k, v in s["config"].items() if k in ("mode", "interval", "warmup", "order", "clusters",
                                                                         "gamma", "predictor", "propagation")}
        for variant, guard in VARIANTS.items():
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
        print(f"{row['name']:28s} worst {row['off']['worst_psnr']:5.1f} -> {row['bound']['worst_psnr']:5.1f} (bound "
              f"only) -> {row['on']['worst_psnr']:5.1f} dB "
              f"(strict {row['strict']['worst_psnr']:5.1f}), trips {row['on']['mean_trips']:.2f}/run "
              f"(strict {row['strict']['mean_trips']:.2f})", flush=True)
    sweep_s = time.perf_counter() - t0
    return {"command": " ".join(["python", "benchmarks/guard_sweep.py", *quoted_command(argv, paths=QUOTED_PATHS)]),
            "machine": f"{platform.machine()} CPU, {platform.system()}, 1 torch thread",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__, "steps": pipe.default_steps, "seeds": list(SEEDS), "prompts": prompts,
            "guard_bound": ClusCaConfig().guard_bound, "strict_bound": STRICT,
            "layout_steps": layout_steps(pipe.default_steps, ClusCaConfig().guard_layout), "sweep_s": sweep_s, "settings": rows,
            "speed": measure_speed(args, generate, prompts[: args.speed_prompts])}


def measure_speed(args: argparse.Namespace, generate, prompts: list[str]) -> list[dict[str, Any]]:
    """Per preset, the time per image with the guard off, on, strict, and on but never tripping.

    Every image is run in all variants back to back, in an order that rotates from image to
    image and round to round, so a change of load hits them alike. Both the process's CPU
    time (one torch thread: what the run itself cost, whatever else the machine runs) and
    the wall clock are kept; ratios are of medians over the rounds.
    """
    import clusca.guard as guard
    from clusca import ClusCaConfig

    variants = {"off": {"guard": False}, "on": {"guard": True}, "strict": {"guard": True, "guard_bound": STRICT},
                "check only": {"guard": True, "guard_bound": NEVER, "guard_layout": 0.0}}
    names = list(variants)
    # The guard's own time, summed over its entry points (the controller and the fresh-token
    # write call them through their modules, so wrapping them here times every call): the
    # output's factors on full steps, the estimate, the measured error and its host read, the
    # decisions; a trip's recomputation is a full step of the tripped samples, in the totals.
    spent = [0.0]

    depth = [0]  # the entry points call one another: only the outermost call is timed

    def timed(fn):
        def wrapper(*a, **kw):
            if depth[0]:
                return fn(*a, **kw)
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t
                depth[0] -= 1
        return wrapper

    names_timed = ("observe", "observe_samples", "trips", "measured", "over")
    originals = {n: getattr(guard, n) for n in names_timed}
    for n in names_timed:
        setattr(guard, n, timed(originals[n]))
    try:
        return _speed_rounds(args, generate, prompts, variants, names, spent, ClusCaConfig)
    finally:
        for n, fn in originals.items():
            setattr(guard, n, fn)


def _speed_rounds(args, generate, prompts, variants, names, spent, ClusCaConfig) -> list[dict[str, Any]]:
    presets = [s for s in settings() if s["group"] == "presets"]
    samples = [(p, seed) for p in prompts for seed in SEEDS]
    cpu = {(s["name"], v): [0.0] * args.repeats for s in presets for v in variants}
    wall = {(s["name"], v): [0.0] * args.repeats for s in presets for v in variants}
    trips = {(s["name"], v): 0 for s in presets for v in variants}
    own = {(s["name"], v): 0.0 for s in presets for v in variants}  # the guard's own wall time per image
    configs = {(s["name"], v): ClusCaConfig.from_dict({**s["config"], **variants[v]}) for s in presets for v in variants}
    for s in presets:  # one untimed pass: first-call costs are not the guard's
        generate(configs[s["name"], "off"], *samples[0])
    turn = 0
    for r in range(args.repeats):
        for s in presets:
            for prompt, seed in samples:
                turn += 1
                for v in names[turn % len(names):] + names[: turn % len(names)]:
                    g0, c0, w0 = spent[0], time.process_time(), time.perf_counter()
                    _, st = generate(configs[s["name"], v], prompt, seed)
                    cpu[s["name"], v][r] += (time.process_time() - c0) / len(samples)
                    wall[s["name"], v][r] += (time.perf_counter() - w0) / len(samples)
                    own[s["name"], v] += (spent[0] - g0) / (len(samples) * args.repeats)
                    if r == 0:
                        trips[s["name"], v] += st.guard_trips
    out = []
    for s in presets:
        n = s["name"]
        med = {v: statistics.median(cpu[n, v]) for v in variants}
        med_wall = {v: statistics.median(wall[n, v]) for v in variants}
        row = {"name": n, "cpu_seconds_per_image": med, "wall_seconds_per_image": med_wall,
               "cpu_times": {v: cpu[n, v] for v in variants}, "wall_times": {v: wall[n, v] for v in variants},
               "trips_per_image": {v: trips[n, v] / len(samples) for v in variants},
               "guard_seconds_per_image": {v: own[n, v] for v in variants},
               # The guard's bookkeeping as a share of a run, from the check-only variant's times.
               "guard_share": own[n, "check only"] / statistics.fmean(wall[n, "check only"])}
        for v, key in (("on", "speed_on"), ("strict", "speed_strict"), ("check only", "speed_check_only")):
            row[key] = med["off"] / med[v]
            row[f"wall_{key}"] = med_wall["off"] / med_wall[v]
        out.append(row)
        print(f"speed {n:16s} (CPU time) on/off {row['speed_on']:.3f}, strict/off {row['speed_strict']:.3f}, "
              f"check only/off {row['speed_check_only']:.3f}; wall on/off {row['wall_speed_on']:.3f}; "
              f"trips/image on {row['trips_per_image']['on']:.2f}, strict {row['trips_per_image']['strict']:.2f}; "
              f"guard's own time {row['guard_share']:.3%} of a run",
              flush=True)
    return out


def summary(res: dict[str, Any]) -> dict[str, Any]:
    rows = res["settings"]
    worst_off = min(rows, key=lambda r: r["off"]["worst_psnr"])
    worst_on = min(rows, key=lambda r: r["on"]["worst_psnr"])
    worst_strict = min(rows, key=lambda r: r["strict"]["worst_psnr"])
    worst_bound = min(rows, key=lambda r: r["bound"]["worst_psnr"])
    presets = [r for r in rows if r["group"] == "presets"]
    # The cost target is the model's own presets'; the paper's trip to catch their collapses.
    speed = [sp for sp in res["speed"] if sp["name"].startswith("preset ")] or res["speed"]
    return {"worst_off": worst_off, "worst_on": worst_on, "worst_strict": worst_strict, "worst_bound": worst_bound,
            "preset_trips": statistics.fmean(r["on"]["mean_trips"] for r in presets),
            "preset_trips_strict": statistics.fmean(r["strict"]["mean_trips"] for r in presets),
            "worst_speed_on": min(speed, key=lambda s: s["speed_on"]),
            "worst_speed_strict": min(speed, key=lambda s: s["speed_strict"]),
            "worst_speed_check": min(speed, key=lambda s: s["speed_check_only"]),
            "guard_share": max(speed, key=lambda s: s["guard_share"]),
            "most_trips": max(speed, key=lambda s: s["trips_per_image"]["on"])}


def headline(res: dict[str, Any]) -> list[Headline]:
    """The summary's rows: the sweep's worst PSNR without and with the guard, and what the guard costs."""
    s = summary(res)
    on, when = res["machine"], day(res["date"])
    return [
        Headline("divergence guard, built-in model sweep: worst PSNR vs uncached",
                 f"**{s['worst_off']['off']['worst_psnr']:.1f} dB** off, {s['worst_on']['on']['worst_psnr']:.1f} dB at "
                 f"bound {res['guard_bound']:g}, {s['worst_strict']['strict']['worst_psnr']:.1f} dB at bound "
                 f"{res['strict_bound']:g} (target >= 15 dB)", on, when),
        Headline("divergence guard: what it costs the model's presets (worst preset)",
                 f"**{s['guard_share']['guard_share']:.2%}** of a run in the guard's own work, "
                 f"{s['most_trips']['trips_per_image']['on']:.2f} trips per image (target <= {COST_TARGET:.0%}); CPU-time "
                 f"speed on / off {s['worst_speed_on']['speed_on']:.3f}, noisy", on, when),
    ]


def render(res: dict[str, Any]) -> str:
    s = summary(res)
    lines = [
        START,
        "## Divergence guard (built-in model)",
        "",
        f"`{res['command']}` on {res['machine']}, {res['date']}, torch {res['torch']}; {res['steps']} steps, "
        f"{len(res['prompts'])} prompts (\"{res['prompts'][0]}\" and the evaluation set's first ones) x seeds "
        f"{', '.join(map(str, res['seeds']))}; guard off, on with its bound {res['guard_bound']:g} alone (*bound "
        f"only*: no layout window), on as it comes (bound {res['guard_bound']:g} and the first "
        f"{res['layout_steps']} steps full), and on at a strict bound {res['strict_bound']:g} (with the window). "
        "PSNR against the uncached image "
        "of the same prompt and seed; the worst over the prompts and seeds is what the guard is for. Trips: steps "
        "due to be cached at which the guard computed one or more samples in full, per run. `preset ...` are the presets as the service "
        "resolves them for this model, `paper ...` the library's.",
        "",
        "| setting | worst PSNR off / bound only / on / strict | mean PSNR off / bound only / on / strict | "
        "trips per run on (max) | trips per run strict (max) | full steps off / bound only / on / strict |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["settings"]:
        v = [r["off"], r["bound"], r["on"], r["strict"]]

        def each(key: str, v=v) -> str:
            return " / ".join(f"{x[key]:.1f}" for x in v)

        lines.append(f"| {r['name']} | {each('worst_psnr')} | {each('mean_psnr')} | "
                     f"{v[2]['mean_trips']:.2f} ({v[2]['max_trips']}) | {v[3]['mean_trips']:.2f} ({v[3]['max_trips']}) | "
                     f"{each('mean_full_steps')} |")
    lines += [
        "",
        f"Worst over the sweep: {s['worst_off']['off']['worst_psnr']:.1f} dB with the guard off "
        f"({s['worst_off']['name']}), {s['worst_bound']['bound']['worst_psnr']:.1f} dB with its bound alone "
        f"({s['worst_bound']['name']}), {s['worst_on']['on']['worst_psnr']:.1f} dB with it on "
        f"({s['worst_on']['name']}), {s['worst_strict']['strict']['worst_psnr']:.1f} dB at the strict bound "
        f"({s['worst_strict']['name']}); target >= {PSNR_TARGET:g} dB: "
        f"{'met' if s['worst_on']['on']['worst_psnr'] >= PSNR_TARGET else 'not met'} at the default bound, "
        f"{'met' if s['worst_strict']['strict']['worst_psnr'] >= PSNR_TARGET else 'not met'} at the strict one.",
        "",
        "Speed on the presets: time per image, median over rounds; in each round every image runs in all "
        "variants back to back, in a rotating order. Speed ratios are of the process's CPU time (one torch "
        "thread, so what the run itself cost on a shared machine), wall-clock ratios in brackets. *check only*: "
        "the guard on with a bound no run reaches, i.e. its bookkeeping without trips; *on* and *strict*: trips "
        f"included (each trip is one more full step). *guard's own time*: the wall time spent inside the guard "
        "(its functions, timed), as a share of a check-only run: the part of the cost that noise cannot hide. "
        f"Cost target: at most {COST_TARGET:.0%} of a preset's speed.",
        "",
        "| preset | off CPU s/image | speed on / off | speed strict / off | speed check only / off | "
        "guard's own time per run | trips per image on / strict |",
        "|---|---|---|---|---|---|---|",
    ]
    for sp in res["speed"]:
        t, n = sp["cpu_seconds_per_image"], sp["trips_per_image"]
        lines.append(f"| {sp['name']} | {t['off']:.3f} | {sp['speed_on']:.3f} ({sp['wall_speed_on']:.3f}) | "
                     f"{sp['speed_strict']:.3f} ({sp['wall_speed_strict']:.3f}) | "
                     f"{sp['speed_check_only']:.3f} ({sp['wall_speed_check_only']:.3f}) | "
                     f"{sp['guard_share']:.2%} | {n['on']:.2f} / {n['strict']:.2f} |")
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
        print(f"{row.what}: {row.figure}")
    if not args.no_docs:
        write_docs(res, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inpainting edits on the built-in model, judged by its checker: adherence, kept pixels, the cache, latency.

    python benchmarks/edit_set.py                          # the edit set and the latency runs
    python benchmarks/edit_set.py --edits 8 --repeats 3 --no-docs   # a quick look
    python benchmarks/edit_set.py --from-json benchmarks/results/edit_set.json   # docs only

The edit set (``clusca_shapes.evaluation.edit_set``): evaluation prompts that place one object
on a side of the image give the base images (uncached, image k seeded k); each edit masks the
band the object stands in and asks for another object (another colour and shape) in its place on
the same background, at strength 1, the same seed. Measured, uncached, with the model's default
cache as the service resolves it (mask-aware: ``mask_share`` at its default) and with plain
ClusCa (the same settings, ``mask_share=0``), and both again at a setting where propagation
matters (``STRONG``: 16 clusters, gamma 0.2): the share of edits the checker finds right, the
PSNR outside the mask against the input image, and the PSNR inside the mask against the
uncached edit.

Latency: an edit (``--latency-steps`` steps at ``--latency-strength``, inpainting) against
text-to-image with as many steps as the edit denoises, uncached and with the default cache, batch
1, one torch thread; each round runs every variant back to back, median of ``--repeats`` rounds.
Ratios are of the process's CPU time (what the run itself cost on a shared machine), wall clock
beside them.
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

TOPIC = "builtin"
START, END = "<!-- edit-set:start -->", "<!-- edit-set:end -->"
FOLLOW_TARGET = 85.0  # % of edits showing the requested object
KEPT_TARGET = 35.0  # dB outside the mask against the input
DROP_TARGET = 3.0  # points of adherence the default cache may cost
PSNR_CAP = 100.0
VARIANTS = ("uncached", "default", "plain", "strong aware", "strong plain")
# A setting where propagation matters (16 clusters, gamma 0.2): the model's own presets propagate
# nothing (gamma 0) and refresh 4 tokens, where clustering the mask apart can change little.
STRONG = {"interval": 4, "order": 0, "clusters": 16, "gamma": 0.2}
QUOTED_PATHS = ("--json", "--from-json", "--docs")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edits", type=int, default=48, help="edits in the set")
    p.add_argument("--batch", type=int, default=16, help="edits per pipeline call")
    p.add_argument("--repeats", type=int, default=7, help="latency rounds (median of them)")
    p.add_argument("--latency-steps", type=int, default=40)
    p.add_argument("--latency-strength", type=float, default=0.5)
    p.add_argument("--json", default=str(RESULTS / "edit_set.json"))
    p.add_argument("--from-json", default=None, help="render saved results; measure nothing")
    p.add_argument("--docs", type=Path, default=DOCS)
    p.add_argument("--no-docs", action="store_true")
    return p.parse_args(argv)


def _box_mask(box, size=(32, 32)):
    import PIL.Image

    m = PIL.Image.new("L", size, 0)
    m.paste(255, box)
    return m


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import numpy as np
    import PIL.Image
    import torch

    from benchmarks._metrics import psnr
    from clusca import ClusCaConfig, apply_clusca, clusca_run
    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
    from clusca_shapes.evaluation import edit_set
    from service.registry import builtin_entry
    from service.worker.runners.diffusers import token_masks

    torch.set_num_threads(1)
    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    apply_clusca(pipe.transformer)
    default = builtin_entry().cache_config({})
    configs = {"uncached": ClusCaConfig(mode="off"), "default": default,
               "plain": ClusCaConfig.from_dict({**default.to_dict(), "mask_share": 0.0}),
               "strong aware": ClusCaConfig.from_dict({**default.to_dict(), **STRONG}),
               "strong plain": ClusCaConfig.from_dict({**default.to_dict(), **STRONG, "mask_share": 0.0})}
    edits, follows = edit_set(args.edits)
    steps = pipe.default_steps

    def call(cfg, prompts, seeds, steps=steps, images=None, masks=None, strength=1.0):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        kw = {} if images is None else dict(image=images, mask_image=masks, strength=strength)
        with clusca_run(pipe.transformer, cfg, num_inference_steps=round(steps * strength) if images else steps) as run:
            if masks is not None:
                run.set_token_mask(token_masks(masks))
            return pipe(prompts, generator=gens, num_inference_steps=steps, output_type="np", **kw).images

    t0 = time.perf_counter()
    bases, outs = [], {v: [] for v in VARIANTS}
    for lo in range(0, len(edits), args.batch):
        chunk = list(range(lo, min(lo + args.batch, len(edits))))
        base = call(configs["uncached"], [edits[k]["base"] for k in chunk], chunk)
        ims = [PIL.Image.fromarray((b * 255).round().astype(np.uint8)) for b in base]
        bases += [np.asarray(im, dtype=np.float32) / 255.0 for im in ims]
        masks = [_box_mask(edits[k]["box"]) for k in chunk]
        for v in VARIANTS:
            outs[v] += list(call(configs[v], [edits[k]["prompt"] for k in chunk], chunk, images=ims, masks=masks))
    quality_s = time.perf_counter() - t0
    rows = {}
    for v in VARIANTS:
        ok, kept, inside = [], [], []
        for k, e in enumerate(edits):
            m = np.asarray(_box_mask(e["box"])) >= 128
            img = outs[v][k]
            ok.append(bool(follows(img, k)))
            kept.append(psnr(img[~m], bases[k][~m], cap=PSNR_CAP))
            inside.append(psnr(img[m], outs["uncached"][k][m], cap=PSNR_CAP))
        rows[v] = {"follows": ok, "follows_pct": 100.0 * sum(ok) / len(ok), "kept_psnr": kept,
                   "min_kept_psnr": min(kept), "inside_psnr": inside, "mean_inside_psnr": statistics.fmean(inside)}
        print(f"{v:9s} follows {rows[v]['follows_pct']:5.1f}%  kept >= {rows[v]['min_kept_psnr']:.1f} dB  "
              f"inside vs uncached {rows[v]['mean_inside_psnr']:.2f} dB", flush=True)
    return {"command": " ".join(["python", "benchmarks/edit_set.py", *quoted_command(argv, paths=QUOTED_PATHS)]),
            "machine": f"{platform.machine()} CPU, {platform.system()}, 1 torch thread",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__, "steps": steps,
            "edits": edits, "default_cache": {k: v for k, v in default.to_dict().items()
                                              if k in ("mode", "interval", "order", "clusters", "gamma", "mask_share")},
            "quality_s": quality_s, "variants": rows,
            "latency": measure_latency(args, call, configs, edits[0], bases[0])}


def measure_latency(args, call, configs, edit: dict, base) -> dict[str, Any]:
    """Seconds per image: an edit against text-to-image at the steps the edit denoises, uncached and cached."""
    import numpy as np
    import PIL.Image

    image = PIL.Image.fromarray((base * 255).round().astype(np.uint8))
    mask = _box_mask(edit["box"])
    n, s = args.latency_steps, args.latency_strength
    denoised = round(n * s)
    runs = {}
    for cache in ("uncached", "default"):
        cfg = configs[cache]
        runs[f"edit {cache}"] = lambda cfg=cfg: call(cfg, [edit["prompt"]], [0], steps=n, images=[image], masks=[mask],
                                                     strength=s)
        runs[f"t2i {cache}"] = lambda cfg=cfg: call(cfg, [edit["prompt"]], [0], steps=denoised)
    names = list(runs)
    for name in names:  # one untimed pass: first-call costs
        runs[name]()
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            runs[name]()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    out = {"steps": n, "strength": s, "denoised": denoised, "repeats": args.repeats, "times": times,
           "cpu_times": cpu, "median_s": med, "median_cpu_s": med_cpu,
           "edit_over_t2i_uncached": med_cpu["edit uncached"] / med_cpu["t2i uncached"],
           "edit_over_t2i_cached": med_cpu["edit default"] / med_cpu["t2i default"],
           "wall_edit_over_t2i_uncached": med["edit uncached"] / med["t2i uncached"],
           "wall_edit_over_t2i_cached": med["edit default"] / med["t2i default"]}
    print(f"latency (CPU time): edit/t2i uncached {out['edit_over_t2i_uncached']:.3f}, cached "
          f"{out['edit_over_t2i_cached']:.3f} ({', '.join(f'{k} {v * 1000:.0f} ms' for k, v in med_cpu.items())})",
          flush=True)
    return out


def summary(res: dict[str, Any]) -> dict[str, Any]:
    v = res["variants"]
    return {"follows": v["uncached"]["follows_pct"], "follows_cached": v["default"]["follows_pct"],
            "follows_plain": v["plain"]["follows_pct"],
            "drop": v["uncached"]["follows_pct"] - v["default"]["follows_pct"],
            "kept": min(x["min_kept_psnr"] for x in v.values()),
            "gain": v["default"]["mean_inside_psnr"] - v["plain"]["mean_inside_psnr"],
            "strong_gain": v["strong aware"]["mean_inside_psnr"] - v["strong plain"]["mean_inside_psnr"]}


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def headline(res: dict[str, Any]) -> list[Headline]:
    """The set's adherence with the cache's drop and the kept pixels, and the edit's latency against text-to-image."""
    s, lat = summary(res), res["latency"]
    on, when = res["machine"], day(res["date"])
    return [
        Headline(f"built-in model, inpainting edit set ({len(res['edits'])} edits)",
                 f"**{s['follows']:.1f}%** show the object asked for (target >= {FOLLOW_TARGET:g}%), "
                 f"{s['drop']:+.1f} points with the default cache off -> on; outside the mask >= {s['kept']:.1f} dB; "
                 f"mask-aware vs plain ClusCa {s['gain']:+.2f} dB inside ({s['strong_gain']:+.2f} dB at K16 g0.2)",
                 on, when),
        Headline("built-in model, edit latency vs text-to-image at the steps it denoises",
                 f"**{lat['edit_over_t2i_uncached']:.2f}x** uncached, {lat['edit_over_t2i_cached']:.2f}x cached "
                 f"(CPU time; {lat['steps']} steps x strength {lat['strength']:g})", on, when),
    ]


def render(res: dict[str, Any]) -> str:
    s, v, lat = summary(res), res["variants"], res["latency"]
    cache = ", ".join(f"{k} {x}" for k, x in res["default_cache"].items())
    lines = [
        START,
        "## Inpainting edits (built-in model)",
        "",
        f"`{res['command']}` on {res['machine']}, {res['date']}, torch {res['torch']}; {res['steps']} steps, "
        f"{len(res['edits'])} edits (`clusca_shapes.evaluation.edit_set`): an evaluation prompt placing one object "
        f"on a side gives the base image (uncached, edit k seeded k), the band it stands in is masked, and the edit "
        f"asks for another colour and shape in its place on the same background (e.g. \"{res['edits'][0]['base']}\" "
        f"-> \"{res['edits'][0]['prompt']}\"), strength 1, the same seed. *Follows*: the checker finds that "
        f"object, alone of its colour, in its place. *Kept*: PSNR outside the mask against the input image (the "
        f"worst edit; {PSNR_CAP:g} = identical). *Inside*: mean PSNR inside the mask against the uncached edit. "
        f"*default*: the model's default cache as the service resolves it ({cache}), mask-aware; *plain*: the "
        "same with `mask_share=0` (the mask ignored by the cache); *strong aware* / *strong plain*: the same pair "
        f"at a setting where propagation matters ({', '.join(f'{k} {x}' for k, x in STRONG.items())}).",
        "",
        "| variant | follows % | kept dB (worst) | inside dB vs uncached |",
        "|---|---|---|---|",
    ]
    for name in VARIANTS:
        r = v[name]
        inside = "-" if name == "uncached" else f"{r['mean_inside_psnr']:.2f}"
        lines.append(f"| {name} | {r['follows_pct']:.1f} | {r['min_kept_psnr']:.1f} | {inside} |")
    lines += [
        "",
        f"Targets: follows >= {FOLLOW_TARGET:g}% ({_met(s['follows'] >= FOLLOW_TARGET)}: {s['follows']:.1f}%), kept "
        f">= {KEPT_TARGET:g} dB ({_met(s['kept'] >= KEPT_TARGET)}: {s['kept']:.1f} dB), the default cache's drop "
        f"<= {DROP_TARGET:g} points ({_met(s['drop'] <= DROP_TARGET)}: {s['drop']:+.1f}). Mask-aware against plain "
        f"ClusCa: {s['gain']:+.2f} dB inside the mask at the default, follows {s['follows_cached']:.1f}% against "
        f"{s['follows_plain']:.1f}%; {s['strong_gain']:+.2f} dB at the strong setting.",
        "",
        f"Latency, batch 1: an inpainting edit of {lat['steps']} steps at strength {lat['strength']:g} (it denoises "
        f"{lat['denoised']}) against text-to-image of {lat['denoised']} steps, median of {lat['repeats']} rounds, "
        "each running every variant back to back; CPU time of the process (one torch thread), wall clock in "
        "brackets.",
        "",
        "| cache | edit ms | text-to-image ms | edit / text-to-image |",
        "|---|---|---|---|",
    ]
    med, wall = lat["median_cpu_s"], lat["median_s"]
    for cache, key in (("uncached", "edit_over_t2i_uncached"), ("default", "edit_over_t2i_cached")):
        lines.append(f"| {cache} | {med[f'edit {cache}'] * 1000:.0f} ({wall[f'edit {cache}'] * 1000:.0f}) | "
                     f"{med[f't2i {cache}'] * 1000:.0f} ({wall[f't2i {cache}'] * 1000:.0f}) | "
                     f"{lat[key]:.3f} ({lat['wall_' + key]:.3f}) |")
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

"""The shipped LoRA style adapters of the built-in model: style, adherence, and what an adapter costs.

    python benchmarks/adapters.py                  # the documented run (CPU, about 15 minutes idle)
    python benchmarks/adapters.py -n 20 --rounds 3 --no-docs       # a quick look
    python benchmarks/adapters.py --from-json benchmarks/results/adapters.json

Four parts, all at the library level (``clusca.lora.LoraBank`` on the transformer, no service):

* quality: the first ``-n`` prompts of the fixed evaluation set drawn with no adapter and with
  each shipped adapter (``clusca_shapes/adapters/``), uncached and with the service's default
  cache; every image judged by the checker for prompt adherence and for each style
  (``checker.shows_style``). Targets: the adapter's style in >= 90% of the images, adherence
  at most 3 points below no adapter's under the same cache setting;
* overhead on the built-in model: one image of the default size and steps, batch 1, with no
  bank on the transformer, with the bank installed but no adapter chosen, and with a rank-16
  adapter of random weights, uncached and cached;
* overhead on the FLUX-architecture CPU proxy of ``benchmarks/speed_flux.py`` (its default
  shape): one transformer call, the same three variants;
* mixed batch: 8 images of the built-in model in one call, all with one adapter, half with
  each of the two shipped adapters, and with none.

Timings alternate their variants inside each round; the figures are medians over rounds.
Saves the raw results (``--json``, default benchmarks/results/adapters.json) and renders its
section of docs/benchmarks.md from them alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, print_targets, targets_line, write_section, written_by  # noqa: E402
from benchmarks._results import RESULTS, parsed_and_results, quoted_command  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402

START, END = "<!-- adapters:start -->", "<!-- adapters:end -->"
TOPIC = "builtin"
MIN_STYLE = 90.0  # percent of the images that show the adapter's style
MAX_DROP = 3.0  # adherence points an adapter may cost against no adapter
OVERHEAD_RANK = 16
MIXED_BATCH = 8
CACHES = ("uncached", "cached")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=200, help="prompts of the fixed evaluation set")
    p.add_argument("--seed", type=int, default=0, help="image i is drawn with generator seed seed + i")
    p.add_argument("--preset", default="balanced", help="the cache preset, as the service runs it for this model")
    p.add_argument("--rounds", type=int, default=7, help="rounds of each timing")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--adapters", default=None, help="folder of the adapters (default: the shipped ones)")
    p.add_argument("--proxy-side", type=int, default=32, help="FLUX proxy: image tokens = side^2")
    p.add_argument("--skip-proxy", action="store_true", help="leave out the FLUX proxy's timing")
    p.add_argument("--json", type=Path, default=RESULTS / "adapters.json", help="the raw results file")
    p.add_argument("--from-json", type=Path, default=None, help="render from this results file; run nothing")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    return p.parse_args(argv)


def random_adapter(model, targets, rank: int, seed: int = 0):
    """A rank-``rank`` adapter of random weights on every linear of ``model`` that ``targets`` match."""
    import re

    import torch

    from clusca.lora import LoraWeights

    patterns = [re.compile(t) for t in targets]
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(p.fullmatch(name) for p in patterns):
            layers[name] = (torch.randn(rank, mod.in_features, generator=g) / mod.in_features ** 0.5,
                            torch.randn(mod.out_features, rank, generator=g) * 0.01)
    return LoraWeights(f"random-r{rank}", rank, layers, alpha=float(rank))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each variant (name -> callable) per round, the variants alternating inside a
    round and their order rotating from one round to the next; one untimed warm-up each."""
    for fn in variants.values():
        fn()
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(_timed(variants[k]))
    return times


def _quality(pipe, bank, slots, prompts, scenes, a, steps, guidance, cache_cfg) -> dict:
    from benchmarks.builtin_model import generate
    from clusca_shapes.tools import checker

    out = {}
    for cache in CACHES:
        out[cache] = {}
        for name in ("none", *slots):
            images = []
            for start in range(0, len(prompts), 25):
                chunk = prompts[start:start + 25]
                bank.select([[(slots[name], 1.0)] if name != "none" else [] for _ in chunk])
                images += generate(pipe, chunk, a.seed + start, steps, guidance,
                                   run_cfg=cache_cfg if cache == "cached" else None)[0]
            results = [checker.check(img, s) for img, s in zip(images, scenes)]
            summary = checker.summarise(results, scenes)
            out[cache][name] = {
                "adherence": summary["adherence"],
                "groups": {g: v["adherence"] for g, v in summary["groups"].items()},
                "styles": {st: round(100.0 * sum(checker.shows_style(i, st) for i in images) / len(images), 2)
                           for st in slots},
            }
            print(f"{cache} {name}: adherence {out[cache][name]['adherence']}% styles {out[cache][name]['styles']}",
                  flush=True)
    return out


def _builtin_overhead(pipe, targets, a, steps, guidance, cache_cfg) -> dict:
    import torch

    from clusca import clusca_run
    from clusca.lora import LoraBank

    weights = random_adapter(pipe.transformer, targets, OVERHEAD_RANK, seed=1)

    def image(cfg=None):
        def run():
            g = torch.Generator().manual_seed(0)
            kw = dict(generator=[g], output_type="np", num_inference_steps=steps, guidance_scale=guidance)
            if cfg is None:
                pipe(["a red circle on the left"], **kw)
            else:
                with clusca_run(pipe.transformer, cfg, num_inference_steps=steps):
                    pipe(["a red circle on the left"], **kw)
        return run

    out = {}
    for cache, cfg in (("uncached", None), ("cached", cache_cfg)):
        plain = alternate({"no_bank": image(cfg)}, a.rounds)["no_bank"]
        bank = LoraBank(pipe.transformer, targets, slots=2, max_rank=OVERHEAD_RANK)
        bank.load(1, weights)

        def chosen(sets, cfg=cfg):
            run = image(cfg)
            return lambda: (bank.select(sets), run())

        times = alternate({"idle_bank": chosen([[]]), "adapter": chosen([[(1, 1.0)]])}, a.rounds)
        bank.remove()
        out[cache] = {"no_bank_s": plain, "idle_bank_s": times["idle_bank"], "adapter_s": times["adapter"]}
    return out


def _proxy_overhead(targets, a) -> dict:
    import torch

    from benchmarks import speed_flux
    from benchmarks._sampling import FluxInputs
    from clusca.lora import LoraBank

    args = speed_flux.parse_args(["--latent-side", str(a.proxy_side)])
    model = speed_flux.build_model(args, torch.device("cpu"), torch.float32)
    inputs = FluxInputs.random(side=args.latent_side, text_tokens=args.text_tokens, text_dim=args.text_dim)
    velocity = inputs.velocity(model)

    def call():
        with torch.no_grad():
            velocity(inputs.x, 0.5)

    rounds = max(3, a.rounds // 2)
    plain = alternate({"no_bank": call}, rounds)["no_bank"]
    bank = LoraBank(model, targets, slots=2, max_rank=OVERHEAD_RANK)
    bank.load(1, random_adapter(model, targets, OVERHEAD_RANK, seed=2))
    times = alternate({"idle_bank": lambda: (bank.select([[]]), call()),
                       "adapter": lambda: (bank.select([[(1, 1.0)]]), call())}, rounds)
    layers = len(bank.layers)
    bank.remove()
    return {"params": sum(p.numel() for p in model.parameters()), "width": args.width, "dual": args.dual,
            "single": args.single, "image_tokens": args.latent_side ** 2, "text_tokens": args.text_tokens,
            "layers": layers, "no_bank_s": plain, "idle_bank_s": times["idle_bank"], "adapter_s": times["adapter"]}


def _mixed(pipe, bank, slots, a, steps, guidance) -> dict:
    import torch

    from clusca_shapes.tools import data

    prompts = [t for t, _ in data.eval_set(MIXED_BATCH)]
    first, second = list(slots.values())[:2]
    sets = {"none": [[]] * MIXED_BATCH, "one": [[(first, 1.0)]] * MIXED_BATCH,
            "mixed": [[(first, 1.0)] if i % 2 == 0 else [(second, 1.0)] for i in range(MIXED_BATCH)]}

    def batch(chosen):
        def run():
            bank.select(chosen)
            gens = [torch.Generator().manual_seed(i) for i in range(MIXED_BATCH)]
            pipe(prompts, generator=gens, output_type="np", num_inference_steps=steps, guidance_scale=guidance)
        return run

    times = alternate({k: batch(v) for k, v in sets.items()}, a.rounds)
    return {"batch": MIXED_BATCH, **{f"{k}_s": v for k, v in times.items()}}


def measure(a: argparse.Namespace, argv: list[str]) -> dict:
    import torch

    from clusca import apply_clusca, remove_clusca
    from clusca.lora import LoraBank, load_lora
    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline
    from clusca_shapes.evaluation import ADAPTER_STYLES, ADAPTERS_DIR
    from clusca_shapes.tools import data
    from clusca_shapes.tools.lora_train import FLUX_TARGETS
    from service.registry import builtin_entry

    torch.set_num_threads(a.threads)
    res = {"argv": shlex.join(quoted_command(argv, paths=("--json", "--from-json"), flags=("--no-docs",))),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
           "load_avg_1min": round(os.getloadavg()[0], 2), "n_prompts": a.n, "seed": a.seed, "preset": a.preset,
           "rounds": a.rounds, "overhead_rank": OVERHEAD_RANK}
    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    steps, guidance = pipe.default_steps, pipe.default_guidance
    res.update(steps=steps, guidance=guidance, size=f"{pipe.default_size[1]}x{pipe.default_size[0]}")
    cache_cfg = builtin_entry(None).cache_config({"preset": a.preset})
    folder = Path(a.adapters) if a.adapters else ADAPTERS_DIR
    adapters = {name: load_lora(folder / name, name=name) for name in ADAPTER_STYLES}
    res["adapters"] = {name: {"rank": w.rank, "alpha": w.alpha, "layers": len(w.layers), "bytes": w.nbytes,
                              "file_bytes": (folder / name / "adapter_model.safetensors").stat().st_size}
                       for name, w in adapters.items()}

    bank = LoraBank(pipe.transformer, FLUX_TARGETS, slots=len(adapters), max_rank=OVERHEAD_RANK)
    slots = {}
    for slot, (name, w) in enumerate(adapters.items(), 1):
        bank.load(slot, w)
        slots[name] = slot
    apply_clusca(pipe.transformer)
    try:
        items = data.eval_set(a.n)
        t0 = time.perf_counter()
        res["quality"] = _quality(pipe, bank, slots, [t for t, _ in items], [s for _, s in items], a, steps, guidance,
                                  cache_cfg)
        res["quality_s"] = round(time.perf_counter() - t0, 1)
        res["mixed"] = _mixed(pipe, bank, slots, a, steps, guidance)
        bank.remove()
        res["builtin_overhead"] = _builtin_overhead(pipe, FLUX_TARGETS, a, steps, guidance, cache_cfg)
    finally:
        remove_clusca(pipe.transformer)
    if not a.skip_proxy:
        res["proxy_overhead"] = _proxy_overhead(FLUX_TARGETS, a)
    return res


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _over(v: dict, key: str) -> float:
    """The median per-round cost of ``key`` over no bank, in percent."""
    return 100.0 * (_med(v[key]) / _med(v["no_bank_s"]) - 1.0)


def targets(res: dict) -> list[tuple[str, bool]]:
    out = []
    q = res["quality"]
    for cache in CACHES:
        none = q[cache]["none"]["adherence"]
        for name in res["adapters"]:
            r = q[cache][name]
            out.append((f"{name} shows its style in >= {MIN_STYLE:g}% ({cache})", r["styles"][name] >= MIN_STYLE))
            out.append((f"{name} costs <= {MAX_DROP:g} adherence points ({cache})", none - r["adherence"] <= MAX_DROP))
    return out


def _quality_rows(res: dict) -> list[str]:
    q, names = res["quality"], list(res["adapters"])
    head = ("| adapter | cache | all right | points vs no adapter | " + " | ".join(f"shows {n}" for n in names)
            + " | one object | relations | counts |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for cache in CACHES:
        none = q[cache]["none"]["adherence"]
        for name in ("none", *names):
            r = q[cache][name]
            drop = "-" if name == "none" else f"{r['adherence'] - none:+.2f}"
            styles = " | ".join(f"**{r['styles'][n]}%**" if n == name else f"{r['styles'][n]}%" for n in names)
            groups = " | ".join(f"{r['groups'].get(g, '-')}%" for g in ("one_object", "relation", "count"))
            rows.append(f"| {name} | {cache} | {r['adherence']}% | {drop} | {styles} | {groups} |")
    return rows


def _overhead_rows(res: dict) -> list[str]:
    rows = ["| model | call | no bank | bank, no adapter | rank-16 adapter | adapter over no bank |",
            "|---|---|---|---|---|---|"]
    for cache, v in res["builtin_overhead"].items():
        rows.append(f"| built-in ({res['size']}) | one image, {res['steps']} steps, batch 1, {cache} | "
                    f"{_med(v['no_bank_s']):.3f} s | {_med(v['idle_bank_s']):.3f} s | {_med(v['adapter_s']):.3f} s | "
                    f"{_over(v, 'adapter_s'):+.1f}% |")
    p = res.get("proxy_overhead")
    if p:
        rows.append(f"| FLUX proxy ({p['params'] / 1e6:.0f}M, {p['dual']} + {p['single']} blocks, width {p['width']}) | "
                    f"one transformer call, {p['image_tokens']} + {p['text_tokens']} tokens, batch 1 | "
                    f"{_med(p['no_bank_s']):.3f} s | {_med(p['idle_bank_s']):.3f} s | {_med(p['adapter_s']):.3f} s | "
                    f"{_over(p, 'adapter_s'):+.1f}% |")
    return rows


def headline(res: dict) -> list[Headline]:
    """The summary's rows: each adapter's style and adherence cost, and what an adapter costs in time."""
    q, on, date = res["quality"], cpu(res["cpu"], res["cores"]), day(res["date"])
    none = q["uncached"]["none"]["adherence"]
    styles = "; ".join(f"`{n}` **{q['uncached'][n]['styles'][n]}%** its style, adherence "
                       f"{q['uncached'][n]['adherence'] - none:+.2f} points (cached {q['cached'][n]['styles'][n]}%, "
                       f"{q['cached'][n]['adherence'] - q['cached']['none']['adherence']:+.2f})" for n in res["adapters"])
    rows = [Headline(f"built-in model, LoRA style adapters ({res['n_prompts']} prompts)", styles, on, date)]
    cost = f"built-in {_over(res['builtin_overhead']['uncached'], 'adapter_s'):+.1f}%"
    if res.get("proxy_overhead"):
        cost += f", FLUX proxy {_over(res['proxy_overhead'], 'adapter_s'):+.1f}%"
    m = res["mixed"]
    cost += (f"; mixed batch of {m['batch']} {_med(m['mixed_s']) / _med(m['one_s']):.2f}x the time of one adapter's")
    rows.append(Headline(f"LoRA adapter rank {res['overhead_rank']}, time over no adapter", cost, on, date))
    return rows


def write_docs(res: dict, path: Path = DOCS) -> None:
    m = res["mixed"]
    body = [
        START,
        "## LoRA style adapters (built-in model)",
        "",
        written_by("adapters.py", res["argv"], res["date"]) + f"; CPU `{res['cpu']}`, {res['threads']} torch "
        f"thread(s), {res['cores']} cores (1-minute load average {res['load_avg_1min']} when it began), torch "
        f"{res['torch']}. The adapters: " + ", ".join(
            f"`{n}` (rank {v['rank']}, alpha {v['alpha']:g}, {v['layers']} linears, {v['file_bytes'] / 1024:.0f} KiB)"
            for n, v in res["adapters"].items())
        + f", on a `clusca.lora.LoraBank` of the transformer. The first {res['n_prompts']} prompts of "
        f"`clusca_shapes.tools.data.eval_set`, one image each (image i: generator seed {res['seed']} + i), "
        f"{res['steps']} steps, guidance {res['guidance']}; \"cached\" is the service's default, the "
        f"`{res['preset']}` preset as the service runs it for this model. \"All right\" is the adherence "
        "checker's verdict; \"shows\" is the style checker's (`clusca_shapes.tools.checker.shows_style`).",
        "",
        *_quality_rows(res),
        "",
        targets_line(targets(res)) + ".",
        "",
        f"Time (medians of {res['rounds']} rounds, the variants alternating inside a round; the FLUX proxy "
        f"{max(3, res['rounds'] // 2)}): no bank on the transformer, the bank installed with no adapter chosen, "
        f"and a rank-{res['overhead_rank']} adapter of random weights on the same linears:",
        "",
        *_overhead_rows(res),
        "",
        f"Mixed batch: {m['batch']} images in one call of the built-in pipeline, {res['steps']} steps, uncached: "
        f"all with one adapter {_med(m['one_s']):.3f} s, half with each adapter {_med(m['mixed_s']):.3f} s "
        f"({_med(m['mixed_s']) / _med(m['one_s']):.2f}x), no adapter (bank installed) {_med(m['none_s']):.3f} s. "
        "Each row of the batch gathers its own adapter's matrices whatever the mix, so both batches do the same "
        "work; a difference between them is the load of the shared cores, not the mix.",
        END,
    ]
    write_section(START, END, "\n".join(body), path)


def main(argv: list[str] | None = None) -> int:
    a, res = parsed_and_results(argv, parse_args, measure)
    print_targets(targets(res))
    if not a.no_docs:
        write_docs(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

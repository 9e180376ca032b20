"""Latency of the caches on the full-size FLUX.1-dev transformer (random weights, GPU).

The transformer has FLUX.1-dev's exact architecture (19 dual-stream + 38 single-stream
blocks, width 3072, about 12B parameters) with random weights, so no checkpoint is
needed. A 1024x1024 image is 4096 packed latent tokens, plus 512 text tokens. Each
method runs a full Euler flow-matching loop of ``--steps`` steps at every batch size;
methods alternate within a round (uncached, ours, diffusers'), and the latency is the
median over rounds. Our hooks are installed only for our own methods and removed again,
so the uncached and diffusers runs see the plain model.

Image-to-image rows (``--img2img-strength``, default 0.6; 0 leaves them out): the same
transformer denoising the last ``strength`` share of the schedule from a random "image"
latent noised to that level, as FLUX's img2img pipeline runs it (the VAE encode left out,
like the text encoders), uncached and with ClusCa ``balanced``; the cache's schedule counts
the steps denoised, as the service's runner sets it.

    python benchmarks/gpu_flux.py                                # on a GPU machine
    python benchmarks/gpu_flux.py --render benchmarks/results/gpu_flux-h200.json   # the docs section only

The raw results go to ``--json`` (default benchmarks/results/gpu_flux.json, rewritten
after every run); the docs section is rendered from results files alone (``--render``
merges several, e.g. a batch-1 run and a batch-4 run), so it can be rewritten anywhere.

``--deadline`` (seconds) stops starting new runs once the time is nearly spent, so a
run on a rented machine always leaves its partial results behind.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._caches import Method  # noqa: E402
from benchmarks._docs import DOCS, write_section  # noqa: E402
from benchmarks._results import RESULTS, load, save  # noqa: E402
from benchmarks._sampling import FluxInputs, add_flux_shape_args, sync_for  # noqa: E402
from benchmarks._summary import Headline, day  # noqa: E402

START, END = "<!-- gpu-flux:start -->", "<!-- gpu-flux:end -->"
TOPIC = "gpu"


LORA_RANK = 16


def methods(lora_rank: int = LORA_RANK) -> list:
    """The large-model list of the cache comparison, plus the `quality` preset and, with a
    ``lora_rank``, an adapter of that rank (random weights) uncached and with `fast`, its cached
    steps replayed as CUDA graphs and eager (beside the same pair without the adapter)."""
    from benchmarks.cache_compare import large_methods
    from clusca import ClusCaConfig

    ms = large_methods(quick=False)
    ms.insert(1, Method("ClusCa quality (N4)", "ClusCa", clusca=ClusCaConfig.preset("quality")))
    fast = ClusCaConfig.preset("fast")
    # The rows above capture cached steps as CUDA graphs (capture="auto", the default); the
    # same `fast` runs eagerly, on the module hooks alone, and compiled (compile_clusca).
    ms.insert(4, Method("ClusCa fast (N6), eager", "ClusCa", clusca=ClusCaConfig.preset("fast", capture="off")))
    ms.insert(5, Method("ClusCa fast (N6), module hooks", "ClusCa", clusca=fast, lean=False))
    ms.insert(6, Method("ClusCa fast (N6), compiled", "ClusCa", clusca=fast, compiled=True))
    ms.insert(8, Method("TaylorSeer N6 O1, eager", "TaylorSeer",
                        clusca=ClusCaConfig.preset("fast", mode="taylorseer", capture="off")))
    if lora_rank:
        ms.insert(1, AdapterMethod(f"LoRA r{lora_rank}, uncached", "LoRA", lora_rank=lora_rank))
        ms.append(AdapterMethod(f"LoRA r{lora_rank}, ClusCa fast (N6)", "LoRA", clusca=fast, lora_rank=lora_rank))
        ms.append(AdapterMethod(f"LoRA r{lora_rank}, ClusCa fast (N6), eager", "LoRA",
                                clusca=ClusCaConfig.preset("fast", capture="off"), lora_rank=lora_rank))
    return ms


@dataclass(frozen=True)
class AdapterMethod(Method):
    """A method run with a LoRA adapter of random weights on every image (``clusca.lora.LoraBank``
    on the attention and MLP linears, as the service installs it)."""

    lora_rank: int = 0


_ADAPTERS: dict = {}  # (id of the model, rank) -> the random adapter's weights, drawn once


def adapter_bank(model, rank: int):
    """A ``LoraBank`` on ``model`` holding one rank-``rank`` adapter of random weights, chosen for every image."""
    from benchmarks.adapters import random_adapter
    from clusca.lora import LoraBank
    from clusca_shapes.tools.lora_train import FLUX_TARGETS

    key = (id(model), rank)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = random_adapter(model, FLUX_TARGETS, rank, seed=3)
    bank = LoraBank(model, FLUX_TARGETS, slots=1, max_rank=rank)
    bank.load(1, _ADAPTERS[key])
    bank.select([[(1, 1.0)]])  # one entry: every row of the batch takes it
    return bank


def build_model(a: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the run dtype: no 48 GB fp32 copy
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=a.dual, num_single_layers=a.single,
                attention_head_dim=a.head_dim, num_attention_heads=a.width // a.head_dim,
                joint_attention_dim=a.text_dim, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(a.head_dim // 8, 7 * a.head_dim // 16, 7 * a.head_dim // 16),
            )
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: torch.device) -> None:
    done = sync_for(device)
    if done is not None:
        done()


def img2img_methods() -> list:
    """The image-to-image rows: uncached and the default preset."""
    from benchmarks._caches import Method
    from clusca import ClusCaConfig

    return [Method("uncached", "uncached"),
            Method("ClusCa balanced (N5)", "ClusCa", clusca=ClusCaConfig.preset("balanced"))]


def edit_loop(inputs, model, steps: int, strength: float, **kwargs):
    """The Euler loop of an image-to-image edit: from a random image latent noised to the level
    ``strength`` down to 0 in ``round(steps * strength)`` steps."""
    denoised = max(1, round(steps * strength))
    loop = inputs.loop(model, denoised, **kwargs)
    g = torch.Generator().manual_seed(4321)
    image = torch.randn(inputs.x.shape, generator=g).to(inputs.x)
    loop.x = (1.0 - strength) * image + strength * inputs.x
    loop.sigmas = torch.linspace(strength, 0.0, denoised + 1).tolist()
    return loop


def run_once(method, model, inputs, steps, device, strength: float | None = None) -> dict:
    from benchmarks._caches import Env, activate
    from clusca import remove_clusca
    from clusca.install import is_clusca_applied

    # diffusers' cache hooks leave reference cycles holding their states: collect them
    # now, or they are freed during the next run and hide its real peak.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    bank = adapter_bank(model, method.lora_rank) if getattr(method, "lora_rank", 0) else None
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    sync(device)
    t0 = time.perf_counter()
    try:
        denoised = steps if strength is None else max(1, round(steps * strength))
        with activate(method, model, Env(steps=denoised)) as probe:
            announce = probe.run.set_step if probe.run else None
            loop = inputs.loop(model, steps, before_step=announce) if strength is None else \
                edit_loop(inputs, model, steps, strength, before_step=announce)
            out = loop.run()
            probe.sample_memory()
            sync(device)
        seconds = time.perf_counter() - t0
    finally:
        if is_clusca_applied(model):
            remove_clusca(model)
        if bank is not None:
            bank.remove()
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    return {
        "seconds": seconds,
        "peak_extra_bytes": int(peak),
        "cache_bytes": int(probe.cache_bytes),
        "flops_speedup": probe.stats.flops_speedup if probe.stats else None,
        "capture": probe.stats.capture if probe.stats else None,
        "graph_replays": probe.stats.graph_replays if probe.stats else 0,
        "finite": bool(torch.isfinite(out).all()),
        "out": out,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flux_shape_args(p, width=3072, head_dim=128, dual=19, single=38, text_dim=4096, text_tokens=512, steps=50)
    p.add_argument("--side", type=int, default=64, help="packed latent side: 64 -> 1024x1024 pixels")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--rounds", default="3,1", help="rounds per batch size (methods alternate in a round)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--img2img-strength", type=float, default=0.6,
                   help="image-to-image rows at this strength (0: none)")
    p.add_argument("--deadline", type=float, default=0.0, help="seconds; 0 = none")
    p.add_argument("--lora-rank", type=int, default=LORA_RANK,
                   help="rank of the random LoRA adapter of the adapter rows (0: no adapter rows)")
    p.add_argument("--json", default=str(RESULTS / "gpu_flux.json"),
                   help="raw results, saved after every run (default: benchmarks/results/gpu_flux.json)")
    p.add_argument("--render", nargs="+", default=None,
                   help="only write docs/benchmarks.md from these results files (merged); run nothing")
    a = p.parse_args(argv)
    if a.render:
        write_docs(merge([load(path) for path in a.render]))
        return 0

    t_start = time.time()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(a, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    info = {
        "command": "python benchmarks/gpu_flux.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": a.dtype, "steps": a.steps, "params": params,
        "tokens": [a.side * a.side, a.text_tokens], "init_seconds": round(time.time() - t_start, 1),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    print(json.dumps(info), flush=True)
    results: list[dict] = []
    # (method, edit strength or None for text-to-image), in the order a round runs them.
    ms = [(m, None) for m in methods(a.lora_rank)]
    if a.img2img_strength > 0:
        ms += [(m, a.img2img_strength) for m in img2img_methods()]
    batches = [int(b) for b in a.batches.split(",")]
    rounds = [int(r) for r in a.rounds.split(",")]
    rounds += [rounds[-1]] * (len(batches) - len(rounds))

    def keep() -> None:
        if a.json:
            save({"info": info, "results": results}, a.json)

    per_image = 0.0  # uncached seconds per image, once measured
    for batch, n_rounds in zip(batches, rounds):
        if a.deadline and time.time() - t_start + per_image * batch * 1.5 > a.deadline:
            print(f"deadline: skipping batch {batch}", flush=True)
            continue
        inputs = FluxInputs.random(side=a.side, text_tokens=a.text_tokens, text_dim=a.text_dim, batch=batch,
                                   device=device, dtype=dtype)
        # Warm-up: kernels, allocator, and the first-call costs of each method. Its
        # timings (scaled to the full step count) predict each run for the deadline.
        last: dict[tuple, float] = {}
        warm_steps = min(a.steps, 5)
        for m, edit in ms:
            last[m.name, edit] = run_once(m, model, inputs, warm_steps, device, edit)["seconds"] * a.steps / warm_steps
        reference: dict = {}
        for r in range(n_rounds):
            for m, edit in ms:
                expected = last[m.name, edit]
                label = m.name if edit is None else f"{m.name}, img2img {edit:g}"
                if a.deadline and time.time() - t_start + expected * 1.2 > a.deadline:
                    print(f"deadline: skipping {label} batch {batch} round {r + 1}", flush=True)
                    continue
                res = run_once(m, model, inputs, a.steps, device, edit)
                out = res.pop("out")
                plain = m.uncached and not getattr(m, "lora_rank", 0)
                if plain:
                    reference[edit] = out.float()
                if edit in reference:
                    ref = reference[edit]
                    res["rel_l2"] = float((out.float() - ref).norm() / ref.norm())
                last[m.name, edit] = res["seconds"]
                if plain and edit is None:
                    per_image = res["seconds"] / batch
                results.append({"method": m.name, "batch": batch, "round": r + 1, "edit": edit, **res})
                print(f"batch {batch} round {r + 1} {label}: {res['seconds']:.2f} s "
                      f"peak+{res['peak_extra_bytes'] / 2**30:.2f} GiB cache {res['cache_bytes'] / 2**20:.0f} MiB "
                      f"finite={res['finite']}", flush=True)
                keep()
    info["total_seconds"] = round(time.time() - t_start, 1)
    keep()
    print(table({"info": info, "results": results}))
    return 0


def summarise(data: dict) -> list[dict]:
    rows = []
    res = data["results"]
    # Text-to-image rows first, then each edit strength's; speedups against the uncached run of the same kind.
    edits = sorted({r.get("edit") for r in res} - {None})
    for edit in [None, *edits]:
        for batch in sorted({r["batch"] for r in res if r.get("edit") == edit}):
            group = [r for r in res if r["batch"] == batch and r.get("edit") == edit]
            base = [r["seconds"] for r in group if r["method"] == "uncached"]
            base_s = statistics.median(base) if base else float("nan")
            names = list(dict.fromkeys(r["method"] for r in group))
            for name in names:
                runs = [r for r in group if r["method"] == name]
                sec = statistics.median(r["seconds"] for r in runs)
                rows.append({
                    "batch": batch, "method": name, "edit": edit, "runs": len(runs), "seconds": sec,
                    "per_image": sec / batch, "speedup": base_s / sec,
                    "flops_speedup": runs[0]["flops_speedup"],
                    "peak_gib": max(r["peak_extra_bytes"] for r in runs) / 2**30,
                    "cache_mib": max(r["cache_bytes"] for r in runs) / 2**20,
                    "rel_l2": statistics.median(r.get("rel_l2", float("nan")) for r in runs),
                    "capture": runs[-1].get("capture") or "-",
                    "finite": all(r["finite"] for r in runs),
                })
    return rows


def table(data: dict) -> str:
    lines = ["| batch | method | runs | s per image | speedup | FLOPs speedup | extra GPU memory GiB | cache MiB | rel. L2 vs uncached | capture |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summarise(data):
        fs = f"{r['flops_speedup']:.2f}x" if r["flops_speedup"] else "-"
        method = r["method"] if r["edit"] is None else f"img2img strength {r['edit']:g}: {r['method']}"
        lines.append(f"| {r['batch']} | {method} | {r['runs']} | {r['per_image']:.2f} | {r['speedup']:.2f}x | {fs} "
                     f"| {r['peak_gib']:.2f} | {r['cache_mib']:.0f} | {r['rel_l2']:.3f} | {r['capture']} |")
    return "\n".join(lines)


def merge(parts: list[dict]) -> dict:
    """Several results files as one: the first one's description, every file's runs."""
    info = dict(parts[0]["info"])
    extra = [p["info"]["command"] for p in parts[1:] if p["info"]["command"] != info["command"]]
    if extra:
        info["extra_commands"] = list(dict.fromkeys([*info.get("extra_commands", []), *extra]))
    return {"info": info, "results": [r for p in parts for r in p["results"]]}


def render(data: dict) -> str:
    """The gpu-flux section of docs/benchmarks.md, from raw results."""
    info = data["info"]
    return "\n".join([
        START,
        "## GPU: full-size FLUX.1-dev transformer, random weights",
        "",
        " and ".join(f"`{c}`" for c in [info["command"], *info.get("extra_commands", [])])
        + f" on one {info['device']} (torch {info['torch']}). "
        f"{info['params'] / 1e9:.1f}B parameters in {info['dtype']}, {info['tokens'][0]} image + "
        f"{info['tokens'][1]} text tokens (1024x1024), {info['steps']} Euler steps, the transformer "
        "alone (no text encoders, no VAE). Methods alternate inside each round; seconds are the median "
        "over rounds; speedup is against the uncached run of the same batch size. Extra GPU memory is "
        "the peak above the weights during the run (activations plus cache). The capture column is "
        "`run.stats.capture` (`replayed`: cached steps ran as CUDA graphs); `-` marks runs that "
        "predate graph capture, whose cached steps ran eagerly." + (
            " The `LoRA r<rank>` rows run an adapter of that rank with random weights on every image "
            "(`clusca.lora.LoraBank` on the attention and MLP linears, as the service installs it), uncached and "
            "with `fast`, its cached steps replayed as CUDA graphs and eager (compare `ClusCa fast (N6)` and its "
            "`eager` row for the same without the adapter); their rel. L2 is against the uncached run without "
            "the adapter."
            if any(r["method"].startswith("LoRA") for r in data["results"]) else "") + (
            " `img2img strength s` rows denoise the last s share of the steps from a noised random image "
            "latent (no VAE), their speedup against the uncached img2img run."
            if any(r.get("edit") is not None for r in data["results"]) else ""),
        "",
        table(data),
        "",
        END,
    ])


def headline(data: dict) -> list[Headline]:
    """The summary's rows: ClusCa's speedup on the full-size transformer, per batch size."""
    info, out = data["info"], []
    rows = [r for r in summarise(data) if r["edit"] is None]
    for batch in sorted({r["batch"] for r in rows}):
        ours = [r for r in rows
                if r["batch"] == batch and r["method"].split(" (")[0] in ("ClusCa balanced", "ClusCa fast")]
        base = next((r for r in rows if r["batch"] == batch and r["method"] == "uncached"), None)
        if not ours or base is None:
            continue
        out.append(Headline(f"ClusCa on a FLUX.1-dev-size transformer, random weights, {info['tokens'][0]} image "
                            f"tokens, {info['steps']} steps, {info['dtype']}, batch {batch}",
                            f"{base['per_image']:.2f} s per image uncached; " + ", ".join(
                                f"`{r['method'].split(' (')[0].removeprefix('ClusCa ')}` **{r['speedup']:.2f}x** "
                                f"({r['flops_speedup']:.2f}x FLOPs)" for r in ours),
                            info["device"], day(info.get("date"))))
    return out


def write_docs(data: dict, path: Path = DOCS) -> None:
    write_section(START, END, render(data), path)


if __name__ == "__main__":
    sys.exit(main())

"""Rank programs for the context-parallel tests: each runs in its own spawned process."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

STEPS = 12
PROMPTS = ["a red circle on the left", "a blue square at the top"]


def spawn(world: int, target: Callable, *args: Any, timeout_s: float = 240.0) -> list[Any]:
    """Run ``target(rank, world, init_method, out_path, *args)`` on ``world`` spawned ranks; return
    each rank's saved result. A rank that does not finish in time fails the test, never hangs it."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        outs = [str(Path(tmp) / f"rank{r}.pt") for r in range(world)]
        procs = [ctx.Process(target=target, args=(r, world, init, outs[r], *args), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        if alive:
            raise AssertionError(f"{len(alive)} rank(s) still running after {timeout_s}s")
        codes = [p.exitcode for p in procs]
        if any(codes):
            raise AssertionError(f"ranks exited with {codes}")
        return [torch.load(o, weights_only=False) for o in outs]


def configs() -> dict[str, Any]:
    from clusca import ClusCaConfig

    return {
        "off": ClusCaConfig(mode="off"),
        "fora": ClusCaConfig(mode="fora", interval=3, warmup=2),
        "taylorseer": ClusCaConfig(mode="taylorseer", interval=3, warmup=2, order=1),
        "clusca": ClusCaConfig.preset("balanced"),
        "clusca_guard": ClusCaConfig.preset("balanced", guard=True, guard_bound=0.05),
    }


def builtin_images(world: int) -> dict[str, Any]:
    """Each setting's images from the built-in pipeline, split over ``world`` ranks when above 1."""
    from clusca import apply_clusca, clusca_run
    from clusca import parallel as cp
    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline

    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    pipe.set_progress_bar_config(disable=True)
    apply_clusca(pipe.transformer)
    if world > 1:
        cp.enable_context_parallel(pipe.transformer, cp.ParallelDegree(ulysses=world))
    results = {}
    for name, cfg in configs().items():
        gens = [torch.Generator().manual_seed(7 + i) for i in range(len(PROMPTS))]
        cp.collective_clock().read()
        with torch.inference_mode(), clusca_run(pipe.transformer, cfg, num_inference_steps=STEPS) as run:
            images = pipe(prompt=PROMPTS, num_inference_steps=STEPS, generator=gens, output_type="np").images
        seconds, collectives = cp.collective_clock().read()
        results[name] = {"images": images, "stats": run.stats.to_dict(), "collective_s": seconds,
                         "collectives": collectives}
    return results


def tiny_flux_outputs(world: int) -> list[torch.Tensor]:
    """Direct calls of a random-weight FLUX transformer (2 dual + 2 single blocks, 4 heads)."""
    from diffusers import FluxTransformer2DModel

    from clusca import parallel as cp

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    if world > 1:
        cp.enable_context_parallel(model, cp.ParallelDegree(ulysses=world))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64, 16, generator=g)
    txt = torch.randn(1, 8, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    with torch.inference_mode():
        return [model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                      img_ids=img_ids.reshape(64, 3), txt_ids=torch.zeros(8, 3), return_dict=False)[0]
                for t in (torch.tensor([1.0]), torch.tensor([0.5]))]


def rank_main(rank: int, world: int, init: str, out: str, job: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from clusca import parallel as cp

    cp.init_group(rank, world, init, timeout_s=120)
    try:
        result = {"builtin": builtin_images, "tiny_flux": tiny_flux_outputs}[job](world)
        torch.save(result, out)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()

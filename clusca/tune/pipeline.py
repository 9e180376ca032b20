"""The tuner on a diffusers-style pipeline: its calls as a :data:`Generate`, and :func:`tune`."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import ClusCaConfig
from .space import Generate, TuneError
from .result import TuneResult
from .tuner import tune_with


def pipeline_generate(pipe: Any, *, steps: int, guidance: float | None = None, height: int | None = None,
                      width: int | None = None, call_kwargs: Mapping[str, Any] | None = None,
                      num_frames: int | None = None) -> Generate:
    """A :data:`Generate` calling a diffusers-style pipeline with a ``transformer`` (hooks installed here).

    With ``num_frames`` the pipeline makes videos (Wan, HunyuanVideo: ``.frames``), one per
    prompt, and each output is a ``(frames, H, W, C)`` array.
    """
    import inspect

    import torch

    from ..install import apply_clusca
    from ..run import clusca_run

    tr = getattr(pipe, "transformer", None)
    if tr is None:
        raise TuneError(f"{type(pipe).__name__} has no transformer: there is nothing to cache")
    apply_clusca(tr)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    params = set(inspect.signature(pipe.__call__).parameters)
    fixed: dict[str, Any] = {"num_inference_steps": steps, "output_type": "np"}
    for k, v in (("guidance_scale", guidance), ("height", height), ("width", width)):
        if v is not None:
            fixed[k] = v
    if num_frames is not None:
        fixed.update(num_frames=num_frames, num_videos_per_prompt=1)
    fixed.update(call_kwargs or {})
    step_callback = "callback_on_step_end" in params

    def outputs(result: Any) -> np.ndarray:
        return np.asarray(result.frames if num_frames is not None else result.images, dtype=np.float32)

    def generate(cfg: ClusCaConfig | None, items: Sequence[tuple[str, int]]):
        kwargs = dict(fixed, prompt=[p for p, _ in items],
                      generator=[torch.Generator(device="cpu").manual_seed(int(s)) for _, s in items])
        with torch.inference_mode():
            if cfg is None:
                return outputs(pipe(**kwargs)), None
            with clusca_run(tr, cfg, num_inference_steps=steps) as run:
                if step_callback:
                    run.set_step(0)

                    def on_step(_pipe, i, _t, kw):
                        run.set_step(i + 1)
                        return kw

                    kwargs["callback_on_step_end"] = on_step
                images = outputs(pipe(**kwargs))
        return images, run.stats.to_dict()

    return generate


def tune(pipe: Any, prompts: Sequence[str], *, minutes: float, seeds: int = 1, steps: int = 28,
         guidance: float | None = None, height: int | None = None, width: int | None = None,
         call_kwargs: Mapping[str, Any] | None = None, journal: str | os.PathLike | None = None,
         resume: bool = False, checker: Callable[[np.ndarray, list[int]], list[bool]] | None = None,
         baseline: Mapping[str, Mapping[str, Any]] | None = None, memory_cap_bytes: int | None = None,
         meta: Mapping[str, Any] | None = None, batch: int = 4, seed: int = 0,
         progress: Callable[[str], None] | None = None, num_frames: int | None = None) -> TuneResult:
    """Find the cache settings ``pipe`` tolerates on its device, within ``minutes``.

    Every prompt runs with seeds ``0..seeds-1`` (image ``k`` of the set is prompt
    ``k // seeds``, seed ``k % seeds``; the first rungs use the first images). ``checker(images,
    indices)`` (optional) says whether each image adheres to its prompt. ``baseline`` is the
    model's current preset tuning (``cache_presets``), measured alongside. ``journal`` keeps every
    measurement (and is what ``resume`` continues from). See the module docstring for the search
    and the picking rules; :attr:`TuneResult.presets` is the registry's ``cache_presets``.
    With ``num_frames`` the pipeline makes videos of that many frames, scored per frame.
    """
    prompts = [p for p in prompts]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise TuneError("prompts: need at least one non-empty prompt")
    if not isinstance(seeds, int) or seeds < 1:
        raise TuneError(f"seeds: must be at least 1, got {seeds!r}")
    items = [(p, s) for p in prompts for s in range(seeds)]
    import torch

    from .timing import pick_clock

    device = getattr(pipe, "device", "cpu")
    gen = pipeline_generate(pipe, steps=steps, guidance=guidance, height=height, width=width, call_kwargs=call_kwargs,
                            num_frames=num_frames)
    m = {"steps": steps, "guidance": guidance, "height": height, "width": width, "seeds": seeds,
         "prompts": len(prompts), **({"num_frames": num_frames} if num_frames is not None else {}), **dict(meta or {})}
    return tune_with(gen, items, minutes=minutes, steps=steps, journal=journal, resume=resume, checker=checker,
                     baseline=baseline, memory_cap_bytes=memory_cap_bytes, meta=m, batch=batch, seed=seed,
                     progress=progress, clock=pick_clock(device, torch.get_num_threads()))

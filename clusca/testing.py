"""Tiny randomly initialised transformers of every supported architecture, and the plain
Euler sampler that drives them and the benchmarks' models, for tests and quick experiments
(no weights, no network).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class TinyCase:
    """A tiny model plus everything needed to call it like a pipeline would."""

    name: str
    model: torch.nn.Module
    latent_shape: tuple[int, ...]  # per sample
    make_kwargs: Callable[[torch.Tensor, float, int], dict[str, Any]]  # (latents, sigma, seed) -> kwargs
    out_channels: int  # channels of the prediction used by the sampler (learned-sigma halves dropped)

    def latents(self, batch: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, *self.latent_shape, generator=g)


def _cond(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _per_sample(batch: int, shape: tuple[int, ...], seeds: list[int] | int) -> torch.Tensor:
    """Conditioning drawn per sample from its own seed, so a sample's inputs do not
    depend on its position in the batch."""
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(batch)]
    return torch.stack([_cond(shape, 1000 + s) for s in seeds])


def tiny_flux(side: int = 8, text: int = 6) -> TinyCase:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    img_ids = torch.zeros(side * side, 3)
    img_ids[:, 1] = torch.arange(side).repeat_interleave(side)
    img_ids[:, 2] = torch.arange(side).repeat(side)
    txt_ids = torch.zeros(text, 3)

    def make(x: torch.Tensor, sigma: float, seeds) -> dict:
        b = x.shape[0]
        return dict(
            hidden_states=x, encoder_hidden_states=_per_sample(b, (text, 32), seeds),
            pooled_projections=_per_sample(b, (32,), seeds), timestep=torch.full((b,), sigma),
            img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
        )

    return TinyCase("flux", model, (side * side, 16), make, 16)


def tiny_sd3(side: int = 16, text: int = 6, dual_attention: bool = False) -> TinyCase:
    """SD3; with ``dual_attention`` the SD3.5 layout, whose first block has a second attention."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=side, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
        dual_attention_layers=(0,) if dual_attention else (),
    ).eval()

    def make(x, sigma, seeds):
        b = x.shape[0]
        return dict(
            hidden_states=x, encoder_hidden_states=_per_sample(b, (text, 32), seeds),
            pooled_projections=_per_sample(b, (32,), seeds), timestep=torch.full((b,), sigma * 1000.0),
            return_dict=False,
        )

    return TinyCase("sd35" if dual_attention else "sd3", model, (4, side, side), make, 4)


def tiny_pixart(side: int = 16, text: int = 6) -> TinyCase:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=side, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=32, caption_channels=32,
    ).eval()

    def make(x, sigma, seeds):
        b = x.shape[0]
        return dict(
            hidden_states=x, encoder_hidden_states=_per_sample(b, (text, 32), seeds),
            timestep=torch.full((b,), sigma * 1000.0), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )

    return TinyCase("pixart", model, (4, side, side), make, 4)


def tiny_dit(side: int = 16) -> TinyCase:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        sample_size=side, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=2, in_channels=4,
        out_channels=8, num_embeds_ada_norm=1000,
    ).eval()

    def make(x, sigma, seeds):
        b = x.shape[0]
        if isinstance(seeds, int):
            seeds = [seeds + i for i in range(b)]
        labels = torch.tensor([s % 1000 for s in seeds])
        return dict(
            hidden_states=x, timestep=torch.full((b,), int(sigma * 999), dtype=torch.long), class_labels=labels,
            return_dict=False,
        )

    return TinyCase("dit", model, (4, side, side), make, 4)


def tiny_hunyuan_video(side: int = 8, frames: int = 2, text: int = 6) -> TinyCase:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
    ).eval()

    def make(x, sigma, seeds):
        b = x.shape[0]
        return dict(
            hidden_states=x, timestep=torch.full((b,), sigma * 1000.0),
            encoder_hidden_states=_per_sample(b, (text, 32), seeds),
            encoder_attention_mask=torch.ones(b, text, dtype=torch.bool),
            pooled_projections=_per_sample(b, (32,), seeds), guidance=torch.full((b,), 6000.0),
            return_dict=False,
        )

    return TinyCase("hunyuan_video", model, (4, frames, side, side), make, 4)


def tiny_wan(side: int = 12, frames: int = 2, text: int = 6) -> TinyCase:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    ).eval()

    def make(x, sigma, seeds):
        b = x.shape[0]
        return dict(
            hidden_states=x, timestep=torch.full((b,), sigma * 1000.0),
            encoder_hidden_states=_per_sample(b, (text, 32), seeds), return_dict=False,
        )

    return TinyCase("wan", model, (4, frames, side, side), make, 4)


class HostReads:
    """Counts, while active, the calls that copy a tensor's value to the host (``.item()``,
    ``.tolist()``, ``float(t)``, ``if t``): each is a synchronisation on an accelerator."""

    _READS = ("tolist", "item", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self) -> None:
        from torch.overrides import TorchFunctionMode

        reads = {getattr(torch.Tensor, name) for name in self._READS}
        counter = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in reads:
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count = 0
        self._mode = _Mode()

    def __enter__(self) -> "HostReads":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


TINY_CASES: dict[str, Callable[[], TinyCase]] = {
    "flux": tiny_flux,
    "sd3": tiny_sd3,
    "sd35": lambda: tiny_sd3(dual_attention=True),
    "pixart": tiny_pixart,
    "dit": tiny_dit,
    "hunyuan_video": tiny_hunyuan_video,
    "wan": tiny_wan,
}


class EulerLoop:
    """The one sampling loop of the tests and benchmarks: flow-matching Euler from sigma 1 to
    0, advanced a step at a time, ``x <- x + (sigma[i + 1] - sigma[i]) * velocity(x, sigma[i])``.

    ``velocity(x, sigma)`` is the model's prediction. ``before_step(i)`` runs first in each
    step (e.g. ``run.set_step``, which spares the library a host read of the timestep);
    ``sync`` runs last (an accelerator's synchronise), so that ``times`` (seconds per step,
    filled as steps run) holds what each step really took; ``cpu_times`` holds the calling
    thread's CPU time per step beside it, which leaves out the time other processes held the
    core. Stepping, not only ``run()``, lets a benchmark advance two loops in lockstep, so that
    both see the same load.
    """

    def __init__(self, velocity: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, steps: int, *,
                 before_step: Callable[[int], None] | None = None, sync: Callable[[], None] | None = None) -> None:
        self.velocity, self.steps, self.before_step, self.sync = velocity, steps, before_step, sync
        self.x = x.clone()
        self.sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    @torch.no_grad()
    def step(self, i: int) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        if self.before_step is not None:
            self.before_step(i)
        v = self.velocity(self.x, self.sigmas[i])
        self.x = self.x + (self.sigmas[i + 1] - self.sigmas[i]) * v
        if self.sync is not None:
            self.sync()
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.thread_time() - c0)

    def run(self) -> torch.Tensor:
        for i in range(self.steps):
            self.step(i)
        return self.x


def case_velocity(case: TinyCase, seeds: list[int] | int = 0) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The prediction of a tiny case's transformer, learned-sigma channels dropped."""

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = case.model(**case.make_kwargs(x, sigma, seeds))[0]
        return out if out.shape == x.shape else out[:, : case.out_channels]

    return velocity


def euler_sample(case: TinyCase, x: torch.Tensor, steps: int, seeds: list[int] | int = 0) -> torch.Tensor:
    """A whole :class:`EulerLoop` of a tiny case, calling its transformer directly."""
    return EulerLoop(case_velocity(case, seeds), x, steps).run()

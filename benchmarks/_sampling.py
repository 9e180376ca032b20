"""Random-weight FLUX inputs and the sampling loop the benchmarks drive them with.

Every benchmark that calls a transformer directly (no pipeline) runs
:class:`clusca.testing.EulerLoop`, the loop the library's tests use too; this module
only adds what a FLUX transformer is called with. Inputs come from one seeded generator
in a fixed order (latents, text states, pooled projection), so a given shape always gets
the same numbers, whichever benchmark asks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch

from clusca.testing import EulerLoop

__all__ = ["EulerLoop", "FluxInputs", "add_flux_shape_args", "sync_for"]


def add_flux_shape_args(p: argparse.ArgumentParser, *, width: int, head_dim: int, dual: int, single: int,
                        text_dim: int, text_tokens: int, steps: int) -> None:
    """The options that size a random FLUX transformer and its run, with this benchmark's defaults."""
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--head-dim", type=int, default=head_dim)
    p.add_argument("--dual", type=int, default=dual)
    p.add_argument("--single", type=int, default=single)
    p.add_argument("--text-dim", type=int, default=text_dim)
    p.add_argument("--text-tokens", type=int, default=text_tokens)
    p.add_argument("--steps", type=int, default=steps)


def sync_for(device: torch.device) -> Callable[[], None] | None:
    """What makes a step's time on ``device`` include its work (``None``: the CPU, nothing)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


@dataclass
class FluxInputs:
    """The conditioning of one FLUX transformer call, and the latents the loop starts from."""

    x: torch.Tensor
    encoder_hidden_states: torch.Tensor
    pooled_projections: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    guidance: torch.Tensor | None  # None for models built without guidance embeddings

    @classmethod
    def random(cls, *, side: int, text_tokens: int, text_dim: int, channels: int = 64, pooled_dim: int = 768,
               batch: int = 1, guidance: float | None = 3.5, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 1234) -> "FluxInputs":
        """``side`` x ``side`` packed latent tokens and ``text_tokens`` text tokens, drawn on the CPU."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, side * side, channels, generator=g)
        enc = torch.randn(batch, text_tokens, text_dim, generator=g)
        pooled = torch.randn(batch, pooled_dim, generator=g)
        img_ids = torch.zeros(side * side, 3)
        img_ids[:, 1] = torch.arange(side).repeat_interleave(side)
        img_ids[:, 2] = torch.arange(side).repeat(side)
        to = dict(device=device, dtype=dtype)
        return cls(x.to(**to), enc.to(**to), pooled.to(**to), img_ids.to(**to), torch.zeros(text_tokens, 3, **to),
                   None if guidance is None else torch.full((batch,), guidance, **to))

    def velocity(self, model: torch.nn.Module) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """``model``'s prediction at ``(x, sigma)``, the timestep on FLUX's 0..1 scale."""
        extra = {} if self.guidance is None else {"guidance": self.guidance}

        def predict(x: torch.Tensor, sigma: float) -> torch.Tensor:
            return model(hidden_states=x, encoder_hidden_states=self.encoder_hidden_states,
                         pooled_projections=self.pooled_projections,
                         timestep=torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype),
                         img_ids=self.img_ids, txt_ids=self.txt_ids, return_dict=False, **extra)[0]

        return predict

    def loop(self, model: torch.nn.Module, steps: int, **kwargs) -> EulerLoop:
        """An :class:`EulerLoop` of ``model`` from these latents (``kwargs``: ``before_step``, ``sync``)."""
        return EulerLoop(self.velocity(model), self.x, steps, **kwargs)

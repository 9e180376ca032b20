"""Mask-aware ClusCa for inpainting: the mask's tokens are clustered apart from the others.

A run given an inpainting mask per sample (``ClusCaRun.set_token_mask``) clusters each masked
sample's image tokens in two parts on every full step: the tokens to repaint into at least
``mask_share`` of the clusters, the kept ones into the rest. Two things follow from the
clusters alone, so the fresh-token picks, the propagation and the lean cached step need no
change: one fresh token per cluster means most fresh tokens fall in the mask (where the result
is decided: an inpainting pipeline puts the kept region back after every step), and a cluster
never holds tokens of both parts, so a fresh output from outside the mask is never blended
into a token inside it.

A sample without a mask, or whose mask covers none or all of its tokens, is clustered exactly
as plain ClusCa clusters it, whatever else shares its batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .fresh import mix
from .kmeans import kmeans

def check_masks(mask) -> list[torch.Tensor | None]:
    """Per-sample masks from what a caller passes: a ``(batch, tokens)`` or ``(batch, height,
    width)`` tensor, or a list with one ``(tokens,)`` / ``(height, width)`` tensor (or ``None``:
    no mask) per sample. Non-zero (``True``) means repaint. Raises ``ValueError`` naming the problem."""
    if isinstance(mask, torch.Tensor):
        if mask.ndim not in (2, 3):
            raise ValueError(f"token mask: expected (batch, tokens) or (batch, height, width), got shape "
                             f"{tuple(mask.shape)}")
        items = list(mask.unbind(0))
    elif isinstance(mask, (list, tuple)):
        items = list(mask)
    else:
        raise ValueError(f"token mask: expected a tensor or a list of per-sample tensors, got {type(mask).__name__}")
    if not items:
        raise ValueError("token mask: no samples")
    out: list[torch.Tensor | None] = []
    for i, m in enumerate(items):
        if m is None:
            out.append(None)
            continue
        if not isinstance(m, torch.Tensor) or m.ndim not in (1, 2):
            raise ValueError(f"token mask of sample {i}: expected a (tokens,) or (height, width) tensor")
        out.append(m.detach().ne(0).cpu())
    return out


def on_token_grid(mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """A sample's mask as ``(tokens,)`` bools: a ``(tokens,)`` mask as it is, a spatial one pooled
    onto the row-major token grid of its aspect ratio (a token is repainted if any of its cell
    is). ``None`` where it does not fit ``tokens`` (the cache then ignores it)."""
    if mask is None:
        return None
    if mask.ndim == 1:
        return mask if mask.numel() == tokens else None
    h, w = mask.shape
    side = math.sqrt(h * w / tokens)
    gh, gw = round(h / side), round(w / side)
    if gh < 1 or gw < 1 or gh * gw != tokens or gh > h or gw > w:
        return None
    return F.adaptive_max_pool2d(mask.float()[None, None], (gh, gw)).reshape(-1) > 0.5


def masked_clusters(masked: int, tokens: int, k: int, share: float) -> int | None:
    """How many of ``k`` clusters a sample's ``masked`` tokens (of ``tokens``) get, or ``None``
    when the sample is clustered plainly (no split to make)."""
    free = tokens - masked
    if share <= 0.0 or masked == 0 or free == 0 or k < 2:
        return None
    km = max(math.ceil(share * k), round(k * masked / tokens))
    km = min(km, masked, k - 1)
    return max(km, k - free, 1)


def cluster_with_masks(x: torch.Tensor, k: int, masks: Sequence[torch.Tensor | None], share: float, *,
                       iters: int, distance: str, init: torch.Tensor | None, seed: int,
                       fit_per_cluster: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """k-means of ``x`` (``(batch, tokens, dim)``) as :func:`clusca.kmeans.kmeans` with
    ``return_rounds``, the masked samples' tokens split by their masks (``(tokens,)`` bools or
    ``None``, one per sample): the mask's tokens get clusters ``0 .. km-1``, the others the rest."""
    b, n, d = x.shape
    k = max(1, min(int(k), n))
    splits = [masked_clusters(int(m.sum()), n, k, share) if m is not None else None for m in masks]
    opts = dict(iters=iters, distance=distance, return_rounds=True)
    warm = init is not None and tuple(init.shape) == (b, k, d)
    if all(s is None for s in splits):
        return kmeans(x, k, init=init, seed=seed, fit_tokens=fit_per_cluster * k, **opts)
    assign = torch.empty(b, n, dtype=torch.long, device=x.device)
    cents = torch.empty(b, k, d, dtype=torch.float32, device=x.device)
    rounds = 0
    plain = [i for i, s in enumerate(splits) if s is None]
    if plain:
        # The unmasked samples together, as plain ClusCa would (k-means is batch-independent).
        idx = torch.tensor(plain, device=x.device)
        a, c, r = kmeans(x.index_select(0, idx), k, init=init.index_select(0, idx) if warm else None, seed=seed,
                         fit_tokens=fit_per_cluster * k, **opts)
        assign[idx], cents[idx], rounds = a, c, r
    for i, km in enumerate(splits):
        if km is None:
            continue
        inside = masks[i].to(x.device)
        for part, (sel, lo, kk) in enumerate(((inside, 0, km), (~inside, km, k - km))):
            pos = sel.nonzero().squeeze(1)
            a, c, r = kmeans(x[i:i + 1].index_select(1, pos), kk, init=init[i:i + 1, lo:lo + kk] if warm else None,
                             seed=mix(seed, part + 1), fit_tokens=fit_per_cluster * kk, **opts)
            assign[i, pos] = a[0] + lo
            cents[i, lo:lo + kk] = c[0]
            rounds = max(rounds, r)
    return assign, cents, rounds


class TokenMasks:
    """A run's per-sample masks, put on each clustering's token grid once."""

    def __init__(self, masks: list[torch.Tensor | None]) -> None:
        self.masks = masks
        self._on_grid: dict[tuple, list[torch.Tensor | None]] = {}

    def for_batch(self, batch: int, tokens: int) -> list[torch.Tensor | None]:
        """One ``(tokens,)`` mask (or ``None``) per row of a transformer call of ``batch`` rows.

        A batch that is a whole multiple of the masks' samples repeats them (the halves of
        classifier-free guidance in one call, ``[uncond; cond]``); any other batch gets none.
        """
        key = (batch, tokens)
        hit = self._on_grid.get(key)
        if hit is None:
            per = len(self.masks)
            if batch % per:
                hit = [None] * batch
            else:
                grid = [on_token_grid(m, tokens) for m in self.masks]
                hit = grid * (batch // per)
            self._on_grid[key] = hit
        return hit

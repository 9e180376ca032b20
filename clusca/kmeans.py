"""Batched, warm-started k-means in pure torch (one clustering per batch element)."""

from __future__ import annotations

import torch


def kmeans_init(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Pick ``k`` token positions as initial centroids, the same positions for every sample.

    Sharing the positions (drawn from a generator seeded only by ``seed``) keeps each
    sample's clustering independent of the other samples in its batch.
    """
    n = x.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    pos = torch.randperm(n, generator=gen)[:k].to(x.device)
    return x[:, pos, :].float()


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 10,
    distance: str = "l1",
    init: torch.Tensor | None = None,
    seed: int = 0,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the tokens of each sample.

    Args:
        x: ``(batch, tokens, dim)``.
        k: clusters per sample (clamped to the number of tokens).
        iters: maximum number of assignment/update rounds.
        distance: ``"l1"`` (the paper's choice) or ``"l2"``.
        init: ``(batch, k, dim)`` warm-start centroids (e.g. the previous full step's);
            ignored when its shape does not fit.
        seed: seeds the initial centroid positions when ``init`` is not usable.
        tol: early stop once no centroid moves by more than ``tol`` times the data scale.

    Returns:
        ``(assign, centroids)``: ``(batch, tokens)`` int64 cluster ids and
        ``(batch, k, dim)`` float32 centroids. Centroids are cluster means; an empty
        cluster keeps its previous centroid.
    """
    if x.ndim != 3:
        raise ValueError(f"x: expected (batch, tokens, dim), got shape {tuple(x.shape)}")
    if distance not in ("l1", "l2"):
        raise ValueError(f"distance: must be 'l1' or 'l2', got {distance!r}")
    b, n, d = x.shape
    k = max(1, min(int(k), n))
    xf = x.float()
    if init is not None and tuple(init.shape) == (b, k, d):
        c = init.to(device=x.device, dtype=torch.float32).clone()
    else:
        c = kmeans_init(xf, k, seed)
    p = 1.0 if distance == "l1" else 2.0
    # Scale-relative tolerance so the stop rule does not depend on activation magnitude.
    thresh = tol * float(xf.abs().mean()) + 1e-12
    assign = torch.zeros(b, n, dtype=torch.long, device=x.device)
    for _ in range(int(iters)):
        assign = torch.cdist(xf, c, p=p).argmin(dim=2)
        onehot = torch.zeros(b, n, k, device=x.device, dtype=torch.float32)
        onehot.scatter_(2, assign.unsqueeze(2), 1.0)
        counts = onehot.sum(dim=1)  # (b, k)
        sums = torch.bmm(onehot.transpose(1, 2), xf)  # (b, k, d)
        new_c = torch.where(counts.unsqueeze(2) > 0, sums / counts.clamp_min(1.0).unsqueeze(2), c)
        shift = (new_c - c).abs().amax()
        c = new_c
        # One host sync per round; k-means runs on full steps only.
        if float(shift) <= thresh:
            break
    # Final assignment against the final centroids.
    assign = torch.cdist(xf, c, p=p).argmin(dim=2)
    return assign, c

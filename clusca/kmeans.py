"""Batched, warm-started k-means in pure torch (one clustering per batch element)."""

from __future__ import annotations

import torch


def _distances(x: torch.Tensor, c: torch.Tensor, distance: str) -> torch.Tensor:
    """(batch, tokens, k) distances; L2 via one batched matmul (returned squared)."""
    if distance == "l1":
        return torch.cdist(x, c, p=1.0)
    sq = torch.baddbmm((c * c).sum(-1).unsqueeze(1), x, c.transpose(1, 2), alpha=-2.0)
    return sq.add_((x * x).sum(-1, keepdim=True)).clamp_min_(0.0)


@torch.no_grad()
def kmeans_init(x: torch.Tensor, k: int, seed: int, distance: str = "l1") -> torch.Tensor:
    """k-means++ seeding, batch-independent.

    Every sample draws its centroids from its own tokens, but the random numbers (first
    position, then one uniform per round used through each sample's own distance CDF)
    are shared by the batch, so a sample's result never depends on the other samples.
    Spreading the seeds this way avoids the stuck partitions (two seeds in one group)
    that plain random tokens give.
    """
    b, n, d = x.shape
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    first = int(torch.randint(n, (1,), generator=gen))
    u = torch.rand(max(k - 1, 1), generator=gen, dtype=torch.float64).to(x.device)
    cents = [x[:, first, :]]
    dmin = _distances(x, cents[0].unsqueeze(1), distance).squeeze(2)  # (b, n)
    rows = torch.arange(b, device=x.device)
    for j in range(1, k):
        w = dmin.double()
        cdf = w.cumsum(1)
        total = cdf[:, -1:].clamp_min(1e-300)
        idx = torch.searchsorted(cdf / total, u[j - 1].expand(b, 1).contiguous()).squeeze(1).clamp_max(n - 1)
        c = x[rows, idx]  # (b, d)
        cents.append(c)
        dmin = torch.minimum(dmin, _distances(x, c.unsqueeze(1), distance).squeeze(2))
    return torch.stack(cents, dim=1).float()


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 10,
    distance: str = "l1",
    init: torch.Tensor | None = None,
    seed: int = 0,
    tol: float = 1e-2,
    fit_tokens: int = 0,
    return_rounds: bool = False,
):
    """Cluster the tokens of each sample.

    Args:
        x: ``(batch, tokens, dim)``.
        k: clusters per sample (clamped to the number of tokens).
        iters: maximum number of assignment/update rounds.
        distance: ``"l1"`` (the paper's choice) or ``"l2"``.
        init: ``(batch, k, dim)`` warm-start centroids (e.g. the previous full step's);
            ignored when its shape does not fit.
        seed: seeds the k-means++ initialisation used when ``init`` is not usable.
        tol: early stop once at most this fraction of the tokens changed cluster in a round.

        fit_tokens: if > 0 and smaller than the token count, the centroids are fitted on
            that many token positions (the same positions for every sample, drawn from
            ``seed``) and all tokens are then assigned to the nearest centroid once.
        return_rounds: also return the number of update rounds run.

    Returns:
        ``(assign, centroids)``: ``(batch, tokens)`` int64 cluster ids and
        ``(batch, k, dim)`` float32 centroids (plus the round count if asked). Centroids
        are cluster means; an empty cluster keeps its previous centroid.
    """
    if x.ndim != 3:
        raise ValueError(f"x: expected (batch, tokens, dim), got shape {tuple(x.shape)}")
    if distance not in ("l1", "l2"):
        raise ValueError(f"distance: must be 'l1' or 'l2', got {distance!r}")
    b, n, d = x.shape
    k = max(1, min(int(k), n))
    xf_all = x.float()
    xf = xf_all
    if 0 < fit_tokens < n and fit_tokens >= k:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) ^ 0x5EED)
        pos = torch.randperm(n, generator=gen)[:fit_tokens].sort().values.to(x.device)
        xf = xf_all[:, pos, :]
        n = xf.shape[1]
    if init is not None and tuple(init.shape) == (b, k, d):
        c = init.to(device=x.device, dtype=torch.float32)
        if int(iters) < 1:
            c = c.clone()  # returned as is: never alias the caller's tensor
    else:
        c = kmeans_init(xf, k, seed, distance)
    assign = _distances(xf, c, distance).argmin(dim=2)
    # Each sample stops on its own (a frozen sample keeps its state), so its result never
    # depends on the other samples in the batch. One sample needs no freezing: it stops
    # the loop itself, which saves the masking ops of every round (clustering runs once
    # per image and full step, where op count, not arithmetic, is the cost).
    single = b == 1
    active = None if single else torch.ones(b, dtype=torch.bool, device=x.device)
    limit = tol * n
    rounds = 0
    for _ in range(int(iters)):
        rounds += 1
        onehot = torch.zeros(b, n, k, device=x.device, dtype=torch.float32)
        onehot.scatter_(2, assign.unsqueeze(2), 1.0)
        counts = onehot.sum(dim=1).unsqueeze(2)  # (b, k, 1)
        sums = torch.bmm(onehot.transpose(1, 2), xf)  # (b, k, d)
        upd = torch.where(counts > 0, sums / counts.clamp_min(1.0), c)
        c = upd if single else torch.where(active.view(b, 1, 1), upd, c)
        new = _distances(xf, c, distance).argmin(dim=2)
        # Stop once (almost) no token changes cluster: with L1 assignments and mean
        # updates a few boundary tokens can flip back and forth for many rounds, each
        # costing a full distance pass for no visible change.
        changed = (new != assign).sum(dim=1)
        # One host sync per round; this runs on full steps only.
        if single:
            assign = new
            if not changed.item() > limit:
                break
            continue
        assign = torch.where(active.view(b, 1), new, assign)
        active = active & (changed > limit)
        if not bool(active.any()):
            break
    if xf is not xf_all:
        assign = _distances(xf_all, c, distance).argmin(dim=2)
    return (assign, c, rounds) if return_rounds else (assign, c)

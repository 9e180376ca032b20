"""The candidates: which settings the tuner tries, and how it names them."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any, Callable, Sequence

import numpy as np

from ..config import ClusCaConfig


TUNED_PRESETS = ("quality", "balanced", "fast")
PSNR_CAP_DB = 100.0  # identical images count as 100 dB, so that means stay finite
ETA = 3  # successive halving: a third of the candidates go on, on three times the prompts
JOURNAL_VERSION = 1

# What a pipeline call gives back and what it cost: images (N, H, W, C) in [0, 1] and the
# run's statistics (``RunStats.to_dict()``, ``None`` uncached).
Generate = Callable[[ClusCaConfig | None, Sequence[tuple[str, int]]], tuple[np.ndarray, dict[str, Any] | None]]


class TuneError(ValueError):
    """Bad input to :func:`tune` (the message says which and why)."""


def canonical(cfg: ClusCaConfig) -> ClusCaConfig:
    """``cfg`` with the fields its mode ignores set to the defaults, so equal runs compare equal."""
    d = ClusCaConfig()
    if cfg.mode in ("fora", "taylorseer"):
        cfg = dataclasses.replace(cfg, clusters=d.clusters, gamma=d.gamma, propagation=d.propagation,
                                  guidance_pairs=d.guidance_pairs, fresh_tokens=d.fresh_tokens)
    if cfg.mode == "fora":
        cfg = dataclasses.replace(cfg, order=0)
    if cfg.mode == "clusca" and (cfg.order == 0 or cfg.gamma == 0):
        cfg = dataclasses.replace(cfg, propagation=d.propagation)
    if cfg.order == 0 or cfg.predictor == "taylor":
        cfg = dataclasses.replace(cfg, predictor=d.predictor, hermite_scale=d.hermite_scale)
    return cfg.validate()


def label(cfg: ClusCaConfig) -> str:
    """Short name: N interval, W warm-up, O order, H Hermite scale, K clusters, g gamma."""
    if cfg.mode == "off":
        return "uncached"
    out = f"{cfg.mode} N{cfg.interval} W{cfg.warmup}"
    if cfg.mode != "fora":
        out += f" O{cfg.order}"
        if cfg.predictor == "hermite" and cfg.order > 0:
            out += f" H{cfg.hermite_scale:g}"
    if cfg.mode == "clusca":
        out += f" K{cfg.clusters} g{cfg.gamma:g}"
        if cfg.propagation != "paper":
            out += f" {cfg.propagation}"
        if not cfg.guidance_pairs:
            out += " pairs-off"
    return out


def key_of(cfg: ClusCaConfig) -> str:
    return json.dumps(canonical(cfg).to_dict(), sort_keys=True)


def search_space(steps: int, seed: int = 0) -> list[ClusCaConfig]:
    """Candidate settings for a ``steps``-step schedule, the most telling first.

    First the axes (for every interval: FORA, TaylorSeer order 1, ClusCa order 0 with few
    clusters, ClusCa with the paper's order, clusters and gamma, TaylorSeer order 1 with the
    Hermite predictor), then random draws over every other knob, in a fixed order for a given
    ``seed``. The Hermite predictor stays on its axis: drawn into the random settings as well,
    it doubled the settings a 6-minute run starts with, and the mid-speed ones that the
    picks need were dropped before the last rung.
    """
    top = max(2, min(12, steps // 4))
    intervals = list(range(2, top + 1))
    warmups = sorted({w for w in (1, 2, 3, 5) if w < steps})
    out: list[ClusCaConfig] = []
    for n in intervals:
        out += [ClusCaConfig(mode="fora", interval=n, warmup=3, order=0),
                ClusCaConfig(mode="taylorseer", interval=n, warmup=3, order=1),
                ClusCaConfig(mode="clusca", interval=n, warmup=3, order=0, clusters=4, gamma=0.0),
                ClusCaConfig(mode="clusca", interval=n, warmup=3, order=1, clusters=16, gamma=0.005),
                ClusCaConfig(mode="taylorseer", interval=n, warmup=3, order=1, predictor="hermite", hermite_scale=0.5)]
    rng = random.Random(seed)
    grid = {
        "mode": ["fora", "taylorseer", "clusca", "clusca"],
        "interval": intervals, "warmup": warmups, "order": [0, 1, 1, 2],
        "clusters": [2, 4, 8, 16, 32], "gamma": [0.0, 0.0, 0.002, 0.005, 0.01, 0.05],
        "propagation": ["paper", "anchored"], "guidance_pairs": [True, True, False],
    }
    for _ in range(40 * len(intervals)):
        out.append(ClusCaConfig(**{k: rng.choice(v) for k, v in grid.items()}))
    seen, unique = set(), []
    for cfg in out:
        k = key_of(cfg)
        if k not in seen:
            seen.add(k)
            unique.append(canonical(cfg))
    return unique

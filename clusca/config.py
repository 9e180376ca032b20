"""ClusCa settings: one dataclass, named presets, validation.

This module is imported by the HTTP API process, which must stay free of torch and
diffusers, so it imports nothing but the standard library.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

MODES = ("off", "fora", "taylorseer", "clusca")
DISTANCES = ("l1", "l2")
PROPAGATIONS = ("paper", "anchored")
CAPTURES = ("auto", "off")
PREDICTORS = ("taylor", "hermite")
MAX_ORDER = 4


@dataclass
class ClusCaConfig:
    r"""Settings of one ClusCa run (chosen per run, no re-hooking needed).

    Args:
        mode: ``off`` (the unmodified model), ``fora`` (reuse the last full step's outputs,
            i.e. Taylor order 0, no clusters), ``taylorseer`` (Taylor prediction, no clusters)
            or ``clusca`` (Taylor prediction plus fresh tokens per cluster with propagation).
        interval: one full step every ``interval`` steps after warm-up (``1`` = every step full,
            which reproduces the uncached model exactly).
        warmup: number of leading steps that are always full (at least 1).
        order: Taylor order of the prediction (0..4). Forced to 0 in ``fora`` mode.
        predictor: how the factors of orders 1 and up are weighted on a cached step:
            ``taylor`` (the Taylor series, as in the paper) or ``hermite`` (HiCache's scaled
            Hermite polynomials, which damp the extrapolation; see ``clusca.taylor``). Order 0
            predicts the same with either.
        hermite_scale: the contraction ``s`` of the ``hermite`` predictor, in (0, 1]; smaller
            damps more, ``1/sqrt(2)`` keeps Taylor's first-order weight.
        clusters: number of k-means clusters K per sample and token group (image / text).
        fresh_tokens: tokens per cluster recomputed by the feed-forward network on cached steps.
        gamma: propagation ratio: weight of a cluster's fresh output blended into each member.
        kmeans_iters: maximum k-means iterations per full step (early stop when stable).
        kmeans_distance: ``l1`` (the paper's choice) or ``l2``.
        kmeans_fit_per_cluster: fit the centroids on ``clusters x this`` token positions
            (then assign every token once); ``0`` fits on all tokens.
        propagation: ``paper`` (blend into the order-0 factor, higher orders still extrapolate
            the fresh value) or ``anchored`` (blend into the predicted output, so fresh tokens
            are exact and not overshot); see docs/library.md.
        propagate_text: also propagate inside text-token clusters (the paper only refreshes
            them); needs ``refresh_text``.
        refresh_text: also compute the text stream of dual-stream models on cached steps: fresh
            text tokens (and text clustering), as the authors' code does, and the text-side
            norms. Off by default: on a cached step the text stream feeds only attention and
            single-stream blocks, which are predicted, and the text tokens are dropped at the
            output, so with the shipped module patterns none of this can change the result
            (bit-identical, tested) and it only costs time.
        guidance_pairs: when a full step's batch is two identical halves (classifier-free guidance
            in one call), cluster each image's two halves jointly, so that both refresh the same
            token positions; guidance amplifies any difference between the halves.
        seed: seed of the fresh-token draws and the first k-means initialisation.
        capture: ``auto`` records the lean cached step of a run as a CUDA graph and replays it
            (on a CUDA device, for the architectures with a lean cached step; elsewhere it
            does nothing); ``off`` always runs cached steps eagerly. See ``clusca.capture``.
        modules: optional override of the architecture's module name patterns, a mapping
            ``{"attention": [...], "feedforward": [...], "block": [...], "cluster": [...],
            "text_stream": [...]}`` of regular expressions matched against ``named_modules()``
            names (overriding attention or blocks clears the text-stream patterns).
    """

    mode: str = "clusca"
    interval: int = 5
    warmup: int = 3
    order: int = 1
    predictor: str = "taylor"
    hermite_scale: float = 0.5
    clusters: int = 16
    fresh_tokens: int = 1
    gamma: float = 0.005
    kmeans_iters: int = 10
    kmeans_distance: str = "l1"
    kmeans_fit_per_cluster: int = 32
    propagation: str = "paper"
    propagate_text: bool = False
    refresh_text: bool = False
    guidance_pairs: bool = True
    seed: int = 0
    capture: str = "auto"
    modules: dict[str, list[str]] | None = None

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ClusCaConfig":
        """Return a copy of the named preset, optionally with some fields changed."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        cfg = dataclasses.replace(PRESETS[name], **overrides) if overrides else dataclasses.replace(PRESETS[name])
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.modules is not None:
            out["modules"] = {k: list(v) for k, v in self.modules.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "ClusCaConfig":
        """Build a validated config from a JSON-like mapping.

        A ``preset`` key picks the base settings; other keys override it. Unknown keys and
        wrongly typed values raise ``ValueError`` naming the field.
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError("config: expected an object with ClusCa settings")
        data = dict(data)
        base_name = data.pop("preset", None)
        if base_name is not None and not isinstance(base_name, str):
            raise ValueError("preset: must be a string")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown setting; known settings are {sorted(names)}")
        base = cls.preset(base_name) if base_name is not None else cls()
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = _coerce(f.name, data[f.name], _FIELD_TYPES[f.name])
        cfg = dataclasses.replace(base, **kwargs)
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ validation
    def validate(self) -> "ClusCaConfig":
        """Check every field; raise ``ValueError`` whose message starts with the field name."""
        for name, typ in _FIELD_TYPES.items():
            _coerce(name, getattr(self, name), typ)  # type check only
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {list(MODES)}, got {self.mode!r}")
        _int_range("interval", self.interval, 1, 1000)
        _int_range("warmup", self.warmup, 1, 1000)
        _int_range("order", self.order, 0, MAX_ORDER)
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor: must be one of {list(PREDICTORS)}, got {self.predictor!r}")
        if not (0.0 < float(self.hermite_scale) <= 1.0):
            raise ValueError(f"hermite_scale: must be above 0 and at most 1, got {self.hermite_scale!r}")
        _int_range("clusters", self.clusters, 1, 4096)
        _int_range("fresh_tokens", self.fresh_tokens, 1, 64)
        if not (0.0 <= float(self.gamma) <= 1.0) or math.isnan(float(self.gamma)):
            raise ValueError(f"gamma: must be between 0 and 1, got {self.gamma!r}")
        _int_range("kmeans_iters", self.kmeans_iters, 1, 100)
        _int_range("kmeans_fit_per_cluster", self.kmeans_fit_per_cluster, 0, 100000)
        if self.kmeans_distance not in DISTANCES:
            raise ValueError(f"kmeans_distance: must be one of {list(DISTANCES)}, got {self.kmeans_distance!r}")
        if self.propagation not in PROPAGATIONS:
            raise ValueError(f"propagation: must be one of {list(PROPAGATIONS)}, got {self.propagation!r}")
        if self.propagate_text and not self.refresh_text:
            raise ValueError("propagate_text: needs refresh_text=true (no text tokens are refreshed otherwise)")
        _int_range("seed", self.seed, 0, 2**63 - 1)
        if self.capture not in CAPTURES:
            raise ValueError(f"capture: must be one of {list(CAPTURES)}, got {self.capture!r}")
        if self.modules is not None:
            allowed = {"attention", "feedforward", "block", "cluster", "text_stream"}
            for key, pats in self.modules.items():
                if key not in allowed:
                    raise ValueError(f"modules: unknown role {key!r}; roles are {sorted(allowed)}")
                if not isinstance(pats, (list, tuple)) or not all(isinstance(p, str) for p in pats):
                    raise ValueError(f"modules: {key!r} must be a list of regular expressions")
                for p in pats:
                    try:
                        re.compile(p)
                    except re.error as exc:
                        raise ValueError(f"modules: invalid regular expression {p!r} ({exc})") from None
        return self

    # ------------------------------------------------------------------ derived settings
    @property
    def effective_order(self) -> int:
        return 0 if self.mode == "fora" else int(self.order)

    @property
    def uses_clusters(self) -> bool:
        return self.mode == "clusca"

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def is_full_step(self, step: int) -> bool:
        """Step ``step`` (0-based) is computed in full; the others are predicted."""
        if self.mode == "off" or step < self.warmup:
            return True
        return (step - (self.warmup - 1)) % self.interval == 0

    def full_steps(self, num_inference_steps: int) -> list[int]:
        return [s for s in range(num_inference_steps) if self.is_full_step(s)]


_FIELD_TYPES: dict[str, Any] = {
    "mode": str,
    "interval": int,
    "warmup": int,
    "order": int,
    "predictor": str,
    "hermite_scale": float,
    "clusters": int,
    "fresh_tokens": int,
    "gamma": float,
    "kmeans_iters": int,
    "kmeans_distance": str,
    "kmeans_fit_per_cluster": int,
    "propagation": str,
    "propagate_text": bool,
    "refresh_text": bool,
    "guidance_pairs": bool,
    "seed": int,
    "capture": str,
    "modules": "modules",
}


def _coerce(name: str, value: Any, typ: Any) -> Any:
    if typ == "modules":
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}: must be an object mapping roles to lists of patterns")
        return {str(k): list(v) if isinstance(v, (list, tuple)) else v for k, v in value.items()}
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{name}: must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{name}: must be a finite number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: must be a string, got {value!r}")
        return value
    return value


def _int_range(name: str, value: int, lo: int, hi: int) -> None:
    if not (lo <= value <= hi):
        raise ValueError(f"{name}: must be between {lo} and {hi}, got {value!r}")


PRESETS: dict[str, ClusCaConfig] = {
    "off": ClusCaConfig(mode="off"),
    # Interval 4: the conservative setting (about 3.6x fewer FLOPs over 50 steps).
    "quality": ClusCaConfig(mode="clusca", interval=4, warmup=3, order=1, clusters=16, gamma=0.005),
    # The authors' FLUX script.
    "balanced": ClusCaConfig(mode="clusca", interval=5, warmup=3, order=1, clusters=16, gamma=0.005),
    # The setting behind the paper's 4.96x FLUX headline.
    "fast": ClusCaConfig(mode="clusca", interval=6, warmup=3, order=1, clusters=16, gamma=0.007),
}

DEFAULT_PRESET = "balanced"

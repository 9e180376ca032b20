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
# Seeds stay exact in every JSON client (JavaScript numbers are doubles).
MAX_SEED = 2**53 - 1


class ClusCaConfigError(ValueError):
    """A setting is refused: ``field`` names it (``modules``, ``preset``, ``interval``...),
    ``reason`` says why; the message is ``"field: reason"``."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Knob:
    """One scalar ClusCa setting: its type, allowed values and default, written once.

    ``lo``/``hi`` bound numbers (``lo_open``: ``lo`` itself is refused); ``choices`` lists the
    allowed strings. The config validates with this, the HTTP schema is generated from it,
    and the CLI parses ``--cache`` with it.
    """

    name: str
    type: type
    default: Any
    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[str, ...] | None = None

    def check(self, value: Any) -> Any:
        """``value`` as this knob's type, or :class:`ClusCaConfigError` naming the knob."""
        value = _coerce(self.name, value, self.type)
        if self.choices is not None and value not in self.choices:
            raise ClusCaConfigError(self.name, f"must be one of {list(self.choices)}, got {value!r}")
        if self.lo is None and self.hi is None:
            return value
        low_ok = value > self.lo if self.lo_open else value >= self.lo
        if not (low_ok and value <= self.hi):
            lo, hi = _number(self.lo), _number(self.hi)
            if self.lo_open:
                raise ClusCaConfigError(self.name, f"must be above {lo} and at most {hi}, got {value!r}")
            raise ClusCaConfigError(self.name, f"must be between {lo} and {hi}, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        """A command-line spelling of a value (``4``, ``0.5``, ``true``, ``l2``), checked."""
        value: Any = text
        if self.type is bool:
            value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower(), text)
        elif self.type in (int, float):
            try:
                value = int(text) if self.type is int else float(text)
            except ValueError:
                pass  # check() names the knob and the type
        return self.check(value)


KNOBS: tuple[Knob, ...] = (
    Knob("mode", str, "clusca", "off (the unmodified model), fora (reuse the last full step), taylorseer "
         "(Taylor prediction) or clusca (prediction plus fresh tokens per cluster).", choices=MODES),
    Knob("interval", int, 5, "One full step every `interval` steps after warm-up (1: every step full).", 1, 1000),
    Knob("warmup", int, 3, "Leading steps that are always full.", 1, 1000),
    Knob("order", int, 1, "Taylor order of the prediction (forced to 0 in fora mode).", 0, MAX_ORDER),
    Knob("predictor", str, "taylor", "How orders 1 and up are weighted on a cached step: taylor (the series) "
         "or hermite (scaled Hermite polynomials, damped).", choices=PREDICTORS),
    Knob("hermite_scale", float, 0.5, "Contraction of the hermite predictor; smaller damps more.", 0.0, 1.0,
         lo_open=True),
    Knob("clusters", int, 16, "k-means clusters per sample and token group.", 1, 4096),
    Knob("fresh_tokens", int, 1, "Tokens per cluster recomputed on cached steps.", 1, 64),
    Knob("gamma", float, 0.005, "Propagation ratio: weight of a cluster's fresh output blended into each member.",
         0.0, 1.0),
    Knob("kmeans_iters", int, 10, "Most k-means iterations per full step (stops early when stable).", 1, 100),
    Knob("kmeans_distance", str, "l1", "k-means distance: l1 (the paper's) or l2.", choices=DISTANCES),
    Knob("kmeans_fit_per_cluster", int, 32, "Fit the centroids on clusters x this token positions (0: all tokens).",
         0, 100000),
    Knob("propagation", str, "paper", "paper (blend into the order-0 factor) or anchored (blend into the "
         "predicted output, fresh tokens exact).", choices=PROPAGATIONS),
    Knob("propagate_text", bool, False, "Also propagate inside text-token clusters (needs refresh_text)."),
    Knob("refresh_text", bool, False, "Also compute the text stream of dual-stream models on cached steps."),
    Knob("guidance_pairs", bool, True, "Cluster the two halves of a guidance batch jointly (same fresh tokens)."),
    Knob("mask_share", float, 0.75, "Inpainting: least share of the clusters (so of the fresh tokens) given to the "
         "mask's tokens, clustered apart from the rest so that nothing propagates into the mask from outside "
         "(0: the mask is ignored).", 0.0, 1.0),
    Knob("seed", int, 0, "Seed of the fresh-token draws and the first k-means initialisation.", 0, MAX_SEED),
    Knob("guard", bool, False, "Divergence guard: a sample whose cached step errs by more than guard_bound is "
         "computed in full for that step, alone (its batch mates keep their cached step)."),
    Knob("guard_bound", float, 0.35, "The guard's bound on a cached step's relative error: measured at its fresh "
         "tokens (clusca), else expected from the output's rate of change at the last full steps (fora, "
         "taylorseer).", 0.0, 100.0, lo_open=True),
    Knob("guard_layout", float, 0.125, "The guard's layout window: with the guard on, every step in this leading "
         "share of the run's steps is computed in full (the image's layout is decided there, where an ordinary "
         "step error can send a sample to another image; needs the run's step count).", 0.0, 1.0),
    Knob("capture", str, "auto", "auto (replay cached steps as a CUDA graph where possible) or off (eager).",
         choices=CAPTURES),
)
KNOB: dict[str, Knob] = {k.name: k for k in KNOBS}


def knob_range(knob: Knob) -> str:
    """What a knob accepts, in words (``1..1000``, ``(0..1]``, ``l1|l2``, ``true|false``)."""
    if knob.choices is not None:
        return "|".join(knob.choices)
    if knob.type is bool:
        return "true|false"
    return f"{'(' if knob.lo_open else ''}{_number(knob.lo)}..{_number(knob.hi)}{']' if knob.lo_open else ''}"


def parse_settings(text: str) -> dict[str, Any]:
    """ClusCa settings from their command-line spelling: a preset name, ``knob=value`` pairs, or
    both, comma-separated (``fast``, ``interval=4,clusters=8``, ``quality,gamma=0.01``). Each
    value is checked against its knob; :class:`ClusCaConfigError` names the first bad one."""
    out: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, value = (x.strip() for x in part.partition("="))
        if not eq:
            name, value = "preset", name
        if name == "preset":
            if value not in PRESETS:
                raise ClusCaConfigError("preset", f"unknown preset {value!r}; choose one of {list(PRESETS)}")
            out["preset"] = value
        elif name in KNOB:
            out[name] = KNOB[name].parse(value)
        else:
            raise ClusCaConfigError(name, f"unknown setting; known settings are {['preset', *KNOB]}")
    return out


def _number(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _default(name: str) -> Any:
    return KNOB[name].default


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
        mask_share: inpainting (a run given a per-sample mask, see ``ClusCaRun.set_token_mask``):
            each masked sample's image tokens are clustered in two parts, the mask's tokens into
            at least this share of the clusters (more if the mask covers more of the image) and
            the others into the rest, so that the fresh tokens prefer the mask and no token
            outside it propagates into it. ``0`` ignores the mask (plain ClusCa).
        seed: seed of the fresh-token draws and the first k-means initialisation.
        guard: the divergence guard (see ``clusca.guard`` and docs/library.md): per sample, a
            cached step's relative error (ClusCa: measured at its fresh tokens; FORA,
            TaylorSeer: expected from the output's rate of change at the last full steps)
            above ``guard_bound`` has that sample computed in full for the step, alone, and its
            factors re-anchored on its true output; batch mates keep their cached step. Steps
            with a trip are counted (``guard_trips``) and count among the full steps.
        guard_bound: the guard's bound on that relative error, above 0.
        guard_layout: with the guard on, the leading share of the run's steps (``num_inference_steps``;
            the first ``ceil(guard_layout * steps)``) that are computed in full whatever the
            schedule says: the image's layout is settled there, and an ordinary step error can
            still send a sample to another image (``clusca.guard``). ``0``: none. A run that
            does not know its step count has no window.
        capture: ``auto`` records the lean cached step of a run as a CUDA graph and replays it
            (on a CUDA device, for the architectures with a lean cached step; elsewhere it
            does nothing); ``off`` always runs cached steps eagerly. See ``clusca.capture``.
        modules: optional override of the architecture's module name patterns, a mapping
            ``{"attention": [...], "feedforward": [...], "block": [...], "cluster": [...],
            "text_stream": [...]}`` of regular expressions matched against ``named_modules()``
            names (overriding attention or blocks clears the text-stream patterns).
    """

    mode: str = _default("mode")
    interval: int = _default("interval")
    warmup: int = _default("warmup")
    order: int = _default("order")
    predictor: str = _default("predictor")
    hermite_scale: float = _default("hermite_scale")
    clusters: int = _default("clusters")
    fresh_tokens: int = _default("fresh_tokens")
    gamma: float = _default("gamma")
    kmeans_iters: int = _default("kmeans_iters")
    kmeans_distance: str = _default("kmeans_distance")
    kmeans_fit_per_cluster: int = _default("kmeans_fit_per_cluster")
    propagation: str = _default("propagation")
    propagate_text: bool = _default("propagate_text")
    refresh_text: bool = _default("refresh_text")
    guidance_pairs: bool = _default("guidance_pairs")
    mask_share: float = _default("mask_share")
    seed: int = _default("seed")
    guard: bool = _default("guard")
    guard_bound: float = _default("guard_bound")
    guard_layout: float = _default("guard_layout")
    capture: str = _default("capture")
    modules: dict[str, list[str]] | None = None

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ClusCaConfig":
        """Return a copy of the named preset, optionally with some fields changed."""
        if name not in PRESETS:
            raise ClusCaConfigError("preset", f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
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
        wrongly typed values raise :class:`ClusCaConfigError` naming the field.
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ClusCaConfigError("config", "expected an object with ClusCa settings")
        data = dict(data)
        base_name = data.pop("preset", None)
        if base_name is not None and not isinstance(base_name, str):
            raise ClusCaConfigError("preset", "must be a string")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ClusCaConfigError(unknown[0], f"unknown setting; known settings are {sorted(names)}")
        base = cls.preset(base_name) if base_name is not None else cls()
        kwargs = {name: KNOB[name].check(value) for name, value in data.items() if name in KNOB}
        if "modules" in data:
            kwargs["modules"] = _modules(data["modules"])
        cfg = dataclasses.replace(base, **kwargs)
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ validation
    def validate(self) -> "ClusCaConfig":
        """Check every field against :data:`KNOBS`; raise :class:`ClusCaConfigError` naming the first bad one."""
        for knob in KNOBS:
            knob.check(getattr(self, knob.name))
        if self.propagate_text and not self.refresh_text:
            raise ClusCaConfigError("propagate_text", "needs refresh_text=true (no text tokens are refreshed otherwise)")
        if self.modules is not None:
            _modules(self.modules)
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


MODULE_ROLES = ("attention", "feedforward", "block", "cluster", "text_stream")


def _modules(value: Any) -> dict[str, list[str]] | None:
    """Module name patterns as ``{role: [regex, ...]}``, checked (the operator's, never a request's)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ClusCaConfigError("modules", "must be an object mapping roles to lists of patterns")
    out: dict[str, list[str]] = {}
    for key, pats in value.items():
        if key not in MODULE_ROLES:
            raise ClusCaConfigError("modules", f"unknown role {key!r}; roles are {sorted(MODULE_ROLES)}")
        if not isinstance(pats, (list, tuple)) or not all(isinstance(p, str) for p in pats):
            raise ClusCaConfigError("modules", f"{key!r} must be a list of regular expressions")
        for p in pats:
            try:
                re.compile(p)
            except re.error as exc:
                raise ClusCaConfigError("modules", f"invalid regular expression {p!r} ({exc})") from None
        out[str(key)] = list(pats)
    return out


def _coerce(name: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ClusCaConfigError(name, f"must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ClusCaConfigError(name, f"must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ClusCaConfigError(name, f"must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ClusCaConfigError(name, f"must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ClusCaConfigError(name, f"must be a string, got {value!r}")
    return value


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

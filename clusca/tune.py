"""Per-model tuning: find the cache settings a model tolerates, on the device it runs on.

The paper's settings do not carry over from one model to the next, so :func:`tune` measures
them. It runs the pipeline uncached and under candidate settings (modes ``fora``,
``taylorseer`` and ``clusca``; interval, warm-up, order, clusters, gamma, propagation,
guidance pairs) on the same prompts and seeds, and keeps every measurement:

* quality: PSNR and SSIM of each image against the uncached image of the same prompt and
  seed, and an optional adherence check (``checker``);
* speed: analytic FLOPs from ``run.stats`` for every candidate, and for the finalists the
  wall-clock speedup on this device, timed interleaved with the uncached model (batch 1,
  every finalist once per round, the order rotated each round).

The search is successive halving over prompts: every candidate runs on a few prompts, the
best third (non-dominated sorting of PSNR against FLOPs speedup, spread along the speed
axis) go on to three times as many, and so on up to the whole prompt set. The library's
presets and the model's current presets (``baseline``) always go through to the end, so the
result is compared with them on equal terms. The size of the first rung is chosen to fit
the time budget; if time runs out early the deepest rung measured decides.

The picks: on the Pareto front of mean PSNR against measured wall-clock speedup (among the
settings within ``memory_cap_bytes``, if set), each preset (``quality``, ``balanced``,
``fast``) is the setting of highest PSNR that is at least as fast as the library's preset
of that name measured in the same rounds (ties: the faster one); when no setting is as fast,
the fastest one on the front. Each tuned preset is therefore at least as fast as the preset a
user knows by that name, and as accurate as this model allows at that speed.

Measurements go to a journal (JSON, rewritten atomically after each measurement); a run
started with ``resume=True`` continues from it and never measures a candidate on an image
twice.

``clusca.tune`` imports torch lazily: reading results needs numpy and the standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .config import PRESETS, ClusCaConfig

TUNED_PRESETS = ("quality", "balanced", "fast")
PSNR_CAP_DB = 100.0  # identical images count as 100 dB, so that means stay finite
ETA = 3  # successive halving: a third of the candidates go on, on three times the prompts
JOURNAL_VERSION = 1

# What a pipeline call gives back and what it cost: images (N, H, W, C) in [0, 1] and the
# run's statistics (``RunStats.to_dict()``, ``None`` uncached).
Generate = Callable[[ClusCaConfig | None, Sequence[tuple[str, int]]], tuple[np.ndarray, dict[str, Any] | None]]


class TuneError(ValueError):
    """Bad input to :func:`tune` (the message says which and why)."""


# ============================================================================ quality
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [0, 1], capped at :data:`PSNR_CAP_DB` (identical images)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return PSNR_CAP_DB if mse <= 10 ** (-PSNR_CAP_DB / 10) else min(PSNR_CAP_DB, -10.0 * math.log10(mse))


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two (H, W, C) images in [0, 1]: Gaussian window, no padding, channels averaged."""
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    k = max(1, min(window, x.shape[0], x.shape[1]))
    g = np.exp(-((np.arange(k) - (k - 1) / 2) ** 2) / (2 * sigma**2))
    g /= g.sum()

    def blur(z: np.ndarray) -> np.ndarray:  # separable weighted mean over every full window
        h, w = z.shape[0] - k + 1, z.shape[1] - k + 1
        rows = sum(g[i] * z[i:i + h] for i in range(k))
        return sum(g[j] * rows[:, j:j + w] for j in range(k))

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


# ============================================================================ Pareto front and picks
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (higher is better in both), sorted by speed.

    Point j dominates i when it is at least as good in both coordinates and better in one.
    Of identical points the first is kept.
    """
    front = []
    for i, (si, qi) in enumerate(points):
        beaten = False
        for j, (sj, qj) in enumerate(points):
            if j == i:
                continue
            if sj >= si and qj >= qi and (sj > si or qj > qi or j < i):
                beaten = True
                break
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def front_layers(points: Sequence[tuple[float, float]]) -> list[list[int]]:
    """Non-dominated sorting: the front, then the front of the rest, and so on."""
    left = list(range(len(points)))
    layers = []
    while left:
        layer = [left[i] for i in pareto_front([points[i] for i in left])]
        layers.append(layer)
        chosen = set(layer)
        left = [i for i in left if i not in chosen]
    return layers


def pick_presets(points: Sequence[tuple[float, float]], anchors: Mapping[str, float],
                 eligible: Sequence[bool] | None = None) -> dict[str, int]:
    """The index picked for each preset in ``anchors`` (preset name -> the speed to match).

    Among the eligible points on the Pareto front: the highest quality at a speed of at least
    the anchor (ties: the faster); without one, the fastest point of the front.
    """
    idx = [i for i in range(len(points)) if eligible is None or eligible[i]]
    if not idx:
        return {}
    front = [idx[i] for i in pareto_front([points[i] for i in idx])]
    out = {}
    for name, speed in anchors.items():
        fast_enough = [i for i in front if points[i][0] >= speed]
        if fast_enough:
            out[name] = max(fast_enough, key=lambda i: (points[i][1], points[i][0]))
        else:
            out[name] = max(front, key=lambda i: (points[i][0], points[i][1]))
    return out


def preset_overrides(name: str, config: ClusCaConfig) -> dict[str, Any]:
    """``config`` as the registry spells a tuned preset: the fields that differ from the library's ``name``."""
    base = PRESETS[name].to_dict()
    return {k: v for k, v in config.to_dict().items() if k not in ("modules",) and base.get(k) != v}


# ============================================================================ the search space
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
    return cfg.validate()


def label(cfg: ClusCaConfig) -> str:
    """Short name: N interval, W warm-up, O order, K clusters, g gamma."""
    if cfg.mode == "off":
        return "uncached"
    out = f"{cfg.mode} N{cfg.interval} W{cfg.warmup}"
    if cfg.mode != "fora":
        out += f" O{cfg.order}"
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
    clusters, ClusCa with the paper's order, clusters and gamma), then random draws over every
    knob, in a fixed order for a given ``seed``.
    """
    top = max(2, min(12, steps // 4))
    intervals = list(range(2, top + 1))
    warmups = sorted({w for w in (1, 2, 3, 5) if w < steps})
    out: list[ClusCaConfig] = []
    for n in intervals:
        out += [ClusCaConfig(mode="fora", interval=n, warmup=3, order=0),
                ClusCaConfig(mode="taylorseer", interval=n, warmup=3, order=1),
                ClusCaConfig(mode="clusca", interval=n, warmup=3, order=0, clusters=4, gamma=0.0),
                ClusCaConfig(mode="clusca", interval=n, warmup=3, order=1, clusters=16, gamma=0.005)]
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


# ============================================================================ the journal
@dataclass
class Candidate:
    """One setting and everything measured of it."""

    key: str
    config: ClusCaConfig
    origin: str = "search"  # "search", "library <preset>", "model <preset>"
    items: dict[int, dict[str, Any]] = field(default_factory=dict)  # item -> {"psnr", "ssim", "ok"}
    flops_speedup: float | None = None
    cache_bytes: int = 0
    full_steps: int | None = None
    rung: int = 0
    wall_speedup: float | None = None
    times: list[float] = field(default_factory=list)

    @property
    def forced(self) -> bool:
        return self.origin != "search"

    def mean(self, metric: str, n: int | None = None) -> float | None:
        vals = [self.items[i][metric] for i in sorted(self.items) if (n is None or i < n)
                and self.items[i].get(metric) is not None]
        return statistics.fmean(float(v) for v in vals) if vals else None

    def to_json(self) -> dict[str, Any]:
        d = {"key": self.key, "label": label(self.config), "origin": self.origin,
             "config": canonical(self.config).to_dict(), "rung": self.rung,
             "prompts_measured": len(self.items), "psnr": _r(self.mean("psnr")), "ssim": _r(self.mean("ssim"), 4),
             "psnr_min": _r(min((v["psnr"] for v in self.items.values()), default=None)),
             "flops_speedup": self.flops_speedup, "wall_speedup": _r(self.wall_speedup, 4),
             "cache_bytes": self.cache_bytes, "full_steps": self.full_steps, "times": self.times,
             "items": {str(i): v for i, v in sorted(self.items.items())}}
        if any("ok" in v for v in self.items.values()):
            d["adherence"] = _r(100.0 * (self.mean("ok") or 0.0), 1)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Candidate":
        cfg = ClusCaConfig.from_dict(d["config"])
        return cls(key=key_of(cfg), config=cfg, origin=d.get("origin", "search"),
                   items={int(k): dict(v) for k, v in (d.get("items") or {}).items()},
                   flops_speedup=d.get("flops_speedup"), cache_bytes=int(d.get("cache_bytes") or 0),
                   full_steps=d.get("full_steps"), rung=int(d.get("rung") or 0),
                   wall_speedup=d.get("wall_speedup"), times=list(d.get("times") or []))


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(float(x), nd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file beside it, then a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def describe_device(device: Any = None) -> str:
    """A human-readable name of the device a pipeline runs on."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(dev)} (cuda)"
    cpu = platform.processor() or platform.machine()
    return f"cpu {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ============================================================================ the tuner
@dataclass
class TuneResult:
    """What :func:`tune` found (:meth:`to_json` is the measurements file)."""

    meta: dict[str, Any]
    reference: dict[str, Any]
    candidates: list[Candidate]
    final: list[str]  # keys of the settings that reached the last rung measured and were timed
    front: list[str]
    picks: dict[str, str]  # preset -> key
    complete: bool

    def by_key(self, key: str) -> Candidate:
        return next(c for c in self.candidates if c.key == key)

    @property
    def presets(self) -> dict[str, dict[str, Any]]:
        """The tuned presets as registry overrides (``cache_presets``)."""
        return {name: preset_overrides(name, self.by_key(k).config) for name, k in self.picks.items()}

    def summary(self) -> dict[str, Any]:
        """Per pick and per library preset: settings, PSNR, SSIM, speedups, cache bytes."""
        def row(c: Candidate) -> dict[str, Any]:
            j = c.to_json()
            return {k: j[k] for k in ("label", "psnr", "ssim", "wall_speedup", "flops_speedup", "cache_bytes",
                                      *(("adherence",) if "adherence" in j else ()))}

        lib = {c.origin.split()[1]: row(c) for c in self.candidates if c.origin.startswith("library ")}
        base = {c.origin.split()[1]: row(c) for c in self.candidates if c.origin.startswith("model ")}
        return {"picks": {n: row(self.by_key(k)) for n, k in self.picks.items()}, "library": lib, "model": base}

    def to_json(self) -> dict[str, Any]:
        return {"version": JOURNAL_VERSION, "complete": self.complete, "meta": self.meta,
                "reference": self.reference, "final": self.final, "front": self.front, "picks": self.picks,
                "presets": self.presets if self.picks else {}, "summary": self.summary() if self.picks else {},
                "candidates": [c.to_json() for c in self.candidates]}

    def plot(self, path: str | os.PathLike, title: str = "") -> None:
        """Draw the finalists, the front and the picks (PSNR against wall-clock speedup) as a PNG."""
        draw_pareto(self, Path(path), title)


class _Tuner:
    def __init__(self, generate: Generate, items: list[tuple[str, int]], *, minutes: float,
                 journal: Path | None, resume: bool, checker: Callable[[np.ndarray, list[int]], list[bool]] | None,
                 baseline: Mapping[str, Mapping[str, Any]], memory_cap_bytes: int | None, meta: dict[str, Any],
                 steps: int, batch: int, seed: int, progress: Callable[[str], None], min_prompts: int):
        self.generate, self.items, self.checker = generate, items, checker
        self.budget = float(minutes) * 60.0
        self.journal, self.memory_cap = journal, memory_cap_bytes
        self.meta, self.steps, self.batch, self.seed = meta, steps, max(1, int(batch)), seed
        self.say = progress
        self.t0 = time.perf_counter()
        self.ref_images: dict[int, np.ndarray] = {}
        self.reference: dict[str, Any] = {"items": {}, "seconds_per_image": None}
        self.candidates: list[Candidate] = []
        self.final: list[str] = []
        self.rounds: list[dict[str, float]] = []
        self.plan: dict[str, Any] = {}
        self.min_prompts = min_prompts
        self.reserve = 0.0  # seconds kept back for timing the finalists
        self.measured_now = 0  # candidate-image evaluations of this session
        self.baseline = {n: ClusCaConfig.from_dict({"preset": n, **dict(o)}) for n, o in baseline.items()
                         if n in TUNED_PRESETS}
        if resume and journal is not None and journal.exists():
            self._load(journal)

    # ---------------------------------------------------------------- time
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def clock(self) -> str:
        e = self.elapsed()
        return f"{int(e // 60)}:{int(e % 60):02d}/{int(self.budget // 60)}:{int(self.budget % 60):02d}"

    # ---------------------------------------------------------------- journal
    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TuneError(f"resume: cannot read the partial results in {path}: {exc}") from None
        old = data.get("meta") or {}
        for k in ("model", "prompts_sha256", "seeds", "steps", "width", "height", "guidance"):
            if old.get(k) != self.meta.get(k):
                raise TuneError(f"resume: {path} was measured with {k}={old.get(k)!r}, this run has "
                                f"{self.meta.get(k)!r}; use another --out or start afresh")
        self.candidates = [Candidate.from_json(c) for c in data.get("candidates") or []]
        self.reference["items"] = {int(k): v for k, v in (data.get("reference") or {}).get("items", {}).items()}
        self.reference["seconds_per_image"] = (data.get("reference") or {}).get("seconds_per_image")
        self.plan = dict((data.get("meta") or {}).get("plan") or {})
        self.rounds = list((data.get("reference") or {}).get("rounds") or [])
        done = sum(len(c.items) for c in self.candidates)
        self.say(f"[tune] resuming {path.name}: {len(self.candidates)} candidates, {done} images measured")

    def save(self, complete: bool = False, front: list[str] | None = None,
             picks: dict[str, str] | None = None) -> TuneResult:
        self.meta["plan"] = self.plan
        self.reference["rounds"] = self.rounds
        res = TuneResult(self.meta, self.reference, self.candidates, self.final, front or [], picks or {}, complete)
        if self.journal is not None:
            _atomic_write(self.journal, (json.dumps(res.to_json(), indent=1) + "\n").encode())
        return res

    # ---------------------------------------------------------------- measuring
    def _run(self, cfg: ClusCaConfig | None, idx: list[int]) -> tuple[np.ndarray, dict[str, Any] | None, float]:
        t = time.perf_counter()
        images, stats = self.generate(cfg, [self.items[i] for i in idx])
        return np.asarray(images, dtype=np.float32), stats, time.perf_counter() - t

    def ensure_reference(self, n: int) -> None:
        need = [i for i in range(n) if i not in self.ref_images]
        for s in range(0, len(need), self.batch):
            chunk = need[s:s + self.batch]
            images, _, dt = self._run(None, chunk)
            per = dt / len(chunk)
            old = self.reference["seconds_per_image"]
            self.reference["seconds_per_image"] = per if old is None else min(old, per)
            oks = self.checker(images, chunk) if self.checker else [None] * len(chunk)
            for i, img, ok in zip(chunk, images, oks):
                self.ref_images[i] = img
                self.reference["items"][i] = {} if ok is None else {"ok": bool(ok)}

    def measure(self, c: Candidate, n: int) -> bool:
        """Measure ``c`` on items ``0..n-1`` it has not seen; False if the time ran out first."""
        need = [i for i in range(n) if i not in c.items]
        for s in range(0, len(need), self.batch):
            if self.left() <= self.reserve:
                return False
            chunk = need[s:s + self.batch]
            self.ensure_reference(max(chunk) + 1)
            images, stats, _ = self._run(c.config, chunk)
            oks = self.checker(images, chunk) if self.checker else [None] * len(chunk)
            for i, img, ok in zip(chunk, images, oks):
                rec = {"psnr": round(psnr(img, self.ref_images[i]), 4), "ssim": round(ssim(img, self.ref_images[i]), 5)}
                if ok is not None:
                    rec["ok"] = bool(ok)
                c.items[i] = rec
            self.measured_now += len(chunk)
            if stats:
                # rounded here, as the journal keeps it, so that a resumed run ranks exactly alike
                c.flops_speedup = round(float(stats.get("flops_speedup") or 0.0), 4) or None
                c.cache_bytes = max(c.cache_bytes, int(stats.get("cache_bytes") or 0))
                c.full_steps = stats.get("full_steps")
            self.save()
        return True

    # ---------------------------------------------------------------- plan
    def _candidates(self) -> None:
        forced: list[tuple[ClusCaConfig, str]] = [(PRESETS[n], f"library {n}") for n in TUNED_PRESETS]
        forced += [(cfg, f"model {n}") for n, cfg in self.baseline.items()]
        seen: dict[str, Candidate] = {}
        for cfg, origin in forced:
            k = key_of(cfg)
            if k not in seen:
                seen[k] = Candidate(k, canonical(cfg), origin)
        for cfg in search_space(self.steps, self.seed):
            k = key_of(cfg)
            if k not in seen:
                seen[k] = Candidate(k, cfg)
        self.candidates = list(seen.values())

    def make_plan(self) -> None:
        """Choose the rung sizes and how many candidates start, to fit the budget."""
        p = len(self.items)
        t_ref = self.reference["seconds_per_image"] or 1.0
        t_cand = 0.4 * t_ref  # what a cached image costs against an uncached one, about
        forced = sum(c.forced for c in self.candidates)
        pool = len(self.candidates) - forced
        best = None
        t_one = 1.5 * t_ref  # batch 1 costs more per image than the batched quality runs
        ladders = []
        for n0 in (2, 3, 4, 6):
            full = [min(n0, p)]
            while full[-1] < p:
                full.append(min(p, full[-1] * ETA))
            ladders += [full[:k] for k in range(1, len(full) + 1)]  # a budget too small stops early
        for rungs in ladders:
            for start in range(pool, 0, -1):
                cost, alive, prev = 0.0, start, 0
                for n in rungs:
                    cost += (alive + forced) * (n - prev) * t_cand
                    prev, alive = n, max(1, math.ceil(alive / ETA))
                reserve = 10 * t_one * (1 + 0.6 * (alive + forced))  # timing: warm-up and 9 rounds
                cost += (rungs[-1] - rungs[0]) * t_ref + reserve
                if cost <= 0.85 * max(self.left(), 1.0):
                    score = (start >= min(24, pool), rungs[-1], start)
                    if best is None or score > best[0]:
                        best = (score, rungs, start, reserve)
                    break
        if best is None:  # not even one search candidate on one rung fits: measure what we can
            rungs, start, reserve = [min(p, max(1, self.min_prompts))], min(pool, 3), 4 * t_one * 4
        else:
            _, rungs, start, reserve = best
        self.plan = {"rungs": rungs, "start": start, "reserve_s": round(reserve, 1)}
        searched = [c for c in self.candidates if not c.forced]
        keep = {c.key for c in searched[:start]} | {c.key for c in self.candidates if c.forced}
        self.candidates = [c for c in self.candidates if c.key in keep]

    # ---------------------------------------------------------------- successive halving
    def promote(self, alive: list[Candidate], n: int) -> list[Candidate]:
        free = [c for c in alive if not c.forced and len([i for i in c.items if i < n]) >= n]
        keep_n = max(1, math.ceil(len(free) / ETA))
        pts = [(c.flops_speedup or 1.0, c.mean("psnr", n) or 0.0) for c in free]
        chosen: list[int] = []
        for layer in front_layers(pts):
            room = keep_n - len(chosen)
            if room <= 0:
                break
            if len(layer) <= room:
                chosen += layer
            else:  # spread along the speed axis, ends included
                step = (len(layer) - 1) / max(room - 1, 1)
                chosen += sorted({layer[round(j * step)] for j in range(room)})
        keys = {free[i].key for i in chosen} | {c.key for c in alive if c.forced}
        return [c for c in alive if c.key in keys]

    def search(self) -> int:
        """Run the rungs; the index of the deepest rung every survivor completed."""
        rungs = self.plan["rungs"]
        alive = list(self.candidates)
        done = -1
        for r, n in enumerate(rungs):
            if r:
                alive = self.promote(alive, rungs[r - 1])
            for c in alive:
                c.rung = max(c.rung, r)
            self.say(f"[tune] {self.clock()} rung {r + 1}/{len(rungs)}: {len(alive)} settings x {n} image(s)")
            complete = True
            for c in alive:
                fresh = len([i for i in range(n) if i not in c.items])
                if not self.measure(c, n):
                    complete = False
                    break
                if fresh:
                    self.say(f"[tune] {self.clock()}   {label(c.config):<40} PSNR {c.mean('psnr', n):6.2f} dB"
                             f"  FLOPs {c.flops_speedup or 0:5.2f}x")
            if not complete:
                self.say(f"[tune] {self.clock()} the time is up during rung {r + 1}; the deepest complete rung decides")
                break
            done = r
        if done < 0:
            raise TuneError("minutes: the budget ran out before one rung was measured; give it more time "
                            "(or --resume to continue)")
        return done

    # ---------------------------------------------------------------- timing
    def time_finalists(self, finalists: list[Candidate]) -> None:
        """Interleaved wall clock, batch 1 on the first prompt: uncached and every finalist each round."""
        item = [0]
        todo = [c for c in finalists if c.wall_speedup is None]
        if not todo:
            return
        self._run(None, item)  # warm
        for c in todo[:1]:
            self._run(c.config, item)
        t_u = self._run(None, item)[2]
        est = t_u * (1 + 0.6 * len(todo))
        rounds = int(max(5, min(15, (self.left() - 2) // max(est, 1e-3))))
        self.say(f"[tune] {self.clock()} timing {len(todo)} finalists against uncached, {rounds} interleaved rounds")
        session: list[dict[str, float]] = []
        for r in range(rounds):
            order = todo[r % len(todo):] + todo[:r % len(todo)]
            rec = {"uncached": self._run(None, item)[2]}
            for c in order:
                rec[c.key] = self._run(c.config, item)[2]
            session.append(rec)
        # Per round, the uncached run against the setting's run of the same round; the median of
        # those ratios. Load that drifts between rounds hits both runs of a round alike.
        for c in todo:
            c.times = [round(s[c.key], 5) for s in session]
            c.wall_speedup = round(statistics.median(s["uncached"] / s[c.key] for s in session), 4)
        self.reference["times"] = [round(s["uncached"], 5) for s in session]
        self.rounds += [{"uncached": s["uncached"], **{k: v for k, v in s.items() if k != "uncached"}} for s in session]
        self.save()

    # ---------------------------------------------------------------- all of it
    def run(self) -> TuneResult:
        if not self.candidates:
            self._run(None, [0])  # one-off costs of a first call stay out of the plan's estimate
            self.ensure_reference(min(len(self.items), max(1, self.min_prompts)))
            self._candidates()
            self.make_plan()
            r = self.plan["rungs"]
            self.say(f"[tune] {self.clock()} uncached: {self.reference['seconds_per_image']:.3f}s per image; plan: "
                     f"{self.plan['start']} searched + {sum(c.forced for c in self.candidates)} reference settings, "
                     f"rungs of {', '.join(map(str, r))} image(s)")
            self.save()
        self.reserve = float(self.plan.get("reserve_s") or 0.0)
        done = self.search()
        n = self.plan["rungs"][done]
        finalists = [c for c in self.candidates if c.rung >= done and all(i in c.items for i in range(n))]
        self.final = [c.key for c in finalists]
        self.time_finalists(finalists)
        pts = [(c.wall_speedup or 0.0, c.mean("psnr", n) or 0.0) for c in finalists]
        ok = [self.memory_cap is None or c.cache_bytes <= self.memory_cap for c in finalists]
        idx_ok = [i for i, e in enumerate(ok) if e]
        front = [finalists[idx_ok[j]].key for j in pareto_front([pts[i] for i in idx_ok])] if idx_ok else []
        anchors = {}
        for name in TUNED_PRESETS:
            lib = next((c for c in finalists if c.key == key_of(PRESETS[name])), None)
            anchors[name] = lib.wall_speedup if lib and lib.wall_speedup else 0.0
        picks = {name: finalists[i].key for name, i in pick_presets(pts, anchors, ok).items()}
        self.meta["final_prompts"] = n
        self.meta["seconds"] = round(self.elapsed(), 1)
        complete = done == len(self.plan["rungs"]) - 1
        self.meta["all_rungs"] = complete
        res = self.save(complete=True, front=front, picks=picks)
        for name, k in picks.items():
            c = res.by_key(k)
            self.say(f"[tune] {name:<8} {label(c.config):<40} PSNR {c.mean('psnr', n):6.2f} dB, "
                     f"{c.wall_speedup:.2f}x wall, {c.flops_speedup or 0:.2f}x FLOPs")
        return res


def tune_with(generate: Generate, items: Sequence[tuple[str, int]], *, minutes: float, steps: int,
              journal: str | os.PathLike | None = None, resume: bool = False,
              checker: Callable[[np.ndarray, list[int]], list[bool]] | None = None,
              baseline: Mapping[str, Mapping[str, Any]] | None = None, memory_cap_bytes: int | None = None,
              meta: Mapping[str, Any] | None = None, batch: int = 4, seed: int = 0, min_prompts: int = 2,
              progress: Callable[[str], None] | None = None) -> TuneResult:
    """:func:`tune` over any ``generate(config or None, [(prompt, seed), ...]) -> (images, stats)``."""
    if not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes > 0):
        raise TuneError(f"minutes: must be more than 0, got {minutes!r}")
    items = list(items)
    if not items:
        raise TuneError("prompts: no prompts to tune on")
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t = _Tuner(generate, items, minutes=minutes, journal=Path(journal) if journal else None, resume=resume,
               checker=checker, baseline=baseline or {}, memory_cap_bytes=memory_cap_bytes,
               meta=dict(meta or {}), steps=steps, batch=batch, seed=seed, progress=say, min_prompts=min_prompts)
    return t.run()


def pipeline_generate(pipe: Any, *, steps: int, guidance: float | None = None, height: int | None = None,
                      width: int | None = None, call_kwargs: Mapping[str, Any] | None = None) -> Generate:
    """A :data:`Generate` calling a diffusers-style pipeline with a ``transformer`` (hooks installed here)."""
    import inspect

    import torch

    from .hooks import apply_clusca
    from .run import clusca_run

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
    fixed.update(call_kwargs or {})
    step_callback = "callback_on_step_end" in params

    def generate(cfg: ClusCaConfig | None, items: Sequence[tuple[str, int]]):
        kwargs = dict(fixed, prompt=[p for p, _ in items],
                      generator=[torch.Generator(device="cpu").manual_seed(int(s)) for _, s in items])
        with torch.inference_mode():
            if cfg is None:
                images = pipe(**kwargs).images
                return np.asarray(images, dtype=np.float32), None
            with clusca_run(tr, cfg, num_inference_steps=steps) as run:
                if step_callback:
                    run.set_step(0)

                    def on_step(_pipe, i, _t, kw):
                        run.set_step(i + 1)
                        return kw

                    kwargs["callback_on_step_end"] = on_step
                images = pipe(**kwargs).images
        return np.asarray(images, dtype=np.float32), run.stats.to_dict()

    return generate


def tune(pipe: Any, prompts: Sequence[str], *, minutes: float, seeds: int = 1, steps: int = 28,
         guidance: float | None = None, height: int | None = None, width: int | None = None,
         call_kwargs: Mapping[str, Any] | None = None, journal: str | os.PathLike | None = None,
         resume: bool = False, checker: Callable[[np.ndarray, list[int]], list[bool]] | None = None,
         baseline: Mapping[str, Mapping[str, Any]] | None = None, memory_cap_bytes: int | None = None,
         meta: Mapping[str, Any] | None = None, batch: int = 4, seed: int = 0,
         progress: Callable[[str], None] | None = None) -> TuneResult:
    """Find the cache settings ``pipe`` tolerates on its device, within ``minutes``.

    Every prompt runs with seeds ``0..seeds-1`` (image ``k`` of the set is prompt
    ``k // seeds``, seed ``k % seeds``; the first rungs use the first images). ``checker(images,
    indices)`` (optional) says whether each image adheres to its prompt. ``baseline`` is the
    model's current preset tuning (``cache_presets``), measured alongside. ``journal`` keeps every
    measurement (and is what ``resume`` continues from). See the module docstring for the search
    and the picking rules; :attr:`TuneResult.presets` is the registry's ``cache_presets``.
    """
    prompts = [p for p in prompts]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise TuneError("prompts: need at least one non-empty prompt")
    if not isinstance(seeds, int) or seeds < 1:
        raise TuneError(f"seeds: must be at least 1, got {seeds!r}")
    items = [(p, s) for p in prompts for s in range(seeds)]
    gen = pipeline_generate(pipe, steps=steps, guidance=guidance, height=height, width=width, call_kwargs=call_kwargs)
    m = {"steps": steps, "guidance": guidance, "height": height, "width": width, "seeds": seeds,
         "prompts": len(prompts), **dict(meta or {})}
    return tune_with(gen, items, minutes=minutes, steps=steps, journal=journal, resume=resume, checker=checker,
                     baseline=baseline, memory_cap_bytes=memory_cap_bytes, meta=m, batch=batch, seed=seed,
                     progress=progress)


# ============================================================================ the plot
def draw_pareto(res: TuneResult, path: Path, title: str = "") -> None:
    """PSNR against wall-clock speedup of the finalists, the front as a line, the picks and library presets named."""
    from PIL import Image, ImageDraw

    n = res.meta.get("final_prompts")
    pts = {k: (res.by_key(k).wall_speedup or 0.0, res.by_key(k).mean("psnr", n) or 0.0) for k in res.final}
    W, H, L, R, T, B = 900, 600, 70, 30, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    if pts:
        xs, ys = [p[0] for p in pts.values()], [p[1] for p in pts.values()]
        x0, x1 = min(1.0, min(xs)), max(xs) * 1.05 + 1e-6
        y0, y1 = min(ys) - 1.0, max(ys) + 1.0
    else:
        x0, x1, y0, y1 = 1.0, 2.0, 0.0, 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        return (L + (x - x0) / (x1 - x0) * (W - L - R), H - B - (y - y0) / (y1 - y0) * (H - T - B))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for j in range(6):
        xv, yv = x0 + (x1 - x0) * j / 5, y0 + (y1 - y0) * j / 5
        px, _ = at(xv, y0)
        _, py = at(x0, yv)
        d.line([px, H - B, px, H - B + 5], fill="black")
        d.text((px - 12, H - B + 8), f"{xv:.2f}x", fill="black")
        d.line([L - 5, py, L, py], fill="black")
        d.text((8, py - 6), f"{yv:.1f} dB", fill="black")
    d.text((W // 2 - 120, H - 22), "wall-clock speedup vs uncached (this device)", fill="black")
    d.text((L, 12), title or f"clusca tune: PSNR vs speed ({len(pts)} finalists, {n} images)", fill="black")
    line = [at(*pts[k]) for k in res.front if k in pts]
    if len(line) > 1:
        d.line(line, fill=(31, 119, 180), width=2)
    named = {k: [] for k in pts}
    for name, k in res.picks.items():
        named.setdefault(k, []).append(f"tuned {name}")
    for c in res.candidates:
        if c.key in pts and c.origin != "search":
            named[c.key].append(c.origin.replace("library", "paper"))
    for k, (x, y) in pts.items():
        px, py = at(x, y)
        colour = (214, 39, 40) if k in res.picks.values() else (31, 119, 180) if k in res.front else (150, 150, 150)
        r = 5 if named[k] else 3
        d.ellipse([px - r, py - r, px + r, py + r], fill=colour)
        if named[k]:
            d.text((px + 7, py - 6), ", ".join(named[k]), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    _atomic_write(path, buf.getvalue())


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """A measurements file written by :func:`tune` (plain JSON)."""
    return json.loads(Path(path).read_text())


__all__ = ["TUNED_PRESETS", "Candidate", "TuneError", "TuneResult", "canonical", "describe_device", "draw_pareto",
           "front_layers", "key_of", "label", "load_result", "pareto_front", "pick_presets", "pipeline_generate",
           "preset_overrides", "psnr", "search_space", "ssim", "tune", "tune_with"]

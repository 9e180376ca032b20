"""The search: successive halving over prompts, then interleaved timing of the finalists."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import PRESETS, ClusCaConfig
from ..quality import psnr as _psnr
from ..quality import ssim
from .journal import Candidate, write_whole
from .result import TuneResult
from .ladder import band_of, hard_leaning_order, keep_for_picks, survivors
from .timing import CLOCKS, GROUP, interleaved_speedups
from .picks import front_layers, pareto_front, pick_presets
from .space import ETA, PSNR_CAP_DB, TUNED_PRESETS, Generate, TuneError, canonical, key_of, label, \
    search_space


CALIBRATION_SHARE = 0.4  # of the time left, at most, for ranking the images by hardness


def psnr(a, b) -> float:
    """PSNR in dB against the reference, identical images counted as :data:`PSNR_CAP_DB`."""
    return _psnr(a, b, cap=PSNR_CAP_DB)


def score(output: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM of one output against its uncached twin: an image ``(H, W, C)``, or a
    video ``(frames, H, W, C)`` scored per frame and averaged (a frame gone wrong weighs as
    one frame, as a viewer sees it, not diluted into one whole-clip error)."""
    if output.ndim == 4:
        pairs = list(zip(output, ref))
        return {"psnr": statistics.fmean(psnr(a, b) for a, b in pairs),
                "ssim": statistics.fmean(ssim(a, b) for a, b in pairs)}
    return {"psnr": psnr(output, ref), "ssim": ssim(output, ref)}


class _Measurer:
    """The clock, the journal and the measuring of candidates on images (what a search stands on)."""

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
        self.plan: dict[str, Any] = {}
        self.min_prompts = min_prompts
        self.reserve = 0.0  # seconds kept back for timing the finalists
        self.measured_now = 0  # candidate-image evaluations of this session
        self.cand_seconds = 0.0  # what those evaluations cost: the adaptive rungs plan with it
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
        for k in ("model", "prompts_sha256", "seeds", "steps", "width", "height", "guidance", "num_frames"):
            if old.get(k) != self.meta.get(k):
                raise TuneError(f"resume: {path} was measured with {k}={old.get(k)!r}, this run has "
                                f"{self.meta.get(k)!r}; use another --out or start afresh")
        self.candidates = [Candidate.from_json(c) for c in data.get("candidates") or []]
        self.reference["items"] = {int(k): v for k, v in (data.get("reference") or {}).get("items", {}).items()}
        self.reference["seconds_per_image"] = (data.get("reference") or {}).get("seconds_per_image")
        self.plan = dict((data.get("meta") or {}).get("plan") or {})
        done = sum(len(c.items) for c in self.candidates)
        self.say(f"[tune] resuming {path.name}: {len(self.candidates)} candidates, {done} images measured")

    def save(self, complete: bool = False, front: list[str] | None = None,
             picks: dict[str, str] | None = None) -> TuneResult:
        self.meta["plan"] = self.plan
        res = TuneResult(self.meta, self.reference, self.candidates, self.final, front or [], picks or {}, complete)
        if self.journal is not None:
            write_whole(self.journal, (json.dumps(res.to_json(), indent=1) + "\n").encode())
        return res

    # ---------------------------------------------------------------- measuring
    def _run(self, cfg: ClusCaConfig | None, idx: list[int]) -> tuple[np.ndarray, dict[str, Any] | None, float]:
        t = time.perf_counter()
        images, stats = self.generate(cfg, [self.items[i] for i in idx])
        return np.asarray(images, dtype=np.float32), stats, time.perf_counter() - t

    @property
    def order(self) -> list[int]:
        return list(self.plan.get("order") or range(len(self.items)))

    def rung_items(self, n: int) -> list[int]:
        """The first ``n`` items in the rungs' order."""
        return self.order[:n]

    def ensure_reference(self, wanted: Sequence[int]) -> None:
        need = [i for i in wanted if i not in self.ref_images]
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

    def measure(self, c: Candidate, wanted: Sequence[int]) -> bool:
        """Measure ``c`` on the items of ``wanted`` it has not seen; False if the time ran out first."""
        need = [i for i in wanted if i not in c.items]
        for s in range(0, len(need), self.batch):
            if self.left() <= self.reserve:
                return False
            chunk = need[s:s + self.batch]
            self.ensure_reference(chunk)
            t0 = time.perf_counter()
            images, stats, _ = self._run(c.config, chunk)
            oks = self.checker(images, chunk) if self.checker else [None] * len(chunk)
            for i, img, ok in zip(chunk, images, oks):
                q = score(img, self.ref_images[i])
                rec = {"psnr": round(q["psnr"], 4), "ssim": round(q["ssim"], 5)}
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
            self.cand_seconds += time.perf_counter() - t0  # scoring and the journal count too
        return True


class _Tuner(_Measurer):
    """The search: the plan, the rungs of successive halving, the timing, the picks."""

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
    def timing_reserve(self, finalists: int) -> float:
        """Seconds the interleaved timing of ``finalists`` settings (and the reference ones) takes, about."""
        t_one = 1.5 * (self.reference["seconds_per_image"] or 1.0)
        return 10 * t_one * (1 + 0.6 * (finalists + sum(c.forced for c in self.candidates)))

    def cost_per_image(self) -> float:
        if self.measured_now:
            return self.cand_seconds / self.measured_now
        return 0.4 * (self.reference["seconds_per_image"] or 1.0)

    def order_by_hardness(self) -> None:
        """Measure the reference settings on the ladder's images first, then order the images
        so that every rung sees the hard ones (:func:`hard_leaning_order`).

        The reference settings go through every rung anyway, so this costs nothing extra. On a
        machine slower than the plan expected it stops after a share of the time left, so that
        the search still gets its rungs; the images not reached keep their order.
        """
        rungs = self.plan["rungs"]
        ladder = list(range(rungs[-1]))
        forced = [c for c in self.candidates if c.forced]
        self.say(f"[tune] {self.clock()} {len(forced)} reference settings on {len(ladder)} image(s), "
                 "to find the hard prompts")
        stop_at = self.elapsed() + CALIBRATION_SHARE * max(self.left() - self.reserve, 0.0)
        for s in range(0, len(ladder), self.batch):
            chunk = ladder[s:s + self.batch]
            if not all(self.measure(c, chunk) for c in forced) or self.elapsed() > stop_at:
                break
        seen = [i for i in ladder if all(i in c.items for c in forced)]
        hardness = {i: -statistics.fmean(c.items[i]["psnr"] for c in forced) for i in seen} if forced else {}
        first = hard_leaning_order(hardness, rungs) if hardness else []
        self.plan["order"] = first + [i for i in range(len(self.items)) if i not in set(first)]
        self.save()

    def promote(self, alive: list[Candidate], r: int) -> list[Candidate]:
        """The settings of rung ``r - 1`` that go on to rung ``r``: successive layers of the
        Pareto front (PSNR against FLOPs speedup), spread along the speed axis, at least a third
        of them and as many as the time left allows (decided once: a resumed run keeps it)."""
        rungs = self.plan["rungs"]
        prev = self.rung_items(rungs[r - 1])
        free = [c for c in alive if not c.forced and all(i in c.items for i in prev)]
        kept = self.plan.setdefault("kept", {})
        if str(r) in kept:
            keep_n = int(kept[str(r)])
        else:
            room = self.left() * 0.95

            def fits(cost: float, finalists: int) -> bool:
                return cost + self.timing_reserve(finalists) <= room

            keep_n = survivors(len(free), rungs, r, fits, self.cost_per_image())
            kept[str(r)] = keep_n
        final = keep_n
        for _ in range(r + 1, len(rungs)):
            final = max(1, math.ceil(final / ETA))
        self.reserve = max(self.reserve, min(self.timing_reserve(final), 0.5 * max(self.left(), 0.0)))
        self.plan["reserve_s"] = round(self.reserve, 1)
        pts = [(c.flops_speedup or 1.0, c.mean("psnr", prev) or 0.0) for c in free]
        band = band_of([c.flops_speedup or 0.0 for c in alive if c.origin.startswith("library ")])
        chosen = keep_for_picks(pts, keep_n, band)
        keys = {free[i].key for i in chosen} | {c.key for c in alive if c.forced}
        return [c for c in alive if c.key in keys]

    def extend(self, count: int) -> bool:
        """One more rung (three times the images, up to all) when the time left holds it for a
        third of the ``count`` settings that finished the last one, the reference settings and
        their timing: the plan's ladder was sized on an estimate, the measured cost decides."""
        rungs, p = self.plan["rungs"], len(self.items)
        if rungs[-1] >= p or self.plan.get("closed"):  # a finished run resumed: its ladder stays
            return False
        nxt = min(p, rungs[-1] * ETA)
        k = max(1, math.ceil(count / ETA))
        forced = sum(c.forced for c in self.candidates)
        cost = (k + forced) * (nxt - rungs[-1]) * self.cost_per_image() + self.timing_reserve(k)
        if cost > 0.95 * self.left():
            return False
        rungs.append(nxt)
        self.save()
        return True

    def search(self) -> int:
        """Run the rungs; the index of the deepest rung every survivor completed."""
        rungs = self.plan["rungs"]
        alive = list(self.candidates)
        done, r = -1, 0
        while r < len(rungs):
            n = rungs[r]
            if r:
                alive = self.promote(alive, r)
            for c in alive:
                c.rung = max(c.rung, r)
            items = self.rung_items(n)
            self.say(f"[tune] {self.clock()} rung {r + 1}/{len(rungs)}: {len(alive)} settings x {n} image(s)")
            complete = True
            for c in alive:
                fresh = len([i for i in items if i not in c.items])
                if not self.measure(c, items):
                    complete = False
                    break
                if fresh:
                    self.say(f"[tune] {self.clock()}   {label(c.config):<40} PSNR {c.mean('psnr', items):6.2f} dB"
                             f"  FLOPs {c.flops_speedup or 0:5.2f}x")
            if not complete:
                if r == 0 and any(all(i in c.items for i in items) for c in alive):
                    # A machine slower than the plan's estimate (other work on its cores) must
                    # still give an answer within the budget: the settings measured so far.
                    done = 0
                    self.say(f"[tune] {self.clock()} the time is up during rung 1; the settings it measured decide")
                else:
                    self.say(f"[tune] {self.clock()} the time is up during rung {r + 1}; the deepest complete rung decides")
                break
            done = r
            if r == len(rungs) - 1 and self.extend(sum(not c.forced for c in alive)):
                self.say(f"[tune] {self.clock()} time left for one more rung: {rungs[-1]} image(s)")
            r += 1
        if done < 0:
            raise TuneError("minutes: the budget ran out before one rung was measured; give it more time "
                            "(or --resume to continue)")
        return done

    # ---------------------------------------------------------------- timing
    def worth_timing(self, finalists: list[Candidate], items: Sequence[int]) -> list[Candidate]:
        """The finalists that can be picked: the first two layers of the front of PSNR against
        FLOPs speedup, and the reference settings. The wall clock reorders settings whose FLOPs
        are close (the clustering costs time its FLOPs hide) but not one that loses on both, and
        fewer settings a round keep the timing short and the load it sees alike."""
        free = [c for c in finalists if not c.forced]
        pts = [(c.flops_speedup or 1.0, c.mean("psnr", items) or 0.0) for c in free]
        keep = {free[i].key for layer in front_layers(pts)[:2] for i in layer}
        return [c for c in finalists if c.forced or c.key in keep]

    def time_finalists(self, finalists: list[Candidate]) -> None:
        """Wall clock, batch 1 on the first prompt, interleaved with uncached runs
        (:func:`interleaved_speedups`)."""
        item = [0]
        todo = [c for c in finalists if c.wall_speedup is None]
        if not todo:
            return
        self._run(None, item)  # warm: every setting's first call pays one-off costs (buffers, hooks)
        for c in todo:
            self._run(c.config, item)
        t_u = self._run(None, item)[2]
        est = t_u * (1 + 1 / GROUP + 0.6 * len(todo))
        rounds = int(max(3, min(15, (self.left() - 2) // max(est, 1e-3))))
        self.say(f"[tune] {self.clock()} timing {len(todo)} finalists against uncached, {rounds} interleaved rounds"
                 f" ({self.meta.get('clock', 'wall')} clock)")
        runs = {c.key: (lambda cfg=c.config: self._run(cfg, item)) for c in todo}
        timing = interleaved_speedups(lambda: self._run(None, item), runs, rounds, clock=self.meta.get("clock", "wall"),
                                      until=self.t0 + self.budget - est)
        speedups = timing.speedups()
        for c in todo:
            c.times = [round(t, 5) for t in timing.times[timing.clock][c.key]]
            c.wall_speedup = round(speedups[c.key], 4)
        self.reference["times"] = [round(t, 5) for t in timing.base[timing.clock]]
        self.save()

    # ---------------------------------------------------------------- all of it
    def run(self) -> TuneResult:
        if not self.candidates:
            self._run(None, [0])  # one-off costs of a first call stay out of the plan's estimate
            self.ensure_reference(range(min(len(self.items), max(1, self.min_prompts))))
            self._candidates()
            self.make_plan()
            r = self.plan["rungs"]
            self.say(f"[tune] {self.clock()} uncached: {self.reference['seconds_per_image']:.3f}s per image; plan: "
                     f"{self.plan['start']} searched + {sum(c.forced for c in self.candidates)} reference settings, "
                     f"rungs of {', '.join(map(str, r))} image(s)")
            self.save()
        self.reserve = float(self.plan.get("reserve_s") or 0.0)
        if "order" not in self.plan:
            self.order_by_hardness()
        done = self.search()
        self.plan["closed"] = True
        n = self.plan["rungs"][done]
        final_items = self.rung_items(n)
        finalists = [c for c in self.candidates if c.rung >= done and all(i in c.items for i in final_items)]
        finalists = self.worth_timing(finalists, final_items)
        self.final = [c.key for c in finalists]
        self.time_finalists(finalists)
        pts = [(c.wall_speedup or 0.0, c.mean("psnr", final_items) or 0.0) for c in finalists]
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
            self.say(f"[tune] {name:<8} {label(c.config):<40} PSNR {c.mean('psnr', final_items):6.2f} dB, "
                     f"{c.wall_speedup:.2f}x {self.meta.get('clock', 'wall')}, {c.flops_speedup or 0:.2f}x FLOPs")
        return res


def tune_with(generate: Generate, items: Sequence[tuple[str, int]], *, minutes: float, steps: int,
              journal: str | os.PathLike | None = None, resume: bool = False,
              checker: Callable[[np.ndarray, list[int]], list[bool]] | None = None,
              baseline: Mapping[str, Mapping[str, Any]] | None = None, memory_cap_bytes: int | None = None,
              meta: Mapping[str, Any] | None = None, batch: int = 4, seed: int = 0, min_prompts: int = 2,
              progress: Callable[[str], None] | None = None, clock: str = "wall") -> TuneResult:
    """:func:`tune` over any ``generate(config or None, [(prompt, seed), ...]) -> (images, stats)``.

    ``clock`` times the finalists: ``wall`` or ``cpu`` (:func:`clusca.tune.timing.pick_clock`).
    """
    if clock not in CLOCKS:
        raise TuneError(f"clock: must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes > 0):
        raise TuneError(f"minutes: must be more than 0, got {minutes!r}")
    items = list(items)
    if not items:
        raise TuneError("prompts: no prompts to tune on")
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t = _Tuner(generate, items, minutes=minutes, journal=Path(journal) if journal else None, resume=resume,
               checker=checker, baseline=baseline or {}, memory_cap_bytes=memory_cap_bytes,
               meta={**dict(meta or {}), "clock": clock}, steps=steps, batch=batch, seed=seed, progress=say, min_prompts=min_prompts)
    return t.run()

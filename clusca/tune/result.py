"""What a tuning run found: every candidate measured, the Pareto front, and the picks.

Its own module so that drawing (:mod:`.plot`) and searching (:mod:`.tuner`) both read it
without reading each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .journal import Candidate
from .picks import preset_overrides
from .space import JOURNAL_VERSION


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
    def final_items(self) -> list[int]:
        """The images the finalists were all measured on (those their mean PSNR is over)."""
        plan = self.meta.get("plan") or {}
        n = int(self.meta.get("final_prompts") or 0)
        order = plan.get("order") or list(range(n))
        return list(order[:n])

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
        from .plot import draw_pareto

        draw_pareto(self, Path(path), title)

"""Per-model tuning: find the cache settings a model tolerates, on the device it runs on.

The paper's settings do not carry over from one model to the next, so :func:`tune` measures
them. It runs the pipeline uncached and under candidate settings (modes ``fora``,
``taylorseer`` and ``clusca``; interval, warm-up, order, clusters, gamma, propagation,
guidance pairs) on the same prompts and seeds, and keeps every measurement:

* quality: PSNR and SSIM of each image against the uncached image of the same prompt and
  seed (a video: per frame, averaged), and an optional adherence check (``checker``);
* speed: analytic FLOPs from ``run.stats`` for every candidate, and for the finalists the
  wall-clock speedup on this device, timed interleaved with the uncached model
  (:func:`interleaved_speedups`: batch 1, an uncached run between every few settings, each
  setting against the uncached runs around it).

The search is successive halving over prompts. The library's presets and the model's current
presets (``baseline``) run first on every image of the ladder: they go through to the end
anyway, so that the result is compared with them on equal terms, and where they fail shows
which prompts are hard. The images are then ordered so that every rung's sample leans
towards those (:func:`clusca.tune.ladder.hard_leaning_order`): a setting that breaks on a
few prompts must not win the first rungs on easy ones. Every candidate runs on the first
few images; at least the best third (non-dominated sorting of PSNR against FLOPs speedup,
spread along the speed axis), and as many more as the time left allows at the measured cost,
go on to three times as many images, and so on. The plan's ladder is sized from the first
uncached images; when the measured cost leaves room, one more rung is added, up to the whole
prompt set. If time runs out inside a rung, the deepest complete rung decides. The finalists
worth timing are the first two layers of that front and the reference settings.

The picks: on the Pareto front of mean PSNR against measured wall-clock speedup (among the
settings within ``memory_cap_bytes``, if set), each preset (``quality``, ``balanced``,
``fast``, in that order) is the setting of highest PSNR that is at least as fast as the
library's preset of that name measured in the same rounds and 1.1 times as fast as the tuned
preset before it (ties: the faster one); without one that much faster, the step is dropped;
when no setting is as fast as the library preset, the fastest one on the front. Each tuned preset is therefore at least as fast as the preset a
user knows by that name, and as accurate as this model allows at that speed.

Measurements go to a journal (JSON, rewritten atomically after each measurement); a run
started with ``resume=True`` continues from it and never measures a candidate on an image
twice.

``clusca.tune`` imports torch lazily: reading results needs numpy and the standard library only.
"""

from __future__ import annotations

from ..quality import ssim
from .journal import Candidate, describe_device, load_result
from .picks import front_layers, pareto_front, pick_presets, preset_overrides
from .plot import draw_pareto
from .timing import GROUP, interleaved_speedups
from .space import PSNR_CAP_DB, TUNED_PRESETS, Generate, TuneError, canonical, key_of, label, search_space
from .pipeline import pipeline_generate, tune
from .result import TuneResult
from .tuner import psnr, score, tune_with

__all__ = ["GROUP", "interleaved_speedups", "PSNR_CAP_DB", "TUNED_PRESETS", "Generate", "Candidate", "TuneError", "TuneResult", "canonical", "describe_device", "draw_pareto",
           "front_layers", "key_of", "label", "load_result", "pareto_front", "pick_presets", "pipeline_generate",
           "preset_overrides", "psnr", "score", "search_space", "ssim", "tune", "tune_with"]

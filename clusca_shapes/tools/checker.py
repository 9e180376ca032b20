"""Deterministic prompt-adherence checker for the built-in shapes model.

It judges an image against the :class:`~clusca_shapes.tools.data.Scene` a prompt asks for,
from pixel statistics only:

* colour: pixels are labelled with their nearest palette colour; the requested colour
  must cover a connected blob of a minimum size (the largest blob is "the object");
* shape: ellipse, rectangle and apex-up triangle templates are fitted to the blob's
  bounding box; the template with the highest IoU names the shape;
* position: the centre of the blob's bounding box must be nearest to the requested anchor (one object),
  or the two centres must stand in the requested relation (two objects).

``python -m clusca_shapes.tools.checker`` generates the fixed benchmark prompts with a
checkpoint and prints the accuracy; ``--ground-truth`` checks the rendered training
images instead, which must score 100%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from . import data

# Pixels further than this from every palette entry (blurred edges, noise) get no label.
MAX_COLOUR_DISTANCE = 90.0
MIN_AREA_SINGLE = 30
MIN_AREA_PAIR = 12
MIN_RELATION_OFFSET = 3.0

_NAMES = list(data.COLOURS) + [f"bg:{b}" for b in data.BACKGROUNDS]
_PALETTE = np.array(list(data.COLOURS.values()) + list(data.BACKGROUNDS.values()), dtype=np.float32)


@dataclass
class ObjectReport:
    colour: str
    found: bool
    area: int
    shape: str | None
    centroid: tuple[float, float] | None
    shape_scores: dict[str, float]


@dataclass
class CheckResult:
    colour_ok: bool
    shape_ok: bool
    position_ok: bool
    objects: list[ObjectReport]
    position: str | None = None

    @property
    def ok(self) -> bool:
        return self.colour_ok and self.shape_ok and self.position_ok


def to_uint8(image) -> np.ndarray:
    """Accept a PIL image, an (H, W, 3) array in [0, 1] or [0, 255], or a (3, H, W) tensor."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).round().astype(np.uint8)
    return arr


def label_pixels(img: np.ndarray) -> np.ndarray:
    """Index into ``_NAMES`` of each pixel's nearest palette colour, -1 when none is close."""
    d = np.linalg.norm(img.astype(np.float32)[:, :, None, :] - _PALETTE[None, None], axis=-1)
    labels = d.argmin(-1)
    labels[d.min(-1) > MAX_COLOUR_DISTANCE] = -1
    return labels


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected region of ``mask`` (stray pixels of the same colour are ignored)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _template(shape: str, x0: int, x1: int, y0: int, y1: int, h: int, w: int) -> np.ndarray:
    """Boolean template of ``shape`` filling the box [x0, x1] x [y0, y1] (inclusive pixels)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    rx, ry = max((x1 - x0 + 1) / 2, 0.5), max((y1 - y0 + 1) / 2, 0.5)
    dx, dy = (xs - cx) / rx, (ys - cy) / ry
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":
        return (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
    depth = (dy + 1) / 2
    return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth)


def classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    scores = {}
    for shape in data.SHAPES:
        t = _template(shape, x0, x1, y0, y1, *mask.shape)
        scores[shape] = float((t & mask).sum() / max((t | mask).sum(), 1))
    return max(scores, key=scores.get), scores


def nearest_anchor(x: float, y: float, width: int, height: int) -> str:
    sx, sy = width / data.IMAGE_SIZE, height / data.IMAGE_SIZE
    dist = {k: (x - ax * sx) ** 2 + (y - ay * sy) ** 2 for k, (ax, ay) in data.ANCHORS.items()}
    return min(dist, key=dist.get)


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Does the object at centroid ``a`` stand in ``relation`` to the one at ``b``?"""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if relation == "above":
        return -dy >= MIN_RELATION_OFFSET and -dy > abs(dx)
    if relation == "below":
        return dy >= MIN_RELATION_OFFSET and dy > abs(dx)
    if relation == "left of":
        return -dx >= MIN_RELATION_OFFSET and -dx > abs(dy)
    if relation == "right of":
        return dx >= MIN_RELATION_OFFSET and dx > abs(dy)
    raise ValueError(f"unknown relation {relation!r}")


def check(image, scene: data.Scene) -> CheckResult:
    """Judge ``image`` against what ``scene`` asks for (colour, shape, position)."""
    img = to_uint8(image)
    h, w = img.shape[:2]
    labels = label_pixels(img)
    min_area = (MIN_AREA_SINGLE if len(scene.objects) == 1 else MIN_AREA_PAIR) * (h * w) / data.IMAGE_SIZE**2
    reports = []
    for obj in scene.objects:
        blob = largest_component(labels == _NAMES.index(obj.colour))
        area = int(blob.sum())
        if area < min_area:
            reports.append(ObjectReport(obj.colour, False, area, None, None, {}))
            continue
        shape, scores = classify_shape(blob)
        # Bounding-box centre, not the centre of mass: a triangle's mass sits low.
        ys, xs = np.nonzero(blob)
        centroid = (float(xs.min() + xs.max() + 1) / 2, float(ys.min() + ys.max() + 1) / 2)
        reports.append(ObjectReport(obj.colour, True, area, shape, centroid, scores))
    colour_ok = all(r.found for r in reports)
    shape_ok = colour_ok and all(r.shape == o.shape for r, o in zip(reports, scene.objects))
    position = None
    if not colour_ok:
        position_ok = False
    elif scene.relation is not None:
        position_ok = relation_holds(scene.relation, reports[0].centroid, reports[1].centroid)
    else:
        position = nearest_anchor(*reports[0].centroid, w, h)
        position_ok = scene.position is None or position == scene.position
    return CheckResult(colour_ok, shape_ok, position_ok, reports, position)


def summarise(results: list[CheckResult], scenes: list[data.Scene]) -> dict[str, float]:
    def pct(xs) -> float:
        xs = list(xs)
        return round(100.0 * sum(xs) / max(len(xs), 1), 2)

    pairs = [r for r, s in zip(results, scenes) if s.relation is not None]
    singles = [r for r, s in zip(results, scenes) if s.relation is None]
    return {
        "n": len(results),
        "adherence": pct(r.ok for r in results),
        "colour": pct(r.colour_ok for r in results),
        "shape": pct(r.shape_ok for r in results),
        "position": pct(r.position_ok for r in results),
        "adherence_single": pct(r.ok for r in singles),
        "adherence_pair": pct(r.ok for r in pairs),
    }


def generate_eval_images(pipe, prompts: list[str], seed: int = 0, batch: int = 25, **call_kwargs):
    """Images for ``prompts``; image i always uses the generator seeded ``seed + i``."""
    import torch

    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))]
        images += list(pipe(chunk, generator=gens, output_type="np", **call_kwargs).images)
    return images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Prompt adherence of the built-in model on the fixed prompt set.")
    p.add_argument("--weights", default=None, help="checkpoint folder (default: the shipped weights)")
    p.add_argument("-n", type=int, default=200, help="number of prompts (>= 200 for the benchmark)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the first image's generator")
    p.add_argument("--ground-truth", action="store_true", help="check rendered training images instead")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--device", default="cpu", help="where the model runs (images are judged on the CPU)")
    a = p.parse_args(argv)
    items = data.eval_set(a.n)
    prompts, scenes = [t for t, _ in items], [s for _, s in items]
    t0 = time.time()
    if a.ground_truth:
        images = [data.render(s) for s in scenes]
    else:
        import torch

        from .. import WEIGHTS_DIR
        from ..pipeline import ShapesFluxPipeline

        torch.set_num_threads(a.threads)
        pipe = ShapesFluxPipeline.from_pretrained(a.weights or WEIGHTS_DIR).to(a.device)
        images = generate_eval_images(pipe, prompts, seed=a.seed, num_inference_steps=a.steps,
                                      guidance_scale=a.guidance)
    results = [check(img, s) for img, s in zip(images, scenes)]
    summary = summarise(results, scenes)
    summary["seconds"] = round(time.time() - t0, 1)
    if a.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:>18}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

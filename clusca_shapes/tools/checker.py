"""Deterministic prompt-adherence checker for the built-in shapes model.

It judges an image against the :class:`~clusca_shapes.tools.data.Scene` a prompt asks for,
from pixel statistics only:

* colour: the background is the palette colour commonest along the frame; every other
  pixel is read as a blend of it with one object colour (:func:`object_labels`); each
  requested object needs a connected blob of its colour of a minimum size;
* count: the number of such blobs of a colour must equal the number of objects of that
  colour the prompt asks for ("two blue squares" is two blobs, "a red circle" one);
* shape: ellipse, rectangle and apex-up triangle templates are fitted to each blob's
  bounding box; the template with the highest IoU names the shape;
* position: the centre of the blob's bounding box must be nearest to the requested anchor
  (one object), or the two centres must stand in the requested relation (two objects).

A blob is judged by the region it encloses (its holes filled), so a shape drawn as an
outline, as the ``outline`` adapter draws it, is the shape it outlines.

Apart from adherence it tells the adapters' drawing styles (:mod:`clusca_shapes.tools.styles`)
in an image: :func:`shows_outline` (most shapes hollow: their inside is background) and
:func:`shows_pastel` (the objects' colours at a fraction of their strength over the
background, about :data:`styles.PASTEL_OPACITY`); :func:`style_report` gives the measures.

Apart from adherence it measures how cleanly the shapes are drawn (:class:`EdgeReport`):
the outline (IoU of each blob with its best template: misshapen blobs score low), the
roughness (its perimeter over the template's: spikes, notches and holes score high),
stray pixels (off the background colour and away from every found object: colour
bleeding, smears, specks), and whether a shape touches the frame (no prompt asks for
that: the training scenes keep a margin).

``python -m clusca_shapes.tools.checker`` generates the fixed benchmark prompts with a
checkpoint and prints the accuracy per prompt form; ``--ground-truth`` checks the rendered
scenes instead, which must score 100% and all clean. ``--adapter outline`` (a shipped
adapter's name, or a PEFT folder) draws them with a style adapter, ``--style`` renders the
ground truth in a style; either way the share of images showing each style is printed too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from . import data, styles

# Pixels further than this from every palette entry (blurred edges, noise) get no label.
MAX_COLOUR_DISTANCE = 90.0
# Least blob area (pixels at 32x32) that counts as an object, by number of objects asked for.
MIN_AREA = {1: 30, 2: 12, 3: 8}
# How far a pixel may sit off the line from the background to an object colour and still
# count as a blend of the two (the nearest line wins, so this only rejects other colours).
BLEND_DISTANCE = 80.0
MIN_RELATION_OFFSET = 3.0
# Edge measure thresholds (at 32x32): a drawn scene, anti-aliased, stays well inside them.
CLEAN_OUTLINE = 0.7
CLEAN_ROUGHNESS = 1.2
CLEAN_STRAY = 6
STRAY_DISTANCE = 48.0  # RGB distance from the background that makes a pixel off-colour
SPECK = 8  # pixels: a region of an object colour smaller than this is a speck (or an edge), not an object

_NAMES = list(data.COLOURS) + [b for b in data.BACKGROUNDS if b not in data.COLOURS]
_PALETTE = np.array([(data.COLOURS | data.BACKGROUNDS)[n] for n in _NAMES], dtype=np.float32)
_COLOUR_INDEX = {c: i for i, c in enumerate(data.COLOURS)}


@dataclass
class ObjectReport:
    colour: str
    found: bool
    area: int
    shape: str | None
    centroid: tuple[float, float] | None
    shape_scores: dict[str, float]


@dataclass
class EdgeReport:
    """How cleanly the found objects are drawn; ``clean`` when every measure is in bounds
    (objects the checker did not find are adherence's concern, not this one's)."""

    outline: float  # lowest best-template IoU over the found objects (1 = a perfect shape)
    roughness: float  # highest perimeter ratio to the shape's template (about 1 = a smooth outline)
    stray_px: int  # off-background pixels further than a pixel from every found object
    touches_frame: bool  # a found object reaches the image border
    clean: bool


@dataclass
class CheckResult:
    colour_ok: bool
    shape_ok: bool
    position_ok: bool
    objects: list[ObjectReport]
    position: str | None = None
    count_ok: bool = True
    counts: dict[str, int] | None = None  # blobs found per requested colour
    edge: EdgeReport | None = None
    background: str | None = None  # the background drawn (see drawn_background)

    @property
    def ok(self) -> bool:
        return self.colour_ok and self.count_ok and self.shape_ok and self.position_ok


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


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of ``mask``, largest first (ties: first in scan order)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    found: list[list[tuple[int, int]]] = []
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
        found.append(comp)
    out = []
    for comp in sorted(found, key=len, reverse=True):
        m = np.zeros_like(mask, dtype=bool)
        ys, xs = zip(*comp)
        m[list(ys), list(xs)] = True
        out.append(m)
    return out


def fill_holes(mask: np.ndarray, others: np.ndarray | None = None) -> np.ndarray:
    """``mask`` with every region it encloses filled: what is not reachable through pixels
    outside ``mask`` (4-connected) from the frame, or from ``others`` (pixels of other objects),
    is inside. So a ring around another object (colour bled into a halo) stays a ring."""
    free = ~mask
    outside = np.zeros_like(mask, dtype=bool)
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = free[0], free[-1], free[:, 0], free[:, -1]
    if others is not None:
        outside |= others & free
    while True:
        p = np.pad(outside, 1)
        grown = (outside | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]) & free
        if (grown == outside).all():
            return ~outside
        outside = grown


def _drawn(objects: np.ndarray) -> np.ndarray:
    """Pixels of an object colour, without specks (regions under SPECK pixels): what can hold a
    ring open (see :func:`fill_holes`), where a speck inside an outline does not."""
    out = np.zeros(objects.shape, dtype=bool)
    for comp in components(objects >= 0):
        if comp.sum() >= SPECK:
            out |= comp
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected region of ``mask`` (stray pixels of the same colour are ignored)."""
    comps = components(mask)
    return comps[0] if comps else np.zeros_like(mask, dtype=bool)


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


def _dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel in the 8 directions."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def perimeter(mask: np.ndarray) -> int:
    """Pixel edges between ``mask`` and the rest (the frame counts as outside)."""
    p = np.pad(mask, 1)
    return int((p[1:] != p[:-1]).sum() + (p[:, 1:] != p[:, :-1]).sum())


def roughness(blob: np.ndarray, shape: str) -> float:
    """Perimeter of ``blob`` over that of the ``shape`` template filling its box.

    A clean drawing of the shape scores about 1; spikes, notches and holes lengthen the
    outline without moving the box, so a ragged one scores well above.
    """
    ys, xs = np.nonzero(blob)
    t = _template(shape, xs.min(), xs.max(), ys.min(), ys.max(), *blob.shape)
    return perimeter(blob) / max(perimeter(t), 1)


def edge_report(img: np.ndarray, labels: np.ndarray, background: str, blobs: list[np.ndarray],
                reports: list[ObjectReport]) -> EdgeReport:
    h, w = labels.shape
    scale = h * w / data.IMAGE_SIZE**2
    near = np.zeros((h, w), dtype=bool)
    touches = False
    for blob in blobs:
        near |= _dilate(blob)
        touches |= bool(blob[0].any() or blob[-1].any() or blob[:, 0].any() or blob[:, -1].any())
    # Off-colour pixels away from the objects, measured from the background actually drawn
    # (its median), so a faint smear counts as well as one of a palette colour.
    is_bg = labels == _NAMES.index(background)
    ref = np.median(img[is_bg], axis=0) if is_bg.any() else _PALETTE[_NAMES.index(background)]
    off = np.linalg.norm(img.astype(np.float32) - ref, axis=-1) > STRAY_DISTANCE
    stray = int((off & ~near).sum())
    found = [(blob, r) for blob, r in zip(blobs, (r for r in reports if r.found))]
    outline = min((max(r.shape_scores.values()) for _, r in found), default=0.0)
    rough = max((roughness(blob, r.shape) for blob, r in found), default=0.0)
    clean = bool(found) and outline >= CLEAN_OUTLINE \
        and rough <= CLEAN_ROUGHNESS and stray <= CLEAN_STRAY * scale and not touches
    return EdgeReport(round(outline, 4), round(rough, 3), stray, touches, clean)


def object_labels(img: np.ndarray, background: str) -> np.ndarray:
    """Index into ``data.COLOURS`` of the object colour each pixel shows, -1 for none.

    A pixel is read as a blend of ``background`` and one object colour: the colour whose
    line from the background passes closest to it, when the pixel is at least half of
    that colour and not too far off the line. Reading blends, not nearest colours, keeps
    shapes their true size at any contrast (a black disc on white keeps its half-covered
    edge pixels) and keeps one colour's edges from passing for another (half orange on
    white is near yellow).
    """
    b = _PALETTE[_NAMES.index(background)]
    cols = np.array([c for name, c in data.COLOURS.items()], dtype=np.float32) - b  # (K, 3)
    p = img.astype(np.float32).reshape(-1, 3) - b
    alpha = (p @ cols.T) / np.maximum((cols * cols).sum(1), 1.0)  # (N, K)
    resid = np.linalg.norm(p[:, None, :] - np.clip(alpha, 0, 1)[..., None] * cols[None], axis=-1)
    resid[(alpha < 0.5) | np.array([name == background for name in data.COLOURS])[None]] = np.inf
    best = resid.argmin(1)
    out = np.where(resid[np.arange(len(p)), best] <= BLEND_DISTANCE, best, -1)
    return out.reshape(img.shape[:2])


def drawn_background(labels: np.ndarray, default: str) -> str:
    """The background colour the image was drawn on: the commonest one along the frame.

    Prompts rarely name the background, so the model picks one; ``default`` (the scene's)
    stands in only when no background colour is on the frame at all.
    """
    ring = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    votes = {b: int((ring == _NAMES.index(b)).sum()) for b in data.BACKGROUNDS}
    best = max(votes, key=votes.get)
    return best if votes[best] else default


def check(image, scene: data.Scene) -> CheckResult:
    """Judge ``image`` against what ``scene`` asks for (colour, count, shape, position, edges)."""
    img = to_uint8(image)
    h, w = img.shape[:2]
    labels = label_pixels(img)
    background = drawn_background(labels, scene.background)
    objects = object_labels(img, background)
    min_area = MIN_AREA[min(len(scene.objects), max(MIN_AREA))] * (h * w) / data.IMAGE_SIZE**2
    # The blobs of each requested colour, largest first; objects of one colour take them in
    # turn. An object of the background's own colour cannot be seen (a white square on white).
    # Each blob as the region it encloses: an outline counts as the shape it outlines.
    drawn = _drawn(objects)
    blobs = {c: [] if c == background else
             [f for f in (fill_holes(b, drawn) for b in components(objects == _COLOUR_INDEX[c])) if f.sum() >= min_area]
             for c in dict.fromkeys(o.colour for o in scene.objects)}
    taken = {c: 0 for c in blobs}
    reports, used = [], []
    for obj in scene.objects:
        k = taken[obj.colour]
        taken[obj.colour] += 1
        if k >= len(blobs[obj.colour]):
            reports.append(ObjectReport(obj.colour, False, 0, None, None, {}))
            continue
        blob = blobs[obj.colour][k]
        used.append(blob)
        shape, scores = classify_shape(blob)
        # Bounding-box centre, not the centre of mass: a triangle's mass sits low.
        ys, xs = np.nonzero(blob)
        centroid = (float(xs.min() + xs.max() + 1) / 2, float(ys.min() + ys.max() + 1) / 2)
        reports.append(ObjectReport(obj.colour, True, int(blob.sum()), shape, centroid, scores))
    counts = {c: len(b) for c, b in blobs.items()}
    colour_ok = all(counts.values())
    count_ok = all(counts[c] == taken[c] for c in counts)
    shape_ok = colour_ok and all(r.shape == o.shape for r, o in zip(reports, scene.objects) if r.found)
    position = None
    if scene.relation is None and len(scene.objects) > 1:
        position_ok = colour_ok  # a count asks for no arrangement
    elif not all(r.found for r in reports):
        position_ok = False
    elif scene.relation is not None:
        position_ok = relation_holds(scene.relation, reports[0].centroid, reports[1].centroid)
    else:
        position = nearest_anchor(*reports[0].centroid, w, h)
        position_ok = scene.position is None or position == scene.position
    edge = edge_report(img, labels, background, used, reports)
    return CheckResult(colour_ok, shape_ok, position_ok, reports, position, count_ok, counts, edge, background)


# A blob is an outline when at least this share of the region it encloses is background.
OUTLINE_HOLLOW = 0.1
# Object colour strength (0: background, 1: the full colour) that reads as pastel: a pastel
# drawing is about styles.PASTEL_OPACITY, a plain one about 1.
PASTEL_STRENGTH = (0.4, 0.85)
STYLE_MIN_AREA = MIN_AREA[max(MIN_AREA)]


@dataclass
class StyleReport:
    """How an image's objects are drawn: what tells the adapters' styles apart."""

    background: str
    objects: int  # blobs of an object colour with at least STYLE_MIN_AREA pixels enclosed
    hollow: int  # of them, outlines (at least OUTLINE_HOLLOW of the enclosed region is background)
    strength: float  # median colour strength of the objects' inner pixels (1 = full colour), 0 without objects

    @property
    def outline(self) -> bool:
        return self.objects > 0 and 2 * self.hollow >= self.objects

    @property
    def pastel(self) -> bool:
        return self.objects > 0 and PASTEL_STRENGTH[0] <= self.strength <= PASTEL_STRENGTH[1]


def style_report(image) -> StyleReport:
    """The blobs of object colours in ``image``, how many are hollow, and how strong their colour is."""
    img = to_uint8(image)
    background = drawn_background(label_pixels(img), "white")
    objects = object_labels(img, background)
    blobs, hollow = [], 0
    # Blobs of any object colour (a thin line's blended pixels may read as a neighbouring
    # colour), each grown by a pixel first: a line with a gap of a pixel or two still encloses.
    drawn = objects >= 0
    for grown in components(_dilate(drawn)):
        filled = fill_holes(grown)
        if (filled & drawn).sum() >= STYLE_MIN_AREA:
            blobs.append(grown & drawn)
            # Inside: enclosed, not drawn, and not the grown pixel's rim on the outside.
            inside = filled & ~drawn & ~_dilate(~filled)
            hollow += int(inside.sum() >= OUTLINE_HOLLOW * filled.sum())
    if not blobs:
        return StyleReport(background, 0, 0, 0.0)
    # Strength: a pixel's share of its object colour on the line from the background to it. A
    # blob's is that of its strongest pixels (its 90th percentile), where no edge blends it in.
    b = _PALETTE[_NAMES.index(background)]
    cols = np.array(list(data.COLOURS.values()), dtype=np.float32) - b
    p = img.astype(np.float32) - b
    values = []
    for comp in blobs:
        c = cols[np.bincount(objects[comp]).argmax()]
        values.append(float(np.percentile((p[comp] @ c) / max(float(c @ c), 1.0), 90)))
    return StyleReport(background, len(blobs), hollow, round(float(np.median(values)), 3))


def shows_outline(image) -> bool:
    """Are the shapes of ``image`` drawn as outlines (at least half of its objects hollow)?"""
    return style_report(image).outline


def shows_pastel(image) -> bool:
    """Are the objects of ``image`` drawn in softened colours (strength in :data:`PASTEL_STRENGTH`)?"""
    return style_report(image).pastel


STYLE_CHECKS = {"outline": shows_outline, "pastel": shows_pastel}


def shows_style(image, style: str) -> bool:
    """Does ``image`` show the adapter style ``style`` (one of :data:`styles.STYLES`)?"""
    if style not in STYLE_CHECKS:
        raise ValueError(f"unknown style {style!r}; the styles are {', '.join(STYLE_CHECKS)}")
    return STYLE_CHECKS[style](image)


def _pct(xs) -> float:
    xs = list(xs)
    return round(100.0 * sum(xs) / max(len(xs), 1), 2)


def _measures(results: list[CheckResult]) -> dict:
    # The edge figures describe the shapes drawn, so they are over the images with every
    # requested colour found (``judged``); a missing object is adherence's concern.
    edges = [r.edge for r in results if r.edge is not None and r.colour_ok]
    return {
        "n": len(results),
        "adherence": _pct(r.ok for r in results),
        "colour": _pct(r.colour_ok for r in results),
        "count": _pct(r.count_ok for r in results),
        "shape": _pct(r.shape_ok for r in results),
        "position": _pct(r.position_ok for r in results),
        "judged": len(edges),
        "clean": _pct(e.clean for e in edges),
        "outline": round(float(np.mean([e.outline for e in edges])), 3) if edges else 0.0,
        "roughness": round(float(np.mean([e.roughness for e in edges])), 3) if edges else 0.0,
        "stray_px": round(float(np.mean([e.stray_px for e in edges])), 2) if edges else 0.0,
        "touches_frame": _pct(e.touches_frame for e in edges),
    }


# Groups the targets are stated for: one object with or without a position, two objects
# in a relation, counts.
GROUPS = {
    "one_object": ("one_placed", "one_unplaced", "one_black_white"),
    "relation": ("relation",),
    "count": ("two_of_a_kind", "three_of_a_kind"),
}


def summarise(results: list[CheckResult], scenes: list[data.Scene]) -> dict:
    """Overall measures (percentages; ``outline`` and ``stray_px`` are means) with
    ``forms`` and ``groups`` breakdowns; ``adherence_single`` / ``adherence_pair`` are the
    one-object and relation groups."""
    forms = [s.form for s in scenes]
    out = _measures(results)
    out["forms"] = {f: _measures([r for r, g in zip(results, forms) if g == f]) for f in data.FORMS if f in forms}
    out["groups"] = {g: _measures([r for r, f in zip(results, forms) if f in members])
                     for g, members in GROUPS.items() if any(f in members for f in forms)}
    out["adherence_single"] = out["groups"].get("one_object", {}).get("adherence", 0.0)
    out["adherence_pair"] = out["groups"].get("relation", {}).get("adherence", 0.0)
    return out


def generate_eval_images(pipe, prompts: list[str], seed: int = 0, batch: int = 25, **call_kwargs):
    """Images for ``prompts``; image i always uses the generator seeded ``seed + i``."""
    import torch

    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))]
        images += list(pipe(chunk, generator=gens, output_type="np", **call_kwargs).images)
    return images


def print_table(summary: dict, file=sys.stdout) -> None:
    """Per-form and per-group rows of a :func:`summarise` result, as plain text."""
    cols = ("n", "adherence", "colour", "count", "shape", "position", "judged", "clean", "outline", "roughness",
            "stray_px", "touches_frame")
    print(f"{'':>17} " + " ".join(f"{c:>9}" for c in cols), file=file)
    rows = [("all", summary), *summary["forms"].items(), *((f"[{g}]", v) for g, v in summary["groups"].items())]
    for name, m in rows:
        print(f"{name:>17} " + " ".join(f"{m[c]:>9}" for c in cols), file=file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Prompt adherence of the built-in model on the fixed prompt set.")
    p.add_argument("--weights", default=None, help="checkpoint folder (default: the shipped weights)")
    p.add_argument("-n", type=int, default=400, help="number of prompts (>= 400 for the benchmark)")
    p.add_argument("--forms", default=",".join(data.FORMS), help="comma-separated prompt forms")
    p.add_argument("--prompt-seed", type=int, default=data.EVAL_SEED,
                   help="seed of the prompt set (another than the default: prompts held out from the benchmarks)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the first image's generator")
    p.add_argument("--ground-truth", action="store_true", help="check rendered training images instead")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--device", default="cpu", help="where the model runs (images are judged on the CPU)")
    p.add_argument("--adapter", default=None, help="a shipped style adapter's name or a PEFT folder to draw with")
    p.add_argument("--style", default=None, choices=styles.STYLES, help="with --ground-truth: render in this style")
    a = p.parse_args(argv)
    try:
        items = data.eval_set(a.n, seed=a.prompt_seed, forms=tuple(f.strip() for f in a.forms.split(",") if f.strip()))
    except ValueError as exc:
        p.error(str(exc))
    prompts, scenes = [t for t, _ in items], [s for _, s in items]
    t0 = time.time()
    if a.ground_truth:
        images = [styles.render(s, a.style) for s in scenes]
    else:
        import torch

        from .. import WEIGHTS_DIR
        from ..pipeline import ShapesFluxPipeline

        torch.set_num_threads(a.threads)
        pipe = ShapesFluxPipeline.from_pretrained(a.weights or WEIGHTS_DIR).to(a.device)
        if a.adapter:
            from pathlib import Path

            from clusca.lora import LoraBank, load_lora

            from ..evaluation import ADAPTERS_DIR
            from .lora_train import FLUX_TARGETS

            folder = Path(a.adapter) if Path(a.adapter).is_dir() else ADAPTERS_DIR / a.adapter
            weights = load_lora(folder)
            bank = LoraBank(pipe.transformer, FLUX_TARGETS, slots=1, max_rank=max(16, weights.rank))
            bank.load(1, weights)
            bank.select([[(1, 1.0)]])  # one entry: every image of every call takes it
        images = generate_eval_images(pipe, prompts, seed=a.seed, num_inference_steps=a.steps,
                                      guidance_scale=a.guidance)
    results = [check(img, s) for img, s in zip(images, scenes)]
    summary = summarise(results, scenes)
    summary["styles"] = {st: _pct(shows_style(img, st) for img in images) for st in styles.STYLES}
    summary["seconds"] = round(time.time() - t0, 1)
    summary["prompt_seed"] = a.prompt_seed
    if a.json:
        print(json.dumps(summary))
    else:
        print_table(summary)
        print("showing each style: " + ", ".join(f"{st} {v}%" for st, v in summary["styles"].items()))
        print(f"seconds: {summary['seconds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

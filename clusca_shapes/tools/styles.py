"""Drawing styles of the shipped LoRA adapters: the same scenes and captions, drawn differently.

* ``outline``: every shape drawn as its outline only, in the object's colour, the inside left
  as background; the line is :func:`outline_width` pixels wide (a share of how deep the
  shape's inside reaches, so a small triangle keeps an inside);
* ``pastel``: every object's colour softened towards the background, :data:`PASTEL_OPACITY`
  of the colour over the rest (pastel tints on white, muted ones on grey and black).

A style changes how a scene is drawn, never what it holds, so the captions, the evaluation
prompts and the adherence checker's ground truth stay those of :mod:`clusca_shapes.tools.data`.
The checker tells each style apart in an image (``checker.shows_style``).
"""

from __future__ import annotations

import numpy as np

from . import data

STYLES = ("outline", "pastel")
# Share of an object's colour in a pastel drawing. The checker reads a pixel as an object's
# when it is at least half that colour, so 0.65 keeps the object's whole area readable.
PASTEL_OPACITY = 0.65
# Outline line width: OUTLINE_SHARE of the shape's inradius (how deep its inside reaches: the
# radius for a circle or a square, INRADIUS["triangle"] of it for the triangle), within these
# bounds in pixels. A thick line is an unbroken ring the model can draw on its 4-px patches;
# the small triangles of a trio are held at the lower bound, 2.0 px: at 1.6 px (which keeps a
# rendered diagonal 4-connected) the model drew their rings too thin, and they broke into
# pieces. 2.0 px still leaves every shape an inside the adherence checker sees.
OUTLINE_SHARE = 0.45
OUTLINE_WIDTH = (2.0, 3.2)
INRADIUS = {"circle": 1.0, "square": 1.0, "triangle": (np.sqrt(5) - 1) / 2}


def outline_width(radius: float, shape: str = "circle") -> float:
    return float(np.clip(OUTLINE_SHARE * INRADIUS[shape] * radius, *OUTLINE_WIDTH))


def _inside_depth(obj: data.SceneObject, size: int, supersample: int) -> np.ndarray:
    """How far inside ``obj`` each sub-pixel lies, in pixels (negative outside)."""
    n = size * supersample
    c = (np.arange(n) + 0.5) / supersample
    dx, dy, r = c[None, :] - obj.x, c[:, None] - obj.y, obj.radius
    if obj.shape == "circle":
        return r - np.sqrt(dx * dx + dy * dy)
    if obj.shape == "square":
        return r - np.maximum(np.abs(dx), np.abs(dy))
    if obj.shape == "triangle":
        # Apex up, base at the bottom of the box (as data.render draws it): the base line and
        # the two slanted sides, whose normal has length sqrt(1 + 1/4) per unit of (dy + r) / 2.
        return np.minimum(r - dy, ((dy + r) / 2 - np.abs(dx)) / np.sqrt(1.25))
    raise ValueError(f"unknown shape {obj.shape!r}")


def coverage(obj: data.SceneObject, style: str | None, size: int = data.IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel that ``obj`` covers in ``style`` (None: filled, as the base data)."""
    depth = _inside_depth(obj, size, supersample)
    inside = depth >= 0
    if style == "outline":
        inside &= depth <= outline_width(obj.radius, obj.shape)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(scene: data.Scene, style: str | None, size: int = data.IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """Draw ``scene`` in ``style`` as an (H, W, 3) float32 array in [0, 1]; None draws it as
    :func:`data.render` does."""
    if style is None:
        return data.render(scene, size, supersample)
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; the styles are {', '.join(STYLES)}")
    opacity = PASTEL_OPACITY if style == "pastel" else 1.0
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.asarray(data.BACKGROUNDS[scene.background], dtype=np.float32) / 255.0
    for obj in scene.objects:
        a = coverage(obj, style, size, supersample)[..., None].astype(np.float32) * opacity
        col = np.asarray(data.COLOURS[obj.colour], dtype=np.float32) / 255.0
        img = img * (1 - a) + col * a
    return img


def make_batch(rng: np.random.Generator, n: int, style: str | None, **scene_kwargs
               ) -> tuple[np.ndarray, list[str], list[data.Scene]]:
    """As :func:`data.make_batch`, the scenes drawn in ``style``: the same draws from ``rng``,
    so a seed gives the same scenes and captions in every style."""
    scenes = [data.sample_scene(rng, **scene_kwargs) for _ in range(n)]
    captions = [data.caption(s, rng) for s in scenes]
    images = np.stack([render(s, style) for s in scenes]).astype(np.float32)
    return images, captions, scenes

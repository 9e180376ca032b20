"""Procedural captioned scenes for the built-in model.

Every image is drawn from a :class:`Scene` (one or two flat-coloured shapes on a plain
background) and every caption is generated from the same scene, so the structured scene
doubles as the ground truth the adherence checker compares against. All randomness comes
from a caller-supplied ``numpy.random.Generator``: the same seed gives the same data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..words import split_words

IMAGE_SIZE = 32

# Saturated, well separated colours: the checker classifies pixels by nearest palette
# entry, so the palette must stay far apart in RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 225),
    "yellow": (240, 220, 30),
    "purple": (145, 40, 185),
    "orange": (250, 135, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("above", "below", "left of", "right of")

# Pixel-space anchor (x, y) of each single-object position.
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (9.5, 16.0),
    "right": (22.5, 16.0),
    "top": (16.0, 9.5),
    "bottom": (16.0, 22.5),
    "centre": (16.0, 16.0),
}
SINGLE_RADIUS = (7.0, 8.5)
PAIR_RADIUS = (5.0, 6.0)
JITTER = 1.5

SHAPE_WORDS = {
    "circle": ("circle", "circle", "disc", "round dot"),
    "square": ("square", "square", "box", "block"),
    "triangle": ("triangle", "triangle", "triangle"),
}
COLOUR_WORDS = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
}
BACKGROUND_WORDS = {"white": ("white",), "black": ("black", "dark"), "gray": ("gray", "grey")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side", "to the left"),
    "right": ("on the right", "at the right", "on the right side", "to the right"),
    "top": ("at the top", "near the top", "on the top side", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "on the bottom side", "in the lower part"),
    "centre": ("in the centre", "in the center", "in the middle", "at the centre"),
}
RELATION_PHRASES = {
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
# Words that occur only in wrapper templates; listed so the vocabulary is complete.
FILLER_WORDS = (
    "a an the there is one picture of image with background and it on in at shown drawn "
    "plain single"
).split()


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image: what the caption asks for and where it was drawn."""

    background: str
    objects: tuple[SceneObject, ...]
    position: str | None = None  # single object: requested position, None = unspecified
    relation: str | None = None  # two objects: objects[0] <relation> objects[1]
    mention_background: bool = False
    extras: dict = field(default_factory=dict, compare=False)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def sample_scene(
    rng: np.random.Generator,
    pair_fraction: float = 0.25,
    unplaced_fraction: float = 0.1,
) -> Scene:
    """Draw a random scene; most are single objects because they teach shape fastest."""
    background = _pick(rng, tuple(BACKGROUNDS))
    mention_bg = bool(rng.random() < 0.4)
    if rng.random() >= pair_fraction:
        shape, colour = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS))
        position = _pick(rng, POSITIONS)
        ax, ay = ANCHORS[position]
        radius = float(rng.uniform(*SINGLE_RADIUS))
        obj = SceneObject(shape, colour, ax + rng.uniform(-JITTER, JITTER),
                          ay + rng.uniform(-JITTER, JITTER), radius)
        said = None if rng.random() < unplaced_fraction else position
        return Scene(background, (obj,), position=said, mention_background=mention_bg,
                     extras={"drawn_position": position})
    relation = _pick(rng, RELATIONS)
    c1, c2 = rng.choice(len(COLOURS), size=2, replace=False)
    colours = tuple(COLOURS)
    s1, s2 = _pick(rng, SHAPES), _pick(rng, SHAPES)
    off = 7.0
    jx, jy = rng.uniform(-JITTER, JITTER, size=2)
    if relation in ("above", "below"):
        first, second = (16 + jx, 16 - off + jy), (16 + jx, 16 + off + jy)
    else:
        first, second = (16 - off + jx, 16 + jy), (16 + off + jx, 16 + jy)
    if relation in ("below", "right of"):
        first, second = second, first
    r1, r2 = rng.uniform(*PAIR_RADIUS, size=2)
    objs = (
        SceneObject(s1, colours[c1], first[0], first[1], float(r1)),
        SceneObject(s2, colours[c2], second[0], second[1], float(r2)),
    )
    return Scene(background, objs, relation=relation, mention_background=mention_bg)


def _noun(rng: np.random.Generator, obj: SceneObject) -> str:
    return f"{_pick(rng, COLOUR_WORDS[obj.colour])} {_pick(rng, SHAPE_WORDS[obj.shape])}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Plain-English caption of ``scene`` with randomly chosen wording."""
    if scene.relation is None:
        obj = scene.objects[0]
        noun = _noun(rng, obj)
        if scene.position is None:
            text = _pick(rng, (f"a {noun}", f"one {noun}", f"a picture of a {noun}"))
        else:
            where = _pick(rng, POSITION_PHRASES[scene.position])
            text = _pick(rng, (
                f"a {noun} {where}",
                f"a {noun} {where}",
                f"there is a {noun} {where}",
                f"{where} a {noun}",
                f"an image of a {noun} {where}",
            ))
    else:
        rel = _pick(rng, RELATION_PHRASES[scene.relation])
        text = _pick(rng, (
            f"a {_noun(rng, scene.objects[0])} {rel} a {_noun(rng, scene.objects[1])}",
            f"the {_noun(rng, scene.objects[0])} is {rel} the {_noun(rng, scene.objects[1])}",
        ))
    if scene.mention_background:
        bg = _pick(rng, BACKGROUND_WORDS[scene.background])
        text += _pick(rng, (f" on a {bg} background", f", {bg} background",
                            f" with a {bg} background"))
    return _ARTICLE.sub("an ", text)


_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def _coverage(obj: SceneObject, size: int, supersample: int) -> np.ndarray:
    """Fraction of each pixel covered by ``obj`` (anti-aliased by supersampling)."""
    n = size * supersample
    c = (np.arange(n) + 0.5) / supersample
    xs, ys = c[None, :], c[:, None]
    dx, dy, r = xs - obj.x, ys - obj.y, obj.radius
    if obj.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif obj.shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif obj.shape == "triangle":
        # Apex up, base at the bottom of the box: width grows linearly with depth.
        depth = (dy + r) / (2 * r)
        inside = (depth >= 0) & (depth <= 1) & (np.abs(dx) <= r * depth)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(scene: Scene, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """Draw ``scene`` as an (H, W, 3) float32 array in [0, 1]."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32) / 255.0
    for obj in scene.objects:
        a = _coverage(obj, size, supersample)[..., None].astype(np.float32)
        col = np.asarray(COLOURS[obj.colour], dtype=np.float32) / 255.0
        img = img * (1 - a) + col * a
    return img


def make_batch(rng: np.random.Generator, n: int, **scene_kwargs) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` rendered scenes as (n, H, W, 3) floats in [0, 1] with captions."""
    scenes = [sample_scene(rng, **scene_kwargs) for _ in range(n)]
    captions = [caption(s, rng) for s in scenes]
    images = np.stack([render(s) for s in scenes]).astype(np.float32)
    return images, captions, scenes


def eval_set(n: int = 200, seed: int = 20251126, pair_fraction: float = 0.2) -> list[tuple[str, Scene]]:
    """Fixed benchmark prompts: every prompt names colour, shape and position."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, pair_fraction=pair_fraction, unplaced_fraction=0.0)
        out.append((caption(scene, rng), scene))
    return out


def vocabulary() -> list[str]:
    """Every word a generated caption can contain, sorted."""
    words: set[str] = set(FILLER_WORDS)
    groups = (SHAPE_WORDS, COLOUR_WORDS, BACKGROUND_WORDS, POSITION_PHRASES, RELATION_PHRASES)
    for group in groups:
        for phrases in group.values():
            for phrase in phrases:
                words.update(split_words(phrase))
    return sorted(words)

"""Procedural captioned scenes for the built-in model.

Every image is drawn from a :class:`Scene` (one to three flat-coloured shapes on a plain
background) and every caption is generated from the same scene, so the structured scene
doubles as the ground truth the adherence checker compares against. All randomness comes
from a caller-supplied ``numpy.random.Generator``: the same seed gives the same data.

A scene has one of these forms (:func:`form_of`), the ways people ask for a picture:

* ``one_placed``: one object at a named position ("a red circle on the left");
* ``one_unplaced``: one object, no position ("a green triangle"), drawn near the centre;
* ``one_black_white``: one black or white object, with or without a position (black and
  white objects appear in every form during training; the evaluation set asks for them
  in this form);
* ``relation``: two objects of different colours in a relation ("a red circle above a
  blue square");
* ``two_of_a_kind`` / ``three_of_a_kind``: a count of one colour and shape
  ("two blue squares", "three red circles").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..words import PLURALS, split_words

IMAGE_SIZE = 32

# Saturated, well separated colours: the checker classifies pixels by nearest palette
# entry, so the palette must stay far apart in RGB.
CHROMATIC: dict[str, tuple[int, int, int]] = {
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
# Black and white objects are the background colours of the same name, so an object is
# never drawn on a background of its own colour (see allowed_colours).
MONO = ("black", "white")
COLOURS: dict[str, tuple[int, int, int]] = {**CHROMATIC, **{m: BACKGROUNDS[m] for m in MONO}}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("above", "below", "left of", "right of")
COUNTS = {2: "two", 3: "three"}
FORMS = ("one_placed", "one_unplaced", "one_black_white", "relation", "two_of_a_kind", "three_of_a_kind")

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
TRIO_RADIUS = (4.6, 5.2)
JITTER = 1.5
UNPLACED_JITTER = 3.0
# Every object keeps this many pixels of background between itself and the frame, so a
# shape touching the frame is always a drawing fault (the checker's edge measure).
MARGIN = 1.0

SHAPE_WORDS = {
    "circle": ("circle", "circle", "disc", "round dot"),
    "square": ("square", "square", "box", "block"),
    "triangle": ("triangle", "triangle", "triangle"),
}
PLURAL_OF = {singular: plural for plural, singular in PLURALS.items()}
COLOUR_WORDS = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "black": ("black",),
    "white": ("white",),
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
    "a an the there is are one picture of image with background and it on in at shown drawn "
    "plain single"
).split() + list(COUNTS.values())


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image: what the caption asks for and where it was drawn.

    Two or three objects without a relation are a count: all of one colour and shape.
    """

    background: str
    objects: tuple[SceneObject, ...]
    position: str | None = None  # single object: requested position, None = unspecified
    relation: str | None = None  # two objects: objects[0] <relation> objects[1]
    mention_background: bool = False
    extras: dict = field(default_factory=dict, compare=False)

    @property
    def form(self) -> str:
        return form_of(self)


def form_of(scene: Scene) -> str:
    """Which of :data:`FORMS` the caption of ``scene`` is."""
    if scene.relation is not None:
        return "relation"
    if len(scene.objects) > 1:
        return {2: "two_of_a_kind", 3: "three_of_a_kind"}[len(scene.objects)]
    if scene.objects[0].colour in MONO:
        return "one_black_white"
    return "one_placed" if scene.position is not None else "one_unplaced"


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def allowed_colours(background: str, mono: bool = True) -> tuple[str, ...]:
    """Object colours that stand out from ``background`` (black and white only if ``mono``)."""
    return tuple(c for c in COLOURS if c != background and (mono or c not in MONO))


def _inside(v: float, r: float) -> float:
    """Clamp a centre coordinate so the object keeps MARGIN pixels from the frame."""
    return float(np.clip(v, MARGIN + r, IMAGE_SIZE - MARGIN - r))


def _single(rng, background, colour, shape, position, said) -> Scene:
    if position is None:
        ax, ay, jit = 16.0, 16.0, UNPLACED_JITTER
    else:
        (ax, ay), jit = ANCHORS[position], JITTER
    radius = float(rng.uniform(*SINGLE_RADIUS))
    x, y = ax + rng.uniform(-jit, jit), ay + rng.uniform(-jit, jit)
    obj = SceneObject(shape, colour, _inside(x, radius), _inside(y, radius), radius)
    return Scene(background, (obj,), position=said,
                 extras={"drawn_position": position or "centre"})


def _pair_centres(rng, vertical: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres 14 px apart, first above (vertical) or left of the second."""
    off = 7.0
    jx, jy = (float(v) for v in rng.uniform(-JITTER, JITTER, size=2))
    if vertical:
        return (16 + jx, 16 - off + jy), (16 + jx, 16 + off + jy)
    return (16 - off + jx, 16 + jy), (16 + off + jx, 16 + jy)


def _relation(rng, background, mono) -> Scene:
    relation = _pick(rng, RELATIONS)
    pool = allowed_colours(background, mono)
    c1, c2 = rng.choice(len(pool), size=2, replace=False)
    s1, s2 = _pick(rng, SHAPES), _pick(rng, SHAPES)
    first, second = _pair_centres(rng, relation in ("above", "below"))
    if relation in ("below", "right of"):
        first, second = second, first
    r1, r2 = rng.uniform(*PAIR_RADIUS, size=2)
    objs = (
        SceneObject(s1, pool[c1], first[0], first[1], float(r1)),
        SceneObject(s2, pool[c2], second[0], second[1], float(r2)),
    )
    return Scene(background, objs, relation=relation)


def _count(rng, background, colour, shape, n: int) -> Scene:
    """``n`` objects of one colour and shape, apart from each other (the checker counts blobs).

    Each count has one layout: two side by side, three in a triangle with its apex up. With
    the layout left to chance (pairs either way, trios either way up) a small model blends
    the choices and draws four blobs for three, or two merged ones. The draws that once chose
    the layout are still made, so the fixed prompt set stays the same prompts.
    """
    if n == 2:
        rng.random()
        a, b = _pair_centres(rng, False)
        radii = rng.uniform(*PAIR_RADIUS, size=2)
        centres, layout = [a, b], "pair"
    else:
        # Three in a row would have to be too small to tell a circle from a square at 32 px.
        _pick(rng, ("apex up", "apex down"))
        layout = "apex up"
        j = rng.uniform(-1.0, 1.0, size=2)
        top, bottom = 9.5, 22.5
        centres = [(16 + j[0], top + j[1]), (9.5 + j[0], bottom + j[1]), (22.5 + j[0], bottom + j[1])]
        radii = rng.uniform(*TRIO_RADIUS, size=3)
    objs = tuple(SceneObject(shape, colour, _inside(x, float(r)), _inside(y, float(r)), float(r))
                 for (x, y), r in zip(centres, radii))
    return Scene(background, objs, extras={"layout": layout})


def sample_scene(
    rng: np.random.Generator,
    pair_fraction: float = 0.3,
    unplaced_fraction: float = 0.3,
    count_fraction: float = 0.2,
    mono: bool = True,
) -> Scene:
    """Draw a random scene of any form.

    ``pair_fraction`` and ``count_fraction`` are the shares of two-object relations and
    of counts (two or three alike); the rest are single objects, ``unplaced_fraction`` of
    them captioned without a position. ``mono=False`` leaves out black and white objects.
    """
    background = _pick(rng, tuple(BACKGROUNDS))
    mention_bg = bool(rng.random() < 0.4)
    u = rng.random()
    if u < pair_fraction:
        scene = _relation(rng, background, mono)
    elif u < pair_fraction + count_fraction:
        colour = _pick(rng, allowed_colours(background, mono))
        scene = _count(rng, background, colour, _pick(rng, SHAPES), int(_pick(rng, (2, 3))))
    else:
        colour = _pick(rng, allowed_colours(background, mono))
        shape = _pick(rng, SHAPES)
        if rng.random() < unplaced_fraction:
            scene = _single(rng, background, colour, shape, None, None)
        else:
            position = _pick(rng, POSITIONS)
            scene = _single(rng, background, colour, shape, position, position)
    return Scene(scene.background, scene.objects, scene.position, scene.relation, mention_bg, scene.extras)


def sample_form(rng: np.random.Generator, form: str) -> Scene:
    """A random scene of one given form (black and white objects only in ``one_black_white``)."""
    background = _pick(rng, tuple(BACKGROUNDS))
    mention_bg = bool(rng.random() < 0.4)
    shape = _pick(rng, SHAPES)
    if form == "relation":
        scene = _relation(rng, background, False)
    elif form in ("two_of_a_kind", "three_of_a_kind"):
        n = 2 if form == "two_of_a_kind" else 3
        scene = _count(rng, background, _pick(rng, tuple(CHROMATIC)), shape, n)
    elif form == "one_black_white":
        colour = _pick(rng, tuple(c for c in MONO if c != background))
        position = _pick(rng, POSITIONS) if rng.random() < 0.5 else None
        scene = _single(rng, background, colour, shape, position, position)
    elif form in ("one_placed", "one_unplaced"):
        position = _pick(rng, POSITIONS) if form == "one_placed" else None
        scene = _single(rng, background, _pick(rng, tuple(CHROMATIC)), shape, position, position)
    else:
        raise ValueError(f"unknown form {form!r}; the forms are {', '.join(FORMS)}")
    return Scene(scene.background, scene.objects, scene.position, scene.relation, mention_bg, scene.extras)


def _noun(rng: np.random.Generator, obj: SceneObject) -> str:
    return f"{_pick(rng, COLOUR_WORDS[obj.colour])} {_pick(rng, SHAPE_WORDS[obj.shape])}"


def _plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    return f"{head} {PLURAL_OF[last]}".strip()


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Plain-English caption of ``scene`` with randomly chosen wording."""
    form = form_of(scene)
    if form in ("two_of_a_kind", "three_of_a_kind"):
        many = f"{COUNTS[len(scene.objects)]} {_plural(_noun(rng, scene.objects[0]))}"
        text = _pick(rng, (many, many, f"there are {many}", f"a picture of {many}", f"an image with {many}"))
    elif form == "relation":
        rel = _pick(rng, RELATION_PHRASES[scene.relation])
        text = _pick(rng, (
            f"a {_noun(rng, scene.objects[0])} {rel} a {_noun(rng, scene.objects[1])}",
            f"the {_noun(rng, scene.objects[0])} is {rel} the {_noun(rng, scene.objects[1])}",
        ))
    else:
        noun = _noun(rng, scene.objects[0])
        if scene.position is None:
            text = _pick(rng, (f"a {noun}", f"a {noun}", f"one {noun}", f"a picture of a {noun}",
                               f"there is a {noun}"))
        else:
            where = _pick(rng, POSITION_PHRASES[scene.position])
            text = _pick(rng, (
                f"a {noun} {where}",
                f"a {noun} {where}",
                f"there is a {noun} {where}",
                f"{where} a {noun}",
                f"an image of a {noun} {where}",
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


EVAL_SEED = 20261201
# Share of each form in the evaluation set: two objects (the hard part) get the most.
EVAL_WEIGHTS = {"one_placed": 5, "one_unplaced": 4, "one_black_white": 3, "relation": 7,
                "two_of_a_kind": 3, "three_of_a_kind": 3}


def eval_set(n: int = 400, seed: int = EVAL_SEED, forms: tuple[str, ...] = FORMS) -> list[tuple[str, Scene]]:
    """Fixed benchmark prompts over ``forms``, in proportion to :data:`EVAL_WEIGHTS`.

    Each form's items come from a generator of their own and the forms are interleaved:
    a small ``n`` still covers every form, the first items of a form are the same for any
    ``n``, and ``eval_set(n, forms=("relation",))`` is a relation-only set.
    """
    unknown = set(forms) - set(FORMS)
    if unknown:
        raise ValueError(f"unknown forms {sorted(unknown)}; the forms are {', '.join(FORMS)}")
    weights = np.array([EVAL_WEIGHTS[f] for f in forms], dtype=float)
    quota = np.floor(n * weights / weights.sum()).astype(int)
    for k in np.argsort(-weights, kind="stable")[: n - int(quota.sum())]:
        quota[k] += 1
    keyed = []
    for f, q in zip(forms, quota):
        rng = np.random.default_rng([seed, FORMS.index(f)])
        for i in range(int(q)):
            scene = sample_form(rng, f)
            keyed.append(((i + 0.5) / q, FORMS.index(f), caption(scene, rng), scene))
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [(text, scene) for _, _, text, scene in keyed]


def _phrases(table: dict[str, tuple[str, ...]]) -> list[tuple[tuple[str, ...], str]]:
    """(words, key) of every phrase in ``table``, longest first so "to the left of" wins over "left of"."""
    out = [(tuple(split_words(ph)), key) for key, phrases in table.items() for ph in phrases]
    return sorted(set(out), key=lambda t: -len(t[0]))


def _find(words: list[str], phrases) -> tuple[int, int, str] | None:
    """First (start, end, key) of any of ``phrases`` in ``words``."""
    hits = [(i, i + len(ph), key) for ph, key in phrases for i in range(len(words) - len(ph) + 1)
            if tuple(words[i:i + len(ph)]) == ph]
    return min(hits, key=lambda h: (h[0], -(h[1] - h[0]))) if hits else None


def parse_prompt(text: str) -> Scene | None:
    """The scene a prompt of the caption grammar asks for, or None outside it.

    Geometry is nominal (the anchors): the checker judges colours, count, shapes, the
    position and the relation, never the exact placement. A background not named is
    taken as white; the checker finds the one drawn anyway.
    """
    words = split_words(text)
    background, mention = "white", False
    if "background" in words:
        k = words.index("background")
        bg = {w: b for b, ws in BACKGROUND_WORDS.items() for w in ws}.get(words[k - 1] if k else "")
        if bg is None:
            return None
        background, mention = bg, True
        words = words[:k - 1]
    colour_of = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}
    shapes = _phrases(SHAPE_WORDS)
    nouns = []  # (start, end, colour, shape)
    i = 0
    while i < len(words):
        hit = _find(words[i + 1:i + 3], shapes) if words[i] in colour_of else None
        if hit and hit[0] == 0:
            nouns.append((i, i + 1 + hit[1], colour_of[words[i]], hit[2]))
            i += 1 + hit[1]
        else:
            i += 1
    if not nouns or len(nouns) > 2:
        return None
    count = {w: n for n, w in COUNTS.items()}.get(words[nouns[0][0] - 1]) if nouns[0][0] else None
    if len(nouns) == 2:
        between = words[nouns[0][1]:nouns[1][0]]
        between = between[1:] if between[:1] == ["is"] else between
        between = between[:-1] if between[-1:] in (["a"], ["an"], ["the"]) else between
        hit = _find(between, _phrases(RELATION_PHRASES))
        if count or hit is None or hit[1] - hit[0] != len(between) or nouns[0][2] == nouns[1][2]:
            return None
        objs = tuple(SceneObject(sh, c, x, y, PAIR_RADIUS[1])
                     for (_, _, c, sh), (x, y) in zip(nouns, ((16.0, 9.0), (16.0, 23.0))))
        return Scene(background, objs, relation=hit[2], mention_background=mention)
    _, end, colour, shape = nouns[0]
    if count:
        objs = tuple(SceneObject(shape, colour, 9.0 + 14.0 * (k % 2), 9.0 + 14.0 * (k // 2), 4.5)
                     for k in range(count))
        return Scene(background, objs, mention_background=mention)
    rest = words[:nouns[0][0]] + words[end:]
    hit = _find(rest, _phrases(POSITION_PHRASES))
    position = hit[2] if hit else None
    x, y = ANCHORS[position or "centre"]
    return Scene(background, (SceneObject(shape, colour, x, y, SINGLE_RADIUS[0]),), position=position,
                 mention_background=mention)


def vocabulary() -> list[str]:
    """Every word a generated caption can contain, sorted."""
    words: set[str] = set(FILLER_WORDS)
    groups = (SHAPE_WORDS, COLOUR_WORDS, BACKGROUND_WORDS, POSITION_PHRASES, RELATION_PHRASES)
    for group in groups:
        for phrases in group.values():
            for phrase in phrases:
                words.update(split_words(phrase))
    return sorted(words)

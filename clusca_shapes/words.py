"""Word splitting of prompts, shared by the runtime tokenizer and the offline data tools.

It lives on the runtime side, torch-free, so the pipeline does not depend on the data
generator and the data generator does not import torch.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W\d_]+")

# Plural shape nouns read as their singular: the number word ("two", "three") carries
# the count, and a checkpoint whose vocabulary predates plurals still sees the shape.
PLURALS = {
    "circles": "circle",
    "discs": "disc",
    "dots": "dot",
    "squares": "square",
    "boxes": "box",
    "blocks": "block",
    "triangles": "triangle",
}


def split_words(text: str) -> list[str]:
    """Lower-case words of letters (any script), plural shape nouns made singular;
    punctuation, digits and symbols are dropped."""
    return [PLURALS.get(w, w) for w in _WORD.findall(text.lower())]

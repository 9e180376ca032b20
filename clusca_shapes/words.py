"""Word splitting of prompts, shared by the runtime tokenizer and the offline data tools.

It lives on the runtime side, torch-free, so the pipeline does not depend on the data
generator and the data generator does not import torch.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W\d_]+")


def split_words(text: str) -> list[str]:
    """Lower-case words of letters (any script); punctuation, digits and symbols are dropped."""
    return _WORD.findall(text.lower())

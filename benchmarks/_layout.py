"""The shape of docs/benchmarks.md: its blocks, their order by topic, and the links between them.

The doc is a title and intro, a summary block, a contents block, then one heading per topic
(``<!-- topic:KEY -->`` above it), each followed by the sections of its benchmarks (the
``<!-- NAME:start -->`` ... ``<!-- NAME:end -->`` blocks that ``write_docs`` writes). Text
after a block, up to the next one, is hand-written and stays with the block before it: a
section's notes move with their section, a topic's intro with its heading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SUMMARY = ("<!-- summary:start -->", "<!-- summary:end -->")
CONTENTS = ("<!-- contents:start -->", "<!-- contents:end -->")
TOPIC_MARK = "<!-- topic:{} -->"
_BLOCK = re.compile(r"<!-- topic:(?P<topic>[\w-]+) -->|<!-- (?P<name>.+?):start -->")
_FENCE = re.compile(r"^(```|~~~)")


@dataclass
class Block:
    """One managed block of the doc and the hand-written text after it."""

    kind: str  # "summary", "contents", "topic" or "section"
    key: str  # the topic's key, the section's marker name; "" otherwise
    text: str  # the block itself, markers included (a topic's: its marker and heading)
    after: str = ""  # hand-written text up to the next block


def parse(text: str) -> tuple[str, list[Block]]:
    """The doc's head (title and intro, before any block) and its blocks in order."""
    blocks: list[Block] = []
    pos, head = 0, None
    while True:
        m = _BLOCK.search(text, pos)
        if m is None:
            break
        gap = text[pos:m.start()]
        if head is None:
            head = gap
        else:
            blocks[-1].after += gap
        if m.group("topic"):
            line_end = text.find("\n", m.end() + 1)
            line_end = len(text) if line_end < 0 else line_end
            heading = text[m.end():line_end].strip("\n")
            if not heading.startswith("# "):
                line_end = m.end()
            blocks.append(Block("topic", m.group("topic"), text[m.start():line_end]))
            pos = line_end
            continue
        name = m.group("name")
        end = f"<!-- {name}:end -->"
        stop = text.find(end, m.end())
        if stop < 0:
            raise ValueError(f"docs: {m.group(0)} has no {end}")
        kind = {"summary": "summary", "contents": "contents"}.get(name, "section")
        blocks.append(Block(kind, "" if kind != "section" else name, text[m.start():stop + len(end)]))
        pos = stop + len(end)
    if head is None:
        return text, []
    if blocks:
        blocks[-1].after += text[pos:]
    return head, blocks


def join(*parts: str) -> str:
    """Parts of the doc, one blank line between them, the file ending in one newline."""
    return "\n\n".join(p.strip("\n") for p in parts if p.strip()) + "\n"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading's text (before de-duplication)."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


class Anchors:
    """Anchors of headings in reading order, numbered as GitHub numbers repeated ones."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def add(self, heading: str) -> str:
        base = slug(heading)
        n = self.seen.get(base, 0)
        self.seen[base] = n + 1
        return base if n == 0 else f"{base}-{n}"

    def headings(self, text: str) -> list[tuple[int, str, str]]:
        """(level, text, anchor) of every heading in ``text``, code blocks left out."""
        out, fenced = [], False
        for line in text.splitlines():
            if _FENCE.match(line):
                fenced = not fenced
            elif not fenced and (m := re.match(r"^(#{1,6}) +(.+?) *#*$", line)):
                out.append((len(m.group(1)), m.group(2), self.add(m.group(2))))
        return out


def headings_of(text: str) -> list[tuple[int, str, str]]:
    """(level, text, anchor) of every heading of a whole doc."""
    return Anchors().headings(text)

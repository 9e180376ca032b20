"""Shared writer for docs/benchmarks.md: each benchmark owns one marked section."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(start: str, end: str, body: str, path: Path = DOCS) -> None:
    """Replace the text between ``start`` and ``end`` (markers included in ``body``), or append it.

    ``body`` must begin with ``start`` and end with ``end`` so the section can be found again.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    body = body.rstrip("\n")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)

"""Shared writer for docs/benchmarks.md: each benchmark owns one marked section."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(start: str, end: str, body: str, path: Path = DOCS) -> None:
    """Replace the text between ``start`` and ``end`` (markers included in ``body``), or append it.

    ``body`` must begin with ``start`` and end with ``end`` so the section can be found again.
    ``benchmarks/report.py`` moves an appended section under its topic.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    body = body.rstrip("\n")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)
    print(f"wrote {path.name}")


def written_by(script: str, argv: str, date: str) -> str:
    """How a section names the run behind it: the command as typed and when it ran."""
    command = " ".join([f"python benchmarks/{script}", argv]).strip()
    return f"Written by `{command}` on {date}"


def targets_line(targets: Iterable[tuple[str, bool]]) -> str:
    """The targets and whether each was met, as one line of a section."""
    return "Targets: " + "; ".join(f"{name}: {'met' if ok else 'not met'}" for name, ok in targets)


def print_targets(targets: Iterable[tuple[str, bool]]) -> None:
    for name, ok in targets:
        print(f"target {name}: {'met' if ok else 'NOT met'}")

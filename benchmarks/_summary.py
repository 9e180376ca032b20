"""The headline figures of a run, as rows of the summary table at the top of docs/benchmarks.md.

A benchmark's ``headline(results)`` returns its rows: each says what was measured, the
figure, and the machine and date of the run, all read from the results dict, so the
summary is as old as the runs behind it and says so. A results file that lacks its date or
machine, or that was measured before a change that moves it, carries a ``stale`` note
(top level), shown under the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Headline:
    """One row of the summary: ``what`` was measured, its ``figure``, ``on`` what machine, ``date`` (a day)."""

    what: str
    figure: str
    on: str
    date: str


def day(stamp: str | None) -> str:
    """The day of a results file's ``YYYY-MM-DD HH:MM UTC`` stamp (``?`` when none was saved)."""
    return stamp.split(" ", 1)[0] if stamp else "?"


def cpu(arch: str, cores: int | None = None, load: float | None = None) -> str:
    """A CPU machine as the summary names it: with the 1-minute load average when the run began, if saved.

    ``arch`` may be a results file's device string, ``cpu (x86_64)``."""
    if arch.startswith("cpu (") and arch.endswith(")"):
        arch = arch[5:-1]
    return f"CPU {arch}" + (f", {cores} cores" if cores else "") + (f", load {load:.1f}" if load is not None else "")


def stale_note(res: dict[str, Any]) -> str | None:
    """What the results file itself says the reader should know about its age or origin."""
    return res.get("stale")


def table(rows: list[tuple[Headline, str, str | None]]) -> list[str]:
    """The summary's lines: each row is (headline, anchor of its section, its file's stale note)."""
    notes: list[str] = []
    lines = ["Headline figures of the sections below, each read from its results file in `benchmarks/results/` "
             "and linked to its section, beside the machine and the day it was measured on.", "",
             "| what | figure | measured on | date |", "|---|---|---|---|"]
    for h, anchor, note in rows:
        mark = ""
        if note:
            if note not in notes:
                notes.append(note)
            mark = f" ({notes.index(note) + 1})"
        lines.append(f"| [{h.what}](#{anchor}) | {h.figure} | {h.on} | {h.date}{mark} |")
    for i, note in enumerate(notes, 1):
        lines += ["", f"({i}) {note[0].upper()}{note[1:]}."]
    return lines

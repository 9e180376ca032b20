"""Render docs/benchmarks.md from saved raw results, measuring nothing.

    python benchmarks/report.py                       # every file in benchmarks/results/
    python benchmarks/report.py benchmarks/results/load.json

The doc is a report: a summary table of the headline figures, a contents list, then the
sections grouped by topic (``TOPICS`` below). All of it comes from the results files, so a
number that moves in a results file moves in its section and in the summary alike:

* A results file is named ``<benchmark>[-<label>].json``; ``benchmarks/<benchmark>.py``
  measured it and renders it with its ``write_docs(results, path)`` (one marked section, or
  one per label). The sections of the files given are rendered again; the others are kept.
* The same module's ``headline(results)`` gives the file's rows of the summary: a list of
  ``benchmarks._summary.Headline`` (what, figure, machine, day), read from ``results`` alone.
* Its ``TOPIC`` names the group its sections go under: a key of ``TOPICS``.

Adding a benchmark, say ``benchmarks/probe_sweep.py`` with ``benchmarks/results/probe_sweep.json``,
is writing those three (``write_docs``, ``headline``, ``TOPIC``): this script then puts its
section under its topic, its rows into the summary and its heading into the contents. Name
it in its topic's entry of ``TOPICS`` to place it among the others there (unnamed, it comes
after them). A results file that lacks its date or machine, or predates a change that moves
its figures, can carry a top-level ``"stale"`` note; the summary shows it under the table.

Hand-written text after a section (up to the next section or topic heading) is that
section's notes and moves with it; text after a topic heading is the topic's intro.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _layout, _summary  # noqa: E402
from benchmarks._docs import DOCS  # noqa: E402
from benchmarks._results import RESULTS, load  # noqa: E402

# Topic key: its heading, and the benchmarks whose sections it holds, in this order.
TOPICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "library": ("Library", ("speed_flux", "cache_compare", "cached_step", "guard_sweep", "context_parallel")),
    "builtin": ("Built-in model", ("builtin_model", "tune_builtin", "thread_default", "edit_set", "adapters")),
    "service": ("Service", ("service_overhead", "queue_throughput", "load", "queue_cpu", "cancel_latency", "lanes_latency",
                         "adapters_service")),
    "video": ("Video", ("video_transformer", "video_caches")),
    "gpu": ("GPU", ("gpu_flux",)),
    "reliability": ("Reliability", ()),
}
OTHER = ("other", "Other results")  # sections no results file renders


def benchmark_of(path: Path) -> str:
    """The benchmark a results file belongs to, from its name."""
    return path.stem.split("-", 1)[0]


def module_for(path: Path) -> ModuleType:
    """The benchmark module that measured ``path``, checked for what this report needs of it."""
    name = benchmark_of(path)
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        raise SystemExit(f"{path.name}: no benchmark named {name!r} (benchmarks/{name}.py)") from exc
    for attr, why in (("write_docs", "renders no report from results"), ("headline", "gives no summary rows"),
                      ("TOPIC", "names no topic")):
        if getattr(module, attr, None) is None:
            raise SystemExit(f"{path.name}: benchmarks/{name}.py {why} (no {attr})")
    if module.TOPIC not in TOPICS:
        raise SystemExit(f"{path.name}: benchmarks/{name}.py names topic {module.TOPIC!r}, not one of {list(TOPICS)}")
    return module


def render_file(path: Path, docs: Path | None = None) -> str:
    """Rewrite the section(s) of ``docs`` (default docs/benchmarks.md) that ``path`` feeds, in place."""
    module = module_for(path)
    module.write_docs(load(path), **({"path": docs} if docs else {}))
    return benchmark_of(path)


@dataclass
class Rendered:
    """What one results file gives the doc: its sections, by marker name, and its summary rows."""

    path: Path
    module: ModuleType
    results: dict[str, Any]
    sections: dict[str, str]

    @classmethod
    def of(cls, path: Path) -> "Rendered":
        module, results = module_for(path), load(path)
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp) / "benchmarks.md"
            with contextlib.redirect_stdout(io.StringIO()):
                module.write_docs(load(path), path=scratch)
            _, blocks = _layout.parse(scratch.read_text())
        return cls(path, module, results, {b.key: b.text for b in blocks if b.kind == "section"})


def _order(blocks: list[_layout.Block], owner: dict[str, Rendered]) -> dict[str, list[_layout.Block]]:
    """The sections under each topic key, in the order of TOPICS, then as they stood in the doc."""
    by_topic: dict[str, list[_layout.Block]] = {key: [] for key in (*TOPICS, OTHER[0])}
    for b in blocks:
        r = owner.get(b.key)
        by_topic[r.module.TOPIC if r else OTHER[0]].append(b)

    def rank(topic: str, b: _layout.Block) -> tuple[int, str]:
        r = owner.get(b.key)
        name = benchmark_of(r.path) if r else ""
        listed = TOPICS.get(topic, ("", ()))[1]
        return (listed.index(name) if name in listed else len(listed), "" if name in listed else name)

    return {t: sorted(bs, key=lambda b: rank(t, b)) for t, bs in by_topic.items()}


def arrange(text: str, fresh: list[Rendered], known: list[Rendered]) -> str:
    """The doc ``text`` with the sections of ``fresh`` rendered anew, every section under its
    topic, and the summary and contents generated; ``known`` tells whose the other sections are."""
    head, blocks = _layout.parse(text)
    if not blocks and not head.strip():
        head = "# Benchmarks\n"
    intro = {b.key: b.after for b in blocks if b.kind == "topic"}
    unknown = sorted(set(intro) - set(TOPICS) - {OTHER[0]})
    if unknown:
        raise SystemExit(f"docs: topic(s) {unknown} are not in benchmarks/report.py's TOPICS")
    after = {b.kind: b.after for b in blocks if b.kind in ("summary", "contents")}
    sections = [b for b in blocks if b.kind == "section"]
    owner = {name: r for r in known for name in r.sections}
    owner.update({name: r for r in fresh for name in r.sections})
    for r in fresh:
        for name, body in r.sections.items():
            old = next((b for b in sections if b.key == name), None)
            if old:
                old.text = body
            else:
                sections.append(_layout.Block("section", name, body))

    grouped = _order(sections, owner)
    parts: list[tuple[str, Any]] = []  # (what, payload) in reading order
    for key, (title, _) in [*TOPICS.items(), (OTHER[0], (OTHER[1], ()))]:
        if not grouped[key] and not intro.get(key, "").strip():
            continue
        parts.append(("topic", (key, title)))
        parts += [("section", b) for b in grouped[key]]

    # Anchors depend on every heading before them, so they are counted over the doc as it will read.
    anchors = _layout.Anchors()
    for text in (head, "## Summary", after.get("summary", ""), "## Contents", after.get("contents", "")):
        anchors.headings(text)
    anchor_of: dict[int, str] = {}
    contents = []
    for what, payload in parts:
        if what == "topic":
            key, title = payload
            anchor_of[id(payload)] = anchors.add(title)
            contents.append(f"- [{title}](#{anchor_of[id(payload)]})")
            anchors.headings(intro.get(key, ""))
        else:
            found = anchors.headings(payload.text)
            heading = next((h for h in found if h[0] == 2), found[0] if found else None)
            if heading:
                anchor_of[id(payload)] = heading[2]
                contents.append(f"  - [{heading[1]}](#{heading[2]})")
            anchors.headings(payload.after)

    rows, done = [], set()
    for what, payload in parts:
        r = owner.get(payload.key) if what == "section" else None
        if r is None or r.path in done:
            continue
        done.add(r.path)
        note = _summary.stale_note(r.results)
        rows += [(h, anchor_of.get(id(payload), ""), note) for h in r.module.headline(r.results)]

    summary = "\n".join([_layout.SUMMARY[0], "## Summary", "", *_summary.table(rows), _layout.SUMMARY[1]])
    listing = "\n".join([_layout.CONTENTS[0], "## Contents", "", "- [Summary](#summary)", *contents,
                         _layout.CONTENTS[1]])
    out = [head, summary, after.get("summary", ""), listing, after.get("contents", "")]
    for what, payload in parts:
        if what == "topic":
            key, title = payload
            out += [f"{_layout.TOPIC_MARK.format(key)}\n# {title}", intro.get(key, "")]
        else:
            out += [payload.text, payload.after]
    return _layout.join(*out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help=f"results files (default: every *.json in {RESULTS})")
    p.add_argument("--docs", type=Path, default=None, help="the file to write (default: docs/benchmarks.md)")
    a = p.parse_args(argv)
    files = a.files or sorted(RESULTS.glob("*.json"))
    if not files:
        p.error(f"no results files in {RESULTS}")
    docs = a.docs or DOCS
    fresh = [Rendered.of(path) for path in files]
    for r in fresh:
        print(f"{r.path.name} -> {benchmark_of(r.path)}")
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    covered = {name for r in fresh for name in r.sections}
    _, blocks = _layout.parse(text)
    known: list[Rendered] = []
    if any(b.kind == "section" and b.key not in covered for b in blocks):
        # Whose are the sections not rendered now: the stored results say, by what they render.
        given = {path.resolve() for path in files}
        known = [Rendered.of(path) for path in sorted(RESULTS.glob("*.json")) if path.resolve() not in given]
    docs.write_text(arrange(text, fresh, known))
    print(f"wrote {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

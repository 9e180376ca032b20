"""docs/benchmarks.md as a report: summary, contents and topic order, all from the results files."""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import _layout, report  # noqa: E402
from benchmarks._docs import write_section  # noqa: E402
from benchmarks._results import RESULTS, save  # noqa: E402
from benchmarks._summary import Headline  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"


@pytest.fixture(scope="module")
def stored() -> list[report.Rendered]:
    """Every stored results file, rendered as report.py renders it."""
    return [report.Rendered.of(path) for path in sorted(RESULTS.glob("*.json"))]


def block(text: str, markers: tuple[str, str]) -> str:
    start, end = markers
    return text[text.index(start):text.index(end) + len(end)]


def test_the_summary_is_what_the_stored_results_give(stored):
    text = DOCS.read_text()
    assert block(report.arrange(text, stored, []), _layout.SUMMARY) == block(text, _layout.SUMMARY)
    summary = block(text, _layout.SUMMARY)
    # Every results file has its rows, each with a machine and a day.
    rows = [line for line in summary.splitlines() if line.startswith("| [")]
    assert len(rows) >= len(stored)
    for row in rows:
        what, figure, on, date = (cell.strip() for cell in row.strip("|").split(" | "))
        assert figure and on and re.match(r"\d{4}-\d\d-\d\d( \(\d\))?$", date), row
    # A results file's stale note is shown under the table, and marks its rows.
    gpu = json.loads((RESULTS / "gpu_flux-h200.json").read_text())
    assert gpu["stale"][1:] in summary and "| NVIDIA H200 | 2026-11-26 (" in summary


def test_a_number_that_moves_moves_the_summary_and_the_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    shutil.copy(DOCS, docs)
    res = json.loads((RESULTS / "queue_throughput.json").read_text())
    res["rows"][0]["seconds"] = res["rows"][0]["jobs"] / 1234.0
    res["meta"]["date"] = "2031-05-06 07:08 UTC"
    moved = save(res, tmp_path / "queue_throughput.json")
    report.main([str(moved), "--docs", str(docs)])
    text = docs.read_text()
    row = next(line for line in block(text, _layout.SUMMARY).splitlines() if "jobs/s (queue" in line)
    assert "**1234**" in row and row.endswith("| 2031-05-06 |")
    assert "| queue | 2000 | 1.62 | 1234 | >= 200 met |" in text
    assert text.count("2031-05-06") == 1
    report.main([str(RESULTS / "queue_throughput.json"), "--docs", str(docs)])
    assert docs.read_text() == DOCS.read_text()


def test_sections_follow_the_topics(stored):
    owner = {name: r for r in stored for name in r.sections}
    _, blocks = _layout.parse(DOCS.read_text())
    kinds = [b.kind for b in blocks]
    assert kinds[:2] == ["summary", "contents"] and "section" not in kinds[:kinds.index("topic")]
    topics = [b.key for b in blocks if b.kind == "topic"]
    assert topics == [key for key in report.TOPICS if key in topics] and topics[0] == "library"
    assert {"library", "builtin", "service", "video", "gpu", "reliability"} <= set(topics)
    topic, seen = None, []
    for b in blocks:
        if b.kind == "topic":
            topic = b.key
            assert b.text.endswith(f"# {report.TOPICS[topic][0]}")
        elif b.kind == "section":
            r = owner[b.key]  # every section of the doc is rendered from a stored results file
            assert r.module.TOPIC == topic, f"{b.key} is under {topic}, its benchmark's topic is {r.module.TOPIC}"
            seen.append((topic, report.TOPICS[topic][1].index(report.benchmark_of(r.path))))
    assert seen == sorted(seen, key=lambda s: (list(report.TOPICS).index(s[0]), s[1]))
    # The notes after a section are its own: the cached-step notes follow the cached-step section.
    notes = next(b for b in blocks if b.key == "cached-step").after
    assert "Five runs of the same command" in notes


def test_contents_and_summary_links_resolve_to_headings():
    text = DOCS.read_text()
    anchors = {a for _, _, a in _layout.headings_of(text)}
    contents, summary = block(text, _layout.CONTENTS), block(text, _layout.SUMMARY)
    links = re.findall(r"\]\(#([^)]+)\)", contents + summary)
    assert len(links) > 20 and set(links) <= anchors, set(links) - anchors
    # Every topic and section heading is listed, in the doc's order.
    listed = re.findall(r"\]\(#([^)]+)\)", contents)
    offset = len(_layout.headings_of(text[:text.index(_layout.CONTENTS[1])]))
    wanted = [a for level, _, a in _layout.headings_of(text)[offset:] if level <= 2]
    assert listed == ["summary", *wanted]


def test_anchors_are_githubs():
    assert _layout.slug("Service: queue throughput, sentinel against sentinel+wait Redis") == \
        "service-queue-throughput-sentinel-against-sentinelwait-redis"
    assert _layout.slug("Per-model tuning (`clusca tune`) on the built-in model") == \
        "per-model-tuning-clusca-tune-on-the-built-in-model"
    assert _layout.slug("GPU: full-size FLUX.1-dev transformer, random weights") == \
        "gpu-full-size-flux1-dev-transformer-random-weights"
    found = _layout.headings_of("# A\n## Targets\n```\n# not a heading\n```\n### Targets\n## Targets\n")
    assert [a for *_, a in found] == ["a", "targets", "targets-1", "targets-2"]


def _new_benchmark(monkeypatch, topic: str = "service", **drop: bool) -> None:
    """A benchmark module ``benchmarks.probe_sweep`` as a new one would be written."""
    start, end = "<!-- probe-sweep:start -->", "<!-- probe-sweep:end -->"
    module = types.ModuleType("benchmarks.probe_sweep")
    module.TOPIC = topic
    module.write_docs = lambda res, path: write_section(
        start, end, f"{start}\n## Service: probe sweep\n\n{res['guards']} guards, {res['rate']} jobs/s\n{end}", path)
    module.headline = lambda res: [Headline("probe sweep", f"{res['rate']} jobs/s", "CPU testarch", "2030-01-02")]
    for name in drop:
        delattr(module, name)
    monkeypatch.setitem(sys.modules, "benchmarks.probe_sweep", module)


def test_a_new_benchmark_gets_its_section_rows_and_contents_entry(tmp_path, monkeypatch):
    _new_benchmark(monkeypatch)
    docs = tmp_path / "benchmarks.md"
    shutil.copy(DOCS, docs)
    path = save({"guards": 3, "rate": 4321}, tmp_path / "probe_sweep.json")
    report.main([str(path), "--docs", str(docs)])
    text = docs.read_text()
    head, blocks = _layout.parse(text)
    keys = [b.key for b in blocks]
    # Under its topic, after the topic's listed benchmarks and before the next topic.
    assert keys.index("adapters-service") + 1 == keys.index("probe-sweep") < keys.index("video")
    assert "| [probe sweep](#service-probe-sweep) | 4321 jobs/s | CPU testarch | 2030-01-02 |" in text
    assert "  - [Service: probe sweep](#service-probe-sweep)" in block(text, _layout.CONTENTS)
    # The notes that followed the section before it still follow that section.
    assert "Where the cluster's time goes" in blocks[keys.index("queue-cpu-single-vs-cluster")].after
    # Rendering it again, or with every stored file, changes nothing more.
    report.main([str(path), "--docs", str(docs)])
    assert docs.read_text() == text


def test_a_section_appended_by_its_benchmark_moves_under_its_topic(tmp_path, monkeypatch):
    _new_benchmark(monkeypatch, topic="library")
    docs = tmp_path / "benchmarks.md"
    shutil.copy(DOCS, docs)
    path = save({"guards": 1, "rate": 5}, tmp_path / "probe_sweep.json")
    sys.modules["benchmarks.probe_sweep"].write_docs({"guards": 1, "rate": 5}, docs)  # appended at the end
    assert docs.read_text().rstrip().endswith("<!-- probe-sweep:end -->")
    report.main([str(path), "--docs", str(docs)])
    keys = [b.key for b in _layout.parse(docs.read_text())[1]]
    assert keys.index("cached-step") < keys.index("probe-sweep") < keys.index("builtin")


@pytest.mark.parametrize("missing", ["headline", "TOPIC"])
def test_report_refuses_a_benchmark_without_headline_or_topic(tmp_path, monkeypatch, missing):
    _new_benchmark(monkeypatch, **{missing: True})
    path = save({"guards": 1, "rate": 5}, tmp_path / "probe_sweep.json")
    with pytest.raises(SystemExit, match=f"no {missing}"):
        report.main([str(path), "--docs", str(tmp_path / "b.md")])


def test_report_refuses_an_unknown_topic(tmp_path, monkeypatch):
    _new_benchmark(monkeypatch, topic="nosuch")
    path = save({"guards": 1, "rate": 5}, tmp_path / "probe_sweep.json")
    with pytest.raises(SystemExit, match="names topic 'nosuch'"):
        report.main([str(path), "--docs", str(tmp_path / "b.md")])

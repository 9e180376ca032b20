"""Benchmark scripts rewrite only their own section of docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.speed_flux import write_docs  # noqa: E402


def test_speed_section_is_rewritten_in_place_and_keeps_its_neighbours(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- a:start -->\n## A\nkeep me\n<!-- a:end -->\n")
    write_docs("CPU", [("FLOPs", "4.0x")], [("target", True)], "--runs 5", path=doc)
    # Hand-written notes after the section and another section below it.
    doc.write_text(doc.read_text() + "\nA note on the CPU run.\n\n## Next\n<!-- b:start -->\nother\n<!-- b:end -->\n")
    write_docs("CPU", [("FLOPs", "5.0x")], [("target", False)], "--runs 7", path=doc)
    write_docs("GPU", [("FLOPs", "3.0x")], [("target", True)], "--device cuda", path=doc)
    text = doc.read_text()
    assert "keep me" in text and "A note on the CPU run." in text and "other" in text
    assert text.count("## ClusCa speed, FLUX architecture (CPU)") == 1
    assert "| FLOPs | 5.0x |" in text and "4.0x" not in text and "--runs 7" in text
    assert "target: not met" in text
    assert text.index("(CPU)") < text.index("A note on the CPU run.") < text.index("## Next") < text.index("(GPU)")

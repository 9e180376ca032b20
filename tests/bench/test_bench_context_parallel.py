"""The context-parallel benchmark runs end to end on two gloo ranks and renders its section."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import context_parallel  # noqa: E402


def test_two_ranks_agree_with_one_and_their_collectives_are_timed(tmp_path):
    out = tmp_path / "cp.json"
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    assert context_parallel.main(["--workloads", "builtin", "--steps", "5", "--modes", "off,taylorseer",
                                  "--json", str(out), "--no-docs"]) == 0
    res = json.loads(out.read_text())
    rows = {(r["world"], r["mode"]): r for r in res["rows"]}
    assert set(rows) == {(1, "off"), (1, "taylorseer"), (2, "off"), (2, "taylorseer")}
    for mode in ("off", "taylorseer"):
        assert rows[(2, mode)]["max_abs_diff"] < 1e-4
        assert rows[(1, mode)]["collectives_per_step"] == 0 < rows[(2, mode)]["collectives_per_step"]
        assert rows[(2, mode)]["collective_s_per_step"] > 0 and len(rows[(2, mode)]["step_s"]) == 5
    assert 0 < rows[(2, "taylorseer")]["psnr_vs_uncached"] < 100
    context_parallel.write_docs(res, docs)
    text = docs.read_text()
    start, end = context_parallel.markers(None)
    assert start in text and end in text and "| builtin | 2 | taylorseer |" in text
    (row,) = context_parallel.headline(res)
    assert row.what.startswith("Ulysses-2 against one process") and "ms/step" in row.figure

"""The GPU cache benchmark's code path, run on the CPU with a tiny FLUX configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dual", "1", "--single", "1", "--width", "128", "--head-dim", "64", "--text-dim", "64",
        "--side", "8", "--text-tokens", "16", "--steps", "8", "--dtype", "float32"]


def test_tiny_run_measures_every_method_and_renders(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "benchmarks/gpu_flux.py", *TINY, "--batches", "1,2", "--rounds", "2,1",
                    "--json", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_flux import methods, summarise

    names = [m.name for m in methods()]
    rows = summarise(data)
    assert [(r["batch"], r["method"]) for r in rows] == [(b, n) for b in (1, 2) for n in names]
    assert all(r["finite"] for r in rows)
    assert [r["runs"] for r in rows if r["batch"] == 1] == [2] * len(names)
    uncached = next(r for r in rows if r["method"] == "uncached" and r["batch"] == 1)
    assert uncached["speedup"] == 1.0 and uncached["rel_l2"] == 0.0
    ours = [r for r in rows if r["flops_speedup"]]
    assert ours and all(r["flops_speedup"] > 1.0 and r["cache_mib"] >= 0 for r in ours)
    assert all(0 < r["rel_l2"] < 1 for r in ours)


def test_deadline_skips_runs_but_keeps_partial_results(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "benchmarks/gpu_flux.py", *TINY, "--batches", "1,2", "--rounds", "1",
                    "--deadline", "0.001", "--json", str(out)], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    data = json.loads(out.read_text())
    assert data["results"] == [] and data["info"]["params"] > 0

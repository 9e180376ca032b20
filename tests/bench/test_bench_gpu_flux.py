"""The GPU cache benchmark's code path, run on the CPU with a tiny FLUX configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--dual", "1", "--single", "1", "--width", "128", "--head-dim", "64", "--text-dim", "64",
        "--side", "8", "--text-tokens", "16", "--steps", "8", "--dtype", "float32"]


def test_tiny_run_measures_every_method_and_renders(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "benchmarks/gpu_flux.py", *TINY, "--batches", "1,2", "--rounds", "2,1",
                    "--json", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_flux import img2img_methods, methods, render, summarise

    names = [m.name for m in methods()]
    edits = [m.name for m in img2img_methods()]
    rows = summarise(data)
    # Text-to-image rows, then the image-to-image rows (strength 0.6 by default), per batch size.
    assert [(r["batch"], r["method"], r["edit"]) for r in rows] == \
        [(b, n, None) for b in (1, 2) for n in names] + [(b, n, 0.6) for b in (1, 2) for n in edits]
    img2img = [r for r in rows if r["edit"] is not None]
    assert all(r["finite"] for r in img2img) and [r["runs"] for r in img2img if r["batch"] == 1] == [2, 2]
    cached = next(r for r in img2img if r["method"] != "uncached" and r["batch"] == 1)
    assert cached["flops_speedup"] > 1.0 and 0 < cached["rel_l2"] < 1
    assert next(r for r in img2img if r["method"] == "uncached")["rel_l2"] == 0.0
    assert "img2img strength 0.6: ClusCa balanced" in render(data)
    rows = [r for r in rows if r["edit"] is None]
    assert all(r["finite"] for r in rows)
    assert [r["runs"] for r in rows if r["batch"] == 1] == [2] * len(names)
    uncached = next(r for r in rows if r["method"] == "uncached" and r["batch"] == 1)
    assert uncached["speedup"] == 1.0 and uncached["rel_l2"] == 0.0
    ours = [r for r in rows if r["flops_speedup"]]
    assert ours and all(r["flops_speedup"] > 1.0 and r["cache_mib"] >= 0 for r in ours)
    assert all(0 < r["rel_l2"] < 1 for r in ours)
    # The adapter rows: a rank-16 adapter of random weights, uncached and cached (its cached steps
    # captured, as without the adapter, and eager), beside the plain runs.
    lora = {r["method"]: r for r in rows if r["batch"] == 1 and r["method"].startswith("LoRA r16")}
    assert set(lora) == {"LoRA r16, uncached", "LoRA r16, ClusCa fast (N6)", "LoRA r16, ClusCa fast (N6), eager"}
    assert lora["LoRA r16, uncached"]["flops_speedup"] is None and 0 < lora["LoRA r16, uncached"]["rel_l2"] < 1
    assert lora["LoRA r16, ClusCa fast (N6)"]["flops_speedup"] > 1.0
    plain = next(r for r in rows if r["batch"] == 1 and r["method"] == "ClusCa fast (N6)")
    assert lora["LoRA r16, ClusCa fast (N6)"]["capture"] == plain["capture"] != "off"  # on a CPU: unavailable
    assert lora["LoRA r16, ClusCa fast (N6), eager"]["capture"] == "off"
    assert "replayed as CUDA graphs and eager" in render(data)
    assert [m.name for m in methods(0)] == [n for n in names if not n.startswith("LoRA")]


def test_deadline_skips_runs_but_keeps_partial_results(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "benchmarks/gpu_flux.py", *TINY, "--batches", "1,2", "--rounds", "1",
                    "--deadline", "0.001", "--json", str(out)], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    data = json.loads(out.read_text())
    assert data["results"] == [] and data["info"]["params"] > 0


def _gpu_job(tmp_path, **env) -> list[list[str]]:
    """Run benchmarks/gpu_all.sh with a stand-in interpreter that records each call."""
    import os

    calls = tmp_path / "calls.txt"
    fake = tmp_path / "py"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    subprocess.run(["bash", "benchmarks/gpu_all.sh"], cwd=ROOT, check=True, capture_output=True, timeout=60,
                   env={**os.environ, "PY": str(fake), "OUT": str(tmp_path / "out"), **env})
    return [line.split() for line in calls.read_text().splitlines()]


def test_gpu_job_runs_only_the_parts_asked_for(tmp_path):
    calls = _gpu_job(tmp_path, TRAIN_MINUTES="0", FLUX_DEADLINE="0", LOAD="1")
    scripts = [c[0] for c in calls if not c[0].startswith("-")]
    assert scripts == ["benchmarks/load.py"]
    load = next(c for c in calls if c[0] == "benchmarks/load.py")
    assert load[load.index("--json") + 1] == str(tmp_path / "out" / "load.json")
    assert "--no-docs" in load
    (tmp_path / "b").mkdir()
    flux_only = _gpu_job(tmp_path / "b", TRAIN_MINUTES="0", FLUX_DEADLINE="60")
    assert [c[0] for c in flux_only if not c[0].startswith("-")] == ["benchmarks/gpu_flux.py"]
    flux = next(c for c in flux_only if c[0] == "benchmarks/gpu_flux.py")
    assert flux[flux.index("--lora-rank") + 1] == "16"
    # The CUDA-only capture tests run before the benchmark, where pytest is installed.
    assert any(c[:2] == ["-m", "pytest"] and "tests/clusca/test_clusca_capture.py" in c
               and "tests/clusca/test_clusca_lora_capture.py" in c for c in flux_only)
    assert not any(c[:2] == ["-m", "pytest"] for c in calls)

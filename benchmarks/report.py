"""Render docs/benchmarks.md sections from saved raw results, measuring nothing.

    python benchmarks/report.py                       # every file in benchmarks/results/
    python benchmarks/report.py benchmarks/results/load.json

A results file is named ``<benchmark>[-<label>].json``: ``benchmarks/<benchmark>.py``
measured it and renders it with its ``write_docs(results)`` (each benchmark owns one
marked section, or one per label; the text around the sections is kept). A benchmark
that renders from the results it measured, and from nothing else, can be re-rendered
here after a change to its report, with the numbers unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import RESULTS, load  # noqa: E402


def benchmark_of(path: Path) -> str:
    """The benchmark a results file belongs to, from its name."""
    return path.stem.split("-", 1)[0]


def render_file(path: Path, docs: Path | None = None) -> str:
    """Rewrite the section(s) of ``docs`` (default docs/benchmarks.md) that ``path`` feeds."""
    name = benchmark_of(path)
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        raise SystemExit(f"{path.name}: no benchmark named {name!r} (benchmarks/{name}.py)") from exc
    write = getattr(module, "write_docs", None)
    if write is None:
        raise SystemExit(f"{path.name}: benchmarks/{name}.py renders no report from results (no write_docs)")
    write(load(path), **({"path": docs} if docs else {}))
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help=f"results files (default: every *.json in {RESULTS})")
    p.add_argument("--docs", type=Path, default=None, help="the file to write (default: docs/benchmarks.md)")
    a = p.parse_args(argv)
    files = a.files or sorted(RESULTS.glob("*.json"))
    if not files:
        p.error(f"no results files in {RESULTS}")
    for path in files:
        print(f"{path.name} -> {render_file(path, a.docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

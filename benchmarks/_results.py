"""Where the benchmarks keep their raw results: one JSON file per measured run.

A benchmark measures, saves what it measured here, and renders its docs section from that
file alone (``benchmarks/report.py`` renders them all again), so a report can be rewritten
without measuring again and every number in docs/benchmarks.md has its raw source.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def _finite(obj: Any) -> Any:
    # JSON has no NaN or infinity; a value that was not measured is null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def save(res: dict[str, Any], path: str | Path) -> Path:
    """Write ``res`` to ``path`` (folders made as needed) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(res), indent=1) + "\n")
    return path


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def measured_or_loaded(from_json: str | Path | None, measure: Callable[[], dict[str, Any]],
                       path: str | Path) -> dict[str, Any]:
    """The results saved in ``from_json`` (nothing is measured), or ``measure()``'s, saved to ``path``."""
    if from_json:
        return load(from_json)
    res = measure()
    print(f"wrote {save(res, path)}")
    return res


def parsed_and_results(argv: list[str] | None, parse_args: Callable[[list[str]], argparse.Namespace],
                       measure: Callable[[argparse.Namespace, list[str]], dict[str, Any]]
                       ) -> tuple[argparse.Namespace, dict[str, Any]]:
    """A benchmark's command line (``argv``, default ``sys.argv[1:]``) parsed, and its results: those
    saved in ``--from-json``, or ``measure(args, argv)``'s, saved to ``--json``."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return args, measured_or_loaded(args.from_json, lambda: measure(args, argv), args.json)


def quoted_command(argv: list[str], *, paths: tuple[str, ...] = ("--json", "--from-json"),
                   flags: tuple[str, ...] = ("--no-write", "--no-docs")) -> list[str]:
    """``argv`` as the docs quote the command: where its results and docs went is not part of
    the measurement, so the options in ``paths`` (with their value, if one follows) and ``flags``
    are left out."""
    out, after_path = [], False
    for a in argv:
        if after_path and not a.startswith("-"):
            after_path = False
            continue
        after_path = a in paths
        if not after_path and a not in flags and not a.startswith(tuple(f"{p}=" for p in paths)):
            out.append(a)
    return out

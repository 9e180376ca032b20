"""Where the benchmarks keep their raw results: one JSON file per measured run.

A benchmark measures, saves what it measured here, and renders its docs section from that
file alone (``benchmarks/report.py`` renders them all again), so a report can be rewritten
without measuring again and every number in docs/benchmarks.md has its raw source.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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

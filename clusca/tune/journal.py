"""One candidate's measurements, and the journal file they are kept in."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping


from ..config import ClusCaConfig
from .space import canonical, key_of, label


@dataclass
class Candidate:
    """One setting and everything measured of it."""

    key: str
    config: ClusCaConfig
    origin: str = "search"  # "search", "library <preset>", "model <preset>"
    items: dict[int, dict[str, Any]] = field(default_factory=dict)  # item -> {"psnr", "ssim", "ok"}
    flops_speedup: float | None = None
    cache_bytes: int = 0
    full_steps: int | None = None
    rung: int = 0
    wall_speedup: float | None = None
    times: list[float] = field(default_factory=list)

    @property
    def forced(self) -> bool:
        return self.origin != "search"

    def mean(self, metric: str, among: Iterable[int] | None = None) -> float | None:
        """The mean of ``metric`` over the items measured (of ``among``, when given)."""
        keep = None if among is None else set(among)
        vals = [self.items[i][metric] for i in sorted(self.items) if (keep is None or i in keep)
                and self.items[i].get(metric) is not None]
        return statistics.fmean(float(v) for v in vals) if vals else None

    def to_json(self) -> dict[str, Any]:
        d = {"key": self.key, "label": label(self.config), "origin": self.origin,
             "config": canonical(self.config).to_dict(), "rung": self.rung,
             "prompts_measured": len(self.items), "psnr": _r(self.mean("psnr")), "ssim": _r(self.mean("ssim"), 4),
             "psnr_min": _r(min((v["psnr"] for v in self.items.values()), default=None)),
             "flops_speedup": self.flops_speedup, "wall_speedup": _r(self.wall_speedup, 4),
             "cache_bytes": self.cache_bytes, "full_steps": self.full_steps, "times": self.times,
             "items": {str(i): v for i, v in sorted(self.items.items())}}
        if any("ok" in v for v in self.items.values()):
            d["adherence"] = _r(100.0 * (self.mean("ok") or 0.0), 1)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Candidate":
        cfg = ClusCaConfig.from_dict(d["config"])
        return cls(key=key_of(cfg), config=cfg, origin=d.get("origin", "search"),
                   items={int(k): dict(v) for k, v in (d.get("items") or {}).items()},
                   flops_speedup=d.get("flops_speedup"), cache_bytes=int(d.get("cache_bytes") or 0),
                   full_steps=d.get("full_steps"), rung=int(d.get("rung") or 0),
                   wall_speedup=d.get("wall_speedup"), times=list(d.get("times") or []))


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(float(x), nd)


def write_whole(path: Path, data: bytes, check: Callable[[Path], None] | None = None) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it (same suffix), which
    ``check`` (optional) must accept, then a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def describe_device(device: Any = None) -> str:
    """A human-readable name of the device a pipeline runs on."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(dev)} (cuda)"
    cpu = platform.processor() or platform.machine()
    return f"cpu {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """A measurements file written by :func:`tune` (plain JSON)."""
    return json.loads(Path(path).read_text())

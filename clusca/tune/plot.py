"""The Pareto plot of a tuning run (PNG, drawn with Pillow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from .journal import Candidate, write_whole


class PlottedRun(Protocol):
    """What the plot reads of a tuning run (a :class:`~clusca.tune.result.TuneResult` is one);
    a protocol, so the result can draw itself without the two modules importing each other."""

    meta: dict[str, Any]
    final: list[str]
    front: list[str]
    picks: dict[str, str]
    candidates: list[Candidate]

    @property
    def final_items(self) -> list[int]: ...

    def by_key(self, key: str) -> Candidate: ...


def draw_pareto(res: PlottedRun, path: Path, title: str = "") -> None:
    """PSNR against wall-clock speedup of the finalists, the front as a line, the picks and library presets named."""
    from PIL import Image, ImageDraw

    n = res.meta.get("final_prompts")
    pts = {k: (res.by_key(k).wall_speedup or 0.0, res.by_key(k).mean("psnr", res.final_items) or 0.0)
           for k in res.final}
    W, H, L, R, T, B = 900, 600, 70, 30, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    if pts:
        xs, ys = [p[0] for p in pts.values()], [p[1] for p in pts.values()]
        x0, x1 = min(1.0, min(xs)), max(xs) * 1.05 + 1e-6
        y0, y1 = min(ys) - 1.0, max(ys) + 1.0
    else:
        x0, x1, y0, y1 = 1.0, 2.0, 0.0, 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        return (L + (x - x0) / (x1 - x0) * (W - L - R), H - B - (y - y0) / (y1 - y0) * (H - T - B))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for j in range(6):
        xv, yv = x0 + (x1 - x0) * j / 5, y0 + (y1 - y0) * j / 5
        px, _ = at(xv, y0)
        _, py = at(x0, yv)
        d.line([px, H - B, px, H - B + 5], fill="black")
        d.text((px - 12, H - B + 8), f"{xv:.2f}x", fill="black")
        d.line([L - 5, py, L, py], fill="black")
        d.text((8, py - 6), f"{yv:.1f} dB", fill="black")
    clock = "CPU-time" if res.meta.get("clock") == "cpu" else "wall-clock"
    d.text((W // 2 - 120, H - 22), f"{clock} speedup vs uncached (this device)", fill="black")
    d.text((L, 12), title or f"clusca tune: PSNR vs speed ({len(pts)} finalists, {n} images)", fill="black")
    line = [at(*pts[k]) for k in res.front if k in pts]
    if len(line) > 1:
        d.line(line, fill=(31, 119, 180), width=2)
    named = {k: [] for k in pts}
    for name, k in res.picks.items():
        named.setdefault(k, []).append(f"tuned {name}")
    for c in res.candidates:
        if c.key in pts and c.origin != "search":
            named[c.key].append(c.origin.replace("library", "paper"))
    for k, (x, y) in pts.items():
        px, py = at(x, y)
        colour = (214, 39, 40) if k in res.picks.values() else (31, 119, 180) if k in res.front else (150, 150, 150)
        r = 5 if named[k] else 3
        d.ellipse([px - r, py - r, px + r, py + r], fill=colour)
        if named[k]:
            d.text((px + 7, py - 6), ", ".join(named[k]), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_whole(path, buf.getvalue())

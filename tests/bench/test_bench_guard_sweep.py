"""The guard sweep's docs section and headline rows come from its results dict alone."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import guard_sweep  # noqa: E402
from tests.bench.test_bench_sections import render_via_report  # noqa: E402


def _variant(worst: float, trips: float) -> dict:
    return {"psnr": [worst, 40.0], "worst_psnr": worst, "worst_at": {"prompt": "p", "seed": 7}, "mean_psnr": 33.0,
            "trips": [trips, trips], "mean_trips": trips, "max_trips": 9, "mean_full_steps": 11.5}


def _speed(name: str, on: float) -> dict:
    t = {"off": 0.5, "on": 0.5 / on, "strict": 0.7, "check only": 0.51}
    return {"name": name, "cpu_seconds_per_image": t, "wall_seconds_per_image": t, "cpu_times": {}, "wall_times": {},
            "trips_per_image": {"off": 0, "on": 0.25, "strict": 3.75, "check only": 0}, "speed_on": on,
            "speed_strict": 0.714, "speed_check_only": 0.98, "wall_speed_on": on, "wall_speed_strict": 0.7,
            "wall_speed_check_only": 0.97,
            "guard_seconds_per_image": {"off": 0.0, "on": 0.001, "strict": 0.002, "check only": 0.001},
            "guard_share": 0.0123}


RES = {"command": "python benchmarks/guard_sweep.py --prompts 3", "machine": "testarch CPU, 7 cores", "date": "2031-01-02",
       "torch": "9.9", "steps": 17, "seeds": [11, 99], "prompts": ["a teal dodecagon", "q"], "guard_bound": 0.77,
       "strict_bound": 0.03, "layout_steps": 4, "sweep_s": 1.0,
       "settings": [{"name": "preset zed", "group": "presets", "preset": "zed", "config": {},
                     "off": _variant(3.25, 0), "bound": _variant(8.25, 1.0), "on": _variant(19.75, 1.5), "strict": _variant(27.5, 4.5)},
                    {"name": "grid one", "group": "grid", "preset": None, "config": {},
                     "off": _variant(1.5, 0), "bound": _variant(6.5, 1.0), "on": _variant(12.5, 2.0), "strict": _variant(25.0, 6.0)}],
       "speed": [_speed("preset zed", 0.875)]}


def test_section_and_headline_are_rendered_from_the_results(tmp_path):
    text = render_via_report(RES, tmp_path, "guard_sweep.json")
    for s in ("2031-01-02", "testarch CPU, 7 cores", "a teal dodecagon", "17 steps", "bound 0.77", "0.03",
              "| preset zed | 3.2 / 8.2 / 19.8 / 27.5 |",
              "| grid one | 1.5 / 6.5 / 12.5 / 25.0 |", "first 4 steps full", "6.5 dB with its bound alone (grid one)", "0.875", "0.25 / 3.75", "1.23%"):
        assert s in text, s
    rows = guard_sweep.headline(RES)
    assert {r.date for r in rows} == {"2031-01-02"} and {r.on for r in rows} == {"testarch CPU, 7 cores"}
    worst, speed = rows
    # The sweep's worst sample off, at the default bound and at the strict one.
    assert "1.5 dB" in worst.figure and "12.5 dB at bound 0.77" in worst.figure and "25.0 dB at bound 0.03" in worst.figure
    # The cost on the model's presets: the guard's own time and its trips, then the noisy ratio.
    assert "1.23%" in speed.figure and "0.25 trips per image" in speed.figure and "0.875" in speed.figure

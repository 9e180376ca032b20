"""Which torch thread count a CPU worker should default to on a busy machine.

    python benchmarks/thread_default.py [--rounds 4] [--load 1] [--threads 1,2] [--steps 10]

Loads the built-in model the way a worker does (its registry entry, ``load_runner``) and
times one uncached image at its default size (``--steps`` steps), alternating torch's own default
thread count with each of ``--threads`` in every round (the order rotates), while
``--load`` busy processes compete for the cores as other work on a shared machine does.
Prints the median and spread of wall time and CPU time per thread count. Writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds (one image per thread count each)")
    ap.add_argument("--load", type=int, default=1, help="busy background processes while measuring (0: none)")
    ap.add_argument("--steps", type=int, default=10,
                    help="denoising steps (default 10, a quarter of the model's: the default thread count "
                         "can take 20 s an image on a busy machine, and the run should stay near two minutes)")
    ap.add_argument("--threads", default="1,2", help="thread counts to compare with torch's default")
    a = ap.parse_args(argv)

    import torch

    from clusca import ClusCaConfig
    from service.registry import Registry
    from service.worker.runners import Batch, load_runner

    default = torch.get_num_threads()
    counts = [default] + [n for n in (int(t) for t in a.threads.split(",")) if n != default]
    labels = {n: f"{n} (torch's default)" if n == default else str(n) for n in counts}
    entry = Registry.load(None).get("shapes")
    runner = load_runner(entry, "cpu")
    d = entry.defaults
    batch = Batch(prompts=["a red circle on the left"], negative_prompts=None, seeds=[7], width=d.width,
                  height=d.height, steps=a.steps, guidance=d.guidance, cache=ClusCaConfig.preset("off"))

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.load)]
    wall: dict[int, list[float]] = {n: [] for n in counts}
    cpu: dict[int, list[float]] = {n: [] for n in counts}
    try:
        time.sleep(1.0)  # let the load settle on the cores
        for r in range(a.rounds):
            for n in counts[r % len(counts):] + counts[:r % len(counts)]:
                torch.set_num_threads(n)
                c0, t0 = time.process_time(), time.perf_counter()
                runner.run(batch, lambda step: False)
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
                print(f"round {r + 1}: {n} thread(s) {wall[n][-1]:.2f} s", file=sys.stderr, flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"built-in model, one uncached {d.width}x{d.height} image, {batch.steps} steps; {os.cpu_count()} cores, "
          f"{a.load} busy background process(es), load average {load:.1f} at the end; {a.rounds} rounds")
    for n in counts:
        print(f"  {labels[n]:>22} thread(s): wall median {statistics.median(wall[n]):.2f} s "
              f"(min {min(wall[n]):.2f}, max {max(wall[n]):.2f}), CPU median {statistics.median(cpu[n]):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

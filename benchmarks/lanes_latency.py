"""Short-job latency while long jobs run: one lane against cost lanes with a short-only worker.

Starts a private Redis, worker process(es) and one API process serving a no-op model whose
steps sleep (``--step-delay-s``; nothing is computed, so the figures are the queue's, not
the CPU's). Each set-up gets the same load: ``--long-jobs`` long jobs (``--long-steps``
steps each) are queued at once; once the first runs, ``--short-jobs`` short jobs
(``--short-steps`` steps) follow, one every ``--short-every-s``. A job's latency is its
time from enqueue to result, from the job record (``finished_at - created_at``). Set-ups:

* ``one lane, 1 worker``: the model without ``long_cost``, as before lanes: every job in
  arrival order, so short jobs wait for the long ones queued before them;
* ``one lane, 2 workers``: the same with a second worker (both read every job);
* ``lanes, 2 workers (1 short-only)``: the model with ``long_cost`` between the two job
  sizes, one worker reading both lanes (short first) and one with ``CLUSCA_WORKER_LANES=short``.

Prints a table and the ratio of the short jobs' median latency without lanes to that with
them, saves the raw results (``--json``, default benchmarks/results/lanes_latency.json) and
renders the "Service: short jobs next to long ones" section of docs/benchmarks.md from them
alone (``--no-write`` to skip, ``--docs`` for another file; ``--from-json`` renders a saved
file again without measuring).

    python benchmarks/lanes_latency.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, write_section, written_by  # noqa: E402
from benchmarks._service import stop_all  # noqa: E402
from benchmarks._results import RESULTS, load, quoted_command, save  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402

from service.broker.embedded import EmbeddedRedis, free_port  # noqa: E402

START, END = "<!-- lanes-latency:start -->", "<!-- lanes-latency:end -->"
TOPIC = "service"
SIDE = 16
# (name, long_cost set, worker lanes): the set-ups compared, in the order they run.
SETUPS: list[tuple[str, bool, list[str]]] = [
    ("one lane, 1 worker", False, ["all"]),
    ("one lane, 2 workers", False, ["all", "all"]),
    ("lanes, 2 workers (1 short-only)", True, ["all", "short"]),
]
BASELINE, LANES_SETUP = SETUPS[0][0], SETUPS[2][0]


def models_yaml(step_delay_s: float, long_cost: int | None) -> str:
    limits = f"\n    limits: {{long_cost: {long_cost}}}" if long_cost is not None else ""
    return ("models:\n  - name: timed\n    kind: noop\n"
            f"    options: {{step_delay_s: {step_delay_s}}}\n"
            f"    defaults: {{width: {SIDE}, height: {SIDE}, steps: 2, guidance: 0, cache: \"off\", size_multiple: 8}}"
            f"{limits}\n")


class Stack:
    """Redis + workers + API as separate processes, like a deployment on one host."""

    def __init__(self, models: str, lanes: list[str]):
        self.tmp = Path(tempfile.mkdtemp(prefix="clusca-lanes-"))
        (self.tmp / "models.yaml").write_text(models)
        self.redis = EmbeddedRedis().start()
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "REDIS_URL": self.redis.url, "CLUSCA_MODELS": str(self.tmp / "models.yaml"),
               "CLUSCA_DEFAULT_MODEL": "timed", "CLUSCA_MAX_STEPS": "100000", "CLUSCA_WORKER_METRICS_PORT": "0",
               "CLUSCA_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.procs = [subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], cwd=ROOT,
                                       env={**env, "CLUSCA_WORKER_LANES": lane}) for lane in lanes]
        self.procs.append(subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--port",
                                            self.url.rsplit(":", 1)[1]], env=env, cwd=ROOT))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(self.url + "/readyz", timeout=1).json()
                if ready.get("status") == "ready" and ready["workers_alive"].get("timed", 0) == len(lanes):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        self.close()
        raise RuntimeError("the service did not become ready")

    def close(self) -> None:
        stop_all(self.procs, self.redis)


def _submit(c: httpx.Client, steps: int, seed: int) -> str:
    r = c.post("/generate", json={"prompt": f"job {seed}", "steps": steps, "seed": seed},
               headers={"Prefer": "respond-async"})
    r.raise_for_status()
    return r.json()["id"]


def _final(c: httpx.Client, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = c.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
            return job
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id} did not finish in time")


def run_setup(args: argparse.Namespace, long_cost: int | None, lanes: list[str]) -> dict[str, Any]:
    """One set-up under the load: every job's latency and the worker that ran it."""
    stack = Stack(models_yaml(args.step_delay_s, long_cost), lanes)
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as c:
            longs = [_submit(c, args.long_steps, i) for i in range(args.long_jobs)]
            deadline = time.monotonic() + 30
            while c.get(f"/jobs/{longs[0]}").json()["status"] != "running":
                if time.monotonic() > deadline:
                    raise RuntimeError("the first long job did not start")
                time.sleep(0.01)
            shorts = []
            for i in range(args.short_jobs):
                shorts.append(_submit(c, args.short_steps, 1000 + i))
                time.sleep(args.short_every_s)
            done = {j: _final(c, j) for j in [*longs, *shorts]}
    finally:
        stack.close()

    def latency(j: str) -> float:
        return round(done[j]["finished_at"] - done[j]["created_at"], 4)

    return {"long_s": [latency(j) for j in longs], "short_s": [latency(j) for j in shorts]}


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    # Between the sizes: long jobs go to the long lane, short ones stay in the short lane.
    long_cost = SIDE * SIDE * (args.short_steps + args.long_steps) // 2
    setups = []
    for name, lanes_on, lanes in SETUPS:
        got = run_setup(args, long_cost if lanes_on else None, lanes)
        setups.append({"name": name, "long_cost": long_cost if lanes_on else None, "workers": lanes, **got})
        print(f"{name}: short jobs median {statistics.median(got['short_s']):.3f} s", flush=True)
    return {"meta": {"argv": " ".join(quoted_command(argv)), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "cores": os.cpu_count(), "machine": platform.machine(), "load_avg": round(os.getloadavg()[0], 2),
                     "step_delay_s": args.step_delay_s, "side": SIDE, "long_jobs": args.long_jobs,
                     "long_steps": args.long_steps, "short_jobs": args.short_jobs, "short_steps": args.short_steps,
                     "short_every_s": args.short_every_s},
            "setups": setups}


def p90(values: list[float]) -> float:
    """The 90th percentile, interpolated between the nearest ranks."""
    xs = sorted(values)
    k = 0.9 * (len(xs) - 1)
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Per set-up: median and p90 of the short jobs' latency, median of the long jobs'."""
    return [{"name": s["name"], "long_cost": s["long_cost"], "workers": s["workers"],
             "short_median": statistics.median(s["short_s"]), "short_p90": p90(s["short_s"]),
             "long_median": statistics.median(s["long_s"])} for s in res["setups"]]


def ratio(res: dict[str, Any]) -> float:
    """The short jobs' median latency with one lane and one worker over that with lanes."""
    rows = {r["name"]: r for r in summary(res)}
    return rows[BASELINE]["short_median"] / rows[LANES_SETUP]["short_median"]


def headline(res: dict[str, Any]) -> list[Headline]:
    """The summary's row: the short jobs' median latency without and with lanes, and their ratio."""
    m = res["meta"]
    rows = {r["name"]: r for r in summary(res)}
    return [Headline(f"short-job latency while long jobs run, median: {BASELINE} against {LANES_SETUP}",
                     f"{rows[BASELINE]['short_median']:.2f} s against **{rows[LANES_SETUP]['short_median']:.2f} s**, "
                     f"x{ratio(res):.0f}", cpu(m["machine"], m["cores"], m.get("load_avg")), day(m["date"]))]


def render(res: dict[str, Any]) -> str:
    """The lanes section of docs/benchmarks.md, from the raw latencies alone."""
    m = res["meta"]
    long_s, short_s = m["long_steps"] * m["step_delay_s"], m["short_steps"] * m["step_delay_s"]
    lines = [
        START, "## Service: short jobs next to long ones (cost lanes)", "",
        f"{written_by('lanes_latency.py', m['argv'], m['date'])}, on {m['cores']} CPU core(s), {m['machine']} "
        f"(1-minute load average {m['load_avg']} at the start). A no-op model whose steps "
        f"sleep {m['step_delay_s']} s (the queue's behaviour, not the CPU's): {m['long_jobs']} long jobs of "
        f"{m['long_steps']} steps (about {long_s:.1f} s each) are queued at once; once the first runs, "
        f"{m['short_jobs']} short jobs of {m['short_steps']} steps (about {short_s:.2f} s) follow, one every "
        f"{m['short_every_s']} s. Latency: enqueue to result, from the job record. With lanes the model's "
        f"`long_cost` ({res['setups'][2]['long_cost']} pixel-steps) lies between the two sizes, and one of the two "
        "workers runs with `CLUSCA_WORKER_LANES=short`.", "",
        "| set-up | short jobs: median s | short jobs: p90 s | long jobs: median s |", "|---|---|---|---|",
    ]
    rows = summary(res)
    for r in rows:
        lines.append(f"| {r['name']} | {r['short_median']:.2f} | {r['short_p90']:.2f} | {r['long_median']:.2f} |")
    by_name = {r["name"]: r for r in rows}
    lines += ["", f"Short jobs' median latency, one lane and one worker over lanes with a short-only worker: "
              f"{ratio(res):.1f}x. Without lanes a short job waits for every long job queued before it, and a second "
              "worker only helps until the long jobs hold both; with lanes it waits only for the short jobs ahead of "
              "it. The price is the share kept for short jobs: the long jobs' median is "
              f"{by_name[LANES_SETUP]['long_median']:.2f} s with lanes against "
              f"{by_name[SETUPS[1][0]]['long_median']:.2f} s with two workers reading every job (the short-only "
              "worker idles while no short job waits).", END]
    return "\n".join(lines) + "\n"


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    write_section(START, END, render(res), path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step-delay-s", type=float, default=0.02)
    p.add_argument("--long-jobs", type=int, default=2)
    p.add_argument("--long-steps", type=int, default=200)
    p.add_argument("--short-jobs", type=int, default=12)
    p.add_argument("--short-steps", type=int, default=5)
    p.add_argument("--short-every-s", type=float, default=0.25)
    p.add_argument("--json", type=Path, default=RESULTS / "lanes_latency.json")
    p.add_argument("--from-json", type=Path, help="render a saved results file; measure nothing")
    p.add_argument("--docs", type=Path, default=DOCS)
    p.add_argument("--no-write", action="store_true", help="leave the docs as they are")
    a = p.parse_args(argv)
    if a.from_json:
        res = load(a.from_json)
    else:
        res = measure(a, argv)
        print(f"wrote {save(res, a.json)}")
    for r in summary(res):
        print(f"{r['name']:<34} short median {r['short_median']:6.2f} s  p90 {r['short_p90']:6.2f} s  "
              f"long median {r['long_median']:6.2f} s")
    print(f"short-job median latency, one lane / lanes: {ratio(res):.1f}x")
    if not a.no_write:
        write_docs(res, a.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

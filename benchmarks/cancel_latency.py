"""Cancel and deadline latency: how soon a running job ends, and its worker is free, after a cancel.

Starts ``clusca serve`` (a private Redis, one worker, the API) with two models: the built-in
model, and ``crawl``, a no-op model whose steps take 4 s each in 40 blocks (a stand-in for a
large request whose single step takes seconds). For each model, ``--rounds`` times:

* a long job is submitted and, once it runs, cancelled mid-step; the time from the cancel
  request to a record that says ``cancelled`` is measured at the client (polling every 10 ms);
* a short job is then sent synchronously: its latency shows the worker is free at once;
* a job with ``timeout_s`` is submitted and the time from its deadline to a ``failed``
  record is measured.

Each model's step time is measured in the same run (a job of the same shape run to its
end), so the cancel latency is read against it. Raw numbers go to
benchmarks/results/cancel_latency.json; the "Service: cancel and deadlines" section of
docs/benchmarks.md is rendered from that file.

    python benchmarks/cancel_latency.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import socket
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

from benchmarks._docs import DOCS, write_section  # noqa: E402
from benchmarks._results import RESULTS, parsed_and_results  # noqa: E402
from benchmarks._service import wait_until_ready  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402

TOPIC = "service"
START, END = "<!-- cancel_latency:start -->", "<!-- cancel_latency:end -->"
MODELS = """models:
  - name: shapes
    kind: builtin
  - name: crawl
    kind: noop
    options: {step_delay_s: 4.0, blocks: 40}
    defaults: {width: 16, height: 16, steps: 3, guidance: 0, cache: "off", size_multiple: 8}
"""
# A long job of each model (the built-in one: 8 images of 120 steps, cache off, its most
# admitted work), and the short job sent after the cancel.
LONG = {"shapes": {"num_images": 8, "steps": 120, "cache": {"preset": "off"}}, "crawl": {"steps": 3}}
SHORT = {"shapes": {"steps": 10}, "crawl": {"steps": 1}}
STEP_PROBE = {"shapes": {"num_images": 8, "steps": 10, "cache": {"preset": "off"}}, "crawl": {"steps": 1}}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="cancels and deadlines measured per model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    ap.add_argument("--json", default=str(RESULTS / "cancel_latency.json"), help="where the raw results go")
    ap.add_argument("--from-json", help="render the docs from these saved results instead of measuring")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite docs/benchmarks.md")
    return ap.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _poll(c: httpx.Client, job_id: str, until: tuple[str, ...], timeout_s: float = 600) -> tuple[dict, float]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = c.get(f"/jobs/{job_id}").json()
        if job["status"] in until:
            return job, time.monotonic()
        time.sleep(0.01)
    raise RuntimeError(f"job {job_id} not {until} after {timeout_s} s")


def _submit(c: httpx.Client, model: str, **body: Any) -> str:
    r = c.post("/generate", json={"model": model, "prompt": "a red circle on the left", "async": True, **body})
    r.raise_for_status()
    return r.json()["id"]


def measure_model(c: httpx.Client, model: str, rounds: int) -> dict[str, Any]:
    probe, _ = _poll(c, _submit(c, model, **STEP_PROBE[model]), ("succeeded",))
    step_s = probe["timings"]["inference_s"] / probe["steps"]
    out: dict[str, Any] = {"step_s": step_s, "cancel_s": [], "free_s": [], "deadline_late_s": [], "cancel_step": []}
    for k in range(rounds):
        job = _submit(c, model, seed=k, **LONG[model])
        _poll(c, job, ("running",))
        time.sleep(step_s * (1.2 + (0.37 * k) % 0.6))  # somewhere inside the second step, not at its start
        t0 = time.monotonic()
        c.post(f"/jobs/{job}/cancel").raise_for_status()
        rec, t1 = _poll(c, job, ("cancelled", "succeeded", "failed"))
        assert rec["status"] == "cancelled", rec
        out["cancel_s"].append(t1 - t0)
        out["cancel_step"].append(rec["step"])
        t2 = time.monotonic()
        r = c.post("/generate", json={"model": model, "prompt": "a blue square", **SHORT[model]}, timeout=600)
        r.raise_for_status()
        out["free_s"].append(time.monotonic() - t2)
        timeout = max(1.0, 2.5 * step_s)
        job = _submit(c, model, seed=100 + k, timeout_s=timeout, **LONG[model])
        rec, _ = _poll(c, job, ("failed", "succeeded", "cancelled"))
        assert rec["status"] == "failed" and rec["error"].startswith("deadline exceeded"), rec
        out["deadline_late_s"].append(rec["finished_at"] - rec["created_at"] - timeout)
    return out


def measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models.yaml"
        models.write_text(MODELS)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CLUSCA_MODELS": str(models), "CLUSCA_TORCH_THREADS":
               str(args.threads), "CLUSCA_MAX_IMAGES": "8", "CLUSCA_MAX_STEPS": "200", "CLUSCA_LOG_LEVEL": "WARNING"}
        for var in ("REDIS_URL", "CLUSCA_API_KEYS", "PROMETHEUS_MULTIPROC_DIR"):
            env.pop(var, None)
        log = open(Path(tmp) / "serve.log", "wb")
        serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], cwd=ROOT,
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_until_ready(url, 300, poll_s=0.2, request_timeout_s=2,
                                    exited=lambda: "clusca serve exited" if serve.poll() is not None else None):
                raise RuntimeError("clusca serve did not become ready")
            with httpx.Client(base_url=url, timeout=60) as c:
                per_model = {m: measure_model(c, m, args.rounds) for m in ("crawl", "shapes")}
        finally:
            serve.terminate()
            serve.wait(60)
            log.close()
    return {"meta": {"argv": shlex.join(argv), "date": time.strftime("%Y-%m-%d"), "machine": platform.processor()
                     or platform.machine(), "cores": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 1),
                     "threads": args.threads, "rounds": args.rounds},
            "models": per_model}


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.0f} ms"


def headline(res: dict[str, Any]) -> list[Headline]:
    m, crawl, shapes = res["meta"], res["models"]["crawl"], res["models"]["shapes"]
    where, when = cpu(m["machine"], m["cores"], m.get("load_avg")), day(m["date"])
    return [Headline("cancel to a cancelled record, steps of 4 s (no-op model)",
                     f"**{_ms(crawl['cancel_s'])}** median ({statistics.median(crawl['cancel_s']) / crawl['step_s']:.2f}"
                     " of a step); worker free at once", where, when),
            Headline("cancel to a cancelled record, built-in model, 8 images",
                     f"**{_ms(shapes['cancel_s'])}** median, step {shapes['step_s'] * 1000:.0f} ms", where, when)]


def render(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = [START, "## Service: cancel and deadlines", "",
             f"`python benchmarks/cancel_latency.py {m['argv']}` on {m['cores']} CPU core(s), {m['machine']}, "
             f"{m['threads']} torch thread(s) in the worker, {m['date']}; 1-minute load average {m['load_avg']} at "
             f"the end. Medians of {m['rounds']} rounds per model, measured at the HTTP client (which polls every "
             "10 ms). `crawl` is a no-op model whose steps take 4 s in 40 blocks; the built-in model runs a batch "
             "of 8 images of 120 steps, cache off (its most admitted work).", "",
             "| model | step | cancel to `cancelled` | in steps | steps done | next short job | deadline to `failed` |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        lines.append(f"| `{name}` | {r['step_s'] * 1000:.0f} ms | {_ms(r['cancel_s'])} (max "
                     f"{max(r['cancel_s']) * 1000:.0f} ms) | {statistics.median(r['cancel_s']) / r['step_s']:.2f} | "
                     f"{statistics.median(r['cancel_step']):.0f} | {_ms(r['free_s'])} | "
                     f"{_ms(r['deadline_late_s'])} late |")
    lines += ["", "A cancel ends the job within the watcher's 0.2 s poll plus one block: well inside a 4 s step. "
              "The short job sent right after it runs at once, so the worker was free. A deadline lands the same "
              "way, measured from the job's `created_at` plus its `timeout_s` to its `finished_at`.", END]
    return "\n".join(lines)


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    write_section(START, END, render(res), path)


def main(argv: list[str] | None = None) -> int:
    args, res = parsed_and_results(argv, parse_args, measure)
    for name, r in res["models"].items():
        print(f"{name}: step {r['step_s'] * 1000:.0f} ms, cancel {_ms(r['cancel_s'])}, next job {_ms(r['free_s'])}, "
              f"deadline late {_ms(r['deadline_late_s'])}")
    if not args.no_write:
        write_docs(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())

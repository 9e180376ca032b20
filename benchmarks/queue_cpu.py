"""Where a queued job's CPU goes, per process, on two Redis set-ups side by side.

The http-async path of ``benchmarks/queue_throughput.py`` (its stack: one API, one worker,
the no-op model), on two set-ups interleaved for ``--rounds`` rounds. For each round it
reads, per job: the CPU time of the API, the worker and the Redis servers (primaries and
replicas apart; ``/proc``), and the time Redis spent in commands (``INFO commandstats``,
by role). On a machine whose cores the processes share, throughput follows the sum, and
CPU per job moves far less with the load of other work than jobs per second do.

    python benchmarks/queue_cpu.py --compare single:cluster --jobs 2000 --rounds 3

Saves benchmarks/results/queue_cpu-<A>-vs-<B>.json and renders its section of
docs/benchmarks.md from it (``--no-write`` to skip, ``--from-json`` to render again).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, write_section  # noqa: E402
from benchmarks._results import RESULTS, measured_or_loaded  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402
from benchmarks.queue_throughput import Stack, environment, run_http, shared  # noqa: E402

TOPIC = "service"
PARTS = ("api", "worker", "redis_primaries", "redis_replicas")
LABELS = {"api": "API", "worker": "worker", "redis_primaries": "Redis primaries", "redis_replicas": "Redis replicas"}


def _servers(stack: Stack) -> list[Any]:
    return getattr(stack.redis, "nodes", None) or getattr(stack.redis, "servers", None) or [stack.redis]


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """CPU seconds of each part of one stack, and Redis's command time by role, since ``reset``."""

    def __init__(self, stack: Stack):
        import redis

        self.stack = stack
        self.clients = [(s, redis.Redis(port=s.port)) for s in _servers(stack)]

    def _role(self, client: Any) -> str:
        return "redis_primaries" if client.info("replication")["role"] == "master" else "redis_replicas"

    def reset(self) -> None:
        for _, c in self.clients:
            c.config_resetstat()
        self._cpu0 = self.cpu()

    def cpu(self) -> dict[str, float]:
        out = dict.fromkeys(PARTS, 0.0)
        out["worker"] = sum(_cpu(p.pid) for p in self.stack.procs[:-1])
        out["api"] = _cpu(self.stack.procs[-1].pid)
        for server, c in self.clients:
            out[self._role(c)] += _cpu(server.proc.pid)
        return out

    def per_job(self, jobs: int) -> tuple[dict[str, float], dict[str, float]]:
        """(CPU ms per job of each part, Redis command µs per job of each role) since ``reset``."""
        now = self.cpu()
        cpu_ms = {k: (now[k] - self._cpu0[k]) / jobs * 1000 for k in PARTS}
        cmd_us = {"redis_primaries": 0.0, "redis_replicas": 0.0}
        for _, c in self.clients:
            cmd_us[self._role(c)] += sum(v["usec"] for v in c.info("commandstats").values()) / jobs
        return cpu_ms, cmd_us

    def close(self) -> None:
        for _, c in self.clients:
            c.close()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    specs = args.compare.split(":")
    if len(specs) != 2 or not set(specs) <= {"single", "cluster"}:
        raise SystemExit("--compare wants A:B, each single or cluster")
    meta = environment()  # before the stacks start: the load of other work alone
    stacks = {s: Stack(1, args.max_batch, args.batch_wait_ms, s) for s in specs}
    meters = {s: Meter(st) for s, st in stacks.items()}
    rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in specs}
    try:
        for s in specs:
            asyncio.run(run_http(stacks[s], 200, 8, sync=False))  # warm-up
        for k in range(args.rounds):
            for s in (specs if k % 2 == 0 else specs[::-1]):
                meters[s].reset()
                t0 = time.perf_counter()
                asyncio.run(run_http(stacks[s], args.jobs, args.concurrency, sync=False))
                wall = time.perf_counter() - t0
                cpu_ms, cmd_us = meters[s].per_job(args.jobs)
                rounds[s].append({"jobs_per_s": args.jobs / wall, "cpu_ms": cpu_ms, "command_us": cmd_us})
                print(f"round {k + 1} {s:10s} {args.jobs / wall:6.0f} jobs/s, CPU ms per job: "
                      + ", ".join(f"{LABELS[p]} {v:.3f}" for p, v in cpu_ms.items()), flush=True)
    finally:
        for s in specs:
            meters[s].close()
            stacks[s].close()
    return {"compare": args.compare, "meta": meta, "config": {"jobs": args.jobs, "concurrency": args.concurrency,
            "rounds": args.rounds, "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms},
            "rounds": rounds}


def medians(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Median over rounds of jobs/s, of each part's CPU ms per job and of each role's command µs per job."""
    out = {"jobs_per_s": statistics.median(r["jobs_per_s"] for r in rounds)}
    out.update({p: statistics.median(r["cpu_ms"][p] for r in rounds) for p in PARTS})
    out.update({f"cmd_{k}": statistics.median(r["command_us"][k] for r in rounds) for k in rounds[0]["command_us"]})
    out["total"] = sum(out[p] for p in PARTS)
    return out


def markers(compare: str) -> tuple[str, str]:
    a, b = compare.split(":")
    return f"<!-- queue-cpu-{a}-vs-{b}:start -->", f"<!-- queue-cpu-{a}-vs-{b}:end -->"


def render(res: dict[str, Any]) -> str:
    a, b = res["compare"].split(":")
    m, c = res["meta"], res["config"]
    med = {s: medians(res["rounds"][s]) for s in (a, b)}
    start, end = markers(res["compare"])
    body = [start, f"## Service: CPU per job, {a} against {b} Redis", "",
            f"`python benchmarks/queue_cpu.py --compare {res['compare']} --jobs {c['jobs']} --concurrency "
            f"{c['concurrency']} --rounds {c['rounds']}` on {m['cores']} CPU core(s), {m['machine']}: the "
            f"http-async path (no-op model, one API and one worker process, {c['jobs']} jobs a round from "
            f"{c['concurrency']} clients), both set-ups side by side, interleaved, medians over {c['rounds']} rounds. "
            f"CPU time of each process per job (user + system, milliseconds); Redis command time is what "
            f"`INFO commandstats` counts inside the servers (µs per job).{shared(m)}", "",
            "| Redis | jobs/s | API | worker | Redis primaries | Redis replicas | total | Redis commands, "
            "primaries / replicas (µs) |", "|---|---|---|---|---|---|---|---|"]
    for s in (a, b):
        x = med[s]
        body.append(f"| {s} | {x['jobs_per_s']:.0f} | {x['api']:.2f} | {x['worker']:.2f} | {x['redis_primaries']:.2f} "
                    f"| {x['redis_replicas']:.2f} | {x['total']:.2f} | {x['cmd_redis_primaries']:.0f} / "
                    f"{x['cmd_redis_replicas']:.0f} |")
    diff = ", ".join(f"{LABELS[p]} {med[b][p] - med[a][p]:+.2f}" for p in PARTS)
    body += ["", f"{b} against {a}, CPU ms per job: {diff}; in all **x{med[b]['total'] / med[a]['total']:.2f}**.", end]
    return "\n".join(body)


def headline(res: dict[str, Any]) -> list[Headline]:
    """The summary's row: CPU per job on each set-up, and their ratio."""
    a, b = res["compare"].split(":")
    m = res["meta"]
    total = {s: medians(res["rounds"][s])["total"] for s in (a, b)}
    return [Headline(f"CPU per job, {b} against {a} Redis (no-op model, all processes)",
                     f"{total[b]:.2f} against {total[a]:.2f} ms, x{total[b] / total[a]:.2f}",
                     cpu(m["machine"], m["cores"], m.get("load_avg")), day(m["date"]))]


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    write_section(*markers(res["compare"]), render(res), path)


def default_json(compare: str) -> Path:
    a, b = (re.sub(r"[^a-z0-9]+", "-", s) for s in compare.split(":"))
    return RESULTS / f"queue_cpu-{a}-vs-{b}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", default="single:cluster", help="A:B, each single or cluster")
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--no-write", action="store_true", help="do not touch the docs")
    p.add_argument("--json", type=Path, default=None, help="raw results file (default: benchmarks/results/queue_cpu-A-vs-B.json)")
    p.add_argument("--from-json", type=Path, default=None, help="render the docs section from this file; run nothing")
    p.add_argument("--docs", type=Path, default=DOCS)
    args = p.parse_args(argv)
    res = measured_or_loaded(args.from_json, lambda: measure(args), args.json or default_json(args.compare))
    if not args.no_write:
        write_docs(res, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

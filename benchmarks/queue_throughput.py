"""Queue throughput with the no-op model: how many jobs per second the service path sustains.

Starts a private Redis, worker process(es) serving a no-op model (a pipeline-shaped
object that computes nothing) and one API process, then pushes jobs three ways, one after
the other in the same run:

* ``queue``: jobs enqueued straight into Redis (the API's enqueue script), results stored
  by the worker -- the queue path alone;
* ``http-async``: ``POST /generate`` with ``Prefer: respond-async`` from concurrent clients,
  until every job's result is stored;
* ``http-sync``: synchronous ``POST /generate`` from concurrent clients (each waits for
  its image).

Target: >= 200 jobs/s on a 2-core machine. Prints a table, saves the raw results (``--json``,
default benchmarks/results/queue_throughput.json) and renders the "Service: queue throughput"
section of docs/benchmarks.md from them alone (``--no-write`` to skip, ``--docs`` for another
file; ``--from-json`` renders a saved file again without measuring).

    python benchmarks/queue_throughput.py --jobs 2000 --concurrency 32

``--compare A:B`` instead runs the ``http-async`` path on two Redis set-ups side by side,
interleaved for ``--rounds`` rounds, and reports the median of the per-round ratios B/A
(throughput, and the median time to a 202): ``single:cluster`` (one server against a
3-primary, 3-replica Redis Cluster), ``sentinel:sentinel+wait`` (the cost of confirming a
job only once a replica has it, ``CLUSCA_REDIS_WAIT_REPLICAS=1``). Each comparison owns
its own section of docs/benchmarks.md and its own results file
(``queue_throughput-single-vs-cluster.json``).

    python benchmarks/queue_throughput.py --compare single:cluster --jobs 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._docs import DOCS, write_section  # noqa: E402
from benchmarks._results import RESULTS, load, save  # noqa: E402
from benchmarks._service import stop_all, wait_until_ready  # noqa: E402
from benchmarks._summary import Headline, cpu, day  # noqa: E402

from service.broker import connect as redis_conn  # noqa: E402
from service.contract import JobRequest  # noqa: E402
from service.broker.embedded import EmbeddedCluster, EmbeddedRedis, EmbeddedSentinel, free_port  # noqa: E402
from service.broker.producer import JobQueue  # noqa: E402
from service.broker.keys import job_key, stream_key

START, END = "<!-- service-throughput:start -->", "<!-- service-throughput:end -->"
TOPIC = "service"
MODELS = """models:
  - name: noop
    kind: noop
    defaults: {width: 8, height: 8, steps: 1, guidance: 0, cache: "off", size_multiple: 8}
"""
JOB = {"prompt": "p", "negative_prompt": None, "width": 8, "height": 8, "steps": 1, "guidance": 0.0, "seed": 0,
       "num_images": 1, "output_format": "png", "cache": {"mode": "off"}, "webhook_url": None}


class Stack:
    """Redis + workers + API as separate processes, like a deployment on one host."""

    def __init__(self, workers: int, max_batch: int, batch_wait_ms: float, redis_spec: str = "single"):
        self.tmp = Path(tempfile.mkdtemp(prefix="clusca-bench-"))
        (self.tmp / "models.yaml").write_text(MODELS)
        kind, _, option = redis_spec.partition("+")
        self.redis = {"single": EmbeddedRedis, "cluster": lambda: EmbeddedCluster(3, 1),
                      "sentinel": EmbeddedSentinel}[kind]().start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "REDIS_URL": self.redis.url, "CLUSCA_MODELS": str(self.tmp / "models.yaml"),
                    "CLUSCA_DEFAULT_MODEL": "noop", "CLUSCA_MAX_BATCH": str(max_batch),
                    "CLUSCA_BATCH_WAIT_MS": str(batch_wait_ms), "CLUSCA_MAX_QUEUE": "1000000",
                    "CLUSCA_WORKER_METRICS_PORT": "0", "CLUSCA_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT),
                    "CLUSCA_REDIS_WAIT_REPLICAS": "1" if option == "wait" else "0"}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.procs = [subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=self.env, cwd=ROOT)
                      for _ in range(workers)]
        self.procs.append(subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--port", str(self.port)],
                                           env=self.env, cwd=ROOT))
        if wait_until_ready(self.url, 60, poll_s=0.1, request_timeout_s=1):
            return
        self.close()
        raise RuntimeError("the service did not become ready")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each server process (user + system)."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        servers = getattr(self.redis, "nodes", None) or getattr(self.redis, "servers", None) or [self.redis]
        named = [("redis", n.proc.pid) for n in servers]
        named += [(f"worker{i}", p.pid) for i, p in enumerate(self.procs[:-1])] + [("api", self.procs[-1].pid)]
        for name, pid in named:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        return out

    def close(self) -> None:
        stop_all(self.procs, self.redis)


def wait_done(redis_url: str, ids: list[str], timeout: float = 300) -> None:
    """Wait until the stream is empty (finished entries are deleted), then check every job once."""
    r = redis_conn.sync_client(redis_url)
    deadline = time.monotonic() + timeout
    while r.xlen(stream_key("noop")):
        if time.monotonic() > deadline:
            raise RuntimeError("jobs not finished in time")
        time.sleep(0.002)
    pipe = r.pipeline(transaction=False)
    for j in ids:
        pipe.hget(job_key(j), "status")
    statuses = pipe.execute()
    bad = sum(s != b"succeeded" for s in statuses)
    if bad:
        raise RuntimeError(f"{bad} of {len(ids)} jobs did not succeed")


async def run_queue(stack: Stack, n: int, concurrency: int) -> float:
    r = redis_conn.async_client(stack.redis.url, max_connections=concurrency + 4)
    q = JobQueue(r, max_queue=10**9, ttl_s=600)
    ids: list[str] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            job_id, _ = await q.enqueue("noop", JobRequest.from_dict({**JOB, "seed": i}))
            ids.append(job_id)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    await asyncio.to_thread(wait_done, stack.redis.url, ids)
    elapsed = time.perf_counter() - t0
    await r.aclose()
    return elapsed


class RawClient:
    """A minimal keep-alive HTTP/1.1 client: the load generator must not eat the CPU it measures."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n{head}\r\n".encode() + data)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run_http(stack: Stack, n: int, concurrency: int, sync: bool, latencies: list[float] | None = None) -> float:
    ids: list[str] = []
    counter = iter(range(n))
    headers = {} if sync else {"Prefer": "respond-async"}

    async def client() -> None:
        c = RawClient(stack.port)
        try:
            for i in counter:
                t = time.perf_counter()
                status, body = await c.post("/generate", {"prompt": "p", "seed": i}, headers)
                if latencies is not None:
                    latencies.append(time.perf_counter() - t)
                if status != (200 if sync else 202):
                    raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
                ids.append(json.loads(body)["id"])
        finally:
            c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    submitted = time.perf_counter() - t0
    await asyncio.to_thread(wait_done, stack.redis.url, ids)
    elapsed = time.perf_counter() - t0
    print(f"  (all {n} requests answered after {submitted:.2f} s)", flush=True)
    return elapsed


def environment() -> dict[str, Any]:
    """The machine a run measured on, as its section states it."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(),
            "load_avg": round(os.getloadavg()[0], 2)}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"jobs": args.jobs, "concurrency": args.concurrency, "workers": args.workers, "max_batch": args.max_batch,
            "batch_wait_ms": args.batch_wait_ms}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every path of ``--paths`` on one stack: seconds for the jobs, each server's share of a core."""
    meta = environment()  # before the stack starts: the load of other work alone
    stack = Stack(args.workers, args.max_batch, args.batch_wait_ms)
    rows = []
    try:
        asyncio.run(run_http(stack, 100, 8, sync=True))  # warm-up: connections, scripts, imports
        for path in args.paths.split(","):
            cpu0, wall0 = stack.cpu_seconds(), time.perf_counter()
            if path == "queue":
                secs = asyncio.run(run_queue(stack, args.jobs, args.concurrency))
            elif path in ("http-async", "http-sync"):
                secs = asyncio.run(run_http(stack, args.jobs, args.concurrency, sync=path == "http-sync"))
            else:
                raise SystemExit(f"unknown path {path!r}")
            wall = time.perf_counter() - wall0
            share = {k: (v - cpu0[k]) / wall for k, v in stack.cpu_seconds().items()}
            rows.append({"path": path, "jobs": args.jobs, "seconds": secs, "cpu_share": share})
            print(f"{path:11s} {args.jobs} jobs in {secs:6.2f} s = {args.jobs / secs:7.1f} jobs/s   CPU share: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in share.items()), flush=True)
    finally:
        stack.close()
    return {"mode": "plain", "meta": meta, "config": settings(args), "rows": rows}


def shared(meta: dict[str, Any]) -> str:
    """What else ran on the cores: at a load above their count the rates are lower bounds."""
    load_avg = meta.get("load_avg")
    if load_avg is None or load_avg <= meta["cores"]:
        return ""
    return (f" Other work shared the cores too (1-minute load average {load_avg:.1f} on {meta['cores']} cores when "
            "the run began), so these rates are lower bounds for an idle machine.")


def targets_met(res: dict[str, Any]) -> bool:
    return all(row["jobs"] / row["seconds"] >= 200 for row in res["rows"])


def render_throughput(res: dict[str, Any]) -> str:
    c, m = res["config"], res["meta"]
    body = [START, "## Service: queue throughput (no-op model)", "",
            f"`python benchmarks/queue_throughput.py --jobs {c['jobs']} --concurrency {c['concurrency']} "
            f"--workers {c['workers']} --max-batch {c['max_batch']}` on {m['cores']} CPU core(s), "
            f"{m['machine']}, Python {m['python']}. Redis, the API process, "
            f"{c['workers']} worker process(es) and the load generator all share these cores.{shared(m)}", "",
            "| path | jobs | seconds | jobs/s | target |", "|---|---|---|---|---|"]
    for row in res["rows"]:
        rate = row["jobs"] / row["seconds"]
        body.append(f"| {row['path']} | {row['jobs']} | {row['seconds']:.2f} | {rate:.0f} | "
                    f">= 200 {'met' if rate >= 200 else 'MISSED'} |")
    body.append(END)
    return "\n".join(body)


def measure_compare(args: argparse.Namespace) -> dict[str, Any]:
    """The http-async path on two Redis set-ups, interleaved: jobs/s and the median time to a 202, per round."""
    specs = args.compare.split(":")
    if len(specs) != 2:
        raise SystemExit("--compare wants A:B")
    meta = environment()
    stacks = {s: Stack(args.workers, args.max_batch, args.batch_wait_ms, s) for s in specs}
    rates: dict[str, list[float]] = {s: [] for s in specs}
    lat: dict[str, list[float]] = {s: [] for s in specs}
    try:
        for s in specs:
            asyncio.run(run_http(stacks[s], 100, 8, sync=True))  # warm-up
        for k in range(args.rounds):
            for s in (specs if k % 2 == 0 else specs[::-1]):
                latencies: list[float] = []
                secs = asyncio.run(run_http(stacks[s], args.jobs, args.concurrency, sync=False, latencies=latencies))
                rates[s].append(args.jobs / secs)
                lat[s].append(statistics.median(latencies))
                print(f"round {k + 1} {s:15s} {args.jobs / secs:7.1f} jobs/s, median 202 in "
                      f"{lat[s][-1] * 1000:.2f} ms", flush=True)
    finally:
        for st in stacks.values():
            st.close()
    return {"mode": "compare", "compare": args.compare, "meta": meta,
            "config": {**settings(args), "rounds": args.rounds}, "rates": rates, "latency_s": lat}


def compare_ratios(res: dict[str, Any]) -> tuple[float, float]:
    """Medians of the per-round ratios B/A: throughput, and time to a 202."""
    a, b = res["compare"].split(":")
    rates, lat = res["rates"], res["latency_s"]
    return (statistics.median(rb / ra for ra, rb in zip(rates[a], rates[b])),
            statistics.median(lb / la for la, lb in zip(lat[a], lat[b])))


def compare_markers(compare: str) -> tuple[str, str]:
    a, b = compare.split(":")
    return f"<!-- queue-redis-{a}-vs-{b}:start -->", f"<!-- queue-redis-{a}-vs-{b}:end -->"


def render_compare(res: dict[str, Any]) -> str:
    c, m = res["config"], res["meta"]
    specs = res["compare"].split(":")
    a, b = specs
    ratio, lat_ratio = compare_ratios(res)
    start, end = compare_markers(res["compare"])
    body = [start, f"## Service: queue throughput, {a} against {b} Redis", "",
            f"`python benchmarks/queue_throughput.py --compare {res['compare']} --jobs {c['jobs']} --concurrency "
            f"{c['concurrency']} --rounds {c['rounds']}` on {m['cores']} CPU core(s), {m['machine']}: "
            "the http-async path (no-op model), both set-ups side by side in one run, interleaved. "
            f"Every Redis server, the API, the worker and the load generator share these cores.{shared(m)}", "",
            "| Redis | jobs/s (median) | per round | median time to 202 (ms) |", "|---|---|---|---|"]
    for s in specs:
        rates = res["rates"][s]
        body.append(f"| {s} | {statistics.median(rates):.0f} | {', '.join(f'{x:.0f}' for x in rates)} | "
                    f"{statistics.median(res['latency_s'][s]) * 1000:.2f} |")
    body += ["", f"{b} / {a}: throughput **x{ratio:.2f}**, time to 202 **x{lat_ratio:.2f}** (medians of the "
             "per-round ratios).", end]
    return "\n".join(body)


def headline(res: dict[str, Any]) -> list[Headline]:
    """The summary's row: jobs/s per path of a plain run, or a comparison's ratios."""
    m = res["meta"]
    on, date = cpu(m["machine"], m["cores"], m.get("load_avg")), day(m["date"])
    if res["mode"] == "compare":
        a, b = res["compare"].split(":")
        ratio, lat_ratio = compare_ratios(res)
        return [Headline(f"queue throughput, {b} against {a} Redis (no-op model, http-async)",
                         f"throughput x{ratio:.2f}, time to 202 x{lat_ratio:.2f}", on, date)]
    paths = [row["path"] for row in res["rows"]]
    return [Headline(f"queue throughput, no-op model, jobs/s ({' / '.join(paths)})",
                     " / ".join(f"**{row['jobs'] / row['seconds']:.0f}**" for row in res["rows"]) + " (target >= 200)",
                     on, date)]


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    """Rewrite the section this run owns: the plain run's, or its comparison's."""
    if res["mode"] == "compare":
        write_section(*compare_markers(res["compare"]), render_compare(res), path)
    else:
        write_section(START, END, render_throughput(res), path)


def default_json(res: dict[str, Any]) -> Path:
    if res["mode"] != "compare":
        return RESULTS / "queue_throughput.json"
    a, b = (re.sub(r"[^a-z0-9]+", "-", s) for s in res["compare"].split(":"))
    return RESULTS / f"queue_throughput-{a}-vs-{b}.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--paths", default="queue,http-async,http-sync")
    p.add_argument("--no-write", action="store_true", help="do not touch the docs")
    p.add_argument("--compare", help="A:B, each single, cluster or sentinel, optionally +wait")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None,
                   help="raw results file (default: benchmarks/results/queue_throughput[-A-vs-B].json)")
    p.add_argument("--from-json", type=Path, default=None, help="render the docs section from this file; run nothing")
    p.add_argument("--docs", type=Path, default=DOCS, help="the file whose section is rewritten")
    args = p.parse_args(argv)
    if args.from_json:
        res = load(args.from_json)
    else:
        res = measure_compare(args) if args.compare else measure(args)
        print(f"wrote {save(res, args.json or default_json(res))}")
    if res["mode"] == "compare":
        ratio, lat_ratio = compare_ratios(res)
        a, b = res["compare"].split(":")
        print(f"{b} / {a}: throughput x{ratio:.2f}, time to 202 x{lat_ratio:.2f} "
              f"(medians of {res['config']['rounds']} rounds)")
    if not args.no_write:
        write_docs(res, args.docs)
    return 0 if res["mode"] == "compare" or targets_met(res) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Prometheus metrics (names and labels are a contract: see docs/architecture.md).

Counters and histograms are recorded where things happen: the API counts requests and
rejected inputs, workers time their runs. Values that describe the shared queue (depth,
running jobs, live workers) are not counted by any process: the API reads them from
Redis at scrape time, so every API replica reports the same truth.

Several processes on one host (``clusca serve``, or an API with several uvicorn
workers) share ``PROMETHEUS_MULTIPROC_DIR``; the API's ``/metrics`` then aggregates
every process's files. prometheus-client picks its storage when first imported, so the
variable must be set before the process starts (``clusca serve`` does that).
"""

from __future__ import annotations

import os
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
FRACTION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
SPEEDUP_BUCKETS = (1.0, 1.25, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 8, 10)

REQUEST_LATENCY = Histogram("clusca_request_latency_seconds", "Job latency from enqueue to stored result",
                            ["model", "cache_mode"], buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("clusca_queue_wait_seconds", "Time a job waited before a worker started it",
                       ["model"], buckets=LATENCY_BUCKETS)
INFERENCE = Histogram("clusca_inference_seconds", "Pipeline call time per batch",
                      ["model", "cache_mode"], buckets=LATENCY_BUCKETS)
STEP = Histogram("clusca_step_seconds", "Time per denoising step", ["model", "cache_mode"], buckets=STEP_BUCKETS)
REQUESTS = Counter("clusca_requests_total", "HTTP requests by route and status", ["endpoint", "status"])
IMAGES = Counter("clusca_images_generated_total", "Images stored", ["model", "cache_mode"])
FRAMES = Counter("clusca_frames_generated_total", "Video frames stored", ["model", "cache_mode"])
FRAME_SECONDS = Histogram("clusca_seconds_per_frame", "Pipeline call time per video frame of a job's batch",
                          ["model", "cache_mode"], buckets=STEP_BUCKETS)
ERRORS = Counter("clusca_errors_total", "Errors by kind", ["kind"])
# Why a running job left its call before the call ended (the reason label of JOBS_STOPPED).
STOP_REASONS = ("cancelled", "deadline")
JOBS_STOPPED = Counter("clusca_jobs_stopped_total", "Running jobs ended before their call did: cancelled by the "
                       "client, or past their deadline", ["model", "reason"])
JOBS_LOST = Counter("clusca_jobs_lost_total", "Jobs confirmed to a client that Redis later lacked (a failover "
                    "before replication)", ["model"])
TOKEN_FRACTION = Histogram("clusca_token_fraction", "Fraction of tokens computed per run (1 = uncached)",
                           ["model", "cache_mode"], buckets=FRACTION_BUCKETS)
FLOPS_SPEEDUP = Histogram("clusca_flops_speedup", "Analytic FLOPs speedup of a run over uncached",
                          ["model", "cache_mode"], buckets=SPEEDUP_BUCKETS)
GRAPH_REPLAYS = Counter("clusca_graph_replays_total", "Cached transformer calls replayed from a recorded CUDA graph "
                        "(ClusCa capture=auto)", ["model", "cache_mode"])
GUARD_TRIPS = Counter("clusca_cache_guard_trips_total", "Steps due to be cached at which ClusCa's divergence guard "
                      "computed one or more samples in full", ["model", "cache_mode"])
COLLECTIVE_STEP = Histogram("clusca_parallel_collective_seconds_per_step", "Time a context-parallel group's "
                            "rank 0 spent in collectives (all-to-all, gather) per denoising step of a call",
                            ["model"], buckets=STEP_BUCKETS)
PARALLEL_DEGREE = Gauge("clusca_parallel_degree", "Ranks that split each call of a model (ulysses x ring)",
                        ["model"], multiprocess_mode="max")
GROUP_RESTARTS = Counter("clusca_parallel_group_restarts_total", "Context-parallel worker groups restarted "
                         "because a rank died or a collective timed out", ["model"])
ADAPTER_LOAD = Histogram("clusca_adapter_load_seconds", "Time to load one LoRA adapter into a slot of the "
                         "model's adapter bank (read and copy; a loaded adapter costs nothing)", ["model"],
                         buckets=LATENCY_BUCKETS)
ADAPTERS_LOADED = Gauge("clusca_adapters_loaded", "LoRA adapters loaded in a worker's adapter slots",
                        ["model", "worker"], multiprocess_mode="max")
ADAPTER_REQUESTS = Counter("clusca_adapter_requests_total", "Jobs queued per LoRA adapter (a model's first "
                           "20 adapter names get a label each; later ones count as 'other')",
                           ["model", "adapter"])
HEARTBEAT = Gauge("clusca_worker_heartbeat_timestamp_seconds", "Last heartbeat of a worker (unix time)",
                  ["worker"], multiprocess_mode="max")


# Distinct adapter labels per model and process: adapters are added at run time, and a label per name
# would grow the series without bound.
ADAPTER_LABELS = 20
_adapter_labels: dict[str, set[str]] = {}


def adapter_requests(model: str, adapter: str) -> Counter:
    """The request counter of ``adapter``: its own series among the model's first
    :data:`ADAPTER_LABELS` names, else the model's ``other``."""
    seen = _adapter_labels.setdefault(model, set())
    if adapter not in seen and len(seen) < ADAPTER_LABELS:
        seen.add(adapter)
    return ADAPTER_REQUESTS.labels(model, adapter if adapter in seen else "other")


def multiprocess_dir() -> str | None:
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return d if d and os.path.isdir(d) else None


def process_metrics() -> bytes:
    """This host's metrics: every process's when multi-process mode is on, else this one's."""
    d = multiprocess_dir()
    if d:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=d)
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)


class _QueueGauges:
    def __init__(self, values: dict[str, dict[str, int]]):
        self.values = values

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, help_text in (("clusca_queue_depth", "Jobs waiting per model"),
                                ("clusca_running_jobs", "Jobs delivered to a worker and not finished"),
                                ("clusca_workers_alive", "Workers with a recent heartbeat per model")):
            fam = GaugeMetricFamily(name, help_text, labels=["model"])
            for model, v in self.values.get(name, {}).items():
                fam.add_metric([model], v)
            yield fam


def queue_metrics(values: dict[str, dict[str, int]]) -> bytes:
    """Render the Redis-derived gauges: ``{"clusca_queue_depth": {model: n}, ...}``."""
    registry = CollectorRegistry()
    registry.register(_QueueGauges(values))
    return generate_latest(registry)


def clear_process_files(pid: int) -> None:
    """Forget a finished process's live gauges (multi-process mode)."""
    d = multiprocess_dir()
    if d:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, d)

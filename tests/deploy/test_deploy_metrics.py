"""The dashboard and alert rules read metrics the running service really exports.

Starts the API and a worker (the shared ``service`` fixture), makes a good and a bad
request, scrapes both ``/metrics`` endpoints the way Prometheus does (API job +
worker job) and checks every series and label the dashboard and the alerts use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import wait_until
from tests.deploy.test_deploy import PROMETHEUS_SERIES, alert_exprs, dashboard_exprs, promql_uses


def _samples(text: str) -> dict[str, set[str]]:
    """``{sample name: label names seen on it}`` from a Prometheus text exposition."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def _missing(scraped: dict[str, set[str]]) -> list[str]:
    problems = []
    for expr in dashboard_exprs() + alert_exprs():
        for series, labels in promql_uses(expr):
            if series in PROMETHEUS_SERIES:
                continue
            if series not in scraped:
                problems.append(f"{series} (used by {expr.splitlines()[0]!r}) is not exported")
            else:
                problems += [f"{series} has no label {label!r}" for label in sorted(labels - scraped[series])]
    return sorted(set(problems))


def test_every_metric_the_dashboard_and_alerts_use_is_exported(service):
    with service.client() as c:
        ok = c.post("/generate", json={"prompt": "a metric for every panel", "seed": 3})
        assert ok.status_code == 200, ok.text
        video = c.post("/generate", json={"model": "noopvideo", "prompt": "frames for the video panels", "seed": 3})
        assert video.status_code == 200, video.text
        bad = c.post("/generate", json={"prompt": "too many steps", "steps": 100000})
        assert bad.status_code == 422, bad.text

    def scrape() -> dict[str, set[str]]:
        merged: dict[str, set[str]] = {}
        for url in (service.base_url + "/metrics", service.worker_metrics_url):
            resp = httpx.get(url, timeout=10)
            assert resp.status_code == 200, url
            for name, labels in _samples(resp.text).items():
                merged.setdefault(name, set()).update(labels)
        return merged

    # The worker records a job's histograms just after storing its result, which is
    # what wakes the synchronous request; give it a moment.
    problems: list[str] = []

    def complete() -> bool:
        problems[:] = _missing(scrape())
        return not problems

    try:
        wait_until(complete, timeout=15, interval=0.2, what="every dashboard/alert metric on /metrics")
    except AssertionError:
        pytest.fail("\n".join(problems))

def test_the_check_notices_a_missing_metric():
    # Without the worker's histograms the queue wait alert and latency panels are blind.
    api_only = {"clusca_requests_total": {"endpoint", "status"}, "clusca_queue_depth": {"model"}}
    problems = _missing(api_only)
    assert any("clusca_queue_wait_seconds_bucket" in p for p in problems)
    assert any("clusca_workers_alive" in p for p in problems)
    assert _missing({**api_only, "clusca_queue_depth": set()})  # label gone


# ---------------------------------------------------------------------------- container entry chain
DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _probe(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), *argv], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})})


def test_health_probe_passes_against_the_real_api_and_worker(service):
    api_port = service.base_url.rsplit(":", 1)[1]
    worker_port = service.worker_metrics_url.split(":")[2].split("/")[0]
    assert _probe("tini", "--", "clusca", "api", "--host", "0.0.0.0", "--port", api_port).returncode == 0
    assert _probe("tini", "--", "clusca-claim-gpu", "--", "clusca", "worker",
                  env={"CLUSCA_WORKER_METRICS_PORT": worker_port}).returncode == 0


def test_worker_behind_the_gpu_claim_serves_and_stops_gracefully(service, tmp_path):
    """The compose worker's exact chain: clusca-claim-gpu execs `clusca worker`, which then
    serves jobs, exports metrics, and on SIGTERM exits cleanly and frees its GPU claim."""
    from service.broker.embedded import free_port

    port = free_port()
    env = {**service.env, "CLUSCA_WORKER_METRICS_PORT": str(port)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, str(DOCKER / "claim_gpu.py"), "--lock-dir", str(tmp_path), "--count",
                             "1", "--", sys.executable, "-m", "service.cli", "worker", "--models", "batch"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
    try:
        wait_until(lambda: proc.poll() is not None or _probe(
            "clusca", "worker", env={"CLUSCA_WORKER_METRICS_PORT": str(port)}).returncode == 0,
            timeout=60, what="worker metrics behind the GPU claim")
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()
        with service.client() as c:
            r = c.post("/generate", json={"prompt": "through the wrapper", "model": "batch", "seed": 1})
        assert r.status_code == 200, r.text

        def served_here() -> bool:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            return any(s.name == "clusca_images_generated_total" and s.labels.get("model") == "batch" and s.value >= 1
                       for f in text_string_to_metric_families(text) for s in f.samples)

        wait_until(served_here, timeout=10, what="the wrapped worker to count the image")
        # exec kept the PID, so the signal reaches the worker itself.
        assert service.stop(proc, timeout=30) == 0, (tmp_path / "worker.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    claimed = subprocess.run([sys.executable, str(DOCKER / "claim_gpu.py"), "--lock-dir", str(tmp_path), "--count",
                              "1", "--wait-s", "0", "--", sys.executable, "-c",
                              "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"],
                             capture_output=True, text=True, timeout=30)
    assert claimed.stdout.strip() == "0", claimed.stderr

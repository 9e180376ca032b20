"""The dashboard and alert rules read metrics the running service really exports.

Starts the API and a worker (the shared ``service`` fixture), makes a good and a bad
request, scrapes both ``/metrics`` endpoints the way Prometheus does (API job +
worker job) and checks every series and label the dashboard and the alerts use.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from test_deploy import PROMETHEUS_SERIES, alert_exprs, dashboard_exprs, promql_uses


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

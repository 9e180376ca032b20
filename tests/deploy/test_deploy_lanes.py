"""Deployment files know the long lane: KEDA scales on it, Compose can run a short-lane worker."""

from __future__ import annotations

from service.broker.keys import stream_key
from service.broker.lanes import LONG
from tests.deploy.test_deploy import _compose_config, _k8s_docs


def test_k8s_autoscaler_has_a_trigger_for_each_lane():
    (scaled,) = [d for d in _k8s_docs() if d["kind"] == "ScaledObject"]
    streams = [t["metadata"]["stream"] for t in scaled["spec"]["triggers"]]
    assert streams == [stream_key("shapes"), stream_key("shapes", LONG)]


def test_compose_lanes_profile_adds_a_short_lane_gpu_worker():
    svc = _compose_config("--profile", "lanes")["services"]
    short = svc["worker-short"]
    assert short["environment"]["CLUSCA_WORKER_LANES"] == "short"
    assert short["command"] == svc["worker"]["command"] and short["entrypoint"] == svc["worker"]["entrypoint"]
    assert short["deploy"] == svc["worker"]["deploy"]
    assert "worker" in short["networks"]["default"]["aliases"]  # scraped like every worker
    assert "CLUSCA_WORKER_LANES" not in svc["worker"]["environment"]
    assert short["profiles"] == ["lanes"]  # started only with the profile

"""The Kubernetes variant with Redis behind Sentinel (deploy/k8s-sentinel), checked as files.

kubectl is not needed: the overlay's parts are parsed and checked against the base and
the service's contracts (REDIS_URL parses, the master name agrees, pods have probes).
"""

from __future__ import annotations

from pathlib import Path

import shutil
import subprocess

import pytest
import yaml

from service.broker import connect as redis_conn
from service.settings import ENV_NAMES

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s"
OVERLAY = ROOT / "deploy" / "k8s-sentinel"


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization() -> dict:
    return yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())


def test_overlay_builds_on_the_base_and_every_file_is_used():
    k = _kustomization()
    assert "../k8s" in k["resources"] and k["namespace"] == yaml.safe_load((BASE / "kustomization.yaml").read_text())[
        "namespace"]
    used = {r for r in k["resources"] if r != "../k8s"} | {p["path"] for p in k["patches"]} | {"kustomization.yaml"}
    assert used == {p.name for p in OVERLAY.glob("*.yaml")}


def test_the_single_redis_is_dropped_and_nothing_else():
    base = {(d["kind"], d["metadata"]["name"]) for name in yaml.safe_load((BASE / "kustomization.yaml").read_text())[
        "resources"] for d in _load(BASE / name)}
    dropped = {(d["kind"], d["metadata"]["name"]) for f in OVERLAY.glob("drop-*.yaml") for d in _load(f)
               if d.get("$patch") == "delete"}
    assert dropped == {("StatefulSet", "redis"), ("Service", "redis")} and dropped <= base


def test_redis_url_names_the_sentinels_and_the_monitored_master():
    (patch,) = _load(OVERLAY / "redis-url.yaml")
    data = patch["data"]
    assert set(data) <= set(ENV_NAMES.values())
    target = redis_conn.parse(data["REDIS_URL"])
    assert target.mode == "sentinel"
    docs = _load(OVERLAY / "redis-sentinel.yaml")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    host, port = target.nodes[0]
    assert host in services and port in {p["port"] for p in services[host]["spec"]["ports"]}
    scripts = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert f"sentinel monitor {target.master} " in scripts["sentinel.sh"]
    assert f"get-master-addr-by-name {target.master}" in scripts["redis.sh"]
    assert int(data["CLUSCA_REDIS_WAIT_REPLICAS"]) >= 1


def test_redis_pods_have_probes_resources_and_their_services_select_them():
    docs = _load(OVERLAY / "redis-sentinel.yaml")
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["replicas"] >= 3 and sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = sts["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    ports = set()
    for c in spec["containers"]:
        assert c.get("readinessProbe") and c.get("livenessProbe") and c["resources"]["requests"], c["name"]
        assert c["resources"]["limits"]["memory"], c["name"]
        ports |= {p["name"] for p in c["ports"]}
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    mounted = {v["name"] for c in spec["containers"] for v in c["volumeMounts"]}
    declared = {v["name"] for v in spec["volumes"]} | {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert mounted <= declared


def test_autoscaler_patch_points_keda_at_the_sentinels():
    (scaled,) = [d for d in _load(BASE / "worker-autoscaler.yaml") if d["kind"] == "ScaledObject"]
    ops = yaml.safe_load((OVERLAY / "autoscaler-sentinel.yaml").read_text())
    triggers = scaled["spec"]["triggers"]
    for op in ops:
        index, *parent, leaf = op["path"].strip("/").split("/")[2:]
        assert op["path"].startswith("/spec/triggers/") and int(index) < len(triggers), op
        trigger = triggers[int(index)]
        assert op["op"] == "add" or leaf in (trigger if not parent else trigger[parent[0]]), op
    values = {op["path"]: op["value"] for op in ops}
    master = redis_conn.parse(_load(OVERLAY / "redis-url.yaml")[0]["data"]["REDIS_URL"]).master
    for i in range(len(triggers)):  # every trigger (each lane's stream) asks the Sentinels
        assert values[f"/spec/triggers/{i}/type"] == "redis-sentinel-streams"
        assert values[f"/spec/triggers/{i}/metadata/sentinelMaster"] == master


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_variant():
    out = subprocess.run(["kubectl", "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("StatefulSet", "redis") not in names and ("Service", "redis") not in names
    assert {("StatefulSet", "redis-node"), ("Service", "redis-sentinel"), ("Deployment", "clusca-api"),
            ("Deployment", "clusca-worker")} <= names
    assert all(d["metadata"].get("namespace") == "clusca" for d in docs if d["kind"] != "Namespace")
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "clusca-config")
    assert redis_conn.parse(config["data"]["REDIS_URL"]).mode == "sentinel"
    assert config["data"]["CLUSCA_DEFAULT_MODEL"]  # the base's settings are kept
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    assert {t["type"] for t in scaled["spec"]["triggers"]} == {"redis-sentinel-streams"}

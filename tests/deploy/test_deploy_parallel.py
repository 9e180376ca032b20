"""Deployment of a context-parallel worker: the Compose profile that gives one worker several GPUs
and the Kubernetes overlay with a multi-GPU worker pod, each consistent with its registry entry."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "k8s-parallel"


def test_compose_parallel_profile_gives_one_worker_several_gpus():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    worker = services["worker-parallel"]
    assert worker["profiles"] == ["parallel"]
    assert worker["command"][:3] == ["clusca", "worker", "--models"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"].startswith("${CLUSCA_PARALLEL_GPUS")
    assert worker["environment"]["CLUSCA_DEVICE"] == "cuda" and worker["shm_size"]


def test_k8s_overlay_pod_holds_as_many_gpus_as_its_model_has_ranks(tmp_path):
    listed = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert "../k8s" in listed["resources"] and "worker-parallel.yaml" in listed["resources"]
    registry_map = yaml.safe_load((OVERLAY / "registry-parallel.yaml").read_text())
    models = tmp_path / "models.yaml"
    models.write_text(registry_map["data"]["models.yaml"])
    registry = Registry.load(models)
    (deployment,) = [d for d in yaml.safe_load_all((OVERLAY / "worker-parallel.yaml").read_text())
                     if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    model = container["args"][container["args"].index("--models") + 1]
    entry = registry.get(model)
    assert entry is not None and entry.parallel.world > 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == entry.parallel.world
    assert container["readinessProbe"] and container["livenessProbe"]
    # The base's one-GPU worker still serves the rest: it skips the group's model (a worker of its own).
    assert "shapes" in registry

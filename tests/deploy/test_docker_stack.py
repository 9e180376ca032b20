"""The Docker deployment for real: image build, compose stack, container faults.

The slow test runs docker/stack_test.py (what `make docker-test` runs): a private Docker
engine, stand-in bases from Debian's packages, the CPU image built from docker/Dockerfile
and the compose stack on the host network, with a worker killed mid-job, Redis restarted
under load and the API restarted. Where no engine can run it is skipped with the reason.
The fast tests check the host-network override without an engine (docker-compose config).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docker" / "stack_test.py"


def _harness():
    spec = importlib.util.spec_from_file_location("clusca_stack_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _hostnet_config(tmp_path: Path) -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; .ci/run installs it)")
    h = _harness()
    base = h.render_base(tmp_path / "base.yml")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CLUSCA_REDIS_PORT": "16379", "CLUSCA_API_PORT": "18000",
           "CLUSCA_WORKER_METRICS_PORT": "19101", "CLUSCA_PROMETHEUS_PORT": "19090",
           "CLUSCA_PROMETHEUS_CONFIG": str(tmp_path / "prometheus.yml")}
    res = subprocess.run(["docker-compose", "-f", str(base), "-f", str(h.HOSTNET), "--profile", "cpu", "config"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def test_hostnet_override_puts_every_container_on_loopback(tmp_path):
    svc = _hostnet_config(tmp_path)["services"]
    assert {"redis", "api", "worker-cpu", "prometheus"} <= set(svc)
    for name, s in svc.items():
        assert s.get("network_mode") == "host", name
        assert "networks" not in s and "ports" not in s, name
    assert svc["redis"]["command"][:5] == ["redis-server", "--bind", "127.0.0.1", "--port", "16379"]
    assert "--appendonly" in svc["redis"]["command"]
    assert "16379" in svc["redis"]["healthcheck"]["test"]
    assert svc["api"]["command"] == ["clusca", "api", "--host", "127.0.0.1", "--port", "18000"]
    for name in ("api", "worker-cpu"):
        env = svc[name]["environment"]
        assert env["REDIS_URL"] == "redis://127.0.0.1:16379/0", name
        assert env["CLUSCA_WORKER_METRICS_PORT"] == "19101", name
    assert "--web.listen-address=127.0.0.1:19090" in svc["prometheus"]["command"]
    assert any("19090" in part for part in svc["prometheus"]["healthcheck"]["test"])
    # The GPU worker and Grafana (no Debian package) need their own profiles there.
    assert svc["worker-cpu"]["restart"] == "unless-stopped"


def test_hostnet_override_leaves_gpu_worker_and_grafana_out_of_the_cpu_profile(tmp_path):
    h = _harness()
    raw = yaml.safe_load(h.HOSTNET.read_text())["services"]
    assert raw["worker"]["profiles"] == ["gpu"] and raw["grafana"]["profiles"] == ["grafana"]


def test_no_private_addresses_in_the_override():
    text = (ROOT / "docker" / "compose.hostnet.yml").read_text()
    for prefix in ("10.", "172.", "192.168.", "0.0.0.0"):
        assert f" {prefix}" not in text and f":{prefix}" not in text and f"/{prefix}" not in text, prefix


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_docker_stack_end_to_end():
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=2600, cwd=ROOT)
    out = res.stdout + res.stderr
    print(out)
    last = (res.stdout.strip().splitlines() or [""])[-1]
    if res.returncode == 77:
        pytest.skip(last)
    assert res.returncode == 0, out[-6000:]
    assert last.startswith("docker-test: PASSED") and "0 lost / 0 duplicated" in last, last

"""The two helper scripts the images ship: the health probe and the GPU claim wrapper."""

from __future__ import annotations

import http.server
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "docker"
HEALTHCHECK = DOCKER / "healthcheck.py"
CLAIM = DOCKER / "claim_gpu.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


healthcheck = _load(HEALTHCHECK)
claim_gpu = _load(CLAIM)


# ---------------------------------------------------------------------------- health probe
@pytest.mark.parametrize("argv, env, url", [
    (["tini", "--", "clusca", "api", "--host", "0.0.0.0", "--port", "8000"], {}, "http://127.0.0.1:8000/healthz"),
    (["tini", "--", "clusca", "api", "--port=9000"], {"CLUSCA_PORT": "1"}, "http://127.0.0.1:9000/healthz"),
    (["/opt/venv/bin/clusca", "serve"], {"CLUSCA_PORT": "8080"}, "http://127.0.0.1:8080/healthz"),
    (["tini", "--", "clusca-claim-gpu", "--", "clusca", "worker"], {}, "http://127.0.0.1:9101/metrics"),
    (["clusca", "worker"], {"CLUSCA_WORKER_METRICS_PORT": "9200"}, "http://127.0.0.1:9200/metrics"),
    ([], {}, "http://127.0.0.1:8000/healthz"),
])
def test_probe_url_follows_the_role(argv, env, url):
    assert healthcheck.probe_url(argv, env) == url


def test_main_command_reads_nul_separated_arguments(tmp_path):
    f = tmp_path / "cmdline"
    f.write_bytes(b"tini\0--\0clusca\0worker\0")
    assert healthcheck.main_command(f) == ["tini", "--", "clusca", "worker"]
    assert healthcheck.main_command(tmp_path / "missing") == []


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("status, rc", [(200, 0), (503, 1)])
def test_probe_exit_status_reflects_the_endpoint(status, rc):
    handler = type("H", (_Handler,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        res = subprocess.run([sys.executable, str(HEALTHCHECK), "clusca", "api", "--port", str(port)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == rc, res.stderr
    finally:
        server.shutdown()


def test_probe_fails_when_nothing_listens():
    res = subprocess.run([sys.executable, str(HEALTHCHECK), "clusca", "worker"], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "CLUSCA_WORKER_METRICS_PORT": str(_free_port())})
    assert res.returncode == 1
    assert "unhealthy" in res.stderr


# ---------------------------------------------------------------------------- GPU claims
# The child reports the GPU it was given, then holds it until its stdin closes.
CHILD = [sys.executable, "-c",
         "import os, sys; print(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'), flush=True); sys.stdin.read()"]


def _claim(lock_dir: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")}
    return subprocess.Popen([sys.executable, str(CLAIM), "--lock-dir", str(lock_dir), *args, "--", *CHILD],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**base, **(env or {})})


def _gpu_of(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read()
    return line


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.stdin.close()
            p.wait(timeout=10)


def test_each_worker_claims_its_own_gpu_and_releases_it_on_exit(tmp_path):
    a = _claim(tmp_path, "--count", "2")
    b = _claim(tmp_path, "--count", "2")
    try:
        first, second = _gpu_of(a), _gpu_of(b)
        assert {first, second} == {"0", "1"}
        # A third replica finds both taken and, with a deadline, gives up clearly.
        c = subprocess.run([sys.executable, str(CLAIM), "--lock-dir", str(tmp_path), "--count", "2",
                            "--wait-s", "1", "--", *CHILD], capture_output=True, text=True, timeout=30,
                           env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"})
        assert c.returncode == 3 and "claimed by other workers" in c.stderr
        # When a worker exits (however it exits), its GPU is free again.
        a.kill()
        a.wait(timeout=10)
        d = _claim(tmp_path, "--count", "2")
        try:
            assert _gpu_of(d) == first
        finally:
            _stop(d)
    finally:
        _stop(a, b)


def test_a_waiting_worker_starts_when_a_gpu_frees_up(tmp_path):
    a = _claim(tmp_path, "--count", "1")
    try:
        assert _gpu_of(a) == "0"
        waiting = _claim(tmp_path, "--count", "1")
        time.sleep(1.5)
        assert waiting.poll() is None  # still waiting, did not run the worker
        _stop(a)
        assert _gpu_of(waiting) == "0"
        _stop(waiting)
    finally:
        _stop(a)


def test_explicit_choice_and_no_gpu_run_the_command_unchanged(tmp_path):
    pinned = _claim(tmp_path, "--count", "4", env={"CUDA_VISIBLE_DEVICES": "3"})
    try:
        assert _gpu_of(pinned) == "3"
    finally:
        _stop(pinned)
    none = _claim(tmp_path, "--count", "0")
    try:
        assert _gpu_of(none) == "<unset>"
    finally:
        _stop(none)


def test_visible_gpus_follows_the_runtime_then_the_driver(tmp_path):
    proc = tmp_path / "gpus"
    proc.mkdir()
    for bus in ("0000:b1:00.0", "0000:17:00.0"):
        (proc / bus).mkdir()
    # With every GPU exposed, the driver's listing in PCI-bus order.
    assert claim_gpu.visible_gpus({"NVIDIA_VISIBLE_DEVICES": "all"}, proc) == ["0000:17:00.0", "0000:b1:00.0"]
    assert claim_gpu.visible_gpus({}, proc) == ["0000:17:00.0", "0000:b1:00.0"]
    # An explicit device list is what the container really sees.
    assert claim_gpu.visible_gpus({"NVIDIA_VISIBLE_DEVICES": "2,5"}, proc) == ["2", "5"]
    assert claim_gpu.visible_gpus({"NVIDIA_VISIBLE_DEVICES": "void"}, proc) == []


def test_visible_gpus_without_driver_listing_asks_nvidia_smi(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)'\n"
                   "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)'\n")
    smi.chmod(0o755)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import claim_gpu, pathlib; "
            "print(claim_gpu.visible_gpus({}, pathlib.Path(sys.argv[2])))")
    res = subprocess.run([sys.executable, "-c", code, str(DOCKER), str(tmp_path / "missing")], capture_output=True,
                         text=True, timeout=30, env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert res.stdout.strip() == "['GPU-aaaa', 'GPU-bbbb']", res.stderr
    if shutil.which("nvidia-smi") is None:  # no GPU anywhere: nothing to share out
        assert claim_gpu.visible_gpus({}, tmp_path / "missing") == []


def test_claim_without_a_command_is_a_usage_error(tmp_path):
    res = subprocess.run([sys.executable, str(CLAIM), "--lock-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2 and "no command given" in res.stderr

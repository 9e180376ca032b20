#!/usr/bin/env python3
"""Build the CPU image and run the compose stack for real, then break it (`make docker-test`).

Works on a machine that cannot pull from a registry and may use loopback only:

1. starts a private Docker engine (own data root, exec root, pid file and socket under a
   temporary folder; no iptables, no bridge) and stops it, with its containers, at the end;
2. provides the bases that cannot be pulled as local stand-ins built from Debian's
   packages: a Debian bookworm root made with debootstrap (Python 3.11), and Redis and
   Prometheus images on top of it (docker/standins/);
3. builds ``docker/Dockerfile``'s ``cpu`` target with build arguments only: the base
   image, and a local package index that serves the torch wheel pip finds on this host;
4. brings the stack up through docker/compose.hostnet.yml (host network, loopback, free
   ports) and checks health, ``POST /generate``, Prometheus, and three container faults
   (worker killed mid-job, Redis restarted under load, API restarted), counting jobs lost
   or finished twice;
5. prints, last, one line with the image size, build time and cold start.

Exit status: 0 passed, 1 failed, 77 skipped (no engine can run here; the reason is
printed). Downloads (the debootstrap root, torch's wheels) are kept under
``$CLUSCA_DOCKER_CACHE`` (default ``~/.cache/clusca-docker``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python docker/stack_test.py`: the checkout's packages
    sys.path.insert(0, str(ROOT))

from service.broker.embedded import free_port  # noqa: E402
from tests.support import models_yaml, noop_model  # noqa: E402

COMPOSE = ROOT / "docker-compose.yml"
HOSTNET = ROOT / "docker" / "compose.hostnet.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
STANDINS = ROOT / "docker" / "standins"

SKIP = 77
PROJECT = "clusca-dockertest"
IMAGE_TAG = "dockertest"
BASE_IMAGE = "clusca-local/debian:bookworm"
REDIS_IMAGE = "clusca-local/redis:bookworm"
PROMETHEUS_IMAGE = "clusca-local/prometheus:bookworm"
TORCH_VERSION = "2.13.0"
MAX_IMAGE_BYTES = 1.5e9

# Models the stack serves: the built-in model, plus no-op models (part of the service)
# slow enough to be caught mid-job and fast enough for a load.
MODELS_YAML = models_yaml({"name": "shapes", "kind": "builtin"}, noop_model("slowjob", 40, delay=0.25),
                          noop_model("quick", 10, delay=0.02))


class Skip(Exception):
    """No engine can run here: not a failure of the project."""


class Failed(Exception):
    pass


def say(msg: str) -> None:
    print(f"[docker-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------- engine
@dataclass
class Engine:
    """A private dockerd: everything under ``base``; stopped by its PID with its containers."""

    base: Path
    data_root: Path | None = None
    proc: subprocess.Popen | None = None
    pid: int | None = None

    @property
    def sock(self) -> Path:
        return self.base / "docker.sock"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "1"}

    @functools.cached_property
    def client(self) -> str:
        # The engine package's own client: it builds with BuildKit without the buildx plugin.
        for cand in ("/usr/bin/docker", shutil.which("docker")):
            if cand and Path(cand).exists():
                return cand
        raise Skip("no docker client (apt-get install docker.io)")

    def start(self) -> None:
        if os.geteuid() != 0:
            raise Skip("a private Docker engine needs root (dockerd); run as root")
        dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else None)
        if dockerd is None:
            raise Skip("dockerd is not installed (apt-get install docker.io)")
        self.client  # noqa: B018 - fail early without a client
        data_root = self.data_root or self.base / "data"
        log = open(self.base / "dockerd.log", "wb")  # noqa: SIM115 - lives as long as the engine
        cmd = ["nice", "-n", "19", dockerd, "--data-root", str(data_root), "--exec-root", str(self.base / "exec"),
               "--pidfile", str(self.base / "dockerd.pid"), "--host", f"unix://{self.sock}",
               "--iptables=false", "--ip6tables=false", "--bridge=none"]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Skip(f"dockerd exited with {self.proc.returncode} at start:\n{tail(self.base / 'dockerd.log', 15)}")
            if self.sock.exists() and self.docker("version", check=False, timeout=10).returncode == 0:
                self.pid = int((self.base / "dockerd.pid").read_text().strip())
                say(f"private Docker engine up (pid {self.pid}, socket {self.sock})")
                return
            time.sleep(0.5)
        self.stop()
        raise Skip(f"dockerd did not answer within 90 s:\n{tail(self.base / 'dockerd.log', 15)}")

    def docker(self, *args: str, check: bool = True, timeout: float = 600, capture: bool = True,
               log: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        out = open(log, "ab") if log else (subprocess.PIPE if capture else None)  # noqa: SIM115
        try:
            res = subprocess.run([self.client, *args], env=self.env, stdout=out,
                                 stderr=subprocess.STDOUT if log else (subprocess.PIPE if capture else None),
                                 timeout=timeout, cwd=cwd, text=not log)
        finally:
            if log:
                out.close()
        if check and res.returncode != 0:
            detail = tail(log) if log else (res.stdout or "") + (res.stderr or "")
            raise Failed(f"docker {' '.join(args[:3])} ... failed ({res.returncode}):\n{detail}")
        return res

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split() if self.sock.exists() else []
            if ids:
                self.docker("rm", "-f", "-v", *ids, check=False, timeout=120)
            pid = self.pid or self.proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.proc.wait(30)
        # dockerd leaves its default network namespace mounted under the exec root.
        prefix = str(self.base) + "/"
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)
        say(f"private Docker engine stopped (pid {self.pid or self.proc.pid})")
        self.proc = None


# ---------------------------------------------------------------------------- stand-in bases
def host_extra_cas(rootfs: Path) -> list[str]:
    """Certificates this host trusts that Debian's bundle lacks (a site's TLS proxy, say),
    so that apt and pip inside the builds reach the same mirrors the host reaches."""
    def certs(path: Path) -> list[str]:
        try:
            text = path.read_text()
        except OSError:
            return []
        return re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)

    known = set(certs(rootfs / "etc/ssl/certs/ca-certificates.crt"))
    return [c for c in certs(Path("/etc/ssl/certs/ca-certificates.crt")) if c not in known]


def make_rootfs_tarball(cache: Path, work: Path, mirror: str) -> Path:
    tarball = cache / "bookworm-rootfs.tar"
    if tarball.exists():
        say(f"Debian bookworm root from the cache ({tarball})")
        return tarball
    debootstrap = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists()
                                                   else None)
    if debootstrap is None:
        raise Skip("debootstrap is not installed (apt-get install debootstrap): no base image can be made")
    rootfs = work / "rootfs"
    say(f"debootstrap bookworm from {mirror} (minbase + python3) ...")
    t0 = time.monotonic()
    res = subprocess.run(["nice", "-n", "19", debootstrap, "--variant=minbase", "--include=python3,ca-certificates",
                          "bookworm", str(rootfs), mirror], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise Failed(f"debootstrap failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    extra = host_extra_cas(rootfs)
    if extra:
        local = rootfs / "usr/local/share/ca-certificates"
        local.mkdir(parents=True, exist_ok=True)
        for i, cert in enumerate(extra):
            (local / f"host-ca-{i}.crt").write_text(cert + "\n")
        subprocess.run(["chroot", str(rootfs), "update-ca-certificates"], capture_output=True, check=True, timeout=120)
    # pip uses its own CA bundle unless told otherwise; point it at the system's.
    (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / junk).glob("*"):
            if p.is_file():
                p.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "--numeric-owner", "--exclude=./proc/*", "--exclude=./sys/*", "--exclude=./dev/*",
                    "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=600)
    partial.rename(tarball)
    shutil.rmtree(rootfs, ignore_errors=True)
    say(f"Debian bookworm root made in {time.monotonic() - t0:.0f} s ({tarball.stat().st_size / 1e6:.0f} MB, "
        f"{len(extra)} extra host CA(s))")
    return tarball


def provide_bases(engine: Engine, cache: Path, work: Path, mirror: str) -> None:
    if engine.docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        tarball = make_rootfs_tarball(cache, work, mirror)
        engine.docker("import", "-c", "ENV LANG=C.UTF-8", "-c", 'CMD ["bash"]', str(tarball), BASE_IMAGE,
                      timeout=600)
    for image, dockerfile in ((REDIS_IMAGE, "redis.Dockerfile"), (PROMETHEUS_IMAGE, "prometheus.Dockerfile")):
        t0 = time.monotonic()
        engine.docker("build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}", "-f", dockerfile,
                      "-t", image, ".", cwd=STANDINS, log=work / "standins-build.log", timeout=1200)
        say(f"stand-in {image} ready ({time.monotonic() - t0:.0f} s)")


# ---------------------------------------------------------------------------- torch wheel source
def wheel_dir(cache: Path) -> Path:
    """torch and its dependencies as wheels, taken the way pip takes them on this host
    (a local wheel where pip's configuration points at one, PyPI for the rest)."""
    wheels = cache / "wheels"
    if not list(wheels.glob(f"torch-{TORCH_VERSION}*.whl")):
        say(f"pip download torch=={TORCH_VERSION} (and its dependencies) into {wheels}")
        res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                              "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
                              f"torch=={TORCH_VERSION}", "-d", str(wheels)], capture_output=True, text=True,
                             timeout=1800)
        if res.returncode != 0:
            raise Failed(f"pip download torch failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return wheels


def simple_index(wheels: Path, into: Path) -> Path:
    """A PEP 503 index (one folder per normalized project name) over ``wheels``."""
    root = into / "simple"
    for whl in wheels.glob("*.whl"):
        name = re.sub(r"[-_.]+", "-", whl.name.split("-", 1)[0]).lower()
        (root / name).mkdir(parents=True, exist_ok=True)
        link = root / name / whl.name
        if not link.exists():
            link.symlink_to(whl)
    return into


@contextlib.contextmanager
def serve_dir(path: Path):
    handler = functools.partial(QuietHandler, directory=str(path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # noqa: D102
        pass


# ---------------------------------------------------------------------------- compose
def render_base(dest: Path) -> Path:
    """docker-compose.yml without what Compose v1 cannot reset for the host network:
    per-service ``networks`` and ``ports`` (and ``build``: the image is built beforehand)."""
    cfg = yaml.safe_load(COMPOSE.read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("x-")}
    for svc in cfg["services"].values():
        for key in ("networks", "ports", "build"):
            svc.pop(key, None)
        # Compose v1 reads a GPU count from a variable (the parallel worker's
        # ${CLUSCA_PARALLEL_GPUS:-4}) as a string and refuses it, even outside the active
        # profiles; Compose v2 takes it. The stack runs without GPUs, so its default stands.
        for dev in svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []):
            count = dev.get("count")
            if isinstance(count, str) and count.startswith("${") and ":-" in count:
                dev["count"] = int(count.split(":-", 1)[1].rstrip("}"))
        vols = []
        for v in svc.get("volumes", []):
            if isinstance(v, str) and v.startswith("./"):
                v = str(ROOT / v[2:])
            vols.append(v)
        if vols:
            svc["volumes"] = vols
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


@dataclass
class Stack:
    engine: Engine
    work: Path
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ports = {name: free_port() for name in ("redis", "api", "worker", "prometheus")}
        models = self.work / "models"
        models.mkdir(exist_ok=True)
        (models / "models.yaml").write_text(MODELS_YAML)
        for p in (self.work, models, models / "models.yaml"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        prom = {
            "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
            "rule_files": ["/etc/prometheus/alerts.yml"],
            "scrape_configs": [
                {"job_name": "api", "static_configs": [{"targets": [f"127.0.0.1:{self.ports['api']}"]}]},
                {"job_name": "worker", "static_configs": [{"targets": [f"127.0.0.1:{self.ports['worker']}"]}]},
            ],
        }
        (self.work / "prometheus.yml").write_text(yaml.safe_dump(prom))
        (self.work / "prometheus.yml").chmod(0o644)
        self.base = render_base(self.work / "compose.base-hostnet.yml")

    @property
    def env(self) -> dict[str, str]:
        return {**self.engine.env, "COMPOSE_PROJECT_NAME": PROJECT, "CLUSCA_IMAGE_TAG": IMAGE_TAG,
                "CLUSCA_REDIS_PORT": str(self.ports["redis"]), "CLUSCA_API_PORT": str(self.ports["api"]),
                "CLUSCA_WORKER_METRICS_PORT": str(self.ports["worker"]),
                "CLUSCA_PROMETHEUS_PORT": str(self.ports["prometheus"]),
                "CLUSCA_PROMETHEUS_CONFIG": str(self.work / "prometheus.yml"),
                "CLUSCA_REDIS_IMAGE": REDIS_IMAGE, "CLUSCA_PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
                "CLUSCA_MODELS_DIR": str(self.work / "models"), "CLUSCA_MODELS": "/models/models.yaml",
                "CLUSCA_VISIBILITY_TIMEOUT_S": "5", "CLUSCA_LOG_LEVEL": "INFO"}

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        exe = shutil.which("docker-compose")
        if exe is None:
            raise Skip("docker-compose is not installed (apt-get install docker-compose)")
        res = subprocess.run([exe, "-f", str(self.base), "-f", str(HOSTNET), "--profile", "cpu", *args],
                             env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and res.returncode != 0:
            raise Failed(f"docker-compose {' '.join(args)} failed:\n{res.stdout}{res.stderr}")
        return res

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        if len(ids) != 1:
            raise Failed(f"expected one {service} container, found {ids}")
        return ids[0]

    def inspect(self, cid: str) -> dict:
        return json.loads(self.engine.docker("inspect", cid).stdout)[0]

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"


def call(method: str, url: str, body: Any = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Failed:
            raise
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise Failed(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def docker_time(stamp: str) -> float:
    """Docker's RFC 3339 timestamps (nanoseconds, 'Z') as Unix seconds."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z", stamp)
    whole = datetime.fromisoformat(m.group(1) + "+00:00").timestamp()
    return whole + float(m.group(2) or 0)


# ---------------------------------------------------------------------------- checks
SERVICES = ("redis", "api", "worker-cpu", "prometheus")


def check_healthy(stack: Stack, timeout: float = 240) -> None:
    def all_healthy():
        states = {s: stack.inspect(stack.container(s))["State"].get("Health", {}).get("Status") for s in SERVICES}
        return states if all(v == "healthy" for v in states.values()) else None
    states = wait_for("every health check to turn healthy", all_healthy, timeout, every=1)
    say(f"healthy: {', '.join(f'{k}={v}' for k, v in states.items())}")


def submit(stack: Stack, model: str, prompt: str, timeout: float = 15) -> str | None:
    code, body = call("POST", f"{stack.api}/generate", {"model": model, "prompt": prompt},
                      {"Prefer": "respond-async"}, timeout=timeout)
    if code in (200, 201, 202):
        return json.loads(body)["id"]
    return None


def job(stack: Stack, job_id: str) -> dict | None:
    code, body = call("GET", f"{stack.api}/jobs/{job_id}", timeout=10)
    return json.loads(body) if code == 200 else None


def wait_done(stack: Stack, job_id: str, timeout: float) -> dict:
    return wait_for(f"job {job_id} to end", lambda: (lambda j: j if j and j["status"] in
                                                      ("succeeded", "failed", "cancelled") else None)(job(stack, job_id)),
                    timeout)


def finish_count(redis_client, job_id: str) -> int:
    """How many times a job was recorded as finished (``finished`` events in its stream)."""
    # Key layout: service/broker/keys.py (a job id starts with its model's hash tag).
    events = redis_client.xrange(f"clusca:{{{job_id[:4]}}}:job:{job_id}:events")
    return sum(1 for _, fields in events if json.loads(fields.get(b"e", b"{}")).get("type") == "finished")


def check_generate(stack: Stack) -> None:
    code, body = call("POST", f"{stack.api}/generate", {"prompt": "a red circle on the left", "seed": 7},
                      timeout=120)
    if code != 200:
        raise Failed(f"POST /generate answered {code}: {body[:300]!r}")
    import base64

    png = base64.b64decode(json.loads(body)["images"][0])
    if not png.startswith(b"\x89PNG"):
        raise Failed("POST /generate did not return a PNG image")
    say(f"POST /generate: {len(png)}-byte PNG from the built-in model")


def prom_query(stack: Stack, q: str) -> list[dict]:
    url = f"http://127.0.0.1:{stack.ports['prometheus']}/api/v1/query?q=".replace("?q=", "?query=")
    code, body = call("GET", url + urllib.request.quote(q), timeout=10)
    if code != 200:
        return []
    return json.loads(body)["data"]["result"]


def check_prometheus(stack: Stack) -> None:
    def scraped():
        up = {r["metric"]["job"]: r["value"][1] for r in prom_query(stack, "up")}
        images = prom_query(stack, 'sum(clusca_images_generated_total{job="worker"})')
        requests = prom_query(stack, 'sum(clusca_requests_total{job="api"})')
        ok = (up.get("api") == "1" and up.get("worker") == "1" and images and float(images[0]["value"][1]) >= 1
              and requests and float(requests[0]["value"][1]) >= 1)
        return (up, images[0]["value"][1], requests[0]["value"][1]) if ok else None
    up, images, requests = wait_for("Prometheus to scrape the API and the worker", scraped, 90, every=1)
    say(f"Prometheus: targets {up}, images generated {images}, API requests {requests}")


def restarted(stack: Stack, service: str, before: dict) -> dict | None:
    now = stack.inspect(stack.container(service))
    moved = (now["RestartCount"] > before["RestartCount"] or now["State"]["StartedAt"] != before["State"]["StartedAt"])
    return now if moved and now["State"]["Running"] else None


def fault_worker_killed(stack: Stack, rc, counts: dict) -> None:
    """SIGKILL of the worker container's main process mid-job, and `docker kill` mid-job."""
    for how in ("SIGKILL of its main process", "docker kill"):
        job_id = submit(stack, "slowjob", f"killed worker ({how})")
        if not job_id:
            raise Failed("the slow job was not accepted")
        wait_for(f"job {job_id} to run", lambda: (job(stack, job_id) or {}).get("status") == "running", 60, 0.2)
        time.sleep(1.0)
        cid = stack.container("worker-cpu")
        before = stack.inspect(cid)
        if how == "docker kill":
            stack.engine.docker("kill", cid)
            # Docker counts `docker kill` as a manual stop: no restart policy brings the
            # container back (unlike a crash or the OOM killer). An operator's `up -d` does.
            time.sleep(3)
            state = stack.inspect(cid)["State"]
            say(f"docker kill: container {state['Status']} (restart policy not applied: a manual stop); "
                "docker-compose up -d brings it back")
            stack.compose("up", "-d", "--no-build", "worker-cpu")
        else:
            os.kill(before["State"]["Pid"], signal.SIGKILL)
        now = wait_for("the worker container to run again", lambda: restarted(stack, "worker-cpu", before), 120)
        done = wait_done(stack, job_id, 180)
        n = finish_count(rc, job_id)
        counts["accepted"] += 1
        counts["lost"] += done["status"] != "succeeded"
        counts["duplicated"] += n > 1
        if done["status"] != "succeeded" or n != 1:
            raise Failed(f"worker killed ({how}): job {job_id} ended {done['status']}, finished {n} time(s)")
        say(f"worker killed mid-job ({how}): back after restart #{now['RestartCount']}, job succeeded once "
            f"(attempts {done.get('attempts', '?')})")


def fault_redis_restart(stack: Stack, rc_factory, counts: dict) -> None:
    accepted: list[str] = []
    refused = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal refused
        i = 0
        while not stop.is_set():
            job_id = submit(stack, "quick", f"load {i}", timeout=20)
            if job_id:
                accepted.append(job_id)
            else:
                refused += 1
                time.sleep(0.2)
            i += 1
            time.sleep(0.05)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(4)
    before = len(accepted)
    say(f"Redis restart under load ({before} jobs accepted so far) ...")
    stack.engine.docker("restart", "-t", "10", stack.container("redis"))
    wait_for("Redis to answer again", lambda: stack.inspect(stack.container("redis"))["State"]
             .get("Health", {}).get("Status") == "healthy", 90, 0.5)
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join(30)
    rc = rc_factory()
    ends = {}
    for job_id in accepted:
        ends[job_id] = wait_done(stack, job_id, 240)["status"]
    lost = [j for j, s in ends.items() if s != "succeeded"]
    dup = [j for j in accepted if finish_count(rc, j) > 1]
    counts["accepted"] += len(accepted)
    counts["lost"] += len(lost)
    counts["duplicated"] += len(dup)
    if lost or dup or len(accepted) <= before:
        raise Failed(f"Redis restart: {len(accepted)} accepted ({before} before the restart), lost {lost[:5]}, "
                     f"finished twice {dup[:5]}")
    say(f"Redis restarted under load: {len(accepted)} accepted jobs all succeeded once ({refused} requests "
        "refused while Redis was down, none accepted and lost)")


def fault_api_restart(stack: Stack, rc, counts: dict) -> None:
    job_id = submit(stack, "slowjob", "api restart")
    if not job_id:
        raise Failed("job not accepted before the API restart")
    cid = stack.container("api")
    # The confirmed job is in the journal on the API's volume, which the restart keeps.
    journal = stack.engine.docker("exec", cid, "sh", "-c", f"grep -l {job_id} /var/lib/clusca/journal/*.log",
                                  check=False)
    if journal.returncode != 0:
        raise Failed(f"job {job_id} is not in the API's journal volume: {journal.stdout}{journal.stderr}")
    stack.engine.docker("restart", "-t", "15", cid)
    wait_for("the API to serve again", lambda: call("GET", f"{stack.api}/healthz", timeout=3)[0] == 200, 90)
    done = wait_done(stack, job_id, 180)
    code, img = call("GET", f"{stack.api}/jobs/{job_id}/images/0", timeout=10)
    n = finish_count(rc, job_id)
    counts["accepted"] += 1
    counts["lost"] += done["status"] != "succeeded" or code != 200
    counts["duplicated"] += n > 1
    if done["status"] != "succeeded" or code != 200 or n != 1:
        raise Failed(f"API restart: job {job_id} {done['status']}, image {code}, finished {n} time(s)")
    say(f"API restarted: job {job_id} journaled on the volume, still fetchable by id, succeeded once, "
        f"image {len(img)} bytes")


# ---------------------------------------------------------------------------- sizes
def image_size(engine: Engine, image: str) -> int:
    return int(engine.docker("image", "inspect", "-f", "{{.Size}}", image).stdout.strip())


# ---------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="clusca-dt-", dir="/tmp"))
    engine = Engine(work, data_root=Path(args.data_root) if args.data_root else None)
    results: dict[str, Any] = {}
    stack: Stack | None = None
    try:
        engine.start()
        provide_bases(engine, cache, work, args.mirror)
        image = f"clusca-serve:{IMAGE_TAG}-cpu"
        with contextlib.ExitStack() as es:
            index_url = os.environ.get("CLUSCA_TORCH_INDEX_URL")
            if not index_url:
                index_url = es.enter_context(serve_dir(simple_index(wheel_dir(cache), work / "index"))) + "/simple"
            say(f"building {image} from docker/Dockerfile (target cpu, base {BASE_IMAGE}, torch from {index_url}) ...")
            t0 = time.monotonic()
            engine.docker("build", "--network", "host", "-f", str(DOCKERFILE), "--target", "cpu",
                          "--build-arg", f"CPU_IMAGE={BASE_IMAGE}", "--build-arg", f"TORCH_INDEX_URL={index_url}",
                          "--progress", "plain", "-t", image, str(ROOT), log=work / "image-build.log", timeout=2400)
            results["build_s"] = time.monotonic() - t0
        results["image_bytes"] = image_size(engine, image)
        say(f"built {image}: {results['image_bytes'] / 1e9:.2f} GB in {results['build_s']:.0f} s")
        if results["image_bytes"] > MAX_IMAGE_BYTES:
            raise Failed(f"CPU image is {results['image_bytes'] / 1e9:.2f} GB, over 1.5 GB")
        layers = engine.docker("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image).stdout.splitlines()
        say("largest layers: " + "; ".join(f"{line.split(chr(9))[0]} {line.split(chr(9))[1][:60]}"
                                          for line in layers if line.split(chr(9))[0].endswith(("GB", "MB")))[:600])

        stack = Stack(engine, work)
        t_up = time.time()
        stack.compose("up", "-d", "--no-build", timeout=600)
        created = min(docker_time(stack.inspect(stack.container(s))["Created"]) for s in SERVICES)
        wait_for("/readyz 200", lambda: call("GET", f"{stack.api}/readyz", timeout=3)[0] == 200, 300, 0.2)
        results["cold_start_s"] = time.time() - created
        say(f"cold start: containers created -> /readyz 200 in {results['cold_start_s']:.1f} s "
            f"(compose up called {created - t_up:+.1f} s before creation)")
        check_healthy(stack)
        check_generate(stack)
        check_prometheus(stack)

        import redis as redis_lib

        def rc_factory():
            return redis_lib.Redis(host="127.0.0.1", port=stack.ports["redis"], socket_timeout=10)
        counts = {"accepted": 0, "lost": 0, "duplicated": 0}
        fault_worker_killed(stack, rc_factory(), counts)
        fault_redis_restart(stack, rc_factory, counts)
        fault_api_restart(stack, rc_factory(), counts)
        check_healthy(stack, timeout=120)
        results["counts"] = counts
        say(f"faults: {counts['accepted']} jobs accepted, {counts['lost']} lost, {counts['duplicated']} duplicated")
        return results
    except Failed:
        if stack is not None:
            logs = stack.compose("logs", "--no-color", "--tail", "60", check=False)
            (work / "compose.log").write_text(logs.stdout + logs.stderr)
            say(f"container logs: {work / 'compose.log'}")
        raise
    finally:
        if stack is not None:
            with contextlib.suppress(Exception):
                stack.compose("down", "-v", "--remove-orphans", check=False, timeout=300)
        engine.stop()
        if not args.keep:
            # Logs stay after a failure; the engine's data (images, build cache) never does.
            gone = [work] if "counts" in results else [work / "data", work / "exec", work / "index"]
            subprocess.run(["rm", "-rf", "--one-file-system", *map(str, gone)], timeout=900, check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=os.environ.get("CLUSCA_DOCKER_CACHE", "~/.cache/clusca-docker"),
                   help="where the debootstrap root and torch's wheels are kept between runs")
    p.add_argument("--data-root", default=os.environ.get("CLUSCA_DOCKER_DATA_ROOT"),
                   help="keep the engine's images and build cache here between runs (default: a temporary folder)")
    p.add_argument("--mirror", default=os.environ.get("CLUSCA_DEBIAN_MIRROR", "http://deb.debian.org/debian"))
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, engine data)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    try:
        res = run(args)
    except Skip as exc:
        print(f"docker-test: SKIPPED: {exc}", flush=True)
        return SKIP
    except Failed as exc:
        print(f"docker-test: FAILED: {exc}", flush=True)
        return 1
    total = time.monotonic() - t0
    c = res["counts"]
    print(f"docker-test: PASSED: CPU image {res['image_bytes'] / 1e9:.2f} GB, build {res['build_s']:.0f} s, "
          f"cold start {res['cold_start_s']:.1f} s (containers created -> /readyz 200), "
          f"faults {c['accepted']} jobs / {c['lost']} lost / {c['duplicated']} duplicated, total {total:.0f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

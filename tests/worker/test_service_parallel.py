"""A context-parallel worker group (service/worker/group.py): the registry's ``parallel`` field and its
checks, and the built-in model served by two gloo ranks through ``clusca serve``, as a user runs it."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import signal
import os
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from service.registry import ModelEntry, Registry
from tests.support import clusca_serve, registry_error, wait_until

GROUP_MODELS = """models:
  - name: shapes
    kind: builtin
    device: cpu
    parallel: {ulysses: 2, timeout_s: 30}
"""


def test_a_parallel_entry_is_read_and_shown():
    entry = ModelEntry.model_validate({"name": "shapes", "kind": "builtin", "parallel": {"ulysses": 2}})
    assert entry.parallel.world == 2 and entry.public()["parallel"] == {"ulysses": 2, "ring": 1, "world": 2}
    assert ModelEntry(name="plain", kind="noop").public()["parallel"]["world"] == 1


def test_a_degree_that_does_not_divide_the_heads_is_refused_at_start(tmp_path):
    message = registry_error(tmp_path, GROUP_MODELS.replace("ulysses: 2", "ulysses: 4"))
    assert "parallel.ulysses 4 does not divide the model's 6 attention heads" in message


def test_ring_without_a_backend_that_returns_the_lse_is_refused(tmp_path):
    message = registry_error(tmp_path, GROUP_MODELS.replace("ulysses: 2", "ring: 2"))
    assert "parallel.ring needs options.attention_backend" in message


def test_a_parallel_noop_model_is_refused(tmp_path):
    message = registry_error(tmp_path, "models:\n  - name: n\n    kind: noop\n    parallel: {ulysses: 2}\n")
    assert "parallel needs a torch model" in message


def test_a_size_whose_tokens_do_not_split_is_a_problem_naming_the_field():
    entry = ModelEntry.model_validate({"name": "f", "path": "org/f", "parallel": {"ulysses": 2},
                                       "defaults": {"width": 1024, "height": 1024}})
    assert entry.split_problem(1024, 1024) is None
    field, message = entry.split_problem(16 * 3, 16 * 3)
    assert field == "width" and "9 image tokens" in message and "2 parallel ranks" in message


def test_more_ranks_than_gpus_is_refused_before_anything_starts():
    from service.worker.group import check_devices

    import torch

    entry = ModelEntry.model_validate({"name": "f", "path": "org/f", "device": "cuda",
                                       "parallel": {"ulysses": torch.cuda.device_count() + 2}})
    with pytest.raises(ValueError, match=r"parallel asks for \d+ ranks on this host but \d+ GPU\(s\) are present"):
        check_devices(entry)


def test_a_group_model_needs_a_worker_of_its_own(tmp_path):
    from service.settings import Settings
    from service.worker.loop import run_worker

    path = tmp_path / "models.yaml"
    path.write_text(GROUP_MODELS + "  - name: other\n    kind: noop\n")
    settings = Settings(redis_url="redis://127.0.0.1:1/0", models_file=str(path))
    with pytest.raises(SystemExit, match="runs as a parallel group and needs a worker of its own"):
        run_worker(settings, ["shapes", "other"])
    assert Registry.load(path).get("other").parallel.world == 1


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def group_service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("group")
    (tmp / "models.yaml").write_text(GROUP_MODELS)
    env = {"CLUSCA_MODELS": str(tmp / "models.yaml"), "CLUSCA_TORCH_THREADS": "1", "CLUSCA_VISIBILITY_TIMEOUT_S": "10"}
    with clusca_serve(tmp, env, timeout=240) as served:
        yield served


def test_two_ranks_serve_the_builtin_model_as_one_process_would(group_service):
    import torch

    from clusca_shapes import WEIGHTS_DIR, ShapesFluxPipeline

    with httpx.Client(base_url=group_service.url, timeout=180) as c:
        off = c.post("/generate", json={"model": "shapes", "prompt": "a red circle on the left", "seed": 3,
                                        "steps": 8, "cache": {"mode": "off"}})
        assert off.status_code == 200, off.text
        cached = c.post("/generate", json={"model": "shapes", "prompt": "a blue square", "seed": 4, "steps": 12,
                                           "cache": {"preset": "fast"}})
        assert cached.status_code == 200, cached.text
        models = c.get("/models").json()["models"][0]
    body = off.json()
    pipe = ShapesFluxPipeline.from_pretrained(WEIGHTS_DIR)
    direct = pipe(prompt=["a red circle on the left"], generator=[torch.Generator().manual_seed(3)],
                  num_inference_steps=8, guidance_scale=body["guidance"], height=32, width=32).images[0]
    # Float rounding of the split attention may move a pixel by one level, never more.
    assert np.abs(_pixels(body["images"][0]) - np.asarray(direct.convert("RGB"), dtype=np.int16)).max() <= 1
    assert cached.json()["cache_stats"]["cached_steps"] > 0
    assert models["parallel"] == {"ulysses": 2, "ring": 1, "world": 2}
    # One worker to the queue, however many ranks; its description carries the group's degree.
    assert models["workers_alive"] == 1 and len(models["workers"]) == 1
    assert models["workers"][0]["parallel"]["world"] == 2


def test_group_metrics_show_the_degree_and_collective_time(group_service):
    def scraped() -> str:
        return httpx.get(group_service.url + "/metrics", timeout=10).text

    wait_until(lambda: "clusca_parallel_collective_seconds_per_step_count" in scraped(), timeout=30,
               what="collective metric")
    text = scraped()
    assert re.search(r'clusca_parallel_degree\{model="shapes"\} 2\.0', text)
    count = re.search(r'clusca_parallel_collective_seconds_per_step_count\{model="shapes"\} (\S+)', text)
    assert count and float(count.group(1)) >= 1


def test_a_cancelled_job_stops_every_rank_at_the_same_step(group_service):
    with httpx.Client(base_url=group_service.url, timeout=120) as c:
        job = c.post("/generate", json={"model": "shapes", "prompt": "a green circle", "seed": 1, "steps": 200,
                                        "num_images": 4, "async": True, "cache": {"mode": "off"}}).json()
        wait_until(lambda: c.get(f"/jobs/{job['id']}").json()["step"] >= 3, timeout=120, what="job running")
        assert c.post(f"/jobs/{job['id']}/cancel").status_code in (200, 202)
        wait_until(lambda: c.get(f"/jobs/{job['id']}").json()["status"] == "cancelled", timeout=60,
                   what="job cancelled")
        # The ranks left the call together: the group serves the next job with no restart.
        after = c.post("/generate", json={"model": "shapes", "prompt": "a red circle", "seed": 2, "steps": 6})
    assert after.status_code == 200, after.text
    assert "restarting the group" not in group_service.log_path.read_text()


def test_jobs_queued_behind_a_running_one_run_as_one_batch_in_the_group(group_service):
    body = {"model": "shapes", "prompt": "a blue circle", "steps": 6, "async": True, "cache": {"mode": "off"}}
    with httpx.Client(base_url=group_service.url, timeout=60) as c:
        first = c.post("/generate", json={**body, "steps": 60, "seed": 1}).json()
        wait_until(lambda: c.get(f"/jobs/{first['id']}").json()["status"] == "running", timeout=60, what="running")
        queued = [c.post("/generate", json={**body, "seed": 10 + i}).json()["id"] for i in range(3)]
        wait_until(lambda: all(c.get(f"/jobs/{j}").json()["status"] == "succeeded" for j in queued), timeout=120,
                   interval=0.5, what="batch done")
        done = [c.get(f"/jobs/{j}").json() for j in queued]
    assert max(d["batch_images"] for d in done) >= 2, [d["batch_images"] for d in done]


def _rank_pids(log_path) -> list[int]:
    found = re.findall(r"parallel group (\d+) of shapes: 2 ranks .*pids \[(\d+), (\d+)\]", log_path.read_text())
    return [int(found[-1][1]), int(found[-1][2])] if found else []


@pytest.mark.slow
def test_a_rank_killed_mid_job_restarts_the_group_and_the_job_finishes_once(group_service):
    with httpx.Client(base_url=group_service.url, timeout=30) as c:
        job = c.post("/generate", json={"model": "shapes", "prompt": "a green triangle", "seed": 9, "steps": 200,
                                        "num_images": 4, "async": True, "cache": {"mode": "off"}}).json()
        wait_until(lambda: c.get(f"/jobs/{job['id']}").json()["step"] >= 5, timeout=120, what="job running")
        follower = _rank_pids(group_service.log_path)[1]
        os.kill(follower, signal.SIGKILL)
        wait_until(lambda: c.get(f"/jobs/{job['id']}").json()["status"] in ("succeeded", "failed"), timeout=400,
                   interval=1.0, what="job finished by the restarted group")
        done = c.get(f"/jobs/{job['id']}").json()
        metrics = c.get("/metrics").text
    assert done["status"] == "succeeded" and len(done["links"]["images"]) == 4
    # Handed back unrun, not failed and retried: the attempt is not counted, one result.
    assert done["attempts"] == 1
    log = group_service.log_path.read_text()
    assert "restarting the group" in log and "handed 1 running job(s) back" in log
    assert re.search(r'clusca_parallel_group_restarts_total\{model="shapes"\} 1\.0', metrics)


def test_a_worker_for_every_model_leaves_the_group_models_to_their_own_worker(tmp_path, monkeypatch):
    from service.settings import Settings
    from service.worker import loop

    path = tmp_path / "models.yaml"
    path.write_text(GROUP_MODELS + "  - name: other\n    kind: noop\n")
    served = []

    class Recorder:
        def __init__(self, settings, registry, models, worker_id):
            served.append(models)
            raise SystemExit(0)

    monkeypatch.setattr(loop, "Worker", Recorder)
    with pytest.raises(SystemExit):
        loop.run_worker(Settings(redis_url="redis://127.0.0.1:1/0", models_file=str(path)), None)
    assert served == [["other"]]


def test_node_layout_gives_each_host_its_share_of_the_ranks():
    from service.settings import Settings
    from service.worker.group import node_layout

    assert node_layout(4, Settings()) == ([0, 1, 2, 3], None)
    two = Settings(parallel_nodes=2, parallel_node_rank=1, parallel_master="10.0.0.5:29500")
    assert node_layout(4, two) == ([2, 3], "tcp://10.0.0.5:29500")
    with pytest.raises(ValueError, match="CLUSCA_PARALLEL_MASTER"):
        node_layout(4, Settings(parallel_nodes=2))
    with pytest.raises(ValueError, match="do not split over CLUSCA_PARALLEL_NODES=3"):
        node_layout(4, Settings(parallel_nodes=3, parallel_master="h:1"))


@pytest.mark.slow
def test_a_group_spans_two_node_workers_met_at_one_rendezvous(tmp_path):
    """Two ``clusca worker`` processes, each one "host" of a two-host group, over loopback."""
    from service.broker.embedded import EmbeddedRedis
    from service.broker.embedded import free_port
    from tests.support import Service, service_env

    models = tmp_path / "models.yaml"
    models.write_text(GROUP_MODELS)
    redis = EmbeddedRedis().start()
    svc = Service(redis, models, tmp_path, service_env(redis.url, models, {"CLUSCA_TORCH_THREADS": "1"}))
    try:
        master = {"CLUSCA_PARALLEL_NODES": "2", "CLUSCA_PARALLEL_MASTER": f"127.0.0.1:{free_port()}"}
        svc.start_worker("shapes", {**master, "CLUSCA_PARALLEL_NODE_RANK": "1"}, wait=False)
        svc.start_worker("shapes", {**master, "CLUSCA_PARALLEL_NODE_RANK": "0"}, timeout=240)
        _, svc.base_url = svc.start_api({"CLUSCA_DEFAULT_MODEL": "shapes"})
        with svc.client(timeout=180) as c:
            r = c.post("/generate", json={"model": "shapes", "prompt": "a red circle", "seed": 5, "steps": 6,
                                          "cache": {"mode": "off"}})
            workers = c.get("/models").json()["models"][0]["workers"]
        assert r.status_code == 200, r.text
        # One consumer for the group, though its ranks live in two worker processes.
        assert len(workers) == 1 and workers[0]["parallel"]["world"] == 2
    finally:
        svc.stop_all()
        redis.stop()


@pytest.mark.slow
def test_a_rank_that_hangs_is_caught_by_the_collective_timeout(tmp_path):
    (tmp_path / "models.yaml").write_text(GROUP_MODELS.replace("timeout_s: 30", "timeout_s: 8"))
    env = {"CLUSCA_MODELS": str(tmp_path / "models.yaml"), "CLUSCA_TORCH_THREADS": "1",
           "CLUSCA_VISIBILITY_TIMEOUT_S": "10"}
    with clusca_serve(tmp_path, env, timeout=240) as served, httpx.Client(base_url=served.url, timeout=30) as c:
        job = c.post("/generate", json={"model": "shapes", "prompt": "a red square", "seed": 2, "steps": 200,
                                        "num_images": 4, "async": True, "cache": {"mode": "off"}}).json()
        wait_until(lambda: c.get(f"/jobs/{job['id']}").json()["step"] >= 5, timeout=120, what="job running")
        follower = _rank_pids(served.log_path)[1]
        os.kill(follower, signal.SIGSTOP)  # alive but answering nothing: only the timeout can tell
        try:
            wait_until(lambda: c.get(f"/jobs/{job['id']}").json()["status"] in ("succeeded", "failed"),
                       timeout=400, interval=1.0, what="job finished by the restarted group")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(follower, signal.SIGKILL)
        done = c.get(f"/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["attempts"] == 1
    log = served.log_path.read_text()
    assert "did not answer" in log or "Timed out" in log, log[-2000:]
    assert "restarting the group" in log


@pytest.mark.slow
def test_a_group_whose_model_cannot_load_exits_with_the_reason_instead_of_restarting_for_ever(tmp_path):
    import subprocess
    import sys

    from tests.support import ROOT

    models = tmp_path / "models.yaml"
    models.write_text(GROUP_MODELS + f"    path: {tmp_path / 'missing'}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLUSCA_MODELS": str(models), "REDIS_URL": "redis://127.0.0.1:1/0",
           "CLUSCA_TORCH_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "service.cli", "worker", "--models", "shapes"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "failed to start 3 times in a row" in done.stderr and "is not a shapes model folder" in done.stderr

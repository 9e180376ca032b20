"""The service on a 3-primary, 3-replica Redis Cluster: the API, worker and queue tests, unchanged.

The tests of tests/api/test_service_api.py, test_service_idempotency.py, test_service_progress.py
and test_service_worker.py are collected here once more, with ``service`` backed by the
cluster (the queue's own tests run on it through their ``backend`` parameter). A few more
check what only a cluster can show: models spread over the shards, every key of a job in
its model's slot, and a worker whose models live on different shards.
"""

from __future__ import annotations

import pytest

from tests.broker.redis_topologies import service_on
from service.broker.keys import JOB_PATTERN, events_key, job_key, model_tag, stream_key

from tests.api.test_service_api import *  # noqa: F401,F403 - collected again, on the cluster
from tests.api.test_service_idempotency import *  # noqa: F401,F403
from tests.worker.test_service_progress import *  # noqa: F401,F403
from tests.worker.test_service_worker import (test_batch_respects_max_batch_images, test_batching_groups_only_compatible_jobs,  # noqa: F401
                                 test_sigkilled_worker_job_finishes_on_another, test_signed_webhook_on_completion,
                                 test_sigterm_hands_the_running_job_back_within_a_step_then_exits)


@pytest.fixture(scope="module")
def service(redis_cluster, tmp_path_factory):
    with service_on(redis_cluster, tmp_path_factory.mktemp("cluster-service")) as svc:
        yield svc


def test_models_spread_over_the_shards_and_a_job_keeps_to_its_slot(service, redis_cluster):
    from redis.crc import key_slot

    models = ["noop", "slow", "failing", "legacy", "noopvideo", "batch", "kill", "orphan"]
    owners = {redis_cluster.primary_of(stream_key(m)).port for m in models}
    assert len(owners) >= 2, "the test models' streams should not all live on one shard"
    with service.client() as c:
        body = c.post("/generate", json={"prompt": "slot", "model": "slow", "steps": 2}).json()
    assert body["status"] == "succeeded"
    job_id = body["id"]
    assert job_id.startswith(model_tag("slow"))
    slots = {key_slot(k.encode()) for k in (stream_key("slow"), job_key(job_id), events_key(job_id))}
    assert len(slots) == 1
    r = service.redis_client()
    assert r.exists(job_key(job_id)) and any(job_id.encode() in k for k in r.scan_iter(JOB_PATTERN))


def test_one_worker_serves_models_on_different_shards(service, redis_cluster):
    # The session's worker serves five models; their streams span several primaries, which one
    # blocking read cannot wait on: every model still gets its jobs run promptly.
    served = ["noop", "slow", "failing", "legacy", "noopvideo"]
    assert len({redis_cluster.primary_of(stream_key(m)).port for m in served}) >= 2
    with service.client() as c:
        for m in ("noop", "slow", "legacy"):
            r = c.post("/generate", json={"prompt": f"on {m}", "model": m, "steps": 2})
            assert r.status_code == 200 and r.json()["status"] == "succeeded", (m, r.text)
            assert r.json()["timings"]["queue_wait_s"] < 1.0, r.json()["timings"]

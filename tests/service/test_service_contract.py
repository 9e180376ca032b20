"""The job contract: written once, and every field survives API -> Redis -> worker -> views."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusca.config import KNOBS, ClusCaConfig, ClusCaConfigError
from clusca.stats import RunStats

from service import contract
from service.broker import lua
from service.api.schemas import JobStatus
from service.api.views import job_status
from service.contract import JobRecord, JobRequest, JobResult, Timings
from service.broker.producer import JobQueue
from service.broker.consumer import WorkerQueue

MAX_SEED = 2**53 - 1
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


def _knob_values(knob):
    if knob.choices is not None:
        return st.sampled_from(knob.choices)
    if knob.type is bool:
        return st.booleans()
    lo = 0 if knob.lo is None else knob.lo
    hi = 10_000 if knob.hi is None else knob.hi
    if knob.type is int:
        return st.integers(int(lo) + (1 if knob.lo_open else 0), int(hi))
    return st.floats(lo, hi, exclude_min=knob.lo_open, allow_nan=False)


def _config(knobs):
    try:
        return ClusCaConfig.from_dict(knobs)
    except ClusCaConfigError:  # a combination the library refuses (e.g. propagate_text without refresh_text)
        return ClusCaConfig()


# Any setting the library accepts, every knob drawn from its own range.
configs = st.fixed_dictionaries({}, optional={k.name: _knob_values(k) for k in KNOBS}).map(_config)
ints = st.integers(0, 2**40)
run_stats = st.builds(RunStats, mode=st.sampled_from(["off", "fora", "taylorseer", "clusca"]), calls=ints,
                      full_steps=ints, cached_steps=ints, tokens_computed=ints, tokens_uncached=ints,
                      token_fraction=finite, flops=ints, flops_uncached=ints, flops_speedup=finite, cache_bytes=ints,
                      kmeans_ms=finite, kmeans_calls=ints, kmeans_rounds=ints, graph_captures=ints,
                      graph_replays=ints, capture=st.text(max_size=30))

_request_fields = dict(
    prompt=st.text(max_size=200), negative_prompt=st.none() | st.text(max_size=50),
    width=st.integers(1, 16384), height=st.integers(1, 16384), steps=st.integers(1, 10_000),
    guidance=finite, seed=st.integers(0, MAX_SEED), num_images=st.integers(1, 1000),
    cache=configs,
    webhook_url=st.none() | st.text(max_size=60),
    timeout_s=st.none() | st.floats(min_value=0.001, max_value=1e6, allow_nan=False),
    adapters=st.lists(st.from_regex(contract.ADAPTER_NAME, fullmatch=True), max_size=contract.MAX_ADAPTERS,
                      unique=True).flatmap(lambda names: st.tuples(*(
                          st.builds(contract.AdapterUse, name=st.just(n),
                                    scale=st.floats(*contract.ADAPTER_SCALE_RANGE, allow_nan=False)) for n in names))))
digests = st.text("0123456789abcdef", min_size=64, max_size=64)
# Still images (no frame count, an image format), videos (frames, a frame rate, a video format), and
# edits (an input image, perhaps a mask, a strength).
requests = st.builds(JobRequest, **_request_fields, output_format=st.sampled_from(contract.IMAGE_FORMATS)) \
    | st.builds(JobRequest, **_request_fields, output_format=st.sampled_from(contract.VIDEO_FORMATS),
                num_frames=st.integers(1, 1000), fps=st.integers(1, 240)) \
    | st.builds(JobRequest, **_request_fields, output_format=st.sampled_from(contract.IMAGE_FORMATS),
                image=digests, mask=st.none() | digests,
                strength=st.floats(0, 1, exclude_min=True, allow_nan=False))
timings = st.builds(Timings, queue_wait_s=st.none() | finite, inference_s=st.none() | finite,
                    total_s=st.none() | finite)
_result_fields = dict(
    seed=st.none() | st.integers(0, MAX_SEED), seeds=st.lists(st.integers(0, MAX_SEED), max_size=8),
    cache_mode=st.sampled_from(["off", "fora", "taylorseer", "clusca"]),
    cache_stats=st.none() | run_stats,
    batch_images=st.none() | st.integers(1, 64), batch_jobs=st.none() | st.integers(1, 64),
    worker=st.none() | st.text(max_size=30), attempt=st.none() | st.integers(1, 10),
    content_type=st.none() | st.sampled_from(sorted(contract.CONTENT_TYPES.values())), timings=timings,
    adapter_load_s=st.none() | finite)
results = st.builds(JobResult, **_result_fields)


def test_the_round_trip_draws_every_contract_field():
    """A field added to the contract is drawn by the round trip below, or that test proves nothing about it."""
    assert {f.name for f in dataclasses.fields(JobRequest)} == set(_request_fields) | {
        "output_format", "num_frames", "fps", "image", "mask", "strength"}
    assert {f.name for f in dataclasses.fields(JobResult)} == set(_result_fields)
    assert {f.name for f in dataclasses.fields(Timings)} == {"queue_wait_s", "inference_s", "total_s"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests, result=results, status=st.sampled_from(contract.TERMINAL))
def test_every_field_round_trips_api_redis_worker_views(service, req, result, status):
    model = f"contract-{uuid.uuid4().hex[:8]}"
    wq = WorkerQueue(service.redis_client(), worker_id="w", models=[model], ttl_s=60, visibility_timeout_s=30,
                     max_attempts=3)
    wq.ensure_groups()

    async def enqueue() -> str:
        r = aioredis.Redis.from_url(service.redis_url)
        try:
            job_id, created = await JobQueue(r, max_queue=10, ttl_s=60).enqueue(model, req)
            assert created
            return job_id
        finally:
            await r.aclose()

    async def read(job_id: str) -> JobRecord | None:
        r = aioredis.Redis.from_url(service.redis_url)
        try:
            return await JobQueue(r, max_queue=10, ttl_s=60).get(job_id)
        finally:
            await r.aclose()

    job_id = asyncio.run(enqueue())
    # Worker side: the batch key and the request it runs are the API's.
    deliveries = wq.read(1, block_ms=100)
    assert [r.batch_key(model) for r in wq.peek_requests(deliveries)] == [req.batch_key(model)]
    started, skipped = wq.start(deliveries)
    assert skipped == [] and started[0].request == req
    assert wq.finish(started[0], status, result, error="" if status == "succeeded" else "why")
    record = asyncio.run(read(job_id))
    # Views side: the record holds both halves, equal field for field.
    assert record.request == req and record.result == result and record.status == status
    assert record.steps == req.steps and record.attempts == 1 and record.terminal
    view = job_status(record)
    assert (view.seed, view.seeds, view.num_images, view.output_format) == (req.seed, req.seeds, req.num_images,
                                                                          req.output_format)
    assert (view.width, view.height, view.guidance, view.cache) == (req.width, req.height, req.guidance, req.cache)
    assert (view.num_frames, view.fps) == (req.num_frames, req.fps)
    assert (view.strength, view.masked) == (req.strength, req.mask is not None)
    assert view.cache_stats == result.cache_stats and view.batch_images == result.batch_images
    assert [(a.name, a.scale) for a in view.adapters] == [(a.name, a.scale) for a in req.adapters]
    assert view.adapter_load_s == result.adapter_load_s
    wire = view.model_dump(mode="json")  # what the client reads
    assert wire["timings"] == dataclasses.asdict(result.timings) and wire["cache"] == req.cache.to_dict()
    assert wire["cache_stats"] == (result.cache_stats.to_dict() if result.cache_stats else None)
    assert len(view.links.images) == (req.num_images if status == "succeeded" else 0)


def test_views_decide_on_every_contract_field():
    """A field added to the contract must be shown by the views or named here as not shown."""
    shown = set(JobStatus.model_fields)
    # Not echoed back (an edit's inputs are named by digest; the view says only whether a mask was given).
    private_request = {"prompt", "negative_prompt", "webhook_url", "image", "mask"}
    for f in dataclasses.fields(JobRequest):
        assert f.name in shown or f.name in private_request, f"JobRequest.{f.name} is neither shown nor private"
    private_result = {"seed", "seeds", "cache_mode", "batch_jobs", "worker", "attempt", "content_type"}
    for f in dataclasses.fields(JobResult):
        assert f.name in shown or f.name in private_result, f"JobResult.{f.name} is neither shown nor private"
    assert set(JobStatus.model_fields["status"].annotation.__args__) == set(contract.STATUSES)


@given(req=requests)
def test_request_json_round_trips(req):
    assert JobRequest.parse(req.to_json()) == req
    assert JobRequest.parse(req.to_json().encode()) == req


@given(result=results)
def test_result_json_round_trips(result):
    assert JobResult.parse(result.to_json()) == result


@given(a=requests, prompt=st.text(max_size=20), seed=st.integers(0, MAX_SEED), n=st.integers(1, 8),
       fmt=st.sampled_from(contract.OUTPUT_FORMATS), hook=st.none() | st.text(max_size=10))
def test_batch_key_ignores_per_image_fields(a, prompt, seed, n, fmt, hook):
    b = dataclasses.replace(a, prompt=prompt, seed=seed, num_images=n, output_format=fmt, webhook_url=hook,
                            negative_prompt=None if a.negative_prompt is None else "other",
                            image=None if a.image is None else "f" * 64, mask=None if a.mask is None else "e" * 64,
                            adapters=() if a.adapters else (contract.AdapterUse("outline", 0.5),))
    # Jobs with different adapters share a call: the adapter bank gathers each sample's own.
    assert a.batch_key("m") == b.batch_key("m")
    assert a.batch_key("m") != a.batch_key("other-model")


@pytest.mark.parametrize("change", [{"width": 8}, {"height": 8}, {"steps": 7}, {"guidance": 9.5},
                                    {"cache": ClusCaConfig(mode="fora")}, {"negative_prompt": "x"},
                                    {"image": "a" * 64, "strength": 0.8}])
def test_batch_key_separates_call_wide_fields(change):
    a = JobRequest(prompt="p", width=16, height=16, steps=4, guidance=1.0, seed=1, cache=ClusCaConfig(mode="off"))
    assert a.batch_key("m") != dataclasses.replace(a, **change).batch_key("m")


@pytest.mark.parametrize("change", [{"strength": 0.5}, {"mask": "b" * 64}])
def test_edits_batch_only_with_the_same_strength_and_masking(change):
    a = JobRequest(prompt="p", width=16, height=16, steps=4, guidance=1.0, seed=1, image="a" * 64, strength=0.8)
    assert a.batch_key("m") != dataclasses.replace(a, **change).batch_key("m")
    assert a.batch_key("m") == dataclasses.replace(a, image="c" * 64).batch_key("m")


@pytest.mark.parametrize("steps,strength", [(40, 0.8), (40, 0.7), (10, 0.05), (28, 1.0), (1, 0.3), (50, 0.33)])
def test_the_steps_an_edit_denoises_are_the_pipelines(steps, strength):
    from clusca_shapes.pipeline import edit_start

    n = contract.denoised_steps(steps, strength)
    assert 1 <= n <= steps and n == steps - edit_start(steps, strength)
    req = JobRequest(prompt="p", width=16, height=16, steps=steps, guidance=1.0, seed=1, image="a" * 64,
                     strength=strength)
    assert req.denoised_steps == n and dataclasses.replace(req, image=None, strength=None).denoised_steps == steps


@pytest.mark.parametrize("field,bad", [("prompt", 1), ("negative_prompt", 2), ("width", "16"), ("width", True),
                                       ("width", 0), ("height", 1.5), ("steps", None), ("guidance", "1"),
                                       ("seed", -1), ("num_images", 0), ("output_format", "gif"),
                                       ("cache", []), ("cache", {"interval": 0}), ("cache", {"knob": 1}),
                                       ("timeout_s", 0), ("timeout_s", "5"),
                                       ("webhook_url", 3), ("image", "../etc/passwd"), ("strength", 0.5),
                                       ("mask", "a" * 64), ("adapters", {"name": "a"}),
                                       ("adapters", [{"name": "../x"}]), ("adapters", [{"name": "a", "scale": 9}]),
                                       ("adapters", [{"name": "a"}, {"name": "a"}]),
                                       ("adapters", [{"name": f"a{i}"} for i in range(9)])])
def test_a_request_the_api_could_not_have_written_is_refused(field, bad):
    d = JobRequest(prompt="p", width=16, height=16, steps=4, guidance=1.0, seed=1).to_dict()
    assert JobRequest.parse(contract._json({**d, field: bad})) is None
    missing = {k: v for k, v in d.items() if k != field}
    # A request stored before deadlines (or edits) existed has none; every other field is required.
    assert (JobRequest.parse(contract._json(missing)) is None) == (field not in ("timeout_s", "image", "strength",
                                                                                 "mask", "adapters"))
    assert JobRequest.parse(b"\x80\x04pickle") is None and JobRequest.parse("[1]") is None


def test_foreign_values_in_a_job_hash_read_as_absent():
    rec = JobRecord.from_hash({b"id": b"a" * 32, b"model": b"m", b"status": b"queued", b"request": b"{}",
                               b"result": b"[1]", b"step": b"x", b"created": b"soon"})
    assert rec.request is None and rec.result is None and rec.step == 0 and rec.created is None
    assert JobRecord.from_hash({}) is None


def test_lua_scripts_take_statuses_group_and_caps_from_the_contract():
    # ('started' and 'finished' are also the hash's timestamp fields, so event types are checked where used.)
    literals = [*contract.STATUSES, contract.GROUP]
    for name, template in lua.TEMPLATES.items():
        quoted = re.findall(r"'([^'\n]*)'", template)
        spelled = [q for q in quoted if q in literals]
        assert not spelled, f"{name} script spells {spelled} itself instead of taking them from the contract"
        assert all(t.startswith("$") for t in re.findall(r"type='([^']*)'", template)), name
        assert str(contract.EVENTS_MAXLEN) not in template
        assert "$" not in lua.SCRIPTS[name].replace("%S*)$'", ""), f"{name}: placeholder left unfilled"
    assert f"'{contract.GROUP}'" in lua.SCRIPTS["finish"] and f"'{contract.RUNNING}'" in lua.SCRIPTS["start"]
    assert f"MAXLEN', '~', {contract.EVENTS_MAXLEN}" in lua.SCRIPTS["start"]
    for status in contract.TERMINAL:
        assert f"st == '{status}'" in lua.SCRIPTS["finish"]


def test_shared_names_have_one_home():
    from service.api import schemas
    from service.broker import consumer, producer

    for side in (producer, consumer):
        for name in ("GROUP", "EVENTS_MAXLEN", "TERMINAL", "TERMINAL_EVENTS"):
            if hasattr(side, name):
                assert getattr(side, name) is getattr(contract, name), f"{side.__name__}.{name}"
    assert producer.GROUP is contract.GROUP
    assert schemas.JobState is contract.JobState and schemas.OutputFormat is contract.OutputFormat
    assert set(contract.FINAL_EVENT) == set(contract.TERMINAL)

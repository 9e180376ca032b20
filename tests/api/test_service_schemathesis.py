"""schemathesis against a running ``clusca serve``: no request the published schema admits, and
none that it refuses, gets a 5xx.

A real ``clusca serve`` (its own Redis, a worker with the no-op image and video models, the
API) on a free port. Two phases, over real HTTP:

* stateless: every operation of /openapi.json, cases that fit the schema and cases that
  violate it (the two body operations get four times the budget);
* stateful: schemathesis' state machine follows the schema's OpenAPI links (a job made by
  ``POST /generate`` is read, streamed, fetched and cancelled by its id; likewise videos).

Every answer must be below 500, documented for its operation, and every 4xx must carry
``{"error": {"message": ...}}`` without a stack trace. ``SCHEMATHESIS_CASES`` sets the
stateless budget and ``SCHEMATHESIS_STEPS`` the stateful one.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

import pytest

from tests.support import answer_problem, clusca_serve, models_yaml, noop_model

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, reject, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

# Small bounds keep each no-op job cheap (PNG encoding is most of its cost), so the budget
# goes into many cases rather than big images; the schema publishes these bounds.
MODELS = models_yaml(
    noop_model("noop", 4, limits={"max_side": 96, "max_steps": 50, "max_images": 4}),
    noop_model("noopvideo", 3, video=True,
               limits={"max_side": 64, "max_frames": 17, "frame_step": 4, "max_video_pixels": 16384, "max_images": 2}))
BODY_OPERATIONS = ("/generate", "/v1/images/generations", "/v1/videos")


@dataclass
class Tally:
    """Every answer seen, by phase, and what was wrong with any of them."""

    by_phase: collections.Counter = field(default_factory=collections.Counter)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    operations: collections.Counter = field(default_factory=collections.Counter)
    unsendable: collections.Counter = field(default_factory=collections.Counter)
    linked: int = 0  # stateful calls whose parameters came from an earlier answer
    failures: list[str] = field(default_factory=list)

    def call(self, case, url: str, session, phase: str):
        import requests

        try:
            resp = case.call(base_url=url, session=session, timeout=30)
        except (ValueError, UnicodeError, requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL) as exc:
            # The HTTP client itself refuses it (a header value it cannot encode, say): never sent.
            self.unsendable[type(exc).__name__] += 1
            return None
        label = f"{case.method.upper()} {case.operation.path}"
        self.by_phase[phase] += 1
        self.statuses[resp.status_code] += 1
        self.operations[label] += 1
        problem = answer_problem(case, resp)
        if problem:
            self.failures.append(f"[{phase}] {problem}: {label} -> {resp.status_code} {resp.content[:300]!r}\n"
                                 f"{case.as_curl_command(base_url=url)}")
        return resp


def _stateless(schema, url: str, session, tally: Tally, cases: int) -> None:
    ops = [r.ok() for r in schema.get_all_operations()]
    weight = {op.label: 4 if op.path in BODY_OPERATIONS else 1 for op in ops}
    unit = cases / (2 * sum(weight.values()))
    plan = [(op, max(1, round(unit * weight[op.label]))) for op in ops]
    body_ops = [op for op in ops if op.path in BODY_OPERATIONS]
    for _ in range(10):
        for op, budget in plan:
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                @settings(max_examples=budget, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def run(case) -> None:
                    tally.call(case, url, session, "stateless")

                try:
                    run()
                except Unsatisfiable:
                    pass  # nothing to violate: an operation without parameters has no negative cases
        # Operations without parameters stop after a case or two: the body operations make up the rest.
        short = cases - tally.by_phase["stateless"] - sum(tally.unsendable.values())
        if short <= 0:
            break
        plan = [(op, max(1, -(-short // (2 * len(body_ops))))) for op in body_ops]


def _stateful(schema, url: str, session, tally: Tally, steps: int) -> None:
    base = schema.as_state_machine()

    class Machine(base):  # type: ignore[misc, valid-type]
        def step(self, input):
            if input.transition is not None and input.is_applied:
                tally.linked += 1
            return super().step(input)

        def call(self, case, **kwargs):
            resp = tally.call(case, url, session, "stateful")
            if resp is None:
                reject()
            return resp

        def validate_response(self, response, case, **kwargs) -> None:
            pass  # the tally checks every answer

    per_scenario = 8
    done = 0
    while done < steps:
        before = tally.by_phase["stateful"]
        Machine.run(settings=settings(max_examples=max(1, (steps - done) // per_scenario),
                                      stateful_step_count=per_scenario, deadline=None, database=None,
                                      phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
        made = tally.by_phase["stateful"] - before
        if made == 0:
            break
        done += made


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(tmp_path):
    import requests

    cases = int(os.environ.get("SCHEMATHESIS_CASES", "3600"))
    steps = int(os.environ.get("SCHEMATHESIS_STEPS", "1600"))
    env = {"CLUSCA_MODELS": str(tmp_path / "models.yaml"), "CLUSCA_DEFAULT_MODEL": "noop",
           "CLUSCA_WEBHOOK_ALLOW_PRIVATE": "0", "CLUSCA_SYNC_TIMEOUT_S": "10", "CLUSCA_MAX_QUEUE": "200",
           "CLUSCA_LOG_LEVEL": "WARNING", "CLUSCA_WORKER_METRICS_PORT": "0"}
    (tmp_path / "models.yaml").write_text(MODELS)
    tally = Tally()
    with clusca_serve(tmp_path, env, timeout=120) as served:
        schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
        links = sum(len(r.get("links", {})) for ops in schema.raw_schema["paths"].values()
                    for op in ops.values() if isinstance(op, dict) for r in op.get("responses", {}).values())
        assert links >= 20, "the schema declares the links the stateful phase follows"
        with requests.Session() as session:
            _stateless(schema, served.url, session, tally, cases)
            _stateful(schema, served.url, session, tally, steps)
        log = served.log_path.read_text(errors="replace")
    summary = {"by_phase": dict(tally.by_phase), "statuses": dict(sorted(tally.statuses.items())),
               "linked": tally.linked, "unsendable": dict(tally.unsendable), "operations": dict(tally.operations)}
    print(summary)
    assert not tally.failures, "\n\n".join(tally.failures[:5]) + f"\n\n{summary}"
    assert sum(tally.by_phase.values()) >= 5000, summary
    # About one stateful call in ten follows a link (158 to 200 of 1600 seen); the bound leaves room
    # for hypothesis' draw while still failing if the links stop being followed at all.
    assert tally.by_phase["stateful"] >= steps * 0.9 and tally.linked >= steps // 20, summary
    assert len(tally.operations) >= 12, summary  # every operation was reached
    assert tally.statuses[200] >= 100, summary  # jobs really ran, not only refusals
    assert "Traceback" not in log, log[-3000:]


def test_schema_links_chain_jobs_and_videos_by_id(monkeypatch):
    """The links the stateful phase follows: an answer's ``id`` feeds the operations on that job."""
    from service.api.app import create_app

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1")  # never connected: only the schema is read
    spec = create_app().openapi()
    paths = spec["paths"]
    op_id = {(m, p): op["operationId"] for p, ops in paths.items() for m, op in ops.items()}
    for status in ("200", "202"):
        links = paths["/generate"]["post"]["responses"][status]["links"]
        assert set(links) == {op_id[("get", "/jobs/{job_id}")], op_id[("post", "/jobs/{job_id}/cancel")],
                              op_id[("get", "/jobs/{job_id}/events")], op_id[("get", "/jobs/{job_id}/images/{index}")]}
        assert all(v["parameters"]["job_id"] == "$response.body#/id" for v in links.values())
    video = paths["/v1/videos"]["post"]["responses"]["200"]["links"]
    assert {v["parameters"]["video_id"] for v in video.values()} == {"$response.body#/id"}
    assert op_id[("delete", "/v1/videos/{video_id}")] in video
    # Every link names an operation that exists.
    targets = {v["operationId"] for ops in paths.values() for op in ops.values()
               for r in op.get("responses", {}).values() for v in r.get("links", {}).values()}
    assert targets <= set(op_id.values())

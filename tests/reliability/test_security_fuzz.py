"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis).

Cases come from every operation in /openapi.json, half fitting the schema and half
violating it, and go over real HTTP to a real API with a real worker behind it. Every
answer must be below 500 and documented in the schema for its operation, and every 4xx
must carry ``{"error": {"message": ...}}``.
``REL_FUZZ_CASES`` sets the number of cases (the full campaign uses 2000).
"""

from __future__ import annotations

import collections
import json

import pytest

from tests.reliability.reliability_support import env_int, report, stack
from tests.support import answer_problem, noop_model

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

FUZZ_MODELS = [noop_model("noop", 4)]


def _fuzz(tmp_path, cases: int, name: str) -> None:
    import requests

    env = {"CLUSCA_WEBHOOK_ALLOW_PRIVATE": "0", "CLUSCA_SYNC_TIMEOUT_S": "10", "CLUSCA_MAX_QUEUE": "50"}
    with stack(tmp_path, models=FUZZ_MODELS, extra_env=env) as svc:
        svc.start_worker("noop")
        _, url = svc.start_api()
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        session = requests.Session()
        seen: collections.Counter = collections.Counter()
        unsendable: collections.Counter = collections.Counter()
        failures: list[str] = []

        def check(case) -> None:
            label = f"{case.method} {case.path}"
            try:
                resp = case.call(base_url=url, session=session, timeout=30)
            except (ValueError, UnicodeError, requests.exceptions.InvalidHeader,
                    requests.exceptions.InvalidURL) as exc:
                # The HTTP client itself refuses it (e.g. a header value it cannot encode): never sent.
                unsendable[type(exc).__name__] += 1
                return
            seen[f"{label} -> {resp.status_code}"] += 1
            problem = answer_problem(case, resp)
            if problem:
                failures.append(f"{problem}: {resp.status_code} {resp.text[:300]}\n{case.as_curl_command(base_url=url)}")

        def fuzz_operation(op, budget: int) -> None:
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                @settings(max_examples=budget, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def run(case) -> None:
                    check(case)

                try:
                    run()
                except Unsatisfiable:
                    pass  # nothing to violate (an operation without parameters has no negative cases)

        # Every operation in both generation modes, each its own Hypothesis run; the two operations
        # with request bodies get four times the budget, since that is where the input space is.
        ops = [r.ok() for r in schema.get_all_operations()]
        weights = {id(op): 4 if op.path in ("/generate", "/v1/images/generations") else 1 for op in ops}
        unit = cases / (2 * sum(weights.values()))
        plan = [(op, max(1, round(unit * weights[id(op)]))) for op in ops]
        body_ops = [op for op in ops if weights[id(op)] > 1]
        rounds = 0
        while plan and rounds < 10:
            for op, budget in plan:
                fuzz_operation(op, budget)
            # Operations without parameters end after a case or two; top up with the body operations.
            short = cases - sum(seen.values()) - sum(unsendable.values())
            plan = [(op, max(1, -(-short // (2 * len(body_ops))))) for op in body_ops] if short > 0 else []
            rounds += 1
        sent = sum(seen.values())
        by_status = collections.Counter(k.rsplit(" -> ", 1)[1] for k in seen.elements())
        by_op = collections.Counter(k.rsplit(" -> ", 1)[0] for k in seen.elements())
        report(name, {"cases_generated": sent + sum(unsendable.values()), "cases_sent": sent,
                      "unsendable": dict(unsendable), "by_status": dict(by_status), "by_operation": dict(by_op),
                      "failures": len(failures), "first_failures": failures[:5]})
        assert not failures, "\n\n".join(failures[:5])
        assert sent >= cases * 0.9, (sent, dict(unsendable))
        assert len(by_op) >= 8, by_op


def test_schema_fuzz_small(tmp_path):
    _fuzz(tmp_path, env_int("REL_FUZZ_CASES_QUICK", 120), "fuzz_quick")


@pytest.mark.slow
def test_schema_fuzz_campaign(tmp_path):
    cases = env_int("REL_FUZZ_CASES", 2000)
    _fuzz(tmp_path, cases, f"fuzz_{cases}")


def test_openapi_documents_the_error_shape(tmp_path):
    """Clients can rely on the schema: every operation that can fail documents the error body."""
    with stack(tmp_path, models=FUZZ_MODELS) as svc:
        _, url = svc.start_api()
        import httpx

        spec = httpx.get(url + "/openapi.json").json()
    missing = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status, resp in op.get("responses", {}).items():
                if status.startswith("4") and status != "422":
                    ref = json.dumps(resp)
                    if "ErrorBody" not in ref:
                        missing.append(f"{method.upper()} {path} {status}")
    assert not missing, missing
    # Every status an operation answers with is documented (202: cancelling a running job).
    assert "202" in spec["paths"]["/jobs/{job_id}/cancel"]["post"]["responses"]

"""The load generator's client loop and report, against an in-process HTTP transport."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.load import (  # noqa: E402
    END,
    PROMPTS,
    START,
    LevelResult,
    direct_config,
    parse_args,
    render,
    requests_for,
    run_level,
)


class _Service:
    """Answers like POST /generate; every fifth seed fails; tracks requests in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: list[int] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.005)
        finally:
            self.in_flight -= 1
        self.seen.append(body["seed"])
        assert body["prompt"] in PROMPTS and body["cache"] == {"preset": "fast"}
        if body["seed"] % 5 == 4:
            return httpx.Response(503, json={"error": {"code": "unavailable", "message": "busy"}})
        return httpx.Response(200, json={"batch_images": 2, "cache_stats": {"flops_speedup": 3.0},
                                         "timings": {"inference_s": 0.25, "queue_wait_s": 0.01}})


@pytest.mark.parametrize("concurrency,n", [(1, 5), (4, 23), (16, 40)])
def test_run_level_keeps_the_concurrency_and_counts_everything(concurrency, n):
    a = parse_args(["--cache", "fast", "--steps", "3"])
    svc = _Service()
    res = asyncio.run(run_level("http://svc", concurrency, n, a, {}, transport=httpx.MockTransport(svc)))
    assert sorted(svc.seen) == list(range(n))  # each request index sent exactly once
    assert svc.max_in_flight == min(concurrency, n)
    failures = sum(1 for i in range(n) if i % 5 == 4)
    assert res.errors == failures and res.error_kinds == ({"HTTP 503": failures} if failures else {})
    assert res.ok == n - failures == len(res.latencies)
    s = res.summary()
    assert s["mean_batch"] == 2 and s["flops_speedup"] == 3.0 and s["inference_s"] == 0.25
    assert 0 < s["p50"] <= s["p95"] <= s["p99"]
    assert s["throughput"] > 0 and len(res.done_at) == res.ok and 0 < res.drain_at <= res.wall_s


def test_connection_errors_are_counted_not_raised():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    a = parse_args([])
    res = asyncio.run(run_level("http://svc", 3, 7, a, {}, transport=httpx.MockTransport(refuse)))
    assert res.ok == 0 and res.errors == 7 and res.error_kinds == {"ConnectError": 7}
    assert res.summary()["throughput"] == 0.0


def test_throughput_leaves_out_the_draining_tail_and_passes_take_the_median():
    # Four answers while all clients were busy (4 s), one straggler at 10 s.
    r = LevelResult(4, 5, ok=5, wall_s=10.0, done_at=[1.0, 2.0, 3.0, 4.0, 10.0], drain_at=4.0,
                    latencies=[1.0] * 5, batch_sizes=[2] * 5)
    assert r.throughput == pytest.approx(1.0)
    assert LevelResult(1, 2, ok=2, wall_s=4.0).throughput == pytest.approx(0.5)  # no timestamps: plain ratio
    fast = LevelResult(4, 5, ok=5, wall_s=2.0, done_at=[0.5, 1.0, 1.5, 2.0, 2.0], drain_at=2.0, latencies=[0.5] * 5)
    slow = LevelResult(4, 5, ok=4, errors=1, error_kinds={"HTTP 503": 1}, wall_s=20.0,
                       done_at=[5.0, 10.0, 15.0, 20.0], drain_at=20.0, latencies=[5.0] * 4)
    s = LevelResult.combine([r, fast, slow])
    assert s["throughput_passes"] == [1.0, 2.5, 0.2]
    assert s["throughput"] == 1.0  # the median pass
    assert s["ok"] == 14 and s["errors"] == 1 and s["error_kinds"] == {"HTTP 503": 1} and s["requests"] == 15
    assert s["p99"] == pytest.approx(5.0)


def test_arguments_and_request_counts():
    a = parse_args([])
    assert a.concurrency == [1, 4, 16, 64]
    assert [requests_for(c, a) for c in a.concurrency] == [24, 24, 64, 256]
    assert parse_args(["--quick"]).concurrency == [1, 4]
    assert parse_args(["--batch", "8,16"]).batch == [8, 16]
    for bad in (["--concurrency", "1,x"], ["--concurrency", "0"], ["--batch", "1"], ["--batch", "8,y"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_report_states_the_target():
    row = {"concurrency": 1, "requests": 4, "errors": 0, "throughput": 2.0, "p50": 0.5, "p95": 0.6, "p99": 0.7,
           "mean_batch": 1.0, "inference_s": 0.4}
    res = {"meta": {"argv": "", "date": "d", "cpu": "c", "cores": 2, "steps": 20, "cache": "balanced", "batch": [8],
                    "threads": 1, "worker_threads": 1},
           "service": {"on": [row, {**row, "concurrency": 16, "throughput": 2.9}]},
           "targets": [{"batch": 8, "c1": 2.0, "c16": 2.9, "ratio": 1.45}, {"batch": 16, "c1": 2.0, "c16": 3.2, "ratio": 1.6}],
           "direct": [{"batch": 1, "images": 4, "throughput": 3.0, "p50": 0.3, "p95": 0.3, "p99": 0.3},
                      {"batch": 8, "images": 8, "throughput": 4.5, "p50": 1.0, "p95": 1.0, "p99": 1.0}]}
    text = render(res)
    assert text.startswith(START) and text.rstrip().endswith(END)
    assert "(max batch 8): throughput at concurrency 16 >= 1.5 x concurrency 1 | 2.90 / 2.00 img/s = 1.45x | no |" in text
    assert "(max batch 16): throughput at concurrency 16 >= 1.5 x concurrency 1 | 3.20 / 2.00 img/s = 1.60x | yes |" in text
    assert "batch 8: 1.50x" in text
    assert "| on | 16 | 4 | 0 | 2.90 |  | 0.50 |" in text
    assert "no GPU" in text and "Not measured here: the same benchmark on a GPU" in text
    gpu = render({**res, "meta": {**res["meta"], "device": "cuda", "device_name": "GPU NVIDIA H100"}})
    assert "GPU NVIDIA H100" in gpu and "no GPU" not in gpu and "Not measured here" not in gpu


def test_direct_baseline_runs_the_settings_the_service_runs(tmp_path):
    # The service resolves a preset through the checkpoint's own tuning; so must the baseline.
    from clusca import ClusCaConfig
    from clusca_shapes import WEIGHTS_DIR

    tuned = json.loads((WEIGHTS_DIR / "model_index.json").read_text())["cache_presets"]
    for preset in ("quality", "balanced", "fast"):
        want = ClusCaConfig.from_dict({"preset": preset, **tuned[preset]})
        assert direct_config(parse_args(["--cache", preset])) == want
    # Another checkpoint brings its own tuning.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    index = json.loads((WEIGHTS_DIR / "model_index.json").read_text())
    index["cache_presets"] = {"balanced": {"interval": 7, "clusters": 2}}
    (ckpt / "model_index.json").write_text(json.dumps(index))
    got = direct_config(parse_args(["--cache", "balanced", "--weights", str(ckpt)]))
    assert (got.interval, got.clusters, got.order) == (7, 2, ClusCaConfig.preset("balanced").order)

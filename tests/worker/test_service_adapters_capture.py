"""The worker's calls with LoRA adapters replay ClusCa's recorded cached steps.

The built-in model's runner, in process, with its adapter bank, under ``OpReplay`` (a CPU
stand-in for CUDA graphs that replays the recorded tensor operations without re-running
their Python, see ``clusca.capture``): a call with
adapters keeps the request's ``capture`` setting, replays the steps an earlier call of the
same family recorded (with other adapters, or none), and gives the images of its eager run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from clusca_shapes import WEIGHTS_DIR
from tests.support import linear_shapes, write_lora

WEIGHTS = Path(os.environ.get("CLUSCA_TEST_SHAPES_WEIGHTS", WEIGHTS_DIR))
pytestmark = [pytest.mark.skipif(not (WEIGHTS / "model_index.json").exists(),
                                 reason=f"no built-in model checkpoint at {WEIGHTS}"),
              pytest.mark.usefixtures("one_torch_thread")]
ADAPTERS = ("ink", "chalk")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    from clusca_shapes import ShapesFluxPipeline

    from service.adapters.store import AdapterStore
    from service.registry import FLUX_LORA_TARGETS, AdapterSettings, ModelEntry
    from service.worker.adapters import AdapterSource
    from service.worker.runners import load_runner

    root = tmp_path_factory.mktemp("adapters")
    # Every targeted layer: the feed-forward layers among them are what a cached step runs.
    patterns = [re.compile(t) for t in FLUX_LORA_TARGETS]
    layers = {m: shape for m, shape in linear_shapes(ShapesFluxPipeline.from_pretrained(WEIGHTS).transformer,
                                                     names=None).items()
              if any(p.fullmatch(m) for p in patterns)}
    for k, name in enumerate(ADAPTERS):
        write_lora(root / "shapes" / f"{name}.safetensors", layers, rank=4, seed=k + 1, scale=1.0)
    entry = ModelEntry(name="shapes", kind="builtin", path=str(WEIGHTS),
                       adapters=AdapterSettings(slots=2, max_per_request=2), options={"warmup": False})
    return load_runner(entry, "cpu", adapters=AdapterSource(AdapterStore(root, 1 << 26), budget_mb=64))


def _call(runner, adapters, capture: str):
    from clusca.config import ClusCaConfig

    from service.contract import AdapterUse, JobRequest
    from service.worker.runners.base import Batch

    cache = ClusCaConfig.from_dict({"mode": "clusca", "interval": 3, "warmup": 2, "order": 1, "clusters": 4,
                                    "capture": capture})
    jobs = [JobRequest(prompt=f"a red circle {k}", width=32, height=32, steps=12, guidance=4.0, seed=k + 1,
                       cache=cache, adapters=tuple(AdapterUse(n, s) for n, s in chosen))
            for k, chosen in enumerate(adapters)]
    out = runner.run(Batch.of(jobs), lambda step: False)
    return [np.asarray(im, dtype=np.float64) for im in out.images], out.stats


def test_a_call_with_adapters_replays_steps_recorded_under_other_adapters(runner):
    from clusca.capture import OpReplay, using_backend

    first = [[("ink", 1.0)], [("ink", 1.0)]]
    mixed = [[("chalk", 0.7), ("ink", 0.4)], []]
    plain = [[], []]
    with using_backend(OpReplay()):
        _, recorded = _call(runner, first, "auto")
        eager_mixed, _ = _call(runner, mixed, "off")
        got_mixed, replayed = _call(runner, mixed, "auto")
        eager_plain, _ = _call(runner, plain, "off")
        got_plain, plain_stats = _call(runner, plain, "auto")
    assert recorded.capture == "replayed" and recorded.graph_captures >= 1 and recorded.graph_replays > 0
    # Another selection of the same family: nothing recorded, every cached step replayed.
    assert replayed.graph_captures == 0 and replayed.graph_replays == replayed.cached_steps > 0
    for got, eager in zip(got_mixed, eager_mixed):
        assert np.abs(got - eager).max() <= 1.0  # 8-bit images: at most one level of rounding
    # Without adapters the bank adds nothing: its steps are recorded apart.
    assert plain_stats.graph_captures >= 1
    for got, eager in zip(got_plain, eager_plain):
        assert np.abs(got - eager).max() <= 1.0
    assert max(np.abs(a - b).max() for a, b in zip(eager_mixed, eager_plain)) > 8

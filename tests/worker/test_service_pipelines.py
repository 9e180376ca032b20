"""Worker-side runner helpers: calling conventions and loading errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_call_parameters_and_bad_pipeline_class():
    from service.worker.runners.noop_pipeline import LegacyCallbackNoopPipeline, NoopPipeline
    from service.registry import ModelEntry
    from service.worker.runners import load_runner
    from service.worker.runners.pipeline import call_parameters

    assert call_parameters(NoopPipeline()) == {"*"}
    legacy = call_parameters(LegacyCallbackNoopPipeline())
    assert "callback" in legacy and "callback_on_step_end" not in legacy
    entry = ModelEntry(name="x", kind="diffusers", path="/nonexistent", pipeline_class="AutoencoderKL")
    with pytest.raises(ValueError, match="not a diffusers pipeline class"):
        load_runner(entry, "cpu")

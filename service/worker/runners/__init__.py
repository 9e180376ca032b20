"""Model runners by registry kind; the worker asks :func:`load_runner` and knows only :class:`Runner`."""

from __future__ import annotations

from service.registry import ModelEntry
from service.worker.adapters import AdapterSource
from service.worker.runners.base import Batch, BatchOutput, RequestNotSupported, Runner, StepCallback
from service.worker.runners.builtin import BuiltinRunner
from service.worker.runners.diffusers import DiffusersRunner
from service.worker.runners.noop import NoopRunner
from service.worker.runners.video import VideoDiffusersRunner

# Registry kind -> runner class. A new kind of model is a new runner here, not a worker change.
RUNNERS: dict[str, type[Runner]] = {"builtin": BuiltinRunner, "diffusers": DiffusersRunner, "noop": NoopRunner}
# Registry kind -> runner class for models whose entry says ``output: video``.
VIDEO_RUNNERS: dict[str, type[Runner]] = {"diffusers": VideoDiffusersRunner, "noop": NoopRunner}

__all__ = ["Batch", "BatchOutput", "RequestNotSupported", "Runner", "StepCallback", "RUNNERS", "VIDEO_RUNNERS", "load_runner"]


def load_runner(entry: ModelEntry, device: str, torch_threads: int = 0, adapters: AdapterSource | None = None) -> Runner:
    """``entry`` loaded and warm: its kind's runner, on ``device`` (``auto``: the best available),
    serving the adapters of ``adapters`` (its bank installed before the warm-up: what the warm-up
    compiles or records already reads the bank's buffers), its pins loaded."""
    try:
        cls = (VIDEO_RUNNERS if entry.output == "video" else RUNNERS)[entry.kind]
    except KeyError:
        raise ValueError(f"model {entry.name!r}: no runner for kind {entry.kind!r}") from None
    runner = cls.load(entry, device, torch_threads)
    if adapters is not None:
        runner.attach_adapters(adapters)
    runner.warm_up()
    if runner.adapters is not None:
        runner.adapters.load_pins()
        runner.adapters.check_all()
    return runner

"""Runners: the worker's one seam to models, and the layout rules that keep it one."""

from __future__ import annotations

import ast
import typing
from pathlib import Path
from typing import Any

import pytest

from service.contract import JobRequest
from service.worker.runners.noop_pipeline import NoopOutput, NoopPipeline, noop_color
from service.registry import ModelEntry
from service.worker.runners import RUNNERS, Batch, RequestNotSupported, load_runner
from service.worker.runners.noop import NoopRunner

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"
KINDS = typing.get_args(ModelEntry.model_fields["kind"].annotation)


def _batch(steps: int = 3, negative: str | None = None, **kw: Any) -> Batch:
    reqs = [JobRequest(prompt="a", width=16, height=16, steps=steps, guidance=0.0, seed=10, num_images=2,
                       negative_prompt=negative, **kw),
            JobRequest(prompt="b", width=16, height=16, steps=steps, guidance=0.0, seed=20, negative_prompt=negative)]
    return Batch.of(reqs)


def _noop(**options: Any) -> NoopRunner:
    return load_runner(ModelEntry(name="n", kind="noop", options=options), "cpu")  # type: ignore[return-value]


def test_batch_has_one_prompt_and_seed_per_image():
    b = _batch()
    assert b.prompts == ["a", "a", "b"] and b.seeds == [10, 11, 20] and b.images == 3
    assert b.negative_prompts is None and _batch(negative="x").negative_prompts == ["x", "x", "x"]


@pytest.mark.parametrize("legacy", [False, True])
def test_run_reports_each_step_and_returns_an_image_per_prompt(legacy):
    runner = _noop(legacy_callback=legacy)
    steps: list[int] = []
    out = runner.run(_batch(steps=4), lambda i: steps.append(i) or False)
    assert steps == [1, 2, 3, 4] and not out.stopped
    assert [im.getpixel((0, 0)) for im in out.images] == [noop_color("a", 10), noop_color("a", 11), noop_color("b", 20)]
    assert out.stats.full_steps == 4 and out.stats.cached_steps == 0


@pytest.mark.parametrize("legacy", [False, True])
def test_the_step_callback_stops_the_run_in_either_callback_convention(legacy):
    runner = _noop(legacy_callback=legacy)
    steps: list[int] = []
    out = runner.run(_batch(steps=10), lambda i: steps.append(i) or i >= 2)
    assert steps == [1, 2] and out.stopped


class _Strict:
    """A pipeline naming its arguments: no negative prompt, no output_type, no callbacks."""

    transformer = None

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def __call__(self, prompt, num_inference_steps, guidance_scale, generator, height, width,
                 num_images_per_prompt) -> NoopOutput:
        self.seen = dict(prompt=prompt, height=height)
        return NoopPipeline()(prompt, num_inference_steps=num_inference_steps, generator=generator,
                              height=height, width=width)


def test_unsupported_arguments_are_dropped_and_a_negative_prompt_is_refused():
    entry = ModelEntry(name="strict", kind="noop")
    runner = NoopRunner(entry, "cpu", _Strict())
    out = runner.run(_batch(), lambda i: False)
    assert len(out.images) == 3 and runner.pipe.seen["prompt"] == ["a", "a", "b"]
    with pytest.raises(RequestNotSupported, match="negative_prompt"):
        runner.run(_batch(negative="blurry"), lambda i: False)


def test_a_failed_run_frees_memory_and_raises():
    freed = []

    class Freeing(NoopRunner):
        def free_memory(self) -> None:
            freed.append(True)

    runner = Freeing(ModelEntry(name="f", kind="noop"), "cpu", NoopPipeline(fail_on="a"))
    with pytest.raises(RuntimeError, match="out of memory"):
        runner.run(_batch(), lambda i: False)
    assert freed == [True]


def test_every_registry_kind_has_a_runner():
    assert set(RUNNERS) == set(KINDS)


# ---------------------------------------------------------------------------- layout rules
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


WORKER_CORE = ["loop.py", "batching.py", "execution.py", "heartbeat.py", "progress.py", "results.py", "watch.py", "edit_inputs.py",
               "adapters.py"]
# A parallel group's ranks (service/worker/group.py) share torch.distributed and clusca.parallel and
# load their model through the runners' table: inside the functions a rank runs, never on import.
WORKER_GROUP = ["group.py"]


@pytest.mark.parametrize("name", WORKER_CORE)
def test_the_worker_names_no_model_kind(name):
    tree = _tree(SERVICE / "worker" / name)
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    named = [k for k in KINDS if any(k in s.lower() for s in strings)]
    assert not named, f"service/worker/{name} names model kinds {named}"
    modules = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in modules if m.startswith("service.worker.runners.")
                or m.split(".")[0] in ("torch", "diffusers", "clusca")], modules
    idents = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
        {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "kind" not in idents, f"service/worker/{name} looks at a model's kind"


@pytest.mark.parametrize("name", WORKER_GROUP)
def test_the_group_module_imports_torch_and_the_runners_only_where_a_rank_runs(name):
    tree = _tree(SERVICE / "worker" / name)
    top = {n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)}
    top |= {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in top if m.startswith("service.worker.runners.")
                or m.split(".")[0] in ("torch", "diffusers", "clusca")], top


def test_the_worker_core_is_every_module_beside_the_runners():
    assert sorted(p.name for p in (SERVICE / "worker").glob("*.py")
                  if p.name != "__init__.py") == sorted(WORKER_CORE + WORKER_GROUP)


def test_routers_import_no_other_router_and_no_redis_keys():
    routers = SERVICE / "api" / "routers"
    for path in routers.glob("*.py"):
        tree = _tree(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert node.level != 1 and not module.startswith("service.api.routers"), \
                    f"{path.name} imports a sibling router ({module})"
                assert not module.startswith("service.broker"), f"{path.name} reaches into the queue ({module})"
            if isinstance(node, ast.Attribute) and node.attr == "redis":
                pytest.fail(f"{path.name} talks to Redis directly (services.redis) instead of asking the queue")


def test_the_progress_pump_has_its_own_module():
    from service.worker import progress, loop as worker

    assert progress.ProgressPump.__module__ == "service.worker.progress"
    assert not [n for n in ast.walk(_tree(SERVICE / "worker" / "loop.py")) if isinstance(n, ast.ClassDef)
                and n.name != "Worker"], "the worker module defines only the Worker"
    assert worker.ProgressPump is progress.ProgressPump

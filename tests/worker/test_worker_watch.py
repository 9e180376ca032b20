"""The running call's watch and its stop between blocks, without Redis."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from service.broker.consumer import Delivery, StartedJob
from service.contract import CANCELLED, FAILED, JobRequest
from service.worker.runners.base import CallStopped
from service.worker.runners.interrupt import stop_between_blocks, stop_check
from service.worker.watch import CallWatch, deadline_error


def _job(job_id: str, created: float = 0.0, timeout_s: float | None = None) -> StartedJob:
    req = JobRequest(prompt="p", width=16, height=16, steps=2, guidance=0.0, seed=1, timeout_s=timeout_s)
    return StartedJob(Delivery("m", f"1-{job_id}", job_id), req, created, created, 1, False)


def test_a_job_ends_once_and_the_call_stops_when_none_is_left():
    ended: list[tuple[str, str]] = []
    a, b = _job("a"), _job("b")
    watch = CallWatch([a, b], lambda j, status, error: ended.append((j.delivery.job_id, status)))
    watch.cancel("a")
    watch.cancel("a")
    assert ended == [("a", CANCELLED)] and watch.live() == [b] and not watch.stop.is_set()
    watch.end(b, FAILED, "why")
    assert watch.stop.is_set() and watch.all_ended() and watch.live() == []
    assert watch.close() == {"a", "b"}


def test_nothing_leaves_a_closed_call():
    ended: list[str] = []
    a = _job("a")
    watch = CallWatch([a], lambda j, status, error: ended.append(status))
    assert watch.close() == set()
    watch.cancel("a")
    assert ended == [] and not watch.stop.is_set()


def test_deadlines_count_from_submission():
    ended: list[tuple[str, str]] = []
    late, early, none = _job("late", created=100.0, timeout_s=5), _job("early", created=100.0, timeout_s=1), _job("n")
    watch = CallWatch([late, early, none], lambda j, status, error: ended.append((j.delivery.job_id, error)))
    watch.expire(now=100.5)
    assert ended == []
    watch.expire(now=101.0)
    assert ended == [("early", deadline_error(early))] and "timeout_s of 1 s" in ended[0][1]
    watch.expire(now=10**9)
    assert [j for j, _ in ended] == ["early", "late"], "a job without a timeout has no deadline"


def test_a_failing_store_does_not_break_the_watch():
    def boom(*_):
        raise RuntimeError("redis down")

    watch = CallWatch([_job("a")], boom)
    watch.cancel("a")
    assert watch.all_ended()


def test_stop_check_raises_only_once_set():
    stop = threading.Event()
    check = stop_check(stop)
    check(1, 2)
    stop.set()
    with pytest.raises(CallStopped):
        check()
    stop_check(None)()


def test_a_call_stops_between_two_blocks_not_at_the_end_of_the_step():
    torch = pytest.importorskip("torch")

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x + 1

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Slow() for _ in range(40))  # a 2 s forward

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    model, stop = Model(), threading.Event()
    ran: list[int] = []

    def after_third(*_):
        ran.append(2)
        stop.set()

    model.blocks[2].register_forward_hook(after_third)
    with stop_between_blocks(model, stop):
        with pytest.raises(CallStopped):
            model(torch.zeros(1))
    assert ran == [2]
    # The hooks are gone after the call: the model runs whole again.
    stop.set()
    assert model.blocks[0]._forward_pre_hooks == {} and float(model(torch.zeros(1))) == 40.0


def test_the_builtin_runner_stops_inside_its_first_step(one_torch_thread):
    from service.registry import builtin_entry
    from service.worker.runners import Batch, load_runner

    entry = builtin_entry()
    entry = entry.model_copy(update={"options": {"warmup": False}})
    runner = load_runner(entry, "cpu")
    stop = threading.Event()
    blocks = [b for m in runner.pipe.transformer.modules() if type(m).__name__ == "ModuleList" for b in m]
    seen: list[int] = []

    def after_second(*_):
        seen.append(1)
        stop.set()

    blocks[1].register_forward_hook(after_second)
    steps: list[int] = []
    batch = Batch(prompts=["a red circle"], negative_prompts=None, seeds=[1], width=32, height=32, steps=8,
                  guidance=5.0, cache=entry.cache_config())
    out = runner.run(batch, lambda i: steps.append(i) or False, stop)
    assert out.stopped and out.images == [] and steps == [] and seen == [1]
    # The same runner then runs a whole call: nothing of the stopped one is left behind.
    whole = runner.run(replace(batch, steps=2), lambda i: False)
    assert not whole.stopped and len(whole.images) == 1 and whole.stats.full_steps + whole.stats.cached_steps == 2


def test_the_worker_stopping_stops_every_running_call_without_ending_its_jobs():
    from service.worker.watch import CallWatcher

    stopping = threading.Event()
    ended: list[str] = []
    # No queue: a call this young is not polled for cancels, only stopped.
    watcher = CallWatcher(q=None, poll_s=0.05, stopping=stopping)
    watcher.start()
    watch = CallWatch([_job("a")], lambda j, status, error: ended.append(status))
    watcher.watch(watch)
    watch.began = time.monotonic() + 60
    time.sleep(0.2)
    assert not watch.stop.is_set()
    stopping.set()
    assert watch.stop.wait(2), "the running call was not stopped"
    # The jobs stay the call's: the worker hands them back rather than finishing them.
    assert ended == [] and watch.close() == set()
    watcher.unwatch(watch)

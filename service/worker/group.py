"""A worker that is a group of ranks: one model, each call split over ``parallel.ulysses x ring``
processes with context parallelism (:mod:`clusca.parallel`).

To the queue the group is one worker: rank 0 runs the ordinary :class:`~service.worker.loop.Worker`
(it claims jobs, heartbeats, publishes progress and stores results); its runner is a
:class:`GroupRunner` that broadcasts each call's batch to the other ranks before running it,
so every rank makes the same pipeline call. The other ranks only follow (:func:`follow`).

Control messages travel on a gloo group of their own (objects on the CPU, also beside nccl):
``run`` with a batch, ``tick`` while idle (so a follower's wait for work is bounded by the
collective timeout too, and a dead rank is noticed between jobs), ``exit``. Whether to stop a
call is agreed at every step (an all-reduce), so a cancelled job ends on every rank at the
same step.

Faults: a collective that fails or outlives ``parallel.timeout_s`` (a rank died or hangs) makes
rank 0 hand its running jobs back to the queue unrun and exit; the supervisor
(:func:`supervise`, the ``clusca worker`` process) then ends every rank, counts and logs the
failure, and starts a new group, which takes the jobs again. A rank 0 that dies leaves its
jobs to the visibility timeout, after which the new group reclaims them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from typing import Any

from service import metrics
from service.registry import ModelEntry
from service.worker.runners import Batch, BatchOutput, Runner, StepCallback

log = logging.getLogger("clusca.worker")

# Exit code of a rank 0 that left because its group failed (the supervisor restarts the group).
GROUP_FAILED = 3
# Seconds between restarts of a group that keeps failing.
RESTART_BACKOFF_S = (1.0, 30.0)
# Starts in a row that end before rank 0 serves: then the model cannot load, and the worker exits.
MAX_FAILED_STARTS = 3


class GroupFault(RuntimeError):
    """A collective of the group failed or timed out: some rank died or hangs."""


class Channel:
    """Rank 0's messages to the other ranks, over the group's gloo control group."""

    def __init__(self, group: Any, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.lock = threading.Lock()

    def send(self, message: tuple) -> None:
        import torch.distributed as dist

        box = [message]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except Exception as exc:  # noqa: BLE001 - gloo reports a lost peer in several exception types
            raise GroupFault(f"broadcast to the group failed: {exc}") from exc

    def receive(self) -> tuple:
        import torch.distributed as dist

        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except Exception as exc:  # noqa: BLE001
            raise GroupFault(f"waiting for rank 0 failed: {exc}") from exc
        return box[0]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (every rank calls it at the same point)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        except Exception as exc:  # noqa: BLE001
            raise GroupFault(f"agreeing with the group failed: {exc}") from exc
        return bool(t.item())


def run_agreed(runner: Runner, batch: Batch, on_step: StepCallback, channel: Channel,
               stop: threading.Event | None = None) -> BatchOutput:
    """One call of ``batch`` on this rank, its stop agreed with the group at every step.

    The runner gets no ``stop`` of its own: a stop between two blocks on one rank would leave
    the others in a collective; every rank checks the agreed flag at the same step instead.
    """

    def agreed(step: int) -> bool:
        local = bool(on_step(step)) or (stop is not None and stop.is_set())
        return channel.any(local)

    return runner.run(batch, agreed, None)


class GroupRunner(Runner):
    """Rank 0's runner: sends each batch to the group, then runs its own share of the call."""

    def __init__(self, inner: Runner, channel: Channel, degree: dict[str, int], on_fault) -> None:
        super().__init__(inner.entry, inner.device)
        self.inner = inner
        self.channel = channel
        self.degree = degree
        self.on_fault = on_fault  # called once with the fault: the worker stops and hands its jobs back
        self.pipe = getattr(inner, "pipe", None)
        # Shared with the heartbeat's description (it is sent as it is at each beat): GET /models
        # shows the degree and the last call's collective time per step.
        self.info: dict[str, Any] = {**degree, "collective_s_per_step": None}

    @classmethod
    def load(cls, entry: ModelEntry, device: str, torch_threads: int = 0) -> "GroupRunner":
        raise TypeError("a GroupRunner wraps a loaded runner")

    def run(self, batch: Batch, on_step: StepCallback, stop: threading.Event | None = None) -> BatchOutput:
        # The whole call holds the channel: the idle ticker must not slip a message in between.
        with self.channel.lock:
            try:
                self.channel.send(("run", batch))
                out = run_agreed(self.inner, batch, on_step, self.channel, stop)
            except GroupFault as exc:
                return self._fault(exc)
            except Exception as exc:
                # A model error is the same on every rank (same batch, same call); a rank that died
                # mid-call shows up as some other error here. Ask the group whether all are still there.
                try:
                    self.channel.send(("ping",))
                    self.channel.any(False)
                except GroupFault:
                    return self._fault(GroupFault(f"the call failed ({type(exc).__name__}: {exc}) and the group "
                                                  f"did not answer after it"))
                raise exc
        self._observe_collectives(out.stats, batch.denoised_steps)
        return out

    def _observe_collectives(self, stats: Any, steps: int) -> None:
        from clusca import parallel as cp

        seconds, _ = cp.collective_clock().read()
        if stats is not None and steps > 0:
            per_step = seconds / steps
            metrics.COLLECTIVE_STEP.labels(self.entry.name).observe(per_step)
            self.info["collective_s_per_step"] = round(per_step, 6)

    def _fault(self, exc: Exception) -> BatchOutput:
        log.error("parallel group of %s failed: %s; handing the running jobs back", self.entry.name, exc)
        self.on_fault(exc)
        return BatchOutput([], None, stopped=True)

    def warm_up(self) -> None:
        """The inner runner warmed up with the group when it was loaded."""

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "parallel": self.info}


def follow(runner: Runner, channel: Channel) -> None:
    """A follower rank's loop: run every batch rank 0 sends, until it says ``exit``."""
    while True:
        message = channel.receive()
        kind = message[0]
        if kind == "exit":
            return
        if kind == "ping":
            channel.any(False)
        elif kind == "run":
            try:
                run_agreed(runner, message[1], lambda _step: False, channel)
            except GroupFault:
                raise
            except Exception as exc:  # noqa: BLE001 - rank 0 fails the job; this rank waits for the next
                log.warning("rank %d: call failed (%s)", channel.rank, exc)
            from clusca import parallel as cp

            cp.collective_clock().read()


def _ticker(channel: Channel, interval_s: float, stop: threading.Event, on_fault) -> None:
    """Rank 0, while idle: a message every ``interval_s`` so that followers' waits stay bounded."""
    while not stop.wait(interval_s):
        if not channel.lock.acquire(blocking=False):
            continue  # a call is running; its collectives keep the group busy anyway
        try:
            channel.send(("tick",))
        except GroupFault as exc:
            on_fault(exc)
            return
        finally:
            channel.lock.release()


def load_group_runner(entry: ModelEntry, device: str, torch_threads: int) -> Runner:
    """This rank's runner for ``entry``: the model loaded, hooked, split over the group, warm."""
    from clusca import parallel as cp
    from service.worker.runners import RUNNERS

    runner = RUNNERS[entry.kind].load(entry, device, torch_threads)
    transformer = getattr(getattr(runner, "pipe", None), "transformer", None)
    if transformer is None:
        raise ValueError(f"model {entry.name!r}: parallel needs a pipeline with a transformer")
    backend = entry.options.get("attention_backend")
    if backend:
        transformer.set_attention_backend(backend)  # ring attention needs one that returns the log-sum-exp
    cp.enable_context_parallel(transformer, cp.ParallelDegree(entry.parallel.ulysses, entry.parallel.ring))
    log.info("model %s split over %d ranks (ulysses %d x ring %d); CUDA-graph capture is off in a group, and a "
             "stop takes effect at the next step", entry.name, entry.parallel.world, entry.parallel.ulysses,
             entry.parallel.ring)
    runner.warm_up()  # on every rank at once: its collectives pair up
    cp.collective_clock().read()
    return runner


def rank_main(rank: int, world: int, init_method: str, model: str, worker_id: str, local_rank: int = 0,
              serving: Any = None) -> None:
    """One rank of a group (a spawned process); ``local_rank`` picks its GPU on its host."""
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(local_rank)

    from clusca import parallel as cp
    from service.registry import Registry
    from service.settings import get_settings

    # Spawned, so nothing of the parent's logging set-up carries over.
    logging.basicConfig(level=os.environ.get("CLUSCA_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops the group in order
    settings = get_settings()
    entry = Registry.load(settings.models_file).get(model)
    timeout = entry.parallel.timeout_s
    device = cp.init_group(rank, world, init_method, timeout_s=timeout,
                           device=entry.device if entry.device != "auto" else settings.device)
    import datetime

    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    channel = Channel(control, rank)
    runner = load_group_runner(entry, str(device), settings.torch_threads)
    if rank != 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            follow(runner, channel)
        except GroupFault as exc:
            log.error("rank %d of %s: %s", rank, model, exc)
            os._exit(GROUP_FAILED)
        dist.destroy_process_group()
        return
    _serve_rank0(settings, entry, runner, channel, worker_id, timeout, serving)


def _serve_rank0(settings: Any, entry: ModelEntry, runner: Runner, channel: Channel, worker_id: str,
                 timeout: float, serving: Any = None) -> None:
    from service.registry import Registry
    from service.worker.loop import Worker

    registry = Registry([entry])
    worker = Worker(settings, registry, [entry.name], worker_id)
    failed: list[Exception] = []

    def on_fault(exc: Exception) -> None:
        if not failed:
            failed.append(exc)
        worker.stop.set()

    worker.models[entry.name] = GroupRunner(runner, channel, entry.public()["parallel"], on_fault)
    worker._loaded = True
    metrics.PARALLEL_DEGREE.labels(entry.name).set(entry.parallel.world)
    worker.install_signal_handlers()
    ticking = threading.Event()
    ticker = threading.Thread(target=_ticker, args=(channel, max(1.0, timeout / 4), ticking, on_fault), daemon=True)
    ticker.start()
    if serving is not None:
        serving.set()
    try:
        worker.serve()
    finally:
        ticking.set()
        ticker.join(timeout)
    if failed:
        os._exit(GROUP_FAILED)
    try:
        with channel.lock:
            channel.send(("exit",))
    except GroupFault:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_layout(world: int, settings: Any) -> tuple[list[int], str | None]:
    """The global ranks this host starts, and the rendezvous (None: a free loopback port per start).

    With ``CLUSCA_PARALLEL_NODES`` hosts, host ``k`` holds ranks ``k * world / nodes`` onwards, and
    every start meets at ``CLUSCA_PARALLEL_MASTER`` (host 0, where rank 0 listens).
    """
    nodes, node = settings.parallel_nodes, settings.parallel_node_rank
    if world % nodes:
        raise ValueError(f"parallel: {world} ranks do not split over CLUSCA_PARALLEL_NODES={nodes} hosts")
    if node >= nodes:
        raise ValueError(f"CLUSCA_PARALLEL_NODE_RANK={node} but CLUSCA_PARALLEL_NODES={nodes}")
    if nodes > 1 and not settings.parallel_master:
        raise ValueError("CLUSCA_PARALLEL_MASTER (host:port of node 0) is needed with more than one host")
    local = world // nodes
    master = f"tcp://{settings.parallel_master}" if nodes > 1 else None
    return list(range(node * local, (node + 1) * local)), master


def supervise(entry: ModelEntry, worker_id: str, settings: Any = None) -> None:
    """``clusca worker`` for a parallel model: start the group's ranks (this host's share of them),
    restart them all when one fails, stop them in order on SIGTERM (rank 0 hands its jobs back,
    then tells the others)."""
    from service.settings import get_settings

    world = entry.parallel.world
    ranks, master = node_layout(world, settings or get_settings())
    check_devices(entry, len(ranks))
    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    procs: list[Any] = []

    def _stop(signum: int, _frame: Any) -> None:
        stopping.set()
        if ranks[0] == 0 and procs and procs[0].is_alive():
            os.kill(procs[0].pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    backoff = RESTART_BACKOFF_S[0]
    generation = 0
    failed_starts = 0
    serving = ctx.Event()
    while not stopping.is_set():
        generation += 1
        init = master or f"tcp://127.0.0.1:{_free_port()}"
        serving.clear()
        procs[:] = [ctx.Process(target=rank_main, args=(r, world, init, entry.name, worker_id, i, serving),
                                daemon=False) for i, r in enumerate(ranks)]
        for p in procs:
            p.start()
        log.info("parallel group %d of %s: %d ranks (ulysses %d x ring %d), ranks %s here, pids %s", generation,
                 entry.name, world, entry.parallel.ulysses, entry.parallel.ring, ranks, [p.pid for p in procs])
        started = time.monotonic()
        while all(p.is_alive() for p in procs) and not stopping.is_set():
            time.sleep(0.2)
        if stopping.is_set():
            if ranks[0] != 0:
                for p in procs:  # followers hold no jobs: nothing to hand back
                    if p.is_alive():
                        p.terminate()
            _end(procs, grace_s=8.0)
            break
        codes = {r: p.exitcode for r, p in enumerate(procs) if not p.is_alive()}
        _end(procs, grace_s=2.0)
        metrics.GROUP_RESTARTS.labels(entry.name).inc()
        log.error("parallel group %d of %s failed (rank exit codes %s); its jobs go back to the queue; "
                  "restarting the group", generation, entry.name, codes)
        # Only this host's rank 0 knows whether the group got to serve; other hosts keep trying.
        failed_starts = 0 if serving.is_set() or ranks[0] != 0 else failed_starts + 1
        if failed_starts >= MAX_FAILED_STARTS:
            raise SystemExit(f"clusca worker: the parallel group of {entry.name!r} failed to start "
                             f"{failed_starts} times in a row; see the ranks' errors above")
        if time.monotonic() - started > 60:
            backoff = RESTART_BACKOFF_S[0]
        stopping.wait(backoff)
        backoff = min(backoff * 2, RESTART_BACKOFF_S[1])
    log.info("parallel group of %s stopped", entry.name)


def _end(procs: list[Any], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def check_devices(entry: ModelEntry, local_ranks: int | None = None) -> None:
    """Refuse more ranks on this host than the GPUs present (on a GPU device), with a clear message."""
    device = entry.device
    wanted = entry.parallel.world if local_ranks is None else local_ranks
    if device.startswith("cuda") or device == "auto":
        try:
            import torch

            count = torch.cuda.device_count()
        except ImportError:
            count = 0
        if device.startswith("cuda") and wanted > count:
            raise ValueError(f"model {entry.name!r}: parallel asks for {wanted} ranks on this host but "
                             f"{count} GPU(s) are present")
        if device == "auto" and 0 < count < wanted:
            raise ValueError(f"model {entry.name!r}: parallel asks for {wanted} ranks on this host but "
                             f"{count} GPU(s) are present (set device: cpu to run the group on gloo)")

"""Context parallelism: one transformer call split over the ranks of a ``torch.distributed`` group.

The transport is diffusers' own (``ContextParallelConfig`` and ``enable_parallelism``: Ulysses
all-to-all over heads, ring attention over key/value chunks); this module only prepares a
model for it and keeps the ClusCa cache consistent across the ranks:

* Each rank holds a contiguous shard of the image and text tokens between the transformer's
  input split and its ``proj_out`` gather, so every module hook sees its own rank's tokens.
* Decisions that do not depend on the features (full or cached step, the warm-up, the
  interval, the Taylor weights, which token positions are drawn fresh) come from the step
  index and the seed only, so they are the same everywhere without a message.
* Decisions that read the features are agreed by a collective: the divergence guard (its
  estimate is read from the gathered output, and the trip is all-reduced so that no rank
  runs a step in full while another caches it) and the classifier-free-guidance pair test
  (each rank compares its own shard; the pair holds only if it holds on every rank).
* Clustering is per shard: each rank runs k-means on its own tokens and refreshes one token
  per cluster of its shard. A cluster's members then all live on the rank that computes its
  fresh token, so propagation needs no exchange; the fresh tokens per step are ``K`` per rank.
  (Global clustering would need the hidden states gathered on every full step and each fresh
  output sent to the ranks holding the cluster's members.)

``enable_context_parallel`` must run after ``apply_clusca``: diffusers' hooks registered
last run first, so the input split then happens before the ClusCa root hook sees the call,
and the lean cached step (which calls ``proj_out``) still ends with the gather.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

_GROUP_ATTR = "_clusca_parallel"


@dataclass(frozen=True)
class ParallelDegree:
    """How many ranks split one call: Ulysses (heads) times ring (key/value chunks)."""

    ulysses: int = 1
    ring: int = 1

    @property
    def world(self) -> int:
        return self.ulysses * self.ring

    def to_dict(self) -> dict[str, int]:
        return {"ulysses": self.ulysses, "ring": self.ring, "world": self.world}


def check_degree(degree: ParallelDegree, heads: int | None, tokens: dict[str, int] | None = None) -> None:
    """Refuse a degree the model cannot be split by (``ValueError`` naming what does not divide)."""
    if degree.ulysses < 1 or degree.ring < 1:
        raise ValueError(f"parallel: degrees must be positive, got ulysses={degree.ulysses} ring={degree.ring}")
    if heads is not None and heads % degree.ulysses:
        raise ValueError(f"parallel.ulysses: {degree.ulysses} does not divide the model's {heads} attention heads")
    for name, n in (tokens or {}).items():
        if n % degree.world:
            raise ValueError(f"parallel: {degree.world} ranks do not divide the {n} {name} tokens")


def attention_heads(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None) if cfg is not None else None
    return int(heads) if heads is not None else None


@contextlib.contextmanager
def _device_count_at_least_one() -> Iterator[None]:
    # diffusers computes ``rank % torch.accelerator.device_count()`` for the rank's device,
    # which divides by zero on a CPU-only torch; there the one device is the CPU.
    acc = getattr(torch, "accelerator", None)
    if acc is None or acc.device_count() > 0:
        yield
        return
    original = acc.device_count
    acc.device_count = lambda: 1
    try:
        yield
    finally:
        acc.device_count = original


class CollectiveClock:
    """Time spent in the context-parallel collectives of the calls of a run.

    Wraps the functional collectives diffusers' attention and gather hooks call. On the CPU
    (gloo) a collective completes on the host, so wall clock after its wait is its time; on a
    GPU it is timed with CUDA events, read once at the end of a run, so no step waits for it.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._events: list[tuple[Any, Any]] = []

    def timed(self, fn):
        def wrapper(tensor, *args, **kwargs):
            if tensor.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(tensor, *args, **kwargs)
                out = _wait(out)
                end.record()
                self._events.append((start, end))
            else:
                t0 = time.perf_counter()
                out = _wait(fn(tensor, *args, **kwargs))
                self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        wrapper.__wrapped__ = fn
        return wrapper

    def read(self) -> tuple[float, int]:
        """(seconds, collectives) since the last read."""
        if self._events:
            self._events[-1][1].synchronize()
            self.seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1000.0
            self._events = []
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


def _wait(out):
    from torch.distributed import _functional_collectives as funcol

    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


_CLOCK: CollectiveClock | None = None
_PATCHED = ("all_to_all_single", "all_gather_tensor", "permute_tensor")


def collective_clock() -> CollectiveClock:
    """The process's clock, installed on diffusers' functional collectives on first use."""
    global _CLOCK
    if _CLOCK is None:
        from torch.distributed import _functional_collectives as funcol

        clock = CollectiveClock()
        for name in _PATCHED:
            fn = getattr(funcol, name, None)
            if fn is not None and not hasattr(fn, "__wrapped__"):
                setattr(funcol, name, clock.timed(fn))
        _CLOCK = clock
    return _CLOCK


class ParallelGroup:
    """What a context-parallel transformer keeps about its group (read by the controller)."""

    def __init__(self, degree: ParallelDegree, process_group: Any = None) -> None:
        self.degree = degree
        self.process_group = process_group
        self.rank = torch.distributed.get_rank(process_group)
        self.size = torch.distributed.get_world_size(process_group)
        self.agreements = 0

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on some rank (every rank must call it at the same point)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.process_group)
        self.agreements += 1
        return bool(t.item())

    def all(self, flag: bool, device: torch.device) -> bool:
        return not self.any(not flag, device)

    def union(self, samples: list[int], batch: int, device: torch.device) -> list[int]:
        """The samples some rank chose, in order (every rank must call it at the same point)."""
        t = torch.zeros(max(batch, 1), dtype=torch.int32, device=device)
        if samples:
            t[torch.tensor(samples, dtype=torch.long, device=device)] = 1
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.process_group)
        self.agreements += 1
        return [int(i) for i in torch.nonzero(t[:batch]).flatten().tolist()]


def parallel_group(model: torch.nn.Module) -> ParallelGroup | None:
    return model.__dict__.get(_GROUP_ATTR)


def attention_backend(model: torch.nn.Module) -> str:
    """The attention backend ``model``'s processors dispatch to (diffusers' name for it)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            if processor._attention_backend is not None:
                return str(getattr(processor._attention_backend, "value", processor._attention_backend))
            break
    backend, _ = _AttentionBackendRegistry.get_active_backend()
    return str(getattr(backend, "value", backend))


def check_ring_backend(model: torch.nn.Module) -> None:
    """Ring attention merges partial results by their log-sum-exp, which diffusers' ``native``
    backend (torch's SDPA) does not return: refuse before the first call fails."""
    backend = attention_backend(model)
    if backend == "native":
        raise ValueError("parallel.ring: ring attention needs an attention backend that returns the log-sum-exp "
                         "(e.g. flash, _native_cudnn, _native_flash, sage; model.set_attention_backend(...), or "
                         "options.attention_backend in the registry); this model uses 'native'")


def enable_context_parallel(model: torch.nn.Module, degree: ParallelDegree) -> ParallelGroup:
    """Split ``model``'s calls over the ranks of the default process group.

    The group must already be initialised with ``degree.world`` ranks. ClusCa hooks, when
    wanted, must be installed first (see the module docstring); the collectives are timed
    from here on (``collective_clock``).
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    check_degree(degree, attention_heads(model))
    if degree.ring > 1:
        check_ring_backend(model)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("parallel: torch.distributed is not initialised")
    world = dist.get_world_size()
    if world != degree.world:
        raise ValueError(f"parallel: the group has {world} ranks but ulysses x ring is {degree.world}")
    config = ContextParallelConfig(ulysses_degree=degree.ulysses, ring_degree=degree.ring)
    collective_clock()
    with _device_count_at_least_one():
        model.enable_parallelism(config=config)
    group = ParallelGroup(degree)
    model.__dict__[_GROUP_ATTR] = group
    return group


def init_group(rank: int, world: int, init_method: str, timeout_s: float = 120.0,
               device: str = "auto") -> torch.device:
    """Join the default process group as ``rank`` of ``world``: nccl on GPUs, gloo on the CPU.

    ``init_method`` is a ``tcp://host:port`` or ``file://`` rendezvous (``env://`` reads the
    torchrun variables). ``timeout_s`` bounds every collective, so a rank that hangs turns
    into an error on the others instead of a group that waits for ever. Returns the rank's
    device (``cuda:<local rank>`` or ``cpu``).
    """
    import datetime
    import os

    import torch.distributed as dist

    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"parallel: rank {rank} needs GPU {local} but {count} are present")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dev

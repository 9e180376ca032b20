"""Stopping a running call between two transformer blocks, not only between steps.

One denoising step of a large request can take minutes on a small machine; a cancel
or a deadline must not wait for it. The check is a forward pre-hook on every block
of the transformer (every member of one of its ``ModuleList``\\ s), installed for the
call only: it costs one flag read per block. A cached step that is replayed from a
CUDA graph runs no Python per block, so such a step is stopped at its end.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

from service.worker.runners.base import CallStopped


def stop_check(stop: threading.Event | None) -> Callable[..., None]:
    """A function of any arguments that raises :class:`CallStopped` once ``stop`` is set."""
    def check(*_: Any) -> None:
        if stop is not None and stop.is_set():
            raise CallStopped()

    return check


@contextlib.contextmanager
def stop_between_blocks(module: Any, stop: threading.Event | None) -> Iterator[None]:
    """While inside, every block of ``module`` (a torch module) checks ``stop`` before it runs."""
    if stop is None or module is None:
        yield
        return
    import torch

    check = stop_check(stop)
    blocks = [b for m in module.modules() if isinstance(m, torch.nn.ModuleList) for b in m]
    handles = [b.register_forward_pre_hook(lambda _m, _args: check()) for b in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

"""``clusca_run``: choose settings for one generation and collect its statistics."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .config import ClusCaConfig
from .install import apply_clusca, get_controller
from .masking import TokenMasks, check_masks
from .state import Counters
from .stats import RunStats


class ClusCaRun:
    """Handle of an active (or finished) run; ``stats`` is live while the run is active."""

    def __init__(self, model: torch.nn.Module, config: ClusCaConfig, num_inference_steps: int | None) -> None:
        self.model = model
        self.config = config
        self.num_inference_steps = num_inference_steps
        self._final: RunStats | None = None

    @property
    def stats(self) -> RunStats:
        if self._final is not None:
            return self._final
        ctrl = get_controller(self.model)
        return RunStats.from_counters(self.config.mode, ctrl.counters, self.config.capture)

    def set_step(self, step: int) -> None:
        """Say which denoising step (0-based) the next transformer calls belong to.

        Optional: without it the step is read from the ``timestep`` argument, one host read
        per call (a synchronisation on an accelerator). Call it before each step, e.g. with
        ``step + 1`` from a pipeline's ``callback_on_step_end``; a smaller index than the last
        one starts a new denoising loop.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: must be a non-negative integer, got {step!r}")
        ctrl = get_controller(self.model)
        if self._final is None and ctrl is not None and ctrl.active:
            ctrl.announce_step(step)

    def set_token_mask(self, mask) -> None:
        """Give this run an inpainting mask per sample (see ``ClusCaConfig.mask_share``).

        ``mask``: a ``(batch, tokens)`` tensor of the image tokens the call repaints (non-zero,
        or ``True``), a ``(batch, height, width)`` one at any resolution of the image (the
        latent or the pixel mask: it is pooled onto the token grid, a token repainted if any of
        its cell is), or a list with one such tensor, or ``None`` for no mask, per sample; a
        batch of ``batch`` images run with its guidance halves in one call uses each mask for
        both halves. A mask that does not fit the call's tokens is ignored. Call it before the
        first denoising step; it holds until the run ends.
        """
        masks = TokenMasks(check_masks(mask))
        ctrl = get_controller(self.model)
        if self._final is None and ctrl is not None and ctrl.active:
            ctrl.token_masks = masks

    def _finish(self, counters: Counters) -> None:
        self._final = RunStats.from_counters(self.config.mode, counters, self.config.capture)


@contextlib.contextmanager
def clusca_run(
    model: torch.nn.Module,
    config: ClusCaConfig | str | None = None,
    *,
    num_inference_steps: int | None = None,
) -> Iterator[ClusCaRun]:
    """Activate ClusCa on ``model`` for the duration of the block.

    ``config`` is a ``ClusCaConfig``, a preset name, or ``None`` for the settings given to
    ``apply_clusca``. All cache state is cleared on entry and on exit, so consecutive runs
    never share state. Hooks are installed on first use if ``apply_clusca`` was not called.
    """
    ctrl = get_controller(model)
    if isinstance(config, str):
        config = ClusCaConfig.preset(config)
    if ctrl is None:
        ctrl = apply_clusca(model, config)
    if config is None:
        config = ctrl.default_config
    config.validate()
    if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps: must be a positive integer, got {num_inference_steps!r}")
    if config.modules is not None and ctrl.base_arch.with_overrides(config.modules) != ctrl.arch:
        # Different module patterns need different hooks: re-install them.
        ctrl = apply_clusca(model, config, architecture=ctrl.base_arch)
    if ctrl.active:
        raise RuntimeError("clusca_run: a run is already active on this model (runs cannot be nested)")
    run = ClusCaRun(model, config, num_inference_steps)
    ctrl.start(config, num_inference_steps)
    try:
        yield run
    finally:
        run._finish(ctrl.counters)
        ctrl.stop()
